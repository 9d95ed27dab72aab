//! The lock leader's end of the nodes' lock stream (`LockAuthority.Locks`, see the proto):
//! the lock calls of the cluster's coordinators, applied to the leader's [`At`] in the order
//! each stream sends them, so a row means the same on every node: one FIFO queue, one
//! wait-for graph for deadlocks, one set of guarded tables. That `At` is no coordinator's
//! own: every coordinator of a cluster, the leader node's included, reaches it through the
//! stream, so each lets go of rows only once that is durable (`at/authority.rs`).
//!
//! Invariants:
//! - A stream's calls are applied in the order sent. Acquires, queries and guards wait in
//!   tasks of their own; the stream's release, rolling-back and forget calls are applied
//!   before the next call is read.
//! - A waiting call is answered once: by its task, with what it found, or by `cancel`. Its
//!   task claims the answer when it finishes; one that finds it claimed (cancelled, or its
//!   stream ended) lets go of rows it was granted itself, since nobody will learn of them.
//! - A node has one live stream, the one with the highest number in its hello. A newer one
//!   ends the older first: the older stream stops, its waiting requests leave their queues,
//!   and only then is any call of the newer one applied, so a release the node resends on
//!   the newer stream can never come before a grant made on the older one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ferrata_rpc::pb::lock_answer::Answer;
use ferrata_rpc::pb::lock_call::Call;
use ferrata_rpc::{ErrorCode, pb};
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::at::guards::Table;
use crate::at::{At, RowsFound};
use crate::config::Config;
use crate::error::TcError;
use crate::lock_key::LockKey;
use crate::metrics::Metrics;

/// The `LockAuthority` service of the node that holds the cluster's locks.
pub struct LockLeader {
    at: Arc<At>,
    /// The create revision of this node's leader key in etcd: grants carry it.
    epoch: u64,
    metrics: Metrics,
    /// The longest a call may wait in the queues.
    max_lock_wait_ms: u64,
    /// How long a new stream may take to say hello.
    hello_within: Duration,
    /// Ends every stream (the leader stops leading).
    stop: CancellationToken,
    /// The live stream of each node, by node id, with its number.
    streams: Mutex<HashMap<u32, (u64, Arc<NodeStream>)>>,
}

/// One node's stream, as far as the leader must be able to end it.
#[derive(Default)]
struct NodeStream {
    state: Mutex<StreamState>,
    /// Its waiting requests' tasks.
    tasks: TaskTracker,
    /// Cancelled when it is ended: its serve loop stops reading, which closes the stream.
    stop: CancellationToken,
}

#[derive(Default)]
struct StreamState {
    /// Cleared when a newer stream of the node (or the end of this one) ends it.
    ended: bool,
    /// Calls still waiting (acquires, queries, guards), by call id.
    waiting: HashMap<u64, AbortHandle>,
}

