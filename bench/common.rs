//! What the benchmark drivers share (the `ferrata_bench` library of this package): the
//! machine description, sysbench runs and their reports, medians and percentiles, CPU and
//! memory of processes from /proc, Prometheus text, and child processes whose log is read
//! line by line.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ferrata_testkit::etcd::EtcdCluster;
use ferrata_testkit::{APP_PASSWORD, APP_USER};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where a benchmarked coordinator keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// The embedded store (write-ahead log and redb).
    Redb,
    /// etcd, one member (started by the benchmark).
    Etcd1,
    /// etcd, three members.
    Etcd3,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Redb => "redb",
            StoreKind::Etcd1 => "etcd1",
            StoreKind::Etcd3 => "etcd3",
        }
    }

    /// etcd members, 0 for the embedded store.
    pub fn members(self) -> usize {
        match self {
            StoreKind::Redb => 0,
            StoreKind::Etcd1 => 1,
            StoreKind::Etcd3 => 3,
        }
    }

    /// A fresh etcd cluster of its members (`None` for the embedded store).
    pub async fn start_etcd(self) -> Result<Option<EtcdCluster>> {
        Ok(match self.members() {
            0 => None,
            members => Some(EtcdCluster::start(members).await?),
        })
    }
}

/// Prints the `machine` block: CPUs, CPU model, memory, kernel, the MariaDB version given
/// and sysbench's version.
pub fn print_machine(server_version: &str) -> Result<()> {
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
    let sysbench_version = match Command::new("sysbench").arg("--version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(err) => format!("not available ({err})"),
    };

    println!("machine");
    println!("  cpus:      {}", std::thread::available_parallelism()?);
    println!("  cpu model: {cpu}");
    println!("  memory:    {:.1} GiB", memory_kib as f64 / 1024.0 / 1024.0);
    println!("  kernel:    {}", kernel.trim());
    println!("  mariadbd:  {server_version}");
    println!("  sysbench:  {sysbench_version}");
    Ok(())
}

/// The 1, 5 and 15 minute load averages, from /proc/loadavg.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// How sysbench's `oltp_*` workloads are run: their tables (in database `test`, as
/// [`APP_USER`]) and extra arguments for every run.
#[derive(Debug, Clone)]
pub struct Sysbench {
    pub tables: u32,
    pub table_size: u64,
    /// Appended to every run, e.g. `--db-ps-mode=disable`.
    pub extra_args: Vec<String>,
}

impl Sysbench {
    /// Runs sysbench to completion against `127.0.0.1:port` and returns its standard
    /// output. `time: None` leaves the run length to sysbench (used for `prepare`).
    pub fn run(&self, workload: &str, port: u16, threads: u32, time: Option<u64>, command: &str) -> Result<String> {
        let mut cmd = Command::new("sysbench");
        cmd.arg(workload)
            .args([
                "--db-driver=mysql",
                "--mysql-host=127.0.0.1",
                &format!("--mysql-port={port}"),
                &format!("--mysql-user={APP_USER}"),
                &format!("--mysql-password={APP_PASSWORD}"),
                "--mysql-db=test",
                &format!("--tables={}", self.tables),
                &format!("--table-size={}", self.table_size),
                &format!("--threads={threads}"),
            ])
            .args(time.map(|secs| format!("--time={secs}")))
            .args(&self.extra_args)
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
}

/// Figures from one sysbench run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub tps: f64,
    pub qps: f64,
    pub p95_ms: f64,
    pub errors: u64,
    /// CPU time a forwarder spent per query (user + system), for forwarded runs.
    pub cpu_us_per_query: Option<f64>,
}

