//! Rules a parsed site file must satisfy: value ranges, references between sections, and
//! the wiring rules of SAJ's configuration guide (docs/design.md §1).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use super::{
    ConfigError, GridLimitConfig, LinkKind, Locator, MeterModel, MeterRole, OnStop, PathSeg,
    SiteConfig, WorkingMode,
};
use crate::path;

/// Most inverters one EMS controls over the LAN.
pub(super) const MAX_LAN_INVERTERS: usize = 10;
/// Most inverters on the EMS's RS485 pairs together.
pub(super) const MAX_RS485_INVERTERS: usize = 6;
/// Most inverters on one RS485 A/B pair.
pub(super) const MAX_PER_RS485_PAIR: usize = 2;
/// RS485 A/B pairs on the EMS.
pub(super) const MAX_RS485_PAIRS: usize = 3;
/// Grid-side meter address, fixed by the vendor.
pub(super) const GRID_METER_ADDRESS: u8 = 1;
/// PV/AC-coupled-side meter address, fixed by the vendor.
pub(super) const PV_METER_ADDRESS: u8 = 2;

const BAUD_RATES: [u32; 8] = [1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200];

struct Report<'a> {
    file: &'a str,
    locator: &'a Locator,
    errors: Vec<ConfigError>,
}

impl Report<'_> {
    fn err(&mut self, at: Vec<PathSeg>, message: impl Into<String>, hint: impl Into<String>) {
        let (line, col) = self.locator.locate(&at);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            col,
            message: message.into(),
            hint: hint.into(),
        });
    }
}

pub(super) fn validate(c: &SiteConfig, locator: &Locator, file: &str) -> Vec<ConfigError> {
    let mut r = Report {
        file,
        locator,
        errors: Vec::new(),
    };
    site_and_grid(c, &mut r);
    limits(c, &mut r);
    control_and_mode(c, &mut r);
    links(c, &mut r);
    meters(c, &mut r);
    inverters(c, &mut r);
    topology(c, &mut r);
    planner(c, &mut r);
    dr(c, &mut r);
    simulation(c, &mut r);
    fail_safe_budget(c, &mut r);
    r.errors
}

/// A number that must be finite and within `lo..=hi`: NaN and infinities fail every range.
fn in_range(r: &mut Report, at: Vec<PathSeg>, name: &str, v: f64, lo: f64, hi: f64, hint: &str) {
    if !(v.is_finite() && (lo..=hi).contains(&v)) {
        r.err(at, format!("{name} {v} is outside {lo}–{hi}"), hint);
    }
}

/// G100: export back under the limit within 5 s of the meter's last good reading. The worst
/// case is the fail-safe delay, plus the cycle that notices it, plus a read that waits for
/// its whole timeout first.
const FAIL_SAFE_BUDGET_S: f64 = 5.0;

fn fail_safe_budget(c: &SiteConfig, r: &mut Report) {
    let Some(meter) = c.grid_meter() else {
        return;
    };
    let timeout_s = c
        .link(&meter.link)
        .map_or(0.0, |l| l.timeout_ms() as f64 / 1000.0);
    let cycle_s = c.control.cycle_ms as f64 / 1000.0;
    let worst = c.control.fail_safe_after_s + cycle_s + timeout_s;
    if worst > FAIL_SAFE_BUDGET_S + 1e-9 {
        r.err(
            path!["control", "fail_safe_after_s"],
            format!(
                "a lost grid meter could go unanswered for {worst:.2} s (fail_safe_after_s {} + cycle {cycle_s} s + meter link timeout {timeout_s} s), more than {FAIL_SAFE_BUDGET_S} s",
                c.control.fail_safe_after_s
            ),
            "lower fail_safe_after_s, control.cycle_ms or the meter link's timeout_ms so they add up to 5 s at most",
        );
    }
}

fn simulation(c: &SiteConfig, r: &mut Report) {
    let s = &c.simulation;
    for (field, v, lo, hi) in [
        ("time_factor", s.time_factor, 0.0, 10_000.0),
        ("base_load_w", s.base_load_w, 0.0, 1.0e7),
        ("peak_load_w", s.peak_load_w, 0.0, 1.0e7),
        ("load_noise_pct", s.load_noise_pct, 0.0, 100.0),
        ("pv_peak_ratio", s.pv_peak_ratio, 0.0, 10.0),
        ("ac_pv_peak_w", s.ac_pv_peak_w, 0.0, 1.0e7),
        ("cloudiness", s.cloudiness, 0.0, 1.0),
        ("initial_soc_pct", s.initial_soc_pct, 0.0, 100.0),
        ("ramp_pct_per_s", s.ramp_pct_per_s, 0.0, 1000.0),
    ] {
        in_range(
            r,
            path!["simulation", field],
            field,
            v,
            lo,
            hi,
            "give a finite value in the range shown",
        );
    }
    for (k, v) in s.load_phase_shares.iter().enumerate() {
        in_range(
            r,
            path!["simulation", "load_phase_shares", k],
            "a load phase share",
            *v,
            0.0,
            1.0,
            "give each phase's share of the load, 0–1",
        );
    }
    for (k, f) in s.wiring_faults.iter().enumerate() {
        let at = path!["simulation", "wiring_faults", k];
        match f {
            super::WiringFault::CtReversed { meter, .. }
            | super::WiringFault::MeterReversed { meter } => {
                if !c.meters.iter().any(|m| &m.id == meter) {
                    r.err(
                        at,
                        format!("wiring fault on meter `{meter}`, which the site does not have"),
                        "name a meter id from `meters:`",
                    );
                }
            }
            super::WiringFault::WrongPhase { inverter, .. } => {
                match c.inverters.iter().find(|i| &i.id == inverter) {
                    None => r.err(
                        at,
                        format!(
                            "wiring fault on inverter `{inverter}`, which the site does not have"
                        ),
                        "name an inverter id from `inverters:`",
                    ),
                    Some(i) if i.ac_phases().len() != 1 => r.err(
                        at,
                        format!(
                            "`{inverter}` is a three-phase unit: it cannot be on a wrong phase"
                        ),
                        "use wrong_phase with a single-phase unit (`phase: L1`)",
                    ),
                    Some(_) => {}
                }
            }
        }
    }
}

