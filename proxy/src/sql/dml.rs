//! What the proxy must know of a DML statement to protect it: the target table, and for
//! UPDATE/DELETE the statement's own row filter (WHERE, ORDER BY, LIMIT) as source text, so
//! the before image selects exactly the rows the statement will change. The parser checks the
//! statement's structure; the text is cut out of the client's SQL at token boundaries
//! (expression spans are not exact: a leading unary minus or a call's arguments may fall
//! outside them), never re-printed; `?` placeholders in it
//! are counted so a prepared statement's bound values can be passed along.
//!
//! For INSERT ... VALUES it keeps each value's source text, so the proxy knows the primary
//! keys of the rows written (or that the server generates them).
//!
//! Only statements this module recognises completely are planned; anything else comes back
//! as a reason the proxy gives when it refuses the statement (ERR 1235).

use std::ops::Range;

use sqlparser::ast::{AssignmentTarget, Delete, FromTable, ObjectName, Statement, TableFactor, TableWithJoins, Update};
use sqlparser::dialect::MySqlDialect;
use sqlparser::keywords::Keyword;
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

/// A planned INSERT ... VALUES or INSERT ... SET (REPLACE too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    pub table: TableRef,
    /// The columns named, in order; empty means every column in table order.
    pub columns: Vec<String>,
    /// For each row, each value's source text (`None` for `DEFAULT`).
    pub rows: Vec<Vec<Option<String>>>,
    pub mode: InsertMode,
}

/// What an INSERT does with a row whose key is taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertMode {
    /// Fails.
    Plain,
    /// `INSERT IGNORE`: skips the row.
    Ignore,
    /// `ON DUPLICATE KEY UPDATE`: updates the row it collides with; the columns it assigns.
    Upsert(Vec<String>),
    /// `REPLACE`: deletes every row it collides with, on any unique key, then inserts.
    Replace,
}

/// A statement the proxy can image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Change(Change),
    Insert(Insert),
}

/// Plans `sql`, or says why the proxy cannot protect it.
pub fn plan(sql: &str) -> Result<Plan, String> {
    let mut statements = Parser::parse_sql(&MySqlDialect {}, sql)
        .map_err(|e| format!("a statement the proxy's parser rejects ({e})"))?;
    if statements.len() != 1 {
        return Err("more than one statement".into());
    }
    match statements.remove(0) {
        Statement::Update(u) => plan_update(sql, u).map(Plan::Change),
        Statement::Delete(d) => plan_delete(sql, d).map(Plan::Change),
        Statement::Insert(i) => plan_insert(sql, i).map(Plan::Insert),
        _ => Err("this kind of statement".into()),
    }
}

/// A planned multi-table UPDATE (join or comma form) or DELETE (`DELETE t1, t2 FROM ...`,
/// `DELETE FROM t1, t2 USING ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultiChange {
    pub kind: ChangeKind,
    /// Every table of the statement's table references, with its alias.
    pub tables: Vec<TableRef>,
    /// DELETE: the tables deleted from, as the statement names them (alias or name).
    pub targets: Vec<String>,
    /// UPDATE: each assigned column with its qualifier (alias or table name), if any.
    pub assigned: Vec<(Option<String>, String)>,
    /// ` FROM <table references> [WHERE ...]` as written: what selects the rows it changes.
    pub select_tail: String,
    /// The statement's `?` placeholders (0-based) that fall in `select_tail`, in order.
    pub params: Vec<usize>,
}

/// Plans `sql` if it is a multi-table UPDATE or DELETE (`None` if it is not one), or says
/// why the proxy cannot protect it.
pub fn plan_multi(sql: &str) -> Option<Result<MultiChange, String>> {
    let tokens = tokens(sql).ok()?;
    let first = tokens.first()?;
    if is_keyword(&first.token, Keyword::UPDATE) {
        plan_multi_update(sql, &tokens)
    } else if is_keyword(&first.token, Keyword::DELETE) {
        let Ok(mut statements) = Parser::parse_sql(&MySqlDialect {}, sql) else {
            return None;
        };
        match statements.pop() {
            Some(Statement::Delete(d)) if statements.is_empty() && (!d.tables.is_empty() || d.using.is_some()) => {
                Some(plan_multi_delete(sql, &tokens, d))
            }
            _ => None,
        }
    } else {
        None
    }
}

