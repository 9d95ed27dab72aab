//! Background work of the coordinator: the timeout check, rollback drivers (one task per
//! rolling-back transaction, branches in reverse registration order, retries with capped
//! exponential backoff) and the asynchronous committer (branch commits batched per
//! resource).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferrata_rpc::pb;
use tokio::time::Instant;
use tracing::Instrument;

use crate::calls::Outcome;
use crate::coordinator::{Coordinator, PendingCommit, Session};
use crate::metrics::{Action, MessageResult};
use crate::model::{BranchError, BranchMode, BranchRecord, BranchStatus, Failure, GlobalStatus, now_ms};
use crate::rm::CallError;
use crate::store::Mutation;
use crate::timeline::{AttemptResult, DecidedBy, Decision, EventKind};

/// How often the finished transactions' history is trimmed (a no-op when nothing is due).
const HISTORY_TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// How a rollback pass ended.
enum Pass {
    /// Every branch rolled back; the transaction is finished.
    Done,
    /// A branch failed in a way worth retrying.
    Retry,
    /// A branch can never roll back; the transaction ended in a failed status.
    Failed,
    /// The coordinator is shutting down.
    Stopped,
}

/// A resource manager's answer for one branch, classified.
enum BranchResult {
    Done,
    Retryable(BranchError),
    Unretryable(BranchStatus, BranchError),
}

fn classify(branch_id: u64, answer: Result<Vec<pb::BranchOutcome>, CallError>, action: Action) -> BranchResult {
    let outcome = match answer {
        Ok(outcomes) => outcomes.into_iter().find(|o| o.branch_id == branch_id),
        Err(e) => {
            return BranchResult::Retryable(BranchError {
                reason: e.to_string(),
                detail_json: String::new(),
            });
        }
    };
    let Some(o) = outcome else {
        return BranchResult::Retryable(BranchError {
            reason: "the resource manager's answer did not cover this branch".into(),
            detail_json: String::new(),
        });
    };
    let status = pb::BranchStatus::try_from(o.status)
        .ok()
        .and_then(BranchStatus::from_pb);
    let error = BranchError {
        reason: o.reason,
        detail_json: o.detail_json,
    };
    match (action, status) {
        (Action::Commit, Some(BranchStatus::PhaseTwoCommitted)) => BranchResult::Done,
        (Action::Rollback, Some(BranchStatus::PhaseTwoRollbacked)) => BranchResult::Done,
        (Action::Commit, Some(s @ BranchStatus::CommitFailedUnretryable)) => BranchResult::Unretryable(s, error),
        (Action::Rollback, Some(s @ BranchStatus::RollbackFailedUnretryable)) => BranchResult::Unretryable(s, error),
        _ => BranchResult::Retryable(error),
    }
}

/// How a branch failure leaves its transaction.
enum Ending {
    /// Retried at this time (Unix milliseconds); a rollback becomes its retrying status.
    RetryAt(u64),
    /// The transaction ends in the failed status this gives for its current one.
    Failed(fn(GlobalStatus) -> GlobalStatus),
}

/// A phase-2 attempt at a branch, for its timeline.
fn attempted(
    (branch_id, resource_id): (u64, &str),
    action: Decision,
    result: AttemptResult,
    reason: &str,
    next_attempt_ms: Option<u64>,
) -> EventKind {
    EventKind::PhaseTwo {
        branch_id,
        resource_id: resource_id.to_owned(),
        action,
        result,
        reason: reason.to_owned(),
        attempts: 1,
        first_ms: now_ms(),
        next_attempt_ms,
    }
}

/// The outbox row of a message an outbox wrote (`MARK_DELIVERED` or `MARK_DROPPED` to a
/// resource manager of its database: the row named by the message's name), if it has one.
fn outbox_row(b: &pb::BranchRef) -> Option<pb::BranchRef> {
    let msg = crate::msg::MsgBranch::decode(&b.application_data).ok()?;
    (!msg.check_resource.is_empty()).then(|| pb::BranchRef {
        xid: b.xid.clone(),
        branch_id: b.branch_id,
        resource_id: msg.check_resource,
        application_data: msg.name.into_bytes(),
        branch_type: pb::BranchType::Msg as i32,
        ..Default::default()
    })
}

