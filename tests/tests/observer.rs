//! The kernel observer end to end: real programs attached to a veth in a namespace, real TCP
//! traffic, figures read back through `resil status -o json`.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    thread,
    time::Duration,
};

use resil_tests::{reset_on_close, Family, Lab, ServeMode};

/// Generous: the daemon ticks every 100 ms, but the machine may be busy.
const SETTLE: Duration = Duration::from_secs(10);

fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, timeout)
}

fn successful_connections(family: Family, daemon_args: &[&str]) {
    const N: u64 = 20;
    let lab = Lab::new("ok").unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let daemon = lab.daemon_with_args("", daemon_args).unwrap();
    let addr = SocketAddr::new(lab.server_ip(family), 8080);
    lab.client(|| {
        for _ in 0..N {
            let mut s = connect(addr, Duration::from_secs(5)).expect("connect");
            s.write_all(b"ping").unwrap();
        }
    });
    let e = daemon.wait_for(&lab.server_endpoint(family, 8080), SETTLE, |e| {
        e.established >= N
    });
    assert_eq!(e.attempts, N, "{e:?}");
    assert_eq!(e.established, N, "{e:?}");
    assert_eq!((e.refused, e.timeouts, e.unreachable), (0, 0, 0), "{e:?}");
    assert_eq!(e.failure_rate, Some(0.0), "{e:?}");
    let latency = e.connect_latency_us.expect("latency histogram populated");
    assert!(
        latency.p50 > 0.0 && latency.p50 <= latency.p99,
        "{latency:?}"
    );
    assert!(latency.p99 < 5_000_000.0, "{latency:?}");
    assert_eq!(e.state, "closed");
}

#[test]
fn counts_successful_connections_ipv4() {
    successful_connections(Family::V4, &[]);
}

#[test]
fn counts_successful_connections_ipv6() {
    successful_connections(Family::V6, &[]);
}

/// On veth `auto` attaches generic XDP; the native path observes the same.
#[test]
fn counts_successful_connections_with_native_xdp() {
    successful_connections(Family::V4, &["--xdp-mode", "native"]);
}

/// What kernels before 6.6 get (a classic filter on the clsact qdisc) observes the same.
#[test]
fn counts_successful_connections_with_a_clsact_filter() {
    successful_connections(Family::V4, &["--tc-mode", "clsact"]);
    successful_connections(Family::V6, &["--tc-mode", "clsact"]);
}

fn refused_connections(family: Family) {
    const N: u64 = 7;
    let lab = Lab::new("rf").unwrap();
    let daemon = lab.daemon().unwrap();
    let addr = SocketAddr::new(lab.server_ip(family), 9999);
    lab.client(|| {
        for _ in 0..N {
            let err = connect(addr, Duration::from_secs(5)).expect_err("nothing listens");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        }
    });
    let e = daemon.wait_for(&lab.server_endpoint(family, 9999), SETTLE, |e| {
        e.refused >= N
    });
    assert_eq!((e.attempts, e.refused, e.established), (N, N, 0), "{e:?}");
    // The breaker saw it too: five refusals in a row open the circuit (the window holds
    // fewer outcomes than the 20 its failure rate needs, so the rate is still unknown).
    assert_eq!(e.state, "open", "{e:?}");
    assert_eq!(e.reason.as_deref(), Some("5 consecutive failures"), "{e:?}");
    assert_eq!(e.failure_rate, None, "{e:?}");
    assert!(e.connect_latency_us.is_none(), "{e:?}");
}

#[test]
fn counts_refused_connections_ipv4() {
    refused_connections(Family::V4);
}

#[test]
fn counts_refused_connections_ipv6() {
    refused_connections(Family::V6);
}

fn blackholed_peer(family: Family) {
    const N: u64 = 3;
    let lab = Lab::new("bh").unwrap();
    lab.server_input_rule("tcp dport 7777 drop").unwrap();
    // Connect timeout 500 ms in resil; the client waits 2.5 s, long enough for the kernel's
    // first SYN retransmission (after 1 s).
    let daemon = lab
        .daemon_with_config("[defaults]\nconnect_timeout = \"500ms\"\n")
        .unwrap();
    let addr = SocketAddr::new(lab.server_ip(family), 7777);
    lab.client(|| {
        thread::scope(|s| {
            for _ in 0..N {
                s.spawn(|| {
                    let err = connect(addr, Duration::from_millis(2500)).expect_err("blackholed");
                    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
                });
            }
        })
    });
    let e = daemon.wait_for(&lab.server_endpoint(family, 7777), SETTLE, |e| {
        e.timeouts >= N && e.syn_retransmits >= N
    });
    assert_eq!((e.attempts, e.timeouts), (N, N), "{e:?}");
    assert!(
        e.syn_retransmits >= N,
        "every handshake retransmitted its SYN: {e:?}"
    );
    assert_eq!((e.established, e.refused), (0, 0), "{e:?}");
}

