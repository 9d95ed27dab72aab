//! Phase 1 for the INSERTs that meet rows already there: `INSERT IGNORE`, `INSERT ... ON
//! DUPLICATE KEY UPDATE` and `REPLACE` (VALUES and SET forms). Which rows they change depends
//! on what the table holds, so their rows are found by key, before and after:
//!
//! 1. every row the statement inserts names its primary key or a unique key (literals or
//!    bound parameters; an AUTO_INCREMENT key may be left to the server when another unique
//!    key names the row); `C` = "any of those keys";
//! 2. before image: `SELECT ... WHERE C FOR UPDATE`, the rows the statement can collide
//!    with, locked;
//! 3. the client's statement, as sent;
//! 4. after image: `SELECT ... WHERE C OR <primary key> IN (the before rows)`;
//! 5. the undo items, by what the statement did:
//!    - IGNORE: the rows that were not there before were inserted (an Insert item); the
//!      others were skipped and stay as they were;
//!    - ON DUPLICATE KEY UPDATE: the rows that were there were updated (an Update item), the
//!      others inserted (an Insert item);
//!    - REPLACE: the rows that were there were deleted (a Delete item) and the new rows
//!      inserted (an Insert item), undone in reverse: the new rows go, the old come back;
//! 6. the affected-row count the server reported must match, else the local transaction is
//!    rolled back and the statement refused.

use std::collections::HashSet;

use super::Cx;
use super::phase1::{self, Plan, abort, miscounted};
use super::undo::{self};
use crate::coordinator::refusal::not_protected as refuse;
use crate::protocol::Capabilities;
use crate::protocol::execute::Param;
use crate::session::SessionError;
use crate::session::backend;
use crate::sql::dml::{self, InsertMode};
use crate::sql::image::{ImageRow, select_list};
use crate::sql::keys::key_condition;
use crate::sql::metadata::TableMeta;
use crate::sql::{pk_condition, qualified, select_locked, text};

fn key_of(meta: &TableMeta, row: &[Option<String>]) -> Vec<Option<String>> {
    meta.primary_key.iter().map(|&i| row[i].clone()).collect()
}

pub(super) async fn run(cx: &mut Cx<'_>, plan: Plan, params: &[Param], raw: &[u8]) -> Result<Vec<u8>, SessionError> {
    let Plan {
        statement: dml::Plan::Insert(insert),
        schema,
        meta,
        specs,
    } = plan
    else {
        unreachable!("only INSERTs are handed over");
    };
    if let InsertMode::Upsert(assigned) = &insert.mode
        && let Some(column) = assigned.iter().find(|c| {
            meta.primary_key
                .iter()
                .any(|&i| meta.columns[i].name.eq_ignore_ascii_case(c))
        })
    {
        let what = format!("an ON DUPLICATE KEY UPDATE of the primary-key column {column}");
        return Ok(refuse(&what, cx.xid).to_packet(1));
    }
    let condition = match key_condition(&insert, &meta, params) {
        Ok(c) => c,
        Err(why) => return Ok(refuse(&why, cx.xid).to_packet(1)),
    };
    let autocommit = cx.state.autocommit() && !cx.state.in_transaction();
    let original_status = cx.state.status;
    if autocommit && let Err(e) = backend::begin_own(cx.backend, cx.state, cx.limit).await? {
        return Ok(e.to_packet(1));
    }
    let list = select_list(&specs);
    let qualified = qualified(&schema, &meta.name);
    let found = backend::query(
        cx.backend,
        cx.state,
        &select_locked(&list, &qualified, &condition),
        cx.limit,
    )
    .await?;
    if let Some(e) = found.error {
        return abort(cx, autocommit, e).await;
    }
    let before: Vec<ImageRow> = found.rows.iter().map(text).collect();

    let (response, summary) =
        match backend::run_client_statement(cx.backend, cx.state, cx.limit, raw, autocommit).await? {
            Ok(done) => done,
            Err(refused) => return Ok(refused),
        };
    let affected = summary.map_or(0, |s| s.affected_rows);

    let mut after_condition = condition.clone();
    if !before.is_empty() {
        after_condition = format!("{after_condition} OR {}", pk_condition(&meta, &specs, &before));
    }
    let after = match phase1::after_image(cx, &list, &qualified, &after_condition).await? {
        Ok(rows) => rows,
        Err(answer) => return Ok(answer),
    };

    let existed: HashSet<_> = before.iter().map(|r| key_of(&meta, r)).collect();
    let (kept, inserted): (Vec<_>, Vec<_>) = after.into_iter().partition(|r| existed.contains(&key_of(&meta, r)));
    let item = |kind, before, after| phase1::undo_item(kind, &schema, &meta, &specs, before, after);
    let mut items = Vec::new();
    let expected: Vec<u64> = match &insert.mode {
        InsertMode::Ignore => vec![inserted.len() as u64],
        InsertMode::Upsert(_) => {
            // Updated rows count 2 when changed; unchanged ones 0 (1 with CLIENT_FOUND_ROWS).
            let before_by_key: std::collections::HashMap<_, _> = before.iter().map(|r| (key_of(&meta, r), r)).collect();
            let changed = kept
                .iter()
                .filter(|r| before_by_key.get(&key_of(&meta, r)).is_some_and(|b| b != r))
                .count() as u64;
            let unchanged = kept.len() as u64 - changed;
            let base = inserted.len() as u64 + 2 * changed;
            if kept.len() != before.len() {
                vec![]
            } else if cx.state.capabilities.has(Capabilities::FOUND_ROWS) {
                vec![base + unchanged, base]
            } else {
                vec![base]
            }
        }
        InsertMode::Replace => vec![(before.len() + inserted.len() + kept.len()) as u64],
        InsertMode::Plain => unreachable!("plain INSERTs are imaged in phase1.rs"),
    };
    if !expected.contains(&affected) {
        return miscounted(cx, affected, " (rows of one statement colliding with each other?)").await;
    }
    let inserted = match &insert.mode {
        InsertMode::Upsert(_) => {
            if !before.is_empty() {
                items.push(item(undo::Kind::Update, before, kept));
            }
            inserted
        }
        InsertMode::Replace => {
            if !before.is_empty() {
                items.push(item(undo::Kind::Delete, before, Vec::new()));
            }
            // The new rows include those that reuse a deleted row's key.
            inserted.into_iter().chain(kept).collect()
        }
        _ => inserted,
    };
    if !inserted.is_empty() {
        items.push(item(undo::Kind::Insert, Vec::new(), inserted));
    }
    phase1::finish(cx, &schema, items, response, autocommit.then_some(original_status)).await
}
