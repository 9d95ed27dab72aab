//! The audit trail: one record per operator action (who, in which role, from where, why, on
//! what, seeing which version, with which effect), append-only and hash-chained, stored in the
//! same batch as the change it describes (`Mutation::AppendAudit`): no action without its
//! record, no record without its action. There is no route to change or delete one.
//!
//! Each record's `hash` is SHA-256 over its other fields (postcard encoding, `prev_hash`
//! included), and `prev_hash` is the previous record's hash (zeros for the first), so a
//! record changed, removed or inserted in the store breaks the chain at that point
//! ([`Audit::verify`]).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::auth::{Caller, hex};

/// Where an action came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// What the client says it is (`X-Ferrata-Client`: `cli/0.1.0`, `console`), or `api`.
    pub client: String,
    /// The peer address.
    pub remote: String,
    pub user_agent: String,
}

/// What an action says about itself, before the trail numbers and chains it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditEntry {
    pub actor: String,
    pub role: String,
    pub origin: Origin,
    pub action: String,
    pub xid: Option<String>,
    pub reason: String,
    /// What the operator saw: `{"version": 7}`, row digests.
    pub precondition: Value,
    /// What the action is aimed at beyond the XID: a branch, rows, a token.
    pub target: Value,
    /// What changed: statuses, locks released, undo items removed, values overwritten.
    pub effect: Value,
}

impl AuditEntry {
    /// An entry for `action` by `caller` from `origin`.
    pub fn new(caller: &Caller, origin: &Origin, action: &str, reason: &str) -> AuditEntry {
        AuditEntry {
            actor: caller.name.to_string(),
            role: caller.role.as_str().to_owned(),
            origin: origin.clone(),
            action: action.to_owned(),
            reason: reason.to_owned(),
            ..AuditEntry::default()
        }
    }
}

/// One record as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: u64,
    pub at_ms: u64,
    pub actor: String,
    pub role: String,
    pub origin: Origin,
    pub action: String,
    pub xid: Option<String>,
    pub reason: String,
    pub precondition_json: String,
    pub target_json: String,
    pub effect_json: String,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

impl AuditRecord {
    /// SHA-256 over every field but `hash`.
    fn compute_hash(&self) -> [u8; 32] {
        let fields = (
            self.id,
            self.at_ms,
            &self.actor,
            &self.role,
            &self.origin,
            &self.action,
            &self.xid,
            &self.reason,
            &self.precondition_json,
            &self.target_json,
            &self.effect_json,
            &self.prev_hash,
        );
        let bytes = postcard::to_allocvec(&fields).expect("encoding to memory cannot fail");
        Sha256::digest(bytes).into()
    }

    pub fn to_json(&self) -> Value {
        let parse = |s: &str| serde_json::from_str(s).unwrap_or(Value::Null);
        json!({
            "id": self.id,
            "at_ms": self.at_ms,
            "actor": self.actor,
            "role": self.role,
            "origin": { "client": self.origin.client, "remote": self.origin.remote, "user_agent": self.origin.user_agent },
            "action": self.action,
            "xid": self.xid,
            "reason": self.reason,
            "precondition": parse(&self.precondition_json),
            "target": parse(&self.target_json),
            "effect": parse(&self.effect_json),
            "prev_hash": hex(&self.prev_hash),
            "hash": hex(&self.hash),
        })
    }
}

/// Which records to list.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub xid: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub since_ms: Option<u64>,
    /// Only records with a larger id (paging).
    pub after_id: Option<u64>,
}

/// The whole trail, oldest first (operator actions are few; it is kept in memory).
#[derive(Default)]
pub struct Audit {
    records: Vec<AuditRecord>,
}

/// Where a chain check failed.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    pub id: u64,
    pub problem: String,
}

impl Audit {
    pub fn restore(mut records: Vec<AuditRecord>) -> Audit {
        records.sort_by_key(|r| r.id);
        Audit { records }
    }

    /// The next record for `entry` at `at_ms`, numbered and chained; the caller stores it and
    /// then [`Audit::append`]s it, both before anyone else seals one.
    pub fn seal(&self, entry: AuditEntry, at_ms: u64) -> AuditRecord {
        let (id, prev_hash) = self.records.last().map_or((1, [0; 32]), |r| (r.id + 1, r.hash));
        let mut record = AuditRecord {
            id,
            at_ms,
            actor: entry.actor,
            role: entry.role,
            origin: entry.origin,
            action: entry.action,
            xid: entry.xid,
            reason: entry.reason,
            precondition_json: entry.precondition.to_string(),
            target_json: entry.target.to_string(),
            effect_json: entry.effect.to_string(),
            prev_hash,
            hash: [0; 32],
        };
        record.hash = record.compute_hash();
        record
    }

