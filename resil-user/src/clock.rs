//! Clocks: the kernel's (BPF timestamps, `bpf_ktime_get_ns`, are CLOCK_MONOTONIC nanoseconds)
//! and the wall clock people read.

use nix::time::{clock_gettime, ClockId};

/// CLOCK_MONOTONIC now, in nanoseconds, comparable with kernel event timestamps.
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only make timeouts fire late, never early.
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Wall-clock time now, in seconds since the Unix epoch (for events and reports).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
