//! The response state machine: given the command a client sent, it tells from the start of
//! each response packet whether the response has ended.
//!
//! The proxy forwards one command at a time and must know exactly where each response ends,
//! both to read the next command and to keep the session state (status flags) current. It
//! sees every packet start once, in order, through [`ResponseTracker::on_packet`].

use super::constants::{Capabilities, Command, ServerStatus};
use super::{err, lenenc, ok};

/// How many payload bytes the tracker needs to see of each packet.
pub const PEEK: usize = ok::PREFIX_LEN;

/// COM_STMT_EXECUTE's cursor types (READ_ONLY, FOR_UPDATE, SCROLLABLE); 0 is NO_CURSOR.
const CURSOR_TYPES: u8 = 0x07;

/// The shape of response a command gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseKind {
    /// No response at all (COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA).
    None,
    /// OK, ERR, EOF, LOCAL INFILE request or result sets, chained by MORE_RESULTS_EXISTS.
    /// Also the answer to commands that only ever get OK, ERR or EOF.
    Generic,
    /// COM_STMT_EXECUTE asking for a cursor: as `Generic`, except that a result set whose
    /// metadata EOF says CURSOR_EXISTS ends there (its rows come by COM_STMT_FETCH). Only such
    /// an execute opens a cursor: MariaDB also sets the flag on result sets a compound
    /// statement or a stored procedure sends while a cursor of its own is open, and their rows
    /// follow as usual.
    CursorExecute,
    /// COM_STMT_PREPARE: PREPARE_OK with parameter and column definitions, or ERR.
    Prepare,
    /// COM_FIELD_LIST: column definitions ending in EOF, or ERR.
    FieldList,
    /// COM_STATISTICS: one human-readable string packet.
    Statistics,
    /// COM_STMT_FETCH: binary rows ending in a terminator, or ERR.
    Fetch,
    /// COM_CHANGE_USER: an authentication exchange (handled by the session, not here).
    Authentication,
    /// Binlog dump: a stream that only ends with the connection.
    Stream,
}

impl ResponseKind {
    /// The response a command `payload` (command byte first) gets.
    pub fn of(payload: &[u8]) -> ResponseKind {
        let command = payload.first().copied().unwrap_or_default();
        match command {
            Command::QUIT | Command::STMT_CLOSE | Command::STMT_SEND_LONG_DATA => Self::None,
            Command::STMT_PREPARE => Self::Prepare,
            Command::FIELD_LIST => Self::FieldList,
            Command::STATISTICS => Self::Statistics,
            Command::STMT_FETCH => Self::Fetch,
            // The flags byte after the statement id: a cursor type other than NO_CURSOR.
            Command::STMT_EXECUTE if payload.get(5).is_some_and(|f| f & CURSOR_TYPES != 0) => Self::CursorExecute,
            Command::CHANGE_USER => Self::Authentication,
            Command::BINLOG_DUMP | Command::BINLOG_DUMP_GTID => Self::Stream,
            _ => Self::Generic,
        }
    }
}

/// What the session must do after passing a packet on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// More response packets follow.
    More,
    /// The response is complete.
    Done,
    /// The server asked for a LOCAL INFILE file: relay the client's file packets (up to an
    /// empty one) to the server, then continue reading the response.
    LocalInfile,
}

/// Where the next packet sits in a result set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketRole {
    Column { index: usize },
    Row,
    Other,
}

/// A PREPARE_OK packet's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepareOk {
    pub statement_id: u32,
    pub columns: u16,
    pub params: u16,
}

/// A response the tracker cannot follow: the backend broke the protocol (or the proxy's
/// understanding of it). The session must end rather than guess.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolViolation(pub String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The first packet of a response or of the next result in a chain.
    ResultStart,
    /// Column definitions of a result set, then its metadata EOF (if any) and rows.
    Columns {
        left: u64,
        total: u64,
    },
    /// The EOF that ends column definitions when CLIENT_DEPRECATE_EOF is off.
    ColumnsEof,
    Rows,
    PrepareStart,
    /// PREPARE_OK's parameter definitions, then its column definitions.
    PrepareParams {
        left: u16,
        columns: u16,
    },
    PrepareParamsEof {
        columns: u16,
    },
    PrepareColumns {
        left: u16,
    },
    PrepareColumnsEof,
    FieldList,
    Statistics,
    Done,
}

