//! Per-key limits on generations: how many one API key may have running at once
//! (a semaphore per key) and how many it may start per minute (governor's keyed
//! GCRA limiter, which spaces them evenly and allows a burst of the whole minute's
//! allowance). Calls without a key (no `--api-key-file`) are not limited here; the
//! scheduler's `--max-waiting` bounds everyone.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ClientAuth;
use crate::error::{Error, Result};
use crate::keys::KeyId;

/// The per-key limits of a gateway.
pub struct KeyLimits {
    concurrent: usize,
    slots: Mutex<HashMap<KeyId, Arc<Semaphore>>>,
    rate: Option<DefaultKeyedRateLimiter<KeyId>>,
}

impl std::fmt::Debug for KeyLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimits")
            .field("concurrent", &self.concurrent)
            .field("per_minute", &self.rate.is_some())
            .finish_non_exhaustive()
    }
}

/// A generation admitted under its key's limits: holds its key's slot until dropped.
#[derive(Debug, Default)]
pub struct Admitted {
    _slot: Option<OwnedSemaphorePermit>,
}

impl KeyLimits {
    /// The limits `auth` sets (0: none).
    pub fn new(auth: &ClientAuth) -> Self {
        Self {
            concurrent: auth.max_concurrent_per_key,
            slots: Mutex::new(HashMap::new()),
            rate: NonZeroU32::new(auth.requests_per_minute_per_key)
                .map(|n| RateLimiter::keyed(Quota::per_minute(n))),
        }
    }

    /// Admits one generation of `key` (always, without a key), or says which limit
    /// it is over.
    pub fn admit(&self, key: Option<&KeyId>) -> Result<Admitted> {
        let Some(key) = key else {
            return Ok(Admitted::default());
        };
        let slot = if self.concurrent > 0 {
            let semaphore = Arc::clone(
                self.slots
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(*key)
                    .or_insert_with(|| Arc::new(Semaphore::new(self.concurrent))),
            );
            let permit = semaphore.try_acquire_owned().map_err(|_| {
                Error::OverKeyLimit(format!(
                    "this API key already has {} generations running \
                     (--max-concurrent-per-key); retry when one ends",
                    self.concurrent
                ))
            })?;
            Some(permit)
        } else {
            None
        };
        if let Some(rate) = &self.rate
            && let Err(not_until) = rate.check_key(key)
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(Error::OverKeyLimit(format!(
                "this API key is over its requests per minute \
                 (--requests-per-minute-per-key); retry in {:.1} s",
                wait.as_secs_f64()
            )));
        }
        Ok(Admitted { _slot: slot })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(concurrent: usize, per_minute: u32) -> KeyLimits {
        KeyLimits::new(&ClientAuth {
            max_concurrent_per_key: concurrent,
            requests_per_minute_per_key: per_minute,
            ..ClientAuth::default()
        })
    }

    #[test]
    fn a_key_holds_at_most_its_slots_and_others_are_apart() {
        let l = limits(2, 0);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let first = l.admit(Some(&a)).unwrap();
        let second = l.admit(Some(&a)).unwrap();
        let err = l.admit(Some(&a)).unwrap_err().to_string();
        assert!(err.contains("--max-concurrent-per-key"), "{err}");
        let _other = l.admit(Some(&b)).unwrap();
        drop(first);
        let _again = l.admit(Some(&a)).unwrap();
        drop(second);
        // Calls without a key are not counted.
        for _ in 0..10 {
            l.admit(None).unwrap();
        }
    }

    #[test]
    fn a_key_starts_at_most_its_rate() {
        let l = limits(0, 3);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        for _ in 0..3 {
            drop(l.admit(Some(&a)).unwrap());
        }
        let err = l.admit(Some(&a)).unwrap_err().to_string();
        assert!(err.contains("retry in"), "{err}");
        drop(l.admit(Some(&b)).unwrap());
    }
}
