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
/// Initial sequence numbers: ours (the local side) and the peer's.
const LOCAL_ISN: u32 = 1000;
const PEER_ISN: u32 = 5000;

fn seg(way: Way, flags: u8, seq: u32, ack: u32, payload_len: u32) -> TcpSegment {
    // Local 10.0.0.1:40000, remote 10.0.0.2:80.
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
        ack,
        flags,
        payload_len,
        ip_offset: 14,
        tcp_offset: 34,
        ttl: 63,
        _pad: [0; 1],
    }
}

fn key() -> ConnKey {
    conn_key(&seg(Way::Egress, SYN, 0, 0, 0), Way::Egress)
}

impl Sim {
    fn at(now: u64) -> Self {
        Sim {
            now,
            ..Sim::default()
        }
    }

    fn packet(&mut self, way: Way, flags: u8, seq: u32, ack: u32, len: u32) -> Effects {
        let segment = seg(way, flags, seq, ack, len);
        let key = conn_key(&segment, way);
        let effects = on_tcp(self.conns.get(&key), &segment, way, self.now);
        self.apply(key, effects);
        effects
    }

    fn egress(&mut self, flags: u8, seq: u32, ack: u32, len: u32) -> Effects {
        self.packet(Way::Egress, flags, seq, ack, len)
    }

    fn ingress(&mut self, flags: u8, seq: u32, ack: u32, len: u32) -> Effects {
        self.packet(Way::Ingress, flags, seq, ack, len)
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
            Update::Insert(state) => {
                self.conns.insert(key, state);
            }
            Update::Write(state) => {
                let old = self.conns[&key];
                let slot = self.conns.get_mut(&key).unwrap();
                // SAFETY: a live entry.
                unsafe { write_changes(slot, &old, &state) };
                assert_eq!(*slot, state);
            }
            Update::Delete => {
                self.conns.remove(&key);
            }
        }
    }

    /// A complete outbound handshake.
    fn connect(&mut self) {
        self.egress(SYN, LOCAL_ISN, 0, 0);
        self.ingress(SYN | ACK, PEER_ISN, LOCAL_ISN + 1, 0);
        self.egress(ACK, LOCAL_ISN + 1, PEER_ISN + 1, 0);
    }

    /// A complete inbound handshake (the client is the remote side).
    fn accept(&mut self) {
        self.ingress(SYN, PEER_ISN, 0, 0);
        self.egress(SYN | ACK, LOCAL_ISN, PEER_ISN + 1, 0);
        self.ingress(ACK, PEER_ISN + 1, LOCAL_ISN + 1, 0);
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
    let mut sim = Sim::at(1_000);
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    sim.now = 51_000;
    let e = sim.ingress(SYN | ACK, PEER_ISN, LOCAL_ISN + 1, 0);
    assert_eq!(e.latency_ns, 50_000);
    sim.egress(ACK, LOCAL_ISN + 1, PEER_ISN + 1, 0);
    let s = sim.outbound();
    assert_eq!((s.attempts, s.established), (1, 1));
    assert_eq!(
        sim.events,
        [HandshakeKind::Started, HandshakeKind::Established]
    );
}

#[test]
fn latency_counts_from_the_first_syn_and_retransmits_are_counted() {
    let mut sim = Sim::default();
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    sim.now = 1_000_000_000;
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    sim.now = 1_000_300_000;
    let e = sim.ingress(SYN | ACK, PEER_ISN, LOCAL_ISN + 1, 0);
    assert_eq!(e.latency_ns, 1_000_300_000);
    let s = sim.outbound();
    assert_eq!((s.attempts, s.syn_retransmits, s.established), (1, 1, 1));
}

#[test]
fn a_syn_ack_that_does_not_answer_our_syn_is_ignored() {
    let mut sim = Sim::default();
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    sim.ingress(SYN | ACK, PEER_ISN, 77, 0);
    assert_eq!(sim.outbound().established, 0);
    sim.ingress(SYN | ACK, PEER_ISN, LOCAL_ISN + 1, 0);
    assert_eq!(sim.outbound().established, 1);
}

