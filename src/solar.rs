//! The sun: a clear-sky-shaped daily curve, shared by the simulator's PV and the planner's
//! default PV forecast.

use chrono::{Datelike, NaiveDateTime, Timelike};

/// Clear-sky-like irradiance, 0–1, for a local time at mid-northern latitude.
pub fn clear_sky(local: NaiveDateTime) -> f64 {
    let doy = f64::from(local.ordinal());
    let day_len_h = 12.0 + 4.0 * (2.0 * std::f64::consts::PI * (doy - 80.0) / 365.0).sin();
    let noon_h = 13.0;
    let h = f64::from(local.hour())
        + f64::from(local.minute()) / 60.0
        + f64::from(local.second()) / 3600.0;
    let x = (h - (noon_h - day_len_h / 2.0)) / day_len_h;
    if (0.0..=1.0).contains(&x) {
        (std::f64::consts::PI * x).sin().powf(1.5)
    } else {
        0.0
    }
}
