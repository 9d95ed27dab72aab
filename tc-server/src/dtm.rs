//! The DTM-compatible facade: DTM's HTTP API under `/api/dtmsvr/` (endpoint names, JSON
//! fields, statuses and result codes), on the coordinator's own model, so that DTM's SDKs
//! run sagas and TCC transactions against ferrata-tc with no change but the server URL.
//!
//! A DTM transaction is named by the client's `gid`; it is a Ferrata transaction named
//! `dtm:<trans_type>:<gid>` ([`Aliases`] finds it again, rebuilt from the names at start).
//! Answers are DTM's: 200 `{"dtm_result": "SUCCESS"}`, 409 `{"dtm_result": "FAILURE",
//! "message"}` for a request the transaction's state refuses, 425 ONGOING; and, unlike DTM,
//! 400 for a malformed request and 404 for an unknown gid, each with a `message`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ferrata_rpc::ErrorCode;
use parking_lot::Mutex;
use serde_json::{Map, Value, json};

use crate::auth::{Caller, Permission};
use crate::calls::branch::{MAX_REQUEST_TIMEOUT_MS, Payload};
use crate::coordinator::{Coordinator, TxnView};
use crate::error::TcError;
use crate::http::Operator;
use crate::model::{BranchMode, BranchStatus, GlobalStatus};
use crate::msg::MsgBranch;
use crate::saga::{Options, StepRequest};
use crate::sagas::SagaRequest;
use crate::tcc::TccBranch;
use crate::timeline::{AttemptResult, DecidedBy, EventKind};

/// The prefix of a facade transaction's name; native requests may not use it.
pub const NAME_PREFIX: &str = "dtm:";

/// Longest gid (DTM's column).
const MAX_GID: usize = 128;

/// The facade's state: the coordinator, and gids to XIDs.
#[derive(Clone)]
struct Facade {
    coordinator: Arc<Coordinator>,
    aliases: Arc<Aliases>,
}

/// Which Ferrata transaction a gid names. Complete for the transactions the coordinator
/// knows (built from their names at start, added to as the facade creates them), so a gid
/// it lacks is new; an entry whose transaction was forgotten is dropped when met.
#[derive(Default)]
struct Aliases {
    by_gid: Mutex<HashMap<String, (String, String)>>,
    /// Creating a transaction for a gid: one at a time, so a gid names one transaction.
    creating: tokio::sync::Mutex<()>,
}

impl Aliases {
    fn build(coordinator: &Coordinator) -> Aliases {
        let aliases = Aliases::default();
        for v in coordinator.list(None, usize::MAX) {
            if let Some((trans_type, gid)) = parse_name(&v.record.name) {
                aliases
                    .by_gid
                    .lock()
                    .insert(gid.to_owned(), (v.xid.clone(), trans_type.to_owned()));
            }
        }
        aliases
    }

    /// The XID and trans_type of `gid`'s transaction, if the coordinator still knows it.
    fn find(&self, coordinator: &Coordinator, gid: &str) -> Option<(TxnView, String)> {
        let (xid, trans_type) = self.by_gid.lock().get(gid).cloned()?;
        match coordinator.get(&xid) {
            Ok(view) => Some((view, trans_type)),
            Err(_) => {
                self.by_gid.lock().remove(gid);
                None
            }
        }
    }
}

/// The name of the transaction of DTM's `gid` of `trans_type`.
fn dtm_name(trans_type: &str, gid: &str) -> String {
    format!("{NAME_PREFIX}{trans_type}:{gid}")
}

fn parse_name(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(NAME_PREFIX)?.split_once(':')
}

pub fn routes<S: Clone + Send + Sync + 'static>(coordinator: Arc<Coordinator>) -> Router<S> {
    let facade = Facade {
        aliases: Arc::new(Aliases::build(&coordinator)),
        coordinator,
    };
    Router::new()
        .route("/api/dtmsvr/version", get(version))
        .route("/api/dtmsvr/newGid", get(new_gid))
        .route("/api/dtmsvr/prepare", post(prepare))
        .route("/api/dtmsvr/submit", post(submit))
        .route("/api/dtmsvr/abort", post(abort))
        .route("/api/dtmsvr/registerBranch", post(register_branch))
        .route("/api/dtmsvr/registerTccBranch", post(register_branch))
        .route("/api/dtmsvr/registerXaBranch", post(register_branch))
        .route("/api/dtmsvr/query", get(query))
        .route("/api/dtmsvr/all", get(all))
        .route("/api/dtmsvr/forceStop", post(force_stop))
        .route("/api/dtmsvr/resetNextCronTime", post(reset_next_cron_time))
        .with_state(facade)
}

