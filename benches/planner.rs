//! Planner benchmark: solve time and objective of the EMS's plan for 1 battery × 96 steps,
//! 10 like batteries × 96 and × 672 (a week at 15 min), 10 mixed batteries (capacity,
//! efficiencies, C-rate and SOC all differ) × 96 and × 672, and a negative-price day for a
//! mixed fleet of three; next to the same model built per battery with PuLP and solved with
//! CBC, once as an LP and once with binaries (charge xor discharge, import xor export: the
//! physical optimum). Python; a virtualenv under `target/bench/` gets PuLP from the package
//! registry on first run.
//!
//! `cargo bench --bench planner` prints both objectives and both times and writes
//! `target/bench/planner.json` (or `BENCH_OUT`). `BENCH_ONLY=mixed` runs only the cases
//! whose name contains `mixed`; `BENCH_NO_PULP=1` leaves PuLP out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use chrono::{TimeZone, Utc};
use serde_json::json;
use site_ems::planner::{solve, Battery, PlanInputs, Sources};

/// A site with a night rate, an evening peak, clear-sky PV and a daily load shape; the
/// batteries share one efficiency, one C-rate and one SOC, so they aggregate exactly.
fn inputs(batteries: usize, steps: usize) -> PlanInputs {
    like(batteries, steps)
}

/// Batteries whose capacity, efficiencies, C-rates and SOC all differ: no two aggregate.
fn mixed(batteries: usize, steps: usize) -> PlanInputs {
    let mut i = like(batteries, steps);
    for (k, b) in i.batteries.iter_mut().enumerate() {
        let k = k as f64;
        b.capacity_wh = 5000.0 + 1500.0 * k;
        b.charge_efficiency = 0.90 + 0.007 * k;
        b.discharge_efficiency = 0.97 - 0.005 * k;
        b.max_charge_w = b.capacity_wh * (0.3 + 0.05 * k);
        b.max_discharge_w = b.capacity_wh * (0.35 + 0.04 * k);
        b.soc_pct = 20.0 + 6.0 * k;
    }
    i
}

/// Three mixed batteries on a day whose midday import prices are negative.
fn negative_day() -> PlanInputs {
    let mut i = mixed(3, 96);
    for t in 0..96 {
        let h = t as f64 / 4.0;
        if (10.0..14.0).contains(&h) {
            i.import_price[t] = -0.05 - 0.02 * (h - 10.0);
            i.export_price[t] = -0.03;
        }
    }
    i.cycling_cost_per_kwh = 0.0;
    i.terminal_value_per_kwh = Some(0.0);
    i
}

fn like(batteries: usize, steps: usize) -> PlanInputs {
    let start = Utc.with_ymd_and_hms(2026, 6, 21, 0, 0, 0).unwrap();
    let step_s = 900.0;
    let mut i = PlanInputs {
        start,
        step_s,
        import_price: Vec::new(),
        export_price: Vec::new(),
        pv_w: Vec::new(),
        load_w: Vec::new(),
        batteries: (0..batteries)
            .map(|k| {
                let capacity = 10_000.0 + 1000.0 * k as f64;
                Battery {
                    id: format!("b{k}"),
                    capacity_wh: capacity,
                    max_charge_w: capacity * 0.5,
                    max_discharge_w: capacity * 0.5,
                    charge_efficiency: 0.95,
                    discharge_efficiency: 0.95,
                    soc_min_pct: 10.0,
                    soc_max_pct: 100.0,
                    soc_pct: 40.0,
                    rated_w: f64::INFINITY,
                    pv_share: 0.0,
                }
            })
            .collect(),
        export_limit_w: 5000.0 * batteries as f64,
        import_limit_w: Some(8000.0 * batteries as f64),
        dr_limits_w: Vec::new(),
        reserve_pct: 0.0,
        cycling_cost_per_kwh: 0.005,
        soc_penalty_per_kwh: 10.0,
        terminal_value_per_kwh: None,
        time_limit_s: 30.0,
        pv_from: Vec::new(),
        sources: Sources {
            import_price: "bench".into(),
            export_price: "bench".into(),
            pv: "bench".into(),
            load: "bench".into(),
        },
    };
    for k in 0..steps {
        let t = start + chrono::Duration::seconds((k as f64 * step_s) as i64);
        let h = (k as f64 * step_s / 3600.0) % 24.0;
        let day = (k as f64 * step_s / 86_400.0).floor();
        let price = if (0.5..4.5).contains(&h) {
            0.08
        } else if (16.0..19.0).contains(&h) {
            0.40 + 0.02 * day
        } else {
            0.28
        };
        i.import_price.push(price);
        i.export_price
            .push(if (11.0..14.0).contains(&h) && day as i64 % 3 == 2 {
                -0.02
            } else {
                // Below the night rate: an ordinary day, where the LP alone is executable.
                0.06
            });
        i.pv_w.push(
            6000.0
                * batteries as f64
                * site_ems::solar::clear_sky(t.naive_utc())
                * (1.0 - 0.3 * (day % 2.0)),
        );
        i.load_w
            .push(batteries as f64 * (1500.0 + 2500.0 * (-((h - 19.0) / 2.0).powi(2)).exp()));
    }
    i
}

