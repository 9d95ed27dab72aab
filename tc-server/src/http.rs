//! The HTTP API (axum, JSON): begin, commit, roll back and inspect global transactions and
//! their timelines, operator actions, held locks, the audit trail, tokens, health and
//! Prometheus metrics. Every `/v1` request is authenticated (`auth.rs`) and each handler
//! checks the permission it needs; values of rows are redacted for callers who may not see
//! them. Errors are JSON with a stable `code`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferrata_rpc::{ErrorCode, pb};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::at::At;
use crate::audit::{AuditFilter, Origin};
use crate::auth::{Caller, Permission, Role, Sessions};
use crate::calls::branch::Payload;
use crate::coordinator::{Coordinator, Outcome, TxnView};
use crate::error::TcError;
use crate::model::{BranchMode, Failure, GlobalStatus, now_ms};
use crate::msg::MsgBranch;
use crate::operator::OperatorRequest;
use crate::repair::{RepairAction, RowsSeen};
use crate::xid::format_xid;

#[derive(Clone)]
struct Api {
    coordinator: Arc<Coordinator>,
    sessions: Arc<Sessions>,
}

/// The cookie that names a console session.
const SESSION_COOKIE: &str = "ferrata_session";

pub fn router(coordinator: Arc<Coordinator>) -> Router {
    let api = Api {
        coordinator: Arc::clone(&coordinator),
        sessions: Arc::new(Sessions::default()),
    };
    // DTM's clients call with the same tokens (`Authorization: Bearer`).
    let dtm =
        crate::dtm::routes(coordinator).route_layer(axum::middleware::from_fn_with_state(api.clone(), authenticate));
    let v1 = Router::new()
        .route("/v1/transactions", post(begin).get(list))
        .route("/v1/transactions/{xid}", get(show))
        .route("/v1/transactions/{xid}/events", get(events))
        .route("/v1/transactions/{xid}/branches", post(register_branch))
        .route("/v1/transactions/{xid}/messages", post(add_message))
        .route("/v1/messages", post(send_message))
        .route("/v1/transactions/{xid}/commit", post(commit))
        .route("/v1/transactions/{xid}/rollback", post(rollback))
        .route("/v1/transactions/{xid}/retry", post(retry))
        .route("/v1/transactions/{xid}/resolve", post(resolve))
        .route("/v1/transactions/{xid}/pause", post(pause))
        .route("/v1/transactions/{xid}/resume", post(resume))
        .route("/v1/transactions/{xid}/branches/{branch}/dirty", get(dirty))
        .route("/v1/transactions/{xid}/branches/{branch}/accept", post(accept))
        .route("/v1/transactions/{xid}/branches/{branch}/restore", post(restore))
        .route("/v1/locks", get(locks))
        .route("/v1/deadlocks", get(deadlocks))
        .route("/v1/resource-managers", get(resource_managers))
        .route("/v1/audit", get(audit_list))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/audit/{id}", get(audit_show))
        .route("/v1/tokens", get(tokens_list).post(token_create))
        .route("/v1/tokens/{name}", axum::routing::delete(token_revoke))
        .route("/v1/whoami", get(whoami))
        .route("/v1/session", get(session_show).delete(logout))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), authenticate));
    Router::new()
        .merge(v1)
        .merge(dtm)
        .route("/v1/session", post(login))
        // Receivers may hold no token: the handler authenticates them itself.
        .route("/v1/notifications/{xid}/{name}", get(notification))
        .merge(crate::console::routes())
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

pub(crate) fn error(e: TcError) -> Response {
    let code = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({ "code": e.code.as_str(), "message": e.message });
    if let Some(holder) = e.holder {
        body["holder"] = json!(holder);
    }
    if let Some(status) = e.status {
        body["status"] = json!(status.as_str());
    }
    if let Some(detail) = e.detail {
        body["detail"] = detail;
    }
    (code, Json(body)).into_response()
}

/// Names the caller of every `/v1` request (an extension the handlers read), or refuses it:
/// by its bearer token, else by its console session (whose changes must carry the session's
/// CSRF token in `X-CSRF-Token`), else as nobody (let in only when no token exists). A
/// browser's change from another origin is refused whatever it carries.
async fn authenticate(State(api): State<Api>, headers: HeaderMap, mut request: Request, next: Next) -> Response {
    match caller_of(&api, &headers, request.method(), request.uri()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => error(e),
    }
}

