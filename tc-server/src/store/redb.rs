//! The embedded store on redb: one file, `<data_dir>/ferrata-tc.redb`, written only by the
//! journal thread (see `journal.rs`), read once at start.
//!
//! ## Format
//!
//! Seven tables:
//! * `globals`: `u64` txn id → record of a live transaction,
//! * `branches`: `(u64 txn id, u64 branch id)` → record, so a transaction's branches are one
//!   contiguous key range,
//! * `finished`: `u64` txn id → what is kept of a finished transaction (bounded by the
//!   coordinator's retention, `[transactions] finished_history` and `finished_retention_ms`),
//! * `events`: `(u64 txn id, u32 index)` → one event of a transaction's timeline, live or
//!   finished (deleted with the finished record),
//! * `audit`: `u64` record id → an audit record (append-only),
//! * `tokens`: `&str` name → a named token (its secret's digest, never the secret),
//! * `meta`: `&str` → `u64`, holding `"id_ceiling"` and `"log_applied"` (the last record of
//!   the write-ahead log, `wal.rs`, that the file holds).
//!
//! A record is one format-version byte ([`FORMAT_VERSION`]) followed by the postcard encoding of
//! the `GlobalRecord` / `BranchRecord` / `FinishedRecord`. A later ferrata-tc that changes a
//! record bumps the byte; this one refuses a record with a byte it does not know instead of
//! misreading it, and reads the older versions it knows (a version-1 branch is an AT branch; a
//! branch before version 3 names no instance that holds it).
//!
//! ## Settings
//!
//! * Every commit is `Durability::Immediate` with redb's default 1-phase commit: the new commit
//!   slot and the data are written, then one `fsync` (fdatasync). A crash during that fsync
//!   leaves either the old or the new slot, told apart by their checksums. That is one fsync per
//!   commit; the journal groups many coordinator requests into each commit.
//! * No quick-repair: it would store the allocator state in every commit and force 2-phase commit,
//!   two fsyncs per commit. Its benefit is a fast open after a crash, which matters for large
//!   files; this file only holds live transactions and a bounded history of finished ones, so the
//!   full repair after a crash walks a small tree.
//! * No explicit 2-phase commit, for the same reason (it only hardens against a deliberately
//!   crafted workload colliding an xxhash checksum, see redb's design notes).
//! * Cache 64 MiB instead of redb's 1 GiB default: the coordinator keeps the whole state in its own
//!   memory, the file is read once at start, and the write path only touches the pages on the paths
//!   to changed keys. A bigger cache would mostly duplicate the loaded state in memory for the
//!   process lifetime.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Mutation, Snapshot, Store, StoreError};
use crate::audit::AuditRecord;
use crate::auth::TokenRecord;
use crate::model::{BranchError, BranchMode, BranchRecord, BranchStatus, FinishedRecord, GlobalRecord};
use crate::timeline::Event;

/// Name of the database file inside the data directory.
pub const FILE_NAME: &str = "ferrata-tc.redb";

/// Version byte in front of every stored record. Version 2 added a branch's mode and
/// connection id, version 3 its instance id, version 4 saga steps (a branch mode and four
/// branch statuses, which an older ferrata-tc cannot read; the layout is version 3's),
/// version 5 messages (a branch mode); every other record reads the same in all.
pub const FORMAT_VERSION: u8 = 5;

/// See module docs; redb's default is 1 GiB.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

pub(crate) const GLOBALS: TableDefinition<u64, &[u8]> = TableDefinition::new("globals");
pub(crate) const BRANCHES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("branches");
pub(crate) const FINISHED: TableDefinition<u64, &[u8]> = TableDefinition::new("finished");
pub(crate) const EVENTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("events");
pub(crate) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
pub(crate) const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const ID_CEILING: &str = "id_ceiling";
/// The last write-ahead log record applied to the file (`wal.rs`).
const LOG_APPLIED: &str = "log_applied";

pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("path", &self.path).finish()
    }
}

impl RedbStore {
    /// Opens (creating if needed) `dir/ferrata-tc.redb`, creating `dir` if missing.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError(format!(
                "cannot create the data directory {}: {}",
                dir.display(),
                io_text(&e)
            ))
        })?;
        let path = dir.join(FILE_NAME);
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| open_error(&path, e))?;
        let store = RedbStore { db, path };
        // Create the tables up front so reads never meet a missing table.
        store.write(|txn| {
            txn.open_table(GLOBALS)
                .map_err(|e| store.error("open the globals table", e))?;
            txn.open_table(BRANCHES)
                .map_err(|e| store.error("open the branches table", e))?;
            txn.open_table(FINISHED)
                .map_err(|e| store.error("open the finished table", e))?;
            txn.open_table(EVENTS)
                .map_err(|e| store.error("open the events table", e))?;
            txn.open_table(AUDIT)
                .map_err(|e| store.error("open the audit table", e))?;
            txn.open_table(TOKENS)
                .map_err(|e| store.error("open the tokens table", e))?;
            txn.open_table(META)
                .map_err(|e| store.error("open the meta table", e))?;
            Ok(())
        })?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, what: &str, e: impl Display) -> StoreError {
        StoreError(format!("store {}: cannot {what}: {e}", self.path.display()))
    }

    /// Every record of a table keyed by txn id, each checked to name the id it is stored under.
    fn load_by_txn<T: DeserializeOwned>(
        &self,
        txn: &ReadTransaction,
        table: TableDefinition<u64, &[u8]>,
        what: &str,
        txn_id_of: fn(&T) -> u64,
    ) -> Result<Vec<T>, StoreError> {
        let read = |e: redb::StorageError| self.error("read", e);
        let table = txn
            .open_table(table)
            .map_err(|e| self.error(&format!("open the {what} table"), e))?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            let txn_id = key.value();
            let record: T = decode(&self.path, || format!("the {what} {txn_id}"), value.value())?;
            if txn_id_of(&record) != txn_id {
                return Err(self.error(
                    "load",
                    format!("the {what} stored under {txn_id} names txn_id {}", txn_id_of(&record)),
                ));
            }
            records.push(record);
        }
        Ok(records)
    }

    /// Runs `f` in one write transaction and commits it durably.
    fn write(&self, f: impl FnOnce(&WriteTransaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| self.error("begin a write transaction", e))?;
        // The default, set explicitly: the journal acknowledges a write once this returns.
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.error("set durability", e))?;
        f(&txn)?;
        txn.commit().map_err(|e| self.error("commit", e))
    }
}

fn io_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!("permission denied ({e})"),
        _ => e.to_string(),
    }
}

fn open_error(path: &Path, e: DatabaseError) -> StoreError {
    let p = path.display();
    match e {
        DatabaseError::DatabaseAlreadyOpen => StoreError(format!(
            "another ferrata-tc is using {p} (the file is locked by a running process); stop it or use another data_dir"
        )),
        DatabaseError::Storage(redb::StorageError::Io(io)) => StoreError(format!("cannot open {p}: {}", io_text(&io))),
        DatabaseError::UpgradeRequired(v) => StoreError(format!(
            "cannot open {p}: the file uses redb file format {v}, which this ferrata-tc cannot read"
        )),
        e => StoreError(format!("cannot open {p}: {e}")),
    }
}

pub(crate) fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(record, vec![FORMAT_VERSION]).map_err(|e| StoreError(format!("cannot encode a record: {e}")))
}

