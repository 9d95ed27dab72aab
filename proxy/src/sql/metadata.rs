//! Table metadata for AT mode: the columns, keys and triggers of a table, read from
//! `information_schema` over the proxy's own service connection and cached until DDL that
//! passes through the proxy invalidates it.
//!
//! Before and after images select a table's rows by their primary key (or, without one, by a
//! unique key of NOT NULL columns), and undo SQL writes back every stored, visible and
//! invisible column except generated ones; that is what [`TableMeta`] describes.
//!
//! Names follow the server's `lower_case_table_names`: with 0, schema and table names are
//! case-sensitive; with 1 or 2 they compare case-insensitively. Column names always compare
//! case-insensitively, as in MySQL. A [`MetadataCache`] serves one backend server: it reads
//! that setting (and whether the server is MariaDB) once, on its first [`MetadataCache::get`].
//!
//! Every lookup uses prepared statements with the names as parameters: `COLUMNS`,
//! `STATISTICS` (unique indexes, PRIMARY included) and `TRIGGERS`, plus, on MariaDB and only
//! when the table has a `longtext` column, `CHECK_CONSTRAINTS`, because MariaDB stores a
//! `JSON` column as `longtext` with a `CHECK (json_valid(col))` constraint.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use mysql_async::prelude::*;
use mysql_async::{Row, Value};
use parking_lot::Mutex;

/// The shape of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMeta {
    /// The schema (database), as `information_schema` spells it.
    pub schema: String,
    /// The real table name, in the case the server stores it.
    pub name: String,
    /// In `ORDINAL_POSITION` order.
    pub columns: Vec<ColumnMeta>,
    /// Indexes into `columns`, in the key's `SEQ_IN_INDEX` order; empty without a primary key.
    pub primary_key: Vec<usize>,
    /// The other unique indexes (name, indexes into `columns` in key order), in the order the
    /// server lists its keys. Indexes on expressions (MySQL's functional key parts) are left
    /// out: they cannot name a row by its column values.
    pub unique_keys: Vec<(String, Vec<usize>)>,
    /// Whether any trigger is defined on the table. `information_schema.TRIGGERS` shows only
    /// the triggers of tables the service user has the TRIGGER privilege on.
    pub has_triggers: bool,
}

/// One column of a [`TableMeta`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMeta {
    pub name: String,
    /// `DATA_TYPE`, lowercased: `int`, `decimal`, `varchar`, `enum`, `datetime`, ...; `json` for
    /// MySQL's JSON type and for MariaDB's `longtext` checked with `json_valid`.
    pub data_type: String,
    /// `COLUMN_TYPE`, e.g. `decimal(10,2)`, `enum('a','b')`, `int(10) unsigned`.
    pub column_type: String,
    pub nullable: bool,
    /// A VIRTUAL or STORED (PERSISTENT) generated column: never written by undo SQL.
    pub generated: bool,
    /// `ON UPDATE CURRENT_TIMESTAMP` (or another ON UPDATE clause).
    pub on_update: bool,
    pub auto_increment: bool,
    /// An INVISIBLE column: `SELECT *` leaves it out, so images must name it.
    pub invisible: bool,
    /// `CHARACTER_SET_NAME`; `None` for non-string columns.
    pub charset: Option<String>,
}

impl TableMeta {
    /// Every column as an image column.
    pub fn specs(&self) -> Vec<super::image::ColumnSpec> {
        self.columns
            .iter()
            .map(|c| super::image::ColumnSpec::new(c.name.clone(), c.data_type.clone(), c.generated))
            .collect()
    }

    /// The primary-key columns as image columns, in key order.
    pub fn key_specs(&self) -> Vec<super::image::ColumnSpec> {
        let all = self.specs();
        self.primary_key.iter().map(|&i| all[i].clone()).collect()
    }

