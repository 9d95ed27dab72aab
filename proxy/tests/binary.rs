//! The `ferrata-proxy` binary as operators run it: a TOML config file plus flags that override
//! it, serving clients, `/healthz` on the admin listener, a prompt clean exit on SIGTERM, and
//! clear errors with a non-zero exit for bad configuration.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb, free_port};
use mysql_async::prelude::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_ferrata-proxy");
/// Generous bound for things that should be prompt.
const DEADLINE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn serves_with_file_and_flags_and_exits_cleanly_on_sigterm() -> Result<()> {
    let db = MariaDb::start().await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("proxy.toml");
    // The file's backend is wrong on purpose (the flag overrides it); its connection limit
    // is used as it is.
    std::fs::write(&config, "backend = \"127.0.0.1:1\"\nmax_connections = 1\n")?;
    let listen = loopback(free_port()?);
    let admin = loopback(free_port()?);

    let mut proxy = Command::new(BINARY)
        .arg("--config")
        .arg(&config)
        .args(["--listen", &listen.to_string()])
        .args(["--backend", &db.addr().to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting ferrata-proxy")?;
    let mut log = BufReader::new(proxy.stderr.take().context("stderr")?).lines();
    within(async {
        while let Some(line) = log.next_line().await? {
            if line.contains("ferrata-proxy ready") {
                return Ok(());
            }
        }
        bail!("ferrata-proxy exited before it was ready")
    })
    .await??;
    // Keep reading the log so the proxy never blocks on a full pipe.
    let log = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = log.next_line().await {
            rest.push(line);
        }
        rest
    });

    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(listen.ip().to_string())
        .tcp_port(listen.port())
        .prefer_socket(false)
        .user(Some(APP_USER))
        .pass(Some(APP_PASSWORD));
    let mut conn = mysql_async::Conn::new(opts.clone()).await?;
    let port: Option<u16> = conn.query_first("SELECT @@port").await?;
    assert_eq!(port, Some(db.port()), "the --backend flag wins over the file");
    match mysql_async::Conn::new(opts).await {
        Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1040, "{e}"),
        other => panic!("max_connections = 1 from the file should refuse a second client: {other:?}"),
    }
    assert_eq!(http_get(admin, "/healthz").await?, "HTTP/1.1 200 OK");
    conn.disconnect().await?;

    let pid = proxy.id().context("running")?.to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await?;
    ensure!(killed.success(), "kill -TERM {pid} failed");
    let status = within(proxy.wait()).await??;
    let log = log.await?;
    assert!(status.success(), "exit status {status}; log:\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("SIGTERM received")), "{log:?}");
    Ok(())
}

#[tokio::test]
async fn bad_configuration_fails_with_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // (file contents, or None for a missing file; what stderr must say)
    let cases = [
        (Some("listne = \"127.0.0.1:3307\"\n"), "unknown field `listne`"),
        (Some("max_connections = 0\n"), "max_connections must be at least 1"),
        (Some("max_connections = \"many\"\n"), "invalid type"),
        (None, "reading config file"),
    ];
    for (n, (contents, expected)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("case-{n}.toml"));
        if let Some(contents) = contents {
            std::fs::write(&path, contents)?;
        }
        let output = run_with_config(&path).await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{contents:?} must be refused");
        assert!(stderr.contains(expected), "{contents:?}: {expected:?} not in {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "the error names the file: {stderr}"
        );
    }
    Ok(())
}

// ---- helpers ----

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn within<T>(future: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(DEADLINE, future).await.context("timed out")
}

/// Runs the binary with only `--config`; it must exit on its own.
async fn run_with_config(path: &Path) -> Result<std::process::Output> {
    let run = Command::new(BINARY)
        .arg("--config")
        .arg(path)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    Ok(within(run).await??)
}

/// The status line of a GET.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    within(tcp.read_to_string(&mut response)).await??;
    Ok(response.lines().next().unwrap_or_default().to_owned())
}
