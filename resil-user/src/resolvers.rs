//! DNS health per resolver, from the queries leaving and the answers arriving over UDP: query
//! rate, answer latency, timeouts, SERVFAIL and NXDOMAIN; and the names answers give
//! addresses. (DNS over TCP is a TCP endpoint like any other, port 53.)
//!
//! An answer counts only if it matches a query in flight (same flow, same id); only such
//! answers teach names, so a spoofed packet cannot rename an address.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use resil_common::{
    histogram::Histogram,
    maps::{ConnKey, Direction, DnsEvent, DnsKind},
};
use serde::{Deserialize, Serialize};
use simple_dns::{rdata::RData, Packet};

use crate::{deadlines::Deadlines, endpoints::socket_addr, names::Names, recent::Recent};

/// Queries followed at once, at most.
const MAX_PENDING: usize = 65_536;
/// Resolvers kept, at most (a node talks to a handful).
const MAX_RESOLVERS: usize = 1_024;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;

/// Decodes one DNS ring-buffer record; `None` if it is too short.
pub fn decode_event(bytes: &[u8]) -> Option<DnsEvent> {
    if bytes.len() < std::mem::size_of::<DnsEvent>() {
        return None;
    }
    // SAFETY: length checked; DnsEvent is plain old data, read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DnsEvent>()) })
}

/// Cumulative figures of one resolver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsCounts {
    /// Queries sent to it.
    pub queries: u64,
    /// Answers matched to a query.
    pub answers: u64,
    /// Queries without an answer within the DNS timeout.
    pub timeouts: u64,
    /// Answers with rcode SERVFAIL.
    pub servfail: u64,
    /// Answers with rcode NXDOMAIN.
    pub nxdomain: u64,
    /// Answers with another error rcode (REFUSED, FORMERR …).
    pub other_errors: u64,
}

impl DnsCounts {
    /// What was counted since `earlier`.
    pub fn since(&self, earlier: &DnsCounts) -> DnsCounts {
        DnsCounts {
            queries: self.queries.saturating_sub(earlier.queries),
            answers: self.answers.saturating_sub(earlier.answers),
            timeouts: self.timeouts.saturating_sub(earlier.timeouts),
            servfail: self.servfail.saturating_sub(earlier.servfail),
            nxdomain: self.nxdomain.saturating_sub(earlier.nxdomain),
            other_errors: self.other_errors.saturating_sub(earlier.other_errors),
        }
    }
}

/// One resolver's figures.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// Cumulative counts.
    pub counts: DnsCounts,
    /// Answer latency.
    pub latency: Histogram,
    /// Snapshots for recent rates.
    pub recent: Recent<DnsCounts>,
}

/// A query waiting for its answer: the flow and the message id.
type QueryKey = (ConnKey, u16);

/// Every resolver this node queries.
#[derive(Debug)]
pub struct Resolvers {
    resolvers: HashMap<SocketAddr, Resolver>,
    pending: Deadlines<QueryKey, u64>,
    timeout_ns: u64,
}

fn remote(conn: &ConnKey) -> SocketAddr {
    socket_addr(&conn.endpoint(Direction::Outbound))
}

impl Resolvers {
    /// An empty table; queries unanswered after `timeout_ns` count as timeouts.
    pub fn new(timeout_ns: u64) -> Self {
        Resolvers {
            resolvers: HashMap::new(),
            pending: Deadlines::new(MAX_PENDING),
            timeout_ns,
        }
    }

    /// Changes the DNS timeout for queries sent from now on.
    pub fn set_timeout_ns(&mut self, timeout_ns: u64) {
        self.timeout_ns = timeout_ns;
    }

    fn resolver(&mut self, addr: SocketAddr, now_ns: u64) -> Option<&mut Resolver> {
        if !self.resolvers.contains_key(&addr) && self.resolvers.len() >= MAX_RESOLVERS {
            return None;
        }
        Some(self.resolvers.entry(addr).or_insert_with(|| Resolver {
            counts: DnsCounts::default(),
            latency: Histogram::default(),
            recent: Recent::new(DnsCounts::default(), now_ns),
        }))
    }