    /// The index of the column called `name`, compared case-insensitively.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name))
            .or_else(|| {
                let name = name.to_lowercase();
                self.columns.iter().position(|c| c.name.to_lowercase() == name)
            })
    }

    /// The names of the primary key's columns, in key order.
    pub fn pk_names(&self) -> Vec<&str> {
        self.primary_key
            .iter()
            .map(|&i| self.columns[i].name.as_str())
            .collect()
    }

    /// The columns that identify a row: the primary key, or else the first unique key whose
    /// columns are all NOT NULL (the key InnoDB itself would cluster on). `None` when the
    /// table has neither, and AT mode cannot tell its rows apart.
    pub fn row_key(&self) -> Option<&[usize]> {
        if !self.primary_key.is_empty() {
            return Some(&self.primary_key);
        }
        self.unique_keys
            .iter()
            .map(|(_, cols)| cols.as_slice())
            .find(|cols| cols.iter().all(|&i| !self.columns[i].nullable))
    }

    /// The columns undo SQL may write: every column except generated ones.
    pub fn writable_columns(&self) -> impl Iterator<Item = (usize, &ColumnMeta)> {
        self.columns.iter().enumerate().filter(|(_, c)| !c.generated)
    }
}

/// Why table metadata could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaError {
    /// `information_schema` shows no such table to the service user.
    NoSuchTable { schema: String, table: String },
    /// A query on `information_schema` failed.
    Query(String),
}

impl fmt::Display for MetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaError::NoSuchTable { schema, table } => write!(
                f,
                "ferrata-proxy cannot find table `{schema}`.`{table}` in information_schema: check the name (and \
                 its case, if the server's lower_case_table_names is 0), and grant the proxy's service user \
                 SELECT on the table so that it can read its columns and keys"
            ),
            MetaError::Query(cause) => write!(
                f,
                "ferrata-proxy failed to read table metadata from information_schema: {cause}; check that the \
                 proxy's service user can connect to the backend and read information_schema, then retry"
            ),
        }
    }
}

impl std::error::Error for MetaError {}

impl From<mysql_async::Error> for MetaError {
    fn from(e: mysql_async::Error) -> Self {
        MetaError::Query(e.to_string())
    }
}

/// What the cache needs to know about its server; read once.
#[derive(Debug, Clone, Copy)]
struct ServerInfo {
    /// `lower_case_table_names` is 1 or 2.
    case_insensitive: bool,
    mariadb: bool,
}

/// A cache key: schema and table, lowercased when the server compares names
/// case-insensitively.
type Key = (String, String);

#[derive(Default)]
struct Inner {
    server: Option<ServerInfo>,
    tables: HashMap<Key, Arc<TableMeta>>,
    /// Bumped by every invalidation, so that a lookup that raced with DDL does not cache what
    /// it read before the DDL.
    generation: u64,
}

/// Table metadata of one backend server, cached per table.
#[derive(Default)]
pub struct MetadataCache {
    inner: Mutex<Inner>,
}

const SERVER_SQL: &str = "SELECT @@lower_case_table_names, VERSION()";

const COLUMNS_SQL: &str = "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, IS_NULLABLE, EXTRA, \
     GENERATION_EXPRESSION, CHARACTER_SET_NAME \
     FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION";

/// No ORDER BY on purpose: the server lists keys in its own order (PRIMARY first, then
/// unique keys), which is the order worth keeping; parts are sorted here.
const STATISTICS_SQL: &str = "SELECT TABLE_SCHEMA, TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX, COLUMN_NAME \
     FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND NON_UNIQUE = 0";

const TRIGGERS_SQL: &str = "SELECT EVENT_OBJECT_SCHEMA, EVENT_OBJECT_TABLE \
     FROM information_schema.TRIGGERS WHERE EVENT_OBJECT_SCHEMA = ? AND EVENT_OBJECT_TABLE = ?";

/// MariaDB only: MySQL's CHECK_CONSTRAINTS has no TABLE_NAME (and MySQL has a real JSON type).
const CHECKS_SQL: &str = "SELECT CONSTRAINT_SCHEMA, TABLE_NAME, CHECK_CLAUSE \
     FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?";

