//! Rendering for people (tables) and machines (JSON).

use clap::ValueEnum;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Cell, CellAlignment, Table};

use crate::api::{EndpointStatus, Side, StatusReport};

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
        Format::Json => serde_json::to_string_pretty(report)
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
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
        "ENDPOINT", "DIR", "STATE", "ATTEMPTS", "SUCCESS", "P50", "P99", "REFUSED", "TIMEOUTS",
        "RESETS", "RETRANS",
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
        ];
        let mut row = vec![Cell::new(&e.endpoint), Cell::new(dir), Cell::new(&e.state)];
        row.extend(
            numbers
                .into_iter()
                .map(|n| Cell::new(n).set_alignment(CellAlignment::Right)),
        );
        table.add_row(row);
    }
    table.to_string()
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
            failure_rate: Some(0.1),
            connect_latency_us: Some(Latency {
                p50: 40.0,
                p99: 2500.0,
            }),
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
                "direction",
                "endpoint",
                "established",
                "failure_rate",
                "fast_failed",
                "refused",
                "resets_in",
                "resets_out",
                "retransmits",
                "state",
                "syn_retransmits",
                "timeouts",
                "unreachable"
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
        for needle in ["[fd00::2]:80", "closed", "90.0%", "40µs", "2.5ms", "2/3"] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        let empty = status(&StatusReport { endpoints: vec![] }, Format::Table);
        assert!(empty.contains("No TCP connections"));
    }
}
