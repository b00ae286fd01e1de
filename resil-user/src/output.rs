//! Rendering for people (tables) and machines (JSON).

use clap::ValueEnum;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Cell, CellAlignment, Table};

use std::net::SocketAddr;

use crate::{
    api::{EndpointStatus, FindingsReport, ManualReport, ResolverStatus, Side, StatusReport},
    config::Config,
    events::{Event, Sequenced},
    findings::{Domain, Finding},
    policy::PolicyView,
};

/// `-o table|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

/// `resil status` output.
pub fn status(report: &StatusReport, format: Format) -> String {
    match format {
        Format::Json => json(report),
        Format::Table if report.resolvers.is_empty() => status_table(&report.endpoints),
        Format::Table => format!(
            "{}\n\n{}",
            status_table(&report.endpoints),
            resolvers_table(&report.resolvers)
        ),
    }
}

fn resolvers_table(resolvers: &[ResolverStatus]) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "RESOLVER", "QUERIES", "ANSWERS", "P50", "P99", "TIMEOUTS", "SERVFAIL", "NXDOMAIN",
    ]);
    for r in resolvers {
        let c = &r.counts;
        let (p50, p99) = match r.latency_us {
            Some(l) => (micros(l.p50), micros(l.p99)),
            None => ("-".to_string(), "-".to_string()),
        };
        let mut row = vec![Cell::new(&r.resolver)];
        row.extend(
            [
                c.queries.to_string(),
                c.answers.to_string(),
                p50,
                p99,
                c.timeouts.to_string(),
                c.servfail.to_string(),
                c.nxdomain.to_string(),
            ]
            .into_iter()
            .map(|n| Cell::new(n).set_alignment(CellAlignment::Right)),
        );
        table.add_row(row);
    }
    table.to_string()
}

fn status_table(endpoints: &[EndpointStatus]) -> String {
    if endpoints.is_empty() {
        return "No TCP connections seen yet.".to_string();
    }
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "ENDPOINT",
        "DIR",
        "STATE",
        "ATTEMPTS",
        "SUCCESS",
        "P50",
        "P99",
        "REFUSED",
        "TIMEOUTS",
        "RESETS",
        "RETRANS",
        "FAST-FAILED",
    ]);
    for e in endpoints {
        let success = match e.failure_rate {
            Some(rate) => format!("{:.1}%", (1.0 - rate) * 100.0),
            None => "-".to_string(),
        };
        let (p50, p99) = match e.connect_latency_us {
            Some(l) => (micros(l.p50), micros(l.p99)),
            None => ("-".to_string(), "-".to_string()),
        };
        let dir = match e.direction {
            Side::Outbound => "out",
            Side::Inbound => "in",
        };
        let numbers = [
            e.attempts.to_string(),
            success,
            p50,
            p99,
            e.refused.to_string(),
            e.timeouts.to_string(),
            format!("{}/{}", e.resets_in, e.resets_out),
            (e.syn_retransmits + e.retransmits).to_string(),
            if e.would_fast_fail > 0 {
                format!("({} would)", e.would_fast_fail)
            } else {
                e.fast_failed.to_string()
            },
        ];
        let name = display_name(&e.endpoint, e.name.as_deref().or(e.dependency.as_deref()));
        let state = if e.shedding {
            "shedding"
        } else {
            e.state.as_str()
        };
        let mut row = vec![Cell::new(name), Cell::new(dir), Cell::new(state)];
        row.extend(
            numbers
                .into_iter()
                .map(|n| Cell::new(n).set_alignment(CellAlignment::Right)),
        );
        table.add_row(row);
    }
    table.to_string()
}

/// One line of `resil events` per event: JSON lines with `-o json`, else
/// `TIME  KIND  SUBJECT: WHAT`. Lines, not a table, so `--follow` can stream them.
pub fn event_line(event: &Sequenced, format: Format) -> String {
    if format == Format::Json {
        return serde_json::to_string(event).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    }
    let time = clock_time(event.time);
    match &event.event {
        Event::Transition(t) => format!(
            "{time}  breaker   {}: {} → {}: {}",
            display_name(&t.endpoint, t.dependency.as_deref()),
            t.from,
            t.to,
            t.reason
        ),
        Event::FindingStarted(f) => format!(
            "{time}  finding   [{}] {}",
            domain_word(f.domain),
            f.summary
        ),
        Event::SheddingStarted(s) => {
            format!(
                "{time}  shedding  local service {}: {}",
                s.service, s.reason
            )
        }
        Event::SheddingEnded(s) => format!("{time}  shedding  local service {}: ended", s.service),
        Event::FindingEnded(f) => format!(
            "{time}  cleared   [{}] {} (since {})",
            domain_word(f.domain),
            f.subject,
            clock_time(f.since)
        ),
    }
}

