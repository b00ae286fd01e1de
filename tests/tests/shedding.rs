//! Inbound protection at XDP: a local service over its connection limit, or unhealthy, gets
//! new SYNs answered with a RST at once, counted, and shedding ends when the cause does.

use std::{
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use resil_tests::{Family, Lab, ServeMode};

const SETTLE: Duration = Duration::from_secs(20);

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(3))
}

#[test]
fn a_service_at_its_connection_limit_sheds_new_connections_until_below() {
    let lab = Lab::new("sb").unwrap();
    let config = "[[service]]\nport = 8080\nmax_connections = 2\n";
    let daemon = lab.server_daemon_with_config(config).unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    let service = addr.to_string();
    let held: Vec<TcpStream> = lab.client(|| {
        (0..2)
            .map(|_| connect(addr).expect("under the limit"))
            .collect()
    });
    let e = daemon.wait_for(&service, SETTLE, |e| e.state == "shedding");
    assert!(
        e.reason
            .as_deref()
            .unwrap_or("")
            .contains("bulkhead: 2 connections open, the limit is 2"),
        "{e:?}"
    );
    let refused = lab.client(|| {
        let started = Instant::now();
        let err = connect(addr).expect_err("over the limit");
        (err.kind(), started.elapsed())
    });
    assert_eq!(
        refused.0,
        std::io::ErrorKind::ConnectionRefused,
        "a RST, not a timeout"
    );
    assert!(
        refused.1 < Duration::from_secs(1),
        "at once: {:?}",
        refused.1
    );
    let e = daemon.wait_for(&service, SETTLE, |e| e.fast_failed >= 1);
    assert_eq!(e.fast_failed, 1, "{e:?}");
    // Below the limit again: connections flow.
    drop(held);
    daemon.wait_for(&service, SETTLE, |e| !e.shedding);
    lab.client(|| connect(addr).expect("below the limit"));
    let kinds: Vec<String> = daemon
        .events()
        .iter()
        .filter_map(|e| {
            e["kind"]
                .as_str()
                .filter(|k| k.starts_with("shedding"))
                .map(str::to_string)
        })
        .collect();
    assert_eq!(kinds, ["shedding_started", "shedding_ended"]);
}

#[test]
fn an_unhealthy_service_is_shed_then_probed_back_when_it_recovers() {
    let lab = Lab::new("su").unwrap();
    let config = "[[service]]\nname = \"api\"\nport = 8080\nshed_when_unhealthy = true\n";
    let daemon = lab.server_daemon_with_config(config).unwrap();
    let addr = SocketAddr::new(lab.server_ip(Family::V6), 8080);
    let service = addr.to_string();
    // The service works, then its process dies: the kernel refuses, the finding says so,
    // and resil takes the refusing over at XDP.
    let server = lab.serve(8080, ServeMode::Echo).unwrap();
    lab.client(|| connect(addr).expect("the service is up"));
    drop(server);
    lab.client(|| {
        for _ in 0..4 {
            connect(addr).expect_err("nothing listens");
        }
    });
    let e = daemon.wait_for(&service, SETTLE, |e| e.shedding);
    assert!(
        e.reason
            .as_deref()
            .unwrap_or("")
            .starts_with("unhealthy: local service"),
        "{e:?}"
    );
    let deadline = Instant::now() + SETTLE;
    loop {
        lab.client(|| {
            let err = connect(addr).expect_err("shed");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        });
        let e = daemon
            .status()
            .endpoints
            .into_iter()
            .find(|e| e.endpoint == service)
            .unwrap();
        if e.fast_failed > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SYN shed: {e:?}\n{}",
            daemon.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The service comes back: after the hold, one probe connection gets through, and with
    // it shedding and the finding end.
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let deadline = Instant::now() + SETTLE;
    while lab.client(|| connect(addr)).is_err() {
        assert!(
            Instant::now() < deadline,
            "never let through\n{}",
            daemon.log_text()
        );
        thread::sleep(Duration::from_millis(250));
    }
    daemon.wait_for(&service, SETTLE, |e| !e.shedding);
    lab.client(|| connect(addr).expect("flows again"));
    let kinds: Vec<String> = daemon
        .events()
        .iter()
        .filter(|e| e["kind"] != "transition")
        .map(|e| {
            format!(
                "{} {}",
                e["kind"].as_str().unwrap_or("?"),
                e["service"]
                    .as_str()
                    .or(e["domain"].as_str())
                    .unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "finding_started internal".to_string(),
            format!("shedding_started api ({service})"),
            format!("shedding_ended api ({service})"),
            "finding_ended internal".to_string(),
        ],
        "{}",
        daemon.log_text()
    );
}
