//! Demand response: aggregator events, AS/NZS 4777 DRM0–DRM8 and German ripple-control steps,
//! resolved into one set of constraints the guard loop enforces on the whole fleet.
//!
//! This module is pure: events in, constraints out. Overlapping events resolve by priority,
//! then by the stricter limit. Around it: [`book`] keeps the accepted events (in memory for
//! the guard loop, on disk through the store), [`wire`] is the request form aggregators
//! send, and [`mqtt`] is the link to an aggregator's broker.

pub mod book;
pub mod mqtt;
pub mod wire;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What an event asks for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrCommand {
    /// Site export at most this many W.
    ExportLimitW(f64),
    /// Site import at most this many W.
    ImportLimitW(f64),
    /// Hold the grid power (+ import) at this many W.
    GridTargetW(f64),
    /// The fleet's batteries at this power (+ discharge).
    FleetBatteryW(f64),
    /// AS/NZS 4777 demand response mode 0–8.
    Drm(u8),
    /// OpenADR SIMPLE level 0–3, mapped to limits by the site file.
    OpenadrLevel(u8),
    /// Ripple-control step: feed-in at most this % of the fleet's rating (100, 60, 30, 0).
    RipplePct(f64),
}

impl DrCommand {
    /// Check the values a client sent.
    pub fn validate(&self) -> Result<(), String> {
        let finite_nonneg = |v: f64, what: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{what} must be a number ≥ 0, not {v}"))
            }
        };
        match *self {
            DrCommand::ExportLimitW(v) => finite_nonneg(v, "export_limit_w"),
            DrCommand::ImportLimitW(v) => finite_nonneg(v, "import_limit_w"),
            DrCommand::GridTargetW(v) | DrCommand::FleetBatteryW(v) if !v.is_finite() => {
                Err("power must be a finite number".into())
            }
            DrCommand::Drm(m) if m > 8 => Err(format!("drm must be 0–8, not {m}")),
            DrCommand::OpenadrLevel(l) if l > 3 => {
                Err(format!("openadr_level must be 0–3, not {l}"))
            }
            DrCommand::RipplePct(p) if ![0.0, 30.0, 60.0, 100.0].contains(&p) => {
                Err(format!("ripple_pct must be 100, 60, 30 or 0, not {p}"))
            }
            _ => Ok(()),
        }
    }

    pub fn label(&self) -> String {
        match self {
            DrCommand::ExportLimitW(_) => "export_limit".into(),
            DrCommand::ImportLimitW(_) => "import_limit".into(),
            DrCommand::GridTargetW(_) => "grid_target".into(),
            DrCommand::FleetBatteryW(_) => "fleet_battery".into(),
            DrCommand::Drm(m) => format!("drm{m}"),
            DrCommand::OpenadrLevel(l) => format!("openadr_level{l}"),
            DrCommand::RipplePct(p) => format!("ripple{p:.0}"),
        }
    }
}

/// Limits an OpenADR SIMPLE level stands for at this site.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelLimits {
    #[serde(default)]
    pub export_limit_w: Option<f64>,
    #[serde(default)]
    pub import_limit_w: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrEvent {
    pub id: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Higher wins.
    #[serde(default)]
    pub priority: i32,
    pub command: DrCommand,
    /// Where it came from: `http`, `mqtt`, `dred`, `ripple`, `fallback`.
    pub source: String,
}

impl DrEvent {
    pub fn active_at(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }
}

/// What the fleet must keep to, this cycle.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DrConstraints {
    /// Site export, W (sum of phases).
    pub export_limit_w: Option<f64>,
    pub import_limit_w: Option<f64>,
    pub grid_target_w: Option<f64>,
    pub fleet_battery_w: Option<f64>,
    /// Each inverter's output at most this share of its rating (DRM5–7).
    pub generation_pct: Option<f64>,
    /// Each inverter's consumption (charging from the grid) at most this share (DRM1–3).
    pub consumption_pct: Option<f64>,
    /// DRM0: every inverter in standby.
    pub standby: bool,
    /// Ids of the events in force, highest priority first.
    pub active: Vec<String>,
}

