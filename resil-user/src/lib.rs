//! resil's daemon and CLI, as a library so the integration tests and the binary share it.
//!
//! Modules by job: [`cli`] parses the command line, [`daemon`] runs the agent loop, [`probes`]
//! loads and attaches the BPF programs, [`collector`] reads what they count, [`deadlines`]
//! times out unanswered handshakes and DNS queries, [`endpoints`] keeps cumulative per-endpoint figures,
//! [`api`] is the local socket protocol, [`output`] renders it for people and machines.

pub mod api;
pub mod breaker;
pub mod circuits;
pub mod cli;
pub mod clock;
pub mod collector;
pub mod config;
pub mod daemon;
pub mod deadlines;
pub mod endpoints;
pub mod enforcer;
pub mod error;
pub mod events;
pub mod findings;
pub mod kubernetes;
pub mod metrics;
pub mod names;
pub mod netinfo;
pub mod output;
pub mod pins;
pub mod policy;
pub mod privileges;
pub mod probes;
pub mod recent;
pub mod resolvers;
pub mod services;
pub mod snapshot;