#[test]
fn rst_acknowledging_our_syn_is_refused() {
    let mut sim = Sim::default();
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    sim.ingress(RST | ACK, 0, LOCAL_ISN + 1, 0);
    let s = sim.outbound();
    assert_eq!((s.attempts, s.refused, s.established), (1, 1, 0));
    assert!(sim.conns.is_empty());
    assert_eq!(sim.events, [HandshakeKind::Started, HandshakeKind::Refused]);
}

#[test]
fn a_rst_that_does_not_acknowledge_our_syn_is_ignored() {
    let mut sim = Sim::default();
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    sim.ingress(RST, 0, 0, 0); // no ACK
    sim.ingress(RST | ACK, 0, LOCAL_ISN + 7, 0); // wrong ACK
    assert_eq!(sim.outbound().refused, 0);
    // The real answer still completes the handshake.
    sim.ingress(SYN | ACK, PEER_ISN, LOCAL_ISN + 1, 0);
    assert_eq!(sim.outbound().established, 1);
}

#[test]
fn resets_on_established_connections() {
    let mut sim = Sim::default();
    sim.connect();
    sim.ingress(RST, PEER_ISN + 1, 0, 0);
    assert_eq!(sim.outbound().resets_in, 1);
    assert_eq!(*sim.events.last().unwrap(), HandshakeKind::ResetBeforeReply);

    let mut sim = Sim::default();
    sim.connect();
    sim.ingress(ACK, PEER_ISN + 1, LOCAL_ISN + 1, 10);
    sim.ingress(RST, PEER_ISN + 11, 0, 0);
    assert_eq!(sim.outbound().resets_in, 1);
    assert_eq!(*sim.events.last().unwrap(), HandshakeKind::Established);

    let mut sim = Sim::default();
    sim.connect();
    sim.egress(RST | ACK, LOCAL_ISN + 1, PEER_ISN + 1, 0);
    let s = sim.outbound();
    assert_eq!((s.resets_in, s.resets_out), (0, 1));
}

#[test]
fn a_blind_rst_far_from_the_sequence_is_ignored() {
    let mut sim = Sim::default();
    sim.connect();
    sim.ingress(RST, PEER_ISN.wrapping_add(1 << 30), 0, 0);
    assert_eq!(sim.outbound().resets_in, 0);
    assert_eq!(sim.conns.len(), 1);
}

#[test]
fn resets_after_a_fin_are_teardown_not_failures() {
    let mut sim = Sim::default();
    sim.connect();
    sim.egress(FIN | ACK, LOCAL_ISN + 1, PEER_ISN + 1, 0);
    sim.ingress(RST, PEER_ISN + 1, 0, 0);
    let s = sim.outbound();
    assert_eq!((s.resets_in, s.resets_out), (0, 0));
    assert!(sim.conns.is_empty());
    assert_eq!(*sim.events.last().unwrap(), HandshakeKind::Established);
}

#[test]
fn a_closed_connection_is_forgotten() {
    let mut sim = Sim::default();
    sim.connect();
    sim.egress(FIN | ACK, LOCAL_ISN + 1, PEER_ISN + 1, 0);
    assert_eq!(sim.conns.len(), 1);
    sim.ingress(FIN | ACK, PEER_ISN + 1, LOCAL_ISN + 2, 0);
    assert!(sim.conns.is_empty(), "both FINs seen");
    // Late packets of the closed connection are not tracked.
    let e = sim.egress(ACK, LOCAL_ISN + 2, PEER_ISN + 2, 0);
    assert_eq!(e, Effects::NOTHING);
}

#[test]
fn data_retransmissions_both_ways_with_wraparound() {
    let mut sim = Sim::default();
    let isn = u32::MAX - 50;
    sim.egress(SYN, isn, 0, 0);
    sim.ingress(SYN | ACK, 7, isn.wrapping_add(1), 0);
    let first = isn.wrapping_add(1);
    sim.egress(ACK, first, 8, 100); // crosses the wrap
    sim.egress(ACK, first.wrapping_add(100), 8, 100);
    assert_eq!(sim.outbound().retransmits, 0);
    sim.egress(ACK, first, 8, 100); // again
    assert_eq!(sim.outbound().retransmits, 1);
    sim.egress(ACK, first.wrapping_add(200), 8, 0); // pure ACK
    assert_eq!(sim.outbound().retransmits, 1);
    // The peer's data, acknowledged by us, then sent again.
    sim.ingress(ACK, 8, first.wrapping_add(200), 50);
    sim.egress(ACK, first.wrapping_add(200), 58, 0);
    sim.ingress(ACK, 8, first.wrapping_add(200), 50);
    assert_eq!(sim.outbound().retransmits, 2);
}

