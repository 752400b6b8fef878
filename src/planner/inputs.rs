//! Planner inputs from the site file: prices (time-of-use periods or CSV), PV and load
//! forecasts (model, profile or CSV), the batteries and the grid connection's limits.
//! Each source says where its numbers came from.

use chrono::{DateTime, Timelike, Utc};
use chrono_tz::Tz;

use super::pv_correction::Correction;
use super::series::Series;
use super::weather::WeatherForecast;
use super::{Battery, PlanInputs, Sources};
use crate::config::{
    GridLimitConfig, LoadForecastConfig, PlannerConfig, PriceSource, PvForecastConfig, SiteConfig,
};
use crate::solar::clear_sky;
use crate::store::Store;

/// Files given on the command line instead of the site file's sources.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub import_csv: Option<String>,
    pub export_csv: Option<String>,
    pub pv_csv: Option<String>,
    pub load_csv: Option<String>,
    pub horizon_h: Option<f64>,
    /// The latest weather forecast fetched (its text and when), or why the fetch failed.
    pub weather: Option<Result<(String, DateTime<Utc>), String>>,
}

enum Source {
    Tou(crate::config::TouTariff),
    Csv(Series),
}

fn price_source(
    p: &PriceSource,
    csv_override: Option<&String>,
) -> Result<(Source, String), String> {
    if let Some(path) = csv_override.or(p.csv.as_ref()) {
        let s = Series::read_csv(path)?;
        let name = s.source.clone();
        return Ok((Source::Csv(s), name));
    }
    match &p.tou {
        Some(t) => Ok((
            Source::Tou(t.clone()),
            "time-of-use periods in the site file".into(),
        )),
        None => Err("no price source".into()),
    }
}

fn tou_price(t: &crate::config::TouTariff, local: chrono::NaiveDateTime) -> f64 {
    t.periods
        .iter()
        .find(|p| p.window().contains_local(local))
        .map_or(t.default, |p| p.price)
}

fn value_at(src: &Source, t: DateTime<Utc>, tz: Tz, what: &str) -> Result<f64, String> {
    match src {
        Source::Tou(tariff) => Ok(tou_price(tariff, t.with_timezone(&tz).naive_local())),
        Source::Csv(s) => s
            .at(t)
            .ok_or_else(|| format!("{}: no {what} for {}", s.source, t.to_rfc3339())),
    }
}

/// Where the PV forecast comes from.
enum PvModel {
    Csv(Series),
    /// The clear sky at the site on each array, clipped at each array's AC limit.
    Sky {
        place: crate::sky::Place,
        arrays: Vec<(crate::sky::Array, f64)>,
        linke: f64,
        /// Learnt from the site's history, when there is some.
        correction: Option<Box<Correction>>,
        /// A fresh weather forecast, used where it covers a step.
        weather: Option<Box<WeatherForecast>>,
    },
    /// A fixed daily curve scaled to a peak.
    Curve(f64),
}

impl PvModel {
    /// The most the model can give, W: what the hybrids' shares are reckoned against.
    fn peak_w(&self) -> f64 {
        match self {
            PvModel::Csv(_) => 0.0,
            PvModel::Sky { arrays, .. } => arrays
                .iter()
                .map(|(a, limit)| (a.kwp * 1000.0).min(*limit))
                .sum(),
            PvModel::Curve(peak) => *peak,
        }
    }

    /// Mean AC power over the step starting at `t`, taken at its middle, and where it came
    /// from.
    fn at(&self, t: DateTime<Utc>, step_s: f64, tz: Tz) -> Result<(f64, &'static str), String> {
        let mid = t + chrono::Duration::seconds((step_s / 2.0) as i64);
        Ok(match self {
            PvModel::Csv(s) => (
                s.at(t)
                    .ok_or_else(|| format!("{}: no PV value for {}", s.source, t.to_rfc3339()))?
                    .max(0.0),
                "csv",
            ),
            PvModel::Sky {
                place,
                arrays,
                linke,
                correction,
                weather,
            } => match weather.as_ref().and_then(|w| w.at(mid)) {
                Some(w) => (w, "weather"),
                None => {
                    let clear = clear_sky_w(*place, arrays, *linke, mid);
                    (
                        clear * correction.as_ref().map_or(1.0, |c| c.factor(mid, tz)),
                        "clear_sky",
                    )
                }
            },
            PvModel::Curve(peak) => (
                peak * clear_sky(mid.with_timezone(&tz).naive_local()),
                "curve",
            ),
        })
    }
}

