//! The undo record of an AT-mode branch: the before and after images of the rows it changed
//! (each value read as `sql::image` says), how the record is stored, and what a rollback
//! does with it: the dirty check and the compensating SQL.
//!
//! # The undo record
//!
//! `undo_log.rollback_info` holds one [`UndoRecord`], as made by [`UndoRecord::to_bytes`]:
//! * if the value starts with `{`, it is the record's JSON;
//! * if it starts with `Z`, the rest is that JSON compressed with zlib (RFC 1950); records
//!   whose JSON is larger than [`COMPRESS_THRESHOLD`] are stored this way.
//!
//! ```json
//! {"version": 1,
//!  "items": [{"kind": "update", "schema": "shop", "table": "orders",
//!             "columns": [{"name": "id", "encoding": "text", "generated": false},
//!                         {"name": "note", "encoding": "hex", "generated": false}],
//!             "primary_key": [0],
//!             "before": [["7", "6F6C64"]],
//!             "after": [["7", "6E6577"]]}]}
//! ```
//!
//! `kind` is `insert` (no `before` rows), `update` (`before` and `after` rows with the same
//! keys, in any order) or `delete` (no `after` rows); items are in the order the statements
//! ran, and a rollback undoes them last first. `primary_key` holds indexes into `columns`, in
//! key order. Each row has one value per column: the text the column's read expression gave
//! (`[0-9A-F]*` for hex and char, a number, a date...) or `null`. Primary-key values are never
//! null.
//!
//! # Rollback of one item
//!
//! In one local transaction on the service connection (`time_zone = '+00:00'`, `sql_mode =`
//! [`RESTORE_SQL_MODE`](crate::sql::image::RESTORE_SQL_MODE)), items last first:
//! 1. [`current_rows_query`]: the rows with the image's keys, read with the same select list,
//!    locked;
//! 2. [`dirty_check`]: equal to the before image: [`Verdict::AlreadyRestored`] (also for a
//!    write that changed nothing); equal to the after image: [`Verdict::Restore`]; else
//!    [`Verdict::Dirty`] with what differs, and nothing may be overwritten;
//! 3. [`compensation`]: the statements that put the before image back;
//! 4. optionally, reading the rows again must now give [`Verdict::AlreadyRestored`] — a
//!    cheap proof that nothing was truncated or converted.
//!
//! # Limits
//!
//! * A FLOAT `-0` in a primary key cannot be found by `WHERE` (`-1e-50` is not `-0` when
//!   compared): the rollback then sees the row missing and reports it dirty.
//! * A TIMESTAMP key found from a session that is not at `+00:00` (a `WHERE` built with
//!   [`Encoding::write_expr`] on the client's connection) compares in that session's local time: a
//!   zero timestamp does not match there, and inside a daylight-saving fold both instants do.
//! * A session whose `character_set_connection` is UTF-16/UTF-32/UCS-2 makes `HEX` answer in
//!   that character set; [`UndoItem::validate`] rejects such images.
//! * An update's primary key must not change (before and after rows are matched by key);
//!   restoring row by row may hit a transient duplicate on another unique key when the
//!   statement swapped values between rows.
//! * The table must keep its shape between phase 1 and the rollback.
//! * MySQL (not MariaDB) refuses a binary string for a JSON column, and has no `INET6`/`UUID`.

use std::collections::HashMap;
use std::fmt::Write as _;

use mysql_async::Value;
use serde::{Deserialize, Serialize};

use crate::sql::ident;
use crate::sql::image::{ColumnSpec, Encoding, ImageRow, RawRow, list};

/// The `version` of records this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Records whose JSON is larger than this are compressed.
pub const COMPRESS_THRESHOLD: usize = 64 * 1024;

/// Marks a compressed record (its first byte); a plain one starts with `{`.
const COMPRESSED: u8 = b'Z';

/// zlib level: phase 1 waits for it, and the images (hex, digits) compress well even fast.
const COMPRESSION_LEVEL: u8 = 1;

/// A decompressed record may not be larger than a LONGBLOB.
const MAX_DECOMPRESSED: u64 = 4 << 30;

/// What the statement the item undoes did.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Insert,
    Update,
    Delete,
}

/// A column of an item's images.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ImageColumn {
    pub name: String,
    pub encoding: Encoding,
    pub generated: bool,
}

impl From<&ColumnSpec> for ImageColumn {
    fn from(c: &ColumnSpec) -> ImageColumn {
        ImageColumn {
            name: c.name.clone(),
            encoding: c.encoding(),
            generated: c.generated,
        }
    }
}

/// The images of one statement on one table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct UndoItem {
    pub kind: Kind,
    pub schema: String,
    pub table: String,
    pub columns: Vec<ImageColumn>,
    /// Indexes into `columns`, in key order.
    pub primary_key: Vec<usize>,
    /// Empty for `Insert`.
    pub before: Vec<ImageRow>,
    /// Empty for `Delete`.
    pub after: Vec<ImageRow>,
}

/// A damaged or unreadable undo record, or images this module cannot use.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error("the undo record is empty")]
    Empty,
    #[error("the undo record starts with byte {0:#04x}, neither JSON nor a compressed record")]
    UnknownFormat(u8),
    #[error("the undo record does not decompress: {0}")]
    Decompress(String),
    #[error("the undo record is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the undo record has version {0}; this proxy reads version {FORMAT_VERSION}")]
    Version(u32),
    #[error("undo item for {table}: {why}")]
    Invalid { table: String, why: String },
}

impl UndoItem {
    /// An item from images read with [`select_list`] of `columns`.
    pub fn new(
        kind: Kind,
        schema: &str,
        table: &str,
        columns: &[ColumnSpec],
        primary_key: Vec<usize>,
        before: Vec<ImageRow>,
        after: Vec<ImageRow>,
    ) -> UndoItem {
        UndoItem {
            kind,
            schema: schema.to_owned(),
            table: table.to_owned(),
            columns: columns.iter().map(ImageColumn::from).collect(),
            primary_key,
            before,
            after,
        }
    }

    /// Checks that the item is one the functions of this module handle: at least one column,
    /// a primary key of distinct columns, rows of the right width whose values fit their
    /// encodings, non-NULL and distinct keys, and rows that suit the kind (an update's before
    /// and after rows have the same keys). Phase 1 should check its items before it writes
    /// them; [`UndoRecord::from_bytes`] checks every item.
    pub fn validate(&self) -> Result<(), UndoError> {
        let invalid = |why: String| UndoError::Invalid {
            table: format!("{}.{}", self.schema, self.table),
            why,
        };
        if self.columns.is_empty() {
            return Err(invalid("no columns".into()));
        }
        if self.primary_key.is_empty() {
            return Err(invalid("no primary key".into()));
        }
        for (n, &i) in self.primary_key.iter().enumerate() {
            if i >= self.columns.len() || self.primary_key[..n].contains(&i) {
                return Err(invalid(format!(
                    "primary-key column index {i} is out of range or repeated"
                )));
            }
        }
        match self.kind {
            Kind::Insert if !self.before.is_empty() => return Err(invalid("an insert with before rows".into())),
            Kind::Delete if !self.after.is_empty() => return Err(invalid("a delete with after rows".into())),
            _ => {}
        }
        for (image, rows) in [("before", &self.before), ("after", &self.after)] {
            let mut keys = std::collections::HashSet::new();
            for row in rows {
                if row.len() != self.columns.len() {
                    return Err(invalid(format!(
                        "a {image} row has {} values for {} columns",
                        row.len(),
                        self.columns.len()
                    )));
                }
                for (c, v) in self.columns.iter().zip(row) {
                    if let Some(v) = v
                        && !c.encoding.is_valid(v.as_bytes())
                    {
                        return Err(invalid(format!(
                            "{image} value {:?} of column {} is not {:?}-encoded",
                            shorten(v),
                            c.name,
                            c.encoding
                        )));
                    }
                }
                let key = self.key(row);
                if key.iter().any(Option::is_none) {
                    return Err(invalid(format!("a {image} row has a NULL primary-key value")));
                }
                if !keys.insert(key) {
                    return Err(invalid(format!("two {image} rows have the same primary key")));
                }
            }
        }
        if self.kind == Kind::Update {
            let before: std::collections::HashSet<_> = self.before.iter().map(|r| self.key(r)).collect();
            let after: std::collections::HashSet<_> = self.after.iter().map(|r| self.key(r)).collect();
            if before != after {
                return Err(invalid(
                    "the before and after rows of an update have different keys".into(),
                ));
            }
        }
        Ok(())
    }

