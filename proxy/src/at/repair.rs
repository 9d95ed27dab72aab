//! An operator's repair of a branch whose rollback found rows changed outside the global
//! transaction (a dirty rollback), run on the branch's database for the coordinator:
//!
//! * **inspect**: every row the branch's undo record names, as it is now (a consistent read
//!   that locks nothing), with its before and after image, each column's type, a state and a
//!   digest of what was read;
//! * **accept**: keep the current values of some rows (or all): drop them from the record;
//! * **restore**: write the before image of some rows over their current values, check it
//!   reads back exactly, then drop them from the record;
//! * **discard**: delete what is left of the record (resolving by hand).
//!
//! A change runs in one local transaction: the record's main row locked, every named row
//! locked and its digest compared with the one the operator saw (a row changed since is
//! refused with `precondition_failed` and its fresh state), the data and the record changed,
//! and a row inserted into `ferrata_audit` saying who did what, why, and which values were
//! overwritten. A dry run does all of it and rolls back.
//!
//! A *row* is a primary key of one table across the record's items: its before image is the
//! first item's (the value before the global transaction), its after image the last item's.
//! Its id, `["schema","table",["key",...]]`, is what the coordinator and the operator pass back.

use std::collections::{BTreeMap, BTreeSet};

use ferrata_rpc::pb;
use mysql_async::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::At;
use super::phase2::current_rows;
use super::undo::{self, ImageColumn, Kind, Lock, UndoItem, UndoRecord};
use super::undo_log::{self, read_record};
use crate::coordinator::database_of;
use crate::coordinator::undo_table::{self, STATUS_NORMAL};
use crate::sql::image::{Encoding, ImageRow, RawRow};

/// The table a change writes its record into, next to `undo_log`.
pub const AUDIT_CREATE: &str = "CREATE TABLE IF NOT EXISTS ferrata_audit (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  action_id VARCHAR(64) NOT NULL COMMENT 'the coordinator audit record names the same id',
  at DATETIME(6) NOT NULL COMMENT 'UTC',
  actor VARCHAR(128) NOT NULL COMMENT 'token name at the coordinator',
  role VARCHAR(32) NOT NULL,
  action VARCHAR(32) NOT NULL COMMENT 'accept, restore or discard',
  xid VARCHAR(128) NOT NULL,
  branch_id BIGINT NOT NULL,
  reason TEXT NOT NULL,
  detail LONGTEXT NOT NULL COMMENT 'JSON: rows with before, after and current values; statements run',
  UNIQUE KEY ux_ferrata_audit (action_id)
) ENGINE=InnoDB COMMENT='Ferrata: what operators did to this database and why'";

/// Why a repair was refused: a code (`precondition_failed`, `not_found`, `invalid_argument`,
/// `reason_required`, or `repair_failed` for anything the database did not allow) and a
/// sentence; for a precondition, the rows as they are now.
#[derive(Debug)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    pub fresh: Value,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            fresh: Value::Null,
        }
    }
}

impl From<mysql_async::Error> for Refusal {
    fn from(e: mysql_async::Error) -> Refusal {
        Refusal::new("repair_failed", format!("the database refused: {e}"))
    }
}

/// One row of a branch across the items that touched it.
#[derive(Clone, Debug)]
struct BranchRow {
    id: String,
    schema: String,
    table: String,
    key: Vec<String>,
    /// The last item's columns and key (what the row is read with).
    columns: Vec<ImageColumn>,
    primary_key: Vec<usize>,
    before: Option<ImageRow>,
    after: Option<ImageRow>,
}

fn key_of(primary_key: &[usize], row: &ImageRow) -> Vec<String> {
    primary_key
        .iter()
        .map(|&i| row.get(i).cloned().flatten().unwrap_or_default())
        .collect()
}

