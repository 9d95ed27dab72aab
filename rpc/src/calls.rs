//! Calls carried on a resource manager's Attach stream (`pb::Call`), the caller's half:
//! [`StreamCalls`] numbers each call, sends it on the stream and waits for the answer with
//! its number, which the attach task hands over ([`StreamCalls::answered`]).
//!
//! Many sessions' calls then share the stream's frames and syscalls instead of each being an
//! HTTP/2 request of its own. When the stream ends, every call still waiting fails as one on
//! a broken connection would (its outcome is unknown), and later calls come back unsent, so
//! that the caller can make them as unary calls instead; so do calls larger than the
//! coordinator takes on the stream (`pb::Welcome::max_call_bytes`, 0 from one that takes
//! none), which would end the stream for every call on it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::pb;

/// The calls of one Attach stream. Clones share the stream.
#[derive(Clone)]
pub struct StreamCalls {
    inner: Arc<Inner>,
}

struct Inner {
    next_id: AtomicU64,
    /// Largest call the coordinator takes on the stream, encoded.
    max_bytes: usize,
    /// `None` once the stream has ended.
    open: Mutex<Option<Open>>,
}

struct Open {
    /// The stream's sending half: dropped when the stream ends, so that it does not keep
    /// the request side open.
    outbound: mpsc::Sender<pb::RmMessage>,
    /// Calls sent and not answered yet, by id.
    waiting: HashMap<u64, oneshot::Sender<pb::answer::Response>>,
}

/// A call that never left: the stream had ended, or the call is larger than the coordinator
/// takes on it. Holds the request, to be sent otherwise.
#[derive(Debug)]
pub struct NotSent(pub pb::call::Request);

impl StreamCalls {
    /// Calls sent on `outbound`, the stream's sending half, each at most `max_bytes` encoded
    /// (0: none is sent).
    pub fn new(outbound: mpsc::Sender<pb::RmMessage>, max_bytes: usize) -> StreamCalls {
        StreamCalls {
            inner: Arc::new(Inner {
                next_id: AtomicU64::new(1),
                max_bytes,
                open: Mutex::new(Some(Open {
                    outbound,
                    waiting: HashMap::new(),
                })),
            }),
        }
    }

    /// Makes `request` on the stream and waits for its answer: the response, or the error
    /// the unary call would have returned. `Err(NotSent)` if the stream had already ended or
    /// the call is larger than the coordinator takes on it.
    /// Dropping the future forgets the call (its answer is discarded when it comes).
    pub async fn call(&self, request: pb::call::Request) -> Result<Result<pb::answer::Response, Status>, NotSent> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let call = pb::Call {
            id,
            request: Some(request),
        };
        if prost::Message::encoded_len(&call) > self.inner.max_bytes {
            return Err(NotSent(call.request.expect("set above")));
        }
        let (answer, answered) = oneshot::channel();
        let outbound = match self.inner.open.lock().as_mut() {
            Some(open) => {
                open.waiting.insert(id, answer);
                open.outbound.clone()
            }
            None => return Err(NotSent(call.request.expect("set above"))),
        };
        let _forget = Forget { inner: &self.inner, id };
        let message = pb::RmMessage {
            kind: Some(pb::rm_message::Kind::Call(call)),
        };
        if let Err(mpsc::error::SendError(message)) = outbound.send(message).await {
            return match message.kind {
                Some(pb::rm_message::Kind::Call(pb::Call {
                    request: Some(request), ..
                })) => Err(NotSent(request)),
                _ => Ok(Err(Status::internal("a call came back unsent as something else"))),
            };
        }
        Ok(match answered.await {
            Ok(pb::answer::Response::Error(error)) => Err(error.into_status()),
            Ok(response) => Ok(response),
            Err(_) => Err(Status::unavailable(
                "the coordinator's stream ended before it answered the call; whether the call took effect is unknown",
            )),
        })
    }

    /// Hands an answer that came on the stream to the call waiting for it, if any still is.
    pub fn answered(&self, answer: pb::Answer) {
        let waiting = self
            .inner
            .open
            .lock()
            .as_mut()
            .and_then(|open| open.waiting.remove(&answer.id));
        if let (Some(waiting), Some(response)) = (waiting, answer.response) {
            let _ = waiting.send(response);
        }
    }

    /// The stream has ended: calls waiting fail, later ones are not sent.
    pub fn close(&self) {
        self.inner.open.lock().take();
    }
}