fn decode<T: DeserializeOwned>(path: &Path, what: impl Fn() -> String, bytes: &[u8]) -> Result<T, StoreError> {
    let p = path.display();
    let Some((&version, body)) = bytes.split_first() else {
        return Err(StoreError(format!("store {p}: {} is empty", what())));
    };
    if version == 0 || version > FORMAT_VERSION {
        return Err(StoreError(format!(
            "store {p}: {} has format version {version}; this ferrata-tc reads versions 1 to {FORMAT_VERSION}, \
             so the data was written by a newer ferrata-tc (run that version, or a newer one)",
            what()
        )));
    }
    match postcard::take_from_bytes::<T>(body) {
        Ok((record, [])) => Ok(record),
        Ok((_, rest)) => Err(StoreError(format!(
            "store {p}: {} is corrupt ({} unexpected trailing bytes)",
            what(),
            rest.len()
        ))),
        Err(e) => Err(StoreError(format!("store {p}: {} is corrupt: {e}", what()))),
    }
}

/// A branch as version 1 stored it (always AT): the fields every version starts with, in
/// order. Version 2 appended the mode and the connection id, version 3 the instance id; as
/// postcard writes a struct as its fields in order, a tuple of these parts reads them.
#[derive(Deserialize)]
struct BranchRecordV1 {
    txn_id: u64,
    branch_id: u64,
    resource_id: String,
    lock_keys: Vec<crate::lock_key::LockKey>,
    application_data: Vec<u8>,
    status: BranchStatus,
    registered_ms: u64,
    updated_ms: u64,
    error: Option<BranchError>,
}

fn decode_branch(path: &Path, what: impl Fn() -> String, bytes: &[u8]) -> Result<BranchRecord, StoreError> {
    let (v1, mode, connection_id) = match bytes.first() {
        Some(1) => (decode::<BranchRecordV1>(path, what, bytes)?, BranchMode::At, 0),
        Some(2) => decode::<(BranchRecordV1, BranchMode, u64)>(path, what, bytes)?,
        _ => return decode(path, what, bytes),
    };
    Ok(BranchRecord {
        txn_id: v1.txn_id,
        branch_id: v1.branch_id,
        resource_id: v1.resource_id,
        lock_keys: v1.lock_keys,
        application_data: v1.application_data,
        status: v1.status,
        registered_ms: v1.registered_ms,
        updated_ms: v1.updated_ms,
        error: v1.error,
        mode,
        connection_id,
        instance_id: String::new(),
    })
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.error("begin a read transaction", e))?;
        let read = |e: redb::StorageError| self.error("read", e);

        let globals = self.load_by_txn(&txn, GLOBALS, "global transaction", |g: &GlobalRecord| g.txn_id)?;

        let table = txn
            .open_table(BRANCHES)
            .map_err(|e| self.error("open the branches table", e))?;
        let mut branches = Vec::new();
        for entry in table.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            let (txn_id, branch_id) = key.value();
            let record = decode_branch(
                &self.path,
                || format!("the branch {branch_id} of transaction {txn_id}"),
                value.value(),
            )?;
            if (record.txn_id, record.branch_id) != (txn_id, branch_id) {
                return Err(self.error(
                    "load",
                    format!(
                        "the branch stored under ({txn_id}, {branch_id}) names ({}, {})",
                        record.txn_id, record.branch_id
                    ),
                ));
            }
            branches.push(record);
        }

        let finished = self.load_by_txn(&txn, FINISHED, "finished transaction", |f: &FinishedRecord| {
            f.record.txn_id
        })?;

        let table = txn
            .open_table(EVENTS)
            .map_err(|e| self.error("open the events table", e))?;
        let mut events: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
        for entry in table.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            let (txn_id, index) = key.value();
            let event: Event = decode(
                &self.path,
                || format!("the event {index} of transaction {txn_id}"),
                value.value(),
            )?;
            let timeline = events.entry(txn_id).or_default();
            if timeline.len() != index as usize {
                return Err(self.error(
                    "load",
                    format!("the timeline of transaction {txn_id} has no event {}", timeline.len()),
                ));
            }
            timeline.push(event);
        }

        let audit = self.load_by_txn(&txn, AUDIT, "audit record", |r: &AuditRecord| r.id)?;

        let table = txn
            .open_table(TOKENS)
            .map_err(|e| self.error("open the tokens table", e))?;
        let mut tokens = Vec::new();
        for entry in table.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            let name = key.value();
            let token: TokenRecord = decode(&self.path, || format!("the token {name:?}"), value.value())?;
            if token.name != name {
                return Err(self.error(
                    "load",
                    format!("the token stored under {name:?} names {:?}", token.name),
                ));
            }
            tokens.push(token);
        }

        let table = txn.open_table(META).map_err(|e| self.error("open the meta table", e))?;
        let id_ceiling = table.get(ID_CEILING).map_err(read)?.map(|g| g.value()).unwrap_or(0);

        Ok(Snapshot {
            id_ceiling,
            globals,
            branches,
            finished,
            events,
            audit,
            tokens,
        })
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.apply(batch, None)
    }
}

