//! `passthrough`: sysbench straight at MariaDB versus through `ferrata-proxy`, on one
//! server, interleaved round by round (alternating which side goes first) so that drift
//! during the run (cache warm-up, noisy neighbours, CPU throttling) hits both sides
//! alike. Two more sides: HAProxy in TCP mode (Debian's `haproxy`, one thread per CPU), a
//! mature event-loop relay that knows nothing about MySQL, the peer to beat; and the floor
//! forwarder (`floor.rs`), which copies bytes with Tokio and nothing else. Prints the
//! machine, per-round figures, medians, CPU time per query of each forwarder, the
//! proxy/HAProxy ratio and the pass-through targets.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use ferrata_bench::{Sample, Sysbench, median, tail};
use ferrata_testkit::{MariaDb, MariaDbOptions};
use mysql_async::prelude::Queryable;

#[derive(Debug, Parser)]
#[command(about = "sysbench directly against MariaDB and through ferrata-proxy, interleaved")]
struct Args {
    /// Measured rounds per workload and thread count; each round runs both sides.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per sysbench run.
    #[arg(long, default_value_t = 10)]
    time: u64,
    /// Comma-separated sysbench thread counts.
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    threads: Vec<u32>,
    /// Comma-separated sysbench workloads (they must share oltp_common's tables).
    #[arg(long, value_delimiter = ',', default_value = "oltp_point_select,oltp_read_write")]
    workloads: Vec<String>,
    /// sysbench tables.
    #[arg(long, default_value_t = 4)]
    tables: u32,
    /// Rows per sysbench table.
    #[arg(long, default_value_t = 10_000)]
    table_size: u64,
    /// Unmeasured seconds per side before each workload, to warm caches and connections.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// The proxy binary [default: ferrata-proxy next to this binary].
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// Extra argument for the proxy, e.g. --proxy-arg=--worker-threads=2 (repeatable).
    #[arg(long = "proxy-arg", allow_hyphen_values = true)]
    proxy_args: Vec<String>,
    /// Extra argument for every sysbench run, e.g. --sysbench-arg=--db-ps-mode=disable
    /// (repeatable).
    #[arg(long = "sysbench-arg", allow_hyphen_values = true)]
    sysbench_args: Vec<String>,
    /// InnoDB buffer pool of the benchmarked server; large enough to hold the tables.
    #[arg(long, default_value = "256M")]
    buffer_pool: String,
    /// Forwarders reach the server through its Unix socket instead of loopback TCP (the
    /// proxy's `backend = "/path"`), as when they run on the database host.
    #[arg(long)]
    backend_socket: bool,
    /// Skip the floor forwarder (a byte-copying TCP forwarder measured as a side).
    #[arg(long)]
    no_floor: bool,
    /// Skip HAProxy (TCP mode, one thread per CPU).
    #[arg(long)]
    no_haproxy: bool,
    /// The HAProxy binary.
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy_bin: PathBuf,
}

/// ferrata-proxy/HAProxy throughput ratio to reach on every cell (the speed issue).
const HAPROXY_TARGET: f64 = 1.0;

/// Proxied/direct throughput ratio that counts as good enough, per workload.
fn target(workload: &str) -> Option<f64> {
    match workload {
        "oltp_point_select" => Some(0.85),
        "oltp_read_write" => Some(0.90),
        _ => None,
    }
}

