//! The reference suites' cases (Resilience4j, Hystrix, Polly, Envoy, Finagle), on a fake clock.

use super::*;
use proptest::prelude::*;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;

fn policy() -> BreakerPolicy {
    BreakerPolicy {
        mode: Mode::Enforce,
        failures: FailureSet::ALL,
        window: WindowPolicy::Count { calls: 10 },
        failure_rate_threshold: 0.5,
        minimum_calls: 10,
        consecutive_failures: 0,
        slow_call_ns: 500 * MS,
        slow_call_rate_threshold: 1.0,
        backoff: BackoffPolicy {
            base_ns: 5 * SEC,
            max_ns: 60 * SEC,
            multiplier: 2.0,
            jitter: 0.0,
            decay_ns: 60 * SEC,
        },
        half_open_probes: 1,
        half_open_max_ns: 0,
    }
}

const OK: Outcome = Outcome::Success { latency_ns: MS };
const SLOW: Outcome = Outcome::Success {
    latency_ns: 600 * MS,
};
const REFUSED: Outcome = Outcome::Failure(FailureKind::Refused);
const TIMEOUT: Outcome = Outcome::Failure(FailureKind::Timeout);

/// A breaker and a fake clock.
struct Rig {
    b: Breaker,
    now: u64,
    transitions: Vec<Transition>,
}

impl Rig {
    fn new(policy: BreakerPolicy) -> Self {
        Rig {
            b: Breaker::new(policy, 0, 7),
            now: 0,
            transitions: Vec::new(),
        }
    }

    fn call(&mut self, outcome: Outcome) -> Ticket {
        self.tick();
        let ticket = self.b.admit();
        let (_, t) = self.b.record(self.now, ticket, outcome);
        self.transitions.extend(t);
        ticket
    }

    fn calls(&mut self, outcome: Outcome, n: usize) {
        for _ in 0..n {
            self.call(outcome);
        }
    }

    fn advance(&mut self, ns: u64) {
        self.now += ns;
        self.tick();
    }

    fn tick(&mut self) {
        let t = self.b.tick(self.now);
        self.transitions.extend(t);
    }

    fn state(&self) -> State {
        self.b.state()
    }

    fn open(&mut self) {
        self.calls(REFUSED, 10);
        assert_eq!(self.state(), State::Open);
    }

    /// Waits out the current OPEN period.
    fn wait_open(&mut self) {
        let until = self.b.open_until_ns().expect("open");
        self.advance(until - self.now);
        assert_eq!(self.state(), State::HalfOpen);
    }
}

#[test]
fn opens_exactly_at_the_failure_rate_threshold() {
    let mut r = Rig::new(policy());
    r.calls(REFUSED, 5);
    r.calls(OK, 4);
    assert_eq!(r.state(), State::Closed, "9 calls: below the minimum");
    assert_eq!(r.b.failure_rate(r.now), None);
    r.call(OK);
    assert_eq!(r.state(), State::Open, "5 of 10 = 50 % ≥ 50 %");
    assert_eq!(
        r.transitions[0].reason,
        Reason::FailureRate {
            rate: 0.5,
            threshold: 0.5,
            calls: 10
        }
    );
}

#[test]
fn stays_closed_just_below_the_threshold() {
    let mut r = Rig::new(policy());
    r.calls(REFUSED, 4);
    r.calls(OK, 6);
    assert_eq!(r.state(), State::Closed);
    assert_eq!(r.b.failure_rate(r.now), Some(0.4));
}

#[test]
fn no_decision_below_minimum_calls() {
    let mut r = Rig::new(BreakerPolicy {
        minimum_calls: 20,
        window: WindowPolicy::Count { calls: 100 },
        ..policy()
    });
    r.calls(REFUSED, 19);
    assert_eq!(r.state(), State::Closed);
    assert_eq!(r.b.failure_rate(r.now), None, "unknown, not 0 and not 1");
    r.call(REFUSED);
    assert_eq!(r.state(), State::Open);
}

#[test]
fn count_window_slides() {
    let mut r = Rig::new(policy());
    r.calls(OK, 10);
    r.calls(REFUSED, 4);
    assert_eq!(r.b.failure_rate(r.now), Some(0.4));
    r.call(REFUSED);
    assert_eq!(r.state(), State::Open);
}

