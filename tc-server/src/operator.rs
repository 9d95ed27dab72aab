//! Operator actions: retry or resolve a failed transaction, create or revoke a token. Each
//! needs a reason, may name the transaction version the operator saw (refused with
//! `precondition_failed` if it changed since), and is recorded in the audit trail in the
//! same store batch as its change ([`Coordinator::submit_audited`]) and, for a transaction,
//! in its timeline. Who may call them is checked by the APIs (`auth.rs`).

use std::sync::Arc;

use ferrata_rpc::ErrorCode;
use serde_json::{Value, json};

use crate::audit::{AuditEntry, AuditFilter, AuditRecord, Broken, Origin};
use crate::auth::{self, Caller, Role, TokenRecord};
use crate::coordinator::{Coordinator, Outcome, Session, SessionState, pending_commit};
use crate::error::TcError;
use crate::lock_key::LockKey;
use crate::model::{BranchStatus, GlobalStatus, now_ms};
use crate::store::{Mutation, StoreError};
use crate::timeline::EventKind;

/// Who asks for an operator action, from where, why, and having seen which version.
#[derive(Clone, Debug)]
pub struct OperatorRequest {
    pub caller: Caller,
    pub origin: Origin,
    pub reason: String,
    /// The transaction's version the operator acted on, if they name it.
    pub expect_version: Option<u64>,
}

impl OperatorRequest {
    pub(crate) fn entry(&self, action: &str, xid: Option<&str>) -> AuditEntry {
        AuditEntry {
            xid: xid.map(str::to_owned),
            ..AuditEntry::new(&self.caller, &self.origin, action, self.reason.trim())
        }
    }

    /// The timeline's record of `action`, audited as `audit_id`.
    pub(crate) fn event(&self, action: &str, audit_id: u64) -> EventKind {
        EventKind::OperatorAction {
            action: action.to_owned(),
            actor: self.caller.name.to_string(),
            reason: self.reason.clone(),
            audit_id,
        }
    }

    pub(crate) fn check_reason(&self, action: &str) -> Result<(), TcError> {
        if self.reason.trim().is_empty() {
            return Err(TcError::new(
                ErrorCode::ReasonRequired,
                format!(
                    "say why you {action}: send {{\"reason\": \"...\"}} (ferrata: --reason); it goes into the audit trail"
                ),
            ));
        }
        if self.reason.len() > 4096 {
            return Err(TcError::invalid("the reason is longer than 4096 bytes"));
        }
        Ok(())
    }

    pub(crate) fn check_version(&self, xid: &str, state: &SessionState) -> Result<(), TcError> {
        let current = state.timeline.version();
        match self.expect_version {
            Some(seen) if seen != current => Err(TcError {
                status: Some(state.record.status),
                ..TcError::new(
                    ErrorCode::PreconditionFailed,
                    format!(
                        "global transaction {xid} is at version {current}, not {seen}: it changed since you looked; look again (GET /v1/transactions/{xid}/events) and act on what it is now"
                    ),
                )
            }),
            _ => Ok(()),
        }
    }
}

/// Refuses an action while another operator action on the transaction is running.
pub(crate) fn not_acting(state: &SessionState, xid: &str) -> Result<(), TcError> {
    if state.acting {
        return Err(TcError {
            status: Some(state.record.status),
            ..TcError::new(
                ErrorCode::PreconditionFailed,
                format!("another operator action on {xid} is running; look again once it is done"),
            )
        });
    }
    Ok(())
}

/// Marks a session busy with an operator action until dropped (see [`not_acting`]).
pub(crate) struct Acting<'a>(pub(crate) &'a Session);

impl Drop for Acting<'_> {
    fn drop(&mut self) {
        self.0.state.lock().acting = false;
    }
}

/// When an audited change is durable.
pub(crate) type Durable = std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

fn status_pair(from: GlobalStatus, to: GlobalStatus) -> Value {
    json!([from.as_str(), to.as_str()])
}

