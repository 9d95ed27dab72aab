//! Proxy configuration: a TOML file, overridden by command-line flags. Every setting has a
//! default, so the proxy runs with no file at all; README.md documents each one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

pub use ferrata_rpc::process::{Log, LogFormat, Secret};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// The MariaDB/MySQL server behind the proxy, as `host:port`, or the path of its Unix
    /// socket (starting with `/`) when it runs on the same host.
    pub backend: String,
    /// Address of the admin HTTP listener (`/metrics`, `/healthz`). Embedders may set `None`.
    pub admin_listen: Option<SocketAddr>,
    /// Client sessions served at once; further clients get ERR 1040.
    pub max_connections: usize,
    /// Largest command payload, in bytes, a client may send (responses are streamed and not
    /// limited by the proxy).
    pub max_packet_size: usize,
    /// Time a client has, from connecting, to finish authentication.
    pub handshake_timeout_ms: u64,
    /// Time allowed to open the backend connection.
    pub connect_timeout_ms: u64,
    /// On SIGTERM/SIGINT, how long in-flight commands may take before sessions are cut.
    pub shutdown_timeout_ms: u64,
    /// Threads that run client sessions (`threads.rs`); 0 means one per CPU.
    pub worker_threads: usize,
    /// Answer `@@socket` with NULL, so drivers that prefer the server's Unix socket (such as
    /// mysql_async) stay on the proxy instead of silently bypassing it.
    pub hide_server_socket: bool,
    /// TLS offered to clients.
    pub tls: Option<ClientTls>,
    /// TLS towards the backend.
    pub backend_tls: Option<BackendTls>,
    /// The transaction coordinator; without it the proxy is a plain relay and refuses
    /// global-transaction statements.
    pub coordinator: Option<Coordinator>,
    /// The proxy's own connections to the backend (metadata, phase 2).
    pub service: Service,
    /// Writes outside global transactions, checked against global row locks.
    pub dirty_writes: DirtyWrites,
    /// The barriers of TCC and saga handlers (`BEGIN BRANCH`).
    pub barrier: Barriers,
    /// Messages written to `ferrata_outbox`.
    pub outbox: Outbox,
    pub log: Log,
}

/// The outbox (`outbox/`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Outbox {
    /// How long prepared messages wait for their local transaction's COMMIT before the
    /// coordinator checks their barrier row.
    pub prepared_timeout_ms: u64,
    /// How long delivered rows stay in `ferrata_outbox`, for DBAs to see, before they are
    /// purged; 0 keeps them.
    pub keep_delivered_s: u64,
    /// How often the purge runs.
    pub purge_interval_ms: u64,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            prepared_timeout_ms: 30_000,
            keep_delivered_s: 7 * 24 * 3600,
            purge_interval_ms: 60_000,
        }
    }
}

/// Where `BEGIN BRANCH` keeps its barrier rows: DTM's table, so that DTM's SDK barriers and
/// Ferrata's see each other's rows.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Barriers {
    /// `database.table`, created with DTM's layout on first use when missing.
    pub table: String,
}

impl Default for Barriers {
    fn default() -> Self {
        Barriers {
            table: "dtm_barrier.barrier".into(),
        }
    }
}

/// The no-dirty-writes check: a write made outside any global transaction must not commit
/// over a row an unfinished global transaction holds (see ARCHITECTURE.md). Needs a
/// `[coordinator]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DirtyWrites {
    /// Check every table unless `tables` says otherwise.
    pub check: bool,
    /// Per-table exceptions, `"database.table" = true | false`.
    pub tables: std::collections::BTreeMap<String, bool>,
    /// When the coordinator cannot be asked about rows that need checking: `refuse` the
    /// write (the default), or `allow` it unchecked.
    pub when_coordinator_unreachable: WhenUnreachable,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenUnreachable {
    Refuse,
    Allow,
}

impl Default for DirtyWrites {
    fn default() -> Self {
        DirtyWrites {
            check: true,
            tables: Default::default(),
            when_coordinator_unreachable: WhenUnreachable::Refuse,
        }
    }
}

impl DirtyWrites {
    /// Whether writes to `database.table` are checked (names compared case-insensitively).
    pub fn checks(&self, database: &str, table: &str) -> bool {
        if self.tables.is_empty() {
            return self.check;
        }
        let name = format!("{database}.{table}");
        self.tables
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(&name))
            .map_or(self.check, |(_, &on)| on)
    }

    /// Whether any table at all may be checked.
    pub fn any(&self) -> bool {
        self.check || self.tables.values().any(|&on| on)
    }
}

