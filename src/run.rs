//! The EMS runtime: links and pollers built from the site file, one cycle per
//! `control.cycle_ms` (poll every device in parallel across links, then publish), and the
//! HTTP API beside it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::actuator::Actuator;
use crate::api::{self, AppState, Published};
use crate::clock::Clock;
use crate::config::{LinkKind, MeterRole, SiteConfig};
use crate::control::{self, ControlParams, ControlState, Decision};
use crate::dr_book::DrBook;
use crate::drivers::saj;
use crate::link::Link;
use crate::metrics::Metrics;
use crate::planner::Plan;
use crate::poll::{InverterPoller, MeterPoller};
use crate::status;

/// The planner as the EMS runs it: re-planned every `replan_min` from measured SOC.
struct Planner {
    cfg: crate::config::PlannerConfig,
    plan: Option<Arc<Plan>>,
    planned_at: Option<Duration>,
    attempted_at: Option<Duration>,
    error: Option<String>,
}

impl Planner {
    fn new(cfg: crate::config::PlannerConfig) -> Planner {
        Planner {
            cfg,
            plan: None,
            planned_at: None,
            attempted_at: None,
            error: None,
        }
    }

    fn period(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.replan_min * 60.0)
    }

    /// The plan is fresh while it is younger than two re-plan periods.
    fn fresh_plan(&self, now: Duration) -> Option<&Arc<Plan>> {
        let age = now.saturating_sub(self.planned_at?);
        (age <= self.period() * 2).then_some(self.plan.as_ref()?)
    }
}

pub struct Ems {
    config: SiteConfig,
    links: Vec<Link>,
    meters: Vec<MeterPoller>,
    inverters: Vec<InverterPoller>,
    actuators: Vec<Actuator>,
    params: ControlParams,
    state: ControlState,
    decision: Option<Decision>,
    /// Plan-mode targets per inverter, from the planner's current step.
    plan: Option<Vec<Option<f64>>>,
    planner: Option<Planner>,
    store: Option<crate::store::Store>,
    dr: Arc<std::sync::Mutex<DrBook>>,
    dr_constraints: crate::dr::DrConstraints,
    /// The DR book's generation the plan was made with.
    dr_seen: u64,
    contacts: Option<crate::contacts::Contacts>,
    /// The aggregator's MQTT link, when configured: its state and where acks go.
    mqtt: Option<(
        Arc<std::sync::Mutex<crate::mqtt::LinkState>>,
        tokio::sync::mpsc::UnboundedSender<crate::dr_book::Ack>,
    )>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    publish: watch::Sender<Option<Published>>,
    cycle: u64,
}

