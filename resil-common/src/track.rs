//! The per-connection tracking step: given a connection's state and one packet, what changes
//! and what to count. Pure, so the kernel runs it per packet and the host unit-tests it.
//!
//! The rules follow what the kernel's own TCP would accept: a SYN is a retransmission only
//! if it repeats the initial sequence number, a RST refuses a handshake only if it
//! acknowledges our SYN, a RST on an established connection must fall near the expected
//! sequence number, and resets after either side closed are teardown, not failures.

use crate::maps::{
    local_flags, peer_flags, ConnKey, ConnState, Direction, EndpointStats, HandshakeKind, Phase,
};
use crate::packet::{tcp_flags, QuotedFlow, TcpSegment};

/// Which way a packet crossed the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Leaving this node.
    Egress,
    /// Arriving at this node.
    Ingress,
}

/// Counter bits of [`Effects::counters`], one per [`EndpointStats`] field.
pub mod count {
    pub const ATTEMPT: u16 = 1 << 0;
    pub const ESTABLISHED: u16 = 1 << 1;
    pub const REFUSED: u16 = 1 << 2;
    pub const RESET_IN: u16 = 1 << 3;
    pub const RESET_OUT: u16 = 1 << 4;
    pub const SYN_RETRANSMIT: u16 = 1 << 5;
    pub const RETRANSMIT: u16 = 1 << 6;
    pub const UNREACHABLE: u16 = 1 << 7;
    pub const SEGMENT: u16 = 1 << 8;
    pub const CLOSED: u16 = 1 << 9;
    pub const PATH_RESET: u16 = 1 << 10;
}

/// How far from the expected sequence number an incoming RST may be and still count
/// (a blind or stale RST is further off; RFC 5961 asks for an exact match, but packets
/// reordered or lost before TC are not seen).
const RST_WINDOW: u32 = 1 << 20;

/// What to do with the connection's map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// Leave it as it is.
    Keep,
    /// A new connection: store this state in place of anything there.
    Insert(ConnState),
    /// Store the fields that differ from the state read (each has one writer side).
    Write(ConnState),
    /// Forget the connection.
    Delete,
}

/// Everything one packet causes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Effects {
    /// [`count`] bits to add to the connection's endpoint.
    pub counters: u16,
    /// Whose endpoint the counters belong to.
    pub direction: Direction,
    /// Handshake latency in ns when `counters` has [`count::ESTABLISHED`].
    pub latency_ns: u64,
    /// A handshake event to emit (outbound connections only).
    pub event: Option<HandshakeKind>,
    /// The connection entry's fate.
    pub update: Update,
}

impl Effects {
    /// No effect at all.
    pub const NOTHING: Effects = Effects {
        counters: 0,
        direction: Direction::Outbound,
        latency_ns: 0,
        event: None,
        update: Update::Keep,
    };

    fn counting(counters: u16, direction: Direction, update: Update) -> Self {
        Effects {
            counters,
            direction,
            update,
            ..Self::NOTHING
        }
    }
}

/// Adds what `effects` counts to an endpoint's counters (the kernel does this on its per-CPU
/// copy).
#[inline(always)]
pub fn count_into(stats: &mut EndpointStats, effects: &Effects) {
    let c = effects.counters;
    stats.attempts += (c & count::ATTEMPT != 0) as u64;
    stats.established += (c & count::ESTABLISHED != 0) as u64;
    stats.refused += (c & count::REFUSED != 0) as u64;
    stats.resets_in += (c & count::RESET_IN != 0) as u64;
    stats.resets_out += (c & count::RESET_OUT != 0) as u64;
    stats.syn_retransmits += (c & count::SYN_RETRANSMIT != 0) as u64;
    stats.retransmits += (c & count::RETRANSMIT != 0) as u64;
    stats.unreachable += (c & count::UNREACHABLE != 0) as u64;
    stats.segments += (c & count::SEGMENT != 0) as u64;
    stats.closed += (c & count::CLOSED != 0) as u64;
    stats.path_resets += (c & count::PATH_RESET != 0) as u64;
}

