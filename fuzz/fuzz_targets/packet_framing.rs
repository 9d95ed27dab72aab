//! Packet framing. Input: a read-size seed, a packet index to stop at, a payload limit, then
//! a byte stream as it would arrive from a client or a server.
//!
//! Checks that `complete_packet` and `join_payload` (how commands and handshake packets are
//! read) and the `Scanner` (how responses are relayed) agree on every packet's start, length,
//! sequence id and first bytes, that the scanner's stop lands exactly at the end of the
//! packet it was asked to stop at whatever the read sizes, and that the limit holds.
#![no_main]

use std::convert::Infallible;

use ferrata_fuzz::input::Input;
use ferrata_fuzz::scan::{read_sizes, scan_in_reads};
use ferrata_proxy::protocol::frame::{self, Flow, FrameError, MAX_CHUNK, PacketSpan, Scanner};
use ferrata_proxy::protocol::response::PEEK;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let reads = input.byte();
    let stop_at = usize::from(input.byte());
    let limit = usize::from(input.u16());
    let stream = input.rest();

    // The reference: whole logical packets, one after another.
    let mut packets: Vec<(usize, PacketSpan, Vec<u8>)> = Vec::new();
    let mut at = 0;
    while let Ok(Some(span)) = frame::complete_packet(&stream[at..], usize::MAX) {
        let payload = frame::join_payload(&stream[at..], &span);
        assert_eq!(payload.len(), span.payload_len);
        assert!(span.raw_len >= 4 * span.chunks + span.payload_len);
        packets.push((at, span, payload));
        at += span.raw_len;
    }

    match (frame::complete_packet(stream, limit), packets.first()) {
        (Ok(Some(span)), Some((_, first, _))) => assert_eq!(&span, first),
        (Ok(None), None) => {}
        (Err(FrameError::TooLarge { len, limit: l }), _) => assert!(len > l && l == limit),
        (other, first) => panic!("with a limit {other:?}, without {first:?}"),
    }

    let stop = (!packets.is_empty()).then(|| stop_at % packets.len());
    let mut seen = Vec::new();
    let mut scanner = Scanner::default();
    let (used, stopped) = scan_in_reads(&mut scanner, stream, &mut read_sizes(reads), PEEK, |p| {
        seen.push((p.len, p.seq, p.prefix.to_vec()));
        Ok::<_, Infallible>(if Some(seen.len() - 1) == stop {
            Flow::Stop
        } else {
            Flow::Continue
        })
    })
    .unwrap_or_else(|never| match never {});
    for ((_, span, payload), (len, seq, prefix)) in packets.iter().zip(&seen) {
        let first_chunk = if span.chunks > 1 { MAX_CHUNK } else { span.payload_len };
        assert_eq!((*len, *seq), (first_chunk, span.first_seq));
        assert_eq!(prefix[..], payload[..payload.len().min(PEEK)]);
    }
    match stop {
        Some(k) => {
            assert!(stopped, "the scanner did not stop at packet {k}");
            assert_eq!(seen.len(), k + 1);
            assert_eq!(used, packets[k].0 + packets[k].1.raw_len);
            assert!(scanner.at_boundary());
        }
        None => assert!(!stopped && used <= stream.len()),
    }
});