/// A facade answer: DTM's envelope.
type Reply = Result<Response, DtmError>;

fn success(mut extra: Value) -> Reply {
    extra["dtm_result"] = json!("SUCCESS");
    Ok(Json(extra).into_response())
}

struct DtmError(StatusCode, String);

impl DtmError {
    fn bad(message: impl Into<String>) -> DtmError {
        DtmError(StatusCode::BAD_REQUEST, message.into())
    }

    /// The transaction's state refuses the request (DTM's FAILURE).
    fn failure(message: impl Into<String>) -> DtmError {
        DtmError(StatusCode::CONFLICT, message.into())
    }

    /// The transaction's status does not allow `what` (DTM's wording).
    fn refused(trans_type: &str, status: GlobalStatus, what: &str) -> DtmError {
        DtmError::failure(format!(
            "current status '{}', cannot {what}",
            dtm_status(trans_type, status)
        ))
    }

    fn unknown(gid: &str) -> DtmError {
        DtmError(StatusCode::NOT_FOUND, format!("no transaction with gid {gid:?}"))
    }
}

impl From<TcError> for DtmError {
    fn from(e: TcError) -> DtmError {
        let status = match e.code {
            ErrorCode::GlobalStatusInvalid | ErrorCode::AlreadyExists | ErrorCode::PreconditionFailed => {
                StatusCode::CONFLICT
            }
            code => StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        };
        DtmError(status, e.message)
    }
}

impl IntoResponse for DtmError {
    fn into_response(self) -> Response {
        let DtmError(status, message) = self;
        let mut body = json!({ "message": message });
        match status {
            StatusCode::CONFLICT => body["dtm_result"] = json!("FAILURE"),
            StatusCode::TOO_EARLY => body["dtm_result"] = json!("ONGOING"),
            _ => {}
        }
        (status, Json(body)).into_response()
    }
}

/// A request body as a JSON object; DTM's clients send nulls for unset fields and fields
/// this facade does not read, both taken as absent.
fn body_of(body: &Bytes) -> Result<Map<String, Value>, DtmError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(DtmError::bad("the request body must be a JSON object")),
        Err(e) => Err(DtmError::bad(format!("the request body is not JSON: {e}"))),
    }
}

/// A string field; `None` when absent or null.
fn text<'a>(body: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, DtmError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(DtmError::bad(format!("{field} must be a string, not {other}"))),
    }
}

/// A whole-number field (DTM's seconds and counts); 0 when absent or null.
fn number(body: &Map<String, Value>, field: &str) -> Result<u64, DtmError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| DtmError::bad(format!("{field} must be a whole number at least 0, not {v}"))),
    }
}

fn flag(body: &Map<String, Value>, field: &str) -> Result<bool, DtmError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(DtmError::bad(format!("{field} must be true or false, not {v}"))),
    }
}

/// `gid` of a request: required, at most 128 bytes (DTM's column; so its transaction's name
/// fits too), none of them control characters.
fn gid_of(body: &Map<String, Value>) -> Result<String, DtmError> {
    let gid = text(body, "gid")?.unwrap_or_default();
    if gid.is_empty() || gid.len() > MAX_GID || gid.chars().any(char::is_control) {
        return Err(DtmError::bad(format!(
            "gid must have 1 to {MAX_GID} bytes and no control characters"
        )));
    }
    Ok(gid.to_owned())
}

/// The trans_types this facade serves; the others are refused with what to use instead.
fn trans_type_of(body: &Map<String, Value>) -> Result<&'static str, DtmError> {
    match text(body, "trans_type")?.unwrap_or_default() {
        "saga" => Ok("saga"),
        "tcc" => Ok("tcc"),
        "msg" => Ok("msg"),
        "xa" => Err(DtmError::bad(
            "trans_type xa is not served over the DTM API: put the service's database behind ferrata-proxy and use MODE XA",
        )),
        "workflow" => Err(DtmError::bad(
            "trans_type workflow is not served by this ferrata-tc; saga, tcc and msg are",
        )),
        other => Err(DtmError::bad(format!(
            "unknown trans_type {other:?}: use saga, tcc or msg"
        ))),
    }
}

