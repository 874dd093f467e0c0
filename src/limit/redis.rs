//! Limits decided in Redis: one atomic round trip per decision (`bucket.lua`), on Redis's
//! clock, so every instance shares one bucket and one daily counter per identity.
//!
//! It owns the key layout of limits; the connection, timeouts and fallback belong to
//! [`Store`]. It never decides in memory itself: `None` tells the caller to.

use std::sync::Arc;
use std::time::Duration;

use super::{Decision, Key, Outcome, RateLimitHeaders};
use crate::settings::Limits;
use crate::store::{Store, id_part};

/// Keys (see [`key_tag`]): `<prefix>:{p:<product>:u:<user>}:bucket` and `...:day`, or
/// `<prefix>:{c:<client>}:bucket` and `...:day`; one hash tag per identity so that a
/// decision's two keys share a Redis Cluster slot.
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
    pub async fn decide(&self, key: &Key, limits: &Limits) -> Option<Decision> {
        let tag = key_tag(key);
        let bucket = self.store.key(&tag, "bucket");
        let day = self.store.key(&tag, "day");
        let (outcome, remaining, reset_ms, retry_ms): (i64, u64, u64, u64) = self
            .store
            .run(|mut conn| async move {
                // EVALSHA, and EVAL once more when the server answers NOSCRIPT.
                self.script
                    .key(bucket)
                    .key(day)
                    .arg(limits.capacity.get())
                    .arg(limits.refill_per_second)
                    .arg(limits.daily_quota.get())
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

/// The hash tag of an identity: ids are escaped by [`id_part`] so that a `}` or `:` in a
/// user id can neither end the tag early nor make two identities share keys.
pub(crate) fn key_tag(key: &Key) -> String {
    match key {
        Key::User { product, user } => format!("p:{}:u:{}", id_part(product), id_part(user)),
        Key::Client(client) => format!("c:{}", id_part(client)),
    }
}
