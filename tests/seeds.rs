//! The fuzz targets' seeds, taken from real sessions: clients (`mysql_async`, and a raw one
//! without CLIENT_DEPRECATE_EOF that opens a cursor) talk to a proxy with a coordinator in
//! front of a real server through a recording relay, running text and prepared statements of
//! many column types, multi-statement strings, errors, warnings, procedures, a compound
//! statement, COM_CHANGE_USER and global transactions; the undo records those write are read
//! from `undo_log` before their commit. What was recorded is cut into each target's input
//! format (each target's file says it): the byte streams for `packet_framing`, every
//! response with its command's kind and the session's capabilities for `response_tracker`,
//! the handshake packets, every execute with its statement's parameter and column counts,
//! every statement text, every undo record.
//!
//! With `FERRATA_RECORD_SEEDS=<dir>` (`fuzz/seeds` in the repository) the seeds are written
//! there, as `recorded_*` files in one folder per target; otherwise to a throw-away folder,
//! and the test checks that every target got well-formed seeds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};
use ferrata_proxy::protocol::frame;
use ferrata_proxy::protocol::handshake::{ClientResponse, Greeting};
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::raw::RawConn;
use ferrata_tests::ferrata_testkit::raw::flags::{CLIENT_DEPRECATE_EOF, DEFAULT};
use ferrata_tests::ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb};
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{com, command, execute_payload, raw_prepare};
use mysql_async::prelude::Queryable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

/// Which way bytes went through the relay.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Way {
    FromClient,
    FromServer,
}

/// Everything the relay saw, connection by connection, in the order it arrived.
type Recording = Arc<Mutex<Vec<Vec<(Way, Vec<u8>)>>>>;

/// A relay in front of `upstream` that records every byte both ways; returns its address.
async fn recording_relay(upstream: std::net::SocketAddr, recording: Recording) -> Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let connection = {
                let mut r = recording.lock().expect("not poisoned");
                r.push(Vec::new());
                r.len() - 1
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            for (mut from, mut to, way) in [
                (client_read, server_write, Way::FromClient),
                (server_read, client_write, Way::FromServer),
            ] {
                let recording = Arc::clone(&recording);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        recording.lock().expect("not poisoned")[connection].push((way, buf[..n].to_vec()));
                        if to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown().await;
                });
            }
        }
    });
    Ok(addr)
}

/// One logical packet: its sequence id, its payload and the bytes it takes.
struct Packet {
    seq: u8,
    payload: Vec<u8>,
    raw_len: usize,
}

/// Cuts a byte stream into whole packets with the proxy's own framing, as far as they go.
fn packets(stream: &[u8]) -> Vec<Packet> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok(Some(span)) = frame::complete_packet(&stream[at..], usize::MAX) {
        out.push(Packet {
            seq: span.first_seq,
            payload: frame::join_payload(&stream[at..], &span),
            raw_len: span.raw_len,
        });
        at += span.raw_len;
    }
    out
}

/// One connection, cut into the handshake and its commands, each with the server's bytes
/// that answered it.
struct Session {
    client_stream: Vec<u8>,
    server_stream: Vec<u8>,
    greeting: Vec<u8>,
    handshake_response: Vec<u8>,
    /// The capabilities both sides agreed on (MariaDB's extended ones in the high half).
    capabilities: u64,
    commands: Vec<(Packet, Vec<u8>)>,
}

