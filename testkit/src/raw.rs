//! A deliberately small MySQL/MariaDB protocol client for tests that need the exact
//! bytes on the wire (cursor fetches, byte-for-byte metadata, garbage input).
//!
//! It shares no code with the proxy on purpose: a bug in the proxy's codec must not be
//! able to hide itself by also being in the client that tests it.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Capability flags (`CLIENT_*`), as in the protocol documentation.
pub mod flags {
    pub const CLIENT_LONG_PASSWORD: u32 = 1;
    pub const CLIENT_FOUND_ROWS: u32 = 1 << 1;
    pub const CLIENT_LONG_FLAG: u32 = 1 << 2;
    pub const CLIENT_CONNECT_WITH_DB: u32 = 1 << 3;
    pub const CLIENT_NO_SCHEMA: u32 = 1 << 4;
    pub const CLIENT_COMPRESS: u32 = 1 << 5;
    pub const CLIENT_ODBC: u32 = 1 << 6;
    pub const CLIENT_LOCAL_FILES: u32 = 1 << 7;
    pub const CLIENT_IGNORE_SPACE: u32 = 1 << 8;
    pub const CLIENT_PROTOCOL_41: u32 = 1 << 9;
    pub const CLIENT_INTERACTIVE: u32 = 1 << 10;
    pub const CLIENT_SSL: u32 = 1 << 11;
    pub const CLIENT_IGNORE_SIGPIPE: u32 = 1 << 12;
    pub const CLIENT_TRANSACTIONS: u32 = 1 << 13;
    pub const CLIENT_RESERVED: u32 = 1 << 14;
    pub const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
    pub const CLIENT_MULTI_STATEMENTS: u32 = 1 << 16;
    pub const CLIENT_MULTI_RESULTS: u32 = 1 << 17;
    pub const CLIENT_PS_MULTI_RESULTS: u32 = 1 << 18;
    pub const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;
    pub const CLIENT_CONNECT_ATTRS: u32 = 1 << 20;
    pub const CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    pub const CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS: u32 = 1 << 22;
    pub const CLIENT_SESSION_TRACK: u32 = 1 << 23;
    pub const CLIENT_DEPRECATE_EOF: u32 = 1 << 24;

    /// What a modern client such as mysql_async asks for, minus TLS, compression and
    /// connection attributes (which this client does not implement).
    pub const DEFAULT: u32 = CLIENT_LONG_PASSWORD
        | CLIENT_LONG_FLAG
        | CLIENT_PROTOCOL_41
        | CLIENT_TRANSACTIONS
        | CLIENT_SECURE_CONNECTION
        | CLIENT_MULTI_STATEMENTS
        | CLIENT_MULTI_RESULTS
        | CLIENT_PS_MULTI_RESULTS
        | CLIENT_PLUGIN_AUTH
        | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | CLIENT_DEPRECATE_EOF;
}

/// Server status flags (`SERVER_*`) that decide where a response ends.
pub mod status {
    pub const SERVER_STATUS_IN_TRANS: u16 = 0x0001;
    pub const SERVER_STATUS_AUTOCOMMIT: u16 = 0x0002;
    pub const SERVER_MORE_RESULTS_EXISTS: u16 = 0x0008;
    pub const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;
    pub const SERVER_STATUS_LAST_ROW_SENT: u16 = 0x0080;
}

/// Largest payload of one physical packet; a payload this long continues in the next.
pub const MAX_PAYLOAD: usize = 0xFF_FFFF;

const NATIVE_PASSWORD: &str = "mysql_native_password";
/// utf8mb4_general_ci.
const CHARSET: u8 = 45;

/// One physical packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub seq: u8,
    pub payload: Vec<u8>,
}

/// An authenticated connection that reads and writes packets verbatim.
pub struct RawConn {
    stream: TcpStream,
    server_caps: u32,
    caps: u32,
    /// The last command sent was an execute asking for a cursor: only its result set may
    /// end at the metadata.
    cursor_requested: bool,
}

