//! Prometheus exposition. On every scrape the agent takes a [`Snapshot`] of its figures;
//! [`render`] writes it as OpenMetrics text with prometheus-client; [`serve`] is the small
//! HTTP server for `/metrics`, `/healthz` (liveness) and `/readyz` (readiness).
//!
//! Names follow Prometheus conventions (`resil_` prefix, base units, `_total` counters).
//! Label cardinality is bounded: at most `max_endpoints` endpoints are exported one by one
//! (the busiest), the rest are summed into `endpoint="other"`.

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, service::service_fn, Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};
use resil_common::{histogram::Histogram, maps::EndpointStats};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::{findings::Domain, resolvers::DnsCounts};

/// The default `--metrics` address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";
/// How long a scrape waits for the agent loop.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Ends of the exported latency buckets, in microseconds: powers of four, where the daemon's
/// own buckets end, so the counts are exact (exported as `le` = the bound less 1 µs).
const BUCKET_BOUNDS_US: [f64; 11] = [
    4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
];
/// Breaker states exported for every circuit (one series each, 1 for the current one).
const STATES: [&str; 6] = [
    "closed",
    "open",
    "half_open",
    "forced_open",
    "disabled",
    "metrics_only",
];

/// The labels of one exported endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointLabels {
    /// `10.0.3.7:5432`, or `other` for the endpoints beyond the cap.
    pub endpoint: String,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The endpoint's name, or empty.
    pub name: String,
}

/// One endpoint's figures, cumulative.
#[derive(Debug, Clone)]
pub struct EndpointSample {
    pub labels: EndpointLabels,
    pub stats: EndpointStats,
    pub timeouts: u64,
    /// Handshake latency (outbound endpoints).
    pub latency: Histogram,
    /// The breaker's reported state, for endpoints with a circuit.
    pub state: Option<&'static str>,
    /// Failure rate over the breaker's window, when known.
    pub failure_rate: Option<f64>,
    /// A local service being shed.
    pub shedding: bool,
}

/// One resolver's figures.
#[derive(Debug, Clone)]
pub struct ResolverSample {
    pub resolver: String,
    pub counts: DnsCounts,
    pub latency: Histogram,
}

/// A BPF map's fill.
#[derive(Debug, Clone)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// The daemon's own health.
#[derive(Debug, Clone, Default)]
pub struct DaemonHealth {
    /// Duration of the agent's ticks.
    pub tick: Histogram,
    pub maps: Vec<MapFill>,
    /// Kernel events lost per ring buffer (`handshakes`, `dns`).
    pub events_lost: Vec<(&'static str, u64)>,
    /// Kernel map inserts that failed, per map.
    pub insert_failures: Vec<(&'static str, u64)>,
    pub malformed_packets: u64,
    /// Handshakes and DNS queries waiting for an answer.
    pub pending_handshakes: u64,
    pub pending_dns_queries: u64,
    /// Endpoints summed into `endpoint="other"`.
    pub endpoints_aggregated: u64,
}

/// Everything one scrape exports.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub endpoints: Vec<EndpointSample>,
    pub resolvers: Vec<ResolverSample>,
    pub findings: BTreeMap<Domain, usize>,
    pub health: DaemonHealth,
}

/// Keeps at most `max` endpoints one by one and sums the others per direction into
/// `endpoint="other"`. Kept first: endpoints whose circuit is not closed or that are being
/// shed (they matter most), then those exported last time (`exported`: a series that comes
/// and goes breaks its rates, and `other` would go down), then the busiest. Returns how many
/// were summed; `exported` becomes the endpoints kept.
pub fn cap_endpoints(
    endpoints: &mut Vec<EndpointSample>,
    max: usize,
    exported: &mut std::collections::HashSet<String>,
) -> u64 {
    if endpoints.len() <= max {
        *exported = endpoints
            .iter()
            .map(|e| e.labels.endpoint.clone())
            .collect();
        return 0;
    }
    let rank = |e: &EndpointSample| {
        let urgent = e.shedding || e.state.is_some_and(|s| s != "closed");
        let before = exported.contains(&e.labels.endpoint);
        (
            !urgent,
            !before,
            std::cmp::Reverse(e.stats.attempts),
            std::cmp::Reverse(e.stats.established),
        )
    };
    endpoints.sort_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| a.labels.endpoint.cmp(&b.labels.endpoint))
    });
    let rest = endpoints.split_off(max);
    *exported = endpoints
        .iter()
        .map(|e| e.labels.endpoint.clone())
        .collect();
    let aggregated = rest.len() as u64;
    let mut others: BTreeMap<&'static str, EndpointSample> = BTreeMap::new();
    for e in rest {
        let other = others
            .entry(e.labels.direction)
            .or_insert_with(|| EndpointSample {
                labels: EndpointLabels {
                    endpoint: "other".into(),
                    direction: e.labels.direction,
                    name: String::new(),
                },
                stats: EndpointStats::ZERO,
                timeouts: 0,
                latency: Histogram::default(),
                state: None,
                failure_rate: None,
                shedding: false,
            });
        other.stats.add(&e.stats);
        other.timeouts += e.timeouts;
        other.latency = sum_histograms(&other.latency, &e.latency);
    }
    endpoints.extend(others.into_values());
    aggregated
}

