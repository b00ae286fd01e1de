//! The agent: load and attach the programs, then on every tick read the kernel's counters,
//! time out unanswered handshakes and answer the local API, until SIGINT or SIGTERM.

use std::{
    collections::HashSet,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    rc::Rc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use log::{error, info, warn, LevelFilter};
use resil_common::{
    histogram::Histogram,
    maps::{
        Direction, DnsEvent, EndpointKey, HandshakeEvent, HandshakeKind, Health, FAMILY_IPV4,
        FAMILY_IPV6, MAX_CONNECTIONS, MAX_ENDPOINTS, MAX_VERDICTS,
    },
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    api::{
        EndpointStatus, EventsReport, FindingsReport, ManualReport, ManualResult, Request,
        ResolverStatus, Response, Server, Side, SocketGroup, StatusReport,
    },
    breaker::{FailureKind, Outcome, Recorded, State, Ticket},
    circuits::{Circuits, ManualAction},
    clock::{monotonic_ns, unix_now},
    collector::{self, Collector},
    config::Config,
    deadlines::ConnDeadlines,
    endpoints::{latency_of, side_of, socket_addr, EndpointTable},
    enforcer::Desired,
    enforcer::Enforcer,
    error::usage,
    events::{Event, EventLog, Shedding},
    findings::{self, BreakerView, Change, Domain, Finding, Findings, Observed, ObservedResolver},
    kubernetes,
    metrics::{
        self, DaemonHealth, EndpointLabels, EndpointSample, MapFill, ResolverSample, Scrape,
        Snapshot,
    },
    names::Names,
    netinfo,
    output::display_name,
    pins::PinDir,
    privileges,
    probes::{Probes, TcMode, XdpMode},
    resolvers::{self, DnsCounts, Resolvers},
    services::{self, ShedChange, ShedVerdict, Shedder},
    snapshot::BreakerStore,
};

/// Handshakes the daemon follows at once, at most.
const MAX_PENDING_HANDSHAKES: usize = 262_144;
/// How long a completed handshake may still turn into a failure (reset before any reply).
const RESET_HORIZON_NS: u64 = 30_000_000_000;
/// How often the kernel's connection map is counted (a walk over 64 Ki keys at most).
const COUNT_CONNECTIONS_EVERY_NS: u64 = 10_000_000_000;
/// Where static names come from.
const HOSTS_FILE: &str = "/etc/hosts";
/// Span of the "recent" figures findings are judged on (they cover one to two spans).
const RECENT_SPAN_NS: u64 = 10_000_000_000;
/// How often findings are assessed.
const ASSESS_EVERY_NS: u64 = 1_000_000_000;

/// What `resil daemon` was asked to do.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Interfaces to observe; empty means the default-route interface.
    pub interfaces: Vec<String>,
    /// Configuration file; `None` means the default location or the embedded defaults.
    pub config: Option<PathBuf>,
    /// The API socket.
    pub socket: PathBuf,
    /// The cgroup v2 directory whose sockets are refused at connect(); `None`: the root.
    pub cgroup: Option<PathBuf>,
    /// Which kernel-side log statements are live.
    pub bpf_log: LevelFilter,
    /// How to attach the XDP ingress observer.
    pub xdp_mode: XdpMode,
    /// How to attach the TC egress observer.
    pub tc_mode: TcMode,
    /// Where to serve Prometheus metrics; `None`: nowhere.
    pub metrics: Option<SocketAddr>,
    /// The bpffs directory where maps and links are pinned.
    pub pin_dir: PathBuf,
    /// The group that may use the API socket; `None`: only its owner.
    pub socket_group: Option<String>,
    /// Name endpoints from the Kubernetes API: (API address if not in-cluster's, credentials).
    pub kubernetes: Option<(Option<String>, PathBuf)>,
}

