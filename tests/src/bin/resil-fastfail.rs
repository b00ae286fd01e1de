//! Fast-fail benchmark (run by `cargo xtask bench`): how long connect() takes to fail against
//! an open circuit, next to the same client against the dead endpoint without resil —
//! refused by the peer (a RST round trip over a veth) — in one run, in a lab of its own.
//! Writes `target/bench/fastfail.json`.

use std::{net::SocketAddr, time::Duration};

use resil_tests::{Attempt, Family, Lab};

const N: usize = 2000;

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn measure(lab: &Lab, addr: SocketAddr, expect: &str) -> (Duration, Duration, Duration) {
    let mut times: Vec<Duration> = lab
        .connect_in_cgroup(addr, N, Duration::from_secs(2), false)
        .into_iter()
        .map(|a: Attempt| {
            assert_eq!(a.outcome, expect, "{a:?}");
            a.elapsed
        })
        .collect();
    times.sort();
    (
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        percentile(&times, 1.0),
    )
}

fn main() -> anyhow::Result<()> {
    resil_tests::require_root();
    let lab = Lab::new("ffb")?;
    let daemon = lab.daemon()?;
    let mut report = Vec::new();
    for family in [Family::V4, Family::V6] {
        let addr = SocketAddr::new(lab.server_ip(family), 9);
        // Nothing listens: without resil the peer's stack answers each SYN with a RST.
        let (p50, p99, max) = measure(&lab, addr, "ConnectionRefused");
        let out = daemon.cli(&["trip", &addr.to_string()])?;
        anyhow::ensure!(out.status.success(), "trip failed");
        let (f50, f99, fmax) = measure(&lab, addr, "ConnectionRefused");
        daemon.cli(&["reset", &addr.to_string()])?;
        let name = match family {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        };
        println!(
            "fastfail {name}: connect() refused by resil p50 {:>6.1} µs p99 {:>6.1} µs (max {:>7.1} µs) | refused by the peer p50 {:>6.1} µs p99 {:>6.1} µs (max {:>7.1} µs) | {:.1}x faster at p50 ({N} each)",
            f50.as_secs_f64() * 1e6,
            f99.as_secs_f64() * 1e6,
            fmax.as_secs_f64() * 1e6,
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            max.as_secs_f64() * 1e6,
            p50.as_secs_f64() / f50.as_secs_f64().max(1e-9),
        );
        report.push(format!(
            "{{\"family\":\"{name}\",\"resil_p50_us\":{:.1},\"resil_p99_us\":{:.1},\"peer_p50_us\":{:.1},\"peer_p99_us\":{:.1},\"samples\":{N}}}",
            f50.as_secs_f64() * 1e6,
            f99.as_secs_f64() * 1e6,
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        ));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("fastfail.json"),
        format!("[{}]\n", report.join(",")),
    )?;
    Ok(())
}
