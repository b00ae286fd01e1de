//! Turning a received SYN into the RST that answers it, in place: MACs, addresses and ports
//! swapped, a fresh hop limit, the RST's sequence fields, and both checksums updated in
//! software (RFC 1624), since XDP has no checksum helpers. Used to shed inbound SYNs at XDP.

use crate::{
    enforce::rst_for_syn,
    maps::FAMILY_IPV4,
    packet::{PacketBytes, TcpSegment},
};

/// TTL / hop limit of the RSTs resil sends.
pub const RST_HOPS: u8 = 64;

/// Bounds-checked, fixed-size writes into a packet.
pub trait PacketWrite: PacketBytes {
    /// Writes `bytes` at `offset`; `None` if they do not all fit inside the packet.
    fn write<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Option<()>;
}

/// The Internet checksum `check` after the bytes `old` of the summed data became `new`
/// (both of even length, aligned on 16-bit words of the data).
#[inline(always)]
pub fn checksum_update<const N: usize>(check: u16, old: &[u8; N], new: &[u8; N]) -> u16 {
    let mut sum = !check as u32;
    let mut i = 0;
    while i + 1 < N {
        sum += !u16::from_be_bytes([old[i], old[i + 1]]) as u32;
        sum += u16::from_be_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Rewrites the SYN `seg` (as parsed from `packet`) into the RST a closed port would answer,
/// ready to be sent back out of the interface it came in on. `None` if a field could not be
/// read or written (the packet is then in an unspecified state and must be dropped).
#[inline(always)]
pub fn syn_into_rst<P: PacketWrite + ?Sized>(packet: &P, seg: &TcpSegment) -> Option<()> {
    let ip = seg.ip_offset as usize;
    let tcp = seg.tcp_offset as usize;
    let macs: [u8; 12] = packet.read(0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    packet.write(0, swapped)?;
    // Swapping source and destination leaves every sum unchanged.
    if seg.family == FAMILY_IPV4 {
        let ttl_proto: [u8; 2] = packet.read(ip + 8)?;
        let fresh = [RST_HOPS, ttl_proto[1]];
        let check = u16::from_be_bytes(packet.read(ip + 10)?);
        packet.write(ip + 8, fresh)?;
        packet.write(
            ip + 10,
            checksum_update(check, &ttl_proto, &fresh).to_be_bytes(),
        )?;
        let addrs: [u8; 8] = packet.read(ip + 12)?;
        let mut swapped = [0u8; 8];
        swapped[..4].copy_from_slice(&addrs[4..]);
        swapped[4..].copy_from_slice(&addrs[..4]);
        packet.write(ip + 12, swapped)?;
    } else {
        packet.write(ip + 7, [RST_HOPS])?;
        packet.write(ip + 8, seg.dst)?;
        packet.write(ip + 24, seg.src)?;
    }
    let ports: [u8; 4] = packet.read(tcp)?;
    packet.write(tcp, [ports[2], ports[3], ports[0], ports[1]])?;
    // Sequence, acknowledgement, data offset and flags: 10 bytes, 5 whole words.
    let old: [u8; 10] = packet.read(tcp + 4)?;
    let (seq, ack, flags) = rst_for_syn(seg.seq, seg.payload_len);
    let mut new = old;
    new[..4].copy_from_slice(&seq.to_be_bytes());
    new[4..8].copy_from_slice(&ack.to_be_bytes());
    new[9] = flags;
    let check = u16::from_be_bytes(packet.read(tcp + 16)?);
    packet.write(tcp + 4, new)?;
    packet.write(tcp + 16, checksum_update(check, &old, &new).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{
        build::{tcp_frame, Addr},
        parse_ethernet, tcp_flags, Parsed,
    };
    use core::cell::RefCell;
    use std::vec::Vec;

    struct Frame(RefCell<Vec<u8>>);

    impl PacketBytes for Frame {
        fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
            self.0.borrow().as_slice().read(offset)
        }
        fn total_len(&self) -> usize {
            self.0.borrow().len()
        }
    }

    impl PacketWrite for Frame {
        fn write<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Option<()> {
            let mut frame = self.0.borrow_mut();
            frame
                .get_mut(offset..offset.checked_add(N)?)?
                .copy_from_slice(&bytes);
            Some(())
        }
    }

    fn sum(data: &[u8], mut acc: u32) -> u32 {
        for pair in data.chunks(2) {
            acc += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32;
        }
        acc
    }

    fn fold(mut acc: u32) -> u16 {
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    /// Fills in correct IPv4 and TCP checksums, as a real sender would.
    fn with_checksums(mut frame: Vec<u8>, v4: bool) -> Vec<u8> {
        let (ip_len, addr_at, addr_len) = if v4 { (20, 26, 8) } else { (40, 22, 32) };
        if v4 {
            frame[24..26].fill(0);
            let c = fold(sum(&frame[14..34], 0));
            frame[24..26].copy_from_slice(&c.to_be_bytes());
        }
        let tcp = 14 + ip_len;
        frame[tcp + 16..tcp + 18].fill(0);
        let tcp_len = frame.len() - tcp;
        let mut pseudo = sum(&frame[addr_at..addr_at + addr_len], 0);
        pseudo += 6 + tcp_len as u32;
        let c = fold(sum(&frame[tcp..], pseudo));
        frame[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
        frame
    }

    #[test]
    fn checksum_update_matches_a_full_recomputation() {
        let data = [0x45u8, 0, 0, 60, 1, 2, 0x40, 0, 17, 6, 0, 0];
        let before = fold(sum(&data, 0));
        let mut changed = data;
        changed[8] = 64;
        let after = checksum_update(before, &[17, 6], &[64, 6]);
        assert_eq!(after, fold(sum(&changed, 0)));
    }

    #[test]
    fn a_syn_becomes_the_rst_answering_it_with_valid_checksums() {
        let client4 = Addr::V4([10, 1, 0, 1]);
        let server4 = Addr::V4([10, 1, 0, 2]);
        let client6 = Addr::V6([0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let server6 = Addr::V6([0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        for (client, server, v4) in [(client4, server4, true), (client6, server6, false)] {
            let syn = tcp_frame(
                client,
                server,
                40000,
                8080,
                0xfffffff0,
                0,
                tcp_flags::SYN,
                0,
            );
            let syn = with_checksums(syn, v4);
            let Parsed::Tcp(seg) = parse_ethernet(syn.as_slice()) else {
                panic!("not parsed")
            };
            let frame = Frame(RefCell::new(syn.clone()));
            syn_into_rst(&frame, &seg).expect("rewritten");
            let rst = frame.0.into_inner();
            assert_eq!(rst, with_checksums(rst.clone(), v4), "checksums stay valid");
            assert_eq!((&rst[..6], &rst[6..12]), (&syn[6..12], &syn[..6]));
            let Parsed::Tcp(out) = parse_ethernet(rst.as_slice()) else {
                panic!("not parsed")
            };
            assert_eq!((out.src, out.dst), (server.bytes(), client.bytes()));
            assert_eq!((out.src_port, out.dst_port), (8080, 40000));
            assert_eq!((out.seq, out.ack), (0, 0xfffffff1));
            assert_eq!(out.flags, tcp_flags::RST | tcp_flags::ACK);
            let hops = if v4 { rst[14 + 8] } else { rst[14 + 7] };
            assert_eq!(hops, RST_HOPS);
        }
    }

    #[test]
    fn a_truncated_frame_is_refused() {
        let syn = tcp_frame(
            Addr::V4([1, 1, 1, 1]),
            Addr::V4([2, 2, 2, 2]),
            1,
            2,
            3,
            0,
            tcp_flags::SYN,
            0,
        );
        let Parsed::Tcp(seg) = parse_ethernet(syn.as_slice()) else {
            panic!("not parsed")
        };
        let frame = Frame(RefCell::new(syn[..40].to_vec()));
        assert_eq!(syn_into_rst(&frame, &seg), None);
    }
}
