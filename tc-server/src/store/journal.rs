//! Group commit in front of a `Store`.
//!
//! One dedicated thread ("ferrata-journal") owns the store's write path. Submissions go through
//! one FIFO channel; the thread takes the first one, drains whatever else is queued (up to
//! [`MAX_BATCH_MUTATIONS`]), commits the concatenation with one `Store::commit` (one fsync for
//! the redb store) and then completes every submission of that batch with the result.
//!
//! A lazy submission ([`Journal::submit_lazy`]) starts no commit of its own: it goes with the
//! next one somebody waits for, or after [`LAZY_FLUSH`], so writes whose loss in a crash only
//! repeats an idempotent step cost no fsync of their own.
//!
//! Guarantees the coordinator relies on:
//! * `submit` enqueues before it returns, so a submission made before another (from any
//!   thread, as ordered by happens-before, for example under a mutex) is earlier in the channel,
//!   so it is in the same or an earlier commit, and never durable later.
//! * The returned future only waits: dropping it does not cancel the write.
//! * A failed commit fails the journal for good: after an fsync error the file's state is
//!   unknown, so nothing further is written and the operator must restart the coordinator.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Mutation, Store, StoreError};

/// Upper bound on the mutations of one commit (a single larger submission still goes whole).
pub const MAX_BATCH_MUTATIONS: usize = 4096;

/// How long a lazy submission waits at most for a commit to go with.
pub const LAZY_FLUSH: Duration = Duration::from_millis(50);

const THREAD_NAME: &str = "ferrata-journal";

/// A submission's answer: durable (`None`), or refused alone with why (`Some`, see
/// [`Journal::submit_fenced`]).
type Answer = Result<Option<String>, StoreError>;
type Reply = oneshot::Sender<Answer>;

struct Submission {
    batch: Vec<Mutation>,
    reply: Reply,
    /// Waits for a commit to go with (see [`Journal::submit_lazy`]).
    lazy: bool,
}

/// Group-committing front of a store. Cheap to clone; all clones share the one thread.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

struct Shared {
    /// `None` once shutting down. Submitters send under the read lock, so once `shutdown` has
    /// taken this under the write lock, no send is in flight and none can follow.
    sender: RwLock<Option<mpsc::Sender<Submission>>>,
    failure: Arc<Failure>,
    /// Taken (and joined) by the first `shutdown`.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// For [`Journal::store_serving`]; weak, so that the store is dropped (an etcd store hands
    /// back its lease) when the journal thread ends.
    store: Weak<dyn Store>,
}

/// The store failure that stopped the journal: its cause, set once by the journal thread,
/// and a token cancelled then.
#[derive(Default)]
struct Failure {
    cause: OnceLock<String>,
    happened: CancellationToken,
}

fn failed_error(cause: &str) -> StoreError {
    StoreError(format!(
        "the store failed earlier, nothing more is written until ferrata-tc is restarted: {cause}"
    ))
}

impl Journal {
    /// Starts the journal thread in front of `store`.
    pub fn start(store: Arc<dyn Store>) -> Journal {
        Self::start_flushing_lazy_after(store, LAZY_FLUSH)
    }

