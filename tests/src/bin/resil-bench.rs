//! `cargo xtask bench`: measures resil against no agent and against HAProxy, in labs of its
//! own, and writes `target/bench/report.md` and `report.json`.
//!
//! `resil-bench [--quick] [--only WORD]` runs the benchmark (with `--only`, the sections whose
//! title contains WORD). `resil-bench client CGROUP NETNS …` is the
//! client it starts where resil enforces (in the lab's cgroup and client namespace):
//!
//! - `connect ADDR MILLIS [RATE]`: connections opened and closed for MILLIS (paced at RATE
//!   per second if given); prints how many.
//! - `repeat ADDR N` / `repeat-read ADDR N`: N connections one after the other (with a read,
//!   for a proxy that accepts first); one JSON line each.
//! - `loop ADDR MILLIS INTERVAL_MS connect|read`: an attempt every INTERVAL_MS, each in its
//!   own thread with a 1 s timeout, for MILLIS; one JSON line each.

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::sched::{setns, CloneFlags};
use resil_tests::bench::{self, datapath, failover, traffic, Plan, Section};

const TIMEOUT: Duration = Duration::from_secs(1);

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One attempt: connect (and, with `read`, send a byte and wait for an answer or the end).
fn attempt(addr: SocketAddr, read: bool) -> String {
    let t = unix_now();
    let start = Instant::now();
    let result = TcpStream::connect_timeout(&addr, TIMEOUT).and_then(|mut s| {
        if read {
            s.set_read_timeout(Some(TIMEOUT))?;
            s.write_all(b"x")?;
            let mut buf = [0u8; 1];
            if s.read(&mut buf)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        resil_tests::reset_on_close(&s);
        Ok(())
    });
    let us = start.elapsed().as_secs_f64() * 1e6;
    let outcome = match result {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{:?}", e.kind()),
    };
    format!("{{\"t\":{t:.6},\"outcome\":\"{outcome}\",\"us\":{us:.1}}}")
}

fn client(args: &[String]) -> Result<()> {
    let [cgroup, netns, mode, rest @ ..] = args else {
        bail!("usage: resil-bench client CGROUP NETNS MODE …");
    };
    std::fs::write(
        Path::new(cgroup).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .context("join the cgroup")?;
    setns(
        File::open(format!("/run/netns/{netns}"))?,
        CloneFlags::CLONE_NEWNET,
    )
    .context("enter the namespace")?;
    let mut out = std::io::stdout().lock();
    match (mode.as_str(), rest) {
        ("connect", [addr, millis, rate @ ..]) => {
            let rate = rate.first().map(|r| r.parse()).transpose()?;
            let done =
                traffic::connect_loop(addr.parse()?, Duration::from_millis(millis.parse()?), rate);
            writeln!(out, "{done}")?;
        }
        ("repeat" | "repeat-read", [addr, n]) => {
            let addr: SocketAddr = addr.parse()?;
            for _ in 0..n.parse::<usize>()? {
                writeln!(out, "{}", attempt(addr, mode == "repeat-read"))?;
            }
        }
        ("loop", [addr, millis, interval, kind]) => {
            let addr: SocketAddr = addr.parse()?;
            let read = kind == "read";
            let interval = Duration::from_millis(interval.parse()?);
            let end = Instant::now() + Duration::from_millis(millis.parse()?);
            let mut threads = Vec::new();
            while Instant::now() < end {
                threads.push(thread::spawn(move || attempt(addr, read)));
                thread::sleep(interval);
            }
            for t in threads {
                writeln!(out, "{}", t.join().unwrap_or_default())?;
            }
        }
        _ => bail!("unknown client mode {mode} {rest:?}"),
    }
    Ok(())
}

/// The breaker engine's figures, from `cargo bench --bench engine` (run first by xtask).
fn engine(dir: &Path) -> Section {
    let mut section = Section::new(
        "Daemon tick",
        "The breaker engine's tick at 1k, 10k and 100k tracked endpoints (`cargo bench --bench engine`, run first by `cargo xtask bench`): every endpoint recording one outcome per tick, and every circuit open with only time passing. Median and p99 over 200 ticks of one run.",
    );
    let Ok(text) = std::fs::read_to_string(dir.join("engine.json")) else {
        section.skip(
            "engine ticks",
            "target/bench/engine.json is missing (run cargo xtask bench)",
        );
        return section;
    };
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
    for row in rows {
        let scenario = match row["scenario"].as_str() {
            Some("outcomes") => "one outcome each + tick",
            Some("tick_open") => "all open, tick only",
            Some("table") => "endpoint table: read counters, snapshots, recent figures",
            _ => continue,
        };
        let endpoints = row["endpoints"].as_u64().unwrap_or(0);
        for (key, what) in [("median_us", "median"), ("p99_us", "p99")] {
            if let Some(v) = row[key].as_f64() {
                section.add(
                    format!("{endpoints} endpoints, {scenario}, {what}"),
                    "µs",
                    &[v],
                    "",
                );
            }
        }
    }
    section
}

/// The write end of the pipe the signal handler wakes the clean-up thread through.
static WAKE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(_: nix::libc::c_int) {
    let fd = WAKE.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; the buffer is a static byte.
    unsafe { nix::libc::write(fd, b"x".as_ptr().cast(), 1) };
}

/// Ctrl-C or SIGTERM: remove the labs, stop their processes, put the kernel's statistics
/// setting back, and exit. The handler only writes to a pipe; a thread does the work. (Blocking
/// the signals instead would block them in every daemon this run starts, too.)
fn on_interrupt_clean_up() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let (read, write) = nix::unistd::pipe().context("a pipe for signals")?;
    WAKE.store(
        std::os::fd::IntoRawFd::into_raw_fd(write),
        std::sync::atomic::Ordering::Relaxed,
    );
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only calls write(2).
        unsafe { sigaction(signal, &action) }.context("handle SIGINT and SIGTERM")?;
    }
    thread::spawn(move || {
        let mut byte = [0u8; 1];
        if nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&read), &mut byte).is_ok() {
            eprintln!("resil-bench: interrupted; removing the labs");
            datapath::BpfStats::restore();
            resil_tests::cleanup::everything();
            std::process::exit(130);
        }
    });
    Ok(())
}