fn caller_of(
    api: &Api,
    headers: &HeaderMap,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
) -> Result<Caller, TcError> {
    let now = now_ms();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let changes = !matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD);
    if changes {
        same_origin(headers, uri)?;
    }
    if let Some(authorization) = header("authorization") {
        return api.coordinator.tokens.authenticate(Some(authorization), now);
    }
    if let Some(id) = session_id(headers) {
        let unauthenticated = || {
            TcError::new(
                ErrorCode::Unauthenticated,
                "the console session ended: log in again with your token",
            )
        };
        let (caller, csrf) = api.sessions.get(&id, now).ok_or_else(unauthenticated)?;
        if !api.coordinator.tokens.still_valid(&caller, now) {
            api.sessions.remove(&id);
            return Err(unauthenticated());
        }
        if changes
            && !header("x-csrf-token").is_some_and(|t| crate::auth::constant_time_eq(t.as_bytes(), csrf.as_bytes()))
        {
            return Err(TcError::new(
                ErrorCode::Forbidden,
                "a change from a console session needs its CSRF token in the X-CSRF-Token header",
            ));
        }
        return Ok(caller);
    }
    // Nobody: let in only with no token at all, and only by a loopback name (a page of a
    // name that resolves to this machine, DNS rebinding, is not this coordinator's).
    if api.coordinator.tokens.open() && !host_of(headers, uri).is_some_and(|h| is_loopback_host(&h)) {
        return Err(TcError::new(
            ErrorCode::Forbidden,
            "without tokens the coordinator answers only requests to a loopback address (127.0.0.1, [::1], localhost)",
        ));
    }
    api.coordinator.tokens.authenticate(None, now)
}

/// The host a request was sent to: its `Host` header, or the URI's authority (HTTP/2).
fn host_of(headers: &HeaderMap, uri: &axum::http::Uri) -> Option<String> {
    headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
}

fn is_loopback_host(host_and_port: &str) -> bool {
    let host = match host_and_port.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host_and_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a browser's request sent from a page of another origin (its `Origin` names
/// another host than the one it was sent to).
fn same_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> Result<(), TcError> {
    let Some(origin) = headers.get("origin").and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    if origin.split_once("://").map(|(_, h)| h) == host_of(headers, uri).as_deref() {
        return Ok(());
    }
    Err(TcError::new(
        ErrorCode::Forbidden,
        format!("a change from another origin ({origin}) is refused"),
    ))
}

/// The console session id in the request's cookies.
fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_owned())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    #[serde(default)]
    token: String,
}

/// The console's login: the token, checked like a bearer token, becomes a session; the
/// answer sets its HttpOnly cookie and gives the CSRF token the page sends with changes.
async fn login(State(api): State<Api>, headers: HeaderMap, uri: axum::http::Uri, body: Bytes) -> Reply {
    same_origin(&headers, &uri)?;
    let body: LoginBody = json_body(&body, r#"{"token": "ftc_..."}"#)?;
    let header = (!body.token.is_empty()).then(|| format!("Bearer {}", body.token));
    if header.is_none()
        && api.coordinator.tokens.open()
        && !host_of(&headers, &uri).is_some_and(|h| is_loopback_host(&h))
    {
        return Err(TcError::new(
            ErrorCode::Forbidden,
            "without tokens only a loopback address may log in",
        )
        .into());
    }
    let caller = api.coordinator.tokens.authenticate(header.as_deref(), now_ms())?;
    let (id, csrf) = api.sessions.create(caller.clone(), now_ms())?;
    tracing::info!(target: "ferrata::audit", actor = %caller.name, role = caller.role.as_str(), "console login");
    // Secure when the page came over TLS (the proxy in front, or the coordinator's own).
    let secure = headers.get("x-forwarded-proto").is_some_and(|p| p == "https") || api.coordinator.config.tls.is_some();
    let cookie = format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        crate::auth::SESSION_MAX_MS / 1000,
        if secure { "; Secure" } else { "" }
    );
    Ok((
        [(axum::http::header::SET_COOKIE, cookie)],
        Json(json!({ "name": caller.name.as_ref(), "role": caller.role.as_str(), "csrf": csrf })),
    )
        .into_response())
}

/// The session of the request's cookie: who, and its CSRF token (for a reloaded page).
async fn session_show(State(api): State<Api>, headers: HeaderMap) -> Reply {
    let (caller, csrf) = session_id(&headers)
        .and_then(|id| api.sessions.get(&id, now_ms()))
        .ok_or_else(|| TcError::new(ErrorCode::Unauthenticated, "no console session: log in with your token"))?;
    Ok(Json(json!({ "name": caller.name.as_ref(), "role": caller.role.as_str(), "csrf": csrf })).into_response())
}

async fn logout(State(api): State<Api>, headers: HeaderMap) -> Reply {
    if let Some(id) = session_id(&headers) {
        api.sessions.remove(&id);
    }
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    Ok((
        [(axum::http::header::SET_COOKIE, cookie)],
        Json(json!({ "logged_out": true })),
    )
        .into_response())
}

/// The peer address of a connection, for the audit trail (served with
/// `into_make_service_with_connect_info::<Peer>()`, over TCP or TLS).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// Where a request came from, for the audit trail.
fn origin(headers: &HeaderMap, peer: Option<&ConnectInfo<Peer>>) -> Origin {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(200).collect::<String>())
    };
    Origin {
        client: header("x-ferrata-client").unwrap_or_else(|| "api".into()),
        remote: peer.map(|ConnectInfo(Peer(a))| a.to_string()).unwrap_or_default(),
        user_agent: header("user-agent").unwrap_or_default(),
    }
}

