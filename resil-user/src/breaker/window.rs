//! Sliding windows of call outcomes: count-based (the last N calls) and time-based (buckets
//! covering the last D). Both keep running totals, evict exactly, and let a recorded sample be
//! amended while it is still in the window (a handshake that succeeded, then was reset before
//! any reply, becomes a failure).
//!
//! Time is CLOCK_MONOTONIC nanoseconds passed in by the caller.

/// One call's outcome as the window sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub failure: bool,
    pub slow: bool,
}

/// What the window holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
}

impl Totals {
    fn add(&mut self, s: Sample) {
        self.calls += 1;
        self.failures += s.failure as u32;
        self.slow += s.slow as u32;
    }

    fn remove(&mut self, s: Sample) {
        // Saturating: a caller's stale reference must never wrap the totals around.
        self.calls = self.calls.saturating_sub(1);
        self.failures = self.failures.saturating_sub(s.failure as u32);
        self.slow = self.slow.saturating_sub(s.slow as u32);
    }

    /// Failed share of the calls, `None` below `minimum_calls` (unknown, not zero).
    pub fn failure_rate(&self, minimum_calls: u32) -> Option<f64> {
        (self.calls >= minimum_calls.max(1)).then(|| self.failures as f64 / self.calls as f64)
    }

    /// Slow share of the calls, `None` below `minimum_calls`.
    pub fn slow_rate(&self, minimum_calls: u32) -> Option<f64> {
        (self.calls >= minimum_calls.max(1)).then(|| self.slow as f64 / self.calls as f64)
    }
}

/// Where a sample went, to amend it later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleRef(u64);

/// The last `size` calls.
#[derive(Debug, Clone)]
pub struct CountWindow {
    ring: Vec<Sample>,
    size: usize,
    /// Sequence number of the next sample; `ring[seq % size]` holds sample `seq`.
    next: u64,
    totals: Totals,
}

impl CountWindow {
    /// A window over the last `size` calls (at least 1).
    pub fn new(size: u32) -> Self {
        let size = size.max(1) as usize;
        Self {
            ring: vec![Sample::default(); size],
            size,
            next: 0,
            totals: Totals::default(),
        }
    }

    fn record(&mut self, sample: Sample) -> SampleRef {
        let slot = (self.next % self.size as u64) as usize;
        if self.next >= self.size as u64 {
            self.totals.remove(self.ring[slot]);
        }
        self.ring[slot] = sample;
        self.totals.add(sample);
        let at = SampleRef(self.next);
        self.next += 1;
        at
    }

    fn amend(&mut self, at: SampleRef, sample: Sample) -> bool {
        let SampleRef(seq) = at;
        let held = seq < self.next && seq + self.size as u64 >= self.next;
        if held {
            let slot = (seq % self.size as u64) as usize;
            self.totals.remove(self.ring[slot]);
            self.ring[slot] = sample;
            self.totals.add(sample);
        }
        held
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket-length interval of the clock this bucket holds.
    epoch: u64,
    totals: Totals,
}

/// The calls of the last `buckets × bucket_ns`, in buckets: a bucket leaves the window whole
/// when its interval is more than `buckets - 1` intervals old. Running totals make reading
/// the window O(1); advancing the clock clears only the buckets it passes over.
#[derive(Debug, Clone)]
pub struct TimeWindow {
    buckets: Vec<Bucket>,
    bucket_ns: u64,
    /// The newest epoch the running totals are up to date with.
    epoch: u64,
    /// Sum of the buckets in the window at `epoch`.
    sum: Totals,
}

impl TimeWindow {
    /// A window of `duration_ns` split into `buckets` (each at least 1 ns long).
    pub fn new(duration_ns: u64, buckets: u32) -> Self {
        let n = buckets.max(1) as usize;
        Self {
            // Epoch u64::MAX marks an unused bucket: it is never current nor in the window.
            buckets: vec![
                Bucket {
                    epoch: u64::MAX,
                    totals: Totals::default()
                };
                n
            ],
            bucket_ns: (duration_ns / n as u64).max(1),
            epoch: 0,
            sum: Totals::default(),
        }
    }