#[test]
fn time_window_buckets_expire_and_clock_jumps_empty_it() {
    let mut r = Rig::new(BreakerPolicy {
        window: WindowPolicy::Time {
            duration_ns: 10 * SEC,
            buckets: 10,
        },
        ..policy()
    });
    r.calls(REFUSED, 9);
    r.advance(9 * SEC + 999 * MS);
    assert_eq!(r.b.totals(r.now).calls, 9, "still in the window");
    r.advance(MS);
    assert_eq!(r.b.totals(r.now).calls, 0, "the first bucket left");
    r.calls(REFUSED, 9);
    r.advance(3600 * SEC); // suspend/resume
    r.call(REFUSED);
    assert_eq!(r.b.totals(r.now).calls, 1);
    assert_eq!(r.state(), State::Closed);
}

#[test]
fn consecutive_failures_open_and_a_success_resets_the_run() {
    let mut r = Rig::new(BreakerPolicy {
        consecutive_failures: 5,
        minimum_calls: 1000,
        window: WindowPolicy::Count { calls: 1000 },
        ..policy()
    });
    r.calls(REFUSED, 4);
    r.call(OK);
    r.calls(REFUSED, 4);
    assert_eq!(r.state(), State::Closed);
    r.call(TIMEOUT);
    assert_eq!(r.state(), State::Open);
    assert_eq!(
        r.transitions[0].reason,
        Reason::ConsecutiveFailures { failures: 5 }
    );
}

#[test]
fn slow_call_rate_opens() {
    let mut r = Rig::new(policy());
    r.calls(SLOW, 9);
    r.call(OK);
    assert_eq!(r.state(), State::Closed, "90 % slow < 100 %");
    r.calls(SLOW, 9);
    assert_eq!(
        r.state(),
        State::Closed,
        "the fast one is still in the window"
    );
    r.call(SLOW);
    assert_eq!(r.state(), State::Open, "it left: 10 of 10 slow");
    assert!(matches!(
        r.transitions[0].reason,
        Reason::SlowCallRate { calls: 10, .. }
    ));
    assert!(r.transitions[0]
        .reason
        .to_string()
        .contains("slower than 500 ms"));
}

#[test]
fn the_slow_boundary_is_inclusive() {
    let mut r = Rig::new(policy());
    r.calls(
        Outcome::Success {
            latency_ns: 500 * MS,
        },
        10,
    );
    assert_eq!(r.state(), State::Open);
    let mut r = Rig::new(policy());
    r.calls(
        Outcome::Success {
            latency_ns: 500 * MS - 1,
        },
        10,
    );
    assert_eq!(r.state(), State::Closed);
}

#[test]
fn failure_kinds_the_policy_ignores_are_not_calls() {
    let mut r = Rig::new(BreakerPolicy {
        failures: FailureSet::of(&[FailureKind::Refused]),
        ..policy()
    });
    r.calls(TIMEOUT, 20);
    assert_eq!(r.b.totals(r.now).calls, 0);
    r.calls(REFUSED, 10);
    assert_eq!(r.state(), State::Open);
}

#[test]
fn open_waits_exactly_then_half_opens() {
    let mut r = Rig::new(policy());
    r.open();
    r.advance(5 * SEC - 1);
    assert_eq!(r.state(), State::Open);
    assert!(!r.b.admit().admitted, "open refuses");
    r.advance(1);
    assert_eq!(r.state(), State::HalfOpen);
    assert!(matches!(
        r.transitions[1].reason,
        Reason::WaitElapsed { .. }
    ));
}

#[test]
fn half_open_admits_exactly_its_probes() {
    let mut r = Rig::new(BreakerPolicy {
        half_open_probes: 3,
        ..policy()
    });
    r.open();
    r.wait_open();
    let tickets: Vec<Ticket> = (0..5).map(|_| r.b.admit()).collect();
    let admitted = tickets.iter().filter(|t| t.admitted).count();
    assert_eq!(admitted, 3);
    assert_eq!(r.b.probes_left(), 0);
    // Non-probes' outcomes are ignored.
    let (_, t) = r.b.record(r.now, tickets[4], REFUSED);
    assert!(t.is_none());
    // Two of three probes succeed: still half-open; the third closes it with fresh figures.
    for ticket in &tickets[..2] {
        assert!(r.b.record(r.now, *ticket, OK).1.is_none());
    }
    let (_, t) = r.b.record(r.now, tickets[2], OK);
    let t = t.expect("closes");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
    assert_eq!(t.reason, Reason::ProbesSucceeded { probes: 3 });
    assert_eq!(r.b.totals(r.now), Totals::default());
}

