//! Rate limits: a token bucket and a daily quota per (product, user), and per HMAC
//! client where `CLIENT_LIMITS` names it.
//!
//! One [`Limiter::admit`] call per request decides everything and returns the bucket
//! figures for OpenAI's `x-ratelimit-*` headers.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::auth::Identity;
use crate::settings::LimitSettings;
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

impl RateLimitHeaders {
    pub fn write(&self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit-requests", HeaderValue::from(self.limit));
        headers.insert("x-ratelimit-remaining-requests", HeaderValue::from(self.remaining));
        let reset = openai_duration(self.reset);
        headers.insert(
            "x-ratelimit-reset-requests",
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

/// An admitted request: the headers of the (product, user) bucket.
#[derive(Debug, Clone, Copy)]
pub struct Grant {
    pub headers: RateLimitHeaders,
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

pub struct Limiter {
    settings: LimitSettings,
}

impl Limiter {
    pub fn new(settings: &LimitSettings, _store: Option<Arc<Store>>) -> Self {
        Self {
            settings: settings.clone(),
        }
    }

    /// Admits or refuses one request of `identity`.
    #[allow(clippy::unused_async)] // stub until limits land
    pub async fn admit(&self, identity: &Identity) -> Result<Grant, LimitError> {
        let limits = self.settings.for_product(&identity.product);
        Ok(Grant {
            headers: RateLimitHeaders {
                limit: limits.capacity.get(),
                remaining: limits.capacity.get() - 1,
                reset: Duration::ZERO,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
