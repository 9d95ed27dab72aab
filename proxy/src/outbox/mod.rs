//! The outbox: messages an application writes with plain SQL in its own local transaction,
//! sent by the coordinator exactly when that transaction commits. No SDK, no poller, no
//! check-back URL:
//!
//! ```sql
//! INSERT INTO ferrata_outbox (target, payload, policy, msg_key, delay_s)
//!   VALUES ('https://billing/api/credit', '{"order": 42}', 'wechat', 'order-42', 0);
//! ```
//!
//! - `ferrata_outbox` lives in the session's database; the proxy creates it on first use
//!   (on a service connection: DDL in the session would commit its transaction). Its rows
//!   carry the connection that wrote them (`session`, a column default) and, once handed to
//!   the coordinator, their transaction's XID (`xid`).
//! - `SEND MESSAGE TO '<url>' PAYLOAD '<text>' [DELAY <s>] [KEY '<key>'] [POLICY '<policy>']`
//!   is written as that INSERT.
//! - An INSERT into it (any protocol, any driver) runs between a savepoint and its release;
//!   the session's rows not yet handed over are then read back and checked (target, policy,
//!   size, delay, key). A bad row undoes the statement (back to the savepoint) and the
//!   client gets ER_CONSTRAINT_FAILED (4025, 23000) saying which row and why: nothing of it
//!   is written and the local transaction goes on. An autocommit INSERT runs in a local
//!   transaction of the proxy's own and is sent at once.
//! - The COMMIT of a local transaction that wrote messages is preceded by their hand-over:
//!   the rows are read, stored by the coordinator as prepared messages of a new XID
//!   (`MessagesPrepare`, checked through this database), marked with it, and the barrier row
//!   of that XID (reason `msg`) is inserted; then the COMMIT runs, and its outcome commits
//!   or rolls back the XID at the coordinator, in the background. A proxy that dies in
//!   between leaves the XID prepared: past its timeout the coordinator has a proxy check the
//!   barrier row (`barrier/check.rs`), so the messages go out iff the COMMIT happened.
//! - While messages are pending, statements that would commit the transaction without that
//!   hand-over, or change its database (DDL, BEGIN, LOCK TABLES, SET, XA, CALL, USE,
//!   multi-statement strings), are refused; so are bulk executes, LOAD DATA and
//!   multi-statement strings into the outbox, another database's outbox, and outbox writes
//!   in the client's own XA transaction (it could not commit them). A trigger the
//!   proxy creates keeps `session`, `xid` and `delivered_at` its own.
//! - Delivered messages have their rows marked (`delivered_at`, told by the coordinator) and
//!   purged after `[outbox] keep_delivered_s`, so DBAs see recent deliveries with SELECT.
//! - Inside a global transaction the hand-over joins the messages to it instead, under a
//!   barrier row of their own (gid the global XID, branch_id a fresh random id): they go
//!   with the global decision, and its commit delivers each only if that barrier row says
//!   the local transaction committed; a rollback drops them and deletes their rows
//!   (`MARK_DROPPED`).
//! - Not yet: rows written by triggers or procedures go only with the connection's next
//!   hand-over.

use std::collections::HashSet;
use std::sync::Arc;

use ferrata_rpc::pb;
use mysql_async::prelude::*;
use parking_lot::Mutex;

use crate::classify::{Dml, GlobalCommand, Other, StatementClass, TxControl};
use crate::coordinator::Global;
use crate::coordinator::barrier_table::BarrierTable;
use crate::coordinator::statement;
use crate::protocol::Command as Cmd;
use crate::protocol::err::ErrPacket;
use crate::session::backend::{self, Row};
use crate::session::mode::{BoxFuture, Claim, Command, Io, Mode, ModeSession};
use crate::session::peer::Peer;
use crate::session::state::SessionState;
use crate::session::{SessionError, Shared};
use crate::sql::{ident, literal};

/// The outbox table's name, in the session's database.
pub const TABLE: &str = "ferrata_outbox";
/// The largest payload a message may carry.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// The longest delay before a message's first attempt (7 days).
const MAX_DELAY_S: u64 = 7 * 24 * 3600;

/// The outbox, once per proxy.
pub struct Outbox {
    pub global: Arc<Global>,
    pub barrier: BarrierTable,
    config: crate::config::Outbox,
    /// Databases whose outbox table (and the barrier table) is known to exist.
    ready: Mutex<HashSet<String>>,
}