/// Refuses options this facade does not apply, rather than ignore them.
fn unsupported(body: &Map<String, Value>) -> Result<(), DtmError> {
    if let Some(p) = text(body, "protocol")?
        && !p.is_empty()
        && p != "http"
    {
        return Err(DtmError::bad(format!("protocol {p:?}: only http branches are called")));
    }
    Ok(())
}

/// DTM's `request_timeout` (seconds) as a call's time limit.
fn request_timeout_ms(body: &Map<String, Value>) -> Result<Option<u64>, DtmError> {
    match number(body, "request_timeout")? {
        0 => Ok(None),
        s if s.saturating_mul(1000) > MAX_REQUEST_TIMEOUT_MS => Err(DtmError::bad(format!(
            "request_timeout must be at most {} seconds",
            MAX_REQUEST_TIMEOUT_MS / 1000
        ))),
        s => Ok(Some(s * 1000)),
    }
}

fn branch_headers(body: &Map<String, Value>) -> Result<std::collections::BTreeMap<String, String>, DtmError> {
    match body.get("branch_headers") {
        None | Some(Value::Null) => Ok(Default::default()),
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|_| DtmError::bad("branch_headers must be an object of strings"))
        }
    }
}

async fn version() -> Reply {
    success(json!({ "version": concat!("ferrata-tc ", env!("CARGO_PKG_VERSION")) }))
}

async fn new_gid(Extension(caller): Extension<Caller>) -> Reply {
    caller.require(Permission::Transact, "begin global transactions")?;
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).map_err(|e| DtmError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    success(json!({ "gid": crate::auth::hex(&bytes) }))
}

/// Creates `gid`'s transaction with `create` unless it exists: its XID, and the existing
/// transaction (`None`: created).
async fn create_once<F, Fut>(
    f: &Facade,
    gid: &str,
    trans_type: &str,
    create: F,
) -> Result<(String, Option<TxnView>), DtmError>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<String, TcError>>,
{
    let _one = f.aliases.creating.lock().await;
    if let Some((view, existing)) = f.aliases.find(&f.coordinator, gid) {
        if existing != trans_type {
            return Err(DtmError::failure(format!(
                "gid {gid:?} is a {existing} transaction, not a {trans_type} one"
            )));
        }
        return Ok((view.xid.clone(), Some(view)));
    }
    let xid = create(dtm_name(trans_type, gid)).await?;
    f.aliases
        .by_gid
        .lock()
        .insert(gid.to_owned(), (xid.clone(), trans_type.to_owned()));
    Ok((xid, None))
}

async fn prepare(State(f): State<Facade>, Extension(caller): Extension<Caller>, body: Bytes) -> Reply {
    caller.require(Permission::Transact, "begin global transactions")?;
    let body = body_of(&body)?;
    let gid = gid_of(&body)?;
    let trans_type = trans_type_of(&body)?;
    unsupported(&body)?;
    if trans_type == "msg" {
        let messages = msg_request(&body, &gid)?;
        let timeout_ms = number(&body, "timeout_to_fail")?.saturating_mul(1000);
        let coordinator = Arc::clone(&f.coordinator);
        let (_, existing) = create_once(&f, &gid, "msg", |name| async move {
            coordinator.prepare_messages(name, timeout_ms, messages).await
        })
        .await?;
        return match existing.map(|v| v.record.status) {
            None | Some(GlobalStatus::Begin) => success(json!({})),
            Some(s) => Err(DtmError::refused("msg", s, "prepare")),
        };
    }
    if trans_type != "tcc" {
        return Err(DtmError::bad("prepare is for tcc and msg; a saga is submitted whole"));
    }
    if !branch_headers(&body)?.is_empty() || request_timeout_ms(&body)?.is_some() {
        return Err(DtmError::bad(
            "branch_headers and request_timeout of a tcc transaction are not applied by this facade: leave them \
             unset (the branches use [calls] request_timeout_ms)",
        ));
    }
    let timeout_ms = number(&body, "timeout_to_fail")?.saturating_mul(1000);
    let coordinator = Arc::clone(&f.coordinator);
    let (_, existing) = create_once(&f, &gid, "tcc", |name| async move {
        coordinator.begin_named(timeout_ms, name).await
    })
    .await?;
    match existing.map(|v| v.record.status) {
        None | Some(GlobalStatus::Begin) => success(json!({})),
        Some(s) => Err(DtmError::refused("tcc", s, "prepare")),
    }
}

