//! Throw-away etcd clusters (Debian's `etcd-server`) for the coordinator's store and HA
//! tests: one or more members on free loopback ports, each in its own temporary data
//! directory, SIGKILLed when the cluster is dropped or the test process dies. A member can be
//! killed, restarted on its data, paused (SIGSTOP) and resumed, and the cluster asked which
//! member leads.

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::{claim, free_port, remove_abandoned_dirs, spawn_tied};

/// Cluster directories are `$TMPDIR/<DIR_PREFIX>XXXXXX`, one subdirectory per member.
const DIR_PREFIX: &str = "ferrata-etcd-";
/// How long a cluster may take to elect a leader and answer before start fails.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Start attempts when a free port we picked was taken before etcd bound it.
const PORT_ATTEMPTS: usize = 5;

/// How to start a cluster; `Default`: plain HTTP on loopback.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// The members' certificate and key (PEM files; the certificate must name 127.0.0.1):
    /// clients then speak TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// More addresses every member serves clients on, besides loopback: the test's ends of
    /// [`crate::netns::Host`] links, for processes inside hosts ([`EtcdCluster::endpoints_at`]).
    pub also_at: Vec<Ipv4Addr>,
}

/// A running throw-away etcd cluster. Dropping it kills every member and deletes the data.
pub struct EtcdCluster {
    members: Vec<Member>,
    options: EtcdOptions,
    /// `name=peer-url,...`, for restarts.
    initial_cluster: String,
    token: String,
    // Declared after `members` so it is removed only after their `Drop` killed them.
    dir: TempDir,
    _owner: File,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health` and `/metrics`, whatever the client port speaks.
    metrics_port: u16,
    /// `None` while killed.
    child: Option<Child>,
}

impl Drop for Member {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        // Errors mean it is already gone, which is what we want.
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one answers with a leader elected.
    pub async fn start(size: usize) -> Result<EtcdCluster> {
        Self::start_with(size, EtcdOptions::default()).await
    }

    /// Like `start`, with `options`.
    pub async fn start_with(size: usize, options: EtcdOptions) -> Result<EtcdCluster> {
        anyhow::ensure!(size >= 1, "an etcd cluster needs at least one member");
        tokio::task::spawn_blocking(|| {
            static SWEEP: Once = Once::new();
            SWEEP.call_once(|| remove_abandoned_dirs(DIR_PREFIX));
        })
        .await?;
        let mut attempt = 1;
        loop {
            let cluster = Self::spawn(size, options.clone())?;
            match cluster.wait_ready().await {
                Ok(()) => return Ok(cluster),
                Err(_) if attempt < PORT_ATTEMPTS && cluster.port_was_taken() => attempt += 1,
                Err(err) => return Err(err),
            }
        }
    }

    fn spawn(size: usize, options: EtcdOptions) -> Result<EtcdCluster> {
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        let owner = claim(dir.path())?;
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                metrics_port: free_port()?,
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cluster = EtcdCluster {
            members,
            options,
            initial_cluster,
            token,
            dir,
            _owner: owner,
        };
        for i in 0..size {
            cluster.spawn_member(i)?;
        }
        Ok(cluster)
    }

    fn member_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn spawn_member(&mut self, i: usize) -> Result<()> {
        let dir = self.member_dir(i);
        fs::create_dir_all(&dir)?;
        let m = &self.members[i];
        let client = self.endpoint(i);
        let listen = std::iter::once(client.clone())
            .chain(self.options.also_at.iter().map(|&at| self.endpoint_at(i, at)))
            .collect::<Vec<_>>()
            .join(",");
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &listen, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            // Ignored once the data directory exists (a restart rejoins with what it holds).
            .args(["--initial-cluster-state", "new"])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some((cert, key)) = &self.options.tls {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
        }
        let log = File::options().create(true).append(true).open(dir.join("etcd.log"))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = spawn_tied(cmd).context("spawning etcd (is etcd-server installed?)")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits until every running member answers `/health` as healthy (it has a leader).
    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        for i in 0..self.members.len() {
            if self.members[i].child.is_some() {
                self.wait_member_ready(i, deadline).await?;
            }
        }
        Ok(())
    }

    async fn wait_member_ready(&self, i: usize, deadline: Instant) -> Result<()> {
        let mut delay = Duration::from_millis(20);
        loop {
            if let Ok(body) = http(self.members[i].metrics_port, "GET", "/health", "").await
                && body.contains("\"health\":\"true\"")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd member {i} did not become healthy within {START_DEADLINE:?}; its log:\n{}",
                    self.log(i)
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    fn port_was_taken(&self) -> bool {
        (0..self.members.len()).any(|i| self.log(i).contains("address already in use"))
    }

    /// Client URLs of every member (`http://127.0.0.1:<port>`), killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i` (`https://` with TLS).
    pub fn endpoint(&self, i: usize) -> String {
        self.endpoint_at(i, Ipv4Addr::LOCALHOST)
    }