#[test]
fn a_failed_probe_reopens_with_a_longer_wait() {
    let mut r = Rig::new(policy());
    r.open();
    let first_wait = r.b.open_until_ns().unwrap() - r.now;
    r.wait_open();
    let probe = r.b.admit();
    let (_, t) = r.b.record(r.now, probe, TIMEOUT);
    let t = t.unwrap();
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
    assert_eq!(
        t.reason,
        Reason::ProbeFailed {
            kind: FailureKind::Timeout
        }
    );
    let second_wait = r.b.open_until_ns().unwrap() - r.now;
    assert_eq!((first_wait, second_wait), (5 * SEC, 10 * SEC));
}

#[test]
fn backoff_grows_to_its_cap_and_decays_when_healthy() {
    let mut r = Rig::new(policy());
    r.open();
    let mut waits = vec![r.b.open_until_ns().unwrap() - r.now];
    for _ in 0..5 {
        r.wait_open();
        let probe = r.b.admit();
        r.b.record(r.now, probe, REFUSED);
        waits.push(r.b.open_until_ns().unwrap() - r.now);
    }
    let secs: Vec<u64> = waits.iter().map(|w| w / SEC).collect();
    assert_eq!(secs, [5, 10, 20, 40, 60, 60]);
    // Recover, stay healthy for two decay periods: the next wait is two steps shorter.
    r.wait_open();
    let probe = r.b.admit();
    r.b.record(r.now, probe, OK);
    assert_eq!(r.state(), State::Closed);
    assert_eq!(r.b.backoff_level(r.now), 6);
    r.advance(120 * SEC);
    assert_eq!(r.b.backoff_level(r.now), 4);
    r.open();
    assert_eq!((r.b.open_until_ns().unwrap() - r.now) / SEC, 60);
    let mut r2 = Rig::new(policy());
    r2.open();
    r2.wait_open();
    let p = r2.b.admit();
    r2.b.record(r2.now, p, OK);
    r2.advance(600 * SEC);
    assert_eq!(r2.b.backoff_level(r2.now), 0, "fully decayed");
    r2.open();
    assert_eq!((r2.b.open_until_ns().unwrap() - r2.now) / SEC, 5);
}

#[test]
fn half_open_time_limit_reopens() {
    let mut r = Rig::new(BreakerPolicy {
        half_open_max_ns: 2 * SEC,
        ..policy()
    });
    r.open();
    r.wait_open();
    r.advance(2 * SEC - 1);
    assert_eq!(r.state(), State::HalfOpen);
    r.advance(1);
    assert_eq!(r.state(), State::Open);
    assert!(matches!(
        r.transitions.last().unwrap().reason,
        Reason::HalfOpenTimeout { .. }
    ));
}

#[test]
fn late_results_are_ignored() {
    let mut r = Rig::new(policy());
    // An attempt starts while closed ...
    let early = r.b.admit();
    r.open();
    r.wait_open();
    // ... and its outcome lands in HALF_OPEN: it is not a probe, and must not close it.
    let (_, t) = r.b.record(r.now, early, OK);
    assert!(t.is_none());
    assert_eq!(r.state(), State::HalfOpen);
    assert_eq!(r.b.probes_left(), 1);
    // A probe's outcome arriving after the circuit was reset is ignored too.
    let probe = r.b.admit();
    r.b.reset(r.now);
    let (_, t) = r.b.record(r.now, probe, REFUSED);
    assert!(t.is_none());
    assert_eq!(r.b.totals(r.now).calls, 0);
}

#[test]
fn forced_open_refuses_and_ignores_everything_until_reset() {
    let mut r = Rig::new(policy());
    let t = r.b.force_open(r.now);
    assert_eq!(
        (t.from, t.to, t.reason),
        (State::Closed, State::ForcedOpen, Reason::Manual)
    );
    for _ in 0..20 {
        let ticket = r.b.admit();
        assert!(!ticket.admitted);
        assert!(r.b.record(r.now, ticket, OK).1.is_none());
    }
    r.advance(3600 * SEC);
    assert_eq!(r.state(), State::ForcedOpen);
    assert!(!r.b.waiting(), "manual states never change with time");
    assert!(r.b.enforcing());
    r.b.reset(r.now);
    assert_eq!(r.state(), State::Closed);
    assert!(!r.b.enforcing());
}

