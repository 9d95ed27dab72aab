//! `at-bench`: Ferrata's AT and XA modes end to end, against MariaDB reached directly,
//! interleaved round by round (rotating which side goes first).
//!
//! Two throw-away MariaDB servers (A and B), one `ferrata-tc` and one `ferrata-proxy` in
//! front of each server, all on this machine. Three workloads:
//!
//! * **transfer**: each client moves 1 from a random account on A to a random account on B,
//!   as one global transaction through the proxies, with AT branches (at side) or XA
//!   branches (xa side), or as two local transactions straight to the servers (direct side).
//! * **hot**: every client increments the same row on A in a global transaction; the row's
//!   global lock (AT) or database lock (XA) passes from transaction to transaction. The same
//!   loop as local transactions straight to A, for reference.
//! * **unbound**: sysbench `oltp_read_write` through a proxy without a coordinator, through
//!   one with a coordinator (the no-dirty-writes check on, no global transaction running),
//!   and straight to A: what the check costs writes outside global transactions.
//! * **outbox**: each client updates a random account on A and writes a message to
//!   `ferrata_outbox` in the same local transaction, through proxy A; the coordinator
//!   delivers it to an HTTP receiver in this driver. Against the same transaction without the
//!   message through proxy A, and straight to A: the outbox's cost, messages per second end to
//!   end, and how long from the transaction's start to the message's receipt.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use clap::Parser;
use ferrata_bench::{
    Latency, LoggedChild, Sample, StoreKind, Sysbench, addr_after, http_get, load_average, median, metric_samples,
    parse_serving, process_cpu_seconds,
};
use ferrata_testkit::etcd::EtcdCluster;
use ferrata_testkit::service::Service;
use ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb, MariaDbOptions};
use mysql_async::Conn;
use mysql_async::prelude::Queryable;

const ABOUT: &str = "Ferrata's AT and XA modes against MariaDB directly: transfers between two servers, a hot \
                     row, and the cost of the no-dirty-writes check";

const LONG_ABOUT: &str = "\
Ferrata's AT and XA modes against MariaDB reached directly, interleaved round by round.

Starts two throw-away MariaDB servers (A and B, testkit; 256 MiB buffer pool by default,
innodb_flush_log_at_trx_commit=2), one ferrata-tc (its store in a fresh directory, or with
--store etcd1/etcd3 on an etcd cluster of one or three members the driver starts, whose CPU
counts as the coordinator's) and one ferrata-proxy in front of each server with that
coordinator, and creates
test.account (id INT PRIMARY KEY, balance BIGINT NOT NULL) with --accounts rows on each server.

Workloads (--workloads):

  transfer  At each --clients count, each client loops: pick two uniform random ids, move 1 from
            the account on A to the one on B.
            at side, one connection to each proxy per client: START GLOBAL TRANSACTION
            (proxy A), UPDATE ... -1 (proxy A, autocommit: the proxy wraps it as a branch),
            JOIN GLOBAL TRANSACTION '<xid>' (proxy B), UPDATE ... +1 (proxy B), LEAVE GLOBAL
            TRANSACTION (proxy B), COMMIT GLOBAL (proxy A). A transfer counts when COMMIT GLOBAL
            returns OK. After the side's window the driver waits for phase 2 (undo_log rows
            deleted, no prepared XA branch left) before the next side starts.
            xa side: the same with MODE XA on START and JOIN (each UPDATE an XA branch,
            prepared before its OK, committed in phase 2 on its connection; the next
            iteration on a connection waits for that).
            direct side, one connection to each server per client: BEGIN; UPDATE ... -1; COMMIT
            on A, then BEGIN; UPDATE ... +1; COMMIT on B (two local transactions).
            Target: median ratio ferrata/direct >= 0.5.
  hot       --hot-clients clients through proxy A: START GLOBAL TRANSACTION [MODE XA]; UPDATE
            account SET balance = balance + 1 WHERE id = 1; COMMIT GLOBAL. Reference: BEGIN; the
            same UPDATE; COMMIT straight to A. Target (AT): >= 1,000 global transactions per
            second.
  unbound   sysbench oltp_read_write at each --threads count against (i) a ferrata-proxy without
            a coordinator, (ii) proxy A (coordinator configured, no global transaction running:
            the no-dirty-writes check is on) and (iii) server A directly, rotating the order each
            round. Target: median ratio (ii)/(i) >= 0.95. Prints the proxies'
            ferrata_proxy_unbound_writes_total by route afterwards.
  outbox    At each --clients count, each client loops on server A: BEGIN; UPDATE account SET
            balance = balance + 1 WHERE id = <random>; [INSERT INTO ferrata_outbox (target,
            payload) VALUES (<receiver>, <ns since the run began, at the BEGIN>)]; COMMIT.
            outbox side: with the INSERT, through proxy A (the proxy hands the message to the
            coordinator at the COMMIT, the coordinator POSTs it to an HTTP receiver in this
            driver); proxy side: without it, through proxy A; direct side: without it, straight
            to A. After the outbox side's window the driver waits until every committed message
            arrived. Prints tx/s per side, messages per second end to end (committed messages
            over the window plus that wait) and the time from BEGIN to receipt.

--sides chooses the sides of transfer and hot (default at,xa,direct). Every round runs each
side for --time seconds. Errors (lock wait timeouts 1205, deadlocks 1213,
anything the server or proxy answers) are counted per statement and the loop goes on; a broken
connection ends the run. At the end the balances on both servers are checked against the
transfers and increments that reported success.

Build everything in release mode and run with bench/at.sh (arguments are passed on).";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    /// One global transaction across two servers per transfer, against two local ones.
    Transfer,
    /// Every client increments one row in a global transaction.
    Hot,
    /// sysbench through a proxy with and without the no-dirty-writes check.
    Unbound,
    /// A local transaction with a message in the outbox, against one without.
    Outbox,
}

#[derive(Debug, Parser)]
#[command(about = ABOUT, long_about = LONG_ABOUT)]
struct Args {
    /// Measured rounds per workload and client (or thread) count; each round runs every side
    /// once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds each side runs per round.
    #[arg(long, default_value_t = 10)]
    time: u64,
    /// Unmeasured seconds per side before each workload and client count (0: no warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Comma-separated workloads to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "transfer,hot,unbound,outbox"
    )]
    workloads: Vec<Workload>,
    /// Comma-separated client counts of the transfer and outbox workloads. Each client keeps
    /// one connection to each proxy and one to each server open for the whole workload.
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    clients: Vec<usize>,
    /// Comma-separated sides of the transfer and hot workloads (direct is the reference).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "at,xa,direct")]
    sides: Vec<Side>,
    /// Clients of the hot-row workload (all through proxy A, or all straight to A).
    #[arg(long, default_value_t = 32)]
    hot_clients: usize,
    /// Comma-separated sysbench thread counts of the unbound workload.
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    threads: Vec<u32>,
    /// Rows of test.account on each server; transfers pick ids uniformly among them.
    #[arg(long, default_value_t = 10_000)]
    accounts: u32,
    /// Send the UPDATEs as text queries with the id inlined, instead of prepared statements
    /// with a bound parameter (the default, prepared once per connection).
    #[arg(long)]
    text: bool,
    /// The proxies' [coordinator] lock_wait_ms: how long a branch registration waits for rows
    /// another global transaction holds.
    #[arg(long, default_value_t = 10_000)]
    lock_wait_ms: u64,
    /// sysbench tables of the unbound workload (in database test on server A).
    #[arg(long, default_value_t = 4)]
    tables: u32,
    /// Rows per sysbench table.
    #[arg(long, default_value_t = 10_000)]
    table_size: u64,
    /// Extra argument for every sysbench run, e.g. --sysbench-arg=--db-ps-mode=disable
    /// (repeatable).
    #[arg(long = "sysbench-arg", allow_hyphen_values = true)]
    sysbench_args: Vec<String>,
    /// InnoDB buffer pool of each server; large enough to hold the tables.
    #[arg(long, default_value = "256M")]
    buffer_pool: String,
    /// The proxy binary [default: ferrata-proxy next to this binary].
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// The coordinator binary [default: ferrata-tc next to this binary].
    #[arg(long)]
    tc_bin: Option<PathBuf>,
    /// Extra flag for every proxy, e.g. --proxy-arg=--worker-threads=2 (repeatable; flags
    /// override the generated config file).
    #[arg(long = "proxy-arg", allow_hyphen_values = true)]
    proxy_args: Vec<String>,
    /// Extra flag for the coordinator, e.g. --tc-arg=--worker-threads=1 (repeatable).
    #[arg(long = "tc-arg", allow_hyphen_values = true)]
    tc_args: Vec<String>,
    /// Where the coordinator keeps its state: `redb` (the embedded store), `etcd1`, `etcd3`
    /// (etcd of one or three members; bench/at-stores.sh alternates runs on each).
    #[arg(long, value_enum, default_value = "redb")]
    store: StoreKind,
    /// Where the coordinator's data directory is created [default: the temp directory]. Its
    /// store fsyncs every change, so put it on the disk under test, not tmpfs.
    #[arg(long)]
    data_parent: Option<PathBuf>,
    /// Worker threads of this driver's Tokio runtime (the clients), 0 for one per CPU.
    #[arg(long, default_value_t = 0)]
    bench_threads: usize,
}