fn session(chunks: &[(Way, Vec<u8>)]) -> Option<Session> {
    let stream = |way| {
        chunks
            .iter()
            .filter(|(w, _)| *w == way)
            .flat_map(|(_, b)| b.clone())
            .collect::<Vec<u8>>()
    };
    let (client_stream, server_stream) = (stream(Way::FromClient), stream(Way::FromServer));
    let greeting = packets(&server_stream).into_iter().next()?.payload;
    let handshake_response = packets(&client_stream).into_iter().next()?.payload;
    let capabilities =
        Greeting::parse(&greeting)?.capabilities.0 & ClientResponse::parse(&handshake_response).ok()?.capabilities.0;

    // Commands in the order sent, each answered by the server bytes that came before the next
    // one (the clients here never pipeline); the handshake is everything before the first.
    let mut commands: Vec<(Packet, Vec<u8>)> = Vec::new();
    let mut client_seen = Vec::new();
    let mut read = 0;
    for (way, bytes) in chunks {
        match way {
            Way::FromClient => {
                client_seen.extend_from_slice(bytes);
                let all = packets(&client_seen);
                // The handshake response is packet 0, and authentication continues with
                // sequence ids above 0: a command is a later packet with sequence id 0.
                let new = all.len() - read;
                for p in all.into_iter().enumerate().skip(read).take(new) {
                    if let (1.., Packet { seq: 0, .. }) = p {
                        commands.push((p.1, Vec::new()));
                    }
                }
                read += new;
            }
            Way::FromServer => {
                if let Some((_, answer)) = commands.last_mut() {
                    answer.extend_from_slice(bytes);
                }
            }
        }
    }
    Some(Session {
        client_stream,
        server_stream,
        greeting,
        handshake_response,
        capabilities,
        commands,
    })
}

/// The seeds of every target, by target, deduplicated.
#[derive(Default)]
struct Seeds(BTreeMap<&'static str, BTreeSet<Vec<u8>>>);

impl Seeds {
    fn add(&mut self, target: &'static str, seed: Vec<u8>) {
        self.0.entry(target).or_default().insert(seed);
    }

    fn add_session(&mut self, s: &Session, prepared: &mut BTreeMap<u32, (u16, u16)>) {
        for (way, stream) in [(0u8, &s.client_stream), (1, &s.server_stream)] {
            // [read-size seed][packet to stop at][payload limit][stream]
            let mut seed = vec![7 + way, 3];
            seed.extend(0xffffu16.to_le_bytes());
            seed.extend(stream.iter());
            self.add("packet_framing", seed);
        }
        self.add("handshake", s.greeting.clone());
        self.add("handshake", s.handshake_response.clone());
        for (command, answer) in &s.commands {
            let p = &command.payload;
            let Some(&code) = p.first() else { continue };
            // Index into the target's KINDS; commands without a response stream are left out.
            let kind = match code {
                com::STMT_EXECUTE if p.get(5).is_some_and(|f| f & 7 != 0) => Some(1),
                com::STMT_PREPARE => Some(2),
                com::FIELD_LIST => Some(3),
                com::STATISTICS => Some(4),
                com::STMT_FETCH => Some(5),
                0x11 => {
                    self.add("handshake", p.clone());
                    None
                }
                com::STMT_CLOSE | com::STMT_SEND_LONG_DATA | 0x01 => None,
                _ => Some(0),
            };
            if let Some(kind) = kind {
                // [kind][capabilities][command seq][read-size seed][status mask][status][bytes]
                let mut seed = vec![kind];
                seed.extend(s.capabilities.to_le_bytes());
                seed.extend([command.seq, 5, 0, 0, 0, 0]);
                seed.extend(answer);
                self.add("response_tracker", seed);
            }
            match code {
                com::QUERY | com::STMT_PREPARE => {
                    let sql = &p[1..];
                    self.add("classifier", [&[0u8][..], sql].concat());
                    self.add("statement_parser", [sql, b"\x001\x00'a'"].concat());
                }
                _ => {}
            }
            if code == com::STMT_PREPARE
                && let Some(ok) = packets(answer).first()
                && ok.payload.first() == Some(&0)
                && ok.payload.len() >= 9
            {
                let id = u32::from_le_bytes(ok.payload[1..5].try_into().expect("4 bytes"));
                let columns = u16::from_le_bytes([ok.payload[5], ok.payload[6]]);
                let params = u16::from_le_bytes([ok.payload[7], ok.payload[8]]);
                prepared.insert(id, (params, columns));
            }
            if code == com::STMT_EXECUTE
                && let Some(&(params, columns)) = p
                    .get(1..5)
                    .and_then(|id| prepared.get(&u32::from_le_bytes(id.try_into().expect("4 bytes"))))
            {
                // [parameter count][types known][types][long data count][column count][payload]
                let mut seed = params.to_le_bytes().to_vec();
                seed.extend([0, 0, 0, 0, columns.min(255) as u8]);
                seed.extend(p);
                self.add("execute_params", seed);
            }
        }
    }

    /// Writes each target's seeds to `<dir>/<target>/recorded_<n>`, replacing earlier ones.
    fn write(&self, dir: &Path) -> Result<()> {
        for (target, seeds) in &self.0 {
            let folder = dir.join(target);
            std::fs::create_dir_all(&folder)?;
            for old in std::fs::read_dir(&folder)? {
                let old = old?.path();
                if old
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("recorded_"))
                {
                    std::fs::remove_file(old)?;
                }
            }
            for (n, seed) in seeds.iter().enumerate() {
                std::fs::write(folder.join(format!("recorded_{n:03}")), seed)?;
            }
        }
        Ok(())
    }
}

