//! Fidelity with a coordinator configured (so the no-dirty-writes path is live): what a
//! client sees through ferrata-proxy equals what it sees from MariaDB directly, for the
//! response shapes and session state that third-party client suites exercise.

use anyhow::Result;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::raw::flags::{CLIENT_DEPRECATE_EOF, CLIENT_MULTI_STATEMENTS, DEFAULT};
use ferrata_tests::ferrata_testkit::raw::{Packet, RawConn};
use ferrata_tests::ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb, MariaDbOptions};
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{
    assert_same_packets, com, command, execute_payload, prepare_and_execute, raw_prepare, read_until_terminator,
};
use mysql_async::prelude::*;
use mysql_async::{Conn, Row};

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

/// A server with table `d` (three DECIMAL values), a coordinator and a proxy in front.
async fn setup() -> Result<(MariaDb, Coordinator, ProxyProcess)> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), 300)?;
    let mut c = db.conn().await?;
    c.query_drop("CREATE TABLE d (id INT PRIMARY KEY, v DECIMAL(10,2))")
        .await?;
    c.query_drop("INSERT INTO d VALUES (1, 1.25), (2, 2.5), (3, 3.75)")
        .await?;
    Ok((db, tc, proxy))
}

/// A raw connection directly and one through the proxy, with client `flags`.
async fn raw_pair(db: &MariaDb, proxy: &ProxyProcess, flags: u32) -> Result<(RawConn, RawConn)> {
    Ok((
        RawConn::connect(db.addr(), APP_USER, APP_PASSWORD, Some("test"), flags).await?,
        RawConn::connect(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), flags).await?,
    ))
}

/// Sends `sql` on both connections and checks the answers are the same packets.
async fn assert_same_answer(direct: &mut RawConn, proxied: &mut RawConn, sql: &str, what: &str) -> Result<()> {
    let d = direct.query(sql).await?;
    let p = proxied.query(sql).await?;
    assert_same_packets(&d, &p, what);
    Ok(())
}

/// Every result set of `sql` (a multi-result answer), as text.
async fn results(conn: &mut Conn, sql: &str) -> Result<Vec<Vec<Vec<Option<String>>>>> {
    let mut out = Vec::new();
    let mut result = conn.query_iter(sql).await?;
    while !result.is_empty() {
        let rows: Vec<Row> = result.collect().await?;
        out.push(
            rows.into_iter()
                .map(|r| {
                    r.unwrap()
                        .into_iter()
                        .map(|v| match v {
                            mysql_async::Value::NULL => None,
                            v => Some(v.as_sql(true)),
                        })
                        .collect()
                })
                .collect(),
        );
    }
    Ok(out)
}

/// Client flag sets: with and without CLIENT_DEPRECATE_EOF.
const FLAG_SETS: [u32; 2] = [DEFAULT & !CLIENT_DEPRECATE_EOF, DEFAULT];

const CURSOR_LOOP: &str = "BEGIN NOT ATOMIC
    DECLARE done INT DEFAULT 0;
    DECLARE x DECIMAL(10,2);
    DECLARE c CURSOR FOR SELECT v FROM d ORDER BY id;
    DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1;
    OPEN c;
    l: LOOP
        FETCH c INTO x;
        IF done THEN LEAVE l; END IF;
        SELECT x, CAST(x AS SIGNED) AS s;
        SHOW WARNINGS;
    END LOOP;
    CLOSE c;
END";

