//! The connection phase: the server's greeting (HandshakeV10), the client's SSLRequest and
//! HandshakeResponse41, and COM_CHANGE_USER. The proxy reads a few fields and rewrites only
//! capability bits in place; everything else (auth data, plugin names, attributes) is relayed
//! as it came.

use super::constants::Capabilities;

/// Where the capability bytes of a greeting sit, found by [`Greeting::parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub server_version: String,
    pub connection_id: u32,
    pub capabilities: Capabilities,
    /// Offsets of the low and high capability halves and of MariaDB's extended bytes.
    low_at: usize,
    high_at: usize,
    extended_at: Option<usize>,
}

impl Greeting {
    /// Parses a HandshakeV10 payload far enough to find its capability flags.
    pub fn parse(payload: &[u8]) -> Option<Greeting> {
        if *payload.first()? != 10 {
            return None;
        }
        let version_end = 1 + memchr::memchr(0, &payload[1..])?;
        let server_version = String::from_utf8_lossy(&payload[1..version_end]).into_owned();
        let id_at = version_end + 1;
        let connection_id = u32::from_le_bytes(payload.get(id_at..id_at + 4)?.try_into().ok()?);
        // 8 bytes of scramble and a filler byte come between the id and the capabilities.
        let low_at = id_at + 4 + 8 + 1;
        let low = u16::from_le_bytes(payload.get(low_at..low_at + 2)?.try_into().ok()?);
        // Then charset (1) and status (2).
        let high_at = low_at + 2 + 1 + 2;
        let high = u16::from_le_bytes(payload.get(high_at..high_at + 2)?.try_into().ok()?);
        let standard = u32::from(low) | u32::from(high) << 16;
        // Then auth data length (1) and 10 reserved bytes, of which MariaDB uses the last 4.
        let ext_at = high_at + 2 + 1 + 6;
        let (extended, extended_at) = if standard & Capabilities::CLIENT_MYSQL as u32 == 0 {
            let ext = u32::from_le_bytes(payload.get(ext_at..ext_at + 4)?.try_into().ok()?);
            (ext, Some(ext_at))
        } else {
            (0, None)
        };
        Some(Greeting {
            server_version,
            connection_id,
            capabilities: Capabilities::from_parts(standard, extended),
            low_at,
            high_at,
            extended_at,
        })
    }

    /// Writes `caps` into the greeting payload in place (only where the greeting had room:
    /// MariaDB extended bits only when the server sent them).
    pub fn set_capabilities(&mut self, payload: &mut [u8], caps: Capabilities) {
        let low = caps.low();
        payload[self.low_at..self.low_at + 2].copy_from_slice(&(low as u16).to_le_bytes());
        payload[self.high_at..self.high_at + 2].copy_from_slice(&((low >> 16) as u16).to_le_bytes());
        if let Some(at) = self.extended_at {
            payload[at..at + 4].copy_from_slice(&caps.high().to_le_bytes());
        }
        self.capabilities = caps;
    }
}

/// Length of an SSLRequest payload: flags, max packet, charset and 23 reserved bytes.
pub const SSL_REQUEST_LEN: usize = 32;

/// The fixed head of a HandshakeResponse41 or SSLRequest, and the fields the proxy logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientResponse {
    pub capabilities: Capabilities,
    pub user: String,
    pub database: Option<String>,
    /// An SSLRequest: the client wants to switch to TLS before sending its real response.
    pub is_ssl_request: bool,
}

impl ClientResponse {
    pub fn parse(payload: &[u8]) -> Result<ClientResponse, &'static str> {
        if payload.len() < SSL_REQUEST_LEN {
            return Err("handshake response shorter than 32 bytes");
        }
        let low = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes"));
        if u64::from(low) & Capabilities::PROTOCOL_41 == 0 {
            return Err("the client does not speak protocol 4.1");
        }
        let high = if u64::from(low) & Capabilities::CLIENT_MYSQL == 0 {
            u32::from_le_bytes(payload[28..32].try_into().expect("4 bytes"))
        } else {
            0
        };
        let capabilities = Capabilities::from_parts(low, high);
        if payload.len() == SSL_REQUEST_LEN {
            if !capabilities.has(Capabilities::SSL) {
                return Err("handshake response without a user name");
            }
            return Ok(ClientResponse {
                capabilities,
                user: String::new(),
                database: None,
                is_ssl_request: true,
            });
        }
        let rest = &payload[SSL_REQUEST_LEN..];
        let user_end = memchr::memchr(0, rest).ok_or("user name is not terminated")?;
        let user = String::from_utf8_lossy(&rest[..user_end]).into_owned();
        let mut at = user_end + 1;
        let auth_len = if capabilities.has(Capabilities::PLUGIN_AUTH_LENENC_DATA) {
            let (len, width) =
                super::lenenc::read_int(rest.get(at..).unwrap_or(&[])).ok_or("auth data length is missing")?;
            at += width;
            usize::try_from(len).map_err(|_| "auth data length overflows")?
        } else if capabilities.has(Capabilities::SECURE_CONNECTION) {
            let len = *rest.get(at).ok_or("auth data length is missing")?;
            at += 1;
            usize::from(len)
        } else {
            memchr::memchr(0, rest.get(at..).unwrap_or(&[])).ok_or("auth data is not terminated")? + 1
        };
        at = at
            .checked_add(auth_len)
            .filter(|end| *end <= rest.len())
            .ok_or("auth data is truncated")?;
        let database = if capabilities.has(Capabilities::CONNECT_WITH_DB) && at < rest.len() {
            let end = memchr::memchr(0, &rest[at..]).map_or(rest.len(), |n| at + n);
            Some(String::from_utf8_lossy(&rest[at..end]).into_owned())
        } else {
            None
        };
        Ok(ClientResponse {
            capabilities,
            user,
            database,
            is_ssl_request: false,
        })
    }

    /// Rewrites the capability flags of a handshake response or SSLRequest payload in place.
    pub fn set_capabilities(payload: &mut [u8], caps: Capabilities) {
        payload[0..4].copy_from_slice(&caps.low().to_le_bytes());
        if !caps.has(Capabilities::CLIENT_MYSQL) && payload.len() >= SSL_REQUEST_LEN {
            payload[28..32].copy_from_slice(&caps.high().to_le_bytes());
        }
    }

    /// An SSLRequest payload built from the head of a full handshake response, for opening
    /// TLS to the backend on the client's behalf.
    pub fn ssl_request_from(response: &[u8]) -> Vec<u8> {
        let mut out = response[..SSL_REQUEST_LEN].to_vec();
        let low = u32::from_le_bytes(out[0..4].try_into().expect("4 bytes")) | Capabilities::SSL as u32;
        out[0..4].copy_from_slice(&low.to_le_bytes());
        out
    }
}

