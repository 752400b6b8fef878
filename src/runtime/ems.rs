//! The guard loop: one cycle reads every device, decides, writes the setpoints and
//! publishes — nothing else. Plans arrive from the planner's task, demand-response events
//! from the book in memory, and history rows leave through the store's writer; none of them
//! is waited for here.

use super::supervision::Supervisor;
use crate::commissioning::Observation;
use crate::runtime::commissioning::{CommissionSlot, CommissionState, Commissioning, Conditions};
use crate::runtime::compliance::{Compliance, ExcursionLog};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::demand::{Demand, MqttSide};
use super::devices::Devices;
use super::planning::Planning;
use crate::clock::Clock;
use crate::config::{MeterRole, SiteConfig};
use crate::control::follow::{FollowRule, FollowWatch};
use crate::control::{self, ControlParams, ControlState, Decision};
use crate::dr::book::{DrBook, SharedBook};
use crate::dr::mqtt::Telemetry;
use crate::planner::Plan;
use crate::store::writer::Writer;
use crate::store::{MinuteAverage, Store};
use crate::web::api::{AppState, Published};
use crate::web::metrics::Metrics;
use crate::web::status::{self, LoopStatus};

/// Choices that are not in the site file.
#[derive(Debug, Clone, Default)]
pub struct EmsOptions {
    /// Added to every plan solve: lets tests stand for a slow solve.
    pub plan_delay: Duration,
}

/// History: one row a minute, averaged here, written by the store's writer.
struct History {
    minute: MinuteAverage,
    writer: Writer,
}

/// What the loop publishes and how long its cycles take.
struct Outputs {
    metrics: Arc<Metrics>,
    publish: watch::Sender<Option<Published>>,
    telemetry: watch::Sender<Option<Telemetry>>,
    cycle: u64,
    stats: LoopStatus,
}

pub struct Ems {
    config: SiteConfig,
    clock: Arc<dyn Clock>,
    devices: Devices,
    params: ControlParams,
    state: ControlState,
    decision: Option<Decision>,
    /// Plan-mode targets per inverter set from outside (tests), used when there is no planner.
    plan_override: Option<Vec<Option<f64>>>,
    /// Plan mode had a fresh plan's targets this cycle.
    following_plan: bool,
    planning: Option<Planning>,
    demand: Demand,
    /// Units whose batteries do not do what they are told.
    follow: FollowWatch,
    follow_rule: FollowRule,
    /// The constraints of the last cycle: what a stop must keep.
    constraints: control::Constraints,
    history: Option<History>,
    writer: Option<Writer>,
    out: Outputs,
    forecast_score: crate::planner::score::ForecastScore,
    tz: chrono_tz::Tz,
    /// The export-excursion log.
    compliance: Compliance,
    commissioning: Commissioning,
    commission_slot: CommissionSlot,
}

/// The site's load, PV and grid power this cycle, W, while the grid meter is fresh. PV is
/// what the sun gave: what the units made plus what the setpoints held back to keep the
/// limits, so that forecasts are scored (and learnt) against the sky, not against the
/// export limit.
#[derive(Debug, Clone, Copy)]
struct Measured {
    load_w: f64,
    pv_w: f64,
    grid_w: f64,
}

fn measured_site(s: &status::Status) -> Option<Measured> {
    let grid = s.grid.power_w?;
    let held_back = s.control.as_ref().map_or(0.0, |c| c.curtailed_w.max(0.0));
    let pv_meter: f64 = s
        .meters
        .iter()
        .filter(|m| m.role == MeterRole::Pv.as_str())
        .filter_map(|m| m.power_w)
        .sum();
    Some(Measured {
        load_w: (grid + s.fleet.ac_power_w + pv_meter).max(0.0),
        pv_w: (s.fleet.pv_power_w + pv_meter + held_back).max(0.0),
        grid_w: grid,
    })
}

