//! Protocol features through the proxy, compared with the same commands sent directly to
//! MariaDB (raw connections: packet by packet, byte for byte; mysql_async: values, metadata,
//! counters and errors):
//!
//! - multi-statements mixing result sets and OKs, stored procedures returning several
//!   result sets (text and binary protocol), errors alone and in the middle of a
//!   multi-statement;
//! - OK packets: affected rows (with and without CLIENT_FOUND_ROWS), last insert id, warning
//!   counts, info strings, and the transaction / autocommit status flags;
//! - LOAD DATA LOCAL INFILE, cursor fetches in batches, a statement executed 1000 times,
//!   COM_STMT_SEND_LONG_DATA and COM_STMT_RESET;
//! - pipelining: PREPARE and EXECUTE of statement id 0xFFFFFFFF in one write, and several
//!   queries in one write;
//! - COM_FIELD_LIST, COM_STATISTICS, COM_PING, COM_INIT_DB;
//! - the `mariadb` command-line client, whose output must not change through the proxy.

use anyhow::{Context, Result, ensure};
use ferrata_tests::ferrata_testkit::raw::flags::{
    CLIENT_DEPRECATE_EOF, CLIENT_FOUND_ROWS, CLIENT_LOCAL_FILES, DEFAULT,
};
use ferrata_tests::ferrata_testkit::raw::status::{
    SERVER_MORE_RESULTS_EXISTS, SERVER_STATUS_AUTOCOMMIT, SERVER_STATUS_CURSOR_EXISTS, SERVER_STATUS_IN_TRANS,
    SERVER_STATUS_LAST_ROW_SENT,
};
use ferrata_tests::ferrata_testkit::raw::{Packet, lenenc};
use ferrata_tests::ferrata_testkit::{APP_PASSWORD, APP_USER};
use ferrata_tests::{
    Setup, assert_same_packets, com, command, execute_payload, framed, mariadb_cli, mask_statement_id,
    prepare_and_execute, raw_prepare, read_prepare_response, read_until_terminator,
};
use mysql_async::prelude::*;
use mysql_async::{Column, Conn, Row, Value};
use tokio::io::AsyncWriteExt;

/// Both ways of ending metadata and result sets.
const FLAG_SETS: [u32; 2] = [DEFAULT, DEFAULT & !CLIENT_DEPRECATE_EOF];

