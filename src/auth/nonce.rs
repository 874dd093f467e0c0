//! Replay protection: remembers each client's nonces until their timestamp leaves the
//! window. Redis when configured and reachable, else a bounded memory store.
//!
//! The memory store owns at most `HMAC_NONCE_CAPACITY` entries in total. It must never
//! accept a nonce it could not remember: when it is full (after forgetting the expired
//! ones) the answer is [`Claim::Full`] (503), not [`Claim::Fresh`]. Check and insert happen
//! under one short std `Mutex` per shard, so of concurrent claims of one nonce exactly one
//! is fresh; no lock is held across an `.await`.
//!
//! A nonce accepted from memory while Redis was unavailable is not in Redis: once Redis
//! answers again it would call that nonce new. So while the memory store still holds
//! nonces inside their window, a nonce Redis calls new is looked up in memory too, and
//! refused if memory accepted it (contract: it "stays refused for its window on that
//! instance after Redis is back"). Without an outage memory holds nothing and is not
//! asked. Those nonces are also written to Redis once it answers (up to
//! [`MAX_PENDING`] of them, in a background task started by a request), so that the other
//! instances refuse them too.
//!
//! Expired entries are swept lazily, on the claims that touch their shard, never by a
//! background task: Cloud Run throttles the CPU between requests, so a timer would barely
//! run, while every claim runs with CPU.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::clock::Clock;
// A poisoned lock only means another claim panicked mid-way; the map itself is still
// consistent enough for a replay cache (at worst one entry is missing its queue twin).
use crate::lock::lock;
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

/// Remembers nonces in Redis when a store is present and answering, else in memory.
pub struct NonceStore {
    memory: MemoryNonces,
    store: Option<Arc<Store>>,
    /// Nonces accepted from memory while Redis was unavailable, not yet written to it.
    pending: Arc<Mutex<Vec<Pending>>>,
    clock: Clock,
}

/// The most nonces kept for writing to Redis after an outage: at most ~400 bytes each
/// (ids of 256 bytes, nonces of 128), so ~4 MB. Past it, a nonce is still refused on
/// this instance (memory holds it) but not written to Redis.
pub const MAX_PENDING: usize = 10_000;

/// A nonce accepted from memory, to be written to Redis until `until`.
struct Pending {
    client: Box<str>,
    nonce: Box<str>,
    until: Instant,
}

impl NonceStore {
    /// A store that holds at most `capacity` nonces in memory, its windows timed by
    /// `clock`'s monotonic instants.
    pub fn new(capacity: usize, store: Option<Arc<Store>>, clock: Clock) -> Self {
        Self {
            memory: MemoryNonces::new(capacity, clock.clone()),
            store,
            pending: Arc::default(),
            clock,
        }
    }

    /// Claims `nonce` for `client`, to be remembered for `ttl`.
    pub async fn claim(&self, client: &str, nonce: &str, ttl: Duration) -> Claim {
        if let Some(store) = &self.store {
            // Boxed: a Redis call's future is large, and without Redis it is never made.
            let answer = Box::pin(store.claim_nonce(client, nonce, ttl)).await;
            if answer.is_some() {
                self.write_back(store);
            }
            match answer {
                Some(true) if self.memory.remembers(client, nonce) => return Claim::Replayed,
                Some(true) => return Claim::Fresh,
                Some(false) => return Claim::Replayed,
                // Redis is slow or down: memory decides (contract: never unchecked), and
                // Redis is told once it answers.
                None => {
                    let claim = self.memory.claim(client, nonce, ttl);
                    if claim == Claim::Fresh {
                        self.keep_for_redis(client, nonce, ttl);
                    }
                    return claim;
                }
            }
        }
        self.memory.claim(client, nonce, ttl)
    }

