//! Learning from the site: how much of the clear sky its PV really makes, by hour of day.
//!
//! Over the last days of stored history, each local hour's measured PV is summed against the
//! clear sky's for the same hours; their ratio corrects the clear-sky forecast for that hour.
//! Recent days stand for the season (the sun's path and the weather of the time of year);
//! shading that only some hours see (a chimney, a tree) shows up as those hours' ratio. Hours
//! whose clear sky is under 2 % of the day's highest teach nothing and keep factor 1.

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;

/// Least number of stored minutes an hour needs to count.
const MIN_MINUTES: u32 = 30;
/// The correction never promises more than this share of the clear sky.
const MAX_FACTOR: f64 = 1.2;

#[derive(Debug, Clone, PartialEq)]
pub struct Correction {
    /// Measured ÷ clear sky, per local hour; `None` where nothing was learnt.
    pub by_hour: [Option<f64>; 24],
    /// Hours of history it was learnt from.
    pub hours: u32,
}

impl Correction {
    /// Learn from `hourly` (hour start, mean measured PV in W, minutes stored) against the
    /// clear-sky PV at any instant.
    pub fn learn(
        hourly: &[(DateTime<Utc>, f64, u32)],
        clear_w: impl Fn(DateTime<Utc>) -> f64,
        tz: Tz,
    ) -> Correction {
        let with_clear: Vec<(DateTime<Utc>, f64, f64)> = hourly
            .iter()
            .filter(|(_, _, n)| *n >= MIN_MINUTES)
            .map(|(t, measured, _)| {
                let mid = *t + chrono::Duration::minutes(30);
                (*t, measured.max(0.0), clear_w(mid))
            })
            .collect();
        let brightest = with_clear.iter().map(|x| x.2).fold(0.0, f64::max);
        let mut measured = [0.0; 24];
        let mut clear = [0.0; 24];
        let mut hours = 0;
        for (t, m, c) in with_clear {
            if c <= 0.02 * brightest {
                continue;
            }
            let h = t.with_timezone(&tz).hour() as usize;
            measured[h] += m;
            clear[h] += c;
            hours += 1;
        }
        let mut by_hour = [None; 24];
        for h in 0..24 {
            if clear[h] > 0.0 {
                by_hour[h] = Some((measured[h] / clear[h]).clamp(0.0, MAX_FACTOR));
            }
        }
        Correction { by_hour, hours }
    }

    /// The factor for the local hour of `t` (1 where nothing was learnt).
    pub fn factor(&self, t: DateTime<Utc>, tz: Tz) -> f64 {
        self.by_hour[t.with_timezone(&tz).hour() as usize].unwrap_or(1.0)
    }

    /// The mean of the learnt factors, for the plan's sources line.
    pub fn mean(&self) -> Option<f64> {
        let learnt: Vec<f64> = self.by_hour.iter().flatten().copied().collect();
        (!learnt.is_empty()).then(|| learnt.iter().sum::<f64>() / learnt.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sunny(t: DateTime<Utc>) -> f64 {
        let h = t.hour() as f64 + t.minute() as f64 / 60.0;
        (1000.0 * (std::f64::consts::PI * (h - 6.0) / 12.0).sin()).max(0.0)
    }

    #[test]
    fn a_site_that_makes_half_the_clear_sky_learns_a_half() {
        let start = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
        let hourly: Vec<_> = (0..7 * 24)
            .map(|h| {
                let t = start + chrono::Duration::hours(h);
                (t, 0.5 * sunny(t + chrono::Duration::minutes(30)), 60)
            })
            .collect();
        let c = Correction::learn(&hourly, sunny, chrono_tz::UTC);
        let noon = Utc.with_ymd_and_hms(2026, 6, 9, 12, 10, 0).unwrap();
        assert!((c.factor(noon, chrono_tz::UTC) - 0.5).abs() < 1e-9);
        let night = Utc.with_ymd_and_hms(2026, 6, 9, 2, 0, 0).unwrap();
        assert_eq!(
            c.factor(night, chrono_tz::UTC),
            1.0,
            "nothing learnt at night"
        );
        assert!((c.mean().unwrap() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn hours_with_few_minutes_stored_teach_nothing() {
        let t = Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap();
        let c = Correction::learn(&[(t, 10.0, 5)], sunny, chrono_tz::UTC);
        assert_eq!(c.hours, 0);
        assert_eq!(c.factor(t, chrono_tz::UTC), 1.0);
    }
}