async fn submit(State(f): State<Facade>, Extension(caller): Extension<Caller>, body: Bytes) -> Reply {
    caller.require(Permission::Transact, "submit global transactions")?;
    let body = body_of(&body)?;
    let gid = gid_of(&body)?;
    let trans_type = trans_type_of(&body)?;
    unsupported(&body)?;
    if trans_type == "msg" && f.aliases.find(&f.coordinator, &gid).is_none() {
        // Submitted without a prepare: prepared and committed at once.
        let messages = msg_request(&body, &gid)?;
        let timeout_ms = number(&body, "timeout_to_fail")?.saturating_mul(1000);
        let coordinator = Arc::clone(&f.coordinator);
        create_once(&f, &gid, "msg", |name| async move {
            coordinator.prepare_messages(name, timeout_ms, messages).await
        })
        .await?;
    }
    if trans_type != "saga" {
        let Some((view, existing)) = f.aliases.find(&f.coordinator, &gid) else {
            return Err(DtmError::unknown(&gid));
        };
        if existing != trans_type {
            return Err(DtmError::failure(format!("gid {gid:?} is a {existing} transaction")));
        }
        match view.record.status {
            GlobalStatus::Begin => {
                f.coordinator.commit(&view.xid).await?;
            }
            s if s.is_committing() || matches!(s, GlobalStatus::Committed | GlobalStatus::CommitFailed) => {}
            s => return Err(DtmError::refused(trans_type, s, "submit")),
        }
        return outcome_if_asked(&f, &body, trans_type, &view.xid).await;
    }
    // Checked (its URLs looked up) before the creation lock, so a slow name server holds up
    // no other gid; a saga already there is not checked again.
    let request = saga_request(&body, &gid)?;
    let planned = match f.aliases.find(&f.coordinator, &gid) {
        Some(_) => None,
        None => Some(f.coordinator.plan_saga(request.clone()).await?),
    };
    let coordinator = Arc::clone(&f.coordinator);
    let (xid, existing) = create_once(&f, &gid, "saga", |_| async move {
        let planned = match planned {
            Some(planned) => planned,
            // Gone from the history between the two looks: checked under the lock.
            None => coordinator.plan_saga(request).await?,
        };
        coordinator.submit_saga(planned).await
    })
    .await?;
    // Submitted again: the same saga, whatever it has come to, unless it failed.
    match existing.map(|v| v.record.status) {
        Some(s) if dtm_status("saga", s) == "failed" => Err(DtmError::refused("saga", s, "submit")),
        _ => outcome_if_asked(&f, &body, "saga", &xid).await,
    }
}

/// A DTM msg (prepare or submit) as messages: each step's `action` a message named by its
/// position, delivered with DTM's doubling from `retry_interval` (10 s if unset), after
/// `custom_data.delay` seconds; `query_prepared` asked past `timeout_to_fail`.
fn msg_request(body: &Map<String, Value>, gid: &str) -> Result<Vec<MsgBranch>, DtmError> {
    let delay_ms = match custom_data(body)?.get("delay") {
        None | Some(Value::Null) => 0,
        Some(d) => d
            .as_u64()
            .ok_or_else(|| DtmError::bad("custom_data.delay must be a whole number of seconds"))?
            .saturating_mul(1000),
    };
    let policy = match number(body, "retry_interval")? {
        0 => "dtm".to_owned(),
        s => format!("dtm:{s}s"),
    };
    let query_prepared = text(body, "query_prepared")?.unwrap_or_default().to_owned();
    let mut messages = Vec::new();
    for (i, (step, payload)) in steps_of(body, gid)?.into_iter().enumerate() {
        let action = text(&step, "action")?.unwrap_or_default().to_owned();
        if action.starts_with("topic://") {
            return Err(DtmError::bad(format!(
                "step {i}: topics ({action}) are not served by this ferrata-tc: give each message its URL"
            )));
        }
        messages.push(MsgBranch {
            name: format!("{:02}", i + 1),
            target: action,
            payload,
            policy: policy.clone(),
            key: String::new(),
            delay_ms,
            query_prepared: query_prepared.clone(),
            check_resource: String::new(),
            check_barrier: String::new(),
            barrier_confirmed: false,
        });
    }
    Ok(messages)
}

