//! Calls from the coordinator to services' HTTP endpoints: the branches of TCC and saga
//! transactions. One pooled HTTP/1.1 client (https with the web's root certificates, plus a
//! configured CA), a timeout per call, DTM's request shape and signing headers
//! ([`signature`]), and the meaning of the answer ([`outcome`]).
//!
//! A call is a POST with the branch's payload as its JSON body (a GET when it has none, as
//! DTM does), the query parameters `gid`, `trans_type`, `branch_id` and `op` added to the
//! URL, and the branch's own headers.

pub mod branch;
pub mod outcome;
pub mod signature;

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Calls;
pub use outcome::Outcome;

/// Largest answer body read; the rest is not needed to tell what it means.
const MAX_BODY: usize = 64 * 1024;

/// How long registration waits for its URLs' hosts to resolve.
const RESOLVE_WAIT: Duration = Duration::from_secs(5);

/// The most distinct hosts one registration's URLs may name.
const MAX_HOSTS: usize = 64;

/// One call to make.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    pub url: &'a str,
    /// DTM's query parameters, in order.
    pub query: [(&'static str, &'a str); 4],
    /// The JSON body; none: a GET.
    pub body: &'a [u8],
    /// Headers the transaction asked for on its branches.
    pub headers: &'a BTreeMap<String, String>,
    /// Stable for this branch and operation (`webhook-id`): a receiver drops repeats by it.
    pub message_id: &'a str,
    pub timeout: Duration,
}

/// The coordinator's HTTP client for branch calls.
pub struct Caller {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Signing keys by URL prefix, longest prefix first.
    keys: Vec<(String, Vec<u8>)>,
    /// `[calls] allow`.
    allow: Vec<String>,
}

