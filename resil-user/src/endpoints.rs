//! Per-endpoint figures, cumulative since the daemon first saw each endpoint.
//!
//! The kernel's endpoint map is an LRU: an idle endpoint can be evicted and come back with its
//! counters at zero. The kernel stamps each entry with its creation time, so the table knows a
//! reading comes from a new entry and adds it whole: nothing already seen is lost.
//!
//! Handshake latency percentiles come from the handshake events (which carry the exact
//! latency), kept here in a log-scale histogram. The table itself is bounded: past its capacity the
//! endpoints idle the longest are forgotten.
//!
//! Each endpoint also keeps snapshots of its figures ([`Recent`]), so findings can be judged
//! on what happened lately rather than since the start.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use resil_common::{
    histogram::Histogram,
    maps::{Direction, EndpointKey, EndpointStats, FAMILY_IPV4},
};

use crate::{
    api::{EndpointStatus, Latency, Side},
    breaker::FailureKind,
    findings::LatencyShift,
    recent::Recent,
};

/// An endpoint's cumulative figures at one moment.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    stats: EndpointStats,
    timeouts: u64,
    /// `None` while no handshake completed (most inbound services never have one here).
    latency: Option<Box<Histogram>>,
}

/// What an endpoint did lately, for the findings.
#[derive(Debug, Clone)]
pub struct Lately {
    pub key: EndpointKey,
    /// Counters gained over the window.
    pub recent: EndpointStats,
    /// Handshakes timed out over the window.
    pub timeouts: u64,
    /// Seconds the window covers.
    pub window_s: f64,
    /// Handshake latency over the window against before it.
    pub latency: Option<LatencyShift>,
    /// The kind of the last failure seen, ever.
    pub last_failure: Option<FailureKind>,
    /// Whether any connection to it ever completed.
    pub ever_established: bool,
    /// Whether the latest news from it was an answer (a handshake, a refusal, a reset) rather
    /// than silence (a timeout, an ICMP unreachable): a port that worked and then went quiet
    /// is quiet now, whatever the earlier part of the window says.
    pub answered_last: bool,
    /// Handshakes unanswered (timeouts, ICMP unreachable) since its last answer.
    pub unanswered_run: u64,
}

/// Figures of one endpoint.
#[derive(Debug, Clone)]
struct Endpoint {
    /// Sum of everything the kernel counted, across evictions.
    total: EndpointStats,
    /// The kernel's last reading, to compute what is new.
    last: EndpointStats,
    /// Handshakes that got no answer within the connect timeout.
    timeouts: u64,
    /// Handshake latency (outbound).
    latency: Histogram,
    /// The table's tick when anything about this endpoint last changed.
    last_change: u64,
    /// Snapshots for "lately".
    recent: Recent<Snapshot>,
    /// The kind of the last failure seen.
    last_failure: Option<FailureKind>,
    /// The table's tick of the latest answer, and of the latest silence.
    last_answer: u64,
    last_silence: u64,
    /// Handshakes unanswered since the latest answer.
    unanswered_run: u64,
    /// Connections counted open (established − closed) that the kernel's connection table
    /// no longer holds, as of the last census: they ended unseen or were evicted.
    open_drift: u64,
}

impl Endpoint {
    fn new(now_ns: u64) -> Self {
        Endpoint {
            total: EndpointStats::ZERO,
            last: EndpointStats::ZERO,
            timeouts: 0,
            latency: Histogram::default(),
            last_change: 0,
            recent: Recent::new(Snapshot::default(), now_ns),
            last_failure: None,
            last_answer: 0,
            last_silence: 0,
            unanswered_run: 0,
            open_drift: 0,
        }
    }

    fn open(&self) -> u64 {
        self.total
            .established
            .saturating_sub(self.total.closed)
            .saturating_sub(self.open_drift)
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            stats: self.total,
            timeouts: self.timeouts,
            latency: (self.latency.total() > 0).then(|| Box::new(self.latency)),
        }
    }
}

/// Endpoints the daemon keeps figures for, at most, by default.
pub const DEFAULT_CAPACITY: usize = 65_536;