impl RedbStore {
    /// Applies `batch` in one durable commit, with the write-ahead log's position it brings
    /// the file up to (`wal.rs`), if it comes from there.
    pub(crate) fn apply(&self, batch: &[Mutation], log_position: Option<u64>) -> Result<(), StoreError> {
        self.write(|txn| {
            let write = |e: redb::StorageError| self.error("write", e);
            let mut globals = txn
                .open_table(GLOBALS)
                .map_err(|e| self.error("open the globals table", e))?;
            let mut branches = txn
                .open_table(BRANCHES)
                .map_err(|e| self.error("open the branches table", e))?;
            let mut finished = txn
                .open_table(FINISHED)
                .map_err(|e| self.error("open the finished table", e))?;
            let mut events = txn
                .open_table(EVENTS)
                .map_err(|e| self.error("open the events table", e))?;
            let mut audit = txn
                .open_table(AUDIT)
                .map_err(|e| self.error("open the audit table", e))?;
            let mut tokens = txn
                .open_table(TOKENS)
                .map_err(|e| self.error("open the tokens table", e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.error("open the meta table", e))?;
            for m in batch {
                match m {
                    Mutation::PutGlobal(g) => {
                        globals.insert(g.txn_id, encode(g)?.as_slice()).map_err(write)?;
                    }
                    Mutation::Finish(f) => {
                        let txn_id = f.record.txn_id;
                        globals.remove(txn_id).map_err(write)?;
                        branches
                            .retain_in((txn_id, 0)..=(txn_id, u64::MAX), |_, _| false)
                            .map_err(write)?;
                        finished.insert(txn_id, encode(f)?.as_slice()).map_err(write)?;
                    }
                    Mutation::PutEvents {
                        txn_id,
                        first,
                        events: new,
                    } => {
                        for (index, event) in (*first..).zip(new) {
                            events
                                .insert((*txn_id, index), encode(event)?.as_slice())
                                .map_err(write)?;
                        }
                    }
                    Mutation::Forget { txn_id } => {
                        finished.remove(*txn_id).map_err(write)?;
                        events
                            .retain_in((*txn_id, 0)..=(*txn_id, u32::MAX), |_, _| false)
                            .map_err(write)?;
                    }
                    Mutation::PutBranch(b) => {
                        branches
                            .insert((b.txn_id, b.branch_id), encode(b)?.as_slice())
                            .map_err(write)?;
                    }
                    Mutation::DeleteBranch { txn_id, branch_id } => {
                        branches.remove((*txn_id, *branch_id)).map_err(write)?;
                    }
                    Mutation::AppendAudit(r) => {
                        audit.insert(r.id, encode(r)?.as_slice()).map_err(write)?;
                    }
                    Mutation::PutToken(t) => {
                        tokens.insert(t.name.as_str(), encode(t)?.as_slice()).map_err(write)?;
                    }
                    Mutation::DeleteToken { name } => {
                        tokens.remove(name.as_str()).map_err(write)?;
                    }
                    Mutation::SetIdCeiling(new) => {
                        let old = meta.get(ID_CEILING).map_err(write)?.map(|g| g.value()).unwrap_or(0);
                        if *new > old {
                            meta.insert(ID_CEILING, *new).map_err(write)?;
                        }
                    }
                }
            }
            if let Some(position) = log_position {
                meta.insert(LOG_APPLIED, position).map_err(write)?;
            }
            Ok(())
        })
    }

    /// The write-ahead log's position the file holds everything up to (0: none).
    pub(crate) fn log_applied(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.error("begin a read", e))?;
        let meta = txn.open_table(META).map_err(|e| self.error("open the meta table", e))?;
        Ok(meta
            .get(LOG_APPLIED)
            .map_err(|e| self.error("read", e))?
            .map_or(0, |v| v.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BranchError, BranchStatus, GlobalStatus};
    use crate::store::fixtures::{branch, finished, global};

    fn commit(store: &RedbStore, batch: Vec<Mutation>) {
        store.commit(&batch).unwrap();
    }

    fn audit_record(id: u64) -> AuditRecord {
        let mut trail = crate::audit::Audit::default();
        let mut record = None;
        for _ in 0..id {
            let r = trail.seal(
                crate::audit::AuditEntry {
                    actor: "alice".into(),
                    action: "retry".into(),
                    ..Default::default()
                },
                7,
            );
            trail.append(r.clone());
            record = Some(r);
        }
        record.expect("id >= 1")
    }

    fn token(name: &str) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            role: crate::auth::Role::Operator,
            digest: crate::auth::digest(name),
            created_ms: 5,
            created_by: "root".into(),
            expires_ms: Some(10),
        }
    }

