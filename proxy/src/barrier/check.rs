//! The settling of prepared messages the coordinator found past their timeout
//! (`CHECK_PREPARED`), or of an outbox's messages in a global transaction at its commit
//! (`CHECK_BARRIER`): their local transaction inserted the barrier row of the messages (gid their XID, `msg`, branch_id
//! `00` or the hand-over's barrier, `msg`, `01`) with reason `msg` if it got as far as its
//! commit. The check inserts the same row with reason `rollback` unless it is there,
//! on a service connection: the insert waits for a local transaction that holds the row,
//! and a local transaction that comes later fails on the row the check left. The reason then
//! says which: `msg`, the local work committed (the messages go out); `rollback`, it did not
//! and now never will (they are dropped).

use ferrata_rpc::pb;
use mysql_async::prelude::*;

use crate::coordinator::Global;
use crate::coordinator::barrier_table::{BARRIER_ID, BarrierTable};
use crate::coordinator::undo_table::NO_SUCH_TABLE;

/// Checks the barrier row of branch `b`'s transaction on its resource whose branch_id is
/// `branch` (`00` for CHECK_PREPARED; the hand-over's barrier, the branch's application
/// data, for CHECK_BARRIER).
pub async fn check_prepared(
    global: &Global,
    barrier: &BarrierTable,
    b: &pb::BranchRef,
    branch: &str,
) -> pb::BranchOutcome {
    match reason(global, barrier, b, branch).await {
        Ok(r) if r == "rollback" => pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::PhaseTwoRollbacked, ""),
        Ok(_) => pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::PhaseTwoCommitted, ""),
        Err(e) => pb::BranchOutcome::of(
            b.branch_id,
            pb::BranchStatus::Unknown,
            format!("checking the barrier row of {} on {}: {e}", b.xid, b.resource_id),
        ),
    }
}

/// The row's reason, once the check's insert found it or wrote it.
async fn reason(
    global: &Global,
    barrier: &BarrierTable,
    b: &pb::BranchRef,
    branch: &str,
) -> Result<String, mysql_async::Error> {
    let mut conn = global.service_conn(&b.resource_id).await?;
    let insert = barrier.message_row(true, "?", "?", "rollback");
    match conn.exec_drop(&insert, (&b.xid, branch)).await {
        // No table: no local transaction ever inserted the row; the check's row keeps a late
        // one out.
        Err(mysql_async::Error::Server(e)) if e.code == NO_SUCH_TABLE => {
            for ddl in barrier.create_sql() {
                conn.query_drop(ddl).await?;
            }
            conn.exec_drop(&insert, (&b.xid, branch)).await?;
        }
        other => other?,
    }
    let reason: Option<String> = conn
        .exec_first(
            format!(
                "SELECT reason FROM {} WHERE gid = ? AND branch_id = ? AND op = 'msg' AND barrier_id = ?",
                barrier.table
            ),
            (&b.xid, branch, BARRIER_ID),
        )
        .await?;
    // Just inserted or found: a row is there.
    Ok(reason.unwrap_or_else(|| "rollback".into()))
}
