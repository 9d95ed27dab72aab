//! The coordinator layer, shared by every transaction mode: the link to ferrata-tc
//! ([`link`]), the resources this proxy serves, its own service connections to the backend
//! (metadata reads, phase 2), the guarded-table view ([`guards`]), the mapping of the
//! coordinator's answers onto MySQL errors, and the session's binding to a global
//! transaction: Ferrata's statements ([`statement`] parses them, [`binding`] answers them,
//! [`decision`] asks for commit or rollback through coordinator failures) and what may not
//! run while bound ([`refusal`]); the rows of writes to guarded tables, found and checked
//! against global locks ([`row_check`]); and the `undo_log` table each business database
//! holds for the modes ([`undo_table`]).
//!
//! A resource is one database on one backend server: `<server>/<database>`, where the server
//! part is `[service] resource_server` (default: the `backend` setting), the same for every
//! proxy in front of that server. A `/` or `%` in a database name is percent-encoded, so the
//! database is always what follows the last `/`.

pub mod barrier_table;
pub mod binding;
pub mod decision;
pub mod guards;
mod home;
pub mod link;
pub mod refusal;
pub mod row_check;
pub mod statement;
pub mod unchecked;
pub mod undo_table;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferrata_rpc::{ErrorCode, holder_of};
use mysql_async::prelude::*;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::protocol::err::ErrPacket;
use crate::sql::dml::TableRef;
use crate::sql::image::RESTORE_SQL_MODE;
use crate::sql::metadata;
use home::Home;
pub use link::Link;

pub struct Global {
    pub link: Arc<Link>,
    pub lock_wait_ms: u64,
    /// How long a global decision keeps asking through transport failures (`decision.rs`).
    pub outcome_wait: Duration,
    /// The coordinator's guarded tables, as the Attach stream tells them.
    pub guards: Arc<guards::TableGuards>,
    /// Which writes outside global transactions are checked against global locks.
    pub dirty_writes: crate::config::DirtyWrites,
    resource_server: String,
    service: mysql_async::OptsBuilder,
    pools: Mutex<HashMap<String, mysql_async::Pool>>,
    /// Where the pools' connections are made (`home.rs`).
    home: Home,
    pub metadata: metadata::MetadataCache,
}

/// Rows by (database, table): their primary keys, encoded as in the images (so they match
/// the lock keys branches register).
pub type TableRows = std::collections::BTreeMap<(String, String), Vec<Vec<Vec<u8>>>>;

/// Why a branch report did not go through.
#[derive(Debug)]
pub enum ReportFailure {
    /// The coordinator said no (the message says why).
    Refused(String),
    /// The coordinator could not be reached, or did not answer in time: it may have taken it.
    Unanswered(String),
}

/// Why the no-dirty-writes check did not pass.
#[derive(Debug)]
pub enum CheckFailure {
    /// A global transaction still holds a row: who, and for how long it was awaited; the
    /// rows still held at the deadline, when the coordinator named them.
    Held {
        message: String,
        holders: Vec<ferrata_rpc::pb::LockHolder>,
    },
    /// The coordinator could not answer.
    Unreachable(String),
}

/// The resource id of `database` on the server behind this proxy.
pub fn resource_id(server: &str, database: &str) -> String {
    format!("{server}/{}", database.replace('%', "%25").replace('/', "%2F"))
}

/// The database of a resource id.
pub fn database_of(resource: &str) -> Option<String> {
    let (_, db) = resource.rsplit_once('/')?;
    Some(db.replace("%2F", "/").replace("%25", "%"))
}

impl Global {
    /// Builds the coordinator link from the config; `None` without `[coordinator]`.
    pub fn from_config(config: &Config) -> Option<Arc<Global>> {
        let c = config.coordinator.as_ref()?;
        let service = match config.backend_socket() {
            Some(path) => mysql_async::OptsBuilder::default().socket(Some(path.to_string_lossy().into_owned())),
            None => {
                let (host, port) = config
                    .backend
                    .rsplit_once(':')
                    .map_or((config.backend.as_str(), "3306"), |(h, p)| (h, p));
                mysql_async::OptsBuilder::default()
                    .ip_or_hostname(host.trim_matches(['[', ']']).to_owned())
                    .tcp_port(port.parse().unwrap_or(3306))
                    .prefer_socket(false)
            }
        }
        .user(Some(config.service.user.clone()))
        .pass(config.service.password.as_ref().map(|p| p.0.clone()))
        // Images encode TIMESTAMP values as Unix time: at UTC writing them back is exact. The
        // SQL mode lets every stored value (ENUM's error value, zero dates, AUTO_INCREMENT 0)
        // be written back as it was.
        .init(vec![
            "SET time_zone = '+00:00'".to_owned(),
            format!("SET sql_mode = '{RESTORE_SQL_MODE}'"),
        ]);
        Some(Arc::new(Global {
            link: Arc::new(Link::new(c)),
            lock_wait_ms: c.lock_wait_ms,
            outcome_wait: Duration::from_millis(c.outcome_wait_ms),
            guards: Arc::new(guards::TableGuards::default()),
            dirty_writes: config.dirty_writes.clone(),
            resource_server: config.resource_server().to_owned(),
            service,
            pools: Mutex::new(HashMap::new()),
            home: Home::current(),
            metadata: metadata::MetadataCache::new(),
        }))
    }

