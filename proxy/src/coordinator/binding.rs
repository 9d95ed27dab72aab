//! The session's binding to a global transaction: Ferrata's own statements (START, JOIN,
//! COMMIT, ROLLBACK, LEAVE and SHOW GLOBAL TRANSACTION) answered without the server, and the
//! statements no mode can protect refused while the session is bound. This is the last
//! mode a proxy registers: it sees what the transaction modes passed on.

use std::sync::Arc;

use ferrata_rpc::pb;

use super::decision::UNKNOWN_OUTCOME;
use super::refusal;
use super::statement::{self, GlobalStatement};
use super::{Global, answered_within, unreachable};
use crate::classify::{GlobalCommand, Other, StatementClass};
use crate::protocol::err::ErrPacket;
use crate::protocol::resultset;
use crate::protocol::{Capabilities, Command as Cmd};
use crate::session::backend::{self, local_rollback};
use crate::session::mode::{BoxFuture, Claim, Command, Io, Mode, ModeSession};
use crate::session::peer::Peer;
use crate::session::state::{BranchMode, SessionState};
use crate::session::{SessionError, Shared};

/// Replies start at sequence id 1: every command starts at 0.
const REPLY_SEQ: u8 = 1;

/// The binding mode, once per proxy; `global` is `None` without a coordinator, where
/// Ferrata's statements are answered with an error that says how to configure one.
pub struct Binding {
    pub global: Option<Arc<Global>>,
}

impl Mode for Binding {
    fn open(self: Arc<Self>) -> Box<dyn ModeSession> {
        Box::new(BindingSession {
            global: self.global.clone(),
            claimed: None,
            ddl: false,
        })
    }
}

enum Claimed {
    /// One of Ferrata's statements.
    Answer,
    /// A statement no mode can protect inside the session's global transaction.
    Refuse(ErrPacket),
}

struct BindingSession {
    global: Option<Arc<Global>>,
    claimed: Option<Claimed>,
    /// DDL is being forwarded: table shapes may change.
    ddl: bool,
}

impl ModeSession for BindingSession {
    fn claim(&mut self, command: &Command<'_>, state: &SessionState, _shared: &Shared) -> Claim {
        self.ddl = false;
        let multi_statements = state.capabilities.has(Capabilities::MULTI_STATEMENTS);
        self.claimed = match (command.code, command.class) {
            (Cmd::QUERY, Some(class)) => {
                if class.class == StatementClass::GlobalTransaction(GlobalCommand::SendMessage) {
                    // The outbox, registered with a coordinator, takes it before this.
                    Some(Claimed::Refuse(ErrPacket::new(
                        1235,
                        "42000",
                        "SEND MESSAGE needs a transaction coordinator: start ferrata-proxy with --tc <host:port> \
                         (or [coordinator] endpoints in its config)",
                    )))
                } else if let StatementClass::GlobalTransaction(_) = class.class {
                    Some(Claimed::Answer)
                } else {
                    self.ddl = matches!(class.class, StatementClass::Other(Other::Ddl));
                    let sql = &command.payload[1..];
                    at_bound_xid(state)
                        .or_else(|| refusal::hinted_xid(sql, class))
                        .and_then(|xid| refusal::refusal(class, multi_statements, &xid))
                        .map(Claimed::Refuse)
                }
            }
            (Cmd::STMT_BULK_EXECUTE, _) if command.payload.len() >= 5 => {
                let hinted = state
                    .statement(command.payload)
                    .and_then(|s| refusal::hinted_xid(s.sql.as_bytes(), &s.class));
                at_bound_xid(state)
                    .or(hinted)
                    .map(|xid| Claimed::Refuse(refusal::bulk_execute(&xid)))
            }
            (Cmd::STMT_EXECUTE, _) if command.payload.len() >= 5 => state
                .statement(command.payload)
                .and_then(|s| {
                    let xid = at_bound_xid(state).or_else(|| refusal::hinted_xid(s.sql.as_bytes(), &s.class))?;
                    refusal::refusal(&s.class, multi_statements, &xid)
                })
                .map(Claimed::Refuse),
            _ => None,
        };
        Claim::take_if(self.claimed.is_some())
    }

    fn run<'a>(&'a mut self, io: Io<'a>) -> BoxFuture<'a, Result<(), SessionError>> {
        Box::pin(async move {
            match self.claimed.take() {
                Some(Claimed::Answer) => {
                    let sql = String::from_utf8_lossy(&io.raw[5..]);
                    answer(io.client, io.backend, io.state, io.shared, self.global.as_deref(), &sql).await
                }
                Some(Claimed::Refuse(e)) => backend::refuse(io.client, e).await,
                None => unreachable!("run follows a claim"),
            }
        })
    }

