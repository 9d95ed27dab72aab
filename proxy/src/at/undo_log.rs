//! The `undo_log` table in each database the proxy writes undo records to. It keeps Seata's
//! column layout, so tools that know Seata's table read it; `log_status` 0 is a normal
//! record, 1 the GlobalFinished marker a rollback leaves when it finds no record (a late
//! phase-1 commit of that branch then fails on the unique key: anti-hanging), 2 a further
//! piece of a record split because it is larger than one row may be. [`UndoLogs`] makes sure
//! the table exists before the first record goes into a database; [`sweep_markers`] deletes
//! markers once the late commit they block can no longer arrive, so the table does not grow
//! with every fault.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::*;
use parking_lot::Mutex;

use tokio_util::sync::CancellationToken;

use super::At;
use super::undo::UndoRecord;
use crate::config::Config;
use crate::coordinator::{Global, database_of, service_error};

/// Normal undo record.
pub const STATUS_NORMAL: i32 = 0;
/// Anti-hanging marker.
pub const STATUS_GLOBAL_FINISHED: i32 = 1;

/// A further piece of a record too large for one row (see [`chunk_xid`]).
pub const STATUS_CHUNK: i32 = 2;

/// Written into `context` of every row, naming the format of `rollback_info`; a record split
/// into pieces says how many: `ferrata:1;chunks=3`.
pub const CONTEXT: &str = "ferrata:1";

/// The context of a main row whose record is split into `chunks` pieces.
pub fn context(chunks: usize) -> String {
    if chunks <= 1 {
        CONTEXT.to_owned()
    } else {
        format!("{CONTEXT};chunks={chunks}")
    }
}

/// How many pieces a main row's context announces (1 when not split).
pub fn chunks_of(context: &str) -> usize {
    context
        .split(';')
        .find_map(|p| p.strip_prefix("chunks="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// Pieces 2.. of a record live in rows of their own, keyed by the branch id and a derived XID
/// `<xid>#<n>` (n from 2), so the unique key stays (xid, branch_id) and every piece is read
/// back by its number, in order. A piece stays below the server's max_allowed_packet, which
/// bounds both the INSERT that writes it and the row that reads it back.
pub fn chunk_xid(xid: &str, n: usize) -> String {
    format!("{xid}#{n}")
}

/// One row of a stored record: `(xid, context, log_status, bytes)`, the main row first.
pub type Piece<'a> = (String, String, i32, &'a [u8]);

/// The rows that store `record` for branch `xid`, each at most `chunk` bytes: the main row
/// (its context says how many pieces) and the pieces after it (see [`chunk_xid`]).
pub fn pieces<'a>(xid: &str, record: &'a [u8], chunk: usize) -> Vec<Piece<'a>> {
    let parts: Vec<&[u8]> = if record.is_empty() {
        vec![record]
    } else {
        record.chunks(chunk.max(1)).collect()
    };
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            if i == 0 {
                (xid.to_owned(), context(n), STATUS_NORMAL, bytes)
            } else {
                (chunk_xid(xid, i + 1), CONTEXT.to_owned(), STATUS_CHUNK, bytes)
            }
        })
        .collect()
}

/// A branch's undo record, its pieces joined in order (a proxy's rollback or repair, and
/// `ferrata undo` reading a database).
pub async fn read_record<Q: Queryable>(q: &mut Q, xid: &str, branch_id: u64) -> Result<UndoRecord, String> {
    let (context, mut bytes): (String, Vec<u8>) = q
        .exec_first(
            "SELECT context, rollback_info FROM undo_log WHERE xid = ? AND branch_id = ?",
            (xid, branch_id),
        )
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the undo record vanished")?;
    for n in 2..=chunks_of(&context) {
        let piece: Option<Vec<u8>> = q
            .exec_first(
                "SELECT rollback_info FROM undo_log WHERE xid = ? AND branch_id = ?",
                (chunk_xid(xid, n), branch_id),
            )
            .await
            .map_err(|e| e.to_string())?;
        bytes.extend(piece.ok_or_else(|| format!("piece {n} of the undo record is missing"))?);
    }
    UndoRecord::from_bytes(&bytes).map_err(|e| format!("the undo record cannot be read: {e}"))
}

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
/// connection at UTC (`phase2.rs`), so their age is measured against UTC too.
pub async fn sweep_markers(at: Arc<At>, stop: CancellationToken) {
    let every = (at.undo_logs.marker_retention / 12).clamp(Duration::from_millis(100), Duration::from_secs(300));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        for resource in at.global.link.served() {
            match at.undo_logs.sweep(&at.global, &resource).await {
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