#[test]
fn reordered_segments_are_not_retransmissions() {
    let mut sim = Sim::default();
    sim.connect();
    let base = PEER_ISN + 1;
    // Segment 2 overtakes segment 1; we have acknowledged neither.
    sim.ingress(ACK, base + 100, LOCAL_ISN + 1, 100);
    sim.ingress(ACK, base, LOCAL_ISN + 1, 100);
    assert_eq!(sim.outbound().retransmits, 0);
}

#[test]
fn keepalive_and_window_probes_are_not_retransmissions() {
    let mut sim = Sim::default();
    sim.connect();
    let base = PEER_ISN + 1;
    sim.ingress(ACK, base, LOCAL_ISN + 1, 10);
    sim.egress(ACK, LOCAL_ISN + 1, base + 10, 0);
    // A peer's 1-byte keepalive: one byte below what we acknowledged.
    sim.ingress(ACK, base + 9, LOCAL_ISN + 1, 1);
    // Our own (Linux) keepalive carries no data.
    sim.egress(ACK, LOCAL_ISN, base + 10, 0);
    assert_eq!(sim.outbound().retransmits, 0);
}

#[test]
fn unknown_marks_are_learnt_not_counted() {
    // An inbound connection whose SYN-ACK resil did not see (asymmetric path).
    let mut sim = Sim::default();
    sim.ingress(SYN, PEER_ISN, 0, 0);
    sim.ingress(ACK, PEER_ISN + 1, 0, 0);
    sim.egress(ACK, 0, PEER_ISN + 1, 100);
    sim.egress(ACK, 100, PEER_ISN + 1, 100);
    assert_eq!(sim.inbound().retransmits, 0);
}

#[test]
fn tfo_syn_data_is_part_of_the_first_mark() {
    let mut sim = Sim::default();
    sim.egress(SYN, LOCAL_ISN, 0, 30);
    sim.ingress(SYN | ACK, PEER_ISN, LOCAL_ISN + 31, 0);
    sim.egress(ACK, LOCAL_ISN + 31, PEER_ISN + 1, 100);
    assert_eq!(sim.outbound().retransmits, 0);
}

#[test]
fn inbound_connections_count_for_the_local_service() {
    let mut sim = Sim::at(10);
    sim.ingress(SYN, PEER_ISN, 0, 0);
    sim.egress(SYN | ACK, LOCAL_ISN, PEER_ISN + 1, 0);
    sim.now = 110;
    let e = sim.ingress(ACK, PEER_ISN + 1, LOCAL_ISN + 1, 0);
    assert_eq!(e.latency_ns, 100);
    let s = sim.inbound();
    assert_eq!((s.attempts, s.established), (1, 1));
    assert!(sim.events.is_empty(), "inbound connections emit no events");

    // Our service refusing a client.
    let mut sim = Sim::default();
    sim.ingress(SYN, PEER_ISN, 0, 0);
    sim.egress(RST | ACK, 0, PEER_ISN + 1, 0);
    assert_eq!(sim.inbound().refused, 1);

    // Client SYN retransmitted (listen queue full) and SYN-ACK retransmitted.
    let mut sim = Sim::default();
    sim.ingress(SYN, PEER_ISN, 0, 0);
    sim.ingress(SYN, PEER_ISN, 0, 0);
    sim.egress(SYN | ACK, LOCAL_ISN, PEER_ISN + 1, 0);
    sim.egress(SYN | ACK, LOCAL_ISN, PEER_ISN + 1, 0);
    let s = sim.inbound();
    assert_eq!((s.attempts, s.syn_retransmits), (1, 2));
}

