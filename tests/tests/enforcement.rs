//! Kernel fast-fail end to end: once a circuit opens, connect() from the protected cgroup
//! fails at once with ECONNREFUSED and sends nothing; half-open admits exactly its probes;
//! a dead or hung daemon can never keep traffic blocked; forwarded SYNs get a RST.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use resil_tests::{Daemon, Family, Lab, RoutedLab, ServeMode};

const SETTLE: Duration = Duration::from_secs(10);
/// A refusal from the kernel takes microseconds; this bound only has to hold on a busy
/// machine and still be far below any network round trip or timeout. The real figure is in
/// `cargo xtask bench`.
const FAST: Duration = Duration::from_millis(50);

/// Polls until the endpoint reaches `state` (or fails with what it saw).
fn wait_state(daemon: &Daemon, endpoint: &str, state: &str) {
    let e = daemon.wait_for(endpoint, SETTLE, |e| e.state == state);
    assert_eq!(e.state, state, "{e:?}\n{}", daemon.log_text());
}

fn refused_fast(lab: &Lab, addr: SocketAddr, n: usize) {
    for a in lab.connect_in_cgroup(addr, n, Duration::from_secs(5), false) {
        assert_eq!(a.outcome, "ConnectionRefused", "{a:?}");
        assert!(a.elapsed < FAST, "refused in {:?}", a.elapsed);
    }
}

fn a_stopped_server_is_refused_in_the_kernel(family: Family) {
    let lab = Lab::new("ff").unwrap();
    let config = "[defaults]\nconsecutive_failures = 3\nopen_wait = \"1m\"\n";
    let daemon = lab.daemon_with_config(config).unwrap();
    let addr = SocketAddr::new(lab.server_ip(family), 8080);
    let endpoint = lab.server_endpoint(family, 8080);
    let server = lab.serve(8080, ServeMode::Echo).unwrap();
    let ok = lab.connect_in_cgroup(addr, 2, Duration::from_secs(5), false);
    assert!(ok.iter().all(|a| a.outcome == "ok"), "{ok:?}");
    drop(server);
    // Three real refusals by the peer open the circuit ...
    let peer = lab.connect_in_cgroup(addr, 3, Duration::from_secs(5), false);
    assert!(
        peer.iter().all(|a| a.outcome == "ConnectionRefused"),
        "{peer:?}"
    );
    wait_state(&daemon, &endpoint, "open");
    let before = daemon.wait_for(&endpoint, SETTLE, |e| e.attempts >= 5);
    assert_eq!(before.attempts, 5, "{before:?}");
    // ... after which the kernel refuses at once, without sending a SYN.
    refused_fast(&lab, addr, 5);
    let after = daemon.wait_for(&endpoint, SETTLE, |e| e.fast_failed >= 5);
    assert_eq!(after.fast_failed, 5, "{after:?}");
    assert_eq!(
        after.attempts, before.attempts,
        "no SYN left for a refused connect"
    );
}

#[test]
fn a_stopped_server_is_refused_in_the_kernel_ipv4() {
    a_stopped_server_is_refused_in_the_kernel(Family::V4);
}

#[test]
fn a_stopped_server_is_refused_in_the_kernel_ipv6() {
    a_stopped_server_is_refused_in_the_kernel(Family::V6);
}

#[test]
fn a_blackholed_host_fails_fast_instead_of_hanging() {
    let lab = Lab::new("bf").unwrap();
    lab.server_input_rule("tcp dport 7777 drop").unwrap();
    let config =
        "[defaults]\nconnect_timeout = \"300ms\"\nconsecutive_failures = 3\nopen_wait = \"1m\"\n";
    let daemon = lab.daemon_with_config(config).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 7777);
    let endpoint = lab.server_endpoint(Family::V4, 7777);
    let hung = lab.connect_in_cgroup(addr, 3, Duration::from_millis(800), true);
    assert!(hung.iter().all(|a| a.outcome == "TimedOut"), "{hung:?}");
    wait_state(&daemon, &endpoint, "open");
    refused_fast(&lab, addr, 5);
}

