//! The circuit breaker of one endpoint: pure logic, no BPF, no I/O; time is passed in
//! (CLOCK_MONOTONIC nanoseconds), so tests drive it with a fake clock.
//!
//! CLOSED counts outcomes in a sliding window and opens on a failure rate, a run of
//! consecutive failures or a slow-call rate. OPEN waits (exponential backoff with jitter),
//! then HALF_OPEN admits exactly `half_open_probes` attempts: all succeed → CLOSED with fresh
//! figures; one fails → OPEN with a longer wait. FORCED_OPEN and DISABLED are manual and
//! ignore outcomes. In metrics-only mode the machine runs the same way but is reported as
//! `metrics_only` and never enforced.

mod backoff;
mod window;

use std::fmt;

pub use backoff::{Backoff, BackoffPolicy};
use serde::{Deserialize, Serialize};
pub use window::{CountWindow, Sample, SampleRef, TimeWindow, Totals, Window};

/// How a connection attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handshake completed in this many nanoseconds.
    Success { latency_ns: u64 },
    /// A failure of some kind; whether it counts is the policy's call.
    Failure(FailureKind),
}

/// Kinds of failed attempts, as named in the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// RST in answer to the SYN.
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// ICMP destination unreachable.
    Unreachable,
    /// Reset by the peer before it sent any data.
    Reset,
}

impl FailureKind {
    /// Every kind, in documentation order.
    pub const ALL: [FailureKind; 4] = [
        FailureKind::Refused,
        FailureKind::Timeout,
        FailureKind::Unreachable,
        FailureKind::Reset,
    ];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Timeout => "timeout",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Reset => "reset",
        }
    }
}

/// A set of [`FailureKind`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FailureSet(u8);

impl FailureSet {
    /// Every kind.
    pub const ALL: FailureSet = FailureSet(0b1111);

    /// The set of these kinds.
    pub fn of(kinds: &[FailureKind]) -> Self {
        FailureSet(kinds.iter().fold(0, |bits, k| bits | k.bit()))
    }

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: FailureKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// The kinds in the set.
    pub fn kinds(self) -> Vec<FailureKind> {
        FailureKind::ALL
            .into_iter()
            .filter(|k| self.contains(*k))
            .collect()
    }
}

/// Which window counts outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowPolicy {
    /// The last `calls` outcomes.
    Count { calls: u32 },
    /// The outcomes of the last `duration_ns`, in `buckets`.
    Time { duration_ns: u64, buckets: u32 },
}

impl WindowPolicy {
    fn build(self) -> Window {
        match self {
            WindowPolicy::Count { calls } => Window::Count(CountWindow::new(calls)),
            WindowPolicy::Time {
                duration_ns,
                buckets,
            } => Window::Time(TimeWindow::new(duration_ns, buckets)),
        }
    }
}

/// Enforce decisions, or only compute and report them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Open circuits are enforced in the kernel.
    #[default]
    Enforce,
    /// Decide and report, never enforce.
    MetricsOnly,
}

/// Everything the breaker needs to decide; resolved from the configuration per endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerPolicy {
    pub mode: Mode,
    pub failures: FailureSet,
    pub window: WindowPolicy,
    /// Failure rate (0..1) at or above which the circuit opens.
    pub failure_rate_threshold: f64,
    /// Outcomes the window must hold before its rates count.
    pub minimum_calls: u32,
    /// Consecutive failures that open the circuit; 0 disables the rule.
    pub consecutive_failures: u32,
    /// A handshake at least this slow is a slow call.
    pub slow_call_ns: u64,
    /// Slow-call rate (0..1) at or above which the circuit opens.
    pub slow_call_rate_threshold: f64,
    pub backoff: BackoffPolicy,
    /// Attempts HALF_OPEN admits.
    pub half_open_probes: u32,
    /// Longest stay in HALF_OPEN before reopening; 0: no limit.
    pub half_open_max_ns: u64,
}

/// Breaker states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
    ForcedOpen,
    Disabled,
}

