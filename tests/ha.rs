//! The coordinator's high availability end to end: `ferrata-tc` nodes on a throw-away etcd
//! cluster, real proxy processes that list every node, and the `ferrata` command line.
//!
//! * Clients find the active node: the command line follows a standby's redirect, and a
//!   proxy that lists a standby first serves global transactions through the active node.
//! * The bank workload (`support/bank.rs`) runs through two proxies against two nodes on a
//!   three-member etcd cluster while faults hit, one at a time and then combined: kill -9 of
//!   the active node (restarted with its old identity by the test acting as supervisor, as
//!   every node that stops is), SIGSTOP of the active node past its lease then SIGCONT (it
//!   stops; restarted), kill -9 of the etcd leader, kill -9 of a proxy, the active node cut
//!   off from etcd but not from the proxies (it stops; the other takes over; restarted once
//!   healed), the active node cut off from the proxies but not from etcd (the proxies'
//!   calls fail until it heals), and combined: the active node and the etcd leader killed
//!   together, the active node cut off from etcd while a proxy dies. Each node runs in a
//!   network namespace of its own (`ferrata_testkit::netns`) with two links: one to etcd,
//!   one to everything else. After each fault, the workload must commit transfers again
//!   before the next one. Afterwards, from what the clients were told: no money made or
//!   lost, every acknowledged commit applied on both servers, nothing they saw rolled back
//!   has an effect, and within [`EVENT`] after the last fault every unfinished transaction
//!   is finished: no undo record, prepared branch or global lock left, no dirty rollback.
//!   And from etcd's history of the store (`support/history.rs`): every write was made by
//!   the owner of its time, and no row was ever stored as held by two transactions. CI runs
//!   the faults once; `FERRATA_HA_ROUNDS=<n>` runs them n times over.
//! * The same workload across two serving nodes (`[etcd] mode = "serving"`), the faults
//!   aimed at the lock leader and at the node that does not lead; the history is checked
//!   per namespace, and every registration stored while the lock leader that granted its
//!   rows led.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use ferrata_tc::config::HaMode;
use ferrata_tc::lock_key::LockKey;
use ferrata_tc::model::{BranchMode, BranchRecord, BranchStatus, GlobalRecord, GlobalStatus};
use ferrata_tc::store::etcd::{EtcdStore, StoredKey};
use ferrata_tc::store::{Mutation, Store};
use ferrata_tests::bank::{Books, Mode, Outcome, Side, check_books, create_accounts, credit, server_code, transfer};
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::etcd::{EtcdCluster, EtcdOptions};
use ferrata_tests::ferrata_testkit::netns::Host;
use ferrata_tests::ferrata_testkit::{MariaDb, MariaDbOptions};
use ferrata_tests::history::{StoreHistory, check_store_history};
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{EVENT, until};
use mysql_async::prelude::*;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");
const FERRATA: &str = env!("CARGO_BIN_EXE_ferrata-for-tests");

