//! The global lock manager: which global transaction holds which rows, and the FIFO queues
//! of requests waiting for them.
//!
//! One `parking_lot::Mutex` guards the whole table (rows, waiting requests, the rolling-back
//! set): every operation is short and never holds it across an await, and deadlock
//! detection needs a consistent global view anyway.
//!
//! * A row held by a transaction records the transaction, the branches that registered it
//!   and when it was first granted. Free rows without waiters or watchers have no map entry.
//! * A request that conflicts waits in the FIFO queue of its first conflicting row (in key
//!   order). Queues are ordered by the requests' arrival: a request that moves to another
//!   queue keeps its age and goes in ahead of the requests that arrived after it. A free
//!   row with queued requests is reserved for its front request's transaction: newcomers of
//!   other transactions queue behind instead of barging in; only an older request may pass.
//!   When a row is freed its front request is woken and retries the whole acquisition; it is
//!   granted, or moves to the queue of the row it now conflicts on (waking the next front of
//!   the row it left), or keeps waiting. Ordering by arrival is what keeps this live: the
//!   oldest waiting request is never stopped by queues, only by holders, so woken requests
//!   cannot chase each other from queue to queue forever.
//! * Wake-ups go through the request's record in the table: the waker sets its state to
//!   `Woken` (or `Failed`) under the mutex, and the waiting future checks that state and
//!   registers its `Waker` under the same mutex, so no wake-up is lost. Wakers are invoked
//!   after the mutex is released.
//! * Deadlock detection runs whenever the wait-for relation between transactions gains
//!   edges (a queued request waits for its row's holder and for the transactions queued ahead
//!   of it): when a request is about to join a queue (its own edges, and those of the younger
//!   requests it goes in ahead of), and when a transaction that still has waiting requests is
//!   granted rows others are queued for. A search from the requester looks for a path back to
//!   it; the youngest transaction of the cycle (largest id) is the victim.
//! * Queries ("would these rows be lockable?") register as watchers of one row; watchers are
//!   woken when that row is freed and are neither queued nor part of the wait-for relation.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::lock_key::LockKey;

/// Why a lock request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockError {
    /// Rows stayed held by `holder` until the deadline.
    WaitTimeout { holder: u64, key: LockKey },
    /// Rows are held by `holder`, which is rolling back: fail fast.
    HolderRollingBack { holder: u64, key: LockKey },
    /// Waiting would close a wait-for cycle; this request's transaction is the youngest in
    /// it. `cycle` lists the transactions in the cycle.
    Deadlock { cycle: Vec<u64> },
}

/// How a granted request went, for metrics and the transaction's timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    /// Time spent waiting in queues, if the request had to wait at all.
    pub waited: Option<Duration>,
    /// The transactions that held rows it waited for, in the order it met them.
    pub holders: Vec<u64>,
}

impl Granted {
    fn at_once() -> Granted {
        Granted {
            waited: None,
            holders: Vec::new(),
        }
    }
}

/// One held row, for the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldRow {
    pub key: LockKey,
    pub txn: u64,
    pub branches: Vec<u64>,
    /// Unix milliseconds at which the row was first granted to `txn`.
    pub since_ms: u64,
    /// Transactions queued for the row, oldest request first.
    pub waiters: Vec<u64>,
}

#[derive(Default)]
pub struct LockManager {
    inner: Mutex<Inner>,
}

/// Id of a waiting request (acquirer or watcher).
type ReqId = u64;

#[derive(Default)]
struct Inner {
    rows: HashMap<LockKey, Row>,
    /// Number of rows with a holder.
    held: usize,
    rolling_back: HashSet<u64>,
    /// Requests that had to wait, until their future finishes.
    reqs: HashMap<ReqId, Req>,
    /// Queued acquire requests by transaction: the edges of the wait-for relation start here.
    waiting_by_txn: HashMap<u64, Vec<ReqId>>,
    /// For each transaction holding rows that requests are queued on, how many such rows:
    /// with `waiting_by_txn`, tells cheaply whether anybody waits for a transaction (if
    /// nobody does, it cannot be part of a cycle and deadlock detection is skipped).
    contended: HashMap<u64, u32>,
    next_id: ReqId,
    /// Arrival order of waiting requests: queues are sorted by it.
    next_age: u64,
}

#[derive(Default)]
struct Row {
    holder: Option<Holder>,
    queue: VecDeque<QEntry>,
    watchers: Vec<ReqId>,
}

impl Row {
    fn is_idle(&self) -> bool {
        self.holder.is_none() && self.queue.is_empty() && self.watchers.is_empty()
    }
}

/// The holding transaction of a row and the set of its branches that registered it (kept
/// inline for the usual single branch, so granting allocates nothing beyond the map entry).
struct Holder {
    txn: u64,
    since_ms: u64,
    branch: u64,
    more: Vec<u64>,
}

impl Holder {
    fn has(&self, branch: u64) -> bool {
        self.branch == branch || self.more.contains(&branch)
    }

    fn add(&mut self, branch: u64) {
        if !self.has(branch) {
            self.more.push(branch);
        }
    }

    /// Removes `branch`; true when no branch is left.
    fn remove(&mut self, branch: u64) -> bool {
        if self.branch == branch {
            match self.more.pop() {
                Some(other) => {
                    self.branch = other;
                    false
                }
                None => true,
            }
        } else {
            if let Some(i) = self.more.iter().position(|&b| b == branch) {
                self.more.swap_remove(i);
            }
            false
        }
    }

    fn branches(&self) -> Vec<u64> {
        let mut all = Vec::with_capacity(1 + self.more.len());
        all.push(self.branch);
        all.extend_from_slice(&self.more);
        all.sort_unstable();
        all
    }
}

#[derive(Clone, Copy)]
struct QEntry {
    id: ReqId,
    txn: u64,
    age: u64,
}

enum State {
    /// Sleeping until woken.
    Waiting,
    /// Should retry.
    Woken,
    /// Refused while waiting (deadlock victim, holder rolling back); already out of any
    /// queue, the record stays until its future picks the error up.
    Failed(LockError),
}

struct Req {
    /// The requesting transaction (for a watcher: the querying one, if any).
    txn: Option<u64>,
    watcher: bool,
    /// All the request's keys, sorted: a holder of any of them rolling back fails it.
    keys: Vec<LockKey>,
    /// The row whose queue (or watcher list) the request is in, if any.
    row: Option<LockKey>,
    /// When the request first had to wait (smaller is older); kept when it moves.
    age: u64,
    state: State,
    waker: Option<Waker>,
}

/// Outcome of one attempt under the mutex.
enum Step {
    Granted,
    /// Queued; the transaction holding the row it waits for.
    Wait(ReqId, u64),
    Refused(LockError),
}

enum Eval {
    Free,
    Conflict { idx: usize, holder: u64 },
    RollingBack { idx: usize, holder: u64 },
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Keys sorted and without duplicates, copying only when they are not already.
fn canonical(keys: &[LockKey]) -> Cow<'_, [LockKey]> {
    if keys.windows(2).all(|w| w[0] < w[1]) {
        Cow::Borrowed(keys)
    } else {
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        Cow::Owned(sorted)
    }
}

fn wake_all(wakes: Vec<Waker>) {
    for waker in wakes {
        waker.wake();
    }
}

fn uncontend(contended: &mut HashMap<u64, u32>, txn: u64) {
    if let Some(n) = contended.get_mut(&txn) {
        *n -= 1;
        if *n == 0 {
            contended.remove(&txn);
        }
    }
}

/// Marks a sleeping request woken and collects its waker.
fn wake_req(reqs: &mut HashMap<ReqId, Req>, id: ReqId, wakes: &mut Vec<Waker>) {
    if let Some(req) = reqs.get_mut(&id)
        && matches!(req.state, State::Waiting)
    {
        req.state = State::Woken;
        if let Some(waker) = req.waker.take() {
            wakes.push(waker);
        }
    }
}

impl Inner {
    /// Can `txn` take all `keys` (sorted)? A row is available when held by `txn`, or free and
    /// its queue is empty, or its front request (the oldest) is of `txn` or younger than the
    /// asking request (of age `age`; `u64::MAX` for one that never waited).
    fn evaluate(&self, txn: u64, keys: &[LockKey], age: u64) -> Eval {
        let check_rolling_back = !self.rolling_back.is_empty();
        let mut first = None;
        for (idx, key) in keys.iter().enumerate() {
            let Some(row) = self.rows.get(key) else { continue };
            let other = match &row.holder {
                Some(h) => (h.txn != txn).then_some((h.txn, true)),
                None => row
                    .queue
                    .front()
                    .filter(|e| e.txn != txn && e.age < age)
                    .map(|e| (e.txn, false)),
            };
            if let Some((holder, held)) = other {
                if held && check_rolling_back && self.rolling_back.contains(&holder) {
                    return Eval::RollingBack { idx, holder };
                }
                if first.is_none() {
                    first = Some(Eval::Conflict { idx, holder });
                    if !check_rolling_back {
                        break;
                    }
                }
            }
        }
        first.unwrap_or(Eval::Free)
    }

    /// Like `evaluate` for a query: only holders other than `txn` count, queues do not.
    fn evaluate_query(&self, txn: Option<u64>, keys: &[LockKey]) -> Eval {
        let mut first = None;
        for (idx, key) in keys.iter().enumerate() {
            let Some(holder) = self.rows.get(key).and_then(|r| r.holder.as_ref()) else {
                continue;
            };
            if Some(holder.txn) == txn {
                continue;
            }
            if self.rolling_back.contains(&holder.txn) {
                return Eval::RollingBack {
                    idx,
                    holder: holder.txn,
                };
            }
            if first.is_none() {
                first = Some(Eval::Conflict {
                    idx,
                    holder: holder.txn,
                });
                if self.rolling_back.is_empty() {
                    break;
                }
            }
        }
        first.unwrap_or(Eval::Free)
    }

