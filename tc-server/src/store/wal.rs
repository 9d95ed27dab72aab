//! The write-ahead log in front of the redb store: a commit is one record appended to the
//! log and one fdatasync, instead of a B-tree commit; a checkpointer thread applies the
//! records to the redb file in large batches, each one durable commit that also notes the
//! last record it holds (`log_applied`), and deletes the log segments it no longer needs.
//!
//! ## Files
//!
//! Segments `wal-<first record, 20 digits>.log` in the data directory. A segment is a run of
//! records, each a header and a payload. The header: a version byte ([`FORMAT_VERSION`], as
//! the redb records'; the payload is `Mutation`s in postcard, so a change to them or to the
//! records they carry bumps it), the record's number (u64, one more than the one before,
//! across segments), the payload's length (u64), the payload's CRC-32 and the CRC-32 of
//! everything before it in the header (all little-endian). A segment that reaches
//! [`Settings::segment_bytes`] is closed and a new one begun.
//!
//! ## Opening
//!
//! Every record after the file's `log_applied` (written in the same redb commit as the
//! records it covers, so each record is applied exactly once) is applied to the redb file, in
//! order, then every segment is deleted and a new one begun. Each record is made durable
//! before the next is written, so only the last one can be torn by a crash (and was then
//! never acknowledged): a record that does not read whole and intact is dropped if it is in
//! the last segment and no intact header of it or a later record follows (a torn write may
//! leave garbage or zeros after it); any other damage is refused, since acknowledged records
//! would be lost.
//!
//! ## Shutdown
//!
//! Dropping the store applies what is left and deletes the segments, so a cleanly stopped
//! coordinator leaves only the redb file (and a later version that changes the records never
//! needs to read an older log).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::record::FORMAT_VERSION;
use super::redb::RedbStore;
use super::{Mutation, Snapshot, Store, StoreError};

/// When the checkpointer applies what it has.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// At most this long after the oldest record it holds.
    pub checkpoint_every: Duration,
    /// Or once it holds this many mutations.
    pub checkpoint_mutations: usize,
    /// A segment is closed once it is this large.
    pub segment_bytes: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            checkpoint_every: Duration::from_millis(250),
            checkpoint_mutations: 200_000,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Bytes in front of each record's payload: version, number, length, payload CRC, header CRC.
const HEADER: usize = 1 + 8 + 8 + 4 + 4;
/// Records the checkpointer may be behind before commits wait for it.
const BACKLOG: usize = 4 * 1024;

pub struct LoggedStore {
    inner: Arc<RedbStore>,
    dir: PathBuf,
    settings: Settings,
    log: Mutex<Segment>,
    checkpointer: Option<(SyncSender<Work>, JoinHandle<()>)>,
    /// Why the store stopped accepting commits: a failed write or fsync of the log (its
    /// state is then unknown), or a failed checkpoint.
    failed: Arc<Mutex<Option<String>>>,
}

/// The segment being appended to.
struct Segment {
    file: File,
    path: PathBuf,
    bytes: u64,
    next_record: u64,
}

/// What the journal thread hands the checkpointer, in order.
enum Work {
    Record(u64, Vec<Mutation>),
    /// A closed segment: deleted once every record in it is applied.
    Closed(PathBuf),
}

