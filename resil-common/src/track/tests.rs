use super::*;
use crate::maps::{EndpointStats, FAMILY_IPV4};
use crate::packet::tcp_flags::*;
use std::collections::HashMap;

/// A host-side stand-in for the kernel maps: applies [`Effects`] the way the BPF program does.
#[derive(Default)]
struct Sim {
    conns: HashMap<ConnKey, ConnState>,
    stats: HashMap<(u8, u16), EndpointStats>,
    events: Vec<HandshakeKind>,
    now: u64,
}

const CLIENT: [u8; 4] = [10, 0, 0, 1];
const SERVER: [u8; 4] = [10, 0, 0, 2];

fn seg(way: Way, flags: u8, seq: u32, payload_len: u32) -> TcpSegment {
    // Outbound connection 10.0.0.1:40000 -> 10.0.0.2:80 when the client is local.
    let mut c = [0u8; 16];
    c[..4].copy_from_slice(&CLIENT);
    let mut s = [0u8; 16];
    s[..4].copy_from_slice(&SERVER);
    let (src, dst, sp, dp) = match way {
        Way::Egress => (c, s, 40000, 80),
        Way::Ingress => (s, c, 80, 40000),
    };
    TcpSegment {
        family: FAMILY_IPV4,
        src,
        dst,
        src_port: sp,
        dst_port: dp,
        seq,
        ack: 0,
        flags,
        payload_len,
    }
}

impl Sim {
    fn packet(&mut self, way: Way, flags: u8, seq: u32, len: u32) -> Effects {
        let segment = seg(way, flags, seq, len);
        let key = conn_key(&segment, way);
        let effects = on_tcp(self.conns.get(&key), &segment, way, self.now);
        self.apply(key, effects);
        effects
    }

    fn apply(&mut self, key: ConnKey, e: Effects) {
        let endpoint = key.endpoint(e.direction);
        let stats = self
            .stats
            .entry((endpoint.direction, endpoint.port))
            .or_default();
        count_into(stats, &e);
        if let Some(event) = e.event {
            self.events.push(event);
        }
        match e.update {
            Update::Keep => {}
            Update::Write(state) => {
                self.conns.insert(key, state);
            }
            Update::Delete => {
                self.conns.remove(&key);
            }
        }
    }

    fn outbound(&self) -> EndpointStats {
        self.stats
            .get(&(Direction::Outbound as u8, 80))
            .copied()
            .unwrap_or_default()
    }

    fn inbound(&self) -> EndpointStats {
        self.stats
            .get(&(Direction::Inbound as u8, 40000))
            .copied()
            .unwrap_or_default()
    }
}

#[test]
fn outbound_handshake_measures_latency() {
    let mut sim = Sim {
        now: 1_000,
        ..Sim::default()
    };
    sim.packet(Way::Egress, SYN, 100, 0);
    sim.now = 51_000;
    let e = sim.packet(Way::Ingress, SYN | ACK, 500, 0);
    assert_eq!(e.latency_ns, 50_000);
    sim.packet(Way::Egress, ACK, 101, 0);
    let s = sim.outbound();
    assert_eq!((s.attempts, s.established), (1, 1));
    assert_eq!(
        sim.events,
        vec![HandshakeKind::Started, HandshakeKind::Established]
    );
}

#[test]
fn latency_counts_from_the_first_syn_and_retransmits_are_counted() {
    let mut sim = Sim::default();
    sim.packet(Way::Egress, SYN, 100, 0);
    sim.now = 1_000_000_000;
    sim.packet(Way::Egress, SYN, 100, 0);
    sim.now = 1_000_300_000;
    let e = sim.packet(Way::Ingress, SYN | ACK, 500, 0);
    assert_eq!(e.latency_ns, 1_000_300_000);
    let s = sim.outbound();
    assert_eq!((s.attempts, s.syn_retransmits, s.established), (1, 1, 1));
}

#[test]
fn rst_to_syn_is_refused() {
    let mut sim = Sim::default();
    sim.packet(Way::Egress, SYN, 100, 0);
    sim.packet(Way::Ingress, RST | ACK, 0, 0);
    let s = sim.outbound();
    assert_eq!((s.attempts, s.refused, s.established), (1, 1, 0));
    assert!(sim.conns.is_empty());
    assert_eq!(
        sim.events,
        vec![HandshakeKind::Started, HandshakeKind::Refused]
    );
}