impl Sample {
    /// Reads sysbench 1.0's final report, e.g.
    /// `    transactions:   123 (12.30 per sec.)` and `         95th percentile:   0.50`.
    pub fn parse(output: &str) -> Result<Sample> {
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
            cpu_us_per_query: None,
        })
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Latency percentiles of a set of samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples` (nanoseconds); sorts them.
    pub fn of(samples: &mut [u64]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1] as f64 / 1e6
        };
        Latency {
            n: samples.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: samples[samples.len() - 1] as f64 / 1e6,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "n": self.n,
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
        })
    }
}

pub fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// (command name, user + system CPU seconds) from a /proc/.../stat file.
pub fn parse_stat(stat: &str) -> Result<(String, f64)> {
    let (head, rest) = stat.rsplit_once(')').context("malformed stat file")?;
    let name = head.split_once('(').map_or("", |(_, n)| n).to_owned();
    // Fields after the parenthesised name; utime and stime are fields 14 and 15 of the
    // whole line, in clock ticks.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    ensure!(fields.len() > 12, "short stat file");
    let ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok((name, ticks as f64 / clock_ticks()))
}

/// User + system CPU seconds from a stat file such as `/proc/self/stat`.
pub fn cpu_seconds(stat_path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(stat_path).with_context(|| format!("reading {stat_path}"))?;
    Ok(parse_stat(&stat)?.1)
}

/// User + system CPU seconds process `pid` has used so far.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// Peak resident memory of process `pid` so far (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// Busy and total jiffies of all CPUs, from /proc/stat.
pub fn machine_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(values.len() == 8, "short cpu line in /proc/stat");
    let total: u64 = values.iter().sum();
    let idle = values[3] + values[4];
    Ok((total - idle, total))
}

/// Sum of every sample of `name` (all label sets) in Prometheus text output.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    metric_labeled(text, name, "")
}

/// Sum of the samples of `name` whose labels contain `label` (e.g. `le="0.01"`).
pub fn metric_labeled(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut sum = None;
    for (labels, v) in metric_samples(text, name) {
        if labels.contains(label) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Every sample of `name` as (labels without the braces, value), in the order exposed.
pub fn metric_samples(text: &str, name: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, labels) = key.split_once('{').unwrap_or((key, ""));
        if metric == name
            && let Ok(v) = value.trim().parse::<f64>()
        {
            samples.push((labels.trim_end_matches('}').to_owned(), v));
        }
    }
    samples
}

/// The body of an HTTP/1.0 GET (the connection closes after the answer).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| anyhow!("GET {path}: no answer within 5 s"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP response")?;
    ensure!(
        head.split_whitespace().nth(1) == Some("200"),
        "GET {path}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}

/// Removes ANSI escape sequences (logs are coloured when written to a terminal).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address after `key` (e.g. `listen=`) in a log line, up to the next space.
pub fn addr_after(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// The rpc and http addresses of the line `... ferrata-tc serving rpc=A http=B ...` (or a
/// standby's `... standing by ... rpc=A http=B ...`).
pub fn parse_serving(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("ferrata-tc serving") && !line.contains("standing by") {
        return None;
    }
    Some((addr_after(line, "rpc=")?, addr_after(line, "http=")?))
}

/// What the log reader keeps of a child's stderr.
#[derive(Default)]
struct LogState {
    tail: VecDeque<String>,
    warnings: Vec<String>,
    /// Lines containing one of the watched markers.
    watched: Vec<String>,
}

/// Lines of the log tail kept for error messages.
const LOG_TAIL_LINES: usize = 40;

/// A child process whose stderr is read line by line for its whole life (so it never blocks
/// on a full pipe), keeping the last lines, the `WARN`/`ERROR` lines and the lines with
/// watched markers. Killed when dropped, and by PDEATHSIG if this process dies.
pub struct LoggedChild {
    name: String,
    child: Child,
    log: Arc<Mutex<LogState>>,
}

impl LoggedChild {
    /// Starts `cmd` (stdout discarded, stderr read) and waits up to 30 s for a stderr line
    /// containing `ready`, which it returns with ANSI codes removed. Lines containing one of
    /// `watch` are kept for [`LoggedChild::wait_for`]. `name` is used in error messages.
    pub fn spawn(name: &str, mut cmd: Command, ready: &str, watch: &[&str]) -> Result<(LoggedChild, String)> {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = ferrata_testkit::spawn_tied(cmd).with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(LogState::default()));
        let thread_log = Arc::clone(&log);
        let markers: Vec<String> = std::iter::once(ready)
            .chain(watch.iter().copied())
            .map(String::from)
            .collect();
        std::thread::Builder::new().name(format!("log-{name}")).spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let line = strip_ansi(String::from_utf8_lossy(&raw).trim_end());
                let level = line.split_whitespace().nth(1).unwrap_or("");
                let mut state = thread_log.lock().expect("log lock");
                if matches!(level, "WARN" | "ERROR") || line.contains("panicked") {
                    state.warnings.push(line.clone());
                }
                if markers.iter().any(|m| line.contains(m.as_str())) {
                    state.watched.push(line.clone());
                }
                state.tail.push_back(line);
                if state.tail.len() > LOG_TAIL_LINES {
                    state.tail.pop_front();
                }
            }
        })?;
        let mut proc = LoggedChild {
            name: name.to_owned(),
            child,
            log,
        };
        match proc.wait_for(ready, Duration::from_secs(30))? {
            Some(line) => Ok((proc, line)),
            None => bail!("{name} did not log {ready:?} within 30 s:\n{}", proc.log_tail()),
        }
    }

    /// Waits up to `timeout` for a log line containing `marker` (one of those given to
    /// `spawn`); `None` if none came. Fails if the process exits meanwhile.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Option<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .log
                .lock()
                .expect("log lock")
                .watched
                .iter()
                .find(|l| l.contains(marker))
            {
                return Ok(Some(line.clone()));
            }
            if let Some(status) = self.child.try_wait()? {
                // Let the reader thread take in the last lines.
                std::thread::sleep(Duration::from_millis(100));
                bail!("{} exited ({status}):\n{}", self.name, self.log_tail());
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the log tail) if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("{} exited ({status}):\n{}", self.name, self.log_tail()),
            None => Ok(()),
        }
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        process_cpu_seconds(self.pid())
    }

    pub fn peak_rss_kib(&self) -> Result<u64> {
        peak_rss_kib(self.pid())
    }

    /// The `WARN` and `ERROR` lines so far.
    pub fn warnings(&self) -> Vec<String> {
        self.log.lock().expect("log lock").warnings.clone()
    }

    pub fn log_tail(&self) -> String {
        let state = self.log.lock().expect("log lock");
        state.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        // Errors mean it has already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL. Fails unless the process
    /// was still running and exited successfully within `grace`.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if self.child.try_wait()?.is_some() {
            bail!("{} had already exited:\n{}", self.name, self.log_tail());
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                ensure!(
                    status.success(),
                    "{} exited with {status}:\n{}",
                    self.name,
                    self.log_tail()
                );
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("{} did not stop within {grace:?} of SIGTERM; killed it", self.name)
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        self.kill();
    }
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

    #[test]
    fn parses_the_serving_line() {
        let coloured = "\u{1b}[2m2025-01-01T00:00:00.000000Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
                        \u{1b}[2mferrata_tc::server\u{1b}[0m\u{1b}[2m:\u{1b}[0m ferrata-tc serving \
                        \u{1b}[3mrpc\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:40001 \
                        \u{1b}[3mhttp\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:40002 node_id=1 tls=false";
        let line = strip_ansi(coloured);
        assert!(line.contains(" INFO "));
        let (rpc, http) = parse_serving(&line).expect("parsed");
        assert_eq!(rpc.port(), 40001);
        assert_eq!(http.port(), 40002);
        assert!(parse_serving("INFO something else rpc=127.0.0.1:1 http=127.0.0.1:2").is_none());
        let ready = "2025-01-01T00:00:00Z  INFO ferrata_proxy::server: ferrata-proxy ready \
                     listen=127.0.0.1:3307 admin=127.0.0.1:9307 backend=127.0.0.1:3306";
        assert_eq!(addr_after(ready, "listen=").unwrap().port(), 3307);
        assert_eq!(addr_after(ready, "admin=").unwrap().port(), 9307);
        assert!(addr_after(ready, "nothing=").is_none());
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        let l = Latency::of(&mut samples);
        assert_eq!((l.n, l.p50_ms, l.p99_ms, l.max_ms), (100, 50.0, 99.0, 100.0));
        assert_eq!(Latency::of(&mut []).n, 0);
    }

    #[test]
    fn reads_prometheus_samples() {
        let text = "# TYPE x counter\nferrata_tc_store_commits_total 12\n\
                    ferrata_tc_transactions{status=\"Begin\"} 2\nferrata_tc_transactions{status=\"Committed\"} 3\n";
        assert_eq!(metric_sum(text, "ferrata_tc_store_commits_total"), Some(12.0));
        assert_eq!(metric_sum(text, "ferrata_tc_transactions"), Some(5.0));
        assert_eq!(metric_sum(text, "ferrata_tc_missing"), None);
        let buckets = "x_bucket{le=\"0.01\"} 7\nx_bucket{le=\"0.1\"} 9\nx_bucket{le=\"+Inf\"} 10\n";
        assert_eq!(metric_labeled(buckets, "x_bucket", "le=\"0.1\""), Some(9.0));
        assert_eq!(metric_labeled(buckets, "x_bucket", "le=\"+Inf\""), Some(10.0));
        assert_eq!(
            metric_samples(text, "ferrata_tc_transactions"),
            vec![
                ("status=\"Begin\"".to_owned(), 2.0),
                ("status=\"Committed\"".to_owned(), 3.0)
            ]
        );
    }

    #[test]
    fn reads_proc_stat() {
        let (name, cpu) = parse_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert!(!name.is_empty());
        assert!(cpu >= 0.0);
        let (busy, total) = machine_jiffies().unwrap();
        assert!(busy <= total);
        assert!(peak_rss_kib(std::process::id()).unwrap() > 0);
    }
}
