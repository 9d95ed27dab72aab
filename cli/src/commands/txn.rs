//! `ferrata txn`: list, show, events, and the actions retry, resolve, pause and resume.

use serde_json::{Value, json};

use super::{Out, attention, confirm, now_ms, show_dry_run, text};
use crate::args::{Act, Output, Txn};
use crate::client::{Client, query_value};
use crate::exit::{Exit, Result};
use crate::table::{Table, age};

pub async fn run(client: &Client, out: &Out, command: &Txn) -> Result {
    match command {
        Txn::List {
            status,
            limit,
            fail_if_any,
        } => {
            let mut path = format!("/v1/transactions?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={}", query_value(s)));
            }
            let body = client.get(&path).await?;
            let list = body["transactions"].as_array().cloned().unwrap_or_default();
            out.either(&body, || {
                let now = now_ms();
                let mut t = Table::new(&["XID", "NAME", "STATUS", "AGE", "BRANCHES", "VERSION", "FAILURE"]);
                for x in &list {
                    t.row(vec![
                        text(&x["xid"]),
                        text(&x["name"]),
                        text(&x["status"]),
                        age(x["begin_ms"].as_u64().unwrap_or(0), now),
                        text(&x["branch_count"]),
                        text(&x["version"]),
                        text(&x["failure"]["reason"]).chars().take(60).collect(),
                    ]);
                }
                t
            });
            Ok(attention(*fail_if_any, !list.is_empty()))
        }
        Txn::Show { xid } => {
            let body = client.get(&format!("/v1/transactions/{}", query_value(xid))).await?;
            if out.output == Output::Json {
                out.json(&body);
                return Ok(Exit::Ok);
            }
            println!(
                "XID {}  {}  version {}  name {:?}  timeout {} ms",
                text(&body["xid"]),
                text(&body["status"]),
                text(&body["version"]),
                body["name"].as_str().unwrap_or(""),
                text(&body["timeout_ms"])
            );
            if !body["failure"].is_null() {
                println!(
                    "failure   branch {} on {}: {}",
                    text(&body["failure"]["branch_id"]),
                    text(&body["failure"]["resource_id"]),
                    text(&body["failure"]["reason"])
                );
            }
            let mut t = Table::new(&["BRANCH", "RESOURCE", "STATUS", "LOCKS", "ERROR"]);
            for b in body["branches"].as_array().into_iter().flatten() {
                t.row(vec![
                    text(&b["branch_id"]),
                    text(&b["resource_id"]),
                    text(&b["status"]),
                    b["lock_keys"].as_array().map_or(0, Vec::len).to_string(),
                    text(&b["error"]["reason"]).chars().take(60).collect(),
                ]);
            }
            if !t.is_empty() {
                out.table(&t);
            }
            Ok(Exit::Ok)
        }
        Txn::Events { xid } => {
            let body = client
                .get(&format!("/v1/transactions/{}/events", query_value(xid)))
                .await?;
            out.either(&body, || {
                let mut t = Table::new(&["VERSION", "AT", "EVENT", "DETAIL"]);
                let start = body["events"][0]["at_ms"].as_u64().unwrap_or(0);
                for e in body["events"].as_array().into_iter().flatten() {
                    t.row(vec![
                        text(&e["version"]),
                        format!("+{} ms", e["at_ms"].as_u64().unwrap_or(0).saturating_sub(start)),
                        text(&e["type"]),
                        summary(e),
                    ]);
                }
                t
            });
            Ok(Exit::Ok)
        }
        Txn::Retry { xid, act } => action(client, out, xid, "retry", act, json!({})).await,
        Txn::Resolve { xid, delete_undo, act } => {
            action(client, out, xid, "resolve", act, json!({ "delete_undo": delete_undo })).await
        }
        Txn::Pause { xid, act } => action(client, out, xid, "pause", act, json!({})).await,
        Txn::Resume { xid, act } => action(client, out, xid, "resume", act, json!({})).await,
    }
}

/// One line about an event, for the table.
fn summary(e: &Value) -> String {
    let skip = ["version", "at_ms", "type", "detail"];
    let mut parts = Vec::new();
    if let Some(map) = e.as_object() {
        for (k, v) in map {
            if !skip.contains(&k.as_str()) && !v.is_null() && *v != json!("") {
                parts.push(format!("{k}={}", text(v)));
            }
        }
    }
    parts.join(" ")
}

/// A transaction action: without `--yes` (or with `--dry-run`) the dry run first, then the
/// typed XID; the action carries the version shown.
async fn action(client: &Client, out: &Out, xid: &str, verb: &str, act: &Act, extra: Value) -> Result {
    let path = format!("/v1/transactions/{}/{verb}", query_value(xid));
    let mut body = extra;
    body["reason"] = json!(act.reason);
    let version = match act.expect_version {
        Some(v) => v,
        None => client.get(&format!("/v1/transactions/{}", query_value(xid))).await?["version"]
            .as_u64()
            .unwrap_or(0),
    };
    body["expect_version"] = json!(version);
    let has_dry_run = matches!(verb, "retry" | "resolve");
    if act.dry_run || (!act.yes && has_dry_run) {
        if !has_dry_run {
            return Err(crate::exit::Failure::usage(format!("{verb} has no dry run")));
        }
        let mut dry = body.clone();
        dry["dry_run"] = json!(true);
        let would = client.post(&path, &dry).await?;
        if act.dry_run {
            out.either(&would, || dry_table(&would));
            return Ok(if would["still_dirty"] == true {
                Exit::Precondition
            } else {
                Exit::Ok
            });
        }
        show_dry_run(&format!("{verb} {xid}"), &would);
    }
    if !act.yes {
        confirm(xid)?;
    }
    let done = client.post(&path, &body).await?;
    out.either(&done, || {
        let mut t = Table::new(&["XID", "STATUS", "AUDIT"]);
        t.row(vec![xid.to_owned(), text(&done["status"]), text(&done["audit_id"])]);
        t
    });
    Ok(Exit::Ok)
}

fn dry_table(would: &Value) -> Table {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    if let Some(map) = would.as_object() {
        for (k, v) in map {
            t.row(vec![k.clone(), text(v)]);
        }
    }
    t
}
