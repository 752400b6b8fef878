//! The site's history as the guard loop produces it: one value a cycle, averaged into one
//! row a minute. Pure: the finished minute is handed to the store's writer.

use chrono::{DateTime, Utc};

/// The minute being averaged: its start (unix seconds), the sums and the count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MinuteAverage {
    pending: Option<(i64, [f64; 3], u32)>,
}

impl MinuteAverage {
    /// Add one cycle's load, PV and grid power. Returns the previous minute's average
    /// (minute start, values) when `at` starts a new minute.
    pub fn add(&mut self, at: DateTime<Utc>, values: [f64; 3]) -> Option<(i64, [f64; 3])> {
        let minute = at.timestamp() - at.timestamp().rem_euclid(60);
        match &mut self.pending {
            Some((m, sums, n)) if *m == minute => {
                for (s, v) in sums.iter_mut().zip(values) {
                    *s += v;
                }
                *n += 1;
                None
            }
            _ => {
                let done = self.pending.replace((minute, values, 1))?;
                let (m, sums, n) = done;
                Some((m, sums.map(|s| s / f64::from(n))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_minute_is_averaged_and_handed_over_when_the_next_starts() {
        let t = |s| Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, s).unwrap();
        let mut m = MinuteAverage::default();
        assert_eq!(m.add(t(0), [1.0, 2.0, 3.0]), None);
        assert_eq!(m.add(t(30), [3.0, 4.0, 5.0]), None);
        let next = Utc.with_ymd_and_hms(2026, 1, 1, 10, 1, 0).unwrap();
        let (minute, v) = m.add(next, [0.0; 3]).unwrap();
        assert_eq!(minute, t(0).timestamp());
        assert_eq!(v, [2.0, 3.0, 4.0]);
    }
}
