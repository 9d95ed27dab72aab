//! `tc-bench`: the transaction coordinator alone, over gRPC, with its durable store.
//!
//! Two scenarios, each against a fresh `ferrata-tc` process (spawned from `--tc-binary`,
//! on loopback, with a new data directory under `--data-parent`, so every acknowledged change
//! is fsynced by the default redb store with group commit):
//!
//! * **throughput**, at each `--clients` count: every client runs global transactions back to
//!   back, each GlobalBegin, BranchRegister on resource `db1`, BranchRegister on `db2` (each
//!   locking one row of `bench.accounts` whose key no other transaction uses, so nothing
//!   conflicts) and GlobalCommit. Two resource managers are attached over Attach streams, one
//!   per resource, and answer every phase-2 COMMIT batch with PHASE_TWO_COMMITTED at once, so
//!   the coordinator's asynchronous phase 2 runs (and costs) during the measurement.
//! * **hot-row**, with `--hot-clients` clients: the same loop with one branch that locks the
//!   *same* row in every transaction (waiting up to `--lock-wait-ms` in the coordinator's
//!   queue), so the row's lock passes from transaction to transaction. The register latency
//!   includes the queue wait.
//!
//! Each client uses one of `--connections` HTTP/2 connections (default: its own, as many
//! proxies would). With `--calls stream` (the default, what a proxy does) each connection
//! also carries an Attach stream serving both resources, and the clients on it make their
//! calls as messages on that stream; with `--calls unary` each call is an HTTP/2 request of
//! its own and the two resource managers attach on connections of their own. `--calls
//! unary,stream` runs every scenario both ways, one after the other. After `--warmup` seconds, calls that finish within the next `--seconds`
//! seconds are measured: transactions per second and p50/p99/max latency of the whole
//! transaction and of each call type. Over the same window it reads the coordinator's CPU time
//! (per thread name) from /proc, its store commits from /metrics, the benchmark's own CPU time
//! and the whole machine's busy CPU (the rest belongs to other processes), and reports the
//! coordinator's peak RSS. After the window it waits for phase 2 to drain and says how long
//! that took. Prints a block per scenario, a summary table and one JSON line per scenario.
//!
//! `--stores redb,etcd1,etcd3` runs every scenario on each store, interleaved: the embedded
//! store, or etcd (`--etcd`) on a cluster of one or three members the benchmark starts for the
//! scenario (`etcd-server`; its data under the temp directory), whose CPU time is reported
//! too. `--nodes 1,2,3` runs every etcd scenario also on that many serving nodes
//! (`--etcd-mode serving`): the first node leads the cluster's locks, and the connections go
//! to the nodes in turn, each with its Attach stream there; the coordinator CPU is then all
//! nodes', and the lock leader's node's is reported apart, to see where it saturates.
//! `--failovers N` then measures, on each etcd store, N failovers: two nodes, the active
//! one killed with SIGKILL, and the time until the other grants a lock.
//!
//! The client and the coordinator share the machine; compare runs on the same machine only.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use ferrata_bench::{
    Latency, LoggedChild, StoreKind, cpu_seconds, http_get, load_average, machine_jiffies, metric_labeled, metric_sum,
    parse_serving, parse_stat, round,
};
use ferrata_rpc::client::{Attachment, ClientConfig, CommandHandler, TcClient, attach};
use ferrata_rpc::{ErrorCode, pb};
use ferrata_testkit::etcd::EtcdCluster;
use serde_json::json;
use tonic::Status;

#[derive(Debug, Parser)]
#[command(about = "Throughput and lock latency of ferrata-tc over gRPC, with its durable store")]
struct Args {
    /// The coordinator binary [default: target/release/ferrata-tc in the workspace].
    #[arg(long)]
    tc_binary: Option<PathBuf>,
    /// Extra argument for the coordinator, e.g. --tc-arg=--worker-threads=1 (repeatable).
    #[arg(long = "tc-arg", allow_hyphen_values = true)]
    tc_args: Vec<String>,
    /// Comma-separated client counts of the throughput scenario (0: skip it).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Clients of the hot-row scenario (0: skip it).
    #[arg(long, default_value_t = 16)]
    hot_clients: usize,
    /// HTTP/2 connections the clients share, round robin [default: one per client].
    #[arg(long)]
    connections: Option<usize>,
    /// How the clients make their calls, comma-separated to run each scenario both ways:
    /// `stream` (on an Attach stream per connection) or `unary` (a request each).
    #[arg(long, value_delimiter = ',', default_value = "stream")]
    calls: Vec<Calls>,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured seconds before the measurement, with the same load.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Lock wait of every BranchRegister, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    lock_wait_ms: u64,
    /// Where the coordinator's data directories are created [default: the temp directory].
    /// It must be on the disk under test: on tmpfs, fsync costs nothing.
    #[arg(long)]
    data_parent: Option<PathBuf>,
    /// Worker threads of this benchmark's tokio runtime, 0 for one per CPU.
    #[arg(long, default_value_t = 0)]
    bench_threads: usize,
    /// Record the coordinator with `perf record -e cpu-clock` during each measured window,
    /// into DIR/tc-<scenario>.perf.data.
    #[arg(long, value_name = "DIR")]
    perf_dir: Option<PathBuf>,
    /// perf's --call-graph mode with --perf-dir: `fp` (what -g does) cannot unwind through
    /// Rust code built without frame pointers; `dwarf` can, with larger files.
    #[arg(long, default_value = "fp", value_name = "MODE")]
    perf_call_graph: String,
    /// Where the coordinator keeps its state, comma-separated to run every scenario on each
    /// (interleaved): `redb` (the embedded store), `etcd1`, `etcd3` (etcd of one or three
    /// members).
    #[arg(long, value_delimiter = ',', default_value = "redb")]
    stores: Vec<StoreKind>,
    /// Failovers measured on each etcd store after the scenarios (0: none).
    #[arg(long, default_value_t = 0)]
    failovers: usize,
    /// Coordinator nodes of each etcd scenario, comma-separated to run each with every
    /// count: 1 is one active node; more are serving nodes (`--etcd-mode serving`), the
    /// first of which leads the locks.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    nodes: Vec<usize>,
}

