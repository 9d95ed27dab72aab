//! What the coordinator's integration tests share: the real `ferrata-tc` binary as a child
//! process (`Tc`), a scriptable resource manager that records the phase-2 commands it gets
//! (`TestRm`), a minimal HTTP/1.1 client (`Http`), and small gRPC helpers.
//!
//! Nothing here sleeps to synchronise: tests await events (a log line, a command received,
//! a stream ending) or, where the coordinator offers no event, poll a status with a deadline.

// Every test binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferrata_rpc::client::{
    AckWhen, Attachment, ClientConfig, CommandHandler, GuardSink, IgnoreGuards, TcClient, ack_now, attach,
};
use ferrata_rpc::{ErrorCode, pb};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use ferrata_rpc;

mod crash;
#[allow(unused_imports)]
pub use crash::{check_every_state_kept, leave_every_state};

#[allow(unused_imports)]
pub use ferrata_testkit::service::Service;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ferrata-tc");

/// How long a test waits for something that should happen promptly. Generous: the machine
/// may be small and busy; a healthy run never gets near it.
pub const EVENT: Duration = Duration::from_secs(20);

/// Interval of status polls, where no event exists.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------
// The coordinator process
// ---------------------------------------------------------------------------------------

/// A self-signed certificate for `localhost` and 127.0.0.1, in PEM files; the certificate
/// is its own CA.
pub struct Certs {
    _dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    pub fn self_signed() -> Result<Arc<Certs>> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        let dir = tempfile::tempdir()?;
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, certified.cert.pem())?;
        std::fs::write(&key, certified.signing_key.serialize_pem())?;
        Ok(Arc::new(Certs { _dir: dir, cert, key }))
    }
}

/// How to start a coordinator.
#[derive(Clone, Default)]
pub struct TcOptions {
    /// Text of a TOML config file, passed with `--config`.
    pub config: Option<String>,
    /// The token, passed in `FERRATA_TC_TOKEN`.
    pub token: Option<String>,
    pub tls: Option<Arc<Certs>>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// More command-line arguments.
    pub args: Vec<String>,
    /// The node shares an etcd store and may stand by: starting waits for it to serve or
    /// to stand by (`Tc::wait_serving` waits for the rest).
    pub may_stand_by: bool,
    /// Another log line after which it counts as started (it names its addresses).
    pub started_at: Option<&'static str>,
}

impl TcOptions {
    pub fn config(toml: &str) -> TcOptions {
        TcOptions {
            config: Some(toml.to_owned()),
            ..TcOptions::default()
        }
    }
}

/// Quick phase-2 retries and timeout checks, for tests that exercise them.
pub const FAST_CONFIG: &str = "
[transactions]
timeout_check_interval_ms = 20

[phase2]
retry_initial_ms = 20
retry_max_ms = 200
";

/// Everything the process wrote to stderr (ANSI colours removed), across restarts.
#[derive(Default)]
pub struct LogBuf {
    pub lines: Vec<String>,
    /// The current process's stderr reached its end.
    pub eof: bool,
}

/// A running (or stopped) `ferrata-tc` process with its own data directory, which survives
/// restarts. Dropping it kills the process.
pub struct Tc {
    pub rpc: SocketAddr,
    pub http: SocketAddr,
    pub opts: TcOptions,
    data: tempfile::TempDir,
    conf: tempfile::TempDir,
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<()>>,
    logs: Arc<watch::Sender<LogBuf>>,
    /// The first log line of the current process.
    spawned_at: usize,
}

impl Tc {
    pub async fn start(opts: TcOptions) -> Result<Tc> {
        let mut tc = Tc {
            rpc: "127.0.0.1:0".parse()?,
            http: "127.0.0.1:0".parse()?,
            opts,
            data: tempfile::tempdir()?,
            conf: tempfile::tempdir()?,
            child: None,
            reader: None,
            logs: Arc::new(watch::Sender::new(LogBuf::default())),
            spawned_at: 0,
        };
        tc.spawn().await?;
        Ok(tc)
    }

