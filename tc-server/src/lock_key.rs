//! `LockKey`: the canonical, unambiguous name of one row for the global lock table.
//!
//! A key is resource, schema, table and the primary-key tuple, each part written as a 4-byte
//! big-endian length followed by its bytes, and the tuple preceded by its value count. Every
//! byte of every value is kept, so no value (commas, underscores, semicolons, binary bytes,
//! very long keys) can make two different rows share a key or be truncated, unlike Seata's
//! `table:pk1,pk2;...` string in a VARCHAR(36) column.

use std::fmt;
use std::sync::Arc;

use ferrata_rpc::pb;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey(Arc<[u8]>);

/// One key taken apart again.
#[derive(Debug, PartialEq, Eq)]
pub struct LockKeyParts<'a> {
    pub resource: &'a str,
    pub schema: &'a str,
    pub table: &'a str,
    pub values: Vec<&'a [u8]>,
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl LockKey {
    pub fn new<V: AsRef<[u8]>>(resource: &str, schema: &str, table: &str, values: &[V]) -> LockKey {
        let len = 16
            + resource.len()
            + schema.len()
            + table.len()
            + values.iter().map(|v| 4 + v.as_ref().len()).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        put(&mut out, resource.as_bytes());
        put(&mut out, schema.as_bytes());
        put(&mut out, table.as_bytes());
        out.extend_from_slice(&(values.len() as u32).to_be_bytes());
        for v in values {
            put(&mut out, v.as_ref());
        }
        LockKey(out.into())
    }

    /// The keys of a request's lock list, checked: names must be present and every row must
    /// have at least one value.
    pub fn from_pb(resource: &str, tables: &[pb::TableLocks]) -> Result<Vec<LockKey>, String> {
        if resource.is_empty() {
            return Err("resource_id is empty".into());
        }
        let mut keys = Vec::new();
        for t in tables {
            if t.schema.is_empty() || t.table.is_empty() {
                return Err(format!(
                    "a lock entry has an empty schema or table name (schema {:?}, table {:?})",
                    t.schema, t.table
                ));
            }
            for row in &t.rows {
                if row.values.is_empty() {
                    return Err(format!("a row of {}.{} has no primary-key values", t.schema, t.table));
                }
                keys.push(LockKey::new(resource, &t.schema, &t.table, &row.values));
            }
        }
        Ok(keys)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Rebuilds a key from stored bytes, checking they are a well-formed key.
    pub fn from_bytes(bytes: &[u8]) -> Option<LockKey> {
        let key = LockKey(bytes.into());
        key.try_parts()?;
        Some(key)
    }

    fn try_parts(&self) -> Option<LockKeyParts<'_>> {
        let mut rest: &[u8] = &self.0;
        fn take<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = u32::from_be_bytes(*len) as usize;
            if tail.len() < len {
                return None;
            }
            let (part, tail) = tail.split_at(len);
            *rest = tail;
            Some(part)
        }
        let resource = std::str::from_utf8(take(&mut rest)?).ok()?;
        let schema = std::str::from_utf8(take(&mut rest)?).ok()?;
        let table = std::str::from_utf8(take(&mut rest)?).ok()?;
        let (count, tail) = rest.split_first_chunk::<4>()?;
        rest = tail;
        let count = u32::from_be_bytes(*count) as usize;
        let mut values = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            values.push(take(&mut rest)?);
        }
        rest.is_empty().then_some(LockKeyParts {
            resource,
            schema,
            table,
            values,
        })
    }

    pub fn parts(&self) -> LockKeyParts<'_> {
        self.try_parts().expect("a LockKey is well-formed by construction")
    }

    /// The primary-key tuple as the protocol carries it.
    pub fn row_pb(&self) -> pb::PrimaryKey {
        pb::PrimaryKey {
            values: self.parts().values.into_iter().map(|v| v.to_vec()).collect(),
        }
    }

    /// JSON for the HTTP API: values that are UTF-8 appear as strings, others as
    /// `{"hex": "..."}`, so both kinds stay distinguishable.
    pub fn to_json(&self) -> serde_json::Value {
        let parts = self.parts();
        let values: Vec<serde_json::Value> = parts
            .values
            .iter()
            .map(|v| match std::str::from_utf8(v) {
                Ok(s) => serde_json::Value::String(s.to_owned()),
                Err(_) => serde_json::json!({ "hex": v.iter().map(|b| format!("{b:02x}")).collect::<String>() }),
            })
            .collect();
        serde_json::json!({ "resource": parts.resource, "schema": parts.schema, "table": parts.table, "pk": values })
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockKey({})", self.to_json())
    }
}

impl Serialize for LockKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for LockKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LockKey, D::Error> {
        let bytes: Vec<u8> = serde::de::Deserialize::deserialize(d)?;
        LockKey::from_bytes(&bytes).ok_or_else(|| serde::de::Error::custom("malformed lock key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seata_collisions_do_not_collide() {
        // Seata joins composite values with '_' and rows with ',': these pairs collide there.
        assert_ne!(
            LockKey::new("r", "s", "t", &["a_b", "c"]),
            LockKey::new("r", "s", "t", &["a", "b_c"])
        );
        assert_ne!(
            LockKey::new("r", "s", "t", &["1,2"]),
            LockKey::new("r", "s", "t", &["1", "2"])
        );
        assert_ne!(
            LockKey::new("r", "s", "t:x", &["1"]),
            LockKey::new("r", "s", "t", &["x:1"])
        );
        assert_ne!(
            LockKey::new("r", "s;t", "u", &["1"]),
            LockKey::new("r", "s", "t;u", &["1"])
        );
        let long = "x".repeat(10_000);
        let key = LockKey::new("r", "s", "t", &[long.as_str()]);
        assert_eq!(key.parts().values, vec![long.as_bytes()], "long values are kept whole");
    }

    #[test]
    fn malformed_bytes_are_rejected() {
        let key = LockKey::new("r", "s", "t", &[b"\x00\xff".as_slice()]);
        let bytes = key.as_bytes();
        assert_eq!(LockKey::from_bytes(bytes), Some(key.clone()));
        assert_eq!(LockKey::from_bytes(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(LockKey::from_bytes(&longer), None);
        assert_eq!(key.to_json()["pk"][0]["hex"], "00ff");
    }

    fn part() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop::sample::select(vec![b'a', b'_', b',', b';', b':', 0u8, 0xff]),
            0..6,
        )
    }

    proptest! {
        /// Two keys are equal exactly when all their parts are equal, and every key parses
        /// back into the parts it was built from.
        #[test]
        fn encoding_is_injective(
            a in ("[a_,;:]{0,4}", "[a_,;:]{0,4}", prop::collection::vec(part(), 1..4)),
            b in ("[a_,;:]{0,4}", "[a_,;:]{0,4}", prop::collection::vec(part(), 1..4)),
        ) {
            let ka = LockKey::new("res", &a.0, &a.1, &a.2);
            let kb = LockKey::new("res", &b.0, &b.1, &b.2);
            prop_assert_eq!(ka == kb, a == b);
            let parts = ka.parts();
            prop_assert_eq!(parts.schema, a.0.as_str());
            prop_assert_eq!(parts.values, a.2.iter().map(|v| v.as_slice()).collect::<Vec<_>>());
        }
    }
}