#[tokio::test(flavor = "multi_thread")]
async fn multi_statements_compare_packet_by_packet() -> Result<()> {
    let setup = Setup::start().await?;
    let sql = "SELECT 1 AS a; \
               CREATE TEMPORARY TABLE m (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(10)); \
               INSERT INTO m (v) VALUES ('x'), ('y'); \
               SELECT * FROM m; \
               UPDATE m SET v = 'z' WHERE id = 2; \
               DO 1; \
               SELECT v, id FROM m ORDER BY id DESC; \
               DROP TEMPORARY TABLE m";
    for flags in FLAG_SETS {
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        let d = direct.query(sql).await?;
        let p = proxied.query(sql).await?;
        assert_same_packets(&d, &p, &format!("multi-statement, flags {flags:#x}"));
        // Five OKs (four chained, the last one ending the response) and three result sets.
        let oks: Vec<&Packet> = p.iter().filter(|p| p.payload.starts_with(&[0x00])).collect();
        assert_eq!(oks.len(), 5, "{p:?}");
        let last = parse_ok(&oks[4].payload)?;
        assert_eq!(last.status & SERVER_MORE_RESULTS_EXISTS, 0);
        assert!(
            oks[..4]
                .iter()
                .all(|ok| parse_ok(&ok.payload).unwrap().status & SERVER_MORE_RESULTS_EXISTS != 0)
        );
        assert_eq!(
            p.iter().filter(|p| p.payload == b"\x012\x01y").count(),
            1,
            "row of the 2nd result set"
        );
        assert_same_packets(
            &direct.query("SELECT 2").await?,
            &proxied.query("SELECT 2").await?,
            "after",
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_procedure_with_several_result_sets() -> Result<()> {
    let setup = Setup::start().await?;
    let mut pair = setup.pair().await?;
    pair.direct
        .query_drop(
            "CREATE PROCEDURE three(IN n INT) BEGIN \
               SELECT n AS a; \
               SELECT 'x' AS b, 2.5 AS c UNION ALL SELECT '😀', NULL; \
               SELECT NOW() > '2000-01-01' AS recent, n * 2 AS twice; \
             END",
        )
        .await?;

    let mut sets = Vec::new();
    for conn in [&mut pair.direct, &mut pair.proxied] {
        sets.push(all_result_sets(conn, "CALL three(21)").await?);
    }
    assert_eq!(sets[0], sets[1]);
    let values: Vec<usize> = sets[1].iter().map(|(_, rows)| rows.len()).collect();
    assert_eq!(values, [1, 2, 1]);
    assert_eq!(
        sets[1][2].1[0],
        vec![Value::Bytes(b"1".to_vec()), Value::Bytes(b"42".to_vec())]
    );

    for flags in FLAG_SETS {
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        let what = format!("CALL, flags {flags:#x}");
        assert_same_packets(
            &direct.query("CALL three(7)").await?,
            &proxied.query("CALL three(7)").await?,
            &what,
        );
        let d = prepare_and_execute(&mut direct, "CALL three(8)", &[]).await?;
        let p = prepare_and_execute(&mut proxied, "CALL three(8)", &[]).await?;
        assert_same_packets(&d, &p, &format!("prepared {what}"));
        assert_same_packets(
            &direct.query("SELECT 3").await?,
            &proxied.query("SELECT 3").await?,
            &what,
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_keep_code_sqlstate_and_message() -> Result<()> {
    let setup = Setup::start().await?;
    let mut pair = setup.pair().await?;
    pair.direct
        .query_drop("CREATE TABLE dup (id INT PRIMARY KEY); INSERT INTO dup VALUES (1)")
        .await?;
    let cases = [
        ("SELEC 1", 1064, "42000"),
        ("INSERT INTO dup VALUES (1)", 1062, "23000"),
        ("SELECT * FROM no_such_table", 1146, "42S02"),
        ("SELECT 1; SELECT * FROM no_such_table; SELECT 2", 1146, "42S02"),
        (
            "INSERT INTO dup VALUES (2); INSERT INTO dup VALUES (2); DELETE FROM dup WHERE id = 2",
            1062,
            "23000",
        ),
    ];
    for flags in FLAG_SETS {
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        for (sql, code, state) in cases {
            let what = format!("{sql}, flags {flags:#x}");
            let mut replies = Vec::new();
            for conn in [&mut direct, &mut proxied] {
                replies.push(conn.query(sql).await?);
                // Undo what ran before the failing statement (what follows it never runs).
                conn.query("DELETE FROM dup WHERE id = 2").await?;
            }
            assert_same_packets(&replies[0], &replies[1], &what);
            let err = &replies[1].last().context("empty response")?.payload;
            assert_eq!(err[0], 0xFF, "{what}: should end in ERR");
            assert_eq!(u16::from_le_bytes([err[1], err[2]]), code, "{what}");
            assert_eq!(&err[3..9], format!("#{state}").as_bytes(), "{what}");
            // The session goes on.
            assert_same_packets(
                &direct.query("SELECT 1").await?,
                &proxied.query("SELECT 1").await?,
                &what,
            );
        }
    }

    for (sql, code, state) in cases {
        let mut errors = Vec::new();
        for conn in [&mut pair.direct, &mut pair.proxied] {
            errors.push(conn.query_drop(sql).await.expect_err(sql));
            conn.query_drop("DELETE FROM dup WHERE id = 2").await?;
        }
        let [d, p] = <[_; 2]>::try_from(errors).expect("two errors");
        assert_eq!(d.to_string(), p.to_string(), "{sql}");
        match p {
            mysql_async::Error::Server(e) => assert_eq!((e.code, e.state.as_str()), (code, state), "{sql}"),
            other => panic!("{sql}: not a server error: {other}"),
        }
        let alive: Option<u8> = pair.proxied.query_first("SELECT 1").await?;
        assert_eq!(alive, Some(1));
    }
    Ok(())
}

/// One statement of [`ok_packets_and_status_flags`] and what its proxied OK (or result
/// set terminator) must say.
struct OkStep {
    sql: &'static str,
    /// Affected rows without and with CLIENT_FOUND_ROWS; `None` for a result set.
    affected: Option<[u64; 2]>,
    insert_id: u64,
    warnings: u16,
    info: &'static str,
    in_trans: bool,
    autocommit: bool,
}

const fn ok(sql: &'static str, affected: u64, insert_id: u64, warnings: u16, info: &'static str) -> OkStep {
    OkStep {
        sql,
        affected: Some([affected, affected]),
        insert_id,
        warnings,
        info,
        in_trans: false,
        autocommit: true,
    }
}

const fn in_trans(step: OkStep, autocommit: bool) -> OkStep {
    OkStep {
        in_trans: true,
        autocommit,
        ..step
    }
}

fn ok_steps() -> Vec<OkStep> {
    let select = |sql| OkStep {
        affected: None,
        ..ok(sql, 0, 0, 0, "")
    };
    vec![
        ok("SET SESSION sql_mode = ''", 0, 0, 0, ""),
        ok(
            "CREATE TEMPORARY TABLE o (id INT AUTO_INCREMENT PRIMARY KEY, v INT, s VARCHAR(3))",
            0,
            0,
            0,
            "",
        ),
        ok(
            "INSERT INTO o (v, s) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
            3,
            1,
            0,
            "Records: 3  Duplicates: 0  Warnings: 0",
        ),
        ok("INSERT INTO o (v, s) VALUES (4, 'too long')", 1, 4, 1, ""),
        OkStep {
            affected: Some([1, 2]),
            ..ok(
                "UPDATE o SET v = 1 WHERE id <= 2",
                1,
                0,
                0,
                "Rows matched: 2  Changed: 1  Warnings: 0",
            )
        },
        ok(
            "UPDATE o SET s = 'long text' WHERE id = 3",
            1,
            0,
            1,
            "Rows matched: 1  Changed: 1  Warnings: 1",
        ),
        ok(
            "INSERT INTO o (id, v) VALUES (1, 10) ON DUPLICATE KEY UPDATE v = 10",
            2,
            1,
            0,
            "",
        ),
        ok("DELETE FROM o WHERE id > 3", 1, 0, 0, ""),
        select("SELECT COUNT(*) FROM o"),
        in_trans(ok("BEGIN", 0, 0, 0, ""), true),
        in_trans(select("SELECT * FROM o"), true),
        in_trans(ok("INSERT INTO o (v) VALUES (5)", 1, 5, 0, ""), true),
        ok("COMMIT", 0, 0, 0, ""),
        OkStep {
            autocommit: false,
            ..ok("SET autocommit = 0", 0, 0, 0, "")
        },
        in_trans(select("SELECT v FROM o WHERE id = 5"), false),
        OkStep {
            autocommit: false,
            ..ok("ROLLBACK", 0, 0, 0, "")
        },
        ok("SET autocommit = 1", 0, 0, 0, ""),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn ok_packets_and_status_flags() -> Result<()> {
    let setup = Setup::start().await?;
    for (found_rows, flags) in [(0, DEFAULT), (1, DEFAULT | CLIENT_FOUND_ROWS), (0, FLAG_SETS[1])] {
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        for step in ok_steps() {
            let what = format!("{}, flags {flags:#x}", step.sql);
            let d = direct.query(step.sql).await?;
            let p = proxied.query(step.sql).await?;
            assert_same_packets(&d, &p, &what);
            let last = &p.last().unwrap().payload;
            let status = match step.affected {
                Some(affected) => {
                    assert_eq!(p.len(), 1, "{what}: {p:?}");
                    let ok = parse_ok(last)?;
                    assert_eq!(ok.affected, affected[found_rows], "{what}: affected rows");
                    assert_eq!(ok.insert_id, step.insert_id, "{what}: last insert id");
                    assert_eq!(ok.warnings, step.warnings, "{what}: warnings");
                    assert_eq!(ok.info, step.info, "{what}: info");
                    ok.status
                }
                None if flags & CLIENT_DEPRECATE_EOF != 0 => parse_ok(last)?.status,
                None => u16::from_le_bytes([last[3], last[4]]),
            };
            assert_eq!(
                status & SERVER_STATUS_IN_TRANS != 0,
                step.in_trans,
                "{what}: in transaction"
            );
            assert_eq!(
                status & SERVER_STATUS_AUTOCOMMIT != 0,
                step.autocommit,
                "{what}: autocommit"
            );
        }
    }

    // The same counters as mysql_async reports them.
    let mut pair = setup.pair().await?;
    for step in ok_steps() {
        let mut seen = Vec::new();
        for conn in [&mut pair.direct, &mut pair.proxied] {
            conn.query_drop(step.sql).await?;
            seen.push((
                conn.affected_rows(),
                conn.last_insert_id(),
                conn.get_warnings(),
                conn.info().into_owned(),
            ));
        }
        assert_eq!(seen[0], seen[1], "{}", step.sql);
        assert_eq!(seen[1].3, step.info, "{}", step.sql);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn load_data_local_infile() -> Result<()> {
    let setup = Setup::start().await?;
    let file: String = (1..=5000).map(|i| format!("{i},name {i} 😀\n")).collect();
    let flags = DEFAULT | CLIENT_LOCAL_FILES;
    let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
    for conn in [&mut direct, &mut proxied] {
        assert_ne!(conn.capabilities() & CLIENT_LOCAL_FILES, 0);
        conn.query("CREATE TEMPORARY TABLE li (id INT PRIMARY KEY, name VARCHAR(30))")
            .await?;
    }
    let sql = "LOAD DATA LOCAL INFILE 'rows.csv' INTO TABLE li \
               CHARACTER SET utf8mb4 FIELDS TERMINATED BY ','";
    let d = direct.query(sql).await?;
    let p = proxied.query(sql).await?;
    assert_same_packets(&d, &p, "LOCAL INFILE request");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].payload, b"\xfbrows.csv");

    let mut responses = Vec::new();
    for conn in [&mut direct, &mut proxied] {
        // The file in three uneven packets, then the empty packet that ends it.
        let bytes = file.as_bytes();
        let chunks = [&bytes[..1000], &bytes[1000..70_000], &bytes[70_000..], &[]];
        for (seq, chunk) in (2u8..).zip(chunks) {
            conn.write_packet(seq, chunk).await?;
        }
        responses.push(conn.read_response().await?);
    }
    assert_same_packets(&responses[0], &responses[1], "LOAD DATA result");
    let ok = parse_ok(&responses[1][0].payload)?;
    assert_eq!(ok.affected, 5000);
    assert_eq!(ok.info, "Records: 5000  Deleted: 0  Skipped: 0  Warnings: 0");

    let check = "SELECT COUNT(*), SUM(id), MAX(name) FROM li";
    let d = direct.query(check).await?;
    let p = proxied.query(check).await?;
    assert_same_packets(&d, &p, "rows loaded");
    let row = &p[p.len() - 2].payload;
    assert!(
        row.starts_with(b"\x045000\x0812502500"),
        "{:?}",
        String::from_utf8_lossy(row)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cursor_fetches_in_batches() -> Result<()> {
    let setup = Setup::start().await?;
    let mut conn = setup.db.conn().await?;
    conn.query_drop(
        "CREATE TABLE c (n INT PRIMARY KEY, s VARCHAR(20), d DECIMAL(10,2)) \
         AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 100) \
         SELECT n, CONCAT('row ', n) AS s, n * 1.5 AS d FROM r",
    )
    .await?;
    let sql = "SELECT n, s, d FROM c ORDER BY n";
    for flags in FLAG_SETS {
        let what = format!("flags {flags:#x}");
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        let mut ids = Vec::new();
        for conn in [&mut direct, &mut proxied] {
            let (_, id) = raw_prepare(conn, sql).await?;
            conn.send_command(&execute_payload(id, 1, &[])).await?;
            ids.push(id);
        }
        let d = direct.read_response().await?;
        let p = proxied.read_response().await?;
        assert_same_packets(&d, &p, &format!("execute with cursor, {what}"));
        assert_ne!(
            terminator_status(p.last().unwrap(), flags)? & SERVER_STATUS_CURSOR_EXISTS,
            0
        );

        let mut rows = 0;
        loop {
            let mut batches = Vec::new();
            for (conn, id) in [&mut direct, &mut proxied].into_iter().zip(&ids) {
                let mut fetch = id.to_le_bytes().to_vec();
                fetch.extend_from_slice(&7u32.to_le_bytes());
                conn.send_command(&command(com::STMT_FETCH, &fetch)).await?;
                batches.push(read_until_terminator(conn).await?);
            }
            assert_same_packets(&batches[0], &batches[1], &format!("fetch after {rows} rows, {what}"));
            let batch = &batches[1];
            rows += batch.len() - 1;
            if terminator_status(batch.last().unwrap(), flags)? & SERVER_STATUS_LAST_ROW_SENT != 0 {
                break;
            }
            assert_eq!(batch.len(), 8, "{what}: a full batch");
        }
        assert_eq!(rows, 100, "{what}");

        // COM_STMT_RESET closes the cursor; fetching then is an error, the same error.
        let mut replies = Vec::new();
        for (conn, id) in [&mut direct, &mut proxied].into_iter().zip(&ids) {
            conn.send_command(&command(com::STMT_RESET, &id.to_le_bytes())).await?;
            let reset = conn.read_response().await?;
            let mut fetch = id.to_le_bytes().to_vec();
            fetch.extend_from_slice(&1u32.to_le_bytes());
            conn.send_command(&command(com::STMT_FETCH, &fetch)).await?;
            let mut reply = [reset, read_until_terminator(conn).await?].concat();
            // The message names the statement id, which differs between the connections.
            let named = format!("({id})").into_bytes();
            for packet in &mut reply {
                if let Some(at) = packet.payload.windows(named.len()).position(|w| w == named) {
                    packet.payload.splice(at..at + named.len(), *b"(id)");
                }
            }
            replies.push(reply);
        }
        assert_same_packets(&replies[0], &replies[1], &format!("reset then fetch, {what}"));
        assert_eq!(replies[1][1].payload[0], 0xFF);
        assert_same_packets(
            &direct.query("SELECT 1").await?,
            &proxied.query("SELECT 1").await?,
            &what,
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statement_executed_a_thousand_times() -> Result<()> {
    let setup = Setup::start().await?;
    let mut pair = setup.pair().await?;
    pair.direct
        .query_drop("CREATE TABLE many (id INT PRIMARY KEY, label VARCHAR(20), x DOUBLE)")
        .await?;
    let select = "SELECT ? + 1 AS next, CONCAT('n', ?) AS label, ? AS x";
    let insert = pair
        .proxied
        .prep("INSERT INTO many VALUES (?, CONCAT('n', ?), ?)")
        .await?;
    for i in 0..1000i64 {
        let x = i as f64 / 3.0;
        let d: Vec<Row> = pair.direct.exec(select, (i, i, x)).await?;
        let p: Vec<Row> = pair.proxied.exec(select, (i, i, x)).await?;
        let (d, p) = (d[0].clone().unwrap(), p[0].clone().unwrap());
        assert_eq!(format!("{d:?}"), format!("{p:?}"), "execution {i}");
        assert_eq!(p[0], Value::Int(i + 1));
        assert_eq!(p[2], Value::Double(x));
        pair.proxied.exec_drop(&insert, (i, i, x)).await?;
        assert_eq!(pair.proxied.affected_rows(), 1);
    }
    let summary: (i64, f64, String) = pair
        .direct
        .query_first("SELECT COUNT(*), SUM(x), MAX(label) FROM many")
        .await?
        .context("no row")?;
    assert_eq!(summary.0, 1000);
    assert!((summary.1 - 999.0 * 1000.0 / 2.0 / 3.0).abs() < 1e-6);
    assert_eq!(summary.2, "n999");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_prepare_and_execute_last_statement() -> Result<()> {
    let setup = Setup::start().await?;
    let prepare = command(com::STMT_PREPARE, b"SELECT ? * 2 AS doubled, CONCAT(?, '!') AS s");
    // Statement id 0xFFFFFFFF: the statement this connection prepared last.
    let execute = execute_payload(
        u32::MAX,
        0,
        &[
            (TYPE_LONGLONG, Some(21i64.to_le_bytes().to_vec())),
            (TYPE_VAR_STRING, Some(lenenc_str(b"hi"))),
        ],
    );
    for flags in FLAG_SETS {
        let what = format!("flags {flags:#x}");
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        let mut responses = Vec::new();
        for conn in [&mut direct, &mut proxied] {
            conn.stream_mut()
                .write_all(&[framed(0, &prepare), framed(0, &execute)].concat())
                .await?;
            let (mut packets, id) = read_prepare_response(conn).await?;
            ensure!(id != 0, "{what}: prepare failed: {packets:?}");
            mask_statement_id(&mut packets);
            packets.extend(conn.read_response().await?);
            responses.push(packets);
        }
        assert_same_packets(
            &responses[0],
            &responses[1],
            &format!("pipelined prepare + execute, {what}"),
        );
        let row = &responses[1][responses[1].len() - 2].payload;
        assert!(row.ends_with(b"\x03hi!"), "{what}: {row:02x?}");
    }

    // Several queries in one write; the responses come back in order.
    let queries = [
        "SELECT 1 AS one",
        "DO 1",
        "SELECT * FROM no_such_table",
        "SELECT 'last' AS l",
    ];
    let burst: Vec<u8> = queries
        .iter()
        .flat_map(|q| framed(0, &command(com::QUERY, q.as_bytes())))
        .collect();
    for flags in FLAG_SETS {
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        let mut responses = Vec::new();
        for conn in [&mut direct, &mut proxied] {
            conn.stream_mut().write_all(&burst).await?;
            let mut all = Vec::new();
            for _ in queries {
                all.push(conn.read_response().await?);
            }
            responses.push(all);
        }
        for (query, (d, p)) in queries.iter().zip(responses[0].iter().zip(&responses[1])) {
            assert_same_packets(d, p, &format!("pipelined {query}, flags {flags:#x}"));
        }
        assert_eq!(responses[1][2][0].payload[0], 0xFF);
        assert_eq!(responses[1][3][responses[1][3].len() - 2].payload, b"\x04last");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn field_list_statistics_ping_and_init_db() -> Result<()> {
    let setup = Setup::start().await?;
    let mut conn = setup.db.conn().await?;
    conn.query_drop(
        "CREATE TABLE fl (a INT NOT NULL DEFAULT 7, b VARCHAR(10) DEFAULT 'x', bb TEXT); \
         CREATE DATABASE other",
    )
    .await?;

    for flags in FLAG_SETS {
        let what = format!("flags {flags:#x}");
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        for (body, columns) in [
            (&b"fl\0"[..], Some(3)),
            (b"fl\0b%", Some(2)),
            (b"no_such_table\0", None),
        ] {
            let mut replies = Vec::new();
            for conn in [&mut direct, &mut proxied] {
                conn.send_command(&command(com::FIELD_LIST, body)).await?;
                replies.push(read_until_terminator(conn).await?);
            }
            let what = format!("COM_FIELD_LIST {:?}, {what}", String::from_utf8_lossy(body));
            assert_same_packets(&replies[0], &replies[1], &what);
            match columns {
                Some(n) => assert_eq!(replies[1].len(), n + 1, "{what}"),
                None => assert_eq!(replies[1][0].payload[..3], [0xFF, 0x7A, 0x04], "{what}: ERROR 1146"),
            }
        }

        let mut replies = Vec::new();
        for conn in [&mut direct, &mut proxied] {
            conn.send_command(&[com::PING]).await?;
            replies.push(conn.read_response().await?);
        }
        assert_same_packets(&replies[0], &replies[1], &format!("COM_PING, {what}"));
        assert_eq!(replies[1][0].payload[0], 0x00);

        // Statistics differ between any two calls (uptime, query counts): compare the shape.
        let mut replies = Vec::new();
        for conn in [&mut direct, &mut proxied] {
            conn.send_command(&[com::STATISTICS]).await?;
            let reply = conn.read_packet().await?;
            assert_eq!(reply.seq, 1);
            replies.push(String::from_utf8(reply.payload)?);
        }
        let labels = |s: &str| -> Vec<String> {
            s.split("  ")
                .map(|part| part.split(':').next().unwrap_or_default().to_owned())
                .collect()
        };
        assert!(replies[1].starts_with("Uptime: "), "{}", replies[1]);
        assert_eq!(labels(&replies[0]), labels(&replies[1]), "COM_STATISTICS, {what}");

        for (db, expected) in [("other", "other"), ("no_such_db", "other")] {
            let mut replies = Vec::new();
            for conn in [&mut direct, &mut proxied] {
                conn.send_command(&command(com::INIT_DB, db.as_bytes())).await?;
                let mut reply = conn.read_response().await?;
                reply.extend(conn.query("SELECT DATABASE()").await?);
                replies.push(reply);
            }
            assert_same_packets(&replies[0], &replies[1], &format!("COM_INIT_DB {db}, {what}"));
            let selected = &replies[1][replies[1].len() - 2].payload;
            assert_eq!(&selected[1..], expected.as_bytes(), "{what}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn send_long_data_and_statement_reset() -> Result<()> {
    let setup = Setup::start().await?;
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    for flags in FLAG_SETS {
        let what = format!("flags {flags:#x}");
        let (mut direct, mut proxied) = setup.raw_pair(flags).await?;
        let mut responses = Vec::new();
        for conn in [&mut direct, &mut proxied] {
            let (mut packets, id) = raw_prepare(conn, "SELECT CONCAT(?, '|') AS v, LENGTH(?) AS len").await?;
            mask_statement_id(&mut packets);
            let long_data = |param: u16, data: &[u8]| {
                let mut body = id.to_le_bytes().to_vec();
                body.extend_from_slice(&param.to_le_bytes());
                body.extend_from_slice(data);
                command(com::STMT_SEND_LONG_DATA, &body)
            };
            // Parameter 0 in two pieces, parameter 1 in three; neither gets a response.
            for (param, piece) in [
                (0, &b"hello "[..]),
                (0, b"world"),
                (1, &big[..1]),
                (1, &big[1..100_000]),
            ] {
                conn.send_command(&long_data(param, piece)).await?;
            }
            conn.send_command(&long_data(1, &big[100_000..])).await?;
            let long_params = [(TYPE_BLOB, None), (TYPE_BLOB, None)];
            conn.send_command(&execute_payload(id, 0, &long_params)).await?;
            packets.extend(conn.read_response().await?);

            // Long data sent and then reset is gone: the execute sends its values inline.
            conn.send_command(&long_data(0, b"discarded")).await?;
            conn.send_command(&command(com::STMT_RESET, &id.to_le_bytes())).await?;
            packets.extend(conn.read_response().await?);
            let inline = [
                (TYPE_VAR_STRING, Some(lenenc_str(b"inline"))),
                (TYPE_VAR_STRING, Some(lenenc_str(b""))),
            ];
            conn.send_command(&execute_payload(id, 0, &inline)).await?;
            packets.extend(conn.read_response().await?);
            responses.push(packets);
        }
        assert_same_packets(&responses[0], &responses[1], &format!("long data and reset, {what}"));
        let rows: Vec<&[u8]> = responses[1]
            .iter()
            .map(|p| p.payload.as_slice())
            .filter(|p| p.starts_with(&[0x00]) && p.len() > 8)
            .collect();
        let find = |needle: &[u8]| rows.iter().any(|r| r.windows(needle.len()).any(|w| w == needle));
        assert!(find(b"\x0chello world|"), "{what}: long data row");
        assert!(find(&300_000u32.to_le_bytes()), "{what}: length of the long parameter");
        assert!(find(b"\x07inline|"), "{what}: row after reset");
        assert!(!find(b"discarded"), "{what}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_cli_output_is_the_same() -> Result<()> {
    let setup = Setup::start().await?;
    let runs: [&[&str]; 5] = [
        &[
            "-e",
            "SELECT 1 AS one, 'two' AS two; SELECT NULL AS n, 3.5 AS x, '😀 tab\there' AS t",
        ],
        &[
            "--batch",
            "-e",
            "CREATE TEMPORARY TABLE c (id INT PRIMARY KEY, v VARCHAR(10)); \
             INSERT INTO c VALUES (1, 'a'), (2, NULL), (3, 'c\\nd'); \
             UPDATE c SET v = 'b' WHERE id = 2; SELECT * FROM c; SELECT ROW_COUNT(), LAST_INSERT_ID()",
        ],
        &[
            "--table",
            "-e",
            "SELECT 'x' AS a, 12345 AS b UNION SELECT 'longer value', NULL",
        ],
        &[
            "--column-type-info",
            "-e",
            "SELECT CAST(1.5 AS DECIMAL(10,3)) AS d, NOW(6) > 0 AS t, 'é' AS s",
        ],
        &["--batch", "-e", "SELECT 1; SELECT * FROM no_such_table; SELECT 2"],
    ];
    for args in runs {
        let direct = mariadb_cli(setup.db.addr(), APP_USER, APP_PASSWORD, Some("test"), args).await?;
        let proxied = mariadb_cli(setup.proxy.addr, APP_USER, APP_PASSWORD, Some("test"), args).await?;
        assert_eq!(direct, proxied, "mariadb {args:?}");
        assert!(!proxied.1.is_empty(), "mariadb {args:?} printed nothing");
    }
    let (status, _, stderr) = mariadb_cli(setup.proxy.addr, APP_USER, APP_PASSWORD, Some("test"), runs[4]).await?;
    assert_eq!(status, Some(1));
    assert!(
        stderr.contains("ERROR 1146 (42S02) at line 1: Table 'test.no_such_table' doesn't exist"),
        "{stderr}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Binary protocol parameter types used here.
const TYPE_LONGLONG: u8 = 0x08;
const TYPE_BLOB: u8 = 0xFC;
const TYPE_VAR_STRING: u8 = 0xFD;

/// A length-encoded string of fewer than 251 bytes.
fn lenenc_str(s: &[u8]) -> Vec<u8> {
    assert!(s.len() < 251);
    [&[s.len() as u8][..], s].concat()
}

/// The fields of an OK packet (or an OK-layout terminator) this file checks.
#[derive(Debug)]
struct OkPacket {
    affected: u64,
    insert_id: u64,
    status: u16,
    warnings: u16,
    info: String,
}

fn parse_ok(payload: &[u8]) -> Result<OkPacket> {
    ensure!(
        matches!(payload.split_first(), Some((0x00 | 0xFE, _))),
        "not an OK packet: {:?}",
        String::from_utf8_lossy(payload)
    );
    let mut at = 1;
    let mut int = || -> Result<u64> {
        let (value, used) = lenenc(&payload[at..]).context("malformed OK packet")?;
        at += used;
        Ok(value)
    };
    let (affected, insert_id) = (int()?, int()?);
    let fixed = payload.get(at..at + 4).context("OK packet without status")?;
    // MariaDB sends the info string length-encoded (when there is one).
    let info = match payload.get(at + 4..).unwrap_or_default() {
        [] => &[][..],
        rest => {
            let (len, used) = lenenc(rest).context("malformed info string")?;
            rest.get(used..used + len as usize).context("truncated info string")?
        }
    };
    Ok(OkPacket {
        affected,
        insert_id,
        status: u16::from_le_bytes([fixed[0], fixed[1]]),
        warnings: u16::from_le_bytes([fixed[2], fixed[3]]),
        info: String::from_utf8(info.to_vec())?,
    })
}

/// Status flags of a result set terminator: an EOF, or an OK-layout packet with
/// CLIENT_DEPRECATE_EOF.
fn terminator_status(packet: &Packet, flags: u32) -> Result<u16> {
    let p = &packet.payload;
    ensure!(p.starts_with(&[0xFE]), "not a terminator: {p:02x?}");
    if flags & CLIENT_DEPRECATE_EOF != 0 {
        Ok(parse_ok(p)?.status)
    } else {
        Ok(u16::from_le_bytes([p[3], p[4]]))
    }
}

/// Every result set of a (multi-result) text query: column metadata and rows.
async fn all_result_sets(conn: &mut Conn, sql: &str) -> Result<Vec<(Vec<Column>, Vec<Vec<Value>>)>> {
    let mut result = conn.query_iter(sql).await?;
    let mut sets = Vec::new();
    while !result.is_empty() {
        let columns = result.columns().map(|c| c.to_vec()).unwrap_or_default();
        let rows: Vec<Row> = result.collect().await?;
        sets.push((columns, rows.into_iter().map(Row::unwrap).collect()));
    }
    Ok(sets)
}
