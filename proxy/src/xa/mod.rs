//! XA mode: a session bound with `MODE XA` makes each local transaction an XA branch that
//! its database prepares and holds (row locks included) until phase 2; no undo images, no
//! dirty rollbacks.
//!
//! - the branch on the session's connection ([`branch`]): opened at BEGIN (or at the first
//!   statement of an implicit transaction with autocommit off, or around an autocommit
//!   write), prepared at COMMIT, rolled back at ROLLBACK;
//! - the branches held by this proxy's sessions ([`held`]), and phase 2 ([`phase2`]): on the
//!   holding session's connection between its client's commands, else from a service
//!   connection, never guessing at XAER_NOTA;
//! - the orphan sweep ([`sweeper`]): prepared branches nobody holds, settled as the
//!   coordinator says;
//! - the identifier ([`xid`]).
//!
//! This file is the mode's face to the session core: which commands XA mode takes, gates or
//! watches, and what MariaDB refuses inside a branch, refused before it is sent.

pub mod branch;
pub mod held;
pub mod phase2;
pub mod sweeper;
pub mod xid;

use std::sync::Arc;

use crate::classify::{Classification, Dml, GlobalCommand, Other, StatementClass, TxControl};
use crate::coordinator::row_check::{self, AtCommit};
use crate::coordinator::unchecked::{self, UncheckedWrite};
use crate::coordinator::undo_table::UndoLogs;
use crate::coordinator::{Global, binding};
use crate::protocol::Command as Cmd;
use crate::protocol::err::ErrPacket;
use crate::protocol::resultset;
use crate::session::mode::{BoxFuture, Claim, Command, Io, Mode, ModeSession};
use crate::session::peer::Peer;
use crate::session::state::{BranchMode, SessionState};
use crate::session::{SessionError, Shared, backend};
use branch::{Branch, Cx, Phase};
use held::{Held, Request};

/// XA mode, once per proxy.
pub struct Xa {
    pub global: Arc<Global>,
    /// Where branches keep their commit evidence (the AT mode's `undo_log` table).
    pub undo_logs: Arc<UndoLogs>,
    pub held: Held,
    /// `[service] xa_kill_idle_ms`.
    pub kill_idle: std::time::Duration,
}

impl Mode for Xa {
    fn open(self: Arc<Self>) -> Box<dyn ModeSession> {
        Box::new(XaSession {
            xa: self,
            branch: None,
            claimed: None,
            request: None,
            gate_for: None,
            unchecked: None,
            resetting: false,
        })
    }
}

/// What XA mode took a command for.
enum Claimed {
    /// BEGIN or START TRANSACTION in a bound session: a branch opens instead.
    Begin,
    /// The COMMIT of the open branch: it is prepared.
    Commit,
    /// The ROLLBACK of the open branch.
    Rollback,
    /// ROLLBACK GLOBAL with the branch open: rolled back first, then the decision.
    RollbackGlobal,
    /// COMMIT or ROLLBACK GLOBAL of the global transaction whose prepared branch this
    /// connection holds: its phase 2 runs here while the decision is awaited.
    Decide {
        commit: bool,
        xid: String,
    },
    /// An autocommit write in a bound session: a branch of its own around it.
    Wrap(Routed),
    /// A write in the open branch that the proxy runs itself, its rows checked before the
    /// branch prepares.
    Write(row_check::Write),
    /// COMMIT or ROLLBACK with nothing open as the client sees it.
    Nothing,
    /// COMMIT or ROLLBACK of a branch phase 2 rolled back under the client.
    EndDoomed {
        commit: bool,
    },
    Refuse(ErrPacket),
}

/// How a write in a bound session runs ([`XaSession::route_write`]).
struct Routed {
    /// The tables it writes, when they could be read.
    tables: Vec<unchecked::TableName>,
    /// `None`: forwarded as sent. Else run by the proxy, its rows found for the check before
    /// the branch prepares (or refused, when they cannot be).
    check: Option<row_check::Write>,
}

/// Why XA mode gated a command (it runs before the command is sent, which is then offered to
/// the modes again).
enum GateFor {
    /// Autocommit off and nothing open: the statement would start a transaction implicitly,
    /// so a branch opens first.
    Open,
    /// The open branch's first statement that does not look like a write: the session's
    /// row-change counters are read first (`branch::before_read`).
    Count,
    /// A prepared branch of a transaction the session left: its phase 2 runs first.
    Phase2,
}