/// Runs the daemon until a signal asks it to stop.
pub fn run(options: DaemonOptions) -> Result<()> {
    privileges::check()?;
    let config = Config::load(options.config.as_deref())?;
    check_clock()?;
    let group = options
        .socket_group
        .as_deref()
        .map(SocketGroup::lookup)
        .transpose()
        .map_err(|e| usage(format!("{e:#}")))?;
    let kubernetes = options
        .kubernetes
        .as_ref()
        .map(|(api, credentials)| kubernetes::ApiAccess::resolve(api.as_deref(), credentials))
        .transpose()
        .map_err(|e| usage(format!("{e:#}")))?;
    let interfaces = resolve_interfaces(&options.interfaces)?;
    let cgroup = resolve_cgroup(options.cgroup.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(
        &runtime,
        agent(config, interfaces, cgroup, group, kubernetes, options),
    )
}

fn resolve_cgroup(asked: Option<&std::path::Path>) -> Result<PathBuf> {
    let path = match asked {
        Some(path) => path.to_path_buf(),
        None => PathBuf::from(netinfo::cgroup2_root().ok_or_else(|| {
            usage("no cgroup v2 hierarchy is mounted; mount one or name a directory with --cgroup")
        })?),
    };
    if !netinfo::is_cgroup2_dir(&path) {
        return Err(usage(format!(
            "{} is not a cgroup v2 directory (--cgroup)",
            path.display()
        )));
    }
    Ok(path)
}

/// Verdict expiry compares the daemon's CLOCK_MONOTONIC with the kernel's; in a time
/// namespace with a monotonic offset they differ, and fail-open could not be promised.
fn check_clock() -> Result<()> {
    let offsets = std::fs::read_to_string("/proc/self/timens_offsets").unwrap_or_default();
    let shifted = offsets.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        matches!(f.as_slice(), ["monotonic", secs, nanos] if *secs != "0" || *nanos != "0")
    });
    if shifted {
        bail!("resil daemon cannot run in a time namespace with a monotonic clock offset: its verdicts' expiry would not match the kernel's clock");
    }
    Ok(())
}

fn resolve_interfaces(asked: &[String]) -> Result<Vec<String>> {
    let interfaces = if asked.is_empty() {
        vec![netinfo::default_route_interface().ok_or_else(|| {
            usage("no default route found to pick an interface; name one with --iface")
        })?]
    } else {
        asked.to_vec()
    };
    for iface in &interfaces {
        if !netinfo::interface_exists(iface) {
            return Err(usage(format!("interface {iface} not found")));
        }
        let ethernet = netinfo::has_ethernet_frames(iface)
            .with_context(|| format!("cannot read the link type of interface {iface}"))?;
        if !ethernet {
            return Err(usage(format!(
                "interface {iface} does not carry Ethernet frames (tun, WireGuard …); resil observes Ethernet and loopback interfaces"
            )));
        }
    }
    Ok(interfaces)
}

/// The daemon's in-memory state, owned by the agent loop alone.
struct Agent {
    config: Config,
    endpoints: EndpointTable,
    circuits: Circuits,
    enforcer: Enforcer,
    /// Outbound handshakes waiting for an answer, with their breaker tickets.
    handshakes: ConnDeadlines<Ticket>,
    /// Recent successes a reset before reply may still amend.
    successes: ConnDeadlines<Recorded>,
    /// Handshake-table overflows already logged.
    reported_overflow: u64,
    /// DNS health per resolver.
    resolvers: Resolvers,
    /// Names of addresses.
    names: Names,
    /// What is unhealthy, by domain.
    findings: Findings,
    /// Transitions and findings, for `resil events`.
    events: EventLog,
    /// When the findings were last assessed.
    assessed_ns: u64,
    /// Local services being shed, and why.
    shedding: Shedder<EndpointKey>,
    /// How long ticks take.
    tick_durations: Histogram,
    /// Entries in the kernel's connection map, counted now and then.
    connection_entries: u64,
    /// When they were last counted.
    connections_counted_ns: u64,
    /// Endpoints exported one by one in the last scrape.
    exported: HashSet<String>,
    /// When the daemon started (Unix seconds).
    boot: f64,
    /// Where circuit states are saved for the next run.
    saved: BreakerStore,
    /// Ticks done: the daemon is ready after the first.
    ticks: u64,
}

