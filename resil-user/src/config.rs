//! The configuration file (TOML): daemon settings and the default policy.
//!
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::{path::Path, time::Duration};

use anyhow::Result;
use serde::Deserialize;

use crate::error::usage;

/// The configuration compiled into the binary, used when no file is given or present.
pub const EMBEDDED: &str = include_str!("default.toml");

/// Where the daemon looks for a configuration file when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/resil/resil.toml";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Settings of the daemon itself.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// The policy that applies to every endpoint.
    #[serde(default)]
    pub defaults: Policy,
}

/// `[daemon]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// How often the kernel's counters are read.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(100),
        }
    }
}

/// Per-endpoint policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// A handshake unanswered for this long counts as a timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config> {
        let config: Config = toml::from_str(text)
            .map_err(|e| usage(format!("invalid configuration in {origin}: {e}")))?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Reads the file at `path`, or the default location, or the embedded defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let path = match path {
            Some(path) => path,
            None if Path::new(DEFAULT_PATH).exists() => Path::new(DEFAULT_PATH),
            None => return Config::parse(EMBEDDED, "the embedded defaults"),
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            usage(format!(
                "cannot read configuration file {}: {e}",
                path.display()
            ))
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let tick = self.daemon.tick;
        if tick < Duration::from_millis(10) || tick > Duration::from_secs(10) {
            return Err(usage(format!(
                "invalid configuration in {origin}: daemon.tick is {tick:?}, expected 10ms to 10s"
            )));
        }
        let timeout = self.defaults.connect_timeout;
        if timeout < Duration::from_millis(10) || timeout > Duration::from_secs(600) {
            return Err(usage(format!(
                "invalid configuration in {origin}: defaults.connect_timeout is {timeout:?}, expected 10ms to 10min"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code;

    #[test]
    fn embedded_defaults_parse_to_the_documented_values() {
        let config = Config::parse(EMBEDDED, "embedded").unwrap();
        assert_eq!(config.daemon.tick, Duration::from_millis(100));
        assert_eq!(config.defaults.connect_timeout, Duration::from_secs(1));
        assert_eq!(Config::parse("", "empty").unwrap(), config);
    }

    #[test]
    fn errors_name_origin_line_and_field() {
        let e = Config::parse("[daemon]\ntick = \"100ms\"\ntickk = 3\n", "x.toml").unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("x.toml") && text.contains("tickk") && text.contains("line 3"),
            "{text}"
        );
        assert_eq!(exit_code(&e), 2);

        let e = Config::parse("[defaults]\nconnect_timeout = \"soon\"\n", "y.toml").unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("y.toml") && text.contains("connect_timeout"),
            "{text}"
        );

        let e = Config::parse("[daemon]\ntick = \"1ms\"\n", "z.toml").unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("daemon.tick") && text.contains("expected"),
            "{text}"
        );
        assert_eq!(exit_code(&e), 2);
    }

    #[test]
    fn a_missing_file_is_a_usage_error() {
        let e = Config::load(Some(Path::new("/nonexistent/resil.toml"))).unwrap_err();
        assert_eq!(exit_code(&e), 2);
        assert!(format!("{e:#}").contains("/nonexistent/resil.toml"));
    }
}
