//! The configuration file (TOML): daemon settings, the default policy, and named dependencies
//! with their own settings.
//!
//! Values are checked while they are read, so every error names the file, the line, the key
//! and what was expected; unknown keys are errors too, so a typo never silently falls back to a
//! default.

use std::{
    collections::HashMap,
    fmt,
    marker::PhantomData,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use serde::{de, Deserialize, Deserializer};
use toml::Spanned;

use crate::{
    breaker::{FailureKind, FailureSet, Mode, WindowPolicy},
    error::usage,
    policy::{Dependency, EndpointPattern, Policies, Policy},
    services::ServiceRule,
};

/// The embedded configuration: the built-in defaults written out, for reference.
pub const EMBEDDED: &str = include_str!("default.toml");

/// Where the daemon looks for a configuration file when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/resil/resil.toml";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How often the daemon reads the kernel's counters and ticks the breakers.
    pub tick: Duration,
    /// How long the kernel keeps enforcing a verdict the daemon stopped refreshing.
    pub fail_open_after: Duration,
    /// A DNS query unanswered this long is a timeout.
    pub dns_timeout: Duration,
    /// Endpoints exported to Prometheus one by one, at most; the rest are summed up.
    pub metrics_max_endpoints: usize,
    /// Local services with shedding or a bulkhead.
    pub services: Vec<ServiceRule>,
    /// Defaults and dependencies.
    pub policies: Policies,
    /// Where it came from (a file, or the embedded defaults), for messages and reloads.
    pub source: Source,
}

/// Where a configuration came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Embedded,
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Embedded => f.write_str("the embedded defaults"),
            Source::File(path) => write!(f, "{}", path.display()),
        }
    }
}

// ---- Values that check themselves while being read ------------------------------------------

/// A duration between `MIN_MS` and `MAX_MS` milliseconds, written like "500ms" or "2m".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dur<const MIN_MS: u64, const MAX_MS: u64>(pub Duration);

fn human_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

impl<'de, const MIN_MS: u64, const MAX_MS: u64> Deserialize<'de> for Dur<MIN_MS, MAX_MS> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = || {
            format!(
                "expected a duration from {} to {} like \"500ms\" or \"2s\"",
                human_ms(MIN_MS),
                human_ms(MAX_MS)
            )
        };
        let text = String::deserialize(d).map_err(|_| de::Error::custom(expected()))?;
        let value = humantime::parse_duration(&text)
            .map_err(|_| de::Error::custom(format!("{}, not \"{text}\"", expected())))?;
        if value < Duration::from_millis(MIN_MS) || value > Duration::from_millis(MAX_MS) {
            return Err(de::Error::custom(format!("{}, not \"{text}\"", expected())));
        }
        Ok(Dur(value))
    }
}

/// A whole number from `MIN` to `MAX`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Count<const MIN: u32, const MAX: u32>(pub u32);

impl<'de, const MIN: u32, const MAX: u32> Deserialize<'de> for Count<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = format!("expected a whole number from {MIN} to {MAX}");
        let value = i64::deserialize(d).map_err(|_| de::Error::custom(&expected))?;
        if value < MIN as i64 || value > MAX as i64 {
            return Err(de::Error::custom(format!("{expected}, not {value}")));
        }
        Ok(Count(value as u32))
    }
}

/// A number in a closed range, described by `R`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranged<R>(pub f64, PhantomData<R>);

/// The bounds of a [`Ranged`] number.
pub trait Range {
    const MIN: f64;
    const MAX: f64;
    /// Whether MIN itself is excluded.
    const ABOVE_MIN: bool = false;
}

/// A rate or threshold: above 0, at most 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold;
impl Range for Threshold {
    const MIN: f64 = 0.0;
    const MAX: f64 = 1.0;
    const ABOVE_MIN: bool = true;
}

/// A fraction from 0 to 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraction;
impl Range for Fraction {
    const MIN: f64 = 0.0;
    const MAX: f64 = 1.0;
}