fn main() -> ExitCode {
    // Printed by hand: returning the error from main would add a backtrace whenever
    // RUST_BACKTRACE is set, burying the sysbench or proxy output that explains it.
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("passthrough: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(!args.threads.is_empty(), "--threads must name a thread count");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;

    let db = runtime.block_on(MariaDb::start_with(MariaDbOptions {
        extra_args: vec![format!("--innodb-buffer-pool-size={}", args.buffer_pool)],
        tls: None,
    }))?;
    let server_version: String = runtime.block_on(async {
        let mut conn = db.conn().await?;
        let version = conn.query_first("SELECT VERSION()").await?;
        conn.disconnect().await?;
        anyhow::Ok(version.unwrap_or_default())
    })?;

    let proxy_bin = match &args.proxy_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("ferrata-proxy"),
    };
    print_machine(&server_version, &proxy_bin, &args)?;

    let backend = if args.backend_socket {
        db.socket_path().to_string_lossy().into_owned()
    } else {
        db.addr().to_string()
    };
    let proxy = Forwarder::start("ferrata-proxy", &proxy_bin, &backend, |listen| {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, ferrata_testkit::free_port()?));
        Ok([
            format!("--listen={listen}"),
            format!("--backend={backend}"),
            format!("--admin-listen={admin}"),
        ]
        .into_iter()
        .chain(args.proxy_args.iter().cloned())
        .collect())
    })?;
    let haproxy = if args.no_haproxy {
        None
    } else {
        Some(Forwarder::haproxy(&args.haproxy_bin, &backend)?)
    };
    let floor = if args.no_floor {
        None
    } else {
        let bin = std::env::current_exe()?.with_file_name("floor-forwarder");
        Some(Forwarder::start("floor-forwarder", &bin, &backend, |listen| {
            Ok(vec![format!("--listen={listen}"), format!("--backend={backend}")])
        })?)
    };
    let mut sides = vec![Side {
        name: "direct",
        port: db.port(),
        forwarder: None,
    }];
    sides.push(Side {
        name: "proxy",
        port: proxy.addr.port(),
        forwarder: Some(&proxy),
    });
    if let Some(haproxy) = &haproxy {
        sides.push(Side {
            name: "haproxy",
            port: haproxy.addr.port(),
            forwarder: Some(haproxy),
        });
    }
    if let Some(floor) = &floor {
        sides.push(Side {
            name: "floor",
            port: floor.addr.port(),
            forwarder: Some(floor),
        });
    }

    let started = Instant::now();
    println!("\npreparing {} tables x {} rows...", args.tables, args.table_size);
    // Every oltp_* workload shares oltp_common's tables, so one prepare serves all.
    sysbench(&args, "oltp_point_select", db.port(), args.tables, None, "prepare")?;
    println!("prepared in {:.1} s", started.elapsed().as_secs_f64());

    let mut summary = Vec::new();
    for workload in &args.workloads {
        if args.warmup > 0 {
            for side in &sides {
                side.measure(&args, workload, args.threads[0], args.warmup)?;
            }
        }
        for &threads in &args.threads {
            let mut rounds = Vec::with_capacity(args.rounds);
            for round in 0..args.rounds {
                // Rotate the order so no side always runs on a warmer (or cooler) server.
                let mut samples = vec![None; sides.len()];
                for k in 0..sides.len() {
                    let i = (round + k) % sides.len();
                    samples[i] = Some(sides[i].measure(&args, workload, threads, args.time)?);
                }
                rounds.push(Round {
                    first: sides[round % sides.len()].name,
                    samples: samples.into_iter().map(|s| s.expect("every side measured")).collect(),
                });
            }
            summary.push(print_rounds(workload, threads, args.time, &sides, &rounds));
        }
    }
    print_summary(&sides, &summary);
    for forwarder in sides.iter().filter_map(|side| side.forwarder) {
        println!(
            "peak resident memory of {}: {:.1} MiB",
            forwarder.name,
            forwarder.peak_rss_kib()? as f64 / 1024.0
        );
    }
    println!(
        "\ntotal {:.0} s; proxy: {}",
        started.elapsed().as_secs_f64(),
        proxy_command(&proxy_bin, &args.proxy_args)
    );
    Ok(())
}

/// One way to reach the server: directly, or through a forwarder process.
struct Side<'a> {
    name: &'static str,
    port: u16,
    forwarder: Option<&'a Forwarder>,
}

impl Side<'_> {
    /// One sysbench run against this side, with the forwarder's CPU time per query.
    fn measure(&self, args: &Args, workload: &str, threads: u32, secs: u64) -> Result<Sample> {
        let cpu_before = self.forwarder.map(Forwarder::cpu_seconds).transpose()?;
        let output =
            sysbench(args, workload, self.port, threads, Some(secs), "run").with_context(|| match self.forwarder {
                Some(f) => format!("through {}; its log:\n{}", f.name, f.log_tail()),
                None => "directly against MariaDB".to_owned(),
            })?;
        let mut sample = Sample::parse(&output)?;
        if let (Some(f), Some(before)) = (self.forwarder, cpu_before) {
            let used = f.cpu_seconds()? - before;
            sample.cpu_us_per_query = Some(used * 1e6 / (sample.qps * secs as f64));
        }
        Ok(sample)
    }
}

fn print_machine(server_version: &str, proxy_bin: &Path, args: &Args) -> Result<()> {
    ferrata_bench::print_machine(server_version)?;
    println!("  proxy:     {}", proxy_command(proxy_bin, &args.proxy_args));
    println!(
        "settings: {} rounds x {} s, threads {:?}, {} tables x {} rows, buffer pool {}, warm-up {} s, \
         forwarders reach the server over {}{}",
        args.rounds,
        args.time,
        args.threads,
        args.tables,
        args.table_size,
        args.buffer_pool,
        args.warmup,
        if args.backend_socket {
            "its Unix socket"
        } else {
            "loopback TCP"
        },
        if args.sysbench_args.is_empty() {
            String::new()
        } else {
            format!(", sysbench {}", args.sysbench_args.join(" "))
        }
    );
    Ok(())
}

