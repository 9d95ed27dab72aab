//! Keeps drivers from leaving the proxy through the server's Unix socket.
//!
//! Some drivers (mysql_async with its default `prefer_socket`) ask a server they reached over
//! loopback TCP for `@@socket` and reconnect through that socket, which would silently bypass
//! the proxy. For text queries that mention `@@socket`, the proxy reads the (small) response
//! whole and answers NULL in every column named `@@socket...`; drivers then stay on TCP.
//! Everything else in the response, metadata included, is passed on unchanged.

use super::SessionError;
use super::peer::Peer;
use crate::protocol::frame;
use crate::protocol::lenenc;
use crate::protocol::response::{PEEK, PacketRole, ResponseTracker, Step};

/// Responses to such queries are a few short rows. Packets are read whole, so each must fit
/// in one physical packet.
const PACKET_LIMIT: usize = frame::MAX_CHUNK - 1;

/// Whether a statement mentions the `@@socket` variable (`@@socket`, `@@global.socket`).
pub fn mentions_socket(sql: &[u8]) -> bool {
    memchr::memmem::find_iter(sql, b"@@").any(|at| {
        let rest = &sql[at + 2..];
        let rest = if rest.len() >= 7 && rest[..7].eq_ignore_ascii_case(b"global.") {
            &rest[7..]
        } else {
            rest
        };
        rest.len() >= 6
            && rest[..6].eq_ignore_ascii_case(b"socket")
            // `@@sockets_open` and the like are other variables.
            && !rest.get(6).is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
    })
}

/// Relays a text-protocol response, replacing `@@socket` values with NULL.
pub async fn response(
    client: &mut Peer,
    backend: &mut Peer,
    tracker: &mut ResponseTracker,
) -> Result<(), SessionError> {
    let mut out = Vec::new();
    let mut socket_columns: Vec<usize> = Vec::new();
    loop {
        let span = backend
            .read_packet(PACKET_LIMIT)
            .await
            .map_err(|e| SessionError::from_backend_read(e, tracker.last_seq()))?;
        let payload = &backend.buf[4..span.raw_len];
        let role = tracker.next_role();
        let step = tracker
            .on_packet(span.payload_len, span.first_seq, &payload[..payload.len().min(PEEK)])
            .map_err(|v| SessionError::backend_protocol(&v.0, tracker.last_seq()))?;
        match role {
            PacketRole::Column { index } => {
                if index == 0 {
                    socket_columns.clear();
                }
                if column_name(payload).is_some_and(is_socket_name) {
                    socket_columns.push(index);
                }
                out.extend_from_slice(&backend.buf[..span.raw_len]);
            }
            PacketRole::Row if !socket_columns.is_empty() && !matches!(payload.first(), Some(0xfe | 0xff)) => {
                match null_columns(payload, &socket_columns) {
                    Some(row) => {
                        frame::write_packet(&mut out, span.first_seq, &row);
                    }
                    None => out.extend_from_slice(&backend.buf[..span.raw_len]),
                }
            }
            _ => out.extend_from_slice(&backend.buf[..span.raw_len]),
        }
        backend.consume(span.raw_len);
        match step {
            Step::More => {}
            Step::Done => break,
            // A LOAD DATA never mentions @@socket in a way that matters; the response
            // shape would be wrong here, so refuse rather than guess.
            Step::LocalInfile => {
                return Err(SessionError::backend_protocol(
                    "LOCAL INFILE request in a query that reads @@socket",
                    tracker.last_seq(),
                ));
            }
        }
    }
    client.write_all(&out).await.map_err(|_| SessionError::ClientClosed)
}

fn is_socket_name(name: &[u8]) -> bool {
    let name = name.strip_prefix(b"@@").unwrap_or(b"");
    let name = if name.len() >= 7 && name[..7].eq_ignore_ascii_case(b"global.") {
        &name[7..]
    } else {
        name
    };
    name.eq_ignore_ascii_case(b"socket")
}

/// The column name (the fifth length-encoded string) of a column definition.
fn column_name(def: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    for _ in 0..4 {
        at += lenenc::read_str(&def[at..])?.1;
    }
    Some(lenenc::read_str(&def[at..])?.0)
}

/// A text row with the given columns replaced by NULL; `None` if the row does not parse.
fn null_columns(row: &[u8], columns: &[usize]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(row.len());
    let mut at = 0;
    let mut index = 0;
    while at < row.len() {
        let width = if row[at] == 0xfb {
            1
        } else {
            lenenc::read_str(&row[at..])?.1
        };
        if columns.contains(&index) {
            out.push(0xfb);
        } else {
            out.extend_from_slice(&row[at..at + width]);
        }
        at += width;
        index += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_variable_in_any_case() {
        assert!(mentions_socket(b"SELECT @@max_allowed_packet,@@wait_timeout,@@socket"));
        assert!(mentions_socket(b"select @@GLOBAL.Socket"));
        assert!(!mentions_socket(b"SELECT @@sockets_open, 'socket'"));
        assert!(is_socket_name(b"@@socket") && is_socket_name(b"@@global.socket"));
        assert!(!is_socket_name(b"socket") && !is_socket_name(b"@@socketx"));
    }

    #[test]
    fn rows_get_null_only_in_the_socket_column() {
        let mut row = Vec::new();
        lenenc::write_str(&mut row, b"16777216");
        row.push(0xfb);
        lenenc::write_str(&mut row, b"/run/mysqld/mysqld.sock");
        let mut expected = Vec::new();
        lenenc::write_str(&mut expected, b"16777216");
        expected.extend_from_slice(&[0xfb, 0xfb]);
        assert_eq!(null_columns(&row, &[2]).unwrap(), expected);
        assert_eq!(null_columns(&[0x05, b'a'], &[0]), None);
    }
}
