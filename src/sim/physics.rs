//! Site physics for the simulator, per phase: PV, load, batteries, inverter firmware and the
//! grid connection. Pure: the model advances only when [`SiteModel::step`] is called, so a
//! test can run a simulated day in milliseconds.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::config::{BatteryConfig, Phase, SiteConfig};
use crate::drivers::saj::{self, app_mode, passive, reg};
pub use crate::solar::clear_sky;

/// One simulated hybrid inverter with its battery and PV strings.
#[derive(Debug, Clone)]
pub struct SimInverter {
    pub id: String,
    pub model: crate::config::InverterModel,
    pub rated_w: f64,
    pub phases: Vec<Phase>,
    pub battery: BatteryConfig,
    pub pv_peak_w: f64,
    pub soc_pct: f64,
    /// Actual battery power, + discharge.
    pub battery_w: f64,
    /// PV power actually converted (after curtailment).
    pub pv_w: f64,
    /// AC output at the grid port, + delivered.
    pub ac_w: f64,
    /// Writable settings (`0x36xx`), by address.
    pub settings: HashMap<u16, u16>,
    /// Fault words HFault, MFault, MFault2, for fault-injection tests.
    pub fault_words: [u32; 3],
    /// Accepted writes per setting register (the memory's endurance is spent by these).
    pub writes: HashMap<u16, u64>,
    /// `0x4022` shows the AppMode in force; false for firmware that does not.
    pub mirrors_app_mode: bool,
    /// Under [`AntiRefluxPoint::Site`]: the output the unit's own export regulation allows
    /// now, moved each tick towards holding the metered export at `0x365A`.
    pub reflux_allowed_w: Option<f64>,
    /// The firmware ignores the passive battery setpoint (a unit not following).
    pub ignores_setpoint: bool,
    pub charged_wh: f64,
    pub discharged_wh: f64,
    pub pv_wh: f64,
    /// A SunSpec unit's controls (`None` for an SAJ hybrid).
    pub sunspec: Option<super::sunspec::SimSunSpec>,
}

impl SimInverter {
    pub fn setting(&self, addr: u16) -> u16 {
        self.settings
            .get(&addr)
            .copied()
            .or_else(|| saj::setting(addr).map(|s| s.default))
            .unwrap_or(0)
    }

    pub fn app_mode(&self) -> u16 {
        self.setting(reg::APP_MODE)
    }

    fn soc_floor(&self) -> f64 {
        self.battery
            .soc_min_pct
            .max(f64::from(self.setting(reg::ON_GRID_DIS_DEPTH)).min(100.0))
    }

    fn soc_ceiling(&self) -> f64 {
        self.battery
            .soc_max_pct
            .min(f64::from(self.setting(reg::CHARGE_DEPTH)))
    }

    /// Charge and discharge power the battery may take now, from ratings, the battery
    /// limit registers and the SOC bounds.
    fn battery_window(&self) -> (f64, f64) {
        let chg_limit = saj::permille_to_watts(self.setting(reg::BAT_CHARGE_LIMIT), self.rated_w);
        let dis_limit =
            saj::permille_to_watts(self.setting(reg::BAT_DISCHARGE_LIMIT), self.rated_w);
        let mut max_charge = self.battery.max_charge_w.min(chg_limit).min(self.rated_w);
        let mut max_discharge = self
            .battery
            .max_discharge_w
            .min(dis_limit)
            .min(self.rated_w);
        if self.soc_pct >= self.soc_ceiling() {
            max_charge = 0.0;
        }
        if self.soc_pct <= self.soc_floor() {
            max_discharge = 0.0;
        }
        (max_charge, max_discharge)
    }

    /// The export limit `0x365A` sets, when the firmware applies one: only with anti-reflux
    /// on (`0x3635` ≠ 0) and a limiting mode chosen (`0x365C` ≠ 0), as the register map has
    /// it.
    pub fn anti_reflux_limit_w(&self) -> Option<f64> {
        let on = self.setting(reg::PREVENT_REVERSE_FLOW) != 0
            && self.setting(reg::ANTI_REFLUX_MODE) != 0;
        on.then(|| saj::permille_to_watts(self.setting(reg::ANTI_REFLUX_POWER), self.rated_w))
    }