    pub fn append(&mut self, record: AuditRecord) {
        debug_assert_eq!(record.prev_hash, self.records.last().map_or([0; 32], |r| r.hash));
        self.records.push(record);
    }

    pub fn get(&self, id: u64) -> Option<&AuditRecord> {
        self.records
            .binary_search_by_key(&id, |r| r.id)
            .ok()
            .map(|i| &self.records[i])
    }

    /// Matching records, oldest first, at most `limit`.
    pub fn list(&self, f: &AuditFilter, limit: usize) -> Vec<AuditRecord> {
        self.records
            .iter()
            .filter(|r| f.after_id.is_none_or(|id| r.id > id))
            .filter(|r| f.xid.is_none() || r.xid == f.xid)
            .filter(|r| f.actor.as_deref().is_none_or(|a| r.actor == a))
            .filter(|r| f.action.as_deref().is_none_or(|a| r.action == a))
            .filter(|r| f.since_ms.is_none_or(|t| r.at_ms >= t))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Checks the chain: ids without gaps from 1, each hash right, each record naming its
    /// predecessor's. Returns how many records were checked and the last hash.
    pub fn verify(&self) -> Result<(u64, [u8; 32]), Broken> {
        verify(&self.records)
    }
}

/// [`Audit::verify`] over records as they are (for example as loaded from the store).
pub fn verify(records: &[AuditRecord]) -> Result<(u64, [u8; 32]), Broken> {
    let mut prev = [0u8; 32];
    for (i, r) in records.iter().enumerate() {
        let expected_id = i as u64 + 1;
        let broken = |problem: String| Broken { id: r.id, problem };
        if r.id != expected_id {
            return Err(broken(format!(
                "expected record {expected_id} here: a record is missing"
            )));
        }
        if r.prev_hash != prev {
            return Err(broken("it does not name its predecessor's hash".into()));
        }
        if r.compute_hash() != r.hash {
            return Err(broken("its content does not match its hash: it was changed".into()));
        }
        prev = r.hash;
    }
    Ok((records.len() as u64, prev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: &str, xid: Option<&str>) -> AuditEntry {
        AuditEntry {
            actor: "alice".into(),
            role: "operator".into(),
            action: action.into(),
            xid: xid.map(str::to_owned),
            reason: "ticket 7".into(),
            effect: json!({"status": ["RollbackFailed", "Rollbacked"]}),
            ..AuditEntry::default()
        }
    }

    fn trail(n: u64) -> Audit {
        let mut a = Audit::default();
        for i in 0..n {
            let r = a.seal(
                entry(if i % 2 == 0 { "retry" } else { "resolve" }, Some("1-7")),
                100 + i,
            );
            a.append(r);
        }
        a
    }

    #[test]
    fn records_are_numbered_and_chained() {
        let a = trail(3);
        assert_eq!(
            a.list(&AuditFilter::default(), 10)
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(a.get(2).unwrap().prev_hash, a.get(1).unwrap().hash);
        assert_eq!(a.get(1).unwrap().prev_hash, [0; 32]);
        assert_eq!(a.verify().map(|(n, _)| n), Ok(3));
        let j = a.get(1).unwrap().to_json();
        assert_eq!(j["effect"]["status"][1], "Rollbacked");
        assert_eq!(j["hash"].as_str().map(str::len), Some(64));
    }

    #[test]
    fn a_changed_removed_or_reordered_record_breaks_the_chain() {
        let a = trail(4);
        let all = a.list(&AuditFilter::default(), 10);
        let mut changed = all.clone();
        changed[1].reason = "nothing to see".into();
        assert_eq!(verify(&changed).unwrap_err().id, 2);
        let mut removed = all.clone();
        removed.remove(2);
        assert_eq!(verify(&removed).unwrap_err().id, 4);
        // Rehashing a changed record does not help: its successor names the old hash.
        let mut rehashed = all.clone();
        rehashed[1].reason = "nothing to see".into();
        rehashed[1].hash = rehashed[1].compute_hash();
        assert_eq!(verify(&rehashed).unwrap_err().id, 3);
        assert!(verify(&all).is_ok());
    }

    #[test]
    fn filters() {
        let a = trail(5);
        let f = AuditFilter {
            action: Some("resolve".into()),
            ..AuditFilter::default()
        };
        assert_eq!(a.list(&f, 10).iter().map(|r| r.id).collect::<Vec<_>>(), [2, 4]);
        let f = AuditFilter {
            after_id: Some(3),
            since_ms: Some(0),
            ..AuditFilter::default()
        };
        assert_eq!(a.list(&f, 1).iter().map(|r| r.id).collect::<Vec<_>>(), [4]);
        let f = AuditFilter {
            xid: Some("1-8".into()),
            ..AuditFilter::default()
        };
        assert!(a.list(&f, 10).is_empty());
    }
}
