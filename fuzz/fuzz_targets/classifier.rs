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

    // The parser knows no NO_BACKSLASH_ESCAPES: compare only in the default mode. It also
    // reads a NUL byte as whitespace, where MariaDB's lexer reads one before the end of the
    // text as a stray character: `\0;DELETE FROM t` is ERR 1064 there and runs nothing
    // (checked on MariaDB 10.11), so texts with a NUL are no reference for the classifier.
    let Ok(text) = std::str::from_utf8(sql) else { return };
    if no_backslash_escapes || text.contains('\0') {
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
