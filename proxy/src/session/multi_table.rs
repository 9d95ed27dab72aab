//! Phase 1 for multi-table UPDATE (join and comma forms) and DELETE (`DELETE t1, t2 FROM
//! ...`, `DELETE FROM t1, t2 USING ...`): images per table written.
//!
//! 1. plan it (`global::dml::plan_multi`): its table references, the tables it writes (an
//!    UPDATE's unqualified columns are placed by the tables' columns), its `FROM ... WHERE`;
//! 2. per table written, before image: `SELECT <that table's columns> FROM <references>
//!    WHERE ... FOR UPDATE` (a join repeats rows: they are kept once, by primary key);
//! 3. the client's statement, as sent;
//! 4. the row count must match the images; an UPDATE's after image is read by primary key;
//! 5. one undo item per table written.

use std::collections::HashSet;
use std::sync::Arc;

use super::at;
use super::peer::Peer;
use super::state::SessionState;
use super::{SessionError, Shared, inject};
use crate::global::Global;
use crate::global::dml::{ChangeKind, MultiChange, TableRef};
use crate::global::metadata::TableMeta;
use crate::global::undo::{self, ColumnSpec, UndoItem};
use crate::protocol::Capabilities;
use crate::protocol::err::ErrPacket;
use crate::protocol::execute::Param;

/// One table the statement writes.
struct Target {
    /// How the statement names it (alias, else table name).
    qualifier: String,
    meta: Arc<TableMeta>,
    specs: Vec<ColumnSpec>,
}

fn names(table: &TableRef, name: &str) -> bool {
    match &table.alias {
        Some(alias) => alias.eq_ignore_ascii_case(name),
        None => table.name.eq_ignore_ascii_case(name),
    }
}

/// The client's parameters that the select of the statement's rows (`select_tail`) takes.
pub(super) fn select_params(plan: &MultiChange, params: &[Param]) -> Option<Vec<Param>> {
    plan.params.iter().map(|&i| params.get(i).cloned()).collect()
}

/// One table a multi-table statement writes.
pub(super) struct Written {
    pub schema: String,
    pub meta: Arc<TableMeta>,
    /// How the statement names it (alias, else table name).
    pub qualifier: String,
}

/// The tables the statement writes, placed by their metadata: `Ok(Err(why))` for a statement
/// the proxy cannot follow, `Err` for the server's error (an unknown table).
pub(super) async fn written(
    plan: &MultiChange,
    state: &SessionState,
    global: &Global,
) -> Result<Result<Vec<Written>, String>, ErrPacket> {
    let mut metas = Vec::with_capacity(plan.tables.len());
    for t in &plan.tables {
        let Some(schema) = t.schema.clone().or_else(|| state.schema.clone()) else {
            return Err(ErrPacket::new(1046, "3D000", "No database selected"));
        };
        metas.push((schema.clone(), global.table(&schema, &t.name).await?));
    }
    let mut written: Vec<usize> = Vec::new();
    match plan.kind {
        ChangeKind::Delete => {
            for target in &plan.targets {
                let Some(i) = plan.tables.iter().position(|t| names(t, target)) else {
                    return Ok(Err(format!("a DELETE from {target}, which its FROM does not name")));
                };
                written.push(i);
            }
        }
        ChangeKind::Update => {
            for (qualifier, column) in &plan.assigned {
                let has = |i: usize| metas[i].1.columns.iter().any(|c| c.name.eq_ignore_ascii_case(column));
                let found: Vec<usize> = match qualifier {
                    Some(q) => (0..plan.tables.len()).filter(|&i| names(&plan.tables[i], q)).collect(),
                    None => (0..plan.tables.len()).filter(|&i| has(i)).collect(),
                };
                let [i] = found[..] else {
                    return Ok(Err(format!(
                        "a multi-table UPDATE whose column {column} the proxy cannot place in one table"
                    )));
                };
                let meta = &metas[i].1;
                if meta
                    .primary_key
                    .iter()
                    .any(|&k| meta.columns[k].name.eq_ignore_ascii_case(column))
                {
                    return Ok(Err(format!("an UPDATE of the primary-key column {column}")));
                }
                written.push(i);
            }
        }
    }
    if written.is_empty() {
        return Ok(Err(
            "a multi-table statement whose written tables the proxy cannot tell".into(),
        ));
    }
    let mut seen = Vec::new();
    written.retain(|i| {
        let first = !seen.contains(i);
        seen.push(*i);
        first
    });
    Ok(Ok(written
        .into_iter()
        .map(|i| {
            let table = &plan.tables[i];
            Written {
                schema: metas[i].0.clone(),
                meta: Arc::clone(&metas[i].1),
                qualifier: table.alias.clone().unwrap_or_else(|| table.name.clone()),
            }
        })
        .collect()))
}