/// The workload through `addr`; returns the undo records it wrote, read from `db` before
/// their global transactions ended.
async fn workload(addr: std::net::SocketAddr, db: &MariaDb) -> Result<Vec<Vec<u8>>> {
    let opts = ferrata_testkit::app_opts(addr);
    let mut c = mysql_async::Conn::new(opts.clone()).await?;
    for sql in [
        "CREATE TABLE s (id INT PRIMARY KEY, d DECIMAL(10,2), t VARCHAR(20), b BLOB, at DATETIME(3), f DOUBLE, \
         e ENUM('x','y'), j JSON)",
        "INSERT INTO s VALUES (1, 1.5, 'one', x'00ff', '2024-02-29 10:00:00.123', 1e10, 'x', '{\"a\": [1]}'), \
         (2, -2.25, NULL, NULL, NULL, NULL, 'y', NULL), (3, 0, 'drei ü', x'', '1999-12-31 23:59:59', -0.5, NULL, '[]')",
        "SELECT * FROM s ORDER BY id",
        "SELECT 1; SELECT 'two', NULL; DO 3",
        "SET sql_mode = ''",
        "INSERT INTO s (id, e) VALUES (4, 'nope')",
        "SHOW WARNINGS",
        "CREATE PROCEDURE p(IN a INT, OUT b INT) BEGIN SELECT a; SET b = a * 2; END",
        "CALL p(3, @b)",
        "BEGIN NOT ATOMIC DECLARE x INT DEFAULT 0; WHILE x < 2 DO SELECT x; SET x = x + 1; END WHILE; END",
    ] {
        c.query_drop(sql).await.with_context(|| sql.to_owned())?;
    }
    assert!(c.query_drop("SELECT * FROM missing").await.is_err());
    let rows: Vec<mysql_async::Row> = c
        .exec(
            "SELECT * FROM s WHERE id > ? AND (t <> ? OR t IS NULL) ORDER BY id",
            (0, "x"),
        )
        .await?;
    ensure!(rows.len() == 4);
    c.exec_drop(
        "INSERT INTO s (id, d, t, b, at, f) VALUES (?, ?, ?, ?, ?, ?)",
        (
            5,
            7.25,
            "five",
            vec![1u8, 2, 3],
            mysql_async::Value::Date(2025, 1, 2, 3, 4, 5, 6),
            2.5f64,
        ),
    )
    .await?;
    c.exec_drop("CALL p(?, @b)", (7,)).await?;

    // Global transactions: imaged writes, an undo record read before the commit, rollbacks.
    let mut undo = Vec::new();
    let mut direct = db.conn().await?;
    for (writes, end) in [
        (
            &[
                "UPDATE s SET d = d + 1, t = CONCAT(IFNULL(t, ''), '!') WHERE id IN (1, 2)",
                "INSERT INTO s (id, t, j) VALUES (6, 'six', '{}')",
                "DELETE FROM s WHERE id = 3",
            ][..],
            "COMMIT GLOBAL",
        ),
        (
            &["UPDATE s SET b = x'0102', at = NOW(3) WHERE id = 5"][..],
            "ROLLBACK GLOBAL",
        ),
    ] {
        let xid: Option<String> = c.query_first("START GLOBAL TRANSACTION").await?;
        c.query_drop("BEGIN").await?;
        for sql in writes {
            c.query_drop(*sql).await?;
        }
        c.exec_drop("UPDATE s SET f = ? WHERE id = ?", (9.75, 1)).await?;
        c.query_drop("COMMIT").await?;
        let records: Vec<Vec<u8>> = direct
            .exec("SELECT rollback_info FROM undo_log WHERE xid = ?", (xid,))
            .await?;
        undo.extend(records);
        c.query_drop("SHOW GLOBAL TRANSACTION").await?;
        c.query_drop(end).await?;
    }
    c.change_user(
        mysql_async::ChangeUserOpts::default()
            .with_user(Some(APP_USER.into()))
            .with_pass(Some(APP_PASSWORD.into())),
    )
    .await?;
    c.ping().await?;
    c.disconnect().await?;

    // Without CLIENT_DEPRECATE_EOF, a cursor and its fetches, a field list and statistics.
    let mut raw = RawConn::connect(
        addr,
        APP_USER,
        APP_PASSWORD,
        Some("test"),
        DEFAULT & !CLIENT_DEPRECATE_EOF,
    )
    .await?;
    raw.query("SELECT id, t FROM s ORDER BY id").await?;
    let (_, id) = raw_prepare(&mut raw, "SELECT id, d, t FROM s WHERE id >= ?").await?;
    raw.send_command(&execute_payload(id, 1, &[(0x03, Some(1i32.to_le_bytes().to_vec()))]))
        .await?;
    raw.read_response().await?;
    let mut fetch = vec![com::STMT_FETCH];
    fetch.extend(id.to_le_bytes());
    fetch.extend(2u32.to_le_bytes());
    raw.send_command(&fetch).await?;
    ferrata_tests::read_until_terminator(&mut raw).await?;
    raw.send_command(&command(com::FIELD_LIST, b"s\0")).await?;
    ferrata_tests::read_until_terminator(&mut raw).await?;
    raw.send_command(&command(com::STATISTICS, b"")).await?;
    raw.read_packet().await?;
    Ok(undo)
}

