//! Coordinator configuration: a TOML file, overridden by command-line flags and the
//! `FERRATA_TC_TOKEN` environment variable. Every setting has a default, so the coordinator
//! runs with no file at all; README.md documents each one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

pub use ferrata_rpc::process::{Log, LogFormat, Secret};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC address for resource managers (proxies) and transaction managers.
    pub listen: SocketAddr,
    /// HTTP address for the JSON API, metrics and health.
    pub http: SocketAddr,
    /// Where the durable store lives (unless `[etcd]` names endpoints).
    pub data_dir: PathBuf,
    /// This node's id (0-65535), part of every XID and branch id it issues: give each
    /// coordinator node sharing a store its own.
    pub node_id: u16,
    /// The root token (`authorization: Bearer <token>`): allowed everything, meant to create
    /// named tokens with roles (see README, "Tokens and roles").
    pub token: Option<Secret>,
    /// A file holding the token (trailing whitespace ignored); used when `token` is unset.
    pub token_file: Option<PathBuf>,
    /// TLS on both listeners.
    pub tls: Option<Tls>,
    /// Tokio worker threads; 0 means one per CPU.
    pub worker_threads: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before the listeners close.
    pub shutdown_timeout_ms: u64,
    pub transactions: Transactions,
    pub phase2: Phase2,
    pub calls: Calls,
    pub auth: Auth,
    pub etcd: Etcd,
    pub log: Log,
}

/// The etcd store, shared by several coordinator nodes (README, "High availability").
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Etcd {
    /// Client URLs of the etcd members (`http://host:2379`); empty: the embedded store in
    /// `data_dir`.
    pub endpoints: Vec<String>,
    /// Prefix of every key the coordinator writes: one prefix per coordinator cluster.
    pub prefix: String,
    /// TTL of each node's lease, in seconds: a standby takes over about this long after the
    /// active node stopped renewing it.
    pub lease_ttl_s: u64,
    /// Most operations in one etcd transaction: at most etcd's `--max-txn-ops` (128 unless
    /// set).
    pub max_txn_ops: usize,
    /// Most bytes in one etcd transaction: below etcd's `--max-request-bytes` (1.5 MiB unless
    /// set).
    pub max_txn_bytes: usize,
    /// How long one etcd request may take before it is tried again.
    pub request_timeout_ms: u64,
    /// The base URL other nodes send HTTP clients to while this node is active
    /// (`https://tc-1.example:7091`); defaults to `http` (https with TLS) and the HTTP listen
    /// address, which must then not be a wildcard address.
    pub advertise_http: Option<String>,
    /// The `host:port` this node's gRPC is reached at, shown by the standbys' /healthz;
    /// defaults to the gRPC listen address.
    pub advertise_rpc: Option<String>,
    /// The etcd user this coordinator authenticates as (etcd's `auth enable`); needs a
    /// password.
    pub username: Option<String>,
    /// Its password; prefer `password_file` or `FERRATA_ETCD_PASSWORD`. Never logged.
    pub password: Option<Secret>,
    /// A file holding the password (trailing whitespace ignored).
    pub password_file: Option<PathBuf>,
    /// TLS to etcd (`https://` endpoints).
    pub tls: Option<EtcdTls>,
    /// How the nodes sharing the store work together: `active_standby` (one serves, the
    /// others wait to take over) or `serving` (every node serves its own namespace of XIDs,
    /// and one of them, elected, holds the cluster's locks).
    pub mode: HaMode,
    /// With `serving` and TLS: the PEM CA the nodes verify each other's gRPC certificates
    /// with (the lock stream); defaults to this node's own certificate, which suits one
    /// certificate shared by the cluster's nodes.
    pub peer_ca: Option<PathBuf>,
}

/// How the nodes sharing an etcd store work together (README, "High availability").
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum HaMode {
    /// One node serves; the others stand by and take over when its lease runs out.
    #[default]
    ActiveStandby,
    /// Every node serves the transactions it began; one elected node holds every lock.
    Serving,
}