impl Ems {
    /// Build links and pollers for `config`. Must run inside a tokio runtime.
    pub fn new(config: SiteConfig, clock: Arc<dyn Clock>) -> (Ems, AppState) {
        let metrics = Arc::new(Metrics::new(&config.site.name));
        let links: HashMap<&str, Link> = config
            .links
            .iter()
            .map(|l| (l.name.as_str(), Link::spawn(l, Some(metrics.clone()))))
            .collect();
        // Validation guarantees every device names a defined link.
        let link_of = |name: &str| links.get(name).cloned();
        let meters = config
            .meters
            .iter()
            .filter_map(|m| {
                Some(MeterPoller::new(m.clone(), link_of(&m.link)?).with_metrics(metrics.clone()))
            })
            .collect();
        let inverters: Vec<InverterPoller> = config
            .inverters
            .iter()
            .filter_map(|i| {
                let lean = config
                    .link(&i.link)
                    .is_some_and(|l| l.kind == LinkKind::Rtu);
                Some(
                    InverterPoller::new(i.clone(), link_of(&i.link)?, lean)
                        .with_metrics(metrics.clone()),
                )
            })
            .collect();
        for m in &config.meters {
            metrics.register_device(&m.link, &m.id);
        }
        for i in &config.inverters {
            metrics.register_device(&i.link, &i.id);
        }
        let actuators = inverters
            .iter()
            .map(|p| {
                Actuator::new(
                    p.device.clone(),
                    p.cfg.unit_id,
                    p.cfg.rated_power_w,
                    p.link().clone(),
                )
            })
            .collect();
        // The DR book is read before the first cycle, so events in force after a restart are
        // enforced before anything is written.
        let book = match &config.store {
            Some(s) => DrBook::open(std::path::Path::new(&s.path)).unwrap_or_else(|e| {
                tracing::error!(
                    "cannot open the DR book in {}: {e}; events are kept in memory only",
                    s.path
                );
                DrBook::in_memory()
            }),
            None => DrBook::in_memory(),
        };
        let dr = Arc::new(std::sync::Mutex::new(book));
        let (publish, rx) = watch::channel(None);
        let mqtt = config.dr.as_ref().and_then(|d| d.mqtt.clone()).map(|m| {
            let state = Arc::new(std::sync::Mutex::new(crate::mqtt::LinkState::default()));
            let (ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel();
            crate::mqtt::spawn(m, dr.clone(), ack_rx, rx.clone(), state.clone());
            (state, ack_tx)
        });
        let cycle = Duration::from_millis(config.control.cycle_ms);
        let state = AppState {
            status: rx,
            dr: dr.clone(),
            dr_token: config.dr.as_ref().and_then(|d| d.token()),
            metrics: metrics.clone(),
            max_silence: (cycle * 5).max(Duration::from_secs(5)),
        };
        (
            Ems {
                dr_seen: u64::MAX,
                mqtt,
                contacts: config
                    .dr
                    .as_ref()
                    .and_then(|d| d.contacts.clone())
                    .and_then(|k| {
                        let link = links.get(k.link.as_str())?.clone();
                        Some(crate::contacts::Contacts::new(k, link))
                    }),
                dr: dr.clone(),
                dr_constraints: Default::default(),
                store: config.store.as_ref().and_then(|s| {
                    crate::store::Store::open(std::path::Path::new(&s.path))
                        .map_err(|e| {
                            tracing::error!(
                                "cannot open the store {}: {e}; running without history",
                                s.path
                            )
                        })
                        .ok()
                }),
                planner: config.planner.clone().map(Planner::new),
                links: links.values().cloned().collect(),
                params: ControlParams::from_config(&config),
                config,
                meters,
                inverters,
                actuators,
                state: ControlState::default(),
                decision: None,
                plan: None,
                metrics,
                clock,
                publish,
                cycle: 0,
            },
            state,
        )
    }

    /// The demand-response event book (shared with the API).
    pub fn dr_book(&self) -> Arc<std::sync::Mutex<DrBook>> {
        self.dr.clone()
    }

    /// The status published by the last cycle.
    pub fn status(&self) -> Option<Arc<status::Status>> {
        self.publish.borrow().as_ref().map(|p| p.status.clone())
    }

    /// Wire time spent so far on each RTU link.
    pub fn wire_times(&self) -> Vec<(String, Duration)> {
        self.links
            .iter()
            .map(|l| (l.name().to_string(), l.wire_time()))
            .collect()
    }

    /// Targets for plan mode (+ discharge per inverter, config order); `None` when no plan is
    /// in force, which means self-consumption.
    pub fn set_plan(&mut self, plan: Option<Vec<Option<f64>>>) {
        self.plan = plan;
    }

    pub fn last_decision(&self) -> Option<&Decision> {
        self.decision.as_ref()
    }

    /// What the controller sees: fresh readings only, with the grid reading's age.
    fn snapshot(&self, now: Duration) -> control::Snapshot {
        let stale_after = Duration::from_secs_f64(self.config.control.stale_after_s);
        let grid = self
            .meters
            .iter()
            .find(|m| m.cfg.role == MeterRole::Grid)
            .and_then(|m| {
                let reading = m.reading.as_ref()?;
                let age = m.fresh.age(now)?;
                Some(control::GridReading {
                    phases: reading
                        .phases
                        .iter()
                        .map(|p| (p.phase, p.power_w, p.voltage_v))
                        .collect(),
                    age_s: age.as_secs_f64(),
                })
            });
        let units = self
            .inverters
            .iter()
            .map(|p| {
                let reading = p
                    .reading
                    .as_ref()
                    .filter(|_| p.fresh.is_fresh(now, stale_after));
                control::UnitInput {
                    health: match reading {
                        None => control::UnitHealth::Stale,
                        Some(r) if r.has_fault() => control::UnitHealth::Faulted,
                        Some(_) => control::UnitHealth::Ok,
                    },
                    reading: reading.map(|r| {
                        let mut ac_phase_w = [0.0; 3];
                        for a in &r.phases {
                            ac_phase_w[a.phase.index()] = a.power_w;
                        }
                        control::UnitReading {
                            ac_phase_w,
                            ac_w: r.ac_power_w,
                            pv_w: r.pv_power_w,
                            battery_w: r.battery_power_w,
                            soc_pct: r.soc_pct,
                        }
                    }),
                }
            })
            .collect();
        control::Snapshot {
            time: self.clock.now(),
            mono_s: now.as_secs_f64(),
            grid,
            units,
            plan: self.plan.clone(),
            dr: self.dr_constraints.clone(),
        }
    }

    /// Re-plan when the period is up (a failed attempt is retried after a minute), then take
    /// the current step's targets for plan mode. No fresh plan: no targets, which means
    /// self-consumption — never a stale setpoint held.
    fn replan(&mut self, now: Duration) {
        let Some(p) = self.planner.as_mut() else {
            return;
        };
        let due = p
            .planned_at
            .is_none_or(|t| now.saturating_sub(t) >= p.period())
            && p.attempted_at
                .is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(60).min(p.period()));
        if due {
            p.attempted_at = Some(now);
            let soc: Vec<f64> = self
                .inverters
                .iter()
                .map(|i| {
                    i.reading
                        .as_ref()
                        .map_or(i.cfg.battery.soc_min_pct, |r| r.soc_pct)
                })
                .collect();
            let outcome = crate::planner::inputs::from_config(
                &self.config,
                &p.cfg,
                self.clock.now(),
                &soc,
                &Default::default(),
                self.store.as_ref(),
            )
            .map(|mut inputs| {
                inputs.dr_limits_w = dr_step_limits(&self.config, &self.dr, &inputs);
                inputs
            })
            .and_then(|inputs| crate::planner::solve(&inputs).map_err(|e| e.to_string()));
            match outcome {
                Ok(plan) => {
                    self.metrics.observe_plan_solve(&plan);
                    p.plan = Some(Arc::new(plan));
                    p.planned_at = Some(now);
                    p.error = None;
                }
                Err(e) => {
                    tracing::warn!("planning failed, running self-consumption: {e}");
                    self.metrics.count_plan_failure();
                    p.error = Some(e);
                }
            }
        }
        let targets = match (self.config.working_mode.mode, p.fresh_plan(now)) {
            (crate::config::WorkingMode::Plan, Some(plan)) => plan.targets_at(self.clock.now()),
            _ => None,
        };
        self.plan = targets.map(|t| t.into_iter().map(Some).collect());
    }

