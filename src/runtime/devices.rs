//! The site's devices as the guard loop drives them: links and pollers built from the site
//! file, one poll of everything per cycle (links in parallel), what the controller may trust
//! of it, and the setpoints sent back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;

use crate::config::{LinkKind, MeterRole, OnStop, SiteConfig};
use crate::control::{self, Decision};
use crate::dr::book::SharedBook;
use crate::dr::DrEvent;
use crate::drivers::Command;
use crate::io::actuation::{Actuator, Setpoint};
use crate::io::contacts::Contacts;
use crate::io::link::Link;
use crate::io::poll::{FrozenWatch, InverterPoller, MeterPoller};
use crate::io::IoObserver;

/// Smallest move of the fleet's output that a live grid meter cannot miss: 200 W or 2 % of
/// the fleet's rating, whichever is more (meter and inverter readings disagree by less).
fn frozen_min_change_w(config: &SiteConfig) -> f64 {
    let rated: f64 = config.inverters.iter().map(|i| i.rated_power_w).sum();
    (0.02 * rated).max(200.0)
}

/// How long a SunSpec unit keeps an EMS limit without hearing from the EMS again: five
/// cycles (at least 2 s), so a unit the EMS stops talking to is back at its safe cap within a
/// few cycles, while a cycle or two of delay never trips it.
pub fn sunspec_revert(config: &SiteConfig) -> Duration {
    (Duration::from_millis(config.control.cycle_ms) * 5).max(Duration::from_secs(2))
}

pub struct Devices {
    pub links: Vec<Link>,
    pub meters: Vec<MeterPoller>,
    pub inverters: Vec<InverterPoller>,
    actuators: Vec<Actuator>,
    contacts: Option<Contacts>,
    /// The grid meter, watched for repeated values.
    frozen: FrozenWatch,
    frozen_after: Duration,
    frozen_min_change_w: f64,
    stale_after: Duration,
}

