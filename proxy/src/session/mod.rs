//! The session core: one client session, a task that owns the client socket and its own
//! backend connection. It knows no transaction mode.
//!
//! After the connection phase ([`connect`]), the session reads one command at a time from
//! the client and offers it to the registered modes ([`mode`]); a command none of them takes
//! is forwarded unchanged and its response streamed back ([`relay`]), keeping
//! [`state::SessionState`] current from what passes. Commands the client pipelines wait in
//! the client buffer until the previous response has ended. [`backend`] is how modes run
//! statements of their own on the session's backend connection.

mod auth;
pub mod backend;
mod connect;
mod error;
mod hide_socket;
pub mod mode;
pub mod peer;
pub mod relay;
pub mod state;

use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::select;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::classify::{self, Other, StatementClass};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::err::ErrPacket;
use crate::protocol::handshake;
use crate::protocol::response::{ResponseKind, ResponseTracker};
use crate::protocol::{Command, SetOption};
pub use error::SessionError;
use mode::{Claim, Io, Mode, ModeSession};
use peer::{Peer, ReadError};
use state::{PreparedStatement, SessionState};

/// What every session shares: settings, TLS material, metrics, the registered modes, the
/// shutdown signal.
pub struct Shared {
    pub config: Config,
    /// The modes every session offers its commands to, in this order (`crate::modes`).
    pub modes: Vec<Arc<dyn Mode>>,
    pub tls_acceptor: Option<TlsAcceptor>,
    pub backend_tls: Option<(TlsConnector, ServerName<'static>)>,
    pub metrics: Metrics,
    /// Cancelled when the proxy stops accepting: idle sessions close, busy ones finish
    /// their command first.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// Whether some mode reads prepared statements' parameters.
    fn reads_parameters(&self) -> bool {
        self.modes.iter().any(|m| m.reads_parameters())
    }
}

/// Serves one client connection from accept to close.
pub async fn run(tcp: TcpStream, id: u64, shared: Arc<Shared>) {
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let span = tracing::info_span!("session", id, client = %peer, user = tracing::field::Empty);
    async move {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let established =
            tokio::time::timeout(shared.config.handshake_timeout(), connect::establish(tcp, &shared)).await;
        let (mut client, mut backend, mut state) = match established {
            Ok(Ok(parts)) => parts,
            Ok(Err((mut client, e))) => return e.report(&shared, client.as_mut()).await,
            Err(_) => return SessionError::HandshakeTimeout.report(&shared, None).await,
        };
        tracing::debug!(schema = ?state.schema, "session authenticated");
        if let Err(e) = serve(&mut client, &mut backend, &mut state, &shared).await {
            e.report(&shared, Some(&mut client)).await;
        }
        backend.shutdown().await;
        client.shutdown().await;
    }
    .instrument(span)
    .await
}

/// The command loop.
async fn serve(
    client: &mut Peer,
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
) -> Result<(), SessionError> {
    let limit = shared.config.max_packet_size;
    let reads_parameters = shared.reads_parameters();
    let mut modes: Vec<Box<dyn ModeSession>> = shared.modes.iter().map(|m| Arc::clone(m).open()).collect();
    // Registered once per session: every session waits on the same token, and
    // re-registering on each command would take its lock twice per command.
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        let span = select! {
            packet = client.read_packet(limit) => match packet {
                Ok(span) => span,
                Err(ReadError::TooLarge { len, limit }) => {
                    // Read the rest away first: the client is still sending it and expects
                    // the ERR after its last piece (and with the sequence id that follows).
                    let first_seq = client.buf[3];
                    let (len, last_seq) = client.discard_packet().await.unwrap_or((len, first_seq));
                    return Err(SessionError::client(
                        ErrPacket::packet_too_large(len, limit),
                        last_seq.wrapping_add(1),
                    ));
                }
                Err(_) => return Err(SessionError::ClientClosed),
            },
            // A server may speak while the client is idle (an ERR before it drops us):
            // pass it on as it is, and notice when the backend goes away.
            read = backend.fill(), if client.buf.is_empty() => {
                match read {
                    Ok(n) if n > 0 => {
                        let buffered = backend.buf.len();
                        backend.forward(buffered, client).await.map_err(|_| SessionError::ClientClosed)?;
                        continue;
                    }
                    _ => return Ok(()),
                }
            }
            _ = &mut shutdown, if client.buf.is_empty() => return Ok(()),
            // A mode's work between commands (phase 2 of a branch this connection holds).
            i = mode::woken(&mut modes), if client.buf.is_empty() => {
                modes[i].woken(backend, state, shared).await?;
                continue;
            }
        };
        let started = Instant::now();
        if state.status_unknown {
            // Before any mode decides on a transaction that may be gone.
            backend::refresh_status(backend, state, limit).await?;
        }
        if reads_parameters {
            // The modes run statements of their own on the backend connection, some prepared,
            // which moves what the server calls the last prepared statement.
            state.name_last_prepared(&mut client.buf[..span.raw_len]);
        }
        let payload = client.payload(&span);
        let Some(&command) = payload.first() else {
            return Err(SessionError::client(
                ErrPacket::malformed("an empty command packet"),
                span.last_seq.wrapping_add(1),
            ));
        };
        let class = matches!(command, Command::QUERY | Command::STMT_PREPARE)
            .then(|| classify::classify(&payload[1..], state.no_backslash_escapes()));
        if reads_parameters {
            state.note_statement_command(command, &payload, limit);
        }
        let offered = mode::Command {
            code: command,
            payload: &payload,
            class: class.as_ref(),
        };
        // The first mode that claims the command has it; a gate may send it round again.
        let taken = loop {
            let claimed = modes.iter_mut().enumerate().find_map(|(i, m)| {
                let claim = m.claim(&offered, state, shared);
                (claim != Claim::Pass).then_some((i, claim))
            });
            match claimed {
                Some((i, Claim::Gate)) => {
                    if let Some(e) = modes[i].gate(backend, state, shared).await? {
                        break Err(e);
                    }
                }
                Some((i, _)) => break Ok(Some(i)),
                None => break Ok(None),
            }
        };
        match taken {
            Err(refused) => {
                drop(payload);
                client.consume(span.raw_len);
                backend::reply(client, refused).await?;
                shared.metrics.command(command, started.elapsed());
                continue;
            }
            Ok(Some(i)) => {
                drop(payload);
                let raw = client.buf[..span.raw_len].to_vec();
                client.consume(span.raw_len);
                let io = Io {
                    client,
                    backend,
                    state,
                    shared,
                    command,
                    raw: &raw,
                };
                modes[i].run(io).await?;
                executed(command, &raw[4..], state);
                shared.metrics.command(command, started.elapsed());
                continue;
            }
            Ok(None) => {}
        }
        let kind = state.response_kind(&payload);
        let mut tracker = ResponseTracker::new(kind, state.capabilities, span.last_seq);
        let mut pending = Pending::from_command(command, &payload, class, state, shared.config.hide_server_socket);
        drop(payload);
        client
            .forward(span.raw_len, backend)
            .await
            .map_err(|e| SessionError::backend_lost(&e.to_string(), span.last_seq))?;
        match kind {
            ResponseKind::None if command == Command::QUIT => return Ok(()),
            ResponseKind::None => {}
            ResponseKind::Authentication => {
                state.status = match auth::relay(client, backend, 0).await? {
                    auth::Authenticated::Yes(status) => {
                        pending.user_changed = true;
                        state.fresh_status = status;
                        status
                    }
                    // Refused, the server keeps the session, reset as if new.
                    auth::Authenticated::No => state.fresh_status,
                };
            }
            ResponseKind::Stream => return stream_forever(client, backend).await,
            _ if pending.hide_socket => hide_socket::response(client, backend, &mut tracker).await?,
            _ => relay::response(client, backend, &mut tracker).await?,
        }
        pending.apply(state, &tracker);
        for m in &mut modes {
            m.answered(state, tracker.error_code());
        }
        shared.metrics.command(command, started.elapsed());
    }
}

