//! The first-keyword classifier. Input: a flag byte (bit 0: NO_BACKSLASH_ESCAPES), then the
//! statement text as a client sends it (any bytes, not only UTF-8).
//!
//! Checks that the XID hint's range and the start of a SET STATEMENT's statement lie inside
//! the text and, with the SQL parser as the reference, that no statement the parser reads as
//! a write is left unflagged: a write the classifier let through would run in a global
//! transaction without an undo record.
#![no_main]

use ferrata_fuzz::input::Input;
use ferrata_proxy::classify::{self, StatementClass};
use ferrata_proxy::sql::dml;
use libfuzzer_sys::fuzz_target;
use sqlparser::dialect::MySqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let no_backslash_escapes = input.byte() & 1 == 1;
    let sql = input.rest();

    let verdict = classify::classify(sql, no_backslash_escapes);
    if let Some(hint) = &verdict.xid_hint {
        assert!(hint.start <= hint.end && hint.end <= sql.len());
    }
    // The statement after SET STATEMENT ... FOR is sliced from the text.
    assert!(verdict.set_statement.is_none_or(|at| at <= sql.len()));
    let _ = classify::use_schema(sql);
    let _ = classify::savepoint_name(sql);

    // The parser knows no NO_BACKSLASH_ESCAPES: compare only in the default mode. Nor is it a
    // reference for a text whose first statement is empty: it skips that, where MariaDB
    // answers `;DELETE FROM t` with ERR 1064 and runs nothing (checked on MariaDB 10.11, with
    // and without CLIENT_MULTI_STATEMENTS).
    let Ok(text) = std::str::from_utf8(sql) else { return };
    if no_backslash_escapes || starts_with_empty_statement(text) {
        return;
    }
    if dml::plan(text).is_ok() {
        assert!(
            matches!(verdict.class, StatementClass::Dml(_)),
            "a planned write classified as {verdict:?}"
        );
    }
    if dml::written_tables(text).is_ok_and(|tables| !tables.is_empty()) {
        assert!(
            verdict.flagged(),
            "a statement writing tables classified as {verdict:?}"
        );
    }
});

/// Whether the first token that is not whitespace or a comment is `;`.
fn starts_with_empty_statement(text: &str) -> bool {
    Tokenizer::new(&MySqlDialect {}, text)
        .tokenize()
        .ok()
        .and_then(|tokens| tokens.into_iter().find(|t| !matches!(t, Token::Whitespace(_))))
        .is_some_and(|t| t == Token::SemiColon)
}
