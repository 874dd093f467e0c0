//! The in-memory limiter: the bucket and day arithmetic, and a bounded, sharded map of
//! identities. It decides when Redis is not configured or not answering.
//!
//! Each decision runs under one shard's `std::sync::Mutex` and never across an `.await`,
//! so N concurrent requests of one identity admit exactly what the bucket holds. It must
//! never grow without bound: idle identities are swept and a hard cap evicts the least
//! recently admitted ones (see [`MAX_ENTRIES`]). It must never forget an identity whose
//! daily quota is used up before its day ends: else a flood of new identities would hand
//! it a fresh quota.
//!
//! Days are the caller's: each decision is given the [`Day`] (in `DAY_TIMEZONE`) that the
//! moment belongs to, so this module knows nothing of time zones.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{Decision, Key, Outcome, RateLimitHeaders};
use crate::day::Day;
// A poisoned shard only means a panic elsewhere mid-decision; its map is still valid.
use crate::lock::lock;
use crate::settings::Limits;

const MICROS_PER_SECOND: f64 = 1_000_000.0;

/// The most identities held at once, all shards together. An entry costs roughly
/// 150-250 bytes (key strings, the entry, the map's slot), so the cap bounds the limiter
/// near 30 MB, well inside a 512 MiB Cloud Run instance, while still holding every
/// identity of a busy day's traffic per instance. Past it, a flood of distinct users
/// evicts the least recently admitted identities: they restart from a full bucket and a
/// zero count, the cheapest state to lose (an identity busy right now keeps its state).
/// Identities whose daily quota is used up are never evicted before their day ends; a
/// shard full of them refuses new identities until then (see [`MemoryLimiter::decide`]).
pub(crate) const MAX_ENTRIES: usize = 131_072;
const SHARDS: usize = 32;
/// A shard sweeps its idle entries when it grows to this size, then when it doubles.
const FIRST_SWEEP: usize = 256;

/// One identity's state: its bucket and its daily counter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Entry {
    /// Tokens at `at_us` (fractional).
    pub tokens: f64,
    /// Unix microseconds of the last admitted request.
    pub at_us: u64,
    /// When the bucket is full again (unix microseconds): from then on it carries no state.
    pub full_at_us: u64,
    /// The end (unix seconds) of the day that `used` counts: it names that day, as one
    /// zone's days never share an end.
    pub day_end: i64,
    pub used: u64,
    /// `used` reached the daily quota on that day.
    pub used_up: bool,
}

impl Entry {
    /// True when this identity's quota is used up for `today`: it must be kept until the
    /// day ends, whatever else arrives.
    fn is_used_up(&self, today: &Day) -> bool {
        self.used_up && self.day_end == today.end
    }

    /// True when forgetting this entry changes no future decision: its bucket is full
    /// again and the day it counted is over.
    fn is_idle(&self, now_us: u64, today: &Day) -> bool {
        now_us >= self.full_at_us && self.day_end <= today.start
    }
}

/// Time from `now_us` until `day` ends (when its quota starts again).
fn until_end(day: &Day, now_us: u64) -> Duration {
    let end_us = u64::try_from(day.end).unwrap_or(0).saturating_mul(1_000_000);
    Duration::from_micros(end_us.saturating_sub(now_us))
}

