//! What the proxy must know of a locking read (`SELECT ... FOR UPDATE`, `FOR SHARE`,
//! `LOCK IN SHARE MODE`, with `NOWAIT`, `SKIP LOCKED` or `WAIT n`) to give it global read
//! isolation: the tables it reads and their aliases, and the statement's text from its
//! top-level FROM to its end, so the proxy can select the same rows' primary keys under the
//! same lock (`SELECT <keys> <tail>`). For SKIP LOCKED it also knows where a condition that
//! leaves out globally locked rows goes.
//!
//! As in `dml.rs`, text is cut from the client's SQL at token boundaries and never
//! re-printed; the parser (which knows neither `LOCK IN SHARE MODE` nor `WAIT n`) only reads
//! the FROM clause, handed to it without the locking clause.

use std::ops::Range;

use sqlparser::ast::{SetExpr, Statement};
use sqlparser::dialect::MySqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

use super::dml::{TableRef, is_keyword, table_ref, tokens};

/// How the read treats rows locked by others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Waits (up to the lock timeout, or `WAIT n` seconds).
    Block,
    Nowait,
    SkipLocked,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockingRead {
    /// Every table of the top-level FROM clause, with its alias.
    pub tables: Vec<TableRef>,
    /// From the top-level FROM to the end (locking clause included), as written.
    pub tail: String,
    /// Where `tail` starts in the statement.
    pub tail_start: usize,
    /// Which of the statement's `?` placeholders (0-based) fall in `tail`.
    pub tail_params: Range<usize>,
    pub wait: Wait,
    /// Byte offset in `tail` where a condition joins the filter (for SKIP LOCKED), and
    /// whether a WHERE is already there (then the condition is ANDed with it).
    pub filter_end: usize,
    pub has_where: bool,
    /// Byte offset in `tail` where the WHERE condition starts, when there is one.
    pub where_start: usize,
}

/// Plans a locking read, or says why the proxy cannot isolate it.
pub fn plan(sql: &str) -> Result<LockingRead, String> {
    let tokens = tokens(sql)?;
    let word = |i: usize, k: Keyword| tokens.get(i).is_some_and(|t| is_keyword(&t.token, k));
    let mut depth = 0i32;
    let mut from = None;
    let mut where_at = None;
    let mut filter_end = None;
    let mut lock = None;
    let mut wait = Wait::Block;
    for (i, t) in tokens.iter().enumerate() {
        match &t.token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::SemiColon if depth == 0 && tokens[i + 1..].iter().any(|t| t.token != Token::SemiColon) => {
                return Err("more than one statement".into());
            }
            _ if depth != 0 => {}
            _ if word(i, Keyword::UNION) || word(i, Keyword::INTERSECT) || word(i, Keyword::EXCEPT) => {
                return Err("a locking read with UNION".into());
            }
            _ if word(i, Keyword::INTO) => return Err("SELECT ... INTO".into()),
            _ if word(i, Keyword::DISTINCT) || word(i, Keyword::GROUP) || word(i, Keyword::HAVING) => {
                return Err("a locking read with DISTINCT, GROUP BY or HAVING".into());
            }
            _ if from.is_none() && word(i, Keyword::FROM) => from = Some(i),
            _ if from.is_some() && where_at.is_none() && filter_end.is_none() && word(i, Keyword::WHERE) => {
                where_at = Some(i)
            }
            _ if from.is_some()
                && filter_end.is_none()
                && (word(i, Keyword::ORDER) || word(i, Keyword::LIMIT) || word(i, Keyword::WINDOW)) =>
            {
                filter_end = Some(i)
            }
            _ if lock.is_none()
                && ((word(i, Keyword::FOR) && (word(i + 1, Keyword::UPDATE) || word(i + 1, Keyword::SHARE)))
                    || (word(i, Keyword::LOCK) && word(i + 1, Keyword::IN))) =>
            {
                lock = Some(i);
                filter_end.get_or_insert(i);
            }
            _ if lock.is_some() && word(i, Keyword::NOWAIT) => wait = Wait::Nowait,
            _ if lock.is_some() && word(i, Keyword::SKIP) && word(i + 1, Keyword::LOCKED) => wait = Wait::SkipLocked,
            _ => {}
        }
    }
    let from = from.ok_or("a locking read without FROM")?;
    let lock = lock.ok_or("a SELECT without a locking clause")?;
    if lock < from {
        return Err("a locking clause before FROM".into());
    }
    let start = tokens[from].start;
    let from_text = &sql[start..tokens[lock].start];
    let tables = from_tables(from_text)?;
    let placeholders = |before: usize| {
        tokens
            .iter()
            .filter(|t| matches!(&t.token, Token::Placeholder(p) if p == "?") && t.start < before)
            .count()
    };
    let tail = sql[start..].trim_end().trim_end_matches(';').trim_end().to_owned();
    let end = filter_end.map_or(tail.len(), |i| tokens[i].start - start);
    Ok(LockingRead {
        tables,
        tail_params: placeholders(start)..placeholders(sql.len()),
        wait,
        filter_end: end,
        has_where: where_at.is_some(),
        where_start: where_at.map_or(end, |i| tokens[i].start - start + "WHERE".len()),
        tail,
        tail_start: start,
    })
}

