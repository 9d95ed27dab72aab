//! Phase 2 of XA branches, as the coordinator asks for it on the Attach stream.
//!
//! * A branch a session here holds goes to that session (`held.rs`): MariaDB lets only the
//!   connection that prepared it finish it while that connection is open.
//! * Any other branch is finished from a service connection: `XA COMMIT` / `XA ROLLBACK`.
//!   XAER_NOTA (1397) is never taken as done. `XA RECOVER` tells whether the branch is still
//!   prepared: then some connection still holds it (the coordinator sends phase 2 to the
//!   proxy that registered the branch while it is attached, so this is the connection of a
//!   proxy that is gone, hung, or cut off from the coordinator), and once the connection
//!   recorded with the branch has been idle for `[service] xa_kill_idle_ms` it is ended
//!   (`KILL CONNECTION`), so that the retry finishes the branch instead of waiting out the
//!   server's `wait_timeout`. A branch MariaDB no longer knows is
//!   judged by its commit evidence (`branch.rs`): a commit with evidence is done, a commit
//!   without it is an alarm (metric, error log, a failed status for an operator), never a
//!   success; a rollback without evidence is done, one with it is an alarm.

use std::time::Duration;

use ferrata_rpc::pb;
use mysql_async::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::Xa;
use super::branch::{EVIDENCE, ROLLED_BACK, XAER_NOTA};
use super::held::Request;
use super::xid::XaId;
use crate::coordinator::database_of;
use crate::coordinator::undo_table::NO_SUCH_TABLE;
use crate::sql::ident;

/// How long a session holding a branch may take to get to its phase 2 (it runs between the
/// client's commands) before the coordinator is told to retry.
const HELD_WAIT: Duration = Duration::from_secs(5);

/// MariaDB's "Unknown thread id" (the connection to end has ended already).
const UNKNOWN_THREAD: u16 = 1094;

fn retry(b: &pb::BranchRef, commit: bool, reason: impl Into<String>) -> pb::BranchOutcome {
    // Anything but a success or an unretryable failure is retried.
    let status = if commit {
        pb::BranchStatus::Unknown
    } else {
        pb::BranchStatus::RollbackFailedRetryable
    };
    pb::BranchOutcome::of(b.branch_id, status, reason)
}

/// Commits or rolls back one XA branch.
pub async fn finish(xa: &Xa, commit: bool, b: &pb::BranchRef) -> pb::BranchOutcome {
    let result = if let Some(inbox) = xa.held.inbox(&b.xid, b.branch_id) {
        let (reply, answer) = oneshot::channel();
        match inbox.try_send(Request { commit, reply }) {
            Ok(()) => match tokio::time::timeout(HELD_WAIT, answer).await {
                Ok(Ok(o)) => o,
                _ => retry(
                    b,
                    commit,
                    "the session holding the branch did not get to it in time; retried",
                ),
            },
            // Earlier commands still wait for the busy session: this one is asked again later.
            Err(mpsc::error::TrySendError::Full(_)) => {
                retry(b, commit, "the session holding the branch is busy; retried")
            }
            // The session ended meanwhile: its connection let the branch go.
            Err(mpsc::error::TrySendError::Closed(_)) => from_service(xa, commit, b).await,
        }
    } else {
        from_service(xa, commit, b).await
    };
    let done = [
        pb::BranchStatus::PhaseTwoCommitted,
        pb::BranchStatus::PhaseTwoRollbacked,
    ]
    .map(|s| s as i32);
    let action = if commit { "commit" } else { "rollback" };
    let result_label = if done.contains(&result.status) {
        "done"
    } else {
        "not_done"
    };
    metrics::counter!("ferrata_proxy_xa_phase2_total", "action" => action, "result" => result_label).increment(1);
    result
}

async fn from_service(xa: &Xa, commit: bool, b: &pb::BranchRef) -> pb::BranchOutcome {
    match service(xa, commit, b).await {
        Ok(o) => o,
        Err(e) => retry(b, commit, format!("phase 2 from a service connection failed: {e}")),
    }
}

async fn service(xa: &Xa, commit: bool, b: &pb::BranchRef) -> Result<pb::BranchOutcome, mysql_async::Error> {
    let id = XaId::new(&b.xid, b.branch_id);
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    let mut conn = xa.global.service_conn(&b.resource_id).await?;
    let rolled_back = match conn.query_drop(format!("XA {verb} {}", id.sql())).await {
        Ok(()) => {
            let done = if commit {
                pb::BranchStatus::PhaseTwoCommitted
            } else {
                pb::BranchStatus::PhaseTwoRollbacked
            };
            return Ok(pb::BranchOutcome::of(b.branch_id, done, ""));
        }
        Err(mysql_async::Error::Server(e)) if e.code == XAER_NOTA => false,
        Err(mysql_async::Error::Server(e)) if ROLLED_BACK.contains(&e.code) => true,
        Err(e) => return Err(e),
    };
    if !rolled_back && prepared(&mut conn).await?.contains(&id) {
        return end_holder(xa, &mut conn, commit, b).await;
    }
    let committed = evidence(&mut conn, b).await?;
    Ok(match (commit, committed) {
        (true, true) => pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::PhaseTwoCommitted, "committed before"),
        (false, false) => pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::PhaseTwoRollbacked, ""),
        (true, false) => alarm(
            b,
            pb::BranchStatus::CommitFailedUnretryable,
            "MariaDB knows no prepared XA branch by this identifier and the branch left no commit evidence in undo_log: \
             it was rolled back (an XA ROLLBACK outside Ferrata, or lost with its database) while its global transaction \
             committed; its changes are not in the database",
        ),
        (false, true) => alarm(
            b,
            pb::BranchStatus::RollbackFailedUnretryable,
            "the branch's commit evidence is in undo_log: it was committed (an XA COMMIT outside Ferrata) while its global \
             transaction rolled back; its changes are in the database",
        ),
    })
}