impl Agent {
    fn new(config: Config, enforcer: Enforcer, saved: BreakerStore) -> Self {
        let dns_timeout_ns = config.dns_timeout.as_nanos() as u64;
        Agent {
            config,
            endpoints: EndpointTable::default(),
            circuits: Circuits::default(),
            enforcer,
            handshakes: ConnDeadlines::new(MAX_PENDING_HANDSHAKES),
            successes: ConnDeadlines::new(MAX_PENDING_HANDSHAKES),
            reported_overflow: 0,
            resolvers: Resolvers::new(dns_timeout_ns),
            names: Names::new(Path::new(HOSTS_FILE)),
            findings: Findings::default(),
            events: EventLog::default(),
            assessed_ns: 0,
            shedding: Shedder::default(),
            tick_durations: Histogram::default(),
            connection_entries: 0,
            connections_counted_ns: 0,
            exported: HashSet::new(),
            boot: unix_now(),
            saved,
            ticks: 0,
        }
    }

    /// Brings back the circuits a previous run saved; returns how many.
    fn restore_circuits(&mut self) -> usize {
        let now = monotonic_ns();
        let saved = self.saved.load();
        for (key, state) in &saved {
            self.circuits
                .restore(*key, state.clone(), now, &self.config.policies);
        }
        // Restoring is no change worth saving again.
        self.circuits.take_changed();
        saved.len()
    }

    /// Which local services to shed now: over their connection limit, or unhealthy where the
    /// configuration asks for it (held, then probed one connection at a time until one
    /// succeeds). Changes are logged and go to the event stream.
    fn decide_shedding(&mut self, now: u64) {
        if self.config.services.is_empty() && self.shedding.keys().next().is_none() {
            return;
        }
        let mut keys: HashSet<EndpointKey> = self.endpoints.services().copied().collect();
        keys.extend(self.shedding.keys().copied());
        for key in keys {
            let addr = socket_addr(&key);
            let rule = services::rule_for(&self.config.services, &addr);
            if rule.is_none() && self.shedding.reason(&key).is_none() {
                continue;
            }
            let endpoint = addr.to_string();
            let unhealthy = self
                .findings
                .about(Domain::Internal, &endpoint)
                .find(|f| f.rule != findings::LOSING_SYNS)
                .map(|f| f.summary.clone());
            let change = self.shedding.step(
                key,
                rule,
                self.endpoints.open_connections(&key),
                self.endpoints.service_counters(&key),
                unhealthy.as_deref(),
                now,
            );
            let service = match rule.and_then(|r| r.name.as_deref()) {
                Some(name) => format!("{name} ({endpoint})"),
                None => endpoint.clone(),
            };
            match change {
                Some(ShedChange::Started(reason)) => {
                    warn!("shedding local service {service}: {reason}");
                    let event = Event::SheddingStarted(Shedding {
                        service,
                        reason: reason.to_string(),
                    });
                    self.events.push(unix_now(), event);
                }
                Some(ShedChange::Ended { reason, recovered }) => {
                    info!("no longer shedding local service {service}");
                    let event = Event::SheddingEnded(Shedding {
                        service,
                        reason: reason.to_string(),
                    });
                    self.events.push(unix_now(), event);
                    if recovered {
                        // A probe connection was accepted: what happened before no longer
                        // describes the service.
                        self.endpoints.forget_lately(&key, now);
                        for change in self.findings.end_about(Domain::Internal, &endpoint) {
                            self.note_finding(change);
                        }
                    }
                }
                None => {}
            }
        }
    }

    /// Logs a finding's start or end and puts it in the event stream.
    fn note_finding(&mut self, change: Change) {
        let event = match change {
            Change::Started(f) => {
                warn!("{}: {}", f.domain.title(), f.summary);
                Event::FindingStarted(f)
            }
            Change::Ended(f) => {
                info!("{}: cleared: {}", f.domain.title(), f.subject);
                Event::FindingEnded(f)
            }
        };
        self.events.push(unix_now(), event);
    }

