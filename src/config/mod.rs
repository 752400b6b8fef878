//! The site file: what is installed, how it is wired, and the limits it must keep.
//!
//! Parsing is strict (`deny_unknown_fields`) and every error, from a YAML syntax slip to a
//! topology rule of the vendor's wiring guide, names `file:line:col` and how to fix it.

mod locate;
mod validate;

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::calendar::{ClockTime, Days, Window};

pub use locate::{Locator, PathSeg};

/// A whole site file, as written by the installer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site: SiteInfo,
    pub grid: GridConfig,
    pub export_limit: GridLimitConfig,
    #[serde(default)]
    pub import_limit: Option<GridLimitConfig>,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub working_mode: WorkingModeConfig,
    #[serde(default)]
    pub api: ApiConfig,
    pub links: Vec<LinkConfig>,
    pub meters: Vec<MeterConfig>,
    pub inverters: Vec<InverterConfig>,
    /// Time-of-use optimisation; absent means no planner (plan mode then runs
    /// self-consumption).
    #[serde(default)]
    pub planner: Option<PlannerConfig>,
    /// Demand response from aggregators; absent means the DR API is off.
    #[serde(default)]
    pub dr: Option<DrConfig>,
    /// Embedded SQLite store for the site's history; none when absent.
    #[serde(default)]
    pub store: Option<StoreConfig>,
    #[serde(default)]
    pub simulation: SimulationConfig,
}

/// A price that depends on weekday and time of day (site timezone), the way installers set
/// tariffs in the vendor app. The first matching period wins; `default` covers the rest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouTariff {
    /// Price per kWh outside every period.
    pub default: f64,
    #[serde(default)]
    pub periods: Vec<PricePeriod>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricePeriod {
    /// Empty means every day.
    #[serde(default)]
    pub days: Vec<Weekday>,
    /// `HH:MM` in the site timezone; an end at or before the start runs past midnight.
    pub start: ClockTime,
    pub end: ClockTime,
    /// Per kWh; may be negative.
    pub price: f64,
}

impl PricePeriod {
    pub fn window(&self) -> Window {
        window(&self.days, self.start, self.end)
    }
}

fn window(days: &[Weekday], start: ClockTime, end: ClockTime) -> Window {
    Window {
        days: Days::from_indices(days.iter().map(|d| *d as u8)),
        start,
        end,
    }
}

/// Where a price or power series comes from: time-of-use periods, or a CSV file of
/// `start,value` rows (RFC 3339 start, 15-min or hourly).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSource {
    #[serde(default)]
    pub tou: Option<TouTariff>,
    #[serde(default)]
    pub csv: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PvForecastConfig {
    /// The PV arrays: a clear sky at `site.location` on each (see `sky`).
    #[serde(default)]
    pub arrays: Vec<ArrayConfig>,
    /// The air's Linke turbidity for the clear-sky model (3 when absent).
    #[serde(default)]
    pub linke_turbidity: Option<f64>,
    /// Days of stored history the clear sky is corrected from (measured ÷ clear sky by hour
    /// of day); 0 turns the correction off. Needs `store`.
    #[serde(default = "default_learn_days")]
    pub learn_days: u32,
    /// A weather service's PV or irradiance forecast, used while fresh (with `arrays`).
    #[serde(default)]
    pub weather: Option<WeatherConfig>,
    /// A fixed daily curve scaled to this peak (W), the same in every season and place; for
    /// sites without a location.
    #[serde(default)]
    pub peak_w: Option<f64>,
    #[serde(default)]
    pub csv: Option<String>,
}

/// Where a weather forecast comes from and how often.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeatherConfig {
    /// `open_meteo` (hourly irradiance) or `forecast_solar` (watts).
    pub service: crate::planner::weather::Service,
    /// `https://...`, or a file path.
    pub url: String,
    #[serde(default = "default_refresh_min")]
    pub refresh_min: f64,
    /// Older than this, the forecast is not used.
    #[serde(default = "default_stale_after_h")]
    pub stale_after_h: f64,
}

fn default_refresh_min() -> f64 {
    60.0
}
fn default_stale_after_h() -> f64 {
    6.0
}

/// One PV array.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrayConfig {
    pub kwp: f64,
    /// 0 flat, 90 vertical.
    pub tilt_deg: f64,
    /// Clockwise from north: 180 faces south.
    pub azimuth_deg: f64,
    #[serde(default = "default_losses_pct")]
    pub losses_pct: f64,
    /// The AC rating of the inverter(s) behind this array: output is clipped there.
    #[serde(default)]
    pub ac_limit_w: Option<f64>,
}

fn default_learn_days() -> u32 {
    14
}

fn default_losses_pct() -> f64 {
    14.0
}

impl ArrayConfig {
    /// The inverter's AC limit on this array, W (no limit when not given).
    pub fn ac_cap_w(&self) -> f64 {
        self.ac_limit_w.unwrap_or(f64::INFINITY)
    }

