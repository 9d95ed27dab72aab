//! Checked writes: the rows a write to a guarded table changes (`coordinator::guards`), found
//! while the proxy runs the write itself, kept with the local transaction, and checked against
//! global locks at its commit point, while the database still holds their row locks. Two
//! modes use it: the no-dirty-writes check outside global transactions
//! (`isolation/dirty_writes.rs`, where any global lock holds a row back) and XA branches
//! (`xa/`, where rows of the branch's own global transaction are free).
//!
//! How the rows are found: UPDATE and DELETE by the statement's filter, `SELECT <primary key>
//! ... FOR UPDATE`, before it runs; INSERT by its keys, read back after; IGNORE, upserts and
//! REPLACE by every key they name, before and after; multi-table UPDATE and DELETE by each
//! written table's keys with the statement's own references and WHERE, before. A write whose
//! rows the proxy cannot name (a multi-statement string, an UPDATE of a primary-key column, a
//! bulk execute) or that it cannot run inside the transaction its check needs (`SET STATEMENT
//! ... FOR`) is refused with ERR 1235 without running ([`plan`]).

use crate::classify::Classification;
use crate::config::WhenUnreachable;
use crate::coordinator::unchecked::{self, TableName};
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

/// The rows one local transaction wrote to guarded tables, checked at its commit point.
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
/// state, the rows its open transaction must have checked, the coordinator layer, and the
/// global transaction the rows are written in (empty: none).
pub struct Cx<'a> {
    pub backend: &'a mut Peer,
    pub state: &'a mut SessionState,
    pub written: &'a mut WriteCheck,
    pub shared: &'a Shared,
    pub global: &'a Global,
    pub xid: &'a str,
}

/// A write the proxy runs itself.
pub enum Write {
    Check(Box<dml::Plan>),
    CheckMulti(Box<dml::MultiChange>),
    Refuse(ErrPacket),
}

/// The text of the statement that writes: after `SET STATEMENT ... FOR`, if it has one.
pub fn written_text<'a>(sql: &'a [u8], class: &Classification) -> &'a [u8] {
    &sql[class.set_statement.unwrap_or(0)..]
}