/// Targets from the issue.
const TRANSFER_TARGET: f64 = 0.5;
const HOT_TARGET: f64 = 1_000.0;
const UNBOUND_TARGET: f64 = 0.95;

/// Every account starts with this balance.
const INITIAL_BALANCE: i64 = 1_000_000;
/// The proxies log warnings, plus the lines the driver waits for.
const PROXY_LOG: &str = "warn,ferrata_proxy::server=info,ferrata_proxy::coordinator::link=info";
const TC_LOG: &str = "warn,ferrata_tc::server=info";
/// A client that gets this many errors in a row ends the run: something is broken, and
/// counting the same refusal for the rest of the window would say nothing.
const MAX_CONSECUTIVE_ERRORS: u32 = 1_000;
/// Longest wait for phase 2 to delete the undo records of committed transactions.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// CPU groups measured per side: the two servers, the two proxies, the coordinator and this
/// driver.
const CPU_GROUPS: [&str; 4] = ["mariadbd", "proxies", "tc", "bench"];

/// Ferrata's XA format id ("FRTA"), as `XA RECOVER` shows it.
const XA_FORMAT_ID: i64 = 0x4652_5441;

const DEBIT: &str = "UPDATE account SET balance = balance - 1 WHERE id = ?";
const CREDIT: &str = "UPDATE account SET balance = balance + 1 WHERE id = ?";

fn main() -> ExitCode {
    // Printed by hand: returning the error from main would add a backtrace whenever
    // RUST_BACKTRACE is set, burying the log tails that explain it.
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("at-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(args.time > 0, "--time must be at least 1");
    ensure!(!args.workloads.is_empty(), "--workloads must name a workload");
    ensure!(args.accounts > 0, "--accounts must be at least 1");
    let wants = |w: Workload| args.workloads.contains(&w);
    ensure!(
        !wants(Workload::Transfer) || (!args.clients.is_empty() && args.clients.iter().all(|&c| c > 0)),
        "--clients must name client counts above 0"
    );
    ensure!(
        !wants(Workload::Outbox) || (!args.clients.is_empty() && args.clients.iter().all(|&c| c > 0)),
        "--clients must name client counts above 0"
    );
    ensure!(
        args.sides
            .iter()
            .all(|s| matches!(s, Side::At | Side::Xa | Side::Direct)),
        "--sides names sides of transfer and hot: at, xa, direct"
    );
    ensure!(
        !wants(Workload::Hot) || args.hot_clients > 0,
        "--hot-clients must be at least 1"
    );
    ensure!(
        !wants(Workload::Unbound) || (!args.threads.is_empty() && args.threads.iter().all(|&t| t > 0)),
        "--threads must name thread counts above 0"
    );
    let proxy_bin = binary(&args.proxy_bin, "ferrata-proxy")?;
    let tc_bin = binary(&args.tc_bin, "ferrata-tc")?;

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.bench_threads > 0 {
        runtime.worker_threads(args.bench_threads);
    }
    let runtime = runtime.enable_all().build()?;

    let started = Instant::now();
    let options = MariaDbOptions {
        extra_args: vec![format!("--innodb-buffer-pool-size={}", args.buffer_pool)],
        tls: None,
    };
    let (db_a, db_b) = runtime
        .block_on(async { tokio::try_join!(MariaDb::start_with(options.clone()), MariaDb::start_with(options)) })?;
    let server_version: String = runtime.block_on(async {
        let mut conn = db_a.conn().await?;
        let version = conn.query_first("SELECT VERSION()").await?;
        conn.disconnect().await?;
        anyhow::Ok(version.unwrap_or_default())
    })?;
    ferrata_bench::print_machine(&server_version)?;
    println!("  load avg:  {}", load_average());

    let tc_data = tempfile::Builder::new()
        .prefix("ferrata-at-bench-tc-")
        .tempdir_in(args.data_parent.clone().unwrap_or_else(std::env::temp_dir))
        .context("creating the coordinator's data directory")?;
    // Tables stop being guarded a quarter second after their last AT transaction (the default
    // is 10 s): an XA side starts once the AT side's guards are gone (see `Env::side`), so it
    // measures XA alone, not the row checks its writes get while AT rows may be held.
    let tc_config = tc_data.path().join("tc.toml");
    let etcd = runtime.block_on(args.store.start_etcd())?;
    let mut toml = "[transactions]\nguard_linger_ms = 250\n".to_owned();
    if let Some(etcd) = &etcd {
        toml += &format!("[etcd]\nendpoints = {:?}\n", etcd.endpoints());
    }
    std::fs::write(&tc_config, toml).context("writing the coordinator's config")?;
    let mut cmd = Command::new(&tc_bin);
    cmd.arg("--config").arg(&tc_config);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--log-level",
        TC_LOG,
    ])
    .arg("--data-dir")
    .arg(tc_data.path())
    .args(&args.tc_args)
    .env("NO_COLOR", "1")
    .env_remove("FERRATA_TC_TOKEN");
    let (tc, line) = LoggedChild::spawn("ferrata-tc", cmd, "ferrata-tc serving", &[])?;
    let (tc_rpc, _) = parse_serving(&line).with_context(|| format!("no addresses in {line:?}"))?;
    let proxy_a = Proxy::start("proxy A", &proxy_bin, db_a.addr(), Some(tc_rpc), &args)?;
    let proxy_b = Proxy::start("proxy B", &proxy_bin, db_b.addr(), Some(tc_rpc), &args)?;

    print_settings(&args, &proxy_bin, &tc_bin, tc_data.path());

    let etcd_pids = etcd.as_ref().map(EtcdCluster::pids).unwrap_or_default();
    let mut env = runtime.block_on(Env::new(args, (tc, etcd_pids), proxy_a, proxy_b, db_a, db_b, proxy_bin))?;
    let result = runtime.block_on(env.run_workloads());
    if let Err(err) = result {
        return Err(err.context(env.log_tails()));
    }
    env.print_warnings();
    println!("\ntotal {:.0} s", started.elapsed().as_secs_f64());
    drop(env);
    drop(etcd);
    drop(tc_data);
    Ok(())
}

/// `explicit`, or `name` next to this binary; it must exist.
fn binary(explicit: &Option<PathBuf>, name: &str) -> Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name(name),
    };
    ensure!(
        path.is_file(),
        "{} not found; build it with `cargo build --release -p ferrata-proxy -p ferrata-tc -p ferrata-bench` \
         (bench/at.sh does) or pass --proxy-bin/--tc-bin",
        path.display()
    );
    Ok(path)
}

fn print_settings(args: &Args, proxy_bin: &Path, tc_bin: &Path, tc_data: &Path) {
    let extra = |flags: &[String]| flags.iter().map(|f| format!(" {f}")).collect::<String>();
    println!("  proxy:     {}{}", proxy_bin.display(), extra(&args.proxy_args));
    let store = match args.store {
        StoreKind::Redb => format!("store in {}", tc_data.display()),
        etcd => format!("store on {}, CPU counted with the coordinator's", etcd.name()),
    };
    println!("  tc:        {}{} ({store})", tc_bin.display(), extra(&args.tc_args));
    println!(
        "settings: workloads {:?}; {} rounds x {} s per side, warm-up {} s per side; transfer clients {:?}, \
         hot clients {}, sysbench threads {:?} ({} tables x {} rows); {} accounts per server; UPDATEs as {}; \
         lock_wait_ms {}; buffer pool {}; driver runtime {} worker threads",
        args.workloads,
        args.rounds,
        args.time,
        args.warmup,
        args.clients,
        args.hot_clients,
        args.threads,
        args.tables,
        args.table_size,
        args.accounts,
        if args.text {
            "text queries"
        } else {
            "prepared statements"
        },
        args.lock_wait_ms,
        args.buffer_pool,
        if args.bench_threads > 0 {
            args.bench_threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        },
    );
}

/// A `ferrata-proxy` process with a generated config file.
struct Proxy {
    name: &'static str,
    proc: LoggedChild,
    addr: SocketAddr,
    admin: SocketAddr,
    _config: tempfile::TempDir,
}

