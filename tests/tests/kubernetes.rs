//! Endpoint names from the Kubernetes API (`--kubernetes-names`). No API server can run on the
//! test machines, so `tests/fixtures/fake_kube_api.py` stands in for one: TLS with its own CA,
//! a bearer token, lists and watch streams as the real server sends them. The daemon runs
//! for real in a lab, names real endpoints, and follows a watch event.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use resil_tests::{resil_bin, sh, Daemon, Family, Lab};
use serde_json::json;

const API: &str = "https://127.0.0.1:6443";
const TOKEN: &str = "lab-token-4f1c";

/// A CA and a server certificate for 127.0.0.1 signed by it, and the service account's files.
fn credentials(dir: &Path) -> PathBuf {
    let creds = dir.join("serviceaccount");
    std::fs::create_dir_all(&creds).unwrap();
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
        "-days",
        "2",
        "-subj",
        "/CN=lab-ca",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p("api.key"),
        "-out",
        &p("api.csr"),
        "-subj",
        "/CN=kube-apiserver",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("api.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("api.crt"),
        "-days",
        "2",
        "-extfile",
        &p("san.ext"),
    ]);
    std::fs::copy(dir.join("ca.crt"), creds.join("ca.crt")).unwrap();
    std::fs::write(creds.join("token"), format!("{TOKEN}\n")).unwrap();
    creds
}

/// The stand-in API server, in the client namespace (where the daemon runs).
struct FakeApi {
    child: Child,
    log: PathBuf,
}

impl FakeApi {
    fn start(lab: &Lab, scenario: serde_json::Value) -> FakeApi {
        let scenario_path = lab.dir.join("scenario.json");
        std::fs::write(&scenario_path, scenario.to_string()).unwrap();
        let log = lab.dir.join("api.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fake_kube_api.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.client_ns, "python3"])
            .arg(script)
            .arg(&scenario_path)
            .arg("6443")
            .arg(lab.dir.join("api.crt"))
            .arg(lab.dir.join("api.key"))
            .arg(TOKEN)
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the stand-in API server");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready");
        FakeApi { child, log }
    }

    fn requests(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod(namespace: &str, name: &str, ip: &str, host_network: bool) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "90"},
        "spec": {"hostNetwork": host_network},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn wait_name(daemon: &Daemon, endpoint: &str, expected: &str) {
    let e = daemon.wait_for(endpoint, Duration::from_secs(15), |e| {
        e.name.as_deref() == Some(expected)
    });
    assert_eq!(
        e.name.as_deref(),
        Some(expected),
        "{endpoint}: {e:?}\n{}",
        daemon.log_text()
    );
}

#[test]
fn endpoints_are_named_after_pods_and_services_and_follow_the_watch() {
    let lab = Lab::new("k8").unwrap();
    for extra in ["10.200.0.3/24", "10.200.0.4/24", "10.200.0.5/24"] {
        sh(
            "ip",
            &[
                "-n",
                &lab.server_ns,
                "addr",
                "add",
                extra,
                "dev",
                &lab.server_if,
            ],
        )
        .unwrap();
    }
    let creds = credentials(&lab.dir);
    let server_ip = lab.server_ip(Family::V4).to_string();
    let api = FakeApi::start(
        &lab,
        json!({
            // Three pages: the stand-in's hold two pods each, and web-0 is on the last.
            "page_size": 2,
            "pods": [
                pod("batch", "job-0", "10.244.0.10", false),
                pod("batch", "job-1", "10.244.0.11", false),
                pod("batch", "job-2", "10.244.0.12", false),
                // A host-network pod has the node's address: it names nothing.
                pod("kube-system", "node-agent", "10.200.0.5", true),
                pod("batch", "job-3", "10.244.0.13", false),
                pod("shop", "web-0", &server_ip, false),
            ],
            "services": [{
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"clusterIP": "10.200.0.3", "clusterIPs": ["10.200.0.3"]},
            }],
            "pod_events": [{"type": "ADDED", "object": pod("shop", "db-0", "10.200.0.4", false)}],
        }),
    );
    let daemon = naming_daemon(&lab, &creds, &[]);
    let _server = lab.serve(8080, resil_tests::ServeMode::Echo).unwrap();
    lab.client(|| {
        for last in [2, 3, 4, 5] {
            let addr: SocketAddr = format!("10.200.0.{last}:8080").parse().unwrap();
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
        }
    });
    wait_name(&daemon, &format!("{server_ip}:8080"), "shop/web-0");
    wait_name(&daemon, "10.200.0.3:8080", "shop/web");
    wait_name(&daemon, "10.200.0.4:8080", "shop/db-0");
    let host = daemon.wait_for("10.200.0.5:8080", Duration::from_secs(5), |_| true);
    assert_eq!(host.name, None, "{host:?}");
    // Listed in pages, each asking for 500 and following the continue token, then watched
    // from the list's version, with the token.
    let requests = api.requests();
    let pages: Vec<&str> = requests
        .lines()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=1"))
        .collect();
    assert_eq!(pages.len(), 3, "{requests}");
    assert_eq!(pages[0], "GET /api/v1/pods?limit=500", "{requests}");
    for page in &pages[1..] {
        assert!(
            page.starts_with("GET /api/v1/pods?limit=500&continue="),
            "{requests}"
        );
    }
    assert!(
        requests.contains("watch=1") && requests.contains("resourceVersion=100"),
        "{requests}"
    );
    // The name reaches the metrics' info series too.
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = lab.client(|| {
            let mut s = TcpStream::connect("127.0.0.1:9464").unwrap();
            std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut s, &mut text).unwrap();
            text
        });
        if text.contains("shop/db-0") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(text.contains("name=\"shop/db-0\""), "{text}");
}

