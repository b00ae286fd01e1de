//! When a dependency dies: how fast a client learns (fast-fail), how long until the failure is
//! detected and how many attempts suffered it meanwhile, how long until recovery is noticed;
//! resil next to the same client without resil and next to HAProxy's health checks.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::{quantile, traffic, Plan, Section};
use crate::{Daemon, Family, Lab, ServeMode};

/// One attempt of a client loop.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When it started, Unix seconds.
    pub start: f64,
    pub ok: bool,
    pub outcome: String,
    pub micros: f64,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn parse_attempts(text: &str) -> Vec<Attempt> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| Attempt {
            start: v["t"].as_f64().unwrap_or(0.0),
            ok: v["outcome"] == "ok",
            outcome: v["outcome"].as_str().unwrap_or("?").to_string(),
            micros: v["us"].as_f64().unwrap_or(0.0),
        })
        .collect()
}

/// Starts `resil-bench client loop` in the lab's cgroup: an attempt (connect, for a proxy also
/// a read) every `interval`, each in its own thread, for `time`.
fn start_loop(
    lab: &Lab,
    addr: SocketAddr,
    time: Duration,
    interval: Duration,
    read: bool,
) -> Result<Loop> {
    Command::new(crate::target_bin("resil-bench"))
        .arg("client")
        .arg(&lab.cgroup)
        .arg(&lab.client_ns)
        .args([
            "loop",
            &addr.to_string(),
            &time.as_millis().to_string(),
            &interval.as_millis().to_string(),
            if read { "read" } else { "connect" },
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map(|child| Loop(Some(child)))
        .context("start resil-bench client loop")
}

/// A running client loop, killed if dropped before it is finished (so a failed step leaves
/// no process in the lab's cgroup).
struct Loop(Option<Child>);

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn finish_loop(mut running: Loop) -> Result<Vec<Attempt>> {
    let child = running.0.take().context("the client loop is gone")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the client loop failed");
    }
    Ok(parse_attempts(&String::from_utf8_lossy(&out.stdout)))
}

fn percentiles(mut micros: Vec<f64>) -> (f64, f64) {
    micros.sort_by(f64::total_cmp);
    (quantile(&micros, 0.5), quantile(&micros, 0.99))
}

/// HAProxy in the client namespace, in front of the server's port 8080.
struct Haproxy {
    child: Child,
    socket: std::path::PathBuf,
}

impl Haproxy {
    const FRONT: &'static str = "127.0.0.1:9100";

    fn start(lab: &Lab, passive: bool) -> Result<Haproxy> {
        let socket = lab.dir.join("haproxy.sock");
        let _ = std::fs::remove_file(&socket);
        // Active: a TCP check every second, down after 3 failures, up after 2. Passive: checks
        // rare, the server marked down after 5 consecutive connection errors seen in traffic.
        let server = if passive {
            "server s1 10.200.0.2:8080 check inter 60s fall 3 rise 2 observe layer4 error-limit 5 on-error mark-down"
        } else {
            "server s1 10.200.0.2:8080 check inter 1s fall 3 rise 2"
        };
        let config = format!(
            "global\n  stats socket {} mode 600 level admin\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n  retries 0\nfrontend f\n  bind {}\n  default_backend b\nbackend b\n  {server}\n",
            socket.display(),
            Self::FRONT
        );
        let path = lab.dir.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.client_ns])
            .arg(super::tool("haproxy"))
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start haproxy (Debian package haproxy)")?;
        crate::cleanup::process(child.id());
        let proxy = Haproxy { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxy.state().is_err() {
            if Instant::now() > deadline {
                bail!("haproxy did not start");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(proxy)
    }

    /// The server's status as HAProxy's stats say (`UP`, `DOWN`, `UP 1/2` …).
    fn state(&self) -> Result<String> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.write_all(b"show stat\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .context("no stats header")?
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let status = header
            .iter()
            .position(|h| *h == "status")
            .context("no status column")?;
        let svname = header
            .iter()
            .position(|h| *h == "svname")
            .context("no svname column")?;
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.get(svname) == Some(&"s1"))
            .and_then(|f| f.get(status).map(|s| s.to_string()))
            .context("no server s1 in the stats")
    }

    /// Waits until the status starts with `want`; when it did (Unix seconds).
    fn wait_for(&self, want: &str, limit: Duration) -> Option<f64> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.state().is_ok_and(|s| s.starts_with(want)) {
                return Some(unix_now());
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        crate::cleanup::forget(&[], None, Some(self.child.id()));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `resil trip|reset|disable ENDPOINT`, which must succeed.
fn operator(daemon: &Daemon, action: &str, endpoint: &str) -> Result<()> {
    let out = daemon.cli(&[action, endpoint])?;
    if !out.status.success() {
        bail!(
            "resil {action} {endpoint}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Fast-fail: the time for a client to learn that the endpoint is dead.
pub fn fast_fail(plan: &Plan) -> Result<Section> {
    let lab = Lab::new("bf")?;
    let n = plan.fast_fail_connects.to_string();
    let mut section = Section::new(
        "Fast-fail",
        format!(
            "How long a client's connect() takes to fail against a dead endpoint: refused by resil in the kernel (circuit open) next to the same client without resil (the peer's RST over a veth round trip; a blackholed peer leaves the client to its own timeout, 1 s here, or the kernel's SYN retries), and next to HAProxy in front of it (its health check has marked the server down; the client's connect succeeds and the failure shows at the first read). {} connections per run; p50 and p99 of each run.",
            plan.fast_fail_connects
        ),
    );
    let syn_retries: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syn_retries")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(6);
    let (mut resil50, mut resil99, mut peer50, mut peer99, mut ratio) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..plan.runs {
        let daemon = lab.daemon_with_args("", &["--metrics", "off"])?;
        let addr = SocketAddr::new(lab.server_ip(Family::V4), 9);
        let endpoint = addr.to_string();
        // The peer's refusals, with resil attached but its circuit disabled (so it never
        // opens under them), then with the circuit forced open.
        operator(&daemon, "disable", &endpoint)?;
        let peer = parse_attempts(&traffic::client(&lab, &["repeat", &endpoint, &n])?);
        let e = daemon.wait_for(&endpoint, Duration::from_secs(10), |e| e.refused > 0);
        if e.fast_failed > 0 {
            bail!("resil refused some of the peer's baseline: {e:?}");
        }
        operator(&daemon, "reset", &endpoint)?;
        operator(&daemon, "trip", &endpoint)?;
        let refused = parse_attempts(&traffic::client(&lab, &["repeat", &endpoint, &n])?);
        drop(daemon);
        let (p50, p99) = percentiles(peer.iter().map(|a| a.micros).collect());
        let (r50, r99) = percentiles(refused.iter().map(|a| a.micros).collect());
        peer50.push(p50);
        peer99.push(p99);
        resil50.push(r50);
        resil99.push(r99);
        ratio.push(p50 / r50);
    }
    section.add(
        "connect() refused by resil, p50",
        "µs",
        &resil50,
        "circuit open: ECONNREFUSED from the connect hook, no packet sent",
    );
    section.add("connect() refused by resil, p99", "µs", &resil99, "");
    section.add(
        "connect() refused by the peer without resil, p50",
        "µs",
        &peer50,
        "nothing listens: the peer's RST (resil attached, this circuit disabled)",
    );
    section.add(
        "connect() refused by the peer without resil, p99",
        "µs",
        &peer99,
        "",
    );
    section.add("peer refusal / resil refusal, p50", "×", &ratio, "same run");
    section.add(
        "blackholed peer without resil",
        "µs",
        &[1e6],
        "the client's own timeout (1 s here)",
    );
    let kernel = ((1u64 << (syn_retries + 1)) - 1) as f64 * 1e6;
    section.add(
        format!("blackholed peer, kernel default ({syn_retries} SYN retries)"),
        "µs",
        &[kernel],
        "a client without its own timeout",
    );
    // HAProxy with its server marked down.
    let (mut h50, mut h99) = (vec![], vec![]);
    for _ in 0..plan.runs {
        let proxy = match Haproxy::start(&lab, false) {
            Ok(p) => p,
            Err(e) => {
                section.skip("HAProxy, server marked down", e);
                return Ok(section);
            }
        };
        proxy
            .wait_for("DOWN", Duration::from_secs(10))
            .context("haproxy never marked the server down")?;
        let attempts = parse_attempts(&traffic::client(
            &lab,
            &["repeat-read", Haproxy::FRONT, &n],
        )?);
        let (a, b) = percentiles(attempts.iter().map(|a| a.micros).collect());
        h50.push(a);
        h99.push(b);
    }
    section.add(
        "HAProxy with the server marked down, connect + first read fails, p50",
        "µs",
        &h50,
        "",
    );
    section.add("HAProxy with the server marked down, p99", "µs", &h99, "");
    let hr: Vec<f64> = h50.iter().zip(&resil50).map(|(h, r)| h / r).collect();
    section.add("HAProxy / resil, p50", "×", &hr, "same run");
    Ok(section)
}

/// How a dependency dies in a detection run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Death {
    /// The server stops: its port refuses.
    Refused,
    /// Its packets are dropped: nothing answers.
    Blackholed,
}

impl Death {
    fn label(self) -> &'static str {
        match self {
            Death::Refused => "refused",
            Death::Blackholed => "blackholed",
        }
    }
}

/// Kills the dependency (returns when), and brings it back.
struct Dependency<'a> {
    lab: &'a Lab,
    server: Option<crate::Server>,
    death: Death,
}

impl<'a> Dependency<'a> {
    fn up(lab: &'a Lab, death: Death) -> Result<Self> {
        Ok(Dependency {
            lab,
            server: Some(lab.serve(8080, ServeMode::Echo)?),
            death,
        })
    }

    fn kill(&mut self) -> Result<f64> {
        match self.death {
            Death::Refused => drop(self.server.take()),
            Death::Blackholed => self.lab.server_input_rule("tcp dport 8080 drop")?,
        }
        Ok(unix_now())
    }

    fn revive(&mut self) -> Result<f64> {
        match self.death {
            Death::Refused => self.server = Some(self.lab.serve(8080, ServeMode::Echo)?),
            Death::Blackholed => self.lab.clear_server_rules()?,
        }
        Ok(unix_now())
    }
}

/// Attempts started in `[from, to)` (Unix seconds) that failed.
fn failed_between(attempts: &[Attempt], from: f64, to: f64) -> f64 {
    attempts
        .iter()
        .filter(|a| a.start >= from && a.start < to && !a.ok)
        .count() as f64
}

/// The time of the first breaker transition to `to` for `endpoint` after `after`.
fn transition(daemon: &Daemon, endpoint: &str, to: &str, after: f64) -> Option<f64> {
    daemon
        .events()
        .iter()
        .filter(|e| e["kind"] == "transition" && e["endpoint"] == endpoint && e["to"] == to)
        .filter_map(|e| e["time"].as_f64())
        .find(|t| *t >= after)
}

/// Detection and recovery, for resil and for HAProxy's active and passive checks.
pub fn detection(plan: &Plan) -> Result<Section> {
    let mut section = Section::new(
        "Detection and recovery",
        "A client in the protected cgroup starts a connection every 20 ms (each with a 1 s timeout). The dependency dies 1 s in (its port refuses, or its packets are dropped) and comes back 4 s later (with HAProxy: 4 s later, or once HAProxy marked it down if that took longer). Detection: from the death to resil's circuit opening (default policy: 5 consecutive failures or 50 % over the window, 1 s connect timeout), or to HAProxy marking the server down; the attempts started in between suffered the failure in full. Recovery: from the return to the circuit closing (the default policy waits 5 s in OPEN before probing, so this includes what is left of that wait), or to HAProxy marking the server up.",
    );
    let interval = Duration::from_millis(20);
    let total = Duration::from_secs(8);
    for death in [Death::Refused, Death::Blackholed] {
        let (mut detect, mut suffered, mut recover) = (vec![], vec![], vec![]);
        for _ in 0..plan.runs {
            let lab = Lab::new("bd")?;
            let daemon = lab.daemon_with_args("", &["--metrics", "off"])?;
            let mut dependency = Dependency::up(&lab, death)?;
            let addr = SocketAddr::new(lab.server_ip(Family::V4), 8080);
            let client = start_loop(&lab, addr, total, interval, false)?;
            thread::sleep(Duration::from_secs(1));
            let died = dependency.kill()?;
            thread::sleep(Duration::from_secs(4));
            let back = dependency.revive()?;
            let attempts = finish_loop(client)?;
            let endpoint = addr.to_string();
            if let Some(open) = transition(&daemon, &endpoint, "open", died) {
                detect.push((open - died) * 1e3);
                suffered.push(failed_between(&attempts, died, open));
            }
            if let Some(closed) = transition(&daemon, &endpoint, "closed", back) {
                recover.push((closed - back) * 1e3);
            }
        }
        let l = death.label();
        section.add(
            format!("resil, {l}: death to circuit open"),
            "ms",
            &detect,
            "",
        );
        section.add(
            format!("resil, {l}: attempts that failed in full before it"),
            "attempts",
            &suffered,
            "",
        );
        section.add(
            format!("resil, {l}: return to circuit closed"),
            "ms",
            &recover,
            "",
        );
        for passive in [false, true] {
            let kind = if passive {
                "passive (observe layer4, 5 errors)"
            } else {
                "active (check every 1 s, fall 3)"
            };
            let (mut detect, mut suffered, mut recover) = (vec![], vec![], vec![]);
            for _ in 0..plan.runs {
                let lab = Lab::new("bh")?;
                let mut dependency = Dependency::up(&lab, death)?;
                let proxy = match Haproxy::start(&lab, passive) {
                    Ok(p) => p,
                    Err(e) => {
                        section.skip(format!("HAProxy {kind}, {l}"), e);
                        break;
                    }
                };
                proxy
                    .wait_for("UP", Duration::from_secs(10))
                    .context("haproxy never saw the server up")?;
                let front: SocketAddr = Haproxy::FRONT.parse()?;
                let client =
                    start_loop(&lab, front, total + Duration::from_secs(6), interval, true)?;
                thread::sleep(Duration::from_secs(1));
                let died = dependency.kill()?;
                // A blackholed server fails its checks only after their own timeout (1 s each).
                let down = proxy.wait_for("DOWN", Duration::from_secs(10));
                let remaining = Duration::from_secs_f64((died + 4.0 - unix_now()).max(0.0));
                thread::sleep(remaining);
                let back = dependency.revive()?;
                // Passive checks only come back with the next health check (every 60 s here):
                // give up after 5 s rather than wait for it.
                let up = match down {
                    Some(_) => {
                        proxy.wait_for("UP", Duration::from_secs(if passive { 5 } else { 10 }))
                    }
                    None => None, // never down: nothing to recover from
                };
                let attempts = finish_loop(client)?;
                if let Some(down) = down {
                    detect.push((down - died) * 1e3);
                    suffered.push(failed_between(&attempts, died, down));
                }
                if let Some(up) = up {
                    recover.push((up - back) * 1e3);
                }
            }
            section.add(
                format!("HAProxy {kind}, {l}: death to server down"),
                "ms",
                &detect,
                "runs missing: not down within 10 s",
            );
            section.add(
                format!("HAProxy {kind}, {l}: attempts that failed in full before it"),
                "attempts",
                &suffered,
                "",
            );
            section.add(
                format!("HAProxy {kind}, {l}: return to server up"),
                "ms",
                &recover,
                if passive {
                    "runs missing: not up within 5 s (the next health check is up to 60 s away)"
                } else {
                    ""
                },
            );
        }
    }
    Ok(section)
}