/// A growth factor from 1 to 10.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Factor;
impl Range for Factor {
    const MIN: f64 = 1.0;
    const MAX: f64 = 10.0;
}

impl<'de, R: Range> Deserialize<'de> for Ranged<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = if R::ABOVE_MIN {
            format!("expected a number above {} and at most {}", R::MIN, R::MAX)
        } else {
            format!("expected a number from {} to {}", R::MIN, R::MAX)
        };
        let value = f64::deserialize(d).map_err(|_| de::Error::custom(&expected))?;
        let low = if R::ABOVE_MIN {
            value <= R::MIN
        } else {
            value < R::MIN
        };
        if low || value > R::MAX || value.is_nan() {
            return Err(de::Error::custom(format!("{expected}, not {value}")));
        }
        Ok(Ranged(value, PhantomData))
    }
}

impl<'de> Deserialize<'de> for EndpointPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            de::Error::custom("expected an endpoint like \"10.0.3.7:5432\", \"10.0.4.0/24:5432\" or \"[fd00::/64]:443\"")
        })?;
        text.parse().map_err(de::Error::custom)
    }
}

/// `sliding_window`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WindowKind {
    Time,
    Count,
}

// ---- The file's shape -------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    daemon: DaemonKeys,
    defaults: Option<Spanned<PolicyKeys>>,
    #[serde(default, rename = "dependency")]
    dependencies: Vec<DependencyKeys>,
    #[serde(default)]
    metrics: MetricsKeys,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<ServiceKeys>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonKeys {
    tick: Option<Dur<10, 10_000>>,
    fail_open_after: Option<Dur<200, 600_000>>,
    dns_timeout: Option<Dur<100, 60_000>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsKeys {
    max_endpoints: Option<Count<0, 100_000>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceKeys {
    name: Option<String>,
    port: Count<1, 65_535>,
    address: Option<Address>,
    #[serde(default)]
    shed_when_unhealthy: bool,
    max_connections: Option<Count<1, 10_000_000>>,
}

/// A local IP address.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Address(std::net::IpAddr);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = "expected an IP address like \"10.0.0.2\" or \"fd00::2\"";
        let text = String::deserialize(d).map_err(|_| de::Error::custom(expected))?;
        text.parse()
            .map(Address)
            .map_err(|_| de::Error::custom(format!("{expected}, not \"{text}\"")))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DependencyKeys {
    name: Spanned<String>,
    endpoints: Vec<Spanned<EndpointPattern>>,
    #[serde(default = "no_policy_keys")]
    policy: Spanned<PolicyKeys>,
}

fn no_policy_keys() -> Spanned<PolicyKeys> {
    Spanned::new(0..0, PolicyKeys::default())
}

/// Every policy key, all optional: what a table sets over what it inherits.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyKeys {
    connect_timeout: Option<Dur<10, 600_000>>,
    mode: Option<Mode>,
    failures: Option<Vec<FailureKind>>,
    failure_rate_threshold: Option<Ranged<Threshold>>,
    minimum_calls: Option<Count<1, 100_000>>,
    consecutive_failures: Option<Count<0, 100_000>>,
    slow_call_duration: Option<Dur<1, 600_000>>,
    slow_call_rate_threshold: Option<Ranged<Threshold>>,
    sliding_window: Option<WindowKind>,
    window_duration: Option<Dur<100, 3_600_000>>,
    window_buckets: Option<Count<1, 1_000>>,
    window_calls: Option<Count<1, 100_000>>,
    open_wait: Option<Dur<10, 3_600_000>>,
    open_wait_max: Option<Dur<10, 86_400_000>>,
    open_wait_multiplier: Option<Ranged<Factor>>,
    open_wait_jitter: Option<Ranged<Fraction>>,
    backoff_decay: Option<Dur<0, 86_400_000>>,
    half_open_probes: Option<Count<1, 64>>,
    half_open_max_duration: Option<Dur<1_000, 3_600_000>>,
}

/// A policy-table error: the key it is about, and the sentence.
type KeyError = (&'static str, String);

/// Byte offset of `key = …` inside `range` of `text` (a table's body), if it is there.
fn key_offset(text: &str, range: std::ops::Range<usize>, key: &str) -> Option<usize> {
    let body = text.get(range.clone())?;
    let mut from = 0;
    while let Some(found) = body[from..].find(key) {
        let at = from + found;
        let before = body[..at].chars().next_back();
        let after = body[at + key.len()..].trim_start();
        let starts_word = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if starts_word && after.starts_with('=') {
            return Some(range.start + at);
        }
        from = at + key.len();
    }
    None
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl PolicyKeys {
    /// `base` with this table's keys applied. An error names the key it is about.
    fn apply(&self, base: &Policy) -> Result<Policy, KeyError> {
        let mut p = *base;
        let b = &mut p.breaker;
        if let Some(Dur(v)) = self.connect_timeout {
            p.connect_timeout = v;
        }
        if let Some(v) = self.mode {
            b.mode = v;
        }
        if let Some(kinds) = &self.failures {
            if kinds.is_empty() {
                return Err((
                    "failures",
                    "failures: expected at least one of \"refused\", \"timeout\", \"unreachable\", \"reset\"".into(),
                ));
            }
            b.failures = FailureSet::of(kinds);
        }
        if let Some(Ranged(v, _)) = self.failure_rate_threshold {
            b.failure_rate_threshold = v;
        }
        if let Some(Count(v)) = self.minimum_calls {
            b.minimum_calls = v;
        }
        if let Some(Count(v)) = self.consecutive_failures {
            b.consecutive_failures = v;
        }
        if let Some(Dur(v)) = self.slow_call_duration {
            b.slow_call_ns = ns(v);
        }
        if let Some(Ranged(v, _)) = self.slow_call_rate_threshold {
            b.slow_call_rate_threshold = v;
        }
        b.window = self.window(b.window)?;
        if let Some(Dur(v)) = self.open_wait {
            b.backoff.base_ns = ns(v);
        }
        if let Some(Dur(v)) = self.open_wait_max {
            b.backoff.max_ns = ns(v);
        }
        if let Some(Ranged(v, _)) = self.open_wait_multiplier {
            b.backoff.multiplier = v;
        }
        if let Some(Ranged(v, _)) = self.open_wait_jitter {
            b.backoff.jitter = v;
        }
        if let Some(Dur(v)) = self.backoff_decay {
            b.backoff.decay_ns = ns(v);
        }
        if let Some(Count(v)) = self.half_open_probes {
            b.half_open_probes = v;
        }
        if let Some(Dur(v)) = self.half_open_max_duration {
            b.half_open_max_ns = ns(v);
        }
        if let WindowPolicy::Count { calls } = b.window {
            if b.minimum_calls > calls {
                let key = if self.minimum_calls.is_some() {
                    "minimum_calls"
                } else {
                    "window_calls"
                };
                return Err((
                    key,
                    format!(
                        "minimum_calls ({}) is more than window_calls ({calls}): the rate rules could never fire",
                        b.minimum_calls
                    ),
                ));
            }
        }
        if b.backoff.base_ns > b.backoff.max_ns {
            let key = if self.open_wait.is_some() {
                "open_wait"
            } else {
                "open_wait_max"
            };
            return Err((
                key,
                format!(
                    "open_wait ({}) is longer than open_wait_max ({})",
                    humantime::format_duration(Duration::from_nanos(b.backoff.base_ns)),
                    humantime::format_duration(Duration::from_nanos(b.backoff.max_ns)),
                ),
            ));
        }
        Ok(p)
    }

    /// The window after this table's keys; keys of the other window kind are errors.
    fn window(&self, inherited: WindowPolicy) -> Result<WindowPolicy, KeyError> {
        let kind = match (self.sliding_window, inherited) {
            (Some(kind), _) => kind,
            (None, WindowPolicy::Time { .. }) => WindowKind::Time,
            (None, WindowPolicy::Count { .. }) => WindowKind::Count,
        };
        match kind {
            WindowKind::Time => {
                if self.window_calls.is_some() {
                    return Err((
                        "window_calls",
                        "window_calls applies to sliding_window = \"count\", not \"time\"".into(),
                    ));
                }
                let (mut duration_ns, mut buckets) = match inherited {
                    WindowPolicy::Time {
                        duration_ns,
                        buckets,
                    } => (duration_ns, buckets),
                    WindowPolicy::Count { .. } => (10 * 1_000_000_000, 10),
                };
                if let Some(Dur(d)) = self.window_duration {
                    duration_ns = ns(d);
                }
                if let Some(Count(n)) = self.window_buckets {
                    buckets = n;
                }
                if duration_ns / (buckets as u64) < 1_000_000 {
                    return Err((
                        "window_buckets",
                        format!(
                            "window_duration split into {buckets} window_buckets gives buckets under 1ms"
                        ),
                    ));
                }
                Ok(WindowPolicy::Time {
                    duration_ns,
                    buckets,
                })
            }
            WindowKind::Count => {
                if self.window_duration.is_some() || self.window_buckets.is_some() {
                    let key = if self.window_duration.is_some() {
                        "window_duration"
                    } else {
                        "window_buckets"
                    };
                    return Err((
                        key,
                        "window_duration and window_buckets apply to sliding_window = \"time\", not \"count\"".into(),
                    ));
                }
                let calls = match (self.window_calls, inherited) {
                    (Some(Count(n)), _) => n,
                    (None, WindowPolicy::Count { calls }) => calls,
                    (None, WindowPolicy::Time { .. }) => 100,
                };
                Ok(WindowPolicy::Count { calls })
            }
        }
    }
}

// ---- Reading and checking ---------------------------------------------------------------------

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The key whose value starts at `offset` (`key = value`, also inside `{ … }`), if any.
fn key_before(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let before = &text[line_start..offset.min(text.len())];
    let eq = before.rfind('=')?;
    let key: String = before[..eq]
        .trim_end()
        .chars()
        .rev()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-' || *c == '.')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    (!key.is_empty()).then_some(key)
}

impl Config {
    /// Parses and validates configuration text; `source` names it in errors.
    pub fn parse(text: &str, source: Source) -> Result<Config> {
        let file: File = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let key = e.span().and_then(|s| key_before(text, s.start));
            let message = e.message().trim_end_matches('\n').replace('\n', " ");
            let at = match (line, key) {
                (Some(line), Some(key)) => format!(" line {line}: {key}:"),
                (Some(line), None) => format!(" line {line}:"),
                _ => ":".to_string(),
            };
            usage(format!("invalid configuration in {source}{at} {message}"))
        })?;
        let fail = |offset: usize, message: String| {
            usage(format!(
                "invalid configuration in {source} line {}: {message}",
                line_of(text, offset)
            ))
        };

        let (default_keys, defaults_span) = match &file.defaults {
            Some(keys) => (keys.get_ref().clone(), keys.span()),
            None => (PolicyKeys::default(), 0..0),
        };
        let defaults = default_keys.apply(&Policy::default()).map_err(|(key, m)| {
            let at = key_offset(text, defaults_span.clone(), key).unwrap_or(defaults_span.start);
            fail(at, format!("[defaults]: {m}"))
        })?;
        let mut dependencies: Vec<Dependency> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        // Every pattern with the dependency and line it came from, for the overlap check.
        let mut patterns: Vec<(EndpointPattern, usize, usize)> = Vec::new();
        for keys in &file.dependencies {
            let name = keys.name.get_ref().trim().to_string();
            let at = keys.name.span().start;
            if name.is_empty() {
                return Err(fail(
                    at,
                    "dependency name: expected a non-empty name".into(),
                ));
            }
            if let Some(first) = seen.insert(name.clone(), line_of(text, at)) {
                return Err(fail(
                    at,
                    format!("dependency {name}: the name is already used on line {first}"),
                ));
            }
            if keys.endpoints.is_empty() {
                return Err(fail(
                    at,
                    format!("dependency {name}: endpoints: expected at least one endpoint"),
                ));
            }
            let policy = keys.policy.get_ref().apply(&defaults).map_err(|(key, m)| {
                let at = key_offset(text, keys.policy.span(), key).unwrap_or(at);
                fail(at, format!("dependency {name}: {m}"))
            })?;
            for pattern in &keys.endpoints {
                patterns.push((*pattern.get_ref(), dependencies.len(), pattern.span().start));
            }
            dependencies.push(Dependency {
                name,
                endpoints: keys.endpoints.iter().map(|p| *p.get_ref()).collect(),
                policy,
            });
        }
        // Two dependencies claiming the very same endpoints with different settings: no
        // "most specific" rule can choose, so refuse.
        for (i, (a, dep_a, _)) in patterns.iter().enumerate() {
            for (b, dep_b, at_b) in &patterns[i + 1..] {
                if a.same_scope(b)
                    && dep_a != dep_b
                    && dependencies[*dep_a].policy != dependencies[*dep_b].policy
                {
                    return Err(fail(
                        *at_b,
                        format!(
                            "dependencies {} and {} both claim {a} with different settings; merge them or make one more specific",
                            dependencies[*dep_a].name, dependencies[*dep_b].name
                        ),
                    ));
                }
            }
        }
        let tick = file
            .daemon
            .tick
            .map_or(Duration::from_millis(100), |Dur(d)| d);
        let fail_open_after = file
            .daemon
            .fail_open_after
            .map_or(Duration::from_secs(3), |Dur(d)| d);
        if fail_open_after < 2 * tick {
            return Err(usage(format!(
                "invalid configuration in {source}: [daemon]: fail_open_after ({}) must be at least twice tick ({}), or every verdict lapses between refreshes",
                humantime::format_duration(fail_open_after),
                humantime::format_duration(tick)
            )));
        }
        let mut services: Vec<ServiceRule> = Vec::new();
        for keys in &file.services {
            let at = keys.span().start;
            let keys = keys.get_ref();
            let rule = ServiceRule {
                name: keys.name.clone(),
                port: keys.port.0 as u16,
                address: keys.address.map(|a| a.0),
                shed_when_unhealthy: keys.shed_when_unhealthy,
                max_connections: keys.max_connections.map(|c| c.0 as u64),
            };
            if !rule.shed_when_unhealthy && rule.max_connections.is_none() {
                return Err(fail(
                    at,
                    format!("[[service]] {}: expected shed_when_unhealthy = true or max_connections, or the entry does nothing", rule.label()),
                ));
            }
            if let Some(other) = services
                .iter()
                .find(|o| o.port == rule.port && o.address == rule.address)
            {
                return Err(fail(
                    at,
                    format!(
                        "[[service]] {}: the same service as {} above",
                        rule.label(),
                        other.label()
                    ),
                ));
            }
            services.push(rule);
        }
        Ok(Config {
            tick,
            fail_open_after,
            dns_timeout: file
                .daemon
                .dns_timeout
                .map_or(Duration::from_secs(2), |Dur(d)| d),
            metrics_max_endpoints: file
                .metrics
                .max_endpoints
                .map_or(500, |Count(n)| n as usize),
            services,
            policies: Policies {
                defaults,
                dependencies,
            },
            source,
        })
    }

    /// Reads the file at `path`, or the default location, or the embedded defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let path = match path {
            Some(path) => path,
            None if Path::new(DEFAULT_PATH).exists() => Path::new(DEFAULT_PATH),
            None => return Config::parse(EMBEDDED, Source::Embedded),
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            usage(format!(
                "cannot read configuration file {}: {e}",
                path.display()
            ))
        })?;
        Config::parse(&text, Source::File(path.to_path_buf()))
    }

    /// Reads the same source again (for SIGHUP).
    pub fn reload(&self) -> Result<Config> {
        match &self.source {
            Source::Embedded => Config::load(None),
            Source::File(path) => Config::load(Some(path)),
        }
    }
}

#[cfg(test)]
mod tests;