    /// A coordinator with default settings plus `toml`.
    pub async fn with_config(toml: &str) -> Result<Tc> {
        Tc::start(TcOptions::config(toml)).await
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The command line this coordinator runs with.
    fn command(&self) -> Result<Command> {
        let mut cmd = Command::new(BIN);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--http")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.data.path())
            .env_remove("FERRATA_TC_TOKEN")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(toml) = &self.opts.config {
            let path = self.conf.path().join("ferrata-tc.toml");
            std::fs::write(&path, toml)?;
            cmd.arg("--config").arg(path);
        }
        if let Some(token) = &self.opts.token {
            cmd.env("FERRATA_TC_TOKEN", token);
        }
        if let Some(tls) = &self.opts.tls {
            cmd.arg("--tls-cert").arg(&tls.cert).arg("--tls-key").arg(&tls.key);
        }
        if let Some(level) = &self.opts.log_level {
            cmd.arg("--log-level").arg(level);
        }
        cmd.args(&self.opts.args);
        // If this test process dies without dropping the `Tc`, the coordinator dies too
        // (the signal follows the spawning thread: the test's own, which outlives the `Tc`).
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(cmd)
    }

    async fn spawn(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "the coordinator is already running");
        let mut child = self.command()?.spawn().context("starting ferrata-tc")?;
        let stderr = child.stderr.take().expect("piped");
        let from = self.logs.borrow().lines.len();
        self.logs.send_modify(|b| b.eof = false);
        let logs = Arc::clone(&self.logs);
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if std::env::var_os("FERRATA_TEST_ECHO").is_some() {
                    eprintln!("[ferrata-tc] {line}");
                }
                logs.send_modify(|b| b.lines.push(line));
            }
            logs.send_modify(|b| b.eof = true);
        }));
        self.child = Some(child);
        self.spawned_at = from;
        let (may_stand_by, started_at) = (self.opts.may_stand_by, self.opts.started_at);
        let line = match self
            .wait_log_from(
                from,
                |l| {
                    l.contains("ferrata-tc serving")
                        || may_stand_by && l.contains("standing by")
                        || started_at.is_some_and(|s| l.contains(s))
                },
                EVENT,
            )
            .await
        {
            Ok(line) => line,
            Err(e) => {
                self.kill_now();
                return Err(e.context(format!("ferrata-tc did not start; its log:\n{}", self.logs_text())));
            }
        };
        // Both lines name the node's addresses.
        self.serving(&line)
    }

    /// Takes the addresses a "serving" or "standing by" line names.
    fn serving(&mut self, line: &str) -> Result<()> {
        let (rpc, http) = parse_serving(line).with_context(|| format!("parsing {line:?}"))?;
        self.rpc = rpc;
        self.http = http;
        Ok(())
    }

    /// Waits until the current process serves (a standby: until it took over), within
    /// `timeout`.
    pub async fn wait_serving(&mut self, timeout: Duration) -> Result<()> {
        let line = self
            .wait_log_from(self.spawned_at, |l| l.contains("ferrata-tc serving"), timeout)
            .await?;
        self.serving(&line)
    }

    /// Waits for a log line (written from line `from` on) matching `pred`.
    async fn wait_log_from(&self, from: usize, pred: impl Fn(&str) -> bool, timeout: Duration) -> Result<String> {
        let mut rx = self.logs.subscribe();
        let found = tokio::time::timeout(timeout, async {
            loop {
                {
                    let buf = rx.borrow_and_update();
                    if let Some(line) = buf.lines.iter().skip(from).find(|l| pred(l)) {
                        return Ok(line.clone());
                    }
                    if buf.eof {
                        bail!("ferrata-tc closed stderr (exited) before logging the line");
                    }
                }
                rx.changed().await?;
            }
        })
        .await;
        match found {
            Ok(r) => r,
            Err(_) => bail!("no such log line within {timeout:?}"),
        }
    }

    /// Waits for a log line matching `pred`, written by any run of this coordinator.
    pub async fn wait_log(&self, pred: impl Fn(&str) -> bool) -> Result<String> {
        self.wait_log_from(0, pred, EVENT).await
    }

    /// Every stderr line so far, joined.
    pub fn logs_text(&self) -> String {
        self.logs.borrow().lines.join("\n")
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        child.kill()?;
        let status = child.wait()?;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok(status)
    }

    /// SIGTERM, then wait (up to `timeout`) for the process to exit; returns its status.
    pub async fn sigterm(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.pid().context("not running")?;
        // SAFETY: kill(2) with a pid of our own child process.
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        anyhow::ensure!(rc == 0, "kill failed: {}", std::io::Error::last_os_error());
        self.wait_exit(timeout).await
    }

    /// Waits for the process to exit by itself (there is no event for that: polls).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("ferrata-tc did not exit within {timeout:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts the stopped coordinator again on the same data directory (new ports).
    pub async fn restart(&mut self) -> Result<()> {
        self.spawn().await
    }

    pub fn client_config(&self) -> ClientConfig {
        let scheme = if self.opts.tls.is_some() { "https" } else { "http" };
        ClientConfig {
            endpoint: format!("{scheme}://{}", self.rpc),
            token: self.opts.token.clone(),
            tls_ca: self.opts.tls.as_ref().map(|c| c.cert.clone()),
            max_message_bytes: None,
        }
    }

    /// A gRPC client with this coordinator's token (and CA).
    pub async fn client(&self) -> Result<TcClient> {
        TcClient::connect(&self.client_config()).await
    }

    /// An HTTP client with this coordinator's token (and CA).
    pub fn http(&self) -> Http {
        Http {
            addr: self.http,
            token: self.opts.token.clone(),
            tls_ca: self.opts.tls.as_ref().map(|c| c.cert.clone()),
            headers: Vec::new(),
        }
    }
}

