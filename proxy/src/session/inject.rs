//! Statements the proxy runs itself on a session's backend connection, between the client's
//! commands and inside the client's local transaction (a ROLLBACK before ROLLBACK GLOBAL;
//! image reads and undo writes in AT mode). Their responses are read here and never reach
//! the client; the session's status flags follow them.

use super::SessionError;
use super::peer::Peer;
use super::state::SessionState;
use crate::protocol::frame;
use crate::protocol::response::{PEEK, PacketRole, PrepareOk, ResponseKind, ResponseTracker};
use crate::protocol::{Command, execute, lenenc};

/// A text-protocol row: one value per column, `None` for NULL.
pub type Row = Vec<Option<Vec<u8>>>;

/// What an injected statement returned.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// The server's error, if the statement failed: code and message.
    pub error: Option<(u16, String)>,
}

fn parse_row(payload: &[u8]) -> Option<Row> {
    let mut row = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        if payload[at] == 0xfb {
            row.push(None);
            at += 1;
        } else {
            let (value, used) = lenenc::read_str(&payload[at..])?;
            row.push(Some(value.to_vec()));
            at += used;
        }
    }
    Some(row)
}

/// A COM_QUERY packet (sequence id 0) for `sql`.
pub fn query_packet(sql: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(1 + sql.len());
    payload.push(Command::QUERY);
    payload.extend_from_slice(sql.as_bytes());
    let mut packet = Vec::with_capacity(payload.len() + 4);
    frame::write_packet(&mut packet, 0, &payload);
    packet
}

/// Runs `sql` (COM_QUERY) on the backend and reads its whole response.
pub async fn query(
    backend: &mut Peer,
    state: &mut SessionState,
    sql: &str,
    limit: usize,
) -> Result<Outcome, SessionError> {
    backend
        .write_all(&query_packet(sql))
        .await
        .map_err(|e| SessionError::backend_lost(&e.to_string(), 0))?;
    read(backend, state, ResponseKind::Generic, limit, parse_row)
        .await
        .map(|(o, _)| o)
}

/// Reads the response of a text statement the proxy already sent (pipelined before another).
pub async fn read_one(backend: &mut Peer, state: &mut SessionState, limit: usize) -> Result<Outcome, SessionError> {
    read(backend, state, ResponseKind::Generic, limit, parse_row)
        .await
        .map(|(o, _)| o)
}

/// Runs `sql`, whose text holds a client's `?` placeholders, with `params`: as a text query
/// when there are none or all are integers (written out, they mean the same: one round trip
/// instead of a prepare, execute and close), else as a prepared statement (binary protocol,
/// closed afterwards; strings are bound, as a literal would compare under other collation
/// rules). Every column must be a string (the image select lists are).
pub async fn execute(
    backend: &mut Peer,
    state: &mut SessionState,
    sql: &str,
    params: &[execute::Param],
    limit: usize,
) -> Result<Outcome, SessionError> {
    if params.is_empty() {
        return query(backend, state, sql, limit).await;
    }
    if let Some(text) = execute::integer_literals(params).and_then(|v| crate::global::dml::bind_literals(sql, &v)) {
        return query(backend, state, &text, limit).await;
    }
    let mut payload = vec![Command::STMT_PREPARE];
    payload.extend_from_slice(sql.as_bytes());
    send(backend, &payload).await?;
    let (prepared, prepare_ok) = read(backend, state, ResponseKind::Prepare, limit, |_| Some(Vec::new())).await?;
    let (Some(ok), None) = (prepare_ok, &prepared.error) else {
        return Ok(prepared);
    };
    send(backend, &execute::payload(ok.statement_id, params)).await?;
    let columns = usize::from(ok.columns);
    let (outcome, _) = read(backend, state, ResponseKind::Generic, limit, |p| {
        execute::string_row(p, columns)
    })
    .await?;
    let mut close = vec![Command::STMT_CLOSE];
    close.extend_from_slice(&ok.statement_id.to_le_bytes());
    send(backend, &close).await?;
    Ok(outcome)
}

async fn send(backend: &mut Peer, payload: &[u8]) -> Result<(), SessionError> {
    let mut packet = Vec::new();
    frame::write_packet(&mut packet, 0, payload);
    backend
        .write_all(&packet)
        .await
        .map_err(|e| SessionError::backend_lost(&e.to_string(), 0))
}

/// Reads one whole response, decoding result rows with `row`.
async fn read(
    backend: &mut Peer,
    state: &mut SessionState,
    kind: ResponseKind,
    limit: usize,
    row: impl Fn(&[u8]) -> Option<Row>,
) -> Result<(Outcome, Option<PrepareOk>), SessionError> {
    let mut tracker = ResponseTracker::new(kind, state.capabilities, 0);
    let mut outcome = Outcome::default();
    while !tracker.is_done() {
        let span = backend
            .read_packet(limit)
            .await
            .map_err(|e| SessionError::from_backend_read(e, tracker.last_seq()))?;
        let role = tracker.next_role();
        let payload = backend.payload(&span);
        let prefix = &payload[..payload.len().min(PEEK)];
        let step = tracker.on_packet(span.payload_len, span.last_seq, prefix);
        if role == PacketRole::Row && !tracker.is_done() {
            match row(&payload) {
                Some(row) => outcome.rows.push(row),
                None => return Err(SessionError::backend_protocol("a malformed row", span.last_seq)),
            }
        }
        if tracker.error_code().is_some() && outcome.error.is_none() {
            let message = payload
                .get(9..)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            outcome.error = tracker.error_code().map(|c| (c, message));
        }
        drop(payload);
        backend.consume(span.raw_len);
        step.map_err(|v| SessionError::backend_protocol(&v.0, tracker.last_seq()))?;
    }
    if let Some(status) = tracker.last_status() {
        state.status = status;
    }
    Ok((outcome, tracker.prepare_ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_with_nulls_and_binary() {
        let mut p = Vec::new();
        lenenc::write_str(&mut p, b"1");
        p.push(0xfb);
        lenenc::write_str(&mut p, b"\x00\xfb\xff");
        assert_eq!(
            parse_row(&p),
            Some(vec![Some(b"1".to_vec()), None, Some(b"\x00\xfb\xff".to_vec())])
        );
        assert_eq!(parse_row(&[0x05, b'a']), None, "a truncated value");
    }
}