impl Coordinator {
    /// Seals `entry` into the audit trail and submits it with `writes(audit id)` as one store
    /// batch. The trail's lock is held across both, so records reach the store in chain order.
    pub(crate) fn submit_audited(
        &self,
        entry: AuditEntry,
        writes: impl FnOnce(u64) -> Vec<Mutation>,
    ) -> (AuditRecord, Durable) {
        let mut audit = self.audit.lock();
        let record = audit.seal(entry, now_ms());
        let mut batch = writes(record.id);
        batch.push(Mutation::AppendAudit(record.clone()));
        let durable = Box::pin(self.journal.submit(batch));
        audit.append(record.clone());
        drop(audit);
        self.metrics.operator_action(&record.action, "ok");
        tracing::info!(
            target: "ferrata::audit",
            id = record.id,
            actor = record.actor,
            role = record.role,
            action = record.action,
            xid = record.xid,
            reason = record.reason,
            client = record.origin.client,
            remote = record.origin.remote,
            // The effect (values of rows) stays in the audit trail, out of the logs.
            "operator action"
        );
        (record, durable)
    }

    /// Counts and logs a refused operator action; returns the error.
    pub fn refused(&self, action: &str, by: &Caller, e: TcError) -> TcError {
        self.metrics.operator_action(action, e.code.as_str());
        tracing::warn!(
            target: "ferrata::audit",
            actor = %by.name,
            role = by.role.as_str(),
            action,
            code = e.code.as_str(),
            message = e.message,
            "operator action refused"
        );
        e
    }

    /// After repairing the data of a failed transaction: runs its phase 2 again
    /// (RollbackFailed → RollbackRetrying, CommitFailed → AsyncCommitting).
    pub async fn retry(self: &Arc<Self>, xid: &str, by: OperatorRequest) -> Result<Outcome, TcError> {
        let xid = xid.to_owned();
        self.to_the_end(|this| async move {
            let caller = by.caller.clone();
            this.retry_now(&xid, by)
                .await
                .map_err(|e| this.refused("retry", &caller, e))
        })
        .await
    }

    async fn retry_now(self: &Arc<Self>, xid: &str, by: OperatorRequest) -> Result<Outcome, TcError> {
        self.check_running()?;
        by.check_reason("retry")?;
        let session = self.session_for(xid, "retry")?;
        let (durable, next) = {
            let mut guard = session.state.lock();
            let state = &mut *guard;
            let before = state.record.status;
            let Some(next) = before.operator_retry() else {
                return Err(TcError::status_invalid(
                    xid,
                    before,
                    "retry (only a failed transaction can be retried)",
                ));
            };
            by.check_version(xid, state)?;
            not_acting(state, xid)?;
            // Retrying is going on: a pause before it no longer holds.
            state.paused = false;
            let precondition = json!({ "version": state.timeline.version() });
            self.set_status(state, next);
            state.failure = None;
            let mut writes = vec![Mutation::PutGlobal(state.record.clone())];
            let mut retried = Vec::new();
            let mut queue = self.commit_queue.lock();
            for b in &mut state.branches {
                let again = match b.status {
                    BranchStatus::RollbackFailedUnretryable => Some(BranchStatus::RollbackFailedRetryable),
                    BranchStatus::CommitFailedUnretryable => b.mode.committable(),
                    _ => None,
                };
                if let Some(again) = again {
                    b.status = again;
                    b.error = None;
                    b.updated_ms = now_ms();
                    writes.push(Mutation::PutBranch(b.clone()));
                    retried.push(b.branch_id);
                }
                // A CommitFailed transaction has nothing else queued (it fails once nothing
                // else awaits its commit): every branch still stored as awaiting it goes,
                // those a restart found committed but stored (a commit is idempotent) too.
                if b.awaits_commit() {
                    queue.push(pending_commit(b, now_ms()));
                }
            }
            drop(queue);
            let entry = AuditEntry {
                precondition,
                effect: json!({ "status": status_pair(before, next), "branches_retried": retried }),
                ..by.entry("retry", Some(xid))
            };
            let (_, durable) = self.submit_audited(entry, |audit_id| {
                state.record(by.event("retry", audit_id));
                state.with_events(writes)
            });
            (durable, next)
        };
        durable.await?;
        if next.is_rolling_back() {
            let passes = session.passes.subscribe();
            self.start_rollback(&session);
            self.until_pass(&session, passes).await;
        } else {
            self.commit_wake.notify_one();
        }
        let state = session.state.lock();
        Ok(Self::outcome(&session, &state))
    }