impl State {
    /// The name used in status and events.
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a transition happened, with the figures that caused it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Reason {
    FailureRate {
        rate: f64,
        threshold: f64,
        calls: u32,
    },
    ConsecutiveFailures {
        failures: u32,
    },
    SlowCallRate {
        rate: f64,
        threshold: f64,
        calls: u32,
        slow_ms: f64,
    },
    WaitElapsed {
        waited_ms: f64,
    },
    ProbesSucceeded {
        probes: u32,
    },
    ProbeFailed {
        kind: FailureKind,
    },
    HalfOpenTimeout {
        waited_ms: f64,
    },
    Manual,
}

fn percent(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::FailureRate {
                rate,
                threshold,
                calls,
            } => write!(
                f,
                "failure rate {} ≥ {} over {calls} attempts",
                percent(*rate),
                percent(*threshold)
            ),
            Reason::ConsecutiveFailures { failures } => {
                write!(f, "{failures} consecutive failures")
            }
            Reason::SlowCallRate {
                rate,
                threshold,
                calls,
                slow_ms,
            } => write!(
                f,
                "{} of {calls} handshakes slower than {slow_ms} ms (threshold {})",
                percent(*rate),
                percent(*threshold)
            ),
            Reason::WaitElapsed { waited_ms } => {
                write!(f, "open for {:.1} s, probing", waited_ms / 1000.0)
            }
            Reason::ProbesSucceeded { probes } => write!(f, "{probes} probe(s) succeeded"),
            Reason::ProbeFailed { kind } => write!(f, "probe failed: {}", kind.name()),
            Reason::HalfOpenTimeout { waited_ms } => {
                write!(f, "no probe outcome within {:.1} s", waited_ms / 1000.0)
            }
            Reason::Manual => f.write_str("set by an operator"),
        }
    }
}

/// A state change.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: Reason,
    pub at_ns: u64,
}

/// Whether an attempt may go ahead, and the state it was decided in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// Transitions so far when the attempt started; a later outcome for an older generation
    /// is ignored.
    generation: u64,
    /// Admitted (CLOSED, DISABLED, or a HALF_OPEN probe); otherwise it would be fast-failed.
    pub admitted: bool,
    /// One of HALF_OPEN's probes.
    probe: bool,
}

/// A recorded success that may still turn into a failure (reset before any reply). Not
/// `Copy`: amending consumes it, so one sample cannot be amended twice.
#[derive(Debug, PartialEq, Eq)]
pub struct Recorded {
    generation: u64,
    /// Which window it went into (windows are rebuilt on close and on reshaping reloads).
    window_epoch: u64,
    at: SampleRef,
    sample: Sample,
    /// Successes recorded up to and including this one.
    successes: u64,
}

/// What of a breaker outlives a daemon restart: its state, why, and how long it waits. Not its
/// window: a restored breaker counts outcomes afresh. Times are CLOCK_MONOTONIC, valid until
/// the machine reboots (as are the pinned maps that keep this).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub state: State,
    pub entered_ns: u64,
    /// OPEN: when the wait ends.
    pub open_until_ns: u64,
    /// Consecutive openings the backoff has counted.
    pub backoff_level: u32,
    pub generation: u64,
    pub reason: Option<Reason>,
}

/// The breaker of one endpoint.
#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: State,
    entered_ns: u64,
    generation: u64,
    window: Window,
    /// Bumped whenever `window` is rebuilt, so old sample references die with it.
    window_epoch: u64,
    /// Successes recorded in CLOSED so far (to tell whether one came after a given sample).
    successes: u64,
    consecutive_failures: u32,
    backoff: Backoff,
    /// OPEN: when the wait ends.
    open_until_ns: u64,
    /// HALF_OPEN: probes admitted, probes that succeeded, and probe slots given back because
    /// their outcome did not count (the kernel then needs as many more tokens).
    probes_admitted: u32,
    probes_succeeded: u32,
    probes_released: u32,
    /// CLOSED: since when the backoff has been decaying.
    healthy_since_ns: u64,
    reason: Option<Reason>,
}

impl Breaker {
    /// A closed breaker; `seed` varies its jitter.
    pub fn new(policy: BreakerPolicy, now_ns: u64, seed: u64) -> Self {
        Self {
            policy,
            state: State::Closed,
            entered_ns: now_ns,
            generation: 0,
            window: policy.window.build(),
            window_epoch: 0,
            successes: 0,
            consecutive_failures: 0,
            backoff: Backoff::new(seed),
            open_until_ns: 0,
            probes_admitted: 0,
            probes_succeeded: 0,
            probes_released: 0,
            healthy_since_ns: now_ns,
            reason: None,
        }
    }

