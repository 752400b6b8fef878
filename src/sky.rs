//! The sky for any place and time: where the sun is, what a clear sky delivers, and what that
//! makes on a tilted PV array. Pure functions; the planner's PV forecast and the simulator's
//! sun both use them, so simulated seasons and forecast errors are real ones.
//!
//! - Sun position: NREL's SPA (the `solar-positioning` crate), with standard refraction
//!   (1013.25 hPa, 12 °C): the apparent zenith.
//! - Clear sky: Ineichen–Perez (2002) with a Linke turbidity (default 3, a climatological
//!   middle for rural Europe; hazier or cleaner air is set per site), Kasten–Young (1989)
//!   air mass and Spencer's (1971) extraterrestrial irradiance.
//! - Onto the array: Hay–Davies (1980) sky diffuse (circumsolar plus isotropic), beam by the
//!   angle of incidence, and ground reflection with an albedo of 0.25.
//! - AC: plane-of-array irradiance / 1000 W/m² × kWp × (1 − losses), clipped at the
//!   inverters' rating by the caller.
//!
//! These are the models pvlib names `ineichen`, `kastenyoung1989`, `spencer` and
//! `haydavies`; tests/sky_reference.rs checks the daily energy, peak and solar noon against
//! pvlib itself.

use chrono::{DateTime, Utc};
use solar_positioning::{Location, RefractionCorrection, SolarPositions};

/// Where the site is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Place {
    pub latitude_deg: f64,
    /// East positive.
    pub longitude_deg: f64,
    pub altitude_m: f64,
}

/// One PV array: its peak power and how it faces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Array {
    pub kwp: f64,
    /// 0 flat, 90 vertical.
    pub tilt_deg: f64,
    /// Clockwise from north: 180 faces south.
    pub azimuth_deg: f64,
    /// Everything between the irradiance and the AC output (soiling, temperature, wiring,
    /// inverter), %.
    pub losses_pct: f64,
}

/// The sun as seen from the site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sun {
    /// Apparent (refracted) zenith angle.
    pub zenith_deg: f64,
    /// Clockwise from north.
    pub azimuth_deg: f64,
}

/// Clear-sky irradiance, W/m².
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClearSky {
    pub ghi: f64,
    pub dni: f64,
    pub dhi: f64,
}

/// A Linke turbidity that suits most sites without local data.
pub const DEFAULT_LINKE_TURBIDITY: f64 = 3.0;
/// Share of irradiance the ground reflects.
const ALBEDO: f64 = 0.25;
const SOLAR_CONSTANT_W_M2: f64 = 1366.1;

fn cosd(x: f64) -> f64 {
    x.to_radians().cos()
}

fn sind(x: f64) -> f64 {
    x.to_radians().sin()
}

/// Where the sun is at `t`. `None` only for coordinates out of range.
pub fn sun_at(place: Place, t: DateTime<Utc>) -> Option<Sun> {
    // ΔT (TT − UT) is about 69 s in the 2020s; a minute off moves the sun by 0.004°.
    let refraction = RefractionCorrection::new(1013.25, 12.0).ok()?;
    let p = SolarPositions::new()
        .at(
            &t,
            Location {
                latitude: place.latitude_deg,
                longitude: place.longitude_deg,
            },
            place.altitude_m,
            69.0,
            Some(refraction),
        )
        .ok()?;
    Some(Sun {
        zenith_deg: p.zenith_angle(),
        azimuth_deg: p.azimuth(),
    })
}

/// Extraterrestrial normal irradiance on the day of `t` (Spencer 1971), W/m².
pub fn extra_radiation(t: DateTime<Utc>) -> f64 {
    use chrono::Datelike;
    let b = 2.0 * std::f64::consts::PI * f64::from(t.ordinal0()) / 365.0;
    let r = 1.00011
        + 0.034221 * b.cos()
        + 0.00128 * b.sin()
        + 0.000719 * (2.0 * b).cos()
        + 0.000077 * (2.0 * b).sin();
    SOLAR_CONSTANT_W_M2 * r
}

/// Relative optical air mass (Kasten and Young 1989); `None` with the sun below the horizon.
pub fn air_mass(zenith_deg: f64) -> Option<f64> {
    (zenith_deg < 90.0)
        .then(|| 1.0 / (cosd(zenith_deg) + 0.50572 * (96.07995 - zenith_deg).powf(-1.6364)))
}

/// Air pressure at `altitude_m` in the standard atmosphere, Pa.
fn pressure_pa(altitude_m: f64) -> f64 {
    100.0 * ((44331.514 - altitude_m) / 11880.516).powf(1.0 / 0.1902632)
}

