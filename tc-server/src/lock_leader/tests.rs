//! The lock stream end to end: a leader node serving `LockAuthority.Locks` over real gRPC,
//! reached through a TCP relay the tests can cut, and nodes using it directly (`RemoteAt`)
//! or as their coordinator's lock authority.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferrata_rpc::client::ClientConfig;
use ferrata_rpc::process::Secret;
use ferrata_rpc::{ErrorCode, pb};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::at::Grant;
use crate::at::remote::{Leadership, REOPEN_AFTER, RemoteAt};
use crate::auth::Tokens;
use crate::calls::Caller;
use crate::coordinator::Coordinator;
use crate::rm::RmRegistry;
use crate::store::Snapshot;
use crate::store::fixtures::HeldStore;
use crate::store::journal::Journal;

const EPOCH: u64 = 7;
const TOKEN: &str = "the-cluster-secret";
const LONG: Duration = Duration::from_secs(20);

/// A leader serving the lock stream with an `At` of its own, reached through a relay the
/// test can cut.
struct Leader {
    at: Arc<At>,
    /// For rows the test takes on the leader directly.
    metrics: Metrics,
    stop: CancellationToken,
    relay: Relay,
}

fn config(node_id: u16) -> Config {
    Config {
        node_id,
        token: Some(Secret(TOKEN.into())),
        ..Config::default()
    }
}

impl Leader {
    async fn start() -> Leader {
        let config = config(1);
        let (metrics, stop) = (Metrics::new(), CancellationToken::new());
        // The first leader a store ever had: no resource manager can hold an older view.
        let at = Arc::new(At::new(&config, Arc::new(RmRegistry::default()), true, &metrics));
        let tokens = Arc::new(Tokens::new(Some(TOKEN), Vec::new(), false));
        let leader = Arc::new(LockLeader::new(Arc::clone(&at), EPOCH, &config, stop.clone()));
        let slot = Arc::new(LeaderSlot::default());
        slot.set(Some(leader));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = crate::grpc::lock_service(&slot, tokens, 4 << 20);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Leader {
            at,
            metrics,
            stop,
            relay: Relay::start(addr).await,
        }
    }

    /// Where this leader is, as a node knows it (with the sender, which must live as long).
    fn address(&self, token: &str) -> (watch::Sender<Option<ClientConfig>>, Leadership) {
        let (sender, address) = watch::channel(Some(ClientConfig {
            endpoint: format!("http://{}", self.relay.addr),
            token: Some(token.into()),
            ..ClientConfig::default()
        }));
        // The test's nodes never lead.
        let here = watch::channel(None).1;
        (sender, Leadership { address, here })
    }

    /// A node's stream to this leader.
    fn node(&self, node_id: u16, token: &str) -> Node {
        let (leader, address) = self.address(token);
        let journal = Journal::start(Arc::new(HeldStore::default()));
        Node {
            at: RemoteAt::start(node_id, address, journal, CancellationToken::new()),
            _leader: leader,
        }
    }

    /// A coordinator node whose locks are this leader's, on a store (keeping nothing) that
    /// the test may hold.
    async fn follower(&self, node_id: u16) -> Follower {
        self.follower_from(node_id, Snapshot::default()).await
    }

    /// A coordinator node restarted on what its store held (`loaded`).
    async fn follower_from(&self, node_id: u16, loaded: Snapshot) -> Follower {
        let (leader, address) = self.address(TOKEN);
        let store = Arc::new(HeldStore::default());
        let config = config(node_id);
        let caller = Caller::new(&config.calls).unwrap();
        let journal = Journal::start(Arc::clone(&store) as Arc<dyn crate::store::Store>);
        let coordinator = Coordinator::recover(config, journal, loaded, caller, Some(address), None)
            .await
            .unwrap();
        Follower {
            coordinator,
            store,
            _leader: leader,
        }
    }

