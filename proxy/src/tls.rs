//! TLS setup: the acceptor that terminates client TLS with the configured certificate, and
//! the connector for optional TLS to the backend.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{BackendTls, ClientTls};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file = File::open(path).with_context(|| format!("opening certificate file {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading PEM certificates from {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no PEM certificate found in {}", path.display());
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let file = File::open(path).with_context(|| format!("opening key file {}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .with_context(|| format!("reading a PEM private key from {}", path.display()))?
        .with_context(|| format!("no PEM private key found in {}", path.display()))
}

/// The acceptor for clients that send an SSLRequest.
pub fn acceptor(config: &ClientTls) -> anyhow::Result<TlsAcceptor> {
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(read_certs(&config.cert)?, read_key(&config.key)?)
        .context("the TLS certificate and key do not match")?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The connector and server name for TLS to the backend.
pub fn connector(config: &BackendTls, backend_host: &str) -> anyhow::Result<(TlsConnector, ServerName<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(&config.ca)? {
        roots.add(cert).context("adding a backend CA certificate")?;
    }
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = config.server_name.as_deref().unwrap_or(backend_host).to_owned();
    let name = ServerName::try_from(name).context("backend_tls.server_name is not a valid DNS name or IP")?;
    Ok((TlsConnector::from(Arc::new(client)), name))
}