/// `text` with its `?` placeholders replaced, in order, by `values` (SQL literals); `None` if
/// the counts differ or the text does not tokenize.
pub fn bind_literals(text: &str, values: &[String]) -> Option<String> {
    let tokens = tokens(text).ok()?;
    let marks: Vec<usize> = tokens
        .iter()
        .filter(|t| matches!(&t.token, Token::Placeholder(p) if p == "?"))
        .map(|t| t.start)
        .collect();
    if marks.len() != values.len() {
        return None;
    }
    let mut out = String::with_capacity(text.len() + values.iter().map(String::len).sum::<usize>());
    let mut at = 0;
    for (mark, value) in marks.iter().zip(values) {
        out.push_str(&text[at..*mark]);
        out.push_str(value);
        at = mark + 1;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// The statements of a multi-statement string, as byte ranges (without their `;`), empty
/// ones left out.
pub fn split_statements(sql: &str) -> Result<Vec<Range<usize>>, String> {
    let tokens = tokens(sql)?;
    let mut pieces = Vec::new();
    let mut depth = 0i32;
    let mut start: Option<usize> = None;
    for t in &tokens {
        match &t.token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::SemiColon if depth == 0 => {
                if let Some(s) = start.take() {
                    pieces.push(s..t.start);
                }
                continue;
            }
            _ => {}
        }
        start.get_or_insert(t.start);
    }
    if let Some(s) = start {
        pieces.push(s..sql.len());
    }
    Ok(pieces
        .into_iter()
        .map(|r| r.start..r.start + sql[r].trim_end().len())
        .collect())
}

/// The indexes of the placeholders among `tokens` whose start falls in `range`.
fn placeholders_in(tokens: &[Located], range: Range<usize>) -> Vec<usize> {
    tokens
        .iter()
        .filter(|t| matches!(&t.token, Token::Placeholder(p) if p == "?"))
        .enumerate()
        .filter(|(_, t)| range.contains(&t.start))
        .map(|(i, _)| i)
        .collect()
}

/// Positions (token indexes) of the depth-0 tokens matching `keyword`.
fn top_level(tokens: &[Located], keyword: Keyword) -> Vec<usize> {
    let mut depth = 0i32;
    let mut found = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        match &t.token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            token if depth == 0 && is_keyword(token, keyword) => found.push(i),
            _ => {}
        }
    }
    found
}

/// The tables of a `FROM` clause given as text (`t1 JOIN t2 ON ...`, `t1, t2`).
fn reference_tables(references: &str) -> Result<Vec<TableRef>, String> {
    let statements = Parser::parse_sql(&MySqlDialect {}, &format!("SELECT 1 FROM {references}"))
        .map_err(|e| format!("table references the proxy's parser rejects ({e})"))?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return Err("table references the proxy could not follow".into());
    };
    let sqlparser::ast::SetExpr::Select(select) = query.body.as_ref() else {
        return Err("table references the proxy could not follow".into());
    };
    let mut tables = Vec::new();
    for t in &select.from {
        for factor in std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)) {
            tables.push(table_ref(factor)?);
        }
    }
    Ok(tables)
}

