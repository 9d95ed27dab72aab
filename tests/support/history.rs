//! The coordinator's etcd store as a recorded history: every revision etcd made under the
//! prefix, read back with a watch from the first one after a fault run, and checked:
//!
//! * every revision that changed records carries its writer's epoch (`meta/writer`, which
//!   every fenced write puts), and that epoch is the owner key's at that revision, the owner
//!   of the area written (the whole store, or with several serving nodes one node's
//!   namespace `ns/<n>/`): no write skipped the fence, and no node wrote after another took
//!   its area over;
//! * a write fenced by the lock leader's epoch (a registration whose rows it granted, the
//!   stamp's `lock=<epoch>`) landed while that leader led: no registration granted by a
//!   former leader was stored after a new one rebuilt the locks;
//! * at no revision does a row belong to two transactions' stored branches as a takeover
//!   would restore them (the rows of branches that hold locks, of transactions that hold
//!   locks): no row was granted to two unfinished transactions at once, as far as anything
//!   durable shows.
//!
//! It also counts what happened: owners and lock leaders, and adoptions (a namespace owned
//! by another node than its own).
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
    /// The owners' epochs, in the order they owned their areas (every area's).
    pub epochs: Vec<i64>,
    /// The lock leaders' epochs, in the order they led.
    pub lock_epochs: Vec<i64>,
    /// Times a node owned another node's namespace (adopted it while that node was down).
    pub adoptions: u64,
    /// Writes fenced by a lock leader's epoch.
    pub lock_fenced: u64,
    /// The most rows held at once.
    pub most_rows_held: usize,
}

/// One revision's events, as they are gathered.
struct Revision {
    number: i64,
    /// The area its writer stamped (`None`: the whole store), its epoch, and the lock
    /// leader epochs it was fenced by.
    writer: Option<(Option<u16>, i64, Vec<i64>)>,
    /// The area whose records it changed, if it changed any (not only owner keys).
    changed: Option<Option<u16>>,
}

/// The store's state as of one revision: what the checks need.
#[derive(Default)]
struct State {
    /// Each area's owner key's create revision, while it exists (`None`: the whole store's).
    owners: HashMap<Option<u16>, i64>,
    /// The lock leader key's create revision, while it exists.
    lock_owner: Option<i64>,
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
                    changed: None,
                });
                let key = kv
                    .key()
                    .strip_prefix(prefix.as_bytes())
                    .context("a key outside the prefix")?;
                let (area, key) = area_of(key)?;
                let parsed = StoredKey::parse(key)
                    .with_context(|| format!("the unknown key {:?}", String::from_utf8_lossy(key)))?;
                let put = event.event_type() == EventType::Put;
                match parsed {
                    StoredKey::Owner if put => {
                        state.owners.insert(area, kv.create_revision());
                        history.epochs.push(kv.create_revision());
                        // A namespace's owner key describes the node that owns it.
                        if let Some(n) = area {
                            let owner: serde_json::Value = serde_json::from_slice(kv.value())?;
                            if owner["node_id"] != n {
                                history.adoptions += 1;
                            }
                        }
                    }
                    StoredKey::Owner => {
                        state.owners.remove(&area);
                    }
                    StoredKey::LockLeader if put => {
                        state.lock_owner = Some(kv.create_revision());
                        history.lock_epochs.push(kv.create_revision());
                    }
                    StoredKey::LockLeader => state.lock_owner = None,
                    // Which nodes are up and which namespaces exist: written by campaigns,
                    // not by owners, and no records.
                    StoredKey::NodeUp { .. } | StoredKey::NamespaceOf { .. } => {}
                    StoredKey::Writer => *writer = Some(parse_stamp(area, kv.value())?),
                    StoredKey::Global(txn) => {
                        *changed = Some(area);
                        if put {
                            state.globals.insert(txn, read_global(&"etcd", kv.value())?.status);
                        } else {
                            state.globals.remove(&txn);
                        }
                    }
                    StoredKey::Branch { txn, branch } => {
                        *changed = Some(area);
                        if put {
                            let record = read_branch(&"etcd", kv.value())?;
                            state.branches.insert((txn, branch), (record.status, record.lock_keys));
                        } else {
                            state.branches.remove(&(txn, branch));
                        }
                    }
                    _ => *changed = Some(area),
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
    let Some(area) = changed else {
        return Ok(());
    };
    history.writes += 1;
    let Some((stamped, writer, lock_epochs)) = writer else {
        bail!("revision {revision} changed records without a writer's epoch: a write skipped the fence");
    };
    if stamped != area {
        bail!("revision {revision} changed records of area {area:?} and stamped area {stamped:?}");
    }
    let owner = state.owners.get(&area).copied();
    if owner != Some(writer) {
        bail!(
            "revision {revision} was written under epoch {writer} while the owner's epoch of area {area:?} was {owner:?}: a stale write"
        );
    }
    for lock_epoch in &lock_epochs {
        if state.lock_owner != Some(*lock_epoch) {
            bail!(
                "revision {revision} stored a registration whose rows the lock leader of epoch {lock_epoch} granted, while the leader's epoch was {:?}",
                state.lock_owner
            );
        }
    }
    if !lock_epochs.is_empty() {
        history.lock_fenced += 1;
    }
    let rows = state.rows().with_context(|| format!("at revision {revision}"))?;
    history.most_rows_held = history.most_rows_held.max(rows.len());
    Ok(())
}

/// The area a key (without the prefix) belongs to, and the key within it.
fn area_of(key: &[u8]) -> Result<(Option<u16>, &[u8])> {
    let Some(rest) = key.strip_prefix(b"ns/") else {
        return Ok((None, key));
    };
    let text = std::str::from_utf8(rest.get(..4).context("a namespace key too short")?)?;
    let n = u16::from_str_radix(text, 16).with_context(|| format!("the namespace {text:?}"))?;
    let inner = rest
        .get(4..)
        .and_then(|r| r.strip_prefix(b"/"))
        .context("a namespace key without its slash")?;
    Ok((Some(n), inner))
}

/// A writer's stamp (`ferrata_tc::store::etcd::writer_stamp`): its epoch and the lock
/// leader epochs it was fenced by.
fn parse_stamp(area: Option<u16>, value: &[u8]) -> Result<(Option<u16>, i64, Vec<i64>)> {
    let text = std::str::from_utf8(value)?;
    let mut parts = text.split(' ');
    let epoch = parts.next().unwrap_or_default().parse()?;
    let lock_epochs = parts
        .map(|p| {
            p.strip_prefix("lock=")
                .with_context(|| format!("the stamp {text:?}"))?
                .parse()
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    Ok((area, epoch, lock_epochs))
}