impl RawConn {
    /// Connects and authenticates with `mysql_native_password`, following one auth switch
    /// to that plugin. `client_flags` are intersected with the server's capabilities;
    /// `CLIENT_CONNECT_WITH_DB` is set exactly when `db` is given, `CLIENT_SSL` never.
    pub async fn connect(
        addr: SocketAddr,
        user: &str,
        password: &str,
        db: Option<&str>,
        client_flags: u32,
    ) -> Result<RawConn> {
        Self::connect_mariadb(addr, user, password, db, client_flags, 0).await
    }

    /// Like `connect`, also asking for MariaDB's extended capabilities `mariadb_flags`
    /// (`MARIADB_CLIENT_*` bits shifted down by 32), intersected with the server's. They
    /// travel in the last four filler bytes, with CLIENT_MYSQL (bit 0) cleared.
    pub async fn connect_mariadb(
        addr: SocketAddr,
        user: &str,
        password: &str,
        db: Option<&str>,
        client_flags: u32,
        mariadb_flags: u32,
    ) -> Result<RawConn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut conn = RawConn {
            stream,
            server_caps: 0,
            caps: 0,
            cursor_requested: false,
        };

        let greeting = conn.read_packet().await.context("reading the server greeting")?;
        if greeting.payload.first() == Some(&0xFF) {
            bail!("server refused the connection: {}", describe_err(&greeting.payload));
        }
        let handshake = Handshake::parse(&greeting.payload)?;
        conn.server_caps = handshake.caps;

        let mut caps = client_flags & handshake.caps & !flags::CLIENT_SSL;
        let extended = mariadb_flags & handshake.extended_caps;
        if extended != 0 {
            caps &= !1;
        }
        if db.is_some() {
            caps |= flags::CLIENT_CONNECT_WITH_DB;
        } else {
            caps &= !flags::CLIENT_CONNECT_WITH_DB;
        }
        ensure!(
            caps & flags::CLIENT_PROTOCOL_41 != 0,
            "CLIENT_PROTOCOL_41 is required (client flags {client_flags:#x}, server {:#x})",
            handshake.caps
        );
        conn.caps = caps;

        let mut response = Vec::with_capacity(128);
        response.extend_from_slice(&caps.to_le_bytes());
        response.extend_from_slice(&(1u32 << 30).to_le_bytes()); // max packet size
        response.push(CHARSET);
        response.extend_from_slice(&[0; 19]);
        response.extend_from_slice(&extended.to_le_bytes());
        response.extend_from_slice(user.as_bytes());
        response.push(0);
        let auth = scramble(&handshake.nonce, password);
        if caps & (flags::CLIENT_SECURE_CONNECTION | flags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA) != 0 {
            // Both forms are a one-byte length for a 0- or 20-byte scramble.
            response.push(auth.len() as u8);
            response.extend_from_slice(&auth);
        } else {
            response.extend_from_slice(&auth);
            response.push(0);
        }
        if let Some(db) = db {
            response.extend_from_slice(db.as_bytes());
            response.push(0);
        }
        if caps & flags::CLIENT_PLUGIN_AUTH != 0 {
            response.extend_from_slice(NATIVE_PASSWORD.as_bytes());
            response.push(0);
        }
        conn.write_packet(greeting.seq.wrapping_add(1), &response).await?;

