//! The day in `DAY_TIMEZONE`: which day a moment belongs to, when that day starts and
//! ends, and how long until the next one (the `Retry-After` of daily quotas and budgets).
//!
//! Time zones come from the IANA database compiled into the binary (jiff's bundled
//! tzdb), so the answer is the same in a distroless image without `/usr/share/zoneinfo`.
//! This module never reads the clock: callers pass the wall-clock time, so tests control it.

use std::fmt;
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
    fn moments_outside_any_clock_are_clamped_not_panicking() {
        let zone = DayZone::new("Asia/Tokyo").unwrap();
        let _ = zone.day_at(i64::MIN);
        let _ = zone.day_at(i64::MAX);
        assert!(zone.until_next_day(i64::MAX) >= Duration::from_secs(1));
    }
}