    fn epoch_of(&self, now_ns: u64) -> u64 {
        now_ns / self.bucket_ns
    }

    fn in_window(&self, epoch: u64, now_epoch: u64) -> bool {
        epoch != u64::MAX && epoch <= now_epoch && now_epoch - epoch < self.buckets.len() as u64
    }

    /// Moves the running totals forward to `now_ns`, dropping buckets that left the window.
    /// A clock that went backwards leaves the window as it is.
    fn advance(&mut self, now_ns: u64) {
        let now_epoch = self.epoch_of(now_ns);
        if now_epoch <= self.epoch {
            return;
        }
        let n = self.buckets.len() as u64;
        if now_epoch - self.epoch >= n {
            // Everything left: a jump longer than the window empties it.
            for b in &mut self.buckets {
                b.epoch = u64::MAX;
            }
            self.sum = Totals::default();
        } else {
            for epoch in self.epoch + 1..=now_epoch {
                let b = &mut self.buckets[(epoch % n) as usize];
                if b.epoch != u64::MAX && b.epoch != epoch {
                    self.sum.calls = self.sum.calls.saturating_sub(b.totals.calls);
                    self.sum.failures = self.sum.failures.saturating_sub(b.totals.failures);
                    self.sum.slow = self.sum.slow.saturating_sub(b.totals.slow);
                    b.epoch = u64::MAX;
                }
            }
        }
        self.epoch = now_epoch;
    }

    fn record(&mut self, now_ns: u64, sample: Sample) -> SampleRef {
        self.advance(now_ns);
        // With a clock that went backwards, count the sample in the newest bucket.
        let epoch = self.epoch;
        let n = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(epoch % n) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                totals: Totals::default(),
            };
        }
        bucket.totals.add(sample);
        self.sum.add(sample);
        SampleRef(epoch)
    }

    fn amend(&mut self, now_ns: u64, at: SampleRef, old: Sample, new: Sample) -> bool {
        self.advance(now_ns);
        let SampleRef(epoch) = at;
        if !self.in_window(epoch, self.epoch) {
            return false;
        }
        let n = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(epoch % n) as usize];
        if bucket.epoch != epoch || bucket.totals.calls == 0 {
            return false;
        }
        bucket.totals.remove(old);
        bucket.totals.add(new);
        self.sum.remove(old);
        self.sum.add(new);
        true
    }

    fn totals(&self, now_ns: u64) -> Totals {
        let now_epoch = self.epoch_of(now_ns);
        if now_epoch <= self.epoch {
            return self.sum;
        }
        // Read-only look ahead: sum what would still be in the window.
        let mut sum = Totals::default();
        for b in &self.buckets {
            if self.in_window(b.epoch, now_epoch) {
                sum.calls += b.totals.calls;
                sum.failures += b.totals.failures;
                sum.slow += b.totals.slow;
            }
        }
        sum
    }
}

