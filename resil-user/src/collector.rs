//! Reads what the kernel counted: per-endpoint counters, handshake events, health counters.
//! Knows nothing of policy.

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use resil_common::maps::{
    names, ConnKey, ConnState, Direction, EndpointKey, EndpointStats, HandshakeEvent, Health,
    Phase, HEALTH_SLOTS,
};

use crate::probes::Probes;

/// Readers of the kernel's maps.
pub struct Collector {
    endpoints: PerCpuHashMap<MapData, EndpointKey, EndpointStats>,
    connections: HashMap<MapData, ConnKey, ConnState>,
    health: PerCpuArray<MapData, u64>,
    last_health: [u64; HEALTH_SLOTS as usize],
    /// Entries in the endpoint map at the last reading.
    pub endpoint_entries: u64,
}

/// Sums per-CPU endpoint counters.
pub fn sum(values: &[EndpointStats]) -> EndpointStats {
    let mut total = EndpointStats::ZERO;
    for v in values {
        total.add(v);
        // Only the creating CPU's copy holds the creation time.
        total.created_ns = total.created_ns.max(v.created_ns);
    }
    total
}

/// Decodes one ring-buffer record; `None` if it is too short.
pub fn decode_event(bytes: &[u8]) -> Option<HandshakeEvent> {
    if bytes.len() < std::mem::size_of::<HandshakeEvent>() {
        return None;
    }
    // SAFETY: length checked; HandshakeEvent is plain old data, read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<HandshakeEvent>()) })
}

impl Collector {
    /// Takes the counter maps from the loaded programs, and returns the handshake ring buffer
    /// separately so the caller can wait on it.
    pub fn new(probes: &mut Probes) -> Result<(Collector, RingBuf<MapData>)> {
        let endpoints = PerCpuHashMap::try_from(probes.take_map(names::ENDPOINTS)?)
            .context("the endpoint map has an unexpected type")?;
        let health = PerCpuArray::try_from(probes.take_map(names::HEALTH)?)
            .context("the health map has an unexpected type")?;
        let connections = HashMap::try_from(probes.take_map(names::CONNECTIONS)?)
            .context("the connection map has an unexpected type")?;
        let ring = RingBuf::try_from(probes.take_map(names::HANDSHAKES)?)
            .context("the handshake map has an unexpected type")?;
        Ok((
            Collector {
                endpoints,
                connections,
                endpoint_entries: 0,
                health,
                last_health: [0; HEALTH_SLOTS as usize],
            },
            ring,
        ))
    }

    /// Calls `f` with every endpoint's counters summed across CPUs.
    pub fn each_endpoint(&mut self, mut f: impl FnMut(EndpointKey, &EndpointStats)) {
        // An entry evicted between listing and reading is simply skipped this tick.
        let mut entries = 0;
        for (key, values) in self.endpoints.iter().flatten() {
            f(key, &sum(&values));
            entries += 1;
        }
        self.endpoint_entries = entries;
    }

    /// Entries in the connection map, and the established inbound connections per local
    /// service among them (a walk over the whole map: call it rarely).
    pub fn connection_census(&self) -> (u64, std::collections::HashMap<EndpointKey, u64>) {
        let mut entries = 0;
        let mut open = std::collections::HashMap::new();
        for (key, state) in self.connections.iter().flatten() {
            entries += 1;
            if state.direction == Direction::Inbound as u8
                && state.phase == Phase::Established as u32
            {
                *open.entry(key.endpoint(Direction::Inbound)).or_insert(0) += 1;
            }
        }
        (entries, open)
    }

    /// What a health counter has counted in all, as of the last [`Collector::health_increases`].
    pub fn health_total(&self, slot: Health) -> u64 {
        self.last_health[slot as usize]
    }

    /// Health counters that grew since the last call, with how much.
    pub fn health_increases(&mut self) -> Vec<(Health, u64)> {
        let slots = [
            Health::ConnInsertFailed,
            Health::EndpointInsertFailed,
            Health::EventsLost,
            Health::Malformed,
            Health::DnsEventsLost,
        ];
        let mut grew = Vec::new();
        for slot in slots {
            let Ok(values) = self.health.get(&(slot as u32), 0) else {
                continue;
            };
            let total: u64 = values.iter().sum();
            let last = &mut self.last_health[slot as usize];
            if total > *last {
                grew.push((slot, total - *last));
            }
            *last = total;
        }
        grew
    }
}

/// Records taken from a ring buffer at once, at most: the agent loop must get back to its
/// other work (the next tick or wake-up takes the rest).
const DRAIN_AT_ONCE: usize = 65_536;

/// Drains the records waiting in a ring buffer (up to [`DRAIN_AT_ONCE`]), decoding each with
/// `decode`.
pub fn drain<T>(
    ring: &mut RingBuf<MapData>,
    decode: impl Fn(&[u8]) -> Option<T>,
    mut f: impl FnMut(T),
) {
    for _ in 0..DRAIN_AT_ONCE {
        let Some(item) = ring.next() else {
            return;
        };
        if let Some(event) = decode(&item) {
            f(event);
        }
    }
}

/// Takes the DNS ring buffer from the loaded programs.
pub fn dns_ring(probes: &mut Probes) -> Result<RingBuf<MapData>> {
    RingBuf::try_from(probes.take_map(names::DNS)?).context("the DNS map has an unexpected type")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_cpus() {
        let a = EndpointStats {
            attempts: 2,
            created_ns: 77,
            ..EndpointStats::ZERO
        };
        let b = EndpointStats {
            attempts: 5,
            ..EndpointStats::ZERO
        };
        let s = sum(&[a, b]);
        assert_eq!((s.attempts, s.created_ns), (7, 77));
    }

    #[test]
    fn short_records_are_rejected() {
        assert!(decode_event(&[0u8; 10]).is_none());
        let event = decode_event(&[0u8; 64]).unwrap();
        assert_eq!(event.kind, 0);
    }
}
