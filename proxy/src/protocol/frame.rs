//! Packet framing: the 4-byte header (24-bit payload length, sequence id) and the splitting
//! of payloads of 16 MiB - 1 bytes or more into several physical packets.
//!
//! Two readers serve two needs. [`complete_packet`] finds one whole logical packet in a
//! buffer (commands and handshake packets, which the proxy reads in full). [`Scanner`] walks
//! a byte stream packet by packet while looking only at each packet's header and first few
//! bytes, so result sets and large rows are forwarded as they arrive, never held whole.

/// Payload length of a physical packet that is continued by the next one.
pub const MAX_CHUNK: usize = 0xff_ffff;

/// Reads a packet header: payload length and sequence id.
pub fn header(buf: &[u8]) -> Option<(usize, u8)> {
    match buf {
        [a, b, c, seq, ..] => Some((usize::from(*a) | usize::from(*b) << 8 | usize::from(*c) << 16, *seq)),
        _ => None,
    }
}

/// Appends a header. `len` must be at most [`MAX_CHUNK`].
pub fn write_header(out: &mut Vec<u8>, len: usize, seq: u8) {
    debug_assert!(len <= MAX_CHUNK);
    out.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
    out.push(seq);
}

/// Appends `payload` as one logical packet starting at sequence id `seq`, split into
/// physical packets as the protocol requires. Returns the next sequence id.
pub fn write_packet(out: &mut Vec<u8>, mut seq: u8, payload: &[u8]) -> u8 {
    let mut rest = payload;
    loop {
        let n = rest.len().min(MAX_CHUNK);
        write_header(out, n, seq);
        out.extend_from_slice(&rest[..n]);
        seq = seq.wrapping_add(1);
        rest = &rest[n..];
        if n < MAX_CHUNK {
            return seq;
        }
    }
}

/// Where one logical packet sits in a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketSpan {
    /// Bytes the packet occupies, headers included.
    pub raw_len: usize,
    /// Payload bytes, headers excluded.
    pub payload_len: usize,
    /// Sequence id of the first physical packet.
    pub first_seq: u8,
    /// Sequence id of the last physical packet.
    pub last_seq: u8,
    /// Number of physical packets (1 unless the payload is 16 MiB - 1 or longer).
    pub chunks: usize,
}

/// Why a buffer cannot hold a valid logical packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The payload would be longer than the configured limit.
    TooLarge { len: usize, limit: usize },
}

/// Looks for one complete logical packet at the start of `buf`. `Ok(None)` means more bytes
/// are needed. Payloads longer than `limit` are refused as soon as their length is known.
pub fn complete_packet(buf: &[u8], limit: usize) -> Result<Option<PacketSpan>, FrameError> {
    let mut at = 0;
    let mut payload_len = 0usize;
    let mut chunks = 0;
    let mut first_seq = 0;
    loop {
        let Some((len, seq)) = header(&buf[at..]) else {
            return Ok(None);
        };
        if chunks == 0 {
            first_seq = seq;
        }
        payload_len += len;
        chunks += 1;
        if payload_len > limit {
            return Err(FrameError::TooLarge {
                len: payload_len,
                limit,
            });
        }
        at += 4 + len;
        if at > buf.len() {
            return Ok(None);
        }
        if len < MAX_CHUNK {
            return Ok(Some(PacketSpan {
                raw_len: at,
                payload_len,
                first_seq,
                last_seq: seq,
                chunks,
            }));
        }
    }
}

/// Copies the payload of a complete multi-chunk packet out of its physical packets. Single
/// chunk packets need no copy: their payload is `buf[4..raw_len]`.
pub fn join_payload(buf: &[u8], span: &PacketSpan) -> Vec<u8> {
    let mut out = Vec::with_capacity(span.payload_len);
    let mut at = 0;
    while at < span.raw_len {
        let (len, _) = header(&buf[at..]).expect("span was validated");
        out.extend_from_slice(&buf[at + 4..at + 4 + len]);
        at += 4 + len;
    }
    out
}

/// What a [`Scanner`] reports for the start of each logical packet.
pub struct PacketStart<'a> {
    /// Payload length of the first physical packet.
    pub len: usize,
    pub seq: u8,
    /// The first `min(len, peek)` payload bytes.
    pub prefix: &'a [u8],
}

/// Walks a stream of packets in pieces, as they arrive.
///
/// Feed it each newly received slice with [`Scanner::scan`]; it calls back once per logical
/// packet with its header and first bytes, then skips the rest of the packet (including any
/// continuation packets) without needing it in memory. The caller forwards the bytes the
/// scanner consumed and keeps the unconsumed tail (at most a header plus `peek` bytes).
#[derive(Debug, Default)]
pub struct Scanner {
    /// Payload bytes of the current physical packet still to pass.
    skip: usize,
    /// The current physical packet is full size, so the next one continues it.
    continued: bool,
    /// The callback asked to stop at the current packet, which has not been fully passed
    /// yet. Kept across calls: the rest of that packet may arrive in a later read.
    stopping: bool,
}

