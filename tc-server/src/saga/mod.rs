//! Saga steps: a service's action, which the coordinator calls forward in the saga's order,
//! and its compensation, which it calls on a rollback, for every step whose action may have
//! run (its own included when the action refused), last step first.
//!
//! A saga comes whole, its steps in the order they were given, each after the one before it,
//! or with `concurrent` after the steps its `orders` name (a graph without cycles). The steps
//! are stored as branches in an order that keeps every step after those it waits for, so a
//! rollback that compensates branches last registered first never compensates a step before
//! a step that waited for it. Each step's calls are stored as its `application_data`, JSON
//! ([`SagaStep`]); the calls carry DTM's query parameters (`trans_type=saga`, `op=action` or
//! `compensate`), so a DTM barrier (or `BEGIN BRANCH` through ferrata-proxy) in the service
//! sees which call it is.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrata_rpc::pb;
use serde::{Deserialize, Serialize};

use crate::calls::branch::{self, Ids, Payload};
use crate::calls::{Caller, Outcome};

/// Most steps in one saga.
pub const MAX_STEPS: usize = 1000;

/// Longest retry interval a saga may ask for (an hour).
pub const MAX_RETRY_INTERVAL_MS: u64 = 3_600_000;

/// One step of a saga, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStep {
    /// The step's id in its saga: its position as given, from `01` (DTM's `branch_id`).
    pub name: String,
    pub action: String,
    /// Empty: the step has nothing to undo (DTM's convention for a last, must-succeed step).
    pub compensate: String,
    /// The steps (by name) whose actions must have succeeded before this one's is called.
    #[serde(default)]
    pub after: Vec<String>,
    /// What both calls carry.
    #[serde(flatten)]
    pub payload: Payload,
    /// The first retry's delay (`[phase2] retry_initial_ms` if unset), doubling up to `[phase2]
    /// retry_max_ms`; an ONGOING answer is asked again at this pace without doubling.
    #[serde(default)]
    pub retry_interval_ms: Option<u64>,
    /// After this many retries of its action without a definite answer the saga rolls back
    /// (unset: retried until the saga's timeout, if it has one).
    #[serde(default)]
    pub retry_limit: Option<u32>,
}

impl SagaStep {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a saga step serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<SagaStep, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("a saga step's stored calls do not read: {e}"))
    }
}

/// A step as asked for.
#[derive(Clone, Debug, Default)]
pub struct StepRequest {
    pub action: String,
    pub compensate: String,
    pub payload: Payload,
}

/// Settings every step of a saga shares.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Steps wait only for the steps `orders` names (by 0-based position), not for the one
    /// before them.
    pub concurrent: bool,
    /// With `concurrent`: step position → the positions it waits for.
    pub orders: BTreeMap<usize, Vec<usize>>,
    pub retry_interval_ms: Option<u64>,
    pub retry_limit: Option<u32>,
}

