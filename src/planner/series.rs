//! Time series from CSV files: a header row, then `start,value` rows with an RFC 3339 start
//! (15-minute or hourly). A value holds from its start until the next row's.

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    points: Vec<(DateTime<Utc>, f64)>,
    /// Where the numbers came from, for the plan's report.
    pub source: String,
}

impl Series {
    pub fn read_csv(path: &str) -> Result<Series, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        Series::parse(path, &text)
    }

    pub fn parse(name: &str, text: &str) -> Result<Series, String> {
        let mut points = Vec::new();
        for (i, line) in text.lines().enumerate().skip(1) {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let at = |what: &str| format!("{name}:{}: {what}", i + 1);
            let (start, value) = line
                .split_once(',')
                .ok_or_else(|| at("expected two columns, `start,value`"))?;
            let start = DateTime::parse_from_rfc3339(start.trim())
                .map_err(|e| at(&format!("start `{}` is not RFC 3339 ({e})", start.trim())))?
                .with_timezone(&Utc);
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| at(&format!("value `{}` is not a number", value.trim())))?;
            if !value.is_finite() {
                return Err(at("value is not finite"));
            }
            if points.last().is_some_and(|(t, _)| *t >= start) {
                return Err(at("rows must be in time order"));
            }
            points.push((start, value));
        }
        if points.is_empty() {
            return Err(format!("{name}: no rows after the header"));
        }
        Ok(Series {
            points,
            source: format!("csv {name}"),
        })
    }

    /// The value in force at `t`; `None` before the first row or more than one interval
    /// after the last.
    pub fn at(&self, t: DateTime<Utc>) -> Option<f64> {
        let i = self.points.partition_point(|(s, _)| *s <= t);
        if i == 0 {
            return None;
        }
        let (start, value) = self.points[i - 1];
        if i == self.points.len() {
            let interval = if self.points.len() > 1 {
                self.points[i - 1].0 - self.points[i - 2].0
            } else {
                chrono::Duration::hours(1)
            };
            if t >= start + interval {
                return None;
            }
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hourly_values_hold_for_their_hour_and_errors_name_the_line() {
        let s = Series::parse(
            "p.csv",
            "start,price\n2026-01-01T00:00:00Z,0.1\n2026-01-01T01:00:00Z,-0.05\n",
        )
        .unwrap();
        let t = |h, m| Utc.with_ymd_and_hms(2026, 1, 1, h, m, 0).unwrap();
        use chrono::TimeZone;
        assert_eq!(s.at(t(0, 45)), Some(0.1));
        assert_eq!(s.at(t(1, 59)), Some(-0.05));
        assert_eq!(s.at(t(2, 0)), None);
        let e = Series::parse("p.csv", "start,price\n2026-01-01T00:00:00Z,abc\n").unwrap_err();
        assert_eq!(e, "p.csv:2: value `abc` is not a number");
    }
}