/// A submit's answer: SUCCESS at once, or with DTM's `wait_result` once the first pass ended
/// (`Coordinator::await_pass`): SUCCESS when it committed (a TCC transaction: every branch
/// confirmed), FAILURE with the reason when it rolled back (after the first compensation
/// pass) or a branch can never confirm, ONGOING (425) while an action or a confirm waits to
/// retry.
async fn outcome_if_asked(f: &Facade, body: &Map<String, Value>, trans_type: &str, xid: &str) -> Reply {
    if !flag(body, "wait_result")? {
        return success(json!({}));
    }
    match f.coordinator.await_pass(xid).await? {
        GlobalStatus::Committed => success(json!({})),
        GlobalStatus::Begin | GlobalStatus::Committing | GlobalStatus::AsyncCommitting => Err(DtmError(
            StatusCode::TOO_EARLY,
            format!("{trans_type} {xid} waits to retry a call; it goes on: follow it with query"),
        )),
        GlobalStatus::CommitFailed => Err(DtmError::failure(format!(
            "{trans_type} {xid} committed, but a branch can never confirm: it waits for an operator"
        ))),
        _ => Err(DtmError::failure(
            rollback_reason(&f.coordinator, xid).unwrap_or_else(|| format!("{trans_type} {xid} rolled back")),
        )),
    }
}

/// A step of a saga or msg submission (its JSON object), with what its calls carry.
type Step = (Map<String, Value>, Payload);

/// The `steps` of a saga or msg submission, each with its payload (`payloads`, JSON texts)
/// and the calls' shared settings (`branch_headers`, `request_timeout`, the gid).
fn steps_of(body: &Map<String, Value>, gid: &str) -> Result<Vec<Step>, DtmError> {
    let steps: Vec<Map<String, Value>> = match body.get("steps") {
        Some(Value::Array(steps)) => steps
            .iter()
            .map(|s| match s {
                Value::Object(m) => Ok(m.clone()),
                other => Err(DtmError::bad(format!("each step must be an object, not {other}"))),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(DtmError::bad("steps must be a list of {\"action\", ...}")),
    };
    let payloads: Vec<Value> = match body.get("payloads") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(p)) => p.clone(),
        Some(_) => return Err(DtmError::bad("payloads must be a list of strings")),
    };
    if !payloads.is_empty() && payloads.len() != steps.len() {
        return Err(DtmError::bad(format!(
            "{} payloads for {} steps: give one per step",
            payloads.len(),
            steps.len()
        )));
    }
    let headers = branch_headers(body)?;
    let request_timeout_ms = request_timeout_ms(body)?;
    steps
        .into_iter()
        .enumerate()
        .map(|(i, step)| {
            let data = match payloads.get(i) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err(DtmError::bad(format!("payload {i} must be a string (the JSON text)"))),
            };
            let payload = Payload {
                data,
                headers: headers.clone(),
                request_timeout_ms,
                gid: Some(gid.to_owned()),
            };
            Ok((step, payload))
        })
        .collect()
}

/// `custom_data`: a JSON text (Go's SDK) with the saga's orders, the msg's delay.
fn custom_data(body: &Map<String, Value>) -> Result<Value, DtmError> {
    match text(body, "custom_data")?.filter(|c| !c.is_empty()) {
        None => Ok(Value::Null),
        Some(custom) => {
            serde_json::from_str(custom).map_err(|e| DtmError::bad(format!("custom_data is not JSON: {e}")))
        }
    }
}

