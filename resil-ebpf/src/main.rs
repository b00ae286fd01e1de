//! resil's BPF programs. Thin by design: parse (shared parser in `resil-common`), look up the
//! connection, apply the shared tracking step, count, and emit at most one event per handshake
//! step or DNS message. Nothing here logs per packet.
//!
//! Ingress is observed at XDP (before the stack spends anything on a packet, and where inbound
//! SYNs can be shed), egress at TC; the cgroup connect hooks refuse local connect()s.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        BPF_F_INGRESS, BPF_F_NO_PREALLOC, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::{
        bpf_ktime_get_ns, bpf_redirect, bpf_set_retval, bpf_xdp_get_buff_len, bpf_xdp_load_bytes,
        bpf_xdp_store_bytes,
    },
    macros::{cgroup_sock_addr, classifier, map, xdp},
    maps::{HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, TcContext, XdpContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use resil_common::{
    enforce::{self, Decision},
    maps::{
        ConnKey, ConnState, Direction, DnsEvent, DnsKind, DnsQueryKey, EndpointKey, EndpointStats,
        HandshakeEvent, Health, SavedBreaker, TokenKey, Verdict, DNS_CAPTURE, DNS_PORT,
        DNS_RING_BYTES, FAMILY_IPV4, HANDSHAKE_RING_BYTES, HEALTH_SLOTS, MAX_CONNECTIONS,
        MAX_DNS_QUERIES, MAX_ENDPOINTS, MAX_PROBES, MAX_SAVED_BREAKERS, MAX_TOKENS, MAX_VERDICTS,
    },
    packet::{parse_ethernet, PacketBytes, Parsed, QuotedFlow, TcpSegment, UdpDatagram},
    rst::{self, PacketWrite, RST_HOPS},
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
static DNS: RingBuf = RingBuf::with_byte_size(DNS_RING_BYTES, 0);

#[map]
static DNS_QUERIES: LruHashMap<DnsQueryKey, u8> = LruHashMap::with_max_entries(MAX_DNS_QUERIES, 0);

#[map]
static HEALTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(HEALTH_SLOTS, 0);

/// Not preallocated: an update then replaces the element instead of rewriting it in place, so
/// a program reading a verdict never sees half of an old one and half of a new one.
#[map]
static VERDICTS: HashMap<EndpointKey, Verdict> =
    HashMap::with_max_entries(MAX_VERDICTS, BPF_F_NO_PREALLOC);

#[map]
static TOKENS: HashMap<TokenKey, u8> = HashMap::with_max_entries(MAX_TOKENS, 0);

/// The daemon's breaker snapshot: no program reads it; it lives here to be pinned with the rest.
#[map]
static BREAKERS: HashMap<EndpointKey, SavedBreaker> =
    HashMap::with_max_entries(MAX_SAVED_BREAKERS, BPF_F_NO_PREALLOC);

const ECONNREFUSED: i32 = 111;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
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

/// The XDP frame as a [`PacketBytes`] source: every read and write goes through a kernel
/// helper that checks the bounds (and follows multi-buffer frames).
struct Frame<'a>(&'a XdpContext);

impl PacketBytes for Frame<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        // SAFETY: the helper writes at most N bytes into `out`.
        let r = unsafe {
            bpf_xdp_load_bytes(
                self.0.ctx,
                offset as u32,
                out.as_mut_ptr() as *mut c_void,
                N as u32,
            )
        };
        (r == 0).then_some(out)
    }

    #[inline(always)]
    fn total_len(&self) -> usize {
        // SAFETY: a helper reading the context it is given.
        unsafe { bpf_xdp_get_buff_len(self.0.ctx) as usize }
    }
}

impl PacketWrite for Frame<'_> {
    #[inline(always)]
    fn write<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Option<()> {
        // SAFETY: the helper reads N bytes from `bytes` and checks the frame's bounds.
        let r = unsafe {
            bpf_xdp_store_bytes(
                self.0.ctx,
                offset as u32,
                bytes.as_ptr() as *mut c_void,
                N as u32,
            )
        };
        (r == 0).then_some(())
    }
}