impl Outbox {
    pub fn new(global: Arc<Global>, barrier: BarrierTable, config: crate::config::Outbox) -> Outbox {
        Outbox {
            global,
            barrier,
            config,
            ready: Mutex::new(HashSet::new()),
        }
    }

    fn create_sql() -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (\
             id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, \
             target VARCHAR(2048) NOT NULL, \
             payload MEDIUMTEXT NOT NULL, \
             policy VARCHAR(512) NOT NULL DEFAULT '', \
             msg_key VARCHAR(128) NOT NULL DEFAULT '', \
             delay_s INT UNSIGNED NOT NULL DEFAULT 0, \
             session BIGINT UNSIGNED NOT NULL DEFAULT (CONNECTION_ID()), \
             xid VARCHAR(64) NULL, \
             created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
             delivered_at DATETIME(6) NULL, \
             KEY pending (session, xid), KEY by_xid (xid)\
             ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4"
        )
    }

    /// Creates the outbox table of `database` and the barrier table, unless known to exist.
    async fn ensure_tables(&self, database: &str) -> Result<(), ErrPacket> {
        if self.ready.lock().contains(database) {
            return Ok(());
        }
        let resource = self.global.resource(database);
        let created: Result<(), mysql_async::Error> = async {
            let mut conn = self.global.service_conn(&resource).await?;
            conn.query_drop(format!("USE {}", ident(database))).await?;
            conn.query_drop(Self::create_sql()).await?;
            // Rows belong to the connection that writes them and start unsent, whatever the
            // INSERT says.
            conn.query_drop(format!(
                "CREATE TRIGGER IF NOT EXISTS ferrata_outbox_owned BEFORE INSERT ON {TABLE} FOR EACH ROW \
                 SET NEW.session = CONNECTION_ID(), NEW.xid = NULL, NEW.delivered_at = NULL"
            ))
            .await?;
            for ddl in self.barrier.create_sql() {
                conn.query_drop(ddl).await?;
            }
            Ok(())
        }
        .await;
        created.map_err(|e| {
            crate::coordinator::service_error(&e).prefixed(&format!(
                "the outbox table {database}.{TABLE} is missing and ferrata-proxy could not create it (its service user \
                 needs CREATE and TRIGGER there, or have a DBA run: {}): ",
                Self::create_sql()
            ))
        })?;
        self.ready.lock().insert(database.to_owned());
        Ok(())
    }
}

impl Mode for Outbox {
    fn open(self: Arc<Self>) -> Box<dyn ModeSession> {
        Box::new(OutboxSession {
            outbox: self,
            claimed: None,
            gate_for: Gate::Commit,
            pending: false,
            handed: None,
            regated: false,
            in_xa: false,
            xa_after: None,
        })
    }
}

/// Marks the rows of delivered messages (`MARK_DELIVERED`), or deletes those of messages
/// their global transaction's rollback dropped (`MARK_DROPPED`): each branch names its
/// transaction, its database's resource and, as its application data, the message's name,
/// which ends with the row's id.
pub async fn mark(global: &Global, branches: &[pb::BranchRef], delivered: bool) -> Vec<pb::BranchOutcome> {
    let mut out = Vec::with_capacity(branches.len());
    let sql = if delivered {
        format!("UPDATE {TABLE} SET delivered_at = NOW(6) WHERE xid = ? AND id = ?")
    } else {
        format!("DELETE FROM {TABLE} WHERE xid = ? AND id = ? AND delivered_at IS NULL")
    };
    for b in branches {
        let name = String::from_utf8_lossy(&b.application_data).into_owned();
        let id = name.rsplit('.').next().unwrap_or_default().to_owned();
        let marked: Result<(), mysql_async::Error> = async {
            let mut conn = global.service_conn(&b.resource_id).await?;
            conn.exec_drop(&sql, (&b.xid, &id)).await
        }
        .await;
        out.push(match marked {
            Ok(()) => pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::PhaseTwoCommitted, ""),
            Err(e) => pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::Unknown, e.to_string()),
        });
    }
    out
}

