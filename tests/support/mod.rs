//! What every integration test shares: a MariaDB server with a proxy in front of it, and
//! helpers to run the same operation directly and through the proxy and compare.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use ferrata_proxy::{Config, Server};
use ferrata_testkit::raw::{Packet, RawConn};
use ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb, MariaDbOptions};
use mysql_async::OptsBuilder;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use ferrata_testkit;

pub mod bank;
pub mod coordinator;
pub mod dirty;
pub mod history;
pub mod process;

/// A proxy running in this process. Dropping it stops it.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

impl Proxy {
    /// Starts a proxy in front of `backend` with test defaults: ephemeral ports, admin on.
    pub async fn start(backend: SocketAddr) -> Result<Proxy> {
        Self::start_with(test_config(backend)).await
    }

    pub async fn start_with(config: Config) -> Result<Proxy> {
        let server = Server::bind(config).await?;
        let addr = server.local_addr();
        let admin = server.admin_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        Ok(Proxy {
            addr,
            admin,
            stop,
            task: Some(task),
        })
    }

    /// Stops accepting and waits for the proxy to finish its graceful shutdown.
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop.cancel();
        let task = self.task.take().expect("not yet shut down");
        task.await.context("proxy task panicked")?
    }

    /// Options for the app user on database `test`, through the proxy, TCP only.
    pub fn opts(&self) -> OptsBuilder {
        ferrata_testkit::app_opts(self.addr)
    }

    pub async fn conn(&self) -> Result<mysql_async::Conn> {
        mysql_async::Conn::new(self.opts())
            .await
            .context("connecting through the proxy")
    }

    /// A raw protocol connection as the app user through the proxy.
    pub async fn raw(&self, flags: u32) -> Result<RawConn> {
        RawConn::connect(self.addr, APP_USER, APP_PASSWORD, Some("test"), flags).await
    }

    /// GET on the admin listener; returns status code and body.
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.admin.context("admin listener is off")?, path).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The proxy configuration tests start from: loopback ephemeral ports, short timeouts.
pub fn test_config(backend: SocketAddr) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        backend: backend.to_string(),
        admin_listen: Some("127.0.0.1:0".parse().expect("valid address")),
        shutdown_timeout_ms: 10_000,
        ..Config::default()
    }
}

// mysql_async options for a TCP address, with the Unix-socket preference off.
pub use ferrata_testkit::tcp_opts;

/// A MariaDB server and a proxy in front of it.
pub struct Setup {
    // The proxy is dropped first so that its sessions end before the server dies.
    pub proxy: Proxy,
    pub db: MariaDb,
}

impl Setup {
    pub async fn start() -> Result<Setup> {
        Self::start_with(MariaDbOptions::default(), |_| {}).await
    }

    /// Starts a server with `options` and a proxy whose test config `adjust` may change.
    pub async fn start_with(options: MariaDbOptions, adjust: impl FnOnce(&mut Config)) -> Result<Setup> {
        let db = MariaDb::start_with(options).await?;
        let mut config = test_config(db.addr());
        adjust(&mut config);
        let proxy = Proxy::start_with(config).await?;
        Ok(Setup { proxy, db })
    }

    /// One connection directly to the server and one through the proxy, same options.
    pub async fn pair(&self) -> Result<Pair> {
        Ok(Pair {
            direct: self.db.conn().await?,
            proxied: self.proxy.conn().await?,
        })
    }

    /// One raw connection directly and one through the proxy, with the same flags.
    pub async fn raw_pair(&self, flags: u32) -> Result<(RawConn, RawConn)> {
        let direct = RawConn::connect(self.db.addr(), APP_USER, APP_PASSWORD, Some("test"), flags).await?;
        let proxied = self.proxy.raw(flags).await?;
        Ok((direct, proxied))
    }
}

/// Two mysql_async connections: directly to the server and through the proxy.
pub struct Pair {
    pub direct: mysql_async::Conn,
    pub proxied: mysql_async::Conn,
}

/// Minimal HTTP/1.1 GET, enough for the admin endpoints.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_request(addr, "GET", path, "", None).await
}

/// Minimal HTTP/1.1 POST of a JSON `body` (may be empty).
pub async fn http_post(addr: SocketAddr, path: &str, body: &str) -> Result<(u16, String)> {
    http_request(addr, "POST", path, body, None).await
}

