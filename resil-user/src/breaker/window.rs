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
        self.calls -= 1;
        self.failures -= s.failure as u32;
        self.slow -= s.slow as u32;
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
/// when its interval is more than `buckets - 1` intervals old.
#[derive(Debug, Clone)]
pub struct TimeWindow {
    buckets: Vec<Bucket>,
    bucket_ns: u64,
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
        }
    }

    fn epoch(&self, now_ns: u64) -> u64 {
        now_ns / self.bucket_ns
    }

    fn in_window(&self, epoch: u64, now_epoch: u64) -> bool {
        epoch != u64::MAX && epoch <= now_epoch && now_epoch - epoch < self.buckets.len() as u64
    }

    fn record(&mut self, now_ns: u64, sample: Sample) -> SampleRef {
        let epoch = self.epoch(now_ns);
        let n = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(epoch % n) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                totals: Totals::default(),
            };
        }
        bucket.totals.add(sample);
        SampleRef(epoch)
    }

    fn amend(&mut self, now_ns: u64, at: SampleRef, old: Sample, new: Sample) -> bool {
        let SampleRef(epoch) = at;
        let now_epoch = self.epoch(now_ns);
        if !self.in_window(epoch, now_epoch) {
            return false;
        }
        let n = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(epoch % n) as usize];
        if bucket.epoch != epoch || bucket.totals.calls == 0 {
            return false;
        }
        bucket.totals.remove(old);
        bucket.totals.add(new);
        true
    }

    fn totals(&self, now_ns: u64) -> Totals {
        let now_epoch = self.epoch(now_ns);
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
    fn a_clock_going_backwards_sees_nothing_from_the_future() {
        let mut w = Window::Time(TimeWindow::new(10 * SEC, 10));
        w.record(100 * SEC, F);
        assert_eq!(w.totals(50 * SEC).calls, 0);
        assert_eq!(w.totals(100 * SEC).calls, 1);
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