fn to_json(i: &PlanInputs) -> serde_json::Value {
    json!({
        "step_s": i.step_s,
        "import_price": i.import_price,
        "export_price": i.export_price,
        "pv_w": i.pv_w,
        "load_w": i.load_w,
        "batteries": i.batteries,
        "export_limit_w": i.export_limit_w,
        "import_limit_w": i.import_limit_w,
        "reserve_pct": i.reserve_pct,
        "cycling_cost_per_kwh": i.cycling_cost_per_kwh,
        "soc_penalty_per_kwh": i.soc_penalty_per_kwh,
        "terminal_value_per_kwh": i.terminal_value_per_kwh,
    })
}

/// A Python with PuLP, made on first use.
fn pulp_python(dir: &Path) -> Option<PathBuf> {
    let python = dir.join("pulp-venv/bin/python");
    let has_pulp = |p: &Path| {
        Command::new(p)
            .args(["-c", "import pulp"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.exists() && has_pulp(&python) {
        return Some(python);
    }
    let venv = Command::new("python3")
        .args(["-m", "venv"])
        .arg(dir.join("pulp-venv"))
        .status();
    if !venv.is_ok_and(|s| s.success()) {
        return None;
    }
    let pip = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "pulp"])
        .status();
    (pip.is_ok_and(|s| s.success()) && has_pulp(&python)).then_some(python)
}

fn main() {
    let out_dir = PathBuf::from("target/bench");
    let _ = std::fs::create_dir_all(&out_dir);
    // `BENCH_NO_PULP=1`: the EMS's figures only (PuLP's MILP on a week takes minutes).
    let python = std::env::var_os("BENCH_NO_PULP")
        .is_none()
        .then(|| pulp_python(&out_dir))
        .flatten();
    if python.is_none() && std::env::var_os("BENCH_NO_PULP").is_none() {
        eprintln!("PuLP unavailable (python3 -m venv / pip install pulp failed): EMS figures only");
    }
    let mut results = Vec::new();
    println!("planner: EMS (good_lp + Clarabel, exact classes, branch and bound where the LP is not executable)");
    println!(
        "         vs PuLP + CBC per battery, as an LP and with binaries (the physical optimum)"
    );
    let cases: Vec<(&str, PlanInputs)> = vec![
        ("1 x 96", inputs(1, 96)),
        ("10 like x 96", inputs(10, 96)),
        ("10 like x 672", inputs(10, 672)),
        ("10 mixed x 96", mixed(10, 96)),
        ("10 mixed x 672", mixed(10, 672)),
        ("3 mixed x 96, negative prices", negative_day()),
    ];
    // `BENCH_ONLY=mixed` runs the cases whose name contains it.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    for (name, i) in cases.into_iter().filter(|(n, _)| n.contains(&only)) {
        let runs = if i.steps() > 96 || i.batteries.len() < 10 && i.cycling_cost_per_kwh == 0.0 {
            3
        } else {
            20
        };
        let mut times = Vec::new();
        let mut plan = None;
        for _ in 0..runs {
            let t = Instant::now();
            plan = Some(solve(&i).expect("plan"));
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let plan = plan.expect("at least one run");
        times.sort_by(f64::total_cmp);
        let ems_ms = times[times.len() / 2];
        let input_path = out_dir.join(format!(
            "planner-inputs-{}.json",
            name.replace([' ', ','], "")
        ));
        let _ = std::fs::write(&input_path, to_json(&i).to_string());
        let pulp = |milp: bool| {
            python.as_ref().and_then(|py| {
                let mut cmd = Command::new(py);
                cmd.arg("benches/pulp_plan.py").arg(&input_path);
                if milp {
                    cmd.arg("--milp");
                }
                let out = cmd.output().ok()?;
                serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
            })
        };
        let (lp, mip) = (pulp(false), pulp(true));
        let wall_ms = |p: &Option<serde_json::Value>| {
            p.as_ref()
                .and_then(|p| p["wall_s"].as_f64())
                .map(|s| s * 1000.0)
        };
        let objective =
            |p: &Option<serde_json::Value>| p.as_ref().and_then(|p| p["objective"].as_f64());
        let optimum = objective(&mip);
        let gap_pct = optimum.map(|o| (plan.objective - o) / o.abs().max(1e-9) * 100.0);
        let show = |x: Option<f64>, unit: &str| x.map_or("-".into(), |v| format!("{v:.3}{unit}"));
        println!(
            "  {name:<30} EMS {ems_ms:>8.2} ms ({} LP solves), objective {:.6} | PuLP+CBC LP {} (x{}), MILP {} (x{}), physical optimum {} | EMS above it {}",
            plan.lp_solves,
            plan.objective,
            show(wall_ms(&lp), " ms"),
            show(wall_ms(&lp).map(|w| w / ems_ms), ""),
            show(wall_ms(&mip), " ms"),
            show(wall_ms(&mip).map(|w| w / ems_ms), ""),
            show(optimum, ""),
            show(gap_pct, " %"),
        );
        results.push(json!({
            "case": name,
            "batteries": i.batteries.len(),
            "steps": i.steps(),
            "ems_solve_ms_median": ems_ms,
            "ems_lp_solves": plan.lp_solves,
            "ems_objective": plan.objective,
            "ems_proven_gap_pct": plan.optimality_gap_pct,
            "pulp_lp": lp,
            "pulp_milp": mip,
            "physical_optimum": optimum,
            "ems_above_optimum_pct": gap_pct,
        }));
    }
    let out = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| out_dir.join("planner.json"));
    match std::fs::write(
        &out,
        serde_json::to_string_pretty(&json!({ "planner": results })).unwrap_or_default(),
    ) {
        Ok(()) => println!("wrote {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
}