/// Minimal HTTP/1.1 request with a JSON `body` (may be empty), with a bearer `token`.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let authorization = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    tcp.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {text:.80}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `START GLOBAL TRANSACTION` (60 s timeout) on `conn`: the XID.
pub async fn start_global(conn: &mut mysql_async::Conn) -> Result<String> {
    use mysql_async::prelude::Queryable;
    let xid: Option<String> = conn.query_first("START GLOBAL TRANSACTION TIMEOUT 60000").await?;
    xid.context("START GLOBAL TRANSACTION returned no row")
}

/// The value of an unlabelled (or exactly labelled) sample in Prometheus text output.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

// ---------------------------------------------------------------------------------------
// Raw-protocol helpers for byte-for-byte comparisons (used by types.rs and protocol.rs).
// ---------------------------------------------------------------------------------------

/// Raw protocol command bytes the tests send.
pub mod com {
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const FIELD_LIST: u8 = 0x04;
    pub const STATISTICS: u8 = 0x09;
    pub const PING: u8 = 0x0E;
    pub const STMT_PREPARE: u8 = 0x16;
    pub const STMT_EXECUTE: u8 = 0x17;
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub const STMT_CLOSE: u8 = 0x19;
    pub const STMT_RESET: u8 = 0x1A;
    pub const STMT_BULK_EXECUTE: u8 = 0xFA;
    pub const STMT_FETCH: u8 = 0x1C;
}

/// A command packet payload: the command byte followed by `body`.
pub fn command(cmd: u8, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(1 + body.len());
    payload.push(cmd);
    payload.extend_from_slice(body);
    payload
}

/// Reads a COM_STMT_PREPARE response: PREPARE_OK, parameter and column definitions (each
/// followed by an EOF unless CLIENT_DEPRECATE_EOF), or an ERR. Returns the packets and the
/// statement id (0 for an ERR).
pub async fn read_prepare_response(conn: &mut RawConn) -> Result<(Vec<Packet>, u32)> {
    use ferrata_testkit::raw::flags::CLIENT_DEPRECATE_EOF;
    let first = conn.read_packet().await?;
    let p = &first.payload;
    if p.first() != Some(&0x00) {
        return Ok((vec![first], 0));
    }
    anyhow::ensure!(p.len() >= 9, "short PREPARE_OK: {p:02x?}");
    let id = u32::from_le_bytes([p[1], p[2], p[3], p[4]]);
    let columns = usize::from(u16::from_le_bytes([p[5], p[6]]));
    let params = usize::from(u16::from_le_bytes([p[7], p[8]]));
    let eof = usize::from(conn.capabilities() & CLIENT_DEPRECATE_EOF == 0);
    let follow = [params, columns]
        .iter()
        .map(|&n| if n > 0 { n + eof } else { 0 })
        .sum::<usize>();
    let mut packets = vec![first];
    for _ in 0..follow {
        packets.push(conn.read_packet().await?);
    }
    Ok((packets, id))
}

/// Sends COM_STMT_PREPARE for `sql` and reads the response; fails on an ERR.
pub async fn raw_prepare(conn: &mut RawConn, sql: &str) -> Result<(Vec<Packet>, u32)> {
    conn.send_command(&command(com::STMT_PREPARE, sql.as_bytes())).await?;
    let (packets, id) = read_prepare_response(conn).await?;
    anyhow::ensure!(
        packets[0].payload[0] == 0x00,
        "prepare of {sql:?} failed: {}",
        String::from_utf8_lossy(&packets[0].payload)
    );
    Ok((packets, id))
}

/// A COM_STMT_EXECUTE payload with cursor `flags` (0, or 1 = read only), binding new
/// parameter types: `(type, value)`, where a `None` value was sent with
/// COM_STMT_SEND_LONG_DATA. No parameter is NULL.
pub fn execute_payload(stmt_id: u32, flags: u8, params: &[(u8, Option<Vec<u8>>)]) -> Vec<u8> {
    let mut payload = vec![com::STMT_EXECUTE];
    payload.extend_from_slice(&stmt_id.to_le_bytes());
    payload.push(flags);
    payload.extend_from_slice(&1u32.to_le_bytes());
    if params.is_empty() {
        return payload;
    }
    payload.extend(std::iter::repeat_n(0u8, params.len().div_ceil(8)));
    payload.push(1); // new parameters bound
    for (kind, _) in params {
        payload.extend_from_slice(&[*kind, 0]);
    }
    for value in params.iter().filter_map(|(_, value)| value.as_ref()) {
        payload.extend_from_slice(value);
    }
    payload
}