/// The record's rows, in the order they were first written.
fn rows_of(record: &UndoRecord) -> Vec<BranchRow> {
    let mut rows: Vec<BranchRow> = Vec::new();
    let mut index: BTreeMap<(String, String, Vec<String>), usize> = BTreeMap::new();
    for item in &record.items {
        let mut touched: BTreeSet<Vec<String>> = BTreeSet::new();
        let before: BTreeMap<Vec<String>, &ImageRow> =
            item.before.iter().map(|r| (key_of(&item.primary_key, r), r)).collect();
        let after: BTreeMap<Vec<String>, &ImageRow> =
            item.after.iter().map(|r| (key_of(&item.primary_key, r), r)).collect();
        touched.extend(before.keys().cloned());
        touched.extend(after.keys().cloned());
        for key in touched {
            let slot = (item.schema.clone(), item.table.clone(), key.clone());
            let i = *index.entry(slot).or_insert_with(|| {
                rows.push(BranchRow {
                    id: json!([item.schema, item.table, key]).to_string(),
                    schema: item.schema.clone(),
                    table: item.table.clone(),
                    key: key.clone(),
                    columns: item.columns.clone(),
                    primary_key: item.primary_key.clone(),
                    // The value before the global transaction: the first item's.
                    before: before.get(&key).map(|r| (*r).clone()),
                    after: None,
                });
                rows.len() - 1
            });
            let row = &mut rows[i];
            row.columns = item.columns.clone();
            row.primary_key = item.primary_key.clone();
            row.after = after.get(&key).map(|r| (*r).clone());
        }
    }
    rows
}

/// An item that reads `rows` (of one table) by key.
fn probe(rows: &[&BranchRow]) -> UndoItem {
    let first = rows[0];
    let before = rows
        .iter()
        .map(|r| {
            let mut image: ImageRow = vec![None; r.columns.len()];
            for (n, &i) in r.primary_key.iter().enumerate() {
                image[i] = Some(r.key[n].clone());
            }
            image
        })
        .collect();
    UndoItem {
        kind: Kind::Delete,
        schema: first.schema.clone(),
        table: first.table.clone(),
        columns: first.columns.clone(),
        primary_key: first.primary_key.clone(),
        before,
        after: Vec::new(),
    }
}

fn text_row(raw: &RawRow) -> ImageRow {
    raw.iter()
        .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
        .collect()
}

/// The rows as they are now, by row id (`None`: the table has no such row).
async fn read_current(
    tx: &mut mysql_async::Transaction<'_>,
    rows: &[&BranchRow],
    lock: Lock,
) -> Result<BTreeMap<String, Option<ImageRow>>, mysql_async::Error> {
    let mut by_table: BTreeMap<(&str, &str), Vec<&BranchRow>> = BTreeMap::new();
    for r in rows {
        by_table.entry((&r.schema, &r.table)).or_default().push(r);
    }
    let mut out = BTreeMap::new();
    for group in by_table.values() {
        let probe = probe(group);
        let found: Vec<ImageRow> = current_rows(tx, &probe, lock).await?.iter().map(text_row).collect();
        for r in group {
            let current = found
                .iter()
                .find(|c| c.len() == r.columns.len() && key_of(&r.primary_key, c) == r.key)
                .cloned();
            out.insert(r.id.clone(), current);
        }
    }
    Ok(out)
}