    fn keep_for_redis(&self, client: &str, nonce: &str, ttl: Duration) {
        let mut pending = lock(&self.pending);
        if pending.len() < MAX_PENDING {
            pending.push(Pending {
                client: client.into(),
                nonce: nonce.into(),
                until: self.clock.instant() + ttl.min(MAX_TTL),
            });
        }
    }

    /// Redis answers: writes the nonces accepted from memory meanwhile, in a task of its
    /// own (no request waits for it). One that Redis fails to take is dropped: this
    /// instance still refuses it from memory.
    fn write_back(&self, store: &Arc<Store>) {
        let batch = {
            let mut pending = lock(&self.pending);
            if pending.is_empty() {
                return;
            }
            std::mem::take(&mut *pending)
        };
        let (store, clock) = (Arc::clone(store), self.clock.clone());
        tokio::spawn(async move {
            for nonce in batch {
                let left = nonce.until.saturating_duration_since(clock.instant());
                if left.is_zero() {
                    continue;
                }
                let _ = Box::pin(store.claim_nonce(&nonce.client, &nonce.nonce, left)).await;
            }
        });
    }
}

/// Enough shards that two cores (or twenty) rarely wait on each other.
const SHARDS: usize = 32;

/// The longest a nonce is remembered, whatever the caller asks: keeps `now + ttl` far from
/// `Instant`'s overflow. The clock tolerance is minutes, so this never shortens a window.
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A nonce's identity: SHA-256 of (client, nonce), length-prefixed so that no two pairs
/// share an encoding. Fixed size, so an entry costs the same whatever the client sent.
type Key = [u8; 32];

/// The bounded in-memory nonce store.
pub(crate) struct MemoryNonces {
    shards: Box<[Mutex<Shard>]>,
    /// Entries in all shards together; reserved under the shard's lock before an insert.
    len: AtomicUsize,
    capacity: usize,
    clock: Clock,
    /// The clock's reading at creation: the origin of `latest_expiry_us`.
    origin: Instant,
    /// When the last-expiring entry expires, in microseconds after `origin` (0: never held
    /// one). Past it the store holds nothing that counts, and [`MemoryNonces::remembers`]
    /// answers without a lock.
    latest_expiry_us: AtomicU64,
}

#[derive(Default)]
struct Shard {
    expiry: HashMap<Key, Instant>,
    /// The same entries by expiry, soonest first: sweeping pops from here. Each map entry
    /// has exactly one heap entry (both change only together).
    queue: BinaryHeap<Reverse<(Instant, Key)>>,
}

impl Shard {
    /// Forgets the entries whose time has passed; returns how many.
    fn sweep(&mut self, now: Instant) -> usize {
        let mut removed = 0;
        while let Some(Reverse((at, key))) = self.queue.peek().copied() {
            if at > now {
                break;
            }
            self.queue.pop();
            self.expiry.remove(&key);
            removed += 1;
        }
        removed
    }
}

