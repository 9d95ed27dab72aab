//! Phase 1 of AT mode on a session bound to a global transaction: an UPDATE, DELETE or
//! INSERT ... VALUES is imaged and run, and the local transaction's commit registers the branch and writes its
//! undo record first.
//!
//! For one statement (`protect`):
//! 1. plan it (`global::dml`): the table and the statement's own filter text;
//! 2. look up the table (`global::metadata`): it needs a primary key and no triggers, and an
//!    UPDATE may not assign a primary-key column;
//! 3. an autocommit statement is wrapped in a local transaction of the proxy's own;
//! 4. before image: `SELECT <image columns> FROM <table> <filter> FOR UPDATE`, the rows
//!    locked in the database until the local transaction ends;
//! 5. the client's statement, forwarded as sent; its OK is held back;
//! 6. the image must cover every changed row (else the local transaction is rolled back and
//!    the statement refused); the after image is read by primary key;
//! 7. the undo item joins the session's pending branch; for autocommit the commit follows at
//!    once and the client gets the statement's OK with autocommit status flags.
//!
//! At commit (`commit`): register the branch with its lock keys (waiting in the coordinator
//! up to `lock_wait_ms`), insert the undo record in the same local transaction, then commit.
//! Any failure rolls the local transaction back: nothing is half-written.

use super::peer::Peer;
use super::state::{PendingBranch, SessionState};
use super::{SessionError, Shared, inject};
use crate::global::dml::{self, ChangeKind};
use crate::global::metadata::TableMeta;
use crate::global::undo::{self, ColumnSpec, UndoItem, UndoRecord};
use crate::global::{Global, undo_log};
use crate::protocol::err::ErrPacket;
use crate::protocol::execute::{self, Param};
use crate::protocol::response::{PEEK, ResponseKind, ResponseTracker};
use crate::protocol::{Capabilities, ServerStatus, ok};

pub(super) use super::global::not_protected as refuse;

/// Upper-case hex digits of `bytes`, for an `X'...'` literal.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Quotes an image value (always ASCII: digits, hex, dates) as an SQL string literal.
pub(super) fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

pub(super) fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

pub(super) fn text(row: &inject::Row) -> Vec<Option<String>> {
    row.iter()
        .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
        .collect()
}

/// `(pk1, pk2) IN ((v, v), ...)` for the given image rows, with each value written back
/// through its column's encoding.
pub(super) fn pk_condition(meta: &TableMeta, specs: &[ColumnSpec], rows: &[Vec<Option<String>>]) -> String {
    let cols: Vec<String> = meta.primary_key.iter().map(|&i| ident(&meta.columns[i].name)).collect();
    let tuples: Vec<String> = rows
        .iter()
        .map(|row| {
            let values: Vec<String> = meta
                .primary_key
                .iter()
                .map(|&i| match &row[i] {
                    Some(v) => undo::write_expr(undo::encoding(&specs[i].data_type)).replace('?', &literal(v)),
                    None => "NULL".into(),
                })
                .collect();
            format!("({})", values.join(", "))
        })
        .collect();
    format!("({}) IN ({})", cols.join(", "), tuples.join(", "))
}

/// Runs an UPDATE, DELETE or INSERT of a bound session with its images: a text query, or a
/// prepared statement's execute with its bound `params`. The command packet is in `raw`;
/// the client gets the statement's OK or an error.
#[allow(clippy::too_many_arguments)]
pub async fn protect(
    client: &mut Peer,
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    global: &Global,
    xid: &str,
    sql: &str,
    params: &[Param],
    raw: &[u8],
) -> Result<(), SessionError> {
    let reply = protected(backend, state, shared, global, xid, sql, params, raw).await?;
    client.write_all(&reply).await.map_err(|_| SessionError::ClientClosed)
}

