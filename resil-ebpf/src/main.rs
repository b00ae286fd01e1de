//! resil's BPF programs. Thin by design: parse (shared parser in `resil-common`), look up the
//! connection, apply the shared tracking step, count, and emit at most one event per handshake
//! step. Nothing here logs or emits per packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_F_NO_PREALLOC, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_set_retval},
    macros::{cgroup_sock_addr, classifier, map},
    maps::{HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, TcContext},
};
use aya_log_ebpf::warn;
use resil_common::{
    enforce::{self, Decision},
    maps::{
        ConnKey, ConnState, EndpointKey, EndpointStats, HandshakeEvent, Health, Phase, TokenKey,
        Verdict, FAMILY_IPV4, HANDSHAKE_RING_BYTES, HEALTH_SLOTS, MAX_CONNECTIONS, MAX_ENDPOINTS,
        MAX_PROBES, MAX_TOKENS, MAX_VERDICTS,
    },
    packet::{parse_ethernet, tcp_flags, PacketBytes, Parsed, TcpSegment},
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

/// Not preallocated: an update then replaces the element instead of rewriting it in place, so
/// a program reading a verdict never sees half of an old one and half of a new one.
#[map]
static VERDICTS: HashMap<EndpointKey, Verdict> =
    HashMap::with_max_entries(MAX_VERDICTS, BPF_F_NO_PREALLOC);

#[map]
static TOKENS: HashMap<TokenKey, u8> = HashMap::with_max_entries(MAX_TOKENS, 0);

const ECONNREFUSED: i32 = 111;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// TTL / hop limit of the RSTs resil sends.
const RST_HOPS: u8 = 64;
const IPPROTO_MPTCP: u32 = 262;
/// Values a `cgroup/connect*` program returns.
const CONNECT_ALLOW: i32 = 1;
const CONNECT_DENY: i32 = 0;

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
    observe(&ctx, Way::Ingress)
}

/// Observes packets leaving through the interface, and refuses forwarded SYNs to endpoints
/// whose circuit is open (local sockets are refused earlier, by the connect hooks).
#[classifier]
pub fn resil_tc_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Way::Egress)
}

/// Refuses `connect()` on TCP sockets to IPv4 endpoints whose circuit is open.
#[cgroup_sock_addr(connect4)]
pub fn resil_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context; a connect4 program
    // may read the IPv4 fields.
    let addr = unsafe { &*ctx.sock_addr };
    if !is_tcp(addr.type_, addr.protocol) {
        return CONNECT_ALLOW; // UDP, SCTP … are left alone
    }
    on_connect(&enforce::connect4_endpoint(addr.user_ip4, addr.user_port))
}

/// Refuses `connect()` on TCP sockets to IPv6 endpoints whose circuit is open.
#[cgroup_sock_addr(connect6)]
pub fn resil_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above; a connect6 program may read the IPv6 fields.
    let addr = unsafe { &*ctx.sock_addr };
    if !is_tcp(addr.type_, addr.protocol) {
        return CONNECT_ALLOW;
    }
    let ip6 = [
        addr.user_ip6[0],
        addr.user_ip6[1],
        addr.user_ip6[2],
        addr.user_ip6[3],
    ];
    on_connect(&enforce::connect6_endpoint(ip6, addr.user_port))
}

#[inline(always)]
fn is_tcp(sock_type: u32, protocol: u32) -> bool {
    sock_type == SOCK_STREAM && (protocol == IPPROTO_TCP || protocol == IPPROTO_MPTCP)
}

#[inline(always)]
fn on_connect(endpoint: &EndpointKey) -> i32 {
    if admit(endpoint) {
        return CONNECT_ALLOW;
    }
    // SAFETY: sets this program's return code for connect(); no pointers involved.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    CONNECT_DENY
}

/// Applies the endpoint's verdict to one new connection; counts refusals. True to let it go.
#[inline(always)]
fn admit(endpoint: &EndpointKey) -> bool {
    // SAFETY: a copy is taken at once; the daemon may replace the entry meanwhile.
    let verdict = unsafe { VERDICTS.get(endpoint).copied() };
    match enforce::decide(verdict.as_ref(), now_ns()) {
        Decision::Allow => true,
        Decision::Refuse => {
            count_enforcement(endpoint, true);
            false
        }
        Decision::WouldRefuse => {
            count_enforcement(endpoint, false);
            true
        }
        Decision::TakeToken { generation, probes } => {
            if take_token(endpoint, generation, probes) {
                true
            } else {
                count_enforcement(endpoint, true);
                false
            }
        }
    }
}

