//! Length-encoded integers and strings, the protocol's variable-width encoding.

/// Decodes a length-encoded integer at the start of `buf`: its value and how many bytes it
/// took. `None` when `buf` is too short or starts with a byte that is not an integer prefix
/// (0xFB is SQL NULL in a text row, 0xFF an error marker).
pub fn read_int(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let width = match first {
        0..=0xfa => return Some((u64::from(first), 1)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return None,
    };
    let bytes = buf.get(1..1 + width)?;
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate() {
        value |= u64::from(*b) << (8 * i);
    }
    Some((value, 1 + width))
}

/// Appends `value` as a length-encoded integer.
pub fn write_int(out: &mut Vec<u8>, value: u64) {
    match value {
        0..=0xfa => out.push(value as u8),
        0xfb..=0xffff => {
            out.push(0xfc);
            out.extend_from_slice(&(value as u16).to_le_bytes());
        }
        0x1_0000..=0xff_ffff => {
            out.push(0xfd);
            out.extend_from_slice(&(value as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.push(0xfe);
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
}

/// Decodes a length-encoded string: its bytes and the total bytes consumed.
pub fn read_str(buf: &[u8]) -> Option<(&[u8], usize)> {
    let (len, width) = read_int(buf)?;
    let len = usize::try_from(len).ok()?;
    let bytes = buf.get(width..width.checked_add(len)?)?;
    Some((bytes, width + len))
}

/// Appends a length-encoded string.
pub fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    write_int(out, s.len() as u64);
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_round_trip_at_every_width_boundary() {
        for value in [0, 1, 0xfa, 0xfb, 0xffff, 0x1_0000, 0xff_ffff, 0x100_0000, u64::MAX] {
            let mut out = Vec::new();
            write_int(&mut out, value);
            assert_eq!(read_int(&out), Some((value, out.len())), "value {value:#x}");
        }
    }

    #[test]
    fn truncated_and_marker_bytes_are_rejected() {
        assert_eq!(read_int(&[]), None);
        assert_eq!(read_int(&[0xfc, 1]), None);
        assert_eq!(read_int(&[0xfb]), None);
        assert_eq!(read_int(&[0xff]), None);
        assert_eq!(read_str(&[3, b'a', b'b']), None);
        assert_eq!(read_str(&[2, b'a', b'b', b'c']), Some((&b"ab"[..], 3)));
    }
}
