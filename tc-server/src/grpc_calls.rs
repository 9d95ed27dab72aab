//! The per-transaction calls of the gRPC services (begin, commit, rollback, register,
//! report, lock query, guard tables): one handler each, shared by its unary method
//! (`grpc.rs`) and by calls made on a resource manager's Attach stream (`answer`), and the
//! token check both use.

use std::sync::Arc;

use ferrata_rpc::{ErrorCode, pb};
use tonic::Status;

use crate::auth::{Permission, Tokens};
use crate::coordinator::{Coordinator, Outcome};
use crate::error::TcError;
use crate::model::BranchStatus;
use crate::namespaces::Namespaces;
use crate::xid::format_xid;

pub(crate) fn outcome_pb(o: Outcome) -> pb::GlobalOutcome {
    pb::GlobalOutcome {
        xid: o.xid,
        status: o.status.to_pb() as i32,
        failure: o.failure.map(|f| f.to_pb()),
    }
}

pub(crate) fn status(e: TcError) -> Status {
    e.to_status()
}

/// Refuses a caller whose `Authorization` header names no token whose role grants `need`.
pub(crate) fn authorize(tokens: &Tokens, header: Option<&str>, need: Permission, what: &str) -> Result<(), Status> {
    let caller = tokens.authenticate(header, crate::model::now_ms()).map_err(status)?;
    caller.require(need, what).map_err(status)
}

pub(crate) const TRANSACT: (Permission, &str) = (Permission::Transact, "begin or end global transactions");
pub(crate) const RESOURCE: (Permission, &str) = (Permission::Resource, "act as a resource manager");

pub(crate) async fn global_begin(
    c: &Coordinator,
    r: pb::GlobalBeginRequest,
) -> Result<pb::GlobalBeginResponse, Status> {
    let xid = c.begin(r.timeout_ms, r.name).await.map_err(status)?;
    Ok(pb::GlobalBeginResponse { xid })
}

pub(crate) async fn global_commit(c: &Arc<Coordinator>, r: pb::XidRequest) -> Result<pb::GlobalOutcome, Status> {
    c.commit(&r.xid).await.map(outcome_pb).map_err(status)
}

pub(crate) async fn global_rollback(c: &Arc<Coordinator>, r: pb::XidRequest) -> Result<pb::GlobalOutcome, Status> {
    c.rollback(&r.xid).await.map(outcome_pb).map_err(status)
}

pub(crate) async fn branch_register(
    c: &Coordinator,
    r: pb::BranchRegisterRequest,
) -> Result<pb::BranchRegisterResponse, Status> {
    let branch_id = c.register(r).await.map_err(status)?;
    Ok(pb::BranchRegisterResponse { branch_id })
}

pub(crate) async fn branch_report(
    c: &Coordinator,
    r: pb::BranchReportRequest,
) -> Result<pb::BranchReportResponse, Status> {
    let reported = pb::BranchStatus::try_from(r.status)
        .ok()
        .and_then(BranchStatus::from_pb)
        .ok_or_else(|| {
            status(TcError::invalid(format!(
                "branch status {} is not one this coordinator knows",
                r.status
            )))
        })?;
    c.report(&r.xid, r.branch_id, reported, r.reason)
        .await
        .map_err(status)?;
    Ok(pb::BranchReportResponse {})
}

pub(crate) async fn lock_query(c: &Coordinator, r: pb::LockQueryRequest) -> Result<pb::LockQueryResponse, Status> {
    let o = c
        .lock_query(&r.xid, &r.resource_id, &r.locks, r.lock_wait_ms)
        .await
        .map_err(status)?;
    let holders = o
        .holders
        .into_iter()
        .map(|(key, txn, global)| {
            let parts = key.parts();
            pb::LockHolder {
                xid: format_xid(txn),
                status: global.map_or(pb::GlobalStatus::Unknown, |s| s.to_pb()) as i32,
                schema: parts.schema.to_owned(),
                table: parts.table.to_owned(),
                row: Some(key.row_pb()),
            }
        })
        .collect();
    Ok(pb::LockQueryResponse {
        lockable: o.lockable,
        holders,
    })
}

pub(crate) async fn guard_tables(
    c: &Coordinator,
    r: pb::GuardTablesRequest,
) -> Result<pb::GuardTablesResponse, Status> {
    c.guard_tables(&r.xid, &r.tables, r.lock_wait_ms)
        .await
        .map_err(status)?;
    Ok(pb::GuardTablesResponse {})
}

/// Runs a call made on an Attach stream as its unary twin would run (at the coordinator of
/// its XID's namespace), for the token the stream was opened with (checked now, so a revoked
/// or expired one stops working at once); its answer.
pub(crate) async fn answer(namespaces: &Namespaces, authorization: Option<&str>, call: pb::Call) -> pb::Answer {
    use pb::answer::Response as A;
    use pb::call::Request as Q;
    let answered = match call.request {
        None => Err(ErrorCode::RmProtocol.status("a Call without a request", None)),
        Some(request) => {
            let (need, what) = match request {
                Q::GlobalBegin(_) | Q::GlobalCommit(_) | Q::GlobalRollback(_) => TRANSACT,
                Q::BranchRegister(_) | Q::BranchReport(_) | Q::LockQuery(_) | Q::GuardTables(_) => RESOURCE,
            };
            match authorize(&namespaces.own().tokens, authorization, need, what) {
                Err(refused) => Err(refused),
                Ok(()) => match request {
                    Q::GlobalBegin(r) => global_begin(namespaces.own(), r).await.map(A::GlobalBegin),
                    Q::GlobalCommit(r) => global_commit(&namespaces.of(&r.xid), r).await.map(A::Outcome),
                    Q::GlobalRollback(r) => global_rollback(&namespaces.of(&r.xid), r).await.map(A::Outcome),
                    Q::BranchRegister(r) => branch_register(&namespaces.of(&r.xid), r).await.map(A::BranchRegister),
                    Q::BranchReport(r) => branch_report(&namespaces.of(&r.xid), r).await.map(A::BranchReport),
                    Q::LockQuery(r) => lock_query(&namespaces.of(&r.xid), r).await.map(A::LockQuery),
                    Q::GuardTables(r) => guard_tables(&namespaces.of(&r.xid), r).await.map(A::GuardTables),
                },
            }
        }
    };
    pb::Answer {
        id: call.id,
        response: Some(answered.unwrap_or_else(|refused| A::Error(pb::CallError::of(&refused)))),
    }
}
