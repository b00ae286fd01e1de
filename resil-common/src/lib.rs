//! Types and pure logic shared by the resil BPF programs and the daemon.
//!
//! Everything here builds for `bpfel-unknown-none` (no_std, no allocation) and is unit-tested
//! on the host: packet parsing ([`packet`]), the per-connection tracking step ([`track`]),
//! verdict decisions and RST construction ([`enforce`], [`rst`]), the latency histogram math
//! ([`histogram`]) and the map layouts ([`maps`]).
#![cfg_attr(not(any(test, feature = "user")), no_std)]

pub mod enforce;
pub mod histogram;
pub mod maps;
pub mod packet;
pub mod rst;
pub mod track;
