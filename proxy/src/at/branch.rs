//! `PendingBranch`: the phase-1 work of one local transaction inside a global one, its undo
//! items and the rows they lock.

use ferrata_rpc::pb;

use super::undo::UndoItem;

/// Phase-1 work of one local transaction: its undo items and the rows it locks.
#[derive(Debug)]
pub struct PendingBranch {
    pub xid: String,
    /// The database every write of the local transaction went to (one branch, one resource).
    pub schema: String,
    pub items: Vec<UndoItem>,
}

impl PendingBranch {
    /// The rows the items wrote, by table: primary keys encoded as in the images, each once.
    /// Derived from the items, never kept apart, so that a savepoint rolled back to unlocks
    /// exactly the rows written after it.
    pub fn locks(&self) -> Vec<pb::TableLocks> {
        let mut tables: std::collections::BTreeMap<&str, std::collections::BTreeSet<Vec<Vec<u8>>>> = Default::default();
        for item in &self.items {
            let keys = tables.entry(&item.table).or_default();
            for row in item.key_rows() {
                keys.insert(
                    item.primary_key
                        .iter()
                        .map(|&i| row[i].clone().unwrap_or_default().into_bytes())
                        .collect(),
                );
            }
        }
        tables
            .into_iter()
            .map(|(table, rows)| pb::TableLocks {
                schema: self.schema.clone(),
                table: table.to_owned(),
                rows: rows.into_iter().map(|values| pb::PrimaryKey { values }).collect(),
            })
            .collect()
    }
}