/// Observes packets arriving on the interface, and sheds inbound SYNs to local services the
/// daemon marked for shedding (answered at once with a RST).
///
/// Each step is a call of its own, made from here: the verifier adds up the stack frames of a
/// call chain, and parsing, shedding and tracking each need a good part of the 512 bytes.
#[xdp]
pub fn resil_xdp_ingress(ctx: XdpContext) -> u32 {
    let mut found = Found::default();
    let kind = parse_frame(&Frame(&ctx), &mut found);
    // SAFETY (each union read below): `parse_frame` wrote the variant its kind names.
    match kind {
        FRAME_TCP => {
            let segment = unsafe { &found.tcp };
            if let Some(action) = shed_syn(&ctx, segment) {
                return action;
            }
            ingress_tcp(&ctx, segment);
        }
        FRAME_UNREACHABLE => ingress_unreachable(&ctx, unsafe { &found.flow }),
        FRAME_UDP if unsafe { found.udp.src_port } == DNS_PORT => {
            let datagram = unsafe { &found.udp };
            // Only answers to queries in flight: a flood of others cannot crowd them out.
            if !answers_a_query(&ctx, datagram) {
                return XDP_PASS;
            }
            dns_event(datagram, Way::Ingress, |message, len| {
                // SAFETY: `message` has room for DNS_CAPTURE bytes and 1 <= len <= DNS_CAPTURE.
                let copied = unsafe {
                    bpf_xdp_load_bytes(
                        ctx.ctx,
                        datagram.payload_offset,
                        message as *mut c_void,
                        len as u32,
                    ) == 0
                };
                if copied {
                    len as u16
                } else {
                    0
                }
            });
        }
        FRAME_MALFORMED => bump(Health::Malformed),
        _ => {}
    }
    XDP_PASS
}

/// What [`parse_frame`] found, in one stack slot for all kinds. (The parser's enum cannot
/// cross a BPF-to-BPF call: copying its unused bytes reads stack the verifier knows is
/// unwritten.)
#[repr(C)]
union Found {
    tcp: TcpSegment,
    udp: UdpDatagram,
    flow: QuotedFlow,
}

impl Default for Found {
    fn default() -> Self {
        Found {
            tcp: TcpSegment::default(),
        }
    }
}

/// Kinds of [`Found`], as [`parse_frame`] returns them.
const FRAME_OTHER: u32 = 0;
const FRAME_TCP: u32 = 1;
const FRAME_UDP: u32 = 2;
const FRAME_UNREACHABLE: u32 = 3;
const FRAME_MALFORMED: u32 = 4;

/// Parses the frame, filling in the one result that applies.
#[inline(never)]
fn parse_frame<P: PacketBytes>(bytes: &P, found: &mut Found) -> u32 {
    match parse_ethernet(bytes) {
        Parsed::Tcp(tcp) => {
            *found = Found { tcp };
            FRAME_TCP
        }
        Parsed::Udp(udp) => {
            *found = Found { udp };
            FRAME_UDP
        }
        Parsed::Unreachable(flow) => {
            *found = Found { flow };
            FRAME_UNREACHABLE
        }
        Parsed::Malformed => FRAME_MALFORMED,
        Parsed::Other => FRAME_OTHER,
    }
}

/// One arriving TCP segment, tracked.
#[inline(never)]
fn ingress_tcp(ctx: &XdpContext, segment: &TcpSegment) {
    let key = track::conn_key(segment, Way::Ingress);
    let conn = CONNECTIONS.get_ptr_mut(&key);
    // SAFETY: the pointer comes from a map lookup and is only read here.
    let current = conn.map(|p| unsafe { *p });
    let effects = track::on_tcp(current.as_ref(), segment, Way::Ingress, now_ns());
    apply(ctx, &key, conn, current.as_ref(), &effects);
}