/// The schema a COM_CHANGE_USER packet switches to, if any. The packet is
/// `0x11, user NUL, auth data (length-prefixed), schema NUL, ...`.
pub fn change_user_database(payload: &[u8], caps: Capabilities) -> Option<String> {
    let rest = payload.get(1..)?;
    let user_end = memchr::memchr(0, rest)?;
    let mut at = user_end + 1;
    if caps.has(Capabilities::SECURE_CONNECTION) {
        at += 1 + usize::from(*rest.get(at)?);
    } else {
        at += memchr::memchr(0, rest.get(at..)?)? + 1;
    }
    let tail = rest.get(at..)?;
    let end = memchr::memchr(0, tail).unwrap_or(tail.len());
    (end > 0).then(|| String::from_utf8_lossy(&tail[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mariadb_greeting() -> Vec<u8> {
        let mut p = vec![10];
        p.extend_from_slice(b"5.5.5-10.11.19-MariaDB\0");
        p.extend_from_slice(&42u32.to_le_bytes());
        p.extend_from_slice(b"abcdefgh\0");
        p.extend_from_slice(&0xf7feu16.to_le_bytes());
        p.push(45);
        p.extend_from_slice(&2u16.to_le_bytes());
        p.extend_from_slice(&0x81ffu16.to_le_bytes());
        p.push(21);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&0x1du32.to_le_bytes());
        p.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
        p
    }

    #[test]
    fn greeting_capabilities_are_found_and_rewritten_in_place() {
        let mut payload = mariadb_greeting();
        let original = payload.clone();
        let mut g = Greeting::parse(&payload).unwrap();
        assert_eq!(g.connection_id, 42);
        assert_eq!(g.capabilities, Capabilities(0x1d_81ff_f7fe));
        let masked = Capabilities(g.capabilities.0 & !Capabilities::UNSUPPORTED & !Capabilities::SSL);
        g.set_capabilities(&mut payload, masked);
        assert_eq!(Greeting::parse(&payload).unwrap().capabilities, masked);
        assert!(!masked.has(Capabilities::COMPRESS) && masked.has(Capabilities::MARIADB_STMT_BULK_OPERATIONS));
        let changed = payload.iter().zip(&original).filter(|(a, b)| a != b).count();
        assert!(changed <= 4, "only capability bytes change");
        assert!(Greeting::parse(&payload[..20]).is_none());
    }

    #[test]
    fn client_response_fields_and_ssl_request() {
        let caps = Capabilities::PROTOCOL_41
            | Capabilities::SECURE_CONNECTION
            | Capabilities::PLUGIN_AUTH
            | Capabilities::CONNECT_WITH_DB
            | Capabilities::SSL;
        let mut p = Vec::new();
        p.extend_from_slice(&(caps as u32).to_le_bytes());
        p.extend_from_slice(&[0, 0, 0, 1, 45]);
        p.extend_from_slice(&[0; 19]);
        p.extend_from_slice(&4u32.to_le_bytes());
        let ssl = ClientResponse::parse(&p).unwrap();
        assert!(ssl.is_ssl_request);
        assert_eq!(ssl.capabilities.high(), 4);
        p.extend_from_slice(b"app\0");
        p.push(3);
        p.extend_from_slice(b"xyz");
        p.extend_from_slice(b"shop\0mysql_native_password\0");
        let full = ClientResponse::parse(&p).unwrap();
        assert_eq!(full.user, "app");
        assert_eq!(full.database.as_deref(), Some("shop"));
        assert!(!full.is_ssl_request);
        // Cut inside the auth data.
        assert!(ClientResponse::parse(&p[..38]).is_err());
        assert!(ClientResponse::parse(&[0xff; 10]).is_err());
    }

    #[test]
    fn change_user_schema() {
        let caps = Capabilities(Capabilities::SECURE_CONNECTION);
        let p = b"\x11bob\0\x02xyshop\0\x21\x00mysql_native_password\0";
        assert_eq!(change_user_database(p, caps).as_deref(), Some("shop"));
        assert_eq!(change_user_database(b"\x11bob\0\x00\0", caps), None);
        assert_eq!(change_user_database(b"\x11bob", caps), None);
    }
}
