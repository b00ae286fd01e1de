//! One circuit breaker per outbound endpoint, with the policy that applies to it; their
//! transitions go to the agent's event log. Knows nothing of BPF: the agent feeds it outcomes.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    time::Duration,
};

use resil_common::maps::{EndpointKey, MAX_PROBES};
use serde::{Deserialize, Serialize};

use crate::{
    api::TransitionEvent,
    breaker::{Breaker, Mode, Outcome, Recorded, SavedState, State, Ticket, Transition},
    endpoints::socket_addr,
    enforcer::Desired,
    policy::Policies,
};

/// Circuits kept, at most; past that, idle closed ones are forgotten.
const MAX_CIRCUITS: usize = 65_536;

/// An endpoint's breaker and the policy it follows.
#[derive(Debug, Clone)]
pub struct Circuit {
    /// The breaker, holding its policy.
    pub breaker: Breaker,
    /// The rest of the endpoint's policy.
    pub connect_timeout: Duration,
    /// The dependency whose policy applies, if any.
    pub dependency: Option<String>,
}

/// Every outbound endpoint's circuit.
#[derive(Debug, Default)]
pub struct Circuits {
    circuits: HashMap<EndpointKey, Circuit, foldhash::fast::RandomState>,
    /// Circuits that time alone can change (OPEN, time-limited HALF_OPEN): all a tick visits.
    waiting: HashSet<EndpointKey, foldhash::fast::RandomState>,
    /// Circuits that want a verdict in the kernel (not CLOSED, not DISABLED).
    restricted: HashSet<EndpointKey, foldhash::fast::RandomState>,
    /// A transition happened since the last [`Circuits::desired`].
    dirty: bool,
    /// Transitions not yet taken by the agent.
    transitions: Vec<TransitionEvent>,
    /// Circuits whose state changed since the last [`Circuits::take_changed`].
    changed: HashSet<EndpointKey, foldhash::fast::RandomState>,
}

/// An operator's command for a circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManualAction {
    /// FORCED_OPEN: refuse every new connection until reset.
    Trip,
    /// Back to CLOSED with fresh figures.
    Reset,
    /// DISABLED: never refuse, ignore outcomes, until reset.
    Disable,
}

fn seed(key: &EndpointKey) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

impl Circuits {
    /// Number of circuits.
    pub fn len(&self) -> usize {
        self.circuits.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.circuits.is_empty()
    }

    /// The circuit of `key`, if it has one.
    pub fn get(&self, key: &EndpointKey) -> Option<&Circuit> {
        self.circuits.get(key)
    }

    /// The circuit of `key`, created closed under its policy if new.
    pub fn circuit(&mut self, key: EndpointKey, now_ns: u64, policies: &Policies) -> &mut Circuit {
        self.circuits.entry(key).or_insert_with(|| {
            let resolved = policies.resolve(socket_addr(&key));
            Circuit {
                breaker: Breaker::new(resolved.policy.breaker, now_ns, seed(&key)),
                connect_timeout: resolved.policy.connect_timeout,
                dependency: resolved.dependency.map(|d| d.name.clone()),
            }
        })
    }

    /// Brings back a circuit a previous run saved, under today's policy.
    pub fn restore(
        &mut self,
        key: EndpointKey,
        saved: SavedState,
        now_ns: u64,
        policies: &Policies,
    ) {
        let resolved = policies.resolve(socket_addr(&key));
        let breaker = Breaker::restore(resolved.policy.breaker, saved, now_ns, seed(&key));
        let state = breaker.state();
        self.circuits.insert(
            key,
            Circuit {
                breaker,
                connect_timeout: resolved.policy.connect_timeout,
                dependency: resolved.dependency.map(|d| d.name.clone()),
            },
        );
        self.place(key, state);
    }

    /// Circuits whose state changed since the last call (to save them).
    pub fn take_changed(&mut self) -> Vec<EndpointKey> {
        self.changed.drain().collect()
    }

    /// A connection attempt to `key` starts: its ticket, and its connect timeout.
    pub fn admit(
        &mut self,
        key: EndpointKey,
        now_ns: u64,
        policies: &Policies,
    ) -> (Ticket, Duration) {
        let circuit = self.circuit(key, now_ns, policies);
        (circuit.breaker.admit(), circuit.connect_timeout)
    }

