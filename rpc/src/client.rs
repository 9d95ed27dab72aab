//! A client of the coordinator for transaction managers and resource managers: one channel
//! carrying both services with the bearer token, the per-transaction calls (made on an
//! Attach stream when the client has one, `calls.rs`, as unary calls otherwise), and
//! `attach`, which runs a resource manager's stream (hello, heartbeats, commands handed to a
//! handler, answers sent back, answers to its calls handed over).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::BearerToken;
use crate::calls::{CloseOnDrop, NotSent, StreamCalls};
use crate::pb;

pub type TmClient = pb::transaction_manager_client::TransactionManagerClient<InterceptedService<Channel, BearerToken>>;
pub type RmClient = pb::resource_manager_client::ResourceManagerClient<InterceptedService<Channel, BearerToken>>;

/// How to reach a coordinator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientConfig {
    /// `http://host:port`, or `https://host:port` with `tls_ca`.
    pub endpoint: String,
    pub token: Option<String>,
    /// PEM CA certificates to verify the coordinator's TLS certificate.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Largest message sent or received, in bytes.
    pub max_message_bytes: Option<usize>,
}

/// Clients of both services over one HTTP/2 connection, and the Attach stream on it that
/// carries the per-transaction calls, if there is one (`with_stream`).
#[derive(Clone)]
pub struct TcClient {
    pub tm: TmClient,
    pub rm: RmClient,
    stream: Option<StreamCalls>,
}