    /// What a scrape exports.
    fn metrics(&mut self, collector: &Collector) -> String {
        let now = monotonic_ns();
        let mut endpoints: Vec<EndpointSample> = self
            .endpoints
            .samples()
            .map(|(key, stats, timeouts, latency)| {
                let circuit = self.circuits.get(key);
                EndpointSample {
                    labels: EndpointLabels {
                        endpoint: socket_addr(key).to_string(),
                        direction: match side_of(key) {
                            Side::Outbound => "outbound",
                            Side::Inbound => "inbound",
                        },
                        name: self.name_of(key, now).unwrap_or_default(),
                    },
                    stats: *stats,
                    timeouts,
                    latency: *latency,
                    state: circuit.map(|c| c.breaker.reported_state()),
                    failure_rate: circuit.and_then(|c| c.breaker.failure_rate(now)),
                    shedding: self.shedding.reason(key).is_some(),
                }
            })
            .collect();
        let aggregated = metrics::cap_endpoints(
            &mut endpoints,
            self.config.metrics_max_endpoints,
            &mut self.exported,
        );
        let resolvers = self
            .resolvers
            .iter()
            .map(|(addr, r)| ResolverSample {
                resolver: addr.to_string(),
                counts: r.counts,
                latency: r.latency,
            })
            .collect();
        let health = DaemonHealth {
            tick: self.tick_durations,
            maps: vec![
                MapFill {
                    map: "connections",
                    entries: self.connection_entries,
                    capacity: MAX_CONNECTIONS as u64,
                },
                MapFill {
                    map: "endpoints",
                    entries: collector.endpoint_entries,
                    capacity: MAX_ENDPOINTS as u64,
                },
                MapFill {
                    map: "verdicts",
                    entries: self.enforcer.enforced() as u64,
                    capacity: MAX_VERDICTS as u64,
                },
            ],
            events_lost: vec![
                ("handshakes", collector.health_total(Health::EventsLost)),
                ("dns", collector.health_total(Health::DnsEventsLost)),
            ],
            insert_failures: vec![
                (
                    "connections",
                    collector.health_total(Health::ConnInsertFailed),
                ),
                (
                    "endpoints",
                    collector.health_total(Health::EndpointInsertFailed),
                ),
            ],
            malformed_packets: collector.health_total(Health::Malformed),
            pending_handshakes: self.handshakes.len() as u64,
            pending_dns_queries: self.resolvers.pending() as u64,
            endpoints_aggregated: aggregated,
        };
        metrics::render(Snapshot {
            endpoints,
            resolvers,
            findings: self.findings.count_by_domain(),
            health,
        })
    }

    /// Moves the breakers' latest transitions into the event log, and saves the circuits
    /// that changed for the next run.
    fn note_transitions(&mut self) {
        for transition in self.circuits.take_transitions() {
            self.events.push(unix_now(), Event::Transition(transition));
        }
        let changed = self.circuits.take_changed();
        if !changed.is_empty() {
            self.saved.save(&self.circuits, &changed);
        }
    }

    /// The name of an endpoint: its dependency's, else what DNS or /etc/hosts call it.
    fn name_of(&self, key: &EndpointKey, now_ns: u64) -> Option<String> {
        self.circuits
            .get(key)
            .and_then(|c| c.dependency.clone())
            .or_else(|| {
                let ip = socket_addr(key).ip();
                self.names.lookup(&ip, now_ns).map(str::to_string)
            })
    }

    /// Judges what happened lately: findings start and end, and say so in the log and the
    /// event stream.
    fn assess(&mut self, now: u64) {
        self.assessed_ns = now;
        self.endpoints.roll(now, RECENT_SPAN_NS);
        self.names.refresh_hosts();
        let observed: Vec<Observed> = self
            .endpoints
            .lately(now)
            .into_iter()
            .map(|l| {
                let addr = socket_addr(&l.key);
                let breaker = self.circuits.get(&l.key).and_then(|c| {
                    let state = c.breaker.state();
                    (state != State::Closed).then(|| BreakerView {
                        state: c.breaker.reported_state().to_string(),
                        reason: c.breaker.reason().map(ToString::to_string),
                        failing: matches!(state, State::Open | State::HalfOpen),
                    })
                });
                Observed {
                    addr,
                    side: side_of(&l.key),
                    display: display_name(&addr.to_string(), self.name_of(&l.key, now).as_deref()),
                    host_name: self.names.lookup(&addr.ip(), now).map(str::to_string),
                    recent: l.recent,
                    timeouts: l.timeouts,
                    window_s: l.window_s,
                    breaker,
                    latency: l.latency,
                    last_failure: l.last_failure,
                    ever_established: l.ever_established,
                    answered_last: l.answered_last,
                    unanswered_run: l.unanswered_run,
                }
            })
            .collect();
        let resolvers: Vec<ObservedResolver> = self
            .resolvers
            .iter()
            .map(|(addr, r)| ObservedResolver {
                addr: *addr,
                recent: r.counts.since(r.recent.base()),
                window_s: r.recent.covers_s(now),
            })
            .filter(|r| r.recent != DnsCounts::default())
            .collect();
        let detected = findings::classify(&observed, &resolvers);
        // Evidence cannot come while traffic is kept away: findings about endpoints whose
        // circuit holds them failed, and about local services being shed, last until the
        // circuit or the shedding's own probes say otherwise.
        let failing: HashSet<String> = self
            .circuits
            .failing()
            .map(|key| socket_addr(key).to_string())
            .collect();
        let shed: HashSet<String> = self
            .shedding
            .keys()
            .map(|key| socket_addr(key).to_string())
            .collect();
        let held = |f: &Finding| {
            let by = if f.domain == Domain::Internal {
                &shed
            } else {
                &failing
            };
            f.endpoints.iter().any(|e| by.contains(e))
        };
        for change in self.findings.update(detected, held, unix_now()) {
            self.note_finding(change);
        }
    }

