//! `passthrough`: sysbench straight at MariaDB versus through `ferrata-proxy`, on one
//! server, interleaved round by round (alternating which side goes first) so that drift
//! during the run (cache warm-up, noisy neighbours, CPU throttling) hits both sides
//! alike. Prints the machine, per-round figures, medians and the pass-through targets.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb, MariaDbOptions};
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
}

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

    let proxy = Proxy::start(&proxy_bin, &args.proxy_args, db.addr())?;
    let direct = db.port();
    let proxied = proxy.addr.port();

    let started = Instant::now();
    println!("\npreparing {} tables x {} rows...", args.tables, args.table_size);
    // Every oltp_* workload shares oltp_common's tables, so one prepare serves all.
    sysbench(&args, "oltp_point_select", direct, args.tables, None, "prepare")?;
    println!("prepared in {:.1} s", started.elapsed().as_secs_f64());

    let mut summary = Vec::new();
    for workload in &args.workloads {
        if args.warmup > 0 {
            for port in [direct, proxied] {
                let threads = args.threads[0];
                sysbench(&args, workload, port, threads, Some(args.warmup), "run")
                    .with_context(|| proxy.failure_context(port == proxied))?;
            }
        }
        for &threads in &args.threads {
            let mut rounds = Vec::with_capacity(args.rounds);
            for round in 0..args.rounds {
                // Alternate the order so neither side always runs on a warmer server.
                let proxied_first = round % 2 == 1;
                let measure = |port: u16| -> Result<Sample> {
                    let output = sysbench(&args, workload, port, threads, Some(args.time), "run")
                        .with_context(|| proxy.failure_context(port == proxied))?;
                    Sample::parse(&output)
                };
                let (direct_sample, proxied_sample) = if proxied_first {
                    let p = measure(proxied)?;
                    (measure(direct)?, p)
                } else {
                    let d = measure(direct)?;
                    (d, measure(proxied)?)
                };
                rounds.push(Round {
                    proxied_first,
                    direct: direct_sample,
                    proxied: proxied_sample,
                });
            }
            summary.push(print_rounds(workload, threads, args.time, &rounds));
        }
    }
    print_summary(&summary);
    println!(
        "\ntotal {:.0} s; proxy: {}",
        started.elapsed().as_secs_f64(),
        proxy_command(&proxy_bin, &args.proxy_args)
    );
    Ok(())
}

fn print_machine(server_version: &str, proxy_bin: &Path, args: &Args) -> Result<()> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown", |(_, model)| model.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let sysbench_version = Command::new("sysbench")
        .arg("--version")
        .output()
        .context("running sysbench --version (is sysbench installed?)")?;

    println!("machine");
    println!("  cpus:      {}", std::thread::available_parallelism()?);
    println!("  cpu model: {cpu}");
    println!("  memory:    {:.1} GiB", memory_kib as f64 / 1024.0 / 1024.0);
    println!("  kernel:    {}", kernel.trim());
    println!("  mariadbd:  {server_version}");
    println!(
        "  sysbench:  {}",
        String::from_utf8_lossy(&sysbench_version.stdout).trim()
    );
    println!("  proxy:     {}", proxy_command(proxy_bin, &args.proxy_args));
    println!(
        "settings: {} rounds x {} s, threads {:?}, {} tables x {} rows, buffer pool {}, warm-up {} s{}",
        args.rounds,
        args.time,
        args.threads,
        args.tables,
        args.table_size,
        args.buffer_pool,
        args.warmup,
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

/// Runs sysbench to completion and returns its standard output. `time: None` leaves
/// the run length to sysbench (used for `prepare`).
fn sysbench(args: &Args, workload: &str, port: u16, threads: u32, time: Option<u64>, command: &str) -> Result<String> {
    let mut cmd = Command::new("sysbench");
    cmd.arg(workload)
        .args([
            "--db-driver=mysql",
            "--mysql-host=127.0.0.1",
            &format!("--mysql-port={port}"),
            &format!("--mysql-user={APP_USER}"),
            &format!("--mysql-password={APP_PASSWORD}"),
            "--mysql-db=test",
            &format!("--tables={}", args.tables),
            &format!("--table-size={}", args.table_size),
            &format!("--threads={threads}"),
        ])
        .args(time.map(|secs| format!("--time={secs}")))
        .args(&args.sysbench_args)
        .arg(command)
        .stdin(Stdio::null());
    let output = cmd.output().context("running sysbench (is sysbench installed?)")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "sysbench {workload} {command} on port {port} failed ({}):\n{}{}",
            output.status,
            tail(&stdout, 20),
            tail(&String::from_utf8_lossy(&output.stderr), 20)
        );
    }
    Ok(stdout)
}

