//! Global read isolation: a locking read (`SELECT ... FOR UPDATE`, `FOR SHARE`, `LOCK IN
//! SHARE MODE`) in a session bound to a global transaction returns only data of finished
//! global transactions.
//!
//! 1. plan it (`sql::select`): its tables and its text from FROM on;
//! 2. an autocommit read is wrapped in a local transaction of the proxy's own, so the rows
//!    stay locked until it has been answered;
//! 3. `SELECT <primary keys> <the statement's FROM ... locking clause>`: the same rows, locked
//!    in the database the same way;
//! 4. ask the coordinator whether another global transaction holds any of them, waiting up to
//!    the lock timeout (not at all for NOWAIT and SKIP LOCKED). Held: ERR 1205 naming the
//!    holder, except for SKIP LOCKED, where the held rows are left out (the key select runs
//!    again without them, so a LIMIT still fills up) and the statement runs with a condition
//!    that leaves them out;
//! 5. the client's statement, forwarded as sent, answered from rows the database holds for
//!    this session: no global transaction can have them in flight.
//!
//! While the database holds the rows, no other global transaction can write them; one that
//! already did registered its branch (and its locks) before its local commit, so step 4
//! sees it. The wait cannot deadlock with a rollback that needs the rows: the coordinator
//! fails it at once when the holder is rolling back.

use crate::coordinator::{CheckFailure, Global, TableRows, no_database, unreachable};
use crate::protocol::Command;
use crate::protocol::err::ErrPacket;
use crate::protocol::response::ResponseTracker;
use crate::session::backend::{self, local_rollback, reply};
use crate::session::peer::Peer;
use crate::session::relay;
use crate::session::state::SessionState;
use crate::session::{SessionError, Shared};
use crate::sql::image::qualified_select_list;
use crate::sql::select::{self, Wait};
use crate::sql::{ident, literal};

/// How many times SKIP LOCKED selects keys again after leaving out globally locked rows.
const SKIP_ROUNDS: usize = 8;

fn refuse(why: &str, xid: &str) -> ErrPacket {
    ErrPacket::new(
        1235,
        "42000",
        format!(
            "ferrata-proxy cannot isolate {why} inside global transaction {xid}, so it was not run; \
             read without the locking clause, or outside the global transaction"
        ),
    )
}

/// One table of the read whose rows can be globally locked: its place in the key select.
struct Keyed {
    database: String,
    table: String,
    /// Columns of the key select that hold this table's primary key.
    columns: std::ops::Range<usize>,
    /// `(pk, ...)` as the statement names it (alias or name), for SKIP LOCKED's condition.
    key_expr: String,
    /// Each key column's write-back expression, to turn an encoded key into SQL.
    writers: Vec<&'static str>,
}

