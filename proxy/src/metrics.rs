//! Prometheus metrics. Handles are registered once, up front, so the per-command cost is a
//! few atomic adds rather than a label lookup.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::protocol::Command;

/// Why a session ended badly, as the `kind` label of `ferrata_proxy_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client broke the protocol (malformed or oversized packet, bad handshake).
    ClientProtocol,
    /// The backend could not be reached or went away.
    Backend,
    /// The backend sent something the proxy could not follow.
    BackendProtocol,
    /// The client did not finish the handshake in time.
    HandshakeTimeout,
    /// TLS setup with the client or the backend failed.
    Tls,
}

impl ErrorKind {
    const ALL: [ErrorKind; 5] = [
        ErrorKind::ClientProtocol,
        ErrorKind::Backend,
        ErrorKind::BackendProtocol,
        ErrorKind::HandshakeTimeout,
        ErrorKind::Tls,
    ];

    fn label(self) -> &'static str {
        match self {
            ErrorKind::ClientProtocol => "client_protocol",
            ErrorKind::Backend => "backend",
            ErrorKind::BackendProtocol => "backend_protocol",
            ErrorKind::HandshakeTimeout => "handshake_timeout",
            ErrorKind::Tls => "tls",
        }
    }
}

pub struct Metrics {
    pub connections_accepted: Counter,
    pub connections_rejected: Counter,
    pub connections_active: Gauge,
    pub client_bytes_in: Counter,
    pub client_bytes_out: Counter,
    pub backend_bytes_in: Counter,
    pub backend_bytes_out: Counter,
    /// Writes to a backend that follow a wait for its answer: the client's commands relayed
    /// and the proxy's own statements, several pipelined counting once.
    pub backend_round_trips: Counter,
    commands: Vec<Counter>,
    latency: Vec<Histogram>,
    errors: Vec<Counter>,
    /// Writes outside global transactions, by the route the no-dirty-writes check took.
    pub writes_observed: Counter,
    pub writes_unchecked: Counter,
    pub writes_checked: Counter,
    pub writes_refused: Counter,
    /// Row checks against the coordinator's locks, by outcome.
    pub checks_free: Counter,
    pub checks_held: Counter,
    pub checks_unreachable: Counter,
    /// Transactions rolled back because a table they wrote became guarded meanwhile.
    pub checks_poisoned: Counter,
    /// Index into `commands`/`latency` for each command byte.
    slot: [u8; 256],
}

impl Metrics {
    pub fn new() -> Self {
        ferrata_rpc::process::prometheus();
        let mut slot = [0u8; 256];
        for (byte, s) in slot.iter_mut().enumerate() {
            let name = Command::name(byte as u8);
            *s = Command::NAMES
                .iter()
                .position(|n| *n == name)
                .expect("every name is listed") as u8;
        }
        Metrics {
            connections_accepted: counter!("ferrata_proxy_connections_total"),
            connections_rejected: counter!("ferrata_proxy_connections_rejected_total"),
            connections_active: gauge!("ferrata_proxy_connections_active"),
            client_bytes_in: counter!("ferrata_proxy_bytes_total", "direction" => "from_client"),
            client_bytes_out: counter!("ferrata_proxy_bytes_total", "direction" => "to_client"),
            backend_bytes_in: counter!("ferrata_proxy_bytes_total", "direction" => "from_backend"),
            backend_bytes_out: counter!("ferrata_proxy_bytes_total", "direction" => "to_backend"),
            backend_round_trips: counter!("ferrata_proxy_backend_round_trips_total"),
            commands: Command::NAMES
                .iter()
                .map(|name| counter!("ferrata_proxy_commands_total", "command" => *name))
                .collect(),
            latency: Command::NAMES
                .iter()
                .map(|name| histogram!("ferrata_proxy_command_duration_seconds", "command" => *name))
                .collect(),
            errors: ErrorKind::ALL
                .iter()
                .map(|kind| counter!("ferrata_proxy_errors_total", "kind" => kind.label()))
                .collect(),
            writes_observed: counter!("ferrata_proxy_unbound_writes_total", "route" => "observe"),
            writes_unchecked: counter!("ferrata_proxy_unbound_writes_total", "route" => "unchecked"),
            writes_checked: counter!("ferrata_proxy_unbound_writes_total", "route" => "check"),
            writes_refused: counter!("ferrata_proxy_unbound_writes_total", "route" => "refuse"),
            checks_free: counter!("ferrata_proxy_dirty_write_checks_total", "outcome" => "free"),
            checks_held: counter!("ferrata_proxy_dirty_write_checks_total", "outcome" => "held"),
            checks_unreachable: counter!("ferrata_proxy_dirty_write_checks_total", "outcome" => "unreachable"),
            checks_poisoned: counter!("ferrata_proxy_dirty_write_checks_total", "outcome" => "poisoned"),
            slot,
        }
    }

    /// Records one command and how long its response took.
    pub fn command(&self, command: u8, elapsed: Duration) {
        let slot = usize::from(self.slot[usize::from(command)]);
        self.commands[slot].increment(1);
        self.latency[slot].record(elapsed.as_secs_f64());
    }

    pub fn error(&self, kind: ErrorKind) {
        let index = ErrorKind::ALL.iter().position(|k| *k == kind).expect("listed");
        self.errors[index].increment(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
