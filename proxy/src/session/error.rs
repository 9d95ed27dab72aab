//! `SessionError`: why a session ended early, what the client is told and what is logged.

use super::Shared;
use super::peer::{Peer, ReadError};
use crate::metrics::ErrorKind;
use crate::protocol::err::ErrPacket;

/// Why a session ended early. Each variant knows what (if anything) the client is told.
#[derive(Debug)]
pub enum SessionError {
    /// The client went away or stopped mid-packet: nothing to tell anyone.
    ClientClosed,
    /// The client broke the protocol: it gets this ERR packet (with this sequence id).
    Client {
        reply: ErrPacket,
        seq: u8,
    },
    /// The backend could not be reached or went away. With no `seq`, the client gets the
    /// ERR in place of the greeting.
    Backend {
        reply: ErrPacket,
        seq: Option<u8>,
    },
    /// The backend sent something the proxy cannot follow.
    BackendProtocol {
        cause: String,
        seq: u8,
    },
    /// The backend refused the connection; its ERR was already relayed.
    BackendRefused,
    /// Authentication failed; the backend's ERR was already relayed.
    AuthenticationFailed,
    /// TLS with the client failed: nothing can be said to it any more.
    Tls(String),
    /// TLS to the backend failed: the client, waiting for its login result, is told why.
    BackendTls {
        cause: String,
        seq: u8,
    },
    HandshakeTimeout,
}

impl SessionError {
    pub fn client(reply: ErrPacket, seq: u8) -> Self {
        SessionError::Client { reply, seq }
    }

    pub fn backend_lost(cause: &str, last_seq: u8) -> Self {
        SessionError::Backend {
            reply: ErrPacket::backend_lost(cause),
            seq: Some(last_seq.wrapping_add(1)),
        }
    }

    pub fn unreachable(backend: &str, cause: &str) -> Self {
        SessionError::Backend {
            reply: ErrPacket::backend_unreachable(backend, cause),
            seq: None,
        }
    }

    pub fn backend_protocol(cause: &str, last_seq: u8) -> Self {
        SessionError::BackendProtocol {
            cause: cause.to_owned(),
            seq: last_seq.wrapping_add(1),
        }
    }

    pub fn from_backend_read(e: ReadError, last_seq: u8) -> Self {
        match e {
            ReadError::Io(e) => Self::backend_lost(&e.to_string(), last_seq),
            ReadError::Closed { .. } => Self::backend_lost("the server closed the connection", last_seq),
            ReadError::TooLarge { len, limit } => Self::backend_protocol(
                &format!("a {len}-byte packet where at most {limit} were expected"),
                last_seq,
            ),
        }
    }

    fn metric(&self) -> Option<ErrorKind> {
        match self {
            SessionError::ClientClosed | SessionError::AuthenticationFailed | SessionError::BackendRefused => None,
            SessionError::Client { .. } => Some(ErrorKind::ClientProtocol),
            SessionError::Backend { .. } => Some(ErrorKind::Backend),
            SessionError::BackendProtocol { .. } => Some(ErrorKind::BackendProtocol),
            SessionError::Tls(_) | SessionError::BackendTls { .. } => Some(ErrorKind::Tls),
            SessionError::HandshakeTimeout => Some(ErrorKind::HandshakeTimeout),
        }
    }

    /// Logs the failure and tells the client what it needs to know.
    pub(super) async fn report(self, shared: &Shared, client: Option<&mut Peer>) {
        if let Some(kind) = self.metric() {
            shared.metrics.error(kind);
        }
        // The client may still be sending (the rest of an oversized packet, more garbage).
        let client_may_be_sending = matches!(self, SessionError::Client { .. });
        let reply = match self {
            SessionError::ClientClosed => {
                tracing::debug!("client closed the connection");
                None
            }
            SessionError::AuthenticationFailed => {
                tracing::info!("authentication failed");
                None
            }
            SessionError::BackendRefused => {
                tracing::warn!("the backend refused the connection");
                None
            }
            SessionError::Client { reply, seq } => {
                tracing::warn!(error = %reply, "closing session after a client protocol error");
                Some(reply.to_packet(seq))
            }
            SessionError::Backend { reply, seq } => {
                tracing::warn!(error = %reply, "backend unavailable");
                Some(match seq {
                    Some(seq) => reply.to_packet(seq),
                    None => reply.to_greeting_packet(),
                })
            }
            SessionError::BackendProtocol { cause, seq } => {
                tracing::error!(%cause, "closing session: the backend's response could not be followed");
                Some(
                    ErrPacket::new(
                        1105,
                        "HY000",
                        format!(
                            "ferrata-proxy could not follow the server's response ({cause}); the session is closed"
                        ),
                    )
                    .to_packet(seq),
                )
            }
            SessionError::Tls(cause) => {
                tracing::warn!(%cause, "TLS failed");
                None
            }
            SessionError::BackendTls { cause, seq } => {
                tracing::error!(%cause, "TLS to the backend failed");
                Some(ErrPacket::backend_tls(&cause).to_packet(seq))
            }
            // The timeout dropped the connection phase, client socket included: nothing to tell.
            SessionError::HandshakeTimeout => {
                tracing::info!("handshake timed out");
                None
            }
        };
        if let (Some(reply), Some(client)) = (reply, client) {
            let _ = client.write_all(&reply).await;
            if client_may_be_sending {
                client.linger_close().await;
            }
        }
    }
}
