//! Synthetic frames for tests: Ethernet + IPv4/IPv6 + TCP or ICMP. Checksums are left zero;
//! nothing resil parses depends on them.

extern crate std;
use std::vec::Vec;

/// An address of either family.
#[derive(Clone, Copy, Debug)]
pub enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Addr {
    /// The address in the 16-byte map layout (IPv4 in the first 4 bytes).
    pub fn bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        match self {
            Addr::V4(a) => out[..4].copy_from_slice(a),
            Addr::V6(a) => out = *a,
        }
        out
    }
}

fn ethernet(ethertype: u16, packet: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + packet.len());
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(packet);
    frame
}

fn ip(src: Addr, dst: Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match (src, dst) {
        (Addr::V4(s), Addr::V4(d)) => {
            let total = (20 + payload.len()) as u16;
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
            out.extend_from_slice(&s);
            out.extend_from_slice(&d);
        }
        (Addr::V6(s), Addr::V6(d)) => {
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            out.extend_from_slice(&[protocol, 64]);
            out.extend_from_slice(&s);
            out.extend_from_slice(&d);
        }
        _ => panic!("mixed address families"),
    }
    out.extend_from_slice(payload);
    out
}

fn ethertype(addr: Addr) -> u16 {
    match addr {
        Addr::V4(_) => 0x0800,
        Addr::V6(_) => 0x86dd,
    }
}

/// An IP packet (no Ethernet header) carrying a TCP segment with `payload_len` zero bytes.
#[allow(clippy::too_many_arguments)]
pub fn tcp_packet(
    src: Addr,
    dst: Addr,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload_len: usize,
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload_len);
    tcp.extend_from_slice(&src_port.to_be_bytes());
    tcp.extend_from_slice(&dst_port.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.resize(20 + payload_len, 0);
    ip(src, dst, 6, &tcp)
}

/// An Ethernet frame carrying [`tcp_packet`].
#[allow(clippy::too_many_arguments)]
pub fn tcp_frame(
    src: Addr,
    dst: Addr,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload_len: usize,
) -> Vec<u8> {
    let packet = tcp_packet(src, dst, src_port, dst_port, seq, ack, flags, payload_len);
    ethernet(ethertype(src), &packet)
}

/// An Ethernet frame carrying a UDP datagram with `payload`.
pub fn udp_frame(src: Addr, dst: Addr, src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&src_port.to_be_bytes());
    udp.extend_from_slice(&dst_port.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ethernet(ethertype(src), &ip(src, dst, 17, &udp))
}

/// An Ethernet frame with an ICMP (IPv4) or ICMPv6 destination-unreachable message quoting
/// `quoted` (an IP packet as built by [`tcp_packet`]).
pub fn icmp_unreachable_frame(src: Addr, dst: Addr, quoted: &[u8]) -> Vec<u8> {
    let (protocol, icmp_type) = match src {
        Addr::V4(_) => (1, 3),
        Addr::V6(_) => (58, 1),
    };
    let mut icmp = vec_with(&[icmp_type, 1, 0, 0, 0, 0, 0, 0]);
    // Quote the IP header and the first 8 bytes of TCP, as routers do at a minimum.
    let ip_header = match src {
        Addr::V4(_) => 20,
        Addr::V6(_) => 40,
    };
    icmp.extend_from_slice(&quoted[..(ip_header + 8).min(quoted.len())]);
    ethernet(ethertype(src), &ip(src, dst, protocol, &icmp))
}

fn vec_with(bytes: &[u8]) -> Vec<u8> {
    bytes.to_vec()
}