/// One decision on an identity's bucket and daily counter at `now_us` (unix
/// microseconds), which belongs to `today`. Returns the decision and the entry to store when admitted (a refusal
/// takes nothing: the state stays as it was).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "token counts and microsecond spans are far below 2^52; floats are floored/ceiled on purpose"
)]
pub(crate) fn step(entry: Option<&Entry>, limits: &Limits, now_us: u64, today: &Day) -> (Decision, Option<Entry>) {
    let capacity = f64::from(limits.capacity.get());
    let rate = limits.refill_per_second;
    let (tokens, used) = match entry {
        None => (capacity, 0),
        Some(e) => {
            // A clock that steps back refills nothing rather than taking tokens away.
            let elapsed = now_us.saturating_sub(e.at_us) as f64 / MICROS_PER_SECOND;
            let tokens = (e.tokens + elapsed * rate).min(capacity);
            (tokens, if e.day_end == today.end { e.used } else { 0 })
        }
    };
    let headers = |tokens: f64| RateLimitHeaders {
        limit: limits.capacity.get(),
        remaining: tokens.max(0.0).floor() as u32,
        reset: Duration::from_secs_f64(((capacity - tokens) / rate).max(0.0)),
    };
    // When both refuse, the daily quota answers (contract: "Order of checks").
    if used >= limits.daily_quota.get() {
        let decision = Decision {
            outcome: Outcome::QuotaExceeded,
            headers: headers(tokens),
            retry_after: until_end(today, now_us),
        };
        return (decision, None);
    }
    if tokens < 1.0 {
        let decision = Decision {
            outcome: Outcome::RateLimited,
            headers: headers(tokens),
            retry_after: Duration::from_secs_f64((1.0 - tokens) / rate),
        };
        return (decision, None);
    }
    let tokens = tokens - 1.0;
    let to_full_us = ((capacity - tokens) / rate * MICROS_PER_SECOND).ceil();
    let entry = Entry {
        tokens,
        at_us: now_us,
        full_at_us: now_us.saturating_add(to_full_us.min(u64::MAX as f64) as u64),
        day_end: today.end,
        used: used + 1,
        used_up: used + 1 >= limits.daily_quota.get(),
    };
    let decision = Decision {
        outcome: Outcome::Admitted,
        headers: headers(tokens),
        retry_after: Duration::ZERO,
    };
    (decision, Some(entry))
}

struct Shard {
    entries: HashMap<Key, Entry>,
    /// The size at which the next insert sweeps idle entries first.
    sweep_at: usize,
    /// The end of the day on which this shard was found full of used-up identities: it
    /// stays so until that day ends (none can be forgotten, none can be added), so
    /// inserts that day are refused without scanning the shard again.
    full_on_day: Option<i64>,
}

/// Buckets and daily counters of every identity this instance decided in memory.
pub(crate) struct MemoryLimiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// The most identities one shard holds.
    shard_cap: usize,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLimiter {
    pub fn new() -> Self {
        Self::with_max_entries(MAX_ENTRIES)
    }

    /// A limiter that holds at most `max_entries` identities (rounded down to a multiple
    /// of the shard count, at least one per shard): tests use a small cap.
    pub fn with_max_entries(max_entries: usize) -> Self {
        let shard_cap = (max_entries / SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    entries: HashMap::new(),
                    sweep_at: FIRST_SWEEP.min(shard_cap),
                    full_on_day: None,
                })
            })
            .collect();
        Self {
            shards,
            hasher: RandomState::new(),
            shard_cap,
        }
    }

    /// Decides one request of `key` at `now_us` (unix microseconds), which belongs to
    /// `today` (the day in `DAY_TIMEZONE`).
    ///
    /// A new identity whose shard is full of identities with a used-up quota cannot be
    /// remembered, and admitting it unremembered would leave it unlimited: it is refused
    /// as rate limited until the day ends, when those identities may be forgotten.
    pub fn decide(&self, key: &Key, limits: &Limits, now_us: u64, today: &Day) -> Decision {
        let mut shard = self.shard(key);
        let (decision, entry) = step(shard.entries.get(key), limits, now_us, today);
        if let Some(entry) = entry {
            if let Some(slot) = shard.entries.get_mut(key) {
                *slot = entry;
            } else if shard.make_room(now_us, today, self.shard_cap) {
                shard.entries.insert(key.clone(), entry);
            } else {
                return no_room(limits, now_us, today);
            }
        }
        decision
    }

    /// Identities currently held (all shards).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).entries.len()).sum()
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        #[allow(clippy::cast_possible_truncation, reason = "only the low bits pick a shard")]
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        lock(&self.shards[index])
    }
}

