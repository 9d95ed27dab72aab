//! `AfterDurable`: lock changes that must wait until everything a coordinator submitted to
//! its journal so far is durable, run in the order they were asked for. Where another node
//! may take the rows next, its registration goes to another journal: the rows must not pass
//! on before the change that let go of them is durable (`authority.rs`).

use std::pin::Pin;

use tokio::sync::mpsc;

use crate::store::StoreError;
use crate::store::journal::Journal;

/// The journal's answer to an empty submission: everything submitted before it is durable.
type Flushed = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

type Work = Box<dyn FnOnce() + Send>;

pub struct AfterDurable {
    journal: Journal,
    queue: mpsc::UnboundedSender<(Flushed, Work)>,
}

impl AfterDurable {
    /// Starts the task that runs the work; it ends when this is dropped.
    pub fn start(journal: Journal) -> AfterDurable {
        let (queue, mut work) = mpsc::unbounded_channel::<(Flushed, Work)>();
        // In the order asked; the journal answers in submission order, so nothing waits long
        // behind anything else. Work whose wait failed is dropped: the store failed, the
        // coordinator acknowledges nothing more, and whoever loads the store next starts
        // from what is durable.
        tokio::spawn(async move {
            while let Some((flushed, then)) = work.recv().await {
                if flushed.await.is_ok() {
                    then();
                }
            }
        });
        AfterDurable { journal, queue }
    }

    /// Runs `then` once everything submitted to the journal before this call is durable.
    pub fn then(&self, then: impl FnOnce() + Send + 'static) {
        let flushed: Flushed = Box::pin(self.journal.submit(Vec::new()));
        let _ = self.queue.send((flushed, Box::new(then)));
    }
}