    fn answered(&mut self, _state: &SessionState, _error: Option<u16>) {
        if let (true, Some(g)) = (std::mem::take(&mut self.ddl), &self.global) {
            // Table shapes may have changed; the next image reads them again.
            g.metadata.invalidate(None, None);
        }
    }
}

/// The XID of a session bound in AT mode: what the AT refusals are about (an XA-bound
/// session's statements are the XA mode's to refuse).
fn at_bound_xid(state: &SessionState) -> Option<String> {
    state.bound_in(BranchMode::At).then(|| state.xid.clone()).flatten()
}

pub(crate) fn rmfail(message: String) -> ErrPacket {
    ErrPacket::new(1399, "XAE07", format!("XAER_RMFAIL: {message}"))
}

/// The refusal for LEAVE GLOBAL TRANSACTION while the open local transaction has protected
/// writes: after leaving, a statement that commits implicitly (DDL) would commit them
/// unregistered.
pub fn leave_with_pending_writes() -> ErrPacket {
    rmfail(
        "the open local transaction has protected writes: COMMIT or ROLLBACK it before leaving the global transaction"
            .into(),
    )
}

/// Answers one of Ferrata's statements. The command packet was consumed; nothing reaches the
/// server except a local ROLLBACK that ROLLBACK GLOBAL runs first.
pub(crate) async fn answer(
    client: &mut Peer,
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    global: Option<&Global>,
    sql: &str,
) -> Result<(), SessionError> {
    let reply = match (global, statement::parse(sql)) {
        (_, Err(e)) => Err(ErrPacket::new(
            1064,
            "42000",
            format!("You have an error in your SQL syntax: {e}"),
        )),
        (None, Ok(_)) => Err(ErrPacket::new(
            1235,
            "42000",
            "global transactions need a transaction coordinator: start ferrata-proxy with --tc <host:port> (or [coordinator] endpoints in its config)",
        )),
        (Some(global), Ok(statement)) => run(global, backend, state, shared, statement).await?,
    };
    let bytes = match reply {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::debug!(error = %e, "global-transaction statement refused");
            e.to_packet(REPLY_SEQ)
        }
    };
    client.write_all(&bytes).await.map_err(|_| SessionError::ClientClosed)
}

async fn run(
    global: &Global,
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    statement: GlobalStatement,
) -> Result<Result<Vec<u8>, ErrPacket>, SessionError> {
    let ok = |state: &SessionState| resultset::ok(state.status);
    let local_open = state.in_transaction();
    Ok(match statement {
        GlobalStatement::Start { timeout_ms, name, mode } => {
            if let Some(e) = bind_refusal(state, local_open) {
                return Ok(Err(e));
            }
            match begin(global, timeout_ms.unwrap_or(0), name.unwrap_or_default()).await {
                Ok(xid) => {
                    tracing::info!(xid, ?mode, "global transaction started");
                    serve_schema(global, state);
                    let rows = vec![vec![Some(xid.clone())]];
                    state.xid = Some(xid);
                    state.branch_mode = mode;
                    Ok(resultset::text(&["xid"], &rows, state.capabilities, state.status))
                }
                Err(e) => Err(e),
            }
        }
        GlobalStatement::Join { xid, mode } => {
            if let Some(e) = bind_refusal(state, local_open) {
                return Ok(Err(e));
            }
            match status(global, &xid).await {
                Ok(outcome) if outcome.status == pb::GlobalStatus::Begin as i32 => {
                    tracing::info!(xid, ?mode, "joined global transaction");
                    serve_schema(global, state);
                    state.xid = Some(xid);
                    state.branch_mode = mode;
                    Ok(ok(state))
                }
                Ok(outcome) => Err(rmfail(format!(
                    "global transaction {xid} is {}; only a transaction in Begin can be joined",
                    ferrata_rpc::global_status_name(outcome.status)
                ))),
                Err(e) => Err(e),
            }
        }
        GlobalStatement::Commit { xid } => match target(state, xid) {
            Err(e) => Err(e),
            Ok(_) if local_open => Err(rmfail(
                "COMMIT GLOBAL with a local transaction open: COMMIT (or ROLLBACK) it first, so that its work is part of the decision".into(),
            )),
            Ok(xid) => {
                let result = decide(global, &xid, true).await;
                decided(state, &xid, true, &result);
                result.map(|()| ok(state))
            }
        },
        GlobalStatement::Rollback { xid } => match target(state, xid) {
            Err(e) => Err(e),
            Ok(xid) => {
                if local_open && state.xid.as_deref() == Some(xid.as_str()) {
                    local_rollback(backend, state, shared.config.max_packet_size).await?;
                }
                let result = decide(global, &xid, false).await;
                decided(state, &xid, false, &result);
                result.map(|()| ok(state))
            }
        },
        GlobalStatement::Leave => {
            if let Some(xid) = state.xid.take() {
                tracing::info!(xid, "left global transaction");
            }
            Ok(ok(state))
        }
        GlobalStatement::Show => {
            let row = match &state.xid {
                None => vec![None, None],
                Some(xid) => match status(global, xid).await {
                    Ok(o) => vec![Some(xid.clone()), Some(ferrata_rpc::global_status_name(o.status))],
                    Err(e) => return Ok(Err(e)),
                },
            };
            Ok(resultset::text(&["xid", "status"], &[row], state.capabilities, state.status))
        }
    })
}

