//! Rate limits: a token bucket and a daily quota per (product, user), and per HMAC
//! client where `CLIENT_LIMITS` names it.
//!
//! One [`Limiter::admit`] call per request decides everything and returns the bucket
//! figures for OpenAI's `x-ratelimit-*` headers. Decisions go to Redis ([`redis`], one
//! atomic script per decision) when a [`Store`] is configured and answering, else to this
//! instance's memory ([`memory`]). This module never fails a request because Redis is
//! unavailable, and never holds a lock across an `.await`.
//!
//! Daily quotas count days of `DAY_TIMEZONE` (a [`DayCache`]); how Redis, which cannot
//! do time-zone arithmetic, still decides the day on its own clock is in [`redis`].

mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use self::memory::MemoryLimiter;
use self::redis::RedisLimiter;
use crate::auth::Identity;
use crate::budget::redis::{Folded, FoldedAnswer};
use crate::clock::Clock;
use crate::day::{DayCache, DayZone};
use crate::metrics;
use crate::settings::{LimitSettings, Limits};
use crate::store::Store;

/// The bucket that decided, as OpenAI's `x-ratelimit-*-requests` headers show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// The bucket's capacity.
    pub limit: u32,
    /// Whole tokens left.
    pub remaining: u32,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

// Names as constants: inserting by `&'static str` validates the name on every call.
const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");

impl RateLimitHeaders {
    pub fn write(&self, headers: &mut HeaderMap) {
        headers.insert(LIMIT_REQUESTS, HeaderValue::from(self.limit));
        headers.insert(REMAINING_REQUESTS, HeaderValue::from(self.remaining));
        let reset = openai_duration(self.reset);
        headers.insert(
            RESET_REQUESTS,
            HeaderValue::from_str(&reset).expect("a formatted duration is a valid header value"),
        );
    }
}

/// A duration in OpenAI's form: `1s`, `350ms`, `6m0s`, `1h2m3s`.
pub fn openai_duration(d: Duration) -> String {
    let millis = d.as_millis();
    if millis < 1000 {
        return format!("{millis}ms");
    }
    // Whole seconds, rounded up so that a client waiting this long finds the bucket full.
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// An admitted request: the headers of the (product, user) bucket, and the answer of the
/// user budget's reservation when the limiter's Redis call made it
/// ([`crate::budget::redis::Folded`]).
#[derive(Debug, Clone, Copy)]
pub struct Grant {
    pub headers: RateLimitHeaders,
    pub folded: Option<FoldedAnswer>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LimitError {
    /// 429 `rate_limit_exceeded`.
    #[error("rate limit exceeded")]
    RateLimited {
        retry_after: Duration,
        headers: RateLimitHeaders,
    },
    /// 429 `daily_quota_exceeded`.
    #[error("daily quota exceeded")]
    DailyQuotaExceeded {
        retry_after: Duration,
        headers: RateLimitHeaders,
    },
}

impl LimitError {
    /// `Retry-After` (whole seconds, at least 1) and the deciding bucket's headers.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let (Self::RateLimited {
            retry_after,
            headers: bucket,
        }
        | Self::DailyQuotaExceeded {
            retry_after,
            headers: bucket,
        }) = self;
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        bucket.write(headers);
    }
}

/// What one bucket and daily counter said about one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Decision {
    pub outcome: Outcome,
    /// The figures of the bucket that decided, after this request.
    pub headers: RateLimitHeaders,
    /// Until a token (rate limited) or the next day in `DAY_TIMEZONE` (quota exceeded);
    /// zero when admitted.
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Admitted,
    RateLimited,
    QuotaExceeded,
}

impl Outcome {
    /// The `outcome` label of the limiter metric.
    fn label(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
        }
    }
}

impl Decision {
    fn into_result(self) -> Result<Grant, LimitError> {
        let Self {
            outcome,
            headers,
            retry_after,
        } = self;
        match outcome {
            Outcome::Admitted => Ok(Grant { headers, folded: None }),
            Outcome::RateLimited => Err(LimitError::RateLimited { retry_after, headers }),
            Outcome::QuotaExceeded => Err(LimitError::DailyQuotaExceeded { retry_after, headers }),
        }
    }
}