impl Drop for Tc {
    fn drop(&mut self) {
        self.kill_now();
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The rpc and http addresses of the "ferrata-tc serving" line (text or JSON format).
fn parse_serving(line: &str) -> Result<(SocketAddr, SocketAddr)> {
    if line.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(line)?;
        let field = |k: &str| -> Result<SocketAddr> {
            Ok(v["fields"][k]
                .as_str()
                .with_context(|| format!("no {k} field"))?
                .parse()?)
        };
        return Ok((field("rpc")?, field("http")?));
    }
    let field = |k: &str| -> Result<SocketAddr> {
        let token = line
            .split_whitespace()
            .find_map(|t| t.strip_prefix(k))
            .with_context(|| format!("no {k} field"))?;
        Ok(token.parse()?)
    };
    Ok((field("rpc=")?, field("http=")?))
}

// ---------------------------------------------------------------------------------------
// gRPC helpers
// ---------------------------------------------------------------------------------------

/// Lock entries for rows of `schema.table` with single-column keys.
pub fn rows(schema: &str, table: &str, pks: &[&str]) -> Vec<pb::TableLocks> {
    vec![pb::TableLocks {
        schema: schema.into(),
        table: table.into(),
        rows: pks
            .iter()
            .map(|pk| pb::PrimaryKey {
                values: vec![pk.as_bytes().to_vec()],
            })
            .collect(),
    }]
}

/// Rows of table `app.t`.
pub fn t_rows(pks: &[&str]) -> Vec<pb::TableLocks> {
    rows("app", "t", pks)
}

/// Creates a named token with the coordinator's own (root) token; returns its secret.
pub async fn create_token(tc: &Tc, name: &str, role: &str) -> Result<String> {
    let body = serde_json::json!({ "name": name, "role": role, "reason": format!("{name} for the test") });
    let r = tc.http().post("/v1/tokens", Some(&body.to_string())).await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    Ok(r.json()["secret"].as_str().expect("the secret, once").to_owned())
}

// The calls below go on the client's Attach stream if it has one (`TcClient::with_stream`),
// as unary calls otherwise.

pub async fn begin(c: &TcClient, timeout_ms: u64) -> Result<String> {
    let r = c
        .clone()
        .global_begin(pb::GlobalBeginRequest {
            timeout_ms,
            name: "test".into(),
        })
        .await?;
    Ok(r.xid)
}

pub async fn register(
    c: &TcClient,
    xid: &str,
    resource: &str,
    locks: Vec<pb::TableLocks>,
    lock_wait_ms: u64,
) -> Result<u64, tonic::Status> {
    let r = c
        .clone()
        .branch_register(pb::BranchRegisterRequest {
            xid: xid.into(),
            resource_id: resource.into(),
            locks,
            application_data: format!("app-data of {xid}").into_bytes(),
            lock_wait_ms,
            ..Default::default()
        })
        .await?;
    Ok(r.branch_id)
}

/// Registers an XA branch running on database connection `connection_id`.
pub async fn register_xa(c: &TcClient, xid: &str, resource: &str, connection_id: u64) -> Result<u64, tonic::Status> {
    let r = c
        .clone()
        .branch_register(pb::BranchRegisterRequest {
            xid: xid.into(),
            resource_id: resource.into(),
            branch_type: pb::BranchType::Xa as i32,
            connection_id,
            ..Default::default()
        })
        .await?;
    Ok(r.branch_id)
}

/// Reports a branch's phase-1 outcome.
pub async fn report(c: &TcClient, xid: &str, branch_id: u64, status: pb::BranchStatus) -> Result<(), tonic::Status> {
    report_number(c, xid, branch_id, status as i32).await
}

/// Reports a phase-1 outcome by its number, which the coordinator may not know.
pub async fn report_number(c: &TcClient, xid: &str, branch_id: u64, status: i32) -> Result<(), tonic::Status> {
    c.clone()
        .branch_report(pb::BranchReportRequest {
            xid: xid.into(),
            branch_id,
            status,
            reason: "local commit failed".into(),
        })
        .await?;
    Ok(())
}

pub async fn commit(c: &TcClient, xid: &str) -> Result<pb::GlobalOutcome, tonic::Status> {
    c.clone().global_commit(pb::XidRequest { xid: xid.into() }).await
}

pub async fn rollback(c: &TcClient, xid: &str) -> Result<pb::GlobalOutcome, tonic::Status> {
    c.clone().global_rollback(pb::XidRequest { xid: xid.into() }).await
}

pub async fn status(c: &TcClient, xid: &str) -> Result<pb::GlobalOutcome, tonic::Status> {
    Ok(c.tm
        .clone()
        .global_status(pb::XidRequest { xid: xid.into() })
        .await?
        .into_inner())
}

pub async fn report_failed(c: &TcClient, xid: &str, branch_id: u64) -> Result<(), tonic::Status> {
    report(c, xid, branch_id, pb::BranchStatus::PhaseOneFailed).await
}

pub async fn lock_query(
    c: &TcClient,
    xid: &str,
    resource: &str,
    locks: Vec<pb::TableLocks>,
    lock_wait_ms: u64,
) -> Result<pb::LockQueryResponse, tonic::Status> {
    c.clone()
        .lock_query(pb::LockQueryRequest {
            xid: xid.into(),
            resource_id: resource.into(),
            locks,
            lock_wait_ms,
        })
        .await
}

/// The coordinator's stable code on an error.
pub fn code(s: &tonic::Status) -> &'static str {
    ErrorCode::of(s).map_or("<none>", ErrorCode::as_str)
}

