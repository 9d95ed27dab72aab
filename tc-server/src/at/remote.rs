//! A node's end of the lock stream: its transactions' lock calls sent to the cluster's lock
//! leader (`leader.rs` is the other end), on one stream that follows the leader as it
//! changes. [`RemoteAt`] offers the calls; a driver task owns the stream.
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

use super::RowsFound;
use super::guards::Table;
use super::locks::{Granted, HeldRow};
use crate::error::TcError;
use crate::lock_key::LockKey;

/// Where the lock leader is (its gRPC endpoint, with the cluster's token and TLS), or
/// `None` while no node leads.
pub type LeaderAddress = watch::Receiver<Option<ClientConfig>>;

/// Rows granted by the leader whose epoch is `epoch`.
#[derive(Debug)]
pub struct Grant {
    pub granted: Granted,
    pub epoch: u64,
}

/// The lock calls of a node that does not hold the cluster's locks itself.
pub struct RemoteAt {
    next_id: AtomicU64,
    commands: mpsc::UnboundedSender<Command>,
    epoch: watch::Receiver<u64>,
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
    /// Starts the driver of node `node_id`'s stream to whichever node `leader` names, until
    /// `stop` (or until `leader`'s sender is gone).
    pub fn start(node_id: u16, leader: LeaderAddress, stop: CancellationToken) -> RemoteAt {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (epoch, epoch_rx) = watch::channel(0);
        let driver = Driver {
            node_id,
            commands: receiver,
            leader,
            epoch,
            unapplied: VecDeque::new(),
            asked: HashMap::new(),
            abandoned: HashMap::new(),
            // Ids from the top half: the driver's own calls (hello, releases of abandoned
            // grants) count from 1 and never meet them.
            next_id: 1,
            stop,
        };
        tokio::spawn(driver.run());
        RemoteAt {
            next_id: AtomicU64::new(1 << 63),
            commands,
            epoch: epoch_rx,
        }
    }