/// Runs one section (unless `only` names others) and keeps its result, or why it failed.
fn run_section(
    sections: &mut Vec<Section>,
    only: Option<&str>,
    title: &'static str,
    f: impl FnOnce() -> Result<Vec<Section>>,
) {
    if only.is_some_and(|word| !title.to_lowercase().contains(&word.to_lowercase())) {
        return;
    }
    eprintln!("resil-bench: {title} …");
    match f() {
        Ok(mut s) => sections.append(&mut s),
        Err(e) => {
            let mut s = Section::new(title, "");
            s.skip(title, format!("{e:#}"));
            sections.push(s);
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("client") {
        return client(&args[1..]);
    }
    resil_tests::require_root();
    on_interrupt_clean_up()?;
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let plan = if quick { Plan::QUICK } else { Plan::FULL };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let mut sections = Vec::new();
    run_section(&mut sections, only, "Data path: synthetic packets", || {
        Ok(vec![datapath::synthetic(&plan)?])
    });
    run_section(
        &mut sections,
        only,
        "Throughput and latency overhead",
        || traffic::overhead(&plan),
    );
    run_section(&mut sections, only, "Fast-fail", || {
        Ok(vec![failover::fast_fail(&plan)?])
    });
    run_section(&mut sections, only, "Detection and recovery", || {
        Ok(vec![failover::detection(&plan)?])
    });
    run_section(&mut sections, only, "Daemon cost", || {
        Ok(vec![traffic::daemon_cost(&plan)?])
    });
    if only.is_none_or(|word| "daemon tick".contains(&word.to_lowercase())) {
        sections.push(engine(&dir));
    }
    while resil_tests::cleanup::closed() {
        // Interrupted: the clean-up thread removes the labs and ends the process; a report of
        // the sections cut short would only replace a better one.
        thread::sleep(Duration::from_secs(1));
    }
    bench::write(&dir, &plan, quick, &sections)?;
    let report = std::fs::read_to_string(dir.join("report.md"))?;
    println!("{report}");
    eprintln!(
        "resil-bench: wrote {}/report.md and report.json",
        dir.display()
    );
    Ok(())
}