    /// What a retry would meet: the transaction's status now and then, and each branch
    /// still to roll back inspected now (its dirty rows). Changes nothing.
    pub async fn retry_dry_run(&self, xid: &str, by: &OperatorRequest) -> Result<Value, TcError> {
        self.check_running()?;
        let session = self.session_for(xid, "retry")?;
        let (status, branches) = {
            let state = session.state.lock();
            let status = state.record.status;
            if status.operator_retry().is_none() {
                return Err(TcError::status_invalid(
                    xid,
                    status,
                    "retry (only a failed transaction can be retried)",
                ));
            }
            by.check_version(xid, &state)?;
            (status, state.branches.clone())
        };
        let inspected = if status == GlobalStatus::CommitFailed {
            Vec::new()
        } else {
            self.inspect_all(xid, &branches).await
        };
        let still_dirty = inspected
            .iter()
            .any(|b| b["dirty_rows"].as_u64().is_some_and(|n| n > 0));
        Ok(json!({
            "dry_run": true,
            "status": status.as_str(),
            "would_become": status.operator_retry().map(GlobalStatus::as_str),
            "branches": inspected,
            "still_dirty": still_dirty,
        }))
    }

    /// After resolving a failed transaction by hand (rows repaired): forgets it and releases
    /// its rows; with `delete_undo` the proxies first delete the undo records left (each with
    /// a `ferrata_audit` row). Its final status and timeline stay queryable, and the audit
    /// record keeps its last failure. A dry run says what would happen and changes nothing.
    pub async fn resolve(
        self: &Arc<Self>,
        xid: &str,
        by: OperatorRequest,
        delete_undo: bool,
        dry_run: bool,
    ) -> Result<Value, TcError> {
        let xid = xid.to_owned();
        // To its end: undo records deleted on the proxies and the transaction left
        // unresolved would roll back as if nothing had been written.
        self.to_the_end(|this| async move {
            let caller = by.caller.clone();
            this.resolve_now(&xid, by, delete_undo, dry_run)
                .await
                .map_err(|e| this.refused("resolve", &caller, e))
        })
        .await
    }

