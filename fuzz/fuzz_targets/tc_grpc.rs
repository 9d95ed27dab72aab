//! The coordinator's gRPC services under a sequence of arbitrary calls.
//!
//! Input: calls until the input ends, each `[method][flags][message field]`. `method` picks
//! one of the nine methods (modulo 9); the message field is the protobuf-encoded request.
//! Flag bit 0 puts the last XID a reply named into the request (and bit 1 the last branch
//! id), when the field decodes as the request type; bit 2 sends the call without the token.
//! An Attach call reads further fields as its stream of `RmMessage`s, as many as flags bits
//! 4-7 say.
//!
//! Checks: nothing panics or hangs (an Attach stream ends when the client's does); every
//! reply is a well-formed gRPC reply whose messages decode as the method's response type;
//! every error the coordinator raises carries `ferrata-code`; a call without the token is
//! refused as unauthenticated.
#![no_main]

use bytes::Bytes;
use ferrata_fuzz::input::Input;
use ferrata_fuzz::tc::{self, TOKEN, Tc};
use ferrata_rpc::pb;
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const METHODS: [&str; 9] = [
    "/ferrata.v1.TransactionManager/GlobalBegin",
    "/ferrata.v1.TransactionManager/GlobalCommit",
    "/ferrata.v1.TransactionManager/GlobalRollback",
    "/ferrata.v1.TransactionManager/GlobalStatus",
    "/ferrata.v1.ResourceManager/BranchRegister",
    "/ferrata.v1.ResourceManager/BranchReport",
    "/ferrata.v1.ResourceManager/LockQuery",
    "/ferrata.v1.ResourceManager/Attach",
    "/ferrata.v1.ResourceManager/XaOrphan",
];

/// gRPC status codes tonic itself answers with (undecodable or oversized messages); every
/// other error comes from the coordinator and must carry its code.
const TONIC_CODES: [&str; 3] = ["8", "12", "13"];

/// `raw` with the last XID (and branch id) patched in, if it decodes as the request type.
fn patched(method: usize, raw: &[u8], xid: Option<&str>, branch_id: Option<u64>) -> Vec<u8> {
    fn with<M: Message + Default>(raw: &[u8], patch: impl FnOnce(&mut M)) -> Vec<u8> {
        match M::decode(raw) {
            Ok(mut m) => {
                patch(&mut m);
                m.encode_to_vec()
            }
            Err(_) => raw.to_vec(),
        }
    }
    let xid = |x: &mut String| {
        if let Some(v) = xid {
            *x = v.to_owned();
        }
    };
    match method {
        1..=3 => with(raw, |m: &mut pb::XidRequest| xid(&mut m.xid)),
        4 => with(raw, |m: &mut pb::BranchRegisterRequest| xid(&mut m.xid)),
        5 => with(raw, |m: &mut pb::BranchReportRequest| {
            xid(&mut m.xid);
            if let Some(b) = branch_id {
                m.branch_id = b;
            }
        }),
        6 => with(raw, |m: &mut pb::LockQueryRequest| xid(&mut m.xid)),
        8 => with(raw, |m: &mut pb::XaOrphanRequest| {
            xid(&mut m.xid);
            if let Some(b) = branch_id {
                m.branch_id = b;
            }
        }),
        _ => raw.to_vec(),
    }
}

/// Decodes every message of a successful reply as the method's response type.
fn decode_reply(method: usize, messages: &[Bytes], last_xid: &mut String, last_branch: &mut u64) {
    for m in messages {
        let m = m.clone();
        match method {
            0 => *last_xid = pb::GlobalBeginResponse::decode(m).expect("a GlobalBeginResponse").xid,
            1..=3 => drop(pb::GlobalOutcome::decode(m).expect("a GlobalOutcome")),
            4 => {
                *last_branch = pb::BranchRegisterResponse::decode(m)
                    .expect("a BranchRegisterResponse")
                    .branch_id
            }
            5 => drop(pb::BranchReportResponse::decode(m).expect("a BranchReportResponse")),
            6 => drop(pb::LockQueryResponse::decode(m).expect("a LockQueryResponse")),
            8 => drop(pb::XaOrphanResponse::decode(m).expect("a XaOrphanResponse")),
            _ => drop(pb::TcMessage::decode(m).expect("a TcMessage")),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tc::runtime();
    rt.block_on(async {
        let tc = Tc::start().await;
        let (tm, rm) = tc.grpc();
        let mut input = Input::new(data);
        let mut last_xid = String::new();
        let mut last_branch = 0u64;
        while !input.is_empty() {
            let method = usize::from(input.byte()) % METHODS.len();
            let flags = input.byte();
            let first = input.field();
            let message = patched(
                method,
                first,
                (flags & 1 != 0).then_some(last_xid.as_str()),
                (flags & 2 != 0).then_some(last_branch),
            );
            let mut messages = vec![message];
            if method == 7 {
                messages.extend((0..flags >> 4).map(|_| input.field().to_vec()));
            }
            let mut request = http::Request::builder()
                .method("POST")
                .uri(format!("http://tc{}", METHODS[method]))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            let authenticated = flags & 4 == 0;
            if authenticated {
                request = request.header("authorization", format!("Bearer {TOKEN}"));
            }
            let body = tc::grpc_frames(messages.iter().map(Vec::as_slice));
            let request = request.body(Full::new(body)).expect("a valid request");
            let reply = if method < 4 {
                tc::call(tm.clone(), request).await
            } else {
                tc::call(rm.clone(), request).await
            };
            assert_eq!(reply.status, 200, "{}: HTTP status {}", METHODS[method], reply.status);
            let code = reply
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("{}: no grpc-status", METHODS[method]))
                .to_owned();
            let replies = tc::grpc_messages(reply.body).expect("well-framed gRPC messages");
            if !authenticated {
                assert_eq!(code, "16", "{} without the token answered {code}", METHODS[method]);
                continue;
            }
            decode_reply(method, &replies, &mut last_xid, &mut last_branch);
            if code != "0" && !TONIC_CODES.contains(&code.as_str()) {
                assert!(
                    reply.headers.contains_key(ferrata_rpc::CODE_KEY),
                    "{}: status {code} ({:?}) without {}",
                    METHODS[method],
                    reply.headers.get("grpc-message"),
                    ferrata_rpc::CODE_KEY
                );
            }
        }
        tc.stop().await;
    });
});