fn plan_multi_update(sql: &str, tokens: &[Located]) -> Option<Result<MultiChange, String>> {
    let set = *top_level(tokens, Keyword::SET).first()?;
    // UPDATE [LOW_PRIORITY] [IGNORE] <references> SET
    let mut start = 1;
    while start < set
        && (is_keyword(&tokens[start].token, Keyword::LOW_PRIORITY)
            || is_keyword(&tokens[start].token, Keyword::IGNORE))
    {
        start += 1;
    }
    let mut depth = 0i32;
    let multi = tokens[start..set].iter().any(|t| match &t.token {
        Token::LParen => {
            depth += 1;
            false
        }
        Token::RParen => {
            depth -= 1;
            false
        }
        Token::Comma => depth == 0,
        token => depth == 0 && is_keyword(token, Keyword::JOIN),
    });
    if !multi {
        return None;
    }
    Some((|| {
        let references = sql[tokens[start].start..tokens[set].start].trim();
        let tables = reference_tables(references)?;
        let end = statement_end(sql, tokens);
        let where_at = top_level(tokens, Keyword::WHERE).into_iter().find(|&i| i > set);
        if top_level(tokens, Keyword::ORDER)
            .iter()
            .chain(&top_level(tokens, Keyword::LIMIT))
            .any(|&i| i > set)
        {
            return Err("ORDER BY or LIMIT in a multi-table UPDATE".into());
        }
        let assignments_end = where_at.map_or(end, |i| tokens[i].start);
        let mut assigned = Vec::new();
        let mut depth = 0i32;
        let mut expecting_target = true;
        let mut target: Vec<String> = Vec::new();
        for t in tokens.iter().skip(set + 1).take_while(|t| t.start < assignments_end) {
            match &t.token {
                Token::LParen => depth += 1,
                Token::RParen => depth -= 1,
                Token::Comma if depth == 0 => expecting_target = true,
                Token::Eq if depth == 0 && expecting_target => {
                    let (qualifier, column) = match target.as_slice() {
                        [c] => (None, c.clone()),
                        [q, c] => (Some(q.clone()), c.clone()),
                        [_, q, c] => (Some(q.clone()), c.clone()),
                        _ => return Err("an assignment the proxy could not follow".into()),
                    };
                    assigned.push((qualifier, column));
                    target.clear();
                    expecting_target = false;
                }
                Token::Word(w) if expecting_target => target.push(w.value.clone()),
                Token::Period if expecting_target => {}
                _ if expecting_target => return Err("an assignment the proxy could not follow".into()),
                _ => {}
            }
        }
        let where_text = where_at.map_or("", |i| sql[tokens[i].start..end].trim());
        let select_tail = format!(" FROM {references} {where_text}");
        let mut params = placeholders_in(tokens, tokens[start].start..tokens[set].start);
        if let Some(i) = where_at {
            params.extend(placeholders_in(tokens, tokens[i].start..sql.len()));
        }
        Ok(MultiChange {
            kind: ChangeKind::Update,
            tables,
            targets: Vec::new(),
            assigned,
            select_tail,
            params,
        })
    })())
}

fn plan_multi_delete(sql: &str, tokens: &[Located], d: Delete) -> Result<MultiChange, String> {
    if d.returning.is_some() || d.limit.is_some() || !d.order_by.is_empty() {
        return Err("ORDER BY, LIMIT or RETURNING in a multi-table DELETE".into());
    }
    // DELETE t1, t2 FROM <references> ...; DELETE FROM t1, t2 USING <references> ...
    let (targets, references_from) = if d.using.is_some() {
        let targets = match &d.from {
            FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t
                .iter()
                .map(|t| table_ref(&t.relation).map(|r| r.name))
                .collect::<Result<Vec<_>, _>>()?,
        };
        (targets, *top_level(tokens, Keyword::USING).first().ok_or("USING")?)
    } else {
        let targets = d.tables.iter().map(last_ident).collect::<Result<Vec<_>, _>>()?;
        (targets, *top_level(tokens, Keyword::FROM).first().ok_or("FROM")?)
    };
    let where_at = top_level(tokens, Keyword::WHERE)
        .into_iter()
        .find(|&i| i > references_from);
    let end = statement_end(sql, tokens);
    let references_end = where_at.map_or(end, |i| tokens[i].start);
    let first = tokens
        .get(references_from + 1)
        .ok_or("a DELETE without table references")?;
    let references = sql[first.start.min(references_end)..references_end].trim();
    let tables = reference_tables(references)?;
    let where_text = where_at.map_or("", |i| sql[tokens[i].start..end].trim());
    Ok(MultiChange {
        kind: ChangeKind::Delete,
        tables,
        targets,
        assigned: Vec::new(),
        select_tail: format!(" FROM {references} {where_text}"),
        params: placeholders_in(tokens, tokens[references_from].start..sql.len()),
    })
}

/// Where the statement's text ends: after its last token that is not a `;`. A trailing
/// comment is left out: a `-- ...` kept there would swallow what the proxy appends (a `FOR
/// UPDATE`).
pub(super) fn statement_end(sql: &str, tokens: &[Located]) -> usize {
    tokens
        .iter()
        .rposition(|t| t.token != Token::SemiColon)
        .map_or(sql.len(), |i| tokens[i].end)
}

