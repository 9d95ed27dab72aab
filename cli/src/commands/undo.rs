//! `ferrata undo list|show`: undo records read straight from a database with the DBA's own
//! credentials (no coordinator needed), decoded with the proxy's own reader. With a
//! coordinator configured, each record's transaction is looked up there: one the
//! coordinator no longer knows is an orphan (its undo record will never be used or deleted
//! by anyone).

use std::collections::BTreeMap;

use ferrata_proxy::at::repair::{column_types_of, display};
use ferrata_proxy::at::undo::UndoItem;
use ferrata_proxy::at::undo_log::read_record;
use ferrata_proxy::coordinator::undo_table::{STATUS_GLOBAL_FINISHED, STATUS_NORMAL};
use mysql_async::prelude::*;
use serde_json::{Value, json};

use super::{Out, key_text, text};
use crate::args::{Database, Output, Undo};
use crate::client::{Client, query_value};
use crate::exit::{Exit, Failure, Result};
use crate::table::Table;

pub async fn run(client: Option<Client>, out: &Out, command: &Undo) -> Result {
    match command {
        Undo::List {
            db,
            xid,
            branch,
            table,
            older_than,
            status,
        } => {
            let mut conn = connect(db).await?;
            let status = match status.as_deref() {
                None => None,
                Some("normal") => Some(STATUS_NORMAL),
                Some("marker") => Some(STATUS_GLOBAL_FINISHED),
                Some(other) => return Err(Failure::usage(format!("--status {other:?}: use normal or marker"))),
            };
            let rows: Vec<(u64, String, i32, u64, String)> = conn
                .exec(
                    "SELECT branch_id, xid, log_status, TIMESTAMPDIFF(SECOND, log_created, NOW(6)), \
                     CAST(log_created AS CHAR) FROM undo_log WHERE log_status IN (?, ?) ORDER BY log_created, xid",
                    (STATUS_NORMAL, STATUS_GLOBAL_FINISHED),
                )
                .await
                .map_err(db_error)?;
            let mut records = Vec::new();
            let mut known: BTreeMap<String, Value> = BTreeMap::new();
            for (branch_id, x, log_status, age_s, created) in rows {
                if xid.as_ref().is_some_and(|w| *w != x)
                    || branch.is_some_and(|b| b != branch_id)
                    || status.is_some_and(|s| s != log_status)
                    || older_than.is_some_and(|d| age_s < d.as_secs())
                {
                    continue;
                }
                let mut entry = json!({
                    "xid": x, "branch_id": branch_id, "created": created, "age_s": age_s,
                    "status": if log_status == STATUS_NORMAL { "normal" } else { "marker" },
                });
                if log_status == STATUS_NORMAL {
                    match read_record(&mut conn, &x, branch_id).await {
                        Ok(record) => {
                            let tables: Vec<String> = record
                                .items
                                .iter()
                                .map(|i| format!("{}.{}", i.schema, i.table))
                                .collect();
                            if table
                                .as_ref()
                                .is_some_and(|t| !tables.iter().any(|n| n == t || n.ends_with(&format!(".{t}"))))
                            {
                                continue;
                            }
                            entry["items"] = json!(record.items.len());
                            entry["tables"] = json!(dedup(tables));
                            entry["rows"] = json!(record.items.iter().map(|i| i.key_rows().len()).sum::<usize>());
                        }
                        Err(e) => entry["error"] = json!(e),
                    }
                }
                if let Some(c) = &client {
                    let seen = match known.get(&x) {
                        Some(v) => v.clone(),
                        None => {
                            let v = match c.get(&format!("/v1/transactions/{}", query_value(&x))).await {
                                Ok(t) => json!(t["status"]),
                                Err(f) if f.exit == Exit::NotFound => json!("orphan"),
                                Err(f) => json!(format!("unknown ({})", f.message)),
                            };
                            known.insert(x.clone(), v.clone());
                            v
                        }
                    };
                    entry["coordinator"] = seen;
                }
                records.push(entry);
            }
            let body = json!({ "records": records });
            out.either(&body, || {
                let mut t = Table::new(&["XID", "BRANCH", "STATUS", "AGE", "TABLES", "ROWS", "COORDINATOR"]);
                for r in &records {
                    t.row(vec![
                        text(&r["xid"]),
                        text(&r["branch_id"]),
                        text(&r["status"]),
                        format!("{}s", text(&r["age_s"])),
                        r["tables"].as_array().map_or_else(
                            || text(&r["error"]),
                            |t| t.iter().map(text).collect::<Vec<_>>().join(","),
                        ),
                        text(&r["rows"]),
                        text(&r["coordinator"]),
                    ]);
                }
                t
            });
            Ok(Exit::Ok)
        }
        Undo::Show { db, xid, branch } => {
            let mut conn = connect(db).await?;
            let rows: Vec<u64> = conn
                .exec(
                    "SELECT branch_id FROM undo_log WHERE xid = ? AND log_status = ? ORDER BY branch_id",
                    (xid, STATUS_NORMAL),
                )
                .await
                .map_err(db_error)?;
            let rows: Vec<_> = rows.into_iter().filter(|b| branch.is_none_or(|w| w == *b)).collect();
            if rows.is_empty() {
                return Err(Failure::new(
                    Exit::NotFound,
                    format!("no undo record of {xid} in this database"),
                ));
            }
            let mut records = Vec::new();
            for branch_id in rows {
                let record = read_record(&mut conn, xid, branch_id).await.map_err(Failure::error)?;
                let mut items = Vec::new();
                for item in &record.items {
                    items.push(item_json(&mut conn, item).await?);
                }
                records.push(json!({ "xid": xid, "branch_id": branch_id, "items": items }));
            }
            let body = json!({ "records": records });
            if out.output == Output::Json {
                out.json(&body);
            } else {
                print_records(&records);
            }
            Ok(Exit::Ok)
        }
    }
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

fn db_error(e: mysql_async::Error) -> Failure {
    Failure::error(format!("the database: {e}"))
}

async fn connect(db: &Database) -> Result<mysql_async::Conn> {
    let opts = mysql_async::Opts::from_url(&db.database)
        .map_err(|e| Failure::usage(format!("--database {:?}: {e}", db.database)))?;
    if opts.pass().is_some() {
        return Err(Failure::usage(
            "keep the password out of the URL (it would land in shell history): use FERRATA_DB_PASSWORD or --password-file",
        ));
    }
    if opts.db_name().is_none() {
        return Err(Failure::usage(
            "--database needs the database: mysql://user@host:3306/shop",
        ));
    }
    let password = match &db.password_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Failure::usage(format!("reading {}: {e}", path.display())))?
                .trim_end()
                .to_owned(),
        ),
        None => std::env::var("FERRATA_DB_PASSWORD").ok(),
    };
    // At the address given, not the server's socket.
    mysql_async::Conn::new(
        mysql_async::OptsBuilder::from_opts(opts)
            .pass(password)
            .prefer_socket(false),
    )
    .await
    .map_err(db_error)
}