impl LoggedStore {
    /// Opens the redb store in `dir` and its log, applying what the log holds beyond it.
    pub fn open(dir: &Path, settings: Settings) -> Result<LoggedStore, StoreError> {
        let inner = Arc::new(RedbStore::open(dir)?);
        let applied = inner.log_applied()?;
        let segments = segments(dir)?;
        let mut last = applied;
        let mut replay: Vec<Mutation> = Vec::new();
        for (i, (first, path)) in segments.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|e| io_error("read", path, &e))?;
            let is_last = i + 1 == segments.len();
            for (number, batch) in records(path, &bytes, *first, is_last)? {
                if number <= applied {
                    continue;
                }
                if number != last + 1 {
                    return Err(StoreError(format!(
                        "the write-ahead log {} jumps from record {last} to {number}: a segment is missing; \
                         restore the data directory from a backup",
                        path.display()
                    )));
                }
                last = number;
                replay.extend(batch);
            }
        }
        if last > applied {
            tracing::info!(
                records = last - applied,
                mutations = replay.len(),
                "applying the write-ahead log"
            );
            inner.apply(&superseded_left_out(replay), Some(last))?;
        }
        for (_, path) in &segments {
            std::fs::remove_file(path).map_err(|e| io_error("delete", path, &e))?;
        }
        let log = Segment::begin(dir, last + 1)?;
        let failed = Arc::new(Mutex::new(None));
        let (to_checkpointer, work) = sync_channel(BACKLOG);
        let checkpointer = {
            let (inner, failed) = (Arc::clone(&inner), Arc::clone(&failed));
            std::thread::Builder::new()
                .name("ferrata-checkpoint".into())
                .spawn(move || {
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        checkpoint_loop(&inner, &work, settings, &failed)
                    }));
                    if ran.is_err() {
                        tracing::error!("the checkpoint thread panicked; the coordinator stops acknowledging changes");
                        failed
                            .lock()
                            .get_or_insert_with(|| "the checkpoint thread panicked".into());
                    }
                })
                .map_err(|e| StoreError(format!("cannot start the checkpoint thread: {e}")))?
        };
        Ok(LoggedStore {
            inner,
            dir: dir.to_owned(),
            settings,
            log: Mutex::new(log),
            checkpointer: Some((to_checkpointer, checkpointer)),
            failed,
        })
    }

    /// Appends `batch` as the next record and makes it durable, then hands it to the
    /// checkpointer.
    fn append(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        let payload = postcard::to_stdvec(batch).map_err(|e| StoreError(format!("cannot encode a batch: {e}")))?;
        let mut log = self.log.lock();
        if log.bytes >= self.settings.segment_bytes {
            // Before the write, so that a segment that cannot be begun leaves nothing half done.
            let next = Segment::begin(&self.dir, log.next_record)?;
            let closed = std::mem::replace(&mut *log, next);
            self.hand_over(Work::Closed(closed.path))?;
        }
        let number = log.next_record;
        let record = encode_record(number, &payload);
        let written = log.file.write_all(&record).and_then(|()| log.file.sync_data());
        if let Err(e) = written {
            // After a failed write or fsync the file's contents are unknown: nothing more
            // may be acknowledged on top of it.
            let why = io_error("append to", &log.path, &e);
            *self.failed.lock() = Some(why.0.clone());
            return Err(why);
        }
        log.next_record += 1;
        log.bytes += record.len() as u64;
        if let Err(e) = self.hand_over(Work::Record(number, batch.to_vec())) {
            // Durable (a restart applies it), but nothing more may be taken on.
            *self.failed.lock() = Some(e.0);
        }
        Ok(())
    }

    fn hand_over(&self, work: Work) -> Result<(), StoreError> {
        let (to_checkpointer, _) = self.checkpointer.as_ref().expect("running until dropped");
        to_checkpointer
            .send(work)
            .map_err(|_| StoreError("the checkpoint thread has stopped".into()))
    }

    /// Stops as a crash would: nothing more is applied to the redb file, the log stays.
    #[cfg(test)]
    fn crash(mut self) {
        *self.failed.lock() = Some("crashed (test)".into());
        if let Some((to_checkpointer, thread)) = self.checkpointer.take() {
            drop(to_checkpointer);
            let _ = thread.join();
        }
    }
}

impl Store for LoggedStore {
    /// What is stored, read once at start: `open` has applied the whole log to the redb
    /// file, so the file holds it all then.
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        if let Some(why) = self.failed.lock().clone() {
            return Err(StoreError(format!(
                "the store is unusable since an earlier failure: {why}"
            )));
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.append(batch)
    }
}

impl Drop for LoggedStore {
    fn drop(&mut self) {
        let Some((to_checkpointer, thread)) = self.checkpointer.take() else {
            return;
        };
        drop(to_checkpointer);
        let _ = thread.join();
        let log = self.log.lock();
        // Only a log whose every record the file holds may go (whatever stopped the
        // checkpointer, a panic included).
        if self.inner.log_applied().ok() == Some(log.next_record - 1) {
            if let Err(e) = std::fs::remove_file(&log.path) {
                tracing::warn!(path = %log.path.display(), error = %e, "cannot delete the applied write-ahead log");
            }
        } else {
            tracing::warn!(path = %log.path.display(), "the write-ahead log is not fully applied; the next start applies it");
        }
    }
}

