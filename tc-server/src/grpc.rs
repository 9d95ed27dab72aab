//! The gRPC services: transaction-manager and resource-manager calls mapped onto the
//! coordinator, the token check, and each resource manager's Attach stream (hello, the
//! complete guard set, heartbeats both ways with numbered ones answered, guard
//! acknowledgements, answers to phase-2 commands, and calls made on the stream, each run as
//! its unary twin and answered on it).

use std::sync::Arc;
use std::time::Duration;

use ferrata_rpc::pb::lock_authority_server::LockAuthorityServer;
use ferrata_rpc::pb::resource_manager_server::ResourceManagerServer;
use ferrata_rpc::pb::transaction_manager_server::TransactionManagerServer;
use ferrata_rpc::{ErrorCode, pb};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::at::guards::TableGuards;
use crate::auth::{Permission, Tokens};
use crate::calls::branch::Payload;
use crate::coordinator::Coordinator;
use crate::error::TcError;
use crate::grpc_calls::{
    RESOURCE, TRANSACT, authorize, branch_register, branch_report, global_begin, global_commit, global_rollback,
    guard_tables, lock_query, outcome_pb, status,
};
use crate::lock_leader::{LeaderSlot, LockService};
use crate::msg::MsgBranch;
use crate::namespaces::Namespaces;

/// The interceptor that refuses calls without a token whose role grants the service's
/// permission (`what` says what the service is for, in the refusal).
#[derive(Clone)]
pub struct TokenCheck {
    tokens: Arc<Tokens>,
    need: Permission,
    what: &'static str,
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        authorize(&self.tokens, header, self.need, self.what)?;
        Ok(request)
    }
}

pub type TmServer = InterceptedService<TransactionManagerServer<TmService>, TokenCheck>;
pub type RmServer = InterceptedService<ResourceManagerServer<RmService>, TokenCheck>;

/// Both services as `ferrata-tc` serves them for the coordinators of `namespaces`: behind the
/// token check (transaction managers need the application or proxy role, resource managers
/// the proxy role, as the node's own tokens grant them), decoding messages of at most
/// `max_message_bytes`.
pub fn services(namespaces: &Arc<Namespaces>, max_message_bytes: usize) -> (TmServer, RmServer) {
    let check = |(need, what)| TokenCheck {
        tokens: Arc::clone(&namespaces.own().tokens),
        need,
        what,
    };
    (
        InterceptedService::new(
            TransactionManagerServer::new(TmService(Arc::clone(namespaces)))
                .max_decoding_message_size(max_message_bytes),
            check(TRANSACT),
        ),
        InterceptedService::new(
            ResourceManagerServer::new(RmService(Arc::clone(namespaces))).max_decoding_message_size(max_message_bytes),
            check(RESOURCE),
        ),
    )
}

pub type LockServer = InterceptedService<LockAuthorityServer<LockService>, TokenCheck>;

/// The lock authority's service for the nodes of a cluster, served by whichever leader
/// `slot` holds, behind the token check (the cluster's root token, of `tokens`).
pub fn lock_service(slot: &Arc<LeaderSlot>, tokens: Arc<Tokens>, max_message_bytes: usize) -> LockServer {
    InterceptedService::new(
        LockAuthorityServer::new(LockService(Arc::clone(slot))).max_decoding_message_size(max_message_bytes),
        TokenCheck {
            tokens,
            need: Permission::Node,
            what: "act as a node of the coordinator cluster",
        },
    )
}

/// Each call at the coordinator of its XID's namespace (a begin at the node's own).
pub struct TmService(pub Arc<Namespaces>);

