//! Unchecked writes in flight: autocommit writes outside global transactions that the
//! no-dirty-writes check lets run as sent, because none of their tables was guarded when they
//! started. They run exactly as they would directly (no transaction of the proxy's own
//! around them, so `ROW_COUNT()`, warnings and the statements MariaDB refuses inside a
//! transaction are the server's own), and two rules keep them safe (ARCHITECTURE.md, "No dirty
//! writes"):
//!
//! - **The fence.** A guard update that adds a table is acknowledged only once every
//!   unchecked write that started before it and may write that table has finished
//!   ([`UncheckedWrites::fence`]); the coordinator grants no lock in the table before the
//!   acknowledgement, so no global transaction can hold a row such a write commits over.
//! - **The deadline.** The coordinator may also grant that lock without this proxy's
//!   acknowledgement once the proxy's lease has run out (its stream ended or its heartbeats
//!   went unanswered). A write still running shortly before the trust it started under ends is
//!   interrupted (`KILL QUERY ID` on a service connection): the server rolls the statement
//!   back and the client gets ERR 1317.
//!
//! A write is registered before the session reads the guarded-table view, and an update
//! applies its tables before it takes its fence: either the write sees the new table (and is
//! checked instead), or the update's fence includes the write.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::session::mode::BoxFuture;
use crate::sql::dml;

/// A table as (database, table); lowercased wherever the guard view and the registry keep
/// one, as a statement spells it where it is read from SQL.
pub type TableName = (String, String);

/// The tables `sql` writes as (database, table), unqualified ones in `schema`, in the case
/// the statement spells them; `None` when the parser cannot read it.
pub fn written_tables(sql: &str, schema: Option<&str>) -> Option<Vec<TableName>> {
    let tables = dml::written_tables(sql).ok()?;
    Some(
        tables
            .into_iter()
            .map(|t| {
                (
                    t.schema.or_else(|| schema.map(str::to_owned)).unwrap_or_default(),
                    t.name,
                )
            })
            .collect(),
    )
}

fn lowercased(tables: Vec<TableName>) -> Vec<TableName> {
    tables
        .into_iter()
        .map(|(d, t)| (d.to_lowercase(), t.to_lowercase()))
        .collect()
}

/// What a write may change.
enum Tables {
    /// Not known (a statement the parser cannot read, a multi-statement string): any table.
    Any,
    Known(Vec<TableName>),
    /// Its text, read only if a fence needs it (most writes end before any guard comes).
    Unread {
        sql: String,
        schema: Option<String>,
    },
}

/// Longer statements are not kept for a later look: they may write any table.
const KEPT_TEXT: usize = 64 * 1024;

impl Tables {
    /// Reads an unread statement's tables (outside the registry's lock: the parser is not
    /// cheap on long statements, and a parser panic must not take the stream task with it).
    fn read(sql: &str, schema: Option<&str>) -> Tables {
        match std::panic::catch_unwind(|| written_tables(sql, schema)) {
            Ok(Some(tables)) => Tables::Known(lowercased(tables)),
            _ => Tables::Any,
        }
    }

    fn may_write(&self, tables: &[TableName]) -> bool {
        match self {
            Tables::Known(mine) => mine.iter().any(|t| tables.contains(t)),
            _ => true,
        }
    }
}

/// The registry of unchecked writes in flight, shared by the sessions of one proxy.
#[derive(Default)]
pub struct UncheckedWrites {
    state: Mutex<State>,
    /// Notified when a write finishes, and whenever a deadline may have moved.
    changed: Notify,
}

#[derive(Default)]
struct State {
    next_id: u64,
    running: BTreeMap<u64, Running>,
}

