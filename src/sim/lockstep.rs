//! The EMS and a simulated site in lock-step over real Modbus TCP, for closed-loop tests
//! and benchmarks: simulated time advances in physics ticks and the EMS runs one full cycle
//! (read, decide, write) per control period, so a simulated day takes minutes, not a day.
//!
//! The time the EMS spends in a cycle counts: while a cycle runs, site time runs with the
//! wall clock (every read and write lands on the site as it is at that moment), and the
//! next tick starts from there. A loop that stalls — on a solve, a disk, a device that does
//! not answer — lets the site drift for as long, and the tests see the excursion.

use crate::config::SiteConfig;
use crate::runtime::{Ems, EmsOptions};
use crate::sim::physics::SiteModel;
use crate::sim::SimSite;

pub struct ClosedLoop {
    pub sim: SimSite,
    pub ems: Ems,
    /// The EMS's API state, for a test that serves the API beside the loop.
    pub api: crate::web::api::AppState,
    pub t_s: f64,
    cycle_s: f64,
    next_cycle_s: f64,
    cycle_spent_s: Vec<f64>,
}

pub const TICK_S: f64 = 0.1;

impl ClosedLoop {
    pub async fn start(config: SiteConfig) -> std::io::Result<ClosedLoop> {
        ClosedLoop::start_with(config, &std::collections::HashMap::new()).await
    }

    /// As [`ClosedLoop::start`], with the devices of the RTU links in `rtu` served on those
    /// serial devices (the slave ends; the site file's links name the master ends).
    pub async fn start_with(
        config: SiteConfig,
        rtu: &std::collections::HashMap<String, std::path::PathBuf>,
    ) -> std::io::Result<ClosedLoop> {
        ClosedLoop::start_full(config, rtu, EmsOptions::default()).await
    }

    /// As [`ClosedLoop::start`], with options for the EMS.
    pub async fn start_options(
        config: SiteConfig,
        options: EmsOptions,
    ) -> std::io::Result<ClosedLoop> {
        ClosedLoop::start_full(config, &std::collections::HashMap::new(), options).await
    }

    /// As [`ClosedLoop::start`], with the EMS's site file (already pointing at the
    /// simulator) passed through `adjust` first: to route a link through a fault injector.
    pub async fn start_adjusted(
        config: SiteConfig,
        adjust: impl FnOnce(SiteConfig) -> SiteConfig,
    ) -> std::io::Result<ClosedLoop> {
        let sim = SimSite::start_with(&config, None, &std::collections::HashMap::new()).await?;
        ClosedLoop::around(sim, &config, adjust, EmsOptions::default())
    }

    async fn start_full(
        config: SiteConfig,
        rtu: &std::collections::HashMap<String, std::path::PathBuf>,
        options: EmsOptions,
    ) -> std::io::Result<ClosedLoop> {
        let sim = SimSite::start_with(&config, None, rtu).await?;
        ClosedLoop::around(sim, &config, |c| c, options)
    }

    fn around(
        sim: SimSite,
        config: &SiteConfig,
        adjust: impl FnOnce(SiteConfig) -> SiteConfig,
        options: EmsOptions,
    ) -> std::io::Result<ClosedLoop> {
        sim.set_paused(true);
        let (ems, api) = Ems::with_options(adjust(sim.rewire(config)), sim.clock(), options);
        Ok(ClosedLoop {
            sim,
            ems,
            api,
            t_s: 0.0,
            cycle_s: config.control.cycle_ms as f64 / 1000.0,
            next_cycle_s: 0.0,
            cycle_spent_s: Vec::new(),
        })
    }

    /// One physics tick, and an EMS cycle when one is due. Site time runs with the wall
    /// clock for as long as the cycle takes; a cycle that overruns its period starts the
    /// next one at once.
    pub async fn tick(&mut self) {
        self.sim.advance(TICK_S);
        self.t_s += TICK_S;
        if self.t_s + 1e-9 >= self.next_cycle_s {
            self.sim.run_in_real_time();
            self.ems.cycle().await;
            let spent_s = self.sim.freeze();
            self.t_s += spent_s;
            self.cycle_spent_s.push(spent_s);
            self.next_cycle_s = (self.next_cycle_s + self.cycle_s).max(self.t_s);
        }
    }