/// Where the transaction coordinator is and how global transactions behave.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Coordinator {
    /// `host:port` of each coordinator node, tried in order (failover).
    pub endpoints: Vec<String>,
    /// The coordinator's token, if it requires one (also `FERRATA_TC_TOKEN`). Never logged.
    #[serde(default)]
    pub token: Option<Secret>,
    /// PEM CA certificates: connect over TLS and verify the coordinator.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// How long a branch registration may wait for rows another global transaction holds.
    #[serde(default = "default_lock_wait_ms")]
    pub lock_wait_ms: u64,
    /// How long COMMIT GLOBAL and ROLLBACK GLOBAL keep asking the coordinator after a transport
    /// failure (it may be restarting) before the client hears that the outcome is unknown.
    #[serde(default = "default_outcome_wait_ms")]
    pub outcome_wait_ms: u64,
    /// This proxy's name on its coordinator stream; defaults to `ferrata-proxy@<listen>`.
    #[serde(default)]
    pub rm_id: Option<String>,
}

impl Coordinator {
    /// The coordinator at `endpoints`, every other setting at its default.
    pub fn new(endpoints: Vec<String>) -> Coordinator {
        Coordinator {
            endpoints,
            token: None,
            tls_ca: None,
            lock_wait_ms: default_lock_wait_ms(),
            outcome_wait_ms: default_outcome_wait_ms(),
            rm_id: None,
        }
    }
}

fn default_lock_wait_ms() -> u64 {
    10_000
}

fn default_outcome_wait_ms() -> u64 {
    15_000
}

/// The proxy's own database account, for metadata and phase 2. Its password comes from the
/// file or `FERRATA_SERVICE_PASSWORD`, never from a flag, and is never logged.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Service {
    pub user: String,
    pub password: Option<Secret>,
    /// The server's part of every resource id (`<server>/<database>`). Every proxy in front
    /// of one database must use the same; defaults to the `backend` setting.
    pub resource_server: Option<String>,
    /// Create the `undo_log` table in a database when it is missing.
    pub create_undo_log: bool,
    /// How long an anti-hanging marker (the `undo_log` row a rollback leaves when a branch's
    /// undo record is not there) is kept: long enough that the late phase-1 commit it blocks
    /// can no longer arrive (the coordinator's longest global timeout plus a margin).
    pub marker_retention_ms: u64,
    /// How often the XA orphan sweep lists the server's prepared Ferrata branches and settles
    /// those no session of this proxy holds, as the coordinator says.
    pub xa_sweep_interval_ms: u64,
    /// How long the connection holding a prepared XA branch must have been idle before a
    /// proxy that does not hold it ends it to finish the branch (its proxy is presumed hung).
    pub xa_kill_idle_ms: u64,
}

