//! The shared token both APIs require when one is configured. Compared in constant time;
//! never logged.

use std::sync::Arc;

#[derive(Clone, Default)]
pub struct Token(Option<Arc<str>>);

impl Token {
    pub fn new(token: Option<&str>) -> Token {
        Token(token.map(Arc::from))
    }

    /// Who a request that got in is, for the timeline and the logs.
    pub fn actor(&self) -> &'static str {
        match self.0 {
            Some(_) => "the coordinator's token",
            None => "anyone (no token configured)",
        }
    }

    /// Whether an `authorization` header value lets the request in.
    pub fn accepts(&self, header: Option<&str>) -> bool {
        let Some(expected) = &self.0 else { return true };
        let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        constant_time_eq(given.as_bytes(), expected.as_bytes())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check() {
        assert!(Token::new(None).accepts(None));
        let t = Token::new(Some("s3cret"));
        assert!(t.accepts(Some("Bearer s3cret")));
        for bad in [
            None,
            Some("s3cret"),
            Some("Bearer s3cre"),
            Some("Bearer s3cretx"),
            Some("bearer s3cret"),
        ] {
            assert!(!t.accepts(bad), "{bad:?}");
        }
    }
}
