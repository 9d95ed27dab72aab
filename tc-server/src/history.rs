//! Finished transactions: what is kept of each after it ended (final status, branch count,
//! first failure, its timeline), oldest first, so that a client whose `COMMIT GLOBAL` lost
//! its answer can still learn the outcome, and an operator what happened, after a restart
//! too. The same records are in the store; the
//! coordinator trims both by count and age (`[transactions] finished_history`,
//! `finished_retention_ms`).

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::model::FinishedRecord;
use crate::timeline::{Event, Timeline};

#[derive(Default)]
pub struct History {
    /// Txn ids in the order they ended.
    order: VecDeque<u64>,
    records: HashMap<u64, FinishedRecord>,
    timelines: HashMap<u64, Timeline>,
}

impl History {
    /// The history the store held, in the order the transactions ended, with the timelines
    /// of those transactions taken out of `events`.
    pub fn restore(mut records: Vec<FinishedRecord>, events: &mut BTreeMap<u64, Vec<Event>>) -> History {
        records.sort_by_key(|f| (f.record.updated_ms, f.record.txn_id));
        let mut history = History::default();
        for f in records {
            let timeline = Timeline::restore(events.remove(&f.record.txn_id).unwrap_or_default());
            history.insert(f, timeline);
        }
        history
    }

    pub fn insert(&mut self, f: FinishedRecord, timeline: Timeline) {
        let txn_id = f.record.txn_id;
        self.timelines.insert(txn_id, timeline);
        if self.records.insert(txn_id, f).is_none() {
            self.order.push_back(txn_id);
        }
    }

    pub fn get(&self, txn_id: u64) -> Option<&FinishedRecord> {
        self.records.get(&txn_id)
    }

    pub fn timeline(&self, txn_id: u64) -> Option<&Timeline> {
        self.timelines.get(&txn_id)
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
            self.timelines.remove(&oldest);
            dropped.push(oldest);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl History {
        fn insert_plain(&mut self, f: FinishedRecord) {
            self.insert(f, Timeline::default());
        }
    }
    use crate::model::GlobalStatus;
    use crate::store::fixtures::finished;

    fn ended_at(txn_id: u64, ms: u64) -> FinishedRecord {
        let mut f = finished(txn_id, GlobalStatus::Committed);
        f.record.updated_ms = ms;
        f
    }

    fn started(version: u64) -> Event {
        Event {
            version,
            at_ms: 0,
            kind: crate::timeline::EventKind::Begun {
                name: String::new(),
                timeout_ms: 1,
            },
        }
    }

    fn ids(h: &History) -> Vec<u64> {
        h.iter().map(|f| f.record.txn_id).collect()
    }

    #[test]
    fn restore_orders_by_end_time_not_id() {
        let mut events = BTreeMap::from([(3, vec![started(5)]), (9, vec![started(1)])]);
        let h = History::restore(vec![ended_at(1, 300), ended_at(2, 100), ended_at(3, 200)], &mut events);
        assert_eq!(ids(&h), vec![2, 3, 1]);
        assert_eq!(h.get(1).unwrap().record.updated_ms, 300);
        assert!(h.get(4).is_none());
        assert_eq!(h.timeline(3).unwrap().version(), 5);
        assert_eq!(h.timeline(1).unwrap().version(), 0);
        assert_eq!(
            events.keys().collect::<Vec<_>>(),
            [&9],
            "live transactions' timelines are left"
        );
    }

    #[test]
    fn trim_by_count_drops_the_oldest() {
        let mut h = History::default();
        for id in 1..=5 {
            h.insert_plain(ended_at(id, 1000 + id));
        }
        assert_eq!(h.trim(3, u64::MAX, 2000), vec![1, 2]);
        assert_eq!(ids(&h), vec![3, 4, 5]);
        assert!(h.timeline(1).is_none() && h.timeline(3).is_some());
        assert_eq!(h.trim(3, u64::MAX, 2000), Vec::<u64>::new());
        assert_eq!(h.trim(0, u64::MAX, 2000), vec![3, 4, 5]);
        assert!(h.is_empty());
    }

    #[test]
    fn trim_by_age_keeps_what_is_younger_than_the_retention() {
        let mut h = History::default();
        h.insert_plain(ended_at(1, 1_000));
        h.insert_plain(ended_at(2, 5_000));
        h.insert_plain(ended_at(3, 9_000));
        // At 10_000 with 5_000 ms retention: 1 is 9 s old, 2 exactly 5 s (gone), 3 is 1 s.
        assert_eq!(h.trim(100, 5_000, 10_000), vec![1, 2]);
        assert_eq!(ids(&h), vec![3]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn a_record_inserted_twice_is_listed_once() {
        let mut h = History::default();
        h.insert_plain(ended_at(1, 10));
        h.insert_plain(ended_at(1, 20));
        assert_eq!(ids(&h), vec![1]);
        assert_eq!(h.get(1).unwrap().record.updated_ms, 20);
    }
}