    pub fn array(&self) -> crate::sky::Array {
        crate::sky::Array {
            kwp: self.kwp,
            tilt_deg: self.tilt_deg,
            azimuth_deg: self.azimuth_deg,
            losses_pct: self.losses_pct,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadForecastConfig {
    /// 24 hourly values (W) for a typical day; with `history_weeks`, used where the history
    /// has no samples.
    #[serde(default)]
    pub profile_w: Option<Vec<f64>>,
    #[serde(default)]
    pub csv: Option<String>,
    /// Forecast from the store: the same weekday and time over the last N weeks.
    #[serde(default)]
    pub history_weeks: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrConfig {
    /// Bearer token aggregators present; prefer `token_env`.
    #[serde(default)]
    pub token: Option<String>,
    /// Name of the environment variable holding the bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// What OpenADR SIMPLE levels 0–3 mean at this site.
    #[serde(default)]
    pub openadr_levels: [crate::dr::LevelLimits; 4],
    /// A Modbus digital-input module wired to the DRED or ripple-control receiver.
    #[serde(default)]
    pub contacts: Option<ContactsConfig>,
    /// The aggregator's MQTT broker.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// Most aggregator events in the book at once (not over yet); more are refused.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Most aggregator events accepted per minute; more are refused (HTTP 429, MQTT
    /// `rejected`) until the minute has passed.
    #[serde(default = "default_max_events_per_min")]
    pub max_events_per_min: u32,
}

fn default_max_events() -> usize {
    200
}
fn default_max_events_per_min() -> u32 {
    60
}

/// MQTT to the aggregator. Topics, under `topic_prefix`: `dr/events` (events in, as JSON like
/// the HTTP API's, or `{"cancel": "<id>"}`), `dr/ack` (acknowledgements out), `telemetry`
/// (grid power, fleet SOC and the limits in force, out every `telemetry_s`), and `status`
/// (`online`, or `offline` as the broker's last will). Events also come in on
/// `<groups_prefix>/<group>/dr/events` for each of the site's `groups`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Unique on the broker; by default `site-ems-<site_id>-<random>`, new at each start,
    /// so two sites never take each other's connection.
    #[serde(default)]
    pub client_id: Option<String>,
    pub topic_prefix: String,
    /// The site's name in acks and telemetry; by default the last part of `topic_prefix`.
    #[serde(default)]
    pub site_id: Option<String>,
    /// Groups this site belongs to: one publish on a group's events topic reaches them all.
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default = "default_groups_prefix")]
    pub groups_prefix: String,
    /// Plain MQTT without TLS or credentials: anyone who can reach the broker can command
    /// the site. Only for a closed test network; `ems check` warns.
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub username: Option<String>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// CA certificate (PEM) to connect with TLS; plain TCP when absent.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Link down longer than this: the fallback limits apply until it is back.
    #[serde(default = "default_heartbeat_s")]
    pub heartbeat_s: f64,
    #[serde(default = "default_telemetry_s")]
    pub telemetry_s: f64,
    #[serde(default)]
    pub fallback: crate::dr::LevelLimits,
}

fn default_mqtt_port() -> u16 {
    1883
}
fn default_groups_prefix() -> String {
    "site-ems/groups".into()
}

impl MqttConfig {
    /// Plain MQTT to `host:port` without TLS or a login (`insecure: true`), topics under
    /// `topic_prefix`, every other setting at its default: for simulated fleets and tests
    /// on loopback.
    pub fn plain(host: &str, port: u16, topic_prefix: &str) -> MqttConfig {
        MqttConfig {
            host: host.into(),
            port,
            client_id: None,
            topic_prefix: topic_prefix.into(),
            site_id: None,
            groups: Vec::new(),
            groups_prefix: default_groups_prefix(),
            username: None,
            password_env: None,
            ca_file: None,
            insecure: true,
            heartbeat_s: default_heartbeat_s(),
            telemetry_s: default_telemetry_s(),
            fallback: Default::default(),
        }
    }

    /// The site's id in acks and telemetry.
    pub fn site_id(&self) -> String {
        self.site_id.clone().unwrap_or_else(|| {
            let prefix = self.topic_prefix.trim_end_matches('/');
            prefix.rsplit('/').next().unwrap_or(prefix).to_string()
        })
    }
}
fn default_heartbeat_s() -> f64 {
    60.0
}
fn default_telemetry_s() -> f64 {
    10.0
}

/// Discrete inputs (FC02) of a contact module: a closed contact reads 1.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactsConfig {
    pub link: String,
    pub unit_id: u8,
    /// Input addresses of DRM0…DRM8 (a DRM is in force while its contact is closed).
    #[serde(default)]
    pub drm_inputs: Option<[u16; 9]>,
    /// Input addresses of the ripple-control steps 100 %, 60 %, 30 %, 0 % (pulses, latched).
    #[serde(default)]
    pub ripple_inputs: Option<[u16; 4]>,
}

impl ContactsConfig {
    /// The block of inputs to read: every configured address. `None` when there are none,
    /// or when they span more than one read can hold (validation refuses that).
    pub fn span(&self) -> Option<(u16, u16)> {
        let all: Vec<u16> = self
            .drm_inputs
            .iter()
            .flatten()
            .chain(self.ripple_inputs.iter().flatten())
            .copied()
            .collect();
        let lo = *all.iter().min()?;
        let hi = *all.iter().max()?;
        let count = u16::try_from(u32::from(hi) - u32::from(lo) + 1).ok()?;
        Some((lo, count))
    }

