//! Overhead on real traffic across a veth pair: throughput (iperf3), request latency, connection
//! rate, each with no agent, with resil observing, and with resil enforcing (verdicts in the
//! kernel); the programs' own cost under that traffic; and what the daemon costs.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{datapath, quantile, Plan, Section};
use crate::{reset_on_close, target_bin, Daemon, Family, Lab, ServeMode};

/// The three ways the client side runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Agent {
    None,
    Observe,
    Enforce,
}

impl Agent {
    pub const ALL: [Agent; 3] = [Agent::None, Agent::Observe, Agent::Enforce];

    pub fn label(self) -> &'static str {
        match self {
            Agent::None => "no agent",
            Agent::Observe => "resil observing",
            Agent::Enforce => "resil enforcing",
        }
    }
}

/// Starts the daemon for `agent` (none for `None`); enforcing trips an unrelated endpoint, so
/// verdicts are in the kernel and every connect() and SYN is checked against them.
pub fn start(lab: &Lab, agent: Agent) -> Result<Option<Daemon>> {
    if agent == Agent::None {
        return Ok(None);
    }
    let daemon = lab.daemon_with_args("", &["--metrics", "off"])?;
    if agent == Agent::Enforce {
        let out = daemon.cli(&["trip", "10.200.0.99:9"])?;
        if !out.status.success() {
            bail!("resil trip: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(Some(daemon))
}

/// iperf3 throughput from the client namespace to the server's, in Gbit/s.
fn iperf3(lab: &Lab, seconds: u64) -> Result<f64> {
    let mut server = Command::new("ip")
        .args(["netns", "exec", &lab.server_ns])
        .arg(super::tool("iperf3"))
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start iperf3 -s (Debian package iperf3)")?;
    thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.client_ns])
        .arg(super::tool("iperf3"))
        .args(["-c", "10.200.0.2", "-p", "5201", "-J"])
        .args(["-t", &seconds.to_string()])
        .output();
    // The server goes whatever the client did.
    let _ = server.kill();
    let _ = server.wait();
    let out = out.context("run iperf3 -c")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3's JSON")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .context("no bits_per_second in iperf3's report")
}

/// Request round trips (64 bytes each way) on one connection for `time`: p50 and p99 in µs.
fn round_trips(lab: &Lab, addr: SocketAddr, time: Duration) -> Result<(f64, f64)> {
    lab.client(|| -> Result<(f64, f64)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        let request = [0x42u8; 64];
        let mut reply = [0u8; 64];
        let mut rtts = Vec::new();
        let end = Instant::now() + time;
        while Instant::now() < end {
            let start = Instant::now();
            stream.write_all(&request)?;
            stream.read_exact(&mut reply)?;
            rtts.push(start.elapsed().as_secs_f64() * 1e6);
        }
        rtts.sort_by(f64::total_cmp);
        Ok((quantile(&rtts, 0.5), quantile(&rtts, 0.99)))
    })
}

/// Runs `resil-bench client …` (joins the lab's cgroup and the client namespace, where resil
/// enforces) and returns its standard output.
pub fn client(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = Command::new(target_bin("resil-bench"))
        .arg("client")
        .arg(&lab.cgroup)
        .arg(&lab.client_ns)
        .args(args)
        .output()
        .context("run resil-bench client")?;
    if !out.status.success() {
        bail!(
            "resil-bench client {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Connections opened and closed (with a RST, so no TIME_WAIT piles up) per second, as fast
/// as one client can, or paced at `rate` per second.
pub fn connect_loop(addr: SocketAddr, time: Duration, rate: Option<u64>) -> u64 {
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < time {
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                thread::sleep(wait);
            }
        }
        if let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            reset_on_close(&stream);
            done += 1;
        }
    }
    done
}

