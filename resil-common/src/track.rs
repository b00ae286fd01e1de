//! The per-connection tracking step: given a connection's state and one packet, what changes
//! and what to count. Pure, so the kernel runs it per packet and the host unit-tests it.

use crate::histogram::bucket_for_us;
use crate::maps::{conn_flags, ConnKey, ConnState, Direction, EndpointStats, HandshakeKind, Phase};
use crate::packet::{tcp_flags, QuotedFlow, TcpSegment};

/// Which way a packet crossed the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Leaving this node.
    Egress,
    /// Arriving at this node.
    Ingress,
}

/// Counter bits of [`Effects::counters`], one per [`crate::maps::EndpointStats`] field.
pub mod count {
    pub const ATTEMPT: u8 = 1 << 0;
    pub const ESTABLISHED: u8 = 1 << 1;
    pub const REFUSED: u8 = 1 << 2;
    pub const RESET_IN: u8 = 1 << 3;
    pub const RESET_OUT: u8 = 1 << 4;
    pub const SYN_RETRANSMIT: u8 = 1 << 5;
    pub const RETRANSMIT: u8 = 1 << 6;
    pub const UNREACHABLE: u8 = 1 << 7;
}

/// What to do with the connection's map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// Leave it as it is.
    Keep,
    /// Store this state.
    Write(ConnState),
    /// Forget the connection.
    Delete,
}

/// Everything one packet causes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Effects {
    /// [`count`] bits to add to the connection's endpoint.
    pub counters: u8,
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
    const NOTHING: Effects = Effects {
        counters: 0,
        direction: Direction::Outbound,
        latency_ns: 0,
        event: None,
        update: Update::Keep,
    };

    fn counting(counters: u8, direction: Direction, update: Update) -> Self {
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
    stats.refused += (c & count::REFUSED != 0) as u64;
    stats.resets_in += (c & count::RESET_IN != 0) as u64;
    stats.resets_out += (c & count::RESET_OUT != 0) as u64;
    stats.syn_retransmits += (c & count::SYN_RETRANSMIT != 0) as u64;
    stats.retransmits += (c & count::RETRANSMIT != 0) as u64;
    stats.unreachable += (c & count::UNREACHABLE != 0) as u64;
    if c & count::ESTABLISHED != 0 {
        stats.established += 1;
        let bucket = bucket_for_us(effects.latency_ns / 1_000);
        if let Some(slot) = stats.latency.get_mut(bucket) {
            *slot += 1;
        }
    }
}