#[test]
fn counts_timeouts_for_a_blackholed_peer_ipv4() {
    blackholed_peer(Family::V4);
}

#[test]
fn counts_timeouts_for_a_blackholed_peer_ipv6() {
    blackholed_peer(Family::V6);
}

fn resets(family: Family) {
    const N: u64 = 5;
    let lab = Lab::new("rs").unwrap();
    let _resetting = lab.serve(8081, ServeMode::ResetOnRequest).unwrap();
    let _echo = lab.serve(8082, ServeMode::Echo).unwrap();
    let daemon = lab.daemon().unwrap();
    let resetting = SocketAddr::new(lab.server_ip(family), 8081);
    let echo = SocketAddr::new(lab.server_ip(family), 8082);
    lab.client(|| {
        for _ in 0..N {
            // The server resets when our request arrives: wait until our read sees it.
            let mut s = connect(resetting, Duration::from_secs(5)).expect("connect");
            s.write_all(b"request").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 16];
            let err = std::io::Read::read(&mut s, &mut buf).expect_err("reset");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
            // We reset: linger 0 and close.
            let s = connect(echo, Duration::from_secs(5)).expect("connect");
            reset_on_close(&s);
            drop(s);
        }
    });
    let e = daemon.wait_for(&lab.server_endpoint(family, 8081), SETTLE, |e| {
        e.resets_in >= N
    });
    assert_eq!(
        (e.established, e.resets_in, e.resets_out),
        (N, N, 0),
        "{e:?}"
    );
    let e = daemon.wait_for(&lab.server_endpoint(family, 8082), SETTLE, |e| {
        e.resets_out >= N
    });
    assert_eq!(
        (e.established, e.resets_in, e.resets_out),
        (N, 0, N),
        "{e:?}"
    );
}

#[test]
fn counts_resets_both_ways_ipv4() {
    resets(Family::V4);
}

#[test]
fn counts_resets_both_ways_ipv6() {
    resets(Family::V6);
}

fn unreachable_host(family: Family) {
    const N: u64 = 3;
    let lab = Lab::new("ur").unwrap();
    // The server's side answers SYNs to port 6666 with ICMP host unreachable, as a router
    // would for a host that is gone.
    lab.server_input_rule("tcp dport 6666 reject with icmpx type host-unreachable")
        .unwrap();
    let daemon = lab.daemon().unwrap();
    let addr = SocketAddr::new(lab.server_ip(family), 6666);
    lab.client(|| {
        for _ in 0..N {
            connect(addr, Duration::from_secs(5)).expect_err("unreachable");
        }
    });
    let e = daemon.wait_for(&lab.server_endpoint(family, 6666), SETTLE, |e| {
        e.unreachable >= N
    });
    assert_eq!((e.attempts, e.unreachable), (N, N), "{e:?}");
    assert_eq!((e.established, e.refused, e.timeouts), (0, 0, 0), "{e:?}");
}

#[test]
fn counts_icmp_unreachable_ipv4() {
    unreachable_host(Family::V4);
}

#[test]
fn counts_icmp_unreachable_ipv6() {
    unreachable_host(Family::V6);
}

fn inbound_service(family: Family) {
    const N: u64 = 6;
    let lab = Lab::new("in").unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    // resil watches the server side: clients connect in to its services.
    let daemon = lab.server_daemon().unwrap();
    let open = SocketAddr::new(lab.server_ip(family), 8080);
    let closed = SocketAddr::new(lab.server_ip(family), 8099);
    lab.client(|| {
        for _ in 0..N {
            let mut s = connect(open, Duration::from_secs(5)).expect("connect");
            s.write_all(b"ping").unwrap();
            connect(closed, Duration::from_secs(5)).expect_err("nothing listens");
        }
    });
    let served = daemon.wait_for(&lab.server_endpoint(family, 8080), SETTLE, |e| {
        e.established >= N
    });
    assert_eq!(
        served.direction,
        resil_user::api::Side::Inbound,
        "{served:?}"
    );
    assert_eq!(
        (served.attempts, served.established, served.refused),
        (N, N, 0),
        "{served:?}"
    );
    let refusing = daemon.wait_for(&lab.server_endpoint(family, 8099), SETTLE, |e| {
        e.refused >= N
    });
    assert_eq!(refusing.direction, resil_user::api::Side::Inbound);
    assert_eq!(
        (refusing.attempts, refusing.refused),
        (N, N),
        "{refusing:?}"
    );
}

#[test]
fn counts_inbound_connections_to_local_services_ipv4() {
    inbound_service(Family::V4);
}

#[test]
fn counts_inbound_connections_to_local_services_ipv6() {
    inbound_service(Family::V6);
}