/// Values of rows (in dirty-rollback details: `before`, `after`, `current`, `read_back`,
/// statements' `params`, and the digests, which a guess of a value could be checked
/// against) replaced by `{"redacted": true}`, keys and columns kept: a viewer sees which
/// rows and columns differ, not what they hold.
fn redact(detail: &mut Value) {
    match detail {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if matches!(
                    k.as_str(),
                    "before" | "after" | "current" | "read_back" | "params" | "digest" | "branch_digest"
                ) {
                    *v = json!({ "redacted": true });
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// A detail JSON as the caller may see it.
fn detail_for(caller: &Caller, detail_json: &str) -> Value {
    if detail_json.is_empty() {
        return Value::Null;
    }
    let mut detail = serde_json::from_str(detail_json).unwrap_or_else(|_| Value::String(detail_json.to_owned()));
    if !caller.may(Permission::SeeValues) {
        redact(&mut detail);
    }
    detail
}

fn failure_json(f: &Failure, caller: &Caller) -> Value {
    json!({
        "branch_id": f.branch_id,
        "resource_id": f.resource_id,
        "status": f.status.as_str(),
        "reason": f.error.reason,
        "detail": detail_for(caller, &f.error.detail_json),
    })
}

fn outcome_json(o: &Outcome, caller: &Caller) -> Value {
    json!({ "xid": o.xid, "status": o.status.as_str(), "failure": o.failure.as_ref().map(|f| failure_json(f, caller)) })
}

fn view_json(v: &TxnView, with_branches: bool, caller: &Caller) -> Value {
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
        "paused": v.paused,
        "failure": v.failure.as_ref().map(|f| failure_json(f, caller)),
    });
    if with_branches {
        out["branches"] = v
            .branches
            .iter()
            .map(|b| {
                json!({
                    "branch_id": b.branch_id,
                    "resource_id": b.resource_id,
                    "mode": b.mode.as_str(),
                    "connection_id": (b.mode == BranchMode::Xa).then_some(b.connection_id),
                    "instance_id": (b.mode == BranchMode::Xa).then_some(&b.instance_id),
                    "status": b.status.as_str(),
                    "registered_ms": b.registered_ms,
                    "updated_ms": b.updated_ms,
                    "lock_keys": b.lock_keys.iter().map(|k| k.to_json()).collect::<Vec<_>>(),
                    "error": b.error.as_ref().map(|e| json!({ "reason": e.reason, "detail": detail_for(caller, &e.detail_json) })),
                })
            })
            .collect();
    }
    out
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BeginBody {
    /// `saga`, or absent (or `at`, `xa`, `tcc`): a transaction branches register into.
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    timeout_ms: u64,
    #[serde(default)]
    name: String,
    // A saga's: its steps and how they run.
    #[serde(default)]
    steps: Vec<StepBody>,
    #[serde(default)]
    concurrent: bool,
    #[serde(default)]
    orders: std::collections::BTreeMap<usize, Vec<usize>>,
    #[serde(default)]
    retry_interval_ms: Option<u64>,
    #[serde(default)]
    retry_limit: Option<u32>,
    // Prepared messages': the messages, and where to ask past the timeout.
    #[serde(default)]
    messages: Vec<MessageBody>,
    #[serde(default)]
    query_prepared: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepBody {
    action: String,
    #[serde(default)]
    compensate: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    request_timeout_ms: Option<u64>,
}

/// A branch's `data` as the text its calls carry: a string as it is, any other JSON value as
/// its text, none as no body.
fn data_text(data: Option<Value>) -> String {
    match data {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(v) => v.to_string(),
    }
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

async fn begin(State(api): State<Api>, Extension(caller): Extension<Caller>, body: Bytes) -> Reply {
    caller.require(Permission::Transact, "begin global transactions")?;
    let body: BeginBody = json_body(&body, r#"{"timeout_ms": 60000, "name": "order"}"#)?;
    let mode = body.mode.as_deref().unwrap_or("at").to_ascii_lowercase();
    let xid = match mode.as_str() {
        "saga" => {
            Coordinator::check_name(&body.name)?;
            let request = crate::sagas::SagaRequest {
                name: body.name,
                timeout_ms: body.timeout_ms,
                steps: body
                    .steps
                    .into_iter()
                    .map(|s| crate::saga::StepRequest {
                        action: s.action,
                        compensate: s.compensate,
                        payload: Payload {
                            data: data_text(s.data),
                            headers: s.headers,
                            request_timeout_ms: s.request_timeout_ms,
                            gid: None,
                        },
                    })
                    .collect(),
                options: crate::saga::Options {
                    concurrent: body.concurrent,
                    orders: body.orders,
                    retry_interval_ms: body.retry_interval_ms,
                    retry_limit: body.retry_limit,
                },
            };
            let saga = api.coordinator.plan_saga(request).await?;
            api.coordinator.submit_saga(saga).await?
        }
        "msg" => {
            Coordinator::check_name(&body.name)?;
            let messages = body
                .messages
                .into_iter()
                .map(|m| MsgBranch {
                    query_prepared: body.query_prepared.clone(),
                    ..m.message()
                })
                .collect();
            api.coordinator
                .prepare_messages(body.name, body.timeout_ms, messages)
                .await?
        }
        "at" | "xa" | "tcc" => {
            let saga_only = !body.steps.is_empty()
                || body.concurrent
                || !body.orders.is_empty()
                || body.retry_interval_ms.is_some()
                || body.retry_limit.is_some();
            if saga_only {
                return Err(TcError::invalid(format!(
                    "steps, concurrent, orders, retry_interval_ms and retry_limit belong to a saga (\"mode\": \"saga\"), not to mode {mode:?}"
                ))
                .into());
            }
            if !body.messages.is_empty() || !body.query_prepared.is_empty() {
                return Err(TcError::invalid(format!(
                    "messages and query_prepared belong to prepared messages (\"mode\": \"msg\"), not to mode {mode:?}; \
                     add a message to a transaction with POST /v1/transactions/{{xid}}/messages"
                ))
                .into());
            }
            api.coordinator.begin(body.timeout_ms, body.name).await?
        }
        other => {
            return Err(TcError::invalid(format!(
                "mode {other:?} is not one of at, xa, tcc (a transaction branches register into), saga or msg"
            ))
            .into());
        }
    };
    Ok((StatusCode::CREATED, Json(json!({ "xid": xid }))).into_response())
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BranchBody {
    mode: String,
    branch_id: String,
    confirm: String,
    cancel: String,
    /// The calls' JSON body: a string is sent as it is, any other JSON value as its text.
    #[serde(default)]
    data: Option<serde_json::Value>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    request_timeout_ms: Option<u64>,
}

/// Registers a TCC branch, before the application calls its try.
async fn register_branch(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    XidPath(xid): XidPath,
    body: Bytes,
) -> Reply {
    caller.require(Permission::Transact, "register branches")?;
    const EXAMPLE: &str = r#"{"mode": "tcc", "branch_id": "01", "confirm": "http://svc/confirm", "cancel": "http://svc/cancel", "data": {"amount": 30}}"#;
    let body: BranchBody = json_body(&body, EXAMPLE)?;
    if !body.mode.eq_ignore_ascii_case("tcc") {
        return Err(TcError::invalid(format!(
            "mode {:?}: branches registered over HTTP are TCC branches (\"mode\": \"tcc\"); AT and XA branches register through ferrata-proxy",
            body.mode
        ))
        .into());
    }
    let branch = crate::tcc::TccBranch {
        name: body.branch_id,
        confirm: body.confirm,
        cancel: body.cancel,
        payload: Payload {
            data: data_text(body.data),
            headers: body.headers,
            request_timeout_ms: body.request_timeout_ms,
            gid: None,
        },
    };
    // Its resource is its confirm URL's origin, which the coordinator sets itself.
    let request = pb::BranchRegisterRequest {
        xid: xid.clone(),
        branch_type: pb::BranchType::Tcc as i32,
        application_data: branch.encode(),
        ..Default::default()
    };
    let branch_id = api.coordinator.register(request).await?;
    Ok((StatusCode::CREATED, Json(json!({ "xid": xid, "branch_id": branch_id }))).into_response())
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    target: String,
    /// The body: a string is sent as it is, any other JSON value as its text.
    #[serde(default)]
    data: Option<serde_json::Value>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    request_timeout_ms: Option<u64>,
    #[serde(default)]
    policy: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    delay_ms: u64,
    /// Its name in the transaction; the coordinator's branch id if none.
    #[serde(default)]
    name: String,
}

const MESSAGE_EXAMPLE: &str = r#"{"target": "https://billing/api/credit", "data": {"order": 42}, "policy": "standard-webhooks", "key": "order-42"}"#;

impl MessageBody {
    fn message(self) -> MsgBranch {
        MsgBranch {
            name: self.name,
            target: self.target,
            payload: Payload {
                data: data_text(self.data),
                headers: self.headers,
                request_timeout_ms: self.request_timeout_ms,
                gid: None,
            },
            policy: self.policy,
            key: self.key,
            delay_ms: self.delay_ms,
            query_prepared: String::new(),
            check_resource: String::new(),
            check_barrier: String::new(),
            barrier_confirmed: false,
        }
    }

    fn registration(self, xid: &str) -> pb::BranchRegisterRequest {
        // Its resource is its target's origin, which the coordinator sets itself.
        pb::BranchRegisterRequest {
            xid: xid.to_owned(),
            branch_type: pb::BranchType::Msg as i32,
            application_data: self.message().encode(),
            ..Default::default()
        }
    }
}

/// Adds a message to a transaction in Begin: delivered once it commits, dropped if it rolls
/// back.
async fn add_message(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    XidPath(xid): XidPath,
    body: Bytes,
) -> Reply {
    caller.require(Permission::Transact, "add messages")?;
    let body: MessageBody = json_body(&body, MESSAGE_EXAMPLE)?;
    let branch_id = api.coordinator.register(body.registration(&xid)).await?;
    Ok((StatusCode::CREATED, Json(json!({ "xid": xid, "branch_id": branch_id }))).into_response())
}

/// Sends one message on its own: a transaction holding just it, committed at once (the
/// message is stored before the answer and delivered on its policy's schedule).
async fn send_message(State(api): State<Api>, Extension(caller): Extension<Caller>, body: Bytes) -> Reply {
    caller.require(Permission::Transact, "send messages")?;
    let body: MessageBody = json_body(&body, MESSAGE_EXAMPLE)?;
    let coordinator = &api.coordinator;
    // Checked before anything is stored, so a refused message leaves no transaction.
    let request = body.registration("");
    let msg = MsgBranch::decode(&request.application_data).map_err(TcError::invalid)?;
    if let Some(why) = msg.invalid(&coordinator.caller) {
        return Err(TcError::invalid(why).into());
    }
    coordinator
        .caller
        .resolves([msg.target.as_str()])
        .await
        .map_err(TcError::invalid)?;
    let xid = coordinator.begin(0, "message".into()).await?;
    let registered = coordinator
        .register(pb::BranchRegisterRequest {
            xid: xid.clone(),
            ..request
        })
        .await;
    let branch_id = match registered {
        Ok(id) => id,
        Err(e) => {
            // Nothing of a refused message stays behind.
            let _ = coordinator.rollback(&xid).await;
            return Err(e.into());
        }
    };
    coordinator.commit(&xid).await?;
    Ok((StatusCode::CREATED, Json(json!({ "xid": xid, "branch_id": branch_id }))).into_response())
}

/// A message's receiver asks where it stands (one it may have missed): with a token that
/// may read, or with no token, signing its question as the coordinator signs deliveries
/// (`webhook-id` `<xid>.<name>.query`, `webhook-timestamp` within five minutes, and
/// `webhook-signature` by the secret of the endpoint the message goes to).
async fn notification(
    State(api): State<Api>,
    headers: HeaderMap,
    method: axum::http::Method,
    uri: axum::http::Uri,
    axum::extract::Path((xid, name)): axum::extract::Path<(String, String)>,
) -> Reply {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signed = header("webhook-signature");
    if signed.is_none() || headers.contains_key("authorization") {
        caller_of(&api, &headers, &method, &uri)?.require(Permission::Read, "read messages")?;
    }
    let found = api.coordinator.notification(&xid, &name);
    if let Some(signature) = signed.filter(|_| !headers.contains_key("authorization")) {
        let id = format!("{xid}.{name}.query");
        let timestamp = header("webhook-timestamp").and_then(|t| t.parse().ok()).unwrap_or(0);
        let given_id = header("webhook-id").unwrap_or_default();
        let now = now_ms() / 1000;
        // An unknown transaction is answered like a bad signature: nothing is learnt of it.
        let holds = found.as_ref().is_ok_and(|n| {
            api.coordinator
                .caller
                .verifies(&n.signers, &id, timestamp, signature, now)
        });
        if given_id != id || !holds {
            return Err(TcError::new(
                ErrorCode::Unauthenticated,
                format!(
                    "the signature does not hold: sign \"{id}.<webhook-timestamp>.\" (an empty body) with the \
                     secret of the endpoint the message goes to, send it as webhook-signature with webhook-id {id} \
                     and a webhook-timestamp within five minutes; or send a token"
                ),
            )
            .into());
        }
    }
    let n = found?;
    Ok(Json(json!({ "xid": xid, "name": name, "status": n.status, "reason": n.reason })).into_response())
}

/// What a handler answers: its response, or an error as JSON.
type Reply = Result<Response, ApiError>;

struct ApiError(TcError);

impl From<TcError> for ApiError {
    fn from(e: TcError) -> ApiError {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0)
    }
}

/// A query string, or the error that says what is wrong with it.
pub(crate) fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, TcError> {
    q.map(|Query(q)| q)
        .map_err(|e| TcError::invalid(format!("bad query string: {}", e.body_text())))
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
                "the path does not decode: {}",
                e.body_text()
            )))),
        }
    }
}