/// The callback's verdict after seeing a packet start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep scanning packets.
    Continue,
    /// This packet is the last one of interest: stop once it has been passed.
    Stop,
}

impl Scanner {
    /// True when the scanner sits on a packet boundary (nothing of a packet left to pass).
    pub fn at_boundary(&self) -> bool {
        self.skip == 0 && !self.continued
    }

    /// Scans `buf`, calling `on_packet` for each logical packet start. Returns how many bytes
    /// were consumed and whether the callback asked to stop (and that packet was fully
    /// passed). Stops early, leaving bytes unconsumed, when a header or prefix is incomplete.
    pub fn scan<E>(
        &mut self,
        buf: &[u8],
        peek: usize,
        mut on_packet: impl FnMut(PacketStart<'_>) -> Result<Flow, E>,
    ) -> Result<(usize, bool), E> {
        let mut at = 0;
        loop {
            if self.skip > 0 {
                let n = self.skip.min(buf.len() - at);
                at += n;
                self.skip -= n;
                if self.skip > 0 {
                    return Ok((at, false));
                }
            }
            if self.stopping && !self.continued {
                self.stopping = false;
                return Ok((at, true));
            }
            let Some((len, seq)) = header(&buf[at..]) else {
                return Ok((at, false));
            };
            if self.continued {
                self.continued = len == MAX_CHUNK;
                self.skip = len;
                at += 4;
                continue;
            }
            let want = len.min(peek);
            if buf.len() - at - 4 < want {
                return Ok((at, false));
            }
            let flow = on_packet(PacketStart {
                len,
                seq,
                prefix: &buf[at + 4..at + 4 + want],
            })?;
            self.stopping = flow == Flow::Stop;
            self.continued = len == MAX_CHUNK;
            self.skip = len;
            at += 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn packets(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            write_packet(&mut out, i as u8, p);
        }
        out
    }

    #[test]
    fn complete_packet_handles_split_payloads_and_limits() {
        let big = vec![7u8; MAX_CHUNK + 10];
        let mut buf = Vec::new();
        assert_eq!(write_packet(&mut buf, 5, &big), 7);
        let span = complete_packet(&buf, usize::MAX).unwrap().unwrap();
        assert_eq!(span.raw_len, buf.len());
        assert_eq!((span.payload_len, span.chunks), (big.len(), 2));
        assert_eq!((span.first_seq, span.last_seq), (5, 6));
        assert_eq!(join_payload(&buf, &span), big);
        assert_eq!(complete_packet(&buf[..buf.len() - 1], usize::MAX), Ok(None));
        assert_eq!(
            complete_packet(&buf, 100),
            Err(FrameError::TooLarge {
                len: MAX_CHUNK,
                limit: 100
            })
        );
        // A payload of exactly MAX_CHUNK bytes is followed by an empty packet.
        let mut exact = Vec::new();
        write_packet(&mut exact, 0, &vec![1u8; MAX_CHUNK]);
        assert_eq!(exact.len(), MAX_CHUNK + 8);
        let span = complete_packet(&exact, usize::MAX).unwrap().unwrap();
        assert_eq!(span.chunks, 2);
    }

    #[test]
    fn scanner_sees_each_packet_once_whatever_the_piece_boundaries() {
        let big = vec![0xfeu8; MAX_CHUNK + 3];
        let stream = packets(&[b"\x01", &big, b"abc", b"", b"\xfe\x00\x00\x02\x00"]);
        for piece in [1, 2, 3, 5, 4096, stream.len()] {
            let mut scanner = Scanner::default();
            let mut seen = Vec::new();
            let mut buf = Vec::new();
            let mut fed = 0;
            let mut stopped = false;
            while !stopped {
                let end = (fed + piece).min(stream.len());
                buf.extend_from_slice(&stream[fed..end]);
                fed = end;
                let (used, stop) = scanner
                    .scan::<Infallible>(&buf, 3, |p| {
                        seen.push((p.len, p.seq, p.prefix.to_vec()));
                        Ok(if p.prefix.first() == Some(&0xfe) && p.len == 5 {
                            Flow::Stop
                        } else {
                            Flow::Continue
                        })
                    })
                    .unwrap();
                buf.drain(..used);
                stopped = stop;
                // With the whole stream fed, a scan that neither stops nor consumes has lost
                // track of the packet that asked to stop.
                assert!(stopped || used > 0 || fed < stream.len(), "piece {piece}: stop lost");
            }
            assert!(buf.is_empty() && fed == stream.len(), "piece {piece}");
            assert!(scanner.at_boundary());
            let lens: Vec<usize> = seen.iter().map(|s| s.0).collect();
            assert_eq!(lens, vec![1, MAX_CHUNK, 3, 0, 5], "piece {piece}");
            assert_eq!(seen[2].2, b"abc");
        }
    }
}
