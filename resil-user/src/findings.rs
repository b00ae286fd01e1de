//! Findings: what is unhealthy, in which domain of the failure model, and the evidence.
//!
//! Pure. The agent hands in what each endpoint, local service and resolver did lately (the
//! figures of the last one to two [`crate::recent`] spans) with its breaker state;
//! [`classify`] says what is wrong; [`Findings`] remembers since when, and says when a
//! finding ends because its condition cleared.
//!
//! The domains (BRIEF §1): a host that answers on none of its observed ports is *host down*;
//! one service port refusing or resetting while its host answers is a *dependency* failure;
//! retransmissions, latency far above the endpoint's own baseline and resolver trouble are
//! *communication*; a local service refusing, resetting or losing inbound SYNs is *internal*.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use resil_common::maps::EndpointStats;
use serde::{Deserialize, Serialize};

use crate::{api::Side, breaker::FailureKind, resolvers::DnsCounts};

/// Fewest failures in the recent window that make a finding.
pub const MIN_FAILURES: u64 = 3;
/// Share of attempts refused that makes a dependency refusing.
pub const REFUSAL_SHARE: f64 = 0.5;
/// Share of established connections reset that makes a peer (or local service) resetting.
pub const RESET_SHARE: f64 = 0.2;
/// Share of attempts whose SYN (or SYN-ACK) went out again that makes a path lossy, or a local
/// listen queue overflowing.
pub const SYN_RETRANSMIT_SHARE: f64 = 0.2;
/// Share of data segments retransmitted that makes a path lossy (a healthy path stays well
/// under 1 %; a retransmission can carry several lost segments at once, so the share reads
/// low).
pub const RETRANSMIT_SHARE: f64 = 0.02;
/// Fewest data segments for a retransmission share to mean anything.
pub const MIN_SEGMENTS: u64 = 20;
/// A recent p99 handshake this many times the endpoint's baseline median is slow …
pub const LATENCY_FACTOR: f64 = 10.0;
/// … and at least this much slower, in microseconds (a 40 µs baseline tripling is noise).
pub const LATENCY_MARGIN_US: f64 = 10_000.0;
/// Fewest handshakes in the recent window, and in the baseline, to compare latencies.
pub const MIN_LATENCY_SAMPLES: u64 = 10;
/// Share of DNS queries unanswered or answered SERVFAIL that makes a resolver failing.
pub const DNS_FAILURE_SHARE: f64 = 0.2;

/// The four domains of the failure model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Domain {
    /// Hardware or infrastructure: a host that answers on none of its ports.
    HostDown,
    /// The network between: loss, latency, resolvers.
    Communication,
    /// A remote service refusing or resetting while its host answers.
    Dependency,
    /// This node's own services.
    Internal,
}

impl Domain {
    /// The heading reports group findings under.
    pub fn title(self) -> &'static str {
        match self {
            Domain::HostDown => "Host down",
            Domain::Communication => "Communication",
            Domain::Dependency => "Dependency",
            Domain::Internal => "Internal (local services)",
        }
    }
}

/// The figures behind a finding; absent ones do not apply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Seconds the recent figures cover.
    pub window_s: f64,
    /// The share of the rule that fired (0..1).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ports: Option<Vec<u16>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attempts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub established: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub refused: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timeouts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub unreachable: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub syn_retransmits: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retransmits: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub segments: Option<u64>,
    /// Inbound SYNs resil answered with a RST (shedding).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub baseline_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub queries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub servfail: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nxdomain: Option<u64>,
    /// The breaker's state and why, for endpoints whose circuit is not closed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub breaker: Option<String>,
}

/// One finding, as reports and events show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub domain: Domain,
    /// Which rule found it: `host_down`, `refusing`, `resetting`, `silent`, `syn_loss`,
    /// `path_resets`, `retransmits`, `latency`, `losing_syns`, `dns`.
    pub rule: String,
    /// What is unhealthy: `host 10.0.3.7`, `postgres (10.0.3.7:5432)`, `local service
    /// 10.0.0.2:8080`, `resolver 10.0.0.53:53`.
    pub subject: String,
    /// One sentence a person on call can act on.
    pub summary: String,
    /// When the condition was first seen (seconds since the Unix epoch).
    pub since: f64,
    /// How bad, for ordering: the share of attempts that failed (0..1).
    pub severity: f64,
    /// The endpoints it concerns.
    pub endpoints: Vec<String>,
    pub evidence: Evidence,
}

