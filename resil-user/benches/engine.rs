//! The breaker engine at scale: one daemon tick over N endpoints, each recording one outcome
//! and letting time act, the way the agent loop drives them.
//!
//! `cargo xtask bench` runs it; it prints one line per size and writes
//! `target/bench/engine.json`.

use std::time::Instant;

use resil_common::maps::{EndpointKey, EndpointStats, FAMILY_IPV4};
use resil_user::{
    breaker::{FailureKind, Outcome},
    circuits::Circuits,
    endpoints::EndpointTable,
    policy::Policies,
};

const TICKS: usize = 200;
const TICK_NS: u64 = 100_000_000;

fn key(i: u32) -> EndpointKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
    EndpointKey {
        addr,
        port: 443,
        family: FAMILY_IPV4,
        direction: 0,
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Prints one scenario's median and p99 tick and keeps them for `engine.json`.
fn summarize(
    results: &mut Vec<String>,
    scenario: &str,
    label: &str,
    endpoints: u32,
    mut per_tick_us: Vec<f64>,
) {
    per_tick_us.sort_by(f64::total_cmp);
    let median = percentile(&per_tick_us, 0.5);
    let p99 = percentile(&per_tick_us, 0.99);
    println!(
        "{endpoints:>6} endpoints, {label:<52} median {median:>9.1} µs per tick, p99 {p99:>9.1} µs ({:.0} ns per endpoint)",
        median * 1000.0 / endpoints as f64
    );
    results.push(format!(
        "{{\"scenario\":\"{scenario}\",\"endpoints\":{endpoints},\"median_us\":{median:.1},\"p99_us\":{p99:.1}}}"
    ));
}

fn main() {
    let policies = Policies::default();
    let mut results = Vec::new();
    for endpoints in [1_000u32, 10_000, 100_000] {
        let mut circuits = Circuits::default();
        let keys: Vec<EndpointKey> = (0..endpoints).map(key).collect();
        let mut now = 1_000_000_000u64;
        let mut per_tick_us = Vec::with_capacity(TICKS);
        for tick in 0..TICKS {
            now += TICK_NS;
            let start = Instant::now();
            for (i, key) in keys.iter().enumerate() {
                let (ticket, _) = circuits.admit(*key, now, &policies);
                // One endpoint in ten fails, so windows, trips and waits all get exercised.
                let outcome = if (i + tick) % 10 == 0 {
                    Outcome::Failure(FailureKind::Refused)
                } else {
                    Outcome::Success {
                        latency_ns: 200_000,
                    }
                };
                circuits.record(*key, now, ticket, outcome);
            }
            circuits.tick(now);
            per_tick_us.push(start.elapsed().as_secs_f64() * 1e6);
        }
        summarize(
            &mut results,
            "outcomes",
            "one outcome each + tick",
            endpoints,
            per_tick_us,
        );

        // Time alone: every circuit open and waiting, one tick visits them all.
        let mut circuits = Circuits::default();
        for key in &keys {
            for _ in 0..5 {
                let (ticket, _) = circuits.admit(*key, now, &policies);
                circuits.record(*key, now, ticket, Outcome::Failure(FailureKind::Refused));
            }
        }
        let mut per_tick_us = Vec::with_capacity(TICKS);
        for _ in 0..TICKS {
            now += 1_000; // not long enough for any wait to end: all stay open
            let start = Instant::now();
            circuits.tick(now);
            per_tick_us.push(start.elapsed().as_secs_f64() * 1e6);
        }
        summarize(
            &mut results,
            "tick_open",
            "all open, tick only",
            endpoints,
            per_tick_us,
        );
    }
    // The endpoint table: every tick reads each endpoint's counters; every second it takes
    // snapshots where due and works out what each endpoint did lately (for the findings).
    for endpoints in [1_000u32, 10_000, 100_000] {
        let mut table = EndpointTable::with_capacity(endpoints as usize);
        let keys: Vec<EndpointKey> = (0..endpoints).map(key).collect();
        let mut now = 1_000_000_000u64;
        let mut per_tick_us = Vec::with_capacity(TICKS);
        for tick in 0..TICKS as u64 {
            now += TICK_NS;
            let start = Instant::now();
            for (i, key) in keys.iter().enumerate() {
                let stats = EndpointStats {
                    attempts: tick + i as u64 % 7,
                    established: tick,
                    created_ns: 1,
                    ..EndpointStats::ZERO
                };
                table.absorb(*key, &stats);
            }
            if tick % 10 == 0 {
                table.roll(now, 10 * TICK_NS * 10);
                std::hint::black_box(table.lately(now));
            }
            table.end_tick();
            per_tick_us.push(start.elapsed().as_secs_f64() * 1e6);
        }
        summarize(
            &mut results,
            "table",
            "endpoint table: counters each tick, lately each second",
            endpoints,
            per_tick_us,
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(
            dir.join("engine.json"),
            format!("[{}]\n", results.join(",")),
        );
    }
}
