//! Undo record decoding: `undo_log.rollback_info` as the proxy reads it back for a rollback
//! (JSON, or zlib-compressed JSON behind a marker byte). Input: a rows-per-query count, then
//! the stored bytes.
//!
//! Checks that a record that decodes (and so passed validation) encodes and decodes to itself,
//! and that every use a rollback makes of it (compensation statements, the queries for the
//! current rows, the dirty check against rows of any shape, the read-back comparison) copes
//! with whatever a damaged or hostile record holds.
#![no_main]

use ferrata_fuzz::input::Input;
use ferrata_proxy::at::undo::{self, UndoRecord};
use ferrata_proxy::sql::image::{ImageRow, RawRow};
use libfuzzer_sys::fuzz_target;

fn raw(rows: &[ImageRow]) -> Vec<RawRow> {
    rows.iter()
        .map(|r| r.iter().map(|v| v.as_ref().map(|s| s.as_bytes().to_vec())).collect())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let rows_per_query = 1 + usize::from(input.byte());
    let stored = input.rest();

    let Ok(record) = UndoRecord::from_bytes(stored) else {
        return;
    };
    assert_eq!(UndoRecord::from_bytes(&record.to_bytes()).expect("re-encoded"), record);
    for item in &record.items {
        let _ = undo::compensation(item);
        let _ = undo::current_rows_query(item);
        let _ = undo::current_rows_queries(item, rows_per_query, undo::Lock::ForUpdate);
        let _ = undo::current_rows_queries(item, rows_per_query, undo::Lock::None);
        let _ = item.key_rows();
        let _ = item.select_list();
        for current in [raw(&item.after), raw(&item.before), vec![vec![None]], Vec::new()] {
            let _ = undo::dirty_check(item, &current);
            let _ = undo::restore_mismatch(item, &current);
        }
    }
});