#[test]
fn half_open_admits_exactly_its_probes_then_recovery_closes() {
    let lab = Lab::new("hp").unwrap();
    lab.server_input_rule("tcp dport 7000 drop").unwrap();
    let config = "[defaults]\nconnect_timeout = \"300ms\"\nconsecutive_failures = 3\n\
                  open_wait = \"500ms\"\nopen_wait_max = \"500ms\"\nopen_wait_jitter = 0.0\n\
                  half_open_probes = 2\n";
    let daemon = lab.daemon_with_config(config).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 7000);
    let endpoint = lab.server_endpoint(Family::V4, 7000);
    lab.connect_in_cgroup(addr, 3, Duration::from_millis(800), true);
    wait_state(&daemon, &endpoint, "open");
    wait_state(&daemon, &endpoint, "half_open");
    // Ten at once while the peer is still blackholed: exactly two get through (and hang),
    // the other eight are refused at once.
    let burst = lab.connect_in_cgroup(addr, 10, Duration::from_millis(1500), true);
    let through = burst.iter().filter(|a| a.outcome == "TimedOut").count();
    let refused = burst
        .iter()
        .filter(|a| a.outcome == "ConnectionRefused")
        .count();
    assert_eq!((through, refused), (2, 8), "{burst:?}");
    // The probes timed out: the circuit reopened (and, 500 ms on, half-opens again).
    let deadline = Instant::now() + SETTLE;
    while !daemon
        .log_text()
        .contains("half_open → open: probe failed: timeout")
    {
        assert!(Instant::now() < deadline, "{}", daemon.log_text());
        thread::sleep(Duration::from_millis(50));
    }
    // Now the dependency comes back.
    lab.clear_server_rules().unwrap();
    let _server = lab.serve(7000, ServeMode::Echo).unwrap();
    wait_state(&daemon, &endpoint, "half_open");
    let probes = lab.connect_in_cgroup(addr, 2, Duration::from_secs(2), true);
    assert!(probes.iter().all(|a| a.outcome == "ok"), "{probes:?}");
    wait_state(&daemon, &endpoint, "closed");
    let flowing = lab.connect_in_cgroup(addr, 10, Duration::from_secs(2), true);
    assert!(flowing.iter().all(|a| a.outcome == "ok"), "{flowing:?}");
}

