//! One client session: a task that owns the client socket and its own backend connection.
//!
//! After the connection phase ([`connect`]), the session reads one command at a time from
//! the client, forwards its bytes unchanged, and streams the response back ([`relay`]),
//! keeping [`state::SessionState`] current from what passes. Commands the client pipelines
//! wait in the client buffer until the previous response has ended.

mod at;
mod auth;
mod connect;
mod dirty_writes;
mod global;
mod hide_socket;
mod inject;
mod locking_read;
mod multi_statement;
mod multi_table;
mod peer;
mod relay;
pub mod state;
mod upsert;

use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::select;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::classify::{self, Other, StatementClass, TxControl};
use crate::config::Config;
use crate::metrics::{ErrorKind, Metrics};
use crate::protocol::Command;
use crate::protocol::err::ErrPacket;
use crate::protocol::handshake;
use crate::protocol::response::{ResponseKind, ResponseTracker};
use dirty_writes::Route;
use peer::{Peer, ReadError};
use state::{PreparedStatement, SessionState};

/// What every session shares: settings, TLS material, metrics, the shutdown signal.
pub struct Shared {
    pub config: Config,
    /// The coordinator link, when one is configured.
    pub global: Option<Arc<crate::global::Global>>,
    pub tls_acceptor: Option<TlsAcceptor>,
    pub backend_tls: Option<(TlsConnector, ServerName<'static>)>,
    pub metrics: Metrics,
    /// Cancelled when the proxy stops accepting: idle sessions close, busy ones finish
    /// their command first.
    pub shutdown: CancellationToken,
}

/// Why a session ended early. Each variant knows what (if anything) the client is told.
#[derive(Debug)]
pub enum SessionError {
    /// The client went away or stopped mid-packet: nothing to tell anyone.
    ClientClosed,
    /// The client broke the protocol: it gets this ERR packet (with this sequence id).
    Client {
        reply: ErrPacket,
        seq: u8,
    },
    /// The backend could not be reached or went away. With no `seq`, the client gets the
    /// ERR in place of the greeting.
    Backend {
        reply: ErrPacket,
        seq: Option<u8>,
    },
    /// The backend sent something the proxy cannot follow.
    BackendProtocol {
        cause: String,
        seq: u8,
    },
    /// The backend refused the connection; its ERR was already relayed.
    BackendRefused,
    /// Authentication failed; the backend's ERR was already relayed.
    AuthenticationFailed,
    /// TLS with the client failed: nothing can be said to it any more.
    Tls(String),
    /// TLS to the backend failed: the client, waiting for its login result, is told why.
    BackendTls {
        cause: String,
        seq: u8,
    },
    HandshakeTimeout,
}

impl SessionError {
    pub fn client(reply: ErrPacket, seq: u8) -> Self {
        SessionError::Client { reply, seq }
    }

    pub fn backend_lost(cause: &str, last_seq: u8) -> Self {
        SessionError::Backend {
            reply: ErrPacket::backend_lost(cause),
            seq: Some(last_seq.wrapping_add(1)),
        }
    }

    pub fn unreachable(backend: &str, cause: &str) -> Self {
        SessionError::Backend {
            reply: ErrPacket::backend_unreachable(backend, cause),
            seq: None,
        }
    }

    pub fn backend_protocol(cause: &str, last_seq: u8) -> Self {
        SessionError::BackendProtocol {
            cause: cause.to_owned(),
            seq: last_seq.wrapping_add(1),
        }
    }

    pub fn from_backend_read(e: ReadError, last_seq: u8) -> Self {
        match e {
            ReadError::Io(e) => Self::backend_lost(&e.to_string(), last_seq),
            ReadError::Closed { .. } => Self::backend_lost("the server closed the connection", last_seq),
            ReadError::TooLarge { len, limit } => Self::backend_protocol(
                &format!("a {len}-byte packet where at most {limit} were expected"),
                last_seq,
            ),
        }
    }