/// Writes into `*dst` the fields in which `new` differs from `old` (the state the decision was
/// made on), leaving fields another CPU may be updating alone.
///
/// # Safety
/// `dst` must point to a live `ConnState`.
#[inline(always)]
pub unsafe fn write_changes(dst: *mut ConnState, old: &ConnState, new: &ConnState) {
    macro_rules! changed {
        ($($field:ident),*) => {$(
            if new.$field != old.$field {
                // SAFETY: the caller guarantees `dst` is valid.
                unsafe { (*dst).$field = new.$field };
            }
        )*};
    }
    changed!(
        phase,
        local_isn,
        remote_isn,
        snd_next,
        ack_sent,
        rcv_next,
        local_flags,
        peer_flags,
        peer_ttl
    );
}

/// `a` comes before `b` in sequence space (RFC 1982 serial arithmetic).
#[inline(always)]
pub fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The connection key of a segment, oriented from this node.
#[inline(always)]
pub fn conn_key(seg: &TcpSegment, way: Way) -> ConnKey {
    flow_key(
        seg.family,
        &seg.src,
        &seg.dst,
        seg.src_port,
        seg.dst_port,
        way,
    )
}

/// The key of a flow seen crossing the interface `way`, oriented from this node.
#[inline(always)]
pub fn flow_key(
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    src_port: u16,
    dst_port: u16,
    way: Way,
) -> ConnKey {
    let (local_addr, remote_addr, local_port, remote_port) = match way {
        Way::Egress => (*src, *dst, src_port, dst_port),
        Way::Ingress => (*dst, *src, dst_port, src_port),
    };
    ConnKey {
        local_addr,
        remote_addr,
        local_port,
        remote_port,
        family,
        _pad: [0; 3],
    }
}

/// The connection key of the TCP packet an ICMP error quotes: a packet this node sent.
#[inline(always)]
pub fn quoted_conn_key(flow: &QuotedFlow) -> ConnKey {
    ConnKey {
        local_addr: flow.src,
        remote_addr: flow.dst,
        local_port: flow.src_port,
        remote_port: flow.dst_port,
        family: flow.family,
        _pad: [0; 3],
    }
}

/// Whether a segment is a bare SYN (no ACK, no RST): a connection's opening packet.
#[inline(always)]
pub fn is_bare_syn(seg: &TcpSegment) -> bool {
    seg.flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::SYN
}

/// Whether `seg`, a SYN crossing the interface `way`, repeats the SYN that opened `conn`,
/// still waiting for its handshake: a retransmission of a connection already let through.
#[inline(always)]
pub fn repeats_opening_syn(conn: Option<&ConnState>, seg: &TcpSegment, way: Way) -> bool {
    conn.is_some_and(|c| match way {
        Way::Egress => c.phase == Phase::SynSent as u32 && c.local_isn == seg.seq,
        Way::Ingress => c.phase == Phase::SynReceived as u32 && c.remote_isn == seg.seq,
    })
}

fn outbound_event(direction: Direction, kind: HandshakeKind) -> Option<HandshakeKind> {
    match direction {
        Direction::Outbound => Some(kind),
        Direction::Inbound => None,
    }
}

/// One TCP segment on a connection whose state is `conn` (None: not tracked).
#[inline(always)]
pub fn on_tcp(conn: Option<&ConnState>, seg: &TcpSegment, way: Way, now_ns: u64) -> Effects {
    let syn = seg.flags & tcp_flags::SYN != 0;
    let ack = seg.flags & tcp_flags::ACK != 0;
    let rst = seg.flags & tcp_flags::RST != 0;
    if syn && rst {
        return Effects::NOTHING; // nonsense, never sent by a real stack
    }
    if syn && !ack {
        return on_syn(conn, seg, way, now_ns);
    }
    let Some(conn) = conn else {
        // Connections whose handshake resil did not see are not tracked.
        return Effects::NOTHING;
    };
    let mut effects = if syn {
        on_syn_ack(conn, seg, way, now_ns)
    } else if rst {
        on_reset(conn, seg, way)
    } else {
        on_segment(conn, seg, way, now_ns)
    };
    if effects.update == Update::Delete && conn.phase == Phase::Established as u32 {
        effects.counters |= count::CLOSED;
    }
    effects
}