/// A breaker that is not closed, as the classifier sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerView {
    /// `open`, `half_open`, `forced_open`, `metrics_only` …
    pub state: String,
    /// The reason in words.
    pub reason: Option<String>,
    /// Whether the breaker holds the endpoint failed (open or half-open, not manual): a
    /// finding about it lasts while no traffic can show otherwise.
    pub failing: bool,
}

/// Handshake latency lately against the endpoint's own history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyShift {
    pub recent_p99_us: f64,
    pub recent_samples: u64,
    pub baseline_p50_us: f64,
    pub baseline_samples: u64,
}

/// What one endpoint (outbound) or local service (inbound) did lately.
#[derive(Debug, Clone)]
pub struct Observed {
    pub addr: SocketAddr,
    pub side: Side,
    /// `name (address)` or the address.
    pub display: String,
    /// The host's own name (DNS, /etc/hosts), for host-level findings.
    pub host_name: Option<String>,
    /// Counters gained over the recent window.
    pub recent: EndpointStats,
    /// Handshakes timed out over the recent window.
    pub timeouts: u64,
    pub window_s: f64,
    pub breaker: Option<BreakerView>,
    pub latency: Option<LatencyShift>,
    /// The kind of the last failure seen, ever.
    pub last_failure: Option<FailureKind>,
    /// Whether a connection to it ever completed (a port nobody ever served is not a
    /// service: scanners knock on closed ports all day).
    pub ever_established: bool,
    /// Whether the latest news from it was an answer rather than silence.
    pub answered_last: bool,
    /// Handshakes unanswered since its last answer.
    pub unanswered_run: u64,
}

/// What one resolver did lately.
#[derive(Debug, Clone)]
pub struct ObservedResolver {
    pub addr: SocketAddr,
    pub recent: DnsCounts,
    pub window_s: f64,
}

/// A finding as the classifier detects it, before it has a history.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    /// Stable identity: the same condition on the same subject keeps its key.
    pub key: String,
    pub finding: Finding,
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 / whole as f64).min(1.0)
    }
}

fn percent(x: f64) -> String {
    let p = x * 100.0;
    if p >= 10.0 || p == 0.0 {
        format!("{p:.0} %")
    } else {
        format!("{p:.1} %")
    }
}

fn millis(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn side_word(side: Side) -> &'static str {
    match side {
        Side::Outbound => "outbound",
        Side::Inbound => "inbound",
    }
}

/// A finding about one endpoint or local service.
fn about(
    o: &Observed,
    domain: Domain,
    rule: &str,
    subject: String,
    summary: String,
    severity: f64,
    evidence: Evidence,
) -> Detected {
    Detected {
        key: format!("{rule}/{}/{}", side_word(o.side), o.addr),
        finding: Finding {
            domain,
            rule: rule.to_string(),
            subject,
            summary,
            since: 0.0,
            severity,
            endpoints: vec![o.addr.to_string()],
            evidence,
        },
    }
}

fn base_evidence(o: &Observed) -> Evidence {
    Evidence {
        window_s: round1(o.window_s),
        attempts: Some(o.recent.attempts),
        breaker: o.breaker.as_ref().map(|b| match &b.reason {
            Some(reason) => format!("{}: {reason}", b.state),
            None => b.state.clone(),
        }),
        ..Evidence::default()
    }
}

/// Whether an outbound endpoint answers: it got answers lately (a handshake, a refusal, a
/// reset), and nothing has gone unanswered since the last of them.
fn answered(o: &Observed) -> bool {
    o.answered_last && (o.recent.established > 0 || o.recent.refused > 0 || o.recent.resets_in > 0)
}

/// Whether the endpoint's circuit opened on failures of these kinds (and holds it failed).
fn opened_on(o: &Observed, kinds: &[FailureKind]) -> bool {
    o.breaker.as_ref().is_some_and(|b| b.failing)
        && o.last_failure.is_some_and(|k| kinds.contains(&k))
}