/// All endpoints the daemon has seen (up to its capacity).
#[derive(Debug)]
pub struct EndpointTable {
    endpoints: HashMap<EndpointKey, Endpoint>,
    capacity: usize,
    tick: u64,
    /// CLOCK_MONOTONIC of the last [`EndpointTable::roll`]: when new endpoints start.
    clock_ns: u64,
}

impl Default for EndpointTable {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl EndpointTable {
    /// A table that keeps at most `capacity` endpoints.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            endpoints: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
            clock_ns: 0,
        }
    }

    fn entry(&mut self, key: EndpointKey) -> &mut Endpoint {
        let now = self.clock_ns;
        self.endpoints
            .entry(key)
            .or_insert_with(|| Endpoint::new(now))
    }

    /// Takes new snapshots where the last is at least `span_ns` old.
    pub fn roll(&mut self, now_ns: u64, span_ns: u64) {
        self.clock_ns = now_ns;
        for e in self.endpoints.values_mut() {
            if e.recent.due(now_ns, span_ns) {
                let snapshot = e.snapshot();
                e.recent.roll(&snapshot, now_ns, span_ns);
            }
        }
    }

    /// Starts an endpoint's "lately" afresh from now: what came before no longer counts (a
    /// service seen to recover).
    pub fn forget_lately(&mut self, key: &EndpointKey, now_ns: u64) {
        if let Some(e) = self.endpoints.get_mut(key) {
            e.recent = Recent::new(e.snapshot(), now_ns);
        }
    }

    /// Takes in the kernel's count of open inbound connections per local service (from its
    /// connection table); services absent from it have none.
    pub fn census(&mut self, open: &std::collections::HashMap<EndpointKey, u64>) {
        for (key, e) in &mut self.endpoints {
            if key.direction != Direction::Inbound as u8 {
                continue;
            }
            let counted = e.total.established.saturating_sub(e.total.closed);
            e.open_drift = counted.saturating_sub(open.get(key).copied().unwrap_or(0));
        }
    }

    /// What every endpoint with any activity lately did.
    pub fn lately(&self, now_ns: u64) -> Vec<Lately> {
        let mut out = Vec::new();
        for (key, e) in &self.endpoints {
            let base = e.recent.base();
            let recent = e.total.since(&base.stats);
            let timeouts = e.timeouts.saturating_sub(base.timeouts);
            if recent == EndpointStats::ZERO && timeouts == 0 {
                continue;
            }
            let latency = (e.latency.total() > 0).then(|| {
                let before = base.latency.as_deref().copied().unwrap_or_default();
                let lately = e.latency.since(&before);
                LatencyShift {
                    recent_p99_us: lately.quantile_us(0.99).unwrap_or(0.0),
                    recent_samples: lately.total(),
                    baseline_p50_us: before.quantile_us(0.5).unwrap_or(0.0),
                    baseline_samples: before.total(),
                }
            });
            out.push(Lately {
                key: *key,
                recent: EndpointStats {
                    created_ns: 0,
                    ..recent
                },
                timeouts,
                window_s: e.recent.covers_s(now_ns),
                latency,
                last_failure: e.last_failure,
                ever_established: e.total.established > 0,
                answered_last: e.last_answer >= e.last_silence,
                unanswered_run: e.unanswered_run,
            });
        }
        out
    }

    /// Every endpoint's cumulative figures: counters, timeouts, handshake latency.
    pub fn samples(&self) -> impl Iterator<Item = (&EndpointKey, &EndpointStats, u64, &Histogram)> {
        self.endpoints
            .iter()
            .map(|(k, e)| (k, &e.total, e.timeouts, &e.latency))
    }

    /// Local services (inbound endpoints) known.
    pub fn services(&self) -> impl Iterator<Item = &EndpointKey> {
        self.endpoints
            .keys()
            .filter(|k| k.direction == Direction::Inbound as u8)
    }

    /// Connections to a local service open now, as far as the kernel saw them complete and
    /// end (one evicted from its connection table before it ended stays counted).
    pub fn open_connections(&self, key: &EndpointKey) -> u64 {
        self.endpoints.get(key).map_or(0, Endpoint::open)
    }

    /// A local service's connections accepted, and refused by it, in all.
    pub fn service_counters(&self, key: &EndpointKey) -> crate::services::ServiceCounters {
        self.endpoints.get(key).map_or_else(Default::default, |e| {
            crate::services::ServiceCounters {
                established: e.total.established,
                failed: e.total.refused,
            }
        })
    }

    /// Ends a tick: past capacity, forgets the endpoints idle the longest (a tenth of the
    /// capacity at once, so this runs rarely).
    pub fn end_tick(&mut self) {
        self.tick += 1;
        if self.endpoints.len() <= self.capacity {
            return;
        }
        let keep = self.capacity - self.capacity / 10;
        let mut ages: Vec<(u64, EndpointKey)> = self
            .endpoints
            .iter()
            .map(|(k, e)| (e.last_change, *k))
            .collect();
        let drop = ages.len() - keep;
        ages.select_nth_unstable(drop - 1);
        for (_, key) in &ages[..drop] {
            self.endpoints.remove(key);
        }
    }

    /// Number of endpoints known.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether no endpoint is known.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Takes in the kernel's current (per-CPU summed) counters for one endpoint.
    pub fn absorb(&mut self, key: EndpointKey, now: &EndpointStats) {
        let tick = self.tick;
        let e = self.entry(key);
        if e.last != *now {
            e.last_change = tick;
        }
        // A new kernel entry: everything in it is new to us.
        let fresh = EndpointStats {
            created_ns: now.created_ns,
            ..EndpointStats::ZERO
        };
        let l = if now.created_ns != e.last.created_ns {
            &fresh
        } else {
            &e.last
        };
        let delta = now.since(l);
        if delta.established > 0 || delta.refused > 0 || delta.resets_in > 0 {
            e.last_answer = tick + 1;
            e.unanswered_run = 0;
        }
        if delta.unreachable > 0 {
            e.last_silence = tick + 1;
            e.unanswered_run += delta.unreachable;
        }
        if delta.refused > 0 {
            e.last_failure = Some(FailureKind::Refused);
        } else if delta.unreachable > 0 {
            e.last_failure = Some(FailureKind::Unreachable);
        } else if delta.resets_in > 0 {
            e.last_failure = Some(FailureKind::Reset);
        }
        e.total.add(&delta);
        e.last = *now;
    }

    /// A handshake to the endpoint got no answer within its connect timeout (the kernel
    /// cannot see that).
    pub fn record_timeout(&mut self, key: EndpointKey) {
        let tick = self.tick;
        let e = self.entry(key);
        e.timeouts += 1;
        e.last_failure = Some(FailureKind::Timeout);
        e.last_silence = tick + 1;
        e.unanswered_run += 1;
        e.last_change = tick;
    }

    /// A handshake to the endpoint completed in `latency_ns`.
    pub fn record_latency(&mut self, key: EndpointKey, latency_ns: u64) {
        let tick = self.tick;
        let e = self.entry(key);
        e.latency.record_us(latency_ns / 1_000);
        e.last_change = tick;
    }

    /// Status of every endpoint, sorted by direction then address, with its key. The breaker
    /// fields are those of an endpoint without a circuit; the caller fills them in.
    /// `also` adds endpoints known otherwise (a circuit set by hand before any traffic),
    /// with zero figures.
    pub fn status(
        &self,
        also: impl Iterator<Item = EndpointKey>,
    ) -> Vec<(EndpointKey, EndpointStatus)> {
        let mut keys: Vec<EndpointKey> = self.endpoints.keys().copied().collect();
        keys.extend(also.filter(|k| !self.endpoints.contains_key(k)));
        keys.sort_by_key(|k| (k.direction, socket_addr(k)));
        let unseen = Endpoint::new(0);
        keys.into_iter()
            .map(|key| {
                (
                    key,
                    status_of(&key, self.endpoints.get(&key).unwrap_or(&unseen)),
                )
            })
            .collect()
    }
}