/// TLS to etcd: the CA that signed its members' certificates, and this node's client
/// certificate if etcd asks for one (`--client-cert-auth`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// PEM CA certificate(s).
    pub ca: PathBuf,
    /// PEM client certificate chain (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl Default for Etcd {
    fn default() -> Self {
        Etcd {
            endpoints: Vec::new(),
            prefix: "/ferrata/".into(),
            lease_ttl_s: 5,
            max_txn_ops: 128,
            max_txn_bytes: 1024 * 1024,
            request_timeout_ms: 2_000,
            advertise_http: None,
            advertise_rpc: None,
            username: None,
            password: None,
            password_file: None,
            tls: None,
            mode: HaMode::ActiveStandby,
            peer_ca: None,
        }
    }
}

impl Etcd {
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Several serving nodes (step 2 of HA).
    pub fn serving(&self) -> bool {
        self.enabled() && self.mode == HaMode::Serving
    }
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_s)
    }
    pub fn request_timeout(&self) -> Duration {
        ms(self.request_timeout_ms)
    }

    /// The password: `password`, else `password_file`'s contents, else `FERRATA_ETCD_PASSWORD`.
    pub fn password(&self) -> Result<Option<String>, crate::store::StoreError> {
        if let Some(Secret(p)) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                crate::store::StoreError(format!("cannot read etcd.password_file {}: {e}", path.display()))
            })?;
            return Ok(Some(text.trim_end().to_owned()));
        }
        Ok(std::env::var("FERRATA_ETCD_PASSWORD").ok())
    }
}

/// Calls to services' HTTP endpoints (TCC and saga branches).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Calls {
    /// How long one call may take, unless its transaction says otherwise.
    pub request_timeout_ms: u64,
    /// A PEM file of CA certificates trusted for https endpoints, besides the web's roots.
    pub ca: Option<PathBuf>,
    /// Signing secrets, by URL prefix (the longest matching prefix signs a call).
    pub endpoints: Vec<Endpoint>,
    /// URL prefixes a branch's URLs must fall under (scheme, host and port, then whole path
    /// segments); empty: any URL.
    pub allow: Vec<String>,
}

/// A signing secret for the endpoints under one URL prefix.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub prefix: String,
    /// Standard Webhooks' `whsec_<base64>` form, or any string used as it is.
    pub secret: Secret,
}

impl Calls {
    pub fn request_timeout(&self) -> Duration {
        ms(self.request_timeout_ms)
    }
}

impl Default for Calls {
    fn default() -> Self {
        Calls {
            request_timeout_ms: 3_000,
            ca: None,
            endpoints: Vec::new(),
            allow: Vec::new(),
        }
    }
}

/// Who may see what.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// Whether tokens with the viewer role see the values of rows (dirty-rollback details);
    /// without it they see which rows and columns differ, not the values.
    pub viewers_see_values: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

/// Limits and timeouts of global transactions and their locks.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Transactions {
    /// Timeout of a global transaction whose begin names none.
    pub default_timeout_ms: u64,
    /// Largest timeout a begin may ask for.
    pub max_timeout_ms: u64,
    /// Largest lock wait a request may ask for.
    pub max_lock_wait_ms: u64,
    /// How long a GlobalRollback call waits for the branches to roll back before it answers
    /// with the current status (the rollback goes on in the background), and a DTM submit
    /// with `wait_result` for its first pass.
    pub rollback_wait_ms: u64,
    /// Largest application data a branch may carry, in bytes.
    pub max_application_data: usize,
    /// Largest gRPC message accepted, in bytes (bounds the lock keys of one request).
    pub max_message_bytes: usize,
    /// How many finished transactions stay queryable after they end (their outcome, kept in
    /// memory and in the store, so that it survives a restart).
    pub finished_history: usize,
    /// How long a finished transaction stays queryable after it ended.
    pub finished_retention_ms: u64,
    /// How often Begin transactions are checked against their timeout.
    pub timeout_check_interval_ms: u64,
    /// How long a guarded table stays guarded after its last transaction ended, before
    /// resource managers are told to stop checking writes to it (a busy table is not
    /// announced again for every transaction).
    pub guard_linger_ms: u64,
}

