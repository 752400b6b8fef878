//! `ems`: check a site file, run the EMS (against real devices or a simulated site), or
//! serve a simulated site for other tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use site_ems::clock::{Clock, SystemClock};
use site_ems::config::SiteConfig;
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
            Command::Check { .. } => Ok(()),
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

fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        match SiteConfig::load(file) {
            Ok(c) => println!(
                "{}: ok ({} inverters, {} meters, export limit {})",
                file.display(),
                c.inverters.len(),
                c.meters.len(),
                c.export_limit.mode.as_str()
            ),
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

fn load(file: &Path) -> Result<SiteConfig, String> {
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
    let config = load(file)?;
    let listen = listen.unwrap_or_else(|| config.api.listen.clone());
    let (config, clock, _sim): (SiteConfig, Arc<dyn Clock>, Option<sim::Launched>) = if simulate {
        let launched = sim::launch(&config, None)
            .await
            .map_err(|e| format!("cannot start the simulated site: {e}"))?;
        for (id, unit, addr) in launched.sim.device_units() {
            tracing::info!("simulated {id} (unit {unit}) at {addr}");
        }
        for (link, path) in &launched.buses {
            tracing::info!("simulated RS485 link {link} on {}", path.display());
        }
        (
            launched.config.clone(),
            launched.sim.clock(),
            Some(launched),
        )
    } else {
        (config, Arc::new(SystemClock::new()), None)
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
    site_ems::run::serve(config, listener, clock, shutdown_signal())
        .await
        .map_err(|e| format!("api server failed: {e}"))
}

async fn simulate(file: &Path, port_base: Option<u16>) -> Result<(), String> {
    let config = load(file)?;
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
            l.and_then(|l| l.baud).unwrap_or(9600),
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
