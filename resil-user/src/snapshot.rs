//! Breaker state the kernel does not hold, saved where it does: the pinned `BREAKERS` map. A
//! restarted daemon reads it back, so open, half-open, forced-open and disabled circuits stay
//! so. Every circuit is saved when its state changes, so a crash loses nothing either.

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use log::warn;
use resil_common::maps::{names, EndpointKey, SavedBreaker, SAVED_BREAKER_BYTES};

use crate::{breaker::SavedState, circuits::Circuits, probes::Probes};

/// The saved breakers, in the kernel.
pub struct BreakerStore {
    map: HashMap<MapData, EndpointKey, SavedBreaker>,
    /// A failed save was already logged.
    warned: bool,
}

/// Encodes a saved state into the map's fixed record; `None` if it does not fit.
pub fn encode(saved: &SavedState) -> Option<SavedBreaker> {
    let mut json = serde_json::to_vec(saved).ok()?;
    if json.len() > SAVED_BREAKER_BYTES {
        // The reason's figures are the only variable part: keep the state without them.
        let bare = SavedState {
            reason: None,
            ..saved.clone()
        };
        json = serde_json::to_vec(&bare).ok()?;
    }
    let mut record = SavedBreaker {
        len: json.len() as u32,
        bytes: [0; SAVED_BREAKER_BYTES],
    };
    record.bytes.get_mut(..json.len())?.copy_from_slice(&json);
    Some(record)
}

/// Decodes a record; `None` if it is not one this version can read.
pub fn decode(record: &SavedBreaker) -> Option<SavedState> {
    let bytes = record.bytes.get(..record.len as usize)?;
    serde_json::from_slice(bytes).ok()
}

impl BreakerStore {
    /// Takes the map from the loaded programs.
    pub fn new(probes: &mut Probes) -> Result<BreakerStore> {
        Ok(BreakerStore {
            map: HashMap::try_from(probes.take_map(names::BREAKERS)?)
                .context("the saved-breaker map has an unexpected type")?,
            warned: false,
        })
    }

    /// What a previous run saved. Records this version cannot read are dropped.
    pub fn load(&mut self) -> Vec<(EndpointKey, SavedState)> {
        let mut restored = Vec::new();
        let mut unreadable = Vec::new();
        for (key, record) in self.map.iter().flatten() {
            match decode(&record) {
                Some(saved) => restored.push((key, saved)),
                None => unreadable.push(key),
            }
        }
        if !unreadable.is_empty() {
            warn!(
                "{} saved circuits could not be read and start closed",
                unreadable.len()
            );
            for key in unreadable {
                let _ = self.map.remove(&key);
            }
        }
        restored
    }

    /// Saves the circuits of `keys` as they are now (a closed one is removed).
    pub fn save(&mut self, circuits: &Circuits, keys: &[EndpointKey]) {
        for key in keys {
            let saved = circuits.get(key).and_then(|c| c.breaker.save());
            let result = match saved.as_ref().and_then(encode) {
                Some(record) => self.map.insert(key, record, 0),
                None => match self.map.remove(key) {
                    Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                    other => other,
                },
            };
            if let Err(e) = result {
                if !self.warned {
                    warn!("cannot save a circuit's state in the kernel (a restart would forget it): {e}");
                    self.warned = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{Reason, State};

    #[test]
    fn a_saved_state_reads_back_as_it_was() {
        let saved = SavedState {
            state: State::Open,
            entered_ns: 5_000_000_000,
            open_until_ns: 10_000_000_000,
            backoff_level: 3,
            generation: 7,
            reason: Some(Reason::ConsecutiveFailures { failures: 5 }),
        };
        let record = encode(&saved).unwrap();
        assert!(record.len as usize <= SAVED_BREAKER_BYTES);
        assert_eq!(decode(&record), Some(saved));
    }

    #[test]
    fn records_that_are_not_ours_read_as_nothing() {
        let mut record = SavedBreaker {
            len: 4,
            bytes: [0; SAVED_BREAKER_BYTES],
        };
        record.bytes[..4].copy_from_slice(b"junk");
        assert_eq!(decode(&record), None);
        record.len = u32::MAX;
        assert_eq!(decode(&record), None);
    }
}
