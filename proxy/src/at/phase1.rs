//! Phase 1 of AT mode on a session bound to a global transaction: an UPDATE, DELETE or
//! INSERT is imaged and run; its undo items join the session's pending branch.
//!
//! For one statement (`protect`):
//! 1. plan it (`sql::dml`): the table and the statement's own filter text;
//! 2. look up the table (`sql::metadata`): it needs a primary key and no triggers, and an
//!    UPDATE may not assign a primary-key column; the coordinator guards it first if this
//!    proxy's view does not show it guarded (`Global::guard_before_write`);
//! 3. an autocommit statement is wrapped in a local transaction of the proxy's own;
//! 4. before image: `SELECT <image columns> FROM <table> <filter> FOR UPDATE`, the rows
//!    locked in the database until the local transaction ends;
//! 5. the client's statement, forwarded as sent; its OK is held back;
//! 6. the image must cover every changed row (else the local transaction is rolled back and
//!    the statement refused); the after image is read by primary key;
//! 7. the undo item joins the session's pending branch; for autocommit the commit follows at
//!    once (`commit.rs`) and the client gets the statement's OK with autocommit status flags.
//!
//! Upserts (`upsert.rs`) and multi-table statements (`multi_table.rs`) take their own steps
//! 4 to 6 and end in [`finish`] too.

use super::undo::{self, UndoItem};
use super::{Cx, PendingBranch, commit};
use crate::coordinator::no_database;
use crate::coordinator::refusal::{self, not_protected as refuse};
use crate::protocol::err::ErrPacket;
use crate::protocol::execute::Param;
use crate::protocol::{Capabilities, Command, ServerStatus};
use crate::session::SessionError;
use crate::session::backend;
use crate::session::peer::Peer;
use crate::sql::dml::{self, ChangeKind};
use crate::sql::image::{ColumnSpec, ImageRow};
use crate::sql::keys::{self, InsertKeys};
use crate::sql::metadata::TableMeta;
use crate::sql::{self as text, pk_condition, qualified, select_locked};

/// Runs an UPDATE, DELETE or INSERT of a bound session with its images and answers the
/// client: a text query, or a prepared statement's execute with the parameters it binds.
/// The command packet is in `raw`.
pub async fn protect(client: &mut Peer, cx: &mut Cx<'_>, command: u8, raw: &[u8]) -> Result<(), SessionError> {
    let payload = &raw[4..];
    let (sql, params) = if command == Command::QUERY {
        (String::from_utf8_lossy(&payload[1..]).into_owned(), Vec::new())
    } else {
        let Some(stmt) = cx.state.statement(payload) else {
            return Ok(());
        };
        match stmt.bound_params(payload) {
            Some(params) => (stmt.sql.clone(), params),
            None => return backend::reply(client, refusal::unreadable_params(cx.xid)).await,
        }
    };
    let reply = protected(cx, &sql, &params, raw).await?;
    client.write_all(&reply).await.map_err(|_| SessionError::ClientClosed)
}