        let mut switched = false;
        loop {
            let reply = conn.read_packet().await.context("reading the auth result")?;
            match reply.payload.first() {
                Some(0x00) => return Ok(conn),
                Some(0xFF) => bail!("authentication as {user:?} failed: {}", describe_err(&reply.payload)),
                Some(0xFE) if !switched => {
                    let body = &reply.payload[1..];
                    let name_end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                    let plugin = String::from_utf8_lossy(&body[..name_end]);
                    ensure!(
                        plugin == NATIVE_PASSWORD,
                        "server asked to switch to auth plugin {plugin:?}; only {NATIVE_PASSWORD} is supported"
                    );
                    let data = body.get(name_end + 1..).unwrap_or_default();
                    // The nonce is sent NUL-terminated.
                    let nonce = data.strip_suffix(&[0]).unwrap_or(data);
                    conn.write_packet(reply.seq.wrapping_add(1), &scramble(nonce, password))
                        .await?;
                    switched = true;
                }
                _ => bail!(
                    "unexpected packet during authentication: {:02x?}",
                    &reply.payload[..reply.payload.len().min(32)]
                ),
            }
        }
    }

    /// Capabilities the server announced in its greeting.
    pub fn server_capabilities(&self) -> u32 {
        self.server_caps
    }

    /// Capabilities in force: what this client sent in its handshake response.
    pub fn capabilities(&self) -> u32 {
        self.caps
    }

    /// Writes `payload` as one packet with sequence number `seq`, split into several
    /// physical packets (consecutive sequence numbers) if it reaches [`MAX_PAYLOAD`].
    pub async fn write_packet(&mut self, seq: u8, payload: &[u8]) -> Result<()> {
        let mut seq = seq;
        let mut rest = payload;
        loop {
            let len = rest.len().min(MAX_PAYLOAD);
            let mut buf = Vec::with_capacity(4 + len);
            buf.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
            buf.push(seq);
            buf.extend_from_slice(&rest[..len]);
            self.stream.write_all(&buf).await?;
            rest = &rest[len..];
            // A full-length packet must be followed by another, even an empty one.
            if len < MAX_PAYLOAD {
                return Ok(());
            }
            seq = seq.wrapping_add(1);
        }
    }

    /// Starts a command: writes `payload` with sequence number 0.
    pub async fn send_command(&mut self, payload: &[u8]) -> Result<()> {
        self.cursor_requested = payload.first() == Some(&0x17) && payload.get(5).is_some_and(|f| f & 0x07 != 0);
        self.write_packet(0, payload).await
    }

    /// Reads one physical packet; fails if the connection closes.
    pub async fn read_packet(&mut self) -> Result<Packet> {
        let mut header = [0u8; 4];
        self.stream
            .read_exact(&mut header)
            .await
            .context("reading a packet header (connection closed?)")?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
        let mut payload = vec![0; len];
        self.stream
            .read_exact(&mut payload)
            .await
            .with_context(|| format!("reading a {len}-byte packet payload"))?;
        Ok(Packet {
            seq: header[3],
            payload,
        })
    }

    /// Reads every physical packet of one COM_QUERY or COM_STMT_EXECUTE response: an OK,
    /// an ERR, a LOCAL INFILE request, or result sets (text or binary rows), following
    /// `SERVER_MORE_RESULTS_EXISTS` to the last one. Stops after the metadata of a result
    /// set whose terminator reports `SERVER_STATUS_CURSOR_EXISTS` (rows then come from
    /// COM_STMT_FETCH).
    pub async fn read_response(&mut self) -> Result<Vec<Packet>> {
        let deprecate_eof = self.caps & flags::CLIENT_DEPRECATE_EOF != 0;
        let mut packets = Vec::new();
        loop {
            let first = self.read_logical(&mut packets).await?;
            let head = &packets[first].payload;
            let server_status = match head.first() {
                None => bail!("empty packet where a response should start"),
                Some(0x00) => ok_status(head)?,
                // ERR ends everything; a LOCAL INFILE request waits for the caller's file.
                Some(0xFF | 0xFB) => return Ok(packets),
                Some(_) => {
                    let (columns, _) = lenenc(head).context("malformed column count")?;
                    for _ in 0..columns {
                        self.read_logical(&mut packets).await?;
                    }
                    if !deprecate_eof {
                        let eof = self.read_logical(&mut packets).await?;
                        let eof = &packets[eof].payload;
                        ensure!(
                            is_terminator(eof, false),
                            "expected EOF after {columns} column definitions, got {:02x?}",
                            &eof[..eof.len().min(16)]
                        );
                        // MariaDB also flags result sets of compound statements and stored
                        // procedures that have a cursor of their own open; their rows follow.
                        if self.cursor_requested && eof_status(eof)? & status::SERVER_STATUS_CURSOR_EXISTS != 0 {
                            return Ok(packets);
                        }
                    }
                    // Rows until the terminator. With CLIENT_DEPRECATE_EOF an open cursor
                    // is announced by a terminator right after the metadata, which ends
                    // the response here just the same.
                    loop {
                        let row = self.read_logical(&mut packets).await?;
                        let row = &packets[row].payload;
                        if row.first() == Some(&0xFF) {
                            return Ok(packets);
                        }
                        if is_terminator(row, deprecate_eof) {
                            break if deprecate_eof {
                                ok_status(row)?
                            } else {
                                eof_status(row)?
                            };
                        }
                    }
                }
            };
            if server_status & status::SERVER_MORE_RESULTS_EXISTS == 0 {
                return Ok(packets);
            }
        }
    }

    /// Runs `sql` as COM_QUERY and returns the whole response.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Packet>> {
        let mut payload = Vec::with_capacity(1 + sql.len());
        payload.push(0x03);
        payload.extend_from_slice(sql.as_bytes());
        self.send_command(&payload).await?;
        self.read_response().await
    }

    /// The socket itself, for tests that write garbage or half packets.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Reads one logical packet (physical packets of [`MAX_PAYLOAD`] bytes continue in
    /// the next), appends its physical packets and returns the index of the first.
    async fn read_logical(&mut self, packets: &mut Vec<Packet>) -> Result<usize> {
        let first = packets.len();
        loop {
            let packet = self.read_packet().await?;
            let continues = packet.payload.len() == MAX_PAYLOAD;
            packets.push(packet);
            if !continues {
                return Ok(first);
            }
        }
    }
}

