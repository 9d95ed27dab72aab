//! Phase 2 on the proxy: the commands the coordinator sends on the Attach stream, run on the
//! proxy's own service connection to the database of each branch's resource (an operator's
//! repairs come the same way and go to `repair.rs`).
//!
//! * Commit deletes the branches' undo records, batched per resource. Deleting is
//!   idempotent, so a command sent again after a crash is harmless.
//! * Rollback, in one local transaction: lock the branch's undo record; if there is none,
//!   insert the GlobalFinished marker (a late phase-1 commit of the branch then fails on the
//!   unique key) and report success. Otherwise, for each undo item, last first: read the
//!   current rows FOR UPDATE; equal to the after image: write the before image back; equal
//!   to the before image: nothing to do; anything else: dirty, so roll back, overwrite
//!   nothing, and report RollbackFailedUnretryable with the differing values. Then delete
//!   the record and commit.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrata_rpc::pb;
use mysql_async::prelude::*;
use tracing::Instrument;

use super::At;
use super::undo::{self, Verdict};
use super::undo_log::{self, CONTEXT};
use crate::coordinator::undo_table::{NO_SUCH_TABLE, STATUS_GLOBAL_FINISHED, STATUS_NORMAL};
use crate::sql::image::{RawRow, raw_row};

fn server_code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

/// The rows an undo item is about, as they are now (locked FOR UPDATE unless `lock` says
/// otherwise), in chunks that keep each statement under the protocol's parameter limit.
pub(super) async fn current_rows(
    tx: &mut mysql_async::Transaction<'_>,
    item: &undo::UndoItem,
    lock: undo::Lock,
) -> Result<Vec<RawRow>, mysql_async::Error> {
    let mut rows = Vec::new();
    for (sql, params) in undo::current_rows_queries(item, 1000, lock) {
        let chunk: Vec<mysql_async::Row> = tx.exec(sql, params).await?;
        rows.extend(chunk.into_iter().map(raw_row));
    }
    Ok(rows)
}

/// The Attach stream's handler for AT branches' phase-2 commands.
pub fn handler(at: Arc<At>) -> ferrata_rpc::client::CommandHandler {
    Arc::new(move |command| Box::pin(handle(Arc::clone(&at), command)))
}

/// Runs one command from the coordinator and answers for every branch in it.
async fn handle(at: Arc<At>, command: pb::BranchCommand) -> Vec<pb::BranchOutcome> {
    let mut by_resource: BTreeMap<String, Vec<pb::BranchRef>> = BTreeMap::new();
    for b in command.branches {
        by_resource.entry(b.resource_id.clone()).or_default().push(b);
    }
    let mut out = Vec::new();
    for (resource, branches) in by_resource {
        match pb::Phase2Action::try_from(command.action) {
            Ok(pb::Phase2Action::Commit) => out.extend(commit(&at, &resource, &branches).await),
            Ok(pb::Phase2Action::Rollback) => {
                for b in &branches {
                    out.push(rollback(&at, &resource, b).await);
                }
            }
            Ok(
                action @ (pb::Phase2Action::Inspect
                | pb::Phase2Action::Accept
                | pb::Phase2Action::Restore
                | pb::Phase2Action::DiscardUndo),
            ) => {
                for b in &branches {
                    out.push(super::repair::handle(&at, action, b, command.repair.clone()).await);
                }
            }
            _ => out.extend(branches.iter().map(|b| {
                pb::BranchOutcome::of(
                    b.branch_id,
                    pb::BranchStatus::Unknown,
                    format!("unknown phase-2 action {}", command.action),
                )
            })),
        }
    }
    out
}

async fn commit(at: &At, resource: &str, branches: &[pb::BranchRef]) -> Vec<pb::BranchOutcome> {
    let result: Result<(), mysql_async::Error> = async {
        let mut conn = at.global.service_conn(resource).await?;
        // The main row of each branch, and the pieces of a split record (`<xid>#<n>`): both
        // are ranges of the unique key.
        let condition =
            vec!["(xid = ? AND branch_id = ?) OR (xid LIKE ? AND branch_id = ?)"; branches.len()].join(" OR ");
        let params: Vec<mysql_async::Value> = branches
            .iter()
            .flat_map(|b| {
                [
                    b.xid.clone().into(),
                    b.branch_id.into(),
                    format!("{}#%", b.xid).into(),
                    b.branch_id.into(),
                ]
            })
            .collect();
        let sql = format!("DELETE FROM undo_log WHERE {condition}");
        match conn.exec_drop(sql, params).await {
            Err(e) if server_code(&e) == Some(NO_SUCH_TABLE) => Ok(()),
            other => other,
        }
    }
    .await;
    match result {
        Ok(()) => branches
            .iter()
            .map(|b| pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::PhaseTwoCommitted, ""))
            .collect(),
        Err(e) => {
            let reason = format!("deleting the undo records on {resource} failed: {e}");
            tracing::warn!(resource, error = %e, "phase-2 commit failed; the coordinator retries");
            branches
                .iter()
                .map(|b| pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::Unknown, reason.clone()))
                .collect()
        }
    }
}

async fn rollback(at: &At, resource: &str, branch: &pb::BranchRef) -> pb::BranchOutcome {
    let span = tracing::info_span!(
        "branch_rollback",
        xid = branch.xid,
        branch_id = branch.branch_id,
        resource
    );
    match rollback_branch(at, resource, branch).instrument(span).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "branch rollback failed; the coordinator retries");
            pb::BranchOutcome::of(
                branch.branch_id,
                pb::BranchStatus::RollbackFailedRetryable,
                format!("rollback on {resource} failed: {e}"),
            )
        }
    }
}