impl MetadataCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache for a server whose `lower_case_table_names` is already known, so the first
    /// lookup need not ask for it.
    pub fn with_lower_case_table_names(lower_case_table_names: u8, mariadb: bool) -> Self {
        let cache = Self::new();
        cache.inner.lock().server = Some(ServerInfo {
            case_insensitive: lower_case_table_names != 0,
            mariadb,
        });
        cache
    }

    /// The metadata of `schema`.`table`, from the cache or read with `conn`.
    pub async fn get(
        &self,
        conn: &mut mysql_async::Conn,
        schema: &str,
        table: &str,
    ) -> Result<Arc<TableMeta>, MetaError> {
        // Bound first: a guard in the match scrutinee would live across the await.
        let known = self.inner.lock().server;
        let server = match known {
            Some(server) => server,
            None => {
                let server = read_server_info(conn).await?;
                self.inner.lock().server = Some(server);
                server
            }
        };
        let key = key(server, schema, table);
        let generation = {
            let inner = self.inner.lock();
            if let Some(meta) = inner.tables.get(&key) {
                return Ok(Arc::clone(meta));
            }
            inner.generation
        };
        let meta = Arc::new(read_table(conn, server, schema, table).await?);
        let mut inner = self.inner.lock();
        if inner.generation == generation {
            inner.tables.insert(key, Arc::clone(&meta));
        }
        Ok(meta)
    }

    /// The cached metadata of `schema`.`table`, without asking the server.
    pub fn cached(&self, schema: &str, table: &str) -> Option<Arc<TableMeta>> {
        let inner = self.inner.lock();
        let server = inner.server?;
        inner.tables.get(&key(server, schema, table)).cloned()
    }

    /// Drops cached entries: one table, every table of a schema, a table name in every schema
    /// (`None`, `Some`), or everything (`None`, `None`). Names compare case-insensitively here
    /// whatever the server does: dropping a few more entries than needed only costs a lookup.
    pub fn invalidate(&self, schema: Option<&str>, table: Option<&str>) {
        let schema = schema.map(str::to_lowercase);
        let table = table.map(str::to_lowercase);
        let mut inner = self.inner.lock();
        inner.generation += 1;
        if schema.is_none() && table.is_none() {
            inner.tables.clear();
            return;
        }
        inner.tables.retain(|(s, t), _| {
            let schema_matches = schema.as_ref().is_none_or(|x| s.to_lowercase() == *x);
            let table_matches = table.as_ref().is_none_or(|x| t.to_lowercase() == *x);
            !(schema_matches && table_matches)
        });
    }
}

fn key(server: ServerInfo, schema: &str, table: &str) -> Key {
    if server.case_insensitive {
        (schema.to_lowercase(), table.to_lowercase())
    } else {
        (schema.to_owned(), table.to_owned())
    }
}

/// Whether a name from `information_schema` is the one asked for. The server's own
/// comparison may be looser (its collation) or stricter, so rows are filtered here too.
fn same_name(server: ServerInfo, stored: &str, asked: &str) -> bool {
    if server.case_insensitive {
        stored == asked || stored.to_lowercase() == asked.to_lowercase()
    } else {
        stored == asked
    }
}

async fn read_server_info(conn: &mut mysql_async::Conn) -> Result<ServerInfo, MetaError> {
    let row: Row = conn
        .query_first(SERVER_SQL)
        .await?
        .ok_or_else(|| MetaError::Query(format!("`{SERVER_SQL}` returned no row")))?;
    let lctn = number(&row, 0)?;
    let version = text(&row, 1)?;
    Ok(ServerInfo {
        case_insensitive: lctn != 0,
        mariadb: version.to_ascii_lowercase().contains("mariadb"),
    })
}

