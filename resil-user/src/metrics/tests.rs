use super::*;

fn sample(endpoint: &str, attempts: u64) -> EndpointSample {
    let mut latency = Histogram::default();
    for us in [10, 100, 100, 3_000] {
        latency.record_us(us);
    }
    EndpointSample {
        labels: EndpointLabels {
            endpoint: endpoint.into(),
            direction: "outbound",
            name: String::new(),
        },
        stats: EndpointStats {
            attempts,
            established: attempts,
            ..EndpointStats::ZERO
        },
        timeouts: 1,
        latency,
        state: Some("open"),
        failure_rate: Some(0.25),
        shedding: false,
    }
}

fn lines(text: &str, prefix: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn endpoints_export_counters_states_and_latency_in_seconds() {
    let mut db = sample("10.0.3.7:5432", 5);
    db.labels.name = "postgres".into();
    let text = render(Snapshot {
        endpoints: vec![db],
        ..Snapshot::default()
    });
    assert!(
        text.contains(
            "resil_connection_attempts_total{endpoint=\"10.0.3.7:5432\",direction=\"outbound\"} 5"
        ),
        "{text}"
    );
    assert!(text.contains(
        "resil_endpoint_info{endpoint=\"10.0.3.7:5432\",direction=\"outbound\",name=\"postgres\"} 1"
    ), "{text}");
    assert!(
        text.contains("# TYPE resil_connect_duration_seconds histogram"),
        "{text}"
    );
    let buckets = lines(&text, "resil_connect_duration_seconds_bucket");
    assert_eq!(buckets.len(), BUCKET_BOUNDS_US.len() + 1);
    assert!(
        buckets[1].contains("le=\"0.000015\"") && buckets[1].ends_with(" 1"),
        "{buckets:?}"
    );
    assert!(
        buckets[3].contains("le=\"0.000255\"") && buckets[3].ends_with(" 3"),
        "{buckets:?}"
    );
    assert!(buckets.last().unwrap().contains("+Inf") && buckets.last().unwrap().ends_with(" 4"));
    assert!(text.contains("resil_connect_duration_seconds_sum{endpoint=\"10.0.3.7:5432\",direction=\"outbound\"} 0.00321"), "{text}");
    let states = lines(&text, "resil_circuit_state{");
    assert_eq!(states.len(), STATES.len());
    assert!(states
        .iter()
        .any(|l| l.contains("state=\"open\"") && l.ends_with(" 1")));
    assert_eq!(states.iter().filter(|l| l.ends_with(" 1")).count(), 1);
    assert!(text.contains("resil_circuit_failure_ratio{"), "{text}");
    assert!(
        text.contains("resil_findings{domain=\"host_down\"} 0"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"));
}

#[test]
fn endpoints_beyond_the_cap_are_summed_as_other() {
    let all = || -> Vec<EndpointSample> {
        (0..5)
            .map(|i| {
                let mut s = sample(&format!("10.0.0.{i}:80"), i);
                s.state = Some("closed");
                s
            })
            .collect()
    };
    let mut exported = std::collections::HashSet::new();
    let mut endpoints = all();
    let aggregated = cap_endpoints(&mut endpoints, 2, &mut exported);
    assert_eq!(aggregated, 3);
    let names: Vec<&str> = endpoints
        .iter()
        .map(|e| e.labels.endpoint.as_str())
        .collect();
    assert_eq!(names, ["10.0.0.4:80", "10.0.0.3:80", "other"]);
    let other = &endpoints[2];
    assert_eq!(
        (other.stats.attempts, other.timeouts, other.latency.total()),
        (3, 3, 12)
    );
    assert_eq!(other.state, None, "no breaker state for a sum");
    // Busier now, 10.0.0.0 still waits its turn: exported series stay; an open circuit
    // goes first.
    let mut endpoints = all();
    endpoints[0].stats.attempts = 1000;
    endpoints[1].state = Some("open");
    cap_endpoints(&mut endpoints, 2, &mut exported);
    let names: Vec<&str> = endpoints
        .iter()
        .map(|e| e.labels.endpoint.as_str())
        .collect();
    assert_eq!(names, ["10.0.0.1:80", "10.0.0.4:80", "other"]);
    let mut few = vec![sample("10.0.0.1:80", 1)];
    assert_eq!(cap_endpoints(&mut few, 0, &mut exported), 1);
    assert_eq!(few[0].labels.endpoint, "other");
}

#[test]
fn resolvers_and_daemon_health() {
    let text = render(Snapshot {
        resolvers: vec![ResolverSample {
            resolver: "10.0.0.53:53".into(),
            counts: DnsCounts {
                queries: 9,
                servfail: 2,
                ..DnsCounts::default()
            },
            latency: Histogram::default(),
        }],
        health: DaemonHealth {
            maps: vec![MapFill {
                map: "connections",
                entries: 12,
                capacity: 65536,
            }],
            events_lost: vec![("handshakes", 0), ("dns", 3)],
            ..DaemonHealth::default()
        },
        ..Snapshot::default()
    });
    assert!(
        text.contains("resil_dns_queries_total{resolver=\"10.0.0.53:53\"} 9"),
        "{text}"
    );
    assert!(text.contains("resil_dns_servfail_total{resolver=\"10.0.0.53:53\"} 2"));
    assert!(text.contains("resil_map_entries{map=\"connections\"} 12"));
    assert!(text.contains("resil_events_lost_total{ring=\"dns\"} 3"));
    assert!(text.contains("resil_build_info{version=\""));
    assert!(text.contains("# TYPE resil_tick_duration_seconds histogram"));
}

#[test]
fn the_classic_text_format_names_counters_with_their_suffix() {
    let om = "# HELP resil_x Things.\n# TYPE resil_x counter\nresil_x_total{a=\"1\"} 5\n\
              # HELP resil_d_seconds Latency.\n# TYPE resil_d_seconds histogram\n# UNIT resil_d_seconds seconds\n\
              resil_d_seconds_sum 1.5\n# HELP resil_g A gauge.\n# TYPE resil_g gauge\nresil_g 2\n# EOF\n";
    assert_eq!(
        to_prometheus_text(om),
        "# HELP resil_x_total Things.\n# TYPE resil_x_total counter\nresil_x_total{a=\"1\"} 5\n\
         # HELP resil_d_seconds Latency.\n# TYPE resil_d_seconds histogram\nresil_d_seconds_sum 1.5\n\
         # HELP resil_g A gauge.\n# TYPE resil_g gauge\nresil_g 2\n"
    );
}
