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

/// How long an unhealthy service is shed before one probe connection is let through …
pub const SHED_HOLD_NS: u64 = 5_000_000_000;
/// … doubling after each failed probe, up to this.
pub const SHED_HOLD_MAX_NS: u64 = 60_000_000_000;
/// A probe token without an outcome after this long is replaced by a fresh one.
pub const PROBE_WAIT_NS: u64 = 10_000_000_000;
/// Shedding for a bulkhead lasts at least this long, so a service at its limit does not
/// switch every tick.
pub const BULKHEAD_MIN_NS: u64 = 1_000_000_000;

/// Where shedding a service stands.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Over its connection limit since `since_ns`.
    Bulkhead { since_ns: u64 },
    /// Unhealthy: every new connection refused until `until_ns`.
    Holding { until_ns: u64, hold_ns: u64 },
    /// Unhealthy, trying one connection (a probe token of `generation`); judged against the
    /// service's counters when probing began.
    Probing {
        generation: u32,
        hold_ns: u64,
        established: u64,
        failed: u64,
        /// When this generation's token was handed out.
        since_ns: u64,
    },
}

/// A service being shed.
#[derive(Debug, Clone, PartialEq)]
struct Shed {
    reason: ShedReason,
    phase: Phase,
}

/// What a step changed.
#[derive(Debug, Clone, PartialEq)]
pub enum ShedChange {
    Started(ShedReason),
    /// Shedding ended; `recovered` when a probe connection showed the service healthy (its
    /// old evidence should be forgotten).
    Ended {
        reason: ShedReason,
        recovered: bool,
    },
}

/// The kernel verdict a shed service needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedVerdict {
    /// Refuse every new connection.
    Refuse,
    /// Admit the holder of one probe token of this generation.
    Probe { generation: u32 },
}

/// Every shed service, keyed by the caller's service key.
#[derive(Debug)]
pub struct Shedder<K> {
    shed: std::collections::HashMap<K, Shed>,
    generation: u32,
}

impl<K> Default for Shedder<K> {
    fn default() -> Self {
        Shedder {
            shed: std::collections::HashMap::new(),
            generation: 0,
        }
    }
}

/// A service's cumulative counters, as far as shedding cares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Connections accepted (handshakes completed).
    pub established: u64,
    /// Connections refused by the service.
    pub failed: u64,
}

impl<K: Copy + Eq + std::hash::Hash> Shedder<K> {
    /// One step for the service `key` under `rule` (`None`: no rule covers it any more) at
    /// `now_ns`: `open` connections, its counters, and the summary of a finding that makes it
    /// unhealthy.
    pub fn step(
        &mut self,
        key: K,
        rule: Option<&ServiceRule>,
        open: u64,
        counters: ServiceCounters,
        unhealthy: Option<&str>,
        now_ns: u64,
    ) -> Option<ShedChange> {
        let Some(rule) = rule else {
            return self.end(key, false);
        };
        let over = rule.max_connections.filter(|max| open >= *max);
        let current = self.shed.get(&key).cloned();
        match (current, over) {
            (None, Some(max)) => self.start(
                key,
                ShedReason::Bulkhead { open, max },
                Phase::Bulkhead { since_ns: now_ns },
            ),
            (None, None) => match unhealthy {
                Some(summary) if rule.shed_when_unhealthy => self.start(
                    key,
                    ShedReason::Unhealthy(summary.to_string()),
                    Phase::Holding {
                        until_ns: now_ns + SHED_HOLD_NS,
                        hold_ns: SHED_HOLD_NS,
                    },
                ),
                _ => None,
            },
            (
                Some(Shed {
                    phase: Phase::Bulkhead { since_ns },
                    ..
                }),
                over,
            ) => {
                if let (Some(max), Some(shed)) = (over, self.shed.get_mut(&key)) {
                    shed.reason = ShedReason::Bulkhead { open, max };
                    return None;
                }
                (now_ns.saturating_sub(since_ns) >= BULKHEAD_MIN_NS)
                    .then(|| self.end(key, false))
                    .flatten()
            }
            (
                Some(Shed {
                    phase: Phase::Holding { until_ns, hold_ns },
                    ..
                }),
                _,
            ) => {
                if !rule.shed_when_unhealthy {
                    return self.end(key, false);
                }
                if now_ns >= until_ns {
                    self.generation = self.generation.wrapping_add(1);
                    let generation = self.generation;
                    if let Some(shed) = self.shed.get_mut(&key) {
                        shed.phase = Phase::Probing {
                            generation,
                            hold_ns,
                            established: counters.established,
                            failed: counters.failed,
                            since_ns: now_ns,
                        };
                    }
                }
                None
            }
            (
                Some(Shed {
                    phase:
                        Phase::Probing {
                            hold_ns,
                            established,
                            failed,
                            since_ns,
                            ..
                        },
                    ..
                }),
                _,
            ) => {
                if !rule.shed_when_unhealthy {
                    return self.end(key, false);
                }
                // An accepted connection is the answer hoped for; a refusal the one feared.
                if counters.established > established {
                    self.end(key, true)
                } else if counters.failed > failed {
                    let hold_ns = (hold_ns * 2).min(SHED_HOLD_MAX_NS);
                    if let Some(shed) = self.shed.get_mut(&key) {
                        shed.phase = Phase::Holding {
                            until_ns: now_ns + hold_ns,
                            hold_ns,
                        };
                    }
                    None
                } else if now_ns.saturating_sub(since_ns) >= PROBE_WAIT_NS {
                    // The token was taken by a connection that came to nothing (a scanner, a
                    // client that gave up), or nobody came: hand out a fresh one.
                    self.generation = self.generation.wrapping_add(1);
                    let generation = self.generation;
                    if let Some(shed) = self.shed.get_mut(&key) {
                        shed.phase = Phase::Probing {
                            generation,
                            hold_ns,
                            established,
                            failed,
                            since_ns: now_ns,
                        };
                    }
                    None
                } else {
                    None // no client came yet: the probe token waits
                }
            }
        }
    }

