//! A real HTTP service on loopback for the tests of HTTP branches (TCC, saga, DTM's API): it
//! answers by the first segment of the path and records every call it gets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::sync::Notify;

/// How long [`Service::until_called`] waits for a call.
const CALL_WAIT: Duration = Duration::from_secs(30);

/// A call as the service saw it: its path and query, its webhook-id, its body, and its
/// method with its `x-tenant` header.
pub type Seen = (String, String, String, String);

/// A service on loopback: `/ok/...` answers 200, `/no/...` 409, `/down/...` 503 until
/// `healthy` is set, then 200, `/pair/...` 200 once a second `/pair/` call is in (so two
/// of them answer only if they are made at the same time); every call is recorded as it
/// arrives.
pub struct Service {
    pub base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Woken at every call recorded.
    arrived: Arc<Notify>,
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
}

impl Service {
    pub async fn start() -> Result<Service> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (record, wake, up) = (Arc::clone(&seen), Arc::clone(&arrived), Arc::clone(&healthy));
        let pair = Arc::new(tokio::sync::Barrier::new(2));
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let (record, wake, up, pair) = (
                Arc::clone(&record),
                Arc::clone(&wake),
                Arc::clone(&up),
                Arc::clone(&pair),
            );
            async move {
                use http_body_util::BodyExt;
                let (parts, body) = request.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                let id = parts
                    .headers
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let tenant = parts
                    .headers
                    .get("x-tenant")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                record.lock().unwrap().push((
                    parts.uri.to_string(),
                    id,
                    String::from_utf8_lossy(&body).into_owned(),
                    format!("{} {tenant}", parts.method),
                ));
                wake.notify_waiters();
                let path = parts.uri.path();
                if path.starts_with("/no/") {
                    (StatusCode::CONFLICT, r#"{"dtm_result":"FAILURE"}"#).into_response()
                } else if path.starts_with("/down/") && !up.load(std::sync::atomic::Ordering::SeqCst) {
                    (StatusCode::SERVICE_UNAVAILABLE, "down").into_response()
                } else {
                    if path.starts_with("/pair/") {
                        pair.wait().await;
                    }
                    (StatusCode::OK, r#"{"dtm_result":"SUCCESS"}"#).into_response()
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Service {
            base,
            seen,
            arrived,
            healthy,
        })
    }

    pub fn calls(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The calls for transaction `gid` (its `gid` query parameter), in arrival order, each as
    /// its path followed by the values of the query parameters `params`:
    /// `/ok/a1 01 action` for `["branch_id", "op"]`.
    pub fn story(&self, gid: &str, params: &[&str]) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|(uri, _, _, _)| uri.contains(&format!("gid={gid}&")))
            .map(|(uri, _, _, _)| {
                let (path, query) = uri.split_once('?').unwrap_or((&uri, ""));
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
        let deadline = tokio::time::Instant::now() + CALL_WAIT;
        loop {
            // Registered before the check, so a call recorded between the two still wakes it.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(call) = self.calls().into_iter().find(|(uri, _, _, _)| uri.starts_with(prefix)) {
                return Ok(call);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                bail!("no call to {prefix} within {CALL_WAIT:?}");
            }
        }
    }
}