impl Devices {
    /// Links, pollers and actuators for `config`. Must run inside a tokio runtime.
    /// `originals`: each unit's own settings as kept in the store from an earlier run.
    pub fn new(
        config: &SiteConfig,
        observer: Arc<dyn IoObserver>,
        originals: &HashMap<String, Vec<(u16, u16)>>,
    ) -> Devices {
        let links: HashMap<&str, Link> = config
            .links
            .iter()
            .map(|l| (l.name.as_str(), Link::spawn(l, Some(observer.clone()))))
            .collect();
        // Validation guarantees every device names a defined link.
        let link_of = |name: &str| links.get(name).cloned();
        let meters = config
            .meters
            .iter()
            .filter_map(|m| {
                Some(MeterPoller::new(m.clone(), link_of(&m.link)?).with_observer(observer.clone()))
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
                        .with_observer(observer.clone()),
                )
            })
            .collect();
        let actuators = inverters
            .iter()
            .map(|p| {
                Actuator::for_model(
                    p.cfg.model,
                    p.device.clone(),
                    p.cfg.unit_id,
                    p.cfg.rated_power_w,
                    p.link().clone(),
                    sunspec_revert(config),
                )
                .with_observer(observer.clone())
                .with_min_interval(Duration::from_secs_f64(config.control.min_write_interval_s))
                .with_original(originals.get(&p.cfg.id).cloned())
            })
            .collect();
        let contacts = config
            .dr
            .as_ref()
            .and_then(|d| d.contacts.clone())
            .and_then(|k| Some(Contacts::new(k.clone(), link_of(&k.link)?)));
        Devices {
            links: links.values().cloned().collect(),
            meters,
            inverters,
            actuators,
            contacts,
            frozen: FrozenWatch::default(),
            frozen_after: Duration::from_secs_f64(config.control.frozen_after_s),
            frozen_min_change_w: frozen_min_change_w(config),
            stale_after: Duration::from_secs_f64(config.control.stale_after_s),
        }
    }

    /// Read every device once (links in parallel, one request in flight per link), and the
    /// contact module alongside; ripple pulses are latched in `book`.
    pub async fn poll(
        &mut self,
        started: Duration,
        period: Duration,
        wall: DateTime<Utc>,
        book: &SharedBook,
    ) {
        let meters = join_all(self.meters.iter_mut().map(|m| m.poll(started, period)));
        let inverters = join_all(self.inverters.iter_mut().map(|i| i.poll(started, period)));
        let contacts = async {
            if let Some(c) = self.contacts.as_mut() {
                c.poll(wall, book).await;
            }
        };
        tokio::join!(meters, inverters, contacts);
        self.watch_grid_meter(started);
    }

    fn grid_meter(&self) -> Option<&MeterPoller> {
        self.meters.iter().find(|m| m.cfg.role == MeterRole::Grid)
    }

    /// Compare the grid meter's new reading with the fleet's measured output.
    fn watch_grid_meter(&mut self, polled_at: Duration) {
        let fleet_ac_w: f64 = self
            .inverters
            .iter()
            .filter(|i| i.fresh.last_ok == Some(polled_at))
            .filter_map(|i| i.reading.as_ref())
            .map(|r| r.ac_power_w)
            .sum();
        let fresh = self
            .meters
            .iter()
            .find(|m| m.cfg.role == MeterRole::Grid)
            .filter(|m| m.fresh.last_ok == Some(polled_at))
            .and_then(|m| m.reading.clone());
        if let Some(reading) = fresh {
            self.frozen.observe(polled_at, &reading, fleet_ac_w);
        }
    }

    /// The grid meter repeats itself while the fleet moves: not to be trusted.
    pub fn grid_frozen(&self, now: Duration) -> bool {
        self.frozen
            .frozen(now, self.frozen_after, self.frozen_min_change_w)
    }

    /// How long the grid meter's readings have been identical.
    pub fn grid_unchanged_for(&self, now: Duration) -> Duration {
        self.frozen.unchanged_for(now)
    }

    /// DRMs held by closed contacts, as events in force at `now`.
    pub fn contact_events(&self, now: DateTime<Utc>) -> Vec<DrEvent> {
        self.contacts
            .as_ref()
            .map(|c| c.drm_events(now))
            .unwrap_or_default()
    }

    /// What the controller may use at `now`: the grid reading (none when stale or frozen)
    /// and each unit's fresh reading.
    pub fn readings(
        &self,
        now: Duration,
    ) -> (Option<control::GridReading>, Vec<control::UnitInput>) {
        let grid = self
            .grid_meter()
            .filter(|_| !self.grid_frozen(now))
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
                    .filter(|_| p.fresh.is_fresh(now, self.stale_after));
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
        (grid, units)
    }

    /// Measured SOC per unit (the unit's minimum where there is no reading), for the planner.
    pub fn soc_pct(&self) -> Vec<f64> {
        self.inverters
            .iter()
            .map(|i| {
                i.reading
                    .as_ref()
                    .map_or(i.cfg.battery().soc_min_pct, |r| r.soc_pct)
            })
            .collect()
    }

    /// Send the decision: every commanded unit in parallel (each on its own link task).
    /// Returns the units' own settings learnt at this takeover, to be kept in the store.
    /// `safe_caps_w`: per unit, the cap it must fall back to by itself if the EMS goes quiet.
    pub async fn actuate(
        &mut self,
        decision: &Decision,
        safe_caps_w: &[f64],
        now: Duration,
    ) -> Vec<(String, Vec<(u16, u16)>)> {
        for (poller, actuator) in self.inverters.iter().zip(self.actuators.iter_mut()) {
            if let (Some(r), Some(at)) = (poller.reading.as_ref(), poller.status_read_at()) {
                actuator.confirm_mode(r.app_mode, at);
            }
        }
        let urgent = decision.urgent;
        let targets: Vec<_> = self.inverters.iter().map(|p| p.sunspec_target()).collect();
        let writes = self
            .actuators
            .iter_mut()
            .zip(&decision.setpoints)
            .zip(&targets)
            .enumerate()
            .filter_map(|(k, ((a, sp), target))| {
                let sp = (*sp)?;
                let safe_cap_w = safe_caps_w.get(k).copied().unwrap_or(0.0);
                Some(async move {
                    let sp = Setpoint {
                        command: Command {
                            battery_w: sp.battery_w,
                            output_cap_w: sp.output_cap_w,
                        },
                        safe_cap_w,
                    };
                    if let Err(e) = a.apply(&sp, target.as_ref(), now, urgent).await {
                        tracing::warn!(device = a.device(), "setpoint not written: {e}");
                    }
                })
            });
        join_all(writes).await;
        self.actuators
            .iter_mut()
            .filter_map(|a| Some((a.device().to_string(), a.take_new_original()?)))
            .collect()
    }

    /// Per unit, the alarm it raised, if any.
    pub fn alarms(&self) -> Vec<Option<&'static str>> {
        self.actuators.iter().map(|a| a.alarm()).collect()
    }

    /// Leave every unit as `on_stop` says, each with its inverter-side cap from `caps_w`
    /// (every site file has an export limit, so release keeps limiting on). Returns the
    /// units given back their own settings, whose stored originals are done with.
    pub async fn stop(&mut self, on_stop: OnStop, caps_w: &[f64]) -> Vec<String> {
        let targets: Vec<_> = self.inverters.iter().map(|p| p.sunspec_target()).collect();
        let stops = self.actuators.iter_mut().zip(caps_w).zip(&targets).map(
            |((a, &cap_w), target)| async move {
                let target = target.as_ref();
                let result = match on_stop {
                    OnStop::Safe => a.stop_safe(cap_w, target).await.map(|()| false),
                    OnStop::Release => a.release(Some(cap_w), target).await,
                };
                match result {
                    Ok(released) => released.then(|| a.device().to_string()),
                    Err(e) => {
                        tracing::error!(
                            device = a.device(),
                            "could not leave the unit safe at stop: {e}"
                        );
                        None
                    }
                }
            },
        );
        join_all(stops).await.into_iter().flatten().collect()
    }
}