/// Every table the statements in `sql` may write (for a multi-table UPDATE or DELETE, every
/// table they name: a wider set only costs checks), or why the parser could not tell. For the
/// no-dirty-writes check, which needs only names.
pub fn written_tables(sql: &str) -> Result<Vec<TableRef>, String> {
    let statements = match Parser::parse_sql(&MySqlDialect {}, sql) {
        Ok(statements) => statements,
        // The comma form of a multi-table UPDATE is read without the parser.
        Err(e) => match plan_multi(sql) {
            Some(Ok(multi)) => return Ok(multi.tables),
            _ => return Err(format!("a statement the proxy's parser rejects ({e})")),
        },
    };
    let mut tables = Vec::new();
    let add = |tables: &mut Vec<TableRef>, from: &[TableWithJoins]| {
        for t in from {
            for factor in std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)) {
                if let Ok(table) = table_ref(factor) {
                    tables.push(table);
                }
            }
        }
    };
    for statement in &statements {
        match statement {
            Statement::Insert(i) => {
                if let sqlparser::ast::TableObject::TableName(name) = &i.table {
                    let (schema, name) = split_name(name)?;
                    tables.push(TableRef {
                        schema,
                        name,
                        alias: None,
                    });
                }
            }
            Statement::Update(u) => {
                add(&mut tables, std::slice::from_ref(&u.table));
                if let Some(
                    sqlparser::ast::UpdateTableFromKind::BeforeSet(from)
                    | sqlparser::ast::UpdateTableFromKind::AfterSet(from),
                ) = &u.from
                {
                    add(&mut tables, from);
                }
            }
            Statement::Delete(d) => match &d.from {
                FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from) => add(&mut tables, from),
            },
            _ => {}
        }
    }
    Ok(tables)
}

fn plan_update(sql: &str, u: Update) -> Result<Change, String> {
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
    let filter = filter_text(sql, &tokens(sql)?)?;
    Ok(Change {
        kind: ChangeKind::Update,
        table,
        filter: filter.0,
        filter_params: filter.1,
        assigned,
    })
}

fn plan_delete(sql: &str, d: Delete) -> Result<Change, String> {
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
    let filter = filter_text(sql, &tokens(sql)?)?;
    Ok(Change {
        kind: ChangeKind::Delete,
        table,
        filter: filter.0,
        filter_params: filter.1,
        assigned: Vec::new(),
    })
}

fn plan_insert(sql: &str, i: sqlparser::ast::Insert) -> Result<Insert, String> {
    if i.returning.is_some() {
        return Err("INSERT ... RETURNING".into());
    }
    if i.partitioned.is_some() {
        return Err("a statement naming partitions".into());
    }
    let mode = match (&i.on, i.ignore, i.replace_into) {
        (None, false, false) => InsertMode::Plain,
        (None, true, false) => InsertMode::Ignore,
        (None, false, true) => InsertMode::Replace,
        (Some(sqlparser::ast::OnInsert::DuplicateKeyUpdate(assignments)), false, false) => {
            let mut assigned = Vec::new();
            for a in assignments {
                match &a.target {
                    AssignmentTarget::ColumnName(name) => assigned.push(last_ident(name)?),
                    AssignmentTarget::Tuple(_) => return Err("a tuple assignment in ON DUPLICATE KEY UPDATE".into()),
                }
            }
            InsertMode::Upsert(assigned)
        }
        (Some(sqlparser::ast::OnInsert::DuplicateKeyUpdate(_)), true, _) => {
            return Err("INSERT IGNORE ... ON DUPLICATE KEY UPDATE".into());
        }
        _ => return Err("this form of INSERT".into()),
    };
    let sqlparser::ast::TableObject::TableName(name) = &i.table else {
        return Err("an INSERT into a table function".into());
    };
    let (schema, table) = split_name(name)?;
    let tokens = tokens(sql)?;
    let (columns, rows) = if i.assignments.is_empty() {
        let columns = i.columns.iter().map(last_ident).collect::<Result<Vec<_>, _>>()?;
        let values = match i
            .source
            .as_deref()
            .map(|q| (q.body.as_ref(), q.with.is_some() || q.order_by.is_some()))
        {
            Some((sqlparser::ast::SetExpr::Values(v), false)) => v,
            _ => return Err("INSERT ... SELECT".into()),
        };
        let rows = value_texts(sql, &tokens)?;
        if rows.len() != values.rows.len() || rows.iter().zip(&values.rows).any(|(t, r)| t.len() != r.content.len()) {
            return Err("an INSERT whose VALUES the proxy could not follow".into());
        }
        (columns, rows)
    } else {
        let mut columns = Vec::new();
        for a in &i.assignments {
            match &a.target {
                AssignmentTarget::ColumnName(name) => columns.push(last_ident(name)?),
                AssignmentTarget::Tuple(_) => return Err("a tuple assignment in INSERT ... SET".into()),
            }
        }
        let row = set_texts(sql, &tokens)?;
        if row.len() != columns.len() {
            return Err("an INSERT ... SET the proxy could not follow".into());
        }
        (columns, vec![row])
    };
    Ok(Insert {
        table: TableRef {
            schema,
            name: table,
            alias: None,
        },
        columns,
        rows,
        mode,
    })
}

