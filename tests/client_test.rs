//! The differential check with a public client test program: MariaDB's own
//! `mariadb-client-test` (Debian's `mariadb-test`), every one of its tests run once directly
//! and once through ferrata-proxy (with a coordinator, so the no-dirty-writes path is live),
//! each against its own fresh server. A test that passes directly must pass through the
//! proxy; the only exceptions are listed, with why.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb};
use ferrata_tests::process::ProxyProcess;
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");
const PROGRAM: &str = "mariadb-client-test";
const DATABASE: &str = "client_test_db";

/// Tests that pass directly and fail through the proxy, each with the reason.
const EXPECTED_DIFFERENCES: &[&str] = &[];

/// Every test the program knows.
fn test_names() -> Result<Vec<String>> {
    let out = std::process::Command::new(PROGRAM)
        .arg("--show-tests")
        .output()
        .with_context(|| format!("running {PROGRAM} (Debian's mariadb-test; scripts/setup-debian.sh installs it)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("All possible test names"))
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(
        names.len() > 100,
        "{PROGRAM} listed only {} tests:\n{text}",
        names.len()
    );
    Ok(names)
}

/// The tests that pass against `addr`, each run on its own.
async fn passing(addr: SocketAddr, names: &[String]) -> Result<BTreeSet<String>> {
    let mut passed = BTreeSet::new();
    for name in names {
        let run = tokio::process::Command::new(PROGRAM)
            .args(["--host", &addr.ip().to_string(), "--port", &addr.port().to_string()])
            .args(["--user", APP_USER, &format!("--password={APP_PASSWORD}")])
            .args(["--database", DATABASE, "--do-not-drop-database", "--silent", name])
            .stdin(std::process::Stdio::null())
            .output();
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .with_context(|| format!("{name} against {addr} did not finish within 60 s"))??;
        if out.status.success() {
            passed.insert(name.clone());
        }
    }
    Ok(passed)
}

async fn server() -> Result<MariaDb> {
    let db = MariaDb::start().await?;
    db.conn()
        .await?
        .query_drop(format!("CREATE DATABASE {DATABASE}"))
        .await?;
    Ok(db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_client_test_passes_through_the_proxy_as_directly() -> Result<()> {
    let names = test_names()?;
    let direct_db = server().await?;
    let proxied_db = server().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = ProxyProcess::start(PROXY, proxied_db.addr(), &tc.endpoint(), 1000)?;
    let direct = passing(direct_db.addr(), &names).await?;
    let proxied = passing(proxy.addr, &names).await?;
    eprintln!(
        "{PROGRAM}: {} tests, {} pass directly, {} through the proxy",
        names.len(),
        direct.len(),
        proxied.len()
    );
    let only_direct: BTreeSet<&str> = direct.difference(&proxied).map(String::as_str).collect();
    let only_proxied: Vec<&String> = proxied.difference(&direct).collect();
    let expected: BTreeSet<&str> = EXPECTED_DIFFERENCES.iter().copied().collect();
    assert!(only_proxied.is_empty(), "pass only through the proxy: {only_proxied:?}");
    assert_eq!(
        only_direct, expected,
        "tests that pass directly and fail through the proxy (run one with `{PROGRAM} --silent <name>` \
         against both to see why); update EXPECTED_DIFFERENCES only with a reason"
    );
    assert!(direct.len() > 250, "too few pass directly to compare: {}", direct.len());
    Ok(())
}