/// Whose bucket and counter a decision is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    User { product: Arc<str>, user: Arc<str> },
    Client(Arc<str>),
}

/// Decides every request's limits: in Redis when a store is configured and answering,
/// else in this instance's memory.
pub struct Limiter {
    settings: LimitSettings,
    memory: MemoryLimiter,
    redis: Option<RedisLimiter>,
    /// Wall time: the daily quota follows the calendar, and a step back is harmless (the
    /// bucket refills nothing for it).
    clock: Clock,
    /// The days of `DAY_TIMEZONE`.
    days: DayCache,
}

impl Limiter {
    pub fn new(settings: &LimitSettings, store: Option<Arc<Store>>) -> Self {
        Self::with_clock(settings, store, Clock::system())
    }

    /// As [`Limiter::new`], with the clock of the in-memory decisions (Redis decides on
    /// its own clock). Days are UTC days until [`Limiter::with_day_zone`].
    pub fn with_clock(settings: &LimitSettings, store: Option<Arc<Store>>, clock: Clock) -> Self {
        Self {
            settings: settings.clone(),
            memory: MemoryLimiter::new(),
            redis: store.map(RedisLimiter::new),
            clock,
            days: DayCache::new(DayZone::utc()),
        }
    }

    /// Daily quotas start at 00:00 in `zone` (`DAY_TIMEZONE`).
    #[must_use]
    pub fn with_day_zone(mut self, zone: DayZone) -> Self {
        self.days = DayCache::new(zone);
        self
    }

    /// Admits or refuses one request of `identity`.
    ///
    /// An HMAC client named in `CLIENT_LIMITS` is decided first, on its own: a refusal
    /// there consults nothing further, and its admission stands even when the user's
    /// limits then refuse (contract: "Rate limiting").
    pub async fn admit(&self, identity: &Identity) -> Result<Grant, LimitError> {
        self.admit_folding(identity, None).await
    }

    /// As [`Limiter::admit`]; when the (product, user) decision is made in Redis and
    /// admits, the same call makes `folded`'s budget reservation, and the grant carries
    /// its answer (none when the decision was made in memory).
    pub async fn admit_folding(&self, identity: &Identity, folded: Option<&Folded>) -> Result<Grant, LimitError> {
        if let Some(client) = &identity.client
            && let Some(limits) = self.settings.clients.get(&**client)
        {
            self.decide(&Key::Client(Arc::clone(client)), limits, None)
                .await
                .0
                .into_result()?;
        }
        let limits = self.settings.for_product(&identity.product);
        let key = Key::User {
            product: Arc::clone(&identity.product),
            user: Arc::clone(&identity.user),
        };
        let (decision, answer) = self.decide(&key, &limits, folded).await;
        let mut grant = decision.into_result()?;
        grant.folded = answer;
        Ok(grant)
    }

    async fn decide(&self, key: &Key, limits: &Limits, folded: Option<&Folded>) -> (Decision, Option<FoldedAnswer>) {
        if let Some(redis) = &self.redis {
            let now = unix_seconds(self.clock.unix_micros());
            let days = self.days.days_at(now).pair_near(now);
            // Boxed: a Redis call's future is large, and without Redis it is never made.
            if let Some(decided) = Box::pin(redis.decide(key, limits, days, folded)).await {
                metrics::limiter_decision(decided.0.outcome.label(), "redis");
                return decided;
            }
        }
        // Read after any Redis attempt: a fallback decides at the time it is made.
        let now_us = self.clock.unix_micros();
        let today = self.days.days_at(unix_seconds(now_us)).today;
        let decision = self.memory.decide(key, limits, now_us, &today);
        metrics::limiter_decision(decision.outcome.label(), "memory");
        (decision, None)
    }
}

