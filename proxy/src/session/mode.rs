//! The one interface between the command loop and the transaction modes.
//!
//! The loop knows no mode. A proxy registers its modes once (`crate::modes`); each client
//! session opens its own part of every mode ([`Mode::open`]) after login. For every command
//! the loop asks those parts, in registration order, whether one of them claims it
//! ([`ModeSession::claim`]):
//! - [`Claim::Take`]: that mode runs the command itself and answers the client
//!   ([`ModeSession::run`]); the loop forwards nothing;
//! - [`Claim::Gate`]: that mode must do something first ([`ModeSession::gate`], e.g. a check at
//!   a commit point); it either answers the client with an error, or the command is offered
//!   to the modes again;
//! - [`Claim::Pass`] from every mode: the loop forwards the command as sent and relays the
//!   response, then tells every mode how it ended ([`ModeSession::answered`]).
//!
//! A mode keeps what it needs about a session (its pending work, what it decided in `claim`
//! for `run`) in its own part; what all modes share (status flags, schema, prepared
//! statements, the bound XID) is in [`SessionState`]. Modes depend on the session core,
//! never the reverse.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::peer::Peer;
use super::state::SessionState;
use super::{SessionError, Shared};
use crate::classify::Classification;
use crate::protocol::err::ErrPacket;

/// A boxed future: a mode's work for one claimed command.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A command as the loop read it, before anything was forwarded.
pub struct Command<'a> {
    /// The command byte (`protocol::Command`).
    pub code: u8,
    /// The whole payload, command byte included.
    pub payload: &'a [u8],
    /// For COM_QUERY and COM_STMT_PREPARE: what the classifier made of the statement.
    pub class: Option<&'a Classification>,
}

/// A mode's answer to [`ModeSession::claim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Not this mode's business.
    Pass,
    /// This mode runs the command ([`ModeSession::run`]).
    Take,
    /// This mode has something to do before the command may run ([`ModeSession::gate`]).
    Gate,
}

impl Claim {
    /// [`Claim::Take`] if `taken`, else [`Claim::Pass`].
    pub fn take_if(taken: bool) -> Claim {
        if taken { Claim::Take } else { Claim::Pass }
    }
}

/// A transaction mode (or any other interception), registered once per proxy.
pub trait Mode: Send + Sync {
    /// This mode's part of one client session.
    fn open(self: Arc<Self>) -> Box<dyn ModeSession>;

    /// Whether the mode reads the parameters of prepared statements' executes: the loop then
    /// keeps the parameter types and long data each statement was sent.
    fn reads_parameters(&self) -> bool {
        false
    }
}

/// What a claimed command runs with.
pub struct Io<'a> {
    pub client: &'a mut Peer,
    pub backend: &'a mut Peer,
    pub state: &'a mut SessionState,
    pub shared: &'a Shared,
    /// The command byte.
    pub command: u8,
    /// The command packet as the client sent it, header included (already taken off the
    /// client's buffer).
    pub raw: &'a [u8],
}

/// A mode's part of one client session.
pub trait ModeSession: Send {
    /// Looks at a command before it is forwarded. Called for every command the modes
    /// registered before this one passed on, so it must be cheap; what it decides for
    /// [`ModeSession::run`] or [`ModeSession::answered`] it keeps in `self`.
    fn claim(&mut self, command: &Command<'_>, state: &SessionState, shared: &Shared) -> Claim;

    /// Runs a command this mode took, answering the client.
    fn run<'a>(&'a mut self, io: Io<'a>) -> BoxFuture<'a, Result<(), SessionError>>;

    /// Runs what must come before a command this mode gated: `Some(error)` is the client's
    /// answer instead of the command; `None` lets the command be claimed again.
    fn gate<'a>(
        &'a mut self,
        backend: &'a mut Peer,
        state: &'a mut SessionState,
        shared: &'a Shared,
    ) -> BoxFuture<'a, Result<Option<ErrPacket>, SessionError>> {
        let _ = (backend, state, shared);
        Box::pin(async { Ok(None) })
    }

    /// After a command no mode took was forwarded and its response relayed: `state` already
    /// has the response's status flags; `error` is the server's error code, if it failed.
    fn answered(&mut self, state: &SessionState, error: Option<u16>) {
        let _ = (state, error);
    }

    /// Work this mode waits to do on the backend connection between the client's commands
    /// (phase 2 of a branch the connection holds, asked for by the coordinator): a future
    /// that resolves once some arrived; `None` when none can arrive. The loop polls it while
    /// the client is idle and then calls [`ModeSession::woken`].
    fn wake(&mut self) -> Option<BoxFuture<'_, ()>> {
        None
    }

    /// Does the work [`ModeSession::wake`] announced.
    fn woken<'a>(
        &'a mut self,
        backend: &'a mut Peer,
        state: &'a mut SessionState,
        shared: &'a Shared,
    ) -> BoxFuture<'a, Result<(), SessionError>> {
        let _ = (backend, state, shared);
        Box::pin(async { Ok(()) })
    }
}

/// Which mode has work waiting ([`ModeSession::wake`]); never, if none can have any.
pub async fn woken(modes: &mut [Box<dyn ModeSession>]) -> usize {
    let mut waits: Vec<(usize, BoxFuture<'_, ()>)> = modes
        .iter_mut()
        .enumerate()
        .filter_map(|(i, m)| m.wake().map(|f| (i, f)))
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for (i, wait) in &mut waits {
            if wait.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(*i);
            }
        }
        std::task::Poll::Pending
    })
    .await
}