/// The DR book as stored, read before the first cycle so that events in force after a
/// restart are enforced before anything is written.
/// Each unit's own settings kept by an earlier run.
fn load_originals(config: &SiteConfig) -> HashMap<String, Vec<(u16, u16)>> {
    let Some(s) = &config.store else {
        return HashMap::new();
    };
    Store::open(std::path::Path::new(&s.path))
        .and_then(|st| st.originals())
        .unwrap_or_else(|e| {
            tracing::error!(
                "cannot read the units' own settings in {}: {e}; units found in passive mode get the register map's defaults",
                s.path
            );
            HashMap::new()
        })
}

/// Most charge and most discharge of the whole fleet, W: each battery within its unit's rating.
fn fleet_battery_range(config: &SiteConfig) -> (f64, f64) {
    config.inverters.iter().fold((0.0, 0.0), |(c, d), i| {
        (
            c + i.battery().max_charge_w.min(i.rated_power_w),
            d + i.battery().max_discharge_w.min(i.rated_power_w),
        )
    })
}

/// What the grid connection carries over all phases, W: the site's import limit (its main
/// fuse, in A at the nominal voltage); unknown without one.
fn connection_w(config: &SiteConfig) -> Option<f64> {
    config
        .import_limit
        .map(|l| l.total_w(config.grid.phases, config.grid.nominal_voltage_v))
}

/// Acks an earlier run kept because the broker had not confirmed them.
fn load_outbox(config: &SiteConfig) -> Vec<crate::dr::book::Ack> {
    let Some(s) = &config.store else {
        return Vec::new();
    };
    match Store::open(std::path::Path::new(&s.path)).and_then(|st| st.outbox()) {
        Ok(rows) => rows
            .iter()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect(),
        Err(e) => {
            tracing::error!("cannot read the unsent acks in {}: {e}", s.path);
            Vec::new()
        }
    }
}

fn load_book(config: &SiteConfig) -> DrBook {
    let Some(s) = &config.store else {
        return DrBook::default();
    };
    match Store::open(std::path::Path::new(&s.path)).and_then(|st| st.dr_events()) {
        Ok(rows) => DrBook::from_stored(rows),
        Err(e) => {
            tracing::error!(
                "cannot read the DR book in {}: {e}; no stored event is in force",
                s.path
            );
            DrBook::default()
        }
    }
}

impl Ems {
    /// Build links, pollers, the planner task, the store writer and the MQTT link for
    /// `config`. Must run inside a tokio runtime.
    pub fn new(config: SiteConfig, clock: Arc<dyn Clock>) -> (Ems, AppState) {
        Ems::with_options(config, clock, EmsOptions::default())
    }

