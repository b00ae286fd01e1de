//! resil's BPF programs. Thin by design: parse (shared parser in `resil-common`), look up the
//! connection, apply the shared tracking step, count, and emit at most one event per handshake
//! step. Nothing here logs or emits per packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use aya_log_ebpf::warn;
use resil_common::{
    maps::{
        ConnKey, ConnState, EndpointStats, HandshakeEvent, Health, HANDSHAKE_RING_BYTES,
        HEALTH_SLOTS, MAX_CONNECTIONS, MAX_ENDPOINTS,
    },
    packet::{parse_ethernet, PacketBytes, Parsed},
    track::{self, Effects, Update, Way},
};

#[map]
static CONNECTIONS: LruHashMap<ConnKey, ConnState> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map]
static ENDPOINTS: LruPerCpuHashMap<resil_common::maps::EndpointKey, EndpointStats> =
    LruPerCpuHashMap::with_max_entries(MAX_ENDPOINTS, 0);

#[map]
static HANDSHAKES: RingBuf = RingBuf::with_byte_size(HANDSHAKE_RING_BYTES, 0);

#[map]
static HEALTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(HEALTH_SLOTS, 0);

/// `BPF_NOEXIST`: insert only if absent.
const NOEXIST: u64 = 1;

/// The socket buffer as a [`PacketBytes`] source: every read is checked by the kernel helper.
struct Skb<'a>(&'a TcContext);

impl PacketBytes for Skb<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }

    #[inline(always)]
    fn total_len(&self) -> usize {
        self.0.len() as usize
    }
}

/// Observes packets arriving on the interface.
#[classifier]
pub fn resil_tc_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, Way::Ingress);
    TC_ACT_PIPE
}

/// Observes packets leaving through the interface.
#[classifier]
pub fn resil_tc_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Way::Egress);
    TC_ACT_PIPE
}

#[inline(always)]
fn observe(ctx: &TcContext, way: Way) {
    match parse_ethernet(&Skb(ctx)) {
        Parsed::Tcp(segment) => {
            let key = track::conn_key(&segment, way);
            let conn = CONNECTIONS.get_ptr_mut(&key);
            // SAFETY: the pointer comes from a map lookup and is only read here.
            let current = conn.map(|p| unsafe { *p });
            let effects = track::on_tcp(current.as_ref(), &segment, way, now_ns());
            apply(ctx, &key, conn, current.as_ref(), &effects);
        }
        Parsed::Unreachable(flow) if way == Way::Ingress => {
            let key = track::quoted_conn_key(&flow);
            let conn = CONNECTIONS.get_ptr_mut(&key);
            // SAFETY: as above.
            let current = conn.map(|p| unsafe { *p });
            let effects = track::on_unreachable(current.as_ref(), &flow);
            apply(ctx, &key, conn, current.as_ref(), &effects);
        }
        Parsed::Malformed => bump(Health::Malformed),
        Parsed::Unreachable(_) | Parsed::Other => {}
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn apply(
    ctx: &TcContext,
    key: &ConnKey,
    conn: Option<*mut ConnState>,
    read: Option<&ConnState>,
    effects: &Effects,
) {
    match effects.update {
        Update::Keep => {}
        Update::Insert(state) => {
            if CONNECTIONS.insert(key, &state, 0).is_err() {
                bump(Health::ConnInsertFailed);
                warn!(ctx, "resil: connection map insert failed");
            }
        }
        Update::Write(state) => {
            if let (Some(p), Some(old)) = (conn, read) {
                // SAFETY: `p` came from the lookup that `old` was read through. Only the
                // fields this packet's direction owns change, so the other direction's
                // program, perhaps running on another CPU, loses nothing.
                unsafe { track::write_changes(p, old, &state) };
            }
        }
        Update::Delete => {
            let _ = CONNECTIONS.remove(key);
        }
    }
    if effects.counters != 0 {
        count_for_endpoint(ctx, key, effects);
    }
    if let Some(kind) = effects.event {
        emit(key, kind as u8, effects.latency_ns);
    }
}

#[inline(always)]
fn count_for_endpoint(ctx: &TcContext, key: &ConnKey, effects: &Effects) {
    let endpoint = key.endpoint(effects.direction);
    let mut stats = ENDPOINTS.get_ptr_mut(&endpoint);
    if stats.is_none() {
        // A new endpoint: create it (another CPU may win the race; then ours fails harmlessly).
        let fresh = EndpointStats {
            created_ns: now_ns(),
            ..EndpointStats::ZERO
        };
        let _ = ENDPOINTS.insert(&endpoint, &fresh, NOEXIST);
        stats = ENDPOINTS.get_ptr_mut(&endpoint);
    }
    let Some(stats) = stats else {
        bump(Health::EndpointInsertFailed);
        warn!(ctx, "resil: endpoint map insert failed");
        return;
    };
    // SAFETY: per-CPU value of this CPU; no other writer.
    track::count_into(unsafe { &mut *stats }, effects);
}

#[inline(always)]
fn emit(key: &ConnKey, kind: u8, latency_ns: u64) {
    match HANDSHAKES.reserve::<HandshakeEvent>(0) {
        Some(mut entry) => {
            entry.write(HandshakeEvent {
                ts_ns: now_ns(),
                latency_ns,
                conn: *key,
                kind,
                _pad: [0; 7],
            });
            entry.submit(0);
        }
        None => bump(Health::EventsLost),
    }
}

#[inline(always)]
fn bump(slot: Health) {
    if let Some(counter) = HEALTH.get_ptr_mut(slot as u32) {
        // SAFETY: per-CPU slot of this CPU.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