impl Caller {
    pub fn new(config: &Calls) -> anyhow::Result<Caller> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &config.ca {
            for cert in ferrata_rpc::tls::read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("[calls] ca {}: {e}", ca.display()))?;
            }
        }
        let tls = ferrata_rpc::tls::client_config(roots)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let mut keys: Vec<(String, Vec<u8>)> = config
            .endpoints
            .iter()
            .map(|e| (e.prefix.clone(), signature::key(e.secret.0.as_str())))
            .collect();
        keys.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(Caller {
            client,
            keys,
            allow: config.allow.clone(),
        })
    }

    /// Whether `url` may be called: a valid http(s) URL without a fragment, under `[calls]
    /// allow` when that is set. `Err` says why not.
    pub fn allows(&self, url: &str) -> Result<(), String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() || url.contains('#') {
            return Err(format!(
                "{url:?} is not an http:// or https:// URL with a host and no fragment"
            ));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|prefix| covers(prefix, url)) {
            return Err(format!("{url:?} is not under any of [calls] allow"));
        }
        Ok(())
    }

    /// Whether the hosts of `urls` (each one [`allows`](Self::allows)) resolve to an address:
    /// a URL that points nowhere is refused when its branch is registered, rather than
    /// retried for ever. Checked once: a host that goes away later is retried like a down
    /// service. The distinct hosts (at most [`MAX_HOSTS`]) are looked up together, within
    /// [`RESOLVE_WAIT`] in all. `Err` says which host and why.
    pub async fn resolves<'a>(&self, urls: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
        let mut hosts = BTreeMap::new();
        for url in urls {
            let uri: hyper::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            // An IPv6 literal is written in brackets in a URL, not to the resolver.
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']');
            hosts.entry((host.to_owned(), port)).or_insert_with(|| url.to_owned());
        }
        if hosts.len() > MAX_HOSTS {
            return Err(format!(
                "the URLs name {} hosts; at most {MAX_HOSTS} are allowed in one request",
                hosts.len()
            ));
        }
        let mut lookups = tokio::task::JoinSet::new();
        for ((host, port), url) in hosts {
            lookups.spawn(async move {
                match tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map(|mut a| a.next())
                {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(format!("{url:?}: host {host} has no address")),
                    Err(e) => Err(format!("{url:?}: host {host} does not resolve ({e})")),
                }
            });
        }
        let all = async {
            while let Some(done) = lookups.join_next().await {
                done.map_err(|e| format!("a host lookup failed: {e}"))??;
            }
            Ok(())
        };
        tokio::time::timeout(RESOLVE_WAIT, all).await.unwrap_or_else(|_| {
            Err(format!(
                "the URLs' hosts did not all resolve within {} s",
                RESOLVE_WAIT.as_secs()
            ))
        })
    }

    /// Whether `signature` (a `webhook-signature` header) signs `<message_id>.<timestamp>.`
    /// with the secret of an endpoint that signs calls to one of `urls` (a message's target,
    /// or its origin), and `timestamp` is within five minutes of `now_secs`: how a receiver
    /// that holds no token authenticates its questions about what it was sent.
    pub fn verifies(&self, urls: &[String], message_id: &str, timestamp: u64, signature: &str, now_secs: u64) -> bool {
        if timestamp.abs_diff(now_secs) > 300 {
            return false;
        }
        self.keys
            .iter()
            .filter(|(prefix, _)| urls.iter().any(|u| covers(prefix, u) || covers(u, prefix)))
            .any(|(_, key)| signature::verify(key, message_id, timestamp, b"", signature))
    }

    /// Makes one call and says what its answer means.
    pub async fn call(&self, call: &Call<'_>) -> Outcome {
        self.call_answered(call).await.0
    }

    /// Makes one call: what its answer means, and the wait its `Retry-After` header asked
    /// for (delta-seconds or an HTTP date), if any.
    pub async fn call_answered(&self, call: &Call<'_>) -> (Outcome, Option<Duration>) {
        match tokio::time::timeout(call.timeout, self.exchange(call)).await {
            Ok(Ok((status, retry_after, body))) => (outcome::classify(status, &body), retry_after),
            Ok(Err(why)) => (Outcome::Retry(why), None),
            Err(_) => (
                Outcome::Retry(format!("no answer within {} ms", call.timeout.as_millis())),
                None,
            ),
        }
    }

    async fn exchange(&self, call: &Call<'_>) -> Result<(u16, Option<Duration>, Bytes), String> {
        let url = with_query(call.url, &call.query);
        let key = self
            .keys
            .iter()
            .find(|(prefix, _)| covers(prefix, call.url))
            .map(|(_, k)| k.as_slice());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut request = hyper::Request::builder()
            .method(if call.body.is_empty() { "GET" } else { "POST" })
            .uri(&url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("ferrata-tc/", env!("CARGO_PKG_VERSION")));
        for (name, value) in call.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        for (name, value) in signature::headers(call.message_id, now, key, call.body) {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(call.body)))
            .map_err(|e| format!("cannot make a request to {url}: {e}"))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("calling {url}: {}", error_chain(&e)))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer of {url} (HTTP {status}): {e}"))?
            .to_bytes();
        Ok((status, retry_after, body))
    }
}

/// A `Retry-After` value as a wait from now: delta-seconds, or an HTTP date (a date past is
/// no wait).
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The scheme and authority of `url` (`http://svc:8080`): an HTTP branch's resource, by which
/// its commits are batched and lists show it.
pub fn origin(url: &str) -> &str {
    let rest = url.find("://").map_or(0, |i| i + 3);
    url[rest..].find('/').map_or(url, |i| &url[..rest + i])
}

/// Whether the URL prefix `prefix` covers `url`: the same scheme, host and port, and a path
/// that is the prefix's or continues it after a `/` (so `https://pay.example` does not cover
/// `https://pay.example.evil/`, nor `/api` cover `/api-admin`).
pub fn covers(prefix: &str, url: &str) -> bool {
    let (Ok(p), Ok(u)) = (prefix.parse::<hyper::Uri>(), url.parse::<hyper::Uri>()) else {
        return false;
    };
    let same_origin = p.scheme_str().map(str::to_ascii_lowercase) == u.scheme_str().map(str::to_ascii_lowercase)
        && p.host().map(str::to_ascii_lowercase) == u.host().map(str::to_ascii_lowercase)
        && p.port_u16() == u.port_u16()
        && p.authority().is_some();
    let (pp, up) = (p.path().trim_end_matches('/'), u.path());
    same_origin && (pp.is_empty() || up == pp || up.strip_prefix(pp).is_some_and(|rest| rest.starts_with('/')))
}

/// `url` with the query parameters added (after any it has).
fn with_query(url: &str, query: &[(&str, &str)]) -> String {
    let mut out = url.to_owned();
    let mut sep = if url.contains('?') { '&' } else { '?' };
    for (name, value) in query {
        out.push(sep);
        out.push_str(name);
        out.push('=');
        out.push_str(&ferrata_rpc::url::query_value(value));
        sep = '&';
    }
    out
}

