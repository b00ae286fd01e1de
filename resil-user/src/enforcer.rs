//! Writes the breakers' decisions into the kernel: one verdict per endpoint that must not get
//! new connections freely, refreshed every tick with an expiry (fail open), and half-open probe
//! tokens the kernel takes atomically.

use std::collections::HashMap as StdHashMap;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use resil_common::maps::{names, EndpointKey, TokenKey, Verdict, VerdictAction, MAX_PROBES};

use crate::probes::Probes;

/// What an endpoint's circuit (or a shed local service) asks of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desired {
    /// Refuse every new connection.
    Refuse,
    /// Admit `probes` connections, the holders of this generation's tokens.
    Probe { generation: u32, probes: u32 },
    /// Admit everything, counting what would have been refused.
    Observe,
}

impl Desired {
    /// What a verdict in the kernel asks for.
    fn of(verdict: &Verdict) -> Desired {
        match verdict.action {
            a if a == VerdictAction::Refuse as u32 => Desired::Refuse,
            a if a == VerdictAction::Probe as u32 => Desired::Probe {
                generation: verdict.generation,
                probes: verdict.probes,
            },
            _ => Desired::Observe,
        }
    }

    fn action(self) -> VerdictAction {
        match self {
            Desired::Refuse => VerdictAction::Refuse,
            Desired::Probe { .. } => VerdictAction::Probe,
            Desired::Observe => VerdictAction::Observe,
        }
    }
}

/// The verdict and token maps, and what was last written to them.
pub struct Enforcer {
    verdicts: HashMap<MapData, EndpointKey, Verdict>,
    tokens: HashMap<MapData, TokenKey, u8>,
    written: StdHashMap<EndpointKey, Desired>,
    /// How long a verdict outlives the daemon's last refresh.
    fail_open_ns: u64,
}

/// `BPF_NOEXIST`: insert only if absent.
const BPF_NOEXIST: u64 = 1;

fn token(endpoint: EndpointKey, generation: u32, index: u32) -> TokenKey {
    TokenKey {
        endpoint,
        generation,
        index,
    }
}

impl Enforcer {
    /// Takes the verdict and token maps from the loaded programs. Verdicts a previous run
    /// left (pinned maps) count as written: the first sync keeps what is still wanted and
    /// removes the rest with their tokens.
    pub fn new(probes: &mut Probes, fail_open_ns: u64) -> Result<Enforcer> {
        let verdicts: HashMap<MapData, EndpointKey, Verdict> =
            HashMap::try_from(probes.take_map(names::VERDICTS)?)
                .context("the verdict map has an unexpected type")?;
        let written = verdicts
            .iter()
            .flatten()
            .map(|(endpoint, verdict)| (endpoint, Desired::of(&verdict)))
            .collect();
        Ok(Enforcer {
            verdicts,
            tokens: HashMap::try_from(probes.take_map(names::TOKENS)?)
                .context("the token map has an unexpected type")?,
            written,
            fail_open_ns,
        })
    }

    /// Changes how long verdicts outlive a refresh (configuration reload).
    pub fn set_fail_open_ns(&mut self, fail_open_ns: u64) {
        self.fail_open_ns = fail_open_ns;
    }

    /// Endpoints with a verdict in the kernel.
    pub fn enforced(&self) -> usize {
        self.written.len()
    }

    /// Makes the kernel's verdicts exactly `desired`, each valid until `now_ns` plus the
    /// fail-open time. Errors are logged per endpoint and retried on the next call.
    pub fn sync(&mut self, now_ns: u64, desired: &[(EndpointKey, Desired)]) {
        let expires_ns = now_ns.saturating_add(self.fail_open_ns);
        let mut keep = StdHashMap::with_capacity(desired.len());
        for &(endpoint, want) in desired {
            let before = self.written.get(&endpoint).copied();
            if let Desired::Probe { generation, probes } = want {
                // Tokens must exist before the verdict that asks for them.
                let first_new = match before {
                    // The same half-open period: hand out only the extra tokens.
                    Some(Desired::Probe {
                        generation: g,
                        probes: p,
                    }) if g == generation => p,
                    // A new one: the previous period's leftovers go.
                    Some(Desired::Probe {
                        generation: g,
                        probes: p,
                    }) => {
                        self.remove_tokens(endpoint, g, p);
                        0
                    }
                    _ => 0,
                };
                for index in first_new..probes.min(MAX_PROBES) {
                    // Never re-create a token the kernel already took (BPF_NOEXIST).
                    let key = token(endpoint, generation, index);
                    if let Err(e) = self.tokens.insert(key, 1, BPF_NOEXIST) {
                        log::debug!("probe token {index} not handed out: {e}");
                    }
                }
            } else if let Some(Desired::Probe { generation, probes }) = before {
                self.remove_tokens(endpoint, generation, probes);
            }
            let (generation, probes) = match want {
                Desired::Probe { generation, probes } => (generation, probes.min(MAX_PROBES)),
                _ => (0, 0),
            };
            let verdict = Verdict {
                expires_ns,
                action: want.action() as u32,
                generation,
                probes,
                _pad: 0,
            };
            match self.verdicts.insert(endpoint, verdict, 0) {
                Ok(()) => {
                    keep.insert(endpoint, want);
                }
                Err(e) => {
                    log::warn!("cannot write a verdict into the kernel: {e}");
                    // What the kernel holds is unchanged: remember it as it is, so it is
                    // neither removed below nor handed its tokens again.
                    if let Some(before) = before {
                        keep.insert(endpoint, before);
                    }
                }
            }
        }
        for (endpoint, before) in std::mem::take(&mut self.written) {
            if keep.contains_key(&endpoint) {
                continue;
            }
            let _ = self.verdicts.remove(&endpoint);
            if let Desired::Probe { generation, probes } = before {
                self.remove_tokens(endpoint, generation, probes);
            }
        }
        self.written = keep;
    }

    fn remove_tokens(&mut self, endpoint: EndpointKey, generation: u32, probes: u32) {
        for index in 0..probes.min(MAX_PROBES) {
            // Taken tokens are already gone; that is the point of them.
            let _ = self.tokens.remove(&token(endpoint, generation, index));
        }
    }
}
