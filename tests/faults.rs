//! Faults and limits: garbage, truncated and oversized packets from clients (before and after
//! authentication) while other sessions keep working, the connection limit, the handshake
//! timeout, a backend that dies mid-session or cannot be reached at all, graceful shutdown
//! with a query in flight, and the admin endpoints (`/healthz`, `/metrics`); and a
//! network-level fuzzer: mutated command sequences against a proxy process with a
//! coordinator while a well-behaved client checks every answer.
//!
//! Metrics are process-wide and the tests in this file run concurrently, so metric checks
//! assert that a counter moved by at least what this test did.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::raw::{RawConn, flags};
use ferrata_tests::ferrata_testkit::{MariaDb, free_port};
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{Proxy, Setup, eventually, framed, http_get, metric, start_global};
use mysql_async::Conn;
use mysql_async::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long anything that should happen "promptly" may take on a loaded test machine.
const DEADLINE: Duration = Duration::from_secs(15);

/// Where a garbage client is in the protocol when it misbehaves.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Read the greeting, sent nothing yet.
    Greeted,
    /// Logged in.
    Authenticated,
}

/// What the proxy must answer before it closes the connection.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// This ERR code and SQLSTATE.
    Err(u16, &'static str),
    /// Nothing at all.
    Silence,
    /// Whatever the backend made of the junk; only closing matters.
    Any,
}

#[tokio::test]
async fn garbage_and_truncated_packets_leave_other_sessions_alone() -> Result<()> {
    let setup = Setup::start_with(Default::default(), |config| config.max_packet_size = 1 << 20).await?;
    let mut direct = setup.db.conn().await?;

    let stop = CancellationToken::new();
    let healthy = tokio::spawn(keep_querying(setup.proxy.conn().await?, stop.clone()));

    let huge_header = vec![0xff, 0xff, 0xff, 0x00];
    let half_packet = [&[100, 0, 0, 1][..], b"0123456789"].concat();
    let cases = [
        (Phase::Greeted, junk(300, 1), true, Answer::Any),
        (
            Phase::Greeted,
            framed(1, &[0xaa; 40]),
            false,
            Answer::Err(1043, "08S01"),
        ),
        (Phase::Greeted, huge_header.clone(), false, Answer::Err(1043, "08S01")),
        (Phase::Greeted, half_packet.clone(), true, Answer::Silence),
        (Phase::Authenticated, junk(300, 2), true, Answer::Any),
        (Phase::Authenticated, framed(0, &[]), false, Answer::Err(1105, "08S01")),
        (Phase::Authenticated, huge_header, false, Answer::Err(1153, "08S01")),
        (Phase::Authenticated, half_packet, true, Answer::Silence),
    ];
    for (phase, bytes, close, answer) in cases {
        let what = format!("{phase:?}, {answer:?}, {:02x?}", &bytes[..bytes.len().min(8)]);
        let mut raw;
        let mut plain;
        let stream = match phase {
            Phase::Greeted => {
                plain = TcpStream::connect(setup.proxy.addr).await?;
                read_packet(&mut plain).await.context("greeting")?;
                &mut plain
            }
            Phase::Authenticated => {
                raw = setup.proxy.raw(flags::DEFAULT).await?;
                raw.stream_mut()
            }
        };
        stream.write_all(&bytes).await?;
        if close {
            stream.shutdown().await?;
        }
        let reply = read_until_closed(stream).await.with_context(|| what.clone())?;
        match answer {
            Answer::Err(code, state) => {
                let (got_code, got_state, message) = parse_err(&reply).with_context(|| what.clone())?;
                assert_eq!((got_code, got_state.as_str()), (code, state), "{what}: {message}");
            }
            Answer::Silence => assert!(reply.is_empty(), "{what}: {reply:02x?}"),
            Answer::Any => {}
        }
    }

    stop.cancel();
    let (queries, mut healthy) = healthy.await??;
    assert!(queries > 0);
    assert_eq!(healthy.query_first::<i64, _>("SELECT 1").await?, Some(1));
    let mut fresh = setup.proxy.conn().await?;
    assert_eq!(fresh.query_first::<i64, _>("SELECT 2").await?, Some(2));
    // No backend session is left behind: only `direct`, `healthy` and `fresh` remain.
    eventually("garbage sessions' backend connections to close", DEADLINE, async || {
        let sessions: Option<i64> = direct
            .query_first("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'app'")
            .await?;
        Ok((sessions == Some(3)).then_some(()))
    })
    .await
}

