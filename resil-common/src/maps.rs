//! Layouts of the BPF maps and ring-buffer records, shared by kernel and daemon.
//!
//! All types are `#[repr(C)]` with explicit padding so both sides agree byte for byte.

/// Map names, as the daemon finds them in the object.
pub mod names {
    /// LRU hash: [`super::ConnKey`] → [`super::ConnState`].
    pub const CONNECTIONS: &str = "CONNECTIONS";
    /// LRU per-CPU hash: [`super::EndpointKey`] → [`super::EndpointStats`].
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// Ring buffer of [`super::HandshakeEvent`].
    pub const HANDSHAKES: &str = "HANDSHAKES";
    /// Per-CPU array of `u64` indexed by [`super::Health`].
    pub const HEALTH: &str = "HEALTH";
    /// Hash: [`super::EndpointKey`] → [`super::Verdict`], written by the daemon.
    pub const VERDICTS: &str = "VERDICTS";
    /// Hash: [`super::TokenKey`] → `u8`: half-open probe tokens, taken by deleting them.
    pub const TOKENS: &str = "TOKENS";
    /// Ring buffer of [`super::DnsEvent`]: DNS queries leaving and answers arriving.
    pub const DNS: &str = "DNS";
    /// LRU hash: [`super::DnsQueryKey`] → `u8`: queries in flight, so only their answers are
    /// reported.
    pub const DNS_QUERIES: &str = "DNS_QUERIES";
    /// Hash: [`super::EndpointKey`] → [`super::SavedBreaker`]: breaker state only the daemon
    /// uses, kept in the kernel (pinned) so a restarted daemon finds its open circuits.
    pub const BREAKERS: &str = "BREAKERS";
}

/// Capacity of the connection map (LRU: the least recently used entries make room).
pub const MAX_CONNECTIONS: u32 = 65_536;
/// Capacity of the endpoint map (LRU).
pub const MAX_ENDPOINTS: u32 = 8_192;
/// Size of the handshake ring buffer in bytes (a power of two, a multiple of the page size).
pub const HANDSHAKE_RING_BYTES: u32 = 1 << 20;
/// Size of the DNS ring buffer in bytes.
pub const DNS_RING_BYTES: u32 = 1 << 20;
/// DNS message bytes an answer event carries (the classic UDP maximum; longer answers are
/// cut, which loses only their last records).
pub const DNS_CAPTURE: usize = 512;
/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// DNS queries in flight the kernel remembers (LRU: the oldest make room).
pub const MAX_DNS_QUERIES: u32 = 16_384;

/// Capacity of the verdict map: endpoints the kernel can enforce at once.
pub const MAX_VERDICTS: u32 = 16_384;
/// Capacity of the probe-token map.
pub const MAX_TOKENS: u32 = 65_536;
/// Capacity of the saved-breaker map: circuits a restart remembers (those not plainly closed).
pub const MAX_SAVED_BREAKERS: u32 = 16_384;
/// Bytes of one saved breaker's record (the daemon's own encoding).
pub const SAVED_BREAKER_BYTES: usize = 380;

/// Half-open probes one endpoint can have at once (the kernel tries this many tokens).
pub const MAX_PROBES: u32 = 64;

/// `AF_INET`.
pub const FAMILY_IPV4: u8 = 2;
/// `AF_INET6`.
pub const FAMILY_IPV6: u8 = 10;

/// Which side opened a connection, seen from this node.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This node connected out to a remote endpoint.
    Outbound = 0,
    /// A remote client connected to a local service.
    Inbound = 1,
}

impl Direction {
    /// Decodes the byte stored in maps; anything unknown reads as outbound.
    pub fn from_u8(value: u8) -> Self {
        if value == Direction::Inbound as u8 {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }
}

/// A TCP connection, always oriented from this node: `local` is the node's address.
/// IPv4 addresses occupy the first 4 bytes of the 16, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

impl ConnKey {
    /// The endpoint this connection's outcomes are counted for: the remote address and port
    /// for outbound connections, the local service for inbound ones.
    #[inline(always)]
    pub fn endpoint(&self, direction: Direction) -> EndpointKey {
        match direction {
            Direction::Outbound => EndpointKey {
                addr: self.remote_addr,
                port: self.remote_port,
                family: self.family,
                direction: Direction::Outbound as u8,
            },
            Direction::Inbound => EndpointKey {
                addr: self.local_addr,
                port: self.local_port,
                family: self.family,
                direction: Direction::Inbound as u8,
            },
        }
    }
}

/// Handshake phase of a tracked connection.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Outbound SYN sent, no answer yet.
    SynSent = 1,
    /// Inbound SYN received, handshake not completed.
    SynReceived = 2,
    /// Handshake completed.
    Established = 3,
}

