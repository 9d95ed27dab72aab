//! `ferrata token create|list|revoke` (admin).

use serde_json::json;

use super::{Out, now_ms, text};
use crate::args::{Output, Token};
use crate::client::{Client, query_value};
use crate::exit::{Exit, Result};
use crate::table::{Table, age};

pub async fn run(client: &Client, out: &Out, command: &Token) -> Result {
    match command {
        Token::Create {
            name,
            role,
            expires,
            reason,
        } => {
            let mut body = json!({ "name": name, "role": role, "reason": reason });
            if let Some(e) = expires {
                body["expires_in_ms"] = json!(e.as_millis() as u64);
            }
            let created = client.post("/v1/tokens", &body).await?;
            match out.output {
                Output::Json => out.json(&created),
                // The secret alone on stdout (to redirect into a file); the rest on stderr.
                Output::Table => {
                    eprintln!(
                        "token {:?} ({}) created; its secret is shown this once:",
                        text(&created["name"]),
                        text(&created["role"])
                    );
                    println!("{}", text(&created["secret"]));
                }
            }
            Ok(Exit::Ok)
        }
        Token::List => {
            let body = client.get("/v1/tokens").await?;
            out.either(&body, || {
                let now = now_ms();
                let mut t = Table::new(&["NAME", "ROLE", "CREATED", "BY", "EXPIRES", "LAST USED"]);
                for tk in body["tokens"].as_array().into_iter().flatten() {
                    t.row(vec![
                        text(&tk["name"]),
                        text(&tk["role"]),
                        age(tk["created_ms"].as_u64().unwrap_or(now), now) + " ago",
                        text(&tk["created_by"]),
                        tk["expires_ms"].as_u64().map_or("never".into(), |e| {
                            if e > now {
                                format!("in {}", age(now, e))
                            } else {
                                "expired".into()
                            }
                        }),
                        tk["last_used_ms"]
                            .as_u64()
                            .map_or("never".into(), |u| age(u, now) + " ago"),
                    ]);
                }
                t
            });
            Ok(Exit::Ok)
        }
        Token::Revoke { name, reason } => {
            let body = client
                .delete(
                    &format!("/v1/tokens/{}", query_value(name)),
                    &json!({ "reason": reason }),
                )
                .await?;
            out.either(&body, || {
                let mut t = Table::new(&["NAME", "ROLE", "REVOKED"]);
                t.row(vec![text(&body["name"]), text(&body["role"]), "yes".into()]);
                t
            });
            Ok(Exit::Ok)
        }
    }
}