impl Segment {
    /// Creates the segment whose first record is `first`, durably named in `dir`.
    fn begin(dir: &Path, first: u64) -> Result<Segment, StoreError> {
        let path = dir.join(format!("wal-{first:020}.log"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_error("create", &path, &e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("sync the directory of", &path, &e))?;
        Ok(Segment {
            file,
            path,
            bytes: 0,
            next_record: first,
        })
    }
}

/// The checkpointer: gathers records for up to `checkpoint_every` (or `checkpoint_mutations`),
/// applies them in one durable redb commit, deletes the segments that held only applied
/// records; until the store is dropped, then once more with what is left.
fn checkpoint_loop(inner: &RedbStore, work: &Receiver<Work>, settings: Settings, failed: &Mutex<Option<String>>) {
    metrics::describe_histogram!(
        "ferrata_tc_store_checkpoint_seconds",
        metrics::Unit::Seconds,
        "Duration of each checkpoint: write-ahead log records applied to the redb file"
    );
    let checkpoints = metrics::histogram!("ferrata_tc_store_checkpoint_seconds");
    let mut closing = false;
    while !closing {
        let Ok(first) = work.recv() else { break };
        let deadline = Instant::now() + settings.checkpoint_every;
        let mut batch = Vec::new();
        let mut last = None;
        let mut closed = Vec::new();
        let mut next = Some(first);
        while let Some(w) = next.take() {
            match w {
                Work::Record(number, mutations) => {
                    batch.extend(mutations);
                    last = Some(number);
                }
                Work::Closed(path) => closed.push(path),
            }
            if batch.len() >= settings.checkpoint_mutations {
                break;
            }
            match work.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(w) => next = Some(w),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closing = true,
            }
        }
        if failed.lock().is_some() {
            // Crashed (tests) or broken: what is not applied stays in the log.
            return;
        }
        if let Some(last) = last {
            let started = Instant::now();
            if let Err(e) = inner.apply(&superseded_left_out(batch), Some(last)) {
                tracing::error!(error = %e, "checkpoint failed; the coordinator stops acknowledging changes");
                *failed.lock() = Some(e.0);
                return;
            }
            checkpoints.record(started.elapsed().as_secs_f64());
        }
        for path in closed {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete an applied write-ahead log segment");
            }
        }
    }
}

/// `batch` without the mutations a later one in it undoes: a global or branch record written
/// again or deleted later (a finish deletes the transaction's global record and branches).
/// Applied, both give the same state; most of a checkpoint's records are such, since a
/// transaction usually begins, registers and finishes within one.
fn superseded_left_out(batch: Vec<Mutation>) -> Vec<Mutation> {
    use std::collections::HashSet;
    let mut finished_later = HashSet::new();
    let mut global_later = HashSet::new();
    let mut branch_later = HashSet::new();
    let mut kept: Vec<Mutation> = batch
        .into_iter()
        .rev()
        .filter(|m| match m {
            Mutation::Finish(f) => {
                finished_later.insert(f.record.txn_id);
                true
            }
            Mutation::PutGlobal(g) => !finished_later.contains(&g.txn_id) && global_later.insert(g.txn_id),
            Mutation::PutBranch(b) => {
                !finished_later.contains(&b.txn_id) && branch_later.insert((b.txn_id, b.branch_id))
            }
            Mutation::DeleteBranch { txn_id, branch_id } => {
                !finished_later.contains(txn_id) && branch_later.insert((*txn_id, *branch_id))
            }
            _ => true,
        })
        .collect();
    kept.reverse();
    kept
}

/// The log segments in `dir` with their first record's number, oldest first.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("list", dir, &e))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| io_error("list", dir, &e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(first) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((first, path));
        }
    }
    found.sort();
    Ok(found)
}

