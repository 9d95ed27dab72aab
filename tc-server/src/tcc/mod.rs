//! TCC branches: a service's try, confirm and cancel over HTTP. The application registers a
//! branch with the URLs of its confirm and cancel before it calls the try itself; the global
//! decision then has the coordinator call the confirm (commit) or the cancel (rollback) of
//! every branch, again until it succeeds: both must succeed eventually (a FAILURE answer
//! breaks that contract, is retried all the same, and raises an operator alarm at once).
//!
//! A branch's calls are stored as its `application_data`, JSON ([`TccBranch`]); the calls go
//! through `calls/` with DTM's query parameters, so a DTM barrier (or `BEGIN BRANCH` through
//! ferrata-proxy) in the service sees the transaction, the branch and the operation.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrata_rpc::pb;
use serde::{Deserialize, Serialize};

use crate::calls::{Call, Caller, Outcome};

/// Longest branch name (DTM's `branch_id` column).
const MAX_NAME: usize = 128;

/// Longest time one call may be given: a service that needs longer answers ONGOING.
const MAX_REQUEST_TIMEOUT_MS: u64 = 60_000;

/// Headers a branch may not set: the coordinator frames, signs and routes its calls itself.
fn reserved(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ]
    .contains(&name.as_str())
        || name.starts_with("proxy-")
        || name.starts_with("webhook-")
}

/// One TCC branch's calls, as registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TccBranch {
    /// The application's id of the branch in its transaction (DTM's `branch_id`, as `01`).
    pub name: String,
    pub confirm: String,
    pub cancel: String,
    /// The JSON text both calls carry as their body (none: the calls are GETs).
    #[serde(default)]
    pub data: String,
    /// Headers both calls carry.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How long one call may take (`[calls] request_timeout_ms` if unset).
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
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
        let bad_header = self.headers.iter().find(|(name, value)| {
            axum::http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || axum::http::HeaderValue::from_str(value).is_err()
                || reserved(name)
        });
        if let Some((name, _)) = bad_header {
            return Some(format!(
                "header {name:?} is not a valid HTTP header, or one the coordinator sets itself (Host, Content-*, \
                 Transfer-Encoding, Connection, webhook-*, ...)"
            ));
        }
        if self
            .request_timeout_ms
            .is_some_and(|t| t == 0 || t > MAX_REQUEST_TIMEOUT_MS)
        {
            return Some(format!("request_timeout_ms must be 1 to {MAX_REQUEST_TIMEOUT_MS}"));
        }
        None
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a TCC branch serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<TccBranch, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("a TCC branch's stored calls do not read: {e}"))
    }
}

/// The scheme and authority of `url` (`http://svc:8080`): a TCC branch's resource, by which
/// its commits are batched and lists show it.
pub fn origin(url: &str) -> &str {
    let rest = url.find("://").map_or(0, |i| i + 3);
    url[rest..].find('/').map_or(url, |i| &url[..rest + i])
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
    let headers: Vec<(String, String)> = branch.headers.into_iter().collect();
    let message_id = format!("{}.{}.{op}", b.xid, branch.name);
    let call = Call {
        url,
        query: [
            ("gid", b.xid.as_str()),
            ("trans_type", "tcc"),
            ("branch_id", branch.name.as_str()),
            ("op", op),
        ],
        body: branch.data.as_bytes(),
        headers: &headers,
        message_id: &message_id,
        timeout: branch.request_timeout_ms.map_or(default_timeout, Duration::from_millis),
    };
    match caller.call(&call).await {
        Outcome::Success => pb::BranchOutcome::of(b.branch_id, done, ""),
        Outcome::Ongoing => pb::BranchOutcome::of(b.branch_id, again, format!("{op} answered ONGOING; asked again")),
        Outcome::Retry(why) => pb::BranchOutcome::of(b.branch_id, again, format!("{op} at {url}: {why}")),
        Outcome::Failure(why) | Outcome::Gone(why) => {
            metrics::counter!("ferrata_tc_tcc_contract_broken_total", "op" => op).increment(1);
            tracing::error!(
                xid = b.xid,
                branch_id = b.branch_id,
                branch = branch.name,
                url,
                answer = why,
                "a TCC {op} refused ({why}): it must succeed; retried, and an operator should look at the service"
            );
            pb::BranchOutcome::of(
                b.branch_id,
                again,
                format!(
                    "{op} at {url} refused, which it must never do ({why}); retried: the service needs an operator"
                ),
            )
        }
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
            data: r#"{"amount":30}"#.into(),
            headers: BTreeMap::new(),
            request_timeout_ms: None,
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
        assert!(
            bad(|b| {
                b.headers.insert("bad header".into(), "v".into());
            })
            .is_some()
        );
        assert!(
            bad(|b| {
                b.headers.insert("Host".into(), "other".into());
            })
            .is_some()
        );
        assert!(bad(|b| b.request_timeout_ms = Some(0)).is_some());
        assert!(bad(|b| b.request_timeout_ms = Some(MAX_REQUEST_TIMEOUT_MS + 1)).is_some());
        let fenced = Caller::new(&crate::config::Calls {
            allow: vec!["https://svc/".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(
            branch().invalid(&fenced).is_some(),
            "confirm is http://svc, not under https://svc/"
        );
        assert_eq!(origin("http://svc:8080/api/confirm?x=1"), "http://svc:8080");
        assert_eq!(origin("https://svc"), "https://svc");
    }
}