/// An ICMP unreachable quoting one of our connections.
#[inline(never)]
fn ingress_unreachable(ctx: &XdpContext, flow: &QuotedFlow) {
    let key = track::quoted_conn_key(flow);
    let conn = CONNECTIONS.get_ptr_mut(&key);
    // SAFETY: as above.
    let current = conn.map(|p| unsafe { *p });
    let effects = track::on_unreachable(current.as_ref(), flow);
    apply(ctx, &key, conn, current.as_ref(), &effects);
}

/// Observes packets leaving through the interface, and refuses forwarded SYNs to endpoints
/// whose circuit is open (local sockets are refused earlier, by the connect hooks).
#[classifier]
pub fn resil_tc_egress(ctx: TcContext) -> i32 {
    let mut found = Found::default();
    let kind = parse_frame(&Skb(&ctx), &mut found);
    // SAFETY (each union read below): `parse_frame` wrote the variant its kind names.
    match kind {
        FRAME_TCP => {
            let segment = unsafe { &found.tcp };
            if let Some(action) = refuse_forwarded_syn(&ctx, segment) {
                return action;
            }
            egress_tcp(&ctx, segment);
        }
        FRAME_UDP if unsafe { found.udp.dst_port } == DNS_PORT => {
            let datagram = unsafe { &found.udp };
            // A query: its id (the first two bytes) is all the daemon needs.
            let Ok(id) = ctx.load::<[u8; 2]>(datagram.payload_offset as usize) else {
                return TC_ACT_UNSPEC;
            };
            let key = dns_query_key(datagram, Way::Egress, id);
            let _ = DNS_QUERIES.insert(&key, &1, 0);
            dns_event(datagram, Way::Egress, |message, _| {
                // SAFETY: `message` has room for DNS_CAPTURE >= 2 bytes.
                unsafe { core::ptr::write_unaligned(message as *mut [u8; 2], id) };
                2
            });
        }
        FRAME_MALFORMED => bump(Health::Malformed),
        _ => {}
    }
    // "No opinion": under TCX the next program runs (TCX_NEXT), with classic filters the
    // next filter; resil's observer never ends the chain for others.
    TC_ACT_UNSPEC
}

/// One leaving TCP segment, tracked.
#[inline(never)]
fn egress_tcp(ctx: &TcContext, segment: &TcpSegment) {
    let key = track::conn_key(segment, Way::Egress);
    let conn = CONNECTIONS.get_ptr_mut(&key);
    // SAFETY: the pointer comes from a map lookup and is only read here.
    let current = conn.map(|p| unsafe { *p });
    let effects = track::on_tcp(current.as_ref(), segment, Way::Egress, now_ns());
    apply(ctx, &key, conn, current.as_ref(), &effects);
}

/// Whether a SYN repeats one already let through: it belongs to that connection.
#[inline(always)]
fn repeats_admitted_syn(seg: &TcpSegment, way: Way) -> bool {
    let key = track::conn_key(seg, way);
    // SAFETY: a copy is taken at once.
    let conn = unsafe { CONNECTIONS.get(&key).copied() };
    track::repeats_opening_syn(conn.as_ref(), seg, way)
}

/// The in-flight key of a DNS message crossing `way` with message id `id`.
#[inline(always)]
fn dns_query_key(datagram: &UdpDatagram, way: Way, id: [u8; 2]) -> DnsQueryKey {
    DnsQueryKey {
        conn: track::flow_key(
            datagram.family,
            &datagram.src,
            &datagram.dst,
            datagram.src_port,
            datagram.dst_port,
            way,
        ),
        id: u16::from_be_bytes(id),
        _pad: [0; 6],
    }
}