/// [`protect`], answering with the bytes the client is to get.
pub(super) async fn protected(
    cx: &mut Cx<'_>,
    sql: &str,
    params: &[Param],
    raw: &[u8],
) -> Result<Vec<u8>, SessionError> {
    Ok(match dml::plan_multi(sql) {
        Some(Ok(multi)) => super::multi_table::run(cx, multi, params, raw).await?,
        Some(Err(why)) => refuse(&why, cx.xid).to_packet(1),
        None => match prepare(cx, sql).await {
            Err(e) => e.to_packet(1),
            Ok(plan) => run(cx, plan, params, raw).await?,
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

async fn prepare(cx: &Cx<'_>, sql: &str) -> Result<Plan, ErrPacket> {
    let (state, xid) = (&*cx.state, cx.xid);
    let statement = dml::plan(sql).map_err(|why| refuse(&why, xid))?;
    let table = match &statement {
        dml::Plan::Change(c) => &c.table,
        dml::Plan::Insert(i) => &i.table,
    };
    let Some(schema) = table.schema.clone().or_else(|| state.schema.clone()) else {
        return Err(no_database());
    };
    if let Some(pending) = cx.branch.as_ref()
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
    let meta = cx.at.global.table(&schema, &table.name).await?;
    imageable(&schema, &meta, xid)?;
    cx.at.global.guard_before_write(xid, &[(&schema, &meta.name)]).await?;
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

async fn run(cx: &mut Cx<'_>, plan: Plan, params: &[Param], raw: &[u8]) -> Result<Vec<u8>, SessionError> {
    if let dml::Plan::Insert(insert) = &plan.statement
        && insert.mode != dml::InsertMode::Plain
    {
        return super::upsert::run(cx, plan, params, raw).await;
    }
    let Plan {
        statement,
        schema,
        meta,
        specs,
    } = plan;
    let keys = match &statement {
        dml::Plan::Insert(insert) => match keys::insert_keys(insert, &meta, params) {
            Ok(keys) => Some(keys),
            Err(why) => return Ok(refuse(&why, cx.xid).to_packet(1)),
        },
        dml::Plan::Change(_) => None,
    };
    // With autocommit off, the statement opens the local transaction itself.
    let autocommit = cx.state.autocommit() && !cx.state.in_transaction();
    let original_status = cx.state.status;
    let list = crate::sql::image::select_list(&specs);
    let qualified = qualified(&schema, &meta.name);
    let before: Vec<ImageRow> = match &statement {
        dml::Plan::Change(change) => {
            let read = keys::select_filtered(
                cx.backend, cx.state, change, &qualified, &list, params, autocommit, cx.limit,
            );
            match read.await? {
                Ok(rows) => rows.iter().map(text::text).collect(),
                Err(e) => return abort(cx, false, e).await,
            }
        }
        dml::Plan::Insert(_) => {
            if autocommit && let Err(e) = backend::begin_own(cx.backend, cx.state, cx.limit).await? {
                return Ok(e.to_packet(1));
            }
            Vec::new()
        }
    };

    // The after image is read by primary key. When the keys are known before the statement
    // runs, that read goes behind it in the same round trip, NOWAIT: should the statement
    // fail and end the transaction, the read then waits for no one, and it takes no lock
    // that outlives it (autocommit on; an INSERT's keys only in the proxy's own
    // transaction, which a failure rolls back, as they may be another transaction's rows).
    let early_condition = match (&statement, &keys) {
        (dml::Plan::Change(c), _) if c.kind == ChangeKind::Update && !before.is_empty() && cx.state.autocommit() => {
            Some(pk_condition(&meta, &specs, &before))
        }
        (_, Some(InsertKeys::Literal(rows))) if autocommit => Some(keys::literal_condition(&meta, rows)),
        _ => None,
    };
    let early = early_condition
        .as_ref()
        .map(|c| format!("{} NOWAIT", select_locked(&list, &qualified, c)));
    // The client's statement, as sent; its response (OK or ERR) is held back.
    let (ran, early_read) =
        backend::run_client_statement_then(cx.backend, cx.state, cx.limit, raw, autocommit, early.as_deref()).await?;
    let (response, summary) = match ran {
        Ok(done) => done,
        Err(refused) => return Ok(refused),
    };
    let affected = summary.map_or(0, |s| s.affected_rows);
    let found_rows = cx.state.capabilities.has(Capabilities::FOUND_ROWS);
    let (kind, expected) = match &statement {
        dml::Plan::Change(c) if c.kind == ChangeKind::Delete => (undo::Kind::Delete, affected == before.len() as u64),
        dml::Plan::Change(_) if found_rows => (undo::Kind::Update, affected == before.len() as u64),
        dml::Plan::Change(_) => (undo::Kind::Update, affected <= before.len() as u64),
        dml::Plan::Insert(i) => (undo::Kind::Insert, affected == i.rows.len() as u64),
    };
    if !expected {
        return miscounted(cx, affected, "").await;
    }
    let condition = match (&keys, kind) {
        _ if early_read.is_some() => None,
        (_, undo::Kind::Delete) => None,
        (_, undo::Kind::Update) if before.is_empty() => None,
        (_, undo::Kind::Update) => Some(pk_condition(&meta, &specs, &before)),
        (Some(keys), _) => Some(keys::insert_condition(cx.backend, cx.state, &meta, keys, summary, cx.limit).await?),
        (None, undo::Kind::Insert) => None,
    };
    let after = match (early_read, condition) {
        (Some(read), _) => after_rows(cx, read).await?,
        (None, Some(condition)) => after_image(cx, &list, &qualified, &condition).await?,
        (None, None) => Ok(Vec::new()),
    };
    let after = match after {
        Ok(rows) => rows,
        Err(answer) => return Ok(answer),
    };
    if kind == undo::Kind::Insert && after.len() as u64 != affected {
        let e = refuse(
            &format!(
                "this INSERT: {affected} rows were inserted but {} were found by their keys; the local transaction was rolled back",
                after.len()
            ),
            cx.xid,
        );
        return abort(cx, true, e).await;
    }
    let items = if before.is_empty() && after.is_empty() {
        Vec::new()
    } else {
        vec![undo_item(kind, &schema, &meta, &specs, before, after)]
    };
    finish(cx, &schema, items, response, autocommit.then_some(original_status)).await
}

/// The end of a protected statement: its undo items (checked) join the pending branch with
/// the rows they lock; an autocommit statement (`autocommit` holds the status before it)
/// commits at once and the client gets the statement's response with the status it would
/// have seen.
pub(super) async fn finish(
    cx: &mut Cx<'_>,
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
                cx.xid,
            );
            return abort(cx, true, e).await;
        }
    }
    if !items.is_empty() {
        let pending = cx.branch.get_or_insert_with(|| PendingBranch {
            xid: cx.xid.to_owned(),
            schema: schema.to_owned(),
            items: Vec::new(),
        });
        pending.items.extend(items);
    }
    if let Some(original_status) = autocommit {
        if let Err(e) = commit::commit_branch(cx, "COMMIT").await? {
            return Ok(e.to_packet(1));
        }
        // The client sent an autocommit statement: it sees the status it would have seen.
        backend::as_autocommit(&mut response, cx.state, original_status);
    }
    Ok(response)
}

/// Why a table's writes cannot be imaged, if they cannot: rows without a primary key cannot
/// be found again, and what triggers change is not in the images.
pub(super) fn imageable(schema: &str, meta: &TableMeta, xid: &str) -> Result<(), ErrPacket> {
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
    Ok(())
}

/// The undo item of a write to one table.
pub(super) fn undo_item(
    kind: undo::Kind,
    schema: &str,
    meta: &TableMeta,
    specs: &[ColumnSpec],
    before: Vec<ImageRow>,
    after: Vec<ImageRow>,
) -> UndoItem {
    UndoItem::new(kind, schema, &meta.name, specs, meta.primary_key.clone(), before, after)
}

/// The after image: the rows `condition` finds, read and locked as `list` says. If the read
/// fails the local transaction is rolled back and `Err` holds the client's answer.
pub(super) async fn after_image(
    cx: &mut Cx<'_>,
    list: &str,
    qualified: &str,
    condition: &str,
) -> Result<Result<Vec<ImageRow>, Vec<u8>>, SessionError> {
    let read = backend::query(
        cx.backend,
        cx.state,
        &select_locked(list, qualified, condition),
        cx.limit,
    )
    .await?;
    after_rows(cx, read).await
}

/// The after image's rows from its `read`; if the read failed the local transaction is
/// rolled back and `Err` holds the client's answer.
async fn after_rows(cx: &mut Cx<'_>, read: backend::Outcome) -> Result<Result<Vec<ImageRow>, Vec<u8>>, SessionError> {
    Ok(match read.error {
        Some(e) => Err(abort(cx, true, e.prefixed("reading the after image failed: ")).await?),
        None => Ok(read.rows.iter().map(text::text).collect()),
    })
}

/// The statement changed `affected` rows, which its images do not account for (`hint` says
/// why that may be): the local transaction is rolled back and the statement refused.
pub(super) async fn miscounted(cx: &mut Cx<'_>, affected: u64, hint: &str) -> Result<Vec<u8>, SessionError> {
    let e = refuse(
        &format!(
            "this statement: it changed {affected} rows, which its images do not account for{hint}; the local transaction was rolled back"
        ),
        cx.xid,
    );
    abort(cx, true, e).await
}

/// Rolls back (the whole local transaction with its pending branch, when `rollback`) and
/// answers with `e`.
pub(super) async fn abort(cx: &mut Cx<'_>, rollback: bool, e: ErrPacket) -> Result<Vec<u8>, SessionError> {
    if rollback {
        *cx.branch = None;
    }
    backend::abort(cx.backend, cx.state, cx.limit, rollback, e).await
}