    pub fn with_options(
        config: SiteConfig,
        clock: Arc<dyn Clock>,
        options: EmsOptions,
    ) -> (Ems, AppState) {
        let metrics = Arc::new(Metrics::new(&config.site.name));
        for m in &config.meters {
            metrics.register_device(&m.link, &m.id);
        }
        for i in &config.inverters {
            metrics.register_device(&i.link, &i.id);
            metrics.register_inverter(&i.id, i.model);
        }
        let devices = Devices::new(&config, metrics.clone(), &load_originals(&config));
        let writer = config
            .store
            .as_ref()
            .map(|s| Writer::start(std::path::Path::new(&s.path)));
        let dr = config.dr_settings();
        let intake = crate::dr::book::Intake {
            max_events: dr.max_events,
            max_per_min: dr.max_events_per_min,
            fleet_battery_w: Some(fleet_battery_range(&config)),
            connection_w: connection_w(&config),
        };
        let book = SharedBook::new(load_book(&config), writer.clone()).with_intake(intake);
        let (publish, status_rx) = watch::channel(None);
        let (telemetry, telemetry_rx) = watch::channel(None);
        let mqtt = config.dr.as_ref().and_then(|d| d.mqtt.clone()).map(|m| {
            let state = Arc::new(std::sync::Mutex::new(crate::dr::mqtt::LinkState::default()));
            let (acks, ack_rx) = tokio::sync::mpsc::unbounded_channel();
            crate::dr::mqtt::spawn(
                m.clone(),
                book.clone(),
                writer.clone(),
                load_outbox(&config),
                ack_rx,
                telemetry_rx,
                state.clone(),
            );
            MqttSide {
                state,
                acks,
                heartbeat: Duration::from_secs_f64(m.heartbeat_s),
                fallback: m.fallback,
            }
        });
        let planning = config.planner.clone().map(|p| {
            let handle =
                crate::planner::task::spawn(config.clone(), options.plan_delay, writer.clone());
            Planning::new(
                p,
                config.working_mode.mode,
                handle,
                config.inverters.iter().map(|i| i.id.clone()).collect(),
            )
        });
        let cycle = Duration::from_millis(config.control.cycle_ms);
        let excursions = ExcursionLog::new(&config);
        let commission_slot = CommissionSlot::default();
        let app = AppState {
            commission: commission_slot.clone(),
            excursions: excursions.clone(),
            status: status_rx,
            dr: book.clone(),
            dr_token: config.dr.as_ref().and_then(|d| d.token()),
            metrics: metrics.clone(),
            max_silence: (cycle * 5).max(Duration::from_secs(5)),
        };
        let ems = Ems {
            compliance: Compliance::new(excursions),
            commissioning: Commissioning::new(&config, commission_slot.clone()),
            commission_slot,
            demand: Demand::new(&config, book, mqtt),
            history: writer.clone().map(|writer| History {
                minute: MinuteAverage::default(),
                writer,
            }),
            writer,
            planning,
            devices,
            follow: FollowWatch::default(),
            follow_rule: FollowRule {
                tolerance_pct: config.control.follow_tolerance_pct,
                after_s: config.control.follow_after_s,
            },
            constraints: control::Constraints::default(),
            params: ControlParams::from_config(&config),
            state: ControlState::default(),
            decision: None,
            plan_override: None,
            following_plan: false,
            out: Outputs {
                metrics,
                publish,
                telemetry,
                cycle: 0,
                stats: LoopStatus {
                    cycle_ms: config.control.cycle_ms,
                    ..Default::default()
                },
            },
            clock,
            forecast_score: Default::default(),
            tz: config.site.timezone.tz(),
            config,
        };
        (ems, app)
    }

    /// The demand-response event book (shared with the API).
    pub fn dr_book(&self) -> SharedBook {
        self.demand.book.clone()
    }

    /// The status published by the last cycle.
    pub fn status(&self) -> Option<Arc<status::Status>> {
        self.out.publish.borrow().as_ref().map(|p| p.status.clone())
    }

    /// Wire time spent so far on each RTU link.
    pub fn wire_times(&self) -> Vec<(String, Duration)> {
        self.devices
            .links
            .iter()
            .map(|l| (l.name().to_string(), l.wire_time()))
            .collect()
    }

    /// Targets for plan mode (+ discharge per inverter, config order) on a site without a
    /// planner; `None` means self-consumption.
    pub fn set_plan(&mut self, plan: Option<Vec<Option<f64>>>) {
        self.plan_override = plan;
    }

    pub fn last_decision(&self) -> Option<&Decision> {
        self.decision.as_ref()
    }

    /// The plan in force, if fresh.
    pub fn current_plan(&self) -> Option<Arc<Plan>> {
        let now = self.clock.monotonic();
        self.planning.as_ref()?.fresh_plan(now).cloned()
    }

    /// Wait until everything handed to the store so far is on disk (tests, shutdown).
    pub async fn flush_store(&self, within: Duration) -> Result<(), String> {
        match &self.writer {
            Some(w) => w.flush(within).await,
            None => Ok(()),
        }
    }