/// The root token of serving nodes (they need one to reach each other's lock stream); the
/// clients use it too.
const SERVING_TOKEN: &str = "tc-bench-serving-nodes-root-token";

/// Longest any single call may take before the run is declared broken.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for phase 2 to catch up after the measured window.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Refusals (coordinator errors) per client after which the scenario is abandoned.
const MAX_REFUSALS_PER_CLIENT: u64 = 10_000;

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tc-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    ensure!(args.seconds > 0.0, "--seconds must be positive");
    ensure!(args.warmup >= 0.0, "--warmup must not be negative");
    ensure!(args.connections != Some(0), "--connections must be at least 1");
    ensure!(!args.nodes.contains(&0), "--nodes counts must be at least 1");
    let tc_binary = match &args.tc_binary {
        Some(path) => path.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ferrata-tc"),
    };
    ensure!(
        tc_binary.is_file(),
        "{} not found; build it with `cargo build --release -p ferrata-tc` or pass --tc-binary",
        tc_binary.display()
    );
    let data_parent = args.data_parent.clone().unwrap_or_else(std::env::temp_dir);
    if let Some(dir) = &args.perf_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.bench_threads > 0 {
        runtime.worker_threads(args.bench_threads);
    }
    let runtime = runtime.enable_all().build()?;

    print_settings(&args, &tc_binary, &data_parent)?;

    let mut sizes: Vec<(Kind, usize)> = args
        .clients
        .iter()
        .filter(|&&clients| clients > 0)
        .map(|&clients| (Kind::Throughput, clients))
        .collect();
    if args.hot_clients > 0 {
        sizes.push((Kind::HotRow, args.hot_clients));
    }
    let scenarios: Vec<Scenario> = sizes
        .into_iter()
        .flat_map(|(kind, clients)| {
            let (stores, connections, node_counts) = (&args.stores, args.connections, &args.nodes);
            args.calls.iter().flat_map(move |&calls| {
                stores.iter().flat_map(move |&store| {
                    // Serving nodes share an etcd store.
                    let counts = node_counts.iter().filter(move |&&n| n == 1 || store.members() > 0);
                    counts.map(move |&nodes| Scenario {
                        kind,
                        clients,
                        connections: connections.unwrap_or(clients).min(clients),
                        calls,
                        store,
                        nodes,
                    })
                })
            })
        })
        .collect();
    ensure!(!scenarios.is_empty(), "nothing to run: --clients 0 and --hot-clients 0");

    let mut outcomes = Vec::new();
    for scenario in scenarios {
        let outcome = runtime
            .block_on(run_scenario(&args, &tc_binary, &data_parent, scenario))
            .with_context(|| format!("scenario {}", scenario.label()))?;
        outcome.print();
        outcomes.push(outcome);
    }
    print_summary(&outcomes);
    println!("\njson (one line per scenario)");
    for outcome in &outcomes {
        println!("{}", outcome.json());
    }
    if args.failovers > 0 {
        for &store in args.stores.iter().filter(|s| s.members() > 0) {
            let times = runtime.block_on(measure_failovers(&args, &tc_binary, &data_parent, store))?;
            let mut ms: Vec<u64> = times.iter().map(|t| t.as_millis() as u64).collect();
            ms.sort_unstable();
            println!(
                "\nfailover on {}: kill -9 of the active node to the first lock the other grants, {} times: \
                 min {} ms, median {} ms, max {} ms ({ms:?})",
                store.name(),
                ms.len(),
                ms[0],
                ms[ms.len() / 2],
                ms[ms.len() - 1]
            );
            println!("{}", json!({"failover": store.name(), "lease_ttl_s": 5, "ms": ms}));
        }
    }
    Ok(())
}

/// `failovers` times: the active node of two grants a lock, is killed with SIGKILL, and the
/// time until the other node grants a lock is taken; the killed node comes back as the
/// standby. The nodes run with the default lease (5 s).
async fn measure_failovers(
    args: &Args,
    tc_binary: &Path,
    data_parent: &Path,
    store: StoreKind,
) -> Result<Vec<Duration>> {
    let cluster = EtcdCluster::start(store.members()).await?;
    let endpoints = cluster.endpoints();
    let start = |node: usize, ready: &str| {
        let etcd = Etcd {
            endpoints: &endpoints,
            node,
            serving: false,
        };
        Tc::start(tc_binary, data_parent, &args.tc_args, Some(etcd), ready)
    };
    let mut nodes = [start(0, "ferrata-tc serving")?, start(1, "standing by")?];
    let mut active = 0;
    let mut times = Vec::with_capacity(args.failovers);
    for round in 0..args.failovers {
        lock_once(nodes[active].rpc, None, &format!("before-{round}"))
            .await
            .context("the active node grants a lock")?;
        let killed = Instant::now();
        nodes[active].kill();
        let standby = 1 - active;
        let deadline = killed + Duration::from_secs(60);
        loop {
            match lock_once(nodes[standby].rpc, None, &format!("after-{round}")).await {
                Ok(()) => break,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => return Err(e.context("no lock granted within 60 s of the kill")),
            }
        }
        times.push(killed.elapsed());
        nodes[active] = start(active, "standing by")?;
        active = standby;
    }
    Ok(times)
}

/// One global transaction on the node at `rpc` (called with `token`) whose branch locks row
/// `pk`, then rolled back.
async fn lock_once(rpc: SocketAddr, token: Option<&str>, pk: &str) -> Result<()> {
    let mut client = TcClient::connect(&ClientConfig {
        endpoint: format!("http://{rpc}"),
        token: token.map(str::to_owned),
        ..ClientConfig::default()
    })
    .await?;
    let xid = client
        .global_begin(pb::GlobalBeginRequest {
            timeout_ms: 60_000,
            name: "failover".into(),
        })
        .await?
        .xid;
    client
        .branch_register(register_request(&xid, "db1", pk.as_bytes(), 0))
        .await?;
    client.global_rollback(pb::XidRequest { xid }).await?;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Throughput,
    HotRow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Calls {
    Unary,
    Stream,
}

impl Calls {
    fn name(self) -> &'static str {
        match self {
            Calls::Unary => "unary",
            Calls::Stream => "stream",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    kind: Kind,
    clients: usize,
    connections: usize,
    calls: Calls,
    store: StoreKind,
    /// Coordinator nodes: 1, or that many serving nodes.
    nodes: usize,
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Throughput => "throughput",
            Kind::HotRow => "hot-row",
        }
    }

    fn label(&self) -> String {
        format!(
            "{}-c{}-{}-{}",
            self.name(),
            self.clients,
            self.calls.name(),
            self.store_label()
        )
    }

    /// The store, and the serving nodes on it if several (`etcd1x3`).
    fn store_label(&self) -> String {
        match self.nodes {
            1 => self.store.name().to_owned(),
            n => format!("{}x{n}", self.store.name()),
        }
    }

    /// The resources each transaction registers a branch on, in order.
    fn resources(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::Throughput => &["db1", "db2"],
            Kind::HotRow => &["db1"],
        }
    }
}

