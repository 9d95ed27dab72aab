//! One XA branch on a session's backend connection, from the proxy's side: opened
//! (registered with the coordinator first, then `XA START`), ended at the client's COMMIT
//! (`XA END` + `XA PREPARE`, reported prepared before the client's OK; a branch that wrote
//! nothing is committed in one phase and reported read-only) or ROLLBACK (`XA END` +
//! `XA ROLLBACK`), and finished in phase 2 on the same connection while the session holds it.
//!
//! A branch that wrote inserts its commit evidence into its database's `undo_log` inside the
//! branch: after a commit the row is there, after a rollback it is not. Phase 2 from another
//! connection reads it when MariaDB no longer knows the branch (XAER_NOTA), so a branch is
//! never taken as committed on a guess (`phase2.rs`).

use ferrata_rpc::pb;
use tokio::sync::mpsc;

use super::Xa;
use super::held::Request;
use super::xid::XaId;
use crate::coordinator::row_check::WriteCheck;
use crate::coordinator::undo_table::STATUS_GLOBAL_FINISHED;
use crate::coordinator::{ReportFailure, no_database};
use crate::protocol::ServerStatus;
use crate::protocol::err::ErrPacket;
use crate::session::SessionError;
use crate::session::backend::{self, Outcome};
use crate::session::peer::Peer;
use crate::session::state::SessionState;
use crate::sql::{ident, literal};

/// The `context` of a branch's commit evidence in `undo_log` (its `log_status` is the
/// anti-hanging marker's, so the marker sweep deletes it after the same retention).
pub const EVIDENCE: &str = "ferrata:xa";

/// MariaDB's XA errors that say the branch was rolled back (XA_RBROLLBACK, XA_RBTIMEOUT,
/// XA_RBDEADLOCK).
pub const ROLLED_BACK: [u16; 3] = [1402, 1613, 1614];

/// MariaDB's XAER_NOTA: "Unknown XID".
pub const XAER_NOTA: u16 = 1397;

/// Where a branch is.
#[derive(Debug)]
pub enum Phase {
    /// Between `XA START` and the client's COMMIT or ROLLBACK; `wrote` once a statement that
    /// may write ran in it; `checked`: the rows it wrote to guarded tables, checked against
    /// other global transactions' locks before it prepares.
    Active { wrote: bool, checked: WriteCheck },
    /// Prepared, held on this connection until phase 2.
    Prepared,
    /// Rolled back by phase 2 while the client still had it open: its statements are refused
    /// until the client ends it.
    Doomed(String),
}

/// The session's XA branch.
pub struct Branch {
    pub id: XaId,
    pub resource: String,
    pub phase: Phase,
    /// Phase-2 commands for it from the coordinator (`held.rs`).
    pub requests: mpsc::Receiver<Request>,
    /// The session's row-change counters (see [`row_changes`]) before the branch's first
    /// statement that did not look like a write: read then, and only then, since a branch
    /// whose statements look like writes is prepared without them. `None` until read.
    changes_before: Option<Option<u64>>,
    /// The coordinator took its PREPARED report (it is part of the transaction).
    confirmed: bool,
}

/// What branch work runs with.
pub struct Cx<'a> {
    pub backend: &'a mut Peer,
    pub state: &'a mut SessionState,
    pub xa: &'a Xa,
    pub limit: usize,
}

impl Cx<'_> {
    async fn run(&mut self, sql: &str) -> Result<Outcome, SessionError> {
        backend::query(self.backend, self.state, sql, self.limit).await
    }

    async fn xa(&mut self, verb: &str, id: &XaId, tail: &str) -> Result<Option<ErrPacket>, SessionError> {
        Ok(self.run(&format!("XA {verb} {}{tail}", id.sql())).await?.error)
    }

    /// What the client sees after its transaction ended: no transaction open (the server
    /// still says one is while a prepared branch is attached).
    fn ended(&mut self) -> ServerStatus {
        self.state.status = ServerStatus(self.state.status.0 & !ServerStatus::IN_TRANS);
        self.state.status
    }
}

