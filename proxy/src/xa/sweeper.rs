//! The orphan sweep: every `[service] xa_sweep_interval_ms` each proxy lists Ferrata's
//! prepared branches on its server (`XA RECOVER`, Ferrata's format id) and settles them as
//! the coordinator says (`XaOrphan`; one a session here holds, through that session, on its
//! own connection): commit one that is part of a
//! decided commit, roll back one the transaction rolls back or left out (a proxy that died
//! between `XA PREPARE` and its report leaves such a branch, which no phase 2 would ever
//! reach), leave one of a running transaction or one that waits for an operator, and
//! quarantine one whose XID the coordinator does not know: reported every sweep, never
//! finished on a guess. A branch still attached to a live connection elsewhere refuses
//! (XAER_NOTA) and is tried again at the next sweep. Metrics: how many are prepared, the
//! oldest one's age (since this proxy first saw it), how many are quarantined.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrata_rpc::pb;
use ferrata_rpc::pb::xa_orphan_response::Verdict;
use mysql_async::prelude::*;
use tokio_util::sync::CancellationToken;

use super::Xa;
use super::phase2::prepared;
use super::xid::XaId;
use crate::coordinator::answered_within;

/// Sweeps until `stop`.
pub async fn sweep_orphans(xa: Arc<Xa>, every: Duration, stop: CancellationToken) {
    let mut first_seen: HashMap<XaId, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = sweep(&xa, &mut first_seen).await {
            tracing::warn!(error = e, "the XA orphan sweep failed; retried at the next one");
        }
    }
}

async fn sweep(xa: &Xa, first_seen: &mut HashMap<XaId, Instant>) -> Result<(), String> {
    // XA RECOVER lists the whole server's branches, whichever database it runs in.
    let resource = xa.global.resource("information_schema");
    let mut conn = xa.global.service_conn(&resource).await.map_err(|e| e.to_string())?;
    let listed = prepared(&mut conn).await.map_err(|e| e.to_string())?;
    let now = Instant::now();
    first_seen.retain(|id, _| listed.contains(id));
    for id in &listed {
        first_seen.entry(id.clone()).or_insert(now);
    }
    let oldest = first_seen.values().map(|seen| now - *seen).max().unwrap_or_default();
    metrics::gauge!("ferrata_proxy_xa_prepared_branches").set(listed.len() as f64);
    metrics::gauge!("ferrata_proxy_xa_prepared_oldest_seconds").set(oldest.as_secs_f64());
    let mut quarantined = 0;
    for id in listed {
        let held = xa.held.inbox(&id.xid, id.branch_id);
        let answer = match ask(xa, &id).await {
            Ok(a) => a,
            Err(e) => {
                return Err(format!(
                    "the coordinator could not say what to do with XA branch {id:?}: {e}"
                ));
            }
        };
        let age = first_seen.get(&id).map_or(0, |seen| (now - *seen).as_secs());
        let statuses = || {
            (
                ferrata_rpc::global_status_name(answer.global_status),
                format!("{:?}", answer.branch_status()),
            )
        };
        let verb = match (answer.verdict(), held) {
            // Held here: its session finishes it on its own connection (phase 2 may never come
            // for a branch the decision left out).
            (v @ (Verdict::Commit | Verdict::Rollback), Some(inbox)) => {
                let (reply, _) = tokio::sync::oneshot::channel();
                let commit = v == Verdict::Commit;
                let _ = inbox.try_send(super::held::Request { commit, reply });
                continue;
            }
            (Verdict::Commit, None) => "COMMIT",
            (Verdict::Rollback, None) => "ROLLBACK",
            (Verdict::UnknownXid, _) => {
                quarantined += 1;
                tracing::warn!(
                    xid = id.xid,
                    branch_id = id.branch_id,
                    seen_for_s = age,
                    "a prepared Ferrata XA branch whose XID the coordinator does not know is quarantined: it keeps its row \
                     locks until a DBA commits or rolls it back on the server (XA RECOVER FORMAT='SQL' names it)"
                );
                continue;
            }
            (Verdict::Hold, _) => {
                let (global, branch) = statuses();
                tracing::info!(
                    xid = id.xid,
                    branch_id = id.branch_id,
                    global,
                    branch,
                    "prepared XA branch left to an operator"
                );
                continue;
            }
            (Verdict::Wait | Verdict::Unknown, _) => continue,
        };
        match conn.query_drop(format!("XA {verb} {}", id.sql())).await {
            Ok(()) => {
                let (global, branch) = statuses();
                tracing::info!(
                    xid = id.xid,
                    branch_id = id.branch_id,
                    action = verb,
                    global,
                    branch,
                    "orphaned XA branch settled"
                );
                metrics::counter!("ferrata_proxy_xa_orphans_settled_total", "action" => verb).increment(1);
            }
            // Attached to a live connection elsewhere, or finished meanwhile: next sweep.
            Err(e) => {
                tracing::debug!(xid = id.xid, branch_id = id.branch_id, error = %e, "orphaned XA branch not settled yet")
            }
        }
    }
    metrics::gauge!("ferrata_proxy_xa_quarantined_branches").set(f64::from(quarantined));
    Ok(())
}

async fn ask(xa: &Xa, id: &XaId) -> Result<pb::XaOrphanResponse, String> {
    let mut c = xa.global.link.client(Some(&id.xid)).await.map_err(|e| e.0)?;
    let request = pb::XaOrphanRequest {
        xid: id.xid.clone(),
        branch_id: id.branch_id,
    };
    answered_within(xa.global.outcome_wait, c.rm.xa_orphan(request))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_owned())
}