fn level_limits(r: &mut Report, at: Vec<PathSeg>, l: &crate::dr::LevelLimits) {
    for (field, v) in [
        ("export_limit_w", l.export_limit_w),
        ("import_limit_w", l.import_limit_w),
    ] {
        if let Some(v) = v {
            let mut p = at.clone();
            p.push(PathSeg::Key(field.into()));
            in_range(
                r,
                p,
                field,
                v,
                0.0,
                1.0e7,
                "give a power between 0 and 10 000 000 W",
            );
        }
    }
}

/// Whoever can publish on the events topic commands the site: the broker must know who it
/// is (credentials) and nobody may listen in or inject on the way (TLS).
fn mqtt_authority(r: &mut Report, m: &super::MqttConfig) {
    if !m.insecure {
        let missing: Vec<&str> = [
            ("ca_file", m.ca_file.is_none()),
            ("username", m.username.is_none()),
            ("password_env", m.password_env.is_none()),
        ]
        .into_iter()
        .filter_map(|(name, absent)| absent.then_some(name))
        .collect();
        if !missing.is_empty() {
            r.err(
                path!["dr", "mqtt"],
                format!(
                    "MQTT without TLS and credentials lets anyone on the broker command the site ({} missing)",
                    missing.join(", ")
                ),
                "give ca_file, username and password_env, or `insecure: true` on a closed test network",
            );
        }
    }
    let topic_safe = |s: &str| !s.is_empty() && !s.contains(['+', '#', '/']);
    for (k, g) in m.groups.iter().enumerate() {
        if !topic_safe(g) {
            r.err(
                path!["dr", "mqtt", "groups", k],
                format!("group `{g}` is not a topic level"),
                "use letters, digits, `-` or `_`, without `/`, `+` or `#`",
            );
        }
    }
    if m.site_id.as_deref().is_some_and(|s| !topic_safe(s)) {
        r.err(
            path!["dr", "mqtt", "site_id"],
            "site_id is not a topic level",
            "use letters, digits, `-` or `_`, without `/`, `+` or `#`",
        );
    }
}

/// What `ems check` should point out without refusing the file.
pub(super) fn warnings(c: &SiteConfig, locator: &Locator, file: &str) -> Vec<ConfigError> {
    let mut r = Report {
        file,
        locator,
        errors: Vec::new(),
    };
    if let Some(m) = c.dr.as_ref().and_then(|d| d.mqtt.as_ref()) {
        if m.insecure {
            r.err(
                path!["dr", "mqtt", "insecure"],
                "MQTT is insecure: anyone who can reach the broker can put this site in DRM0 or lift its limits",
                "use TLS (ca_file) and credentials (username, password_env) outside a closed test network",
            );
        }
    }
    r.errors
}

fn dr(c: &SiteConfig, r: &mut Report) {
    let Some(d) = &c.dr else {
        return;
    };
    for (k, l) in d.openadr_levels.iter().enumerate() {
        level_limits(r, path!["dr", "openadr_levels", k], l);
    }
    if let Some(m) = &d.mqtt {
        in_range(
            r,
            path!["dr", "mqtt", "heartbeat_s"],
            "heartbeat_s",
            m.heartbeat_s,
            1.0,
            86_400.0,
            "give the seconds the link may be down before the fallback applies, e.g. 60",
        );
        in_range(
            r,
            path!["dr", "mqtt", "telemetry_s"],
            "telemetry_s",
            m.telemetry_s,
            0.1,
            86_400.0,
            "give the seconds between telemetry messages, e.g. 10",
        );
        level_limits(r, path!["dr", "mqtt", "fallback"], &m.fallback);
        mqtt_authority(r, m);
    }
    if d.max_events == 0 || d.max_events > 100_000 {
        r.err(
            path!["dr", "max_events"],
            format!("max_events {} is outside 1–100000", d.max_events),
            "allow a few hundred events in the book, e.g. 200",
        );
    }
    if d.max_events_per_min == 0 || d.max_events_per_min > 100_000 {
        r.err(
            path!["dr", "max_events_per_min"],
            format!(
                "max_events_per_min {} is outside 1–100000",
                d.max_events_per_min
            ),
            "allow about one event a second, e.g. 60",
        );
    }
    let Some(k) = d.contacts.as_ref() else {
        return;
    };
    link_ref_ok(c, r, path!["dr", "contacts", "link"], &k.link);
    unit_id_ok(r, path!["dr", "contacts", "unit_id"], k.unit_id);
    if k.drm_inputs.is_none() && k.ripple_inputs.is_none() {
        r.err(
            path!["dr", "contacts"],
            "the contact module has no inputs",
            "give `drm_inputs` (9 addresses) and/or `ripple_inputs` (4)",
        );
    } else if k.spans_more_than(2000) {
        r.err(
            path!["dr", "contacts"],
            "contact addresses span more than 2000 inputs",
            "keep them within one FC02 read",
        );
    }
}