#[test]
fn disabled_admits_everything_and_never_trips() {
    let mut r = Rig::new(policy());
    r.b.disable(r.now);
    r.calls(REFUSED, 100);
    assert_eq!(r.state(), State::Disabled);
    assert_eq!(r.b.totals(r.now).calls, 0);
    assert!(!r.b.enforcing());
    // Manual states can only be left by an operator; reset lands in CLOSED.
    r.advance(3600 * SEC);
    assert_eq!(r.state(), State::Disabled);
    let t = r.b.reset(r.now);
    assert_eq!((t.from, t.to), (State::Disabled, State::Closed));
}

#[test]
fn metrics_only_decides_but_never_enforces() {
    let mut r = Rig::new(BreakerPolicy {
        mode: Mode::MetricsOnly,
        ..policy()
    });
    assert_eq!(r.b.reported_state(), "metrics_only");
    r.open();
    assert_eq!(r.b.reported_state(), "metrics_only");
    assert!(!r.b.enforcing());
    assert!(!r.b.admit().admitted, "would fast-fail");
    r.b.force_open(r.now);
    assert_eq!(r.b.reported_state(), "forced_open");
    assert!(r.b.enforcing(), "an operator's forced open is enforced");
}

#[test]
fn a_reset_before_reply_turns_a_success_into_a_failure() {
    let mut r = Rig::new(policy());
    let mut recorded = Vec::new();
    for _ in 0..10 {
        let ticket = r.b.admit();
        let (rec, _) = r.b.record(r.now, ticket, OK);
        recorded.push(rec.expect("a success is amendable"));
    }
    let mut recorded = recorded.into_iter();
    for rec in recorded.by_ref().take(4) {
        assert!(r.b.amend_reset(r.now, rec).is_none());
    }
    assert_eq!(r.b.failure_rate(r.now), Some(0.4));
    let t =
        r.b.amend_reset(r.now, recorded.next().unwrap())
            .expect("opens at 50 %");
    assert_eq!(t.to, State::Open);
    // Amends for a previous state are ignored.
    assert!(r.b.amend_reset(r.now, recorded.next().unwrap()).is_none());
}

#[test]
fn a_new_policy_keeps_state_and_restarts_only_a_reshaped_window() {
    let mut r = Rig::new(policy());
    r.calls(REFUSED, 3);
    r.b.set_policy(
        BreakerPolicy {
            consecutive_failures: 9,
            ..policy()
        },
        r.now,
    );
    assert_eq!(r.b.totals(r.now).calls, 3);
    r.b.set_policy(
        BreakerPolicy {
            window: WindowPolicy::Count { calls: 50 },
            ..policy()
        },
        r.now,
    );
    assert_eq!(r.b.totals(r.now).calls, 0);
    r.open();
    assert!(r.b.set_policy(policy(), r.now).is_none());
    assert_eq!(r.state(), State::Open);
}

#[test]
fn a_probe_whose_outcome_does_not_count_gives_its_slot_back() {
    let mut r = Rig::new(BreakerPolicy {
        failures: FailureSet::of(&[FailureKind::Refused]),
        ..policy()
    });
    r.open();
    r.wait_open();
    let probe = r.b.admit();
    assert_eq!((r.b.probes_left(), r.b.probe_tokens()), (0, 1));
    // A timeout is not a failure under this policy: the probe did not decide anything.
    let (_, t) = r.b.record(r.now, probe, TIMEOUT);
    assert!(t.is_none());
    assert_eq!(r.b.probes_left(), 1, "another attempt may probe");
    assert_eq!(r.b.probe_tokens(), 2, "the kernel needs one more token");
    let probe = r.b.admit();
    assert!(probe.admitted);
    r.b.record(r.now, probe, OK);
    assert_eq!(r.state(), State::Closed);
}

#[test]
fn a_probe_ticket_the_caller_cannot_keep_is_released() {
    let mut r = Rig::new(policy());
    r.open();
    r.wait_open();
    let probe = r.b.admit();
    r.b.release(probe);
    assert_eq!(r.b.probes_left(), 1);
    // Releasing a non-probe ticket changes nothing.
    let probe = r.b.admit();
    assert!(probe.admitted);
    let refused = r.b.admit();
    assert!(!refused.admitted);
    r.b.release(refused);
    assert_eq!(r.b.probes_left(), 0);
}

#[test]
fn fewer_probes_after_a_reload_close_a_half_open_circuit_already_proven() {
    let mut r = Rig::new(BreakerPolicy {
        half_open_probes: 3,
        ..policy()
    });
    r.open();
    r.wait_open();
    let probe = r.b.admit();
    r.b.record(r.now, probe, OK);
    assert_eq!(r.state(), State::HalfOpen);
    let t = r.b.set_policy(policy(), r.now).expect("closes");
    assert_eq!(
        (t.to, t.reason),
        (State::Closed, Reason::ProbesSucceeded { probes: 1 })
    );
}