/// The parts of the initial handshake (protocol version 10) this client needs.
struct Handshake {
    caps: u32,
    /// MariaDB's extended capabilities (the last four reserved bytes), when CLIENT_MYSQL is
    /// not set.
    extended_caps: u32,
    nonce: Vec<u8>,
}

impl Handshake {
    fn parse(payload: &[u8]) -> Result<Handshake> {
        let malformed = || format!("malformed server greeting: {payload:02x?}");
        ensure!(
            payload.first() == Some(&10),
            "unsupported protocol version: {}",
            malformed()
        );
        let version_end = payload[1..].iter().position(|&b| b == 0).with_context(malformed)? + 1;
        // After the version: connection id (4), nonce part 1 (8), filler (1),
        // capabilities low (2), charset (1), status (2), capabilities high (2),
        // nonce length (1), reserved (10), nonce part 2.
        let fixed = payload
            .get(version_end + 1..version_end + 1 + 31)
            .with_context(malformed)?;
        let mut nonce = fixed[4..12].to_vec();
        let caps = u32::from(u16::from_le_bytes([fixed[13], fixed[14]]))
            | u32::from(u16::from_le_bytes([fixed[18], fixed[19]])) << 16;
        // Part 2 is at least 13 bytes, the last being a NUL terminator; the scramble uses 20.
        let rest = &payload[version_end + 1 + 31..];
        nonce.extend_from_slice(rest.get(..12).with_context(malformed)?);
        let extended_caps = if caps & 1 == 0 {
            u32::from_le_bytes([fixed[27], fixed[28], fixed[29], fixed[30]])
        } else {
            0
        };
        Ok(Handshake {
            caps,
            extended_caps,
            nonce,
        })
    }
}

fn scramble(nonce: &[u8], password: &str) -> Vec<u8> {
    // Empty passwords are sent as an empty auth response.
    mysql_common::scramble::scramble_native(nonce, password.as_bytes())
        .map(Vec::from)
        .unwrap_or_default()
}

/// EOF (`0xFE`, shorter than 9 bytes) or, with CLIENT_DEPRECATE_EOF, an OK packet with
/// a `0xFE` header. A row can start with `0xFE` only if its first value is at least
/// 16 MiB long, which makes the packet full-length.
fn is_terminator(payload: &[u8], deprecate_eof: bool) -> bool {
    let limit = if deprecate_eof { MAX_PAYLOAD } else { 9 };
    payload.first() == Some(&0xFE) && payload.len() < limit
}

