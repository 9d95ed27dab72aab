//! The connection phase: open the backend connection, relay its greeting with the
//! capabilities the proxy cannot follow masked out, set up TLS on either leg, and relay the
//! authentication exchange. The result is a pair of authenticated peers.

use std::sync::Arc;

use tokio::net::{TcpStream, UnixStream};

use super::peer::{Peer, ReadError};
use super::state::SessionState;
use super::{SessionError, Shared, auth};
use crate::protocol::Capabilities;
use crate::protocol::err::ErrPacket;
use crate::protocol::frame;
use crate::protocol::handshake::{ClientResponse, Greeting};
use crate::stream::Stream;

/// The greeting and handshake packets are small; this bounds them.
const HANDSHAKE_PACKET_LIMIT: usize = 64 * 1024;

/// Runs the connection phase for a freshly accepted client.
pub async fn establish(
    tcp: TcpStream,
    shared: &Arc<Shared>,
) -> Result<(Peer, Peer, SessionState), (Option<Peer>, SessionError)> {
    let metrics = &shared.metrics;
    let mut client = Peer::new(
        Stream::Plain(tcp),
        metrics.client_bytes_in.clone(),
        metrics.client_bytes_out.clone(),
    );
    match handshake(&mut client, shared).await {
        Ok((backend, state)) => Ok((client, backend, state)),
        Err(e) => Err((Some(client), e)),
    }
}

/// Opens the backend connection: TCP, or a Unix socket when `backend` is a path.
async fn connect_backend(shared: &Shared) -> Result<Stream, SessionError> {
    let backend = &shared.config.backend;
    let connect = async {
        match shared.config.backend_socket() {
            Some(path) => UnixStream::connect(path).await.map(Stream::Unix),
            None => {
                let tcp = TcpStream::connect(backend.as_str()).await?;
                tcp.set_nodelay(true)?;
                Ok(Stream::Plain(tcp))
            }
        }
    };
    match tokio::time::timeout(shared.config.connect_timeout(), connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(SessionError::unreachable(backend, &e.to_string())),
        Err(_) => Err(SessionError::unreachable(backend, "connection timed out")),
    }
}