async fn read_table(
    conn: &mut mysql_async::Conn,
    server: ServerInfo,
    schema: &str,
    table: &str,
) -> Result<TableMeta, MetaError> {
    let params = (schema, table);
    let matches = |row: &Row| -> Result<bool, MetaError> {
        Ok(same_name(server, &text(row, 0)?, schema) && same_name(server, &text(row, 1)?, table))
    };

    let mut stored_name = None;
    let mut columns = Vec::new();
    for row in conn.exec::<Row, _, _>(COLUMNS_SQL, params).await? {
        if !matches(&row)? {
            continue;
        }
        if stored_name.is_none() {
            stored_name = Some((text(&row, 0)?, text(&row, 1)?));
        }
        columns.push(column(&row)?);
    }
    let Some((stored_schema, stored_table)) = stored_name else {
        return Err(MetaError::NoSuchTable {
            schema: schema.to_owned(),
            table: table.to_owned(),
        });
    };
    let mut meta = TableMeta {
        schema: stored_schema,
        name: stored_table,
        columns,
        primary_key: Vec::new(),
        unique_keys: Vec::new(),
        has_triggers: false,
    };

    // Unique indexes, in the server's order, each with (SEQ_IN_INDEX, column) parts; `None`
    // once a part is not a plain column.
    type Parts = Option<Vec<(u64, usize)>>;
    let mut indexes: Vec<(String, Parts)> = Vec::new();
    for row in conn.exec::<Row, _, _>(STATISTICS_SQL, params).await? {
        if !matches(&row)? {
            continue;
        }
        let index = text(&row, 2)?;
        let seq = number(&row, 3)?;
        let column = opt_text(&row, 4)?.and_then(|c| meta.column(&c));
        let pos = match indexes.iter().position(|(name, _)| *name == index) {
            Some(pos) => pos,
            None => {
                indexes.push((index, Some(Vec::new())));
                indexes.len() - 1
            }
        };
        let parts = &mut indexes[pos].1;
        match (parts.as_mut(), column) {
            (Some(parts), Some(column)) => parts.push((seq, column)),
            _ => *parts = None,
        }
    }
    for (name, parts) in indexes {
        let Some(mut parts) = parts else { continue };
        parts.sort_unstable();
        let cols = parts.into_iter().map(|(_, c)| c).collect();
        if name == "PRIMARY" {
            meta.primary_key = cols;
        } else {
            meta.unique_keys.push((name, cols));
        }
    }

    for row in conn.exec::<Row, _, _>(TRIGGERS_SQL, params).await? {
        if matches(&row)? {
            meta.has_triggers = true;
        }
    }

    if server.mariadb && meta.columns.iter().any(|c| c.data_type == "longtext") {
        for row in conn.exec::<Row, _, _>(CHECKS_SQL, params).await? {
            if !matches(&row)? {
                continue;
            }
            let Some(checked) = json_valid_column(&text(&row, 2)?) else {
                continue;
            };
            if let Some(i) = meta.column(&checked)
                && meta.columns[i].data_type == "longtext"
            {
                meta.columns[i].data_type = "json".into();
            }
        }
    }
    Ok(meta)
}

fn column(row: &Row) -> Result<ColumnMeta, MetaError> {
    let extra = text(row, 6)?.to_ascii_lowercase();
    let expression = opt_text(row, 7)?.unwrap_or_default();
    let generated = ["virtual generated", "stored generated", "persistent generated"]
        .iter()
        .any(|g| extra.contains(g))
        || (!expression.is_empty() && !extra.contains("default_generated"));
    Ok(ColumnMeta {
        name: text(row, 2)?,
        data_type: text(row, 3)?.to_lowercase(),
        column_type: text(row, 4)?,
        nullable: text(row, 5)?.eq_ignore_ascii_case("YES"),
        generated,
        on_update: extra.contains("on update"),
        auto_increment: extra.contains("auto_increment"),
        invisible: extra
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .any(|w| w == "invisible"),
        charset: opt_text(row, 8)?,
    })
}

/// The column a check clause of exactly the form `json_valid(`col`)` validates.
fn json_valid_column(clause: &str) -> Option<String> {
    let clause = clause.trim();
    let (head, rest) = clause.split_at_checked("json_valid(".len())?;
    if !head.eq_ignore_ascii_case("json_valid(") {
        return None;
    }
    let inner = rest.strip_suffix(')')?.trim();
    match inner.strip_prefix('`') {
        Some(quoted) => {
            let name = quoted.strip_suffix('`')?;
            // Inside backquotes a backquote is doubled; a lone one means the clause is more
            // than one identifier.
            let unescaped = name.replace("``", "`");
            (!unescaped.is_empty() && name.matches('`').count() == 2 * unescaped.matches('`').count())
                .then_some(unescaped)
        }
        None => (!inner.is_empty() && inner.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '$'))
            .then(|| inner.to_owned()),
    }
}