/// Per-connection state kept in the kernel's LRU map.
///
/// Each field has one writer side so that the ingress and egress programs, which may run on
/// different CPUs for the same connection, never overwrite each other's updates: the
/// "egress" fields change only on packets this node sends, the "ingress" ones only on packets
/// it receives. (Creation and deletion replace or drop the whole entry.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnState {
    /// `bpf_ktime_get_ns` of the first SYN.
    pub syn_ns: u64,
    /// A [`Phase`]; ingress.
    pub phase: u32,
    /// This node's initial sequence number; egress (or creation).
    pub local_isn: u32,
    /// The peer's initial sequence number; ingress (or creation).
    pub remote_isn: u32,
    /// Sequence number after the highest byte this node has sent; egress.
    pub snd_next: u32,
    /// Highest acknowledgement number this node has sent; egress.
    pub ack_sent: u32,
    /// Sequence number after the highest byte the peer has sent; ingress.
    pub rcv_next: u32,
    /// A [`Direction`] as a byte; set at creation.
    pub direction: u8,
    /// [`local_flags`] bits; egress.
    pub local_flags: u8,
    /// [`peer_flags`] bits; ingress.
    pub peer_flags: u8,
    /// The TTL (hop limit) the peer's packets arrive with, learned from its SYN-ACK (or SYN);
    /// ingress. A reset arriving with another one was sent by something on the path.
    pub peer_ttl: u8,
    pub _pad: [u8; 4],
}

/// Bits of [`ConnState::local_flags`].
pub mod local_flags {
    /// `snd_next` holds a real value.
    pub const SND_KNOWN: u8 = 1;
    /// `ack_sent` holds a real value.
    pub const ACK_KNOWN: u8 = 2;
    /// This node sent a FIN.
    pub const FIN: u8 = 4;
}

/// Bits of [`ConnState::peer_flags`].
pub mod peer_flags {
    /// `rcv_next` holds a real value.
    pub const RCV_KNOWN: u8 = 1;
    /// The peer has sent payload.
    pub const DATA: u8 = 2;
    /// The peer sent a FIN.
    pub const FIN: u8 = 4;
    /// An ICMP unreachable for this handshake was already counted (after a soft error the
    /// kernel retries the SYN and may draw another).
    pub const UNREACHABLE_SEEN: u8 = 8;
}

/// A remote endpoint (outbound) or a local service (inbound).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct EndpointKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    /// A [`Direction`] as a byte.
    pub direction: u8,
}

/// Counters per endpoint, one copy per CPU; the daemon sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointStats {
    /// Connection attempts (first SYN of a connection).
    pub attempts: u64,
    /// Handshakes completed.
    pub established: u64,
    /// Handshakes answered with a RST.
    pub refused: u64,
    /// Resets received on established connections (before either side closed).
    pub resets_in: u64,
    /// Resets sent on established connections (before either side closed).
    pub resets_out: u64,
    /// Retransmitted SYNs (or SYN-ACKs for inbound connections).
    pub syn_retransmits: u64,
    /// Retransmitted data segments, either direction.
    pub retransmits: u64,
    /// ICMP or ICMPv6 destination-unreachable messages for tracked connections.
    pub unreachable: u64,
    /// Connections refused by resil (connect() failed at once, or a forwarded SYN answered
    /// with a RST).
    pub fast_failed: u64,
    /// Connections a metrics-only policy would have refused.
    pub would_fast_fail: u64,
    /// Data segments on established connections, either direction (the base of the
    /// retransmission rate).
    pub segments: u64,
    /// Established connections that ended (both FINs, or a reset).
    pub closed: u64,
    /// Resets received (counted in `resets_in` too) whose TTL differs from the peer's: sent by
    /// a middlebox on the path, not by the peer.
    pub path_resets: u64,
    /// `bpf_ktime_get_ns` when the kernel created this entry (on the creating CPU's copy;
    /// the others hold 0). A new value means the LRU evicted the endpoint and it came back.
    pub created_ns: u64,
}

