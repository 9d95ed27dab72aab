//! Relays an authentication exchange (the initial login, or COM_CHANGE_USER) between client
//! and backend, packet by packet, until the backend says OK or ERR.
//!
//! The proxy never sees a password: whatever the plugin (mysql_native_password, ed25519,
//! caching_sha2_password with its fast path and its public-key round trip), the packets are
//! relayed as they are. Only sequence ids may be shifted, when TLS was set up on one leg and
//! not the other (the SSLRequest takes a sequence id on that leg only).

use tokio::select;

use super::SessionError;
use super::peer::{Peer, ReadError};
use crate::protocol::ServerStatus;

/// Authentication packets are small (the largest is an RSA public key); anything bigger is
/// not authentication.
const AUTH_PACKET_LIMIT: usize = 1 << 20;

/// How an authentication exchange ended (the backend's OK or ERR was relayed either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authenticated {
    /// OK, with its status flags.
    Yes(ServerStatus),
    /// ERR: a login ends there; after a refused COM_CHANGE_USER the server keeps the
    /// session (reset, on its old user and database).
    No,
}

/// Relays until the backend ends the exchange. `seq_shift` is added to client sequence ids
/// on their way to the backend and subtracted from backend ids on their way back.
pub async fn relay(client: &mut Peer, backend: &mut Peer, seq_shift: i16) -> Result<Authenticated, SessionError> {
    let shift = |seq: u8, by: i16| (i16::from(seq) + by).rem_euclid(256) as u8;
    loop {
        select! {
            packet = backend.read_packet(AUTH_PACKET_LIMIT) => {
                let span = packet.map_err(|e| SessionError::from_backend_read(e, 0))?;
                let seq = shift(span.first_seq, -seq_shift);
                backend.buf[3] = seq;
                let first = backend.buf.get(4).copied();
                let status = (first == Some(0x00)).then(|| {
                    crate::protocol::ok::parse(span.payload_len, &backend.buf[4..span.raw_len])
                        .map(|ok| ok.status)
                        .unwrap_or_default()
                });
                backend.forward(span.raw_len, client).await.map_err(|_| SessionError::ClientClosed)?;
                match (first, status) {
                    (_, Some(status)) => return Ok(Authenticated::Yes(status)),
                    (Some(0xff), _) => return Ok(Authenticated::No),
                    _ => {}
                }
            }
            packet = client.read_packet(AUTH_PACKET_LIMIT) => {
                let span = match packet {
                    Ok(span) => span,
                    Err(ReadError::TooLarge { len, limit }) => {
                        return Err(SessionError::client(
                            crate::protocol::err::ErrPacket::bad_handshake(&format!(
                                "an authentication packet of {len} bytes exceeds {limit}"
                            )),
                            0,
                        ));
                    }
                    Err(_) => return Err(SessionError::ClientClosed),
                };
                client.buf[3] = shift(span.first_seq, seq_shift);
                client.forward(span.raw_len, backend).await.map_err(|e| SessionError::backend_lost(&e.to_string(), 0))?;
            }
        }
    }
}