#[test]
fn resets_on_established_connections() {
    let mut sim = Sim::default();
    sim.packet(Way::Egress, SYN, 100, 0);
    sim.packet(Way::Ingress, SYN | ACK, 500, 0);
    sim.packet(Way::Ingress, RST, 501, 0);
    assert_eq!(sim.outbound().resets_in, 1);
    assert_eq!(*sim.events.last().unwrap(), HandshakeKind::ResetBeforeReply);

    let mut sim = Sim::default();
    sim.packet(Way::Egress, SYN, 100, 0);
    sim.packet(Way::Ingress, SYN | ACK, 500, 0);
    sim.packet(Way::Ingress, ACK, 501, 10);
    sim.packet(Way::Ingress, RST, 511, 0);
    assert_eq!(sim.outbound().resets_in, 1);
    assert_eq!(*sim.events.last().unwrap(), HandshakeKind::Established);

    let mut sim = Sim::default();
    sim.packet(Way::Egress, SYN, 100, 0);
    sim.packet(Way::Ingress, SYN | ACK, 500, 0);
    sim.packet(Way::Egress, RST | ACK, 101, 0);
    let s = sim.outbound();
    assert_eq!((s.resets_in, s.resets_out), (0, 1));
}

#[test]
fn data_retransmissions_both_ways_with_wraparound() {
    let mut sim = Sim::default();
    let isn = u32::MAX - 50;
    sim.packet(Way::Egress, SYN, isn, 0);
    sim.packet(Way::Ingress, SYN | ACK, 7, 0);
    let first = isn.wrapping_add(1);
    sim.packet(Way::Egress, ACK, first, 100); // crosses the wrap
    sim.packet(Way::Egress, ACK, first.wrapping_add(100), 100);
    assert_eq!(sim.outbound().retransmits, 0);
    sim.packet(Way::Egress, ACK, first, 100); // again
    assert_eq!(sim.outbound().retransmits, 1);
    sim.packet(Way::Egress, ACK, first.wrapping_add(200), 0); // pure ACK
    assert_eq!(sim.outbound().retransmits, 1);
    sim.packet(Way::Ingress, ACK, 8, 50);
    sim.packet(Way::Ingress, ACK, 8, 50);
    assert_eq!(sim.outbound().retransmits, 2);
}

#[test]
fn inbound_connections_count_for_the_local_service() {
    // A client 10.0.0.2:80 connects to our port 40000: reuse the tuple, reversed roles.
    let mut sim = Sim {
        now: 10,
        ..Sim::default()
    };
    sim.packet(Way::Ingress, SYN, 9, 0);
    sim.packet(Way::Egress, SYN | ACK, 77, 0);
    sim.now = 110;
    sim.packet(Way::Ingress, ACK, 10, 0);
    let s = sim.inbound();
    assert_eq!((s.attempts, s.established), (1, 1));
    assert!(sim.events.is_empty(), "inbound connections emit no events");
    // Our service refusing a client.
    let mut sim = Sim::default();
    sim.packet(Way::Ingress, SYN, 9, 0);
    sim.packet(Way::Egress, RST | ACK, 0, 0);
    assert_eq!(sim.inbound().refused, 1);
    // Client SYN retransmitted (listen queue full) and SYN-ACK retransmitted.
    let mut sim = Sim::default();
    sim.packet(Way::Ingress, SYN, 9, 0);
    sim.packet(Way::Ingress, SYN, 9, 0);
    sim.packet(Way::Egress, SYN | ACK, 77, 0);
    sim.packet(Way::Egress, SYN | ACK, 77, 0);
    assert_eq!(sim.inbound().syn_retransmits, 2);
}

#[test]
fn unknown_connections_are_ignored() {
    let mut sim = Sim::default();
    for flags in [ACK, RST, SYN | ACK, FIN | ACK] {
        let e = sim.packet(Way::Ingress, flags, 1, 10);
        assert_eq!(e.counters, 0);
        assert_eq!(e.update, Update::Keep);
    }
    assert!(sim.conns.is_empty());
}

#[test]
fn unreachable_counts_once_per_handshake() {
    let mut sim = Sim::default();
    sim.packet(Way::Egress, SYN, 100, 0);
    let key = conn_key(&seg(Way::Egress, SYN, 100, 0), Way::Egress);
    let e = on_unreachable(sim.conns.get(&key));
    sim.apply(key, e);
    assert_eq!(sim.outbound().unreachable, 1);
    assert_eq!(*sim.events.last().unwrap(), HandshakeKind::Unreachable);
    // A soft error: the kernel retries the SYN and draws a second ICMP for the same attempt.
    sim.packet(Way::Egress, SYN, 100, 0);
    let e = on_unreachable(sim.conns.get(&key));
    sim.apply(key, e);
    let s = sim.outbound();
    assert_eq!((s.attempts, s.syn_retransmits, s.unreachable), (1, 1, 1));
    assert_eq!(sim.events.len(), 2, "one Started, one Unreachable");
}

#[test]
fn a_new_syn_on_an_old_tuple_is_a_new_attempt() {
    let mut sim = Sim::default();
    sim.packet(Way::Egress, SYN, 100, 0);
    sim.packet(Way::Ingress, SYN | ACK, 500, 0);
    sim.packet(Way::Egress, SYN, 9000, 0);
    assert_eq!(sim.outbound().attempts, 2);
}
