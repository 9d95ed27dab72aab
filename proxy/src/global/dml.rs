//! What the proxy must know of a DML statement to protect it: the target table, and for
//! UPDATE/DELETE the statement's own row filter (WHERE, ORDER BY, LIMIT) as source text, so
//! the before image selects exactly the rows the statement will change. The text is cut out
//! of the client's SQL by the parser's source spans, never re-printed; `?` placeholders in it
//! are counted so a prepared statement's bound values can be passed along.
//!
//! Only statements this module recognises completely are planned; anything else comes back
//! as a reason the proxy gives when it refuses the statement (ERR 1235).

use std::ops::Range;

use sqlparser::ast::{
    AssignmentTarget, Delete, Expr, FromTable, ObjectName, Spanned, Statement, TableFactor, TableWithJoins, Update,
};
use sqlparser::dialect::MySqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Token, Tokenizer};

/// The table a statement writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRef {
    /// Named in the statement (`db.t`), else the session's current schema applies.
    pub schema: Option<String>,
    pub name: String,
    /// The alias the statement's filter may use.
    pub alias: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Update,
    Delete,
}

/// A planned UPDATE or DELETE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    pub table: TableRef,
    /// `WHERE ...`, `ORDER BY ...`, `LIMIT ...` as the client wrote them (may be empty).
    pub filter: String,
    /// Which of the statement's `?` placeholders (0-based, in order) appear in `filter`.
    pub filter_params: Range<usize>,
    /// Columns an UPDATE assigns (unqualified).
    pub assigned: Vec<String>,
}

/// Plans `sql`, or says why the proxy cannot protect it.
pub fn plan(sql: &str) -> Result<Change, String> {
    let mut statements = Parser::parse_sql(&MySqlDialect {}, sql)
        .map_err(|e| format!("a statement the proxy's parser rejects ({e})"))?;
    if statements.len() != 1 {
        return Err("more than one statement".into());
    }
    let offsets = LineOffsets::new(sql);
    match statements.remove(0) {
        Statement::Update(u) => plan_update(sql, &offsets, u),
        Statement::Delete(d) => plan_delete(sql, &offsets, d),
        Statement::Insert(_) => Err("INSERT (this build images UPDATE and DELETE only)".into()),
        _ => Err("this kind of statement".into()),
    }
}

fn plan_update(sql: &str, offsets: &LineOffsets, u: Update) -> Result<Change, String> {
    if !u.table.joins.is_empty() || u.from.is_some() {
        return Err("a multi-table UPDATE".into());
    }
    if u.returning.is_some() {
        return Err("UPDATE ... RETURNING".into());
    }
    let table = table_ref(&u.table.relation)?;
    let mut assigned = Vec::new();
    for a in &u.assignments {
        match &a.target {
            AssignmentTarget::ColumnName(name) => assigned.push(last_ident(name)?),
            AssignmentTarget::Tuple(_) => return Err("a tuple assignment in UPDATE".into()),
        }
    }
    // The filter starts after the last assignment.
    let after = u
        .assignments
        .iter()
        .map(|a| a.value.span().end)
        .max()
        .ok_or("an UPDATE without assignments")?;
    let filter = filter_text(sql, offsets, u.selection.as_ref(), after)?;
    Ok(Change {
        kind: ChangeKind::Update,
        table,
        filter: filter.0,
        filter_params: filter.1,
        assigned,
    })
}

fn plan_delete(sql: &str, offsets: &LineOffsets, d: Delete) -> Result<Change, String> {
    if !d.tables.is_empty() || d.using.is_some() {
        return Err("a multi-table DELETE".into());
    }
    if d.returning.is_some() {
        return Err("DELETE ... RETURNING".into());
    }
    let from: &[TableWithJoins] = match &d.from {
        FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
    };
    let [only] = from else {
        return Err("a multi-table DELETE".into());
    };
    if !only.joins.is_empty() {
        return Err("a multi-table DELETE".into());
    }
    let table = table_ref(&only.relation)?;
    let after = only.relation.span().end;
    let filter = filter_text(sql, offsets, d.selection.as_ref(), after)?;
    Ok(Change {
        kind: ChangeKind::Delete,
        table,
        filter: filter.0,
        filter_params: filter.1,
        assigned: Vec::new(),
    })
}

fn table_ref(factor: &TableFactor) -> Result<TableRef, String> {
    let TableFactor::Table {
        name,
        alias,
        partitions,
        ..
    } = factor
    else {
        return Err("a statement whose target is not a plain table".into());
    };
    if !partitions.is_empty() {
        return Err("a statement naming partitions".into());
    }
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| p.as_ident().map(|i| i.value.clone()))
        .collect::<Option<_>>()
        .ok_or("an unusual table name")?;
    let (schema, name) = match parts.as_slice() {
        [t] => (None, t.clone()),
        [s, t] => (Some(s.clone()), t.clone()),
        _ => return Err("a table name with more than two parts".into()),
    };
    Ok(TableRef {
        schema,
        name,
        alias: alias.as_ref().map(|a| a.name.value.clone()),
    })
}

