//! Finished transactions: what is kept of each after it ended (final status, branch count,
//! first failure), oldest first, so that a client whose `COMMIT GLOBAL` lost its answer can
//! still learn the outcome, after a restart too. The same records are in the store; the
//! coordinator trims both by count and age (`[transactions] finished_history`,
//! `finished_retention_ms`).

use std::collections::{HashMap, VecDeque};

use crate::model::FinishedRecord;

#[derive(Default)]
pub struct History {
    /// Txn ids in the order they ended.
    order: VecDeque<u64>,
    records: HashMap<u64, FinishedRecord>,
}

impl History {
    /// The history the store held, in the order the transactions ended.
    pub fn restore(mut records: Vec<FinishedRecord>) -> History {
        records.sort_by_key(|f| (f.record.updated_ms, f.record.txn_id));
        let mut history = History::default();
        for f in records {
            history.insert(f);
        }
        history
    }

    pub fn insert(&mut self, f: FinishedRecord) {
        let txn_id = f.record.txn_id;
        if self.records.insert(txn_id, f).is_none() {
            self.order.push_back(txn_id);
        }
    }

    pub fn get(&self, txn_id: u64) -> Option<&FinishedRecord> {
        self.records.get(&txn_id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &FinishedRecord> {
        self.order.iter().map(|id| &self.records[id])
    }

    /// Drops the oldest records until at most `keep` remain and none ended `max_age_ms`
    /// or longer before `now_ms`; returns the txn ids dropped, for the store.
    pub fn trim(&mut self, keep: usize, max_age_ms: u64, now_ms: u64) -> Vec<u64> {
        let mut dropped = Vec::new();
        while let Some(&oldest) = self.order.front() {
            let ended = self.records[&oldest].record.updated_ms;
            if self.order.len() <= keep && ended.saturating_add(max_age_ms) > now_ms {
                break;
            }
            self.order.pop_front();
            self.records.remove(&oldest);
            dropped.push(oldest);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GlobalStatus;
    use crate::store::fixtures::finished;

    fn ended_at(txn_id: u64, ms: u64) -> FinishedRecord {
        let mut f = finished(txn_id, GlobalStatus::Committed);
        f.record.updated_ms = ms;
        f
    }

    fn ids(h: &History) -> Vec<u64> {
        h.iter().map(|f| f.record.txn_id).collect()
    }

    #[test]
    fn restore_orders_by_end_time_not_id() {
        let h = History::restore(vec![ended_at(1, 300), ended_at(2, 100), ended_at(3, 200)]);
        assert_eq!(ids(&h), vec![2, 3, 1]);
        assert_eq!(h.get(1).unwrap().record.updated_ms, 300);
        assert!(h.get(4).is_none());
    }

    #[test]
    fn trim_by_count_drops_the_oldest() {
        let mut h = History::default();
        for id in 1..=5 {
            h.insert(ended_at(id, 1000 + id));
        }
        assert_eq!(h.trim(3, u64::MAX, 2000), vec![1, 2]);
        assert_eq!(ids(&h), vec![3, 4, 5]);
        assert_eq!(h.trim(3, u64::MAX, 2000), Vec::<u64>::new());
        assert_eq!(h.trim(0, u64::MAX, 2000), vec![3, 4, 5]);
        assert!(h.is_empty());
    }

    #[test]
    fn trim_by_age_keeps_what_is_younger_than_the_retention() {
        let mut h = History::default();
        h.insert(ended_at(1, 1_000));
        h.insert(ended_at(2, 5_000));
        h.insert(ended_at(3, 9_000));
        // At 10_000 with 5_000 ms retention: 1 is 9 s old, 2 exactly 5 s (gone), 3 is 1 s.
        assert_eq!(h.trim(100, 5_000, 10_000), vec![1, 2]);
        assert_eq!(ids(&h), vec![3]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn a_record_inserted_twice_is_listed_once() {
        let mut h = History::default();
        h.insert(ended_at(1, 10));
        h.insert(ended_at(1, 20));
        assert_eq!(ids(&h), vec![1]);
        assert_eq!(h.get(1).unwrap().record.updated_ms, 20);
    }
}