/// The domain as events and JSON name it.
fn domain_word(domain: Domain) -> &'static str {
    match domain {
        Domain::HostDown => "host_down",
        Domain::Communication => "communication",
        Domain::Dependency => "dependency",
        Domain::Internal => "internal",
    }
}

/// Unix seconds as an RFC 3339 UTC time to the second.
fn clock_time(unix_s: f64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(unix_s.max(0.0));
    humantime::format_rfc3339_seconds(time).to_string()
}

/// `resil report` output: findings grouped by domain, worst first.
pub fn report(report: &FindingsReport, format: Format, now_unix: f64) -> String {
    if format == Format::Json {
        return json(report);
    }
    if report.findings.is_empty() {
        return "No findings: every endpoint, local service and resolver seen lately is healthy."
            .to_string();
    }
    let mut out = String::new();
    let mut domain = None;
    for f in &report.findings {
        if domain != Some(f.domain) {
            domain = Some(f.domain);
            let count = report
                .findings
                .iter()
                .filter(|g| g.domain == f.domain)
                .count();
            if !out.is_empty() {
                out.push('\n');
            }
            out += &format!("{} ({count})\n", f.domain.title());
        }
        out += &finding_lines(f, now_unix);
    }
    out.trim_end().to_string()
}

fn finding_lines(f: &Finding, now_unix: f64) -> String {
    let ago = (now_unix - f.since).max(0.0);
    let ago = humantime::format_duration(std::time::Duration::from_secs(ago as u64));
    let mut lines = format!(
        "  • {}\n    since {} ({ago} ago)",
        f.summary,
        clock_time(f.since)
    );
    if let Some(breaker) = &f.evidence.breaker {
        lines += &format!("; breaker {breaker}");
    }
    lines.push('\n');
    lines
}

