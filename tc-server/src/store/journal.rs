//! Group commit in front of a `Store`. (Interface stub; implementation in progress.)

use std::sync::Arc;

use super::{Mutation, Store, StoreError};

#[derive(Clone)]
pub struct Journal {}

impl Journal {
    pub fn start(_store: Arc<dyn Store>) -> Journal {
        todo!()
    }
    pub fn submit(
        &self,
        _batch: Vec<Mutation>,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        async { todo!() }
    }
    pub fn failed(&self) -> Option<String> {
        todo!()
    }
    pub fn shutdown(&self) {
        todo!()
    }
}