    /// The unit's AC output cap now. Where the limit acts — the unit's own output, or the
    /// site meter it reads — is `at`: the map does not say, so the simulator has both.
    pub fn output_cap_w(&self, at: AntiRefluxPoint) -> f64 {
        match (self.anti_reflux_limit_w(), at) {
            (None, _) => self.rated_w,
            (Some(limit), AntiRefluxPoint::Output) => limit.min(self.rated_w),
            (Some(_), AntiRefluxPoint::Site) => {
                self.reflux_allowed_w.unwrap_or(self.ac_w).min(self.rated_w)
            }
        }
    }

    /// Under [`AntiRefluxPoint::Site`], one tick of the firmware's own export regulation:
    /// the allowed output follows the metered export towards the limit, at a gain low
    /// enough that ten units regulating one meter do not oscillate.
    fn regulate_export(&mut self, site_export_w: f64, dt_s: f64) {
        match self.anti_reflux_limit_w() {
            None => self.reflux_allowed_w = None,
            Some(limit) => {
                let gain = (0.5 * dt_s).min(0.05);
                let allowed = self.reflux_allowed_w.unwrap_or(self.ac_w);
                // No wind-up: the allowance never runs far ahead of what the unit delivers.
                let ceiling = (self.ac_w + 0.1 * self.rated_w).min(self.rated_w);
                self.reflux_allowed_w =
                    Some((allowed + gain * (limit - site_export_w)).clamp(-self.rated_w, ceiling));
            }
        }
    }
}

/// Ground truth of the last step, per phase (index 0 = L1).
#[derive(Debug, Clone, Default)]
pub struct PhaseTruth {
    pub load_w: [f64; 3],
    pub ac_pv_w: [f64; 3],
    /// + import.
    pub grid_w: [f64; 3],
    pub voltage_v: [f64; 3],
}

/// Where a unit's anti-reflux limit (`0x365A`) is measured. The register map says "at the
/// unit's metering point" with `0x3635` = 1 (the unit reads its own meter), not whether that
/// meter sees the unit alone or the whole site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AntiRefluxPoint {
    /// The unit's own output: `0x365A` caps what it delivers.
    #[default]
    Output,
    /// The site's grid meter: the unit holds the site's export at `0x365A`.
    Site,
}

/// The simulated sun at a real place: the planner's clear sky on the site's arrays, as a
/// share of their rating, dimmed by clouds that change from day to day and minute to minute
/// (deterministic for a seed).
#[derive(Debug, Clone)]
pub struct SimSky {
    place: crate::sky::Place,
    arrays: Vec<crate::sky::Array>,
    linke: f64,
    /// The arrays' AC at 1000 W/m² on every one.
    rated_w: f64,
    cloudiness: f64,
    seed: u64,
}

impl SimSky {
    fn from_config(c: &SiteConfig) -> Option<SimSky> {
        let place = c.site.location?.place();
        let forecast = c.planner.as_ref().map(|p| &p.pv_forecast);
        let mut arrays: Vec<crate::sky::Array> = forecast
            .map(|f| f.arrays.iter().map(|a| a.array()).collect())
            .unwrap_or_default();
        if arrays.is_empty() {
            // No arrays described: one facing the equator at a common roof pitch.
            arrays.push(crate::sky::Array {
                kwp: 1.0,
                tilt_deg: 35.0,
                azimuth_deg: if place.latitude_deg >= 0.0 {
                    180.0
                } else {
                    0.0
                },
                losses_pct: 14.0,
            });
        }
        let rated_w = arrays
            .iter()
            .map(|a| a.kwp * 1000.0 * (1.0 - a.losses_pct / 100.0))
            .sum();
        Some(SimSky {
            place,
            arrays,
            linke: forecast.map_or(crate::sky::DEFAULT_LINKE_TURBIDITY, |f| f.linke()),
            rated_w,
            cloudiness: c.simulation.cloudiness,
            seed: c.simulation.seed,
        })
    }