/// The steps of a saga as they are stored: named by their position, each after the steps it
/// waits for. `Err` says what is wrong with the request.
pub fn plan(steps: Vec<StepRequest>, options: &Options, caller: &Caller) -> Result<Vec<SagaStep>, String> {
    let n = steps.len();
    if n == 0 || n > MAX_STEPS {
        return Err(format!("a saga needs 1 to {MAX_STEPS} steps; this one has {n}"));
    }
    if !options.concurrent && !options.orders.is_empty() {
        return Err("orders are only read for a concurrent saga (\"concurrent\": true)".into());
    }
    if options
        .retry_interval_ms
        .is_some_and(|ms| ms == 0 || ms > MAX_RETRY_INTERVAL_MS)
    {
        return Err(format!("retry_interval_ms must be 1 to {MAX_RETRY_INTERVAL_MS}"));
    }
    let mut waits_for: Vec<Vec<usize>> = (0..n).map(|i| if i == 0 { vec![] } else { vec![i - 1] }).collect();
    if options.concurrent {
        waits_for = vec![Vec::new(); n];
        for (&step, before) in &options.orders {
            for &b in before {
                if step >= n || b >= n {
                    return Err(format!(
                        "orders name step {} of a saga of {n} steps (steps count from 0)",
                        step.max(b)
                    ));
                }
                if !waits_for[step].contains(&b) {
                    waits_for[step].push(b);
                }
            }
        }
    }
    let order = topological(&waits_for)
        .ok_or_else(|| "the orders make a cycle: some step would wait for itself".to_string())?;
    let name = |i: usize| format!("{:02}", i + 1);
    let mut steps: Vec<Option<StepRequest>> = steps.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(n);
    for i in order {
        let step = steps[i].take().expect("each position once");
        if let Err(why) = caller.allows(&step.action) {
            return Err(format!("step {i} action: {why}"));
        }
        if !step.compensate.is_empty()
            && let Err(why) = caller.allows(&step.compensate)
        {
            return Err(format!("step {i} compensate: {why}"));
        }
        if let Some(why) = step.payload.invalid() {
            return Err(format!("step {i}: {why}"));
        }
        out.push(SagaStep {
            name: name(i),
            action: step.action,
            compensate: step.compensate,
            after: waits_for[i].iter().map(|&b| name(b)).collect(),
            payload: step.payload,
            retry_interval_ms: options.retry_interval_ms,
            retry_limit: options.retry_limit,
        });
    }
    Ok(out)
}

/// Positions in an order that puts every step after those it waits for (the lowest position
/// first among the ready ones); `None` if they make a cycle.
fn topological(waits_for: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = waits_for.len();
    let mut left: Vec<usize> = waits_for.iter().map(Vec::len).collect();
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| left[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for (j, before) in waits_for.iter().enumerate() {
            if before.contains(&i) {
                left[j] -= 1;
                if left[j] == 0 {
                    ready.insert(j);
                }
            }
        }
    }
    (order.len() == n).then_some(order)
}

/// What one call of a step's action came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionResult {
    Done,
    /// Refused for good (409, FAILURE, 410): the saga rolls back.
    Failed(String),
    /// No definite answer; asked again. `ongoing`: the service said it is still working.
    Again {
        ongoing: bool,
        why: String,
    },
}

/// Calls the action of `step` of saga `xid` once.
pub async fn action(caller: &Caller, default_timeout: Duration, xid: &str, step: &SagaStep) -> ActionResult {
    let ids = Ids {
        xid,
        trans_type: "saga",
        name: &step.name,
        op: "action",
    };
    let message_id = step.payload.named(ids).message_id();
    let call = step.payload.call(&step.action, ids, &message_id, default_timeout);
    match caller.call(&call).await {
        Outcome::Success => ActionResult::Done,
        Outcome::Failure(why) | Outcome::Gone(why) => ActionResult::Failed(format!("action at {}: {why}", step.action)),
        Outcome::Ongoing => ActionResult::Again {
            ongoing: true,
            why: "action answered ONGOING; asked again".into(),
        },
        Outcome::Retry(why) => ActionResult::Again {
            ongoing: false,
            why: format!("action at {}: {why}", step.action),
        },
    }
}

/// The delay before retry number `attempt` (0-based) of `step`'s action: `interval` (the
/// step's, or the coordinator's first retry delay) doubling up to `max`; an ONGOING answer
/// keeps the interval.
pub fn retry_delay(step: &SagaStep, attempt: u32, ongoing: bool, initial: Duration, max: Duration) -> Duration {
    let interval = step.retry_interval_ms.map_or(initial, Duration::from_millis);
    if ongoing {
        return interval;
    }
    interval.saturating_mul(1u32 << attempt.min(20)).min(max.max(interval))
}