/// Opens a branch of the session's global transaction in its current database into `slot`:
/// registered with the coordinator (so it knows the identifier before the database does),
/// then `XA START`. On an error nothing is open.
pub async fn open(
    cx: &mut Cx<'_>,
    slot: &mut Option<Branch>,
    xid: &str,
) -> Result<Result<(), ErrPacket>, SessionError> {
    let Some(database) = cx.state.schema.clone() else {
        return Ok(Err(no_database()));
    };
    let global = &cx.xa.global;
    let resource = global.resource(&database);
    let connection_id = cx.state.backend_connection_id;
    if let Some(other) = cx.xa.held.other_on(xid, &resource, connection_id) {
        return Ok(Err(ErrPacket::new(
            1235,
            "42000",
            format!(
                "global transaction {xid} already has an XA branch on {database} through this proxy (on backend connection \
                 {other}); MariaDB cannot share an XA branch between connections, so two would wait for each other's rows: \
                 run this work on that session, or in MODE AT"
            ),
        )));
    }
    global.link.serve(&resource);
    let branch_id = match global.register_xa(xid, &resource, connection_id).await {
        Ok(id) => id,
        Err(e) => return Ok(Err(e)),
    };
    let id = XaId::new(xid, branch_id);
    if let Some(e) = cx.xa("START", &id, "").await? {
        // A failed XA START leaves the session in autocommit: nothing may run as if it were
        // part of the branch.
        global.report_failed(xid, branch_id, &e.message).await;
        return Ok(Err(e));
    }
    tracing::debug!(xid, branch_id, "XA branch started");
    let requests = cx.xa.held.hold(xid, branch_id, &resource, connection_id);
    *slot = Some(Branch {
        id,
        resource,
        phase: Phase::Active {
            wrote: false,
            checked: WriteCheck::default(),
        },
        requests,
        changes_before: None,
        confirmed: false,
    });
    Ok(Ok(()))
}

/// Ends the branch at the client's COMMIT: prepared and reported (or, if it wrote nothing,
/// committed in one phase). `Ok(status)`: the client's OK carries it; the branch is then
/// prepared and held, or gone. `Err`: the client's error; the branch was rolled back, or (the
/// coordinator unreachable) is prepared and left to phase 2.
pub async fn prepare(
    cx: &mut Cx<'_>,
    branch: &mut Option<Branch>,
) -> Result<Result<ServerStatus, ErrPacket>, SessionError> {
    let Some(b) = branch.as_mut() else {
        return Ok(Ok(cx.state.status));
    };
    let id = b.id.clone();
    let global = &cx.xa.global;
    // A statement that looked like a write makes it prepared. Otherwise the server says
    // whether the branch changed rows (a stored function writes too); unsure: prepared.
    let wrote = match (&b.phase, b.changes_before) {
        (Phase::Active { wrote: true, .. }, _) => true,
        // Nothing ran in it.
        (_, None) => false,
        (_, Some(None)) => true,
        (_, Some(before)) => row_changes(cx).await? != before,
    };
    if !wrote {
        let failed = match cx.xa("END", &id, "").await? {
            None => cx.xa("COMMIT", &id, " ONE PHASE").await?,
            e => e,
        };
        let resource = b.resource.clone();
        finish(cx, branch);
        if let Some(e) = failed {
            global.report_failed(&id.xid, id.branch_id, &e.message).await;
            return Ok(Err(e));
        }
        if let Err(ReportFailure::Refused(e) | ReportFailure::Unanswered(e)) = global
            .report(
                &id.xid,
                id.branch_id,
                pb::BranchStatus::PhaseOneReadOnly,
                "wrote nothing",
            )
            .await
        {
            tracing::debug!(
                xid = id.xid,
                branch_id = id.branch_id,
                resource,
                error = e,
                "read-only branch not reported"
            );
        }
        return Ok(Ok(cx.ended()));
    }
    if let Err(e) = cx.xa.undo_logs.ensure(global, &b.resource).await {
        return rollback(cx, branch, &e)
            .await
            .map(|_| Err(ErrPacket::new(1105, "HY000", e)));
    }
    let database = crate::coordinator::database_of(&b.resource).unwrap_or_default();
    let evidence = format!(
        "INSERT INTO {}.undo_log (branch_id, xid, context, rollback_info, log_status, log_created, log_modified) \
         VALUES ({}, {}, {}, '', {STATUS_GLOBAL_FINISHED}, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
        ident(&database),
        id.branch_id,
        literal(&id.xid),
        literal(EVIDENCE),
    );
    let mut failed = cx.run(&evidence).await?.error;
    if failed.is_none() {
        failed = cx.xa("END", &id, "").await?;
    }
    if failed.is_none() {
        failed = cx.xa("PREPARE", &id, "").await?;
    }
    if let Some(e) = failed {
        rollback(cx, branch, &e.message).await?;
        return Ok(Err(e));
    }
    b.phase = Phase::Prepared;
    match global
        .report(&id.xid, id.branch_id, pb::BranchStatus::PhaseOnePrepared, "")
        .await
    {
        Ok(()) => {
            tracing::debug!(xid = id.xid, branch_id = id.branch_id, "XA branch prepared");
            b.confirmed = true;
            Ok(Ok(cx.ended()))
        }
        Err(ReportFailure::Refused(why)) => {
            // Decided before this branch prepared: not part of the decision.
            if let Some(e) = cx.xa("ROLLBACK", &id, "").await? {
                tracing::warn!(
                    xid = id.xid,
                    branch_id = id.branch_id,
                    error = e.message,
                    "rolling back a late branch failed; phase 2 finishes it"
                );
            } else {
                finish(cx, branch);
            }
            cx.ended();
            Ok(Err(ErrPacket::new(
                1402,
                "XA100",
                format!(
                    "XA_RBROLLBACK: Transaction branch was rolled back: {why}; nothing of this local transaction was committed"
                ),
            )))
        }
        Err(ReportFailure::Unanswered(why)) => {
            cx.ended();
            Ok(Err(ErrPacket::new(
                crate::coordinator::decision::UNKNOWN_OUTCOME,
                "08007",
                format!(
                    "the local transaction is prepared, but the transaction coordinator did not answer whether it is part of \
                     global transaction {} ({why}): it commits if it is and the global transaction commits, else it is rolled \
                     back; SHOW GLOBAL TRANSACTION tells the global outcome",
                    id.xid
                ),
            )))
        }
    }
}

