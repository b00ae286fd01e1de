//! Which policy applies to an endpoint: the defaults, or the most specific named dependency
//! whose endpoint patterns match it.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::Serialize;

use crate::breaker::{BackoffPolicy, BreakerPolicy, FailureSet, Mode, WindowPolicy};

/// The resolved policy of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// A handshake unanswered for this long is a timeout.
    pub connect_timeout: Duration,
    /// The circuit breaker's settings.
    pub breaker: BreakerPolicy,
}

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;

impl Default for Policy {
    /// The built-in defaults, chosen from the reference implementations; every value is
    /// explained in docs/configuration.md.
    fn default() -> Self {
        Policy {
            connect_timeout: Duration::from_secs(1),
            breaker: BreakerPolicy {
                mode: Mode::Enforce,
                failures: FailureSet::ALL,
                window: WindowPolicy::Time {
                    duration_ns: 10 * SEC,
                    buckets: 10,
                },
                failure_rate_threshold: 0.5,
                minimum_calls: 20,
                consecutive_failures: 5,
                slow_call_ns: 500 * MS,
                slow_call_rate_threshold: 1.0,
                backoff: BackoffPolicy {
                    base_ns: 5 * SEC,
                    max_ns: 60 * SEC,
                    multiplier: 2.0,
                    jitter: 0.2,
                    decay_ns: 60 * SEC,
                },
                half_open_probes: 1,
                half_open_max_ns: 30 * SEC,
            },
        }
    }
}

/// An endpoint pattern in a dependency: `10.0.3.7:5432`, `10.0.4.0/24:5432`, `10.0.4.0/24`,
/// `[fd00::/64]:443`, `fd00::7`, `*:53`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointPattern {
    /// Addresses matched; `None` is any address of either family.
    pub net: Option<IpNet>,
    /// Port matched; `None` is any port.
    pub port: Option<u16>,
}

impl EndpointPattern {
    /// Whether the pattern matches an endpoint.
    pub fn matches(&self, endpoint: SocketAddr) -> bool {
        self.net.is_none_or(|net| net.contains(&endpoint.ip()))
            && self.port.is_none_or(|port| port == endpoint.port())
    }

    /// How specific the pattern is: longer prefixes first, then a given port over any port.
    pub fn specificity(&self) -> (u8, bool) {
        (self.net.map_or(0, |n| n.prefix_len()), self.port.is_some())
    }

    /// Whether both patterns match some endpoint with the same specificity, so the
    /// most-specific rule cannot choose between them (`*:53` and `0.0.0.0/0:53` included).
    pub fn same_scope(&self, other: &EndpointPattern) -> bool {
        if self.port != other.port || self.specificity() != other.specificity() {
            return false;
        }
        match (self.net, other.net) {
            (Some(a), Some(b)) => a == b,
            // `*` and a /0 prefix: both match every address of the prefix's family.
            _ => true,
        }
    }
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    if text.contains('/') {
        IpNet::from_str(text)
            .map(|n| n.trunc())
            .map_err(|_| format!("`{text}` is not an address prefix like 10.0.4.0/24 or fd00::/64"))
    } else {
        IpAddr::from_str(text)
            .map(IpNet::from)
            .map_err(|_| format!("`{text}` is not an IP address"))
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("`{text}` is not a port from 1 to 65535")),
    }
}

impl FromStr for EndpointPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("`{text}`: missing `]`"))?;
            let port = match after {
                "" => None,
                _ => Some(parse_port(after.strip_prefix(':').ok_or_else(|| {
                    format!("`{text}`: expected `:PORT` after `]`")
                })?)?),
            };
            return Ok(EndpointPattern {
                net: Some(parse_net(inside)?),
                port,
            });
        }
        if let Some(rest) = text.strip_prefix('*') {
            let port = match rest {
                "" => None,
                _ => Some(parse_port(
                    rest.strip_prefix(':')
                        .ok_or_else(|| format!("`{text}`: expected `*:PORT`"))?,
                )?),
            };
            return Ok(EndpointPattern { net: None, port });
        }
        match text.matches(':').count() {
            0 => Ok(EndpointPattern {
                net: Some(parse_net(text)?),
                port: None,
            }),
            1 => {
                let (net, port) = text.split_once(':').unwrap_or((text, ""));
                Ok(EndpointPattern {
                    net: Some(parse_net(net)?),
                    port: Some(parse_port(port)?),
                })
            }
            // Bare IPv6 is ambiguous ("fd00::7:443": a port, or the address's last group?).
            _ => Err(format!(
                "`{text}`: write IPv6 in brackets, like [fd00::7], [fd00::7]:443 or [fd00::/64]:443"
            )),
        }
    }
}