/// Handshakes that got no answer at all lately (timeouts, ICMP unreachable), counting only
/// those since the last answer: a few scattered among successes are no dead host.
fn unanswered(o: &Observed) -> u64 {
    (o.timeouts + o.recent.unreachable).min(o.unanswered_run)
}

/// Whether an outbound endpoint looks dead: unanswered handshakes and no answer since, or a
/// breaker that opened on silence (timeouts, unreachable).
fn silent(o: &Observed) -> bool {
    let opened_on_silence = opened_on(o, &[FailureKind::Timeout, FailureKind::Unreachable]);
    !answered(o) && (unanswered(o) > 0 || opened_on_silence)
}

/// Classifies what every endpoint, local service and resolver did lately.
pub fn classify(observed: &[Observed], resolvers: &[ObservedResolver]) -> Vec<Detected> {
    let mut found = Vec::new();
    let mut hosts: BTreeMap<IpAddr, Vec<&Observed>> = BTreeMap::new();
    for o in observed {
        match o.side {
            Side::Outbound => hosts.entry(o.addr.ip()).or_default().push(o),
            Side::Inbound => internal(o, &mut found),
        }
    }
    for (ip, ports) in &hosts {
        let host_answers = ports.iter().any(|o| answered(o));
        let dead: Vec<&Observed> = ports.iter().copied().filter(|o| silent(o)).collect();
        let failures: u64 = dead.iter().map(|o| unanswered(o)).sum();
        let held = dead
            .iter()
            .any(|o| o.breaker.as_ref().is_some_and(|b| b.failing));
        if !host_answers && !dead.is_empty() && (failures >= MIN_FAILURES || held) {
            host_down(*ip, &dead, &mut found);
        } else {
            for o in ports {
                dependency(o, host_answers, &mut found);
                communication(o, &mut found);
            }
        }
    }
    for r in resolvers {
        resolver(r, &mut found);
    }
    found
}

fn host_down(ip: IpAddr, dead: &[&Observed], found: &mut Vec<Detected>) {
    let host = match dead.iter().find_map(|o| o.host_name.as_deref()) {
        Some(name) => format!("host {name} ({ip})"),
        None => format!("host {ip}"),
    };
    let timeouts: u64 = dead.iter().map(|o| o.timeouts).sum();
    let unreachable: u64 = dead.iter().map(|o| o.recent.unreachable).sum();
    let attempts: u64 = dead.iter().map(|o| o.recent.attempts).sum();
    let mut ports: Vec<u16> = dead.iter().map(|o| o.addr.port()).collect();
    ports.sort_unstable();
    let window_s = dead.iter().map(|o| o.window_s).fold(0.0, f64::max);
    let breakers: Vec<String> = dead
        .iter()
        .filter_map(|o| {
            o.breaker
                .as_ref()
                .map(|b| format!("{} {}", o.addr.port(), b.state))
        })
        .collect();
    let port_words = if ports.len() == 1 {
        format!("port {}", ports[0])
    } else {
        format!("{} ports", ports.len())
    };
    let summary = if timeouts + unreachable > 0 {
        format!(
            "{host} is not answering: {} handshakes on {port_words} got no answer ({timeouts} timed out, {unreachable} ICMP unreachable)",
            timeouts + unreachable
        )
    } else {
        format!("{host} is not answering on {port_words}; its circuits are open and connections fail fast")
    };
    let evidence = Evidence {
        window_s: round1(window_s),
        ports: Some(ports),
        attempts: Some(attempts),
        timeouts: Some(timeouts),
        unreachable: Some(unreachable),
        established: Some(dead.iter().map(|o| o.recent.established).sum()),
        breaker: (!breakers.is_empty()).then(|| breakers.join(", ")),
        ..Evidence::default()
    };
    found.push(Detected {
        key: format!("host_down/{ip}"),
        finding: Finding {
            domain: Domain::HostDown,
            rule: "host_down".into(),
            subject: host,
            summary,
            since: 0.0,
            severity: 1.0,
            endpoints: dead.iter().map(|o| o.addr.to_string()).collect(),
            evidence,
        },
    });
}

