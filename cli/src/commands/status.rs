//! `ferrata status` and `ferrata whoami`.

use serde_json::json;

use super::{Out, text};
use crate::client::Client;
use crate::exit::{Exit, Result};
use crate::table::Table;

pub async fn status(client: &Client, out: &Out) -> Result {
    let health = client.get("/healthz").await.or_else(|f| f.body.clone().ok_or(f))?;
    let me = client.get("/v1/whoami").await?;
    let body = json!({ "server": client.server(), "health": health, "whoami": me });
    out.either(&body, || {
        let mut t = Table::new(&["FIELD", "VALUE"]);
        t.row(vec!["server".into(), client.server().into()]);
        for key in [
            "status",
            "version",
            "transactions",
            "locks_held",
            "resource_managers",
            "reason",
        ] {
            t.row(vec![key.into(), text(&health[key])]);
        }
        t.row(vec![
            "you".into(),
            format!("{} ({})", text(&me["name"]), text(&me["role"])),
        ]);
        t
    });
    Ok(if health["status"] == "serving" {
        Exit::Ok
    } else {
        Exit::Error
    })
}

pub async fn whoami(client: &Client, out: &Out) -> Result {
    let me = client.get("/v1/whoami").await?;
    out.either(&me, || {
        let mut t = Table::new(&["NAME", "ROLE", "MAY"]);
        let may: Vec<String> = me["may"]
            .as_object()
            .map(|m| m.iter().filter(|(_, v)| **v == true).map(|(k, _)| k.clone()).collect())
            .unwrap_or_default();
        t.row(vec![text(&me["name"]), text(&me["role"]), may.join(",")]);
        t
    });
    Ok(Exit::Ok)
}