/// An error with its causes, for the transaction's timeline.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Endpoint;
    use ferrata_testkit::service::Service;

    #[tokio::test]
    async fn a_call_is_shaped_like_dtm_s_signed_and_its_answer_read() {
        let service = Service::start().await.unwrap();
        let base = service.base.clone();
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let caller = Caller::new(&Calls {
            endpoints: vec![Endpoint {
                prefix: format!("{base}/ok/"),
                secret: crate::config::Secret(secret.into()),
            }],
            ..Calls::default()
        })
        .unwrap();
        let call = |url: &'static str, body: &'static [u8], timeout_ms: u64| {
            let url: &'static str = Box::leak(format!("{base}{url}").into_boxed_str());
            Call {
                url,
                query: [
                    ("gid", "7-1"),
                    ("trans_type", "tcc"),
                    ("branch_id", "01"),
                    ("op", "confirm"),
                ],
                body,
                headers: {
                    static NONE: BTreeMap<String, String> = BTreeMap::new();
                    &NONE
                },
                message_id: "7-1.01.confirm",
                timeout: Duration::from_millis(timeout_ms),
            }
        };
        assert_eq!(
            caller.call(&call("/ok/", br#"{"amount":30}"#, 2000)).await,
            Outcome::Success
        );
        assert_eq!(
            caller.call(&call("/no/", b"", 2000)).await,
            Outcome::Failure(r#"HTTP 409: {"dtm_result":"FAILURE"}"#.into())
        );
        assert_eq!(
            caller.call(&call("/down/", b"{}", 2000)).await,
            Outcome::Retry("HTTP 503: down".into())
        );
        assert_eq!(
            caller.call(&call("/slow/", b"{}", 100)).await,
            Outcome::Retry("no answer within 100 ms".into())
        );
        let unreachable = Call {
            url: "http://127.0.0.1:9",
            ..call("/ok/", b"{}", 2000)
        };
        assert!(matches!(caller.call(&unreachable).await, Outcome::Retry(_)));

        let seen = service.calls();
        assert_eq!(seen[0].method, "POST");
        assert_eq!(seen[0].uri, "/ok/?gid=7-1&trans_type=tcc&branch_id=01&op=confirm");
        assert_eq!(seen[0].body, r#"{"amount":30}"#);
        let expected = signature::headers(
            "7-1.01.confirm",
            seen[0].header("webhook-timestamp").parse().unwrap(),
            Some(&signature::key(secret)),
            seen[0].body.as_bytes(),
        );
        assert_eq!(seen[0].header("webhook-signature"), expected[2].1);
        assert_eq!(
            (seen[1].method.as_str(), seen[1].header("webhook-signature")),
            ("GET", ""),
            "no body: a GET; no secret: unsigned"
        );
    }

    #[test]
    fn a_prefix_covers_whole_origins_and_path_segments() {
        assert_eq!(origin("http://svc:8080/api/confirm?x=1"), "http://svc:8080");
        assert_eq!(origin("https://svc"), "https://svc");
        assert!(covers("https://pay.example", "https://pay.example/confirm"));
        assert!(covers(
            "https://pay.example/api/",
            "https://PAY.example/api/tcc/confirm"
        ));
        assert!(!covers("https://pay.example", "https://pay.example.evil.io/x"));
        assert!(!covers("https://pay.example", "https://pay.example@evil.io/"));
        assert!(!covers("https://pay.example/api", "https://pay.example/api-admin"));
        assert!(!covers("https://pay.example", "http://pay.example/"));
        assert!(!covers("https://pay.example", "https://pay.example:8443/"));
    }

    #[test]
    fn query_parameters_follow_the_url_s_own() {
        let q = [
            ("gid", "1-2 3"),
            ("trans_type", "tcc"),
            ("branch_id", "01"),
            ("op", "confirm"),
        ];
        assert_eq!(
            with_query("http://h/a", &q),
            "http://h/a?gid=1-2%203&trans_type=tcc&branch_id=01&op=confirm"
        );
        assert_eq!(with_query("http://h/a?x=1", &q[..1]), "http://h/a?x=1&gid=1-2%203");
    }
}
