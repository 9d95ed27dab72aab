//! DTM's barrier table (`[barrier] table`, `dtm_barrier.barrier` by default), as the barriers
//! of TCC and saga handlers (`barrier/`), the settling of prepared messages and the outbox's
//! hand-over (`outbox/`) all use it: its name and its layout, so DTM's SDK barriers and
//! Ferrata's interoperate.

/// Where the barrier rows are.
pub struct BarrierTable {
    /// Quoted, with its database.
    pub table: String,
    pub database: String,
    /// The table's name, unquoted.
    pub name: String,
}

/// DTM's barrier id of a handler's first barrier (a handler calling it once per request),
/// and of a message transaction's row.
pub const BARRIER_ID: &str = "01";

impl BarrierTable {
    pub fn new(config: &crate::config::Barriers) -> BarrierTable {
        let (database, table) = config.table.split_once('.').unwrap_or(("dtm_barrier", "barrier"));
        BarrierTable {
            table: crate::sql::qualified(database, table),
            database: database.to_owned(),
            name: table.to_owned(),
        }
    }

    /// DTM's layout (`sqls/dtmcli.barrier.mysql.sql`), and its database.
    pub fn create_sql(&self) -> [String; 2] {
        [
            format!("CREATE DATABASE IF NOT EXISTS {}", crate::sql::ident(&self.database)),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id BIGINT(22) PRIMARY KEY AUTO_INCREMENT, trans_type VARCHAR(45) DEFAULT '', \
                 gid VARCHAR(128) DEFAULT '', branch_id VARCHAR(128) DEFAULT '', op VARCHAR(45) DEFAULT '', \
                 barrier_id VARCHAR(45) DEFAULT '', reason VARCHAR(45) DEFAULT '' COMMENT 'the branch type who insert this record', \
                 create_time DATETIME DEFAULT NOW(), update_time DATETIME DEFAULT NOW(), KEY(create_time), KEY(update_time), \
                 UNIQUE KEY(gid, branch_id, op, barrier_id)) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
                self.table
            ),
        ]
    }

    /// The insert of a message transaction's row (gid its XID, given as `gid`, and the
    /// branch_id `branch` (`00`, or a hand-over's barrier inside a global transaction): quoted
    /// literals or `?`; `msg`, `msg`) with `reason`: `msg` by its local transaction,
    /// `rollback` by the check (IGNORE: unless there).
    pub fn message_row(&self, ignore: bool, gid: &str, branch: &str, reason: &str) -> String {
        format!(
            "INSERT {}INTO {} (trans_type, gid, branch_id, op, barrier_id, reason) VALUES ('msg', {gid}, {branch}, 'msg', '{BARRIER_ID}', '{reason}')",
            if ignore { "IGNORE " } else { "" },
            self.table
        )
    }
}