/// Runs a locking read of a bound session and answers the client.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: &mut Peer,
    backend: &mut Peer,
    state: &mut SessionState,
    shared: &Shared,
    global: &Global,
    xid: &str,
    command: u8,
    raw: &[u8],
) -> Result<(), SessionError> {
    let limit = shared.config.max_packet_size;
    let payload = &raw[4..];
    let (sql, params) = if command == Command::QUERY {
        (String::from_utf8_lossy(&payload[1..]).into_owned(), Vec::new())
    } else {
        let Some(stmt) = state.statement(payload) else {
            return forward(client, backend, state, raw).await;
        };
        if stmt.long_data_dropped {
            return reply(
                client,
                refuse("a prepared statement with more long data than max_packet_size", xid),
            )
            .await;
        }
        match stmt.bound_params(payload) {
            Some(params) => (stmt.sql.clone(), params),
            None => return reply(client, refuse("this execute (its parameters could not be read)", xid)).await,
        }
    };
    let plan = match select::plan(&sql) {
        Ok(plan) => plan,
        Err(why) => return reply(client, refuse(&why, xid)).await,
    };
    // The key select list, table by table; tables without a primary key hold no global lock.
    let mut keyed = Vec::new();
    let mut list = Vec::new();
    for t in &plan.tables {
        let Some(database) = t.schema.clone().or_else(|| state.schema.clone()) else {
            return reply(client, no_database()).await;
        };
        let meta = match global.table(&database, &t.name).await {
            Ok(meta) => meta,
            Err(e) => return reply(client, e).await,
        };
        if meta.primary_key.is_empty() {
            continue;
        }
        let qualifier = t.alias.as_deref().unwrap_or(&t.name);
        let specs = meta.key_specs();
        let start = list.len();
        for spec in &specs {
            list.push(qualified_select_list(qualifier, std::slice::from_ref(spec)));
        }
        let names: Vec<String> = specs
            .iter()
            .map(|s| format!("{}.{}", ident(qualifier), ident(&s.name)))
            .collect();
        keyed.push(Keyed {
            database,
            table: meta.name.clone(),
            columns: start..list.len(),
            key_expr: format!("({})", names.join(", ")),
            writers: specs.iter().map(|s| s.encoding().write_expr()).collect(),
        });
    }
    if keyed.is_empty() {
        return forward(client, backend, state, raw).await;
    }
    let autocommit = state.autocommit() && !state.in_transaction();
    let before = state.status;
    if autocommit && let Err(e) = backend::begin_own(backend, state, limit).await? {
        return reply(client, e).await;
    }
    let abort = async |client: &mut Peer, backend: &mut Peer, state: &mut SessionState, e: ErrPacket| {
        if autocommit {
            local_rollback(backend, state, limit).await?;
        }
        reply(client, e).await
    };
    let Some(tail_params) = params.get(plan.tail_params.clone()) else {
        return abort(
            client,
            backend,
            state,
            refuse("this execute (its parameters could not be read)", xid),
        )
        .await;
    };
    let wait_ms = match plan.wait {
        Wait::Block => global.lock_wait_ms,
        Wait::Nowait | Wait::SkipLocked => 0,
    };
    // Rows left out (SKIP LOCKED): the condition that excludes them, per table.
    let mut excluded: Vec<String> = Vec::new();
    let mut rounds = 0;
    loop {
        let tail = if excluded.is_empty() {
            plan.tail.clone()
        } else {
            plan.tail_excluding(&excluded.join(" OR "))
        };
        let select = format!("SELECT {} {tail}", list.join(", "));
        let read = crate::sql::execute(backend, state, &select, tail_params, limit).await?;
        if let Some(e) = read.error {
            return abort(client, backend, state, e).await;
        }
        let mut rows = TableRows::new();
        for row in &read.rows {
            for k in &keyed {
                let key: Option<Vec<Vec<u8>>> = row[k.columns.clone()].iter().cloned().collect();
                // An outer join's missing side has no row to lock.
                if let Some(key) = key {
                    rows.entry((k.database.clone(), k.table.clone())).or_default().push(key);
                }
            }
        }
        match global.query_locks(xid, &rows, wait_ms).await {
            Ok(()) => break,
            Err(CheckFailure::Held { holders, .. })
                if plan.wait == Wait::SkipLocked && !holders.is_empty() && rounds < SKIP_ROUNDS =>
            {
                rounds += 1;
                for h in holders {
                    let Some(k) = keyed.iter().find(|k| k.database == h.schema && k.table == h.table) else {
                        continue;
                    };
                    let values: Vec<String> = h
                        .row
                        .map(|r| r.values)
                        .unwrap_or_default()
                        .iter()
                        .zip(&k.writers)
                        .map(|(v, w)| w.replace('?', &literal(&String::from_utf8_lossy(v))))
                        .collect();
                    excluded.push(format!("{} = ({})", k.key_expr, values.join(", ")));
                }
            }
            Err(CheckFailure::Held { message, .. }) => {
                let e = ErrPacket::new(
                    1205,
                    "HY000",
                    format!(
                        "Lock wait timeout exceeded; {message} (ferrata-proxy: a locking read in global transaction {xid} sees only finished global transactions)"
                    ),
                );
                return abort(client, backend, state, e).await;
            }
            Err(CheckFailure::Unreachable(why)) => {
                let e = unreachable(&why, "check the rows read for global locks");
                return abort(client, backend, state, e).await;
            }
        }
    }
    // The client's statement: as sent, or, with rows left out, its text with the condition.
    let statement = if excluded.is_empty() {
        raw.to_vec()
    } else if command == Command::QUERY {
        backend::query_packet(&format!(
            "{}{}",
            &sql[..plan.tail_start],
            plan.tail_excluding(&excluded.join(" OR "))
        ))
    } else {
        let e = refuse(
            "a prepared SKIP LOCKED read while some of its rows are globally locked (use the text protocol)",
            xid,
        );
        return abort(client, backend, state, e).await;
    };
    backend
        .write_all(&statement)
        .await
        .map_err(|e| SessionError::backend_lost(&e.to_string(), 0))?;
    if !autocommit {
        let mut tracker = ResponseTracker::new(state.response_kind(&raw[4..]), state.capabilities, 0);
        relay::response(client, backend, &mut tracker).await?;
        state.observe(&tracker);
        return Ok(());
    }
    let (response, _, _) = backend::read_response(backend, state, limit).await?;
    let response = backend::commit_own(backend, state, limit, response, before).await?;
    client
        .write_all(&response)
        .await
        .map_err(|_| SessionError::ClientClosed)
}

/// A read with nothing to check: forwarded and relayed as usual.
async fn forward(
    client: &mut Peer,
    backend: &mut Peer,
    state: &mut SessionState,
    raw: &[u8],
) -> Result<(), SessionError> {
    backend
        .write_all(raw)
        .await
        .map_err(|e| SessionError::backend_lost(&e.to_string(), 0))?;
    let mut tracker = ResponseTracker::new(state.response_kind(&raw[4..]), state.capabilities, 0);
    relay::response(client, backend, &mut tracker).await?;
    state.observe(&tracker);
    Ok(())
}
