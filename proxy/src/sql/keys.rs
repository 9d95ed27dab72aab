//! Which rows a write names, and the SQL that finds them: the keys of an INSERT's rows
//! (literals, bound parameters, or AUTO_INCREMENT values the server reports), every key an
//! upsert's rows name, the rows an UPDATE or DELETE filters, the tables a multi-table
//! statement writes. AT mode images these rows; the isolation checks lock-check them.

use std::sync::Arc;

use super::dml::{self, ChangeKind, MultiChange, TableRef};
use super::ident;
use super::metadata::TableMeta;
use crate::protocol::err::ErrPacket;
use crate::protocol::execute::{self, Param};
use crate::protocol::ok;
use crate::session::SessionError;
use crate::session::backend::{self, Row};
use crate::session::peer::Peer;
use crate::session::state::SessionState;

/// Where the primary keys of an INSERT's rows come from.
pub enum InsertKeys {
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
pub fn row_values(
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
pub fn generated_key(meta: &TableMeta) -> Option<usize> {
    match meta.primary_key.as_slice() {
        [only] if meta.columns[*only].auto_increment => Some(*only),
        _ => None,
    }
}

/// A key value as written: `None` when the server generates it (AUTO_INCREMENT given no
/// value, NULL or 0).
pub fn key_value(meta: &TableMeta, column: usize, value: Option<&str>) -> Result<Option<String>, String> {
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

pub fn insert_keys(insert: &dml::Insert, meta: &TableMeta, params: &[Param]) -> Result<InsertKeys, String> {
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

/// `(k1, k2) IN ((v, v), ...) OR (u1) IN (...)`: every key the statement's rows name.
pub fn key_condition(insert: &dml::Insert, meta: &TableMeta, params: &[Param]) -> Result<String, String> {
    let rows = row_values(insert, meta, params)?;
    let mut keys: Vec<&[usize]> = vec![&meta.primary_key];
    keys.extend(meta.unique_keys.iter().map(|(_, columns)| columns.as_slice()));
    let mut named = vec![false; rows.len()];
    let mut terms = Vec::new();
    for key in keys {
        let mut tuples = Vec::new();
        for (row, named) in rows.iter().zip(&mut named) {
            let mut tuple = Vec::with_capacity(key.len());
            for &column in key {
                match row[column].as_deref() {
                    // NULL never collides: this key does not name the row.
                    Some(v) if v.trim().eq_ignore_ascii_case("NULL") => {
                        tuple.clear();
                        break;
                    }
                    value => match key_value(meta, column, value)? {
                        Some(v) => tuple.push(v),
                        None => {
                            tuple.clear();
                            break;
                        }
                    },
                }
            }
            if !tuple.is_empty() {
                *named = true;
                tuples.push(format!("({})", tuple.join(", ")));
            }
        }
        if !tuples.is_empty() {
            let columns: Vec<String> = key.iter().map(|&c| ident(&meta.columns[c].name)).collect();
            terms.push(format!("({}) IN ({})", columns.join(", "), tuples.join(", ")));
        }
    }
    if named.contains(&false) {
        return Err(
            "a row that names neither its primary key nor a unique key (give one, so the proxy can find the row)"
                .into(),
        );
    }
    Ok(terms.join(" OR "))
}

/// Runs `SELECT <list> FROM <qualified> <the statement's filter> FOR UPDATE`, the filter's
/// own placeholders taking the client's values for them: the rows an UPDATE or DELETE will
/// change, locked in the database until the local transaction ends. With `begin` the proxy's
/// own transaction is opened first (in the same round trip when the select is plain text)
/// and rolled back if the select fails. The server's error (or missing parameters) comes
/// back as the client's answer, with no transaction of the proxy's left open.
#[allow(clippy::too_many_arguments)]
pub async fn select_filtered(
    backend: &mut Peer,
    state: &mut SessionState,
    change: &dml::Change,
    qualified: &str,
    list: &str,
    params: &[Param],
    begin: bool,
    limit: usize,
) -> Result<Result<Vec<Row>, ErrPacket>, SessionError> {
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
    let read = match super::as_text(&sql, bound).filter(|_| begin) {
        Some(text) => match backend::begin_own_with(backend, state, limit, &text).await? {
            Ok(read) => read,
            Err(e) => return Ok(Err(e)),
        },
        None => {
            if begin && let Err(e) = backend::begin_own(backend, state, limit).await? {
                return Ok(Err(e));
            }
            super::execute(backend, state, &sql, bound, limit).await?
        }
    };
    Ok(match read.error {
        Some(e) => {
            if begin {
                backend::local_rollback(backend, state, limit).await?;
            }
            Err(e)
        }
        None => Ok(read.rows),
    })
}

/// The condition that finds the rows of an INSERT whose keys it names (`rows`, each key's
/// columns as SQL literals).
pub fn literal_condition(meta: &TableMeta, rows: &[Vec<String>]) -> String {
    let cols: Vec<String> = meta.primary_key.iter().map(|&i| ident(&meta.columns[i].name)).collect();
    let tuples: Vec<String> = rows.iter().map(|r| format!("({})", r.join(", "))).collect();
    format!("({}) IN ({})", cols.join(", "), tuples.join(", "))
}

/// The condition that finds an INSERT's rows by primary key once it ran: its literal keys,
/// or the AUTO_INCREMENT values the server reported (`summary`) at the session's increment.
pub async fn insert_condition(
    backend: &mut Peer,
    state: &mut SessionState,
    meta: &TableMeta,
    keys: &InsertKeys,
    summary: Option<ok::OkSummary>,
    limit: usize,
) -> Result<String, SessionError> {
    Ok(match keys {
        InsertKeys::Literal(rows) => literal_condition(meta, rows),
        InsertKeys::Generated => {
            let first = summary.map_or(0, |s| s.last_insert_id);
            let affected = summary.map_or(0, |s| s.affected_rows);
            let step = backend::query(backend, state, "SELECT @@auto_increment_increment", limit).await?;
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

fn names(table: &TableRef, name: &str) -> bool {
    match &table.alias {
        Some(alias) => alias.eq_ignore_ascii_case(name),
        None => table.name.eq_ignore_ascii_case(name),
    }
}

/// The client's parameters that the select of the statement's rows (`select_tail`) takes.
pub fn select_params(plan: &MultiChange, params: &[Param]) -> Option<Vec<Param>> {
    plan.params.iter().map(|&i| params.get(i).cloned()).collect()
}

/// One table a multi-table statement writes.
pub struct Written {
    pub schema: String,
    pub meta: Arc<TableMeta>,
    /// How the statement names it (alias, else table name).
    pub qualifier: String,
}

/// The tables the statement writes, placed by the metadata of its tables (`metas`, one per
/// `plan.tables`, with its database): `Err(why)` for a statement the proxy cannot follow.
pub fn written(plan: &MultiChange, metas: &[(String, Arc<TableMeta>)]) -> Result<Vec<Written>, String> {
    let mut written: Vec<usize> = Vec::new();
    match plan.kind {
        ChangeKind::Delete => {
            for target in &plan.targets {
                let Some(i) = plan.tables.iter().position(|t| names(t, target)) else {
                    return Err(format!("a DELETE from {target}, which its FROM does not name"));
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
                    return Err(format!(
                        "a multi-table UPDATE whose column {column} the proxy cannot place in one table"
                    ));
                };
                let meta = &metas[i].1;
                if meta
                    .primary_key
                    .iter()
                    .any(|&k| meta.columns[k].name.eq_ignore_ascii_case(column))
                {
                    return Err(format!("an UPDATE of the primary-key column {column}"));
                }
                written.push(i);
            }
        }
    }
    if written.is_empty() {
        return Err("a multi-table statement whose written tables the proxy cannot tell".into());
    }
    let mut seen = Vec::new();
    written.retain(|i| {
        let first = !seen.contains(i);
        seen.push(*i);
        first
    });
    Ok(written
        .into_iter()
        .map(|i| {
            let table = &plan.tables[i];
            Written {
                schema: metas[i].0.clone(),
                meta: Arc::clone(&metas[i].1),
                qualifier: table.alias.clone().unwrap_or_else(|| table.name.clone()),
            }
        })
        .collect())
}