    fn key<'a>(&self, row: &'a [Option<String>]) -> Vec<Option<&'a str>> {
        self.primary_key
            .iter()
            .map(|&i| row.get(i).and_then(|v| v.as_deref()))
            .collect()
    }

    /// The rows a rollback looks for: the after rows of an insert or update, the before rows
    /// of a delete.
    pub fn key_rows(&self) -> &[ImageRow] {
        match self.kind {
            Kind::Insert | Kind::Update => &self.after,
            Kind::Delete => &self.before,
        }
    }

    /// The select list of the item's columns.
    pub fn select_list(&self) -> String {
        list(self.columns.iter().map(|c| (c.name.as_str(), c.encoding)), None)
    }

    fn table_sql(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.table))
    }

    /// `` `a` = UNHEX(?) AND `b` = ? `` for `row`'s key.
    fn key_condition(&self, row: &[Option<String>], params: &mut Vec<Value>) -> String {
        self.primary_key
            .iter()
            .map(|&i| {
                let c = &self.columns[i];
                params.push(c.encoding.param(value(row, i)));
                format!("{} = {}", ident(&c.name), c.encoding.write_expr())
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

fn value(row: &[Option<String>], i: usize) -> Option<&str> {
    row.get(i).and_then(|v| v.as_deref())
}

fn shorten(v: &str) -> String {
    v.chars().take(40).collect()
}

/// The undo record of one branch: its items, in the order the statements ran.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct UndoRecord {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    pub items: Vec<UndoItem>,
}

impl UndoRecord {
    pub fn new(items: Vec<UndoItem>) -> UndoRecord {
        UndoRecord {
            version: FORMAT_VERSION,
            items,
        }
    }

    /// The value for `undo_log.rollback_info`: the JSON, compressed if larger than
    /// [`COMPRESS_THRESHOLD`] (see the module documentation).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings, numbers and unit enums: serializing cannot fail.
        let json = serde_json::to_vec(self).expect("an undo record serializes to JSON");
        if json.len() <= COMPRESS_THRESHOLD {
            return json;
        }
        let mut out = Vec::with_capacity(json.len() / 4);
        out.push(COMPRESSED);
        out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec_zlib(&json, COMPRESSION_LEVEL));
        if out.len() < json.len() { out } else { json }
    }

    /// Reads a value written by [`UndoRecord::to_bytes`] and validates every item.
    pub fn from_bytes(bytes: &[u8]) -> Result<UndoRecord, UndoError> {
        let record: UndoRecord = match bytes.first() {
            None => return Err(UndoError::Empty),
            Some(b'{') => serde_json::from_slice(bytes)?,
            Some(&COMPRESSED) => {
                let limit = usize::try_from(MAX_DECOMPRESSED).unwrap_or(usize::MAX);
                let json = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&bytes[1..], limit)
                    .map_err(|e| UndoError::Decompress(e.to_string()))?;
                serde_json::from_slice(&json)?
            }
            Some(&other) => return Err(UndoError::UnknownFormat(other)),
        };
        if record.version != FORMAT_VERSION {
            return Err(UndoError::Version(record.version));
        }
        for item in &record.items {
            item.validate()?;
        }
        Ok(record)
    }
}

/// The statements, with `?` parameters, that put an item's before image back:
/// * insert: `DELETE FROM s.t WHERE <key>` per after row;
/// * update: `UPDATE s.t SET <every column but the key and generated ones> WHERE <key>` per
///   before row (none when there is nothing but key and generated columns);
/// * delete: `INSERT INTO s.t (<every column but generated ones>) VALUES (...)` per before row.
///
/// Run them only after [`dirty_check`] said [`Verdict::Restore`], under
/// [`RESTORE_SQL_MODE`](crate::sql::image::RESTORE_SQL_MODE) and `time_zone = '+00:00'`. The item should have passed
/// [`UndoItem::validate`].
pub fn compensation(item: &UndoItem) -> Vec<(String, Vec<Value>)> {
    let table = item.table_sql();
    match item.kind {
        Kind::Insert => item
            .after
            .iter()
            .map(|row| {
                let mut params = Vec::new();
                let cond = item.key_condition(row, &mut params);
                (format!("DELETE FROM {table} WHERE {cond}"), params)
            })
            .collect(),
        Kind::Update => {
            let set: Vec<usize> = (0..item.columns.len())
                .filter(|i| !item.columns[*i].generated && !item.primary_key.contains(i))
                .collect();
            if set.is_empty() {
                return Vec::new();
            }
            item.before
                .iter()
                .map(|row| {
                    let mut params = Vec::new();
                    let mut sql = format!("UPDATE {table} SET ");
                    for (n, &i) in set.iter().enumerate() {
                        let c = &item.columns[i];
                        if n > 0 {
                            sql.push_str(", ");
                        }
                        let _ = write!(sql, "{} = {}", ident(&c.name), c.encoding.write_expr());
                        params.push(c.encoding.param(value(row, i)));
                    }
                    let cond = item.key_condition(row, &mut params);
                    let _ = write!(sql, " WHERE {cond}");
                    (sql, params)
                })
                .collect()
        }
        Kind::Delete => {
            let cols: Vec<usize> = (0..item.columns.len())
                .filter(|i| !item.columns[*i].generated)
                .collect();
            let names = cols
                .iter()
                .map(|&i| ident(&item.columns[i].name))
                .collect::<Vec<_>>()
                .join(", ");
            let exprs = cols
                .iter()
                .map(|&i| item.columns[i].encoding.write_expr())
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!("INSERT INTO {table} ({names}) VALUES ({exprs})");
            item.before
                .iter()
                .map(|row| {
                    let params = cols
                        .iter()
                        .map(|&i| item.columns[i].encoding.param(value(row, i)))
                        .collect();
                    (sql.clone(), params)
                })
                .collect()
        }
    }
}

/// `SELECT <select list> FROM s.t WHERE <key> IN (...) FOR UPDATE` for the item's
/// [`UndoItem::key_rows`]: the rows [`dirty_check`] compares.
pub fn current_rows_query(item: &UndoItem) -> (String, Vec<Value>) {
    rows_query(item, item.key_rows(), Lock::ForUpdate)
}

/// Whether a read of current rows locks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lock {
    ForUpdate,
    /// A consistent read that waits for nobody (an operator's look).
    None,
}

/// [`current_rows_query`] in pieces of at most `rows_per_query` keys (a prepared statement
/// takes at most 65535 parameters). The caller concatenates the rows they return.
pub fn current_rows_queries(item: &UndoItem, rows_per_query: usize, lock: Lock) -> Vec<(String, Vec<Value>)> {
    let rows = item.key_rows();
    if rows.is_empty() {
        return vec![rows_query(item, rows, lock)];
    }
    rows.chunks(rows_per_query.max(1))
        .map(|chunk| rows_query(item, chunk, lock))
        .collect()
}