    /// An attempt's outcome. Returns where a success went, for a later reset amendment.
    pub fn record(
        &mut self,
        key: EndpointKey,
        now_ns: u64,
        ticket: Ticket,
        outcome: Outcome,
    ) -> Option<Recorded> {
        let circuit = self.circuits.get_mut(&key)?;
        log::debug!(
            "{}: {outcome:?} for {ticket:?} in {}",
            socket_addr(&key),
            circuit.breaker.state()
        );
        let (recorded, transition) = circuit.breaker.record(now_ns, ticket, outcome);
        if let Some(t) = transition {
            self.note(key, t);
        }
        recorded
    }

    /// A recorded success was reset before any reply.
    pub fn amend_reset(&mut self, key: EndpointKey, now_ns: u64, recorded: Recorded) {
        let Some(circuit) = self.circuits.get_mut(&key) else {
            return;
        };
        if let Some(t) = circuit.breaker.amend_reset(now_ns, recorded) {
            self.note(key, t);
        }
    }

    /// Lets time act on the circuits waiting for it; forgets idle closed circuits past the
    /// limit.
    pub fn tick(&mut self, now_ns: u64) {
        let mut happened = Vec::new();
        for key in &self.waiting {
            if let Some(circuit) = self.circuits.get_mut(key) {
                if let Some(t) = circuit.breaker.tick(now_ns) {
                    happened.push((*key, t));
                }
            }
        }
        for (key, t) in happened {
            self.note(key, t);
        }
        if self.circuits.len() > MAX_CIRCUITS {
            self.circuits.retain(|_, c| {
                c.breaker.state() != State::Closed || c.breaker.totals(now_ns).calls > 0
            });
        }
    }

    /// Applies new policies to every circuit, keeping states and figures.
    pub fn apply(&mut self, policies: &Policies, now_ns: u64) {
        let mut happened = Vec::new();
        for (key, circuit) in &mut self.circuits {
            let resolved = policies.resolve(socket_addr(key));
            if let Some(t) = circuit.breaker.set_policy(resolved.policy.breaker, now_ns) {
                happened.push((*key, t));
            }
            circuit.connect_timeout = resolved.policy.connect_timeout;
            circuit.dependency = resolved.dependency.map(|d| d.name.clone());
            // A new half-open time limit can make a circuit wait on time, or stop it; a new
            // mode changes what the kernel is asked.
            self.dirty = true;
            if circuit.breaker.waiting() {
                self.waiting.insert(*key);
            } else {
                self.waiting.remove(key);
            }
        }
        for (key, t) in happened {
            self.note(key, t);
        }
    }

    /// Gives back the slot of an admitted attempt whose outcome will never arrive.
    pub fn release(&mut self, key: EndpointKey, ticket: Ticket) {
        if let Some(circuit) = self.circuits.get_mut(&key) {
            circuit.breaker.release(ticket);
            self.dirty = true;
        }
    }

    /// What every restricted circuit asks of the kernel now; clears the dirty flag.
    pub fn desired(&mut self) -> Vec<(EndpointKey, Desired)> {
        self.dirty = false;
        self.restricted
            .iter()
            .filter_map(|key| {
                let b = &self.circuits.get(key)?.breaker;
                let want = match (b.state(), b.policy().mode) {
                    (State::ForcedOpen, _) | (State::Open, Mode::Enforce) => Desired::Refuse,
                    (State::Open, Mode::MetricsOnly) => Desired::Observe,
                    (State::HalfOpen, Mode::Enforce) => Desired::Probe {
                        generation: b.generation() as u32,
                        probes: b.probe_tokens().min(MAX_PROBES),
                    },
                    _ => return None,
                };
                Some((*key, want))
            })
            .collect()
    }

