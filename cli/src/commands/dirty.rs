//! `ferrata dirty`: the failed rollbacks' branches, a branch's rows column by column, and
//! accepting or restoring rows. An action names rows by primary key (`--row id=7`); the
//! command reads the branch first and sends the digests of the rows it showed, with the
//! transaction's version, so a change in between is refused (exit 3) instead of acting on
//! values nobody saw.

use serde_json::{Value, json};

use super::{Out, attention, confirm, key_text, show_dry_run, text};
use crate::args::{Dirty, Output, Rows, Settle};
use crate::client::{Client, query_value};
use crate::exit::{Exit, Failure, Result};
use crate::table::Table;

pub async fn run(client: &Client, out: &Out, command: &Dirty) -> Result {
    match command {
        Dirty::List { fail_if_any } => list(client, out, *fail_if_any).await,
        Dirty::Show {
            xid,
            branch,
            hex,
            all_rows,
        } => {
            let (branch, seen) = inspect(client, xid, *branch).await?;
            if out.output == Output::Json {
                out.json(&seen);
                return Ok(Exit::Ok);
            }
            print_rows(xid, branch, &seen, *hex, *all_rows);
            Ok(Exit::Ok)
        }
        Dirty::Accept(settle) => repair(client, out, settle, "accept").await,
        Dirty::Restore(settle) => repair(client, out, settle, "restore").await,
    }
}

async fn list(client: &Client, out: &Out, fail_if_any: bool) -> Result {
    let mut failed = Vec::new();
    for status in ["RollbackFailed", "TimeoutRollbackFailed"] {
        let body = client
            .get(&format!("/v1/transactions?status={status}&limit=10000"))
            .await?;
        failed.extend(body["transactions"].as_array().cloned().unwrap_or_default());
    }
    let body = json!({ "transactions": failed });
    out.either(&body, || {
        let mut t = Table::new(&["XID", "STATUS", "BRANCH", "RESOURCE", "TABLE", "DIRTY ROWS", "REASON"]);
        for x in &failed {
            let f = &x["failure"];
            let d = &f["detail"];
            t.row(vec![
                text(&x["xid"]),
                text(&x["status"]),
                text(&f["branch_id"]),
                text(&f["resource_id"]),
                format!("{}.{}", text(&d["schema"]), text(&d["table"])),
                d["rows"].as_array().map_or("-".into(), |r| r.len().to_string()),
                text(&f["reason"]).chars().take(50).collect(),
            ]);
        }
        t
    });
    Ok(attention(fail_if_any, !failed.is_empty()))
}

/// The branch (the failed one unless named) and its rows as they are now.
async fn inspect(client: &Client, xid: &str, branch: Option<u64>) -> Result<(u64, Value)> {
    let branch = match branch {
        Some(b) => b,
        None => client.get(&format!("/v1/transactions/{}", query_value(xid))).await?["failure"]["branch_id"]
            .as_u64()
            .ok_or_else(|| Failure::usage(format!("{xid} has no failed branch; name one with --branch")))?,
    };
    let seen = client
        .get(&format!(
            "/v1/transactions/{}/branches/{branch}/dirty",
            query_value(xid)
        ))
        .await?;
    Ok((branch, seen))
}

/// A value as shown: text where the bytes are text (unless `hex`), `NULL` apart from `''`.
fn shown(column: &Value, image: &str, hex: bool) -> String {
    let raw = &column[image];
    if raw.is_null() {
        return "NULL".into();
    }
    if let Some(true) = raw.get("redacted").and_then(Value::as_bool) {
        return "(hidden)".into();
    }
    let display = &column["display"][image];
    match (hex, display) {
        (false, Value::String(s)) => format!("{s:?}"),
        _ => format!("0x{}", text(raw)),
    }
}