    /// [`Journal::start`], lazy submissions waiting at most `lazy_flush`.
    fn start_flushing_lazy_after(store: Arc<dyn Store>, lazy_flush: Duration) -> Journal {
        metrics::describe_histogram!(
            "ferrata_tc_store_commit_seconds",
            metrics::Unit::Seconds,
            "Duration of each durable store commit"
        );
        metrics::describe_histogram!(
            "ferrata_tc_store_batch_mutations",
            metrics::Unit::Count,
            "Mutations per store commit (group commit batch size)"
        );
        metrics::describe_counter!("ferrata_tc_store_commits_total", "Store commits");

        let (sender, receiver) = mpsc::channel();
        let failure = Arc::new(Failure::default());
        let thread_failure = failure.clone();
        let weak_store = Arc::downgrade(&store);
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || run(receiver, store, thread_failure, lazy_flush))
            .expect("cannot start the ferrata-journal thread");
        Journal {
            shared: Arc::new(Shared {
                sender: RwLock::new(Some(sender)),
                failure,
                thread: Mutex::new(Some(thread)),
                store: weak_store,
            }),
        }
    }

    /// Queues `batch` (applied atomically, after everything submitted before) and returns a
    /// future that resolves once it is durable. The enqueue happens here, before the future is
    /// first polled; dropping the future does not cancel the write. The future does not borrow
    /// `self` (`use<>`), so it may outlive the `Journal` handle and any lock guard around the call.
    pub fn submit(
        &self,
        batch: Vec<Mutation>,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static + use<> {
        let answer = self.answer(batch);
        async move {
            match answer.await? {
                None => Ok(()),
                // Only a fenced submission is refused alone; said as a failure elsewhere.
                Some(refused) => Err(StoreError(refused)),
            }
        }
    }

    /// [`Journal::submit`] for a batch holding a [`Mutation::LockFence`]: the store may
    /// refuse it alone (`Ok(Err)`, with why: nothing of it was stored, and the rest of its
    /// commit was), while the journal goes on.
    pub fn submit_fenced(
        &self,
        batch: Vec<Mutation>,
    ) -> impl std::future::Future<Output = Result<Result<(), String>, StoreError>> + Send + 'static + use<> {
        let answer = self.answer(batch);
        async move { Ok(answer.await?.map_or(Ok(()), Err)) }
    }

    /// Queues `batch` and waits for its answer.
    fn answer(&self, batch: Vec<Mutation>) -> impl std::future::Future<Output = Answer> + Send + 'static + use<> {
        let queued = self.enqueue(batch, false);
        async move {
            match queued {
                Ok(reply) => reply
                    .await
                    .unwrap_or_else(|_| Err(StoreError(format!("the {THREAD_NAME} thread stopped before answering")))),
                Err(e) => Err(e),
            }
        }
    }

    /// Queues a batch nobody waits for: it still becomes durable in submission order, and a
    /// failure to write it shows in `failed()` like any other.
    pub fn submit_detached(&self, batch: Vec<Mutation>) {
        let _ = self.enqueue(batch, false);
    }

    /// Queues a batch nobody waits for and whose loss in a crash only repeats an idempotent
    /// step (a finished transaction's record, history trims): it starts no commit of its own
    /// but goes with the next one, or after [`LAZY_FLUSH`] (and at shutdown), in submission
    /// order like any other.
    pub fn submit_lazy(&self, batch: Vec<Mutation>) {
        let _ = self.enqueue(batch, true);
    }

    fn enqueue(&self, batch: Vec<Mutation>, lazy: bool) -> Result<oneshot::Receiver<Answer>, StoreError> {
        if let Some(cause) = self.shared.failure.cause.get() {
            return Err(failed_error(cause));
        }
        let sender = self.shared.sender.read();
        let Some(sender) = sender.as_ref() else {
            return Err(StoreError(
                "ferrata-tc is shutting down: the store accepts no more writes".into(),
            ));
        };
        let (reply, answer) = oneshot::channel();
        sender
            .send(Submission { batch, reply, lazy })
            .map_err(|_| StoreError(format!("the {THREAD_NAME} thread has stopped")))?;
        Ok(answer)
    }

    /// Whether this node may still act on the store's contents (`Store::serving`; false once
    /// the journal has stopped).
    pub fn store_serving(&self) -> bool {
        self.shared.store.upgrade().is_some_and(|store| store.serving())
    }

    /// The cause of the store failure that stopped the journal, if any (for /healthz).
    pub fn failed(&self) -> Option<String> {
        self.shared.failure.cause.get().cloned()
    }

    /// Cancelled when the store fails (then `failed` says why).
    pub fn failure_signal(&self) -> CancellationToken {
        self.shared.failure.happened.clone()
    }

    /// Stops accepting submissions, commits everything already queued and waits for the thread
    /// to exit. Idempotent; callable from any clone (a concurrent call waits for the first).
    pub fn shutdown(&self) {
        let mut thread = self.shared.thread.lock();
        drop(self.shared.sender.write().take());
        if let Some(handle) = thread.take()
            && handle.join().is_err()
        {
            tracing::error!("the {THREAD_NAME} thread panicked");
        }
    }

    #[cfg(test)]
    fn accepting(&self) -> bool {
        self.shared.sender.read().is_some()
    }
}

