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
use crate::budget::redis::{Folded, FoldedAnswer};
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
    /// `bucket.lua` and, when it admits, the user budget's `reserve.lua` (`fold.lua`).
    folding: redis::Script,
}

impl RedisLimiter {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            script: redis::Script::new(include_str!("bucket.lua")),
            folding: redis::Script::new(concat!(
                include_str!("../budget/common.lua"),
                "local function limit(KEYS, ARGV)\n",
                include_str!("bucket.lua"),
                "end\nlocal function reserve(KEYS, ARGV)\n",
                include_str!("../budget/reserve.lua"),
                "end\n",
                include_str!("../budget/fold.lua"),
            )),
        }
    }

    /// The decision, or `None` when Redis is unavailable (the caller decides in memory).
    /// `early` and `late` are consecutive days around this instance's nearer midnight
    /// ([`crate::day::Days::pair_near`]); Redis's clock picks one (see the module docs).
    /// With `folded`, an admission also makes that budget reservation, in the same call,
    /// and its answer comes back beside the decision.
    pub async fn decide(
        &self,
        key: &Key,
        limits: &Limits,
        (early, late): (Day, Day),
        folded: Option<&Folded>,
    ) -> Option<(Decision, Option<FoldedAnswer>)> {
        let tag = key_tag(key);
        let mut invocation = folded.map_or(&self.script, |_| &self.folding).prepare_invoke();
        invocation
            .key(self.store.key(&tag, "bucket"))
            .key(self.store.key(&tag, &day_part(&early)))
            .key(self.store.key(&tag, &day_part(&late)))
            .arg(limits.capacity.get())
            .arg(limits.refill_per_second)
            .arg(limits.daily_quota.get())
            .arg(late.start)
            .arg(late.end);
        let (outcome, remaining, reset_ms, retry_ms, answer) = match folded {
            None => {
                let (outcome, remaining, reset_ms, retry_ms): (i64, u64, u64, u64) = self
                    .store
                    // EVALSHA, and EVAL once more when the server answers NOSCRIPT.
                    .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
                    .await?;
                (outcome, remaining, reset_ms, retry_ms, None)
            }
            Some(folded) => {
                folded.add_to(&mut invocation);
                let (outcome, remaining, reset_ms, retry_ms, admitted, left, expired): Answer = self
                    .store
                    .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
                    .await?;
                // -1: the limits refused, nothing was reserved.
                let answer = if admitted < 0 {
                    None
                } else {
                    Some(FoldedAnswer::read(admitted, &left, expired)?)
                };
                (outcome, remaining, reset_ms, retry_ms, answer)
            }
        };
        let outcome = match outcome {
            0 => Outcome::Admitted,
            1 => Outcome::RateLimited,
            _ => Outcome::QuotaExceeded,
        };
        let decision = Decision {
            outcome,
            headers: RateLimitHeaders {
                limit: limits.capacity.get(),
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                reset: Duration::from_millis(reset_ms),
            },
            retry_after: Duration::from_millis(retry_ms),
        };
        Some((decision, answer))
    }
}

/// `fold.lua`'s answer: `bucket.lua`'s four figures, then `reserve.lua`'s three.
type Answer = (i64, u64, u64, u64, i64, String, u64);

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
