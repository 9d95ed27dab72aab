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
//! - **Check**: a write to a guarded table. Its rows are found (UPDATE and DELETE: the
//!   statement's filter, `SELECT <primary key> ... FOR UPDATE`, before it runs; INSERT: its keys,
//!   read back after; IGNORE, upserts and REPLACE: every key they name, before and after;
//!   multi-table UPDATE and DELETE: each written table's keys by the statement's own
//!   references and WHERE, before) and
//!   kept until the local transaction's commit point, where the
//!   coordinator is asked whether any of them is globally locked, waiting up to the lock
//!   timeout, while the database still holds their row locks. An autocommit write is checked
//!   at once inside the proxy's own local transaction.
//! - **Refuse**: a write to a guarded table whose rows the proxy cannot name (a
//!   multi-statement string, an UPDATE of a primary-key column) or that it cannot run inside
//!   the transaction its check needs (`SET STATEMENT ... FOR`, whose variables MariaDB may
//!   refuse there) gets ERR 1235 without running.
//!
//! Commit points (COMMIT, and statements that commit implicitly) of a transaction with
//! checked rows run the check first: ERR 1205 naming the holder if a row stays held, the
//! transaction left open.

use crate::classify::{self, Classification, Dml, Other, StatementClass, TxControl};
use crate::config::WhenUnreachable;
use crate::coordinator::guards::Observation;
use crate::coordinator::unchecked::{self, TableName, UncheckedWrite};
use crate::coordinator::{CheckFailure, Global, TableRows, no_database};
use crate::protocol::err::ErrPacket;
use crate::protocol::execute::Param;
use crate::protocol::{Command, ServerStatus};
use crate::session::backend::{self, Row, local_rollback};
use crate::session::peer::Peer;
use crate::session::state::SessionState;
use crate::session::{SessionError, Shared};
use crate::sql::dml;
use crate::sql::image::{qualified_select_list, select_list};
use crate::sql::keys::{self, InsertKeys};
use crate::sql::{qualified, select_locked};

/// The no-dirty-writes check's record of one local transaction outside any global one.
#[derive(Debug, Default)]
pub struct WriteCheck {
    /// Rows written to guarded tables.
    pub rows: TableRows,
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

/// What a write the proxy runs itself works with: the session's backend connection and
/// state, the rows its open transaction must have checked, and the coordinator layer.
pub struct Cx<'a> {
    pub backend: &'a mut Peer,
    pub state: &'a mut SessionState,
    pub written: &'a mut WriteCheck,
    pub shared: &'a Shared,
    pub global: &'a Global,
}

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

/// A write the proxy runs itself.
pub enum Write {
    Check(Box<dml::Plan>),
    CheckMulti(Box<dml::MultiChange>),
    Refuse(ErrPacket),
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
    let sql = String::from_utf8_lossy(written_text(sql, class));
    // A multi-statement string may change the schema (USE) between its statements: it may
    // write any table.
    let narrow = !class.multi_statement;
    if global.guards.quiet() {
        if let (Some(write), true) = (&unchecked, narrow) {
            write.runs(&sql, state.schema.as_deref());
        }
        return Some(forward(unchecked));
    }
    let (written, guarded) = tables(&sql, state, global);
    if guarded.is_empty() {
        if let (Some(write), Some(written), true) = (&unchecked, written, narrow) {
            write.writes_to(written);
        }
        return Some(forward(unchecked));
    }
    if let Some(write) = unchecked {
        write.finish(); // it will be checked instead
    }
    let tables = guarded.join(", ");
    let refuse = |why: &str, instead: &str| {
        Route::Run(Write::Refuse(ErrPacket::new(
            1235,
            "42000",
            format!(
                "ferrata-proxy cannot check {why} for dirty writes, and {tables} may hold rows of unfinished global \
                 transactions, so it was not run; {instead}, or run it once those transactions end"
            ),
        )))
    };
    const SPLIT: &str = "split it into single-table INSERT, UPDATE or DELETE statements";
    if command == Command::STMT_BULK_EXECUTE {
        return Some(refuse(
            "a bulk execute (COM_STMT_BULK_EXECUTE, array binding)",
            "send one execute per row",
        ));
    }
    if class.set_statement.is_some() {
        return Some(refuse(
            "a SET STATEMENT ... FOR write (the check runs it inside a transaction, where MariaDB refuses some of its variables)",
            "set the variables with SET SESSION around it",
        ));
    }
    if class.multi_statement {
        return Some(refuse("a multi-statement string", SPLIT));
    }
    match dml::plan_multi(&sql) {
        Some(Ok(multi)) => return Some(Route::Run(Write::CheckMulti(Box::new(multi)))),
        Some(Err(why)) => return Some(refuse(&why, SPLIT)),
        None => {}
    }
    match dml::plan(&sql) {
        Ok(plan) => Some(Route::Run(Write::Check(Box::new(plan)))),
        Err(why) => Some(refuse(&why, SPLIT)),
    }
}

