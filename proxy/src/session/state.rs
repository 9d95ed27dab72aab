//! What the proxy knows about a client session: negotiated capabilities, the backend's
//! latest status flags, the current schema and the prepared statements with their SQL.
//!
//! Transaction state is never guessed from SQL: it is the status flags of the last OK/EOF
//! the backend sent, which already account for implicit commits, errors and autocommit.

use std::collections::HashMap;

use crate::classify::Classification;
use crate::protocol::{Capabilities, Command, ServerStatus};

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
    pub user: String,
    pub schema: Option<String>,
    pub statements: HashMap<u32, PreparedStatement>,
    /// The global transaction this session is bound to (START or JOIN GLOBAL TRANSACTION).
    pub xid: Option<String>,
    /// What the open local transaction changed inside a global one, to be registered as one
    /// branch when it commits.
    pub branch: Option<PendingBranch>,
    /// Outside global transactions: what the open local transaction wrote that must be
    /// checked against global locks before it commits.
    pub written: WriteCheck,
    /// The open local transaction's savepoints, oldest first, each with how many undo items
    /// the pending branch had when it was set.
    pub savepoints: Vec<(String, usize)>,
}

/// The no-dirty-writes check's record of one local transaction outside any global one.
#[derive(Debug, Default)]
pub struct WriteCheck {
    /// Rows written to guarded tables.
    pub rows: crate::global::TableRows,
    /// A write ran unchecked while a table it names became guarded: the transaction cannot
    /// be shown safe and is rolled back at its commit.
    pub poisoned: Option<String>,
}

impl WriteCheck {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.poisoned.is_none()
    }

    pub fn clear(&mut self) {
        self.rows.clear();
        self.poisoned = None;
    }
}

/// Phase-1 work of one local transaction: its undo items and the rows it locks.
#[derive(Debug)]
pub struct PendingBranch {
    pub xid: String,
    /// The database every write of the local transaction went to (one branch, one resource).
    pub schema: String,
    pub items: Vec<crate::global::undo::UndoItem>,
}

impl PendingBranch {
    /// The rows the items wrote, by table: primary keys encoded as in the images, each once.
    pub fn locks(&self) -> Vec<ferrata_rpc::pb::TableLocks> {
        let mut tables: std::collections::BTreeMap<&str, std::collections::BTreeSet<Vec<Vec<u8>>>> = Default::default();
        for item in &self.items {
            let keys = tables.entry(&item.table).or_default();
            for row in item.key_rows() {
                keys.insert(
                    item.primary_key
                        .iter()
                        .map(|&i| row[i].clone().unwrap_or_default().into_bytes())
                        .collect(),
                );
            }
        }
        tables
            .into_iter()
            .map(|(table, rows)| ferrata_rpc::pb::TableLocks {
                schema: self.schema.clone(),
                table: table.to_owned(),
                rows: rows
                    .into_iter()
                    .map(|values| ferrata_rpc::pb::PrimaryKey { values })
                    .collect(),
            })
            .collect()
    }
}

impl SessionState {
    /// Keeps what the proxy may need to read a later execute of a prepared statement: the
    /// parameter types an execute sends, long data as it arrives (up to `limit` bytes per
    /// statement). Only sessions with a coordinator need this.
    pub fn note_statement_command(&mut self, command: u8, payload: &[u8], limit: usize) {
        let Some(id) = payload.get(1..5).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])) else {
            return;
        };
        let Some(stmt) = self.statements.get_mut(&id) else {
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

    pub fn in_transaction(&self) -> bool {
        self.status.has(ServerStatus::IN_TRANS)
    }

    pub fn autocommit(&self) -> bool {
        self.status.has(ServerStatus::AUTOCOMMIT)
    }

    pub fn no_backslash_escapes(&self) -> bool {
        self.status.has(ServerStatus::NO_BACKSLASH_ESCAPES)
    }

    /// COM_RESET_CONNECTION and COM_CHANGE_USER drop every prepared statement server-side.
    pub fn forget_statements(&mut self) {
        self.statements.clear();
    }
}
