//! A coordinator's end of the lock stream: its transactions' lock calls sent to the
//! cluster's lock leader (`lock_leader/` is the other end), on one stream that follows the
//! leader as it changes. [`RemoteAt`] offers the calls; a driver task owns the stream.
//!
//! Invariants:
//! - A release, rolling-back mark or forget is resent, in order, on every new stream until
//!   the leader answers it: a broken stream or a new leader loses none. Each is idempotent,
//!   and applying a suffix of them again in order ends where applying them once did.
//! - An acquire that may have been granted without its caller learning so (its stream broke,
//!   or its caller gave up first) is followed by a release of its rows.
//! - A call that waits is answered once: by the leader, or with
//!   `lock_authority_unavailable` when its stream breaks or there is none.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferrata_rpc::client::{ClientConfig, lock_client};
use ferrata_rpc::pb::lock_answer::Answer;
use ferrata_rpc::pb::lock_call::Call;
use ferrata_rpc::{ErrorCode, pb};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use super::after_durable::AfterDurable;
use super::guards::Table;
use super::locks::{Granted, HeldRow};
use super::{At, Grant, RowsFound};
use crate::error::TcError;
use crate::lock_key::LockKey;
use crate::store::journal::Journal;

/// Where the lock leader is (its gRPC endpoint, with the cluster's token and TLS), or
/// `None` while no node leads.
pub type LeaderAddress = watch::Receiver<Option<ClientConfig>>;

/// What a coordinator of several serving nodes knows of the cluster's lock leader; the node
/// keeps it current (`serving.rs`).
#[derive(Clone)]
pub struct Leadership {
    /// Where the leader's lock stream is.
    pub address: LeaderAddress,
    /// The leader's `At` while this node leads: its resource managers' streams run the guard
    /// protocol for it, and its locks are listed here.
    pub here: watch::Receiver<Option<Arc<At>>>,
}

/// A coordinator's lock calls, made at the cluster's lock leader.
pub struct RemoteAt {
    pub leadership: Leadership,
    /// The node's id: its namespace.
    node_id: u16,
    next_id: AtomicU64,
    commands: mpsc::UnboundedSender<Command>,
    /// Releases and forgets wait for what the coordinator submitted before them.
    after_durable: AfterDurable,
}

/// Where a waiting call's answer goes, with the epoch of the leader that gave it.
type Reply = oneshot::Sender<Result<(Answer, u64), TcError>>;

enum Command {
    /// A call whose answer the caller waits for.
    Ask { id: u64, call: Call, reply: Reply },
    /// A change, resent until applied.
    Tell { id: u64, call: Call },
    /// The caller of `Ask` `id` went away.
    GiveUp(u64),
}