    fn plan_status(&self, now: Duration) -> Option<status::PlanStatus> {
        let p = self.planner.as_ref()?;
        let fresh = p.fresh_plan(now);
        let step = fresh.and_then(|plan| {
            let t = self.clock.now();
            let first = chrono::DateTime::parse_from_rfc3339(&plan.steps.first()?.start).ok()?;
            let k = ((t - first.with_timezone(&chrono::Utc)).num_seconds() as f64 / plan.step_s)
                .floor();
            (k >= 0.0).then(|| plan.steps.get(k as usize)).flatten()
        });
        Some(status::PlanStatus {
            age_s: p.planned_at.map(|t| now.saturating_sub(t).as_secs_f64()),
            following: self.plan.is_some(),
            cost: fresh.map(|x| x.cost),
            baseline_cost: fresh.map(|x| x.baseline_cost),
            objective: fresh.map(|x| x.objective),
            solve_ms: fresh.map(|x| x.solve_ms),
            violations: fresh.map_or(0, |x| x.violations.len()),
            error: p
                .error
                .clone()
                .or_else(|| fresh.is_none().then(|| "no fresh plan".to_string())),
            import_price: step.map(|s| s.import_price),
            export_price: step.map(|s| s.export_price),
            battery_w: step.map(|s| s.batteries.iter().map(|b| b.power_w).sum()),
        })
    }

