//! Barriers for TCC and saga handlers, in any language, with no SDK: a handler the
//! coordinator calls opens its local transaction with one statement,
//!
//! ```sql
//! BEGIN BRANCH '<gid>' '<branch_id>' '<op>' [TYPE '<trans_type>']
//! ```
//!
//! copying the call's query parameters, and the proxy answers one row, `outcome`: `run` (the
//! transaction is open: do the work, then COMMIT) or why the work must be skipped (the proxy
//! committed the barrier's rows already): `duplicate` (this call was done before),
//! `null_compensation` (a cancel or compensation whose try or action never ran) or `hanging`
//! (a try or action arriving after its compensation).
//!
//! It is DTM's sub-transaction barrier, in DTM's table (`[barrier] table`, created with DTM's
//! layout when missing), so DTM's SDK barriers and Ferrata's interoperate: in the handler's
//! own local transaction, `INSERT IGNORE` of the row of the operation a compensation undoes
//! (try for cancel, action for compensate and rollback), then of the call's own row. A
//! compensation that inserted its origin's row found nothing to undo (and the row now keeps a
//! late try out); a call whose own row was there already is a repeat. The unique key makes
//! concurrent calls of one branch wait for each other.
//!
//! The same table settles prepared messages left past their timeout ([`check`]).

pub mod check;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::classify::{GlobalCommand, StatementClass};
use crate::coordinator::barrier_table::{BARRIER_ID, BarrierTable};
use crate::coordinator::statement::{self, BranchStatement};
use crate::protocol::Command as Cmd;
use crate::protocol::err::ErrPacket;
use crate::protocol::resultset;
use crate::session::backend::{self, local_rollback};
use crate::session::mode::{BoxFuture, Claim, Command, Io, Mode, ModeSession};
use crate::session::peer::Peer;
use crate::session::state::SessionState;
use crate::session::{SessionError, Shared};
use crate::sql::literal;

/// The barriers, once per proxy.
pub struct Barrier {
    pub table: BarrierTable,
    /// The table is known to exist (created or found at the first use).
    ready: AtomicBool,
}

impl Barrier {
    pub fn new(config: &crate::config::Barriers) -> Barrier {
        Barrier {
            table: BarrierTable::new(config),
            ready: AtomicBool::new(false),
        }
    }
}

impl Mode for Barrier {
    fn open(self: Arc<Self>) -> Box<dyn ModeSession> {
        Box::new(BarrierSession {
            barrier: self,
            claimed: None,
        })
    }
}

struct BarrierSession {
    barrier: Arc<Barrier>,
    /// The statement's text, for `run`.
    claimed: Option<String>,
}

/// What a barrier decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Run,
    Duplicate,
    NullCompensation,
    Hanging,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Run => "run",
            Outcome::Duplicate => "duplicate",
            Outcome::NullCompensation => "null_compensation",
            Outcome::Hanging => "hanging",
        }
    }
}

/// The operation a compensation undoes (DTM's `originOp`).
fn origin_of(op: &str) -> Option<&'static str> {
    match op {
        "cancel" => Some("try"),
        "compensate" | "rollback" => Some("action"),
        _ => None,
    }
}

/// DTM's `trans_type` an operation belongs to, when the statement names none.
fn trans_type_of(op: &str) -> &'static str {
    match op {
        "try" | "confirm" | "cancel" => "tcc",
        "msg" => "msg",
        "rollback" => "workflow",
        _ => "saga",
    }
}

impl ModeSession for BarrierSession {
    fn claim(&mut self, command: &Command<'_>, _state: &SessionState, _shared: &Shared) -> Claim {
        let branch = command.code == Cmd::QUERY
            && command
                .class
                .is_some_and(|c| c.class == StatementClass::GlobalTransaction(GlobalCommand::Branch));
        // Not UTF-8: refused whole (two different values must never read as the same).
        self.claimed = branch.then(|| String::from_utf8(command.payload[1..].to_vec()).unwrap_or_default());
        Claim::take_if(branch)
    }