impl Proxy {
    /// Starts a proxy in front of `backend`; with `tc`, attached to that coordinator with the
    /// app user as its service user (password from the environment, as in production).
    fn start(
        name: &'static str,
        bin: &Path,
        backend: SocketAddr,
        tc: Option<SocketAddr>,
        args: &Args,
    ) -> Result<Proxy> {
        let dir = tempfile::Builder::new().prefix("ferrata-at-bench-proxy-").tempdir()?;
        let path = dir.path().join("proxy.toml");
        let mut toml = format!("listen = \"127.0.0.1:0\"\nbackend = \"{backend}\"\nadmin_listen = \"127.0.0.1:0\"\n");
        if let Some(tc) = tc {
            toml += &format!(
                "[coordinator]\nendpoints = [\"{tc}\"]\nlock_wait_ms = {}\n[service]\nuser = \"{APP_USER}\"\n",
                args.lock_wait_ms
            );
        }
        toml += &format!("[log]\nlevel = \"{PROXY_LOG}\"\n");
        std::fs::write(&path, toml)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&path)
            .args(&args.proxy_args)
            .env("FERRATA_SERVICE_PASSWORD", APP_PASSWORD)
            .env_remove("FERRATA_TC_TOKEN")
            .env("NO_COLOR", "1");
        const ATTACHED: &str = "attached to the coordinator";
        let (mut proc, line) = LoggedChild::spawn(name, cmd, "ferrata-proxy ready", &[ATTACHED])?;
        let addr = addr_after(&line, "listen=").with_context(|| format!("no listen= in {line:?}"))?;
        let admin = addr_after(&line, "admin=").with_context(|| format!("no admin= in {line:?}"))?;
        if tc.is_some() && proc.wait_for(ATTACHED, Duration::from_secs(10))?.is_none() {
            println!("note: {name} did not log {ATTACHED:?} within 10 s; going on");
        }
        Ok(Proxy {
            name,
            proc,
            addr,
            admin,
            _config: dir,
        })
    }

    async fn metrics(&self) -> Result<String> {
        http_get(self.admin, "/metrics")
            .await
            .with_context(|| format!("reading {}'s /metrics", self.name))
    }
}

/// One open connection and how to open it again.
struct Link {
    conn: Conn,
    addr: SocketAddr,
}

impl Link {
    async fn connect(addr: SocketAddr) -> Result<Link> {
        let conn = Conn::new(ferrata_testkit::app_opts(addr))
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        Ok(Link { conn, addr })
    }

    /// Replaces the connection (after a cleanup statement failed, the session may still be
    /// bound to a global transaction).
    async fn reconnect(&mut self) -> Result<()> {
        let fresh = Link::connect(self.addr).await?;
        let old = std::mem::replace(&mut self.conn, fresh.conn);
        // The old session may be in any state; closing it is all that is wanted.
        let _ = old.disconnect().await;
        Ok(())
    }

    /// Runs a cleanup statement (LEAVE, ROLLBACK GLOBAL, ROLLBACK). A server error is noted
    /// and the connection replaced; a broken connection ends the run. True if it succeeded.
    async fn cleanup(&mut self, sql: &str, tally: &mut Tally) -> Result<bool> {
        match self.conn.query_drop(sql).await {
            Ok(()) => Ok(true),
            Err(mysql_async::Error::Server(e)) => {
                tally.note_error(&format!("cleanup {sql}"), e.code, &e.message);
                tally.reconnects += 1;
                self.reconnect().await?;
                Ok(false)
            }
            Err(e) => Err(anyhow!(e).context(format!("{sql} on {}", self.addr))),
        }
    }
}

async fn debit_or_credit(conn: &mut Conn, text: bool, credit: bool, id: u32) -> Result<(), mysql_async::Error> {
    let sql = if credit { CREDIT } else { DEBIT };
    if text {
        conn.query_drop(sql.replace('?', &id.to_string())).await
    } else {
        conn.exec_drop(sql, (id,)).await
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Side {
    /// Global transactions through the proxies, AT branches.
    At,
    /// Global transactions through the proxies, XA branches.
    Xa,
    /// Local transactions straight to the servers.
    Direct,
    /// Local transactions through proxy A (the outbox workload's reference).
    Proxy,
    /// Local transactions through proxy A, each writing a message to the outbox.
    Outbox,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::At => "at",
            Side::Xa => "xa",
            Side::Direct => "direct",
            Side::Proxy => "proxy",
            Side::Outbox => "outbox",
        }
    }

    /// Through the proxies, in global transactions.
    fn global(self) -> bool {
        matches!(self, Side::At | Side::Xa)
    }

    /// The MODE clause of START and JOIN GLOBAL TRANSACTION.
    fn mode(self) -> &'static str {
        match self {
            Side::Xa => " MODE XA",
            _ => "",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    Transfer(Side),
    Hot(Side),
    Outbox(Side),
}

impl Job {
    /// The timed statements of one iteration, in order.
    fn steps(self) -> &'static [&'static str] {
        match self {
            Job::Transfer(Side::At | Side::Xa) => &[
                "START@A",
                "UPDATE@A",
                "JOIN@B",
                "UPDATE@B",
                "LEAVE@B",
                "COMMIT GLOBAL@A",
            ],
            Job::Transfer(_) => &["BEGIN@A", "UPDATE@A", "COMMIT@A", "BEGIN@B", "UPDATE@B", "COMMIT@B"],
            Job::Hot(Side::At | Side::Xa) => &["START", "UPDATE", "COMMIT GLOBAL"],
            Job::Hot(_) | Job::Outbox(Side::Direct | Side::Proxy) => &["BEGIN", "UPDATE", "COMMIT"],
            Job::Outbox(_) => &["BEGIN", "UPDATE", "INSERT outbox", "COMMIT"],
        }
    }

    fn side(self) -> Side {
        match self {
            Job::Transfer(side) | Job::Hot(side) | Job::Outbox(side) => side,
        }
    }
}

/// What the clients of one side saw in one run.
#[derive(Default)]
struct Tally {
    /// Iterations that succeeded and ended within the window.
    ok: u64,
    /// Their latencies, in nanoseconds.
    latencies: Vec<u64>,
    /// Per step: total nanoseconds and count, of every run of the step that succeeded.
    steps: Vec<(u64, u64)>,
    /// (statement, error code) -> (count, first message).
    errors: BTreeMap<(String, u16), (u64, String)>,
    /// Committed changes to the balances of A and B, window or not (for the final check).
    delta_a: i64,
    delta_b: i64,
    /// Connections replaced after a cleanup statement failed.
    reconnects: u64,
    /// Global transactions whose fate is unknown (their rollback failed).
    ambiguous: u64,
}

impl Tally {
    fn new(job: Job) -> Tally {
        Tally {
            steps: vec![(0, 0); job.steps().len()],
            ..Tally::default()
        }
    }

    fn step(&mut self, i: usize, since: Instant) {
        self.steps[i].0 += since.elapsed().as_nanos() as u64;
        self.steps[i].1 += 1;
    }

    fn note_error(&mut self, statement: &str, code: u16, message: &str) {
        let entry = self
            .errors
            .entry((statement.to_owned(), code))
            .or_insert_with(|| (0, message.to_owned()));
        entry.0 += 1;
    }

    fn error_count(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }

    fn lock_errors(&self) -> u64 {
        self.errors
            .iter()
            .filter(|((_, code), _)| matches!(code, 1205 | 1213))
            .map(|(_, (n, _))| n)
            .sum()
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.latencies.extend(other.latencies);
        if self.steps.len() < other.steps.len() {
            self.steps.resize(other.steps.len(), (0, 0));
        }
        for (mine, theirs) in self.steps.iter_mut().zip(other.steps) {
            mine.0 += theirs.0;
            mine.1 += theirs.1;
        }
        for (key, (n, message)) in other.errors {
            self.errors.entry(key).or_insert((0, message)).0 += n;
        }
        self.delta_a += other.delta_a;
        self.delta_b += other.delta_b;
        self.reconnects += other.reconnects;
        self.ambiguous += other.ambiguous;
    }
}

/// How far a ferrata iteration got, for its cleanup.
#[derive(Default)]
struct Progress {
    began: bool,
    joined: bool,
}

/// One client: its connections (kept open across rounds) and its random ids.
struct Client {
    rng: u64,
    accounts: u32,
    text: bool,
    proxy_a: Link,
    proxy_b: Option<Link>,
    direct_a: Link,
    direct_b: Option<Link>,
    /// The outbox workload's receiver URL, and the instant its payloads count from.
    receiver: Option<(String, Instant)>,
}