    fn event(version: u64) -> Event {
        Event {
            version,
            at_ms: 1_700_000_000_000 + version,
            kind: crate::timeline::EventKind::OperatorAction {
                action: "retry".into(),
                actor: "alice".into(),
                reason: format!("attempt {version}"),
                audit_id: version,
            },
        }
    }

    #[test]
    fn round_trip_of_every_mutation_through_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join("data");
        let mut failed_branch = branch(2, 21);
        failed_branch.status = BranchStatus::RollbackFailedUnretryable;
        failed_branch.error = Some(BranchError {
            reason: "rows changed outside the global transaction".into(),
            detail_json: r#"{"rows":[1,2]}"#.into(),
        });
        {
            let store = RedbStore::open(&data).unwrap();
            assert_eq!(store.load().unwrap(), Snapshot::default());
            commit(
                &store,
                vec![
                    Mutation::SetIdCeiling(1000),
                    Mutation::PutGlobal(global(1, GlobalStatus::Begin)),
                    Mutation::PutGlobal(global(2, GlobalStatus::Begin)),
                    Mutation::PutGlobal(global(3, GlobalStatus::Begin)),
                    Mutation::PutBranch(branch(1, 11)),
                    Mutation::PutBranch(branch(1, 12)),
                    Mutation::PutBranch(branch(2, 22)),
                    Mutation::PutBranch(branch(2, 21)),
                    Mutation::PutEvents {
                        txn_id: 2,
                        first: 0,
                        events: vec![event(1), event(2)],
                    },
                ],
            );
            // An event replaced (a folded retry) and one added.
            commit(
                &store,
                vec![Mutation::PutEvents {
                    txn_id: 2,
                    first: 1,
                    events: vec![event(3), event(4)],
                }],
            );
            commit(
                &store,
                vec![
                    // overwrite
                    Mutation::PutGlobal(global(2, GlobalStatus::RollbackFailed)),
                    Mutation::PutBranch(failed_branch.clone()),
                    Mutation::DeleteBranch {
                        txn_id: 1,
                        branch_id: 12,
                    },
                    // deleting what is not there is fine
                    Mutation::DeleteBranch {
                        txn_id: 9,
                        branch_id: 9,
                    },
                    Mutation::Finish(finished(3, GlobalStatus::Committed)),
                    Mutation::PutEvents {
                        txn_id: 3,
                        first: 0,
                        events: vec![event(1), event(2)],
                    },
                    Mutation::Finish(finished(4, GlobalStatus::Rollbacked)),
                    Mutation::PutEvents {
                        txn_id: 4,
                        first: 0,
                        events: vec![event(1)],
                    },
                    Mutation::Forget { txn_id: 4 },
                    Mutation::AppendAudit(audit_record(1)),
                    Mutation::AppendAudit(audit_record(2)),
                    Mutation::PutToken(token("ops")),
                    Mutation::PutToken(token("gone")),
                    Mutation::DeleteToken { name: "gone".into() },
                    // forgetting what is not there is fine
                    Mutation::Forget { txn_id: 8 },
                    Mutation::SetIdCeiling(2000),
                ],
            );
            // empty batch: no-op
            commit(&store, vec![]);
        }
        let store = RedbStore::open(&data).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(
            snap,
            Snapshot {
                id_ceiling: 2000,
                globals: vec![global(1, GlobalStatus::Begin), global(2, GlobalStatus::RollbackFailed)],
                branches: vec![branch(1, 11), failed_branch, branch(2, 22)],
                finished: vec![finished(3, GlobalStatus::Committed)],
                events: BTreeMap::from([(2, vec![event(1), event(3), event(4)]), (3, vec![event(1), event(2)])]),
                audit: vec![audit_record(1), audit_record(2)],
                tokens: vec![token("ops")],
            }
        );
        assert!(data.join(FILE_NAME).is_file());
    }

    #[test]
    fn mutations_apply_in_order_within_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        commit(
            &store,
            vec![
                Mutation::PutGlobal(global(5, GlobalStatus::Begin)),
                Mutation::PutBranch(branch(5, 1)),
                Mutation::Finish(finished(5, GlobalStatus::Committed)),
                Mutation::PutGlobal(global(5, GlobalStatus::Committing)),
                Mutation::PutBranch(branch(5, 2)),
            ],
        );
        let snap = store.load().unwrap();
        assert_eq!(snap.globals, vec![global(5, GlobalStatus::Committing)]);
        assert_eq!(snap.branches, vec![branch(5, 2)]);
        assert_eq!(snap.finished, vec![finished(5, GlobalStatus::Committed)]);
    }

    #[test]
    fn finish_removes_only_its_own_branches() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let mut batch = Vec::new();
        for txn in [4, 5, 6] {
            batch.push(Mutation::PutGlobal(global(txn, GlobalStatus::Begin)));
            // includes the extreme branch ids, to check the range bounds
            for b in [0, 1, 7, u64::MAX] {
                batch.push(Mutation::PutBranch(branch(txn, b)));
            }
        }
        commit(&store, batch);
        commit(&store, vec![Mutation::Finish(finished(5, GlobalStatus::Committed))]);
        let snap = store.load().unwrap();
        assert_eq!(
            snap.globals,
            vec![global(4, GlobalStatus::Begin), global(6, GlobalStatus::Begin)]
        );
        let keys: Vec<_> = snap.branches.iter().map(|b| (b.txn_id, b.branch_id)).collect();
        assert_eq!(
            keys,
            vec![
                (4, 0),
                (4, 1),
                (4, 7),
                (4, u64::MAX),
                (6, 0),
                (6, 1),
                (6, 7),
                (6, u64::MAX)
            ]
        );
    }

    #[test]
    fn id_ceiling_never_decreases() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            commit(&store, vec![Mutation::SetIdCeiling(500)]);
            commit(&store, vec![Mutation::SetIdCeiling(100)]);
            assert_eq!(store.load().unwrap().id_ceiling, 500);
            commit(&store, vec![Mutation::SetIdCeiling(700), Mutation::SetIdCeiling(600)]);
            assert_eq!(store.load().unwrap().id_ceiling, 700);
        }
        let store = RedbStore::open(dir.path()).unwrap();
        commit(&store, vec![Mutation::SetIdCeiling(0)]);
        assert_eq!(store.load().unwrap().id_ceiling, 700);
    }

    #[test]
    fn second_open_of_the_same_file_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let first = RedbStore::open(dir.path()).unwrap();
        let err = RedbStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another ferrata-tc is using"), "{err}");
        assert!(err.contains(&dir.path().join(FILE_NAME).display().to_string()), "{err}");
        drop(first);
        RedbStore::open(dir.path()).unwrap();
    }

    #[test]
    fn unusable_data_dir_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = RedbStore::open(&file).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
    }

    /// A store holding global transaction 1 and, written through a raw redb transaction,
    /// its branch `branch_id` as `bytes`; the store file's path.
    fn with_raw_branch(dir: &Path, branch_id: u64, bytes: &[u8]) -> PathBuf {
        let path = {
            let store = RedbStore::open(dir).unwrap();
            commit(&store, vec![Mutation::PutGlobal(global(1, GlobalStatus::Begin))]);
            store.path().to_owned()
        };
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(BRANCHES).unwrap().insert((1, branch_id), bytes).unwrap();
        txn.commit().unwrap();
        path
    }

    #[test]
    fn unknown_format_version_is_rejected_on_load() {
        let dir = tempfile::tempdir().unwrap();
        // A record as a future ferrata-tc might write it.
        let mut bytes = encode(&branch(1, 1)).unwrap();
        bytes[0] = FORMAT_VERSION + 1;
        let path = with_raw_branch(dir.path(), 1, &bytes);
        let store = RedbStore::open(dir.path()).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("newer ferrata-tc"), "{err}");
        assert!(err.contains(&format!("format version {}", FORMAT_VERSION + 1)), "{err}");
        assert!(err.contains("branch 1 of transaction 1"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    /// Stores written by earlier versions: version-1 branches load as AT branches, version-2
    /// branches with their mode and connection, and neither names a holding instance.
    #[test]
    fn older_branch_versions_load() {
        #[derive(Serialize)]
        struct V1<'a> {
            txn_id: u64,
            branch_id: u64,
            resource_id: &'a str,
            lock_keys: &'a [crate::lock_key::LockKey],
            application_data: &'a [u8],
            status: BranchStatus,
            registered_ms: u64,
            updated_ms: u64,
            error: Option<BranchError>,
        }
        let expected = BranchRecord {
            instance_id: String::new(),
            ..branch(1, 4)
        };
        let v1 = V1 {
            txn_id: 1,
            branch_id: 4,
            resource_id: &expected.resource_id,
            lock_keys: &expected.lock_keys,
            application_data: &expected.application_data,
            status: expected.status,
            registered_ms: expected.registered_ms,
            updated_ms: expected.updated_ms,
            error: None,
        };
        let xa = BranchRecord {
            mode: BranchMode::Xa,
            connection_id: 77,
            ..expected.clone()
        };
        for (bytes, want) in [
            (postcard::to_extend(&v1, vec![1]).unwrap(), expected.clone()),
            (postcard::to_extend(&(&v1, BranchMode::Xa, 77u64), vec![2]).unwrap(), xa),
        ] {
            let dir = tempfile::tempdir().unwrap();
            with_raw_branch(dir.path(), 4, &bytes);
            let snapshot = RedbStore::open(dir.path()).unwrap().load().unwrap();
            assert_eq!(snapshot.branches, vec![want]);
        }
    }

    #[test]
    fn corrupt_record_is_rejected_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = RedbStore::open(dir.path()).unwrap().path().to_owned();
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(GLOBALS)
                .unwrap()
                .insert(3, [FORMAT_VERSION, 3].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = RedbStore::open(dir.path()).unwrap().load().unwrap_err().to_string();
        assert!(err.contains("global transaction 3 is corrupt"), "{err}");
    }
}
