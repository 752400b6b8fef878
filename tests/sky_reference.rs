//! The clear-sky PV forecast against pvlib, computed by pvlib's own code in a virtualenv this
//! test makes (pvlib from PyPI): daily energy and peak within 5 % for sites in both
//! hemispheres on both solstices and an equinox, and solar noon within 10 minutes in local
//! time, summer time and winter time alike.

#![cfg(feature = "sim")]

mod common;

use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};
use site_ems::sky::{clear_sky_ac_w, sun_at, Array, Place};

/// Debian's python3 with a virtualenv holding pvlib, made on first use.
fn pvlib_python() -> PathBuf {
    common::reference::venv_python("pvlib-venv", "pvlib", "pvlib")
}

struct Site {
    name: &'static str,
    place: Place,
    tz: Tz,
    arrays: Vec<Array>,
}

fn sites() -> Vec<Site> {
    let facing = |kwp: f64, tilt_deg: f64, azimuth_deg: f64| Array {
        kwp,
        tilt_deg,
        azimuth_deg,
        losses_pct: 14.0,
    };
    vec![
        Site {
            name: "London",
            place: Place {
                latitude_deg: 51.5,
                longitude_deg: -0.12,
                altitude_m: 0.0,
            },
            tz: chrono_tz::Europe::London,
            arrays: vec![facing(80.0, 35.0, 180.0)],
        },
        Site {
            name: "Denver",
            place: Place {
                latitude_deg: 39.74,
                longitude_deg: -104.99,
                altitude_m: 1600.0,
            },
            tz: chrono_tz::America::Denver,
            // East and west roofs.
            arrays: vec![facing(6.0, 20.0, 90.0), facing(6.0, 20.0, 270.0)],
        },
        Site {
            name: "Sydney",
            place: Place {
                latitude_deg: -33.87,
                longitude_deg: 151.21,
                altitude_m: 50.0,
            },
            tz: chrono_tz::Australia::Sydney,
            arrays: vec![facing(10.0, 25.0, 0.0)],
        },
        Site {
            name: "Cape Town",
            place: Place {
                latitude_deg: -33.92,
                longitude_deg: 18.42,
                altitude_m: 20.0,
            },
            tz: chrono_tz::Africa::Johannesburg,
            arrays: vec![facing(30.0, 30.0, 350.0)],
        },
    ]
}

const DAYS: [&str; 3] = ["2026-06-21", "2026-12-21", "2026-03-20"];
const LINKE: f64 = 3.0;

/// Ours, sampled as the reference samples: the middle of each 5 minutes of the local day.
fn ours(site: &Site, day: &str) -> (f64, f64, DateTime<Utc>) {
    let date: NaiveDate = day.parse().unwrap();
    let start = site
        .tz
        .from_local_datetime(&date.and_hms_opt(0, 0, 0).unwrap())
        .single()
        .unwrap()
        .with_timezone(&Utc);
    let (mut kwh, mut peak) = (0.0, 0.0f64);
    for k in 0..288 {
        let t = start + chrono::Duration::seconds(150 + 300 * k);
        let w = clear_sky_ac_w(site.place, &site.arrays, LINKE, t);
        kwh += w / 1000.0 / 12.0;
        peak = peak.max(w);
    }
    // Solar noon: the lowest zenith, to the minute.
    let noon = (0..24 * 60)
        .map(|m| start + chrono::Duration::minutes(m))
        .min_by(|a, b| {
            let z = |t: &DateTime<Utc>| sun_at(site.place, *t).unwrap().zenith_deg;
            z(a).total_cmp(&z(b))
        })
        .unwrap();
    (kwh, peak, noon)
}

fn reference(python: &Path, site: &Site) -> Vec<Value> {
    let input = json!({
        "latitude": site.place.latitude_deg,
        "longitude": site.place.longitude_deg,
        "altitude": site.place.altitude_m,
        "tz": site.tz.name(),
        "linke": LINKE,
        "arrays": site.arrays.iter().map(|a| json!({
            "kwp": a.kwp, "tilt_deg": a.tilt_deg, "azimuth_deg": a.azimuth_deg,
            "losses_pct": a.losses_pct,
        })).collect::<Vec<_>>(),
        "days": DAYS,
    });
    let v = common::reference::answer(python, "tests/reference/clearsky_pvlib.py", &input);
    v.as_array().expect("one object per day").clone()
}

#[test]
fn clear_sky_energy_peak_and_solar_noon_match_pvlib() {
    let python = pvlib_python();
    for site in sites() {
        for r in reference(&python, &site) {
            let day = r["day"].as_str().unwrap();
            let (kwh, peak, noon) = ours(&site, day);
            let (ref_kwh, ref_peak) = (
                r["energy_kwh"].as_f64().unwrap(),
                r["peak_w"].as_f64().unwrap(),
            );
            let transit: DateTime<Utc> = r["transit"].as_str().unwrap().parse().unwrap();
            let off = |a: f64, b: f64| (a - b) / b * 100.0;
            let noon_off_min = (noon - transit).num_seconds().abs() as f64 / 60.0;
            println!(
                "{:<9} {day}: {kwh:8.2} kWh vs {ref_kwh:8.2} ({:+.2} %), peak {peak:8.0} W vs {ref_peak:8.0} ({:+.2} %), noon {} local, {noon_off_min:.1} min off",
                site.name,
                off(kwh, ref_kwh),
                off(peak, ref_peak),
                noon.with_timezone(&site.tz).format("%H:%M %Z"),
            );
            assert!(
                off(kwh, ref_kwh).abs() <= 5.0,
                "{} {day}: energy",
                site.name
            );
            assert!(
                off(peak, ref_peak).abs() <= 5.0,
                "{} {day}: peak",
                site.name
            );
            assert!(noon_off_min <= 10.0, "{} {day}: solar noon", site.name);
        }
    }
}
