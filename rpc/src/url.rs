//! URL pieces both HTTP clients need: the command line's calls to the coordinator's API and
//! the coordinator's calls to services.

/// `s` percent-encoded for a query string or a path segment (RFC 3986's unreserved
/// characters kept).
pub fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reserved_characters_are_encoded() {
        assert_eq!(super::query_value("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
