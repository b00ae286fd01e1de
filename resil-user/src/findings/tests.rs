use super::*;
use crate::breaker::FailureKind;

fn observed(addr: &str, side: Side) -> Observed {
    Observed {
        addr: addr.parse().unwrap(),
        side,
        display: addr.to_string(),
        host_name: None,
        recent: EndpointStats::ZERO,
        timeouts: 0,
        window_s: 15.0,
        breaker: None,
        latency: None,
        last_failure: None,
        ever_established: true,
        answered_last: true,
        unanswered_run: 0,
    }
}

fn with(addr: &str, side: Side, f: impl FnOnce(&mut Observed)) -> Observed {
    let mut o = observed(addr, side);
    f(&mut o);
    // Unless a test says otherwise, its unanswered handshakes came after any answer.
    if o.unanswered_run == 0 {
        o.unanswered_run = o.timeouts + o.recent.unreachable;
    }
    o
}

fn domains(found: &[Detected]) -> Vec<(Domain, String)> {
    found
        .iter()
        .map(|d| (d.finding.domain, d.key.clone()))
        .collect()
}

#[test]
fn a_host_silent_on_all_its_ports_is_down() {
    let a = with("10.0.3.7:80", Side::Outbound, |o| {
        o.recent.attempts = 4;
        o.timeouts = 4;
    });
    let b = with("10.0.3.7:5432", Side::Outbound, |o| {
        o.recent.attempts = 2;
        o.timeouts = 1;
        o.recent.unreachable = 1;
    });
    let found = classify(&[a.clone(), b.clone()], &[]);
    assert_eq!(
        domains(&found),
        [(Domain::HostDown, "host_down/10.0.3.7".into())]
    );
    let f = &found[0].finding;
    assert_eq!(f.evidence.ports, Some(vec![80, 5432]));
    assert_eq!(
        (f.evidence.timeouts, f.evidence.unreachable),
        (Some(5), Some(1))
    );
    assert!(
        f.summary.contains("host 10.0.3.7 is not answering"),
        "{}",
        f.summary
    );
    assert_eq!(f.endpoints.len(), 2);
    // Named where the name is known.
    let named = Observed {
        host_name: Some("db1.lab".into()),
        ..b
    };
    let found = classify(&[a, named], &[]);
    assert_eq!(found[0].finding.subject, "host db1.lab (10.0.3.7)");
}

#[test]
fn too_few_failures_make_no_finding() {
    let a = with("10.0.3.7:80", Side::Outbound, |o| {
        o.recent.attempts = 2;
        o.timeouts = 2;
    });
    assert!(classify(&[a], &[]).is_empty());
}

#[test]
fn one_port_refusing_while_another_answers_is_a_dependency() {
    let refusing = with("10.0.3.7:5432", Side::Outbound, |o| {
        o.display = "postgres (10.0.3.7:5432)".into();
        o.recent.attempts = 40;
        o.recent.refused = 40;
    });
    let fine = with("10.0.3.7:80", Side::Outbound, |o| {
        o.recent.attempts = 10;
        o.recent.established = 10;
    });
    let found = classify(&[refusing, fine], &[]);
    assert_eq!(
        domains(&found),
        [(Domain::Dependency, "refusing/outbound/10.0.3.7:5432".into())]
    );
    let f = &found[0].finding;
    assert_eq!(f.subject, "postgres (10.0.3.7:5432)");
    assert!(
        f.summary.contains("40 of 40 attempts (100 %)"),
        "{}",
        f.summary
    );
    assert_eq!(f.evidence.rate, Some(1.0));
}

#[test]
fn a_refusing_port_alone_is_a_dependency_not_a_dead_host() {
    // A refusal is an answer: the host is up.
    let refusing = with("10.0.3.7:5432", Side::Outbound, |o| {
        o.recent.attempts = 5;
        o.recent.refused = 5;
    });
    assert_eq!(
        classify(&[refusing], &[])[0].finding.domain,
        Domain::Dependency
    );
}

#[test]
fn a_silent_port_on_an_answering_host_is_a_dependency() {
    let silent = with("10.0.3.7:9000", Side::Outbound, |o| {
        o.recent.attempts = 3;
        o.timeouts = 3;
    });
    let fine = with("10.0.3.7:80", Side::Outbound, |o| {
        o.recent.attempts = 3;
        o.recent.established = 3;
    });
    let found = classify(&[silent, fine], &[]);
    assert_eq!(
        domains(&found),
        [(Domain::Dependency, "silent/outbound/10.0.3.7:9000".into())]
    );
}