#[test]
fn amendments_die_with_their_window() {
    // A reshaping reload rebuilds the window: references into the old one are ignored.
    let mut r = Rig::new(BreakerPolicy {
        window: WindowPolicy::Time {
            duration_ns: 10 * SEC,
            buckets: 10,
        },
        ..policy()
    });
    let ticket = r.b.admit();
    let (rec, _) = r.b.record(r.now, ticket, SLOW);
    r.b.set_policy(
        BreakerPolicy {
            window: WindowPolicy::Time {
                duration_ns: 20 * SEC,
                buckets: 20,
            },
            ..policy()
        },
        r.now,
    );
    let ticket = r.b.admit();
    r.b.record(r.now, ticket, OK);
    assert!(r.b.amend_reset(r.now, rec.unwrap()).is_none());
    assert_eq!(
        r.b.totals(r.now),
        Totals {
            calls: 1,
            failures: 0,
            slow: 0
        }
    );
    // After OPEN → HALF_OPEN → CLOSED, a reference from before is ignored too.
    let ticket = r.b.admit();
    let (rec, _) = r.b.record(r.now, ticket, OK);
    r.b.force_open(r.now);
    r.b.reset(r.now);
    assert!(r.b.amend_reset(r.now, rec.unwrap()).is_none());
}

#[test]
fn an_amended_failure_extends_the_run_only_if_nothing_succeeded_since() {
    let mut r = Rig::new(BreakerPolicy {
        consecutive_failures: 2,
        minimum_calls: 1000,
        window: WindowPolicy::Count { calls: 1000 },
        ..policy()
    });
    let ticket = r.b.admit();
    let (early, _) = r.b.record(r.now, ticket, OK);
    r.calls(OK, 2);
    r.call(REFUSED);
    assert!(
        r.b.amend_reset(r.now, early.unwrap()).is_none(),
        "not consecutive"
    );
    assert_eq!(r.state(), State::Closed);
    let ticket = r.b.admit();
    let (late, _) = r.b.record(r.now, ticket, OK);
    r.call(REFUSED);
    // `late` was followed only by a failure: amended, it makes two failures in a row.
    assert!(r.b.amend_reset(r.now, late.unwrap()).is_some());
    assert_eq!(r.state(), State::Open);
}

#[derive(Clone, Debug)]
enum Op {
    Call(u8),
    Admit,
    Advance(u32),
    /// Amend the oldest kept success as reset before reply.
    Amend,
    /// Reload with this many probes and a count (false) or time (true) window.
    Reload(u32, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4).prop_map(Op::Call),
        Just(Op::Admit),
        (0u32..20_000).prop_map(Op::Advance),
        Just(Op::Amend),
        (1u32..4, any::<bool>()).prop_map(|(p, w)| Op::Reload(p, w)),
    ]
}

proptest! {
    #[test]
    fn invariants_hold_for_any_sequence(
        ops in proptest::collection::vec(op(), 1..400),
        minimum in 1u32..30,
        probes in 1u32..5,
        threshold in 0.05f64..1.0,
        time_window in any::<bool>(),
    ) {
        let p = BreakerPolicy {
            minimum_calls: minimum,
            half_open_probes: probes,
            failure_rate_threshold: threshold,
            window: if time_window {
                WindowPolicy::Time { duration_ns: 10 * SEC, buckets: 10 }
            } else {
                WindowPolicy::Count { calls: 50 }
            },
            ..policy()
        };
        let mut r = Rig::new(p);
        let mut pending: Vec<Ticket> = Vec::new();
        let mut kept: Vec<Recorded> = Vec::new();
        let mut admitted_in_half_open = 0u32;
        let mut probes = probes;
        for op in ops {
            let before = r.transitions.len();
            match op {
                Op::Amend => {
                    if !kept.is_empty() {
                        let rec = kept.remove(0);
                        let t = r.b.amend_reset(r.now, rec);
                        r.transitions.extend(t);
                    }
                }
                Op::Reload(new_probes, time) => {
                    probes = new_probes;
                    let q = BreakerPolicy {
                        half_open_probes: new_probes,
                        window: if time {
                            WindowPolicy::Time { duration_ns: 20 * SEC, buckets: 20 }
                        } else {
                            WindowPolicy::Count { calls: 50 }
                        },
                        ..p
                    };
                    let t = r.b.set_policy(q, r.now);
                    r.transitions.extend(t);
                    admitted_in_half_open = admitted_in_half_open.min(new_probes);
                }
                Op::Admit => {
                    let t = r.b.admit();
                    if r.state() == State::HalfOpen && t.admitted {
                        admitted_in_half_open += 1;
                    }
                    pending.push(t);
                }
                Op::Call(kind) => {
                    let outcome = match kind {
                        0 => OK,
                        1 => SLOW,
                        2 => REFUSED,
                        _ => TIMEOUT,
                    };
                    let ticket = pending.pop().unwrap_or_else(|| r.b.admit());
                    let (rec, t) = r.b.record(r.now, ticket, outcome);
                    kept.extend(rec);
                    r.transitions.extend(t);
                }
                Op::Advance(ms) => r.advance(ms as u64 * MS),
            }
            for t in &r.transitions[before..] {
                if let Reason::FailureRate { calls, rate, .. } = t.reason {
                    prop_assert!(calls >= minimum, "opened on {calls} < {minimum} calls");
                    prop_assert!((0.0..=1.0).contains(&rate));
                }
                if t.to == State::HalfOpen {
                    admitted_in_half_open = 0;
                }
            }
            prop_assert!(admitted_in_half_open <= probes);
            if let Some(rate) = r.b.failure_rate(r.now) {
                prop_assert!((0.0..=1.0).contains(&rate));
            }
            let totals = r.b.totals(r.now);
            prop_assert!(totals.failures <= totals.calls && totals.slow <= totals.calls);
        }
    }
}

