//! The session's backend connection as the modes use it: statements the proxy runs itself
//! (between the client's commands, inside the client's local transaction or one of the
//! proxy's own), the client's statement run with its response held back, and the answers
//! the proxy writes instead. Responses read here never reach the client unless a caller
//! sends them on; the session's status flags follow every one of them.

use super::SessionError;
use super::peer::Peer;
use super::state::SessionState;
use crate::protocol::err::ErrPacket;
use crate::protocol::frame;
use crate::protocol::response::{self, PEEK, PacketRole, PrepareOk, ResponseKind, ResponseTracker, Step};
use crate::protocol::{Capabilities, Command, ServerStatus, SetOption, execute, lenenc, ok};

/// A text-protocol row: one value per column, `None` for NULL.
pub type Row = Vec<Option<Vec<u8>>>;

/// What an injected statement returned.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// The server's error, if the statement failed, as the client would get it.
    pub error: Option<ErrPacket>,
    /// The rows a write changed (its OK packet's count).
    pub affected_rows: u64,
    /// How many results ended well: a multi-statement string's statements that ran before
    /// the one that failed.
    pub results: u32,
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

/// Asks the server for the session's status flags: COM_PING changes nothing, and its OK
/// carries them (after an ERR that may have ended the transaction, which carries none).
pub async fn refresh_status(backend: &mut Peer, state: &mut SessionState, limit: usize) -> Result<(), SessionError> {
    let mut packet = Vec::with_capacity(5);
    frame::write_packet(&mut packet, 0, &[Command::PING]);
    write(backend, &packet).await?;
    read(backend, state, ResponseKind::Generic, limit, parse_row).await?;
    Ok(())
}

/// Runs `sql` (COM_QUERY) on the backend and reads its whole response.
pub async fn query(
    backend: &mut Peer,
    state: &mut SessionState,
    sql: &str,
    limit: usize,
) -> Result<Outcome, SessionError> {
    write(backend, &query_packet(sql)).await?;
    read_query(backend, state, limit).await
}

/// Runs `sqls` (COM_QUERY each) sent in one write, their responses read in order: one round
/// trip for all of them. The server runs each one whatever the ones before it answered, so
/// only statements for which that is harmless are sent together.
pub async fn query_pipelined(
    backend: &mut Peer,
    state: &mut SessionState,
    sqls: &[&str],
    limit: usize,
) -> Result<Vec<Outcome>, SessionError> {
    let packets: Vec<u8> = sqls.iter().flat_map(|sql| query_packet(sql)).collect();
    write(backend, &packets).await?;
    let mut outcomes = Vec::with_capacity(sqls.len());
    for _ in sqls {
        outcomes.push(read_query(backend, state, limit).await?);
    }
    Ok(outcomes)
}

/// Reads the whole response to a COM_QUERY the proxy sent.
async fn read_query(backend: &mut Peer, state: &mut SessionState, limit: usize) -> Result<Outcome, SessionError> {
    read(backend, state, ResponseKind::Generic, limit, parse_row)
        .await
        .map(|(o, _)| o)
}

/// Turns multi-statement strings on for the backend connection (COM_SET_OPTION), runs `sql`,
/// one, and turns them off again: one round trip. If they could not be turned on, `sql` is
/// one statement with a syntax error, and runs not at all.
pub async fn query_multi_statement(
    backend: &mut Peer,
    state: &mut SessionState,
    sql: &str,
    limit: usize,
) -> Result<Outcome, SessionError> {
    if state.capabilities.has(Capabilities::MULTI_STATEMENTS) {
        return query(backend, state, sql, limit).await;
    }
    let option = |[a, b]: [u8; 2]| {
        let mut packet = Vec::with_capacity(7);
        frame::write_packet(&mut packet, 0, &[Command::SET_OPTION, a, b]);
        packet
    };
    let packets = [
        option(SetOption::MULTI_STATEMENTS_ON),
        query_packet(sql),
        option(SetOption::MULTI_STATEMENTS_OFF),
    ];
    write(backend, &packets.concat()).await?;
    let turned_on = read_query(backend, state, limit).await?;
    let outcome = read_query(backend, state, limit).await?;
    let turned_off = read_query(backend, state, limit).await?;
    if let Some(e) = turned_on.error.or(turned_off.error) {
        // The session would differ from the one the client negotiated.
        return Err(SessionError::backend_protocol(
            &format!("the server refused COM_SET_OPTION: {e}"),
            0,
        ));
    }
    Ok(outcome)
}

