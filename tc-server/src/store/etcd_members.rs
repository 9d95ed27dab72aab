//! The etcd members the store talks to: one client per member, used one at a time, moving on
//! to the next member when a request to the current one fails in a way another member may
//! not (unreachable, no leader, too slow).
//!
//! Why not `etcd-client`'s own balanced channel over all endpoints: after a member dies it
//! keeps sending a share of requests to it (measured in the research for this store), so a
//! renewal of the node's lease could fail again and again while healthy members are there,
//! until the node had to give up its ownership. Here a failed member is left at once.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::sync::OnceCell;

use super::StoreError;
use crate::config::Etcd as Settings;

pub(crate) struct Members {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// Connected on first use: with credentials, connecting authenticates, which needs the
    /// member up.
    clients: Vec<OnceCell<Client>>,
    current: AtomicUsize,
    timeout: Duration,
}

impl Members {
    /// The members of `settings.endpoints`, with its credentials and TLS; none is connected
    /// yet.
    pub(crate) fn new(settings: &Settings) -> Result<Members, StoreError> {
        let timeout = settings.request_timeout();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout)
            // A member without a leader refuses at once instead of holding the request.
            .with_require_leader(true)
            // etcd's tokens expire (5 minutes by default): authenticate again when one has.
            .with_auto_token_refresh(true);
        if let Some(user) = &settings.username {
            let password = settings.password()?.unwrap_or_default();
            options = options.with_user(user.clone(), password);
        }
        if let Some(tls) = &settings.tls {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|e| StoreError(format!("cannot read {} ([etcd.tls]): {e}", path.display())))
            };
            let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(config);
        }
        Ok(Members {
            endpoints: settings.endpoints.clone(),
            options,
            clients: settings.endpoints.iter().map(|_| OnceCell::new()).collect(),
            current: AtomicUsize::new(0),
            timeout,
        })
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The index of the member in use now.
    pub(crate) fn current_index(&self) -> usize {
        self.current.load(Ordering::Acquire) % self.clients.len()
    }

    /// The member in use now: its index (for [`Members::failed`]) and client, connected if it
    /// was not. A member that cannot be connected to is left for the next one.
    pub(crate) async fn current(&self) -> Result<(usize, Client), EtcdError> {
        let i = self.current_index();
        let endpoint = &self.endpoints[i];
        let connected = self.clients[i]
            .get_or_try_init(|| within(self.timeout, Client::connect([endpoint], Some(self.options.clone()))))
            .await;
        match connected {
            Ok(client) => Ok((i, client.clone())),
            Err(e) => {
                if e.retryable {
                    self.failed(i);
                }
                Err(EtcdError {
                    text: format!("{endpoint}: {}", e.text),
                    retryable: e.retryable,
                })
            }
        }
    }

    /// Leaves member `used` for the next one, unless another caller already moved on.
    pub(crate) fn failed(&self, used: usize) {
        let next = (used + 1) % self.clients.len();
        if next != used
            && self
                .current
                .compare_exchange(used, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            tracing::warn!(
                failed = %self.endpoints[used],
                next = %self.endpoints[next],
                "moving to another etcd member"
            );
        }
    }

    /// Runs `request` on the current member with the request timeout; a failure another
    /// member may not have moves on to the next member.
    pub(crate) async fn call<T, F, Fut>(&self, request: F) -> Result<T, EtcdError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let (used, client) = self.current().await?;
        let result = within(self.timeout, request(client)).await;
        if let Err(e) = &result
            && e.retryable
        {
            self.failed(used);
        }
        result
    }
}

/// An etcd error, and whether trying again (on another member) may help: the member is
/// unreachable, has no leader, or is slow.
#[derive(Debug)]
pub(crate) struct EtcdError {
    pub(crate) text: String,
    pub(crate) retryable: bool,
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// An error with its sources (a TLS failure is a few sources down a transport error).
fn error_chain(e: &etcd_client::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

/// Runs one etcd request with a timeout.
pub(crate) async fn within<T>(
    timeout: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let retryable = match &e {
                etcd_client::Error::GRpcStatus(s) => matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        | tonic::Code::Aborted
                        // The client's own request timeout.
                        | tonic::Code::Cancelled
                        // etcd's "too many requests".
                        | tonic::Code::ResourceExhausted
                ),
                etcd_client::Error::TransportError(_)
                | etcd_client::Error::IoError(_)
                | etcd_client::Error::LeaseKeepAliveError(_) => true,
                _ => false,
            };
            // A certificate etcd's member does not accept, or that does not verify, is a
            // configuration error: no member will do better.
            let text = error_chain(&e);
            let retryable = retryable && !text.contains("certificate");
            Err(EtcdError { text, retryable })
        }
        Err(_) => Err(EtcdError {
            text: format!("no answer within {} ms", timeout.as_millis()),
            retryable: true,
        }),
    }
}
