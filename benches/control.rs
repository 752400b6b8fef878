//! Control benchmark: cycle latency (read → decide → write) for the demo site's ten
//! inverters and meter over loopback Modbus TCP, the pure decision alone, and the closed-loop
//! step response to a 5 kW load drop at sunny midday with a 0 W export limit.
//!
//! Two more figures show that nothing slow waits in the loop: cycle latency while a
//! heterogeneous 10-battery × 672-step plan solves in the planner's task, and while 100
//! demand-response events a second are accepted (written to the store first).
//!
//! `cargo bench --bench control` prints the figures and writes them as JSON to
//! `target/bench/control.json` (or the path in `BENCH_OUT`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use site_ems::config::SiteConfig;
use site_ems::control::{self, ControlParams, ControlState};
use site_ems::sim::lockstep::ClosedLoop;

fn demo() -> SiteConfig {
    let mut c = SiteConfig::load(Path::new("sites/demo.yaml")).expect("demo site");
    c.simulation.load_noise_pct = 0.0;
    c
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn cycle_latency(cycles: usize) -> serde_json::Value {
    let l = ClosedLoop::start(demo()).await.expect("simulator");
    latency_of(l, cycles, |_| true).await
}

/// Latency of `cycles` cycles (each after a second of site time) for which `counts` holds.
async fn latency_of(
    mut l: ClosedLoop,
    cycles: usize,
    counts: impl Fn(&ClosedLoop) -> bool,
) -> serde_json::Value {
    // Warm up: connections, the first takeover reads.
    for _ in 0..20 {
        l.tick().await;
    }
    let mut samples = Vec::with_capacity(cycles);
    let mut skipped = 0;
    while samples.len() < cycles && skipped < 100 * cycles {
        l.sim.advance(1.0);
        let t = Instant::now();
        l.ems.cycle().await;
        let took = t.elapsed();
        if counts(&l) {
            samples.push(took);
        } else {
            skipped += 1;
        }
    }
    samples.sort();
    json!({
        "cycles": cycles,
        "inverters": 10,
        "p50_ms": percentile(&samples, 0.5),
        "p99_ms": percentile(&samples, 0.99),
        "max_ms": percentile(&samples, 1.0),
    })
}

/// Ten batteries that differ in size, efficiency and C-rate, planned 7 days ahead in
/// 15-minute steps (672), in plan mode, re-planned as often as the planner allows.
fn heterogeneous_week() -> SiteConfig {
    let mut c = demo();
    c.working_mode.mode = site_ems::config::WorkingMode::Plan;
    for (k, inv) in c.inverters.iter_mut().enumerate() {
        let Some(b) = inv.battery.as_mut() else {
            continue;
        };
        b.capacity_wh = 15_000.0 + 2_500.0 * k as f64;
        b.charge_efficiency = 0.90 + 0.007 * k as f64;
        b.discharge_efficiency = 0.93 + 0.004 * k as f64;
        b.max_charge_w = (0.3 + 0.05 * k as f64) * b.capacity_wh;
        b.max_discharge_w = b.max_charge_w * 0.9;
    }
    if let Some(p) = c.planner.as_mut() {
        p.horizon_h = 168.0;
        p.step_min = 15;
        p.replan_min = 1.0;
    }
    c
}

fn solving(l: &ClosedLoop) -> bool {
    l.ems
        .status()
        .and_then(|s| s.plan.as_ref().map(|p| p.solving))
        .unwrap_or(false)
}

async fn latency_while_planning(cycles: usize) -> serde_json::Value {
    let l = ClosedLoop::start(heterogeneous_week())
        .await
        .expect("simulator");
    let mut r = latency_of(l, cycles, solving).await;
    r["plan"] = json!("10 distinct batteries x 672 steps, solving in the planner task");
    r
}

async fn latency_under_dr_load(cycles: usize) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut c = demo();
    c.store = Some(site_ems::config::StoreConfig {
        path: dir.path().join("ems.sqlite").display().to_string(),
    });
    // The load is the point here: the book's intake limits must not turn it away.
    c.dr = Some(site_ems::config::DrConfig {
        max_events: 100_000,
        max_events_per_min: 100_000,
        ..Default::default()
    });
    let l = ClosedLoop::start(c).await.expect("simulator");
    let book = l.ems.dr_book();
    let start = chrono::Utc::now() + chrono::Duration::days(1);
    let sender = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(10));
        let mut accepted = 0u64;
        for k in 0..1_000_000u64 {
            every.tick().await;
            let event = site_ems::dr::DrEvent {
                id: format!("bench-{k}"),
                start,
                end: start + chrono::Duration::hours(1),
                priority: 0,
                command: site_ems::dr::DrCommand::ExportLimitW(1000.0 + k as f64),
                source: "bench".into(),
            };
            let book = book.clone();
            // Each event waits for the disk on its own, as concurrent API requests would.
            tokio::spawn(async move { book.submit(event).await.is_ok() });
            accepted += 1;
        }
        accepted
    });
    let t = Instant::now();
    let mut r = latency_of(l, cycles, |_| true).await;
    let secs = t.elapsed().as_secs_f64();
    sender.abort();
    r["events_per_s"] = json!(100);
    r["seconds"] = json!(secs);
    r
}