async fn commit(State(api): State<Api>, Extension(caller): Extension<Caller>, XidPath(xid): XidPath) -> Reply {
    caller.require(Permission::Transact, "commit global transactions")?;
    let o = api.coordinator.commit(&xid).await?;
    Ok(Json(outcome_json(&o, &caller)).into_response())
}

async fn rollback(State(api): State<Api>, Extension(caller): Extension<Caller>, XidPath(xid): XidPath) -> Reply {
    caller.require(Permission::Transact, "roll back global transactions")?;
    let o = api.coordinator.rollback(&xid).await?;
    Ok(Json(outcome_json(&o, &caller)).into_response())
}

/// The body of an operator action; each action reads the fields it takes.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OperatorBody {
    #[serde(default)]
    reason: String,
    expect_version: Option<u64>,
    #[serde(default)]
    dry_run: bool,
    /// resolve: the proxies delete the undo records left.
    #[serde(default)]
    delete_undo: bool,
    /// accept, restore: the rows as an inspection named them, with their digests.
    #[serde(default)]
    rows: Vec<RowSeen>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    branch_digest: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RowSeen {
    row: String,
    digest: String,
}

/// What every operator action's request carries: who, from where, and the body's reason
/// and expected version.
pub(crate) struct Operator {
    pub(crate) caller: Caller,
    pub(crate) origin: Origin,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Response> {
        let caller = parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| error(TcError::new(ErrorCode::Unauthenticated, "not authenticated")))?;
        let origin = origin(&parts.headers, parts.extensions.get::<ConnectInfo<Peer>>());
        Ok(Operator { caller, origin })
    }
}

