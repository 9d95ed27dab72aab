//! OK and EOF packets: reading the status flags (and counters) the proxy tracks.

use super::constants::ServerStatus;
use super::lenenc;

/// What the proxy reads from an OK packet, or from an EOF/OK terminator starting with 0xFE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OkSummary {
    pub affected_rows: u64,
    pub last_insert_id: u64,
    pub status: ServerStatus,
    pub warnings: u16,
}

/// Longest prefix [`parse`] needs: marker, two 9-byte length-encoded integers, status and
/// warnings.
pub const PREFIX_LEN: usize = 1 + 9 + 9 + 2 + 2;

/// Parses the start of an OK packet (0x00), an old-style EOF (0xFE, exactly 5 bytes) or an
/// OK-layout terminator (0xFE, at least 7 bytes, sent when CLIENT_DEPRECATE_EOF is on).
/// `len` is the whole payload length, `prefix` at least its first `min(len, PREFIX_LEN)`
/// bytes. `None` if the bytes do not form such a packet.
pub fn parse(len: usize, prefix: &[u8]) -> Option<OkSummary> {
    match prefix.first()? {
        0xfe if len == 5 => {
            let warnings = u16::from_le_bytes([*prefix.get(1)?, *prefix.get(2)?]);
            let status = u16::from_le_bytes([*prefix.get(3)?, *prefix.get(4)?]);
            Some(OkSummary {
                status: ServerStatus(status),
                warnings,
                ..OkSummary::default()
            })
        }
        0x00 | 0xfe => {
            let (affected_rows, a) = lenenc::read_int(&prefix[1..])?;
            let (last_insert_id, b) = lenenc::read_int(&prefix[1 + a..])?;
            let at = 1 + a + b;
            let status = u16::from_le_bytes([*prefix.get(at)?, *prefix.get(at + 1)?]);
            // Pre-4.1 OK packets may stop after the status; warnings then read as zero.
            let warnings = match (prefix.get(at + 2), prefix.get(at + 3)) {
                (Some(lo), Some(hi)) => u16::from_le_bytes([*lo, *hi]),
                _ => 0,
            };
            Some(OkSummary {
                affected_rows,
                last_insert_id,
                status: ServerStatus(status),
                warnings,
            })
        }
        _ => None,
    }
}

/// Rewrites the status flags of an OK payload, an old-style EOF or an OK-layout terminator
/// in place (the proxy does this when it wraps an autocommit statement in a local transaction
/// of its own, so the client still sees autocommit). False if the payload is none of those.
pub fn set_status(payload: &mut [u8], status: ServerStatus) -> bool {
    let at = match payload.first() {
        Some(0xfe) if payload.len() == 5 => 3,
        Some(0x00) => ok_status_at(payload),
        Some(0xfe) if payload.len() >= 7 => ok_status_at(payload),
        _ => return false,
    };
    match payload.get_mut(at..at + 2) {
        Some(flags) if at > 0 => {
            flags.copy_from_slice(&status.0.to_le_bytes());
            true
        }
        _ => false,
    }
}

/// Where an OK-layout payload keeps its status flags; 0 if it is malformed.
fn ok_status_at(payload: &[u8]) -> usize {
    let Some((_, a)) = lenenc::read_int(&payload[1..]) else {
        return 0;
    };
    let Some((_, b)) = lenenc::read_int(&payload[1 + a..]) else {
        return 0;
    };
    1 + a + b
}

/// The packets of a buffered response: where each header starts and its payload, and
/// whether it only continues a packet of 16 MiB or more (then it is no packet of its own).
pub(super) fn packets(response: &[u8]) -> Vec<(usize, std::ops::Range<usize>, bool)> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut continued = false;
    while at + 4 <= response.len() {
        let len = usize::from(response[at]) | usize::from(response[at + 1]) << 8 | usize::from(response[at + 2]) << 16;
        let end = at + 4 + len;
        if end > response.len() {
            break;
        }
        out.push((at, at + 4..end, continued));
        continued = len == 0xff_ffff;
        at = end;
    }
    out
}

/// Sets MORE_RESULTS_EXISTS in the final packet of a buffered response (an OK or a result
/// set's terminator), so another response can follow it as part of one multi-result
/// answer; and renumbers the sequence ids of `response` to continue from `next_seq`,
/// returning the id after its last packet.
pub fn chain_response(response: &mut [u8], more: bool, next_seq: u8) -> u8 {
    let packets = packets(response);
    let mut seq = next_seq;
    for (header, _, _) in &packets {
        response[header + 3] = seq;
        seq = seq.wrapping_add(1);
    }
    if let (true, Some((_, last, false))) = (more, packets.last())
        && let Some(old) = parse(last.len(), &response[last.clone()])
    {
        set_status(
            &mut response[last.clone()],
            ServerStatus(old.status.0 | ServerStatus::MORE_RESULTS_EXISTS),
        );
    }
    seq
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_rewritten_in_place() {
        let mut ok = [0x00, 0x03, 0xfc, 0x10, 0x27, 0x03, 0x40, 0x01, 0x00];
        assert!(set_status(&mut ok, ServerStatus(0x0002)));
        assert_eq!(parse(ok.len(), &ok).unwrap().status, ServerStatus(0x0002));
        assert_eq!(parse(ok.len(), &ok).unwrap().affected_rows, 3);
        assert!(!set_status(&mut [0xff, 0x00], ServerStatus(0)));
    }

    #[test]
    fn reads_ok_eof_and_ok_layout_terminators() {
        let ok = [0x00, 0x03, 0xfc, 0x10, 0x27, 0x03, 0x40, 0x01, 0x00];
        let s = parse(ok.len(), &ok).unwrap();
        assert_eq!(s.affected_rows, 3);
        assert_eq!(s.last_insert_id, 10000);
        assert_eq!(s.status, ServerStatus(0x4003));
        assert_eq!(s.warnings, 1);

        let eof = [0xfe, 0x02, 0x00, 0x0a, 0x00];
        let s = parse(eof.len(), &eof).unwrap();
        assert_eq!((s.warnings, s.status.0), (2, 0x000a));

        let terminator = [0xfe, 0x00, 0x00, 0x22, 0x00, 0x00, 0x00];
        let s = parse(terminator.len(), &terminator).unwrap();
        assert_eq!(s.status.0, 0x0022);

        assert_eq!(parse(3, &[0x00, 0x01, 0x00]), None);
        assert_eq!(parse(1, &[0x01]), None);
    }
}