/// Asserts an error carries `expected` as its stable code (and the gRPC code that goes with
/// it).
#[track_caller]
pub fn assert_code(s: &tonic::Status, expected: ErrorCode) {
    assert_eq!(
        ErrorCode::of(s),
        Some(expected),
        "expected {} but got {s:?}",
        expected.as_str()
    );
    assert_eq!(s.code(), expected.grpc_code(), "gRPC code of {s:?}");
}

pub fn status_of(o: &pb::GlobalOutcome) -> pb::GlobalStatus {
    pb::GlobalStatus::try_from(o.status).unwrap_or(pb::GlobalStatus::Unknown)
}

/// Polls `f` until it returns `Some`, for at most `EVENT`. Only for states the coordinator
/// announces no event for.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + EVENT;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls GlobalStatus until the transaction is in `want`.
pub async fn wait_status(c: &TcClient, xid: &str, want: pb::GlobalStatus) -> Result<pb::GlobalOutcome> {
    let deadline = tokio::time::Instant::now() + EVENT;
    loop {
        let o = status(c, xid).await?;
        if status_of(&o) == want {
            return Ok(o);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for {xid} to become {want:?}; last status: {o:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The value of one Prometheus series (`name` or `name{labels}` exactly as rendered).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

// ---------------------------------------------------------------------------------------
// The test resource manager
// ---------------------------------------------------------------------------------------

/// How the test resource manager answers a branch.
#[derive(Clone, Debug)]
pub enum Reply {
    /// PHASE_TWO_COMMITTED for a commit, PHASE_TWO_ROLLBACKED for a rollback.
    Ok,
    /// ROLLBACK_FAILED_RETRYABLE.
    Retryable(String),
    /// ROLLBACK_FAILED_UNRETRYABLE (or COMMIT_FAILED_UNRETRYABLE for a commit).
    Unretryable { reason: String, detail_json: String },
    /// Never answer the command (until the resource manager crashes).
    Hang,
    /// Wait until the gate is cancelled (opened), then answer as the inner reply.
    After(CancellationToken, Box<Reply>),
}

/// One command a resource manager received.
#[derive(Clone, Debug)]
pub struct Received {
    pub rm: String,
    pub request_id: u64,
    pub action: pb::Phase2Action,
    pub branches: Vec<pb::BranchRef>,
}

impl Received {
    pub fn branch_ids(&self) -> Vec<u64> {
        self.branches.iter().map(|b| b.branch_id).collect()
    }
}

/// The shared log of commands received by one or more test resource managers, and the
/// per-branch script of answers.
#[derive(Default)]
pub struct Recorder {
    log: watch::Sender<Vec<Received>>,
    script: Mutex<HashMap<u64, VecDeque<Reply>>>,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    /// Answers for `branch_id`, used in order, before falling back to the resource manager's
    /// default.
    pub fn script(&self, branch_id: u64, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().entry(branch_id).or_default().extend(replies);
    }

    fn next_reply(&self, branch_id: u64) -> Option<Reply> {
        self.script.lock().get_mut(&branch_id)?.pop_front()
    }

    pub fn commands(&self) -> Vec<Received> {
        self.log.borrow().clone()
    }

    /// Waits until at least `n` commands were received; returns all of them.
    pub async fn wait_commands(&self, n: usize) -> Result<Vec<Received>> {
        self.wait_until(&format!("{n} commands"), |log| log.len() >= n).await
    }

    /// Waits until the log satisfies `pred`; returns it.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&[Received]) -> bool) -> Result<Vec<Received>> {
        let mut rx = self.log.subscribe();
        let r = tokio::time::timeout(EVENT, async {
            loop {
                {
                    let log = rx.borrow_and_update();
                    if pred(&log) {
                        return Ok::<_, anyhow::Error>(log.clone());
                    }
                }
                rx.changed().await?;
            }
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => bail!("timed out waiting for {what}; received: {:#?}", self.commands()),
        }
    }

    /// Waits for a command of `action` naming `branch_id`.
    pub async fn wait_branch(&self, action: pb::Phase2Action, branch_id: u64) -> Result<Received> {
        let log = self
            .wait_until(&format!("{action:?} of branch {branch_id}"), |log| {
                log.iter()
                    .any(|r| r.action == action && r.branch_ids().contains(&branch_id))
            })
            .await?;
        Ok(log
            .into_iter()
            .find(|r| r.action == action && r.branch_ids().contains(&branch_id))
            .expect("found"))
    }

    /// The (action, branch id) pairs received, in order.
    pub fn actions(&self) -> Vec<(pb::Phase2Action, u64)> {
        self.commands()
            .iter()
            .flat_map(|r| r.branches.iter().map(move |b| (r.action, b.branch_id)))
            .collect()
    }
}

/// A resource manager attached with `ferrata_rpc::client::attach`, answering from the
/// recorder's script or its default reply. Dropping it (or `crash`) closes its stream as a
/// crashed process would: commands it hangs on are never answered.
pub struct TestRm {
    pub id: String,
    attachment: Option<Attachment>,
    crashed: CancellationToken,
}

impl TestRm {
    /// Attaches answering successfully unless scripted otherwise.
    pub async fn attach(c: &TcClient, id: &str, resources: &[&str], recorder: &Arc<Recorder>) -> Result<TestRm> {
        Self::attach_with(c, id, resources, recorder, Reply::Ok).await
    }

    pub async fn attach_with(
        c: &TcClient,
        id: &str,
        resources: &[&str],
        recorder: &Arc<Recorder>,
        default: Reply,
    ) -> Result<TestRm> {
        Self::attach_full(c, id, resources, recorder, default, Arc::new(IgnoreGuards)).await
    }

    /// Attaches handing guard updates to `guards` (acknowledged once it has them).
    pub async fn attach_guarded(
        c: &TcClient,
        id: &str,
        resources: &[&str],
        recorder: &Arc<Recorder>,
        guards: Arc<dyn GuardSink>,
    ) -> Result<TestRm> {
        Self::attach_full(c, id, resources, recorder, Reply::Ok, guards).await
    }

    async fn attach_full(
        c: &TcClient,
        id: &str,
        resources: &[&str],
        recorder: &Arc<Recorder>,
        default: Reply,
        guards: Arc<dyn GuardSink>,
    ) -> Result<TestRm> {
        let crashed = CancellationToken::new();
        let handler: CommandHandler = {
            let recorder = Arc::clone(recorder);
            let crashed = crashed.clone();
            let rm = id.to_owned();
            Arc::new(move |command: pb::BranchCommand| {
                let recorder = Arc::clone(&recorder);
                let crashed = crashed.clone();
                let default = default.clone();
                let rm = rm.clone();
                Box::pin(async move {
                    let action = pb::Phase2Action::try_from(command.action).unwrap_or(pb::Phase2Action::Unknown);
                    let replies: Vec<(u64, Reply)> = command
                        .branches
                        .iter()
                        .map(|b| (b.branch_id, recorder.next_reply(b.branch_id).unwrap_or(default.clone())))
                        .collect();
                    recorder.log.send_modify(|log| {
                        log.push(Received {
                            rm,
                            request_id: command.request_id,
                            action,
                            branches: command.branches.clone(),
                        })
                    });
                    let mut resolved = Vec::with_capacity(replies.len());
                    for (branch_id, mut reply) in replies {
                        while let Reply::After(gate, inner) = reply {
                            tokio::select! {
                                _ = gate.cancelled() => {}
                                _ = crashed.cancelled() => crash(),
                            }
                            reply = *inner;
                        }
                        resolved.push((branch_id, reply));
                    }
                    if resolved.iter().any(|(_, r)| matches!(r, Reply::Hang)) {
                        crashed.cancelled().await;
                        crash();
                    }
                    resolved
                        .into_iter()
                        .map(|(branch_id, reply)| outcome(branch_id, action, reply))
                        .collect()
                })
            })
        };
        let resources: Vec<String> = resources.iter().map(|r| r.to_string()).collect();
        let hello = pb::Hello {
            rm_id: id.into(),
            resource_ids: resources,
            instance_id: id.into(),
        };
        let attachment = attach(&mut c.rm.clone(), hello, handler, guards).await?;
        Ok(TestRm {
            id: id.to_owned(),
            attachment: Some(attachment),
            crashed,
        })
    }

    /// The calls of its stream, for `TcClient::with_stream`.
    pub fn calls(&self) -> ferrata_rpc::calls::StreamCalls {
        self.attachment.as_ref().expect("not crashed").calls()
    }

    /// The namespaces its Welcome said the node serves (several serving nodes).
    pub fn serving(&self) -> Option<Vec<u16>> {
        self.attachment.as_ref().and_then(|a| a.serving.clone())
    }

    /// Closes the stream as a crashed process would.
    pub fn crash(&mut self) {
        self.crashed.cancel();
        self.attachment.take();
    }

    /// Waits until the coordinator ends the stream; the error it ended with, if any.
    pub async fn closed(&mut self) -> Result<()> {
        let attachment = self.attachment.as_mut().context("crashed")?;
        match tokio::time::timeout(EVENT, attachment.closed()).await {
            Ok(r) => r,
            Err(_) => bail!("the attach stream did not end within {EVENT:?}"),
        }
    }
}

/// A crash of everything: `rm` crashes, the coordinator is killed with SIGKILL and started
/// again on its data directory, and a fresh `rm-db1` serving `db1` attaches to it. Returns
/// the new client, recorder and resource manager.
pub async fn kill9_and_reattach(tc: &mut Tc, mut rm: TestRm) -> Result<(TcClient, Arc<Recorder>, TestRm)> {
    rm.crash();
    tc.kill9()?;
    tc.restart().await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    Ok((c, rec, rm))
}

impl Drop for TestRm {
    fn drop(&mut self) {
        self.crash();
    }
}

/// A crashed process never answers: unwind the handler's task without a panic message,
/// dropping its sender so the stream can close.
fn crash() -> ! {
    std::panic::resume_unwind(Box::new("simulated resource manager crash"))
}

fn outcome(branch_id: u64, action: pb::Phase2Action, reply: Reply) -> pb::BranchOutcome {
    let commit = action == pb::Phase2Action::Commit;
    let (status, reason, detail_json) = match reply {
        Reply::Ok if commit => (pb::BranchStatus::PhaseTwoCommitted, String::new(), String::new()),
        Reply::Ok => (pb::BranchStatus::PhaseTwoRollbacked, String::new(), String::new()),
        Reply::Retryable(reason) => (pb::BranchStatus::RollbackFailedRetryable, reason, String::new()),
        Reply::Unretryable { reason, detail_json } if commit => {
            (pb::BranchStatus::CommitFailedUnretryable, reason, detail_json)
        }
        Reply::Unretryable { reason, detail_json } => {
            (pb::BranchStatus::RollbackFailedUnretryable, reason, detail_json)
        }
        Reply::Hang | Reply::After(..) => unreachable!("resolved before answering"),
    };
    pb::BranchOutcome {
        branch_id,
        status: status as i32,
        reason,
        detail_json,
        ..Default::default()
    }
}

/// A guard sink that records what the coordinator says about table guards: the updates in
/// order, and how many heartbeats it answered.
#[derive(Default)]
pub struct GuardLog {
    updates: watch::Sender<Vec<pb::GuardUpdate>>,
    answered: watch::Sender<u64>,
}

impl GuardSink for GuardLog {
    fn update(&self, update: &pb::GuardUpdate) -> AckWhen {
        self.updates.send_modify(|u| u.push(update.clone()));
        ack_now()
    }
    fn confirmed(&self, _: std::time::Instant, _: Duration) {
        self.answered.send_modify(|n| *n += 1);
    }
    fn lost(&self) {}
}

impl GuardLog {
    pub fn new() -> Arc<GuardLog> {
        Arc::new(GuardLog::default())
    }

    pub fn updates(&self) -> Vec<pb::GuardUpdate> {
        self.updates.borrow().clone()
    }

    /// Waits until the updates satisfy `pred`; returns them.
    pub async fn wait_until(
        &self,
        what: &str,
        pred: impl Fn(&[pb::GuardUpdate]) -> bool,
    ) -> Result<Vec<pb::GuardUpdate>> {
        let mut rx = self.updates.subscribe();
        let r = tokio::time::timeout(EVENT, async {
            loop {
                {
                    let updates = rx.borrow_and_update();
                    if pred(&updates) {
                        return Ok::<_, anyhow::Error>(updates.clone());
                    }
                }
                rx.changed().await?;
            }
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => bail!("timed out waiting for {what}; guard updates: {:#?}", self.updates()),
        }
    }

    /// Waits until the coordinator has answered `n` heartbeats.
    pub async fn wait_answered(&self, n: u64) -> Result<()> {
        let mut rx = self.answered.subscribe();
        tokio::time::timeout(EVENT, rx.wait_for(|a| *a >= n))
            .await
            .with_context(|| format!("the coordinator did not answer {n} heartbeats within {EVENT:?}"))??;
        Ok(())
    }
}

/// Guarded tables as `schema.table on resource`.
pub fn table_names(tables: &[pb::GuardedTable]) -> Vec<String> {
    tables
        .iter()
        .map(|t| format!("{}.{} on {}", t.schema, t.table, t.resource_id))
        .collect()
}

/// A raw Attach stream the test drives by hand: the sender of messages to the coordinator
/// and the stream of its answers.
pub struct RawStream {
    pub tx: tokio::sync::mpsc::Sender<pb::RmMessage>,
    pub inbound: tonic::Streaming<pb::TcMessage>,
}

/// A resource manager's Hello (its instance named like it).
pub fn hello_of(rm_id: &str, resources: &[&str]) -> pb::Hello {
    pb::Hello {
        rm_id: rm_id.into(),
        resource_ids: resources.iter().map(|r| r.to_string()).collect(),
        instance_id: rm_id.into(),
    }
}

pub fn hello(rm_id: &str, resources: &[&str]) -> pb::RmMessage {
    pb::RmMessage {
        kind: Some(pb::rm_message::Kind::Hello(hello_of(rm_id, resources))),
    }
}

/// An unnumbered heartbeat (the coordinator does not answer it).
pub fn heartbeat() -> pb::RmMessage {
    numbered_heartbeat(0)
}

/// Heartbeat number `seq`, which the coordinator answers with `echo = seq`.
pub fn numbered_heartbeat(seq: u64) -> pb::RmMessage {
    pb::RmMessage {
        kind: Some(pb::rm_message::Kind::Heartbeat(pb::Heartbeat { seq, echo: 0 })),
    }
}

pub fn guard_ack(seq: u64) -> pb::RmMessage {
    pb::RmMessage {
        kind: Some(pb::rm_message::Kind::GuardAck(pb::GuardAck { seq })),
    }
}

/// Opens an Attach stream whose first message is `first`.
pub async fn raw_attach(c: &TcClient, first: pb::RmMessage) -> Result<RawStream, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(first).await.expect("receiver alive");
    let inbound =
        c.rm.clone()
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
    Ok(RawStream { tx, inbound })
}

impl RawStream {
    /// The next message, or the status the stream ended with.
    pub async fn next(&mut self) -> Result<Option<pb::TcMessage>, tonic::Status> {
        match tokio::time::timeout(EVENT, self.inbound.message()).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded("test: no message within EVENT")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// A minimal HTTP/1.1 client: one request per connection (`Connection: close`).
#[derive(Clone)]
pub struct Http {
    pub addr: SocketAddr,
    pub token: Option<String>,
    /// CA to verify the coordinator's certificate with; TLS is used when set.
    pub tls_ca: Option<PathBuf>,
    /// More headers every request carries.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Resp {
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("HTTP {} body is not JSON ({e}): {:?}", self.status, self.body))
    }

    /// Asserts the status and the stable error code of an error answer.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v
    }
}

impl Http {
    pub fn with_token(&self, token: Option<&str>) -> Http {
        Http {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// This client, with `headers` on every request.
    pub fn with_headers(&self, headers: &[(&str, String)]) -> Http {
        Http {
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.clone())).collect(),
            ..self.clone()
        }
    }

    pub async fn get(&self, path: &str) -> Result<Resp> {
        self.request("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<&str>) -> Result<Resp> {
        self.request("POST", path, body).await
    }

    /// GET, asserting 200, returning the JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let r = self.get(path).await?;
        anyhow::ensure!(r.status == 200, "GET {path}: {r:?}");
        Ok(r.json())
    }

    pub async fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<Resp> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let raw = match &self.tls_ca {
            None => exchange(tcp, head.as_bytes()).await?,
            Some(ca) => {
                let (connector, name) = ferrata_rpc::tls::connector(ca, Some("localhost"), "127.0.0.1")?;
                let tls = connector.connect(name, tcp).await.context("TLS handshake")?;
                exchange(tls, head.as_bytes()).await?
            }
        };
        parse_response(&raw)
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &[u8]) -> Result<Vec<u8>> {
    let io = async {
        s.write_all(request).await?;
        s.flush().await?;
        let mut out = Vec::new();
        // A TLS peer may close without close_notify: keep what arrived.
        if let Err(e) = s.read_to_end(&mut out).await
            && out.is_empty()
        {
            return Err(e.into());
        }
        Ok::<_, anyhow::Error>(out)
    };
    tokio::time::timeout(EVENT, io)
        .await
        .context("HTTP request timed out")?
}

fn parse_response(raw: &[u8]) -> Result<Resp> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()
        .context("bad status code")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_owned() };
    Ok(Resp {
        status,
        headers: head.to_owned(),
        body,
    })
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, tail) = rest.split_once("\r\n").context("bad chunk")?;
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(tail.get(..size).context("short chunk")?);
        rest = tail.get(size + 2..).context("short chunk")?;
    }
}