    /// One row a minute for the history: site load, PV and grid, while the grid meter is fresh.
    fn record_history(&mut self, s: &status::Status) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let Some(grid) = s.grid.power_w else {
            return;
        };
        let pv_meter: f64 = s
            .meters
            .iter()
            .filter(|m| m.role == MeterRole::Pv.as_str())
            .filter_map(|m| m.power_w)
            .sum();
        let load = grid + s.fleet.ac_power_w + pv_meter;
        let pv = s.fleet.pv_power_w + pv_meter;
        if let Err(e) = store.record(self.clock.now(), load.max(0.0), pv.max(0.0), grid) {
            tracing::warn!("history not written: {e}");
        }
    }

    /// The plan in force, if fresh.
    pub fn current_plan(&self) -> Option<Arc<Plan>> {
        let now = self.clock.monotonic();
        self.planner.as_ref()?.fresh_plan(now).cloned()
    }

    /// Move DR events through their states and resolve those in force; a start or end
    /// triggers a re-plan.
    fn demand_response(&mut self) {
        let now = self.clock.now();
        let mut book = self.dr.lock().unwrap_or_else(|e| e.into_inner());
        book.tick(now);
        // Any accepted, cancelled, started or ended event: plan again with it.
        if book.generation() != self.dr_seen {
            self.dr_seen = book.generation();
            if let Some(p) = self.planner.as_mut() {
                p.planned_at = None;
                p.attempted_at = None;
            }
        }
        for ack in book.take_acks() {
            self.metrics.count_dr_ack(&ack.status);
            if let Some((_, tx)) = &self.mqtt {
                let _ = tx.send(ack);
            }
        }
        let fleet_rated_w: f64 = self.config.inverters.iter().map(|i| i.rated_power_w).sum();
        let levels = self
            .config
            .dr
            .as_ref()
            .map(|d| d.openadr_levels)
            .unwrap_or_default();
        let mut events = book.events();
        if let Some(c) = &self.contacts {
            events.extend(c.drm_events(now));
        }
        if self.mqtt_fallback() {
            let f = self
                .config
                .dr
                .as_ref()
                .and_then(|d| d.mqtt.as_ref())
                .map(|m| m.fallback)
                .unwrap_or_default();
            let fallback = |id: &str, command| crate::dr::DrEvent {
                id: id.into(),
                start: now - chrono::Duration::seconds(1),
                end: now + chrono::Duration::seconds(1),
                priority: 0,
                command,
                source: "fallback".into(),
            };
            if let Some(w) = f.export_limit_w {
                events.push(fallback(
                    "mqtt-fallback-export",
                    crate::dr::DrCommand::ExportLimitW(w),
                ));
            }
            if let Some(w) = f.import_limit_w {
                events.push(fallback(
                    "mqtt-fallback-import",
                    crate::dr::DrCommand::ImportLimitW(w),
                ));
            }
        }
        self.dr_constraints = crate::dr::resolve(&events, now, fleet_rated_w, &levels);
    }

    /// The aggregator link has been down longer than its heartbeat.
    fn mqtt_fallback(&self) -> bool {
        let heartbeat = self
            .config
            .dr
            .as_ref()
            .and_then(|d| d.mqtt.as_ref())
            .map_or(60.0, |m| m.heartbeat_s);
        self.mqtt.as_ref().is_some_and(|(state, _)| {
            state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lost_for(Duration::from_secs_f64(heartbeat))
        })
    }

    fn dr_status(&self) -> Option<status::DrStatus> {
        let book = self.dr.lock().unwrap_or_else(|e| e.into_inner());
        Some(status::DrStatus {
            events: book.len(),
            constraints: self.dr_constraints.clone(),
            mqtt_connected: self
                .mqtt
                .as_ref()
                .map(|(s, _)| s.lock().unwrap_or_else(|e| e.into_inner()).connected()),
            fallback: self.mqtt_fallback(),
        })
    }

    /// Decide and write: every commanded unit in parallel (each on its own link task).
    async fn control(&mut self, now: Duration) {
        let snapshot = self.snapshot(now);
        let (decision, state) = control::step(&self.params, &snapshot, &self.state);
        self.state = state;
        for (poller, actuator) in self.inverters.iter().zip(self.actuators.iter_mut()) {
            // A unit that left passive mode (reboot, app, installer) gets everything again.
            if actuator.controls()
                && poller
                    .reading
                    .as_ref()
                    .is_some_and(|r| r.app_mode != saj::app_mode::PASSIVE)
            {
                actuator.invalidate();
            }
        }
        let writes = self
            .actuators
            .iter_mut()
            .zip(&decision.setpoints)
            .filter_map(|(a, sp)| {
                let sp = (*sp)?;
                Some(async move {
                    let cmd = saj::Command {
                        battery_w: sp.battery_w,
                        output_cap_w: sp.output_cap_w,
                    };
                    if let Err(e) = a.apply(&cmd).await {
                        tracing::debug!("setpoint not written: {e}");
                    }
                })
            });
        join_all(writes).await;
        self.decision = Some(decision);
    }

    /// Give every unit we took over back its own settings.
    pub async fn restore(&mut self) {
        let restores = self.actuators.iter_mut().map(|a| a.restore());
        for r in join_all(restores).await {
            if let Err(e) = r {
                tracing::warn!("could not restore an inverter's own settings: {e}");
            }
        }
    }

    /// One cycle: poll every device (links run in parallel), decide, write, publish.
    pub async fn cycle(&mut self) {
        let started = Instant::now();
        let period = Duration::from_millis(self.config.control.cycle_ms);
        let t0 = self.clock.monotonic();
        let wall = self.clock.now();
        let meters = join_all(self.meters.iter_mut().map(|m| m.poll(t0, period)));
        let inverters = join_all(self.inverters.iter_mut().map(|i| i.poll(t0, period)));
        // The contact module has its own link: read it alongside the devices.
        let (contacts, dr) = (&mut self.contacts, &self.dr);
        let contacts = async move {
            if let Some(c) = contacts.as_mut() {
                c.poll(wall, dr).await;
            }
        };
        tokio::join!(meters, inverters, contacts);

        let now = self.clock.monotonic();
        self.demand_response();
        self.replan(now);
        self.control(now).await;
        self.cycle += 1;
        let mut status = status::build(
            &self.config,
            &self.meters,
            &self.inverters,
            self.decision.as_ref(),
            now,
            self.clock.now(),
            self.cycle,
        );
        status.plan = self.plan_status(now);
        status.dr = self.dr_status();
        self.record_history(&status);
        self.metrics.observe(&status);
        self.metrics.observe_cycle(started.elapsed());
        let plan = self
            .planner
            .as_ref()
            .and_then(|p| p.fresh_plan(now).cloned());
        self.publish.send_replace(Some(Published {
            plan,
            planner: self.planner.is_some(),
            status: Arc::new(status),
            at: Instant::now(),
        }));
    }

    /// Cycle until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.control.cycle_ms));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => self.cycle().await,
            }
        }
        self.restore().await;
    }
}

