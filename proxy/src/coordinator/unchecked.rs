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

/// A table as the guard view names it: database and table, lowercased.
pub type TableName = (String, String);

/// The registry of unchecked writes in flight, shared by the sessions of one proxy.
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
    /// `None`: not known (a statement the parser cannot read, or not read yet): any table.
    tables: Option<Vec<TableName>>,
    /// The backend connection (server thread id) it runs on.
    connection_id: u32,
    /// When the trust it started under ends at the latest, once the stream it started under
    /// is gone; `None` while that stream lives (the view's current trust applies).
    must_end_by: Option<u64>,
    interrupting: bool,
    /// Not due again before this: an interruption found it not running yet.
    not_before: u64,
    /// Its session went away before its response was read: it may still be running, so it is
    /// interrupted at once and forgotten after that.
    abandoned: bool,
}

impl Running {
    fn may_write(&self, tables: &[TableName]) -> bool {
        self.tables
            .as_ref()
            .is_none_or(|mine| mine.iter().any(|t| tables.contains(t)))
    }
}

impl Default for UncheckedWrites {
    fn default() -> Self {
        UncheckedWrites {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        }
    }
}

// The series are looked up when used: the registry is built before the metrics recorder is
// installed, and these events are rare.
fn acks_waiting() -> Gauge {
    metrics::gauge!("ferrata_proxy_guard_acks_waiting")
}

fn interrupted(outcome: &'static str) -> Counter {
    metrics::counter!("ferrata_proxy_unchecked_writes_interrupted_total", "outcome" => outcome)
}

/// One unchecked write, registered until [`UncheckedWrite::finish`]. Dropped without it (its
/// session went away while it ran), it is interrupted first.
pub struct UncheckedWrite {
    writes: Arc<UncheckedWrites>,
    id: u64,
    finished: bool,
}

impl UncheckedWrite {
    /// Narrows the tables the write may change, once they are known.
    pub fn writes_to(&self, tables: Vec<TableName>) {
        if let Some(r) = self.writes.state.lock().running.get_mut(&self.id) {
            r.tables = Some(tables);
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
        }
        self.writes.changed.notify_waiters();
    }
}

/// How soon a write found not running yet is looked at again.
const RETRY: Duration = Duration::from_millis(50);

/// What the watchdog must interrupt: (write id, backend connection id).
type Overdue = Vec<(u64, u32)>;

/// Whether the write the watchdog is interrupting is still running.
pub type StillRunning = Box<dyn Fn() -> bool + Send + Sync>;