#[test]
fn a_refused_token_is_one_warning_and_nothing_else_changes() {
    let lab = Lab::new("k9").unwrap();
    let creds = credentials(&lab.dir);
    std::fs::write(creds.join("token"), "not-the-token\n").unwrap();
    let api = FakeApi::start(&lab, json!({"pods": [], "services": []}));
    let daemon = naming_daemon(&lab, &creds, &NO_METRICS);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("refused to list") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = daemon.log_text();
    assert!(
        log.contains("the Kubernetes API refused to list pods (the service account needs list and watch on them)"),
        "{log}"
    );
    assert_eq!(log.matches("refused to list pods").count(), 1, "{log}");
    assert!(api.requests().contains("GET /api/v1/pods"));
    daemon.status();
}

const NO_METRICS: [&str; 2] = ["--metrics", "off"];

/// A daemon naming endpoints from the stand-in API server, with `extra` arguments.
fn naming_daemon(lab: &Lab, creds: &Path, extra: &[&str]) -> Daemon {
    let creds_arg = creds.to_string_lossy().into_owned();
    let mut args = vec![
        "--kubernetes-names",
        "--kubernetes-api",
        API,
        "--kubernetes-credentials",
        &creds_arg,
    ];
    args.extend(extra);
    lab.daemon_with_args("", &args).unwrap()
}

/// The pod list requests (pages) and watches the stand-in has seen, in order.
fn pod_requests(api: &FakeApi) -> Vec<String> {
    api.requests()
        .lines()
        .filter(|r| r.starts_with("GET /api/v1/pods?"))
        .map(str::to_string)
        .collect()
}

/// The stand-in with one pod and no services, failing the pod requests (lists and
/// watches, counted from 0) numbered in `fails`.
fn one_pod_failing(lab: &Lab, fails: &[u32]) -> FakeApi {
    FakeApi::start(
        lab,
        json!({
            "pods": [pod("shop", "web-0", "10.244.0.10", false)],
            "services": [],
            "fail": {"pods": fails},
        }),
    )
}

#[test]
fn each_outage_is_one_warning_and_its_end_one_info_line() {
    let lab = Lab::new("ko").unwrap();
    let creds = credentials(&lab.dir);
    // Outage one: two lists fail, the third works. Outage two: the watch after it fails;
    // the list after that works, and so does its watch (request 5).
    let api = one_pod_failing(&lab, &[0, 1, 3]);
    let daemon = naming_daemon(&lab, &creds, &NO_METRICS);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pod_requests(&api).len() < 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = daemon.log_text();
    assert_eq!(
        pod_requests(&api).len(),
        6,
        "{:?}\n{log}",
        pod_requests(&api)
    );
    assert_eq!(
        log.matches("kubernetes names: pods not available").count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("kubernetes names: pods available again")
            .count(),
        2,
        "{log}"
    );
    assert!(!log.contains("services not available"), "{log}");
    assert!(!log.contains("services available again"), "{log}");
}

#[test]
fn a_good_list_resets_the_backoff_after_a_failed_watch() {
    let lab = Lab::new("kp").unwrap();
    let creds = credentials(&lab.dir);
    // Every list works and the four watches after the first four lists fail: each is a
    // failure after a success, so each waits the first backoff step (1 s), not 1, 2, 4, 8 s.
    let api = one_pod_failing(&lab, &[1, 3, 5, 7]);
    let _daemon = naming_daemon(&lab, &creds, &NO_METRICS);
    let lists = |api: &FakeApi| {
        pod_requests(api)
            .iter()
            .filter(|r| !r.contains("watch=1"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut first = None;
    while lists(&api) < 5 && Instant::now() < deadline {
        if first.is_none() && lists(&api) > 0 {
            first = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = first.expect("the pods were listed").elapsed();
    assert_eq!(lists(&api), 5, "{:?}", pod_requests(&api));
    // Four waits of about a second each; the growing backoff would take 15 s.
    assert!(
        took > Duration::from_millis(3500) && took < Duration::from_secs(12),
        "{took:?}"
    );
}

#[test]
fn kubernetes_names_outside_a_cluster_need_an_address() {
    let out = Command::new(resil_bin())
        .args(["daemon", "--kubernetes-names", "--iface", "lo"])
        .args(["--cgroup", "/nonexistent/resil-test-cgroup"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs --kubernetes-api"), "{err}");
    let out = Command::new(resil_bin())
        .args(["daemon", "--kubernetes-names", "--kubernetes-api", API])
        .args([
            "--kubernetes-credentials",
            "/nonexistent/sa",
            "--iface",
            "lo",
        ])
        .args(["--cgroup", "/nonexistent/resil-test-cgroup"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/sa/token not found"), "{err}");
}
