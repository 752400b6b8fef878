//! Fleet benchmark: N complete sites in one process (the simulated single-phase home, its
//! guard loop, DR book and MQTT connection each), one real mosquitto started here, and one
//! group event (`export_limit_w: 0`) published once. Prints how long until every site's
//! guard loop enforced it and every ack reached the aggregator (p50, p99, max), memory per
//! site, and the CPU the sites and the broker used; writes `target/bench/fleet.json` (or
//! `BENCH_OUT`). `FLEET_SITES` sets N (default 1000).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn main() {
    let n: usize = std::env::var("FLEET_SITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000\n"),
    )
    .expect("mosquitto.conf");
    let mut broker = match Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("fleet bench skipped: mosquitto not found ({e}); apt-get install mosquitto");
            return;
        }
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let figures = runtime.block_on(site_ems::sim::fleet::measure(n, port, Some(broker.id())));
    let _ = broker.kill();
    let _ = broker.wait();
    let f = match figures {
        Ok(f) => f,
        Err(e) => {
            eprintln!("the fleet did not start: {e}");
            std::process::exit(1);
        }
    };
    let ms = |(p50, p99, max): (f64, f64, f64)| {
        format!("p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms")
    };
    println!("fleet: {} sites started in {:.1} s", f.sites, f.start_s);
    println!(
        "  group event -> guard loop enforces: {} ({} never)",
        ms(f.bind_ms),
        f.bind_missing
    );
    println!(
        "  group event -> ack at the aggregator: {} ({} never)",
        ms(f.ack_ms),
        f.ack_missing
    );
    if let Some(b) = f.rss_per_site_bytes {
        println!("  memory per site: {:.2} MB", b / 1e6);
    }
    println!(
        "  CPU while running: sites {} cores, broker {} cores",
        f.harness_cores.map_or("-".into(), |c| format!("{c:.2}")),
        f.broker_cores.map_or("-".into(), |c| format!("{c:.2}"))
    );
    let out = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench/fleet.json"));
    let _ = std::fs::create_dir_all(out.parent().unwrap_or(std::path::Path::new(".")));
    match std::fs::write(&out, serde_json::to_string_pretty(&f).unwrap_or_default()) {
        Ok(()) => println!("wrote {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
}