impl Operator {
    /// The request of `action`, which needs `need` (`what` names it in a refusal, which is
    /// counted and logged), and the rest of its body.
    fn request(
        self,
        coordinator: &Coordinator,
        need: Permission,
        (action, what): (&str, &str),
        body: &Bytes,
    ) -> Result<(OperatorRequest, OperatorBody), TcError> {
        if let Err(e) = self.caller.require(need, what) {
            return Err(coordinator.refused(action, &self.caller, e));
        }
        let mut body: OperatorBody = json_body(
            body,
            r#"{"reason": "rows repaired by hand, ticket 123", "expect_version": 7}"#,
        )?;
        let by = OperatorRequest {
            caller: self.caller,
            origin: self.origin,
            reason: std::mem::take(&mut body.reason),
            expect_version: body.expect_version,
        };
        Ok((by, body))
    }
}

async fn retry(State(api): State<Api>, op: Operator, XidPath(xid): XidPath, body: Bytes) -> Reply {
    let caller = op.caller.clone();
    let (by, body) = op.request(
        &api.coordinator,
        Permission::Act,
        ("retry", "retry transactions"),
        &body,
    )?;
    if body.dry_run {
        return Ok(Json(api.coordinator.retry_dry_run(&xid, &by).await?).into_response());
    }
    let o = api.coordinator.retry(&xid, by).await?;
    Ok(Json(outcome_json(&o, &caller)).into_response())
}

