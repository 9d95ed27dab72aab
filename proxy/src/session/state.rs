//! What the proxy knows about a client session: negotiated capabilities, the backend's
//! latest status flags, the current schema and the prepared statements with their SQL.
//!
//! Transaction state is never guessed from SQL: it is the status flags of the last OK/EOF
//! the backend sent, which already account for implicit commits, errors and autocommit. An
//! ERR that may have ended the transaction carries no flags: the session asks the server
//! before its next command ([`SessionState::status_unknown`]).

use std::collections::HashMap;

use crate::classify::{Classification, Other, StatementClass};
use crate::protocol::response::{ResponseKind, ResponseTracker};
use crate::protocol::{Capabilities, Command, ServerStatus};

/// ER_LOCK_DEADLOCK: InnoDB rolled the transaction back (or a procedure SIGNALled it).
const ER_LOCK_DEADLOCK: u16 = 1213;
/// ER_LOCK_WAIT_TIMEOUT: the statement rolled back, or the whole transaction with
/// `innodb_rollback_on_timeout`.
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;

/// A statement prepared through COM_STMT_PREPARE on this session.
#[derive(Clone, Debug)]
pub struct PreparedStatement {
    pub sql: String,
    pub class: Classification,
    pub params: u16,
    pub columns: u16,
    /// Parameter types from the last execute that sent them (later ones may not).
    pub param_types: Option<Vec<[u8; 2]>>,
    /// Values sent with COM_STMT_SEND_LONG_DATA since the last execute, by parameter: the
    /// next execute does not repeat them.
    pub long_data: std::collections::BTreeMap<u16, Vec<u8>>,
    /// More long data than `max_packet_size` arrived: the proxy did not keep it all.
    pub long_data_dropped: bool,
}

impl PreparedStatement {
    /// The parameters an execute `payload` of this statement binds (long data included);
    /// `None` when they cannot be read.
    pub fn bound_params(&self, payload: &[u8]) -> Option<Vec<crate::protocol::execute::Param>> {
        crate::protocol::execute::params(
            payload,
            usize::from(self.params),
            self.param_types.as_deref(),
            &self.long_data,
        )
        .map(|(params, _)| params)
    }

    /// After an execute (or COM_STMT_RESET): the next execute starts afresh.
    pub fn forget_long_data(&mut self) {
        self.long_data.clear();
        self.long_data_dropped = false;
    }
}

#[derive(Debug, Default)]
pub struct SessionState {
    /// Capabilities both the client and the (masked) server agreed on.
    pub capabilities: Capabilities,
    pub status: ServerStatus,
    /// The status flags of a fresh session on this server (the login's OK): what a session
    /// the server reset without an OK (a refused COM_CHANGE_USER) starts with.
    pub fresh_status: ServerStatus,
    pub user: String,
    pub schema: Option<String>,
    /// The backend connection's id on its server (the greeting's thread id).
    pub backend_connection_id: u32,
    pub statements: HashMap<u32, PreparedStatement>,
    /// The statement the last successful COM_STMT_PREPARE created, if it is still open: what
    /// statement id 0xFFFFFFFF names (MariaDB's execute-direct).
    pub last_prepared: Option<u32>,
    /// The global transaction this session is bound to (START or JOIN GLOBAL TRANSACTION),
    /// which every mode works in. Set and cleared by the coordinator's statements; forgotten
    /// here when the server forgets the session (COM_CHANGE_USER, COM_RESET_CONNECTION).
    pub xid: Option<String>,
    /// How the bound session's local transactions become branches (`MODE` of START or JOIN
    /// GLOBAL TRANSACTION); the modes read it, the core only keeps it with `xid`.
    pub branch_mode: BranchMode,
    /// The last answer was an ERR that may have ended the transaction (a deadlock, a lock
    /// wait timeout): `status` may be stale until the server is asked.
    pub status_unknown: bool,
}

/// How a bound session's local transactions become branches of its global transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BranchMode {
    /// Committed locally at once, with an undo record (the default).
    #[default]
    At,
    /// Prepared by the database (XA START ... XA PREPARE), finished in phase 2.
    Xa,
}

impl SessionState {
    /// Keeps what the proxy may need to read a later execute of a prepared statement: the
    /// parameter types an execute sends, long data as it arrives (up to `limit` bytes per
    /// statement). Only sessions with a coordinator need this.
    pub fn note_statement_command(&mut self, command: u8, payload: &[u8], limit: usize) {
        let Some(stmt) = self.statement_id(payload).and_then(|id| self.statements.get_mut(&id)) else {
            return;
        };
        match command {
            Command::STMT_EXECUTE => {
                if let Some(types) = crate::protocol::execute::sent_types(payload, usize::from(stmt.params)) {
                    stmt.param_types = Some(types);
                }
            }
            Command::STMT_SEND_LONG_DATA if payload.len() >= 7 => {
                let param = u16::from_le_bytes([payload[5], payload[6]]);
                let kept: usize = stmt.long_data.values().map(Vec::len).sum();
                if kept + payload.len() - 7 > limit {
                    stmt.long_data_dropped = true;
                } else {
                    stmt.long_data
                        .entry(param)
                        .or_default()
                        .extend_from_slice(&payload[7..]);
                }
            }
            Command::STMT_RESET => stmt.forget_long_data(),
            _ => {}
        }
    }

