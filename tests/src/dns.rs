//! A DNS resolver for the lab, on UDP port 53 of the server namespace, and a client for it.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::sched::{setns, CloneFlags};
use simple_dns::{
    rdata, Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE,
};

/// How the lab resolver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// Every name has this address (TTL 60 s).
    Answer(Ipv4Addr),
    /// Every query gets SERVFAIL.
    ServFail,
}

/// A resolver thread in a namespace; stops when dropped.
pub struct DnsServer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DnsServer {
    /// Starts answering on `0.0.0.0:53` inside `netns`.
    pub fn start(netns: &str, mode: DnsMode) -> Result<DnsServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let path = format!("/run/netns/{netns}");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = thread::spawn(move || {
            let socket = (|| -> Result<UdpSocket> {
                setns(File::open(&path)?, CloneFlags::CLONE_NEWNET)?;
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 53))?;
                socket.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(socket)
            })();
            let socket = match socket {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = answer(&buf[..n], mode) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        ready_rx
            .recv()
            .context("the DNS server thread died")?
            .context("cannot start the lab DNS server")?;
        Ok(DnsServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(query: &[u8], mode: DnsMode) -> Option<Vec<u8>> {
    let query = Packet::parse(query).ok()?;
    let mut reply = Packet::new_reply(query.id());
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    for q in &query.questions {
        reply.questions.push(q.clone());
        if let DnsMode::Answer(ip) = mode {
            reply.answers.push(ResourceRecord::new(
                q.qname.clone(),
                CLASS::IN,
                60,
                rdata::RData::A(rdata::A::from(ip)),
            ));
        }
    }
    if mode == DnsMode::ServFail {
        *reply.rcode_mut() = RCODE::ServerFailure;
    }
    reply.build_bytes_vec().ok()
}

/// Asks `resolver` for the A record of `name` from the current namespace; the answer's rcode
/// and first address, or `None` after `timeout`.
pub fn query(
    resolver: SocketAddr,
    name: &str,
    id: u16,
    timeout: Duration,
) -> Option<(RCODE, Option<Ipv4Addr>)> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.set_read_timeout(Some(timeout)).ok()?;
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    socket
        .send_to(&packet.build_bytes_vec().ok()?, resolver)
        .ok()?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).ok()?;
    let reply = Packet::parse(&buf[..n]).ok()?;
    let ip = reply.answers.iter().find_map(|r| match &r.rdata {
        rdata::RData::A(a) => Some(Ipv4Addr::from(a.address)),
        _ => None,
    });
    Some((reply.rcode(), ip))
}