async fn resolve(State(api): State<Api>, op: Operator, XidPath(xid): XidPath, body: Bytes) -> Reply {
    let caller = op.caller.clone();
    let (by, body) = op.request(
        &api.coordinator,
        Permission::Act,
        ("resolve", "resolve transactions"),
        &body,
    )?;
    let mut o = api
        .coordinator
        .resolve(&xid, by, body.delete_undo, body.dry_run)
        .await?;
    if !caller.may(Permission::SeeValues) {
        redact(&mut o);
    }
    Ok(Json(o).into_response())
}

async fn pause(State(api): State<Api>, op: Operator, XidPath(xid): XidPath, body: Bytes) -> Reply {
    let (by, _) = op.request(
        &api.coordinator,
        Permission::Act,
        ("pause", "pause transactions"),
        &body,
    )?;
    Ok(Json(api.coordinator.pause(&xid, true, by).await?).into_response())
}

async fn resume(State(api): State<Api>, op: Operator, XidPath(xid): XidPath, body: Bytes) -> Reply {
    let (by, _) = op.request(
        &api.coordinator,
        Permission::Act,
        ("resume", "resume transactions"),
        &body,
    )?;
    Ok(Json(api.coordinator.pause(&xid, false, by).await?).into_response())
}

async fn deadlocks(State(api): State<Api>, Extension(caller): Extension<Caller>) -> Reply {
    caller.require(Permission::Read, "list deadlocks")?;
    let list: Vec<Value> = held_here(&api)?
        .deadlocks()
        .iter()
        .map(|d| {
            json!({
                "at_ms": d.at_ms,
                "cycle": d.cycle.iter().map(|t| format_xid(*t)).collect::<Vec<_>>(),
                "victim": format_xid(d.victim),
                "resource": d.resource,
                "schema": d.schema,
                "table": d.table,
            })
        })
        .collect();
    Ok(Json(json!({ "deadlocks": list })).into_response())
}

async fn resource_managers(State(api): State<Api>, Extension(caller): Extension<Caller>) -> Reply {
    caller.require(Permission::Read, "list resource managers")?;
    let now = tokio::time::Instant::now();
    let list: Vec<Value> = api
        .coordinator
        .rms
        .connections()
        .iter()
        .map(|c| {
            json!({
                "rm_id": c.rm_id,
                "resources": c.resources(),
                "attached_ms_ago": now.duration_since(c.attached_at).as_millis() as u64,
                "last_heartbeat_ms_ago": now.duration_since(c.last_answered()).as_millis() as u64,
                "guard_updates_acked": c.acked(),
            })
        })
        .collect();
    Ok(Json(json!({
        "resource_managers": list,
        "heartbeat_interval_ms": api.coordinator.config.phase2.heartbeat_interval_ms,
    }))
    .into_response())
}

/// `{xid}/branches/{branch}` of a route.
struct BranchPath(String, u64);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for BranchPath {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        let bad = |why: String| error(TcError::invalid(why));
        let Path((xid, branch)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| bad(format!("the path does not decode: {}", e.body_text())))?;
        let branch = branch
            .parse()
            .map_err(|_| bad(format!("{branch:?} is not a branch id (a number)")))?;
        Ok(BranchPath(xid, branch))
    }
}

async fn dirty(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    BranchPath(xid, branch): BranchPath,
) -> Reply {
    caller.require(Permission::Read, "inspect branches")?;
    let mut rows = api.coordinator.inspect(&xid, branch).await?;
    if !caller.may(Permission::SeeValues) {
        redact(&mut rows);
        rows["values_redacted"] = json!(true);
    }
    Ok(Json(rows).into_response())
}

async fn repair(
    api: Api,
    op: Operator,
    BranchPath(xid, branch): BranchPath,
    body: Bytes,
    action: RepairAction,
) -> Reply {
    let (by, body) = op.request(
        &api.coordinator,
        Permission::Act,
        (action.as_str(), "repair rows of a failed rollback"),
        &body,
    )?;
    let seen = RowsSeen {
        rows: body.rows.into_iter().map(|r| (r.row, r.digest)).collect(),
        all: body.all,
        branch_digest: body.branch_digest,
    };
    let result = api
        .coordinator
        .repair(&xid, branch, action, seen, body.dry_run, by)
        .await?;
    Ok(Json(result).into_response())
}