    /// One cycle: poll every device (links in parallel), decide, write, publish.
    pub async fn cycle(&mut self) {
        let started = Instant::now();
        let period = Duration::from_millis(self.config.control.cycle_ms);
        let polled_at = self.clock.monotonic();
        let wall = self.clock.now();
        self.devices
            .poll(polled_at, period, wall, &self.demand.book)
            .await;
        // Decisions use the time after the reads: a slow read makes readings older.
        let now = self.clock.monotonic();
        let time = self.clock.now();
        let contact_events = self.devices.contact_events(time);
        let dr = self
            .demand
            .cycle(time, contact_events, &self.out.metrics)
            .clone();
        let plan = match self.planning.as_mut() {
            Some(p) => {
                let devices = &self.devices;
                p.cycle(
                    now,
                    time,
                    || devices.soc_pct(),
                    self.demand.book_state(),
                    &self.out.metrics,
                )
            }
            None => self.plan_override.clone(),
        };
        self.following_plan = self.planning.is_some() && plan.is_some();
        let (grid, mut units) = self.devices.readings(now);
        self.check_following(now, &mut units);
        let snapshot = control::Snapshot {
            time,
            mono_s: now.as_secs_f64(),
            grid,
            units,
            constraints: control::Constraints {
                commissioning: self.commissioning.targets(),
                ..control::Constraints::gather(&self.params, &dr, plan)
            },
        };
        let (decision, state) = control::step(&self.params, &snapshot, &self.state);
        self.state = state;
        self.compliance.cycle(
            time,
            snapshot.grid.as_ref(),
            &snapshot.constraints,
            decision.fail_safe,
            (&self.out.metrics, self.writer.as_ref()),
        );
        let observation = self.observe(&snapshot, &decision);
        self.commissioning.cycle(
            time,
            &observation,
            Conditions {
                fail_safe: decision.fail_safe,
                dr_in_force: snapshot.constraints.dr_in_force(),
            },
        );
        self.constraints = snapshot.constraints;
        let safe_caps = control::stop_caps(&self.params, &self.constraints);
        for (device, values) in self.devices.actuate(&decision, &safe_caps, now).await {
            if let Some(w) = &self.writer {
                w.originals(&device, Some(values));
            }
        }
        self.decision = Some(decision);
        self.publish(now, time, started);
    }

    /// Status, metrics, telemetry and history for this cycle.
    fn publish(&mut self, now: Duration, time: chrono::DateTime<chrono::Utc>, started: Instant) {
        self.out.cycle += 1;
        let mut status = status::build(
            &self.config,
            &self.devices.meters,
            &self.devices.inverters,
            self.decision.as_ref(),
            now,
            time,
            self.out.cycle,
        );
        for (inv, alarm) in status.inverters.iter_mut().zip(self.devices.alarms()) {
            inv.alarm = alarm;
        }
        if self.devices.grid_frozen(now) {
            status.mark_grid_frozen(self.devices.grid_unchanged_for(now));
        }
        let following = self.following_plan;
        status.plan = self
            .planning
            .as_ref()
            .map(|p| p.status(now, time, following));
        status.dr = Some(self.demand.status());
        let measured = measured_site(&status);
        self.score_forecasts(now, time, measured);
        if let Some(p) = status.plan.as_mut() {
            p.forecast_quality = self.forecast_score.quality();
        }
        self.record_history(measured, time);
        let took = started.elapsed();
        let stats = &mut self.out.stats;
        stats.last_ms = took.as_secs_f64() * 1000.0;
        stats.max_ms = stats.max_ms.max(stats.last_ms);
        if took > Duration::from_millis(stats.cycle_ms) {
            stats.overruns += 1;
            self.out.metrics.count_cycle_overrun();
        }
        status.guard_loop = stats.clone();
        self.out.metrics.observe(&status);
        self.out.metrics.observe_cycle(took);
        self.out.telemetry.send_replace(Some(Telemetry {
            time: status.time.clone(),
            grid_power_w: status.grid.power_w,
            fleet_soc_pct: status.fleet.soc_pct,
            export_limit_w: status.export_limit.limit_w,
            dr: self.demand.constraints().clone(),
        }));
        let plan = self
            .planning
            .as_ref()
            .and_then(|p| p.fresh_plan(now).cloned());
        self.out.publish.send_replace(Some(Published {
            plan,
            planner: self.planning.is_some(),
            status: Arc::new(status),
            at: Instant::now(),
        }));
    }

    /// One value a cycle towards the minute's history row, while the grid meter is fresh.
    fn record_history(&mut self, measured: Option<Measured>, time: chrono::DateTime<chrono::Utc>) {
        let (Some(h), Some(m)) = (self.history.as_mut(), measured) else {
            return;
        };
        if let Some((minute, values)) = h.minute.add(time, [m.load_w, m.pv_w, m.grid_w]) {
            h.writer.sample(minute, values);
        }
    }

