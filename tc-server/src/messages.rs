//! Transactions of messages on the coordinator: prepared whole (stored with their messages
//! before they are acknowledged, in Begin) and submitted by a commit once the application's
//! local work committed (2-phase messages); and the settling of one that outlives its timeout
//! unsubmitted, by asking its `query_prepared` URL, or a resource manager of its database to
//! check its barrier row, instead of rolling it back.
//!
//! Invariants:
//! - A prepared transaction's messages go out only after a commit: the application's
//!   submit, or its check's answer that the local work committed.
//! - A check that answers anything but a definite yes or no is asked again, with backoff,
//!   for as long as the transaction stays in Begin; a restart asks again (its timeout is
//!   still past).

use std::sync::Arc;

use tracing::Instrument;

use ferrata_rpc::pb;

use crate::calls::Outcome;
use crate::coordinator::{Coordinator, Session};
use crate::error::TcError;
use crate::model::{BranchMode, BranchRecord, BranchStatus, GlobalStatus};
use crate::msg::{self, MsgBranch};
use crate::timeline::DecidedBy;

impl Coordinator {
    /// Stores a new transaction named `name` holding `messages` (each named, or named by its
    /// position: `01`, `02`, ...), in Begin, until its commit sends them; `timeout_ms` 0:
    /// the coordinator's default. Returns its XID once it is durable.
    pub async fn prepare_messages(
        self: &Arc<Self>,
        name: String,
        timeout_ms: u64,
        mut messages: Vec<MsgBranch>,
    ) -> Result<String, TcError> {
        self.check_running()?;
        let timeout_ms = self.timeout_or_default(timeout_ms);
        self.check_limits(timeout_ms, &name)?;
        if messages.is_empty() || messages.len() > crate::saga::MAX_STEPS {
            return Err(TcError::invalid(format!(
                "a transaction of messages holds 1 to {} messages",
                crate::saga::MAX_STEPS
            )));
        }
        let mut urls = Vec::new();
        for (i, m) in messages.iter_mut().enumerate() {
            if m.name.is_empty() {
                m.name = format!("{:02}", i + 1);
            }
            if let Some(why) = m.invalid(&self.caller) {
                return Err(TcError::invalid(format!("message {i}: {why}")));
            }
            urls.push(m.target.clone());
            if !m.query_prepared.is_empty() {
                urls.push(m.query_prepared.clone());
            }
        }
        let mut names: Vec<&str> = messages.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(TcError::invalid(format!("two messages are named {:?}", twice[0])));
        }
        self.caller
            .resolves(urls.iter().map(String::as_str))
            .await
            .map_err(TcError::invalid)?;
        let max = self.config.transactions.max_application_data;
        let record = self.new_record(name, timeout_ms).await?;
        let (txn_id, now) = (record.txn_id, record.begin_ms);
        let mut branches = Vec::with_capacity(messages.len());
        for m in messages {
            let application_data = m.encode();
            if application_data.len() > max {
                return Err(TcError::invalid(format!(
                    "message {:?} is {} bytes as stored; at most {max} are allowed",
                    m.name,
                    application_data.len()
                )));
            }
            branches.push(BranchRecord {
                txn_id,
                branch_id: self.ids.next().await?,
                resource_id: crate::calls::origin(&m.target).to_owned(),
                lock_keys: Vec::new(),
                application_data,
                status: BranchStatus::Registered,
                registered_ms: now,
                updated_ms: now,
                error: None,
                mode: BranchMode::Msg,
                connection_id: 0,
                instance_id: String::new(),
            });
        }
        let (session, durable) = self.open_session(record, branches);
        if let Some(durable) = durable {
            durable.await?;
        }
        tracing::debug!(xid = session.xid, "messages prepared");
        Ok(session.xid.clone())
    }

    /// Adds `messages`, which an outbox wrote in a local transaction of global transaction
    /// `xid` (in Begin), to it: each goes with the transaction's decision, and its commit
    /// first asks its barrier row (`check_barrier` on `check_resource`) whether that local
    /// transaction committed. Each is registered (and durable) in turn: one registered
    /// before a later one was refused is dropped at the commit, as its local transaction
    /// then never commits the barrier row (a hand-over that failed is tried again with a new
    /// barrier).
    pub async fn join_messages(self: &Arc<Self>, xid: &str, messages: Vec<MsgBranch>) -> Result<(), TcError> {
        if messages.is_empty() || messages.len() > crate::saga::MAX_STEPS {
            return Err(TcError::invalid(format!(
                "a hand-over holds 1 to {} messages",
                crate::saga::MAX_STEPS
            )));
        }
        // All checked before any is registered.
        for (i, m) in messages.iter().enumerate() {
            let barrier = &m.check_barrier;
            if m.name.is_empty() || m.check_resource.is_empty() || barrier.is_empty() {
                return Err(TcError::invalid(
                    "messages joining a global transaction need a name, a resource and a barrier",
                ));
            }
            if barrier.len() > 128 || barrier.chars().any(char::is_control) {
                return Err(TcError::invalid(
                    "the barrier is a branch_id of the barrier table: at most 128 bytes, no control characters",
                ));
            }
            if let Some(why) = m.invalid(&self.caller) {
                return Err(TcError::invalid(format!("message {i}: {why}")));
            }
        }
        for m in messages {
            self.register(pb::BranchRegisterRequest {
                xid: xid.to_owned(),
                branch_type: pb::BranchType::Msg as i32,
                application_data: m.encode(),
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    /// Has a resource manager of `resource` check the barrier row of messages (gid `xid`,
    /// branch_id `barrier` (CHECK_BARRIER), `00` if empty (CHECK_PREPARED)): whether their
    /// local transaction committed.
    pub(crate) async fn ask_barrier(&self, resource: &str, xid: &str, barrier: &str) -> Outcome {
        let action = match barrier.is_empty() {
            true => pb::Phase2Action::CheckPrepared,
            false => pb::Phase2Action::CheckBarrier,
        };
        let branch = pb::BranchRef {
            xid: xid.to_owned(),
            resource_id: resource.to_owned(),
            branch_type: pb::BranchType::Msg as i32,
            application_data: barrier.as_bytes().to_vec(),
            ..Default::default()
        };
        let timeout = self.config.phase2.call_timeout();
        match self.rms.call(resource, action, vec![branch], None, timeout).await {
            Ok(outcomes) => msg::checked(outcomes.first()),
            Err(e) => Outcome::Retry(e.to_string()),
        }
    }

    /// The check of a transaction past its timeout in Begin, if it has one: a message with
    /// a `query_prepared` URL.
    pub(crate) fn prepared_check(session: &Session) -> Option<MsgBranch> {
        let state = session.state.lock();
        state
            .branches
            .iter()
            .filter(|b| b.mode == BranchMode::Msg)
            .filter_map(|b| MsgBranch::decode(&b.application_data).ok())
            .find(MsgBranch::has_check)
    }

    /// Starts settling a transaction that outlived its timeout unsubmitted, by its check.
    pub(crate) fn start_settling(self: &Arc<Self>, session: Arc<Session>, check: MsgBranch) {
        let span = tracing::info_span!("settle", xid = session.xid);
        self.tasks
            .spawn(Arc::clone(self).settle(session, check).instrument(span));
    }

    /// Asks `check`'s `query_prepared` until it says yes (the transaction commits: its
    /// messages go out) or no (it rolls back: they are dropped), as long as the transaction
    /// is in Begin.
    async fn settle(self: Arc<Self>, session: Arc<Session>, check: MsgBranch) {
        let timeout = self.config.calls.request_timeout();
        let mut attempt = 0;
        loop {
            if session.state.lock().record.status != GlobalStatus::Begin {
                return;
            }
            let ask = async {
                if !check.query_prepared.is_empty() {
                    return msg::query_prepared(&self.caller, timeout, &session.xid, &check).await;
                }
                self.ask_barrier(&check.check_resource, &session.xid, "").await
            };
            let answer = tokio::select! {
                answer = ask => answer,
                _ = self.shutdown.cancelled() => return,
            };
            if let Outcome::Retry(why) = &answer {
                tracing::debug!(reason = why, "its check gave no definite answer; asking again");
            }
            match answer {
                Outcome::Success => {
                    tracing::info!("its check says the local work committed; sending its messages");
                    if let Err(e) = self.commit_now(&session.xid, DecidedBy::Check).await {
                        tracing::warn!(error = %e, "the commit its check asked for was not stored");
                    }
                    return;
                }
                Outcome::Failure(why) | Outcome::Gone(why) => {
                    tracing::info!(
                        reason = why,
                        "its check says the local work did not commit; dropping its messages"
                    );
                    let Ok(durable) =
                        self.decide_rollback(&session, GlobalStatus::TimeoutRollbacking, DecidedBy::Check)
                    else {
                        return;
                    };
                    let stored = match durable {
                        Some(durable) => durable.await.is_ok(),
                        None => true,
                    };
                    if stored {
                        self.start_rollback(&session);
                    }
                    return;
                }
                Outcome::Ongoing | Outcome::Retry(_) => {}
            }
            let wait = self.config.phase2.backoff(attempt);
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = session.wake.notified() => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }
}

/// Where one message stands, for its receiver (`GET /v1/notifications/{xid}/{name}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// `prepared` (its transaction is not decided), `pending` (being delivered), `delivered`,
    /// `dead_lettered` (waiting for an operator), or `dropped` (its transaction rolled back).
    pub status: &'static str,
    /// Why it is dead-lettered.
    pub reason: Option<String>,
    /// The URLs whose endpoints' secrets may sign its receiver's question: its target while
    /// it is pending, else the origins of its transaction's HTTP branches.
    pub signers: Vec<String>,
}

impl Coordinator {
    /// Where message `name` of transaction `xid` stands. While it waits for delivery (or an
    /// operator) it is found by its name; once delivered or dropped, its transaction's
    /// outcome tells (committed: delivered), as the transaction keeps no message it is done
    /// with.
    pub fn notification(&self, xid: &str, name: &str) -> Result<Notification, TcError> {
        let view = self.get(xid)?;
        let (_, events) = self.events(xid)?;
        let origins: Vec<String> = events
            .iter()
            .filter_map(|e| match &e.kind {
                crate::timeline::EventKind::BranchRegistered { resource_id, .. } if resource_id.contains("://") => {
                    Some(resource_id.clone())
                }
                _ => None,
            })
            .collect();
        let message = view
            .branches
            .iter()
            .filter(|b| b.mode == BranchMode::Msg)
            .filter_map(|b| MsgBranch::decode(&b.application_data).ok().map(|m| (b, m)))
            .find(|(_, m)| m.name == name);
        let status = view.record.status;
        let committed = matches!(
            status,
            GlobalStatus::Committing
                | GlobalStatus::AsyncCommitting
                | GlobalStatus::Committed
                | GlobalStatus::CommitFailed
        );
        let (status, reason, signers) = match message {
            _ if status == GlobalStatus::Begin => ("prepared", None, origins),
            Some((b, m)) if b.status == BranchStatus::CommitFailedUnretryable => (
                "dead_lettered",
                b.error.as_ref().map(|e| e.reason.clone()),
                vec![m.target],
            ),
            Some((_, m)) if committed => ("pending", None, vec![m.target]),
            _ if committed => ("delivered", None, origins),
            _ => ("dropped", None, origins),
        };
        Ok(Notification {
            status,
            reason,
            signers,
        })
    }
}