/// Tells the coordinator this proxy runs phase 2 for the session's database.
fn serve_schema(global: &Global, state: &SessionState) {
    if let Some(db) = &state.schema {
        global.link.serve(&global.resource(db));
    }
}

/// Why the session may not bind to a global transaction now, if it may not.
fn bind_refusal(state: &SessionState, local_open: bool) -> Option<ErrPacket> {
    if let Some(xid) = &state.xid {
        return Some(rmfail(format!(
            "this session is already in global transaction {xid}; COMMIT GLOBAL, ROLLBACK GLOBAL or LEAVE GLOBAL TRANSACTION first"
        )));
    }
    local_open.then(|| {
        rmfail("a local transaction is open; COMMIT or ROLLBACK it before starting or joining a global transaction, so none of its work escapes it".into())
    })
}

/// Unbinds the session from `xid` once COMMIT GLOBAL succeeded, or ROLLBACK GLOBAL was
/// answered: a rollback the coordinator did not answer leaves it bound, so SHOW GLOBAL
/// TRANSACTION can tell the outcome later.
pub(crate) fn decided(state: &mut SessionState, xid: &str, commit: bool, result: &Result<(), ErrPacket>) {
    let unanswered = matches!(result, Err(e) if e.code == 1105 || e.code == UNKNOWN_OUTCOME);
    let unbind = if commit { result.is_ok() } else { !unanswered };
    if unbind && state.xid.as_deref() == Some(xid) {
        state.xid = None;
    }
}

/// The XID a COMMIT/ROLLBACK GLOBAL is about: the one named, else the bound one.
pub(crate) fn target(state: &SessionState, named: Option<String>) -> Result<String, ErrPacket> {
    named.or_else(|| state.xid.clone()).ok_or_else(|| {
        ErrPacket::new(
            1397,
            "XAE04",
            "XAER_NOTA: this session is in no global transaction; name the XID: COMMIT GLOBAL '<xid>'",
        )
    })
}

/// A client for a call about `xid` (`None`: a begin).
async fn client(global: &Global, xid: Option<&str>, what: &str) -> Result<ferrata_rpc::client::TcClient, ErrPacket> {
    global.link.client(xid).await.map_err(|e| unreachable(&e.0, what))
}

async fn begin(global: &Global, timeout_ms: u64, name: String) -> Result<String, ErrPacket> {
    let mut c = client(global, None, "begin a global transaction").await?;
    let begun = c.global_begin(pb::GlobalBeginRequest { timeout_ms, name });
    match answered_within(global.outcome_wait, begun).await {
        Ok(r) => Ok(r.xid),
        Err(s) => Err(global.error(s, "begin a global transaction").await),
    }
}

async fn status(global: &Global, xid: &str) -> Result<pb::GlobalOutcome, ErrPacket> {
    let mut c = client(global, Some(xid), "look up the global transaction").await?;
    let asked = c.tm.global_status(pb::XidRequest { xid: xid.to_owned() });
    match answered_within(global.outcome_wait, asked).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(global.error(s, "look up the global transaction").await),
    }
}

/// Commits or rolls back; a rollback that did not finish is an error naming the branch.
pub(crate) async fn decide(global: &Global, xid: &str, commit: bool) -> Result<(), ErrPacket> {
    let outcome = global.decide(xid, commit).await?;
    let done = [
        pb::GlobalStatus::AsyncCommitting,
        pb::GlobalStatus::Committed,
        pb::GlobalStatus::Rollbacked,
        pb::GlobalStatus::TimeoutRollbacked,
    ]
    .map(|s| s as i32);
    if done.contains(&outcome.status) {
        tracing::info!(
            xid,
            status = ferrata_rpc::global_status_name(outcome.status),
            "global transaction decided"
        );
        return Ok(());
    }
    let status = ferrata_rpc::global_status_name(outcome.status);
    let detail = match &outcome.failure {
        Some(f) => format!(
            "branch {} on {} failed: {}{}",
            f.branch_id,
            f.resource_id,
            f.reason,
            if f.detail_json.is_empty() {
                String::new()
            } else {
                format!(" ({})", f.detail_json)
            }
        ),
        None => "its branches have not finished".into(),
    };
    Err(ErrPacket::new(
        1401,
        "XAE03",
        format!(
            "XAER_RMERR: global transaction {xid} is {status}: {detail}; the coordinator keeps its data and locks (GET /v1/transactions/{xid} on its HTTP API)"
        ),
    ))
}