    fn metric(&self) -> Option<ErrorKind> {
        match self {
            SessionError::ClientClosed | SessionError::AuthenticationFailed | SessionError::BackendRefused => None,
            SessionError::Client { .. } => Some(ErrorKind::ClientProtocol),
            SessionError::Backend { .. } => Some(ErrorKind::Backend),
            SessionError::BackendProtocol { .. } => Some(ErrorKind::BackendProtocol),
            SessionError::Tls(_) | SessionError::BackendTls { .. } => Some(ErrorKind::Tls),
            SessionError::HandshakeTimeout => Some(ErrorKind::HandshakeTimeout),
        }
    }

    /// Logs the failure and tells the client what it needs to know.
    async fn report(self, shared: &Shared, client: Option<&mut Peer>) {
        if let Some(kind) = self.metric() {
            shared.metrics.error(kind);
        }
        // The client may still be sending (the rest of an oversized packet, more garbage).
        let client_may_be_sending = matches!(self, SessionError::Client { .. });
        let reply = match self {
            SessionError::ClientClosed => {
                tracing::debug!("client closed the connection");
                None
            }
            SessionError::AuthenticationFailed => {
                tracing::info!("authentication failed");
                None
            }
            SessionError::BackendRefused => {
                tracing::warn!("the backend refused the connection");
                None
            }
            SessionError::Client { reply, seq } => {
                tracing::warn!(error = %reply, "closing session after a client protocol error");
                Some(reply.to_packet(seq))
            }
            SessionError::Backend { reply, seq } => {
                tracing::warn!(error = %reply, "backend unavailable");
                Some(match seq {
                    Some(seq) => reply.to_packet(seq),
                    None => reply.to_greeting_packet(),
                })
            }
            SessionError::BackendProtocol { cause, seq } => {
                tracing::error!(%cause, "closing session: the backend's response could not be followed");
                Some(
                    ErrPacket::new(
                        1105,
                        "HY000",
                        format!(
                            "ferrata-proxy could not follow the server's response ({cause}); the session is closed"
                        ),
                    )
                    .to_packet(seq),
                )
            }
            SessionError::Tls(cause) => {
                tracing::warn!(%cause, "TLS failed");
                None
            }
            SessionError::BackendTls { cause, seq } => {
                tracing::error!(%cause, "TLS to the backend failed");
                Some(ErrPacket::backend_tls(&cause).to_packet(seq))
            }
            // The timeout dropped the connection phase, client socket included: nothing to tell.
            SessionError::HandshakeTimeout => {
                tracing::info!("handshake timed out");
                None
            }
        };
        if let (Some(reply), Some(client)) = (reply, client) {
            let _ = client.write_all(&reply).await;
            if client_may_be_sending {
                client.linger_close().await;
            }
        }
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
        };
        let started = Instant::now();
        let payload = client.payload(&span);
        let Some(&command) = payload.first() else {
            return Err(SessionError::client(
                ErrPacket::malformed("an empty command packet"),
                span.last_seq.wrapping_add(1),
            ));
        };
        let class = matches!(command, Command::QUERY | Command::STMT_PREPARE)
            .then(|| classify::classify(&payload[1..], state.no_backslash_escapes()));
        if shared.global.is_some() {
            state.note_statement_command(command, &payload, shared.config.max_packet_size);
        }
        if let Some(intercepted) = intercept(command, &payload, class.as_ref(), state) {
            drop(payload);
            let raw = client.buf[..span.raw_len].to_vec();
            client.consume(span.raw_len);
            let sql = || String::from_utf8_lossy(&raw[5..]).into_owned();
            match (intercepted, &shared.global) {
                (Intercepted::Answer, _) => global::answer(client, backend, state, shared, &sql()).await?,
                (Intercepted::Refuse(e), _) => {
                    tracing::info!(error = %e, "statement refused");
                    reply(client, e).await?;
                }
                (Intercepted::Protect(xid), Some(g)) => {
                    protect(client, backend, state, shared, g, &xid, command, &raw).await?
                }
                (Intercepted::Commit, Some(g)) => at::commit(client, backend, state, shared, g, &sql()).await?,
                (Intercepted::Isolate(xid), Some(g)) => {
                    locking_read::run(client, backend, state, shared, g, &xid, command, &raw).await?
                }
                (Intercepted::MultiStatement(xid), Some(g)) => {
                    multi_statement::run(client, backend, state, shared, g, &xid, &sql()).await?
                }
                (
                    Intercepted::Protect(_)
                    | Intercepted::Commit
                    | Intercepted::Isolate(_)
                    | Intercepted::MultiStatement(_),
                    None,
                ) => {
                    unreachable!("only a coordinator binds sessions")
                }
            }
            executed(command, &raw[4..], state);
            shared.metrics.command(command, started.elapsed());
            continue;
        }
        // Outside global transactions: the no-dirty-writes check (`dirty_writes.rs`).
        let mut observed = None;
        if let Some(g) = shared
            .global
            .as_deref()
            .filter(|g| state.xid.is_none() && g.dirty_writes.any())
        {
            let mut route = dirty_writes::route(command, &payload, class.as_ref(), state, g);
            if let Some(Route::CommitPoint) = route {
                if let Some(e) = dirty_writes::before_commit(backend, state, shared, g).await? {
                    drop(payload);
                    client.consume(span.raw_len);
                    reply(client, e).await?;
                    shared.metrics.command(command, started.elapsed());
                    continue;
                }
                // Checked: a write among what follows takes its own route.
                route = dirty_writes::route(command, &payload, class.as_ref(), state, g);
            }
            match route {
                Some(Route::Run(write)) => {
                    drop(payload);
                    let raw = client.buf[..span.raw_len].to_vec();
                    client.consume(span.raw_len);
                    dirty_writes::run(client, backend, state, shared, g, write, command, &raw).await?;
                    executed(command, &raw[4..], state);
                    shared.metrics.command(command, started.elapsed());
                    continue;
                }
                Some(Route::Observe(seen)) => {
                    shared.metrics.writes_observed.increment(1);
                    // The text is looked at again only if the view changes meanwhile.
                    let head = if command == Command::QUERY { payload.len() } else { 5 };
                    observed = Some((seen, payload[..head.min(payload.len())].to_vec()));
                }
                Some(Route::CommitPoint) | None => {}
            }
        }
        if matches!(
            class.as_ref().map(|c| c.class),
            Some(StatementClass::TransactionControl(TxControl::Rollback))
        ) {
            // The local transaction's work is undone: nothing to register.
            state.branch = None;
        }
        let ddl = matches!(class.as_ref().map(|c| c.class), Some(StatementClass::Other(Other::Ddl)));
        let kind = ResponseKind::of(command);
        let mut tracker = ResponseTracker::new(kind, state.capabilities, span.last_seq);
        let pending = Pending::from_command(command, &payload, class, state, shared.config.hide_server_socket);
        drop(payload);
        client
            .forward(span.raw_len, backend)
            .await
            .map_err(|e| SessionError::backend_lost(&e.to_string(), span.last_seq))?;
        match kind {
            ResponseKind::None if command == Command::QUIT => return Ok(()),
            ResponseKind::None => {}
            ResponseKind::Authentication => {
                state.status = auth::relay(client, backend, 0).await?;
            }
            ResponseKind::Stream => return stream_forever(client, backend).await,
            _ if pending.hide_socket => hide_socket::response(client, backend, &mut tracker).await?,
            _ => relay::response(client, backend, &mut tracker).await?,
        }
        pending.apply(state, &tracker);
        if let (Some((seen, payload)), Some(g)) = (observed, &shared.global) {
            dirty_writes::after_observed(command, &payload, state, g, seen);
        }
        if let (true, Some(g)) = (ddl, &shared.global) {
            // Table shapes may have changed; the next image reads them again.
            g.metadata.invalidate(None, None);
        }
        shared.metrics.command(command, started.elapsed());
    }
}

