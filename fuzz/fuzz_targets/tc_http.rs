//! The coordinator's HTTP API under a sequence of arbitrary requests.
//!
//! Input: requests until the input ends, each `[op][route][path field][query field][body
//! field]` (fields are u16-length-prefixed). `op` picks the method (bits 0-2), the
//! authorization (bits 3-4: the token, none, a wrong one, a bare `Bearer`) and whether
//! `{xid}` in the path is the last XID a reply named (bit 5). `route` below 24 picks one of
//! the API's routes with the path field as the XID (or token name); otherwise the path field is the path.
//!
//! Checks: nothing panics or hangs; the API never answers 500 (no store fails here); every
//! error is JSON with a string `code` and `message`; a request without the token on /v1 gets
//! 401 and changes nothing.
#![no_main]

use bytes::Bytes;
use ferrata_fuzz::input::Input;
use ferrata_fuzz::tc::{self, TOKEN, Tc};
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 8] = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "POST"];
const ROUTES: [&str; 24] = [
    "/v1/transactions",
    "/v1/transactions/{xid}",
    "/v1/transactions/{xid}/events",
    "/v1/transactions/{xid}/pause",
    "/v1/transactions/{xid}/resume",
    "/v1/transactions/{xid}/branches/1/dirty",
    "/v1/transactions/{xid}/branches/1/accept",
    "/v1/transactions/{xid}/branches/1/restore",
    "/v1/transactions/{xid}/commit",
    "/v1/transactions/{xid}/rollback",
    "/v1/transactions/{xid}/retry",
    "/v1/transactions/{xid}/resolve",
    "/v1/locks",
    "/v1/audit",
    "/v1/audit/verify",
    "/v1/tokens",
    "/v1/tokens/{xid}",
    "/v1/whoami",
    "/v1/session",
    "/v1/deadlocks",
    "/v1/resource-managers",
    "/ui/",
    "/healthz",
    "/metrics",
];

fn request(method: &str, uri: &str, authorization: Option<&str>, body: &[u8]) -> Option<http::Request<Full<Bytes>>> {
    let mut builder = http::Request::builder().method(method).uri(uri);
    if let Some(a) = authorization {
        builder = builder.header("authorization", a);
    }
    if !body.is_empty() {
        builder = builder.header("content-type", "application/json");
    }
    // A URI a client could not send (http refuses to build it) is skipped.
    builder.body(Full::new(Bytes::copy_from_slice(body))).ok()
}

fuzz_target!(|data: &[u8]| {
    let rt = tc::runtime();
    rt.block_on(async {
        let tc = Tc::start().await;
        let router = tc.router();
        let mut input = Input::new(data);
        let mut last_xid = String::from("1-1");
        let wrong = format!("Bearer {TOKEN}x");
        let good = format!("Bearer {TOKEN}");
        while !input.is_empty() {
            let op = input.byte();
            let route = input.byte();
            let path = String::from_utf8_lossy(input.field()).into_owned();
            let query = String::from_utf8_lossy(input.field()).into_owned();
            let body = input.field();
            let method = METHODS[usize::from(op & 7)];
            let authorization = match (op >> 3) & 3 {
                0 => Some(good.as_str()),
                1 => None,
                2 => Some(wrong.as_str()),
                _ => Some("Bearer"),
            };
            let xid = if op & 0x20 != 0 {
                last_xid.as_str()
            } else {
                path.as_str()
            };
            let mut uri = match ROUTES.get(usize::from(route)) {
                Some(r) => r.replace("{xid}", xid),
                None => path.clone(),
            };
            if !query.is_empty() {
                uri = format!("{uri}?{query}");
            }
            let Some(request) = request(method, &uri, authorization, body) else {
                continue;
            };
            let before = tc.coordinator.list(None, 10_000).len();
            let reply = tc::call(router.clone(), request).await;
            assert_ne!(reply.status, 500, "{method} {uri} answered 500: {:?}", reply.body);
            let json: Option<serde_json::Value> = serde_json::from_slice(&reply.body).ok();
            if reply.status >= 400 && method != "HEAD" {
                let json = json
                    .as_ref()
                    .unwrap_or_else(|| panic!("{method} {uri}: error {} is not JSON: {:?}", reply.status, reply.body));
                assert!(
                    json["code"].is_string() && json["message"].is_string(),
                    "{method} {uri}: error {} lacks code or message: {json}",
                    reply.status
                );
            }
            if uri.starts_with("/v1/") && authorization != Some(good.as_str()) {
                assert!(
                    reply.status == 401 || reply.status == 404 || reply.status == 405,
                    "{method} {uri} without the token answered {}",
                    reply.status
                );
                assert!(
                    tc.coordinator.list(None, 10_000).len() <= before,
                    "{method} {uri} without the token began a transaction"
                );
            }
            if let Some(xid) = json.as_ref().and_then(|j| j["xid"].as_str()) {
                last_xid = xid.to_owned();
            }
        }
        tc.stop().await;
    });
});
