//! PV forecasts from weather services, in the JSON the free services publish:
//!
//! - **Open-Meteo** (`/v1/forecast?...&hourly=shortwave_radiation,diffuse_radiation,
//!   direct_normal_irradiance`): hourly global, diffuse and direct-normal irradiance, each the
//!   mean of the hour before its time stamp, in the time zone the response names
//!   (`utc_offset_seconds`). They go onto the site's arrays with the same transposition as the
//!   clear sky (`sky`).
//! - **forecast.solar** (`/estimate/...`): `result.watts`, the array's power at local times.
//!
//! Parsing is pure (text in, AC power at instants out); fetching lives at the edge
//! ([`fetch`]). A forecast is used while it is fresh; steps it does not cover, and every step
//! once it is stale or the fetch failed, fall back to the clear sky × the learnt correction.

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Deserialize;

use crate::sky::{extra_radiation, plane_of_array, sun_at, Array, ClearSky, Place};

/// Which service's format a forecast is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    OpenMeteo,
    ForecastSolar,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::OpenMeteo => "Open-Meteo",
            Service::ForecastSolar => "forecast.solar",
        }
    }
}

/// A parsed forecast: the site's PV AC power at instants, and when it was fetched.
#[derive(Debug, Clone, PartialEq)]
pub struct WeatherForecast {
    pub service: Service,
    pub fetched_at: DateTime<Utc>,
    pub points: Vec<(DateTime<Utc>, f64)>,
}

impl WeatherForecast {
    /// PV at `t`, between the two points around it; `None` outside the forecast.
    pub fn at(&self, t: DateTime<Utc>) -> Option<f64> {
        let after = self.points.iter().position(|(p, _)| *p >= t)?;
        let (t1, w1) = self.points[after];
        if t1 == t {
            return Some(w1);
        }
        let (t0, w0) = *self.points.get(after.checked_sub(1)?)?;
        let share = (t - t0).num_seconds() as f64 / (t1 - t0).num_seconds().max(1) as f64;
        Some(w0 + (w1 - w0) * share)
    }
}

#[derive(Deserialize)]
struct OpenMeteo {
    #[serde(default)]
    utc_offset_seconds: i32,
    hourly: OpenMeteoHourly,
}

#[derive(Deserialize)]
struct OpenMeteoHourly {
    time: Vec<String>,
    shortwave_radiation: Vec<Option<f64>>,
    diffuse_radiation: Vec<Option<f64>>,
    direct_normal_irradiance: Vec<Option<f64>>,
}

#[derive(Deserialize)]
struct ForecastSolar {
    result: ForecastSolarResult,
}

#[derive(Deserialize)]
struct ForecastSolarResult {
    watts: std::collections::BTreeMap<String, f64>,
}

/// The site's PV (W) at instants from a service's response.
pub fn parse(
    service: Service,
    body: &str,
    place: Place,
    arrays: &[(Array, f64)],
    tz: Tz,
) -> Result<Vec<(DateTime<Utc>, f64)>, String> {
    let points = match service {
        Service::OpenMeteo => open_meteo(body, place, arrays)?,
        Service::ForecastSolar => forecast_solar(body, tz)?,
    };
    if points.is_empty() {
        return Err(format!("{} response has no values", service.as_str()));
    }
    Ok(points)
}

