//! A `ferrata-tc` process for tests that need global transactions: started from the
//! binary the test names (Cargo gives a test the path of its package's binaries), on free
//! loopback ports, with a throw-away data directory (or a node on an etcd store, serving or
//! standing by, possibly inside a partition test's host); killed when dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;

use anyhow::{Context, Result};
use ferrata_rpc::client::{ClientConfig, TcClient};
use ferrata_tc::config::HaMode;
use serde_json::Value;

use crate::ferrata_testkit::netns::Host;
use crate::process::{Panics, addr_in, spawn_until};

pub struct Coordinator {
    binary: String,
    child: Child,
    pub rpc: SocketAddr,
    pub http: SocketAddr,
    /// Panics the process reported, restarts included.
    pub panics: Panics,
    /// The root token, when it was started with one: `get` and `post` send it.
    pub token: Option<String>,
    /// The partition test's host it runs in, if any.
    host: Option<Arc<Host>>,
    data: tempfile::TempDir,
}

/// The config file in `data`, written by [`Coordinator::start_with`].
const CONFIG_FILE: &str = "tc.toml";

/// Starts `binary` (inside `host`, if any) on `rpc` and `http` with its store in `data`
/// (and the config file there, if any), and waits until it serves.
fn spawn(
    binary: &str,
    host: Option<&Host>,
    data: &Path,
    [rpc, http]: [&str; 2],
    panics: &Panics,
) -> Result<(Child, SocketAddr, SocketAddr)> {
    let mut command = match host {
        Some(host) => host.command(binary),
        None => Command::new(binary),
    };
    command
        .args(["--listen", rpc, "--http", http, "--log-level", "info"])
        .arg("--data-dir")
        .arg(data)
        .env_remove("FERRATA_TC_TOKEN");
    let config = data.join(CONFIG_FILE);
    if config.exists() {
        command.arg("--config").arg(config);
    }
    // A node on etcd may stand by instead; both lines name its addresses.
    let (child, line) = spawn_until(command, &["ferrata-tc serving", "standing by"], panics)?;
    Ok((child, addr_in(&line, "rpc=")?, addr_in(&line, "http=")?))
}

impl Coordinator {
    /// Starts `binary` (pass `env!("CARGO_BIN_EXE_ferrata-tc-for-tests")`) and waits until it
    /// serves.
    pub fn start(binary: &str) -> Result<Coordinator> {
        Self::start_with(binary, "")
    }

    /// Like `start`, with `toml` as its config file (kept for restarts); flags still set the
    /// addresses and the data directory.
    pub fn start_with(binary: &str, toml: &str) -> Result<Coordinator> {
        Self::start_placed(binary, toml, None)
    }

    /// Like `start_with`, inside `host` (listening on `at`, the host's end of one of its
    /// links), if given.
    fn start_placed(binary: &str, toml: &str, host: Option<(Arc<Host>, Ipv4Addr)>) -> Result<Coordinator> {
        let data = tempfile::tempdir()?;
        if !toml.is_empty() {
            std::fs::write(data.path().join(CONFIG_FILE), toml)?;
        }
        let panics = Panics::default();
        let listen = format!("{}:0", host.as_ref().map_or(Ipv4Addr::LOCALHOST, |(_, at)| *at));
        let host = host.map(|(host, _)| host);
        let (child, rpc, http) = spawn(binary, host.as_deref(), data.path(), [&listen, &listen], &panics)?;
        Ok(Coordinator {
            binary: binary.to_owned(),
            child,
            rpc,
            http,
            panics,
            token: None,
            host,
            data,
        })
    }

    /// A node with id `node_id` on the etcd cluster at `endpoints` (lease TTL 2 s): it serves,
    /// or stands by while another node does ([`Coordinator::until_serving`]).
    pub fn start_on_etcd(binary: &str, endpoints: &[String], node_id: u16) -> Result<Coordinator> {
        Self::start_with(binary, &etcd_node(endpoints, node_id))
    }

    /// Like `start_on_etcd`, in mode `ha`, inside `host`, listening on `at` (the host's end
    /// of one of its links): beyond loopback, so with `token` as its root token. Serving
    /// nodes also open each other's lock stream with it, so their hosts must reach each
    /// other ([`Host::route_hosts_via`]).
    pub fn start_on_etcd_in(
        binary: &str,
        (endpoints, node_id, ha): (&[String], u16, HaMode),
        (host, at): (Arc<Host>, Ipv4Addr),
        token: &str,
    ) -> Result<Coordinator> {
        let mode = match ha {
            HaMode::ActiveStandby => "active_standby",
            HaMode::Serving => "serving",
        };
        let toml = format!(
            "token = \"{token}\"\n{}mode = \"{mode}\"\n",
            etcd_node(endpoints, node_id)
        );
        let mut tc = Self::start_placed(binary, &toml, Some((host, at)))?;
        tc.token = Some(token.to_owned());
        Ok(tc)
    }