/// The source text of each value after the top-level SET keyword of an INSERT ... SET, up to
/// an ON DUPLICATE KEY UPDATE (`None` for `DEFAULT`).
fn set_texts(sql: &str, tokens: &[Located]) -> Result<Vec<Option<String>>, String> {
    let at = *top_level(tokens, Keyword::SET).first().ok_or("an INSERT without SET")?;
    let mut values = Vec::new();
    let mut depth = 0i32;
    let mut value_start = None;
    let mut end = sql.len();
    let text = |from: usize, to: usize| {
        let v = sql[from..to].trim();
        (!v.eq_ignore_ascii_case("DEFAULT")).then(|| v.to_owned())
    };
    for t in &tokens[at + 1..] {
        match &t.token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::Eq if depth == 0 && value_start.is_none() => value_start = Some(t.start + 1),
            Token::Comma if depth == 0 => {
                let start = value_start.take().ok_or("an INSERT ... SET without a value")?;
                values.push(text(start, t.start));
            }
            Token::SemiColon if depth == 0 => {
                end = t.start;
                break;
            }
            token if depth == 0 && is_keyword(token, Keyword::ON) => {
                end = t.start;
                break;
            }
            _ => {}
        }
    }
    let start = value_start.ok_or("an INSERT ... SET without a value")?;
    values.push(text(start, end));
    Ok(values)
}

fn split_name(name: &ObjectName) -> Result<(Option<String>, String), String> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| p.as_ident().map(|i| i.value.clone()))
        .collect::<Option<_>>()
        .ok_or("an unusual table name")?;
    match parts.as_slice() {
        [t] => Ok((None, t.clone())),
        [s, t] => Ok((Some(s.clone()), t.clone())),
        _ => Err("a table name with more than two parts".into()),
    }
}

