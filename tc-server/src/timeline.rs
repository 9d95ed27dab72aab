//! The timeline of one global transaction: what happened to it, when and by whose decision,
//! as an append-only event log, and its `version`, which every change bumps.
//!
//! A transaction's timeline lives with it: in its session while it runs, stored with the
//! session's next write (`Mutation::PutEvents` in the same batch), and kept with what is
//! remembered of it once it ends, for as long as that is. So an event is durable as soon as
//! the change it precedes is; one that no write followed yet (a branch commit in the middle
//! of an asynchronous commit, a retry) can be lost in a crash, and the restarted coordinator
//! then records `restored`.
//!
//! Repeated phase-2 retries of one branch with the same outcome are one event with a count
//! (`attempts`, first and last time), so a rollback retried for days keeps a short timeline.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::model::GlobalStatus;
use crate::store::Mutation;

/// More events than this and retries are folded whatever their reason (see [`Timeline::record`]).
const MAX_EVENTS: usize = 1000;

/// One entry of a timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The transaction's version once this event happened.
    pub version: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    pub kind: EventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Begun {
        name: String,
        timeout_ms: u64,
    },
    /// A branch's rows were queued behind other transactions before they were granted.
    LockWaited {
        branch_id: u64,
        /// XIDs of the transactions that held the rows meanwhile.
        holders: Vec<String>,
        waited_ms: u64,
    },
    BranchRegistered {
        branch_id: u64,
        resource_id: String,
        lock_keys: u64,
    },
    /// A branch was refused (lock wait timeout, deadlock, a rolling-back holder, guards).
    RegistrationRefused {
        resource_id: String,
        code: String,
        message: String,
        holder: Option<String>,
    },
    PhaseOneFailed {
        branch_id: u64,
        reason: String,
    },
    Decided {
        decision: Decision,
        by: DecidedBy,
    },
    /// A phase-2 call for one branch that succeeded, or failed and will be retried; repeats
    /// with the same outcome are folded into one event.
    PhaseTwo {
        branch_id: u64,
        resource_id: String,
        action: Decision,
        result: AttemptResult,
        reason: String,
        attempts: u32,
        first_ms: u64,
        next_attempt_ms: Option<u64>,
    },
    /// A branch can never finish phase 2 as is; for a rollback of rows changed outside the
    /// global transaction (a dirty rollback) `detail` holds the rows.
    PhaseTwoFailed {
        branch_id: u64,
        resource_id: String,
        action: Decision,
        reason: String,
        detail_json: String,
    },
    /// Rows released: one branch's (rolled back, or failed in phase 1) or, without a
    /// branch, all the transaction's.
    LocksReleased {
        branch_id: Option<u64>,
        rows: u64,
    },
    /// See the audit record `audit_id` for everything about it.
    OperatorAction {
        action: String,
        actor: String,
        reason: String,
        audit_id: u64,
    },
    /// A restarted coordinator took the transaction over from the store.
    Restored {
        status: GlobalStatus,
    },
    Finished {
        status: GlobalStatus,
    },
    // (New kinds go last: stored events name their kind by position.)
    /// The branch registered just before is an XA branch, run on this database connection.
    XaBranch {
        branch_id: u64,
        connection_id: u64,
    },
    /// An XA branch's database prepared it.
    BranchPrepared {
        branch_id: u64,
    },
    /// An XA branch wrote nothing and was finished in phase 1.
    BranchReadOnly {
        branch_id: u64,
    },
    /// A call of a saga step's action that succeeded, refused, or will be retried; retries
    /// with the same outcome are folded into one event.
    Action {
        branch_id: u64,
        step: String,
        result: AttemptResult,
        reason: String,
        attempts: u32,
        first_ms: u64,
        next_attempt_ms: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Commit,
    Rollback,
}