fn dependency(o: &Observed, host_answers: bool, found: &mut Vec<Detected>) {
    let r = &o.recent;
    let refused_share = share(r.refused, r.attempts);
    // Successes from before it began refusing may still be in the window: a circuit that
    // opened on refusals says it refuses now.
    let refusing = refused_share >= REFUSAL_SHARE || opened_on(o, &[FailureKind::Refused]);
    if r.refused >= MIN_FAILURES && refusing {
        let summary = format!(
            "{} refusing connections: {} of {} attempts ({}) in the last {:.0} s, while its host answers",
            o.display, r.refused, r.attempts, percent(refused_share), o.window_s
        );
        let evidence = Evidence {
            rate: Some(refused_share),
            refused: Some(r.refused),
            established: Some(r.established),
            ..base_evidence(o)
        };
        found.push(about(
            o,
            Domain::Dependency,
            "refusing",
            o.display.clone(),
            summary,
            refused_share,
            evidence,
        ));
    }
    // Resets the peer itself sent (the others are the path's: communication).
    let resets = r.resets_in.saturating_sub(r.path_resets);
    let reset_share = share(resets, r.established.max(resets));
    if resets >= MIN_FAILURES && reset_share >= RESET_SHARE {
        let summary = format!(
            "{} resetting connections: {} resets on {} connections in the last {:.0} s",
            o.display, resets, r.established, o.window_s
        );
        let evidence = Evidence {
            rate: Some(reset_share),
            resets: Some(resets),
            established: Some(r.established),
            ..base_evidence(o)
        };
        found.push(about(
            o,
            Domain::Dependency,
            "resetting",
            o.display.clone(),
            summary,
            reset_share,
            evidence,
        ));
    }
    if host_answers && unanswered(o) >= MIN_FAILURES && !answered(o) {
        let summary = format!(
            "{} not answering: {} handshakes got no answer in the last {:.0} s while other ports of its host answer",
            o.display, unanswered(o), o.window_s
        );
        let evidence = Evidence {
            rate: Some(share(unanswered(o), r.attempts.max(unanswered(o)))),
            timeouts: Some(o.timeouts),
            unreachable: Some(r.unreachable),
            ..base_evidence(o)
        };
        found.push(about(
            o,
            Domain::Dependency,
            "silent",
            o.display.clone(),
            summary,
            1.0,
            evidence,
        ));
    }
}

fn communication(o: &Observed, found: &mut Vec<Detected>) {
    let r = &o.recent;
    let subject = match o.side {
        Side::Outbound => o.display.clone(),
        Side::Inbound => format!("clients of local service {}", o.display),
    };
    let syn_share = share(r.syn_retransmits, r.attempts);
    if o.side == Side::Outbound
        && r.syn_retransmits >= MIN_FAILURES
        && syn_share >= SYN_RETRANSMIT_SHARE
        && r.established > 0
    {
        let summary = format!(
            "{subject}: SYNs retransmitted for {} of connection attempts ({} of {}) in the last {:.0} s: packets are being lost on the way",
            percent(syn_share), r.syn_retransmits, r.attempts, o.window_s
        );
        let evidence = Evidence {
            rate: Some(syn_share),
            syn_retransmits: Some(r.syn_retransmits),
            established: Some(r.established),
            ..base_evidence(o)
        };
        found.push(about(
            o,
            Domain::Communication,
            "syn_loss",
            subject.clone(),
            summary,
            syn_share,
            evidence,
        ));
    }
    if r.path_resets >= MIN_FAILURES {
        let summary = format!(
            "{subject}: {} connections reset by something on the path (a TTL other than the peer's) in the last {:.0} s: a firewall, load balancer or IDS is cutting them",
            r.path_resets, o.window_s
        );
        let evidence = Evidence {
            rate: Some(share(r.path_resets, r.established.max(r.path_resets))),
            resets: Some(r.path_resets),
            established: Some(r.established),
            ..base_evidence(o)
        };
        let severity = share(r.path_resets, r.established.max(r.path_resets));
        found.push(about(
            o,
            Domain::Communication,
            "path_resets",
            subject.clone(),
            summary,
            severity,
            evidence,
        ));
    }
    let rtx_share = share(r.retransmits, r.segments);
    if r.segments >= MIN_SEGMENTS && r.retransmits >= MIN_FAILURES && rtx_share >= RETRANSMIT_SHARE
    {
        let summary = format!(
            "{subject}: {} of data segments retransmitted ({} of {}) in the last {:.0} s: packets are being lost on the way",
            percent(rtx_share), r.retransmits, r.segments, o.window_s
        );
        let evidence = Evidence {
            rate: Some(rtx_share),
            retransmits: Some(r.retransmits),
            segments: Some(r.segments),
            ..base_evidence(o)
        };
        found.push(about(
            o,
            Domain::Communication,
            "retransmits",
            subject.clone(),
            summary,
            rtx_share,
            evidence,
        ));
    }
    if let Some(l) = o.latency {
        let slow = l.recent_samples >= MIN_LATENCY_SAMPLES
            && l.baseline_samples >= MIN_LATENCY_SAMPLES
            && l.recent_p99_us >= l.baseline_p50_us * LATENCY_FACTOR
            && l.recent_p99_us - l.baseline_p50_us >= LATENCY_MARGIN_US;
        if slow {
            let summary = format!(
                "{subject}: handshakes slow, p99 connect {} against a baseline of {} in the last {:.0} s",
                millis(l.recent_p99_us), millis(l.baseline_p50_us), o.window_s
            );
            let evidence = Evidence {
                p99_us: Some(l.recent_p99_us),
                baseline_p50_us: Some(l.baseline_p50_us),
                established: Some(r.established),
                ..base_evidence(o)
            };
            let severity = (1.0 - l.baseline_p50_us / l.recent_p99_us).clamp(0.0, 1.0);
            found.push(about(
                o,
                Domain::Communication,
                "latency",
                subject,
                summary,
                severity,
                evidence,
            ));
        }
    }
}

