//! Column images: how each column of a row is read so that its value is exact and
//! independent of the session, and how such a value is written back (or used to find the
//! row again). Shared by every part that reads rows: AT mode's before and after images and
//! rollback, the isolation checks' key selects.
//!
//! # Reading and writing a column exactly
//!
//! A row is never read as the client would see it (`SELECT *` formats values for the
//! connection's character set and time zone, prints FLOAT with 6 digits, ...). Each column is
//! read through an expression chosen by its type (its [`Encoding`]) whose value is an ASCII
//! string that pins down the stored bytes, and written back through the matching expression:
//!
//! | encoding     | types                                           | read (select list)                  | written as                 |
//! |--------------|-------------------------------------------------|-------------------------------------|----------------------------|
//! | `text`       | integers, DECIMAL, DATE, DATETIME, TIME, YEAR   | `c`                                 | `?`                        |
//! | `hex`        | VARCHAR, TEXT, BINARY, VARBINARY, BLOB, JSON, GEOMETRY, INET4/6, UUID, unknown | `HEX(c)` | `UNHEX(?)`          |
//! | `char`       | CHAR                                            | `HEX(RTRIM(c))` (`''` kept apart from NULL under sql_mode ORACLE) | `UNHEX(?)` |
//! | `unix_time`  | TIMESTAMP                                       | `UNIX_TIMESTAMP(c)`                 | `REPLACE(FROM_UNIXTIME(CAST(? AS DECIMAL(65,6))), '1970-01-01 00:00:00', '0000-00-00 00:00:00')` |
//! | `float`      | FLOAT                                           | `IF(c = 0 AND ATAN2(c, -1) < 0, -1e-50, CAST(c AS DOUBLE))` | `?`  |
//! | `double`     | DOUBLE                                          | `CAST(c AS DOUBLE)`                 | `?`                        |
//! | `unsigned`   | BIT, ENUM (index), SET (bit mask)               | `CAST(c AS UNSIGNED)`               | `CAST(? AS UNSIGNED)`      |
//!
//! Every read expression is further wrapped in `CAST(... AS BINARY)`: the value is then a
//! binary string, which the server sends as-is whatever `character_set_results` says, and
//! which reads the same over the text and the binary protocol (a row read with a prepared
//! statement gives the same bytes). NULL is NULL in every encoding.
//!
//! Why these:
//! * Strings of every character set: `HEX` gives the stored bytes; `UNHEX` makes a binary
//!   string, which is assigned to a column of any character set without conversion. `CHAR`
//!   is read through `RTRIM` because `sql_mode = PAD_CHAR_TO_FULL_LENGTH` pads it on read;
//!   the server strips the padding of a stored CHAR anyway, so nothing is lost.
//! * TIMESTAMP is stored as Unix time; `UNIX_TIMESTAMP(c)` reads it without any time-zone
//!   conversion (exact inside a daylight-saving fold, where the local time is ambiguous), with
//!   the column's fractional digits. The rollback session runs at `time_zone = '+00:00'`, so
//!   `FROM_UNIXTIME` is exact there too. The zero timestamp reads as `0` (no valid TIMESTAMP
//!   is below 1 second) and `FROM_UNIXTIME(0)` would be rejected, hence the `REPLACE` that
//!   turns `1970-01-01 00:00:00` into the zero timestamp.
//! * FLOAT prints with 6 significant digits; widened to DOUBLE it prints the shortest
//!   round-trip form of an exact value. MariaDB stores `-0` in a FLOAT (an underflow of a
//!   small negative number) but prints it as `0`, so `-0` reads as `-1e-50`, which writes
//!   back as `-0`. A DOUBLE column never holds `-0` (the server stores `+0`).
//! * DOUBLE prints the shortest round-trip form; the cast drops the fixed decimals of
//!   `DOUBLE(M,D)`.
//! * BIT, ENUM and SET as their number: a string would be converted (a BIT from its bytes, an
//!   ENUM by matching names). ENUM's index 0 (the `''` error value) needs a non-strict
//!   `sql_mode` to be written back: see [`RESTORE_SQL_MODE`].
//! * The rest have an exact, session-independent text form.
//!
//! Generated columns are read (the dirty check compares them) but never written.
//!

use mysql_async::Value;
use serde::{Deserialize, Serialize};

use super::ident;

