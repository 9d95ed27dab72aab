//! The XA identifier of a Ferrata branch, as MariaDB sees it: the global transaction's XID
//! as gtrid, the branch id (decimal) as bqual, and Ferrata's own format id, so that
//! `XA RECOVER` tells Ferrata's branches from everyone else's. Both parts are sent as hex
//! literals: nothing in them needs quoting, and MariaDB keeps the bytes as they are.

use crate::sql::hex;

/// Ferrata's XA format id: "FRTA" in ASCII. Distinct from the default (1) and Seata's (9752),
/// below 2^31 (MariaDB's parser refuses larger ones) and within 4 bytes (what MariaDB keeps
/// with binary logging on).
pub const FORMAT_ID: u32 = 0x4652_5441;

/// One branch's XA identifier. A Ferrata XID is `<node>-<sequence>` (at most 26 bytes) and a
/// branch id at most 20 digits: both far below MariaDB's 64-byte limits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct XaId {
    pub xid: String,
    pub branch_id: u64,
}

impl XaId {
    pub fn new(xid: &str, branch_id: u64) -> XaId {
        XaId {
            xid: xid.to_owned(),
            branch_id,
        }
    }

    /// The identifier as XA statements take it: `X'<gtrid>',X'<bqual>',<format id>`.
    pub fn sql(&self) -> String {
        format!(
            "X'{}',X'{}',{FORMAT_ID}",
            hex(self.xid.as_bytes()),
            hex(self.branch_id.to_string().as_bytes())
        )
    }

    /// A row of `XA RECOVER` (`formatID`, `gtrid_length`, `bqual_length`, `data`), if it is a
    /// Ferrata branch's.
    pub fn from_recover(format_id: i64, gtrid_length: usize, bqual_length: usize, data: &[u8]) -> Option<XaId> {
        if format_id != i64::from(FORMAT_ID) || data.len() != gtrid_length + bqual_length {
            return None;
        }
        let (gtrid, bqual) = data.split_at(gtrid_length);
        let xid = std::str::from_utf8(gtrid).ok()?;
        let branch_id = std::str::from_utf8(bqual).ok()?.parse().ok()?;
        Some(XaId::new(xid, branch_id))
    }
}

/// Whether a client's XA statement may name a Ferrata branch (its format id, in decimal or
/// hex): any MariaDB user may commit or roll back any prepared branch, so the proxy lets no
/// client touch Ferrata's.
pub fn names_ferrata_branch(sql: &[u8]) -> bool {
    let contains = |needle: &[u8]| sql.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle));
    contains(FORMAT_ID.to_string().as_bytes()) || contains(format!("0x{FORMAT_ID:x}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_xa_recover() {
        let id = XaId::new("65535-281474976710655", u64::MAX);
        let data = format!("{}{}", id.xid, id.branch_id);
        assert_eq!(
            XaId::from_recover(i64::from(FORMAT_ID), id.xid.len(), 20, data.as_bytes()),
            Some(id.clone())
        );
        assert!(id.xid.len() <= 64 && u64::MAX.to_string().len() <= 64);
        assert_eq!(
            XaId::from_recover(1, id.xid.len(), 20, data.as_bytes()),
            None,
            "not ours"
        );
        assert_eq!(XaId::from_recover(i64::from(FORMAT_ID), 3, 1, b"1-2x"), None);
        assert_eq!(
            XaId::new("1-2", 3).sql(),
            format!("X'312D32',X'33',{FORMAT_ID}"),
            "hex parts, decimal format id"
        );
    }

    #[test]
    fn client_statements_naming_ferrata_branches() {
        assert!(names_ferrata_branch(
            format!("XA COMMIT 'a','b',{FORMAT_ID}").as_bytes()
        ));
        assert!(names_ferrata_branch(b"xa rollback X'31',X'32',0X46525441"));
        assert!(!names_ferrata_branch(b"XA COMMIT 'a','b',1"));
        assert!(!names_ferrata_branch(b"XA RECOVER"));
    }
}
