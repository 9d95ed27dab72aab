//! The connection phase: a server greeting, a client's handshake response or SSLRequest, and
//! COM_CHANGE_USER. Input: the payload, read by every parser (each refuses what is not its
//! packet).
//!
//! Checks that rewriting capability flags the way the proxy does (clearing what it cannot
//! follow) changes exactly those flags and nothing else the parsers read.
#![no_main]

use ferrata_proxy::protocol::constants::Capabilities;
use ferrata_proxy::protocol::handshake::{self, ClientResponse, Greeting, SSL_REQUEST_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    if let Some(mut greeting) = Greeting::parse(payload) {
        let offered = Capabilities(greeting.capabilities.0 & !Capabilities::UNSUPPORTED);
        let mut rewritten = payload.to_vec();
        greeting.set_capabilities(&mut rewritten, offered);
        let again = Greeting::parse(&rewritten).expect("a rewritten greeting parses");
        assert_eq!(again.capabilities, offered);
        assert_eq!(
            (again.server_version, again.connection_id),
            (greeting.server_version, greeting.connection_id)
        );
    }

    if let Ok(response) = ClientResponse::parse(payload) {
        let kept = Capabilities(response.capabilities.0 & !Capabilities::UNSUPPORTED);
        let mut rewritten = payload.to_vec();
        ClientResponse::set_capabilities(&mut rewritten, kept);
        let again = ClientResponse::parse(&rewritten).expect("a rewritten response parses");
        assert_eq!(
            again,
            ClientResponse {
                capabilities: kept,
                ..response.clone()
            }
        );
        let ssl = ClientResponse::parse(&ClientResponse::ssl_request_from(payload)).expect("an SSLRequest parses");
        assert!(ssl.is_ssl_request && ssl.capabilities.has(Capabilities::SSL));
        assert_eq!(response.is_ssl_request, payload.len() == SSL_REQUEST_LEN);
    }

    for caps in [Capabilities(0), Capabilities(Capabilities::SECURE_CONNECTION)] {
        let _ = handshake::change_user_database(payload, caps);
    }
});