/// Ineichen–Perez clear-sky irradiance for the sun at `zenith_deg` (apparent).
pub fn ineichen(zenith_deg: f64, altitude_m: f64, linke: f64, dni_extra: f64) -> ClearSky {
    let Some(am) = air_mass(zenith_deg) else {
        return ClearSky::default();
    };
    let am = am * pressure_pa(altitude_m) / 101_325.0;
    let cos_z = cosd(zenith_deg).max(0.0);
    let fh1 = (-altitude_m / 8000.0).exp();
    let fh2 = (-altitude_m / 1250.0).exp();
    let cg1 = 5.09e-5 * altitude_m + 0.868;
    let cg2 = 3.92e-5 * altitude_m + 0.0387;
    let ghi = (cg1 * dni_extra * cos_z * (-cg2 * am * (fh1 + fh2 * (linke - 1.0))).exp()).max(0.0);
    let b = 0.664 + 0.163 / fh1;
    let beam = dni_extra * (b * (-0.09 * am * (linke - 1.0)).exp()).max(0.0);
    // The beam cannot exceed what the global irradiance leaves room for.
    let cap = if cos_z > 0.0 {
        ghi * ((1.0 - (0.1 - 0.2 * (-linke).exp()) / (0.1 + 0.882 / fh1)) / cos_z).max(0.0)
    } else {
        0.0
    };
    let dni = beam.min(cap);
    ClearSky {
        ghi,
        dni,
        dhi: ghi - dni * cos_z,
    }
}

/// Irradiance on the plane of `array` (Hay–Davies sky diffuse), W/m².
pub fn plane_of_array(sun: Sun, sky: ClearSky, dni_extra: f64, array: &Array) -> f64 {
    let cos_incidence = cosd(array.tilt_deg) * cosd(sun.zenith_deg)
        + sind(array.tilt_deg) * sind(sun.zenith_deg) * cosd(sun.azimuth_deg - array.azimuth_deg);
    let beam = (sky.dni * cos_incidence).max(0.0);
    // Beam on the tilt over beam on the ground, the sun kept above 1° for stability.
    let rb = cos_incidence.max(0.0) / cosd(sun.zenith_deg).max(0.01745);
    let anisotropy = if dni_extra > 0.0 {
        sky.dni / dni_extra
    } else {
        0.0
    };
    let circumsolar = (sky.dhi * anisotropy * rb).max(0.0);
    let isotropic = (sky.dhi * (1.0 - anisotropy) * (1.0 + cosd(array.tilt_deg)) / 2.0).max(0.0);
    let ground = sky.ghi * ALBEDO * (1.0 - cosd(array.tilt_deg)) / 2.0;
    beam + circumsolar + isotropic + ground
}

/// Clear-sky AC output of `arrays` at `t`, W, before any inverter clipping.
pub fn clear_sky_ac_w(place: Place, arrays: &[Array], linke: f64, t: DateTime<Utc>) -> f64 {
    let Some(sun) = sun_at(place, t) else {
        return 0.0;
    };
    if sun.zenith_deg >= 90.0 {
        return 0.0;
    }
    let dni_extra = extra_radiation(t);
    let sky = ineichen(sun.zenith_deg, place.altitude_m, linke, dni_extra);
    arrays
        .iter()
        .map(|a| {
            plane_of_array(sun, sky, dni_extra, a) / 1000.0
                * a.kwp
                * 1000.0
                * (1.0 - a.losses_pct / 100.0)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const LONDON: Place = Place {
        latitude_deg: 51.5,
        longitude_deg: -0.12,
        altitude_m: 0.0,
    };

    fn south(kwp: f64) -> Array {
        Array {
            kwp,
            tilt_deg: 35.0,
            azimuth_deg: 180.0,
            losses_pct: 14.0,
        }
    }

    fn day_kwh(place: Place, arrays: &[Array], y: i32, m: u32, d: u32) -> (f64, f64) {
        let start = Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap();
        let (mut kwh, mut peak) = (0.0, 0.0f64);
        for k in 0..288 {
            let t = start + chrono::Duration::minutes(5 * k + 2);
            let w = clear_sky_ac_w(place, arrays, DEFAULT_LINKE_TURBIDITY, t);
            kwh += w / 1000.0 / 12.0;
            peak = peak.max(w);
        }
        (kwh, peak)
    }

    #[test]
    fn summer_days_make_more_than_winter_days_and_night_makes_nothing() {
        let (june, june_peak) = day_kwh(LONDON, &[south(80.0)], 2026, 6, 21);
        let (dec, dec_peak) = day_kwh(LONDON, &[south(80.0)], 2026, 12, 21);
        assert!(
            june > 2.0 * dec,
            "June {june:.0} kWh, December {dec:.0} kWh"
        );
        assert!(dec_peak < 0.6 * june_peak, "{dec_peak} vs {june_peak}");
        let midnight = Utc.with_ymd_and_hms(2026, 6, 21, 0, 0, 0).unwrap();
        assert_eq!(clear_sky_ac_w(LONDON, &[south(80.0)], 3.0, midnight), 0.0);
    }

    #[test]
    fn the_southern_hemisphere_has_its_summer_in_december() {
        let sydney = Place {
            latitude_deg: -33.87,
            longitude_deg: 151.21,
            altitude_m: 0.0,
        };
        let north = Array {
            azimuth_deg: 0.0,
            ..south(10.0)
        };
        let (june, _) = day_kwh(sydney, &[north], 2026, 6, 21);
        let (dec, _) = day_kwh(sydney, &[north], 2026, 12, 21);
        assert!(dec > june, "December {dec:.1} kWh, June {june:.1} kWh");
    }
}
