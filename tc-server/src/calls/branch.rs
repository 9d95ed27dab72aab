//! What every call of one HTTP branch (a TCC branch, a saga step) carries, as registered: its
//! body, its headers and its time limit; the checks a registration makes of them; and the
//! call a service must eventually answer with success (a confirm, a cancel, a compensation).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Call, Caller, Outcome};

/// Longest time one call may be given: a service that needs longer answers ONGOING.
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 60_000;

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

/// A branch's call settings (stored flattened into its mode's JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// The JSON text every call carries as its body (none: the calls are GETs).
    #[serde(default)]
    pub data: String,
    /// Headers every call carries.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How long one call may take (`[calls] request_timeout_ms` if unset).
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
    /// The name the calls give the transaction (`gid`, and in `webhook-id`): the client's gid
    /// of a transaction begun through the DTM API, so that the service's barrier sees the
    /// same gid in the coordinator's calls as in the client's own (a try); the XID if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<String>,
}

impl Payload {
    /// `ids` with the transaction named as the calls name it (`gid`).
    pub fn named<'a>(&'a self, ids: Ids<'a>) -> Ids<'a> {
        Ids {
            xid: self.gid.as_deref().unwrap_or(ids.xid),
            ..ids
        }
    }

    /// Why these settings cannot be registered, if they cannot.
    pub fn invalid(&self) -> Option<String> {
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

    /// The call of `url` for operation `op` of branch `name` of transaction `xid` (DTM's
    /// query parameters; `webhook-id` `<xid>.<name>.<op>`, the same for every attempt).
    pub fn call<'a>(&'a self, url: &'a str, ids: Ids<'a>, message_id: &'a str, default_timeout: Duration) -> Call<'a> {
        let ids = self.named(ids);
        Call {
            url,
            query: [
                ("gid", ids.xid),
                ("trans_type", ids.trans_type),
                ("branch_id", ids.name),
                ("op", ids.op),
            ],
            body: self.data.as_bytes(),
            headers: &self.headers,
            message_id,
            timeout: self.request_timeout_ms.map_or(default_timeout, Duration::from_millis),
        }
    }
}

/// Which call of which branch: DTM's query parameters.
#[derive(Clone, Copy, Debug)]
pub struct Ids<'a> {
    pub xid: &'a str,
    pub trans_type: &'static str,
    pub name: &'a str,
    pub op: &'static str,
}

impl Ids<'_> {
    /// The call's stable message id (`webhook-id`): receivers drop repeats by it.
    pub fn message_id(&self) -> String {
        format!("{}.{}.{}", self.xid, self.name, self.op)
    }
}

/// Makes a call the service must eventually answer with success (a TCC confirm or cancel, a
/// saga compensation): `Err` says why it did not this time, and it is retried whatever the
/// answer. A refusal (409, FAILURE, 410) breaks that contract: counted in
/// `ferrata_tc_contract_broken_total` and logged as an error for an operator at once.
pub async fn settle(
    caller: &Caller,
    payload: &Payload,
    url: &str,
    ids: Ids<'_>,
    default_timeout: Duration,
) -> Result<(), String> {
    // No URL: nothing to call (a saga step that needs no compensation).
    if url.is_empty() {
        return Ok(());
    }
    let ids = payload.named(ids);
    let message_id = ids.message_id();
    let op = ids.op;
    match caller.call(&payload.call(url, ids, &message_id, default_timeout)).await {
        Outcome::Success => Ok(()),
        Outcome::Ongoing => Err(format!("{op} answered ONGOING; asked again")),
        Outcome::Retry(why) => Err(format!("{op} at {url}: {why}")),
        Outcome::Failure(why) | Outcome::Gone(why) => {
            metrics::counter!("ferrata_tc_contract_broken_total", "trans_type" => ids.trans_type, "op" => op)
                .increment(1);
            tracing::error!(
                xid = ids.xid,
                branch = ids.name,
                url,
                answer = why,
                "a {} {op} refused ({why}): it must succeed; retried, and an operator should look at the service",
                ids.trans_type
            );
            Err(format!(
                "{op} at {url} refused, which it must never do ({why}); retried: the service needs an operator"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let bad = |f: fn(&mut Payload)| {
            let mut p = Payload::default();
            f(&mut p);
            p.invalid()
        };
        assert_eq!(bad(|_| {}), None);
        assert!(
            bad(|p| {
                p.headers.insert("bad header".into(), "v".into());
            })
            .is_some()
        );
        assert!(
            bad(|p| {
                p.headers.insert("Host".into(), "other".into());
            })
            .is_some()
        );
        assert!(
            bad(|p| {
                p.headers.insert("Webhook-Id".into(), "x".into());
            })
            .is_some()
        );
        assert!(bad(|p| p.request_timeout_ms = Some(0)).is_some());
        assert!(bad(|p| p.request_timeout_ms = Some(MAX_REQUEST_TIMEOUT_MS + 1)).is_some());
        assert_eq!(bad(|p| p.request_timeout_ms = Some(MAX_REQUEST_TIMEOUT_MS)), None);
    }
}