fn pv_arrays(c: &SiteConfig, p: &super::PlannerConfig, r: &mut Report) {
    let f = &p.pv_forecast;
    if !f.arrays.is_empty() && c.site.location.is_none() {
        r.err(
            path!["planner", "pv_forecast", "arrays"],
            "PV arrays need the site's location",
            "add `location: { latitude: .., longitude: .. }` under `site`",
        );
    }
    if let Some(l) = &c.site.location {
        let at = |f: &str| path!["site", "location", f];
        in_range(
            r,
            at("latitude"),
            "latitude",
            l.latitude,
            -90.0,
            90.0,
            "degrees north, e.g. 51.5",
        );
        in_range(
            r,
            at("longitude"),
            "longitude",
            l.longitude,
            -180.0,
            180.0,
            "degrees east, e.g. -0.12",
        );
        in_range(
            r,
            at("altitude_m"),
            "altitude_m",
            l.altitude_m,
            -500.0,
            9000.0,
            "metres above sea level",
        );
    }
    if let Some(w) = &f.weather {
        let at = |field: &str| path!["planner", "pv_forecast", "weather", field];
        if f.arrays.is_empty() {
            r.err(
                path!["planner", "pv_forecast", "weather"],
                "a weather forecast needs the PV arrays",
                "describe the arrays (kwp, tilt_deg, azimuth_deg): irradiance goes onto them",
            );
        }
        in_range(
            r,
            at("refresh_min"),
            "refresh_min",
            w.refresh_min,
            5.0,
            1440.0,
            "fetch hourly: 60",
        );
        in_range(
            r,
            at("stale_after_h"),
            "stale_after_h",
            w.stale_after_h,
            0.5,
            168.0,
            "use a forecast up to 6 h old",
        );
        if w.url.trim().is_empty() {
            r.err(
                at("url"),
                "the weather forecast has no url",
                "give an https:// URL or a file path",
            );
        }
    }
    if f.learn_days > 365 {
        r.err(
            path!["planner", "pv_forecast", "learn_days"],
            format!("learn_days {} is more than a year", f.learn_days),
            "two weeks (14) follow the season; 0 turns learning off",
        );
    }
    if let Some(t) = f.linke_turbidity {
        let at = path!["planner", "pv_forecast", "linke_turbidity"];
        in_range(
            r,
            at,
            "linke_turbidity",
            t,
            1.0,
            10.0,
            "clean air is about 2, hazy 5; 3 suits most places",
        );
    }
    for (k, a) in f.arrays.iter().enumerate() {
        let at = |field: &str| path!["planner", "pv_forecast", "arrays", k, field];
        in_range(
            r,
            at("kwp"),
            "kwp",
            a.kwp,
            0.01,
            100_000.0,
            "the array's peak DC power in kW",
        );
        in_range(
            r,
            at("tilt_deg"),
            "tilt_deg",
            a.tilt_deg,
            0.0,
            90.0,
            "0 is flat, 90 vertical",
        );
        in_range(
            r,
            at("azimuth_deg"),
            "azimuth_deg",
            a.azimuth_deg,
            0.0,
            360.0,
            "clockwise from north: 180 faces south",
        );
        in_range(
            r,
            at("losses_pct"),
            "losses_pct",
            a.losses_pct,
            0.0,
            60.0,
            "14 suits most systems",
        );
        if let Some(w) = a.ac_limit_w {
            in_range(
                r,
                at("ac_limit_w"),
                "ac_limit_w",
                w,
                1.0,
                1.0e8,
                "the inverters' AC rating in W",
            );
        }
    }
}

