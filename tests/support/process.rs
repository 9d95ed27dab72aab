//! Child processes of the test: started from a binary Cargo built into this package, ready
//! once they log a line saying so, killed with SIGKILL when dropped or when the test process
//! dies.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferrata_testkit::{APP_PASSWORD, APP_USER};

/// How many panics a child has reported on stderr (Rust's panic hook prints
/// `thread '...' panicked at`), including those a task boundary contained.
#[derive(Clone, Default)]
pub struct Panics(Arc<AtomicUsize>);

impl Panics {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Starts `command` and waits for a stderr line containing `ready`; returns the child and
/// that line. Its panics are added to `panics` (one counter can serve a process and its
/// restarts). Later output is read away so the child never blocks on a full pipe.
pub fn spawn_until(mut command: Command, ready: &[&'static str], panics: &Panics) -> Result<(Child, String)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; the child dies with the test process.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command.spawn().with_context(|| format!("starting {command:?}"))?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let counter = panics.clone();
    let needles = ready.to_vec();
    // FERRATA_TEST_LOGS=1 shows the child's log lines with the test's output.
    let show = std::env::var_os("FERRATA_TEST_LOGS").is_some();
    // The lines before the ready one, for the error if it never comes.
    let before = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let early = before.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if show {
                eprintln!("{line}");
            }
            if !sent {
                early.lock().push(line.clone());
            }
            if line.contains("' panicked at ") {
                counter.0.fetch_add(1, Ordering::SeqCst);
            }
            if !sent && needles.iter().any(|r| line.contains(r)) {
                let _ = tx.send(line.clone());
                sent = true;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => Ok((child, line)),
        Err(e) => {
            let _ = child.kill();
            let why = match e {
                std::sync::mpsc::RecvTimeoutError::Timeout => "within 30 s",
                std::sync::mpsc::RecvTimeoutError::Disconnected => "before it exited",
            };
            let log = before.lock().join("\n");
            bail!("{command:?} did not log any of {ready:?} {why}; it logged:\n{log}");
        }
    }
}

/// The address after `key` (e.g. `rpc=`) in a log line.
pub fn addr_in(line: &str, key: &str) -> Result<SocketAddr> {
    let at = line.find(key).with_context(|| format!("no {key} in {line:?}"))? + key.len();
    let end = line[at..].find(' ').map_or(line.len(), |e| at + e);
    Ok(line[at..end].trim_matches('"').parse()?)
}

/// A `ferrata-proxy` process in front of `backend`, with a coordinator, its service user
/// the app user (password from the environment, as in production).
pub struct ProxyProcess {
    binary: String,
    child: Child,
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/healthz`).
    pub admin: SocketAddr,
    /// Panics the process reported, restarts included.
    pub panics: Panics,
    config: tempfile::TempDir,
}

/// The proxy's config file, in the process's own directory.
const CONFIG_FILE: &str = "proxy.toml";

impl ProxyProcess {
    /// Starts `binary` (pass `env!("CARGO_BIN_EXE_ferrata-proxy-for-tests")`) with a config file.
    pub fn start(binary: &str, backend: SocketAddr, tc: &str, lock_wait_ms: u64) -> Result<ProxyProcess> {
        Self::start_with(binary, backend, tc, &format!("lock_wait_ms = {lock_wait_ms}"), "")
    }

    /// Like `start`, with `coordinator_toml` as the `[coordinator]` settings besides the
    /// endpoint, and `more_toml` appended to the config file after its `[service]` section
    /// (so it starts with more `[service]` keys, or with a section of its own).
    pub fn start_with(
        binary: &str,
        backend: SocketAddr,
        tc: &str,
        coordinator_toml: &str,
        more_toml: &str,
    ) -> Result<ProxyProcess> {
        Self::start_with_endpoints(binary, backend, &[tc.to_owned()], coordinator_toml, more_toml)
    }

    /// Like `start_with`, with several coordinator nodes, tried in order.
    pub fn start_with_endpoints(
        binary: &str,
        backend: SocketAddr,
        endpoints: &[String],
        coordinator_toml: &str,
        more_toml: &str,
    ) -> Result<ProxyProcess> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(
            &path,
            format!(
                "backend = \"{backend}\"\n\
                 [coordinator]\nendpoints = {endpoints:?}\n{coordinator_toml}\n\
                 [log]\nlevel = \"info\"\n[service]\nuser = \"{APP_USER}\"\n{more_toml}\n"
            ),
        )?;
        let panics = Panics::default();
        let (child, addr, admin) = Self::spawn(binary, &path, &["127.0.0.1:0", "127.0.0.1:0"], &panics)?;
        Ok(ProxyProcess {
            binary: binary.to_owned(),
            child,
            addr,
            admin,
            panics,
            config: dir,
        })
    }

    /// Starts `binary` with the config file at `path`, listening on `[listen, admin]`.
    fn spawn(
        binary: &str,
        path: &Path,
        [listen, admin]: &[&str; 2],
        panics: &Panics,
    ) -> Result<(Child, SocketAddr, SocketAddr)> {
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(path)
            .args(["--listen", listen, "--admin-listen", admin])
            .env("FERRATA_SERVICE_PASSWORD", APP_PASSWORD)
            .env_remove("FERRATA_TC_TOKEN");
        let (child, line) = spawn_until(command, &["ferrata-proxy ready"], panics)?;
        Ok((child, addr_in(&line, "listen=")?, addr_in(&line, "admin=")?))
    }

    /// Kills the process with SIGKILL and starts it again with the same config on the same
    /// addresses, as a supervisor would.
    pub fn kill9_and_restart(&mut self) -> Result<()> {
        self.kill9()?;
        let addrs = [self.addr.to_string(), self.admin.to_string()];
        let path = self.config.path().join(CONFIG_FILE);
        (self.child, self.addr, self.admin) = Self::spawn(&self.binary, &path, &[&addrs[0], &addrs[1]], &self.panics)?;
        Ok(())
    }

    /// Options for the app user on database `test`, through this proxy.
    pub fn opts(&self) -> mysql_async::OptsBuilder {
        ferrata_testkit::app_opts(self.addr)
    }

    pub async fn conn(&self) -> Result<mysql_async::Conn> {
        Ok(mysql_async::Conn::new(self.opts()).await?)
    }

    /// The value of one Prometheus series (`name{labels}` as exposed), 0 when absent.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let (_, body) = crate::http_get(self.admin, "/metrics").await?;
        Ok(crate::metric(&body, series).unwrap_or(0.0))
    }

    /// Waits until this proxy trusts its view of the coordinator's guarded tables (until then
    /// it checks every write, and refuses what it cannot check): an autocommit write through
    /// `conn` to a scratch table, repeated until it counts as unchecked.
    pub async fn await_trust(&self, conn: &mut mysql_async::Conn) -> Result<()> {
        use mysql_async::prelude::Queryable;
        const UNCHECKED: &str = "ferrata_proxy_unbound_writes_total{route=\"unchecked\"}";
        let before = self.metric(UNCHECKED).await?;
        conn.query_drop("CREATE TABLE ferrata_trust_probe (id INT PRIMARY KEY)")
            .await?;
        crate::until("the proxy to trust its view of the coordinator", async || {
            conn.query_drop("DELETE FROM ferrata_trust_probe").await?;
            Ok(self.metric(UNCHECKED).await? > before)
        })
        .await?;
        conn.query_drop("DROP TABLE ferrata_trust_probe").await?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (it has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Pauses the process (SIGSTOP), as when its host hangs: its connections stay open.
    pub fn pause(&self) -> Result<()> {
        pause(&self.child)
    }

    pub fn resume(&self) -> Result<()> {
        resume(&self.child)
    }

    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pauses a child process (SIGSTOP): its sockets stay open and nothing answers, as when its
/// host hangs. Returns once the kernel reports it stopped (the signal is delivered
/// asynchronously).
pub fn pause(child: &Child) -> Result<()> {
    signal(child, libc::SIGSTOP)?;
    let stat = format!("/proc/{}/stat", child.id());
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < give_up {
        // The state is the field after the parenthesised command name.
        let text = std::fs::read_to_string(&stat)?;
        if text
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        {
            return Ok(());
        }
        std::thread::yield_now();
    }
    anyhow::bail!("process {} did not stop after SIGSTOP", child.id())
}

/// Resumes a paused child process (SIGCONT).
pub fn resume(child: &Child) -> Result<()> {
    signal(child, libc::SIGCONT)
}

fn signal(child: &Child, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) with the pid of a child the caller owns (reaped only when dropped).
    if unsafe { libc::kill(pid, signal) } != 0 {
        anyhow::bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}