async fn rollback_branch(at: &At, resource: &str, b: &pb::BranchRef) -> Result<pb::BranchOutcome, String> {
    let mut conn = at.global.service_conn(resource).await.map_err(|e| e.to_string())?;
    // A marker insert can race with a phase-1 commit of the same branch; the loser retries.
    for _ in 0..3 {
        let mut tx = conn
            .start_transaction(Default::default())
            .await
            .map_err(|e| e.to_string())?;
        let found: Result<Option<i32>, mysql_async::Error> = tx
            .exec_first(
                "SELECT log_status FROM undo_log WHERE xid = ? AND branch_id = ? FOR UPDATE",
                (&b.xid, b.branch_id),
            )
            .await;
        let found = match found {
            Err(e) if server_code(&e) == Some(NO_SUCH_TABLE) => {
                drop(tx);
                at.undo_logs.create(&mut conn, resource).await?;
                continue;
            }
            other => other.map_err(|e| e.to_string())?,
        };
        match found {
            None => {
                let inserted = tx
                    .exec_drop(
                        "INSERT INTO undo_log (branch_id, xid, context, rollback_info, log_status, log_created, log_modified) \
                         VALUES (?, ?, ?, '', ?, NOW(6), NOW(6))",
                        (b.branch_id, &b.xid, CONTEXT, STATUS_GLOBAL_FINISHED),
                    )
                    .await;
                match inserted {
                    Err(e) if server_code(&e) == Some(1062) => continue,
                    other => other.map_err(|e| e.to_string())?,
                }
                tx.commit().await.map_err(|e| e.to_string())?;
                tracing::info!("no undo record: phase 1 never committed; anti-hanging marker written");
                return Ok(pb::BranchOutcome::of(
                    b.branch_id,
                    pb::BranchStatus::PhaseTwoRollbacked,
                    "",
                ));
            }
            Some(STATUS_GLOBAL_FINISHED) => {
                tx.commit().await.map_err(|e| e.to_string())?;
                return Ok(pb::BranchOutcome::of(
                    b.branch_id,
                    pb::BranchStatus::PhaseTwoRollbacked,
                    "",
                ));
            }
            Some(STATUS_NORMAL) => {
                let record = undo_log::read_record(&mut tx, &b.xid, b.branch_id).await?;
                // Last change first.
                for item in record.items.iter().rev() {
                    let current = current_rows(&mut tx, item, undo::Lock::ForUpdate)
                        .await
                        .map_err(|e| e.to_string())?;
                    match undo::dirty_check(item, &current) {
                        Verdict::Restore => {
                            for (sql, params) in undo::compensation(item) {
                                tx.exec_drop(sql, params).await.map_err(|e| e.to_string())?;
                            }
                            // The restore mode is not strict: check the rows are back exactly.
                            // Read in the same transaction with the rows locked, a mismatch
                            // would repeat on every retry: it waits for a DBA instead.
                            let again = current_rows(&mut tx, item, undo::Lock::ForUpdate)
                                .await
                                .map_err(|e| e.to_string())?;
                            if !matches!(undo::dirty_check(item, &again), Verdict::AlreadyRestored) {
                                tx.rollback().await.map_err(|e| e.to_string())?;
                                let detail = undo::restore_mismatch(item, &again);
                                tracing::error!(%detail, "restored rows did not read back as the before image; nothing was changed");
                                return Ok(pb::BranchOutcome {
                                    branch_id: b.branch_id,
                                    status: pb::BranchStatus::RollbackFailedUnretryable as i32,
                                    reason: format!(
                                        "the rows of {}.{} did not read back as the before image after restoring (a trigger, or a value \
                                         the server stores differently from how it was written); nothing was changed: a DBA must \
                                         restore them by hand, then resolve the transaction with its undo record deleted \
                                         (`ferrata txn resolve {} --delete-undo`)",
                                        item.schema, item.table, b.xid
                                    ),
                                    detail_json: detail.to_string(),
                                    ..Default::default()
                                });
                            }
                        }
                        Verdict::AlreadyRestored => {}
                        Verdict::Dirty(detail) => {
                            tx.rollback().await.map_err(|e| e.to_string())?;
                            tracing::error!(%detail, "dirty rollback: rows changed outside the global transaction; nothing overwritten");
                            return Ok(pb::BranchOutcome {
                                branch_id: b.branch_id,
                                status: pb::BranchStatus::RollbackFailedUnretryable as i32,
                                reason: format!(
                                    "rows of {}.{} were changed outside global transaction {} after it wrote them; nothing was overwritten: \
                                     a DBA decides row by row (`ferrata dirty show {}`, or the console) to keep the current values or \
                                     restore the before image, then retries the rollback",
                                    item.schema, item.table, b.xid, b.xid
                                ),
                                detail_json: detail.to_string(),
                                ..Default::default()
                            });
                        }
                    }
                }
                tx.exec_drop(
                    "DELETE FROM undo_log WHERE (xid = ? AND branch_id = ?) OR (xid LIKE ? AND branch_id = ?)",
                    (&b.xid, b.branch_id, format!("{}#%", b.xid), b.branch_id),
                )
                .await
                .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                tracing::info!(items = record.items.len(), "branch rolled back from its undo record");
                return Ok(pb::BranchOutcome::of(
                    b.branch_id,
                    pb::BranchStatus::PhaseTwoRollbacked,
                    "",
                ));
            }
            Some(other) => {
                tx.rollback().await.map_err(|e| e.to_string())?;
                return Err(format!(
                    "the undo record has log_status {other}, which this proxy does not know"
                ));
            }
        }
    }
    Err("the undo record kept changing under the rollback; will retry".into())
}
