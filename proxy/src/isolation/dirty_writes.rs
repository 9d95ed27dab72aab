//! No dirty writes through the proxy: a write made outside any global transaction must not
//! commit over a row that an unfinished global transaction holds, or that transaction's
//! rollback would find the row changed (a dirty rollback). Why the scheme below is sound is
//! in ARCHITECTURE.md ("No dirty writes").
//!
//! Every write (INSERT, UPDATE, DELETE, REPLACE, a multi-statement string) of a session
//! outside a global transaction takes one of these routes ([`route`]):
//! - **Observe**: inside a local transaction, when none of the tables it writes is guarded
//!   (`coordinator::guards`). It is forwarded as usual; if the guarded-table view changed while it
//!   ran and now guards one of its tables, the transaction is marked: its COMMIT rolls it back
//!   with ERR 1213, as it cannot be shown safe.
//! - **Unchecked**: an autocommit write to unguarded tables. It is forwarded as sent and runs
//!   exactly as it would directly, registered as an unchecked write
//!   (`coordinator/unchecked.rs`) until its response is read: a guard on one of its tables
//!   waits for it, and it is interrupted if it would outlive the view's trust.
//! - **Check**: a write to a guarded table, run by the proxy itself
//!   (`coordinator/row_check.rs`): its rows are found and kept until the local transaction's
//!   commit point, where the coordinator is asked whether any of them is globally locked,
//!   waiting up to the lock timeout, while the database still holds their row locks. An
//!   autocommit write is checked at once inside the proxy's own local transaction. A write
//!   whose rows cannot be named or checked is refused (ERR 1235) without running.
//!
//! Commit points (COMMIT, and statements that commit implicitly) of a transaction with
//! checked rows run the check first: ERR 1205 naming the holder if a row stays held, the
//! transaction left open.

use crate::classify::{self, Classification, Dml, Other, StatementClass, TxControl};
use crate::coordinator::Global;
use crate::coordinator::guards::Observation;
use crate::coordinator::row_check::{self, AtCommit, Cx, Write, WriteCheck};
use crate::coordinator::unchecked::UncheckedWrite;
use crate::protocol::Command;
use crate::protocol::err::ErrPacket;
use crate::session::SessionError;
use crate::session::backend::local_rollback;
use crate::session::peer::Peer;
use crate::session::state::SessionState;

/// What the session does with one command outside any global transaction.
pub enum Route {
    /// Forward it as usual, then [`after_observed`].
    Observe(Observation),
    /// Forward it as sent, registered until its response is read.
    Unchecked(UncheckedWrite),
    /// The proxy runs the write itself ([`run`]).
    Run(Write),
    /// A commit point: [`before_commit`] first.
    CommitPoint,
}

/// The statement text of an execute (bulk or not).
fn statement_text<'a>(
    command: u8,
    payload: &'a [u8],
    state: &'a SessionState,
) -> Option<(&'a [u8], &'a Classification)> {
    if !matches!(command, Command::STMT_EXECUTE | Command::STMT_BULK_EXECUTE) {
        return None;
    }
    state.statement(payload).map(|s| (s.sql.as_bytes(), &s.class))
}

