//! The dirty-rollback workbench on the coordinator: an operator looks at a failed branch's
//! rows as they are now (`inspect`), then keeps their current values (`accept`) or writes
//! their before image back (`restore`). The proxy serving the branch's database does the
//! work (`INSPECT`, `ACCEPT`, `RESTORE` on the Attach stream, see the proxy's
//! `at/repair.rs`), in one local transaction with a `ferrata_audit` row; the coordinator
//! checks who may, the transaction's version, one action per transaction at a time, then
//! records the effect: the rows settled release their locks, a branch with nothing left in
//! its undo record is done, and a transaction with no branch left is rolled back. The audit
//! record (with the proxy's `action_id`, also in `ferrata_audit`) goes into the same store
//! batch.

use std::sync::Arc;

use ferrata_rpc::{ErrorCode, pb};
use serde_json::{Value, json};

use crate::audit::AuditEntry;
use crate::auth::random_hex;
use crate::coordinator::{Coordinator, SessionState};
use crate::error::TcError;
use crate::lock_key::LockKey;
use crate::model::{BranchRecord, BranchStatus, GlobalStatus};
use crate::operator::{Acting, OperatorRequest, not_acting};
use crate::store::Mutation;
use crate::timeline::EventKind;

/// What an operator does to a dirty branch's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairAction {
    /// Keep the current values; drop the rows from the undo record.
    Accept,
    /// Write the before image over the current values; drop the rows from the undo record.
    Restore,
}

impl RepairAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairAction::Accept => "dirty.accept",
            RepairAction::Restore => "dirty.restore",
        }
    }

    fn to_pb(self) -> pb::Phase2Action {
        match self {
            RepairAction::Accept => pb::Phase2Action::Accept,
            RepairAction::Restore => pb::Phase2Action::Restore,
        }
    }
}

/// Which rows, as the operator saw them.
#[derive(Clone, Debug, Default)]
pub struct RowsSeen {
    /// (row id, digest) from an inspection; empty with `all`.
    pub rows: Vec<(String, String)>,
    pub all: bool,
    /// With `all`: the inspection's `branch_digest`.
    pub branch_digest: String,
}

/// A proxy's refusal as the coordinator's error.
fn refusal(o: &pb::BranchOutcome) -> TcError {
    let code = match o.error_code.as_str() {
        "precondition_failed" => ErrorCode::PreconditionFailed,
        "not_found" => ErrorCode::BranchNotFound,
        "invalid_argument" => ErrorCode::InvalidArgument,
        "reason_required" => ErrorCode::ReasonRequired,
        _ => ErrorCode::RepairFailed,
    };
    TcError {
        detail: serde_json::from_str(&o.result_json).ok(),
        ..TcError::new(code, o.reason.clone())
    }
}

impl Coordinator {
    /// The live branch `branch_id` of `xid`.
    fn branch_of(state: &SessionState, xid: &str, branch_id: u64) -> Result<BranchRecord, TcError> {
        state
            .branches
            .iter()
            .find(|b| b.branch_id == branch_id)
            .cloned()
            .ok_or_else(|| {
                TcError::new(
                    ErrorCode::BranchNotFound,
                    format!("global transaction {xid} has no branch {branch_id} left (finished branches leave it)"),
                )
            })
    }

    /// Sends one repair command for `b` and returns the proxy's result.
    async fn repair_call(
        &self,
        xid: &str,
        b: &BranchRecord,
        action: pb::Phase2Action,
        repair: Option<pb::Repair>,
    ) -> Result<Value, TcError> {
        let answer = self
            .rms
            .call(
                &b.resource_id,
                action,
                vec![b.to_ref(xid)],
                repair,
                self.config.phase2.call_timeout(),
            )
            .await
            .map_err(|e| TcError::new(ErrorCode::RepairFailed, format!("{e}; nothing was changed")))?;
        let o = answer
            .into_iter()
            .find(|o| o.branch_id == b.branch_id)
            .ok_or_else(|| TcError::new(ErrorCode::RepairFailed, "the proxy's answer did not cover the branch"))?;
        if !o.error_code.is_empty() {
            return Err(refusal(&o));
        }
        serde_json::from_str(&o.result_json).map_err(|_| {
            TcError::new(
                ErrorCode::RepairFailed,
                format!(
                    "the proxy serving {} does not know this repair (answered {:?}); upgrade it",
                    b.resource_id, o.reason
                ),
            )
        })
    }