/// The coordinator calls this branch's service itself (a TCC branch, a saga step, a
/// message).
fn is_http(b: &pb::BranchRef) -> bool {
    pb::BranchType::try_from(b.branch_type).is_ok_and(|t| BranchMode::from_pb(t).is_http())
}

impl Coordinator {
    /// Starts the timeout check, the asynchronous committer and the release of idle
    /// guarded tables.
    pub fn start_background(self: &Arc<Self>) {
        self.tasks.spawn(Arc::clone(self).timeout_loop());
        self.tasks.spawn(Arc::clone(self).commit_loop());
        if let crate::at::LockAuthority::Local(at) = &self.at {
            self.tasks
                .spawn(Arc::clone(&at.guards).release_loop(self.shutdown.clone()));
        }
        self.tasks.spawn(Arc::clone(self).history_loop());
    }

    /// Trims the finished transactions' history to its retention, in memory and in the store.
    async fn history_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HISTORY_TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let t = &self.config.transactions;
            let forgotten = {
                let mut history = self.finished.lock();
                let forgotten = history.trim(t.finished_history, t.finished_retention_ms, now_ms());
                // Set while the history is locked: nobody sees it trimmed with the old count.
                self.metrics.finished_kept.set(history.len() as f64);
                forgotten
            };
            if !forgotten.is_empty() {
                let forget = forgotten
                    .into_iter()
                    .map(|txn_id| Mutation::Forget { txn_id })
                    .collect();
                // Lost in a crash, they are trimmed again.
                self.journal.submit_lazy(forget);
            }
        }
    }

    /// Moves transactions still in Begin past their timeout to TimeoutRollbacking.
    async fn timeout_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.transactions.timeout_check_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let now = Instant::now();
            let expired: Vec<u64> = {
                let mut timeouts = self.timeouts.lock();
                let mut out = Vec::new();
                while let Some(&(deadline, txn)) = timeouts.first() {
                    if deadline > now {
                        break;
                    }
                    timeouts.pop_first();
                    out.push(txn);
                }
                out
            };
            for txn in expired {
                let Some(session) = self.live(txn) else { continue };
                // Prepared messages with a check are settled by its answer instead.
                if let Some(check) = Self::prepared_check(&session) {
                    self.start_settling(session, check);
                    continue;
                }
                let Ok(durable) = self.decide_rollback(&session, GlobalStatus::TimeoutRollbacking, DecidedBy::Timeout)
                else {
                    continue;
                };
                self.metrics.timeouts.increment(1);
                tracing::info!(xid = session.xid, "timed out in Begin; rolling back");
                let coordinator = Arc::clone(&self);
                self.tasks.spawn(async move {
                    let stored = match durable {
                        Some(durable) => durable.await.is_ok(),
                        None => true,
                    };
                    if stored {
                        coordinator.start_rollback(&session);
                    }
                });
            }
        }
    }

    /// Starts the rollback driver of a rolling-back session unless one is running.
    pub(crate) fn start_rollback(self: &Arc<Self>, session: &Arc<Session>) {
        {
            let mut state = session.state.lock();
            if state.rollback_running || !state.record.status.is_rolling_back() || state.paused {
                return;
            }
            state.rollback_running = true;
        }
        let span = tracing::info_span!("rollback", xid = session.xid);
        self.tasks
            .spawn(Arc::clone(self).drive_rollback(Arc::clone(session)).instrument(span));
    }

    async fn drive_rollback(self: Arc<Self>, session: Arc<Session>) {
        let mut attempt = 0u32;
        loop {
            // Create before the pass, so an attach during the pass is not missed.
            let attached = self.rms.attached();
            let pass = self.rollback_pass(&session, attempt).await;
            session.pass_ended();
            match pass {
                Pass::Done => return,
                Pass::Failed | Pass::Stopped => break,
                Pass::Retry => {
                    self.metrics.phase2_retry(Action::Rollback);
                    let delay = self.config.phase2.backoff(attempt);
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = attached => {}
                        _ = session.wake.notified() => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                    // Paused by an operator: this driver ends (checked and marked under one
                    // lock, so a resume either finds it still running or starts another).
                    let mut state = session.state.lock();
                    if state.paused {
                        state.rollback_running = false;
                        return;
                    }
                }
            }
        }
        session.state.lock().rollback_running = false;
    }

    /// Rolls back the remaining branches, XA branches first, each kind last registered first,
    /// stopping at the first failure. XA first: an XA branch registers at its start but may
    /// write a row after an AT branch of its own transaction committed it (its own rows are
    /// free to it), and that AT branch's restore would wait for the prepared branch's row
    /// lock; an AT branch can never have written over a prepared branch's row. `attempt`
    /// counts the passes that asked for a retry before this one.
    async fn rollback_pass(self: &Arc<Self>, session: &Session, attempt: u32) -> Pass {
        let branches: Vec<BranchRecord> = {
            let state = session.state.lock();
            let mut left: Vec<BranchRecord> = state
                .branches
                .iter()
                .rev()
                .filter(|b| b.status.needs_phase_two())
                .cloned()
                .collect();
            left.sort_by_key(|b| b.mode != BranchMode::Xa);
            left
        };
        for b in branches {
            if self.shutdown.is_cancelled() {
                return Pass::Stopped;
            }
            let started = Instant::now();
            let answer = self
                .send_phase2(&b.resource_id, pb::Phase2Action::Rollback, vec![b.to_ref(&session.xid)])
                .await;
            self.metrics.phase2(Action::Rollback, started.elapsed());
            match classify(b.branch_id, answer, Action::Rollback) {
                BranchResult::Done => {
                    {
                        let mut state = session.state.lock();
                        state.branches.retain(|x| x.branch_id != b.branch_id);
                        let done = attempted(
                            (b.branch_id, &b.resource_id),
                            Decision::Rollback,
                            AttemptResult::Done,
                            "",
                            None,
                        );
                        state.record(done);
                        state.record(EventKind::LocksReleased {
                            branch_id: Some(b.branch_id),
                            rows: b.lock_keys.len() as u64,
                        });
                        // Submitted before the rows are released (see coordinator.rs); not
                        // awaited: a branch rolled back twice finds no undo record.
                        let writes = state.with_events(vec![Mutation::DeleteBranch {
                            txn_id: b.txn_id,
                            branch_id: b.branch_id,
                        }]);
                        self.journal.submit_detached(writes);
                    }
                    self.at.release_branch(b.txn_id, b.branch_id, &b.lock_keys);
                    self.at.count_held(&self.metrics);
                    if b.mode == BranchMode::Msg {
                        self.forget_joined_rows(&b.to_ref(&session.xid));
                    }
                    tracing::debug!(branch_id = b.branch_id, "branch rolled back");
                }
                BranchResult::Retryable(error) => {
                    tracing::warn!(
                        branch_id = b.branch_id,
                        resource = b.resource_id,
                        reason = error.reason,
                        "branch rollback failed; will retry"
                    );
                    // Submitted; not awaited: the retry runs whether or not it is durable yet.
                    let next = now_ms() + self.config.phase2.backoff(attempt).as_millis() as u64;
                    drop(self.mark_failed(
                        session,
                        &b,
                        BranchStatus::RollbackFailedRetryable,
                        error,
                        Ending::RetryAt(next),
                    ));
                    return Pass::Retry;
                }
                BranchResult::Unretryable(status, error) => {
                    tracing::error!(
                        branch_id = b.branch_id,
                        resource = b.resource_id,
                        reason = error.reason,
                        detail = error.detail_json,
                        "branch can never roll back; the transaction keeps its locks until an operator acts"
                    );
                    self.metrics.phase2_failure(Action::Rollback);
                    let durable = self.mark_failed(
                        session,
                        &b,
                        status,
                        error,
                        Ending::Failed(GlobalStatus::rollback_failed),
                    );
                    let _ = durable.await;
                    return Pass::Failed;
                }
            }
        }
        let state_guard = {
            let mut state = session.state.lock();
            let done = state.record.status.rolled_back();
            self.set_status(&mut state, done);
            state.failure = None;
            state.record(EventKind::Finished { status: done });
            let write = Mutation::Finish(state.finished_record());
            let writes = state.with_events(vec![write]);
            self.journal.submit_detached(writes);
            self.finish(session, &state);
            done
        };
        tracing::info!(status = state_guard.as_str(), "rolled back");
        Pass::Done
    }

    /// Records a branch failure (and, when it `Failed`, the transaction's failed end
    /// status), returning the write's durability.
    fn mark_failed(
        &self,
        session: &Session,
        b: &BranchRecord,
        status: BranchStatus,
        error: BranchError,
        ending: Ending,
    ) -> impl std::future::Future<Output = Result<(), crate::store::StoreError>> + use<> {
        let mut state = session.state.lock();
        let action = if status == BranchStatus::CommitFailedUnretryable {
            Decision::Commit
        } else {
            Decision::Rollback
        };
        let next = match ending {
            Ending::Failed(end) => {
                state.record(EventKind::PhaseTwoFailed {
                    branch_id: b.branch_id,
                    resource_id: b.resource_id.clone(),
                    action,
                    reason: error.reason.clone(),
                    detail_json: error.detail_json.clone(),
                });
                end(state.record.status)
            }
            Ending::RetryAt(next) => {
                let retry = attempted(
                    (b.branch_id, &b.resource_id),
                    action,
                    AttemptResult::Retry,
                    &error.reason,
                    Some(next),
                );
                state.record(retry);
                match state.record.status {
                    s if s.is_rolling_back() => s.rollback_retrying(),
                    s => s,
                }
            }
        };
        self.set_status(&mut state, next);
        state.failure = Some(Failure {
            branch_id: b.branch_id,
            resource_id: b.resource_id.clone(),
            status,
            error: error.clone(),
        });
        let mut writes = vec![Mutation::PutGlobal(state.record.clone())];
        if let Some(branch) = state.branches.iter_mut().find(|x| x.branch_id == b.branch_id) {
            branch.status = status;
            branch.error = Some(error);
            branch.updated_ms = crate::model::now_ms();
            writes.push(Mutation::PutBranch(branch.clone()));
        }
        let writes = state.with_events(writes);
        self.journal.submit(writes)
    }

    /// Sends queued branch commits, batched per resource, and requeues failures with backoff.
    async fn commit_loop(self: Arc<Self>) {
        let gather = Duration::from_millis(self.config.phase2.commit_gather_ms);
        let mut woken = false;
        loop {
            // Before the gathering pause: an attach during it is not missed.
            let attached = self.rms.attached();
            if std::mem::take(&mut woken) {
                // Commits decided in the next moments go in the same commands.
                tokio::time::sleep(gather).await;
            }
            let now = Instant::now();
            // Taken out of the queue first: a session's lock is never taken under the
            // queue's (retry takes them the other way round).
            let queued = std::mem::take(&mut *self.commit_queue.lock());
            // A transaction an operator resolved meanwhile is gone: its commits with it.
            let queued: Vec<PendingCommit> = queued.into_iter().filter(|p| self.live(p.txn_id).is_some()).collect();
            let paused = |p: &PendingCommit| self.live(p.txn_id).is_some_and(|s| s.state.lock().paused);
            // A paused transaction's commits wait in the queue, due as they were: resuming
            // wakes this loop, which looks again.
            let (mut ready, mut waiting) = (Vec::new(), Vec::new());
            let mut next_wake: Option<Instant> = None;
            for p in queued {
                if p.not_before > now {
                    next_wake = Some(next_wake.map_or(p.not_before, |w| w.min(p.not_before)));
                    waiting.push(p);
                } else if paused(&p) {
                    // Only what is due is looked up: a pause is rare, the queue long.
                    waiting.push(p);
                } else {
                    ready.push(p);
                }
            }
            let next_wake = {
                let mut queue = self.commit_queue.lock();
                // Added meanwhile (a retry, a resume): looked at no later than due.
                let added = queue.iter().map(|p| p.not_before).min();
                queue.extend(waiting);
                match (next_wake, added) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            // Batched per resource and holding process (XA branches go to the one that holds
            // them, `rm.rs`). Saga steps never get here: a saga commits no step.
            let mut by_resource: HashMap<(String, String), Vec<PendingCommit>> = HashMap::new();
            for p in ready {
                let key = (p.resource_id.clone(), p.reference.instance_id.clone());
                by_resource.entry(key).or_default().push(p);
            }
            for ((resource, _), items) in by_resource {
                // One call per HTTP branch, each in its own task: a slow service holds up
                // nothing else.
                let http = items.first().is_some_and(|p| is_http(&p.reference));
                let batch = if http { 1 } else { self.config.phase2.commit_batch };
                for chunk in items.chunks(batch) {
                    self.tasks
                        .spawn(Arc::clone(&self).commit_batch(resource.clone(), chunk.to_vec()));
                }
            }
            let sleep = async {
                match next_wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.commit_wake.notified() => woken = true,
                _ = sleep => {}
                _ = attached => {
                    // A resource manager is back: send what waited for one now.
                    for p in self.commit_queue.lock().iter_mut() {
                        p.not_before = now;
                    }
                }
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Sends phase 2 of `refs` (branches of one resource and holder): HTTP branches' calls
    /// (a TCC confirm or cancel, a saga compensation), the others to a resource manager
    /// serving the resource.
    async fn send_phase2(
        &self,
        resource: &str,
        action: pb::Phase2Action,
        refs: Vec<pb::BranchRef>,
    ) -> Result<Vec<pb::BranchOutcome>, CallError> {
        let (http, others): (Vec<_>, Vec<_>) = refs.into_iter().partition(is_http);
        let mut outcomes = Vec::with_capacity(http.len());
        let commit = action == pb::Phase2Action::Commit;
        let timeout = self.config.calls.request_timeout();
        for b in &http {
            let call = async {
                match pb::BranchType::try_from(b.branch_type) {
                    Ok(pb::BranchType::Saga) => crate::saga::compensate(&self.caller, timeout, b).await,
                    Ok(pb::BranchType::Msg) if commit => crate::msg::deliver(&self.caller, timeout, b).await,
                    // A message rolled back is dropped: nothing to call (an outbox's rows are
                    // deleted afterwards, best effort).
                    Ok(pb::BranchType::Msg) => {
                        pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::PhaseTwoRollbacked, "")
                    }
                    _ => crate::tcc::phase2(&self.caller, timeout, commit, b).await,
                }
            };
            outcomes.push(tokio::select! {
                o = call => o,
                // Asked again after the restart.
                _ = self.shutdown.cancelled() => pb::BranchOutcome::of(
                    b.branch_id,
                    pb::BranchStatus::Unknown,
                    "the coordinator is shutting down",
                ),
            });
        }
        if !others.is_empty() {
            let answered = self
                .rms
                .call(resource, action, others, None, self.config.phase2.call_timeout())
                .await?;
            outcomes.extend(answered);
        }
        Ok(outcomes)
    }

    async fn commit_batch(self: Arc<Self>, resource: String, items: Vec<PendingCommit>) {
        let (items, mut retry) = self.check_joined(items).await;
        if items.is_empty() {
            self.requeue(retry);
            return;
        }
        let refs: Vec<pb::BranchRef> = items.iter().map(|p| p.reference.clone()).collect();
        let started = Instant::now();
        let answer = self.send_phase2(&resource, pb::Phase2Action::Commit, refs).await;
        self.metrics.phase2(Action::Commit, started.elapsed());
        let answer = answer.map(|outcomes| {
            outcomes
                .into_iter()
                .map(|o| (o.branch_id, o))
                .collect::<HashMap<_, _>>()
        });
        for mut p in items {
            let outcome = answer.as_ref().ok().and_then(|by_id| by_id.get(&p.branch_id));
            let retry_after = outcome
                .filter(|o| o.retry_after_ms > 0)
                .map(|o| Duration::from_millis(o.retry_after_ms));
            let result = match &answer {
                Ok(_) => classify(p.branch_id, Ok(outcome.cloned().into_iter().collect()), Action::Commit),
                Err(e) => BranchResult::Retryable(BranchError {
                    reason: e.to_string(),
                    detail_json: String::new(),
                }),
            };
            // A message is tried again on its policy's schedule, and dead-lettered when the
            // schedule ends; any other branch until its commit succeeds.
            let message = p.reference.branch_type == pb::BranchType::Msg as i32;
            let delay = match &result {
                BranchResult::Retryable(_) if message => {
                    let elapsed = Duration::from_millis(now_ms().saturating_sub(p.first_ms));
                    crate::msg::retry_wait(&p.reference, elapsed, retry_after)
                }
                _ => Some(self.config.phase2.backoff(p.attempt)),
            };
            let result = match (result, delay) {
                (BranchResult::Retryable(error), None) => BranchResult::Unretryable(
                    BranchStatus::CommitFailedUnretryable,
                    BranchError {
                        reason: format!(
                            "dead-lettered: its delivery schedule ended; the last attempt: {}",
                            error.reason
                        ),
                        detail_json: error.detail_json,
                    },
                ),
                (result, _) => result,
            };
            match result {
                BranchResult::Done => {
                    if message {
                        self.metrics.message(MessageResult::Delivered);
                        self.tell_outbox(&p.reference, pb::Phase2Action::MarkDelivered);
                    }
                    self.branch_committed(&p, "")
                }
                BranchResult::Unretryable(status, error) => {
                    if message {
                        self.metrics.message(MessageResult::DeadLettered);
                    }
                    self.branch_commit_failed(&p, status, error)
                }
                BranchResult::Retryable(error) => {
                    tracing::warn!(
                        xid = crate::xid::format_xid(p.txn_id),
                        branch_id = p.branch_id,
                        reason = error.reason,
                        "branch commit failed; will retry"
                    );
                    self.commit_later(&mut p, delay.unwrap_or_default(), &error.reason);
                    retry.push(p);
                }
            }
        }
        self.requeue(retry);
    }

    /// Sets `p`'s next attempt `delay` from now, after one that failed for `reason`.
    fn commit_later(&self, p: &mut PendingCommit, delay: Duration, reason: &str) {
        self.metrics.phase2_retry(Action::Commit);
        p.not_before = Instant::now() + delay;
        p.attempt += 1;
        // In the timeline only, stored with the transaction's next write.
        if let Some(session) = self.live(p.txn_id) {
            let next = now_ms() + delay.as_millis() as u64;
            let retry = attempted(
                (p.branch_id, &p.resource_id),
                Decision::Commit,
                AttemptResult::Retry,
                reason,
                Some(next),
            );
            session.state.lock().record(retry);
            session.pass_ended();
        }
    }

    /// Puts commits tried too early back in the queue.
    fn requeue(&self, retry: Vec<PendingCommit>) {
        if !retry.is_empty() {
            self.commit_queue.lock().extend(retry);
            self.commit_wake.notify_one();
        }
    }

    /// Messages an outbox joined to a global transaction are sent only once their barrier
    /// row says their local transaction committed (the transaction's commit does not say
    /// it): asked once, the answer kept with the branch (durably). Returns the commits to
    /// send and those to try later (the row could not be asked: on the phase-2 backoff, not
    /// the message's schedule, which is the receiver's); a message whose local transaction
    /// never committed is done, dropped.
    async fn check_joined(self: &Arc<Self>, items: Vec<PendingCommit>) -> (Vec<PendingCommit>, Vec<PendingCommit>) {
        let (mut send, mut later) = (Vec::with_capacity(items.len()), Vec::new());
        // The messages of one hand-over share their barrier row: asked once per batch.
        let mut answers: HashMap<(String, String, String), Outcome> = HashMap::new();
        for mut p in items {
            let message = match pb::BranchType::try_from(p.reference.branch_type) {
                Ok(pb::BranchType::Msg) => crate::msg::MsgBranch::decode(&p.reference.application_data).ok(),
                _ => None,
            };
            let Some(mut message) = message.filter(crate::msg::MsgBranch::awaits_barrier) else {
                send.push(p);
                continue;
            };
            let row = (
                message.check_resource.clone(),
                p.reference.xid.clone(),
                message.check_barrier.clone(),
            );
            let answer = match answers.get(&row) {
                Some(answer) => answer.clone(),
                None => {
                    let answer = self.ask_barrier(&row.0, &row.1, &row.2).await;
                    answers.insert(row, answer.clone());
                    answer
                }
            };
            match answer {
                Outcome::Success => {
                    message.barrier_confirmed = true;
                    p.reference.application_data = message.encode();
                    self.keep_branch_data(&p);
                    // The receiver's schedule starts with its first call.
                    p.first_ms = p.first_ms.max(now_ms());
                    send.push(p);
                }
                Outcome::Failure(_) | Outcome::Gone(_) => {
                    self.metrics.message(MessageResult::Dropped);
                    self.branch_committed(&p, crate::msg::DROPPED);
                }
                unanswered => {
                    let why = match unanswered {
                        Outcome::Retry(why) => format!("its barrier row could not be checked: {why}"),
                        _ => "its barrier row could not be checked".to_owned(),
                    };
                    let delay = self.config.phase2.backoff(p.attempt);
                    self.commit_later(&mut p, delay, &why);
                    later.push(p);
                }
            }
        }
        (send, later)
    }

    /// Stores `p`'s application data as its branch's (in memory and durably, not awaited).
    fn keep_branch_data(&self, p: &PendingCommit) {
        let Some(session) = self.live(p.txn_id) else { return };
        let mut state = session.state.lock();
        let Some(b) = state.branches.iter_mut().find(|b| b.branch_id == p.branch_id) else {
            return;
        };
        b.application_data = p.reference.application_data.clone();
        let record = b.clone();
        let writes = state.with_events(vec![Mutation::PutBranch(record)]);
        self.journal.submit_detached(writes);
    }

    /// The rows of a message an outbox joined to a global transaction that rolled back: a
    /// resource manager of its database deletes them (`MARK_DROPPED`; its local transaction
    /// may have committed them), best effort, as a row left shows a DBA more and harms none.
    fn forget_joined_rows(self: &Arc<Self>, b: &pb::BranchRef) {
        let joined = crate::msg::MsgBranch::decode(&b.application_data).is_ok_and(|m| !m.check_barrier.is_empty());
        if joined {
            self.tell_outbox(b, pb::Phase2Action::MarkDropped);
        }
    }

    /// Tells a resource manager of an outbox message's database what became of it
    /// (`action`: MARK_DELIVERED or MARK_DROPPED), so its row is marked or deleted (tried a
    /// few times: a row left shows a DBA the wrong state, and is not purged).
    fn tell_outbox(self: &Arc<Self>, reference: &pb::BranchRef, action: pb::Phase2Action) {
        let Some(branch) = outbox_row(reference) else { return };
        let coordinator = Arc::clone(self);
        self.tasks.spawn(async move {
            let timeout = coordinator.config.phase2.call_timeout();
            // A few tries with backoff: a row left unmarked stays unpurged.
            for attempt in 0..5 {
                let marked = coordinator
                    .rms
                    .call(&branch.resource_id, action, vec![branch.clone()], None, timeout)
                    .await;
                let done = matches!(&marked, Ok(o) if o.iter().all(|o| o.status == pb::BranchStatus::PhaseTwoCommitted as i32));
                if done {
                    return;
                }
                tracing::debug!(attempt, ?action, "an outbox message's row was not marked yet");
                tokio::select! {
                    _ = tokio::time::sleep(coordinator.config.phase2.backoff(attempt)) => {}
                    _ = coordinator.shutdown.cancelled() => return,
                }
            }
        });
    }

    /// Branch `p` committed (`note`: what its timeline says of it, if anything).
    fn branch_committed(&self, p: &PendingCommit, note: &str) {
        let Some(session) = self.live(p.txn_id) else { return };
        let mut state = session.state.lock();
        if let Some(b) = state.branches.iter().find(|b| b.branch_id == p.branch_id) {
            let done = attempted(
                (b.branch_id, &b.resource_id),
                Decision::Commit,
                AttemptResult::Done,
                note,
                None,
            );
            state.record(done);
        }
        state.branches.retain(|b| b.branch_id != p.branch_id);
        // Until the whole transaction is deleted its committed branches stay in the store
        // (one write per transaction instead of one per branch): after a crash they are sent
        // again, and a branch commit is idempotent (it deletes undo records). A delivered
        // message is deleted at once: it is not delivered again after a crash.
        let delivered = (p.reference.branch_type == pb::BranchType::Msg as i32).then_some(Mutation::DeleteBranch {
            txn_id: p.txn_id,
            branch_id: p.branch_id,
        });
        let pending = state.branches.iter().any(BranchRecord::awaits_commit);
        if pending || state.record.status != GlobalStatus::AsyncCommitting {
            if let Some(delete) = delivered {
                let writes = state.with_events(vec![delete]);
                self.journal.submit_detached(writes);
            }
            return;
        }
        // The last commit done: a branch that failed meanwhile leaves the transaction to an
        // operator.
        if state
            .branches
            .iter()
            .any(|b| b.status == BranchStatus::CommitFailedUnretryable)
        {
            self.set_status(&mut state, GlobalStatus::CommitFailed);
            let record = state.record.clone();
            let writes = state.with_events(delivered.into_iter().chain([Mutation::PutGlobal(record)]).collect());
            self.journal.submit_detached(writes);
            return;
        }
        self.set_status(&mut state, GlobalStatus::Committed);
        state.record(EventKind::Finished {
            status: GlobalStatus::Committed,
        });
        let write = Mutation::Finish(state.finished_record());
        // Lost in a crash, the transaction is AsyncCommitting again and its stored branches'
        // commits, idempotent, are sent again. A delivered message's branch is deleted at
        // once instead: its transaction's end goes with that deletion, not lazily, or a
        // crash would leave it committing with nothing left to send.
        match delivered {
            Some(delete) => self.journal.submit_detached(state.with_events(vec![delete, write])),
            None => self.journal.submit_lazy(state.with_events(vec![write])),
        }
        self.finish(&session, &state);
        tracing::debug!(xid = session.xid, "committed");
    }

    fn branch_commit_failed(&self, p: &PendingCommit, status: BranchStatus, error: BranchError) {
        let Some(session) = self.live(p.txn_id) else { return };
        tracing::error!(
            xid = session.xid,
            branch_id = p.branch_id,
            reason = error.reason,
            "branch can never commit; kept for an operator"
        );
        self.metrics.phase2_failure(Action::Commit);
        let Some(b) = session
            .state
            .lock()
            .branches
            .iter()
            .find(|b| b.branch_id == p.branch_id)
            .cloned()
        else {
            return;
        };
        // The transaction fails once nothing else awaits its commit (the other branches,
        // messages among them, go on meanwhile).
        let others = session
            .state
            .lock()
            .branches
            .iter()
            .any(|x| x.branch_id != b.branch_id && x.awaits_commit());
        let ending = if others {
            Ending::Failed(|status| status)
        } else {
            Ending::Failed(|_| GlobalStatus::CommitFailed)
        };
        // Submitted; durability is not awaited: nobody waits for this answer.
        drop(self.mark_failed(&session, &b, status, error, ending));
    }
}
