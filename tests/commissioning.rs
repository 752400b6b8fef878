//! The wiring check on the simulator: a correctly wired site passes; a reversed CT on one
//! phase of the grid meter, a single-phase unit on another phase than the site file says and
//! a reversed PV meter are each found with the right fix; the export stays within its limit
//! throughout, and control is handed back. Closed loop over real Modbus, and the command.

#![cfg(feature = "sim")]

mod common;

use std::process::Command;

use serde_json::Value;
use site_ems::commissioning::{Outcome, Report};
use site_ems::config::SiteConfig;
use site_ems::sim::lockstep::{ClosedLoop, Excursions};

/// A morning with more load than sun: two three-phase hybrids, two single-phase ones, a
/// grid meter and a PV meter on an AC-coupled solar inverter; `faults` as YAML list items.
fn site(faults: &str) -> String {
    let unit = |id: &str, phase: &str, rated: u32| {
        format!(
            "  - {{ id: {id}, model: saj-h2, rated_power_w: {rated}, {phase}, link: {id}, unit_id: 1,\n      battery: {{ capacity_wh: 10000, max_charge_w: {rated}, max_discharge_w: {rated} }} }}\n"
        )
    };
    format!(
        r#"site: {{ name: wiring, timezone: Europe/London }}
grid: {{ phases: 3 }}
export_limit: {{ mode: total_power, limit_w: 0 }}
control: {{ cycle_ms: 500, stale_after_s: 3 }}
links:
  - {{ name: gw, type: tcp, host: 127.0.0.1 }}
  - {{ name: t1, type: tcp, host: 127.0.0.1 }}
  - {{ name: t2, type: tcp, host: 127.0.0.1 }}
  - {{ name: s1, type: tcp, host: 127.0.0.1 }}
  - {{ name: s2, type: tcp, host: 127.0.0.1 }}
meters:
  - {{ id: grid, role: grid, model: dtsu666, link: gw, unit_id: 1 }}
  - {{ id: pv, role: pv, model: dtsu666, link: gw, unit_id: 2 }}
inverters:
{}{}{}{}simulation:
  start: 2026-06-21T09:00
  base_load_w: 24000
  peak_load_w: 26000
  load_noise_pct: 0
  pv_peak_ratio: 0.3
  ac_pv_peak_w: 6000
  initial_soc_pct: 50
  wiring_faults: [{faults}]
"#,
        unit("t1", "phases: 3", 10000),
        unit("t2", "phases: 3", 10000),
        unit("s1", "phase: L1", 5000),
        unit("s2", "phase: L3", 5000),
    )
}

/// Run the check in lock-step; its report and the export excursions seen meanwhile.
async fn check(faults: &str) -> (Report, Excursions) {
    let c = SiteConfig::from_str("wiring.yaml", &site(faults)).unwrap();
    let mut l = ClosedLoop::start(c).await.unwrap();
    l.run(10.0, |_, _| {}).await;
    assert!(l.ems.request_commissioning());
    let mut exc = Excursions::default();
    let mut t = 0.0;
    while t < 300.0 {
        l.tick().await;
        t += 0.1;
        exc.observe(t, l.export_w(), 0.0);
        let s = l.ems.commissioning();
        if !s.running && s.report.is_some() {
            break;
        }
    }
    exc.finish(t);
    let state = l.ems.commissioning();
    assert!(state.refused.is_none(), "{:?}", state.refused);
    // Control is handed back: the working mode again, not the check's targets.
    l.run(3.0, |_, _| {}).await;
    let status = serde_json::to_value(&*l.ems.status().unwrap()).unwrap();
    assert_eq!(status["control"]["active_mode"], "self_consumption");
    (state.report.expect("a report"), exc)
}

fn find<'a>(r: &'a Report, name: &str, device: &str) -> &'a site_ems::commissioning::CheckResult {
    r.checks
        .iter()
        .find(|c| c.name == name && c.device == device)
        .unwrap_or_else(|| panic!("{name} {device} in {r:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correctly_wired_site_passes_without_exporting() {
    let (report, exc) = check("").await;
    for c in &report.checks {
        println!("{:?} {} {}: {}", c.result, c.name, c.device, c.detail);
    }
    assert!(report.all_pass(), "{report:#?}");
    assert_eq!(
        report.checks.len(),
        3 + 4 + 1,
        "three CTs, four units, the PV meter"
    );
    assert!(
        exc.done.is_empty(),
        "export during the check: {:?}",
        exc.done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_wiring_fault_is_found_with_its_fix() {
    let (report, exc) = check(
        "{ meter: grid, phase: L2, fault: ct_reversed }, { inverter: s1, fault: wrong_phase, actual_phase: L2 }, { meter: pv, fault: reversed }",
    )
    .await;
    for c in &report.checks {
        println!(
            "{:?} {} {}: {} | {:?}",
            c.result, c.name, c.device, c.detail, c.fix
        );
    }
    let ct = find(&report, "ct_direction", "grid:L2");
    assert_eq!(ct.result, Outcome::Fail);
    assert!(ct
        .fix
        .as_deref()
        .unwrap()
        .contains("L2 current transformer"));
    for ok in ["grid:L1", "grid:L3"] {
        assert_eq!(
            find(&report, "ct_direction", ok).result,
            Outcome::Pass,
            "{ok}"
        );
    }
    let phase = find(&report, "unit_phase", "s1");
    assert_eq!(phase.result, Outcome::Fail);
    assert!(phase.fix.as_deref().unwrap().contains("phase: L2"));
    assert_eq!(find(&report, "unit_phase", "s2").result, Outcome::Pass);
    let pv = find(&report, "pv_meter_direction", "pv");
    assert_eq!(pv.result, Outcome::Fail);
    assert!(pv.fix.as_deref().unwrap().contains("invert: true"));
    assert!(
        exc.done.is_empty(),
        "export during the check: {:?}",
        exc.done
    );
}

#[test]
fn the_command_prints_json_and_exits_1_on_a_fault() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wiring.yaml");
    std::fs::write(&path, site("{ meter: pv, fault: reversed }")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ems"))
        .args(["commission", path.to_str().unwrap(), "--simulate", "--json"])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(1), "a fault: status 1");
    let checks = doc["checks"].as_array().unwrap();
    for c in checks {
        for key in ["name", "device", "result", "detail", "fix"] {
            assert!(c.get(key).is_some(), "{key} in {c}");
        }
    }
    assert!(checks
        .iter()
        .any(|c| c["name"] == "pv_meter_direction" && c["result"] == "fail"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_is_refused_while_fail_safe_is_in_force() {
    let c = SiteConfig::from_str("wiring.yaml", &site("")).unwrap();
    let mut l = ClosedLoop::start(c).await.unwrap();
    l.run(5.0, |_, _| {}).await;
    // The grid meter goes silent: fail-safe after `fail_safe_after_s`.
    assert!(l.sim.stop_device("grid"));
    l.run(5.0, |_, _| {}).await;
    assert!(l.ems.request_commissioning());
    l.run(2.0, |_, _| {}).await;
    let s = l.ems.commissioning();
    assert!(!s.running && s.report.is_none(), "{s:?}");
    assert!(
        s.refused.as_deref().unwrap_or("").contains("fail-safe"),
        "{s:?}"
    );
}