    /// Takes rows on the leader directly.
    async fn acquire(&self, txn: u64, branch: u64, keys: &[LockKey]) {
        let wait = (Instant::now() + LONG, LONG.as_millis() as u64);
        self.at
            .acquire(txn, branch, keys, wait, &self.metrics, &self.stop)
            .await
            .unwrap();
    }

    /// Waits until `key`'s holder and queue are as given (`None`: nobody holds it).
    async fn wait_row(&self, key: &LockKey, holder: Option<u64>, waiters: &[u64]) {
        let deadline = Instant::now() + LONG;
        loop {
            let rows = self.at.locks.held_rows(&|k| k == key, 1);
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

/// A coordinator node of the leader's cluster.
struct Follower {
    coordinator: Arc<Coordinator>,
    store: Arc<HeldStore>,
    _leader: watch::Sender<Option<ClientConfig>>,
}

impl std::ops::Deref for Follower {
    type Target = Arc<Coordinator>;
    fn deref(&self) -> &Arc<Coordinator> {
        &self.coordinator
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

/// A TCP relay to `target`: `cut` severs its connections and refuses new ones until `heal`.
struct Relay {
    addr: SocketAddr,
    /// Whether it carries, and how many times it was cut.
    state: watch::Sender<(bool, u64)>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, states) = watch::channel((true, 0));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut states = states.clone();
                let (up, cuts) = *states.borrow_and_update();
                if !up {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = states.wait_for(|(_, now)| *now != cuts) => {}
                    }
                });
            }
        });
        Relay { addr, state }
    }

    fn cut(&self) {
        self.state.send_modify(|(up, cuts)| (*up, *cuts) = (false, *cuts + 1));
    }

    fn heal(&self) {
        self.state.send_modify(|(up, _)| *up = true);
    }
}

fn row(pk: &str) -> LockKey {
    LockKey::new("db1", "s", "t", &[pk])
}

fn soon() -> Instant {
    Instant::now() + LONG
}

/// Node `node` acquires `row` for `(txn, branch)` in a task of its own.
fn acquire_in_background(
    node: &Arc<Node>,
    (txn, branch): (u64, u64),
    row: &LockKey,
) -> JoinHandle<Result<Grant, TcError>> {
    let (node, row) = (Arc::clone(node), row.clone());
    tokio::spawn(async move { node.acquire(txn, branch, &[row], soon()).await })
}