/// A DTM saga submission as a saga request.
fn saga_request(body: &Map<String, Value>, gid: &str) -> Result<SagaRequest, DtmError> {
    let mut requests = Vec::new();
    for (step, payload) in steps_of(body, gid)? {
        requests.push(StepRequest {
            action: text(&step, "action")?.unwrap_or_default().to_owned(),
            compensate: text(&step, "compensate")?.unwrap_or_default().to_owned(),
            payload,
        });
    }
    let mut options = Options {
        concurrent: flag(body, "concurrent")?,
        ..Options::default()
    };
    let custom = custom_data(body)?;
    if custom.get("concurrent").and_then(Value::as_bool) == Some(true) {
        options.concurrent = true;
    }
    if let Some(orders) = custom.get("orders").filter(|o| !o.is_null()) {
        options.orders = serde_json::from_value(orders.clone()).map_err(|_| {
            DtmError::bad("custom_data.orders must map a step's position to the positions it waits for")
        })?;
    }
    options.retry_interval_ms = match number(body, "retry_interval")? {
        0 => None,
        s => Some(s.saturating_mul(1000)),
    };
    options.retry_limit = match number(body, "retry_limit")? {
        0 => None,
        n => Some(u32::try_from(n).map_err(|_| DtmError::bad("retry_limit is too large"))?),
    };
    Ok(SagaRequest {
        name: dtm_name("saga", gid),
        timeout_ms: number(body, "timeout_to_fail")?.saturating_mul(1000),
        steps: requests,
        options,
    })
}

async fn abort(State(f): State<Facade>, Extension(caller): Extension<Caller>, body: Bytes) -> Reply {
    caller.require(Permission::Transact, "roll back global transactions")?;
    let body = body_of(&body)?;
    let gid = gid_of(&body)?;
    let Some((view, trans_type)) = f.aliases.find(&f.coordinator, &gid) else {
        return Err(DtmError::unknown(&gid));
    };
    if trans_type == "saga" {
        return Err(DtmError::failure(
            "trans type 'saga' cannot abort: a saga rolls back when an action fails",
        ));
    }
    match view.record.status {
        GlobalStatus::Begin => {
            f.coordinator.rollback(&view.xid).await?;
            success(json!({}))
        }
        s if s.is_rolling_back() || dtm_status(&trans_type, s) == "failed" => success(json!({})),
        s => Err(DtmError::refused(&trans_type, s, "abort")),
    }
}

async fn register_branch(State(f): State<Facade>, Extension(caller): Extension<Caller>, body: Bytes) -> Reply {
    caller.require(Permission::Transact, "register branches")?;
    let body = body_of(&body)?;
    let gid = gid_of(&body)?;
    if trans_type_of(&body)? != "tcc" {
        return Err(DtmError::bad("registerBranch is for tcc branches"));
    }
    let Some((view, trans_type)) = f.aliases.find(&f.coordinator, &gid) else {
        return Err(DtmError::unknown(&gid));
    };
    if trans_type != "tcc" || view.record.status != GlobalStatus::Begin {
        return Err(DtmError::failure(format!(
            "no trans with gid: {gid} status: prepared found"
        )));
    }
    let branch = TccBranch {
        name: text(&body, "branch_id")?.unwrap_or_default().to_owned(),
        confirm: text(&body, "confirm")?.unwrap_or_default().to_owned(),
        cancel: text(&body, "cancel")?.unwrap_or_default().to_owned(),
        payload: Payload {
            data: text(&body, "data")?.unwrap_or_default().to_owned(),
            gid: Some(gid.clone()),
            ..Payload::default()
        },
    };
    let request = ferrata_rpc::pb::BranchRegisterRequest {
        xid: view.xid.clone(),
        branch_type: ferrata_rpc::pb::BranchType::Tcc as i32,
        application_data: branch.encode(),
        ..Default::default()
    };
    f.coordinator.register(request).await?;
    success(json!({}))
}

#[derive(serde::Deserialize)]
struct GidQuery {
    gid: Option<String>,
}

async fn query(
    State(f): State<Facade>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<GidQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    if !caller.may(Permission::Transact) {
        caller.require(Permission::Read, "read transactions")?;
    }
    let gid = q
        .ok()
        .and_then(|Query(q)| q.gid)
        .filter(|g| !g.is_empty())
        .ok_or_else(|| DtmError::bad("no gid specified"))?;
    let Some((view, trans_type)) = f.aliases.find(&f.coordinator, &gid) else {
        return Err(DtmError::unknown(&gid));
    };
    let reason = rollback_reason(&f.coordinator, &view.xid);
    Ok(Json(json!({
        "transaction": transaction_json(&view, &trans_type, &gid, reason.as_deref()),
        "branches": branches_json(&view, &gid),
    }))
    .into_response())
}