/// Phase-2 driving.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Phase2 {
    /// How long a resource manager has to answer one phase-2 command.
    pub call_timeout_ms: u64,
    /// First retry delay after a retryable failure; doubles up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Largest number of branches in one batched commit command.
    pub commit_batch: usize,
    /// How long phase 2 gathers the commits decided after it woke before it sends them, so
    /// that more of them share one command (one DELETE) per resource.
    pub commit_gather_ms: u64,
    /// Heartbeat interval announced to resource managers; a stream silent for three of them
    /// is dropped.
    pub heartbeat_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8091".parse().expect("valid address"),
            http: "127.0.0.1:7091".parse().expect("valid address"),
            data_dir: PathBuf::from("./ferrata-data"),
            node_id: 1,
            token: None,
            token_file: None,
            tls: None,
            worker_threads: 0,
            shutdown_timeout_ms: 10_000,
            transactions: Transactions::default(),
            phase2: Phase2::default(),
            calls: Calls::default(),
            auth: Auth::default(),
            etcd: Etcd::default(),
            log: Log::default(),
        }
    }
}

impl Default for Transactions {
    fn default() -> Self {
        Transactions {
            default_timeout_ms: 60_000,
            max_timeout_ms: 3_600_000,
            max_lock_wait_ms: 60_000,
            rollback_wait_ms: 30_000,
            max_application_data: 64 * 1024,
            max_message_bytes: 16 * 1024 * 1024,
            finished_history: 10_000,
            finished_retention_ms: 86_400_000,
            timeout_check_interval_ms: 100,
            guard_linger_ms: 10_000,
        }
    }
}

