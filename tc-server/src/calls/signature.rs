//! Signing headers on every call, as Standard Webhooks defines them, so that a receiver can
//! authenticate the coordinator and drop a repeated delivery: `webhook-id` (stable per branch
//! and operation, the same on every retry), `webhook-timestamp` (Unix seconds) and, when a
//! secret is configured for the endpoint, `webhook-signature` (`v1,` and the base64 HMAC-SHA256
//! of `<id>.<timestamp>.<body>`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The headers of one signed call.
pub fn headers(message_id: &str, timestamp: u64, secret: Option<&[u8]>, body: &[u8]) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("webhook-id", message_id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
    ];
    if let Some(key) = secret {
        out.push((
            "webhook-signature",
            format!("v1,{}", sign(key, message_id, timestamp, body)),
        ));
    }
    out
}

/// The signing key of a configured secret: Standard Webhooks' `whsec_<base64>` form, or the
/// secret's bytes as they are.
pub fn key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b| STANDARD.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

fn mac(key: &[u8], message_id: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn sign(key: &[u8], message_id: &str, timestamp: u64, body: &[u8]) -> String {
    STANDARD.encode(mac(key, message_id, timestamp, body).finalize().into_bytes())
}

/// Whether a `webhook-signature` header (space-separated `v1,<base64>` signatures, as key
/// rotation sends them) holds a signature of `<id>.<timestamp>.<body>` by `key`; compared in
/// constant time.
pub fn verify(key: &[u8], message_id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
    header.split_ascii_whitespace().any(|sig| {
        sig.strip_prefix("v1,")
            .and_then(|b| STANDARD.decode(b).ok())
            .is_some_and(|given| mac(key, message_id, timestamp, body).verify_slice(&given).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn matches_the_specification_example() {
        let key = key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let h = headers("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, Some(&key), body);
        assert_eq!(
            h[2],
            (
                "webhook-signature",
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".to_owned()
            )
        );
        assert_eq!(headers("m", 1, None, body).len(), 2, "no secret, no signature");
        let signed = &h[2].1;
        assert!(verify(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, signed));
        assert!(verify(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            &format!("v1,AAAA {signed}")
        ));
        assert!(!verify(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, signed));
        assert!(!verify(
            b"other",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
            signed
        ));
        assert!(!verify(&key, "m", 1, body, "v1,not base64 at all"));
    }
}