/// `resil trip|reset|disable` output.
pub fn manual(report: &ManualReport, format: Format) -> String {
    match format {
        Format::Json => json(report),
        Format::Table => report
            .endpoints
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    display_name(&e.endpoint, e.dependency.as_deref()),
                    e.state
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// `resil config explain` output: the policy of one endpoint and where it comes from.
pub fn explain(config: &Config, endpoint: SocketAddr, format: Format) -> String {
    let resolved = config.policies.resolve(endpoint);
    let view = PolicyView::from(resolved.policy);
    let source = match (resolved.dependency, resolved.pattern) {
        (Some(d), Some(p)) => format!("dependency {} (matched {p}) in {}", d.name, config.source),
        _ => format!("[defaults] of {}", config.source),
    };
    match format {
        Format::Json => json(&serde_json::json!({
            "endpoint": endpoint.to_string(),
            "dependency": resolved.dependency.map(|d| d.name.clone()),
            "matched": resolved.pattern.map(|p| p.to_string()),
            "source": config.source.to_string(),
            "policy": view,
        })),
        Format::Table => {
            let mut out = format!("{endpoint}: {source}\n");
            if let Ok(serde_json::Value::Object(keys)) = serde_json::to_value(&view) {
                for (key, value) in keys {
                    out += &format!("  {key} = {value}\n");
                }
            }
            out.trim_end().to_string()
        }
    }
}

/// `name (address:port)` for endpoints of a named dependency, else the address.
pub fn display_name(endpoint: &str, dependency: Option<&str>) -> String {
    match dependency {
        Some(name) => format!("{name} ({endpoint})"),
        None => endpoint.to_string(),
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Human-friendly duration from microseconds.
fn micros(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.1}ms", us / 1_000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Latency;

    fn endpoint() -> EndpointStatus {
        EndpointStatus {
            endpoint: "[fd00::2]:80".into(),
            direction: Side::Outbound,
            state: "closed".into(),
            attempts: 10,
            established: 9,
            refused: 1,
            timeouts: 0,
            unreachable: 0,
            resets_in: 2,
            resets_out: 3,
            syn_retransmits: 1,
            retransmits: 4,
            segments: 40,
            closed: 7,
            path_resets: 1,
            fast_failed: 0,
            would_fast_fail: 0,
            failure_rate: Some(0.1),
            connect_latency_us: Some(Latency {
                p50: 40.0,
                p99: 2500.0,
            }),
            reason: Some("5 consecutive failures".into()),
            dependency: Some("web".into()),
            name: Some("web".into()),
            shedding: false,
        }
    }

    #[test]
    fn json_has_exactly_the_documented_fields() {
        let text = status(
            &StatusReport {
                endpoints: vec![endpoint()],
                resolvers: vec![],
            },
            Format::Json,
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let obj = value["endpoints"][0].as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "attempts",
                "closed",
                "connect_latency_us",
                "dependency",
                "direction",
                "endpoint",
                "established",
                "failure_rate",
                "fast_failed",
                "name",
                "path_resets",
                "reason",
                "refused",
                "resets_in",
                "resets_out",
                "retransmits",
                "segments",
                "shedding",
                "state",
                "syn_retransmits",
                "timeouts",
                "unreachable",
                "would_fast_fail"
            ]
        );
        assert_eq!(value["endpoints"][0]["connect_latency_us"]["p99"], 2500.0);
    }

    #[test]
    fn table_shows_the_figures() {
        let text = status(
            &StatusReport {
                endpoints: vec![endpoint()],
                resolvers: vec![],
            },
            Format::Table,
        );
        for needle in [
            "web ([fd00::2]:80)",
            "closed",
            "90.0%",
            "40µs",
            "2.5ms",
            "2/3",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        let empty = status(
            &StatusReport {
                endpoints: vec![],
                resolvers: vec![],
            },
            Format::Table,
        );
        assert!(empty.contains("No TCP connections"));
    }

    fn finding(domain: Domain, subject: &str, severity: f64) -> Finding {
        Finding {
            domain,
            rule: "refusing".into(),
            subject: subject.into(),
            summary: format!("{subject} is unwell"),
            since: 1_000.0,
            severity,
            endpoints: vec![],
            evidence: crate::findings::Evidence::default(),
        }
    }

    #[test]
    fn reports_group_findings_by_domain() {
        let found = FindingsReport {
            findings: vec![
                finding(Domain::HostDown, "host 10.0.3.7", 1.0),
                finding(Domain::Dependency, "db (10.0.3.8:5432)", 1.0),
                finding(Domain::Dependency, "10.0.3.9:80", 0.5),
            ],
        };
        let text = report(&found, Format::Table, 1_090.0);
        assert!(
            text.starts_with("Host down (1)\n  • host 10.0.3.7 is unwell\n"),
            "{text}"
        );
        assert!(
            text.contains("\nDependency (2)\n  • db (10.0.3.8:5432) is unwell"),
            "{text}"
        );
        assert!(
            text.contains("since 1970-01-01T00:16:40Z (1m 30s ago)"),
            "{text}"
        );
        let empty = FindingsReport { findings: vec![] };
        assert!(report(&empty, Format::Table, 0.0).starts_with("No findings"));
        let json: serde_json::Value =
            serde_json::from_str(&report(&empty, Format::Json, 0.0)).unwrap();
        assert_eq!(json["findings"], serde_json::json!([]));
    }

    #[test]
    fn event_lines_stream_one_per_event() {
        let started = Sequenced {
            seq: 7,
            time: 1_000.0,
            event: Event::FindingStarted(finding(
                Domain::Internal,
                "local service 10.0.0.2:8080",
                1.0,
            )),
        };
        let line = event_line(&started, Format::Table);
        assert_eq!(
            line,
            "1970-01-01T00:16:40Z  finding   [internal] local service 10.0.0.2:8080 is unwell"
        );
        let json = event_line(&started, Format::Json);
        assert!(!json.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (value["seq"].as_u64(), value["kind"].as_str()),
            (Some(7), Some("finding_started"))
        );
        assert_eq!(value["domain"], "internal");
    }
}
