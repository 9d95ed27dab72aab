//! How stored records are encoded, shared by every store: one format-version byte
//! ([`FORMAT_VERSION`]) followed by the postcard encoding of the record, and [`Loader`], which
//! decodes what a store read back, checks it against the key it was stored under and builds
//! the [`Snapshot`].
//!
//! A later ferrata-tc that changes a record bumps the byte; this one refuses a record with a
//! byte it does not know instead of misreading it, and reads the older versions it knows (a
//! version-1 branch is an AT branch; a branch before version 3 names no instance that holds it).

use std::fmt::Display;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Snapshot, StoreError};
use crate::audit::AuditRecord;
use crate::auth::TokenRecord;
use crate::model::{BranchError, BranchMode, BranchRecord, BranchStatus, FinishedRecord, GlobalRecord};
use crate::timeline::Event;

/// Version byte in front of every stored record. Version 2 added a branch's mode and
/// connection id, version 3 its instance id, version 4 saga steps (a branch mode and four
/// branch statuses, which an older ferrata-tc cannot read; the layout is version 3's),
/// version 5 messages (a branch mode); every other record reads the same in all.
pub const FORMAT_VERSION: u8 = 5;

pub(crate) fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(record, vec![FORMAT_VERSION]).map_err(|e| StoreError(format!("cannot encode a record: {e}")))
}

/// Decodes one record; `place` names the store and `what` the record in errors.
fn decode<T: DeserializeOwned>(place: &dyn Display, what: &dyn Fn() -> String, bytes: &[u8]) -> Result<T, StoreError> {
    let Some((&version, body)) = bytes.split_first() else {
        return Err(StoreError(format!("store {place}: {} is empty", what())));
    };
    if version == 0 || version > FORMAT_VERSION {
        return Err(StoreError(format!(
            "store {place}: {} has format version {version}; this ferrata-tc reads versions 1 to {FORMAT_VERSION}, \
             so the data was written by a newer ferrata-tc (run that version, or a newer one)",
            what()
        )));
    }
    match postcard::take_from_bytes::<T>(body) {
        Ok((record, [])) => Ok(record),
        Ok((_, rest)) => Err(StoreError(format!(
            "store {place}: {} is corrupt ({} unexpected trailing bytes)",
            what(),
            rest.len()
        ))),
        Err(e) => Err(StoreError(format!("store {place}: {} is corrupt: {e}", what()))),
    }
}

/// A global transaction's record as a store holds it, for programs that read a store's keys
/// themselves (the HA tests check etcd's history with it); `place` names the store in errors.
pub fn read_global(place: &dyn Display, bytes: &[u8]) -> Result<GlobalRecord, StoreError> {
    decode(place, &|| "a global transaction".to_owned(), bytes)
}

/// A branch's record as a store holds it (any version this one reads), like [`read_global`].
pub fn read_branch(place: &dyn Display, bytes: &[u8]) -> Result<BranchRecord, StoreError> {
    decode_branch(place, &|| "a branch".to_owned(), bytes)
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

fn decode_branch(place: &dyn Display, what: &dyn Fn() -> String, bytes: &[u8]) -> Result<BranchRecord, StoreError> {
    let (v1, mode, connection_id) = match bytes.first() {
        Some(1) => (decode::<BranchRecordV1>(place, what, bytes)?, BranchMode::At, 0),
        Some(2) => decode::<(BranchRecordV1, BranchMode, u64)>(place, what, bytes)?,
        _ => return decode(place, what, bytes),
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

/// Builds a [`Snapshot`] from the records a store reads back, each with the key it was stored
/// under. Records of one kind must come in key order (both stores read them so).
pub(crate) struct Loader<'a> {
    place: &'a dyn Display,
    snapshot: Snapshot,
}

impl<'a> Loader<'a> {
    /// `place` names the store in errors (a file's path, etcd's endpoints and prefix).
    pub(crate) fn new(place: &'a dyn Display) -> Loader<'a> {
        Loader {
            place,
            snapshot: Snapshot::default(),
        }
    }

    fn mismatch(&self, what: String) -> StoreError {
        StoreError(format!("store {}: cannot load: {what}", self.place))
    }

    pub(crate) fn global(&mut self, txn_id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let record: GlobalRecord = decode(self.place, &|| format!("the global transaction {txn_id}"), bytes)?;
        if record.txn_id != txn_id {
            return Err(self.mismatch(format!(
                "the global transaction stored under {txn_id} names txn_id {}",
                record.txn_id
            )));
        }
        self.snapshot.globals.push(record);
        Ok(())
    }

    pub(crate) fn branch(&mut self, txn_id: u64, branch_id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let record = decode_branch(
            self.place,
            &|| format!("the branch {branch_id} of transaction {txn_id}"),
            bytes,
        )?;
        if (record.txn_id, record.branch_id) != (txn_id, branch_id) {
            return Err(self.mismatch(format!(
                "the branch stored under ({txn_id}, {branch_id}) names ({}, {})",
                record.txn_id, record.branch_id
            )));
        }
        self.snapshot.branches.push(record);
        Ok(())
    }

    pub(crate) fn finished(&mut self, txn_id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let record: FinishedRecord = decode(self.place, &|| format!("the finished transaction {txn_id}"), bytes)?;
        if record.record.txn_id != txn_id {
            return Err(self.mismatch(format!(
                "the finished transaction stored under {txn_id} names txn_id {}",
                record.record.txn_id
            )));
        }
        self.snapshot.finished.push(record);
        Ok(())
    }

    /// One event of a timeline; a transaction's events must come in index order from 0.
    pub(crate) fn event(&mut self, txn_id: u64, index: u32, bytes: &[u8]) -> Result<(), StoreError> {
        let event: Event = decode(
            self.place,
            &|| format!("the event {index} of transaction {txn_id}"),
            bytes,
        )?;
        let timeline = self.snapshot.events.entry(txn_id).or_default();
        if timeline.len() != index as usize {
            let missing = timeline.len();
            return Err(self.mismatch(format!("the timeline of transaction {txn_id} has no event {missing}")));
        }
        timeline.push(event);
        Ok(())
    }

    pub(crate) fn audit(&mut self, id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let record: AuditRecord = decode(self.place, &|| format!("the audit record {id}"), bytes)?;
        if record.id != id {
            return Err(self.mismatch(format!("the audit record stored under {id} names id {}", record.id)));
        }
        self.snapshot.audit.push(record);
        Ok(())
    }

    pub(crate) fn token(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let token: TokenRecord = decode(self.place, &|| format!("the token {name:?}"), bytes)?;
        if token.name != name {
            return Err(self.mismatch(format!("the token stored under {name:?} names {:?}", token.name)));
        }
        self.snapshot.tokens.push(token);
        Ok(())
    }

    pub(crate) fn id_ceiling(&mut self, ceiling: u64) {
        self.snapshot.id_ceiling = ceiling;
    }

    pub(crate) fn finish(self) -> Snapshot {
        self.snapshot
    }
}