impl Default for Service {
    fn default() -> Self {
        Service {
            user: "ferrata".into(),
            password: None,
            resource_server: None,
            create_undo_log: true,
            marker_retention_ms: 2 * 3_600_000,
            xa_sweep_interval_ms: 30_000,
            xa_kill_idle_ms: 10_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM certificate chain presented to clients.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// Refuse clients that do not switch to TLS.
    #[serde(default)]
    pub required: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    /// PEM CA certificates that sign the backend's certificate.
    pub ca: PathBuf,
    /// Name to verify in the backend's certificate; defaults to the backend host.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:3307".parse().expect("valid address"),
            backend: "127.0.0.1:3306".into(),
            admin_listen: Some("127.0.0.1:9307".parse().expect("valid address")),
            max_connections: 4096,
            max_packet_size: 64 * 1024 * 1024,
            handshake_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            shutdown_timeout_ms: 30_000,
            worker_threads: 0,
            hide_server_socket: true,
            tls: None,
            backend_tls: None,
            coordinator: None,
            service: Service::default(),
            dirty_writes: DirtyWrites::default(),
            barrier: Barriers::default(),
            outbox: Outbox::default(),
            log: Log::default(),
        }
    }
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
        anyhow::ensure!(self.max_connections > 0, "max_connections must be at least 1");
        anyhow::ensure!(
            self.max_packet_size >= 1024,
            "max_packet_size must be at least 1024 bytes"
        );
        anyhow::ensure!(!self.backend.is_empty(), "backend must be set, e.g. \"127.0.0.1:3306\"");
        if let Some(c) = &self.coordinator {
            anyhow::ensure!(
                !c.endpoints.is_empty(),
                "[coordinator] endpoints must name at least one ferrata-tc, e.g. [\"127.0.0.1:8091\"]"
            );
            anyhow::ensure!(
                c.endpoints.iter().all(|e| !e.is_empty()),
                "[coordinator] endpoints must not be empty strings"
            );
            anyhow::ensure!(
                c.outcome_wait_ms <= 600_000,
                "[coordinator] outcome_wait_ms must be at most 600000 (10 minutes): a client waits that long for COMMIT GLOBAL"
            );
        }
        anyhow::ensure!(
            self.service.marker_retention_ms >= 1000,
            "[service] marker_retention_ms must be at least 1000: an anti-hanging marker must outlive the late commit it blocks \
             (keep it above the coordinator's longest global timeout)"
        );
        anyhow::ensure!(
            self.service.xa_kill_idle_ms >= 1000,
            "[service] xa_kill_idle_ms must be at least 1000: a live session between its client's commands must not be taken for a hung proxy's"
        );
        anyhow::ensure!(
            self.service.xa_sweep_interval_ms >= 100,
            "[service] xa_sweep_interval_ms must be at least 100: each sweep runs XA RECOVER on the server"
        );
        anyhow::ensure!(
            self.outbox.prepared_timeout_ms >= 1000 && self.outbox.purge_interval_ms >= 100,
            "[outbox] prepared_timeout_ms must be at least 1000 and purge_interval_ms at least 100"
        );
        anyhow::ensure!(
            self.barrier
                .table
                .split_once('.')
                .is_some_and(|(d, t)| !d.is_empty() && !t.is_empty()),
            "[barrier] table: {:?} must be written \"database.table\"",
            self.barrier.table
        );
        for name in self.dirty_writes.tables.keys() {
            anyhow::ensure!(
                name.split_once('.')
                    .is_some_and(|(d, t)| !d.is_empty() && !t.is_empty()),
                "[dirty_writes] tables: {name:?} must be written \"database.table\""
            );
        }
        anyhow::ensure!(
            self.backend_tls.is_none() || self.backend_socket().is_none(),
            "backend_tls needs a TCP backend (host:port), not the Unix socket {}",
            self.backend
        );
        Ok(())
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// The backend's Unix socket path, when `backend` is one.
    pub fn backend_socket(&self) -> Option<&Path> {
        self.backend.starts_with('/').then(|| Path::new(&self.backend))
    }

    /// The server part of resource ids.
    pub fn resource_server(&self) -> &str {
        self.service.resource_server.as_deref().unwrap_or(&self.backend)
    }

    /// The backend host name, for TLS name checks.
    pub fn backend_host(&self) -> &str {
        self.backend
            .rsplit_once(':')
            .map_or(self.backend.as_str(), |(host, _)| host.trim_matches(['[', ']']))
    }
}