    /// The rows of a branch as they are now, with their images, types, states and digests.
    pub async fn inspect(&self, xid: &str, branch_id: u64) -> Result<Value, TcError> {
        self.check_running()?;
        let session = self.session_for(xid, "inspect a branch")?;
        let (b, version, status) = {
            let state = session.state.lock();
            (
                Self::branch_of(&state, xid, branch_id)?,
                state.timeline.version(),
                state.record.status,
            )
        };
        let mut out = self.repair_call(xid, &b, pb::Phase2Action::Inspect, None).await?;
        out["xid"] = json!(xid);
        out["branch_id"] = json!(branch_id);
        out["resource_id"] = json!(b.resource_id);
        out["branch_status"] = json!(b.status.as_str());
        out["status"] = json!(status.as_str());
        out["version"] = json!(version);
        Ok(out)
    }

    /// Accepts or restores rows of a failed rollback's branch (see the module docs).
    pub async fn repair(
        self: &Arc<Self>,
        xid: &str,
        branch_id: u64,
        action: RepairAction,
        seen: RowsSeen,
        dry_run: bool,
        by: OperatorRequest,
    ) -> Result<Value, TcError> {
        let caller = by.caller.clone();
        let xid = xid.to_owned();
        self.to_the_end(|this| async move {
            this.repair_now(&xid, branch_id, action, seen, dry_run, by)
                .await
                .map_err(|e| this.refused(action.as_str(), &caller, e))
        })
        .await
    }