#[test]
fn a_late_duplicate_syn_is_not_a_new_connection() {
    let mut sim = Sim::default();
    sim.accept();
    sim.ingress(SYN, PEER_ISN, 0, 0);
    sim.ingress(ACK, PEER_ISN + 1, LOCAL_ISN + 1, 0);
    let s = sim.inbound();
    assert_eq!((s.attempts, s.established), (1, 1));
}

#[test]
fn simultaneous_open_keeps_our_handshake() {
    let mut sim = Sim::default();
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    sim.ingress(SYN, PEER_ISN, 0, 0);
    assert_eq!(sim.conns[&key()].direction, Direction::Outbound as u8);
    assert_eq!(sim.inbound().attempts, 0);
}

#[test]
fn unknown_connections_are_ignored() {
    let mut sim = Sim::default();
    for flags in [ACK, RST, SYN | ACK, FIN | ACK, SYN | RST] {
        let e = sim.ingress(flags, 1, 2, 10);
        assert_eq!(e, Effects::NOTHING);
    }
    assert!(sim.conns.is_empty());
}

fn quoted(seq: u32) -> QuotedFlow {
    let syn = seg(Way::Egress, SYN, seq, 0, 0);
    QuotedFlow {
        family: syn.family,
        src: syn.src,
        dst: syn.dst,
        src_port: syn.src_port,
        dst_port: syn.dst_port,
        seq,
        _pad: [0; 3],
    }
}

#[test]
fn unreachable_counts_once_per_handshake() {
    let mut sim = Sim::default();
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    let flow = quoted(LOCAL_ISN);
    let key = quoted_conn_key(&flow);
    assert_eq!(key, self::key());
    let e = on_unreachable(sim.conns.get(&key), &flow);
    sim.apply(key, e);
    assert_eq!(sim.outbound().unreachable, 1);
    assert_eq!(*sim.events.last().unwrap(), HandshakeKind::Unreachable);
    // A soft error: the kernel retries the SYN and draws a second ICMP for the same attempt.
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    let e = on_unreachable(sim.conns.get(&key), &flow);
    sim.apply(key, e);
    let s = sim.outbound();
    assert_eq!((s.attempts, s.syn_retransmits, s.unreachable), (1, 1, 1));
    assert_eq!(sim.events.len(), 2, "one Started, one Unreachable");
    // The application tries again from the same port: a new ISN is a new attempt.
    sim.egress(SYN, LOCAL_ISN + 99_999, 0, 0);
    assert_eq!(sim.outbound().attempts, 2);
}

#[test]
fn unreachable_quoting_another_sequence_is_ignored() {
    let mut sim = Sim::default();
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    let flow = quoted(LOCAL_ISN + 5);
    let e = on_unreachable(sim.conns.get(&key()), &flow);
    assert_eq!(e, Effects::NOTHING);
}

#[test]
fn a_new_syn_on_an_old_tuple_is_a_new_attempt() {
    let mut sim = Sim::default();
    sim.connect();
    sim.egress(SYN, LOCAL_ISN + 9000, 0, 0);
    assert_eq!(sim.outbound().attempts, 2);
}

#[test]
fn writes_touch_only_changed_fields() {
    let old = ConnState {
        snd_next: 1,
        rcv_next: 2,
        ..ConnState::default()
    };
    // Another CPU moved rcv_next meanwhile; our egress update must not undo it.
    let mut live = ConnState {
        rcv_next: 99,
        ..old
    };
    let new = ConnState { snd_next: 5, ..old };
    // SAFETY: a live value.
    unsafe { write_changes(&mut live, &old, &new) };
    assert_eq!((live.snd_next, live.rcv_next), (5, 99));
}

