//! What the examples start in-process: the coordinator and a proxy in front of a MariaDB
//! server, and the app's connection options through a proxy.

use std::net::SocketAddr;

use anyhow::Result;
use ferrata_proxy::config::{Coordinator, Secret};
use ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// `ferrata-tc` with its store in `data`, on free loopback ports: (gRPC, HTTP, its task).
pub async fn coordinator(
    data: &std::path::Path,
    stop: &CancellationToken,
) -> Result<(SocketAddr, SocketAddr, JoinHandle<Result<()>>)> {
    let config = ferrata_tc::Config {
        listen: "127.0.0.1:0".parse()?,
        http: "127.0.0.1:0".parse()?,
        data_dir: data.to_owned(),
        ..ferrata_tc::Config::default()
    };
    let tc = ferrata_tc::Server::bind(config).await?;
    let (rpc, http) = (tc.rpc_addr(), tc.http_addr());
    Ok((rpc, http, tokio::spawn(tc.run(stop.clone()))))
}

/// A `ferrata-proxy` named `proxy-<name>` in front of `db`, attached to the coordinator at
/// `tc_rpc`: its address and task.
pub async fn proxy(
    db: &MariaDb,
    tc_rpc: SocketAddr,
    name: &str,
    stop: &CancellationToken,
) -> Result<(SocketAddr, JoinHandle<Result<()>>)> {
    let mut config = ferrata_proxy::Config {
        listen: "127.0.0.1:0".parse()?,
        backend: db.addr().to_string(),
        admin_listen: None,
        coordinator: Some(Coordinator {
            lock_wait_ms: 5_000,
            rm_id: Some(format!("proxy-{name}")),
            ..Coordinator::new(vec![tc_rpc.to_string()])
        }),
        ..ferrata_proxy::Config::default()
    };
    config.service.user = APP_USER.into();
    config.service.password = Some(Secret(APP_PASSWORD.into()));
    let server = ferrata_proxy::Server::bind(config).await?;
    let addr = server.local_addr();
    Ok((addr, tokio::spawn(server.run(stop.clone()))))
}