/// Answers the client's command with `e` (sequence id 1).
async fn reply(client: &mut Peer, e: ErrPacket) -> Result<(), SessionError> {
    client
        .write_all(&e.to_packet(1))
        .await
        .map_err(|_| SessionError::ClientClosed)
}

/// Hands a DML command of a bound session to `at::protect`: a text query, or an execute with
/// its parameters read from the packet.
#[allow(clippy::too_many_arguments)]
async fn protect(
    client: &mut Peer,
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    global: &crate::global::Global,
    xid: &str,
    command: u8,
    raw: &[u8],
) -> Result<(), SessionError> {
    let payload = &raw[4..];
    if command == Command::QUERY {
        let sql = String::from_utf8_lossy(&payload[1..]).into_owned();
        return at::protect(client, backend, state, shared, global, xid, &sql, &[], raw).await;
    }
    let id = u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
    let Some(stmt) = state.statements.get(&id) else {
        return Ok(());
    };
    let sql = stmt.sql.clone();
    let Some(params) = stmt.bound_params(payload) else {
        let e = global::unreadable_params(xid);
        return client
            .write_all(&e.to_packet(1))
            .await
            .map_err(|_| SessionError::ClientClosed);
    };
    at::protect(client, backend, state, shared, global, xid, &sql, &params, raw).await
}

