//! The BPF programs on synthetic packets through BPF_PROG_TEST_RUN: what they count for real
//! handshakes, and that truncated or malformed packets pass untouched and are never misread.

use aya::{
    maps::{HashMap, MapData, PerCpuHashMap, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use resil_common::{
    maps::{
        ConnKey, ConnState, DnsEvent, DnsKind, EndpointKey, EndpointStats, HandshakeKind, Phase,
        Verdict, VerdictAction,
    },
    packet::{
        build::{icmp_unreachable_frame, tcp_frame, tcp_packet, udp_frame, Addr},
        parse_ethernet,
        tcp_flags::{ACK, RST, SYN},
        Parsed,
    },
};
use resil_tests::require_root;
use resil_user::probes::OBJECT;

/// The egress observer never changes a packet's fate: TC_ACT_UNSPEC (-1), "next program".
const TC_ACT_UNSPEC: u32 = u32::MAX;
/// Nor does the ingress observer, unless it sheds.
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

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
    let p: &mut SchedClassifier = ebpf
        .program_mut("resil_tc_egress")
        .unwrap()
        .try_into()
        .unwrap();
    p.load().expect("the verifier accepts the egress program");
    let p: &mut Xdp = ebpf
        .program_mut("resil_xdp_ingress")
        .unwrap()
        .try_into()
        .unwrap();
    p.load().expect("the verifier accepts the ingress program");
    ebpf
}

/// Runs a program on `frame`; returns its verdict and the frame as it left.
fn run<P>(program: &P, frame: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN on {} bytes {frame:02x?}: {e}",
                frame.len()
            )
        });
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn egress(ebpf: &Ebpf, frame: &[u8]) {
    let p: &SchedClassifier = ebpf.program("resil_tc_egress").unwrap().try_into().unwrap();
    assert_eq!(run(p, frame).0, TC_ACT_UNSPEC);
}

fn xdp(ebpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    let p: &Xdp = ebpf
        .program("resil_xdp_ingress")
        .unwrap()
        .try_into()
        .unwrap();
    run(p, frame)
}

fn ingress(ebpf: &Ebpf, frame: &[u8]) {
    assert_eq!(xdp(ebpf, frame).0, XDP_PASS);
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

fn dns_events(ebpf: &mut Ebpf) -> Vec<DnsEvent> {
    let mut ring = RingBuf::try_from(ebpf.map_mut("DNS").unwrap()).unwrap();
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.push(resil_user::resolvers::decode_event(&item).expect("a whole record"));
    }
    events
}

#[test]
fn dns_queries_and_answers_are_reported_once_each_with_the_answer_bytes() {
    let mut ebpf = load();
    for (client, resolver) in [(CLIENT4, SERVER4), (CLIENT6, SERVER6)] {
        let query = [
            0xbe, 0xef, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a', b'p', b'i', 0, 0, 1, 0, 1,
        ];
        egress(&ebpf, &udp_frame(client, resolver, 40053, 53, &query));
        let mut answer = query.to_vec();
        answer[2] = 0x81;
        answer[3] = 0x83; // NXDOMAIN
        ingress(&ebpf, &udp_frame(resolver, client, 53, 40053, &answer));
        // An answer nobody asked for (or a second one) is not reported.
        ingress(&ebpf, &udp_frame(resolver, client, 53, 40053, &answer));
        // A large answer is cut to the capture size.
        let big = vec![0x11u8; 1400];
        egress(&ebpf, &udp_frame(client, resolver, 40053, 53, &big[..40]));
        ingress(&ebpf, &udp_frame(resolver, client, 53, 40053, &big));
        // Other UDP passes unseen.
        egress(&ebpf, &udp_frame(client, resolver, 40000, 5353, &query));
        ingress(&ebpf, &udp_frame(resolver, client, 123, 40000, &query));
        let events = dns_events(&mut ebpf);
        assert_eq!(events.len(), 4, "{events:?}");
        let kinds: Vec<_> = events.iter().map(|e| DnsKind::from_u8(e.kind)).collect();
        assert_eq!(
            kinds,
            [
                Some(DnsKind::Query),
                Some(DnsKind::Answer),
                Some(DnsKind::Query),
                Some(DnsKind::Answer)
            ]
        );
        for e in &events {
            assert_eq!(e.conn.remote_addr, resolver.bytes());
            assert_eq!((e.conn.local_port, e.conn.remote_port), (40053, 53));
        }
        assert_eq!(
            (&events[0].message[..2], events[0].len),
            (&[0xbe, 0xef][..], 2)
        );
        assert_eq!(events[1].len as usize, answer.len());
        assert_eq!(&events[1].message[..answer.len()], answer.as_slice());
        assert_eq!(events[3].len as usize, resil_common::maps::DNS_CAPTURE);
    }
    assert!(
        endpoints(&ebpf).is_empty(),
        "UDP is not counted as TCP endpoints"
    );
}

