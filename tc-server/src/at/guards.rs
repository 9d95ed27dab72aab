//! Table guards: the set of tables that may hold global row locks ("guarded tables"), which
//! every attached resource manager is kept told of, so that it checks writes made outside any
//! global transaction against the global locks only for those tables (no dirty writes). This
//! module owns the set (which transactions pin each table), the updates broadcast on the
//! Attach streams, and the rule that lets the coordinator grant the first lock in a table:
//!
//! * An update with seq S is confirmed once every stream it concerns has acknowledged S, or
//!   has ended and its lease has run out (latest answered heartbeat + lease: its resource
//!   manager no longer trusts what the stream told it). A stream concerns S if it got the
//!   complete set on attach before S was sent; a later one got S's tables in its complete set.
//!   A live stream that does not acknowledge keeps S unconfirmed: its resource manager may be
//!   finishing writes to the table before it acknowledges.
//! * After a restart on a store a previous instance used, nothing new is confirmed for one
//!   lease: resource managers may still trust the previous instance's set. Tables restored
//!   with their locks are confirmed at once (the previous instance guarded them).
//! * A table is pinned by every transaction that registered rows in it, until the
//!   transaction finishes; a confirmed table nobody pins is released after `guard_linger`.
//!
//! Updates are numbered and sent under one async mutex, so every stream gets them in seq
//! order; the complete set a stream gets on attach is sent under the same mutex.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ferrata_rpc::{ErrorCode, pb};
use metrics::{Counter, Gauge, Histogram};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::TcError;
use crate::lock_key::LockKey;
use crate::metrics::Metrics;
use crate::rm::{RmConnection, RmRegistry};

/// A table as the lock keys name it: resource, schema, table.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Table {
    pub resource: String,
    pub schema: String,
    pub table: String,
}

impl Table {
    pub fn new(resource: &str, schema: &str, table: &str) -> Table {
        Table {
            resource: resource.to_owned(),
            schema: schema.to_owned(),
            table: table.to_owned(),
        }
    }

    /// The distinct tables of some lock keys, sorted.
    pub fn of_keys(keys: &[LockKey]) -> Vec<Table> {
        let mut tables: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
        for key in keys {
            let p = key.parts();
            tables.insert((p.resource, p.schema, p.table));
        }
        tables.into_iter().map(|(r, s, t)| Table::new(r, s, t)).collect()
    }

    pub fn from_pb(t: &pb::GuardedTable) -> Table {
        Table::new(&t.resource_id, &t.schema, &t.table)
    }

    pub fn to_pb(&self) -> pb::GuardedTable {
        pb::GuardedTable {
            resource_id: self.resource.clone(),
            schema: self.schema.clone(),
            table: self.table.clone(),
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{} on {}", self.schema, self.table, self.resource)
    }
}

struct Entry {
    /// The transactions whose rows may be in the table.
    pins: HashSet<u64>,
    /// The update that announced the table; `None` until one is sent. The table is confirmed
    /// once that update is.
    seq: Option<u64>,
    /// Since when no transaction pins it.
    unpinned_since: Option<Instant>,
}

impl Entry {
    fn new(seq: Option<u64>) -> Entry {
        Entry {
            pins: HashSet::new(),
            seq,
            unpinned_since: None,
        }
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<Table, Entry>,
    /// The latest update's seq.
    seq: u64,
    /// Every update up to this one is confirmed (restored tables carry seq 0).
    confirmed: u64,
    /// Streams that ended while their resource manager may still trust what they said.
    departed: Vec<Arc<RmConnection>>,
}

impl State {
    fn is_confirmed(&self, entry: &Entry) -> bool {
        entry.seq.is_some_and(|s| s <= self.confirmed)
    }
}

/// Why an update is not confirmed yet.
#[derive(Debug, PartialEq, Eq)]
struct Blocked {
    /// The resource managers that neither acknowledged it nor lost their lease.
    rm_ids: Vec<String>,
    /// When it may become confirmed without any message arriving (a lease running out).
    until: Option<Instant>,
}

/// The guarded-table set and its updates; see the module comment.
pub struct TableGuards {
    rms: Arc<RmRegistry>,
    lease: Duration,
    linger: Duration,
    /// After a restart on a used store: nothing new is confirmed before this.
    grace_until: Option<Instant>,
    state: Mutex<State>,
    /// Held while an update (or a stream's complete set) is numbered and sent.
    sending: tokio::sync::Mutex<()>,
    /// Notified when a stream acknowledges an update or ends.
    changed: Notify,
    tables_gauge: Gauge,
    confirm_seconds: Histogram,
    timeouts: Counter,
}

impl TableGuards {
    /// `fresh_store`: no coordinator ever served from this store, so no resource manager can
    /// trust an earlier guard set and there is no startup grace.
    pub fn new(
        rms: Arc<RmRegistry>,
        lease: Duration,
        linger: Duration,
        fresh_store: bool,
        metrics: &Metrics,
    ) -> Arc<TableGuards> {
        metrics.guarded_tables.set(0.0);
        Arc::new(TableGuards {
            rms,
            lease,
            linger,
            grace_until: (!fresh_store).then(|| Instant::now() + lease),
            state: Mutex::new(State::default()),
            sending: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            tables_gauge: metrics.guarded_tables.clone(),
            confirm_seconds: metrics.guard_confirm_seconds.clone(),
            timeouts: metrics.guard_timeouts.clone(),
        })
    }

