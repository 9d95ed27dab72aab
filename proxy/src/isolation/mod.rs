//! Isolation between global transactions and everything else, whatever mode wrote:
//! - global read isolation ([`locking_read`]): a locking read of a session bound to a global
//!   transaction returns only rows no other unfinished global transaction holds;
//! - no dirty writes ([`dirty_writes`]): a write outside any global transaction never commits
//!   over a row an unfinished global transaction holds.
//!
//! This file is the mode's face to the session core: which commands it takes, gates (commit
//! points of a transaction with checked writes) or watches (writes observed while the
//! guarded-table view may change), and what it keeps per session.

pub mod dirty_writes;
mod locking_read;

use std::sync::Arc;

use crate::classify::{Classification, StatementClass};
use crate::coordinator::guards::Observation;
use crate::coordinator::row_check::{self, WriteCheck};
use crate::coordinator::unchecked::UncheckedWrite;
use crate::coordinator::{Global, refusal};
use crate::protocol::Command as Cmd;
use crate::protocol::err::ErrPacket;
use crate::session::mode::{BoxFuture, Claim, Command, Io, Mode, ModeSession};
use crate::session::peer::Peer;
use crate::session::state::SessionState;
use crate::session::{SessionError, Shared};
use dirty_writes::Route;

/// The isolation checks, once per proxy.
pub struct Isolation {
    pub global: Arc<Global>,
}

impl Mode for Isolation {
    fn open(self: Arc<Self>) -> Box<dyn ModeSession> {
        Box::new(IsolationSession {
            global: Arc::clone(&self.global),
            written: WriteCheck::default(),
            claimed: None,
            observed: None,
            unchecked: None,
        })
    }

    fn reads_parameters(&self) -> bool {
        true
    }
}

enum Claimed {
    /// A locking read inside this global transaction, checked against global locks.
    Isolate(String),
    /// A write outside global transactions that the proxy runs itself.
    Write(row_check::Write),
    /// A commit point of a transaction with checked writes: checked first.
    CommitPoint,
}

/// An observed write: forwarded as usual, looked at again if the view changed meanwhile.
struct Observed {
    seen: Observation,
    command: u8,
    /// The statement text of a query (the command byte and statement id of an execute).
    payload: Vec<u8>,
}

struct IsolationSession {
    global: Arc<Global>,
    /// Outside global transactions: what the open local transaction wrote that must be
    /// checked against global locks before it commits.
    written: WriteCheck,
    claimed: Option<Claimed>,
    observed: Option<Observed>,
    /// The unchecked write being forwarded, registered until its response is read (dropped
    /// with the session before that, it is interrupted: it may still run on the server).
    unchecked: Option<UncheckedWrite>,
}

/// The XID a locking read is checked in: the session's, or its statement's hint.
fn locking_read_xid(state: &SessionState, sql: &[u8], class: &Classification) -> Option<String> {
    (class.class == StatementClass::LockingRead && !class.multi_statement && class.set_statement.is_none())
        .then(|| state.xid.clone().or_else(|| refusal::hinted_xid(sql, class)))
        .flatten()
}

impl IsolationSession {
    /// The checked-write context of the session's local transaction (outside any global
    /// transaction, so every global lock holds its rows back).
    fn row_cx<'a>(
        &'a mut self,
        backend: &'a mut Peer,
        state: &'a mut SessionState,
        shared: &'a Shared,
    ) -> row_check::Cx<'a> {
        row_check::Cx {
            backend,
            state,
            written: &mut self.written,
            shared,
            global: &self.global,
            xid: "",
        }
    }

    fn decide(&mut self, command: &Command<'_>, state: &SessionState, shared: &Shared) -> Option<Claimed> {
        let isolated = match (command.code, command.class) {
            (Cmd::QUERY, Some(class)) => locking_read_xid(state, &command.payload[1..], class),
            (Cmd::STMT_EXECUTE, _) if command.payload.len() >= 5 => state
                .statement(command.payload)
                .and_then(|s| locking_read_xid(state, s.sql.as_bytes(), &s.class)),
            _ => None,
        };
        if let Some(xid) = isolated {
            return Some(Claimed::Isolate(xid));
        }
        let g = &self.global;
        if state.xid.is_some() || !g.dirty_writes.any() {
            return None;
        }
        match dirty_writes::route(command.code, command.payload, command.class, state, &self.written, g)? {
            Route::CommitPoint => Some(Claimed::CommitPoint),
            Route::Run(write) => Some(Claimed::Write(write)),
            Route::Unchecked(write) => {
                shared.metrics.writes_unchecked.increment(1);
                self.unchecked = Some(write);
                None
            }
            Route::Observe(seen) => {
                shared.metrics.writes_observed.increment(1);
                // The text is looked at again only if the view changes meanwhile.
                let head = if command.code == Cmd::QUERY {
                    command.payload.len()
                } else {
                    5
                };
                self.observed = Some(Observed {
                    seen,
                    command: command.code,
                    payload: command.payload[..head.min(command.payload.len())].to_vec(),
                });
                None
            }
        }
    }
}

impl ModeSession for IsolationSession {
    fn claim(&mut self, command: &Command<'_>, state: &SessionState, shared: &Shared) -> Claim {
        self.observed = None;
        if let Some(write) = self.unchecked.take() {
            write.finish(); // a mode after this one answered it: it never ran
        }
        self.claimed = self.decide(command, state, shared);
        match self.claimed {
            None => Claim::Pass,
            Some(Claimed::CommitPoint) => Claim::Gate,
            Some(_) => Claim::Take,
        }
    }

    fn run<'a>(&'a mut self, io: Io<'a>) -> BoxFuture<'a, Result<(), SessionError>> {
        Box::pin(async move {
            let g = &*self.global;
            let (client, backend, state) = (io.client, io.backend, io.state);
            match self.claimed.take() {
                Some(Claimed::Isolate(xid)) => {
                    locking_read::run(client, backend, state, io.shared, g, &xid, io.command, io.raw).await
                }
                Some(Claimed::Write(w)) => {
                    let mut cx = self.row_cx(backend, state, io.shared);
                    dirty_writes::run(client, &mut cx, w, io.command, io.raw).await
                }
                Some(Claimed::CommitPoint) | None => unreachable!("run follows a claim to take"),
            }
        })
    }

    fn gate<'a>(
        &'a mut self,
        backend: &'a mut Peer,
        state: &'a mut SessionState,
        shared: &'a Shared,
    ) -> BoxFuture<'a, Result<Option<ErrPacket>, SessionError>> {
        Box::pin(async move {
            self.claimed = None;
            dirty_writes::before_commit(&mut self.row_cx(backend, state, shared)).await
        })
    }

    fn answered(&mut self, state: &SessionState, _error: Option<u16>) {
        if let Some(write) = self.unchecked.take() {
            write.finish(); // its response was read: it committed or failed
        }
        // The local transaction ended (committed after its check, or rolled back).
        if !state.in_transaction() && !self.written.is_empty() {
            self.written.clear();
        }
        if let Some(o) = self.observed.take() {
            dirty_writes::after_observed(o.command, &o.payload, state, &mut self.written, &self.global, o.seen);
        }
    }
}