impl Client {
    /// The next uniform id in 1..=accounts (splitmix64).
    fn pick(&mut self) -> u32 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z % u64::from(self.accounts)) as u32 + 1
    }

    /// One iteration of `job`: Ok(true) if it committed, Ok(false) if a statement failed with
    /// a server error (counted, cleaned up), Err if the run cannot go on.
    async fn once(&mut self, job: Job, tally: &mut Tally) -> Result<bool> {
        match job {
            Job::Transfer(Side::Direct) => self.transfer_direct(tally).await,
            Job::Transfer(side) => self.transfer_global(side, tally).await,
            Job::Hot(Side::Direct) => self.hot_direct(tally).await,
            Job::Hot(side) => self.hot_global(side, tally).await,
            Job::Outbox(side) => self.with_message(side, tally).await,
        }
    }

    async fn transfer_global(&mut self, side: Side, tally: &mut Tally) -> Result<bool> {
        let (from, to) = (self.pick(), self.pick());
        let text = self.text;
        let b = self.proxy_b.as_mut().context("no connection to proxy B")?;
        let a = &mut self.proxy_a;
        let mut progress = Progress::default();
        let mut failed_at = 0;
        let result = async {
            let t = Instant::now();
            let xid: Option<String> = a
                .conn
                .query_first(format!("START GLOBAL TRANSACTION{}", side.mode()))
                .await?;
            let xid = xid.unwrap_or_default();
            progress.began = true;
            tally.step(0, t);
            failed_at = 1;
            let t = Instant::now();
            debit_or_credit(&mut a.conn, text, false, from).await?;
            tally.step(1, t);
            failed_at = 2;
            let t = Instant::now();
            b.conn
                .query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}'{}", side.mode()))
                .await?;
            progress.joined = true;
            tally.step(2, t);
            failed_at = 3;
            let t = Instant::now();
            debit_or_credit(&mut b.conn, text, true, to).await?;
            tally.step(3, t);
            failed_at = 4;
            let t = Instant::now();
            b.conn.query_drop("LEAVE GLOBAL TRANSACTION").await?;
            progress.joined = false;
            tally.step(4, t);
            failed_at = 5;
            let t = Instant::now();
            a.conn.query_drop("COMMIT GLOBAL").await?;
            tally.step(5, t);
            Ok::<_, mysql_async::Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                tally.delta_a -= 1;
                tally.delta_b += 1;
                Ok(true)
            }
            Err(mysql_async::Error::Server(e)) => {
                tally.note_error(Job::Transfer(side).steps()[failed_at], e.code, &e.message);
                if progress.joined {
                    b.cleanup("LEAVE GLOBAL TRANSACTION", tally).await?;
                }
                if progress.began && !a.cleanup("ROLLBACK GLOBAL", tally).await? {
                    tally.ambiguous += 1;
                }
                Ok(false)
            }
            Err(e) => Err(anyhow!(e).context(format!(
                "{} of a transfer through the proxies ({})",
                Job::Transfer(side).steps()[failed_at],
                side.name()
            ))),
        }
    }

    /// BEGIN; UPDATE; COMMIT on `link`, timed as steps `first`.. of `job`.
    async fn local_update(
        link: &mut Link,
        text: bool,
        credit: bool,
        id: u32,
        job: Job,
        first: usize,
        tally: &mut Tally,
    ) -> Result<bool> {
        Self::local_update_with(link, (text, credit, id), None, job, first, tally).await
    }

    /// BEGIN; UPDATE (`text`, `credit`, `id`); [the INSERT of `message`, (target, payload),
    /// into the outbox;] COMMIT on `link`, timed as steps `first`.. of `job`.
    async fn local_update_with(
        link: &mut Link,
        (text, credit, id): (bool, bool, u32),
        message: Option<(&str, String)>,
        job: Job,
        first: usize,
        tally: &mut Tally,
    ) -> Result<bool> {
        let mut failed_at = first;
        let result = async {
            let t = Instant::now();
            link.conn.query_drop("BEGIN").await?;
            tally.step(failed_at, t);
            failed_at += 1;
            let t = Instant::now();
            debit_or_credit(&mut link.conn, text, credit, id).await?;
            tally.step(failed_at, t);
            failed_at += 1;
            if let Some((target, payload)) = message {
                let t = Instant::now();
                link.conn
                    .exec_drop(
                        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, ?)",
                        (target, payload),
                    )
                    .await?;
                tally.step(failed_at, t);
                failed_at += 1;
            }
            let t = Instant::now();
            link.conn.query_drop("COMMIT").await?;
            tally.step(failed_at, t);
            Ok::<_, mysql_async::Error>(())
        }
        .await;
        match result {
            Ok(()) => Ok(true),
            Err(mysql_async::Error::Server(e)) => {
                tally.note_error(job.steps()[failed_at], e.code, &e.message);
                link.cleanup("ROLLBACK", tally).await?;
                Ok(false)
            }
            Err(e) => Err(anyhow!(e).context(format!("{} directly", job.steps()[failed_at]))),
        }
    }

    async fn transfer_direct(&mut self, tally: &mut Tally) -> Result<bool> {
        let (from, to) = (self.pick(), self.pick());
        let job = Job::Transfer(Side::Direct);
        if !Self::local_update(&mut self.direct_a, self.text, false, from, job, 0, tally).await? {
            return Ok(false);
        }
        tally.delta_a -= 1;
        let b = self.direct_b.as_mut().context("no connection to server B")?;
        if !Self::local_update(b, self.text, true, to, job, 3, tally).await? {
            return Ok(false);
        }
        tally.delta_b += 1;
        Ok(true)
    }

    async fn hot_global(&mut self, side: Side, tally: &mut Tally) -> Result<bool> {
        let text = self.text;
        let a = &mut self.proxy_a;
        let mut began = false;
        let mut failed_at = 0;
        let result = async {
            let t = Instant::now();
            a.conn
                .query_drop(format!("START GLOBAL TRANSACTION{}", side.mode()))
                .await?;
            began = true;
            tally.step(0, t);
            failed_at = 1;
            let t = Instant::now();
            debit_or_credit(&mut a.conn, text, true, 1).await?;
            tally.step(1, t);
            failed_at = 2;
            let t = Instant::now();
            a.conn.query_drop("COMMIT GLOBAL").await?;
            tally.step(2, t);
            Ok::<_, mysql_async::Error>(())
        }
        .await;
        let job = Job::Hot(side);
        match result {
            Ok(()) => {
                tally.delta_a += 1;
                Ok(true)
            }
            Err(mysql_async::Error::Server(e)) => {
                tally.note_error(job.steps()[failed_at], e.code, &e.message);
                if began && !a.cleanup("ROLLBACK GLOBAL", tally).await? {
                    tally.ambiguous += 1;
                }
                Ok(false)
            }
            Err(e) => Err(anyhow!(e).context(format!("{} of a hot-row transaction", job.steps()[failed_at]))),
        }
    }

    /// One local transaction of the outbox workload on `side`.
    async fn with_message(&mut self, side: Side, tally: &mut Tally) -> Result<bool> {
        let id = self.pick();
        let (target, epoch) = self.receiver.clone().context("no receiver")?;
        let message = (side == Side::Outbox).then(|| (target.as_str(), epoch.elapsed().as_nanos().to_string()));
        let link = match side {
            Side::Direct => &mut self.direct_a,
            _ => &mut self.proxy_a,
        };
        let update = (self.text, true, id);
        let committed = Self::local_update_with(link, update, message, Job::Outbox(side), 0, tally).await?;
        if committed {
            tally.delta_a += 1;
        }
        Ok(committed)
    }

    async fn hot_direct(&mut self, tally: &mut Tally) -> Result<bool> {
        let job = Job::Hot(Side::Direct);
        let committed = Self::local_update(&mut self.direct_a, self.text, true, 1, job, 0, tally).await?;
        if committed {
            tally.delta_a += 1;
        }
        Ok(committed)
    }

    async fn disconnect(self) {
        let links = [Some(self.proxy_a), self.proxy_b, Some(self.direct_a), self.direct_b];
        for link in links.into_iter().flatten() {
            // The servers and proxies outlive this; a failed goodbye changes nothing.
            let _ = link.conn.disconnect().await;
        }
    }
}