/// Transfer clients and credit clients during the faults.
const CLIENTS: u64 = 4;
const CREDITORS: u64 = 2;
/// Transfers that must commit after each fault before the next one.
const PROGRESS: u64 = 3;
/// How long a client waits after a fault before it tries again.
const FAULT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
/// A transfer's global timeout: what a fault leaves unfinished rolls back this long after
/// it began, at the latest.
const TIMEOUT_MS: u64 = 5_000;
/// A node's host's links: to the etcd members, and to everything else (proxies, the test).
const ETCD_LINK: u8 = 0;
const CLIENT_LINK: u8 = 1;
/// The nodes' root token: they listen beyond loopback, on their hosts' links.
const TOKEN: &str = "ha-test-root-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_and_proxies_find_the_active_node() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let active = Coordinator::start_on_etcd(TC, &etcd.endpoints(), 1)?;
    active.until_serving().await?;
    let standby = Coordinator::start_on_etcd(TC, &etcd.endpoints(), 2)?;
    assert!(!standby.serving().await, "the second node stands by");

    // The command line, pointed at the standby, gets its answer from the active node.
    let out = tokio::process::Command::new(FERRATA)
        .args(["txn", "list", "-o", "json"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("XDG_CONFIG_HOME", tempfile::tempdir()?.path())
        .env("FERRATA_SERVER", format!("http://{}", standby.http))
        .stdin(Stdio::null())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_str(&stdout)?;
    assert!(listed["transactions"].is_array(), "{listed}");

    // A proxy that lists the standby first passes over it.
    let db = MariaDb::start().await?;
    let proxy = ProxyProcess::start_with_endpoints(
        PROXY,
        db.addr(),
        &[standby.endpoint(), active.endpoint()],
        "lock_wait_ms = 1000",
        "",
    )?;
    let mut conn = proxy.conn().await?;
    let xid: String = conn.query_first("START GLOBAL TRANSACTION").await?.context("an XID")?;
    assert!(xid.starts_with("1-"), "{xid} comes from node 1, the active one");
    assert_eq!(active.status(&xid).await?, "Begin");
    Ok(())
}

/// What the clients learned, shared while they run.
#[derive(Default)]
struct Seen {
    books: Mutex<Books>,
    committed: AtomicU64,
    /// Transfers and credits cut off by faults.
    cut_off: AtomicU64,
    /// The MySQL error codes (0: the connection broke) that cut transfers and credits off.
    faults: Mutex<BTreeSet<u16>>,
    /// The first error a client stopped at: a failure, not a fault.
    failure: Mutex<Option<String>>,
}

impl Seen {
    fn failed(&self, e: anyhow::Error) -> anyhow::Error {
        self.failure.lock().get_or_insert_with(|| format!("{e:#}"));
        e
    }
}

/// What a fault did to a client's transfer or credit.
enum Fault {
    /// The client cannot know whether it took effect.
    Unknown,
    /// The coordinator had rolled it back (its timeout passed during a failover).
    RolledBack,
}

/// Whether `e` is what a fault does to a client, and what it means; records its code.
fn fault(seen: &Seen, e: &anyhow::Error) -> Option<Fault> {
    let (code, fault) = match e.downcast_ref::<mysql_async::Error>() {
        // The connection broke: a proxy died.
        Some(mysql_async::Error::Io(_) | mysql_async::Error::Driver(_)) => (0, Fault::Unknown),
        _ => match server_code(e) {
            // The coordinator could not be reached, or the outcome of COMMIT GLOBAL could
            // not be learned, or the coordinator does not know the XID (begun on a node
            // that died before it stored anything of it).
            Some(code @ (1105 | 1180 | 1397)) => (code, Fault::Unknown),
            // A branch refused because the coordinator already rolled the transaction back:
            // at registration ("... is Rollbacking"), or at the local commit, when the
            // rollback's anti-hanging marker got there first ("already rolled this branch
            // back"), as after a partition that outlasted the transaction's timeout.
            Some(1399) if rolled_back_by_the_coordinator(&format!("{e:#}")) => (1399, Fault::RolledBack),
            // A rollback decided (durably) whose first pass of phase 2 did not finish: a branch's
            // undo waited for a database row that a local transaction held while its own
            // registration waited for a lock leader that was paused or cut off. It is retried
            // until done, so the transfer has no effect; the books check that.
            Some(1401) if format!("{e:#}").contains("is Rollbacking: its branches have not finished") => {
                (1401, Fault::RolledBack)
            }
            _ => return None,
        },
    };
    seen.faults.lock().insert(code);
    seen.cut_off.fetch_add(1, Ordering::SeqCst);
    Some(fault)
}

/// Whether a 1399 refusal says the coordinator had rolled the transaction back.
fn rolled_back_by_the_coordinator(message: &str) -> bool {
    message.contains("Rollback") || message.contains("already rolled this branch back")
}

/// A connection through `proxy`, retried while the proxy restarts.
async fn connect(opts: &mysql_async::OptsBuilder) -> Result<mysql_async::Conn> {
    let mut last = None;
    let deadline = tokio::time::Instant::now() + EVENT;
    while tokio::time::Instant::now() < deadline {
        match mysql_async::Conn::new(opts.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Err(anyhow::anyhow!(
        "no connection through the proxy within {EVENT:?}: {last:?}"
    ))
}

/// Transfers from client `client` until `stop`, alternating direction, about 30% rolled
/// back on purpose.
async fn transfers(
    client: u64,
    proxies: [mysql_async::OptsBuilder; 2],
    seen: Arc<Seen>,
    stop: CancellationToken,
) -> Result<()> {
    let mut a = connect(&proxies[0]).await?;
    let mut b = connect(&proxies[1]).await?;
    let mut n = 0;
    while !stop.is_cancelled() {
        let id = client * 100_000 + n;
        let (mut x, mut y) = (
            Side {
                conn: &mut a,
                mode: Mode::At,
            },
            Side {
                conn: &mut b,
                mode: Mode::At,
            },
        );
        let result = if n % 2 == 0 {
            transfer(&mut x, &mut y, id, n % 10 < 3, TIMEOUT_MS).await
        } else {
            transfer(&mut y, &mut x, id, n % 10 < 3, TIMEOUT_MS).await
        };
        n += 1;
        match result {
            Ok(Outcome::Committed(id)) => {
                seen.books.lock().committed.insert(id);
                seen.committed.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Outcome::RolledBack(id)) => {
                seen.books.lock().rolled_back.insert(id);
            }
            Err(e) if let Some(fault) = fault(&seen, &e) => {
                match fault {
                    Fault::Unknown => seen.books.lock().unknown.insert(id),
                    Fault::RolledBack => seen.books.lock().rolled_back.insert(id),
                };
                // As an application would, wait a little before trying again.
                tokio::time::sleep(FAULT_PAUSE).await;
                // Whatever the sessions were bound to, start afresh.
                a = connect(&proxies[0]).await.map_err(|e| seen.failed(e))?;
                b = connect(&proxies[1]).await.map_err(|e| seen.failed(e))?;
            }
            Err(e) => return Err(seen.failed(e)),
        }
    }
    Ok(())
}

/// Credits from creditor `creditor` until `stop`, on both servers in turn.
async fn credits(
    creditor: u64,
    proxies: [mysql_async::OptsBuilder; 2],
    seen: Arc<Seen>,
    stop: CancellationToken,
) -> Result<()> {
    let mut n = 0;
    let mut conns = [connect(&proxies[0]).await?, connect(&proxies[1]).await?];
    while !stop.is_cancelled() {
        let id = 500_000 + creditor * 100_000 + n;
        let side = (n % 2) as usize;
        n += 1;
        // A credit every few milliseconds is plenty, and leaves the CPU to the faults.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        match credit(&mut conns[side], id).await {
            Ok(Some(_)) => {
                seen.books.lock().credited.insert(id);
            }
            Ok(None) => {}
            Err(e) if fault(&seen, &e).is_some() => {
                seen.books.lock().credits_unknown.insert(id);
                tokio::time::sleep(FAULT_PAUSE).await;
                conns[side] = connect(&proxies[side]).await.map_err(|e| seen.failed(e))?;
            }
            Err(e) => return Err(seen.failed(e)),
        }
    }
    Ok(())
}

/// The coordinator nodes, each in a host of its own, supervised by the test.
struct Nodes {
    nodes: [Coordinator; 2],
    hosts: [Arc<Host>; 2],
    /// Whether the supervisor leaves a node stopped: its link to etcd is cut (a restarted
    /// node would only wait for etcd until it heals), or the test keeps it down.
    kept_down: [bool; 2],
}

impl Nodes {
    /// Starts the nodes (serving ones reach each other's lock stream over their client
    /// links) and waits until one serves, or leads the locks.
    async fn start(etcd: &EtcdCluster, hosts: [Arc<Host>; 2], ha: HaMode) -> Result<Nodes> {
        let node = |i: usize| {
            let (endpoints, place) = (
                etcd.endpoints_at(hosts[i].outside(ETCD_LINK)),
                (hosts[i].clone(), hosts[i].inside(CLIENT_LINK)),
            );
            if ha == HaMode::Serving {
                hosts[i].route_hosts_via(CLIENT_LINK)?;
            }
            Coordinator::start_on_etcd_in(TC, (&endpoints, i as u16 + 1, ha), place, TOKEN)
        };
        let nodes = Nodes {
            nodes: [node(0)?, node(1)?],
            hosts,
            kept_down: [false; 2],
        };
        match ha {
            HaMode::ActiveStandby => nodes.active().await?,
            HaMode::Serving => nodes.lock_leader().await?,
        };
        Ok(nodes)
    }

    /// With several serving nodes: which node leads the cluster's locks.
    async fn lock_leader(&self) -> Result<usize> {
        which(&self.nodes, "a node to lead the cluster's locks", async |node| {
            node.leads_locks().await
        })
        .await
    }

    /// Which node serves.
    async fn active(&self) -> Result<usize> {
        which(&self.nodes, "a coordinator node to serve", async |node| {
            node.serving().await
        })
        .await
    }

    fn cut(&mut self, i: usize, link: u8) -> Result<()> {
        self.hosts[i].cut(link)?;
        self.kept_down[i] |= link == ETCD_LINK;
        Ok(())
    }

    fn heal(&mut self, i: usize, link: u8) -> Result<()> {
        self.hosts[i].heal(link)?;
        self.kept_down[i] &= link != ETCD_LINK;
        Ok(())
    }

    /// Cuts node `cut` off from etcd: it stops once unsure of its lease, and the other
    /// takes over (`took_over` says when); then heals the link (the supervisor restarts
    /// the stopped node).
    async fn cut_from_etcd(
        &mut self,
        cut: usize,
        took_over: impl AsyncFn(&Coordinator) -> bool,
        seen: &Seen,
    ) -> Result<()> {
        self.cut(cut, ETCD_LINK)?;
        until(
            "the other node to take over from the one cut off from etcd",
            async || Ok(took_over(&self.nodes[1 - cut]).await),
        )
        .await?;
        until("the node cut off from etcd to stop", async || {
            Ok(!self.nodes[cut].is_running())
        })
        .await?;
        progress(seen, self, "cutting a node off from etcd").await?;
        self.heal(cut, ETCD_LINK)
    }

    /// Cuts node `isolated` off from the proxies (and the other node) but not from etcd: it
    /// keeps its leases, so calls through it fail until the link heals (`what`, after).
    async fn cut_from_clients(&mut self, isolated: usize, seen: &Seen, what: &str) -> Result<()> {
        let cut_off = seen.cut_off.load(Ordering::SeqCst);
        self.cut(isolated, CLIENT_LINK)?;
        until("a client to be cut off", async || {
            Ok(seen.cut_off.load(Ordering::SeqCst) > cut_off)
        })
        .await?;
        self.heal(isolated, CLIENT_LINK)?;
        progress(seen, self, what).await
    }

    /// Restarts, as a supervisor would, any node that stopped (a node unsure of its lease
    /// stops, and an etcd leader change can make it unsure), unless it is cut off from etcd:
    /// a restarted node would only wait for etcd.
    fn supervise(&mut self) -> Result<()> {
        for (node, down) in self.nodes.iter_mut().zip(self.kept_down) {
            if !down && !node.is_running() {
                node.restart()?;
            }
        }
        Ok(())
    }
}

/// The first of `nodes` that `is` says is the one, waiting for `what` until one is.
async fn which(nodes: &[Coordinator], what: &str, is: impl AsyncFn(&Coordinator) -> bool) -> Result<usize> {
    let mut found = None;
    until(what, async || {
        for (i, node) in nodes.iter().enumerate() {
            if is(node).await {
                found = Some(i);
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await?;
    Ok(found.expect("until returned"))
}

/// Waits until `PROGRESS` more transfers committed than had when it was called, supervising
/// the nodes meanwhile.
async fn progress(seen: &Seen, nodes: &mut Nodes, what: &str) -> Result<()> {
    let target = seen.committed.load(Ordering::SeqCst) + PROGRESS;
    let deadline = tokio::time::Instant::now() + 3 * EVENT;
    loop {
        if seen.committed.load(Ordering::SeqCst) >= target {
            return Ok(());
        }
        if let Some(failure) = seen.failure.lock().clone() {
            anyhow::bail!("a client failed after {what}: {failure}");
        }
        nodes.supervise()?;
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no transfer committed within {:?} after {what}",
            3 * EVENT
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// One round of every fault in CI; `FERRATA_HA_ROUNDS=<n>` for longer runs.
fn rounds() -> Result<u32> {
    match std::env::var("FERRATA_HA_ROUNDS") {
        Ok(n) => n.parse().context("FERRATA_HA_ROUNDS must be a number of rounds"),
        Err(_) => Ok(1),
    }
}

/// The bank workload through two proxies (listing both nodes) against two coordinator nodes
/// in hosts of their own on three etcd members: what both bank tests set up and check.
struct BankRun {
    etcd: EtcdCluster,
    nodes: Nodes,
    dbs: [MariaDb; 2],
    proxies: [ProxyProcess; 2],
    seen: Arc<Seen>,
    stop: CancellationToken,
    clients: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl BankRun {
    /// Starts everything, and the clients, and waits for the workload to make progress.
    async fn start(ha: HaMode) -> Result<BankRun> {
        let hosts = [Arc::new(Host::create(2)?), Arc::new(Host::create(2)?)];
        let etcd = EtcdCluster::start_with(
            3,
            EtcdOptions {
                also_at: hosts.iter().map(|h| h.outside(ETCD_LINK)).collect(),
                ..EtcdOptions::default()
            },
        )
        .await?;
        let mut nodes = Nodes::start(&etcd, hosts, ha).await?;
        let options = || MariaDbOptions {
            extra_args: vec!["--innodb-lock-wait-timeout=2".into()],
            ..Default::default()
        };
        let dbs = [
            MariaDb::start_with(options()).await?,
            MariaDb::start_with(options()).await?,
        ];
        create_accounts([&dbs[0], &dbs[1]]).await?;
        let tcs = [nodes.nodes[0].endpoint(), nodes.nodes[1].endpoint()];
        let coordinator = format!("lock_wait_ms = 1000\ntoken = \"{TOKEN}\"");
        let proxy = |db: &MariaDb| ProxyProcess::start_with_endpoints(PROXY, db.addr(), &tcs, &coordinator, "");
        let proxies = [proxy(&dbs[0])?, proxy(&dbs[1])?];

        let seen = Arc::new(Seen::default());
        let stop = CancellationToken::new();
        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let opts = [proxies[0].opts(), proxies[1].opts()];
            clients.push(tokio::spawn(transfers(client, opts, seen.clone(), stop.clone())));
        }
        for creditor in 0..CREDITORS {
            let opts = [proxies[0].opts(), proxies[1].opts()];
            clients.push(tokio::spawn(credits(creditor, opts, seen.clone(), stop.clone())));
        }
        progress(&seen, &mut nodes, "the start").await?;
        Ok(BankRun {
            etcd,
            nodes,
            dbs,
            proxies,
            seen,
            stop,
            clients,
        })
    }

    /// Stops the clients and checks the books (locks and dirty rollbacks on the nodes
    /// `listing`), no panic anywhere, and the store's history, which it returns.
    async fn finish(mut self, listing: &[usize]) -> Result<StoreHistory> {
        self.stop.cancel();
        for c in self.clients {
            c.await??;
        }
        let books = std::mem::take(&mut *self.seen.books.lock());
        eprintln!(
            "{} transfers committed, {} cut off by faults (codes {:?}), {} credits",
            books.committed.len(),
            books.unknown.len() + books.credits_unknown.len(),
            self.seen.faults.lock(),
            books.credited.len()
        );
        self.nodes.supervise()?;
        for &i in listing {
            self.nodes.nodes[i].until_serving().await?;
        }
        let tcs: Vec<&Coordinator> = listing.iter().map(|&i| &self.nodes.nodes[i]).collect();
        check_books([&self.dbs[0], &self.dbs[1]], &tcs, &books).await?;
        // Every listed node served transactions.
        for tc in &tcs {
            let finished = tc.get("/v1/transactions?status=Committed").await?;
            assert!(
                finished["transactions"].as_array().is_some_and(|t| !t.is_empty()),
                "node {} committed transactions: {finished}",
                tc.endpoint()
            );
        }
        let prefix = ferrata_tc::config::Etcd::default().prefix;
        let history = check_store_history(&self.etcd.endpoints(), &prefix).await?;
        eprintln!("the store's history: {history:?}");
        for node in &self.nodes.nodes {
            assert_eq!(node.panics.count(), 0, "a coordinator node panicked");
        }
        let [pa, pb] = &self.proxies;
        assert_eq!(pa.panics.count() + pb.panics.count(), 0, "a proxy panicked");
        Ok(history)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_books_balance_while_coordinator_nodes_etcd_members_and_proxies_fail_or_are_cut_off() -> Result<()> {
    let mut run = BankRun::start(HaMode::ActiveStandby).await?;
    let rounds = rounds()?;
    for round in 1..=rounds {
        eprintln!("fault round {round} of {rounds}");
        // The active node dies; a node takes over (the standby, or the dead one restarted by
        // the supervisor, whichever campaigns first once the lease ran out).
        let first = run.nodes.active().await?;
        run.nodes.nodes[first].kill9()?;
        progress(&run.seen, &mut run.nodes, "killing the active node").await?;

        // The active node hangs past its lease: the other takes over, and the hung one, resumed,
        // stops by itself (writing nothing: ferrata-tc's own tests check that).
        let hung = run.nodes.active().await?;
        run.nodes.nodes[hung].pause()?;
        until("the standby to take over from the hung node", async || {
            Ok(run.nodes.nodes[1 - hung].serving().await)
        })
        .await?;
        run.nodes.nodes[hung].resume()?;
        until("the resumed node to stop", async || {
            Ok(!run.nodes.nodes[hung].is_running())
        })
        .await?;
        progress(&run.seen, &mut run.nodes, "pausing the active node").await?;

        // etcd's leader dies, and comes back.
        let leader = run.etcd.leader().await?;
        run.etcd.kill(leader);
        progress(&run.seen, &mut run.nodes, "killing etcd's leader").await?;
        run.etcd.restart(leader).await?;

        // A proxy dies and its supervisor restarts it.
        run.proxies[0].kill9_and_restart()?;
        progress(&run.seen, &mut run.nodes, "killing a proxy").await?;

        // The active node loses etcd but not the proxies: it stops, the other takes over.
        let cut = run.nodes.active().await?;
        run.nodes
            .cut_from_etcd(cut, async |n| n.serving().await, &run.seen)
            .await?;
        progress(&run.seen, &mut run.nodes, "healing the node cut off from etcd").await?;

        // The active node loses the proxies but not etcd: it keeps its lease, so nobody serves
        // them until the link heals; the clients' calls fail meanwhile.
        let isolated = run.nodes.active().await?;
        run.nodes
            .cut_from_clients(isolated, &run.seen, "healing the node cut off from the proxies")
            .await?;

        // Combined: the active node and etcd's leader at once.
        let (node, leader) = (run.nodes.active().await?, run.etcd.leader().await?);
        run.nodes.nodes[node].kill9()?;
        run.etcd.kill(leader);
        progress(&run.seen, &mut run.nodes, "killing the active node and etcd's leader").await?;
        run.etcd.restart(leader).await?;
        progress(&run.seen, &mut run.nodes, "the restarts").await?;

        // Combined: the active node loses etcd while a proxy dies.
        run.proxies[0].kill9_and_restart()?;
        let cut = run.nodes.active().await?;
        run.nodes
            .cut_from_etcd(cut, async |n| n.serving().await, &run.seen)
            .await?;
        progress(&run.seen, &mut run.nodes, "healing after a proxy died").await?;
    }

    let active = run.nodes.active().await?;
    let history = run.finish(&[active]).await?;
    // The first owner, and one for each fault that stopped the active node.
    assert!(
        history.epochs.len() > 5 * rounds as usize,
        "each fault that stopped the active node made a new owner: {history:?}"
    );
    Ok(())
}

/// Several serving nodes: the bank workload through two proxies that attach to both nodes,
/// each node serving the transactions it began while one of them holds every lock, as the
/// lock leader is killed, then the node that does not lead (kept down until the lock leader
/// adopted its namespace, and the workload went on), the lock leader hangs past its
/// lease, a proxy dies, etcd's leader dies, the lock leader is cut off from etcd (it stops,
/// the other leads), and cut off from the proxies and the other node but not from etcd (it
/// keeps its leases; every lock call fails until it heals). The nodes run in hosts of their
/// own, as above, reaching each other over their client links. Checked as above, on both
/// nodes; the store's history per namespace, and every registration stored while the lock
/// leader that granted its rows led.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_books_balance_across_serving_nodes_while_the_lock_leader_nodes_etcd_and_proxies_fail_or_are_cut_off()
-> Result<()> {
    let mut run = BankRun::start(HaMode::Serving).await?;
    let rounds = rounds()?;
    for round in 1..=rounds {
        eprintln!("fault round {round} of {rounds}");
        // The lock leader dies: the other node leads, its locks rebuilt from both namespaces,
        // and the dead one, restarted, serves its namespace again.
        let leader = run.nodes.lock_leader().await?;
        run.nodes.nodes[leader].kill9()?;
        progress(&run.seen, &mut run.nodes, "killing the lock leader").await?;

        // The node that does not lead dies and stays down: the lock leader adopts its
        // namespace and finishes its transactions while the workload goes on; restarted,
        // the node takes its namespace back.
        let leader = run.nodes.lock_leader().await?;
        let (other, other_id) = (1 - leader, 2 - leader as u16);
        run.nodes.nodes[other].kill9()?;
        run.nodes.kept_down[other] = true;
        until("the lock leader to adopt the dead node's namespace", async || {
            Ok(run.nodes.nodes[leader].adopted(other_id).await == Some(true))
        })
        .await?;
        progress(&run.seen, &mut run.nodes, "adopting the dead node's namespace").await?;
        run.nodes.kept_down[other] = false;
        progress(&run.seen, &mut run.nodes, "restarting the node that was adopted").await?;
        until("the adopted namespace to be handed back", async || {
            Ok(run.nodes.nodes[leader].adopted(other_id).await == Some(false))
        })
        .await?;
        until("the restarted node to serve its namespace", async || {
            Ok(run.nodes.nodes[other].serving().await)
        })
        .await?;

        // The lock leader hangs past its lease: the other node leads, and the hung one,
        // resumed, stops by itself.
        let hung = run.nodes.lock_leader().await?;
        run.nodes.nodes[hung].pause()?;
        until("the other node to lead", async || {
            Ok(run.nodes.nodes[1 - hung].leads_locks().await)
        })
        .await?;
        run.nodes.nodes[hung].resume()?;
        until("the resumed node to stop", async || {
            Ok(!run.nodes.nodes[hung].is_running())
        })
        .await?;
        progress(&run.seen, &mut run.nodes, "pausing the lock leader").await?;

        // A proxy dies and its supervisor restarts it.
        run.proxies[0].kill9_and_restart()?;
        progress(&run.seen, &mut run.nodes, "killing a proxy").await?;

        // etcd's leader dies, and comes back.
        let leader = run.etcd.leader().await?;
        run.etcd.kill(leader);
        progress(&run.seen, &mut run.nodes, "killing etcd's leader").await?;
        run.etcd.restart(leader).await?;

        // The lock leader loses etcd but not the proxies or the other node: it stops (both
        // its leases), the other leads.
        let cut = run.nodes.lock_leader().await?;
        run.nodes
            .cut_from_etcd(cut, async |n| n.leads_locks().await, &run.seen)
            .await?;
        progress(&run.seen, &mut run.nodes, "healing the lock leader cut off from etcd").await?;

        // The lock leader loses the proxies and the other node but not etcd: it keeps its
        // leases, so every lock call fails until the link heals.
        let isolated = run.nodes.lock_leader().await?;
        run.nodes
            .cut_from_clients(isolated, &run.seen, "healing the lock leader cut off from the proxies")
            .await?;
    }

    // Both nodes: each lists its own transactions, and the lock leader the locks.
    let history = run.finish(&[0, 1]).await?;
    // The first leader, and one for each fault that stopped the lock leader.
    assert!(
        history.lock_epochs.len() > 3 * rounds as usize,
        "each fault that stopped the lock leader made a new one: {history:?}"
    );
    assert!(
        history.lock_fenced > 0,
        "registrations were fenced by the lock leader's epoch: {history:?}"
    );
    assert!(
        history.adoptions >= rounds as u64,
        "each round's dead node had its namespace adopted: {history:?}"
    );
    Ok(())
}

/// A store on a fresh one-member etcd cluster, owned by node 1, for the history check's own
/// test; `write` runs with it (off the async runtime: the store blocks). Returns the check's
/// result on what was written.
async fn history_of(write: impl FnOnce(&Writes) -> Result<()> + Send + 'static) -> Result<Result<StoreHistory>> {
    let etcd = EtcdCluster::start(1).await?;
    let endpoints = etcd.endpoints();
    let settings = ferrata_tc::config::Etcd {
        endpoints: endpoints.clone(),
        lease_ttl_s: 2,
        ..Default::default()
    };
    let prefix = settings.prefix.clone();
    // A thread of its own, outside the runtime: the store blocks, and its drop hands the
    // lease back before the check reads the history.
    let written = endpoints.clone();
    std::thread::spawn(move || {
        let store = EtcdStore::connect(&settings, 1)?;
        store.acquire("node 1", &CancellationToken::new(), &mut |_| {})?;
        write(&Writes {
            store: &store,
            endpoints: &written,
            prefix: &settings.prefix,
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the writing thread panicked"))??;
    Ok(check_store_history(&endpoints, &prefix).await)
}

/// What the history check's own test writes: through the store, or behind its back.
struct Writes<'a> {
    store: &'a EtcdStore,
    endpoints: &'a [String],
    prefix: &'a str,
}

impl Writes<'_> {
    /// Transaction `txn` in `status`, with a branch holding row `row` if given, through the
    /// store (fenced and stamped).
    fn stored(&self, txn: u64, status: GlobalStatus, row: Option<u64>) -> Result<()> {
        let mut batch = vec![Mutation::PutGlobal(global(txn, status))];
        batch.extend(row.map(|row| Mutation::PutBranch(branch(txn, row))));
        self.store.commit(&batch).map_err(|e| anyhow::anyhow!(e.0))
    }

    /// Transaction 1's record (stored before) written again straight to etcd: without a
    /// stamp, as a node that skipped the fence would; or, `as_deposed_owner`, stamped with
    /// the store's epoch after the owner key was made anew, as by another node.
    fn behind_the_fence(&self, as_deposed_owner: bool) -> Result<()> {
        use etcd_client::{Client, Txn, TxnOp};
        let key = |k: StoredKey| format!("{}{k}", self.prefix);
        let epoch = self.store.epoch();
        tokio::runtime::Runtime::new()?.block_on(async {
            let mut client = Client::connect(self.endpoints, None).await?;
            let global = key(StoredKey::Global(1));
            let value = client.get(global.clone(), None).await?.kvs()[0].value().to_vec();
            let mut ops = vec![TxnOp::put(global, value, None)];
            if as_deposed_owner {
                client.delete(key(StoredKey::Owner), None).await?;
                client.put(key(StoredKey::Owner), "node 2", None).await?;
                ops.push(TxnOp::put(key(StoredKey::Writer), epoch.to_string(), None));
            }
            client.txn(Txn::new().and_then(ops)).await?;
            anyhow::Ok(())
        })
    }
}

fn global(txn_id: u64, status: GlobalStatus) -> GlobalRecord {
    GlobalRecord {
        txn_id,
        name: String::new(),
        status,
        timeout_ms: 60_000,
        begin_ms: 0,
        updated_ms: 0,
    }
}

/// A branch of `txn_id` holding the row of `account` with id `id`.
fn branch(txn_id: u64, id: u64) -> BranchRecord {
    BranchRecord {
        txn_id,
        branch_id: 1,
        resource_id: "bank".into(),
        lock_keys: vec![LockKey::new("bank", "test", "account", &[id.to_string()])],
        application_data: Vec::new(),
        status: BranchStatus::Registered,
        registered_ms: 0,
        updated_ms: 0,
        error: None,
        mode: BranchMode::At,
        connection_id: 0,
        instance_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_check_finds_unfenced_and_stale_writes_and_rows_held_twice() -> Result<()> {
    // Rows handed on by a commit decision, then taken by another transaction: fine.
    let fine = history_of(|w| {
        w.stored(1, GlobalStatus::Begin, Some(7))?;
        w.stored(1, GlobalStatus::AsyncCommitting, None)?;
        w.stored(2, GlobalStatus::Begin, Some(7))
    })
    .await??;
    assert_eq!(
        (fine.writes, fine.epochs.len(), fine.most_rows_held),
        (3, 1, 1),
        "{fine:?}"
    );

    // The same row stored for two transactions that both hold their rows.
    let twice = history_of(|w| {
        w.stored(1, GlobalStatus::Begin, Some(7))?;
        w.stored(2, GlobalStatus::Rollbacking, Some(7))
    })
    .await?
    .expect_err("a row held twice");
    assert!(
        format!("{twice:#}").contains("held by transactions 0-1 and 0-2"),
        "{twice:#}"
    );

    // A record written past the fence, as a node that skipped it would.
    let unfenced = history_of(|w| {
        w.stored(1, GlobalStatus::Begin, None)?;
        w.behind_the_fence(false)
    })
    .await?
    .expect_err("an unfenced write");
    assert!(format!("{unfenced:#}").contains("skipped the fence"), "{unfenced:#}");

    // A write stamped with an epoch that no longer owns the store.
    let stale = history_of(|w| {
        w.stored(1, GlobalStatus::Begin, None)?;
        w.behind_the_fence(true)
    })
    .await?
    .expect_err("a stale write");
    assert!(format!("{stale:#}").contains("a stale write"), "{stale:#}");
    Ok(())
}
