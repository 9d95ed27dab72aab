//! The chaos test: the bank workload across two MariaDB servers, each behind its own proxy
//! process, with one coordinator process, while a fault schedule runs: kill -9 and restart of
//! the coordinator, of each proxy and of each server, and SIGSTOP/SIGCONT of the coordinator
//! for longer than three heartbeat intervals (its streams are dropped). Clients reconnect and
//! carry on; each records what it was told about every transfer. After each fault the test
//! waits until transfers commit again, so every fault is survived, not just outlived.
//!
//! At the end, transfers whose outcome the client could not know (an error after COMMIT
//! GLOBAL was sent, or a rollback that got no answer) are resolved from the coordinator, and
//! the books are checked against what the clients saw: balances conserved and never
//! negative, the ledgers exactly the committed transfers, no undo record, no global lock, no
//! unfinished or failed transaction, no panic in any process, and only errors a fault
//! explains.
//!
//! `FERRATA_CHAOS_ROUNDS` (default 1: each fault once) runs the schedule more often, and
//! `FERRATA_CHAOS_SEED` repeats a run's choice of accounts and amounts. Run with
//! `--nocapture` to see what was injected and checked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{eventually, http_get, until_undo_records_gone};
use mysql_async::prelude::*;
use mysql_async::{Conn, OptsBuilder};
use tokio_util::sync::CancellationToken;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");
const CLIENTS: u64 = 4;
const ACCOUNTS: u64 = 4;
/// Low enough that some debits find too little money (and roll back), so that "no negative
/// balance" is a real check.
const START_BALANCE: i64 = 300;
/// Short, so that transactions a fault cut off are rolled back by their timeout soon.
const TXN_TIMEOUT_MS: u64 = 5_000;
const HEARTBEAT_MS: u64 = 500;
/// Longer than three heartbeat intervals: the coordinator drops the proxies' streams.
const PAUSE: Duration = Duration::from_millis(4 * HEARTBEAT_MS);
/// Transfers that must commit after a fault before the next one is injected.
const RECOVERED_AFTER: u64 = 3;
/// Longest any one client call may take; longer is a hang, and fails the test.
const CALL_LIMIT: Duration = Duration::from_secs(60);
/// How long recovery (and the final settling) may take.
const RECOVERY: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug)]
enum Side {
    A,
    B,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillCoordinator,
    KillProxy(Side),
    KillServer(Side),
    PauseCoordinator,
}

/// One round of the schedule: every fault once, on both sides.
const SCHEDULE: [Fault; 6] = [
    Fault::KillCoordinator,
    Fault::KillProxy(Side::A),
    Fault::KillServer(Side::B),
    Fault::PauseCoordinator,
    Fault::KillProxy(Side::B),
    Fault::KillServer(Side::A),
];

/// The processes under test.
struct World {
    servers: [MariaDb; 2],
    proxies: [ProxyProcess; 2],
    tc: Coordinator,
}