/// Calls `$f!(field)` for each counter of [`EndpointStats`] (every field but `created_ns`).
macro_rules! each_counter {
    ($f:ident) => {
        $f!(attempts);
        $f!(established);
        $f!(refused);
        $f!(resets_in);
        $f!(resets_out);
        $f!(syn_retransmits);
        $f!(retransmits);
        $f!(unreachable);
        $f!(fast_failed);
        $f!(would_fast_fail);
        $f!(segments);
        $f!(closed);
        $f!(path_resets);
    };
}

impl EndpointStats {
    /// All counters zero.
    pub const ZERO: EndpointStats = EndpointStats {
        attempts: 0,
        established: 0,
        refused: 0,
        resets_in: 0,
        resets_out: 0,
        syn_retransmits: 0,
        retransmits: 0,
        unreachable: 0,
        fast_failed: 0,
        would_fast_fail: 0,
        segments: 0,
        closed: 0,
        path_resets: 0,
        created_ns: 0,
    };

    /// Adds `other`'s counters to these (`created_ns` is left alone).
    pub fn add(&mut self, other: &EndpointStats) {
        macro_rules! add {
            ($field:ident) => {
                self.$field += other.$field;
            };
        }
        each_counter!(add);
    }

    /// What was counted since the reading `earlier`, counter by counter. A counter below its
    /// earlier value started again from zero (the kernel entry was evicted and recreated), so
    /// all of it is new.
    pub fn since(&self, earlier: &EndpointStats) -> EndpointStats {
        let mut delta = EndpointStats {
            created_ns: self.created_ns,
            ..EndpointStats::ZERO
        };
        macro_rules! since {
            ($field:ident) => {
                delta.$field = if self.$field >= earlier.$field {
                    self.$field - earlier.$field
                } else {
                    self.$field
                };
            };
        }
        each_counter!(since);
        delta
    }
}

/// What the kernel does with new connections to an endpoint, until `expires_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Verdict {
    /// `bpf_ktime_get_ns` after which the verdict no longer applies: a daemon that stops
    /// refreshing it (crash, kill -9, hang) can never keep traffic blocked.
    pub expires_ns: u64,
    /// A [`VerdictAction`].
    pub action: u32,
    /// Half-open: the generation whose tokens to take.
    pub generation: u32,
    /// Half-open: how many tokens were handed out (at most [`MAX_PROBES`]).
    pub probes: u32,
    pub _pad: u32,
}

/// One circuit's state as the daemon saved it: `len` bytes of its own encoding. The kernel only
/// keeps it (the programs never read it) so that it outlives a daemon restart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SavedBreaker {
    /// Bytes of `bytes` in use.
    pub len: u32,
    /// The record.
    pub bytes: [u8; SAVED_BREAKER_BYTES],
}

/// Values of [`Verdict::action`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictAction {
    /// Refuse every new connection (OPEN, FORCED_OPEN).
    Refuse = 1,
    /// Admit only holders of a probe token (HALF_OPEN).
    Probe = 2,
    /// Admit, but count what would have been refused (metrics-only OPEN).
    Observe = 3,
}

/// One half-open probe token.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TokenKey {
    pub endpoint: EndpointKey,
    pub generation: u32,
    pub index: u32,
}

/// Kinds of [`HandshakeEvent`]: one `Started` and at most one outcome per outbound handshake.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeKind {
    /// The first SYN left.
    Started = 1,
    /// SYN-ACK arrived; `latency_ns` is set.
    Established = 2,
    /// RST answered the SYN.
    Refused = 3,
    /// ICMP destination unreachable answered the SYN.
    Unreachable = 4,
    /// The peer reset the connection before sending any data.
    ResetBeforeReply = 5,
}

