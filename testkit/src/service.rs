//! A real HTTP service on loopback for the tests of HTTP branches (TCC, saga, DTM's API): it
//! answers by the first segment of the path and records every call it gets.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::sync::Notify;

/// How long [`Service::until_called`] waits for a call.
const CALL_WAIT: Duration = Duration::from_secs(30);

/// A call as the service saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Header names in lower case; a repeated header, its last value.
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// When it arrived.
    pub at: tokio::time::Instant,
}

impl Seen {
    /// The header `name` (lower case), or "".
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// A service on loopback: `/ok/...` answers 200, `/no/...` 409, `/gone/...` 410,
/// `/down/...` 503 and `/busy/...` 429 with `Retry-After: 1` until `healthy` is set, then
/// 200, `/slow/...` 200 once [`release`](Service::release)d and
/// until then nothing (the caller's timeout ends the call), `/pair/...` 200 once a second
/// `/pair/` call is in (so two of them answer only if they are made at the same time); every
/// call is recorded as it arrives.
pub struct Service {
    pub base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Woken at every call recorded.
    arrived: Arc<Notify>,
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
    released: tokio::sync::watch::Sender<bool>,
}

impl Service {
    pub async fn start() -> Result<Service> {
        Self::start_on(0).await
    }

    /// On loopback port `port` (0: any free one); a test that points a branch at a port
    /// before anything listens there starts the service on it later, as a service that was
    /// down comes back.
    pub async fn start_on(port: u16) -> Result<Service> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (record, wake, up) = (Arc::clone(&seen), Arc::clone(&arrived), Arc::clone(&healthy));
        let pair = Arc::new(tokio::sync::Barrier::new(2));
        let released = tokio::sync::watch::Sender::new(false);
        let release = released.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let (record, wake, up, pair) = (
                Arc::clone(&record),
                Arc::clone(&wake),
                Arc::clone(&up),
                Arc::clone(&pair),
            );
            let mut released = release.subscribe();
            async move {
                use http_body_util::BodyExt;
                // Read before the call is recorded: a test that sees the call and then makes
                // the service healthy changes the next answer, not this one.
                let up = up.load(std::sync::atomic::Ordering::SeqCst);
                let (parts, body) = request.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                let headers = parts
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        (
                            name.as_str().to_owned(),
                            String::from_utf8_lossy(value.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                record.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    uri: parts.uri.to_string(),
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                    at: tokio::time::Instant::now(),
                });
                wake.notify_waiters();
                let path = parts.uri.path();
                if path.starts_with("/no/") {
                    (StatusCode::CONFLICT, r#"{"dtm_result":"FAILURE"}"#).into_response()
                } else if path.starts_with("/gone/") {
                    (StatusCode::GONE, "gone").into_response()
                } else if path.starts_with("/down/") && !up {
                    (StatusCode::SERVICE_UNAVAILABLE, "down").into_response()
                } else if path.starts_with("/busy/") && !up {
                    (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], "busy").into_response()
                } else {
                    if path.starts_with("/pair/") {
                        pair.wait().await;
                    }
                    if path.starts_with("/slow/") {
                        let _ = released.wait_for(|r| *r).await;
                    }
                    (StatusCode::OK, r#"{"dtm_result":"SUCCESS"}"#).into_response()
                }
            }
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Service {
            base,
            seen,
            arrived,
            healthy,
            released,
        })
    }

    /// From now on `/slow/` answers: the calls it holds and every later one.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// How many calls arrived.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn calls(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The calls whose path and query start with `prefix`, in arrival order.
    pub fn calls_to(&self, prefix: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|call| call.uri.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// The calls for transaction `gid` (its `gid` query parameter), in arrival order, each as
    /// its path followed by the values of the query parameters `params`:
    /// `/ok/a1 01 action` for `["branch_id", "op"]`.
    pub fn story(&self, gid: &str, params: &[&str]) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|call| call.uri.contains(&format!("gid={gid}&")))
            .map(|call| {
                let (path, query) = call.uri.split_once('?').unwrap_or((&call.uri, ""));
                let mut out = path.to_owned();
                for name in params {
                    let value = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                        .unwrap_or_default();
                    out.push(' ');
                    out.push_str(value);
                }
                out
            })
            .collect()
    }

    /// Waits until a call whose path and query start with `prefix` arrived.
    pub async fn until_called(&self, prefix: &str) -> Result<Seen> {
        self.until_called_again(prefix, 0).await
    }

    /// Waits until more than `seen` calls whose path and query start with `prefix` arrived;
    /// the one after the first `seen`.
    pub async fn until_called_again(&self, prefix: &str, seen: usize) -> Result<Seen> {
        let deadline = tokio::time::Instant::now() + CALL_WAIT;
        loop {
            // Registered before the check, so a call recorded between the two still wakes it.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let calls = self.calls_to(prefix);
            if calls.len() > seen {
                return Ok(calls[seen].clone());
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                bail!("no call to {prefix} within {CALL_WAIT:?}");
            }
        }
    }
}