impl UncheckedWrites {
    /// Registers a write about to run on backend connection `connection_id`, on any table
    /// until [`UncheckedWrite::writes_to`] says which.
    pub fn begin(self: &Arc<Self>, connection_id: u32) -> UncheckedWrite {
        let mut s = self.state.lock();
        s.next_id += 1;
        let id = s.next_id;
        s.running.insert(
            id,
            Running {
                tables: None,
                connection_id,
                must_end_by: None,
                interrupting: false,
                not_before: 0,
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
        let waiting: Vec<u64> = {
            let s = self.state.lock();
            s.running
                .iter()
                .filter(|(_, r)| r.may_write(tables))
                .map(|(id, _)| *id)
                .collect()
        };
        let writes = Arc::clone(self);
        async move {
            if waiting.is_empty() {
                return;
            }
            acks_waiting().increment(1.0);
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
            acks_waiting().decrement(1.0);
        }
    }

    /// The stream the running writes started under ended; the trust it gave ends at
    /// `trusted_until` (nanoseconds on the view's clock).
    pub fn stream_lost(&self, trusted_until: u64) {
        for r in self.state.lock().running.values_mut() {
            r.must_end_by = Some(r.must_end_by.map_or(trusted_until, |t| t.min(trusted_until)));
        }
        self.changed.notify_waiters();
    }

    /// Trust moved (a heartbeat was answered): the watchdog looks again.
    pub fn trust_changed(&self) {
        self.changed.notify_waiters();
    }

    /// The writes that must be interrupted at `now`, given the current trust and `margin`
    /// (all on the view's clock, in nanoseconds), marked so that each is interrupted once;
    /// and when the next one falls due, if any.
    fn overdue(&self, now: u64, trusted_until: u64, margin: u64) -> (Overdue, Option<u64>) {
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
                due.push((*id, r.connection_id));
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (due, next)
    }

    fn still_running(&self, id: u64) -> bool {
        self.state.lock().running.contains_key(&id)
    }

    /// After an interruption: an abandoned write is forgotten (nobody else will); one that
    /// was not running on the server yet (`killed` false) is due again after `retry_at`.
    fn interrupted(&self, id: u64, killed: bool, retry_at: u64) {
        let mut s = self.state.lock();
        match s.running.get_mut(&id) {
            Some(r) if r.abandoned => {
                s.running.remove(&id);
            }
            Some(r) if !killed => {
                r.interrupting = false;
                r.not_before = retry_at;
            }
            _ => return,
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Interrupts unchecked writes that would outlive the trust they started under, until
    /// `stop`. `clock` gives (now, trusted_until, margin) in nanoseconds on the view's clock;
    /// `interrupt` interrupts the statement on one backend connection (see
    /// [`interrupt_query`]) if it is still the write in question.
    pub async fn watch(
        self: Arc<Self>,
        clock: impl Fn() -> (u64, u64, u64),
        interrupt: impl Fn(u32, StillRunning) -> BoxFuture<'static, Result<bool, String>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (now, trusted_until, margin) = clock();
            let (due, next) = self.overdue(now, trusted_until, margin);
            for (id, connection_id) in due {
                let writes = Arc::clone(&self);
                let still: StillRunning = Box::new(move || writes.still_running(id));
                let outcome = interrupt(connection_id, still);
                let writes = Arc::clone(&self);
                tokio::spawn(async move {
                    let outcome = outcome.await;
                    let retry_at = now + RETRY.as_nanos() as u64;
                    writes.interrupted(id, !matches!(outcome, Ok(false)), retry_at);
                    match outcome {
                        Ok(false) => {}
                        Ok(true) => {
                            interrupted("interrupted").increment(1);
                            tracing::warn!(
                                connection_id,
                                "an unchecked write that would outlive the coordinator's trust, or whose session went away, was interrupted"
                            );
                        }
                        Err(e) => {
                            interrupted("failed").increment(1);
                            tracing::error!(
                                connection_id,
                                error = e,
                                "could not interrupt an unchecked write that would outlive the coordinator's trust, or whose \
                                 session went away; it may commit over a row a global transaction locks after the lease"
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
/// only once the write is no longer running) is never hit. `Ok(false)`: nothing ran on the
/// connection yet (the write was not sent when it was looked at).
pub async fn interrupt_query(
    conn: &mut mysql_async::Conn,
    connection_id: u32,
    still_running: &(dyn Fn() -> bool + Send + Sync),
) -> Result<bool, mysql_async::Error> {
    use mysql_async::prelude::Queryable;
    let query_id: Option<u64> = conn
        .exec_first(
            "SELECT QUERY_ID FROM information_schema.PROCESSLIST WHERE ID = ? AND COMMAND = 'Query'",
            (connection_id,),
        )
        .await?;
    let Some(q) = query_id else {
        return Ok(false);
    };
    if still_running() {
        match conn.query_drop(format!("KILL QUERY ID {q}")).await {
            // ER_NO_SUCH_QUERY: it finished meanwhile.
            Err(mysql_async::Error::Server(e)) if e.code == 1957 => {}
            other => other?,
        }
    }
    Ok(true)
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
        let writes = Arc::new(UncheckedWrites::default());
        let old = writes.begin(7);
        writes.stream_lost(1_000);
        let new = writes.begin(8);
        // Trust from a new stream reaches far, but the old write's stream ended at 1000.
        let (due, next) = writes.overdue(500, 10_000, 100);
        assert!(due.is_empty());
        assert_eq!(next, Some(900));
        let (due, next) = writes.overdue(900, 10_000, 100);
        assert_eq!(due, vec![(old.id, 7)]);
        assert_eq!(next, Some(9_900));
        let (due, _) = writes.overdue(950, 10_000, 100);
        assert!(due.is_empty(), "each write is interrupted once");
        // Found not running yet (not sent when looked at): due again after the retry time.
        writes.interrupted(old.id, false, 1_200);
        let (due, next) = writes.overdue(1_000, 10_000, 100);
        assert!(due.is_empty());
        assert_eq!(next, Some(1_200));
        let (due, _) = writes.overdue(1_200, 10_000, 100);
        assert_eq!(due, vec![(old.id, 7)]);
        writes.interrupted(old.id, true, 0);
        let (due, next) = writes.overdue(9_950, 10_000, 100);
        assert_eq!(due, vec![(new.id, 8)]);
        assert_eq!(next, None);
        old.finish();
        new.finish();
    }

    #[test]
    fn an_abandoned_write_is_due_at_once_and_forgotten_once_interrupted() {
        let writes = Arc::new(UncheckedWrites::default());
        let write = writes.begin(9);
        let id = write.id;
        drop(write);
        let (due, _) = writes.overdue(1, 10_000, 100);
        assert_eq!(due, vec![(id, 9)]);
        assert!(writes.still_running(id), "it holds fences until it is interrupted");
        writes.interrupted(id, false, 0);
        assert!(!writes.still_running(id));
    }
}
