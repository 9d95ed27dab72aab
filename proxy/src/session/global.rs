//! The session side of global transactions: answering Ferrata's own statements (START,
//! JOIN, COMMIT, ROLLBACK, LEAVE and SHOW GLOBAL TRANSACTION) without the server, and refusing
//! statements the proxy cannot protect inside a global transaction, before they run.

use ferrata_rpc::pb;

use super::Shared;
use super::peer::Peer;
use super::state::SessionState;
use super::{SessionError, inject};
use crate::classify::{Classification, Dml, Other, StatementClass, TxControl};
use crate::global::statement::{self, GlobalStatement};
use crate::global::{self, Global};
use crate::protocol::err::ErrPacket;
use crate::protocol::resultset;

/// Replies start at sequence id 1: every command starts at 0.
const REPLY_SEQ: u8 = 1;

/// ER_NOT_SUPPORTED_YET, for what the proxy cannot protect.
pub(super) fn not_protected(what: &str, xid: &str) -> ErrPacket {
    ErrPacket::new(
        1235,
        "42000",
        format!(
            "ferrata-proxy cannot protect {what} inside global transaction {xid}, so it was not run; \
             run it outside the global transaction (LEAVE GLOBAL TRANSACTION) or rewrite it"
        ),
    )
}

fn rmfail(message: String) -> ErrPacket {
    ErrPacket::new(1399, "XAE07", format!("XAER_RMFAIL: {message}"))
}

/// The refusal for a statement of `class` in a session bound to `xid`, if it cannot run.
pub fn refusal(class: &Classification, xid: &str) -> Option<ErrPacket> {
    let what = match class.class {
        _ if class.multi_statement => "a multi-statement string",
        StatementClass::Dml(Dml::LoadData) => "LOAD DATA",
        StatementClass::Other(Other::Ddl) => "DDL",
        StatementClass::Other(Other::Procedural) => {
            "CALL, PREPARE/EXECUTE or a compound statement (the proxy cannot see what they run)"
        }
        StatementClass::Other(Other::Unknown) => "a statement it does not recognise",
        StatementClass::TransactionControl(TxControl::Xa) => "XA statements",
        StatementClass::TransactionControl(TxControl::LockTables) => "LOCK TABLES",
        _ => return None,
    };
    Some(not_protected(what, xid))
}

/// The refusal for BEGIN or SET autocommit while a local transaction with protected writes
/// is open: both would commit it behind the proxy's back.
pub fn implicit_commit(xid: &str) -> ErrPacket {
    not_protected(
        "a statement that commits the open local transaction implicitly (BEGIN, SET autocommit); send COMMIT first",
        xid,
    )
}

/// The refusal for an execute with more COM_STMT_SEND_LONG_DATA than the proxy keeps.
pub fn long_data(xid: &str) -> ErrPacket {
    not_protected(
        "a prepared statement with more long data (COM_STMT_SEND_LONG_DATA) than max_packet_size",
        xid,
    )
}

/// The refusal for an execute whose parameters the proxy cannot read.
pub fn unreadable_params(xid: &str) -> ErrPacket {
    not_protected(
        "this execute: its parameters could not be read (types never sent, or a malformed packet)",
        xid,
    )
}

/// The XID a statement's `/*+ XID('...') */` hint names, if any.
pub fn hinted_xid(sql: &[u8], class: &Classification) -> Option<String> {
    class
        .xid_hint
        .clone()
        .map(|r| String::from_utf8_lossy(&sql[r]).into_owned())
}

