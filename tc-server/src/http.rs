//! The HTTP API (axum, JSON): begin, commit, roll back and inspect global transactions, list
//! held locks, health and Prometheus metrics. Errors are JSON with a stable `code`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrata_rpc::ErrorCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Token;
use crate::coordinator::{Coordinator, OperatorRequest, Outcome, TxnView};
use crate::error::TcError;
use crate::model::{Failure, GlobalStatus};
use crate::xid::format_xid;

#[derive(Clone)]
struct Api {
    coordinator: Arc<Coordinator>,
    token: Token,
}

pub fn router(coordinator: Arc<Coordinator>, token: Token) -> Router {
    let api = Api { coordinator, token };
    let v1 = Router::new()
        .route("/v1/transactions", post(begin).get(list))
        .route("/v1/transactions/{xid}", get(show))
        .route("/v1/transactions/{xid}/events", get(events))
        .route("/v1/transactions/{xid}/commit", post(commit))
        .route("/v1/transactions/{xid}/rollback", post(rollback))
        .route("/v1/transactions/{xid}/retry", post(retry))
        .route("/v1/transactions/{xid}/resolve", post(resolve))
        .route("/v1/locks", get(locks))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), require_token));
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error(TcError::new(
                ErrorCode::NotFound,
                "no such endpoint; see README.md for the HTTP API",
            ))
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            error(TcError::new(
                ErrorCode::MethodNotAllowed,
                format!("this endpoint does not take {method}; see README.md for the HTTP API"),
            ))
        })
        .with_state(api)
}

fn error(e: TcError) -> Response {
    let code = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({ "code": e.code.as_str(), "message": e.message });
    if let Some(holder) = e.holder {
        body["holder"] = json!(holder);
    }
    if let Some(status) = e.status {
        body["status"] = json!(status.as_str());
    }
    (code, Json(body)).into_response()
}

async fn require_token(State(api): State<Api>, headers: HeaderMap, request: Request, next: Next) -> Response {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    if api.token.accepts(header) {
        next.run(request).await
    } else {
        error(TcError::new(
            ErrorCode::Unauthenticated,
            "missing or wrong token: send `Authorization: Bearer <token>` with the coordinator's token",
        ))
    }
}

fn failure_json(f: &Failure) -> Value {
    let detail: Value = if f.error.detail_json.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&f.error.detail_json).unwrap_or_else(|_| Value::String(f.error.detail_json.clone()))
    };
    json!({
        "branch_id": f.branch_id,
        "resource_id": f.resource_id,
        "status": f.status.as_str(),
        "reason": f.error.reason,
        "detail": detail,
    })
}

fn outcome_json(o: &Outcome) -> Value {
    json!({ "xid": o.xid, "status": o.status.as_str(), "failure": o.failure.as_ref().map(failure_json) })
}

fn view_json(v: &TxnView, with_branches: bool) -> Value {
    let mut out = json!({
        "xid": v.xid,
        "name": v.record.name,
        "status": v.record.status.as_str(),
        "timeout_ms": v.record.timeout_ms,
        "begin_ms": v.record.begin_ms,
        "updated_ms": v.record.updated_ms,
        "branch_count": v.branch_count,
        "finished": v.finished,
        "version": v.version,
        "failure": v.failure.as_ref().map(failure_json),
    });
    if with_branches {
        out["branches"] = v
            .branches
            .iter()
            .map(|b| {
                json!({
                    "branch_id": b.branch_id,
                    "resource_id": b.resource_id,
                    "status": b.status.as_str(),
                    "registered_ms": b.registered_ms,
                    "updated_ms": b.updated_ms,
                    "lock_keys": b.lock_keys.iter().map(|k| k.to_json()).collect::<Vec<_>>(),
                    "error": b.error.as_ref().map(|e| json!({ "reason": e.reason, "detail_json": e.detail_json })),
                })
            })
            .collect();
    }
    out
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BeginBody {
    #[serde(default)]
    timeout_ms: u64,
    #[serde(default)]
    name: String,
}

/// A request body, read as JSON whatever its content type says (`curl -d` sends a form
/// type); an empty body means all defaults. `example` shows the caller what is expected.
fn json_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes, example: &str) -> Result<T, TcError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| TcError::invalid(format!("the request body must be JSON like {example}: {e}")))
}

async fn begin(State(api): State<Api>, body: Bytes) -> Response {
    let body: BeginBody = match json_body(&body, r#"{"timeout_ms": 60000, "name": "order"}"#) {
        Ok(b) => b,
        Err(e) => return error(e),
    };
    match api.coordinator.begin(body.timeout_ms, body.name).await {
        Ok(xid) => (StatusCode::CREATED, Json(json!({ "xid": xid }))).into_response(),
        Err(e) => error(e),
    }
}

/// The `{xid}` of a route. A path that does not decode (invalid UTF-8 after
/// percent-decoding) is refused as JSON like every other error, not axum's plain text.
struct XidPath(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for XidPath {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(xid)) => Ok(XidPath(xid)),
            Err(e) => Err(error(TcError::invalid(format!(
                "the XID in the path does not decode: {}",
                e.body_text()
            )))),
        }
    }
}