/// Deletes delivered rows older than `[outbox] keep_delivered_s`, in every database whose
/// outbox this proxy has used, every `purge_interval_ms`, until `stop`.
pub async fn purge(outbox: Arc<Outbox>, stop: tokio_util::sync::CancellationToken) {
    let keep = outbox.config.keep_delivered_s;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(outbox.config.purge_interval_ms));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if keep == 0 {
            continue;
        }
        let databases: Vec<String> = outbox.ready.lock().iter().cloned().collect();
        for database in databases {
            let purged: Result<(), mysql_async::Error> = async {
                let mut conn = outbox.global.service_conn(&outbox.global.resource(&database)).await?;
                conn.exec_drop(
                    format!(
                        "DELETE FROM {}.{TABLE} WHERE delivered_at < NOW(6) - INTERVAL ? SECOND",
                        ident(&database)
                    ),
                    (keep,),
                )
                .await
            }
            .await;
            if let Err(e) = purged {
                tracing::warn!(database, error = %e, "purging delivered outbox rows failed; tried again later");
            }
        }
    }
}

/// What the session's part took a command for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Claimed {
    /// An INSERT into the outbox.
    Write,
    /// `SEND MESSAGE`: its text, written as that INSERT.
    Send(String),
    /// Refused with this, before any of it runs.
    Refuse(ErrPacket),
}

/// What the session's part gated a command for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// A COMMIT: the pending messages are handed over first.
    Commit,
    /// A prepared outbox INSERT: the table is made first.
    Tables,
}

struct OutboxSession {
    outbox: Arc<Outbox>,
    claimed: Option<Claimed>,
    gate_for: Gate,
    /// The local transaction wrote messages not yet handed over.
    pending: bool,
    /// Handed over at a COMMIT gate: the XID its COMMIT's outcome decides.
    handed: Option<String>,
    /// The command now claimed is the one the gate just let through (offered again).
    regated: bool,
    /// The client's own XA transaction is open (its XA START or BEGIN answered OK), and
    /// what the command passed on would make of it once answered.
    in_xa: bool,
    xa_after: Option<bool>,
}

/// What a client's XA statement does to its XA transaction: `Some(true)` opens it, `Some(false)`
/// ends it, `None` neither (XA END, XA RECOVER).
fn xa_effect(sql: &[u8]) -> Option<bool> {
    let text = String::from_utf8_lossy(sql).to_ascii_lowercase();
    let verb = text.split_whitespace().nth(1)?;
    match verb {
        "start" | "begin" => Some(true),
        "prepare" | "commit" | "rollback" => Some(false),
        _ => None,
    }
}

/// Whether `sql` writes the outbox: `Some(the schema it names, if any)`, told by the parser
/// after a cheap look for the name.
fn outbox_write(sql: &[u8]) -> Option<Option<String>> {
    if !sql
        .windows(TABLE.len())
        .any(|w| w.eq_ignore_ascii_case(TABLE.as_bytes()))
    {
        return None;
    }
    let sql = std::str::from_utf8(sql).ok()?;
    crate::sql::dml::written_tables(sql)
        .ok()?
        .into_iter()
        .find(|t| t.name.eq_ignore_ascii_case(TABLE))
        .map(|t| t.schema)
}

/// Whether a statement of `class` may run while messages are pending: it cannot commit the
/// local transaction (nor change the database the hand-over reads) behind its back.
fn keeps_transaction(class: StatementClass) -> bool {
    matches!(
        class,
        StatementClass::Dml(Dml::Insert | Dml::Replace | Dml::Update | Dml::Delete)
            | StatementClass::LockingRead
            | StatementClass::Other(Other::Select | Other::Show | Other::Empty)
            | StatementClass::TransactionControl(
                TxControl::Commit
                    | TxControl::Rollback
                    | TxControl::Savepoint
                    | TxControl::RollbackToSavepoint
                    | TxControl::ReleaseSavepoint
            )
    )
}

fn refusal(message: String) -> Claimed {
    Claimed::Refuse(ErrPacket::new(1235, "42000", message))
}

/// The refusal of what would commit pending messages without their hand-over.
fn pending_refusal() -> Claimed {
    refusal(format!(
        "this local transaction wrote messages to {TABLE}: COMMIT or ROLLBACK first (the COMMIT hands them over)"
    ))
}