/// Decides the route of a command in a session outside any global transaction; `None` for
/// commands that write nothing (or nothing the proxy can see: CALL, LOAD DATA).
pub fn route(
    command: u8,
    payload: &[u8],
    query_class: Option<&Classification>,
    state: &SessionState,
    written: &WriteCheck,
    global: &Global,
) -> Option<Route> {
    let (sql, class) = match (command, query_class) {
        (Command::QUERY, Some(class)) => (&payload[1..], class),
        _ => statement_text(command, payload, state)?,
    };
    // A second statement may commit: the rows written so far are checked first (valid at
    // any time once they are locked; see ARCHITECTURE.md).
    if class.multi_statement && !written.is_empty() {
        return Some(Route::CommitPoint);
    }
    let write = match class.class {
        StatementClass::TransactionControl(
            TxControl::Commit | TxControl::Begin | TxControl::SetAutocommit | TxControl::LockTables | TxControl::Xa,
        )
        | StatementClass::Other(Other::Ddl | Other::Unknown)
            if !written.is_empty() =>
        {
            return Some(Route::CommitPoint);
        }
        StatementClass::Dml(Dml::Insert | Dml::Update | Dml::Delete | Dml::Replace) => true,
        // CALL, compound statements and PREPARE/EXECUTE run writes the proxy cannot see: they
        // pass as they are, unless more statements follow one (then it is a multi-statement
        // string; a compound statement's own `;` make it look like one, which costs nothing).
        StatementClass::Other(Other::Procedural) => class.multi_statement,
        // Ferrata's own statements are answered by the proxy, whatever follows them.
        StatementClass::GlobalTransaction(_) => false,
        _ => command == Command::QUERY && class.multi_statement,
    };
    if !write || class.xid_hint.is_some() {
        // A hinted statement belongs to its global transaction, whatever the session's.
        return None;
    }
    let seen = global.guards.observe();
    let autocommit = state.autocommit() && !state.in_transaction();
    // Registered before the view is read (see `coordinator/unchecked.rs`).
    let unchecked = autocommit.then(|| global.guards.unchecked.begin(state.backend_connection_id));
    let forward = |unchecked: Option<UncheckedWrite>| match unchecked {
        Some(write) => Route::Unchecked(write),
        None => Route::Observe(seen),
    };
    let sql = String::from_utf8_lossy(row_check::written_text(sql, class));
    // A multi-statement string may change the schema (USE) between its statements: it may
    // write any table.
    let narrow = !class.multi_statement;
    if global.guards.quiet() {
        if let (Some(write), true) = (&unchecked, narrow) {
            write.runs(&sql, state.schema.as_deref());
        }
        return Some(forward(unchecked));
    }
    let (written, guarded) = row_check::guarded_tables(&sql, state, global);
    if guarded.is_empty() {
        if let (Some(write), Some(written), true) = (&unchecked, written, narrow) {
            write.writes_to(written);
        }
        return Some(forward(unchecked));
    }
    if let Some(write) = unchecked {
        write.finish(); // it will be checked instead
    }
    Some(Route::Run(row_check::plan(command, &sql, class, &guarded)))
}

/// After an observed write: if the view changed while it ran and now guards a table it
/// wrote, the transaction is marked (see the module docs).
pub fn after_observed(
    command: u8,
    payload: &[u8],
    state: &SessionState,
    written: &mut WriteCheck,
    global: &Global,
    seen: Observation,
) {
    if global.guards.unchanged_since(seen) || !state.in_transaction() {
        return;
    }
    let query_class;
    let (sql, class) = match command {
        Command::QUERY => {
            query_class = classify::classify(&payload[1..], state.no_backslash_escapes());
            (&payload[1..], &query_class)
        }
        _ => match statement_text(command, payload, state) {
            Some(text) => text,
            None => return,
        },
    };
    let (_, guarded) = row_check::guarded_tables(
        &String::from_utf8_lossy(row_check::written_text(sql, class)),
        state,
        global,
    );
    if !guarded.is_empty() {
        tracing::info!(tables = ?guarded, "a write ran while its table became guarded; its transaction will be rolled back at COMMIT");
        written.poisoned = Some(guarded.join(", "));
    }
}

/// A commit point of a transaction with checked rows (or a marked one): `Some(error)` when the
/// client must get it instead of the statement running.
pub async fn before_commit(cx: &mut Cx<'_>) -> Result<Option<ErrPacket>, SessionError> {
    Ok(match cx.at_commit(row_check::LEFT_OPEN).await {
        AtCommit::Free => None,
        AtCommit::Held(e) => Some(e),
        AtCommit::Unchecked(e) => {
            local_rollback(cx.backend, cx.state, cx.shared.config.max_packet_size).await?;
            Some(e)
        }
    })
}

/// Runs a write the proxy handles itself and answers the client.
pub async fn run(
    client: &mut Peer,
    cx: &mut Cx<'_>,
    write: Write,
    command: u8,
    raw: &[u8],
) -> Result<(), SessionError> {
    let m = &cx.shared.metrics;
    match &write {
        Write::Refuse(e) => {
            m.writes_refused.increment(1);
            tracing::info!(error = %e, "write refused");
        }
        Write::Check(_) | Write::CheckMulti(_) => m.writes_checked.increment(1),
    }
    let reply = row_check::run(cx, write, command, raw).await?.unwrap_or_else(|e| e);
    client.write_all(&reply).await.map_err(|_| SessionError::ClientClosed)
}