/// XA mode's part of one session.
struct XaSession {
    xa: Arc<Xa>,
    branch: Option<Branch>,
    claimed: Option<Claimed>,
    /// A phase-2 command that arrived for the held branch ([`ModeSession::wake`]).
    request: Option<Request>,
    gate_for: Option<GateFor>,
    /// A write in a branch being forwarded, registered as unchecked until its response is
    /// read (`coordinator/unchecked.rs`): a table that gains global locks meanwhile waits
    /// for it.
    unchecked: Option<UncheckedWrite>,
    /// COM_CHANGE_USER or COM_RESET_CONNECTION is being forwarded: the server rolls the
    /// active branch back or lets the prepared one go (any connection may finish it then).
    resetting: bool,
}

/// MariaDB's answer to what may not run inside an active XA branch, given before it is sent.
fn rmfail_active() -> ErrPacket {
    ErrPacket::new(
        1399,
        "XAE07",
        "XAER_RMFAIL: The command cannot be executed when global transaction is in the  ACTIVE state \
         (the session's XA branch is open: COMMIT or ROLLBACK it first)",
    )
}

fn refused(what: &str, instead: &str) -> ErrPacket {
    ErrPacket::new(
        1235,
        "42000",
        format!("{what} cannot be part of an XA branch, so ferrata-proxy did not run it; {instead}"),
    )
}

/// Whether a statement may change data (it then needs a branch, and the guard check).
fn may_write(class: &Classification) -> bool {
    class.multi_statement
        || matches!(
            class.class,
            StatementClass::Dml(_) | StatementClass::Other(Other::Procedural | Other::Unknown)
        )
}

/// Whether a statement starts a transaction when autocommit is off.
fn starts_transaction(class: &Classification) -> bool {
    may_write(class)
        || matches!(
            class.class,
            StatementClass::LockingRead | StatementClass::Other(Other::Select)
        )
}

/// Whether a statement, or one of a multi-statement string's, is an XA statement naming
/// Ferrata's format id. A string the splitter cannot read counts if it names the id at all.
fn names_ferrata_branch(sql: &[u8], class: &Classification) -> bool {
    let xa = class.class == StatementClass::TransactionControl(TxControl::Xa);
    if !(xa || class.multi_statement) || !xid::names_ferrata_branch(sql) {
        return false;
    }
    if !class.multi_statement {
        return true;
    }
    let text = String::from_utf8_lossy(sql);
    match crate::sql::dml::split_statements(&text) {
        Ok(parts) => parts.into_iter().any(|r| {
            let part = &text.as_bytes()[r];
            crate::classify::classify(part, false).class == StatementClass::TransactionControl(TxControl::Xa)
                && xid::names_ferrata_branch(part)
        }),
        Err(_) => true,
    }
}

/// The XID a COMMIT or ROLLBACK GLOBAL names, if it names one.
fn named_xid(sql: &[u8]) -> Option<String> {
    use crate::coordinator::statement::{GlobalStatement, parse};
    match parse(&String::from_utf8_lossy(sql)) {
        Ok(GlobalStatement::Commit { xid } | GlobalStatement::Rollback { xid }) => xid,
        _ => None,
    }
}

/// BEGIN, BEGIN WORK or START TRANSACTION, without characteristics (READ ONLY, WITH
/// CONSISTENT SNAPSHOT, ...), which an XA branch cannot take.
fn plain_begin(sql: &[u8]) -> bool {
    let words = crate::classify::keywords(sql).unwrap_or_default();
    matches!(
        words.iter().map(String::as_str).collect::<Vec<_>>().as_slice(),
        ["BEGIN"] | ["BEGIN", "WORK"] | ["START", "TRANSACTION"]
    )
}

/// COMMIT or ROLLBACK [WORK] without AND CHAIN or RELEASE (whose NO forms are the default):
/// a branch ends in XA END and XA PREPARE or ROLLBACK, after which the connection can chain
/// no transaction (a prepared branch holds it) and must stay open for phase 2.
fn plain_end(sql: &[u8]) -> bool {
    let words = crate::classify::keywords(sql).unwrap_or_default();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let rest = match words.as_slice() {
        ["COMMIT" | "ROLLBACK", "WORK", rest @ ..] | ["COMMIT" | "ROLLBACK", rest @ ..] => rest,
        _ => return false,
    };
    matches!(
        rest,
        [] | ["AND", "NO", "CHAIN"] | ["NO", "RELEASE"] | ["AND", "NO", "CHAIN", "NO", "RELEASE"]
    )
}

