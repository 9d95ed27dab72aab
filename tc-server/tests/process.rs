//! The `ferrata-tc` process itself: graceful shutdown on SIGTERM, refusing bad
//! configuration with a message that names the problem, `--help`, log formats, and one
//! coordinator per data directory.

mod support;

use std::process::Stdio;
use std::time::Duration;

use ferrata_rpc::{ErrorCode, pb};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

use pb::GlobalStatus as G;

/// Runs the binary to completion (it must exit by itself); returns whether it succeeded and
/// its stdout and stderr.
async fn run(args: &[&str], envs: &[(&str, &str)]) -> Result<(std::process::ExitStatus, String, String)> {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("FERRATA_TC_TOKEN")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(EVENT, cmd.output()).await??;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs the binary with a config file holding `toml` and ports that are free; returns its
/// failure message.
async fn refused_config(toml: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tc.toml");
    std::fs::write(&path, toml)?;
    let data = dir.path().join("data");
    let (status, _, stderr) = run(
        &[
            "--config",
            path.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ],
        &[],
    )
    .await?;
    anyhow::ensure!(!status.success(), "started with {toml:?}: {stderr}");
    Ok(stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_the_state_survives() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let mut rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = begin(&c, 600_000).await?;
    let b = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let http = tc.http();
    assert_eq!(http.get("/healthz").await?.status, 200);

    let status = tc.sigterm(EVENT).await?;
    assert!(status.success(), "exit status {status:?}; log:\n{}", tc.logs_text());
    let logs = tc.logs_text();
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("ferrata-tc stopped"), "{logs}");
    // The resource manager's stream was ended by the coordinator.
    let closed = rm.closed().await.expect_err("the stream ends with an error");
    let status = closed.downcast_ref::<tonic::Status>().expect("a gRPC status");
    assert_code(status, ErrorCode::ShuttingDown);
    // Nothing answers any more.
    match http.get("/healthz").await {
        Err(_) => {}
        Ok(r) => assert_eq!(r.status, 503, "{r:?}"),
    }

    tc.restart().await?;
    let c = tc.client().await?;
    let v = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["status"], "Begin", "{v}");
    assert_eq!(v["branches"][0]["branch_id"], b, "{v}");
    let other = begin(&c, 0).await?;
    let e = register(&c, &other, "db1", t_rows(&["1"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_in_flight_requests_at_most_shutdown_timeout_ms() -> Result {
    let mut tc = Tc::with_config(&format!("shutdown_timeout_ms = 500\n{FAST_CONFIG}")).await?;
    let c = tc.client().await?;
    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?;
    register(&c, &t1, "db1", t_rows(&["1"]), 0).await?;
    let waiting = tokio::spawn({
        let c = c.clone();
        let t2 = t2.clone();
        async move { register(&c, &t2, "db1", t_rows(&["1"]), 60_000).await }
    });
    wait_queue(&tc.http(), "1", &t1, &[&t2]).await?;

    let started = std::time::Instant::now();
    let status = tc.sigterm(EVENT).await?;
    assert!(status.success(), "exit status {status:?}; log:\n{}", tc.logs_text());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the 60 s lock wait did not hold the shutdown up"
    );
    let r = tokio::time::timeout(EVENT, waiting).await??;
    assert!(r.is_err(), "the waiting request was not granted: {r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_with_a_message_naming_it() -> Result {
    let e = refused_config("[phase2]\nretry_intial_ms = 5\n").await?;
    assert!(e.contains("retry_intial_ms"), "{e}");
    let e = refused_config("nodeid = 3\n").await?;
    assert!(e.contains("nodeid"), "{e}");
    let e = refused_config("[transactionz]\n").await?;
    assert!(e.contains("transactionz"), "{e}");
    let e = refused_config("[phase2]\nretry_initial_ms = 0\n").await?;
    assert!(e.contains("retry_initial_ms"), "{e}");
    let e = refused_config("[transactions]\ndefault_timeout_ms = 5000\nmax_timeout_ms = 1000\n").await?;
    assert!(e.contains("max_timeout_ms"), "{e}");
    let e = refused_config("node_id = \"one\"\n").await?;
    assert!(e.contains("node_id"), "{e}");
    let e = refused_config("token = \"has space\"\n").await?;
    assert!(e.contains("token") && !e.contains("has space"), "{e}");

    let (status, _, e) = run(&["--config", "/nonexistent/ferrata-tc.toml"], &[]).await?;
    assert!(!status.success());
    assert!(e.contains("/nonexistent/ferrata-tc.toml"), "{e}");
    let (status, _, e) = run(&["--log-format", "xml"], &[]).await?;
    assert!(!status.success());
    assert!(e.contains("xml"), "{e}");
    let (status, _, e) = run(&["--tls-cert", "/tmp/cert.pem"], &[]).await?;
    assert!(!status.success());
    assert!(e.contains("--tls-key"), "{e}");
    let (status, _, e) = run(&["--node-id", "70000"], &[]).await?;
    assert!(!status.success());
    assert!(e.contains("70000"), "{e}");

    // A certificate that is not one.
    let dir = tempfile::tempdir()?;
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate")?;
    let data = dir.path().join("data");
    let (status, _, e) = run(
        &[
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--tls-cert",
            junk.to_str().expect("utf-8"),
            "--tls-key",
            junk.to_str().expect("utf-8"),
        ],
        &[],
    )
    .await?;
    assert!(!status.success());
    assert!(e.contains("junk.pem"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_or_a_data_dir_in_use_is_refused() -> Result {
    let tc = Tc::start(TcOptions::default()).await?;
    let busy = tc.rpc.to_string();
    let dir = tempfile::tempdir()?;
    let (status, _, e) = run(
        &[
            "--listen",
            &busy,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().expect("utf-8"),
        ],
        &[],
    )
    .await?;
    assert!(!status.success());
    assert!(e.contains(&busy), "{e}");

    // One coordinator per data directory.
    let (status, _, e) = run(
        &[
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            tc.data_dir().to_str().expect("utf-8"),
        ],
        &[],
    )
    .await?;
    assert!(
        !status.success(),
        "a second coordinator started on the same data directory: {e}"
    );
    // The first one is unharmed.
    let c = tc.client().await?;
    begin(&c, 0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_every_flag_and_hides_the_token() -> Result {
    let (status, out, err) = run(&["--help"], &[("FERRATA_TC_TOKEN", "leaky-secret-71")]).await?;
    assert!(status.success(), "{err}");
    for flag in [
        "--config",
        "--listen",
        "--http",
        "--data-dir",
        "--node-id",
        "--token",
        "FERRATA_TC_TOKEN",
        "--tls-cert",
        "--tls-key",
        "--worker-threads",
        "--log-level",
        "--log-format",
    ] {
        assert!(out.contains(flag), "--help does not list {flag}:\n{out}");
    }
    assert!(!out.contains("leaky-secret-71") && !err.contains("leaky-secret-71"));
    let (status, out, _) = run(&["--version"], &[]).await?;
    assert!(status.success());
    assert!(out.contains("ferrata-tc"), "{out}");
    let (status, _, err) = run(&["--no-such-flag"], &[]).await?;
    assert!(!status.success());
    assert!(err.contains("--no-such-flag"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() -> Result {
    let tc = Tc::start(TcOptions {
        args: vec!["--log-format".into(), "json".into()],
        ..TcOptions::config(FAST_CONFIG)
    })
    .await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = begin(&c, 0).await?;
    register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    assert_eq!(status_of(&rollback(&c, &xid).await?), G::Rollbacked);
    tc.wait_log(|l| l.contains("resource manager attached")).await?;
    let logs = tc.logs_text();
    for line in logs.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    // Phase-2 lines carry the XID.
    tc.wait_log(|l| l.contains("rolled back") && l.contains(&xid)).await?;
    Ok(())
}
