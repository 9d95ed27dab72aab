//! The console tests' fixture (`tests/console/*.test.mjs` start it): MariaDB, a coordinator
//! with a root token, a proxy, two named tokens (an operator and a viewer) and a dirty
//! rollback of table `t` (rows 1 and 2 changed outside). It prints one JSON line:
//! `{"url", "operator_token", "viewer_token", "xid", "branch"}`, then answers commands on
//! stdin, one JSON line each: `table` (the rows of `t`), `audit` (the `ferrata_audit`
//! rows), `undo` (undo records left), `change <id> <note>` (an outside write to a row),
//! `dirty` (another dirty rollback: its XID and branch). It stops when stdin ends.

use std::io::BufRead;

use anyhow::Result;
use ferrata_tests::dirty;
use mysql_async::prelude::*;
use serde_json::json;

const ROOT: &str = "fixture-root-token-0b7c";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let here = std::env::current_exe()?;
    let dir = here.parent().expect("a directory");
    let bin = |name: &str| dir.join(name).display().to_string();
    let (db, tc, proxy) = dirty::servers_secured(
        &bin("ferrata-tc-for-tests"),
        &bin("ferrata-proxy-for-tests"),
        Some(ROOT),
    )
    .await?;
    let token = async |name: &str, role: &str| -> Result<String> {
        let (status, body) = tc
            .post(
                "/v1/tokens",
                &json!({ "name": name, "role": role, "reason": "console test" }),
            )
            .await?;
        anyhow::ensure!(status == 201, "{body}");
        Ok(body["secret"].as_str().unwrap_or_default().to_owned())
    };
    let operator = token("olga", "operator").await?;
    let viewer = token("vic", "viewer").await?;
    let (xid, branch) = dirty::rollback(&db, &proxy, &tc, &[1, 2]).await?;
    println!(
        "{}",
        json!({ "url": format!("http://{}", tc.http), "operator_token": operator, "viewer_token": viewer, "xid": xid, "branch": branch })
    );
    let (lines, mut commands) = tokio::sync::mpsc::channel::<String>(8);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if lines.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = commands.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["table"] => json!(dirty::table(&db).await?),
            ["audit"] => json!(dirty::audit_rows(&db).await?),
            ["undo"] => json!(ferrata_tests::undo_records(&db).await?),
            ["change", id, note] => {
                db.conn()
                    .await?
                    .exec_drop("UPDATE t SET note = ? WHERE id = ?", (note, id))
                    .await?;
                json!("changed")
            }
            ["dirty"] => {
                db.conn()
                    .await?
                    .query_drop("DELETE FROM t; INSERT INTO t VALUES (1, 'a', 1.00), (2, 'b', 2.00), (3, 'c', 3.00)")
                    .await?;
                let (xid, branch) = dirty::rollback(&db, &proxy, &tc, &[1, 2]).await?;
                json!({ "xid": xid, "branch": branch })
            }
            other => json!({ "error": format!("unknown command {other:?}") }),
        };
        println!("{answer}");
    }
    Ok(())
}