/// The statement a command runs: a query's text, or a prepared statement's.
fn statement<'a>(command: &'a Command<'a>, state: &'a SessionState) -> Option<(&'a [u8], &'a Classification)> {
    match (command.code, command.class) {
        (Cmd::QUERY, Some(class)) => Some((&command.payload[1..], class)),
        (Cmd::STMT_EXECUTE | Cmd::STMT_BULK_EXECUTE, _) if command.payload.len() >= 5 => {
            state.statement(command.payload).map(|s| (s.sql.as_bytes(), &s.class))
        }
        _ => None,
    }
}

impl XaSession {
    fn cx<'a>(
        &'a mut self,
        backend: &'a mut Peer,
        state: &'a mut SessionState,
        shared: &Shared,
    ) -> (Cx<'a>, &'a mut Option<Branch>) {
        (
            Cx {
                backend,
                state,
                xa: &self.xa,
                limit: shared.config.max_packet_size,
            },
            &mut self.branch,
        )
    }

    /// DDL waits for the row locks of XA branches on its table until their phase 2 (and fails
    /// with a lock wait timeout meanwhile): said in the log, with the branches it waits for.
    fn warn_ddl(&self, sql: &[u8]) {
        for (xid, branch_id, table) in self.xa.held.named_by(&String::from_utf8_lossy(sql)) {
            tracing::warn!(
                xid,
                branch_id,
                table,
                "DDL on a table an XA branch of this proxy wrote: it waits for the branch's row locks until its global \
                 transaction ends (or fails with a lock wait timeout)"
            );
        }
    }

    /// How a write in a bound session runs: forwarded as sent, registered as an unchecked
    /// write until its response is read; or, when one of its tables may hold rows of other
    /// global transactions (AT-mode branches hold them locked after their local commit), run
    /// by the proxy with its rows found, to be checked against those locks before the branch
    /// prepares (`coordinator/row_check.rs`). The open branch, if any, notes the tables.
    fn route_write(&mut self, command: u8, sql: &[u8], class: &Classification, state: &SessionState) -> Routed {
        let global = &self.xa.global;
        // Registered before the view is read (see `coordinator/unchecked.rs`).
        let write = global.guards.unchecked.begin(state.backend_connection_id);
        let text = String::from_utf8_lossy(row_check::written_text(sql, class));
        let (tables, guarded) = if global.guards.quiet() {
            (unchecked::written_tables(&text, state.schema.as_deref()), Vec::new())
        } else {
            row_check::guarded_tables(&text, state, global)
        };
        if let (Some(tables), Some(b)) = (&tables, &self.branch) {
            self.xa.held.wrote(b.id.branch_id, tables);
        }
        if !guarded.is_empty() {
            write.finish(); // it will be checked instead
            let check = Some(row_check::plan(command, &text, class, &guarded));
            return Routed {
                tables: tables.unwrap_or_default(),
                check,
            };
        }
        // A statement the parser cannot read (or a CALL, which names no table it writes) may
        // write any table, and so may a multi-statement string (USE between its statements):
        // a guard on any table waits for it.
        if let (Some(tables), false) = (&tables, class.multi_statement)
            && matches!(class.class, StatementClass::Dml(_))
        {
            write.writes_to(tables.clone());
        }
        self.unchecked = Some(write);
        Routed {
            tables: tables.unwrap_or_default(),
            check: None,
        }
    }

    fn decide(&mut self, command: &Command<'_>, state: &SessionState) -> Option<Claim> {
        let (sql, class) = statement(command, state)?;
        let take = |claimed: Claimed| (Some(claimed), Claim::Take);
        let (claimed, claim) = match (&self.branch, class.class) {
            // Only Ferrata finishes Ferrata's branches; any MariaDB user could.
            _ if names_ferrata_branch(sql, class) => {
                take(Claimed::Refuse(ErrPacket::new(
                    1227,
                    "42000",
                    "Access denied: this XA statement names a Ferrata branch (its format id); only ferrata-proxy finishes those, \
                     as the transaction coordinator decides (see the ferrata command line)",
                )))
            }
            // A branch holds the connection (or will, in a session bound in XA mode) until
            // phase 2: nothing can chain on it, and it must stay open.
            (branch, StatementClass::TransactionControl(TxControl::Commit | TxControl::Rollback))
                if (branch.is_some() || state.bound_in(BranchMode::Xa)) && !class.multi_statement && !plain_end(sql) =>
            {
                take(Claimed::Refuse(refused(
                    "COMMIT or ROLLBACK with AND CHAIN or RELEASE",
                    "end the local transaction with plain COMMIT or ROLLBACK, then BEGIN the next one (or disconnect)",
                )))
            }
            (Some(b), c) => match (&b.phase, c) {
                (Phase::Doomed(_), StatementClass::TransactionControl(TxControl::Commit)) => {
                    take(Claimed::EndDoomed { commit: true })
                }
                (Phase::Doomed(_), StatementClass::TransactionControl(TxControl::Rollback)) => {
                    take(Claimed::EndDoomed { commit: false })
                }
                (Phase::Doomed(why), _) => take(Claimed::Refuse(doomed(why))),
                (Phase::Active { .. }, StatementClass::TransactionControl(TxControl::Commit))
                    if !class.multi_statement =>
                {
                    take(Claimed::Commit)
                }
                (Phase::Active { .. }, StatementClass::TransactionControl(TxControl::Rollback))
                    if !class.multi_statement =>
                {
                    take(Claimed::Rollback)
                }
                (
                    Phase::Active { .. },
                    StatementClass::TransactionControl(TxControl::Begin | TxControl::LockTables | TxControl::Xa)
                    | StatementClass::Other(Other::Ddl),
                ) => take(Claimed::Refuse(rmfail_active())),
                (
                    Phase::Active { .. },
                    StatementClass::TransactionControl(
                        TxControl::Savepoint | TxControl::RollbackToSavepoint | TxControl::ReleaseSavepoint,
                    ),
                ) => take(Claimed::Refuse(refused(
                    "A savepoint",
                    "MariaDB ignores SAVEPOINT inside XA transactions (ROLLBACK TO would fail): roll the whole local transaction back instead",
                ))),
                (Phase::Active { .. }, StatementClass::GlobalTransaction(GlobalCommand::Leave)) => {
                    take(Claimed::Refuse(binding::rmfail(
                        "the session's XA branch is open: COMMIT or ROLLBACK it before leaving the global transaction"
                            .into(),
                    )))
                }
                (Phase::Active { .. }, StatementClass::GlobalTransaction(GlobalCommand::Rollback))
                    if named_xid(sql).is_none_or(|x| x == b.id.xid) =>
                {
                    take(Claimed::RollbackGlobal)
                }
                (Phase::Active { .. }, _) if may_write(class) => match self.route_write(command.code, sql, class, state).check {
                    Some(row_check::Write::Refuse(e)) => take(Claimed::Refuse(e)),
                    check => {
                        branch::wrote(&mut self.branch);
                        match check {
                            None => (None, Claim::Pass),
                            Some(write) => take(Claimed::Write(write)),
                        }
                    }
                },
                (
                    Phase::Prepared,
                    StatementClass::GlobalTransaction(g @ (GlobalCommand::Commit | GlobalCommand::Rollback)),
                ) => {
                    match named_xid(sql).or_else(|| state.xid.clone()) {
                        Some(xid) if xid == b.id.xid => take(Claimed::Decide {
                            commit: g == GlobalCommand::Commit,
                            xid,
                        }),
                        _ => (None, Claim::Pass),
                    }
                }
                // No longer bound to its transaction (left it, or decided it): the connection is
                // still finishing the branch, so what needs it waits for phase 2 first.
                (Phase::Prepared, c)
                    if state.xid.as_deref() != Some(b.id.xid.as_str())
                        && c != StatementClass::GlobalTransaction(GlobalCommand::Show) =>
                {
                    self.gate_for = Some(GateFor::Phase2);
                    (None, Claim::Gate)
                }
                (Phase::Prepared, StatementClass::GlobalTransaction(GlobalCommand::Start | GlobalCommand::Join)) => {
                    take(Claimed::Refuse(binding::rmfail(format!(
                        "this connection holds the prepared XA branch {} of global transaction {} until it ends (MariaDB lets \
                         nothing else use it meanwhile): COMMIT GLOBAL or ROLLBACK GLOBAL it, or use another connection",
                        b.id.branch_id, b.id.xid
                    ))))
                }
                (Phase::Prepared, StatementClass::TransactionControl(TxControl::Commit | TxControl::Rollback))
                    if !class.multi_statement =>
                {
                    take(Claimed::Nothing)
                }
                (Phase::Active { .. }, _) if b.reads_uncounted() => {
                    self.gate_for = Some(GateFor::Count);
                    (None, Claim::Gate)
                }
                _ => (None, Claim::Pass),
            },
            (None, c) if !state.bound_in(BranchMode::Xa) => {
                if c == StatementClass::Other(Other::Ddl) {
                    self.warn_ddl(sql);
                }
                (None, Claim::Pass)
            }
            (None, StatementClass::TransactionControl(TxControl::Xa)) => take(Claimed::Refuse(refused(
                "An XA statement",
                "the session's global transaction runs its own XA branches (MODE XA); LEAVE GLOBAL TRANSACTION first",
            ))),
            (None, StatementClass::TransactionControl(TxControl::Begin)) if !class.multi_statement => {
                if plain_begin(sql) {
                    take(Claimed::Begin)
                } else {
                    take(Claimed::Refuse(refused(
                        "START TRANSACTION with characteristics (READ ONLY, WITH CONSISTENT SNAPSHOT, ...)",
                        "use plain BEGIN in MODE XA",
                    )))
                }
            }
            (None, StatementClass::TransactionControl(TxControl::LockTables)) => take(Claimed::Refuse(refused(
                "LOCK TABLES",
                "lock rows with SELECT ... FOR UPDATE instead",
            ))),
            (None, StatementClass::Other(Other::Ddl)) => take(Claimed::Refuse(refused(
                "DDL (it commits implicitly)",
                "run it outside the global transaction (LEAVE GLOBAL TRANSACTION first)",
            ))),
            // A plain local transaction opened without a branch (with autocommit off, by a
            // statement that reads a table without being one the gate opens a branch for):
            // nothing it writes or commits may escape the global transaction.
            (None, c)
                if state.in_transaction()
                    && (may_write(class) || c == StatementClass::TransactionControl(TxControl::Commit)) =>
            {
                take(Claimed::Refuse(binding::rmfail(
                    "a local transaction outside the session's XA branch is open (a statement started it with autocommit \
                     off before any branch): ROLLBACK it, then BEGIN, so that its work becomes an XA branch"
                        .into(),
                )))
            }
            (None, _) if state.in_transaction() => (None, Claim::Pass),
            (None, _) if state.autocommit() && may_write(class) => {
                if matches!(class.class, StatementClass::Dml(Dml::LoadData)) {
                    take(Claimed::Refuse(refused(
                        "An autocommit LOAD DATA",
                        "run it between BEGIN and COMMIT",
                    )))
                } else if class.multi_statement {
                    // One branch around them all: the client would read the first statements'
                    // OKs although a later failure rolled them back with the rest.
                    take(Claimed::Refuse(refused(
                        "An autocommit multi-statement string",
                        "run it between BEGIN and COMMIT",
                    )))
                } else if command.code == Cmd::STMT_BULK_EXECUTE {
                    take(Claimed::Refuse(refused(
                        "An autocommit bulk execute (COM_STMT_BULK_EXECUTE)",
                        "run it between BEGIN and COMMIT",
                    )))
                } else {
                    match self.route_write(command.code, sql, class, state) {
                        Routed {
                            check: Some(row_check::Write::Refuse(e)),
                            ..
                        } => take(Claimed::Refuse(e)),
                        routed => take(Claimed::Wrap(routed)),
                    }
                }
            }
            (None, _) if !state.autocommit() && starts_transaction(class) => {
                self.gate_for = Some(GateFor::Open);
                (None, Claim::Gate)
            }
            _ => (None, Claim::Pass),
        };
        self.claimed = claimed;
        Some(claim)
    }

    async fn run_claimed(&mut self, io: Io<'_>, claimed: Claimed) -> Result<(), SessionError> {
        let Io {
            client,
            backend,
            state,
            shared,
            raw,
            ..
        } = io;
        let reply = match claimed {
            Claimed::Refuse(e) => return backend::refuse(client, e).await,
            Claimed::Nothing => Ok(resultset::ok(state.status)),
            Claimed::EndDoomed { commit } => {
                let why = match self.branch.take().map(|b| b.phase) {
                    Some(Phase::Doomed(why)) => why,
                    _ => String::new(),
                };
                if commit {
                    Err(doomed(&why))
                } else {
                    Ok(resultset::ok(state.status))
                }
            }
            Claimed::Begin => {
                let xid = state.xid.clone().unwrap_or_default();
                let (mut cx, slot) = self.cx(backend, state, shared);
                branch::open(&mut cx, slot, &xid)
                    .await?
                    .map(|()| resultset::ok(cx.state.status))
            }
            Claimed::Commit => match self.check_written(backend, state, shared, row_check::LEFT_OPEN).await? {
                Some(e) => Err(e),
                None => {
                    let (mut cx, slot) = self.cx(backend, state, shared);
                    branch::prepare(&mut cx, slot).await?.map(resultset::ok)
                }
            },
            Claimed::Rollback => {
                let (mut cx, slot) = self.cx(backend, state, shared);
                Ok(resultset::ok(
                    branch::rollback(&mut cx, slot, "rolled back by the client").await?,
                ))
            }
            Claimed::RollbackGlobal => {
                let (mut cx, slot) = self.cx(backend, state, shared);
                branch::rollback(&mut cx, slot, "the client rolled the global transaction back").await?;
                // The binding answers the rest (the decision) with no local transaction open.
                let sql = String::from_utf8_lossy(&raw[5..]).into_owned();
                return binding::answer(client, backend, state, shared, Some(&self.xa.global), &sql).await;
            }
            Claimed::Decide { commit, xid } => {
                if commit {
                    let (mut cx, slot) = self.cx(backend, state, shared);
                    if let Err(e) = branch::confirm(&mut cx, slot).await? {
                        return backend::reply(client, e).await;
                    }
                }
                let global = Arc::clone(&self.xa.global);
                let result = {
                    let decision = binding::decide(&global, &xid, commit);
                    tokio::pin!(decision);
                    loop {
                        let Some(b) = self.branch.as_mut() else {
                            break (&mut decision).await;
                        };
                        tokio::select! {
                            r = &mut decision => break r,
                            request = b.requests.recv() => if let Some(request) = request {
                                self.serve(request, backend, state, shared).await?;
                            },
                        }
                    }
                };
                binding::decided(state, &xid, commit, &result);
                result.map(|()| resultset::ok(state.status))
            }
            Claimed::Wrap(routed) => return self.wrap(client, backend, state, shared, raw, routed).await,
            Claimed::Write(write) => {
                let answer = self.run_checked(backend, state, shared, write, io.command, raw).await?;
                return client
                    .write_all(&answer.unwrap_or_else(|e| e))
                    .await
                    .map_err(|_| SessionError::ClientClosed);
            }
        };
        let bytes = reply.unwrap_or_else(|e| e.to_packet(1));
        client.write_all(&bytes).await.map_err(|_| SessionError::ClientClosed)
    }

    /// The checked-write context of the open branch: its rows, its global transaction.
    fn row_cx<'a>(
        &'a mut self,
        backend: &'a mut Peer,
        state: &'a mut SessionState,
        shared: &'a Shared,
    ) -> Option<row_check::Cx<'a>> {
        let Some(Branch {
            id,
            phase: Phase::Active { checked, .. },
            ..
        }) = self.branch.as_mut()
        else {
            return None;
        };
        Some(row_check::Cx {
            backend,
            state,
            written: checked,
            shared,
            global: &self.xa.global,
            xid: &id.xid,
        })
    }

    /// Runs a write the proxy checks in the open branch, its rows kept with the branch.
    async fn run_checked(
        &mut self,
        backend: &mut Peer,
        state: &mut SessionState,
        shared: &Shared,
        write: row_check::Write,
        command: u8,
        raw: &[u8],
    ) -> Result<row_check::Answer, SessionError> {
        let mut cx = self
            .row_cx(backend, state, shared)
            .expect("a checked write runs in an open branch");
        row_check::run(&mut cx, write, command, raw).await
    }

    /// Before the open branch prepares, the rows it wrote to guarded tables are checked
    /// against other global transactions' locks. `Some(error)` when it may not prepare: a row
    /// is still held (the branch stays open; `done` says what became of the statement), or
    /// rows could not be named (the branch is rolled back).
    async fn check_written(
        &mut self,
        backend: &mut Peer,
        state: &mut SessionState,
        shared: &Shared,
        done: &str,
    ) -> Result<Option<ErrPacket>, SessionError> {
        let Some(mut cx) = self.row_cx(backend, state, shared) else {
            return Ok(None);
        };
        Ok(match cx.at_commit(done).await {
            AtCommit::Free => None,
            AtCommit::Held(e) => Some(e),
            AtCommit::Unchecked(e) => {
                let (mut cx, slot) = self.cx(backend, state, shared);
                branch::rollback(&mut cx, slot, "rows it wrote could not be checked against global locks").await?;
                Some(e)
            }
        })
    }

    /// An autocommit write in a branch of its own: opened, the statement run (by the proxy,
    /// its rows checked, when it writes guarded tables), then prepared (rolled back if it
    /// failed or its rows are held); the client gets the statement's own response, with
    /// autocommit's status flags.
    async fn wrap(
        &mut self,
        client: &mut Peer,
        backend: &mut Peer,
        state: &mut SessionState,
        shared: &Shared,
        raw: &[u8],
        routed: Routed,
    ) -> Result<(), SessionError> {
        let before = state.status;
        let xid = state.xid.clone().unwrap_or_default();
        let limit = shared.config.max_packet_size;
        let write = self.unchecked.take();
        let (mut cx, slot) = self.cx(backend, state, shared);
        if let Err(e) = branch::open(&mut cx, slot, &xid).await? {
            if let Some(w) = write {
                w.finish();
            }
            return backend::refuse(client, e).await;
        }
        if let Some(b) = slot.as_ref() {
            cx.xa.held.wrote(b.id.branch_id, &routed.tables);
        }
        // A write that changed no row may have written all the same (a trigger fires for rows
        // matched but not changed, a function in its WHERE writes): it is prepared like any.
        branch::wrote(slot);
        let ran = match routed.check {
            None => {
                let ran = backend::run_client_statement(cx.backend, cx.state, limit, raw, false).await;
                if let Some(w) = write {
                    w.finish();
                }
                ran?.map(|(response, _)| response)
            }
            Some(check) => self.run_checked(backend, state, shared, check, raw[4], raw).await?,
        };
        let held = match &ran {
            Ok(_) => {
                self.check_written(backend, state, shared, "the statement was rolled back")
                    .await?
            }
            Err(_) => None,
        };
        let (mut cx, slot) = self.cx(backend, state, shared);
        let reply = match (ran, held) {
            (Err(response), _) => {
                branch::rollback(&mut cx, slot, "the statement failed").await?;
                response
            }
            (Ok(_), Some(e)) => {
                branch::rollback(&mut cx, slot, "a row it wrote is held by another global transaction").await?;
                e.to_packet(1)
            }
            (Ok(mut response), None) => match branch::prepare(&mut cx, slot).await? {
                Ok(_) => {
                    backend::as_autocommit(&mut response, cx.state, before);
                    response
                }
                Err(e) => e.to_packet(1),
            },
        };
        client.write_all(&reply).await.map_err(|_| SessionError::ClientClosed)
    }

    /// Waits for the held branch's phase 2 and runs it, up to the lock wait (and the
    /// coordinator's answer time); `Some(error)` if it does not come.
    async fn phase2_first(
        &mut self,
        backend: &mut Peer,
        state: &mut SessionState,
        shared: &Shared,
    ) -> Result<Option<ErrPacket>, SessionError> {
        let global = &self.xa.global;
        let wait = std::time::Duration::from_millis(global.lock_wait_ms) + global.outcome_wait;
        let Some(b) = self.branch.as_mut() else { return Ok(None) };
        let (branch_id, xid) = (b.id.branch_id, b.id.xid.clone());
        match tokio::time::timeout(wait, b.requests.recv()).await {
            Ok(Some(request)) => {
                self.serve(request, backend, state, shared).await?;
                Ok(None)
            }
            _ => Ok(Some(binding::rmfail(format!(
                "this connection still holds the prepared XA branch {branch_id} of global transaction {xid}, which has not \
                 ended after {} ms (MariaDB lets nothing else use the connection meanwhile): retry later, or use another \
                 connection",
                wait.as_millis()
            )))),
        }
    }

    /// Runs a phase-2 command for the held branch on this connection and answers it.
    async fn serve(
        &mut self,
        request: Request,
        backend: &mut Peer,
        state: &mut SessionState,
        shared: &Shared,
    ) -> Result<(), SessionError> {
        let (mut cx, slot) = self.cx(backend, state, shared);
        let outcome = branch::phase2(&mut cx, slot, request.commit).await?;
        // Nobody waits any more if the coordinator's call timed out: it asks again.
        let _ = request.reply.send(outcome);
        Ok(())
    }
}