/// The prepared branch is attached to a live connection that no session here holds: that
/// connection is ended, so the coordinator's retry finds the branch detached.
async fn end_holder(
    xa: &Xa,
    conn: &mut mysql_async::Conn,
    commit: bool,
    b: &pb::BranchRef,
) -> Result<pb::BranchOutcome, mysql_async::Error> {
    let Ok(connection_id) = u32::try_from(b.connection_id) else {
        return Ok(retry(
            b,
            commit,
            "the branch is prepared and attached to a connection it did not record",
        ));
    };
    if connection_id == 0 || xa.held.holds_connection(connection_id) {
        return Ok(retry(
            b,
            commit,
            format!("the branch is prepared and still attached to backend connection {connection_id}"),
        ));
    }
    // The coordinator sends a branch's phase 2 to the proxy process that registered it while
    // that process is attached, so this one gets it when that proxy is dead, hung (silent for
    // three heartbeats) or cut off from the coordinator, or for a branch stored without its
    // process (before store format 3). A proxy cut off only briefly still serves its sessions:
    // only a connection idle for long is taken for a hung proxy's.
    let seen: Option<(String, f64)> = conn
        .exec_first(
            "SELECT COMMAND, TIME_MS FROM information_schema.PROCESSLIST WHERE ID = ?",
            (connection_id,),
        )
        .await?;
    let idle_ms = xa.kill_idle.as_millis() as f64;
    match seen {
        Some((command, ms)) if command == "Sleep" && ms >= idle_ms => {}
        Some(_) => {
            return Ok(retry(
                b,
                commit,
                format!(
                    "the branch is prepared and attached to backend connection {connection_id}, which is not idle for \
                     {idle_ms} ms yet"
                ),
            ));
        }
        // Gone meanwhile: the retry finds the branch detached.
        None => {
            return Ok(retry(
                b,
                commit,
                format!("backend connection {connection_id} ended; retried"),
            ));
        }
    }
    match conn.query_drop(format!("KILL CONNECTION {connection_id}")).await {
        Ok(()) => tracing::warn!(
            xid = b.xid,
            branch_id = b.branch_id,
            connection_id,
            "ended the orphaned backend connection that held a prepared XA branch"
        ),
        Err(mysql_async::Error::Server(e)) if e.code == UNKNOWN_THREAD => {}
        Err(e) => return Err(e),
    }
    Ok(retry(
        b,
        commit,
        format!("backend connection {connection_id} still held the prepared branch and was ended; retried"),
    ))
}

/// Ferrata's prepared branches on the server, as `XA RECOVER` lists them.
pub async fn prepared(conn: &mut mysql_async::Conn) -> Result<Vec<XaId>, mysql_async::Error> {
    let rows: Vec<(i64, usize, usize, Vec<u8>)> = conn.query("XA RECOVER").await?;
    Ok(rows
        .into_iter()
        .filter_map(|(format_id, gtrid, bqual, data)| XaId::from_recover(format_id, gtrid, bqual, &data))
        .collect())
}

/// Whether the branch's commit evidence is in its database's `undo_log`.
async fn evidence(conn: &mut mysql_async::Conn, b: &pb::BranchRef) -> Result<bool, mysql_async::Error> {
    let database = database_of(&b.resource_id).unwrap_or_default();
    let sql = format!(
        "SELECT COUNT(*) FROM {}.undo_log WHERE xid = ? AND branch_id = ? AND context = ?",
        ident(&database)
    );
    match conn.exec_first::<i64, _, _>(sql, (&b.xid, b.branch_id, EVIDENCE)).await {
        Ok(n) => Ok(n.unwrap_or(0) > 0),
        Err(mysql_async::Error::Server(e)) if e.code == NO_SUCH_TABLE => Ok(false),
        Err(e) => Err(e),
    }
}

fn alarm(b: &pb::BranchRef, status: pb::BranchStatus, reason: &str) -> pb::BranchOutcome {
    tracing::error!(
        xid = b.xid,
        branch_id = b.branch_id,
        resource = b.resource_id,
        reason,
        "XA branch outcome contradicts its global transaction"
    );
    metrics::counter!("ferrata_proxy_xa_contradictions_total").increment(1);
    pb::BranchOutcome::of(b.branch_id, status, reason)
}