/// Takes one half-open probe token. Deleting a map entry is atomic: of all the CPUs trying,
/// exactly one deletes each token, so exactly `probes` connections get through.
#[inline(always)]
fn take_token(endpoint: &EndpointKey, generation: u32, probes: u32) -> bool {
    let mut key = TokenKey {
        endpoint: *endpoint,
        generation,
        index: 0,
    };
    for index in 0..MAX_PROBES {
        if index >= probes {
            break;
        }
        key.index = index;
        if TOKENS.remove(&key).is_ok() {
            return true;
        }
    }
    false
}

/// Counts a refusal (or what would have been one) for an outbound endpoint.
#[inline(always)]
fn count_enforcement(endpoint: &EndpointKey, refused: bool) {
    if let Some(stats) = endpoint_stats(endpoint) {
        // SAFETY: per-CPU value of this CPU; no other writer.
        let stats = unsafe { &mut *stats };
        if refused {
            stats.fast_failed += 1;
        } else {
            stats.would_fast_fail += 1;
        }
    }
}

/// A forwarded SYN to an endpoint whose circuit refuses: turn it into the RST a closed port
/// would send and deliver it back in through the same interface, so the sender's stack sees a
/// refusal. Returns the TC verdict if the packet was taken over.
///
/// Only `Refuse` verdicts apply here. In HALF_OPEN and under metrics-only policies forwarded
/// SYNs pass: a pod whose connect() was already admitted (and counted) by the cgroup hook in
/// its own namespace must not be checked, or counted, a second time on its way out.
#[inline(always)]
fn refuse_forwarded_syn(
    ctx: &TcContext,
    seg: &TcpSegment,
    conn: Option<&ConnState>,
) -> Option<i32> {
    let syn = seg.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN;
    // SAFETY: reading the context's socket pointer, which the verifier allows for TC.
    let local = unsafe { !(*ctx.skb.skb).__bindgen_anon_2.sk.is_null() };
    if !syn || local {
        return None;
    }
    // A retransmission of a SYN already let through belongs to that connection.
    if conn.is_some_and(|c| c.phase == Phase::SynSent as u32 && c.local_isn == seg.seq) {
        return None;
    }
    let endpoint = EndpointKey {
        addr: seg.dst,
        port: seg.dst_port,
        family: seg.family,
        direction: 0,
    };
    // SAFETY: a copy is taken at once.
    let verdict = unsafe { VERDICTS.get(&endpoint).copied() };
    if enforce::decide(verdict.as_ref(), now_ns()) != Decision::Refuse {
        return None;
    }
    count_enforcement(&endpoint, true);
    if seg.payload_len > 0 {
        // A SYN carrying data (TCP Fast Open): drop it; the sender retries without data and
        // that SYN gets the RST.
        return Some(TC_ACT_SHOT as i32);
    }
    match rewrite_into_rst(ctx, seg) {
        Some(()) => {
            // SAFETY: redirect this packet to the ingress of the interface it was leaving.
            unsafe { bpf_redirect((*ctx.skb.skb).ifindex, BPF_F_INGRESS as u64) };
            Some(TC_ACT_REDIRECT as i32)
        }
        None => Some(TC_ACT_SHOT as i32),
    }
}