/// The text of the statement that writes: after `SET STATEMENT ... FOR`, if it has one.
fn written_text<'a>(sql: &'a [u8], class: &Classification) -> &'a [u8] {
    &sql[class.set_statement.unwrap_or(0)..]
}

/// The tables `sql` writes (`None` when the parser cannot read it), and the checked ones
/// among them that are guarded now, as `database.table`. A statement the parser cannot read
/// is left to the server (it names no table the proxy could check).
fn tables(sql: &str, state: &SessionState, global: &Global) -> (Option<Vec<TableName>>, Vec<String>) {
    let Some(written) = unchecked::written_tables(sql, state.schema.as_deref()) else {
        return (None, Vec::new());
    };
    let mut guarded: Vec<String> = written
        .iter()
        .filter(|(database, table)| {
            global.dirty_writes.checks(database, table) && global.guards.guarded(database, table)
        })
        .map(|(database, table)| format!("{database}.{table}"))
        .collect();
    guarded.sort();
    guarded.dedup();
    (Some(written), guarded)
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
    let (_, guarded) = tables(&String::from_utf8_lossy(written_text(sql, class)), state, global);
    if !guarded.is_empty() {
        tracing::info!(tables = ?guarded, "a write ran while its table became guarded; its transaction will be rolled back at COMMIT");
        written.poisoned = Some(guarded.join(", "));
    }
}

/// ERR 1205 for rows still held at a commit point.
fn held(why: &str, done: &str) -> ErrPacket {
    ErrPacket::new(
        1205,
        "HY000",
        format!(
            "Lock wait timeout exceeded; {why}; {done} (ferrata-proxy: no write may commit over a row of an unfinished global transaction)"
        ),
    )
}

fn unreachable(why: &str, done: &str) -> ErrPacket {
    ErrPacket::new(
        1105,
        "HY000",
        format!(
            "ferrata-proxy cannot ask the transaction coordinator whether the rows written are free of global locks ({why}); {done}"
        ),
    )
}

/// Runs the check for `rows`: `None` when the write may commit, else the client's error.
async fn check(shared: &Shared, global: &Global, rows: &TableRows, done: &str) -> Option<ErrPacket> {
    if rows.is_empty() {
        return None;
    }
    let m = &shared.metrics;
    match global.check_written(rows).await {
        Ok(()) => {
            m.checks_free.increment(1);
            None
        }
        Err(CheckFailure::Held { message: why, .. }) => {
            m.checks_held.increment(1);
            tracing::info!(why, "write held back by a global lock");
            Some(held(&why, done))
        }
        Err(CheckFailure::Unreachable(why)) => {
            m.checks_unreachable.increment(1);
            match global.dirty_writes.when_coordinator_unreachable {
                WhenUnreachable::Allow => {
                    tracing::warn!(
                        error = why,
                        "coordinator unreachable; write committed unchecked as configured"
                    );
                    None
                }
                WhenUnreachable::Refuse => Some(unreachable(&why, done)),
            }
        }
    }
}

