//! The HTTP client of the coordinator's API: one HTTP/1.1 request per connection (plain or
//! TLS), the token as `Authorization: Bearer`, `X-Ferrata-Client: cli/<version>` for the
//! audit trail; a refusal becomes a [`Failure`] with its exit code. A standby node's
//! redirect (307 to the active node) is followed, with the same method, body and token.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::context::Target;
use crate::exit::{Failure, Result};

pub struct Client {
    target: Target,
    timeout: Duration,
}

/// `http://host:port/prefix` taken apart.
struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
    prefix: String,
}

fn endpoint(server: &str) -> Result<Endpoint> {
    let bad = || {
        Failure::usage(format!(
            "{server:?} is not an http:// or https:// address like http://127.0.0.1:7091"
        ))
    };
    let (tls, rest) = if let Some(r) = server.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = server.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let (authority, prefix) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().map_err(|_| bad())?),
        _ => (authority, if tls { 443 } else { 80 }),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Endpoint {
        tls,
        host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        port,
        prefix: if prefix.is_empty() {
            String::new()
        } else {
            format!("/{prefix}")
        },
    })
}

impl Client {
    pub fn new(target: Target, timeout: Duration) -> Client {
        Client { target, timeout }
    }

    pub fn server(&self) -> &str {
        &self.target.server
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.request("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.request("POST", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str, body: &Value) -> Result<Value> {
        self.request("DELETE", path, Some(body)).await
    }

    /// One request; the answer's JSON, or the failure it stands for.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut server = self.target.server.clone();
        let mut path = path.to_owned();
        let mut redirects = 0;
        let (status, text) = loop {
            let answer = tokio::time::timeout(self.timeout, self.exchange(&server, method, &path, body))
                .await
                .map_err(|_| Failure::error(format!("{server} did not answer within {:?}", self.timeout)))??;
            match answer {
                Answer::Body(status, text) => break (status, text),
                Answer::Redirect(location) if redirects < MAX_REDIRECTS => {
                    redirects += 1;
                    (server, path) = split_location(&location).ok_or_else(|| {
                        Failure::error(format!(
                            "{server} redirected to {location:?}, which is not an http(s) URL"
                        ))
                    })?;
                }
                Answer::Redirect(location) => {
                    return Err(Failure::error(format!(
                        "{server} redirected {method} {path} again, to {location}: more than {MAX_REDIRECTS} \
                         redirects (do two coordinator nodes each name the other as active?)"
                    )));
                }
            }
        };
        let json: Value = serde_json::from_slice(&text).map_err(|_| {
            Failure::error(format!(
                "{method} {path}: the server answered {status} with something that is not JSON: {}",
                String::from_utf8_lossy(&text[..text.len().min(200)])
            ))
        })?;
        if (200..300).contains(&status) {
            Ok(json)
        } else {
            Err(Failure::from_api(status, json))
        }
    }

    async fn exchange(&self, server: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Answer> {
        let ep = endpoint(server)?;
        let unreachable = |e: &dyn std::fmt::Display| Failure::error(format!("cannot reach {server}: {e}"));
        let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| unreachable(&e))?;
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", ep.prefix))
            .header("host", format!("{}:{}", ep.host, ep.port))
            .header("x-ferrata-client", concat!("cli/", env!("CARGO_PKG_VERSION")))
            .header("user-agent", concat!("ferrata/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &self.target.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let payload = match body {
            Some(b) => {
                request = request.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|e| Failure::usage(format!("bad request: {e}")))?;
        let response = if ep.tls {
            let ca = self.target.ca_cert.as_ref().ok_or_else(|| {
                Failure::usage("an https server needs --ca-cert (or ca_cert in the context) to be verified")
            })?;
            let (connector, name) = ferrata_rpc::tls::connector(ca, None, &ep.host)?;
            let tls = connector.connect(name, tcp).await.map_err(|e| unreachable(&e))?;
            send(TokioIo::new(tls), request).await
        } else {
            send(TokioIo::new(tcp), request).await
        }
        .map_err(|e| unreachable(&e))?;
        let status = response.status().as_u16();
        if matches!(status, 307 | 308)
            && let Some(location) = response.headers().get("location").and_then(|l| l.to_str().ok())
        {
            return Ok(Answer::Redirect(location.to_owned()));
        }
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        Ok(Answer::Body(status, bytes))
    }
}

/// Redirects followed for one request: a standby sends to the active node, which serves.
const MAX_REDIRECTS: usize = 3;

/// What one exchange came to.
enum Answer {
    Body(u16, Bytes),
    /// A redirect (a standby coordinator node), to this URL.
    Redirect(String),
}

/// `http://host:port/path?query` as the server part and the path part.
fn split_location(location: &str) -> Option<(String, String)> {
    let scheme = if location.starts_with("https://") {
        "https://"
    } else if location.starts_with("http://") {
        "http://"
    } else {
        return None;
    };
    let rest = &location[scheme.len()..];
    let at = rest.find('/').unwrap_or(rest.len());
    let path = if at == rest.len() { "/" } else { &rest[at..] };
    Some((format!("{scheme}{}", &rest[..at]), path.to_owned()))
}

async fn send<IO>(io: IO, request: hyper::Request<Full<Bytes>>) -> hyper::Result<hyper::Response<hyper::body::Incoming>>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    sender.send_request(request).await
}

pub use ferrata_rpc::url::query_value;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = endpoint("http://127.0.0.1:7091").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.prefix.as_str()),
            (false, "127.0.0.1", 7091, "")
        );
        let e = endpoint("https://tc.example.net/ferrata").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port, e.prefix.as_str()),
            (true, "tc.example.net", 443, "/ferrata")
        );
        let e = endpoint("http://[::1]:7091").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 7091));
        assert!(endpoint("127.0.0.1:7091").is_err());
    }

    #[test]
    fn redirect_locations() {
        assert_eq!(
            split_location("http://127.0.0.1:7092/v1/transactions?limit=5"),
            Some(("http://127.0.0.1:7092".into(), "/v1/transactions?limit=5".into()))
        );
        assert_eq!(
            split_location("https://tc-2.example:7091"),
            Some(("https://tc-2.example:7091".into(), "/".into()))
        );
        assert_eq!(split_location("/v1/transactions"), None);
    }
}