/// Removes a call from the waiting ones when its caller stops waiting, answered or not.
struct Forget<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(open) = self.inner.open.lock().as_mut() {
            open.waiting.remove(&self.id);
        }
    }
}

/// Closes the calls when dropped: held by the attach task, so that the calls fail however
/// the task ends (returning, or aborted with its attachment).
pub(crate) struct CloseOnDrop(pub StreamCalls);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin() -> pb::call::Request {
        pb::call::Request::GlobalBegin(pb::GlobalBeginRequest::default())
    }

    #[tokio::test]
    async fn answers_reach_their_calls_in_any_order_and_a_closed_stream_fails_the_rest() {
        let (outbound, mut sent) = mpsc::channel(8);
        let calls = StreamCalls::new(outbound, 1024);
        let mut waiting = HashMap::new();
        for _ in 0..2 {
            let calls_ = calls.clone();
            let task = tokio::spawn(async move { calls_.call(begin()).await });
            match sent.recv().await.and_then(|m| m.kind) {
                Some(pb::rm_message::Kind::Call(call)) => waiting.insert(call.id, task),
                other => panic!("expected a call, got {other:?}"),
            };
        }
        let mut ids: Vec<u64> = waiting.keys().copied().collect();
        ids.sort();
        // The later call is answered first, with a refusal; the earlier one waits on.
        calls.answered(pb::Answer {
            id: ids[1],
            response: Some(pb::answer::Response::Error(pb::CallError::of(
                &crate::ErrorCode::LockWaitTimeout.status("held", Some("xid-1")),
            ))),
        });
        let status = waiting.remove(&ids[1]).unwrap().await.unwrap().unwrap().unwrap_err();
        assert_eq!(crate::ErrorCode::of(&status), Some(crate::ErrorCode::LockWaitTimeout));
        assert_eq!(crate::holder_of(&status).as_deref(), Some("xid-1"));
        assert!(!waiting[&ids[0]].is_finished(), "the earlier call still waits");

        // The stream ends: the earlier call's outcome is unknown, a later one is not sent.
        calls.close();
        let status = waiting.remove(&ids[0]).unwrap().await.unwrap().unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(crate::ErrorCode::of(&status), None);
        match calls.call(begin()).await {
            Err(NotSent(pb::call::Request::GlobalBegin(_))) => {}
            other => panic!("a call after the stream closed must come back unsent, got {other:?}"),
        }
        assert!(sent.recv().await.is_none(), "the stream's sending half went with it");
        // An answer for a call nobody waits for is dropped.
        calls.answered(pb::Answer {
            id: ids[0],
            response: Some(pb::answer::Response::BranchReport(pb::BranchReportResponse {})),
        });
    }

    #[tokio::test]
    async fn a_call_larger_than_the_coordinator_takes_is_not_sent() {
        let (outbound, mut sent) = mpsc::channel(8);
        let calls = StreamCalls::new(outbound, 64);
        let large = pb::call::Request::GlobalBegin(pb::GlobalBeginRequest {
            name: "n".repeat(100),
            timeout_ms: 0,
        });
        assert!(matches!(calls.call(large).await, Err(NotSent(_))));
        let none = StreamCalls::new(mpsc::channel(8).0, 0);
        assert!(
            matches!(none.call(begin()).await, Err(NotSent(_))),
            "a coordinator that takes no calls"
        );
        drop(calls);
        assert!(sent.recv().await.is_none(), "nothing was sent");
    }
}