#[tonic::async_trait]
impl pb::transaction_manager_server::TransactionManager for TmService {
    async fn global_begin(
        &self,
        request: Request<pb::GlobalBeginRequest>,
    ) -> Result<Response<pb::GlobalBeginResponse>, Status> {
        global_begin(self.0.own(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn global_commit(&self, request: Request<pb::XidRequest>) -> Result<Response<pb::GlobalOutcome>, Status> {
        let r = request.into_inner();
        global_commit(&self.0.of(&r.xid), r).await.map(Response::new)
    }

    async fn global_rollback(&self, request: Request<pb::XidRequest>) -> Result<Response<pb::GlobalOutcome>, Status> {
        let r = request.into_inner();
        global_rollback(&self.0.of(&r.xid), r).await.map(Response::new)
    }

    async fn global_status(&self, request: Request<pb::XidRequest>) -> Result<Response<pb::GlobalOutcome>, Status> {
        let xid = request.into_inner().xid;
        let o = self.0.of(&xid).status(&xid).map_err(status)?;
        Ok(Response::new(outcome_pb(o)))
    }

    async fn messages_prepare(
        &self,
        request: Request<pb::MessagesPrepareRequest>,
    ) -> Result<Response<pb::GlobalBeginResponse>, Status> {
        let r = request.into_inner();
        let messages = r
            .messages
            .into_iter()
            .map(|m| MsgBranch {
                name: m.name,
                target: m.target,
                payload: Payload {
                    data: m.data,
                    headers: m.headers.into_iter().collect(),
                    request_timeout_ms: (m.request_timeout_ms != 0).then_some(m.request_timeout_ms),
                    gid: None,
                },
                policy: m.policy,
                key: m.key,
                delay_ms: m.delay_ms,
                query_prepared: String::new(),
                check_resource: r.resource_id.clone(),
                check_barrier: r.barrier.clone(),
                barrier_confirmed: false,
            })
            .collect();
        if !r.xid.is_empty() {
            self.0
                .of(&r.xid)
                .join_messages(&r.xid, messages)
                .await
                .map_err(status)?;
            return Ok(Response::new(pb::GlobalBeginResponse { xid: r.xid }));
        }
        if !r.barrier.is_empty() {
            return Err(status(TcError::invalid(
                "barrier names the barrier row of messages joining a global transaction: send the xid too",
            )));
        }
        Coordinator::check_name(&r.name).map_err(status)?;
        let xid = self
            .0
            .own()
            .prepare_messages(r.name, r.timeout_ms, messages)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GlobalBeginResponse { xid }))
    }
}

/// Each call at the coordinator of its XID's namespace; Attach streams at the node's own
/// (the resource managers they register are every coordinator's here).
pub struct RmService(pub Arc<Namespaces>);

#[tonic::async_trait]
impl pb::resource_manager_server::ResourceManager for RmService {
    async fn branch_register(
        &self,
        request: Request<pb::BranchRegisterRequest>,
    ) -> Result<Response<pb::BranchRegisterResponse>, Status> {
        let r = request.into_inner();
        branch_register(&self.0.of(&r.xid), r).await.map(Response::new)
    }

    async fn branch_report(
        &self,
        request: Request<pb::BranchReportRequest>,
    ) -> Result<Response<pb::BranchReportResponse>, Status> {
        let r = request.into_inner();
        branch_report(&self.0.of(&r.xid), r).await.map(Response::new)
    }

    async fn xa_orphan(&self, request: Request<pb::XaOrphanRequest>) -> Result<Response<pb::XaOrphanResponse>, Status> {
        let r = request.into_inner();
        self.0
            .of(&r.xid)
            .xa_orphan(&r.xid, r.branch_id)
            .map(Response::new)
            .map_err(status)
    }

    async fn lock_query(
        &self,
        request: Request<pb::LockQueryRequest>,
    ) -> Result<Response<pb::LockQueryResponse>, Status> {
        let r = request.into_inner();
        lock_query(&self.0.of(&r.xid), r).await.map(Response::new)
    }

