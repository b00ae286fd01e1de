//! Outbound handshakes in flight, from the kernel's handshake events: each one ends with an
//! outcome, or as a timeout when nothing answers within the connect timeout.
//!
//! Pure and clock-injected: every call takes "now" in CLOCK_MONOTONIC nanoseconds.

use std::collections::{HashMap, VecDeque};

use resil_common::maps::{ConnKey, HandshakeEvent, HandshakeKind};

/// How one connection attempt ended, as the breaker will see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handshake completed, in this many nanoseconds.
    Established { latency_ns: u64 },
    /// The endpoint answered the SYN with a RST.
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// ICMP destination unreachable.
    Unreachable,
    /// Reset by the peer before it sent any data.
    ResetBeforeReply,
}

/// Pending handshakes, bounded in number.
#[derive(Debug)]
pub struct HandshakeTracker {
    timeout_ns: u64,
    capacity: usize,
    pending: HashMap<ConnKey, u64>,
    /// Start times in arrival order; entries already resolved are skipped lazily.
    order: VecDeque<(u64, ConnKey)>,
    /// Handshakes dropped because the table was full.
    pub overflowed: u64,
}

impl HandshakeTracker {
    /// A tracker that times handshakes out after `timeout_ns` and holds at most `capacity`.
    pub fn new(timeout_ns: u64, capacity: usize) -> Self {
        Self {
            timeout_ns,
            capacity,
            pending: HashMap::new(),
            order: VecDeque::new(),
            overflowed: 0,
        }
    }

    /// Changes the timeout for handshakes not yet expired.
    pub fn set_timeout_ns(&mut self, timeout_ns: u64) {
        self.timeout_ns = timeout_ns;
    }

    /// Handshakes in flight.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Feeds one kernel event; returns the outcome it settles, if any. An outcome for a
    /// handshake already timed out (or never seen starting) still counts: the kernel saw it.
    pub fn on_event(&mut self, event: &HandshakeEvent) -> Option<(ConnKey, Outcome)> {
        let kind = HandshakeKind::from_u8(event.kind)?;
        let key = event.conn;
        let outcome = match kind {
            HandshakeKind::Started => {
                if self.pending.len() >= self.capacity && !self.pending.contains_key(&key) {
                    self.overflowed += 1;
                    return None;
                }
                self.pending.insert(key, event.ts_ns);
                self.order.push_back((event.ts_ns, key));
                return None;
            }
            HandshakeKind::Established => Outcome::Established {
                latency_ns: event.latency_ns,
            },
            HandshakeKind::Refused => Outcome::Refused,
            HandshakeKind::Unreachable => Outcome::Unreachable,
            HandshakeKind::ResetBeforeReply => return Some((key, Outcome::ResetBeforeReply)),
        };
        // A late answer to a handshake already counted as a timeout settles nothing new.
        self.pending.remove(&key).map(|_| (key, outcome))
    }

    /// Removes and returns every handshake started at least the timeout before `now_ns`.
    pub fn expire(&mut self, now_ns: u64) -> Vec<ConnKey> {
        let mut expired = Vec::new();
        while let Some(&(started, key)) = self.order.front() {
            if now_ns.saturating_sub(started) < self.timeout_ns {
                break;
            }
            self.order.pop_front();
            // Only if still pending with this very start (not resolved, not restarted later).
            if self.pending.get(&key) == Some(&started) {
                self.pending.remove(&key);
                expired.push(key);
            }
        }
        // Keep the queue from growing with resolved entries when nothing expires for long.
        if self.order.len() > 2 * self.capacity.max(1) {
            let pending = &self.pending;
            self.order.retain(|(t, k)| pending.get(k) == Some(t));
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn event(port: u16, kind: HandshakeKind, ts_ns: u64) -> HandshakeEvent {
        HandshakeEvent {
            ts_ns,
            latency_ns: 5,
            conn: ConnKey {
                local_port: port,
                remote_port: 80,
                ..ConnKey::default()
            },
            kind: kind as u8,
            _pad: [0; 7],
        }
    }

    #[test]
    fn outcomes_settle_pending_handshakes() {
        let mut t = HandshakeTracker::new(1000 * MS, 10);
        assert_eq!(t.on_event(&event(1, HandshakeKind::Started, 0)), None);
        assert_eq!(t.pending(), 1);
        let (_, outcome) = t
            .on_event(&event(1, HandshakeKind::Established, MS))
            .unwrap();
        assert_eq!(outcome, Outcome::Established { latency_ns: 5 });
        assert_eq!(t.pending(), 0);
        assert!(t.expire(10_000 * MS).is_empty());
    }

    #[test]
    fn timeout_boundary_is_inclusive_and_exact() {
        let mut t = HandshakeTracker::new(1000 * MS, 10);
        t.on_event(&event(1, HandshakeKind::Started, 100 * MS));
        assert!(t.expire(1099 * MS).is_empty());
        assert_eq!(t.expire(1100 * MS).len(), 1);
        assert!(t.expire(5000 * MS).is_empty(), "expires once");
        // The late answer does not settle it again.
        assert_eq!(
            t.on_event(&event(1, HandshakeKind::Established, 3000 * MS)),
            None
        );
    }

    #[test]
    fn a_restarted_tuple_uses_its_new_start() {
        let mut t = HandshakeTracker::new(1000 * MS, 10);
        t.on_event(&event(1, HandshakeKind::Started, 0));
        t.on_event(&event(1, HandshakeKind::Started, 800 * MS));
        assert!(t.expire(1000 * MS).is_empty());
        assert_eq!(t.expire(1800 * MS).len(), 1);
    }

    #[test]
    fn capacity_is_bounded() {
        let mut t = HandshakeTracker::new(1000 * MS, 2);
        for port in 0..5 {
            t.on_event(&event(port, HandshakeKind::Started, 0));
        }
        assert_eq!(t.pending(), 2);
        assert_eq!(t.overflowed, 3);
    }

    #[test]
    fn resolved_entries_do_not_pile_up() {
        let mut t = HandshakeTracker::new(u64::MAX, 4);
        for i in 0..1000u64 {
            t.on_event(&event(1, HandshakeKind::Started, i));
            t.on_event(&event(1, HandshakeKind::Refused, i));
            t.expire(i);
        }
        assert!(t.order.len() <= 9);
    }
}
