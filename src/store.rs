//! The shared Redis store behind limits and nonces, and the switch to memory when it is
//! absent, slow or down.

use crate::settings::RedisSettings;

pub struct Store {}

impl Store {
    /// Starts connecting in the background; never waits for Redis.
    pub fn start(_settings: &RedisSettings) -> Self {
        Self {}
    }
}