/// [`protect`], answering with the bytes the client is to get.
#[allow(clippy::too_many_arguments)]
pub(super) async fn protected(
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    global: &Global,
    xid: &str,
    sql: &str,
    params: &[Param],
    raw: &[u8],
) -> Result<Vec<u8>, SessionError> {
    Ok(match dml::plan_multi(sql) {
        Some(Ok(multi)) => super::multi_table::run(backend, state, shared, global, xid, multi, params, raw).await?,
        Some(Err(why)) => refuse(&why, xid).to_packet(1),
        None => match prepare(state, global, xid, sql).await {
            Err(e) => e.to_packet(1),
            Ok(plan) => run(backend, state, shared, global, xid, plan, params, raw).await?,
        },
    })
}

/// What steps 1 and 2 found.
pub(super) struct Plan {
    pub statement: dml::Plan,
    pub schema: String,
    pub meta: std::sync::Arc<TableMeta>,
    pub specs: Vec<ColumnSpec>,
}

async fn prepare(state: &SessionState, global: &Global, xid: &str, sql: &str) -> Result<Plan, ErrPacket> {
    let statement = dml::plan(sql).map_err(|why| refuse(&why, xid))?;
    let table = match &statement {
        dml::Plan::Change(c) => &c.table,
        dml::Plan::Insert(i) => &i.table,
    };
    let Some(schema) = table.schema.clone().or_else(|| state.schema.clone()) else {
        return Err(ErrPacket::new(1046, "3D000", "No database selected"));
    };
    if let Some(pending) = &state.branch
        && pending.schema != schema
    {
        return Err(refuse(
            &format!(
                "a write to database {schema} in a local transaction that already wrote to {}",
                pending.schema
            ),
            xid,
        ));
    }
    let meta = global.table(&schema, &table.name).await?;
    if meta.primary_key.is_empty() {
        return Err(refuse(
            &format!("a write to {schema}.{}, which has no primary key", meta.name),
            xid,
        ));
    }
    if meta.has_triggers {
        return Err(refuse(
            &format!(
                "a write to {schema}.{}, which has triggers (their changes cannot be imaged)",
                meta.name
            ),
            xid,
        ));
    }
    if let dml::Plan::Change(change) = &statement {
        for column in &change.assigned {
            if meta
                .primary_key
                .iter()
                .any(|&i| meta.columns[i].name.eq_ignore_ascii_case(column))
            {
                return Err(refuse(&format!("an UPDATE of the primary-key column {column}"), xid));
            }
        }
    }
    let specs = meta.specs();
    Ok(Plan {
        statement,
        schema,
        meta,
        specs,
    })
}

/// Where the primary keys of an INSERT's rows come from.
pub(super) enum InsertKeys {
    /// Every row names its key as literals: the source text of each, per row.
    Literal(Vec<Vec<String>>),
    /// The server generates the single AUTO_INCREMENT key of every row.
    Generated,
}