/// A per-transaction call: made on the client's Attach stream if it has one that is still
/// open, as the unary call of the same name otherwise.
macro_rules! stream_or_unary {
    ($(#[$doc:meta])* $name:ident: $service:ident, $request:ty => $response:ty, $call:ident, $answer:ident) => {
        $(#[$doc])*
        pub async fn $name(&mut self, request: $request) -> Result<$response, tonic::Status> {
            let mut request = request;
            if let Some(stream) = &self.stream {
                match stream.call(pb::call::Request::$call(request)).await {
                    Ok(Ok(pb::answer::Response::$answer(response))) => return Ok(response),
                    Ok(Ok(other)) => {
                        return Err(tonic::Status::internal(format!(
                            "the coordinator answered {} with {other:?}",
                            stringify!($name)
                        )));
                    }
                    Ok(Err(status)) => return Err(status),
                    Err(NotSent(pb::call::Request::$call(unsent))) => request = unsent,
                    Err(NotSent(_)) => {
                        return Err(tonic::Status::internal("a call came back unsent as another call"));
                    }
                }
            }
            self.$service.$name(request).await.map(tonic::Response::into_inner)
        }
    };
}

impl TcClient {
    /// This client, making its per-transaction calls on an Attach stream (`Attachment::calls`)
    /// opened on the same connection.
    pub fn with_stream(mut self, calls: StreamCalls) -> TcClient {
        self.stream = Some(calls);
        self
    }

    stream_or_unary!(global_begin: tm, pb::GlobalBeginRequest => pb::GlobalBeginResponse, GlobalBegin, GlobalBegin);
    stream_or_unary!(global_commit: tm, pb::XidRequest => pb::GlobalOutcome, GlobalCommit, Outcome);
    stream_or_unary!(global_rollback: tm, pb::XidRequest => pb::GlobalOutcome, GlobalRollback, Outcome);
    stream_or_unary!(branch_register: rm, pb::BranchRegisterRequest => pb::BranchRegisterResponse, BranchRegister, BranchRegister);
    stream_or_unary!(branch_report: rm, pb::BranchReportRequest => pb::BranchReportResponse, BranchReport, BranchReport);
    stream_or_unary!(lock_query: rm, pb::LockQueryRequest => pb::LockQueryResponse, LockQuery, LockQuery);
    stream_or_unary!(guard_tables: rm, pb::GuardTablesRequest => pb::GuardTablesResponse, GuardTables, GuardTables);
}

impl TcClient {
    pub async fn connect(config: &ClientConfig) -> anyhow::Result<TcClient> {
        let (channel, token) = channel(config, None).await?;
        let max = config.max_message_bytes();
        Ok(TcClient {
            tm: pb::transaction_manager_client::TransactionManagerClient::with_interceptor(
                channel.clone(),
                token.clone(),
            )
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            rm: pb::resource_manager_client::ResourceManagerClient::with_interceptor(channel, token)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            stream: None,
        })
    }
}

impl ClientConfig {
    fn max_message_bytes(&self) -> usize {
        self.max_message_bytes.unwrap_or(16 * 1024 * 1024)
    }
}

/// A client of another coordinator node's lock authority (`LockAuthority`).
pub type LockClient = pb::lock_authority_client::LockAuthorityClient<InterceptedService<Channel, BearerToken>>;

/// How often a lock client's connection is pinged, and how long it waits for the answer:
/// a stream over a connection that silently stopped carrying fails within a few seconds.
const LOCK_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(2));

pub async fn lock_client(config: &ClientConfig) -> anyhow::Result<LockClient> {
    let (channel, token) = channel(config, Some(LOCK_KEEPALIVE)).await?;
    let max = config.max_message_bytes();
    Ok(
        pb::lock_authority_client::LockAuthorityClient::with_interceptor(channel, token)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
}

/// A connection to the coordinator `config` names (pinged every `keepalive.0`, given up
/// after `keepalive.1` without an answer), and the token its calls carry.
async fn channel(
    config: &ClientConfig,
    keepalive: Option<(Duration, Duration)>,
) -> anyhow::Result<(Channel, BearerToken)> {
    let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
        .with_context(|| format!("{:?} is not a valid coordinator address", config.endpoint))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some((every, timeout)) = keepalive {
        endpoint = endpoint
            .http2_keep_alive_interval(every)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
    }
    if let Some(ca) = &config.tls_ca {
        endpoint = endpoint.tls_config(ClientTlsConfig::new().ca_certificate(read_pem(ca)?))?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the coordinator at {}", config.endpoint))?;
    let token = BearerToken::new(config.token.as_deref()).map_err(anyhow::Error::msg)?;
    Ok((channel, token))
}

fn read_pem(path: &Path) -> anyhow::Result<Certificate> {
    Ok(Certificate::from_pem(
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    ))
}

/// Runs phase-2 commands: gets each command and returns one outcome per branch.
pub type CommandHandler =
    Arc<dyn Fn(pb::BranchCommand) -> Pin<Box<dyn Future<Output = Vec<pb::BranchOutcome>> + Send>> + Send + Sync>;

/// When a guard update may be acknowledged: once the resource manager finished what it must
/// finish first (writes to the tables it guards that started before it).
pub type AckWhen = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An [`AckWhen`] that is ready at once.
pub fn ack_now() -> AckWhen {
    Box::pin(std::future::ready(()))
}

/// Receives what an Attach stream says about table guards (see `pb::GuardUpdate`).
pub trait GuardSink: Send + Sync {
    /// An update, applied before anything later on the stream is read. Its acknowledgement
    /// goes out once the returned future is ready and every earlier one went out (an
    /// acknowledgement covers every update before it); the stream is served meanwhile.
    fn update(&self, update: &pb::GuardUpdate) -> AckWhen;
    /// The coordinator answered a heartbeat sent at `sent`: every update it sent before was
    /// applied, and the set may be trusted until `sent + lease`.
    fn confirmed(&self, sent: Instant, lease: Duration);
    /// The stream ended: what it said is no longer kept current.
    fn lost(&self);
}

/// For a resource manager that does not check non-global writes (tests, tools).
pub struct IgnoreGuards;

impl GuardSink for IgnoreGuards {
    fn update(&self, _: &pb::GuardUpdate) -> AckWhen {
        ack_now()
    }
    fn confirmed(&self, _: Instant, _: Duration) {}
    fn lost(&self) {}
}

/// A running Attach stream. Dropping it closes the stream.
pub struct Attachment {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    outbound: mpsc::Sender<pb::RmMessage>,
    calls: StreamCalls,
    /// With several serving nodes, the namespaces the node attached to serves: the node ids
    /// whose XIDs it serves, its own first, then those of nodes that are down whose
    /// namespaces it adopted. `None`: it serves every XID.
    pub serving: Option<Vec<u16>>,
}

impl Attachment {
    /// Waits until the stream ends: `Ok` when the coordinator closed it, the error otherwise.
    pub async fn closed(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("the attach task panicked")?
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The stream's calls, for `TcClient::with_stream`; they fail once the stream ends.
    pub fn calls(&self) -> StreamCalls {
        self.calls.clone()
    }

    /// Announces more resources on the stream; false if the stream has ended.
    pub async fn announce(&self, resources: Vec<String>) -> bool {
        let message = pb::RmMessage {
            kind: Some(pb::rm_message::Kind::Announce(pb::Announce {
                resource_ids: resources,
            })),
        };
        !self.task.is_finished() && self.outbound.send(message).await.is_ok()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens the Attach stream with `hello` (who this is, the resources it serves), waits for the
/// coordinator's welcome, then serves commands (concurrently) with `handler`, hands guard
/// updates and answered heartbeats to `guards`, and sends heartbeats, until the stream ends.
pub async fn attach(
    rm: &mut RmClient,
    hello: pb::Hello,
    handler: CommandHandler,
    guards: Arc<dyn GuardSink>,
) -> anyhow::Result<Attachment> {
    let (tx, rx) = mpsc::channel::<pb::RmMessage>(1024);
    let hello = pb::RmMessage {
        kind: Some(pb::rm_message::Kind::Hello(hello)),
    };
    tx.send(hello).await.expect("the receiver is alive");
    let mut inbound = rm
        .attach(ReceiverStream::new(rx))
        .await
        .context("opening the Attach stream")?
        .into_inner();
    let welcome = match inbound
        .message()
        .await
        .context("waiting for the coordinator's welcome")?
    {
        Some(pb::TcMessage {
            kind: Some(pb::tc_message::Kind::Welcome(w)),
        }) => w,
        other => anyhow::bail!("the coordinator answered Hello with {other:?} instead of Welcome"),
    };
    let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(10));
    let lease = Duration::from_millis(welcome.guard_lease_ms);
    let max_call_bytes = usize::try_from(welcome.max_call_bytes).unwrap_or(usize::MAX);
    let serving = match welcome.serving {
        false => None,
        true => {
            let own = u16::try_from(welcome.node_id).context("a serving node's id above 65535")?;
            let adopted = welcome.namespaces.iter().filter(|&&n| n != welcome.node_id);
            let adopted = adopted.map(|&n| u16::try_from(n).context("a namespace above 65535"));
            Some(
                std::iter::once(Ok(own))
                    .chain(adopted)
                    .collect::<anyhow::Result<Vec<u16>>>()?,
            )
        }
    };
    // A node that sends no guards (lease 0: another node of several holds the locks) says
    // nothing of them: it must neither confirm nor unsettle the view another stream keeps.
    let guards = if lease.is_zero() {
        Arc::new(IgnoreGuards)
    } else {
        guards
    };
    let outbound = tx.clone();
    let calls = StreamCalls::new(tx.clone(), max_call_bytes);
    let closing = CloseOnDrop(calls.clone());
    let task = tokio::spawn(async move {
        let ended = serve(inbound, tx, handler, &*guards, &closing.0, interval, lease).await;
        guards.lost();
        drop(closing);
        ended
    });
    Ok(Attachment {
        task,
        outbound,
        calls,
        serving,
    })
}

/// The attach task's loop: commands, guard updates, heartbeats and their answers, answers
/// to calls.
async fn serve(
    mut inbound: tonic::Streaming<pb::TcMessage>,
    tx: mpsc::Sender<pb::RmMessage>,
    handler: CommandHandler,
    guards: &dyn GuardSink,
    calls: &StreamCalls,
    interval: Duration,
    lease: Duration,
) -> anyhow::Result<()> {
    // Handlers run in this set, owned by the task: aborting the task aborts them too, so
    // no sender outlives the attachment (whose own sender goes with it) and the stream
    // closes at once.
    let mut handlers = tokio::task::JoinSet::new();
    let mut beat = tokio::time::interval(interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Heartbeats not answered yet, oldest first: (seq, when sent).
    let mut unanswered: std::collections::VecDeque<(u64, Instant)> = std::collections::VecDeque::new();
    // Guard updates not acknowledged yet, in order: (seq, when it may be).
    let mut acks: std::collections::VecDeque<(u64, AckWhen)> = std::collections::VecDeque::new();
    let mut seq = 0u64;
    // The coordinator sends a heartbeat every interval: a stream silent for three is dead
    // (a paused node, a link that stopped carrying), as the coordinator judges ours.
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            acked = async { let (seq, when) = acks.front_mut().expect("not empty"); when.await; *seq }, if !acks.is_empty() => {
                acks.pop_front();
                let ack = pb::RmMessage {
                    kind: Some(pb::rm_message::Kind::GuardAck(pb::GuardAck { seq: acked })),
                };
                if tx.send(ack).await.is_err() {
                    return Ok(());
                }
            }
            message = inbound.message() => {
                heard = Instant::now();
                match message? {
                    Some(pb::TcMessage { kind: Some(pb::tc_message::Kind::Command(command)) }) => {
                        let handler = Arc::clone(&handler);
                        let tx = tx.clone();
                        handlers.spawn(async move {
                            let request_id = command.request_id;
                            let outcomes = handler(command).await;
                            let results = pb::RmMessage {
                                kind: Some(pb::rm_message::Kind::Results(pb::BranchResults { request_id, outcomes })),
                            };
                            let _ = tx.send(results).await;
                        });
                    }
                    Some(pb::TcMessage { kind: Some(pb::tc_message::Kind::Answer(answer)) }) => calls.answered(answer),
                    Some(pb::TcMessage { kind: Some(pb::tc_message::Kind::Guards(update)) }) => {
                        acks.push_back((update.seq, guards.update(&update)));
                    }
                    Some(pb::TcMessage { kind: Some(pb::tc_message::Kind::Heartbeat(beat)) }) if beat.echo > 0 => {
                        while let Some(&(n, sent)) = unanswered.front() {
                            if n > beat.echo {
                                break;
                            }
                            unanswered.pop_front();
                            if n == beat.echo {
                                guards.confirmed(sent, lease);
                            }
                        }
                    }
                    Some(_) => {}
                    None => return Ok(()),
                }
            }
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
            _ = beat.tick() => {
                if heard.elapsed() > interval * 3 {
                    anyhow::bail!("no message from the coordinator for three heartbeat intervals");
                }
                seq += 1;
                // Taken before sending: the lease is counted from no later than the
                // coordinator's receipt.
                unanswered.push_back((seq, Instant::now()));
                if unanswered.len() > 64 {
                    unanswered.pop_front();
                }
                let heartbeat = pb::RmMessage {
                    kind: Some(pb::rm_message::Kind::Heartbeat(pb::Heartbeat { seq, echo: 0 })),
                };
                if tx.send(heartbeat).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}
