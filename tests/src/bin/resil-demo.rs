//! `cargo xtask demo`: resil in a lab of its own, live in the terminal. A client keeps
//! connecting to two dependencies; one dies and comes back, then the other's host vanishes
//! and returns. Watch resil detect each failure, refuse in microseconds instead of letting
//! the client wait, and close the circuit again when the dependency is back.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::{signal, SigHandler, Signal};

/// Set by Ctrl-C: the demo stops and cleans up instead of dying with its lab still there.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

use resil_tests::{sh, Attempt, Daemon, Lab, ServeMode, Server};

const ROUND: Duration = Duration::from_millis(400);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

struct Demo {
    lab: Lab,
    daemon: Daemon,
    api: SocketAddr,
    db: SocketAddr,
    start: Instant,
}

impl Demo {
    fn state(&self, endpoint: SocketAddr) -> String {
        let key = endpoint.to_string();
        self.daemon
            .status()
            .endpoints
            .into_iter()
            .find(|e| e.endpoint == key)
            .map(|e| format!("{:<9} fast-failed {:>3}", e.state, e.fast_failed))
            .unwrap_or_else(|| "-".into())
    }

    fn attempt(&self, endpoint: SocketAddr) -> Attempt {
        self.lab
            .connect_in_cgroup(endpoint, 1, CLIENT_TIMEOUT, false)
            .remove(0)
    }

    /// Runs rounds of one connect to each dependency for `how_long`, printing each.
    fn rounds(&self, how_long: Duration, phase: &str, times: &mut Vec<(String, String, Duration)>) {
        let until = Instant::now() + how_long;
        while Instant::now() < until && !STOP.load(Ordering::SeqCst) {
            let round = Instant::now();
            let api = self.attempt(self.api);
            let db = self.attempt(self.db);
            println!(
                "{:>5.1}s  api {:<18} {:>9}   db {:<18} {:>9}   | api: {}  db: {}",
                self.start.elapsed().as_secs_f64(),
                api.outcome,
                format_duration(api.elapsed),
                db.outcome,
                format_duration(db.elapsed),
                self.state(self.api),
                self.state(self.db),
            );
            times.push((phase.into(), format!("api {}", api.outcome), api.elapsed));
            times.push((phase.into(), format!("db {}", db.outcome), db.elapsed));
            if let Some(rest) = ROUND.checked_sub(round.elapsed()) {
                thread::sleep(rest);
            }
        }
    }
}

fn format_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

fn banner(text: &str) {
    println!("\n=== {text}");
}

fn main() -> anyhow::Result<()> {
    resil_tests::require_root();
    // SAFETY: the handler only stores to an atomic.
    unsafe { signal(Signal::SIGINT, SigHandler::Handler(on_interrupt)) }?;
    let lab = Lab::new("demo")?;
    // A second address on the server side: the database host.
    let db_ip = Ipv4Addr::new(10, 200, 0, 3);
    sh(
        "ip",
        &[
            "-n",
            &lab.server_ns,
            "addr",
            "add",
            "10.200.0.3/24",
            "dev",
            &lab.server_if,
        ],
    )?;
    let api = SocketAddr::new(lab.server_ip(resil_tests::Family::V4), 8080);
    let db = SocketAddr::new(IpAddr::V4(db_ip), 5432);
    let config = format!(
        "[daemon]\ntick = \"100ms\"\n\
         [defaults]\nconnect_timeout = \"500ms\"\nconsecutive_failures = 3\n\
         open_wait = \"2s\"\nopen_wait_max = \"4s\"\nopen_wait_jitter = 0.0\n\
         [[dependency]]\nname = \"api\"\nendpoints = [\"{api}\"]\n\
         [[dependency]]\nname = \"db\"\nendpoints = [\"{db}\"]\n"
    );
    let daemon = lab.daemon_with_config(&config)?;
    let api_server = lab.serve(8080, ServeMode::Echo)?;
    let mut db_server: Option<Server> = Some(lab.serve(5432, ServeMode::Echo)?);
    let demo = Demo {
        lab,
        daemon,
        api,
        db,
        start: Instant::now(),
    };
    let mut times = Vec::new();
    println!("resil demo: a client connects to api ({api}) and db ({db}) every {ROUND:?},");
    println!("with a {CLIENT_TIMEOUT:?} connect timeout. resil runs with 3 consecutive failures to open,");
    println!("a 500 ms handshake timeout and a 2 s wait before probing. Ctrl-C cleans up too.");

    banner("all healthy");
    demo.rounds(Duration::from_secs(2), "healthy", &mut times);

    banner("db dies: its port refuses; resil opens the circuit and refuses in the kernel");
    db_server.take();
    demo.rounds(Duration::from_secs(4), "db down", &mut times);

    banner("db comes back: half-open, one probe, closed");
    db_server = Some(demo.lab.serve(5432, ServeMode::Echo)?);
    demo.rounds(Duration::from_secs(4), "db back", &mut times);

    banner("api's host vanishes: SYNs go unanswered; clients would wait their full timeout");
    demo.lab.server_input_rule("ip daddr 10.200.0.2 drop")?;
    demo.rounds(Duration::from_secs(6), "api host gone", &mut times);
    banner("what resil reports now (resil report)");
    let out = demo.daemon.cli(&["report"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    banner("api's host returns");
    demo.lab.clear_server_rules()?;
    demo.rounds(Duration::from_secs(6), "api host back", &mut times);

    banner("what the client saw (median connect time per phase and outcome)");
    // Phases in the order they ran.
    let mut groups: Vec<(String, String)> = Vec::new();
    for (p, o, _) in &times {
        if !groups.iter().any(|(gp, go)| gp == p && go == o) {
            groups.push((p.clone(), o.clone()));
        }
    }
    for (phase, outcome) in groups {
        let mut d: Vec<Duration> = times
            .iter()
            .filter(|(p, o, _)| *p == phase && *o == outcome)
            .map(|(_, _, d)| *d)
            .collect();
        d.sort();
        println!(
            "  {phase:<14} {outcome:<24} x{:<3} median {}",
            d.len(),
            format_duration(d[d.len() / 2])
        );
    }
    banner("breaker transitions and findings (resil events)");
    let out = demo.daemon.cli(&["events"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    drop(api_server);
    drop(db_server);
    println!("\nCleaning up: namespaces, cgroup and daemon go away.");
    Ok(())
}