fn print_settings(args: &Args, tc_binary: &Path, data_parent: &Path) -> Result<()> {
    let cpus = std::thread::available_parallelism()?;
    println!("tc-bench");
    println!(
        "  coordinator: {} --log-level info{}",
        tc_binary.display(),
        args.tc_args.iter().map(|a| format!(" {a}")).collect::<String>()
    );
    println!(
        "  settings:    {} s measured after {} s warm-up; throughput clients {:?}; hot-row clients {}; \
         connections {}; lock wait {} ms; {} cpus; bench runtime {} worker threads",
        args.seconds,
        args.warmup,
        args.clients,
        args.hot_clients,
        args.connections
            .map_or_else(|| "one per client".to_owned(), |c| c.to_string()),
        args.lock_wait_ms,
        cpus,
        if args.bench_threads > 0 {
            args.bench_threads
        } else {
            cpus.get()
        },
    );
    println!(
        "  stores:      {:?}; nodes {:?}",
        args.stores.iter().map(|s| s.name()).collect::<Vec<_>>(),
        args.nodes
    );
    let fs = filesystem_type(data_parent);
    println!("  data dirs:   under {} ({fs})", data_parent.display());
    if fs == "tmpfs" || fs == "ramfs" {
        println!("  WARNING: the data directories are in memory; fsync costs nothing there");
    }
    match fsync_probe(data_parent) {
        Ok(lat) => println!(
            "  fdatasync:   4 KiB overwrite + fdatasync, {} runs: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            lat.n, lat.p50_ms, lat.p99_ms, lat.max_ms
        ),
        Err(err) => println!("  fdatasync:   probe failed: {err:#}"),
    }
    println!("  load avg:    {}", load_average());
    Ok(())
}

/// The filesystem `dir` lives on, by its statfs magic number.
fn filesystem_type(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let magic = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        if libc::statfs(path.as_ptr(), &mut buf) != 0 {
            return "unknown".into();
        }
        buf.f_type as u64
    };
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x8584_58F6 => "ramfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        other => format!("filesystem magic {other:#x}"),
    }
}

/// Latency of a 4 KiB overwrite followed by fdatasync in `dir`: the floor of one durable
/// store commit on this disk.
fn fsync_probe(dir: &Path) -> Result<Latency> {
    let file = tempfile::tempfile_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    let block = vec![0x5a_u8; 4096];
    file.write_all_at(&block, 0)?;
    file.sync_all()?;
    let mut samples = Vec::with_capacity(100);
    for _ in 0..100 {
        let started = Instant::now();
        file.write_all_at(&block, 0)?;
        file.sync_data()?;
        samples.push(started.elapsed().as_nanos() as u64);
    }
    Ok(Latency::of(&mut samples))
}

/// What one client saw. Latencies in nanoseconds, only of calls that ended in the window.
#[derive(Default)]
struct Stats {
    txn: Vec<u64>,
    begin: Vec<u64>,
    register: Vec<u64>,
    commit: Vec<u64>,
    /// Coordinator refusals by `call: code`, whenever they happened.
    refusals: BTreeMap<String, u64>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.txn.extend(other.txn);
        self.begin.extend(other.begin);
        self.register.extend(other.register);
        self.commit.extend(other.commit);
        for (key, n) in other.refusals {
            *self.refusals.entry(key).or_default() += n;
        }
    }

    fn refused(&mut self, what: String) -> Result<()> {
        *self.refusals.entry(what).or_default() += 1;
        let total: u64 = self.refusals.values().sum();
        ensure!(
            total < MAX_REFUSALS_PER_CLIENT,
            "a client was refused {total} times: {:?}",
            self.refusals
        );
        Ok(())
    }
}

/// The measured window.
#[derive(Clone, Copy, Debug)]
struct Window {
    t0: Instant,
    t1: Instant,
}

impl Window {
    fn contains(&self, at: Instant) -> bool {
        at >= self.t0 && at < self.t1
    }
}

/// Counters the clients, the resource managers and the sampler share.
#[derive(Default)]
struct Shared {
    next_pk: AtomicU64,
    /// Commits acknowledged so far (warm-up included).
    committed: AtomicU64,
    /// Branches the resource managers were told to commit so far.
    phase2_commits: AtomicU64,
    /// Branches the resource managers were told to roll back (there should be none).
    phase2_rollbacks: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// Awaits one call (bounded by CALL_TIMEOUT) and notes when it ended.
async fn timed<T>(call: impl Future<Output = Result<T, Status>>) -> Result<(Result<T, Status>, Instant)> {
    let result = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| anyhow!("no answer within {CALL_TIMEOUT:?}"))?;
    Ok((result, Instant::now()))
}

/// `call: code` for a coordinator error; anything without the coordinator's error code
/// (a broken connection, a crashed coordinator) ends the run.
fn refusal(call: &str, status: Status) -> Result<String> {
    match ErrorCode::of(&status) {
        Some(code) => Ok(format!("{call}: {}", code.as_str())),
        None => bail!("{call} failed without a coordinator error code: {status}"),
    }
}