#[tokio::test]
async fn oversized_packet_gets_an_err_and_ends_only_its_session() -> Result<()> {
    const LIMIT: usize = 4096;
    let setup = Setup::start_with(Default::default(), |config| config.max_packet_size = LIMIT).await?;
    let mut bystander = setup.proxy.conn().await?;
    // Just over the limit, and far more than the socket buffers hold: the proxy must read
    // away the rest of the packet after its ERR, or the client sees a reset instead.
    for excess in [2 * LIMIT, 32 * 1024 * 1024] {
        let mut sender = setup.proxy.conn().await?;
        let fits = format!("SELECT LENGTH('{}')", "x".repeat(LIMIT - 100));
        assert_eq!(sender.query_first::<i64, _>(fits).await?, Some(LIMIT as i64 - 100));
        let too_big = format!("SELECT LENGTH('{}')", "x".repeat(excess));
        let err = sender.query_drop(&too_big).await.err().context("over the limit")?;
        expect_server_error(&err, 1153, "08S01", &format!("({} > {LIMIT})", too_big.len() + 1));
        assert!(err.to_string().contains("max_packet_size"), "{err}");

        within(sender.query_drop("SELECT 1"))
            .await?
            .err()
            .context("the session that sent the packet is closed")?;
        assert_eq!(bystander.query_first::<i64, _>("SELECT 3").await?, Some(3));
    }
    Ok(())
}

#[tokio::test]
async fn connection_limit_turns_clients_away_until_one_leaves() -> Result<()> {
    let setup = Setup::start_with(Default::default(), |config| config.max_connections = 2).await?;
    let first = setup.proxy.conn().await?;
    let mut second = setup.proxy.conn().await?;
    let err = Conn::new(setup.proxy.opts()).await.err().context("a third client")?;
    // In place of the greeting, so without SQLSTATE, as MariaDB itself sends it.
    expect_server_error(&err, 1040, "HY000", "limit of 2 client sessions");

    first.disconnect().await?;
    // The slot is free once the proxy has finished the first session.
    let mut third = eventually("a client to get the freed slot", DEADLINE, async || {
        match Conn::new(setup.proxy.opts()).await {
            Ok(conn) => Ok(Some(conn)),
            Err(mysql_async::Error::Server(e)) if e.code == 1040 => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    assert_eq!(third.query_first::<i64, _>("SELECT 1").await?, Some(1));
    assert_eq!(second.query_first::<i64, _>("SELECT 2").await?, Some(2));
    Ok(())
}

#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() -> Result<()> {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let setup = Setup::start_with(Default::default(), |config| {
        config.handshake_timeout_ms = TIMEOUT.as_millis() as u64
    })
    .await?;
    let mut established = setup.proxy.conn().await?;

    let started = Instant::now();
    let mut silent = TcpStream::connect(setup.proxy.addr).await?;
    read_packet(&mut silent).await.context("greeting")?;
    read_until_closed(&mut silent).await?;
    assert!(started.elapsed() >= TIMEOUT, "closed after {:?}", started.elapsed());

    // The timeout covers only the handshake: an older, idle session is still served.
    assert_eq!(established.query_first::<i64, _>("SELECT 1").await?, Some(1));
    Ok(())
}

#[tokio::test]
async fn backend_death_gives_clear_errors_not_hangs() -> Result<()> {
    let mut setup = Setup::start().await?;
    let mut idle = setup.proxy.conn().await?;
    let mut busy = setup.proxy.conn().await?;
    let mut direct = setup.db.conn().await?;
    let query = tokio::spawn(async move { busy.query_drop("SELECT SLEEP(60)").await });
    eventually("the query to run on the server", DEADLINE, async || {
        sleeping(&mut direct).await
    })
    .await?;

    setup.db.kill();
    let err = within(query).await??.err().context("the query cannot succeed")?;
    expect_server_error(&err, 2013, "HY000", "Lost connection to the database");
    within(idle.query_drop("SELECT 1"))
        .await?
        .err()
        .context("the idle session cannot go on")?;

    let err = within(Conn::new(setup.proxy.opts()))
        .await?
        .err()
        .context("no backend")?;
    expect_server_error(
        &err,
        2003,
        "HY000",
        &format!("cannot connect to the database at {}", setup.db.addr()),
    );
    Ok(())
}