fn internal(o: &Observed, found: &mut Vec<Detected>) {
    let r = &o.recent;
    let subject = format!("local service {}", o.display);
    let shed = (r.fast_failed > 0).then_some(r.fast_failed);
    let refused_share = share(r.refused, r.attempts);
    if o.ever_established && r.refused >= MIN_FAILURES && refused_share >= REFUSAL_SHARE {
        let summary = format!(
            "{subject} refusing inbound connections: {} of {} attempts in the last {:.0} s (is its process running and listening?)",
            r.refused, r.attempts, o.window_s
        );
        let evidence = Evidence {
            rate: Some(refused_share),
            refused: Some(r.refused),
            shed,
            ..base_evidence(o)
        };
        found.push(about(
            o,
            Domain::Internal,
            "refusing",
            subject.clone(),
            summary,
            refused_share,
            evidence,
        ));
    }
    let reset_share = share(r.resets_out, r.established.max(r.resets_out));
    if r.resets_out >= MIN_FAILURES && reset_share >= RESET_SHARE {
        let summary = format!(
            "{subject} resetting its clients: {} resets on {} connections in the last {:.0} s",
            r.resets_out, r.established, o.window_s
        );
        let evidence = Evidence {
            rate: Some(reset_share),
            resets: Some(r.resets_out),
            established: Some(r.established),
            shed,
            ..base_evidence(o)
        };
        found.push(about(
            o,
            Domain::Internal,
            "resetting",
            subject.clone(),
            summary,
            reset_share,
            evidence,
        ));
    }
    // Attempts that never completed, with their SYNs or SYN-ACKs sent again: a listen queue
    // that drops, or clients that never answer (a SYN flood looks the same, and is worth
    // knowing about too; it is never a reason to shed).
    let stalled = r.attempts.saturating_sub(r.established);
    let syn_share = share(r.syn_retransmits, r.attempts);
    if stalled >= MIN_FAILURES
        && r.syn_retransmits >= MIN_FAILURES
        && syn_share >= SYN_RETRANSMIT_SHARE
    {
        let summary = format!(
            "{subject} losing connection attempts: {} of {} never completed, {} SYN or SYN-ACK retransmissions in the last {:.0} s (listen queue full, or a SYN flood?)",
            stalled, r.attempts, r.syn_retransmits, o.window_s
        );
        let evidence = Evidence {
            rate: Some(syn_share),
            syn_retransmits: Some(r.syn_retransmits),
            established: Some(r.established),
            shed,
            ..base_evidence(o)
        };
        found.push(about(
            o,
            Domain::Internal,
            LOSING_SYNS,
            subject,
            summary,
            syn_share,
            evidence,
        ));
    }
    communication(o, found);
}