fn register_request(xid: &str, resource: &str, pk: &[u8], lock_wait_ms: u64) -> pb::BranchRegisterRequest {
    pb::BranchRegisterRequest {
        xid: xid.to_owned(),
        resource_id: resource.to_owned(),
        locks: vec![pb::TableLocks {
            schema: "bench".into(),
            table: "accounts".into(),
            rows: vec![pb::PrimaryKey {
                values: vec![pk.to_vec()],
            }],
        }],
        application_data: Vec::new(),
        lock_wait_ms,
        ..Default::default()
    }
}

/// One client: transactions back to back until the window ends.
async fn client_loop(
    mut tc: TcClient,
    scenario: Scenario,
    window: Window,
    shared: Arc<Shared>,
    lock_wait_ms: u64,
) -> Result<Stats> {
    let mut stats = Stats::default();
    while Instant::now() < window.t1 {
        let started = Instant::now();
        let begin = pb::GlobalBeginRequest {
            timeout_ms: 0,
            name: "tc-bench".into(),
        };
        let (begun, at) = timed(tc.global_begin(begin)).await.context("GlobalBegin")?;
        let xid = match begun {
            Ok(r) => r.xid,
            Err(status) => {
                stats.refused(refusal("begin", status)?)?;
                continue;
            }
        };
        if window.contains(at) {
            stats.begin.push(nanos(at - started));
        }

        let pk = match scenario.kind {
            Kind::Throughput => shared.next_pk.fetch_add(1, Ordering::Relaxed).to_string().into_bytes(),
            Kind::HotRow => b"hot".to_vec(),
        };
        let mut registered_all = true;
        for resource in scenario.resources() {
            let before = Instant::now();
            let request = register_request(&xid, resource, &pk, lock_wait_ms);
            let (registered, at) = timed(tc.branch_register(request)).await.context("BranchRegister")?;
            match registered {
                Ok(_) if window.contains(at) => stats.register.push(nanos(at - before)),
                Ok(_) => {}
                Err(status) => {
                    stats.refused(refusal("register", status)?)?;
                    registered_all = false;
                    break;
                }
            }
        }
        if !registered_all {
            let request = pb::XidRequest { xid };
            let (rolled_back, _) = timed(tc.global_rollback(request)).await.context("GlobalRollback")?;
            if let Err(status) = rolled_back {
                stats.refused(refusal("rollback", status)?)?;
            }
            continue;
        }

        let before = Instant::now();
        let (committed, at) = timed(tc.global_commit(pb::XidRequest { xid }))
            .await
            .context("GlobalCommit")?;
        match committed {
            Ok(outcome)
                if outcome.status == pb::GlobalStatus::AsyncCommitting as i32
                    || outcome.status == pb::GlobalStatus::Committed as i32 =>
            {
                shared.committed.fetch_add(1, Ordering::Relaxed);
                if window.contains(at) {
                    stats.commit.push(nanos(at - before));
                    stats.txn.push(nanos(at - started));
                }
            }
            Ok(outcome) => stats.refused(format!("commit: answered status {}", outcome.status))?,
            Err(status) => stats.refused(refusal("commit", status)?)?,
        }
    }
    Ok(stats)
}

/// A resource manager serving `resources` on `client`'s connection, named `name`, that
/// commits (and rolls back) every branch at once.
async fn attach_rm(client: &mut TcClient, resources: &[&str], name: &str, shared: Arc<Shared>) -> Result<Attachment> {
    let handler: CommandHandler = Arc::new(move |command: pb::BranchCommand| {
        let shared = Arc::clone(&shared);
        Box::pin(async move {
            let rollback = command.action == pb::Phase2Action::Rollback as i32;
            let (counter, status) = if rollback {
                (&shared.phase2_rollbacks, pb::BranchStatus::PhaseTwoRollbacked)
            } else {
                (&shared.phase2_commits, pb::BranchStatus::PhaseTwoCommitted)
            };
            counter.fetch_add(command.branches.len() as u64, Ordering::Relaxed);
            command
                .branches
                .iter()
                .map(|b| pb::BranchOutcome {
                    branch_id: b.branch_id,
                    status: status as i32,
                    reason: String::new(),
                    detail_json: String::new(),
                    ..Default::default()
                })
                .collect()
        })
    });
    let rm_id = format!("tc-bench-rm-{name}");
    let hello = ferrata_rpc::pb::Hello {
        instance_id: rm_id.clone(),
        rm_id,
        resource_ids: resources.iter().map(|r| (*r).to_owned()).collect(),
    };
    attach(
        &mut client.rm,
        hello,
        handler,
        std::sync::Arc::new(ferrata_rpc::client::IgnoreGuards),
    )
    .await
    .with_context(|| format!("attaching the resource manager {name}"))
}

/// Everything read at one instant of the window.
struct Snapshot {
    at: Instant,
    /// Every node's CPU time, and the first node's (the lock leader of serving nodes).
    tc_cpu: f64,
    leader_cpu: f64,
    tc_threads: BTreeMap<String, f64>,
    /// The etcd members' CPU time, all together (0 with the embedded store).
    etcd_cpu: f64,
    bench_cpu: f64,
    /// Busy and total jiffies of the whole machine.
    machine: (u64, u64),
    committed: u64,
    phase2_commits: u64,
    /// The coordinators' /metrics, one after the other, if they all answered.
    metrics: Option<String>,
}

async fn snapshot(nodes: &[Tc], shared: &Shared) -> Result<Snapshot> {
    let at = Instant::now();
    let tc = &nodes[0];
    let cpu = nodes
        .iter()
        .map(|n| cpu_seconds(&format!("/proc/{}/stat", n.pid())))
        .collect::<Result<Vec<f64>>>()?;
    let mut tc_threads = BTreeMap::new();
    for n in nodes {
        for (name, cpu) in thread_cpu(n.pid())? {
            *tc_threads.entry(name).or_default() += cpu;
        }
    }
    let mut metrics = Some(String::new());
    for n in nodes {
        match (&mut metrics, http_get(n.http, "/metrics").await) {
            (Some(all), Ok(text)) => all.push_str(&text),
            _ => metrics = None,
        }
    }
    let snap = Snapshot {
        at,
        tc_cpu: cpu.iter().sum(),
        leader_cpu: cpu[0],
        tc_threads,
        etcd_cpu: tc
            .etcd_pids
            .iter()
            .map(|pid| cpu_seconds(&format!("/proc/{pid}/stat")))
            .sum::<Result<f64>>()?,
        bench_cpu: cpu_seconds("/proc/self/stat")?,
        machine: machine_jiffies()?,
        committed: shared.committed.load(Ordering::Relaxed),
        phase2_commits: shared.phase2_commits.load(Ordering::Relaxed),
        metrics,
    };
    Ok(snap)
}

