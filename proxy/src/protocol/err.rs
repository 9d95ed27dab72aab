//! ERR packets: the ones the proxy writes itself, and reading the code of the backend's.

use super::frame;

/// An error the proxy reports to a client in a MySQL ERR packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    pub sql_state: [u8; 5],
    pub message: String,
}

impl ErrPacket {
    pub fn new(code: u16, sql_state: &str, message: impl Into<String>) -> Self {
        let mut state = [b'H', b'Y', b'0', b'0', b'0'];
        if sql_state.len() == 5 {
            state.copy_from_slice(sql_state.as_bytes());
        }
        ErrPacket {
            code,
            sql_state: state,
            message: message.into(),
        }
    }

    /// ER_CON_COUNT_ERROR.
    pub fn too_many_connections(limit: usize) -> Self {
        Self::new(
            1040,
            "08004",
            format!(
                "Too many connections: ferrata-proxy is at its limit of {limit} client sessions; \
                 retry later or raise max_connections in the proxy config"
            ),
        )
    }

    /// ER_HANDSHAKE_ERROR.
    pub fn bad_handshake(detail: &str) -> Self {
        Self::new(
            1043,
            "08S01",
            format!("Bad handshake: {detail}; the client sent a malformed handshake response"),
        )
    }

    /// ER_NET_PACKET_TOO_LARGE.
    pub fn packet_too_large(len: usize, limit: usize) -> Self {
        Self::new(
            1153,
            "08S01",
            format!(
                "Got a packet bigger than 'max_packet_size' bytes ({len} > {limit}); \
                 send smaller statements or raise max_packet_size in the proxy config"
            ),
        )
    }

    /// CR_CONN_HOST_ERROR, as MySQL clients report an unreachable server.
    pub fn backend_unreachable(backend: &str, cause: &str) -> Self {
        Self::new(
            2003,
            "HY000",
            format!(
                "ferrata-proxy cannot connect to the database at {backend}: {cause}; \
                 check that the database is running and the proxy's backend setting"
            ),
        )
    }

    /// CR_SSL_CONNECTION_ERROR, as MySQL clients report a failed TLS setup.
    pub fn backend_tls(cause: &str) -> Self {
        Self::new(
            2026,
            "HY000",
            format!(
                "ferrata-proxy could not set up TLS to the database: {cause}; check the proxy's \
                 backend_tls settings (ca, server_name) against the server's certificate"
            ),
        )
    }

    /// CR_SERVER_LOST, as MySQL clients report a server that went away mid-command.
    pub fn backend_lost(cause: &str) -> Self {
        Self::new(
            2013,
            "HY000",
            format!(
                "Lost connection to the database behind ferrata-proxy during the command: {cause}; \
                 the session is closed, reconnect and retry"
            ),
        )
    }

    /// ER_UNKNOWN_ERROR for a protocol violation by the client.
    pub fn malformed(detail: &str) -> Self {
        Self::new(
            1105,
            "08S01",
            format!("ferrata-proxy received a malformed packet ({detail}); the session is closed"),
        )
    }

    /// The server's ERR `payload` with error `code`, as the proxy passes it on: its SQLSTATE
    /// (the 4.1 layout's `#` and five characters; HY000 without them) and message.
    pub fn from_payload(code: u16, payload: &[u8]) -> Self {
        let (sql_state, message) = match payload.get(3..) {
            Some([b'#', state @ ..]) if state.len() >= 5 => (&state[..5], &state[5..]),
            Some(rest) => (b"HY000".as_slice(), rest),
            None => (b"HY000".as_slice(), [].as_slice()),
        };
        let mut state = [0u8; 5];
        state.copy_from_slice(sql_state);
        ErrPacket {
            code,
            sql_state: state,
            message: String::from_utf8_lossy(message).into_owned(),
        }
    }

    /// The same error (code, SQLSTATE) told with `prefix` before its message.
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.message.insert_str(0, prefix);
        self
    }

    /// The payload, without the packet header, in the 4.1 layout with an SQLSTATE: every
    /// client the proxy talks to negotiated CLIENT_PROTOCOL_41. Before that negotiation, see
    /// [`ErrPacket::to_greeting_packet`].
    pub fn payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.message.len());
        out.push(0xff);
        out.extend_from_slice(&self.code.to_le_bytes());
        out.push(b'#');
        out.extend_from_slice(&self.sql_state);
        out.extend_from_slice(self.message.as_bytes());
        out
    }

    /// The whole packet with the given sequence id.
    pub fn to_packet(&self, seq: u8) -> Vec<u8> {
        Self::framed(&self.payload(), seq)
    }

    /// The whole packet sent in place of the server greeting (sequence id 0). No capabilities
    /// are agreed yet, so it has the pre-4.1 layout without an SQLSTATE, as servers send it;
    /// clients would otherwise show the `#` and SQLSTATE as part of the message.
    pub fn to_greeting_packet(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(3 + self.message.len());
        payload.push(0xff);
        payload.extend_from_slice(&self.code.to_le_bytes());
        payload.extend_from_slice(self.message.as_bytes());
        Self::framed(&payload, 0)
    }

    fn framed(payload: &[u8], seq: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + payload.len());
        frame::write_header(&mut out, payload.len(), seq);
        out.extend_from_slice(payload);
        out
    }
}

/// The error code of an ERR payload (first byte 0xFF), if it is long enough to have one.
pub fn code(payload: &[u8]) -> Option<u16> {
    match payload {
        [0xff, lo, hi, ..] => Some(u16::from_le_bytes([*lo, *hi])),
        _ => None,
    }
}

/// MariaDB's progress reports are ERR packets with this code; they do not end a response.
pub const PROGRESS_REPORT: u16 = 0xffff;

impl std::fmt::Display for ErrPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ERROR {} ({}): {}",
            self.code,
            String::from_utf8_lossy(&self.sql_state),
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_layout_is_header_marker_code_state_message() {
        let packet = ErrPacket::new(1040, "08004", "busy").to_packet(3);
        assert_eq!(&packet[..4], &[13, 0, 0, 3]);
        assert_eq!(&packet[4..], b"\xff\x10\x04#08004busy");
        assert_eq!(code(&packet[4..]), Some(1040));
        let greeting = ErrPacket::new(1040, "08004", "busy").to_greeting_packet();
        assert_eq!(greeting, b"\x07\x00\x00\x00\xff\x10\x04busy");
    }

    #[test]
    fn a_server_error_keeps_its_sqlstate() {
        let deadlock = ErrPacket::new(1213, "40001", "Deadlock found");
        assert_eq!(ErrPacket::from_payload(1213, &deadlock.payload()), deadlock);
        let old = ErrPacket::from_payload(1105, b"\xff\x51\x04no state");
        assert_eq!(old, ErrPacket::new(1105, "HY000", "no state"));
        assert_eq!(ErrPacket::from_payload(1105, b"\xff\x51\x04").message, "");
    }
}