/// Runs `sql` with `params` bound to its `?` placeholders as a prepared statement (binary
/// protocol, closed afterwards). Every column must be a string (the image select lists are).
pub async fn execute_prepared(
    backend: &mut Peer,
    state: &mut SessionState,
    sql: &str,
    params: &[execute::Param],
    limit: usize,
) -> Result<Outcome, SessionError> {
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
    write(backend, &packet).await
}

/// Writes whole command packets to the backend.
async fn write(backend: &mut Peer, packets: &[u8]) -> Result<(), SessionError> {
    backend
        .write_all(packets)
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
        if let (Some(code), None) = (tracker.error_code(), &outcome.error) {
            outcome.error = Some(ErrPacket::from_payload(code, &payload));
        }
        drop(payload);
        backend.consume(span.raw_len);
        step.map_err(|v| SessionError::backend_protocol(&v.0, tracker.last_seq()))?;
    }
    state.observe(&tracker);
    outcome.affected_rows = tracker.last_ok().map_or(0, |ok| ok.affected_rows);
    outcome.results = tracker.results();
    Ok((outcome, tracker.prepare_ok()))
}

/// Answers the client's command with `e` (sequence id 1).
pub async fn reply(client: &mut Peer, e: ErrPacket) -> Result<(), SessionError> {
    client
        .write_all(&e.to_packet(1))
        .await
        .map_err(|_| SessionError::ClientClosed)
}

/// Refuses the client's statement with `e` before any of it ran (logged).
pub async fn refuse(client: &mut Peer, e: ErrPacket) -> Result<(), SessionError> {
    tracing::info!(error = %e, "statement refused");
    reply(client, e).await
}

/// Opens the proxy's own local transaction around an autocommit statement; the server's
/// refusal is the client's answer.
pub async fn begin_own(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
) -> Result<Result<(), ErrPacket>, SessionError> {
    let begun = query(backend, state, "START TRANSACTION", limit).await?;
    Ok(begun.error.map_or(Ok(()), Err))
}

/// [`begin_own`] with `sql`, the transaction's first statement, sent in the same round trip.
/// If the START failed, `sql` ran outside any transaction (autocommit): it must be a read.
pub async fn begin_own_with(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
    sql: &str,
) -> Result<Result<Outcome, ErrPacket>, SessionError> {
    let [begun, read]: [Outcome; 2] = query_pipelined(backend, state, &["START TRANSACTION", sql], limit)
        .await?
        .try_into()
        .expect("two statements, two outcomes");
    Ok(match begun.error {
        Some(e) => Err(e),
        None => Ok(read),
    })
}

/// Sends the client's statement as it is and reads its whole response, held back. A
/// statement the server refused comes back as `Err(its response)`, the proxy's own
/// transaction (if `own`) rolled back.
pub async fn run_client_statement(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
    raw: &[u8],
    own: bool,
) -> Result<ClientStatement, SessionError> {
    let (ran, _) = run_client_statement_then(backend, state, limit, raw, own, None).await?;
    Ok(ran)
}

/// The client's statement's response: `Ok` with its bytes and the OK's counters, or `Err`
/// with the server's refusal.
pub type ClientStatement = Result<(Vec<u8>, Option<ok::OkSummary>), Vec<u8>>;