#[derive(serde::Deserialize)]
struct AllQuery {
    position: Option<String>,
    limit: Option<String>,
    status: Option<String>,
    #[serde(rename = "transType")]
    trans_type: Option<String>,
}

async fn all(
    State(f): State<Facade>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<AllQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    caller.require(Permission::Read, "list transactions")?;
    let q = crate::http::query(q)?;
    let skip: usize = match q.position.as_deref().filter(|p| !p.is_empty()) {
        None => 0,
        Some(p) => p
            .parse()
            .map_err(|_| DtmError::bad("position must be one this API returned"))?,
    };
    let limit: usize = match q.limit.as_deref().filter(|l| !l.is_empty()) {
        None => 100,
        Some(l) => l
            .parse()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| DtmError::bad("limit must be 1 to 10000"))?,
    };
    let mut out = Vec::new();
    let mut seen = 0;
    for v in f.coordinator.list(None, usize::MAX) {
        let Some((trans_type, gid)) = parse_name(&v.record.name) else {
            continue;
        };
        let status = dtm_status(trans_type, v.record.status);
        if q.status.as_deref().is_some_and(|s| !s.is_empty() && s != status)
            || q.trans_type
                .as_deref()
                .is_some_and(|t| !t.is_empty() && t != trans_type)
        {
            continue;
        }
        seen += 1;
        if seen <= skip {
            continue;
        }
        if out.len() == limit {
            return Ok(
                Json(json!({ "transactions": out, "next_position": (skip + limit).to_string() })).into_response(),
            );
        }
        out.push(transaction_json(&v, trans_type, gid, None));
    }
    Ok(Json(json!({ "transactions": out, "next_position": "" })).into_response())
}