    /// Site seconds each cycle so far took (its reads, writes and anything it awaited).
    pub fn cycle_times_s(&self) -> &[f64] {
        &self.cycle_spent_s
    }

    /// Run for `seconds` of site time, calling `watch` after every tick.
    pub async fn run(&mut self, seconds: f64, mut watch: impl FnMut(f64, &SiteModel)) {
        let end = self.t_s + seconds;
        while self.t_s < end - 1e-9 {
            self.tick().await;
            let t = self.t_s;
            self.sim.with_model(|m| watch(t, m));
        }
    }

    /// Change the site's load by `step_w` (− a drop, split by the phase shares) and watch
    /// the export for `seconds`: how long until it is at or under `limit_w` again, and every
    /// excursion above it.
    pub async fn load_step_response(
        &mut self,
        step_w: f64,
        limit_w: f64,
        seconds: f64,
    ) -> StepResponse {
        self.sim.with_model(|m| m.load_step_w = step_w);
        let t0 = self.t_s;
        let mut excursions = Excursions::default();
        let mut back_after_s = None;
        self.run(seconds, |t, m| {
            let export: f64 = -m.truth.grid_w.iter().sum::<f64>();
            excursions.observe(t, export, limit_w);
            if export <= limit_w && back_after_s.is_none() && t > t0 {
                back_after_s = Some(t - t0);
            }
        })
        .await;
        excursions.finish(self.t_s);
        StepResponse {
            back_after_s,
            excursions,
        }
    }

    /// Export per phase right now (+ export), from the simulator's ground truth.
    pub fn phase_export_w(&self) -> [f64; 3] {
        self.sim.with_model(|m| m.truth.grid_w.map(|g| -g))
    }

    pub fn export_w(&self) -> f64 {
        self.phase_export_w().iter().sum()
    }

    /// No write was refused by the simulated firmware, and every value on the wire lies in
    /// its register's documented range (SunSpec units check their own writes: a read-only
    /// point or a percentage over 100 is refused, so `accepted` says it all).
    pub fn assert_clean_writes(&self) {
        let writes = self.sim.writes();
        assert!(!writes.is_empty(), "the EMS wrote nothing");
        let sunspec: Vec<String> = self.sim.with_model(|m| {
            m.inverters
                .iter()
                .filter(|i| i.sunspec.is_some())
                .map(|i| i.id.clone())
                .collect()
        });
        for w in writes {
            if sunspec.contains(&w.device) {
                assert!(w.accepted, "write refused: {w:?}");
                continue;
            }
            let s = crate::drivers::saj::setting(w.addr)
                .unwrap_or_else(|| panic!("write to undocumented register {:#06x}", w.addr));
            assert!(
                w.accepted && (s.min..=s.max).contains(&w.value),
                "bad write on the wire: {w:?}"
            );
        }
    }
}

/// The export's answer to a load step: see [`ClosedLoop::load_step_response`].
#[derive(Debug)]
pub struct StepResponse {
    /// Site seconds until export was at or under the limit again (`None`: never).
    pub back_after_s: Option<f64>,
    pub excursions: Excursions,
}

/// Excursions of a signal above a limit: their durations in seconds.
#[derive(Default, Debug)]
pub struct Excursions {
    started: Option<f64>,
    pub done: Vec<(f64, f64)>,
    pub worst_w: f64,
}

impl Excursions {
    pub fn observe(&mut self, t: f64, value: f64, limit: f64) {
        if value > limit + 1e-6 {
            self.worst_w = self.worst_w.max(value - limit);
            self.started.get_or_insert(t);
        } else if let Some(t0) = self.started.take() {
            self.done.push((t0, t - t0));
        }
    }

    pub fn longest_s(&self) -> f64 {
        self.done.iter().map(|e| e.1).fold(0.0, f64::max)
    }

    /// Close an excursion still open at `t`.
    pub fn finish(&mut self, t: f64) {
        if let Some(t0) = self.started.take() {
            self.done.push((t0, t - t0));
        }
    }
}