/// [`run_client_statement`], with `then` (a read) sent behind it in the same round trip. The
/// server runs `then` whatever the statement answered: if that ended the transaction, `then`
/// runs outside it (autocommit, or a transaction of its own with autocommit off).
pub async fn run_client_statement_then(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
    raw: &[u8],
    own: bool,
    then: Option<&str>,
) -> Result<(ClientStatement, Option<Outcome>), SessionError> {
    match then {
        Some(sql) => write(backend, &[raw, &query_packet(sql)].concat()).await?,
        None => write(backend, raw).await?,
    }
    let (response, summary, failed) = read_response(backend, state, limit).await?;
    let then = match then {
        Some(_) => Some(read_query(backend, state, limit).await?),
        None => None,
    };
    if failed {
        if own {
            local_rollback(backend, state, limit).await?;
        }
        return Ok((Err(response), then));
    }
    Ok((Ok((response, summary)), then))
}

/// Makes a response read inside the proxy's own transaction look as the client's autocommit
/// statement's would have: no transaction open, autocommit as it was (`before`).
pub fn as_autocommit(response: &mut [u8], state: &SessionState, before: ServerStatus) {
    let status = ServerStatus((state.status.0 & !ServerStatus::IN_TRANS) | (before.0 & ServerStatus::AUTOCOMMIT));
    response::set_response_status(
        response,
        state.capabilities,
        ServerStatus::IN_TRANS | ServerStatus::AUTOCOMMIT,
        status,
    );
}

/// Commits the proxy's own local transaction around an autocommit statement and gives the
/// client that statement's `response` with the status it would have seen (`before`), or
/// the COMMIT's error.
pub async fn commit_own(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
    mut response: Vec<u8>,
    before: ServerStatus,
) -> Result<Vec<u8>, SessionError> {
    let committed = query(backend, state, "COMMIT", limit).await?;
    if let Some(e) = committed.error {
        return Ok(e.to_packet(1));
    }
    as_autocommit(&mut response, state, before);
    Ok(response)
}

/// Rolls back (the whole local transaction, when `rollback`) and answers with `e`.
pub async fn abort(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
    rollback: bool,
    e: ErrPacket,
) -> Result<Vec<u8>, SessionError> {
    if rollback {
        local_rollback(backend, state, limit).await?;
    }
    Ok(e.to_packet(1))
}

/// Rolls back the session's local transaction on its backend connection, as if the client
/// had sent ROLLBACK, without telling the client.
pub async fn local_rollback(backend: &mut Peer, state: &mut SessionState, limit: usize) -> Result<(), SessionError> {
    let outcome = query(backend, state, "ROLLBACK", limit).await?;
    if let Some(e) = outcome.error {
        tracing::warn!(error = %e, "the local ROLLBACK failed");
    }
    Ok(())
}

/// Reads one OK/ERR response of a forwarded statement, whole: its bytes, the OK's counters,
/// and whether it failed.
pub async fn read_response(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
) -> Result<(Vec<u8>, Option<ok::OkSummary>, bool), SessionError> {
    let mut tracker = ResponseTracker::new(ResponseKind::Generic, state.capabilities, 0);
    let mut bytes = Vec::new();
    while !tracker.is_done() {
        let span = backend
            .read_packet(limit)
            .await
            .map_err(|e| SessionError::from_backend_read(e, tracker.last_seq()))?;
        let payload = backend.payload(&span);
        let step = tracker.on_packet(span.payload_len, span.last_seq, &payload[..payload.len().min(PEEK)]);
        drop(payload);
        bytes.extend_from_slice(&backend.buf[..span.raw_len]);
        backend.consume(span.raw_len);
        match step {
            Ok(Step::More) | Ok(Step::Done) => {}
            Ok(_) => {
                return Err(SessionError::backend_protocol(
                    "a DML statement asked for a local file",
                    tracker.last_seq(),
                ));
            }
            Err(v) => return Err(SessionError::backend_protocol(&v.0, tracker.last_seq())),
        }
    }
    state.observe(&tracker);
    Ok((bytes, tracker.last_ok(), tracker.error_code().is_some()))
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