struct Running {
    tables: Tables,
    /// The backend connection (server thread id) it runs on.
    connection_id: u32,
    /// When the trust it started under ends at the latest, once the stream it started under
    /// is gone; `None` while that stream lives (the view's current trust applies).
    must_end_by: Option<u64>,
    interrupting: bool,
    /// Not due again before this: an interruption found it not running yet, or killed it.
    not_before: u64,
    /// Interruptions tried so far.
    attempts: u32,
    /// Whether a kill, or a failure, was reported already (once per write).
    reported: bool,
    /// Its session went away before its response was read: it may still be running, so it is
    /// interrupted at once and forgotten after that.
    abandoned: bool,
}

// The series are looked up when used: the registry is built before the metrics recorder is
// installed, and these events are rare.
fn acks_waiting() -> Gauge {
    metrics::gauge!("ferrata_proxy_guard_acks_waiting")
}

fn interruptions(outcome: &'static str) -> Counter {
    metrics::counter!("ferrata_proxy_unchecked_writes_interrupted_total", "outcome" => outcome)
}

/// Counts a guard acknowledgement that waits, for as long as it waits (or until the stream
/// that carried it is gone).
struct AckWaiting;

impl AckWaiting {
    fn start() -> AckWaiting {
        acks_waiting().increment(1.0);
        AckWaiting
    }
}

impl Drop for AckWaiting {
    fn drop(&mut self) {
        acks_waiting().decrement(1.0);
    }
}

/// One unchecked write, registered until [`UncheckedWrite::finish`]. Dropped without it (its
/// session went away while it ran), it is interrupted first.
pub struct UncheckedWrite {
    writes: Arc<UncheckedWrites>,
    id: u64,
    finished: bool,
}

impl UncheckedWrite {
    /// The tables the write may change, once they are known.
    pub fn writes_to(&self, tables: Vec<TableName>) {
        self.set_tables(Tables::Known(lowercased(tables)));
    }

    /// The write's statement text and the session's schema, to be read if a fence needs its
    /// tables.
    pub fn runs(&self, sql: &str, schema: Option<&str>) {
        if sql.len() <= KEPT_TEXT {
            self.set_tables(Tables::Unread {
                sql: sql.to_owned(),
                schema: schema.map(str::to_owned),
            });
        }
    }

    fn set_tables(&self, tables: Tables) {
        if let Some(r) = self.writes.state.lock().running.get_mut(&self.id) {
            r.tables = tables;
        }
    }

    /// Its response was read (or it was never sent): it no longer runs.
    pub fn finish(mut self) {
        self.finished = true;
        self.writes.state.lock().running.remove(&self.id);
        self.writes.changed.notify_waiters();
    }
}

impl Drop for UncheckedWrite {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(r) = self.writes.state.lock().running.get_mut(&self.id) {
            r.abandoned = true;
            r.must_end_by = Some(0);
            r.not_before = 0;
            // Due now, even if an interruption already ran.
            r.interrupting = false;
        }
        self.writes.changed.notify_waiters();
    }
}

/// How soon a write is looked at again after an interruption (see
/// [`UncheckedWrites::interrupted`]), and how many times at most.
const RETRY: Duration = Duration::from_millis(100);
const ATTEMPTS: u32 = 100;

/// What the watchdog tells operators about one write.
#[derive(Debug, PartialEq, Eq)]
enum Report {
    Killed,
    NotVisible,
    Failed(String),
}

/// What one interruption found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// A statement of the write's connection was running: KILL QUERY ID was sent.
    Killed,
    /// The connection was idle: the write was not sent yet, or has ended.
    NotRunning,
    /// The service user does not see the connection: it is gone, or the user lacks `PROCESS`.
    NotVisible,
}

/// A write the watchdog must interrupt.
#[derive(Debug, PartialEq, Eq)]
struct Due {
    id: u64,
    /// The backend connection (server thread id) it runs on.
    connection_id: u32,
    /// Whether an earlier interruption of it was reported already.
    reported: bool,
}

/// Whether the write the watchdog is interrupting is still running.
pub type StillRunning = Box<dyn Fn() -> bool + Send + Sync>;