    fn on_dns(&mut self, event: &DnsEvent) {
        self.resolvers
            .on_event(event, &mut self.names, monotonic_ns());
    }

    fn on_handshake(&mut self, event: HandshakeEvent) {
        let Some(kind) = HandshakeKind::from_u8(event.kind) else {
            return;
        };
        let conn = event.conn;
        let endpoint = conn.endpoint(Direction::Outbound);
        let now = monotonic_ns();
        let failure = match kind {
            HandshakeKind::Started => {
                let (ticket, connect_timeout) =
                    self.circuits.admit(endpoint, now, &self.config.policies);
                let deadline = event
                    .ts_ns
                    .saturating_add(connect_timeout.as_nanos() as u64);
                if !self.handshakes.insert(conn, deadline, ticket) {
                    // Cannot follow it: its outcome will never be recorded.
                    self.circuits.release(endpoint, ticket);
                }
                return;
            }
            HandshakeKind::Established => {
                self.endpoints.record_latency(endpoint, event.latency_ns);
                if let Some(ticket) = self.handshakes.remove(&conn) {
                    let outcome = Outcome::Success {
                        latency_ns: event.latency_ns,
                    };
                    if let Some(recorded) = self.circuits.record(endpoint, now, ticket, outcome) {
                        self.successes
                            .insert(conn, now.saturating_add(RESET_HORIZON_NS), recorded);
                    }
                }
                return;
            }
            HandshakeKind::ResetBeforeReply => {
                if let Some(recorded) = self.successes.remove(&conn) {
                    self.circuits.amend_reset(endpoint, now, recorded);
                }
                return;
            }
            HandshakeKind::Refused => FailureKind::Refused,
            HandshakeKind::Unreachable => FailureKind::Unreachable,
        };
        // A late answer to a handshake already timed out settles nothing new.
        if let Some(ticket) = self.handshakes.remove(&conn) {
            self.circuits
                .record(endpoint, now, ticket, Outcome::Failure(failure));
        }
    }

    fn tick(&mut self, collector: &mut Collector) {
        let started = std::time::Instant::now();
        collector.each_endpoint(|key, stats| self.endpoints.absorb(key, stats));
        let now = monotonic_ns();
        if now.saturating_sub(self.connections_counted_ns) >= COUNT_CONNECTIONS_EVERY_NS {
            self.connections_counted_ns = now;
            let (entries, open) = collector.connection_census();
            self.connection_entries = entries;
            self.endpoints.census(&open);
        }
        for (conn, ticket) in self.handshakes.expire(now) {
            let endpoint = conn.endpoint(Direction::Outbound);
            self.endpoints.record_timeout(endpoint);
            self.circuits.record(
                endpoint,
                now,
                ticket,
                Outcome::Failure(FailureKind::Timeout),
            );
        }
        self.successes.expire(now);
        self.resolvers.tick(now, RECENT_SPAN_NS);
        self.circuits.tick(now);
        self.note_transitions();
        if now.saturating_sub(self.assessed_ns) >= ASSESS_EVERY_NS {
            self.assess(now);
        }
        self.decide_shedding(now);
        self.enforce(now);
        self.endpoints.end_tick();
        let overflowed = self.handshakes.overflowed;
        if overflowed > self.reported_overflow {
            warn!(
                "{} handshakes were not followed: more than {MAX_PENDING_HANDSHAKES} in flight",
                overflowed - self.reported_overflow
            );
            self.reported_overflow = overflowed;
        }
        for (slot, grew) in collector.health_increases() {
            match slot {
                Health::ConnInsertFailed => warn!(
                    "{grew} connections could not be tracked: the kernel connection map is full"
                ),
                Health::EndpointInsertFailed => {
                    warn!("{grew} endpoint updates were lost: the kernel endpoint map is full")
                }
                Health::EventsLost => {
                    warn!("{grew} handshake events were lost: the ring buffer was full")
                }
                Health::DnsEventsLost => {
                    warn!("{grew} DNS events were lost: the DNS ring buffer was full")
                }
                Health::Malformed => log::debug!("{grew} malformed TCP/UDP/ICMP packets seen"),
            }
        }
        self.tick_durations
            .record_us(started.elapsed().as_micros() as u64);
        self.ticks += 1;
    }