fn planner(c: &SiteConfig, r: &mut Report) {
    let Some(p) = &c.planner else {
        return;
    };
    if !(0.25..=168.0).contains(&p.horizon_h) {
        r.err(
            path!["planner", "horizon_h"],
            format!("horizon {} h is outside 0.25–168 h", p.horizon_h),
            "plan up to 7 days ahead, e.g. 24",
        );
    }
    if ![5, 10, 15, 30, 60].contains(&p.step_min) {
        r.err(
            path!["planner", "step_min"],
            format!("step of {} min is not supported", p.step_min),
            "use 5, 10, 15, 30 or 60",
        );
    }
    if !(1.0..=1440.0).contains(&p.replan_min) {
        r.err(
            path!["planner", "replan_min"],
            format!("replan_min {} is outside 1–1440", p.replan_min),
            "re-plan every 15 minutes, say",
        );
    }
    if !(0.01..=600.0).contains(&p.solve_time_limit_s) {
        r.err(
            path!["planner", "solve_time_limit_s"],
            format!(
                "solve_time_limit_s {} is outside 0.01–600",
                p.solve_time_limit_s
            ),
            "give a few seconds, e.g. 5",
        );
    }
    for (field, src) in [
        ("import_price", &p.import_price),
        ("export_price", &p.export_price),
    ] {
        if src.tou.is_some() == src.csv.is_some() {
            r.err(
                path!["planner", field],
                format!("{field} needs exactly one of `tou` or `csv`"),
                "give `tou: {default: 0.30, periods: [...]}` or `csv: prices.csv`",
            );
        }
    }
    for (field, v, lo, hi) in [
        (
            "cycling_cost_per_kwh",
            Some(p.cycling_cost_per_kwh),
            0.0,
            100.0,
        ),
        (
            "soc_penalty_per_kwh",
            Some(p.soc_penalty_per_kwh),
            0.0,
            1.0e6,
        ),
        (
            "terminal_value_per_kwh",
            p.terminal_value_per_kwh,
            -100.0,
            100.0,
        ),
    ] {
        if let Some(v) = v {
            in_range(
                r,
                path!["planner", field],
                field,
                v,
                lo,
                hi,
                "give a finite price per kWh",
            );
        }
    }
    if let Some(w) = p.pv_forecast.peak_w {
        in_range(
            r,
            path!["planner", "pv_forecast", "peak_w"],
            "peak_w",
            w,
            0.0,
            1.0e7,
            "give the PV array's peak AC power in W",
        );
    }
    for (field, src) in [
        ("import_price", &p.import_price),
        ("export_price", &p.export_price),
    ] {
        let Some(t) = &src.tou else { continue };
        let price = "give a finite price per kWh (negative is allowed)";
        in_range(
            r,
            path!["planner", field, "tou", "default"],
            "price",
            t.default,
            -100.0,
            100.0,
            price,
        );
        for (i, per) in t.periods.iter().enumerate() {
            let at = path!["planner", field, "tou", "periods", i, "price"];
            in_range(r, at, "price", per.price, -100.0, 100.0, price);
        }
    }
    let sources = [
        !p.pv_forecast.arrays.is_empty(),
        p.pv_forecast.peak_w.is_some(),
        p.pv_forecast.csv.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        r.err(
            path!["planner", "pv_forecast"],
            "pv_forecast needs exactly one of `arrays`, `peak_w` or `csv`",
            "describe the arrays (kwp, tilt_deg, azimuth_deg) with site.location, or give a CSV series",
        );
    }
    pv_arrays(c, p, r);
    let l = &p.load_forecast;
    if let Some(v) = &l.profile_w {
        if v.len() != 24 || v.iter().any(|x| !x.is_finite() || *x < 0.0) {
            r.err(
                path!["planner", "load_forecast", "profile_w"],
                format!(
                    "profile_w has {} values; it needs 24 hourly loads ≥ 0 W",
                    v.len()
                ),
                "give one value per hour of the day, midnight first",
            );
        }
    }
    // A CSV stands alone; history may fall back on the profile.
    let (profile, csv, history) = (
        l.profile_w.is_some(),
        l.csv.is_some(),
        l.history_weeks.is_some(),
    );
    let ok = if csv {
        !profile && !history
    } else {
        profile || history
    };
    if !ok {
        r.err(
            path!["planner", "load_forecast"],
            "load_forecast needs `profile_w`, `csv` or `history_weeks` (history may fall back on `profile_w`)",
            "give 24 hourly values, a CSV series, or history_weeks with a `store:`",
        );
    }
    if let Some(w) = l.history_weeks {
        if !(1..=52).contains(&w) {
            r.err(
                path!["planner", "load_forecast", "history_weeks"],
                format!("history_weeks {w} is outside 1–52"),
                "use e.g. 4",
            );
        }
        if c.store.is_none() {
            r.err(
                path!["planner", "load_forecast", "history_weeks"],
                "a history forecast needs the store",
                "add `store: { path: ems.sqlite }`",
            );
        }
    }
}

fn site_and_grid(c: &SiteConfig, r: &mut Report) {
    if c.site.name.trim().is_empty() {
        r.err(
            path!["site", "name"],
            "site name is empty",
            "give the site a name",
        );
    }
    if c.grid.phases != 1 && c.grid.phases != 3 {
        r.err(
            path!["grid", "phases"],
            format!("grid phases must be 1 or 3, not {}", c.grid.phases),
            "set `phases: 1` for a single-phase connection or `phases: 3` for three-phase",
        );
    }
    if !(100.0..=480.0).contains(&c.grid.nominal_voltage_v) {
        r.err(
            path!["grid", "nominal_voltage_v"],
            format!(
                "nominal voltage {} V is outside 100–480 V",
                c.grid.nominal_voltage_v
            ),
            "give the phase-to-neutral voltage, e.g. 230",
        );
    }
}