fn rate_of(lab: &Lab, addr: SocketAddr, time: Duration, rate: Option<u64>) -> Result<f64> {
    let mut args = vec![
        "connect".to_string(),
        addr.to_string(),
        time.as_millis().to_string(),
    ];
    if let Some(rate) = rate {
        args.push(rate.to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = client(lab, &refs)?;
    let done: f64 = out.trim().parse().context("a count of connections")?;
    Ok(done / time.as_secs_f64())
}

/// The daemon's CPU time (user + system) in seconds, and its resident memory in MiB.
fn cpu_and_rss(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name in parentheses; utime and stime are the 14th and 15th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok((cpu, rss_kb / 1024.0))
}

/// Throughput, request latency and connection rate, for each agent, in one lab.
pub fn overhead(plan: &Plan) -> Result<Vec<Section>> {
    let lab = Lab::new("bt")?;
    let _echo = lab.serve(8080, ServeMode::Echo)?;
    let _closer = lab.serve(8081, ServeMode::Close)?;
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    let closer = SocketAddr::new(lab.server_ip(Family::V4), 8081);
    let seconds = plan.traffic.as_secs().max(1);
    let mut gbps = vec![Vec::new(); 3];
    let mut p50 = vec![Vec::new(); 3];
    let mut p99 = vec![Vec::new(); 3];
    let mut rate = vec![Vec::new(); 3];
    let mut program_ns: Vec<(String, Vec<f64>)> = Vec::new();
    for _ in 0..plan.runs {
        for (i, agent) in Agent::ALL.into_iter().enumerate() {
            let daemon = start(&lab, agent)?;
            let stats = if agent == Agent::Observe {
                Some((datapath::BpfStats::enable()?, datapath::program_stats()?))
            } else {
                None
            };
            gbps[i].push(iperf3(&lab, seconds)?);
            if let Some((_guard, before)) = &stats {
                for (name, time, count) in datapath::program_stats()? {
                    let Some((_, t0, c0)) = before.iter().find(|(n, _, _)| *n == name) else {
                        continue;
                    };
                    if count > *c0 {
                        let ns = time.saturating_sub(*t0) as f64 / (count - c0) as f64;
                        match program_ns.iter_mut().find(|(n, _)| *n == name) {
                            Some((_, v)) => v.push(ns),
                            None => program_ns.push((name, vec![ns])),
                        }
                    }
                }
            }
            drop(stats);
            let (a, b) = round_trips(&lab, addr, plan.traffic)?;
            p50[i].push(a);
            p99[i].push(b);
            rate[i].push(rate_of(&lab, closer, plan.traffic, None)?);
            drop(daemon);
        }
    }
    let ratio = |v: &[Vec<f64>], i: usize| -> Vec<f64> {
        v[i].iter().zip(&v[0]).map(|(x, base)| x / base).collect()
    };
    let mut throughput = Section::new(
        "Throughput and latency overhead",
        format!(
            "Across a veth pair between two namespaces, resil attached on the client side: one iperf3 TCP stream for {seconds} s; 64-byte request/response round trips on one connection for {seconds} s; connections opened and closed (RST) as fast as one client in the protected cgroup can, for {seconds} s, against a server that closes each connection as it accepts it. Ratios are taken against the no-agent run of the same repetition. Enforcing means verdicts in the kernel (an unrelated endpoint tripped), so every connect() and SYN is checked."
        ),
    );
    for (i, agent) in Agent::ALL.into_iter().enumerate() {
        throughput.add(
            format!("iperf3 throughput, {}", agent.label()),
            "Gbit/s",
            &gbps[i],
            "",
        );
    }
    for i in 1..3 {
        throughput.add(
            format!("throughput ratio, {} / no agent", Agent::ALL[i].label()),
            "×",
            &ratio(&gbps, i),
            "",
        );
    }
    for (i, agent) in Agent::ALL.into_iter().enumerate() {
        throughput.add(
            format!("request latency p50, {}", agent.label()),
            "µs",
            &p50[i],
            "",
        );
        throughput.add(
            format!("request latency p99, {}", agent.label()),
            "µs",
            &p99[i],
            "",
        );
    }
    for i in 1..3 {
        throughput.add(
            format!("p50 ratio, {} / no agent", Agent::ALL[i].label()),
            "×",
            &ratio(&p50, i),
            "",
        );
    }
    for (i, agent) in Agent::ALL.into_iter().enumerate() {
        throughput.add(
            format!("connection rate, {}", agent.label()),
            "conn/s",
            &rate[i],
            "",
        );
    }
    for i in 1..3 {
        throughput.add(
            format!(
                "connection rate ratio, {} / no agent",
                Agent::ALL[i].label()
            ),
            "×",
            &ratio(&rate, i),
            "",
        );
    }
    let mut live = Section::new(
        "Data path: real traffic",
        "The programs' own cost while iperf3 runs with resil observing: the kernel's run time divided by run count (`kernel.bpf_stats_enabled`, read with bpftool), over the packets of that run. TSO/GRO make a packet here up to 64 KB.",
    );
    for (name, samples) in &program_ns {
        live.add(format!("{name}, under iperf3"), "ns/run", samples, "");
    }
    Ok(vec![throughput, live])
}

/// What the daemon costs: CPU and memory at paced connection rates, and its BPF maps.
pub fn daemon_cost(plan: &Plan) -> Result<Section> {
    let lab = Lab::new("bc")?;
    let _server = lab.serve(8080, ServeMode::Close)?;
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    let mut section = Section::new(
        "Daemon cost",
        format!(
            "The daemon's CPU (user + system, % of one core) and resident memory while a client in the protected cgroup opens and closes connections at a paced rate for {} s (each connection: a handshake event, breaker admission and outcome, endpoint counters). The achieved rate is reported too: on a small machine the client, not resil, may be the limit.",
            plan.traffic.as_secs()
        ),
    );
    for target in [1_000u64, 10_000] {
        let (mut cpu, mut rss, mut achieved) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..plan.runs {
            let daemon = lab.daemon_with_args("", &["--metrics", "off"])?;
            let pid = daemon.pid().context("the daemon's pid")?;
            let (cpu0, _) = cpu_and_rss(pid)?;
            let started = Instant::now();
            let got = rate_of(&lab, addr, plan.traffic, Some(target))?;
            let elapsed = started.elapsed().as_secs_f64();
            let (cpu1, rss1) = cpu_and_rss(pid)?;
            cpu.push((cpu1 - cpu0) / elapsed * 100.0);
            rss.push(rss1);
            achieved.push(got);
            drop(daemon);
        }
        section.add(
            format!("connections per second achieved, target {target}/s"),
            "conn/s",
            &achieved,
            "",
        );
        section.add(
            format!("daemon CPU, target {target} conn/s"),
            "% of a core",
            &cpu,
            "at the rate achieved",
        );
        section.add(
            format!("daemon RSS, target {target} conn/s"),
            "MiB",
            &rss,
            "",
        );
    }
    // The kernel's memory for resil's maps (what the verifier charges).
    let daemon = lab.daemon_with_args("", &["--metrics", "off"])?;
    let out = Command::new(super::tool("bpftool"))
        .args(["map", "show", "--json"])
        .output()
        .context("run bpftool")?;
    drop(daemon);
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let names = [
        "CONNECTIONS",
        "ENDPOINTS",
        "HANDSHAKES",
        "DNS",
        "DNS_QUERIES",
        "HEALTH",
        "VERDICTS",
        "TOKENS",
    ];
    let mut total = 0.0;
    for m in maps.as_array().into_iter().flatten() {
        let (Some(name), Some(bytes)) = (m["name"].as_str(), m["bytes_memlock"].as_u64()) else {
            continue;
        };
        if names.contains(&name) {
            total += bytes as f64;
            section.add(
                format!("map {name}"),
                "MiB",
                &[bytes as f64 / 1024.0 / 1024.0],
                "bytes_memlock",
            );
        }
    }
    section.add(
        "all resil maps",
        "MiB",
        &[total / 1024.0 / 1024.0],
        "per daemon",
    );
    Ok(section)
}
