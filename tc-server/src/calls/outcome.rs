//! What a service's answer to a call means, decided on the HTTP status and, for a 200, an
//! exact `dtm_result` field of a JSON body (DTM's protocol); never on words found anywhere in
//! the body.

use std::time::Duration;

/// The meaning of one call's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer (whose JSON body, if any, says no other `dtm_result` than SUCCESS).
    Success,
    /// 409, or `{"dtm_result": "FAILURE"}`: the service refuses, for good.
    Failure(String),
    /// 425, or `{"dtm_result": "ONGOING"}`: not finished yet; asked again at the same pace.
    Ongoing,
    /// 410: the endpoint is gone; it is not called again.
    Gone(String),
    /// Anything else (another status, a timeout, no connection): asked again later, no
    /// sooner than `after` when the service said so (`Retry-After`).
    Retry { why: String, after: Option<Duration> },
}

/// How much of a body is kept to explain an answer.
const SHOWN: usize = 200;

/// The meaning of an answer with `status`, `Retry-After` header `retry_after` and `body`.
pub fn classify(status: u16, retry_after: Option<&str>, body: &[u8]) -> Outcome {
    let shown = || {
        let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN)]).into_owned();
        if body.len() > SHOWN { format!("{text}...") } else { text }
    };
    match status {
        200..=299 => match dtm_result(body).as_deref() {
            Some("FAILURE") => Outcome::Failure(format!("HTTP {status} with dtm_result FAILURE: {}", shown())),
            Some("ONGOING") => Outcome::Ongoing,
            _ => Outcome::Success,
        },
        409 => Outcome::Failure(format!("HTTP 409: {}", shown())),
        425 => Outcome::Ongoing,
        410 => Outcome::Gone(format!("HTTP 410: {}", shown())),
        _ => Outcome::Retry {
            why: format!("HTTP {status}: {}", shown()),
            after: retry_after.and_then(parse_retry_after),
        },
    }
}

/// The `dtm_result` string of a JSON object body.
fn dtm_result(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("dtm_result")?.as_str().map(str::to_owned)
}

/// `Retry-After` in seconds (the HTTP-date form is read as no hint).
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_exact_field_decide() {
        assert_eq!(classify(200, None, b""), Outcome::Success);
        assert_eq!(classify(204, None, b""), Outcome::Success);
        assert_eq!(classify(200, None, br#"{"dtm_result":"SUCCESS"}"#), Outcome::Success);
        // A word in the text is not a result.
        assert_eq!(classify(200, None, b"FAILURE ONGOING"), Outcome::Success);
        assert_eq!(classify(200, None, br#"{"note":"FAILURE"}"#), Outcome::Success);
        assert!(matches!(
            classify(200, None, br#"{"dtm_result":"FAILURE"}"#),
            Outcome::Failure(_)
        ));
        assert_eq!(classify(200, None, br#"{"dtm_result":"ONGOING"}"#), Outcome::Ongoing);
        assert!(matches!(classify(409, None, b"no"), Outcome::Failure(m) if m == "HTTP 409: no"));
        assert_eq!(classify(425, None, b""), Outcome::Ongoing);
        assert!(matches!(classify(410, None, b""), Outcome::Gone(_)));
        assert_eq!(
            classify(503, Some("7"), b"busy"),
            Outcome::Retry {
                why: "HTTP 503: busy".into(),
                after: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(
            classify(500, Some("Wed, 21 Oct 2015 07:28:00 GMT"), b""),
            Outcome::Retry { after: None, .. }
        ));
    }
}