impl fmt::Display for EndpointPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.net, self.port) {
            (None, None) => f.write_str("*"),
            (None, Some(port)) => write!(f, "*:{port}"),
            (Some(net), port) => {
                let host = net.max_prefix_len() == net.prefix_len();
                let text = if host {
                    net.addr().to_string()
                } else {
                    net.to_string()
                };
                match (net, port) {
                    (IpNet::V6(_), Some(port)) => write!(f, "[{text}]:{port}"),
                    (IpNet::V6(_), None) => write!(f, "[{text}]"),
                    (_, Some(port)) => write!(f, "{text}:{port}"),
                    (_, None) => f.write_str(&text),
                }
            }
        }
    }
}

/// A named dependency: its endpoint patterns and resolved policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Dependency {
    pub name: String,
    pub endpoints: Vec<EndpointPattern>,
    pub policy: Policy,
}

/// The outcome of resolving an endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resolved<'a> {
    /// The dependency that matched, if any.
    pub dependency: Option<&'a Dependency>,
    /// The pattern that matched.
    pub pattern: Option<EndpointPattern>,
    pub policy: &'a Policy,
}

/// The defaults and the dependencies, ready to answer "which policy for this endpoint".
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Policies {
    pub defaults: Policy,
    pub dependencies: Vec<Dependency>,
}

impl Policies {
    /// The most specific dependency pattern matching `endpoint`, else the defaults. Ties go to
    /// the dependency listed first (the configuration check rejects ties whose policies differ).
    pub fn resolve(&self, endpoint: SocketAddr) -> Resolved<'_> {
        let mut best: Option<(&Dependency, EndpointPattern)> = None;
        for dependency in &self.dependencies {
            for pattern in &dependency.endpoints {
                if !pattern.matches(endpoint) {
                    continue;
                }
                if best.is_none_or(|(_, b)| pattern.specificity() > b.specificity()) {
                    best = Some((dependency, *pattern));
                }
            }
        }
        match best {
            Some((dependency, pattern)) => Resolved {
                dependency: Some(dependency),
                pattern: Some(pattern),
                policy: &dependency.policy,
            },
            None => Resolved {
                dependency: None,
                pattern: None,
                policy: &self.defaults,
            },
        }
    }
}

/// A policy as people read it: every key with its value, as in the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyView {
    pub connect_timeout: String,
    pub mode: Mode,
    pub failures: Vec<&'static str>,
    pub failure_rate_threshold: f64,
    pub minimum_calls: u32,
    pub consecutive_failures: u32,
    pub slow_call_duration: String,
    pub slow_call_rate_threshold: f64,
    pub sliding_window: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_duration: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_buckets: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_calls: Option<u32>,
    pub open_wait: String,
    pub open_wait_max: String,
    pub open_wait_multiplier: f64,
    pub open_wait_jitter: f64,
    pub backoff_decay: String,
    pub half_open_probes: u32,
    pub half_open_max_duration: String,
}

fn human(ns: u64) -> String {
    humantime::format_duration(Duration::from_nanos(ns)).to_string()
}