    /// Takes in one event from the kernel; names from matched answers go to `names`.
    pub fn on_event(&mut self, event: &DnsEvent, names: &mut Names, now_ns: u64) {
        let len = (event.len as usize).min(event.message.len());
        let message = &event.message[..len];
        let Some(id) = message.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return;
        };
        let addr = remote(&event.conn);
        match DnsKind::from_u8(event.kind) {
            Some(DnsKind::Query) => {
                let Some(resolver) = self.resolver(addr, now_ns) else {
                    return;
                };
                resolver.counts.queries += 1;
                let deadline = event.ts_ns.saturating_add(self.timeout_ns);
                self.pending.insert((event.conn, id), deadline, event.ts_ns);
            }
            Some(DnsKind::Answer) => {
                // The QR bit says answer; anything else on port 53 is not ours to read.
                if message.len() < 12 || message[2] & 0x80 == 0 {
                    return;
                }
                let Some(sent_ns) = self.pending.remove(&(event.conn, id)) else {
                    return; // late (already a timeout), duplicate or unsolicited
                };
                let Some(resolver) = self.resolver(addr, now_ns) else {
                    return;
                };
                resolver.counts.answers += 1;
                resolver
                    .latency
                    .record_us(event.ts_ns.saturating_sub(sent_ns) / 1_000);
                match message[3] & 0x0f {
                    0 => learn_names(message, names, now_ns),
                    RCODE_SERVFAIL => resolver.counts.servfail += 1,
                    RCODE_NXDOMAIN => resolver.counts.nxdomain += 1,
                    _ => resolver.counts.other_errors += 1,
                }
            }
            None => {}
        }
    }

    /// Counts the queries whose answer is overdue as timeouts, and rolls the recent figures.
    pub fn tick(&mut self, now_ns: u64, span_ns: u64) {
        for ((conn, _), _) in self.pending.expire(now_ns) {
            if let Some(resolver) = self.resolvers.get_mut(&remote(&conn)) {
                resolver.counts.timeouts += 1;
            }
        }
        for resolver in self.resolvers.values_mut() {
            let counts = resolver.counts;
            resolver.recent.roll(&counts, now_ns, span_ns);
        }
    }

    /// Every resolver, by address.
    pub fn iter(&self) -> impl Iterator<Item = (&SocketAddr, &Resolver)> {
        self.resolvers.iter()
    }

    /// Queries waiting for an answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Reads a successful answer: every A and AAAA record gets the name that was asked for.