fn sum_histograms(a: &Histogram, b: &Histogram) -> Histogram {
    let mut sum = *a;
    sum.add(b);
    sum
}

/// Renders a snapshot as OpenMetrics text.
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("resil");
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// The labels every per-endpoint series carries; the name, which can change, is only on
/// `resil_endpoint_info` (join on it in queries), so series keep their identity.
fn endpoint_labels(l: &EndpointLabels) -> Labels<'_> {
    vec![
        ("endpoint", l.endpoint.as_str()),
        ("direction", l.direction),
    ]
}

/// One metric family with a series per item.
fn family<T>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    items: impl IntoIterator<Item = T>,
    mut series: impl FnMut(T, &mut prometheus_client::encoding::MetricEncoder) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for item in items {
        series(item, &mut metric)?;
    }
    Ok(())
}

fn counter(
    m: &mut prometheus_client::encoding::MetricEncoder,
    labels: &Labels,
    v: u64,
) -> std::fmt::Result {
    ConstCounter::new(v).encode(m.encode_family(labels)?)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    m: &mut prometheus_client::encoding::MetricEncoder,
    labels: &Labels,
    v: V,
) -> std::fmt::Result
where
    ConstGauge<V>: EncodeMetric,
{
    ConstGauge::new(v).encode(m.encode_family(labels)?)
}

fn histogram(
    m: &mut prometheus_client::encoding::MetricEncoder,
    labels: &Labels,
    h: &Histogram,
) -> std::fmt::Result {
    let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(BUCKET_BOUNDS_US.len() + 1);
    let mut below = 0;
    for bound in BUCKET_BOUNDS_US {
        let cumulative = h.count_below_us(bound);
        // Latencies are whole microseconds: below 4^k µs is at most 4^k - 1 µs, the bound
        // `le` (less or equal) means.
        buckets.push(((bound - 1.0) / 1e6, cumulative - below));
        below = cumulative;
    }
    buckets.push((f64::INFINITY, h.total() - below));
    let m = m.encode_family(labels)?;
    let mut m = m;
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        h.sum_us() as f64 / 1e6,
        h.total(),
        &buckets,
        None,
    )
}