/// The held rows of `/v1/locks` as (pk values joined by ',', holder, waiters).
pub async fn held_locks(http: &Http, query: &str) -> Result<Vec<(String, String, Vec<String>)>> {
    let v = http.get_json(&format!("/v1/locks?{query}")).await?;
    Ok(v["locks"]
        .as_array()
        .context("locks array")?
        .iter()
        .map(|l| {
            let pk = l["key"]["pk"]
                .as_array()
                .map(|vs| {
                    vs.iter()
                        .map(|v| v.as_str().unwrap_or("?").to_owned())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let waiters = l["waiters"]
                .as_array()
                .map(|ws| ws.iter().map(|w| w.as_str().unwrap_or("?").to_owned()).collect())
                .unwrap_or_default();
            (pk, l["holder"].as_str().unwrap_or("?").to_owned(), waiters)
        })
        .collect())
}

/// Waits until `/v1/locks` shows row `pk` of `app.t` held by `holder` with exactly
/// `waiters` queued (there is no event for a request starting to wait).
pub async fn wait_queue(http: &Http, pk: &str, holder: &str, waiters: &[&str]) -> Result<()> {
    let deadline = tokio::time::Instant::now() + EVENT;
    loop {
        let locks = held_locks(http, "schema=app&table=t").await?;
        let ok = locks
            .iter()
            .any(|(k, h, w)| k == pk && h == holder && w.iter().map(String::as_str).eq(waiters.iter().copied()));
        if ok {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "timed out waiting for row {pk} held by {holder} with waiters {waiters:?}; last /v1/locks: {locks:?}"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