/// `coordinator` registers a branch of `xid` on row `pk`, waiting for it, in a task of its own.
fn register_in_background(coordinator: &Follower, xid: &str, pk: &str) -> JoinHandle<Result<u64, TcError>> {
    let (coordinator, request) = (Arc::clone(&coordinator.coordinator), register_row(xid, pk, 20_000));
    tokio::spawn(async move { coordinator.register(request).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_wait_in_the_leaders_fifo_queue_and_are_granted_in_order() {
    let leader = Leader::start().await;
    let (b, c) = (Arc::new(leader.node(2, TOKEN)), Arc::new(leader.node(3, TOKEN)));
    let r = row("1");
    leader.acquire(1, 10, std::slice::from_ref(&r)).await;
    let second = acquire_in_background(&b, (2, 20), &r);
    leader.wait_row(&r, Some(1), &[2]).await;
    let third = acquire_in_background(&c, (3, 30), &r);
    leader.wait_row(&r, Some(1), &[2, 3]).await;

    leader.at.locks.release_txn(1, std::slice::from_ref(&r));
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
        let (at, stop) = (Arc::clone(&leader.at), leader.stop.clone());
        let r2 = r2.clone();
        async move {
            let wait = (Instant::now() + LONG, LONG.as_millis() as u64);
            at.acquire(1, 11, &[r2], wait, &Metrics::new(), &stop).await
        }
    });
    leader.wait_row(&r2, Some(2), &[1]).await;
    let e = b.acquire(2, 21, std::slice::from_ref(&r1), soon()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Deadlock, "{e}");
    assert_eq!(leader.at.deadlocks().len(), 1, "the leader keeps it for operators");
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
    // A waiting acquire fails when the stream breaks, and leaves the leader's queue.
    let c = leader.node(3, TOKEN);
    let wanted = [r1.clone()];
    let waiting = c.acquire(3, 30, &wanted, soon());
    let waited = tokio::spawn(async move {
        leader.wait_row(&r1, Some(2), &[3]).await;
        leader.relay.cut();
        (leader, r1)
    });
    let e = waiting.await.unwrap_err();
    assert_eq!(e.code, ErrorCode::LockAuthorityUnavailable, "{e}");
    let (leader, r1) = waited.await.unwrap();
    leader.wait_row(&r1, Some(2), &[]).await;

    // While the relay refuses, node 2 has no stream: calls that wait fail at once, and
    // what it changes waits for the next stream.
    let e = b.acquire(2, 21, &[row("9")], soon()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::LockAuthorityUnavailable, "{e}");
    b.set_rolling_back(4);
    b.release(2, None, std::slice::from_ref(&r1));
    leader.wait_row(&r1, Some(2), &[]).await;
    leader.relay.heal();
    leader.wait_row(&r1, None, &[]).await;
    let e = leader
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
async fn a_nodes_newer_stream_ends_its_older_one_and_an_older_one_is_refused() {
    let leader = Leader::start().await;
    let r = row("1");
    leader.acquire(1, 10, std::slice::from_ref(&r)).await;
    let first = leader.node(2, TOKEN);
    let wanted = [r.clone()];
    let waiting = first.acquire(2, 20, &wanted, soon());
    let waited = tokio::spawn(async move {
        leader.wait_row(&r, Some(1), &[2]).await;
        // Another end for node 2 opens its stream now: the first's ends, its waiting call
        // with it.
        let second = leader.node(2, TOKEN);
        second.query(None, &[row("2")], soon()).await.unwrap();
        (leader, r, second)
    });
    let e = waiting.await.unwrap_err();
    // Stopped, before it opens another stream (which would end the second's in turn).
    drop(first);
    assert_eq!(e.code, ErrorCode::LockAuthorityUnavailable, "{e}");
    let (leader, r, second) = waited.await.unwrap();
    leader.wait_row(&r, Some(1), &[]).await;
    // The second's stream serves on. (Should the first have opened one more before it
    // stopped, the second's next stream, numbered higher, wins.)
    let deadline = Instant::now() + LONG;
    while let Err(e) = second.acquire(2, 21, &[row("3")], soon()).await {
        assert!(
            e.code == ErrorCode::LockAuthorityUnavailable && Instant::now() < deadline,
            "{e}"
        );
        tokio::time::sleep(REOPEN_AFTER).await;
    }
    leader.wait_row(&row("3"), Some(2), &[]).await;
    // A hello numbered below the live stream's is refused.
    let mut client = ferrata_rpc::client::lock_client(&leader.address(TOKEN).1.address.borrow().clone().unwrap())
        .await
        .unwrap();
    let (calls, outgoing) = tokio::sync::mpsc::unbounded_channel();
    calls
        .send(pb::LockCall {
            id: 1,
            call: Some(pb::lock_call::Call::Hello(pb::LockHello { node_id: 2, stream: 1 })),
        })
        .unwrap();
    let refused = client
        .locks(tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing))
        .await
        .unwrap_err();
    assert!(refused.message().contains("newer lock stream"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_given_up_by_its_caller_leaves_the_queue() {
    let leader = Leader::start().await;
    let b = Arc::new(leader.node(2, TOKEN));
    let r = row("1");
    leader.acquire(1, 10, std::slice::from_ref(&r)).await;
    let waiting = acquire_in_background(&b, (2, 20), &r);
    leader.wait_row(&r, Some(1), &[2]).await;
    waiting.abort();
    leader.wait_row(&r, Some(1), &[]).await;
    leader.at.locks.release_txn(1, std::slice::from_ref(&r));
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
    assert!(leader.at.guards.is_pinned(&table), "the leader pinned the table");
    b.forget(2, &BTreeSet::from([table.clone()]));
    let deadline = Instant::now() + LONG;
    while leader.at.guards.is_pinned(&table) {
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
    assert!(leader.at.locks.held_rows(&|_| true, 1).is_empty());
}

fn register_row(xid: &str, pk: &str, lock_wait_ms: u64) -> pb::BranchRegisterRequest {
    pb::BranchRegisterRequest {
        xid: xid.into(),
        resource_id: "db1".into(),
        locks: vec![pb::TableLocks {
            schema: "s".into(),
            table: "t".into(),
            rows: vec![pb::PrimaryKey {
                values: vec![pk.as_bytes().to_vec()],
            }],
        }],
        lock_wait_ms,
        branch_type: pb::BranchType::At as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_on_two_nodes_share_the_leaders_rows() {
    let leader = Leader::start().await;
    let (a, b) = (leader.follower(1).await, leader.follower(2).await);
    let r = row("1");

    let t1 = a.begin(60_000, String::new()).await.unwrap();
    a.register(register_row(&t1, "1", 0)).await.unwrap();
    let t2 = b.begin(60_000, String::new()).await.unwrap();
    let t2_id = crate::xid::parse_xid(&t2).unwrap();
    let waiting = register_in_background(&b, &t2, "1");
    leader
        .wait_row(&r, Some(crate::xid::parse_xid(&t1).unwrap()), &[t2_id])
        .await;

    // Node 2's lock query sees node 1's holder.
    let query = b
        .lock_query("", "db1", &register_row("", "1", 0).locks, 0)
        .await
        .unwrap();
    assert!(!query.lockable && query.holders.len() == 1, "{query:?}");

    a.commit(&t1).await.unwrap();
    waiting
        .await
        .unwrap()
        .expect("node 2's branch gets the row once node 1's holder commits");
    leader.wait_row(&r, Some(t2_id), &[]).await;
    b.commit(&t2).await.unwrap();
    leader.wait_row(&r, None, &[]).await;
    assert!(
        leader.at.guards.seq() > 0,
        "the leader guarded the table before its first lock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_on_one_node_makes_requests_on_another_fail_fast() {
    let leader = Leader::start().await;
    let (a, b) = (leader.follower(1).await, leader.follower(2).await);
    let t2 = b.begin(60_000, String::new()).await.unwrap();
    b.register(register_row(&t2, "1", 0)).await.unwrap();
    // No resource manager serves db1: the rollback keeps the branch, and its rows, while it
    // retries.
    let rollback = tokio::spawn({
        let (b, t2) = (Arc::clone(&b.coordinator), t2.clone());
        async move { b.rollback(&t2).await }
    });
    let t1 = a.begin(60_000, String::new()).await.unwrap();
    let deadline = Instant::now() + LONG;
    let e = loop {
        let e = a.register(register_row(&t1, "1", 0)).await.unwrap_err();
        if e.code == ErrorCode::LockHolderRollingBack || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(e.code, ErrorCode::LockHolderRollingBack, "{e}");
    assert_eq!(e.holder.as_deref(), Some(t2.as_str()));
    rollback.abort();
}

/// How node 1's transaction lets go of its row in `rows_pass_to_another_node_only_once_durable`.
#[derive(Clone, Copy)]
enum LetGo {
    /// It commits: the decision's write, then the release (`Coordinator::release_with`).
    Commit,
    /// Its branch reports a failed phase 1: the release is made before the report's write
    /// is awaited, so it waits in `AfterDurable`. (The store may be entered a moment before
    /// the release is made: then the check below passes without that wait too. It can pass
    /// wrongly, rarely, never fail wrongly.)
    ReportFailed,
}

/// Node 1's transaction holds a row node 2's waits for; node 1 lets go of it while its
/// store holds the write back: the row passes on only once that write is durable.
async fn rows_pass_to_another_node_only_once_durable(how: LetGo) {
    use std::sync::mpsc::sync_channel;
    let leader = Leader::start().await;
    let (a, b) = (leader.follower(1).await, leader.follower(2).await);
    let r = row("1");
    let t1 = a.begin(60_000, String::new()).await.unwrap();
    let branch = a.register(register_row(&t1, "1", 0)).await.unwrap();
    let t2 = b.begin(60_000, String::new()).await.unwrap();
    let waiting = register_in_background(&b, &t2, "1");
    let (t1_id, t2_id) = (crate::xid::parse_xid(&t1).unwrap(), crate::xid::parse_xid(&t2).unwrap());
    leader.wait_row(&r, Some(t1_id), &[t2_id]).await;

    let (entered_tx, entered) = sync_channel(1);
    let (release, release_rx) = sync_channel(1);
    *a.store.held.lock() = Some((entered_tx, release_rx));
    let letting_go = tokio::spawn({
        let (a, t1) = (Arc::clone(&a.coordinator), t1.clone());
        async move {
            match how {
                LetGo::Commit => a.commit(&t1).await.map(drop),
                LetGo::ReportFailed => {
                    let failed = crate::model::BranchStatus::PhaseOneFailed;
                    a.report(&t1, branch, failed, "the local commit failed".into()).await
                }
            }
        }
    });
    let entered = tokio::task::spawn_blocking(move || entered.recv_timeout(LONG));
    entered.await.unwrap().expect("node 1's write reached its store");
    // On one node the row could pass on now (a next holder's registration would be durable
    // after this write anyway); node 2's registration goes to another journal. Node 1's
    // query goes on its stream after anything it sent before, so the leader answers it
    // only after a release sent too early.
    let query = a
        .lock_query("", "db1", &register_row("", "1", 0).locks, 0)
        .await
        .unwrap();
    let holders: Vec<u64> = query.holders.iter().map(|(_, txn, _)| *txn).collect();
    assert_eq!(holders, [t1_id], "the row is still node 1's");
    release.send(()).unwrap();
    letting_go.await.unwrap().unwrap();
    waiting
        .await
        .unwrap()
        .expect("node 2's branch gets the row once node 1's write is durable");
    leader.wait_row(&r, Some(t2_id), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_hands_its_rows_to_another_node_only_once_durable() {
    rows_pass_to_another_node_only_once_durable(LetGo::Commit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_branch_hands_its_rows_to_another_node_only_once_durable() {
    rows_pass_to_another_node_only_once_durable(LetGo::ReportFailed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_lets_go_of_what_the_node_no_longer_has_below_its_new_ids_and_only_that() {
    let leader = Leader::start().await;
    let id = |n: u64| (2 << 48) | n;
    let (gone, kept) = (id(1), id(2));
    let old = leader.node(2, TOKEN);
    old.acquire(gone, id(11), &[row("1")], soon()).await.unwrap();
    old.acquire(kept, id(12), &[row("2")], soon()).await.unwrap();
    // A branch whose registration never became durable.
    old.acquire(kept, id(13), &[row("3")], soon()).await.unwrap();
    let other = leader.node(3, TOKEN);
    let (elsewhere, elsewhere_branch) = ((3 << 48) | 1, (3 << 48) | 2);
    other
        .acquire(elsewhere, elsewhere_branch, &[row("4")], soon())
        .await
        .unwrap();
    let (gone_table, kept_table) = (Table::new("db1", "s", "gone"), Table::new("db1", "s", "kept"));
    leader.at.guards.pin(gone, std::slice::from_ref(&gone_table));
    leader.at.guards.pin(kept, std::slice::from_ref(&kept_table));

    // Node 2 restarts: its store holds `kept` with branch id(12) holding rows, and it issues
    // ids from id(100) on.
    let new = leader.node(2, TOKEN);
    new.sync(id(100), vec![kept], vec![(kept, id(12))]);
    // A branch the stored transaction registered since.
    new.acquire(kept, id(101), &[row("5")], soon()).await.unwrap();
    let rows = || {
        let mut held: Vec<(String, u64)> = leader
            .at
            .locks
            .held_rows(&|_| true, 10)
            .into_iter()
            .map(|r| (String::from_utf8_lossy(r.key.parts().values[0]).into_owned(), r.txn))
            .collect();
        held.sort();
        held
    };
    let expected = vec![
        ("2".to_owned(), kept),
        ("4".to_owned(), elsewhere),
        ("5".to_owned(), kept),
    ];
    assert_eq!(
        rows(),
        expected,
        "rows 1 (a transaction gone) and 3 (a branch never stored) are let go"
    );
    assert!(!leader.at.guards.is_pinned(&gone_table));
    assert!(leader.at.guards.is_pinned(&kept_table));

    // Sent again, as after a broken stream, it changes nothing: what came since stays.
    new.sync(id(100), vec![kept], vec![(kept, id(12))]);
    // Answered after the sync on the same stream.
    new.query(None, &[row("9")], soon()).await.unwrap();
    assert_eq!(rows(), expected);
}

/// A registration whose write the store refuses by its lock fence (another leader leads) is
/// undone, and the node goes on: the transaction has no such branch, the rows are let go,
/// and the caller is told to retry, which then registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_refused_by_its_lock_fence_is_undone_and_its_rows_let_go() {
    use std::sync::atomic::Ordering;
    let leader = Leader::start().await;
    let node = leader.follower(2).await;
    let xid = node.begin(60_000, String::new()).await.unwrap();
    let txn = crate::xid::parse_xid(&xid).unwrap();
    node.store.refuse_fenced.store(true, Ordering::SeqCst);
    let e = node.register(register_row(&xid, "1", 20_000)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::LockAuthorityUnavailable, "{e:?}");
    assert!(e.message.contains("retry"), "{e:?}");
    leader.wait_row(&row("1"), None, &[]).await;
    let state = node.live(txn).unwrap();
    assert!(state.state.lock().branches.is_empty());

    node.store.refuse_fenced.store(false, Ordering::SeqCst);
    let branch = node.register(register_row(&xid, "1", 20_000)).await.unwrap();
    leader.wait_row(&row("1"), Some(txn), &[]).await;
    let state = state.state.lock();
    let branches: Vec<u64> = state.branches.iter().map(|b| b.branch_id).collect();
    assert_eq!((branches, state.registered), (vec![branch], 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_makes_the_leader_let_go_of_a_grant_it_never_stored() {
    use std::sync::mpsc::sync_channel;
    let leader = Leader::start().await;
    let first = leader.follower(2).await;
    let xid = first.begin(60_000, String::new()).await.unwrap();
    let (entered_tx, entered) = sync_channel(1);
    let (release, release_rx) = sync_channel(1);
    *first.store.held.lock() = Some((entered_tx, release_rx));
    let registering = register_in_background(&first, &xid, "1");
    let entered = tokio::task::spawn_blocking(move || entered.recv_timeout(LONG));
    entered.await.unwrap().expect("the registration reached the store");
    let txn = crate::xid::parse_xid(&xid).unwrap();
    leader.wait_row(&row("1"), Some(txn), &[]).await;

    // The node dies before the write is durable, and restarts on what its store holds:
    // nothing of the transaction (its ids were leased, so it issues none of them again).
    first.stop_now();
    let loaded = Snapshot {
        id_ceiling: txn + 1_000,
        ..Snapshot::default()
    };
    let _second = leader.follower_from(2, loaded).await;
    leader.wait_row(&row("1"), None, &[]).await;
    drop(release);
    registering.abort();
}