    /// What to keep across a restart: every state but CLOSED (a closed breaker restarts
    /// closed, its backoff decayed).
    pub fn save(&self) -> Option<SavedState> {
        (self.state != State::Closed).then(|| SavedState {
            state: self.state,
            entered_ns: self.entered_ns,
            open_until_ns: self.open_until_ns,
            backoff_level: self.backoff.level(),
            generation: self.generation,
            reason: self.reason.clone(),
        })
    }

    /// A breaker as a previous run saved it. A HALF_OPEN one starts a new probe period (the
    /// old one's probes were in flight when the daemon stopped); the generation moves on so
    /// the kernel's old probe tokens match nothing.
    pub fn restore(policy: BreakerPolicy, saved: SavedState, now_ns: u64, seed: u64) -> Self {
        let mut breaker = Self::new(policy, now_ns, seed);
        breaker.state = saved.state;
        // The half-open limit (half_open_max_duration) counts from the new probe period.
        breaker.entered_ns = if saved.state == State::HalfOpen {
            now_ns
        } else {
            saved.entered_ns
        };
        breaker.open_until_ns = saved.open_until_ns;
        breaker.backoff = Backoff::with_level(seed, saved.backoff_level);
        breaker.generation = saved.generation.wrapping_add(1);
        breaker.reason = saved.reason;
        breaker
    }

