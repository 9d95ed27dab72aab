//! The embedded store on redb. (Interface stub; implementation in progress.)

use std::path::Path;

use super::{Mutation, Snapshot, Store, StoreError};

pub struct RedbStore {}

impl RedbStore {
    pub fn open(_dir: &Path) -> Result<RedbStore, StoreError> {
        todo!()
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        todo!()
    }
    fn commit(&self, _batch: &[Mutation]) -> Result<(), StoreError> {
        todo!()
    }
}
