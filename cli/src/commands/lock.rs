//! `ferrata lock list` and `ferrata deadlock list`.

use super::{Out, attention, now_ms, text};
use crate::args::{Deadlock, Lock};
use crate::client::{Client, query_value};
use crate::exit::Result;
use crate::table::{Table, age};

pub async fn run(client: &Client, out: &Out, command: &Lock) -> Result {
    let Lock::List {
        resource,
        schema,
        table,
        holder,
        waiting,
        limit,
        fail_if_any,
    } = command;
    let mut path = format!("/v1/locks?limit={limit}");
    for (name, value) in [("resource", resource), ("schema", schema), ("table", table)] {
        if let Some(v) = value {
            path.push_str(&format!("&{name}={}", query_value(v)));
        }
    }
    let mut body = client.get(&path).await?;
    if let Some(locks) = body["locks"].as_array_mut() {
        locks.retain(|l| {
            holder.as_ref().is_none_or(|h| l["holder"] == h.as_str())
                && (!waiting || l["waiters"].as_array().is_some_and(|w| !w.is_empty()))
        });
    }
    let locks = body["locks"].as_array().cloned().unwrap_or_default();
    out.either(&body, || {
        let now = now_ms();
        let mut t = Table::new(&["TABLE", "KEY", "HOLDER", "HELD", "WAITERS"]);
        for l in &locks {
            let k = &l["key"];
            t.row(vec![
                format!("{}.{}", text(&k["schema"]), text(&k["table"])),
                k["pk"]
                    .as_array()
                    .map(|v| v.iter().map(text).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                text(&l["holder"]),
                age(l["since_ms"].as_u64().unwrap_or(now), now),
                l["waiters"]
                    .as_array()
                    .map(|w| w.iter().map(text).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
            ]);
        }
        t
    });
    Ok(attention(*fail_if_any, !locks.is_empty()))
}

pub async fn deadlocks(client: &Client, out: &Out, command: &Deadlock) -> Result {
    let Deadlock::List { fail_if_any } = command;
    let body = client.get("/v1/deadlocks").await?;
    let list = body["deadlocks"].as_array().cloned().unwrap_or_default();
    out.either(&body, || {
        let now = now_ms();
        let mut t = Table::new(&["AGO", "CYCLE", "GAVE WAY", "TABLE"]);
        for d in &list {
            t.row(vec![
                age(d["at_ms"].as_u64().unwrap_or(now), now),
                d["cycle"]
                    .as_array()
                    .map(|c| c.iter().map(text).collect::<Vec<_>>().join(" -> "))
                    .unwrap_or_default(),
                text(&d["victim"]),
                format!("{}.{}", text(&d["schema"]), text(&d["table"])),
            ]);
        }
        t
    });
    Ok(attention(*fail_if_any, !list.is_empty()))
}
