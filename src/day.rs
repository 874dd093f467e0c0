//! The day in `DAY_TIMEZONE`: which day a moment belongs to, when that day starts and
//! ends, and how long until the next one (the `Retry-After` of daily quotas and budgets).
//!
//! Time zones come from the IANA database compiled into the binary (jiff's bundled
//! tzdb), so the answer is the same in a distroless image without `/usr/share/zoneinfo`.
//! This module never reads the clock: callers pass the wall-clock time, so tests control it.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

/// Moments are clamped to this range (years 1970 to about 5138) so that every
/// conversion below is defined; no real clock reads outside it.
const MIN_SECONDS: i64 = 0;
const MAX_SECONDS: i64 = 100_000_000_000;

/// `DAY_TIMEZONE` is not a zone of the IANA database. Holds no part of the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected an IANA time zone name such as \"Asia/Tokyo\" or \"UTC\"")]
pub struct UnknownZone;

/// The zone whose midnight starts a new day (`DAY_TIMEZONE`).
#[derive(Clone)]
pub struct DayZone {
    tz: TimeZone,
    name: String,
}

impl fmt::Debug for DayZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DayZone").field(&self.name).finish()
    }
}

/// One day in a [`DayZone`]: `[start, end)` in unix seconds. Its length is 23, 24 or 25
/// hours (or another length on the days a zone changes its offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Day {
    date: Date,
    /// Unix seconds of the day's first instant.
    pub start: i64,
    /// Unix seconds of the next day's first instant.
    pub end: i64,
}

impl Day {
    /// The day as `2026-12-07`: the day part of keys and of the operator's views.
    pub fn key(&self) -> String {
        self.date.to_string()
    }

    /// True when the moment `unix_seconds` belongs to this day.
    pub fn contains(&self, unix_seconds: i64) -> bool {
        (self.start..self.end).contains(&unix_seconds)
    }
}

/// A day and its two neighbours: where a decision taken on another clock (Redis's) may
/// fall when it is made within seconds of midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Days {
    pub previous: Day,
    pub today: Day,
    pub next: Day,
}

impl Days {
    /// The two consecutive days around the nearer of today's two midnights: `(previous,
    /// today)` in the first half of today, else `(today, next)`. A clock that differs
    /// from ours by less than half a day reads `unix_seconds` in one of the two.
    pub fn pair_near(&self, unix_seconds: i64) -> (Day, Day) {
        if unix_seconds - self.today.start < self.today.end - unix_seconds {
            (self.previous, self.today)
        } else {
            (self.today, self.next)
        }
    }
}

impl DayZone {
    /// The zone named `name` (`UTC`, `Asia/Tokyo`, `America/New_York`, ...).
    pub fn new(name: &str) -> Result<Self, UnknownZone> {
        // `TimeZone::get` also accepts things that are not names (POSIX TZ strings are
        // not, but be strict anyway): the contract asks for an IANA zone name.
        if name.is_empty() || name.starts_with(['/', '.']) || name.contains("..") {
            return Err(UnknownZone);
        }
        let tz = TimeZone::get(name).map_err(|_| UnknownZone)?;
        Ok(Self {
            tz,
            name: name.to_owned(),
        })
    }

    /// The default zone, `UTC`.
    pub fn utc() -> Self {
        Self {
            tz: TimeZone::UTC,
            name: "UTC".to_owned(),
        }
    }

    /// The zone's name as configured.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The day that the moment `unix_seconds` belongs to.
    pub fn day_at(&self, unix_seconds: i64) -> Day {
        let ts = timestamp(unix_seconds);
        let date = ts.to_zoned_datetime(self.tz.clone()).date();
        let start = self.start_of(date);
        let end = date.tomorrow().map_or(MAX_SECONDS, |next| self.start_of(next));
        Day { date, start, end }
    }

    /// The day of `unix_seconds` and the days just before and after it.
    pub fn days_at(&self, unix_seconds: i64) -> Days {
        let today = self.day_at(unix_seconds);
        Days {
            previous: self.day_at(today.start - 1),
            today,
            next: self.day_at(today.end),
        }
    }

    /// Time from `unix_seconds` until the next day starts: whole seconds, at least 1 (a
    /// client that waits this long is in the new day).
    pub fn until_next_day(&self, unix_seconds: i64) -> Duration {
        let now = unix_seconds.clamp(MIN_SECONDS, MAX_SECONDS);
        let end = self.day_at(now).end;
        Duration::from_secs(u64::try_from(end - now).unwrap_or(1).max(1))
    }

    /// Unix seconds of the first instant of `date` (midnight, or the first moment after
    /// it where a zone skips midnight).
    fn start_of(&self, date: Date) -> i64 {
        date.to_zoned_datetime(self.tz.clone())
            .and_then(|z| z.start_of_day())
            .map_or(MAX_SECONDS, |z| z.timestamp().as_second())
    }
}

/// A [`DayZone`] that remembers the days it last computed: a new day starts once a day,
/// while the time-zone arithmetic would otherwise run on every decision. The lock is held
/// for a copy (and once a day for the arithmetic), never across an `.await`.
#[derive(Debug)]
pub struct DayCache {
    zone: DayZone,
    last: Mutex<Option<Days>>,
}

impl DayCache {
    pub fn new(zone: DayZone) -> Self {
        Self {
            zone,
            last: Mutex::new(None),
        }
    }

    pub fn zone(&self) -> &DayZone {
        &self.zone
    }

    /// As [`DayZone::days_at`].
    pub fn days_at(&self, unix_seconds: i64) -> Days {
        let mut last = crate::lock::lock(&self.last);
        match *last {
            Some(days) if days.today.contains(unix_seconds) => days,
            _ => {
                let days = self.zone.days_at(unix_seconds);
                *last = Some(days);
                days
            }
        }
    }
}

