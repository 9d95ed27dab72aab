//! `floor-forwarder`: the least a TCP proxy can do. It accepts clients and copies bytes to
//! and from one backend connection each, looking at none of them.
//!
//! The pass-through benchmark runs it beside `ferrata-proxy` so that the cost of one extra
//! loopback hop on the machine at hand (two more sends, receives and wake-ups per
//! statement) is measured, not assumed: ferrata-proxy can only be judged against what any
//! forwarder costs on the same cores.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::net::{TcpListener, TcpStream, UnixStream};

#[derive(Debug, Parser)]
#[command(about = "A byte-copying TCP forwarder: the floor any proxy is measured against")]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    /// host:port, or the path of the server's Unix socket.
    #[arg(long)]
    backend: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    loop {
        let (mut client, _) = listener.accept().await?;
        let _ = client.set_nodelay(true);
        let backend = args.backend.clone();
        tokio::spawn(async move {
            let _ = if backend.starts_with('/') {
                match UnixStream::connect(&backend).await {
                    Ok(mut server) => tokio::io::copy_bidirectional(&mut client, &mut server).await,
                    Err(e) => Err(e),
                }
            } else {
                match TcpStream::connect(&backend).await {
                    Ok(mut server) => {
                        let _ = server.set_nodelay(true);
                        tokio::io::copy_bidirectional(&mut client, &mut server).await
                    }
                    Err(e) => Err(e),
                }
            };
        });
    }
}
