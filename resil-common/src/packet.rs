//! Header parsing over any byte source: a slice on the host, the socket buffer in the kernel.
//!
//! Every read goes through [`PacketBytes::read`], which returns `None` past the end, so a
//! truncated or malformed packet yields [`Parsed::Malformed`] or [`Parsed::Other`], never a
//! misread field.

use crate::maps::{FAMILY_IPV4, FAMILY_IPV6};

/// Bounds-checked, fixed-size reads from a packet.
pub trait PacketBytes {
    /// The `N` bytes at `offset`, or `None` if they are not all inside the packet.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;

    /// The packet's length in bytes (used only where the IP header leaves it out: BIG TCP
    /// packets over 64 KiB carry a length field of 0).
    fn total_len(&self) -> usize;
}

impl PacketBytes for [u8] {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let bytes = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
    }

    fn total_len(&self) -> usize {
        self.len()
    }
}

/// TCP flag bits.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMP_FRAGMENTATION_NEEDED: u8 = 4;
/// IPv6 extension headers skipped before the transport header, at most.
const MAX_IPV6_EXTENSIONS: usize = 4;

// The parse results are `#[repr(C)]` without implicit padding: the BPF programs pass them
// between functions, and the verifier refuses to copy stack bytes nobody wrote.

/// A TCP segment's addressing and the header fields the tracker needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpSegment {
    pub seq: u32,
    pub ack: u32,
    /// Payload bytes after the TCP header (from the IP length fields, not the frame size).
    pub payload_len: u32,
    /// Offset of the IP header in the frame.
    pub ip_offset: u32,
    /// Offset of the TCP header in the frame.
    pub tcp_offset: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub family: u8,
    pub flags: u8,
    /// The IPv4 TTL or IPv6 hop limit it arrived with.
    pub ttl: u8,
    pub _pad: [u8; 1],
}

/// The TCP flow quoted inside an ICMP destination-unreachable message, as it was sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QuotedFlow {
    /// The quoted segment's sequence number (for a SYN: the sender's initial one).
    pub seq: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// A UDP datagram's addressing and where its payload lies in the frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UdpDatagram {
    /// Offset of the payload in the frame.
    pub payload_offset: u32,
    /// Payload bytes, from the UDP length field.
    pub payload_len: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// What a frame turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A TCP segment.
    Tcp(TcpSegment),
    /// A UDP datagram (the first fragment, if fragmented).
    Udp(UdpDatagram),
    /// ICMP or ICMPv6 destination unreachable quoting a TCP packet.
    Unreachable(QuotedFlow),
    /// Not something resil tracks (ARP, a non-first fragment, other ICMP …).
    Other,
    /// TCP, UDP or ICMP whose headers are truncated or inconsistent.
    Malformed,
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
fn be32(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

#[inline(always)]
fn v4(addr: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0] = addr[0];
    out[1] = addr[1];
    out[2] = addr[2];
    out[3] = addr[3];
    out
}

/// Network header found in a frame: family, addresses, transport protocol and where its
/// header starts, and how many bytes the IP header says follow it.
struct Network {
    family: u8,
    /// TTL or hop limit.
    ttl: u8,
    l3_offset: usize,
    src: [u8; 16],
    dst: [u8; 16],
    protocol: u8,
    l4_offset: usize,
    l4_len: usize,
}

enum NetworkResult {
    Found(Network),
    Other,
    Malformed,
}

/// Parses an Ethernet frame (up to two VLAN tags, as in 802.1ad QinQ).
#[inline(always)]
pub fn parse_ethernet<P: PacketBytes + ?Sized>(packet: &P) -> Parsed {
    let mut l3 = ETH_HEADER;
    let Some(mut ethertype) = packet.read::<2>(12).map(be16) else {
        return Parsed::Other;
    };
    for _ in 0..2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        // The tag's 2 bytes of TCI, then the next ethertype.
        match packet.read::<2>(l3 + 2).map(be16) {
            Some(inner) => ethertype = inner,
            None => return Parsed::Other,
        }
        l3 += 4;
    }
    let network = match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(packet, l3),
        ETHERTYPE_IPV6 => parse_ipv6(packet, l3),
        _ => return Parsed::Other,
    };
    match network {
        NetworkResult::Found(net) => parse_transport(packet, &net),
        NetworkResult::Other => Parsed::Other,
        NetworkResult::Malformed => Parsed::Malformed,
    }
}