impl NodeStream {
    /// Stops applying its calls and drops its waiting requests; returns once none runs.
    async fn end(&self) {
        {
            let mut state = self.state.lock();
            state.ended = true;
            for (_, task) in state.waiting.drain() {
                task.abort();
            }
        }
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

type Answers = mpsc::UnboundedSender<Result<pb::LockAnswer, Status>>;

impl LockLeader {
    /// Leads with `at` from `epoch` on, until `stop`.
    pub fn new(at: Arc<At>, epoch: u64, config: &Config, stop: CancellationToken) -> LockLeader {
        LockLeader {
            at,
            epoch,
            metrics: Metrics::new(),
            max_lock_wait_ms: config.transactions.max_lock_wait_ms,
            hello_within: config.phase2.heartbeat_interval() * 3,
            stop,
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// The wait a caller asked for, within this node's own limit.
    fn wait(&self, wait_ms: u64) -> (Instant, u64) {
        let ms = wait_ms.min(self.max_lock_wait_ms);
        (Instant::now() + Duration::from_millis(ms), ms)
    }

    /// Applies one call of `stream`; `false` once the stream was ended by a newer one.
    fn apply(self: &Arc<Self>, stream: &Arc<NodeStream>, id: u64, call: Call, answers: &Answers) -> bool {
        let mut state = stream.state.lock();
        if state.ended {
            return false;
        }
        let answer = |a: Answer| {
            let _ = answers.send(Ok(pb::LockAnswer { id, answer: Some(a) }));
        };
        match call {
            Call::Hello(_) => answer(refused(&TcError::new(
                ErrorCode::RmProtocol,
                "hello comes once, first on the stream",
            ))),
            Call::Acquire(a) => match keys(&a.keys) {
                Err(e) => answer(refused(&e)),
                Ok(keys) => {
                    let (this, wait) = (Arc::clone(self), self.wait(a.wait_ms));
                    let (at, undo_keys) = (Arc::clone(&self.at), keys.clone());
                    let undo = move || {
                        at.locks.release_branch(a.txn, a.branch, &undo_keys);
                    };
                    self.spawn(stream, &mut state, (id, answers), Some(Box::new(undo)), async move {
                        let granted = this
                            .at
                            .acquire(a.txn, a.branch, &keys, wait, &this.metrics, &this.stop)
                            .await;
                        this.at.count_held(&this.metrics);
                        match granted {
                            Ok(g) => Answer::Granted(pb::LockGranted {
                                waited_us: g.waited.map(|w| w.as_micros() as u64),
                                holders: g.holders,
                            }),
                            Err(e) => refused(&e),
                        }
                    });
                }
            },
            Call::Cancel(of) => {
                if let Some(task) = state.waiting.remove(&of) {
                    task.abort();
                    let e = TcError::new(ErrorCode::LockAuthorityUnavailable, "the caller gave it up");
                    let _ = answers.send(Ok(pb::LockAnswer {
                        id: of,
                        answer: Some(refused(&e)),
                    }));
                }
            }
            Call::Query(q) => match keys(&q.keys) {
                Err(e) => answer(refused(&e)),
                Ok(keys) => {
                    let (this, wait) = (Arc::clone(self), self.wait(q.wait_ms));
                    self.spawn(stream, &mut state, (id, answers), None, async move {
                        let txn = (q.txn != 0).then_some(q.txn);
                        match this.at.query(txn, &keys, wait, &this.metrics).await {
                            Ok(RowsFound::Free) => Answer::Granted(pb::LockGranted::default()),
                            Ok(RowsFound::Held(rows)) => Answer::Held(pb::LockHeldRows {
                                rows: rows.into_iter().map(crate::at::held_row_pb).collect(),
                            }),
                            Err(e) => refused(&e),
                        }
                    });
                }
            },
            Call::Guard(g) => {
                let tables: Vec<Table> = g.tables.iter().map(Table::from_pb).collect();
                // Pinned now, in the stream's order: a later forget unpins them.
                self.at.guards.pin(g.txn, &tables);
                let (this, (deadline, _)) = (Arc::clone(self), self.wait(g.wait_ms));
                self.spawn(stream, &mut state, (id, answers), None, async move {
                    match this.at.guard(&tables, deadline, &this.stop).await {
                        Ok(()) => Answer::Done(true),
                        Err(e) => refused(&e),
                    }
                });
            }
            Call::Release(r) => {
                // Keys that do not decode were never granted: nothing of them is held.
                let keys: Vec<LockKey> = r.keys.iter().filter_map(|k| LockKey::from_bytes(k)).collect();
                match r.branch {
                    0 => self.at.locks.release_txn(r.txn, &keys),
                    branch => self.at.locks.release_branch(r.txn, branch, &keys),
                }
                self.at.count_held(&self.metrics);
                answer(Answer::Done(true));
            }
            Call::RollingBack(txn) => {
                self.at.locks.set_rolling_back(txn);
                answer(Answer::Done(true));
            }
            Call::Sync(s) => match u16::try_from(s.namespace) {
                Err(_) => answer(refused(&TcError::invalid("a namespace above 65535"))),
                Ok(namespace) => {
                    let txns: HashSet<u64> = s.txns.into_iter().collect();
                    let holding: HashSet<(u64, u64)> = s.holding.iter().map(|b| (b.txn, b.branch)).collect();
                    self.at.sync_namespace(namespace, s.below, &txns, &holding);
                    self.at.count_held(&self.metrics);
                    answer(Answer::Done(true));
                }
            },
            Call::Forget(f) => {
                let tables: std::collections::BTreeSet<Table> = f.tables.iter().map(Table::from_pb).collect();
                self.at.forget(f.txn, &tables);
                answer(Answer::Done(true));
            }
        }
        true
    }

    /// Runs a call that waits in a task of `stream`'s, answering what it returns, unless
    /// `cancel` or the stream's end claimed the answer first: then a grant is undone (`undo`
    /// lets go of what it took), since nobody will learn of it.
    fn spawn(
        &self,
        stream: &Arc<NodeStream>,
        state: &mut StreamState,
        (id, answers): (u64, &Answers),
        undo: Option<Box<dyn FnOnce() + Send>>,
        call: impl Future<Output = Answer> + Send + 'static,
    ) {
        let (owner, out) = (Arc::clone(stream), answers.clone());
        let task = stream.tasks.spawn(async move {
            let reply = call.await;
            let claimed = owner.state.lock().waiting.remove(&id).is_some();
            if claimed {
                let _ = out.send(Ok(pb::LockAnswer {
                    id,
                    answer: Some(reply),
                }));
            } else if let (Answer::Granted(_), Some(undo)) = (reply, undo) {
                undo();
            }
        });
        state.waiting.insert(id, task.abort_handle());
    }

    /// Makes `stream` (numbered `number`) node `node`'s live one, returning the one it
    /// replaces; `Err` if the node has a newer one already.
    fn open(&self, node: u32, number: u64, stream: &Arc<NodeStream>) -> Result<Option<Arc<NodeStream>>, Status> {
        let mut streams = self.streams.lock();
        if let Some((live, _)) = streams.get(&node)
            && *live > number
        {
            return Err(ErrorCode::LockAuthorityUnavailable.status(
                format!("node {node} has a newer lock stream open (number {live}, not {number}); this one is refused"),
                None,
            ));
        }
        Ok(streams
            .insert(node, (number, Arc::clone(stream)))
            .map(|(_, older)| older))
    }

    /// Serves one node's stream until it ends, or a newer stream of the node ends it.
    async fn serve(
        self: Arc<Self>,
        mut calls: Streaming<pb::LockCall>,
        (node, stream, older): (u32, Arc<NodeStream>, Option<Arc<NodeStream>>),
        answers: Answers,
    ) {
        if let Some(older) = older {
            older.end().await;
        }
        tracing::info!(node, "a node's lock stream opened");
        loop {
            let next = tokio::select! {
                // Nothing more is applied once the stream or the leadership ended.
                biased;
                _ = stream.stop.cancelled() => break,
                _ = self.stop.cancelled() => break,
                next = calls.message() => next,
            };
            match next {
                Ok(Some(pb::LockCall { id, call: Some(call) })) => {
                    if !self.apply(&stream, id, call, &answers) {
                        break;
                    }
                }
                Ok(Some(pb::LockCall { id, call: None })) => {
                    let e = TcError::new(ErrorCode::RmProtocol, "a lock call without its call");
                    let _ = answers.send(Ok(pb::LockAnswer {
                        id,
                        answer: Some(refused(&e)),
                    }));
                }
                Ok(None) | Err(_) => break,
            }
        }
        {
            let mut streams = self.streams.lock();
            if streams.get(&node).is_some_and(|(_, s)| Arc::ptr_eq(s, &stream)) {
                streams.remove(&node);
            }
        }
        stream.end().await;
        tracing::info!(node, "a node's lock stream ended");
    }
}

/// The keys of a call, each checked to be a well-formed `LockKey`.
fn keys(raw: &[Vec<u8>]) -> Result<Vec<LockKey>, TcError> {
    raw.iter()
        .map(|k| LockKey::from_bytes(k).ok_or_else(|| TcError::invalid("a lock key that is not a LockKey")))
        .collect()
}

fn refused(e: &TcError) -> Answer {
    Answer::Refused(pb::CallError::of(&e.to_status()))
}

/// The lock leader a node runs while it leads. Every node of several serving ones offers
/// the service; while this is empty it refuses streams with `lock_authority_unavailable`.
#[derive(Default)]
pub struct LeaderSlot(RwLock<Option<Arc<LockLeader>>>);

impl LeaderSlot {
    pub fn set(&self, leader: Option<Arc<LockLeader>>) {
        *self.0.write() = leader;
    }

    fn get(&self) -> Option<Arc<LockLeader>> {
        self.0.read().clone()
    }
}

/// The service, shared by the server's connections.
pub struct LockService(pub Arc<LeaderSlot>);

#[tonic::async_trait]
impl pb::lock_authority_server::LockAuthority for LockService {
    type LocksStream = UnboundedReceiverStream<Result<pb::LockAnswer, Status>>;

    async fn locks(&self, request: Request<Streaming<pb::LockCall>>) -> Result<Response<Self::LocksStream>, Status> {
        let Some(leader) = self.0.get() else {
            return Err(ErrorCode::LockAuthorityUnavailable.status(
                "this node does not lead the cluster's locks; its coordinator follows the node that does",
                None,
            ));
        };
        if leader.stop.is_cancelled() {
            return Err(ErrorCode::LockAuthorityUnavailable.status(
                format!("this node no longer leads the locks (epoch {} ended)", leader.epoch),
                None,
            ));
        }
        let mut calls = request.into_inner();
        let protocol = |m: &str| ErrorCode::RmProtocol.status(m.to_owned(), None);
        let (id, hello) = match tokio::time::timeout(leader.hello_within, calls.message()).await {
            Ok(Ok(Some(pb::LockCall {
                id,
                call: Some(Call::Hello(h)),
            }))) => (id, h),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(protocol("no hello within three heartbeat intervals")),
            _ => return Err(protocol("the first call on a lock stream must be hello")),
        };
        let stream = Arc::new(NodeStream::default());
        // Decided here, in the order hellos arrive, not in the order serving tasks run.
        let older = leader.open(hello.node_id, hello.stream, &stream)?;
        let (answers, out) = mpsc::unbounded_channel();
        let _ = answers.send(Ok(pb::LockAnswer {
            id,
            answer: Some(Answer::Welcome(pb::LockWelcome { epoch: leader.epoch })),
        }));
        tokio::spawn(leader.serve(calls, (hello.node_id, stream, older), answers));
        Ok(Response::new(UnboundedReceiverStream::new(out)))
    }
}

#[cfg(test)]
mod tests;