    /// The epoch of the leader the stream is open to (0 before the first).
    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn ask(&self, call: Call) -> Result<(Answer, u64), TcError> {
        let id = self.id();
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Ask { id, call, reply }).is_err() {
            return Err(unavailable("this node's lock stream is stopped"));
        }
        let mut asking = Asking {
            id,
            commands: &self.commands,
            answered: false,
        };
        let answer = answer.await;
        asking.answered = true;
        answer.unwrap_or_else(|_| Err(unavailable("this node's lock stream stopped")))
    }

    fn tell(&self, call: Call) {
        // A stopped driver means a stopped node: what it would have sent, a new leader
        // rebuilds from the store.
        let _ = self.commands.send(Command::Tell { id: self.id(), call });
    }

    /// Takes a branch's rows, waiting in the leader's queues until `deadline`.
    pub async fn acquire(&self, txn: u64, branch: u64, keys: &[LockKey], deadline: Instant) -> Result<Grant, TcError> {
        let call = Call::Acquire(pb::LockAcquire {
            txn,
            branch,
            keys: key_bytes(keys),
            wait_ms: ms_until(deadline),
        });
        match self.ask(call).await? {
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
        match self.ask(call).await? {
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

    /// Pins `tables` for `txn` and waits until every resource manager guards them.
    pub async fn guard(&self, txn: u64, tables: &[Table], deadline: Instant) -> Result<(), TcError> {
        let call = Call::Guard(pb::LockGuard {
            txn,
            tables: tables.iter().map(Table::to_pb).collect(),
            wait_ms: ms_until(deadline),
        });
        match self.ask(call).await? {
            (Answer::Done(_), _) => Ok(()),
            (other, _) => Err(refusal(other)),
        }
    }

    /// Lets go of `keys`: those of `branch`, or of every branch of `txn`.
    pub fn release(&self, txn: u64, branch: Option<u64>, keys: &[LockKey]) {
        self.tell(Call::Release(pb::LockRelease {
            txn,
            branch: branch.unwrap_or(0),
            keys: key_bytes(keys),
        }));
    }

    pub fn set_rolling_back(&self, txn: u64) {
        self.tell(Call::RollingBack(txn));
    }

    /// A finished transaction: its mark and its tables' pins go.
    pub fn forget(&self, txn: u64, tables: &BTreeSet<Table>) {
        self.tell(Call::Forget(pb::LockForget {
            txn,
            tables: tables.iter().map(Table::to_pb).collect(),
        }));
    }
}

/// Tells the driver when the caller of an `Ask` goes away before its answer.
struct Asking<'a> {
    id: u64,
    commands: &'a mpsc::UnboundedSender<Command>,
    answered: bool,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.commands.send(Command::GiveUp(self.id));
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
                ErrorCode::parse(&r.code).unwrap_or(ErrorCode::LockAuthorityUnavailable),
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
    epoch: watch::Sender<u64>,
    /// Changes sent and not answered yet, in the order sent.
    unapplied: VecDeque<(u64, Call)>,
    /// Calls waiting for their answer on the current stream.
    asked: HashMap<u64, (Call, Reply)>,
    /// Acquires whose caller went away before their answer: a grant is released.
    abandoned: HashMap<u64, pb::LockAcquire>,
    next_id: u64,
    stop: CancellationToken,
}

/// An open stream: where calls go, where answers come from, and the leader's epoch.
struct Stream {
    calls: mpsc::UnboundedSender<pb::LockCall>,
    answers: tonic::Streaming<pb::LockAnswer>,
    epoch: u64,
}

/// How long a node waits before it opens a stream again after one failed or broke.
const REOPEN_AFTER: Duration = Duration::from_millis(200);

impl Driver {
    async fn run(mut self) {
        loop {
            let Some(config) = self.wait_for_leader().await else {
                return;
            };
            match self.open(&config).await {
                Ok(stream) => {
                    tracing::info!(leader = config.endpoint, epoch = stream.epoch, "lock stream open");
                    self.epoch.send_replace(stream.epoch);
                    if !self.serve(stream).await {
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
        let _ = calls.send(pb::LockCall {
            id: hello,
            call: Some(Call::Hello(pb::LockHello {
                node_id: self.node_id.into(),
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
    async fn serve(&mut self, mut stream: Stream) -> bool {
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
                changed = self.leader.changed() => return changed.is_ok(),
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
                send(id, call.clone());
                self.asked.insert(id, (call, reply));
            }
            Command::Tell { id, call } => {
                send(id, call.clone());
                self.unapplied.push_back((id, call));
            }
            Command::GiveUp(id) => {
                if let Some((call, _)) = self.asked.remove(&id) {
                    if let Call::Acquire(acquire) = call {
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
        let lost_grant = if let Some((call, reply)) = self.asked.remove(&id) {
            match reply.send(Ok((answer, stream.epoch))) {
                Ok(()) => None,
                Err(_) => match call {
                    Call::Acquire(acquire) if granted => Some(acquire),
                    _ => None,
                },
            }
        } else {
            self.abandoned.remove(&id).filter(|_| granted)
        };
        if let Some(acquire) = lost_grant {
            let id = self.id();
            let call = release_of(acquire);
            let _ = stream.calls.send(pb::LockCall {
                id,
                call: Some(call.clone()),
            });
            self.unapplied.push_back((id, call));
        }
    }

    /// After a stream broke: waiting calls fail, and every acquire that may have been
    /// granted is released on the next stream.
    fn broken(&mut self) {
        let mut releases = Vec::new();
        for (_, (call, reply)) in self.asked.drain() {
            let _ = reply.send(Err(unavailable(
                "the lock stream to the leader broke while the call waited",
            )));
            if let Call::Acquire(acquire) = call {
                releases.push(release_of(acquire));
            }
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use ferrata_rpc::process::Secret;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::at::leader::LockLeader;
    use crate::calls::Caller;
    use crate::config::Config;
    use crate::coordinator::Coordinator;
    use crate::store::Snapshot;
    use crate::store::fixtures::HeldStore;
    use crate::store::journal::Journal;

    const EPOCH: u64 = 7;
    const TOKEN: &str = "the-cluster-secret";
    const LONG: Duration = Duration::from_secs(20);

    /// A leader node serving the lock stream, reached through a relay the test can cut.
    struct Leader {
        coordinator: Arc<Coordinator>,
        relay: Relay,
    }

    impl Leader {
        async fn start() -> Leader {
            let config = Config {
                token: Some(Secret(TOKEN.into())),
                ..Config::default()
            };
            let caller = Caller::new(&config.calls).unwrap();
            let journal = Journal::start(Arc::new(HeldStore::default()));
            let coordinator = Coordinator::recover(config, journal, Snapshot::default(), caller)
                .await
                .unwrap();
            let leader = Arc::new(LockLeader::new(Arc::clone(&coordinator), EPOCH));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let service = crate::grpc::lock_service(&leader, 4 << 20);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            Leader {
                coordinator,
                relay: Relay::start(addr).await,
            }
        }

        /// A node's stream to this leader.
        fn node(&self, node_id: u16, token: &str) -> Node {
            let config = ClientConfig {
                endpoint: format!("http://{}", self.relay.addr),
                token: Some(token.into()),
                ..ClientConfig::default()
            };
            let (leader, address) = watch::channel(Some(config));
            Node {
                at: RemoteAt::start(node_id, address, CancellationToken::new()),
                _leader: leader,
            }
        }

        /// Takes rows on the leader itself, as its own transactions do.
        async fn acquire(&self, txn: u64, branch: u64, keys: &[LockKey]) {
            let c = &self.coordinator;
            let wait = (Instant::now() + LONG, LONG.as_millis() as u64);
            c.at.acquire(txn, branch, keys, wait, &c.metrics, &c.shutdown)
                .await
                .unwrap();
        }

        /// Waits until `key`'s holder and queue are as given (`None`: nobody holds it).
        async fn wait_row(&self, key: &LockKey, holder: Option<u64>, waiters: &[u64]) {
            let deadline = Instant::now() + LONG;
            loop {
                let rows = self.coordinator.at.locks.held_rows(&|k| k == key, 1);
                let now = rows.first().map(|r| (r.txn, r.waiters.clone()));
                if now.as_ref().map(|(t, w)| (*t, w.as_slice())) == holder.map(|h| (h, waiters)) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "row still {now:?}, not {holder:?} {waiters:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// A node's end, with the sender of its leader's address.
    struct Node {
        at: RemoteAt,
        _leader: watch::Sender<Option<ClientConfig>>,
    }

    impl std::ops::Deref for Node {
        type Target = RemoteAt;
        fn deref(&self) -> &RemoteAt {
            &self.at
        }
    }

    /// A TCP relay to `target` whose connections `cut` severs (new ones still pass).
    struct Relay {
        addr: SocketAddr,
        cut: watch::Sender<u64>,
    }

    impl Relay {
        async fn start(target: SocketAddr) -> Relay {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (cut, cuts) = watch::channel(0);
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let mut cuts = cuts.clone();
                    cuts.borrow_and_update();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cuts.changed() => {}
                        }
                    });
                }
            });
            Relay { addr, cut }
        }

        fn cut(&self) {
            self.cut.send_modify(|n| *n += 1);
        }
    }

    fn row(pk: &str) -> LockKey {
        LockKey::new("db1", "s", "t", &[pk])
    }

    fn soon() -> Instant {
        Instant::now() + LONG
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_wait_in_the_leaders_fifo_queue_and_are_granted_in_order() {
        let leader = Leader::start().await;
        let (b, c) = (Arc::new(leader.node(2, TOKEN)), Arc::new(leader.node(3, TOKEN)));
        let r = row("1");
        leader.acquire(1, 10, std::slice::from_ref(&r)).await;
        let second = tokio::spawn({
            let (b, r) = (Arc::clone(&b), r.clone());
            async move { b.acquire(2, 20, &[r], soon()).await }
        });
        leader.wait_row(&r, Some(1), &[2]).await;
        let third = tokio::spawn({
            let (c, r) = (Arc::clone(&c), r.clone());
            async move { c.acquire(3, 30, &[r], soon()).await }
        });
        leader.wait_row(&r, Some(1), &[2, 3]).await;

        leader.coordinator.at.locks.release_txn(1, std::slice::from_ref(&r));
        let grant = second.await.unwrap().expect("the first in the queue is granted");
        assert_eq!(grant.epoch, EPOCH, "a grant carries the leader's epoch");
        assert!(
            grant.granted.waited.is_some() && grant.granted.holders == [1],
            "{grant:?}"
        );
        leader.wait_row(&r, Some(2), &[3]).await;
        assert!(!third.is_finished(), "the second in the queue still waits");

        b.release(2, Some(20), std::slice::from_ref(&r));
        third.await.unwrap().expect("the second in the queue is granted next");
        leader.wait_row(&r, Some(3), &[]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deadlock_between_nodes_is_found_and_the_youngest_gives_way() {
        let leader = Leader::start().await;
        let b = leader.node(2, TOKEN);
        let (r1, r2) = (row("1"), row("2"));
        leader.acquire(1, 10, std::slice::from_ref(&r1)).await;
        b.acquire(2, 20, std::slice::from_ref(&r2), soon()).await.unwrap();
        let first = tokio::spawn({
            let c = Arc::clone(&leader.coordinator);
            let r2 = r2.clone();
            async move {
                let wait = (Instant::now() + LONG, LONG.as_millis() as u64);
                c.at.acquire(1, 11, &[r2], wait, &c.metrics, &c.shutdown).await
            }
        });
        leader.wait_row(&r2, Some(2), &[1]).await;
        let e = b.acquire(2, 21, std::slice::from_ref(&r1), soon()).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Deadlock, "{e}");
        assert_eq!(
            leader.coordinator.at.deadlocks().len(),
            1,
            "the leader keeps it for operators"
        );
        b.release(2, Some(20), std::slice::from_ref(&r2));
        first.await.unwrap().expect("the older transaction gets the row");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_made_while_the_stream_is_cut_reach_the_leader_when_it_is_back() {
        let leader = Leader::start().await;
        let b = leader.node(2, TOKEN);
        let (r1, r2) = (row("1"), row("2"));
        b.acquire(2, 20, std::slice::from_ref(&r1), soon()).await.unwrap();
        b.acquire(4, 40, std::slice::from_ref(&r2), soon()).await.unwrap();
        // A waiting acquire fails when the stream breaks.
        let waiting = tokio::spawn({
            let r1 = r1.clone();
            let leader_stream = leader.node(3, TOKEN);
            async move { leader_stream.acquire(3, 30, &[r1], soon()).await }
        });
        leader.wait_row(&r1, Some(2), &[3]).await;
        leader.relay.cut();
        let e = waiting.await.unwrap().unwrap_err();
        assert_eq!(e.code, ErrorCode::LockAuthorityUnavailable, "{e}");
        leader.wait_row(&r1, Some(2), &[]).await;

        // Node 2's stream broke too: what it changes now waits for the next one.
        b.set_rolling_back(4);
        b.release(2, None, std::slice::from_ref(&r1));
        leader.wait_row(&r1, None, &[]).await;
        let e = leader
            .coordinator
            .at
            .locks
            .acquire(5, 50, std::slice::from_ref(&r2), Instant::now())
            .await;
        assert!(
            matches!(e, Err(crate::at::locks::LockError::HolderRollingBack { holder: 4, .. })),
            "the rolling-back mark reached the leader: {e:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acquire_given_up_by_its_caller_leaves_the_queue() {
        let leader = Leader::start().await;
        let b = Arc::new(leader.node(2, TOKEN));
        let r = row("1");
        leader.acquire(1, 10, std::slice::from_ref(&r)).await;
        let waiting = tokio::spawn({
            let (b, r) = (Arc::clone(&b), r.clone());
            async move { b.acquire(2, 20, &[r], soon()).await }
        });
        leader.wait_row(&r, Some(1), &[2]).await;
        waiting.abort();
        leader.wait_row(&r, Some(1), &[]).await;
        leader.coordinator.at.locks.release_txn(1, std::slice::from_ref(&r));
        leader.wait_row(&r, None, &[]).await;
        // The stream still serves.
        b.acquire(2, 21, std::slice::from_ref(&r), soon()).await.unwrap();
        leader.wait_row(&r, Some(2), &[]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_and_guards_go_to_the_leader() {
        let leader = Leader::start().await;
        let b = leader.node(2, TOKEN);
        let r = row("1");
        leader.acquire(1, 10, std::slice::from_ref(&r)).await;
        let found = b
            .query(
                Some(2),
                std::slice::from_ref(&r),
                Instant::now() + Duration::from_millis(50),
            )
            .await;
        match found.unwrap() {
            RowsFound::Held(rows) => assert_eq!((rows.len(), rows[0].txn, &rows[0].key), (1, 1, &r)),
            RowsFound::Free => panic!("row 1 is held by transaction 1"),
        }
        assert_eq!(
            b.query(Some(1), std::slice::from_ref(&r), soon()).await.unwrap(),
            RowsFound::Free
        );

        let table = Table::new("db1", "s", "t");
        b.guard(2, std::slice::from_ref(&table), soon()).await.unwrap();
        assert!(
            leader.coordinator.at.guards.is_pinned(&table),
            "the leader pinned the table"
        );
        b.forget(2, &BTreeSet::from([table.clone()]));
        let deadline = Instant::now() + LONG;
        while leader.coordinator.at.guards.is_pinned(&table) {
            assert!(Instant::now() < deadline, "forget unpins the table");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_the_root_token_is_refused() {
        let leader = Leader::start().await;
        let b = leader.node(2, "not-the-secret");
        let e = b.acquire(2, 20, &[row("1")], soon()).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::LockAuthorityUnavailable, "{e}");
        assert!(leader.coordinator.at.locks.held_rows(&|_| true, 1).is_empty());
    }
}
