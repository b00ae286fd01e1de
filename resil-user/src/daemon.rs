//! The agent: load and attach the programs, then on every tick read the kernel's counters,
//! time out unanswered handshakes and answer the local API, until SIGINT or SIGTERM.

use std::{os::fd::AsRawFd, path::PathBuf, rc::Rc, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use log::{info, warn, LevelFilter};
use resil_common::maps::{Direction, Health};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    api::{Request, Response, Server, StatusReport},
    clock::monotonic_ns,
    collector::{self, Collector},
    config::Config,
    endpoints::EndpointTable,
    error::usage,
    handshakes::{HandshakeTracker, Outcome},
    netinfo,
    probes::Probes,
};

/// Handshakes the daemon follows at once, at most.
const MAX_PENDING_HANDSHAKES: usize = 262_144;

/// What `resil daemon` was asked to do.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Interfaces to observe; empty means the default-route interface.
    pub interfaces: Vec<String>,
    /// Configuration file; `None` means the default location or the embedded defaults.
    pub config: Option<PathBuf>,
    /// The API socket.
    pub socket: PathBuf,
    /// Which kernel-side log statements are live.
    pub bpf_log: LevelFilter,
}

/// Runs the daemon until a signal asks it to stop.
pub fn run(options: DaemonOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("resil daemon must run as root: it loads BPF programs (try sudo)");
    }
    let config = Config::load(options.config.as_deref())?;
    let interfaces = resolve_interfaces(&options.interfaces)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, agent(config, interfaces, options))
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
        if !netinfo::has_ethernet_frames(iface) {
            return Err(usage(format!(
                "interface {iface} does not carry Ethernet frames (tun, WireGuard …); resil observes Ethernet and loopback interfaces"
            )));
        }
    }
    Ok(interfaces)
}

/// The daemon's in-memory state, owned by the agent loop alone.
struct Agent {
    endpoints: EndpointTable,
    handshakes: HandshakeTracker,
    /// Handshake-table overflows already logged.
    reported_overflow: u64,
}

impl Agent {
    fn new(config: Config) -> Self {
        let timeout_ns = config.defaults.connect_timeout.as_nanos() as u64;
        Agent {
            endpoints: EndpointTable::default(),
            handshakes: HandshakeTracker::new(timeout_ns, MAX_PENDING_HANDSHAKES),
            reported_overflow: 0,
        }
    }

    fn on_handshake(&mut self, event: resil_common::maps::HandshakeEvent) {
        if let Some((conn, outcome)) = self.handshakes.on_event(&event) {
            self.endpoints
                .record(conn.endpoint(Direction::Outbound), outcome);
        }
    }

    fn tick(&mut self, collector: &mut Collector) {
        let overflowed = self.handshakes.overflowed;
        if overflowed > self.reported_overflow {
            warn!(
                "{} handshakes were not followed: more than {MAX_PENDING_HANDSHAKES} in flight",
                overflowed - self.reported_overflow
            );
            self.reported_overflow = overflowed;
        }
        collector.each_endpoint(|key, stats| self.endpoints.absorb(key, stats));
        for conn in self.handshakes.expire(monotonic_ns()) {
            self.endpoints
                .record(conn.endpoint(Direction::Outbound), Outcome::Timeout);
        }
        self.endpoints.end_tick();
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
                Health::Malformed => log::debug!("{grew} malformed TCP/ICMP packets seen"),
            }
        }
    }

    fn answer(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(StatusReport {
                endpoints: self.endpoints.status(),
            }),
        }
    }
}

/// Registers a ring buffer with the runtime so the loop wakes when records arrive.
fn watch<T: AsRawFd>(inner: T, what: &str) -> Result<AsyncFd<T>> {
    // SAFETY: ring buffers own their map file descriptor for as long as they live, and the
    // AsyncFd owns the ring buffer.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| anyhow!("cannot watch {what}: {e}"))
}

async fn agent(config: Config, interfaces: Vec<String>, options: DaemonOptions) -> Result<()> {
    // Before anything is attached, so a signal during start-up still ends in a clean exit.
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut probes = Probes::load(options.bpf_log)?;
    for iface in &interfaces {
        probes.attach_tc(iface)?;
    }
    let (mut collector, ring) = Collector::new(&mut probes)?;
    let mut ring: AsyncFd<RingBuf<MapData>> = watch(ring, "the handshake ring buffer")?;
    let mut bpf_logger = watch(probes.take_logger()?, "the BPF log ring buffer")?;
    let server = Rc::new(Server::bind(&options.socket)?);
    let (requests_tx, mut requests) = mpsc::channel(64);
    let serving = {
        let server = Rc::clone(&server);
        tokio::task::spawn_local(async move { server.serve(requests_tx).await })
    };
    let mut tick = tokio::time::interval(config.daemon.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut agent = Agent::new(config);
    info!(
        "resil daemon observing {} (socket {})",
        interfaces.join(", "),
        options.socket.display()
    );

    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Settle every answer that already arrived before timing anything out.
                collector::drain(ring.get_mut(), |event| agent.on_handshake(event));
                agent.tick(&mut collector);
            }
            ready = ring.readable_mut() => {
                let mut guard = ready.context("waiting on the handshake ring buffer failed")?;
                collector::drain(guard.get_inner_mut(), |event| agent.on_handshake(event));
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
            _ = interrupt.recv() => { info!("SIGINT: detaching and exiting"); break; }
            _ = terminate.recv() => { info!("SIGTERM: detaching and exiting"); break; }
        }
    }
    serving.abort();
    // Give the aborted task a moment to drop its handle on the server before we remove it.
    tokio::time::sleep(Duration::from_millis(1)).await;
    drop(server);
    drop(probes);
    Ok(())
}
