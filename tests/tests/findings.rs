//! Failure reports by domain, from real failures in network namespaces: each scenario checks
//! the domain and the evidence `resil report` gives, and that the event stream says so.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use resil_tests::{
    dns::{self, DnsMode},
    resil_bin, Daemon, Family, Lab, RoutedLab, ServeMode,
};
use serde_json::Value;

/// Findings are assessed every second over the last 10 to 20 s: generous room.
const SETTLE: Duration = Duration::from_secs(20);

/// Waits until the report has a finding that `matches`; returns it.
fn wait_finding(daemon: &Daemon, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + SETTLE;
    loop {
        let findings = daemon.findings();
        if let Some(f) = findings.iter().find(|f| matches(f)) {
            return f.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no finding {what} within {SETTLE:?}; report: {findings:#?}\nstatus: {:#?}\nlog:\n{}",
            daemon.status(),
            daemon.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, timeout)
}

#[test]
fn a_host_blackholed_on_all_ports_is_host_down() {
    let lab = Lab::new("fh").unwrap();
    let daemon = lab.daemon().unwrap();
    let _a = lab.serve(8080, ServeMode::Echo).unwrap();
    let _b = lab.serve(8081, ServeMode::Echo).unwrap();
    lab.server_input_rule("tcp dport { 8080, 8081 } drop")
        .unwrap();
    let ip = lab.server_ip(Family::V4);
    lab.client(|| {
        for port in [8080, 8081] {
            for _ in 0..3 {
                let _ = connect(SocketAddr::new(ip, port), Duration::from_millis(200));
            }
        }
    });
    // Both ports' handshakes time out a second after their SYNs: wait for both.
    let f = wait_finding(&daemon, "host_down on both ports", |f| {
        f["domain"] == "host_down"
            && f["evidence"]["ports"]
                .as_array()
                .is_some_and(|p| p.len() == 2)
    });
    assert_eq!(f["subject"], format!("host {ip}"));
    assert_eq!(
        f["evidence"]["ports"],
        serde_json::json!([8080, 8081]),
        "{f:#}"
    );
    assert!(f["evidence"]["timeouts"].as_u64().unwrap() >= 3, "{f:#}");
    assert_eq!(f["evidence"]["established"], 0);
    let summary = f["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("host {ip} is not answering")),
        "{summary}"
    );
    // Not also reported port by port as a dependency.
    assert!(daemon
        .findings()
        .iter()
        .all(|f| f["domain"] != "dependency"));
    let started = daemon
        .events()
        .into_iter()
        .find(|e| e["kind"] == "finding_started" && e["domain"] == "host_down");
    assert!(started.is_some(), "the event stream says so");
}

#[test]
fn a_host_that_worked_and_vanishes_is_reported_before_its_successes_age_out() {
    let lab = Lab::new("fv").unwrap();
    let daemon = lab.daemon().unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    lab.client(|| {
        for _ in 0..5 {
            connect(addr, Duration::from_secs(2)).expect("up");
        }
    });
    lab.server_input_rule("tcp dport 8080 drop").unwrap();
    let vanished = Instant::now();
    lab.client(|| {
        for _ in 0..4 {
            let _ = connect(addr, Duration::from_millis(200));
        }
    });
    // Its handshakes are still in the 10-20 s window; the newest news is silence.
    wait_finding(&daemon, "host_down", |f| f["domain"] == "host_down");
    assert!(
        vanished.elapsed() < Duration::from_secs(9),
        "took {:?}: the earlier successes hid it",
        vanished.elapsed()
    );
}

#[test]
fn one_port_refusing_while_another_answers_is_a_dependency_failure() {
    let lab = Lab::new("fd").unwrap();
    let daemon = lab.daemon().unwrap();
    let _up = lab.serve(8080, ServeMode::Echo).unwrap();
    let ip = lab.server_ip(Family::V6);
    lab.client(|| {
        for _ in 0..3 {
            connect(SocketAddr::new(ip, 8080), Duration::from_secs(2)).expect("8080 is up");
        }
        for _ in 0..4 {
            connect(SocketAddr::new(ip, 8081), Duration::from_secs(2)).expect_err("8081 refuses");
        }
    });
    let dead = SocketAddr::new(ip, 8081).to_string();
    let f = wait_finding(&daemon, "dependency", |f| {
        f["domain"] == "dependency" && f["evidence"]["refused"] == 4
    });
    assert_eq!(f["subject"], dead);
    assert_eq!(f["evidence"]["refused"], 4, "{f:#}");
    assert_eq!(f["evidence"]["rate"], 1.0);
    assert!(
        f["summary"]
            .as_str()
            .unwrap()
            .contains("refusing connections: 4 of 4 attempts"),
        "{f:#}"
    );
    assert!(daemon.findings().iter().all(|f| f["domain"] != "host_down"));
    // The human report names the domain.
    let out = daemon.cli(&["report"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("Dependency (1)"), "{text}");
    // The port comes back: once the refusals age out of the window, the finding ends.
    let _back = lab.serve(8081, ServeMode::Echo).unwrap();
    lab.client(|| {
        connect(SocketAddr::new(ip, 8081), Duration::from_secs(2)).expect("8081 is back");
    });
    let deadline = Instant::now() + Duration::from_secs(45);
    while daemon
        .findings()
        .iter()
        .any(|f| f["domain"] == "dependency")
    {
        assert!(
            Instant::now() < deadline,
            "the finding did not end: {:#?}",
            daemon.findings()
        );
        thread::sleep(Duration::from_millis(500));
    }
    let ended = daemon
        .events()
        .into_iter()
        .find(|e| e["kind"] == "finding_ended" && e["subject"] == dead);
    assert!(ended.is_some(), "the event stream says it ended");
}

#[test]
fn a_local_server_killed_under_inbound_clients_is_internal() {
    let lab = Lab::new("fi").unwrap();
    let daemon = lab.server_daemon().unwrap();
    let server = lab.serve(8080, ServeMode::Echo).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    lab.client(|| {
        for _ in 0..3 {
            connect(addr, Duration::from_secs(2)).expect("the service is up");
        }
    });
    drop(server);
    lab.client(|| {
        for _ in 0..5 {
            connect(addr, Duration::from_secs(2)).expect_err("the service is gone");
        }
    });
    let f = wait_finding(&daemon, "internal", |f| {
        f["domain"] == "internal" && f["evidence"]["refused"] == 5
    });
    assert_eq!(f["subject"], format!("local service {addr}"));
    assert_eq!(f["evidence"]["refused"], 5, "{f:#}");
    assert!(
        f["summary"]
            .as_str()
            .unwrap()
            .contains("refusing inbound connections: 5 of 8 attempts")
            || f["summary"]
                .as_str()
                .unwrap()
                .contains("refusing inbound connections: 5 of 5 attempts"),
        "{f:#}"
    );
}

/// Five queries to a resolver that fails as `mode` says (`None`: drops them); waits for the
/// finding whose evidence shows `counter` at 5.
fn resolver_failing(mode: Option<DnsMode>, counter: &str, expect: impl Fn(&Value)) {
    let lab = Lab::new("fr").unwrap();
    let daemon = lab.daemon().unwrap();
    let _dns = match mode {
        Some(mode) => Some(lab.serve_dns(mode).unwrap()),
        None => {
            lab.server_input_rule("udp dport 53 drop").unwrap();
            None
        }
    };
    let resolver = SocketAddr::new(lab.server_ip(Family::V4), 53);
    lab.client(|| {
        for id in 0..5 {
            dns::query(resolver, "api.lab", id, Duration::from_millis(300));
        }
    });
    let f = wait_finding(&daemon, "resolver", |f| {
        f["subject"] == format!("resolver {resolver}") && f["evidence"][counter] == 5
    });
    assert_eq!(f["domain"], "communication");
    assert_eq!(f["evidence"]["queries"], 5, "{f:#}");
    expect(&f);
    let status = daemon.cli(&["status", "-o", "json"]).unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["resolvers"][0]["resolver"],
        resolver.to_string(),
        "{status:#}"
    );
}

#[test]
fn a_resolver_that_does_not_answer_is_a_communication_failure() {
    resolver_failing(None, "timeouts", |f| {
        assert_eq!(f["evidence"]["servfail"], 0, "{f:#}");
    });
}

#[test]
fn a_resolver_answering_servfail_is_a_communication_failure() {
    resolver_failing(Some(DnsMode::ServFail), "servfail", |f| {
        assert_eq!(f["evidence"]["timeouts"], 0, "{f:#}");
    });
}

#[test]
fn endpoints_are_named_from_dns_answers() {
    let lab = Lab::new("fn").unwrap();
    let daemon = lab.daemon().unwrap();
    let server = Lab::SERVER_V4;
    let _dns = lab.serve_dns(DnsMode::Answer(server)).unwrap();
    let _web = lab.serve(8080, ServeMode::Echo).unwrap();
    let resolver = SocketAddr::new(server.into(), 53);
    lab.client(|| {
        let (_, ip) =
            dns::query(resolver, "web.lab", 1, Duration::from_secs(2)).expect("an answer");
        connect(
            SocketAddr::new(ip.expect("an address").into(), 8080),
            Duration::from_secs(2),
        )
        .expect("web is up");
    });
    let endpoint = SocketAddr::new(server.into(), 8080).to_string();
    let e = daemon.wait_for(&endpoint, SETTLE, |e| e.name.is_some());
    assert_eq!(e.name.as_deref(), Some("web.lab"));
    let out = daemon.cli(&["status"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("web.lab ({endpoint})")), "{text}");
}

#[test]
fn retransmissions_from_lost_data_packets_are_a_communication_failure() {
    let lab = Lab::new("ft").unwrap();
    let daemon = lab.daemon().unwrap();
    let _server = lab.serve(8080, ServeMode::Discard).unwrap();
    // A third of the client's data segments never arrive.
    lab.server_input_rule(
        "tcp dport 8080 tcp flags & (syn | fin | rst) == 0 meta length > 100 numgen random mod 3 == 0 drop",
    )
    .unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    // Each loss stalls the stream for a retransmission timeout, during which writes merge into
    // one segment: keep writing until the kernel has seen enough segments (a busy machine
    // merges more).
    let mut stream = lab.client(|| connect(addr, Duration::from_secs(2)).expect("connect"));
    stream.set_nodelay(true).unwrap();
    let chunk = [0x5au8; 200];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..100 {
            stream.write_all(&chunk).expect("write");
            thread::sleep(Duration::from_millis(5));
        }
        let seen = daemon
            .status()
            .endpoints
            .into_iter()
            .find(|e| e.endpoint == addr.to_string())
            .map_or(0, |e| e.segments);
        if seen >= 60 || Instant::now() > deadline {
            break;
        }
    }
    thread::sleep(Duration::from_secs(1));
    let f = wait_finding(&daemon, "retransmits", |f| {
        f["domain"] == "communication" && f["evidence"]["retransmits"].is_u64()
    });
    assert_eq!(f["subject"], addr.to_string());
    let evidence = &f["evidence"];
    assert!(evidence["retransmits"].as_u64().unwrap() >= 3, "{f:#}");
    assert!(evidence["segments"].as_u64().unwrap() >= 20, "{f:#}");
    assert!(evidence["rate"].as_f64().unwrap() >= 0.02, "{f:#}");
}

#[test]
fn resets_sent_by_the_path_are_a_communication_failure() {
    let lab = RoutedLab::new("fp").unwrap();
    let daemon = lab.client_daemon("").unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    // The router (a firewall one hop before the server) resets connections once they carry
    // data: its RSTs reach the client with TTL 64, the server's packets with 63.
    lab.router_forward_rule("tcp dport 8080 meta length > 60 reject with tcp reset")
        .unwrap();
    let addr: SocketAddr = "10.200.0.2:8080".parse().unwrap();
    lab.client(|| {
        for _ in 0..4 {
            let mut s = connect(addr, Duration::from_secs(2)).expect("the handshake passes");
            let _ = s.write_all(&[0x61u8; 100]);
            let mut buf = [0u8; 16];
            let _ = std::io::Read::read(&mut s, &mut buf);
        }
    });
    let f = wait_finding(&daemon, "path_resets", |f| {
        f["rule"] == "path_resets" && f["evidence"]["resets"] == 4
    });
    assert_eq!(f["domain"], "communication");
    assert_eq!(f["subject"], addr.to_string());
    assert!(
        daemon
            .findings()
            .iter()
            .all(|f| f["domain"] != "dependency"),
        "the server did not reset anything: {:#?}",
        daemon.findings()
    );
    let e = daemon.wait_for(&addr.to_string(), SETTLE, |e| e.path_resets >= 4);
    assert_eq!((e.resets_in, e.path_resets), (4, 4), "{e:?}");
}

#[test]
fn events_follow_streams_transitions_in_order() {
    let lab = Lab::new("fe").unwrap();
    let daemon = lab.daemon().unwrap();
    let mut follow = Command::new(resil_bin())
        .args(["events", "--follow", "-o", "json", "--socket"])
        .arg(&daemon.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let target = SocketAddr::new(lab.server_ip(Family::V4), 9000).to_string();
    for action in ["trip", "reset", "disable", "reset"] {
        let out = daemon.cli(&[action, &target]).unwrap();
        assert!(
            out.status.success(),
            "{action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 4 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let event: Value = serde_json::from_str(&line).expect("a JSON line");
            seen.push(event);
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let states: Vec<&str> = seen
        .iter()
        .map(|e| e["to"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        states,
        ["forced_open", "closed", "disabled", "closed"],
        "{seen:#?}"
    );
    let seqs: Vec<u64> = seen.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}