    /// Client URLs of every member at `at`, one of [`EtcdOptions::also_at`].
    pub fn endpoints_at(&self, at: Ipv4Addr) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint_at(i, at)).collect()
    }

    fn endpoint_at(&self, i: usize, at: Ipv4Addr) -> String {
        let scheme = if self.options.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{at}:{}", self.members[i].client_port)
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// The pids of the running members.
    pub fn pids(&self) -> Vec<u32> {
        (0..self.members.len()).filter_map(|i| self.pid(i)).collect()
    }

    /// SIGKILLs member `i` (a crash). Idempotent.
    pub fn kill(&mut self, i: usize) {
        kill_child(&mut self.members[i].child);
    }

    /// Starts a killed member `i` again on its data and ports, and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn_member(i)?;
        self.wait_member_ready(i, Instant::now() + START_DEADLINE).await
    }

    /// SIGSTOPs member `i`: it holds its connections and answers nothing until resumed.
    pub fn pause(&self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGSTOP)
    }

    /// SIGCONTs a paused member `i`.
    pub fn resume(&self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGCONT)
    }

    fn signal(&self, i: usize, signal: libc::c_int) -> Result<()> {
        let pid = self.pid(i).with_context(|| format!("etcd member {i} is not running"))?;
        // SAFETY: plain syscall; the pid is our own child, not yet reaped.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Which member leads, as the first running member that answers sees it (without TLS).
    pub async fn leader(&self) -> Result<usize> {
        let mut last = None;
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            match http(m.client_port, "POST", "/v3/maintenance/status", "{}").await {
                Ok(body) => {
                    let status: serde_json::Value = serde_json::from_str(&body)
                        .with_context(|| format!("etcd member {i} answered its status with {body:?}"))?;
                    let leader = status["leader"].as_str().unwrap_or("0").to_string();
                    let own = status["header"]["member_id"].as_str().unwrap_or("").to_string();
                    if leader == "0" {
                        last = Some(anyhow::anyhow!("etcd member {i} knows no leader"));
                        continue;
                    }
                    if leader == own {
                        return Ok(i);
                    }
                    // Ask each of the others for its own id.
                    for (j, other) in self.members.iter().enumerate() {
                        if j != i
                            && other.child.is_some()
                            && let Ok(body) = http(other.client_port, "POST", "/v3/maintenance/status", "{}").await
                            && serde_json::from_str::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|s| s["header"]["member_id"].as_str().map(str::to_string))
                                .as_deref()
                                == Some(leader.as_str())
                        {
                            return Ok(j);
                        }
                    }
                    last = Some(anyhow::anyhow!("etcd's leader {leader} is none of the running members"));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no etcd member is running")))
    }

    /// Turns on etcd's authentication, with a `root` user whose password is `password`
    /// (with `etcdctl`, from Debian's `etcd-client`).
    pub fn enable_auth(&self, password: &str) -> Result<()> {
        let endpoints = self.endpoints().join(",");
        let user = format!("root:{password}");
        for args in [
            vec!["user", "add", user.as_str(), "--interactive=false"],
            vec!["user", "grant-role", "root", "root"],
            vec!["auth", "enable"],
        ] {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(&endpoints)
                .args(&args)
                .output()
                .context("running etcdctl (is etcd-client installed?)")?;
            anyhow::ensure!(
                out.status.success(),
                "etcdctl {}: {}",
                args[..2].join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The last lines of member `i`'s log, for failure messages.
    pub fn log(&self, i: usize) -> String {
        const TAIL_LINES: usize = 40;
        match fs::read(self.member_dir(i).join("etcd.log")) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
            }
            Err(err) => format!("(cannot read the log: {err})"),
        }
    }
}

/// One HTTP/1.0 request to a member's client port; the response body if the status is 200.
async fn http(port: u16, method: &str, path: &str, body: &str) -> Result<String> {
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .context("etcd did not answer within 2 s")??;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("etcd answered {path} with {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn three_members_elect_a_leader_and_a_new_one_after_it_is_killed() -> Result<()> {
        let mut cluster = EtcdCluster::start(3).await?;
        assert_eq!(cluster.endpoints().len(), 3);
        let first = cluster.leader().await?;
        cluster.kill(first);
        let deadline = Instant::now() + Duration::from_secs(30);
        let second = loop {
            match cluster.leader().await {
                Ok(leader) if leader != first => break leader,
                _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                other => bail!("no new leader after killing member {first}: {other:?}"),
            }
        };
        assert_ne!(second, first);
        cluster.restart(first).await?;
        assert!(cluster.pid(first).is_some());
        Ok(())
    }
}
