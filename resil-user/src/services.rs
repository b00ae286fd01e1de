//! Protection for this node's own services: shedding inbound connections at XDP when a
//! service is unhealthy or over its connection limit (a bulkhead). Off unless the
//! configuration names the service. Pure: the agent says what it knows, this says what to do.

use std::net::{IpAddr, SocketAddr};

/// A `[[service]]` entry of the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRule {
    pub name: Option<String>,
    pub port: u16,
    /// Only this local address (any, if `None`).
    pub address: Option<IpAddr>,
    /// Shed while the service has an internal finding (refusing, resetting, losing SYNs).
    pub shed_when_unhealthy: bool,
    /// Shed new connections while this many are open.
    pub max_connections: Option<u64>,
}

impl ServiceRule {
    /// How messages name the entry.
    pub fn label(&self) -> String {
        let place = match self.address {
            Some(ip) => SocketAddr::new(ip, self.port).to_string(),
            None => format!(":{}", self.port),
        };
        match &self.name {
            Some(name) => format!("{name} ({place})"),
            None => place,
        }
    }

    /// Whether the rule covers the local service at `addr`.
    pub fn covers(&self, addr: &SocketAddr) -> bool {
        addr.port() == self.port && self.address.is_none_or(|ip| ip == addr.ip())
    }
}

/// The rule for a local service: one naming its address wins over one for any address.
pub fn rule_for<'a>(rules: &'a [ServiceRule], addr: &SocketAddr) -> Option<&'a ServiceRule> {
    rules
        .iter()
        .filter(|r| r.covers(addr))
        .max_by_key(|r| r.address.is_some())
}

/// Why a service is being shed.
#[derive(Debug, Clone, PartialEq)]
pub enum ShedReason {
    /// It has an internal finding (its summary).
    Unhealthy(String),
    /// Its open connections reached the limit.
    Bulkhead { open: u64, max: u64 },
}

impl std::fmt::Display for ShedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShedReason::Unhealthy(summary) => write!(f, "unhealthy: {summary}"),
            ShedReason::Bulkhead { open, max } => {
                write!(f, "bulkhead: {open} connections open, the limit is {max}")
            }
        }
    }
}

/// Whether to shed a service under `rule` with `open` connections and, if it is unhealthy,
/// the summary of its finding.
pub fn decide(rule: &ServiceRule, open: u64, unhealthy: Option<&str>) -> Option<ShedReason> {
    if let Some(max) = rule.max_connections {
        if open >= max {
            return Some(ShedReason::Bulkhead { open, max });
        }
    }
    match unhealthy {
        Some(summary) if rule.shed_when_unhealthy => Some(ShedReason::Unhealthy(summary.into())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(address: Option<&str>) -> ServiceRule {
        ServiceRule {
            name: None,
            port: 8080,
            address: address.map(|a| a.parse().unwrap()),
            shed_when_unhealthy: true,
            max_connections: Some(10),
        }
    }

    #[test]
    fn the_rule_naming_the_address_wins() {
        let rules = [rule(None), rule(Some("10.0.0.2"))];
        let here: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let there: SocketAddr = "10.0.0.3:8080".parse().unwrap();
        assert_eq!(rule_for(&rules, &here).unwrap().address, rules[1].address);
        assert_eq!(rule_for(&rules, &there).unwrap().address, None);
        assert!(rule_for(&rules, &"10.0.0.2:8081".parse().unwrap()).is_none());
        assert_eq!(rules[1].label(), "10.0.0.2:8080");
    }

    #[test]
    fn bulkhead_then_health() {
        let r = rule(None);
        assert_eq!(decide(&r, 9, None), None);
        assert_eq!(
            decide(&r, 10, None),
            Some(ShedReason::Bulkhead { open: 10, max: 10 })
        );
        assert_eq!(
            decide(&r, 0, Some("refusing"))
                .map(|s| s.to_string())
                .as_deref(),
            Some("unhealthy: refusing")
        );
        let lenient = ServiceRule {
            shed_when_unhealthy: false,
            ..r
        };
        assert_eq!(decide(&lenient, 0, Some("refusing")), None);
    }
}