    /// Whether a transition happened since the last [`Circuits::desired`].
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// An operator's command for one endpoint (its circuit is created if new). Returns the
    /// state it is in afterwards.
    pub fn manual(
        &mut self,
        key: EndpointKey,
        action: ManualAction,
        now_ns: u64,
        policies: &Policies,
    ) -> &'static str {
        let breaker = &mut self.circuit(key, now_ns, policies).breaker;
        let t = match action {
            ManualAction::Trip => breaker.force_open(now_ns),
            ManualAction::Reset => breaker.reset(now_ns),
            ManualAction::Disable => breaker.disable(now_ns),
        };
        self.note(key, t);
        self.circuits
            .get(&key)
            .map_or("closed", |c| c.breaker.reported_state())
    }

    /// Keys of the circuits an operator forced open or disabled (they may have no traffic).
    pub fn set_by_hand(&self) -> impl Iterator<Item = EndpointKey> + '_ {
        self.circuits
            .iter()
            .filter(|(_, c)| matches!(c.breaker.state(), State::ForcedOpen | State::Disabled))
            .map(|(k, _)| *k)
    }

    /// Keys of the circuits that follow dependency `name`.
    pub fn of_dependency(&self, name: &str) -> Vec<EndpointKey> {
        self.circuits
            .iter()
            .filter(|(_, c)| c.dependency.as_deref() == Some(name))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Endpoints whose breaker holds them failed (OPEN or HALF_OPEN, not a manual state).
    pub fn failing(&self) -> impl Iterator<Item = &EndpointKey> {
        self.restricted.iter().filter(|key| {
            self.circuits
                .get(key)
                .is_some_and(|c| matches!(c.breaker.state(), State::Open | State::HalfOpen))
        })
    }

    /// Transitions since the last call, oldest first.
    pub fn take_transitions(&mut self) -> Vec<TransitionEvent> {
        std::mem::take(&mut self.transitions)
    }

    /// Files a circuit in state `state` among those time can change and those that want a
    /// verdict.
    fn place(&mut self, key: EndpointKey, state: State) {
        if self.circuits.get(&key).is_some_and(|c| c.breaker.waiting()) {
            self.waiting.insert(key);
        } else {
            self.waiting.remove(&key);
        }
        if matches!(state, State::Closed | State::Disabled) {
            self.restricted.remove(&key);
        } else {
            self.restricted.insert(key);
        }
        self.dirty = true;
        self.changed.insert(key);
    }

    fn note(&mut self, key: EndpointKey, t: Transition) {
        self.place(key, t.to);
        let circuit = self.circuits.get(&key);
        let dependency = circuit.and_then(|c| c.dependency.clone());
        let endpoint = socket_addr(&key).to_string();
        let shown = crate::output::display_name(&endpoint, dependency.as_deref());
        log::info!("{shown}: {} → {}: {}", t.from, t.to, t.reason);
        self.transitions.push(TransitionEvent {
            endpoint,
            dependency,
            from: t.from.name().to_string(),
            to: t.to.name().to_string(),
            reason: t.reason.to_string(),
            details: t.reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{FailureKind, State};
    use crate::policy::{Dependency, Policy};
    use resil_common::maps::FAMILY_IPV4;

    fn key(port: u16) -> EndpointKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        EndpointKey {
            addr,
            port,
            family: FAMILY_IPV4,
            direction: 0,
        }
    }

    fn policies() -> Policies {
        let mut strict = Policy::default();
        strict.breaker.consecutive_failures = 2;
        Policies {
            defaults: Policy::default(),
            dependencies: vec![Dependency {
                name: "web".into(),
                endpoints: vec!["10.0.0.2:80".parse().unwrap()],
                policy: strict,
            }],
        }
    }

    #[test]
    fn every_transition_is_an_event_with_its_figures() {
        let p = policies();
        let mut c = Circuits::default();
        for _ in 0..2 {
            let (ticket, _) = c.admit(key(80), 0, &p);
            c.record(key(80), 0, ticket, Outcome::Failure(FailureKind::Refused));
        }
        assert_eq!(c.get(&key(80)).unwrap().breaker.state(), State::Open);
        let events = c.take_transitions();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!((e.from.as_str(), e.to.as_str()), ("closed", "open"));
        assert_eq!(e.endpoint, "10.0.0.2:80");
        assert_eq!(e.dependency.as_deref(), Some("web"));
        assert_eq!(e.reason, "2 consecutive failures");
        // Time opens the way to half-open: another event.
        c.tick(3_600_000_000_000);
        assert_eq!(c.take_transitions().last().unwrap().to, "half_open");
    }

    #[test]
    fn policies_follow_the_most_specific_match_and_reload_in_place() {
        let p = policies();
        let mut c = Circuits::default();
        c.admit(key(80), 0, &p);
        c.admit(key(81), 0, &p);
        assert_eq!(c.get(&key(80)).unwrap().dependency.as_deref(), Some("web"));
        assert_eq!(c.get(&key(81)).unwrap().dependency, None);
        // Reload without the dependency: the circuit stays, its policy changes.
        let (ticket, _) = c.admit(key(80), 0, &p);
        c.record(key(80), 0, ticket, Outcome::Failure(FailureKind::Refused));
        c.apply(&Policies::default(), 0);
        let circuit = c.get(&key(80)).unwrap();
        assert_eq!(circuit.dependency, None);
        assert_eq!(circuit.breaker.policy().consecutive_failures, 5);
        assert_eq!(circuit.breaker.totals(0).calls, 1, "figures kept");
    }
}
