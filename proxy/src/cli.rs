//! The `ferrata-proxy` command line: flags and config file, logging, signals, and the runtime.
//! `main.rs` is only a call to [`main`], so test harnesses can build the same program.

use crate::Server;
use crate::config::{Flags, LogFormat};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Runs the proxy as the `ferrata-proxy` binary does.
pub fn main() -> anyhow::Result<()> {
    let config = Flags::parse().into_config()?;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime.enable_all().build()?.block_on(async {
        let server = Server::bind(config).await?;
        let stop = CancellationToken::new();
        tokio::spawn(stop_on_signal(stop.clone()));
        server.run(stop).await
    })
}

/// Cancels `stop` at the first SIGTERM or SIGINT.
async fn stop_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the proxy with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    stop.cancel();
}
