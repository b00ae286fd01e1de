//! How long a circuit stays OPEN: exponential growth from a base to a cap, with jitter so
//! many endpoints opened together do not probe together, and decay back towards the base
//! while the endpoint stays healthy.

/// Settings of the open-state wait.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    /// The first wait.
    pub base_ns: u64,
    /// The longest wait.
    pub max_ns: u64,
    /// Growth per consecutive opening (≥ 1).
    pub multiplier: f64,
    /// Relative spread: a wait is drawn from `w × [1 − jitter, 1 + jitter]`, then capped.
    pub jitter: f64,
    /// Healthy (closed) time that takes one step off the growth.
    pub decay_ns: u64,
}

/// The wait state of one endpoint.
#[derive(Clone, Debug)]
pub struct Backoff {
    /// Consecutive openings not yet decayed: the exponent.
    level: u32,
    rng: u64,
}

impl Backoff {
    /// A fresh backoff; `seed` makes the jitter differ between endpoints yet be reproducible.
    pub fn new(seed: u64) -> Self {
        Self {
            level: 0,
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// A backoff that has already counted `level` consecutive openings (a restored breaker).
    pub fn with_level(seed: u64, level: u32) -> Self {
        Self {
            level,
            ..Self::new(seed)
        }
    }

    /// The wait before the un-jittered value at the current level.
    pub fn nominal_ns(&self, policy: &BackoffPolicy) -> u64 {
        let growth = policy.multiplier.max(1.0).powi(self.level.min(64) as i32);
        let wait = policy.base_ns as f64 * growth;
        wait.min(policy.max_ns as f64) as u64
    }

    /// The next wait, and one level up for the one after.
    pub fn next_wait_ns(&mut self, policy: &BackoffPolicy) -> u64 {
        let nominal = self.nominal_ns(policy) as f64;
        let spread = policy.jitter.clamp(0.0, 1.0) * (2.0 * self.unit() - 1.0);
        let wait = (nominal * (1.0 + spread)).clamp(0.0, policy.max_ns as f64) as u64;
        self.level = self.level.saturating_add(1);
        wait.max(1)
    }

    /// Steps taken off for `healthy_ns` of closed time; returns the new level.
    pub fn decay(&mut self, healthy_ns: u64, policy: &BackoffPolicy) -> u32 {
        if let Some(steps) = healthy_ns.checked_div(policy.decay_ns) {
            self.level = self.level.saturating_sub(steps.min(u32::MAX as u64) as u32);
        }
        self.level
    }

    /// Consecutive openings counted.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// A uniform number in [0, 1) from splitmix64.
    fn unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn policy(jitter: f64) -> BackoffPolicy {
        BackoffPolicy {
            base_ns: 5 * SEC,
            max_ns: 60 * SEC,
            multiplier: 2.0,
            jitter,
            decay_ns: 60 * SEC,
        }
    }

    #[test]
    fn grows_exponentially_to_the_cap() {
        let p = policy(0.0);
        let mut b = Backoff::new(1);
        let waits: Vec<u64> = (0..6).map(|_| b.next_wait_ns(&p) / SEC).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
    }

    #[test]
    fn jitter_stays_within_its_spread_and_the_cap() {
        let p = policy(0.5);
        for seed in 0..200 {
            let mut b = Backoff::new(seed);
            let first = b.next_wait_ns(&p);
            assert!((5 * SEC / 2..=15 * SEC / 2).contains(&first), "{first}");
            for _ in 0..10 {
                assert!(b.next_wait_ns(&p) <= 60 * SEC);
            }
        }
        let a: Vec<u64> = (0..5).map(|s| Backoff::new(s).next_wait_ns(&p)).collect();
        assert!(
            a.windows(2).any(|w| w[0] != w[1]),
            "jitter spreads endpoints: {a:?}"
        );
    }

    #[test]
    fn decays_while_healthy() {
        let p = policy(0.0);
        let mut b = Backoff::new(1);
        for _ in 0..4 {
            b.next_wait_ns(&p);
        }
        assert_eq!(b.level(), 4);
        assert_eq!(b.decay(59 * SEC, &p), 4, "not yet a full decay period");
        assert_eq!(b.decay(120 * SEC, &p), 2);
        assert_eq!(b.nominal_ns(&p), 20 * SEC);
        assert_eq!(b.decay(u64::MAX, &p), 0);
        assert_eq!(b.next_wait_ns(&p), 5 * SEC);
    }
}