    fn start(&mut self, key: K, reason: ShedReason, phase: Phase) -> Option<ShedChange> {
        self.shed.insert(
            key,
            Shed {
                reason: reason.clone(),
                phase,
            },
        );
        Some(ShedChange::Started(reason))
    }

    fn end(&mut self, key: K, recovered: bool) -> Option<ShedChange> {
        self.shed.remove(&key).map(|shed| ShedChange::Ended {
            reason: shed.reason,
            recovered,
        })
    }

    /// Services shed now, and what each needs in the kernel.
    pub fn verdicts(&self) -> impl Iterator<Item = (&K, ShedVerdict)> {
        self.shed.iter().map(|(key, shed)| {
            let verdict = match shed.phase {
                Phase::Probing { generation, .. } => ShedVerdict::Probe { generation },
                _ => ShedVerdict::Refuse,
            };
            (key, verdict)
        })
    }

    /// Why `key` is shed, if it is.
    pub fn reason(&self, key: &K) -> Option<&ShedReason> {
        self.shed.get(key).map(|s| &s.reason)
    }

    /// Services shed now.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.shed.keys()
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

    const S: u64 = 1_000_000_000;

    fn counters(established: u64, failed: u64) -> ServiceCounters {
        ServiceCounters {
            established,
            failed,
        }
    }

    #[test]
    fn a_bulkhead_sheds_at_its_limit_for_at_least_a_second() {
        let r = rule(None);
        let mut s = Shedder::default();
        assert_eq!(s.step(1, Some(&r), 9, counters(9, 0), None, 0), None);
        let started = s.step(1, Some(&r), 10, counters(10, 0), None, 0);
        assert_eq!(
            started,
            Some(ShedChange::Started(ShedReason::Bulkhead {
                open: 10,
                max: 10
            }))
        );
        assert_eq!(
            s.verdicts().collect::<Vec<_>>(),
            [(&1, ShedVerdict::Refuse)]
        );
        // Below the limit again, but too soon to switch back.
        assert_eq!(s.step(1, Some(&r), 9, counters(10, 0), None, S / 2), None);
        let ended = s.step(1, Some(&r), 9, counters(10, 0), None, S);
        assert!(matches!(
            ended,
            Some(ShedChange::Ended {
                recovered: false,
                ..
            })
        ));
        assert_eq!(s.verdicts().count(), 0);
    }

    #[test]
    fn an_unhealthy_service_is_held_then_probed_until_a_probe_succeeds() {
        let r = rule(None);
        let mut s = Shedder::default();
        let started = s.step(1, Some(&r), 0, counters(5, 3), Some("refusing"), 0);
        assert_eq!(
            started,
            Some(ShedChange::Started(ShedReason::Unhealthy(
                "refusing".into()
            )))
        );
        assert_eq!(
            s.reason(&1).map(ToString::to_string).as_deref(),
            Some("unhealthy: refusing")
        );
        // Held: refused in the kernel until the hold ends, whatever the finding says.
        assert_eq!(
            s.step(1, Some(&r), 0, counters(5, 3), None, SHED_HOLD_NS - 1),
            None
        );
        assert_eq!(s.verdicts().next().unwrap().1, ShedVerdict::Refuse);
        s.step(
            1,
            Some(&r),
            0,
            counters(5, 3),
            Some("refusing"),
            SHED_HOLD_NS,
        );
        let ShedVerdict::Probe { generation } = s.verdicts().next().unwrap().1 else {
            panic!("probing")
        };
        // The probe is refused: held again, twice as long, then a new probe generation.
        assert_eq!(
            s.step(1, Some(&r), 0, counters(5, 4), None, SHED_HOLD_NS + 1),
            None
        );
        assert_eq!(s.verdicts().next().unwrap().1, ShedVerdict::Refuse);
        s.step(1, Some(&r), 0, counters(5, 4), None, SHED_HOLD_NS * 3);
        assert_eq!(
            s.verdicts().next().unwrap().1,
            ShedVerdict::Refuse,
            "hold doubled"
        );
        s.step(1, Some(&r), 0, counters(5, 4), None, SHED_HOLD_NS * 3 + 1);
        let ShedVerdict::Probe { generation: next } = s.verdicts().next().unwrap().1 else {
            panic!("probing again")
        };
        assert_ne!(next, generation);
        // Nobody came: still probing. Then a probe is accepted: recovered.
        assert_eq!(
            s.step(1, Some(&r), 0, counters(5, 4), None, SHED_HOLD_NS * 10),
            None
        );
        let ended = s.step(1, Some(&r), 0, counters(6, 4), None, SHED_HOLD_NS * 10);
        assert!(matches!(
            ended,
            Some(ShedChange::Ended {
                recovered: true,
                ..
            })
        ));
    }

    #[test]
    fn lenient_rules_and_removed_rules_shed_nothing() {
        let lenient = ServiceRule {
            shed_when_unhealthy: false,
            max_connections: None,
            ..rule(None)
        };
        let mut s = Shedder::default();
        assert_eq!(
            s.step(1, Some(&lenient), 100, counters(0, 9), Some("refusing"), 0),
            None
        );
        s.step(2, Some(&rule(None)), 0, counters(0, 9), Some("refusing"), 0);
        let ended = s.step(2, None, 0, counters(0, 9), Some("refusing"), 1);
        assert!(matches!(
            ended,
            Some(ShedChange::Ended {
                recovered: false,
                ..
            })
        ));
    }
}