/// The `sql_mode` the compensating statements must run under:
/// * not strict, so that the values a laxer client session could write (an ENUM's `''` error
///   value) are written back;
/// * `ALLOW_INVALID_DATES`, so that a date such as `2024-02-31` written under that mode is not
///   turned into `0000-00-00`; no `NO_ZERO_DATE` or `NO_ZERO_IN_DATE`;
/// * `NO_AUTO_VALUE_ON_ZERO`, so that re-inserting a deleted row with `0` in an
///   AUTO_INCREMENT column keeps the `0`.
///
/// Not strict means a value the column cannot hold would be truncated with a warning instead
/// of an error; exact images never are, but reading the rows again after compensation (they
/// must equal the before image) proves it.
pub const RESTORE_SQL_MODE: &str = "NO_AUTO_VALUE_ON_ZERO,ALLOW_INVALID_DATES,NO_ENGINE_SUBSTITUTION";

/// How one column is read into an image and written back. See the module documentation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The column's own text form.
    Text,
    /// `HEX` of the bytes.
    Hex,
    /// `HEX` of a CHAR's bytes, trailing spaces removed.
    Char,
    /// Unix time, with the column's fractional digits; `0` for the zero timestamp.
    UnixTime,
    /// A FLOAT widened to DOUBLE; `-1e-50` for `-0`.
    Float,
    /// A DOUBLE.
    Double,
    /// An unsigned integer: BIT's value, ENUM's index, SET's bit mask.
    Unsigned,
}

impl Encoding {
    /// The select-list expression for the column `column` (already quoted, e.g. `` `a` `` or
    /// `` `t`.`a` ``).
    pub fn read_expr(self, column: &str) -> String {
        let inner = match self {
            Encoding::Text => column.to_owned(),
            Encoding::Hex => format!("HEX({column})"),
            // Under sql_mode ORACLE, RTRIM of a value that trims to '' is NULL: the IFNULL
            // keeps '' and NULL apart whatever the client's mode.
            Encoding::Char => format!("IF({column} IS NULL, NULL, IFNULL(HEX(RTRIM({column})), ''))"),
            Encoding::UnixTime => format!("UNIX_TIMESTAMP({column})"),
            Encoding::Float => {
                format!("IF({column} = 0 AND ATAN2({column}, -1) < 0, -1e-50, CAST({column} AS DOUBLE))")
            }
            Encoding::Double => format!("CAST({column} AS DOUBLE)"),
            Encoding::Unsigned => format!("CAST({column} AS UNSIGNED)"),
        };
        format!("CAST({inner} AS BINARY)")
    }

    /// The SQL expression that turns an image value, bound (or inlined as a string literal)
    /// for its one `?`, into the column's value. It also serves in `WHERE` to find a row by
    /// its key. NULL gives NULL.
    pub fn write_expr(self) -> &'static str {
        match self {
            Encoding::Text | Encoding::Float | Encoding::Double => "?",
            Encoding::Hex | Encoding::Char => "UNHEX(?)",
            Encoding::UnixTime => {
                "REPLACE(FROM_UNIXTIME(CAST(? AS DECIMAL(65,6))), '1970-01-01 00:00:00', '0000-00-00 00:00:00')"
            }
            Encoding::Unsigned => "CAST(? AS UNSIGNED)",
        }
    }

    /// The parameter for [`Encoding::write_expr`].
    pub fn param(self, value: Option<&str>) -> Value {
        match value {
            None => Value::NULL,
            Some(v) => match self {
                Encoding::Unsigned => v
                    .parse::<u64>()
                    .map_or_else(|_| Value::Bytes(v.as_bytes().to_vec()), Value::UInt),
                _ => Value::Bytes(v.as_bytes().to_vec()),
            },
        }
    }

    /// Whether `value` can be what this encoding's read expression gives. Anything else means
    /// the image was not read as this module expects (e.g. a session whose
    /// `character_set_connection` is UTF-16), or the record was damaged.
    pub fn is_valid(self, value: &[u8]) -> bool {
        let all = |f: fn(u8) -> bool| value.iter().all(|&b| f(b));
        match self {
            Encoding::Hex | Encoding::Char => {
                value.len().is_multiple_of(2) && all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
            }
            Encoding::Unsigned => {
                !value.is_empty()
                    && all(|b| b.is_ascii_digit())
                    && std::str::from_utf8(value).is_ok_and(|s| s.parse::<u64>().is_ok())
            }
            Encoding::UnixTime => !value.is_empty() && all(|b| b.is_ascii_digit() || b == b'.'),
            Encoding::Float | Encoding::Double => {
                !value.is_empty() && all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e'))
            }
            Encoding::Text => {
                !value.is_empty() && all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b':' | b' '))
            }
        }
    }
}