    /// Share of the PV's peak at `now`, 0 to about 1.
    pub fn factor(&self, now: DateTime<Utc>, tz: Tz) -> f64 {
        let clear = crate::sky::clear_sky_ac_w(self.place, &self.arrays, self.linke, now);
        (clear / self.rated_w.max(1.0)) * self.clouds(now, tz)
    }

    /// What the clouds let through at `now`.
    fn clouds(&self, now: DateTime<Utc>, tz: Tz) -> f64 {
        use chrono::{Datelike, Timelike};
        if self.cloudiness <= 0.0 {
            return 1.0;
        }
        let local = now.with_timezone(&tz);
        let day = local.date_naive().num_days_from_ce() as u64;
        let draw = |salt: u64| {
            let mut r =
                SmallRng::seed_from_u64(self.seed ^ day.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt);
            r.random::<f64>()
        };
        // Each day's cover scatters around the cloudiness; within the day clouds thicken and
        // thin every 47 minutes.
        let cover = (self.cloudiness * (0.5 + draw(1))).min(1.0);
        let minutes = f64::from(local.num_seconds_from_midnight()) / 60.0;
        let passing = 0.6 + 0.4 * (2.0 * std::f64::consts::PI * (minutes / 47.0 + draw(2))).sin();
        1.0 - 0.85 * cover * passing
    }
}

/// Wiring mistakes in the simulated site's meters (inverters on the wrong phase are in their
/// `phases`).
#[derive(Debug, Clone, Default)]
pub struct Wiring {
    /// A phase of a meter whose CT is on backwards.
    pub ct_reversed: Vec<(crate::config::MeterRole, Phase)>,
    /// A meter wired backwards as a whole.
    pub reversed: Vec<crate::config::MeterRole>,
}

impl Wiring {
    fn from_config(c: &SiteConfig) -> Wiring {
        use crate::config::WiringFault;
        let role = |id: &str| c.meters.iter().find(|m| m.id == id).map(|m| m.role);
        let mut w = Wiring::default();
        for f in &c.simulation.wiring_faults {
            match f {
                WiringFault::CtReversed { meter, phase } => {
                    w.ct_reversed.extend(role(meter).map(|r| (r, *phase)))
                }
                WiringFault::MeterReversed { meter } => w.reversed.extend(role(meter)),
                WiringFault::WrongPhase { .. } => {}
            }
        }
        w
    }

    /// What a meter in `role` shows of the forward power `p`, as it is wired.
    pub fn as_wired(&self, role: crate::config::MeterRole, mut p: [f64; 3]) -> [f64; 3] {
        for (r, phase) in &self.ct_reversed {
            if *r == role {
                p[phase.index()] = -p[phase.index()];
            }
        }
        if self.reversed.contains(&role) {
            p = p.map(|x| -x);
        }
        p
    }
}

#[derive(Debug, Clone)]
pub struct SiteModel {
    /// How the meters are wired (faults for the wiring check to find).
    pub wiring: Wiring,
    /// Where the units' anti-reflux limits are measured.
    pub anti_reflux_at: AntiRefluxPoint,
    pub tz: Tz,
    pub now: DateTime<Utc>,
    pub phases: usize,
    pub nominal_v: f64,
    pub inverters: Vec<SimInverter>,
    pub base_load_w: f64,
    pub peak_load_w: f64,
    pub phase_shares: [f64; 3],
    pub noise_pct: f64,
    pub ac_pv_peak_w: f64,
    /// The sun at the site's location, when it has one.
    pub sky: Option<SimSky>,
    /// Scripted change of site load (e.g. a 5 kW drop is −5000), split by phase shares.
    pub load_step_w: f64,
    pub ramp_w_per_s_pct: f64,
    pub frequency_hz: f64,
    pub truth: PhaseTruth,
    /// Grid meter energy counters, Wh.
    pub grid_import_wh: f64,
    pub grid_export_wh: f64,
    pub ac_pv_wh: f64,
    noise: [f64; 3],
    rng: SmallRng,
}

