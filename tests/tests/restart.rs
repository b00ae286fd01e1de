//! Restarts without loss: a daemon stopped (SIGTERM, as `systemctl restart` does) or crashed
//! (SIGKILL) and started again adopts the pinned links, maps and circuits: an open circuit
//! stays open, connections stay refused in the kernel throughout, and counters keep counting.

use std::{net::SocketAddr, time::Duration};

use nix::sys::signal::Signal;
use resil_tests::{Daemon, Family, Lab};

const SETTLE: Duration = Duration::from_secs(10);

/// Verdicts outlive the daemon this long: far more than a restart takes, so the test sees the
/// kernel keep refusing while no daemon runs.
const CONFIG: &str = "[daemon]\nfail_open_after = \"60s\"\n\n[defaults]\nconsecutive_failures = 3\nopen_wait = \"1m\"\n";

fn refused_in_the_kernel(lab: &Lab, addr: SocketAddr, n: usize) {
    for a in lab.connect_in_cgroup(addr, n, Duration::from_secs(5), false) {
        assert_eq!(a.outcome, "ConnectionRefused", "{a:?}");
        // Microseconds in the kernel; the bound only has to hold on a busy machine.
        assert!(a.elapsed < Duration::from_millis(50), "{a:?}");
    }
}

fn open_circuit(lab: &Lab, daemon: &Daemon, addr: SocketAddr) -> resil_tests::EndpointStatus {
    lab.connect_in_cgroup(addr, 3, Duration::from_secs(5), false);
    let e = daemon.wait_for(&addr.to_string(), SETTLE, |e| {
        e.state == "open" && e.refused >= 3
    });
    assert_eq!(e.state, "open", "{e:?}\n{}", daemon.log_text());
    e
}

#[test]
fn an_open_circuit_survives_restarts_and_crashes_and_keeps_counting() {
    let lab = Lab::new("rs").unwrap();
    let mut daemon = lab.daemon_with_config(CONFIG).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    let endpoint = addr.to_string();
    let opened = open_circuit(&lab, &daemon, addr);
    let reason = opened.reason.clone().unwrap();
    assert_eq!(opened.refused, 3, "{opened:?}");
    refused_in_the_kernel(&lab, addr, 2);
    let before = daemon.wait_for(&endpoint, SETTLE, |e| e.fast_failed >= 2);
    assert_eq!(before.fast_failed, 2, "{before:?}");

    // A stop: the kernel keeps refusing with no daemon running.
    let status = daemon.stop().unwrap();
    assert!(status.success(), "{status}");
    refused_in_the_kernel(&lab, addr, 3);
    // The next daemon finds the circuit open, for the same reason, and the counters as the
    // kernel kept them (5 fast-failed: 2 before the stop, 3 while stopped).
    daemon.start_again().unwrap();
    let after = daemon.wait_for(&endpoint, SETTLE, |e| e.fast_failed >= 5);
    assert_eq!(after.state, "open", "{after:?}\n{}", daemon.log_text());
    assert_eq!(after.reason.as_deref(), Some(reason.as_str()), "{after:?}");
    assert_eq!((after.refused, after.fast_failed), (3, 5), "{after:?}");
    assert!(
        daemon.log_text().contains("restored 1 circuits"),
        "{}",
        daemon.log_text()
    );
    refused_in_the_kernel(&lab, addr, 1);

    // A crash: nothing was saved at exit, the circuit was saved when it changed.
    daemon.restart(Signal::SIGKILL).unwrap();
    let crashed = daemon.wait_for(&endpoint, SETTLE, |e| e.fast_failed >= 6);
    assert_eq!(crashed.state, "open", "{crashed:?}");
    assert_eq!(crashed.fast_failed, 6, "{crashed:?}");
    refused_in_the_kernel(&lab, addr, 1);
    let counted = daemon.wait_for(&endpoint, SETTLE, |e| e.fast_failed >= 7);
    assert_eq!(counted.fast_failed, 7, "keeps counting: {counted:?}");
    // Adopted, not added: one program each way on the interface, two on the cgroup.
    let links = std::fs::read_dir(daemon.pin_dir.join("links"))
        .unwrap()
        .count();
    assert_eq!(links, 4);
}