/// A commit point of a transaction with checked rows (or a marked one): `Some(error)` when the
/// client must get it instead of the statement running.
pub async fn before_commit(cx: &mut Cx<'_>) -> Result<Option<ErrPacket>, SessionError> {
    if let Some(tables) = cx.written.poisoned.take() {
        cx.shared.metrics.checks_poisoned.increment(1);
        local_rollback(cx.backend, cx.state, cx.shared.config.max_packet_size).await?;
        cx.written.clear();
        return Ok(Some(ErrPacket::new(
            1213,
            "40001",
            format!(
                "Deadlock found when trying to get lock; try restarting transaction (ferrata-proxy rolled the transaction back: \
                 {tables} gained global locks while it wrote to them, so its writes could not be checked)"
            ),
        )));
    }
    let rows = std::mem::take(&mut cx.written.rows);
    let failed = check(
        cx.shared,
        cx.global,
        &rows,
        "nothing was committed and the transaction is still open: roll it back, or retry the COMMIT",
    )
    .await;
    if failed.is_some() {
        cx.written.rows = rows;
    }
    Ok(failed)
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
    let reply = match write {
        Write::Refuse(e) => {
            m.writes_refused.increment(1);
            tracing::info!(error = %e, "write refused");
            e.to_packet(1)
        }
        Write::Check(plan) => {
            m.writes_checked.increment(1);
            checked(cx, *plan, command, raw).await?
        }
        Write::CheckMulti(plan) => {
            m.writes_checked.increment(1);
            checked_multi(cx, *plan, command, raw).await?
        }
    };
    client.write_all(&reply).await.map_err(|_| SessionError::ClientClosed)
}

/// The client's parameters of an execute (none for a text query); `Err` with the refusal
/// when they cannot be read.
fn execute_params(command: u8, raw: &[u8], state: &SessionState) -> Result<Vec<Param>, String> {
    if command != Command::STMT_EXECUTE {
        return Ok(Vec::new());
    }
    let payload = &raw[4..];
    let stmt = state.statement(payload);
    if stmt.is_some_and(|s| s.long_data_dropped) {
        return Err("a prepared statement with more long data than max_packet_size".into());
    }
    stmt.and_then(|s| s.bound_params(payload))
        .ok_or_else(|| "this execute (its parameters could not be read)".into())
}

fn refuse_check(why: &str) -> Vec<u8> {
    ErrPacket::new(
        1235,
        "42000",
        format!("ferrata-proxy cannot check {why} for dirty writes, so it was not run"),
    )
    .to_packet(1)
}

/// The rows written join the transaction's for its commit point; an autocommit write (in
/// the proxy's own transaction, `before` the status it started with) is checked and
/// committed at once.
async fn finish_checked(
    cx: &mut Cx<'_>,
    rows: TableRows,
    response: Vec<u8>,
    autocommit: Option<ServerStatus>,
) -> Result<Vec<u8>, SessionError> {
    let limit = cx.shared.config.max_packet_size;
    let Some(before) = autocommit else {
        for (table, keys) in rows {
            cx.written.rows.entry(table).or_default().extend(keys);
        }
        return Ok(response);
    };
    if let Some(e) = check(cx.shared, cx.global, &rows, "the statement was not run").await {
        local_rollback(cx.backend, cx.state, limit).await?;
        return Ok(e.to_packet(1));
    }
    backend::commit_own(cx.backend, cx.state, limit, response, before).await
}