fn print_rows(xid: &str, branch: u64, seen: &Value, hex: bool, all_rows: bool) {
    println!(
        "XID {xid}  {}  version {}  branch {branch} on {}  {} rows, {} dirty",
        text(&seen["status"]),
        text(&seen["version"]),
        text(&seen["resource_id"]),
        text(&seen["row_count"]),
        text(&seen["dirty_rows"])
    );
    for row in seen["rows"].as_array().into_iter().flatten() {
        let state = row["state"].as_str().unwrap_or("");
        if !all_rows && matches!(state, "clean" | "restored") {
            continue;
        }
        let key = key_text(&row["primary_key"]);
        println!(
            "\nROW {}.{} {key}  {state}  digest {}",
            text(&row["schema"]),
            text(&row["table"]),
            row["digest"].as_str().unwrap_or("").get(..12).unwrap_or("")
        );
        let mut t = Table::new(&["COLUMN", "TYPE", "BEFORE", "AFTER", "CURRENT", ""]);
        for c in row["columns"].as_array().into_iter().flatten() {
            t.row(vec![
                text(&c["column"]),
                text(&c["type"]),
                shown(c, "before", hex),
                shown(c, "after", hex),
                shown(c, "current", hex),
                if c["differs"] == true {
                    "current != after".into()
                } else {
                    String::new()
                },
            ]);
        }
        print!("{}", t.render(true));
    }
    println!(
        "\nactions: ferrata dirty accept {xid} --branch {branch} --row <key> --reason ...   (keep the current values)\n         \
         ferrata dirty restore {xid} --branch {branch} --row <key> --reason ...  (write the before image back)"
    );
}

/// The rows `--row` names, with the digests just read.
fn chosen(seen: &Value, rows: &Rows) -> Result<Vec<Value>> {
    let all = seen["rows"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for spec in &rows.rows {
        let wanted: Vec<(&str, &str)> = spec
            .split(',')
            .map(|pair| {
                pair.split_once('=')
                    .ok_or_else(|| Failure::usage(format!("--row {spec:?}: write column=value[,column=value]")))
            })
            .collect::<Result<_>>()?;
        let matching: Vec<&Value> = all
            .iter()
            .filter(|r| {
                let key = &r["primary_key"];
                key.as_object().is_some_and(|k| k.len() == wanted.len())
                    && wanted.iter().all(|(c, v)| key[*c].as_str() == Some(*v))
            })
            .collect();
        match matching.as_slice() {
            [one] => out.push(json!({ "row": one["row"], "digest": one["digest"] })),
            [] => {
                return Err(Failure::new(
                    Exit::NotFound,
                    format!("no row {spec} in the branch; see ferrata dirty show"),
                ));
            }
            _ => return Err(Failure::usage(format!("--row {spec} names rows of several tables"))),
        }
    }
    Ok(out)
}

async fn repair(client: &Client, out: &Out, settle: &Settle, verb: &str) -> Result {
    let Settle { xid, branch, rows, act } = settle;
    let (branch, seen) = inspect(client, xid, *branch).await?;
    let mut body = json!({
        "reason": act.reason,
        "expect_version": act.expect_version.or(seen["version"].as_u64()),
    });
    if rows.all {
        body["all"] = json!(true);
        body["branch_digest"] = seen["branch_digest"].clone();
    } else {
        body["rows"] = json!(chosen(&seen, rows)?);
    }
    let path = format!("/v1/transactions/{}/branches/{branch}/{verb}", query_value(xid));
    if act.dry_run || !act.yes {
        let mut dry = body.clone();
        dry["dry_run"] = json!(true);
        let would = client.post(&path, &dry).await?;
        if act.dry_run {
            out.either(&would, || outcome_table(&would));
            return Ok(Exit::Ok);
        }
        show_dry_run(&format!("{verb} on {xid} branch {branch}"), &would);
    }
    if !act.yes {
        confirm(xid)?;
    }
    let done = client.post(&path, &body).await?;
    out.either(&done, || outcome_table(&done));
    Ok(Exit::Ok)
}

fn outcome_table(r: &Value) -> Table {
    let mut t = Table::new(&[
        "ACTION",
        "DRY RUN",
        "ROWS",
        "LOCKS RELEASED",
        "DIRTY LEFT",
        "STATUS",
        "AUDIT",
    ]);
    t.row(vec![
        text(&r["action"]),
        text(&r["dry_run"]),
        r["rows"].as_array().map_or(0, Vec::len).to_string(),
        text(&r["locks_released"]),
        text(&r["remaining_dirty"]),
        text(&r["status"]),
        text(&r["audit_id"]),
    ]);
    t
}
