//! Column types through the proxy, compared with the same operations run directly against
//! MariaDB, in the text protocol (COM_QUERY) and the binary protocol (prepared statements):
//!
//! - every type of [`cases`] (DECIMAL(65,30), DOUBLE and FLOAT extremes incl. subnormals, integers of all
//!   widths at both ends, DATETIME(6), TIMESTAMP(6), DATE with zero dates, TIME beyond 24 h
//!   and negative, YEAR, BIT(1), BIT(64), JSON, CHAR/VARCHAR/TEXT with 4-byte UTF-8,
//!   BINARY/VARBINARY/BLOB with every byte value, ENUM, SET, GEOMETRY), each with a NULL
//!   row: values, column metadata, and values written back through the proxy as parameters;
//! - parameters echoed by `SELECT ?` (float and integer limits, every byte value, zero and
//!   extreme dates and times);
//! - the same SELECTs with raw connections, whole responses (column definitions included)
//!   byte for byte, with and without CLIENT_DEPRECATE_EOF;
//! - BLOBs longer than one 16 MiB protocol packet, written through the proxy as a prepared
//!   statement parameter and as a text query, read back both ways.

use anyhow::{Context, Result};
use ferrata_tests::ferrata_testkit::MariaDbOptions;
use ferrata_tests::ferrata_testkit::raw::MAX_PAYLOAD;
use ferrata_tests::ferrata_testkit::raw::flags::{CLIENT_DEPRECATE_EOF, DEFAULT};
use ferrata_tests::{Setup, assert_same_packets, prepare_and_execute};
use mysql_async::prelude::*;
use mysql_async::{Column, Conn, Params, Row, Value};

#[tokio::test(flavor = "multi_thread")]
async fn values_and_metadata_match_direct_in_both_protocols() -> Result<()> {
    let setup = start().await?;
    let cases = cases();
    create_tables(&setup, &cases).await?;
    let mut pair = setup.pair().await?;
    pair.proxied.query_drop("SET SESSION sql_mode = ''").await?;

    for (i, case) in cases.iter().enumerate() {
        let table = format!("t{i}");
        let what = format!("{} ({table})", case.column);
        let select = format!("SELECT id, v FROM {table} ORDER BY id");

        let direct_text = text(&mut pair.direct, &select).await?;
        let proxied_text = text(&mut pair.proxied, &select).await?;
        assert_same_result(&direct_text, &proxied_text, &format!("{what}, text protocol"));

        let direct_binary = binary(&mut pair.direct, &select, Params::Empty).await?;
        let proxied_binary = binary(&mut pair.proxied, &select, Params::Empty).await?;
        assert_same_result(&direct_binary, &proxied_binary, &format!("{what}, binary protocol"));

        // What the server stored is what the case expects (so that two equally wrong
        // answers cannot pass), and the last row is all NULL.
        let (_, rows) = &proxied_text;
        assert_eq!(rows.len(), case.values.len() + 1, "{what}: row count");
        for ((literal, expected), row) in case.values.iter().zip(rows) {
            if let Some(expected) = expected {
                assert_eq!(
                    row[1],
                    Value::Bytes(expected.clone()),
                    "{what}: {literal:.60} reads back as {:.80?}",
                    row[1]
                );
            }
        }
        assert_eq!(rows.last().unwrap()[1], Value::NULL, "{what}: NULL row");
        assert_eq!(proxied_binary.1.last().unwrap()[1], Value::NULL, "{what}: NULL row");

        // The binary values, written back through the proxy as parameters, store the same.
        let copy = format!("{table}_ps");
        pair.proxied
            .query_drop(format!("CREATE TABLE {copy} LIKE {table}"))
            .await?;
        let insert = pair
            .proxied
            .prep(format!("INSERT INTO {copy} (id, v) VALUES (?, ?)"))
            .await?;
        for row in &direct_binary.1 {
            pair.proxied
                .exec_drop(&insert, vec![row[0].clone(), row[1].clone()])
                .await
                .with_context(|| format!("{what}: inserting {:.80?} as a parameter", row[1]))?;
        }
        let original = text(&mut pair.direct, &select).await?;
        let copied = text(&mut pair.direct, &format!("SELECT id, v FROM {copy} ORDER BY id")).await?;
        assert_eq!(
            format!("{:?}", original.1),
            format!("{:?}", copied.1),
            "{what}: values written as parameters through the proxy"
        );
    }
    Ok(())
}

