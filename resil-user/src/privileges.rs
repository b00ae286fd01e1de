//! The capabilities the daemon needs, checked before anything is touched so that a missing one
//! is named instead of surfacing as a verifier or netlink error.

use anyhow::{bail, Result};

/// A Linux capability the daemon uses, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Its name, as in capabilities(7).
    pub name: &'static str,
    /// Its bit.
    pub bit: u32,
    /// What the daemon needs it for.
    pub used_for: &'static str,
}

/// Every capability the daemon needs (kernels ≥ 5.8, where CAP_BPF exists).
pub const REQUIRED: [Capability; 3] = [
    Capability {
        name: "CAP_BPF",
        bit: 39,
        used_for: "load programs, create and pin maps",
    },
    Capability {
        name: "CAP_NET_ADMIN",
        bit: 12,
        used_for: "load and attach networking programs (XDP, TC, cgroup connect hooks)",
    },
    Capability {
        name: "CAP_PERFMON",
        bit: 38,
        used_for: "the verifier's pointer arithmetic on packets and maps",
    },
];

/// The effective capability set of this process, from a `/proc/self/status` text.
pub fn effective(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The required capabilities missing from an effective set.
pub fn missing(effective: u64) -> Vec<Capability> {
    REQUIRED
        .into_iter()
        .filter(|c| effective & (1u64 << c.bit) == 0)
        .collect()
}

/// Fails with one sentence naming what is missing, if anything is.
pub fn check() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(effective) = effective(&status) else {
        // No procfs: the kernel will say what it refuses.
        return Ok(());
    };
    let lacking = missing(effective);
    if !lacking.is_empty() {
        let names: Vec<&str> = lacking.iter().map(|c| c.name).collect();
        bail!(
            "resil daemon lacks {}: it needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (run it as root, or grant them, e.g. AmbientCapabilities= in systemd)",
            names.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_set_is_read_from_proc_status() {
        let status = "Name:\tresil\nCapInh:\t0000000000000000\nCapEff:\t000001c000001000\n";
        let eff = effective(status).unwrap();
        assert!(
            missing(eff).is_empty(),
            "BPF, PERFMON, NET_ADMIN and one more set"
        );
        assert_eq!(effective("Name:\tx\n"), None);
    }

    #[test]
    fn missing_capabilities_are_named() {
        let only_net_admin = 1 << 12;
        let names: Vec<&str> = missing(only_net_admin).iter().map(|c| c.name).collect();
        assert_eq!(names, ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing(0).len(), 3);
        assert!(missing(u64::MAX).is_empty());
    }
}