#[test]
fn data_segments_and_closes_are_counted() {
    let mut sim = Sim::at(1);
    sim.connect();
    sim.egress(ACK, LOCAL_ISN + 1, PEER_ISN + 1, 100);
    sim.ingress(ACK, PEER_ISN + 1, LOCAL_ISN + 101, 50);
    sim.egress(ACK, LOCAL_ISN + 1, PEER_ISN + 51, 100); // retransmitted
    sim.egress(ACK, LOCAL_ISN + 101, PEER_ISN + 51, 0); // a bare ACK is no segment
    let s = sim.outbound();
    assert_eq!((s.segments, s.retransmits, s.closed), (3, 1, 0));
    sim.egress(FIN | ACK, LOCAL_ISN + 101, PEER_ISN + 51, 0);
    sim.ingress(FIN | ACK, PEER_ISN + 51, LOCAL_ISN + 102, 0);
    assert_eq!(sim.outbound().closed, 1);
    assert!(sim.conns.is_empty());
    // A reset on an established connection closes it too; one during a handshake does not.
    sim.connect();
    sim.ingress(RST, PEER_ISN + 1, 0, 0);
    assert_eq!(sim.outbound().closed, 2);
    sim.egress(SYN, LOCAL_ISN + 7, 0, 0);
    sim.ingress(RST | ACK, 0, LOCAL_ISN + 8, 0);
    assert_eq!(sim.outbound().closed, 2);
    assert_eq!(sim.outbound().refused, 1);
}

#[test]
fn opening_syns_and_their_retransmissions() {
    let mut sim = Sim::at(1);
    let syn = seg(Way::Egress, SYN, LOCAL_ISN, 0, 0);
    assert!(is_bare_syn(&syn));
    assert!(!is_bare_syn(&seg(
        Way::Ingress,
        SYN | ACK,
        PEER_ISN,
        LOCAL_ISN + 1,
        0
    )));
    assert!(!repeats_opening_syn(None, &syn, Way::Egress));
    sim.egress(SYN, LOCAL_ISN, 0, 0);
    let conn = sim.conns.get(&key()).copied();
    assert!(repeats_opening_syn(conn.as_ref(), &syn, Way::Egress));
    let other = seg(Way::Egress, SYN, LOCAL_ISN + 99, 0, 0);
    assert!(
        !repeats_opening_syn(conn.as_ref(), &other, Way::Egress),
        "a new ISN is a new connection"
    );
    // Once established, a SYN with the same ISN is no longer waiting for anything.
    sim.ingress(SYN | ACK, PEER_ISN, LOCAL_ISN + 1, 0);
    let conn = sim.conns.get(&key()).copied();
    assert!(!repeats_opening_syn(conn.as_ref(), &syn, Way::Egress));
    // Inbound: the client's SYN again while ours is SYN_RECEIVED.
    let mut sim = Sim::at(1);
    sim.ingress(SYN, PEER_ISN, 0, 0);
    let conn = sim.conns.get(&key()).copied();
    let again = seg(Way::Ingress, SYN, PEER_ISN, 0, 0);
    assert!(repeats_opening_syn(conn.as_ref(), &again, Way::Ingress));
}

#[test]
fn a_reset_with_another_ttl_than_the_peer_comes_from_the_path() {
    let mut sim = Sim::at(1);
    sim.connect();
    assert_eq!(sim.conns[&key()].peer_ttl, 63);
    // The peer's own reset: the TTL its packets always have.
    sim.ingress(RST, PEER_ISN + 1, 0, 0);
    assert_eq!(
        (sim.outbound().resets_in, sim.outbound().path_resets),
        (1, 0)
    );
    // A firewall one hop closer resets the next connection.
    sim.connect();
    let mut rst = seg(Way::Ingress, RST, PEER_ISN + 1, 0, 0);
    rst.ttl = 64;
    let effects = on_tcp(sim.conns.get(&key()), &rst, Way::Ingress, 2);
    sim.apply(key(), effects);
    assert_eq!(
        (sim.outbound().resets_in, sim.outbound().path_resets),
        (2, 1)
    );
    // Inbound: the client's SYN sets the TTL to compare with.
    let mut sim = Sim::at(1);
    sim.accept();
    let mut rst = seg(Way::Ingress, RST, PEER_ISN + 1, 0, 0);
    rst.ttl = 250;
    let effects = on_tcp(sim.conns.get(&key()), &rst, Way::Ingress, 2);
    sim.apply(key(), effects);
    let inbound = sim.inbound();
    assert_eq!((inbound.resets_in, inbound.path_resets), (1, 1));
}