/// Either kind of window.
#[derive(Debug, Clone)]
pub enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    /// Records one call.
    pub fn record(&mut self, now_ns: u64, sample: Sample) -> SampleRef {
        match self {
            Window::Count(w) => w.record(sample),
            Window::Time(w) => w.record(now_ns, sample),
        }
    }

    /// Replaces a recorded sample (`old` is what was recorded) if it is still in the window.
    pub fn amend(&mut self, now_ns: u64, at: SampleRef, old: Sample, new: Sample) -> bool {
        match self {
            Window::Count(w) => w.amend(at, new),
            Window::Time(w) => w.amend(now_ns, at, old, new),
        }
    }

    /// The calls in the window at `now_ns`.
    pub fn totals(&self, now_ns: u64) -> Totals {
        match self {
            Window::Count(w) => w.totals,
            Window::Time(w) => w.totals(now_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Sample = Sample {
        failure: true,
        slow: false,
    };
    const S: Sample = Sample {
        failure: false,
        slow: false,
    };
    const SLOW: Sample = Sample {
        failure: false,
        slow: true,
    };
    const SEC: u64 = 1_000_000_000;

    #[test]
    fn count_window_evicts_the_oldest_exactly() {
        let mut w = Window::Count(CountWindow::new(3));
        w.record(0, F);
        w.record(0, S);
        w.record(0, SLOW);
        assert_eq!(
            w.totals(0),
            Totals {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        w.record(0, S); // the failure leaves
        assert_eq!(
            w.totals(0),
            Totals {
                calls: 3,
                failures: 0,
                slow: 1
            }
        );
        w.record(0, S);
        w.record(0, S); // the slow one leaves
        assert_eq!(
            w.totals(0),
            Totals {
                calls: 3,
                failures: 0,
                slow: 0
            }
        );
    }

    #[test]
    fn count_window_amends_only_what_it_still_holds() {
        let mut w = Window::Count(CountWindow::new(2));
        let first = w.record(0, S);
        assert!(w.amend(0, first, S, F));
        assert_eq!(w.totals(0).failures, 1);
        w.record(0, S);
        w.record(0, S);
        assert!(!w.amend(0, first, S, F), "evicted");
        assert_eq!(w.totals(0).failures, 0);
    }

    #[test]
    fn time_window_expires_whole_buckets() {
        // 10 s in 10 buckets of 1 s.
        let mut w = Window::Time(TimeWindow::new(10 * SEC, 10));
        w.record(0, F);
        w.record(SEC / 2, S);
        w.record(5 * SEC, F);
        assert_eq!(w.totals(9 * SEC + SEC / 2).calls, 3);
        // At 10 s the bucket [0, 1 s) is 10 buckets old: out.
        assert_eq!(
            w.totals(10 * SEC),
            Totals {
                calls: 1,
                failures: 1,
                slow: 0
            }
        );
        assert_eq!(w.totals(14 * SEC + SEC - 1).calls, 1);
        assert_eq!(w.totals(15 * SEC).calls, 0);
    }

    #[test]
    fn a_clock_jump_larger_than_the_window_empties_it() {
        let mut w = Window::Time(TimeWindow::new(10 * SEC, 10));
        for i in 0..10 {
            w.record(i * SEC, F);
        }
        assert_eq!(w.totals(9 * SEC).calls, 10);
        assert_eq!(w.totals(1000 * SEC).calls, 0);
        // A bucket slot reused after the jump starts from zero.
        w.record(1000 * SEC, S);
        assert_eq!(
            w.totals(1000 * SEC),
            Totals {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
    }

    #[test]
    fn a_clock_going_backwards_keeps_the_window() {
        let mut w = Window::Time(TimeWindow::new(10 * SEC, 10));
        w.record(100 * SEC, F);
        w.record(50 * SEC, S);
        assert_eq!(w.totals(50 * SEC).calls, 2);
        assert_eq!(w.totals(100 * SEC).calls, 2);
        assert_eq!(w.totals(110 * SEC).calls, 0);
    }

    #[test]
    fn running_totals_match_a_full_recount() {
        let mut w = TimeWindow::new(10 * SEC, 10);
        let mut now = 0;
        for i in 0..10_000u64 {
            now += (i * 7919) % (3 * SEC / 2);
            let sample = if i % 3 == 0 { F } else { S };
            w.record(now, sample);
            let mut recount = Totals::default();
            for b in &w.buckets {
                if w.in_window(b.epoch, w.epoch) {
                    recount.calls += b.totals.calls;
                    recount.failures += b.totals.failures;
                }
            }
            assert_eq!(w.totals(now), recount, "at sample {i}");
        }
    }

    #[test]
    fn time_window_amends_within_the_window() {
        let mut w = Window::Time(TimeWindow::new(10 * SEC, 10));
        let at = w.record(SEC, SLOW);
        assert!(w.amend(2 * SEC, at, SLOW, F));
        assert_eq!(
            w.totals(2 * SEC),
            Totals {
                calls: 1,
                failures: 1,
                slow: 0
            }
        );
        assert!(!w.amend(20 * SEC, at, F, S));
    }

    #[test]
    fn rates_are_unknown_below_the_minimum() {
        let t = Totals {
            calls: 4,
            failures: 4,
            slow: 0,
        };
        assert_eq!(t.failure_rate(5), None);
        assert_eq!(t.failure_rate(4), Some(1.0));
        assert_eq!(Totals::default().failure_rate(0), None, "no calls: no rate");
    }
}
