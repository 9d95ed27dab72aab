//! Multi-statement COM_QUERY strings inside a global transaction: each statement runs on its
//! own, its writes imaged as if it had come alone, all in the one local transaction (one
//! branch), and the client gets one multi-result answer, as the server would have sent it:
//! every statement's response in order, each but the last flagged MORE_RESULTS_EXISTS,
//! sequence ids running on, ending at the first error.
//!
//! Before anything runs, every statement is looked at: the string is refused whole (ERR
//! 1235) if one of them is not a write the proxy protects or a plain SELECT, SHOW or SET.
//! In autocommit the proxy runs the string in a local transaction of its own and commits
//! what ran before an error, as the server would have; the client still sees autocommit.
//! A string from a client without CLIENT_MULTI_STATEMENTS is not taken: the server parses it
//! as one statement and answers its own syntax error before anything runs. Unlike the relay,
//! this buffers each statement's response.

use super::{Cx, commit, phase1};
use crate::classify::{self, Dml, Other, StatementClass};
use crate::coordinator::refusal::not_protected as refuse;
use crate::protocol::{Capabilities, ok, response};
use crate::session::SessionError;
use crate::session::backend::{self, reply};
use crate::session::peer::Peer;
use crate::session::state::SessionState;
use crate::sql::dml;

/// Whether the proxy takes a multi-statement string of this session over.
pub fn handles(state: &SessionState) -> bool {
    state.capabilities.has(Capabilities::MULTI_STATEMENTS)
}

/// Why the string cannot run in a global transaction, if it cannot.
fn refusal(sql: &str, pieces: &[std::ops::Range<usize>], no_backslash_escapes: bool) -> Option<String> {
    for piece in pieces {
        let text = &sql[piece.clone()];
        let class = classify::classify(text.as_bytes(), no_backslash_escapes);
        match class.class {
            StatementClass::Dml(_) | StatementClass::LockingRead if class.set_statement.is_some() => {
                return Some("SET STATEMENT ... FOR a write or a locking read inside a multi-statement string".into());
            }
            StatementClass::Dml(Dml::Insert | Dml::Update | Dml::Delete | Dml::Replace) => {
                let planned = match dml::plan_multi(text) {
                    Some(multi) => multi.map(|_| ()),
                    None => dml::plan(text).map(|_| ()),
                };
                if let Err(why) = planned {
                    return Some(why);
                }
            }
            StatementClass::Other(Other::Select | Other::Show | Other::Set) => {}
            StatementClass::LockingRead => {
                return Some("a locking read inside a multi-statement string (send it on its own)".into());
            }
            _ => {
                return Some(format!(
                    "a multi-statement string with {:?} (only INSERT, UPDATE, DELETE, REPLACE, SELECT, SHOW and SET)",
                    text.split_whitespace().next().unwrap_or_default()
                ));
            }
        }
    }
    None
}

/// Runs the multi-statement string `sql` of a bound session and answers the client.
pub async fn run(client: &mut Peer, cx: &mut Cx<'_>, sql: &str) -> Result<(), SessionError> {
    let pieces = match dml::split_statements(sql) {
        Ok(p) => p,
        Err(why) => return reply(client, refuse(&why, cx.xid)).await,
    };
    if let Some(why) = refusal(sql, &pieces, cx.state.no_backslash_escapes()) {
        return reply(client, refuse(&why, cx.xid)).await;
    }
    let autocommit = cx.state.autocommit() && !cx.state.in_transaction();
    let before = cx.state.status;
    if autocommit && let Err(e) = backend::begin_own(cx.backend, cx.state, cx.limit).await? {
        return reply(client, e).await;
    }
    let mut answer = Vec::new();
    let mut seq = 1u8;
    for (i, piece) in pieces.iter().enumerate() {
        let text = &sql[piece.clone()];
        let raw = backend::query_packet(text);
        let class = classify::classify(text.as_bytes(), cx.state.no_backslash_escapes());
        let mut response = match class.class {
            StatementClass::Dml(_) => phase1::protected(cx, text, &[], &raw).await?,
            _ => match backend::run_client_statement(cx.backend, cx.state, cx.limit, &raw, false).await? {
                Ok((response, _)) | Err(response) => response,
            },
        };
        let failed = response::ends_in_error(&response);
        let more = !failed && i + 1 < pieces.len();
        seq = ok::chain_response(&mut response, more, seq);
        answer.extend_from_slice(&response);
        if failed {
            break;
        }
    }
    if autocommit {
        // What ran before an error stays, as each statement would have committed alone.
        if let Err(e) = commit::commit_branch(cx, "COMMIT").await? {
            return reply(client, e).await;
        }
        backend::as_autocommit(&mut answer, cx.state, before);
    }
    client.write_all(&answer).await.map_err(|_| SessionError::ClientClosed)
}