impl World {
    async fn start() -> Result<World> {
        let servers = [MariaDb::start().await?, MariaDb::start().await?];
        let tc = Coordinator::start_with(
            TC,
            &format!("[phase2]\nheartbeat_interval_ms = {HEARTBEAT_MS}\nretry_initial_ms = 50\nretry_max_ms = 1000\n"),
        )?;
        let proxy = |db: &MariaDb| {
            ProxyProcess::start_with(
                PROXY,
                db.addr(),
                &tc.endpoint(),
                "lock_wait_ms = 1000\noutcome_wait_ms = 3000",
                "",
            )
        };
        let proxies = [proxy(&servers[0])?, proxy(&servers[1])?];
        for db in &servers {
            let mut c = db.conn().await?;
            c.query_drop("CREATE TABLE account (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
                .await?;
            c.query_drop("CREATE TABLE ledger (id BIGINT PRIMARY KEY, src INT, dst INT, amount BIGINT)")
                .await?;
            for id in 1..=ACCOUNTS {
                c.query_drop(format!("INSERT INTO account VALUES ({id}, {START_BALANCE})"))
                    .await?;
            }
        }
        Ok(World { servers, proxies, tc })
    }

    async fn inject(&mut self, fault: Fault) -> Result<()> {
        match fault {
            Fault::KillCoordinator => self.tc.kill9_and_restart(),
            Fault::KillProxy(side) => self.proxies[side as usize].kill9_and_restart(),
            Fault::KillServer(side) => self.servers[side as usize].restart().await,
            Fault::PauseCoordinator => {
                self.tc.pause()?;
                // The fault is the pause itself: its length is what is being injected.
                tokio::time::sleep(PAUSE).await;
                self.tc.resume()
            }
        }
    }
}

/// What a client was told about one transfer.
#[derive(Debug)]
enum Seen {
    Committed,
    RolledBack,
    /// Not known to the client; `commit_sent` says whether it asked for the commit.
    Unknown {
        xid: String,
        commit_sent: bool,
    },
    /// START GLOBAL TRANSACTION failed: no statement ran.
    NotStarted,
}

/// One transfer: `amount` from account `from` on the debit side to `to` on the other, with a
/// ledger row on the debit side. `rollback` rolls it back on purpose after all its writes.
struct Transfer {
    id: u64,
    from: u64,
    to: u64,
    amount: i64,
    rollback: bool,
}

/// Errors the faults explain, by code: lost lock races (1205, 1213), a coordinator that
/// cannot be reached (1105) or whose answer is unknown (1180), a transaction its timeout
/// ended meanwhile (1397 once forgotten, 1399 in another status), a rollback still retrying
/// (1401), a backend gone or not back yet (2013, 2003), and MariaDB's own errors for a
/// connection its restart cut (1927, 2006).
const FAULT_CODES: [u16; 11] = [1205, 1213, 1105, 1180, 1397, 1399, 1401, 2013, 2003, 1927, 2006];

/// The error counts one client saw, by kind; fails on an error no fault explains.
#[derive(Default)]
struct Errors(BTreeMap<String, u64>);

impl Errors {
    fn record(&mut self, what: &str, e: &mysql_async::Error) -> Result<()> {
        let kind = match e {
            mysql_async::Error::Server(s) if FAULT_CODES.contains(&s.code) => format!("ERR {}", s.code),
            mysql_async::Error::Server(s) => bail!("{what}: an error no fault explains: {s:?}"),
            mysql_async::Error::Io(_) => "connection lost".to_owned(),
            mysql_async::Error::Driver(_) => "driver".to_owned(),
            other => bail!("{what}: an error no fault explains: {other}"),
        };
        *self.0.entry(kind).or_default() += 1;
        Ok(())
    }
}

/// Runs `call`, failing the test if it takes longer than [`CALL_LIMIT`].
async fn limited<T>(what: &str, call: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(CALL_LIMIT, call)
        .await
        .with_context(|| format!("{what} hung for {CALL_LIMIT:?}"))
}

/// Runs transfers on `a` (debit side) and `b` until one fails. Returns what the client saw
/// and whether the connections can go on (`false`: reconnect both).
async fn transfer(a: &mut Conn, b: &mut Conn, t: &Transfer, errors: &mut Errors) -> Result<(Seen, bool)> {
    let what = format!("transfer {}", t.id);
    let xid: String = match limited(
        &what,
        a.query_first(format!("START GLOBAL TRANSACTION TIMEOUT {TXN_TIMEOUT_MS}")),
    )
    .await?
    {
        Ok(xid) => xid.context("START GLOBAL TRANSACTION answers the XID")?,
        Err(e) => {
            errors.record(&what, &e)?;
            return Ok((Seen::NotStarted, false));
        }
    };
    let phase_one = async {
        a.query_drop(format!(
            "UPDATE account SET balance = balance - {} WHERE id = {} AND balance >= {0}",
            t.amount, t.from
        ))
        .await?;
        if a.affected_rows() == 0 {
            return Ok(false); // too little money
        }
        a.query_drop(format!(
            "INSERT INTO ledger VALUES ({}, {}, {}, {})",
            t.id, t.from, t.to, t.amount
        ))
        .await?;
        b.query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}'")).await?;
        b.query_drop(format!(
            "UPDATE account SET balance = balance + {} WHERE id = {}",
            t.amount, t.to
        ))
        .await?;
        b.query_drop("LEAVE GLOBAL TRANSACTION").await?;
        Ok::<_, mysql_async::Error>(true)
    };
    let healthy = match limited(&what, phase_one).await? {
        Ok(true) if !t.rollback => {
            return Ok(match limited(&what, a.query_drop("COMMIT GLOBAL")).await? {
                Ok(()) => (Seen::Committed, true),
                Err(e) => {
                    errors.record(&what, &e)?;
                    (Seen::Unknown { xid, commit_sent: true }, false)
                }
            });
        }
        Ok(_) => true,
        Err(e) => {
            errors.record(&what, &e)?;
            false
        }
    };
    Ok(
        match limited(&what, a.query_drop(format!("ROLLBACK GLOBAL '{xid}'"))).await? {
            Ok(()) => (Seen::RolledBack, healthy),
            Err(e) => {
                errors.record(&what, &e)?;
                (
                    Seen::Unknown {
                        xid,
                        commit_sent: false,
                    },
                    false,
                )
            }
        },
    )
}

