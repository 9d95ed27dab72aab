//! COM_STMT_EXECUTE parameters. Input: the statement's parameter count (2 bytes), whether
//! types from an earlier execute are known and those types (a field), a count of
//! COM_STMT_SEND_LONG_DATA values and each one (parameter index, field), a column count for
//! the binary-row reader, then the execute payload.
//!
//! Checks that what the reader accepts has one value per parameter, that writing those
//! parameters and reading them back gives them again, and that the SQL literals the proxy
//! makes of them never fail on a value's length.
#![no_main]

use std::collections::BTreeMap;

use ferrata_fuzz::input::Input;
use ferrata_proxy::protocol::execute;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let count = usize::from(input.u16());
    let known = input.byte() & 1 == 1;
    let previous: Vec<[u8; 2]> = input.field().chunks_exact(2).map(|c| [c[0], c[1]]).collect();
    let mut long = BTreeMap::new();
    for _ in 0..input.byte() % 4 {
        let index = input.u16();
        long.insert(index, input.field().to_vec());
    }
    let columns = usize::from(input.byte());
    let payload = input.rest();

    let _ = execute::string_row(payload, columns);
    let sent = execute::sent_types(payload, count);
    let Some((params, types)) = execute::params(payload, count, known.then_some(&previous[..]), &long) else {
        return;
    };
    assert_eq!((params.len(), types.len()), (count, count));
    if let Some(sent) = sent {
        assert_eq!(sent, types);
    }
    for p in &params {
        let _ = execute::literal(p);
    }
    let _ = execute::integer_literals(&params);
    if long.is_empty() {
        let rewritten = execute::payload(7, &params);
        let (again, again_types) =
            execute::params(&rewritten, count, None, &long).expect("the proxy's own execute reads back");
        assert_eq!((again, again_types), (params, types));
    }
});
