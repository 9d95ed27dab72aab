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

/// Rewrites the status flags of an OK payload in place (the proxy does this when it wraps an
/// autocommit statement in a local transaction of its own, so the client still sees
/// autocommit). False if the payload is not an OK packet.
pub fn set_status(payload: &mut [u8], status: ServerStatus) -> bool {
    if payload.first() != Some(&0x00) {
        return false;
    }
    let Some((_, a)) = lenenc::read_int(&payload[1..]) else {
        return false;
    };
    let Some((_, b)) = lenenc::read_int(&payload[1 + a..]) else {
        return false;
    };
    let at = 1 + a + b;
    match payload.get_mut(at..at + 2) {
        Some(flags) => {
            flags.copy_from_slice(&status.0.to_le_bytes());
            true
        }
        None => false,
    }
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