/// Rewrites a SYN in place into the RST answering it: MACs, addresses and ports swapped,
/// sequence 0, acknowledging the SYN, flags RST|ACK, checksums updated.
#[inline(always)]
fn rewrite_into_rst(ctx: &TcContext, seg: &TcpSegment) -> Option<()> {
    let ip = seg.ip_offset as usize;
    let tcp = seg.tcp_offset as usize;
    let macs: [u8; 12] = ctx.load(0).ok()?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).ok()?;
    // A fresh hop budget: the RST travels back from here, not from where the SYN started.
    if seg.family == FAMILY_IPV4 {
        let old: u16 = ctx.load(ip + 8).ok()?; // TTL and protocol
        let new = u16::from_ne_bytes([RST_HOPS, old.to_ne_bytes()[1]]);
        ctx.store(ip + 8, &new, 0).ok()?;
        ctx.l3_csum_replace(ip + 10, old as u64, new as u64, 2)
            .ok()?;
    } else {
        ctx.store(ip + 7, &RST_HOPS, 0).ok()?;
    }
    // Swapping source and destination leaves the IP and pseudo-header sums unchanged.
    if seg.family == FAMILY_IPV4 {
        ctx.store(ip + 12, &seg.dst[..4].try_into().unwrap_or([0u8; 4]), 0)
            .ok()?;
        ctx.store(ip + 16, &seg.src[..4].try_into().unwrap_or([0u8; 4]), 0)
            .ok()?;
    } else {
        ctx.store(ip + 8, &seg.dst, 0).ok()?;
        ctx.store(ip + 24, &seg.src, 0).ok()?;
    }
    let ports: [u8; 4] = ctx.load(tcp).ok()?;
    ctx.store(tcp, &[ports[2], ports[3], ports[0], ports[1]], 0)
        .ok()?;
    let (seq, ack, flags) = enforce::rst_for_syn(seg.seq, seg.payload_len);
    let csum = tcp + 16;
    let old_seq: u32 = ctx.load(tcp + 4).ok()?;
    let old_ack: u32 = ctx.load(tcp + 8).ok()?;
    let old_word: u16 = ctx.load(tcp + 12).ok()?;
    let new_seq = seq.to_be();
    let new_ack = ack.to_be();
    let offset_byte = (old_word.to_ne_bytes())[0];
    let new_word = u16::from_ne_bytes([offset_byte, flags]);
    ctx.store(tcp + 4, &new_seq, 0).ok()?;
    ctx.store(tcp + 8, &new_ack, 0).ok()?;
    ctx.store(tcp + 12, &new_word, 0).ok()?;
    ctx.l4_csum_replace(csum, old_seq as u64, new_seq as u64, 4)
        .ok()?;
    ctx.l4_csum_replace(csum, old_ack as u64, new_ack as u64, 4)
        .ok()?;
    ctx.l4_csum_replace(csum, old_word as u64, new_word as u64, 2)
        .ok()?;
    Some(())
}

#[inline(always)]
fn observe(ctx: &TcContext, way: Way) -> i32 {
    match parse_ethernet(&Skb(ctx)) {
        Parsed::Tcp(segment) => {
            let key = track::conn_key(&segment, way);
            let conn = CONNECTIONS.get_ptr_mut(&key);
            // SAFETY: the pointer comes from a map lookup and is only read here.
            let current = conn.map(|p| unsafe { *p });
            if way == Way::Egress {
                if let Some(action) = refuse_forwarded_syn(ctx, &segment, current.as_ref()) {
                    return action;
                }
            }
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
    // "No opinion": under TCX the next program runs (TCX_NEXT), with classic filters the
    // next filter; resil's observers never end the chain for others.
    TC_ACT_UNSPEC
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
    let Some(stats) = endpoint_stats(&key.endpoint(effects.direction)) else {
        warn!(ctx, "resil: endpoint map insert failed");
        return;
    };
    // SAFETY: per-CPU value of this CPU; no other writer.
    track::count_into(unsafe { &mut *stats }, effects);
}

/// This CPU's counters of an endpoint, created (stamped with the time) if new.
#[inline(always)]
fn endpoint_stats(endpoint: &EndpointKey) -> Option<*mut EndpointStats> {
    if let Some(stats) = ENDPOINTS.get_ptr_mut(endpoint) {
        return Some(stats);
    }
    // A new endpoint: create it (another CPU may win the race; then ours fails harmlessly).
    let fresh = EndpointStats {
        created_ns: now_ns(),
        ..EndpointStats::ZERO
    };
    let _ = ENDPOINTS.insert(endpoint, &fresh, NOEXIST);
    let stats = ENDPOINTS.get_ptr_mut(endpoint);
    if stats.is_none() {
        bump(Health::EndpointInsertFailed);
    }
    stats
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
