//! A bounded cache of verified JWTs, so that a client sending the same token many times
//! pays for one RSA verification, not one per request.
//!
//! The key is the SHA-256 of the whole token string: a forged token must not be able to
//! collide with a cached one, so never a short or non-cryptographic hash. Only tokens
//! that verified are ever inserted; a hit re-checks `exp` and `nbf` against the caller's
//! clock, so a cached token expires exactly when an uncached one would. Dropping entries is
//! always safe (the token is just verified again), so a full cache forgets rather than
//! grows. It never holds the token itself, and no lock is held across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

// A poisoned shard is still a valid cache: every entry in it was verified.
use crate::lock::lock;

/// What a verified token yields, as the verifier needs it on a hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached {
    pub product: Arc<str>,
    pub user: Arc<str>,
    /// `exp`, seconds since the epoch (may be fractional).
    pub exp: f64,
    /// `nbf` when the token has one.
    pub nbf: Option<f64>,
}

/// The default hard cap: about 100 bytes per entry, so ~10 MB at most.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

const SHARDS: usize = 16;

type Key = [u8; 32];

/// The verified-token cache.
pub struct TokenCache {
    shards: Box<[Mutex<HashMap<Key, Cached>>]>,
    /// Per shard, so that no global counter is contended on the hot path.
    shard_cap: usize,
}

impl TokenCache {
    /// A cache of at most about `max_entries` tokens (rounded up to a multiple of the
    /// shard count); 0 disables caching.
    pub fn new(max_entries: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shard_cap: max_entries.div_ceil(SHARDS),
        }
    }

    /// The cached verification of `token`, if any and still valid at `now` (seconds since
    /// the epoch) with `leeway` seconds: `exp` not passed, `nbf` reached. An expired entry
    /// is dropped; the caller then verifies the token in full (and gets the precise error).
    pub fn get(&self, token: &str, now: f64, leeway: f64) -> Option<Cached> {
        let key = key(token);
        let mut shard = self.shard(&key);
        let cached = shard.get(&key)?;
        if now > cached.exp + leeway {
            shard.remove(&key);
            return None;
        }
        if cached.nbf.is_some_and(|nbf| nbf > now + leeway) {
            return None;
        }
        Some(cached.clone())
    }

    /// Remembers a token that has just verified. `now` is used to make room: when the
    /// shard is full, expired entries go first, then an arbitrary one.
    pub fn insert(&self, token: &str, cached: Cached, now: f64) {
        if self.shard_cap == 0 {
            return;
        }
        let key = key(token);
        let mut shard = self.shard(&key);
        if shard.len() >= self.shard_cap && !shard.contains_key(&key) {
            shard.retain(|_, entry| entry.exp >= now);
            if shard.len() >= self.shard_cap {
                // All still valid: forget one (hash order, so effectively random) rather
                // than grow; that token is verified again on its next use.
                if let Some(victim) = shard.keys().next().copied() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(key, cached);
    }

    /// Entries held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, HashMap<Key, Cached>> {
        lock(&self.shards[usize::from(key[0]) % SHARDS])
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ENTRIES)
    }
}

fn key(token: &str) -> Key {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(exp: f64, nbf: Option<f64>) -> Cached {
        Cached {
            product: Arc::from("demo"),
            user: Arc::from("alice"),
            exp,
            nbf,
        }
    }

    #[test]
    fn a_verified_token_is_found_until_it_expires() {
        let cache = TokenCache::new(100);
        cache.insert("a.b.c", entry(1000.0, None), 900.0);
        assert_eq!(cache.get("a.b.c", 900.0, 30.0), Some(entry(1000.0, None)));
        assert_eq!(
            cache.get("a.b.c", 1030.0, 30.0),
            Some(entry(1000.0, None)),
            "within leeway"
        );
        assert_eq!(cache.get("a.b.c", 1030.5, 30.0), None, "past exp + leeway");
        assert!(cache.is_empty(), "the expired entry left");
    }

    #[test]
    fn fractional_exp_is_compared_exactly() {
        let cache = TokenCache::new(100);
        cache.insert("t", entry(1000.5, None), 900.0);
        assert!(cache.get("t", 1000.5, 0.0).is_some());
        assert!(cache.get("t", 1000.75, 0.0).is_none());
    }

    #[test]
    fn a_token_before_its_nbf_is_not_served_but_kept() {
        let cache = TokenCache::new(100);
        cache.insert("t", entry(2000.0, Some(1000.0)), 900.0);
        assert_eq!(cache.get("t", 900.0, 30.0), None);
        assert!(cache.get("t", 970.0, 30.0).is_some(), "nbf - leeway reached");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_different_token_misses_even_when_it_differs_in_one_byte() {
        let cache = TokenCache::new(100);
        cache.insert("header.payload.signature", entry(2000.0, None), 900.0);
        assert!(cache.get("header.payload.signaturf", 900.0, 0.0).is_none());
        assert!(cache.get("header.payload.signatur", 900.0, 0.0).is_none());
    }

    #[test]
    fn the_cache_never_holds_more_than_its_cap() {
        let cache = TokenCache::new(64);
        for i in 0..10_000 {
            cache.insert(&format!("token-{i}"), entry(2000.0, None), 900.0);
        }
        assert!(cache.len() <= 64, "{}", cache.len());
        // The newest token is always kept.
        assert!(cache.get("token-9999", 900.0, 0.0).is_some());
    }

    #[test]
    fn a_full_shard_drops_expired_entries_first() {
        let cache = TokenCache::new(SHARDS * 2);
        for i in 0..200 {
            cache.insert(&format!("old-{i}"), entry(1000.0, None), 900.0);
        }
        let full = cache.len();
        assert_eq!(full, SHARDS * 2, "200 tokens fill every shard");
        cache.insert("new", entry(5000.0, None), 2000.0);
        assert!(cache.get("new", 2000.0, 0.0).is_some());
        // Its shard dropped both expired entries, not just one.
        assert_eq!(cache.len(), full - 1);
    }

    #[test]
    fn a_zero_cap_caches_nothing() {
        let cache = TokenCache::new(0);
        cache.insert("t", entry(2000.0, None), 900.0);
        assert!(cache.get("t", 900.0, 0.0).is_none());
    }
}