    /// How long a resource manager may trust its guard set after an answered heartbeat.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The latest update's seq: no stream can acknowledge a higher one.
    pub fn seq(&self) -> u64 {
        self.state.lock().seq
    }

    /// Pins `tables` for `txn`; tables not in the set join it, unannounced (`ensure`
    /// announces them).
    pub fn pin(&self, txn: u64, tables: &[Table]) {
        let mut s = self.state.lock();
        for t in tables {
            let e = s.entries.entry(t.clone()).or_insert_with(|| Entry::new(None));
            e.pins.insert(txn);
            e.unpinned_since = None;
        }
        self.tables_gauge.set(s.entries.len() as f64);
    }

    /// Pins the tables of locks restored from the store: they are confirmed already.
    pub fn restore(&self, txn: u64, tables: &[Table]) {
        let mut s = self.state.lock();
        for t in tables {
            let e = s.entries.entry(t.clone()).or_insert_with(|| Entry::new(Some(0)));
            e.pins.insert(txn);
            e.unpinned_since = None;
        }
        self.tables_gauge.set(s.entries.len() as f64);
    }

    /// Whether any transaction pins `table`.
    #[cfg(test)]
    pub(crate) fn is_pinned(&self, table: &Table) -> bool {
        self.state.lock().entries.get(table).is_some_and(|e| !e.pins.is_empty())
    }

    /// A transaction finished: it no longer pins its tables.
    pub fn unpin<'a>(&self, txn: u64, tables: impl IntoIterator<Item = &'a Table>) {
        let now = Instant::now();
        let mut s = self.state.lock();
        for t in tables {
            if let Some(e) = s.entries.get_mut(t)
                && e.pins.remove(&txn)
                && e.pins.is_empty()
            {
                e.unpinned_since = Some(now);
            }
        }
    }

    /// Transactions `txn_gone` names no longer pin anything (a node's sync: they no longer
    /// exist).
    pub fn unpin_gone(&self, txn_gone: &dyn Fn(u64) -> bool) {
        let now = Instant::now();
        let mut s = self.state.lock();
        for e in s.entries.values_mut() {
            let pinned = !e.pins.is_empty();
            e.pins.retain(|&txn| !txn_gone(txn));
            if pinned && e.pins.is_empty() {
                e.unpinned_since = Some(now);
            }
        }
    }