fn rows_query(item: &UndoItem, rows: &[ImageRow], lock: Lock) -> (String, Vec<Value>) {
    let mut params = Vec::new();
    let cond = if rows.is_empty() {
        "FALSE".to_owned()
    } else {
        let key: Vec<&ImageColumn> = item.primary_key.iter().map(|&i| &item.columns[i]).collect();
        let names = key.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ");
        let tuples = rows
            .iter()
            .map(|row| {
                let values = item
                    .primary_key
                    .iter()
                    .map(|&i| {
                        let c = &item.columns[i];
                        params.push(c.encoding.param(value(row, i)));
                        c.encoding.write_expr()
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                if key.len() == 1 { values } else { format!("({values})") }
            })
            .collect::<Vec<_>>()
            .join(", ");
        if key.len() == 1 {
            format!("{names} IN ({tuples})")
        } else {
            format!("({names}) IN ({tuples})")
        }
    };
    let lock = match lock {
        Lock::ForUpdate => " FOR UPDATE",
        Lock::None => "",
    };
    (
        format!(
            "SELECT {} FROM {} WHERE {cond}{lock}",
            item.select_list(),
            item.table_sql()
        ),
        params,
    )
}

/// What a rollback may do with an item.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The rows are as the branch left them: run [`compensation`].
    Restore,
    /// The rows already equal the before image (an inserted row someone deleted, a rollback
    /// that already ran): nothing to do.
    AlreadyRestored,
    /// Someone changed the rows after the branch: overwrite nothing. The detail names the
    /// table and, for every row that is not as the branch left it, its key, its state and the
    /// columns that differ:
    /// ```json
    /// {"schema": "shop", "table": "orders", "kind": "update",
    ///  "rows": [{"primary_key": {"id": "7"}, "state": "changed",
    ///            "columns": [{"column": "note", "encoding": "hex",
    ///                         "before": "6F6C64", "after": "6E6577", "current": "78"}]},
    ///           {"primary_key": {"id": "8"}, "state": "missing"}]}
    /// ```
    /// `state` is `changed` (the row differs from the after image; `columns` lists the
    /// columns that do), `missing` (the after image has the row, the table does not),
    /// `restored` (the row already equals its before image, while others do not) or
    /// `unexpected` (the table has a row the after image does not, e.g. one inserted where a
    /// deleted row must go back; `columns` lists those that differ from the before image, or
    /// all without a before row). Values are as in the images.
    Dirty(serde_json::Value),
}

/// Compares the rows [`current_rows_query`] found with the item's images. Rows are matched
/// by primary key, in any order.
pub fn dirty_check(item: &UndoItem, current: &[RawRow]) -> Verdict {
    let width = item.columns.len();
    if let Some(bad) = current.iter().find(|r| r.len() != width) {
        return Verdict::Dirty(serde_json::json!({
            "schema": item.schema,
            "table": item.table,
            "kind": item.kind,
            "error": format!("a current row has {} values, the images {width} columns: the table changed shape", bad.len()),
        }));
    }
    let current = raw_rows(current);
    let after: Vec<Vec<Option<&[u8]>>> = item.after.iter().map(as_bytes).collect();
    let before: Vec<Vec<Option<&[u8]>>> = item.before.iter().map(as_bytes).collect();
    // The before image first: for a write that changed nothing both match, and there is
    // nothing to restore (the read-back after a restore must say so too).
    if same_rows(&item.primary_key, &before, &current) {
        return Verdict::AlreadyRestored;
    }
    if same_rows(&item.primary_key, &after, &current) {
        return Verdict::Restore;
    }
    Verdict::Dirty(detail(item, &before, &after, &current))
}

/// What a restore left that is not the before image, read back in the same transaction:
/// for every row that differs, its key and the columns whose value is not the one written,
/// ```json
/// {"schema": "shop", "table": "orders", "kind": "update",
///  "rows": [{"primary_key": {"id": "7"}, "state": "not_restored",
///            "columns": [{"column": "v", "encoding": "text", "before": "10", "read_back": "1000"}]}]}
/// ```
/// `state` is `not_restored`, `missing` (a before row the table does not have) or
/// `unexpected` (a row read back that the before image does not have). Values are as in the
/// images.
pub fn restore_mismatch(item: &UndoItem, read_back: &[RawRow]) -> serde_json::Value {
    let pk = &item.primary_key;
    let before: Vec<Row> = item.before.iter().map(as_bytes).collect();
    let read_back = raw_rows(read_back);
    let key_json = |row: &Row| key_json(item, row);
    let before_by_key: HashMap<_, &Row> = before.iter().map(|r| (key_of(pk, r), r)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut rows = Vec::new();
    for row in read_back.iter().filter(|r| r.len() == item.columns.len()) {
        let key = key_of(pk, row);
        seen.insert(key.clone());
        match before_by_key.get(&key) {
            Some(b) if *b == row => {}
            Some(b) => {
                let columns: Vec<_> = (0..row.len())
                    .filter(|&i| b[i] != row[i])
                    .map(|i| {
                        serde_json::json!({
                            "column": item.columns[i].name,
                            "encoding": item.columns[i].encoding,
                            "before": text(b[i]),
                            "read_back": text(row[i]),
                        })
                    })
                    .collect();
                rows.push(
                    serde_json::json!({"primary_key": key_json(row), "state": "not_restored", "columns": columns}),
                );
            }
            None => rows.push(serde_json::json!({"primary_key": key_json(row), "state": "unexpected"})),
        }
    }
    for b in &before {
        if !seen.contains(&key_of(pk, b)) {
            rows.push(serde_json::json!({"primary_key": key_json(b), "state": "missing"}));
        }
    }
    rows_report(item, rows)
}

type Row<'a> = Vec<Option<&'a [u8]>>;

fn as_bytes(row: &ImageRow) -> Row<'_> {
    row.iter().map(|v| v.as_deref().map(str::as_bytes)).collect()
}

fn raw_rows(rows: &[RawRow]) -> Vec<Row<'_>> {
    rows.iter().map(|r| r.iter().map(|v| v.as_deref()).collect()).collect()
}

/// A row's primary key, by column name, for a report.
fn key_json(item: &UndoItem, row: &Row) -> serde_json::Value {
    item.primary_key
        .iter()
        .map(|&i| (item.columns[i].name.clone(), text(row[i])))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A report on `item`'s rows: its table and kind, and one entry per row.
fn rows_report(item: &UndoItem, rows: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({
        "schema": item.schema,
        "table": item.table,
        "kind": item.kind,
        "rows": rows,
    })
}

fn key_of<'a>(pk: &[usize], row: &Row<'a>) -> Vec<Option<&'a [u8]>> {
    pk.iter().map(|&i| row[i]).collect()
}

/// Whether `a` and `b` hold the same rows, matched by key.
fn same_rows(pk: &[usize], a: &[Row], b: &[Row]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let by_key: HashMap<_, &Row> = a.iter().map(|r| (key_of(pk, r), r)).collect();
    let mut seen = std::collections::HashSet::new();
    b.iter().all(|r| {
        let k = key_of(pk, r);
        by_key.get(&k).is_some_and(|x| *x == r) && seen.insert(k)
    })
}

fn text(v: Option<&[u8]>) -> serde_json::Value {
    match v {
        None => serde_json::Value::Null,
        Some(b) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
    }
}