#[inline(always)]
fn parse_ipv4<P: PacketBytes + ?Sized>(packet: &P, at: usize) -> NetworkResult {
    let Some(h) = packet.read::<20>(at) else {
        return NetworkResult::Malformed;
    };
    let header_len = ((h[0] & 0x0f) as usize) * 4;
    let total_len = match be16([h[2], h[3]]) as usize {
        // BIG TCP: a GSO packet over 64 KiB; the packet's own length is the truth.
        0 => packet.total_len().saturating_sub(at),
        len => len,
    };
    if h[0] >> 4 != 4 || header_len < 20 || total_len < header_len {
        return NetworkResult::Malformed;
    }
    let fragment_offset = be16([h[6], h[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return NetworkResult::Other;
    }
    NetworkResult::Found(Network {
        family: FAMILY_IPV4,
        ttl: h[8],
        l3_offset: at,
        src: v4([h[12], h[13], h[14], h[15]]),
        dst: v4([h[16], h[17], h[18], h[19]]),
        protocol: h[9],
        l4_offset: at + header_len,
        l4_len: total_len - header_len,
    })
}

#[inline(always)]
fn parse_ipv6<P: PacketBytes + ?Sized>(packet: &P, at: usize) -> NetworkResult {
    let Some(h) = packet.read::<40>(at) else {
        return NetworkResult::Malformed;
    };
    if h[0] >> 4 != 6 {
        return NetworkResult::Malformed;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let payload_len = match be16([h[4], h[5]]) as usize {
        // BIG TCP (or a jumbogram): the packet's own length is the truth.
        0 => packet.total_len().saturating_sub(at + 40),
        len => len,
    };
    let mut next = h[6];
    let mut offset = at + 40;
    let mut extensions_len = 0usize;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units after the first 8.
            0 | 43 | 60 => {
                let Some(ext) = packet.read::<2>(offset) else {
                    return NetworkResult::Malformed;
                };
                let len = (ext[1] as usize + 1) * 8;
                next = ext[0];
                offset += len;
                extensions_len += len;
            }
            // Authentication header: length in 4-byte units after the first 8.
            51 => {
                let Some(ext) = packet.read::<2>(offset) else {
                    return NetworkResult::Malformed;
                };
                let len = (ext[1] as usize + 2) * 4;
                next = ext[0];
                offset += len;
                extensions_len += len;
            }
            // Fragment header: only the first fragment carries the transport header.
            44 => {
                let Some(ext) = packet.read::<4>(offset) else {
                    return NetworkResult::Malformed;
                };
                if be16([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return NetworkResult::Other;
                }
                next = ext[0];
                offset += 8;
                extensions_len += 8;
            }
            _ => break,
        }
    }
    if extensions_len > payload_len {
        return NetworkResult::Malformed;
    }
    NetworkResult::Found(Network {
        family: FAMILY_IPV6,
        ttl: h[7],
        l3_offset: at,
        src,
        dst,
        protocol: next,
        l4_offset: offset,
        l4_len: payload_len - extensions_len,
    })
}

#[inline(always)]
fn parse_transport<P: PacketBytes + ?Sized>(packet: &P, net: &Network) -> Parsed {
    match (net.family, net.protocol) {
        (_, PROTO_TCP) => parse_tcp(packet, net),
        (_, PROTO_UDP) => parse_udp(packet, net),
        (FAMILY_IPV4, PROTO_ICMP) => parse_icmp_unreachable(packet, net, ICMP_DEST_UNREACHABLE),
        (FAMILY_IPV6, PROTO_ICMPV6) => parse_icmp_unreachable(packet, net, ICMPV6_DEST_UNREACHABLE),
        _ => Parsed::Other,
    }
}

#[inline(always)]
fn parse_tcp<P: PacketBytes + ?Sized>(packet: &P, net: &Network) -> Parsed {
    let Some(t) = packet.read::<20>(net.l4_offset) else {
        return Parsed::Malformed;
    };
    let header_len = ((t[12] >> 4) as usize) * 4;
    if header_len < 20 || header_len > net.l4_len {
        return Parsed::Malformed;
    }
    Parsed::Tcp(TcpSegment {
        family: net.family,
        src: net.src,
        dst: net.dst,
        src_port: be16([t[0], t[1]]),
        dst_port: be16([t[2], t[3]]),
        seq: be32([t[4], t[5], t[6], t[7]]),
        ack: be32([t[8], t[9], t[10], t[11]]),
        flags: t[13],
        payload_len: (net.l4_len - header_len) as u32,
        ip_offset: net.l3_offset as u32,
        tcp_offset: net.l4_offset as u32,
        ttl: net.ttl,
        _pad: [0; 1],
    })
}

#[inline(always)]
fn parse_udp<P: PacketBytes + ?Sized>(packet: &P, net: &Network) -> Parsed {
    let Some(u) = packet.read::<8>(net.l4_offset) else {
        return Parsed::Malformed;
    };
    let len = be16([u[4], u[5]]) as usize;
    // Length 0 is an IPv6 jumbogram. A first fragment holds less than the UDP length says:
    // what is there is still read correctly.
    let len = if len == 0 {
        net.l4_len
    } else {
        len.min(net.l4_len)
    };
    if len < 8 {
        return Parsed::Malformed;
    }
    Parsed::Udp(UdpDatagram {
        family: net.family,
        src: net.src,
        dst: net.dst,
        src_port: be16([u[0], u[1]]),
        dst_port: be16([u[2], u[3]]),
        payload_offset: (net.l4_offset + 8) as u32,
        payload_len: (len - 8) as u32,
        _pad: [0; 3],
    })
}

/// ICMP (type 3) or ICMPv6 (type 1) destination unreachable, quoting a TCP packet.
#[inline(always)]
fn parse_icmp_unreachable<P: PacketBytes + ?Sized>(
    packet: &P,
    net: &Network,
    unreachable_type: u8,
) -> Parsed {
    let Some(icmp) = packet.read::<2>(net.l4_offset) else {
        return Parsed::Malformed;
    };
    if icmp[0] != unreachable_type {
        return Parsed::Other;
    }
    // IPv4 "fragmentation needed" is path MTU discovery, not an unreachable destination.
    if net.family == FAMILY_IPV4 && icmp[1] == ICMP_FRAGMENTATION_NEEDED {
        return Parsed::Other;
    }
    // The quoted packet follows the 8-byte ICMP header.
    let quoted = net.l4_offset + 8;
    let inner = if net.family == FAMILY_IPV4 {
        parse_ipv4(packet, quoted)
    } else {
        parse_ipv6(packet, quoted)
    };
    let inner = match inner {
        NetworkResult::Found(inner) if inner.protocol == PROTO_TCP => inner,
        NetworkResult::Found(_) | NetworkResult::Other => return Parsed::Other,
        NetworkResult::Malformed => return Parsed::Malformed,
    };
    // ICMP quotes at least the first 8 bytes of the transport header: ports and sequence.
    let Some(t) = packet.read::<8>(inner.l4_offset) else {
        return Parsed::Malformed;
    };
    Parsed::Unreachable(QuotedFlow {
        family: inner.family,
        src: inner.src,
        dst: inner.dst,
        src_port: be16([t[0], t[1]]),
        dst_port: be16([t[2], t[3]]),
        seq: be32([t[4], t[5], t[6], t[7]]),
        _pad: [0; 3],
    })
}

/// Builders for synthetic frames, for tests on the host and for `BPF_PROG_TEST_RUN`.
#[cfg(any(test, feature = "user"))]
pub mod build;

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const A4: [u8; 4] = [10, 0, 0, 1];
    const B4: [u8; 4] = [10, 0, 0, 2];
    const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    #[test]
    fn parses_ipv4_tcp() {
        let frame = tcp_frame(
            Addr::V4(A4),
            Addr::V4(B4),
            40000,
            80,
            7,
            9,
            tcp_flags::SYN,
            5,
        );
        match parse_ethernet(frame.as_slice()) {
            Parsed::Tcp(seg) => {
                assert_eq!(seg.family, FAMILY_IPV4);
                assert_eq!(&seg.src[..4], &A4);
                assert_eq!(seg.src[4..], [0u8; 12]);
                assert_eq!(&seg.dst[..4], &B4);
                assert_eq!((seg.src_port, seg.dst_port), (40000, 80));
                assert_eq!((seg.seq, seg.ack), (7, 9));
                assert_eq!(seg.flags, tcp_flags::SYN);
                assert_eq!(seg.payload_len, 5);
                assert_eq!((seg.ip_offset, seg.tcp_offset), (14, 34));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_ipv6_tcp() {
        let frame = tcp_frame(Addr::V6(A6), Addr::V6(B6), 1, 2, 3, 4, tcp_flags::ACK, 100);
        match parse_ethernet(frame.as_slice()) {
            Parsed::Tcp(seg) => {
                assert_eq!(seg.family, FAMILY_IPV6);
                assert_eq!(seg.src, A6);
                assert_eq!(seg.dst, B6);
                assert_eq!(seg.payload_len, 100);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_icmp_unreachable_both_families() {
        for (outer_src, outer_dst, a, b) in [
            (Addr::V4(B4), Addr::V4(A4), Addr::V4(A4), Addr::V4(B4)),
            (Addr::V6(B6), Addr::V6(A6), Addr::V6(A6), Addr::V6(B6)),
        ] {
            let quoted = tcp_packet(a, b, 40000, 443, 1, 0, tcp_flags::SYN, 0);
            let frame = icmp_unreachable_frame(outer_src, outer_dst, &quoted);
            match parse_ethernet(frame.as_slice()) {
                Parsed::Unreachable(flow) => {
                    assert_eq!(flow.src, a.bytes());
                    assert_eq!(flow.dst, b.bytes());
                    assert_eq!((flow.src_port, flow.dst_port, flow.seq), (40000, 443, 1));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn parses_double_vlan_tags() {
        let frame = tcp_frame(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 4, tcp_flags::SYN, 0);
        let mut tagged = frame[..12].to_vec();
        tagged.extend_from_slice(&[0x88, 0xa8, 0, 10, 0x81, 0x00, 0, 20]);
        tagged.extend_from_slice(&frame[12..]);
        match parse_ethernet(tagged.as_slice()) {
            Parsed::Tcp(seg) => assert_eq!((seg.src_port, seg.dst_port), (1, 2)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn big_tcp_lengths_come_from_the_packet() {
        let mut frame = tcp_frame(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 4, tcp_flags::ACK, 100);
        frame[16] = 0;
        frame[17] = 0;
        match parse_ethernet(frame.as_slice()) {
            Parsed::Tcp(seg) => assert_eq!(seg.payload_len, 100),
            other => panic!("{other:?}"),
        }
        let mut frame = tcp_frame(Addr::V6(A6), Addr::V6(B6), 1, 2, 3, 4, tcp_flags::ACK, 100);
        frame[18] = 0;
        frame[19] = 0;
        match parse_ethernet(frame.as_slice()) {
            Parsed::Tcp(seg) => assert_eq!(seg.payload_len, 100),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn skips_an_ipv6_authentication_header() {
        let frame = tcp_frame(Addr::V6(A6), Addr::V6(B6), 1, 2, 3, 4, tcp_flags::SYN, 0);
        let mut with_ah = frame[..14 + 40].to_vec();
        with_ah[14 + 6] = 51;
        let payload_len = u16::from_be_bytes([with_ah[18], with_ah[19]]) + 12;
        with_ah[18..20].copy_from_slice(&payload_len.to_be_bytes());
        // AH: next header TCP, length 1 → (1 + 2) × 4 = 12 bytes.
        with_ah.extend_from_slice(&[6, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
        with_ah.extend_from_slice(&frame[14 + 40..]);
        match parse_ethernet(with_ah.as_slice()) {
            Parsed::Tcp(seg) => {
                assert_eq!((seg.src_port, seg.dst_port, seg.payload_len), (1, 2, 0))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn path_mtu_messages_are_not_unreachable() {
        let quoted = tcp_packet(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 0, tcp_flags::ACK, 0);
        let mut frame = icmp_unreachable_frame(Addr::V4(B4), Addr::V4(A4), &quoted);
        frame[14 + 20 + 1] = 4;
        assert_eq!(parse_ethernet(frame.as_slice()), Parsed::Other);
    }

    #[test]
    fn every_truncation_is_other_or_malformed_never_a_misread() {
        // Each frame with the number of bytes its parse needs: headers only for TCP, the
        // quoted ports for ICMP.
        let quoted = tcp_packet(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 0, tcp_flags::SYN, 0);
        let quoted6 = tcp_packet(Addr::V6(A6), Addr::V6(B6), 1, 2, 3, 0, tcp_flags::SYN, 0);
        for (frame, needed) in [
            (
                tcp_frame(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 4, tcp_flags::SYN, 0),
                54,
            ),
            (
                tcp_frame(Addr::V6(A6), Addr::V6(B6), 1, 2, 3, 4, tcp_flags::SYN, 0),
                74,
            ),
            (
                icmp_unreachable_frame(Addr::V4(B4), Addr::V4(A4), &quoted),
                14 + 20 + 8 + 20 + 4,
            ),
            (
                icmp_unreachable_frame(Addr::V6(B6), Addr::V6(A6), &quoted6),
                14 + 40 + 8 + 40 + 4,
            ),
        ] {
            assert!(!matches!(
                parse_ethernet(frame.as_slice()),
                Parsed::Other | Parsed::Malformed
            ));
            for cut in 0..needed {
                let parsed = parse_ethernet(&frame[..cut]);
                assert!(
                    matches!(parsed, Parsed::Other | Parsed::Malformed),
                    "cut at {cut}: {parsed:?}"
                );
            }
        }
    }

    #[test]
    fn parse_results_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<TcpSegment>(), 20 + 4 + 32 + 4);
        assert_eq!(size_of::<QuotedFlow>(), 4 + 4 + 32 + 4);
        assert_eq!(size_of::<UdpDatagram>(), 8 + 4 + 32 + 4);
    }

    #[test]
    fn parses_udp_both_families() {
        for (src, dst, ip_len) in [
            (Addr::V4(A4), Addr::V4(B4), 20),
            (Addr::V6(A6), Addr::V6(B6), 40),
        ] {
            let frame = udp_frame(src, dst, 5353, 53, b"hello");
            match parse_ethernet(frame.as_slice()) {
                Parsed::Udp(d) => {
                    assert_eq!((d.src_port, d.dst_port, d.payload_len), (5353, 53, 5));
                    assert_eq!(d.payload_offset as usize, 14 + ip_len + 8);
                    assert_eq!((d.src, d.dst), (src.bytes(), dst.bytes()));
                }
                other => panic!("{other:?}"),
            }
            for cut in 0..14 + ip_len + 8 {
                let parsed = parse_ethernet(&frame[..cut]);
                assert!(
                    matches!(parsed, Parsed::Other | Parsed::Malformed),
                    "cut at {cut}: {parsed:?}"
                );
            }
        }
        // A UDP length below its own header is malformed; one beyond the packet is cut to it.
        let mut frame = udp_frame(Addr::V4(A4), Addr::V4(B4), 1, 53, b"abc");
        frame[14 + 20 + 5] = 7;
        assert_eq!(parse_ethernet(frame.as_slice()), Parsed::Malformed);
        frame[14 + 20 + 5] = 200;
        assert!(matches!(parse_ethernet(frame.as_slice()), Parsed::Udp(d) if d.payload_len == 3));
    }

    #[test]
    fn inconsistent_lengths_are_malformed() {
        let mut frame = tcp_frame(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 4, tcp_flags::SYN, 0);
        frame[14] = 0x44; // IHL 4 (16 bytes) is below the minimum
        assert_eq!(parse_ethernet(frame.as_slice()), Parsed::Malformed);
        let mut frame = tcp_frame(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 4, tcp_flags::SYN, 0);
        frame[14 + 20 + 12] = 0x40; // TCP data offset 4
        assert_eq!(parse_ethernet(frame.as_slice()), Parsed::Malformed);
        let mut frame = tcp_frame(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 4, tcp_flags::SYN, 0);
        frame[14 + 2] = 0;
        frame[14 + 3] = 30; // total length shorter than IP + TCP headers
        assert_eq!(parse_ethernet(frame.as_slice()), Parsed::Malformed);
        let mut frame = tcp_frame(Addr::V6(A6), Addr::V6(B6), 1, 2, 3, 4, tcp_flags::SYN, 0);
        frame[14] = 0x40; // says version 4 inside an IPv6 ethertype
        assert_eq!(parse_ethernet(frame.as_slice()), Parsed::Malformed);
    }

    #[test]
    fn non_first_fragments_and_other_protocols_are_other() {
        let mut frame = tcp_frame(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 4, tcp_flags::SYN, 0);
        frame[14 + 7] = 1; // fragment offset 8 bytes
        assert_eq!(parse_ethernet(frame.as_slice()), Parsed::Other);
        let mut frame = tcp_frame(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 4, tcp_flags::SYN, 0);
        frame[14 + 9] = 47; // GRE
        assert_eq!(parse_ethernet(frame.as_slice()), Parsed::Other);
        let mut frame = tcp_frame(Addr::V4(A4), Addr::V4(B4), 1, 2, 3, 4, tcp_flags::SYN, 0);
        frame[12] = 0x08;
        frame[13] = 0x06; // ARP
        assert_eq!(parse_ethernet(frame.as_slice()), Parsed::Other);
    }

    #[test]
    fn skips_ipv6_extension_headers() {
        let frame = tcp_frame(Addr::V6(A6), Addr::V6(B6), 1, 2, 3, 4, tcp_flags::SYN, 0);
        // Insert an 8-byte destination-options header between IPv6 and TCP.
        let mut with_ext = frame[..14 + 40].to_vec();
        with_ext[14 + 6] = 60;
        let payload_len = u16::from_be_bytes([with_ext[18], with_ext[19]]) + 8;
        with_ext[18..20].copy_from_slice(&payload_len.to_be_bytes());
        with_ext.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
        with_ext.extend_from_slice(&frame[14 + 40..]);
        match parse_ethernet(with_ext.as_slice()) {
            Parsed::Tcp(seg) => assert_eq!((seg.src_port, seg.dst_port), (1, 2)),
            other => panic!("{other:?}"),
        }
    }
}