fn opt_text(row: &Row, i: usize) -> Result<Option<String>, MetaError> {
    match row.as_ref(i) {
        None => Err(MetaError::Query(format!(
            "information_schema returned {} columns, expected more",
            row.len()
        ))),
        Some(Value::NULL) => Ok(None),
        Some(Value::Bytes(b)) => Ok(Some(String::from_utf8_lossy(b).into_owned())),
        Some(Value::Int(n)) => Ok(Some(n.to_string())),
        Some(Value::UInt(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(MetaError::Query(format!(
            "unexpected value {other:?} in column {} from information_schema",
            i + 1
        ))),
    }
}

fn text(row: &Row, i: usize) -> Result<String, MetaError> {
    opt_text(row, i)?
        .ok_or_else(|| MetaError::Query(format!("unexpected NULL in column {} from information_schema", i + 1)))
}

fn number(row: &Row, i: usize) -> Result<u64, MetaError> {
    let s = text(row, i)?;
    s.trim().parse().map_err(|_| {
        MetaError::Query(format!(
            "expected a number in column {} from information_schema, got {s:?}",
            i + 1
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrata_testkit::{MariaDb, MariaDbOptions};

    type Result<T = ()> = anyhow::Result<T>;

    async fn setup(sql: &[&str]) -> Result<(MariaDb, mysql_async::Conn)> {
        let db = MariaDb::start().await?;
        let mut conn = db.conn().await?;
        for s in sql {
            conn.query_drop(*s).await?;
        }
        Ok((db, conn))
    }

    fn names(meta: &TableMeta, cols: &[usize]) -> Vec<String> {
        cols.iter().map(|&i| meta.columns[i].name.clone()).collect()
    }

    #[test]
    fn lookups_can_run_on_any_task() {
        // Compiles only if the future is Send, as tokio::spawn needs.
        fn lookup<'a>(
            cache: &'a MetadataCache,
            conn: &'a mut mysql_async::Conn,
        ) -> impl Future<Output = std::result::Result<Arc<TableMeta>, MetaError>> + Send + 'a {
            cache.get(conn, "s", "t")
        }
        let _ = lookup;
    }

    #[test]
    fn json_valid_clauses() {
        assert_eq!(json_valid_column("json_valid(`doc`)").as_deref(), Some("doc"));
        assert_eq!(json_valid_column(" JSON_VALID(`a``b`) ").as_deref(), Some("a`b"));
        assert_eq!(json_valid_column("json_valid(doc)").as_deref(), Some("doc"));
        assert_eq!(json_valid_column("json_valid(`a`) and `b` > 0"), None);
        assert_eq!(json_valid_column("json_valid(`a`) or json_valid(`b`)"), None);
        assert_eq!(json_valid_column("`a` > 0"), None);
        assert_eq!(json_valid_column("json_valid()"), None);
    }

    #[tokio::test]
    async fn composite_primary_key_in_key_order() -> Result {
        let (_db, mut conn) = setup(&[
            "CREATE TABLE orders (a INT NOT NULL, b VARCHAR(20) NOT NULL, c DECIMAL(10,2) NOT NULL, d INT, \
             PRIMARY KEY (c, a))",
            // Same name in another schema, another shape: must not leak in.
            "CREATE DATABASE other",
            "CREATE TABLE other.orders (z INT PRIMARY KEY)",
        ])
        .await?;
        let cache = MetadataCache::new();
        let meta = cache.get(&mut conn, "test", "orders").await?;
        assert_eq!((meta.schema.as_str(), meta.name.as_str()), ("test", "orders"));
        assert_eq!(names(&meta, &[0, 1, 2, 3]), ["a", "b", "c", "d"]);
        assert_eq!(meta.columns.len(), 4);
        assert_eq!(meta.pk_names(), ["c", "a"]);
        assert_eq!(meta.primary_key, [2, 0]);
        assert_eq!(meta.row_key(), Some(&[2, 0][..]));
        assert!(meta.unique_keys.is_empty());
        assert!(!meta.has_triggers);

        let [a, b, c, d] = &meta.columns[..] else {
            unreachable!()
        };
        assert_eq!((a.data_type.as_str(), a.column_type.as_str()), ("int", "int(11)"));
        assert_eq!(
            (b.data_type.as_str(), b.column_type.as_str()),
            ("varchar", "varchar(20)")
        );
        assert_eq!(
            (c.data_type.as_str(), c.column_type.as_str()),
            ("decimal", "decimal(10,2)")
        );
        assert_eq!(b.charset.as_deref(), Some("utf8mb4"));
        assert_eq!(a.charset, None);
        assert!(!a.nullable && !b.nullable && !c.nullable && d.nullable);
        assert!(
            meta.columns
                .iter()
                .all(|c| !c.generated && !c.on_update && !c.auto_increment && !c.invisible)
        );
        assert_eq!(meta.column("C"), Some(2));
        assert_eq!(meta.column("nope"), None);

        let other = cache.get(&mut conn, "other", "orders").await?;
        assert_eq!(other.pk_names(), ["z"]);
        Ok(())
    }

    #[tokio::test]
    async fn unique_keys_without_a_primary_key() -> Result {
        let (_db, mut conn) = setup(&[
            "CREATE TABLE t (id INT NOT NULL, code VARCHAR(10), x INT NOT NULL, y INT NOT NULL, z INT, \
             UNIQUE KEY u_code (code), KEY k_z (z), UNIQUE KEY u_yx (y, x), UNIQUE KEY u_prefix (code(3), id))",
            "CREATE TABLE bare (a INT, b TEXT)",
        ])
        .await?;
        let cache = MetadataCache::new();
        let t = cache.get(&mut conn, "test", "t").await?;
        assert!(t.primary_key.is_empty());
        assert!(t.pk_names().is_empty());
        let keys: Vec<(&str, Vec<String>)> = t.unique_keys.iter().map(|(n, c)| (n.as_str(), names(&t, c))).collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
        for (name, cols) in [
            ("u_code", vec!["code"]),
            ("u_yx", vec!["y", "x"]),
            ("u_prefix", vec!["code", "id"]),
        ] {
            assert!(
                keys.contains(&(name, cols.iter().map(|s| s.to_string()).collect())),
                "{name} in {keys:?}"
            );
        }
        // u_code may hold several NULLs and u_prefix has a nullable column: only u_yx names a row.
        assert_eq!(t.row_key().map(|k| names(&t, k)), Some(vec!["y".into(), "x".into()]));

        let bare = cache.get(&mut conn, "test", "bare").await?;
        assert!(bare.primary_key.is_empty() && bare.unique_keys.is_empty());
        assert_eq!(bare.row_key(), None);
        Ok(())
    }

    #[tokio::test]
    async fn generated_on_update_auto_increment_and_invisible_columns() -> Result {
        let (_db, mut conn) = setup(&[
            "CREATE TABLE g (id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, price INT, qty INT, \
             total_v INT AS (price * qty) VIRTUAL, total_s INT AS (price * qty) STORED, \
             total_p INT AS (price + 1) PERSISTENT, \
             updated TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP, \
             touched DATETIME(3) NULL ON UPDATE CURRENT_TIMESTAMP(3), \
             created DATETIME DEFAULT CURRENT_TIMESTAMP, secret INT INVISIBLE, \
             kind ENUM('a','b') NOT NULL DEFAULT 'a', flags SET('x','y'), bits BIT(3), y YEAR)",
        ])
        .await?;
        let meta = MetadataCache::new().get(&mut conn, "test", "g").await?;
        let col = |name: &str| &meta.columns[meta.column(name).unwrap()];

        let id = col("id");
        assert!(id.auto_increment && !id.nullable && !id.generated);
        assert_eq!(
            (id.data_type.as_str(), id.column_type.as_str()),
            ("bigint", "bigint(20) unsigned")
        );
        assert_eq!(meta.pk_names(), ["id"]);
        for name in ["total_v", "total_s", "total_p"] {
            assert!(col(name).generated, "{name}");
            assert!(!col(name).on_update && !col(name).auto_increment, "{name}");
        }
        assert!(!col("price").generated && !col("created").generated);
        assert!(col("updated").on_update && col("touched").on_update);
        assert!(!col("created").on_update && !col("updated").generated);
        assert_eq!(col("updated").data_type, "timestamp");
        assert_eq!(col("touched").column_type, "datetime(3)");
        assert!(col("secret").invisible);
        assert!(meta.columns.iter().filter(|c| c.invisible).count() == 1);
        assert_eq!(
            (col("kind").data_type.as_str(), col("kind").column_type.as_str()),
            ("enum", "enum('a','b')")
        );
        assert_eq!(col("flags").data_type, "set");
        assert_eq!(col("bits").data_type, "bit");
        assert_eq!(col("y").data_type, "year");
        assert!(meta.columns.iter().all(|c| c.data_type != "json"));

        let writable: Vec<&str> = meta.writable_columns().map(|(_, c)| c.name.as_str()).collect();
        assert_eq!(
            writable,
            [
                "id", "price", "qty", "updated", "touched", "created", "secret", "kind", "flags", "bits", "y"
            ]
        );
        Ok(())
    }

    #[tokio::test]
    async fn json_columns_of_mariadb_are_reported_as_json() -> Result {
        let (_db, mut conn) = setup(&[
            "CREATE TABLE j (id INT PRIMARY KEY, doc JSON, `we``ird` JSON NOT NULL, txt LONGTEXT, \
             checked LONGTEXT, other LONGTEXT, short TEXT CHECK (json_valid(short)), \
             CHECK (json_valid(checked)), CONSTRAINT c_other CHECK (json_valid(other) AND id > 0))",
        ])
        .await?;
        let meta = MetadataCache::new().get(&mut conn, "test", "j").await?;
        let types: Vec<(&str, &str)> = meta
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.data_type.as_str()))
            .collect();
        assert_eq!(
            types,
            [
                ("id", "int"),
                ("doc", "json"),
                ("we`ird", "json"),
                ("txt", "longtext"),
                ("checked", "json"),
                ("other", "longtext"),
                ("short", "text"),
            ]
        );
        assert_eq!(meta.columns[1].column_type, "longtext");
        assert!(meta.columns[1].nullable && !meta.columns[2].nullable);
        Ok(())
    }

    #[tokio::test]
    async fn triggers_are_noticed() -> Result {
        let (_db, mut conn) = setup(&[
            "CREATE TABLE plain (id INT PRIMARY KEY)",
            "CREATE TABLE audited (id INT PRIMARY KEY, n INT)",
            "CREATE TABLE audit_log (id INT)",
            "CREATE TRIGGER audited_ai AFTER INSERT ON audited FOR EACH ROW INSERT INTO audit_log VALUES (NEW.id)",
        ])
        .await?;
        let cache = MetadataCache::new();
        assert!(cache.get(&mut conn, "test", "audited").await?.has_triggers);
        assert!(!cache.get(&mut conn, "test", "plain").await?.has_triggers);
        // The trigger writes audit_log, but it is defined on `audited`.
        assert!(!cache.get(&mut conn, "test", "audit_log").await?.has_triggers);
        Ok(())
    }

    #[tokio::test]
    async fn unknown_tables_are_reported_and_not_cached() -> Result {
        let (_db, mut conn) = setup(&[]).await?;
        let cache = MetadataCache::new();
        let err = cache.get(&mut conn, "test", "missing").await.unwrap_err();
        assert_eq!(
            err,
            MetaError::NoSuchTable {
                schema: "test".into(),
                table: "missing".into()
            }
        );
        assert!(err.to_string().contains("`test`.`missing`"), "{err}");
        assert!(err.to_string().contains("grant"), "{err}");
        assert!(matches!(
            cache.get(&mut conn, "nodb", "missing").await,
            Err(MetaError::NoSuchTable { .. })
        ));
        // Names are parameters, never SQL.
        assert!(matches!(
            cache.get(&mut conn, "test", "x' OR '1'='1").await,
            Err(MetaError::NoSuchTable { .. })
        ));

        conn.query_drop("CREATE TABLE missing (id INT PRIMARY KEY)").await?;
        assert_eq!(cache.get(&mut conn, "test", "missing").await?.pk_names(), ["id"]);
        Ok(())
    }

    #[tokio::test]
    async fn cached_until_invalidated() -> Result {
        let (_db, mut conn) = setup(&[
            "CREATE TABLE t (id INT PRIMARY KEY, a INT)",
            "CREATE TABLE u (id INT PRIMARY KEY)",
            "CREATE DATABASE other",
            "CREATE TABLE other.t (id INT PRIMARY KEY)",
        ])
        .await?;
        let cache = MetadataCache::new();
        let first = cache.get(&mut conn, "test", "t").await?;
        let u = cache.get(&mut conn, "test", "u").await?;
        let other = cache.get(&mut conn, "other", "t").await?;
        assert_eq!(first.columns.len(), 2);

        conn.query_drop("ALTER TABLE t ADD COLUMN b INT").await?;
        // Served from the cache: the ALTER did not pass through a proxy that invalidates.
        let again = cache.get(&mut conn, "test", "t").await?;
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(again.columns.len(), 2);
        assert!(cache.cached("test", "t").is_some());

        cache.invalidate(Some("test"), Some("u"));
        assert!(Arc::ptr_eq(&first, &cache.get(&mut conn, "test", "t").await?));
        assert!(!Arc::ptr_eq(&u, &cache.get(&mut conn, "test", "u").await?));

        cache.invalidate(Some("test"), Some("t"));
        assert!(cache.cached("test", "t").is_none());
        assert!(cache.cached("other", "t").is_some(), "another schema's t stays");
        let fresh = cache.get(&mut conn, "test", "t").await?;
        assert_eq!(names(&fresh, &[0, 1, 2]), ["id", "a", "b"]);

        // Every table of a schema.
        cache.invalidate(Some("test"), None);
        assert!(cache.cached("test", "t").is_none() && cache.cached("test", "u").is_none());
        assert!(Arc::ptr_eq(&other, &cache.get(&mut conn, "other", "t").await?));

        // A table name in every schema.
        cache.get(&mut conn, "test", "t").await?;
        cache.invalidate(None, Some("t"));
        assert!(cache.cached("test", "t").is_none() && cache.cached("other", "t").is_none());

        // Everything.
        cache.get(&mut conn, "test", "t").await?;
        cache.get(&mut conn, "test", "u").await?;
        cache.invalidate(None, None);
        assert!(cache.cached("test", "t").is_none() && cache.cached("test", "u").is_none());
        Ok(())
    }

    #[tokio::test]
    async fn names_are_case_sensitive_with_lower_case_table_names_0() -> Result {
        let (_db, mut conn) = setup(&[
            "CREATE TABLE Mixed (id INT PRIMARY KEY, big INT)",
            "CREATE TABLE mixed (id INT PRIMARY KEY)",
        ])
        .await?;
        let cache = MetadataCache::new();
        let upper = cache.get(&mut conn, "test", "Mixed").await?;
        let lower = cache.get(&mut conn, "test", "mixed").await?;
        assert_eq!((upper.name.as_str(), upper.columns.len()), ("Mixed", 2));
        assert_eq!((lower.name.as_str(), lower.columns.len()), ("mixed", 1));
        for (schema, table) in [("test", "MIXED"), ("TEST", "Mixed")] {
            assert!(
                matches!(
                    cache.get(&mut conn, schema, table).await,
                    Err(MetaError::NoSuchTable { .. })
                ),
                "{schema}.{table}"
            );
        }
        // Column names are case-insensitive all the same.
        assert_eq!(upper.column("BIG"), Some(1));

        // Invalidation may drop both spellings; it must drop the one asked for.
        cache.invalidate(Some("test"), Some("Mixed"));
        assert!(cache.cached("test", "Mixed").is_none());
        Ok(())
    }

    #[tokio::test]
    async fn names_are_case_insensitive_with_lower_case_table_names_1() -> Result {
        let db = MariaDb::start_with(MariaDbOptions {
            extra_args: vec!["--lower-case-table-names=1".into()],
            ..Default::default()
        })
        .await?;
        let mut conn = db.conn().await?;
        conn.query_drop("CREATE TABLE Mixed (id INT PRIMARY KEY, Val INT)")
            .await?;
        let cache = MetadataCache::new();
        let meta = cache.get(&mut conn, "TEST", "MIXED").await?;
        assert_eq!((meta.schema.as_str(), meta.name.as_str()), ("test", "mixed"));
        assert_eq!(meta.pk_names(), ["id"]);
        // One entry for every spelling.
        assert!(Arc::ptr_eq(&meta, &cache.get(&mut conn, "test", "mixed").await?));
        assert!(Arc::ptr_eq(&meta, &cache.get(&mut conn, "Test", "Mixed").await?));

        cache.invalidate(Some("Test"), Some("MiXeD"));
        assert!(cache.cached("test", "mixed").is_none());
        Ok(())
    }
}
