//! A whole coordinator per fuzz input, driven through the same HTTP router and gRPC services
//! `ferrata-tc` serves, without sockets: requests go straight into the tower services. Each
//! input gets a fresh store, coordinator and runtime, so a finding reproduces from its input
//! alone.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferrata_tc::config::Config;
use ferrata_tc::config::Secret;
use ferrata_tc::coordinator::Coordinator;
use ferrata_tc::grpc::{RmServer, TmServer};
use ferrata_tc::store::Store;
use ferrata_tc::store::journal::Journal;
use ferrata_tc::store::redb::RedbStore;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

/// The token the fuzzed coordinator requires.
pub const TOKEN: &str = "fuzz-token";

/// How long a reply may take before the target reports a hang. Generous: every limit of the
/// fuzzed coordinator is tens of milliseconds.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);

/// A coordinator with limits small enough that timeouts, lock waits and rollback waits all
/// happen within one input.
pub struct Tc {
    pub coordinator: Arc<Coordinator>,
    max_message_bytes: usize,
    journal: Journal,
    _data: tempfile::TempDir,
}

/// One reply, as a client would see it.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

fn config(data_dir: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: data_dir.to_owned(),
        token: Some(Secret(TOKEN.into())),
        ..Config::default()
    };
    let t = &mut config.transactions;
    t.default_timeout_ms = 200;
    t.max_timeout_ms = 1_000;
    t.max_lock_wait_ms = 20;
    t.rollback_wait_ms = 20;
    t.max_application_data = 4096;
    t.max_message_bytes = 64 * 1024;
    t.finished_history = 64;
    t.timeout_check_interval_ms = 10;
    t.guard_linger_ms = 50;
    let p = &mut config.phase2;
    p.call_timeout_ms = 50;
    p.retry_initial_ms = 10;
    p.retry_max_ms = 50;
    p.heartbeat_interval_ms = 50;
    config.validate().expect("the fuzz configuration is valid");
    config
}

/// A runtime for one input; dropping it ends every task the coordinator started.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

impl Tc {
    /// A fresh coordinator on an empty store in tmpfs (call inside the input's runtime).
    pub async fn start() -> Tc {
        let data = tempfile::Builder::new()
            .prefix("ferrata-fuzz-")
            .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .expect("a data directory");
        let config = config(data.path());
        let max_message_bytes = config.transactions.max_message_bytes;
        let store = RedbStore::open(&config.data_dir).expect("the store opens");
        let snapshot = store.load().expect("an empty store loads");
        let journal = Journal::start(Arc::new(store) as Arc<dyn Store>);
        let caller = ferrata_tc::calls::Caller::new(&config.calls).expect("the default call settings");
        let coordinator = Coordinator::recover(config, journal.clone(), snapshot, caller, None, None)
            .await
            .expect("recovery of an empty store");
        coordinator.start_background();
        Tc {
            coordinator,
            max_message_bytes,
            journal,
            _data: data,
        }
    }

    pub fn router(&self) -> axum::Router {
        ferrata_tc::http::router(Arc::clone(&self.coordinator))
    }

    pub fn grpc(&self) -> (TmServer, RmServer) {
        let namespaces = ferrata_tc::namespaces::Namespaces::new(Arc::clone(&self.coordinator));
        ferrata_tc::grpc::services(&namespaces, self.max_message_bytes)
    }

    pub async fn stop(self) {
        self.coordinator.shutdown().await;
        self.journal.shutdown();
    }
}

/// Sends one request to a tower service and reads the whole reply; a reply that does not end
/// within [`REPLY_DEADLINE`] is a hang, reported as a panic (a finding).
pub async fn call<S, B>(service: S, request: http::Request<Full<Bytes>>) -> Reply
where
    S: tower::Service<http::Request<Full<Bytes>>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let what = format!("{} {}", request.method(), request.uri());
    let reply = async {
        let response = service.oneshot(request).await.expect("services do not fail");
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.expect("reply bodies do not fail");
        let mut headers = parts.headers;
        if let Some(trailers) = collected.trailers() {
            headers.extend(trailers.clone());
        }
        Reply {
            status: parts.status.as_u16(),
            headers,
            body: collected.to_bytes(),
        }
    };
    match tokio::time::timeout(REPLY_DEADLINE, reply).await {
        Ok(reply) => reply,
        Err(_) => panic!("{what} did not answer within {REPLY_DEADLINE:?}"),
    }
}

/// Messages in gRPC's length-prefixed framing (one byte of flags, a 32-bit big-endian length).
pub fn grpc_frames<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Bytes {
    let mut out = BytesMut::new();
    for m in messages {
        out.put_u8(0);
        out.put_u32(m.len() as u32);
        out.put_slice(m);
    }
    out.freeze()
}

/// The messages of a gRPC reply body; `None` when the framing is broken.
pub fn grpc_messages(mut body: Bytes) -> Option<Vec<Bytes>> {
    let mut out = Vec::new();
    while body.has_remaining() {
        if body.remaining() < 5 {
            return None;
        }
        let _flags = body.get_u8();
        let len = body.get_u32() as usize;
        if body.remaining() < len {
            return None;
        }
        out.push(body.split_to(len));
    }
    Some(out)
}