    /// Writes the circuits' verdicts into the kernel, refreshing their expiry.
    fn enforce(&mut self, now: u64) {
        let mut desired = self.circuits.desired();
        desired.extend(self.shedding.verdicts().map(|(key, verdict)| {
            let want = match verdict {
                ShedVerdict::Refuse => Desired::Refuse,
                ShedVerdict::Probe { generation } => Desired::Probe {
                    generation,
                    probes: 1,
                },
            };
            (*key, want)
        }));
        self.enforcer.sync(now, &desired);
    }

    /// After kernel events: enforce at once if a circuit changed state.
    fn enforce_changes(&mut self) {
        if self.circuits.dirty() {
            self.enforce(monotonic_ns());
            self.note_transitions();
        }
    }

    /// An operator's command for an endpoint or a named dependency.
    fn manual(&mut self, action: ManualAction, target: &str) -> Response {
        let now = monotonic_ns();
        let keys: Vec<EndpointKey> = match target.parse::<SocketAddr>() {
            Ok(addr) => vec![endpoint_key(addr)],
            Err(_) => {
                let Some(dependency) = self
                    .config
                    .policies
                    .dependencies
                    .iter()
                    .find(|d| d.name == target)
                else {
                    return Response::Error(format!(
                        "{target} is neither an endpoint like 10.0.3.7:5432 nor a dependency of the configuration"
                    ));
                };
                // The dependency's known endpoints, and every exact endpoint it names.
                let mut keys = self.circuits.of_dependency(target);
                for pattern in &dependency.endpoints {
                    if let (Some(net), Some(port)) = (pattern.net, pattern.port) {
                        if net.prefix_len() == net.max_prefix_len() {
                            let key = endpoint_key(SocketAddr::new(net.addr(), port));
                            if !keys.contains(&key) {
                                keys.push(key);
                            }
                        }
                    }
                }
                if keys.is_empty() {
                    return Response::Error(format!(
                        "dependency {target} has no known endpoint yet (its patterns are prefixes; name an endpoint)"
                    ));
                }
                keys
            }
        };
        let mut endpoints = Vec::new();
        for key in keys {
            let state = self
                .circuits
                .manual(key, action, now, &self.config.policies);
            endpoints.push(ManualResult {
                endpoint: socket_addr(&key).to_string(),
                dependency: self.circuits.get(&key).and_then(|c| c.dependency.clone()),
                state: state.to_string(),
            });
        }
        self.enforce(now);
        self.note_transitions();
        Response::Manual(ManualReport { endpoints })
    }

    /// SIGHUP: read the configuration again; keep the old one if the new one is invalid.
    fn reload(&mut self) {
        match self.config.reload() {
            Ok(config) => {
                self.circuits.apply(&config.policies, monotonic_ns());
                self.enforcer
                    .set_fail_open_ns(config.fail_open_after.as_nanos() as u64);
                self.resolvers
                    .set_timeout_ns(config.dns_timeout.as_nanos() as u64);
                info!(
                    "configuration reloaded from {} ({} dependencies)",
                    config.source,
                    config.policies.dependencies.len()
                );
                self.config = config;
            }
            Err(e) => error!("configuration not reloaded, the previous one stays in force: {e:#}"),
        }
    }