    async fn repair_now(
        &self,
        xid: &str,
        branch_id: u64,
        action: RepairAction,
        seen: RowsSeen,
        dry_run: bool,
        by: OperatorRequest,
    ) -> Result<Value, TcError> {
        self.check_running()?;
        by.check_reason("change rows")?;
        if seen.rows.is_empty() && !seen.all {
            return Err(TcError::invalid(
                "name the rows (with the digests you saw), or all of them",
            ));
        }
        if seen.all && seen.branch_digest.is_empty() {
            return Err(TcError::invalid(
                "acting on all rows needs the branch_digest of the inspection you looked at",
            ));
        }
        let session = self.session_for(xid, "repair a branch")?;
        let (b, version, _acting) = {
            let mut state = session.state.lock();
            let status = state.record.status;
            if !matches!(
                status,
                GlobalStatus::RollbackFailed | GlobalStatus::TimeoutRollbackFailed
            ) {
                return Err(TcError::status_invalid(
                    xid,
                    status,
                    "repair rows (only a failed rollback's rows are repaired)",
                ));
            }
            by.check_version(xid, &state)?;
            not_acting(&state, xid)?;
            let b = Self::branch_of(&state, xid, branch_id)?;
            state.acting = true;
            (b, state.timeline.version(), Acting(&session))
        };
        let action_id = random_hex::<16>()?;
        let repair = pb::Repair {
            rows: seen
                .rows
                .iter()
                .map(|(row, digest)| pb::RepairRow {
                    row: row.clone(),
                    digest: digest.clone(),
                })
                .collect(),
            all: seen.all,
            dry_run,
            action_id: action_id.clone(),
            actor: by.caller.name.to_string(),
            role: by.caller.role.as_str().to_owned(),
            reason: by.reason.trim().to_owned(),
            branch_digest: seen.branch_digest.clone(),
        };
        let mut result = self.repair_call(xid, &b, action.to_pb(), Some(repair)).await?;
        if dry_run {
            result["version"] = json!(version);
            return Ok(result);
        }
        let settled: Vec<LockKey> = result["settled_locks"]
            .as_array()
            .map(|locks| {
                locks
                    .iter()
                    .map(|l| {
                        let key: Vec<Vec<u8>> = l["key"]
                            .as_array()
                            .map(|k| k.iter().map(|v| v.as_str().unwrap_or("").as_bytes().to_vec()).collect())
                            .unwrap_or_default();
                        LockKey::new(
                            &b.resource_id,
                            l["schema"].as_str().unwrap_or(""),
                            l["table"].as_str().unwrap_or(""),
                            &key,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let deleted = result["undo_record_deleted"] == true;
        let entry = AuditEntry {
            precondition: json!({
                "version": version,
                "rows": seen.rows.iter().map(|(row, digest)| json!({ "row": row, "digest": digest })).collect::<Vec<_>>(),
                "all": seen.all,
                "branch_digest": seen.branch_digest,
            }),
            target: json!({ "branch_id": branch_id, "resource_id": b.resource_id, "action_id": action_id }),
            effect: result.clone(),
            ..by.entry(action.as_str(), Some(xid))
        };
        let (release, durable, audit_id, finished) = {
            let mut guard = session.state.lock();
            let state = &mut *guard;
            let mut writes = Vec::new();
            let release: Vec<LockKey> = if deleted {
                // Nothing left to roll back in this branch: it is done.
                state.branches.retain(|x| x.branch_id != branch_id);
                if state.failure.as_ref().is_some_and(|f| f.branch_id == branch_id) {
                    state.failure = None;
                }
                writes.push(Mutation::DeleteBranch {
                    txn_id: session.txn_id,
                    branch_id,
                });
                b.lock_keys.clone()
            } else {
                if let Some(branch) = state.branches.iter_mut().find(|x| x.branch_id == branch_id) {
                    branch.lock_keys.retain(|k| !settled.contains(k));
                    writes.push(Mutation::PutBranch(branch.clone()));
                }
                settled.iter().filter(|k| b.lock_keys.contains(k)).cloned().collect()
            };
            let finished = !state.branches.iter().any(|x| x.status != BranchStatus::PhaseOneFailed);
            let (record, durable) = self.submit_audited(entry, |audit_id| {
                state.record(by.event(action.as_str(), audit_id));
                state.record(EventKind::LocksReleased {
                    branch_id: Some(branch_id),
                    rows: release.len() as u64,
                });
                if finished {
                    // Every branch is settled: the rollback is complete.
                    let status = state.record.status;
                    if let Some(retrying) = status.operator_retry() {
                        self.set_status(state, retrying);
                    }
                    let done = state.record.status.rolled_back();
                    self.set_status(state, done);
                    state.record(EventKind::Finished { status: done });
                    writes.push(Mutation::Finish(state.finished_record()));
                }
                state.with_events(writes)
            });
            if finished {
                self.finish(&session, state);
            }
            (release, durable, record.id, finished)
        };
        self.at.release_branch(session.txn_id, branch_id, &release);
        self.at.count_held(&self.metrics);
        durable.await?;
        let state = session.state.lock();
        result["audit_id"] = json!(audit_id);
        result["locks_released"] = json!(release.len());
        result["branch_done"] = json!(deleted);
        result["status"] = json!(state.record.status.as_str());
        result["version"] = json!(state.timeline.version());
        if finished {
            tracing::warn!(xid, "every branch settled by operators: rolled back");
        }
        Ok(result)
    }

    /// For a resolve that deletes the undo records left (`delete_undo`): discards them on
    /// every branch still holding one, each with a `ferrata_audit` row; returns what each
    /// proxy reported. A dry run changes nothing.
    pub(crate) async fn discard_undo(
        &self,
        xid: &str,
        branches: &[BranchRecord],
        dry_run: bool,
        by: &OperatorRequest,
        action_id: &str,
    ) -> Result<Vec<Value>, TcError> {
        let mut out = Vec::new();
        // HTTP branches keep no undo record (nor do XA ones: their proxies answer so).
        for b in branches
            .iter()
            .filter(|b| b.status != BranchStatus::PhaseOneFailed && !b.mode.is_http())
        {
            let repair = pb::Repair {
                all: true,
                dry_run,
                action_id: format!("{action_id}-{}", b.branch_id),
                actor: by.caller.name.to_string(),
                role: by.caller.role.as_str().to_owned(),
                reason: by.reason.trim().to_owned(),
                ..Default::default()
            };
            match self
                .repair_call(xid, b, pb::Phase2Action::DiscardUndo, Some(repair))
                .await
            {
                Ok(mut r) => {
                    r["branch_id"] = json!(b.branch_id);
                    out.push(r);
                }
                // Nothing left to discard there.
                Err(e) if e.code == ErrorCode::BranchNotFound => {
                    out.push(json!({ "branch_id": b.branch_id, "undo_record_deleted": false, "note": e.message }));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// For a retry's dry run: each branch still to roll back, inspected now.
    pub(crate) async fn inspect_all(&self, xid: &str, branches: &[BranchRecord]) -> Vec<Value> {
        let mut out = Vec::new();
        for b in branches
            .iter()
            .filter(|b| b.status.needs_phase_two() || b.status == BranchStatus::RollbackFailedUnretryable)
        {
            let seen = match self.repair_call(xid, b, pb::Phase2Action::Inspect, None).await {
                Ok(r) => json!({ "branch_id": b.branch_id, "dirty_rows": r["dirty_rows"], "rows": r["row_count"] }),
                Err(e) => {
                    json!({ "branch_id": b.branch_id, "error": { "code": e.code.as_str(), "message": e.message } })
                }
            };
            out.push(seen);
        }
        out
    }
}