/// Phase 2 of one saga step: its compensation (a saga never commits a step: its action was
/// its work), once, as a resource manager would answer it.
pub async fn compensate(caller: &Caller, default_timeout: Duration, b: &pb::BranchRef) -> pb::BranchOutcome {
    let again = pb::BranchStatus::RollbackFailedRetryable;
    let step = match SagaStep::decode(&b.application_data) {
        Ok(step) => step,
        Err(why) => return pb::BranchOutcome::of(b.branch_id, again, why),
    };
    let ids = Ids {
        xid: &b.xid,
        trans_type: "saga",
        name: &step.name,
        op: "compensate",
    };
    match branch::settle(caller, &step.payload, &step.compensate, ids, default_timeout).await {
        Ok(()) => pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::PhaseTwoRollbacked, ""),
        Err(why) => pb::BranchOutcome::of(b.branch_id, again, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(n: usize) -> Vec<StepRequest> {
        (0..n)
            .map(|i| StepRequest {
                action: format!("http://svc/a{i}"),
                compensate: format!("http://svc/c{i}"),
                payload: Payload::default(),
            })
            .collect()
    }

    fn caller() -> Caller {
        Caller::new(&crate::config::Calls::default()).unwrap()
    }

    #[test]
    fn an_ordered_saga_waits_step_by_step() {
        let planned = plan(steps(3), &Options::default(), &caller()).unwrap();
        let names: Vec<(&str, Vec<String>)> = planned.iter().map(|s| (s.name.as_str(), s.after.clone())).collect();
        assert_eq!(
            names,
            [
                ("01", vec![]),
                ("02", vec!["01".to_string()]),
                ("03", vec!["02".to_string()])
            ]
        );
        assert_eq!(SagaStep::decode(&planned[1].encode()).unwrap(), planned[1]);
    }

    #[test]
    fn a_concurrent_saga_is_stored_in_an_order_that_respects_its_graph() {
        // Step 0 waits for 2, step 1 for 0: stored 2, 0, 1 (then 3, which waits for nothing,
        // comes as soon as it is ready: lowest position first).
        let options = Options {
            concurrent: true,
            orders: BTreeMap::from([(0, vec![2]), (1, vec![0])]),
            ..Options::default()
        };
        let planned = plan(steps(4), &options, &caller()).unwrap();
        let names: Vec<&str> = planned.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["03", "01", "02", "04"]);
        assert_eq!(planned[1].after, ["03"]);
        let cycle = Options {
            concurrent: true,
            orders: BTreeMap::from([(0, vec![1]), (1, vec![0])]),
            ..Options::default()
        };
        assert!(plan(steps(2), &cycle, &caller()).unwrap_err().contains("cycle"));
        let outside = Options {
            concurrent: true,
            orders: BTreeMap::from([(0, vec![5])]),
            ..Options::default()
        };
        assert!(plan(steps(2), &outside, &caller()).is_err());
    }

    #[test]
    fn bad_steps_are_refused() {
        assert!(plan(vec![], &Options::default(), &caller()).is_err());
        let mut s = steps(1);
        s[0].action = "ftp://svc/a".into();
        assert!(plan(s, &Options::default(), &caller()).unwrap_err().contains("action"));
        let mut s = steps(1);
        s[0].compensate = String::new();
        assert!(plan(s, &Options::default(), &caller()).is_ok(), "nothing to undo");
        let unordered = Options {
            orders: BTreeMap::from([(1, vec![0])]),
            ..Options::default()
        };
        assert!(plan(steps(2), &unordered, &caller()).is_err());
    }

    #[test]
    fn retries_double_but_ongoing_keeps_its_pace() {
        let mut step = plan(steps(1), &Options::default(), &caller()).unwrap().remove(0);
        let (initial, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<u128> = (0..6)
            .map(|a| retry_delay(&step, a, false, initial, max).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(retry_delay(&step, 5, true, initial, max), initial);
        step.retry_interval_ms = Some(5000);
        assert_eq!(
            retry_delay(&step, 3, false, initial, max),
            Duration::from_millis(5000),
            "never below the step's own interval"
        );
    }
}