    fn answer(&mut self, request: Request) -> Response {
        match request {
            Request::Manual { action, target } => self.manual(action, &target),
            Request::Status => Response::Status(StatusReport {
                endpoints: self.status(),
                resolvers: self.resolver_status(),
            }),
            Request::Events { after } => {
                let (events, lost) = self.events.after(after);
                Response::Events(EventsReport {
                    events,
                    lost,
                    boot: self.boot,
                })
            }
            Request::Report => Response::Report(FindingsReport {
                findings: self.findings.current(),
            }),
        }
    }

    fn status(&self) -> Vec<EndpointStatus> {
        let now = monotonic_ns();
        self.endpoints
            .status(self.circuits.set_by_hand())
            .into_iter()
            .map(|(key, mut status)| {
                if let Some(circuit) = self.circuits.get(&key) {
                    status.state = circuit.breaker.reported_state().to_string();
                    status.failure_rate = circuit.breaker.failure_rate(now);
                    status.reason = circuit.breaker.reason().map(ToString::to_string);
                    status.dependency = circuit.dependency.clone();
                }
                status.name = self.name_of(&key, now);
                if let Some(reason) = self.shedding.reason(&key) {
                    status.shedding = true;
                    status.reason = Some(reason.to_string());
                }
                status
            })
            .collect()
    }

    fn resolver_status(&self) -> Vec<ResolverStatus> {
        let mut all: Vec<ResolverStatus> = self
            .resolvers
            .iter()
            .map(|(addr, r)| ResolverStatus {
                resolver: addr.to_string(),
                counts: r.counts,
                latency_us: latency_of(&r.latency),
            })
            .collect();
        all.sort_by(|a, b| a.resolver.cmp(&b.resolver));
        all
    }
}

/// The next name update from the Kubernetes watchers; never, when there are none.
async fn next_update(
    cluster: &mut Option<mpsc::Receiver<kubernetes::Update>>,
) -> Option<kubernetes::Update> {
    match cluster {
        Some(updates) => updates.recv().await,
        None => std::future::pending().await,
    }
}

/// Registers a ring buffer with the runtime so the loop wakes when records arrive.
fn watch<T: AsRawFd>(inner: T, what: &str) -> Result<AsyncFd<T>> {
    // SAFETY: ring buffers own their map file descriptor for as long as they live, and the
    // AsyncFd owns the ring buffer.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| anyhow!("cannot watch {what}: {e}"))
}

/// The outbound endpoint key of a socket address (an IPv4-mapped IPv6 address is the IPv4
/// endpoint it is, as the kernel keys it).
fn endpoint_key(addr: SocketAddr) -> EndpointKey {
    let ip = match addr.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    let (addr_bytes, family) = match ip {
        std::net::IpAddr::V4(ip) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&ip.octets());
            (b, FAMILY_IPV4)
        }
        std::net::IpAddr::V6(ip) => (ip.octets(), FAMILY_IPV6),
    };
    EndpointKey {
        addr: addr_bytes,
        port: addr.port(),
        family,
        direction: Direction::Outbound as u8,
    }
}

