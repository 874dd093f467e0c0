//! Limits decided in Redis: one atomic round trip per decision (`bucket.lua`), on Redis's
//! clock, so every instance shares one bucket and one daily counter per identity.
//!
//! It owns the key layout of limits; the connection, timeouts and fallback belong to
//! [`Store`]. It never decides in memory itself: `None` tells the caller to.
//!
//! Days of `DAY_TIMEZONE` in Redis: Lua has no time-zone data, so the instance computes
//! from its own clock the two consecutive days around the nearer midnight (their dates,
//! as in `2026-12-07`, name the counters' keys; their boundaries go as arguments), and
//! the script reads Redis's `TIME` to pick the one the decision falls in. The day thus
//! changes for every instance at the same instant, Redis's midnight in the zone, as the
//! bucket does on Redis's clock: instances' clocks, which differ by seconds, choose only
//! which pair of days is sent, never which one counts. A request within a few seconds of
//! midnight is counted on the day Redis's clock says, and a refusal's `Retry-After`
//! counts to that day's end on Redis's clock. A changed `DAY_TIMEZONE` names new keys
//! from the next date on; on the date that old and new zone share, both count into the
//! same key, which can only make that one day's quota stricter.

use std::sync::Arc;
use std::time::Duration;

use super::{Decision, Key, Outcome, RateLimitHeaders};
use crate::day::Day;
use crate::settings::Limits;
use crate::store::{Store, id_part};

/// Keys (see [`key_tag`]): `<prefix>:{p:<product>:u:<user>}:bucket` and
/// `...:day:<date>` (one counter per day of `DAY_TIMEZONE`), or
/// `<prefix>:{c:<client>}:bucket` and `...:day:<date>`; one hash tag per identity so that
/// a decision's keys share a Redis Cluster slot.
pub(crate) struct RedisLimiter {
    store: Arc<Store>,
    script: redis::Script,
}

impl RedisLimiter {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            script: redis::Script::new(include_str!("bucket.lua")),
        }
    }

    /// The decision, or `None` when Redis is unavailable (the caller decides in memory).
    /// `early` and `late` are consecutive days around this instance's nearer midnight
    /// ([`crate::day::Days::pair_near`]); Redis's clock picks one (see the module docs).
    pub async fn decide(&self, key: &Key, limits: &Limits, (early, late): (Day, Day)) -> Option<Decision> {
        let tag = key_tag(key);
        let bucket = self.store.key(&tag, "bucket");
        let early_day = self.store.key(&tag, &day_part(&early));
        let late_day = self.store.key(&tag, &day_part(&late));
        let (outcome, remaining, reset_ms, retry_ms): (i64, u64, u64, u64) = self
            .store
            .run(|mut conn| async move {
                // EVALSHA, and EVAL once more when the server answers NOSCRIPT.
                self.script
                    .key(bucket)
                    .key(early_day)
                    .key(late_day)
                    .arg(limits.capacity.get())
                    .arg(limits.refill_per_second)
                    .arg(limits.daily_quota.get())
                    .arg(late.start)
                    .arg(late.end)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let outcome = match outcome {
            0 => Outcome::Admitted,
            1 => Outcome::RateLimited,
            _ => Outcome::QuotaExceeded,
        };
        Some(Decision {
            outcome,
            headers: RateLimitHeaders {
                limit: limits.capacity.get(),
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                reset: Duration::from_millis(reset_ms),
            },
            retry_after: Duration::from_millis(retry_ms),
        })
    }
}

/// `day:2026-12-07`: the key part of one day's counter.
fn day_part(day: &Day) -> String {
    format!("day:{}", day.key())
}

/// The hash tag of an identity: ids are escaped by [`id_part`] so that a `}` or `:` in a
/// user id can neither end the tag early nor make two identities share keys.
pub(crate) fn key_tag(key: &Key) -> String {
    match key {
        Key::User { product, user } => format!("p:{}:u:{}", id_part(product), id_part(user)),
        Key::Client(client) => format!("c:{}", id_part(client)),
    }
}
