//! `ems`: check a site file, run the EMS (against real devices or a simulated site), or
//! serve a simulated site for other tools.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use site_ems::config::SiteConfig;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => check(&files),
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