    /// With several serving nodes: whether it serves and leads the cluster's locks.
    pub async fn leads_locks(&self) -> bool {
        self.get("/healthz")
            .await
            .is_ok_and(|health| health["lock_leader"]["this_node"] == true)
    }

    /// With several serving nodes: whether it serves node `node`'s namespace, adopted while
    /// that node is down (`ferrata_tc_adopted`); `None` if it does not answer.
    pub async fn adopted(&self, node: u16) -> Option<bool> {
        let series = format!("ferrata_tc_adopted{{namespace=\"{node}\"}}");
        match crate::http_request(self.http, "GET", "/metrics", "", None).await {
            Ok((200, body)) => Some(crate::metric(&body, &series) == Some(1.0)),
            _ => None,
        }
    }

    /// Whether it answers `/healthz` as serving (not standing by, stopping or failed).
    pub async fn serving(&self) -> bool {
        matches!(
            crate::http_request(self.http, "GET", "/healthz", "", None).await,
            Ok((200, _))
        )
    }

    /// Waits until it serves (a standby: until it took over); there is no event for that
    /// outside its log, so this polls `/healthz`.
    pub async fn until_serving(&self) -> Result<()> {
        crate::until("the coordinator node to serve", async || Ok(self.serving().await)).await
    }

    /// Whether the process is still running (it has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Like `start`, with `token` as its root token (every request then needs a token).
    pub fn start_secured(binary: &str, token: &str) -> Result<Coordinator> {
        let mut tc = Self::start_with(binary, &format!("token = \"{token}\"\n"))?;
        tc.token = Some(token.to_owned());
        Ok(tc)
    }

    /// Kills the process with SIGKILL.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Kills the process with SIGKILL and starts it again on the same addresses and store.
    pub fn kill9_and_restart(&mut self) -> Result<()> {
        self.kill9()?;
        self.restart()
    }

    /// Pauses the process (SIGSTOP): its sockets stay open and nothing answers. Returns once
    /// the kernel reports it stopped (the signal is delivered asynchronously).
    pub fn pause(&self) -> Result<()> {
        crate::process::pause(&self.child)
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        crate::process::resume(&self.child)
    }

    /// Starts the (killed) process again on the same addresses and store.
    pub fn restart(&mut self) -> Result<()> {
        let (child, rpc, http) = spawn(
            &self.binary,
            self.host.as_deref(),
            self.data.path(),
            [&self.rpc.to_string(), &self.http.to_string()],
            &self.panics,
        )?;
        (self.child, self.rpc, self.http) = (child, rpc, http);
        Ok(())
    }

    /// `host:port` for the proxy's `--tc`.
    pub fn endpoint(&self) -> String {
        self.rpc.to_string()
    }

    pub async fn client(&self) -> Result<TcClient> {
        TcClient::connect(&ClientConfig {
            endpoint: format!("http://{}", self.rpc),
            ..ClientConfig::default()
        })
        .await
    }

    /// GET on the HTTP API, parsed as JSON; anything but 200 is an error.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let (status, json) = self.call("GET", path, "").await?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {json}");
        Ok(json)
    }

    /// GET on the HTTP API: the status and the JSON answer.
    pub async fn get_answer(&self, path: &str) -> Result<(u16, Value)> {
        self.call("GET", path, "").await
    }

    /// POST of a JSON body on the HTTP API: the status and the JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.call("POST", path, &body.to_string()).await
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> Result<(u16, Value)> {
        let (status, text) = crate::http_request(self.http, method, path, body, self.token.as_deref()).await?;
        let json = serde_json::from_str(&text).with_context(|| format!("{method} {path}: {status} {text}"))?;
        Ok((status, json))
    }

    /// The status of a transaction as the coordinator reports it.
    pub async fn status(&self, xid: &str) -> Result<String> {
        let v = self.get(&format!("/v1/transactions/{xid}")).await?;
        Ok(v["status"].as_str().unwrap_or_default().to_owned())
    }
}

/// The config of node `node_id` on the etcd cluster at `endpoints`, with a short lease.
fn etcd_node(endpoints: &[String], node_id: u16) -> String {
    format!("node_id = {node_id}\n[etcd]\nendpoints = {endpoints:?}\nlease_ttl_s = 2\nrequest_timeout_ms = 1000\n")
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
