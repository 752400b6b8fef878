//! Weekly time windows in the site's timezone: the one matcher behind the guard loop's
//! time-of-use windows and the planner's price periods, so both read a tariff the same way.
//!
//! The midnight rule: a window whose end is at or before its start runs past midnight and
//! belongs to the day it starts on. "Fri 22:00–06:00" is Friday 22:00 to Saturday 06:00; the
//! early hours of Friday belong to Thursday's window, if Thursday has one.
//!
//! Wall-clock time decides. On the night a DST change falls in a window, the window opens and
//! closes at the clock times given, so it lasts an hour less (spring) or more (autumn); in
//! the repeated autumn hour both instants read the same clock time and match alike.

use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc};
use chrono_tz::Tz;
use serde::Deserialize;

/// Minutes in a day; `24:00` is allowed as an end.
const DAY_MIN: u32 = 24 * 60;

/// A time of day, `HH:MM`, 00:00–24:00, parsed once when the site file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct ClockTime(u32);

impl ClockTime {
    pub fn minutes(self) -> u32 {
        self.0
    }

    pub fn from_minutes(m: u32) -> Option<ClockTime> {
        (m <= DAY_MIN).then_some(ClockTime(m))
    }
}

impl std::str::FromStr for ClockTime {
    type Err = String;

    fn from_str(s: &str) -> Result<ClockTime, String> {
        let bad = || format!("`{s}` is not a time of day: write HH:MM, 00:00 to 24:00");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let h: u32 = h.parse().map_err(|_| bad())?;
        let m: u32 = m.parse().map_err(|_| bad())?;
        if (h < 24 && m < 60) || (h == 24 && m == 0) {
            Ok(ClockTime(h * 60 + m))
        } else {
            Err(bad())
        }
    }
}

impl TryFrom<String> for ClockTime {
    type Error = String;

    fn try_from(s: String) -> Result<ClockTime, String> {
        s.parse()
    }
}

/// Days of the week as a bit set: bit 0 = Monday … bit 6 = Sunday.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Days(u8);

impl Days {
    pub const ALL: Days = Days(0x7F);

    /// Days from Monday = 0; an empty list means every day, as in the site file.
    pub fn from_indices(days: impl IntoIterator<Item = u8>) -> Days {
        let bits = days.into_iter().fold(0u8, |m, d| m | (1 << (d % 7)));
        if bits == 0 {
            Days::ALL
        } else {
            Days(bits)
        }
    }

    fn has(self, day_from_monday: u32) -> bool {
        self.0 & (1 << (day_from_monday % 7)) != 0
    }
}

/// A window on some days of the week, from `start` to `end` local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub days: Days,
    pub start: ClockTime,
    pub end: ClockTime,
}

impl Window {
    /// Whether the wall-clock time `local` falls in the window.
    pub fn contains_local(&self, local: NaiveDateTime) -> bool {
        let minute = local.hour() * 60 + local.minute();
        let today = local.weekday().num_days_from_monday();
        let yesterday = (today + 6) % 7;
        let (s, e) = (self.start.0, self.end.0);
        if s < e {
            self.days.has(today) && (s..e).contains(&minute)
        } else {
            // Past midnight: before midnight it is today's window, after it yesterday's.
            (self.days.has(today) && minute >= s) || (self.days.has(yesterday) && minute < e)
        }
    }