/// Trips `endpoint` by hand and checks the kernel refuses it.
fn trip(lab: &Lab, daemon: &Daemon, addr: SocketAddr) {
    let out = daemon.cli(&["trip", &addr.to_string()]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused_fast(lab, addr, 1);
}

#[test]
fn a_killed_daemon_stops_enforcing() {
    let lab = Lab::new("k9").unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let mut daemon = lab.daemon().unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    trip(&lab, &daemon, addr);
    let killed = Instant::now();
    daemon.signal(Signal::SIGKILL);
    while daemon.running() {
        thread::sleep(Duration::from_millis(10));
    }
    // fail_open_after is 3 s; generous margin on top.
    loop {
        let a = &lab.connect_in_cgroup(addr, 1, Duration::from_secs(2), false)[0];
        if a.outcome == "ok" {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(6),
            "still refused: {a:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_hung_daemon_stops_enforcing_when_its_verdicts_expire() {
    let lab = Lab::new("hg").unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let daemon = lab
        .daemon_with_config("[daemon]\nfail_open_after = \"2s\"\n")
        .unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    trip(&lab, &daemon, addr);
    daemon.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    // Still enforced for a while: the verdict has not expired yet.
    let first = &lab.connect_in_cgroup(addr, 1, Duration::from_secs(2), false)[0];
    let elapsed = stopped.elapsed();
    if elapsed < Duration::from_millis(1500) {
        assert_eq!(first.outcome, "ConnectionRefused", "{first:?}");
    }
    let flows = loop {
        let a = &lab.connect_in_cgroup(addr, 1, Duration::from_secs(2), false)[0];
        if a.outcome == "ok" {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(6),
            "still refused: {a:?}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    daemon.signal(Signal::SIGCONT);
    assert!(
        flows >= Duration::from_millis(1500),
        "lapsed too early: {flows:?}"
    );
}

#[test]
fn metrics_only_refuses_nothing_and_counts_what_it_would_have() {
    let lab = Lab::new("mx").unwrap();
    let config =
        "[defaults]\nmode = \"metrics_only\"\nconsecutive_failures = 3\nopen_wait = \"1m\"\n";
    let daemon = lab.daemon_with_config(config).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 9090);
    let endpoint = lab.server_endpoint(Family::V4, 9090);
    lab.connect_in_cgroup(addr, 3, Duration::from_secs(5), false);
    let e = daemon.wait_for(&endpoint, SETTLE, |e| e.reason.is_some());
    assert_eq!(e.state, "metrics_only", "{e:?}");
    let attempts = e.attempts;
    // The peer refuses (a real RST): resil let the SYN go.
    for a in lab.connect_in_cgroup(addr, 4, Duration::from_secs(5), false) {
        assert_eq!(a.outcome, "ConnectionRefused");
    }
    let e = daemon.wait_for(&endpoint, SETTLE, |e| e.would_fast_fail >= 4);
    assert_eq!((e.would_fast_fail, e.fast_failed), (4, 0), "{e:?}");
    assert_eq!(e.attempts, attempts + 4, "every SYN went out");
}

#[test]
fn manual_trip_reset_and_disable() {
    let lab = Lab::new("mn").unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let config = format!(
        "[defaults]\nconsecutive_failures = 2\n[[dependency]]\nname = \"web\"\nendpoints = [\"{}\"]\n",
        lab.server_endpoint(Family::V4, 8080)
    );
    let daemon = lab.daemon_with_config(&config).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    let run = |args: &[&str]| {
        let out = daemon.cli(args).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // By dependency name.
    assert_eq!(
        run(&["trip", "web"]).trim(),
        format!("web ({addr}): forced_open")
    );
    refused_fast(&lab, addr, 2);
    assert_eq!(
        run(&["reset", "web"]).trim(),
        format!("web ({addr}): closed")
    );
    let ok = lab.connect_in_cgroup(addr, 2, Duration::from_secs(2), false);
    assert!(ok.iter().all(|a| a.outcome == "ok"), "{ok:?}");
    // Disabled: failures no longer open it.
    assert!(run(&["disable", &addr.to_string()]).contains("disabled"));
    let dead = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    drop(_server);
    lab.connect_in_cgroup(dead, 4, Duration::from_secs(2), false);
    let e = daemon.wait_for(&addr.to_string(), SETTLE, |e| e.refused >= 4);
    assert_eq!(e.state, "disabled", "{e:?}");
    let events = daemon.events();
    let manual = events
        .iter()
        .filter(|e| e["kind"] == "transition" && e["reason"] == "set by an operator")
        .count();
    assert_eq!(manual, 3, "{events:?}");
    // Bad targets are one clear sentence and a failure.
    let out = daemon.cli(&["trip", "nope"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither an endpoint"));
}

fn forwarded_syns_get_a_rst(family: Family) {
    let lab = RoutedLab::new("fw").unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let daemon = lab.daemon("").unwrap();
    let server = match family {
        Family::V4 => "10.200.0.2:8080",
        Family::V6 => "[fd00:200::2]:8080",
    };
    let addr: SocketAddr = server.parse().unwrap();
    // Routed and allowed at first.
    lab.client(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("routed"));
    let out = daemon.cli(&["trip", server]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The client is in another namespace, beyond any cgroup hook: the router's TC program
    // answers its SYN with a RST.
    for _ in 0..3 {
        let start = Instant::now();
        let err = lab
            .client(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
        assert!(start.elapsed() < FAST, "refused in {:?}", start.elapsed());
    }
    let e = daemon.wait_for(server, SETTLE, |e| e.fast_failed >= 3);
    assert_eq!(e.fast_failed, 3, "{e:?}");
    let out = daemon.cli(&["reset", server]).unwrap();
    assert!(out.status.success());
    lab.client(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("flows again"));
}

#[test]
fn forwarded_syns_get_a_rst_ipv4() {
    forwarded_syns_get_a_rst(Family::V4);
}

#[test]
fn forwarded_syns_get_a_rst_ipv6() {
    forwarded_syns_get_a_rst(Family::V6);
}

#[test]
fn a_probe_that_does_not_count_is_replaced_by_exactly_one_more() {
    let lab = Lab::new("pr").unwrap();
    // Timeouts do not count under this policy: a probe that times out decides nothing.
    let config = "[defaults]\nfailures = [\"refused\"]\nconnect_timeout = \"300ms\"\n\
                  consecutive_failures = 3\nopen_wait = \"300ms\"\nopen_wait_jitter = 0.0\n\
                  half_open_probes = 1\n";
    let daemon = lab.daemon_with_config(config).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 7100);
    let endpoint = lab.server_endpoint(Family::V4, 7100);
    // Nothing listens: refusals open the circuit. Then the port goes silent.
    lab.connect_in_cgroup(addr, 3, Duration::from_secs(2), false);
    wait_state(&daemon, &endpoint, "open");
    lab.server_input_rule("tcp dport 7100 drop").unwrap();
    wait_state(&daemon, &endpoint, "half_open");
    for round in 0..2 {
        // Each round: exactly one attempt holds a token; when its timeout (which does not
        // count) comes, the daemon hands out exactly one more.
        let burst = lab.connect_in_cgroup(addr, 5, Duration::from_millis(800), true);
        let through = burst.iter().filter(|a| a.outcome == "TimedOut").count();
        assert_eq!(through, 1, "round {round}: {burst:?}");
        assert_eq!(
            daemon.wait_for(&endpoint, SETTLE, |_| true).state,
            "half_open"
        );
    }
}