    fn run<'a>(&'a mut self, io: Io<'a>) -> BoxFuture<'a, Result<(), SessionError>> {
        Box::pin(async move {
            let sql = self.claimed.take().unwrap_or_default();
            let limit = io.shared.config.max_packet_size;
            let reply = match begin(&self.barrier, io.backend, io.state, limit, &sql).await? {
                Ok(outcome) => {
                    tracing::debug!(outcome = outcome.as_str(), "barrier");
                    resultset::text(
                        &["outcome"],
                        &[vec![Some(outcome.as_str().to_owned())]],
                        io.state.capabilities,
                        io.state.status,
                    )
                }
                Err(e) => {
                    tracing::info!(error = %e, "BEGIN BRANCH refused");
                    e.to_packet(1)
                }
            };
            io.client
                .write_all(&reply)
                .await
                .map_err(|_| SessionError::ClientClosed)
        })
    }
}

fn refused(message: impl Into<String>) -> ErrPacket {
    ErrPacket::new(1235, "42000", message.into())
}

/// Runs `BEGIN BRANCH`: `Ok(Run)` leaves the local transaction open with the barrier's rows
/// in it; the other outcomes are committed.
async fn begin(
    barrier: &Barrier,
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
    sql: &str,
) -> Result<Result<Outcome, ErrPacket>, SessionError> {
    let b = match statement::parse_branch(sql, state.no_backslash_escapes()) {
        Ok(b) => b,
        Err(e) => {
            return Ok(Err(ErrPacket::new(
                1064,
                "42000",
                format!("You have an error in your SQL syntax: {e}"),
            )));
        }
    };
    if let Some(e) = invalid(&b) {
        return Ok(Err(e));
    }
    if let Some(xid) = &state.xid {
        return Ok(Err(refused(format!(
            "BEGIN BRANCH opens a handler's own local transaction, but this session is bound to global transaction {xid}: \
             LEAVE GLOBAL TRANSACTION first (or use another connection)"
        ))));
    }
    if state.in_transaction() {
        return Ok(Err(ErrPacket::new(
            1399,
            "XAE07",
            "XAER_RMFAIL: a local transaction is open; BEGIN BRANCH starts the handler's transaction: COMMIT or ROLLBACK first",
        )));
    }
    if !barrier.ready.load(Ordering::Acquire) {
        if let Err(e) = ensure_table(barrier, backend, state, limit).await? {
            return Ok(Err(e));
        }
        barrier.ready.store(true, Ordering::Release);
    }
    if let Some(e) = backend::query(backend, state, "START TRANSACTION", limit).await?.error {
        return Ok(Err(e));
    }
    match decide(barrier, backend, state, limit, &b).await? {
        Ok(Outcome::Run) => Ok(Ok(Outcome::Run)),
        Ok(skip) => {
            // The rows must stay: a null compensation's keeps the late try out.
            match backend::query(backend, state, "COMMIT", limit).await?.error {
                None => Ok(Ok(skip)),
                Some(e) => Ok(Err(e)),
            }
        }
        Err(e) => {
            local_rollback(backend, state, limit).await?;
            Ok(Err(e))
        }
    }
}

/// Finds the barrier table, or creates it with DTM's layout (the handler's user then needs
/// CREATE; one with only INSERT and SELECT on a table a DBA created never needs it).
async fn ensure_table(
    barrier: &Barrier,
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
) -> Result<Result<(), ErrPacket>, SessionError> {
    let found = backend::query(
        backend,
        state,
        &format!(
            "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = {} AND TABLE_NAME = {}",
            literal(&barrier.table.database),
            literal(&barrier.table.name)
        ),
        limit,
    )
    .await?;
    if let Some(e) = found.error {
        return Ok(Err(e));
    }
    if !found.rows.is_empty() {
        return Ok(Ok(()));
    }
    let ddl = barrier.table.create_sql();
    for statement in &ddl {
        if let Some(e) = backend::query(backend, state, statement, limit).await?.error {
            return Ok(Err(e.prefixed(&format!(
                "the barrier table {} is missing and ferrata-proxy could not create it (have a DBA run: {}; {}): ",
                barrier.table.table, ddl[0], ddl[1]
            ))));
        }
    }
    Ok(Ok(()))
}

