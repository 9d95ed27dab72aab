//! The runtime the coordinator layer lives on: the main one, where the proxy was built.
//! Sessions run on threads of their own (`threads.rs`); what they create for everyone (the
//! coordinator's gRPC channel, pooled service connections and the pools' background tasks)
//! is created here instead, so that it does not belong to a session thread's poller.

use std::future::Future;

use tokio::runtime::Handle;

#[derive(Clone, Debug)]
pub struct Home(Option<Handle>);

impl Home {
    /// The runtime of the caller, if it runs on one.
    pub fn current() -> Home {
        Home(Handle::try_current().ok())
    }

    /// Runs `work` on the home runtime and waits for it; `None` if that runtime is shutting
    /// down (or `work` panicked).
    pub async fn run<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> Option<T> {
        match &self.0 {
            Some(home) => home.spawn(work).await.ok(),
            None => Some(work.await),
        }
    }
}
