//! The daemon's bounded event history: breaker transitions, and findings as they start and
//! end, each numbered so `resil events --follow` can ask for what came after the last it saw.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::{api::TransitionEvent, findings::Finding};

/// Events kept; older ones make room.
pub const CAPACITY: usize = 4096;

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A breaker changed state.
    Transition(TransitionEvent),
    /// A finding began.
    FindingStarted(Finding),
    /// A finding's condition cleared.
    FindingEnded(Finding),
    /// resil began answering new connections to a local service with a RST.
    SheddingStarted(Shedding),
    /// … and stopped.
    SheddingEnded(Shedding),
}

/// A local service being shed, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shedding {
    /// `10.0.0.2:8080`.
    pub service: String,
    pub reason: String,
}

/// An event with its number and time; the JSON of one line of `resil events -o json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequenced {
    /// 1, 2, 3 … since the daemon started.
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub time: f64,
    #[serde(flatten)]
    pub event: Event,
}

/// The history.
#[derive(Debug)]
pub struct EventLog {
    events: VecDeque<Sequenced>,
    next: u64,
    capacity: usize,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl EventLog {
    /// An empty log keeping the last `capacity` events.
    pub fn with_capacity(capacity: usize) -> Self {
        EventLog {
            events: VecDeque::new(),
            next: 1,
            capacity: capacity.max(1),
        }
    }

    /// Records an event at `time` (Unix seconds).
    pub fn push(&mut self, time: f64, event: Event) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(Sequenced {
            seq: self.next,
            time,
            event,
        });
        self.next += 1;
    }

    /// Events numbered above `after` (all kept ones for `None`), and how many of those are no
    /// longer kept.
    pub fn after(&self, after: Option<u64>) -> (Vec<Sequenced>, u64) {
        let after = after.unwrap_or(0);
        let oldest = self.events.front().map_or(self.next, |e| e.seq);
        let lost = oldest
            .saturating_sub(after + 1)
            .min(self.next.saturating_sub(after + 1));
        let kept = self
            .events
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect();
        (kept, if after == 0 { 0 } else { lost })
    }

    /// Events recorded in all since the daemon started.
    pub fn total(&self) -> u64 {
        self.next - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::Reason;

    fn transition(to: &str) -> Event {
        Event::Transition(TransitionEvent {
            endpoint: "10.0.0.2:80".into(),
            dependency: None,
            from: "closed".into(),
            to: to.into(),
            reason: "manual".into(),
            details: Reason::Manual,
        })
    }

    #[test]
    fn followers_get_what_came_after_and_learn_what_they_missed() {
        let mut log = EventLog::with_capacity(3);
        for i in 0..5 {
            log.push(i as f64, transition("open"));
        }
        let (all, lost) = log.after(None);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(lost, 0, "a first read of the history lost nothing");
        let (newer, lost) = log.after(Some(4));
        assert_eq!((newer.len(), lost), (1, 0));
        let (behind, lost) = log.after(Some(1));
        assert_eq!((behind.len(), lost), (3, 1), "event 2 is gone");
        let (none, lost) = log.after(Some(5));
        assert_eq!((none.len(), lost), (0, 0));
        assert_eq!(log.total(), 5);
    }

    #[test]
    fn the_json_line_is_flat_and_tagged() {
        let mut log = EventLog::default();
        log.push(12.5, transition("open"));
        let line = serde_json::to_string(&log.after(None).0[0]).unwrap();
        assert!(
            line.starts_with(
                r#"{"seq":1,"time":12.5,"kind":"transition","endpoint":"10.0.0.2:80""#
            ),
            "{line}"
        );
        let back: Sequenced = serde_json::from_str(&line).unwrap();
        assert_eq!(back.event, transition("open"));
    }
}