/// Who decided the transaction's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    /// The application, through a proxy or the API.
    Application,
    /// The coordinator, because the transaction outlived its timeout in Begin.
    Timeout,
    /// An operator (the name the request authenticated as).
    Operator(String),
    /// A saga's steps: every action succeeded, or one refused (or ran out of retries).
    Saga,
    /// The answer of a prepared transaction's check (its `query_prepared`), asked once it
    /// outlived its timeout unsubmitted.
    Check,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptResult {
    Done,
    Retry,
    /// A saga action refused, or ran out of retries.
    Failed,
}

impl Event {
    /// The API's form: `{"version", "at_ms", "type": "branch_registered", ...fields}`.
    pub fn to_json(&self) -> Value {
        let mut out = json!({ "version": self.version, "at_ms": self.at_ms });
        // Serde's externally tagged form of a struct variant: {"Variant": {fields}}.
        if let Ok(Value::Object(tagged)) = serde_json::to_value(&self.kind)
            && let Some((variant, Value::Object(fields))) = tagged.into_iter().next()
        {
            out["type"] = Value::String(snake_case(&variant));
            for (k, v) in fields {
                out[k] = v;
            }
        }
        if let EventKind::Decided { by, .. } = &self.kind {
            out["by"] = match by {
                DecidedBy::Application => json!("application"),
                DecidedBy::Timeout => json!("timeout"),
                DecidedBy::Operator(_) => json!("operator"),
                DecidedBy::Saga => json!("saga"),
                DecidedBy::Check => json!("check"),
            };
            if let DecidedBy::Operator(name) = by {
                out["actor"] = json!(name);
            }
        }
        if let EventKind::PhaseTwoFailed { detail_json, .. } = &self.kind {
            out["detail"] = serde_json::from_str(detail_json).unwrap_or(Value::Null);
            if let Some(o) = out.as_object_mut() {
                o.remove("detail_json");
            }
        }
        if let EventKind::Restored { status } | EventKind::Finished { status } = &self.kind {
            out["status"] = json!(status.as_str());
        }
        out
    }
}

fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A retry's event: its branch, which call (a phase-2 decision, or none for a saga action),
/// its reason, and what a repeat updates: the attempt count, the reason and the next attempt.
struct RetryOf<'a> {
    branch_id: u64,
    call: Option<Decision>,
    reason: &'a mut String,
    attempts: &'a mut u32,
    next_attempt_ms: &'a mut Option<u64>,
}

fn retry_of(kind: &mut EventKind) -> Option<RetryOf<'_>> {
    match kind {
        EventKind::PhaseTwo {
            branch_id,
            action,
            result: AttemptResult::Retry,
            reason,
            attempts,
            next_attempt_ms,
            ..
        } => Some(RetryOf {
            branch_id: *branch_id,
            call: Some(*action),
            reason,
            attempts,
            next_attempt_ms,
        }),
        EventKind::Action {
            branch_id,
            result: AttemptResult::Retry,
            reason,
            attempts,
            next_attempt_ms,
            ..
        } => Some(RetryOf {
            branch_id: *branch_id,
            call: None,
            reason,
            attempts,
            next_attempt_ms,
        }),
        _ => None,
    }
}

/// A transaction's events and version, and which events the store does not have yet.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    events: Vec<Event>,
    version: u64,
    /// Events from this index on were added or changed since the last store write.
    unsaved_from: usize,
}