fn last_ident(name: &ObjectName) -> Result<String, String> {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(|i| i.value.clone())
        .ok_or_else(|| "an unusual column name".into())
}

/// ` WHERE <where> <rest>` cut from the source: the WHERE expression, then everything after
/// it (ORDER BY, LIMIT). Without WHERE, everything after `after`.
fn filter_text(
    sql: &str,
    offsets: &LineOffsets,
    selection: Option<&Expr>,
    after: Location,
) -> Result<(String, Range<usize>), String> {
    let (start, rest_from, mut text) = match selection {
        Some(w) => {
            let span = w.span();
            let (s, e) = (offsets.byte(span.start)?, offsets.byte(span.end)?);
            (s, e, format!(" WHERE {}", &sql[s..e]))
        }
        None => {
            let e = offsets.byte(after)?;
            (e, e, String::new())
        }
    };
    let rest = sql[rest_from..].trim_end().trim_end_matches(';').trim_end();
    if !rest.trim().is_empty() {
        text.push(' ');
        text.push_str(rest.trim_start());
    }
    let before = placeholders_before(sql, offsets, start)?;
    let total = placeholders_before(sql, offsets, sql.len())?;
    Ok((text, before..total))
}

/// `?` placeholders (outside strings and comments) that start before byte `end`.
fn placeholders_before(sql: &str, offsets: &LineOffsets, end: usize) -> Result<usize, String> {
    let tokens = Tokenizer::new(&MySqlDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| format!("a statement the proxy's tokenizer rejects ({e})"))?;
    let mut n = 0;
    for t in tokens {
        if matches!(&t.token, Token::Placeholder(p) if p == "?") && offsets.byte(t.span.start)? < end {
            n += 1;
        }
    }
    Ok(n)
}

/// Turns the parser's line/column locations (1-based, columns in characters) into byte
/// offsets.
struct LineOffsets<'a> {
    sql: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineOffsets<'a> {
    fn new(sql: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
        LineOffsets { sql, starts }
    }

    fn byte(&self, at: Location) -> Result<usize, String> {
        let bad = || format!("an unexpected source location {at:?}");
        let line_start = *self
            .starts
            .get((at.line as usize).checked_sub(1).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let line = &self.sql[line_start..];
        let column = (at.column as usize).checked_sub(1).ok_or_else(bad)?;
        match line.char_indices().nth(column) {
            Some((i, _)) => Ok(line_start + i),
            None if line.chars().count() == column => Ok(self.sql.len()),
            None => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_filter_is_cut_from_the_source() {
        let c = plan(
            "UPDATE /* x */ `db`.t AS a SET v = ?, w='é' WHERE id IN (?, 2) AND c = 'ü'\n ORDER BY id DESC LIMIT 5;",
        )
        .unwrap();
        assert_eq!(c.kind, ChangeKind::Update);
        assert_eq!(
            c.table,
            TableRef {
                schema: Some("db".into()),
                name: "t".into(),
                alias: Some("a".into())
            }
        );
        assert_eq!(c.filter, " WHERE id IN (?, 2) AND c = 'ü' ORDER BY id DESC LIMIT 5");
        assert_eq!(c.filter_params, 1..2);
        assert_eq!(c.assigned, ["v", "w"]);
    }

    #[test]
    fn delete_with_and_without_where() {
        let c = plan("delete from t where a > ? and b = '?' limit ?").unwrap();
        assert_eq!((c.kind, c.table.name.as_str()), (ChangeKind::Delete, "t"));
        assert_eq!(c.filter, " WHERE a > ? and b = '?' limit ?");
        assert_eq!(c.filter_params, 0..2, "the '?' inside a string is not a placeholder");
        let c = plan("DELETE FROM t").unwrap();
        assert_eq!((c.filter.as_str(), c.filter_params), ("", 0..0));
        let c = plan("UPDATE t SET v = v + 1 ORDER BY id LIMIT 1").unwrap();
        assert_eq!(c.filter, " ORDER BY id LIMIT 1");
    }

    #[test]
    fn what_is_not_planned_says_why() {
        for (sql, why) in [
            ("UPDATE a JOIN b ON a.id = b.id SET a.v = 1", "multi-table"),
            ("DELETE a, b FROM a JOIN b ON a.id = b.id", "multi-table"),
            ("DELETE FROM t RETURNING id", "RETURNING"),
            ("INSERT INTO t VALUES (1)", "INSERT"),
            ("UPDATE t SET v = 1; UPDATE t SET v = 2", "more than one"),
            ("UPDATE t SET", "parser rejects"),
        ] {
            let e = plan(sql).unwrap_err();
            assert!(e.contains(why), "{sql}: {e}");
        }
    }
}
