//! SunSpec devices checked against the standard, not against ourselves: pysunspec2 (the
//! SunSpec Alliance's client, from PyPI, in a virtualenv the test makes) reads what our
//! simulator serves, our driver reads a slave built from pysunspec2's own model definitions,
//! and our model tables are compared with those definitions. Closed loop on the mixed site:
//! the SunSpec PV units are curtailed through 704 and fall back by themselves when the EMS
//! goes quiet.

#![cfg(feature = "sim")]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use site_ems::config::{
    BatteryConfig, InverterConfig, InverterModel, LinkConfig, LinkKind, MeterConfig, MeterModel,
    MeterRole, SiteConfig,
};
use site_ems::drivers::saj;
use site_ems::drivers::sunspec::models;
use site_ems::io::actuation::{Setpoint, SunSpecActuator};
use site_ems::io::link::Link;
use site_ems::io::poll::{InverterPoller, MeterPoller};
use site_ems::sim::lockstep::{ClosedLoop, Excursions, TICK_S};

use common::reference::venv_python;

fn pysunspec2() -> PathBuf {
    venv_python("sunspec-venv", "pysunspec2", "sunspec2")
}

/// Run a reference script with pysunspec2's python, `input` on stdin; its JSON answer.
fn reference(script: &str, input: &Value) -> Value {
    common::reference::answer(&pysunspec2(), script, input)
}

/// The mixed example site for closed loops: 1 s cycles, 3 s staleness, no load noise.
fn mixed() -> SiteConfig {
    let mut c = SiteConfig::load(Path::new("sites/sunspec-mixed.yaml")).expect("valid site");
    c.control.stale_after_s = 3.0;
    c.simulation.load_noise_pct = 0.0;
    c
}