impl OutboxSession {
    /// Decides what to do with a command; `None`: not the outbox's business.
    fn decide(&mut self, command: &Command<'_>, state: &SessionState) -> Option<Claim> {
        let (sql, class, multi) = match command.code {
            Cmd::QUERY => {
                let c = command.class?;
                (&command.payload[1..], c.class, c.multi_statement)
            }
            Cmd::STMT_PREPARE => {
                // A prepared outbox INSERT needs the table before the server prepares it.
                let db = state.schema.as_ref()?;
                if outbox_write(&command.payload[1..]).is_some() && !self.outbox.ready.lock().contains(db) {
                    self.gate_for = Gate::Tables;
                    return Some(Claim::Gate);
                }
                return None;
            }
            Cmd::STMT_EXECUTE | Cmd::STMT_BULK_EXECUTE => {
                let s = state.statement(command.payload)?;
                let written = outbox_write(s.sql.as_bytes());
                if written.is_some() && command.code == Cmd::STMT_BULK_EXECUTE {
                    self.claimed = Some(refusal(format!(
                        "bulk executes into {TABLE} are not handed over: execute the INSERT once per row"
                    )));
                    return Some(Claim::Take);
                }
                (s.sql.as_bytes(), s.class.class, false)
            }
            Cmd::INIT_DB if self.pending => {
                self.claimed = Some(pending_refusal());
                return Some(Claim::Take);
            }
            _ => return None,
        };
        if class == StatementClass::TransactionControl(TxControl::Xa) {
            self.xa_after = xa_effect(sql);
        }
        let send = class == StatementClass::GlobalTransaction(GlobalCommand::SendMessage);
        let written = if send { Some(None) } else { outbox_write(sql) };
        self.claimed = match written {
            Some(_) if self.in_xa => Some(refusal(format!(
                "messages are not handed over from an XA transaction: write {TABLE} after XA COMMIT or XA ROLLBACK"
            ))),
            Some(_) if multi => Some(refusal(format!(
                "a statement writing {TABLE} must be sent on its own, not in a multi-statement string"
            ))),
            Some(Some(schema)) if Some(&schema) != state.schema.as_ref() => Some(refusal(format!(
                "write the {TABLE} of the session's database (USE {schema} first), not {schema}.{TABLE}"
            ))),
            Some(_) if class == StatementClass::Dml(Dml::LoadData) => Some(refusal(format!(
                "LOAD DATA into {TABLE} is not handed over: INSERT the messages"
            ))),
            Some(_) if send => Some(Claimed::Send(String::from_utf8_lossy(sql).into_owned())),
            Some(_) => Some(Claimed::Write),
            None if self.pending && (multi || !keeps_transaction(class)) => Some(pending_refusal()),
            None => None,
        };
        if self.claimed.is_some() {
            return Some(Claim::Take);
        }
        if self.pending && class == StatementClass::TransactionControl(TxControl::Commit) {
            self.gate_for = Gate::Commit;
            return Some(Claim::Gate);
        }
        None
    }
}

impl ModeSession for OutboxSession {
    fn claim(&mut self, command: &Command<'_>, state: &SessionState, _shared: &Shared) -> Claim {
        self.claimed = None;
        self.xa_after = None;
        if std::mem::take(&mut self.regated) {
            // The COMMIT the gate let through, offered again: it goes on as sent.
            return Claim::Pass;
        }
        if let Some(xid) = self.handed.take() {
            // The gated COMMIT never reached the server (another mode refused it): the
            // transaction is still open, and the check of its barrier row decides.
            tracing::debug!(xid, "an outbox COMMIT was not sent; the coordinator's check decides");
        }
        if self.pending && !state.in_transaction() {
            self.pending = false;
        }
        self.decide(command, state).unwrap_or(Claim::Pass)
    }

