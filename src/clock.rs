//! The one clock of the time-dependent decisions: JWT time claims, HMAC timestamps, the
//! nonce store's windows and the in-memory limiter's buckets and days.
//!
//! [`Clock`] is a cheap handle on a time source: the system's in production
//! ([`Clock::system`]), or a [`ManualClock`] that a test moves by hand, so tests see a
//! token expire, a nonce window close or a bucket refill without waiting for it. It owns
//! no timers: timeouts and the Redis breaker keep tokio's and the system's time.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the time comes from.
pub trait TimeSource: Send + Sync {
    /// Wall time: since the Unix epoch (UTC).
    fn wall(&self) -> Duration;
    /// A monotonic instant: never steps back.
    fn instant(&self) -> Instant;
}

/// A shared handle on a [`TimeSource`].
#[derive(Clone)]
pub struct Clock(Arc<dyn TimeSource>);

impl Clock {
    /// The system's clocks.
    pub fn system() -> Self {
        Self(Arc::new(System))
    }

    /// A clock reading `source`.
    pub fn new(source: Arc<dyn TimeSource>) -> Self {
        Self(source)
    }

    /// Wall time since the Unix epoch.
    pub fn wall(&self) -> Duration {
        self.0.wall()
    }

    /// Wall time in seconds since the Unix epoch, fractional (as JWT `NumericDate`s are).
    pub fn unix_seconds(&self) -> f64 {
        self.wall().as_secs_f64()
    }

    /// Wall time in whole microseconds since the Unix epoch.
    pub fn unix_micros(&self) -> u64 {
        u64::try_from(self.wall().as_micros()).unwrap_or(u64::MAX)
    }

    /// A monotonic instant.
    pub fn instant(&self) -> Instant {
        self.0.instant()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// The system's clocks. A wall clock before 1970 reads as the epoch; decisions that use
/// it treat a step back as no time passing.
struct System;

impl TimeSource for System {
    fn wall(&self) -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }

    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that starts at the system's time and moves only when [`ManualClock::advance`]
/// says so: both readings move together. For tests.
pub struct ManualClock {
    wall: Duration,
    instant: Instant,
    elapsed_micros: AtomicU64,
}

impl ManualClock {
    /// Stopped at the system's time now.
    pub fn new() -> Arc<Self> {
        Self::at(System.wall())
    }

    /// Stopped at `wall` since the Unix epoch.
    pub fn at(wall: Duration) -> Arc<Self> {
        Arc::new(Self {
            wall,
            instant: Instant::now(),
            elapsed_micros: AtomicU64::new(0),
        })
    }

    /// Moves both readings forward by `by`.
    pub fn advance(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.elapsed_micros.fetch_add(micros, Ordering::SeqCst);
    }

    /// A [`Clock`] reading this one.
    pub fn clock(self: &Arc<Self>) -> Clock {
        Clock(Arc::clone(self) as Arc<dyn TimeSource>)
    }

    fn elapsed(&self) -> Duration {
        Duration::from_micros(self.elapsed_micros.load(Ordering::SeqCst))
    }
}

impl TimeSource for ManualClock {
    fn wall(&self) -> Duration {
        self.wall + self.elapsed()
    }

    fn instant(&self) -> Instant {
        self.instant + self.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_both_readings_together() {
        let manual = ManualClock::at(Duration::from_secs(1_700_000_000));
        let clock = manual.clock();
        let (wall, instant) = (clock.wall(), clock.instant());
        assert_eq!(clock.wall(), wall);
        assert_eq!(clock.instant(), instant);
        manual.advance(Duration::from_millis(1500));
        assert_eq!(clock.wall().checked_sub(wall), Some(Duration::from_millis(1500)));
        assert_eq!(clock.instant() - instant, Duration::from_millis(1500));
        assert!((clock.unix_seconds() - 1_700_000_001.5).abs() < 1e-6);
        assert_eq!(clock.unix_micros(), 1_700_000_001_500_000);
    }

    #[test]
    fn the_system_clock_reads_the_system() {
        let clock = Clock::system();
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let wall = clock.wall();
        assert!(wall.checked_sub(before).is_some_and(|d| d < Duration::from_secs(5)));
    }
}