#[tokio::test]
async fn fuzz_seeds_are_recorded_from_real_sessions() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), 2000)?;
    let recording = Recording::default();
    let relay = recording_relay(proxy.addr, Arc::clone(&recording)).await?;
    let undo = workload(relay, &db).await?;

    let mut seeds = Seeds::default();
    let mut prepared = BTreeMap::new();
    let connections = recording.lock().expect("not poisoned").clone();
    for chunks in &connections {
        let s = session(chunks).context("a recorded connection without a handshake")?;
        seeds.add_session(&s, &mut prepared);
    }
    for record in undo {
        // [rows per query][the stored bytes]
        seeds.add("undo_record", [&[2u8][..], &record].concat());
    }

    for (target, at_least) in [
        ("packet_framing", 4),
        ("handshake", 5),
        ("response_tracker", 25),
        ("execute_params", 4),
        ("classifier", 20),
        ("statement_parser", 20),
        ("undo_record", 2),
    ] {
        let n = seeds.0.get(target).map_or(0, BTreeSet::len);
        ensure!(n >= at_least, "{target}: {n} seeds recorded, fewer than {at_least}");
    }
    // Every response seed holds whole packets; every undo record is the stored format.
    for seed in &seeds.0["response_tracker"] {
        let answer = &seed[15..];
        let whole: usize = packets(answer).iter().map(|p| p.raw_len).sum();
        ensure!(whole == answer.len() && whole > 0, "a response cut short: {seed:02x?}");
    }
    for seed in &seeds.0["undo_record"] {
        ensure!(
            matches!(seed.get(1), Some(b'{' | b'Z')),
            "not an undo record: {seed:02x?}"
        );
    }

    let scratch = tempfile::tempdir()?;
    let dir = std::env::var_os("FERRATA_RECORD_SEEDS").map_or_else(|| scratch.path().to_owned(), PathBuf::from);
    seeds.write(&dir)?;
    println!(
        "recorded seeds in {}: {:?}",
        dir.display(),
        seeds.0.iter().map(|(t, s)| (t, s.len())).collect::<Vec<_>>()
    );
    Ok(())
}
