//! Things waiting, each with a deadline: outbound handshakes waiting for an answer (past the
//! deadline they are timeouts), recent successes that a reset before any reply may still turn
//! into failures, DNS queries waiting for their answer.
//!
//! Pure and clock-injected: every call takes times in CLOCK_MONOTONIC nanoseconds.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    hash::Hash,
};

use resil_common::maps::ConnKey;

/// Keys with a deadline and a payload, bounded in number.
#[derive(Debug)]
pub struct Deadlines<K, T> {
    capacity: usize,
    entries: HashMap<K, (u64, T)>,
    /// (deadline, key); entries settled or restarted since are skipped lazily.
    queue: BinaryHeap<Reverse<(u64, K)>>,
    /// Entries refused because the table was full.
    pub overflowed: u64,
}

/// Connections with a deadline.
pub type ConnDeadlines<T> = Deadlines<ConnKey, T>;

impl<K: Copy + Ord + Hash, T> Deadlines<K, T> {
    /// An empty table holding at most `capacity` connections.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            queue: BinaryHeap::new(),
            overflowed: 0,
        }
    }

    /// Connections waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Starts waiting for `key` until `deadline_ns` (replacing an earlier wait for it).
    /// Returns false, and counts an overflow, when the table is full.
    pub fn insert(&mut self, key: K, deadline_ns: u64, payload: T) -> bool {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.overflowed += 1;
            return false;
        }
        self.entries.insert(key, (deadline_ns, payload));
        self.queue.push(Reverse((deadline_ns, key)));
        if self.queue.len() > 2 * self.capacity {
            // Settled entries' stale deadlines: drop them so the heap stays bounded.
            let entries = &self.entries;
            self.queue
                .retain(|Reverse((d, k))| entries.get(k).is_some_and(|(dl, _)| dl == d));
        }
        true
    }

    /// Stops waiting for `key`; its payload if it was waiting.
    pub fn remove(&mut self, key: &K) -> Option<T> {
        self.entries.remove(key).map(|(_, payload)| payload)
    }

    /// Removes and returns every connection whose deadline is at or before `now_ns`.
    pub fn expire(&mut self, now_ns: u64) -> Vec<(K, T)> {
        let mut expired = Vec::new();
        while let Some(&Reverse((deadline, key))) = self.queue.peek() {
            if deadline > now_ns {
                break;
            }
            self.queue.pop();
            // Only if still waiting with this very deadline (not settled, not restarted).
            if self.entries.get(&key).is_some_and(|(d, _)| *d == deadline) {
                if let Some((_, payload)) = self.entries.remove(&key) {
                    expired.push((key, payload));
                }
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn key(port: u16) -> ConnKey {
        ConnKey {
            local_port: port,
            remote_port: 80,
            ..ConnKey::default()
        }
    }

    #[test]
    fn removed_entries_never_expire() {
        let mut t = ConnDeadlines::new(10);
        t.insert(key(1), 1000 * MS, "a");
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(&key(1)), Some("a"));
        assert!(t.is_empty());
        assert!(t.expire(10_000 * MS).is_empty());
    }

    #[test]
    fn deadline_is_inclusive_and_exact() {
        let mut t = ConnDeadlines::new(10);
        t.insert(key(1), 1100 * MS, ());
        assert!(t.expire(1100 * MS - 1).is_empty());
        assert_eq!(t.expire(1100 * MS).len(), 1);
        assert!(t.expire(5000 * MS).is_empty(), "expires once");
        assert_eq!(t.remove(&key(1)), None, "a late answer settles nothing");
    }

    #[test]
    fn deadlines_may_differ_per_entry() {
        let mut t = ConnDeadlines::new(10);
        t.insert(key(1), 3000 * MS, 1);
        t.insert(key(2), 500 * MS, 2);
        assert_eq!(t.expire(1000 * MS), vec![(key(2), 2)]);
        assert_eq!(t.expire(3000 * MS), vec![(key(1), 1)]);
    }

    #[test]
    fn a_restarted_entry_uses_its_new_deadline() {
        let mut t = ConnDeadlines::new(10);
        t.insert(key(1), 1000 * MS, 1);
        t.insert(key(1), 1800 * MS, 2);
        assert!(t.expire(1000 * MS).is_empty());
        assert_eq!(t.expire(1800 * MS), vec![(key(1), 2)]);
    }

    #[test]
    fn capacity_is_bounded() {
        let mut t = ConnDeadlines::new(2);
        for port in 0..5 {
            t.insert(key(port), 0, ());
        }
        assert_eq!(t.len(), 2);
        assert_eq!(t.overflowed, 3);
    }

    #[test]
    fn settled_entries_do_not_pile_up() {
        let mut t = ConnDeadlines::new(4);
        for i in 0..1000u64 {
            t.insert(key(1), u64::MAX - i, ());
            t.remove(&key(1));
        }
        assert!(t.queue.len() <= 9);
    }
}
