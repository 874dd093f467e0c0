//! A line's `time`: RFC 3339 in UTC with microseconds (`2024-05-01T12:34:56.789012Z`),
//! the text tracing-subscriber's `SystemTime` writes, without running `core::fmt` digit by
//! digit on every line: each thread formats the date and time up to the second once a
//! second and keeps it, and a line adds only its six sub-second digits.

use std::cell::RefCell;
use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    /// The last second this thread formatted, and its text up to the decimal point.
    static PREFIX: RefCell<Option<(i64, String)>> = const { RefCell::new(None) };
}

/// Writes `now` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (microseconds, truncated).
pub(super) fn write_rfc3339(out: &mut impl Write, now: SystemTime) -> fmt::Result {
    let (second, nanos) = unix_time(now);
    let cached = PREFIX.try_with(|cell| {
        let mut cell = cell.try_borrow_mut().ok()?;
        if cell.as_ref().is_none_or(|(cached, _)| *cached != second) {
            let mut prefix = cell.take().map(|(_, prefix)| prefix).unwrap_or_default();
            prefix.clear();
            write_prefix(&mut prefix, second).ok()?;
            *cell = Some((second, prefix));
        }
        cell.as_ref().map(|(_, prefix)| out.write_str(prefix))
    });
    match cached {
        Ok(Some(written)) => written?,
        // Only while the thread's locals are being destroyed.
        _ => write_prefix(out, second)?,
    }
    let mut digits = *b"000000Z";
    let mut micros = nanos / 1_000;
    for digit in digits[..6].iter_mut().rev() {
        *digit = b"0123456789"[(micros % 10) as usize];
        micros /= 10;
    }
    out.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
}

/// Seconds since the epoch (negative before it) and the nanoseconds after that second.
fn unix_time(now: SystemTime) -> (i64, u32) {
    match now.duration_since(UNIX_EPOCH) {
        Ok(since) => (i64::try_from(since.as_secs()).unwrap_or(i64::MAX), since.subsec_nanos()),
        Err(error) => {
            let before = error.duration();
            let seconds = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            match before.subsec_nanos() {
                0 => (-seconds, 0),
                nanos => (-seconds - 1, 1_000_000_000 - nanos),
            }
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` of `second`, years outside 0..=9999 as tracing-subscriber
/// writes them (`+10000`, `-0001`).
fn write_prefix(out: &mut impl Write, second: i64) -> fmt::Result {
    let (year, month, day) = civil_from_days(second.div_euclid(86_400));
    let time = second.rem_euclid(86_400);
    if year > 9999 {
        write!(out, "+{year}")?;
    } else if year < 0 {
        write!(out, "{year:05}")?;
    } else {
        write!(out, "{year:04}")?;
    }
    write!(
        out,
        "-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
        time / 3600,
        time / 60 % 60,
        time % 60
    )
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`: eras of 400 years that start on March 1st).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::FormatTime;

    use super::*;

    fn at(seconds: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(seconds, nanos)
    }

    fn text(time: SystemTime) -> String {
        let mut out = String::new();
        write_rfc3339(&mut out, time).expect("write to a String");
        out
    }

    #[test]
    fn known_instants_are_written_as_rfc3339_with_microseconds() {
        for (time, expected) in [
            (at(0, 0), "1970-01-01T00:00:00.000000Z"),
            (at(951_782_400, 1_999), "2000-02-29T00:00:00.000001Z"),
            (at(951_868_799, 999_999_999), "2000-02-29T23:59:59.999999Z"),
            (at(1_709_251_199, 120_000_000), "2024-02-29T23:59:59.120000Z"),
            (at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z"),
            (at(253_402_300_799, 5_000), "9999-12-31T23:59:59.000005Z"),
            (at(253_402_300_800, 0), "+10000-01-01T00:00:00.000000Z"),
            (UNIX_EPOCH - Duration::from_millis(500), "1969-12-31T23:59:59.500000Z"),
        ] {
            assert_eq!(text(time), expected);
        }
    }

    #[test]
    fn the_cached_second_is_replaced_when_the_second_changes() {
        // Across a second boundary, then back: each line has its own second.
        assert_eq!(text(at(1_764_078_775, 999_999_000)), "2025-11-25T13:52:55.999999Z");
        assert_eq!(text(at(1_764_078_776, 1_000)), "2025-11-25T13:52:56.000001Z");
        assert_eq!(text(at(1_764_078_776, 500_000_000)), "2025-11-25T13:52:56.500000Z");
        assert_eq!(text(at(1_764_078_775, 0)), "2025-11-25T13:52:55.000000Z");
        // Across midnight at the end of a year.
        assert_eq!(text(at(1_767_225_599, 0)), "2025-12-31T23:59:59.000000Z");
        assert_eq!(text(at(1_767_225_600, 0)), "2026-01-01T00:00:00.000000Z");
    }

    #[test]
    fn the_text_is_tracing_subscribers_for_the_same_second() {
        // tracing-subscriber reads the clock itself: retry when a second began in between.
        for _ in 0..10 {
            let mut theirs = String::new();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .expect("format");
            let ours = text(SystemTime::now());
            if ours[..20] == theirs[..20] {
                assert_eq!(ours.len(), theirs.len(), "{ours} {theirs}");
                assert!(ours.ends_with('Z'));
                return;
            }
        }
        panic!("never the same second as tracing-subscriber");
    }

    /// The date of `days` after 1970-01-01, counted year by year and month by month.
    fn counted_date(mut days: i64) -> (i64, i64, i64) {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let mut year = 1970;
        while days >= if leap(year) { 366 } else { 365 } {
            days -= if leap(year) { 366 } else { 365 };
            year += 1;
        }
        let mut month = 1;
        for length in [
            31,
            if leap(year) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ] {
            if days < length {
                break;
            }
            days -= length;
            month += 1;
        }
        (year, month, days + 1)
    }

    proptest! {
        #[test]
        fn dates_agree_with_counting_days(days in 0i64..2_932_897) {
            prop_assert_eq!(civil_from_days(days), counted_date(days));
        }
    }
}