    /// Starts the Attach stream until `stop`: phase-2 commands go to `handler`; and the
    /// watchdog of unchecked writes (`unchecked.rs`).
    pub fn start(
        self: &Arc<Self>,
        rm_id: String,
        handler: ferrata_rpc::client::CommandHandler,
        stop: CancellationToken,
    ) {
        tokio::spawn(Arc::clone(&self.guards.unchecked).watch(
            {
                let guards = Arc::clone(&self.guards);
                move || guards.trust_clock()
            },
            {
                let global = Arc::clone(self);
                move |connection_id, still_running| {
                    let global = Arc::clone(&global);
                    Box::pin(async move {
                        // A pooled service connection: an interruption may be tried every
                        // tenth of a second while a killed statement rolls back.
                        let resource = global.resource("information_schema");
                        let mut conn = global.service_conn(&resource).await.map_err(|e| e.to_string())?;
                        unchecked::interrupt_query(&mut conn, connection_id, &*still_running)
                            .await
                            .map_err(|e| e.to_string())
                    })
                }
            },
            stop.clone(),
        ));
        let global = Arc::clone(self);
        tokio::spawn(async move {
            // Announce every database first, so phase 2 left over from before a restart (this
            // proxy's or another one's) finds this proxy before any session writes again.
            global.announce_databases().await;
            let guards = Arc::clone(&global.guards);
            Arc::clone(&global.link).run_attach(rm_id, handler, guards, stop).await;
        });
    }