async fn agent(
    config: Config,
    interfaces: Vec<String>,
    cgroup: PathBuf,
    group: Option<SocketGroup>,
    kubernetes: Option<kubernetes::ApiAccess>,
    options: DaemonOptions,
) -> Result<()> {
    // Before anything is attached, so a signal during start-up still ends in a clean exit.
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    // Now, not once started: a reload (`systemctl reload`) during start-up must not kill it.
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    // The socket first: a second daemon must learn that one is running before it touches
    // any hook (an interface holds one XDP program only).
    let server = Rc::new(Server::bind(&options.socket, group.as_ref())?);
    let metrics_listener = match options.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let pins = PinDir::open(&options.pin_dir)?;
    let mut probes = Probes::load(options.bpf_log, pins)?;
    for iface in &interfaces {
        probes.attach(iface, options.xdp_mode, options.tc_mode)?;
    }
    probes.attach_cgroup(&cgroup)?;
    probes.finish_adoption()?;
    let (mut collector, ring) = Collector::new(&mut probes)?;
    let enforcer = Enforcer::new(&mut probes, config.fail_open_after.as_nanos() as u64)?;
    let saved = BreakerStore::new(&mut probes)?;
    let mut ring: AsyncFd<RingBuf<MapData>> = watch(ring, "the handshake ring buffer")?;
    let mut dns_ring = watch(collector::dns_ring(&mut probes)?, "the DNS ring buffer")?;
    let mut bpf_logger = watch(probes.take_logger()?, "the BPF log ring buffer")?;
    let (requests_tx, mut requests) = mpsc::channel(64);
    let serving = {
        let server = Rc::clone(&server);
        tokio::task::spawn_local(async move { server.serve(requests_tx).await })
    };
    let (scrape_tx, mut scrapes) = mpsc::channel(16);
    let serving_metrics = metrics_listener.map(|listener| {
        let scrape_tx = scrape_tx.clone();
        tokio::task::spawn_local(async move { metrics::serve(listener, scrape_tx).await })
    });
    let mut cluster = kubernetes.as_ref().map(kubernetes::start).transpose()?;
    let mut tick = tokio::time::interval(config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut agent = Agent::new(config, enforcer, saved);
    let restored = agent.restore_circuits();
    if restored > 0 {
        info!("restored {restored} circuits that were not closed when the previous daemon stopped");
        agent.enforce(monotonic_ns());
    }
    let modes: Vec<String> = probes
        .attachments()
        .iter()
        .map(|a| format!("{} (XDP {}, TC {})", a.iface, a.xdp, a.tc))
        .collect();
    info!(
        "resil daemon observing {}, enforcing for cgroup {} (socket {}, metrics {}, configuration from {})",
        modes.join(", "),
        cgroup.display(),
        options.socket.display(),
        options.metrics.map_or("off".to_string(), |a| format!("http://{a}/metrics")),
        agent.config.source
    );

    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Settle every answer that already arrived before timing anything out.
                collector::drain(ring.get_mut(), collector::decode_event, |e| agent.on_handshake(e));
                collector::drain(dns_ring.get_mut(), resolvers::decode_event, |e| agent.on_dns(&e));
                agent.tick(&mut collector);
            }
            ready = ring.readable_mut() => {
                let mut guard = ready.context("waiting on the handshake ring buffer failed")?;
                collector::drain(guard.get_inner_mut(), collector::decode_event, |e| agent.on_handshake(e));
                guard.clear_ready();
                agent.enforce_changes();
            }
            ready = dns_ring.readable_mut() => {
                let mut guard = ready.context("waiting on the DNS ring buffer failed")?;
                collector::drain(guard.get_inner_mut(), resolvers::decode_event, |e| agent.on_dns(&e));
                guard.clear_ready();
            }
            ready = bpf_logger.readable_mut() => {
                let mut guard = ready.context("waiting on the BPF log failed")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Some((request, reply)) = requests.recv() => {
                let _ = reply.send(agent.answer(request));
            }
            Some(scrape) = scrapes.recv() => match scrape {
                Scrape::Metrics(reply) => { let _ = reply.send(agent.metrics(&collector)); }
                Scrape::Alive(reply) => { let _ = reply.send(true); }
                Scrape::Ready(reply) => { let _ = reply.send(agent.ticks > 0); }
            },
            update = next_update(&mut cluster) => match update {
                Some(update) => agent.names.update_cluster(update),
                None => cluster = None,
            },
            _ = hangup.recv() => agent.reload(),
            _ = interrupt.recv() => { info!("SIGINT: exiting"); break; }
            _ = terminate.recv() => { info!("SIGTERM: exiting"); break; }
        }
    }
    // Programs, maps and verdicts stay pinned for the next daemon: verdicts are enforced until
    // they expire (fail_open_after), then traffic flows freely until a daemon runs again.
    info!(
        "state stays pinned in {} for the next start; `resil daemon --cleanup` removes it",
        options.pin_dir.display()
    );
    serving.abort();
    if let Some(task) = serving_metrics {
        task.abort();
    }
    drop(scrape_tx);
    // Give the aborted task a moment to drop its handle on the server before we remove it.
    tokio::time::sleep(Duration::from_millis(1)).await;
    drop(server);
    drop(probes);
    Ok(())
}