/// An item with its columns' types and each row's values, column by column.
async fn item_json(conn: &mut mysql_async::Conn, item: &UndoItem) -> Result<Value> {
    let types = column_types_of(conn, &item.schema, &item.table)
        .await
        .map_err(db_error)?;
    let value = |row: Option<&Vec<Option<String>>>, i: usize| -> Value {
        row.and_then(|r| r.get(i).cloned().flatten())
            .map_or(Value::Null, Value::String)
    };
    let keyed = |rows: &[Vec<Option<String>>]| -> BTreeMap<Vec<Option<String>>, Vec<Option<String>>> {
        rows.iter()
            .map(|r| (item.primary_key.iter().map(|&i| r[i].clone()).collect(), r.clone()))
            .collect()
    };
    let (before, after) = (keyed(&item.before), keyed(&item.after));
    let mut keys: Vec<&Vec<Option<String>>> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    let rows: Vec<Value> = keys
        .into_iter()
        .map(|key| {
            let (b, a) = (before.get(key), after.get(key));
            let columns: Vec<Value> = item
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (bv, av) = (value(b, i), value(a, i));
                    json!({
                        "column": c.name,
                        "type": types.get(&c.name),
                        "encoding": c.encoding,
                        "before": bv, "after": av,
                        "display": { "before": display(c.encoding, &bv), "after": display(c.encoding, &av) },
                    })
                })
                .collect();
            let pk: serde_json::Map<String, Value> = item
                .primary_key
                .iter()
                .zip(key)
                .map(|(&i, v)| {
                    (
                        item.columns[i].name.clone(),
                        v.clone().map_or(Value::Null, Value::String),
                    )
                })
                .collect();
            json!({ "primary_key": pk, "columns": columns })
        })
        .collect();
    Ok(json!({ "kind": item.kind, "schema": item.schema, "table": item.table, "rows": rows }))
}

fn print_records(records: &[Value]) {
    for r in records {
        println!("XID {}  branch {}", text(&r["xid"]), text(&r["branch_id"]));
        for (n, item) in r["items"].as_array().into_iter().flatten().enumerate() {
            println!(
                "\nITEM {}: {} {}.{}",
                n + 1,
                text(&item["kind"]),
                text(&item["schema"]),
                text(&item["table"])
            );
            for row in item["rows"].as_array().into_iter().flatten() {
                let key = key_text(&row["primary_key"]);
                println!("ROW {key}");
                let mut t = Table::new(&["COLUMN", "TYPE", "BEFORE", "AFTER"]);
                for c in row["columns"].as_array().into_iter().flatten() {
                    let show = |image: &str| match (&c["display"][image], &c[image]) {
                        (_, Value::Null) => "NULL".to_owned(),
                        (Value::String(s), _) => format!("{s:?}"),
                        (_, raw) => format!("0x{}", text(raw)),
                    };
                    t.row(vec![
                        text(&c["column"]),
                        text(&c["type"]),
                        show("before"),
                        show("after"),
                    ]);
                }
                print!("{}", t.render(true));
            }
        }
    }
}