impl MemoryNonces {
    pub(crate) fn new(capacity: usize, clock: Clock) -> Self {
        let origin = clock.instant();
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            len: AtomicUsize::new(0),
            capacity,
            clock,
            origin,
            latest_expiry_us: AtomicU64::new(0),
        }
    }

    /// True when `nonce` of `client` was claimed here and is still inside its window.
    pub(crate) fn remembers(&self, client: &str, nonce: &str) -> bool {
        let now = self.clock.instant();
        if micros_since(self.origin, now) >= self.latest_expiry_us.load(Ordering::Acquire) {
            return false;
        }
        let key = key(client, nonce);
        let mut shard = lock(&self.shards[usize::from(key[0]) % SHARDS]);
        let removed = shard.sweep(now);
        self.len.fetch_sub(removed, Ordering::AcqRel);
        shard.expiry.contains_key(&key)
    }

    /// The whole check-and-insert, synchronous: nothing here waits.
    pub(crate) fn claim(&self, client: &str, nonce: &str, ttl: Duration) -> Claim {
        let key = key(client, nonce);
        let shard = &self.shards[usize::from(key[0]) % SHARDS];
        // First try: sweep this shard only.
        if let Some(claim) = self.try_claim(shard, key, ttl) {
            return claim;
        }
        // Full: other shards may hold expired entries nobody has touched since. Sweep them
        // one lock at a time (never two locks at once), then retry once.
        let now = self.clock.instant();
        for other in &self.shards {
            let removed = lock(other).sweep(now);
            self.len.fetch_sub(removed, Ordering::AcqRel);
        }
        self.try_claim(shard, key, ttl).unwrap_or(Claim::Full)
    }

    /// `None` when the store is full.
    fn try_claim(&self, shard: &Mutex<Shard>, key: Key, ttl: Duration) -> Option<Claim> {
        let mut shard = lock(shard);
        let now = self.clock.instant();
        let removed = shard.sweep(now);
        self.len.fetch_sub(removed, Ordering::AcqRel);
        if shard.expiry.contains_key(&key) {
            return Some(Claim::Replayed);
        }
        // Reserved while this shard is locked, so the check above still holds at insert.
        let reserved = self.len.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < self.capacity).then_some(n + 1)
        });
        if reserved.is_err() {
            return None;
        }
        let at = now + ttl.min(MAX_TTL);
        shard.expiry.insert(key, at);
        shard.queue.push(Reverse((at, key)));
        self.latest_expiry_us
            .fetch_max(micros_since(self.origin, at), Ordering::AcqRel);
        Some(Claim::Fresh)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

/// Microseconds from `origin` to `at` (0 when `at` is earlier).
fn micros_since(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_micros()).unwrap_or(u64::MAX)
}