/// What was read of a row, hashed: equal digests mean the operator saw these values.
fn digest(row: &BranchRow, current: &Option<ImageRow>) -> String {
    let bytes = serde_json::to_vec(&json!([row.id, current])).expect("JSON of strings");
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of a whole branch: of its rows' ids and digests, in row order.
fn branch_digest(rows: &[(&BranchRow, String)]) -> String {
    let all: Vec<(&str, &str)> = rows.iter().map(|(r, d)| (r.id.as_str(), d.as_str())).collect();
    let bytes = serde_json::to_vec(&all).expect("JSON of strings");
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `clean`: as the branch left it (a rollback restores it); `restored`: already the before
/// image; `changed`, `missing` (the branch left a row the table no longer has) or
/// `unexpected` (the branch deleted it, or never had it, and the table has it): dirty.
fn state(row: &BranchRow, current: &Option<ImageRow>) -> &'static str {
    if *current == row.after {
        "clean"
    } else if *current == row.before {
        "restored"
    } else if current.is_none() {
        "missing"
    } else if row.after.is_none() {
        "unexpected"
    } else {
        "changed"
    }
}

fn is_dirty(state: &str) -> bool {
    !matches!(state, "clean" | "restored")
}

/// Each column's declared type, by (schema, table), for people reading values.
async fn column_types(
    tx: &mut mysql_async::Transaction<'_>,
    rows: &[BranchRow],
) -> Result<BTreeMap<(String, String), BTreeMap<String, String>>, mysql_async::Error> {
    let tables: BTreeSet<(String, String)> = rows.iter().map(|r| (r.schema.clone(), r.table.clone())).collect();
    let mut out = BTreeMap::new();
    for (schema, table) in tables {
        let types = column_types_of(tx, &schema, &table).await?;
        out.insert((schema, table), types);
    }
    Ok(out)
}

/// The declared type (`COLUMN_TYPE`, e.g. `decimal(10,2)`) of each column of a table.
pub async fn column_types_of<Q: Queryable>(
    q: &mut Q,
    schema: &str,
    table: &str,
) -> Result<BTreeMap<String, String>, mysql_async::Error> {
    let types: Vec<(String, String)> = q
        .exec(
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (schema, table),
        )
        .await?;
    Ok(types.into_iter().collect())
}

type Types = BTreeMap<(String, String), BTreeMap<String, String>>;

fn row_json(row: &BranchRow, current: &Option<ImageRow>, types: &Types) -> Value {
    let value = |image: &Option<ImageRow>, i: usize| match image {
        None => Value::Null,
        Some(r) => r.get(i).cloned().flatten().map_or(Value::Null, Value::String),
    };
    let present = |image: &Option<ImageRow>| image.is_some();
    let table_types = types.get(&(row.schema.clone(), row.table.clone()));
    let columns: Vec<Value> = row
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let differs = value(current, i) != value(&row.after, i) || present(current) != present(&row.after);
            let (before, after, now) = (value(&row.before, i), value(&row.after, i), value(current, i));
            json!({
                "column": c.name,
                "type": table_types.and_then(|t| t.get(&c.name)),
                "encoding": c.encoding,
                "display": {
                    "before": display(c.encoding, &before),
                    "after": display(c.encoding, &after),
                    "current": display(c.encoding, &now),
                },
                "before": before,
                "after": after,
                "current": now,
                "differs": differs,
            })
        })
        .collect();
    let primary_key: serde_json::Map<String, Value> = row
        .primary_key
        .iter()
        .zip(&row.key)
        .map(|(&i, v)| (row.columns[i].name.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "row": row.id,
        "schema": row.schema,
        "table": row.table,
        "primary_key": primary_key,
        "state": state(row, current),
        "digest": digest(row, current),
        "exists": { "before": present(&row.before), "after": present(&row.after), "current": present(current) },
        "columns": columns,
    })
}

