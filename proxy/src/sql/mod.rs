//! The one home for SQL the proxy writes itself, shared by every mode: identifier and
//! literal quoting, key conditions and locked selects ([`keys`]), column images
//! ([`image`]), the planners that read the client's statements ([`dml`] for writes,
//! [`select`] for locking reads), the table metadata cache ([`metadata`]), and running a
//! statement with bound values on the session's backend connection ([`execute`]).
//!
//! The planners check a statement's structure with `sqlparser` and cut the client's own text
//! at token boundaries: what the proxy runs reuses the client's filters as written.

pub mod dml;
pub mod image;
pub mod keys;
pub mod metadata;
pub mod select;

use crate::protocol::execute::{self, Param};
use crate::session::SessionError;
use crate::session::backend::{self, Outcome, Row};
use crate::session::peer::Peer;
use crate::session::state::SessionState;
use image::{ColumnSpec, ImageRow};
use metadata::TableMeta;

/// A backquoted identifier.
pub fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Quotes an image value (always ASCII: digits, hex, dates) as an SQL string literal.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Upper-case hex digits of `bytes`, for an `X'...'` literal.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// A row read with an image select list, as image text.
pub fn text(row: &Row) -> ImageRow {
    row.iter()
        .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
        .collect()
}

/// `<database>.<table>`, quoted.
pub fn qualified(database: &str, table: &str) -> String {
    format!("{}.{}", ident(database), ident(table))
}

/// `(pk1, pk2) IN ((v, v), ...)` for the given image rows, with each value written back
/// through its column's encoding.
pub fn pk_condition(meta: &TableMeta, specs: &[ColumnSpec], rows: &[ImageRow]) -> String {
    let cols: Vec<String> = meta.primary_key.iter().map(|&i| ident(&meta.columns[i].name)).collect();
    let tuples: Vec<String> = rows
        .iter()
        .map(|row| {
            let values: Vec<String> = meta
                .primary_key
                .iter()
                .map(|&i| match &row[i] {
                    Some(v) => specs[i].encoding().write_expr().replace('?', &literal(v)),
                    None => "NULL".into(),
                })
                .collect();
            format!("({})", values.join(", "))
        })
        .collect();
    format!("({}) IN ({})", cols.join(", "), tuples.join(", "))
}

/// `SELECT <list> FROM <qualified> WHERE <condition> FOR UPDATE`: rows found by key, locked.
pub fn select_locked(list: &str, qualified: &str, condition: &str) -> String {
    format!("SELECT {list} FROM {qualified} WHERE {condition} FOR UPDATE")
}

/// Runs `sql`, whose text holds a client's `?` placeholders, with `params`: as a text query
/// when [`as_text`] can write it out, else as a prepared statement (strings are bound, as a
/// literal would compare under other collation rules). Every column must be a string (the
/// image select lists are).
pub async fn execute(
    backend: &mut Peer,
    state: &mut SessionState,
    sql: &str,
    params: &[Param],
    limit: usize,
) -> Result<Outcome, SessionError> {
    match as_text(sql, params) {
        Some(text) => backend::query(backend, state, &text, limit).await,
        None => backend::execute_prepared(backend, state, sql, params, limit).await,
    }
}

/// `sql` with `params` written into its `?` placeholders, when that means the same as binding
/// them: there are none, or all are integers (one statement instead of a prepare, execute and
/// close).
pub fn as_text(sql: &str, params: &[Param]) -> Option<String> {
    if params.is_empty() {
        return Some(sql.to_owned());
    }
    execute::integer_literals(params).and_then(|v| dml::bind_literals(sql, &v))
}