    /// Tells the coordinator this proxy serves every database the service user can see.
    async fn announce_databases(&self) {
        let listed: Result<Vec<String>, mysql_async::Error> = async {
            let mut conn = mysql_async::Conn::new(self.service.clone()).await?;
            let names = conn.query("SHOW DATABASES").await;
            let _ = conn.disconnect().await;
            names
        }
        .await;
        match listed {
            Ok(names) => {
                let system = ["information_schema", "performance_schema", "mysql", "sys"];
                for db in names.iter().filter(|d| !system.contains(&d.as_str())) {
                    self.link.serve(&self.resource(db));
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot list the databases with the service user; resources are announced as sessions use them"
            ),
        }
    }

    pub fn resource(&self, database: &str) -> String {
        resource_id(&self.resource_server, database)
    }

    /// A service connection to the database of `resource`.
    pub async fn service_conn(&self, resource: &str) -> Result<mysql_async::Conn, mysql_async::Error> {
        let db = database_of(resource).unwrap_or_default();
        let pool = self
            .pools
            .lock()
            .entry(db.clone())
            .or_insert_with(|| {
                // No COM_RESET_CONNECTION when a connection goes back to the pool: every user
                // ends its own transaction, and the reset would drop the session settings
                // and the prepared statements it keeps. Idle connections stay a minute
                // (the default closes them at once, so every phase-2 batch would connect,
                // set up the session and prepare its statements again).
                let opts = self.service.clone().db_name(Some(db.clone())).pool_opts(
                    mysql_async::PoolOpts::default()
                        .with_constraints(mysql_async::PoolConstraints::new(0, 8).expect("0 <= 8"))
                        .with_reset_connection(false)
                        .with_inactive_connection_ttl(std::time::Duration::from_secs(60)),
                );
                mysql_async::Pool::new(opts)
            })
            .clone();
        self.home
            .run(async move { pool.get_conn().await })
            .await
            .unwrap_or_else(|| {
                Err(mysql_async::Error::Other(
                    "ferrata-proxy is shutting down: no new service connection".into(),
                ))
            })
    }

    /// The shape of a table, for images; the error a client should get if it cannot be read.
    pub async fn table(&self, schema: &str, table: &str) -> Result<Arc<metadata::TableMeta>, ErrPacket> {
        if let Some(meta) = self.metadata.cached(schema, table) {
            return Ok(meta);
        }
        let resource = self.resource(schema);
        let mut conn = self.service_conn(&resource).await.map_err(|e| service_error(&e))?;
        self.metadata.get(&mut conn, schema, table).await.map_err(|e| match e {
            metadata::MetaError::NoSuchTable { .. } => ErrPacket::new(1146, "42S02", e.to_string()),
            metadata::MetaError::Query(_) => ErrPacket::new(1105, "HY000", e.to_string()),
        })
    }

    /// The shapes of `tables` (a statement's table references), each with its database
    /// (`default_schema` where the reference names none).
    pub async fn tables(
        &self,
        tables: &[TableRef],
        default_schema: Option<&str>,
    ) -> Result<Vec<(String, Arc<metadata::TableMeta>)>, ErrPacket> {
        let mut metas = Vec::with_capacity(tables.len());
        for t in tables {
            let Some(schema) = t.schema.as_deref().or(default_schema) else {
                return Err(no_database());
            };
            metas.push((schema.to_owned(), self.table(schema, &t.name).await?));
        }
        Ok(metas)
    }

    /// Registers an AT branch with its rows' global locks; the error is what the client gets.
    pub async fn register(
        &self,
        xid: &str,
        resource: &str,
        locks: Vec<ferrata_rpc::pb::TableLocks>,
    ) -> Result<u64, ErrPacket> {
        self.register_branch(ferrata_rpc::pb::BranchRegisterRequest {
            xid: xid.to_owned(),
            resource_id: resource.to_owned(),
            locks,
            lock_wait_ms: self.lock_wait_ms,
            ..Default::default()
        })
        .await
    }

    /// Registers an XA branch about to start on the database connection `connection_id`.
    pub async fn register_xa(&self, xid: &str, resource: &str, connection_id: u32) -> Result<u64, ErrPacket> {
        self.register_branch(ferrata_rpc::pb::BranchRegisterRequest {
            xid: xid.to_owned(),
            resource_id: resource.to_owned(),
            branch_type: ferrata_rpc::pb::BranchType::Xa as i32,
            connection_id: connection_id.into(),
            instance_id: self.link.instance_id.clone(),
            ..Default::default()
        })
        .await
    }

    async fn register_branch(&self, request: ferrata_rpc::pb::BranchRegisterRequest) -> Result<u64, ErrPacket> {
        let what = "register the branch";
        let xid = request.xid.clone();
        let mut c = self
            .link
            .client(Some(&xid))
            .await
            .map_err(|e| unreachable(&e.0, what))?;
        let wait = Duration::from_millis(self.lock_wait_ms) + self.outcome_wait;
        match answered_within(wait, c.branch_register(request)).await {
            Ok(r) => Ok(r.branch_id),
            Err(s) if ErrorCode::of(&s).is_none() && !never_sent(&s) => {
                self.link.failed(&s).await;
                // The caller rolls the local transaction back; the branch may exist anyway.
                Err(ErrPacket::new(
                    1105,
                    "HY000",
                    format!(
                        "ferrata-proxy lost its connection to the transaction coordinator while registering the branch ({}); \
                         the local transaction was rolled back, so none of its changes were committed. The coordinator may \
                         hold a branch for it (and its rows' global locks) until global transaction {xid} ends: retry the \
                         local transaction, or ROLLBACK GLOBAL",
                        s.message()
                    ),
                ))
            }
            Err(s) => Err(self.error(s, what).await),
        }
    }

    /// Before a statement of global transaction `xid` first locks rows of `tables` (database,
    /// table) in the database: has the coordinator guard those this proxy's view does not
    /// show guarded yet, and waits for it (the `GuardTables` call). The guard waits for
    /// unchecked writes running on the tables (`unchecked.rs`); the statement must not hold
    /// a database lock such a write waits for meanwhile. `Err`: the client's error; the
    /// statement was not run.
    pub async fn guard_before_write(&self, xid: &str, tables: &[(&str, &str)]) -> Result<(), ErrPacket> {
        let missing: Vec<ferrata_rpc::pb::GuardedTable> = tables
            .iter()
            .filter(|(database, table)| !self.guards.shows(database, table))
            .map(|(database, table)| ferrata_rpc::pb::GuardedTable {
                resource_id: self.resource(database),
                schema: (*database).to_owned(),
                table: (*table).to_owned(),
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let what = "guard the tables this statement writes";
        let mut c = self.link.client(Some(xid)).await.map_err(|e| unreachable(&e.0, what))?;
        let request = ferrata_rpc::pb::GuardTablesRequest {
            xid: xid.to_owned(),
            tables: missing,
            lock_wait_ms: self.lock_wait_ms,
        };
        let wait = Duration::from_millis(self.lock_wait_ms) + self.outcome_wait;
        match answered_within(wait, c.guard_tables(request)).await {
            Ok(_) => Ok(()),
            Err(s) => Err(match ErrorCode::of(&s) {
                Some(ErrorCode::LockWaitTimeout) => ErrPacket::new(
                    1205,
                    "HY000",
                    format!(
                        "Lock wait timeout exceeded; {}; the statement was not run, retry it",
                        s.message()
                    ),
                ),
                Some(ErrorCode::GlobalStatusInvalid) => ErrPacket::new(
                    1399,
                    "XAE07",
                    format!("XAER_RMFAIL: {}; the statement was not run", s.message()),
                ),
                _ => self.error(s, what).await,
            }),
        }
    }

    /// Tells the coordinator how a registered branch's phase 1 ended.
    pub async fn report(
        &self,
        xid: &str,
        branch_id: u64,
        status: ferrata_rpc::pb::BranchStatus,
        reason: &str,
    ) -> Result<(), ReportFailure> {
        let request = ferrata_rpc::pb::BranchReportRequest {
            xid: xid.to_owned(),
            branch_id,
            status: status as i32,
            reason: reason.to_owned(),
        };
        let mut c = self
            .link
            .client(Some(xid))
            .await
            .map_err(|e| ReportFailure::Unanswered(e.0))?;
        match answered_within(self.outcome_wait, c.branch_report(request)).await {
            Ok(_) => Ok(()),
            Err(s) if ErrorCode::of(&s).is_some() => Err(ReportFailure::Refused(s.message().to_owned())),
            Err(s) => {
                self.link.failed(&s).await;
                Err(ReportFailure::Unanswered(s.message().to_owned()))
            }
        }
    }

    /// Tells the coordinator a registered branch's local transaction did not commit, so its
    /// rows are released and phase 2 skips it. Best effort: a rollback would find no undo
    /// record and write the anti-hanging marker anyway.
    pub async fn report_failed(&self, xid: &str, branch_id: u64, reason: &str) {
        let reported = self
            .report(xid, branch_id, ferrata_rpc::pb::BranchStatus::PhaseOneFailed, reason)
            .await;
        if let Err(ReportFailure::Refused(e) | ReportFailure::Unanswered(e)) = reported {
            tracing::warn!(
                xid,
                branch_id,
                error = e,
                "could not report the failed branch; its rollback will find no undo record"
            );
        }
    }

    /// Asks the coordinator whether `rows` could be locked by `xid` (by anyone, if empty):
    /// free, or held by another global transaction, waiting up to `wait_ms` for them.
    pub async fn query_locks(&self, xid: &str, rows: &TableRows, wait_ms: u64) -> Result<(), CheckFailure> {
        let mut by_database: std::collections::BTreeMap<&str, Vec<ferrata_rpc::pb::TableLocks>> = Default::default();
        for ((database, table), keys) in rows {
            by_database
                .entry(database)
                .or_default()
                .push(ferrata_rpc::pb::TableLocks {
                    schema: database.clone(),
                    table: table.clone(),
                    rows: keys
                        .iter()
                        .map(|k| ferrata_rpc::pb::PrimaryKey { values: k.clone() })
                        .collect(),
                });
        }
        for (database, locks) in by_database {
            let about = (!xid.is_empty()).then_some(xid);
            let mut c = self
                .link
                .client(about)
                .await
                .map_err(|e| CheckFailure::Unreachable(e.0))?;
            let request = ferrata_rpc::pb::LockQueryRequest {
                xid: xid.to_owned(),
                resource_id: self.resource(database),
                locks,
                lock_wait_ms: wait_ms,
            };
            let wait = Duration::from_millis(wait_ms) + self.outcome_wait;
            match answered_within(wait, c.lock_query(request)).await {
                Ok(r) => {
                    if !r.lockable {
                        let message = match r.holders.first() {
                            Some(h) => format!(
                                "a row of {}.{} is held by global transaction {} ({}), still after waiting {wait_ms} ms",
                                h.schema,
                                h.table,
                                h.xid,
                                ferrata_rpc::global_status_name(h.status),
                            ),
                            None => format!("rows of {database} are held by another global transaction"),
                        };
                        return Err(CheckFailure::Held {
                            message,
                            holders: r.holders,
                        });
                    }
                }
                Err(status) => match ErrorCode::of(&status) {
                    Some(ErrorCode::LockWaitTimeout | ErrorCode::LockHolderRollingBack | ErrorCode::Deadlock) => {
                        return Err(CheckFailure::Held {
                            message: status.message().to_owned(),
                            holders: Vec::new(),
                        });
                    }
                    Some(_) => return Err(CheckFailure::Unreachable(status.message().to_owned())),
                    None => {
                        self.link.failed(&status).await;
                        return Err(CheckFailure::Unreachable(status.message().to_owned()));
                    }
                },
            }
        }
        Ok(())
    }

    /// A coordinator call's failure as the MySQL error a client sees.
    pub async fn error(&self, status: tonic::Status, what: &str) -> ErrPacket {
        self.link.failed(&status).await;
        coordinator_error(&status, what)
    }
}

/// `call`, or a DEADLINE_EXCEEDED status if no answer came within `wait`: a coordinator
/// that stopped answering (paused, partitioned) holds a request without refusing it. The
/// status carries no Ferrata error code, so callers treat it as a transport failure after
/// the request was sent.
pub async fn answered_within<T>(
    wait: Duration,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(wait, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {} ms",
            wait.as_millis()
        )))
    })
}

