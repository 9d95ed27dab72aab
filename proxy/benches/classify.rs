//! The classifier's cost per statement, for statements typical of OLTP traffic.

use criterion::{Criterion, criterion_group, criterion_main};
use ferrata_proxy::classify::classify;
use std::hint::black_box;

fn statements(c: &mut Criterion) {
    let cases: [(&str, &str); 6] = [
        ("point_select", "SELECT c FROM sbtest1 WHERE id=5012"),
        ("update", "UPDATE sbtest3 SET k=k+1 WHERE id=4711"),
        (
            "insert_hint",
            "INSERT /*+ XID('10.0.0.1:8091:2612341069705662465') */ INTO t (a, b) VALUES (1, 'x')",
        ),
        ("begin", "BEGIN"),
        (
            "locking_read",
            "SELECT id, balance FROM accounts WHERE id IN (1, 2, 3) FOR UPDATE",
        ),
        (
            "range_select",
            "SELECT DISTINCT c FROM sbtest1 WHERE id BETWEEN 4112 AND 4211 ORDER BY c /* sysbench */",
        ),
    ];
    let mut group = c.benchmark_group("classify");
    for (name, sql) in cases {
        group.bench_function(name, |b| b.iter(|| classify(black_box(sql.as_bytes()), false)));
    }
    group.finish();
}

criterion_group!(benches, statements);
criterion_main!(benches);
