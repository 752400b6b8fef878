//! Supervision by systemd: the EMS says when it is ready, proves each finished guard-loop
//! cycle to the watchdog, and says when it stops. A loop that stalls stops proving it, and
//! systemd restarts the EMS (`Restart=always`, `WatchdogSec` in the unit file
//! `ems systemd-unit` prints); while it is down, the units' own export limits hold the site.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::path::Path;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::config::SiteConfig;

pub struct Supervisor {
    watchdog: Option<Duration>,
}

impl Supervisor {
    /// What the service manager asked for, from the environment it set.
    pub fn from_env() -> Supervisor {
        Supervisor {
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    fn notify(&self, state: NotifyState) {
        if let Err(e) = sd_notify::notify(&[state]) {
            tracing::debug!("systemd notification not sent: {e}");
        }
    }

    pub fn ready(&self) {
        self.notify(NotifyState::Ready);
    }

    /// A guard-loop cycle finished.
    pub fn alive(&self) {
        if self.watchdog.is_some() {
            self.notify(NotifyState::Watchdog);
        }
    }

    pub fn stopping(&self) {
        self.notify(NotifyState::Stopping);
    }
}

/// How long systemd waits for a cycle before it restarts the EMS: five cycles, at least 5 s
/// (a slow read of an unanswering device is not a stall).
pub fn watchdog_s(config: &SiteConfig) -> u64 {
    (config.control.cycle_ms * 5).div_ceil(1000).max(5)
}

/// A systemd unit that runs the EMS for `site` with `exe`, restarts it whenever it exits,
/// and restarts it when its guard loop stops notifying the watchdog.
pub fn unit_file(exe: &Path, site: &Path, config: &SiteConfig) -> String {
    format!(
        "[Unit]
Description=site-ems energy manager for {name}
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exe} run {site}
# A stop hands every unit its safe command first (control.on_stop).
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=always
RestartSec=2
# A guard loop that stalls stops notifying: systemd kills and restarts the EMS.
WatchdogSec={watchdog}s

[Install]
WantedBy=multi-user.target
",
        name = config.site.name,
        exe = exe.display(),
        site = site.display(),
        watchdog = watchdog_s(config),
    )
}
