//! The `ferrata` command line against real servers: a DBA goes from "a rollback failed" to a
//! repaired database with commands only (list, show, accept, restore, retry), with the
//! documented exit codes for every refusal; undo records read straight from the database,
//! orphans flagged; tokens and roles; completion scripts.

use std::process::Stdio;

use anyhow::Result;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::dirty::{self, table};
use ferrata_tests::ferrata_testkit::{APP_PASSWORD, APP_USER};
use ferrata_tests::undo_records;
use mysql_async::prelude::*;
use serde_json::{Value, json};

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");
const FERRATA: &str = env!("CARGO_BIN_EXE_ferrata-for-tests");

/// What one run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// Runs `ferrata` with `args` against `tc`, with no terminal on stdin and a clean
/// environment (no config file, no token unless `env` gives one).
async fn ferrata(tc: &Coordinator, args: &[&str], env: &[(&str, &str)]) -> Result<Run> {
    let config_home = tempfile::tempdir()?;
    let mut command = tokio::process::Command::new(FERRATA);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("XDG_CONFIG_HOME", config_home.path())
        .env("FERRATA_SERVER", format!("http://{}", tc.http))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::time::timeout(ferrata_tests::EVENT, command.output()).await??;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Asserts the exit code, showing what was printed if it differs.
#[track_caller]
fn exits(run: &Run, code: i32) {
    assert_eq!(run.code, code, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
}

#[tokio::test]
async fn a_dba_repairs_a_dirty_rollback_with_commands_only() -> Result<()> {
    let (db, tc, proxy) = dirty::servers(TC, PROXY).await?;
    let (xid, _) = dirty::rollback(&db, &proxy, &tc, &[1, 2]).await?;

    // Cron finds it.
    let listed = ferrata(&tc, &["dirty", "list", "-o", "json"], &[]).await?;
    exits(&listed, 0);
    assert_eq!(listed.json()["transactions"][0]["xid"], json!(xid));
    exits(&ferrata(&tc, &["dirty", "list", "--fail-if-any"], &[]).await?, 6);
    let shown = ferrata(&tc, &["dirty", "show", &xid], &[]).await?;
    exits(&shown, 0);
    for expected in [
        "ROW test.t id=1  changed",
        "note",
        "varchar(20)",
        "\"a\"",
        "\"a!\"",
        "\"x1\"",
        "current != after",
    ] {
        assert!(shown.stdout.contains(expected), "{expected:?} in:\n{}", shown.stdout);
    }
    assert!(
        !shown.stdout.contains("id=3"),
        "clean rows only with --all-rows:\n{}",
        shown.stdout
    );

    // Without a terminal and without --yes nothing happens; the dry run is shown.
    let refused = ferrata(
        &tc,
        &["dirty", "accept", &xid, "--row", "id=1", "--reason", "keep it"],
        &[],
    )
    .await?;
    exits(&refused, 2);
    assert!(refused.stderr.contains("would do"), "{}", refused.stderr);
    let dry = ferrata(
        &tc,
        &[
            "dirty",
            "accept",
            &xid,
            "--row",
            "id=1",
            "--reason",
            "keep it",
            "--dry-run",
            "-o",
            "json",
        ],
        &[],
    )
    .await?;
    exits(&dry, 0);
    assert_eq!(dry.json()["dry_run"], true);
    assert_eq!(table(&db).await?[0], (1, "x1".into(), "2.00".into()));
    // A row that is not in the branch, and a missing reason.
    exits(
        &ferrata(
            &tc,
            &["dirty", "accept", &xid, "--row", "id=9", "--reason", "r", "--yes"],
            &[],
        )
        .await?,
        4,
    );
    exits(
        &ferrata(&tc, &["dirty", "accept", &xid, "--row", "id=1", "--yes"], &[]).await?,
        2,
    );

    let accepted = ferrata(
        &tc,
        &[
            "dirty",
            "accept",
            &xid,
            "--row",
            "id=1",
            "--reason",
            "ticket 7: keep the fix",
            "--yes",
            "-o",
            "json",
        ],
        &[],
    )
    .await?;
    exits(&accepted, 0);
    assert_eq!(accepted.json()["remaining_dirty"], 1);
    let restored = ferrata(
        &tc,
        &[
            "dirty",
            "restore",
            &xid,
            "--row",
            "id=2",
            "--reason",
            "ticket 8: undo the mistake",
            "--yes",
        ],
        &[],
    )
    .await?;
    exits(&restored, 0);
    assert_eq!(table(&db).await?[1], (2, "b".into(), "2.00".into()));

    // Acting on a version nobody looked at is refused (exit 3); the retry finishes it.
    exits(
        &ferrata(
            &tc,
            &[
                "txn",
                "retry",
                &xid,
                "--reason",
                "settled",
                "--expect-version",
                "1",
                "--yes",
            ],
            &[],
        )
        .await?,
        3,
    );
    let retried = ferrata(
        &tc,
        &["txn", "retry", &xid, "--reason", "rows settled", "--yes", "-o", "json"],
        &[],
    )
    .await?;
    exits(&retried, 0);
    assert_eq!(retried.json()["status"], "Rollbacked");
    assert_eq!(table(&db).await?[2], (3, "c".into(), "3.00".into()));

    let events = ferrata(&tc, &["txn", "events", &xid], &[]).await?;
    exits(&events, 0);
    assert!(events.stdout.contains("operator_action"), "{}", events.stdout);
    let audit = ferrata(&tc, &["audit", "list", "-o", "json"], &[]).await?;
    let actions: Vec<Value> = audit.json()["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["action"].clone())
        .collect();
    assert_eq!(actions, [json!("dirty.accept"), json!("dirty.restore"), json!("retry")]);
    exits(&ferrata(&tc, &["audit", "verify"], &[]).await?, 0);
    exits(&ferrata(&tc, &["txn", "show", "1-999999999"], &[]).await?, 4);
    exits(&ferrata(&tc, &["lock", "list", "--fail-if-any"], &[]).await?, 0);
    let status = ferrata(&tc, &["status", "-o", "json"], &[]).await?;
    exits(&status, 0);
    assert_eq!(status.json()["health"]["status"], "serving");
    Ok(())
}

#[tokio::test]
async fn undo_records_are_read_from_the_database_and_orphans_flagged() -> Result<()> {
    let (db, tc, proxy) = dirty::servers(TC, PROXY).await?;
    let (xid, branch) = dirty::rollback(&db, &proxy, &tc, &[1]).await?;
    // A record whose transaction no coordinator knows (node 9 never ran).
    db.conn()
        .await?
        .exec_drop(
            "INSERT INTO undo_log (branch_id, xid, context, rollback_info, log_status, log_created, log_modified) \
             SELECT branch_id + 1, '9-1', context, rollback_info, log_status, log_created, log_modified FROM undo_log WHERE xid = ?",
            (&xid,),
        )
        .await?;
    let url = format!("mysql://{APP_USER}@127.0.0.1:{}/test", db.port());
    let password = [("FERRATA_DB_PASSWORD", APP_PASSWORD)];
    let listed = ferrata(&tc, &["undo", "list", "--database", &url, "-o", "json"], &password).await?;
    exits(&listed, 0);
    let records = listed.json()["records"].as_array().cloned().expect("records");
    let by_xid = |x: &str| {
        records
            .iter()
            .find(|r| r["xid"] == x)
            .cloned()
            .unwrap_or_else(|| panic!("{x} in {records:?}"))
    };
    assert_eq!(by_xid(&xid)["coordinator"], "RollbackFailed");
    assert_eq!(
        (&by_xid(&xid)["tables"], &by_xid(&xid)["rows"]),
        (&json!(["test.t"]), &json!(3))
    );
    assert_eq!(by_xid("9-1")["coordinator"], "orphan");

    let shown = ferrata(
        &tc,
        &[
            "undo",
            "show",
            &xid,
            "--database",
            &url,
            "--branch",
            &branch.to_string(),
        ],
        &password,
    )
    .await?;
    exits(&shown, 0);
    for expected in ["ITEM 1: update test.t", "ROW id=1", "decimal(10,2)", "\"a\"", "\"a!\""] {
        assert!(shown.stdout.contains(expected), "{expected:?} in:\n{}", shown.stdout);
    }
    // The password never goes in the URL.
    let with_password = format!("mysql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/test", db.port());
    exits(
        &ferrata(&tc, &["undo", "list", "--database", &with_password], &[]).await?,
        2,
    );
    exits(
        &ferrata(&tc, &["undo", "show", "7-7", "--database", &url], &password).await?,
        4,
    );
    assert_eq!(undo_records(&db).await?, 2, "reading changed nothing");
    Ok(())
}

#[tokio::test]
async fn tokens_and_roles_from_the_command_line() -> Result<()> {
    let tc = Coordinator::start_with(TC, "token = \"root-secret-for-cli\"\n")?;
    let files = tempfile::tempdir()?;
    let token_file = |name: &str, secret: &str| -> Result<String> {
        let path = files.path().join(name);
        std::fs::write(&path, format!("{secret}\n"))?;
        Ok(path.display().to_string())
    };
    let root = token_file("root", "root-secret-for-cli")?;
    let as_root = [("FERRATA_TOKEN_FILE", root.as_str())];
    exits(&ferrata(&tc, &["whoami"], &[]).await?, 5);
    let created = ferrata(
        &tc,
        &[
            "token",
            "create",
            "--name",
            "vera",
            "--role",
            "viewer",
            "--reason",
            "for the test",
        ],
        &as_root,
    )
    .await?;
    exits(&created, 0);
    let viewer = token_file("vera", created.stdout.trim())?;
    let as_viewer = [("FERRATA_TOKEN_FILE", viewer.as_str())];
    let me = ferrata(&tc, &["whoami", "-o", "json"], &as_viewer).await?;
    exits(&me, 0);
    assert_eq!(
        (&me.json()["name"], &me.json()["role"]),
        (&json!("vera"), &json!("viewer"))
    );
    // A viewer may look, not act, and not manage tokens.
    exits(&ferrata(&tc, &["txn", "list"], &as_viewer).await?, 0);
    exits(
        &ferrata(
            &tc,
            &[
                "txn",
                "resolve",
                "1-1",
                "--reason",
                "r",
                "--yes",
                "--expect-version",
                "0",
            ],
            &as_viewer,
        )
        .await?,
        5,
    );
    exits(&ferrata(&tc, &["token", "list"], &as_viewer).await?, 5);
    let listed = ferrata(&tc, &["token", "list", "-o", "json"], &as_root).await?;
    exits(&listed, 0);
    assert_eq!(listed.json()["tokens"][0]["name"], "vera");
    exits(
        &ferrata(&tc, &["token", "revoke", "vera", "--reason", "left"], &as_root).await?,
        0,
    );
    exits(&ferrata(&tc, &["whoami"], &as_viewer).await?, 5);
    // FERRATA_TOKEN works for CI; a token is never a flag value.
    exits(
        &ferrata(&tc, &["whoami"], &[("FERRATA_TOKEN", "root-secret-for-cli")]).await?,
        0,
    );
    exits(
        &ferrata(&tc, &["--token", "root-secret-for-cli", "whoami"], &[]).await?,
        2,
    );
    let completion = ferrata(&tc, &["completion", "bash"], &[]).await?;
    exits(&completion, 0);
    assert!(completion.stdout.contains("ferrata"), "{}", completion.stdout);
    Ok(())
}