/// `control::step` alone on the demo fleet. With `full` batteries the surplus can only be
/// curtailed, so the export limit binds and the limits solve runs every cycle.
fn decision_only(iterations: usize, full: bool) -> serde_json::Value {
    let c = demo();
    let p = ControlParams::from_config(&c);
    let snapshot = control::Snapshot {
        time: chrono::Utc::now(),
        mono_s: 1.0,
        grid: Some(control::GridReading {
            phases: c
                .phases()
                .into_iter()
                .map(|ph| (ph, -3000.0, 230.0))
                .collect(),
            age_s: 0.1,
        }),
        units: (0..c.inverters.len())
            .map(|_| control::UnitInput {
                health: control::UnitHealth::Ok,
                reading: Some(control::UnitReading {
                    ac_phase_w: [2000.0; 3],
                    ac_w: 6000.0,
                    pv_w: 8000.0,
                    battery_w: if full { 0.0 } else { -2000.0 },
                    soc_pct: if full { 100.0 } else { 60.0 },
                }),
            })
            .collect(),
        constraints: control::Constraints::gather(&p, &Default::default(), None),
    };
    let state = ControlState::default();
    let t = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(control::step(&p, std::hint::black_box(&snapshot), &state));
    }
    let per = t.elapsed().as_secs_f64() / iterations as f64;
    let (d, _) = control::step(&p, &snapshot, &state);
    json!({
        "iterations": iterations,
        "mean_us": per * 1e6,
        "binding": d.binding.map(|b| b.label()),
    })
}

async fn step_response(cycle_ms: u64) -> serde_json::Value {
    let mut c = demo();
    c.control.cycle_ms = cycle_ms;
    let mut l = ClosedLoop::start(c).await.expect("simulator");
    l.run(60.0, |_, _| {}).await;
    let r = l.load_step_response(-5000.0, 0.0, 60.0).await;
    let (back_after, exc) = (r.back_after_s, r.excursions);
    json!({
        "load_drop_w": 5000,
        "export_limit_w": 0,
        "cycle_ms": cycle_ms,
        "back_under_limit_after_s": back_after.map(|s| (s * 10.0).round() / 10.0),
        "worst_excursion_w": exc.worst_w,
        "longest_excursion_s": exc.longest_s(),
        "excursions": exc.done.len(),
    })
}

/// Register writes per unit per hour over `hours` of simulated site from 06:00, with load
/// noise (the demo's), at 1 s cycles.
async fn writes_per_unit_hour(hours: f64) -> serde_json::Value {
    let mut c = demo();
    c.control.cycle_ms = 1000;
    c.simulation.start = Some("2026-06-21T06:00".into());
    let mut l = ClosedLoop::start(c).await.expect("simulator");
    l.run(hours * 3600.0, |_, _| {}).await;
    let counts: Vec<u64> = l.sim.with_model(|m| {
        m.inverters
            .iter()
            .map(|i| i.writes.values().sum::<u64>())
            .collect()
    });
    let per_hour: Vec<f64> = counts.iter().map(|&n| n as f64 / hours).collect();
    let max = per_hour.iter().copied().fold(0.0, f64::max);
    let mean = per_hour.iter().sum::<f64>() / per_hour.len().max(1) as f64;
    json!({ "hours": hours, "start": "06:00", "per_unit_per_hour_mean": mean, "per_unit_per_hour_max": max, "goal": 360 })
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let latency = rt.block_on(cycle_latency(1000));
    let planning = rt.block_on(latency_while_planning(500));
    let dr_load = rt.block_on(latency_under_dr_load(3000));
    let decision = decision_only(20_000, false);
    let decision_binding = decision_only(2_000, true);
    let writes = rt.block_on(writes_per_unit_hour(24.0));
    let responses: Vec<_> = [1000, 200]
        .into_iter()
        .map(|ms| rt.block_on(step_response(ms)))
        .collect();
    let report = json!({
        "cycle_latency": latency,
        "cycle_latency_while_planning": planning,
        "cycle_latency_under_dr_events": dr_load,
        "decision_only": decision,
        "decision_limits_solve": decision_binding,
        "step_response": responses,
        "writes": writes,
    });
    println!(
        "register writes per unit per hour over a simulated day: mean {:.0}, max {:.0} (goal ≤ 360)",
        writes["per_unit_per_hour_mean"].as_f64().unwrap_or_default(),
        writes["per_unit_per_hour_max"].as_f64().unwrap_or_default()
    );
    println!(
        "control cycle, 10 inverters + meter over loopback Modbus TCP (read → decide → write):"
    );
    println!(
        "  p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} cycles",
        latency["p50_ms"].as_f64().unwrap_or_default(),
        latency["p99_ms"].as_f64().unwrap_or_default(),
        latency["max_ms"].as_f64().unwrap_or_default(),
        latency["cycles"]
    );
    for (what, r) in [
        ("while a 10 x 672 heterogeneous plan solves", &planning),
        ("while 100 DR events a second arrive", &dr_load),
    ] {
        println!(
            "  {what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} cycles",
            r["p50_ms"].as_f64().unwrap_or_default(),
            r["p99_ms"].as_f64().unwrap_or_default(),
            r["max_ms"].as_f64().unwrap_or_default(),
            r["cycles"]
        );
    }
    println!(
        "  control::step alone: {:.1} µs; with the limits solve ({}): {:.1} µs",
        decision["mean_us"].as_f64().unwrap_or_default(),
        decision_binding["binding"],
        decision_binding["mean_us"].as_f64().unwrap_or_default()
    );
    println!("step response, 5 kW load drop at sunny midday, 0 W export limit:");
    for r in &responses {
        println!(
            "  cycle {} ms: export back under the limit after {} s; worst excursion {:.0} W, longest {:.1} s",
            r["cycle_ms"],
            r["back_under_limit_after_s"],
            r["worst_excursion_w"].as_f64().unwrap_or_default(),
            r["longest_excursion_s"].as_f64().unwrap_or_default()
        );
    }
    let out = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench/control.json"));
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(
        &out,
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    ) {
        Ok(()) => println!("wrote {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
}