fn proxy_command(bin: &Path, args: &[String]) -> String {
    std::iter::once(bin.display().to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs sysbench with the tables and extra arguments of `args`.
fn sysbench(args: &Args, workload: &str, port: u16, threads: u32, time: Option<u64>, command: &str) -> Result<String> {
    Sysbench {
        tables: args.tables,
        table_size: args.table_size,
        extra_args: args.sysbench_args.clone(),
    }
    .run(workload, port, threads, time, command)
}

/// A forwarding process under test (ferrata-proxy, HAProxy or the floor forwarder), killed
/// when dropped (and by PDEATHSIG if we die).
struct Forwarder {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
    /// Its config file, if it reads one.
    _config: Option<tempfile::NamedTempFile>,
}

impl Forwarder {
    /// Starts `bin` with the arguments `args_for(listen address)` gives, and waits until
    /// it listens.
    fn start(
        name: &'static str,
        bin: &Path,
        backend: &str,
        args_for: impl FnOnce(SocketAddr) -> Result<Vec<String>>,
    ) -> Result<Forwarder> {
        ensure!(
            bin.is_file(),
            "{} not found; build it with `cargo build --release -p ferrata-proxy -p ferrata-bench` or pass --proxy-bin",
            bin.display()
        );
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ferrata_testkit::free_port()?));
        let log = tempfile::Builder::new()
            .prefix("ferrata-bench-")
            .suffix(".log")
            .tempfile()?;
        let mut cmd = Command::new(bin);
        cmd.args(args_for(addr)?)
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?);
        let child = ferrata_testkit::spawn_tied(cmd).with_context(|| format!("starting {}", bin.display()))?;
        let mut forwarder = Forwarder {
            name,
            child,
            addr,
            log,
            _config: None,
        };
        forwarder
            .wait_listening()
            .with_context(|| format!("{name} in front of {backend}"))?;
        Ok(forwarder)
    }

    /// HAProxy in TCP mode in front of `backend` (a TCP address or a Unix socket path), one
    /// thread per CPU, in the foreground.
    fn haproxy(bin: &Path, backend: &str) -> Result<Forwarder> {
        ensure!(
            bin.is_file(),
            "{} not found; install Debian's haproxy (scripts/setup-debian.sh does) or pass --no-haproxy",
            bin.display()
        );
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let server = match backend.starts_with('/') {
            true => format!("unix@{backend}"),
            false => backend.to_owned(),
        };
        let config = tempfile::Builder::new()
            .prefix("ferrata-bench-haproxy-")
            .suffix(".cfg")
            .tempfile()?;
        let path = config.path().to_owned();
        let mut forwarder = Forwarder::start("haproxy", bin, backend, |listen| {
            std::fs::write(
                &path,
                format!(
                    "global\n    nbthread {threads}\n    maxconn 2000\n\
                     defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\
                     listen mysql\n    bind {listen}\n    server db {server}\n"
                ),
            )?;
            Ok(vec!["-db".into(), "-f".into(), path.display().to_string()])
        })?;
        forwarder._config = Some(config);
        Ok(forwarder)
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("exited during startup ({status}):\n{}", self.log_tail());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "did not listen on {} within 30 s:\n{}",
                self.addr,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// User plus system CPU time the process has used so far, from /proc.
    fn cpu_seconds(&self) -> Result<f64> {
        ferrata_bench::process_cpu_seconds(self.child.id())
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> Result<u64> {
        ferrata_bench::peak_rss_kib(self.child.id())
    }

    fn log_tail(&self) -> String {
        match std::fs::read(self.log.path()) {
            Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), 30),
            Err(err) => format!("(cannot read the log: {err})"),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // Errors mean it has already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One round: a sample per side, in the order of `sides`.
struct Round {
    first: &'static str,
    samples: Vec<Sample>,
}

/// One line of the final summary: per side, median tps and median ratio to direct; and
/// the median proxy/HAProxy ratio, with HAProxy.
struct Outcome {
    workload: String,
    threads: u32,
    tps: Vec<f64>,
    ratios: Vec<f64>,
    cpu_us: Vec<Option<f64>>,
    vs_haproxy: Option<f64>,
}

fn print_rounds(workload: &str, threads: u32, time: u64, sides: &[Side], rounds: &[Round]) -> Outcome {
    println!("\n{workload}, {threads} threads, {time} s per run");
    let mut header = format!("{:>5}  {:<7}", "round", "first");
    for side in sides {
        header += &format!(
            "  | {:>6} tps {:>9} {:>7} {:>6} {:>6}",
            side.name, "qps", "p95 ms", "ratio", "cpu us"
        );
    }
    println!("{header}");
    let line = |label: &str, first: &str, samples: &[Sample], ratios: &[f64]| {
        let mut text = format!("{label:>5}  {first:<7}");
        for (sample, ratio) in samples.iter().zip(ratios) {
            let cpu = sample.cpu_us_per_query.map_or("-".to_owned(), |c| format!("{c:.1}"));
            text += &format!(
                "  | {:>10.1} {:>9.1} {:>7.2} {:>6.3} {:>6}",
                sample.tps, sample.qps, sample.p95_ms, ratio, cpu
            );
        }
        println!("{text}");
    };
    let ratios_of =
        |round: &Round| -> Vec<f64> { round.samples.iter().map(|s| s.tps / round.samples[0].tps).collect() };
    for (i, round) in rounds.iter().enumerate() {
        line(&(i + 1).to_string(), round.first, &round.samples, &ratios_of(round));
    }
    let med = |side: usize, f: &dyn Fn(&Sample) -> f64| median(rounds.iter().map(|r| f(&r.samples[side])).collect());
    let medians: Vec<Sample> = (0..sides.len())
        .map(|i| Sample {
            tps: med(i, &|s| s.tps),
            qps: med(i, &|s| s.qps),
            p95_ms: med(i, &|s| s.p95_ms),
            errors: rounds.iter().map(|r| r.samples[i].errors).sum(),
            cpu_us_per_query: rounds[0].samples[i]
                .cpu_us_per_query
                .map(|_| med(i, &|s| s.cpu_us_per_query.unwrap_or(f64::NAN))),
        })
        .collect();
    let ratios: Vec<f64> = (0..sides.len())
        .map(|i| median(rounds.iter().map(|r| ratios_of(r)[i]).collect()))
        .collect();
    line("", "median", &medians, &ratios);
    if medians.iter().any(|m| m.errors > 0) {
        let counts: Vec<String> = sides
            .iter()
            .zip(&medians)
            .map(|(s, m)| format!("{} {}", s.name, m.errors))
            .collect();
        println!("ignored errors (deadlocks etc.): {}", counts.join(", "));
    }
    println!(
        "ratio = side/direct transactions per second, median of the per-round ratios; cpu us = the \
         forwarder's CPU time per query; proxy {}",
        verdict(workload, ratios[1])
    );
    // Side 1 is the proxy.
    let vs_haproxy = sides
        .iter()
        .position(|s| s.name == "haproxy")
        .map(|h| median(rounds.iter().map(|r| r.samples[1].tps / r.samples[h].tps).collect()));
    if let Some(x) = vs_haproxy {
        println!(
            "proxy/haproxy = {x:.3} (median of the per-round ratios); {}",
            haproxy_verdict(x)
        );
    }
    Outcome {
        workload: workload.to_owned(),
        threads,
        tps: medians.iter().map(|m| m.tps).collect(),
        ratios,
        cpu_us: medians.iter().map(|m| m.cpu_us_per_query).collect(),
        vs_haproxy,
    }
}

fn print_summary(sides: &[Side], outcomes: &[Outcome]) {
    println!("\nsummary (medians)");
    let mut header = format!("{:<20} {:>7}  {:>10}", "workload", "threads", "direct tps");
    for side in &sides[1..] {
        header += &format!("  {:>10} {:>6} {:>6}", format!("{} tps", side.name), "ratio", "cpu us");
    }
    println!("{header}  proxy verdict  proxy/haproxy");
    for outcome in outcomes {
        let mut text = format!(
            "{:<20} {:>7}  {:>10.1}",
            outcome.workload, outcome.threads, outcome.tps[0]
        );
        for i in 1..sides.len() {
            let cpu = outcome.cpu_us[i].map_or("-".to_owned(), |c| format!("{c:.1}"));
            text += &format!("  {:>10.1} {:>6.3} {:>6}", outcome.tps[i], outcome.ratios[i], cpu);
        }
        let vs_haproxy = outcome
            .vs_haproxy
            .map_or("-".to_owned(), |x| format!("{x:.3} ({})", haproxy_verdict(x)));
        println!(
            "{text}  {}  {vs_haproxy}",
            verdict(&outcome.workload, outcome.ratios[1])
        );
    }
}

fn haproxy_verdict(ratio: f64) -> String {
    match ratio >= HAPROXY_TARGET {
        true => format!("target >= {HAPROXY_TARGET:.1}: PASS"),
        false => format!("target >= {HAPROXY_TARGET:.1}: MISS"),
    }
}

fn verdict(workload: &str, ratio: f64) -> String {
    match target(workload) {
        Some(target) if ratio >= target => format!("target >= {target:.2}: PASS"),
        Some(target) => format!("target >= {target:.2}: MISS"),
        None => "no target".to_owned(),
    }
}