#[test]
fn a_syn_to_a_shed_service_is_answered_with_a_rst_from_xdp() {
    let mut ebpf = load();
    for (client, server) in [(CLIENT4, SERVER4), (CLIENT6, SERVER6)] {
        let service = EndpointKey {
            addr: server.bytes(),
            port: 8080,
            family: if matches!(server, Addr::V4(_)) { 2 } else { 10 },
            direction: 1,
        };
        // A client whose SYN came before the verdict: its retransmission is let through.
        let early = tcp_frame(client, server, 39000, 8080, 5, 0, SYN, 0);
        ingress(&ebpf, &early);
        {
            let mut verdicts: HashMap<&mut MapData, EndpointKey, Verdict> =
                HashMap::try_from(ebpf.map_mut("VERDICTS").unwrap()).unwrap();
            let verdict = Verdict {
                expires_ns: u64::MAX,
                action: VerdictAction::Refuse as u32,
                ..Verdict::default()
            };
            verdicts.insert(service, verdict, 0).unwrap();
        }
        ingress(&ebpf, &early);
        let syn = tcp_frame(client, server, 40000, 8080, 77, 0, SYN, 0);
        let (action, out) = xdp(&ebpf, &syn);
        assert_eq!(action, XDP_TX);
        let Parsed::Tcp(rst) = parse_ethernet(out.as_slice()) else {
            panic!("not TCP: {out:02x?}")
        };
        assert_eq!((rst.src, rst.dst), (server.bytes(), client.bytes()));
        assert_eq!((rst.src_port, rst.dst_port, rst.ack), (8080, 40000, 78));
        assert_eq!(rst.flags, RST | ACK);
        // Another port of the same host is not shed; nor is anything but a SYN.
        ingress(
            &ebpf,
            &tcp_frame(client, server, 40000, 8081, 77, 0, SYN, 0),
        );
        ingress(
            &ebpf,
            &tcp_frame(client, server, 40001, 8080, 77, 1, ACK, 0),
        );
        let stats = endpoints(&ebpf)
            .into_iter()
            .find(|(k, _)| *k == service)
            .map(|(_, s)| s)
            .expect("the shed service is counted");
        assert_eq!(stats.fast_failed, 1);
        // An expired verdict sheds nothing: a dead daemon never blocks a service.
        let mut verdicts: HashMap<&mut MapData, EndpointKey, Verdict> =
            HashMap::try_from(ebpf.map_mut("VERDICTS").unwrap()).unwrap();
        verdicts
            .insert(
                service,
                Verdict {
                    expires_ns: 1,
                    action: VerdictAction::Refuse as u32,
                    ..Verdict::default()
                },
                0,
            )
            .unwrap();
        ingress(
            &ebpf,
            &tcp_frame(client, server, 40002, 8080, 99, 0, SYN, 0),
        );
    }
}

#[test]
fn non_tcp_traffic_passes_untouched() {
    let mut ebpf = load();
    let udp = udp_frame(CLIENT4, SERVER4, 5000, 5001, &[0u8; 8]);
    let mut arp = tcp_frame(CLIENT4, SERVER4, 0, 0, 0, 0, 0, 0);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    for frame in [udp, arp, vec![0u8; 14], vec![0xffu8; 1500]] {
        egress(&ebpf, &frame);
        ingress(&ebpf, &frame);
    }
    assert!(endpoints(&ebpf).is_empty());
    assert!(events(&mut ebpf).is_empty());
}