impl Shard {
    /// Before inserting a new identity: sweep idle entries when the shard has grown
    /// (amortised: the threshold doubles), and when it is still at its cap evict the
    /// least recently admitted eighth of the identities whose quota is not used up.
    /// False when there is still no room: every identity left has used up its quota.
    fn make_room(&mut self, now_us: u64, today: &Day, cap: usize) -> bool {
        if self.entries.len() < self.sweep_at {
            return true;
        }
        if self.full_on_day == Some(today.end) {
            return false;
        }
        self.entries.retain(|_, e| !e.is_idle(now_us, today));
        if self.entries.len() >= cap {
            let mut ages: Vec<u64> = self
                .entries
                .values()
                .filter(|e| !e.is_used_up(today))
                .map(|e| e.at_us)
                .collect();
            if !ages.is_empty() {
                let cut = (cap / 8).min(ages.len() - 1);
                let (_, nth, _) = ages.select_nth_unstable(cut);
                let oldest_kept = *nth;
                self.entries.retain(|_, e| e.is_used_up(today) || e.at_us > oldest_kept);
            }
        }
        self.sweep_at = (self.entries.len() * 2).clamp(FIRST_SWEEP.min(cap), cap);
        let room = self.entries.len() < cap;
        self.full_on_day = (!room).then_some(today.end);
        room
    }
}