#[test]
fn a_restored_open_breaker_waits_out_the_same_open_period() {
    let mut rig = Rig::new(policy());
    rig.open();
    let saved = rig.b.save().expect("an open breaker is saved");
    let until = rig.b.open_until_ns().unwrap();
    // A new daemon, a little later: still open, for the same reason, until the same moment.
    let mut b = Breaker::restore(policy(), saved.clone(), rig.now + SEC, 7);
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.reason(), saved.reason.as_ref());
    assert_eq!(b.open_until_ns(), Some(until));
    assert!(!b.admit().admitted);
    assert_eq!(b.tick(until - 1), None);
    let t = b.tick(until).expect("half-opens when the wait ends");
    assert_eq!(t.to, State::HalfOpen);
    // The backoff remembers the opening: the next wait is twice as long.
    let ticket = b.admit();
    let (_, t) = b.record(until, ticket, REFUSED);
    assert_eq!(t.unwrap().to, State::Open);
    assert_eq!(b.open_until_ns(), Some(until + 10 * SEC));
}

#[test]
fn a_restored_half_open_breaker_starts_a_new_probe_period() {
    let mut rig = Rig::new(policy());
    rig.open();
    rig.wait_open();
    let probe = rig.b.admit();
    assert!(probe.probe, "the one probe went out before the restart");
    let saved = rig.b.save().unwrap();
    let mut b = Breaker::restore(policy(), saved.clone(), rig.now, 7);
    assert_eq!(b.state(), State::HalfOpen);
    assert!(
        b.generation() > rig.b.generation(),
        "old tokens match nothing"
    );
    assert_eq!(b.probes_left(), 1);
    let ticket = b.admit();
    assert!(ticket.probe);
    let (_, t) = b.record(rig.now, ticket, OK);
    assert_eq!(t.unwrap().to, State::Closed);

    // With a half-open limit, the time the daemon was down does not count against it.
    let limited = BreakerPolicy {
        half_open_max_ns: 2 * SEC,
        ..policy()
    };
    let back = rig.now + 10 * SEC;
    let mut b = Breaker::restore(limited, saved, back, 7);
    assert_eq!(b.tick(back + SEC), None, "a new probe period");
    let t = b
        .tick(back + 2 * SEC)
        .expect("the limit counts from the restart");
    assert_eq!(t.to, State::Open);
}

#[test]
fn closed_breakers_are_not_saved_and_manual_states_are() {
    let mut b = Breaker::new(policy(), 0, 7);
    assert_eq!(b.save(), None);
    b.force_open(SEC);
    let restored = Breaker::restore(policy(), b.save().unwrap(), 2 * SEC, 7);
    assert_eq!(restored.state(), State::ForcedOpen);
    b.disable(3 * SEC);
    let restored = Breaker::restore(policy(), b.save().unwrap(), 4 * SEC, 7);
    assert_eq!(restored.state(), State::Disabled);
    b.reset(5 * SEC);
    assert_eq!(b.save(), None);
}