/// Prepares `sql`, executes it with `params` and returns every packet of both responses
/// (statement id masked), then closes the statement.
pub async fn prepare_and_execute(
    conn: &mut RawConn,
    sql: &str,
    params: &[(u8, Option<Vec<u8>>)],
) -> Result<Vec<Packet>> {
    let (mut packets, id) = raw_prepare(conn, sql).await?;
    mask_statement_id(&mut packets);
    conn.send_command(&execute_payload(id, 0, params)).await?;
    packets.extend(conn.read_response().await?);
    // COM_STMT_CLOSE has no response.
    conn.send_command(&command(com::STMT_CLOSE, &id.to_le_bytes())).await?;
    Ok(packets)
}

/// One physical packet (header and payload) with sequence id `seq`, for tests that write
/// bytes themselves: several commands at once, or malformed ones.
pub fn framed(seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut header = (payload.len() as u32).to_le_bytes();
    header[3] = seq;
    [&header[..], payload].concat()
}

/// Runs the `mariadb` command-line client over TCP against `addr`, on database `db` if
/// given, with `args` after the connection options; returns its exit code, stdout and
/// stderr.
pub async fn mariadb_cli(
    addr: SocketAddr,
    user: &str,
    password: &str,
    db: Option<&str>,
    args: &[&str],
) -> Result<(Option<i32>, String, String)> {
    let output = tokio::process::Command::new("mariadb")
        .args(["--no-defaults", "--protocol=tcp"])
        .arg(format!("--host={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--user={user}"))
        .arg(format!("--password={password}"))
        .args(db.map(|db| format!("--database={db}")))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running the mariadb client")?;
    Ok((
        output.status.code(),
        String::from_utf8(output.stdout)?,
        String::from_utf8(output.stderr)?,
    ))
}

/// Reads packets up to and including an ERR or a terminator (EOF, or the OK-layout packet
/// starting with 0xFE): the shape of COM_STMT_FETCH and COM_FIELD_LIST responses.
pub async fn read_until_terminator(conn: &mut RawConn) -> Result<Vec<Packet>> {
    let mut packets = Vec::new();
    loop {
        let packet = conn.read_packet().await?;
        let end = matches!(packet.payload.first(), Some(0xFF))
            || (packet.payload.first() == Some(&0xFE) && packet.payload.len() < ferrata_testkit::raw::MAX_PAYLOAD);
        packets.push(packet);
        if end {
            return Ok(packets);
        }
    }
}

/// Sets the statement id of a PREPARE_OK packet (the first of a prepare response) to 0, as
/// the ids two connections get need not agree.
pub fn mask_statement_id(packets: &mut [Packet]) {
    if let Some(first) = packets.first_mut()
        && first.payload.first() == Some(&0x00)
        && first.payload.len() >= 5
    {
        first.payload[1..5].fill(0);
    }
}

/// Asserts two packet sequences are identical (sequence ids and payloads), reporting the
/// first difference briefly instead of dumping megabytes.
#[track_caller]
pub fn assert_same_packets(direct: &[Packet], proxied: &[Packet], what: &str) {
    let show = |p: &Packet| {
        let head = &p.payload[..p.payload.len().min(64)];
        format!(
            "seq {} len {} {:02x?} {:?}",
            p.seq,
            p.payload.len(),
            head,
            String::from_utf8_lossy(head)
        )
    };
    for (i, (d, p)) in direct.iter().zip(proxied).enumerate() {
        if d != p {
            let at = d.payload.iter().zip(&p.payload).position(|(a, b)| a != b);
            panic!(
                "{what}: packet {i} differs (first differing byte: {at:?})\n  direct:  {}\n  proxied: {}",
                show(d),
                show(p)
            );
        }
    }
    assert_eq!(
        direct.len(),
        proxied.len(),
        "{what}: {} packets directly, {} through the proxy",
        direct.len(),
        proxied.len()
    );
}

/// Code, SQLSTATE and message of a server (or proxy) ERR.
pub fn server_error(err: &mysql_async::Error) -> Result<(u16, String, String)> {
    match err {
        mysql_async::Error::Server(e) => Ok((e.code, e.state.clone(), e.message.clone())),
        other => anyhow::bail!("expected an ERR packet, got {other:?}"),
    }
}