/// A multi-table write touching a guarded table: the rows of every table it writes found
/// by the statement's own references and WHERE, before it runs.
async fn checked_multi(
    cx: &mut Cx<'_>,
    plan: dml::MultiChange,
    command: u8,
    raw: &[u8],
) -> Result<Vec<u8>, SessionError> {
    let limit = cx.shared.config.max_packet_size;
    let metas = match cx.global.tables(&plan.tables, cx.state.schema.as_deref()).await {
        Ok(metas) => metas,
        Err(e) => return Ok(e.to_packet(1)),
    };
    let tables = match keys::written(&plan, &metas) {
        Ok(w) => w,
        Err(why) => return Ok(refuse_check(&why)),
    };
    let params = match execute_params(command, raw, cx.state) {
        Ok(p) => p,
        Err(why) => return Ok(refuse_check(&why)),
    };
    let Some(bound) = keys::select_params(&plan, &params) else {
        return Ok(refuse_check("this execute (its parameters could not be read)"));
    };
    let autocommit = cx.state.autocommit() && !cx.state.in_transaction();
    let before = cx.state.status;
    if autocommit && let Err(e) = backend::begin_own(cx.backend, cx.state, limit).await? {
        return Ok(e.to_packet(1));
    }
    let mut rows = TableRows::new();
    // A table without a primary key can hold no global lock: nothing to find.
    for w in tables.iter().filter(|w| !w.meta.primary_key.is_empty()) {
        let list = qualified_select_list(&w.qualifier, &w.meta.key_specs());
        let sql = format!("SELECT {list}{} FOR UPDATE", plan.select_tail);
        let read = crate::sql::execute(cx.backend, cx.state, &sql, &bound, limit).await?;
        if let Some((code, message)) = read.error {
            if autocommit {
                local_rollback(cx.backend, cx.state, limit).await?;
            }
            return Ok(ErrPacket::new(code, "HY000", message).to_packet(1));
        }
        let keys = rows.entry((w.schema.clone(), w.meta.name.clone())).or_default();
        for row in read.rows {
            let key: Vec<Vec<u8>> = row.into_iter().map(Option::unwrap_or_default).collect();
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let response = match backend::run_client_statement(cx.backend, cx.state, limit, raw, autocommit).await? {
        Ok((response, _)) => response,
        Err(refused) => return Ok(refused),
    };
    finish_checked(cx, rows, response, autocommit.then_some(before)).await
}

/// A write to a guarded table: its rows found and kept for the commit point (checked at
/// once for an autocommit write).
async fn checked(cx: &mut Cx<'_>, plan: dml::Plan, command: u8, raw: &[u8]) -> Result<Vec<u8>, SessionError> {
    let limit = cx.shared.config.max_packet_size;
    let table = match &plan {
        dml::Plan::Change(c) => &c.table,
        dml::Plan::Insert(i) => &i.table,
    };
    let Some(database) = table.schema.clone().or_else(|| cx.state.schema.clone()) else {
        return Ok(no_database().to_packet(1));
    };
    let meta = match cx.global.table(&database, &table.name).await {
        Ok(meta) => meta,
        Err(e) => return Ok(e.to_packet(1)),
    };
    let params = match execute_params(command, raw, cx.state) {
        Ok(p) => p,
        Err(why) => return Ok(refuse_check(&why)),
    };
    if let dml::Plan::Change(change) = &plan
        && let Some(column) = change.assigned.iter().find(|c| {
            meta.primary_key
                .iter()
                .any(|&i| meta.columns[i].name.eq_ignore_ascii_case(c))
        })
    {
        return Ok(refuse_check(&format!("an UPDATE of the primary-key column {column}")));
    }
    // A plain INSERT's rows are found by their keys after it ran; the INSERTs that meet rows
    // already there (IGNORE, upserts, REPLACE) write rows found by any key they name, before
    // (updated, deleted) and after (inserted).
    let mut keys = None;
    let mut key_condition = None;
    match &plan {
        dml::Plan::Insert(_) if meta.primary_key.is_empty() => {}
        dml::Plan::Insert(insert) if insert.mode == dml::InsertMode::Plain => {
            match keys::insert_keys(insert, &meta, &params) {
                Ok(k) => keys = Some(k),
                Err(why) => return Ok(refuse_check(&why)),
            }
        }
        dml::Plan::Insert(insert) => match keys::key_condition(insert, &meta, &params) {
            Ok(c) => key_condition = Some(c),
            Err(why) => return Ok(refuse_check(&why)),
        },
        dml::Plan::Change(_) => {}
    }
    let autocommit = cx.state.autocommit() && !cx.state.in_transaction();
    let before = cx.state.status;
    if autocommit && let Err(e) = backend::begin_own(cx.backend, cx.state, limit).await? {
        return Ok(e.to_packet(1));
    }
    let pk = meta.key_specs();
    let list = select_list(&pk);
    let qualified = qualified(&database, &meta.name);
    let abort = async |backend: &mut Peer, state: &mut SessionState, e: ErrPacket| -> Result<Vec<u8>, SessionError> {
        if autocommit {
            local_rollback(backend, state, limit).await?;
        }
        Ok(e.to_packet(1))
    };
    // A table without a primary key can hold no global lock: nothing to find.
    let mut rows: Vec<Row> = Vec::new();
    if let (dml::Plan::Change(change), false) = (&plan, pk.is_empty()) {
        match keys::select_filtered(cx.backend, cx.state, change, &qualified, &list, &params, limit).await? {
            Ok(found) => rows = found,
            Err(e) => return abort(cx.backend, cx.state, e).await,
        }
    }
    let keyed = key_condition.map(|c| select_locked(&list, &qualified, &c));
    if let Some(keyed) = &keyed {
        let read = backend::query(cx.backend, cx.state, keyed, limit).await?;
        if let Some((code, message)) = read.error {
            return abort(cx.backend, cx.state, ErrPacket::new(code, "HY000", message)).await;
        }
        rows = read.rows;
    }
    let (response, summary) = match backend::run_client_statement(cx.backend, cx.state, limit, raw, autocommit).await? {
        Ok(done) => done,
        Err(refused) => return Ok(refused),
    };
    if let Some(keyed) = &keyed {
        let read = backend::query(cx.backend, cx.state, keyed, limit).await?;
        if let Some((code, message)) = read.error {
            if !autocommit {
                cx.written.poisoned = Some(format!("{database}.{}", meta.name));
            }
            let e = ErrPacket::new(
                code,
                "HY000",
                format!("reading the written rows' keys failed: {message}"),
            );
            return abort(cx.backend, cx.state, e).await;
        }
        for row in read.rows {
            if !rows.contains(&row) {
                rows.push(row);
            }
        }
    }
    if let Some(keys) = &keys {
        let condition = keys::insert_condition(cx.backend, cx.state, &meta, keys, summary, limit).await?;
        let read = backend::query(
            cx.backend,
            cx.state,
            &select_locked(&list, &qualified, &condition),
            limit,
        )
        .await?;
        if let Some((code, message)) = read.error {
            let e = ErrPacket::new(
                code,
                "HY000",
                format!("reading the inserted rows' keys failed: {message}"),
            );
            if !autocommit {
                // The rows are in the transaction but cannot be named: it must not commit.
                cx.written.poisoned = Some(format!("{database}.{}", meta.name));
            }
            return abort(cx.backend, cx.state, e).await;
        }
        rows = read.rows;
        if matches!(keys, InsertKeys::Generated) && rows.len() as u64 != summary.map_or(0, |s| s.affected_rows) {
            let e = ErrPacket::new(
                1105,
                "HY000",
                "ferrata-proxy could not find the rows this INSERT generated (is auto_increment_increment changing?)",
            );
            if !autocommit {
                cx.written.poisoned = Some(format!("{database}.{}", meta.name));
            }
            return abort(cx.backend, cx.state, e).await;
        }
    }
    let mut found = TableRows::new();
    if !rows.is_empty() {
        found.insert(
            (database.clone(), meta.name.clone()),
            rows.into_iter()
                .map(|r| r.into_iter().map(Option::unwrap_or_default).collect())
                .collect(),
        );
    }
    finish_checked(cx, found, response, autocommit.then_some(before)).await
}
