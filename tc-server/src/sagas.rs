//! Sagas on the coordinator: starting one (stored whole, with its steps, before it is
//! acknowledged) and driving its actions forward, one task per saga. Its compensations are a
//! rollback like any other (`phase2.rs`), which calls them for the steps whose actions may
//! have run.
//!
//! Invariants:
//! - A step is stored as called (`ActionCalled`) before its action is first called, so a
//!   rollback, even after a restart, compensates every step that may have run, and a
//!   restarted coordinator calls again (idempotently: the same `webhook-id`) every action
//!   whose answer it did not store.
//! - An action is called only while the saga is in Begin and after the actions of the steps
//!   it waits for succeeded; the saga commits once every action succeeded, and rolls back
//!   when one refuses or runs out of retries (or its timeout, or the application, says so).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::coordinator::{Coordinator, Session};
use crate::error::TcError;
use crate::model::{BranchError, BranchMode, BranchRecord, BranchStatus, GlobalStatus, now_ms};
use crate::saga::{self, ActionResult, SagaStep, StepRequest};
use crate::store::Mutation;
use crate::timeline::{AttemptResult, DecidedBy, EventKind};

/// A saga as asked for.
#[derive(Clone)]
pub struct SagaRequest {
    pub name: String,
    /// Rolls back if its actions are not all done by then; 0: never.
    pub timeout_ms: u64,
    pub steps: Vec<StepRequest>,
    pub options: saga::Options,
}

/// Where one step's action stands in this driver (not stored: a restart starts afresh).
#[derive(Default)]
struct StepRun {
    retries: u32,
    not_before: Option<Instant>,
    in_flight: bool,
}

/// A saga checked whole (limits, plan, sizes, URLs), ready to be stored.
pub struct PlannedSaga {
    pub name: String,
    timeout_ms: u64,
    /// In the order they are stored, each with its stored form.
    steps: Vec<(SagaStep, Vec<u8>)>,
}

