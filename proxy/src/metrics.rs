//! Prometheus metrics. Handles are registered once, up front, so the per-command cost is a
//! few atomic adds rather than a label lookup.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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
    commands: Vec<Counter>,
    latency: Vec<Histogram>,
    errors: Vec<Counter>,
    /// Index into `commands`/`latency` for each command byte.
    slot: [u8; 256],
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0,
];

/// How often queued histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The process-wide recorder: installed once, shared by every proxy in the process (tests run
/// several).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .expect("buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (e.g. by an embedding application);
        // our handle then renders only what was recorded through ours, which is nothing.
        let _ = metrics::set_global_recorder(recorder);
        // Histogram samples queue up until they are folded into the buckets, which
        // otherwise happens only when /metrics is scraped: without this, a proxy nobody
        // scrapes would grow by 8 bytes per command.
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the metrics upkeep thread; histograms grow until /metrics is scraped");
        }
        handle
    })
}

impl Metrics {
    pub fn new() -> Self {
        prometheus();
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