/// The tables `sql` writes (`None` when the parser cannot read it), and the checked ones
/// among them that are guarded now, as `database.table`. A statement the parser cannot read
/// is left to the server (it names no table the proxy could check).
pub fn guarded_tables(sql: &str, state: &SessionState, global: &Global) -> (Option<Vec<TableName>>, Vec<String>) {
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

/// How the proxy runs `sql` (the statement of `command`), which writes the guarded tables
/// `guarded`: checked, or refused when its rows cannot be named or checked.
pub fn plan(command: u8, sql: &str, class: &Classification, guarded: &[String]) -> Write {
    let tables = guarded.join(", ");
    let refuse = |why: &str, instead: &str| {
        Write::Refuse(ErrPacket::new(
            1235,
            "42000",
            format!(
                "ferrata-proxy cannot check {why} against global locks, and {tables} may hold rows of unfinished global \
                 transactions, so it was not run; {instead}, or run it once those transactions end"
            ),
        ))
    };
    const SPLIT: &str = "split it into single-table INSERT, UPDATE or DELETE statements";
    if command == Command::STMT_BULK_EXECUTE {
        return refuse(
            "a bulk execute (COM_STMT_BULK_EXECUTE, array binding)",
            "send one execute per row",
        );
    }
    if class.set_statement.is_some() {
        return refuse(
            "a SET STATEMENT ... FOR write (the check runs it inside a transaction, where MariaDB refuses some of its variables)",
            "set the variables with SET SESSION around it",
        );
    }
    if class.multi_statement {
        return refuse("a multi-statement string", SPLIT);
    }
    match dml::plan_multi(sql) {
        Some(Ok(multi)) => return Write::CheckMulti(Box::new(multi)),
        Some(Err(why)) => return refuse(&why, SPLIT),
        None => {}
    }
    match dml::plan(sql) {
        Ok(plan) => Write::Check(Box::new(plan)),
        Err(why) => refuse(&why, SPLIT),
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

/// What a commit point's check found.
pub enum AtCommit {
    /// Every row written is free of other global transactions' locks: the transaction may
    /// commit (or prepare).
    Free,
    /// A row is still held after the lock timeout: the client's error; the transaction stays
    /// open with its rows kept for a retry.
    Held(ErrPacket),
    /// Rows written could not be named or checked: the transaction must be rolled back, and
    /// the client gets this error.
    Unchecked(ErrPacket),
}

/// What the client is told at a COMMIT that was held back.
pub const LEFT_OPEN: &str =
    "nothing was committed and the transaction is still open: roll it back, or retry the COMMIT";

impl Cx<'_> {
    /// The check at the local transaction's commit point (or its XA branch's prepare) of the
    /// rows it wrote to guarded tables; `done` tells the client what became of its statement
    /// when a row is held.
    pub async fn at_commit(&mut self, done: &str) -> AtCommit {
        if let Some(tables) = self.written.poisoned.take() {
            self.shared.metrics.checks_poisoned.increment(1);
            self.written.clear();
            return AtCommit::Unchecked(ErrPacket::new(
                1213,
                "40001",
                format!(
                    "Deadlock found when trying to get lock; try restarting transaction (ferrata-proxy rolled the transaction \
                     back: its writes to {tables} could not be checked against the global locks of unfinished global \
                     transactions)"
                ),
            ));
        }
        let rows = std::mem::take(&mut self.written.rows);
        match self.check(&rows, done).await {
            None => AtCommit::Free,
            Some(e) => {
                self.written.rows = rows;
                AtCommit::Held(e)
            }
        }
    }

    /// Checks `rows` against global locks held by other global transactions than the
    /// write's, waiting up to the lock timeout: `None` when they may commit, else the client's
    /// error (`done` says what became of the write).
    async fn check(&self, rows: &TableRows, done: &str) -> Option<ErrPacket> {
        if rows.is_empty() {
            return None;
        }
        let (m, global) = (&self.shared.metrics, self.global);
        match global.query_locks(self.xid, rows, global.lock_wait_ms).await {
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
}

/// What a checked write answers the client: `Ok(response)`, the statement ran (an autocommit
/// write was checked and committed too; a failed COMMIT's error is its response);
/// `Err(packet)`, an error instead (nothing of it stays, or its transaction may not commit).
pub type Answer = Result<Vec<u8>, Vec<u8>>;

/// Runs a write the proxy handles itself.
pub async fn run(cx: &mut Cx<'_>, write: Write, command: u8, raw: &[u8]) -> Result<Answer, SessionError> {
    match write {
        Write::Refuse(e) => Ok(Err(e.to_packet(1))),
        Write::Check(plan) => checked(cx, *plan, command, raw).await,
        Write::CheckMulti(plan) => checked_multi(cx, *plan, command, raw).await,
    }
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
        format!("ferrata-proxy cannot check {why} against the global locks of unfinished global transactions, so it was not run"),
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
) -> Result<Answer, SessionError> {
    let limit = cx.shared.config.max_packet_size;
    let Some(before) = autocommit else {
        for (table, keys) in rows {
            cx.written.rows.entry(table).or_default().extend(keys);
        }
        return Ok(Ok(response));
    };
    if let Some(e) = cx.check(&rows, "the statement was not run").await {
        local_rollback(cx.backend, cx.state, limit).await?;
        return Ok(Err(e.to_packet(1)));
    }
    // A failed COMMIT's error is the statement's answer too: nothing of it stays.
    backend::commit_own(cx.backend, cx.state, limit, response, before)
        .await
        .map(Ok)
}

/// A multi-table write touching a guarded table: the rows of every table it writes found
/// by the statement's own references and WHERE, before it runs.
async fn checked_multi(
    cx: &mut Cx<'_>,
    plan: dml::MultiChange,
    command: u8,
    raw: &[u8],
) -> Result<Answer, SessionError> {
    let limit = cx.shared.config.max_packet_size;
    let metas = match cx.global.tables(&plan.tables, cx.state.schema.as_deref()).await {
        Ok(metas) => metas,
        Err(e) => return Ok(Err(e.to_packet(1))),
    };
    let tables = match keys::written(&plan, &metas) {
        Ok(w) => w,
        Err(why) => return Ok(Err(refuse_check(&why))),
    };
    let params = match execute_params(command, raw, cx.state) {
        Ok(p) => p,
        Err(why) => return Ok(Err(refuse_check(&why))),
    };
    let Some(bound) = keys::select_params(&plan, &params) else {
        return Ok(Err(refuse_check("this execute (its parameters could not be read)")));
    };
    let autocommit = cx.state.autocommit() && !cx.state.in_transaction();
    let before = cx.state.status;
    if autocommit && let Err(e) = backend::begin_own(cx.backend, cx.state, limit).await? {
        return Ok(Err(e.to_packet(1)));
    }
    let mut rows = TableRows::new();
    // A table without a primary key can hold no global lock: nothing to find.
    for w in tables.iter().filter(|w| !w.meta.primary_key.is_empty()) {
        let list = qualified_select_list(&w.qualifier, &w.meta.key_specs());
        let sql = format!("SELECT {list}{} FOR UPDATE", plan.select_tail);
        let read = crate::sql::execute(cx.backend, cx.state, &sql, &bound, limit).await?;
        if let Some(e) = read.error {
            return backend::abort(cx.backend, cx.state, limit, autocommit, e)
                .await
                .map(Err);
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
        Err(refused) => return Ok(Err(refused)),
    };
    finish_checked(cx, rows, response, autocommit.then_some(before)).await
}

/// A write to a guarded table: its rows found and kept for the commit point (checked at
/// once for an autocommit write).
async fn checked(cx: &mut Cx<'_>, plan: dml::Plan, command: u8, raw: &[u8]) -> Result<Answer, SessionError> {
    let limit = cx.shared.config.max_packet_size;
    let table = match &plan {
        dml::Plan::Change(c) => &c.table,
        dml::Plan::Insert(i) => &i.table,
    };
    let Some(database) = table.schema.clone().or_else(|| cx.state.schema.clone()) else {
        return Ok(Err(no_database().to_packet(1)));
    };
    let meta = match cx.global.table(&database, &table.name).await {
        Ok(meta) => meta,
        Err(e) => return Ok(Err(e.to_packet(1))),
    };
    let params = match execute_params(command, raw, cx.state) {
        Ok(p) => p,
        Err(why) => return Ok(Err(refuse_check(&why))),
    };
    if let dml::Plan::Change(change) = &plan
        && let Some(column) = change.assigned.iter().find(|c| {
            meta.primary_key
                .iter()
                .any(|&i| meta.columns[i].name.eq_ignore_ascii_case(c))
        })
    {
        return Ok(Err(refuse_check(&format!(
            "an UPDATE of the primary-key column {column}"
        ))));
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
                Err(why) => return Ok(Err(refuse_check(&why))),
            }
        }
        dml::Plan::Insert(insert) => match keys::key_condition(insert, &meta, &params) {
            Ok(c) => key_condition = Some(c),
            Err(why) => return Ok(Err(refuse_check(&why))),
        },
        dml::Plan::Change(_) => {}
    }
    let autocommit = cx.state.autocommit() && !cx.state.in_transaction();
    let before = cx.state.status;
    let pk = meta.key_specs();
    let list = select_list(&pk);
    let qualified = qualified(&database, &meta.name);
    let abort = async |backend: &mut Peer, state: &mut SessionState, e: ErrPacket| {
        backend::abort(backend, state, limit, autocommit, e).await.map(Err)
    };
    // A table without a primary key can hold no global lock: nothing to find.
    let mut rows: Vec<Row> = Vec::new();
    if let (dml::Plan::Change(change), false) = (&plan, pk.is_empty()) {
        let found = keys::select_filtered(
            cx.backend, cx.state, change, &qualified, &list, &params, autocommit, limit,
        );
        match found.await? {
            Ok(found) => rows = found,
            Err(e) => return Ok(Err(e.to_packet(1))),
        }
    } else if autocommit && let Err(e) = backend::begin_own(cx.backend, cx.state, limit).await? {
        return Ok(Err(e.to_packet(1)));
    }
    let keyed = key_condition.map(|c| select_locked(&list, &qualified, &c));
    if let Some(keyed) = &keyed {
        let read = backend::query(cx.backend, cx.state, keyed, limit).await?;
        if let Some(e) = read.error {
            return abort(cx.backend, cx.state, e).await;
        }
        rows = read.rows;
    }
    let (response, summary) = match backend::run_client_statement(cx.backend, cx.state, limit, raw, autocommit).await? {
        Ok(done) => done,
        Err(refused) => return Ok(Err(refused)),
    };
    if let Some(keyed) = &keyed {
        let read = backend::query(cx.backend, cx.state, keyed, limit).await?;
        if let Some(e) = read.error {
            if !autocommit {
                cx.written.poisoned = Some(format!("{database}.{}", meta.name));
            }
            return abort(
                cx.backend,
                cx.state,
                e.prefixed("reading the written rows' keys failed: "),
            )
            .await;
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
        if let Some(e) = read.error {
            let e = e.prefixed("reading the inserted rows' keys failed: ");
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