/// An operator's action (the role that may resolve): Ferrata stops by hand only a transaction
/// that cannot finish by itself (`resolve`, audited, its rows released); a running one is
/// rolled back (abort) or waited for.
async fn force_stop(State(f): State<Facade>, op: Operator, body: Bytes) -> Reply {
    if let Err(e) = op.caller.require(Permission::Act, "stop transactions") {
        return Err(f.coordinator.refused("resolve", &op.caller, e).into());
    }
    let body = body_of(&body)?;
    let gid = gid_of(&body)?;
    let Some((view, _)) = f.aliases.find(&f.coordinator, &gid) else {
        return Err(DtmError::unknown(&gid));
    };
    let by = crate::operator::OperatorRequest {
        caller: op.caller,
        origin: op.origin,
        reason: format!("forceStop of gid {gid} through the DTM API"),
        expect_version: None,
    };
    match f.coordinator.resolve(&view.xid, by, false, false).await {
        Ok(_) => success(json!({})),
        Err(e) if e.code == ErrorCode::GlobalStatusInvalid => Err(DtmError::failure(format!(
            "global transaction force stop error: {}; a running transaction is aborted or waited for",
            e.message
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn reset_next_cron_time(State(f): State<Facade>, Extension(caller): Extension<Caller>, body: Bytes) -> Reply {
    caller.require(Permission::Transact, "hurry global transactions")?;
    let body = body_of(&body)?;
    let gid = gid_of(&body)?;
    let Some((view, _)) = f.aliases.find(&f.coordinator, &gid) else {
        return Err(DtmError::unknown(&gid));
    };
    f.coordinator.hurry(&view.xid)?;
    success(json!({}))
}

/// DTM's status of a transaction of `trans_type` in `status`.
fn dtm_status(trans_type: &str, status: GlobalStatus) -> &'static str {
    use GlobalStatus::*;
    match status {
        // A saga runs its actions in Begin; a TCC transaction waits for its submit.
        Begin if trans_type == "saga" => "submitted",
        Begin => "prepared",
        Committing | AsyncCommitting | CommitFailed => "submitted",
        Committed => "succeed",
        Rollbacked | TimeoutRollbacked => "failed",
        Rollbacking
        | RollbackRetrying
        | RollbackFailed
        | TimeoutRollbacking
        | TimeoutRollbackRetrying
        | TimeoutRollbackFailed => "aborting",
    }
}

/// Why the transaction rolled back, from its timeline: the refusing action, the timeout.
fn rollback_reason(coordinator: &Coordinator, xid: &str) -> Option<String> {
    let (_, events) = coordinator.events(xid).ok()?;
    events.iter().find_map(|e| match &e.kind {
        EventKind::Action {
            result: AttemptResult::Failed,
            reason,
            ..
        } => Some(reason.clone()),
        EventKind::Decided {
            by: DecidedBy::Timeout, ..
        } => Some("timeout".to_owned()),
        _ => None,
    })
}

fn transaction_json(v: &TxnView, trans_type: &str, gid: &str, rollback_reason: Option<&str>) -> Value {
    let status = dtm_status(trans_type, v.record.status);
    let mut out = json!({
        "gid": gid,
        "xid": v.xid,
        "trans_type": trans_type,
        "status": status,
        "protocol": "http",
        "create_time": rfc3339(v.record.begin_ms),
        "update_time": rfc3339(v.record.updated_ms),
    });
    match status {
        "succeed" => out["finish_time"] = json!(rfc3339(v.record.updated_ms)),
        "failed" => out["rollback_time"] = json!(rfc3339(v.record.updated_ms)),
        _ => {}
    }
    if let Some(reason) = rollback_reason {
        out["rollback_reason"] = json!(reason);
    }
    if v.record.timeout_ms != 0 {
        out["timeout_to_fail"] = json!(v.record.timeout_ms / 1000);
    }
    out
}

/// DTM's two rows per branch (the undoing operation first, as DTM stores them), for the
/// branches still live.
fn branches_json(v: &TxnView, gid: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for b in &v.branches {
        let row = |op: &str, url: &str, status: &str| {
            json!({
                "gid": gid,
                "branch_id": "",
                "op": op,
                "url": url,
                "status": status,
                "create_time": rfc3339(b.registered_ms),
                "update_time": rfc3339(b.updated_ms),
            })
        };
        let mut pair = match b.mode {
            BranchMode::Tcc => match TccBranch::decode(&b.application_data) {
                Ok(t) => {
                    let mut rows = [
                        row("cancel", &t.cancel, "prepared"),
                        row("confirm", &t.confirm, "prepared"),
                    ];
                    rows.iter_mut().for_each(|r| r["branch_id"] = json!(t.name));
                    rows.to_vec()
                }
                Err(_) => continue,
            },
            BranchMode::Saga => match crate::saga::SagaStep::decode(&b.application_data) {
                Ok(s) => {
                    let action = match b.status {
                        BranchStatus::ActionDone => "succeed",
                        BranchStatus::ActionFailed => "failed",
                        _ => "prepared",
                    };
                    let mut rows = [
                        row("compensate", &s.compensate, "prepared"),
                        row("action", &s.action, action),
                    ];
                    rows.iter_mut().for_each(|r| r["branch_id"] = json!(s.name));
                    rows.to_vec()
                }
                Err(_) => continue,
            },
            BranchMode::Msg => match MsgBranch::decode(&b.application_data) {
                Ok(m) => {
                    let mut action = row("action", &m.target, "prepared");
                    action["branch_id"] = json!(m.name);
                    vec![action]
                }
                Err(_) => continue,
            },
            BranchMode::At | BranchMode::Xa => continue,
        };
        out.append(&mut pair);
    }
    out
}

/// Unix milliseconds as RFC 3339 UTC (`2026-12-07T02:14:27.123Z`).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_statuses_read_as_dtm_writes_them() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_609_667_123), "2026-12-07T02:14:27.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(dtm_status("saga", GlobalStatus::Begin), "submitted");
        assert_eq!(dtm_status("tcc", GlobalStatus::Begin), "prepared");
        assert_eq!(dtm_status("tcc", GlobalStatus::TimeoutRollbacked), "failed");
        assert_eq!(parse_name("dtm:saga:a:b"), Some(("saga", "a:b")));
        assert_eq!(parse_name("order"), None);
    }
}
