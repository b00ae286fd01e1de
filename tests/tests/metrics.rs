//! Prometheus metrics: served on --metrics, valid for promtool, scraped by a real Prometheus,
//! and the daemon's liveness endpoint.

use std::{
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use resil_tests::{http_get, sh, Family, Lab, ServeMode};

const METRICS: &str = "127.0.0.1:9464";

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Some traffic to have series: three connections that work and two refused.
fn traffic(lab: &Lab) -> SocketAddr {
    let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
    lab.client(|| {
        for _ in 0..3 {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("up");
        }
        for _ in 0..2 {
            let refused = SocketAddr::new(addr.ip(), 8081);
            TcpStream::connect_timeout(&refused, Duration::from_secs(2)).expect_err("refused");
        }
    });
    addr
}

fn scrape(lab: &Lab) -> (u16, String, String) {
    lab.client(|| http_get(METRICS.parse().unwrap(), "/metrics"))
        .expect("scrape")
}

#[test]
fn metrics_pass_promtool_and_carry_the_figures() {
    let lab = Lab::new("mp").unwrap();
    let daemon = lab.daemon().unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let addr = traffic(&lab);
    daemon.wait_for(&addr.to_string(), Duration::from_secs(10), |e| {
        e.established == 3
    });
    let (status, head, body) = scrape(&lab);
    assert_eq!(status, 200, "{head}");
    // Without asking for OpenMetrics (as curl or promtool), the classic text format.
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let series = format!(
        "resil_connections_established_total{{endpoint=\"{addr}\",direction=\"outbound\"}} 3"
    );
    assert!(body.contains(&series), "{series} missing in\n{body}");
    assert!(
        body.contains(&format!(
            "resil_connect_duration_seconds_count{{endpoint=\"{addr}\",direction=\"outbound\"}} 3"
        )),
        "{body}"
    );
    assert!(
        body.contains("resil_findings{domain=\"dependency\"}"),
        "{body}"
    );
    assert!(
        body.contains("resil_map_capacity{map=\"connections\"} 65536"),
        "{body}"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus, installed by cargo xtask setup)");
    {
        use std::io::Write;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_real_prometheus_scrapes_the_daemon() {
    let lab = Lab::new("ms").unwrap();
    let _daemon = lab.daemon().unwrap();
    let _server = lab.serve(8080, ServeMode::Echo).unwrap();
    let addr = traffic(&lab);
    let config = lab.dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: resil\n    static_configs:\n      - targets: ['{METRICS}']\n"),
    )
    .unwrap();
    let log = std::fs::File::create(lab.dir.join("prometheus.log")).unwrap();
    let _prometheus = Killed(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.client_ns))
            .arg("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                lab.dir.join("tsdb").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package, installed by cargo xtask setup)"),
    );
    let query = |q: &str| {
        let path = format!("/api/v1/query?query={q}");
        lab.client(|| http_get("127.0.0.1:9090".parse().unwrap(), &path))
            .map(|(_, _, body)| body)
            .unwrap_or_default()
    };
    let wanted = format!(
        "resil_connections_established_total%7Bendpoint%3D%22{}%22%7D",
        addr.to_string().replace(':', "%3A")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = query("up%7Bjob%3D%22resil%22%7D");
        let established = query(&wanted);
        if up.contains("\"1\"]") && established.contains("\"3\"]") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape resil: up = {up}, established = {established}\n{}\nlast scrape: {:?}",
            std::fs::read_to_string(lab.dir.join("prometheus.log")).unwrap_or_default(),
            sh("ip", &["netns", "exec", &lab.client_ns, "curl", "-s", "http://127.0.0.1:9090/api/v1/targets"]).ok()
        );
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn liveness_readiness_other_paths_and_metrics_off() {
    let lab = Lab::new("ml").unwrap();
    let daemon = lab.daemon().unwrap();
    let metrics: SocketAddr = METRICS.parse().unwrap();
    let (status, _, body) = lab.client(|| http_get(metrics, "/healthz")).unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Ready once the programs are attached and the first tick is done (a tick is 100 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let (status, _, body) = lab.client(|| http_get(metrics, "/readyz")).unwrap();
        if status == 200 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        assert_eq!((status, body.as_str()), (503, "starting\n"));
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((ready.0, ready.1.as_str()), (200, "ok\n"));
    let (status, _, _) = lab.client(|| http_get(metrics, "/nope")).unwrap();
    assert_eq!(status, 404);
    drop(daemon);
    // With --metrics off nothing listens.
    let quiet = lab.daemon_with_args("", &["--metrics", "off"]).unwrap();
    assert!(lab.client(|| TcpStream::connect(metrics)).is_err());
    drop(quiet);
    // A taken address is one clear error, before anything is attached.
    let _taken = lab.client(|| std::net::TcpListener::bind(metrics)).unwrap();
    let err = lab
        .daemon()
        .err()
        .expect("the daemon cannot start")
        .to_string();
    assert!(
        err.contains("cannot serve metrics on 127.0.0.1:9464") && err.contains("--metrics off"),
        "{err}"
    );
}