/// A value as people read it: the text of hex-encoded bytes when they are UTF-8 (otherwise
/// `null`: show the hex), the image's text for everything else.
pub fn display(encoding: Encoding, image: &Value) -> Value {
    match (encoding, image) {
        (Encoding::Hex | Encoding::Char, Value::String(hex)) => decode_hex(hex)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .map_or(Value::Null, Value::String),
        _ => image.clone(),
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The inspect report of `rows` as `current` holds them.
fn report(rows: &[BranchRow], current: &BTreeMap<String, Option<ImageRow>>, types: &Types) -> Value {
    let digests: Vec<(&BranchRow, String)> = rows.iter().map(|r| (r, digest(r, &current[&r.id]))).collect();
    let dirty = rows.iter().filter(|r| is_dirty(state(r, &current[&r.id]))).count();
    json!({
        "rows": rows.iter().map(|r| row_json(r, &current[&r.id], types)).collect::<Vec<_>>(),
        "row_count": rows.len(),
        "dirty_rows": dirty,
        "branch_digest": branch_digest(&digests),
    })
}

/// The branch's record, locked (its main row FOR UPDATE) unless `lock` says otherwise.
async fn locked_record(
    tx: &mut mysql_async::Transaction<'_>,
    b: &pb::BranchRef,
    lock: Lock,
) -> Result<UndoRecord, Refusal> {
    let sql = match lock {
        Lock::ForUpdate => "SELECT log_status FROM undo_log WHERE xid = ? AND branch_id = ? FOR UPDATE",
        Lock::None => "SELECT log_status FROM undo_log WHERE xid = ? AND branch_id = ?",
    };
    match tx.exec_first::<i32, _, _>(sql, (&b.xid, b.branch_id)).await {
        Ok(Some(STATUS_NORMAL)) => read_record(tx, &b.xid, b.branch_id)
            .await
            .map_err(|e| Refusal::new("repair_failed", e)),
        Ok(_) => Err(Refusal::new(
            "not_found",
            format!(
                "branch {} of {} has no undo record left in {}: it was rolled back, accepted or discarded already",
                b.branch_id,
                b.xid,
                database_of(&b.resource_id).unwrap_or_default()
            ),
        )),
        Err(mysql_async::Error::Server(e)) if e.code == undo_table::NO_SUCH_TABLE => Err(Refusal::new(
            "not_found",
            "the database has no undo_log table: the branch has no undo record",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Runs one repair command for the coordinator.
pub async fn handle(
    at: &At,
    action: pb::Phase2Action,
    b: &pb::BranchRef,
    repair: Option<pb::Repair>,
) -> pb::BranchOutcome {
    let span = tracing::info_span!(
        "repair",
        xid = b.xid,
        branch_id = b.branch_id,
        action = action.as_str_name()
    );
    let result = tracing::Instrument::instrument(run(at, action, b, repair.unwrap_or_default()), span).await;
    match result {
        Ok(result) => pb::BranchOutcome {
            branch_id: b.branch_id,
            result_json: result.to_string(),
            ..Default::default()
        },
        Err(refusal) => {
            tracing::warn!(code = refusal.code, message = refusal.message, "repair refused");
            pb::BranchOutcome {
                branch_id: b.branch_id,
                reason: refusal.message,
                error_code: refusal.code.to_owned(),
                result_json: if refusal.fresh.is_null() {
                    String::new()
                } else {
                    refusal.fresh.to_string()
                },
                ..Default::default()
            }
        }
    }
}

async fn run(at: &At, action: pb::Phase2Action, b: &pb::BranchRef, repair: pb::Repair) -> Result<Value, Refusal> {
    let resource = &b.resource_id;
    let changes = action != pb::Phase2Action::Inspect;
    if changes {
        if repair.reason.trim().is_empty() {
            return Err(Refusal::new("reason_required", "a repair needs a reason"));
        }
        ensure_audit_table(at, resource).await?;
    }
    let mut conn = at.global.service_conn(resource).await?;
    let mut tx = conn.start_transaction(Default::default()).await?;
    let lock = if changes { Lock::ForUpdate } else { Lock::None };
    let record = locked_record(&mut tx, b, lock).await?;
    let rows = rows_of(&record);
    let types = column_types(&mut tx, &rows).await?;
    if !changes {
        let all: Vec<&BranchRow> = rows.iter().collect();
        let current = read_current(&mut tx, &all, Lock::None).await?;
        tx.rollback().await?;
        let mut out = report(&rows, &current, &types);
        out["undo_items"] = json!(record.items.len());
        return Ok(out);
    }

    // The rows acted on, locked and checked against what the operator saw.
    let targets: Vec<&BranchRow> = if repair.all || action == pb::Phase2Action::DiscardUndo {
        rows.iter().collect()
    } else {
        let mut chosen = Vec::new();
        for wanted in &repair.rows {
            let row = rows.iter().find(|r| r.id == wanted.row).ok_or_else(|| {
                Refusal::new(
                    "invalid_argument",
                    format!(
                        "branch {} has no row {}; inspect it for the rows it has",
                        b.branch_id, wanted.row
                    ),
                )
            })?;
            chosen.push(row);
        }
        if chosen.is_empty() {
            return Err(Refusal::new(
                "invalid_argument",
                "name the rows to act on, or all of them",
            ));
        }
        chosen
    };
    if repair.all && action != pb::Phase2Action::DiscardUndo && repair.branch_digest.is_empty() {
        return Err(Refusal::new(
            "invalid_argument",
            "acting on all rows needs the branch_digest of the inspection the operator saw",
        ));
    }
    let current = read_current(&mut tx, &targets, Lock::ForUpdate).await?;
    let stale = if repair.all || action == pb::Phase2Action::DiscardUndo {
        // The targets are every row, in order: what was just read covers the branch.
        let digests: Vec<(&BranchRow, String)> = rows.iter().map(|r| (r, digest(r, &current[&r.id]))).collect();
        !repair.branch_digest.is_empty() && branch_digest(&digests) != repair.branch_digest
    } else {
        repair
            .rows
            .iter()
            .zip(&targets)
            .any(|(wanted, row)| digest(row, &current[&row.id]) != wanted.digest)
    };
    if stale {
        let fresh = report(
            &targets.iter().map(|r| (*r).clone()).collect::<Vec<_>>(),
            &current,
            &types,
        );
        tx.rollback().await?;
        return Err(Refusal {
            code: "precondition_failed",
            message: "rows changed since you looked at them; look again and act on what they hold now".into(),
            fresh,
        });
    }

    let mut statements = Vec::new();
    if action == pb::Phase2Action::Restore {
        for row in &targets {
            let item = restoring(row, &current[&row.id]);
            for (sql, params) in undo::compensation(&item) {
                statements
                    .push(json!({ "sql": sql, "params": params.iter().map(|p| p.as_sql(false)).collect::<Vec<_>>() }));
                tx.exec_drop(sql, params).await?;
            }
        }
        // The restore mode is not strict: the rows must read back as the before image.
        let again = read_current(&mut tx, &targets, Lock::ForUpdate).await?;
        if let Some(row) = targets.iter().find(|r| again[&r.id] != r.before) {
            tx.rollback().await?;
            return Err(Refusal::new(
                "repair_failed",
                format!(
                    "row {} did not read back as its before image after restoring (a trigger, or a value the server stores \
                     differently); nothing was changed",
                    row.id
                ),
            ));
        }
    }

    // The record without the settled rows; deleted when nothing is left.
    let settled: BTreeSet<&str> = targets.iter().map(|r| r.id.as_str()).collect();
    let kept = without(&record, &rows, &settled, action == pb::Phase2Action::DiscardUndo);
    let removed_items = record.items.len() - kept.items.len();
    let deleted = kept.items.is_empty();
    tx.exec_drop(
        "DELETE FROM undo_log WHERE (xid = ? AND branch_id = ?) OR (xid LIKE ? AND branch_id = ?)",
        (&b.xid, b.branch_id, format!("{}#%", b.xid), b.branch_id),
    )
    .await?;
    if !deleted {
        let bytes = kept.to_bytes();
        for (xid, context, status, piece) in
            undo_log::pieces(&b.xid, &bytes, at.undo_logs.chunk_bytes(&at.global).await)
        {
            tx.exec_drop(
                "INSERT INTO undo_log (branch_id, xid, context, rollback_info, log_status, log_created, log_modified) \
                 VALUES (?, ?, ?, ?, ?, NOW(6), NOW(6))",
                (b.branch_id, xid, context, piece, status),
            )
            .await?;
        }
    }

    let verb = match action {
        pb::Phase2Action::Accept => "accept",
        pb::Phase2Action::Restore => "restore",
        _ => "discard",
    };
    let settled_rows: Vec<Value> = targets.iter().map(|r| row_json(r, &current[&r.id], &types)).collect();
    let detail = json!({ "rows": settled_rows, "statements": statements, "undo_record_deleted": deleted });
    tx.exec_drop(
        "INSERT INTO ferrata_audit (action_id, at, actor, role, action, xid, branch_id, reason, detail) \
         VALUES (?, UTC_TIMESTAMP(6), ?, ?, ?, ?, ?, ?, ?)",
        (
            &repair.action_id,
            &repair.actor,
            &repair.role,
            verb,
            &b.xid,
            b.branch_id,
            &repair.reason,
            detail.to_string(),
        ),
    )
    .await?;

    // What is left, read in this transaction (after the change).
    let left_rows = rows_of(&kept);
    let left = read_current(&mut tx, &left_rows.iter().collect::<Vec<_>>(), Lock::None).await?;
    let remaining_dirty = left_rows.iter().filter(|r| is_dirty(state(r, &left[&r.id]))).count();
    if repair.dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
        tracing::warn!(
            rows = targets.len(),
            deleted,
            actor = repair.actor,
            reason = repair.reason,
            "an operator's repair changed the data and the undo record"
        );
    }
    let locks: Vec<Value> = targets
        .iter()
        .map(|r| json!({ "schema": r.schema, "table": r.table, "key": r.key }))
        .collect();
    Ok(json!({
        "action": verb,
        "dry_run": repair.dry_run,
        "rows": detail["rows"],
        "statements": detail["statements"],
        "undo_items_removed": removed_items,
        "undo_record_deleted": deleted,
        "settled_locks": locks,
        "remaining_rows": left_rows.len(),
        "remaining_dirty": remaining_dirty,
        "database": database_of(resource).unwrap_or_default(),
    }))
}

/// An item whose compensation makes `row` equal its before image from `current`.
fn restoring(row: &BranchRow, current: &Option<ImageRow>) -> UndoItem {
    let (kind, before, after) = match (&row.before, current) {
        (Some(b), Some(c)) => (Kind::Update, vec![b.clone()], vec![c.clone()]),
        (None, Some(c)) => (Kind::Insert, Vec::new(), vec![c.clone()]),
        (Some(b), None) => (Kind::Delete, vec![b.clone()], Vec::new()),
        (None, None) => (Kind::Insert, Vec::new(), Vec::new()),
    };
    UndoItem {
        kind,
        schema: row.schema.clone(),
        table: row.table.clone(),
        columns: row.columns.clone(),
        primary_key: row.primary_key.clone(),
        before,
        after,
    }
}

/// `record` without the `settled` rows (or without anything, `all`), items left empty
/// dropped.
fn without(record: &UndoRecord, rows: &[BranchRow], settled: &BTreeSet<&str>, all: bool) -> UndoRecord {
    if all {
        return UndoRecord::new(Vec::new());
    }
    let gone: BTreeSet<(String, String, Vec<String>)> = rows
        .iter()
        .filter(|r| settled.contains(r.id.as_str()))
        .map(|r| (r.schema.clone(), r.table.clone(), r.key.clone()))
        .collect();
    let items = record
        .items
        .iter()
        .map(|item| {
            let keep =
                |r: &ImageRow| !gone.contains(&(item.schema.clone(), item.table.clone(), key_of(&item.primary_key, r)));
            UndoItem {
                before: item.before.iter().filter(|r| keep(r)).cloned().collect(),
                after: item.after.iter().filter(|r| keep(r)).cloned().collect(),
                ..item.clone()
            }
        })
        .filter(|item| !item.before.is_empty() || !item.after.is_empty())
        .collect();
    UndoRecord::new(items)
}

/// Creates `ferrata_audit` in the resource's database if the proxy may (`[service]
/// create_undo_log`), or says what a DBA must run. Outside the repair's transaction: DDL
/// commits.
async fn ensure_audit_table(at: &At, resource: &str) -> Result<(), Refusal> {
    let db = database_of(resource).unwrap_or_default();
    let mut conn = at.global.service_conn(resource).await?;
    let exists: Option<i64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'ferrata_audit'",
            (&db,),
        )
        .await?;
    if exists == Some(1) {
        return Ok(());
    }
    let instructions = || {
        format!(
            "the table {db}.ferrata_audit is missing and ferrata-proxy may not create it; a DBA must run, in database {db}: \
             {AUDIT_CREATE}; and grant the proxy's service user INSERT on it"
        )
    };
    if !at.undo_logs.may_create() {
        return Err(Refusal::new("repair_failed", instructions()));
    }
    conn.query_drop(AUDIT_CREATE)
        .await
        .map_err(|e| Refusal::new("repair_failed", format!("{} ({e})", instructions())))?;
    tracing::info!(database = db, "created the ferrata_audit table");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str) -> ImageColumn {
        ImageColumn {
            name: name.into(),
            encoding: Encoding::Text,
            generated: false,
        }
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    fn item(kind: Kind, before: Vec<ImageRow>, after: Vec<ImageRow>) -> UndoItem {
        UndoItem {
            kind,
            schema: "shop".into(),
            table: "t".into(),
            columns: vec![col("id"), col("v")],
            primary_key: vec![0],
            before,
            after,
        }
    }

    #[test]
    fn a_row_spans_items_first_before_last_after() {
        let record = UndoRecord::new(vec![
            item(Kind::Update, vec![vec![s("1"), s("a")]], vec![vec![s("1"), s("b")]]),
            item(Kind::Insert, vec![], vec![vec![s("2"), s("x")]]),
            item(Kind::Update, vec![vec![s("1"), s("b")]], vec![vec![s("1"), s("c")]]),
            item(Kind::Delete, vec![vec![s("2"), s("x")]], vec![]),
        ]);
        let rows = rows_of(&record);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, r#"["shop","t",["1"]]"#);
        assert_eq!(
            (rows[0].before.clone(), rows[0].after.clone()),
            (Some(vec![s("1"), s("a")]), Some(vec![s("1"), s("c")]))
        );
        // Inserted then deleted by the transaction: nothing before, nothing after.
        assert_eq!((rows[1].before.clone(), rows[1].after.clone()), (None, None));
        let now = |v: &str| Some(vec![s("1"), s(v)]);
        assert_eq!(state(&rows[0], &now("c")), "clean");
        assert_eq!(state(&rows[0], &now("a")), "restored");
        assert_eq!(state(&rows[0], &now("z")), "changed");
        assert_eq!(state(&rows[0], &None), "missing");
        assert_eq!(state(&rows[1], &Some(vec![s("2"), s("y")])), "unexpected");
        assert_ne!(digest(&rows[0], &now("c")), digest(&rows[0], &now("z")));
        assert_eq!(digest(&rows[0], &now("c")), digest(&rows[0], &now("c")));
    }

    #[test]
    fn values_are_shown_as_text_where_they_are_text() {
        assert_eq!(display(Encoding::Hex, &json!("6E6577")), json!("new"));
        assert_eq!(
            display(Encoding::Hex, &json!("FF00")),
            Value::Null,
            "not UTF-8: show the hex"
        );
        assert_eq!(display(Encoding::Char, &json!("")), json!(""));
        assert_eq!(display(Encoding::Text, &json!("12.50")), json!("12.50"));
        assert_eq!(display(Encoding::Hex, &Value::Null), Value::Null);
    }

    #[test]
    fn settling_rows_drops_them_from_every_item() {
        let record = UndoRecord::new(vec![
            item(
                Kind::Update,
                vec![vec![s("1"), s("a")], vec![s("3"), s("a")]],
                vec![vec![s("1"), s("b")], vec![s("3"), s("b")]],
            ),
            item(Kind::Update, vec![vec![s("1"), s("b")]], vec![vec![s("1"), s("c")]]),
        ]);
        let rows = rows_of(&record);
        let one: BTreeSet<&str> = [rows[0].id.as_str()].into();
        let kept = without(&record, &rows, &one, false);
        assert_eq!(kept.items.len(), 1, "the second item only had row 1");
        assert_eq!(kept.items[0].after, vec![vec![s("3"), s("b")]]);
        assert!(without(&record, &rows, &BTreeSet::new(), true).items.is_empty());
    }

    #[test]
    fn restoring_writes_the_before_image_whatever_is_there_now() {
        let rows = rows_of(&UndoRecord::new(vec![item(
            Kind::Update,
            vec![vec![s("1"), s("a")]],
            vec![vec![s("1"), s("b")]],
        )]));
        let update = undo::compensation(&restoring(&rows[0], &Some(vec![s("1"), s("z")])));
        assert!(update[0].0.starts_with("UPDATE `shop`.`t` SET `v` = ?"), "{update:?}");
        let insert = undo::compensation(&restoring(&rows[0], &None));
        assert!(insert[0].0.starts_with("INSERT INTO `shop`.`t`"), "{insert:?}");
        let inserted = rows_of(&UndoRecord::new(vec![item(
            Kind::Insert,
            vec![],
            vec![vec![s("2"), s("x")]],
        )]));
        let delete = undo::compensation(&restoring(&inserted[0], &Some(vec![s("2"), s("y")])));
        assert!(delete[0].0.starts_with("DELETE FROM `shop`.`t`"), "{delete:?}");
    }
}
