//! Phase 1 for multi-table UPDATE (join and comma forms) and DELETE (`DELETE t1, t2 FROM
//! ...`, `DELETE FROM t1, t2 USING ...`): images per table written.
//!
//! 1. plan it (`sql::dml::plan_multi`): its table references, the tables it writes (an
//!    UPDATE's unqualified columns are placed by the tables' columns), its `FROM ... WHERE`;
//!    the coordinator guards the tables written first, as for one table;
//! 2. per table written, before image: `SELECT <that table's columns> FROM <references>
//!    WHERE ... FOR UPDATE` (a join repeats rows: they are kept once, by primary key);
//! 3. the client's statement, as sent;
//! 4. the row count must match the images; an UPDATE's after image is read by primary key;
//! 5. one undo item per table written.

use std::collections::HashSet;
use std::sync::Arc;

use super::Cx;
use super::phase1::{self, abort, miscounted};
use super::undo::{self};
use crate::coordinator::refusal::not_protected as refuse;
use crate::protocol::Capabilities;
use crate::protocol::err::ErrPacket;
use crate::protocol::execute::Param;
use crate::session::SessionError;
use crate::session::backend;
use crate::sql::dml::{ChangeKind, MultiChange};
use crate::sql::image::{ColumnSpec, ImageRow, qualified_select_list, select_list};
use crate::sql::keys::{select_params, written};
use crate::sql::metadata::TableMeta;
use crate::sql::{pk_condition, qualified, text};

/// One table the statement writes.
struct Target {
    /// How the statement names it (alias, else table name).
    qualifier: String,
    meta: Arc<TableMeta>,
    specs: Vec<ColumnSpec>,
}

/// The tables written and their metadata, checked for imaging; or the refusal.
async fn targets(plan: &MultiChange, cx: &Cx<'_>) -> Result<(String, Vec<Target>), ErrPacket> {
    let (state, xid) = (&*cx.state, cx.xid);
    let metas = cx.at.global.tables(&plan.tables, state.schema.as_deref()).await?;
    let written = written(plan, &metas).map_err(|why| refuse(&why, xid))?;
    let schema = written[0].schema.clone();
    let mut out = Vec::new();
    for w in written {
        let (s, meta) = (&w.schema, &w.meta);
        if *s != schema || cx.branch.as_ref().is_some_and(|b| b.schema != *s) {
            return Err(refuse(
                "a write to more than one database in one local transaction",
                xid,
            ));
        }
        phase1::imageable(s, meta, xid)?;
        out.push(Target {
            qualifier: w.qualifier,
            specs: meta.specs(),
            meta: w.meta,
        });
    }
    let tables: Vec<(&str, &str)> = out.iter().map(|t| (schema.as_str(), t.meta.name.as_str())).collect();
    cx.at.global.guard_before_write(xid, &tables).await?;
    Ok((schema, out))
}

pub(super) async fn run(
    cx: &mut Cx<'_>,
    plan: MultiChange,
    params: &[Param],
    raw: &[u8],
) -> Result<Vec<u8>, SessionError> {
    let (schema, targets) = match targets(&plan, cx).await {
        Ok(t) => t,
        Err(e) => return Ok(e.to_packet(1)),
    };
    let Some(bound) = select_params(&plan, params) else {
        return Ok(refuse("this statement: its parameters could not be read", cx.xid).to_packet(1));
    };
    let autocommit = cx.state.autocommit() && !cx.state.in_transaction();
    let original_status = cx.state.status;
    if autocommit && let Err(e) = backend::begin_own(cx.backend, cx.state, cx.limit).await? {
        return Ok(e.to_packet(1));
    }
    let mut befores = Vec::with_capacity(targets.len());
    for t in &targets {
        let list = qualified_select_list(&t.qualifier, &t.specs);
        let sql = format!("SELECT {list}{} FOR UPDATE", plan.select_tail);
        let read = crate::sql::execute(cx.backend, cx.state, &sql, &bound, cx.limit).await?;
        if let Some(e) = read.error {
            return abort(cx, autocommit, e).await;
        }
        // A join repeats a row once per match.
        let mut seen = HashSet::new();
        let rows: Vec<ImageRow> = read
            .rows
            .iter()
            .map(text)
            .filter(|r| seen.insert(t.meta.primary_key.iter().map(|&i| r[i].clone()).collect::<Vec<_>>()))
            .collect();
        befores.push(rows);
    }
    let (response, summary) =
        match backend::run_client_statement(cx.backend, cx.state, cx.limit, raw, autocommit).await? {
            Ok(done) => done,
            Err(refused) => return Ok(refused),
        };
    let affected = summary.map_or(0, |s| s.affected_rows);
    let imaged: u64 = befores.iter().map(|b| b.len() as u64).sum();
    let expected = match plan.kind {
        ChangeKind::Delete => affected == imaged,
        ChangeKind::Update if cx.state.capabilities.has(Capabilities::FOUND_ROWS) => affected == imaged,
        ChangeKind::Update => affected <= imaged,
    };
    if !expected {
        return miscounted(cx, affected, "").await;
    }
    let mut items = Vec::new();
    for (t, before) in targets.iter().zip(befores) {
        if before.is_empty() {
            continue;
        }
        let item = |kind, before, after| phase1::undo_item(kind, &schema, &t.meta, &t.specs, before, after);
        if plan.kind == ChangeKind::Delete {
            items.push(item(undo::Kind::Delete, before, Vec::new()));
            continue;
        }
        let (list, table) = (select_list(&t.specs), qualified(&schema, &t.meta.name));
        let condition = pk_condition(&t.meta, &t.specs, &before);
        let after = match phase1::after_image(cx, &list, &table, &condition).await? {
            Ok(rows) => rows,
            Err(answer) => return Ok(answer),
        };
        items.push(item(undo::Kind::Update, before, after));
    }
    phase1::finish(cx, &schema, items, response, autocommit.then_some(original_status)).await
}