    /// Gives `keys` to `txn` (the caller checked they are available). Requests of `txn`
    /// queued on a row it newly takes are woken: that row no longer stops them. Returns the
    /// newly taken rows where requests of other transactions are queued (they now wait for
    /// `txn`) if `txn` has other waiting requests (`me` is the granted one), else nothing:
    /// only then can they close a cycle.
    fn grant(
        &mut self,
        txn: u64,
        branch: u64,
        keys: &[LockKey],
        me: Option<ReqId>,
        wakes: &mut Vec<Waker>,
    ) -> Vec<LockKey> {
        let mut now_ms = None;
        let mut queued_rows = Vec::new();
        // Without other waiting requests of `txn` no queue holds one, and no queue (of a hot
        // row, maybe long) needs to be scanned.
        let txn_waits = self
            .waiting_by_txn
            .get(&txn)
            .is_some_and(|ids| ids.iter().any(|&i| Some(i) != me));
        for key in keys {
            let row = self.rows.entry(key.clone()).or_default();
            match &mut row.holder {
                Some(h) => {
                    debug_assert_eq!(h.txn, txn, "granted a row held by another transaction");
                    h.add(branch);
                }
                None => {
                    row.holder = Some(Holder {
                        txn,
                        since_ms: *now_ms.get_or_insert_with(unix_ms),
                        branch,
                        more: Vec::new(),
                    });
                    self.held += 1;
                    if row.queue.is_empty() {
                        continue;
                    }
                    *self.contended.entry(txn).or_default() += 1;
                    if !txn_waits {
                        continue;
                    }
                    let mut others = false;
                    for e in &row.queue {
                        if e.txn != txn {
                            others = true;
                        } else if Some(e.id) != me {
                            wake_req(&mut self.reqs, e.id, wakes);
                        }
                    }
                    if others {
                        queued_rows.push(key.clone());
                    }
                }
            }
        }
        queued_rows
    }

    /// After `txn` took `rows` that others are queued for: those requests now wait for `txn`,
    /// which closes a cycle if `txn` itself still waits (other requests of it) for them.
    /// Victims are refused until no cycle is left.
    fn resolve_after_grant(&mut self, txn: u64, rows: &[LockKey], wakes: &mut Vec<Waker>) {
        while self.waiting_by_txn.contains_key(&txn) {
            let closers: HashSet<u64> = rows
                .iter()
                .filter_map(|k| self.rows.get(k))
                .flat_map(|row| row.queue.iter().map(|e| e.txn))
                .filter(|&t| t != txn)
                .collect();
            if closers.is_empty() {
                return;
            }
            let Some(cycle) = self.search(txn, &[], None, &closers) else {
                return;
            };
            self.refuse_victim(&cycle, wakes);
        }
    }

    /// Refuses every waiting request of the youngest transaction of `cycle`.
    fn refuse_victim(&mut self, cycle: &[u64], wakes: &mut Vec<Waker>) {
        let victim = cycle.iter().copied().max().unwrap_or_default();
        let victims = self.waiting_by_txn.get(&victim).cloned().unwrap_or_default();
        for v in victims {
            self.fail(v, LockError::Deadlock { cycle: cycle.to_vec() }, wakes);
        }
    }

    fn free_row(&mut self, key: &LockKey, wakes: &mut Vec<Waker>) {
        let Some(row) = self.rows.get_mut(key) else { return };
        if let Some(h) = row.holder.take() {
            self.held -= 1;
            if !row.queue.is_empty() {
                uncontend(&mut self.contended, h.txn);
            }
        }
        for id in row.watchers.drain(..) {
            if let Some(req) = self.reqs.get_mut(&id) {
                req.row = None;
            }
            wake_req(&mut self.reqs, id, wakes);
        }
        self.tidy(key, wakes);
    }

    /// After a change to a row: a free row's front request must be awake (it may take the
    /// row), and an idle row leaves the map.
    fn tidy(&mut self, key: &LockKey, wakes: &mut Vec<Waker>) {
        let Some(row) = self.rows.get_mut(key) else { return };
        if row.holder.is_some() {
            return;
        }
        match row.queue.front() {
            Some(front) => {
                // The row is reserved for the front's transaction: wake its leading requests.
                let txn = front.txn;
                for e in row.queue.iter().take_while(|e| e.txn == txn) {
                    wake_req(&mut self.reqs, e.id, wakes);
                }
            }
            None => {
                if row.is_idle() {
                    self.rows.remove(key);
                }
            }
        }
    }

    fn new_req(&mut self, txn: Option<u64>, watcher: bool, keys: &[LockKey]) -> ReqId {
        let id = self.next_id;
        self.next_id += 1;
        let age = self.next_age;
        self.next_age += 1;
        self.reqs.insert(
            id,
            Req {
                txn,
                watcher,
                keys: keys.to_vec(),
                row: None,
                age,
                state: State::Waiting,
                waker: None,
            },
        );
        id
    }