impl From<&Policy> for PolicyView {
    fn from(p: &Policy) -> Self {
        let b = &p.breaker;
        let (sliding_window, window_duration, window_buckets, window_calls) = match b.window {
            WindowPolicy::Time {
                duration_ns,
                buckets,
            } => ("time", Some(human(duration_ns)), Some(buckets), None),
            WindowPolicy::Count { calls } => ("count", None, None, Some(calls)),
        };
        PolicyView {
            connect_timeout: humantime::format_duration(p.connect_timeout).to_string(),
            mode: b.mode,
            failures: b.failures.kinds().into_iter().map(|k| k.name()).collect(),
            failure_rate_threshold: b.failure_rate_threshold,
            minimum_calls: b.minimum_calls,
            consecutive_failures: b.consecutive_failures,
            slow_call_duration: human(b.slow_call_ns),
            slow_call_rate_threshold: b.slow_call_rate_threshold,
            sliding_window,
            window_duration,
            window_buckets,
            window_calls,
            open_wait: human(b.backoff.base_ns),
            open_wait_max: human(b.backoff.max_ns),
            open_wait_multiplier: b.backoff.multiplier,
            open_wait_jitter: b.backoff.jitter,
            backoff_decay: human(b.backoff.decay_ns),
            half_open_probes: b.half_open_probes,
            half_open_max_duration: human(b.half_open_max_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> EndpointPattern {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_every_documented_form_and_prints_it_back() {
        for text in [
            "10.0.3.7:5432",
            "10.0.4.0/24:5432",
            "10.0.4.0/24",
            "10.0.3.7",
            "[fd00::/64]:443",
            "[fd00::7]:443",
            "[fd00::7]",
            "[fd00::/64]",
            "*:53",
            "*",
        ] {
            assert_eq!(pattern(text).to_string(), text);
        }
        assert_eq!(
            pattern("10.0.4.9/24").to_string(),
            "10.0.4.0/24",
            "host bits dropped"
        );
    }

    #[test]
    fn rejects_malformed_patterns_with_a_reason() {
        for (text, needle) in [
            ("10.0.3.7:0", "port"),
            ("10.0.3.7:http", "port"),
            ("10.0.3.300", "IP address"),
            ("10.0.3.0/33", "prefix"),
            ("[fd00::1", "]"),
            ("[fd00::1]443", ":PORT"),
            ("*53", "*:PORT"),
            ("fd00::7:443", "brackets"),
            ("fd00::/64", "brackets"),
            ("", "IP address"),
        ] {
            let e = text.parse::<EndpointPattern>().unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn matches_addresses_and_ports() {
        assert!(pattern("10.0.4.0/24:5432").matches(addr("10.0.4.9:5432")));
        assert!(!pattern("10.0.4.0/24:5432").matches(addr("10.0.5.9:5432")));
        assert!(!pattern("10.0.4.0/24:5432").matches(addr("10.0.4.9:5433")));
        assert!(pattern("*:53").matches(addr("[fd00::1]:53")));
        assert!(pattern("[fd00::/64]").matches(addr("[fd00::1]:1")));
        assert!(!pattern("[fd00::/64]").matches(addr("10.0.0.1:1")));
    }

    #[test]
    fn equivalent_scopes_are_recognised() {
        assert!(pattern("*:53").same_scope(&pattern("0.0.0.0/0:53")));
        assert!(pattern("*").same_scope(&pattern("[::/0]")));
        assert!(pattern("10.0.0.0/8").same_scope(&pattern("10.1.0.0/8")));
        assert!(!pattern("*:53").same_scope(&pattern("*:54")));
        assert!(!pattern("10.0.0.0/8").same_scope(&pattern("11.0.0.0/8")));
        assert!(!pattern("10.0.0.0/8:80").same_scope(&pattern("10.0.0.0/8")));
    }

    #[test]
    fn the_most_specific_match_wins() {
        let dep = |name: &str, patterns: &[&str], probes: u32| Dependency {
            name: name.into(),
            endpoints: patterns.iter().map(|p| pattern(p)).collect(),
            policy: Policy {
                breaker: BreakerPolicy {
                    half_open_probes: probes,
                    ..Policy::default().breaker
                },
                ..Policy::default()
            },
        };
        let policies = Policies {
            defaults: Policy::default(),
            dependencies: vec![
                dep("any-dns", &["*:53"], 2),
                dep("dc", &["10.0.0.0/8"], 3),
                dep("postgres", &["10.0.3.0/24:5432"], 4),
                dep("pg-primary", &["10.0.3.7"], 5),
            ],
        };
        let name = |a: &str| {
            policies
                .resolve(addr(a))
                .dependency
                .map(|d| d.name.as_str())
        };
        assert_eq!(name("10.0.3.9:5432"), Some("postgres"));
        assert_eq!(name("10.0.3.9:80"), Some("dc"));
        assert_eq!(
            name("10.0.3.7:5432"),
            Some("pg-primary"),
            "/32 beats /24:port"
        );
        assert_eq!(name("10.9.9.9:53"), Some("dc"), "/8 beats any address");
        assert_eq!(name("192.0.2.1:53"), Some("any-dns"));
        assert_eq!(name("192.0.2.1:80"), None);
        let r = policies.resolve(addr("10.0.3.9:5432"));
        assert_eq!(r.policy.breaker.half_open_probes, 4);
        assert_eq!(r.pattern.unwrap().to_string(), "10.0.3.0/24:5432");
        assert_eq!(
            policies.resolve(addr("192.0.2.1:80")).policy,
            &Policy::default()
        );
    }
}