    async fn guard_tables(
        &self,
        request: Request<pb::GuardTablesRequest>,
    ) -> Result<Response<pb::GuardTablesResponse>, Status> {
        let r = request.into_inner();
        guard_tables(&self.0.of(&r.xid), r).await.map(Response::new)
    }

    type AttachStream = ReceiverStream<Result<pb::TcMessage, Status>>;

    async fn attach(&self, request: Request<Streaming<pb::RmMessage>>) -> Result<Response<Self::AttachStream>, Status> {
        let namespaces = Arc::clone(&self.0);
        let coordinator = Arc::clone(namespaces.own());
        let interval = coordinator.config.phase2.heartbeat_interval();
        let silence = interval * 3;
        // Checked again for each call made on the stream.
        let authorization: Option<Arc<str>> = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(Arc::from);
        let mut inbound = request.into_inner();
        let protocol = |m: &str| ErrorCode::RmProtocol.status(m.to_owned(), None);
        let hello = match tokio::time::timeout(silence, inbound.message()).await {
            Ok(Ok(Some(pb::RmMessage {
                kind: Some(pb::rm_message::Kind::Hello(h)),
            }))) => h,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(protocol("no Hello within three heartbeat intervals")),
            _ => return Err(protocol("the first message on Attach must be Hello")),
        };
        // A resource manager may name its resources later, with Announce (a proxy learns of a
        // database when a session first writes to it).
        if hello.resource_ids.iter().any(|r| r.is_empty()) {
            return Err(protocol("Hello must not name an empty resource id"));
        }
        let (tx, rx) = mpsc::channel(1024);
        // The stream runs the guard protocol for the locks this node holds; when that
        // changes (the node begins or stops leading a cluster's locks) it ends, and the
        // resource manager attaches again to learn the new guard set.
        let (held, held_changed) = coordinator.at.held_here_until_changed();
        // Likewise when the namespaces served here change: the resource manager learns
        // where to send each transaction's calls from the Welcome. Watched before they are
        // read, so that no change in between goes unseen.
        let served_changed = namespaces.changed();
        let served = namespaces.served();
        let guards = held.map(|at| Arc::clone(&at.guards));
        let welcome = pb::TcMessage {
            kind: Some(pb::tc_message::Kind::Welcome(pb::Welcome {
                heartbeat_interval_ms: interval.as_millis() as u64,
                // 0: this node sends no guards: its locks are a cluster lock leader's, which
                // confirms guards with the resource managers attached to its own node.
                guard_lease_ms: guards.as_ref().map_or(0, |g| g.lease().as_millis() as u64),
                max_call_bytes: coordinator.config.max_message_bytes() as u64,
                serving: coordinator.config.etcd.serving(),
                node_id: coordinator.config.node_id.into(),
                namespaces: served.into_iter().map(u32::from).collect(),
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("the stream closed"))?;
        let conn = coordinator.rms.attach(&hello, tx.clone());
        coordinator
            .metrics
            .resource_managers
            .set(coordinator.rms.connected() as f64);
        tracing::info!(rm_id = hello.rm_id, resources = ?hello.resource_ids, "resource manager attached");
        tokio::spawn(async move {
            // In this task, which nothing cancels: once registered, the connection is
            // detached below whatever happens. A closed stream fails here and ends below.
            if let Some(guards) = &guards {
                guards.attach(&conn).await;
            }
            let stream = Stream {
                conn: &conn,
                guards: guards.as_ref(),
                changed: Box::pin(async move {
                    tokio::select! {
                        () = held_changed => {}
                        () = served_changed => {}
                    }
                }),
                authorization,
                tx: &tx,
            };
            let reason = serve_stream(&namespaces, stream, &mut inbound, interval, silence).await;
            match &guards {
                Some(guards) => guards.detach(&conn),
                None => coordinator.rms.detach(&conn),
            }
            coordinator
                .metrics
                .resource_managers
                .set(coordinator.rms.connected() as f64);
            tracing::info!(rm_id = conn.rm_id, reason, "resource manager detached");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Calls one stream may have running at once; more are refused (a proxy has one per session
/// waiting for an answer).
const MAX_CALLS_IN_FLIGHT: usize = 65_536;

/// How long a stream's running calls may take to finish when the coordinator stops.
const CALL_DRAIN: Duration = Duration::from_secs(5);

/// An attached stream, as its serving loop knows it.
struct Stream<'a> {
    conn: &'a Arc<crate::rm::RmConnection>,
    /// The guards it was told of in its Welcome, if any.
    guards: Option<&'a Arc<TableGuards>>,
    /// Completes when the locks held on this node change (it begins or stops leading a
    /// cluster's) or the namespaces it serves do: the stream ends, and its resource manager
    /// attaches again for the new guard set and namespaces.
    changed: crate::at::authority::Changed,
    /// The stream's token, checked again for each call made on it.
    authorization: Option<Arc<str>>,
    tx: &'a mpsc::Sender<Result<pb::TcMessage, Status>>,
}

/// Runs one attached stream until it ends; returns why it ended. Calls still running when
/// it ends otherwise than by the coordinator's shutdown are cancelled, as unary calls are when
/// their connection breaks.
async fn serve_stream(
    namespaces: &Arc<Namespaces>,
    Stream {
        conn,
        guards,
        mut changed,
        authorization,
        tx,
    }: Stream<'_>,
    inbound: &mut Streaming<pb::RmMessage>,
    interval: Duration,
    silence: Duration,
) -> &'static str {
    let coordinator = namespaces.own();
    let mut calls = tokio::task::JoinSet::new();
    let mut beat = tokio::time::interval(interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut deadline = tokio::time::Instant::now() + silence;
    // Set when the locks held here changed: the stream takes no more commands or calls, and
    // ends once the calls it took on are answered (or this time has passed).
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        if let Some(until) = closing
            && (calls.is_empty() || tokio::time::Instant::now() >= until)
        {
            let e = ErrorCode::LockAuthorityUnavailable.status(
                "this node began or stopped leading the cluster's locks, or adopted or handed back a namespace: attach \
                 again for its guard set and namespaces",
                None,
            );
            let _ = tx.send(Err(e)).await;
            return "the locks or namespaces served here changed";
        }
        tokio::select! {
            message = inbound.message() => {
                deadline = tokio::time::Instant::now() + silence;
                match message {
                    Ok(Some(pb::RmMessage { kind: Some(pb::rm_message::Kind::Results(results)) })) => {
                        if !conn.answer(results) {
                            tracing::debug!(rm_id = conn.rm_id, "answer for a command no longer waited for");
                        }
                    }
                    Ok(Some(pb::RmMessage { kind: Some(pb::rm_message::Kind::Call(call)) })) => {
                        coordinator.metrics.stream_calls.increment(1);
                        let refused = if closing.is_some() {
                            Some(ErrorCode::LockAuthorityUnavailable.status(
                                "this Attach stream is closing (the node began or stopped leading the cluster's locks, or its namespaces changed); nothing was done: make the call again",
                                None,
                            ))
                        } else if calls.len() >= MAX_CALLS_IN_FLIGHT {
                            Some(ErrorCode::RmProtocol.status(
                                format!("more than {MAX_CALLS_IN_FLIGHT} calls in flight on one Attach stream; wait for answers"),
                                None,
                            ))
                        } else {
                            None
                        };
                        if let Some(refused) = refused {
                            let answer = pb::Answer { id: call.id, response: Some(pb::answer::Response::Error(pb::CallError::of(&refused))) };
                            if tx.send(Ok(pb::TcMessage { kind: Some(pb::tc_message::Kind::Answer(answer)) })).await.is_err() {
                                return "closed";
                            }
                            continue;
                        }
                        // Each call in its own task: one waiting for rows holds up nothing
                        // else on the stream.
                        let namespaces = Arc::clone(namespaces);
                        let authorization = authorization.clone();
                        let tx = tx.clone();
                        calls.spawn(async move {
                            let answer = crate::grpc_calls::answer(&namespaces, authorization.as_deref(), call).await;
                            let answer = pb::TcMessage { kind: Some(pb::tc_message::Kind::Answer(answer)) };
                            // A closed stream fails the caller's wait: its outcome is unknown.
                            let _ = tx.send(Ok(answer)).await;
                        });
                    }
                    Ok(Some(pb::RmMessage { kind: Some(pb::rm_message::Kind::Heartbeat(h)) })) => {
                        if h.seq > 0 {
                            // Recorded before the answer goes out: the resource manager
                            // trusts its guard set until a lease past its sending, which
                            // came before this.
                            conn.answered(Instant::now());
                            let answer = pb::TcMessage {
                                kind: Some(pb::tc_message::Kind::Heartbeat(pb::Heartbeat { seq: 0, echo: h.seq })),
                            };
                            if tx.send(Ok(answer)).await.is_err() {
                                return "closed";
                            }
                        }
                    }
                    Ok(Some(pb::RmMessage { kind: Some(pb::rm_message::Kind::GuardAck(ack)) })) => {
                        let Some(guards) = guards else {
                            let _ = tx.send(Err(ErrorCode::RmProtocol.status("GuardAck to a node that sends no guards", None))).await;
                            return "protocol error";
                        };
                        if ack.seq > guards.seq() {
                            let _ = tx.send(Err(ErrorCode::RmProtocol.status(format!("GuardAck for update {} that was never sent", ack.seq), None))).await;
                            return "protocol error";
                        }
                        guards.acked(conn, ack.seq);
                    }
                    Ok(Some(pb::RmMessage { kind: Some(pb::rm_message::Kind::Announce(a)) })) => {
                        if a.resource_ids.iter().any(|r| r.is_empty()) {
                            let _ = tx.send(Err(ErrorCode::RmProtocol.status("Announce with an empty resource id", None))).await;
                            return "protocol error";
                        }
                        tracing::info!(rm_id = conn.rm_id, resources = ?a.resource_ids, "resources announced");
                        coordinator.rms.announce(conn, a.resource_ids);
                    }
                    Ok(Some(_)) => {
                        let _ = tx.send(Err(ErrorCode::RmProtocol.status("only Results, Heartbeat, Announce, GuardAck and Call may follow Hello", None))).await;
                        return "protocol error";
                    }
                    Ok(None) => return "closed by the resource manager",
                    Err(_) => return "stream error",
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = tx.send(Err(Status::deadline_exceeded("no message from the resource manager for three heartbeat intervals"))).await;
                return "silent for three heartbeat intervals";
            }
            _ = beat.tick() => {
                let heartbeat = pb::TcMessage { kind: Some(pb::tc_message::Kind::Heartbeat(pb::Heartbeat { seq: 0, echo: 0 })) };
                if tx.send(Ok(heartbeat)).await.is_err() {
                    return "closed";
                }
            }
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            _ = coordinator.shutdown.cancelled() => {
                // Calls already taken on are answered (the coordinator refuses new work
                // meanwhile) before the stream ends, as unary calls are drained.
                let drained = async { while calls.join_next().await.is_some() {} };
                let _ = tokio::time::timeout(CALL_DRAIN, drained).await;
                let _ = tx.send(Err(TcError::shutting_down().to_status())).await;
                return "coordinator shutting down";
            }
            () = &mut changed, if closing.is_none() => {
                // No command is sent here any more; the answers to those sent before, and
                // the calls taken on, are still served.
                coordinator.rms.detach(conn);
                closing = Some(tokio::time::Instant::now() + CALL_DRAIN);
            }
            () = tokio::time::sleep_until(closing.unwrap_or(deadline)), if closing.is_some() => {}
        }
    }
}
