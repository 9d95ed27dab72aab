//! TLS setup shared by the proxy and the coordinator: PEM loading, the acceptor that
//! terminates TLS with a configured certificate, and the connector that verifies a server
//! against configured CA certificates.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file = File::open(path).with_context(|| format!("opening certificate file {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading PEM certificates from {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no PEM certificate found in {}", path.display());
    Ok(certs)
}

pub fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let file = File::open(path).with_context(|| format!("opening key file {}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .with_context(|| format!("reading a PEM private key from {}", path.display()))?
        .with_context(|| format!("no PEM private key found in {}", path.display()))
}

/// An acceptor presenting the certificate chain in `cert` with the private key in `key`.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(read_certs(cert)?, read_key(key)?)
        .context("the TLS certificate and key do not match")?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// A client configuration trusting `roots` (ring, the safe default protocol versions, no
/// client certificate).
pub fn client_config(roots: rustls::RootCertStore) -> anyhow::Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A connector trusting the CA certificates in `ca`, and the name to verify: `server_name`
/// if given, else `host`.
pub fn connector(
    ca: &Path,
    server_name: Option<&str>,
    host: &str,
) -> anyhow::Result<(TlsConnector, ServerName<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots.add(cert).context("adding a CA certificate")?;
    }
    let client = client_config(roots)?;
    let name = server_name.unwrap_or(host).to_owned();
    let name = ServerName::try_from(name.clone())
        .with_context(|| format!("{name:?} is not a valid DNS name or IP for TLS"))?;
    Ok((TlsConnector::from(Arc::new(client)), name))
}
