//! The `undo_log` table in each business database the proxy writes to: Ferrata's one table
//! there. It keeps Seata's column layout, so tools that know Seata's table read it;
//! `log_status` 0 is a normal AT undo record, 1 a GlobalFinished marker (the one an AT
//! rollback leaves when it finds no record, so that a late phase-1 commit of that branch fails
//! on the unique key: anti-hanging; and an XA branch's commit evidence, `context`
//! `ferrata:xa`), 2 a further piece of an AT record split because it is larger than one row
//! may be. The record format is AT mode's (`at/undo_log.rs`). [`UndoLogs`] makes sure the
//! table exists before the first row goes into a database; [`sweep_markers`] deletes
//! markers once what they guard against can no longer happen, so the table does not grow
//! with every fault.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::*;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Global, database_of, service_error};
use crate::config::Config;

/// Normal undo record.
pub const STATUS_NORMAL: i32 = 0;
/// Anti-hanging marker.
pub const STATUS_GLOBAL_FINISHED: i32 = 1;

/// A further piece of a record too large for one row (see [`chunk_xid`]).
pub const STATUS_CHUNK: i32 = 2;

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

/// The `undo_log` tables of the databases this proxy writes to: known to exist, created, or
/// what a DBA must do; and how large one row's piece of a record may be.
pub struct UndoLogs {
    /// `[service] create_undo_log`: whether the proxy creates a missing table itself.
    create: bool,
    service_user: String,
    /// Resources whose undo_log table is known to exist.
    known: Mutex<HashSet<String>>,
    /// Bytes of an undo record per row, from the server's max_allowed_packet (read once).
    chunk: tokio::sync::OnceCell<usize>,
    /// How long an anti-hanging marker is kept (`[service] marker_retention_ms`).
    marker_retention: Duration,
}

/// Markers deleted per statement, so a sweep never holds many rows' locks at once.
const SWEEP_BATCH: u64 = 1000;

impl UndoLogs {
    pub fn new(config: &Config) -> UndoLogs {
        UndoLogs {
            create: config.service.create_undo_log,
            service_user: config.service.user.clone(),
            known: Mutex::new(HashSet::new()),
            chunk: tokio::sync::OnceCell::new(),
            marker_retention: Duration::from_millis(config.service.marker_retention_ms),
        }
    }

    /// Whether the proxy creates the tables it needs (`[service] create_undo_log`).
    pub fn may_create(&self) -> bool {
        self.create
    }

    /// Creates the undo_log table, or says what a DBA must run.
    pub async fn create(&self, conn: &mut mysql_async::Conn, resource: &str) -> Result<(), String> {
        let db = database_of(resource).unwrap_or_default();
        if !self.create {
            return Err(dba_instructions(&db, &self.service_user));
        }
        match conn.query_drop(CREATE).await {
            Ok(()) => {
                tracing::info!(database = db, "created the undo_log table");
                Ok(())
            }
            Err(mysql_async::Error::Server(e)) if matches!(e.code, 1142 | 1044 | 1045) => {
                Err(format!("{} ({})", dba_instructions(&db, &self.service_user), e.message))
            }
            Err(e) => Err(format!("creating {db}.undo_log failed: {e}")),
        }
    }

    /// Makes sure `undo_log` exists in the resource's database.
    pub async fn ensure(&self, global: &Global, resource: &str) -> Result<(), String> {
        if self.known.lock().contains(resource) {
            return Ok(());
        }
        let mut conn = global
            .service_conn(resource)
            .await
            .map_err(|e| service_error(&e).message)?;
        let exists: Option<i64> = conn
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'undo_log'",
                (database_of(resource).unwrap_or_default(),),
            )
            .await
            .map_err(|e| e.to_string())?;
        if exists != Some(1) {
            self.create(&mut conn, resource).await?;
        }
        self.known.lock().insert(resource.to_owned());
        Ok(())
    }

    /// How many bytes of an undo record go into one row: a third of the server's
    /// max_allowed_packet (the INSERT carries them as hex), 1 MiB when it cannot be read.
    pub async fn chunk_bytes(&self, global: &Global) -> usize {
        *self
            .chunk
            .get_or_init(|| async {
                let read = async {
                    let mut conn = global.service_conn(&global.resource("mysql")).await?;
                    conn.query_first::<u64, _>("SELECT @@global.max_allowed_packet").await
                };
                match read.await {
                    Ok(Some(max)) => (max / 3).max(1024) as usize,
                    _ => 1 << 20,
                }
            })
            .await
    }
}

impl UndoLogs {
    /// Deletes the anti-hanging markers older than the retention in one database, in batches
    /// (the late commit each one blocked can no longer arrive), and counts those left.
    async fn sweep(&self, global: &Global, resource: &str) -> Result<(u64, u64), mysql_async::Error> {
        let mut conn = global.service_conn(resource).await?;
        let micros = self.marker_retention.as_micros() as u64;
        let mut deleted = 0;
        loop {
            conn.exec_drop(
                "DELETE FROM undo_log WHERE log_status = ? AND log_created < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND LIMIT ?",
                (STATUS_GLOBAL_FINISHED, micros, SWEEP_BATCH),
            )
            .await?;
            let n = conn.affected_rows();
            deleted += n;
            if n < SWEEP_BATCH {
                break;
            }
        }
        let left: Option<u64> = conn
            .exec_first(
                "SELECT COUNT(*) FROM undo_log WHERE log_status = ?",
                (STATUS_GLOBAL_FINISHED,),
            )
            .await?;
        Ok((deleted, left.unwrap_or(0)))
    }
}

/// Sweeps the anti-hanging markers of every database this proxy serves, every twelfth of the
/// retention (at least every 5 minutes), until `stop`. Markers are written on the service
/// connection at UTC (`at/phase2.rs`), so their age is measured against UTC too.
pub async fn sweep_markers(global: Arc<Global>, undo_logs: Arc<UndoLogs>, stop: CancellationToken) {
    let every = (undo_logs.marker_retention / 12).clamp(Duration::from_millis(100), Duration::from_secs(300));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        for resource in global.link.served() {
            match undo_logs.sweep(&global, &resource).await {
                Ok((deleted, left)) => {
                    metrics::counter!("ferrata_proxy_antihanging_markers_deleted_total", "resource" => resource.clone())
                        .increment(deleted);
                    metrics::gauge!("ferrata_proxy_antihanging_markers", "resource" => resource.clone())
                        .set(left as f64);
                    if deleted > 0 {
                        tracing::info!(
                            resource,
                            deleted,
                            left,
                            "anti-hanging markers past their retention deleted"
                        );
                    }
                }
                // No undo_log there (yet): nothing to sweep.
                Err(mysql_async::Error::Server(e)) if e.code == NO_SUCH_TABLE => {}
                Err(e) => {
                    tracing::warn!(resource, error = %e, "sweeping anti-hanging markers failed; retried at the next sweep")
                }
            }
        }
    }
}
