//! How good the forecasts were: each plan step's PV and load forecast against what the site
//! measured over that step, summed per local day into a mean absolute error and a bias
//! (forecast − measured: positive means the forecast promised too much). Pure: the guard loop
//! feeds it one measurement a cycle.

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::Serialize;

/// One day's score, W.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DayScore {
    pub day: String,
    /// Plan steps scored.
    pub steps: u32,
    pub pv_mae_w: f64,
    pub pv_bias_w: f64,
    pub load_mae_w: f64,
    pub load_bias_w: f64,
}

/// Today so far and the day before, as status shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ForecastQuality {
    pub today: Option<DayScore>,
    pub yesterday: Option<DayScore>,
}

#[derive(Debug, Clone, Default)]
struct Tally {
    steps: u32,
    pv_abs: f64,
    pv_err: f64,
    load_abs: f64,
    load_err: f64,
}

impl Tally {
    fn score(&self, day: NaiveDate) -> Option<DayScore> {
        let n = f64::from(self.steps);
        (self.steps > 0).then(|| DayScore {
            day: day.to_string(),
            steps: self.steps,
            pv_mae_w: self.pv_abs / n,
            pv_bias_w: self.pv_err / n,
            load_mae_w: self.load_abs / n,
            load_bias_w: self.load_err / n,
        })
    }
}

/// The step being measured.
#[derive(Debug, Clone)]
struct Open {
    start: DateTime<Utc>,
    forecast_pv_w: f64,
    forecast_load_w: f64,
    pv_sum: f64,
    load_sum: f64,
    samples: u32,
}

/// A step counts when at least this share of its cycles were measured.
const MIN_COVERAGE: f64 = 0.5;

#[derive(Debug, Clone, Default)]
pub struct ForecastScore {
    open: Option<Open>,
    day: Option<NaiveDate>,
    today: Tally,
    yesterday: Option<DayScore>,
}

/// What a cycle saw: the plan step in force (its start and forecasts) and the site's measured
/// PV and load, when the grid meter was fresh.
pub struct Cycle {
    pub step_start: Option<DateTime<Utc>>,
    pub forecast_pv_w: f64,
    pub forecast_load_w: f64,
    pub measured: Option<(f64, f64)>,
    /// Cycles a step holds, for the coverage rule.
    pub cycles_per_step: f64,
}

impl ForecastScore {
    pub fn observe(&mut self, c: &Cycle, tz: Tz) {
        let same = matches!((&self.open, c.step_start), (Some(o), Some(s)) if o.start == s);
        if !same {
            if let Some(done) = self.open.take() {
                self.close(done, c.cycles_per_step, tz);
            }
            self.open = c.step_start.map(|start| Open {
                start,
                forecast_pv_w: c.forecast_pv_w,
                forecast_load_w: c.forecast_load_w,
                pv_sum: 0.0,
                load_sum: 0.0,
                samples: 0,
            });
        }
        if let (Some(o), Some((pv, load))) = (self.open.as_mut(), c.measured) {
            o.pv_sum += pv;
            o.load_sum += load;
            o.samples += 1;
        }
    }

    fn close(&mut self, o: Open, cycles_per_step: f64, tz: Tz) {
        if f64::from(o.samples) < MIN_COVERAGE * cycles_per_step || o.samples == 0 {
            return;
        }
        let day = o.start.with_timezone(&tz).date_naive();
        if self.day != Some(day) {
            if let Some(prev) = self.day {
                self.yesterday = self.today.score(prev);
            }
            self.today = Tally::default();
            self.day = Some(day);
        }
        let n = f64::from(o.samples);
        let pv_err = o.forecast_pv_w - o.pv_sum / n;
        let load_err = o.forecast_load_w - o.load_sum / n;
        let t = &mut self.today;
        t.steps += 1;
        t.pv_abs += pv_err.abs();
        t.pv_err += pv_err;
        t.load_abs += load_err.abs();
        t.load_err += load_err;
    }

    pub fn quality(&self) -> ForecastQuality {
        ForecastQuality {
            today: self.day.and_then(|d| self.today.score(d)),
            yesterday: self.yesterday.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn run(
        score: &mut ForecastScore,
        start: DateTime<Utc>,
        forecast: (f64, f64),
        measured: (f64, f64),
    ) {
        for _ in 0..900 {
            score.observe(
                &Cycle {
                    step_start: Some(start),
                    forecast_pv_w: forecast.0,
                    forecast_load_w: forecast.1,
                    measured: Some(measured),
                    cycles_per_step: 900.0,
                },
                chrono_tz::UTC,
            );
        }
    }

    #[test]
    fn errors_sum_per_day_into_mae_and_bias() {
        let mut s = ForecastScore::default();
        let t0 = Utc.with_ymd_and_hms(2026, 6, 21, 10, 0, 0).unwrap();
        let q = chrono::Duration::minutes(15);
        run(&mut s, t0, (5000.0, 2000.0), (4000.0, 2500.0));
        run(&mut s, t0 + q, (5000.0, 2000.0), (6000.0, 2500.0));
        // The second step closes when the third begins.
        run(&mut s, t0 + q * 2, (0.0, 0.0), (0.0, 0.0));
        let today = s.quality().today.unwrap();
        assert_eq!(today.steps, 2);
        assert_eq!(today.pv_mae_w, 1000.0);
        assert_eq!(today.pv_bias_w, 0.0);
        assert_eq!(today.load_mae_w, 500.0);
        assert_eq!(today.load_bias_w, -500.0);
        // A new day moves today to yesterday.
        run(
            &mut s,
            t0 + chrono::Duration::days(1),
            (0.0, 0.0),
            (0.0, 0.0),
        );
        run(
            &mut s,
            t0 + chrono::Duration::days(1) + q,
            (0.0, 0.0),
            (0.0, 0.0),
        );
        let q2 = s.quality();
        assert_eq!(q2.yesterday.unwrap().steps, 3);
        assert_eq!(q2.today.unwrap().steps, 1);
    }

    #[test]
    fn a_step_mostly_unmeasured_is_not_scored() {
        let mut s = ForecastScore::default();
        let t0 = Utc.with_ymd_and_hms(2026, 6, 21, 10, 0, 0).unwrap();
        for k in 0..900 {
            s.observe(
                &Cycle {
                    step_start: Some(t0),
                    forecast_pv_w: 1.0,
                    forecast_load_w: 1.0,
                    measured: (k < 100).then_some((0.0, 0.0)),
                    cycles_per_step: 900.0,
                },
                chrono_tz::UTC,
            );
        }
        run(
            &mut s,
            t0 + chrono::Duration::minutes(15),
            (0.0, 0.0),
            (0.0, 0.0),
        );
        assert_eq!(s.quality().today, None);
    }
}