    /// The state machine's state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The state as reported: metrics-only policies report `metrics_only` unless an operator
    /// forced or disabled the circuit.
    pub fn reported_state(&self) -> &'static str {
        match (self.policy.mode, self.state) {
            (Mode::MetricsOnly, State::Closed | State::Open | State::HalfOpen) => "metrics_only",
            (_, state) => state.name(),
        }
    }

    /// Whether the kernel should refuse new connections now (OPEN or FORCED_OPEN, enforced).
    pub fn enforcing(&self) -> bool {
        match self.state {
            State::ForcedOpen => true,
            State::Open | State::HalfOpen => self.policy.mode == Mode::Enforce,
            State::Closed | State::Disabled => false,
        }
    }

    /// Why the breaker is in its state (none while it never left CLOSED).
    pub fn reason(&self) -> Option<&Reason> {
        self.reason.as_ref()
    }

    /// When the current state began.
    pub fn entered_ns(&self) -> u64 {
        self.entered_ns
    }

    /// The policy in force.
    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    /// Window figures now.
    pub fn totals(&self, now_ns: u64) -> Totals {
        self.window.totals(now_ns)
    }

    /// The failure rate over the window, `None` below the minimum number of calls.
    pub fn failure_rate(&self, now_ns: u64) -> Option<f64> {
        self.window
            .totals(now_ns)
            .failure_rate(self.policy.minimum_calls)
    }

    /// HALF_OPEN probes not yet handed out.
    pub fn probes_left(&self) -> u32 {
        match self.state {
            State::HalfOpen => {
                self.policy.half_open_probes
                    - self.probes_admitted.min(self.policy.half_open_probes)
            }
            _ => 0,
        }
    }

    /// Probe tokens the kernel should have handed out in this HALF_OPEN period: the policy's
    /// probes plus those given back.
    pub fn probe_tokens(&self) -> u32 {
        self.policy
            .half_open_probes
            .saturating_add(self.probes_released)
    }

    /// Applies a new policy, keeping the state; the window restarts only if its shape changed.
    /// In HALF_OPEN, fewer probes than have already succeeded close the circuit at once.
    pub fn set_policy(&mut self, policy: BreakerPolicy, now_ns: u64) -> Option<Transition> {
        if policy.window != self.policy.window {
            self.rebuild_window(&policy);
        }
        self.policy = policy;
        if self.state == State::HalfOpen && self.probes_succeeded >= policy.half_open_probes {
            let probes = self.probes_succeeded;
            return Some(self.close(now_ns, Reason::ProbesSucceeded { probes }));
        }
        None
    }

    fn rebuild_window(&mut self, policy: &BreakerPolicy) {
        self.window = policy.window.build();
        self.window_epoch += 1;
    }

    /// Gives back the slot of an admitted attempt whose outcome will never be recorded (the
    /// caller could not keep its ticket).
    pub fn release(&mut self, ticket: Ticket) {
        if ticket.probe && ticket.generation == self.generation && self.state == State::HalfOpen {
            self.probes_admitted = self.probes_admitted.saturating_sub(1);
            self.probes_released = self.probes_released.saturating_add(1);
        }
    }

    /// A connection attempt starts: may it go ahead? (Time-driven transitions happen in
    /// [`Breaker::tick`], which the caller runs first.)
    pub fn admit(&mut self) -> Ticket {
        let (admitted, probe) = match self.state {
            State::Closed | State::Disabled => (true, false),
            State::Open | State::ForcedOpen => (false, false),
            State::HalfOpen => {
                if self.probes_admitted < self.policy.half_open_probes {
                    self.probes_admitted += 1;
                    (true, true)
                } else {
                    (false, false)
                }
            }
        };
        Ticket {
            generation: self.generation,
            admitted,
            probe,
        }
    }

    /// The outcome of an attempt admitted with `ticket`. Outcomes for attempts that were not
    /// admitted, or that started before the last transition, are ignored. Returns where a
    /// success went (so a reset before reply can amend it) and the transition it caused.
    pub fn record(
        &mut self,
        now_ns: u64,
        ticket: Ticket,
        outcome: Outcome,
    ) -> (Option<Recorded>, Option<Transition>) {
        if !ticket.admitted || ticket.generation != self.generation {
            return (None, None);
        }
        let sample = match outcome {
            Outcome::Success { latency_ns } => Sample {
                failure: false,
                slow: latency_ns >= self.policy.slow_call_ns,
            },
            Outcome::Failure(kind) if self.policy.failures.contains(kind) => Sample {
                failure: true,
                slow: false,
            },
            Outcome::Failure(_) => {
                // Counts neither way; a probe's slot goes back for another attempt.
                self.release(ticket);
                return (None, None);
            }
        };
        match self.state {
            State::Closed => {
                let at = self.window.record(now_ns, sample);
                self.consecutive_failures = if sample.failure {
                    self.consecutive_failures.saturating_add(1)
                } else {
                    self.successes += 1;
                    0
                };
                let recorded = (!sample.failure).then_some(Recorded {
                    generation: self.generation,
                    window_epoch: self.window_epoch,
                    at,
                    sample,
                    successes: self.successes,
                });
                (recorded, self.check_trip(now_ns))
            }
            State::HalfOpen if ticket.probe => {
                let transition = match outcome {
                    Outcome::Failure(kind) => self.reopen(now_ns, Reason::ProbeFailed { kind }),
                    Outcome::Success { .. } => {
                        self.probes_succeeded += 1;
                        if self.probes_succeeded >= self.policy.half_open_probes {
                            let probes = self.probes_succeeded;
                            Some(self.close(now_ns, Reason::ProbesSucceeded { probes }))
                        } else {
                            None
                        }
                    }
                };
                (None, transition)
            }
            _ => (None, None),
        }
    }

    /// A success recorded earlier was reset by the peer before any reply: count it as a
    /// failure instead, if the policy counts resets and the sample is still in the window.
    /// (A half-open probe counts at its handshake: closing the circuit starts a new
    /// generation, and a reset after that is not amended.)
    pub fn amend_reset(&mut self, now_ns: u64, recorded: Recorded) -> Option<Transition> {
        if recorded.generation != self.generation
            || recorded.window_epoch != self.window_epoch
            || self.state != State::Closed
            || !self.policy.failures.contains(FailureKind::Reset)
        {
            return None;
        }
        let failure = Sample {
            failure: true,
            slow: false,
        };
        if !self
            .window
            .amend(now_ns, recorded.at, recorded.sample, failure)
        {
            return None;
        }
        // It extends the current run of failures only if no success came after it.
        if self.successes == recorded.successes {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        }
        self.check_trip(now_ns)
    }

    /// Time passes: OPEN → HALF_OPEN after the wait, HALF_OPEN → OPEN after its limit.
    /// Nothing happens in other states, so callers need to tick only circuits that
    /// [`Breaker::waiting`].
    pub fn tick(&mut self, now_ns: u64) -> Option<Transition> {
        match self.state {
            State::Open if now_ns >= self.open_until_ns => {
                let waited_ms = now_ns.saturating_sub(self.entered_ns) as f64 / 1e6;
                self.probes_admitted = 0;
                self.probes_succeeded = 0;
                self.probes_released = 0;
                Some(self.enter(State::HalfOpen, now_ns, Reason::WaitElapsed { waited_ms }))
            }
            State::HalfOpen
                if self.policy.half_open_max_ns > 0
                    && now_ns.saturating_sub(self.entered_ns) >= self.policy.half_open_max_ns =>
            {
                let waited_ms = now_ns.saturating_sub(self.entered_ns) as f64 / 1e6;
                self.reopen(now_ns, Reason::HalfOpenTimeout { waited_ms })
            }
            _ => None,
        }
    }

    /// Operator: refuse everything until reset.
    pub fn force_open(&mut self, now_ns: u64) -> Transition {
        self.enter(State::ForcedOpen, now_ns, Reason::Manual)
    }

    /// Operator: never refuse, ignore outcomes until reset.
    pub fn disable(&mut self, now_ns: u64) -> Transition {
        self.enter(State::Disabled, now_ns, Reason::Manual)
    }

    /// Operator: back to CLOSED with fresh figures.
    pub fn reset(&mut self, now_ns: u64) -> Transition {
        self.close(now_ns, Reason::Manual)
    }

    /// Transitions so far: a half-open period's probe tokens carry it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether time alone can change the state (OPEN, or HALF_OPEN with a time limit).
    pub fn waiting(&self) -> bool {
        match self.state {
            State::Open => true,
            State::HalfOpen => self.policy.half_open_max_ns > 0,
            _ => false,
        }
    }

    /// Backoff level (consecutive openings not yet decayed) as of `now_ns`.
    pub fn backoff_level(&mut self, now_ns: u64) -> u32 {
        self.decay(now_ns);
        self.backoff.level()
    }

    /// Takes a backoff step off for every full decay period spent healthy (CLOSED) so far.
    /// Applied lazily, when it matters, so closed circuits need no ticking.
    fn decay(&mut self, now_ns: u64) {
        let decay = self.policy.backoff.decay_ns;
        if self.state != State::Closed || decay == 0 || now_ns < self.healthy_since_ns + decay {
            return;
        }
        let steps = (now_ns - self.healthy_since_ns) / decay;
        self.backoff.decay(steps * decay, &self.policy.backoff);
        self.healthy_since_ns += steps * decay;
    }

    /// OPEN: when the wait ends.
    pub fn open_until_ns(&self) -> Option<u64> {
        (self.state == State::Open).then_some(self.open_until_ns)
    }

    fn check_trip(&mut self, now_ns: u64) -> Option<Transition> {
        let p = self.policy;
        let reason = if p.consecutive_failures > 0
            && self.consecutive_failures >= p.consecutive_failures
        {
            Some(Reason::ConsecutiveFailures {
                failures: self.consecutive_failures,
            })
        } else {
            let totals = self.window.totals(now_ns);
            let failure_rate = totals.failure_rate(p.minimum_calls);
            let slow_rate = totals.slow_rate(p.minimum_calls);
            match (failure_rate, slow_rate) {
                (Some(rate), _) if rate >= p.failure_rate_threshold => Some(Reason::FailureRate {
                    rate,
                    threshold: p.failure_rate_threshold,
                    calls: totals.calls,
                }),
                (_, Some(rate)) if rate >= p.slow_call_rate_threshold => {
                    Some(Reason::SlowCallRate {
                        rate,
                        threshold: p.slow_call_rate_threshold,
                        calls: totals.calls,
                        slow_ms: p.slow_call_ns as f64 / 1e6,
                    })
                }
                _ => None,
            }
        };
        reason.and_then(|reason| self.reopen(now_ns, reason))
    }

    /// To OPEN with the next (longer) wait.
    fn reopen(&mut self, now_ns: u64, reason: Reason) -> Option<Transition> {
        self.decay(now_ns);
        let wait = self.backoff.next_wait_ns(&self.policy.backoff);
        self.open_until_ns = now_ns.saturating_add(wait);
        Some(self.enter(State::Open, now_ns, reason))
    }

    /// To CLOSED with an empty window.
    fn close(&mut self, now_ns: u64, reason: Reason) -> Transition {
        let policy = self.policy;
        self.rebuild_window(&policy);
        self.consecutive_failures = 0;
        self.healthy_since_ns = now_ns;
        self.enter(State::Closed, now_ns, reason)
    }

    fn enter(&mut self, to: State, now_ns: u64, reason: Reason) -> Transition {
        let from = self.state;
        self.state = to;
        self.entered_ns = now_ns;
        self.generation += 1;
        self.reason = Some(reason.clone());
        Transition {
            from,
            to,
            reason,
            at_ns: now_ns,
        }
    }
}

#[cfg(test)]
mod tests;
