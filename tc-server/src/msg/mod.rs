//! Messages: branches the coordinator delivers over HTTP once their transaction commits, and
//! drops when it rolls back. A message registered into a transaction (the DTM API's `msg`,
//! a native transaction's `/messages`, or the outbox of ferrata-proxy) is stored with its
//! target, its body and its delivery policy as its `application_data`, JSON ([`MsgBranch`]);
//! its commit is one POST to the target with DTM's query parameters (`op=action`) and the
//! signing headers (`webhook-id` its key, if it has one), retried on its policy's schedule
//! (`ferrata_rpc::policy`), honouring `Retry-After`. When the schedule ends, or the receiver answers
//! 410 Gone, the message is dead-lettered: its branch fails for good and the transaction
//! waits in CommitFailed for an operator, who can replay it (retry).
//!
//! A transaction of messages may be prepared first and submitted after the application's
//! local work committed (2-phase messages); one that outlives its timeout unsubmitted is
//! settled by asking its `query_prepared` URL, or a resource manager of its database to
//! check its barrier row, instead of being rolled back.

use std::time::Duration;

use ferrata_rpc::pb;
use serde::{Deserialize, Serialize};

use crate::calls::branch::{Ids, Payload};
use crate::calls::{Caller, Outcome};
use ferrata_rpc::policy::Policy;

/// Longest message name (DTM's `branch_id` column) and key.
const MAX_NAME: usize = 128;
/// Longest delay before a message's first attempt.
pub const MAX_DELAY_MS: u64 = 7 * 24 * 3_600_000;

/// One message, as registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgBranch {
    /// The message's name in its transaction (DTM's `branch_id`); the coordinator's branch
    /// id when the registration named none.
    pub name: String,
    /// The URL it is delivered to.
    pub target: String,
    /// Its body, headers and time limit per attempt.
    #[serde(flatten)]
    pub payload: Payload,
    /// Its delivery policy ([`Policy::parse`]); empty: the default.
    #[serde(default)]
    pub policy: String,
    /// Its `webhook-id`, the same on every attempt, by which receivers drop repeats; empty:
    /// `<xid>.<name>.action`.
    #[serde(default)]
    pub key: String,
    /// How long after the commit its first attempt is made.
    #[serde(default)]
    pub delay_ms: u64,
    /// Where the coordinator asks whether the transaction's local work committed, when the
    /// transaction outlives its timeout unsubmitted (DTM's `query_prepared`); empty: it
    /// rolls back then, like any other.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query_prepared: String,
    /// Or the database whose resource managers check the transaction's barrier row then
    /// (`CHECK_PREPARED`): ferrata-proxy's outbox, and any application that inserts it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub check_resource: String,
    /// Set for a message an outbox wrote inside a global transaction: the `branch_id` of the
    /// barrier row its local transaction inserted on `check_resource` (gid the XID). The
    /// transaction's commit does not say that local transaction committed, so the message's
    /// own commit asks that row first: delivered if it committed, dropped if not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub check_barrier: String,
    /// That barrier row said the local transaction committed: kept, so a retried delivery
    /// does not ask again (a row a DBA purged meanwhile would then read as never committed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub barrier_confirmed: bool,
}

/// What a message's commit did when its barrier row said its local transaction never
/// committed: nothing was sent.
pub const DROPPED: &str = "dropped: its local transaction never committed";

impl MsgBranch {
    /// Why the message cannot be registered, if it cannot: its target must be one `caller`
    /// may call, its policy one that parses.
    pub fn invalid(&self, caller: &Caller) -> Option<String> {
        if self.name.chars().count() > MAX_NAME || self.key.chars().count() > MAX_NAME {
            return Some(format!("a message's name and key have at most {MAX_NAME} characters"));
        }
        if self.key.chars().chain(self.name.chars()).any(char::is_control) {
            return Some("a message's name and key have no control characters".into());
        }
        if let Err(why) = caller.allows(&self.target) {
            return Some(format!("target: {why}"));
        }
        if !self.query_prepared.is_empty()
            && let Err(why) = caller.allows(&self.query_prepared)
        {
            return Some(format!("query_prepared: {why}"));
        }
        if let Err(why) = Policy::parse(&self.policy) {
            return Some(why);
        }
        if self.delay_ms > MAX_DELAY_MS {
            return Some(format!("delay_ms is at most {MAX_DELAY_MS} (7 days)"));
        }
        self.payload.invalid()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a message serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<MsgBranch, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("a message's stored form does not read: {e}"))
    }

    fn ids<'a>(&'a self, xid: &'a str) -> Ids<'a> {
        self.payload.named(Ids {
            xid,
            trans_type: "msg",
            name: &self.name,
            op: "action",
        })
    }
}

