//! Rendering for people (tables) and machines (JSON).

use clap::ValueEnum;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Cell, CellAlignment, Table};

use std::net::SocketAddr;

use crate::{
    api::{EndpointStatus, EventsReport, ManualReport, Side, StatusReport},
    config::Config,
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
        Format::Table => status_table(&report.endpoints),
    }
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
        let name = display_name(&e.endpoint, e.dependency.as_deref());
        let mut row = vec![Cell::new(name), Cell::new(dir), Cell::new(&e.state)];
        row.extend(
            numbers
                .into_iter()
                .map(|n| Cell::new(n).set_alignment(CellAlignment::Right)),
        );
        table.add_row(row);
    }
    table.to_string()
}

/// `resil events` output.
pub fn events(report: &EventsReport, format: Format) -> String {
    match format {
        Format::Json => json(report),
        Format::Table if report.events.is_empty() => "No breaker transitions yet.".to_string(),
        Format::Table => {
            let mut table = Table::new();
            table.load_preset(UTF8_BORDERS_ONLY);
            table.set_header(["TIME", "ENDPOINT", "FROM", "TO", "REASON"]);
            for e in &report.events {
                let name = display_name(&e.endpoint, e.dependency.as_deref());
                let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(e.time);
                let time = humantime::format_rfc3339_seconds(time).to_string();
                table.add_row([time, name, e.from.clone(), e.to.clone(), e.reason.clone()]);
            }
            table.to_string()
        }
    }
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
            fast_failed: 0,
            would_fast_fail: 0,
            failure_rate: Some(0.1),
            connect_latency_us: Some(Latency {
                p50: 40.0,
                p99: 2500.0,
            }),
            reason: Some("5 consecutive failures".into()),
            dependency: Some("web".into()),
        }
    }

    #[test]
    fn json_has_exactly_the_documented_fields() {
        let text = status(
            &StatusReport {
                endpoints: vec![endpoint()],
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
                "connect_latency_us",
                "dependency",
                "direction",
                "endpoint",
                "established",
                "failure_rate",
                "fast_failed",
                "reason",
                "refused",
                "resets_in",
                "resets_out",
                "retransmits",
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
        let empty = status(&StatusReport { endpoints: vec![] }, Format::Table);
        assert!(empty.contains("No TCP connections"));
    }
}
