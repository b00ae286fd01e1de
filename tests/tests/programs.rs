//! The BPF programs on synthetic packets through BPF_PROG_TEST_RUN: what they count for real
//! handshakes, and that truncated or malformed packets pass untouched and are never misread.

use aya::{
    maps::{HashMap, MapData, PerCpuHashMap, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use resil_common::{
    maps::{ConnKey, ConnState, EndpointKey, EndpointStats, HandshakeKind, Phase},
    packet::{
        build::{icmp_unreachable_frame, tcp_frame, tcp_packet, Addr},
        tcp_flags::{ACK, RST, SYN},
    },
};
use resil_tests::require_root;
use resil_user::probes::OBJECT;

/// The observers never change a packet's fate: TC_ACT_UNSPEC (-1), "next program".
const TC_ACT_UNSPEC: u32 = u32::MAX;

const CLIENT4: Addr = Addr::V4([10, 9, 0, 1]);
const SERVER4: Addr = Addr::V4([10, 9, 0, 2]);
const CLIENT6: Addr = Addr::V6([0xfd, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
const SERVER6: Addr = Addr::V6([0xfd, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);

fn load() -> Ebpf {
    require_root();
    let mut ebpf = EbpfLoader::new()
        .override_global("AYA_LOG_LEVEL", &0u8, true)
        .load(OBJECT)
        .expect("load the BPF object");
    for name in ["resil_tc_ingress", "resil_tc_egress"] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().expect("the verifier accepts the program");
    }
    ebpf
}

fn run(ebpf: &Ebpf, program: &str, frame: &[u8]) -> u32 {
    let p: &SchedClassifier = ebpf.program(program).unwrap().try_into().unwrap();
    p.test_run(TestRunOptions {
        data_in: Some(frame),
        ..TestRunOptions::default()
    })
    .unwrap_or_else(|e| {
        panic!(
            "BPF_PROG_TEST_RUN on {} bytes {frame:02x?}: {e}",
            frame.len()
        )
    })
    .return_value
}

fn egress(ebpf: &Ebpf, frame: &[u8]) {
    assert_eq!(run(ebpf, "resil_tc_egress", frame), TC_ACT_UNSPEC);
}

fn ingress(ebpf: &Ebpf, frame: &[u8]) {
    assert_eq!(run(ebpf, "resil_tc_ingress", frame), TC_ACT_UNSPEC);
}

fn endpoints(ebpf: &Ebpf) -> Vec<(EndpointKey, EndpointStats)> {
    let map: PerCpuHashMap<&MapData, EndpointKey, EndpointStats> =
        PerCpuHashMap::try_from(ebpf.map("ENDPOINTS").unwrap()).unwrap();
    map.iter()
        .map(|item| {
            let (key, values) = item.unwrap();
            (key, resil_user::collector::sum(&values))
        })
        .collect()
}

fn connections(ebpf: &Ebpf) -> Vec<(ConnKey, ConnState)> {
    let map: HashMap<&MapData, ConnKey, ConnState> =
        HashMap::try_from(ebpf.map("CONNECTIONS").unwrap()).unwrap();
    map.iter().map(|item| item.unwrap()).collect()
}

fn events(ebpf: &mut Ebpf) -> Vec<HandshakeKind> {
    let mut ring = RingBuf::try_from(ebpf.map_mut("HANDSHAKES").unwrap()).unwrap();
    let mut kinds = Vec::new();
    while let Some(item) = ring.next() {
        let event = resil_user::collector::decode_event(&item).expect("a whole record");
        kinds.push(HandshakeKind::from_u8(event.kind).expect("a known kind"));
    }
    kinds
}

fn handshake(client: Addr, server: Addr) {
    let mut ebpf = load();
    egress(
        &ebpf,
        &tcp_frame(client, server, 40000, 443, 1000, 0, SYN, 0),
    );
    ingress(
        &ebpf,
        &tcp_frame(server, client, 443, 40000, 5000, 1001, SYN | ACK, 0),
    );
    egress(
        &ebpf,
        &tcp_frame(client, server, 40000, 443, 1001, 5001, ACK, 0),
    );

    let found = endpoints(&ebpf);
    assert_eq!(found.len(), 1, "{found:?}");
    let (key, stats) = found[0];
    assert_eq!((key.addr, key.port), (server.bytes(), 443));
    assert_eq!(
        (stats.attempts, stats.established, stats.refused),
        (1, 1, 0)
    );
    assert!(stats.created_ns > 0, "the kernel stamps new endpoints");
    let conns = connections(&ebpf);
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].1.phase, Phase::Established as u32);
    assert_eq!(
        events(&mut ebpf),
        [HandshakeKind::Started, HandshakeKind::Established]
    );

    // A reset before any reply data ends the connection and says so.
    ingress(
        &ebpf,
        &tcp_frame(server, client, 443, 40000, 5001, 0, RST, 0),
    );
    assert_eq!(endpoints(&ebpf)[0].1.resets_in, 1);
    assert!(connections(&ebpf).is_empty());
    assert_eq!(events(&mut ebpf), [HandshakeKind::ResetBeforeReply]);
}

#[test]
fn a_handshake_is_counted_with_latency_and_events_ipv4() {
    handshake(CLIENT4, SERVER4);
}

#[test]
fn a_handshake_is_counted_with_latency_and_events_ipv6() {
    handshake(CLIENT6, SERVER6);
}

#[test]
fn a_refused_handshake() {
    let mut ebpf = load();
    egress(
        &ebpf,
        &tcp_frame(CLIENT4, SERVER4, 40001, 5432, 7, 0, SYN, 0),
    );
    ingress(
        &ebpf,
        &tcp_frame(SERVER4, CLIENT4, 5432, 40001, 0, 8, RST | ACK, 0),
    );
    let (_, stats) = endpoints(&ebpf)[0];
    assert_eq!(
        (stats.attempts, stats.refused, stats.established),
        (1, 1, 0)
    );
    assert!(connections(&ebpf).is_empty());
    assert_eq!(
        events(&mut ebpf),
        [HandshakeKind::Started, HandshakeKind::Refused]
    );
}

#[test]
fn icmp_unreachable_settles_a_pending_handshake_both_families() {
    for (client, server) in [(CLIENT4, SERVER4), (CLIENT6, SERVER6)] {
        let mut ebpf = load();
        egress(&ebpf, &tcp_frame(client, server, 40002, 80, 1, 0, SYN, 0));
        let quoted = tcp_packet(client, server, 40002, 80, 1, 0, SYN, 0);
        // A router between us and the server answers.
        ingress(&ebpf, &icmp_unreachable_frame(server, client, &quoted));
        let (_, stats) = endpoints(&ebpf)[0];
        assert_eq!((stats.attempts, stats.unreachable), (1, 1));
        assert_eq!(
            events(&mut ebpf),
            [HandshakeKind::Started, HandshakeKind::Unreachable]
        );
    }
}

/// Frames that must not be tracked: every truncation of a SYN (both families) and of an ICMP
/// error, and SYNs with inconsistent headers.
fn hostile_frames() -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    // BPF_PROG_TEST_RUN, like the real stack, builds no skb shorter than its network header;
    // shorter prefixes are covered by resil-common's parser tests on the host.
    for (client, server, ip_header) in [(CLIENT4, SERVER4, 20), (CLIENT6, SERVER6, 40)] {
        let syn = tcp_frame(client, server, 40000, 80, 1, 0, SYN, 0);
        for cut in 14 + ip_header..syn.len() {
            frames.push(syn[..cut].to_vec());
        }
        let quoted = tcp_packet(client, server, 40000, 80, 1, 0, SYN, 0);
        let icmp = icmp_unreachable_frame(server, client, &quoted);
        let needed = icmp.len(); // it needs the quoted ports and sequence number, the last bytes
        for cut in 14 + ip_header..needed {
            frames.push(icmp[..cut].to_vec());
        }
    }
    let syn = tcp_frame(CLIENT4, SERVER4, 40000, 80, 1, 0, SYN, 0);
    for (offset, value) in [
        (14, 0x44u8), // IHL below 5
        (14, 0x4f),   // IHL 15: an IP header longer than the packet
        (14, 0x65),   // version 6 in an IPv4 ethertype
        (17, 30),     // total length 30: shorter than IP + TCP headers
        (46, 0x40),   // TCP data offset below 5
        (46, 0xf0),   // TCP data offset past the end of the packet
    ] {
        let mut bad = syn.clone();
        bad[offset] = value;
        frames.push(bad);
    }
    frames
}

#[test]
fn truncated_and_malformed_frames_pass_and_are_never_misread() {
    let mut ebpf = load();
    let frames = hostile_frames();
    for frame in &frames {
        egress(&ebpf, frame);
        ingress(&ebpf, frame);
    }
    assert!(endpoints(&ebpf).is_empty(), "{:?}", endpoints(&ebpf));
    assert!(connections(&ebpf).is_empty());
    assert!(events(&mut ebpf).is_empty());
    // The programs noticed: the malformed-packet health counter went up.
    let health: aya::maps::PerCpuArray<&MapData, u64> =
        aya::maps::PerCpuArray::try_from(ebpf.map("HEALTH").unwrap()).unwrap();
    let malformed: u64 = health
        .get(&(resil_common::maps::Health::Malformed as u32), 0)
        .unwrap()
        .iter()
        .sum();
    assert!(malformed > 0);
}

#[test]
fn non_tcp_traffic_passes_untouched() {
    let mut ebpf = load();
    let mut udp = tcp_frame(CLIENT4, SERVER4, 53, 53, 0, 0, 0, 8);
    udp[14 + 9] = 17;
    let mut arp = tcp_frame(CLIENT4, SERVER4, 0, 0, 0, 0, 0, 0);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    for frame in [udp, arp, vec![0u8; 14], vec![0xffu8; 1500]] {
        egress(&ebpf, &frame);
        ingress(&ebpf, &frame);
    }
    assert!(endpoints(&ebpf).is_empty());
    assert!(events(&mut ebpf).is_empty());
}