    /// Takes a request out of its queue or watcher list (keeping its record).
    fn detach(&mut self, id: ReqId, wakes: &mut Vec<Waker>) {
        let Some(req) = self.reqs.get_mut(&id) else { return };
        let Some(key) = req.row.take() else { return };
        let (watcher, txn, age) = (req.watcher, req.txn, req.age);
        if let Some(row) = self.rows.get_mut(&key) {
            if watcher {
                if let Some(i) = row.watchers.iter().position(|&w| w == id) {
                    row.watchers.swap_remove(i);
                }
            } else if let Ok(i) = row.queue.binary_search_by_key(&age, |e| e.age) {
                row.queue.remove(i);
                if row.queue.is_empty()
                    && let Some(h) = &row.holder
                {
                    uncontend(&mut self.contended, h.txn);
                }
            }
        }
        if !watcher
            && let Some(txn) = txn
            && let Some(ids) = self.waiting_by_txn.get_mut(&txn)
        {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.waiting_by_txn.remove(&txn);
            }
        }
        self.tidy(&key, wakes);
    }

    fn remove_req(&mut self, id: ReqId, wakes: &mut Vec<Waker>) {
        self.detach(id, wakes);
        self.reqs.remove(&id);
    }

    fn fail(&mut self, id: ReqId, err: LockError, wakes: &mut Vec<Waker>) {
        self.detach(id, wakes);
        if let Some(req) = self.reqs.get_mut(&id) {
            req.state = State::Failed(err);
            if let Some(waker) = req.waker.take() {
                wakes.push(waker);
            }
        }
    }

    /// The error of a request refused while it waited, removing its record.
    fn take_failure(&mut self, id: ReqId) -> Option<LockError> {
        if let Some(req) = self.reqs.get(&id)
            && matches!(req.state, State::Failed(_))
        {
            let req = self.reqs.remove(&id)?;
            if let State::Failed(err) = req.state {
                return Some(err);
            }
        }
        None
    }

    /// Queues a request on `key`, behind the requests older than it.
    fn enqueue(&mut self, id: ReqId, txn: u64, key: &LockKey) {
        let req = self.reqs.get_mut(&id).expect("a queued request has a record");
        req.row = Some(key.clone());
        req.state = State::Waiting;
        let age = req.age;
        let row = self.rows.entry(key.clone()).or_default();
        if row.queue.is_empty()
            && let Some(h) = &row.holder
        {
            *self.contended.entry(h.txn).or_default() += 1;
        }
        let queue = &mut row.queue;
        if queue.back().is_none_or(|e| e.age < age) {
            queue.push_back(QEntry { id, txn, age });
        } else {
            let pos = queue.partition_point(|e| e.age < age);
            queue.insert(pos, QEntry { id, txn, age });
        }
        self.waiting_by_txn.entry(txn).or_default().push(id);
    }

    /// One try at taking `keys` (sorted) for `txn`. `id` is the request's record if it has
    /// already waited. Deadlines are checked only when the request would have to wait.
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &mut self,
        txn: u64,
        branch: u64,
        keys: &[LockKey],
        id: Option<ReqId>,
        deadline: Instant,
        timed_out: bool,
        wakes: &mut Vec<Waker>,
    ) -> Step {
        let age = id.map_or(u64::MAX, |id| self.reqs.get(&id).map_or(u64::MAX, |r| r.age));
        loop {
            let (idx, holder) = match self.evaluate(txn, keys, age) {
                Eval::Free => {
                    let queued_rows = self.grant(txn, branch, keys, id, wakes);
                    if let Some(id) = id {
                        self.remove_req(id, wakes);
                    }
                    if !queued_rows.is_empty() {
                        self.resolve_after_grant(txn, &queued_rows, wakes);
                    }
                    return Step::Granted;
                }
                Eval::RollingBack { idx, holder } => {
                    return self.end(
                        id,
                        Step::Refused(LockError::HolderRollingBack {
                            holder,
                            key: keys[idx].clone(),
                        }),
                        wakes,
                    );
                }
                Eval::Conflict { idx, holder } => (idx, holder),
            };
            let key = &keys[idx];
            if timed_out || Instant::now() >= deadline {
                return self.end(
                    id,
                    Step::Refused(LockError::WaitTimeout {
                        holder,
                        key: key.clone(),
                    }),
                    wakes,
                );
            }
            if let Some(id) = id {
                let req = self.reqs.get_mut(&id).expect("a waiting request has a record");
                if req.row.as_ref() == Some(key) {
                    // Still stopped by the row it is queued on: keep its place.
                    req.state = State::Waiting;
                    return Step::Wait(id, holder);
                }
            }
            if let Some(cycle) = self.find_cycle(txn, key, age, id) {
                if cycle.iter().max() == Some(&txn) {
                    return self.end(id, Step::Refused(LockError::Deadlock { cycle }), wakes);
                }
                // The victim's requests are gone (each removal shrinks the wait-for
                // relation, so this ends): look again.
                self.refuse_victim(&cycle, wakes);
                continue;
            }
            let id = match id {
                Some(id) => {
                    self.detach(id, wakes);
                    id
                }
                None => self.new_req(Some(txn), false, keys),
            };
            self.enqueue(id, txn, key);
            return Step::Wait(id, holder);
        }
    }

    /// Ends a request that will not wait (any more): its queue entry, if it has one, goes.
    fn end(&mut self, id: Option<ReqId>, step: Step, wakes: &mut Vec<Waker>) -> Step {
        if let Some(id) = id {
            self.remove_req(id, wakes);
        }
        step
    }

    /// One try of a query; a query that must wait watches its first blocking row.
    fn attempt_query(
        &mut self,
        txn: Option<u64>,
        keys: &[LockKey],
        id: Option<ReqId>,
        deadline: Instant,
        timed_out: bool,
        wakes: &mut Vec<Waker>,
    ) -> Step {
        let (idx, holder) = match self.evaluate_query(txn, keys) {
            Eval::Free => {
                return self.end(id, Step::Granted, wakes);
            }
            Eval::RollingBack { idx, holder } => {
                return self.end(
                    id,
                    Step::Refused(LockError::HolderRollingBack {
                        holder,
                        key: keys[idx].clone(),
                    }),
                    wakes,
                );
            }
            Eval::Conflict { idx, holder } => (idx, holder),
        };
        let key = &keys[idx];
        if timed_out || Instant::now() >= deadline {
            return self.end(
                id,
                Step::Refused(LockError::WaitTimeout {
                    holder,
                    key: key.clone(),
                }),
                wakes,
            );
        }
        let id = match id {
            Some(id) => {
                self.detach(id, wakes);
                id
            }
            None => self.new_req(txn, true, keys),
        };
        self.rows
            .get_mut(key)
            .expect("a blocking row is in the table")
            .watchers
            .push(id);
        let req = self.reqs.get_mut(&id).expect("a watcher has a record");
        req.row = Some(key.clone());
        req.state = State::Waiting;
        Step::Wait(id, holder)
    }

    /// Would a request of `txn` of age `age` queued on `key` close a wait-for cycle? It would
    /// wait for the row's holder and the older requests queued there, and the younger ones
    /// would wait for it. `exclude` is the request's current queue entry, which it would
    /// leave. Returns the cycle, starting with `txn` and following the wait-for edges.
    fn find_cycle(&self, txn: u64, key: &LockKey, age: u64, exclude: Option<ReqId>) -> Option<Vec<u64>> {
        let row = self.rows.get(key)?;
        let mut closers = HashSet::new();
        for e in row.queue.iter().rev().take_while(|e| e.age > age) {
            if e.txn != txn {
                closers.insert(e.txn);
            }
        }
        // A cycle needs somebody waiting for `txn`: on a row it holds, behind another of its
        // requests, or (the younger requests here) behind this one. Usually nobody does, and
        // the search (linear in the number of queued requests) is skipped.
        let waited_for = !closers.is_empty()
            || self.contended.contains_key(&txn)
            || self
                .waiting_by_txn
                .get(&txn)
                .is_some_and(|ids| ids.iter().any(|&i| Some(i) != exclude));
        if !waited_for {
            return None;
        }
        let mut targets = Vec::new();
        if let Some(h) = &row.holder
            && h.txn != txn
        {
            targets.push(h.txn);
        }
        targets.extend(
            row.queue
                .iter()
                .take_while(|e| e.age < age)
                .filter(|e| e.txn != txn)
                .map(|e| e.txn),
        );
        self.search(txn, &targets, exclude, &closers)
    }

    /// Searches the wait-for relation for a path from `txn` back to itself, where `txn` also
    /// waits for `targets`, every transaction of `closers` also waits for `txn`, and the queue
    /// entry `exclude` is ignored. Returns the cycle, starting with `txn` and following the
    /// wait-for edges.
    ///
    /// A depth-first search over transactions: a transaction's successors are, for each of
    /// its queued requests, the row's holder and the transactions queued ahead. Queues are
    /// sorted by age, so a queue's prefix already scanned need not be scanned again
    /// (`scanned`), which keeps a search linear in the number of queued requests.
    fn search(&self, txn: u64, targets: &[u64], exclude: Option<ReqId>, closers: &HashSet<u64>) -> Option<Vec<u64>> {
        let hit = |v: u64| v == txn || closers.contains(&v);
        // parent[v] = the transaction from which v was first reached; `txn` is the root.
        let mut parent: HashMap<u64, u64> = HashMap::new();
        let cycle = |parent: &HashMap<u64, u64>, last: u64, closer: u64| -> Vec<u64> {
            let mut cycle = Vec::new();
            if closer != txn {
                cycle.push(closer);
            }
            let mut v = last;
            while v != txn {
                cycle.push(v);
                v = parent[&v];
            }
            cycle.push(txn);
            cycle.reverse();
            cycle
        };
        let mut stack = vec![txn];
        for &v in targets {
            if hit(v) {
                return Some(cycle(&parent, txn, v));
            }
            if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(v) {
                e.insert(txn);
                stack.push(v);
            }
        }
        let mut scanned: HashMap<&LockKey, usize> = HashMap::new();
        while let Some(u) = stack.pop() {
            let Some(ids) = self.waiting_by_txn.get(&u) else {
                continue;
            };
            for &id in ids {
                if Some(id) == exclude {
                    continue;
                }
                let Some(req) = self.reqs.get(&id) else { continue };
                let Some(rk) = &req.row else { continue };
                let Some(row) = self.rows.get(rk) else { continue };
                let pos = row.queue.partition_point(|e| e.age < req.age);
                // The root's own entries are skipped as self-edges, so a prefix it scanned
                // must be scanned again by the others (for whom they are edges to the root).
                let start = if u == txn {
                    0
                } else {
                    scanned.get(rk).copied().unwrap_or(0).min(pos)
                };
                let ahead = row
                    .queue
                    .range(start..pos)
                    .filter(|e| Some(e.id) != exclude)
                    .map(|e| e.txn);
                for v in row.holder.as_ref().map(|h| h.txn).into_iter().chain(ahead) {
                    if v == u {
                        continue;
                    }
                    if hit(v) {
                        return Some(cycle(&parent, u, v));
                    }
                    if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(v) {
                        e.insert(u);
                        stack.push(v);
                    }
                }
                if u != txn && pos > start {
                    scanned.insert(rk, pos);
                }
            }
        }
        None
    }
}

/// Removes a waiting request from the table if its future is dropped before finishing.
struct WaitGuard<'a> {
    mgr: &'a LockManager,
    id: ReqId,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut wakes = Vec::new();
            self.mgr.inner.lock().remove_req(self.id, &mut wakes);
            wake_all(wakes);
        }
    }
}

impl LockManager {
    pub fn new() -> LockManager {
        LockManager::default()
    }

    /// Takes all `keys` for branch `branch` of `txn`, waiting in the rows' FIFO queues up to
    /// `deadline`. All or nothing; re-entrant for rows `txn` already holds.
    pub async fn acquire(
        &self,
        txn: u64,
        branch: u64,
        keys: &[LockKey],
        deadline: Instant,
    ) -> Result<Granted, LockError> {
        let keys = canonical(keys);
        let mut wakes = Vec::new();
        let step = self
            .inner
            .lock()
            .attempt(txn, branch, &keys, None, deadline, false, &mut wakes);
        wake_all(wakes);
        match step {
            Step::Granted => Ok(Granted::at_once()),
            Step::Refused(err) => Err(err),
            Step::Wait(id, holder) => {
                let guard = WaitGuard {
                    mgr: self,
                    id,
                    armed: true,
                };
                self.wait(guard, holder, deadline, |inner, id, timed_out, wakes| {
                    inner.attempt(txn, branch, &keys, Some(id), deadline, timed_out, wakes)
                })
                .await
            }
        }
    }