fn open_meteo(
    body: &str,
    place: Place,
    arrays: &[(Array, f64)],
) -> Result<Vec<(DateTime<Utc>, f64)>, String> {
    let r: OpenMeteo =
        serde_json::from_str(body).map_err(|e| format!("Open-Meteo response: {e}"))?;
    let h = &r.hourly;
    let n = h.time.len();
    if [
        h.shortwave_radiation.len(),
        h.diffuse_radiation.len(),
        h.direct_normal_irradiance.len(),
    ]
    .iter()
    .any(|l| *l != n)
    {
        return Err("Open-Meteo response: series of different lengths".into());
    }
    let offset = chrono::FixedOffset::east_opt(r.utc_offset_seconds)
        .ok_or("Open-Meteo response: utc_offset_seconds out of range")?;
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let local = NaiveDateTime::parse_from_str(&h.time[k], "%Y-%m-%dT%H:%M")
            .map_err(|e| format!("Open-Meteo time `{}`: {e}", h.time[k]))?;
        let stamp = offset
            .from_local_datetime(&local)
            .single()
            .ok_or("Open-Meteo time not in its offset")?
            .with_timezone(&Utc);
        let (Some(ghi), Some(dhi), Some(dni)) = (
            h.shortwave_radiation[k],
            h.diffuse_radiation[k],
            h.direct_normal_irradiance[k],
        ) else {
            continue;
        };
        // Each value is the mean of the hour before its stamp: it stands for the middle.
        let mid = stamp - chrono::Duration::minutes(30);
        let w = match sun_at(place, mid).filter(|s| s.zenith_deg < 90.0) {
            Some(sun) => {
                let sky = ClearSky { ghi, dni, dhi };
                let extra = extra_radiation(mid);
                arrays
                    .iter()
                    .map(|(a, limit)| {
                        (plane_of_array(sun, sky, extra, a) * a.kwp * (1.0 - a.losses_pct / 100.0))
                            .min(*limit)
                    })
                    .sum()
            }
            None => 0.0,
        };
        out.push((mid, w.max(0.0)));
    }
    Ok(out)
}

fn forecast_solar(body: &str, tz: Tz) -> Result<Vec<(DateTime<Utc>, f64)>, String> {
    let r: ForecastSolar =
        serde_json::from_str(body).map_err(|e| format!("forecast.solar response: {e}"))?;
    let mut out = Vec::with_capacity(r.result.watts.len());
    for (stamp, w) in &r.result.watts {
        let local = NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S")
            .map_err(|e| format!("forecast.solar time `{stamp}`: {e}"))?;
        // Times are the site's local time; in the repeated autumn hour take the first.
        let t = tz
            .from_local_datetime(&local)
            .earliest()
            .ok_or_else(|| format!("forecast.solar time `{stamp}` does not exist in {tz}"))?;
        out.push((t.with_timezone(&Utc), w.max(0.0)));
    }
    out.sort_by_key(|p| p.0);
    Ok(out)
}

/// Fetch a forecast's text from a URL (`http://`, `https://`) or a file path, within 10 s.
pub async fn fetch(from: &str) -> Result<String, String> {
    if !(from.starts_with("http://") || from.starts_with("https://")) {
        return tokio::fs::read_to_string(from)
            .await
            .map_err(|e| format!("{from}: {e}"));
    }
    crate::tls_ready();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let r = client
        .get(from)
        .send()
        .await
        .map_err(|e| format!("{from}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("{from}: HTTP {}", r.status()));
    }
    r.text().await.map_err(|e| format!("{from}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn between_points_the_forecast_is_interpolated_and_outside_it_is_absent() {
        let t0 = Utc.with_ymd_and_hms(2026, 6, 21, 10, 0, 0).unwrap();
        let f = WeatherForecast {
            service: Service::ForecastSolar,
            fetched_at: t0,
            points: vec![(t0, 1000.0), (t0 + chrono::Duration::hours(1), 3000.0)],
        };
        assert_eq!(f.at(t0 + chrono::Duration::minutes(30)), Some(2000.0));
        assert_eq!(f.at(t0), Some(1000.0));
        assert_eq!(f.at(t0 - chrono::Duration::minutes(1)), None);
        assert_eq!(f.at(t0 + chrono::Duration::minutes(61)), None);
    }

    #[test]
    fn forecast_solar_times_are_the_sites_local_time() {
        let body =
            r#"{"result": {"watts": {"2026-06-21 12:00:00": 5000, "2026-06-21 13:00:00": 4000}}}"#;
        let p = forecast_solar(body, chrono_tz::Europe::London).unwrap();
        assert_eq!(p[0].0, Utc.with_ymd_and_hms(2026, 6, 21, 11, 0, 0).unwrap());
        assert_eq!(p[0].1, 5000.0);
    }
}