/// The proxy under test, killed when dropped (and by PDEATHSIG if we die).
struct Proxy {
    child: Child,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Proxy {
    fn start(bin: &Path, extra_args: &[String], backend: SocketAddr) -> Result<Proxy> {
        ensure!(
            bin.is_file(),
            "proxy binary {} not found; build it with `cargo build --release -p ferrata-proxy` or pass --proxy-bin",
            bin.display()
        );
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ferrata_testkit::free_port()?));
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, ferrata_testkit::free_port()?));
        let log = tempfile::Builder::new()
            .prefix("ferrata-bench-proxy-")
            .suffix(".log")
            .tempfile()?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--listen={addr}"))
            .arg(format!("--backend={backend}"))
            .arg(format!("--admin-listen={admin}"))
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?);
        let child = ferrata_testkit::spawn_tied(cmd).with_context(|| format!("starting {}", bin.display()))?;
        let mut proxy = Proxy { child, addr, log };
        proxy.wait_listening()?;
        Ok(proxy)
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the proxy exited during startup ({status}):\n{}", self.log_tail());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the proxy did not listen on {} within 30 s:\n{}",
                self.addr,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// For errors from a sysbench run: the proxy's log if the run went through it.
    fn failure_context(&self, proxied: bool) -> String {
        if proxied {
            format!("through the proxy; proxy log:\n{}", self.log_tail())
        } else {
            "directly against MariaDB".to_owned()
        }
    }

    fn log_tail(&self) -> String {
        match std::fs::read(self.log.path()) {
            Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), 30),
            Err(err) => format!("(cannot read the proxy log: {err})"),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Errors mean it has already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Figures from one sysbench run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    tps: f64,
    qps: f64,
    p95_ms: f64,
    errors: u64,
}

impl Sample {
    /// Reads sysbench 1.0's final report, e.g.
    /// `    transactions:   123 (12.30 per sec.)` and `         95th percentile:   0.50`.
    fn parse(output: &str) -> Result<Sample> {
        let field = |label: &str| {
            output
                .lines()
                .map(str::trim_start)
                .find_map(|line| line.strip_prefix(label))
                .with_context(|| format!("no {label:?} in sysbench's output:\n{}", tail(output, 30)))
        };
        let per_sec = |label: &str| -> Result<f64> {
            let line = field(label)?;
            let rate = line
                .split_once('(')
                .and_then(|(_, rest)| rest.split_once(" per sec."))
                .with_context(|| format!("no rate in {label} {line:?}"))?
                .0;
            rate.trim()
                .parse()
                .with_context(|| format!("bad rate in {label} {line:?}"))
        };
        let first_number = |label: &str| -> Result<f64> {
            let line = field(label)?;
            line.split_whitespace()
                .next()
                .and_then(|word| word.parse().ok())
                .with_context(|| format!("bad number in {label} {line:?}"))
        };
        Ok(Sample {
            tps: per_sec("transactions:")?,
            qps: per_sec("queries:")?,
            p95_ms: first_number("95th percentile:")?,
            errors: first_number("ignored errors:")? as u64,
        })
    }
}

struct Round {
    proxied_first: bool,
    direct: Sample,
    proxied: Sample,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.proxied.tps / self.direct.tps
    }
}

/// One line of the final summary.
struct Outcome {
    workload: String,
    threads: u32,
    direct_tps: f64,
    proxied_tps: f64,
    ratio: f64,
}