#[test]
fn manual_states_survive_a_restart_and_a_reset_is_saved_too() {
    let lab = Lab::new("rm").unwrap();
    let mut daemon = lab.daemon_with_config(CONFIG).unwrap();
    let tripped: SocketAddr = SocketAddr::new(lab.server_ip(Family::V4), 9001);
    let disabled: SocketAddr = SocketAddr::new(lab.server_ip(Family::V6), 9002);
    for (verb, addr) in [("trip", tripped), ("disable", disabled)] {
        let out = daemon.cli(&[verb, &addr.to_string()]).unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    daemon.restart(Signal::SIGTERM).unwrap();
    let state = |daemon: &Daemon, addr: SocketAddr| {
        daemon
            .status()
            .endpoints
            .into_iter()
            .find(|e| e.endpoint == addr.to_string())
            .map(|e| e.state)
    };
    assert_eq!(state(&daemon, tripped).as_deref(), Some("forced_open"));
    assert_eq!(state(&daemon, disabled).as_deref(), Some("disabled"));
    refused_in_the_kernel(&lab, tripped, 1);
    // A reset after the restart is remembered by the next one.
    let out = daemon.cli(&["reset", &tripped.to_string()]).unwrap();
    assert!(out.status.success(), "{out:?}");
    daemon.restart(Signal::SIGTERM).unwrap();
    assert_eq!(state(&daemon, tripped).as_deref(), Some("closed"));
    // Connections go out again: the SYN reaches the peer, which refuses it itself.
    let before = daemon.wait_for(&tripped.to_string(), SETTLE, |_| true);
    lab.connect_in_cgroup(tripped, 1, Duration::from_secs(5), false);
    let after = daemon.wait_for(&tripped.to_string(), SETTLE, |e| e.refused > before.refused);
    assert_eq!(after.refused, before.refused + 1, "{after:?}");
    assert_eq!(after.fast_failed, before.fast_failed, "{after:?}");
}

/// The XDP mode the client interface runs: "generic", "native" or none.
fn xdp_mode(lab: &Lab) -> Option<&'static str> {
    let link = resil_tests::sh(
        "ip",
        &["-n", &lab.client_ns, "link", "show", "dev", &lab.client_if],
    )
    .unwrap();
    let first = link.lines().next().unwrap_or_default();
    if first.contains(" xdpgeneric ") {
        Some("generic")
    } else if first.contains(" xdp ") {
        Some("native")
    } else {
        None
    }
}

#[test]
fn a_restart_in_another_xdp_mode_takes_the_interface_over() {
    let lab = Lab::new("xm").unwrap();
    // Refusals never open the circuit here: every attempt reaches the peer and is observed.
    let config = "[defaults]\nconsecutive_failures = 0\nminimum_calls = 1000\n";
    let mut daemon = lab
        .daemon_with_args(config, &["--xdp-mode", "native"])
        .unwrap();
    assert_eq!(xdp_mode(&lab), Some("native"));
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    let endpoint = addr.to_string();
    let mut refused = 0;
    for (args, mode) in [
        (&[][..], "generic"),
        (&["--xdp-mode", "native"][..], "native"),
        (&["--xdp-mode", "generic"][..], "generic"),
    ] {
        daemon.restart_with_args(args).unwrap();
        assert_eq!(
            xdp_mode(&lab),
            Some(mode),
            "{args:?}\n{}",
            daemon.log_text()
        );
        // The new program observes: the peer's refusals arrive at XDP ingress.
        for a in lab.connect_in_cgroup(addr, 2, Duration::from_secs(5), false) {
            assert_eq!(a.outcome, "ConnectionRefused", "{a:?}");
        }
        refused += 2;
        let e = daemon.wait_for(&endpoint, SETTLE, |e| e.refused >= refused);
        assert_eq!(e.refused, refused, "{args:?}: {e:?}\n{}", daemon.log_text());
    }
}