/// Whether a call failed before its request left the proxy. The channel reconnects lazily:
/// a call on a connection that broke meanwhile fails with the connector's error ("tcp
/// connect error"), and one queued on a connection that closed before it was written is
/// canceled by hyper ("operation was canceled"); a request cut off while being written or
/// answered fails otherwise ("connection closed before message completed", a reset).
pub fn never_sent(status: &tonic::Status) -> bool {
    let message = status.message();
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && (message.contains("connect error") || message.contains("operation was canceled"))
}

/// Maps the coordinator's refusal onto the MySQL error a client expects.
pub fn coordinator_error(status: &tonic::Status, what: &str) -> ErrPacket {
    let message = status.message();
    match ErrorCode::of(status) {
        Some(ErrorCode::GlobalNotFound) => ErrPacket::new(1397, "XAE04", format!("XAER_NOTA: Unknown XID: {message}")),
        Some(ErrorCode::GlobalStatusInvalid) => ErrPacket::new(
            1399,
            "XAE07",
            format!("XAER_RMFAIL: {message}; the local transaction was rolled back"),
        ),
        Some(ErrorCode::LockWaitTimeout | ErrorCode::LockHolderRollingBack) => ErrPacket::new(
            1205,
            "HY000",
            format!(
                "Lock wait timeout exceeded; global lock held by {}: {message}; the local transaction was rolled back, retry it",
                holder_of(status).unwrap_or_else(|| "another global transaction".into())
            ),
        ),
        Some(ErrorCode::Deadlock) => ErrPacket::new(
            1213,
            "40001",
            format!("Deadlock found when trying to get a global lock: {message}"),
        ),
        Some(code) => ErrPacket::new(
            1105,
            "HY000",
            format!("ferrata-tc refused to {what} ({}): {message}", code.as_str()),
        ),
        None if never_sent(status) => unreachable(message, what),
        // A transport failure after the request was sent: whether it was carried out is
        // unknown, so nothing is promised (decisions are retried, see `decision.rs`).
        None => ErrPacket::new(
            1105,
            "HY000",
            format!(
                "ferrata-proxy lost its connection to the transaction coordinator while asking it to {what}: {message}; retry later"
            ),
        ),
    }
}

/// ER_NO_DB_ERROR, for a statement that names no database in a session without one.
pub fn no_database() -> ErrPacket {
    ErrPacket::new(1046, "3D000", "No database selected")
}

/// A failure of the proxy's own service connection, as a client error.
pub fn service_error(e: &mysql_async::Error) -> ErrPacket {
    ErrPacket::new(
        1105,
        "HY000",
        format!(
            "ferrata-proxy's service connection to the database failed ({e}); check [service] user and password in its config"
        ),
    )
}

/// The error for a coordinator that could not be reached, so no request was sent.
pub fn unreachable(cause: &str, what: &str) -> ErrPacket {
    ErrPacket::new(
        1105,
        "HY000",
        format!(
            "ferrata-proxy cannot reach the transaction coordinator to {what}: {cause}; nothing was changed, retry later"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_round_trip() {
        for db in ["shop", "a/b", "50%", "x%2Fy"] {
            let id = resource_id("/run/mysqld/mysqld.sock", db);
            assert_eq!(database_of(&id).as_deref(), Some(db), "{id}");
        }
        assert_eq!(resource_id("db1:3306", "shop"), "db1:3306/shop");
    }
}