impl Default for Phase2 {
    fn default() -> Self {
        Phase2 {
            call_timeout_ms: 15_000,
            retry_initial_ms: 100,
            retry_max_ms: 30_000,
            commit_batch: 1000,
            commit_gather_ms: 2,
            heartbeat_interval_ms: 5_000,
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Config {
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in config file {}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let t = &self.transactions;
        let p = &self.phase2;
        anyhow::ensure!(
            t.default_timeout_ms > 0,
            "transactions.default_timeout_ms must be positive"
        );
        anyhow::ensure!(
            t.default_timeout_ms <= t.max_timeout_ms,
            "transactions.default_timeout_ms ({}) is above transactions.max_timeout_ms ({})",
            t.default_timeout_ms,
            t.max_timeout_ms
        );
        anyhow::ensure!(
            t.max_message_bytes >= 64 * 1024,
            "transactions.max_message_bytes must be at least 65536"
        );
        anyhow::ensure!(
            t.timeout_check_interval_ms > 0,
            "transactions.timeout_check_interval_ms must be positive"
        );
        anyhow::ensure!(
            t.guard_linger_ms <= 86_400_000,
            "transactions.guard_linger_ms must be at most 86400000 (a day)"
        );
        anyhow::ensure!(p.call_timeout_ms > 0, "phase2.call_timeout_ms must be positive");
        anyhow::ensure!(
            p.retry_initial_ms > 0 && p.retry_initial_ms <= p.retry_max_ms,
            "phase2.retry_initial_ms must be positive and at most phase2.retry_max_ms"
        );
        anyhow::ensure!(p.commit_batch > 0, "phase2.commit_batch must be at least 1");
        anyhow::ensure!(
            p.heartbeat_interval_ms >= 10,
            "phase2.heartbeat_interval_ms must be at least 10"
        );
        let e = &self.etcd;
        anyhow::ensure!(
            e.prefix.starts_with('/') && e.prefix.ends_with('/'),
            "etcd.prefix must start and end with '/' (it is {:?})",
            e.prefix
        );
        anyhow::ensure!(
            e.lease_ttl_s >= 2,
            "etcd.lease_ttl_s must be at least 2 (etcd grants no shorter lease)"
        );
        anyhow::ensure!(
            e.request_timeout_ms > 0 && e.request_timeout_ms < e.lease_ttl_s * 1000,
            "etcd.request_timeout_ms must be positive and below the lease's TTL"
        );
        anyhow::ensure!(e.max_txn_ops >= 4, "etcd.max_txn_ops must be at least 4");
        anyhow::ensure!(
            e.max_txn_bytes >= 64 * 1024,
            "etcd.max_txn_bytes must be at least 65536"
        );
        if e.enabled() {
            for endpoint in &e.endpoints {
                let https = endpoint.starts_with("https://");
                anyhow::ensure!(
                    https || endpoint.starts_with("http://"),
                    "etcd endpoint {endpoint:?} must start with http:// or https://"
                );
                anyhow::ensure!(
                    https == e.tls.is_some(),
                    "etcd endpoint {endpoint:?}: https:// endpoints need [etcd.tls] (its ca at least), and [etcd.tls] \
                     needs https:// endpoints"
                );
            }
            if let Some(tls) = &e.tls {
                anyhow::ensure!(
                    tls.cert.is_some() == tls.key.is_some(),
                    "[etcd.tls] cert and key go together"
                );
            }
            anyhow::ensure!(
                e.username.is_none()
                    || e.password.is_some()
                    || e.password_file.is_some()
                    || std::env::var_os("FERRATA_ETCD_PASSWORD").is_some(),
                "etcd.username needs a password (etcd.password, etcd.password_file or FERRATA_ETCD_PASSWORD)"
            );
            anyhow::ensure!(
                (e.advertise_http.is_some() || !self.http.ip().is_unspecified())
                    && (e.advertise_rpc.is_some() || !self.listen.ip().is_unspecified()),
                "with etcd and a wildcard listen or http address, set etcd.advertise_http and etcd.advertise_rpc: \
                 the standbys send clients to the active node at these addresses"
            );
        }
        if let Some(Secret(token)) = &self.token {
            anyhow::ensure!(
                !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()),
                "the token must be non-empty printable ASCII without spaces"
            );
        }
        Ok(())
    }

    /// Reads `token_file` into `token` when no token is set directly.
    fn resolve_token_file(&mut self) -> anyhow::Result<()> {
        if let (None, Some(path)) = (&self.token, &self.token_file) {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading token_file {}", path.display()))?;
            self.token = Some(Secret(text.trim_end().to_owned()));
        }
        Ok(())
    }

    pub fn shutdown_timeout(&self) -> Duration {
        ms(self.shutdown_timeout_ms)
    }

    /// The base URL of this node's HTTP API for clients sent here by a standby; `bound` is
    /// the HTTP listener's address.
    pub fn advertised_http(&self, bound: SocketAddr) -> String {
        match &self.etcd.advertise_http {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("{}://{bound}", if self.tls.is_some() { "https" } else { "http" }),
        }
    }

    /// Where this node's gRPC is reached; `bound` is the gRPC listener's address.
    pub fn advertised_rpc(&self, bound: SocketAddr) -> String {
        self.etcd.advertise_rpc.clone().unwrap_or_else(|| bound.to_string())
    }

    /// The largest gRPC message accepted: `transactions.max_message_bytes`, and with etcd at
    /// most `etcd.max_txn_bytes`, since a branch and its lock keys go into one etcd transaction.
    pub fn max_message_bytes(&self) -> usize {
        if self.etcd.enabled() {
            self.transactions.max_message_bytes.min(self.etcd.max_txn_bytes)
        } else {
            self.transactions.max_message_bytes
        }
    }
}

impl Transactions {
    pub fn default_timeout(&self) -> Duration {
        ms(self.default_timeout_ms)
    }
    pub fn rollback_wait(&self) -> Duration {
        ms(self.rollback_wait_ms)
    }
    pub fn timeout_check_interval(&self) -> Duration {
        ms(self.timeout_check_interval_ms)
    }
    pub fn guard_linger(&self) -> Duration {
        ms(self.guard_linger_ms)
    }
}

impl Phase2 {
    pub fn call_timeout(&self) -> Duration {
        ms(self.call_timeout_ms)
    }
    pub fn heartbeat_interval(&self) -> Duration {
        ms(self.heartbeat_interval_ms)
    }
    /// How long a resource manager may trust its guard set after an answered heartbeat:
    /// the three intervals after which a silent stream is dropped.
    pub fn guard_lease(&self) -> Duration {
        self.heartbeat_interval() * 3
    }
    /// Delay before retry number `attempt` (0-based): doubling from `retry_initial_ms`, capped
    /// at `retry_max_ms`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        ms(self
            .retry_initial_ms
            .saturating_mul(1u64 << attempt.min(32))
            .min(self.retry_max_ms))
    }
}