/// The weather forecast to use, if any is configured, fetched, readable and fresh; and the
/// sources line that says so (and why not, when not).
fn weather_forecast(
    p: &PvForecastConfig,
    fetched: Option<&Result<(String, DateTime<Utc>), String>>,
    now: DateTime<Utc>,
    place: crate::sky::Place,
    arrays: &[(crate::sky::Array, f64)],
    tz: Tz,
    clear: String,
) -> (Option<WeatherForecast>, String) {
    let Some(cfg) = &p.weather else {
        return (None, clear);
    };
    let name = cfg.service.as_str();
    let why_not = match fetched {
        None => "not fetched yet".to_string(),
        Some(Err(e)) => format!("fetch failed: {e}"),
        Some(Ok((_, at))) if (now - *at).num_seconds() as f64 > cfg.stale_after_h * 3600.0 => {
            format!("stale, fetched {}", at.to_rfc3339())
        }
        Some(Ok((body, at))) => match super::weather::parse(cfg.service, body, place, arrays, tz) {
            Ok(points) => {
                let f = WeatherForecast {
                    service: cfg.service,
                    fetched_at: *at,
                    points,
                };
                let source = format!(
                    "{name} forecast fetched {} where it covers a step; elsewhere {clear}",
                    at.to_rfc3339()
                );
                return (Some(f), source);
            }
            Err(e) => format!("unreadable: {e}"),
        },
    };
    (None, format!("{clear} ({name} forecast {why_not})"))
}

/// The arrays' clear-sky AC at `t`, each clipped at its limit.
fn clear_sky_w(
    place: crate::sky::Place,
    arrays: &[(crate::sky::Array, f64)],
    linke: f64,
    t: DateTime<Utc>,
) -> f64 {
    arrays
        .iter()
        .map(|(a, limit)| {
            crate::sky::clear_sky_ac_w(place, std::slice::from_ref(a), linke, t).min(*limit)
        })
        .sum()
}

fn pv_source(
    c: &SiteConfig,
    p: &PvForecastConfig,
    csv_override: Option<&String>,
    history: Option<(&Store, DateTime<Utc>)>,
    weather: Option<&Result<(String, DateTime<Utc>), String>>,
    now: DateTime<Utc>,
) -> Result<(PvModel, String), String> {
    if let Some(path) = csv_override.or(p.csv.as_ref()) {
        let s = Series::read_csv(path)?;
        let name = s.source.clone();
        return Ok((PvModel::Csv(s), name));
    }
    if let (Some(loc), false) = (&c.site.location, p.arrays.is_empty()) {
        let kwp: f64 = p.arrays.iter().map(|a| a.kwp).sum();
        let linke = p.linke();
        let place = loc.place();
        let arrays: Vec<_> = p.arrays.iter().map(|a| (a.array(), a.ac_cap_w())).collect();
        let tz: Tz = c.site.timezone.tz();
        let correction = match history {
            Some((store, start)) if p.learn_days > 0 => {
                let from = start - chrono::Duration::days(i64::from(p.learn_days));
                let hourly = store
                    .pv_hourly(from, start)
                    .map_err(|e| format!("store: {e}"))?;
                Some(Box::new(Correction::learn(
                    &hourly,
                    |t| clear_sky_w(place, &arrays, linke, t),
                    tz,
                )))
                .filter(|c| c.hours > 0)
            }
            _ => None,
        };
        let learnt = correction
            .as_ref()
            .and_then(|c| c.mean())
            .map(|m| {
                format!(
                    " × the site's measured share of it, learnt over {} days (mean {m:.2})",
                    p.learn_days
                )
            })
            .unwrap_or_default();
        let clear = format!(
            "clear sky at {:.2}, {:.2} on {} array(s) of {kwp:.1} kWp (Linke turbidity {linke}){learnt}",
            loc.latitude,
            loc.longitude,
            p.arrays.len()
        );
        let (weather, source) = weather_forecast(p, weather, now, place, &arrays, tz, clear);
        return Ok((
            PvModel::Sky {
                place,
                arrays,
                linke,
                correction,
                weather: weather.map(Box::new),
            },
            source,
        ));
    }
    // `ems check` lets exactly one source through; arrays need a location.
    let peak = p.peak_w.ok_or(
        "planner.pv_forecast has no usable source: give arrays (with site.location), peak_w or csv",
    )?;
    Ok((
        PvModel::Curve(peak),
        format!("fixed daily curve scaled to a {peak:.0} W peak"),
    ))
}