#[inline(always)]
fn on_syn(conn: Option<&ConnState>, seg: &TcpSegment, way: Way, now_ns: u64) -> Effects {
    let (direction, waiting) = match way {
        Way::Egress => (Direction::Outbound, Phase::SynSent),
        Way::Ingress => (Direction::Inbound, Phase::SynReceived),
    };
    if let Some(conn) = conn {
        let same_direction = conn.direction == direction as u8;
        let isn = match way {
            Way::Egress => conn.local_isn,
            Way::Ingress => conn.remote_isn,
        };
        if same_direction && isn == seg.seq {
            return if conn.phase == waiting as u32 {
                Effects::counting(count::SYN_RETRANSMIT, direction, Update::Keep)
            } else {
                Effects::NOTHING // a late duplicate of a completed handshake's SYN
            };
        }
        let handshaking =
            conn.phase == Phase::SynSent as u32 || conn.phase == Phase::SynReceived as u32;
        if !same_direction && handshaking {
            return Effects::NOTHING; // simultaneous open: keep the handshake we track
        }
    }
    // A new handshake, or a new connection reusing an old tuple with a new ISN.
    let end = seg.seq.wrapping_add(1).wrapping_add(seg.payload_len); // TFO data counts
    let mut state = ConnState {
        syn_ns: now_ns,
        phase: waiting as u32,
        direction: direction as u8,
        ..ConnState::default()
    };
    match way {
        Way::Egress => {
            state.local_isn = seg.seq;
            state.snd_next = end;
            state.local_flags = local_flags::SND_KNOWN;
        }
        Way::Ingress => {
            state.remote_isn = seg.seq;
            state.rcv_next = end;
            state.peer_flags = peer_flags::RCV_KNOWN;
            state.peer_ttl = seg.ttl;
        }
    }
    Effects {
        counters: count::ATTEMPT,
        direction,
        latency_ns: 0,
        event: outbound_event(direction, HandshakeKind::Started),
        update: Update::Insert(state),
    }
}

#[inline(always)]
fn on_syn_ack(conn: &ConnState, seg: &TcpSegment, way: Way, now_ns: u64) -> Effects {
    let direction = Direction::from_u8(conn.direction);
    match (way, direction) {
        (Way::Ingress, Direction::Outbound) => {
            if conn.phase == Phase::SynSent as u32 {
                if seg.ack != conn.local_isn.wrapping_add(1) {
                    return Effects::NOTHING; // does not answer our SYN
                }
                Effects {
                    counters: count::ESTABLISHED,
                    direction,
                    latency_ns: now_ns.saturating_sub(conn.syn_ns),
                    event: Some(HandshakeKind::Established),
                    update: Update::Write(ConnState {
                        phase: Phase::Established as u32,
                        remote_isn: seg.seq,
                        rcv_next: seg.seq.wrapping_add(1).wrapping_add(seg.payload_len),
                        peer_flags: conn.peer_flags | peer_flags::RCV_KNOWN,
                        peer_ttl: seg.ttl,
                        ..*conn
                    }),
                }
            } else if conn.phase == Phase::Established as u32 && seg.seq == conn.remote_isn {
                // The peer sent its SYN-ACK again: our ACK did not reach it in time.
                Effects::counting(count::SYN_RETRANSMIT, direction, Update::Keep)
            } else {
                Effects::NOTHING
            }
        }
        (Way::Egress, Direction::Inbound) if conn.phase == Phase::SynReceived as u32 => {
            if conn.local_flags & local_flags::SND_KNOWN == 0 {
                Effects::counting(
                    0,
                    direction,
                    Update::Write(ConnState {
                        local_isn: seg.seq,
                        snd_next: seg.seq.wrapping_add(1),
                        local_flags: conn.local_flags | local_flags::SND_KNOWN,
                        ..*conn
                    }),
                )
            } else if seg.seq == conn.local_isn {
                // Our SYN-ACK went out again: the client's ACK did not come in time.
                Effects::counting(count::SYN_RETRANSMIT, direction, Update::Keep)
            } else {
                Effects::NOTHING
            }
        }
        _ => Effects::NOTHING,
    }
}