impl RemoteAt {
    /// Starts the driver of node `node_id`'s stream to whichever node `leadership` names,
    /// until `stop` (or until its address's sender is gone); releases wait for `journal`.
    pub fn start(node_id: u16, leadership: Leadership, journal: Journal, stop: CancellationToken) -> RemoteAt {
        let (commands, receiver) = mpsc::unbounded_channel();
        let driver = Driver {
            node_id,
            commands: receiver,
            leader: leadership.address.clone(),
            unapplied: VecDeque::new(),
            asked: HashMap::new(),
            abandoned: HashMap::new(),
            // Ids from the top half: the driver's own calls (hello, releases of abandoned
            // grants) count from 1 and never meet them.
            next_id: 1,
            last_stream: 0,
            stop,
        };
        tokio::spawn(driver.run());
        RemoteAt {
            leadership,
            node_id,
            next_id: AtomicU64::new(1 << 63),
            commands,
            after_durable: AfterDurable::start(journal),
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `call` now (for an acquire, `acquiring` names the rows it asks for); the
    /// answer is awaited from what this returns.
    fn ask<'a>(&'a self, call: Call, acquiring: Option<Acquiring<'a>>) -> Asked<'a> {
        let id = self.id();
        let (reply, answer) = oneshot::channel();
        let sent = self.commands.send(Command::Ask { id, call, reply }).is_ok();
        Asked {
            id,
            remote: self,
            answer: sent.then_some(answer),
            acquiring,
        }
    }

    /// Sends a change now.
    fn tell(&self, call: Call) {
        // A stopped driver means a stopped node: what it would have sent, whoever loads the
        // store next starts from.
        let _ = self.commands.send(Command::Tell { id: self.id(), call });
    }

    /// Sends a change once everything the coordinator submitted before it is durable.
    fn tell_when_durable(&self, call: Call) {
        let (commands, id) = (self.commands.clone(), self.id());
        self.after_durable.then(move || {
            let _ = commands.send(Command::Tell { id, call });
        });
    }

    /// After this node (re)loaded its namespace: of the ids below `below`, only `txns` exist
    /// and only `holding` (transaction, branch) hold rows (`At::sync_namespace`). Sent before
    /// any later call.
    pub fn sync(&self, below: u64, txns: Vec<u64>, holding: Vec<(u64, u64)>) {
        self.tell(Call::Sync(pb::LockSync {
            namespace: self.node_id.into(),
            below,
            txns,
            holding: holding
                .into_iter()
                .map(|(txn, branch)| pb::LockBranch { txn, branch })
                .collect(),
        }));
    }

    /// Takes a branch's rows, waiting in the leader's queues until `deadline`.
    pub async fn acquire(&self, txn: u64, branch: u64, keys: &[LockKey], deadline: Instant) -> Result<Grant, TcError> {
        let call = Call::Acquire(pb::LockAcquire {
            txn,
            branch,
            keys: key_bytes(keys),
            wait_ms: ms_until(deadline),
        });
        match self.ask(call, Some((txn, branch, keys))).answer().await? {
            (Answer::Granted(g), epoch) => Ok(Grant {
                granted: Granted {
                    waited: g.waited_us.map(Duration::from_micros),
                    holders: g.holders,
                },
                epoch,
            }),
            (other, _) => Err(refusal(other)),
        }
    }

    /// Waits until no transaction but `txn` (if any) holds any of `keys`; takes nothing.
    pub async fn query(&self, txn: Option<u64>, keys: &[LockKey], deadline: Instant) -> Result<RowsFound, TcError> {
        let call = Call::Query(pb::LockQueryRows {
            txn: txn.unwrap_or(0),
            keys: key_bytes(keys),
            wait_ms: ms_until(deadline),
        });
        match self.ask(call, None).answer().await? {
            (Answer::Granted(_), _) => Ok(RowsFound::Free),
            (Answer::Held(held), _) => held
                .rows
                .into_iter()
                .map(|r| {
                    let key = LockKey::from_bytes(&r.key)
                        .ok_or_else(|| unavailable("the lock leader answered a malformed lock key"))?;
                    Ok(HeldRow {
                        key,
                        txn: r.txn,
                        branches: r.branches,
                        since_ms: r.since_ms,
                        waiters: r.waiters,
                    })
                })
                .collect::<Result<_, _>>()
                .map(RowsFound::Held),
            (other, _) => Err(refusal(other)),
        }
    }

    /// Pins `tables` for `txn` at once (in the stream's order, before any later forget) and
    /// returns the wait until every resource manager guards them.
    pub fn guard(&self, txn: u64, tables: &[Table], deadline: Instant) -> impl Future<Output = Result<(), TcError>> {
        let asked = self.ask(
            Call::Guard(pb::LockGuard {
                txn,
                tables: tables.iter().map(Table::to_pb).collect(),
                wait_ms: ms_until(deadline),
            }),
            None,
        );
        async move {
            match asked.answer().await? {
                (Answer::Done(_), _) => Ok(()),
                (other, _) => Err(refusal(other)),
            }
        }
    }

    /// Lets go of `keys` (those of `branch`, or of every branch of `txn`) once what the
    /// coordinator submitted before is durable.
    pub fn release(&self, txn: u64, branch: Option<u64>, keys: &[LockKey]) {
        self.tell_when_durable(Call::Release(pb::LockRelease {
            txn,
            branch: branch.unwrap_or(0),
            keys: key_bytes(keys),
        }));
    }

    /// Requests for `txn`'s rows fail fast from now on.
    pub fn set_rolling_back(&self, txn: u64) {
        self.tell(Call::RollingBack(txn));
    }

    /// A finished transaction: its mark and its tables' pins go, once its end is durable.
    pub fn forget(&self, txn: u64, tables: &BTreeSet<Table>) {
        self.tell_when_durable(Call::Forget(pb::LockForget {
            txn,
            tables: tables.iter().map(Table::to_pb).collect(),
        }));
    }
}

/// An acquire's transaction, branch and rows.
type Acquiring<'a> = (u64, u64, &'a [LockKey]);

/// A call sent, its answer awaited.
struct Asked<'a> {
    id: u64,
    remote: &'a RemoteAt,
    /// `None` if it could not be sent (the driver stopped), or once answered.
    answer: Option<oneshot::Receiver<Result<(Answer, u64), TcError>>>,
    /// For an acquire: its rows, released should they be granted after all.
    acquiring: Option<Acquiring<'a>>,
}

impl Asked<'_> {
    async fn answer(mut self) -> Result<(Answer, u64), TcError> {
        let Some(answer) = self.answer.as_mut() else {
            return Err(unavailable("this node's lock stream is stopped"));
        };
        let answered = answer.await;
        self.answer = None;
        answered.unwrap_or_else(|_| Err(unavailable("this node's lock stream stopped")))
    }
}

