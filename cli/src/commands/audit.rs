//! `ferrata audit list` and `ferrata audit verify`.

use super::{Out, now_ms, text};
use crate::args::Audit;
use crate::client::{Client, query_value};
use crate::exit::{Exit, Failure, Result};
use crate::table::{Table, age};

pub async fn run(client: &Client, out: &Out, command: &Audit) -> Result {
    match command {
        Audit::List {
            xid,
            actor,
            action,
            limit,
        } => {
            let mut path = format!("/v1/audit?limit={limit}");
            for (name, value) in [("xid", xid), ("actor", actor), ("action", action)] {
                if let Some(v) = value {
                    path.push_str(&format!("&{name}={}", query_value(v)));
                }
            }
            let body = client.get(&path).await?;
            out.either(&body, || {
                let now = now_ms();
                let mut t = Table::new(&["ID", "AGO", "ACTOR", "ROLE", "ACTION", "XID", "REASON"]);
                for r in body["records"].as_array().into_iter().flatten() {
                    t.row(vec![
                        text(&r["id"]),
                        age(r["at_ms"].as_u64().unwrap_or(now), now),
                        text(&r["actor"]),
                        text(&r["role"]),
                        text(&r["action"]),
                        text(&r["xid"]),
                        text(&r["reason"]),
                    ]);
                }
                t
            });
            Ok(Exit::Ok)
        }
        Audit::Verify => {
            let body = client.get("/v1/audit/verify").await?;
            if body["ok"] == true {
                out.either(&body, || {
                    let mut t = Table::new(&["CHAIN", "RECORDS", "LAST HASH"]);
                    t.row(vec!["intact".into(), text(&body["records"]), text(&body["last_hash"])]);
                    t
                });
                Ok(Exit::Ok)
            } else {
                Err(Failure {
                    body: Some(body.clone()),
                    ..Failure::error(format!(
                        "the audit chain is broken at record {}: {}",
                        text(&body["broken_at"]),
                        text(&body["problem"])
                    ))
                })
            }
        }
    }
}