enum LoadSource<'a> {
    Csv(Series),
    Profile(Vec<f64>),
    History {
        store: &'a Store,
        weeks: u32,
        fallback: Option<Vec<f64>>,
    },
}

fn load_source<'a>(
    l: &LoadForecastConfig,
    csv_override: Option<&String>,
    store: Option<&'a Store>,
) -> Result<LoadSource<'a>, String> {
    if let Some(path) = csv_override.or(l.csv.as_ref()) {
        return Ok(LoadSource::Csv(Series::read_csv(path)?));
    }
    if let Some(weeks) = l.history_weeks {
        let store = store.ok_or("the load forecast needs the store (`store:` in the site file)")?;
        return Ok(LoadSource::History {
            store,
            weeks,
            fallback: l.profile_w.clone(),
        });
    }
    Ok(LoadSource::Profile(l.profile()))
}

/// Import and export price per kWh at `t`, from the site file's sources (CSV files are
/// read on each call: meant for reports and tests, not the control loop).
pub fn prices_at(
    c: &SiteConfig,
    p: &PlannerConfig,
    t: DateTime<Utc>,
) -> Result<(f64, f64), String> {
    let tz: Tz = c.site.timezone.tz();
    let (imp, _) = price_source(&p.import_price, None)?;
    let (exp, _) = price_source(&p.export_price, None)?;
    Ok((
        value_at(&imp, t, tz, "import price")?,
        value_at(&exp, t, tz, "export price")?,
    ))
}

/// The grid limit as a total over phases (the guard loop holds the per-phase limits).
fn total_limit_w(c: &SiteConfig, limit: GridLimitConfig) -> f64 {
    limit.total_w(c.grid.phases, c.grid.nominal_voltage_v)
}