    /// The inputs span more than `most` addresses.
    pub fn spans_more_than(&self, most: u32) -> bool {
        let all = self
            .drm_inputs
            .iter()
            .flatten()
            .chain(self.ripple_inputs.iter().flatten())
            .map(|a| u32::from(*a));
        let (lo, hi) = all.fold((u32::MAX, 0), |(lo, hi), a| (lo.min(a), hi.max(a)));
        lo <= hi && hi - lo + 1 > most
    }
}

impl Default for DrConfig {
    /// No demand response configured: the site file's defaults for every field.
    fn default() -> DrConfig {
        DrConfig {
            token: None,
            token_env: None,
            openadr_levels: Default::default(),
            contacts: None,
            mqtt: None,
            max_events: default_max_events(),
            max_events_per_min: default_max_events_per_min(),
        }
    }
}

impl DrConfig {
    /// The token in force: from the environment variable if named and set, else the file's.
    pub fn token(&self) -> Option<String> {
        self.token_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok())
            .filter(|t| !t.is_empty())
            .or_else(|| self.token.clone().filter(|t| !t.is_empty()))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite file; created if missing.
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerConfig {
    #[serde(default = "default_horizon_h")]
    pub horizon_h: f64,
    #[serde(default = "default_step_min")]
    pub step_min: u32,
    /// Re-plan this often (and when prices, forecasts or limits change).
    #[serde(default = "default_replan_min")]
    pub replan_min: f64,
    /// A solve that takes longer is abandoned: the EMS runs self-consumption.
    #[serde(default = "default_solve_time_limit_s")]
    pub solve_time_limit_s: f64,
    /// Tie-breaker against needless cycling, per kWh charged or discharged.
    #[serde(default = "default_cycling_cost")]
    pub cycling_cost_per_kwh: f64,
    /// Cost of each kWh outside the SOC bounds (soft, so a plan always exists).
    #[serde(default = "default_soc_penalty")]
    pub soc_penalty_per_kwh: f64,
    /// Value of energy left at the horizon's end; the mean import price × discharge
    /// efficiency when absent, so the plan does not empty the batteries at the end.
    #[serde(default)]
    pub terminal_value_per_kwh: Option<f64>,
    pub import_price: PriceSource,
    pub export_price: PriceSource,
    pub pv_forecast: PvForecastConfig,
    pub load_forecast: LoadForecastConfig,
}

fn default_horizon_h() -> f64 {
    24.0
}
fn default_step_min() -> u32 {
    15
}
fn default_replan_min() -> f64 {
    15.0
}
fn default_solve_time_limit_s() -> f64 {
    5.0
}
fn default_cycling_cost() -> f64 {
    0.005
}
fn default_soc_penalty() -> f64 {
    10.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteInfo {
    pub name: String,
    /// IANA name, e.g. `Europe/London`; time-of-use windows are read in it. Parsed once, at
    /// load: an unknown name is a located error, never a default later.
    pub timezone: SiteTz,
    /// Where the site is: the sun's path for the PV forecast and the simulator.
    #[serde(default)]
    pub location: Option<LocationConfig>,
}

/// The site's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SiteTz(pub chrono_tz::Tz);

impl TryFrom<String> for SiteTz {
    type Error = String;

    fn try_from(s: String) -> Result<SiteTz, String> {
        s.parse()
            .map(SiteTz)
            .map_err(|_| format!("unknown timezone `{s}`"))
    }
}

impl From<chrono_tz::Tz> for SiteTz {
    fn from(tz: chrono_tz::Tz) -> SiteTz {
        SiteTz(tz)
    }
}

impl SiteTz {
    pub fn tz(self) -> chrono_tz::Tz {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationConfig {
    pub latitude: f64,
    /// East positive.
    pub longitude: f64,
    #[serde(default)]
    pub altitude_m: f64,
}

impl LocationConfig {
    pub fn place(&self) -> crate::sky::Place {
        crate::sky::Place {
            latitude_deg: self.latitude,
            longitude_deg: self.longitude,
            altitude_m: self.altitude_m,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridConfig {
    /// 1 or 3.
    pub phases: u8,
    #[serde(default = "default_nominal_voltage")]
    pub nominal_voltage_v: f64,
}

fn default_nominal_voltage() -> f64 {
    230.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitMode {
    /// Sum of all phases.
    TotalPower,
    /// Every phase's current, in A.
    PhaseCurrent,
    /// Every phase's power, in W.
    PhasePower,
}

impl LimitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitMode::TotalPower => "total_power",
            LimitMode::PhaseCurrent => "phase_current",
            LimitMode::PhasePower => "phase_power",
        }
    }
}

/// A limit at the grid connection (the export limit of the connection agreement, or the
/// import limit of a main fuse or peak shaving), with the one value its mode takes. Parsed
/// from `mode` and `limit_w` or `limit_a`; a value missing for its mode, or given for the
/// other mode, is an error at load.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "RawGridLimit")]
pub enum GridLimitConfig {
    /// Sum of all phases, W.
    TotalPower { limit_w: f64 },
    /// Every phase's power, W.
    PhasePower { limit_w: f64 },
    /// Every phase's current, A.
    PhaseCurrent { limit_a: f64 },
}

impl GridLimitConfig {
    pub fn mode(self) -> LimitMode {
        match self {
            GridLimitConfig::TotalPower { .. } => LimitMode::TotalPower,
            GridLimitConfig::PhasePower { .. } => LimitMode::PhasePower,
            GridLimitConfig::PhaseCurrent { .. } => LimitMode::PhaseCurrent,
        }
    }

    /// The limit in W, for the power modes.
    pub fn limit_w(self) -> Option<f64> {
        match self {
            GridLimitConfig::TotalPower { limit_w } | GridLimitConfig::PhasePower { limit_w } => {
                Some(limit_w)
            }
            GridLimitConfig::PhaseCurrent { .. } => None,
        }
    }

    /// The limit over all `phases` together, W (a current at `nominal_v`).
    pub fn total_w(self, phases: u8, nominal_v: f64) -> f64 {
        let phases = f64::from(phases);
        match self {
            GridLimitConfig::TotalPower { limit_w } => limit_w,
            GridLimitConfig::PhasePower { limit_w } => limit_w * phases,
            GridLimitConfig::PhaseCurrent { limit_a } => limit_a * nominal_v * phases,
        }
    }

    /// The limit in A per phase, for `phase_current`.
    pub fn limit_a(self) -> Option<f64> {
        match self {
            GridLimitConfig::PhaseCurrent { limit_a } => Some(limit_a),
            _ => None,
        }
    }
}

/// A grid limit as written: checked into a [`GridLimitConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGridLimit {
    mode: LimitMode,
    #[serde(default)]
    limit_w: Option<f64>,
    #[serde(default)]
    limit_a: Option<f64>,
}

impl TryFrom<RawGridLimit> for GridLimitConfig {
    type Error = String;

    fn try_from(r: RawGridLimit) -> Result<GridLimitConfig, String> {
        let mode = r.mode.as_str();
        match (r.mode, r.limit_w, r.limit_a) {
            (LimitMode::TotalPower, Some(limit_w), None) => {
                Ok(GridLimitConfig::TotalPower { limit_w })
            }
            (LimitMode::PhasePower, Some(limit_w), None) => {
                Ok(GridLimitConfig::PhasePower { limit_w })
            }
            (LimitMode::PhaseCurrent, None, Some(limit_a)) => {
                Ok(GridLimitConfig::PhaseCurrent { limit_a })
            }
            (LimitMode::PhaseCurrent, _, None) => Err(format!(
                "mode `{mode}` needs `limit_a` (amperes per phase), not limit_w"
            )),
            (LimitMode::PhaseCurrent, Some(_), Some(_)) => Err(format!(
                "mode `{mode}` takes `limit_a` only: remove limit_w"
            )),
            (_, None, _) => Err(format!(
                "mode `{mode}` needs `limit_w` (watts; 0 means none), not limit_a"
            )),
            (_, Some(_), Some(_)) => Err(format!(
                "mode `{mode}` takes `limit_w` only: remove limit_a"
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default = "default_cycle_ms")]
    pub cycle_ms: u64,
    /// Grid meter silent for longer than this: every inverter goes to the safe state.
    #[serde(default = "default_fail_safe_after_s")]
    pub fail_safe_after_s: f64,
    /// A device whose last good read is older than this is stale.
    #[serde(default = "default_stale_after_s")]
    pub stale_after_s: f64,
    /// Aim this far inside the export and import limits, so meter noise does not cross them.
    #[serde(default = "default_grid_margin_w")]
    pub grid_margin_w: f64,
    /// An export excursion this long or longer is flagged in `ems report`: 15 s, the length
    /// at which G100 Issue 2 counts an excursion (stage 2).
    #[serde(default = "default_excursion_allowed_s")]
    pub excursion_allowed_s: f64,
    /// Fastest rise of an inverter's output, in % of its rating per second. Falls are
    /// applied in the same cycle.
    #[serde(default = "default_ramp_pct_per_s")]
    pub ramp_pct_per_s: f64,
    /// Setpoint changes smaller than this are not sent (stops hunting and flash wear).
    #[serde(default = "default_deadband_w")]
    pub deadband_w: f64,
    /// A grid meter whose readings stay identical this long while the fleet's output
    /// changes is frozen (a gateway repeating its cache) and counts as lost.
    #[serde(default = "default_frozen_after_s")]
    pub frozen_after_s: f64,
    /// Setpoint changes smaller than this share of a unit's rating are not sent either.
    #[serde(default = "default_deadband_pct")]
    pub deadband_pct: f64,
    /// Least time between two writes of one register (or of the battery registers as a
    /// group) that are not safety decreases: inverter settings live in memory of limited
    /// write endurance.
    #[serde(default = "default_min_write_interval_s")]
    pub min_write_interval_s: f64,
    /// Least time a battery keeps its direction (charge, discharge) before it may turn,
    /// unless the grid limit needs it now.
    #[serde(default = "default_direction_dwell_s")]
    pub direction_dwell_s: f64,
    /// A unit whose measured battery power stays further than `follow_tolerance_pct` of its
    /// rating from its setpoint for this long is `not_following`.
    #[serde(default = "default_follow_after_s")]
    pub follow_after_s: f64,
    #[serde(default = "default_follow_tolerance_pct")]
    pub follow_tolerance_pct: f64,
    /// What the units are left with when the EMS stops.
    #[serde(default)]
    pub on_stop: OnStop,
    /// Which limit holds when an export limit and an import limit cannot both be met
    /// (an unbalanced site, or loads and generation the EMS does not control).
    #[serde(default)]
    pub conflict_priority: ConflictPriority,
}

/// The limit that holds in a conflict between an export and an import limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPriority {
    /// The export limit (the grid connection agreement) holds; import is kept as low as it
    /// then can be.
    #[default]
    Export,
    /// The import limit (the fuse) holds; export is kept as low as it then can be.
    Import,
}

/// What a clean stop leaves on each unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnStop {
    /// Battery idle and an inverter-side limit at the unit's share of the site's export
    /// limit (and of demand-response limits in force), which holds without the EMS.
    #[default]
    Safe,
    /// The unit's own settings back, but never export limiting off on a site that has a
    /// limit: the inverter-side limit stays at the unit's share or lower.
    Release,
}

fn default_deadband_pct() -> f64 {
    1.0
}
fn default_min_write_interval_s() -> f64 {
    10.0
}
fn default_direction_dwell_s() -> f64 {
    30.0
}
fn default_follow_after_s() -> f64 {
    30.0
}
fn default_follow_tolerance_pct() -> f64 {
    10.0
}

fn default_frozen_after_s() -> f64 {
    10.0
}

fn default_excursion_allowed_s() -> f64 {
    15.0
}

fn default_grid_margin_w() -> f64 {
    50.0
}
fn default_ramp_pct_per_s() -> f64 {
    20.0
}
fn default_deadband_w() -> f64 {
    50.0
}

fn default_cycle_ms() -> u64 {
    1000
}
fn default_fail_safe_after_s() -> f64 {
    2.0
}
fn default_stale_after_s() -> f64 {
    3.0
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            cycle_ms: default_cycle_ms(),
            fail_safe_after_s: default_fail_safe_after_s(),
            stale_after_s: default_stale_after_s(),
            grid_margin_w: default_grid_margin_w(),
            excursion_allowed_s: default_excursion_allowed_s(),
            ramp_pct_per_s: default_ramp_pct_per_s(),
            deadband_w: default_deadband_w(),
            frozen_after_s: default_frozen_after_s(),
            deadband_pct: default_deadband_pct(),
            min_write_interval_s: default_min_write_interval_s(),
            direction_dwell_s: default_direction_dwell_s(),
            follow_after_s: default_follow_after_s(),
            follow_tolerance_pct: default_follow_tolerance_pct(),
            on_stop: OnStop::default(),
            conflict_priority: ConflictPriority::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WorkingMode {
    #[default]
    SelfConsumption,
    TimeOfUse,
    Backup,
    /// Follow the optimiser's plan; self-consumption where it is silent.
    Plan,
}

impl WorkingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkingMode::SelfConsumption => "self_consumption",
            WorkingMode::TimeOfUse => "time_of_use",
            WorkingMode::Backup => "backup",
            WorkingMode::Plan => "plan",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WorkingModeConfig {
    #[serde(default)]
    pub mode: WorkingMode,
    /// Charge and discharge windows for `time_of_use`.
    #[serde(default)]
    pub periods: Vec<TouPeriod>,
    /// Back-up reserve: below it the batteries only charge.
    #[serde(default)]
    pub reserve_soc_pct: Option<f64>,
}

impl WorkingModeConfig {
    /// The SOC kept for outages, %: the reserve in `backup` mode (which validation requires
    /// to be given), none in the other modes.
    pub fn reserve_pct(&self) -> f64 {
        match (self.mode, self.reserve_soc_pct) {
            (WorkingMode::Backup, Some(pct)) => pct,
            _ => 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TouKind {
    Charge,
    Discharge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouPeriod {
    pub kind: TouKind,
    /// Empty means every day.
    #[serde(default)]
    pub days: Vec<Weekday>,
    /// `HH:MM` in the site timezone.
    pub start: ClockTime,
    /// `HH:MM`; an end at or before the start runs past midnight (the window belongs to
    /// the day it starts on).
    pub end: ClockTime,
    /// Fleet battery power in the window; the fleet's rating when absent.
    #[serde(default)]
    pub power_w: Option<f64>,
}

impl TouPeriod {
    pub fn window(&self) -> Window {
        window(&self.days, self.start, self.end)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_string()
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_listen(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// Modbus TCP over the LAN.
    Tcp,
    /// Modbus RTU on an RS485 A/B pair.
    Rtu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// One transport: a TCP endpoint or one RS485 pair. Every link gets its own task that
/// serialises its requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: LinkKind,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub baud: Option<u32>,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// Per-request timeout.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// RTU: silence after each transaction; 3.5 character times when absent. Some shared
    /// buses need 25 ms or more.
    #[serde(default)]
    pub gap_ms: Option<f64>,
}

impl LinkConfig {
    /// A TCP link's host and port (502, the Modbus TCP port, unless given); `None` on an
    /// RTU link or one without a host (validation refuses both for `type: tcp`).
    pub fn tcp_endpoint(&self) -> Option<(&str, u16)> {
        match (self.kind, self.host.as_deref()) {
            (LinkKind::Tcp, Some(host)) if !host.is_empty() => {
                Some((host, self.port.unwrap_or(502)))
            }
            _ => None,
        }
    }

    /// An RTU link's serial device; `None` on a TCP link or one without a device.
    pub fn serial_device(&self) -> Option<&str> {
        match (self.kind, self.device.as_deref()) {
            (LinkKind::Rtu, Some(d)) if !d.is_empty() => Some(d),
            _ => None,
        }
    }

    /// An RTU link's line speed (validation requires it on `type: rtu`); 9600, the devices'
    /// factory setting, stands in on a TCP link, where it only sizes nothing.
    pub fn baud_rate(&self) -> u32 {
        self.baud.unwrap_or(9600)
    }

    /// Two stop bits rather than one (8N1 when not given).
    pub fn two_stop_bits(&self) -> bool {
        self.stop_bits == Some(2)
    }

    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(match self.kind {
            LinkKind::Tcp => 500,
            LinkKind::Rtu => 1000,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeterRole {
    /// At the grid connection point (Modbus address 1).
    Grid,
    /// On the AC-coupled solar inverter's output (Modbus address 2).
    Pv,
}

impl MeterRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MeterRole::Grid => "grid",
            MeterRole::Pv => "pv",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeterModel {
    /// Chint three-phase.
    Dtsu666,
    /// Chint single-phase.
    Ddsu666,
    /// Any SunSpec meter (models 201–204), found by discovery.
    Sunspec,
}

impl MeterModel {
    pub fn as_str(self) -> &'static str {
        match self {
            MeterModel::Dtsu666 => "dtsu666",
            MeterModel::Ddsu666 => "ddsu666",
            MeterModel::Sunspec => "sunspec",
        }
    }
    /// Phases the model measures; `None` when the device says (SunSpec: 201 or 203).
    pub fn phases(self) -> Option<u8> {
        match self {
            MeterModel::Dtsu666 => Some(3),
            MeterModel::Ddsu666 => Some(1),
            MeterModel::Sunspec => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    pub id: String,
    pub role: MeterRole,
    pub model: MeterModel,
    pub link: String,
    pub unit_id: u8,
    /// The CT or meter is wired backwards: flip the sign of its power.
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum InverterModel {
    #[serde(rename = "saj-h2")]
    SajH2,
    #[serde(rename = "saj-hs2")]
    SajHs2,
    #[serde(rename = "saj-hs3")]
    SajHs3,
    /// Any inverter that implements the SunSpec models (found by discovery).
    #[serde(rename = "sunspec")]
    Sunspec,
}

impl InverterModel {
    pub fn as_str(self) -> &'static str {
        match self {
            InverterModel::SajH2 => "saj-h2",
            InverterModel::SajHs2 => "saj-hs2",
            InverterModel::SajHs3 => "saj-hs3",
            InverterModel::Sunspec => "sunspec",
        }
    }

    /// SAJ hybrids always have a battery; a SunSpec unit may be PV only.
    pub fn is_saj(self) -> bool {
        !matches!(self, InverterModel::Sunspec)
    }
}

/// A grid phase. Single-phase grids use L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
pub enum Phase {
    L1,
    L2,
    L3,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::L1, Phase::L2, Phase::L3];
    pub fn index(self) -> usize {
        match self {
            Phase::L1 => 0,
            Phase::L2 => 1,
            Phase::L3 => 2,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::L1 => "L1",
            Phase::L2 => "L2",
            Phase::L3 => "L3",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatteryConfig {
    pub capacity_wh: f64,
    pub max_charge_w: f64,
    pub max_discharge_w: f64,
    #[serde(default = "default_efficiency")]
    pub charge_efficiency: f64,
    #[serde(default = "default_efficiency")]
    pub discharge_efficiency: f64,
    #[serde(default = "default_soc_min")]
    pub soc_min_pct: f64,
    #[serde(default = "default_soc_max")]
    pub soc_max_pct: f64,
}

fn default_efficiency() -> f64 {
    0.95
}
fn default_soc_min() -> f64 {
    10.0
}
fn default_soc_max() -> f64 {
    100.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InverterConfig {
    pub id: String,
    pub model: InverterModel,
    pub rated_power_w: f64,
    /// 3 for a three-phase unit; single-phase units name their `phase` instead.
    #[serde(default)]
    pub phases: Option<u8>,
    #[serde(default)]
    pub phase: Option<Phase>,
    pub link: String,
    pub unit_id: u8,
    /// Absent on a PV-only unit (a SunSpec PV inverter): it is curtailed, never dispatched.
    #[serde(default)]
    pub battery: Option<BatteryConfig>,
    /// DC PV on this hybrid, W peak. The planner gives the unit this share of the site's PV
    /// forecast and keeps its PV and battery together within `rated_power_w`.
    #[serde(default)]
    pub pv_peak_w: Option<f64>,
}

/// A unit without a battery: no capacity, no power.
const NO_BATTERY: BatteryConfig = BatteryConfig {
    capacity_wh: 0.0,
    max_charge_w: 0.0,
    max_discharge_w: 0.0,
    charge_efficiency: 1.0,
    discharge_efficiency: 1.0,
    soc_min_pct: 0.0,
    soc_max_pct: 100.0,
};

impl InverterConfig {
    /// The unit's battery; a PV-only unit has one of no capacity and no power.
    pub fn battery(&self) -> &BatteryConfig {
        self.battery.as_ref().unwrap_or(&NO_BATTERY)
    }

    pub fn has_battery(&self) -> bool {
        self.battery.is_some()
    }

    /// The phases this unit feeds. Validation guarantees `phases`/`phase` agree with the grid.
    pub fn ac_phases(&self) -> Vec<Phase> {
        if self.phases == Some(3) {
            Phase::ALL.to_vec()
        } else {
            vec![self.phase.unwrap_or(Phase::L1)]
        }
    }
}

/// Knobs for `--simulate` and `ems simulate`; ignored on a real site.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationConfig {
    /// Simulated seconds per real second.
    #[serde(default = "default_time_factor")]
    pub time_factor: f64,
    /// Local start time `YYYY-MM-DDTHH:MM` in the site timezone; now when absent.
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Site load, split over the phases by `load_phase_shares`.
    #[serde(default = "default_base_load")]
    pub base_load_w: f64,
    #[serde(default = "default_peak_load")]
    pub peak_load_w: f64,
    #[serde(default = "default_phase_shares")]
    pub load_phase_shares: [f64; 3],
    #[serde(default = "default_noise")]
    pub load_noise_pct: f64,
    /// DC PV peak per inverter, as a fraction of its rating.
    #[serde(default = "default_pv_ratio")]
    pub pv_peak_ratio: f64,
    /// AC-coupled solar inverter behind the PV meter.
    #[serde(default)]
    pub ac_pv_peak_w: f64,
    /// Clouds over the simulated site, 0 (always clear) to 1 (overcast at times every day).
    /// With `site.location`, the simulated sun is the forecast's clear sky (`sky`), dimmed by
    /// these clouds, so forecasts meet real errors.
    #[serde(default)]
    pub cloudiness: f64,
    #[serde(default = "default_initial_soc")]
    pub initial_soc_pct: f64,
    /// How fast simulated firmware moves towards its setpoint, in % of rated per second.
    #[serde(default = "default_ramp")]
    pub ramp_pct_per_s: f64,
    /// Wiring mistakes built into the simulated site, for the wiring check (`ems commission`)
    /// to find.
    #[serde(default)]
    pub wiring_faults: Vec<WiringFault>,
}

/// A wiring mistake in the simulated site.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawWiringFault")]
pub enum WiringFault {
    /// The CT of one phase of a meter is on backwards: that phase reads with the wrong sign.
    CtReversed { meter: String, phase: Phase },
    /// A whole meter is wired backwards (every phase, and its total).
    MeterReversed { meter: String },
    /// A single-phase inverter is connected to another phase than the site file says.
    WrongPhase {
        inverter: String,
        actual_phase: Phase,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWiringFault {
    fault: String,
    #[serde(default)]
    meter: Option<String>,
    #[serde(default)]
    phase: Option<Phase>,
    #[serde(default)]
    inverter: Option<String>,
    #[serde(default)]
    actual_phase: Option<Phase>,
}

impl TryFrom<RawWiringFault> for WiringFault {
    type Error = String;

    fn try_from(r: RawWiringFault) -> Result<WiringFault, String> {
        match (r.fault.as_str(), r.meter, r.phase, r.inverter, r.actual_phase) {
            ("ct_reversed", Some(meter), Some(phase), None, None) => {
                Ok(WiringFault::CtReversed { meter, phase })
            }
            ("reversed", Some(meter), None, None, None) => Ok(WiringFault::MeterReversed { meter }),
            ("wrong_phase", None, None, Some(inverter), Some(actual_phase)) => {
                Ok(WiringFault::WrongPhase {
                    inverter,
                    actual_phase,
                })
            }
            (f, ..) => Err(format!(
                "wiring fault `{f}` is not one of: ct_reversed (with meter and phase), reversed (with meter), wrong_phase (with inverter and actual_phase)"
            )),
        }
    }
}

fn default_time_factor() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    1
}
fn default_base_load() -> f64 {
    3000.0
}
fn default_peak_load() -> f64 {
    9000.0
}
fn default_phase_shares() -> [f64; 3] {
    [0.4, 0.35, 0.25]
}
fn default_noise() -> f64 {
    3.0
}
fn default_pv_ratio() -> f64 {
    0.8
}
fn default_initial_soc() -> f64 {
    50.0
}
fn default_ramp() -> f64 {
    50.0
}

impl Default for SimulationConfig {
    fn default() -> Self {
        SimulationConfig {
            time_factor: default_time_factor(),
            start: None,
            seed: default_seed(),
            base_load_w: default_base_load(),
            peak_load_w: default_peak_load(),
            load_phase_shares: default_phase_shares(),
            load_noise_pct: default_noise(),
            pv_peak_ratio: default_pv_ratio(),
            ac_pv_peak_w: 0.0,
            cloudiness: 0.0,
            initial_soc_pct: default_initial_soc(),
            ramp_pct_per_s: default_ramp(),
            wiring_faults: Vec::new(),
        }
    }
}

/// One problem in a site file, located and explained.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}\n  fix: {}",
            self.file, self.line, self.col, self.message, self.hint
        )
    }
}

/// Every problem found in one file, in file order.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl PvForecastConfig {
    /// The air's Linke turbidity for the clear-sky model: as given, or the model's default.
    pub fn linke(&self) -> f64 {
        self.linke_turbidity
            .unwrap_or(crate::sky::DEFAULT_LINKE_TURBIDITY)
    }
}

impl LoadForecastConfig {
    /// The hourly load profile, W (none given: no load beyond what is measured).
    pub fn profile(&self) -> Vec<f64> {
        self.profile_w.clone().unwrap_or_else(|| vec![0.0; 24])
    }
}

impl SiteConfig {
    /// The demand-response settings: as given, or the defaults (HTTP events off, the
    /// intake caps, no OpenADR level limits) for a site file without `dr:`.
    pub fn dr_settings(&self) -> DrConfig {
        self.dr.clone().unwrap_or_default()
    }

    /// Read, parse and validate a site file.
    pub fn load(path: &Path) -> Result<SiteConfig, ConfigErrors> {
        let (config, warnings) = SiteConfig::load_with_warnings(path)?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        Ok(config)
    }

    /// Read, parse and validate a site file; also what is allowed but unwise, located.
    pub fn load_with_warnings(path: &Path) -> Result<(SiteConfig, Vec<ConfigError>), ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                line: 1,
                col: 1,
                message: format!("cannot read the site file: {e}"),
                hint: "check the path and the file's permissions".into(),
            }])
        })?;
        let config = SiteConfig::from_str(&file, &text)?;
        let warnings = validate::warnings(&config, &Locator::new(&text), &file);
        Ok((config, warnings))
    }

    /// Parse and validate site-file text; `file` names it in errors.
    pub fn from_str(file: &str, text: &str) -> Result<SiteConfig, ConfigErrors> {
        let config: SiteConfig = serde_yaml::from_str(text).map_err(|e| {
            let (line, col) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let message = e.to_string();
            // serde_yaml appends " at line X column Y"; we print the location in front instead.
            let message = match message.find(" at line ") {
                Some(i) => message[..i].to_string(),
                None => message,
            };
            // A value refused by its own type (a time zone, a time of day) is reported at the
            // mapping around it, behind that mapping's path; point at the value itself.
            let (line, col, message) = match at_quoted_value(text, line, col, &message) {
                Some((l, c)) => (l, c, without_path(&message).to_string()),
                None => (line, col, message),
            };
            ConfigErrors(vec![ConfigError {
                file: file.to_string(),
                line,
                col,
                hint: parse_hint(&message),
                message,
            }])
        })?;
        let locator = Locator::new(text);
        let mut errors = validate::validate(&config, &locator, file);
        if errors.is_empty() {
            Ok(config)
        } else {
            errors.sort_by_key(|e| (e.line, e.col));
            Err(ConfigErrors(errors))
        }
    }

    pub fn link(&self, name: &str) -> Option<&LinkConfig> {
        self.links.iter().find(|l| l.name == name)
    }

    pub fn grid_meter(&self) -> Option<&MeterConfig> {
        self.meters.iter().find(|m| m.role == MeterRole::Grid)
    }

    pub fn phases(&self) -> Vec<Phase> {
        if self.grid.phases == 3 {
            Phase::ALL.to_vec()
        } else {
            vec![Phase::L1]
        }
    }
}

/// Where the value a message quotes (`like this`) first appears at or after `line:col`.
fn at_quoted_value(text: &str, line: usize, col: usize, message: &str) -> Option<(usize, usize)> {
    let quoted = message.split('`').nth(1).filter(|q| !q.is_empty())?;
    text.lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .find_map(|(k, l)| {
            let from = if k + 1 == line {
                col.saturating_sub(1)
            } else {
                0
            };
            let at = l.get(from..)?.find(quoted)?;
            Some((k + 1, from + at + 1))
        })
}

/// A message without the `path.to.mapping: ` serde puts in front of a nested error.
fn without_path(message: &str) -> &str {
    match message.split_once(": ") {
        Some((path, rest))
            if !path.is_empty()
                && path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c)) =>
        {
            rest
        }
        _ => message,
    }
}

fn parse_hint(message: &str) -> String {
    if message.contains("unknown field") {
        "remove the field or correct its spelling; the message lists the fields allowed here".into()
    } else if message.contains("missing field") {
        "add the field named in the message".into()
    } else if message.contains("unknown variant") {
        "use one of the values the message lists".into()
    } else if message.contains("unknown timezone") {
        "use an IANA timezone name such as Europe/London or Australia/Sydney".into()
    } else if message.contains("is not a time of day") {
        "write the time as HH:MM in the site timezone, e.g. 01:30".into()
    } else if message.contains("needs `limit_") || message.contains("takes `limit_") {
        "give the one value the mode takes: limit_w (W) for total_power and phase_power, limit_a (A per phase) for phase_current".into()
    } else if message.contains("invalid type") {
        "give a value of the type the message expects (numbers without quotes, lists with '-')"
            .into()
    } else {
        "correct the YAML at this position (indentation, a missing ':' or an unclosed quote)".into()
    }
}
