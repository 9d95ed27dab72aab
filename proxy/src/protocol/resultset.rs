//! Responses the proxy writes itself when it answers a statement without the server (its
//! global-transaction statements): an OK packet, and a small text result set of string
//! columns, in the layout the session negotiated (EOF packets or CLIENT_DEPRECATE_EOF,
//! MariaDB's extended metadata and metadata caching).

use super::constants::{Capabilities, ServerStatus};
use super::{frame, lenenc};

/// utf8mb4_general_ci, what servers announce for string columns of this kind.
const UTF8MB4: u16 = 45;
/// MYSQL_TYPE_VAR_STRING.
const VAR_STRING: u8 = 0xfd;

fn ok_payload(marker: u8, status: ServerStatus) -> Vec<u8> {
    // marker, affected rows 0, last insert id 0, status, warnings 0
    let mut out = vec![marker, 0, 0];
    out.extend_from_slice(&status.0.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// An OK packet with no rows affected, answering a command (sequence id 1).
pub fn ok(status: ServerStatus) -> Vec<u8> {
    let mut out = Vec::new();
    frame::write_packet(&mut out, 1, &ok_payload(0x00, status));
    out
}

fn column_definition(name: &str, caps: Capabilities) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + name.len());
    lenenc::write_str(&mut out, b"def");
    lenenc::write_str(&mut out, b""); // schema
    lenenc::write_str(&mut out, b""); // table
    lenenc::write_str(&mut out, b""); // original table
    lenenc::write_str(&mut out, name.as_bytes());
    lenenc::write_str(&mut out, name.as_bytes());
    if caps.has(Capabilities::MARIADB_EXTENDED_METADATA) {
        out.push(0); // no extended type information
    }
    out.push(0x0c); // length of the fixed fields
    out.extend_from_slice(&UTF8MB4.to_le_bytes());
    out.extend_from_slice(&(256u32 * 4).to_le_bytes()); // column length
    out.push(VAR_STRING);
    out.extend_from_slice(&0u16.to_le_bytes()); // flags
    out.push(0); // decimals
    out.extend_from_slice(&[0, 0]);
    out
}

/// A text result set of string columns answering a command (sequence ids from 1).
pub fn text(columns: &[&str], rows: &[Vec<Option<String>>], caps: Capabilities, status: ServerStatus) -> Vec<u8> {
    let deprecate_eof = caps.has(Capabilities::DEPRECATE_EOF);
    let eof = |status: ServerStatus| {
        let mut p = vec![0xfe, 0, 0];
        p.extend_from_slice(&status.0.to_le_bytes());
        p
    };
    let mut out = Vec::new();
    let mut seq = 1u8;
    let mut put = |out: &mut Vec<u8>, payload: &[u8]| {
        seq = frame::write_packet(out, seq, payload);
    };
    let mut count = Vec::new();
    lenenc::write_int(&mut count, columns.len() as u64);
    if caps.has(Capabilities::MARIADB_CACHE_METADATA) {
        count.push(1); // the column definitions follow
    }
    put(&mut out, &count);
    for c in columns {
        put(&mut out, &column_definition(c, caps));
    }
    if !deprecate_eof {
        put(&mut out, &eof(status));
    }
    for row in rows {
        let mut payload = Vec::new();
        for value in row {
            match value {
                Some(v) => lenenc::write_str(&mut payload, v.as_bytes()),
                None => payload.push(0xfb),
            }
        }
        put(&mut out, &payload);
    }
    if deprecate_eof {
        put(&mut out, &ok_payload(0xfe, status));
    } else {
        put(&mut out, &eof(status));
    }
    out
}
