//! The export-excursion log against the simulator's own meter: a simulated day with load
//! steps, every interval of export over the limit recorded with its start, end and peak
//! (count equal to what the meter saw, durations within one cycle), served as JSON and CSV
//! that agree, and summarised by `ems report`.

#![cfg(feature = "sim")]

mod common;

use std::process::Command;

use rand::{Rng, SeedableRng};
use site_ems::compliance::{from_csv, Excursion};
use site_ems::config::SiteConfig;
use site_ems::sim::lockstep::{ClosedLoop, Excursions};

/// The demo site with a store in `dir`, written to a site file there (for `ems report`).
fn demo_with_store(dir: &tempfile::TempDir) -> (SiteConfig, std::path::PathBuf) {
    let text = std::fs::read_to_string("sites/demo.yaml").unwrap()
        + &format!(
            "store:\n  path: {}\n",
            dir.path().join("ems.sqlite").display()
        );
    let path = dir.path().join("site.yaml");
    std::fs::write(&path, &text).unwrap();
    let mut c = SiteConfig::from_str("site.yaml", &text).unwrap();
    c.control.stale_after_s = 3.0;
    c.simulation.load_noise_pct = 0.0;
    c.simulation.start = Some("2026-06-21T00:00".into());
    (c, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_load_steps_is_logged_as_the_meter_saw_it_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (c, site_file) = demo_with_store(&dir);
    let cycle_s = c.control.cycle_ms as f64 / 1000.0;
    let mut l = ClosedLoop::start(c).await.unwrap();
    let start = l.sim.with_model(|m| m.now);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut seen = Excursions::default();
    let mut next_step_s = 0.0;
    while l.t_s < 86_400.0 {
        if l.t_s >= next_step_s {
            let step_w: f64 = rng.random_range(-12_000.0..8000.0);
            l.sim.with_model(|m| m.load_step_w = step_w);
            next_step_s = l.t_s + rng.random_range(60.0..1800.0);
        }
        l.tick().await;
        // The simulated grid meter's own view: export over the 0 W limit.
        seen.observe(l.t_s, l.export_w(), 0.0);
    }
    seen.finish(l.t_s);
    l.ems.stop().await;
    let l_reads = l.sim.grid_meter_reads();
    l.ems
        .flush_store(std::time::Duration::from_secs(5))
        .await
        .unwrap();

    // The API, served beside the loop: JSON and CSV.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, site_ems::web::api::router(l.api.clone()))
            .await
            .unwrap()
    });
    let client = reqwest::Client::new();
    let url = format!("{base}/api/v1/excursions?from=2026-06-20T00:00:00Z&to=2026-06-23T00:00:00Z");
    let logged: Vec<Excursion> = client.get(&url).send().await.unwrap().json().await.unwrap();
    let csv = client
        .get(&url)
        .header("Accept", "text/csv")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let bad = client
        .get(format!("{base}/api/v1/excursions?from=yesterday"))
        .send()
        .await
        .unwrap();
    server.abort();
    assert_eq!(bad.status(), 400);

    // What the simulated grid meter showed each time it was read, as excursions over 0 W.
    let mut served = Excursions::default();
    let reads = l_reads;
    for (t, phases) in &reads {
        let t_s = (*t - start).num_milliseconds() as f64 / 1000.0;
        served.observe(t_s, -phases.iter().sum::<f64>(), 0.0);
    }
    println!(
        "{} meter reads; the meter showed {} excursions, the log has {}; at 0.1 s the site had {} (longest {:.1} s)",
        reads.len(),
        served.done.len(),
        logged.len(),
        seen.done.len(),
        seen.longest_s()
    );
    assert!(served.done.len() >= 5, "the day has excursions to log");
    assert_eq!(logged.len(), served.done.len(), "{logged:#?}");
    for (e, (t0, d)) in logged.iter().zip(&served.done) {
        let started_s = (e.start - start).num_milliseconds() as f64 / 1000.0;
        assert!(
            (started_s - t0).abs() <= cycle_s + 1e-6,
            "start {started_s:.1} s against the meter's {t0:.1} s"
        );
        assert!(
            (e.duration_s - d).abs() <= cycle_s + 1e-6,
            "duration {:.1} s against the meter's {d:.1} s",
            e.duration_s
        );
        assert!(e.peak > 0.0 && e.limit == 0.0 && e.constraint == "export_limit");
    }
    // Every excursion of two cycles or more at the site itself is in the log. The meter is
    // read once a cycle, at a moment in the cycle that moves with how long the cycle takes
    // (site time runs while the EMS works), so a shorter one can fall between two readings,
    // and the log may start up to two cycles after the site did.
    for (t0, d) in seen.done.iter().filter(|(_, d)| *d >= 2.0 * cycle_s) {
        assert!(
            logged.iter().any(|e| {
                let s = (e.start - start).num_milliseconds() as f64 / 1000.0;
                (s - t0).abs() <= 2.0 * cycle_s + 1e-6
            }),
            "the site exported for {d:.1} s from {t0:.1} s and the log does not have it"
        );
    }
    // CSV and JSON agree (to the CSV's millisecond and milliwatt precision).
    let from_text = from_csv(&csv).unwrap();
    assert_eq!(from_text.len(), logged.len());
    for (a, b) in from_text.iter().zip(&logged) {
        assert_eq!(
            (a.start, a.end, a.unit, a.phase),
            (b.start, b.end, b.unit, b.phase)
        );
        assert!((a.peak - b.peak).abs() < 1e-3 && (a.duration_s - b.duration_s).abs() < 1e-3);
    }

    // `ems report` prints them from the store.
    let out = Command::new(env!("CARGO_BIN_EXE_ems"))
        .args([
            "report",
            site_file.to_str().unwrap(),
            "--to",
            "2026-06-23T00:00:00Z",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("count {}", logged.len())), "{text}");
    assert!(text.contains("15 s or longer (flagged): 0"), "{text}");
    for e in &logged {
        let at = e.start.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        assert!(text.contains(&at), "{at} in the report");
    }
}