fn doomed(why: &str) -> ErrPacket {
    ErrPacket::new(
        1402,
        "XA100",
        format!("XA_RBROLLBACK: Transaction branch was rolled back: {why}; ROLLBACK to end the local transaction"),
    )
}

impl ModeSession for XaSession {
    fn claim(&mut self, command: &Command<'_>, state: &SessionState, _shared: &Shared) -> Claim {
        if let Some(w) = self.unchecked.take() {
            w.finish(); // a mode after this one answered it: it never ran
        }
        self.claimed = None;
        self.gate_for = None;
        if matches!(command.code, Cmd::CHANGE_USER | Cmd::RESET_CONNECTION) {
            self.resetting = self.branch.is_some();
            return Claim::Pass;
        }
        self.decide(command, state).unwrap_or(Claim::Pass)
    }

    fn run<'a>(&'a mut self, io: Io<'a>) -> BoxFuture<'a, Result<(), SessionError>> {
        Box::pin(async move {
            let claimed = self.claimed.take().expect("run follows a claim to take");
            self.run_claimed(io, claimed).await
        })
    }

    /// See [`GateFor`].
    fn gate<'a>(
        &'a mut self,
        backend: &'a mut Peer,
        state: &'a mut SessionState,
        shared: &'a Shared,
    ) -> BoxFuture<'a, Result<Option<ErrPacket>, SessionError>> {
        Box::pin(async move {
            let Some(gate_for) = self.gate_for.take() else {
                return Ok(None);
            };
            let (mut cx, slot) = self.cx(backend, state, shared);
            match gate_for {
                GateFor::Phase2 => self.phase2_first(backend, state, shared).await,
                GateFor::Open => {
                    let xid = cx.state.xid.clone().unwrap_or_default();
                    Ok(branch::open(&mut cx, slot, &xid).await?.err())
                }
                GateFor::Count => branch::before_read(&mut cx, slot).await.map(|()| None),
            }
        })
    }

    fn answered(&mut self, _state: &SessionState, _error: Option<u16>) {
        if let Some(w) = self.unchecked.take() {
            w.finish(); // its response was read
        }
        if std::mem::take(&mut self.resetting) {
            // Even a refused COM_CHANGE_USER resets the session first.
            self.forget_branch("the client reset its session");
        }
    }

    fn wake(&mut self) -> Option<BoxFuture<'_, ()>> {
        let b = self.branch.as_mut()?;
        let request = &mut self.request;
        Some(Box::pin(async move {
            *request = b.requests.recv().await;
            if request.is_none() {
                // Never again: the registry let the branch go (its phase 2 ran here).
                std::future::pending::<()>().await;
            }
        }))
    }

    fn woken<'a>(
        &'a mut self,
        backend: &'a mut Peer,
        state: &'a mut SessionState,
        shared: &'a Shared,
    ) -> BoxFuture<'a, Result<(), SessionError>> {
        Box::pin(async move {
            match self.request.take() {
                Some(request) => self.serve(request, backend, state, shared).await,
                None => Ok(()),
            }
        })
    }
}

impl XaSession {
    /// The server let the branch go with the session (an active one rolled back, a prepared
    /// one detached: any connection may finish it now); so does this proxy.
    fn forget_branch(&mut self, why: &'static str) {
        let Some(b) = self.branch.take() else { return };
        self.xa.held.release(b.id.branch_id);
        // Best effort, and only while the runtime runs (a session dropped at its shutdown
        // reports nothing: the coordinator's timeout rolls the branch back anyway).
        if let (Phase::Active { .. }, Ok(runtime)) = (&b.phase, tokio::runtime::Handle::try_current()) {
            let global = Arc::clone(&self.xa.global);
            runtime.spawn(async move { global.report_failed(&b.id.xid, b.id.branch_id, why).await });
        }
    }
}

impl Drop for XaSession {
    /// The session ended: its connection closes.
    fn drop(&mut self) {
        self.forget_branch("its session ended before it committed");
    }
}