    fn run<'a>(&'a mut self, io: Io<'a>) -> BoxFuture<'a, Result<(), SessionError>> {
        Box::pin(async move {
            match self.claimed.take() {
                Some(Claimed::Write) => {
                    let raw = io.raw.to_vec();
                    self.write(io, &raw).await
                }
                Some(Claimed::Send(sql)) => match statement::parse_send(&sql, io.state.no_backslash_escapes()) {
                    Ok(send) => {
                        // Hexadecimal UTF-8 literals: any characters, any sql_mode, any
                        // connection character set.
                        let text = |v: &str| format!("_utf8mb4 X'{}'", crate::sql::hex(v.as_bytes()));
                        let insert = format!(
                            "INSERT INTO {TABLE} (target, payload, policy, msg_key, delay_s) VALUES ({}, {}, {}, {}, {})",
                            text(&send.target),
                            text(&send.payload),
                            text(&send.policy),
                            text(&send.key),
                            send.delay_s
                        );
                        self.write(io, &backend::query_packet(&insert)).await
                    }
                    Err(e) => {
                        let e = ErrPacket::new(1064, "42000", format!("You have an error in your SQL syntax: {e}"));
                        backend::refuse(io.client, e).await
                    }
                },
                Some(Claimed::Refuse(e)) => backend::refuse(io.client, e).await,
                None => Ok(()),
            }
        })
    }

    fn gate<'a>(
        &'a mut self,
        backend: &'a mut Peer,
        state: &'a mut SessionState,
        shared: &'a Shared,
    ) -> BoxFuture<'a, Result<Option<ErrPacket>, SessionError>> {
        Box::pin(async move {
            if self.gate_for == Gate::Tables {
                let database = state.schema.clone().unwrap_or_default();
                return Ok(self.outbox.ensure_tables(&database).await.err());
            }
            let limit = shared.config.max_packet_size;
            match hand_over(&self.outbox, backend, state, limit).await? {
                Handover::Nothing => {
                    self.pending = false;
                    Ok(None)
                }
                Handover::Handed(xid) => {
                    self.pending = false;
                    self.handed = Some(xid);
                    self.regated = true;
                    Ok(None)
                }
                Handover::Joined => {
                    self.pending = false;
                    self.regated = true;
                    Ok(None)
                }
                Handover::Refused(e) => Ok(Some(e)),
            }
        })
    }

    fn answered(&mut self, _state: &SessionState, error: Option<u16>) {
        if let Some(open) = self.xa_after.take()
            && error.is_none()
        {
            self.in_xa = open;
        }
        // The COMMIT answered: committed, the messages go (AND CHAIN opens the next
        // transaction, committed all the same); failed, the check of the barrier row decides
        // (a failed COMMIT may leave the transaction open or rolled back).
        if let Some(xid) = self.handed.take()
            && error.is_none()
        {
            decide_later(&self.outbox.global, xid, true);
        }
    }
}

/// Asks the coordinator in the background to commit (send) or roll back (drop) the messages
/// of `xid`; if that fails (or this proxy dies first), its check of the barrier row decides.
fn decide_later(global: &Arc<Global>, xid: String, commit: bool) {
    let global = Arc::clone(global);
    tokio::spawn(async move {
        if let Err(e) = global.decide(&xid, commit).await {
            tracing::warn!(xid, error = %e, "the outbox's decision was not taken; the coordinator's check will");
        }
    });
}

/// What a COMMIT gate did with the pending messages.
enum Handover {
    /// None were left (rolled back to a savepoint).
    Nothing,
    /// Stored as prepared messages of this XID, marked and barred: the COMMIT may run.
    Handed(String),
    /// Joined to the session's global transaction, marked and barred: the COMMIT may run,
    /// and the global decision (with the barrier row) decides.
    Joined,
    /// The COMMIT is answered with this instead (the local transaction is rolled back when
    /// the error says so).
    Refused(ErrPacket),
}

/// A row of the outbox not yet handed over.
struct Pending {
    id: String,
    target: String,
    payload: String,
    policy: String,
    key: String,
    delay_s: u64,
}

/// The session's rows not yet handed over, read inside its transaction.
async fn pending_rows(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
) -> Result<Result<Vec<Pending>, ErrPacket>, SessionError> {
    let read = backend::query(
        backend,
        state,
        &format!(
            "SELECT id, target, payload, policy, msg_key, delay_s FROM {TABLE} \
             WHERE session = CONNECTION_ID() AND xid IS NULL ORDER BY id"
        ),
        limit,
    )
    .await?;
    if let Some(e) = read.error {
        return Ok(Err(e));
    }
    let text = |row: &Row, i: usize| {
        row.get(i)
            .cloned()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    };
    Ok(Ok(read
        .rows
        .iter()
        .map(|row| Pending {
            id: text(row, 0),
            target: text(row, 1),
            payload: text(row, 2),
            policy: text(row, 3),
            key: text(row, 4),
            delay_s: text(row, 5).parse().unwrap_or(0),
        })
        .collect()))
}