fn print_rounds(workload: &str, threads: u32, time: u64, rounds: &[Round]) -> Outcome {
    println!("\n{workload}, {threads} threads, {time} s per run");
    println!(
        "{:>5}  {:<7}  {:>10} {:>10} {:>8}  |  {:>10} {:>10} {:>8}  |  {:>6}",
        "round", "first", "direct tps", "qps", "p95 ms", "proxy tps", "qps", "p95 ms", "ratio"
    );
    for (i, round) in rounds.iter().enumerate() {
        println!(
            "{:>5}  {:<7}  {:>10.1} {:>10.1} {:>8.2}  |  {:>10.1} {:>10.1} {:>8.2}  |  {:>6.3}",
            i + 1,
            if round.proxied_first { "proxy" } else { "direct" },
            round.direct.tps,
            round.direct.qps,
            round.direct.p95_ms,
            round.proxied.tps,
            round.proxied.qps,
            round.proxied.p95_ms,
            round.ratio()
        );
    }
    let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let outcome = Outcome {
        workload: workload.to_owned(),
        threads,
        direct_tps: med(&|r| r.direct.tps),
        proxied_tps: med(&|r| r.proxied.tps),
        ratio: med(&Round::ratio),
    };
    println!(
        "{:>5}  {:<7}  {:>10.1} {:>10.1} {:>8.2}  |  {:>10.1} {:>10.1} {:>8.2}  |  {:>6.3}",
        "",
        "median",
        outcome.direct_tps,
        med(&|r| r.direct.qps),
        med(&|r| r.direct.p95_ms),
        outcome.proxied_tps,
        med(&|r| r.proxied.qps),
        med(&|r| r.proxied.p95_ms),
        outcome.ratio
    );
    let errors = |f: fn(&Round) -> u64| rounds.iter().map(f).sum::<u64>();
    let (direct_errors, proxied_errors) = (errors(|r| r.direct.errors), errors(|r| r.proxied.errors));
    if direct_errors + proxied_errors > 0 {
        println!("ignored errors (deadlocks etc.): direct {direct_errors}, proxy {proxied_errors}");
    }
    println!(
        "ratio = proxied/direct transactions per second, median of the per-round ratios; {}",
        verdict(workload, outcome.ratio)
    );
    outcome
}

fn print_summary(outcomes: &[Outcome]) {
    println!("\nsummary");
    println!(
        "{:<20} {:>7}  {:>10}  {:>10}  {:>6}  verdict",
        "workload", "threads", "direct tps", "proxy tps", "ratio"
    );
    for outcome in outcomes {
        println!(
            "{:<20} {:>7}  {:>10.1}  {:>10.1}  {:>6.3}  {}",
            outcome.workload,
            outcome.threads,
            outcome.direct_tps,
            outcome.proxied_tps,
            outcome.ratio,
            verdict(&outcome.workload, outcome.ratio)
        );
    }
}

fn verdict(workload: &str, ratio: f64) -> String {
    match target(workload) {
        Some(target) if ratio >= target => format!("target >= {target:.2}: PASS"),
        Some(target) => format!("target >= {target:.2}: MISS"),
        None => "no target".to_owned(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysbench_report() {
        let report = "\
SQL statistics:
    queries performed:
        read:                            140000
        other:                           20000
        total:                           200000
    transactions:                        10000  (999.50 per sec.)
    queries:                             200000 (19990.05 per sec.)
    ignored errors:                      3      (0.30 per sec.)
    reconnects:                          0      (0.00 per sec.)

Latency (ms):
         min:                                    0.05
         avg:                                    1.00
         max:                                    9.00
         95th percentile:                        2.48
         sum:                                 9999.00
";
        let sample = Sample::parse(report).unwrap();
        assert_eq!(sample.tps, 999.50);
        assert_eq!(sample.qps, 19990.05);
        assert_eq!(sample.p95_ms, 2.48);
        assert_eq!(sample.errors, 3);
        assert!(Sample::parse("FATAL: nothing").is_err());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
