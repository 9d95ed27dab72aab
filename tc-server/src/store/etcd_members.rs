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

use etcd_client::{Client, ConnectOptions};

use super::StoreError;

pub(crate) struct Members {
    clients: Vec<Client>,
    endpoints: Vec<String>,
    current: AtomicUsize,
    timeout: Duration,
}

impl Members {
    /// A client per endpoint; none connects before its first request.
    pub(crate) async fn new(endpoints: &[String], timeout: Duration) -> Result<Members, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout)
            // A member without a leader refuses at once instead of holding the request.
            .with_require_leader(true);
        let mut clients = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            clients.push(
                Client::connect([endpoint], Some(options.clone()))
                    .await
                    .map_err(|e| StoreError(format!("etcd endpoint {endpoint}: {e}")))?,
            );
        }
        Ok(Members {
            clients,
            endpoints: endpoints.to_vec(),
            current: AtomicUsize::new(0),
            timeout,
        })
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The member in use now: its index (for [`Members::failed`]) and client.
    pub(crate) fn current(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Acquire) % self.clients.len();
        (i, self.clients[i].clone())
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
        let (used, client) = self.current();
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
            Err(EtcdError {
                text: e.to_string(),
                retryable,
            })
        }
        Err(_) => Err(EtcdError {
            text: format!("no answer within {} ms", timeout.as_millis()),
            retryable: true,
        }),
    }
}
