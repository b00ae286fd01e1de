//! "Lately": what cumulative figures gained over the last while, for reports that must end
//! when a condition clears. Two snapshots, rolled every span, so the difference between now
//! and the older one always covers between one and two spans.

/// Snapshots of a cumulative reading `T`.
#[derive(Debug, Clone)]
pub struct Recent<T> {
    older: T,
    newer: T,
    newer_at_ns: u64,
    older_at_ns: u64,
}

impl<T: Clone> Recent<T> {
    /// Starts from `start`, the reading (often zero) at `now_ns`.
    pub fn new(start: T, now_ns: u64) -> Self {
        Recent {
            older: start.clone(),
            newer: start,
            newer_at_ns: now_ns,
            older_at_ns: now_ns,
        }
    }

    /// Whether the last snapshot is at least `span_ns` old: time for [`Recent::roll`].
    pub fn due(&self, now_ns: u64, span_ns: u64) -> bool {
        now_ns.saturating_sub(self.newer_at_ns) >= span_ns
    }

    /// Takes a new snapshot of `current` if the last one is at least `span_ns` old.
    pub fn roll(&mut self, current: &T, now_ns: u64, span_ns: u64) {
        if self.due(now_ns, span_ns) {
            self.older = std::mem::replace(&mut self.newer, current.clone());
            self.older_at_ns = self.newer_at_ns;
            self.newer_at_ns = now_ns;
        }
    }

    /// The reading the recent figures are counted from.
    pub fn base(&self) -> &T {
        &self.older
    }

    /// Seconds the recent figures cover at `now_ns`.
    pub fn covers_s(&self, now_ns: u64) -> f64 {
        now_ns.saturating_sub(self.older_at_ns) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn the_base_is_between_one_and_two_spans_old() {
        let mut r = Recent::new(0u64, 0);
        for t in 1..=35 {
            r.roll(&t, t * S, 10 * S);
            let age = t - *r.base();
            assert!(
                t < 10 || (10..20).contains(&age),
                "at {t}s base {}",
                r.base()
            );
        }
        assert_eq!(*r.base(), 20);
        assert!((r.covers_s(35 * S) - 15.0).abs() < 1e-9);
    }
}