async fn run_scenario(args: &Args, tc_binary: &Path, data_parent: &Path, scenario: Scenario) -> Result<Outcome> {
    let label = scenario.label();
    println!(
        "\n== {label}: {} clients on {} connections, calls {}",
        scenario.clients,
        scenario.connections,
        scenario.calls.name()
    );
    let load_before = load_average();
    let cluster = scenario.store.start_etcd().await?;
    let endpoints = cluster.as_ref().map(EtcdCluster::endpoints);
    let mut nodes = Vec::with_capacity(scenario.nodes);
    for node in 0..scenario.nodes {
        let etcd = endpoints.as_ref().map(|e| Etcd {
            endpoints: e.as_slice(),
            node,
            serving: scenario.nodes > 1,
        });
        let mut tc = Tc::start(tc_binary, data_parent, &args.tc_args, etcd, "ferrata-tc serving")?;
        tc.etcd_pids = cluster.as_ref().map(EtcdCluster::pids).unwrap_or_default();
        println!("   coordinator pid {} rpc {} http {}", tc.pid(), tc.rpc, tc.http);
        if scenario.nodes > 1 {
            // The first node leads the locks; every node knows where they are.
            tc.wait_lock_leader(node == 0).await?;
        }
        nodes.push(tc);
    }
    if scenario.nodes > 1 {
        // A new lock leader guards no table before the guard linger and lease have passed
        // (a resource manager may still trust an earlier leader's set): wait for that
        // outside the measurement.
        let waited = Instant::now();
        while let Err(e) = lock_once(nodes[0].rpc, Some(SERVING_TOKEN), "first-guard").await {
            ensure!(
                waited.elapsed() < Duration::from_secs(60),
                "no lock granted within 60 s: {e:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "   the lock leader guarded its first table after {:.1} s",
            waited.elapsed().as_secs_f64()
        );
    }
    let result = match drive(args, scenario, &nodes).await {
        Ok(outcome) => Ok(outcome),
        Err(err) => Err(err.context(format!("coordinator log (tail):\n{}", nodes[0].log_tail()))),
    };
    for tc in &mut nodes {
        if let Err(err) = tc.stop() {
            println!("   WARNING: stopping the coordinator: {err:#}");
        }
    }
    let mut outcome = result?;
    outcome.load_before = load_before;
    Ok(outcome)
}

async fn drive(args: &Args, scenario: Scenario, nodes: &[Tc]) -> Result<Outcome> {
    let config = |tc: &Tc| ClientConfig {
        endpoint: format!("http://{}", tc.rpc),
        token: (nodes.len() > 1).then(|| SERVING_TOKEN.to_owned()),
        ..ClientConfig::default()
    };
    let shared = Arc::new(Shared::default());
    let mut connections = Vec::with_capacity(scenario.connections);
    let mut rms = Vec::new();
    for i in 0..scenario.connections {
        let mut client = TcClient::connect(&config(&nodes[i % nodes.len()])).await?;
        if scenario.calls == Calls::Stream {
            // As a proxy does: its resource manager's stream carries its sessions' calls.
            let rm = attach_rm(&mut client, scenario.resources(), &format!("c{i}"), Arc::clone(&shared)).await?;
            client = client.with_stream(rm.calls());
            rms.push(rm);
        }
        connections.push(client);
    }
    if scenario.calls == Calls::Unary {
        for (n, tc) in nodes.iter().enumerate() {
            for resource in scenario.resources() {
                let mut client = TcClient::connect(&config(tc)).await?;
                let name = format!("{resource}-n{n}");
                rms.push(attach_rm(&mut client, &[resource], &name, Arc::clone(&shared)).await?);
            }
        }
    }
    let t0 = Instant::now() + Duration::from_secs_f64(args.warmup);
    let window = Window {
        t0,
        t1: t0 + Duration::from_secs_f64(args.seconds),
    };

    let mut clients = tokio::task::JoinSet::new();
    for i in 0..scenario.clients {
        let client = connections[i % connections.len()].clone();
        clients.spawn(client_loop(
            client,
            scenario,
            window,
            Arc::clone(&shared),
            args.lock_wait_ms,
        ));
    }

    // Sample at both ends of the window (and profile between them, if asked).
    tokio::time::sleep_until(window.t0.into()).await;
    let first = snapshot(nodes, &shared).await?;
    let perf = match &args.perf_dir {
        Some(dir) => Some(Perf::start(
            nodes[0].pid(),
            &args.perf_call_graph,
            &dir.join(format!("tc-{}.perf.data", scenario.label())),
        )?),
        None => None,
    };
    tokio::time::sleep_until(window.t1.into()).await;
    let last = snapshot(nodes, &shared).await?;
    let rss_in_window = peak_rss_kib(nodes)?;
    if let Some(perf) = perf {
        perf.stop()?;
    }

    let mut stats = Stats::default();
    while let Some(joined) = clients.join_next().await {
        stats.merge(joined.context("a client task panicked")??);
    }

    // Phase 2 should catch up: every acknowledged commit's branches committed by the RMs.
    let branches = scenario.resources().len() as u64;
    let drain_started = Instant::now();
    let drained = loop {
        let expected = shared.committed.load(Ordering::Relaxed) * branches;
        if shared.phase2_commits.load(Ordering::Relaxed) >= expected {
            break Some(drain_started.elapsed());
        }
        if drain_started.elapsed() > DRAIN_TIMEOUT {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for rm in &rms {
        ensure!(
            !rm.is_finished(),
            "a resource manager's Attach stream ended during the run"
        );
    }
    drop(rms);

    Ok(Outcome::new(
        scenario,
        args.seconds,
        stats,
        &first,
        &last,
        &shared,
        branches,
        drained,
        rss_in_window,
        peak_rss_kib(nodes)?,
        nodes.iter().flat_map(Tc::warnings).collect(),
    ))
}

/// The largest peak resident memory of `nodes` so far, in KiB.
fn peak_rss_kib(nodes: &[Tc]) -> Result<u64> {
    nodes
        .iter()
        .map(Tc::peak_rss_kib)
        .try_fold(0, |most, rss| Ok(most.max(rss?)))
}

/// `perf record` attached to the coordinator for the measured window.
struct Perf {
    child: Child,
    out: PathBuf,
}

impl Perf {
    fn start(pid: u32, call_graph: &str, out: &Path) -> Result<Perf> {
        let child = Command::new("perf")
            .args(["record", "-e", "cpu-clock", "--call-graph", call_graph])
            .args(["-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running perf record (is perf installed?)")?;
        Ok(Perf {
            child,
            out: out.to_owned(),
        })
    }

    fn stop(mut self) -> Result<()> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let status = self.child.wait()?;
        println!("   perf record: {} ({status})", self.out.display());
        Ok(())
    }
}

/// What one scenario measured.
struct Outcome {
    scenario: Scenario,
    seconds: f64,
    tps: f64,
    txn: Latency,
    begin: Latency,
    register: Latency,
    commit: Latency,
    refusals: BTreeMap<String, u64>,
    /// Seconds the two snapshots were actually apart.
    sampled: f64,
    /// Every node's CPU time in the window, and the first node's (the lock leader's).
    tc_cpu: f64,
    leader_cpu: f64,
    /// The etcd members' CPU time in the window, all together.
    etcd_cpu: f64,
    tc_threads: Vec<(String, f64)>,
    bench_cpu: f64,
    machine_busy: f64,
    tc_rss_window_kib: u64,
    tc_rss_peak_kib: u64,
    store_commits: Option<f64>,
    mutations_per_commit: Option<f64>,
    store_commit_ms: Option<f64>,
    /// Store commits in the window that took over 10 ms and over 100 ms.
    slow_store_commits: (Option<f64>, Option<f64>),
    /// Branches committed by the resource managers during the window.
    phase2_in_window: u64,
    /// Branches acknowledged but not yet committed by the RMs at the end of the window.
    phase2_backlog: u64,
    drained: Option<Duration>,
    phase2_rollbacks: u64,
    tc_warnings: Vec<String>,
    load_before: String,
}

impl Outcome {
    #[allow(clippy::too_many_arguments)]
    fn new(
        scenario: Scenario,
        seconds: f64,
        mut stats: Stats,
        first: &Snapshot,
        last: &Snapshot,
        shared: &Shared,
        branches: u64,
        drained: Option<Duration>,
        tc_rss_window_kib: u64,
        tc_rss_peak_kib: u64,
        tc_warnings: Vec<String>,
    ) -> Outcome {
        let sampled = (last.at - first.at).as_secs_f64();
        let mut tc_threads: Vec<(String, f64)> = last
            .tc_threads
            .iter()
            .map(|(name, &cpu)| (name.clone(), cpu - first.tc_threads.get(name).copied().unwrap_or(0.0)))
            .filter(|(_, cpu)| *cpu > 0.0)
            .collect();
        tc_threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (busy0, total0) = first.machine;
        let (busy1, total1) = last.machine;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let machine_busy = if total1 > total0 {
            (busy1 - busy0) as f64 / (total1 - total0) as f64 * cpus
        } else {
            0.0
        };
        let metric = |name: &str| -> Option<f64> {
            Some(metric_sum(last.metrics.as_deref()?, name)? - metric_sum(first.metrics.as_deref()?, name)?)
        };
        let store_commits = metric("ferrata_tc_store_commits_total");
        // Store commits slower than a bucket bound: all of them minus those within it.
        let labeled = |name: &str, label: &str| -> Option<f64> {
            Some(
                metric_labeled(last.metrics.as_deref()?, name, label)?
                    - metric_labeled(first.metrics.as_deref()?, name, label)?,
            )
        };
        let slower_than = |le: &str| -> Option<f64> {
            let bucket = "ferrata_tc_store_commit_seconds_bucket";
            Some(labeled(bucket, "le=\"+Inf\"")? - labeled(bucket, &format!("le=\"{le}\""))?)
        };
        let slow_store_commits = (slower_than("0.01"), slower_than("0.1"));
        let ratio = |sum: Option<f64>, count: Option<f64>| match (sum, count) {
            (Some(s), Some(c)) if c > 0.0 => Some(s / c),
            _ => None,
        };
        let mutations_per_commit = ratio(
            metric("ferrata_tc_store_batch_mutations_sum"),
            metric("ferrata_tc_store_batch_mutations_count"),
        );
        let store_commit_ms = ratio(
            metric("ferrata_tc_store_commit_seconds_sum"),
            metric("ferrata_tc_store_commit_seconds_count"),
        )
        .map(|s| s * 1e3);
        Outcome {
            scenario,
            seconds,
            tps: stats.txn.len() as f64 / seconds,
            txn: Latency::of(&mut stats.txn),
            begin: Latency::of(&mut stats.begin),
            register: Latency::of(&mut stats.register),
            commit: Latency::of(&mut stats.commit),
            refusals: stats.refusals,
            sampled,
            tc_cpu: last.tc_cpu - first.tc_cpu,
            leader_cpu: last.leader_cpu - first.leader_cpu,
            etcd_cpu: last.etcd_cpu - first.etcd_cpu,
            tc_threads,
            bench_cpu: last.bench_cpu - first.bench_cpu,
            machine_busy,
            tc_rss_window_kib,
            tc_rss_peak_kib,
            store_commits,
            mutations_per_commit,
            store_commit_ms,
            slow_store_commits,
            phase2_in_window: last.phase2_commits - first.phase2_commits,
            phase2_backlog: (last.committed * branches).saturating_sub(last.phase2_commits),
            drained,
            phase2_rollbacks: shared.phase2_rollbacks.load(Ordering::Relaxed),
            tc_warnings,
            load_before: String::new(),
        }
    }

    fn lock_errors(&self) -> u64 {
        self.refusals
            .iter()
            .filter(|(key, _)| {
                key.ends_with(ErrorCode::LockWaitTimeout.as_str())
                    || key.ends_with(ErrorCode::LockHolderRollingBack.as_str())
                    || key.ends_with(ErrorCode::Deadlock.as_str())
            })
            .map(|(_, n)| n)
            .sum()
    }

    fn print(&self) {
        let s = &self.scenario;
        println!(
            "   {} transactions committed in {} s: {:.1} tx/s; refusals {}",
            self.txn.n,
            self.seconds,
            self.tps,
            if self.refusals.is_empty() {
                "none".to_owned()
            } else {
                format!("{:?}", self.refusals)
            }
        );
        println!("   latency (ms)      n        p50       p99       max");
        let row = |name: &str, l: &Latency| {
            println!(
                "     {name:<11} {:>7} {:>9.3} {:>9.3} {:>9.3}",
                l.n, l.p50_ms, l.p99_ms, l.max_ms
            );
        };
        row("transaction", &self.txn);
        row("begin", &self.begin);
        row(
            if s.kind == Kind::HotRow {
                "register*"
            } else {
                "register"
            },
            &self.register,
        );
        row("commit", &self.commit);
        if s.kind == Kind::HotRow {
            println!(
                "     * includes the wait for the hot row's lock; lock errors: {}",
                self.lock_errors()
            );
        }
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
        println!(
            "   store: {} commits in the window ({}/s), {} mutations per commit, {} ms per commit \
             (mean); {} took over 10 ms, {} over 100 ms",
            opt(self.store_commits, 0),
            opt(self.store_commits.map(|c| c / self.seconds), 0),
            opt(self.mutations_per_commit, 1),
            opt(self.store_commit_ms, 3),
            opt(self.slow_store_commits.0, 0),
            opt(self.slow_store_commits.1, 0),
        );
        println!(
            "   phase 2: {} branches committed by the RMs in the window; {} acknowledged branches \
             not yet committed at its end; {}{}",
            self.phase2_in_window,
            self.phase2_backlog,
            match self.drained {
                Some(d) => format!("all committed {:.0} ms after the window", d.as_secs_f64() * 1e3),
                None => format!("NOT all committed {} s after the window", DRAIN_TIMEOUT.as_secs()),
            },
            if self.phase2_rollbacks > 0 {
                format!("; {} branches rolled back (unexpected)", self.phase2_rollbacks)
            } else {
                String::new()
            }
        );
        let threads: Vec<String> = self
            .tc_threads
            .iter()
            .map(|(name, cpu)| format!("{name} {cpu:.2}"))
            .collect();
        println!(
            "   cpu over {:.2} s: coordinator {:.2} s ({:.2} cores; {:.0} us per transaction; by thread: {}), \
             bench {:.2} s ({:.2} cores), machine busy {:.2} cores (others {:.2})",
            self.sampled,
            self.tc_cpu,
            self.tc_cpu / self.sampled,
            if self.txn.n > 0 {
                self.tc_cpu * 1e6 / self.txn.n as f64
            } else {
                0.0
            },
            threads.join(", "),
            self.bench_cpu,
            self.bench_cpu / self.sampled,
            self.machine_busy,
            (self.machine_busy - (self.tc_cpu + self.bench_cpu) / self.sampled).max(0.0),
        );
        if self.scenario.nodes > 1 {
            println!(
                "   {} serving nodes; the lock leader's: {:.2} s ({:.2} cores, {:.0} us per transaction)",
                self.scenario.nodes,
                self.leader_cpu,
                self.leader_cpu / self.sampled,
                per_txn(self.leader_cpu, self.txn.n)
            );
        }
        if self.scenario.store.members() > 0 {
            println!(
                "   etcd ({} members): {:.2} s ({:.0} us per transaction)",
                self.scenario.store.members(),
                self.etcd_cpu,
                per_txn(self.etcd_cpu, self.txn.n)
            );
        }
        println!(
            "   coordinator peak RSS: {:.1} MiB at the end of the window, {:.1} MiB after phase 2 drained; \
             load avg before the scenario {}",
            self.tc_rss_window_kib as f64 / 1024.0,
            self.tc_rss_peak_kib as f64 / 1024.0,
            self.load_before
        );
        if !self.tc_warnings.is_empty() {
            println!(
                "   coordinator warnings/errors ({}), first ones:",
                self.tc_warnings.len()
            );
            for line in self.tc_warnings.iter().take(5) {
                println!("     {line}");
            }
        }
    }

    fn json(&self) -> String {
        let s = &self.scenario;
        let mut value = json!({
            "scenario": s.name(),
            "clients": s.clients,
            "connections": s.connections,
            "calls": s.calls.name(),
            "branches_per_txn": s.resources().len(),
            "seconds": self.seconds,
            "tps": round(self.tps, 1),
            "txn": self.txn.json(),
            "begin": self.begin.json(),
            "register": self.register.json(),
            "commit": self.commit.json(),
            "refusals": self.refusals,
            "lock_errors": self.lock_errors(),
            "store": s.store.name(),
            "nodes": s.nodes,
            "leader_cores": round(self.leader_cpu / self.sampled, 3),
            "etcd_cpu_us_per_txn": round(per_txn(self.etcd_cpu, self.txn.n), 1),
            "tc_cpu_s": round(self.tc_cpu, 3),
            "tc_cores": round(self.tc_cpu / self.sampled, 3),
            "tc_cpu_us_per_txn": if self.txn.n > 0 { round(self.tc_cpu * 1e6 / self.txn.n as f64, 1) } else { 0.0 },
            "tc_threads_cpu_s": self.tc_threads.iter().map(|(n, c)| (n.clone(), round(*c, 3))).collect::<BTreeMap<_, _>>(),
            "tc_peak_rss_mib": round(self.tc_rss_peak_kib as f64 / 1024.0, 1),
            "bench_cpu_s": round(self.bench_cpu, 3),
            "machine_busy_cores": round(self.machine_busy, 3),
            "store_commits_per_s": self.store_commits.map(|c| round(c / self.seconds, 1)),
            "store_mutations_per_commit": self.mutations_per_commit.map(|m| round(m, 2)),
            "store_commit_ms": self.store_commit_ms.map(|m| round(m, 3)),
            "store_commits_over_10ms": self.slow_store_commits.0,
            "store_commits_over_100ms": self.slow_store_commits.1,
            "phase2_backlog_branches": self.phase2_backlog,
            "phase2_drain_ms": self.drained.map(|d| round(d.as_secs_f64() * 1e3, 1)),
            "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        });
        if s.kind == Kind::HotRow {
            value["register_includes_lock_wait"] = json!(true);
        }
        value.to_string()
    }
}

/// Microseconds of `cpu` seconds per one of `n` transactions (0 without any).
fn per_txn(cpu: f64, n: usize) -> f64 {
    if n > 0 { cpu * 1e6 / n as f64 } else { 0.0 }
}

fn print_summary(outcomes: &[Outcome]) {
    println!("\nsummary");
    println!(
        "{:<12} {:>7} {:>5} {:>6} {:>8} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7} {:>8} {:>7} {:>8} {:>7} {:>7}",
        "scenario",
        "clients",
        "conns",
        "calls",
        "store",
        "tx/s",
        "txn p50",
        "txn p99",
        "begin p99",
        "reg p50",
        "reg p99",
        "cmt p99",
        "errors",
        "tc cpu",
        "lead cpu",
        "tc us/tx",
        "etcd us/tx",
        "bench",
        "rss MiB"
    );
    for o in outcomes {
        let errors: u64 = o.refusals.values().sum();
        println!(
            "{:<12} {:>7} {:>5} {:>6} {:>8} {:>9.1} {:>8.3} {:>8.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>6} {:>7.2} {:>8.2} {:>7.0} {:>8.0} {:>7.2} {:>7.1}",
            o.scenario.name(),
            o.scenario.clients,
            o.scenario.connections,
            o.scenario.calls.name(),
            o.scenario.store_label(),
            o.tps,
            o.txn.p50_ms,
            o.txn.p99_ms,
            o.begin.p99_ms,
            o.register.p50_ms,
            o.register.p99_ms,
            o.commit.p99_ms,
            errors,
            o.tc_cpu / o.sampled,
            o.leader_cpu / o.sampled,
            per_txn(o.tc_cpu, o.txn.n),
            per_txn(o.etcd_cpu, o.txn.n),
            o.bench_cpu / o.sampled,
            o.tc_rss_peak_kib as f64 / 1024.0,
        );
    }
    println!(
        "latencies in ms; tc cpu and bench = cores used during the window (tc: every node's; lead: the first \
         node's, the lock leader of serving nodes, `etcd1x3` = three serving nodes on etcd1); tc us/tx = \
         coordinator CPU per transaction (phase 2 included); hot-row register includes the lock wait"
    );
}

/// CPU seconds of a process's threads, summed by thread name.
fn thread_cpu(pid: u32) -> Result<BTreeMap<String, f64>> {
    let mut by_name = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // Threads can end between listing and reading.
        let Ok(stat) = std::fs::read_to_string(entry?.path().join("stat")) else {
            continue;
        };
        let (name, cpu) = parse_stat(&stat)?;
        *by_name.entry(name).or_insert(0.0) += cpu;
    }
    Ok(by_name)
}

/// A coordinator process with its own data directory, killed when dropped (and by
/// PDEATHSIG if the benchmark dies).
struct Tc {
    proc: LoggedChild,
    rpc: SocketAddr,
    http: SocketAddr,
    /// The etcd members' pids, with an etcd store.
    etcd_pids: Vec<u32>,
    _data: tempfile::TempDir,
}

/// Where a coordinator node keeps its state on etcd.
#[derive(Clone, Copy)]
struct Etcd<'a> {
    endpoints: &'a [String],
    /// Its index among the nodes (node id `node + 1`).
    node: usize,
    /// One of several serving nodes (else one active node and its standbys).
    serving: bool,
}

impl Tc {
    /// A coordinator on its embedded store, or on `etcd`; started once it logs `ready`.
    fn start(bin: &Path, data_parent: &Path, extra: &[String], etcd: Option<Etcd<'_>>, ready: &str) -> Result<Tc> {
        let data = tempfile::Builder::new()
            .prefix("ferrata-tc-bench-")
            .tempdir_in(data_parent)
            .with_context(|| format!("creating a data directory in {}", data_parent.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--log-level",
            "info",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .args(extra)
        .env("NO_COLOR", "1");
        if let Some(etcd) = etcd {
            cmd.arg("--etcd")
                .arg(etcd.endpoints.join(","))
                .arg("--node-id")
                .arg((etcd.node + 1).to_string());
            if etcd.serving {
                cmd.args(["--etcd-mode", "serving"])
                    .env("FERRATA_TC_TOKEN", SERVING_TOKEN);
            }
        }
        let (proc, line) = LoggedChild::spawn("the coordinator", cmd, ready, &[])?;
        let (rpc, http) = parse_serving(&line).with_context(|| format!("no addresses in {line:?}"))?;
        Ok(Tc {
            proc,
            rpc,
            http,
            etcd_pids: Vec::new(),
            _data: data,
        })
    }

    /// Waits until this serving node knows where the lock leader is, and, if `leads`, that
    /// it is here.
    async fn wait_lock_leader(&self, leads: bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health: serde_json::Value = match http_get(self.http, "/healthz").await {
                Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
                Err(_) => serde_json::Value::Null,
            };
            let leader = &health["lock_leader"];
            if !leader["endpoint"].is_null() && (!leads || leader["this_node"] == true) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "node at {} knows no lock leader after 30 s: {health}",
                self.http
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        self.proc.kill();
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> Result<u64> {
        self.proc.peak_rss_kib()
    }

    fn warnings(&self) -> Vec<String> {
        self.proc.warnings()
    }

    fn log_tail(&self) -> String {
        self.proc.log_tail()
    }

    /// SIGTERM, then up to 15 s for a graceful exit, then SIGKILL.
    fn stop(&mut self) -> Result<()> {
        self.proc.stop(Duration::from_secs(15)).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_thread_cpu() {
        let threads = thread_cpu(std::process::id()).unwrap();
        assert!(!threads.is_empty());
        assert!(threads.values().all(|&cpu| cpu >= 0.0));
    }
}