/// The limit's value within physical bounds (its mode and value are checked at parse).
fn check_limit(r: &mut Report, section: &str, limit: GridLimitConfig) {
    match limit {
        GridLimitConfig::TotalPower { limit_w } | GridLimitConfig::PhasePower { limit_w } => {
            if !(0.0..=1.0e7).contains(&limit_w) || limit_w.is_nan() {
                r.err(
                    path![section, "limit_w"],
                    format!("limit_w {limit_w} is out of range"),
                    "give a power between 0 and 10 000 000 W",
                );
            }
        }
        GridLimitConfig::PhaseCurrent { limit_a } => {
            if !(0.0..=10_000.0).contains(&limit_a) || limit_a.is_nan() {
                r.err(
                    path![section, "limit_a"],
                    format!("limit_a {limit_a} is out of range"),
                    "give a current between 0 and 10 000 A",
                );
            }
        }
    }
}

fn limits(c: &SiteConfig, r: &mut Report) {
    check_limit(r, "export_limit", c.export_limit);
    if let Some(i) = c.import_limit {
        check_limit(r, "import_limit", i);
    }
}

fn control_and_mode(c: &SiteConfig, r: &mut Report) {
    if !(200..=10_000).contains(&c.control.cycle_ms) {
        r.err(
            path!["control", "cycle_ms"],
            format!(
                "control cycle {} ms is outside 200–10000 ms",
                c.control.cycle_ms
            ),
            "use 1000 (the default) or any value from 200 to 10000",
        );
    }
    // G100: export must be back under the limit within 5 s of losing the meter.
    if !(0.2..=4.0).contains(&c.control.fail_safe_after_s) {
        r.err(
            path!["control", "fail_safe_after_s"],
            format!(
                "fail_safe_after_s {} is outside 0.2–4 s",
                c.control.fail_safe_after_s
            ),
            "the site must be safe within 5 s of the last meter reading; use 2 (the default)",
        );
    }
    if !(0.2..=60.0).contains(&c.control.stale_after_s) {
        r.err(
            path!["control", "stale_after_s"],
            format!(
                "stale_after_s {} is outside 0.2–60 s",
                c.control.stale_after_s
            ),
            "use 3 (the default)",
        );
    }
    for (field, v, lo, hi, hint) in [
        (
            "grid_margin_w",
            c.control.grid_margin_w,
            0.0,
            10_000.0,
            "use 50 (the default) or 0–10000 W",
        ),
        (
            "ramp_pct_per_s",
            c.control.ramp_pct_per_s,
            0.1,
            1000.0,
            "use 20 (the default) or 0.1–1000 % of rating per second",
        ),
        (
            "deadband_w",
            c.control.deadband_w,
            0.0,
            5000.0,
            "use 50 (the default) or 0–5000 W",
        ),
        (
            "frozen_after_s",
            c.control.frozen_after_s,
            2.0,
            600.0,
            "use 10 (the default) or 2–600 s",
        ),
        (
            "deadband_pct",
            c.control.deadband_pct,
            0.0,
            20.0,
            "use 1 (the default) or 0–20 % of rating",
        ),
        (
            "min_write_interval_s",
            c.control.min_write_interval_s,
            0.0,
            3600.0,
            "use 10 (the default) or 0–3600 s",
        ),
        (
            "direction_dwell_s",
            c.control.direction_dwell_s,
            0.0,
            3600.0,
            "use 30 (the default) or 0–3600 s",
        ),
        (
            "follow_after_s",
            c.control.follow_after_s,
            5.0,
            3600.0,
            "use 30 (the default) or 5–3600 s",
        ),
        (
            "follow_tolerance_pct",
            c.control.follow_tolerance_pct,
            1.0,
            100.0,
            "use 10 (the default) or 1–100 % of rating",
        ),
    ] {
        if !(v.is_finite() && (lo..=hi).contains(&v)) {
            r.err(
                path!["control", field],
                format!("{field} {v} is outside {lo}–{hi}"),
                hint,
            );
        }
    }
    if c.control.follow_after_s <= c.control.min_write_interval_s {
        r.err(
            path!["control", "follow_after_s"],
            format!(
                "follow_after_s {} is not longer than min_write_interval_s {}: a setpoint held back by the write interval would look like a unit not following",
                c.control.follow_after_s, c.control.min_write_interval_s
            ),
            "make follow_after_s longer than min_write_interval_s (defaults 30 and 10)",
        );
    }
    if c.control.on_stop == OnStop::Release && c.store.is_none() {
        r.err(
            path!["control", "on_stop"],
            "`on_stop: release` gives each unit its own settings back, and those must survive a restart",
            "add `store: { path: ems.sqlite }` (they are kept there), or use `on_stop: safe`",
        );
    }
    let w = &c.working_mode;
    if w.mode == WorkingMode::TimeOfUse && w.periods.is_empty() {
        r.err(
            path!["working_mode", "mode"],
            "mode `time_of_use` has no charge or discharge periods",
            "add `periods:` with `kind`, `start` and `end` for each window",
        );
    }
    for (i, p) in w.periods.iter().enumerate() {
        if let Some(pw) = p.power_w {
            if !(pw.is_finite() && pw > 0.0) {
                r.err(
                    path!["working_mode", "periods", i, "power_w"],
                    format!("period power {pw} W must be positive"),
                    "give the fleet battery power for the window in W, or leave it out",
                );
            }
        }
    }
    match w.reserve_soc_pct {
        None if w.mode == WorkingMode::Backup => r.err(
            path!["working_mode", "mode"],
            "mode `backup` needs `reserve_soc_pct`",
            "add `reserve_soc_pct: <percent>`, the SOC kept for outages",
        ),
        Some(s) if !(0.0..=100.0).contains(&s) || s.is_nan() => r.err(
            path!["working_mode", "reserve_soc_pct"],
            format!("reserve_soc_pct {s} is outside 0–100"),
            "give a percentage from 0 to 100",
        ),
        _ => {}
    }
    if c.api.listen.parse::<SocketAddr>().is_err() {
        r.err(
            path!["api", "listen"],
            format!("`{}` is not an address and port", c.api.listen),
            "write it as IP:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080",
        );
    }
}

