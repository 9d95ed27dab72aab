//! The coordinator's etcd store as a recorded history: every revision etcd made under the
//! prefix, read back with a watch from the first one after a fault run, and checked:
//!
//! * every revision that changed records carries its writer's epoch (`meta/writer`, which
//!   every fenced write puts), and that epoch is the owner key's at that revision: no
//!   write skipped the fence, and no node wrote after another took the store over;
//! * at no revision does a row belong to two transactions' stored branches as a takeover
//!   would restore them (the rows of branches that hold locks, of transactions that hold
//!   locks): no row was granted to two unfinished transactions at once, as far as anything
//!   durable shows.
//!
//! Records are read with the coordinator's own key layout and decoders
//! (`ferrata_tc::store::etcd::StoredKey`, `ferrata_tc::store::record`).

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use ferrata_tc::lock_key::LockKey;
use ferrata_tc::model::{BranchStatus, GlobalStatus};
use ferrata_tc::store::etcd::StoredKey;
use ferrata_tc::store::record::{read_branch, read_global};
use ferrata_tc::xid::format_xid;

use crate::EVENT;

/// What the check went through, for the test's report.
#[derive(Debug, Default)]
pub struct StoreHistory {
    /// Revisions under the prefix.
    pub revisions: u64,
    /// Of them, the ones that changed records (each one etcd transaction of a journal batch).
    pub writes: u64,
    /// The owners' epochs, in the order they owned the store.
    pub epochs: Vec<i64>,
    /// The most rows held at once.
    pub most_rows_held: usize,
}

/// One revision's events, as they are gathered.
struct Revision {
    number: i64,
    /// The epoch its writer stamped, if any.
    writer: Option<i64>,
    /// Whether it changed records (not only the owner key).
    changed: bool,
}

/// The store's state as of one revision: what the checks need.
#[derive(Default)]
struct State {
    /// The owner key's create revision, while it exists.
    owner: Option<i64>,
    globals: HashMap<u64, GlobalStatus>,
    branches: BTreeMap<(u64, u64), (BranchStatus, Vec<LockKey>)>,
}

impl State {
    /// Each row held, by the transaction holding it; fails on a row two hold.
    fn rows(&self) -> Result<BTreeMap<&LockKey, u64>> {
        let mut rows = BTreeMap::new();
        for ((txn, branch), (status, keys)) in &self.branches {
            let holds = self.globals.get(txn).is_some_and(|g| g.holds_locks()) && status.holds_locks();
            if !holds {
                continue;
            }
            for key in keys {
                if let Some(other) = rows.insert(key, *txn)
                    && other != *txn
                {
                    let p = key.parts();
                    bail!(
                        "a row of {}.{} on {} is held by transactions {} and {} (branch {branch}) at once",
                        p.schema,
                        p.table,
                        p.resource,
                        format_xid(other),
                        format_xid(*txn)
                    );
                }
            }
        }
        Ok(rows)
    }
}

/// Reads the history of the store under `prefix` on the etcd cluster at `endpoints` and
/// checks it (see the module comment). The cluster must hold nothing else: the history is
/// read up to the cluster's current revision.
pub async fn check_store_history(endpoints: &[String], prefix: &str) -> Result<StoreHistory> {
    let mut client = Client::connect(endpoints, None).await.context("connecting to etcd")?;
    let last = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only().with_limit(1)),
        )
        .await?
        .header()
        .map_or(0, |h| h.revision());
    // A watch that starts far behind gets up to a thousand revisions per answer.
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(256 << 20)
        .watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(1)))
        .await?;
    let mut history = StoreHistory::default();
    let mut state = State::default();
    let mut current: Option<Revision> = None;
    let read = async {
        while current.as_ref().is_none_or(|r| r.number < last) {
            let Some(response) = stream.message().await? else {
                bail!("the watch ended before revision {last}");
            };
            for event in response.events() {
                let kv = event.kv().context("an event without its key")?;
                let revision = kv.mod_revision();
                if current.as_ref().is_some_and(|r| r.number != revision) {
                    end_revision(&mut history, &state, current.take().expect("checked"))?;
                }
                let Revision { writer, changed, .. } = current.get_or_insert(Revision {
                    number: revision,
                    writer: None,
                    changed: false,
                });
                let key = kv
                    .key()
                    .strip_prefix(prefix.as_bytes())
                    .context("a key outside the prefix")?;
                let parsed = StoredKey::parse(key)
                    .with_context(|| format!("the unknown key {:?}", String::from_utf8_lossy(key)))?;
                let put = event.event_type() == EventType::Put;
                match parsed {
                    StoredKey::Owner if put => {
                        state.owner = Some(kv.create_revision());
                        history.epochs.push(kv.create_revision());
                    }
                    StoredKey::Owner => state.owner = None,
                    StoredKey::Writer => *writer = Some(std::str::from_utf8(kv.value())?.parse()?),
                    StoredKey::Global(txn) => {
                        *changed = true;
                        if put {
                            state.globals.insert(txn, read_global(&"etcd", kv.value())?.status);
                        } else {
                            state.globals.remove(&txn);
                        }
                    }
                    StoredKey::Branch { txn, branch } => {
                        *changed = true;
                        if put {
                            let record = read_branch(&"etcd", kv.value())?;
                            state.branches.insert((txn, branch), (record.status, record.lock_keys));
                        } else {
                            state.branches.remove(&(txn, branch));
                        }
                    }
                    _ => *changed = true,
                }
            }
        }
        if let Some(revision) = current.take() {
            end_revision(&mut history, &state, revision)?;
        }
        Ok(())
    };
    let limit = 3 * EVENT;
    tokio::time::timeout(limit, read)
        .await
        .with_context(|| format!("reading etcd's history up to revision {last} took over {limit:?}"))??;
    Ok(history)
}

/// Checks the state as of a revision whose events were all applied.
fn end_revision(history: &mut StoreHistory, state: &State, revision: Revision) -> Result<()> {
    let Revision {
        number: revision,
        writer,
        changed,
    } = revision;
    history.revisions += 1;
    if !changed {
        return Ok(());
    }
    history.writes += 1;
    let Some(writer) = writer else {
        bail!("revision {revision} changed records without a writer's epoch: a write skipped the fence");
    };
    if state.owner != Some(writer) {
        bail!(
            "revision {revision} was written under epoch {writer} while the owner's epoch was {:?}: a stale write",
            state.owner
        );
    }
    let rows = state.rows().with_context(|| format!("at revision {revision}"))?;
    history.most_rows_held = history.most_rows_held.max(rows.len());
    Ok(())
}
