//! `GET /api/v1/status`: the site as the EMS sees it. A stable contract that dashboards,
//! aggregators and tests rely on: fields are added, never renamed. Values of a device that is
//! not fresh are `null`; its `health` and `age_s` say why.

use std::time::Duration;

use serde::Serialize;

use crate::config::{MeterRole, Phase, SiteConfig};
use crate::control::{Decision, Setpoint, UnitHealth};
use crate::drivers::{PhaseAc, WorkingState};
use crate::io::poll::{Freshness, InverterPoller, MeterPoller};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Ok,
    /// No good read within `stale_after_s` (or never).
    Stale,
    /// Fresh, but the unit reports a fault.
    Faulted,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Stale => "stale",
            Health::Faulted => "faulted",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PhaseStatus {
    pub phase: Phase,
    /// + import.
    pub power_w: Option<f64>,
    /// Signed like power.
    pub current_a: Option<f64>,
    pub voltage_v: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GridStatus {
    pub meter: Option<String>,
    /// + import, − export.
    pub power_w: Option<f64>,
    pub phases: Vec<PhaseStatus>,
    pub frequency_hz: Option<f64>,
    pub health: Health,
    pub age_s: Option<f64>,
    /// Why the grid reading is not used: `frozen`, `timeout`, `exception`, `connect`,
    /// `transport`, `decode`, `old`, `never_read`; `null` while healthy.
    pub reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PhasePower {
    pub phase: Phase,
    /// + delivered to the site bus.
    pub power_w: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InverterStatus {
    pub id: String,
    pub model: &'static str,
    pub rated_power_w: f64,
    pub health: Health,
    pub age_s: Option<f64>,
    pub error: Option<String>,
    pub state: Option<WorkingState>,
    /// + delivered to the site bus.
    pub ac_power_w: Option<f64>,
    pub pv_power_w: Option<f64>,
    /// + discharge, − charge.
    pub battery_power_w: Option<f64>,
    pub soc_pct: Option<f64>,
    pub faults: Vec<&'static str>,
    pub warnings: Vec<&'static str>,
    pub phases: Vec<PhasePower>,
    pub serial: Option<String>,
    /// What the EMS told the unit this cycle; `null` when it could not be commanded.
    pub setpoint: Option<Setpoint>,
    /// Why the unit is held (battery idle, output no higher): `faulted`, `not_following`.
    pub held: Option<UnitHealth>,
    /// What the EMS stopped fixing by writing: `passive_not_confirmed`.
    pub alarm: Option<&'static str>,
    /// A SunSpec unit: the models discovery found and what the EMS controls it through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sunspec: Option<SunSpecStatus>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SunSpecStatus {
    /// Model IDs found, in map order (empty before discovery).
    pub models: Vec<u16>,
    /// 704 or 123; `None` when the unit cannot be curtailed.
    pub curtail_model: Option<u16>,
    /// What the unit's limits are a percentage of, W.
    pub wmax_w: f64,
    /// The limit the unit's control model held when last read, W (`None`: no limit).
    pub limit_in_force_w: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MeterStatus {
    pub id: String,
    pub role: &'static str,
    pub model: &'static str,
    pub health: Health,
    pub age_s: Option<f64>,
    pub error: Option<String>,
    /// Why the meter is not healthy (as for the grid); `null` while healthy.
    pub reason: Option<&'static str>,
    /// Grid meter: + import. PV meter: + generation.
    pub power_w: Option<f64>,
    pub phases: Vec<PhaseStatus>,
    pub frequency_hz: Option<f64>,
    pub import_wh: Option<f64>,
    pub export_wh: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FleetStatus {
    pub inverters_total: usize,
    pub inverters_ok: usize,
    pub ac_power_w: f64,
    pub pv_power_w: f64,
    pub battery_power_w: f64,
    /// Capacity-weighted over fresh inverters.
    pub soc_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LimitStatus {
    pub mode: &'static str,
    pub limit_w: Option<f64>,
    pub limit_a: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ControlStatus {
    pub fail_safe: bool,
    /// The constraint holding the fleet back: `export_limit`, `export_limit:L2`,
    /// `import_limit`, `conflict:export_holds`, `soc`, `fail_safe`, or `null`.
    pub binding: Option<String>,
    pub active_mode: &'static str,
    /// Fleet battery power the mode aims for, + discharge.
    pub fleet_target_w: f64,
    pub predicted_grid_w: Vec<PhasePower>,
    /// PV the setpoints hold back to keep within the limits.
    pub curtailed_w: f64,
}

/// The planner's state, when the site has one.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlanStatus {
    pub age_s: Option<f64>,
    /// The plan's battery targets are being followed (plan mode, plan fresh).
    pub following: bool,
    pub cost: Option<f64>,
    pub baseline_cost: Option<f64>,
    pub objective: Option<f64>,
    pub solve_ms: Option<f64>,
    pub violations: usize,
    /// Why there is no fresh plan, if so; the guard then runs self-consumption.
    pub error: Option<String>,
    /// Current step: prices and the fleet's planned battery power (+ discharge).
    pub import_price: Option<f64>,
    pub export_price: Option<f64>,
    pub battery_w: Option<f64>,
    /// Solves finished since start (plans and failures).
    pub solves: u64,
    /// A solve is under way in the planner's task.
    pub solving: bool,
    /// The plan's PV and load forecasts against what was measured, per day.
    pub forecast_quality: crate::planner::score::ForecastQuality,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DrStatus {
    /// Events accepted and not over yet.
    pub events: usize,
    /// What the events in force ask of the fleet.
    pub constraints: crate::dr::DrConstraints,
    /// The aggregator's MQTT link, when configured.
    pub mqtt_connected: Option<bool>,
    /// Why the MQTT link is down (the broker refused the login, say), while it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_error: Option<String>,
    /// The link has been down past its heartbeat: the fallback limits apply.
    pub fallback: bool,
}

/// How the guard loop keeps its period.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LoopStatus {
    pub cycle_ms: u64,
    /// Duration of the last cycle and the longest since start (read, decide, write, publish).
    pub last_ms: f64,
    pub max_ms: f64,
    /// Cycles that took longer than `cycle_ms`.
    pub overruns: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub site: String,
    /// Site time (the simulator's under `--simulate`), RFC 3339 UTC.
    pub time: String,
    pub cycle: u64,
    pub guard_loop: LoopStatus,
    pub working_mode: &'static str,
    pub nominal_voltage_v: f64,
    pub export_limit: LimitStatus,
    pub import_limit: Option<LimitStatus>,
    pub grid: GridStatus,
    pub control: Option<ControlStatus>,
    pub plan: Option<PlanStatus>,
    pub dr: Option<DrStatus>,
    pub fleet: FleetStatus,
    pub inverters: Vec<InverterStatus>,
    pub meters: Vec<MeterStatus>,
}

impl Status {
    /// The grid meter repeats itself while the fleet moves: show it as lost, values hidden.
    pub fn mark_grid_frozen(&mut self, unchanged_for: Duration) {
        let why = format!(
            "frozen: identical readings for {:.1} s while the fleet's output changed",
            unchanged_for.as_secs_f64()
        );
        let hide = |phases: &mut Vec<PhaseStatus>| {
            for p in phases.iter_mut() {
                p.power_w = None;
                p.current_a = None;
                p.voltage_v = None;
            }
        };
        let g = &mut self.grid;
        g.health = Health::Stale;
        g.reason = Some("frozen");
        g.power_w = None;
        g.frequency_hz = None;
        hide(&mut g.phases);
        for m in self
            .meters
            .iter_mut()
            .filter(|m| Some(&m.id) == g.meter.as_ref())
        {
            m.health = Health::Stale;
            m.reason = Some("frozen");
            m.error = Some(why.clone());
            m.power_w = None;
            m.frequency_hz = None;
            hide(&mut m.phases);
        }
    }
}

fn age_s(f: &Freshness, now: Duration) -> Option<f64> {
    f.age(now)
        .map(|a| (a.as_secs_f64() * 1000.0).round() / 1000.0)
}

fn phase_status(phases: &[Phase], reading: Option<&[PhaseAc]>) -> Vec<PhaseStatus> {
    phases
        .iter()
        .map(|&phase| {
            let ac = reading.and_then(|r| r.iter().find(|p| p.phase == phase));
            PhaseStatus {
                phase,
                power_w: ac.map(|a| a.power_w),
                current_a: ac.map(|a| a.current_a),
                voltage_v: ac.map(|a| a.voltage_v),
            }
        })
        .collect()
}

fn meter_status(
    c: &SiteConfig,
    m: &MeterPoller,
    now: Duration,
    stale_after: Duration,
) -> MeterStatus {
    let fresh = m.fresh.is_fresh(now, stale_after);
    let reading = m.reading.as_ref().filter(|_| fresh);
    MeterStatus {
        id: m.cfg.id.clone(),
        role: m.cfg.role.as_str(),
        model: m.cfg.model.as_str(),
        health: if fresh { Health::Ok } else { Health::Stale },
        age_s: age_s(&m.fresh, now),
        error: m.fresh.last_error.clone(),
        reason: (!fresh).then(|| m.fresh.stale_reason()),
        power_w: reading.map(|r| r.power_w),
        phases: phase_status(&c.phases(), reading.map(|r| r.phases.as_slice())),
        frequency_hz: reading.and_then(|r| r.frequency_hz),
        import_wh: m.energy.map(|e| e.import_wh),
        export_wh: m.energy.map(|e| e.export_wh),
    }
}

fn limit(l: crate::config::GridLimitConfig) -> LimitStatus {
    LimitStatus {
        mode: l.mode().as_str(),
        limit_w: l.limit_w(),
        limit_a: l.limit_a(),
    }
}

/// Build the status from the pollers' state at `now`.
pub fn build(
    c: &SiteConfig,
    meters: &[MeterPoller],
    inverters: &[InverterPoller],
    decision: Option<&Decision>,
    now: Duration,
    time: chrono::DateTime<chrono::Utc>,
    cycle: u64,
) -> Status {
    let stale_after = Duration::from_secs_f64(c.control.stale_after_s);
    let meters: Vec<MeterStatus> = meters
        .iter()
        .map(|m| meter_status(c, m, now, stale_after))
        .collect();
    let grid = match meters.iter().find(|m| m.role == MeterRole::Grid.as_str()) {
        Some(m) => GridStatus {
            meter: Some(m.id.clone()),
            power_w: m.power_w,
            phases: m.phases.clone(),
            frequency_hz: m.frequency_hz,
            health: m.health,
            age_s: m.age_s,
            reason: m.reason,
        },
        None => GridStatus {
            meter: None,
            power_w: None,
            phases: phase_status(&c.phases(), None),
            frequency_hz: None,
            health: Health::Stale,
            age_s: None,
            reason: Some("never_read"),
        },
    };

    let mut fleet = FleetStatus {
        inverters_total: inverters.len(),
        inverters_ok: 0,
        ac_power_w: 0.0,
        pv_power_w: 0.0,
        battery_power_w: 0.0,
        soc_pct: None,
    };
    let (mut soc_wh, mut cap_wh) = (0.0, 0.0);
    let inverters: Vec<InverterStatus> = inverters
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let fresh = p.fresh.is_fresh(now, stale_after);
            let reading = p.reading.as_ref().filter(|_| fresh);
            let health = match reading {
                None => Health::Stale,
                Some(r) if r.has_fault() => Health::Faulted,
                Some(_) => Health::Ok,
            };
            if let Some(r) = reading {
                if health == Health::Ok {
                    fleet.inverters_ok += 1;
                }
                fleet.ac_power_w += r.ac_power_w;
                fleet.pv_power_w += r.pv_power_w;
                fleet.battery_power_w += r.battery_power_w;
                soc_wh += r.soc_pct * p.cfg.battery().capacity_wh;
                cap_wh += p.cfg.battery().capacity_wh;
            }
            let flags = |sev: crate::drivers::Severity| {
                reading
                    .map(|r| {
                        r.faults
                            .iter()
                            .filter(|f| f.severity == sev)
                            .map(|f| f.name)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            InverterStatus {
                id: p.cfg.id.clone(),
                model: p.cfg.model.as_str(),
                rated_power_w: p.cfg.rated_power_w,
                health,
                age_s: age_s(&p.fresh, now),
                error: p.fresh.last_error.clone(),
                state: reading.map(|r| r.state),
                ac_power_w: reading.map(|r| r.ac_power_w),
                pv_power_w: reading.map(|r| r.pv_power_w),
                battery_power_w: reading.map(|r| r.battery_power_w),
                soc_pct: reading.map(|r| r.soc_pct),
                faults: flags(crate::drivers::Severity::Fault),
                warnings: flags(crate::drivers::Severity::Warning),
                phases: p
                    .cfg
                    .ac_phases()
                    .into_iter()
                    .map(|phase| PhasePower {
                        phase,
                        power_w: reading
                            .and_then(|r| r.phases.iter().find(|a| a.phase == phase))
                            .map(|a| a.power_w),
                    })
                    .collect(),
                serial: p.identity.as_ref().map(|i| i.serial.clone()),
                setpoint: decision.and_then(|d| d.setpoints.get(k).copied().flatten()),
                held: decision.and_then(|d| d.held.get(k).copied().flatten()),
                alarm: None,
                sunspec: p.sunspec().map(|u| SunSpecStatus {
                    models: u.map_ids.clone(),
                    curtail_model: u
                        .models
                        .as_ref()
                        .and_then(|m| m.curtail)
                        .map(|c| c.model_id()),
                    wmax_w: u.wmax_w,
                    limit_in_force_w: u.limit_in_force_w,
                }),
            }
        })
        .collect();
    if cap_wh > 0.0 {
        fleet.soc_pct = Some(soc_wh / cap_wh);
    }

    Status {
        site: c.site.name.clone(),
        time: time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        cycle,
        guard_loop: LoopStatus::default(),
        working_mode: c.working_mode.mode.as_str(),
        nominal_voltage_v: c.grid.nominal_voltage_v,
        export_limit: limit(c.export_limit),
        import_limit: c.import_limit.map(limit),
        grid,
        control: decision.map(|d| ControlStatus {
            fail_safe: d.fail_safe,
            binding: d.binding.map(|b| b.label()),
            active_mode: d.active_mode,
            fleet_target_w: d.fleet_target_w,
            predicted_grid_w: c
                .phases()
                .into_iter()
                .map(|phase| PhasePower {
                    phase,
                    power_w: Some(d.predicted_grid_w[phase.index()]),
                })
                .collect(),
            curtailed_w: d.curtailed_w,
        }),
        plan: None,
        dr: None,
        fleet,
        inverters,
        meters,
    }
}
