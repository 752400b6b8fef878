//! RS485: the EMS against the simulator's Modbus RTU slaves over socat pseudo-terminals —
//! six inverters on three pairs and a DTSU666 on its own bus, at real wire speed.

#![cfg(feature = "sim")]

mod common;

use std::time::Duration;

use common::rs485_on_ptys;
use site_ems::drivers::saj::reg;
use site_ems::sim::lockstep::{ClosedLoop, Excursions};
use site_ems::sim::Behaviour;

async fn loop_on_ptys(baud: u32) -> (ClosedLoop, Vec<site_ems::sim::pty::PtyPair>) {
    let (c, rtu, pairs) = rs485_on_ptys(baud);
    let l = ClosedLoop::start_with(c, &rtu)
        .await
        .expect("simulated RTU site");
    (l, pairs)
}

/// Health of every inverter, by id, from the EMS's last status.
async fn health(l: &mut ClosedLoop) -> Vec<(String, String)> {
    let status = l.ems.status().expect("a status");
    status
        .inverters
        .iter()
        .map(|i| (i.id.clone(), i.health.as_str().to_string()))
        .collect()
}

async fn run_cycles(l: &mut ClosedLoop, n: usize) {
    for _ in 0..n * 10 {
        l.tick().await;
    }
}

fn of<'a>(h: &'a [(String, String)], id: &str) -> &'a str {
    &h.iter().find(|(i, _)| i == id).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_inverters_on_three_pairs_and_a_meter_all_healthy() {
    let (mut l, _pairs) = loop_on_ptys(9600).await;
    run_cycles(&mut l, 3).await;
    let h = health(&mut l).await;
    assert_eq!(h.len(), 6);
    assert!(h.iter().all(|(_, s)| s == "ok"), "{h:?}");
    let status = l.ems.status().unwrap();
    assert_eq!(status.grid.health.as_str(), "ok");
    assert!(status
        .grid
        .frequency_hz
        .is_some_and(|f| (49.0..51.0).contains(&f)));
    l.assert_clean_writes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_mode_is_written_once_although_0x4022_is_read_every_few_seconds() {
    // On RS485 the status block (and 0x4022 with it) is read every few seconds, not every
    // cycle: a reading from before the takeover must not count as "not confirmed".
    let (mut l, _pairs) = loop_on_ptys(9600).await;
    run_cycles(&mut l, 20).await;
    let status = l.ems.status().unwrap();
    for inv in &status.inverters {
        assert_eq!(inv.alarm, None, "{}", inv.id);
        let mode_writes = l
            .sim
            .writes()
            .iter()
            .filter(|w| w.device == inv.id && w.addr == reg::APP_MODE)
            .count();
        assert_eq!(
            mode_writes, 1,
            "{}: AppMode written {mode_writes} times",
            inv.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slave_times_out_and_its_pair_partner_stays_healthy() {
    let (mut l, _pairs) = loop_on_ptys(19200).await;
    run_cycles(&mut l, 2).await;
    l.sim.set_behaviour("inv-a2", Behaviour::Silent);
    run_cycles(&mut l, 5).await;
    let h = health(&mut l).await;
    assert_eq!(of(&h, "inv-a2"), "stale");
    for id in ["inv-a1", "inv-b1", "inv-b2", "inv-c1", "inv-c2"] {
        assert_eq!(of(&h, id), "ok", "{id}: {h:?}");
    }
    let status = l.ems.status().unwrap();
    let a2 = status.inverters.iter().find(|i| i.id == "inv-a2").unwrap();
    assert!(
        a2.error
            .as_deref()
            .unwrap_or_default()
            .contains("no answer"),
        "{:?}",
        a2.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exception_and_crc_garbage_mark_only_their_device() {
    let (mut l, _pairs) = loop_on_ptys(19200).await;
    run_cycles(&mut l, 2).await;
    l.sim.set_behaviour("inv-b1", Behaviour::Exception(0x02));
    l.sim.set_behaviour("inv-c2", Behaviour::Garbage);
    run_cycles(&mut l, 6).await;
    let status = l.ems.status().unwrap();
    let err = |id: &str| {
        let i = status.inverters.iter().find(|i| i.id == id).unwrap();
        (i.health.as_str(), i.error.clone().unwrap_or_default())
    };
    assert_eq!(err("inv-b1").0, "stale");
    assert!(
        err("inv-b1").1.contains("exception 0x02"),
        "{:?}",
        err("inv-b1")
    );
    assert_eq!(err("inv-c2").0, "stale");
    for id in ["inv-a1", "inv-a2", "inv-b2", "inv-c1"] {
        assert_eq!(err(id).0, "ok", "{id}: {:?}", err(id));
    }
    // Fixed again: the bus recovers from the garbage.
    l.sim.set_behaviour("inv-b1", Behaviour::Normal);
    l.sim.set_behaviour("inv-c2", Behaviour::Normal);
    run_cycles(&mut l, 12).await;
    let h = health(&mut l).await;
    assert!(h.iter().all(|(_, s)| s == "ok"), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugged_device_does_not_stall_the_other_unit_on_its_bus() {
    let (mut l, _pairs) = loop_on_ptys(9600).await;
    run_cycles(&mut l, 2).await;
    assert!(l.sim.stop_device("inv-c1"));
    // Every cycle the partner on pair C is read fresh; the unplugged one costs at most a
    // timeout, and less once it is backed off.
    for _ in 0..8 {
        run_cycles(&mut l, 1).await;
        let s = l.ems.status().unwrap();
        let c2 = s.inverters.iter().find(|i| i.id == "inv-c2").unwrap();
        assert_eq!(c2.health.as_str(), "ok");
        assert!(
            c2.age_s.unwrap() <= 1.0,
            "inv-c2 read every cycle: age {:?}",
            c2.age_s
        );
    }
    assert_eq!(of(&health(&mut l).await, "inv-c1"), "stale");
    l.sim.restart_device("inv-c1").await.unwrap();
    run_cycles(&mut l, 10).await;
    assert_eq!(of(&health(&mut l).await, "inv-c1"), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_at_9600_baud_load_drop_back_under_limit_within_5_s() {
    let (c, rtu, _pairs) = rs485_on_ptys(9600);
    let sim = site_ems::sim::SimSite::start_with(&c, None, &rtu)
        .await
        .unwrap();
    let (ems, _api) = site_ems::runtime::Ems::new(sim.rewire(&c), sim.clock());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Real time: the EMS's cycle includes the real wire time of every RTU transaction.
    let ems = tokio::spawn(ems.run(async move {
        let _ = stopped.await;
    }));
    let export = || sim.with_model(|m| -m.truth.grid_w.iter().sum::<f64>());
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let started = tokio::time::Instant::now();
    // Settle: control takes the fleet over, export goes to zero.
    loop {
        every.tick().await;
        if started.elapsed() > Duration::from_secs(8) && export() <= 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never settled: export {}",
            export()
        );
    }
    sim.with_model(|m| m.load_step_w = -5000.0);
    let drop_at = tokio::time::Instant::now();
    let mut exc = Excursions::default();
    let mut back_after = None;
    while drop_at.elapsed() < Duration::from_secs(10) {
        every.tick().await;
        let t = drop_at.elapsed().as_secs_f64();
        exc.observe(t, export(), 0.0);
        // Back under the limit: the end of the excursion the drop caused.
        if back_after.is_none() && !exc.done.is_empty() {
            back_after = Some(t);
        }
    }
    exc.finish(drop_at.elapsed().as_secs_f64());
    let _ = stop.send(());
    ems.await.unwrap();
    println!(
        "RTU 9600: back under the limit after {back_after:?} s; excursions {:?}",
        exc.done
    );
    let back = back_after.expect("export came back under the limit");
    assert!(back <= 5.0, "back after {back:.1} s");
    assert!(exc.longest_s() <= 5.0, "{:?}", exc.done);
}

#[test]
fn mbpoll_reads_the_rtu_simulator() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (c, rtu, _pairs) = rs485_on_ptys(9600);
    let _sim = rt
        .block_on(site_ems::sim::SimSite::start_with(&c, None, &rtu))
        .unwrap();
    let bus = c.link("pair-b").unwrap().device.clone().unwrap();
    // Unit 2 on pair B: SOC register 0x406F (×0.01 %), starts at 50 %.
    let out = std::process::Command::new("mbpoll")
        .args([
            "-m", "rtu", "-b", "9600", "-P", "none", "-s", "1", "-d", "8",
        ])
        .args(["-a", "2", "-0", "-1", "-r", "16495", "-c", "1", &bus])
        .output()
        .expect("mbpoll is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mbpoll: {text}");
    let soc: f64 = text
        .lines()
        .find(|l| l.starts_with('['))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {text}"));
    assert!((4900.0..=5100.0).contains(&soc), "{soc}");
}