/// Answers one of Ferrata's statements. The command packet was consumed; nothing reaches the
/// server except a local ROLLBACK that ROLLBACK GLOBAL runs first.
pub async fn answer(
    client: &mut Peer,
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    sql: &str,
) -> Result<(), SessionError> {
    let reply = match (&shared.global, statement::parse(sql)) {
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
        GlobalStatement::Start { timeout_ms, name } => {
            if let Some(e) = bind_refusal(state, local_open) {
                return Ok(Err(e));
            }
            match begin(global, timeout_ms.unwrap_or(0), name.unwrap_or_default()).await {
                Ok(xid) => {
                    tracing::info!(xid, "global transaction started");
                    serve_schema(global, state);
                    let rows = vec![vec![Some(xid.clone())]];
                    state.xid = Some(xid);
                    Ok(resultset::text(&["xid"], &rows, state.capabilities, state.status))
                }
                Err(e) => Err(e),
            }
        }
        GlobalStatement::Join { xid } => {
            if let Some(e) = bind_refusal(state, local_open) {
                return Ok(Err(e));
            }
            match status(global, &xid).await {
                Ok(outcome) if outcome.status == pb::GlobalStatus::Begin as i32 => {
                    tracing::info!(xid, "joined global transaction");
                    serve_schema(global, state);
                    state.xid = Some(xid);
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
                if result.is_ok() && state.xid.as_deref() == Some(xid.as_str()) {
                    state.xid = None;
                }
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
                if state.xid.as_deref() == Some(xid.as_str()) && !matches!(&result, Err(e) if e.code == 1105) {
                    state.xid = None;
                }
                result.map(|()| ok(state))
            }
        },
        GlobalStatement::Leave if state.branch.is_some() => Err(rmfail(
            "the open local transaction has protected writes: COMMIT or ROLLBACK it before leaving the global transaction".into(),
        )),
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

/// The XID a COMMIT/ROLLBACK GLOBAL is about: the one named, else the bound one.
fn target(state: &SessionState, named: Option<String>) -> Result<String, ErrPacket> {
    named.or_else(|| state.xid.clone()).ok_or_else(|| {
        ErrPacket::new(
            1397,
            "XAE04",
            "XAER_NOTA: this session is in no global transaction; name the XID: COMMIT GLOBAL '<xid>'",
        )
    })
}

async fn client(global: &Global, what: &str) -> Result<ferrata_rpc::client::TcClient, ErrPacket> {
    global.link.client().await.map_err(|e| global::unreachable(&e.0, what))
}

async fn begin(global: &Global, timeout_ms: u64, name: String) -> Result<String, ErrPacket> {
    let mut c = client(global, "begin a global transaction").await?;
    match c.tm.global_begin(pb::GlobalBeginRequest { timeout_ms, name }).await {
        Ok(r) => Ok(r.into_inner().xid),
        Err(s) => Err(global.error(s, "begin a global transaction").await),
    }
}

async fn status(global: &Global, xid: &str) -> Result<pb::GlobalOutcome, ErrPacket> {
    let mut c = client(global, "look up the global transaction").await?;
    match c.tm.global_status(pb::XidRequest { xid: xid.to_owned() }).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(global.error(s, "look up the global transaction").await),
    }
}

/// Commits or rolls back; a rollback that did not finish is an error naming the branch.
async fn decide(global: &Global, xid: &str, commit: bool) -> Result<(), ErrPacket> {
    let what = if commit {
        "commit the global transaction"
    } else {
        "roll back the global transaction"
    };
    let mut c = client(global, what).await?;
    let request = pb::XidRequest { xid: xid.to_owned() };
    let answer = if commit {
        c.tm.global_commit(request).await
    } else {
        c.tm.global_rollback(request).await
    };
    let outcome = match answer {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(global.error(s, what).await),
    };
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

/// Rolls back the session's local transaction on its backend connection, as if the client
/// had sent ROLLBACK, without telling the client.
pub async fn local_rollback(backend: &mut Peer, state: &mut SessionState, limit: usize) -> Result<(), SessionError> {
    let outcome = inject::query(backend, state, "ROLLBACK", limit).await?;
    if let Some((code, message)) = outcome.error {
        tracing::warn!(code, message, "the local ROLLBACK failed");
    }
    state.branch = None;
    Ok(())
}