fn links(c: &SiteConfig, r: &mut Report) {
    let mut seen = HashSet::new();
    for (i, l) in c.links.iter().enumerate() {
        if l.name.trim().is_empty() {
            r.err(
                path!["links", i, "name"],
                "link name is empty",
                "name the link",
            );
        } else if !seen.insert(l.name.as_str()) {
            r.err(
                path!["links", i, "name"],
                format!("link name `{}` is used twice", l.name),
                "give every link its own name",
            );
        }
        match l.kind {
            LinkKind::Tcp => {
                if l.host.as_deref().unwrap_or("").is_empty() {
                    r.err(
                        path!["links", i],
                        format!("tcp link `{}` has no `host`", l.name),
                        "add `host: <IP address or name>` (and `port`, default 502)",
                    );
                }
                for (field, present) in [
                    ("device", l.device.is_some()),
                    ("baud", l.baud.is_some()),
                    ("stop_bits", l.stop_bits.is_some()),
                    ("gap_ms", l.gap_ms.is_some()),
                ] {
                    if present {
                        r.err(
                            path!["links", i, field],
                            format!("`{field}` does not apply to a tcp link"),
                            "remove it, or set `type: rtu` for an RS485 pair",
                        );
                    }
                }
            }
            LinkKind::Rtu => {
                if l.device.as_deref().unwrap_or("").is_empty() {
                    r.err(
                        path!["links", i],
                        format!("rtu link `{}` has no `device`", l.name),
                        "add `device: /dev/ttyUSB0` (the serial port of this RS485 pair)",
                    );
                }
                match l.baud {
                    None => r.err(
                        path!["links", i],
                        format!("rtu link `{}` has no `baud`", l.name),
                        "add `baud: 9600` (or the rate set on the devices)",
                    ),
                    Some(b) if !BAUD_RATES.contains(&b) => r.err(
                        path!["links", i, "baud"],
                        format!("baud rate {b} is not one the devices support"),
                        "use 1200, 2400, 4800, 9600, 19200, 38400, 57600 or 115200",
                    ),
                    _ => {}
                }
                if let Some(s) = l.stop_bits {
                    if s != 1 && s != 2 {
                        r.err(
                            path!["links", i, "stop_bits"],
                            format!("stop_bits {s} must be 1 or 2"),
                            "use 1 (8N1) or 2",
                        );
                    }
                }
                if let Some(g) = l.gap_ms {
                    if !(0.0..=1000.0).contains(&g) {
                        r.err(
                            path!["links", i, "gap_ms"],
                            format!("gap_ms {g} is outside 0–1000 ms"),
                            "leave it out for the Modbus 3.5-character rule, or give e.g. 25",
                        );
                    }
                }
                for (field, present) in [("host", l.host.is_some()), ("port", l.port.is_some())] {
                    if present {
                        r.err(
                            path!["links", i, field],
                            format!("`{field}` does not apply to an rtu link"),
                            "remove it, or set `type: tcp` for a LAN device",
                        );
                    }
                }
            }
        }
        if let Some(t) = l.timeout_ms {
            if !(10..=10_000).contains(&t) {
                r.err(
                    path!["links", i, "timeout_ms"],
                    format!("timeout {t} ms is outside 10–10000 ms"),
                    "leave it out for the default, or give 10–10000",
                );
            }
        }
    }
}

fn unit_id_ok(r: &mut Report, at: Vec<PathSeg>, unit: u8) {
    if !(1..=247).contains(&unit) {
        r.err(
            at,
            format!("unit id {unit} is outside 1–247"),
            "use the Modbus address set on the device (1–247)",
        );
    }
}

fn link_ref_ok(c: &SiteConfig, r: &mut Report, at: Vec<PathSeg>, link: &str) {
    if c.link(link).is_none() {
        let names: Vec<&str> = c.links.iter().map(|l| l.name.as_str()).collect();
        r.err(
            at,
            format!("no link named `{link}`"),
            format!(
                "use one of the links defined under `links:` ({})",
                names.join(", ")
            ),
        );
    }
}