impl UncheckedWrites {
    /// Registers a write about to run on backend connection `connection_id`, on any table
    /// until [`UncheckedWrite::writes_to`] or [`UncheckedWrite::runs`] says which.
    pub fn begin(self: &Arc<Self>, connection_id: u32) -> UncheckedWrite {
        let mut s = self.state.lock();
        s.next_id += 1;
        let id = s.next_id;
        s.running.insert(
            id,
            Running {
                tables: Tables::Any,
                connection_id,
                must_end_by: None,
                interrupting: false,
                not_before: 0,
                attempts: 0,
                reported: false,
                abandoned: false,
            },
        );
        drop(s);
        self.changed.notify_waiters();
        UncheckedWrite {
            writes: Arc::clone(self),
            id,
            finished: false,
        }
    }

    /// Ready once every write running now that may write one of `tables` has finished.
    pub fn fence(self: &Arc<Self>, tables: &[TableName]) -> impl Future<Output = ()> + Send + 'static {
        // The writes running now; those whose text is unread are read outside the lock (a
        // write registered later is not waited for: it sees the update's tables).
        let (mut waiting, unread) = {
            let s = self.state.lock();
            let mut waiting = Vec::new();
            let mut unread = Vec::new();
            for (id, r) in &s.running {
                match &r.tables {
                    Tables::Unread { sql, schema } => unread.push((*id, sql.clone(), schema.clone())),
                    known if known.may_write(tables) => waiting.push(*id),
                    _ => {}
                }
            }
            (waiting, unread)
        };
        for (id, sql, schema) in unread {
            let read = Tables::read(&sql, schema.as_deref());
            if read.may_write(tables) {
                waiting.push(id);
            }
            if let Some(r) = self.state.lock().running.get_mut(&id) {
                r.tables = read;
            }
        }
        let writes = Arc::clone(self);
        async move {
            if waiting.is_empty() {
                return;
            }
            let _counted = AckWaiting::start();
            tracing::info!(
                writes = waiting.len(),
                "a guard update waits for unchecked writes on its tables to finish"
            );
            loop {
                let changed = writes.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if !waiting.iter().any(|id| writes.state.lock().running.contains_key(id)) {
                    break;
                }
                changed.await;
            }
        }
    }

    /// The stream the running writes started under ended: `end_trust` ends the view's trust
    /// and says until when it lasted (nanoseconds on the view's clock). Both happen under the
    /// registry's lock, so a write registered meanwhile either gets that deadline or sees the
    /// view untrusted.
    pub fn stream_lost(&self, end_trust: impl FnOnce() -> u64) {
        let mut s = self.state.lock();
        let trusted_until = end_trust();
        for r in s.running.values_mut() {
            r.must_end_by = Some(r.must_end_by.map_or(trusted_until, |t| t.min(trusted_until)));
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Trust moved (a heartbeat was answered): the watchdog looks again.
    pub fn trust_changed(&self) {
        self.changed.notify_waiters();
    }

    /// The writes that must be interrupted at `now`, given the current trust and `margin`
    /// (all on the view's clock, in nanoseconds), marked so that each is interrupted once;
    /// and when the next one falls due, if any.
    fn overdue(&self, now: u64, trusted_until: u64, margin: u64) -> (Vec<Due>, Option<u64>) {
        let mut s = self.state.lock();
        let mut due = Vec::new();
        let mut next: Option<u64> = None;
        for (id, r) in s.running.iter_mut().filter(|(_, r)| !r.interrupting) {
            let at = r
                .must_end_by
                .unwrap_or(trusted_until)
                .saturating_sub(margin)
                .max(r.not_before);
            if at <= now {
                r.interrupting = true;
                due.push(Due {
                    id: *id,
                    connection_id: r.connection_id,
                    reported: r.reported,
                });
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (due, next)
    }

    fn still_running(&self, id: u64) -> bool {
        self.state.lock().running.contains_key(&id)
    }

    /// After the interruption of `due` at `now`: what becomes of the write, and what to report
    /// (once per write, even if it finished while the KILL was answered). It is looked at
    /// again after [`RETRY`] while it may still run: killed (it may still be rolling back, or
    /// a multi-statement string went on), not running (not sent yet, or a command the server
    /// has not read yet), or the look failed. An abandoned write is forgotten once its
    /// connection is gone (nobody else will); a live one the service user cannot see is given
    /// up on. After [`ATTEMPTS`] looks either is given up on.
    fn interrupted(&self, due: &Due, outcome: &Result<Interruption, String>, now: u64) -> Option<Report> {
        let mut s = self.state.lock();
        let running = s.running.get_mut(&due.id);
        let abandoned = running.as_ref().is_some_and(|r| r.abandoned);
        let report = match outcome {
            Ok(Interruption::Killed) => Some(Report::Killed),
            // Invisible because it finished: nothing to report.
            Ok(Interruption::NotVisible) if abandoned || running.is_none() => None,
            Ok(Interruption::NotVisible) => Some(Report::NotVisible),
            Err(e) => Some(Report::Failed(e.clone())),
            Ok(Interruption::NotRunning) => None,
        }
        .filter(|_| !due.reported);
        if let Some(r) = running {
            r.attempts += 1;
            r.reported |= report.is_some();
            let gone = matches!(outcome, Ok(Interruption::NotVisible));
            if r.abandoned && (gone || r.attempts >= ATTEMPTS) {
                s.running.remove(&due.id);
            } else if !gone && r.attempts < ATTEMPTS {
                r.interrupting = false;
                r.not_before = now + RETRY.as_nanos() as u64;
            }
        }
        drop(s);
        self.changed.notify_waiters();
        report
    }

    /// Interrupts unchecked writes that would outlive the trust they started under, until
    /// `stop`. `clock` gives (now, trusted_until, margin) in nanoseconds on the view's clock;
    /// `interrupt` interrupts the statement on one backend connection (see
    /// [`interrupt_query`]) if it is still the write in question.
    pub async fn watch(
        self: Arc<Self>,
        clock: impl Fn() -> (u64, u64, u64) + Send + Sync + 'static,
        interrupt: impl Fn(u32, StillRunning) -> BoxFuture<'static, Result<Interruption, String>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let clock = Arc::new(clock);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (now, trusted_until, margin) = clock();
            let (due, next) = self.overdue(now, trusted_until, margin);
            for due in due {
                let (writes, id, connection_id) = (Arc::clone(&self), due.id, due.connection_id);
                let still: StillRunning = Box::new(move || writes.still_running(id));
                let outcome = interrupt(connection_id, still);
                let (writes, clock) = (Arc::clone(&self), Arc::clone(&clock));
                tokio::spawn(async move {
                    let outcome = outcome.await;
                    match writes.interrupted(&due, &outcome, clock().0) {
                        None => {}
                        Some(Report::Killed) => {
                            interruptions("interrupted").increment(1);
                            tracing::warn!(
                                connection_id,
                                "an unchecked write that would outlive the coordinator's trust, or whose session went away, was interrupted"
                            );
                        }
                        Some(Report::NotVisible) => {
                            interruptions("failed").increment(1);
                            tracing::error!(
                                connection_id,
                                "could not interrupt an unchecked write that would outlive the coordinator's trust: the service \
                                 user does not see its connection (it needs the PROCESS and CONNECTION ADMIN privileges); it may \
                                 commit over a row a global transaction locks after the lease"
                            );
                        }
                        Some(Report::Failed(e)) => {
                            interruptions("failed").increment(1);
                            tracing::error!(
                                connection_id,
                                error = e,
                                "could not interrupt an unchecked write that would outlive the coordinator's trust, or whose \
                                 session went away (trying again); it may commit over a row a global transaction locks after \
                                 the lease"
                            );
                        }
                    }
                });
            }
            let sleep = next.map(|at| Duration::from_nanos(at.saturating_sub(now)));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed => {}
                _ = async {
                    match sleep {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }
}

/// Interrupts the statement running on backend connection `connection_id` through `conn`,
/// if `still_running()` says it is still the write in question: its query id is read first
/// and checked afterwards, so that a later statement of the same connection (which can start
/// only once the write is no longer running) is never hit.
pub async fn interrupt_query(
    conn: &mut mysql_async::Conn,
    connection_id: u32,
    still_running: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Interruption, mysql_async::Error> {
    use mysql_async::prelude::Queryable;
    let seen: Option<(String, u64)> = conn
        .exec_first(
            "SELECT COMMAND, QUERY_ID FROM information_schema.PROCESSLIST WHERE ID = ?",
            (connection_id,),
        )
        .await?;
    let query_id = match seen {
        None => return Ok(Interruption::NotVisible),
        Some((command, _)) if command == "Sleep" => return Ok(Interruption::NotRunning),
        Some((_, query_id)) => query_id,
    };
    if !still_running() {
        return Ok(Interruption::NotRunning);
    }
    match conn.query_drop(format!("KILL QUERY ID {query_id}")).await {
        // ER_NO_SUCH_QUERY: it ended meanwhile.
        Err(mysql_async::Error::Server(e)) if e.code == 1957 => Ok(Interruption::NotRunning),
        Err(e) => Err(e),
        Ok(()) => Ok(Interruption::Killed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TableName {
        ("shop".into(), name.into())
    }

    /// Polls `f` once: whether it is ready.
    fn ready<F: Future>(f: std::pin::Pin<&mut F>) -> bool {
        f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            .is_ready()
    }

    #[test]
    fn a_fence_waits_only_for_earlier_writes_that_may_touch_its_tables() {
        let writes = Arc::new(UncheckedWrites::default());
        let orders = writes.begin(1);
        orders.writes_to(vec![t("orders")]);
        let unknown = writes.begin(2);
        let items = writes.begin(3);
        items.writes_to(vec![t("items")]);
        let mut fence = std::pin::pin!(writes.fence(&[t("orders")]));
        // A write that starts after the fence is not waited for.
        let _later = writes.begin(4);
        assert!(!ready(fence.as_mut()));
        orders.finish();
        assert!(!ready(fence.as_mut()), "the write of unknown tables may touch orders");
        items.finish();
        assert!(!ready(fence.as_mut()));
        unknown.finish();
        assert!(ready(fence.as_mut()));
        assert!(
            !ready(std::pin::pin!(writes.fence(&[t("other")]))),
            "unknown tables are any table"
        );
    }

    #[test]
    fn overdue_writes_by_current_trust_or_by_the_stream_they_started_under() {
        const S: u64 = 1_000_000_000; // a second, on the view's clock
        let retry = RETRY.as_nanos() as u64;
        let writes = Arc::new(UncheckedWrites::default());
        let old = writes.begin(7);
        writes.stream_lost(|| 10 * S);
        let new = writes.begin(8);
        // Trust from a new stream reaches far, but the old write's stream ended at 10 s.
        let (due, next) = writes.overdue(5 * S, 100 * S, S);
        assert!(due.is_empty());
        assert_eq!(next, Some(9 * S));
        let (first, next) = writes.overdue(9 * S, 100 * S, S);
        assert_eq!(ids(&first), [(old.id, 7)]);
        assert_eq!(next, Some(99 * S));
        let (due, _) = writes.overdue(9 * S + 1, 100 * S, S);
        assert!(due.is_empty(), "one interruption at a time");
        // Found not sent yet: due again after the retry time.
        assert_eq!(
            writes.interrupted(&first[0], &Ok(Interruption::NotRunning), 9 * S),
            None
        );
        let (due, next) = writes.overdue(9 * S + 1, 100 * S, S);
        assert!(due.is_empty());
        assert_eq!(next, Some(9 * S + retry));
        let (due, _) = writes.overdue(9 * S + retry, 100 * S, S);
        assert_eq!(ids(&due), [(old.id, 7)]);
        // A live write the service user cannot see is given up on.
        assert_eq!(
            writes.interrupted(&due[0], &Ok(Interruption::NotVisible), 9 * S + retry),
            Some(Report::NotVisible)
        );
        let (due, next) = writes.overdue(99 * S, 100 * S, S);
        assert_eq!(ids(&due), [(new.id, 8)]);
        assert_eq!(next, None);
        old.finish();
        new.finish();
    }

    #[test]
    fn an_abandoned_write_is_due_at_once_and_forgotten_once_its_connection_is_gone() {
        let retry = RETRY.as_nanos() as u64;
        let writes = Arc::new(UncheckedWrites::default());
        let write = writes.begin(9);
        let id = write.id;
        drop(write);
        let (due, _) = writes.overdue(1, 10_000, 100);
        assert_eq!(ids(&due), [(id, 9)]);
        assert!(writes.still_running(id), "it holds fences until it is interrupted");
        assert_eq!(
            writes.interrupted(&due[0], &Ok(Interruption::Killed), 0),
            Some(Report::Killed)
        );
        assert!(writes.still_running(id), "killed: looked at again until it is gone");
        let (due, _) = writes.overdue(retry, 10_000, 100);
        assert_eq!(ids(&due), [(id, 9)]);
        // Still rolling back: killed again, reported once.
        assert_eq!(writes.interrupted(&due[0], &Ok(Interruption::Killed), retry), None);
        // Idle: its command may not have been read yet; it is looked at again.
        let (due, _) = writes.overdue(2 * retry, 10_000, 100);
        assert_eq!(ids(&due), [(id, 9)]);
        assert_eq!(
            writes.interrupted(&due[0], &Ok(Interruption::NotRunning), 2 * retry),
            None
        );
        assert!(writes.still_running(id));
        let (due, _) = writes.overdue(3 * retry, 10_000, 100);
        assert_eq!(ids(&due), [(id, 9)]);
        assert_eq!(
            writes.interrupted(&due[0], &Ok(Interruption::NotVisible), 3 * retry),
            None
        );
        assert!(!writes.still_running(id), "its connection is gone");
    }

    #[test]
    fn looks_that_fail_are_tried_again_a_bounded_number_of_times() {
        let writes = Arc::new(UncheckedWrites::default());
        let write = writes.begin(3);
        writes.stream_lost(|| 0);
        let mut reports = Vec::new();
        for n in 0.. {
            let (due, _) = writes.overdue(u64::MAX / 2, 0, 0);
            if due.is_empty() {
                assert_eq!(n, ATTEMPTS, "given up after {ATTEMPTS} looks");
                break;
            }
            reports.extend(writes.interrupted(&due[0], &Err("refused".into()), u64::MAX / 4));
        }
        assert_eq!(reports, vec![Report::Failed("refused".into())], "reported once");
        write.finish();
    }

    #[test]
    fn a_kill_is_reported_once_even_if_the_write_finished_before_it_was_answered() {
        let retry = RETRY.as_nanos() as u64;
        let writes = Arc::new(UncheckedWrites::default());
        let write = writes.begin(4);
        writes.stream_lost(|| 0);
        let (due, _) = writes.overdue(1, 0, 0);
        // The server ended the statement, and the session read its ERR, before the KILL's OK
        // reached the watchdog.
        write.finish();
        assert_eq!(
            writes.interrupted(&due[0], &Ok(Interruption::Killed), 1),
            Some(Report::Killed)
        );
        // Killed once, still running, killed again, then finished: one report.
        let write = writes.begin(5);
        writes.stream_lost(|| 0);
        let (due, _) = writes.overdue(1, 0, 0);
        assert_eq!(
            writes.interrupted(&due[0], &Ok(Interruption::Killed), 1),
            Some(Report::Killed)
        );
        let (due, _) = writes.overdue(1 + retry, 0, 0);
        assert!(due[0].reported);
        write.finish();
        assert_eq!(writes.interrupted(&due[0], &Ok(Interruption::Killed), 1 + retry), None);
    }

    fn ids(due: &[Due]) -> Vec<(u64, u32)> {
        due.iter().map(|d| (d.id, d.connection_id)).collect()
    }
}