fn unix_seconds(unix_micros: u64) -> i64 {
    i64::try_from(unix_micros / 1_000_000).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;
    use std::num::{NonZeroU32, NonZeroU64};

    use super::*;
    use crate::clock::ManualClock;

    /// 2024-05-01T23:59:00Z.
    const LATE: u64 = (19_844 * 86_400 + 86_340) * 1_000_000;

    fn limits(capacity: u32, rate: f64, quota: u64) -> Limits {
        Limits {
            capacity: NonZeroU32::new(capacity).unwrap(),
            refill_per_second: rate,
            daily_quota: NonZeroU64::new(quota).unwrap(),
        }
    }

    fn limiter(user: Limits, client: Limits) -> (Limiter, Arc<ManualClock>) {
        let settings = LimitSettings {
            default: user,
            products: HashMap::new(),
            clients: HashMap::from([("desk".to_owned(), client)]),
        };
        let clock = ManualClock::at(Duration::from_micros(LATE));
        (Limiter::with_clock(&settings, None, clock.clock()), clock)
    }

    fn identity(user: &str, client: Option<&str>) -> Identity {
        Identity {
            product: Arc::from("demo"),
            user: user.into(),
            client: client.map(Arc::from),
        }
    }

    #[tokio::test]
    async fn a_client_bucket_is_shared_by_its_users_and_decides_first() {
        let (limiter, _) = limiter(limits(1, 0.001, 100), limits(2, 0.001, 100));
        let a = identity("a", Some("desk"));
        let b = identity("b", Some("desk"));
        let grant = limiter.admit(&a).await.unwrap();
        // The (product, user) bucket's figures on success.
        assert_eq!((grant.headers.limit, grant.headers.remaining), (1, 0));
        // a's own bucket refuses, after the client's admitted: the client unit is spent.
        let Err(LimitError::RateLimited { headers, .. }) = limiter.admit(&a).await else {
            panic!("a's bucket is empty");
        };
        assert_eq!(headers.limit, 1);
        // The client's bucket is now empty: b is refused by it, with its figures.
        let Err(LimitError::RateLimited { headers, .. }) = limiter.admit(&b).await else {
            panic!("the client's bucket is empty");
        };
        assert_eq!((headers.limit, headers.remaining), (2, 0));
        // Without the client, b has its own full bucket.
        assert!(limiter.admit(&identity("b", None)).await.is_ok());
    }

    #[tokio::test]
    async fn a_client_refusal_takes_nothing_from_the_user() {
        let (limiter, clock) = limiter(limits(2, 1.0, 100), limits(1, 1.0, 100));
        let a = identity("a", Some("desk"));
        assert!(limiter.admit(&a).await.is_ok());
        assert!(limiter.admit(&a).await.is_err());
        assert!(limiter.admit(&a).await.is_err());
        // Not through the client: the user's bucket lost only the one admitted token.
        let grant = limiter.admit(&identity("a", None)).await.unwrap();
        assert_eq!(grant.headers.remaining, 0);
        clock.advance(Duration::from_secs(1));
        assert!(limiter.admit(&a).await.is_ok());
    }

    #[tokio::test]
    async fn the_daily_quota_answers_with_the_time_until_utc_midnight() {
        let (limiter, clock) = limiter(limits(5, 1.0, 1), limits(5, 1.0, 100));
        let a = identity("a", None);
        assert!(limiter.admit(&a).await.is_ok());
        let refusal = limiter.admit(&a).await.unwrap_err();
        let LimitError::DailyQuotaExceeded { retry_after, .. } = refusal else {
            panic!("quota, got {refusal:?}");
        };
        assert_eq!(retry_after, Duration::from_secs(60));
        let mut headers = HeaderMap::new();
        refusal.write_headers(&mut headers);
        assert_eq!(headers["retry-after"], "60");
        assert_eq!(headers["x-ratelimit-limit-requests"], "5");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "4");
        assert_eq!(headers["x-ratelimit-reset-requests"], "1s");
        clock.advance(Duration::from_secs(60));
        assert!(limiter.admit(&a).await.is_ok());
    }

    /// Unix seconds of a UTC date and time.
    fn utc(y: i16, mo: i8, d: i8, h: i8, mi: i8, s: i8) -> u64 {
        let ts = jiff::civil::date(y, mo, d)
            .at(h, mi, s, 0)
            .to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second();
        u64::try_from(ts).unwrap()
    }

    /// A limiter with a daily quota of one in `zone`, its clock at `at` (unix seconds).
    fn quota_of_one(zone: &str, at: u64) -> (Limiter, Arc<ManualClock>) {
        let settings = LimitSettings {
            default: limits(100, 100.0, 1),
            products: HashMap::new(),
            clients: HashMap::new(),
        };
        let clock = ManualClock::at(Duration::from_secs(at));
        let limiter = Limiter::with_clock(&settings, None, clock.clock()).with_day_zone(DayZone::new(zone).unwrap());
        (limiter, clock)
    }

    /// The `Retry-After` header of a `daily_quota_exceeded` refusal.
    async fn quota_retry_after(limiter: &Limiter, who: &Identity) -> String {
        let refusal = limiter.admit(who).await.unwrap_err();
        assert!(matches!(refusal, LimitError::DailyQuotaExceeded { .. }), "{refusal:?}");
        let mut headers = HeaderMap::new();
        refusal.write_headers(&mut headers);
        headers["retry-after"].to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_tokyo_day_ends_at_15_00_utc() {
        let (limiter, clock) = quota_of_one("Asia/Tokyo", utc(2026, 12, 7, 14, 0, 0));
        let (a, b) = (identity("a", None), identity("b", None));
        assert!(limiter.admit(&a).await.is_ok());
        // Midnight in Tokyo is an hour away (UTC's would be ten).
        assert_eq!(quota_retry_after(&limiter, &a).await, "3600");
        clock.advance(Duration::from_secs(3599));
        // A quota used up at 14:59:59 UTC...
        assert!(limiter.admit(&b).await.is_ok());
        assert_eq!(quota_retry_after(&limiter, &b).await, "1");
        assert_eq!(quota_retry_after(&limiter, &a).await, "1");
        // ...is back at 15:00:00 UTC, for both.
        clock.advance(Duration::from_secs(1));
        assert!(limiter.admit(&b).await.is_ok());
        assert!(limiter.admit(&a).await.is_ok());
        // And the new Tokyo day lasts until 15:00 UTC the next day, across UTC's midnight.
        assert_eq!(quota_retry_after(&limiter, &a).await, "86400");
        clock.advance(Duration::from_secs(10 * 3600));
        assert_eq!(quota_retry_after(&limiter, &a).await, "50400");
    }

    #[tokio::test]
    async fn new_york_days_of_23_and_25_hours_end_at_local_midnight() {
        // 2026-03-08 has 23 hours (05:00 UTC to 04:00 UTC the next day).
        let (limiter, clock) = quota_of_one("America/New_York", utc(2026, 3, 9, 3, 0, 0));
        let a = identity("a", None);
        assert!(limiter.admit(&a).await.is_ok());
        assert_eq!(quota_retry_after(&limiter, &a).await, "3600");
        clock.advance(Duration::from_secs(3600));
        assert!(limiter.admit(&a).await.is_ok(), "a new day at 00:00 EDT");

        // 2026-11-01 has 25 hours (04:00 UTC to 05:00 UTC the next day).
        let (limiter, clock) = quota_of_one("America/New_York", utc(2026, 11, 1, 4, 0, 0));
        assert!(limiter.admit(&a).await.is_ok());
        assert_eq!(quota_retry_after(&limiter, &a).await, "90000");
        clock.advance(Duration::from_secs(90_000 - 1));
        assert_eq!(quota_retry_after(&limiter, &a).await, "1");
        clock.advance(Duration::from_secs(1));
        assert!(limiter.admit(&a).await.is_ok(), "a new day at 00:00 EST");
    }

    #[test]
    fn durations_use_openai_form() {
        assert_eq!(openai_duration(Duration::from_millis(350)), "350ms");
        assert_eq!(openai_duration(Duration::from_millis(0)), "0ms");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_millis(1200)), "2s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
