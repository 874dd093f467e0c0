//! The shared Redis store behind limits and nonces, and the switch to memory when it is
//! absent, slow or down.

use std::time::Duration;

use crate::settings::RedisSettings;

pub struct Store {}

impl Store {
    /// Starts connecting in the background; never waits for Redis.
    pub fn start(_settings: &RedisSettings) -> Self {
        Self {}
    }

    /// Records `nonce` of `client` for `ttl` if it is new (`SET NX` with expiry).
    /// `Some(true)`: new; `Some(false)`: seen before; `None`: Redis unavailable, the
    /// caller decides in memory instead.
    #[allow(clippy::unused_async)] // stub until the Redis store lands
    pub async fn claim_nonce(&self, _client: &str, _nonce: &str, _ttl: Duration) -> Option<bool> {
        None
    }
}