/// A counter family read from a `T`: name, help, value.
type CounterOf<T> = (&'static str, &'static str, fn(&T) -> u64);

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let eps = &self.endpoints;
        let counters: [CounterOf<EndpointSample>; 14] = [
            (
                "connection_attempts",
                "TCP connection attempts (first SYN).",
                |s| s.stats.attempts,
            ),
            (
                "connections_established",
                "TCP handshakes completed.",
                |s| s.stats.established,
            ),
            (
                "connections_refused",
                "Handshakes answered with a RST.",
                |s| s.stats.refused,
            ),
            (
                "connection_timeouts",
                "Outbound handshakes without an answer within the connect timeout.",
                |s| s.timeouts,
            ),
            (
                "connections_unreachable",
                "ICMP destination unreachable for tracked connections.",
                |s| s.stats.unreachable,
            ),
            (
                "resets_received",
                "Resets received on established connections.",
                |s| s.stats.resets_in,
            ),
            (
                "path_resets",
                "Resets received that something on the path sent, not the peer (another TTL).",
                |s| s.stats.path_resets,
            ),
            (
                "resets_sent",
                "Resets sent on established connections.",
                |s| s.stats.resets_out,
            ),
            (
                "syn_retransmits",
                "Retransmitted SYNs (SYN-ACKs for inbound connections).",
                |s| s.stats.syn_retransmits,
            ),
            (
                "retransmits",
                "Retransmitted data segments, either direction.",
                |s| s.stats.retransmits,
            ),
            (
                "data_segments",
                "Data segments on established connections, either direction.",
                |s| s.stats.segments,
            ),
            (
                "connections_closed",
                "Established connections that ended.",
                |s| s.stats.closed,
            ),
            (
                "fast_failed",
                "Connections refused by resil (open circuit, or a shed local service).",
                |s| s.stats.fast_failed,
            ),
            (
                "would_fast_fail",
                "Connections a metrics-only policy would have refused.",
                |s| s.stats.would_fast_fail,
            ),
        ];
        for (name, help, value) in counters {
            family(
                &mut e,
                name,
                help,
                None,
                MetricType::Counter,
                eps,
                |s, m| counter(m, &endpoint_labels(&s.labels), value(s)),
            )?;
        }
        family(
            &mut e,
            "connect_duration",
            "Handshake latency, SYN to SYN-ACK (outbound).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            eps.iter().filter(|s| s.latency.total() > 0),
            |s, m| histogram(m, &endpoint_labels(&s.labels), &s.latency),
        )?;
        family(
            &mut e,
            "circuit_state",
            "Breaker state per endpoint: 1 for the current state.",
            None,
            MetricType::Gauge,
            eps.iter().filter_map(|s| s.state.map(|st| (s, st))),
            |(s, current), m| {
                for state in STATES {
                    let mut labels = endpoint_labels(&s.labels);
                    labels.push(("state", state));
                    gauge(m, &labels, i64::from(state == current))?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "endpoint_info",
            "The name of an endpoint (its dependency's, from DNS or /etc/hosts).",
            None,
            MetricType::Gauge,
            eps.iter().filter(|s| !s.labels.name.is_empty()),
            |s, m| {
                let mut labels = endpoint_labels(&s.labels);
                labels.push(("name", s.labels.name.as_str()));
                gauge(m, &labels, 1i64)
            },
        )?;
        family(
            &mut e,
            "circuit_failure_ratio",
            "Failure rate over the breaker's window (0..1), once it holds enough outcomes.",
            None,
            MetricType::Gauge,
            eps.iter().filter_map(|s| s.failure_rate.map(|r| (s, r))),
            |(s, rate), m| gauge(m, &endpoint_labels(&s.labels), rate),
        )?;
        family(
            &mut e,
            "service_shedding",
            "1 while resil sheds new connections to a local service.",
            None,
            MetricType::Gauge,
            eps.iter()
                .filter(|s| s.labels.direction == "inbound" && s.labels.endpoint != "other"),
            |s, m| gauge(m, &endpoint_labels(&s.labels), i64::from(s.shedding)),
        )?;
        family(
            &mut e,
            "findings",
            "Findings in force, by failure domain.",
            None,
            MetricType::Gauge,
            [
                Domain::HostDown,
                Domain::Communication,
                Domain::Dependency,
                Domain::Internal,
            ],
            |d, m| {
                let name = serde_json::to_value(d)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                gauge(
                    m,
                    &vec![("domain", name.as_str())],
                    *self.findings.get(&d).unwrap_or(&0) as i64,
                )
            },
        )?;
        let dns: [CounterOf<DnsCounts>; 6] = [
            ("dns_queries", "DNS queries sent over UDP.", |c| c.queries),
            ("dns_answers", "DNS answers matched to a query.", |c| {
                c.answers
            }),
            (
                "dns_timeouts",
                "DNS queries without an answer within the DNS timeout.",
                |c| c.timeouts,
            ),
            ("dns_servfail", "DNS answers with rcode SERVFAIL.", |c| {
                c.servfail
            }),
            ("dns_nxdomain", "DNS answers with rcode NXDOMAIN.", |c| {
                c.nxdomain
            }),
            (
                "dns_other_errors",
                "DNS answers with another error rcode.",
                |c| c.other_errors,
            ),
        ];
        for (name, help, value) in dns {
            family(
                &mut e,
                name,
                help,
                None,
                MetricType::Counter,
                &self.resolvers,
                |r, m| {
                    counter(
                        m,
                        &vec![("resolver", r.resolver.as_str())],
                        value(&r.counts),
                    )
                },
            )?;
        }
        family(
            &mut e,
            "dns_response_duration",
            "DNS answer latency per resolver.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            self.resolvers.iter().filter(|r| r.latency.total() > 0),
            |r, m| histogram(m, &vec![("resolver", r.resolver.as_str())], &r.latency),
        )?;
        let h = &self.health;
        family(
            &mut e,
            "tick_duration",
            "Duration of the daemon's ticks (read the kernel, time out, decide, enforce).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            [&h.tick],
            |t, m| histogram(m, &vec![], t),
        )?;
        family(
            &mut e,
            "map_entries",
            "Entries in a BPF map.",
            None,
            MetricType::Gauge,
            &h.maps,
            |f, m| gauge(m, &vec![("map", f.map)], f.entries as i64),
        )?;
        family(
            &mut e,
            "map_capacity",
            "Capacity of a BPF map.",
            None,
            MetricType::Gauge,
            &h.maps,
            |f, m| gauge(m, &vec![("map", f.map)], f.capacity as i64),
        )?;
        family(
            &mut e,
            "events_lost",
            "Kernel events lost because a ring buffer was full.",
            None,
            MetricType::Counter,
            &h.events_lost,
            |(ring, n), m| counter(m, &vec![("ring", ring)], *n),
        )?;
        family(
            &mut e,
            "map_insert_failures",
            "Kernel map inserts that failed (map full).",
            None,
            MetricType::Counter,
            &h.insert_failures,
            |(map, n), m| counter(m, &vec![("map", map)], *n),
        )?;
        family(
            &mut e,
            "malformed_packets",
            "Packets whose headers were truncated or inconsistent.",
            None,
            MetricType::Counter,
            [h.malformed_packets],
            |n, m| counter(m, &vec![], n),
        )?;
        family(
            &mut e,
            "pending_handshakes",
            "Outbound handshakes waiting for an answer.",
            None,
            MetricType::Gauge,
            [h.pending_handshakes],
            |n, m| gauge(m, &vec![], n as i64),
        )?;
        family(
            &mut e,
            "pending_dns_queries",
            "DNS queries waiting for an answer.",
            None,
            MetricType::Gauge,
            [h.pending_dns_queries],
            |n, m| gauge(m, &vec![], n as i64),
        )?;
        family(
            &mut e,
            "endpoints_aggregated",
            "Endpoints beyond [metrics] max_endpoints, exported summed as endpoint=\"other\".",
            None,
            MetricType::Gauge,
            [h.endpoints_aggregated],
            |n, m| gauge(m, &vec![], n as i64),
        )?;
        family(
            &mut e,
            "build_info",
            "The running resil version.",
            None,
            MetricType::Gauge,
            [env!("CARGO_PKG_VERSION")],
            |v, m| gauge(m, &vec![("version", v)], 1i64),
        )?;
        Ok(())
    }
}

