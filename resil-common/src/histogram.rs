//! Log-scale latency histogram: bucket math shared by the kernel (which counts) and the daemon
//! (which estimates percentiles).
//!
//! Bucket 0 holds latencies below 1 µs. Above that, every power of two of microseconds is split
//! into [`SUB_BUCKETS`] equal halves, so a bucket's upper bound is at most ~1.5× its lower bound.
//! The last bucket also holds everything above its lower bound.

/// Sub-buckets per power of two.
pub const SUB_BUCKETS: u32 = 2;
/// Number of buckets: bucket 0, then 2 per octave from 1 µs up to 2^23 µs (about 8.4 s).
pub const BUCKETS: usize = 48;

/// The bucket index for a latency in microseconds.
#[inline(always)]
pub fn bucket_for_us(us: u64) -> usize {
    if us == 0 {
        return 0;
    }
    let octave = 63 - us.leading_zeros(); // floor(log2(us))
                                          // The bit just below the leading one picks the lower or upper half of the octave.
    let half = if octave == 0 {
        0
    } else {
        (us >> (octave - 1)) & 1
    } as u32;
    let index = 1 + octave * SUB_BUCKETS + half;
    if index as usize >= BUCKETS {
        BUCKETS - 1
    } else {
        index as usize
    }
}

/// The half-open range `[lower, upper)` of microseconds that bucket `index` covers.
/// The last bucket is reported with the upper bound it would have without the overflow.
pub fn bucket_bounds_us(index: usize) -> (f64, f64) {
    if index == 0 {
        return (0.0, 1.0);
    }
    let i = (index - 1) as u32;
    let octave = i / SUB_BUCKETS;
    let half = i % SUB_BUCKETS;
    let base = (1u64 << octave) as f64;
    if octave == 0 {
        // 1 µs has no lower half: both sub-buckets of octave 0 collapse into [1, 2).
        return (1.0, 2.0);
    }
    let step = base / SUB_BUCKETS as f64;
    (base + step * half as f64, base + step * (half + 1) as f64)
}

/// Estimates the `q` quantile (0..=1) in microseconds from bucket counts, interpolating linearly
/// inside the bucket that holds the rank. `None` when the histogram is empty.
pub fn quantile_us(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    // Rank of the wanted sample, 1-based, at least the first one.
    let exact = q * total as f64;
    let floor = exact as u64; // no `ceil` in core
    let rank = if (floor as f64) < exact {
        floor + 1
    } else {
        floor
    }
    .max(1);
    let mut seen = 0u64;
    for (index, &count) in counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        if seen + count >= rank {
            let (lower, upper) = bucket_bounds_us(index);
            let within = (rank - seen) as f64 / count as f64;
            return Some(lower + (upper - lower) * within);
        }
        seen += count;
    }
    None
}

/// Counts per bucket, and the exact sum of what was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: [u64; BUCKETS],
    sum_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            sum_us: 0,
        }
    }
}

impl Histogram {
    /// Counts one latency.
    pub fn record_us(&mut self, us: u64) {
        self.counts[bucket_for_us(us)] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Adds everything `other` recorded to this one.
    pub fn add(&mut self, other: &Histogram) {
        for (c, o) in self.counts.iter_mut().zip(other.counts.iter()) {
            *c += o;
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// The sum of every latency recorded, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// How many recorded latencies are below `bound_us`, exactly when `bound_us` is a power of
    /// two (where buckets end), else counting the buckets that end at or below it.
    pub fn count_below_us(&self, bound_us: f64) -> u64 {
        self.counts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i < BUCKETS - 1 && bucket_bounds_us(*i).1 <= bound_us)
            .map(|(_, c)| c)
            .sum()
    }

    /// Estimated `q` quantile in microseconds, `None` while empty.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        quantile_us(&self.counts, q)
    }

    /// The bucket counts.
    pub fn counts(&self) -> &[u64; BUCKETS] {
        &self.counts
    }

    /// Latencies recorded in all.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was recorded since the snapshot `earlier` of this histogram.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let mut delta = Histogram::default();
        for (d, (now, then)) in delta
            .counts
            .iter_mut()
            .zip(self.counts.iter().zip(&earlier.counts))
        {
            *d = now.saturating_sub(*then);
        }
        delta.sum_us = self.sum_us.saturating_sub(earlier.sum_us);
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_minus_its_snapshot_holds_what_came_since() {
        let mut h = Histogram::default();
        h.record_us(100);
        let snapshot = h;
        h.record_us(100_000);
        h.record_us(100_000);
        let recent = h.since(&snapshot);
        assert_eq!((h.total(), recent.total()), (3, 2));
        assert_eq!((h.sum_us(), recent.sum_us()), (200_100, 200_000));
        assert_eq!(h.count_below_us(128.0), 1);
        assert_eq!(h.count_below_us(65_536.0), 1);
        assert_eq!(h.count_below_us(131_072.0), 3);
        assert!(recent.quantile_us(0.5).unwrap() > 50_000.0);
    }

    #[test]
    fn buckets_are_monotonic_and_contain_their_values() {
        let mut last = 0;
        for us in 0..100_000u64 {
            let b = bucket_for_us(us);
            assert!(b >= last, "bucket went down at {us}");
            last = b;
            let (lo, hi) = bucket_bounds_us(b);
            assert!(
                (us as f64) >= lo && (us as f64) < hi,
                "{us} not in bucket {b} [{lo},{hi})"
            );
        }
    }

    #[test]
    fn known_buckets() {
        assert_eq!(bucket_for_us(0), 0);
        assert_eq!(bucket_for_us(1), 1);
        assert_eq!(bucket_for_us(2), 3);
        assert_eq!(bucket_for_us(3), 4);
        assert_eq!(bucket_for_us(4), 5);
        assert_eq!(bucket_for_us(6), 6);
        assert_eq!(bucket_for_us(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_for_us(1 << 40), BUCKETS - 1);
    }

    #[test]
    fn bucket_width_is_at_most_half_its_lower_bound() {
        for index in 3..BUCKETS {
            let (lo, hi) = bucket_bounds_us(index);
            assert!(
                hi - lo <= lo / 2.0 + f64::EPSILON,
                "bucket {index}: [{lo},{hi})"
            );
        }
    }

    #[test]
    fn quantiles() {
        let mut counts = [0u64; BUCKETS];
        assert_eq!(quantile_us(&counts, 0.5), None);
        // 99 samples at 100 µs and one at 400 ms.
        counts[bucket_for_us(100)] = 99;
        counts[bucket_for_us(400_000)] = 1;
        let p50 = quantile_us(&counts, 0.5).unwrap();
        assert!((64.0..=128.0).contains(&p50), "p50 {p50}");
        let p99 = quantile_us(&counts, 0.99).unwrap();
        assert!(p99 <= 128.0, "p99 {p99}");
        let p100 = quantile_us(&counts, 1.0).unwrap();
        assert!((262_144.0..=524_288.0).contains(&p100), "max {p100}");
    }
}