/// Polls `check` until it returns a value, failing after `deadline`. For conditions that
/// have no event to wait for (an asynchronous phase 2, a counter).
pub async fn eventually<T>(
    what: &str,
    deadline: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        anyhow::ensure!(tokio::time::Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long tests wait for something that has no event to await; far above what a healthy
/// run needs on a busy two-core machine.
pub const EVENT: Duration = Duration::from_secs(20);

/// Polls `check` until it holds, failing after [`EVENT`].
pub async fn until(what: &str, mut check: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    eventually(what, EVENT, async || Ok(check().await?.then_some(()))).await
}

/// Opens a transaction directly on the server that locks row `id` of `table`, so that a write
/// through the proxy that reaches the row waits for it.
pub async fn lock_directly(db: &ferrata_testkit::MariaDb, table: &str, id: i64) -> Result<mysql_async::Conn> {
    use mysql_async::prelude::Queryable;
    let mut blocker = db.conn().await?;
    blocker.query_drop("BEGIN").await?;
    blocker
        .exec_drop(format!("SELECT * FROM {table} WHERE id = ? FOR UPDATE"), (id,))
        .await?;
    Ok(blocker)
}

/// Waits until some statement on `db` waits for a row lock. (Not INNODB_LOCK_WAITS: InnoDB
/// refreshes those tables only when they were not read for 100 ms.)
pub async fn a_lock_wait(db: &ferrata_testkit::MariaDb) -> Result<()> {
    use mysql_async::prelude::Queryable;
    let mut c = db.conn().await?;
    until("a statement to wait for a row lock", async || {
        let status: Option<(String, String, String)> = c.query_first("SHOW ENGINE INNODB STATUS").await?;
        Ok(status.is_some_and(|(_, _, text)| text.contains("LOCK WAIT")))
    })
    .await
}

/// The undo records on `db`: `undo_log` rows with `log_status` 0 (anti-hanging markers are
/// 1).
pub async fn undo_records(db: &ferrata_testkit::MariaDb) -> Result<i64> {
    use mysql_async::prelude::Queryable;
    let n: Option<i64> = db
        .conn()
        .await?
        .query_first("SELECT COUNT(*) FROM undo_log WHERE log_status = 0")
        .await?;
    Ok(n.unwrap_or(0))
}

/// Waits until none of `servers` holds an undo record: phase 2 of committed global
/// transactions runs after COMMIT GLOBAL answers.
pub async fn until_undo_records_gone(servers: &[&ferrata_testkit::MariaDb]) -> Result<()> {
    until("the undo records to go", async || {
        let mut left = 0;
        for db in servers {
            left += undo_records(db).await?;
        }
        Ok(left == 0)
    })
    .await
}

/// Makes the local transaction of `app` the victim of a deadlock with another transaction on
/// `db`: each updates rows 1 and 2 of `table` (`id` its key, `column` an INT) in the other's
/// order, and the other first writes 1,000 rows elsewhere, so InnoDB rolls back `app`'s.
/// `blocked` is how `app`'s waiting statement shows in the processlist (a LIKE pattern).
/// Returns `app` and the error it got.
pub async fn deadlock_victim(
    mut app: mysql_async::Conn,
    db: &MariaDb,
    table: &str,
    column: &str,
    blocked: &str,
) -> Result<(mysql_async::Conn, mysql_async::Error)> {
    use mysql_async::prelude::Queryable;
    let mut other = db.conn().await?;
    other.query_drop("CREATE TABLE heavy (n INT)").await?;
    other.query_drop("BEGIN").await?;
    other
        .query_drop("INSERT INTO heavy SELECT seq FROM seq_1_to_1000")
        .await?;
    other
        .query_drop(format!("UPDATE {table} SET {column} = 20 WHERE id = 2"))
        .await?;
    app.query_drop("BEGIN").await?;
    app.query_drop(format!("UPDATE {table} SET {column} = 10 WHERE id = 1"))
        .await?;
    let second = format!("UPDATE {table} SET {column} = 11 WHERE id = 2");
    let waiting = tokio::spawn(async move {
        let r = app.query_drop(second).await;
        (app, r)
    });
    let mut watch = db.conn().await?;
    until("the app's write to wait for the row", async || {
        let n: Option<i64> = watch
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() AND INFO LIKE ?",
                (blocked,),
            )
            .await?;
        Ok(n == Some(1))
    })
    .await?;
    other
        .query_drop(format!("UPDATE {table} SET {column} = 21 WHERE id = 1"))
        .await?;
    let (app, r) = waiting.await?;
    let e = r.err().context("the app's transaction was not the deadlock's victim")?;
    other.query_drop("COMMIT").await?;
    Ok((app, e))
}