/// The session's count of row changes (its `Handler_write`, `Handler_update` and
/// `Handler_delete` status counters, which count what stored functions and triggers change
/// too and which reading them does not move); `None` when they cannot be read.
async fn row_changes(cx: &mut Cx<'_>) -> Result<Option<u64>, SessionError> {
    let read = cx
        .run("SHOW SESSION STATUS WHERE Variable_name IN ('Handler_write', 'Handler_update', 'Handler_delete')")
        .await?;
    if read.error.is_some() || read.rows.len() != 3 {
        return Ok(None);
    }
    let mut sum = 0u64;
    for row in &read.rows {
        let value = row
            .get(1)
            .and_then(|v| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
        let Some(v) = value else { return Ok(None) };
        sum = sum.saturating_add(v);
    }
    Ok(Some(sum))
}

/// Before the first statement of the open branch that does not look like a write: the
/// session's row-change counters, for [`prepare`] to tell whether the branch wrote anyway.
pub async fn before_read(cx: &mut Cx<'_>, branch: &mut Option<Branch>) -> Result<(), SessionError> {
    if let Some(b) = branch.as_mut()
        && let Phase::Active { wrote: false, .. } = b.phase
        && b.changes_before.is_none()
    {
        b.changes_before = Some(row_changes(cx).await?);
    }
    Ok(())
}

impl Branch {
    /// Whether a statement that does not look like a write needs [`before_read`] first.
    pub fn reads_uncounted(&self) -> bool {
        matches!(self.phase, Phase::Active { wrote: false, .. }) && self.changes_before.is_none()
    }
}

/// The open branch ran a statement that looks like a write: it is prepared at its COMMIT.
pub fn wrote(branch: &mut Option<Branch>) {
    if let Some(Branch {
        phase: Phase::Active { wrote, .. },
        ..
    }) = branch
    {
        *wrote = true;
    }
}

/// Before its session decides to commit, a prepared branch whose report went unanswered is
/// reported again (the coordinator takes the same report twice): the decision must include
/// it. `Err`: the client's answer, and nothing was decided.
pub async fn confirm(cx: &mut Cx<'_>, branch: &mut Option<Branch>) -> Result<Result<(), ErrPacket>, SessionError> {
    let Some(b) = branch.as_mut() else { return Ok(Ok(())) };
    if b.confirmed || !matches!(b.phase, Phase::Prepared) {
        return Ok(Ok(()));
    }
    let id = b.id.clone();
    match cx
        .xa
        .global
        .report(&id.xid, id.branch_id, pb::BranchStatus::PhaseOnePrepared, "")
        .await
    {
        Ok(()) => {
            b.confirmed = true;
            Ok(Ok(()))
        }
        Err(ReportFailure::Refused(why)) => {
            if cx.xa("ROLLBACK", &id, "").await?.is_none() {
                finish(cx, branch);
            }
            Ok(Err(ErrPacket::new(
                1402,
                "XA100",
                format!(
                    "XA_RBROLLBACK: Transaction branch was rolled back: this connection's branch is not part of global \
                     transaction {} ({why}); COMMIT GLOBAL was not sent: ROLLBACK GLOBAL, then redo the work",
                    id.xid
                ),
            )))
        }
        Err(ReportFailure::Unanswered(why)) => Ok(Err(ErrPacket::new(
            1105,
            "HY000",
            format!(
                "ferrata-proxy cannot confirm with the transaction coordinator that this connection's prepared branch is \
                 part of global transaction {} ({why}); COMMIT GLOBAL was not sent, nothing was decided: retry it",
                id.xid
            ),
        ))),
    }
}

/// Rolls the active branch back (`XA END` + `XA ROLLBACK`) and reports it failed in phase 1.
pub async fn rollback(
    cx: &mut Cx<'_>,
    branch: &mut Option<Branch>,
    reason: &str,
) -> Result<ServerStatus, SessionError> {
    let Some(b) = branch.as_ref() else {
        return Ok(cx.state.status);
    };
    let id = b.id.clone();
    if let Phase::Active { .. } = b.phase {
        // After a deadlock or lock wait timeout the branch is already rolled back inside;
        // XA END says so, and XA ROLLBACK ends it.
        if let Some(e) = cx.xa("END", &id, "").await?
            && !ROLLED_BACK.contains(&e.code)
        {
            tracing::debug!(xid = id.xid, error = e.message, "XA END before the rollback failed");
        }
    }
    match cx.xa("ROLLBACK", &id, "").await? {
        // On its own connection, an unknown XID is one the server already ended (a failed XA
        // PREPARE deletes it).
        Some(e) if !ROLLED_BACK.contains(&e.code) && e.code != XAER_NOTA => {
            // Not confirmed ended: nothing more may run as if it were part of it; phase 2 (or
            // the server, when this connection closes) ends it.
            tracing::warn!(
                xid = id.xid,
                branch_id = id.branch_id,
                error = e.message,
                "XA ROLLBACK failed"
            );
            if let Some(b) = branch.as_mut() {
                b.phase = Phase::Doomed(format!("its rollback failed ({})", e.message));
            }
        }
        _ => finish(cx, branch),
    }
    cx.xa.global.report_failed(&id.xid, id.branch_id, reason).await;
    Ok(cx.ended())
}

/// Phase 2 of the held branch, on its own connection.
pub async fn phase2(
    cx: &mut Cx<'_>,
    branch: &mut Option<Branch>,
    commit: bool,
) -> Result<pb::BranchOutcome, SessionError> {
    let branch_id = branch.as_ref().map_or(0, |b| b.id.branch_id);
    let outcome = |status, reason: String| pb::BranchOutcome::of(branch_id, status, reason);
    let Some(b) = branch.as_mut() else {
        return Ok(outcome(pb::BranchStatus::Unknown, "no longer held".into()));
    };
    let id = b.id.clone();
    match (&b.phase, commit) {
        (Phase::Prepared, _) => {
            let verb = if commit { "COMMIT" } else { "ROLLBACK" };
            if let Some(e) = cx.xa(verb, &id, "").await? {
                return Ok(outcome(
                    pb::BranchStatus::Unknown,
                    format!(
                        "XA {verb} on the connection that prepared the branch failed: {}",
                        e.message
                    ),
                ));
            }
            finish(cx, branch);
            let done = if commit {
                pb::BranchStatus::PhaseTwoCommitted
            } else {
                pb::BranchStatus::PhaseTwoRollbacked
            };
            Ok(outcome(done, String::new()))
        }
        (Phase::Active { .. }, false) => {
            // The client still has it open: rolled back now, its later statements refused.
            // (XA END fails on a branch a deadlock already rolled back; XA ROLLBACK ends it.)
            let _ = cx.xa("END", &id, "").await?;
            if let Some(e) = cx.xa("ROLLBACK", &id, "").await?
                && !ROLLED_BACK.contains(&e.code)
            {
                return Ok(outcome(
                    pb::BranchStatus::RollbackFailedRetryable,
                    format!("XA ROLLBACK failed: {}", e.message),
                ));
            }
            cx.xa.held.release(id.branch_id);
            b.phase = Phase::Doomed(format!("global transaction {} was rolled back", id.xid));
            Ok(outcome(pb::BranchStatus::PhaseTwoRollbacked, String::new()))
        }
        (Phase::Doomed(_), false) => Ok(outcome(pb::BranchStatus::PhaseTwoRollbacked, String::new())),
        (_, true) => Ok(outcome(
            pb::BranchStatus::Unknown,
            "the branch is not prepared; only a prepared branch commits".into(),
        )),
    }
}

/// The branch is over: no longer held.
pub fn finish(cx: &mut Cx<'_>, branch: &mut Option<Branch>) {
    if let Some(b) = branch.take() {
        cx.xa.held.release(b.id.branch_id);
    }
}