/// Why a row cannot be sent, if it cannot.
fn invalid(row: &Pending) -> Option<String> {
    let id = &row.id;
    let lower = row.target.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) || row.target.contains(char::is_whitespace) {
        return Some(format!(
            "{TABLE} row {id}: target {:?} is not an http:// or https:// URL",
            row.target
        ));
    }
    if let Err(why) = ferrata_rpc::policy::Policy::parse(&row.policy) {
        return Some(format!("{TABLE} row {id}: {why}"));
    }
    if row.payload.len() > MAX_PAYLOAD {
        return Some(format!(
            "{TABLE} row {id}: the payload is {} bytes; at most {MAX_PAYLOAD} are sent",
            row.payload.len()
        ));
    }
    if row.delay_s > MAX_DELAY_S {
        return Some(format!("{TABLE} row {id}: delay_s is at most {MAX_DELAY_S} (7 days)"));
    }
    if row.key.chars().any(char::is_control) {
        return Some(format!("{TABLE} row {id}: msg_key has control characters"));
    }
    None
}

/// ER_XAER_RMFAIL: the server refused the outbox's transaction or savepoint because of the
/// connection's XA transaction (in a session bound in MODE XA, its branch, prepared until
/// the global decision): said in the outbox's terms.
fn held_branch(e: ErrPacket) -> ErrPacket {
    const ER_XAER_RMFAIL: u16 = 1399;
    if e.code != ER_XAER_RMFAIL {
        return e;
    }
    ErrPacket::new(
        1235,
        "42000",
        format!(
            "this connection's XA transaction takes no outbox write now ({}): write {TABLE} inside BEGIN ... COMMIT \
             (the branch), or once the global transaction is decided",
            e.message
        ),
    )
}

fn constraint(message: String) -> ErrPacket {
    ErrPacket::new(4025, "23000", message)
}

impl OutboxSession {
    /// Runs an outbox INSERT (`statement`, a command packet) between a savepoint and its
    /// release, checking the rows it wrote.
    async fn write(&mut self, io: Io<'_>, statement: &[u8]) -> Result<(), SessionError> {
        let limit = io.shared.config.max_packet_size;
        let Some(database) = io.state.schema.clone() else {
            return backend::refuse(io.client, crate::coordinator::no_database()).await;
        };
        if let Err(e) = self.outbox.ensure_tables(&database).await {
            return backend::refuse(io.client, e).await;
        }
        // An autocommit INSERT runs in a transaction of the proxy's own; with autocommit off
        // the INSERT opens the client's transaction, as it would have.
        let own = io.state.autocommit() && !io.state.in_transaction();
        let before = io.state.status;
        let opened = if own {
            backend::begin_own(io.backend, io.state, limit).await?
        } else {
            let saved = backend::query(io.backend, io.state, "SAVEPOINT ferrata_outbox", limit).await?;
            saved.error.map_or(Ok(()), Err)
        };
        if let Err(e) = opened {
            return backend::reply(io.client, held_branch(e)).await;
        }
        let response = match backend::run_client_statement(io.backend, io.state, limit, statement, own).await? {
            Ok((response, _)) => response,
            // Refused by the server: nothing was written (an own transaction is rolled back).
            Err(response) => return send(io.client, &response).await,
        };
        // From here the transaction may hold messages, whatever comes next.
        if !own {
            self.pending = true;
        }
        let rows = match pending_rows(io.backend, io.state, limit).await? {
            Ok(rows) => rows,
            Err(e) => return self.undo(io.backend, io.state, io.client, own, limit, e).await,
        };
        if let Some(why) = rows.iter().find_map(invalid) {
            return self
                .undo(io.backend, io.state, io.client, own, limit, constraint(why))
                .await;
        }
        if !own {
            let released = backend::query(io.backend, io.state, "RELEASE SAVEPOINT ferrata_outbox", limit).await?;
            if let Some(e) = released.error {
                return backend::reply(io.client, e).await;
            }
            return send(io.client, &response).await;
        }
        // An autocommit INSERT: handed over and committed at once.
        let reply = match hand_over(&self.outbox, io.backend, io.state, limit).await? {
            Handover::Refused(e) => {
                if io.state.in_transaction() {
                    backend::local_rollback(io.backend, io.state, limit).await?;
                }
                e.to_packet(1)
            }
            Handover::Nothing => backend::commit_own(io.backend, io.state, limit, response, before).await?,
            handed @ (Handover::Handed(_) | Handover::Joined) => {
                let committed = backend::query(io.backend, io.state, "COMMIT", limit).await?;
                match committed.error {
                    // The check of the barrier row decides.
                    Some(e) => e.to_packet(1),
                    None => {
                        if let Handover::Handed(xid) = handed {
                            decide_later(&self.outbox.global, xid, true);
                        }
                        let mut response = response;
                        backend::as_autocommit(&mut response, io.state, before);
                        response
                    }
                }
            }
        };
        send(io.client, &reply).await
    }