async fn accept(State(api): State<Api>, op: Operator, path: BranchPath, body: Bytes) -> Reply {
    repair(api, op, path, body, RepairAction::Accept).await
}

async fn restore(State(api): State<Api>, op: Operator, path: BranchPath, body: Bytes) -> Reply {
    repair(api, op, path, body, RepairAction::Restore).await
}

async fn events(State(api): State<Api>, Extension(caller): Extension<Caller>, XidPath(xid): XidPath) -> Reply {
    caller.require(Permission::Read, "read timelines")?;
    let (version, events) = api.coordinator.events(&xid)?;
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut j = e.to_json();
            if !caller.may(Permission::SeeValues) {
                redact(&mut j);
            }
            j
        })
        .collect();
    Ok(Json(json!({ "xid": xid, "version": version, "events": events })).into_response())
}

async fn show(State(api): State<Api>, Extension(caller): Extension<Caller>, XidPath(xid): XidPath) -> Reply {
    // Applications may follow their own transactions.
    if !caller.may(Permission::Transact) {
        caller.require(Permission::Read, "read transactions")?;
    }
    let v = api.coordinator.get(&xid)?;
    Ok(Json(view_json(&v, true, &caller)).into_response())
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
    Extension(caller): Extension<Caller>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    caller.require(Permission::Read, "list transactions")?;
    let q = query(q)?;
    let status = match q.status.as_deref().map(|s| GlobalStatus::parse(s).ok_or(s)) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(s)) => {
            let known: Vec<&str> = GlobalStatus::ALL.iter().map(|s| s.as_str()).collect();
            return Err(TcError::invalid(format!("unknown status {s:?}; use one of {}", known.join(", "))).into());
        }
    };
    let views = api.coordinator.list(status, limit(q.limit)?);
    let views: Vec<Value> = views.iter().map(|v| view_json(v, false, &caller)).collect();
    Ok(Json(json!({ "transactions": views })).into_response())
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
    Extension(caller): Extension<Caller>,
    q: Result<Query<LocksQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    caller.require(Permission::Read, "list locks")?;
    let q = query(q)?;
    let filter = |key: &crate::lock_key::LockKey| {
        let p = key.parts();
        q.resource.as_deref().is_none_or(|r| r == p.resource)
            && q.schema.as_deref().is_none_or(|s| s == p.schema)
            && q.table.as_deref().is_none_or(|t| t == p.table)
    };
    let rows = held_here(&api)?.locks.held_rows(&filter, limit(q.limit)?);
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
    Ok(Json(json!({ "locks": rows })).into_response())
}

/// The locks, if this node holds them; with several serving nodes only the lock leader
/// can list them.
fn held_here(api: &Api) -> Result<Arc<At>, TcError> {
    api.coordinator.at.held_here().ok_or_else(|| {
        TcError::new(
            ErrorCode::LockAuthorityUnavailable,
            "this node's locks are held by the cluster's lock leader: ask that node",
        )
    })
}

