//! The planner through its interfaces: `ems plan` (JSON contract, CSV inputs, errors),
//! `GET /api/v1/plan`, and a simulated day on the demo site under the plan against the same
//! day under self-consumption.

#![cfg(feature = "sim")]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{fast_site, Harness};
use serde_json::Value;
use site_ems::config::WorkingMode;
use site_ems::sim::lockstep::ClosedLoop;

fn ems_plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ems"))
        .arg("plan")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plan_json_follows_the_contract() {
    let (ok, out, err) = ems_plan(&[
        "sites/demo.yaml",
        "--json",
        "--start",
        "2026-06-21T00:00:00Z",
        "--horizon",
        "24",
    ]);
    assert!(ok, "{err}");
    let p: Value = serde_json::from_str(&out).unwrap();
    for key in ["cost", "baseline_cost", "solve_ms"] {
        assert!(p[key].is_number(), "{key}");
    }
    let steps = p["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 96, "24 h of 15-min steps");
    assert_eq!(steps[0]["start"], "2026-06-21T00:00:00Z");
    for s in steps {
        for key in ["import_price", "export_price", "pv_w", "load_w", "grid_w"] {
            assert!(s[key].is_number(), "{key}");
        }
        let b = s["batteries"].as_array().unwrap();
        assert_eq!(b.len(), 10);
        assert!(b
            .iter()
            .all(|b| b["id"].is_string() && b["power_w"].is_number() && b["soc_pct"].is_number()));
        // The demo's export limit is 0 W.
        assert!(s["grid_w"].as_f64().unwrap() >= -1.0);
    }
    assert!(p["cost"].as_f64().unwrap() < p["baseline_cost"].as_f64().unwrap());
    // The text table says the same.
    let (ok, text, _) = ems_plan(&[
        "sites/demo.yaml",
        "--start",
        "2026-06-21T00:00:00Z",
        "--horizon",
        "6",
    ]);
    assert!(ok);
    assert!(
        text.contains("import") && text.contains("without batteries"),
        "{text}"
    );
}

#[test]
fn plan_reads_csv_prices_and_forecasts_including_negative_prices() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, f: &dyn Fn(u32) -> f64| {
        let mut text = String::from("start,value\n");
        for h in 0..24 {
            text += &format!("2026-03-01T{h:02}:00:00Z,{}\n", f(h));
        }
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let prices = write("prices.csv", &|h| {
        if (11..14).contains(&h) {
            -0.05
        } else {
            0.30
        }
    });
    let pv = write("pv.csv", &|h| {
        if (8..17).contains(&h) {
            70_000.0
        } else {
            0.0
        }
    });
    let load = write("load.csv", &|_| 20_000.0);
    let (ok, out, err) = ems_plan(&[
        "sites/demo.yaml",
        "--json",
        "--prices",
        &prices,
        "--pv",
        &pv,
        "--load",
        &load,
        "--start",
        "2026-03-01T00:00:00Z",
        "--horizon",
        "24",
        "--soc",
        "20",
    ]);
    assert!(ok, "{err}");
    let p: Value = serde_json::from_str(&out).unwrap();
    assert!(p["sources"]["import_price"]
        .as_str()
        .unwrap()
        .contains("prices.csv"));
    assert!(p["sources"]["pv"].as_str().unwrap().contains("pv.csv"));
    let steps = p["steps"].as_array().unwrap();
    // Hourly CSV values hold for their four 15-min steps.
    assert_eq!(steps[45]["import_price"], -0.05);
    assert_eq!(steps[45]["pv_w"], 70_000.0);
    // Paid to import: the batteries charge.
    let charging: f64 = steps[44..56]
        .iter()
        .flat_map(|s| {
            s["batteries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["power_w"].as_f64().unwrap())
        })
        .sum();
    assert!(charging < -1000.0, "{charging}");

    // A bad row is reported with its file and line.
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "start,value\n2026-03-01T00:00:00Z,0.1\nyesterday,0.2\n",
    )
    .unwrap();
    let (ok, _, err) = ems_plan(&["sites/demo.yaml", "--prices", &bad.display().to_string()]);
    assert!(!ok);
    assert!(
        err.contains("bad.csv:3: start `yesterday` is not RFC 3339"),
        "{err}"
    );
    // A site without a planner says so.
    let (ok, _, err) = ems_plan(&["sites/home-1ph.yaml"]);
    assert!(!ok && err.contains("no `planner:` section"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_api_serves_the_current_plan() {
    let h = Harness::start(fast_site("sites/demo.yaml")).await;
    h.wait_for(Duration::from_secs(10), "a plan", |s| {
        s["plan"]["cost"].is_number()
    })
    .await;
    let r = h
        .client
        .get(format!("{}/api/v1/plan", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["steps"].as_array().unwrap().len(), 96);
    h.stop().await;

    let h = Harness::start(fast_site("sites/home-1ph.yaml")).await;
    h.wait_for(Duration::from_secs(10), "a status", |_| true)
        .await;
    let r = h
        .client
        .get(format!("{}/api/v1/plan", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("no planner"));
    h.stop().await;
}

/// One simulated day on the demo site; returns what the grid meter's flows cost.
async fn day_cost(mode: WorkingMode) -> (f64, Option<site_ems::planner::score::ForecastQuality>) {
    let mut c = fast_site("sites/demo.yaml");
    c.control.cycle_ms = 5000;
    c.control.stale_after_s = 15.0;
    c.simulation.start = Some("2026-06-21T00:00".into());
    c.simulation.load_noise_pct = 0.0;
    c.working_mode.mode = mode;
    let planner = c.planner.clone().unwrap();
    let site = c.clone();
    let mut l = ClosedLoop::start(c).await.unwrap();
    let mut cost = 0.0;
    let dt_h = site_ems::sim::lockstep::TICK_S / 3600.0;
    for _ in 0..(86_400.0 / site_ems::sim::lockstep::TICK_S) as usize {
        l.tick().await;
        let (now, grid): (chrono::DateTime<chrono::Utc>, f64) =
            l.sim.with_model(|m| (m.now, m.truth.grid_w.iter().sum()));
        let (import, export) = site_ems::planner::inputs::prices_at(&site, &planner, now).unwrap();
        cost += if grid >= 0.0 {
            import * grid
        } else {
            export * grid
        } * dt_h
            / 1000.0;
    }
    let quality = l
        .ems
        .status()
        .and_then(|s| s.plan.as_ref().map(|p| p.forecast_quality.clone()));
    (cost, quality)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_under_the_plan_costs_less_than_self_consumption() {
    let (self_use, _) = day_cost(WorkingMode::SelfConsumption).await;
    let (planned, quality) = day_cost(WorkingMode::Plan).await;
    println!("simulated day on the demo site: self-consumption {self_use:.2}, plan {planned:.2}, saving {:.2} ({:.1} %)",
        self_use - planned, (self_use - planned) / self_use * 100.0);
    // The plan buys the cheap night rate and covers the evening peak; self-consumption only
    // stores the midday surplus.
    assert!(
        planned < self_use - 5.0,
        "plan {planned:.2} vs self-consumption {self_use:.2}"
    );
    // Forecast quality over the day: every step scored against what the site measured (PV
    // counted with what the setpoints held back under the 0 W export limit). The load profile
    // in the site file was taken from the simulated load, so its bias is near zero.
    let today = quality.and_then(|q| q.today).expect("a scored day");
    println!("forecast quality on {}: {} steps, PV MAE {:.0} W bias {:.0} W, load MAE {:.0} W bias {:.0} W",
        today.day, today.steps, today.pv_mae_w, today.pv_bias_w, today.load_mae_w, today.load_bias_w);
    assert!(today.steps >= 90, "{} steps scored", today.steps);
    assert!(today.pv_mae_w.is_finite() && today.pv_mae_w > 0.0);
    assert!(today.load_bias_w.abs() < 2000.0 && today.load_mae_w < 5000.0);
}

#[test]
fn history_forecast_averages_the_same_weekday_over_recent_weeks() {
    use chrono::TimeZone;
    use site_ems::store::{Sample, Store};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.sqlite");
    let store = Store::open(&path).unwrap();
    let start = chrono::Utc.with_ymd_and_hms(2026, 6, 22, 0, 0, 0).unwrap();
    // Four weeks of minutes before the start: week w (1 = last week) at hour h has load
    // 1000·w + 10·h; the days between are noise the forecast must not pick up.
    for w in 1..=4i64 {
        for m in 0..(24 * 60) {
            let minute = start - chrono::Duration::weeks(w) + chrono::Duration::minutes(m);
            let h = m / 60;
            store
                .insert(Sample {
                    minute,
                    load_w: (1000 * w + 10 * h) as f64,
                    pv_w: 0.0,
                    grid_w: 0.0,
                })
                .unwrap();
            let other_day = minute + chrono::Duration::days(1);
            store
                .insert(Sample {
                    minute: other_day,
                    load_w: 99_999.0,
                    pv_w: 0.0,
                    grid_w: 0.0,
                })
                .unwrap();
        }
    }
    let mut c =
        site_ems::config::SiteConfig::load(std::path::Path::new("sites/demo.yaml")).unwrap();
    c.store = Some(site_ems::config::StoreConfig {
        path: path.display().to_string(),
    });
    let mut p = c.planner.clone().unwrap();
    p.load_forecast.history_weeks = Some(4);
    p.load_forecast.profile_w = None;
    let i = site_ems::planner::inputs::from_config(
        &c,
        &p,
        start,
        &[50.0; 10],
        &Default::default(),
        Some(&store),
    )
    .unwrap();
    // Mean over the four weeks: 2500 + 10·h, for every 15-min step of day h.
    for (k, load) in i.load_w.iter().enumerate() {
        let h = (k / 4) as f64;
        assert!(
            (load - (2500.0 + 10.0 * h)).abs() < 1e-6,
            "step {k}: {load}"
        );
    }
    assert!(
        i.sources.load.contains("recorded history"),
        "{}",
        i.sources.load
    );
    // Without history for a step and no profile to fall back on, the planner says why.
    let later = start + chrono::Duration::days(3);
    let e = site_ems::planner::inputs::from_config(
        &c,
        &p,
        later,
        &[50.0; 10],
        &Default::default(),
        Some(&store),
    )
    .unwrap_err();
    assert!(e.contains("no recorded load"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ems_records_site_history_as_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ems.sqlite");
    let mut c = fast_site("sites/demo.yaml");
    c.control.cycle_ms = 1000;
    c.store = Some(site_ems::config::StoreConfig {
        path: path.display().to_string(),
    });
    let mut l = ClosedLoop::start(c).await.unwrap();
    l.run(185.0, |_, _| {}).await;
    // Rows reach the file through the store's writer thread.
    l.ems
        .flush_store(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let store = site_ems::store::Store::open(&path).unwrap();
    let rows = store.count().unwrap();
    assert!((2..=4).contains(&rows), "one row a minute: {rows}");
    // The recorded load is the simulator's: grid + inverters (no PV meter on the demo).
    let truth: f64 = l.sim.with_model(|m| m.truth.load_w.iter().sum());
    let start =
        l.sim.with_model(|m| m.now) - chrono::Duration::minutes(2) - chrono::Duration::seconds(5);
    let (mean, n) = store
        .load_history(start + chrono::Duration::weeks(1), 60, 1)
        .unwrap();
    assert!(n == 1, "{n}");
    let mean = mean.unwrap();
    assert!(
        (mean - truth).abs() / truth < 0.05,
        "recorded {mean} vs simulated {truth}"
    );
}

#[test]
fn plan_chart_is_an_svg_with_a_bar_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("plan.svg");
    let (ok, _, err) = ems_plan(&[
        "sites/demo.yaml",
        "--start",
        "2026-06-21T00:00:00Z",
        "--horizon",
        "24",
        "--chart",
        &chart.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // A background plus one battery bar per 15-min step; import, export and grid lines.
    assert_eq!(svg.matches("<rect").count(), 1 + 96);
    assert_eq!(svg.matches("<polyline").count(), 3);
    assert!(svg.contains("without batteries"));
}

/// The planner's tariff and the guard loop's time-of-use window read one calendar: for an
/// overnight window on each weekday, every quarter hour of the weeks of both DST changes
/// (Europe/Berlin) gets the cheap price from the planner exactly when the guard loop's
/// charge window is open, and both match the wall-clock rule written out here.
#[test]
fn overnight_windows_agree_between_planner_and_guard_loop_across_dst() {
    use chrono::{Datelike, TimeZone, Timelike, Utc};
    use site_ems::config::{PricePeriod, TouKind, TouPeriod, Weekday};
    const DAYS: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];
    let base = site_ems::config::SiteConfig::load(std::path::Path::new("sites/demo.yaml")).unwrap();
    let tz: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    let weeks = [
        Utc.with_ymd_and_hms(2026, 3, 25, 12, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2026, 10, 21, 12, 0, 0).unwrap(),
    ];
    for (d, day) in DAYS.iter().enumerate() {
        let mut c = base.clone();
        c.site.timezone = chrono_tz::Europe::Berlin.into();
        let mut p = c.planner.clone().unwrap();
        p.horizon_h = 168.0;
        let tariff = p
            .import_price
            .tou
            .as_mut()
            .expect("demo prices are time-of-use");
        tariff.default = 0.30;
        tariff.periods = vec![PricePeriod {
            days: vec![*day],
            start: "22:00".parse().unwrap(),
            end: "06:00".parse().unwrap(),
            price: 0.05,
        }];
        c.working_mode.mode = WorkingMode::TimeOfUse;
        c.working_mode.periods = vec![TouPeriod {
            kind: TouKind::Charge,
            days: vec![*day],
            start: "22:00".parse().unwrap(),
            end: "06:00".parse().unwrap(),
            power_w: None,
        }];
        let mode = site_ems::control::params::mode_params(&c.working_mode, tz);
        for start in weeks {
            let i = site_ems::planner::inputs::from_config(
                &c,
                &p,
                start,
                &[50.0; 10],
                &Default::default(),
                None,
            )
            .unwrap();
            assert_eq!(i.steps(), 672);
            for (k, price) in i.import_price.iter().enumerate() {
                let t = i.start + chrono::Duration::minutes(15 * k as i64);
                let local = t.with_timezone(&tz);
                let wd = local.weekday().num_days_from_monday() as usize;
                let expected =
                    (wd == d && local.hour() >= 22) || (wd == (d + 1) % 7 && local.hour() < 6);
                let guard = site_ems::control::mode::active_window(&mode, t).is_some();
                assert_eq!(guard, expected, "guard loop, window on {day:?}, at {local}");
                assert_eq!(
                    *price == 0.05,
                    expected,
                    "planner, window on {day:?}, at {local}"
                );
            }
        }
    }
}

/// A week under clouds, simulated by the site model and stored minute by minute: the plan's
/// PV forecast for the next day drops from the clear sky towards what the site measured.
#[test]
fn a_cloudy_week_lowers_the_pv_forecast_towards_what_was_measured() {
    use chrono::TimeZone;
    use site_ems::sim::physics::SiteModel;
    use site_ems::store::{Sample, Store};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.sqlite");
    let mut c =
        site_ems::config::SiteConfig::load(std::path::Path::new("sites/demo.yaml")).unwrap();
    c.simulation.cloudiness = 0.9;
    c.simulation.start = Some("2026-06-14T00:00".into());
    let mut site = SiteModel::new(&c);
    let store = Store::open(&path).unwrap();
    let mut measured_kwh = 0.0;
    for _ in 0..7 * 24 * 60 {
        site.step(60.0);
        let pv_w: f64 = site.inverters.iter().map(|i| i.pv_w).sum();
        measured_kwh += pv_w / 60.0 / 1000.0;
        store
            .insert(Sample {
                minute: site.now,
                load_w: 30_000.0,
                pv_w,
                grid_w: 0.0,
            })
            .unwrap();
    }
    let measured_per_day = measured_kwh / 7.0;
    let start = chrono::Utc.with_ymd_and_hms(2026, 6, 20, 23, 0, 0).unwrap();
    let forecast_kwh = |store: Option<&Store>| {
        let p = c.planner.clone().unwrap();
        let i = site_ems::planner::inputs::from_config(
            &c,
            &p,
            start,
            &[50.0; 10],
            &Default::default(),
            store,
        )
        .unwrap();
        let kwh = i.pv_w.iter().sum::<f64>() * i.step_s / 3600.0 / 1000.0;
        (kwh, i.sources.pv)
    };
    let (clear, _) = forecast_kwh(None);
    let (learnt, source) = forecast_kwh(Some(&store));
    println!(
        "measured {measured_per_day:.0} kWh/day over the cloudy week; forecast clear sky {clear:.0} kWh, learnt {learnt:.0} kWh ({source})"
    );
    assert!(measured_per_day < 0.8 * clear, "the week was cloudy");
    assert!(learnt < clear, "the correction lowers the forecast");
    assert!(
        (learnt - measured_per_day).abs() < 0.5 * (clear - measured_per_day).abs(),
        "and brings it most of the way to what was measured"
    );
    assert!(source.contains("learnt over 14 days"), "{source}");
}