/// Command-line flags; each one overrides the config file's setting.
#[derive(Debug, Default, clap::Parser)]
#[command(name = "ferrata-tc", version, about = "Ferrata's transaction coordinator")]
pub struct Flags {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// gRPC address [default: 127.0.0.1:8091].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// HTTP address for the JSON API, /metrics and /healthz [default: 127.0.0.1:7091].
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Directory of the durable store [default: ./ferrata-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// This node's id, 0-65535, part of every XID [default: 1].
    #[arg(long)]
    pub node_id: Option<u16>,
    /// The root token (allowed everything; create named tokens with it). Prefer the
    /// environment variable or token_file: a flag is visible to other users in the process
    /// list.
    #[arg(long, env = "FERRATA_TC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM certificate chain for TLS on both listeners (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Tokio worker threads, 0 for one per CPU [default: 0].
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Log filter, e.g. info or ferrata_tc=debug [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<String>,
    /// Keep the state in etcd, at these client URLs (comma-separated), instead of data_dir:
    /// several nodes share it, one serving and the others standing by.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// With --etcd: active-standby (one node serves) or serving (every node serves)
    /// [default: active-standby].
    #[arg(long, value_enum)]
    pub etcd_mode: Option<HaMode>,
}

impl Flags {
    /// The config file (or the defaults) with these flags applied.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.http {
            config.http = v;
        }
        if let Some(v) = self.data_dir {
            config.data_dir = v;
        }
        if let Some(v) = self.node_id {
            config.node_id = v;
        }
        if let Some(v) = self.token {
            config.token = Some(Secret(v));
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            config.tls = Some(Tls { cert, key });
        }
        if let Some(v) = self.worker_threads {
            config.worker_threads = v;
        }
        if let Some(v) = self.etcd {
            config.etcd.endpoints = v;
        }
        if let Some(v) = self.etcd_mode {
            config.etcd.mode = v;
        }
        config.log.apply_flags(self.log_level, self.log_format)?;
        config.resolve_token_file()?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_file_and_flags() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        let c = Config::from_toml("node_id = 7\ndata_dir = \"/var/lib/ferrata\"\n[phase2]\ncommit_batch = 5").unwrap();
        assert_eq!(
            (c.node_id, c.data_dir.clone(), c.phase2.commit_batch),
            (7, PathBuf::from("/var/lib/ferrata"), 5)
        );
        assert!(
            Config::from_toml("nodeid = 7")
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        assert!(Config::from_toml("[transactions]\ndefault_timeout_ms = 0").is_err());
        let c = Config::from_toml("[transactions]\nguard_linger_ms = 250").unwrap();
        assert_eq!(c.transactions.guard_linger(), Duration::from_millis(250));
        assert!(Config::from_toml("[transactions]\nguard_linger_ms = 86400001").is_err());

        let flags = Flags::try_parse_from([
            "ferrata-tc",
            "--listen",
            "127.0.0.1:1",
            "--node-id",
            "3",
            "--token",
            "s3cret",
        ])
        .unwrap();
        let c = flags.into_config().unwrap();
        assert_eq!((c.listen.port(), c.node_id), (1, 3));
        assert_eq!(c.token, Some(Secret("s3cret".into())));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the token never shows in debug output"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = Phase2 {
            retry_initial_ms: 100,
            retry_max_ms: 1000,
            ..Phase2::default()
        };
        let delays: Vec<u64> = (0..6).map(|a| p.backoff(a).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(200), Duration::from_millis(1000));
    }
}
