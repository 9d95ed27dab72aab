//! Streams one response from the backend to the client.
//!
//! Bytes are forwarded as soon as they arrive; the [`Scanner`] shows the response tracker
//! only each packet's header and first bytes, so a result set of any size, or a row of
//! hundreds of megabytes, passes through a buffer of a few kilobytes. A LOCAL INFILE request
//! turns the direction around until the client's empty packet ends the file.

use std::convert::Infallible;

use super::SessionError;
use super::peer::Peer;
use crate::protocol::frame::{Flow, Scanner};
use crate::protocol::response::{PEEK, ProtocolViolation, ResponseTracker, Step};

/// Relays until `tracker` reports the response complete.
pub async fn response(
    client: &mut Peer,
    backend: &mut Peer,
    tracker: &mut ResponseTracker,
) -> Result<(), SessionError> {
    let mut scanner = Scanner::default();
    // What the tracker said of the last packet it saw. It outlives one scan: the packet that
    // ends the response (or asks for a LOCAL INFILE file) may finish arriving in a later read.
    let mut step = Step::More;
    loop {
        let (used, stopped) = scanner
            .scan::<ProtocolViolation>(&backend.buf, PEEK, |p| {
                step = tracker.on_packet(p.len, p.seq, p.prefix)?;
                Ok(match step {
                    Step::More => Flow::Continue,
                    _ => Flow::Stop,
                })
            })
            .map_err(|violation| SessionError::backend_protocol(&violation.0, tracker.last_seq()))?;
        backend
            .forward(used, client)
            .await
            .map_err(|_| SessionError::ClientClosed)?;
        if stopped {
            match step {
                Step::LocalInfile => {
                    local_infile(client, backend, tracker).await?;
                    step = Step::More;
                }
                _ => return Ok(()),
            }
        } else if backend
            .fill()
            .await
            .map_err(|e| SessionError::backend_lost(&e.to_string(), tracker.last_seq()))?
            == 0
        {
            return Err(SessionError::backend_lost(
                "the server closed the connection",
                tracker.last_seq(),
            ));
        }
    }
}

/// Relays the client's LOCAL INFILE data packets up to and including the empty packet that
/// ends the file.
async fn local_infile(
    client: &mut Peer,
    backend: &mut Peer,
    tracker: &mut ResponseTracker,
) -> Result<(), SessionError> {
    let mut scanner = Scanner::default();
    loop {
        let mut last_seq = None;
        let (used, stopped) = scanner
            .scan::<Infallible>(&client.buf, 0, |p| {
                last_seq = Some(p.seq);
                Ok(if p.len == 0 { Flow::Stop } else { Flow::Continue })
            })
            .expect("infallible");
        if let Some(seq) = last_seq {
            tracker.client_sent(seq);
        }
        client
            .forward(used, backend)
            .await
            .map_err(|e| SessionError::backend_lost(&e.to_string(), tracker.last_seq()))?;
        if stopped {
            return Ok(());
        }
        if client.fill().await.map_err(|_| SessionError::ClientClosed)? == 0 {
            return Err(SessionError::ClientClosed);
        }
    }
}