/// Parameters the server echoes back (`SELECT ?`) in the binary protocol, including values
/// SQL literals cannot express exactly.
#[tokio::test(flavor = "multi_thread")]
async fn parameters_echo_back_exactly() -> Result<()> {
    let setup = start().await?;
    let mut pair = setup.pair().await?;
    let all_bytes: Vec<u8> = (0..=255).collect();
    let params = [
        Value::Double(-0.0),
        Value::Double(f64::MAX),
        Value::Double(f64::MIN_POSITIVE),
        Value::Double(5e-324),
        Value::Float(f32::MAX),
        Value::Int(i64::MIN),
        Value::Int(i64::MAX),
        Value::UInt(u64::MAX),
        Value::Bytes(all_bytes),
        Value::Bytes("😀 𝄞 中文".into()),
        Value::Date(0, 0, 0, 0, 0, 0, 0),
        Value::Date(9999, 12, 31, 23, 59, 59, 999_999),
        Value::Time(true, 34, 22, 59, 59, 999_999),
        Value::Time(false, 1, 1, 0, 0, 1),
        Value::NULL,
    ];
    for param in params {
        let sql = "SELECT ?";
        let direct = binary(&mut pair.direct, sql, Params::Positional(vec![param.clone()])).await?;
        let proxied = binary(&mut pair.proxied, sql, Params::Positional(vec![param.clone()])).await?;
        assert_same_result(&direct, &proxied, &format!("SELECT ? with {param:?}"));
        // MariaDB itself turns -0 into 0 (directly too), so that one is only compared.
        if let (Value::Double(sent), Value::Double(read)) = (&param, &proxied.1[0][0])
            && *sent != 0.0
        {
            assert_eq!(sent.to_bits(), read.to_bits(), "{sent:e} came back as {read:e}");
        }
        if matches!(param, Value::Int(_) | Value::UInt(_) | Value::Bytes(_) | Value::NULL) {
            assert_eq!(proxied.1[0][0], param);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn whole_responses_match_byte_for_byte() -> Result<()> {
    let setup = start().await?;
    let cases = cases();
    create_tables(&setup, &cases).await?;

    for flags in [DEFAULT, DEFAULT & !CLIENT_DEPRECATE_EOF] {
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        assert_eq!(
            proxied.capabilities() & CLIENT_DEPRECATE_EOF,
            flags & CLIENT_DEPRECATE_EOF
        );
        for (i, case) in cases.iter().enumerate() {
            let what = format!("{} (flags {flags:#x})", case.column);
            let select = format!("SELECT * FROM t{i} ORDER BY id");

            let d = direct.query(&select).await?;
            let p = proxied.query(&select).await?;
            assert_eq!(
                d.len(),
                1 + 2 + usize::from(flags & CLIENT_DEPRECATE_EOF == 0) + case.values.len() + 2
            );
            assert_same_packets(&d, &p, &format!("{what}, text"));

            let d = prepare_and_execute(&mut direct, &select, &[]).await?;
            let p = prepare_and_execute(&mut proxied, &select, &[]).await?;
            assert_same_packets(&d, &p, &format!("{what}, binary"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_larger_than_one_packet() -> Result<()> {
    let setup = start().await?;
    let mut pair = setup.pair().await?;
    pair.direct
        .query_drop("CREATE TABLE big (id INT PRIMARY KEY, b LONGBLOB)")
        .await?;

    // A text row of exactly one full-length packet (then an empty one), and a value whose
    // length prefix is 0xFE, making the row look like a terminator but for its length.
    let sizes = [MAX_PAYLOAD - 4, 17 * 1024 * 1024 + 5];
    let mut id = 0;
    for size in sizes {
        let blob: Vec<u8> = (0..size).map(|i| ((i * 31) ^ (i >> 8)) as u8).collect();
        let by_param = {
            id += 1;
            pair.proxied
                .exec_drop("INSERT INTO big VALUES (?, ?)", (id, blob.clone()))
                .await?;
            id
        };
        let by_text = {
            id += 1;
            pair.proxied
                .query_drop(format!("INSERT INTO big VALUES ({id}, X'{}')", hex(&blob)))
                .await?;
            id
        };

        for id in [by_param, by_text] {
            let what = format!("{size}-byte BLOB {id}");
            let sql = format!("SELECT b, id FROM big WHERE id = {id}");
            for conn in [&mut pair.direct, &mut pair.proxied] {
                let (read, _): (Vec<u8>, i32) = conn.query_first(&sql).await?.context("no row")?;
                assert!(read == blob, "{what}: text protocol read differs");
                let (read, _): (Vec<u8>, i32) = conn.exec_first(&sql, ()).await?.context("no row")?;
                assert!(read == blob, "{what}: binary protocol read differs");
            }

            for flags in [DEFAULT, DEFAULT & !CLIENT_DEPRECATE_EOF] {
                let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
                let d = direct.query(&sql).await?;
                let p = proxied.query(&sql).await?;
                assert!(d.iter().any(|p| p.payload.len() == MAX_PAYLOAD), "{what}: not split");
                assert_same_packets(&d, &p, &format!("{what}, raw text, flags {flags:#x}"));
                let d = prepare_and_execute(&mut direct, &sql, &[]).await?;
                let p = prepare_and_execute(&mut proxied, &sql, &[]).await?;
                assert_same_packets(&d, &p, &format!("{what}, raw binary, flags {flags:#x}"));
                // Both sessions are still in step after the big response.
                assert_same_packets(
                    &direct.query("SELECT 1").await?,
                    &proxied.query("SELECT 1").await?,
                    &what,
                );
            }
        }
    }
    Ok(())
}

/// A column type and the rows to store in it: a SQL literal and, where checked, the exact
/// bytes the text protocol returns for it. Every table also gets a NULL row.
struct Case {
    column: &'static str,
    values: Vec<(String, Option<Vec<u8>>)>,
}

/// Rows whose text form is given as a string.
fn case(column: &'static str, values: &[(&str, &str)]) -> Case {
    Case {
        column,
        values: values
            .iter()
            .map(|(literal, expected)| (literal.to_string(), Some(expected.as_bytes().to_vec())))
            .collect(),
    }
}

/// Rows written as hex literals, read back as exactly those bytes (plus `pad` zero bytes
/// up to a fixed width).
fn bytes_case(column: &'static str, values: &[Vec<u8>], width: Option<usize>) -> Case {
    Case {
        column,
        values: values
            .iter()
            .map(|v| {
                let mut expected = v.clone();
                if let Some(width) = width {
                    expected.resize(width, 0);
                }
                (format!("X'{}'", hex(v)), Some(expected))
            })
            .collect(),
    }
}

fn cases() -> Vec<Case> {
    let nines = format!("{}.{}", "9".repeat(35), "9".repeat(30));
    let all_bytes: Vec<u8> = (0..=255).collect();
    let long_text = format!("{}end", "🦀é中".repeat(3000));
    let mut cases = vec![
        case(
            "DECIMAL(65,30)",
            &[
                (&nines, &nines),
                (&format!("-{nines}"), &format!("-{nines}")),
                ("0.000000000000000000000000000001", "0.000000000000000000000000000001"),
                ("0", "0.000000000000000000000000000000"),
                ("-12.5", "-12.500000000000000000000000000000"),
            ],
        ),
        case(
            "DOUBLE",
            &[
                ("1.7976931348623157e308", "1.7976931348623157e308"),
                ("-1.7976931348623157e308", "-1.7976931348623157e308"),
                ("2.2250738585072014e-308", "2.2250738585072014e-308"),
                ("4.9e-324", "5e-324"),
                ("-1e-320", "-1e-320"),
                ("1e300", "1e300"),
                ("-1.5e-200", "-1.5e-200"),
                ("0.1", "0.1"),
            ],
        ),
        case(
            "FLOAT",
            &[
                ("3.40282e38", "3.40282e38"),
                ("-1.17549e-38", "-1.17549e-38"),
                ("1.401298e-45", "1.4013e-45"),
                ("1.5", "1.5"),
            ],
        ),
        case(
            "DATETIME(6)",
            &[
                ("'1000-01-01 00:00:00'", "1000-01-01 00:00:00.000000"),
                ("'9999-12-31 23:59:59.999999'", "9999-12-31 23:59:59.999999"),
                ("'2024-02-29 12:34:56.000001'", "2024-02-29 12:34:56.000001"),
                ("'0000-00-00 00:00:00'", "0000-00-00 00:00:00.000000"),
            ],
        ),
        case(
            "TIMESTAMP(6) NULL",
            &[
                ("'1970-01-01 00:00:01'", "1970-01-01 00:00:01.000000"),
                ("'2038-01-19 03:14:07.999999'", "2038-01-19 03:14:07.999999"),
                ("'0000-00-00 00:00:00'", "0000-00-00 00:00:00.000000"),
            ],
        ),
        case(
            "DATE",
            &[
                ("'1000-01-01'", "1000-01-01"),
                ("'9999-12-31'", "9999-12-31"),
                ("'0000-00-00'", "0000-00-00"),
                ("'2024-00-00'", "2024-00-00"),
            ],
        ),
        case(
            "TIME(6)",
            &[
                ("'-838:59:59'", "-838:59:59.000000"),
                ("'838:59:59'", "838:59:59.000000"),
                ("'-00:00:00.000001'", "-00:00:00.000001"),
                ("'25:30:00.5'", "25:30:00.500000"),
                ("'-100:00:01.123456'", "-100:00:01.123456"),
            ],
        ),
        case("YEAR", &[("1901", "1901"), ("2155", "2155"), ("0", "0000")]),
        case(
            "JSON",
            &[
                (
                    r#"'{"a": [1, 2.5, "é"], "emoji": "😀", "n": null}'"#,
                    r#"{"a": [1, 2.5, "é"], "emoji": "😀", "n": null}"#,
                ),
                ("'[]'", "[]"),
            ],
        ),
        case("CHAR(10)", &[("'😀é'", "😀é"), ("''", "")]),
        case("VARCHAR(100)", &[("'𝄞 clef, 😀 grin, 中文'", "𝄞 clef, 😀 grin, 中文")]),
        case("TEXT", &[(&format!("'{long_text}'"), &long_text)]),
        case("ENUM('a','b','c d')", &[("'c d'", "c d"), ("'a'", "a")]),
        case("SET('x','y','z')", &[("'x,z'", "x,z"), ("''", "")]),
        bytes_case("BIT(1)", &[vec![0], vec![1]], None),
        bytes_case(
            "BIT(64)",
            &[vec![0xFF; 8], vec![0; 8], vec![0x80, 0, 0, 0, 0, 0, 0, 1]],
            None,
        ),
        bytes_case("BINARY(16)", &[all_bytes[..16].to_vec(), vec![0xFF]], Some(16)),
        bytes_case("VARBINARY(256)", &[all_bytes.clone(), vec![]], None),
        bytes_case("BLOB", &[all_bytes.repeat(64)], None),
        Case {
            column: "GEOMETRY",
            values: ["POINT(1 2)", "POLYGON((0 0,1 0,1 1,0 0))"]
                .iter()
                .map(|wkt| (format!("ST_GeomFromText('{wkt}')"), None))
                .collect(),
        },
    ];
    let integers = [
        ("TINYINT", "-128", "127"),
        ("TINYINT UNSIGNED", "0", "255"),
        ("SMALLINT", "-32768", "32767"),
        ("SMALLINT UNSIGNED", "0", "65535"),
        ("MEDIUMINT", "-8388608", "8388607"),
        ("MEDIUMINT UNSIGNED", "0", "16777215"),
        ("INT", "-2147483648", "2147483647"),
        ("INT UNSIGNED", "0", "4294967295"),
        ("BIGINT", "-9223372036854775808", "9223372036854775807"),
        ("BIGINT UNSIGNED", "0", "18446744073709551615"),
    ];
    cases.extend(
        integers
            .iter()
            .map(|&(column, min, max)| case(column, &[(min, min), (max, max), ("1", "1")])),
    );
    cases
}

/// A server whose sessions use UTC, so TIMESTAMP values read back as written.
async fn start() -> Result<Setup> {
    let options = MariaDbOptions {
        extra_args: vec!["--default-time-zone=+00:00".into()],
        tls: None,
    };
    Setup::start_with(options, |_| {}).await
}

/// Creates table `t<i>` (id, v) for each case, directly, and fills it with the case's
/// values and a NULL row. Zero dates need a sql_mode without NO_ZERO_DATE.
async fn create_tables(setup: &Setup, cases: &[Case]) -> Result<()> {
    let mut conn = setup.db.conn().await?;
    conn.query_drop("SET SESSION sql_mode = ''").await?;
    for (i, case) in cases.iter().enumerate() {
        conn.query_drop(format!("CREATE TABLE t{i} (id INT PRIMARY KEY, v {})", case.column))
            .await?;
        let rows: Vec<String> = case
            .values
            .iter()
            .map(|(literal, _)| literal.as_str())
            .chain(["NULL"])
            .enumerate()
            .map(|(n, literal)| format!("({}, {literal})", n + 1))
            .collect();
        conn.query_drop(format!("INSERT INTO t{i} VALUES {}", rows.join(", ")))
            .await
            .with_context(|| format!("filling the {} table", case.column))?;
        let warnings = conn.get_warnings();
        assert_eq!(warnings, 0, "{}: the values should be stored as they are", case.column);
    }
    conn.disconnect().await?;
    Ok(())
}

type ResultSet = (Vec<Column>, Vec<Vec<Value>>);

/// Column metadata and rows of a text-protocol query.
async fn text(conn: &mut Conn, sql: &str) -> Result<ResultSet> {
    let mut result = conn.query_iter(sql).await?;
    let columns = result.columns().map(|c| c.to_vec()).unwrap_or_default();
    let rows: Vec<Row> = result.collect().await?;
    Ok((columns, rows.into_iter().map(Row::unwrap).collect()))
}

/// Column metadata and rows of a prepared statement executed once.
async fn binary(conn: &mut Conn, sql: &str, params: Params) -> Result<ResultSet> {
    let mut result = conn.exec_iter(sql, params).await?;
    let columns = result.columns().map(|c| c.to_vec()).unwrap_or_default();
    let rows: Vec<Row> = result.collect().await?;
    Ok((columns, rows.into_iter().map(Row::unwrap).collect()))
}

/// Same metadata and the same values; values compared by their debug form, so that
/// `-0.0` and `0.0` differ.
#[track_caller]
fn assert_same_result(direct: &ResultSet, proxied: &ResultSet, what: &str) {
    assert_eq!(direct.0, proxied.0, "{what}: column metadata");
    assert_eq!(format!("{:?}", direct.1), format!("{:?}", proxied.1), "{what}: values");
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02X}");
        s
    })
}
