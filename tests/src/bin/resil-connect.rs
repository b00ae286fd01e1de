//! A test client that runs where resil enforces: it joins a cgroup and a network namespace,
//! makes TCP connections and prints one JSON line per attempt (outcome and time taken).
//!
//! `resil-connect CGROUP NETNS ADDR COUNT TIMEOUT_MS [parallel]`

use std::{
    fs::File,
    io::Write,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use nix::sched::{setns, CloneFlags};

fn attempt(addr: SocketAddr, timeout: Duration) -> String {
    let start = Instant::now();
    let result = TcpStream::connect_timeout(&addr, timeout);
    let elapsed_us = start.elapsed().as_micros();
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("{:?}", e.kind()),
    };
    format!("{{\"outcome\":\"{outcome}\",\"elapsed_us\":{elapsed_us}}}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, cgroup, netns, addr, count, timeout_ms, rest @ ..] = args.as_slice() else {
        eprintln!("usage: resil-connect CGROUP NETNS ADDR COUNT TIMEOUT_MS [parallel]");
        std::process::exit(2);
    };
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("join the cgroup");
    let ns = File::open(format!("/run/netns/{netns}")).expect("open the netns");
    setns(ns, CloneFlags::CLONE_NEWNET).expect("enter the netns");
    let addr: SocketAddr = addr.parse().expect("ADDR");
    let count: usize = count.parse().expect("COUNT");
    let timeout = Duration::from_millis(timeout_ms.parse().expect("TIMEOUT_MS"));
    let lines: Vec<String> = if rest.first().map(String::as_str) == Some("parallel") {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..count)
                .map(|_| s.spawn(move || attempt(addr, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("attempt"))
                .collect()
        })
    } else {
        (0..count).map(|_| attempt(addr, timeout)).collect()
    };
    let mut out = std::io::stdout().lock();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
}