/// A value the proxy may use as written to find the row again: a number or a string literal.
fn is_literal(text: &str) -> bool {
    let t = text.trim();
    let number = t.trim_start_matches(['-', '+']);
    (!number.is_empty()
        && number
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' || c == '-' || c == '+'))
        || ((t.starts_with('\'') || t.starts_with('"')) && t.len() >= 2)
        || ((t.starts_with("x'") || t.starts_with("X'")) && t.ends_with('\''))
}

/// `?` placeholders in a value's source text.
fn placeholders(text: &str) -> usize {
    sqlparser::tokenizer::Tokenizer::new(&sqlparser::dialect::MySqlDialect {}, text)
        .tokenize()
        .map_or(0, |t| {
            t.iter()
                .filter(|t| matches!(t, sqlparser::tokenizer::Token::Placeholder(p) if p == "?"))
                .count()
        })
}

/// Each row's value text for every column of the table, in table order: `None` where the
/// statement leaves the column to its default. A `?` stands for its bound parameter, written
/// as a literal (left as `?` when the parameter's type cannot name a row).
pub(super) fn row_values(
    insert: &dml::Insert,
    meta: &TableMeta,
    params: &[Param],
) -> Result<Vec<Vec<Option<String>>>, String> {
    let position = |column: usize| -> Option<usize> {
        if insert.columns.is_empty() {
            Some(column)
        } else {
            insert
                .columns
                .iter()
                .position(|c| c.eq_ignore_ascii_case(&meta.columns[column].name))
        }
    };
    let mut rows = Vec::with_capacity(insert.rows.len());
    let mut next_param = 0;
    for row in &insert.rows {
        if !insert.columns.is_empty() && row.len() != insert.columns.len() {
            return Err("an INSERT whose rows do not match its column list".into());
        }
        let mut texts = Vec::with_capacity(row.len());
        for value in row {
            let bound = match value.as_deref() {
                Some("?") => params.get(next_param).and_then(execute::literal),
                _ => None,
            };
            next_param += value.as_deref().map_or(0, placeholders);
            texts.push(bound.or_else(|| value.clone()));
        }
        rows.push(
            (0..meta.columns.len())
                .map(|c| position(c).and_then(|p| texts.get(p).cloned().flatten()))
                .collect(),
        );
    }
    Ok(rows)
}

/// The AUTO_INCREMENT primary-key column, when the key is that one column.
pub(super) fn generated_key(meta: &TableMeta) -> Option<usize> {
    match meta.primary_key.as_slice() {
        [only] if meta.columns[*only].auto_increment => Some(*only),
        _ => None,
    }
}

/// A key value as written: `None` when the server generates it (AUTO_INCREMENT given no
/// value, NULL or 0).
pub(super) fn key_value(meta: &TableMeta, column: usize, value: Option<&str>) -> Result<Option<String>, String> {
    let generated = generated_key(meta) == Some(column);
    match value {
        Some(v) if generated && (v.eq_ignore_ascii_case("NULL") || v.trim() == "0") => Ok(None),
        Some("?") => Err(format!(
            "a write whose key column {} is bound as a parameter of a type that cannot name a row (bind an integer or a string)",
            meta.columns[column].name
        )),
        Some(v) if is_literal(v) => Ok(Some(v.to_owned())),
        Some(_) => Err(format!(
            "a write whose values for the key column {} are expressions (use literals, or let AUTO_INCREMENT assign it)",
            meta.columns[column].name
        )),
        None if generated => Ok(None),
        None => Err(format!(
            "a write that leaves the key column {} to its default",
            meta.columns[column].name
        )),
    }
}

pub(super) fn insert_keys(insert: &dml::Insert, meta: &TableMeta, params: &[Param]) -> Result<InsertKeys, String> {
    let mut literal = Vec::with_capacity(insert.rows.len());
    let mut generated = 0;
    for row in row_values(insert, meta, params)? {
        let mut key = Vec::new();
        for &column in &meta.primary_key {
            if let Some(v) = key_value(meta, column, row[column].as_deref())? {
                key.push(v);
            }
        }
        if key.is_empty() {
            generated += 1;
        } else {
            literal.push(key);
        }
    }
    match (literal.len(), generated) {
        (_, 0) => Ok(InsertKeys::Literal(literal)),
        (0, _) => Ok(InsertKeys::Generated),
        _ => Err("an INSERT that mixes given and AUTO_INCREMENT primary keys".into()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    global: &Global,
    xid: &str,
    plan: Plan,
    params: &[Param],
    raw: &[u8],
) -> Result<Vec<u8>, SessionError> {
    let limit = shared.config.max_packet_size;
    if let dml::Plan::Insert(insert) = &plan.statement
        && insert.mode != dml::InsertMode::Plain
    {
        return super::upsert::run(backend, state, shared, global, xid, plan, params, raw).await;
    }
    let Plan {
        statement,
        schema,
        meta,
        specs,
    } = plan;
    let keys = match &statement {
        dml::Plan::Insert(insert) => match insert_keys(insert, &meta, params) {
            Ok(keys) => Some(keys),
            Err(why) => return Ok(refuse(&why, xid).to_packet(1)),
        },
        dml::Plan::Change(_) => None,
    };
    // With autocommit off, the statement opens the local transaction itself.
    let autocommit = state.autocommit() && !state.in_transaction();
    let original_status = state.status;
    if autocommit && let Err(e) = begin_own(backend, state, limit).await? {
        return Ok(e.to_packet(1));
    }
    let list = undo::select_list(&specs);
    let qualified = format!("{}.{}", ident(&schema), ident(&meta.name));
    let before: Vec<Vec<Option<String>>> = match &statement {
        dml::Plan::Change(change) => {
            match select_filtered(backend, state, change, &qualified, &list, params, limit).await? {
                Ok(rows) => rows.iter().map(text).collect(),
                Err(e) => return abort(backend, state, limit, autocommit, e).await,
            }
        }
        dml::Plan::Insert(_) => Vec::new(),
    };

    // The client's statement, as sent; its response (OK or ERR) is held back.
    let (response, summary) = match run_client_statement(backend, state, limit, raw, autocommit).await? {
        Ok(done) => done,
        Err(refused) => return Ok(refused),
    };
    let affected = summary.map_or(0, |s| s.affected_rows);
    let found_rows = state.capabilities.has(Capabilities::FOUND_ROWS);
    let (kind, expected) = match &statement {
        dml::Plan::Change(c) if c.kind == ChangeKind::Delete => (undo::Kind::Delete, affected == before.len() as u64),
        dml::Plan::Change(_) if found_rows => (undo::Kind::Update, affected == before.len() as u64),
        dml::Plan::Change(_) => (undo::Kind::Update, affected <= before.len() as u64),
        dml::Plan::Insert(i) => (undo::Kind::Insert, affected == i.rows.len() as u64),
    };
    if !expected {
        let e = refuse(
            &format!(
                "this statement: it changed {affected} rows, which its images do not account for; the local transaction was rolled back"
            ),
            xid,
        );
        return abort(backend, state, limit, true, e).await;
    }
    // The after image, by primary key.
    let condition = match (&keys, kind) {
        (_, undo::Kind::Delete) => None,
        (_, undo::Kind::Update) if before.is_empty() => None,
        (_, undo::Kind::Update) => Some(pk_condition(&meta, &specs, &before)),
        (Some(keys @ InsertKeys::Literal(_)), _) => {
            Some(insert_condition(backend, state, &meta, keys, summary, limit).await?)
        }
        (Some(keys @ InsertKeys::Generated), _) => {
            Some(insert_condition(backend, state, &meta, keys, summary, limit).await?)
        }
        (None, undo::Kind::Insert) => None,
    };
    let after: Vec<Vec<Option<String>>> = match condition {
        None => Vec::new(),
        Some(condition) => {
            let read = inject::query(backend, state, &select_locked(&list, &qualified, &condition), limit).await?;
            if let Some((code, message)) = read.error {
                let e = ErrPacket::new(code, "HY000", format!("reading the after image failed: {message}"));
                return abort(backend, state, limit, true, e).await;
            }
            read.rows.iter().map(text).collect()
        }
    };
    if kind == undo::Kind::Insert && after.len() as u64 != affected {
        let e = refuse(
            &format!(
                "this INSERT: {affected} rows were inserted but {} were found by their keys; the local transaction was rolled back",
                after.len()
            ),
            xid,
        );
        return abort(backend, state, limit, true, e).await;
    }
    let items = if before.is_empty() && after.is_empty() {
        Vec::new()
    } else {
        vec![UndoItem::new(
            kind,
            &schema,
            &meta.name,
            &specs,
            meta.primary_key.clone(),
            before,
            after,
        )]
    };
    finish(
        backend,
        state,
        global,
        limit,
        xid,
        &schema,
        items,
        response,
        autocommit.then_some(original_status),
    )
    .await
}

/// The end of a protected statement: its undo items (checked) join the pending branch with
/// the rows they lock; an autocommit statement (`autocommit` holds the status before it)
/// commits at once and the client gets the statement's response with the status it would
/// have seen.
#[allow(clippy::too_many_arguments)]
pub(super) async fn finish(
    backend: &mut Peer,
    state: &mut SessionState,
    global: &Global,
    limit: usize,
    xid: &str,
    schema: &str,
    items: Vec<UndoItem>,
    mut response: Vec<u8>,
    autocommit: Option<ServerStatus>,
) -> Result<Vec<u8>, SessionError> {
    for item in &items {
        if let Err(e) = item.validate() {
            let e = refuse(
                &format!(
                    "this statement: its images cannot be stored exactly ({e}); the local transaction was rolled back"
                ),
                xid,
            );
            return abort(backend, state, limit, true, e).await;
        }
    }
    if !items.is_empty() {
        let pending = state.branch.get_or_insert_with(|| PendingBranch {
            xid: xid.to_owned(),
            schema: schema.to_owned(),
            items: Vec::new(),
        });
        pending.items.extend(items);
    }
    if let Some(original_status) = autocommit {
        if let Err(e) = commit_branch(backend, state, global, limit, "COMMIT").await? {
            return Ok(e.to_packet(1));
        }
        // The client sent an autocommit statement: it sees the status it would have seen.
        as_autocommit(&mut response, state, original_status);
    }
    Ok(response)
}

/// `SELECT <list> FROM <qualified> WHERE <condition> FOR UPDATE`: rows found by key, locked.
pub(super) fn select_locked(list: &str, qualified: &str, condition: &str) -> String {
    format!("SELECT {list} FROM {qualified} WHERE {condition} FOR UPDATE")
}

/// Opens the proxy's own local transaction around an autocommit statement; the server's
/// refusal is the client's answer.
pub(super) async fn begin_own(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
) -> Result<Result<(), ErrPacket>, SessionError> {
    let begun = inject::query(backend, state, "START TRANSACTION", limit).await?;
    Ok(match begun.error {
        Some((code, message)) => Err(ErrPacket::new(code, "HY000", message)),
        None => Ok(()),
    })
}

/// Sends the client's statement as it is and reads its whole response, held back. A
/// statement the server refused comes back as `Err(its response)`, the proxy's own
/// transaction (if `own`) rolled back.
pub(super) async fn run_client_statement(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
    raw: &[u8],
    own: bool,
) -> Result<Result<(Vec<u8>, Option<ok::OkSummary>), Vec<u8>>, SessionError> {
    backend
        .write_all(raw)
        .await
        .map_err(|e| SessionError::backend_lost(&e.to_string(), 0))?;
    let (response, summary, failed) = read_response(backend, state, limit).await?;
    if failed {
        if own {
            super::global::local_rollback(backend, state, limit).await?;
        }
        return Ok(Err(response));
    }
    Ok(Ok((response, summary)))
}

/// Makes a response read inside the proxy's own transaction look as the client's autocommit
/// statement's would have: no transaction open, autocommit as it was (`before`).
pub(super) fn as_autocommit(response: &mut [u8], state: &SessionState, before: ServerStatus) {
    let status = ServerStatus((state.status.0 & !ServerStatus::IN_TRANS) | (before.0 & ServerStatus::AUTOCOMMIT));
    ok::set_response_status(response, ServerStatus::IN_TRANS | ServerStatus::AUTOCOMMIT, status);
}

/// Runs `SELECT <list> FROM <qualified> <the statement's filter> FOR UPDATE`, the filter's
/// own placeholders taking the client's values for them: the rows an UPDATE or DELETE will
/// change, locked in the database until the local transaction ends. The server's error (or
/// missing parameters) comes back as the client's answer.
pub(super) async fn select_filtered(
    backend: &mut Peer,
    state: &mut SessionState,
    change: &dml::Change,
    qualified: &str,
    list: &str,
    params: &[Param],
    limit: usize,
) -> Result<Result<Vec<inject::Row>, ErrPacket>, SessionError> {
    let alias = change
        .table
        .alias
        .as_deref()
        .map(|a| format!(" AS {}", ident(a)))
        .unwrap_or_default();
    let sql = format!("SELECT {list} FROM {qualified}{alias}{} FOR UPDATE", change.filter);
    let Some(bound) = params.get(change.filter_params.clone()) else {
        return Ok(Err(ErrPacket::new(
            1210,
            "HY000",
            "Incorrect arguments to EXECUTE: ferrata-proxy could not read the statement's parameters",
        )));
    };
    let read = inject::execute(backend, state, &sql, bound, limit).await?;
    Ok(match read.error {
        Some((code, message)) => Err(ErrPacket::new(code, "HY000", message)),
        None => Ok(read.rows),
    })
}

/// The condition that finds an INSERT's rows by primary key once it ran: its literal keys,
/// or the AUTO_INCREMENT values the server reported (`summary`) at the session's increment.
pub(super) async fn insert_condition(
    backend: &mut Peer,
    state: &mut SessionState,
    meta: &TableMeta,
    keys: &InsertKeys,
    summary: Option<ok::OkSummary>,
    limit: usize,
) -> Result<String, SessionError> {
    Ok(match keys {
        InsertKeys::Literal(rows) => {
            let cols: Vec<String> = meta.primary_key.iter().map(|&i| ident(&meta.columns[i].name)).collect();
            let tuples: Vec<String> = rows.iter().map(|r| format!("({})", r.join(", "))).collect();
            format!("({}) IN ({})", cols.join(", "), tuples.join(", "))
        }
        InsertKeys::Generated => {
            let first = summary.map_or(0, |s| s.last_insert_id);
            let affected = summary.map_or(0, |s| s.affected_rows);
            let step = inject::query(backend, state, "SELECT @@auto_increment_increment", limit).await?;
            let step: u64 = step
                .rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .and_then(|v| String::from_utf8_lossy(&v).parse().ok())
                .unwrap_or(1);
            let ids: Vec<String> = (0..affected).map(|n| (first + n * step).to_string()).collect();
            format!(
                "{} IN ({})",
                ident(&meta.columns[meta.primary_key[0]].name),
                ids.join(", ")
            )
        }
    })
}

/// Rolls back (the whole local transaction, when `rollback`) and answers with `e`.
pub(super) async fn abort(
    backend: &mut Peer,
    state: &mut SessionState,
    limit: usize,
    rollback: bool,
    e: ErrPacket,
) -> Result<Vec<u8>, SessionError> {
    if rollback {
        super::global::local_rollback(backend, state, limit).await?;
    }
    Ok(e.to_packet(1))
}

/// Reads one OK/ERR response of a forwarded DML statement, whole.
pub(super) async fn read_response(
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
            Ok(crate::protocol::response::Step::More) | Ok(crate::protocol::response::Step::Done) => {}
            Ok(_) => {
                return Err(SessionError::backend_protocol(
                    "a DML statement asked for a local file",
                    tracker.last_seq(),
                ));
            }
            Err(v) => return Err(SessionError::backend_protocol(&v.0, tracker.last_seq())),
        }
    }
    if let Some(status) = tracker.last_status() {
        state.status = status;
    }
    Ok((bytes, tracker.last_ok(), tracker.error_code().is_some()))
}

/// Registers the pending branch, writes its undo record and runs `commit_sql` (the client's
/// COMMIT, or the proxy's own for a wrapped autocommit statement). On failure the local
/// transaction is rolled back and the error says why.
pub async fn commit_branch(
    backend: &mut Peer,
    state: &mut SessionState,
    global: &Global,
    limit: usize,
    commit_sql: &str,
) -> Result<Result<Vec<u8>, ErrPacket>, SessionError> {
    let Some(pending) = state.branch.take() else {
        let done = inject::query(backend, state, commit_sql, limit).await?;
        return Ok(match done.error {
            Some((code, message)) => Err(ErrPacket::new(code, "HY000", message)),
            None => Ok(Vec::new()),
        });
    };
    let resource = global.resource(&pending.schema);
    global.link.serve(&resource);
    let branch_id = match global.register(&pending.xid, &resource, pending.locks()).await {
        Ok(id) => id,
        Err(e) => {
            super::global::local_rollback(backend, state, limit).await?;
            return Ok(Err(e));
        }
    };
    let record = UndoRecord::new(pending.items).to_bytes();
    if let Err(e) = global.ensure_undo_log(&resource).await {
        super::global::local_rollback(backend, state, limit).await?;
        global.report_failed(&pending.xid, branch_id, &e).await;
        return Ok(Err(ErrPacket::new(1105, "HY000", e)));
    }
    // Pieces small enough for one packet each (hex doubles the size on the wire).
    let piece = global.undo_chunk_bytes().await;
    let pieces: Vec<&[u8]> = if record.is_empty() {
        vec![&record[..]]
    } else {
        record.chunks(piece).collect()
    };
    let rows: Vec<String> = pieces
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let hex = hex(bytes);
            let (xid, context, status) = if i == 0 {
                (pending.xid.clone(), undo_log::context(pieces.len()), undo_log::STATUS_NORMAL)
            } else {
                (undo_log::chunk_xid(&pending.xid, i + 1), undo_log::CONTEXT.to_owned(), undo_log::STATUS_CHUNK)
            };
            format!(
                "INSERT INTO {}.undo_log (branch_id, xid, context, rollback_info, log_status, log_created, log_modified) \
                 VALUES ({branch_id}, {}, {}, X'{hex}', {status}, NOW(6), NOW(6))",
                ident(&pending.schema),
                literal(&xid),
                literal(&context),
            )
        })
        .collect();
    let mut written = inject::Outcome::default();
    for insert in &rows {
        written = inject::query(backend, state, insert, limit).await?;
        if written.error.is_some() {
            break;
        }
    }
    if let Some((code, message)) = written.error {
        super::global::local_rollback(backend, state, limit).await?;
        let why = if code == 1062 {
            format!(
                "global transaction {} already rolled this branch back (it was too slow to commit)",
                pending.xid
            )
        } else {
            format!("writing the undo record failed: {message}")
        };
        global.report_failed(&pending.xid, branch_id, &why).await;
        return Ok(Err(ErrPacket::new(
            1399,
            "XAE07",
            format!("XAER_RMFAIL: {why}; the local transaction was rolled back"),
        )));
    }
    let committed = inject::query(backend, state, commit_sql, limit).await?;
    if let Some((code, message)) = committed.error {
        global.report_failed(&pending.xid, branch_id, &message).await;
        return Ok(Err(ErrPacket::new(code, "HY000", message)));
    }
    tracing::info!(xid = pending.xid, branch_id, resource, "branch committed");
    Ok(Ok(Vec::new()))
}

/// The client's COMMIT in a session with a pending branch: the branch is registered and its
/// undo record written first; the client gets the COMMIT's OK or the error.
pub async fn commit(
    client: &mut Peer,
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    global: &Global,
    sql: &str,
) -> Result<(), SessionError> {
    let reply = match commit_branch(backend, state, global, shared.config.max_packet_size, sql).await? {
        Ok(_) => crate::protocol::resultset::ok(state.status),
        Err(e) => e.to_packet(1),
    };
    client.write_all(&reply).await.map_err(|_| SessionError::ClientClosed)
}