    /// Sleeps until the request is woken or the deadline passes, then retries; repeats until
    /// granted or refused.
    async fn wait(
        &self,
        mut guard: WaitGuard<'_>,
        holder: u64,
        deadline: Instant,
        mut retry: impl FnMut(&mut Inner, ReqId, bool, &mut Vec<Waker>) -> Step,
    ) -> Result<Granted, LockError> {
        let id = guard.id;
        let started = Instant::now();
        let mut holders = vec![holder];
        let mut sleep = pin!(tokio::time::sleep_until(deadline));
        loop {
            let timed_out = poll_fn(|cx| {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(true);
                }
                let mut inner = self.inner.lock();
                match inner.reqs.get_mut(&id) {
                    Some(req) if matches!(req.state, State::Waiting) => {
                        if !req.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            req.waker = Some(cx.waker().clone());
                        }
                        Poll::Pending
                    }
                    _ => Poll::Ready(false),
                }
            })
            .await;
            let mut wakes = Vec::new();
            let step = {
                let mut inner = self.inner.lock();
                match inner.take_failure(id) {
                    Some(err) => Step::Refused(err),
                    None => retry(&mut inner, id, timed_out, &mut wakes),
                }
            };
            wake_all(wakes);
            match step {
                Step::Wait(_, holder) => {
                    if !holders.contains(&holder) {
                        holders.push(holder);
                    }
                }
                Step::Granted => {
                    guard.armed = false;
                    return Ok(Granted {
                        waited: Some(started.elapsed()),
                        holders,
                    });
                }
                Step::Refused(err) => {
                    guard.armed = false;
                    return Err(err);
                }
            }
        }
    }

    /// Re-takes the locks of a stored branch at restart, without waiting. A key held by
    /// another transaction is reported as `WaitTimeout` and nothing is taken.
    pub fn restore(&self, txn: u64, branch: u64, keys: &[LockKey]) -> Result<(), LockError> {
        let keys = canonical(keys);
        let mut wakes = Vec::new();
        {
            let mut inner = self.inner.lock();
            for key in keys.iter() {
                if let Some(h) = inner.rows.get(key).and_then(|r| r.holder.as_ref())
                    && h.txn != txn
                {
                    return Err(LockError::WaitTimeout {
                        holder: h.txn,
                        key: key.clone(),
                    });
                }
            }
            let queued_rows = inner.grant(txn, branch, &keys, None, &mut wakes);
            if !queued_rows.is_empty() {
                inner.resolve_after_grant(txn, &queued_rows, &mut wakes);
            }
        }
        wake_all(wakes);
        Ok(())
    }

    /// Waits until no key is held by a transaction other than `txn` (takes nothing).
    pub async fn query(&self, txn: Option<u64>, keys: &[LockKey], deadline: Instant) -> Result<Granted, LockError> {
        let keys = canonical(keys);
        let mut wakes = Vec::new();
        let step = self
            .inner
            .lock()
            .attempt_query(txn, &keys, None, deadline, false, &mut wakes);
        wake_all(wakes);
        match step {
            Step::Granted => Ok(Granted::at_once()),
            Step::Refused(err) => Err(err),
            Step::Wait(id, holder) => {
                let guard = WaitGuard {
                    mgr: self,
                    id,
                    armed: true,
                };
                self.wait(guard, holder, deadline, |inner, id, timed_out, wakes| {
                    inner.attempt_query(txn, &keys, Some(id), deadline, timed_out, wakes)
                })
                .await
            }
        }
    }

    /// Branch `branch` of `txn` lets go of `keys`; a row is freed when its last branch does.
    pub fn release_branch(&self, txn: u64, branch: u64, keys: &[LockKey]) {
        self.release(txn, Some(branch), keys);
    }

    /// Frees every key of `keys` held by `txn`, whichever branches registered it.
    pub fn release_txn(&self, txn: u64, keys: &[LockKey]) {
        self.release(txn, None, keys);
    }

    fn release(&self, txn: u64, branch: Option<u64>, keys: &[LockKey]) {
        let mut wakes = Vec::new();
        {
            let mut inner = self.inner.lock();
            for key in keys {
                let Some(h) = inner.rows.get_mut(key).and_then(|r| r.holder.as_mut()) else {
                    continue;
                };
                if h.txn != txn {
                    continue;
                }
                if let Some(branch) = branch
                    && !h.remove(branch)
                {
                    continue;
                }
                inner.free_row(key, &mut wakes);
            }
        }
        wake_all(wakes);
    }

    /// Marks `txn` rolling back: requests conflicting with its rows fail fast, including the
    /// ones waiting now.
    pub fn set_rolling_back(&self, txn: u64) {
        let mut wakes = Vec::new();
        {
            let mut inner = self.inner.lock();
            if !inner.rolling_back.insert(txn) {
                return;
            }
            let inner = &mut *inner;
            let failing: Vec<(ReqId, LockKey)> = inner
                .reqs
                .iter()
                .filter(|(_, r)| r.txn != Some(txn) && !matches!(r.state, State::Failed(_)))
                .filter_map(|(&id, r)| {
                    r.keys
                        .iter()
                        .find(|k| {
                            inner
                                .rows
                                .get(*k)
                                .and_then(|row| row.holder.as_ref())
                                .is_some_and(|h| h.txn == txn)
                        })
                        .map(|k| (id, k.clone()))
                })
                .collect();
            for (id, key) in failing {
                inner.fail(id, LockError::HolderRollingBack { holder: txn, key }, &mut wakes);
            }
        }
        wake_all(wakes);
    }

    /// Drops the rolling-back mark of a finished transaction.
    pub fn forget_txn(&self, txn: u64) {
        self.inner.lock().rolling_back.remove(&txn);
    }

    /// Lets go of the rows of every branch `branch_gone(txn, branch)` names and of the
    /// rolling-back mark of every transaction `txn_gone` names (a node's sync: they no
    /// longer exist).
    pub fn drop_gone(&self, branch_gone: &dyn Fn(u64, u64) -> bool, txn_gone: &dyn Fn(u64) -> bool) {
        let mut wakes = Vec::new();
        {
            let mut inner = self.inner.lock();
            let freed: Vec<LockKey> = inner
                .rows
                .iter_mut()
                .filter_map(|(key, row)| {
                    let h = row.holder.as_mut()?;
                    let mut empty = false;
                    for branch in h.branches() {
                        if branch_gone(h.txn, branch) {
                            empty = h.remove(branch);
                        }
                    }
                    empty.then(|| key.clone())
                })
                .collect();
            for key in &freed {
                inner.free_row(key, &mut wakes);
            }
            inner.rolling_back.retain(|&txn| !txn_gone(txn));
        }
        wake_all(wakes);
    }

    /// Held rows matching `filter`, at most `limit` of them (an arbitrary subset when more
    /// match), sorted by key.
    pub fn held_rows(&self, filter: &dyn Fn(&LockKey) -> bool, limit: usize) -> Vec<HeldRow> {
        let mut out = Vec::new();
        {
            let inner = self.inner.lock();
            for (key, row) in &inner.rows {
                if out.len() >= limit {
                    break;
                }
                let Some(h) = &row.holder else { continue };
                if !filter(key) {
                    continue;
                }
                out.push(HeldRow {
                    key: key.clone(),
                    txn: h.txn,
                    branches: h.branches(),
                    since_ms: h.since_ms,
                    waiters: row.queue.iter().map(|e| e.txn).collect(),
                });
            }
        }
        out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        out
    }

    pub fn held_count(&self) -> usize {
        self.inner.lock().held
    }
}

#[cfg(test)]
impl LockManager {
    /// Requests queued on `key`.
    fn queued(&self, key: &LockKey) -> usize {
        self.inner.lock().rows.get(key).map_or(0, |r| r.queue.len())
    }

    /// Queries watching `key`.
    fn watching(&self, key: &LockKey) -> usize {
        self.inner.lock().rows.get(key).map_or(0, |r| r.watchers.len())
    }

    /// Nothing held, queued or remembered.
    fn is_idle(&self) -> bool {
        let inner = self.inner.lock();
        inner.rows.is_empty()
            && inner.reqs.is_empty()
            && inner.waiting_by_txn.is_empty()
            && inner.contended.is_empty()
            && inner.held == 0
    }

