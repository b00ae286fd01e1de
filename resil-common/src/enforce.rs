//! What the kernel does with a new connection to an endpoint that has a verdict, and how a
//! refused SYN becomes the RST sent back. Pure, shared by the programs and the host tests.

use crate::maps::{EndpointKey, Verdict, VerdictAction, FAMILY_IPV4, FAMILY_IPV6};
use crate::packet::tcp_flags;

/// The kernel's decision for one new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No verdict, or it expired: let it through.
    Allow,
    /// Refuse it at once.
    Refuse,
    /// Let it through, counting that it would have been refused.
    WouldRefuse,
    /// Let it through only with a probe token of this generation (try `probes` of them).
    TakeToken { generation: u32, probes: u32 },
}

/// Decides from the endpoint's verdict at `now_ns`.
#[inline(always)]
pub fn decide(verdict: Option<&Verdict>, now_ns: u64) -> Decision {
    let Some(v) = verdict else {
        return Decision::Allow;
    };
    if now_ns >= v.expires_ns {
        return Decision::Allow; // fail open: the daemon stopped refreshing it
    }
    match v.action {
        a if a == VerdictAction::Refuse as u32 => Decision::Refuse,
        a if a == VerdictAction::Observe as u32 => Decision::WouldRefuse,
        a if a == VerdictAction::Probe as u32 => Decision::TakeToken {
            generation: v.generation,
            probes: v.probes,
        },
        _ => Decision::Allow,
    }
}

/// The endpoint of an IPv4 `connect()`, from the socket-address hook's fields (network byte
/// order in native-endian words, as the kernel gives them).
#[inline(always)]
pub fn connect4_endpoint(ip4: u32, port: u32) -> EndpointKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip4.to_ne_bytes());
    EndpointKey {
        addr,
        port: u16::from_be(port as u16),
        family: FAMILY_IPV4,
        direction: 0,
    }
}

/// The endpoint of an IPv6 `connect()`. An IPv4-mapped address (a dual-stack socket reaching
/// an IPv4 peer) is keyed as the IPv4 endpoint it really is.
#[inline(always)]
pub fn connect6_endpoint(ip6: [u32; 4], port: u32) -> EndpointKey {
    let mut bytes = [0u8; 16];
    for (i, word) in ip6.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let mapped = bytes[..10] == [0u8; 10] && bytes[10] == 0xff && bytes[11] == 0xff;
    if mapped {
        return connect4_endpoint(
            u32::from_ne_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
            port,
        );
    }
    EndpointKey {
        addr: bytes,
        port: u16::from_be(port as u16),
        family: FAMILY_IPV6,
        direction: 0,
    }
}

/// The header fields of the RST that answers a SYN: no sequence of its own, acknowledging the
/// SYN (and any data it carried), flags RST|ACK — what a closed port answers.
#[inline(always)]
pub fn rst_for_syn(syn_seq: u32, syn_payload_len: u32) -> (u32, u32, u8) {
    (
        0,
        syn_seq.wrapping_add(1).wrapping_add(syn_payload_len),
        tcp_flags::RST | tcp_flags::ACK,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(action: VerdictAction) -> Verdict {
        Verdict {
            expires_ns: 1_000,
            action: action as u32,
            generation: 7,
            probes: 2,
            _pad: 0,
        }
    }

    #[test]
    fn decisions_and_expiry() {
        assert_eq!(decide(None, 0), Decision::Allow);
        assert_eq!(
            decide(Some(&verdict(VerdictAction::Refuse)), 999),
            Decision::Refuse
        );
        assert_eq!(
            decide(Some(&verdict(VerdictAction::Refuse)), 1_000),
            Decision::Allow,
            "expired: fail open"
        );
        assert_eq!(
            decide(Some(&verdict(VerdictAction::Observe)), 0),
            Decision::WouldRefuse
        );
        assert_eq!(
            decide(Some(&verdict(VerdictAction::Probe)), 0),
            Decision::TakeToken {
                generation: 7,
                probes: 2
            }
        );
        let bogus = Verdict {
            action: 99,
            ..verdict(VerdictAction::Refuse)
        };
        assert_eq!(decide(Some(&bogus), 0), Decision::Allow);
    }

    #[test]
    fn connect_endpoints_of_both_families() {
        // 10.0.0.2:80 as the hook sees it: network order in native-endian words.
        let ip4 = u32::from_ne_bytes([10, 0, 0, 2]);
        let port = u32::from(80u16.to_be());
        let k = connect4_endpoint(ip4, port);
        assert_eq!(
            (&k.addr[..4], k.port, k.family),
            (&[10, 0, 0, 2][..], 80, FAMILY_IPV4)
        );
        let words = |b: [u8; 16]| {
            let mut w = [0u32; 4];
            for i in 0..4 {
                w[i] = u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
            }
            w
        };
        let v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let k = connect6_endpoint(words(v6), port);
        assert_eq!((k.addr, k.family), (v6, FAMILY_IPV6));
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2];
        let k = connect6_endpoint(words(mapped), port);
        assert_eq!((&k.addr[..4], k.family), (&[10, 0, 0, 2][..], FAMILY_IPV4));
        assert_eq!(k.addr[4..], [0u8; 12]);
    }

    #[test]
    fn the_rst_acknowledges_the_syn_and_its_data() {
        assert_eq!(
            rst_for_syn(100, 0),
            (0, 101, tcp_flags::RST | tcp_flags::ACK)
        );
        assert_eq!(rst_for_syn(u32::MAX, 10).1, 10);
    }
}