/// The caller went away before it read the answer: the driver hears so, and rows granted
/// meanwhile are released.
impl Drop for Asked<'_> {
    fn drop(&mut self) {
        let Some(mut answer) = self.answer.take() else { return };
        // Closed first, so the answer is either here now or never sent (the driver then
        // releases a grant it could not hand over).
        answer.close();
        match answer.try_recv() {
            Ok(Ok((Answer::Granted(_), _))) => {
                if let Some((txn, branch, keys)) = self.acquiring {
                    self.remote.tell(Call::Release(pb::LockRelease {
                        txn,
                        branch,
                        keys: key_bytes(keys),
                    }));
                }
            }
            Ok(_) => {}
            Err(_) => {
                let _ = self.remote.commands.send(Command::GiveUp(self.id));
            }
        }
    }
}

fn key_bytes(keys: &[LockKey]) -> Vec<Vec<u8>> {
    keys.iter().map(|k| k.as_bytes().to_vec()).collect()
}

fn ms_until(deadline: Instant) -> u64 {
    deadline.saturating_duration_since(Instant::now()).as_millis() as u64
}

fn unavailable(why: &str) -> TcError {
    TcError::new(
        ErrorCode::LockAuthorityUnavailable,
        format!("{why}; nothing was taken: retry once a lock leader answers again"),
    )
}

/// The leader's refusal as the caller's error (or an answer that does not fit the call).
fn refusal(answer: Answer) -> TcError {
    match answer {
        Answer::Refused(r) => TcError {
            holder: (!r.holder.is_empty()).then_some(r.holder),
            ..TcError::new(
                ErrorCode::parse(&r.ferrata_code).unwrap_or(ErrorCode::LockAuthorityUnavailable),
                r.message,
            )
        },
        other => unavailable(&format!(
            "the lock leader answered {other:?}, which does not fit the call"
        )),
    }
}

/// Owns the stream: sends the calls, matches the answers, resends what is unapplied.
struct Driver {
    node_id: u16,
    commands: mpsc::UnboundedReceiver<Command>,
    leader: LeaderAddress,
    /// Changes sent and not answered yet, in the order sent.
    unapplied: VecDeque<(u64, Call)>,
    /// Calls waiting for their answer on the current stream (with an acquire's request,
    /// whose rows are released should the answer be lost).
    asked: HashMap<u64, (Option<pb::LockAcquire>, Reply)>,
    /// Acquires whose caller went away before their answer: a grant is released.
    abandoned: HashMap<u64, pb::LockAcquire>,
    next_id: u64,
    /// The number of the latest stream it opened (see `LockHello.stream`).
    last_stream: u64,
    stop: CancellationToken,
}

/// An open stream: where calls go, where answers come from, and the leader's epoch.
struct Stream {
    calls: mpsc::UnboundedSender<pb::LockCall>,
    answers: tonic::Streaming<pb::LockAnswer>,
    epoch: u64,
}

/// How long a node waits before it opens a stream again after one failed or broke.
pub(crate) const REOPEN_AFTER: Duration = Duration::from_millis(200);

impl Driver {
    async fn run(mut self) {
        loop {
            let Some(config) = self.wait_for_leader().await else {
                return;
            };
            match self.open(&config).await {
                Ok(stream) => {
                    tracing::info!(leader = config.endpoint, epoch = stream.epoch, "lock stream open");
                    if !self.serve(stream, &config).await {
                        return;
                    }
                    tracing::warn!(leader = config.endpoint, "lock stream broke; opening another");
                }
                Err(e) => tracing::warn!(leader = config.endpoint, "cannot open the lock stream: {e:#}"),
            }
            self.broken();
            if !self.down_for(REOPEN_AFTER).await {
                return;
            }
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Waits until a leader is known, answering calls meanwhile; `None` once stopped.
    async fn wait_for_leader(&mut self) -> Option<ClientConfig> {
        loop {
            if let Some(config) = self.leader.borrow_and_update().clone() {
                return Some(config);
            }
            tokio::select! {
                changed = self.leader.changed() => changed.ok()?,
                command = self.commands.recv() => self.while_down(command?),
                _ = self.stop.cancelled() => return None,
            }
        }
    }

    /// Answers calls with no stream for `pause`, or until the leader changes; `false` once
    /// stopped.
    async fn down_for(&mut self, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                changed = self.leader.changed() => return changed.is_ok(),
                command = self.commands.recv() => match command {
                    Some(command) => self.while_down(command),
                    None => return false,
                },
                _ = self.stop.cancelled() => return false,
            }
        }
    }

    /// A call while there is no stream: one that waits fails, a change waits for the next.
    fn while_down(&mut self, command: Command) {
        match command {
            Command::Ask { reply, .. } => {
                let _ = reply.send(Err(unavailable("no lock leader is reachable")));
            }
            Command::Tell { id, call } => self.unapplied.push_back((id, call)),
            Command::GiveUp(_) => {}
        }
    }

