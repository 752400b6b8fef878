//! RS485 benchmark: the full read → decide → write cycle of `sites/rs485.yaml` (six inverters
//! on three pairs, a DTSU666 on its own bus) against the simulator's RTU slaves over socat
//! pseudo-terminals, at 9600 and 19200 baud, next to the wire-time limit of the same frames
//! (the busiest bus's request and answer bytes at 11 bits a character, plus the 3.5-character
//! silences). The simulator answers after exactly the wire time, without a slave turnaround.
//!
//! `cargo bench --bench rs485` prints the figures and writes them to `target/bench/rs485.json`
//! (or `BENCH_OUT`). Needs socat.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use site_ems::config::SiteConfig;
use site_ems::runtime::Ems;
use site_ems::sim::pty::PtyPair;
use site_ems::sim::SimSite;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

async fn measure(baud: u32, cycles: usize) -> serde_json::Value {
    let mut c = SiteConfig::load(Path::new("sites/rs485.yaml")).expect("rs485 site");
    let mut rtu = HashMap::new();
    let mut pairs = Vec::new();
    for link in c.links.iter_mut() {
        let pair = PtyPair::new().expect("socat");
        link.device = Some(pair.master.display().to_string());
        link.baud = Some(baud);
        rtu.insert(link.name.clone(), pair.slave.clone());
        pairs.push(pair);
    }
    let sim = SimSite::start_with(&c, None, &rtu)
        .await
        .expect("simulator");
    sim.set_paused(true);
    let (mut ems, _api) = Ems::new(sim.rewire(&c), sim.clock());
    let bus_time =
        |ems: &Ems| -> HashMap<String, Duration> { ems.wire_times().into_iter().collect() };
    for _ in 0..10 {
        sim.advance(1.0);
        ems.cycle().await;
    }
    let (mut cycle_ms, mut limit_ms, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cycles {
        sim.advance(1.0);
        let before = bus_time(&ems);
        let t = Instant::now();
        ems.cycle().await;
        let took = t.elapsed().as_secs_f64() * 1000.0;
        let after = bus_time(&ems);
        let limit = after
            .iter()
            .map(|(k, v)| v.saturating_sub(before[k]).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max);
        cycle_ms.push(took);
        limit_ms.push(limit);
        ratio.push(took / limit);
    }
    let total_ratio = cycle_ms.iter().sum::<f64>() / limit_ms.iter().sum::<f64>();
    drop(pairs);
    json!({
        "baud": baud,
        "cycles": cycles,
        "cycle_ms_median": median(&mut cycle_ms),
        "cycle_ms_p95": percentile(&mut cycle_ms, 0.95),
        "wire_limit_ms_median": median(&mut limit_ms),
        "wire_limit_ms_p95": percentile(&mut limit_ms, 0.95),
        "ratio_median": median(&mut ratio),
        "ratio_p95": percentile(&mut ratio, 0.95),
        "ratio_total": total_ratio,
    })
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let results: Vec<_> = [9600, 19200]
        .into_iter()
        .map(|b| rt.block_on(measure(b, 60)))
        .collect();
    println!("RS485 cycle (read → decide → write), sites/rs485.yaml: 6 inverters on 3 pairs + meter bus:");
    for r in &results {
        println!(
            "  {:>5} baud: cycle median {:.1} ms (p95 {:.1}), wire-time limit median {:.1} ms (p95 {:.1}); cycle / limit: median {:.3}, p95 {:.3}, overall {:.3}",
            r["baud"],
            r["cycle_ms_median"].as_f64().unwrap_or_default(),
            r["cycle_ms_p95"].as_f64().unwrap_or_default(),
            r["wire_limit_ms_median"].as_f64().unwrap_or_default(),
            r["wire_limit_ms_p95"].as_f64().unwrap_or_default(),
            r["ratio_median"].as_f64().unwrap_or_default(),
            r["ratio_p95"].as_f64().unwrap_or_default(),
            r["ratio_total"].as_f64().unwrap_or_default(),
        );
    }
    let out = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench/rs485.json"));
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(
        &out,
        serde_json::to_string_pretty(&json!({ "rs485": results })).unwrap_or_default(),
    ) {
        Ok(()) => println!("wrote {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
}