fn timestamp(unix_seconds: i64) -> Timestamp {
    Timestamp::from_second(unix_seconds.clamp(MIN_SECONDS, MAX_SECONDS)).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn utc(y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        jiff::civil::date(y, mo, d)
            .at(h, mi, 0, 0)
            .to_zoned_datetime(TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second()
    }

    #[test]
    fn utc_days_start_at_midnight_utc() {
        let zone = DayZone::utc();
        let day = zone.day_at(utc(2026, 12, 7, 13, 30));
        assert_eq!(day.key(), "2026-12-07");
        assert_eq!(day.start, utc(2026, 12, 7, 0, 0));
        assert_eq!(day.end, utc(2026, 12, 8, 0, 0));
        assert_eq!(zone.until_next_day(utc(2026, 12, 7, 23, 59)), Duration::from_secs(60));
    }

    #[test]
    fn a_tokyo_day_starts_at_15_00_utc() {
        let zone = DayZone::new("Asia/Tokyo").unwrap();
        assert_eq!(zone.day_at(utc(2026, 12, 7, 14, 59)).key(), "2026-12-07");
        let day = zone.day_at(utc(2026, 12, 7, 15, 0));
        assert_eq!(day.key(), "2026-12-08");
        assert_eq!(day.start, utc(2026, 12, 7, 15, 0));
        assert_eq!(day.end - day.start, 86_400);
        assert_eq!(zone.until_next_day(utc(2026, 12, 7, 14, 0)), Duration::from_secs(3600));
    }

    #[test]
    fn new_york_has_a_23_hour_and_a_25_hour_day() {
        let zone = DayZone::new("America/New_York").unwrap();
        // 2026-03-08: clocks go forward at 02:00 EST.
        let spring = zone.day_at(utc(2026, 3, 8, 12, 0));
        assert_eq!(spring.key(), "2026-03-08");
        assert_eq!(spring.start, utc(2026, 3, 8, 5, 0));
        assert_eq!(spring.end - spring.start, 23 * 3600);
        // 2026-11-01: clocks go back at 02:00 EDT.
        let autumn = zone.day_at(utc(2026, 11, 1, 12, 0));
        assert_eq!(autumn.start, utc(2026, 11, 1, 4, 0));
        assert_eq!(autumn.end - autumn.start, 25 * 3600);
        assert_eq!(
            zone.until_next_day(utc(2026, 11, 1, 4, 0)),
            Duration::from_secs(25 * 3600)
        );
    }

    #[test]
    fn a_day_that_skips_midnight_starts_at_its_first_instant() {
        // America/Santiago moved to summer time at 24:00 on 2024-09-07: 2024-09-08 has no
        // 00:00 and starts at 01:00 local (04:00 UTC).
        let zone = DayZone::new("America/Santiago").unwrap();
        let day = zone.day_at(utc(2024, 9, 8, 12, 0));
        assert_eq!(day.key(), "2024-09-08");
        assert_eq!(day.start, utc(2024, 9, 8, 4, 0));
        assert_eq!(zone.day_at(day.start - 1).key(), "2024-09-07");
    }

    #[test]
    fn the_last_second_of_a_day_waits_one_second() {
        let zone = DayZone::new("Asia/Tokyo").unwrap();
        let day = zone.day_at(utc(2026, 6, 1, 0, 0));
        assert_eq!(zone.until_next_day(day.end - 1), Duration::from_secs(1));
        assert_eq!(zone.day_at(day.end).start, day.end);
    }

    #[test]
    fn names_that_are_not_iana_zones_are_refused() {
        for bad in [
            "",
            "Mars/Olympus",
            "JST-9",
            "/etc/localtime",
            "../../etc/passwd",
            "Asia/Tokio",
        ] {
            assert_eq!(DayZone::new(bad).err(), Some(UnknownZone), "{bad}");
        }
        assert_eq!(DayZone::new("UTC").unwrap().name(), "UTC");
        assert!(DayZone::new("Europe/Paris").is_ok());
    }

    #[test]
    fn neighbours_touch_and_the_pair_is_around_the_nearer_midnight() {
        let zone = DayZone::new("America/New_York").unwrap();
        // Noon of the 25-hour day: its first half ends at 12:30 local.
        let days = zone.days_at(utc(2026, 11, 1, 16, 0));
        assert_eq!(days.previous.key(), "2026-10-31");
        assert_eq!(days.next.key(), "2026-11-02");
        assert_eq!(days.previous.end, days.today.start);
        assert_eq!(days.today.end, days.next.start);
        assert_eq!(days.pair_near(days.today.start + 3600), (days.previous, days.today));
        assert_eq!(days.pair_near(days.today.end - 3600), (days.today, days.next));
    }

    #[test]
    fn the_cache_answers_as_the_zone_does_across_days() {
        let zone = DayZone::new("Asia/Tokyo").unwrap();
        let cache = DayCache::new(zone.clone());
        let start = utc(2026, 12, 7, 14, 0);
        for step in 0..200 {
            let now = start + step * 1799;
            assert_eq!(cache.days_at(now), zone.days_at(now), "{now}");
        }
        // Back in time too.
        assert_eq!(cache.days_at(start), zone.days_at(start));
    }

    #[test]
    fn moments_outside_any_clock_are_clamped_not_panicking() {
        let zone = DayZone::new("Asia/Tokyo").unwrap();
        let _ = zone.day_at(i64::MIN);
        let _ = zone.day_at(i64::MAX);
        let _ = DayCache::new(zone.clone()).days_at(i64::MIN);
        let _ = zone.days_at(i64::MAX);
        assert!(zone.until_next_day(i64::MAX) >= Duration::from_secs(1));
    }
}
