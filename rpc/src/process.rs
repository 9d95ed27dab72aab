//! What both binaries need around their server: secrets in config that never print, the
//! `[log]` settings and logging setup, the Tokio runtime, stopping on SIGTERM/SIGINT, and the
//! process-wide Prometheus recorder (one per process, however many servers it embeds).

use std::fmt;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// A secret that never appears in logs or debug output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The `[log]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// A tracing filter, e.g. `info` or `ferrata_tc=debug`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Log {
    /// Applies `--log-level` and `--log-format`.
    pub fn apply_flags(&mut self, level: Option<String>, format: Option<String>) -> anyhow::Result<()> {
        if let Some(v) = level {
            self.level = v;
        }
        if let Some(v) = format {
            self.format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => anyhow::bail!("--log-format must be text or json, not {other:?}"),
            };
        }
        Ok(())
    }

    /// Installs the global subscriber: logs to stderr, without colour codes unless stderr
    /// is a terminal.
    pub fn init(&self) -> anyhow::Result<()> {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.level)?;
        let logs = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        match self.format {
            LogFormat::Text => logs.init(),
            LogFormat::Json => logs.json().init(),
        }
        Ok(())
    }
}

/// Runs `serve` on a multi-threaded runtime (`worker_threads` 0: one per CPU), handing it a
/// token cancelled at the first SIGTERM or SIGINT.
pub fn run<F, Fut>(worker_threads: usize, serve: F) -> anyhow::Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        runtime.worker_threads(worker_threads);
    }
    runtime.enable_all().build()?.block_on(async {
        let stop = CancellationToken::new();
        tokio::spawn(stop_on_signal(stop.clone()));
        serve(stop).await
    })
}

/// Cancels `stop` at the first SIGTERM or SIGINT.
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    stop.cancel();
}

/// Latency buckets of every histogram, in seconds.
const BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 10.0,
    30.0, 60.0,
];

/// The process-wide recorder: installed once, shared by every server in the process (tests
/// and the demo run several). A thread folds histogram samples into their buckets every
/// second; otherwise they would pile up until `/metrics` is scraped.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().set_buckets(&BUCKETS).expect("buckets are not empty").build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (e.g. by an embedding application);
        // our handle then renders only what was recorded through ours, which is nothing.
        let _ = metrics::set_global_recorder(recorder);
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                upkeep.run_upkeep();
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the metrics upkeep thread; histograms grow until /metrics is scraped");
        }
        handle
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print_and_log_flags_apply() {
        assert!(!format!("{:?}", Secret("s3cret".into())).contains("s3cret"));
        let mut log = Log::default();
        log.apply_flags(Some("debug".into()), Some("json".into())).unwrap();
        assert_eq!(
            log,
            Log {
                level: "debug".into(),
                format: LogFormat::Json
            }
        );
        assert!(log.apply_flags(None, Some("xml".into())).is_err());
    }
}
