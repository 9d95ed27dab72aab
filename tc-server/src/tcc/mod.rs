//! TCC branches: a service's try, confirm and cancel over HTTP. The application registers a
//! branch with the URLs of its confirm and cancel before it calls the try itself; the global
//! decision then has the coordinator call the confirm (commit) or the cancel (rollback) of
//! every branch, again until it succeeds: both must succeed eventually (a FAILURE answer
//! breaks that contract, is retried all the same, and raises an operator alarm at once).
//!
//! A branch's calls are stored as its `application_data`, JSON ([`TccBranch`]); the calls go
//! through `calls/` with DTM's query parameters, so a DTM barrier (or `BEGIN BRANCH` through
//! ferrata-proxy) in the service sees the transaction, the branch and the operation.

use std::time::Duration;

use ferrata_rpc::pb;
use serde::{Deserialize, Serialize};

use crate::calls::Caller;
use crate::calls::branch::{self, Ids, Payload};

/// Longest branch name (DTM's `branch_id` column).
const MAX_NAME: usize = 128;

/// One TCC branch's calls, as registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TccBranch {
    /// The application's id of the branch in its transaction (DTM's `branch_id`, as `01`).
    pub name: String,
    pub confirm: String,
    pub cancel: String,
    /// What both calls carry.
    #[serde(flatten)]
    pub payload: Payload,
}

impl TccBranch {
    /// Why the branch cannot be registered, if it cannot: its URLs must be ones `caller`
    /// may call (`[calls] allow`).
    pub fn invalid(&self, caller: &Caller) -> Option<String> {
        if self.name.is_empty() || self.name.chars().count() > MAX_NAME {
            return Some(format!("branch_id must have 1 to {MAX_NAME} characters"));
        }
        for (what, url) in [("confirm", &self.confirm), ("cancel", &self.cancel)] {
            if let Err(why) = caller.allows(url) {
                return Some(format!("{what}: {why}"));
            }
        }
        self.payload.invalid()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a TCC branch serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<TccBranch, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("a TCC branch's stored calls do not read: {e}"))
    }
}

/// Phase 2 of one TCC branch: its confirm (`commit`) or cancel, once, as a resource manager
/// would answer it.
pub async fn phase2(caller: &Caller, default_timeout: Duration, commit: bool, b: &pb::BranchRef) -> pb::BranchOutcome {
    let (done, again) = if commit {
        (pb::BranchStatus::PhaseTwoCommitted, pb::BranchStatus::Unknown)
    } else {
        (
            pb::BranchStatus::PhaseTwoRollbacked,
            pb::BranchStatus::RollbackFailedRetryable,
        )
    };
    let branch = match TccBranch::decode(&b.application_data) {
        Ok(branch) => branch,
        Err(why) => return pb::BranchOutcome::of(b.branch_id, again, why),
    };
    let (op, url) = if commit {
        ("confirm", &branch.confirm)
    } else {
        ("cancel", &branch.cancel)
    };
    let ids = Ids {
        xid: &b.xid,
        trans_type: "tcc",
        name: &branch.name,
        op,
    };
    match branch::settle(caller, &branch.payload, url, ids, default_timeout).await {
        Ok(()) => pb::BranchOutcome::of(b.branch_id, done, ""),
        Err(why) => pb::BranchOutcome::of(b.branch_id, again, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch() -> TccBranch {
        TccBranch {
            name: "01".into(),
            confirm: "http://svc/confirm".into(),
            cancel: "https://svc/cancel".into(),
            payload: Payload {
                data: r#"{"amount":30}"#.into(),
                ..Payload::default()
            },
        }
    }

    #[test]
    fn a_branch_round_trips_and_is_checked() {
        let caller = Caller::new(&crate::config::Calls::default()).unwrap();
        let b = branch();
        assert_eq!(TccBranch::decode(&b.encode()).unwrap(), b);
        assert_eq!(b.invalid(&caller), None);
        let bad = |f: fn(&mut TccBranch)| {
            let mut b = branch();
            f(&mut b);
            b.invalid(&caller)
        };
        assert!(bad(|b| b.name.clear()).is_some());
        assert!(bad(|b| b.confirm = "svc/confirm".into()).is_some());
        assert!(bad(|b| b.confirm = "http://a b/".into()).is_some());
        assert!(bad(|b| b.cancel = "http://svc/cancel#x".into()).is_some());
        assert!(bad(|b| b.payload.request_timeout_ms = Some(0)).is_some());
        let fenced = Caller::new(&crate::config::Calls {
            allow: vec!["https://svc/".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(
            branch().invalid(&fenced).is_some(),
            "confirm is http://svc, not under https://svc/"
        );
    }
}