    async fn open(&mut self, config: &ClientConfig) -> anyhow::Result<Stream> {
        let mut client = lock_client(config).await?;
        let (calls, outgoing) = mpsc::unbounded_channel();
        let hello = self.id();
        self.last_stream = (self.last_stream + 1).max(crate::model::now_ms());
        let _ = calls.send(pb::LockCall {
            id: hello,
            call: Some(Call::Hello(pb::LockHello {
                node_id: self.node_id.into(),
                stream: self.last_stream,
            })),
        });
        let mut answers = client.locks(UnboundedReceiverStream::new(outgoing)).await?.into_inner();
        let epoch = match tokio::time::timeout(Duration::from_secs(5), answers.message()).await {
            Ok(Ok(Some(pb::LockAnswer {
                answer: Some(Answer::Welcome(w)),
                ..
            }))) => w.epoch,
            Ok(Err(e)) => anyhow::bail!("the leader refused the stream: {}", e.message()),
            Err(_) => anyhow::bail!("the leader sent no welcome within 5 s"),
            Ok(_) => anyhow::bail!("the leader's first answer was not a welcome"),
        };
        for (id, call) in &self.unapplied {
            let _ = calls.send(pb::LockCall {
                id: *id,
                call: Some(call.clone()),
            });
        }
        Ok(Stream { calls, answers, epoch })
    }

    /// Serves an open stream until it breaks or the leader changes (`true`), or the node
    /// stops (`false`).
    async fn serve(&mut self, mut stream: Stream, leader: &ClientConfig) -> bool {
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.send(&stream, command),
                    None => return false,
                },
                answer = stream.answers.message() => match answer {
                    Ok(Some(answer)) => self.answered(&stream, answer),
                    Ok(None) | Err(_) => return true,
                },
                changed = self.leader.changed() => match changed {
                    // The same leader told again is no change.
                    Ok(()) if self.leader.borrow_and_update().as_ref() == Some(leader) => {}
                    Ok(()) => return true,
                    Err(_) => return false,
                },
                _ = self.stop.cancelled() => return false,
            }
        }
    }

    fn send(&mut self, stream: &Stream, command: Command) {
        // A send to a stream that just broke is lost with it, and handled with it.
        let send = |id, call| {
            let _ = stream.calls.send(pb::LockCall { id, call: Some(call) });
        };
        match command {
            Command::Ask { id, call, reply } => {
                let acquire = match &call {
                    Call::Acquire(a) => Some(a.clone()),
                    _ => None,
                };
                send(id, call);
                self.asked.insert(id, (acquire, reply));
            }
            Command::Tell { id, call } => {
                send(id, call.clone());
                self.unapplied.push_back((id, call));
            }
            Command::GiveUp(id) => {
                if let Some((acquire, _)) = self.asked.remove(&id) {
                    if let Some(acquire) = acquire {
                        self.abandoned.insert(id, acquire);
                    }
                    send(id, Call::Cancel(id));
                }
            }
        }
    }

    fn answered(&mut self, stream: &Stream, answer: pb::LockAnswer) {
        let pb::LockAnswer { id, answer } = answer;
        let Some(answer) = answer else { return };
        if let Some(at) = self.unapplied.iter().position(|(i, _)| *i == id) {
            self.unapplied.remove(at);
            return;
        }
        let granted = matches!(answer, Answer::Granted(_));
        let lost_grant = if let Some((acquire, reply)) = self.asked.remove(&id) {
            // Sent to a caller who already left: nobody learns of the grant.
            reply.send(Ok((answer, stream.epoch))).err().and(acquire)
        } else {
            self.abandoned.remove(&id)
        };
        if let Some(acquire) = lost_grant.filter(|_| granted) {
            let id = self.id();
            self.send(
                stream,
                Command::Tell {
                    id,
                    call: release_of(acquire),
                },
            );
        }
    }

    /// After a stream broke: waiting calls fail, and every acquire that may have been
    /// granted is released on the next stream.
    fn broken(&mut self) {
        let mut releases = Vec::new();
        for (_, (acquire, reply)) in self.asked.drain() {
            let _ = reply.send(Err(unavailable(
                "the lock stream to the leader broke while the call waited",
            )));
            releases.extend(acquire.map(release_of));
        }
        releases.extend(self.abandoned.drain().map(|(_, acquire)| release_of(acquire)));
        for call in releases {
            let id = self.id();
            self.unapplied.push_back((id, call));
        }
    }
}

fn release_of(acquire: pb::LockAcquire) -> Call {
    Call::Release(pb::LockRelease {
        txn: acquire.txn,
        branch: acquire.branch,
        keys: acquire.keys,
    })
}