fn meters(c: &SiteConfig, r: &mut Report) {
    let grid_meters: Vec<usize> = (0..c.meters.len())
        .filter(|&i| c.meters[i].role == MeterRole::Grid)
        .collect();
    if grid_meters.is_empty() {
        r.err(
            path!["meters"],
            "no grid meter: the export limit cannot be kept without one",
            "add a meter with `role: grid` at `unit_id: 1`",
        );
    }
    for (role, found) in [
        (MeterRole::Grid, grid_meters.len()),
        (
            MeterRole::Pv,
            c.meters.iter().filter(|m| m.role == MeterRole::Pv).count(),
        ),
    ] {
        if found > 1 {
            let i = c.meters.iter().rposition(|m| m.role == role).unwrap_or(0);
            r.err(
                path!["meters", i, "role"],
                format!(
                    "{found} meters have role `{}`; a site has one",
                    role.as_str()
                ),
                "keep one grid-side meter and at most one PV-side meter",
            );
        }
    }
    let grid_phases = c.grid.phases;
    let first_model = c.meters.first().map(|m| m.model);
    for (i, m) in c.meters.iter().enumerate() {
        link_ref_ok(c, r, path!["meters", i, "link"], &m.link);
        unit_id_ok(r, path!["meters", i, "unit_id"], m.unit_id);
        let want = match m.role {
            MeterRole::Grid => GRID_METER_ADDRESS,
            MeterRole::Pv => PV_METER_ADDRESS,
        };
        // The fixed addresses are the SAJ + Chint convention; a SunSpec meter is where its
        // installer put it.
        if m.model != MeterModel::Sunspec && m.unit_id != want {
            r.err(
                path!["meters", i, "unit_id"],
                format!(
                    "the {}-side meter must be at address {want}, not {}",
                    m.role.as_str(),
                    m.unit_id
                ),
                format!(
                    "set `unit_id: {want}` (the vendor presets the grid meter to 1 and the PV meter to 2; do not change them)"
                ),
            );
        }
        if let Some(phases) = m.model.phases().filter(|&p| p != grid_phases) {
            r.err(
                path!["meters", i, "model"],
                format!(
                    "a {}-phase meter ({}) on a {}-phase grid",
                    phases,
                    m.model.as_str(),
                    grid_phases
                ),
                if grid_phases == 3 {
                    "use `model: dtsu666` on a three-phase grid"
                } else {
                    "use `model: ddsu666` on a single-phase grid"
                },
            );
        } else if first_model
            .and_then(|f| f.phases())
            .zip(m.model.phases())
            .is_some_and(|(a, b)| a != b)
        {
            r.err(
                path!["meters", i, "model"],
                "single-phase and three-phase meters are mixed",
                "use the same meter model for every meter on the site",
            );
        }
    }
}

fn inverters(c: &SiteConfig, r: &mut Report) {
    if c.inverters.is_empty() {
        r.err(
            path!["inverters"],
            "no inverters",
            "list at least one inverter",
        );
    }
    let mut ids: HashSet<&str> = c.meters.iter().map(|m| m.id.as_str()).collect();
    for (i, inv) in c.inverters.iter().enumerate() {
        let at = |f: &str| path!["inverters", i, f];
        if inv.id.trim().is_empty() || !ids.insert(inv.id.as_str()) {
            r.err(
                at("id"),
                format!("device id `{}` is empty or used twice", inv.id),
                "give every inverter and meter its own id",
            );
        }
        link_ref_ok(c, r, at("link"), &inv.link);
        unit_id_ok(r, at("unit_id"), inv.unit_id);
        if !(inv.rated_power_w > 0.0 && inv.rated_power_w <= 100_000.0) {
            r.err(
                at("rated_power_w"),
                format!("rated power {} W is out of range", inv.rated_power_w),
                "give the nameplate AC power in W, e.g. 10000",
            );
        }
        match (inv.phases, inv.phase) {
            (Some(3), None) => {
                if c.grid.phases != 3 {
                    r.err(
                        at("phases"),
                        "a three-phase inverter on a single-phase grid",
                        "set `grid.phases: 3`, or use a single-phase inverter",
                    );
                }
            }
            (Some(3), Some(_)) => r.err(
                at("phase"),
                "a three-phase inverter does not sit on one phase",
                "remove `phase`, or remove `phases: 3` for a single-phase unit",
            ),
            (None | Some(1), p) => {
                if c.grid.phases == 3 && p.is_none() {
                    r.err(
                        path!["inverters", i],
                        format!(
                            "single-phase inverter `{}` on a three-phase grid does not say its phase",
                            inv.id
                        ),
                        "add `phase: L1`, `L2` or `L3`, or `phases: 3` for a three-phase unit",
                    );
                }
                if c.grid.phases == 1 && matches!(p, Some(ph) if ph != super::Phase::L1) {
                    r.err(
                        at("phase"),
                        "a single-phase grid has only L1",
                        "set `phase: L1` or leave it out",
                    );
                }
            }
            (Some(n), _) => r.err(
                at("phases"),
                format!("phases must be 1 or 3, not {n}"),
                "use `phases: 3` or name the single `phase`",
            ),
        }
        let Some(b) = &inv.battery else {
            if inv.model.is_saj() {
                r.err(
                    path!["inverters", i],
                    format!("hybrid inverter `{}` has no `battery`", inv.id),
                    "add its `battery:` (capacity_wh, max_charge_w, max_discharge_w)",
                );
            }
            continue;
        };
        let bat = |f: &str| path!["inverters", i, "battery", f];
        for (field, v) in [
            ("capacity_wh", b.capacity_wh),
            ("max_charge_w", b.max_charge_w),
            ("max_discharge_w", b.max_discharge_w),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 1.0e9) {
                r.err(
                    bat(field),
                    format!("{field} must be positive and finite, not {v}"),
                    "give the battery's rating from its datasheet",
                );
            }
        }
        for (field, v) in [
            ("charge_efficiency", b.charge_efficiency),
            ("discharge_efficiency", b.discharge_efficiency),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                r.err(
                    bat(field),
                    format!("{field} {v} is outside (0, 1]"),
                    "give a fraction, e.g. 0.95",
                );
            }
        }
        if !(0.0..=100.0).contains(&b.soc_min_pct) {
            r.err(
                bat("soc_min_pct"),
                format!("soc_min_pct {} is outside 0–100", b.soc_min_pct),
                "give a percentage",
            );
        }
        if !(0.0..=100.0).contains(&b.soc_max_pct) || b.soc_max_pct <= b.soc_min_pct {
            r.err(
                bat("soc_max_pct"),
                format!(
                    "soc_max_pct {} must be above soc_min_pct {} and at most 100",
                    b.soc_max_pct, b.soc_min_pct
                ),
                "e.g. soc_min_pct: 10, soc_max_pct: 100",
            );
        }
    }
}