#[inline(always)]
fn on_reset(conn: &ConnState, seg: &TcpSegment, way: Way) -> Effects {
    let direction = Direction::from_u8(conn.direction);
    let phase = conn.phase;
    if phase == Phase::SynSent as u32 {
        // RFC 793: in SYN-SENT a RST is acceptable only if it acknowledges our SYN.
        let answers_our_syn =
            seg.flags & tcp_flags::ACK != 0 && seg.ack == conn.local_isn.wrapping_add(1);
        return match way {
            Way::Ingress if answers_our_syn => Effects {
                event: Some(HandshakeKind::Refused),
                ..Effects::counting(count::REFUSED, direction, Update::Delete)
            },
            Way::Ingress => Effects::NOTHING,
            Way::Egress => Effects::counting(0, direction, Update::Delete),
        };
    }
    if phase == Phase::SynReceived as u32 {
        return match way {
            // A local service refused a client's SYN.
            Way::Egress => Effects {
                event: None,
                ..Effects::counting(count::REFUSED, direction, Update::Delete)
            },
            // The client gave up.
            Way::Ingress => Effects::counting(0, direction, Update::Delete),
        };
    }
    // Established.
    let closing =
        conn.local_flags & local_flags::FIN != 0 || conn.peer_flags & peer_flags::FIN != 0;
    match way {
        Way::Ingress => {
            let known = conn.peer_flags & peer_flags::RCV_KNOWN != 0;
            let distance = seg.seq.wrapping_sub(conn.rcv_next).wrapping_add(RST_WINDOW);
            if known && distance > 2 * RST_WINDOW {
                return Effects::NOTHING; // far from any sequence the peer could be at
            }
            if closing {
                return Effects::counting(0, direction, Update::Delete);
            }
            let before_reply = conn.peer_flags & peer_flags::DATA == 0;
            // The peer's packets all come the same way, with one TTL: a reset with another
            // was made by something on the path (a firewall, a load balancer, an IDS).
            let from_path = conn.peer_ttl != 0 && seg.ttl != conn.peer_ttl;
            let counters = if from_path {
                count::RESET_IN | count::PATH_RESET
            } else {
                count::RESET_IN
            };
            Effects {
                event: if before_reply {
                    outbound_event(direction, HandshakeKind::ResetBeforeReply)
                } else {
                    None
                },
                ..Effects::counting(counters, direction, Update::Delete)
            }
        }
        Way::Egress if closing => Effects::counting(0, direction, Update::Delete),
        Way::Egress => Effects::counting(count::RESET_OUT, direction, Update::Delete),
    }
}