    /// The response a command `payload` of this session gets. An execute asking for a cursor
    /// opens none for a CALL: the procedure's result sets come with their rows, even when its
    /// own cursor has them flagged CURSOR_EXISTS.
    pub fn response_kind(&self, payload: &[u8]) -> ResponseKind {
        match ResponseKind::of(payload) {
            ResponseKind::CursorExecute
                if self
                    .statement(payload)
                    .is_some_and(|s| s.class.class == StatementClass::Other(Other::Procedural)) =>
            {
                ResponseKind::Generic
            }
            kind => kind,
        }
    }

    /// Bound to a global transaction whose branches this session makes in `mode`.
    pub fn bound_in(&self, mode: BranchMode) -> bool {
        self.xid.is_some() && self.branch_mode == mode
    }

    pub fn in_transaction(&self) -> bool {
        self.status.has(ServerStatus::IN_TRANS)
    }

    /// Takes what a response says of the transaction: the status flags of its last OK or
    /// EOF; or, after an ERR that may have ended it, that they are unknown.
    pub fn observe(&mut self, tracker: &ResponseTracker) {
        if let Some(status) = tracker.last_status() {
            self.status = status;
            self.status_unknown = false;
        }
        if matches!(tracker.error_code(), Some(ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT)) {
            self.status_unknown = true;
        }
    }

    pub fn autocommit(&self) -> bool {
        self.status.has(ServerStatus::AUTOCOMMIT)
    }

    pub fn no_backslash_escapes(&self) -> bool {
        self.status.has(ServerStatus::NO_BACKSLASH_ESCAPES)
    }

    /// The statement id a COM_STMT_* command `payload` (command byte first) names: MariaDB
    /// reads 0xFFFFFFFF as the last statement prepared on the connection.
    pub fn statement_id(&self, payload: &[u8]) -> Option<u32> {
        match u32::from_le_bytes(payload.get(1..5)?.try_into().ok()?) {
            u32::MAX => self.last_prepared,
            id => Some(id),
        }
    }

    /// Writes the id of the last statement the client prepared into a COM_STMT_* command
    /// `packet` (header included) that names it as 0xFFFFFFFF: the server reads both the
    /// same way, unless statements of the proxy's own were prepared since.
    pub fn name_last_prepared(&self, packet: &mut [u8]) {
        let named = matches!(
            packet.get(4).copied(),
            Some(
                Command::STMT_EXECUTE
                    | Command::STMT_BULK_EXECUTE
                    | Command::STMT_SEND_LONG_DATA
                    | Command::STMT_RESET
                    | Command::STMT_FETCH
                    | Command::STMT_CLOSE
            )
        );
        if let (true, Some(id), Some(bytes)) = (named, self.last_prepared, packet.get_mut(5..9))
            && bytes == [0xff; 4]
        {
            bytes.copy_from_slice(&id.to_le_bytes());
        }
    }

    /// The prepared statement a COM_STMT_* command `payload` names, if the proxy knows it.
    pub fn statement(&self, payload: &[u8]) -> Option<&PreparedStatement> {
        self.statements.get(&self.statement_id(payload)?)
    }

    /// COM_RESET_CONNECTION and COM_CHANGE_USER drop every prepared statement server-side.
    pub fn forget_statements(&mut self) {
        self.statements.clear();
        self.last_prepared = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::classify;

    fn prepared(sql: &str) -> PreparedStatement {
        PreparedStatement {
            sql: sql.into(),
            class: classify(sql.as_bytes(), false),
            params: 0,
            columns: 0,
            param_types: None,
            long_data: Default::default(),
            long_data_dropped: false,
        }
    }

    #[test]
    fn id_0xffffffff_names_the_last_prepared_statement() {
        let mut state = SessionState::default();
        state.statements.insert(7, prepared("UPDATE t SET v = 1"));
        let mut execute = vec![0, 0, 0, 0, Command::STMT_EXECUTE, 0xff, 0xff, 0xff, 0xff, 0];
        assert_eq!(state.statement_id(&execute[4..]), None, "nothing prepared yet");
        state.name_last_prepared(&mut execute);
        assert_eq!(execute[5..9], [0xff; 4], "left as sent");
        state.last_prepared = Some(7);
        assert_eq!(
            state.statement(&execute[4..]).map(|s| s.sql.as_str()),
            Some("UPDATE t SET v = 1")
        );
        state.name_last_prepared(&mut execute);
        assert_eq!(execute[5..9], 7u32.to_le_bytes());
        let mut query = vec![0, 0, 0, 0, Command::QUERY, 0xff, 0xff, 0xff, 0xff];
        state.name_last_prepared(&mut query);
        assert_eq!(query[5..9], [0xff; 4], "only statement commands name statements");
        state.forget_statements();
        assert_eq!(state.last_prepared, None);
    }

    #[test]
    fn only_a_statement_of_its_own_gets_a_cursor() {
        let mut state = SessionState::default();
        state.statements.insert(1, prepared("SELECT v FROM d"));
        state.statements.insert(2, prepared("CALL looped()"));
        let execute = |id: u8, flags: u8| [Command::STMT_EXECUTE, id, 0, 0, 0, flags, 1, 0, 0, 0];
        assert_eq!(state.response_kind(&execute(1, 1)), ResponseKind::CursorExecute);
        assert_eq!(state.response_kind(&execute(2, 1)), ResponseKind::Generic);
        assert_eq!(state.response_kind(&execute(1, 0)), ResponseKind::Generic);
        assert_eq!(state.response_kind(&[Command::QUERY, b'1']), ResponseKind::Generic);
    }
}