/// The journal thread: runs until every sender is gone (shutdown, or every `Journal` dropped)
/// and the queue is empty.
fn run(receiver: mpsc::Receiver<Submission>, store: Arc<dyn Store>, failure: Arc<Failure>, lazy_flush: Duration) {
    let mut mutations: Vec<Mutation> = Vec::new();
    // Where each submission of the batch ends in `mutations`.
    let mut ends: Vec<usize> = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    while let Ok(first) = receiver.recv() {
        // Only lazy submissions so far: wait for one that is not, up to `lazy_flush`.
        let mut lazy = first.lazy;
        let flush_at = Instant::now() + lazy_flush;
        mutations.extend(first.batch);
        ends.push(mutations.len());
        replies.push(first.reply);
        while mutations.len() < MAX_BATCH_MUTATIONS {
            let next = if lazy {
                receiver
                    .recv_timeout(flush_at.saturating_duration_since(Instant::now()))
                    .ok()
            } else {
                receiver.try_recv().ok()
            };
            let Some(next) = next else { break };
            lazy &= next.lazy;
            mutations.extend(next.batch);
            ends.push(mutations.len());
            replies.push(next.reply);
        }

        let result = if let Some(cause) = failure.cause.get() {
            Err(failed_error(cause))
        } else if mutations.is_empty() {
            Ok(Default::default())
        } else {
            let started = Instant::now();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| store.commit_submissions(&mutations, &ends)))
                .unwrap_or_else(|panic| {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(StoreError(format!("the store commit panicked: {msg}")))
                });
            metrics::histogram!("ferrata_tc_store_commit_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("ferrata_tc_store_batch_mutations").record(mutations.len() as f64);
            metrics::counter!("ferrata_tc_store_commits_total").increment(1);
            if let Err(e) = &result {
                tracing::error!(
                    error = %e,
                    "store commit failed; the coordinator accepts no more writes and must be restarted"
                );
                // Only this thread sets it, and only here, once: later batches take the branch above.
                let _ = failure.cause.set(e.0.clone());
                failure.happened.cancel();
            }
            result
        };

        mutations.clear();
        ends.clear();
        for (i, reply) in replies.drain(..).enumerate() {
            // A dropped future just does not hear the answer.
            let _ = reply.send(match &result {
                Ok(refusals) => Ok(refusals.get(&i).cloned()),
                Err(e) => Err(StoreError(e.0.clone())),
            });
        }
        if mutations.capacity() > 4 * MAX_BATCH_MUTATIONS {
            mutations = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

    use super::*;
    use crate::model::GlobalStatus;
    use crate::store::fixtures::{branch, global};
    use crate::store::redb::RedbStore;
    use crate::store::{Snapshot, Store};

    /// Records what was committed, batch by batch; can hold the first commit until released,
    /// and can fail or panic from a given commit on.
    #[derive(Default)]
    struct TestStore {
        commits: parking_lot::Mutex<Vec<Vec<Mutation>>>,
        attempts: AtomicUsize,
        gate: Option<(SyncSender<()>, Mutex<Receiver<()>>)>,
        fail_from_attempt: Option<(usize, bool)>,
    }

    impl TestStore {
        /// A store whose first commit announces itself on the returned receiver, then waits for
        /// a message on the returned sender.
        fn gated() -> (TestStore, Receiver<()>, SyncSender<()>) {
            let (entered_tx, entered_rx) = sync_channel(1);
            let (release_tx, release_rx) = sync_channel(1);
            let store = TestStore {
                gate: Some((entered_tx, Mutex::new(release_rx))),
                ..TestStore::default()
            };
            (store, entered_rx, release_tx)
        }

        fn batch_sizes(&self) -> Vec<usize> {
            self.commits.lock().iter().map(Vec::len).collect()
        }

        fn all(&self) -> Vec<Mutation> {
            self.commits.lock().concat()
        }
    }

    impl Store for TestStore {
        fn load(&self) -> Result<Snapshot, StoreError> {
            Ok(Snapshot::default())
        }
        fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
            let attempt = self.attempts.fetch_add(1, Ordering::SeqCst);
            if attempt == 0
                && let Some((entered, release)) = &self.gate
            {
                entered.send(()).unwrap();
                release.lock().recv().unwrap();
            }
            if let Some((from, panic)) = self.fail_from_attempt
                && attempt >= from
            {
                if panic {
                    panic!("disk exploded");
                }
                return Err(StoreError("fdatasync: input/output error".into()));
            }
            self.commits.lock().push(batch.to_vec());
            Ok(())
        }
    }

    fn ceiling(i: u64) -> Mutation {
        Mutation::SetIdCeiling(i)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_submitters_all_land_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let journal = Journal::start(store.clone());
        let mut tasks = Vec::new();
        for txn in 1..=400u64 {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                journal
                    .submit(vec![
                        Mutation::PutGlobal(global(txn, GlobalStatus::Begin)),
                        Mutation::PutBranch(branch(txn, 1)),
                        Mutation::SetIdCeiling(txn * 10),
                    ])
                    .await
            }));
        }
        // and some from plain threads, awaiting with a blocking wait
        let threads: Vec<_> = (401..=440u64)
            .map(|txn| {
                let journal = journal.clone();
                std::thread::spawn(move || {
                    let done = journal.submit(vec![Mutation::PutGlobal(global(txn, GlobalStatus::Begin))]);
                    tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap()
                        .block_on(done)
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for t in threads {
            t.join().unwrap().unwrap();
        }
        journal.shutdown();
        assert_eq!(journal.failed(), None);

        let snap = store.load().unwrap();
        assert_eq!(snap.id_ceiling, 4000);
        assert_eq!(
            snap.globals.iter().map(|g| g.txn_id).collect::<Vec<_>>(),
            (1..=440).collect::<Vec<_>>()
        );
        assert_eq!(
            snap.branches
                .iter()
                .map(|b| (b.txn_id, b.branch_id))
                .collect::<Vec<_>>(),
            (1..=400).map(|t| (t, 1)).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn queued_submissions_share_one_commit() {
        let (store, entered, release) = TestStore::gated();
        let store = Arc::new(store);
        let journal = Journal::start(store.clone());
        let first = journal.submit(vec![ceiling(0)]);
        entered.recv().unwrap(); // the thread is inside the first commit
        let queued: Vec<_> = (1..=100).map(|i| journal.submit(vec![ceiling(i)])).collect();
        release.send(()).unwrap();
        first.await.unwrap();
        for q in queued {
            q.await.unwrap();
        }
        assert_eq!(store.batch_sizes(), vec![1, 100]);
        assert_eq!(store.all(), (0..=100).map(ceiling).collect::<Vec<_>>());
        journal.shutdown();
    }

    #[tokio::test]
    async fn a_lazy_batch_goes_with_the_next_awaited_one() {
        let store = Arc::new(TestStore::default());
        let journal = Journal::start_flushing_lazy_after(store.clone(), Duration::from_secs(3600));
        journal.submit_lazy(vec![ceiling(1)]);
        journal.submit(vec![ceiling(2)]).await.unwrap();
        assert_eq!(store.batch_sizes(), vec![2], "one commit for both");
        assert_eq!(store.all(), vec![ceiling(1), ceiling(2)]);
        journal.submit_lazy(vec![ceiling(3)]);
        journal.shutdown();
        assert_eq!(store.batch_sizes(), vec![2, 1], "the shutdown committed what waited");
    }

    #[test]
    fn a_lazy_batch_alone_is_committed_after_the_flush_interval() {
        let (store, entered, release) = TestStore::gated();
        let store = Arc::new(store);
        let journal = Journal::start_flushing_lazy_after(store.clone(), Duration::from_millis(20));
        journal.submit_lazy(vec![ceiling(1)]);
        entered
            .recv_timeout(Duration::from_secs(30))
            .expect("committed with nothing else submitted");
        release.send(()).unwrap();
        journal.shutdown();
        assert_eq!(store.all(), vec![ceiling(1)]);
    }

    #[tokio::test]
    async fn batches_are_bounded() {
        let (store, entered, release) = TestStore::gated();
        let store = Arc::new(store);
        let journal = Journal::start(store.clone());
        let first = journal.submit(vec![ceiling(0)]);
        entered.recv().unwrap();
        let mut queued: Vec<_> = (1..=5000).map(|i| journal.submit(vec![ceiling(i)])).collect();
        // one submission bigger than the bound goes whole
        queued.push(journal.submit((5001..=10000).map(ceiling).collect()));
        release.send(()).unwrap();
        first.await.unwrap();
        for q in queued {
            q.await.unwrap();
        }
        assert_eq!(
            store.batch_sizes(),
            vec![1, MAX_BATCH_MUTATIONS, 5000 - MAX_BATCH_MUTATIONS + 5000]
        );
        assert_eq!(store.all(), (0..=10000).map(ceiling).collect::<Vec<_>>());
        journal.shutdown();
    }

    #[test]
    fn submissions_are_committed_in_submission_order() {
        let store = Arc::new(TestStore::default());
        let journal = Journal::start(store.clone());
        // Each thread submits its own sequence without waiting in between; each thread's order
        // must be kept, whatever the interleaving and batching.
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let journal = journal.clone();
                std::thread::spawn(move || {
                    let pending: Vec<_> = (0..2000u64)
                        .map(|i| journal.submit(vec![ceiling(t * 1_000_000 + i), ceiling(t * 1_000_000 + i)]))
                        .collect();
                    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                    for p in pending {
                        rt.block_on(p).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Ordering across threads: what one thread submits after another thread's submission
        // returned comes later.
        let a = journal.submit(vec![ceiling(7_000_000)]);
        let j = journal.clone();
        let b = std::thread::spawn(move || j.submit(vec![ceiling(7_000_001)]))
            .join()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(b).unwrap();
        rt.block_on(a).unwrap();
        journal.shutdown();

        let all: Vec<u64> = store
            .all()
            .into_iter()
            .map(|m| match m {
                Mutation::SetIdCeiling(v) => v,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(all.len(), 4 * 2000 * 2 + 2);
        for t in 0..4u64 {
            let mine: Vec<u64> = all.iter().copied().filter(|v| v / 1_000_000 == t).collect();
            let expected: Vec<u64> = (0..2000u64).flat_map(|i| [t * 1_000_000 + i; 2]).collect();
            assert_eq!(mine, expected, "thread {t}");
        }
        assert_eq!(all[all.len() - 2..], [7_000_000, 7_000_001]);
    }

    #[tokio::test]
    async fn a_failed_commit_fails_the_batch_and_everything_after() {
        let (mut store, entered, release) = TestStore::gated();
        store.fail_from_attempt = Some((1, false));
        let store = Arc::new(store);
        let journal = Journal::start(store.clone());

        // commit 0 succeeds (held at the gate while more queue up behind it)
        let ok = journal.submit(vec![ceiling(1)]);
        entered.recv().unwrap();
        let failing = journal.submit(vec![ceiling(2)]);
        let behind_it = journal.submit(vec![ceiling(3)]);
        release.send(()).unwrap();
        ok.await.unwrap();
        assert!(failing.await.unwrap_err().0.contains("fdatasync: input/output error"));
        assert!(behind_it.await.unwrap_err().0.contains("fdatasync: input/output error"));
        assert_eq!(journal.failed().as_deref(), Some("fdatasync: input/output error"));

        // later submissions fail at once with the cause, and are never attempted
        let attempts = store.attempts.load(Ordering::SeqCst);
        let err = journal.submit(vec![ceiling(4)]).await.unwrap_err().0;
        assert!(err.contains("fdatasync: input/output error"), "{err}");
        assert!(err.contains("restarted"), "{err}");
        assert_eq!(journal.clone().failed(), journal.failed());
        journal.shutdown();
        assert_eq!(store.attempts.load(Ordering::SeqCst), attempts);
        assert_eq!(store.all(), vec![ceiling(1)]);
    }

    #[tokio::test]
    async fn a_failure_on_the_first_commit_fails_its_whole_batch() {
        let (mut store, entered, release) = TestStore::gated();
        store.fail_from_attempt = Some((0, false));
        let store = Arc::new(store);
        let journal = Journal::start(store.clone());
        let first = journal.submit(vec![ceiling(1)]);
        entered.recv().unwrap();
        let later = journal.submit(vec![ceiling(2)]);
        release.send(()).unwrap();
        assert!(first.await.unwrap_err().0.contains("input/output error"));
        assert!(later.await.unwrap_err().0.contains("input/output error"));
        assert!(journal.failed().is_some());
        journal.shutdown();
        assert_eq!(store.attempts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panicking_store_fails_the_journal() {
        let store = Arc::new(TestStore {
            fail_from_attempt: Some((0, true)),
            ..TestStore::default()
        });
        let journal = Journal::start(store.clone());
        let err = journal.submit(vec![ceiling(1)]).await.unwrap_err().0;
        assert!(err.contains("disk exploded"), "{err}");
        assert!(journal.failed().unwrap().contains("disk exploded"));
        assert!(
            journal
                .submit(vec![ceiling(2)])
                .await
                .unwrap_err()
                .0
                .contains("disk exploded")
        );
        journal.shutdown();
    }

    #[tokio::test]
    async fn shutdown_commits_queued_work_then_rejects() {
        let (store, entered, release) = TestStore::gated();
        let store = Arc::new(store);
        let journal = Journal::start(store.clone());
        let first = journal.submit(vec![ceiling(1)]);
        entered.recv().unwrap();
        let queued: Vec<_> = (2..=50).map(|i| journal.submit(vec![ceiling(i)])).collect();
        // a dropped future does not cancel its write
        drop(journal.submit(vec![ceiling(51)]));

        let closer = journal.clone();
        let shutting = std::thread::spawn(move || closer.shutdown());
        while journal.accepting() {
            std::thread::yield_now();
        }
        let err = journal.submit(vec![ceiling(99)]).await.unwrap_err().0;
        assert!(err.contains("shutting down"), "{err}");
        // the journal thread is held inside the first commit, so shutdown cannot have returned
        assert!(!shutting.is_finished());

        release.send(()).unwrap();
        shutting.join().unwrap();
        // the thread has exited: it dropped its handle on the store
        assert_eq!(Arc::strong_count(&store), 1);
        first.await.unwrap();
        for q in queued {
            q.await.unwrap();
        }
        assert_eq!(store.all(), (1..=51).map(ceiling).collect::<Vec<_>>());

        // idempotent, from any clone
        journal.shutdown();
        journal.clone().shutdown();
        assert!(
            journal
                .submit(vec![ceiling(100)])
                .await
                .unwrap_err()
                .0
                .contains("shutting down")
        );
        assert_eq!(journal.failed(), None);
    }

    #[test]
    fn dropping_every_handle_still_commits_what_was_queued() {
        let store = Arc::new(TestStore::default());
        let journal = Journal::start(store.clone());
        let pending = journal.submit(vec![ceiling(1)]);
        drop(journal);
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(pending)
            .unwrap();
        assert_eq!(store.all(), vec![ceiling(1)]);
    }
}