/// The delivery of message `b` (its branch's commit), once, as a resource manager would
/// answer a commit: committed when the receiver took it; a failure that is not retried when
/// it answered 410 Gone (dead-lettered); otherwise a retryable failure, with the wait its
/// `Retry-After` asked for.
pub async fn deliver(caller: &Caller, default_timeout: Duration, b: &pb::BranchRef) -> pb::BranchOutcome {
    let again = pb::BranchStatus::Unknown;
    let msg = match MsgBranch::decode(&b.application_data) {
        Ok(msg) => msg,
        Err(why) => return pb::BranchOutcome::of(b.branch_id, again, why),
    };
    let ids = msg.ids(&b.xid);
    let message_id = if msg.key.is_empty() {
        ids.message_id()
    } else {
        msg.key.clone()
    };
    let call = msg.payload.call(&msg.target, ids, &message_id, default_timeout);
    let (outcome, retry_after) = caller.call_answered(&call).await;
    let target = &msg.target;
    let (status, why) = match outcome {
        Outcome::Success => return pb::BranchOutcome::of(b.branch_id, pb::BranchStatus::PhaseTwoCommitted, ""),
        Outcome::Gone(why) => (
            pb::BranchStatus::CommitFailedUnretryable,
            format!("dead-lettered: {target} answered {why}"),
        ),
        Outcome::Failure(why) | Outcome::Retry(why) => (again, format!("{target}: {why}")),
        Outcome::Ongoing => (again, format!("{target} answered ONGOING")),
    };
    pb::BranchOutcome {
        retry_after_ms: retry_after.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        ..pb::BranchOutcome::of(b.branch_id, status, why)
    }
}

impl MsgBranch {
    /// An outbox joined it to a global transaction and its barrier row is still to be asked.
    pub fn awaits_barrier(&self) -> bool {
        !self.check_barrier.is_empty() && !self.barrier_confirmed
    }

    /// It says how its transaction is settled past its timeout.
    pub fn has_check(&self) -> bool {
        !self.query_prepared.is_empty() || (!self.check_resource.is_empty() && self.check_barrier.is_empty())
    }
}

/// What a resource manager's CHECK_PREPARED answer means, as a call's answer would: the
/// local work committed (Success), did not (Failure), or no definite answer (Retry).
pub fn checked(outcome: Option<&pb::BranchOutcome>) -> Outcome {
    match outcome.map(|o| (pb::BranchStatus::try_from(o.status), o.reason.as_str())) {
        Some((Ok(pb::BranchStatus::PhaseTwoCommitted), _)) => Outcome::Success,
        Some((Ok(pb::BranchStatus::PhaseTwoRollbacked), _)) => {
            Outcome::Failure("its barrier row says the local work rolled back".into())
        }
        Some((_, why)) => Outcome::Retry(why.to_owned()),
        None => Outcome::Retry("the resource manager's answer did not cover the check".into()),
    }
}

/// Asks `msg`'s `query_prepared` whether the local work of its transaction `xid` (still in
/// Begin past its timeout) committed, as DTM does: a GET with `branch_id=00&op=msg`. Success:
/// committed (the messages go out); a refusal (FAILURE, 409, 410): it never will (they are
/// dropped); anything else: ask again later.
pub async fn query_prepared(caller: &Caller, default_timeout: Duration, xid: &str, msg: &MsgBranch) -> Outcome {
    let payload = Payload {
        data: String::new(),
        ..msg.payload.clone()
    };
    let ids = payload.named(Ids {
        xid,
        trans_type: "msg",
        name: "00",
        op: "msg",
    });
    let message_id = ids.message_id();
    caller
        .call(&payload.call(&msg.query_prepared, ids, &message_id, default_timeout))
        .await
}

/// When message `b`, whose first attempt was `elapsed` ago, is tried again after a failed
/// attempt whose answer asked for `retry_after`; `None` once its policy's schedule ended
/// (it is dead-lettered).
pub fn retry_wait(b: &pb::BranchRef, elapsed: Duration, retry_after: Option<Duration>) -> Option<Duration> {
    let msg = MsgBranch::decode(&b.application_data).ok()?;
    let policy = Policy::parse(&msg.policy).ok()?;
    let jitter = f64::from(getrandom::u32().unwrap_or(0)) / f64::from(u32::MAX);
    policy.next_wait(elapsed, retry_after, jitter)
}

/// How long after its transaction's commit message `b` is first delivered.
pub fn delay(b: &pb::BranchRef) -> Duration {
    MsgBranch::decode(&b.application_data).map_or(Duration::ZERO, |m| Duration::from_millis(m.delay_ms))
}