fn key(client: &str, nonce: &str) -> Key {
    let mut hasher = Sha256::new();
    hasher.update((client.len() as u64).to_le_bytes());
    hasher.update(client.as_bytes());
    hasher.update(nonce.as_bytes());
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const TTL: Duration = Duration::from_secs(600);

    #[test]
    fn a_nonce_is_fresh_once_then_replayed() {
        let clock = ManualClock::new();
        let store = MemoryNonces::new(10, clock.clock());
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL), Claim::Fresh);
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL), Claim::Replayed);
        clock.advance(Duration::from_secs(599));
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL), Claim::Replayed);
    }

    #[test]
    fn nonces_are_kept_per_client() {
        let store = MemoryNonces::new(10, ManualClock::new().clock());
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL), Claim::Fresh);
        assert_eq!(store.claim("mobile", "nonce-0000000001", TTL), Claim::Fresh);
        // The length prefix keeps ("ab", "c...") and ("a", "bc...") apart.
        assert_eq!(store.claim("ab", "c0000000000000000", TTL), Claim::Fresh);
        assert_eq!(store.claim("a", "bc0000000000000000", TTL), Claim::Fresh);
    }

    #[test]
    fn a_nonce_is_forgotten_once_its_ttl_passed() {
        let clock = ManualClock::new();
        let store = MemoryNonces::new(10, clock.clock());
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL), Claim::Fresh);
        clock.advance(TTL);
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL), Claim::Fresh);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_full_store_answers_full_and_never_accepts_unchecked() {
        let clock = ManualClock::new();
        let store = MemoryNonces::new(3, clock.clock());
        for i in 0..3 {
            assert_eq!(store.claim("desk", &format!("nonce-{i:012}"), TTL), Claim::Fresh);
        }
        assert_eq!(store.claim("desk", "nonce-new000000001", TTL), Claim::Full);
        // Still full, and still remembering the old ones.
        assert_eq!(store.claim("desk", "nonce-000000000000", TTL), Claim::Replayed);
        assert_eq!(store.claim("other", "nonce-new000000002", TTL), Claim::Full);
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn a_full_store_makes_room_by_forgetting_expired_nonces_of_any_shard() {
        let clock = ManualClock::new();
        let store = MemoryNonces::new(50, clock.clock());
        for i in 0..50 {
            assert_eq!(
                store.claim("desk", &format!("nonce-{i:012}"), Duration::from_secs(10)),
                Claim::Fresh
            );
        }
        assert_eq!(store.claim("desk", "nonce-late00000000", TTL), Claim::Full);
        clock.advance(Duration::from_secs(10));
        // Every key lands in some shard; the full-store sweep visits them all.
        for i in 0..50 {
            assert_eq!(store.claim("desk", &format!("late-{i:012}"), TTL), Claim::Fresh, "{i}");
        }
        assert_eq!(store.len(), 50);
        assert_eq!(store.claim("desk", "nonce-late00000000", TTL), Claim::Full);
    }

    #[test]
    fn nonces_with_different_ttls_expire_each_at_its_own_time() {
        let clock = ManualClock::new();
        let store = MemoryNonces::new(10, clock.clock());
        assert_eq!(store.claim("desk", "long-000000000000", TTL), Claim::Fresh);
        assert_eq!(
            store.claim("desk", "short-00000000000", Duration::from_secs(5)),
            Claim::Fresh
        );
        clock.advance(Duration::from_secs(5));
        assert_eq!(store.claim("desk", "short-00000000000", TTL), Claim::Fresh);
        assert_eq!(store.claim("desk", "long-000000000000", TTL), Claim::Replayed);
    }

    #[test]
    fn a_huge_ttl_is_capped_instead_of_overflowing() {
        let clock = ManualClock::new();
        let store = MemoryNonces::new(10, clock.clock());
        assert_eq!(store.claim("desk", "nonce-0000000001", Duration::MAX), Claim::Fresh);
        clock.advance(MAX_TTL);
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL), Claim::Fresh);
    }

    #[test]
    fn of_concurrent_claims_of_one_nonce_exactly_one_is_fresh() {
        let store = Arc::new(MemoryNonces::new(1000, Clock::system()));
        let barrier = Arc::new(std::sync::Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..200)
                        .map(|i| store.claim("desk", &format!("nonce-{i:012}"), TTL))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Vec<Claim>> = threads
            .into_iter()
            .map(|t| t.join().expect("no claim panics"))
            .collect();
        for i in 0..200 {
            let fresh = results.iter().filter(|r| r[i] == Claim::Fresh).count();
            assert_eq!(fresh, 1, "nonce {i}");
        }
        assert_eq!(store.len(), 200);
    }

    #[test]
    fn concurrent_claims_never_exceed_the_capacity() {
        let store = Arc::new(MemoryNonces::new(100, Clock::system()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|i| store.claim("desk", &format!("nonce-{t}-{i:010}"), TTL) == Claim::Fresh)
                        .count()
                })
            })
            .collect();
        let fresh: usize = threads.into_iter().map(|t| t.join().expect("no claim panics")).sum();
        assert_eq!(fresh, 100);
        assert_eq!(store.len(), 100);
    }

    #[test]
    fn remembers_answers_for_nonces_inside_their_window_only() {
        let clock = ManualClock::new();
        let store = MemoryNonces::new(10, clock.clock());
        assert!(!store.remembers("desk", "nonce-0000000001"));
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL), Claim::Fresh);
        assert!(store.remembers("desk", "nonce-0000000001"));
        assert!(!store.remembers("desk", "nonce-0000000002"));
        assert!(!store.remembers("mobile", "nonce-0000000001"));
        clock.advance(TTL);
        assert!(!store.remembers("desk", "nonce-0000000001"));
    }

    #[tokio::test]
    async fn without_redis_the_store_decides_in_memory() {
        let store = NonceStore::new(1, None, Clock::system());
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL).await, Claim::Fresh);
        assert_eq!(store.claim("desk", "nonce-0000000001", TTL).await, Claim::Replayed);
        assert_eq!(store.claim("desk", "nonce-0000000002", TTL).await, Claim::Full);
    }
}