/// Parse the simulation start `YYYY-MM-DDTHH:MM` as local time in `tz`.
pub fn parse_local_start(s: &str, tz: Tz) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S"))
        .ok()?;
    tz.from_local_datetime(&naive)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
}

/// Daily load shape, 0–1: breakfast, midday and an evening peak.
pub fn load_shape(local: NaiveDateTime) -> f64 {
    let h = f64::from(local.hour()) + f64::from(local.minute()) / 60.0;
    let bump = |c: f64, w: f64| (-((h - c) / w).powi(2)).exp();
    (0.1 + 0.35 * bump(7.5, 1.5) + 0.3 * bump(13.0, 3.0) + 0.9 * bump(19.0, 2.0)).min(1.0)
}

impl SiteModel {
    pub fn new(c: &SiteConfig) -> SiteModel {
        let tz: Tz = c.site.timezone.tz();
        let s = &c.simulation;
        let now = s
            .start
            .as_deref()
            .and_then(|v| parse_local_start(v, tz))
            .unwrap_or_else(Utc::now);
        let inverters = c
            .inverters
            .iter()
            .map(|i| SimInverter {
                id: i.id.clone(),
                model: i.model,
                rated_w: i.rated_power_w,
                // A unit wired to another phase than the site file says feeds that one.
                phases: c
                    .simulation
                    .wiring_faults
                    .iter()
                    .find_map(|f| match f {
                        crate::config::WiringFault::WrongPhase {
                            inverter,
                            actual_phase,
                        } if *inverter == i.id => Some(vec![*actual_phase]),
                        _ => None,
                    })
                    .unwrap_or_else(|| i.ac_phases()),
                battery: i.battery().clone(),
                pv_peak_w: i.rated_power_w * s.pv_peak_ratio,
                soc_pct: s
                    .initial_soc_pct
                    .clamp(i.battery().soc_min_pct, i.battery().soc_max_pct),
                battery_w: 0.0,
                pv_w: 0.0,
                ac_w: 0.0,
                settings: HashMap::new(),
                fault_words: [0; 3],
                writes: HashMap::new(),
                mirrors_app_mode: true,
                reflux_allowed_w: None,
                ignores_setpoint: false,
                charged_wh: 0.0,
                discharged_wh: 0.0,
                pv_wh: 0.0,
                sunspec: None,
            })
            .map(|mut inv| {
                if inv.model == crate::config::InverterModel::Sunspec {
                    inv.sunspec = Some(super::sunspec::SimSunSpec::for_inverter(&inv));
                }
                inv
            })
            .collect();
        let mut m = SiteModel {
            wiring: Wiring::from_config(c),
            anti_reflux_at: AntiRefluxPoint::default(),
            tz,
            now,
            phases: usize::from(c.grid.phases),
            nominal_v: c.grid.nominal_voltage_v,
            inverters,
            base_load_w: s.base_load_w,
            peak_load_w: s.peak_load_w,
            phase_shares: s.load_phase_shares,
            noise_pct: s.load_noise_pct,
            ac_pv_peak_w: s.ac_pv_peak_w,
            sky: SimSky::from_config(c),
            load_step_w: 0.0,
            ramp_w_per_s_pct: s.ramp_pct_per_s,
            frequency_hz: 50.0,
            truth: PhaseTruth::default(),
            grid_import_wh: 0.0,
            grid_export_wh: 0.0,
            ac_pv_wh: 0.0,
            noise: [0.0; 3],
            rng: SmallRng::seed_from_u64(s.seed),
        };
        m.step(0.0);
        m
    }

    pub fn local_now(&self) -> NaiveDateTime {
        self.now.with_timezone(&self.tz).naive_local()
    }

    fn shares(&self) -> [f64; 3] {
        if self.phases == 1 {
            return [1.0, 0.0, 0.0];
        }
        let sum: f64 = self.phase_shares.iter().sum();
        if sum <= 0.0 {
            [1.0 / 3.0; 3]
        } else {
            self.phase_shares.map(|s| s / sum)
        }
    }