pub(super) fn table_ref(factor: &TableFactor) -> Result<TableRef, String> {
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

/// A token and the bytes of the source it covers.
pub(super) struct Located {
    pub token: Token,
    pub start: usize,
    pub end: usize,
}

/// Whether `sql` may hold an executable comment, whose text MySQL and MariaDB run as SQL.
/// Checked as text, so a string literal holding `/*!` counts too: refusing such a statement
/// is safe, locating its tokens wrongly is not.
fn has_executable_comment(sql: &str) -> bool {
    sql.contains("/*!") || sql.contains("/*M!")
}

/// The statement's tokens with byte offsets. Token locations are exact, unlike the spans of
/// some expressions (a unary minus or a function call's arguments may fall outside them), so
/// source text is always cut at token boundaries.
pub(super) fn tokens(sql: &str) -> Result<Vec<Located>, String> {
    if has_executable_comment(sql) {
        return Err(
            "a statement with an executable comment (/*! ... */ or /*M! ... */), whose text the proxy \
                    cannot locate exactly; write the SQL without the comment markers"
                .into(),
        );
    }
    let mut line_starts = vec![0];
    line_starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
    let byte = |at: Location| -> Result<usize, String> {
        let bad = || format!("an unexpected source location {at:?}");
        let line_start = *line_starts
            .get((at.line as usize).checked_sub(1).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let column = (at.column as usize).checked_sub(1).ok_or_else(bad)?;
        let line = &sql[line_start..];
        match line.char_indices().nth(column) {
            Some((i, _)) => Ok(line_start + i),
            None if line.chars().count() == column => Ok(sql.len()),
            None => Err(bad()),
        }
    };
    Tokenizer::new(&MySqlDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| format!("a statement the proxy's tokenizer rejects ({e})"))?
        .into_iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .map(|t| {
            Ok(Located {
                start: byte(t.span.start)?,
                end: byte(t.span.end)?,
                token: t.token,
            })
        })
        .collect()
}

pub(super) fn is_keyword(token: &Token, keyword: Keyword) -> bool {
    matches!(token, Token::Word(w) if w.keyword == keyword && w.quote_style.is_none())
}

/// The statement's own row filter: from its top-level WHERE (else ORDER BY, else LIMIT) to
/// the end, as written; and which `?` placeholders fall in it.
fn filter_text(sql: &str, tokens: &[Located]) -> Result<(String, Range<usize>), String> {
    let mut depth = 0i32;
    let mut start = None;
    for t in tokens {
        match &t.token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            token
                if depth == 0
                    && [Keyword::WHERE, Keyword::ORDER, Keyword::LIMIT]
                        .iter()
                        .any(|k| is_keyword(token, *k)) =>
            {
                start = Some(t.start);
                break;
            }
            _ => {}
        }
    }
    let placeholders = |before: usize| {
        tokens
            .iter()
            .filter(|t| matches!(&t.token, Token::Placeholder(p) if p == "?") && t.start < before)
            .count()
    };
    let total = placeholders(sql.len());
    let Some(start) = start else {
        return Ok((String::new(), total..total));
    };
    let text = &sql[start..statement_end(sql, tokens).max(start)];
    Ok((format!(" {text}"), placeholders(start)..total))
}

/// The source text of each value of each row after the top-level VALUES keyword (`None` for
/// `DEFAULT`).
fn value_texts(sql: &str, tokens: &[Located]) -> Result<Vec<Vec<Option<String>>>, String> {
    let at = top_level(tokens, Keyword::VALUES)
        .into_iter()
        .chain(top_level(tokens, Keyword::VALUE))
        .min()
        .ok_or("an INSERT without VALUES")?;
    let mut rows = Vec::new();
    let mut row: Vec<Option<String>> = Vec::new();
    let mut depth = 0i32;
    let mut value_start = 0;
    let text = |from: usize, to: usize| {
        let v = sql[from..to].trim();
        (!v.eq_ignore_ascii_case("DEFAULT")).then(|| v.to_owned())
    };
    for t in &tokens[at + 1..] {
        match &t.token {
            Token::LParen => {
                depth += 1;
                if depth == 1 {
                    value_start = t.start + 1;
                    row.clear();
                }
            }
            Token::RParen => {
                if depth == 1 {
                    row.push(text(value_start, t.start));
                    rows.push(std::mem::take(&mut row));
                }
                depth -= 1;
            }
            Token::Comma if depth == 1 => {
                row.push(text(value_start, t.start));
                value_start = t.start + 1;
            }
            Token::Comma | Token::SemiColon if depth == 0 => {}
            // A row alias (`AS new`) or ON DUPLICATE KEY UPDATE: the values are over.
            Token::Word(_) if depth == 0 => break,
            _ if depth == 0 => return Err("an INSERT with something after its VALUES".into()),
            _ => {}
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_tables_of_every_dml_form() {
        let names = |sql: &str| -> Vec<String> {
            written_tables(sql)
                .unwrap()
                .into_iter()
                .map(|t| match t.schema {
                    Some(s) => format!("{s}.{}", t.name),
                    None => t.name,
                })
                .collect()
        };
        assert_eq!(names("REPLACE INTO shop.a (id) VALUES (1)"), ["shop.a"]);
        assert_eq!(names("INSERT INTO a SET id = 1 ON DUPLICATE KEY UPDATE v = 2"), ["a"]);
        assert_eq!(names("UPDATE a JOIN b ON a.id = b.id SET a.v = b.v"), ["a", "b"]);
        assert_eq!(names("DELETE a, b FROM a JOIN b ON a.id = b.id"), ["a", "b"]);
        assert_eq!(
            names("DELETE FROM a WHERE id = 1; SELECT 1; UPDATE c SET v = 1"),
            ["a", "c"]
        );
        assert!(names("SELECT * FROM a").is_empty());
        assert_eq!(names("UPDATE a, b SET a.v = b.v WHERE a.id = b.id"), ["a", "b"]);
        assert!(written_tables("UPDATE SET").is_err());
    }

    fn change(sql: &str) -> Change {
        match plan(sql).unwrap() {
            Plan::Change(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn insert_values_keep_their_source_text() {
        let Plan::Insert(i) =
            plan("INSERT INTO db.t (a, `b`) VALUES (1, 'x''y'), (?, DEFAULT), (-2.50, NOW())").unwrap()
        else {
            panic!("an insert")
        };
        assert_eq!(
            i.table,
            TableRef {
                schema: Some("db".into()),
                name: "t".into(),
                alias: None
            }
        );
        assert_eq!(i.columns, ["a", "b"]);
        let text = |v: &[&str]| v.iter().map(|s| Some((*s).to_owned())).collect::<Vec<_>>();
        assert_eq!(i.rows[0], text(&["1", "'x''y'"]));
        assert_eq!(i.rows[1], vec![Some("?".to_owned()), None]);
        assert_eq!(i.rows[2], text(&["-2.50", "NOW()"]));
        for (sql, why) in [
            ("INSERT INTO t SELECT * FROM u", "SELECT"),
            (
                "INSERT IGNORE INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = 2",
                "IGNORE",
            ),
            ("INSERT INTO t VALUES (1) RETURNING a", "RETURNING"),
        ] {
            let e = plan(sql).unwrap_err();
            assert!(e.contains(why), "{sql}: {e}");
        }
    }

    #[test]
    fn a_trailing_comment_stays_out_of_the_cut_text() {
        // Appended to a `-- ...` comment, the image query's FOR UPDATE would be commented out.
        assert_eq!(
            change("UPDATE t SET v = 1 WHERE id = 2 -- note").filter,
            " WHERE id = 2"
        );
        assert_eq!(change("DELETE FROM t WHERE id = 2 # note\n;").filter, " WHERE id = 2");
        let m = plan_multi("UPDATE a JOIN b ON a.id = b.id SET a.v = 1 WHERE b.k = 2 -- x")
            .unwrap()
            .unwrap();
        assert_eq!(m.select_tail, " FROM a JOIN b ON a.id = b.id WHERE b.k = 2");
    }

    #[test]
    fn literals_bound_in_place_of_placeholders() {
        assert_eq!(
            bind_literals(" WHERE a = ? AND b = '?' AND c IN (?, -1)", &["1".into(), "-2".into()]).as_deref(),
            Some(" WHERE a = 1 AND b = '?' AND c IN (-2, -1)")
        );
        assert_eq!(bind_literals(" WHERE a = ?", &[]), None);
    }

    #[test]
    fn statements_of_a_multi_statement_string() {
        let sql = "UPDATE t SET a = ';' WHERE id = 1; /* ; */ SELECT (1;) ;; DELETE FROM u ";
        let pieces: Vec<&str> = split_statements(sql).unwrap().into_iter().map(|r| &sql[r]).collect();
        assert_eq!(
            pieces,
            ["UPDATE t SET a = ';' WHERE id = 1", "SELECT (1;)", "DELETE FROM u"]
        );
    }

    #[test]
    fn statements_with_executable_comments_are_not_located() {
        // Found by fuzzing (statement_parser target): the tokenizer places the tokens inside
        // `/*! ... */` at wrong offsets (and drops the version digits), so every range cut
        // from them (statement splits, row filters) would be wrong.
        for sql in [
            "UPDATE t SET v = 1 /*! WHERE id = 1 */",
            "0;/*!00*;1*/",
            "DELETE FROM t /*M!100000 WHERE id = 2 */",
        ] {
            assert!(has_executable_comment(sql), "{sql}");
            let refused = split_statements(sql).expect_err(sql);
            assert!(refused.contains("executable comment"), "{refused}");
            assert!(plan(sql).is_err(), "{sql}");
        }
        assert!(!has_executable_comment("UPDATE t SET v = 1 /* WHERE id = 1 */"));
    }

    #[test]
    fn multi_table_updates_and_deletes() {
        let m =
            plan_multi("UPDATE a AS x JOIN b ON x.id = b.id SET x.v = ?, b.w = 1, u = 2 WHERE b.k = ? AND x.id > 0")
                .unwrap()
                .unwrap();
        assert_eq!(m.kind, ChangeKind::Update);
        assert_eq!(m.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(m.tables[0].alias.as_deref(), Some("x"));
        assert_eq!(
            m.assigned,
            [
                (Some("x".into()), "v".into()),
                (Some("b".into()), "w".into()),
                (None, "u".into())
            ]
        );
        assert_eq!(
            m.select_tail,
            " FROM a AS x JOIN b ON x.id = b.id WHERE b.k = ? AND x.id > 0"
        );
        assert_eq!(m.params, [1]);
        let m = plan_multi("UPDATE LOW_PRIORITY t1, db.t2 SET t1.a = t2.b WHERE t1.id = t2.id;")
            .unwrap()
            .unwrap();
        assert_eq!(m.select_tail, " FROM t1, db.t2 WHERE t1.id = t2.id");
        assert_eq!(m.tables[1].schema.as_deref(), Some("db"));
        let m = plan_multi("DELETE t1, t2 FROM t1 JOIN t2 ON t1.id = t2.id WHERE t1.a = ?")
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.kind, m.targets.clone()),
            (ChangeKind::Delete, vec!["t1".to_owned(), "t2".to_owned()])
        );
        assert_eq!(m.select_tail, " FROM t1 JOIN t2 ON t1.id = t2.id WHERE t1.a = ?");
        assert_eq!(m.params, [0]);
        let m = plan_multi("DELETE FROM t1 USING t1 JOIN t2 ON t1.id = t2.id")
            .unwrap()
            .unwrap();
        assert_eq!(m.targets, ["t1"]);
        assert_eq!(m.select_tail, " FROM t1 JOIN t2 ON t1.id = t2.id ");
        assert!(plan_multi("UPDATE t SET a = 1 WHERE id = 2").is_none());
        assert!(plan_multi("DELETE FROM t WHERE id = 2").is_none());
        assert!(
            plan_multi("UPDATE a JOIN b ON a.id = b.id SET a.v = 1 ORDER BY a.id")
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn the_insert_family_by_mode() {
        let insert = |sql: &str| match plan(sql).unwrap() {
            Plan::Insert(i) => i,
            other => panic!("{other:?}"),
        };
        let i = insert("REPLACE INTO t (a, b) VALUES (1, 'x'), (2, 'y')");
        assert_eq!((i.mode, i.rows.len()), (InsertMode::Replace, 2));
        assert_eq!(insert("INSERT IGNORE INTO t VALUES (1)").mode, InsertMode::Ignore);
        let i = insert("INSERT INTO t (a, b) VALUES (1, 2) AS new ON DUPLICATE KEY UPDATE b = new.b + VALUES(b)");
        assert_eq!(i.mode, InsertMode::Upsert(vec!["b".into()]));
        assert_eq!(i.rows, [[Some("1".to_owned()), Some("2".to_owned())]]);
        let i = insert("INSERT INTO t SET a = (1 + 2), b = 'x,y', c = DEFAULT ON DUPLICATE KEY UPDATE b = 'z'");
        assert_eq!(i.columns, ["a", "b", "c"]);
        assert_eq!(i.rows, [[Some("(1 + 2)".to_owned()), Some("'x,y'".to_owned()), None]]);
        assert_eq!(i.mode, InsertMode::Upsert(vec!["b".into()]));
        let i = insert("REPLACE t SET id = ?, v = ?;");
        assert_eq!(i.rows, [[Some("?".to_owned()), Some("?".to_owned())]]);
    }

    #[test]
    fn update_filter_is_cut_from_the_source() {
        let c = change(
            "UPDATE /* x */ `db`.t AS a SET v = ?, w='é' WHERE id IN (?, 2) AND c = 'ü'\n ORDER BY id DESC LIMIT 5;",
        );
        assert_eq!(c.kind, ChangeKind::Update);
        assert_eq!(
            c.table,
            TableRef {
                schema: Some("db".into()),
                name: "t".into(),
                alias: Some("a".into())
            }
        );
        assert_eq!(c.filter, " WHERE id IN (?, 2) AND c = 'ü'\n ORDER BY id DESC LIMIT 5");
        assert_eq!(c.filter_params, 1..2);
        assert_eq!(c.assigned, ["v", "w"]);
    }

    #[test]
    fn delete_with_and_without_where() {
        let c = change("delete from t where a > ? and b = '?' limit ?");
        assert_eq!((c.kind, c.table.name.as_str()), (ChangeKind::Delete, "t"));
        assert_eq!(c.filter, " where a > ? and b = '?' limit ?");
        assert_eq!(c.filter_params, 0..2, "the '?' inside a string is not a placeholder");
        let c = change("DELETE FROM t");
        assert_eq!((c.filter.as_str(), c.filter_params), ("", 0..0));
        let c = change("UPDATE t SET v = v + 1 ORDER BY id LIMIT 1");
        assert_eq!(c.filter, " ORDER BY id LIMIT 1");
        // Expression spans would lose the leading minus and the call's arguments.
        let c = change(
            "UPDATE t SET v = (SELECT MAX(x) FROM u WHERE u.a = 1 LIMIT 1) WHERE -id > ABS(?) OR f(x, 'WHERE') = 1",
        );
        assert_eq!(c.filter, " WHERE -id > ABS(?) OR f(x, 'WHERE') = 1");
        assert_eq!(c.filter_params, 0..1);
    }

    #[test]
    fn what_is_not_planned_says_why() {
        for (sql, why) in [
            ("UPDATE a JOIN b ON a.id = b.id SET a.v = 1", "multi-table"),
            ("DELETE a, b FROM a JOIN b ON a.id = b.id", "multi-table"),
            ("DELETE FROM t RETURNING id", "RETURNING"),
            ("UPDATE t SET v = 1; UPDATE t SET v = 2", "more than one"),
            ("UPDATE t SET", "parser rejects"),
        ] {
            let e = plan(sql).unwrap_err();
            assert!(e.contains(why), "{sql}: {e}");
        }
    }
}