/// Build the inputs for a plan starting at `start` (rounded down to a step), with the
/// batteries at `soc_pct` (one per inverter, config order).
pub fn from_config(
    c: &SiteConfig,
    p: &PlannerConfig,
    start: DateTime<Utc>,
    soc_pct: &[f64],
    o: &Overrides,
    store: Option<&Store>,
) -> Result<PlanInputs, String> {
    let tz: Tz = c.site.timezone.tz();
    let step_s = f64::from(p.step_min) * 60.0;
    let start_ts = start.timestamp();
    let start = DateTime::<Utc>::from_timestamp(start_ts - start_ts.rem_euclid(step_s as i64), 0)
        .unwrap_or(start);
    let horizon_h = o.horizon_h.unwrap_or(p.horizon_h).clamp(0.25, 168.0);
    let n = ((horizon_h * 3600.0) / step_s).round().max(1.0) as usize;

    let (imp, imp_src) = price_source(&p.import_price, o.import_csv.as_ref())?;
    let (exp, exp_src) = price_source(&p.export_price, o.export_csv.as_ref())?;
    let (pv, pv_src) = pv_source(
        c,
        &p.pv_forecast,
        o.pv_csv.as_ref(),
        store.map(|s| (s, start)),
        o.weather.as_ref(),
        start,
    )?;
    let load = load_source(&p.load_forecast, o.load_csv.as_ref(), store)?;
    let (mut from_history, mut history_samples, mut from_fallback) = (0usize, 0u32, 0usize);

    let mut inputs = PlanInputs {
        start,
        step_s,
        import_price: Vec::with_capacity(n),
        export_price: Vec::with_capacity(n),
        pv_w: Vec::with_capacity(n),
        load_w: Vec::with_capacity(n),
        batteries: Vec::new(),
        export_limit_w: total_limit_w(c, c.export_limit),
        import_limit_w: c.import_limit.map(|i| total_limit_w(c, i)),
        dr_limits_w: Vec::new(),
        reserve_pct: c.working_mode.reserve_pct(),
        cycling_cost_per_kwh: p.cycling_cost_per_kwh,
        soc_penalty_per_kwh: p.soc_penalty_per_kwh,
        terminal_value_per_kwh: p.terminal_value_per_kwh,
        time_limit_s: p.solve_time_limit_s,
        pv_from: Vec::with_capacity(n),
        sources: Sources {
            import_price: imp_src,
            export_price: exp_src,
            pv: pv_src,
            load: String::new(),
        },
    };
    for k in 0..n {
        let t = start + chrono::Duration::seconds((k as f64 * step_s) as i64);
        let local = t.with_timezone(&tz).naive_local();
        inputs
            .import_price
            .push(value_at(&imp, t, tz, "import price")?);
        inputs
            .export_price
            .push(value_at(&exp, t, tz, "export price")?);
        let (pv_w, from) = pv.at(t, step_s, tz)?;
        inputs.pv_w.push(pv_w);
        inputs.pv_from.push(from);
        inputs.load_w.push(match &load {
            LoadSource::Csv(s) => s
                .at(t)
                .ok_or_else(|| format!("{}: no load value for {}", s.source, t.to_rfc3339()))?
                .max(0.0),
            LoadSource::Profile(profile) => profile.get(local.hour() as usize).copied().unwrap_or(0.0),
            LoadSource::History { store, weeks, fallback } => {
                let (mean, samples) = store
                    .load_history(t, step_s as i64, *weeks)
                    .map_err(|e| format!("store: {e}"))?;
                match (mean, fallback) {
                    (Some(v), _) => {
                        from_history += 1;
                        history_samples += samples;
                        v
                    }
                    (None, Some(profile)) => {
                        from_fallback += 1;
                        profile.get(local.hour() as usize).copied().unwrap_or(0.0)
                    }
                    (None, None) => {
                        return Err(format!(
                            "no recorded load for {} on the last {weeks} weeks; give `profile_w` as a fallback",
                            t.to_rfc3339()
                        ))
                    }
                }
            }
        });
    }
    inputs.sources.load = match &load {
        LoadSource::Csv(s) => s.source.clone(),
        LoadSource::Profile(_) => "daily profile in the site file (24 hourly values)".into(),
        LoadSource::History { weeks, .. } => format!(
            "recorded history: same weekday and time over the last {weeks} weeks ({from_history} steps from {history_samples} samples, {from_fallback} steps from the profile)"
        ),
    };
    // Each hybrid's share of the forecast: its DC PV over all the site's PV (the forecast
    // model's peak when that is larger; the rest is AC-coupled).
    let dc_pv_w: f64 = c.inverters.iter().filter_map(|inv| inv.pv_peak_w).sum();
    let site_pv_w = dc_pv_w.max(pv.peak_w());
    // PV-only units have nothing to plan: their PV is in the site forecast.
    for (k, inv) in c
        .inverters
        .iter()
        .enumerate()
        .filter(|(_, i)| i.has_battery())
    {
        let b = inv.battery();
        inputs.batteries.push(Battery {
            id: inv.id.clone(),
            capacity_wh: b.capacity_wh,
            max_charge_w: b.max_charge_w.min(inv.rated_power_w),
            max_discharge_w: b.max_discharge_w.min(inv.rated_power_w),
            charge_efficiency: b.charge_efficiency,
            discharge_efficiency: b.discharge_efficiency,
            soc_min_pct: b.soc_min_pct,
            soc_max_pct: b.soc_max_pct,
            soc_pct: soc_pct
                .get(k)
                .copied()
                .unwrap_or(b.soc_min_pct)
                .clamp(0.0, 100.0),
            rated_w: inv.rated_power_w,
            pv_share: match inv.pv_peak_w {
                Some(w) if site_pv_w > 0.0 => w / site_pv_w,
                _ => 0.0,
            },
        });
    }
    Ok(inputs)
}
