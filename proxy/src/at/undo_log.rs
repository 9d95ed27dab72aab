//! AT mode's undo records in the `undo_log` table (`coordinator/undo_table.rs`): the
//! format of a row's `context`, and a record too large for one row split into pieces, each
//! in a row of its own, read back in order.

use mysql_async::prelude::*;

use super::undo::UndoRecord;
use crate::coordinator::undo_table::{STATUS_CHUNK, STATUS_NORMAL};

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