async fn commit(State(api): State<Api>, XidPath(xid): XidPath) -> Response {
    match api.coordinator.commit(&xid).await {
        Ok(o) => Json(outcome_json(&o)).into_response(),
        Err(e) => error(e),
    }
}

async fn rollback(State(api): State<Api>, XidPath(xid): XidPath) -> Response {
    match api.coordinator.rollback(&xid).await {
        Ok(o) => Json(outcome_json(&o)).into_response(),
        Err(e) => error(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OperatorBody {
    #[serde(default)]
    reason: String,
}

/// The operator request of an action's body (its reason goes into the timeline).
fn operator_request(api: &Api, body: &Bytes) -> Result<OperatorRequest, TcError> {
    let body: OperatorBody = json_body(body, r#"{"reason": "rows repaired by hand, ticket 123"}"#)?;
    Ok(OperatorRequest {
        actor: api.token.actor().to_owned(),
        reason: body.reason,
    })
}

async fn retry(State(api): State<Api>, XidPath(xid): XidPath, body: Bytes) -> Response {
    let by = match operator_request(&api, &body) {
        Ok(by) => by,
        Err(e) => return error(e),
    };
    match api.coordinator.retry(&xid, by).await {
        Ok(o) => Json(outcome_json(&o)).into_response(),
        Err(e) => error(e),
    }
}

async fn resolve(State(api): State<Api>, XidPath(xid): XidPath, body: Bytes) -> Response {
    let by = match operator_request(&api, &body) {
        Ok(by) => by,
        Err(e) => return error(e),
    };
    match api.coordinator.resolve(&xid, by).await {
        Ok(o) => Json(outcome_json(&o)).into_response(),
        Err(e) => error(e),
    }
}

async fn events(State(api): State<Api>, XidPath(xid): XidPath) -> Response {
    match api.coordinator.events(&xid) {
        Ok((version, events)) => Json(json!({
            "xid": xid,
            "version": version,
            "events": events.iter().map(|e| e.to_json()).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

async fn show(State(api): State<Api>, XidPath(xid): XidPath) -> Response {
    match api.coordinator.get(&xid) {
        Ok(v) => Json(view_json(&v, true)).into_response(),
        Err(e) => error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
}

const MAX_LIST: usize = 10_000;

fn limit(asked: Option<usize>) -> Result<usize, TcError> {
    match asked.unwrap_or(100) {
        0 => Err(TcError::invalid("limit must be at least 1")),
        n if n > MAX_LIST => Err(TcError::invalid(format!("limit must be at most {MAX_LIST}"))),
        n => Ok(n),
    }
}

async fn list(
    State(api): State<Api>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(TcError::invalid(format!("bad query string: {}", e.body_text()))),
    };
    let status = match q.status.as_deref().map(|s| GlobalStatus::parse(s).ok_or(s)) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(s)) => {
            let known: Vec<&str> = GlobalStatus::ALL.iter().map(|s| s.as_str()).collect();
            return error(TcError::invalid(format!(
                "unknown status {s:?}; use one of {}",
                known.join(", ")
            )));
        }
    };
    let limit = match limit(q.limit) {
        Ok(l) => l,
        Err(e) => return error(e),
    };
    let views = api.coordinator.list(status, limit);
    Json(json!({ "transactions": views.iter().map(|v| view_json(v, false)).collect::<Vec<_>>() })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocksQuery {
    resource: Option<String>,
    schema: Option<String>,
    table: Option<String>,
    limit: Option<usize>,
}

async fn locks(
    State(api): State<Api>,
    query: Result<Query<LocksQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(TcError::invalid(format!("bad query string: {}", e.body_text()))),
    };
    let limit = match limit(q.limit) {
        Ok(l) => l,
        Err(e) => return error(e),
    };
    let filter = |key: &crate::lock_key::LockKey| {
        let p = key.parts();
        q.resource.as_deref().is_none_or(|r| r == p.resource)
            && q.schema.as_deref().is_none_or(|s| s == p.schema)
            && q.table.as_deref().is_none_or(|t| t == p.table)
    };
    let rows = api.coordinator.at.locks.held_rows(&filter, limit);
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "key": r.key.to_json(),
                "holder": format_xid(r.txn),
                "branches": r.branches,
                "since_ms": r.since_ms,
                "waiters": r.waiters.iter().map(|t| format_xid(*t)).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "locks": rows })).into_response()
}

async fn healthz(State(api): State<Api>) -> Response {
    let c = &api.coordinator;
    let body = |status: &str, reason: Option<String>| {
        json!({
            "status": status,
            "reason": reason,
            "transactions": c.sessions.read().len(),
            "resource_managers": c.rms.connected(),
            "locks_held": c.at.locks.held_count(),
        })
    };
    if let Some(cause) = c.store_failure() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(body("failed", Some(format!("store failed: {cause}")))),
        )
            .into_response();
    }
    if c.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body("shutting_down", None))).into_response();
    }
    Json(body("serving", None)).into_response()
}

async fn metrics() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ferrata_rpc::process::prometheus().render(),
    )
        .into_response()
}
