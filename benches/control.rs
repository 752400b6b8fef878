//! Control benchmark: cycle latency (read → decide → write) for the demo site's ten
//! inverters and meter over loopback Modbus TCP, the pure decision alone, and the closed-loop
//! step response to a 5 kW load drop at sunny midday with a 0 W export limit.
//!
//! `cargo bench --bench control` prints the figures and writes them as JSON to
//! `target/bench/control.json` (or the path in `BENCH_OUT`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use site_ems::config::SiteConfig;
use site_ems::control::{self, ControlParams, ControlState};
use site_ems::sim::lockstep::{ClosedLoop, Excursions};

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
    let mut l = ClosedLoop::start(demo()).await.expect("simulator");
    // Warm up: connections, the first takeover reads.
    for _ in 0..20 {
        l.tick().await;
    }
    let mut samples = Vec::with_capacity(cycles);
    for _ in 0..cycles {
        l.sim.advance(1.0);
        let t = Instant::now();
        l.ems.cycle().await;
        samples.push(t.elapsed());
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

fn decision_only(iterations: usize) -> serde_json::Value {
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
                    battery_w: -2000.0,
                    soc_pct: 60.0,
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
    json!({ "iterations": iterations, "mean_us": per * 1e6 })
}

async fn step_response(cycle_ms: u64) -> serde_json::Value {
    let mut c = demo();
    c.control.cycle_ms = cycle_ms;
    let mut l = ClosedLoop::start(c).await.expect("simulator");
    l.run(60.0, |_, _| {}).await;
    l.sim.with_model(|m| m.load_step_w = -5000.0);
    let t0 = l.t_s;
    let mut exc = Excursions::default();
    let mut back_after = None;
    l.run(60.0, |t, m| {
        let export: f64 = -m.truth.grid_w.iter().sum::<f64>();
        exc.observe(t, export, 0.0);
        if export <= 0.0 && back_after.is_none() {
            back_after = Some(t - t0);
        }
    })
    .await;
    exc.finish(l.t_s);
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

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let latency = rt.block_on(cycle_latency(1000));
    let decision = decision_only(20_000);
    let responses: Vec<_> = [1000, 200]
        .into_iter()
        .map(|ms| rt.block_on(step_response(ms)))
        .collect();
    let report = json!({
        "cycle_latency": latency,
        "decision_only": decision,
        "step_response": responses,
    });
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
    println!(
        "  control::step alone: {:.1} µs",
        decision["mean_us"].as_f64().unwrap_or_default()
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