/// The rule name of a local service losing connection attempts: it can be caused from outside
/// (spoofed SYNs), so it never makes a service shed.
pub const LOSING_SYNS: &str = "losing_syns";

fn resolver(r: &ObservedResolver, found: &mut Vec<Detected>) {
    let c = &r.recent;
    let failed = c.timeouts + c.servfail;
    let failed_share = share(failed, c.queries.max(failed));
    if failed >= MIN_FAILURES && failed_share >= DNS_FAILURE_SHARE {
        let subject = format!("resolver {}", r.addr);
        let summary = format!(
            "{subject} failing: {} of {} queries unanswered and {} answered SERVFAIL in the last {:.0} s",
            c.timeouts, c.queries, c.servfail, r.window_s
        );
        let evidence = Evidence {
            window_s: round1(r.window_s),
            rate: Some(failed_share),
            queries: Some(c.queries),
            timeouts: Some(c.timeouts),
            servfail: Some(c.servfail),
            nxdomain: Some(c.nxdomain),
            ..Evidence::default()
        };
        found.push(Detected {
            key: format!("dns/{}", r.addr),
            finding: Finding {
                domain: Domain::Communication,
                rule: "dns".into(),
                subject,
                summary,
                since: 0.0,
                severity: failed_share,
                endpoints: vec![r.addr.to_string()],
                evidence,
            },
        });
    }
}

/// A change to the set of findings, for the event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Started(Finding),
    Ended(Finding),
}

/// The findings in force, with since when.
#[derive(Debug, Default)]
pub struct Findings {
    active: HashMap<String, Finding>,
}

impl Findings {
    /// Takes in the latest classification at `now` (Unix seconds). A finding not detected
    /// again ends, unless `held` says its subject still cannot show otherwise (an open
    /// circuit or shedding keeps traffic away, and with it the evidence).
    pub fn update(
        &mut self,
        detected: Vec<Detected>,
        held: impl Fn(&Finding) -> bool,
        now: f64,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut seen = HashMap::with_capacity(detected.len());
        for Detected { key, mut finding } in detected {
            match self.active.get(&key) {
                Some(old) => finding.since = old.since,
                None => {
                    finding.since = now;
                    changes.push(Change::Started(finding.clone()));
                }
            }
            seen.insert(key, finding);
        }
        for (key, old) in self.active.drain() {
            if seen.contains_key(&key) {
                continue;
            }
            if held(&old) {
                seen.insert(key, old);
            } else {
                changes.push(Change::Ended(old));
            }
        }
        self.active = seen;
        changes
    }

    /// The findings in force: by domain, worst first.
    pub fn current(&self) -> Vec<Finding> {
        let mut all: Vec<Finding> = self.active.values().cloned().collect();
        all.sort_by(|a, b| {
            a.domain
                .cmp(&b.domain)
                .then(b.severity.total_cmp(&a.severity))
                .then(a.since.total_cmp(&b.since))
                .then(a.subject.cmp(&b.subject))
        });
        all
    }

    /// The findings in force of `domain` about `endpoint`.
    pub fn about<'a>(
        &'a self,
        domain: Domain,
        endpoint: &'a str,
    ) -> impl Iterator<Item = &'a Finding> {
        self.active
            .values()
            .filter(move |f| f.domain == domain && f.endpoints.iter().any(|e| e == endpoint))
    }

    /// Ends the findings of `domain` about `endpoint` now (the agent saw it recover).
    pub fn end_about(&mut self, domain: Domain, endpoint: &str) -> Vec<Change> {
        let ended: Vec<String> = self
            .active
            .iter()
            .filter(|(_, f)| f.domain == domain && f.endpoints.iter().any(|e| e == endpoint))
            .map(|(k, _)| k.clone())
            .collect();
        ended
            .into_iter()
            .filter_map(|k| self.active.remove(&k))
            .map(Change::Ended)
            .collect()
    }

    /// Number of findings in force per domain.
    pub fn count_by_domain(&self) -> BTreeMap<Domain, usize> {
        let mut counts = BTreeMap::new();
        for f in self.active.values() {
            *counts.entry(f.domain).or_insert(0) += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests;