async fn whoami(Extension(caller): Extension<Caller>) -> Reply {
    Ok(Json(json!({
        "name": caller.name.as_ref(),
        "role": caller.role.as_str(),
        "may": {
            "read": caller.may(Permission::Read),
            "see_values": caller.may(Permission::SeeValues),
            "act": caller.may(Permission::Act),
            "administer": caller.may(Permission::Administer),
            "transact": caller.may(Permission::Transact),
        },
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    xid: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    since_ms: Option<u64>,
    after_id: Option<u64>,
    limit: Option<usize>,
}

async fn audit_list(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    caller.require(Permission::Read, "read the audit trail")?;
    let q = query(q)?;
    let filter = AuditFilter {
        xid: q.xid,
        actor: q.actor,
        action: q.action,
        since_ms: q.since_ms,
        after_id: q.after_id,
    };
    let records = api.coordinator.audit_list(&filter, limit(q.limit)?);
    let records: Vec<Value> = records.iter().map(|r| audit_json(r, &caller)).collect();
    Ok(Json(json!({ "records": records })).into_response())
}

/// An audit record as the caller may see it (overwritten values are values too).
fn audit_json(r: &crate::audit::AuditRecord, caller: &Caller) -> Value {
    let mut j = r.to_json();
    if !caller.may(Permission::SeeValues) {
        redact(&mut j["effect"]);
    }
    j
}

async fn audit_show(State(api): State<Api>, Extension(caller): Extension<Caller>, XidPath(id): XidPath) -> Reply {
    caller.require(Permission::Read, "read the audit trail")?;
    let record = id
        .parse()
        .ok()
        .and_then(|id| api.coordinator.audit_get(id))
        .ok_or_else(|| TcError::new(ErrorCode::NotFound, format!("there is no audit record {id:?}")))?;
    Ok(Json(audit_json(&record, &caller)).into_response())
}

async fn audit_verify(State(api): State<Api>, Extension(caller): Extension<Caller>) -> Reply {
    caller.require(Permission::Read, "verify the audit trail")?;
    Ok(Json(match api.coordinator.audit_verify() {
        Ok((records, last)) => json!({ "ok": true, "records": records, "last_hash": crate::auth::hex(&last) }),
        Err(broken) => json!({ "ok": false, "broken_at": broken.id, "problem": broken.problem }),
    })
    .into_response())
}

fn token_json(record: &crate::auth::TokenRecord, last_used_ms: Option<u64>) -> Value {
    json!({
        "name": record.name,
        "role": record.role.as_str(),
        "created_ms": record.created_ms,
        "created_by": record.created_by,
        "expires_ms": record.expires_ms,
        "last_used_ms": last_used_ms,
    })
}

async fn tokens_list(State(api): State<Api>, Extension(caller): Extension<Caller>) -> Reply {
    caller.require(Permission::Administer, "list tokens")?;
    let tokens: Vec<Value> = api
        .coordinator
        .tokens
        .list()
        .iter()
        .map(|t| token_json(&t.record, t.last_used_ms))
        .collect();
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    role: String,
    /// Milliseconds from now until it expires.
    expires_in_ms: Option<u64>,
    #[serde(default)]
    reason: String,
}

async fn token_create(State(api): State<Api>, op: Operator, body: Bytes) -> Reply {
    let (by, _) = op.request(
        &api.coordinator,
        Permission::Administer,
        ("token.create", "create tokens"),
        &Bytes::new(),
    )?;
    let body: TokenBody = serde_json::from_slice(&body).map_err(|e| {
        TcError::invalid(format!(
            r#"the request body must be JSON like {{"name": "orders-proxy", "role": "proxy", "reason": "..."}}: {e}"#
        ))
    })?;
    let role = Role::parse(&body.role)?;
    let expires_ms = body.expires_in_ms.map(|ms| now_ms().saturating_add(ms));
    let by = OperatorRequest {
        reason: body.reason,
        ..by
    };
    let (record, secret) = api.coordinator.create_token(by, &body.name, role, expires_ms).await?;
    let mut j = token_json(&record, None);
    j["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(j)).into_response())
}

async fn token_revoke(State(api): State<Api>, op: Operator, XidPath(name): XidPath, body: Bytes) -> Reply {
    let (by, _) = op.request(
        &api.coordinator,
        Permission::Administer,
        ("token.revoke", "revoke tokens"),
        &body,
    )?;
    let record = api.coordinator.revoke_token(by, &name).await?;
    Ok(Json(token_json(&record, None)).into_response())
}

async fn healthz(State(api): State<Api>) -> Response {
    let c = &api.coordinator;
    let body = |status: &str, reason: Option<String>| {
        json!({
            "status": status,
            // One node on its own store, the active one of several sharing etcd, or one of
            // several serving nodes.
            "role": if c.config.etcd.serving() {
                "serving"
            } else if c.config.etcd.enabled() {
                "active"
            } else {
                "single"
            },
            // Several serving nodes: whether this node leads the cluster's locks, and where the
            // node that does is reached (null while none is known).
            "lock_leader": match &c.at {
                crate::at::LockAuthority::Remote(remote) => json!({
                    "this_node": remote.leadership.here.borrow().is_some(),
                    "endpoint": remote.leadership.address.borrow().as_ref().map(|a| a.endpoint.clone()),
                }),
                crate::at::LockAuthority::Local(_) => Value::Null,
            },
            "version": env!("CARGO_PKG_VERSION"),
            "reason": reason,
            "transactions": c.sessions.read().len(),
            "resource_managers": c.rms.connected(),
            // With several serving nodes, the lock leader's count.
            "locks_held": c.at.held_here().map(|at| at.locks.held_count()),
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
    if !c.owns_store() {
        let reason = "this node's etcd lease may have run out: it stops, and another node takes over";
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(body("lost_ownership", Some(reason.into()))),
        )
            .into_response();
    }
    Json(body("serving", None)).into_response()
}

pub(crate) async fn metrics() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ferrata_rpc::process::prometheus().render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_leaves_which_rows_and_columns_not_what_they_hold() {
        let mut detail = json!({
            "rows": [{ "row": "r", "primary_key": { "id": "7" }, "digest": "ab", "state": "changed",
                "columns": [{ "column": "note", "before": "a", "after": "b", "current": "c",
                              "display": { "before": "a", "after": "b", "current": "c" } }] }],
            "branch_digest": "cd",
            "statements": [{ "sql": "UPDATE t SET note = ? WHERE id = ?", "params": ["'a'", "7"] }],
        });
        redact(&mut detail);
        let text = detail.to_string();
        for value in ["\"a\"", "\"b\"", "\"c\"", "\"ab\"", "\"cd\"", "'a'"] {
            assert!(!text.contains(value), "{value} in {text}");
        }
        assert_eq!(detail["rows"][0]["primary_key"]["id"], "7");
        assert_eq!(detail["rows"][0]["columns"][0]["column"], "note");
    }

    #[test]
    fn loopback_names() {
        for h in [
            "127.0.0.1:7091",
            "localhost:7091",
            "[::1]:7091",
            "LOCALHOST",
            "127.8.9.1",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example:7091",
            "10.0.0.1:7091",
            "localhost.evil.example",
            "[::2]:1",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