    async fn resolve_now(
        &self,
        xid: &str,
        by: OperatorRequest,
        delete_undo: bool,
        dry_run: bool,
    ) -> Result<Value, TcError> {
        self.check_running()?;
        by.check_reason("resolve")?;
        let session = self.session_for(xid, "resolve")?;
        let resolvable = |state: &SessionState| {
            let status = state.record.status;
            if matches!(
                status,
                GlobalStatus::RollbackFailed | GlobalStatus::TimeoutRollbackFailed | GlobalStatus::CommitFailed
            ) {
                by.check_version(xid, state)
            } else {
                Err(TcError::status_invalid(
                    xid,
                    status,
                    "resolve (only a failed transaction is resolved by hand)",
                ))
            }
        };
        let (branches, locks, _acting) = {
            let mut state = session.state.lock();
            resolvable(&state)?;
            not_acting(&state, xid)?;
            // Nobody else acts on it until it is resolved (the proxies' work comes first).
            state.acting = true;
            let locks: usize = state.branches.iter().map(|b| b.lock_keys.len()).sum();
            (state.branches.clone(), locks, Acting(&session))
        };
        let discarded = if delete_undo {
            let action_id = crate::auth::random_hex::<16>()?;
            self.discard_undo(xid, &branches, dry_run, &by, &action_id).await?
        } else {
            Vec::new()
        };
        if dry_run {
            return Ok(json!({
                "dry_run": true,
                "would_forget": true,
                "locks_released": locks,
                "undo_discarded": discarded,
            }));
        }
        let (durable, keys, outcome) = {
            let mut guard = session.state.lock();
            let state = &mut *guard;
            let status = state.record.status;
            resolvable(state)?;
            let keys: Vec<LockKey> = state
                .branches
                .iter()
                .flat_map(|b| b.lock_keys.iter().cloned())
                .collect();
            let entry = AuditEntry {
                precondition: json!({ "version": state.timeline.version() }),
                effect: json!({
                    "status": status.as_str(),
                    "forgotten": true,
                    "locks_released": keys.len(),
                    "undo_discarded": discarded,
                    "failure": state.failure.as_ref().map(|f| json!({
                        "branch_id": f.branch_id,
                        "resource_id": f.resource_id,
                        "reason": f.error.reason,
                        "detail": serde_json::from_str::<Value>(&f.error.detail_json).unwrap_or(Value::Null),
                    })),
                }),
                ..by.entry("resolve", Some(xid))
            };
            let (record, durable) = self.submit_audited(entry, |audit_id| {
                state.record(by.event("resolve", audit_id));
                state.record(EventKind::LocksReleased {
                    branch_id: None,
                    rows: keys.len() as u64,
                });
                state.record(EventKind::Finished { status });
                let write = Mutation::Finish(state.finished_record());
                state.with_events(vec![write])
            });
            self.finish(&session, state);
            let outcome = json!({
                "xid": xid,
                "status": status.as_str(),
                "forgotten": true,
                "locks_released": keys.len(),
                "undo_discarded": discarded,
                "audit_id": record.id,
            });
            (durable, keys, outcome)
        };
        let released = self.release_with(session.txn_id, &keys, durable).await;
        self.at.count_held(&self.metrics);
        released?;
        Ok(outcome)
    }

    /// Stops (`pause`) or lets go on (`!pause`) the automatic phase-2 retries of a
    /// transaction still retrying (RollbackRetrying, TimeoutRollbackRetrying or
    /// AsyncCommitting). Kept in the timeline, so a restart keeps it paused.
    pub async fn pause(self: &Arc<Self>, xid: &str, pause: bool, by: OperatorRequest) -> Result<Value, TcError> {
        let action = if pause { "pause" } else { "resume" };
        let caller = by.caller.clone();
        self.pause_now(xid, pause, by)
            .await
            .map_err(|e| self.refused(action, &caller, e))
    }

    async fn pause_now(self: &Arc<Self>, xid: &str, pause: bool, by: OperatorRequest) -> Result<Value, TcError> {
        let action = if pause { "pause" } else { "resume" };
        self.check_running()?;
        by.check_reason(action)?;
        let session = self.session_for(xid, action)?;
        let (durable, status) = {
            let mut guard = session.state.lock();
            let state = &mut *guard;
            let status = state.record.status;
            if !(status.is_rolling_back() || status.is_committing()) {
                return Err(TcError::status_invalid(
                    xid,
                    status,
                    &format!("{action} (only a transaction still retrying phase 2 is paused or resumed)"),
                ));
            }
            by.check_version(xid, state)?;
            not_acting(state, xid)?;
            if state.paused == pause {
                return Err(TcError {
                    status: Some(status),
                    ..TcError::new(
                        ErrorCode::PreconditionFailed,
                        format!(
                            "global transaction {xid} is {} already",
                            if pause { "paused" } else { "not paused" }
                        ),
                    )
                });
            }
            state.paused = pause;
            let entry = AuditEntry {
                precondition: json!({ "version": state.timeline.version() }),
                effect: json!({ "paused": pause, "status": status.as_str() }),
                ..by.entry(action, Some(xid))
            };
            let (_, durable) = self.submit_audited(entry, |audit_id| {
                state.record(by.event(action, audit_id));
                let write = Mutation::PutGlobal(state.record.clone());
                state.with_events(vec![write])
            });
            (durable, status)
        };
        durable.await?;
        if !pause {
            if status.is_rolling_back() {
                self.start_rollback(&session);
            } else {
                let now = tokio::time::Instant::now();
                for p in self
                    .commit_queue
                    .lock()
                    .iter_mut()
                    .filter(|p| p.txn_id == session.txn_id)
                {
                    p.not_before = now;
                }
                self.commit_wake.notify_one();
            }
        }
        let state = session.state.lock();
        Ok(json!({ "xid": xid, "status": status.as_str(), "paused": pause, "version": state.timeline.version() }))
    }