fn tighter(a: Option<f64>, b: f64) -> Option<f64> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Resolve the events in force at `now`. Events at the highest priority present set the
/// targets; limits from every active event apply, the strictest winning (a lower-priority
/// event never loosens a limit). `fleet_rated_w` turns ripple percentages into watts.
pub fn resolve(
    events: &[DrEvent],
    now: DateTime<Utc>,
    fleet_rated_w: f64,
    levels: &[LevelLimits; 4],
) -> DrConstraints {
    let mut active: Vec<&DrEvent> = events.iter().filter(|e| e.active_at(now)).collect();
    active.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
    let mut c = DrConstraints {
        active: active.iter().map(|e| e.id.clone()).collect(),
        ..Default::default()
    };
    let top = active.first().map(|e| e.priority);
    for e in &active {
        let leading = Some(e.priority) == top;
        match e.command {
            DrCommand::ExportLimitW(w) => c.export_limit_w = tighter(c.export_limit_w, w),
            DrCommand::ImportLimitW(w) => c.import_limit_w = tighter(c.import_limit_w, w),
            DrCommand::RipplePct(p) => {
                c.export_limit_w = tighter(c.export_limit_w, p / 100.0 * fleet_rated_w)
            }
            DrCommand::OpenadrLevel(l) => {
                let m = levels[usize::from(l.min(3))];
                if let Some(w) = m.export_limit_w {
                    c.export_limit_w = tighter(c.export_limit_w, w);
                }
                if let Some(w) = m.import_limit_w {
                    c.import_limit_w = tighter(c.import_limit_w, w);
                }
            }
            DrCommand::Drm(m) => match m {
                0 => c.standby = true,
                1 => c.consumption_pct = tighter(c.consumption_pct, 0.0),
                2 => c.consumption_pct = tighter(c.consumption_pct, 50.0),
                3 => c.consumption_pct = tighter(c.consumption_pct, 75.0),
                5 => c.generation_pct = tighter(c.generation_pct, 0.0),
                6 => c.generation_pct = tighter(c.generation_pct, 50.0),
                7 => c.generation_pct = tighter(c.generation_pct, 75.0),
                // DRM4 and DRM8 allow up to 100 %: no narrowing.
                _ => {}
            },
            // Targets come from the leading priority only; the first there wins.
            DrCommand::GridTargetW(w)
                if leading && c.grid_target_w.is_none() && c.fleet_battery_w.is_none() =>
            {
                c.grid_target_w = Some(w)
            }
            DrCommand::FleetBatteryW(w)
                if leading && c.grid_target_w.is_none() && c.fleet_battery_w.is_none() =>
            {
                c.fleet_battery_w = Some(w)
            }
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ev(id: &str, prio: i32, cmd: DrCommand) -> DrEvent {
        DrEvent {
            id: id.into(),
            start: Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap(),
            priority: prio,
            command: cmd,
            source: "test".into(),
        }
    }

    fn at(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, h, 0, 0).unwrap()
    }

    #[test]
    fn only_events_in_their_window_apply() {
        let e = [ev("a", 0, DrCommand::ExportLimitW(1000.0))];
        assert_eq!(
            resolve(&e, at(9), 1e5, &Default::default()).export_limit_w,
            None
        );
        assert_eq!(
            resolve(&e, at(11), 1e5, &Default::default()).export_limit_w,
            Some(1000.0)
        );
        assert_eq!(
            resolve(&e, at(12), 1e5, &Default::default()).export_limit_w,
            None,
            "end is exclusive"
        );
    }

    #[test]
    fn overlaps_resolve_by_priority_then_the_stricter_limit() {
        let e = [
            ev("low", 1, DrCommand::ExportLimitW(500.0)),
            ev("high", 5, DrCommand::ExportLimitW(2000.0)),
            ev("t-low", 1, DrCommand::GridTargetW(-3000.0)),
            ev("t-high", 5, DrCommand::FleetBatteryW(4000.0)),
        ];
        let c = resolve(&e, at(11), 1e5, &Default::default());
        assert_eq!(
            c.export_limit_w,
            Some(500.0),
            "no event loosens another's limit"
        );
        assert_eq!(
            c.fleet_battery_w,
            Some(4000.0),
            "the higher priority sets the target"
        );
        assert_eq!(c.grid_target_w, None);
        assert_eq!(c.active[0], "high");
    }

    #[test]
    fn drm_modes_and_ripple_and_levels() {
        let d = |m| {
            resolve(
                &[ev("d", 0, DrCommand::Drm(m))],
                at(11),
                1e5,
                &Default::default(),
            )
        };
        assert!(d(0).standby);
        assert_eq!(d(1).consumption_pct, Some(0.0));
        assert_eq!(d(3).consumption_pct, Some(75.0));
        assert_eq!(d(5).generation_pct, Some(0.0));
        assert_eq!(d(6).generation_pct, Some(50.0));
        assert_eq!(
            d(8),
            DrConstraints {
                active: vec!["d".into()],
                ..Default::default()
            }
        );
        let r = resolve(
            &[ev("r", 0, DrCommand::RipplePct(30.0))],
            at(11),
            100_000.0,
            &Default::default(),
        );
        assert_eq!(r.export_limit_w, Some(30_000.0));
        let mut levels = [LevelLimits::default(); 4];
        levels[2].export_limit_w = Some(0.0);
        let l = resolve(
            &[ev("l", 0, DrCommand::OpenadrLevel(2))],
            at(11),
            1e5,
            &levels,
        );
        assert_eq!(l.export_limit_w, Some(0.0));
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        assert!(DrCommand::Drm(9).validate().unwrap_err().contains("0–8"));
        assert!(DrCommand::ExportLimitW(-1.0).validate().is_err());
        assert!(DrCommand::RipplePct(45.0).validate().is_err());
        assert!(DrCommand::OpenadrLevel(3).validate().is_ok());
    }
}