/// What a command will change in the session state once its response is known.
struct Pending {
    command: u8,
    /// For COM_STMT_PREPARE: the statement text and its class.
    prepare: Option<(String, classify::Classification)>,
    /// COM_CHANGE_USER: the server accepted the new user.
    user_changed: bool,
    /// For COM_INIT_DB, USE and COM_CHANGE_USER: the schema switched to.
    schema: Option<String>,
    /// For COM_STMT_CLOSE: the statement dropped.
    close: Option<u32>,
    /// For COM_STMT_EXECUTE: the statement executed.
    executed: Option<u32>,
    hide_socket: bool,
    /// COM_SET_OPTION: multi-statements turned on (`true`) or off.
    multi_statements: Option<bool>,
}

impl Pending {
    fn from_command(
        command: u8,
        payload: &[u8],
        class: Option<classify::Classification>,
        state: &SessionState,
        hide_socket: bool,
    ) -> Self {
        let body = &payload[1..];
        let mut pending = Pending {
            command,
            prepare: None,
            user_changed: false,
            schema: None,
            close: None,
            executed: None,
            hide_socket: false,
            multi_statements: None,
        };
        match command {
            Command::QUERY => {
                let Some(class) = class else { return pending };
                match class.class {
                    StatementClass::Other(Other::Use) => pending.schema = classify::use_schema(body),
                    StatementClass::Other(Other::Select) => {
                        pending.hide_socket = hide_socket && hide_socket::mentions_socket(body);
                    }
                    _ => {}
                }
            }
            Command::STMT_PREPARE => {
                pending.prepare = class.map(|class| (String::from_utf8_lossy(body).into_owned(), class));
            }
            Command::INIT_DB => pending.schema = Some(String::from_utf8_lossy(body).into_owned()),
            Command::CHANGE_USER => pending.schema = handshake::change_user_database(payload, state.capabilities),
            Command::STMT_CLOSE => pending.close = state.statement_id(payload),
            Command::STMT_EXECUTE => pending.executed = state.statement_id(payload),
            Command::SET_OPTION => {
                pending.multi_statements = match <[u8; 2]>::try_from(body) {
                    Ok(SetOption::MULTI_STATEMENTS_ON) => Some(true),
                    Ok(SetOption::MULTI_STATEMENTS_OFF) => Some(false),
                    _ => None,
                }
            }
            _ => {}
        }
        pending
    }