impl HandshakeKind {
    /// Decodes the byte in a ring-buffer record.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Started,
            2 => Self::Established,
            3 => Self::Refused,
            4 => Self::Unreachable,
            5 => Self::ResetBeforeReply,
            _ => return None,
        })
    }
}

/// One ring-buffer record per handshake step, never per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HandshakeEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the kernel saw it.
    pub ts_ns: u64,
    /// SYN to SYN-ACK, for `Established`.
    pub latency_ns: u64,
    pub conn: ConnKey,
    /// A [`HandshakeKind`] as a byte.
    pub kind: u8,
    pub _pad: [u8; 7],
}

/// A DNS query in flight: its flow (oriented from this node) and message id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DnsQueryKey {
    pub conn: ConnKey,
    pub id: u16,
    pub _pad: [u8; 6],
}

/// Kinds of [`DnsEvent`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsKind {
    /// A query left this node for a resolver.
    Query = 1,
    /// An answer arrived from a resolver.
    Answer = 2,
}

impl DnsKind {
    /// Decodes the byte in a ring-buffer record.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Query),
            2 => Some(Self::Answer),
            _ => None,
        }
    }
}

/// One ring-buffer record per DNS message over UDP: the daemon pairs answers with queries by
/// the flow and the message id, and reads names from the answer's bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsEvent {
    /// `bpf_ktime_get_ns` when the kernel saw it.
    pub ts_ns: u64,
    /// Oriented from this node: `remote` is the resolver.
    pub conn: ConnKey,
    /// A [`DnsKind`] as a byte.
    pub kind: u8,
    pub _pad: u8,
    /// How many bytes of `message` are valid (2 for queries: their id).
    pub len: u16,
    /// The message's first bytes, for answers.
    pub message: [u8; DNS_CAPTURE],
    pub _pad2: [u8; 4],
}

/// Indices of the per-CPU `HEALTH` counters: rare conditions the daemon reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// A connection could not be inserted into the connection map.
    ConnInsertFailed = 0,
    /// An endpoint could not be inserted into the endpoint map.
    EndpointInsertFailed = 1,
    /// A handshake event was dropped because the ring buffer was full.
    EventsLost = 2,
    /// A TCP, UDP or ICMP packet whose headers were truncated or malformed.
    Malformed = 3,
    /// A DNS event was dropped because its ring buffer was full.
    DnsEventsLost = 4,
}

/// Number of `HEALTH` slots.
pub const HEALTH_SLOTS: u32 = 5;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ConnState {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointStats {}
    unsafe impl aya::Pod for super::HandshakeEvent {}
    unsafe impl aya::Pod for super::Verdict {}
    unsafe impl aya::Pod for super::TokenKey {}
    unsafe impl aya::Pod for super::DnsEvent {}
    unsafe impl aya::Pod for super::SavedBreaker {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn deltas_and_sums_cover_every_counter() {
        let earlier = EndpointStats {
            attempts: 5,
            closed: 2,
            ..EndpointStats::ZERO
        };
        let now = EndpointStats {
            attempts: 8,
            closed: 1, // evicted and counted again from zero
            segments: 4,
            created_ns: 9,
            ..EndpointStats::ZERO
        };
        let delta = now.since(&earlier);
        assert_eq!((delta.attempts, delta.closed, delta.segments), (3, 1, 4));
        assert_eq!(delta.created_ns, 9);
        let mut total = earlier;
        total.add(&delta);
        assert_eq!(
            (
                total.attempts,
                total.closed,
                total.segments,
                total.created_ns
            ),
            (8, 3, 4, 0)
        );
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ConnKey>(), 40);
        assert_eq!(size_of::<ConnState>(), 40);
        assert_eq!(size_of::<EndpointKey>(), 20);
        assert_eq!(size_of::<EndpointStats>(), 8 * 14);
        assert_eq!(size_of::<DnsEvent>(), 8 + 40 + 4 + DNS_CAPTURE + 4);
        assert_eq!(size_of::<DnsQueryKey>(), 48);
        assert_eq!(size_of::<Verdict>(), 24);
        assert_eq!(size_of::<TokenKey>(), 28);
        assert_eq!(size_of::<HandshakeEvent>(), 64);
    }
}
