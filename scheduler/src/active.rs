//! The requests queued or running, by id: `Cancel` finds them here, a second
//! request with the same id is refused, and shutdown cancels what is left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct Inner {
    /// Request id → (serial of the entry, its token).
    requests: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_serial: AtomicU64,
}

/// Every queued or running request, by id.
#[derive(Debug, Clone, Default)]
pub struct ActiveRequests {
    inner: Arc<Inner>,
}

/// A request's place in [`ActiveRequests`]; dropping it removes the request.
#[derive(Debug)]
pub struct ActiveEntry {
    requests: ActiveRequests,
    id: String,
    serial: u64,
    cancel: CancellationToken,
}

impl ActiveRequests {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (u64, CancellationToken)>> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds request `id`; an id already queued or running is refused.
    pub fn insert(&self, id: &str) -> Result<ActiveEntry> {
        let mut map = self.lock();
        if map.contains_key(id) {
            return Err(Error::DuplicateRequest(id.to_string()));
        }
        let serial = self.inner.next_serial.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        map.insert(id.to_string(), (serial, cancel.clone()));
        Ok(ActiveEntry {
            requests: self.clone(),
            id: id.to_string(),
            serial,
            cancel,
        })
    }

    /// Cancels request `id`; whether it was queued or running.
    pub fn cancel(&self, id: &str) -> bool {
        match self.lock().get(id) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels every queued or running request (shutdown after the grace period).
    pub fn cancel_all(&self) {
        for (_, token) in self.lock().values() {
            token.cancel();
        }
    }

    /// How many requests are queued or running.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no request is queued or running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ActiveEntry {
    /// The request's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Cancelled by `Cancel`, by the client going away, or by shutdown.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }
}

impl Drop for ActiveEntry {
    fn drop(&mut self) {
        let mut map = self.requests.lock();
        if map
            .get(&self.id)
            .is_some_and(|(serial, _)| *serial == self.serial)
        {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_while_active_and_free_after() {
        let active = ActiveRequests::default();
        let a = active.insert("a").unwrap();
        assert!(matches!(active.insert("a"), Err(Error::DuplicateRequest(id)) if id == "a"));
        assert!(!active.cancel("b"));
        assert!(active.cancel("a"));
        assert!(a.cancel_token().is_cancelled());
        drop(a);
        assert!(active.is_empty());
        let again = active.insert("a").unwrap();
        assert!(!again.cancel_token().is_cancelled());
        active.cancel_all();
        assert!(again.cancel_token().is_cancelled());
    }
}