/// One record: header and payload (see the module docs).
fn encode_record(number: u64, payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(HEADER + payload.len());
    record.push(FORMAT_VERSION);
    record.extend_from_slice(&number.to_le_bytes());
    record.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let header_sum = crc32fast::hash(&record);
    record.extend_from_slice(&header_sum.to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// A record's header, if `bytes` starts with an intact one: (version, number, length,
/// payload CRC).
fn header(bytes: &[u8]) -> Option<(u8, u64, u64, u32)> {
    let header = bytes.get(..HEADER)?;
    let sum = u32::from_le_bytes(header[21..25].try_into().ok()?);
    (crc32fast::hash(&header[..21]) == sum).then(|| {
        (
            header[0],
            u64::from_le_bytes(header[1..9].try_into().expect("8 bytes")),
            u64::from_le_bytes(header[9..17].try_into().expect("8 bytes")),
            u32::from_le_bytes(header[17..21].try_into().expect("4 bytes")),
        )
    })
}

/// The records of one segment (whose first record is `first`), in order. A record that
/// does not read whole and intact ends the segment if it is the last one and nothing after
/// it holds an intact header numbered as it or later (a torn last write); otherwise it is
/// refused.
fn records(path: &Path, bytes: &[u8], first: u64, is_last: bool) -> Result<Vec<(u64, Vec<Mutation>)>, StoreError> {
    let mut found = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let expected = found.last().map_or(first, |(n, _)| n + 1);
        let rest = &bytes[offset..];
        let intact = header(rest).and_then(|(version, number, length, sum)| {
            let end = HEADER.checked_add(usize::try_from(length).ok()?)?;
            let payload = rest.get(HEADER..end)?;
            (crc32fast::hash(payload) == sum).then_some((version, number, payload, end))
        });
        let Some((version, number, payload, end)) = intact else {
            let later = (offset + 1..bytes.len()).any(|at| header(&bytes[at..]).is_some_and(|h| h.1 >= expected));
            if is_last && !later {
                return Ok(found);
            }
            return Err(StoreError(format!(
                "the write-ahead log {} is damaged at byte {offset} (record {expected} does not read whole and \
                 intact), with acknowledged records after it; restore the data directory from a backup",
                path.display()
            )));
        };
        if version != FORMAT_VERSION {
            return Err(StoreError(format!(
                "the write-ahead log {} holds records of format {version}, which this ferrata-tc (format {FORMAT_VERSION}) \
                 does not read; start the version that wrote it once and stop it cleanly, which applies and deletes the log",
                path.display()
            )));
        }
        let batch: Vec<Mutation> = postcard::from_bytes(payload).map_err(|e| {
            StoreError(format!(
                "the write-ahead log {} has record {number} that does not decode ({e}); restore the data directory from a backup",
                path.display()
            ))
        })?;
        found.push((number, batch));
        offset += end;
    }
    Ok(found)
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> StoreError {
    StoreError(format!("cannot {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GlobalStatus;
    use crate::store::fixtures::{branch, finished, global};

    /// Checkpoints only when the store is dropped, unless told otherwise.
    fn lazy() -> Settings {
        Settings {
            checkpoint_every: Duration::from_secs(3600),
            checkpoint_mutations: usize::MAX,
            segment_bytes: u64::MAX,
        }
    }

    fn log_files(dir: &Path) -> Vec<PathBuf> {
        segments(dir).unwrap().into_iter().map(|(_, path)| path).collect()
    }

    fn history() -> Vec<Vec<Mutation>> {
        vec![
            vec![
                Mutation::PutGlobal(global(1, GlobalStatus::Begin)),
                Mutation::SetIdCeiling(100),
            ],
            vec![Mutation::PutBranch(branch(1, 10)), Mutation::PutBranch(branch(1, 11))],
            vec![Mutation::PutGlobal(global(2, GlobalStatus::Begin))],
            vec![Mutation::Finish(finished(1, GlobalStatus::Committed))],
        ]
    }

    /// A store in `dir` that has committed `history()` and not checkpointed it.
    fn with_history(dir: &Path) -> LoggedStore {
        let store = LoggedStore::open(dir, lazy()).unwrap();
        for batch in history() {
            store.commit(&batch).unwrap();
        }
        store
    }

    fn assert_holds_history(snapshot: &Snapshot) {
        assert_eq!(snapshot.id_ceiling, 100);
        assert_eq!(snapshot.globals, vec![global(2, GlobalStatus::Begin)]);
        assert!(snapshot.branches.is_empty(), "finished with its transaction");
        assert_eq!(snapshot.finished, vec![finished(1, GlobalStatus::Committed)]);
    }

    #[test]
    fn what_was_acknowledged_survives_a_crash_and_a_torn_last_write_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_history(dir.path());
        store.crash();
        assert_eq!(
            RedbStore::open(dir.path()).unwrap().log_applied().unwrap(),
            0,
            "nothing applied yet"
        );
        // A write cut short by the crash: part of a record, then zeros (as some file systems
        // leave a file extended by a write that did not reach the disk).
        let segment = log_files(dir.path()).pop().unwrap();
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        let torn = encode_record(5, &postcard::to_stdvec(&history()[0]).unwrap());
        file.write_all(&torn[..torn.len() - 3]).unwrap();
        file.write_all(&[0; 4096]).unwrap();
        drop(file);

        let store = LoggedStore::open(dir.path(), lazy()).unwrap();
        assert_holds_history(&store.load().unwrap());
        assert_eq!(log_files(dir.path()).len(), 1, "the old segment is applied and gone");
        // Numbering goes on after the applied records.
        store
            .commit(&[Mutation::PutGlobal(global(3, GlobalStatus::Begin))])
            .unwrap();
        store.crash();
        let store = LoggedStore::open(dir.path(), lazy()).unwrap();
        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.globals.len(), 2, "{snapshot:?}");
        assert_eq!(store.inner.log_applied().unwrap(), 5);
    }

    #[test]
    fn checkpoints_apply_the_log_and_delete_applied_segments() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            checkpoint_every: Duration::from_millis(10),
            checkpoint_mutations: 2,
            segment_bytes: 1,
        };
        let store = LoggedStore::open(dir.path(), settings).unwrap();
        for batch in history() {
            store.commit(&batch).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.inner.log_applied().unwrap() < 4 || log_files(dir.path()).len() > 1 {
            assert!(Instant::now() < deadline, "no checkpoint: {:?}", log_files(dir.path()));
            std::thread::sleep(Duration::from_millis(5));
        }
        // The redb file alone holds it all now.
        assert_holds_history(&store.inner.load().unwrap());
        drop(store);
        assert!(log_files(dir.path()).is_empty(), "a clean stop leaves no log");
        assert_holds_history(&LoggedStore::open(dir.path(), lazy()).unwrap().load().unwrap());
    }

    #[test]
    fn records_applied_before_a_crash_are_not_applied_twice_over_newer_ones() {
        // A checkpoint applied records 1-4 but the crash came before their segment was
        // deleted; record 5 changed global 2 again. Re-reading must end at record 5's state.
        let dir = tempfile::tempdir().unwrap();
        let store = with_history(dir.path());
        store
            .commit(&[Mutation::PutGlobal(global(2, GlobalStatus::Committing))])
            .unwrap();
        store.inner.apply(&history().concat(), Some(4)).unwrap();
        store.crash();
        let snapshot = LoggedStore::open(dir.path(), lazy()).unwrap().load().unwrap();
        assert_eq!(snapshot.globals, vec![global(2, GlobalStatus::Committing)]);
    }

    #[test]
    fn leaving_out_superseded_mutations_changes_nothing_that_is_stored() {
        let mut updated = branch(2, 20);
        updated.status = crate::model::BranchStatus::PhaseOneFailed;
        let batch = vec![
            Mutation::PutGlobal(global(1, GlobalStatus::Begin)),
            Mutation::PutBranch(branch(1, 10)),
            Mutation::PutGlobal(global(2, GlobalStatus::Begin)),
            Mutation::PutBranch(branch(2, 20)),
            Mutation::PutBranch(branch(2, 21)),
            Mutation::PutGlobal(global(1, GlobalStatus::Committing)),
            Mutation::Finish(finished(1, GlobalStatus::Committed)),
            Mutation::PutBranch(updated),
            Mutation::DeleteBranch {
                txn_id: 2,
                branch_id: 21,
            },
            Mutation::PutGlobal(global(2, GlobalStatus::Rollbacking)),
            Mutation::SetIdCeiling(50),
        ];
        let kept = superseded_left_out(batch.clone());
        assert_eq!(kept.len(), 5, "{kept:#?}");
        let [whole, lean] = [batch, kept].map(|b| {
            let dir = tempfile::tempdir().unwrap();
            let store = RedbStore::open(dir.path()).unwrap();
            store.apply(&b, None).unwrap();
            store.load().unwrap()
        });
        assert_eq!(whole, lean);
        assert_eq!(lean.branches.len(), 1);
    }

    #[test]
    fn damage_before_the_end_is_refused() {
        // A payload byte, or a length (which would otherwise make the rest look cut short),
        // changed in the first record of four.
        for at in [HEADER + 2, 10] {
            let dir = tempfile::tempdir().unwrap();
            let store = with_history(dir.path());
            store.crash();
            let segment = log_files(dir.path()).pop().unwrap();
            let mut bytes = std::fs::read(&segment).unwrap();
            bytes[at] ^= 0x40;
            std::fs::write(&segment, bytes).unwrap();
            let e = LoggedStore::open(dir.path(), lazy()).err().expect("refused");
            assert!(e.0.contains("damaged at byte 0") && e.0.contains("backup"), "{e}");
        }
    }
}