#[tokio::test]
async fn a_compound_statement_answers_packet_for_packet_as_directly() -> Result<()> {
    let (db, _tc, proxy) = setup().await?;
    for flags in FLAG_SETS {
        let (mut direct, mut proxied) = raw_pair(&db, &proxy, flags).await?;
        assert_same_answer(
            &mut direct,
            &mut proxied,
            CURSOR_LOOP,
            &format!("cursor loop, flags {flags:#x}"),
        )
        .await?;
        let what = format!("after the cursor loop, flags {flags:#x}");
        assert_same_answer(&mut direct, &mut proxied, "SELECT 1", &what).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_compound_statement_with_a_cursor_loop_answers_as_directly() -> Result<()> {
    let (db, _tc, proxy) = setup().await?;
    let expected = results(&mut db.conn().await?, CURSOR_LOOP).await?;
    let mut proxied = proxy.conn().await?;
    assert_eq!(results(&mut proxied, CURSOR_LOOP).await?, expected);
    // The session is still there.
    let one: Option<i64> = proxied.query_first("SELECT 1").await?;
    assert_eq!(one, Some(1));
    Ok(())
}

/// The relay must know where the compound statement's answer ends: a command pipelined
/// behind it gets its own answer, not the rest of the block's.
#[tokio::test]
async fn a_command_pipelined_after_a_compound_statement_gets_its_own_answer() -> Result<()> {
    let (db, _tc, proxy) = setup().await?;
    for flags in FLAG_SETS {
        let mut replies = Vec::new();
        for addr in [db.addr(), proxy.addr] {
            let mut conn = RawConn::connect(addr, APP_USER, APP_PASSWORD, Some("test"), flags).await?;
            conn.send_command(&command(com::QUERY, CURSOR_LOOP.as_bytes())).await?;
            conn.send_command(&command(com::QUERY, b"SELECT 'after'")).await?;
            let first = conn.read_response().await?;
            let second = conn.read_response().await?;
            replies.push((first, second));
        }
        assert_same_packets(&replies[0].0, &replies[1].0, &format!("the block, flags {flags:#x}"));
        assert_same_packets(
            &replies[0].1,
            &replies[1].1,
            &format!("the pipelined SELECT, flags {flags:#x}"),
        );
    }
    Ok(())
}

/// Procedures answered through prepared statements (binary result sets, OUT parameters as a
/// result set of their own flagged PS_OUT_PARAMS) and in multi-statement strings.
#[tokio::test]
async fn procedures_and_blocks_in_every_response_shape_answer_as_directly() -> Result<()> {
    let (db, _tc, proxy) = setup().await?;
    let mut c = db.conn().await?;
    c.query_drop(
        "CREATE PROCEDURE outs(IN a INT, OUT b INT, INOUT c VARCHAR(10)) \
         BEGIN SELECT a AS a_in; SET b = a * 2; SET c = CONCAT(c, '!'); END",
    )
    .await?;
    c.query_drop(format!("CREATE PROCEDURE looped() {CURSOR_LOOP}")).await?;
    let statements = [
        ("CALL outs(?, ?, ?) prepared", "CALL outs(3, @b, @c)"),
        ("CALL looped() prepared", "CALL looped()"),
    ];
    for flags in FLAG_SETS {
        let (mut direct, mut proxied) = raw_pair(&db, &proxy, flags).await?;
        for (what, sql) in statements {
            let d = prepare_and_execute(&mut direct, sql, &[]).await?;
            let p = prepare_and_execute(&mut proxied, sql, &[]).await?;
            assert_same_packets(&d, &p, &format!("{what}, flags {flags:#x}"));
            assert_same_answer(
                &mut direct,
                &mut proxied,
                sql,
                &format!("{sql} as text, flags {flags:#x}"),
            )
            .await?;
        }
        // OUT parameters bound to placeholders come back as their own result set.
        let int = |v: i32| (0x03u8, Some(v.to_le_bytes().to_vec()));
        let text = |v: &str| (0xfdu8, Some([&[v.len() as u8][..], v.as_bytes()].concat()));
        let params = [int(4), int(0), text("hi")];
        let d = prepare_and_execute(&mut direct, "CALL outs(?, ?, ?)", &params).await?;
        let p = prepare_and_execute(&mut proxied, "CALL outs(?, ?, ?)", &params).await?;
        assert_same_packets(&d, &p, &format!("CALL with OUT parameters, flags {flags:#x}"));
        // A block and a procedure inside a multi-statement string.
        let multi = "SELECT 1 AS one; CALL looped(); BEGIN NOT ATOMIC SELECT 2 AS two; CALL outs(5, @b, @c); END; SELECT @b, @c";
        let what = format!("blocks in a multi-statement string, flags {flags:#x}");
        assert_same_answer(&mut direct, &mut proxied, multi, &what).await?;
        let what = format!("after them, flags {flags:#x}");
        assert_same_answer(&mut direct, &mut proxied, "SELECT 'still here'", &what).await?;
    }
    Ok(())
}

/// A client that did not enable CLIENT_MULTI_STATEMENTS gets the server's own syntax error
/// for a string of several statements, inside a global transaction too; nothing runs.
#[tokio::test]
async fn several_statements_without_multi_statements_get_the_servers_syntax_error() -> Result<()> {
    let (db, _tc, proxy) = setup().await?;
    let flags = DEFAULT & !CLIENT_MULTI_STATEMENTS;
    let (mut direct, mut proxied) = raw_pair(&db, &proxy, flags).await?;
    let started = proxied.query("START GLOBAL TRANSACTION").await?;
    assert_eq!(
        started[0].payload,
        [0x01],
        "START GLOBAL TRANSACTION answers a result set"
    );
    let sql = "UPDATE d SET v = 9 WHERE id = 1; SELECT 1";
    let d = direct.query(sql).await?;
    assert_eq!(d[0].payload[..3], [0xff, 0x28, 0x04], "directly: ER_PARSE_ERROR");
    assert_same_packets(
        &d,
        &proxied.query(sql).await?,
        "several statements without CLIENT_MULTI_STATEMENTS",
    );
    let v: Option<String> = db
        .conn()
        .await?
        .query_first("SELECT CAST(v AS CHAR) FROM d WHERE id = 1")
        .await?;
    assert_eq!(v.as_deref(), Some("1.25"), "nothing ran");
    // A compound statement is one statement to the server whatever the flag: still refused.
    let p = proxied
        .query("BEGIN NOT ATOMIC UPDATE d SET v = 9 WHERE id = 1; END")
        .await?;
    assert_eq!(p[0].payload[..3], [0xff, 0xd3, 0x04], "ER_NOT_SUPPORTED_YET (1235)");
    let v: Option<String> = db
        .conn()
        .await?
        .query_first("SELECT CAST(v AS CHAR) FROM d WHERE id = 1")
        .await?;
    assert_eq!(v.as_deref(), Some("1.25"), "the block did not run");
    Ok(())
}

/// An execute that asks for a cursor on a CALL gets the procedure's result sets with their
/// rows (MariaDB opens no cursor for it, though the procedure's own cursor flags them).
#[tokio::test]
async fn a_call_executed_with_a_cursor_flag_answers_as_directly() -> Result<()> {
    let (db, _tc, proxy) = setup().await?;
    db.conn()
        .await?
        .query_drop(format!("CREATE PROCEDURE looped() {CURSOR_LOOP}"))
        .await?;
    for flags in FLAG_SETS {
        let (mut direct, mut proxied) = raw_pair(&db, &proxy, flags).await?;
        let mut seen = Vec::new();
        for conn in [&mut direct, &mut proxied] {
            let (_, id) = raw_prepare(conn, "CALL looped()").await?;
            conn.send_command(&execute_payload(id, 1, &[])).await?;
            // A query pipelined behind it marks where the execute's answer must have ended.
            conn.send_command(&command(com::QUERY, b"SELECT 'pipelined'")).await?;
            let mut packets = Vec::new();
            loop {
                let p = conn.read_packet().await?;
                let last = p.payload.starts_with(&[0xff]) || p.payload.ends_with(b"pipelined");
                packets.push(p);
                if last {
                    break;
                }
            }
            seen.push(packets);
        }
        assert_same_packets(
            &seen[0],
            &seen[1],
            &format!("CALL executed with a cursor flag, flags {flags:#x}"),
        );
    }
    Ok(())
}

/// A session's story around COM_CHANGE_USER, as text (errors included), to compare a run
/// through the proxy with one directly. MariaDB resets the session even for a refused
/// change (variables, the open transaction and prepared statements are gone) and keeps it
/// open on the old user and database.
async fn change_user_story(conn: &mut Conn) -> Vec<String> {
    let mut seen = Vec::new();
    let show = |r: Result<Vec<Row>, mysql_async::Error>| match r {
        Ok(rows) => format!(
            "{:?}",
            rows.into_iter()
                .map(|r| r.unwrap().into_iter().map(|v| v.as_sql(true)).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        ),
        Err(e) => format!("error: {e}"),
    };
    const SESSION: &str = "SELECT CURRENT_USER(), DATABASE(), @@in_transaction, @x";
    let stmt = conn.prep("SELECT ? + 1").await.expect("prepared");
    conn.query_drop("SET @x = 5").await.expect("set");
    conn.query_drop("BEGIN").await.expect("begin");
    conn.query_drop("UPDATE d SET v = 9 WHERE id = 3")
        .await
        .expect("update");
    let wrong = mysql_async::ChangeUserOpts::default()
        .with_user(Some(APP_USER.into()))
        .with_pass(Some("wrong".into()))
        .with_db_name(Some("mysql".into()));
    seen.push(format!(
        "refused: {:?}",
        conn.change_user(wrong).await.map_err(|e| e.to_string())
    ));
    seen.push(show(conn.query(SESSION).await));
    seen.push(show(conn.exec(&stmt, (1,)).await));
    seen.push(show(conn.query("ROLLBACK").await));
    let right = mysql_async::ChangeUserOpts::default()
        .with_user(Some(APP_USER.into()))
        .with_pass(Some(APP_PASSWORD.into()))
        .with_db_name(Some("test".into()));
    seen.push(format!(
        "accepted: {:?}",
        conn.change_user(right).await.map_err(|e| e.to_string())
    ));
    seen.push(show(conn.query(SESSION).await));
    seen.push(show(conn.exec("SELECT ? + 1", (41,)).await));
    seen.push(show(conn.exec("SELECT v FROM d WHERE id = ?", (3,)).await));
    seen
}

#[tokio::test]
async fn change_user_refused_or_accepted_leaves_the_session_as_directly() -> Result<()> {
    let (db, _tc, proxy) = setup().await?;
    let mut direct = db.conn().await?;
    let mut proxied = proxy.conn().await?;
    let expected = change_user_story(&mut direct).await;
    assert!(expected[0].contains("1045"), "{expected:?}");
    assert_eq!(change_user_story(&mut proxied).await, expected);

    // The reset ends the session's global transaction too, and its writes run as before.
    let xid: Option<String> = proxied.query_first("START GLOBAL TRANSACTION").await?;
    proxied.query_drop("SET autocommit = 0").await?;
    let wrong = mysql_async::ChangeUserOpts::default().with_pass(Some("wrong".into()));
    assert!(proxied.change_user(wrong).await.is_err());
    let bound: Option<(Option<String>, Option<String>)> = proxied.query_first("SHOW GLOBAL TRANSACTION").await?;
    assert_eq!(bound, Some((None, None)), "{xid:?} left");
    proxied.query_drop("UPDATE d SET v = 7 WHERE id = 1").await?;
    let v: Option<String> = direct.query_first("SELECT v FROM d WHERE id = 1").await?;
    assert_eq!(
        v.as_deref(),
        Some("7.00"),
        "autocommit is back on, as in a fresh session"
    );
    Ok(())
}

/// Sends `sql` and reads its answer: the number of progress reports (ERR packets with code
/// 0xFFFF) before the OK that ends it.
async fn progress_reports(conn: &mut RawConn, sql: &str) -> Result<usize> {
    conn.send_command(&command(com::QUERY, sql.as_bytes())).await?;
    let mut reports = 0;
    loop {
        let p = conn.read_packet().await?;
        match p.payload.as_slice() {
            [0xff, 0xff, 0xff, ..] => reports += 1,
            [0x00, ..] => return Ok(reports),
            other => anyhow::bail!("{sql}: unexpected packet {:02x?}", &other[..other.len().min(40)]),
        }
    }
}

#[tokio::test]
async fn progress_reports_reach_a_client_that_asked_for_them() -> Result<()> {
    let (db, _tc, proxy) = setup().await?;
    let mut c = db.conn().await?;
    c.query_drop("CREATE TABLE big (id INT PRIMARY KEY, pad CHAR(255) NOT NULL DEFAULT 'x') SELECT seq AS id FROM seq_1_to_400000")
        .await?;
    // MARIADB_CLIENT_PROGRESS; reports come once a second at the most, so the copy must last
    // longer than that: the table grows until the direct session sees one.
    const PROGRESS: u32 = 1;
    let mut direct =
        RawConn::connect_mariadb(db.addr(), APP_USER, APP_PASSWORD, Some("test"), DEFAULT, PROGRESS).await?;
    let mut proxied =
        RawConn::connect_mariadb(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), DEFAULT, PROGRESS).await?;
    for conn in [&mut direct, &mut proxied] {
        assert_eq!(progress_reports(conn, "SET progress_report_time = 1").await?, 0);
    }
    let alter = "ALTER TABLE big FORCE, ALGORITHM = COPY";
    let mut rows = 400_000;
    while progress_reports(&mut direct, alter).await? == 0 {
        anyhow::ensure!(rows < 6_400_000, "no progress report directly even with {rows} rows");
        c.query_drop(format!(
            "INSERT INTO big (id) SELECT seq FROM seq_{}_to_{}",
            rows + 1,
            2 * rows
        ))
        .await?;
        rows *= 2;
    }
    assert!(progress_reports(&mut proxied, alter).await? > 0, "reports relayed");
    // The session goes on normally.
    let answer = proxied.query("SELECT COUNT(*) FROM big").await?;
    assert_eq!(
        answer.len(),
        if proxied.capabilities() & CLIENT_DEPRECATE_EOF != 0 {
            4
        } else {
            5
        }
    );
    Ok(())
}

/// MariaDB's metadata caching and extended metadata (MARIADB_CLIENT_CACHE_METADATA and
/// _EXTENDED_METADATA, bits 36 and 35), which Connector/C and Connector/J ask for.
const CACHED_AND_EXTENDED_METADATA: u32 = (1 << 4) | (1 << 3);

/// One response whose result set may come without column definitions (cached metadata):
/// up to its final terminator, whether EOF packets are sent or not.
async fn read_result(conn: &mut RawConn) -> Result<Vec<ferrata_tests::ferrata_testkit::raw::Packet>> {
    let mut packets = read_until_terminator(conn).await?;
    if conn.capabilities() & CLIENT_DEPRECATE_EOF == 0 && packets[0].payload[0] != 0xff {
        packets.extend(read_until_terminator(conn).await?);
    }
    Ok(packets)
}

#[tokio::test]
async fn cached_and_extended_metadata_answer_as_directly() -> Result<()> {
    let (db, _tc, proxy) = setup().await?;
    for flags in FLAG_SETS {
        let mut answers = Vec::new();
        for addr in [db.addr(), proxy.addr] {
            let mut conn = RawConn::connect_mariadb(
                addr,
                APP_USER,
                APP_PASSWORD,
                Some("test"),
                flags,
                CACHED_AND_EXTENDED_METADATA,
            )
            .await?;
            let (_, id) = raw_prepare(&mut conn, "SELECT v, id FROM d WHERE id = 1").await?;
            let mut seen = Vec::new();
            for _ in 0..2 {
                conn.send_command(&execute_payload(id, 0, &[])).await?;
                seen.push(read_result(&mut conn).await?);
            }
            conn.send_command(&command(com::QUERY, b"SELECT v FROM d ORDER BY id"))
                .await?;
            seen.push(read_result(&mut conn).await?);
            answers.push((seen, conn));
        }
        let (proxied, mut conn) = answers.pop().expect("two");
        let (direct, _) = answers.pop().expect("two");
        assert_eq!(
            direct[0][0].payload,
            [2, 0],
            "the execute's metadata is cached: none follows"
        );
        for (d, p) in direct.iter().zip(&proxied) {
            assert_same_packets(d, p, "metadata caching");
        }

        // The proxy's own result set has the layout the session negotiated.
        let xid: Vec<_> = conn.query("START GLOBAL TRANSACTION").await?;
        assert_eq!(xid[0].payload, [1, 1], "one column, definitions follow");
        let column = &xid[1].payload;
        let mut at = 0;
        for _ in 0..6 {
            let (len, used) = ferrata_tests::ferrata_testkit::raw::lenenc(&column[at..]).expect("lenenc");
            at += used + len as usize;
        }
        assert_eq!(
            &column[at..at + 2],
            [0, 0x0c],
            "empty extended metadata, then the fixed fields"
        );
        conn.query("ROLLBACK GLOBAL").await?;
    }
    Ok(())
}

/// What a session sees after autocommit writes outside any global transaction, as text:
/// ROW_COUNT(), warnings, LAST_INSERT_ID(), @@in_transaction, a failed write, a
/// multi-statement string whose second write fails, a statement MariaDB refuses inside a
/// transaction, and a prepared write. Creates its own tables, so it can run twice on one
/// server.
async fn autocommit_story(conn: &mut Conn) -> Vec<String> {
    let mut seen = Vec::new();
    for sql in [
        "DROP TABLE IF EXISTS w, a",
        "CREATE TABLE w (id INT PRIMARY KEY, v TINYINT)",
        "CREATE TABLE a (id INT AUTO_INCREMENT PRIMARY KEY, v INT)",
        "INSERT INTO w VALUES (1, 1), (2, 2), (3, 3)",
        "SET sql_mode = ''",
    ] {
        conn.query_drop(sql).await.expect(sql);
    }
    const STATE: &str = "SELECT ROW_COUNT(), @@warning_count, @@in_transaction, LAST_INSERT_ID()";
    for sql in [
        "DELETE FROM w WHERE id = 3",
        STATE,
        "INSERT INTO w VALUES (4, 1000), (5, -1000)",
        STATE,
        "SHOW WARNINGS",
        "INSERT INTO a (v) VALUES (1), (2)",
        STATE,
        "INSERT INTO w VALUES (1, 1)",
        STATE,
        "SHOW WARNINGS",
        "INSERT INTO a (v) VALUES (3); INSERT INTO w VALUES (1, 1)",
        "SELECT COUNT(*) FROM a",
        "SET STATEMENT binlog_format = 'STATEMENT' FOR UPDATE w SET v = v + 1 WHERE id = 2",
        STATE,
        "SELECT * FROM w ORDER BY id",
    ] {
        let text = match conn.query::<Row, _>(sql).await {
            Ok(rows) => format!("{:?}", rows.into_iter().map(Row::unwrap).collect::<Vec<_>>()),
            Err(e) => format!("error: {e}"),
        };
        seen.push(format!("{sql} -> {text}"));
    }
    conn.exec_drop("UPDATE w SET v = ? WHERE id > ?", (7, 1))
        .await
        .expect("prepared update");
    let state: Vec<Row> = conn.query(STATE).await.expect("state");
    seen.push(format!(
        "prepared update -> {:?}",
        state.into_iter().map(Row::unwrap).collect::<Vec<_>>()
    ));
    seen
}

#[tokio::test]
async fn autocommit_writes_leave_the_session_as_directly() -> Result<()> {
    // Binary logging on, so that MariaDB refuses SET STATEMENT binlog_format inside a
    // transaction.
    let db = MariaDb::start_with(MariaDbOptions {
        extra_args: vec!["--log-bin=binlog".into(), "--binlog-format=ROW".into()],
        ..MariaDbOptions::default()
    })
    .await?;
    let tc = Coordinator::start(TC)?;
    let proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), 300)?;
    let expected = autocommit_story(&mut db.conn().await?).await;
    // Until the proxy trusts its view of the coordinator it checks every write.
    let mut proxied = proxy.conn().await?;
    proxy.await_trust(&mut proxied).await?;
    assert!(
        expected[1].ends_with(r#"[[Bytes("1"), Bytes("0"), Bytes("0"), Bytes("0")]]"#),
        "{expected:#?}"
    );
    let proxied = autocommit_story(&mut proxied).await;
    let differ: Vec<_> = proxied.iter().zip(&expected).filter(|(p, e)| p != e).collect();
    assert!(differ.is_empty(), "through the proxy, then directly: {differ:#?}");
    assert_eq!(proxied.len(), expected.len());
    Ok(())
}

/// MariaDB's extended capability for COM_STMT_BULK_EXECUTE, shifted down by 32.
const BULK_OPERATIONS: u32 = 1 << 2;

/// A COM_STMT_BULK_EXECUTE body for statement `id` with parameters (INT, VARCHAR), types
/// sent (STMT_BULK_FLAG_SEND_TYPES_TO_SERVER), one row per `(id, v)`.
fn bulk(id: u32, rows: &[(i32, &str)]) -> Vec<u8> {
    let mut body = id.to_le_bytes().to_vec();
    body.extend(128u16.to_le_bytes());
    body.extend([0x03, 0x00, 0xfd, 0x00]);
    for (n, v) in rows {
        body.push(0); // indicator: a value follows
        body.extend(n.to_le_bytes());
        body.push(0);
        body.push(v.len() as u8);
        body.extend(v.as_bytes());
    }
    command(com::STMT_BULK_EXECUTE, &body)
}

/// A raw connection to `addr` with client `flags` that negotiates bulk execute.
async fn bulk_conn(addr: std::net::SocketAddr, flags: u32) -> Result<RawConn> {
    RawConn::connect_mariadb(addr, APP_USER, APP_PASSWORD, Some("test"), flags, BULK_OPERATIONS).await
}

/// The error code of a response that is one ERR packet.
fn error_code(response: &[Packet]) -> Option<u16> {
    match response {
        [p] => match p.payload[..] {
            [0xff, low, high, ..] => Some(u16::from_le_bytes([low, high])),
            _ => None,
        },
        _ => None,
    }
}

/// A bulk execute of one row `(id, "1")` into `d` is refused (1235) as one the proxy cannot
/// protect.
async fn assert_bulk_refused(conn: &mut RawConn, id: i32) -> Result<()> {
    let refused = bulk_execute(conn, "INSERT INTO d VALUES (?, ?)", &[(id, "1")]).await?;
    let text = String::from_utf8_lossy(&refused[0].payload).into_owned();
    assert_eq!(error_code(&refused), Some(1235), "{text}");
    assert!(text.contains("bulk execute"), "{text}");
    Ok(())
}

/// Prepares `sql` on `conn` and runs it as one bulk execute of `rows`; the response.
async fn bulk_execute(conn: &mut RawConn, sql: &str, rows: &[(i32, &str)]) -> Result<Vec<Packet>> {
    let (_, id) = raw_prepare(conn, sql).await?;
    conn.send_command(&bulk(id, rows)).await?;
    conn.read_response().await
}

#[tokio::test]
async fn bulk_executes_answer_as_directly_and_are_refused_where_they_cannot_be_protected() -> Result<()> {
    // Two servers with the same table: one direct, one behind the proxy.
    let direct_db = MariaDb::start().await?;
    let (db, _tc, proxy) = setup().await?;
    let mut c = direct_db.conn().await?;
    c.query_drop("CREATE TABLE d (id INT PRIMARY KEY, v DECIMAL(10,2))")
        .await?;
    c.query_drop("INSERT INTO d VALUES (1, 1.25), (2, 2.5), (3, 3.75)")
        .await?;
    // Until the proxy trusts its view of the coordinator it refuses bulk writes it cannot check.
    proxy.await_trust(&mut proxy.conn().await?).await?;
    for flags in FLAG_SETS {
        let (mut direct, mut proxied) = (
            bulk_conn(direct_db.addr(), flags).await?,
            bulk_conn(proxy.addr, flags).await?,
        );
        for (sql, rows) in [
            (
                "INSERT INTO d VALUES (?, ?)",
                &[(10, "1.5"), (11, "2.5"), (12, "3.5")][..],
            ),
            (
                "UPDATE d SET v = v + 1 WHERE id = ? OR v = ?",
                &[(10, "0"), (1, "2.50")],
            ),
            ("INSERT INTO d VALUES (?, ?) RETURNING id, v", &[(20, "7"), (21, "8")]),
            (
                "DELETE FROM d WHERE id = ? OR v = ? RETURNING id",
                &[(20, "0"), (10, "8.00")],
            ),
            ("INSERT INTO d VALUES (?, ?)", &[(30, "1"), (1, "1")]),
            (
                "DELETE FROM d WHERE id = ? OR v = ?",
                &[(11, "0"), (12, "0"), (21, "0"), (30, "0")],
            ),
        ] {
            let what = format!("{sql}, flags {flags:#x}");
            let d = bulk_execute(&mut direct, sql, rows).await?;
            let p = bulk_execute(&mut proxied, sql, rows).await?;
            assert_same_packets(&d, &p, &what);
            assert_same_answer(&mut direct, &mut proxied, "SELECT * FROM d ORDER BY id", &what).await?;
        }
    }

    // Inside a global transaction its rows would not be imaged: refused, not run.
    let mut proxied = bulk_conn(proxy.addr, DEFAULT).await?;
    proxied.query("START GLOBAL TRANSACTION").await?;
    assert_bulk_refused(&mut proxied, 40).await?;
    // Its rows locked globally, `d` is guarded: outside the global transaction a bulk write
    // cannot be checked row by row either.
    proxied.query("UPDATE d SET v = 9 WHERE id = 2").await?;
    let mut other = bulk_conn(proxy.addr, DEFAULT).await?;
    let refused = bulk_execute(&mut other, "INSERT INTO d VALUES (?, ?)", &[(41, "1")]).await?;
    assert_eq!(error_code(&refused), Some(1235));
    // In XA mode: an autocommit bulk execute would be one branch around many rows' answers,
    // and inside a branch its rows on the guarded table could not be checked.
    let mut xa = bulk_conn(proxy.addr, DEFAULT).await?;
    xa.query("START GLOBAL TRANSACTION MODE XA").await?;
    assert_bulk_refused(&mut xa, 42).await?;
    xa.query("BEGIN").await?;
    assert_bulk_refused(&mut xa, 43).await?;
    xa.query("ROLLBACK").await?;
    xa.query("ROLLBACK GLOBAL").await?;
    proxied.query("ROLLBACK GLOBAL").await?;
    let n: Option<i64> = db
        .conn()
        .await?
        .query_first("SELECT COUNT(*) FROM d WHERE id IN (40, 41, 42, 43)")
        .await?;
    assert_eq!(n, Some(0), "no bulk write ran");
    Ok(())
}
