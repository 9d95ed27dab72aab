//! The local commit of a session with a pending branch: the branch is registered with the
//! coordinator (taking its global row locks, waiting up to `lock_wait_ms`), its undo record
//! is inserted into `undo_log` in the same local transaction, then the COMMIT runs. Any
//! failure rolls the local transaction back: a local commit without a registered branch and
//! an undo record cannot happen.

use super::undo::UndoRecord;
use super::{Cx, undo_log};
use crate::protocol::err::ErrPacket;
use crate::session::SessionError;
use crate::session::backend;
use crate::session::peer::Peer;
use crate::sql::{hex, ident, literal};

/// Registers the pending branch, writes its undo record and runs `commit_sql` (the client's
/// COMMIT, or the proxy's own for a wrapped autocommit statement). On failure the local
/// transaction is rolled back and the error says why.
pub async fn commit_branch(cx: &mut Cx<'_>, commit_sql: &str) -> Result<Result<(), ErrPacket>, SessionError> {
    let Cx {
        backend,
        state,
        branch,
        at,
        limit,
        ..
    } = cx;
    let (at, limit) = (*at, *limit);
    let global = &*at.global;
    let Some(pending) = branch.take() else {
        let done = backend::query(backend, state, commit_sql, limit).await?;
        return Ok(done.error.map_or(Ok(()), Err));
    };
    let resource = global.resource(&pending.schema);
    global.link.serve(&resource);
    // The undo record is encoded before the register, which may wait for rows.
    let locks = pending.locks();
    let record = UndoRecord::new(pending.items).to_bytes();
    // Pieces small enough for one packet each (hex doubles the size on the wire).
    let piece = at.undo_logs.chunk_bytes(global).await;
    let values: Vec<String> = undo_log::pieces(&pending.xid, &record, piece)
        .into_iter()
        .map(|(xid, context, status, bytes)| {
            format!(
                "{}, {}, X'{}', {status}, NOW(6), NOW(6)",
                literal(&xid),
                literal(&context),
                hex(bytes),
            )
        })
        .collect();
    let branch_id = match global.register(&pending.xid, &resource, locks).await {
        Ok(id) => id,
        Err(e) => {
            backend::local_rollback(backend, state, limit).await?;
            return Ok(Err(e));
        }
    };
    if let Err(e) = at.undo_logs.ensure(global, &resource).await {
        backend::local_rollback(backend, state, limit).await?;
        global.report_failed(&pending.xid, branch_id, &e).await;
        return Ok(Err(ErrPacket::new(1105, "HY000", e)));
    }
    let rows: Vec<String> = values
        .iter()
        .map(|values| {
            format!(
                "INSERT INTO {}.undo_log (branch_id, xid, context, rollback_info, log_status, log_created, log_modified) \
                 VALUES ({branch_id}, {values})",
                ident(&pending.schema),
            )
        })
        .collect();
    // The last INSERT goes with a plain COMMIT as one multi-statement string: one round
    // trip, and the server stops at the INSERT if it fails. (Never as two pipelined
    // commands: the COMMIT would then run after a failed INSERT.)
    let (last, first) = rows.split_last().expect("an undo record has at least one piece");
    let plain_commit = is_plain_commit(commit_sql);
    let mut failed = None;
    for insert in first.iter().chain(if plain_commit { None } else { Some(last) }) {
        let written = backend::query(backend, state, insert, limit).await?;
        if written.error.is_some() {
            failed = written.error;
            break;
        }
    }
    let mut committed = None;
    if failed.is_none() {
        let done = if plain_commit {
            backend::query_multi_statement(backend, state, &format!("{last}; COMMIT"), limit).await?
        } else {
            backend::query(backend, state, commit_sql, limit).await?
        };
        match done.error {
            Some(e) if plain_commit && done.results == 0 => failed = Some(e),
            e => committed = e,
        }
    }
    if let Some(e) = failed {
        backend::local_rollback(backend, state, limit).await?;
        let why = if e.code == 1062 {
            format!(
                "global transaction {} already rolled this branch back (it was too slow to commit)",
                pending.xid
            )
        } else {
            format!("writing the undo record failed: {}", e.message)
        };
        global.report_failed(&pending.xid, branch_id, &why).await;
        return Ok(Err(ErrPacket::new(
            1399,
            "XAE07",
            format!("XAER_RMFAIL: {why}; the local transaction was rolled back"),
        )));
    }
    if let Some(e) = committed {
        global.report_failed(&pending.xid, branch_id, &e.message).await;
        return Ok(Err(e));
    }
    tracing::info!(xid = pending.xid, branch_id, resource, "branch committed");
    Ok(Ok(()))
}

/// The client's COMMIT in a session with a pending branch: the branch is registered and its
/// undo record written first; the client gets the COMMIT's OK or the error.
pub async fn commit(client: &mut Peer, cx: &mut Cx<'_>, sql: &str) -> Result<(), SessionError> {
    let reply = match commit_branch(cx, sql).await? {
        Ok(()) => crate::protocol::resultset::ok(cx.state.status),
        Err(e) => e.to_packet(1),
    };
    client.write_all(&reply).await.map_err(|_| SessionError::ClientClosed)
}

/// Whether the client's `sql` is a COMMIT that means no more than the proxy's own would
/// (`COMMIT`, `COMMIT WORK`, any case, a trailing `;`): it may then go behind the undo
/// record's INSERT in one string. Anything else (AND CHAIN, RELEASE, comments) runs as sent.
fn is_plain_commit(sql: &str) -> bool {
    let words: Vec<&str> = sql.trim().trim_end_matches(';').split_ascii_whitespace().collect();
    match words.as_slice() {
        [commit] => commit.eq_ignore_ascii_case("COMMIT"),
        [commit, work] => commit.eq_ignore_ascii_case("COMMIT") && work.eq_ignore_ascii_case("WORK"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_plain_commit;

    #[test]
    fn only_a_plain_commit_is_merged() {
        for sql in ["COMMIT", "commit", " Commit Work; ", "COMMIT;"] {
            assert!(is_plain_commit(sql), "{sql}");
        }
        for sql in [
            "COMMIT AND CHAIN",
            "COMMIT RELEASE",
            "COMMIT -- done",
            "COMMIT /* x */",
            "",
        ] {
            assert!(!is_plain_commit(sql), "{sql}");
        }
    }
}
