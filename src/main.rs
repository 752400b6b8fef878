//! `ems`: check a site file, run the EMS (against real devices or a simulated site), or
//! serve a simulated site for other tools.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use site_ems::clock::{Clock, SystemClock};
use site_ems::config::SiteConfig;
#[cfg(feature = "sim")]
use site_ems::sim;

#[derive(Parser)]
#[command(
    name = "ems",
    version,
    about = "Site energy manager for SAJ inverter fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate site files; every problem is reported as file:line:col with a fix.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run the EMS for a site.
    Run {
        file: PathBuf,
        /// Start a simulated site in-process on loopback and run against it.
        #[arg(long)]
        simulate: bool,
        /// API listen address, overriding the site file's `api.listen` (port 0: any free port).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Plan battery charge and discharge against the site's tariff and forecasts.
    Plan {
        file: PathBuf,
        /// Import prices as CSV (`start,price` with a header row), instead of the site file's.
        #[arg(long)]
        prices: Option<String>,
        /// Export prices as CSV.
        #[arg(long)]
        export_prices: Option<String>,
        /// PV forecast as CSV (`start,watts`).
        #[arg(long)]
        pv: Option<String>,
        /// Load forecast as CSV (`start,watts`).
        #[arg(long)]
        load: Option<String>,
        /// Plan start, RFC 3339 (default: now).
        #[arg(long)]
        start: Option<String>,
        /// Hours ahead (default: the site file's `planner.horizon_h`).
        #[arg(long)]
        horizon: Option<f64>,
        /// State of charge to start from, % (default: `simulation.initial_soc_pct`).
        #[arg(long)]
        soc: Option<f64>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Also draw the plan (prices, battery and grid power) as an SVG file.
        #[arg(long)]
        chart: Option<PathBuf>,
    },
    /// Print a systemd unit that runs the EMS for a site, restarts it whenever it exits and
    /// when its guard loop stops notifying the watchdog.
    SystemdUnit { file: PathBuf },
    /// Check the wiring with the installer's consent: nudge each unit's battery to charge a
    /// little more and read each meter phase's CT direction, each single-phase unit's phase,
    /// each three-phase unit's balance and the PV meter's direction. Exit 0 when all pass.
    Commission {
        file: PathBuf,
        /// Start a simulated site in-process on loopback and check it.
        #[arg(long)]
        simulate: bool,
        /// Print `{checks: [{name, device, result, detail, fix}]}`.
        #[arg(long)]
        json: bool,
    },
    /// Summarise the site's export excursions from its store: count, longest, worst, time
    /// over the limit, fail-safe events, and those of `control.excursion_allowed_s` or longer.
    Report {
        file: PathBuf,
        /// From this time, RFC 3339 (default: the first excursion kept).
        #[arg(long)]
        from: Option<String>,
        /// Up to this time, RFC 3339 (default: now).
        #[arg(long)]
        to: Option<String>,
        /// Print the summary and every excursion as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve a site's devices as simulated Modbus TCP slaves on loopback.
    Simulate {
        file: PathBuf,
        /// Serve device k (meters, then inverters, in file order) on port BASE+k.
        #[arg(long)]
        port_base: Option<u16>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Check { files } = &cli.command {
        return check(files);
    }
    if let Command::SystemdUnit { file } = &cli.command {
        return systemd_unit(file);
    }
    if let Command::Report {
        file,
        from,
        to,
        json,
    } = &cli.command
    {
        return match report(file, from.as_deref(), to.as_deref(), *json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ems: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Plan { .. } = &cli.command {
        return match plan(cli.command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ems: {e}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ems: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                file,
                simulate,
                listen,
            } => run(&file, simulate, listen).await,
            Command::Simulate { file, port_base } => simulate(&file, port_base).await,
            Command::Commission {
                file,
                simulate,
                json,
            } => commission(&file, simulate, json).await,
            Command::Check { .. }
            | Command::Plan { .. }
            | Command::SystemdUnit { .. }
            | Command::Report { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ems: {e}");
            ExitCode::FAILURE
        }
    }
}

fn systemd_unit(file: &Path) -> ExitCode {
    let config = match load_site(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ems: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The unit names both by absolute path: systemd runs it from `/`.
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/local/bin/ems"));
    print!(
        "{}",
        site_ems::runtime::supervision::unit_file(&absolute(&exe), &absolute(file), &config)
    );
    ExitCode::SUCCESS
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        match SiteConfig::load_with_warnings(file) {
            Ok((c, warnings)) => {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: ok ({} inverters, {} meters, export limit {})",
                    file.display(),
                    c.inverters.len(),
                    c.meters.len(),
                    c.export_limit.mode().as_str()
                )
            }
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn load_site(file: &Path) -> Result<SiteConfig, String> {
    SiteConfig::load(file).map_err(|e| format!("invalid site file\n{e}"))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(file: &Path, simulate: bool, listen: Option<String>) -> Result<(), String> {
    let config = load_site(file)?;
    let listen = listen.unwrap_or_else(|| config.api.listen.clone());
    let (config, clock, _sim) = if simulate {
        simulated(&config).await?
    } else {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        (config, clock, None)
    };
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Scripts and tests read this line to find the API when port 0 was asked for.
    println!("ems: api listening on http://{addr}");
    tracing::info!(
        "site {} running: {} inverters, {} meters, cycle {} ms",
        config.site.name,
        config.inverters.len(),
        config.meters.len(),
        config.control.cycle_ms
    );
    site_ems::runtime::serve(config, listener, clock, shutdown_signal())
        .await
        .map_err(|e| format!("api server failed: {e}"))
}

/// A simulated site for `config`: the site file pointing at it, its clock, and the site
/// (kept alive while the EMS runs).
#[cfg(feature = "sim")]
async fn simulated(
    config: &SiteConfig,
) -> Result<(SiteConfig, Arc<dyn Clock>, Option<sim::Launched>), String> {
    let launched = sim::launch(config, None)
        .await
        .map_err(|e| format!("cannot start the simulated site: {e}"))?;
    for (id, unit, addr) in launched.sim.device_units() {
        tracing::info!("simulated {id} (unit {unit}) at {addr}");
    }
    for (link, path) in &launched.buses {
        tracing::info!("simulated RS485 link {link} on {}", path.display());
    }
    Ok((
        launched.config.clone(),
        launched.sim.clock(),
        Some(launched),
    ))
}

#[cfg(not(feature = "sim"))]
async fn simulated(
    _config: &SiteConfig,
) -> Result<(SiteConfig, Arc<dyn Clock>, Option<()>), String> {
    Err(WITHOUT_SIM.to_string())
}

#[cfg(not(feature = "sim"))]
const WITHOUT_SIM: &str = "this ems was built without the simulator (Cargo feature `sim`)";

#[cfg(not(feature = "sim"))]
async fn simulate(_file: &Path, _port_base: Option<u16>) -> Result<(), String> {
    Err(WITHOUT_SIM.to_string())
}

#[cfg(feature = "sim")]
async fn simulate(file: &Path, port_base: Option<u16>) -> Result<(), String> {
    let config = load_site(file)?;
    let launched = sim::launch(&config, port_base)
        .await
        .map_err(|e| format!("cannot start the simulated site: {e}"))?;
    for (link, path) in &launched.buses {
        let l = launched.config.link(link);
        let units: Vec<String> = config
            .meters
            .iter()
            .filter(|m| &m.link == link)
            .map(|m| format!("{} (unit {})", m.id, m.unit_id))
            .chain(
                config
                    .inverters
                    .iter()
                    .filter(|i| &i.link == link)
                    .map(|i| format!("{} (unit {})", i.id, i.unit_id)),
            )
            .collect();
        println!(
            "simulated bus {link}: modbus rtu {} {} baud: {}",
            path.display(),
            l.map_or(9600, |l| l.baud_rate()),
            units.join(", ")
        );
    }
    let on_bus: Vec<&str> = config
        .meters
        .iter()
        .map(|m| (&m.id, &m.link))
        .chain(config.inverters.iter().map(|i| (&i.id, &i.link)))
        .filter(|(_, link)| launched.buses.iter().any(|(b, _)| b == *link))
        .map(|(id, _)| id.as_str())
        .collect();
    for (id, unit, addr) in launched.sim.device_units() {
        if !on_bus.contains(&id.as_str()) {
            println!("simulated {id}: modbus tcp {addr} unit {unit}");
        }
    }
    shutdown_signal().await;
    Ok(())
}

fn plan(command: Command) -> Result<(), String> {
    let Command::Plan {
        file,
        prices,
        export_prices,
        pv,
        load,
        start,
        horizon,
        soc,
        json,
        chart,
    } = command
    else {
        return Ok(());
    };
    let config = load_site(&file)?;
    let planner = config
        .planner
        .as_ref()
        .ok_or("the site file has no `planner:` section (tariff and forecasts)")?;
    let start = match start {
        Some(s) => chrono::DateTime::parse_from_rfc3339(&s)
            .map_err(|e| format!("--start `{s}` is not RFC 3339: {e}"))?
            .with_timezone(&chrono::Utc),
        None => chrono::Utc::now(),
    };
    let soc = soc.unwrap_or(config.simulation.initial_soc_pct);
    if !(0.0..=100.0).contains(&soc) {
        return Err(format!("--soc {soc} is outside 0–100"));
    }
    // A weather forecast, when the site file names one: fetched once, now.
    let weather = match &planner.pv_forecast.weather {
        Some(w) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            let fetched = runtime.block_on(site_ems::planner::weather::fetch(&w.url));
            Some(fetched.map(|body| (body, chrono::Utc::now())))
        }
        None => None,
    };
    let overrides = site_ems::planner::inputs::Overrides {
        import_csv: prices,
        export_csv: export_prices,
        pv_csv: pv,
        load_csv: load,
        horizon_h: horizon,
        weather,
    };
    let store = match &config.store {
        Some(s) => Some(
            site_ems::store::Store::open(Path::new(&s.path))
                .map_err(|e| format!("cannot open the store {}: {e}", s.path))?,
        ),
        None => None,
    };
    let inputs = site_ems::planner::inputs::from_config(
        &config,
        planner,
        start,
        &vec![soc; config.inverters.len()],
        &overrides,
        store.as_ref(),
    )?;
    let plan = site_ems::planner::solve(&inputs).map_err(|e| e.to_string())?;
    if let Some(path) = chart {
        let svg = site_ems::planner::chart::svg(&plan, &format!("site {}", config.site.name));
        std::fs::write(&path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let tz: chrono_tz::Tz = config.site.timezone.tz();
    println!(
        "{:<16} {:>7} {:>7} {:>9} {:>9} {:>9} {:>10} {:>6}",
        "start", "import", "export", "pv_w", "load_w", "grid_w", "battery_w", "soc_%"
    );
    let capacity: f64 = config
        .inverters
        .iter()
        .map(|i| i.battery().capacity_wh)
        .sum();
    for s in &plan.steps {
        let local = chrono::DateTime::parse_from_rfc3339(&s.start)
            .map(|t| t.with_timezone(&tz).format("%a %d %H:%M").to_string())
            .unwrap_or_else(|_| s.start.clone());
        let battery: f64 = s.batteries.iter().map(|b| b.power_w).sum();
        let soc: f64 = s
            .batteries
            .iter()
            .zip(&config.inverters)
            .map(|(b, i)| b.soc_pct * i.battery().capacity_wh)
            .sum::<f64>()
            / capacity.max(1.0);
        println!(
            "{local:<16} {:>7.3} {:>7.3} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>6.1}",
            s.import_price, s.export_price, s.pv_w, s.load_w, s.grid_w, battery, soc
        );
    }
    println!();
    println!(
        "cost {:.2}, without batteries {:.2}, saving {:.2}; solved in {:.1} ms",
        plan.cost,
        plan.baseline_cost,
        plan.baseline_cost - plan.cost,
        plan.solve_ms
    );
    println!(
        "import prices: {}; export prices: {}; PV: {}; load: {}",
        plan.sources.import_price, plan.sources.export_price, plan.sources.pv, plan.sources.load
    );
    for v in &plan.violations {
        println!("SOC bound not kept: {v}");
    }
    Ok(())
}

/// `ems report`: the compliance summary of the excursions kept in the site's store.
fn report(file: &Path, from: Option<&str>, to: Option<&str>, json: bool) -> Result<(), String> {
    use chrono::{DateTime, Utc};
    let config = load_site(file)?;
    let store = config.store.as_ref().ok_or_else(|| {
        format!(
            "{} has no `store:`: excursions are kept only in a store",
            file.display()
        )
    })?;
    let time = |v: Option<&str>, absent: DateTime<Utc>| -> Result<DateTime<Utc>, String> {
        v.map_or(Ok(absent), |s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| format!("`{s}` is not an RFC 3339 time such as 2026-06-21T00:00:00Z"))
        })
    };
    let (from, to) = (time(from, DateTime::<Utc>::MIN_UTC)?, time(to, Utc::now())?);
    let list = site_ems::store::Store::open(Path::new(&store.path))
        .and_then(|s| s.excursions(from, to))
        .map_err(|e| format!("cannot read the store {}: {e}", store.path))?;
    let summary = site_ems::compliance::summarize(&list, config.control.excursion_allowed_s);
    if json {
        let doc = serde_json::json!({ "summary": summary, "excursions": list });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    print!(
        "{}",
        site_ems::compliance::report_text(&config.site.name, &summary, &list)
    );
    Ok(())
}

/// Why `ems commission` ends with status 1 when a check does not pass.
const NOT_ALL_PASS: &str = "not every check passed";

/// `ems commission`: run the EMS until it reads the site, run the wiring check, hand control
/// back, and print the findings.
async fn commission(file: &Path, simulate: bool, json: bool) -> Result<(), String> {
    let config = load_site(file)?;
    let (config, clock, _sim) = if simulate {
        simulated(&config).await?
    } else {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        (config, clock, None)
    };
    let period = std::time::Duration::from_millis(config.control.cycle_ms);
    let (mut ems, _api) = site_ems::runtime::Ems::new(config.clone(), clock);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Read every device a few times first.
    for _ in 0..5 {
        tick.tick().await;
        ems.cycle().await;
    }
    eprintln!(
        "ems: wiring check: nudging each unit's battery to charge a little more, one at a time"
    );
    ems.request_commissioning();
    // Each unit takes a few seconds; a site that never finishes is given up on.
    let give_up = tokio::time::Instant::now()
        + std::time::Duration::from_secs(60 + 30 * config.inverters.len() as u64);
    let state = loop {
        tick.tick().await;
        ems.cycle().await;
        let s = ems.commissioning();
        if !s.running && (s.report.is_some() || s.refused.is_some()) {
            break s;
        }
        if tokio::time::Instant::now() > give_up {
            break s;
        }
    };
    ems.stop().await;
    let Some(report) = state.report else {
        return Err(format!(
            "wiring check {}",
            state
                .refused
                .as_deref()
                .map_or("did not finish".to_string(), |w| format!("refused: {w}"))
        ));
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        for c in &report.checks {
            let result = match c.result {
                site_ems::commissioning::Outcome::Pass => "pass",
                site_ems::commissioning::Outcome::Fail => "FAIL",
                site_ems::commissioning::Outcome::Skipped => "skipped",
            };
            println!("{result:<8} {:<19} {:<12} {}", c.name, c.device, c.detail);
            if let Some(fix) = &c.fix {
                println!("{:<8} fix: {fix}", "");
            }
        }
    }
    if report.all_pass() {
        Ok(())
    } else {
        Err(NOT_ALL_PASS.to_string())
    }
}
