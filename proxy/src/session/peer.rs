//! One side of a session (the client or the backend): its socket and its read buffer.
//!
//! Reads go into one growable buffer per side. Bytes are forwarded straight out of that
//! buffer and then dropped from its front, so a relayed packet is copied only by the kernel.

use std::io;

use bytes::{Buf, BytesMut};
use metrics::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::protocol::frame::{self, FrameError, PacketSpan};
use crate::stream::Stream;

/// Read buffers start this big and grow only while a packet the proxy reads whole needs it.
const INITIAL_BUFFER: usize = 16 * 1024;
/// A buffer grown beyond this for one packet is given back once that packet has passed, so a
/// session that sent one large packet does not keep its memory for the rest of its life.
const SHRINK_ABOVE: usize = 4 * INITIAL_BUFFER;
/// How long [`Peer::linger_close`] keeps reading what a peer still sends.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Peer {
    pub stream: Stream,
    pub buf: BytesMut,
    /// The buffer was grown beyond [`SHRINK_ABOVE`] for a large packet.
    grown: bool,
    bytes_in: Counter,
    bytes_out: Counter,
    /// Counts writes that follow a wait for this side's bytes: round trips to it (several
    /// commands written before their answers are read are one).
    round_trips: Counter,
    /// Nothing was read since the last write.
    writing: bool,
}

/// Why a whole packet could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    /// The peer closed the connection, `mid_packet` if it did so inside a packet.
    Closed {
        mid_packet: bool,
    },
    TooLarge {
        len: usize,
        limit: usize,
    },
}

impl Peer {
    pub fn new(stream: Stream, bytes_in: Counter, bytes_out: Counter) -> Self {
        Peer {
            stream,
            buf: BytesMut::with_capacity(INITIAL_BUFFER),
            grown: false,
            bytes_in,
            bytes_out,
            round_trips: Counter::noop(),
            writing: false,
        }
    }

    /// Counts the round trips to this side in `round_trips`.
    pub fn counting_round_trips(mut self, round_trips: Counter) -> Self {
        self.round_trips = round_trips;
        self
    }

    /// Reads more bytes into the buffer. Returns 0 at end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < INITIAL_BUFFER / 4 {
            self.buf.reserve(INITIAL_BUFFER);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        self.bytes_in.increment(n as u64);
        self.writing = false;
        Ok(n)
    }

    /// Waits until the buffer starts with one complete logical packet (at most `limit`
    /// payload bytes) and returns where it is. The packet stays in the buffer.
    pub async fn read_packet(&mut self, limit: usize) -> Result<PacketSpan, ReadError> {
        loop {
            match frame::complete_packet(&self.buf, limit) {
                Ok(Some(span)) => return Ok(span),
                Ok(None) => {}
                Err(FrameError::TooLarge { len, limit }) => return Err(ReadError::TooLarge { len, limit }),
            }
            // Grow once to the size the packet announced, rather than in small steps.
            if let Some((len, _)) = frame::header(&self.buf) {
                let want = (4 + len).min(frame::MAX_CHUNK + 4);
                if self.buf.capacity() < want {
                    self.buf.reserve(want - self.buf.len());
                    self.grown |= want > SHRINK_ABOVE;
                }
            }
            match self.fill().await {
                Ok(0) => {
                    return Err(ReadError::Closed {
                        mid_packet: !self.buf.is_empty(),
                    });
                }
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// The payload of a packet found by [`Peer::read_packet`]: borrowed for the usual single
    /// physical packet, joined into a copy for a split one.
    pub fn payload(&self, span: &PacketSpan) -> std::borrow::Cow<'_, [u8]> {
        if span.chunks == 1 {
            std::borrow::Cow::Borrowed(&self.buf[4..span.raw_len])
        } else {
            std::borrow::Cow::Owned(frame::join_payload(&self.buf, span))
        }
    }

    /// Drops `n` bytes from the front of the read buffer.
    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n);
        self.shrink_when_empty();
    }

    /// Gives a grown buffer's memory back once everything in it has been used.
    fn shrink_when_empty(&mut self) {
        if self.grown && self.buf.is_empty() {
            self.buf = BytesMut::with_capacity(INITIAL_BUFFER);
            self.grown = false;
        }
    }

    /// Writes bytes to this side (and flushes them through TLS, if any).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        if !self.writing {
            self.writing = true;
            self.round_trips.increment(1);
        }
        self.stream.write_all(bytes).await?;
        if self.stream.is_tls() {
            self.stream.flush().await?;
        }
        self.bytes_out.increment(bytes.len() as u64);
        Ok(())
    }

    /// Forwards the first `n` buffered bytes of `self` to `to` and drops them here.
    pub async fn forward(&mut self, n: usize, to: &mut Peer) -> io::Result<()> {
        if n > 0 {
            to.write_all(&self.buf[..n]).await?;
            self.buf.advance(n);
            self.shrink_when_empty();
        }
        Ok(())
    }

    /// Reads and drops the logical packet at the front of the buffer without holding it:
    /// for a packet over the size limit. Returns its payload length and the sequence id of
    /// its last piece, or `None` if the peer closed first or took longer than [`LINGER`].
    pub async fn discard_packet(&mut self) -> Option<(usize, u8)> {
        let discard = async {
            let mut total = 0;
            loop {
                while self.buf.len() < 4 {
                    if self.fill().await.ok()? == 0 {
                        return None;
                    }
                }
                let (len, seq) = frame::header(&self.buf)?;
                self.buf.advance(4);
                let mut left = len;
                while left > 0 {
                    if self.buf.is_empty() && self.fill().await.ok()? == 0 {
                        return None;
                    }
                    let n = left.min(self.buf.len());
                    self.buf.advance(n);
                    left -= n;
                }
                total += len;
                if len < frame::MAX_CHUNK {
                    return Some((total, seq));
                }
            }
        };
        tokio::time::timeout(LINGER, discard).await.ok().flatten()
    }

    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Closes the write side, then reads and discards what the peer still sends, until it
    /// closes or for at most [`LINGER`]. Closing a socket that has unread data makes the
    /// kernel answer with a reset, which can destroy an ERR packet just written before the
    /// peer reads it (a client still sending the rest of an oversized packet would see
    /// "connection reset" instead of the reason).
    pub async fn linger_close(&mut self) {
        let _ = self.stream.shutdown().await;
        let mut sink = vec![0u8; INITIAL_BUFFER];
        let drain = async {
            while let Ok(n) = self.stream.read(&mut sink).await
                && n > 0
            {}
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A framed packet of `len` payload bytes.
    fn packet(len: usize) -> Vec<u8> {
        let mut p = (len as u32).to_le_bytes().to_vec();
        p[3] = 0;
        p.resize(4 + len, b'x');
        p
    }

    #[tokio::test]
    async fn the_buffer_shrinks_back_after_a_large_packet() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut peer = Peer::new(Stream::Unix(ours), Counter::noop(), Counter::noop());
        let big = 4 << 20;
        let writer = tokio::spawn(async move {
            theirs.write_all(&packet(big)).await.unwrap();
            theirs.write_all(&packet(10)).await.unwrap();
            theirs
        });
        let span = peer.read_packet(16 << 20).await.unwrap();
        assert_eq!(span.payload_len, big);
        peer.consume(span.raw_len);
        let span = peer.read_packet(16 << 20).await.unwrap();
        assert_eq!(span.payload_len, 10);
        peer.consume(span.raw_len);
        assert!(
            peer.buf.capacity() <= 4 * INITIAL_BUFFER,
            "the read buffer still holds {} bytes",
            peer.buf.capacity()
        );
        drop(writer.await.unwrap());
    }
}