/// The tables of a FROM clause (given as `FROM ...` without what follows the filter).
fn from_tables(from_text: &str) -> Result<Vec<TableRef>, String> {
    let sql = format!("SELECT 1 {from_text}");
    let statements = Parser::parse_sql(&MySqlDialect {}, &sql)
        .map_err(|e| format!("a FROM clause the proxy's parser rejects ({e})"))?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return Err("a locking read the proxy could not follow".into());
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err("a locking read the proxy could not follow".into());
    };
    let mut tables = Vec::new();
    for t in &select.from {
        for factor in std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)) {
            tables.push(
                table_ref(factor).map_err(|_| "a locking read of a derived table or a table function".to_owned())?,
            );
        }
    }
    Ok(tables)
}

impl LockingRead {
    /// The tail with `condition` joined to its filter (for SKIP LOCKED).
    pub fn tail_excluding(&self, condition: &str) -> String {
        let t = &self.tail;
        if self.has_where {
            format!(
                "{} ({}) AND NOT ({condition}) {}",
                &t[..self.where_start],
                t[self.where_start..self.filter_end].trim(),
                &t[self.filter_end..]
            )
        } else {
            format!(
                "{} WHERE NOT ({condition}) {}",
                t[..self.filter_end].trim_end(),
                &t[self.filter_end..]
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_of_the_locking_clause() {
        let p = plan("SELECT a, (SELECT 1 FROM z) FROM shop.t AS x WHERE id = ? FOR UPDATE").unwrap();
        assert_eq!(p.tables.len(), 1);
        assert_eq!(p.tables[0].schema.as_deref(), Some("shop"));
        assert_eq!(p.tables[0].alias.as_deref(), Some("x"));
        assert_eq!(p.tail, "FROM shop.t AS x WHERE id = ? FOR UPDATE");
        assert_eq!(p.tail_params, 0..1);
        assert_eq!(p.wait, Wait::Block);
        let p = plan("select * from t join u on t.id = u.id lock in share mode").unwrap();
        assert_eq!(p.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["t", "u"]);
        assert_eq!(plan("SELECT * FROM t FOR SHARE NOWAIT").unwrap().wait, Wait::Nowait);
        let p = plan("SELECT * FROM jobs WHERE state = 'new' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED").unwrap();
        assert_eq!(p.wait, Wait::SkipLocked);
        assert_eq!(
            p.tail_excluding("id IN (1)"),
            "FROM jobs WHERE (state = 'new') AND NOT (id IN (1)) ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
        );
        let p = plan("SELECT * FROM jobs FOR UPDATE SKIP LOCKED;").unwrap();
        assert_eq!(
            p.tail_excluding("id IN (1)"),
            "FROM jobs WHERE NOT (id IN (1)) FOR UPDATE SKIP LOCKED"
        );
        assert_eq!(plan("SELECT * FROM t FOR UPDATE WAIT 3").unwrap().wait, Wait::Block);
    }

    #[test]
    fn what_cannot_be_isolated() {
        for (sql, why) in [
            ("SELECT COUNT(*) FROM t GROUP BY a FOR UPDATE", "GROUP BY"),
            ("SELECT * FROM t UNION SELECT * FROM u FOR UPDATE", "UNION"),
            ("SELECT * FROM (SELECT * FROM t) d FOR UPDATE", "derived"),
            ("SELECT a INTO @x FROM t FOR UPDATE", "INTO"),
            ("SELECT 1 FOR UPDATE", "without FROM"),
            ("SELECT * FROM t FOR UPDATE; SELECT 1", "more than one"),
        ] {
            let e = plan(sql).unwrap_err();
            assert!(e.contains(why), "{sql}: {e}");
        }
    }
}