impl Timeline {
    /// A timeline as the store held it.
    pub fn restore(events: Vec<Event>) -> Timeline {
        Timeline {
            version: events.iter().map(|e| e.version).max().unwrap_or(0),
            unsaved_from: events.len(),
            events,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Whether an operator's latest pause or resume was a pause.
    pub fn paused(&self) -> bool {
        self.events.iter().rev().find_map(|e| match &e.kind {
            EventKind::OperatorAction { action, .. } if action == "pause" => Some(true),
            EventKind::OperatorAction { action, .. } if action == "resume" || action == "retry" => Some(false),
            _ => None,
        }) == Some(true)
    }

    pub fn into_events(self) -> Vec<Event> {
        self.events
    }

    /// Records `kind` happening now, bumping the version. A phase-2 retry of the branch the
    /// last event retried, with the same reason (or any reason once the timeline is long),
    /// updates that event instead.
    pub fn record(&mut self, kind: EventKind) {
        self.record_at(kind, crate::model::now_ms());
    }

    fn record_at(&mut self, kind: EventKind, at_ms: u64) {
        self.version += 1;
        let version = self.version;
        let mut kind = kind;
        if let Some(new) = retry_of(&mut kind) {
            // The latest retry of this call among the retries the timeline ends with (the
            // branches of one transaction retry in turn).
            let (branch_id, call) = (new.branch_id, new.call);
            let (reason, next) = (new.reason.clone(), *new.next_attempt_ms);
            let long = self.events.len() >= MAX_EVENTS;
            let trailing = self
                .events
                .iter_mut()
                .rev()
                .map_while(|e| retry_of(&mut e.kind))
                .count();
            let start = self.events.len() - trailing;
            let same = self.events[start..].iter_mut().rposition(|e| {
                retry_of(&mut e.kind)
                    .is_some_and(|r| (r.branch_id, r.call) == (branch_id, call) && (*r.reason == reason || long))
            });
            if let Some(i) = same.map(|i| start + i) {
                let last = &mut self.events[i];
                let r = retry_of(&mut last.kind).expect("found as a retry");
                *r.attempts += 1;
                *r.reason = reason;
                *r.next_attempt_ms = next;
                last.at_ms = at_ms;
                last.version = version;
                self.unsaved_from = self.unsaved_from.min(i);
                return;
            }
        }
        self.events.push(Event { version, at_ms, kind });
    }

    /// Where the events the store does not have yet begin.
    pub fn unsaved_from(&self) -> usize {
        self.unsaved_from
    }

    /// The events from `index` on were not stored after all (their write was refused): they
    /// go with the transaction's next write.
    pub fn unsaved_again_from(&mut self, index: usize) {
        self.unsaved_from = self.unsaved_from.min(index);
    }

    /// The events the store does not have yet, as the mutation that stores them (to go in
    /// the same batch as the transaction's write), or `None`.
    pub fn unsaved(&mut self, txn_id: u64) -> Option<Mutation> {
        if self.unsaved_from >= self.events.len() {
            return None;
        }
        let first = self.unsaved_from as u32;
        let events = self.events[self.unsaved_from..].to_vec();
        self.unsaved_from = self.events.len();
        Some(Mutation::PutEvents { txn_id, first, events })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(branch_id: u64, reason: &str, next: u64) -> EventKind {
        EventKind::PhaseTwo {
            branch_id,
            resource_id: "db".into(),
            action: Decision::Rollback,
            result: AttemptResult::Retry,
            reason: reason.into(),
            attempts: 1,
            first_ms: 0,
            next_attempt_ms: Some(next),
        }
    }

    fn stored(m: Option<Mutation>) -> (u32, Vec<u64>) {
        match m {
            Some(Mutation::PutEvents { first, events, .. }) => (first, events.iter().map(|e| e.version).collect()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_change_bumps_the_version_and_is_stored_once() {
        let mut t = Timeline::default();
        t.record_at(
            EventKind::Begun {
                name: "order".into(),
                timeout_ms: 1000,
            },
            10,
        );
        t.record_at(
            EventKind::Decided {
                decision: Decision::Rollback,
                by: DecidedBy::Timeout,
            },
            20,
        );
        assert_eq!(t.version(), 2);
        assert_eq!(stored(t.unsaved(7)), (0, vec![1, 2]));
        assert_eq!(t.unsaved(7), None, "nothing new");
        t.record_at(retry(3, "unreachable", 100), 30);
        assert_eq!(stored(t.unsaved(7)), (2, vec![3]));
    }

    #[test]
    fn repeated_retries_of_a_branch_are_one_event_with_a_count() {
        let mut t = Timeline::default();
        t.record_at(retry(3, "unreachable", 100), 30);
        t.unsaved(1);
        t.record_at(retry(3, "unreachable", 200), 40);
        t.record_at(retry(3, "unreachable", 300), 50);
        assert_eq!(t.events().len(), 1);
        assert_eq!(t.version(), 3, "each attempt is a change");
        let e = &t.events()[0];
        assert_eq!((e.at_ms, e.version), (50, 3));
        let EventKind::PhaseTwo {
            attempts,
            next_attempt_ms,
            first_ms,
            ..
        } = &e.kind
        else {
            panic!()
        };
        assert_eq!((*attempts, *next_attempt_ms, *first_ms), (3, Some(300), 0));
        // The folded event is stored again, under its own index.
        assert_eq!(stored(t.unsaved(1)), (0, vec![3]));
        // Another reason, or another branch, is a new event.
        t.record_at(retry(3, "timed out", 400), 60);
        t.record_at(retry(4, "timed out", 400), 60);
        assert_eq!(t.events().len(), 3);
    }

    #[test]
    fn branches_retrying_in_turn_fold_each_into_its_own_event() {
        let mut t = Timeline::default();
        for n in 0..10 {
            t.record_at(retry(1, "busy", n), n);
            t.record_at(retry(2, "busy", n), n);
        }
        assert_eq!(t.events().len(), 2);
        assert!(
            t.events()
                .iter()
                .all(|e| matches!(e.kind, EventKind::PhaseTwo { attempts: 10, .. }))
        );
        // Something else in between starts new ones.
        t.record_at(
            EventKind::Restored {
                status: GlobalStatus::RollbackRetrying,
            },
            20,
        );
        t.record_at(retry(1, "busy", 21), 21);
        assert_eq!(t.events().len(), 4);
    }

    #[test]
    fn a_long_timeline_folds_retries_whatever_their_reason() {
        let mut t = Timeline::default();
        for i in 0..MAX_EVENTS as u64 {
            t.record_at(
                EventKind::BranchRegistered {
                    branch_id: i,
                    resource_id: "db".into(),
                    lock_keys: 1,
                },
                i,
            );
        }
        for i in 0..50 {
            t.record_at(retry(1, &format!("reason {}", i % 2), 0), 0);
        }
        assert_eq!(t.events().len(), MAX_EVENTS + 1);
    }

    #[test]
    fn restored_timelines_keep_their_version() {
        let mut t = Timeline::default();
        t.record_at(retry(3, "x", 1), 1);
        t.record_at(retry(3, "x", 2), 2);
        let events = t.into_events();
        let mut t = Timeline::restore(events);
        assert_eq!(t.version(), 2);
        assert_eq!(t.unsaved(1), None);
        t.record_at(
            EventKind::Restored {
                status: GlobalStatus::RollbackRetrying,
            },
            5,
        );
        assert_eq!(stored(t.unsaved(1)), (1, vec![3]));
    }

    #[test]
    fn the_api_form_is_flat_and_snake_case() {
        let e = Event {
            version: 4,
            at_ms: 9,
            kind: EventKind::Decided {
                decision: Decision::Rollback,
                by: DecidedBy::Operator("alice".into()),
            },
        };
        assert_eq!(
            e.to_json(),
            json!({"version": 4, "at_ms": 9, "type": "decided", "decision": "rollback", "by": "operator", "actor": "alice"})
        );
        let e = Event {
            version: 5,
            at_ms: 10,
            kind: EventKind::PhaseTwoFailed {
                branch_id: 2,
                resource_id: "db".into(),
                action: Decision::Rollback,
                reason: "dirty".into(),
                detail_json: r#"{"rows":[]}"#.into(),
            },
        };
        let j = e.to_json();
        assert_eq!(j["type"], "phase_two_failed");
        assert_eq!(j["detail"], json!({"rows": []}));
        assert!(j.get("detail_json").is_none());
        let e = Event {
            version: 6,
            at_ms: 11,
            kind: EventKind::Finished {
                status: GlobalStatus::Rollbacked,
            },
        };
        assert_eq!(e.to_json()["status"], "Rollbacked");
    }
}