#[test]
fn resets_lost_segments_and_slow_handshakes() {
    let resetting = with("10.0.0.2:80", Side::Outbound, |o| {
        o.recent.attempts = 10;
        o.recent.established = 10;
        o.recent.resets_in = 5;
    });
    let lossy = with("10.0.0.3:80", Side::Outbound, |o| {
        o.recent.attempts = 10;
        o.recent.established = 10;
        o.recent.segments = 1000;
        o.recent.retransmits = 80;
    });
    let slow = with("10.0.0.4:80", Side::Outbound, |o| {
        o.recent.attempts = 20;
        o.recent.established = 20;
        o.latency = Some(LatencyShift {
            recent_p99_us: 480_000.0,
            recent_samples: 20,
            baseline_p50_us: 400.0,
            baseline_samples: 1000,
        });
    });
    let syn_loss = with("10.0.0.5:80", Side::Outbound, |o| {
        o.recent.attempts = 10;
        o.recent.established = 10;
        o.recent.syn_retransmits = 4;
    });
    let found = classify(&[resetting, lossy, slow, syn_loss], &[]);
    let keys: Vec<String> = found.iter().map(|d| d.key.clone()).collect();
    assert_eq!(
        keys,
        [
            "resetting/outbound/10.0.0.2:80",
            "retransmits/outbound/10.0.0.3:80",
            "latency/outbound/10.0.0.4:80",
            "syn_loss/outbound/10.0.0.5:80"
        ]
    );
    let latency = &found[2].finding;
    assert!(
        latency
            .summary
            .contains("p99 connect 480 ms against a baseline of 0.40 ms"),
        "{}",
        latency.summary
    );
}

#[test]
fn a_latency_rise_within_noise_is_not_slow() {
    let o = with("10.0.0.4:80", Side::Outbound, |o| {
        o.recent.established = 20;
        o.latency = Some(LatencyShift {
            recent_p99_us: 900.0, // 20 × baseline, but only 0.9 ms
            recent_samples: 20,
            baseline_p50_us: 45.0,
            baseline_samples: 1000,
        });
    });
    assert!(classify(&[o], &[]).is_empty());
}

#[test]
fn local_services_refusing_resetting_and_losing_syns_are_internal() {
    let refusing = with("10.0.0.2:8080", Side::Inbound, |o| {
        o.recent.attempts = 6;
        o.recent.refused = 6;
    });
    let resetting = with("10.0.0.2:8081", Side::Inbound, |o| {
        o.recent.attempts = 6;
        o.recent.established = 6;
        o.recent.resets_out = 6;
    });
    let losing = with("10.0.0.2:8082", Side::Inbound, |o| {
        o.recent.attempts = 10;
        o.recent.established = 2;
        o.recent.syn_retransmits = 12;
    });
    let found = classify(&[refusing, resetting, losing], &[]);
    assert!(
        found.iter().all(|d| d.finding.domain == Domain::Internal),
        "{found:?}"
    );
    assert_eq!(found.len(), 3);
    assert!(found[0]
        .finding
        .summary
        .contains("local service 10.0.0.2:8080 refusing inbound connections: 6 of 6"));
}

#[test]
fn failing_resolvers_are_communication() {
    let r = ObservedResolver {
        addr: "10.0.0.53:53".parse().unwrap(),
        recent: DnsCounts {
            queries: 10,
            answers: 7,
            timeouts: 3,
            servfail: 2,
            nxdomain: 1,
            other_errors: 0,
        },
        window_s: 12.0,
    };
    let found = classify(&[], std::slice::from_ref(&r));
    assert_eq!(
        domains(&found),
        [(Domain::Communication, "dns/10.0.0.53:53".into())]
    );
    assert_eq!(found[0].finding.evidence.servfail, Some(2));
    let healthy = ObservedResolver {
        recent: DnsCounts {
            queries: 100,
            answers: 100,
            nxdomain: 40,
            ..DnsCounts::default()
        },
        ..r
    };
    assert!(
        classify(&[], &[healthy]).is_empty(),
        "NXDOMAIN is an answer, not resolver trouble"
    );
}

#[test]
fn an_open_circuit_keeps_a_dead_host_reported_without_traffic() {
    let open = |last_failure| {
        with("10.0.3.7:80", Side::Outbound, |o| {
            o.recent.fast_failed = 30;
            o.last_failure = Some(last_failure);
            o.breaker = Some(BreakerView {
                state: "open".into(),
                reason: Some("5 consecutive failures".into()),
                failing: true,
            });
        })
    };
    let found = classify(&[open(FailureKind::Timeout)], &[]);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].finding.domain, Domain::HostDown);
    assert_eq!(
        found[0].finding.evidence.breaker.as_deref(),
        Some("80 open")
    );
    // A circuit opened by refusals is about a dependency, not a dead host: nothing new here
    // (the refusing finding is held by the agent while the circuit stays open).
    assert!(classify(&[open(FailureKind::Refused)], &[]).is_empty());
}

#[test]
fn ports_nobody_ever_served_are_not_local_services() {
    let scanned = with("10.0.0.2:23", Side::Inbound, |o| {
        o.recent.attempts = 50;
        o.recent.refused = 50;
        o.ever_established = false;
    });
    assert!(classify(&[scanned], &[]).is_empty());
}

