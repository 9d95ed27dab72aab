//! A global decision (COMMIT GLOBAL, ROLLBACK GLOBAL) asked of the coordinator. Both are
//! idempotent there: asking again answers the outcome of the first request, also after a
//! coordinator restart (it keeps finished outcomes). So a transport failure, after which the
//! request may or may not have been carried out, is answered by asking again (on the next
//! node, or the same one once it is back) for up to `[coordinator] outcome_wait_ms`. Only
//! then does the client hear that the outcome is unknown, with its own error code and how
//! to learn the outcome; "nothing was changed" is said only when no request was ever sent.

use std::time::Duration;

use ferrata_rpc::{ErrorCode, pb};
use tokio::time::Instant;

use super::{Global, answered_within, coordinator_error, never_sent, unreachable};
use crate::protocol::err::ErrPacket;

/// The error code of an unknown outcome (ER_ERROR_DURING_COMMIT), with SQLSTATE 08007,
/// the standard's "transaction resolution unknown".
pub const UNKNOWN_OUTCOME: u16 = 1180;

/// A rollback's answer may wait for the branches (the coordinator's `rollback_wait_ms`,
/// 30 s by default): its attempts get this much longer than `outcome_wait_ms`.
const ROLLBACK_ALLOWANCE: Duration = Duration::from_secs(60);

/// First pause between two attempts; doubles up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);

impl Global {
    /// Asks the coordinator to commit (`commit`) or roll back `xid`; its answer, or the error
    /// the client gets.
    pub async fn decide(&self, xid: &str, commit: bool) -> Result<pb::GlobalOutcome, ErrPacket> {
        let (label, what) = if commit {
            ("commit", "commit the global transaction")
        } else {
            ("rollback", "roll back the global transaction")
        };
        let give_up = Instant::now() + self.outcome_wait;
        let allowance = if commit { Duration::ZERO } else { ROLLBACK_ALLOWANCE };
        let mut pause = FIRST_PAUSE;
        // A request left this proxy: the coordinator may have carried it out.
        let mut sent = false;
        loop {
            let cause = match self.link.client(Some(xid)).await {
                Err(e) => e.0,
                Ok(mut c) => {
                    let request = pb::XidRequest { xid: xid.to_owned() };
                    let answer = async {
                        if commit {
                            c.global_commit(request).await
                        } else {
                            c.global_rollback(request).await
                        }
                    };
                    let wait = give_up.saturating_duration_since(Instant::now()) + allowance;
                    match answered_within(wait, answer).await {
                        Ok(r) if r.status == pb::GlobalStatus::Committing as i32 => {
                            sent = true;
                            "the commit decision is still being written".to_owned()
                        }
                        Ok(r) => return Ok(r),
                        Err(status) => match ErrorCode::of(&status) {
                            // Refused before anything was done: a node shutting down.
                            Some(ErrorCode::ShuttingDown) => status.message().to_owned(),
                            // The decision's write may or may not be on disk.
                            Some(ErrorCode::StoreFailed) => {
                                sent = true;
                                status.message().to_owned()
                            }
                            Some(_) => return Err(coordinator_error(&status, what)),
                            None => {
                                self.link.failed(&status).await;
                                sent |= !never_sent(&status);
                                status.message().to_owned()
                            }
                        },
                    }
                }
            };
            if Instant::now() + pause > give_up {
                if !sent {
                    return Err(unreachable(&cause, what));
                }
                metrics::counter!("ferrata_proxy_unknown_outcomes_total", "call" => label).increment(1);
                tracing::error!(xid, call = label, cause, "outcome of the global decision unknown");
                return Err(unknown_outcome(xid, commit, &cause, self.outcome_wait));
            }
            metrics::counter!("ferrata_proxy_decision_retries_total", "call" => label).increment(1);
            tracing::warn!(xid, call = label, cause, "asking the coordinator again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

/// The client's error when a decision was sent but its answer never came.
fn unknown_outcome(xid: &str, commit: bool, cause: &str, waited: Duration) -> ErrPacket {
    let (statement, effect) = if commit {
        ("COMMIT GLOBAL", "committed")
    } else {
        ("ROLLBACK GLOBAL", "rolled back")
    };
    ErrPacket::new(
        UNKNOWN_OUTCOME,
        "08007",
        format!(
            "the outcome of {statement} for {xid} is unknown: ferrata-proxy sent it to the transaction coordinator \
             but got no answer ({cause}) and could not learn the outcome within {} ms; the global transaction \
             may have been {effect}. Do not repeat its work: once the coordinator is back, send {statement} '{xid}' \
             again (it answers the first request's outcome) or SHOW GLOBAL TRANSACTION",
            waited.as_millis()
        ),
    )
}