/// Export and import limits that demand-response events put on each planning step.
fn dr_step_limits(
    config: &SiteConfig,
    dr: &std::sync::Mutex<DrBook>,
    inputs: &crate::planner::PlanInputs,
) -> Vec<(Option<f64>, Option<f64>)> {
    let events = dr.lock().unwrap_or_else(|e| e.into_inner()).events();
    if events.is_empty() {
        return Vec::new();
    }
    let fleet_rated_w: f64 = config.inverters.iter().map(|i| i.rated_power_w).sum();
    let levels = config
        .dr
        .as_ref()
        .map(|d| d.openadr_levels)
        .unwrap_or_default();
    (0..inputs.steps())
        .map(|k| {
            let t = inputs.start + chrono::Duration::seconds((k as f64 * inputs.step_s) as i64);
            let c = crate::dr::resolve(&events, t, fleet_rated_w, &levels);
            (c.export_limit_w, c.import_limit_w)
        })
        .collect()
}

/// Run the EMS and its API on `listener` until `shutdown` resolves.
pub async fn serve(
    config: SiteConfig,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (ems, state) = Ems::new(config, clock);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(async move {
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move {
                let _ = api_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let mut loop_stop = stop_rx;
    let control = ems.run(async move {
        let _ = loop_stop.wait_for(|s| *s).await;
    });
    tokio::pin!(control);
    tokio::select! {
        _ = shutdown => {}
        _ = &mut control => {}
    }
    let _ = stop_tx.send(true);
    control.await;
    match api.await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e)),
    }
}
