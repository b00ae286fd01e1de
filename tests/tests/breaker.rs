//! The circuit breaker driven by real connections: a dependency that dies opens its circuit
//! with the reason, comes back through HALF_OPEN, and policies reload on SIGHUP.

use std::{
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use resil_tests::{resil_bin, Daemon, Family, Lab, ServeMode};

const SETTLE: Duration = Duration::from_secs(10);

fn attempt(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
}

fn state_of(daemon: &Daemon, endpoint: &str) -> Option<String> {
    daemon
        .status()
        .endpoints
        .into_iter()
        .find(|e| e.endpoint == endpoint)
        .map(|e| e.state)
}

/// Polls until the endpoint reaches `state` (or fails with what it saw).
fn wait_state(daemon: &Daemon, endpoint: &str, state: &str) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = state_of(daemon, endpoint);
        if now.as_deref() == Some(state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{endpoint} never became {state} (is {now:?})\n{}",
            daemon.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn stopped_server_opens_then_recovers(family: Family) {
    let lab = Lab::new("br").unwrap();
    let config = "[defaults]\nopen_wait = \"300ms\"\nopen_wait_jitter = 0.0\n";
    let daemon = lab.daemon_with_config(config).unwrap();
    let addr = SocketAddr::new(lab.server_ip(family), 8080);
    let endpoint = lab.server_endpoint(family, 8080);

    let server = lab.serve(8080, ServeMode::Echo).unwrap();
    lab.client(|| {
        for _ in 0..3 {
            attempt(addr).expect("the dependency is up");
        }
    });
    wait_state(&daemon, &endpoint, "closed");

    // The dependency dies: every connect is refused.
    drop(server);
    lab.client(|| {
        for _ in 0..5 {
            attempt(addr).expect_err("the dependency is down");
        }
    });
    wait_state(&daemon, &endpoint, "open");
    let e = daemon.wait_for(&endpoint, SETTLE, |e| e.reason.is_some());
    assert_eq!(e.reason.as_deref(), Some("5 consecutive failures"), "{e:?}");

    // It comes back; after the 300 ms wait the circuit half-opens, and the first connection
    // is the probe that closes it.
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    wait_state(&daemon, &endpoint, "half_open");
    lab.client(|| attempt(addr).expect("the dependency is back"));
    wait_state(&daemon, &endpoint, "closed");
    let e = daemon.wait_for(&endpoint, SETTLE, |_| true);
    assert_eq!(e.reason.as_deref(), Some("1 probe(s) succeeded"), "{e:?}");

    let transitions: Vec<(String, String)> = daemon
        .events()
        .iter()
        .filter(|e| e["kind"] == "transition")
        .map(|e| {
            (
                e["from"].as_str().unwrap().into(),
                e["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected = [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ];
    assert_eq!(
        transitions,
        expected.map(|(a, b)| (a.to_string(), b.to_string())),
        "{transitions:?}"
    );
}

#[test]
fn a_stopped_server_opens_the_circuit_and_its_return_closes_it_ipv4() {
    stopped_server_opens_then_recovers(Family::V4);
}

#[test]
fn a_stopped_server_opens_the_circuit_and_its_return_closes_it_ipv6() {
    stopped_server_opens_then_recovers(Family::V6);
}

#[test]
fn sighup_reloads_the_policy_and_keeps_the_state() {
    let lab = Lab::new("hu").unwrap();
    // At first nothing can open the circuit.
    let lenient = "[defaults]\nconsecutive_failures = 0\nminimum_calls = 1000\n";
    let mut daemon = lab.daemon_with_config(lenient).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 9000);
    let endpoint = lab.server_endpoint(Family::V4, 9000);
    lab.client(|| {
        for _ in 0..5 {
            attempt(addr).expect_err("nothing listens");
        }
    });
    let e = daemon.wait_for(&endpoint, SETTLE, |e| e.refused >= 5);
    assert_eq!(
        (e.state.as_str(), e.dependency.as_deref()),
        ("closed", None)
    );

    // A stricter policy for a named dependency, then SIGHUP.
    let strict = format!(
        "{lenient}[[dependency]]\nname = \"billing\"\nendpoints = [\"{endpoint}\"]\npolicy = {{ consecutive_failures = 2 }}\n"
    );
    std::fs::write(daemon.config_path(), strict).unwrap();
    daemon.signal(Signal::SIGHUP);
    let e = daemon.wait_for(&endpoint, SETTLE, |e| e.dependency.is_some());
    assert_eq!(e.dependency.as_deref(), Some("billing"));
    assert_eq!((e.state.as_str(), e.refused), ("closed", 5), "figures kept");
    lab.client(|| {
        for _ in 0..2 {
            attempt(addr).expect_err("nothing listens");
        }
    });
    wait_state(&daemon, &endpoint, "open");

    // An invalid file is refused; the daemon keeps running with what it had.
    std::fs::write(daemon.config_path(), "[defaults]\nminimum_calls = -1\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    let deadline = Instant::now() + SETTLE;
    while !daemon.log_text().contains("configuration not reloaded") {
        assert!(Instant::now() < deadline, "{}", daemon.log_text());
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        daemon.log_text().contains("line 2: minimum_calls"),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.running());
    let e = daemon.wait_for(&endpoint, SETTLE, |_| true);
    assert_eq!(
        (e.state.as_str(), e.dependency.as_deref()),
        ("open", Some("billing"))
    );
}

#[test]
fn metrics_only_reports_what_it_would_do() {
    let lab = Lab::new("mo").unwrap();
    let daemon = lab
        .daemon_with_config("[defaults]\nmode = \"metrics_only\"\n")
        .unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 9001);
    let endpoint = lab.server_endpoint(Family::V4, 9001);
    lab.client(|| {
        for _ in 0..5 {
            attempt(addr).expect_err("nothing listens");
        }
    });
    let e = daemon.wait_for(&endpoint, SETTLE, |e| e.reason.is_some());
    assert_eq!(e.state, "metrics_only", "{e:?}");
    assert_eq!(e.reason.as_deref(), Some("5 consecutive failures"));
}

#[test]
fn config_check_and_explain() {
    let dir = std::env::temp_dir().join(format!("resil-cfgcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[dependency]]\nname = \"postgres\"\nendpoints = [\"10.0.3.0/24:5432\"]\npolicy = { half_open_probes = 3 }\n",
    )
    .unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[defaults]\nfailure_rate_threshold = 2\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(resil_bin()).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = good.to_string_lossy().into_owned();
    let (code, out, _) = run(&["config", "check", &good]);
    assert_eq!(code, Some(0));
    assert!(out.contains("valid (1 dependency)"), "{out}");
    let (code, _, err) = run(&["config", "check", &bad.to_string_lossy()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bad.toml line 2: failure_rate_threshold: expected a number above 0 and at most 1, not 2"),
        "{err}"
    );
    let (code, out, _) = run(&["config", "explain", "10.0.3.9:5432", "--config", &good]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("dependency postgres (matched 10.0.3.0/24:5432)"),
        "{out}"
    );
    assert!(out.contains("half_open_probes = 3"), "{out}");
    let (_, out, _) = run(&[
        "config",
        "explain",
        "10.0.4.9:80",
        "--config",
        &good,
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dependency"], serde_json::Value::Null);
    assert_eq!(v["policy"]["consecutive_failures"], 5);
    let (code, _, err) = run(&["config", "explain", "not-an-endpoint", "--config", &good]);
    assert_eq!(code, Some(2), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
