//! COM_STMT_EXECUTE: reading a client's bound parameters (so the proxy can pass some of them
//! to its own image queries) and writing an execute packet of its own. Binary rows of the
//! proxy's own image queries are read here too: every column of those is a binary string.

use super::lenenc;

/// MYSQL_TYPE_STRING.
const STRING: u8 = 0xfe;

/// One bound parameter as the client sent it: its type (type byte and flags byte) and its
/// value in the binary protocol's encoding, `None` for NULL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub kind: [u8; 2],
    pub value: Option<Vec<u8>>,
}

/// Bytes of a binary-protocol value of type `kind` at the start of `buf` (a length-encoded
/// one only if it fits: its length is the client's to choose).
fn value_len(kind: u8, buf: &[u8]) -> Option<usize> {
    Some(match kind {
        0x06 => 0,                                               // NULL
        0x01 => 1,                                               // TINY
        0x02 | 0x0d => 2,                                        // SHORT, YEAR
        0x03 | 0x09 | 0x04 => 4,                                 // LONG, INT24, FLOAT
        0x08 | 0x05 => 8,                                        // LONGLONG, DOUBLE
        0x07 | 0x0a | 0x0b | 0x0c => 1 + *buf.first()? as usize, // TIMESTAMP, DATE, TIME, DATETIME
        _ => lenenc::read_str(buf)?.1,
    })
}

/// The parameters of an execute payload (command byte included) for a statement with
/// `count` parameters. `previous` are the types bound by an earlier execute, used when this
/// one does not send them; `long` the values sent before with COM_STMT_SEND_LONG_DATA,
/// which the execute does not repeat. `None` if the payload is malformed or types are
/// unknown.
pub fn params(
    payload: &[u8],
    count: usize,
    previous: Option<&[[u8; 2]]>,
    long: &std::collections::BTreeMap<u16, Vec<u8>>,
) -> Option<(Vec<Param>, Vec<[u8; 2]>)> {
    if count == 0 {
        return Some((Vec::new(), Vec::new()));
    }
    let mut at = 10; // command, statement id, flags, iteration count
    let bitmap = payload.get(at..at + count.div_ceil(8))?;
    at += count.div_ceil(8);
    let new_types = *payload.get(at)? == 1;
    at += 1;
    let types: Vec<[u8; 2]> = if new_types {
        let raw = payload.get(at..at + 2 * count)?;
        at += 2 * count;
        raw.chunks(2).map(|c| [c[0], c[1]]).collect()
    } else {
        previous?.to_vec()
    };
    if types.len() != count {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for (i, kind) in types.iter().enumerate() {
        if let Some(data) = u16::try_from(i).ok().and_then(|i| long.get(&i)) {
            let mut value = Vec::with_capacity(data.len() + 9);
            lenenc::write_str(&mut value, data);
            // Long data is a string whatever type was bound (the server converts it), so
            // it is one here too: re-sent, and as a literal.
            out.push(Param {
                kind: [STRING, kind[1]],
                value: Some(value),
            });
            continue;
        }
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            out.push(Param {
                kind: *kind,
                value: None,
            });
            continue;
        }
        let len = value_len(kind[0], payload.get(at..)?)?;
        out.push(Param {
            kind: *kind,
            value: Some(payload.get(at..at + len)?.to_vec()),
        });
        at += len;
    }
    Some((out, types))
}

/// The parameter types an execute payload sends, if it sends them (new-params-bound flag).
pub fn sent_types(payload: &[u8], count: usize) -> Option<Vec<[u8; 2]>> {
    if count == 0 {
        return None;
    }
    let flag = 10 + count.div_ceil(8);
    if *payload.get(flag)? != 1 {
        return None;
    }
    let raw = payload.get(flag + 1..flag + 1 + 2 * count)?;
    Some(raw.chunks(2).map(|c| [c[0], c[1]]).collect())
}