/// A command the proxy handles itself instead of forwarding it as it is.
enum Intercepted {
    /// One of Ferrata's statements.
    Answer,
    /// A statement the proxy cannot protect inside the session's global transaction.
    Refuse(ErrPacket),
    /// An UPDATE, DELETE or INSERT inside this global transaction: imaged (`at.rs`).
    Protect(String),
    /// The COMMIT of a local transaction with a pending branch.
    Commit,
    /// A locking read inside this global transaction: checked against global locks
    /// (`locking_read.rs`).
    Isolate(String),
    /// A multi-statement string inside this global transaction (`multi_statement.rs`).
    MultiStatement(String),
}

fn intercept(
    command: u8,
    payload: &[u8],
    class: Option<&classify::Classification>,
    state: &SessionState,
) -> Option<Intercepted> {
    match (command, class) {
        (Command::QUERY, Some(class)) => {
            if let StatementClass::GlobalTransaction(_) = class.class {
                return Some(Intercepted::Answer);
            }
            if state.branch.is_some() {
                match class.class {
                    StatementClass::TransactionControl(TxControl::Commit) => return Some(Intercepted::Commit),
                    // These commit the local transaction implicitly, bypassing the branch.
                    StatementClass::TransactionControl(TxControl::Begin | TxControl::SetAutocommit) => {
                        return Some(Intercepted::Refuse(global::implicit_commit(
                            state.xid.as_deref().unwrap_or_default(),
                        )));
                    }
                    _ => {}
                }
            }
            let xid = state.xid.clone().or_else(|| global::hinted_xid(&payload[1..], class))?;
            if class.multi_statement && multi_statement::handles(state) {
                return Some(Intercepted::MultiStatement(xid));
            }
            if class.class == StatementClass::LockingRead && !class.multi_statement {
                return Some(Intercepted::Isolate(xid));
            }
            if !class.multi_statement
                && matches!(
                    class.class,
                    StatementClass::Dml(
                        classify::Dml::Update | classify::Dml::Delete | classify::Dml::Insert | classify::Dml::Replace
                    )
                )
            {
                return Some(Intercepted::Protect(xid));
            }
            global::refusal(class, &xid).map(Intercepted::Refuse)
        }
        (Command::STMT_EXECUTE, _) if payload.len() >= 5 => {
            let id = u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
            let statement = state.statements.get(&id)?;
            // A prepared COMMIT (or BEGIN, SET autocommit) would commit protected writes
            // without registering them.
            if state.branch.is_some()
                && matches!(
                    statement.class.class,
                    StatementClass::TransactionControl(TxControl::Commit | TxControl::Begin | TxControl::SetAutocommit)
                )
            {
                return Some(Intercepted::Refuse(global::implicit_commit(
                    state.xid.as_deref().unwrap_or_default(),
                )));
            }
            let protectable = !statement.class.multi_statement
                && matches!(
                    statement.class.class,
                    StatementClass::Dml(
                        classify::Dml::Update | classify::Dml::Delete | classify::Dml::Insert | classify::Dml::Replace
                    )
                );
            if protectable
                && let Some(xid) = state
                    .xid
                    .clone()
                    .or_else(|| global::hinted_xid(statement.sql.as_bytes(), &statement.class))
            {
                if statement.long_data_dropped {
                    return Some(Intercepted::Refuse(global::long_data(&xid)));
                }
                return Some(Intercepted::Protect(xid));
            }
            let xid = state
                .xid
                .clone()
                .or_else(|| global::hinted_xid(statement.sql.as_bytes(), &statement.class))?;
            if statement.class.class == StatementClass::LockingRead && !statement.class.multi_statement {
                return Some(Intercepted::Isolate(xid));
            }
            global::refusal(&statement.class, &xid).map(Intercepted::Refuse)
        }
        _ => None,
    }
}