/// The endpoint as a socket address.
pub fn socket_addr(key: &EndpointKey) -> SocketAddr {
    let ip = if key.family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(key.addr))
    };
    SocketAddr::new(ip, key.port)
}

/// Whose endpoint it is.
pub fn side_of(key: &EndpointKey) -> Side {
    match Direction::from_u8(key.direction) {
        Direction::Outbound => Side::Outbound,
        Direction::Inbound => Side::Inbound,
    }
}

/// The median and 99th percentile of a latency histogram, `None` while it is empty.
pub fn latency_of(histogram: &Histogram) -> Option<Latency> {
    histogram
        .quantile_us(0.5)
        .zip(histogram.quantile_us(0.99))
        .map(|(p50, p99)| Latency {
            p50: round1(p50),
            p99: round1(p99),
        })
}

fn status_of(key: &EndpointKey, e: &Endpoint) -> EndpointStatus {
    let t = &e.total;
    EndpointStatus {
        endpoint: socket_addr(key).to_string(),
        direction: side_of(key),
        state: "closed".to_string(),
        attempts: t.attempts,
        established: t.established,
        refused: t.refused,
        timeouts: e.timeouts,
        unreachable: t.unreachable,
        resets_in: t.resets_in,
        resets_out: t.resets_out,
        syn_retransmits: t.syn_retransmits,
        retransmits: t.retransmits,
        segments: t.segments,
        closed: t.closed,
        path_resets: t.path_resets,
        fast_failed: t.fast_failed,
        would_fast_fail: t.would_fast_fail,
        failure_rate: None,
        connect_latency_us: latency_of(&e.latency),
        reason: None,
        dependency: None,
        name: None,
        shedding: false,
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use resil_common::maps::FAMILY_IPV6;

    fn key(family: u8) -> EndpointKey {
        let mut addr = [0u8; 16];
        if family == FAMILY_IPV6 {
            addr[0] = 0xfd;
            addr[15] = 2;
        } else {
            addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        }
        EndpointKey {
            addr,
            port: 80,
            family,
            direction: 0,
        }
    }

    #[test]
    fn formats_endpoints_of_both_families() {
        assert_eq!(socket_addr(&key(FAMILY_IPV4)).to_string(), "10.0.0.2:80");
        assert_eq!(socket_addr(&key(FAMILY_IPV6)).to_string(), "[fd00::2]:80");
    }

    #[test]
    fn counters_survive_kernel_eviction() {
        let mut table = EndpointTable::default();
        let k = key(FAMILY_IPV4);
        let mut raw = EndpointStats {
            attempts: 5,
            created_ns: 1,
            ..EndpointStats::ZERO
        };
        table.absorb(k, &raw);
        raw.attempts = 7;
        table.absorb(k, &raw);
        // Evicted, recreated, and grown past the last reading within one tick.
        raw = EndpointStats {
            attempts: 9,
            created_ns: 2,
            ..EndpointStats::ZERO
        };
        table.absorb(k, &raw);
        assert_eq!(table.status(std::iter::empty())[0].1.attempts, 16);
    }

    #[test]
    fn capacity_forgets_the_longest_idle() {
        let mut table = EndpointTable::with_capacity(10);
        let key = |port: u16| EndpointKey {
            port,
            ..EndpointKey::default()
        };
        let busy = EndpointStats {
            attempts: 1,
            ..EndpointStats::ZERO
        };
        for port in 0..10 {
            table.absorb(key(port), &busy);
            table.end_tick();
        }
        assert_eq!(table.len(), 10);
        // Endpoint 0 stays busy; 11 arrives and pushes the table over.
        table.absorb(
            key(0),
            &EndpointStats {
                attempts: 2,
                ..busy
            },
        );
        table.absorb(key(11), &busy);
        table.end_tick();
        assert_eq!(table.len(), 9);
        let ports: Vec<u16> = table.endpoints.keys().map(|k| k.port).collect();
        assert!(ports.contains(&0) && ports.contains(&11), "{ports:?}");
        assert!(!ports.contains(&1) && !ports.contains(&2), "{ports:?}");
    }

    #[test]
    fn lately_covers_one_to_two_spans() {
        const S: u64 = 1_000_000_000;
        let mut table = EndpointTable::default();
        let k = key(FAMILY_IPV4);
        let mut raw = EndpointStats {
            attempts: 100,
            established: 100,
            created_ns: 1,
            ..EndpointStats::ZERO
        };
        table.roll(0, 10 * S);
        table.absorb(k, &raw);
        for _ in 0..100 {
            table.record_latency(k, 400_000);
        }
        table.roll(10 * S, 10 * S);
        table.roll(20 * S, 10 * S);
        assert!(table.lately(20 * S).is_empty(), "nothing happened lately");
        raw.attempts += 10;
        raw.refused = 10;
        table.absorb(k, &raw);
        table.record_timeout(k);
        for _ in 0..10 {
            table.record_latency(k, 300_000_000);
        }
        let lately = table.lately(25 * S);
        assert_eq!(lately.len(), 1);
        let l = &lately[0];
        assert_eq!(
            (l.recent.attempts, l.recent.refused, l.timeouts),
            (10, 10, 1)
        );
        assert!((l.window_s - 15.0).abs() < 1e-9);
        let shift = l.latency.unwrap();
        assert_eq!((shift.recent_samples, shift.baseline_samples), (10, 100));
        assert!(
            shift.recent_p99_us > 100_000.0 && shift.baseline_p50_us < 1_000.0,
            "{shift:?}"
        );
        assert_eq!(l.last_failure, Some(FailureKind::Timeout));
        assert!(l.ever_established);
        assert_eq!(table.open_connections(&k), 100);
        // The kernel's table holds 40 of them: the other 60 ended unseen.
        let open = std::collections::HashMap::from([(k, 40)]);
        let inbound = EndpointKey {
            direction: Direction::Inbound as u8,
            ..k
        };
        table.absorb(inbound, &raw);
        table.census(&open);
        assert_eq!(
            table.open_connections(&inbound),
            0,
            "absent from the census: none open"
        );
        assert_eq!(
            table.open_connections(&k),
            100,
            "outbound endpoints are not censused"
        );
    }

    #[test]
    fn the_newest_news_and_the_silence_since_the_last_answer() {
        let mut table = EndpointTable::default();
        let k = key(FAMILY_IPV4);
        let mut raw = EndpointStats {
            attempts: 3,
            established: 3,
            created_ns: 1,
            ..EndpointStats::ZERO
        };
        table.absorb(k, &raw);
        table.end_tick();
        let now = |t: &EndpointTable| t.lately(0).into_iter().next().unwrap();
        assert!(now(&table).answered_last);
        assert_eq!(now(&table).unanswered_run, 0);
        // Two timeouts and an ICMP unreachable after the answers: silence is the news.
        table.record_timeout(k);
        table.record_timeout(k);
        raw.attempts = 6;
        raw.unreachable = 1;
        table.absorb(k, &raw);
        table.end_tick();
        let l = now(&table);
        assert!(!l.answered_last);
        assert_eq!(l.unanswered_run, 3);
        // One more answer starts the count again.
        raw.attempts = 7;
        raw.established = 4;
        table.absorb(k, &raw);
        let l = now(&table);
        assert!(l.answered_last);
        assert_eq!(l.unanswered_run, 0);
    }

    #[test]
    fn timeouts_and_latency() {
        let mut table = EndpointTable::default();
        let k = key(FAMILY_IPV4);
        assert!(table.is_empty());
        table.record_timeout(k);
        let s = &table.status(std::iter::empty())[0].1;
        assert_eq!(s.timeouts, 1);
        assert!(s.connect_latency_us.is_none());
        for _ in 0..3 {
            table.record_latency(k, 100_000);
        }
        let latency = table.status(std::iter::empty())[0]
            .1
            .connect_latency_us
            .unwrap();
        assert!((64.0..=128.0).contains(&latency.p50), "{latency:?}");
    }
}