/// Follows one response, packet by packet.
#[derive(Debug)]
pub struct ResponseTracker {
    state: State,
    deprecate_eof: bool,
    /// MARIADB_CLIENT_CACHE_METADATA: a result set's column count is followed by a byte
    /// that says whether its column definitions follow.
    cache_metadata: bool,
    /// The response to an execute that asked for a cursor (see [`ResponseKind::CursorExecute`]).
    execute: bool,
    /// Status flags of the last OK/EOF seen, if any.
    last_status: Option<ServerStatus>,
    last_ok: Option<ok::OkSummary>,
    prepare_ok: Option<PrepareOk>,
    /// How many OK/EOF packets (status flags) were seen.
    statuses: u32,
    /// How many results (an OK, or a result set's rows) ended without an error.
    results: u32,
    error_code: Option<u16>,
    last_seq: u8,
}

impl ResponseTracker {
    /// A tracker for the response to a command of `kind`, on a session whose negotiated
    /// capabilities are `caps`. `command_seq` is the sequence id of the command's last packet.
    pub fn new(kind: ResponseKind, caps: Capabilities, command_seq: u8) -> Self {
        let state = match kind {
            ResponseKind::Prepare => State::PrepareStart,
            ResponseKind::FieldList => State::FieldList,
            ResponseKind::Statistics => State::Statistics,
            ResponseKind::Fetch => State::Rows,
            ResponseKind::None | ResponseKind::Authentication | ResponseKind::Stream => State::Done,
            ResponseKind::Generic | ResponseKind::CursorExecute => State::ResultStart,
        };
        ResponseTracker {
            state,
            deprecate_eof: caps.has(Capabilities::DEPRECATE_EOF),
            cache_metadata: caps.has(Capabilities::MARIADB_CACHE_METADATA),
            execute: kind == ResponseKind::CursorExecute,
            last_status: None,
            last_ok: None,
            prepare_ok: None,
            statuses: 0,
            results: 0,
            error_code: None,
            last_seq: command_seq,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Status flags from the response's last OK or EOF packet.
    pub fn last_status(&self) -> Option<ServerStatus> {
        self.last_status
    }

    /// The last OK packet (or OK-layout terminator) of the response.
    pub fn last_ok(&self) -> Option<ok::OkSummary> {
        self.last_ok
    }

    /// The PREPARE_OK fields, for a successful COM_STMT_PREPARE.
    pub fn prepare_ok(&self) -> Option<PrepareOk> {
        self.prepare_ok
    }

    /// How many results ended well: in a multi-statement string's response, the statements
    /// that ran before the one that failed, if one did.
    pub fn results(&self) -> u32 {
        self.results
    }

    /// The error code, if the response ended in an ERR packet.
    pub fn error_code(&self) -> Option<u16> {
        self.error_code
    }

    /// What the next packet is, if it is part of a result set's body. Text and binary rows
    /// alike are `Row` (terminators and ERR packets arrive in that role too).
    pub fn next_role(&self) -> PacketRole {
        match self.state {
            State::Columns { left, total } => PacketRole::Column {
                index: (total - left) as usize,
            },
            State::Rows => PacketRole::Row,
            _ => PacketRole::Other,
        }
    }

    /// Sequence id of the last packet seen (or of the command, before any).
    pub fn last_seq(&self) -> u8 {
        self.last_seq
    }

    /// Records that the client sent packets up to sequence id `seq` (LOCAL INFILE data).
    pub fn client_sent(&mut self, seq: u8) {
        self.last_seq = seq;
    }

    /// Advances over one packet: its payload length, sequence id and first
    /// `min(len, PEEK)` bytes.
    pub fn on_packet(&mut self, len: usize, seq: u8, prefix: &[u8]) -> Result<Step, ProtocolViolation> {
        self.last_seq = seq;
        let first = prefix.first().copied();
        let next = match self.state {
            State::Done => {
                return Err(ProtocolViolation(format!(
                    "the server sent a {len}-byte packet after its response had ended"
                )));
            }
            State::ResultStart => match first {
                Some(0x00) => self.terminal_ok(len, prefix)?,
                Some(0xff) => self.error(prefix),
                Some(0xfe) => self.terminal_ok(len, prefix)?,
                Some(0xfb) => return Ok(Step::LocalInfile),
                _ => {
                    let (columns, used) = lenenc::read_int(prefix)
                        .ok_or_else(|| ProtocolViolation("a result set started without a column count".into()))?;
                    if columns == 0 {
                        return Err(ProtocolViolation("a result set with no columns".into()));
                    }
                    // With MariaDB's metadata caching a byte says whether the column
                    // definitions follow; an execute whose client has them gets none.
                    if self.cache_metadata && prefix.get(used) == Some(&0) {
                        if self.deprecate_eof {
                            State::Rows
                        } else {
                            State::ColumnsEof
                        }
                    } else {
                        State::Columns {
                            left: columns,
                            total: columns,
                        }
                    }
                }
            },
            State::Columns { left, total } => {
                if first == Some(0xff) {
                    self.error(prefix)
                } else if left > 1 {
                    State::Columns { left: left - 1, total }
                } else if self.deprecate_eof {
                    State::Rows
                } else {
                    State::ColumnsEof
                }
            }
            State::ColumnsEof => {
                let summary = self.expect_eof(len, prefix, "column definitions")?;
                // An execute that opened a cursor ends after its metadata; rows come by fetch.
                if self.execute && summary.status.has(ServerStatus::CURSOR_EXISTS) {
                    State::Done
                } else {
                    State::Rows
                }
            }
            State::Rows => match first {
                Some(0xff) => self.error(prefix),
                Some(0xfe) if len < 0xff_ffff => self.terminal_ok(len, prefix)?,
                _ => State::Rows,
            },
            State::PrepareStart => match first {
                Some(0xff) => self.error(prefix),
                Some(0x00) if prefix.len() >= 9 => {
                    let statement_id = u32::from_le_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
                    let columns = u16::from_le_bytes([prefix[5], prefix[6]]);
                    let params = u16::from_le_bytes([prefix[7], prefix[8]]);
                    self.prepare_ok = Some(PrepareOk {
                        statement_id,
                        columns,
                        params,
                    });
                    self.after_prepare_params(params, columns)
                }
                _ => return Err(ProtocolViolation("malformed PREPARE_OK".into())),
            },
            State::PrepareParams { left, columns } => {
                if left > 1 {
                    State::PrepareParams {
                        left: left - 1,
                        columns,
                    }
                } else if self.deprecate_eof {
                    self.prepare_columns(columns)
                } else {
                    State::PrepareParamsEof { columns }
                }
            }
            State::PrepareParamsEof { columns } => {
                self.expect_eof(len, prefix, "parameter definitions")?;
                self.prepare_columns(columns)
            }
            State::PrepareColumns { left } => {
                if left > 1 {
                    State::PrepareColumns { left: left - 1 }
                } else if self.deprecate_eof {
                    State::Done
                } else {
                    State::PrepareColumnsEof
                }
            }
            State::PrepareColumnsEof => {
                self.expect_eof(len, prefix, "column definitions")?;
                State::Done
            }
            State::FieldList => match first {
                Some(0xff) => self.error(prefix),
                Some(0xfe) if len < 0xff_ffff => {
                    self.record_ok(len, prefix);
                    State::Done
                }
                _ => State::FieldList,
            },
            State::Statistics => State::Done,
        };
        self.state = next;
        Ok(if next == State::Done { Step::Done } else { Step::More })
    }

    fn record_ok(&mut self, len: usize, prefix: &[u8]) -> Option<ok::OkSummary> {
        let summary = ok::parse(len, prefix)?;
        self.statuses += 1;
        self.last_status = Some(summary.status);
        self.last_ok = Some(summary);
        Some(summary)
    }

    /// An OK or terminator: the response ends unless more results follow.
    fn terminal_ok(&mut self, len: usize, prefix: &[u8]) -> Result<State, ProtocolViolation> {
        let summary = self
            .record_ok(len, prefix)
            .ok_or_else(|| ProtocolViolation(format!("malformed OK/EOF packet of {len} bytes")))?;
        self.results += 1;
        Ok(if summary.status.has(ServerStatus::MORE_RESULTS_EXISTS) {
            State::ResultStart
        } else {
            State::Done
        })
    }

    fn expect_eof(&mut self, len: usize, prefix: &[u8], after: &str) -> Result<ok::OkSummary, ProtocolViolation> {
        match prefix.first() {
            Some(0xfe) => self.record_ok(len, prefix),
            _ => None,
        }
        .ok_or_else(|| ProtocolViolation(format!("expected EOF after {after}")))
    }

    /// ERR ends the response, except MariaDB's progress reports, which keep the state.
    fn error(&mut self, prefix: &[u8]) -> State {
        match err::code(prefix) {
            Some(err::PROGRESS_REPORT) => self.state,
            code => {
                self.error_code = code;
                State::Done
            }
        }
    }

    fn after_prepare_params(&self, params: u16, columns: u16) -> State {
        if params > 0 {
            State::PrepareParams { left: params, columns }
        } else {
            self.prepare_columns(columns)
        }
    }

    fn prepare_columns(&self, columns: u16) -> State {
        if columns > 0 {
            State::PrepareColumns { left: columns }
        } else {
            State::Done
        }
    }
}

/// Whether a buffered response (whole framed packets) is an error: its last packet is an
/// ERR (a progress report, also an ERR packet, never ends a response).
pub fn ends_in_error(response: &[u8]) -> bool {
    ok::packets(response).last().is_some_and(
        |(_, payload, _)| matches!(err::code(&response[payload.clone()]), Some(c) if c != err::PROGRESS_REPORT),
    )
}

/// Rewrites the `mask` bits of the status flags of every OK and EOF of a whole buffered
/// response (framed packets, on a session with capabilities `caps`) to those of `status`,
/// leaving the other bits (MORE_RESULTS_EXISTS, ...) as the server sent them. The packets are
/// followed with a tracker, so a row that looks like an OK or an EOF is left alone, and every
/// result of a multi-result answer gets it, not only the last.
pub fn set_response_status(response: &mut [u8], caps: Capabilities, mask: u16, status: ServerStatus) {
    let packets = ok::packets(response);
    let Some(&(first, _, _)) = packets.first() else {
        return;
    };
    let mut tracker = ResponseTracker::new(ResponseKind::Generic, caps, response[first + 3].wrapping_sub(1));
    let mut i = 0;
    while i < packets.len() {
        // A logical packet: a physical one and its continuations (payloads of 16 MiB - 1).
        let (header, payload, _) = packets[i].clone();
        let mut len = payload.len();
        let mut j = i + 1;
        while j < packets.len() && packets[j].2 {
            len += packets[j].1.len();
            j += 1;
        }
        let seen = tracker.statuses;
        let prefix = payload.start..payload.start + payload.len().min(PEEK);
        if tracker.on_packet(len, response[header + 3], &response[prefix]).is_err() {
            return;
        }
        if tracker.statuses != seen
            && let Some(old) = ok::parse(payload.len(), &response[payload.clone()])
        {
            ok::set_status(
                &mut response[payload],
                ServerStatus((old.status.0 & !mask) | (status.0 & mask)),
            );
        }
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_DEPRECATE: Capabilities = Capabilities(Capabilities::PROTOCOL_41);
    const DEPRECATE: Capabilities = Capabilities(Capabilities::PROTOCOL_41 | Capabilities::DEPRECATE_EOF);

    /// A framed packet with sequence id `seq`.
    fn frame(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::protocol::frame::write_packet(&mut out, seq, payload);
        out
    }

    #[test]
    fn a_response_is_an_error_by_its_last_packet_not_a_progress_report() {
        let framed = |payloads: &[&[u8]]| {
            let packets = payloads.iter().enumerate().map(|(seq, p)| frame(seq as u8 + 1, p));
            packets.collect::<Vec<_>>().concat()
        };
        let progress: &[u8] = b"\xff\xff\xff\x01\x01\x00\x10\x27\x00\x04copy";
        let ok: &[u8] = b"\x00\x00\x00\x02\x00\x00\x00";
        let error: &[u8] = b"\xff\x28\x04#42000syntax";
        assert!(!ends_in_error(&framed(&[progress, ok])));
        assert!(!ends_in_error(&framed(&[ok])));
        assert!(ends_in_error(&framed(&[error])));
        assert!(ends_in_error(&framed(&[progress, error])));
        assert!(!ends_in_error(&[]));
    }

    fn run(tracker: &mut ResponseTracker, packets: &[&[u8]]) -> Vec<Step> {
        packets
            .iter()
            .map(|p| tracker.on_packet(p.len(), 1, &p[..p.len().min(PEEK)]).unwrap())
            .collect()
    }

    const COLUMN: &[u8] = b"\x03def\x04test\x01t\x01t\x01a\x01a\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00";

    #[test]
    fn multi_result_chain_with_old_eof() {
        let mut t = ResponseTracker::new(ResponseKind::Generic, NO_DEPRECATE, 0);
        let steps = run(
            &mut t,
            &[
                b"\x01",
                COLUMN,
                b"\xfe\x00\x00\x0a\x00",
                b"\x011",
                b"\xfe\x00\x00\x0a\x00", // MORE_RESULTS_EXISTS
                b"\x00\x01\x00\x02\x00\x00\x00",
            ],
        );
        assert_eq!(steps.last(), Some(&Step::Done));
        assert!(steps[..5].iter().all(|s| *s == Step::More));
        assert_eq!(t.last_ok().unwrap().affected_rows, 1);
        assert_eq!(t.results(), 2, "the result set and the OK");
    }

    #[test]
    fn results_count_the_statements_before_an_error() {
        let mut t = ResponseTracker::new(ResponseKind::Generic, DEPRECATE, 0);
        run(
            &mut t,
            &[b"\x00\x01\x00\x0a\x00\x00\x00", b"\xff\x26\x04#23000Duplicate entry"],
        );
        assert!(t.is_done());
        assert_eq!((t.results(), t.error_code()), (1, Some(1062)));
    }

    #[test]
    fn deprecate_eof_rows_end_in_ok_layout_terminator() {
        let mut t = ResponseTracker::new(ResponseKind::Generic, DEPRECATE, 0);
        let steps = run(&mut t, &[b"\x01", COLUMN, b"\x011", b"\xfe\x00\x00\x03\x00\x00\x00"]);
        assert_eq!(steps, vec![Step::More, Step::More, Step::More, Step::Done]);
        assert_eq!(t.last_status(), Some(ServerStatus(3)));
    }

    #[test]
    fn cursor_execute_ends_after_metadata_and_fetch_reads_rows() {
        let mut t = ResponseTracker::new(ResponseKind::CursorExecute, NO_DEPRECATE, 0);
        let steps = run(&mut t, &[b"\x01", COLUMN, b"\xfe\x00\x00\x42\x00"]);
        assert_eq!(steps.last(), Some(&Step::Done));
        let mut f = ResponseTracker::new(ResponseKind::Fetch, NO_DEPRECATE, 0);
        let steps = run(&mut f, &[b"\x00\x00\x01", b"\xfe\x00\x00\xc2\x00"]);
        assert_eq!(steps, vec![Step::More, Step::Done]);
    }

    #[test]
    fn response_status_rewritten_in_eofs_and_the_terminator() {
        let autocommit = ServerStatus(ServerStatus::AUTOCOMMIT);
        let mask = ServerStatus::AUTOCOMMIT | ServerStatus::IN_TRANS;
        // A single OK: IN_TRANS off, AUTOCOMMIT on, MORE_RESULTS_EXISTS kept.
        let mut ok = frame(1, &[0x00, 0x01, 0x00, 0x09, 0x00, 0x00, 0x00]);
        set_response_status(&mut ok, NO_DEPRECATE, mask, autocommit);
        assert_eq!(
            ok::parse(7, &ok[4..]).unwrap().status,
            ServerStatus(ServerStatus::AUTOCOMMIT | ServerStatus::MORE_RESULTS_EXISTS)
        );
        // A result set with old-style EOFs: a row that reads like an OK is left alone.
        let row = [0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
        let mut rs = [
            frame(1, &[0x01]),
            frame(2, &[0x03, b'd', b'e', b'f']),
            frame(3, &[0xfe, 0, 0, 0x03, 0]),
            frame(4, &row),
            frame(5, &[0xfe, 0, 0, 0x03, 0]),
        ]
        .concat();
        set_response_status(&mut rs, NO_DEPRECATE, mask, autocommit);
        let eofs: Vec<u16> = [13usize, 36]
            .iter()
            .map(|&at| u16::from_le_bytes([rs[at + 7], rs[at + 8]]))
            .collect();
        assert_eq!(eofs, [ServerStatus::AUTOCOMMIT; 2]);
        assert_eq!(&rs[26..36], &row);
    }

    #[test]
    fn response_status_rewritten_in_every_result_of_a_chain() {
        // OK (more results), a result set whose row is a 0x00 byte string, OK: every OK and
        // terminator loses IN_TRANS, the row is untouched.
        let row = [0x00, 0x00, 0x00, 0x0b, 0x00, 0x00, 0x00];
        let mut chain = [
            frame(1, &[0x00, 0x01, 0x00, 0x0b, 0x00, 0x00, 0x00]),
            frame(2, &[0x01]),
            frame(3, COLUMN),
            frame(4, &row),
            frame(5, &[0xfe, 0x00, 0x00, 0x0b, 0x00, 0x00, 0x00]),
            frame(6, &[0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00]),
        ]
        .concat();
        let autocommit = ServerStatus(ServerStatus::AUTOCOMMIT);
        set_response_status(
            &mut chain,
            DEPRECATE,
            ServerStatus::AUTOCOMMIT | ServerStatus::IN_TRANS,
            autocommit,
        );
        let packets = ok::packets(&chain);
        let status = |i: usize| {
            ok::parse(packets[i].1.len(), &chain[packets[i].1.clone()])
                .unwrap()
                .status
                .0
        };
        assert_eq!(status(0), 0x0a);
        assert_eq!(&chain[packets[3].1.clone()], &row);
        assert_eq!(status(4), 0x0a);
        assert_eq!(status(5), 0x02);
    }

    #[test]
    fn only_an_execute_asking_for_a_cursor_may_end_at_the_metadata() {
        assert_eq!(
            ResponseKind::of(&[Command::STMT_EXECUTE, 1, 0, 0, 0, 1]),
            ResponseKind::CursorExecute
        );
        assert_eq!(
            ResponseKind::of(&[Command::STMT_EXECUTE, 1, 0, 0, 0, 0]),
            ResponseKind::Generic
        );
        assert_eq!(ResponseKind::of(&[Command::QUERY, b'1']), ResponseKind::Generic);
    }

    #[test]
    fn a_query_result_flagged_cursor_exists_goes_on_with_its_rows() {
        // A compound statement's SELECT while the block has a cursor open.
        let mut t = ResponseTracker::new(ResponseKind::Generic, NO_DEPRECATE, 0);
        let steps = run(
            &mut t,
            &[
                b"\x01",
                COLUMN,
                b"\xfe\x00\x00\x6a\x00",
                b"\x011",
                b"\xfe\x00\x00\x22\x00",
            ],
        );
        assert_eq!(steps, vec![Step::More, Step::More, Step::More, Step::More, Step::Done]);
    }

    #[test]
    fn progress_reports_do_not_end_a_response_but_errors_do() {
        let mut t = ResponseTracker::new(ResponseKind::Generic, DEPRECATE, 0);
        let steps = run(&mut t, &[b"\xff\xff\xff\x01\x02\x03", b"\xff\x28\x04#42000oops"]);
        assert_eq!(steps, vec![Step::More, Step::Done]);
        assert_eq!(t.error_code(), Some(1064));
    }

    #[test]
    fn local_infile_then_ok() {
        let mut t = ResponseTracker::new(ResponseKind::Generic, DEPRECATE, 0);
        assert_eq!(run(&mut t, &[b"\xfb/tmp/x"]), vec![Step::LocalInfile]);
        assert_eq!(run(&mut t, &[b"\x00\x02\x00\x02\x00\x00\x00"]), vec![Step::Done]);
    }

    #[test]
    fn prepare_ok_with_params_and_columns() {
        let ok: &[u8] = b"\x00\x07\x00\x00\x00\x01\x00\x02\x00\x00\x00\x00";
        let mut t = ResponseTracker::new(ResponseKind::Prepare, NO_DEPRECATE, 0);
        let eof: &[u8] = b"\xfe\x00\x00\x02\x00";
        let steps = run(&mut t, &[ok, COLUMN, COLUMN, eof, COLUMN, eof]);
        assert_eq!(steps.last(), Some(&Step::Done));
        assert_eq!(steps.iter().filter(|s| **s == Step::Done).count(), 1);
        assert_eq!(
            t.prepare_ok(),
            Some(PrepareOk {
                statement_id: 7,
                columns: 1,
                params: 2
            })
        );
        let mut t = ResponseTracker::new(ResponseKind::Prepare, DEPRECATE, 0);
        assert_eq!(run(&mut t, &[ok, COLUMN, COLUMN, COLUMN]).last(), Some(&Step::Done));
    }

    #[test]
    fn field_list_and_statistics() {
        let mut t = ResponseTracker::new(ResponseKind::FieldList, DEPRECATE, 0);
        let steps = run(&mut t, &[COLUMN, COLUMN, b"\xfe\x00\x00\x02\x00\x00\x00"]);
        assert_eq!(steps, vec![Step::More, Step::More, Step::Done]);
        let mut t = ResponseTracker::new(ResponseKind::Statistics, DEPRECATE, 0);
        assert_eq!(run(&mut t, &[b"Uptime: 5  Threads: 1"]), vec![Step::Done]);
    }

    #[test]
    fn packets_after_the_end_are_a_violation() {
        let mut t = ResponseTracker::new(ResponseKind::Generic, DEPRECATE, 0);
        run(&mut t, &[b"\x00\x00\x00\x02\x00\x00\x00"]);
        assert!(t.on_packet(1, 2, b"\x00").is_err());
    }
}