/// The tables written and their metadata, checked for imaging; or the refusal.
async fn targets(
    plan: &MultiChange,
    state: &SessionState,
    global: &Global,
    xid: &str,
) -> Result<(String, Vec<Target>), ErrPacket> {
    let written = written(plan, state, global)
        .await?
        .map_err(|why| at::refuse(&why, xid))?;
    let schema = written[0].schema.clone();
    let mut out = Vec::new();
    for w in written {
        let (s, meta) = (&w.schema, &w.meta);
        if *s != schema || state.branch.as_ref().is_some_and(|b| b.schema != *s) {
            return Err(at::refuse(
                "a write to more than one database in one local transaction",
                xid,
            ));
        }
        if meta.primary_key.is_empty() {
            return Err(at::refuse(
                &format!("a write to {s}.{}, which has no primary key", meta.name),
                xid,
            ));
        }
        if meta.has_triggers {
            return Err(at::refuse(
                &format!(
                    "a write to {s}.{}, which has triggers (their changes cannot be imaged)",
                    meta.name
                ),
                xid,
            ));
        }
        out.push(Target {
            qualifier: w.qualifier,
            specs: meta.specs(),
            meta: w.meta,
        });
    }
    Ok((schema, out))
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    global: &Global,
    xid: &str,
    plan: MultiChange,
    params: &[Param],
    raw: &[u8],
) -> Result<Vec<u8>, SessionError> {
    let limit = shared.config.max_packet_size;
    let (schema, targets) = match targets(&plan, state, global, xid).await {
        Ok(t) => t,
        Err(e) => return Ok(e.to_packet(1)),
    };
    let Some(bound) = plan
        .params
        .iter()
        .map(|&i| params.get(i).cloned())
        .collect::<Option<Vec<Param>>>()
    else {
        return Ok(at::refuse("this statement: its parameters could not be read", xid).to_packet(1));
    };
    let autocommit = state.autocommit() && !state.in_transaction();
    let original_status = state.status;
    if autocommit && let Err(e) = at::begin_own(backend, state, limit).await? {
        return Ok(e.to_packet(1));
    }
    let mut befores = Vec::with_capacity(targets.len());
    for t in &targets {
        let list = undo::qualified_select_list(&t.qualifier, &t.specs);
        let sql = format!("SELECT {list}{} FOR UPDATE", plan.select_tail);
        let read = inject::execute(backend, state, &sql, &bound, limit).await?;
        if let Some((code, message)) = read.error {
            return at::abort(
                backend,
                state,
                limit,
                autocommit,
                ErrPacket::new(code, "HY000", message),
            )
            .await;
        }
        // A join repeats a row once per match.
        let mut seen = HashSet::new();
        let rows: Vec<Vec<Option<String>>> = read
            .rows
            .iter()
            .map(at::text)
            .filter(|r| seen.insert(t.meta.primary_key.iter().map(|&i| r[i].clone()).collect::<Vec<_>>()))
            .collect();
        befores.push(rows);
    }
    let (response, summary) = match at::run_client_statement(backend, state, limit, raw, autocommit).await? {
        Ok(done) => done,
        Err(refused) => return Ok(refused),
    };
    let affected = summary.map_or(0, |s| s.affected_rows);
    let imaged: u64 = befores.iter().map(|b| b.len() as u64).sum();
    let expected = match plan.kind {
        ChangeKind::Delete => affected == imaged,
        ChangeKind::Update if state.capabilities.has(Capabilities::FOUND_ROWS) => affected == imaged,
        ChangeKind::Update => affected <= imaged,
    };
    if !expected {
        let e = at::refuse(
            &format!(
                "this statement: it changed {affected} rows, which its images do not account for; the local transaction was rolled back"
            ),
            xid,
        );
        return at::abort(backend, state, limit, true, e).await;
    }
    let mut items = Vec::new();
    for (t, before) in targets.iter().zip(befores) {
        if before.is_empty() {
            continue;
        }
        let item = |kind, before, after| {
            UndoItem::new(
                kind,
                &schema,
                &t.meta.name,
                &t.specs,
                t.meta.primary_key.clone(),
                before,
                after,
            )
        };
        if plan.kind == ChangeKind::Delete {
            items.push(item(undo::Kind::Delete, before, Vec::new()));
            continue;
        }
        let sql = format!(
            "SELECT {} FROM {}.{} WHERE {} FOR UPDATE",
            undo::select_list(&t.specs),
            at::ident(&schema),
            at::ident(&t.meta.name),
            at::pk_condition(&t.meta, &t.specs, &before)
        );
        let read = inject::query(backend, state, &sql, limit).await?;
        if let Some((code, message)) = read.error {
            let e = ErrPacket::new(code, "HY000", format!("reading the after image failed: {message}"));
            return at::abort(backend, state, limit, true, e).await;
        }
        items.push(item(
            undo::Kind::Update,
            before,
            read.rows.iter().map(at::text).collect(),
        ));
    }
    at::finish(
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