    /// Undoes an outbox INSERT whose rows cannot be sent, and answers `e`.
    async fn undo(
        &mut self,
        backend: &mut Peer,
        state: &mut SessionState,
        client: &mut Peer,
        own: bool,
        limit: usize,
        e: ErrPacket,
    ) -> Result<(), SessionError> {
        if own {
            backend::local_rollback(backend, state, limit).await?;
        } else {
            let undone = backend::query(backend, state, "ROLLBACK TO SAVEPOINT ferrata_outbox", limit).await?;
            if let Some(why) = undone.error {
                // The rows stay pending: the COMMIT's check refuses them again.
                return backend::refuse(
                    client,
                    e.prefixed(&format!(
                        "the statement could not be undone ({}): ROLLBACK the transaction; ",
                        why.message
                    )),
                )
                .await;
            }
            backend::query(backend, state, "RELEASE SAVEPOINT ferrata_outbox", limit).await?;
        }
        backend::refuse(client, e).await
    }
}

async fn send(client: &mut Peer, bytes: &[u8]) -> Result<(), SessionError> {
    client.write_all(bytes).await.map_err(|_| SessionError::ClientClosed)
}

/// Hands the session's pending messages to the coordinator before its COMMIT: prepared
/// there under a new XID, the rows marked with it and its barrier row inserted, all in the
/// session's transaction. A failure after the coordinator stored them rolls the local
/// transaction back (a COMMIT after it would commit rows the coordinator may drop).
async fn hand_over(
    outbox: &Outbox,
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
) -> Result<Handover, SessionError> {
    let rows = match pending_rows(backend, state, limit).await? {
        Ok(rows) => rows,
        Err(e) => return Ok(Handover::Refused(e)),
    };
    if rows.is_empty() {
        return Ok(Handover::Nothing);
    }
    // Rows changed since their INSERT are checked again; nothing is handed over yet.
    if let Some(why) = rows.iter().find_map(invalid) {
        return Ok(Handover::Refused(constraint(why)));
    }
    let database = state.schema.clone().unwrap_or_default();
    // Inside a global transaction the messages join it, under a barrier of their own (its
    // XID is shared with other local transactions, and with a hand-over tried again).
    let (global_xid, barrier) = match &state.xid {
        Some(xid) => (xid.clone(), crate::coordinator::link::unique_id()),
        None => (String::new(), String::new()),
    };
    let name = |id: &str| {
        if barrier.is_empty() {
            id.to_owned()
        } else {
            format!("{barrier}.{id}")
        }
    };
    let request = pb::MessagesPrepareRequest {
        timeout_ms: outbox.config.prepared_timeout_ms,
        name: "outbox".into(),
        resource_id: outbox.global.resource(&database),
        xid: global_xid.clone(),
        barrier: barrier.clone(),
        messages: rows
            .iter()
            .map(|r| pb::Message {
                name: name(&r.id),
                target: r.target.clone(),
                data: r.payload.clone(),
                policy: r.policy.clone(),
                key: r.key.clone(),
                delay_ms: r.delay_s.saturating_mul(1000),
                ..Default::default()
            })
            .collect(),
    };
    let about = (!global_xid.is_empty()).then_some(global_xid.as_str());
    let prepared = match outbox.global.link.client(about).await {
        Err(e) => Err(crate::coordinator::unreachable(&e.0, "hand the messages over")),
        Ok(mut c) => match c.tm.messages_prepare(request).await {
            Ok(r) => Ok(r.into_inner().xid),
            Err(status) => Err(outbox.global.error(status, "hand the messages over").await),
        },
    };
    let xid = match prepared {
        // A coordinator that does not know `xid` prepared a transaction of its own: dropped
        // at once (nothing marks its rows or bars it, so its check would drop it too).
        Ok(other) if !global_xid.is_empty() && other != global_xid => {
            decide_later(&outbox.global, other, false);
            return Ok(Handover::Refused(ErrPacket::new(
                1235,
                "42000",
                format!(
                    "the coordinator does not join messages to global transactions (upgrade ferrata-tc): write {TABLE} \
                     outside the global transaction, or ROLLBACK"
                ),
            )));
        }
        Ok(xid) => xid,
        // Nothing marked: the transaction stays open, the COMMIT may be tried again (messages
        // a coordinator stored meanwhile are dropped, as no barrier row of theirs commits).
        Err(e) => return Ok(Handover::Refused(e)),
    };
    // Exactly the rows handed over (read in the transaction's snapshot) get the XID.
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let marked = backend::query(
        backend,
        state,
        &format!(
            "UPDATE {TABLE} SET xid = {} WHERE xid IS NULL AND id IN ({})",
            literal(&xid),
            ids.join(", ")
        ),
        limit,
    )
    .await?;
    let marked = match marked.error {
        None if marked.affected_rows != rows.len() as u64 => Some(ErrPacket::new(
            1105,
            "HY000",
            format!(
                "{} of its {} {TABLE} rows changed while they were handed over",
                rows.len() as u64 - marked.affected_rows.min(rows.len() as u64),
                rows.len()
            ),
        )),
        other => other,
    };
    let barred = match marked {
        Some(e) => Some(e),
        None => {
            let branch = if barrier.is_empty() { "00" } else { &barrier };
            backend::query(
                backend,
                state,
                &outbox
                    .barrier
                    .message_row(false, &literal(&xid), &literal(branch), "msg"),
                limit,
            )
            .await?
            .error
        }
    };
    if let Some(e) = barred {
        backend::local_rollback(backend, state, limit).await?;
        // Joined messages are dropped by their barrier row, which never commits.
        if barrier.is_empty() {
            decide_later(&outbox.global, xid.clone(), false);
        }
        // A transaction the proxy cannot end itself (an XA branch) is left to the client.
        let ended = match state.in_transaction() {
            false => "the local transaction was rolled back, nothing of it committed (run it again)",
            true => "ROLLBACK the local transaction: nothing of it may commit",
        };
        return Ok(Handover::Refused(
            e.prefixed(&format!("{ended}: its messages ({xid}) could not be marked: ")),
        ));
    }
    Ok(if barrier.is_empty() {
        Handover::Handed(xid)
    } else {
        Handover::Joined
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(target: &str, policy: &str) -> Pending {
        Pending {
            id: "7".into(),
            target: target.into(),
            payload: "{}".into(),
            policy: policy.into(),
            key: String::new(),
            delay_s: 0,
        }
    }

    #[test]
    fn rows_are_checked_as_the_coordinator_will_take_them() {
        assert!(invalid(&row("https://billing/api", "")).is_none());
        assert!(invalid(&row("HTTP://billing/api", "wechat")).is_none());
        assert!(invalid(&row("ftp://billing", "")).unwrap().contains("row 7"));
        assert!(
            invalid(&row("https://billing/api", "weekly"))
                .unwrap()
                .contains("weekly")
        );
        assert_eq!(
            outbox_write(b"insert into FERRATA_OUTBOX (target) values ('x')"),
            Some(None)
        );
        assert_eq!(
            outbox_write(b"insert into `db`.ferrata_outbox (target) values ('x')"),
            Some(Some("db".into()))
        );
        assert_eq!(outbox_write(b"insert into orders values ('ferrata_outbox')"), None);
        assert_eq!(outbox_write(b"insert into ferrata_outbox_archive values (1)"), None);
        assert!(!keeps_transaction(StatementClass::Other(Other::Ddl)));
        assert_eq!(xa_effect(b"XA START 'x'"), Some(true));
        assert_eq!(xa_effect(b"xa rollback 'x'"), Some(false));
        assert_eq!(xa_effect(b"XA END 'x'"), None);
        assert!(keeps_transaction(StatementClass::TransactionControl(TxControl::Commit)));
    }
}
