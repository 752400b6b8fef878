//! The README's commands, through the real `ems` binary: the demo site comes up under
//! `--simulate`, and a third-party Modbus master (mbpoll) reads `ems simulate`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Kills the child when the test ends, pass or fail.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `ems` with `args` and collect stdout lines until `done` says enough.
fn start(args: &[&str], done: impl Fn(&[String]) -> bool) -> (Running, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ems"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ems starts");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(&lines) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("ems printed {lines:?} and no more"),
        }
    }
    (running, lines)
}

fn get_status(base: &str) -> Option<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let r = reqwest::get(format!("{base}/api/v1/status")).await.ok()?;
        r.json().await.ok()
    })
}

#[test]
fn readme_run_command_brings_up_the_demo_site_within_10_s() {
    let started = Instant::now();
    let (_ems, lines) = start(
        &[
            "run",
            "sites/demo.yaml",
            "--simulate",
            "--listen",
            "127.0.0.1:0",
        ],
        |l| l.iter().any(|l| l.contains("api listening on")),
    );
    let base = lines
        .iter()
        .find_map(|l| l.split("api listening on ").nth(1))
        .unwrap()
        .trim()
        .to_string();

    let healthy = |s: &Value| {
        s["grid"]["health"] == "ok"
            && s["inverters"]
                .as_array()
                .is_some_and(|a| a.len() == 10 && a.iter().all(|i| i["health"] == "ok"))
    };
    let mut first = None;
    while started.elapsed() < Duration::from_secs(10) {
        if let Some(s) = get_status(&base).filter(healthy) {
            first = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = first.expect("10 inverters and the grid meter healthy within 10 s");

    // Plausible values.
    for p in first["grid"]["phases"].as_array().unwrap() {
        let v = p["voltage_v"].as_f64().unwrap();
        assert!((200.0..260.0).contains(&v), "phase voltage {v}");
        assert!(p["power_w"].as_f64().unwrap().abs() < 100_000.0);
    }
    for i in first["inverters"].as_array().unwrap() {
        let soc = i["soc_pct"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&soc));
        assert!(i["ac_power_w"].as_f64().unwrap().abs() <= 10_000.0);
        assert!(i["pv_power_w"].as_f64().unwrap() >= 0.0);
    }

    // Changing values: the site lives.
    let grid_of = |s: &Value| -> Vec<f64> {
        s["grid"]["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["power_w"].as_f64().unwrap())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = get_status(&base).expect("status");
        if now["cycle"].as_u64() > first["cycle"].as_u64() && grid_of(&now) != grid_of(&first) {
            break;
        }
        assert!(Instant::now() < deadline, "status did not change");
    }
}

fn port_of(lines: &[String], id: &str) -> String {
    let line = lines
        .iter()
        .find(|l| l.starts_with(&format!("simulated {id}:")))
        .unwrap_or_else(|| panic!("no line for {id} in {lines:?}"));
    line.split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Run mbpoll once; return the values it printed.
fn mbpoll(port: &str, reference: u16, count: u16, kind: &str) -> Vec<f64> {
    let out = Command::new("mbpoll")
        .args(["-m", "tcp", "-a", "1", "-0", "-1", "-t", kind, "-B"])
        .args([
            "-r",
            &reference.to_string(),
            "-c",
            &count.to_string(),
            "-p",
            port,
            "127.0.0.1",
        ])
        .output()
        .expect("mbpoll is installed (.ci/run installs it: apt-get install mbpoll)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mbpoll failed: {text}");
    text.lines()
        .filter(|l| l.starts_with('['))
        .map(|l| l.split_whitespace().last().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn mbpoll_reads_the_simulator() {
    let (_sim, lines) = start(&["simulate", "sites/demo.yaml"], |l| {
        l.iter().filter(|l| l.starts_with("simulated ")).count() == 11
    });
    // SAJ 0x406F BatEnergyPercent, ×0.01 %: the demo starts at 50 %.
    let inv = port_of(&lines, "inv01");
    let soc = mbpoll(&inv, 0x406F, 1, "4");
    assert!((4900.0..=5100.0).contains(&soc[0]), "SOC register {soc:?}");
    // SAJ 0x4004 MPVMode: 4 = on-grid storage.
    assert_eq!(mbpoll(&inv, 0x4004, 1, "4"), vec![4.0]);
    // DTSU666 0x2006..0x200A phase voltages, float32 ABCD in 0.1 V.
    let grid = port_of(&lines, "grid");
    let volts = mbpoll(&grid, 0x2006, 3, "4:float");
    assert_eq!(volts.len(), 3);
    for v in volts {
        assert!((2200.0..2400.0).contains(&v), "voltage register {v}");
    }
}

#[test]
fn systemd_unit_verifies_and_the_ems_notifies_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();

    // The printed unit is one systemd accepts.
    let out = Command::new(env!("CARGO_BIN_EXE_ems"))
        .args(["systemd-unit", "sites/demo.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let unit = String::from_utf8(out.stdout).unwrap();
    for line in [
        "Type=notify",
        "Restart=always",
        "WatchdogSec=5s",
        "ExecStart=/",
    ] {
        assert!(unit.contains(line), "{line} missing from\n{unit}");
    }
    let path = dir.path().join("site-ems.service");
    std::fs::write(&path, &unit).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Run under a notification socket, as systemd would start it.
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ems"))
        .args([
            "run",
            "sites/demo.yaml",
            "--simulate",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "5000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    let count = |seen: &[String], what: &str| seen.iter().filter(|m| m.contains(what)).count();
    while count(&seen, "WATCHDOG=1") < 3 {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}); got {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("READY=1"),
        "{seen:?}"
    );

    // SIGTERM: the EMS says it is stopping, stops the units safely and exits 0.
    let pid = running.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    loop {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no STOPPING=1 ({e}); got {seen:?}"));
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(m.clone());
        if m.contains("STOPPING=1") {
            break;
        }
    }
    // Wait for the exit on a thread, so the wait has a deadline; `running` keeps a stand-in.
    let mut child = std::mem::replace(&mut running.0, Command::new("true").spawn().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("ems exits within 15 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit {status:?}");
}