/// `a` comes before `b` in sequence space (RFC 1982 serial arithmetic).
#[inline(always)]
pub fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The connection key of a segment, oriented from this node.
#[inline(always)]
pub fn conn_key(seg: &TcpSegment, way: Way) -> ConnKey {
    let (local_addr, remote_addr, local_port, remote_port) = match way {
        Way::Egress => (seg.src, seg.dst, seg.src_port, seg.dst_port),
        Way::Ingress => (seg.dst, seg.src, seg.dst_port, seg.src_port),
    };
    ConnKey {
        local_addr,
        remote_addr,
        local_port,
        remote_port,
        family: seg.family,
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

    if syn && !ack && !rst {
        return on_syn(conn, seg, way, now_ns);
    }
    let Some(conn) = conn else {
        // Connections whose handshake resil did not see are not tracked.
        return Effects::NOTHING;
    };
    let direction = Direction::from_u8(conn.direction);
    let phase = conn.phase;

    if rst {
        return on_reset(conn, direction, way);
    }
    if syn {
        // SYN-ACK.
        return match (way, direction) {
            (Way::Ingress, Direction::Outbound) if phase == Phase::SynSent as u8 => {
                let latency_ns = now_ns.saturating_sub(conn.syn_ns);
                Effects {
                    counters: count::ESTABLISHED,
                    direction,
                    latency_ns,
                    event: Some(HandshakeKind::Established),
                    update: Update::Write(ConnState {
                        phase: Phase::Established as u8,
                        rcv_next: seg.seq.wrapping_add(1),
                        ..*conn
                    }),
                }
            }
            (Way::Egress, Direction::Inbound) if phase == Phase::SynReceived as u8 => {
                if conn.snd_next == 0 {
                    Effects::counting(
                        0,
                        direction,
                        Update::Write(ConnState {
                            snd_next: seg.seq.wrapping_add(1),
                            ..*conn
                        }),
                    )
                } else {
                    // The SYN-ACK went out again: the client's ACK did not come in time.
                    Effects::counting(count::SYN_RETRANSMIT, direction, Update::Keep)
                }
            }
            _ => Effects::NOTHING,
        };
    }
    if phase == Phase::SynReceived as u8 && way == Way::Ingress && ack {
        // The client's ACK completes an inbound handshake.
        let mut next = ConnState {
            phase: Phase::Established as u8,
            ..*conn
        };
        let retransmit = advance(&mut next, seg, way);
        return Effects {
            counters: count::ESTABLISHED | retransmit,
            direction,
            latency_ns: now_ns.saturating_sub(conn.syn_ns),
            event: None,
            update: Update::Write(next),
        };
    }
    if phase != Phase::Established as u8 {
        return Effects::NOTHING;
    }
    let mut next = *conn;
    let retransmit = advance(&mut next, seg, way);
    if way == Way::Ingress && seg.payload_len > 0 {
        next.flags |= conn_flags::PEER_DATA;
    }
    let update = if next == *conn {
        Update::Keep
    } else {
        Update::Write(next)
    };
    Effects::counting(retransmit, direction, update)
}

/// Moves the highest-sequence mark of the sending side; returns [`count::RETRANSMIT`] when the
/// segment starts below it (data already sent once).
#[inline(always)]
fn advance(conn: &mut ConnState, seg: &TcpSegment, way: Way) -> u8 {
    let fin = (seg.flags & tcp_flags::FIN != 0) as u32;
    let len = seg.payload_len.wrapping_add(fin);
    if len == 0 {
        return 0;
    }
    let mark = match way {
        Way::Egress => &mut conn.snd_next,
        Way::Ingress => &mut conn.rcv_next,
    };
    let end = seg.seq.wrapping_add(len);
    let retransmit = seq_before(seg.seq, *mark);
    if seq_before(*mark, end) {
        *mark = end;
    }
    if retransmit {
        count::RETRANSMIT
    } else {
        0
    }
}

#[inline(always)]
fn on_syn(conn: Option<&ConnState>, seg: &TcpSegment, way: Way, now_ns: u64) -> Effects {
    let (direction, waiting) = match way {
        Way::Egress => (Direction::Outbound, Phase::SynSent),
        Way::Ingress => (Direction::Inbound, Phase::SynReceived),
    };
    if let Some(conn) = conn {
        if conn.phase == waiting as u8 && conn.direction == direction as u8 {
            return Effects::counting(count::SYN_RETRANSMIT, direction, Update::Keep);
        }
    }
    // A new handshake (or a new connection reusing an old tuple).
    let mut state = ConnState {
        syn_ns: now_ns,
        phase: waiting as u8,
        direction: direction as u8,
        ..ConnState::default()
    };
    match way {
        Way::Egress => state.snd_next = seg.seq.wrapping_add(1),
        Way::Ingress => state.rcv_next = seg.seq.wrapping_add(1),
    }
    Effects {
        counters: count::ATTEMPT,
        direction,
        latency_ns: 0,
        event: outbound_event(direction, HandshakeKind::Started),
        update: Update::Write(state),
    }
}

#[inline(always)]
fn on_reset(conn: &ConnState, direction: Direction, way: Way) -> Effects {
    let phase = conn.phase;
    if phase == Phase::Established as u8 {
        let (counter, event) = match way {
            Way::Ingress if conn.flags & conn_flags::PEER_DATA == 0 => (
                count::RESET_IN,
                outbound_event(direction, HandshakeKind::ResetBeforeReply),
            ),
            Way::Ingress => (count::RESET_IN, None),
            Way::Egress => (count::RESET_OUT, None),
        };
        return Effects {
            event,
            ..Effects::counting(counter, direction, Update::Delete)
        };
    }
    let refused = match (way, direction) {
        // The remote endpoint refused our SYN.
        (Way::Ingress, Direction::Outbound) => phase == Phase::SynSent as u8,
        // A local service refused a client's SYN.
        (Way::Egress, Direction::Inbound) => phase == Phase::SynReceived as u8,
        _ => false,
    };
    if refused {
        Effects {
            event: outbound_event(direction, HandshakeKind::Refused),
            ..Effects::counting(count::REFUSED, direction, Update::Delete)
        }
    } else {
        Effects::counting(0, direction, Update::Delete)
    }
}

/// An ICMP destination-unreachable quoting a packet of a connection whose state is `conn`.
/// A handshake counts it once: the kernel aborts the connect() on a hard error, but after a
/// soft one (socket busy) it retransmits the SYN and may draw another.
#[inline(always)]
pub fn on_unreachable(conn: Option<&ConnState>) -> Effects {
    let Some(conn) = conn else {
        return Effects::NOTHING;
    };
    let direction = Direction::from_u8(conn.direction);
    if conn.phase != Phase::SynSent as u8 {
        return Effects::counting(count::UNREACHABLE, direction, Update::Keep);
    }
    if conn.flags & conn_flags::UNREACHABLE_SEEN != 0 {
        return Effects::NOTHING;
    }
    Effects {
        event: Some(HandshakeKind::Unreachable),
        ..Effects::counting(
            count::UNREACHABLE,
            direction,
            Update::Write(ConnState {
                flags: conn.flags | conn_flags::UNREACHABLE_SEEN,
                ..*conn
            }),
        )
    }
}

#[cfg(test)]
mod tests;
