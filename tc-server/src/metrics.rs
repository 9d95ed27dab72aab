//! Prometheus metrics of the coordinator. Handles are registered once, so recording is a few
//! atomic operations; README.md lists every series.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::model::GlobalStatus;

/// What a message's commit came to (`ferrata_tc_messages_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageResult {
    Delivered = 0,
    DeadLettered = 1,
    /// Its barrier row said its local transaction never committed: nothing was sent.
    Dropped = 2,
}

/// Phase-2 action, as a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Commit,
    Rollback,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Commit => "commit",
            Action::Rollback => "rollback",
        }
    }
}

pub struct Metrics {
    by_status: Vec<Gauge>,
    finished: Vec<Counter>,
    pub begins: Counter,
    pub commits: Counter,
    pub rollbacks: Counter,
    pub timeouts: Counter,
    pub branch_registrations: Counter,
    pub branch_phase_one_failed: Counter,
    pub lock_conflicts: Counter,
    pub lock_waits: Counter,
    pub lock_wait_seconds: Histogram,
    pub lock_wait_timeouts: Counter,
    pub lock_fail_fast: Counter,
    pub deadlocks: Counter,
    pub locks_held: Gauge,
    pub resource_managers: Gauge,
    /// Calls made on Attach streams instead of as requests of their own.
    pub stream_calls: Counter,
    pub guarded_tables: Gauge,
    /// Finished transactions whose outcome is kept (the history, see `history.rs`).
    pub finished_kept: Gauge,
    pub guard_confirm_seconds: Histogram,
    pub guard_timeouts: Counter,
    phase2_seconds: [Histogram; 2],
    phase2_retries: [Counter; 2],
    phase2_failures: [Counter; 2],
    /// Messages by what their commit came to ([`MessageResult`]).
    messages: [Counter; 3],
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::of_namespace(None)
    }

    /// The metrics of the coordinator of `namespace` (several serving nodes, where a node
    /// also serves namespaces it adopted): its gauges of transactions carry the label
    /// `namespace`, so each coordinator's count is its own series.
    pub fn of_namespace(namespace: Option<u16>) -> Metrics {
        let metrics = Metrics::labelled(namespace);
        if namespace.is_some() {
            // Counted afresh: an adopter may have served the namespace before.
            metrics.forget_transactions();
        }
        metrics
    }

    /// Sets the gauges of this coordinator's transactions to 0: an adopter handing a
    /// namespace back stops counting them.
    pub fn forget_transactions(&self) {
        for gauge in &self.by_status {
            gauge.set(0.0);
        }
        self.finished_kept.set(0.0);
    }

    fn labelled(namespace: Option<u16>) -> Metrics {
        ferrata_rpc::process::prometheus();
        let namespace = namespace.map(|n| n.to_string());
        let per_namespace = |name: &'static str, mut labels: Vec<(&'static str, String)>| {
            labels.extend(namespace.clone().map(|n| ("namespace", n)));
            let labels: Vec<metrics::Label> = labels.into_iter().map(|(k, v)| metrics::Label::new(k, v)).collect();
            gauge!(name, labels)
        };
        let per_action =
            |name: &'static str| [Action::Commit, Action::Rollback].map(|a| counter!(name, "action" => a.label()));
        Metrics {
            by_status: GlobalStatus::ALL
                .iter()
                .map(|s| per_namespace("ferrata_tc_transactions", vec![("status", s.as_str().to_owned())]))
                .collect(),
            finished: GlobalStatus::ALL
                .iter()
                .filter(|s| s.is_final())
                .map(|s| counter!("ferrata_tc_global_finished_total", "status" => s.as_str()))
                .collect(),
            begins: counter!("ferrata_tc_global_begins_total"),
            commits: counter!("ferrata_tc_global_commits_total"),
            rollbacks: counter!("ferrata_tc_global_rollbacks_total"),
            timeouts: counter!("ferrata_tc_global_timeouts_total"),
            branch_registrations: counter!("ferrata_tc_branch_registrations_total"),
            branch_phase_one_failed: counter!("ferrata_tc_branch_phase_one_failed_total"),
            lock_conflicts: counter!("ferrata_tc_lock_conflicts_total"),
            lock_waits: counter!("ferrata_tc_lock_waits_total"),
            lock_wait_seconds: histogram!("ferrata_tc_lock_wait_seconds"),
            lock_wait_timeouts: counter!("ferrata_tc_lock_wait_timeouts_total"),
            lock_fail_fast: counter!("ferrata_tc_lock_fail_fast_total"),
            deadlocks: counter!("ferrata_tc_deadlocks_total"),
            locks_held: gauge!("ferrata_tc_locks_held"),
            resource_managers: gauge!("ferrata_tc_resource_managers"),
            stream_calls: counter!("ferrata_tc_stream_calls_total"),
            guarded_tables: gauge!("ferrata_tc_guarded_tables"),
            finished_kept: per_namespace("ferrata_tc_finished_kept", Vec::new()),
            guard_confirm_seconds: histogram!("ferrata_tc_guard_confirm_seconds"),
            guard_timeouts: counter!("ferrata_tc_guard_timeouts_total"),
            phase2_seconds: [Action::Commit, Action::Rollback]
                .map(|a| histogram!("ferrata_tc_phase2_seconds", "action" => a.label())),
            phase2_retries: per_action("ferrata_tc_phase2_retries_total"),
            phase2_failures: per_action("ferrata_tc_phase2_failures_total"),
            messages: ["delivered", "dead_lettered", "dropped"]
                .map(|r| counter!("ferrata_tc_messages_total", "result" => r)),
        }
    }

    fn slot(status: GlobalStatus) -> usize {
        GlobalStatus::ALL.iter().position(|s| *s == status).expect("listed")
    }

    /// A transaction entered `status` (`from` is where it was, if it existed).
    pub fn status(&self, from: Option<GlobalStatus>, to: Option<GlobalStatus>) {
        if let Some(from) = from {
            self.by_status[Self::slot(from)].decrement(1.0);
        }
        if let Some(to) = to {
            self.by_status[Self::slot(to)].increment(1.0);
        }
    }

    /// A transaction reached a final status.
    pub fn finished(&self, status: GlobalStatus) {
        let slot = GlobalStatus::ALL
            .iter()
            .filter(|s| s.is_final())
            .position(|s| *s == status)
            .expect("final");
        self.finished[slot].increment(1);
    }

    pub fn phase2(&self, action: Action, elapsed: Duration) {
        self.phase2_seconds[action as usize].record(elapsed.as_secs_f64());
    }

    pub fn phase2_retry(&self, action: Action) {
        self.phase2_retries[action as usize].increment(1);
    }

    pub fn phase2_failure(&self, action: Action) {
        self.phase2_failures[action as usize].increment(1);
    }

    /// A message's commit done.
    pub fn message(&self, result: MessageResult) {
        self.messages[result as usize].increment(1);
    }

    /// An operator action done (`result` ok) or refused (its error code). Looked up when
    /// used: actions are rare.
    pub fn operator_action(&self, action: &str, result: &str) {
        metrics::counter!(
            "ferrata_tc_operator_actions_total",
            "action" => action.to_owned(),
            "result" => result.to_owned()
        )
        .increment(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