    /// Checks the table's internal consistency.
    fn check_invariants(&self) -> Result<(), String> {
        let inner = self.inner.lock();
        let held = inner.rows.values().filter(|r| r.holder.is_some()).count();
        if held != inner.held {
            return Err(format!("held counter {} but {held} held rows", inner.held));
        }
        let mut queued = 0;
        for (key, row) in &inner.rows {
            if row.is_idle() {
                return Err(format!("idle row {key:?} left in the map"));
            }
            let mut last_age = None;
            for e in &row.queue {
                queued += 1;
                let req = inner.reqs.get(&e.id).ok_or("queued request without record")?;
                if req.watcher || req.txn != Some(e.txn) || req.row.as_ref() != Some(key) || req.age != e.age {
                    return Err(format!("queue entry of {key:?} disagrees with its record"));
                }
                if last_age.is_some_and(|a| a >= e.age) {
                    return Err(format!("queue of {key:?} is out of order"));
                }
                last_age = Some(e.age);
                // Nobody may sleep on a row its transaction holds, and a free row's front
                // (which may take it) must be awake.
                match req.state {
                    State::Failed(_) => return Err("a failed request is still queued".into()),
                    State::Waiting if row.holder.as_ref().is_some_and(|h| h.txn == e.txn) => {
                        return Err(format!("a request sleeps on {key:?}, held by its own transaction"));
                    }
                    State::Waiting if row.holder.is_none() && row.queue.front().is_some_and(|f| f.id == e.id) => {
                        return Err(format!("the front of free row {key:?} sleeps"));
                    }
                    _ => {}
                }
                if !inner.waiting_by_txn.get(&e.txn).is_some_and(|ids| ids.contains(&e.id)) {
                    return Err("queued request missing from waiting_by_txn".into());
                }
            }
            for id in &row.watchers {
                let req = inner.reqs.get(id).ok_or("watcher without record")?;
                let held_by_other = row.holder.as_ref().is_some_and(|h| Some(h.txn) != req.txn);
                if !req.watcher
                    || req.row.as_ref() != Some(key)
                    || !matches!(req.state, State::Waiting)
                    || !held_by_other
                {
                    return Err(format!("bad watcher on {key:?}"));
                }
            }
        }
        let mut contended: HashMap<u64, u32> = HashMap::new();
        for row in inner.rows.values() {
            if let Some(h) = &row.holder
                && !row.queue.is_empty()
            {
                *contended.entry(h.txn).or_default() += 1;
            }
        }
        if contended != inner.contended {
            return Err(format!("contended {:?}, should be {contended:?}", inner.contended));
        }
        let indexed: usize = inner.waiting_by_txn.values().map(Vec::len).sum();
        if indexed != queued {
            return Err(format!("waiting_by_txn has {indexed} requests, queues {queued}"));
        }
        for req in inner.reqs.values() {
            if req.row.is_none() && matches!(req.state, State::Waiting) {
                return Err("a request sleeps outside any queue".into());
            }
        }
        // Deadlock detection keeps the wait-for relation acyclic: a queued request waits for
        // its row's holder and for the other transactions queued ahead of it.
        let mut edges: HashMap<u64, HashSet<u64>> = HashMap::new();
        for row in inner.rows.values() {
            for (pos, e) in row.queue.iter().enumerate() {
                let out = edges.entry(e.txn).or_default();
                out.extend(row.holder.as_ref().map(|h| h.txn).filter(|&t| t != e.txn));
                out.extend(row.queue.range(..pos).map(|a| a.txn).filter(|&t| t != e.txn));
            }
        }
        fn cyclic(v: u64, edges: &HashMap<u64, HashSet<u64>>, color: &mut HashMap<u64, bool>) -> bool {
            match color.get(&v) {
                Some(true) => return true, // on the current path
                Some(false) => return false,
                None => {}
            }
            color.insert(v, true);
            let found = edges
                .get(&v)
                .is_some_and(|out| out.iter().any(|&w| cyclic(w, edges, color)));
            color.insert(v, false);
            found
        }
        let mut color = HashMap::new();
        for &v in edges.keys() {
            if cyclic(v, &edges, &mut color) {
                return Err(format!("the wait-for relation has a cycle: {edges:?}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Arc;

    use super::*;

    fn k(i: u32) -> LockKey {
        LockKey::new("res", "db", "t", &[i.to_string()])
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    /// Yields until `cond` holds (other tasks run meanwhile); panics if it never does.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..100_000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened: {what}");
    }

    /// Polls a future once.
    async fn poll_once<F: Future>(mut fut: Pin<&mut F>) -> Option<F::Output> {
        poll_fn(|cx| {
            Poll::Ready(match fut.as_mut().poll(cx) {
                Poll::Ready(out) => Some(out),
                Poll::Pending => None,
            })
        })
        .await
    }

    /// Awaits a spawned task, which must end soon (its own deadline is far).
    async fn finish<T>(handle: tokio::task::JoinHandle<T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("the task should have finished")
            .expect("the task should not panic")
    }

    fn holder(mgr: &LockManager, key: &LockKey) -> Option<(u64, Vec<u64>)> {
        mgr.held_rows(&|k| k == key, 10)
            .first()
            .map(|r| (r.txn, r.branches.clone()))
    }

    fn spawn_acquire(
        mgr: &Arc<LockManager>,
        txn: u64,
        branch: u64,
        keys: Vec<LockKey>,
    ) -> tokio::task::JoinHandle<Result<Granted, LockError>> {
        let mgr = mgr.clone();
        tokio::spawn(async move { mgr.acquire(txn, branch, &keys, far()).await })
    }

    fn spawn_query(
        mgr: &Arc<LockManager>,
        txn: Option<u64>,
        keys: Vec<LockKey>,
    ) -> tokio::task::JoinHandle<Result<Granted, LockError>> {
        let mgr = mgr.clone();
        tokio::spawn(async move { mgr.query(txn, &keys, far()).await })
    }

    #[tokio::test]
    async fn grant_and_reentrant_branches() {
        let mgr = Arc::new(LockManager::new());
        let got = mgr.acquire(1, 10, &[k(2), k(1), k(2)], far()).await;
        assert_eq!(got, Ok(Granted::at_once()));
        assert_eq!(mgr.held_count(), 2);
        assert_eq!(holder(&mgr, &k(1)), Some((1, vec![10])));
        // Another branch of the same transaction takes an overlapping set without waiting.
        assert_eq!(
            mgr.acquire(1, 11, &[k(2), k(3)], Instant::now()).await,
            Ok(Granted::at_once())
        );
        assert_eq!(holder(&mgr, &k(2)), Some((1, vec![10, 11])));
        assert_eq!(mgr.held_count(), 3);

        // Releasing one branch frees only the rows no other branch holds.
        mgr.release_branch(1, 10, &[k(1), k(2)]);
        assert_eq!(holder(&mgr, &k(1)), None);
        assert_eq!(holder(&mgr, &k(2)), Some((1, vec![11])));
        assert_eq!(mgr.held_count(), 2);

        let waiter = spawn_acquire(&mgr, 2, 20, vec![k(2)]);
        until("the waiter queues", || mgr.queued(&k(2)) == 1).await;
        mgr.release_branch(1, 99, &[k(2)]); // not a branch holding it
        mgr.release_branch(2, 11, &[k(2)]); // not the holder
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "the row is still held by branch 11");
        mgr.release_branch(1, 11, &[k(2), k(3)]);
        let got = finish(waiter).await.unwrap();
        assert!(got.waited.is_some());
        assert_eq!(holder(&mgr, &k(2)), Some((2, vec![20])));
        mgr.check_invariants().unwrap();
        mgr.release_txn(2, &[k(2)]);
        assert!(mgr.is_idle());
    }

    #[tokio::test]
    async fn waiter_is_granted_on_release() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        let waiter = spawn_acquire(&mgr, 2, 2, vec![k(1)]);
        until("the waiter queues", || mgr.queued(&k(1)) == 1).await;
        assert_eq!(mgr.held_rows(&|_| true, 10)[0].waiters, vec![2]);
        mgr.check_invariants().unwrap();
        mgr.release_txn(1, &[k(1)]);
        let got = finish(waiter).await;
        let got = got.unwrap();
        assert!(got.waited.is_some());
        assert_eq!(got.holders, vec![1], "it waited for the holder");
        assert_eq!(holder(&mgr, &k(1)), Some((2, vec![2])));
        mgr.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn timeout_names_the_holder() {
        let mgr = LockManager::new();
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        let start = Instant::now();
        let got = mgr.acquire(2, 2, &[k(1)], start + Duration::from_millis(50)).await;
        assert_eq!(got, Err(LockError::WaitTimeout { holder: 1, key: k(1) }));
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(mgr.queued(&k(1)), 0, "a timed-out request leaves its queue");
        mgr.release_txn(1, &[k(1)]);
        assert!(mgr.is_idle());
    }

    #[tokio::test]
    async fn all_or_nothing() {
        let mgr = LockManager::new();
        mgr.acquire(1, 1, &[k(2)], far()).await.unwrap();
        let got = mgr.acquire(2, 2, &[k(3), k(2), k(1)], soon(20)).await;
        assert_eq!(got, Err(LockError::WaitTimeout { holder: 1, key: k(2) }));
        let held: Vec<LockKey> = mgr.held_rows(&|_| true, 10).into_iter().map(|r| r.key).collect();
        assert_eq!(held, vec![k(2)], "the refused request took nothing");
        // The rows it did not get are free for others at once.
        assert_eq!(
            mgr.acquire(3, 3, &[k(1), k(3)], Instant::now()).await,
            Ok(Granted::at_once())
        );
        mgr.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn fifo_order() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for txn in [4, 2, 3] {
            let (mgr2, order) = (mgr.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                mgr2.acquire(txn, txn, &[k(1)], far()).await.unwrap();
                order.lock().unwrap().push(txn);
                tokio::task::yield_now().await;
                mgr2.release_txn(txn, &[k(1)]);
            }));
            let n = waiters.len();
            until("the waiter queues", || mgr.queued(&k(1)) == n).await;
        }
        assert_eq!(mgr.held_rows(&|_| true, 10)[0].waiters, vec![4, 2, 3]);
        mgr.release_txn(1, &[k(1)]);
        for w in waiters {
            finish(w).await;
        }
        assert_eq!(*order.lock().unwrap(), vec![4, 2, 3]);
        assert!(mgr.is_idle());
    }

    #[tokio::test]
    async fn newcomer_queues_behind_waiters_of_a_freed_row() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        let first = spawn_acquire(&mgr, 3, 3, vec![k(1)]);
        until("the waiter queues", || mgr.queued(&k(1)) == 1).await;
        mgr.release_txn(1, &[k(1)]);
        // The row is free but reserved for the woken waiter, which has not run yet.
        let got = mgr.acquire(2, 2, &[k(1)], Instant::now()).await;
        assert_eq!(got, Err(LockError::WaitTimeout { holder: 3, key: k(1) }));
        let k1 = [k(1)];
        let mut newcomer = pin!(mgr.acquire(2, 2, &k1, far()));
        assert!(poll_once(newcomer.as_mut()).await.is_none());
        assert_eq!(mgr.held_rows(&|_| true, 10), vec![]);
        assert_eq!(mgr.queued(&k(1)), 2);
        mgr.check_invariants().unwrap();
        assert!(finish(first).await.unwrap().waited.is_some());
        assert_eq!(holder(&mgr, &k(1)), Some((3, vec![3])));
        mgr.release_txn(3, &[k(1)]);
        assert!(newcomer.await.unwrap().waited.is_some());
        assert_eq!(holder(&mgr, &k(1)), Some((2, vec![2])));
    }

    #[tokio::test]
    async fn woken_waiter_moves_to_its_next_conflict_and_passes_the_row_on() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        mgr.acquire(2, 2, &[k(2)], far()).await.unwrap();
        let both = spawn_acquire(&mgr, 3, 3, vec![k(1), k(2)]);
        until("queues on k1", || mgr.queued(&k(1)) == 1).await;
        let one = spawn_acquire(&mgr, 4, 4, vec![k(1)]);
        until("queues behind", || mgr.queued(&k(1)) == 2).await;
        mgr.release_txn(1, &[k(1)]);
        // Txn 3 now conflicts on k2 and moves there; txn 4 gets k1 meanwhile.
        assert!(finish(one).await.is_ok());
        assert_eq!(mgr.queued(&k(2)), 1);
        assert_eq!(mgr.queued(&k(1)), 0);
        mgr.check_invariants().unwrap();
        mgr.release_txn(2, &[k(2)]);
        until("moves back to k1", || mgr.queued(&k(1)) == 1).await;
        assert!(!both.is_finished());
        mgr.release_txn(4, &[k(1)]);
        assert!(finish(both).await.is_ok());
        assert_eq!(mgr.held_count(), 2);
        mgr.release_txn(3, &[k(1), k(2)]);
        assert!(mgr.is_idle());
    }

