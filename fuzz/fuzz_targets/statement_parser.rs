//! Ferrata's statement parsing: its own statements (`START GLOBAL TRANSACTION`, `BEGIN BRANCH`, ...), the
//! planning of writes and locking reads for undo images and lock keys, multi-table writes,
//! the splitting of multi-statement strings, and the binding of literals. Input: the SQL text
//! (UTF-8; other bytes never reach these parsers), then, after a NUL, literals to bind.
//!
//! Checks that statement ranges lie in order inside the text on character boundaries, and
//! that binding as many literals as there are placeholders leaves the rest of the text alone.
#![no_main]

use ferrata_proxy::coordinator::statement;
use ferrata_proxy::sql::{dml, select};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(all) = std::str::from_utf8(data) else { return };
    let (sql, literals) = all.split_once('\0').unwrap_or((all, ""));

    let _ = statement::parse(sql);
    let _ = statement::parse_branch(sql, false);
    let _ = statement::parse_branch(sql, true);
    let _ = dml::plan(sql);
    let _ = dml::plan_multi(sql);
    let _ = dml::written_tables(sql);
    if let Ok(read) = select::plan(sql) {
        let _ = read.tail_excluding("`id` = 1");
    }
    if let Ok(ranges) = dml::split_statements(sql) {
        let mut end = 0;
        for r in ranges {
            assert!(
                end <= r.start && r.start < r.end && r.end <= sql.len(),
                "{r:?} after {end}"
            );
            assert!(sql.is_char_boundary(r.start) && sql.is_char_boundary(r.end));
            let _ = dml::plan(&sql[r.clone()]);
            end = r.end;
        }
    }
    let values: Vec<String> = literals.split('\0').map(str::to_owned).collect();
    if let Some(bound) = dml::bind_literals(sql, &values) {
        let placeholders = sql.len() - sql.replace('?', "").len();
        assert!(placeholders >= values.len());
        assert_eq!(
            bound.len(),
            sql.len() - values.len() + values.iter().map(String::len).sum::<usize>()
        );
    }
});