    fn gaussian(&mut self) -> f64 {
        // Box–Muller.
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Advance the site by `dt_s` simulated seconds.
    pub fn step(&mut self, dt_s: f64) {
        self.now += chrono::Duration::milliseconds((dt_s * 1000.0).round() as i64);
        let local = self.local_now();
        let sun = match &self.sky {
            Some(sky) => sky.factor(self.now, self.tz),
            None => clear_sky(local),
        };
        let shares = self.shares();

        // Load per phase, with slowly wandering noise.
        let total_load =
            self.base_load_w + (self.peak_load_w - self.base_load_w) * load_shape(local);
        let mut load = [0.0; 3];
        for (p, l) in load.iter_mut().enumerate() {
            if shares[p] == 0.0 {
                continue;
            }
            let alpha = (dt_s / 30.0).min(1.0);
            let g = self.gaussian();
            self.noise[p] =
                (1.0 - alpha) * self.noise[p] + alpha.sqrt() * g * self.noise_pct / 100.0;
            *l = ((total_load + self.load_step_w) * shares[p] * (1.0 + self.noise[p])).max(0.0);
        }

        // AC-coupled PV behind the PV meter: on L1 of a single-phase site, balanced otherwise.
        let ac_pv_total = self.ac_pv_peak_w * sun;
        let mut ac_pv = [0.0; 3];
        for v in ac_pv.iter_mut().take(self.phases) {
            *v = ac_pv_total / self.phases as f64;
        }

        // Firmware: each unit picks a battery target from its AppMode.
        let site_need_w: f64 = load.iter().sum::<f64>() - ac_pv_total;
        // Units that do not balance the site themselves: passive hybrids and PV-only units.
        let balances =
            |i: &SimInverter| i.app_mode() != app_mode::PASSIVE && i.battery.capacity_wh > 0.0;
        let passive_ac: f64 = self
            .inverters
            .iter()
            .filter(|i| !balances(i))
            .map(|i| i.ac_w)
            .sum();
        let self_use_rating: f64 = self
            .inverters
            .iter()
            .filter(|i| balances(i))
            .map(|i| i.rated_w)
            .sum();
        let now = self.now;
        let pv_now: Vec<f64> = self.inverters.iter().map(|i| i.pv_peak_w * sun).collect();
        // What the units' own meters saw last tick (under `AntiRefluxPoint::Site`).
        let site_export_w = -self.truth.grid_w.iter().sum::<f64>();
        let anti_reflux_at = self.anti_reflux_at;
        for (inv, pv_avail) in self.inverters.iter_mut().zip(pv_now) {
            if let Some(ss) = inv.sunspec.as_mut() {
                ss.tick(now);
            }
            let (max_charge, max_discharge) = inv.battery_window();
            let target = match inv.app_mode() {
                _ if inv.battery.capacity_wh <= 0.0 => 0.0,
                app_mode::PASSIVE if inv.ignores_setpoint => inv.battery_w,
                app_mode::PASSIVE => match inv.setting(reg::PASSIVE_ENABLE) {
                    passive::DISCHARGE => {
                        saj::permille_to_watts(inv.setting(reg::PASSIVE_BAT_DISCHARGE), inv.rated_w)
                    }
                    passive::CHARGE => {
                        -saj::permille_to_watts(inv.setting(reg::PASSIVE_BAT_CHARGE), inv.rated_w)
                    }
                    _ => 0.0,
                },
                mode => {
                    // Self-use (and the modes built on it): share the site's need by rating.
                    let share = (site_need_w - passive_ac) * inv.rated_w / self_use_rating.max(1.0);
                    let t = share - pv_avail;
                    if mode == app_mode::BACKUP {
                        let reserve = f64::from(inv.setting(reg::BACKUP_RESERVE_SOC));
                        if inv.soc_pct < reserve {
                            -max_charge
                        } else if inv.soc_pct < reserve + 0.5 {
                            // At the reserve: neither charge nor discharge below it.
                            0.0
                        } else {
                            t
                        }
                    } else {
                        t
                    }
                }
            };
            // A SunSpec unit's 124 rates bound what its own self-consumption picks.
            let target = match inv
                .sunspec
                .as_ref()
                .and_then(|ss| ss.storage_window_w(inv.battery.max_charge_w))
            {
                Some((lo, hi)) => target.max(lo).min(hi),
                None => target,
            };
            let target = target.clamp(-max_charge, max_discharge);
            let ramp = inv.rated_w * self.ramp_w_per_s_pct / 100.0 * dt_s;
            inv.battery_w += (target - inv.battery_w).clamp(-ramp, ramp);
            inv.battery_w = inv.battery_w.clamp(-max_charge, max_discharge);

            if inv.setting(reg::INVERTER_STOP) == 1 {
                inv.battery_w = 0.0;
                inv.pv_w = 0.0;
                inv.ac_w = 0.0;
                continue;
            }
            // Output cap: curtail PV first, then the discharge.
            let cap = match &inv.sunspec {
                Some(ss) => ss.cap_w(inv.rated_w),
                None => {
                    inv.regulate_export(site_export_w, dt_s);
                    inv.output_cap_w(anti_reflux_at)
                }
            };
            inv.pv_w = pv_avail.min((cap - inv.battery_w).max(0.0));
            if inv.pv_w + inv.battery_w > cap {
                inv.battery_w = cap - inv.pv_w;
            }
            // Charging from the grid is bounded by the unit's rating.
            if inv.pv_w + inv.battery_w < -inv.rated_w {
                inv.battery_w = -inv.rated_w - inv.pv_w;
            }
            inv.ac_w = inv.pv_w + inv.battery_w;

            let dt_h = dt_s / 3600.0;
            let cap_wh = inv.battery.capacity_wh.max(1.0);
            if inv.battery_w >= 0.0 {
                inv.soc_pct -=
                    inv.battery_w * dt_h / inv.battery.discharge_efficiency / cap_wh * 100.0;
                inv.discharged_wh += inv.battery_w * dt_h;
            } else {
                inv.soc_pct -=
                    inv.battery_w * dt_h * inv.battery.charge_efficiency / cap_wh * 100.0;
                inv.charged_wh -= inv.battery_w * dt_h;
            }
            inv.soc_pct = inv.soc_pct.clamp(0.0, 100.0);
            inv.pv_wh += inv.pv_w * dt_h;
        }

        // Grid per phase = load − inverter output − AC-coupled PV.
        let mut grid = load;
        for (p, g) in grid.iter_mut().enumerate() {
            *g -= ac_pv[p];
        }
        for inv in &self.inverters {
            let n = inv.phases.len() as f64;
            for ph in &inv.phases {
                grid[ph.index()] -= inv.ac_w / n;
            }
        }
        let mut voltage = [0.0; 3];
        for p in 0..self.phases {
            // Export raises the local voltage a little, import lowers it.
            voltage[p] =
                self.nominal_v - grid[p] * 0.0001 + 0.3 * self.gaussian().clamp(-2.0, 2.0) * 0.1;
        }
        self.frequency_hz = 50.0 + 0.01 * self.gaussian().clamp(-2.0, 2.0);
        let dt_h = dt_s / 3600.0;
        let net: f64 = grid.iter().sum();
        if net >= 0.0 {
            self.grid_import_wh += net * dt_h;
        } else {
            self.grid_export_wh -= net * dt_h;
        }
        self.ac_pv_wh += ac_pv_total * dt_h;
        self.truth = PhaseTruth {
            load_w: load,
            ac_pv_w: ac_pv,
            grid_w: grid,
            voltage_v: voltage,
        };
    }

    pub fn inverter_mut(&mut self, id: &str) -> Option<&mut SimInverter> {
        self.inverters.iter_mut().find(|i| i.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> SiteModel {
        let c = SiteConfig::load(std::path::Path::new("sites/demo.yaml")).unwrap();
        SiteModel::new(&c)
    }

    #[test]
    fn the_export_limit_acts_only_with_anti_reflux_on_and_a_mode_chosen() {
        let mut m = model();
        let i = &mut m.inverters[0];
        i.settings.insert(reg::ANTI_REFLUX_POWER, 200);
        i.settings.insert(reg::ANTI_REFLUX_MODE, 1);
        // 0x3635 defaults to 1 (on, the unit's own meter).
        assert_eq!(i.output_cap_w(AntiRefluxPoint::Output), 2000.0);
        i.settings.insert(reg::PREVENT_REVERSE_FLOW, 0);
        assert_eq!(i.output_cap_w(AntiRefluxPoint::Output), i.rated_w);
        i.settings.insert(reg::PREVENT_REVERSE_FLOW, 1);
        i.settings.insert(reg::ANTI_REFLUX_MODE, 0);
        assert_eq!(i.output_cap_w(AntiRefluxPoint::Output), i.rated_w);
    }

    #[test]
    fn at_the_site_meter_the_units_hold_the_site_export_at_their_limit() {
        let mut m = model();
        m.anti_reflux_at = AntiRefluxPoint::Site;
        m.now = parse_local_start("2026-06-21T12:00", m.tz).unwrap();
        // Full batteries: without the limit, the surplus would be exported.
        for i in m.inverters.iter_mut() {
            i.soc_pct = 100.0;
        }
        for _ in 0..100 {
            m.step(0.1);
        }
        let free = -m.truth.grid_w.iter().sum::<f64>();
        assert!(free > 5000.0, "surplus exported without a limit: {free} W");
        for i in m.inverters.iter_mut() {
            i.settings.insert(reg::ANTI_REFLUX_POWER, 0);
            i.settings.insert(reg::ANTI_REFLUX_MODE, 1);
        }
        for _ in 0..600 {
            m.step(0.1);
        }
        let export = -m.truth.grid_w.iter().sum::<f64>();
        assert!(export.abs() < 100.0, "site export {export} W");
        assert!(
            m.inverters.iter().any(|i| i.ac_w > 100.0),
            "units still deliver"
        );
    }

    #[test]
    fn power_balances_on_every_phase() {
        let mut m = model();
        for _ in 0..50 {
            m.step(1.0);
        }
        let t = &m.truth;
        for p in 0..3 {
            let inv: f64 = m.inverters.iter().map(|i| i.ac_w / 3.0).sum();
            assert!((t.grid_w[p] - (t.load_w[p] - inv - t.ac_pv_w[p])).abs() < 1e-6);
        }
    }

    #[test]
    fn self_use_drives_grid_towards_zero_and_passive_follows_setpoint() {
        let mut m = model();
        for _ in 0..120 {
            m.step(1.0);
        }
        let grid: f64 = m.truth.grid_w.iter().sum();
        assert!(
            grid.abs() < 2000.0,
            "self-use should settle near zero grid, got {grid}"
        );

        let inv = &mut m.inverters[0];
        inv.settings.insert(reg::APP_MODE, app_mode::PASSIVE);
        inv.settings.insert(reg::PASSIVE_ENABLE, passive::DISCHARGE);
        inv.settings.insert(reg::PASSIVE_BAT_DISCHARGE, 300);
        for _ in 0..30 {
            m.step(1.0);
        }
        assert!((m.inverters[0].battery_w - 3000.0).abs() < 1.0);
    }

    #[test]
    fn output_cap_curtails_pv_first() {
        let mut m = model();
        let inv = &mut m.inverters[0];
        inv.settings.insert(reg::APP_MODE, app_mode::PASSIVE);
        inv.settings.insert(reg::PASSIVE_ENABLE, passive::STANDBY);
        inv.settings.insert(reg::ANTI_REFLUX_MODE, 1);
        inv.settings.insert(reg::ANTI_REFLUX_POWER, 100);
        for _ in 0..5 {
            m.step(1.0);
        }
        assert!(m.inverters[0].ac_w <= 1000.0 + 1e-6);
        assert!(m.inverters[0].pv_w <= 1000.0 + 1e-6);
    }

    #[test]
    fn clear_sky_is_zero_at_night_and_peaks_midday() {
        let d = chrono::NaiveDate::from_ymd_opt(2026, 6, 21).unwrap();
        assert_eq!(clear_sky(d.and_hms_opt(1, 0, 0).unwrap()), 0.0);
        assert!(clear_sky(d.and_hms_opt(13, 0, 0).unwrap()) > 0.95);
    }
}