/// The same exposition in the classic Prometheus text format (0.0.4), for clients that do not
/// ask for OpenMetrics (curl, promtool, older scrapers): counters are named with their
/// `_total` suffix in HELP and TYPE, and the UNIT and EOF lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(previous) = help.replace(line) {
                out.push_str(previous);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut fields = rest.splitn(2, ' ');
            let (name, kind) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
            let renamed = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h
                    .strip_prefix("# HELP ")
                    .and_then(|r| r.strip_prefix(name))
                    .unwrap_or("");
                out.push_str(&format!("# HELP {renamed}{text}\n"));
            }
            out.push_str(&format!("# TYPE {renamed} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// What the HTTP side asks of the agent loop.
#[derive(Debug)]
pub enum Scrape {
    /// Render the metrics.
    Metrics(oneshot::Sender<String>),
    /// Answer, to show the loop is alive (always `true`).
    Alive(oneshot::Sender<bool>),
    /// Whether the daemon is ready: programs attached, first tick done.
    Ready(oneshot::Sender<bool>),
}

/// Binds the metrics address (before anything else is attached, so a taken port fails early).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot serve metrics on {addr} (choose another address with --metrics, or --metrics off)")
    })
}

/// Connections served at once, at most; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(listener: TcpListener, agent: mpsc::Sender<Scrape>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = std::sync::Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::task::spawn_local(async move {
            let service = service_fn(move |request| answer(request, agent.clone()));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

type HttpResponse = hyper::Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> HttpResponse {
    let mut response = hyper::Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

async fn answer(
    request: hyper::Request<Incoming>,
    agent: mpsc::Sender<Scrape>,
) -> Result<HttpResponse, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n"));
    }
    // Prometheus asks for OpenMetrics; everyone else gets the classic text format.
    let openmetrics = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let response = match request.uri().path() {
        "/metrics" => {
            let (tx, rx) = oneshot::channel();
            let sent = agent.send(Scrape::Metrics(tx)).await.is_ok();
            match tokio::time::timeout(SCRAPE_TIMEOUT, rx).await {
                Ok(Ok(text)) if sent && openmetrics => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Ok(Ok(text)) if sent => reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    to_prometheus_text(&text),
                ),
                _ => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "the agent loop did not answer\n",
                ),
            }
        }
        "/healthz" => probe(&agent, Scrape::Alive).await,
        "/readyz" => probe(&agent, Scrape::Ready).await,
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "resil serves /metrics, /healthz and /readyz\n",
        ),
    };
    Ok(response)
}

/// Asks the agent loop a yes-or-no question: 200 for yes, 503 for no or no answer.
async fn probe(
    agent: &mpsc::Sender<Scrape>,
    question: fn(oneshot::Sender<bool>) -> Scrape,
) -> HttpResponse {
    const TEXT: &str = "text/plain; charset=utf-8";
    let (tx, rx) = oneshot::channel();
    let sent = agent.send(question(tx)).await.is_ok();
    match tokio::time::timeout(SCRAPE_TIMEOUT, rx).await {
        Ok(Ok(true)) if sent => reply(StatusCode::OK, TEXT, "ok\n"),
        Ok(Ok(false)) if sent => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n"),
        _ => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "the agent loop did not answer\n",
        ),
    }
}

#[cfg(test)]
mod tests;