impl Coordinator {
    /// Checks a saga whole before anything is stored: its limits, its plan
    /// ([`saga::plan`]), each step's stored size, and that every URL's host resolves.
    pub async fn plan_saga(&self, request: SagaRequest) -> Result<PlannedSaga, TcError> {
        self.check_limits(request.timeout_ms, &request.name)?;
        let steps = saga::plan(request.steps, &request.options, &self.caller).map_err(TcError::invalid)?;
        let max = self.config.transactions.max_application_data;
        let steps = steps
            .into_iter()
            .map(|step| {
                let stored = step.encode();
                if stored.len() > max {
                    return Err(TcError::invalid(format!(
                        "step {} is {} bytes as stored; at most {max} are allowed",
                        step.name,
                        stored.len()
                    )));
                }
                Ok((step, stored))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let urls: Vec<&str> = steps
            .iter()
            .flat_map(|(s, _)| [s.action.as_str(), s.compensate.as_str()])
            .filter(|url| !url.is_empty())
            .collect();
        self.caller.resolves(urls).await.map_err(TcError::invalid)?;
        Ok(PlannedSaga {
            name: request.name,
            timeout_ms: request.timeout_ms,
            steps,
        })
    }

    /// Stores a planned saga with its steps and starts its actions; returns its XID once it
    /// is durable.
    pub async fn submit_saga(self: &Arc<Self>, saga: PlannedSaga) -> Result<String, TcError> {
        self.check_running()?;
        let record = self.new_record(saga.name, saga.timeout_ms).await?;
        let (txn_id, now) = (record.txn_id, record.begin_ms);
        let mut branches = Vec::with_capacity(saga.steps.len());
        for (step, application_data) in saga.steps {
            branches.push(BranchRecord {
                txn_id,
                branch_id: self.ids.next().await?,
                resource_id: crate::calls::origin(&step.action).to_owned(),
                lock_keys: Vec::new(),
                application_data,
                status: BranchStatus::ActionWaiting,
                registered_ms: now,
                updated_ms: now,
                error: None,
                mode: BranchMode::Saga,
                connection_id: 0,
                instance_id: String::new(),
            });
        }
        let (session, durable) = self.open_session(record, branches);
        if let Some(durable) = durable {
            durable.await?;
        }
        self.start_saga(&session);
        tracing::debug!(xid = session.xid, "saga submitted");
        Ok(session.xid.clone())
    }

    /// Starts the task that calls a saga's actions.
    pub(crate) fn start_saga(self: &Arc<Self>, session: &Arc<Session>) {
        let span = tracing::info_span!("saga", xid = session.xid);
        self.tasks
            .spawn(Arc::clone(self).drive_saga(Arc::clone(session)).instrument(span));
    }

    async fn drive_saga(self: Arc<Self>, session: Arc<Session>) {
        self.run_actions(&session).await;
        session.pass_ended();
    }

    /// Calls the saga's ready actions until they all succeeded (it commits), one fails (it
    /// rolls back), or the coordinator stops.
    async fn run_actions(self: &Arc<Self>, session: &Arc<Session>) {
        // A step's calls never change: read once. They were written by this coordinator, so
        // one that does not read means a corrupt store: the saga rolls back.
        let steps: Result<HashMap<u64, SagaStep>, (u64, String)> = session
            .state
            .lock()
            .branches
            .iter()
            .filter(|b| b.mode == BranchMode::Saga)
            .map(|b| match SagaStep::decode(&b.application_data) {
                Ok(step) => Ok((b.branch_id, step)),
                Err(why) => Err((b.branch_id, why)),
            })
            .collect();
        let steps = match steps {
            Ok(steps) => steps,
            Err((branch_id, why)) => {
                self.saga_fails(session, branch_id, "", BranchStatus::ActionCalled, why)
                    .await;
                return;
            }
        };
        let mut runs: HashMap<u64, StepRun> = HashMap::new();
        let mut calls: JoinSet<(u64, ActionResult)> = JoinSet::new();
        let timeout = self.config.calls.request_timeout();
        loop {
            let now = Instant::now();
            let (to_call, durable, all_done, next_wake) = {
                let mut state = session.state.lock();
                if state.record.status != GlobalStatus::Begin {
                    return;
                }
                let done: HashSet<&str> = state
                    .branches
                    .iter()
                    .filter(|b| b.mode == BranchMode::Saga && b.status == BranchStatus::ActionDone)
                    .map(|b| steps[&b.branch_id].name.as_str())
                    .collect();
                let (mut to_call, mut writes, mut all_done, mut next_wake) = (Vec::new(), Vec::new(), true, None);
                for b in state.branches.iter_mut().filter(|b| b.mode == BranchMode::Saga) {
                    if b.status == BranchStatus::ActionDone {
                        continue;
                    }
                    all_done = false;
                    let step = &steps[&b.branch_id];
                    let run = runs.entry(b.branch_id).or_default();
                    if run.in_flight || !step.after.iter().all(|name| done.contains(name.as_str())) {
                        continue;
                    }
                    if let Some(at) = run.not_before.filter(|at| *at > now) {
                        next_wake = Some(next_wake.map_or(at, |w: Instant| w.min(at)));
                        continue;
                    }
                    if b.status == BranchStatus::ActionWaiting {
                        b.status = BranchStatus::ActionCalled;
                        b.updated_ms = now_ms();
                        writes.push(Mutation::PutBranch(b.clone()));
                    }
                    run.in_flight = true;
                    to_call.push((b.branch_id, step.clone()));
                }
                let durable = (!writes.is_empty()).then(|| {
                    let writes = state.with_events(writes);
                    self.journal.submit(writes)
                });
                (to_call, durable, all_done, next_wake)
            };
            if all_done {
                if let Err(e) = self.commit_now(&session.xid, DecidedBy::Saga).await {
                    tracing::warn!(error = %e, "the saga's actions all succeeded but its commit was not stored");
                }
                return;
            }
            // Stored as called before the calls: a store that failed acknowledges nothing more.
            if let Some(durable) = durable
                && durable.await.is_err()
            {
                return;
            }
            // Decided meanwhile (a timeout, the application): no action is called any more.
            if session.state.lock().record.status != GlobalStatus::Begin {
                return;
            }
            for (branch_id, step) in to_call {
                let caller = Arc::clone(self);
                let xid = session.xid.clone();
                calls.spawn(async move { (branch_id, saga::action(&caller.caller, timeout, &xid, &step).await) });
            }
            let sleep = async {
                match next_wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let (branch_id, result) = tokio::select! {
                Some(joined) = calls.join_next() => match joined {
                    Ok(answer) => answer,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => return,
                },
                _ = sleep => continue,
                _ = session.wake.notified() => {
                    runs.values_mut().for_each(|r| r.not_before = None);
                    continue;
                }
                _ = self.shutdown.cancelled() => return,
            };
            let run = runs.entry(branch_id).or_default();
            run.in_flight = false;
            if !self
                .action_answered(session, (branch_id, &steps[&branch_id]), result, run)
                .await
            {
                return;
            }
        }
    }

    /// Records what an action's call came to; `false` once the saga rolls back.
    async fn action_answered(
        self: &Arc<Self>,
        session: &Arc<Session>,
        (branch_id, step): (u64, &SagaStep),
        result: ActionResult,
        run: &mut StepRun,
    ) -> bool {
        let failed = {
            let mut state = session.state.lock();
            // Decided meanwhile (a timeout, the application): the rollback compensates this
            // step whatever the answer, as it is stored as called.
            if state.record.status != GlobalStatus::Begin {
                return false;
            }
            let Some(b) = state.branches.iter_mut().find(|b| b.branch_id == branch_id) else {
                return false;
            };
            if b.status != BranchStatus::ActionCalled {
                return false;
            }
            match result {
                ActionResult::Done => {
                    b.status = BranchStatus::ActionDone;
                    b.updated_ms = now_ms();
                    let write = Mutation::PutBranch(b.clone());
                    state.record(action_event((branch_id, &step.name), AttemptResult::Done, "", None));
                    // Not awaited: lost in a crash, the action is called again.
                    let writes = state.with_events(vec![write]);
                    self.journal.submit_detached(writes);
                    None
                }
                ActionResult::Again { ongoing, why } => {
                    if step.retry_limit.is_some_and(|limit| run.retries >= limit) {
                        Some((
                            BranchStatus::ActionCalled,
                            format!("no definite answer after {} retries (retry_limit): {why}", run.retries),
                        ))
                    } else {
                        let p = &self.config.phase2;
                        let delay = saga::retry_delay(
                            step,
                            run.retries,
                            ongoing,
                            p.backoff(0),
                            std::time::Duration::from_millis(p.retry_max_ms),
                        );
                        run.retries += 1;
                        run.not_before = Some(Instant::now() + delay);
                        let next = now_ms().saturating_add(delay.as_millis() as u64);
                        // In the timeline only, stored with the transaction's next write.
                        state.record(action_event(
                            (branch_id, &step.name),
                            AttemptResult::Retry,
                            &why,
                            Some(next),
                        ));
                        tracing::debug!(branch_id, step = step.name, reason = why, "action retried");
                        session.pass_ended();
                        None
                    }
                }
                ActionResult::Failed(why) => Some((BranchStatus::ActionFailed, why)),
            }
        };
        let Some((status, why)) = failed else { return true };
        self.saga_fails(session, branch_id, &step.name, status, why).await;
        false
    }

    /// Rolls the saga back because of step `branch_id` (named `step`), which ends in `status`
    /// (ActionFailed, or ActionCalled when it ran out of retries) with `why`: stored in the
    /// decision's batch.
    async fn saga_fails(
        self: &Arc<Self>,
        session: &Arc<Session>,
        branch_id: u64,
        step: &str,
        status: BranchStatus,
        why: String,
    ) {
        tracing::info!(branch_id, reason = why, "a saga action failed; rolling back");
        let mut cause = |state: &mut crate::coordinator::SessionState| {
            // A step never called keeps its status: there is nothing of it to compensate.
            let Some(b) = state
                .branches
                .iter_mut()
                .find(|b| b.branch_id == branch_id && b.status == BranchStatus::ActionCalled)
            else {
                return Vec::new();
            };
            b.status = status;
            b.error = Some(BranchError {
                reason: why.clone(),
                detail_json: String::new(),
            });
            b.updated_ms = now_ms();
            let write = Mutation::PutBranch(b.clone());
            state.record(action_event((branch_id, step), AttemptResult::Failed, &why, None));
            vec![write]
        };
        match self.decide_rollback_with(session, GlobalStatus::Rollbacking, DecidedBy::Saga, &mut cause) {
            Ok(durable) => {
                self.metrics.rollbacks.increment(1);
                if let Some(durable) = durable
                    && durable.await.is_err()
                {
                    return;
                }
                self.start_rollback(session);
            }
            Err(status) => tracing::debug!(status = status.as_str(), "decided before the action failed"),
        }
    }
}

/// The timeline event of one call of step `(branch_id, name)`'s action.
fn action_event(
    (branch_id, step): (u64, &str),
    result: AttemptResult,
    reason: &str,
    next_attempt_ms: Option<u64>,
) -> EventKind {
    EventKind::Action {
        branch_id,
        step: step.to_owned(),
        result,
        reason: reason.to_owned(),
        attempts: 1,
        first_ms: now_ms(),
        next_attempt_ms,
    }
}