async fn handshake(client: &mut Peer, shared: &Arc<Shared>) -> Result<(Peer, SessionState), SessionError> {
    let metrics = &shared.metrics;
    let stream = connect_backend(shared).await?;
    let mut backend = Peer::new(
        stream,
        metrics.backend_bytes_in.clone(),
        metrics.backend_bytes_out.clone(),
    )
    .counting_round_trips(metrics.backend_round_trips.clone());

    // 1. The backend's greeting, masked, to the client.
    let span = backend
        .read_packet(HANDSHAKE_PACKET_LIMIT)
        .await
        .map_err(|e| SessionError::from_backend_read(e, 0))?;
    if backend.buf.get(4) == Some(&0xff) {
        // The server refused us (too many connections, host blocked): pass its reason on.
        backend
            .forward(span.raw_len, client)
            .await
            .map_err(|_| SessionError::ClientClosed)?;
        return Err(SessionError::BackendRefused);
    }
    let mut greeting = Greeting::parse(&backend.buf[4..span.raw_len])
        .ok_or_else(|| SessionError::backend_protocol("the server's greeting is not a HandshakeV10 packet", 0))?;
    let server_caps = greeting.capabilities;
    let mut offered = Capabilities(server_caps.0 & !Capabilities::UNSUPPORTED & !Capabilities::SSL);
    if shared.tls_acceptor.is_some() {
        offered.0 |= Capabilities::SSL;
    }
    greeting.set_capabilities(&mut backend.buf[4..span.raw_len], offered);
    backend
        .forward(span.raw_len, client)
        .await
        .map_err(|_| SessionError::ClientClosed)?;

    // 2. The client's answer: an SSLRequest first, if it wants TLS.
    let mut response = read_client_handshake(client).await?;
    let mut client_seq = response.0.first_seq;
    if response.1.is_ssl_request {
        let Some(acceptor) = shared.tls_acceptor.clone() else {
            return Err(SessionError::client(
                ErrPacket::bad_handshake("the client asked for TLS, which this proxy does not offer"),
                client_seq.wrapping_add(1),
            ));
        };
        client.consume(response.0.raw_len);
        let Stream::Plain(tcp) = std::mem::replace(&mut client.stream, Stream::Detached) else {
            unreachable!("TLS is set up once");
        };
        // Clients may send their ClientHello right behind the SSLRequest, so it can already
        // be in our buffer: hand those bytes to TLS before it reads from the socket.
        let early = client.buf.split();
        let tls = acceptor
            .accept_with(tcp, |tls| feed_tls(tls, &early))
            .await
            .map_err(|e| SessionError::Tls(format!("client TLS handshake: {e}")))?;
        client.stream = Stream::ServerTls(Box::new(tls));
        response = read_client_handshake(client).await?;
        client_seq = response.0.first_seq;
    } else if shared.config.tls.as_ref().is_some_and(|t| t.required) {
        return Err(SessionError::client(
            ErrPacket::new(
                3159,
                "08004",
                "Connections using insecure transport are prohibited: ferrata-proxy requires TLS; \
                 connect with SSL enabled",
            ),
            client_seq.wrapping_add(1),
        ));
    }
    let (span, parsed) = response;
    tracing::Span::current().record("user", parsed.user.as_str());

    // 3. The handshake response to the backend, with capabilities masked to what both the
    //    proxy and the server offered, over TLS if configured.
    let mut agreed = Capabilities(parsed.capabilities.0 & offered.0 & !Capabilities::SSL);
    if shared.backend_tls.is_some() {
        agreed.0 |= Capabilities::SSL;
    }
    let payload_end = span.raw_len;
    ClientResponse::set_capabilities(&mut client.buf[4..payload_end], agreed);
    let mut backend_seq = 1u8;
    if let Some((connector, name)) = &shared.backend_tls {
        if !server_caps.has(Capabilities::SSL) {
            return Err(SessionError::BackendTls {
                cause: "backend_tls is configured but the server does not offer TLS".into(),
                seq: client_seq.wrapping_add(1),
            });
        }
        let request = ClientResponse::ssl_request_from(&client.buf[4..payload_end]);
        let mut packet = Vec::with_capacity(4 + request.len());
        frame::write_header(&mut packet, request.len(), backend_seq);
        packet.extend_from_slice(&request);
        backend
            .write_all(&packet)
            .await
            .map_err(|e| SessionError::backend_lost(&e.to_string(), client_seq))?;
        let Stream::Plain(tcp) = std::mem::replace(&mut backend.stream, Stream::Detached) else {
            unreachable!("TLS is set up once, and Config::validate allows backend TLS only over TCP");
        };
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| SessionError::BackendTls {
                cause: format!("TLS handshake: {e}"),
                seq: client_seq.wrapping_add(1),
            })?;
        backend.stream = Stream::ClientTls(Box::new(tls));
        backend_seq = 2;
    }
    let seq_shift = i16::from(backend_seq) - i16::from(client_seq);
    client.buf[3] = backend_seq;
    client
        .forward(payload_end, &mut backend)
        .await
        .map_err(|e| SessionError::backend_lost(&e.to_string(), client_seq))?;

    // 4. Whatever exchange the auth plugin needs, until OK or ERR.
    let auth::Authenticated::Yes(status) = auth::relay(client, &mut backend, seq_shift).await? else {
        return Err(SessionError::AuthenticationFailed);
    };
    let state = SessionState {
        capabilities: Capabilities(agreed.0 & server_caps.0),
        status,
        fresh_status: status,
        user: parsed.user,
        schema: parsed.database,
        backend_connection_id: greeting.connection_id,
        statements: Default::default(),
        last_prepared: None,
        xid: None,
        branch_mode: Default::default(),
        status_unknown: false,
    };
    Ok((backend, state))
}

async fn read_client_handshake(client: &mut Peer) -> Result<(frame::PacketSpan, ClientResponse), SessionError> {
    let span = match client.read_packet(HANDSHAKE_PACKET_LIMIT).await {
        Ok(span) => span,
        Err(ReadError::TooLarge { len, .. }) => {
            return Err(SessionError::client(
                ErrPacket::bad_handshake(&format!("a {len}-byte handshake response")),
                2,
            ));
        }
        Err(_) => return Err(SessionError::ClientClosed),
    };
    let parsed = ClientResponse::parse(&client.buf[4..span.raw_len])
        .map_err(|detail| SessionError::client(ErrPacket::bad_handshake(detail), span.first_seq.wrapping_add(1)))?;
    Ok((span, parsed))
}

/// Gives a server-side TLS connection the bytes the client sent before the proxy switched to
/// TLS, and processes them so that the reply is queued. A processing error is kept by the
/// connection and ends the handshake that follows.
fn feed_tls(tls: &mut rustls::ServerConnection, mut early: &[u8]) {
    while !early.is_empty() {
        match tls.read_tls(&mut early) {
            Ok(n) if n > 0 => {
                let _ = tls.process_new_packets();
            }
            _ => return,
        }
    }
}