/// A segment without SYN or RST: completes an inbound handshake, moves the sequence marks,
/// spots retransmissions and FINs.
#[inline(always)]
fn on_segment(conn: &ConnState, seg: &TcpSegment, way: Way, now_ns: u64) -> Effects {
    let direction = Direction::from_u8(conn.direction);
    let mut next = *conn;
    let mut counters = 0;
    let mut latency_ns = 0;
    if conn.phase == Phase::SynReceived as u32 {
        let completes = way == Way::Ingress
            && seg.flags & tcp_flags::ACK != 0
            && (conn.local_flags & local_flags::SND_KNOWN == 0
                || seg.ack == conn.local_isn.wrapping_add(1));
        if !completes {
            return Effects::NOTHING;
        }
        next.phase = Phase::Established as u32;
        counters |= count::ESTABLISHED;
        latency_ns = now_ns.saturating_sub(conn.syn_ns);
    } else if conn.phase != Phase::Established as u32 {
        return Effects::NOTHING;
    }
    let fin = seg.flags & tcp_flags::FIN != 0;
    if seg.payload_len > 0 {
        counters |= count::SEGMENT;
    }
    let len = seg.payload_len.wrapping_add(fin as u32);
    let end = seg.seq.wrapping_add(len);
    match way {
        Way::Egress => {
            if seg.flags & tcp_flags::ACK != 0
                && (next.local_flags & local_flags::ACK_KNOWN == 0
                    || seq_before(next.ack_sent, seg.ack))
            {
                next.ack_sent = seg.ack;
                next.local_flags |= local_flags::ACK_KNOWN;
            }
            if len > 0 {
                if next.local_flags & local_flags::SND_KNOWN == 0 {
                    next.snd_next = end;
                    next.local_flags |= local_flags::SND_KNOWN;
                } else {
                    // Our own stack only resends what it already sent.
                    if seq_before(seg.seq, next.snd_next) {
                        counters |= count::RETRANSMIT;
                    }
                    if seq_before(next.snd_next, end) {
                        next.snd_next = end;
                    }
                }
            }
            if fin {
                next.local_flags |= local_flags::FIN;
            }
        }
        Way::Ingress => {
            if seg.payload_len > 0 {
                next.peer_flags |= peer_flags::DATA;
            }
            if len > 0 {
                if next.peer_flags & peer_flags::RCV_KNOWN == 0 {
                    next.rcv_next = end;
                    next.peer_flags |= peer_flags::RCV_KNOWN;
                } else {
                    // Data we already acknowledged came again: a retransmission (segments
                    // merely reordered are not acknowledged yet). A 1-byte segment just
                    // below our ACK is a keepalive or window probe, not a retransmission.
                    let acked = next.local_flags & local_flags::ACK_KNOWN != 0
                        && !seq_before(next.ack_sent, end);
                    let probe = seg.payload_len == 1 && end == next.ack_sent;
                    if acked && !probe {
                        counters |= count::RETRANSMIT;
                    }
                    if seq_before(next.rcv_next, end) {
                        next.rcv_next = end;
                    }
                }
            }
            if fin {
                next.peer_flags |= peer_flags::FIN;
            }
        }
    }
    let both_closed =
        next.local_flags & local_flags::FIN != 0 && next.peer_flags & peer_flags::FIN != 0;
    let update = if both_closed {
        Update::Delete // nothing left to learn; free the slot
    } else if next == *conn {
        Update::Keep
    } else {
        Update::Write(next)
    };
    Effects {
        counters,
        direction,
        latency_ns,
        event: None,
        update,
    }
}

/// An ICMP destination-unreachable quoting a packet of a connection whose state is `conn`.
/// A handshake counts it once, and only if it quotes our SYN: the kernel aborts the connect()
/// on a hard error, but after a soft one (socket busy) it retransmits the SYN and may draw
/// another.
#[inline(always)]
pub fn on_unreachable(conn: Option<&ConnState>, flow: &QuotedFlow) -> Effects {
    let Some(conn) = conn else {
        return Effects::NOTHING;
    };
    let direction = Direction::from_u8(conn.direction);
    if conn.phase != Phase::SynSent as u32 {
        return Effects::counting(count::UNREACHABLE, direction, Update::Keep);
    }
    if flow.seq != conn.local_isn || conn.peer_flags & peer_flags::UNREACHABLE_SEEN != 0 {
        return Effects::NOTHING;
    }
    Effects {
        event: Some(HandshakeKind::Unreachable),
        ..Effects::counting(
            count::UNREACHABLE,
            direction,
            Update::Write(ConnState {
                peer_flags: conn.peer_flags | peer_flags::UNREACHABLE_SEEN,
                ..*conn
            }),
        )
    }
}

#[cfg(test)]
mod tests;
