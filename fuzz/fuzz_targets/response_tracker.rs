//! The response tracker. Input: the command's response kind, the session's capability
//! flags (8 bytes), the command's sequence id, a read-size seed, a status mask and value
//! (2 + 2 bytes), then the server's bytes.
//!
//! Follows the response the way the relay does (scanner, tracker, LOCAL INFILE turns) and
//! checks that how and where it ends does not depend on the read sizes; the buffered-response
//! helpers (`ends_in_error`, `set_response_status`) see the same bytes.
#![no_main]

use ferrata_fuzz::input::Input;
use ferrata_fuzz::scan::{read_sizes, scan_in_reads};
use ferrata_proxy::protocol::constants::{Capabilities, ServerStatus};
use ferrata_proxy::protocol::frame::{Flow, Scanner};
use ferrata_proxy::protocol::response::{self, PEEK, ProtocolViolation, ResponseKind, ResponseTracker, Step};
use libfuzzer_sys::fuzz_target;

const KINDS: [ResponseKind; 9] = [
    ResponseKind::Generic,
    ResponseKind::CursorExecute,
    ResponseKind::Prepare,
    ResponseKind::FieldList,
    ResponseKind::Statistics,
    ResponseKind::Fetch,
    ResponseKind::None,
    ResponseKind::Authentication,
    ResponseKind::Stream,
];

/// How a relay of `stream` ends: bytes consumed, and the violation or the tracker's
/// summary (done, last status, error code, PREPARE_OK).
type Ending = (
    usize,
    Result<(bool, Option<u16>, Option<u16>, Option<(u32, u16, u16)>), ProtocolViolation>,
);

fn relay(kind: ResponseKind, caps: Capabilities, seq: u8, stream: &[u8], reads: u8) -> Ending {
    let mut tracker = ResponseTracker::new(kind, caps, seq);
    let mut scanner = Scanner::default();
    let mut reads = read_sizes(reads);
    let mut consumed = 0;
    loop {
        let mut step = Step::More;
        let scanned = scan_in_reads(&mut scanner, &stream[consumed..], &mut reads, PEEK, |p| {
            let _ = tracker.next_role();
            step = tracker.on_packet(p.len, p.seq, p.prefix)?;
            Ok(if step == Step::More { Flow::Continue } else { Flow::Stop })
        });
        match scanned {
            Err(violation) => return (consumed, Err(violation)),
            Ok((used, stopped)) => {
                consumed += used;
                if stopped && step == Step::LocalInfile {
                    // The client's file would go up here; the server's answer follows.
                    tracker.client_sent(tracker.last_seq().wrapping_add(1));
                    continue;
                }
                if stopped {
                    assert!(tracker.is_done());
                }
                let summary = (
                    tracker.is_done(),
                    tracker.last_status().map(|s| s.0),
                    tracker.error_code(),
                    tracker.prepare_ok().map(|p| (p.statement_id, p.columns, p.params)),
                );
                let _ = tracker.last_ok();
                return (consumed, Ok(summary));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let kind = KINDS[usize::from(input.byte()) % KINDS.len()];
    let caps = Capabilities(input.u64());
    let seq = input.byte();
    let reads = input.byte();
    let (mask, status) = (input.u16(), ServerStatus(input.u16()));
    let stream = input.rest();

    let whole = relay(kind, caps, seq, stream, 0);
    let pieces = relay(kind, caps, seq, stream, reads);
    // The tracker sees the same packet starts however the bytes arrive.
    assert_eq!(whole, pieces);

    let _ = response::ends_in_error(stream);
    let mut buffered = stream.to_vec();
    response::set_response_status(&mut buffered, caps, mask, status);
    assert_eq!(buffered.len(), stream.len());
});