#[test]
fn syn_retransmissions_alone_do_not_make_a_service_lose_attempts() {
    // One spoofed SYN: the service retransmits its SYN-ACK five times.
    let spoofed = with("10.0.0.2:8080", Side::Inbound, |o| {
        o.recent.attempts = 1;
        o.recent.syn_retransmits = 5;
    });
    assert!(classify(&[spoofed], &[]).is_empty());
}

#[test]
fn the_same_address_inbound_and_outbound_keeps_apart() {
    let out = with("127.0.0.1:8080", Side::Outbound, |o| {
        o.recent.attempts = 5;
        o.recent.refused = 5;
    });
    let inside = with("127.0.0.1:8080", Side::Inbound, |o| {
        o.recent.attempts = 5;
        o.recent.refused = 5;
    });
    let found = classify(&[out, inside], &[]);
    assert_eq!(found.len(), 2);
    assert_ne!(found[0].key, found[1].key);
}

#[test]
fn findings_keep_their_start_and_end_when_they_clear_unless_held() {
    let dead = with("10.0.3.7:80", Side::Outbound, |o| {
        o.recent.attempts = 5;
        o.timeouts = 5;
    });
    let mut findings = Findings::default();
    let changes = findings.update(classify(std::slice::from_ref(&dead), &[]), |_| false, 100.0);
    assert!(matches!(&changes[..], [Change::Started(f)] if f.since == 100.0));
    assert!(findings
        .update(classify(&[dead], &[]), |_| false, 105.0)
        .is_empty());
    assert_eq!(findings.current()[0].since, 100.0);
    // Cleared, but held (say an open circuit): stays.
    assert!(findings.update(vec![], |_| true, 110.0).is_empty());
    assert_eq!(findings.current().len(), 1);
    let changes = findings.update(vec![], |_| false, 120.0);
    assert!(matches!(&changes[..], [Change::Ended(f)] if f.since == 100.0));
    assert!(findings.current().is_empty());
    assert!(findings.count_by_domain().is_empty());
}

#[test]
fn reports_are_ordered_by_domain_then_worst_first() {
    let mut findings = Findings::default();
    let mild = with("10.0.0.2:5432", Side::Outbound, |o| {
        o.recent.attempts = 10;
        o.recent.refused = 6;
    });
    let total = with("10.0.0.3:5432", Side::Outbound, |o| {
        o.recent.attempts = 10;
        o.recent.refused = 10;
    });
    let dead = with("10.0.9.9:80", Side::Outbound, |o| {
        o.recent.attempts = 3;
        o.timeouts = 3;
    });
    findings.update(classify(&[mild, total, dead], &[]), |_| false, 1.0);
    let subjects: Vec<String> = findings.current().into_iter().map(|f| f.subject).collect();
    assert_eq!(
        subjects,
        ["host 10.0.9.9", "10.0.0.3:5432", "10.0.0.2:5432"]
    );
}

#[test]
fn resets_from_the_path_are_communication_not_the_dependency() {
    let cut = with("10.0.0.2:443", Side::Outbound, |o| {
        o.recent.attempts = 10;
        o.recent.established = 10;
        o.recent.resets_in = 6;
        o.recent.path_resets = 6;
    });
    let found = classify(&[cut], &[]);
    assert_eq!(
        domains(&found),
        [(
            Domain::Communication,
            "path_resets/outbound/10.0.0.2:443".into()
        )]
    );
    assert!(found[0]
        .finding
        .summary
        .contains("6 connections reset by something on the path"));
}

#[test]
fn a_port_that_worked_and_went_silent_is_down_at_once() {
    // Handshakes completed earlier in the window, then only timeouts.
    let went_quiet = with("10.0.3.7:8080", Side::Outbound, |o| {
        o.recent.attempts = 20;
        o.recent.established = 15;
        o.timeouts = 5;
        o.answered_last = false;
        o.last_failure = Some(FailureKind::Timeout);
    });
    let found = classify(&[went_quiet], &[]);
    assert_eq!(
        domains(&found),
        [(Domain::HostDown, "host_down/10.0.3.7".into())]
    );
}

#[test]
fn a_port_that_worked_and_now_refuses_with_its_circuit_open_is_refusing() {
    let dead = with("10.0.3.7:5432", Side::Outbound, |o| {
        o.recent.attempts = 20;
        o.recent.established = 15;
        o.recent.refused = 5;
        o.last_failure = Some(FailureKind::Refused);
        o.breaker = Some(BreakerView {
            state: "open".into(),
            reason: Some("5 consecutive failures".into()),
            failing: true,
        });
    });
    let found = classify(&[dead], &[]);
    assert_eq!(
        domains(&found),
        [(Domain::Dependency, "refusing/outbound/10.0.3.7:5432".into())]
    );
}

#[test]
fn a_few_timeouts_among_successes_are_no_dead_host() {
    let busy = with("10.0.3.7:80", Side::Outbound, |o| {
        o.recent.attempts = 18;
        o.recent.established = 15;
        o.timeouts = 3;
        o.answered_last = false; // the newest news happens to be a timeout …
        o.unanswered_run = 1; // … but only one since the last answer
    });
    assert!(classify(&[busy], &[]).is_empty());
}
