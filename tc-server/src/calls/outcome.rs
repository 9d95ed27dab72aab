//! What a service's answer to a call means, decided on the HTTP status and, for a 200, an
//! exact `dtm_result` field of a JSON body (DTM's protocol); never on words found anywhere in
//! the body.

/// The meaning of one call's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer (whose JSON body, if any, has no `dtm_result` FAILURE or ONGOING).
    Success,
    /// 409, or `{"dtm_result": "FAILURE"}`: the service refuses, for good.
    Failure(String),
    /// 425, or `{"dtm_result": "ONGOING"}`: not finished yet; asked again.
    Ongoing,
    /// 410: the endpoint says it is gone (a TCC confirm or cancel may not be: its contract
    /// is broken).
    Gone(String),
    /// Anything else (another status, a timeout, no connection, an unreadable answer): asked
    /// again later.
    Retry(String),
}

/// How much of a body is kept to explain an answer.
const SHOWN: usize = 200;

/// The meaning of an answer with `status` and `body`.
pub fn classify(status: u16, body: &[u8]) -> Outcome {
    let shown = || {
        let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN)]).into_owned();
        if body.len() > SHOWN { format!("{text}...") } else { text }
    };
    match status {
        200..=299 => match dtm_result(body).as_deref() {
            Some("FAILURE") => Outcome::Failure(format!("HTTP {status} with dtm_result FAILURE: {}", shown())),
            Some("ONGOING") => Outcome::Ongoing,
            // Any other 2xx is success, as DTM reads it.
            _ => Outcome::Success,
        },
        409 => Outcome::Failure(format!("HTTP 409: {}", shown())),
        425 => Outcome::Ongoing,
        410 => Outcome::Gone(format!("HTTP 410: {}", shown())),
        _ => Outcome::Retry(format!("HTTP {status}: {}", shown())),
    }
}

/// The `dtm_result` string of a JSON object body.
fn dtm_result(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("dtm_result")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_exact_field_decide() {
        assert_eq!(classify(200, b""), Outcome::Success);
        assert_eq!(classify(204, b""), Outcome::Success);
        assert_eq!(classify(200, br#"{"dtm_result":"SUCCESS"}"#), Outcome::Success);
        // A word in the text is not a result.
        assert_eq!(classify(200, b"FAILURE ONGOING"), Outcome::Success);
        assert_eq!(classify(200, br#"{"note":"FAILURE"}"#), Outcome::Success);
        assert!(matches!(
            classify(200, br#"{"dtm_result":"FAILURE"}"#),
            Outcome::Failure(_)
        ));
        assert_eq!(classify(200, br#"{"dtm_result":"ONGOING"}"#), Outcome::Ongoing);
        assert_eq!(classify(200, br#"{"dtm_result":"success"}"#), Outcome::Success);
        assert!(matches!(classify(409, b"no"), Outcome::Failure(m) if m == "HTTP 409: no"));
        assert_eq!(classify(425, b""), Outcome::Ongoing);
        assert!(matches!(classify(410, b""), Outcome::Gone(_)));
        assert_eq!(classify(503, b"busy"), Outcome::Retry("HTTP 503: busy".into()));
    }
}