    /// Whether the instant `t` falls in the window, read in the site's timezone.
    pub fn contains(&self, t: DateTime<Utc>, tz: Tz) -> bool {
        self.contains_local(t.with_timezone(&tz).naive_local())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn hm(s: &str) -> ClockTime {
        s.parse().unwrap()
    }

    fn window(day: u8, start: &str, end: &str) -> Window {
        Window {
            days: Days::from_indices([day]),
            start: hm(start),
            end: hm(end),
        }
    }

    const NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

    #[test]
    fn times_of_day_parse_strictly() {
        assert_eq!(hm("00:00").minutes(), 0);
        assert_eq!(hm("22:30").minutes(), 1350);
        assert_eq!(hm("24:00").minutes(), 1440);
        for bad in ["24:01", "7:00", "07:60", "0700", "", "ab:cd"] {
            assert!(bad.parse::<ClockTime>().is_err(), "{bad}");
        }
    }

    /// For each weekday D, "D 22:00–06:00" holds from D 22:00 to D+1 06:00 and nowhere
    /// else in the week: not D's own early hours, not D+1's evening.
    #[test]
    fn an_overnight_window_belongs_to_the_day_it_starts_on_for_every_weekday() {
        // 2026-11-23 is a Monday.
        let monday = chrono::NaiveDate::from_ymd_opt(2026, 11, 23).unwrap();
        for day in 0..7u8 {
            let w = window(day, "22:00", "06:00");
            for offset in 0..8i64 {
                let date = monday + chrono::Duration::days(offset);
                let d = (offset % 7) as u8;
                for (h, m) in [
                    (0, 0),
                    (5, 59),
                    (6, 0),
                    (12, 0),
                    (21, 59),
                    (22, 0),
                    (23, 59),
                ] {
                    let local = date.and_hms_opt(h, m, 0).unwrap();
                    let expected = (d == day && h >= 22) || (d == (day + 1) % 7 && h < 6);
                    assert_eq!(
                        w.contains_local(local),
                        expected,
                        "{} 22:00–06:00 at {} {local}",
                        NAMES[day as usize],
                        NAMES[d as usize]
                    );
                }
            }
        }
    }

    #[test]
    fn a_same_day_window_and_a_window_to_midnight() {
        let w = window(2, "10:00", "24:00");
        let wed = chrono::NaiveDate::from_ymd_opt(2026, 11, 25).unwrap();
        assert!(!w.contains_local(wed.and_hms_opt(9, 59, 0).unwrap()));
        assert!(w.contains_local(wed.and_hms_opt(10, 0, 0).unwrap()));
        assert!(w.contains_local(wed.and_hms_opt(23, 59, 0).unwrap()));
        assert!(!w.contains_local(wed.succ_opt().unwrap().and_hms_opt(0, 0, 0).unwrap()));
    }

    /// Minutes of real time the window is open between two UTC instants, minute by minute.
    fn open_minutes(w: &Window, tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
        let mut t = from;
        let mut n = 0;
        while t < to {
            n += i64::from(w.contains(t, tz));
            t += chrono::Duration::minutes(1);
        }
        n
    }

    /// Opens at `opens`, closes at `closes`, and is open `minutes` of real time around them.
    fn assert_open_exactly(
        w: &Window,
        tz: Tz,
        opens: DateTime<Utc>,
        closes: DateTime<Utc>,
        minutes: i64,
    ) {
        let minute = chrono::Duration::minutes(1);
        assert!(!w.contains(opens - minute, tz));
        assert!(w.contains(opens, tz));
        assert!(w.contains(closes - minute, tz));
        assert!(!w.contains(closes, tz));
        let hours = chrono::Duration::hours(3);
        assert_eq!(open_minutes(w, tz, opens - hours, closes + hours), minutes);
    }

    #[test]
    fn overnight_windows_across_both_dst_changes_follow_the_wall_clock() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // Saturday 2026-03-28 22:00 CET to Sunday 06:00 CEST: clocks go 02:00 → 03:00.
        let sat = window(5, "22:00", "06:00");
        let opens = Utc.with_ymd_and_hms(2026, 3, 28, 21, 0, 0).unwrap();
        let closes = Utc.with_ymd_and_hms(2026, 3, 29, 4, 0, 0).unwrap();
        assert_open_exactly(&sat, tz, opens, closes, 7 * 60);

        // Saturday 2026-10-24 22:00 CEST to Sunday 06:00 CET: 02:00–03:00 happens twice.
        let opens = Utc.with_ymd_and_hms(2026, 10, 24, 20, 0, 0).unwrap();
        let closes = Utc.with_ymd_and_hms(2026, 10, 25, 5, 0, 0).unwrap();
        assert_open_exactly(&sat, tz, opens, closes, 9 * 60);

        // A window inside the repeated hour is open during both passes (two hours of real
        // time); a window inside the skipped hour never opens that night.
        let sun = |s, e| window(6, s, e);
        let day = (
            Utc.with_ymd_and_hms(2026, 10, 24, 22, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2026, 10, 25, 22, 0, 0).unwrap(),
        );
        assert_eq!(open_minutes(&sun("02:00", "03:00"), tz, day.0, day.1), 120);
        let day = (
            Utc.with_ymd_and_hms(2026, 3, 28, 23, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2026, 3, 29, 22, 0, 0).unwrap(),
        );
        assert_eq!(open_minutes(&sun("02:00", "03:00"), tz, day.0, day.1), 0);
    }
}