    /// Creates a named token; returns it and its secret (shown this once).
    pub async fn create_token(
        &self,
        by: OperatorRequest,
        name: &str,
        role: Role,
        expires_ms: Option<u64>,
    ) -> Result<(TokenRecord, String), TcError> {
        let caller = by.caller.clone();
        self.create_token_now(by, name, role, expires_ms)
            .await
            .map_err(|e| self.refused("token.create", &caller, e))
    }

    async fn create_token_now(
        &self,
        by: OperatorRequest,
        name: &str,
        role: Role,
        expires_ms: Option<u64>,
    ) -> Result<(TokenRecord, String), TcError> {
        self.check_running()?;
        by.check_reason("create a token")?;
        auth::check_name(name)?;
        if role == Role::Root {
            return Err(TcError::invalid("a named token cannot have the root role"));
        }
        let secret = auth::new_secret()?;
        let record = TokenRecord {
            name: name.to_owned(),
            role,
            digest: auth::digest(&secret),
            created_ms: now_ms(),
            created_by: by.caller.name.to_string(),
            expires_ms,
        };
        // Token changes one at a time: the name check holds until the token is stored.
        let _serial = self.token_changes.lock().await;
        if self.tokens.get(name).is_some() {
            return Err(TcError::new(
                ErrorCode::AlreadyExists,
                format!("a token named {name:?} exists; revoke it first or choose another name"),
            ));
        }
        let entry = AuditEntry {
            target: json!({ "token": name, "role": role.as_str(), "expires_ms": expires_ms }),
            ..by.entry("token.create", None)
        };
        let (_, durable) = self.submit_audited(entry, |_| vec![Mutation::PutToken(record.clone())]);
        // Usable once stored.
        durable.await?;
        self.tokens.insert(record.clone());
        Ok((record, secret))
    }

    /// Revokes the token named `name`: refused from now on.
    pub async fn revoke_token(&self, by: OperatorRequest, name: &str) -> Result<TokenRecord, TcError> {
        let caller = by.caller.clone();
        self.revoke_token_now(by, name)
            .await
            .map_err(|e| self.refused("token.revoke", &caller, e))
    }

    async fn revoke_token_now(&self, by: OperatorRequest, name: &str) -> Result<TokenRecord, TcError> {
        self.check_running()?;
        by.check_reason("revoke a token")?;
        let _serial = self.token_changes.lock().await;
        // Refused from now on, before the revocation is stored.
        let Some(record) = self.tokens.remove(name) else {
            return Err(TcError::new(ErrorCode::NotFound, format!("no token is named {name:?}")));
        };
        let entry = AuditEntry {
            target: json!({ "token": name, "role": record.role.as_str() }),
            ..by.entry("token.revoke", None)
        };
        let (_, durable) = self.submit_audited(entry, |_| vec![Mutation::DeleteToken { name: name.to_owned() }]);
        durable.await?;
        Ok(record)
    }

    pub fn audit_list(&self, filter: &AuditFilter, limit: usize) -> Vec<AuditRecord> {
        self.audit.lock().list(filter, limit)
    }

    pub fn audit_get(&self, id: u64) -> Option<AuditRecord> {
        self.audit.lock().get(id).cloned()
    }

    /// The chain check: records checked and the last hash, or where it broke.
    pub fn audit_verify(&self) -> Result<(u64, [u8; 32]), Broken> {
        self.audit.lock().verify()
    }
}