/// Status flags of an OK packet (header `0x00` or `0xFE`).
fn ok_status(payload: &[u8]) -> Result<u16> {
    let body = payload.get(1..).context("empty OK packet")?;
    let (_, affected_len) = lenenc(body).context("malformed OK packet")?;
    let body = &body[affected_len..];
    let (_, insert_id_len) = lenenc(body).context("malformed OK packet")?;
    let status = body
        .get(insert_id_len..insert_id_len + 2)
        .context("OK packet without status flags")?;
    Ok(u16::from_le_bytes([status[0], status[1]]))
}

/// Status flags of an EOF packet: header, warnings (2), status (2).
fn eof_status(payload: &[u8]) -> Result<u16> {
    let status = payload.get(3..5).context("EOF packet without status flags")?;
    Ok(u16::from_le_bytes([status[0], status[1]]))
}

/// Length-encoded integer at the start of `buf`: (value, bytes used).
pub fn lenenc(buf: &[u8]) -> Option<(u64, usize)> {
    let width = match *buf.first()? {
        byte @ 0..=0xFA => return Some((u64::from(byte), 1)),
        0xFC => 2,
        0xFD => 3,
        0xFE => 8,
        _ => return None,
    };
    let mut bytes = [0u8; 8];
    bytes[..width].copy_from_slice(buf.get(1..1 + width)?);
    Some((u64::from_le_bytes(bytes), 1 + width))
}