/// The SunSpec units' output caps as their simulated controls hold them, W.
fn sunspec_caps(l: &ClosedLoop) -> Vec<(String, f64)> {
    l.sim.with_model(|m| {
        m.inverters
            .iter()
            .filter_map(|i| Some((i.id.clone(), i.sunspec.as_ref()?.cap_w(i.rated_w))))
            .collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mixed_site_holds_0_w_export_through_a_5_kw_load_drop() {
    let mut l = ClosedLoop::start(mixed()).await.unwrap();
    l.run(60.0, |_, _| {}).await;
    println!(
        "settled: export {:.0} W, caps {:?}",
        l.export_w(),
        sunspec_caps(&l)
    );

    let r = l.load_step_response(-5000.0, 0.0, 30.0).await;
    let back = r.back_after_s.expect("export came back under the limit");
    println!("back after {back:.1} s, excursions {:?}", r.excursions.done);
    assert!(back <= 2.0, "export back under the limit after {back:.1} s");
    assert!(
        r.excursions.longest_s() <= 2.0,
        "excursions {:?}",
        r.excursions.done
    );

    // The PV units were curtailed through 704, the hybrids through SAJ's registers.
    for (id, cap) in sunspec_caps(&l) {
        assert!(cap < 7000.0, "{id} curtailed: cap {cap:.0} W");
    }
    let writes = l.sim.writes();
    let ctl704 = l.sim.with_model(|m| {
        let ss = m.inverters[3].sunspec.as_ref().unwrap();
        let at = ss.layout.iter().find(|x| x.id == 704).unwrap();
        at.start..at.start + at.len + 2
    });
    for id in ["pv1", "pv2"] {
        let mine: Vec<_> = writes.iter().filter(|w| w.device == id).collect();
        assert!(!mine.is_empty(), "{id} was written to");
        assert!(
            mine.iter().all(|w| ctl704.contains(&w.addr)),
            "{id}: every write in model 704"
        );
    }
    for id in ["hyb1", "hyb2", "hyb3"] {
        assert!(
            writes
                .iter()
                .any(|w| w.device == id && w.addr == saj::reg::ANTI_REFLUX_POWER),
            "{id}: its own export limit register written"
        );
    }
    l.assert_clean_writes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_ems_leaves_each_sunspec_unit_at_its_safe_limit_within_its_revert_time() {
    let c = mixed();
    let revert_s = site_ems::runtime::devices::sunspec_revert(&c).as_secs_f64();
    let mut l = ClosedLoop::start(c).await.unwrap();
    l.run(60.0, |_, _| {}).await;
    let before = sunspec_caps(&l);
    assert!(
        before.iter().all(|(_, cap)| *cap > 100.0),
        "PV units produce: {before:?}"
    );

    // Killed: no stop path runs, nothing is written again. (The SAJ hybrids keep the caps
    // they were last given: their safety net is their own export limit, see README.)
    let mut reverted_at: Vec<Option<f64>> = vec![None; before.len()];
    let mut after = Excursions::default();
    let mut t = 0.0;
    while t < 120.0 {
        l.sim.advance(TICK_S);
        t += TICK_S;
        for (k, (_, cap)) in sunspec_caps(&l).into_iter().enumerate() {
            // The site's export limit is 0 W: with no load the safe share is nothing.
            if cap <= 1.0 && reverted_at[k].is_none() {
                reverted_at[k] = Some(t);
            }
        }
        if t > revert_s {
            after.observe(t, l.export_w(), 0.0);
        }
    }
    after.finish(t);
    println!(
        "revert {revert_s} s; reverted at {reverted_at:?}; after: {:?}",
        after.done
    );
    for ((id, _), at) in before.iter().zip(&reverted_at) {
        let at = at.unwrap_or_else(|| panic!("{id} never fell back"));
        assert!(
            at <= revert_s + TICK_S,
            "{id} fell back after {at:.1} s, its revert time is {revert_s} s"
        );
    }
    assert!(
        after.done.is_empty(),
        "export above 0 W after the units fell back: {:?}, worst {:.0} W",
        after.done,
        after.worst_w
    );
}

fn models_by_id(read: &Value) -> Vec<(u64, &Value)> {
    read["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m))
        .collect()
}

fn point<'a>(read: &'a Value, model: u64, name: &str) -> &'a Value {
    let m = models_by_id(read)
        .into_iter()
        .find(|(id, _)| *id == model)
        .unwrap_or_else(|| panic!("model {model} in {read}"))
        .1;
    &m["points"][name]
}

fn close(a: &Value, b: f64, tol: f64, what: &str) {
    let a = a
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {a} is not a number"));
    assert!((a - b).abs() <= tol, "{what}: pysunspec2 {a}, status {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysunspec2_reads_every_model_the_simulator_serves_with_the_values_status_shows() {
    let mut c = mixed();
    // One PV unit with a battery, so storage (124) is served too.
    c.inverters[4].battery = Some(BatteryConfig {
        capacity_wh: 10_000.0,
        max_charge_w: 5000.0,
        max_discharge_w: 5000.0,
        charge_efficiency: 0.95,
        discharge_efficiency: 0.95,
        soc_min_pct: 10.0,
        soc_max_pct: 100.0,
    });
    let mut l = ClosedLoop::start(c).await.unwrap();
    l.run(20.0, |_, _| {}).await;
    // The site stands still (paused) while the EMS reads it once more and pysunspec2 reads it.
    l.ems.cycle().await;
    let status = serde_json::to_value(&*l.ems.status().expect("status")).unwrap();
    let read = |id: &str| {
        let addr = l.sim.addr(id).unwrap();
        let unit = if id == "grid" { 240 } else { 1 };
        reference(
            "tests/reference/sunspec_read.py",
            &json!({"host": addr.ip().to_string(), "port": addr.port(), "unit": unit}),
        )
    };
    let expect = [
        ("pv1", vec![1, 103, 120, 121, 123, 704]),
        ("pv2", vec![1, 103, 120, 121, 123, 704, 124]),
        ("grid", vec![1, 203]),
    ];
    for (id, ids) in expect {
        let r = read(id);
        let found: Vec<u64> = models_by_id(&r).iter().map(|(m, _)| *m).collect();
        assert_eq!(found, ids, "{id}: models");
        for (mid, m) in models_by_id(&r) {
            assert_eq!(m["error"], "", "{id} model {mid}: {}", m["error"]);
            for (name, v) in m["points"].as_object().unwrap() {
                assert!(v.get("error").is_none(), "{id} {mid}.{name}: {v}");
            }
        }
        if id == "grid" {
            let g = &status["grid"];
            close(
                point(&r, 203, "W"),
                g["power_w"].as_f64().unwrap(),
                1.0,
                "grid W",
            );
            for (k, name) in ["WphA", "WphB", "WphC"].into_iter().enumerate() {
                let s = g["phases"][k]["power_w"].as_f64().unwrap();
                close(point(&r, 203, name), s, 1.0, name);
            }
            close(
                point(&r, 203, "Hz"),
                g["frequency_hz"].as_f64().unwrap(),
                0.01,
                "Hz",
            );
            continue;
        }
        let s = common::inverter(&status, id);
        close(
            point(&r, 103, "W"),
            s["ac_power_w"].as_f64().unwrap(),
            1.0,
            "W",
        );
        close(
            point(&r, 103, "DCW"),
            s["pv_power_w"].as_f64().unwrap(),
            1.0,
            "DCW",
        );
        close(point(&r, 120, "WRtg"), 8000.0, 0.0, "WRtg");
        assert_eq!(point(&r, 1, "SN"), &s["serial"], "{id}: serial");
        // The limit the EMS wrote, as the standard reads it back.
        assert_eq!(point(&r, 704, "WMaxLimPctEna"), 1, "{id}: limit enabled");
        let cap = s["setpoint"]["output_cap_w"].as_f64().unwrap();
        let pct = point(&r, 704, "WMaxLimPct").as_f64().unwrap();
        assert!(
            pct / 100.0 * 8000.0 <= cap + 1e-6 && pct / 100.0 * 8000.0 > cap - 8.0,
            "{id}: WMaxLimPct {pct} % for a cap of {cap} W"
        );
        close(point(&r, 704, "WMaxLimPctRvrtTms"), 5.0, 0.0, "revert time");
        if id == "pv2" {
            close(
                point(&r, 124, "ChaState"),
                s["soc_pct"].as_f64().unwrap(),
                0.05,
                "SOC",
            );
        }
    }
}

/// A SunSpec slave built by pysunspec2 from the official definitions; killed on drop.
struct Slave {
    child: Child,
    port: u16,
}

impl Slave {
    fn start(spec: &Value) -> Slave {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/sunspec_slave.py");
        let mut child = Command::new(pysunspec2())
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the slave starts");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(spec.to_string().as_bytes()).unwrap();
        drop(stdin);
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("the slave prints its port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("port, not {line:?}"));
        Slave { child, port }
    }

    fn link(&self) -> Link {
        Link::spawn(
            &LinkConfig {
                name: "slave".into(),
                kind: LinkKind::Tcp,
                host: Some("127.0.0.1".into()),
                port: Some(self.port),
                device: None,
                baud: None,
                parity: Default::default(),
                stop_bits: None,
                timeout_ms: Some(2000),
                gap_ms: None,
            },
            None,
        )
    }

    fn read(&self) -> Value {
        reference(
            "tests/reference/sunspec_read.py",
            &json!({"host": "127.0.0.1", "port": self.port, "unit": 1}),
        )
    }
}

impl Drop for Slave {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_driver_reads_and_writes_a_slave_built_from_the_official_definitions() {
    // A three-phase float inverter (113) with 123 only; several points not implemented.
    let slave = Slave::start(&json!({"models": [
        {"id": 1, "values": {"Mn": "Reference", "Md": "Float PV", "SN": "REF-113-01"}},
        {"id": 113, "values": {
            "W": 4321.5, "Hz": 50.01, "PhVphA": 231.5, "PhVphB": 229.0, "PhVphC": 230.25,
            "AphA": 6.25, "AphB": 6.5, "DCW": 4500.0, "St": 4, "Evt1": 0, "Evt2": 0
        }},
        {"id": 120, "values": {"DERTyp": 4, "WRtg_SF": 1, "WRtg": 6000}},
        {"id": 123, "values": {"WMaxLimPct_SF": -2, "WMaxLimPct": 100, "WMaxLim_Ena": 0, "Conn": 1}}
    ]}));
    let cfg = InverterConfig {
        id: "ref".into(),
        model: InverterModel::Sunspec,
        rated_power_w: 6000.0,
        phases: Some(3),
        phase: None,
        link: "slave".into(),
        unit_id: 1,
        battery: None,
        pv_peak_w: None,
    };
    let mut poller = InverterPoller::new(cfg, slave.link(), false);
    poller.poll(Duration::ZERO, Duration::from_secs(1)).await;
    assert!(
        poller.fresh.last_error.is_none(),
        "{:?}",
        poller.fresh.last_error
    );
    let r = poller.reading.clone().expect("a reading");
    assert!((r.ac_power_w - 4321.5).abs() < 1e-3, "W {}", r.ac_power_w);
    assert!((r.frequency_hz - 50.01).abs() < 1e-4);
    assert!((r.pv_power_w - 4500.0).abs() < 1e-3);
    assert!((r.phases[2].voltage_v - 230.25).abs() < 1e-3);
    assert!((r.phases[0].current_a - 6.25).abs() < 1e-4);
    // AphC is not implemented: current from power and voltage, never the sentinel.
    let c = r.phases[2].current_a;
    assert!(
        (c - 4321.5 / 3.0 / 230.25).abs() < 1e-3,
        "AphC from P/V: {c}"
    );
    assert!(!r.has_fault());
    assert_eq!(poller.identity.as_ref().unwrap().serial, "REF-113-01");
    let ss = poller.sunspec().unwrap();
    assert_eq!(ss.wmax_w, 6000.0, "WRtg 600 × 10^1");
    assert_eq!(ss.limit_sf, -2);

    // A 1500 W cap through 123: 25 % of 6000 W, as pysunspec2 reads it back.
    let target = poller.sunspec_target();
    let mut act = SunSpecActuator::new(Arc::from("ref"), 1, slave.link(), Duration::from_secs(5));
    let sp = Setpoint {
        command: saj::Command {
            battery_w: 0.0,
            output_cap_w: 1500.0,
        },
        safe_cap_w: 0.0,
    };
    act.apply(&sp, target.as_ref(), Duration::ZERO, true)
        .await
        .unwrap();
    let back = slave.read();
    assert_eq!(point(&back, 123, "WMaxLimPct"), &json!(25.0));
    assert_eq!(point(&back, 123, "WMaxLim_Ena"), &json!(1));
    assert_eq!(
        point(&back, 123, "WMaxLimPct_RvrtTms"),
        &json!(0),
        "123 holds, no timer"
    );

    // A wye meter (203) with power scaled by 10^-1 and some phases not implemented.
    let meter = Slave::start(&json!({"models": [
        {"id": 1, "values": {"Mn": "Reference", "Md": "Meter", "SN": "REF-203"}},
        {"id": 203, "values": {
            "W_SF": -1, "W": -1234.5, "WphA": -400.1, "WphB": -434.4, "WphC": -400.0,
            "V_SF": -1, "PhV": 230.0, "PhVphA": 230.1, "PhVphB": 229.9, "PhVphC": 230.0,
            "A_SF": -2, "A": 5.37, "AphA": 1.74, "AphB": 1.89, "AphC": 1.74,
            "Hz_SF": -2, "Hz": 49.98, "TotWh_SF": 0, "TotWhImp": 120000, "TotWhExp": 345678
        }}
    ]}));
    let mcfg = MeterConfig {
        id: "m".into(),
        role: MeterRole::Grid,
        model: MeterModel::Sunspec,
        link: "slave".into(),
        unit_id: 1,
        invert: false,
    };
    let mut mp = MeterPoller::new(mcfg, meter.link());
    mp.poll(Duration::ZERO, Duration::from_secs(1)).await;
    assert!(mp.fresh.last_error.is_none(), "{:?}", mp.fresh.last_error);
    let m = mp.reading.clone().unwrap();
    assert!((m.power_w + 1234.5).abs() < 1e-6, "W {}", m.power_w);
    assert!((m.phases[1].power_w + 434.4).abs() < 1e-6);
    assert!(
        (m.phases[1].current_a + 1.89).abs() < 1e-6,
        "signed like power"
    );
    assert!((m.frequency_hz.unwrap() - 49.98).abs() < 1e-6);
    let e = mp.energy.unwrap();
    assert_eq!((e.import_wh, e.export_wh), (120000.0, 345678.0));

    // Points not implemented read as absent: no W at all is no reading, not 0 W.
    let blank = Slave::start(&json!({"models": [
        {"id": 1, "values": {"Mn": "Reference"}},
        {"id": 203, "values": {"V_SF": -1, "PhVphA": 230.0}}
    ]}));
    let mut bp = MeterPoller::new(
        MeterConfig {
            id: "blank".into(),
            role: MeterRole::Grid,
            model: MeterModel::Sunspec,
            link: "slave".into(),
            unit_id: 1,
            invert: false,
        },
        blank.link(),
    );
    bp.poll(Duration::ZERO, Duration::from_secs(1)).await;
    assert!(bp.reading.is_none(), "no power, no reading");
    assert_eq!(bp.fresh.stale_reason(), "decode");
}

#[test]
fn our_model_tables_match_the_official_definitions() {
    let ids: Vec<u16> = models::ALL.iter().map(|m| m.id).collect();
    let official = reference("tests/reference/sunspec_defs.py", &json!({ "ids": ids }));
    for (ours, theirs) in models::ALL
        .iter()
        .zip(official["models"].as_array().unwrap())
    {
        assert_eq!(theirs["id"], ours.id);
        assert_eq!(theirs["name"], ours.name, "model {}", ours.id);
        assert_eq!(theirs["len"], ours.len, "model {}", ours.id);
        let points = theirs["points"].as_array().unwrap();
        assert_eq!(points.len(), ours.points.len(), "model {}", ours.id);
        for (p, q) in ours.points.iter().zip(points) {
            let what = format!("model {} point {}", ours.id, p.name);
            assert_eq!(q[0], p.name, "{what}");
            assert_eq!(q[1], p.offset, "{what}");
            assert_eq!(q[2], p.ty.standard_name(), "{what}");
            assert_eq!(q[3], p.ty.size(), "{what}");
            assert_eq!(q[4], json!(p.sf), "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_der_unit_701_704_802_is_read_and_limited_with_its_reversion_values() {
    // An IEEE 1547-style unit: measurements in 701, controls in 704, a battery in 802.
    let slave = Slave::start(&json!({"models": [
        {"id": 1, "values": {"Mn": "Reference", "Md": "DER", "SN": "REF-701"}},
        {"id": 701, "values": {
            "ACType": 2, "InvSt": 3, "Alrm": 0,
            "W_SF": 1, "W": -2500, "WL1": -830, "WL2": -840, "WL3": -830,
            "V_SF": -1, "VL1": 231.2, "VL2": 230.4, "VL3": 229.9,
            "A_SF": -2, "AL1": -3.59, "AL2": -3.65, "AL3": -3.61,
            "Hz_SF": -3, "Hz": 49.987
        }},
        {"id": 704, "values": {"WMaxLimPct_SF": -1, "WMaxLimPctEna": 0, "WMaxLimPct": 100}},
        {"id": 802, "values": {
            "SoC_SF": -1, "SoC": 64.5, "W_SF": 0, "W": -2600, "V_SF": -1, "V": 402.5,
            "A_SF": -1, "A": -6.5, "LocRemCtl": 0, "Typ": 4, "State": 3
        }}
    ]}));
    let cfg = InverterConfig {
        id: "der".into(),
        model: InverterModel::Sunspec,
        rated_power_w: 5000.0,
        phases: Some(3),
        phase: None,
        link: "slave".into(),
        unit_id: 1,
        battery: Some(BatteryConfig {
            capacity_wh: 10_000.0,
            max_charge_w: 5000.0,
            max_discharge_w: 5000.0,
            charge_efficiency: 0.95,
            discharge_efficiency: 0.95,
            soc_min_pct: 10.0,
            soc_max_pct: 100.0,
        }),
        pv_peak_w: None,
    };
    let mut poller = InverterPoller::new(cfg, slave.link(), false);
    poller.poll(Duration::ZERO, Duration::from_secs(1)).await;
    assert!(
        poller.fresh.last_error.is_none(),
        "{:?}",
        poller.fresh.last_error
    );
    let r = poller.reading.clone().unwrap();
    assert_eq!(r.ac_power_w, -2500.0, "W −250 × 10^1");
    assert_eq!(r.phases[1].power_w, -840.0);
    assert!((r.phases[2].voltage_v - 229.9).abs() < 1e-9);
    assert!((r.phases[0].current_a + 3.59).abs() < 1e-9);
    assert!((r.frequency_hz - 49.987).abs() < 1e-9);
    assert!((r.soc_pct - 64.5).abs() < 1e-9);
    assert_eq!(r.battery_power_w, -2600.0, "802 W, + discharge");
    assert_eq!(
        poller
            .sunspec()
            .unwrap()
            .models
            .as_ref()
            .unwrap()
            .curtail
            .unwrap()
            .model_id(),
        704
    );

    // A 2000 W cap, the safe cap 500 W, a 5 s timer: as the standard reads them back.
    let target = poller.sunspec_target();
    let mut act = SunSpecActuator::new(Arc::from("der"), 1, slave.link(), Duration::from_secs(5));
    let sp = Setpoint {
        command: saj::Command {
            battery_w: 0.0,
            output_cap_w: 2000.0,
        },
        safe_cap_w: 500.0,
    };
    act.apply(&sp, target.as_ref(), Duration::ZERO, true)
        .await
        .unwrap();
    let back = slave.read();
    assert_eq!(point(&back, 704, "WMaxLimPctEna"), &json!(1));
    assert_eq!(point(&back, 704, "WMaxLimPct"), &json!(40.0));
    assert_eq!(point(&back, 704, "WMaxLimPctRvrt"), &json!(10.0));
    assert_eq!(point(&back, 704, "WMaxLimPctEnaRvrt"), &json!(1));
    assert_eq!(point(&back, 704, "WMaxLimPctRvrtTms"), &json!(5));
}