fn topology(c: &SiteConfig, r: &mut Report) {
    let kind_of = |link: &str| c.link(link).map(|l| l.kind);
    let lan: Vec<usize> = (0..c.inverters.len())
        .filter(|&i| kind_of(&c.inverters[i].link) == Some(LinkKind::Tcp))
        .collect();
    let rs485: Vec<usize> = (0..c.inverters.len())
        .filter(|&i| kind_of(&c.inverters[i].link) == Some(LinkKind::Rtu))
        .collect();
    if lan.len() > MAX_LAN_INVERTERS {
        r.err(
            path!["inverters", lan[MAX_LAN_INVERTERS]],
            format!(
                "{} inverters on the LAN; one EMS controls at most {MAX_LAN_INVERTERS}",
                lan.len()
            ),
            "split the site between two EMS units, or remove inverters",
        );
    }
    if rs485.len() > MAX_RS485_INVERTERS {
        r.err(
            path!["inverters", rs485[MAX_RS485_INVERTERS]],
            format!(
                "{} inverters on RS485; the EMS takes at most {MAX_RS485_INVERTERS} (three pairs of two)",
                rs485.len()
            ),
            "move inverters to the LAN, or split the site",
        );
    }
    if lan.len() + rs485.len() > MAX_LAN_INVERTERS
        && lan.len() <= MAX_LAN_INVERTERS
        && rs485.len() <= MAX_RS485_INVERTERS
    {
        r.err(
            path!["inverters", MAX_LAN_INVERTERS],
            format!(
                "{} inverters in all; one EMS controls at most {MAX_LAN_INVERTERS}",
                lan.len() + rs485.len()
            ),
            "split the site between two EMS units",
        );
    }

    // Per RS485 pair: at most two inverters, all of one model.
    let mut pairs: Vec<&str> = Vec::new();
    let mut per_pair: HashMap<&str, Vec<usize>> = HashMap::new();
    for &i in &rs485 {
        let link = c.inverters[i].link.as_str();
        if !pairs.contains(&link) {
            pairs.push(link);
        }
        per_pair.entry(link).or_default().push(i);
    }
    if pairs.len() > MAX_RS485_PAIRS {
        let i = per_pair[pairs[MAX_RS485_PAIRS]][0];
        r.err(
            path!["inverters", i, "link"],
            format!(
                "inverters on {} RS485 pairs; the EMS has {MAX_RS485_PAIRS}",
                pairs.len()
            ),
            "put at most two inverters on each of three pairs",
        );
    }
    for link in &pairs {
        let members = &per_pair[link];
        if members.len() > MAX_PER_RS485_PAIR {
            r.err(
                path!["inverters", members[MAX_PER_RS485_PAIR], "link"],
                format!(
                    "{} inverters on RS485 pair `{link}`; a pair takes at most {MAX_PER_RS485_PAIR}",
                    members.len()
                ),
                "move this inverter to another pair (the EMS has three)",
            );
        }
        let model = c.inverters[members[0]].model;
        if let Some(&odd) = members.iter().find(|&&i| c.inverters[i].model != model) {
            r.err(
                path!["inverters", odd, "model"],
                format!(
                    "RS485 pair `{link}` mixes {} and {}",
                    model.as_str(),
                    c.inverters[odd].model.as_str()
                ),
                "put only inverters of one type on a pair",
            );
        }
    }

    // Unit ids are addresses on a link: two devices cannot share one.
    let mut taken: HashMap<(&str, u8), String> = HashMap::new();
    let devices = c
        .meters
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                path!["meters", i, "unit_id"],
                m.link.as_str(),
                m.unit_id,
                &m.id,
            )
        })
        .chain(c.inverters.iter().enumerate().map(|(i, v)| {
            (
                path!["inverters", i, "unit_id"],
                v.link.as_str(),
                v.unit_id,
                &v.id,
            )
        }));
    for (at, link, unit, id) in devices {
        if let Some(first) = taken.get(&(link, unit)) {
            r.err(
                at,
                format!("unit id {unit} on link `{link}` is already used by `{first}`"),
                "give every device on a link its own Modbus address",
            );
        } else {
            taken.insert((link, unit), id.clone());
        }
    }
}