/// "ERROR code (sqlstate): message" for an ERR payload.
fn describe_err(payload: &[u8]) -> String {
    let code = payload
        .get(1..3)
        .map_or(0, |code| u16::from_le_bytes([code[0], code[1]]));
    let rest = payload.get(3..).unwrap_or_default();
    match rest.strip_prefix(b"#") {
        Some(rest) if rest.len() >= 5 => format!(
            "ERROR {code} ({}): {}",
            String::from_utf8_lossy(&rest[..5]),
            String::from_utf8_lossy(&rest[5..])
        ),
        _ => format!("ERROR {code}: {}", String::from_utf8_lossy(rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::status::*;
    use super::*;
    use crate::{APP_PASSWORD, APP_USER, MariaDb};

    async fn connect(db: &MariaDb, flags: u32) -> Result<RawConn> {
        RawConn::connect(db.addr(), APP_USER, APP_PASSWORD, Some("test"), flags).await
    }

    #[tokio::test]
    async fn result_sets_errors_and_cursors() -> Result<()> {
        let db = MariaDb::start().await?;
        for deprecate_eof in [true, false] {
            let flags = if deprecate_eof {
                DEFAULT
            } else {
                DEFAULT & !CLIENT_DEPRECATE_EOF
            };
            let mut conn = connect(&db, flags).await?;
            assert_eq!(conn.capabilities() & CLIENT_DEPRECATE_EOF != 0, deprecate_eof);
            assert_ne!(conn.server_capabilities() & CLIENT_PROTOCOL_41, 0);
            // Metadata EOF (old protocol only) and the closing EOF/OK.
            let eofs = if deprecate_eof { 1 } else { 2 };

            // Column count, 3 definitions, [EOF], 1 row, EOF/OK.
            let packets = conn.query("SELECT 1 AS a, 'two' AS b, NULL AS c").await?;
            assert_eq!(packets.len(), 1 + 3 + 1 + eofs, "{packets:?}");
            assert_eq!(packets[0].payload, [3]);
            assert_eq!(packets[0].seq, 1);
            let row = &packets[packets.len() - 2].payload;
            assert_eq!(row, b"\x011\x03two\xfb");

            // Two result sets chained by SERVER_MORE_RESULTS_EXISTS.
            let packets = conn.query("SELECT 1; SELECT 2, 3").await?;
            assert_eq!(packets.len(), (1 + 1 + 1 + eofs) + (1 + 2 + 1 + eofs));
            let last = &packets.last().unwrap().payload;
            let last_status = if deprecate_eof {
                ok_status(last)?
            } else {
                eof_status(last)?
            };
            assert_eq!(last_status & SERVER_MORE_RESULTS_EXISTS, 0);

            let packets = conn.query("SELECT * FROM no_such_table").await?;
            assert_eq!(packets.len(), 1);
            assert_eq!(packets[0].payload[0], 0xFF);
            assert!(describe_err(&packets[0].payload).starts_with("ERROR 1146 (42S02)"));

            // An OK, then the connection still works.
            let packets = conn.query("DO 1").await?;
            assert_eq!(packets.len(), 1);
            assert_eq!(packets[0].payload[0], 0x00);

            cursor_fetch(&mut conn, deprecate_eof).await?;
        }
        Ok(())
    }

    /// COM_STMT_EXECUTE with a read-only cursor: the response ends after the metadata,
    /// and rows come from COM_STMT_FETCH.
    async fn cursor_fetch(conn: &mut RawConn, deprecate_eof: bool) -> Result<()> {
        let mut prepare = vec![0x16];
        prepare.extend_from_slice(b"SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3");
        conn.send_command(&prepare).await?;
        let ok = conn.read_packet().await?.payload;
        assert_eq!(ok[0], 0x00, "{}", describe_err(&ok));
        let stmt_id = ok[1..5].to_vec();
        let columns = u16::from_le_bytes([ok[5], ok[6]]);
        assert_eq!((columns, u16::from_le_bytes([ok[7], ok[8]])), (1, 0));
        for _ in 0..columns + u16::from(!deprecate_eof) {
            conn.read_packet().await?;
        }

        let mut execute = vec![0x17];
        execute.extend_from_slice(&stmt_id);
        execute.push(0x01); // CURSOR_TYPE_READ_ONLY
        execute.extend_from_slice(&1u32.to_le_bytes());
        conn.send_command(&execute).await?;
        let packets = conn.read_response().await?;
        assert_eq!(packets.len(), 1 + 1 + 1, "{packets:?}");
        let terminator = &packets[2].payload;
        let status = if deprecate_eof {
            ok_status(terminator)?
        } else {
            eof_status(terminator)?
        };
        assert_ne!(status & SERVER_STATUS_CURSOR_EXISTS, 0);

        let mut fetch = vec![0x1C];
        fetch.extend_from_slice(&stmt_id);
        fetch.extend_from_slice(&10u32.to_le_bytes());
        conn.send_command(&fetch).await?;
        for _ in 0..3 {
            assert_eq!(conn.read_packet().await?.payload[0], 0x00, "binary row");
        }
        let end = conn.read_packet().await?.payload;
        assert!(is_terminator(&end, deprecate_eof), "{end:02x?}");
        let status = if deprecate_eof {
            ok_status(&end)?
        } else {
            eof_status(&end)?
        };
        assert_ne!(status & SERVER_STATUS_LAST_ROW_SENT, 0);
        Ok(())
    }

    #[tokio::test]
    async fn auth_failures_are_clear() -> Result<()> {
        let db = MariaDb::start().await?;
        let err = RawConn::connect(db.addr(), APP_USER, "wrong", None, DEFAULT)
            .await
            .err()
            .expect("a wrong password must fail");
        assert!(format!("{err:#}").contains("ERROR 1045"), "{err:#}");

        let mut root = RawConn::connect(db.addr(), "root", "", None, DEFAULT).await?;
        let created = root
            .query("CREATE USER ed@'%' IDENTIFIED VIA ed25519 USING PASSWORD('pw')")
            .await?;
        assert_eq!(created[0].payload[0], 0x00, "{}", describe_err(&created[0].payload));
        let err = RawConn::connect(db.addr(), "ed", "pw", None, DEFAULT)
            .await
            .err()
            .expect("ed25519 is not supported by RawConn");
        assert!(format!("{err:#}").contains("client_ed25519"), "{err:#}");
        Ok(())
    }
}