/// The refusal of a new identity that cannot be remembered: until the day ends.
fn no_room(limits: &Limits, now_us: u64, today: &Day) -> Decision {
    let to_midnight = until_end(today, now_us);
    Decision {
        outcome: Outcome::RateLimited,
        headers: RateLimitHeaders {
            limit: limits.capacity.get(),
            remaining: 0,
            reset: to_midnight,
        },
        retry_after: to_midnight,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::num::{NonZeroU32, NonZeroU64};
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::day::DayZone;

    const SEC: u64 = 1_000_000;
    const SECONDS_PER_DAY: u64 = 86_400;
    /// 2024-05-01T12:00:00Z in microseconds.
    const NOON: u64 = (19_844 * SECONDS_PER_DAY + 12 * 3600) * SEC;

    fn limits(capacity: u32, rate: f64, quota: u64) -> Limits {
        Limits {
            capacity: NonZeroU32::new(capacity).unwrap(),
            refill_per_second: rate,
            daily_quota: NonZeroU64::new(quota).unwrap(),
        }
    }

    /// The UTC day of `now_us`.
    fn utc_day(now_us: u64) -> Day {
        DayZone::utc().day_at(i64::try_from(now_us / SEC).unwrap())
    }

    /// A decision at `now_us` with UTC days.
    fn decide(m: &MemoryLimiter, key: &Key, l: &Limits, now_us: u64) -> Decision {
        m.decide(key, l, now_us, &utc_day(now_us))
    }

    fn user(name: &str) -> Key {
        Key::User {
            product: Arc::from("demo"),
            user: name.into(),
        }
    }

    #[test]
    fn a_burst_admits_capacity_then_refuses_until_a_token_refills() {
        let m = MemoryLimiter::new();
        let l = limits(3, 0.5, 1000);
        for left in [2, 1, 0] {
            let d = decide(&m, &user("a"), &l, NOON);
            assert_eq!(d.outcome, Outcome::Admitted);
            assert_eq!(d.headers.remaining, left);
            assert_eq!(d.headers.limit, 3);
        }
        let d = decide(&m, &user("a"), &l, NOON);
        assert_eq!(d.outcome, Outcome::RateLimited);
        assert_eq!(d.retry_after, Duration::from_secs(2));
        assert_eq!(d.headers.reset, Duration::from_secs(6));
        // 1.5 s later: 0.75 token, still refused, 0.5 s to go.
        let d = decide(&m, &user("a"), &l, NOON + 3 * SEC / 2);
        assert_eq!(d.outcome, Outcome::RateLimited);
        assert_eq!(d.retry_after, Duration::from_millis(500));
        let d = decide(&m, &user("a"), &l, NOON + 2 * SEC);
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(d.headers.remaining, 0);
    }

    #[test]
    fn fractional_refill_accumulates() {
        let m = MemoryLimiter::new();
        let l = limits(1, 0.25, 1000);
        assert_eq!(decide(&m, &user("a"), &l, NOON).outcome, Outcome::Admitted);
        for s in 1..4 {
            assert_eq!(decide(&m, &user("a"), &l, NOON + s * SEC).outcome, Outcome::RateLimited);
        }
        assert_eq!(decide(&m, &user("a"), &l, NOON + 4 * SEC).outcome, Outcome::Admitted);
    }

    #[test]
    fn the_daily_quota_refuses_until_utc_midnight_and_then_resets() {
        let m = MemoryLimiter::new();
        let l = limits(100, 100.0, 2);
        assert_eq!(decide(&m, &user("a"), &l, NOON).outcome, Outcome::Admitted);
        assert_eq!(decide(&m, &user("a"), &l, NOON).outcome, Outcome::Admitted);
        let d = decide(&m, &user("a"), &l, NOON);
        assert_eq!(d.outcome, Outcome::QuotaExceeded);
        assert_eq!(d.retry_after, Duration::from_secs(12 * 3600));
        let midnight = NOON + 12 * 3600 * SEC;
        assert_eq!(decide(&m, &user("a"), &l, midnight - 1).outcome, Outcome::QuotaExceeded);
        assert_eq!(decide(&m, &user("a"), &l, midnight).outcome, Outcome::Admitted);
    }

    #[test]
    fn when_both_refuse_the_quota_answers_and_nothing_is_taken() {
        let m = MemoryLimiter::new();
        let l = limits(1, 1.0, 1);
        assert_eq!(decide(&m, &user("a"), &l, NOON).outcome, Outcome::Admitted);
        let d = decide(&m, &user("a"), &l, NOON);
        assert_eq!(d.outcome, Outcome::QuotaExceeded);
        // Next day, the bucket was not charged by the refusals.
        let d = decide(&m, &user("a"), &l, NOON + 12 * 3600 * SEC);
        assert_eq!(d.outcome, Outcome::Admitted);
    }

    #[test]
    fn identities_are_independent() {
        let m = MemoryLimiter::new();
        let l = limits(1, 0.001, 1000);
        assert_eq!(decide(&m, &user("a"), &l, NOON).outcome, Outcome::Admitted);
        assert_eq!(decide(&m, &user("a"), &l, NOON).outcome, Outcome::RateLimited);
        assert_eq!(decide(&m, &user("b"), &l, NOON).outcome, Outcome::Admitted);
        assert_eq!(
            decide(&m, &Key::Client(Arc::from("a")), &l, NOON).outcome,
            Outcome::Admitted
        );
    }

    #[test]
    fn a_clock_stepping_back_refills_nothing() {
        let m = MemoryLimiter::new();
        let l = limits(1, 1.0, 1000);
        assert_eq!(decide(&m, &user("a"), &l, NOON).outcome, Outcome::Admitted);
        assert_eq!(
            decide(&m, &user("a"), &l, NOON - 10 * SEC).outcome,
            Outcome::RateLimited
        );
    }

    #[test]
    fn idle_identities_are_swept_and_a_flood_stays_under_the_cap() {
        let m = MemoryLimiter::new();
        let l = limits(2, 1.0, 1_000_000);
        // Yesterday's identities, full again: swept as new ones arrive.
        for i in 0..5_000 {
            decide(&m, &user(&format!("old-{i}")), &l, NOON - SECONDS_PER_DAY * SEC);
        }
        for i in 0..5_000 {
            decide(&m, &user(&format!("new-{i}")), &l, NOON);
        }
        assert!(m.len() < 6_000, "idle identities were swept: {} left", m.len());
        // A flood of distinct users within one day cannot pass the cap.
        for i in 0..(MAX_ENTRIES + MAX_ENTRIES / 2) {
            let now = NOON + i as u64;
            decide(&m, &user(&format!("flood-{i}")), &l, now);
        }
        assert!(m.len() <= MAX_ENTRIES, "{} entries", m.len());
        // The identity admitted last is still limited.
        let last = user(&format!("flood-{}", MAX_ENTRIES + MAX_ENTRIES / 2 - 1));
        let now = NOON + (MAX_ENTRIES + MAX_ENTRIES / 2) as u64;
        assert_eq!(decide(&m, &last, &l, now).outcome, Outcome::Admitted);
        assert_eq!(decide(&m, &last, &l, now).outcome, Outcome::RateLimited);
    }

    #[test]
    fn a_flood_of_new_identities_never_resets_a_used_up_quota() {
        let m = MemoryLimiter::with_max_entries(SHARDS * 8);
        let l = limits(10, 1.0, 2);
        let victim = user("victim");
        assert_eq!(decide(&m, &victim, &l, NOON).outcome, Outcome::Admitted);
        assert_eq!(decide(&m, &victim, &l, NOON).outcome, Outcome::Admitted);
        assert_eq!(decide(&m, &victim, &l, NOON).outcome, Outcome::QuotaExceeded);
        // Twenty times the cap of new identities, each admitted once (quota not used up):
        // the least recently admitted go, the victim is never among them.
        for i in 0..SHARDS * 8 * 20 {
            let now = NOON + 1 + i as u64;
            assert_eq!(
                decide(&m, &user(&format!("flood-{i}")), &l, now).outcome,
                Outcome::Admitted
            );
        }
        assert!(m.len() <= SHARDS * 8, "{} entries", m.len());
        let later = NOON + SEC;
        assert_eq!(decide(&m, &victim, &l, later).outcome, Outcome::QuotaExceeded);
        // Its day ends: then it may be forgotten, and its quota starts again anyway.
        let midnight = NOON + 12 * 3600 * SEC;
        assert_eq!(decide(&m, &victim, &l, midnight).outcome, Outcome::Admitted);
    }

    #[test]
    fn a_shard_full_of_used_up_identities_refuses_new_ones_until_the_day_ends() {
        // One identity per shard, each with a quota of one: the first identity of each
        // shard uses its quota up and fills the shard.
        let m = MemoryLimiter::with_max_entries(SHARDS);
        let l = limits(10, 1.0, 1);
        let mut admitted = Vec::new();
        for i in 0..SHARDS * 40 {
            let d = decide(&m, &user(&format!("u-{i}")), &l, NOON);
            match d.outcome {
                Outcome::Admitted => admitted.push(i),
                Outcome::RateLimited => {
                    assert_eq!(d.retry_after, Duration::from_secs(12 * 3600));
                    assert_eq!(d.headers.remaining, 0);
                }
                Outcome::QuotaExceeded => panic!("a new identity has its whole quota"),
            }
        }
        assert_eq!(admitted.len(), SHARDS, "one per shard");
        assert_eq!(m.len(), SHARDS);
        // The used-up ones stay refused by their quota, not forgotten.
        for i in &admitted {
            assert_eq!(
                decide(&m, &user(&format!("u-{i}")), &l, NOON + SEC).outcome,
                Outcome::QuotaExceeded
            );
        }
        let midnight = NOON + 12 * 3600 * SEC;
        assert_eq!(decide(&m, &user("next-day"), &l, midnight).outcome, Outcome::Admitted);
    }

    #[test]
    fn used_up_identities_are_kept_until_the_zones_day_ends_not_utcs() {
        // Tokyo: 16:00 UTC is 01:00 local; UTC's midnight falls at 09:00 in the same
        // Tokyo day, which ends at 15:00 UTC.
        let tokyo = DayZone::new("Asia/Tokyo").unwrap();
        let decide = |m: &MemoryLimiter, key: &Key, l: &Limits, now_us: u64| {
            m.decide(key, l, now_us, &tokyo.day_at(i64::try_from(now_us / SEC).unwrap()))
        };
        let start = NOON + 4 * 3600 * SEC;
        let tokyo_end = NOON + 27 * 3600 * SEC;
        let m = MemoryLimiter::with_max_entries(SHARDS);
        let l = limits(10, 1.0, 1);
        // Fill every shard with used-up identities.
        let mut used_up = Vec::new();
        for i in 0..SHARDS * 40 {
            if decide(&m, &user(&format!("u-{i}")), &l, start).outcome == Outcome::Admitted {
                used_up.push(i);
            }
        }
        assert_eq!(used_up.len(), SHARDS);
        // Past UTC's midnight they are still used up and still held: no room for others,
        // and the refusal counts to Tokyo's midnight.
        let after_utc_midnight = NOON + 12 * 3600 * SEC + SEC;
        for i in &used_up {
            let d = decide(&m, &user(&format!("u-{i}")), &l, after_utc_midnight);
            assert_eq!(d.outcome, Outcome::QuotaExceeded);
            assert_eq!(d.retry_after, Duration::from_micros(tokyo_end - after_utc_midnight));
        }
        let d = decide(&m, &user("newcomer"), &l, after_utc_midnight);
        assert_eq!(d.outcome, Outcome::RateLimited);
        assert_eq!(d.retry_after, Duration::from_micros(tokyo_end - after_utc_midnight));
        // Tokyo's day ends: their quota is back, and room is made for newcomers.
        assert_eq!(decide(&m, &user("newcomer"), &l, tokyo_end).outcome, Outcome::Admitted);
        let i = used_up[0];
        assert_eq!(
            decide(&m, &user(&format!("u-{i}")), &l, tokyo_end).outcome,
            Outcome::Admitted
        );
    }

    #[test]
    fn concurrent_requests_admit_exactly_the_capacity() {
        let m = Arc::new(MemoryLimiter::new());
        let l = limits(10, 1e-6, 1000);
        let admitted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..25 {
                        if decide(&m, &user("a"), &l, NOON).outcome == Outcome::Admitted {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 10);
    }

    proptest! {
        /// Over any schedule, a bucket admits at most capacity + rate x elapsed, and each
        /// refusal says when a token will be there.
        #[test]
        fn never_admits_more_than_capacity_plus_refill(
            capacity in 1u32..50,
            rate in 0.01f64..100.0,
            gaps in proptest::collection::vec(0u64..3_000_000, 1..200),
        ) {
            let l = limits(capacity, rate, u64::MAX);
            let mut entry: Option<Entry> = None;
            let mut now = NOON;
            let mut admitted = 0u64;
            for gap in gaps {
                now += gap;
                let (d, next) = step(entry.as_ref(), &l, now, &utc_day(now));
                match d.outcome {
                    Outcome::Admitted => {
                        admitted += 1;
                        prop_assert!(next.is_some());
                        entry = next;
                    }
                    Outcome::RateLimited => {
                        prop_assert!(next.is_none());
                        prop_assert!(d.retry_after > Duration::ZERO);
                        prop_assert!(d.retry_after.as_secs_f64() <= 1.0 / rate + 1e-6);
                    }
                    Outcome::QuotaExceeded => prop_assert!(false, "no quota here"),
                }
                #[allow(clippy::cast_precision_loss)]
                let bound = f64::from(capacity) + rate * (now - NOON) as f64 / 1e6;
                #[allow(clippy::cast_precision_loss)]
                let admitted_f = admitted as f64;
                prop_assert!(admitted_f <= bound + 1e-6, "admitted {} > {}", admitted, bound);
                prop_assert!(d.headers.remaining <= capacity);
            }
        }
    }
}