/// The payload of an execute of statement `id` with `params` (always sending their types).
pub fn payload(id: u32, params: &[Param]) -> Vec<u8> {
    let mut out = vec![super::Command::STMT_EXECUTE];
    out.extend_from_slice(&id.to_le_bytes());
    out.push(0); // no cursor
    out.extend_from_slice(&1u32.to_le_bytes());
    if params.is_empty() {
        return out;
    }
    let mut bitmap = vec![0u8; params.len().div_ceil(8)];
    for (i, p) in params.iter().enumerate() {
        if p.value.is_none() {
            bitmap[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend_from_slice(&bitmap);
    out.push(1);
    for p in params {
        out.extend_from_slice(&p.kind);
    }
    for p in params.iter().filter_map(|p| p.value.as_ref()) {
        out.extend_from_slice(p);
    }
    out
}

/// A binary-protocol row whose columns are all strings: header byte, NULL bitmap (offset 2),
/// then a length-encoded string per non-NULL column.
pub fn string_row(payload: &[u8], columns: usize) -> Option<Vec<Option<Vec<u8>>>> {
    let bitmap_len = (columns + 7 + 2) / 8;
    let bitmap = payload.get(1..1 + bitmap_len)?;
    let mut at = 1 + bitmap_len;
    let mut row = Vec::with_capacity(columns);
    for i in 0..columns {
        let bit = i + 2;
        if bitmap[bit / 8] & (1 << (bit % 8)) != 0 {
            row.push(None);
        } else {
            let (v, used) = lenenc::read_str(payload.get(at..)?)?;
            row.push(Some(v.to_vec()));
            at += used;
        }
    }
    Some(row)
}

/// A parameter as an SQL literal the proxy can put in a query of its own, for the types that
/// can name a row (integers and strings); `None` for others.
pub fn literal(p: &Param) -> Option<String> {
    let Some(v) = &p.value else { return Some("NULL".into()) };
    let unsigned = p.kind[1] & 0x80 != 0;
    let int = |bytes: &[u8]| -> String {
        let mut b = [0u8; 8];
        b[..bytes.len()].copy_from_slice(bytes);
        let raw = u64::from_le_bytes(b);
        if unsigned {
            raw.to_string()
        } else {
            let shift = 64 - 8 * bytes.len() as u32;
            (((raw << shift) as i64) >> shift).to_string()
        }
    };
    match p.kind[0] {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 | 0x0d => Some(int(v)),
        0x0f | 0xfd | 0xfe | 0xfc | 0xf6 => {
            let (s, _) = lenenc::read_str(v)?;
            Some(format!(
                "X'{}'",
                s.iter().map(|b| format!("{b:02X}")).collect::<String>()
            ))
        }
        _ => None,
    }
}

/// The parameters as SQL literals, if every one is an integer (or NULL).
pub fn integer_literals(params: &[Param]) -> Option<Vec<String>> {
    params
        .iter()
        .map(|p| match p.kind[0] {
            0x01 | 0x02 | 0x03 | 0x08 | 0x09 | 0x0d | 0x06 => literal(p),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_past_the_address_space_is_malformed() {
        // Found by fuzzing (execute_params target): the length overflowed the offset.
        for len in [u64::MAX, u64::MAX - 9, 1 << 40] {
            let mut payload = vec![0x17, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0x00, 1, 0xfe, 0x00, 0xfe];
            payload.extend_from_slice(&len.to_le_bytes());
            assert_eq!(params(&payload, 1, None, &Default::default()), None, "{len}");
        }
    }

    #[test]
    fn long_data_bound_to_an_integer_is_a_string() {
        // Found by fuzzing (execute_params target): long data bound to an integer
        // parameter was read as a binary integer (a panic past 8 bytes, a wrong value
        // below) and re-sent with the integer type.
        let long = std::collections::BTreeMap::from([(0u16, b"12345678901".to_vec())]);
        let execute = [0x17, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0x00, 1, 0x08, 0x00];
        let (got, types) = params(&execute, 1, None, &long).expect("well-formed");
        assert_eq!(types, vec![[0x08, 0x00]], "later executes reuse the bound types");
        assert_eq!(literal(&got[0]).as_deref(), Some("X'3132333435363738393031'"));
        assert_eq!(integer_literals(&got), None);
        let short = std::collections::BTreeMap::from([(0u16, b"7".to_vec())]);
        let (got, _) = params(&execute, 1, None, &short).expect("well-formed");
        assert_eq!(literal(&got[0]).as_deref(), Some("X'37'"));
        let resent = payload(1, &got);
        assert_eq!(&resent[12..], &[STRING, 0x00, 1, b'7']);
    }

    #[test]
    fn params_round_trip_and_reuse_types() {
        let params = vec![
            Param {
                kind: [0x08, 0x00],
                value: Some((-5i64).to_le_bytes().to_vec()),
            },
            Param {
                kind: [0xfd, 0x00],
                value: None,
            },
            Param {
                kind: [0xfd, 0x00],
                value: Some(vec![3, b'a', b'\'', b'c']),
            },
            Param {
                kind: [0x0c, 0x00],
                value: Some(vec![4, 0xe8, 0x07, 1, 2]),
            },
        ];
        let payload = payload(7, &params);
        let (parsed, types) = params_of(&payload, 4, None).unwrap();
        assert_eq!(parsed, params);
        assert_eq!(literal(&parsed[0]).as_deref(), Some("-5"));
        assert_eq!(literal(&parsed[1]).as_deref(), Some("NULL"));
        assert_eq!(literal(&parsed[2]).as_deref(), Some("X'612763'"));
        assert_eq!(literal(&parsed[3]), None);
        // An execute that does not resend the types uses the earlier ones.
        let mut again = payload[..10].to_vec();
        again.push(0b0000_0010);
        again.push(0);
        again.extend_from_slice(&(-5i64).to_le_bytes());
        again.extend_from_slice(&[3, b'a', b'\'', b'c', 4, 0xe8, 0x07, 1, 2]);
        assert_eq!(params_of(&again, 4, Some(&types)).unwrap().0, params);
        assert_eq!(params_of(&again, 4, None), None, "types unknown");
        assert_eq!(params_of(&again[..again.len() - 1], 4, Some(&types)), None, "truncated");
        let unsigned = Param {
            kind: [0x01, 0x80],
            value: Some(vec![0xff]),
        };
        assert_eq!(literal(&unsigned).as_deref(), Some("255"));
    }

    fn params_of(p: &[u8], n: usize, prev: Option<&[[u8; 2]]>) -> Option<(Vec<Param>, Vec<[u8; 2]>)> {
        params(p, n, prev, &Default::default())
    }

    #[test]
    fn long_data_stands_for_values_the_execute_leaves_out() {
        // Two string parameters; the first came as long data, so only the second is inline.
        let mut p = vec![0x17, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0b00, 1, 0xfc, 0, 0xfe, 0];
        p.extend_from_slice(&[2, b'h', b'i']);
        let long = std::collections::BTreeMap::from([(0u16, b"long value".to_vec())]);
        let (got, _) = params(&p, 2, None, &long).unwrap();
        assert_eq!(got[0].value.as_deref(), Some(&b"\x0along value"[..]));
        assert_eq!(got[1].value.as_deref(), Some(&b"\x02hi"[..]));
        assert_eq!(literal(&got[0]).as_deref(), Some("X'6C6F6E672076616C7565'"));
    }

    #[test]
    fn string_rows() {
        // Two columns, the second NULL: bitmap bit 3.
        let row = [0x00, 0b0000_1000, 2, b'h', b'i'];
        assert_eq!(string_row(&row, 2), Some(vec![Some(b"hi".to_vec()), None]));
    }
}