    /// The plan step in force and what the site measured, towards the forecasts' score.
    fn score_forecasts(
        &mut self,
        now: Duration,
        time: chrono::DateTime<chrono::Utc>,
        measured: Option<Measured>,
    ) {
        let plan = self.planning.as_ref().and_then(|p| p.fresh_plan(now));
        let step = plan.and_then(|p| p.step_at(time));
        let cycle_s = self.config.control.cycle_ms as f64 / 1000.0;
        let cycle = crate::planner::score::Cycle {
            step_start: step.and_then(|s| s.start.parse().ok()),
            forecast_pv_w: step.map_or(0.0, |s| s.pv_w),
            forecast_load_w: step.map_or(0.0, |s| s.load_w),
            measured: measured.map(|m| (m.pv_w, m.load_w)),
            cycles_per_step: plan.map_or(1.0, |p| p.step_s / cycle_s.max(0.001)),
        };
        self.forecast_score.observe(&cycle, self.tz);
    }

    /// Compare each unit's battery with what it was told last cycle; a unit off for too
    /// long is held (`not_following`) and the others take its share.
    fn check_following(&mut self, now: Duration, units: &mut [control::UnitInput]) {
        let last = self.decision.as_ref();
        for (k, unit) in units.iter_mut().enumerate() {
            let commanded = last.and_then(|d| d.setpoints.get(k).copied().flatten());
            let measured = unit.reading.as_ref().map(|r| (r.battery_w, r.soc_pct));
            self.follow.observe(
                k,
                now.as_secs_f64(),
                &self.params.units[k],
                self.follow_rule,
                commanded.map(|sp| sp.battery_w),
                measured,
            );
            if self.follow.not_following(k) && unit.health == control::UnitHealth::Ok {
                unit.health = control::UnitHealth::NotFollowing;
            }
        }
    }

    /// This cycle as the wiring check sees it.
    fn observe(&self, s: &control::Snapshot, d: &Decision) -> Observation {
        let grid_w = s.grid.as_ref().map(|g| {
            let mut w = [0.0; 3];
            for &(phase, power_w, _) in &g.phases {
                w[phase.index()] = power_w;
            }
            w
        });
        let stale = Duration::from_secs_f64(self.config.control.stale_after_s);
        let now = self.clock.monotonic();
        let pv_w = self
            .devices
            .meters
            .iter()
            .find(|m| m.cfg.role == MeterRole::Pv && m.fresh.is_fresh(now, stale))
            .and_then(|m| m.reading.as_ref())
            .map(|r| r.power_w);
        Observation {
            grid_w,
            pv_w,
            units: s
                .units
                .iter()
                .map(|u| u.reading.as_ref().map(|r| (r.battery_w, r.soc_pct)))
                .collect(),
            curtailing: d.curtailed_w > 1.0,
        }
    }

    /// Ask for a wiring check; it starts at the next cycle unless refused. False when one is
    /// under way already.
    pub fn request_commissioning(&self) -> bool {
        self.commission_slot.request()
    }

    /// The wiring check: under way, refused, or its report.
    pub fn commissioning(&self) -> CommissionState {
        self.commission_slot.state()
    }

    /// Leave every unit as `control.on_stop` says: safe (the default) or released, with an
    /// inverter-side limit that keeps the site's export limit, and demand response's in
    /// force, without the EMS.
    pub async fn stop(&mut self) {
        let time = self.clock.now();
        self.compliance
            .finish(time, (&self.out.metrics, self.writer.as_ref()));
        let caps = control::stop_caps(&self.params, &self.constraints);
        let released = self.devices.stop(self.config.control.on_stop, &caps).await;
        if let Some(w) = &self.writer {
            for device in released {
                w.originals(&device, None);
            }
        }
    }

    /// Cycle until `shutdown` resolves, then hand the units back and write what is queued.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.control.cycle_ms));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let supervisor = Supervisor::from_env();
        let mut ready = false;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {
                    self.cycle().await;
                    if !ready {
                        supervisor.ready();
                        ready = true;
                    }
                    supervisor.alive();
                }
            }
        }
        supervisor.stopping();
        self.stop().await;
        if let Err(e) = self.flush_store(Duration::from_secs(5)).await {
            tracing::warn!("{e}");
        }
    }
}