/// Runs `job` on every client for `secs` seconds; returns the clients and what they saw.
async fn drive(clients: Vec<Client>, job: Job, secs: u64) -> Result<(Vec<Client>, Tally)> {
    let end = Instant::now() + Duration::from_secs(secs);
    let handles: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut tally = Tally::new(job);
                let mut consecutive_errors = 0;
                while Instant::now() < end {
                    let began = Instant::now();
                    if client.once(job, &mut tally).await? {
                        consecutive_errors = 0;
                        let done = Instant::now();
                        if done <= end {
                            tally.ok += 1;
                            tally.latencies.push((done - began).as_nanos() as u64);
                        }
                    } else {
                        consecutive_errors += 1;
                        ensure!(
                            consecutive_errors < MAX_CONSECUTIVE_ERRORS,
                            "a client failed {consecutive_errors} times in a row: {:?}",
                            tally.errors
                        );
                    }
                }
                anyhow::Ok((client, tally))
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(handles.len());
    let mut total = Tally::new(job);
    let mut first_error = None;
    for handle in handles {
        match handle.await.context("a client task panicked")? {
            Ok((client, tally)) => {
                clients.push(client);
                total.merge(tally);
            }
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    match first_error {
        Some(err) => Err(err.context(format!("{job:?}"))),
        None => Ok((clients, total)),
    }
}

/// The name [`Env::statement_counters`] gives the proxies' round trips to the servers.
const PROXY_ROUND_TRIPS: &str = "proxy_round_trips";

/// One side's run in one round.
struct SideRun {
    job: Job,
    tally: Tally,
    tps: f64,
    /// CPU microseconds per successful iteration, by [`CPU_GROUPS`] (phase 2 included).
    cpu_us: Vec<f64>,
    /// Undo records left at the end of the window, and how long phase 2 took to delete them.
    phase2: Option<(u64, Option<f64>)>,
    /// Growth of the servers' `Questions` and `Com_*` counters (A and B together, phase 2
    /// included), by counter.
    statements: BTreeMap<String, u64>,
    /// Of the iterations that succeeded within the window.
    latency: Latency,
}

/// Balances the committed transfers and increments should have left.
#[derive(Default)]
struct Ledger {
    delta_a: i64,
    delta_b: i64,
    ambiguous: u64,
    touched: bool,
}

/// Everything the workloads run against. Fields drop in order: proxies and the coordinator
/// before the servers.
struct Env {
    args: Args,
    proxy_a: Proxy,
    proxy_b: Proxy,
    tc: LoggedChild,
    /// The etcd members the coordinator's store is on (none with the embedded store).
    etcd_pids: Vec<u32>,
    monitor_a: Conn,
    monitor_b: Conn,
    db_a: MariaDb,
    db_b: MariaDb,
    proxy_bin: PathBuf,
    ledger: Ledger,
    summary: Vec<String>,
    accounts_ready: bool,
    /// The outbox workload's HTTP receiver, and the instant its payloads count from.
    receiver: Option<(Service, Instant)>,
    /// Messages committed by the outbox side so far (warm-ups included).
    messages_committed: u64,
}

impl Env {
    async fn new(
        args: Args,
        (tc, etcd_pids): (LoggedChild, Vec<u32>),
        proxy_a: Proxy,
        proxy_b: Proxy,
        db_a: MariaDb,
        db_b: MariaDb,
        proxy_bin: PathBuf,
    ) -> Result<Env> {
        Ok(Env {
            monitor_a: db_a.conn().await?,
            monitor_b: db_b.conn().await?,
            args,
            proxy_a,
            proxy_b,
            tc,
            etcd_pids,
            db_a,
            db_b,
            proxy_bin,
            ledger: Ledger::default(),
            summary: Vec::new(),
            accounts_ready: false,
            receiver: None,
            messages_committed: 0,
        })
    }

    async fn run_workloads(&mut self) -> Result<()> {
        let workloads = self.args.workloads.clone();
        for workload in workloads {
            match workload {
                Workload::Transfer => {
                    self.create_accounts().await?;
                    for clients in self.args.clients.clone() {
                        self.transfer(clients).await?;
                    }
                }
                Workload::Hot => {
                    self.create_accounts().await?;
                    self.hot().await?;
                }
                Workload::Unbound => self.unbound().await?,
                Workload::Outbox => {
                    self.create_accounts().await?;
                    for clients in self.args.clients.clone() {
                        self.outbox(clients).await?;
                    }
                }
            }
        }
        if self.ledger.touched {
            self.check_balances().await?;
        }
        println!("\nsummary (medians over rounds)");
        for line in &self.summary {
            println!("  {line}");
        }
        Ok(())
    }

    /// test.account with `--accounts` rows on both servers, created once, straight on the
    /// servers.
    async fn create_accounts(&mut self) -> Result<()> {
        if self.accounts_ready {
            return Ok(());
        }
        let started = Instant::now();
        for conn in [&mut self.monitor_a, &mut self.monitor_b] {
            conn.query_drop("DROP TABLE IF EXISTS account").await?;
            conn.query_drop("CREATE TABLE account (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
                .await?;
            let ids: Vec<u32> = (1..=self.args.accounts).collect();
            for chunk in ids.chunks(1_000) {
                let values: Vec<String> = chunk.iter().map(|id| format!("({id},{INITIAL_BALANCE})")).collect();
                conn.query_drop(format!("INSERT INTO account (id, balance) VALUES {}", values.join(",")))
                    .await?;
            }
        }
        println!(
            "\ncreated test.account with {} rows on each server in {:.1} s",
            self.args.accounts,
            started.elapsed().as_secs_f64()
        );
        self.accounts_ready = true;
        Ok(())
    }

    async fn connect_clients(&self, n: usize, both_servers: bool) -> Result<Vec<Client>> {
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            clients.push(Client {
                rng: 0x5eed_0000 + i as u64 * 7919,
                accounts: self.args.accounts,
                text: self.args.text,
                proxy_a: Link::connect(self.proxy_a.addr).await?,
                proxy_b: match both_servers {
                    true => Some(Link::connect(self.proxy_b.addr).await?),
                    false => None,
                },
                direct_a: Link::connect(self.db_a.addr()).await?,
                direct_b: match both_servers {
                    true => Some(Link::connect(self.db_b.addr()).await?),
                    false => None,
                },
                receiver: self
                    .receiver
                    .as_ref()
                    .map(|(service, epoch)| (format!("{}/ok/message", service.base), *epoch)),
            });
        }
        Ok(clients)
    }

    fn cpu(&self) -> Result<Vec<f64>> {
        let sum = |pids: &[u32]| -> Result<f64> { pids.iter().map(|&p| process_cpu_seconds(p)).sum() };
        Ok(vec![
            sum(&[self.db_a.pid(), self.db_b.pid()])?,
            sum(&[self.proxy_a.proc.pid(), self.proxy_b.proc.pid()])?,
            self.tc.cpu_seconds()? + sum(&self.etcd_pids)?,
            process_cpu_seconds(std::process::id())?,
        ])
    }

    /// Undo records of unfinished phase 2 (log_status 0) on a server; 0 before the proxy
    /// created undo_log.
    async fn undo_rows(conn: &mut Conn) -> Result<u64> {
        match conn
            .query_first::<u64, _>("SELECT COUNT(*) FROM undo_log WHERE log_status = 0")
            .await
        {
            Ok(n) => Ok(n.unwrap_or(0)),
            Err(mysql_async::Error::Server(e)) if e.code == 1146 => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Ferrata's prepared XA branches on a server (`XA RECOVER`, Ferrata's format id).
    async fn prepared_branches(conn: &mut Conn) -> Result<u64> {
        let rows: Vec<(i64, i64, i64, Vec<u8>)> = conn.query("XA RECOVER").await?;
        Ok(rows.iter().filter(|r| r.0 == XA_FORMAT_ID).count() as u64)
    }

    /// Waits until phase 2 has deleted every undo record and finished every prepared XA
    /// branch; (what was left at the start, seconds taken or None after DRAIN_TIMEOUT).
    async fn drain_phase2(&mut self) -> Result<(u64, Option<f64>)> {
        let started = Instant::now();
        let mut first = None;
        loop {
            let mut n = 0;
            for conn in [&mut self.monitor_a, &mut self.monitor_b] {
                n += Self::undo_rows(conn).await? + Self::prepared_branches(conn).await?;
            }
            first.get_or_insert(n);
            if n == 0 {
                return Ok((first.unwrap_or(0), Some(started.elapsed().as_secs_f64())));
            }
            if started.elapsed() > DRAIN_TIMEOUT {
                return Ok((first.unwrap_or(0), None));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the receiver got every message the outbox side committed; (how many were
    /// missing at the start, seconds taken or None after DRAIN_TIMEOUT).
    async fn drain_messages(&self) -> Result<(u64, Option<f64>)> {
        let (receiver, _) = self.receiver.as_ref().context("no receiver")?;
        let started = Instant::now();
        let missing = || self.messages_committed.saturating_sub(receiver.count() as u64);
        let first = missing();
        while missing() > 0 {
            if started.elapsed() > DRAIN_TIMEOUT {
                return Ok((first, None));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok((first, Some(started.elapsed().as_secs_f64())))
    }

    /// The servers' `Questions` and nonzero `Com_*` counters, A and B added up, with the
    /// round trips proxies A and B made to them (`proxy_round_trips`).
    async fn statement_counters(&mut self) -> Result<BTreeMap<String, u64>> {
        let mut counters = BTreeMap::new();
        for proxy in [&self.proxy_a, &self.proxy_b] {
            let text = proxy.metrics().await?;
            let trips: f64 = metric_samples(&text, "ferrata_proxy_backend_round_trips_total")
                .iter()
                .map(|(_, v)| v)
                .sum();
            *counters.entry(PROXY_ROUND_TRIPS.to_owned()).or_insert(0) += trips as u64;
        }
        for conn in [&mut self.monitor_a, &mut self.monitor_b] {
            let rows: Vec<(String, String)> = conn
                .query(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Innodb_os_log_fsyncs') \
                     OR Variable_name LIKE 'Com\\_%'",
                )
                .await?;
            for (name, value) in rows {
                if let Ok(v) = value.parse::<u64>()
                    && v > 0
                {
                    *counters.entry(name.to_lowercase()).or_insert(0) += v;
                }
            }
        }
        Ok(counters)
    }

    /// Waits until neither proxy shows a guarded table (after an AT side, the coordinator
    /// releases them once they are idle for its guard linger).
    async fn until_unguarded(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            let mut guarded = 0.0;
            for proxy in [&self.proxy_a, &self.proxy_b] {
                let text = proxy.metrics().await?;
                guarded += metric_samples(&text, "ferrata_proxy_guarded_tables")
                    .iter()
                    .map(|(_, v)| v)
                    .sum::<f64>();
            }
            if guarded == 0.0 {
                return Ok(());
            }
            ensure!(
                started.elapsed() < DRAIN_TIMEOUT,
                "tables stayed guarded for {DRAIN_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs one side for `secs`, drains phase 2 after a global side, and books the balances.
    async fn side(&mut self, clients: Vec<Client>, job: Job, secs: u64) -> Result<(Vec<Client>, SideRun)> {
        if job.side() == Side::Xa {
            self.until_unguarded().await?;
        }
        let statements_before = self.statement_counters().await?;
        let cpu_before = self.cpu()?;
        let (clients, tally) = drive(clients, job, secs).await?;
        let phase2 = match job {
            _ if job.side().global() => Some(self.drain_phase2().await?),
            Job::Outbox(Side::Outbox) => {
                self.messages_committed += tally.steps.last().map_or(0, |s| s.1);
                Some(self.drain_messages().await?)
            }
            _ => None,
        };
        let cpu_after = self.cpu()?;
        let statements = self
            .statement_counters()
            .await?
            .into_iter()
            .map(|(name, v)| {
                let before = statements_before.get(&name).copied().unwrap_or(0);
                (name, v.saturating_sub(before))
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        for proc in [&mut self.proxy_a.proc, &mut self.proxy_b.proc, &mut self.tc] {
            proc.ensure_running()?;
        }
        self.ledger.delta_a += tally.delta_a;
        self.ledger.delta_b += tally.delta_b;
        self.ledger.ambiguous += tally.ambiguous;
        self.ledger.touched = true;
        // Per iteration that succeeded, window or not: the CPU clocks see all of them.
        let per = tally.steps.last().map_or(0, |s| s.1).max(1) as f64;
        let run = SideRun {
            job,
            tps: tally.ok as f64 / secs as f64,
            cpu_us: cpu_after
                .iter()
                .zip(&cpu_before)
                .map(|(a, b)| (a - b) * 1e6 / per)
                .collect(),
            phase2,
            statements,
            latency: Latency::of(&mut tally.latencies.clone()),
            tally,
        };
        Ok((clients, run))
    }

    /// Warm-up (unmeasured) and `--rounds` rounds of every side of a workload, rotating
    /// which goes first.
    async fn interleaved(
        &mut self,
        mut clients: Vec<Client>,
        jobs: &[Job],
    ) -> Result<(Vec<Client>, Vec<Vec<SideRun>>)> {
        if self.args.warmup > 0 {
            let mut line = Vec::new();
            for &job in jobs {
                let (back, run) = self.side(clients, job, self.args.warmup).await?;
                clients = back;
                line.push(format!(
                    "{} {:.1}/s ({} errors)",
                    job.side().name(),
                    run.tps,
                    run.tally.error_count()
                ));
            }
            println!("warm-up: {}", line.join(", "));
        }
        let mut rounds = Vec::with_capacity(self.args.rounds);
        for round in 0..self.args.rounds {
            let mut runs: Vec<Option<SideRun>> = jobs.iter().map(|_| None).collect();
            for k in 0..jobs.len() {
                let i = (round + k) % jobs.len();
                let (back, run) = self.side(clients, jobs[i], self.args.time).await?;
                clients = back;
                runs[i] = Some(run);
            }
            rounds.push(runs.into_iter().map(|r| r.expect("every side ran")).collect());
        }
        Ok((clients, rounds))
    }

    /// The sides of transfer and hot, global ones first, direct (the reference) last.
    fn sides(&self) -> Vec<Side> {
        let mut sides: Vec<Side> = Vec::new();
        for side in &self.args.sides {
            if !sides.contains(side) {
                sides.push(*side);
            }
        }
        sides.sort_by_key(|s| !s.global());
        sides
    }

    async fn transfer(&mut self, n: usize) -> Result<()> {
        println!(
            "\n== transfer, {n} clients, {} s per side and round: at = START GLOBAL TRANSACTION, UPDATE -1 \
             (proxy A), JOIN, UPDATE +1, LEAVE (proxy B), COMMIT GLOBAL (proxy A); xa = the same with MODE XA; \
             direct = BEGIN, UPDATE -1, COMMIT on A, then BEGIN, UPDATE +1, COMMIT on B",
            self.args.time
        );
        let clients = self.connect_clients(n, true).await?;
        let jobs: Vec<Job> = self.sides().into_iter().map(Job::Transfer).collect();
        let (clients, rounds) = self.interleaved(clients, &jobs).await?;
        for client in clients {
            client.disconnect().await;
        }
        let ratios = print_rounds("tx/s", &rounds);
        let mut parts = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let tps = median(rounds.iter().map(|r| r[i].tps).collect());
            parts.push(match (job.side(), ratios[i]) {
                (Side::At, Some(r)) => format!(
                    "at {tps:.1}/s (ratio {r:.3}; {})",
                    verdict(r >= TRANSFER_TARGET, &format!("target ratio >= {TRANSFER_TARGET:.2}"))
                ),
                (side, Some(r)) => format!("{} {tps:.1}/s (ratio {r:.3})", side.name()),
                (side, None) => format!("{} {tps:.1}/s", side.name()),
            });
        }
        self.summary.push(format!(
            "transfer {n:>2} clients: {} (ratios to direct)",
            parts.join(", ")
        ));
        Ok(())
    }

    async fn hot(&mut self) -> Result<()> {
        let n = self.args.hot_clients;
        println!(
            "\n== hot row, {n} clients, {} s per side and round: at = START GLOBAL TRANSACTION, UPDATE \
             account SET balance = balance + 1 WHERE id = 1, COMMIT GLOBAL (proxy A); xa = the same with MODE XA; \
             direct = BEGIN, the same UPDATE, COMMIT on A",
            self.args.time
        );
        let clients = self.connect_clients(n, false).await?;
        let jobs: Vec<Job> = self.sides().into_iter().map(Job::Hot).collect();
        let (clients, rounds) = self.interleaved(clients, &jobs).await?;
        for client in clients {
            client.disconnect().await;
        }
        print_rounds("tx/s", &rounds);
        let mut parts = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let side = job.side();
            let tps = median(rounds.iter().map(|r| r[i].tps).collect());
            if !side.global() {
                parts.push(format!("direct {tps:.1}/s"));
                continue;
            }
            let mut all: Vec<u64> = rounds
                .iter()
                .flat_map(|r| r[i].tally.latencies.iter().copied())
                .collect();
            let all = Latency::of(&mut all);
            let lock_errors: u64 = rounds.iter().map(|r| r[i].tally.lock_errors()).sum();
            let target = match side {
                Side::At => format!(
                    "; {}",
                    verdict(tps >= HOT_TARGET, &format!("target >= {HOT_TARGET:.0} gtx/s"))
                ),
                _ => String::new(),
            };
            println!(
                "{}: {tps:.1} global transactions/s (median), latency over all rounds p50 {:.2} ms, p99 {:.2} ms, \
                 max {:.2} ms; lock errors (1205/1213) {lock_errors}{target}",
                side.name(),
                all.p50_ms,
                all.p99_ms,
                all.max_ms,
            );
            parts.push(format!(
                "{} {tps:.1} gtx/s (p50 {:.2} ms, p99 {:.2} ms, {lock_errors} lock errors{target})",
                side.name(),
                all.p50_ms,
                all.p99_ms,
            ));
        }
        self.summary
            .push(format!("hot row  {n:>2} clients: {}", parts.join(", ")));
        Ok(())
    }

    async fn outbox(&mut self, n: usize) -> Result<()> {
        println!(
            "\n== outbox, {n} clients, {} s per side and round: outbox = BEGIN, UPDATE +1, INSERT INTO \
             ferrata_outbox, COMMIT (proxy A; each message POSTed by the coordinator to a receiver here); proxy = \
             the same without the INSERT (proxy A); direct = the same without the INSERT on A",
            self.args.time
        );
        if self.receiver.is_none() {
            self.receiver = Some((Service::start().await?, Instant::now()));
        }
        let clients = self.connect_clients(n, false).await?;
        let jobs = [Side::Outbox, Side::Proxy, Side::Direct].map(Job::Outbox);
        let (clients, rounds) = self.interleaved(clients, &jobs).await?;
        for client in clients {
            client.disconnect().await;
        }
        print_rounds("tx/s", &rounds);
        let med = |f: &dyn Fn(&[SideRun]) -> f64| median(rounds.iter().map(|r| f(r)).collect());
        let tps = |i: usize| med(&|r| r[i].tps);
        let cost = med(&|r| r[0].tps / r[1].tps.max(f64::MIN_POSITIVE));
        let to_direct = med(&|r| r[0].tps / r[2].tps.max(f64::MIN_POSITIVE));
        // Committed messages over the window and the wait for the last of them.
        let secs = self.args.time as f64;
        let end_to_end = med(&|r| {
            let committed = r[0].tally.steps.last().map_or(0, |s| s.1) as f64;
            match r[0].phase2 {
                Some((_, Some(drained))) => committed / (secs + drained),
                _ => 0.0,
            }
        });
        let (receiver, epoch) = self.receiver.as_ref().context("no receiver")?;
        let epoch = tokio::time::Instant::from_std(*epoch);
        let mut to_receipt: Vec<u64> = receiver
            .calls()
            .iter()
            .filter_map(|call| {
                let began: u64 = call.body.parse().ok()?;
                let arrived = call.at.saturating_duration_since(epoch).as_nanos() as u64;
                Some(arrived.saturating_sub(began))
            })
            .collect();
        let to_receipt = Latency::of(&mut to_receipt);
        println!(
            "outbox: {:.1} tx/s against {:.1} without the message through the proxy (ratio {cost:.3}) and {:.1} \
             direct (ratio {to_direct:.3}); {end_to_end:.1} messages/s end to end (median); BEGIN to receipt \
             over every message so far p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            tps(0),
            tps(1),
            tps(2),
            to_receipt.p50_ms,
            to_receipt.p99_ms,
            to_receipt.max_ms,
        );
        self.summary.push(format!(
            "outbox   {n:>2} clients: outbox {:.1} tx/s (ratio {cost:.3} to proxy, {to_direct:.3} to direct), \
             {end_to_end:.1} messages/s end to end, BEGIN to receipt p50 {:.2} ms, p99 {:.2} ms",
            tps(0),
            to_receipt.p50_ms,
            to_receipt.p99_ms,
        ));
        Ok(())
    }

    async fn unbound(&mut self) -> Result<()> {
        let sysbench = Sysbench {
            tables: self.args.tables,
            table_size: self.args.table_size,
            extra_args: self.args.sysbench_args.clone(),
        };
        println!(
            "\n== unbound: sysbench oltp_read_write, {} tables x {} rows on server A, {} s per side and round; \
             plain = ferrata-proxy without a coordinator, checked = proxy A (coordinator configured, no global \
             transaction running), direct = server A",
            self.args.tables, self.args.table_size, self.args.time
        );
        let plain = tokio::task::block_in_place(|| {
            Proxy::start("plain proxy", &self.proxy_bin, self.db_a.addr(), None, &self.args)
        })?;
        let started = Instant::now();
        let port_a = self.db_a.port();
        tokio::task::block_in_place(|| sysbench.run("oltp_read_write", port_a, 1, None, "prepare"))?;
        println!("prepared in {:.1} s", started.elapsed().as_secs_f64());

        let sides = [
            ("direct", self.db_a.port(), None),
            ("plain", plain.addr.port(), Some(&plain)),
            ("checked", self.proxy_a.addr.port(), Some(&self.proxy_a)),
        ];
        let measure = |side: &(&str, u16, Option<&Proxy>), threads: u32, secs: u64| -> Result<Sample> {
            let (name, port, proxy) = *side;
            let cpu_before = proxy.map(|p| p.proc.cpu_seconds()).transpose()?;
            let output =
                tokio::task::block_in_place(|| sysbench.run("oltp_read_write", port, threads, Some(secs), "run"))
                    .with_context(|| match proxy {
                        Some(p) => format!("through the {name} proxy; its log:\n{}", p.proc.log_tail()),
                        None => "directly against server A".to_owned(),
                    })?;
            let mut sample = Sample::parse(&output)?;
            if let (Some(p), Some(before)) = (proxy, cpu_before) {
                let used = p.proc.cpu_seconds()? - before;
                sample.cpu_us_per_query = Some(used * 1e6 / (sample.qps * secs as f64).max(1.0));
            }
            Ok(sample)
        };

        let metrics_before = [plain.metrics().await?, self.proxy_a.metrics().await?];
        if self.args.warmup > 0 {
            for side in &sides {
                measure(side, self.args.threads[0], self.args.warmup)?;
            }
        }
        for &threads in &self.args.threads {
            let mut rounds: Vec<[Sample; 3]> = Vec::new();
            let mut firsts = Vec::new();
            for round in 0..self.args.rounds {
                let mut samples = [None; 3];
                for k in 0..3 {
                    let i = (round + k) % 3;
                    samples[i] = Some(measure(&sides[i], threads, self.args.time)?);
                }
                firsts.push(sides[round % 3].0);
                rounds.push(samples.map(|s| s.expect("every side measured")));
            }
            println!("\noltp_read_write, {threads} threads");
            println!(
                "{:>5}  {:<7}  | {:>10} {:>7} | {:>10} {:>7} {:>6} | {:>10} {:>7} {:>6} | {:>13} {:>13}",
                "round",
                "first",
                "direct tps",
                "p95 ms",
                "plain tps",
                "p95 ms",
                "cpu us",
                "checked tps",
                "p95 ms",
                "cpu us",
                "checked/plain",
                "plain/direct"
            );
            let row = |label: &str, first: &str, s: &[Sample; 3], cp: f64, pd: f64| {
                let cpu = |s: &Sample| s.cpu_us_per_query.map_or("-".to_owned(), |c| format!("{c:.1}"));
                println!(
                    "{label:>5}  {first:<7}  | {:>10.1} {:>7.2} | {:>10.1} {:>7.2} {:>6} | {:>10.1} {:>7.2} {:>6} | \
                     {cp:>13.3} {pd:>13.3}",
                    s[0].tps,
                    s[0].p95_ms,
                    s[1].tps,
                    s[1].p95_ms,
                    cpu(&s[1]),
                    s[2].tps,
                    s[2].p95_ms,
                    cpu(&s[2]),
                );
            };
            for (i, s) in rounds.iter().enumerate() {
                row(
                    &(i + 1).to_string(),
                    firsts[i],
                    s,
                    s[2].tps / s[1].tps,
                    s[1].tps / s[0].tps,
                );
            }
            let med = |i: usize, f: &dyn Fn(&Sample) -> f64| median(rounds.iter().map(|r| f(&r[i])).collect());
            let medians: [Sample; 3] = std::array::from_fn(|i| Sample {
                tps: med(i, &|s| s.tps),
                qps: med(i, &|s| s.qps),
                p95_ms: med(i, &|s| s.p95_ms),
                errors: rounds.iter().map(|r| r[i].errors).sum(),
                cpu_us_per_query: (i > 0).then(|| med(i, &|s| s.cpu_us_per_query.unwrap_or(f64::NAN))),
            });
            let checked_plain = median(rounds.iter().map(|r| r[2].tps / r[1].tps).collect());
            let plain_direct = median(rounds.iter().map(|r| r[1].tps / r[0].tps).collect());
            let checked_direct = median(rounds.iter().map(|r| r[2].tps / r[0].tps).collect());
            row("", "median", &medians, checked_plain, plain_direct);
            let errors: Vec<String> = sides
                .iter()
                .zip(&medians)
                .map(|(side, m)| format!("{} {}", side.0, m.errors))
                .collect();
            println!(
                "ratios are medians of the per-round ratios; checked/direct {checked_direct:.3}; cpu us = the proxy's \
                 CPU per query; sysbench ignored errors: {}; checked/plain {}",
                errors.join(", "),
                verdict(
                    checked_plain >= UNBOUND_TARGET,
                    &format!("target >= {UNBOUND_TARGET:.2}")
                )
            );
            self.summary.push(format!(
                "unbound  {threads:>2} threads: checked {:.1} tps, plain {:.1} tps, direct {:.1} tps; checked/plain \
                 {checked_plain:.3}, checked/direct {checked_direct:.3}; {}",
                medians[2].tps,
                medians[1].tps,
                medians[0].tps,
                verdict(
                    checked_plain >= UNBOUND_TARGET,
                    &format!("target >= {UNBOUND_TARGET:.2}")
                )
            ));
        }
        let metrics_after = [plain.metrics().await?, self.proxy_a.metrics().await?];
        println!(
            "\nproxies' write routes (ferrata_proxy_unbound_writes_total) and checks, during the unbound workload:"
        );
        for (i, name) in ["plain proxy (no coordinator)", "proxy A (checked)"].iter().enumerate() {
            for series in [
                "ferrata_proxy_unbound_writes_total",
                "ferrata_proxy_dirty_write_checks_total",
            ] {
                println!(
                    "  {name:<28} {series}: {}",
                    metric_delta(&metrics_before[i], &metrics_after[i], series)
                );
            }
        }
        let b = self.proxy_b.metrics().await?;
        println!(
            "  totals since start: proxy A {}; proxy B {}",
            metric_delta("", &metrics_after[1], "ferrata_proxy_unbound_writes_total"),
            metric_delta("", &b, "ferrata_proxy_unbound_writes_total")
        );
        let warnings = plain.proc.warnings();
        if !warnings.is_empty() {
            println!("plain proxy warnings ({}), first ones:", warnings.len());
            for line in warnings.iter().take(5) {
                println!("  {line}");
            }
        }
        Ok(())
    }

    async fn check_balances(&mut self) -> Result<()> {
        let (undo, drained) = self.drain_phase2().await?;
        let expected_each = i64::from(self.args.accounts) * INITIAL_BALANCE;
        let mut lines = Vec::new();
        let mut all_ok = true;
        for (name, conn, delta) in [
            ("A", &mut self.monitor_a, self.ledger.delta_a),
            ("B", &mut self.monitor_b, self.ledger.delta_b),
        ] {
            let sum: Option<i64> = conn
                .query_first("SELECT CAST(SUM(balance) AS SIGNED) FROM account")
                .await?;
            let sum = sum.unwrap_or(0);
            let expected = expected_each + delta;
            all_ok &= sum == expected;
            lines.push(format!("{name} {sum} (expected {expected})"));
        }
        println!(
            "\nbalances after every workload: {}: {}{}{}",
            lines.join(", "),
            if all_ok {
                "every committed change is there, nothing else"
            } else {
                "MISMATCH"
            },
            if self.ledger.ambiguous > 0 {
                format!(
                    " ({} global transactions ended with a failed rollback, their fate unknown)",
                    self.ledger.ambiguous
                )
            } else {
                String::new()
            },
            match drained {
                Some(_) if undo == 0 => String::new(),
                Some(s) => format!("; phase 2 had {undo} undo records left, drained in {s:.2} s"),
                None => format!("; {undo} undo records NOT drained within {} s", DRAIN_TIMEOUT.as_secs()),
            }
        );
        Ok(())
    }

    fn log_tails(&self) -> String {
        format!(
            "log of proxy A (tail):\n{}\nlog of proxy B (tail):\n{}\nlog of ferrata-tc (tail):\n{}",
            self.proxy_a.proc.log_tail(),
            self.proxy_b.proc.log_tail(),
            self.tc.log_tail()
        )
    }

    fn print_warnings(&self) {
        for (name, warnings) in [
            ("proxy A", self.proxy_a.proc.warnings()),
            ("proxy B", self.proxy_b.proc.warnings()),
            ("ferrata-tc", self.tc.warnings()),
        ] {
            if warnings.is_empty() {
                continue;
            }
            println!("\n{name} logged {} warnings/errors; first ones:", warnings.len());
            for line in warnings.iter().take(5) {
                println!("  {line}");
            }
        }
        for (name, pid) in [
            ("proxy A", self.proxy_a.proc.pid()),
            ("proxy B", self.proxy_b.proc.pid()),
            ("ferrata-tc", self.tc.pid()),
        ] {
            if let Ok(kib) = ferrata_bench::peak_rss_kib(pid) {
                println!("peak resident memory of {name}: {:.1} MiB", kib as f64 / 1024.0);
            }
        }
    }
}

/// `name{labels}` samples of `after` minus those of `before`, as `label=value` pairs.
fn metric_delta(before: &str, after: &str, name: &str) -> String {
    let before: BTreeMap<String, f64> = metric_samples(before, name).into_iter().collect();
    let mut samples = metric_samples(after, name);
    samples.sort_by(|a, b| a.0.cmp(&b.0));
    let pairs: Vec<String> = samples
        .into_iter()
        .map(|(labels, v)| format!("{labels} {}", v - before.get(&labels).copied().unwrap_or(0.0)))
        .collect();
    if pairs.is_empty() {
        "(not exposed)".to_owned()
    } else {
        pairs.join(", ")
    }
}

fn verdict(pass: bool, target: &str) -> String {
    format!("{target}: {}", if pass { "PASS" } else { "MISS" })
}

/// Prints the per-round table of a workload's sides (the reference, direct, last) and the
/// details; returns each side's median ratio to direct (`None` for direct itself, or without
/// it).
fn print_rounds(unit: &str, rounds: &[Vec<SideRun>]) -> Vec<Option<f64>> {
    let sides: Vec<Side> = rounds[0].iter().map(|r| r.job.side()).collect();
    let reference = sides.iter().position(|s| *s == Side::Direct);
    let mut header = format!("{:>5}  {:<7}", "round", "first");
    for side in &sides {
        header += &format!(
            "  | {:>11} {:>7} {:>7} {:>6}",
            format!("{} {unit}", side.name()),
            "p50 ms",
            "p99 ms",
            "errors"
        );
    }
    for side in sides.iter().filter(|s| **s != Side::Direct && reference.is_some()) {
        header += &format!(" | {:>9}", format!("{}/direct", side.name()));
    }
    println!("{header} | phase 2 after the window");
    let ratio = |r: &[SideRun], i: usize| reference.map(|d| r[i].tps / r[d].tps.max(f64::MIN_POSITIVE));
    for (n, r) in rounds.iter().enumerate() {
        let mut line = format!("{:>5}  {:<7}", n + 1, sides[n % sides.len()].name());
        for run in r {
            line += &format!(
                "  | {:>11.1} {:>7.2} {:>7.2} {:>6}",
                run.tps,
                run.latency.p50_ms,
                run.latency.p99_ms,
                run.tally.error_count()
            );
        }
        for i in (0..sides.len()).filter(|&i| sides[i] != Side::Direct) {
            if let Some(x) = ratio(r, i) {
                line += &format!(" | {x:>9.3}");
            }
        }
        let left: Vec<String> = r
            .iter()
            .filter_map(|run| {
                run.phase2.map(|p| match p {
                    (0, _) => format!("{} nothing left", run.job.side().name()),
                    (n, Some(s)) => format!("{} {n} left, drained in {s:.2} s", run.job.side().name()),
                    (n, None) => format!(
                        "{} {n} left, NOT drained in {} s",
                        run.job.side().name(),
                        DRAIN_TIMEOUT.as_secs()
                    ),
                })
            })
            .collect();
        println!("{line} | {}", left.join("; "));
    }
    let med = |side: usize, f: &dyn Fn(&SideRun) -> f64| median(rounds.iter().map(|r| f(&r[side])).collect());
    let ratios: Vec<Option<f64>> = (0..sides.len())
        .map(|i| {
            (sides[i] != Side::Direct && reference.is_some())
                .then(|| median(rounds.iter().filter_map(|r| ratio(r, i)).collect()))
        })
        .collect();
    let mut line = format!("{:>5}  {:<7}", "", "median");
    for i in 0..sides.len() {
        line += &format!(
            "  | {:>11.1} {:>7.2} {:>7.2} {:>6}",
            med(i, &|r| r.tps),
            med(i, &|r| r.latency.p50_ms),
            med(i, &|r| r.latency.p99_ms),
            rounds.iter().map(|r| r[i].tally.error_count()).sum::<u64>()
        );
    }
    for x in ratios.iter().flatten() {
        line += &format!(" | {x:>9.3}");
    }
    println!("{line} |");
    println!(
        "({unit}: iterations that succeeded within the window per second; ratios to direct within the round, \
         medians of those; latency of one whole iteration; errors summed in the median row; phase 2 left: undo \
         records and prepared XA branches, or messages not yet received)"
    );
    for (i, side) in sides.iter().enumerate() {
        let cpu: Vec<String> = CPU_GROUPS
            .iter()
            .enumerate()
            .map(|(g, group)| format!("{group} {:.0}", med(i, &|r| r.cpu_us[g])))
            .collect();
        println!(
            "cpu us per transaction, {} (median; phase 2 included): {}",
            side.name(),
            cpu.join(", ")
        );
    }
    for (i, side) in sides.iter().enumerate() {
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        for r in rounds {
            for (counter, n) in &r[i].statements {
                *totals.entry(counter.as_str()).or_insert(0) += n;
            }
        }
        // Iterations that succeeded, window or not: the counters see all of them.
        let done: u64 = rounds.iter().map(|r| r[i].tally.steps.last().map_or(0, |s| s.1)).sum();
        let per = |n: u64| n as f64 / done.max(1) as f64;
        let mut by_kind: Vec<(&str, u64)> = totals
            .iter()
            .filter(|(c, _)| c.starts_with("com_"))
            .map(|(c, n)| (*c, *n))
            .collect();
        by_kind.sort_by_key(|k| std::cmp::Reverse(k.1));
        let kinds: Vec<String> = by_kind
            .iter()
            .filter(|(_, n)| per(*n) >= 0.05)
            .map(|(c, n)| format!("{} {:.2}", c.trim_start_matches("com_"), per(*n)))
            .collect();
        // A direct client sends one statement per round trip.
        let round_trips = match totals.get(PROXY_ROUND_TRIPS) {
            Some(&n) if n > 0 => format!("{:.2} round trips from the proxies", per(n)),
            _ => "one round trip per question".to_owned(),
        };
        println!(
            "server statements per transaction, {} (A + B, all rounds, phase 2 included): {:.2} questions ({round_trips}), \
             {:.2} redo log fsyncs; {}",
            side.name(),
            per(totals.get("questions").copied().unwrap_or(0)),
            per(totals.get("innodb_os_log_fsyncs").copied().unwrap_or(0)),
            kinds.join(", ")
        );
    }
    for (i, side) in sides.iter().enumerate() {
        let mut steps = vec![(0u64, 0u64); rounds[0][i].tally.steps.len()];
        for r in rounds {
            for (acc, s) in steps.iter_mut().zip(&r[i].tally.steps) {
                acc.0 += s.0;
                acc.1 += s.1;
            }
        }
        let text: Vec<String> = rounds[0][i]
            .job
            .steps()
            .iter()
            .zip(&steps)
            .map(|(n, (ns, count))| format!("{n} {:.3}", *ns as f64 / (*count).max(1) as f64 / 1e6))
            .collect();
        println!(
            "mean ms per statement, {} (all rounds): {}",
            side.name(),
            text.join(", ")
        );
    }
    for (i, side) in sides.iter().enumerate() {
        let mut errors: BTreeMap<(String, u16), (u64, String)> = BTreeMap::new();
        let mut reconnects = 0;
        for r in rounds {
            for (key, (n, message)) in &r[i].tally.errors {
                errors.entry(key.clone()).or_insert((0, message.clone())).0 += n;
            }
            reconnects += r[i].tally.reconnects;
        }
        for ((statement, code), (n, message)) in &errors {
            println!("errors, {}: {statement}: {code} x{n} (first: {message})", side.name());
        }
        if reconnects > 0 {
            println!(
                "errors, {}: {reconnects} connections replaced after a failed cleanup",
                side.name()
            );
        }
    }
    ratios
}