#[tokio::test]
async fn unreachable_backend_is_reported_at_connect() -> Result<()> {
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let proxy = Proxy::start(closed).await?;
    let before = metrics(&proxy).await?;
    let err = within(Conn::new(proxy.opts())).await?.err().context("no backend")?;
    expect_server_error(
        &err,
        2003,
        "HY000",
        &format!("cannot connect to the database at {closed}"),
    );
    let after = metrics(&proxy).await?;
    assert_moved(&before, &after, r#"ferrata_proxy_errors_total{kind="backend"}"#, 1.0)
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_query_in_flight_and_refuses_new_clients() -> Result<()> {
    let Setup { proxy, db } = Setup::start().await?;
    let addr = proxy.addr;
    let admin = proxy.admin.context("admin listener")?;
    let mut idle = proxy.conn().await?;
    let mut busy = proxy.conn().await?;
    let mut direct = db.conn().await?;
    let query = tokio::spawn(async move {
        let slept = busy.query_first::<i64, _>("SELECT SLEEP(2)").await;
        (slept, busy)
    });
    eventually("the query to run on the server", DEADLINE, async || {
        sleeping(&mut direct).await
    })
    .await?;

    let shutdown = tokio::spawn(proxy.shutdown());
    eventually("new connections to be refused", DEADLINE, async || {
        Ok(TcpStream::connect(addr).await.is_err().then_some(()))
    })
    .await?;
    assert!(!query.is_finished(), "refused only after the query ended");
    let (status, _) = http_get(admin, "/healthz").await?;
    assert_eq!(status, 503, "/healthz reports the drain while the query runs");

    let (slept, mut busy) = within(query).await??;
    assert_eq!(slept?, Some(0), "the query in flight completes");
    within(shutdown).await???;
    within(busy.query_drop("SELECT 1"))
        .await?
        .err()
        .context("the session closes after its command")?;
    within(idle.query_drop("SELECT 1"))
        .await?
        .err()
        .context("idle sessions close at shutdown")?;
    Ok(())
}

#[tokio::test]
async fn admin_endpoints_report_health_and_metrics_that_move() -> Result<()> {
    let setup = Setup::start().await?;
    assert_eq!(setup.proxy.admin_get("/healthz").await?, (200, "ok\n".to_owned()));
    let (status, _) = setup.proxy.admin_get("/no-such-page").await?;
    assert_eq!(status, 404);

    let before = metrics(&setup.proxy).await?;
    let mut conn = setup.proxy.conn().await?;
    for n in 0..5 {
        assert_eq!(conn.query_first::<i64, _>(format!("SELECT {n}")).await?, Some(n));
    }
    conn.ping().await?;
    // A garbage session: an empty command packet.
    let mut raw = setup.proxy.raw(flags::DEFAULT).await?;
    raw.stream_mut().write_all(&framed(0, &[])).await?;
    let reply = read_until_closed(raw.stream_mut()).await?;
    assert_eq!(parse_err(&reply)?.0, 1105);

    // Commands are counted once their response has been relayed, so the client can be a
    // moment ahead of the counter.
    let after = eventually("the ping to be counted", DEADLINE, async || {
        let after = metrics(&setup.proxy).await?;
        let counted = delta(&before, &after, r#"ferrata_proxy_commands_total{command="ping"}"#) >= 1.0;
        Ok(counted.then_some(after))
    })
    .await?;
    let moved = [
        (r#"ferrata_proxy_connections_total"#, 2.0),
        (r#"ferrata_proxy_commands_total{command="query"}"#, 5.0),
        (r#"ferrata_proxy_commands_total{command="ping"}"#, 1.0),
        (r#"ferrata_proxy_command_duration_seconds_count{command="query"}"#, 5.0),
        (
            r#"ferrata_proxy_command_duration_seconds_bucket{command="query",le="+Inf"}"#,
            5.0,
        ),
        (r#"ferrata_proxy_bytes_total{direction="from_client"}"#, 5.0 * 12.0),
        (r#"ferrata_proxy_bytes_total{direction="to_backend"}"#, 5.0 * 12.0),
        (r#"ferrata_proxy_bytes_total{direction="from_backend"}"#, 5.0 * 20.0),
        (r#"ferrata_proxy_bytes_total{direction="to_client"}"#, 5.0 * 20.0),
        (r#"ferrata_proxy_errors_total{kind="client_protocol"}"#, 1.0),
    ];
    for (series, at_least) in moved {
        assert_moved(&before, &after, series, at_least)?;
    }
    for series in [
        "ferrata_proxy_connections_active",
        "ferrata_proxy_connections_rejected_total",
        r#"ferrata_proxy_command_duration_seconds_sum{command="query"}"#,
        r#"ferrata_proxy_errors_total{kind="backend"}"#,
        r#"ferrata_proxy_errors_total{kind="handshake_timeout"}"#,
    ] {
        assert!(metric(&after, series).is_some(), "{series} missing from:\n{after}");
    }
    Ok(())
}

/// Mutated command sequences from many sessions (inside and outside global transactions,
/// text and prepared) against a proxy process with a coordinator, while a well-behaved client
/// runs global transactions and checks every answer. Each fuzz session must end within the
/// deadline once the client closes its side (no hang); the proxy must stay up, never panic
/// (not even inside one session's task), end every session and not grow.
/// `FERRATA_NETFUZZ_ROUNDS` (default 150) and `FERRATA_NETFUZZ_SEED` run it longer or repeat
/// a failure; it prints its seed.
#[tokio::test]
async fn mutated_sessions_never_disturb_a_checking_client() -> Result<()> {
    const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
    const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");
    let rounds: u64 = std::env::var("FERRATA_NETFUZZ_ROUNDS").map_or(Ok(150), |v| v.parse())?;
    let seed: u64 = match std::env::var("FERRATA_NETFUZZ_SEED") {
        Ok(v) => v.parse()?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    println!("network fuzz: {rounds} rounds, FERRATA_NETFUZZ_SEED={seed}");

    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let mut proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), 200)?;
    let mut direct = db.conn().await?;
    // The fuzz sessions log in as an application would: with every privilege on its database
    // and none on the server, so that a command byte mutated into COM_SHUTDOWN or
    // COM_PROCESS_KILL is refused by the server as it would be directly.
    for sql in [
        "CREATE TABLE checked (id INT PRIMARY KEY, n BIGINT NOT NULL)",
        "CREATE TABLE fuzz (id INT PRIMARY KEY, v VARCHAR(20))",
        "INSERT INTO checked VALUES (1, 0)",
        "INSERT INTO fuzz VALUES (1, 'a'), (2, 'b')",
        "CREATE USER 'fuzz'@'%' IDENTIFIED BY 'fuzz-secret'",
        "CREATE USER 'fuzz'@'localhost' IDENTIFIED BY 'fuzz-secret'",
        "GRANT ALL ON test.* TO 'fuzz'@'%'",
        "GRANT ALL ON test.* TO 'fuzz'@'localhost'",
    ] {
        direct.query_drop(sql).await?;
    }

    let stop = CancellationToken::new();
    let checker = tokio::spawn(keep_transacting(proxy.conn().await?, stop.clone()));

    // A round draws fewer than 64 random bytes (at most 31 of inserted junk).
    let mut rng = junk(64 * rounds as usize, seed).into_iter();
    let mut next = move || rng.next().unwrap_or(0);
    let mut rss_after_warm_up = 0;
    for round in 0..rounds {
        if round == rounds / 5 {
            rss_after_warm_up = rss_kib(proxy.pid())?;
        }
        let sequence = mutated(FUZZ_SEQUENCES[usize::from(next()) % FUZZ_SEQUENCES.len()], &mut next);
        let what = format!("round {round} (FERRATA_NETFUZZ_SEED={seed})");
        let mut raw = RawConn::connect(proxy.addr, "fuzz", "fuzz-secret", Some("test"), flags::DEFAULT)
            .await
            .with_context(|| what.clone())?;
        let stream = raw.stream_mut();
        // The proxy may close early (a fatal packet); what it answered does not matter, only
        // that it ends the session once the client is done.
        let _ = stream.write_all(&sequence).await;
        let _ = stream.shutdown().await;
        read_until_closed(stream).await.with_context(|| what.clone())?;
        ensure!(proxy.is_running(), "{what}: the proxy process died");
        ensure!(proxy.panics.count() == 0, "{what}: the proxy panicked (see its log)");
    }

    // Every fuzz session ends: only the checker's is left.
    eventually("fuzz sessions to end", DEADLINE, async || {
        let active = proxy.metric("ferrata_proxy_connections_active").await?;
        Ok((active == 1.0).then_some(()))
    })
    .await?;
    stop.cancel();
    let transactions = checker.await??;
    assert!(transactions > 0);
    let rss_at_end = rss_kib(proxy.pid())?;
    println!(
        "network fuzz: {transactions} checked global transactions; proxy RSS {rss_after_warm_up} KiB after warm-up, {rss_at_end} KiB at the end"
    );
    assert!(
        rss_at_end < rss_after_warm_up + 64 * 1024,
        "the proxy grew from {rss_after_warm_up} KiB to {rss_at_end} KiB"
    );
    let n: Option<i64> = direct.query_first("SELECT n FROM checked WHERE id = 1").await?;
    assert_eq!(
        n,
        Some(transactions as i64),
        "every committed global transaction counted once"
    );
    Ok(())
}

/// Command sequences the fuzzer mutates: each packet framed, sequence ids from 0.
const FUZZ_SEQUENCES: &[&[&[u8]]] = &[
    &[
        b"\x03START GLOBAL TRANSACTION",
        b"\x03UPDATE fuzz SET v = 'x' WHERE id = 1",
        b"\x03COMMIT GLOBAL",
    ],
    &[
        b"\x03START GLOBAL TRANSACTION",
        b"\x03DELETE FROM fuzz WHERE id = 2",
        b"\x03ROLLBACK GLOBAL",
    ],
    &[
        b"\x03START GLOBAL TRANSACTION",
        b"\x03SELECT * FROM fuzz WHERE id = 1 FOR UPDATE",
    ],
    &[b"\x03INSERT INTO fuzz VALUES (3, 'c') ON DUPLICATE KEY UPDATE v = 'd'; SELECT 1"],
    &[b"\x03UPDATE fuzz SET v = 'y' WHERE id IN (1, 2)", b"\x0e", b"\x02test"],
    &[
        b"\x16UPDATE fuzz SET v = ? WHERE id = ?",
        b"\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00\x00\x01\xfe\x00\x03\x00\x01zz\x01\x00\x00\x00",
    ],
    &[
        b"\x03START GLOBAL TRANSACTION",
        b"\x16INSERT INTO fuzz VALUES (?, ?)",
        b"\x18\x01\x00\x00\x00\x00\x00long data",
    ],
    &[b"\x03BEGIN NOT ATOMIC SELECT 1; SELECT 2; END", b"\x03SHOW WARNINGS"],
];

/// One sequence framed as a client would send it, with one packet mutated: bytes flipped,
/// cut short, its length header changed, or junk inserted.
fn mutated(sequence: &[&[u8]], next: &mut impl FnMut() -> u8) -> Vec<u8> {
    let target = usize::from(next()) % sequence.len();
    let mut out = Vec::new();
    for (i, payload) in sequence.iter().enumerate() {
        let mut packet = framed(0, payload);
        if i == target {
            match next() % 4 {
                0 => (0..1 + next() % 4).for_each(|_| {
                    let at = usize::from(next()) % packet.len();
                    packet[at] ^= next() | 1;
                }),
                1 => packet.truncate(usize::from(next()) % packet.len()),
                2 => packet[usize::from(next() % 3)] = next(),
                _ => {
                    let at = 4 + usize::from(next()) % (packet.len() - 4);
                    let junk: Vec<u8> = (0..next() % 32).map(|_| next()).collect();
                    packet.splice(at..at, junk);
                }
            }
        }
        out.extend_from_slice(&packet);
    }
    out
}

/// Global transactions that add 1 to `checked`, each checked, until `stop`; returns how many
/// committed.
async fn keep_transacting(mut conn: Conn, stop: CancellationToken) -> Result<u64> {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        start_global(&mut conn).await?;
        conn.query_drop("UPDATE checked SET n = n + 1 WHERE id = 1").await?;
        let seen: Option<u64> = conn.query_first("SELECT n FROM checked WHERE id = 1").await?;
        ensure!(seen == Some(n + 1), "transaction {} read n = {seen:?}", n + 1);
        conn.query_drop("COMMIT GLOBAL").await?;
        n += 1;
    }
    Ok(n)
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS without a value")?
        .parse()?)
}

// ---- helpers ----

/// Runs numbered queries on `conn` until `stop`, checking each answer; returns how many ran.
async fn keep_querying(mut conn: Conn, stop: CancellationToken) -> Result<(u64, Conn)> {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let echoed: Option<u64> = conn.query_first(format!("SELECT {n}")).await?;
        ensure!(echoed == Some(n), "query {n} answered {echoed:?}");
    }
    Ok((n, conn))
}

/// `Some` once a `SELECT SLEEP(...)` is running on the server.
async fn sleeping(direct: &mut Conn) -> Result<Option<()>> {
    let running: Option<i64> = direct
        .query_first("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP%'")
        .await?;
    Ok((running == Some(1)).then_some(()))
}

/// `future`'s output, or an error if it takes longer than [`DEADLINE`] (a hang).
async fn within<T>(future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(DEADLINE, future)
        .await
        .context("no answer in time: the proxy hangs")
}

/// Checks a mysql_async error is this ERR, with `fragment` in its message.
fn expect_server_error(err: &mysql_async::Error, code: u16, state: &str, fragment: &str) {
    let mysql_async::Error::Server(e) = err else {
        panic!("expected ERR {code} ({state}), got {err:?}");
    };
    assert_eq!((e.code, e.state.as_str()), (code, state), "{err}");
    assert!(e.message.contains(fragment), "{fragment:?} not in {:?}", e.message);
    assert!(
        e.message.starts_with(char::is_alphabetic),
        "mangled message: {:?}",
        e.message
    );
}

/// Reads one packet's payload from a raw socket.
async fn read_packet(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let mut payload = vec![0; u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}

/// Everything the peer sends until it closes the connection (a reset counts as closing).
async fn read_until_closed(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match within(stream.read(&mut chunk)).await? {
            Ok(0) => return Ok(received),
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(received),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Code, SQLSTATE and message of the ERR packet `bytes` start with.
fn parse_err(bytes: &[u8]) -> Result<(u16, String, String)> {
    let Some([0xff, lo, hi, b'#', rest @ ..]) = bytes.get(4..) else {
        bail!("not an ERR packet: {bytes:02x?}");
    };
    ensure!(rest.len() >= 5, "ERR without SQLSTATE: {bytes:02x?}");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok((u16::from_le_bytes([*lo, *hi]), text(&rest[..5]), text(&rest[5..])))
}

/// `len` pseudo-random bytes, the same for the same seed.
fn junk(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

async fn metrics(proxy: &Proxy) -> Result<String> {
    let (status, body) = proxy.admin_get("/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(body)
}

/// How much `series` grew from `before` to `after` (a missing sample counts as 0).
fn delta(before: &str, after: &str, series: &str) -> f64 {
    metric(after, series).unwrap_or(0.0) - metric(before, series).unwrap_or(0.0)
}

fn assert_moved(before: &str, after: &str, series: &str, at_least: f64) -> Result<()> {
    ensure!(metric(after, series).is_some(), "{series} missing from:\n{after}");
    let moved = delta(before, after, series);
    ensure!(
        moved >= at_least,
        "{series} moved by {moved}, expected at least {at_least}"
    );
    Ok(())
}