/// Whether an arriving DNS message answers a query in flight (which it then settles).
#[inline(never)]
fn answers_a_query(ctx: &XdpContext, datagram: &UdpDatagram) -> bool {
    let Some(id) = Frame(ctx).read::<2>(datagram.payload_offset as usize) else {
        return false;
    };
    DNS_QUERIES
        .remove(&dns_query_key(datagram, Way::Ingress, id))
        .is_ok()
}

/// Emits one DNS event for a datagram to or from port 53. `capture` copies at most `len` bytes
/// of the message into the record (1 <= len <= DNS_CAPTURE) and returns how many it copied.
#[inline(never)]
fn dns_event(datagram: &UdpDatagram, way: Way, capture: impl FnOnce(*mut u8, usize) -> u16) {
    let Some(mut entry) = DNS.reserve::<DnsEvent>(0) else {
        bump(Health::DnsEventsLost);
        return;
    };
    let event = entry.as_mut_ptr();
    let mut len = datagram.payload_len as usize;
    if len > DNS_CAPTURE {
        len = DNS_CAPTURE;
    }
    let kind = match way {
        Way::Egress => DnsKind::Query,
        Way::Ingress => DnsKind::Answer,
    };
    // SAFETY: `event` points to a reserved record of the right size; every field is written
    // before it is submitted.
    unsafe {
        (*event).ts_ns = now_ns();
        (*event).conn = track::flow_key(
            datagram.family,
            &datagram.src,
            &datagram.dst,
            datagram.src_port,
            datagram.dst_port,
            way,
        );
        (*event).kind = kind as u8;
        (*event)._pad = 0;
        (*event)._pad2 = [0; 4];
        (*event).len = if len > 0 {
            capture((*event).message.as_mut_ptr(), len)
        } else {
            0
        };
    }
    entry.submit(0);
}

/// An inbound SYN to a local service whose verdict refuses: answer it with a RST from here
/// (XDP_TX), so the client learns at once instead of queueing and timing out. Returns the
/// XDP verdict if the frame was taken over.
#[inline(never)]
fn shed_syn(ctx: &XdpContext, seg: &TcpSegment) -> Option<u32> {
    if !track::is_bare_syn(seg) || repeats_admitted_syn(seg, Way::Ingress) {
        return None;
    }
    let service = EndpointKey {
        addr: seg.dst,
        port: seg.dst_port,
        family: seg.family,
        direction: Direction::Inbound as u8,
    };
    // SAFETY: a copy is taken at once.
    let verdict = unsafe { VERDICTS.get(&service).copied() };
    match enforce::decide(verdict.as_ref(), now_ns()) {
        Decision::Refuse => {}
        Decision::WouldRefuse => {
            count_enforcement(&service, false);
            return None;
        }
        // A shed service being probed: one connection gets through.
        Decision::TakeToken { generation, probes } => {
            if take_token(&service, generation, probes) {
                return None;
            }
        }
        Decision::Allow => return None,
    }
    count_enforcement(&service, true);
    if seg.payload_len > 0 {
        return Some(XDP_DROP); // TCP Fast Open: the client retries without data
    }
    match rst::syn_into_rst(&Frame(ctx), seg) {
        Some(()) => Some(XDP_TX),
        None => Some(XDP_DROP),
    }
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

/// Counts a refusal (or what would have been one) for an endpoint.
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
#[inline(never)]
fn refuse_forwarded_syn(ctx: &TcContext, seg: &TcpSegment) -> Option<i32> {
    // SAFETY: reading the context's socket pointer, which the verifier allows for TC.
    let local = unsafe { !(*ctx.skb.skb).__bindgen_anon_2.sk.is_null() };
    if !track::is_bare_syn(seg) || local || repeats_admitted_syn(seg, Way::Egress) {
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
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn apply<C: EbpfContext>(
    ctx: &C,
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
fn count_for_endpoint<C: EbpfContext>(ctx: &C, key: &ConnKey, effects: &Effects) {
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
