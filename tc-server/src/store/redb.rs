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
//! Every value is a record as `record.rs` encodes it (a format-version byte, then postcard).
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

use std::fmt::Display;
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};

use super::record::{Loader, encode};
use super::{Mutation, Snapshot, Store, StoreError};

/// Name of the database file inside the data directory.
pub const FILE_NAME: &str = "ferrata-tc.redb";

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

    /// Opens `table` for reading, naming it `what` in errors.
    fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        txn: &ReadTransaction,
        table: TableDefinition<K, V>,
        what: &str,
    ) -> Result<redb::ReadOnlyTable<K, V>, StoreError> {
        txn.open_table(table)
            .map_err(|e| self.error(&format!("open the {what} table"), e))
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

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.error("begin a read transaction", e))?;
        let read = |e: redb::StorageError| self.error("read", e);
        let place = self.path.display();
        let mut loader = Loader::new(&place);
        for entry in self.table(&txn, GLOBALS, "globals")?.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            loader.global(key.value(), value.value())?;
        }
        for entry in self.table(&txn, BRANCHES, "branches")?.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            let (txn_id, branch_id) = key.value();
            loader.branch(txn_id, branch_id, value.value())?;
        }
        for entry in self.table(&txn, FINISHED, "finished")?.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            loader.finished(key.value(), value.value())?;
        }
        for entry in self.table(&txn, EVENTS, "events")?.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            let (txn_id, index) = key.value();
            loader.event(txn_id, index, value.value())?;
        }
        for entry in self.table(&txn, AUDIT, "audit")?.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            loader.audit(key.value(), value.value())?;
        }
        for entry in self.table(&txn, TOKENS, "tokens")?.iter().map_err(read)? {
            let (key, value) = entry.map_err(read)?;
            loader.token(key.value(), value.value())?;
        }
        let meta = self.table(&txn, META, "meta")?;
        loader.id_ceiling(meta.get(ID_CEILING).map_err(read)?.map(|g| g.value()).unwrap_or(0));
        Ok(loader.finish())
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
                    Mutation::LockFence { .. } => {}
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
    use serde::Serialize;

    use super::*;
    use crate::model::{BranchError, BranchMode, BranchRecord, BranchStatus, GlobalStatus};
    use crate::store::fixtures::{self, branch, commit, global};
    use crate::store::record::FORMAT_VERSION;

    #[test]
    fn round_trip_of_every_mutation_through_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested").join("data");
        fixtures::every_mutation_round_trips(&mut || Box::new(RedbStore::open(&data).unwrap()));
        assert!(data.join(FILE_NAME).is_file());
    }

    #[test]
    fn mutations_apply_in_order_within_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        fixtures::mutations_apply_in_order_within_a_batch(&RedbStore::open(dir.path()).unwrap());
    }

    #[test]
    fn finish_removes_only_its_own_branches() {
        let dir = tempfile::tempdir().unwrap();
        fixtures::finish_removes_only_its_own_branches(&RedbStore::open(dir.path()).unwrap());
    }

    #[test]
    fn id_ceiling_never_decreases() {
        let dir = tempfile::tempdir().unwrap();
        fixtures::id_ceiling_never_decreases(&mut || Box::new(RedbStore::open(dir.path()).unwrap()));
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