    /// Announces whichever of `tables` (pinned already) is not announced yet and waits until
    /// all of them are confirmed, or fails with `lock_wait_timeout` at `deadline`.
    pub async fn ensure(self: &Arc<Self>, tables: &[Table], deadline: Instant) -> Result<(), TcError> {
        let started = Instant::now();
        let unannounced = {
            let s = self.state.lock();
            let mut pending = false;
            let mut unannounced = false;
            for e in tables.iter().filter_map(|t| s.entries.get(t)) {
                if !s.is_confirmed(e) {
                    pending = true;
                    unannounced |= e.seq.is_none();
                }
            }
            if !pending {
                return Ok(());
            }
            unannounced
        };
        if unannounced {
            // In a task of its own: a cancelled request must not stop an update half-way,
            // sent on some streams and not on others.
            let guards = Arc::clone(self);
            let _ = tokio::spawn(async move { guards.announce().await }).await;
        }
        // Every pinned entry was announced by now (`announce` takes all unannounced ones).
        let target = {
            let s = self.state.lock();
            tables.iter().filter_map(|t| s.entries.get(t)?.seq).max().unwrap_or(0)
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let blocked = match self.check(target, now) {
                Ok(()) => {
                    self.confirm_seconds.record(started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Err(blocked) => blocked,
            };
            if now >= deadline {
                return Err(self.timed_out(tables, blocked, now - started));
            }
            let wake = blocked.until.map_or(deadline, |u| u.min(deadline));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn timed_out(&self, tables: &[Table], blocked: Blocked, waited: Duration) -> TcError {
        self.timeouts.increment(1);
        let table = {
            let s = self.state.lock();
            tables
                .iter()
                .find(|t| s.entries.get(*t).is_some_and(|e| !s.is_confirmed(e)))
                .or(tables.first())
                .cloned()
        };
        let table = table.map_or_else(String::new, |t| format!("{}.{} on {}", t.schema, t.table, t.resource));
        let waited = waited.as_millis();
        let message = if blocked.rm_ids.is_empty() {
            format!(
                "the coordinator restarted less than {} ms ago and resource managers may still trust its previous guarded tables; table {table} could not be guarded within {waited} ms; retry",
                self.lease.as_millis()
            )
        } else {
            format!(
                "resource manager(s) {} did not confirm guarding table {table} within {waited} ms; retry",
                blocked.rm_ids.join(", ")
            )
        };
        tracing::warn!(rm_ids = ?blocked.rm_ids, table, waited_ms = waited as u64, "guard not confirmed in time");
        TcError::new(ErrorCode::LockWaitTimeout, message)
    }

    /// Whether update `seq` is confirmed (remembering it when it is), or who holds it up.
    fn check(&self, seq: u64, now: Instant) -> Result<(), Blocked> {
        let mut s = self.state.lock();
        if seq <= s.confirmed {
            return Ok(());
        }
        if let Some(grace) = self.grace_until
            && now < grace
        {
            return Err(Blocked {
                rm_ids: Vec::new(),
                until: Some(grace),
            });
        }
        let lease = self.lease;
        s.departed.retain(|c| c.last_answered() + lease > now);
        let mut seen = HashSet::new();
        let mut rm_ids = Vec::new();
        let mut until: Option<Instant> = None;
        // Read under the state lock: `detach` moves a connection from the registry to
        // `departed` under it, so none is missed in between.
        for c in self.rms.connections().iter().chain(s.departed.iter()) {
            if !seen.insert(c.id) || c.guards_from() >= seq || c.acked() >= seq {
                continue;
            }
            if c.is_detached() {
                let expires = c.last_answered() + lease;
                if expires <= now {
                    continue;
                }
                until = Some(until.map_or(expires, |u| u.min(expires)));
            }
            rm_ids.push(c.rm_id.clone());
        }
        if rm_ids.is_empty() {
            s.confirmed = s.confirmed.max(seq);
            return Ok(());
        }
        rm_ids.sort();
        rm_ids.dedup();
        Err(Blocked { rm_ids, until })
    }

    /// Sends one update announcing every unannounced table to every attached stream.
    async fn announce(&self) {
        let _order = self.sending.lock().await;
        let (update, conns) = {
            let mut s = self.state.lock();
            let seq = s.seq + 1;
            let mut tables = Vec::new();
            for (t, e) in s.entries.iter_mut().filter(|(_, e)| e.seq.is_none()) {
                e.seq = Some(seq);
                tables.push(t.clone());
            }
            if tables.is_empty() {
                return;
            }
            s.seq = seq;
            tables.sort();
            tracing::debug!(seq, tables = ?tables.iter().map(Table::to_string).collect::<Vec<_>>(), "guarding tables");
            let update = pb::GuardUpdate {
                seq,
                full: false,
                guard: tables.iter().map(Table::to_pb).collect(),
                release: Vec::new(),
            };
            (update, self.guarded_connections())
        };
        broadcast(update, &conns).await;
    }

    /// The connections this guard set was sent to (its complete set on attach): a stream of
    /// the same node that runs no guard protocol is told nothing of it.
    fn guarded_connections(&self) -> Vec<Arc<RmConnection>> {
        let mut conns = self.rms.connections();
        conns.retain(|c| c.guards_from() != u64::MAX);
        conns
    }

    /// Sends a newly attached stream the complete set. Call it once the connection is in the
    /// registry: an update numbered before this is in the set, one after is sent to it too.
    pub async fn attach(&self, conn: &Arc<RmConnection>) -> bool {
        let _order = self.sending.lock().await;
        let update = {
            let s = self.state.lock();
            conn.set_guards_from(s.seq);
            let mut tables: Vec<&Table> = s.entries.keys().collect();
            tables.sort();
            pb::GuardUpdate {
                seq: s.seq,
                full: true,
                guard: tables.into_iter().map(Table::to_pb).collect(),
                release: Vec::new(),
            }
        };
        conn.send(guards_message(update)).await
    }

    /// A stream ended: it leaves the registry, and is remembered until its lease runs out.
    pub fn detach(&self, conn: &Arc<RmConnection>) {
        {
            let mut s = self.state.lock();
            if conn.guards_from() != u64::MAX {
                s.departed.push(Arc::clone(conn));
            }
            self.rms.detach(conn);
        }
        self.changed.notify_waiters();
    }

    /// A stream acknowledged every update up to `seq`.
    pub fn acked(&self, conn: &RmConnection, seq: u64) {
        conn.ack(seq);
        self.changed.notify_waiters();
    }

    /// Releases the confirmed tables nobody has pinned for `guard_linger`, in one update;
    /// returns how many it released.
    pub async fn release_idle(&self) -> usize {
        let _order = self.sending.lock().await;
        let now = Instant::now();
        // A table whose announcement timed out is released once it is confirmed after all.
        let lingering = {
            let s = self.state.lock();
            s.entries
                .values()
                .filter(|e| e.pins.is_empty() && !s.is_confirmed(e))
                .filter_map(|e| e.seq)
                .max()
        };
        if let Some(seq) = lingering {
            let _ = self.check(seq, now);
        }
        let (update, conns) = {
            let mut s = self.state.lock();
            let lease = self.lease;
            s.departed.retain(|c| c.last_answered() + lease > now);
            let idle: Vec<Table> = s
                .entries
                .iter()
                .filter(|(_, e)| {
                    e.pins.is_empty()
                        && e.unpinned_since.is_some_and(|t| t + self.linger <= now)
                        && (e.seq.is_none() || s.is_confirmed(e))
                })
                .map(|(t, _)| t.clone())
                .collect();
            let mut release = Vec::new();
            for t in idle {
                // One never announced was never known to anyone: it just goes.
                if s.entries.remove(&t).is_some_and(|e| e.seq.is_some()) {
                    release.push(t);
                }
            }
            self.tables_gauge.set(s.entries.len() as f64);
            if release.is_empty() {
                return 0;
            }
            s.seq += 1;
            release.sort();
            tracing::debug!(seq = s.seq, tables = ?release.iter().map(Table::to_string).collect::<Vec<_>>(), "releasing guarded tables");
            let update = pb::GuardUpdate {
                seq: s.seq,
                full: false,
                guard: Vec::new(),
                release: release.iter().map(Table::to_pb).collect(),
            };
            (update, self.guarded_connections())
        };
        let released = update.release.len();
        broadcast(update, &conns).await;
        released
    }

    /// The background task releasing idle tables, until `stop`.
    pub async fn release_loop(self: Arc<Self>, stop: CancellationToken) {
        let period = (self.linger / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            self.release_idle().await;
        }
    }
}

fn guards_message(update: pb::GuardUpdate) -> pb::TcMessage {
    pb::TcMessage {
        kind: Some(pb::tc_message::Kind::Guards(update)),
    }
}

async fn broadcast(update: pb::GuardUpdate, conns: &[Arc<RmConnection>]) {
    for c in conns {
        // A stream that is closing is detached by its own task.
        let _ = c.send(guards_message(update.clone())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    type Rx = mpsc::Receiver<Result<pb::TcMessage, tonic::Status>>;

    const LEASE: Duration = Duration::from_secs(3);
    const LINGER: Duration = Duration::from_secs(10);

    fn guards(fresh: bool) -> (Arc<RmRegistry>, Arc<TableGuards>) {
        let rms = Arc::new(RmRegistry::default());
        let guards = TableGuards::new(Arc::clone(&rms), LEASE, LINGER, fresh, &Metrics::new());
        (rms, guards)
    }

    /// Attaches a stream and sends it the complete set, as `grpc.rs` does.
    async fn attach(rms: &RmRegistry, guards: &TableGuards, rm_id: &str) -> (Arc<RmConnection>, Rx) {
        let (tx, mut rx) = mpsc::channel(64);
        let hello = pb::Hello {
            rm_id: rm_id.into(),
            ..Default::default()
        };
        let conn = rms.attach(&hello, tx);
        assert!(guards.attach(&conn).await);
        let full = next_update(&mut rx).await;
        assert!(full.full);
        (conn, rx)
    }

    async fn next_update(rx: &mut Rx) -> pb::GuardUpdate {
        match rx.recv().await {
            Some(Ok(pb::TcMessage {
                kind: Some(pb::tc_message::Kind::Guards(u)),
            })) => u,
            other => panic!("expected a guard update, got {other:?}"),
        }
    }

    fn t(name: &str) -> Table {
        Table::new("db1", "app", name)
    }

    fn names(tables: &[pb::GuardedTable]) -> Vec<&str> {
        tables.iter().map(|t| t.table.as_str()).collect()
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn tables_of_keys_are_distinct_and_sorted() {
        let keys = [
            LockKey::new("db1", "app", "u", &[b"1"]),
            LockKey::new("db1", "app", "t", &[b"1"]),
            LockKey::new("db1", "app", "u", &[b"2"]),
            LockKey::new("db2", "app", "t", &[b"1"]),
        ];
        assert_eq!(
            Table::of_keys(&keys),
            vec![t("t"), t("u"), Table::new("db2", "app", "t")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_stream_confirms_at_once() {
        let (_rms, g) = guards(true);
        g.pin(1, &[t("t")]);
        g.ensure(&[t("t")], Instant::now()).await.unwrap();
        assert_eq!(g.seq(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_acknowledgement_confirms() {
        let (rms, g) = guards(true);
        let (a, mut rx) = attach(&rms, &g, "rm-a").await;
        g.pin(1, &[t("t"), t("u")]);
        let waiting = tokio::spawn({
            let g = Arc::clone(&g);
            async move { g.ensure(&[t("t"), t("u")], far()).await }
        });
        let update = next_update(&mut rx).await;
        assert_eq!(
            (update.seq, update.full, names(&update.guard)),
            (1, false, vec!["t", "u"])
        );
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "confirmed before the acknowledgement");
        g.acked(&a, update.seq);
        waiting.await.unwrap().unwrap();

        // Pinned again by another transaction: confirmed already, nothing is sent.
        g.pin(2, &[t("t")]);
        g.ensure(&[t("t")], Instant::now()).await.unwrap();
        assert!(rx.try_recv().is_err());
        assert_eq!(g.seq(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_silent_stream_blocks_until_the_deadline() {
        let (rms, g) = guards(true);
        let (_a, mut rx) = attach(&rms, &g, "rm-silent").await;
        g.pin(1, &[t("t")]);
        let started = Instant::now();
        // Far past the lease: a live stream is never given up on for its lease.
        let e = g
            .ensure(&[t("t")], started + LEASE * 4)
            .await
            .expect_err("never acknowledged");
        assert_eq!(e.code, ErrorCode::LockWaitTimeout);
        assert!(
            e.message.contains("rm-silent") && e.message.contains("app.t on db1"),
            "{e}"
        );
        assert_eq!(Instant::now() - started, LEASE * 4);
        assert_eq!(next_update(&mut rx).await.seq, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_detached_stream_counts_until_its_lease_runs_out() {
        let (rms, g) = guards(true);
        let (a, _rx) = attach(&rms, &g, "rm-gone").await;
        let answered = Instant::now() + Duration::from_secs(1);
        tokio::time::sleep_until(answered).await;
        a.answered(answered);
        g.pin(1, &[t("t")]);
        let waiting = tokio::spawn({
            let g = Arc::clone(&g);
            async move { g.ensure(&[t("t")], far()).await }
        });
        tokio::task::yield_now().await;
        g.detach(&a);
        waiting.await.unwrap().unwrap();
        assert_eq!(
            Instant::now(),
            answered + LEASE,
            "confirmed exactly when the lease ran out"
        );
        assert_eq!(rms.connected(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_attached_after_the_update_does_not_count() {
        let (rms, g) = guards(true);
        let (a, mut rx_a) = attach(&rms, &g, "rm-a").await;
        g.pin(1, &[t("t")]);
        let waiting = tokio::spawn({
            let g = Arc::clone(&g);
            async move { g.ensure(&[t("t")], far()).await }
        });
        let update = next_update(&mut rx_a).await;
        // The later stream gets the table in its complete set and never acknowledges.
        let (_b, mut rx_b) = {
            let (tx, rx) = mpsc::channel(64);
            let hello = pb::Hello {
                rm_id: "rm-b".into(),
                ..Default::default()
            };
            let b = rms.attach(&hello, tx);
            assert!(g.attach(&b).await);
            (b, rx)
        };
        let full = next_update(&mut rx_b).await;
        assert_eq!((full.full, full.seq, names(&full.guard)), (true, 1, vec!["t"]));
        g.acked(&a, update.seq);
        waiting.await.unwrap().unwrap();

        // But it counts for the next update.
        g.pin(1, &[t("u")]);
        let e = g
            .ensure(&[t("u")], Instant::now() + Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.message.contains("rm-a, rm-b"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_store_confirms_nothing_new_for_one_lease() {
        let (_rms, g) = guards(false);
        g.restore(7, &[t("restored")]);
        g.ensure(&[t("restored")], Instant::now()).await.unwrap();
        let started = Instant::now();
        g.pin(1, &[t("t")]);
        let e = g
            .ensure(&[t("t")], started + Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.message.contains("restarted"), "{e}");
        g.ensure(&[t("t")], far()).await.unwrap();
        assert_eq!(Instant::now(), started + LEASE);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_table_is_released_after_the_linger() {
        let (rms, g) = guards(true);
        let (a, mut rx) = attach(&rms, &g, "rm-a").await;
        g.pin(1, &[t("t")]);
        g.pin(2, &[t("t")]);
        let waiting = tokio::spawn({
            let g = Arc::clone(&g);
            async move { g.ensure(&[t("t")], far()).await }
        });
        g.acked(&a, next_update(&mut rx).await.seq);
        waiting.await.unwrap().unwrap();

        g.unpin(1, &[t("t")]);
        tokio::time::sleep(LINGER).await;
        assert_eq!(g.release_idle().await, 0, "still pinned by 2");
        g.unpin(2, &[t("t")]);
        tokio::time::sleep(LINGER / 2).await;
        assert_eq!(g.release_idle().await, 0, "lingers");
        // Pinned again in between: kept.
        g.pin(3, &[t("t")]);
        g.unpin(3, &[t("t")]);
        tokio::time::sleep(LINGER / 2).await;
        assert_eq!(g.release_idle().await, 0, "the linger restarted");
        tokio::time::sleep(LINGER / 2).await;
        assert_eq!(g.release_idle().await, 1);
        let update = next_update(&mut rx).await;
        assert_eq!(
            (update.seq, names(&update.guard), names(&update.release)),
            (2, vec![], vec!["t"])
        );

        // Guarded again: a new announcement, after the release.
        g.pin(4, &[t("t")]);
        let waiting = tokio::spawn({
            let g = Arc::clone(&g);
            async move { g.ensure(&[t("t")], far()).await }
        });
        let update = next_update(&mut rx).await;
        assert_eq!((update.seq, names(&update.guard)), (3, vec!["t"]));
        g.acked(&a, 3);
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_table_is_not_released() {
        let (rms, g) = guards(true);
        let (a, mut rx) = attach(&rms, &g, "rm-a").await;
        g.pin(1, &[t("t")]);
        g.ensure(&[t("t")], Instant::now() + Duration::from_millis(10))
            .await
            .unwrap_err();
        g.unpin(1, &[t("t")]);
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(g.release_idle().await, 0);
        // Confirmed late: released at the next sweep.
        g.acked(&a, next_update(&mut rx).await.seq);
        assert_eq!(g.release_idle().await, 1);
    }
}