    fn apply(self, state: &mut SessionState, tracker: &ResponseTracker) {
        state.observe(tracker);
        if let Some(id) = self.close {
            state.statements.remove(&id);
            if state.last_prepared == Some(id) {
                state.last_prepared = None;
            }
        }
        if let Some(stmt) = self.executed.and_then(|id| state.statements.get_mut(&id)) {
            stmt.forget_long_data();
        }
        let ok = tracker.error_code().is_none();
        match self.command {
            // A new user starts outside any global transaction. The server resets the session
            // before it checks the new user, so a refused change too drops the prepared
            // statements and rolls the local transaction back (pending writes included);
            // only the database stays as it was.
            Command::CHANGE_USER => {
                state.forget_statements();
                if self.user_changed {
                    state.schema = self.schema;
                }
                state.xid = None;
            }
            // The server parses multi-statement strings from now on (or no longer): what the
            // modes decide on, as if the client had negotiated it.
            Command::SET_OPTION if ok => {
                if let Some(on) = self.multi_statements {
                    state
                        .capabilities
                        .set(crate::protocol::Capabilities::MULTI_STATEMENTS, on);
                }
            }
            Command::RESET_CONNECTION if ok => {
                state.forget_statements();
                state.xid = None;
            }
            Command::STMT_PREPARE => {
                // A failed prepare leaves no last statement (MariaDB drops it too).
                state.last_prepared = tracker.prepare_ok().map(|p| p.statement_id);
                if let (Some(prepared), Some((sql, class))) = (tracker.prepare_ok(), self.prepare) {
                    state.statements.insert(
                        prepared.statement_id,
                        PreparedStatement {
                            sql,
                            class,
                            params: prepared.params,
                            columns: prepared.columns,
                            param_types: None,
                            long_data: Default::default(),
                            long_data_dropped: false,
                        },
                    );
                }
            }
            _ if ok && self.schema.is_some() => state.schema = self.schema,
            _ => {}
        }
    }
}

/// After an execute the proxy answered itself: the statement's long data is spent.
fn executed(command: u8, payload: &[u8], state: &mut SessionState) {
    if command == Command::STMT_EXECUTE
        && let Some(stmt) = state.statement_id(payload).and_then(|id| state.statements.get_mut(&id))
    {
        stmt.forget_long_data();
    }
}

/// Binlog dumps never end by themselves: from here on the session is a plain pipe.
async fn stream_forever(client: &mut Peer, backend: &mut Peer) -> Result<(), SessionError> {
    let buffered = backend.buf.len();
    backend
        .forward(buffered, client)
        .await
        .map_err(|_| SessionError::ClientClosed)?;
    let _ = tokio::io::copy_bidirectional(&mut client.stream, &mut backend.stream).await;
    Ok(())
}
