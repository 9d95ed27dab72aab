//! The `undo_log` table in each database the proxy writes undo records to. It keeps Seata's
//! column layout, so tools that know Seata's table read it; `log_status` 0 is a normal
//! record, 1 the GlobalFinished marker a rollback leaves when it finds no record (a late
//! phase-1 commit of that branch then fails on the unique key: anti-hanging).

/// Normal undo record.
pub const STATUS_NORMAL: i32 = 0;
/// Anti-hanging marker.
pub const STATUS_GLOBAL_FINISHED: i32 = 1;

/// Written into `context` of every row, naming the format of `rollback_info`.
pub const CONTEXT: &str = "ferrata:1";

pub const CREATE: &str = "CREATE TABLE IF NOT EXISTS undo_log (
  branch_id BIGINT NOT NULL COMMENT 'branch id from ferrata-tc',
  xid VARCHAR(128) NOT NULL COMMENT 'global transaction id',
  context VARCHAR(128) NOT NULL COMMENT 'format of rollback_info',
  rollback_info LONGBLOB NOT NULL COMMENT 'before and after images',
  log_status INT NOT NULL COMMENT '0 normal, 1 global finished (anti-hanging marker)',
  log_created DATETIME(6) NOT NULL,
  log_modified DATETIME(6) NOT NULL,
  UNIQUE KEY ux_undo_log (xid, branch_id)
) ENGINE=InnoDB COMMENT='Ferrata AT mode undo records'";

/// MySQL's "table doesn't exist".
pub const NO_SUCH_TABLE: u16 = 1146;

/// What a DBA must run when the proxy may not create the table itself.
pub fn dba_instructions(database: &str, user: &str) -> String {
    format!(
        "the table {database}.undo_log is missing and ferrata-proxy may not create it; a DBA must run, in database {database}: {CREATE}; \
         and grant the proxy's service user: GRANT SELECT, INSERT, DELETE ON {database}.undo_log TO '{user}'"
    )
}