/// Connects to `opts`, retrying while the proxy (or its server) is down, until `stop`.
async fn connect(opts: &OptsBuilder, stop: &CancellationToken, errors: &mut Errors) -> Result<Option<Conn>> {
    while !stop.is_cancelled() {
        match limited("connecting", Conn::new(opts.clone())).await? {
            Ok(conn) => return Ok(Some(conn)),
            Err(e) => errors.record("connecting", &e)?,
        }
        // A back-off between attempts to reach a process that is restarting.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(None)
}

/// What one client did: every transfer it tried with what it saw, and its errors.
struct Report {
    transfers: Vec<(Transfer, Side, Seen)>,
    errors: Errors,
}

/// One client: transfers in both directions until `stop`, reconnecting after failures.
async fn client(
    n: u64,
    opts: [OptsBuilder; 2],
    seed: u64,
    committed: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<Report> {
    let mut rng = seed ^ (n + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = move || {
        // xorshift64: reproducible from the seed.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut report = Report {
        transfers: Vec::new(),
        errors: Errors::default(),
    };
    let mut conns: [Option<Conn>; 2] = [None, None];
    for seq in 0.. {
        for (conn, opts) in conns.iter_mut().zip(&opts) {
            if conn.is_none() {
                *conn = connect(opts, &stop, &mut report.errors).await?;
            }
        }
        let [Some(x), Some(y)] = &mut conns else {
            break; // stopped while reconnecting
        };
        let t = Transfer {
            id: n * 1_000_000 + seq,
            from: next() % ACCOUNTS + 1,
            to: next() % ACCOUNTS + 1,
            amount: (next() % 7 + 1) as i64 * 10,
            rollback: next() % 5 == 0,
        };
        let side = if seq % 2 == 0 { Side::A } else { Side::B };
        let (a, b) = match side {
            Side::A => (x, y),
            Side::B => (y, x),
        };
        let (seen, healthy) = transfer(a, b, &t, &mut report.errors).await?;
        if matches!(seen, Seen::Committed) {
            committed.fetch_add(1, Ordering::SeqCst);
        }
        report.transfers.push((t, side, seen));
        if !healthy {
            conns = [None, None];
        }
        if stop.is_cancelled() {
            break;
        }
    }
    Ok(report)
}

/// Waits until [`RECOVERED_AFTER`] more transfers committed than `since`.
async fn recovered(committed: &AtomicU64, since: u64, after: &str) -> Result<()> {
    eventually(
        &format!("transfers to commit again after {after}"),
        RECOVERY,
        async || Ok((committed.load(Ordering::SeqCst) >= since + RECOVERED_AFTER).then_some(())),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_survives_crashes_and_pauses_of_every_process() -> Result<()> {
    let rounds: usize = std::env::var("FERRATA_CHAOS_ROUNDS").map_or(Ok(1), |v| v.parse())?;
    let seed: u64 = match std::env::var("FERRATA_CHAOS_SEED") {
        Ok(v) => v.parse()?,
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64
                | 1
        }
    };
    println!(
        "chaos: {rounds} round(s) of {} faults, FERRATA_CHAOS_SEED={seed}",
        SCHEDULE.len()
    );
    let mut world = World::start().await?;
    let committed = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let opts = [world.proxies[0].opts(), world.proxies[1].opts()];
            tokio::spawn(client(n, opts, seed, committed.clone(), stop.clone()))
        })
        .collect();

    let started = Instant::now();
    recovered(&committed, 0, "the start").await?;
    for fault in SCHEDULE.iter().cycle().take(rounds * SCHEDULE.len()) {
        let before = committed.load(Ordering::SeqCst);
        println!(
            "{:>6.1?} injecting {fault:?} ({before} transfers committed so far)",
            started.elapsed()
        );
        world.inject(*fault).await?;
        let since = committed.load(Ordering::SeqCst);
        recovered(&committed, since, &format!("{fault:?}")).await?;
        println!("{:>6.1?} recovered from {fault:?}", started.elapsed());
    }
    stop.cancel();
    let mut reports = Vec::new();
    for c in clients {
        reports.push(c.await??);
    }
    check(&world, reports, started).await
}

/// Settles the run and checks the books against what the clients saw.
async fn check(world: &World, reports: Vec<Report>, started: Instant) -> Result<()> {
    let tc = &world.tc;
    // Transactions a fault cut off end by their timeout; phase 2 finishes in the background.
    eventually("every global transaction to finish", RECOVERY, async || {
        let all = tc.get("/v1/transactions?limit=10000").await?;
        let unfinished: Vec<&serde_json::Value> = all["transactions"]
            .as_array()
            .context("a list")?
            .iter()
            .filter(|t| t["finished"] != true)
            .collect();
        Ok(unfinished.is_empty().then_some(()))
    })
    .await?;

    let mut errors = BTreeMap::<String, u64>::new();
    let mut committed = BTreeSet::new();
    let mut counts = BTreeMap::<&str, u64>::new();
    for report in &reports {
        for (kind, n) in &report.errors.0 {
            *errors.entry(kind.clone()).or_default() += n;
        }
        for (t, _side, seen) in &report.transfers {
            let kind = match seen {
                Seen::Committed => {
                    committed.insert(t.id);
                    "committed"
                }
                Seen::RolledBack => "rolled back",
                Seen::NotStarted => "not started",
                Seen::Unknown { xid, commit_sent } => {
                    let (code, body) = http_get(tc.http, &format!("/v1/transactions/{xid}")).await?;
                    let status = match code {
                        200 => serde_json::from_str::<serde_json::Value>(&body)?["status"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        // Never stored: the coordinator died before the first branch registered
                        // (a global transaction is written with its first branch), so no branch
                        // committed anything. The ledger check below holds it to that.
                        404 if body.contains("global_not_found") => "NeverStored".to_owned(),
                        _ => bail!("GET /v1/transactions/{xid}: {code} {body}"),
                    };
                    match status.as_str() {
                        "Committed" => {
                            ensure!(
                                *commit_sent,
                                "transfer {} ({xid}) committed although its client never asked",
                                t.id
                            );
                            committed.insert(t.id);
                            "unknown, then committed"
                        }
                        "Rollbacked" | "TimeoutRollbacked" => "unknown, then rolled back",
                        "NeverStored" => "unknown, never stored",
                        other => bail!("transfer {} ({xid}) ended {other:?}", t.id),
                    }
                }
            };
            *counts.entry(kind).or_default() += 1;
        }
    }
    println!("{:>6.1?} transfers: {counts:?}", started.elapsed());
    println!("errors the clients saw (all explained by faults): {errors:?}");
    ensure!(
        counts.get("rolled back").is_some_and(|n| *n > 0),
        "some transfers rolled back"
    );

    until_undo_records_gone(&world.servers.iter().collect::<Vec<_>>()).await?;
    let mut total = 0;
    let mut ledger = BTreeSet::new();
    let mut markers = 0;
    for db in &world.servers {
        let mut c = db.conn().await?;
        let balances: Vec<i64> = c.query("SELECT balance FROM account").await?;
        ensure!(balances.iter().all(|b| *b >= 0), "a negative balance: {balances:?}");
        total += balances.iter().sum::<i64>();
        for id in c.query::<u64, _>("SELECT id FROM ledger").await? {
            ensure!(ledger.insert(id), "transfer {id} is in the ledgers twice");
        }
        markers += c
            .query_first::<i64, _>("SELECT COUNT(*) FROM undo_log WHERE log_status = 1")
            .await?
            .unwrap_or(0);
    }
    ensure!(
        total == 2 * ACCOUNTS as i64 * START_BALANCE,
        "money was made or lost: {total} in all accounts"
    );
    let lost: Vec<_> = committed.difference(&ledger).collect();
    let phantom: Vec<_> = ledger.difference(&committed).collect();
    ensure!(
        lost.is_empty() && phantom.is_empty(),
        "the ledgers differ from the committed transfers: missing {lost:?}, not committed {phantom:?}"
    );
    let locks = tc.get("/v1/locks").await?;
    ensure!(
        locks["locks"].as_array().is_some_and(Vec::is_empty),
        "global locks are left: {locks}"
    );
    for failed in ["RollbackFailed", "TimeoutRollbackFailed", "CommitFailed"] {
        let list = tc.get(&format!("/v1/transactions?status={failed}")).await?;
        ensure!(
            list["transactions"].as_array().is_some_and(Vec::is_empty),
            "{failed}: {list}"
        );
    }
    let panics = [&world.tc.panics, &world.proxies[0].panics, &world.proxies[1].panics].map(|p| p.count());
    ensure!(
        panics == [0, 0, 0],
        "panics (coordinator, proxy A, proxy B): {panics:?}"
    );
    println!(
        "checked: {} accounts hold {total} as at the start, none negative; the ledgers hold exactly the {} \
         committed transfers; no undo record ({markers} anti-hanging markers), no global lock, no unfinished \
         or failed transaction, no panic",
        2 * ACCOUNTS,
        committed.len()
    );
    Ok(())
}