/// What a command will change in the session state once its response is known.
struct Pending {
    command: u8,
    /// For COM_STMT_PREPARE: the statement text and its class.
    prepare: Option<(String, classify::Classification)>,
    /// For COM_INIT_DB, USE and COM_CHANGE_USER: the schema switched to.
    schema: Option<String>,
    /// For COM_STMT_CLOSE: the statement dropped.
    close: Option<u32>,
    /// For COM_STMT_EXECUTE: the statement executed.
    executed: Option<u32>,
    /// SAVEPOINT, ROLLBACK TO SAVEPOINT, RELEASE SAVEPOINT: which, and the savepoint.
    savepoint: Option<(TxControl, String)>,
    hide_socket: bool,
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
            schema: None,
            close: None,
            executed: None,
            savepoint: None,
            hide_socket: false,
        };
        match command {
            Command::QUERY => {
                let Some(class) = class else { return pending };
                match class.class {
                    StatementClass::Other(Other::Use) => pending.schema = classify::use_schema(body),
                    StatementClass::TransactionControl(
                        kind @ (TxControl::Savepoint | TxControl::RollbackToSavepoint | TxControl::ReleaseSavepoint),
                    ) => pending.savepoint = classify::savepoint_name(body).map(|name| (kind, name)),
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
            Command::STMT_CLOSE if body.len() >= 4 => {
                pending.close = Some(u32::from_le_bytes([body[0], body[1], body[2], body[3]]));
            }
            Command::STMT_EXECUTE if body.len() >= 4 => {
                pending.executed = Some(u32::from_le_bytes([body[0], body[1], body[2], body[3]]));
            }
            _ => {}
        }
        pending
    }

    fn apply(self, state: &mut SessionState, tracker: &ResponseTracker) {
        if let Some(status) = tracker.last_status() {
            state.status = status;
        }
        // The local transaction ended (committed after its check, or rolled back).
        if !state.in_transaction() {
            if !state.written.is_empty() {
                state.written.clear();
            }
            state.savepoints.clear();
        }
        if let (Some((kind, name)), true) = (self.savepoint, tracker.error_code().is_none()) {
            apply_savepoint(state, kind, name);
        }
        if let Some(id) = self.close {
            state.statements.remove(&id);
        }
        if let Some(stmt) = self.executed.and_then(|id| state.statements.get_mut(&id)) {
            stmt.forget_long_data();
        }
        let ok = tracker.error_code().is_none();
        match self.command {
            // A new user or a reset session starts outside any global transaction.
            // The server rolled the local transaction back, pending writes included.
            Command::CHANGE_USER => {
                state.forget_statements();
                state.schema = self.schema;
                state.xid = None;
                state.branch = None;
            }
            Command::RESET_CONNECTION if ok => {
                state.forget_statements();
                state.xid = None;
                state.branch = None;
            }
            Command::STMT_PREPARE => {
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
        && let Some(id) = payload.get(1..5).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        && let Some(stmt) = state.statements.get_mut(&id)
    {
        stmt.forget_long_data();
    }
}

/// Keeps the savepoints in step with the server. Rolling back to one discards the undo items
/// made after it (their writes are undone in the database); the savepoint itself stays.
fn apply_savepoint(state: &mut SessionState, kind: TxControl, name: String) {
    let position = state.savepoints.iter().position(|(n, _)| *n == name);
    match (kind, position) {
        (TxControl::Savepoint, _) => {
            // Setting a name again moves it.
            if let Some(p) = position {
                state.savepoints.remove(p);
            }
            let items = state.branch.as_ref().map_or(0, |b| b.items.len());
            state.savepoints.push((name, items));
        }
        (TxControl::RollbackToSavepoint, Some(p)) => {
            let items = state.savepoints[p].1;
            state.savepoints.truncate(p + 1);
            if let Some(branch) = &mut state.branch {
                branch.items.truncate(items);
                if branch.items.is_empty() {
                    state.branch = None;
                }
            }
        }
        (TxControl::ReleaseSavepoint, Some(p)) => state.savepoints.truncate(p),
        _ => {}
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