/// The encoding of a column by its `information_schema.COLUMNS.DATA_TYPE` (any case; `json`
/// for a JSON column). Unknown types are read as bytes ([`Encoding::Hex`]).
pub fn encoding(data_type: &str) -> Encoding {
    match data_type.to_ascii_lowercase().as_str() {
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "decimal" | "numeric" | "dec"
        | "fixed" | "date" | "datetime" | "time" | "year" | "bool" | "boolean" => Encoding::Text,
        "float" => Encoding::Float,
        "double" | "real" | "double precision" => Encoding::Double,
        "timestamp" => Encoding::UnixTime,
        "bit" | "enum" | "set" => Encoding::Unsigned,
        "char" | "nchar" | "character" => Encoding::Char,
        // varchar, the text and blob families, binary, varbinary, json, the geometry types,
        // inet4, inet6, uuid, and whatever a plugin adds: bytes.
        _ => Encoding::Hex,
    }
}

/// A column as the images need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnSpec {
    pub name: String,
    /// `information_schema.COLUMNS.DATA_TYPE`, lowercased; `json` for a JSON column.
    pub data_type: String,
    /// A VIRTUAL or STORED generated column.
    pub generated: bool,
}

impl ColumnSpec {
    pub fn new(name: impl Into<String>, data_type: impl Into<String>, generated: bool) -> ColumnSpec {
        ColumnSpec {
            name: name.into(),
            data_type: data_type.into(),
            generated,
        }
    }

    pub fn encoding(&self) -> Encoding {
        encoding(&self.data_type)
    }
}

/// The select list that reads an image of these columns, e.g.
/// ``CAST(`id` AS BINARY), CAST(HEX(`name`) AS BINARY)``.
pub fn select_list(columns: &[ColumnSpec]) -> String {
    list(columns.iter().map(|c| (c.name.as_str(), c.encoding())), None)
}

/// [`select_list`] with every column qualified by `qualifier` (a table name or alias).
pub fn qualified_select_list(qualifier: &str, columns: &[ColumnSpec]) -> String {
    list(columns.iter().map(|c| (c.name.as_str(), c.encoding())), Some(qualifier))
}

/// The select list of `columns` (name and encoding), each qualified by `qualifier` if given.
pub fn list<'a>(columns: impl Iterator<Item = (&'a str, Encoding)>, qualifier: Option<&str>) -> String {
    let prefix = qualifier.map(|q| format!("{}.", ident(q))).unwrap_or_default();
    columns
        .map(|(name, e)| e.read_expr(&format!("{prefix}{}", ident(name))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A row as read with a select list: one value per column, `None` for NULL; what a text- or
/// binary-protocol row gives.
pub type RawRow = Vec<Option<Vec<u8>>>;

/// A row of an image: the values of a [`RawRow`] as text.
pub type ImageRow = Vec<Option<String>>;

/// A row read with a select list of this module as a [`RawRow`]. Every value of such a
/// list is a string, so only `Bytes` and `NULL` are expected; anything else is kept in its
/// SQL form (and fails [`Encoding::is_valid`]).
pub fn raw_row(row: mysql_async::Row) -> RawRow {
    row.unwrap()
        .into_iter()
        .map(|v| match v {
            Value::NULL => None,
            Value::Bytes(b) => Some(b),
            other => Some(other.as_sql(false).into_bytes()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_by_type() {
        for t in [
            "tinyint", "INT", "bigint", "decimal", "date", "datetime", "time", "year",
        ] {
            assert_eq!(encoding(t), Encoding::Text, "{t}");
        }
        for t in [
            "varchar",
            "text",
            "longtext",
            "binary",
            "varbinary",
            "blob",
            "json",
            "geometry",
            "point",
            "inet6",
            "uuid",
            "whatever",
        ] {
            assert_eq!(encoding(t), Encoding::Hex, "{t}");
        }
        assert_eq!(encoding("char"), Encoding::Char);
        assert_eq!(encoding("timestamp"), Encoding::UnixTime);
        assert_eq!(encoding("float"), Encoding::Float);
        assert_eq!(encoding("double"), Encoding::Double);
        for t in ["bit", "enum", "set"] {
            assert_eq!(encoding(t), Encoding::Unsigned, "{t}");
        }
    }

    #[test]
    fn select_lists_quote_and_encode() {
        let columns = [
            ColumnSpec::new("id", "int", false),
            ColumnSpec::new("na`me", "varchar", false),
            ColumnSpec::new("ts", "timestamp", false),
        ];
        assert_eq!(
            select_list(&columns),
            "CAST(`id` AS BINARY), CAST(HEX(`na``me`) AS BINARY), CAST(UNIX_TIMESTAMP(`ts`) AS BINARY)"
        );
        assert_eq!(qualified_select_list("o", &columns[..1]), "CAST(`o`.`id` AS BINARY)");
    }
}
