//! AT mode: a branch commits locally at once, with an undo record that lets the coordinator
//! compensate it if the global transaction rolls back.
//!
//! - phase 1 ([`phase1`]): every write of a session bound to a global transaction is imaged
//!   around the client's statement (before image, statement, after image); the upsert
//!   ([`upsert`]), multi-table ([`multi_table`]) and multi-statement ([`multi_statement`])
//!   forms have files of their own; the undo items wait in the session's [`PendingBranch`];
//! - local commit ([`commit`]): the branch is registered with its lock keys and its undo
//!   record ([`undo`]) written into `undo_log` ([`undo_log`]) in the same local transaction;
//! - phase 2 ([`phase2`]): commit deletes the undo records, rollback replays them after the
//!   dirty check; after a dirty rollback an operator inspects and repairs the rows
//!   ([`repair`]).
//!
//! This file is the mode's face to the session core: which commands AT mode takes
//! ([`AtSession::claim`]) and the session's pending branch and savepoints.

pub mod branch;
pub mod commit;
mod multi_statement;
mod multi_table;
pub mod phase1;
pub mod phase2;
pub mod repair;
pub mod undo;
pub mod undo_log;
mod upsert;

use std::sync::Arc;

use crate::classify::{self, Dml, GlobalCommand, StatementClass, TxControl};
use crate::coordinator::statement::{self, GlobalStatement};
use crate::coordinator::undo_table::UndoLogs;
use crate::coordinator::{Global, binding, refusal};
use crate::protocol::Command as Cmd;
use crate::protocol::err::ErrPacket;
use crate::session::mode::{BoxFuture, Claim, Command, Io, Mode, ModeSession};
use crate::session::peer::Peer;
use crate::session::state::{BranchMode, SessionState};
use crate::session::{SessionError, Shared, backend};
pub use branch::PendingBranch;

/// AT mode, once per proxy: the coordinator layer and the `undo_log` tables.
pub struct At {
    pub global: Arc<Global>,
    /// Shared with XA mode, which keeps its branches' commit evidence there.
    pub undo_logs: Arc<UndoLogs>,
}

impl At {
    pub fn new(global: Arc<Global>, undo_logs: Arc<UndoLogs>) -> Arc<At> {
        Arc::new(At { global, undo_logs })
    }
}

impl Mode for At {
    fn open(self: Arc<Self>) -> Box<dyn ModeSession> {
        Box::new(AtSession {
            at: self,
            branch: None,
            savepoints: Vec::new(),
            claimed: None,
            savepoint: None,
        })
    }

    fn reads_parameters(&self) -> bool {
        true
    }
}

/// What AT mode took a command for.
enum Claimed {
    /// An UPDATE, DELETE or INSERT inside the global transaction: imaged ([`phase1`]).
    Protect(String),
    /// The COMMIT of a local transaction with a pending branch ([`commit`]).
    Commit,
    /// A multi-statement string inside the global transaction ([`multi_statement`]).
    MultiStatement(String),
    /// A statement that would commit or strand the pending branch behind the proxy's back.
    Refuse(ErrPacket),
}

/// What AT mode's work on one command runs with: the session's backend connection and state,
/// its pending branch, the mode, the packet limit, and the global transaction it works in.
pub struct Cx<'a> {
    pub backend: &'a mut Peer,
    pub state: &'a mut SessionState,
    pub branch: &'a mut Option<PendingBranch>,
    pub at: &'a At,
    pub limit: usize,
    pub xid: &'a str,
}

/// AT mode's part of one session.
pub struct AtSession {
    at: Arc<At>,
    /// What the open local transaction changed inside a global one, to be registered as one
    /// branch when it commits. There is none while no local transaction is open.
    branch: Option<PendingBranch>,
    /// The open local transaction's savepoints, oldest first, each with how many undo items
    /// the pending branch had when it was set.
    savepoints: Vec<(String, usize)>,
    claimed: Option<Claimed>,
    /// SAVEPOINT, ROLLBACK TO SAVEPOINT or RELEASE SAVEPOINT being forwarded: which, and the
    /// savepoint, applied once the server accepted it.
    savepoint: Option<(TxControl, String)>,
}

fn is_protected_write(class: &classify::Classification) -> bool {
    !class.multi_statement
        && class.set_statement.is_none()
        && matches!(
            class.class,
            StatementClass::Dml(Dml::Update | Dml::Delete | Dml::Insert | Dml::Replace)
        )
}