    #[tokio::test]
    async fn fail_fast_against_a_rolling_back_holder() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        mgr.acquire(5, 5, &[k(0)], far()).await.unwrap();
        let waiter = spawn_acquire(&mgr, 2, 2, vec![k(1)]);
        // Queued on k0 (held by 5), also needs k1 (held by 1).
        let other_key = spawn_acquire(&mgr, 3, 3, vec![k(0), k(1)]);
        let watcher = spawn_query(&mgr, Some(4), vec![k(1)]);
        until("all wait", || {
            mgr.queued(&k(1)) == 1 && mgr.queued(&k(0)) == 1 && mgr.watching(&k(1)) == 1
        })
        .await;
        mgr.set_rolling_back(1);
        let fast = LockError::HolderRollingBack { holder: 1, key: k(1) };
        assert_eq!(finish(waiter).await, Err(fast.clone()));
        assert_eq!(finish(other_key).await, Err(fast.clone()));
        assert_eq!(finish(watcher).await, Err(fast.clone()));
        assert_eq!(mgr.queued(&k(1)) + mgr.queued(&k(0)) + mgr.watching(&k(1)), 0);
        // New requests fail at once.
        let k1 = [k(1)];
        let mut now = pin!(mgr.acquire(6, 6, &k1, far()));
        assert_eq!(poll_once(now.as_mut()).await, Some(Err(fast.clone())));
        assert_eq!(mgr.query(None, &[k(1)], far()).await, Err(fast));
        mgr.check_invariants().unwrap();
        // Once forgotten, requests wait again.
        mgr.forget_txn(1);
        let got = mgr.acquire(6, 6, &[k(1)], soon(20)).await;
        assert_eq!(got, Err(LockError::WaitTimeout { holder: 1, key: k(1) }));
    }

    #[tokio::test]
    async fn deadlock_refuses_the_youngest_requester() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        mgr.acquire(2, 2, &[k(2)], far()).await.unwrap();
        let older = spawn_acquire(&mgr, 1, 1, vec![k(2)]);
        until("older waits", || mgr.queued(&k(2)) == 1).await;
        let k1 = [k(1)];
        let mut younger = pin!(mgr.acquire(2, 2, &k1, far()));
        assert_eq!(
            poll_once(younger.as_mut()).await,
            Some(Err(LockError::Deadlock { cycle: vec![2, 1] }))
        );
        assert_eq!(mgr.queued(&k(1)), 0);
        // The victim keeps its rows until its caller releases them.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!older.is_finished());
        mgr.release_txn(2, &[k(2)]);
        assert!(finish(older).await.is_ok());
        assert_eq!(holder(&mgr, &k(2)), Some((1, vec![1])));
    }

    #[tokio::test]
    async fn deadlock_wakes_a_younger_waiting_victim() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        mgr.acquire(2, 2, &[k(2)], far()).await.unwrap();
        let younger = spawn_acquire(&mgr, 2, 2, vec![k(1)]);
        until("younger waits", || mgr.queued(&k(1)) == 1).await;
        let older = spawn_acquire(&mgr, 1, 1, vec![k(2)]);
        assert_eq!(finish(younger).await, Err(LockError::Deadlock { cycle: vec![1, 2] }));
        until("older waits", || mgr.queued(&k(2)) == 1).await;
        assert_eq!(mgr.queued(&k(1)), 0);
        mgr.check_invariants().unwrap();
        mgr.release_txn(2, &[k(2)]);
        assert!(finish(older).await.is_ok());
        assert_eq!(holder(&mgr, &k(2)), Some((1, vec![1])));
    }

    #[tokio::test]
    async fn three_transaction_cycles() {
        // The youngest closes the cycle: refused at once.
        let mgr = Arc::new(LockManager::new());
        for t in 1..=3 {
            mgr.acquire(t, t, &[k(t as u32)], far()).await.unwrap();
        }
        let a = spawn_acquire(&mgr, 1, 1, vec![k(2)]);
        until("1 waits", || mgr.queued(&k(2)) == 1).await;
        let b = spawn_acquire(&mgr, 2, 2, vec![k(3)]);
        until("2 waits", || mgr.queued(&k(3)) == 1).await;
        let got = mgr.acquire(3, 3, &[k(1)], far()).await;
        assert_eq!(got, Err(LockError::Deadlock { cycle: vec![3, 1, 2] }));
        mgr.release_txn(3, &[k(3)]);
        assert!(finish(b).await.is_ok());
        mgr.release_txn(2, &[k(2), k(3)]);
        assert!(finish(a).await.is_ok());

        // The oldest closes it: the youngest, already waiting, is the victim.
        let mgr = Arc::new(LockManager::new());
        for t in 1..=3 {
            mgr.acquire(t, t, &[k(t as u32)], far()).await.unwrap();
        }
        let c = spawn_acquire(&mgr, 3, 3, vec![k(1)]);
        until("3 waits", || mgr.queued(&k(1)) == 1).await;
        let b = spawn_acquire(&mgr, 2, 2, vec![k(3)]);
        until("2 waits", || mgr.queued(&k(3)) == 1).await;
        let a = spawn_acquire(&mgr, 1, 1, vec![k(2)]);
        assert_eq!(finish(c).await, Err(LockError::Deadlock { cycle: vec![1, 2, 3] }));
        until("1 waits", || mgr.queued(&k(2)) == 1).await;
        mgr.release_txn(3, &[k(3)]);
        assert!(finish(b).await.is_ok());
        mgr.release_txn(2, &[k(2), k(3)]);
        assert!(finish(a).await.is_ok());
        mgr.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn deadlock_through_a_request_queued_ahead() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(5, 5, &[k(1)], far()).await.unwrap();
        mgr.acquire(1, 1, &[k(2)], far()).await.unwrap();
        let b1 = spawn_acquire(&mgr, 2, 20, vec![k(1)]);
        until("2 waits", || mgr.queued(&k(1)) == 1).await;
        let a = spawn_acquire(&mgr, 1, 1, vec![k(1)]);
        until("1 queues behind 2", || mgr.queued(&k(1)) == 2).await;
        // Txn 1 waits for txn 2 only because 2 is queued ahead of it on k1.
        let got = mgr.acquire(2, 21, &[k(2)], far()).await;
        assert_eq!(got, Err(LockError::Deadlock { cycle: vec![2, 1] }));
        assert_eq!(mgr.queued(&k(1)), 2, "the other requests keep waiting");
        mgr.release_txn(5, &[k(1)]);
        assert!(finish(b1).await.is_ok());
        mgr.release_txn(2, &[k(1)]);
        assert!(finish(a).await.is_ok());
        mgr.check_invariants().unwrap();
    }

    #[tokio::test]
    async fn dropping_a_waiter_passes_the_row_on() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        {
            let k1 = [k(1)];
            let mut dropped = pin!(mgr.acquire(2, 2, &k1, far()));
            assert!(poll_once(dropped.as_mut()).await.is_none());
            assert_eq!(mgr.queued(&k(1)), 1);
        }
        assert_eq!(mgr.queued(&k(1)), 0);

        // A dropped front request that was already woken hands the row to the next.
        let k1 = [k(1)];
        let mut front = Box::pin(mgr.acquire(2, 2, &k1, far()));
        assert!(poll_once(front.as_mut()).await.is_none());
        let next = spawn_acquire(&mgr, 3, 3, vec![k(1)]);
        until("next queues", || mgr.queued(&k(1)) == 2).await;
        mgr.release_txn(1, &[k(1)]);
        drop(front);
        assert!(finish(next).await.is_ok());
        assert_eq!(holder(&mgr, &k(1)), Some((3, vec![3])));

        // Dropped watchers leave too.
        {
            let k1 = [k(1)];
            let mut watcher = pin!(mgr.query(Some(9), &k1, far()));
            assert!(poll_once(watcher.as_mut()).await.is_none());
            assert_eq!(mgr.watching(&k(1)), 1);
        }
        assert_eq!(mgr.watching(&k(1)), 0);
        mgr.release_txn(3, &[k(1)]);
        assert!(mgr.is_idle());
    }

    #[tokio::test]
    async fn query_semantics() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        assert_eq!(mgr.query(Some(1), &[k(1), k(2)], far()).await, Ok(Granted::at_once()));
        assert_eq!(mgr.query(None, &[k(2)], far()).await, Ok(Granted::at_once()));
        let got = mgr.query(Some(2), &[k(2), k(1)], soon(20)).await;
        assert_eq!(got, Err(LockError::WaitTimeout { holder: 1, key: k(1) }));
        assert_eq!(mgr.held_count(), 1, "queries take nothing");

        let watcher = spawn_query(&mgr, Some(2), vec![k(1), k(2)]);
        until("watches", || mgr.watching(&k(1)) == 1).await;
        assert_eq!(mgr.queued(&k(1)), 0, "a watcher is not queued");
        mgr.release_txn(1, &[k(1)]);
        // The watcher does not block an acquirer.
        assert_eq!(mgr.acquire(3, 3, &[k(1)], Instant::now()).await, Ok(Granted::at_once()));
        until("watches again", || mgr.watching(&k(1)) == 1).await;
        assert!(!watcher.is_finished());
        mgr.check_invariants().unwrap();
        mgr.release_txn(3, &[k(1)]);
        assert!(finish(watcher).await.unwrap().waited.is_some());

        // Queues do not stop a query.
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        let waiter = spawn_acquire(&mgr, 2, 2, vec![k(1)]);
        until("waits", || mgr.queued(&k(1)) == 1).await;
        mgr.release_txn(1, &[k(1)]);
        assert_eq!(
            mgr.query(Some(5), &[k(1)], Instant::now()).await,
            Ok(Granted::at_once())
        );
        assert!(finish(waiter).await.is_ok());
    }

    #[tokio::test]
    async fn restore_takes_locks_without_waiting() {
        let mgr = LockManager::new();
        mgr.restore(1, 10, &[k(1), k(2)]).unwrap();
        mgr.restore(1, 11, &[k(2)]).unwrap();
        assert_eq!(holder(&mgr, &k(2)), Some((1, vec![10, 11])));
        let got = mgr.restore(2, 20, &[k(3), k(2)]);
        assert_eq!(got, Err(LockError::WaitTimeout { holder: 1, key: k(2) }));
        assert_eq!(holder(&mgr, &k(3)), None, "a refused restore takes nothing");
        assert_eq!(mgr.held_count(), 2);
    }

    #[tokio::test]
    async fn held_rows_snapshot() {
        let mgr = Arc::new(LockManager::new());
        let before = unix_ms();
        mgr.acquire(1, 1, &[k(1), k(2), k(3)], far()).await.unwrap();
        mgr.acquire(1, 2, &[k(2)], far()).await.unwrap();
        let w1 = spawn_acquire(&mgr, 3, 3, vec![k(2)]);
        until("3 waits", || mgr.queued(&k(2)) == 1).await;
        let w2 = spawn_acquire(&mgr, 2, 2, vec![k(2)]);
        until("2 waits", || mgr.queued(&k(2)) == 2).await;
        let rows = mgr.held_rows(&|key| key != &k(3), 10);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].key.clone(), rows[0].txn, rows[0].branches.clone()),
            (k(1), 1, vec![1])
        );
        assert_eq!(rows[0].waiters, Vec::<u64>::new());
        assert_eq!((rows[1].key.clone(), rows[1].branches.clone()), (k(2), vec![1, 2]));
        assert_eq!(rows[1].waiters, vec![3, 2]);
        assert!(rows.iter().all(|r| r.since_ms >= before && r.since_ms <= unix_ms()));
        assert_eq!(mgr.held_rows(&|_| true, 2).len(), 2);
        assert_eq!(mgr.held_count(), 3);
        w1.abort();
        w2.abort();
        until("aborted", || mgr.queued(&k(2)) == 0).await;
        mgr.release_txn(1, &[k(1), k(2), k(3)]);
        assert!(mgr.is_idle());
    }

    #[tokio::test]
    async fn a_moving_request_keeps_its_age() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(1, 1, &[k(1)], far()).await.unwrap();
        mgr.acquire(2, 2, &[k(2)], far()).await.unwrap();
        let older = spawn_acquire(&mgr, 3, 3, vec![k(1), k(2)]);
        until("3 waits on k1", || mgr.queued(&k(1)) == 1).await;
        let younger = spawn_acquire(&mgr, 4, 4, vec![k(2)]);
        until("4 waits on k2", || mgr.queued(&k(2)) == 1).await;
        mgr.release_txn(1, &[k(1)]);
        // Txn 3 moves to k2, ahead of txn 4 which arrived after it.
        until("3 moves", || mgr.queued(&k(2)) == 2).await;
        assert_eq!(mgr.held_rows(&|key| key == &k(2), 1)[0].waiters, vec![3, 4]);
        mgr.release_txn(2, &[k(2)]);
        assert!(finish(older).await.is_ok());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!younger.is_finished(), "the younger waits for the older");
        mgr.release_txn(3, &[k(1), k(2)]);
        assert!(finish(younger).await.is_ok());
        mgr.check_invariants().unwrap();
    }

    /// Three requests for the same two rows, queued on different ones, all woken at once:
    /// with queues ordered by time of joining, woken requests could chase each other from
    /// queue to queue forever. Each must be granted in turn.
    #[tokio::test]
    async fn woken_requests_do_not_chase_each_other() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(3, 30, &[k(2)], far()).await.unwrap();
        mgr.acquire(4, 40, &[k(4)], far()).await.unwrap();
        let spawn_and_release = |txn: u64, branch: u64| {
            let mgr = mgr.clone();
            tokio::spawn(async move {
                let got = mgr.acquire(txn, branch, &[k(2), k(4)], far()).await;
                tokio::task::yield_now().await;
                mgr.release_txn(txn, &[k(2), k(4)]);
                got
            })
        };
        let a = spawn_and_release(2, 20);
        until("2 waits on k2", || mgr.queued(&k(2)) == 1).await;
        let b = spawn_and_release(3, 31); // holds k2 already: waits on k4
        until("3 waits on k4", || mgr.queued(&k(4)) == 1).await;
        let c = spawn_and_release(1, 10);
        until("1 waits on k2", || mgr.queued(&k(2)) == 2).await;
        mgr.check_invariants().unwrap();
        mgr.release_branch(3, 30, &[k(2)]);
        mgr.release_txn(4, &[k(4)]);
        for task in [a, b, c] {
            assert!(finish(task).await.is_ok());
        }
        assert!(mgr.is_idle());
    }

    /// Granting a row to an older request that passes a younger queued one can close a
    /// cycle without anyone joining a queue.
    #[tokio::test]
    async fn deadlock_closed_by_a_grant() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(9, 9, &[k(1), k(2)], far()).await.unwrap();
        mgr.acquire(2, 2, &[k(3)], far()).await.unwrap();
        let passing = spawn_acquire(&mgr, 1, 11, vec![k(1), k(2)]);
        until("1 waits on k1", || mgr.queued(&k(1)) == 1).await;
        let passed = spawn_acquire(&mgr, 2, 2, vec![k(2)]);
        until("2 waits on k2", || mgr.queued(&k(2)) == 1).await;
        let blocked = spawn_acquire(&mgr, 1, 10, vec![k(3)]);
        until("1 waits on k3", || mgr.queued(&k(3)) == 1).await;
        // Both rows free at once: txn 1's older request runs first and passes txn 2's
        // younger one on k2, after which txn 2 would wait for txn 1 and txn 1 for txn 2.
        mgr.release_txn(9, &[k(1), k(2)]);
        assert!(finish(passing).await.is_ok());
        assert_eq!(finish(passed).await, Err(LockError::Deadlock { cycle: vec![1, 2] }));
        mgr.check_invariants().unwrap();
        mgr.release_txn(2, &[k(3)]);
        assert!(finish(blocked).await.is_ok());
    }

    /// A request that moves goes in ahead of younger ones; if one of those belongs to a
    /// transaction the mover's transaction waits for, that closes a cycle.
    #[tokio::test]
    async fn deadlock_closed_by_a_request_going_in_ahead() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(8, 8, &[k(1)], far()).await.unwrap();
        mgr.acquire(9, 9, &[k(2)], far()).await.unwrap();
        mgr.acquire(2, 2, &[k(3)], far()).await.unwrap();
        let mover = spawn_acquire(&mgr, 1, 11, vec![k(1), k(2)]);
        until("1 waits on k1", || mgr.queued(&k(1)) == 1).await;
        let younger = spawn_acquire(&mgr, 2, 2, vec![k(2)]);
        until("2 waits on k2", || mgr.queued(&k(2)) == 1).await;
        let blocked = spawn_acquire(&mgr, 1, 10, vec![k(3)]);
        until("1 waits on k3", || mgr.queued(&k(3)) == 1).await;
        // Txn 1 moves ahead of txn 2 on k2: 2 would wait for 1, which waits for 2 on k3.
        mgr.release_txn(8, &[k(1)]);
        assert_eq!(finish(younger).await, Err(LockError::Deadlock { cycle: vec![1, 2] }));
        assert_eq!(mgr.queued(&k(2)), 1);
        mgr.check_invariants().unwrap();
        mgr.release_txn(9, &[k(2)]);
        assert!(finish(mover).await.is_ok());
        mgr.release_txn(2, &[k(3)]);
        assert!(finish(blocked).await.is_ok());
    }

    /// The queue entry a request leaves is no edge of the wait-for relation any more.
    #[tokio::test]
    async fn a_moving_request_does_not_deadlock_with_its_old_place() {
        let mgr = Arc::new(LockManager::new());
        mgr.acquire(9, 9, &[k(1)], far()).await.unwrap();
        mgr.acquire(2, 2, &[k(2)], far()).await.unwrap();
        // Somebody waits for txn 1, so deadlock detection does search when it moves.
        mgr.acquire(1, 1, &[k(5)], far()).await.unwrap();
        let bystander = spawn_acquire(&mgr, 3, 3, vec![k(5)]);
        until("3 waits on k5", || mgr.queued(&k(5)) == 1).await;
        let mover = spawn_acquire(&mgr, 1, 1, vec![k(1), k(2)]);
        until("1 waits on k1", || mgr.queued(&k(1)) == 1).await;
        let behind = spawn_acquire(&mgr, 2, 20, vec![k(1)]);
        until("2 waits on k1", || mgr.queued(&k(1)) == 2).await;
        // Txn 1 leaves k1 for k2 (held by 2); txn 2 then no longer waits for txn 1.
        mgr.release_txn(9, &[k(1)]);
        assert!(finish(behind).await.is_ok());
        assert_eq!(mgr.queued(&k(2)), 1);
        mgr.release_txn(2, &[k(1), k(2)]);
        assert!(finish(mover).await.is_ok());
        mgr.check_invariants().unwrap();
        mgr.release_txn(1, &[k(1), k(2), k(5)]);
        assert!(finish(bystander).await.is_ok());
    }

    mod model {
        use std::collections::{BTreeMap, BTreeSet};
        use std::sync::Mutex as StdMutex;

        use proptest::prelude::*;

        use super::*;

        const TXNS: u64 = 4;
        const KEYS: u32 = 5;

        #[derive(Clone, Debug)]
        enum Op {
            /// `wait_ms`: None for a far deadline (the waiter must then end by being granted
            /// or refused, never by timing out).
            Acquire {
                txn: u64,
                branch: u64,
                keys: Vec<u32>,
                wait_ms: Option<u64>,
            },
            Query {
                txn: Option<u64>,
                keys: Vec<u32>,
                wait_ms: Option<u64>,
            },
            ReleaseBranch {
                txn: u64,
                branch: u64,
            },
            ReleaseTxn {
                txn: u64,
            },
            RollBack {
                txn: u64,
            },
            Forget {
                txn: u64,
            },
            Cancel {
                pick: usize,
            },
            Sleep {
                ms: u64,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            let txn = 1..=TXNS;
            let keys = prop::collection::vec(0..KEYS, 1..4);
            let wait = prop::option::weighted(0.3, 1..15u64);
            prop_oneof![
                6 => (txn.clone(), 0..2u64, keys.clone(), wait.clone())
                    .prop_map(|(txn, branch, keys, wait_ms)| Op::Acquire { txn, branch, keys, wait_ms }),
                1 => (prop::option::of(txn.clone()), keys, wait)
                    .prop_map(|(txn, keys, wait_ms)| Op::Query { txn, keys, wait_ms }),
                2 => (txn.clone(), 0..2u64).prop_map(|(txn, branch)| Op::ReleaseBranch { txn, branch }),
                2 => txn.clone().prop_map(|txn| Op::ReleaseTxn { txn }),
                1 => txn.clone().prop_map(|txn| Op::RollBack { txn }),
                1 => txn.prop_map(|txn| Op::Forget { txn }),
                1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
                1 => (1..8u64).prop_map(|ms| Op::Sleep { ms }),
            ]
        }

        #[derive(Default)]
        struct Model {
            /// Who holds each key, with which branches, per the grants the requests saw.
            owners: BTreeMap<LockKey, (u64, BTreeSet<u64>)>,
            ever_rolled_back: BTreeSet<u64>,
            violations: Vec<String>,
        }

        struct Task {
            handle: tokio::task::JoinHandle<()>,
            far: bool,
            deadline: Instant,
        }

        fn all_keys() -> Vec<LockKey> {
            (0..KEYS).map(k).collect()
        }

        /// The outcome of a finished request, checked against the model.
        struct Request {
            what: &'static str,
            txn: Option<u64>,
            /// None for a query.
            branch: Option<u64>,
            /// Sorted, without duplicates.
            keys: Vec<LockKey>,
            deadline: Instant,
            far: bool,
        }

        fn check_outcome(mgr: &LockManager, model: &StdMutex<Model>, req: Request, got: &Result<Granted, LockError>) {
            let Request {
                what,
                txn,
                branch,
                ref keys,
                deadline,
                far,
            } = req;
            let mut m = model.lock().unwrap();
            let now = Instant::now();
            let mut bad = |msg: String| m.violations.push(format!("{what} txn {txn:?} keys {keys:?}: {msg}"));
            match got {
                Ok(_) => {
                    for key in keys {
                        let held = holder(mgr, key);
                        match (branch, txn) {
                            (Some(branch), Some(txn)) => {
                                if !held.as_ref().is_some_and(|(t, bs)| *t == txn && bs.contains(&branch)) {
                                    bad(format!("granted but {key:?} is held as {held:?}"));
                                }
                            }
                            _ => {
                                if let Some((t, _)) = held
                                    && Some(t) != txn
                                {
                                    bad(format!("lockable but {key:?} is held by {t}"));
                                }
                            }
                        }
                    }
                }
                Err(LockError::WaitTimeout { .. }) => {
                    if now < deadline {
                        bad("timed out before its deadline".into());
                    }
                    if far {
                        bad("a far-deadline request timed out".into());
                    }
                }
                Err(LockError::Deadlock { cycle }) => {
                    if branch.is_none() {
                        bad("a query was a deadlock victim".into());
                    }
                    if !cycle.contains(&txn.unwrap_or(0)) || cycle.iter().max() != txn.as_ref() {
                        bad(format!("refused as the victim of {cycle:?}"));
                    }
                }
                Err(LockError::HolderRollingBack { holder, .. }) => {
                    let holder = *holder;
                    if !m.ever_rolled_back.contains(&holder) {
                        m.violations
                            .push(format!("{what}: fail fast against {holder}, never rolling back"));
                    }
                }
            }
            if let (Ok(_), Some(branch), Some(txn)) = (got, branch, txn) {
                for key in keys {
                    let entry = m.owners.entry(key.clone()).or_insert_with(|| (txn, BTreeSet::new()));
                    if entry.0 != txn {
                        let other = entry.0;
                        m.violations
                            .push(format!("{key:?} granted to {txn} while {other} holds it"));
                    } else {
                        entry.1.insert(branch);
                    }
                }
            }
        }

        /// The table must agree with the model built from the grants the requests saw.
        fn check_table(mgr: &LockManager, model: &StdMutex<Model>) -> Result<(), String> {
            mgr.check_invariants()?;
            let m = model.lock().unwrap();
            if !m.violations.is_empty() {
                return Err(m.violations.join("\n"));
            }
            let table: BTreeMap<LockKey, (u64, BTreeSet<u64>)> = mgr
                .held_rows(&|_| true, usize::MAX)
                .into_iter()
                .map(|r| (r.key, (r.txn, r.branches.into_iter().collect())))
                .collect();
            if table != m.owners {
                return Err(format!("table {table:?}\nmodel {:?}", m.owners));
            }
            if mgr.held_count() != table.len() {
                return Err("held_count disagrees with held_rows".into());
            }
            Ok(())
        }

        async fn settle() {
            for _ in 0..30 {
                tokio::task::yield_now().await;
            }
        }

        async fn run(ops: Vec<Op>) -> Result<(), String> {
            let mgr = Arc::new(LockManager::new());
            let model = Arc::new(StdMutex::new(Model::default()));
            let mut tasks: Vec<Task> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire {
                        txn,
                        branch,
                        keys,
                        wait_ms,
                    } => {
                        let keys: Vec<LockKey> = keys.into_iter().map(k).collect();
                        let far = wait_ms.is_none();
                        let deadline = Instant::now() + Duration::from_millis(wait_ms.unwrap_or(30_000));
                        let (mgr, model) = (mgr.clone(), model.clone());
                        let handle = tokio::spawn(async move {
                            let got = mgr.acquire(txn, branch, &keys, deadline).await;
                            let mut keys = keys;
                            keys.sort();
                            keys.dedup();
                            let req = Request {
                                what: "acquire",
                                txn: Some(txn),
                                branch: Some(branch),
                                keys,
                                deadline,
                                far,
                            };
                            check_outcome(&mgr, &model, req, &got);
                        });
                        tasks.push(Task { handle, far, deadline });
                    }
                    Op::Query { txn, keys, wait_ms } => {
                        let keys: Vec<LockKey> = keys.into_iter().map(k).collect();
                        let far = wait_ms.is_none();
                        let deadline = Instant::now() + Duration::from_millis(wait_ms.unwrap_or(30_000));
                        let (mgr, model) = (mgr.clone(), model.clone());
                        let handle = tokio::spawn(async move {
                            let got = mgr.query(txn, &keys, deadline).await;
                            let req = Request {
                                what: "query",
                                txn,
                                branch: None,
                                keys,
                                deadline,
                                far,
                            };
                            check_outcome(&mgr, &model, req, &got);
                        });
                        tasks.push(Task { handle, far, deadline });
                    }
                    Op::ReleaseBranch { txn, branch } => {
                        mgr.release_branch(txn, branch, &all_keys());
                        let mut m = model.lock().unwrap();
                        m.owners.retain(|_, (t, bs)| {
                            if *t == txn {
                                bs.remove(&branch);
                            }
                            !bs.is_empty()
                        });
                    }
                    Op::ReleaseTxn { txn } => {
                        mgr.release_txn(txn, &all_keys());
                        model.lock().unwrap().owners.retain(|_, (t, _)| *t != txn);
                    }
                    Op::RollBack { txn } => {
                        model.lock().unwrap().ever_rolled_back.insert(txn);
                        mgr.set_rolling_back(txn);
                    }
                    Op::Forget { txn } => mgr.forget_txn(txn),
                    Op::Cancel { pick } => {
                        if !tasks.is_empty() {
                            let n = tasks.len();
                            tasks[pick % n].handle.abort();
                        }
                    }
                    Op::Sleep { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
                }
                settle().await;
                check_table(&mgr, &model)?;
            }

            // Every short-deadline request ends by its deadline (with some slack for a busy
            // machine).
            let last = tasks.iter().filter(|t| !t.far).map(|t| t.deadline).max();
            if let Some(last) = last {
                tokio::time::sleep_until(last + Duration::from_millis(5)).await;
                settle().await;
                let slack = Instant::now() + Duration::from_secs(2);
                while tasks.iter().any(|t| !t.far && !t.handle.is_finished()) {
                    if Instant::now() > slack {
                        return Err("a request outlived its deadline".into());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                check_table(&mgr, &model)?;
            }

            // Releasing everything must let every far-deadline request end, long before its
            // deadline: nobody is stuck.
            for _ in 0..200 {
                if tasks.iter().all(|t| t.handle.is_finished()) {
                    break;
                }
                for txn in 1..=TXNS {
                    mgr.release_txn(txn, &all_keys());
                    mgr.forget_txn(txn);
                    model.lock().unwrap().owners.retain(|_, (t, _)| *t != txn);
                }
                settle().await;
                check_table(&mgr, &model)?;
            }
            if !tasks.iter().all(|t| t.handle.is_finished()) {
                return Err("a waiter is stuck after every lock was released".into());
            }
            for txn in 1..=TXNS {
                mgr.release_txn(txn, &all_keys());
            }
            if !mgr.is_idle() {
                return Err("the table is not empty after everything ended".into());
            }
            let m = model.lock().unwrap();
            if !m.violations.is_empty() {
                return Err(m.violations.join("\n"));
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn random_operations_keep_the_invariants(ops in prop::collection::vec(op(), 1..40)) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let result = rt.block_on(run(ops));
                prop_assert!(result.is_ok(), "{}", result.unwrap_err());
            }
        }
    }
}