/// Command-line flags; each one overrides the config file's setting.
#[derive(Debug, Default, clap::Parser)]
#[command(name = "ferrata-proxy", version, about = "Ferrata's MySQL/MariaDB proxy")]
pub struct Flags {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address clients connect to [default: 127.0.0.1:3307].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The database server behind the proxy: host:port, or the path of its Unix socket
    /// [default: 127.0.0.1:3306].
    #[arg(long)]
    pub backend: Option<String>,
    /// Admin HTTP address for /metrics and /healthz [default: 127.0.0.1:9307].
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Maximum client sessions at once [default: 4096].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Largest client command payload in bytes [default: 64 MiB].
    #[arg(long)]
    pub max_packet_size: Option<usize>,
    /// Threads that run client sessions, 0 for one per CPU [default: 0].
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// PEM certificate chain for client TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for client TLS (with --tls-cert).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A transaction coordinator (host:port); repeat the flag for failover nodes. Without
    /// one, global-transaction statements are refused.
    #[arg(long = "tc", value_name = "HOST:PORT")]
    pub tc: Vec<String>,
    /// The coordinator's token. Prefer the environment variable: flags show in the process list.
    #[arg(long, env = "FERRATA_TC_TOKEN", hide_env_values = true)]
    pub tc_token: Option<String>,
    /// The proxy's own database user for metadata and phase 2 [default: ferrata].
    #[arg(long)]
    pub service_user: Option<String>,
    /// Its password (environment only).
    #[arg(skip)]
    pub service_password: Option<String>,
    /// Do not check writes outside global transactions against global row locks.
    #[arg(long)]
    pub no_dirty_write_check: bool,
    /// Log filter, e.g. info or ferrata_proxy=debug [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<String>,
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
        if let Some(v) = self.backend {
            config.backend = v;
        }
        if let Some(v) = self.admin_listen {
            config.admin_listen = Some(v);
        }
        if let Some(v) = self.max_connections {
            config.max_connections = v;
        }
        if let Some(v) = self.max_packet_size {
            config.max_packet_size = v;
        }
        if let Some(v) = self.worker_threads {
            config.worker_threads = v;
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            let required = config.tls.as_ref().is_some_and(|t| t.required);
            config.tls = Some(ClientTls { cert, key, required });
        }
        if !self.tc.is_empty() {
            let mut c = config
                .coordinator
                .take()
                .unwrap_or_else(|| Coordinator::new(Vec::new()));
            c.endpoints = self.tc;
            config.coordinator = Some(c);
        }
        if let (Some(token), Some(c)) = (self.tc_token, config.coordinator.as_mut()) {
            c.token = Some(Secret(token));
        }
        if let Some(v) = self.service_user {
            config.service.user = v;
        }
        if let Some(v) = self
            .service_password
            .or_else(|| std::env::var("FERRATA_SERVICE_PASSWORD").ok())
        {
            config.service.password = Some(Secret(v));
        }
        if self.no_dirty_write_check {
            config.dirty_writes.check = false;
            config.dirty_writes.tables.clear();
        }
        config.log.apply_flags(self.log_level, self.log_format)?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn file_settings_and_flag_overrides() {
        let dir = std::env::temp_dir().join(format!("ferrata-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.toml");
        std::fs::write(
            &path,
            "backend = \"db:3306\"\nmax_connections = 10\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nrequired = true\n[log]\nformat = \"json\"\n",
        )
        .unwrap();
        let flags = Flags::parse_from([
            "ferrata-proxy",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "0.0.0.0:4000",
        ]);
        let config = flags.into_config().unwrap();
        assert_eq!(config.backend, "db:3306");
        assert_eq!(config.backend_host(), "db");
        assert_eq!(config.max_connections, 10);
        assert_eq!(config.listen, "0.0.0.0:4000".parse().unwrap());
        assert!(config.tls.unwrap().required);
        assert_eq!(config.log.format, LogFormat::Json);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(Config::from_toml("listne = \"1.2.3.4:5\"").is_err());
        assert!(Config::from_toml("max_connections = 0").is_err());
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn dirty_write_check_per_table() {
        let config = Config::from_toml(
            "[dirty_writes]\ncheck = false\ntables = { \"Shop.accounts\" = true }\nwhen_coordinator_unreachable = \"allow\"\n",
        )
        .unwrap();
        let d = &config.dirty_writes;
        assert!(d.checks("shop", "ACCOUNTS"));
        assert!(!d.checks("shop", "ledger"));
        assert!(d.any());
        assert_eq!(d.when_coordinator_unreachable, WhenUnreachable::Allow);
        let on = Config::default().dirty_writes;
        assert!(on.checks("any", "table") && on.when_coordinator_unreachable == WhenUnreachable::Refuse);
        let err = Config::from_toml("[dirty_writes]\ntables = { \"accounts\" = false }\n").unwrap_err();
        assert!(format!("{err:#}").contains("database.table"), "{err:#}");
    }

    #[test]
    fn unix_socket_backend() {
        let config = Config::from_toml("backend = \"/run/mysqld/mysqld.sock\"").unwrap();
        assert_eq!(config.backend_socket(), Some(Path::new("/run/mysqld/mysqld.sock")));
        assert_eq!(Config::default().backend_socket(), None);
        let err =
            Config::from_toml("backend = \"/run/mysqld/mysqld.sock\"\n[backend_tls]\nca = \"ca.pem\"\n").unwrap_err();
        assert!(err.to_string().contains("needs a TCP backend"), "{err}");
    }
}