impl AtSession {
    fn decide(&mut self, command: &Command<'_>, state: &SessionState) -> Option<Claimed> {
        // An XA-bound session's local transactions are XA branches (`crate::xa`).
        if state.bound_in(BranchMode::Xa) {
            return None;
        }
        let xid = state.xid.as_deref().unwrap_or_default();
        match (command.code, command.class) {
            (Cmd::QUERY, Some(class)) => {
                let sql = &command.payload[1..];
                if let StatementClass::TransactionControl(
                    kind @ (TxControl::Savepoint | TxControl::RollbackToSavepoint | TxControl::ReleaseSavepoint),
                ) = class.class
                {
                    self.savepoint = classify::savepoint_name(sql).map(|name| (kind, name));
                }
                if let StatementClass::GlobalTransaction(global) = class.class {
                    // Leaving would let later statements (DDL) commit the protected writes.
                    let leave = global == GlobalCommand::Leave
                        && self.branch.is_some()
                        && statement::parse(&String::from_utf8_lossy(sql)) == Ok(GlobalStatement::Leave);
                    return leave.then(|| Claimed::Refuse(binding::leave_with_pending_writes()));
                }
                // (A multi-statement string is taken apart below, whatever it starts with.)
                if self.branch.is_some() && !class.multi_statement {
                    match class.class {
                        StatementClass::TransactionControl(TxControl::Commit) => return Some(Claimed::Commit),
                        // These commit the local transaction implicitly, bypassing the branch.
                        StatementClass::TransactionControl(TxControl::Begin | TxControl::SetAutocommit) => {
                            return Some(Claimed::Refuse(refusal::implicit_commit(xid)));
                        }
                        _ => {}
                    }
                }
                // The pending branch's XID too: its transaction may have been bound by a hint.
                let xid = state
                    .xid
                    .clone()
                    .or_else(|| refusal::hinted_xid(sql, class))
                    .or_else(|| self.branch.as_ref().map(|b| b.xid.clone()))?;
                if class.multi_statement && multi_statement::handles(state) {
                    return Some(Claimed::MultiStatement(xid));
                }
                is_protected_write(class).then_some(Claimed::Protect(xid))
            }
            (Cmd::STMT_EXECUTE, _) if command.payload.len() >= 5 => {
                let statement = state.statement(command.payload)?;
                // A prepared COMMIT (or BEGIN, SET autocommit) would commit protected writes
                // without registering them.
                if self.branch.is_some()
                    && matches!(
                        statement.class.class,
                        StatementClass::TransactionControl(
                            TxControl::Commit | TxControl::Begin | TxControl::SetAutocommit
                        )
                    )
                {
                    return Some(Claimed::Refuse(refusal::implicit_commit(xid)));
                }
                if !is_protected_write(&statement.class) {
                    return None;
                }
                let xid = state
                    .xid
                    .clone()
                    .or_else(|| refusal::hinted_xid(statement.sql.as_bytes(), &statement.class))?;
                Some(if statement.long_data_dropped {
                    Claimed::Refuse(refusal::long_data(&xid))
                } else {
                    Claimed::Protect(xid)
                })
            }
            _ => None,
        }
    }

    /// A pending branch lives only as long as its local transaction: once the server says
    /// none is open (committed, rolled back by the client, the proxy or the server), it and
    /// the savepoints are gone.
    fn settle(&mut self, state: &SessionState) {
        if !state.in_transaction() {
            self.branch = None;
            self.savepoints.clear();
        }
    }

    /// Keeps the savepoints in step with the server. Rolling back to one discards the undo
    /// items made after it (their writes are undone in the database); the savepoint itself
    /// stays.
    fn apply_savepoint(&mut self, kind: TxControl, name: String) {
        let position = self.savepoints.iter().position(|(n, _)| *n == name);
        match (kind, position) {
            (TxControl::Savepoint, _) => {
                // Setting a name again moves it.
                if let Some(p) = position {
                    self.savepoints.remove(p);
                }
                let items = self.branch.as_ref().map_or(0, |b| b.items.len());
                self.savepoints.push((name, items));
            }
            (TxControl::RollbackToSavepoint, Some(p)) => {
                let items = self.savepoints[p].1;
                self.savepoints.truncate(p + 1);
                if let Some(branch) = &mut self.branch {
                    branch.items.truncate(items);
                    if branch.items.is_empty() {
                        self.branch = None;
                    }
                }
            }
            (TxControl::ReleaseSavepoint, Some(p)) => self.savepoints.truncate(p),
            _ => {}
        }
    }
}

impl ModeSession for AtSession {
    fn claim(&mut self, command: &Command<'_>, state: &SessionState, _shared: &Shared) -> Claim {
        self.settle(state);
        self.savepoint = None;
        self.claimed = self.decide(command, state);
        Claim::take_if(self.claimed.is_some())
    }

    fn run<'a>(&'a mut self, io: Io<'a>) -> BoxFuture<'a, Result<(), SessionError>> {
        Box::pin(async move {
            let client = io.client;
            let claimed = self.claimed.take();
            // A COMMIT belongs to the pending branch's global transaction.
            let xid = match &claimed {
                Some(Claimed::Protect(xid) | Claimed::MultiStatement(xid)) => xid.clone(),
                _ => self.branch.as_ref().map(|b| b.xid.clone()).unwrap_or_default(),
            };
            let mut cx = Cx {
                backend: io.backend,
                state: io.state,
                branch: &mut self.branch,
                at: &self.at,
                limit: io.shared.config.max_packet_size,
                xid: &xid,
            };
            let sql = || String::from_utf8_lossy(&io.raw[5..]);
            match claimed {
                Some(Claimed::Protect(_)) => phase1::protect(client, &mut cx, io.command, io.raw).await,
                Some(Claimed::Commit) => commit::commit(client, &mut cx, &sql()).await,
                Some(Claimed::MultiStatement(_)) => multi_statement::run(client, &mut cx, &sql()).await,
                Some(Claimed::Refuse(e)) => backend::refuse(client, e).await,
                None => unreachable!("run follows a claim"),
            }
        })
    }

    fn answered(&mut self, state: &SessionState, error: Option<u16>) {
        self.settle(state);
        if let (Some((kind, name)), None) = (self.savepoint.take(), error) {
            self.apply_savepoint(kind, name);
        }
    }
}