fn detail(item: &UndoItem, before: &[Row], after: &[Row], current: &[Row]) -> serde_json::Value {
    let pk = &item.primary_key;
    let before_by_key: HashMap<_, &Row> = before.iter().map(|r| (key_of(pk, r), r)).collect();
    let after_by_key: HashMap<_, &Row> = after.iter().map(|r| (key_of(pk, r), r)).collect();
    let mut current_by_key: HashMap<_, &Row> = HashMap::new();
    let mut rows = Vec::new();
    let key_json = |row: &Row| key_json(item, row);
    let column = |i: usize, b: Option<&Row>, a: Option<&Row>, c: Option<&Row>| {
        let col = &item.columns[i];
        serde_json::json!({
            "column": col.name,
            "encoding": col.encoding,
            "before": b.map_or(serde_json::Value::Null, |r| text(r[i])),
            "after": a.map_or(serde_json::Value::Null, |r| text(r[i])),
            "current": c.map_or(serde_json::Value::Null, |r| text(r[i])),
        })
    };
    for row in current {
        let key = key_of(pk, row);
        if current_by_key.insert(key.clone(), row).is_some() {
            rows.push(serde_json::json!({"primary_key": key_json(row), "state": "duplicate"}));
            continue;
        }
        let b = before_by_key.get(&key).copied();
        match after_by_key.get(&key).copied() {
            Some(a) if a == row => {}
            _ if b == Some(row) => {
                rows.push(serde_json::json!({"primary_key": key_json(row), "state": "restored"}));
            }
            Some(a) => {
                let columns: Vec<_> = (0..row.len())
                    .filter(|&i| a[i] != row[i])
                    .map(|i| column(i, b, Some(a), Some(row)))
                    .collect();
                rows.push(serde_json::json!({"primary_key": key_json(row), "state": "changed", "columns": columns}));
            }
            None => {
                let columns: Vec<_> = (0..row.len())
                    .filter(|&i| b.is_none_or(|b| b[i] != row[i]))
                    .map(|i| column(i, b, None, Some(row)))
                    .collect();
                rows.push(serde_json::json!({"primary_key": key_json(row), "state": "unexpected", "columns": columns}));
            }
        }
    }
    for a in after {
        if !current_by_key.contains_key(&key_of(pk, a)) {
            rows.push(serde_json::json!({"primary_key": key_json(a), "state": "missing"}));
        }
    }
    rows_report(item, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::image::{RESTORE_SQL_MODE, raw_row, select_list};
    use ferrata_testkit::MariaDb;
    use mysql_async::prelude::*;
    use mysql_async::{Conn, Row};

    type Result<T = ()> = anyhow::Result<T>;

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    fn item(kind: Kind, before: Vec<ImageRow>, after: Vec<ImageRow>) -> UndoItem {
        let columns = [
            ColumnSpec::new("id", "int", false),
            ColumnSpec::new("name", "varchar", false),
            ColumnSpec::new("n", "bit", false),
            ColumnSpec::new("g", "int", true),
        ];
        UndoItem::new(kind, "shop", "t`x", &columns, vec![0], before, after)
    }

    fn raw(rows: &[ImageRow]) -> Vec<RawRow> {
        rows.iter()
            .map(|r| r.iter().map(|v| v.as_ref().map(|v| v.as_bytes().to_vec())).collect())
            .collect()
    }

    #[test]
    fn compensation_sql() {
        let before = vec![vec![s("1"), s("6162"), s("5"), s("2")]];
        let after = vec![vec![s("1"), s("6364"), None, s("2")]];
        let stmts = compensation(&item(Kind::Update, before.clone(), after.clone()));
        assert_eq!(
            stmts,
            [(
                "UPDATE `shop`.`t``x` SET `name` = UNHEX(?), `n` = CAST(? AS UNSIGNED) WHERE `id` = ?".to_owned(),
                vec![Value::from("6162"), Value::UInt(5), Value::from("1")]
            )]
        );
        let stmts = compensation(&item(Kind::Insert, vec![], after.clone()));
        assert_eq!(
            stmts,
            [(
                "DELETE FROM `shop`.`t``x` WHERE `id` = ?".to_owned(),
                vec![Value::from("1")]
            )]
        );
        let stmts = compensation(&item(Kind::Delete, before.clone(), vec![]));
        assert_eq!(
            stmts,
            [(
                "INSERT INTO `shop`.`t``x` (`id`, `name`, `n`) VALUES (?, UNHEX(?), CAST(? AS UNSIGNED))".to_owned(),
                vec![Value::from("1"), Value::from("6162"), Value::UInt(5)]
            )]
        );
        let (sql, params) = current_rows_query(&item(Kind::Delete, before, vec![]));
        assert!(
            sql.ends_with("FROM `shop`.`t``x` WHERE `id` IN (?) FOR UPDATE"),
            "{sql}"
        );
        assert_eq!(params, [Value::from("1")]);
    }

    #[test]
    fn composite_keys_and_chunks() {
        let columns = [
            ColumnSpec::new("a", "int", false),
            ColumnSpec::new("b", "varchar", false),
            ColumnSpec::new("v", "int", false),
        ];
        let rows: Vec<ImageRow> = (0..5).map(|i| vec![s(&i.to_string()), s("41"), None]).collect();
        let it = UndoItem::new(Kind::Insert, "d", "t", &columns, vec![1, 0], vec![], rows);
        let (sql, params) = current_rows_query(&it);
        assert!(
            sql.ends_with("WHERE (`b`, `a`) IN ((UNHEX(?), ?), (UNHEX(?), ?), (UNHEX(?), ?), (UNHEX(?), ?), (UNHEX(?), ?)) FOR UPDATE"),
            "{sql}"
        );
        assert_eq!(params.len(), 10);
        let chunks = current_rows_queries(&it, 2, Lock::ForUpdate);
        assert_eq!(chunks.iter().map(|(_, p)| p.len()).collect::<Vec<_>>(), [4, 4, 2]);
        let look = current_rows_queries(&it, 5, Lock::None);
        assert_eq!(look.len(), 1);
        assert!(
            look[0].0.ends_with("(UNHEX(?), ?))"),
            "an operator's look locks nothing: {}",
            look[0].0
        );
        let empty = UndoItem::new(Kind::Insert, "d", "t", &columns, vec![0], vec![], vec![]);
        assert!(current_rows_query(&empty).0.contains("WHERE FALSE FOR UPDATE"));
        assert_eq!(compensation(&empty), []);
    }

    #[test]
    fn verdicts() {
        let before = vec![
            vec![s("1"), s("6162"), s("5"), s("2")],
            vec![s("2"), None, s("0"), s("3")],
        ];
        let after = vec![
            vec![s("1"), s("6364"), s("5"), s("2")],
            vec![s("2"), s("00"), s("0"), s("3")],
        ];
        let it = item(Kind::Update, before.clone(), after.clone());
        // Any order.
        let mut reversed = after.clone();
        reversed.reverse();
        assert_eq!(dirty_check(&it, &raw(&reversed)), Verdict::Restore);
        assert_eq!(dirty_check(&it, &raw(&before)), Verdict::AlreadyRestored);

        let mut current = after.clone();
        current[0][1] = s("FF");
        let Verdict::Dirty(d) = dirty_check(&it, &raw(&current)) else {
            panic!("not dirty")
        };
        assert_eq!(
            d,
            serde_json::json!({"schema": "shop", "table": "t`x", "kind": "update", "rows": [
                {"primary_key": {"id": "1"}, "state": "changed", "columns": [
                    {"column": "name", "encoding": "hex", "before": "6162", "after": "6364", "current": "FF"}]}]})
        );
        let Verdict::Dirty(d) = dirty_check(&it, &raw(&after[..1])) else {
            panic!("not dirty")
        };
        assert_eq!(
            d["rows"],
            serde_json::json!([{"primary_key": {"id": "2"}, "state": "missing"}])
        );
        // Half restored is not restored.
        assert!(matches!(
            dirty_check(&it, &raw(&[after[0].clone(), before[1].clone()])),
            Verdict::Dirty(_)
        ));

        // An inserted row someone deleted: nothing to do.
        let ins = item(Kind::Insert, vec![], after.clone());
        assert_eq!(dirty_check(&ins, &[]), Verdict::AlreadyRestored);
        assert_eq!(dirty_check(&ins, &raw(&after)), Verdict::Restore);
        // A deleted row whose key someone reused.
        let del = item(Kind::Delete, before.clone(), vec![]);
        assert_eq!(dirty_check(&del, &[]), Verdict::Restore);
        assert_eq!(dirty_check(&del, &raw(&before)), Verdict::AlreadyRestored);
        // An UPDATE that changed nothing (found by the recorded fuzz-seed session: its
        // rollback read back as the after image, which is the before image, and stopped).
        let same = item(Kind::Update, before.clone(), before.clone());
        assert_eq!(dirty_check(&same, &raw(&before)), Verdict::AlreadyRestored);
        let Verdict::Dirty(d) = dirty_check(&del, &raw(&after[..1])) else {
            panic!("not dirty")
        };
        assert_eq!(d["rows"][0]["state"], "unexpected");
        assert_eq!(d["rows"][0]["columns"][0]["column"], "name");
        assert_eq!(d["rows"][0]["columns"][0]["after"], serde_json::Value::Null);
        // A row of another shape.
        assert!(matches!(dirty_check(&del, &[vec![None]]), Verdict::Dirty(_)));
    }

    #[test]
    fn records_round_trip_and_validate() -> Result {
        let before = vec![vec![s("1"), s("6162"), s("5"), s("2")]];
        let after = vec![vec![s("1"), s("6364"), None, s("2")]];
        let record = UndoRecord::new(vec![item(Kind::Update, before.clone(), after.clone())]);
        let bytes = record.to_bytes();
        assert_eq!(bytes[0], b'{');
        let json: serde_json::Value = serde_json::from_slice(&bytes)?;
        assert_eq!(json["version"], 1);
        assert_eq!(json["items"][0]["kind"], "update");
        assert_eq!(
            json["items"][0]["columns"][2],
            serde_json::json!({"name": "n", "encoding": "unsigned", "generated": false})
        );
        assert_eq!(json["items"][0]["after"][0][2], serde_json::Value::Null);
        assert_eq!(UndoRecord::from_bytes(&bytes)?, record);

        // Large: compressed, and back.
        let big = "0123456789ABCDEF".repeat(400_000);
        let mut r = vec![s("1"), Some(big), s("5"), s("2")];
        let record = UndoRecord::new(vec![item(Kind::Delete, vec![r.clone()], vec![])]);
        let bytes = record.to_bytes();
        assert_eq!(bytes[0], b'Z');
        assert!(bytes.len() < 100_000, "{}", bytes.len());
        assert_eq!(UndoRecord::from_bytes(&bytes)?, record);

        // Damaged records.
        assert!(matches!(UndoRecord::from_bytes(b""), Err(UndoError::Empty)));
        assert!(matches!(
            UndoRecord::from_bytes(b"xyz"),
            Err(UndoError::UnknownFormat(b'x'))
        ));
        assert!(matches!(
            UndoRecord::from_bytes(&bytes[..bytes.len() / 2]),
            Err(UndoError::Decompress(_))
        ));
        assert!(matches!(
            UndoRecord::from_bytes(br#"{"version": 2, "items": []}"#),
            Err(UndoError::Version(2))
        ));
        assert!(matches!(UndoRecord::from_bytes(b"{nope"), Err(UndoError::Json(_))));
        for bad in [
            item(Kind::Update, before.clone(), vec![]),
            item(Kind::Insert, before.clone(), after.clone()),
            item(Kind::Delete, vec![vec![s("1"), s("6G"), None, None]], vec![]),
            item(Kind::Delete, vec![vec![s("1"), s("616"), None, None]], vec![]),
            item(Kind::Delete, vec![vec![s("1"), None, s("-1"), None]], vec![]),
            item(Kind::Delete, vec![vec![s("1'"), None, None, None]], vec![]),
            item(Kind::Delete, vec![vec![None, None, None, None]], vec![]),
            item(Kind::Delete, vec![vec![s("1"), None, None]], vec![]),
            item(
                Kind::Delete,
                vec![vec![s("1"), None, None, None], vec![s("1"), None, None, None]],
                vec![],
            ),
        ] {
            let bytes = UndoRecord::new(vec![bad.clone()]).to_bytes();
            assert!(
                matches!(UndoRecord::from_bytes(&bytes), Err(UndoError::Invalid { .. })),
                "{bad:?}"
            );
        }
        r[1] = s("");
        item(Kind::Delete, vec![r], vec![]).validate()?;
        Ok(())
    }

    // ---- Against a real MariaDB ----

    /// One column of the type matrix: name, type, and two values (SQL expressions).
    struct Col {
        name: &'static str,
        ddl: &'static str,
        v1: &'static str,
        v2: &'static str,
    }

    const fn col(name: &'static str, ddl: &'static str, v1: &'static str, v2: &'static str) -> Col {
        Col { name, ddl, v1, v2 }
    }

    /// Every type, with values at the edges. Written with `sql_mode = ''` and
    /// `time_zone = '+00:00'`.
    const MATRIX: &[Col] = &[
        col("ti", "TINYINT", "-128", "127"),
        col("tiu", "TINYINT UNSIGNED", "255", "0"),
        col("si", "SMALLINT", "-32768", "32767"),
        col("siu", "SMALLINT UNSIGNED", "65535", "1"),
        col("mi", "MEDIUMINT", "-8388608", "8388607"),
        col("miu", "MEDIUMINT UNSIGNED", "16777215", "2"),
        col("i", "INT", "-2147483648", "2147483647"),
        col("iu", "INT UNSIGNED", "4294967295", "3"),
        col("bi", "BIGINT", "-9223372036854775808", "9223372036854775807"),
        col("biu", "BIGINT UNSIGNED", "18446744073709551615", "4"),
        col("iz", "INT(6) UNSIGNED ZEROFILL", "42", "0"),
        col(
            "de",
            "DECIMAL(65,30)",
            "-12345678901234567890123456789012345.123456789012345678901234567891",
            "0.000000000000000000000000000001",
        ),
        col("de0", "DECIMAL(5,0)", "99999", "-99999"),
        col("f", "FLOAT", "1.1234567", "3.4028235e38"),
        // -1e-50 underflows to a FLOAT -0; 1e-45 is the smallest denormal.
        col("fz", "FLOAT", "-1e-50", "1e-45"),
        col("fmd", "FLOAT(7,3)", "2.125", "-1234.567"),
        col("d", "DOUBLE", "0.1", "1e308"),
        // A DOUBLE column stores -0 as +0.
        col("dz", "DOUBLE", "-0e0", "5e-324"),
        col("dm", "DOUBLE", "-1.7976931348623157e308", "2.2250738585072009e-308"),
        col("dmd", "DOUBLE(12,4)", "12345678.1234", "-0.0001"),
        col("b1", "BIT(1)", "b'1'", "b'0'"),
        col("b5", "BIT(5)", "b'10101'", "b'00001'"),
        col("b64", "BIT(64)", "0xFFFFFFFFFFFFFFFF", "0x8000000000000001"),
        col("c", "CHAR(10) CHARACTER SET utf8mb4", "'ab😀'", "' x'"),
        col("cu", "CHAR(4) CHARACTER SET ucs2", "'é'", "''"),
        col("vc", "VARCHAR(50) CHARACTER SET utf8mb4", "'x😀  '", "''"),
        col("vl", "VARCHAR(20) CHARACTER SET latin1", "'é'", "'ÿ\\\\'"),
        col("bn", "BINARY(4)", "0x00FF", "0xFFFFFFFF"),
        col("vb", "VARBINARY(10)", "0x00FF00", "X''"),
        col("bl", "BLOB", "0x00FF00FF0D0A27225C", "0x00"),
        col("tx", "TEXT CHARACTER SET utf8mb4", "'text 😀 ''quoted'''", "'ü'"),
        col("en", "ENUM('a','b','c')", "'b'", "''"),
        col("en_num", "ENUM('10','20','30')", "'20'", "'30'"),
        col("st", "SET('x','y','z')", "'x,z'", "''"),
        col("j", "JSON", r#"'{"a": [1, 2.50, "😀"]}'"#, "'[]'"),
        col(
            "g",
            "GEOMETRY",
            "ST_GeomFromText('POLYGON((0 0,10 0,10 10,0 10,0 0))')",
            "ST_GeomFromText('POINT(1 2)', 4326)",
        ),
        col("p", "POINT", "POINT(1.5, -2)", "POINT(0, 0)"),
        col("da", "DATE", "'2024-02-29'", "'0000-00-00'"),
        col(
            "dt",
            "DATETIME(6)",
            "'2024-10-27 02:30:00.123456'",
            "'9999-12-31 23:59:59.999999'",
        ),
        col("dt0", "DATETIME", "'0000-00-00 00:00:00'", "'2024-00-00 00:00:00'"),
        // Both are 2024-10-27 02:30:00.5 in Europe/Berlin (the autumn fold).
        col(
            "ts",
            "TIMESTAMP(6) NULL DEFAULT NULL",
            "FROM_UNIXTIME(1729992600.5)",
            "FROM_UNIXTIME(1729989000.5)",
        ),
        col("tsz", "TIMESTAMP NULL DEFAULT NULL", "0", "FROM_UNIXTIME(1)"),
        col(
            "tsm",
            "TIMESTAMP(6) NULL DEFAULT NULL",
            "FROM_UNIXTIME(2147483647.999999)",
            "0",
        ),
        col("tm", "TIME(6)", "'-838:59:59.999999'", "'838:59:59.999999'"),
        col("tm0", "TIME", "'-00:00:01'", "'00:00:00'"),
        col("y", "YEAR", "1901", "0"),
        col("i6", "INET6", "'::ffff:1.2.3.4'", "'::'"),
        col(
            "u",
            "UUID",
            "'123e4567-e89b-12d3-a456-426655440000'",
            "'00000000-0000-0000-0000-000000000000'",
        ),
    ];

    /// The matrix table `m` (composite key, generated columns) and `kx` (a key of exotic
    /// types), three rows each: values 1, all NULL, values 2.
    async fn setup(db: &MariaDb) -> Result<Conn> {
        let mut w = db.conn().await?;
        w.query_drop("SET time_zone = '+00:00', sql_mode = ''").await?;
        let mut ddl = String::from("CREATE TABLE m (k1 INT NOT NULL, k2 VARCHAR(20) CHARACTER SET utf8mb4 NOT NULL");
        for c in MATRIX {
            write!(ddl, ", `{}` {}", c.name, c.ddl)?;
        }
        ddl.push_str(
            ", gv INT AS (ti + 1) VIRTUAL, gs VARCHAR(100) AS (CONCAT(k2, '/', vc)) STORED, PRIMARY KEY (k1, k2))",
        );
        w.query_drop(ddl).await?;
        let names = MATRIX
            .iter()
            .map(|c| format!("`{}`", c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let v1 = MATRIX.iter().map(|c| c.v1).collect::<Vec<_>>().join(", ");
        let v2 = MATRIX.iter().map(|c| c.v2).collect::<Vec<_>>().join(", ");
        let nulls = MATRIX.iter().map(|_| "NULL").collect::<Vec<_>>().join(", ");
        w.query_drop(format!(
            "INSERT INTO m (k1, k2, {names}) VALUES (1, 'k😀', {v1}), (2, '', {nulls}), (3, 'é ', {v2})"
        ))
        .await?;
        w.query_drop(
            "CREATE TABLE kx (ts TIMESTAMP(6) NOT NULL DEFAULT 0, bt BIT(8) NOT NULL, en ENUM('p', 'q') NOT NULL, \
             c CHAR(5) CHARACTER SET latin1 NOT NULL, f FLOAT NOT NULL, v INT, PRIMARY KEY (ts, bt, en, c, f))",
        )
        .await?;
        w.query_drop(
            "INSERT INTO kx VALUES (0, 255, 'q', 'é', 1.1, 1), (FROM_UNIXTIME(1729992600.5), 0, 'p', '', -2.5e-40, 2), \
             (FROM_UNIXTIME(1729989000.5), b'1', '', 'a b', 3.4028235e38, NULL)",
        )
        .await?;
        Ok(w)
    }

    /// Loads Europe/Berlin into the time-zone tables, if this machine has the tools.
    async fn load_berlin(conn: &mut Conn) -> bool {
        let Ok(out) = std::process::Command::new("mariadb-tzinfo-to-sql")
            .args(["/usr/share/zoneinfo/Europe/Berlin", "Europe/Berlin"])
            .output()
        else {
            return false;
        };
        if !out.status.success() || conn.query_drop("USE mysql").await.is_err() {
            return false;
        }
        let loaded = conn
            .query_drop(String::from_utf8_lossy(&out.stdout).into_owned())
            .await
            .is_ok();
        conn.query_drop("USE test").await.is_ok() && loaded
    }

    /// A client session as unlike the rollback's as it gets.
    async fn client(db: &MariaDb) -> Result<Conn> {
        let mut c = db.conn().await?;
        c.query_drop("SET NAMES latin1, time_zone = '+05:30', sql_mode = 'PAD_CHAR_TO_FULL_LENGTH'")
            .await?;
        Ok(c)
    }

    async fn specs(conn: &mut Conn, table: &str) -> Result<(Vec<ColumnSpec>, Vec<usize>)> {
        let cols: Vec<(String, String, String)> = conn
            .exec(
                "SELECT COLUMN_NAME, LOWER(DATA_TYPE), EXTRA FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = 'test' AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (table,),
            )
            .await?;
        let specs: Vec<ColumnSpec> = cols
            .into_iter()
            .map(|(name, t, extra)| {
                let t = if name == "j" { "json".to_owned() } else { t };
                ColumnSpec::new(name, t, extra.contains("GENERATED"))
            })
            .collect();
        let pk: Vec<String> = conn
            .exec(
                "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = 'test' \
                 AND TABLE_NAME = ? AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
                (table,),
            )
            .await?;
        let pk = pk
            .iter()
            .map(|n| specs.iter().position(|c| &c.name == n).unwrap())
            .collect();
        Ok((specs, pk))
    }

    /// An image, read over the text protocol as phase 1 does.
    async fn image(conn: &mut Conn, specs: &[ColumnSpec], table: &str, filter: &str) -> Result<Vec<ImageRow>> {
        let rows: Vec<Row> = conn
            .query(format!(
                "SELECT {} FROM {table} {filter} FOR UPDATE",
                select_list(specs)
            ))
            .await?;
        rows.into_iter()
            .map(|r| {
                raw_row(r)
                    .into_iter()
                    .map(|v| v.map(String::from_utf8).transpose().map_err(Into::into))
                    .collect()
            })
            .collect()
    }

    /// `sql` with its parameters inlined, for the text protocol.
    fn inline(sql: &str, params: &[Value]) -> String {
        let mut params = params.iter();
        sql.chars()
            .map(|c| match c {
                '?' => params.next().unwrap().as_sql(false),
                c => c.to_string(),
            })
            .collect()
    }

    /// Phase 2 for a record: items last first in one transaction, each checked, compensated
    /// and checked again; the verdicts, or the first dirty one (then nothing is committed).
    async fn rollback(db: &MariaDb, bytes: &[u8]) -> Result<Vec<Verdict>> {
        let record = UndoRecord::from_bytes(bytes)?;
        let mut conn = db.conn().await?;
        conn.query_drop(format!("SET time_zone = '+00:00', sql_mode = '{RESTORE_SQL_MODE}'"))
            .await?;
        let mut tx = conn.start_transaction(Default::default()).await?;
        let mut verdicts = Vec::new();
        for item in record.items.iter().rev() {
            // Binary protocol here, text protocol for the check after: the same bytes.
            let (sql, params) = current_rows_query(item);
            let rows: Vec<Row> = tx.exec(sql, params).await?;
            let current: Vec<RawRow> = rows.into_iter().map(raw_row).collect();
            let verdict = dirty_check(item, &current);
            match &verdict {
                Verdict::Restore => {
                    for (sql, params) in compensation(item) {
                        tx.exec_drop(&sql, params).await?;
                        // Only ENUM's '' error value is written with a warning, and a FLOAT(M,D)
                        // whose stored float prints above M digits (999999.999 stored as
                        // 1e6): written back it is clamped to the same float, which the
                        // byte comparison after the rollback checks.
                        let warnings: Vec<(String, u32, String)> = tx.query("SHOW WARNINGS").await?;
                        for w in &warnings {
                            assert!(
                                w.2 == "Data truncated for column 'en' at row 1"
                                    || w.2 == "Out of range value for column 'fmd' at row 1",
                                "{sql}: {warnings:?}"
                            );
                        }
                    }
                    let (sql, params) = current_rows_query(item);
                    let rows: Vec<Row> = tx.query(inline(&sql, &params)).await?;
                    let current: Vec<RawRow> = rows.into_iter().map(raw_row).collect();
                    assert_eq!(dirty_check(item, &current), Verdict::AlreadyRestored, "{}", item.table);
                }
                Verdict::AlreadyRestored => {}
                Verdict::Dirty(_) => {
                    tx.rollback().await?;
                    return Ok(vec![verdict]);
                }
            }
            verdicts.push(verdict);
        }
        tx.commit().await?;
        Ok(verdicts)
    }

    /// Every stored byte of a table, independently of this module's encodings: the server's
    /// checksum over the records, and per column a form that shows every bit.
    async fn fingerprint(db: &MariaDb, table: &str) -> Result<(String, Vec<Row>)> {
        let mut conn = db.conn().await?;
        conn.query_drop("SET time_zone = '+00:00'").await?;
        let (specs, pk) = specs(&mut conn, table).await?;
        let exprs = specs
            .iter()
            .map(|c| {
                let n = ident(&c.name);
                match c.data_type.as_str() {
                    "float" | "double" => format!("CONCAT(CAST({n} AS DOUBLE), IF(ATAN2({n}, -1) < 0, ' -', ' +'))"),
                    "decimal" => format!("CAST({n} AS CHAR)"),
                    "timestamp" => format!("CONCAT(UNIX_TIMESTAMP({n}), ' ', HEX({n}))"),
                    "enum" | "set" => format!("CONCAT(HEX({n}), ' ', {n} + 0)"),
                    _ => format!("IF(LENGTH({n}) > 1000, SHA2({n}, 256), HEX({n}))"),
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let order = pk.iter().map(|&i| ident(&specs[i].name)).collect::<Vec<_>>().join(", ");
        let rows: Vec<Row> = conn
            .query(format!("SELECT {exprs} FROM {table} ORDER BY {order}"))
            .await?;
        let (_, sum): (String, Value) = conn
            .query_first(format!("CHECKSUM TABLE {table} EXTENDED"))
            .await?
            .unwrap();
        Ok((sum.as_sql(false), rows))
    }

    async fn fingerprints(db: &MariaDb) -> Result<Vec<(String, Vec<Row>)>> {
        Ok(vec![fingerprint(db, "m").await?, fingerprint(db, "kx").await?])
    }

    fn assert_same(a: &[(String, Vec<Row>)], b: &[(String, Vec<Row>)]) {
        for ((sa, ra), (sb, rb)) in a.iter().zip(b) {
            assert_eq!(ra.len(), rb.len());
            for (x, y) in ra.iter().zip(rb) {
                for i in 0..x.len() {
                    assert_eq!(x.as_ref(i), y.as_ref(i), "column {}", x.columns_ref()[i].name_str());
                }
            }
            assert_eq!(sa, sb, "checksum");
        }
    }

    /// Sets every column of every row to other values: row 1 to values 2, row 2 to values 1,
    /// row 3 to NULL.
    async fn update_everything(w: &mut Conn) -> Result {
        for (k1, values) in [(1, 2), (2, 1), (3, 0)] {
            let set = MATRIX
                .iter()
                .map(|c| {
                    let v = match values {
                        1 => c.v1,
                        2 => c.v2,
                        _ => "NULL",
                    };
                    format!("`{}` = {v}", c.name)
                })
                .collect::<Vec<_>>()
                .join(", ");
            w.query_drop(format!("UPDATE m SET {set} WHERE k1 = {k1}")).await?;
        }
        w.query_drop("UPDATE kx SET v = IFNULL(v, 0) + 10").await?;
        Ok(())
    }

    /// Before images (client session at +05:30, latin1, padded CHARs), the change, after
    /// images (Europe/Berlin if it can be loaded, else -03:00).
    async fn imaged_update(db: &MariaDb) -> Result<(Conn, UndoRecord, Vec<(String, Vec<Row>)>)> {
        let mut w = setup(db).await?;
        let original = fingerprints(db).await?;
        let mut c = client(db).await?;
        let (ms, mpk) = specs(&mut c, "m").await?;
        let (ks, kpk) = specs(&mut c, "kx").await?;
        let mb = image(&mut c, &ms, "m", "").await?;
        let kb = image(&mut c, &ks, "kx", "").await?;
        update_everything(&mut w).await?;
        if !load_berlin(&mut c).await || c.query_drop("SET time_zone = 'Europe/Berlin'").await.is_err() {
            c.query_drop("SET time_zone = '-03:00'").await?;
        }
        let zone: Option<String> = c.query_first("SELECT @@time_zone").await?;
        eprintln!("after images read at time_zone {zone:?}");
        let ma = image(&mut c, &ms, "m", "").await?;
        let ka = image(&mut c, &ks, "kx", "").await?;
        assert_ne!(mb, ma);
        let items = vec![
            UndoItem::new(Kind::Update, "test", "m", &ms, mpk, mb, ma),
            UndoItem::new(Kind::Update, "test", "kx", &ks, kpk, kb, ka),
        ];
        for i in &items {
            i.validate()?;
        }
        Ok((w, UndoRecord::new(items), original))
    }

    #[tokio::test]
    async fn update_of_every_type_rolls_back_byte_identical() -> Result {
        let db = MariaDb::start().await?;
        let (_w, record, original) = imaged_update(&db).await?;
        let changed = fingerprints(&db).await?;
        assert_ne!(original[0].0, changed[0].0);

        let bytes = record.to_bytes();
        assert_eq!(UndoRecord::from_bytes(&bytes)?, record);
        assert_eq!(rollback(&db, &bytes).await?, [Verdict::Restore, Verdict::Restore]);
        assert_same(&original, &fingerprints(&db).await?);

        // Again: nothing left to do.
        assert_eq!(
            rollback(&db, &bytes).await?,
            [Verdict::AlreadyRestored, Verdict::AlreadyRestored]
        );
        assert_same(&original, &fingerprints(&db).await?);
        Ok(())
    }

    #[tokio::test]
    async fn deleted_rows_come_back_byte_identical() -> Result {
        let db = MariaDb::start().await?;
        let mut w = setup(&db).await?;
        let original = fingerprints(&db).await?;
        let mut c = client(&db).await?;
        let mut items = Vec::new();
        for t in ["m", "kx"] {
            let (s, pk) = specs(&mut c, t).await?;
            let before = image(&mut c, &s, t, "").await?;
            assert_eq!(before.len(), 3);
            items.push(UndoItem::new(Kind::Delete, "test", t, &s, pk, before, vec![]));
            w.query_drop(format!("DELETE FROM {t}")).await?;
        }
        let bytes = UndoRecord::new(items).to_bytes();
        assert_eq!(rollback(&db, &bytes).await?, [Verdict::Restore, Verdict::Restore]);
        assert_same(&original, &fingerprints(&db).await?);
        // A deleted row someone re-inserted differently: dirty.
        w.query_drop("DELETE FROM m WHERE k1 = 2").await?;
        w.query_drop("INSERT INTO m (k1, k2, i) VALUES (2, '', 7)").await?;
        let record = UndoRecord::from_bytes(&bytes)?;
        let bytes = UndoRecord::new(record.items[..1].to_vec()).to_bytes();
        let [Verdict::Dirty(d)] = &rollback(&db, &bytes).await?[..] else {
            panic!("not dirty")
        };
        let rows = d["rows"].as_array().unwrap();
        // Rows 1 and 3 are back as they were; row 2 differs in i.
        assert_eq!(rows.iter().filter(|r| r["state"] == "restored").count(), 2);
        let row2 = rows.iter().find(|r| r["primary_key"]["k1"] == "2").unwrap();
        assert_eq!(row2["state"], "unexpected");
        let cols: Vec<&str> = row2["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["column"].as_str().unwrap())
            .collect();
        assert_eq!(cols, ["i"]);
        Ok(())
    }

    #[tokio::test]
    async fn inserted_rows_are_deleted() -> Result {
        let db = MariaDb::start().await?;
        let mut w = setup(&db).await?;
        let original = fingerprints(&db).await?;
        let mut c = client(&db).await?;
        let names = MATRIX
            .iter()
            .map(|c| format!("`{}`", c.name))
            .collect::<Vec<_>>()
            .join(", ");
        w.query_drop(format!(
            "INSERT INTO m (k1, k2, {names}) SELECT k1 + 10, k2, {names} FROM m"
        ))
        .await?;
        w.query_drop("INSERT INTO kx (ts, bt, en, c, f) VALUES (FROM_UNIXTIME(5), 7, 'q', 'z  ', 0)")
            .await?;
        let (ms, mpk) = specs(&mut c, "m").await?;
        let (ks, kpk) = specs(&mut c, "kx").await?;
        let ma = image(&mut c, &ms, "m", "WHERE k1 > 10").await?;
        let ka = image(&mut c, &ks, "kx", "WHERE bt = 7").await?;
        assert_eq!((ma.len(), ka.len()), (3, 1));
        let items = vec![
            UndoItem::new(Kind::Insert, "test", "m", &ms, mpk, vec![], ma),
            UndoItem::new(Kind::Insert, "test", "kx", &ks, kpk, vec![], ka),
        ];
        let bytes = UndoRecord::new(items).to_bytes();
        assert_eq!(rollback(&db, &bytes).await?, [Verdict::Restore, Verdict::Restore]);
        assert_same(&original, &fingerprints(&db).await?);
        // Someone deleted them already: nothing to do.
        assert_eq!(
            rollback(&db, &bytes).await?,
            [Verdict::AlreadyRestored, Verdict::AlreadyRestored]
        );
        Ok(())
    }

    /// splitmix64: reproducible random values from a printed seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
            options[self.below(options.len() as u64) as usize]
        }

        fn int(&mut self, lo: i128, hi: i128) -> i128 {
            // Edges a quarter of the time, just outside them (clamped by the server) an eighth.
            match self.below(8) {
                0 => lo,
                1 => hi,
                2 => lo - 1,
                _ => lo + (self.next() as i128).rem_euclid(hi - lo + 1),
            }
        }

        fn digits(&mut self, n: u64) -> String {
            (0..n).map(|_| char::from(b'0' + self.below(10) as u8)).collect()
        }

        fn text(&mut self, max: u64) -> String {
            const POOL: &[&str] = &[
                "a", "Z", " ", "'", "\\\\", "\"", "é", "ÿ", "ß", "😀", "中", "\t", "%", "_", "0",
            ];
            let s: String = (0..self.below(max + 1)).map(|_| self.pick(POOL)).collect();
            format!("'{}'", s.replace('\'', "''"))
        }

        fn bytes(&mut self, max: u64) -> String {
            let n = self.below(max + 1);
            if n == 0 {
                return "X''".into();
            }
            let hex: String = (0..n).map(|_| format!("{:02X}", self.below(256))).collect();
            format!("0x{hex}")
        }

        fn float(&mut self, max_exp: i64) -> String {
            match self.below(6) {
                0 => self.pick(&["-0e0", "0", "1e-45", "5e-324", "-1e-50"]).into(),
                _ => {
                    let sign = if self.below(2) == 0 { "-" } else { "" };
                    let exp = (self.next() as i64).rem_euclid(2 * max_exp + 1) - max_exp;
                    let (lead, len) = (self.below(10), 1 + self.below(17));
                    format!("{sign}{lead}.{}e{exp}", self.digits(len))
                }
            }
        }

        fn date(&mut self) -> String {
            let (y, m, d) = (self.below(10_000), self.below(13), self.below(32));
            format!("{y:04}-{m:02}-{d:02}")
        }

        fn time(&mut self) -> String {
            let (h, m, s) = (self.below(24), self.below(60), self.below(60));
            format!("{h:02}:{m:02}:{s:02}.{}", self.digits(6))
        }
    }

    /// Columns of the random table, each with a generator of SQL literals for its values.
    type Gen = fn(&mut Rng) -> String;
    const RANDOM_COLUMNS: &[(&str, &str, Gen)] = &[
        ("ti", "TINYINT", |r| r.int(-128, 127).to_string()),
        ("biu", "BIGINT UNSIGNED", |r| r.int(0, u64::MAX as i128).to_string()),
        ("bi", "BIGINT", |r| {
            r.int(i64::MIN as i128, i64::MAX as i128).to_string()
        }),
        ("iz", "INT(6) UNSIGNED ZEROFILL", |r| r.int(0, 4294967295).to_string()),
        ("de", "DECIMAL(30,10)", |r| {
            let sign = if r.below(2) == 0 { "-" } else { "" };
            let (int, frac) = (r.below(21), r.below(14));
            format!("{sign}{}.{}", r.digits(int.max(1)), r.digits(frac.max(1)))
        }),
        ("f", "FLOAT", |r| r.float(38)),
        ("fmd", "FLOAT(9,3)", |r| r.float(6)),
        ("d", "DOUBLE", |r| r.float(307)),
        ("b13", "BIT(13)", |r| format!("b'{:b}'", r.below(1 << 13))),
        ("b64", "BIT(64)", |r| format!("0x{:016X}", r.next())),
        ("c", "CHAR(12) CHARACTER SET utf8mb4", |r| r.text(12)),
        ("cl", "CHAR(6) CHARACTER SET latin1", |r| {
            r.text(6).replace(['😀', '中'], "?")
        }),
        ("vc", "VARCHAR(40) CHARACTER SET utf8mb4", |r| r.text(40)),
        ("vu", "VARCHAR(10) CHARACTER SET ucs2", |r| {
            r.text(10).replace('😀', "x")
        }),
        ("bn", "BINARY(5)", |r| r.bytes(5)),
        ("vb", "VARBINARY(20)", |r| r.bytes(20)),
        ("bl", "BLOB", |r| r.bytes(300)),
        ("tx", "TEXT CHARACTER SET utf8mb4", |r| r.text(80)),
        ("en", "ENUM('a','b','c d')", |r| {
            r.pick(&["'a'", "'b'", "'c d'", "''", "2"]).into()
        }),
        ("st", "SET('x','y','z')", |r| {
            r.pick(&["'x,z'", "''", "'y'", "7", "'z,x,y'"]).into()
        }),
        ("j", "JSON", |r| {
            let text = r.pick(&["", "é😀", "a b", "\\\\n", "中文"]);
            format!("'{{\"k\": {}, \"s\": \"{text}\", \"a\": [1, 2.50]}}'", r.float(30))
        }),
        ("da", "DATE", |r| format!("'{}'", r.date())),
        ("dt", "DATETIME(6)", |r| format!("'{} {}'", r.date(), r.time())),
        ("ts", "TIMESTAMP(6) NULL DEFAULT NULL", |r| {
            format!("FROM_UNIXTIME({}.{})", r.below(2147483648), r.digits(6))
        }),
        ("tm", "TIME(6)", |r| {
            let sign = if r.below(2) == 0 { "-" } else { "" };
            format!(
                "'{sign}{}:{:02}:{:02}.{}'",
                r.below(839),
                r.below(60),
                r.below(60),
                r.digits(6)
            )
        }),
        ("y", "YEAR", |r| r.int(1901, 2155).to_string()),
        ("i6", "INET6", |r| {
            format!("'{:x}::{:x}:{:x}'", r.below(65536), r.below(65536), r.below(65536))
        }),
        ("u", "UUID", |r| {
            let h = format!("{:016x}{:016x}", r.next(), r.next());
            format!("'{}-{}-{}-{}-{}'", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
        }),
        ("g", "GEOMETRY", |r| format!("POINT({}, {})", r.float(10), r.float(10))),
    ];

    /// Values for every column of one row: a NULL a tenth of the time.
    fn random_row(rng: &mut Rng) -> Vec<String> {
        RANDOM_COLUMNS
            .iter()
            .map(|(_, _, generate)| {
                if rng.below(10) == 0 {
                    "NULL".into()
                } else {
                    generate(rng)
                }
            })
            .collect()
    }

    /// Random values of every column type, written under random client settings, changed to
    /// other random values, some rows deleted: the rollback restores every stored byte. The
    /// seed is printed; FERRATA_FUZZ_SEED repeats one, FERRATA_FUZZ_ROUNDS runs longer.
    #[tokio::test]
    async fn random_values_of_every_type_roll_back_byte_identical() -> Result {
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let rounds = env("FERRATA_FUZZ_ROUNDS").unwrap_or(6);
        let first_seed = env("FERRATA_FUZZ_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
        let db = MariaDb::start().await?;
        for round in 0..rounds {
            let seed = first_seed.wrapping_add(round);
            eprintln!("undo fuzz: FERRATA_FUZZ_SEED={seed}");
            let mut rng = Rng(seed);
            let mut w = db.conn().await?;
            w.query_drop("SET time_zone = '+00:00', sql_mode = ''").await?;
            w.query_drop("DROP TABLE IF EXISTS r").await?;
            let columns: Vec<String> = RANDOM_COLUMNS.iter().map(|(n, t, _)| format!("`{n}` {t}")).collect();
            w.query_drop(format!("CREATE TABLE r (id INT PRIMARY KEY, {})", columns.join(", ")))
                .await?;
            let names: Vec<String> = RANDOM_COLUMNS.iter().map(|(n, _, _)| format!("`{n}`")).collect();
            let rows = 30;
            for id in 0..rows {
                let values = random_row(&mut rng).join(", ");
                w.query_drop(format!(
                    "INSERT INTO r (id, {}) VALUES ({id}, {values})",
                    names.join(", ")
                ))
                .await?;
            }
            let original = fingerprint(&db, "r").await?;

            // The client whose images are taken: settings unlike the rollback's.
            let mut c = db.conn().await?;
            let names_set = rng.pick(&["latin1", "utf8mb4", "utf8mb3", "binary", "cp1251"]);
            c.query_drop(format!("SET NAMES {names_set}")).await?;
            let zone = rng.pick(&["'+05:30'", "'-11:00'", "'+00:00'", "SYSTEM"]);
            // Every mode in turn (ORACLE found '' read as NULL from CHAR columns).
            let modes = [
                "''",
                "'PAD_CHAR_TO_FULL_LENGTH'",
                "'ANSI_QUOTES,NO_BACKSLASH_ESCAPES'",
                "'TRADITIONAL'",
                "'ORACLE'",
                "'TIME_ROUND_FRACTIONAL,REAL_AS_FLOAT'",
            ];
            let mode = modes[round as usize % modes.len()];
            c.query_drop(format!("SET time_zone = {zone}, sql_mode = {mode}"))
                .await?;
            eprintln!("undo fuzz: images read with {names_set}, time_zone {zone}, sql_mode {mode}");
            let (specs, pk) = specs(&mut c, "r").await?;
            let before = image(&mut c, &specs, "r", "").await?;
            for id in 0..rows {
                let set: Vec<String> = names
                    .iter()
                    .zip(random_row(&mut rng))
                    .map(|(n, v)| format!("{n} = {v}"))
                    .collect();
                w.query_drop(format!("UPDATE r SET {} WHERE id = {id}", set.join(", ")))
                    .await?;
            }
            let after = image(&mut c, &specs, "r", "").await?;
            let deleted = image(&mut c, &specs, "r", "WHERE MOD(id, 4) = 0").await?;
            w.query_drop("DELETE FROM r WHERE MOD(id, 4) = 0").await?;
            let items = vec![
                UndoItem::new(Kind::Update, "test", "r", &specs, pk.clone(), before, after),
                UndoItem::new(Kind::Delete, "test", "r", &specs, pk, deleted, vec![]),
            ];
            for i in &items {
                i.validate()?;
            }
            let bytes = UndoRecord::new(items).to_bytes();
            assert_eq!(
                rollback(&db, &bytes).await?,
                [Verdict::Restore, Verdict::Restore],
                "seed {seed}"
            );
            assert_same(&[original], &[fingerprint(&db, "r").await?]);
        }
        Ok(())
    }

    #[tokio::test]
    async fn dirty_rows_are_reported_and_left_alone() -> Result {
        let db = MariaDb::start().await?;
        let (mut w, record, _) = imaged_update(&db).await?;
        w.query_drop("UPDATE m SET vc = 'dirty' WHERE k1 = 1").await?;
        let dirty = fingerprints(&db).await?;
        let [Verdict::Dirty(d)] = &rollback(&db, &record.to_bytes()).await?[..] else {
            panic!("not dirty")
        };
        assert_same(&dirty, &fingerprints(&db).await?);

        let hex = |s: &str| s.bytes().map(|b| format!("{b:02X}")).collect::<String>();
        assert_eq!(
            *d,
            serde_json::json!({"schema": "test", "table": "m", "kind": "update", "rows": [
                {"primary_key": {"k1": "1", "k2": hex("k😀")}, "state": "changed", "columns": [
                    {"column": "vc", "encoding": "hex", "before": hex("x😀  "), "after": "", "current": hex("dirty")},
                    // The stored generated column follows.
                    {"column": "gs", "encoding": "hex", "before": hex("k😀/x😀  "), "after": hex("k😀/"),
                     "current": hex("k😀/dirty")}]}]})
        );
        Ok(())
    }

    #[tokio::test]
    async fn large_records_are_compressed_and_restored() -> Result {
        let db = MariaDb::start().await?;
        let mut w = db.conn().await?;
        w.query_drop("CREATE TABLE big (id INT PRIMARY KEY, data LONGBLOB, note TEXT)")
            .await?;
        w.query_drop("CREATE TABLE undo_store (id INT PRIMARY KEY, info LONGBLOB NOT NULL)")
            .await?;
        // 5 MB that do not compress to nothing.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let data: Vec<u8> = (0..5_000_000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 4 == 0 { x as u8 } else { (i % 251) as u8 }
            })
            .collect();
        w.exec_drop("INSERT INTO big VALUES (1, ?, 'n')", (data.clone(),))
            .await?;
        let original = fingerprint(&db, "big").await?;
        let mut c = client(&db).await?;
        let (s, pk) = specs(&mut c, "big").await?;
        let before = image(&mut c, &s, "big", "").await?;
        w.exec_drop("UPDATE big SET data = ?, note = NULL", (data[1..].to_vec(),))
            .await?;
        let after = image(&mut c, &s, "big", "").await?;
        let record = UndoRecord::new(vec![UndoItem::new(Kind::Update, "test", "big", &s, pk, before, after)]);
        let bytes = record.to_bytes();
        let json_len = serde_json::to_vec(&record)?.len();
        assert!(json_len > 20_000_000);
        assert_eq!(bytes[0], b'Z');
        // Hex holds 4 bits a character: at most half of it stays.
        assert!(bytes.len() < json_len * 6 / 10, "{} of {json_len}", bytes.len());

        w.exec_drop("INSERT INTO undo_store VALUES (1, ?)", (bytes.clone(),))
            .await?;
        let stored: Vec<u8> = w
            .query_first("SELECT info FROM undo_store WHERE id = 1")
            .await?
            .unwrap();
        assert_eq!(stored, bytes);
        assert_eq!(UndoRecord::from_bytes(&stored)?, record);
        assert_eq!(rollback(&db, &stored).await?, [Verdict::Restore]);
        let restored = fingerprint(&db, "big").await?;
        assert_same(&[original], &[restored]);
        let back: Vec<u8> = w.query_first("SELECT data FROM big").await?.unwrap();
        assert!(back == data);
        Ok(())
    }
}