/// The values must fit DTM's columns.
fn invalid(b: &BranchStatement) -> Option<ErrPacket> {
    let too_long = [
        ("gid", &b.gid, 128),
        ("branch_id", &b.branch_id, 128),
        ("op", &b.op, 45),
    ]
    .into_iter()
    .chain(b.trans_type.as_ref().map(|t| ("TYPE", t, 45)))
    .find(|(_, v, max)| v.is_empty() || v.chars().count() > *max);
    too_long.map(|(what, _, max)| {
        ErrPacket::new(
            1406,
            "22001",
            format!("BEGIN BRANCH: {what} must have 1 to {max} characters"),
        )
    })
}

/// The two inserts and what they say.
async fn decide(
    barrier: &Barrier,
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
    b: &BranchStatement,
) -> Result<Result<Outcome, ErrPacket>, SessionError> {
    let trans_type = b.trans_type.as_deref().unwrap_or_else(|| trans_type_of(&b.op));
    // The values are written as hexadecimal UTF-8 literals, never quoted into the text: any
    // characters, any sql_mode, and one round trip per statement.
    let text = |v: &str| format!("_utf8mb4 X'{}'", crate::sql::hex(v.as_bytes()));
    let insert = |op: &str| {
        format!(
            "INSERT IGNORE INTO {} (trans_type, gid, branch_id, op, barrier_id, reason) VALUES ({})",
            barrier.table.table,
            [trans_type, &b.gid, &b.branch_id, op, BARRIER_ID, &b.op]
                .map(text)
                .join(", ")
        )
    };
    let mut origin_inserted = false;
    if let Some(origin) = origin_of(&b.op) {
        let done = backend::query(backend, state, &insert(origin), limit).await?;
        if let Some(e) = done.error {
            return Ok(Err(e));
        }
        origin_inserted = done.affected_rows > 0;
    }
    let done = backend::query(backend, state, &insert(&b.op), limit).await?;
    if let Some(e) = done.error {
        return Ok(Err(e));
    }
    if origin_inserted {
        return Ok(Ok(Outcome::NullCompensation));
    }
    if done.affected_rows > 0 {
        return Ok(Ok(Outcome::Run));
    }
    // The call's row was there: a repeat, unless a compensation wrote it first.
    let read = backend::query(
        backend,
        state,
        &format!(
            "SELECT reason FROM {} WHERE gid = {} AND branch_id = {} AND op = {} AND barrier_id = {}",
            barrier.table.table,
            text(&b.gid),
            text(&b.branch_id),
            text(&b.op),
            text(BARRIER_ID)
        ),
        limit,
    )
    .await?;
    if let Some(e) = read.error {
        return Ok(Err(e));
    }
    let reason = read
        .rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    Ok(Ok(match reason {
        Some(r) if r != b.op && origin_of(&r).is_some() => Outcome::Hanging,
        _ => Outcome::Duplicate,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_map_as_dtm_maps_them() {
        assert_eq!(origin_of("cancel"), Some("try"));
        assert_eq!(origin_of("compensate"), Some("action"));
        assert_eq!(origin_of("confirm"), None);
        assert_eq!(trans_type_of("try"), "tcc");
        assert_eq!(trans_type_of("action"), "saga");
        let b = BranchStatement {
            gid: "g".repeat(129),
            branch_id: "01".into(),
            op: "try".into(),
            trans_type: None,
        };
        assert_eq!(invalid(&b).map(|e| e.code), Some(1406));
    }
}