fn learn_names(message: &[u8], names: &mut Names, now_ns: u64) {
    let parsed = Packet::parse(message).ok();
    // An answer cut at the capture size usually loses only its authority and additional
    // records (EDNS's OPT among them): read it again without them.
    let mut answers_only = Vec::new();
    let packet = match parsed {
        Some(packet) => packet,
        None => {
            answers_only.extend_from_slice(message);
            if answers_only.len() < 12 {
                return;
            }
            answers_only[8..12].fill(0); // NSCOUNT, ARCOUNT
            let Ok(packet) = Packet::parse(&answers_only) else {
                return; // cut inside the answers: nothing to learn
            };
            packet
        }
    };
    let Some(question) = packet.questions.first() else {
        return;
    };
    let asked = question.qname.to_string();
    for record in &packet.answers {
        let ip = match &record.rdata {
            RData::A(a) => IpAddr::V4(Ipv4Addr::from(a.address)),
            RData::AAAA(a) => IpAddr::V6(Ipv6Addr::from(a.address)),
            _ => continue,
        };
        names.learn(ip, &asked, record.ttl, now_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use resil_common::maps::{DNS_CAPTURE, FAMILY_IPV4};
    use simple_dns::{rdata, Name, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE};
    use std::path::Path;

    const MS: u64 = 1_000_000;

    fn conn(port: u16) -> ConnKey {
        let mut local = [0u8; 16];
        local[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[10, 0, 0, 53]);
        ConnKey {
            local_addr: local,
            remote_addr: remote,
            local_port: port,
            remote_port: 53,
            family: FAMILY_IPV4,
            _pad: [0; 3],
        }
    }

    fn event(kind: DnsKind, port: u16, ts_ns: u64, message: &[u8]) -> DnsEvent {
        let mut e = DnsEvent {
            ts_ns,
            conn: conn(port),
            kind: kind as u8,
            _pad: 0,
            len: message.len().min(DNS_CAPTURE) as u16,
            message: [0; DNS_CAPTURE],
            _pad2: [0; 4],
        };
        let n = message.len().min(DNS_CAPTURE);
        e.message[..n].copy_from_slice(&message[..n]);
        e
    }

    fn answer(id: u16, rcode: u8, ip: Option<Ipv4Addr>) -> Vec<u8> {
        let mut packet = Packet::new_reply(id);
        packet.questions.push(Question::new(
            Name::new_unchecked("api.example"),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        if let Some(ip) = ip {
            packet.answers.push(ResourceRecord::new(
                Name::new_unchecked("api.example"),
                CLASS::IN,
                30,
                RData::A(rdata::A::from(ip)),
            ));
        }
        let mut bytes = packet.build_bytes_vec().unwrap();
        bytes[3] = (bytes[3] & 0xf0) | rcode;
        bytes
    }

    fn resolver() -> SocketAddr {
        "10.0.0.53:53".parse().unwrap()
    }

    #[test]
    fn answers_are_matched_timed_and_classified() {
        let mut names = Names::new(Path::new("/nonexistent"));
        let mut r = Resolvers::new(2_000 * MS);
        r.on_event(
            &event(DnsKind::Query, 1000, 0, &[0, 7, 1, 0]),
            &mut names,
            0,
        );
        r.on_event(
            &event(DnsKind::Query, 1000, 0, &[0, 8, 1, 0]),
            &mut names,
            0,
        );
        r.on_event(
            &event(DnsKind::Query, 1001, 0, &[0, 9, 1, 0]),
            &mut names,
            0,
        );
        let ip = Ipv4Addr::new(10, 0, 3, 7);
        r.on_event(
            &event(DnsKind::Answer, 1000, 3 * MS, &answer(7, 0, Some(ip))),
            &mut names,
            0,
        );
        r.on_event(
            &event(DnsKind::Answer, 1000, 5 * MS, &answer(8, 2, None)),
            &mut names,
            0,
        );
        // An answer nobody asked for is ignored, and teaches no name.
        let spoofed = answer(99, 0, Some(Ipv4Addr::new(10, 9, 9, 9)));
        r.on_event(
            &event(DnsKind::Answer, 1000, 5 * MS, &spoofed),
            &mut names,
            0,
        );
        r.tick(2_000 * MS, 10_000 * MS);
        let (_, res) = r.iter().find(|(a, _)| **a == resolver()).unwrap();
        let c = res.counts;
        assert_eq!((c.queries, c.answers, c.servfail, c.timeouts), (3, 2, 1, 1));
        assert_eq!(res.latency.total(), 2);
        assert_eq!(names.lookup(&IpAddr::V4(ip), 0), Some("api.example"));
        assert_eq!(names.lookup(&"10.9.9.9".parse().unwrap(), 0), None);
        assert_eq!(r.pending(), 0);
        // The late answer to the query already counted as a timeout settles nothing.
        r.on_event(
            &event(DnsKind::Answer, 1001, 2_500 * MS, &answer(9, 0, None)),
            &mut names,
            0,
        );
        assert_eq!(r.iter().next().unwrap().1.counts.answers, 2);
    }

    #[test]
    fn nxdomain_and_truncated_or_garbage_messages() {
        let mut names = Names::new(Path::new("/nonexistent"));
        let mut r = Resolvers::new(2_000 * MS);
        r.on_event(&event(DnsKind::Query, 1, 0, &[0, 1]), &mut names, 0);
        r.on_event(
            &event(DnsKind::Answer, 1, MS, &answer(1, 3, None)),
            &mut names,
            0,
        );
        // Cut inside its additional records: the answers still teach.
        r.on_event(&event(DnsKind::Query, 1, 0, &[0, 5]), &mut names, 0);
        let mut padded = answer(5, 0, Some(Ipv4Addr::new(5, 6, 7, 8)));
        padded[11] = 1; // ARCOUNT 1, and an additional record that is not there
        padded.extend_from_slice(&[0, 0, 41]);
        r.on_event(&event(DnsKind::Answer, 1, MS, &padded), &mut names, 0);
        assert_eq!(
            names.lookup(&"5.6.7.8".parse().unwrap(), 0),
            Some("api.example")
        );
        r.on_event(&event(DnsKind::Query, 1, 0, &[0, 2]), &mut names, 0);
        // Cut mid-record: counted, but teaches nothing.
        let cut = answer(2, 0, Some(Ipv4Addr::new(1, 2, 3, 4)));
        r.on_event(
            &event(DnsKind::Answer, 1, MS, &cut[..cut.len() - 2]),
            &mut names,
            0,
        );
        r.on_event(&event(DnsKind::Answer, 1, MS, &[0xff; 3]), &mut names, 0);
        r.on_event(&event(DnsKind::Query, 1, 0, &[]), &mut names, 0);
        let c = r.iter().next().unwrap().1.counts;
        assert_eq!((c.queries, c.answers, c.nxdomain), (3, 3, 1));
        assert_eq!(names.lookup(&"1.2.3.4".parse().unwrap(), 0), None);
        assert!(decode_event(&[0u8; 10]).is_none());
    }
}
