//! Sending setpoints to SAJ inverters: the driver encodes and clamps, this sends — only what
//! changed, in a safe order — and gives the unit back its own settings on shutdown.

use std::collections::HashMap;
use std::sync::Arc;

use crate::drivers::saj::{self, Command};
use crate::io::link::{Link, LinkError};

pub struct Actuator {
    device: Arc<str>,
    unit: u8,
    rated_w: f64,
    link: Link,
    /// What the unit holds, as far as we know; cleared when unsure.
    written: HashMap<u16, u16>,
    /// The unit's own values of the registers we take over, read before the first write.
    original: Option<Vec<(u16, u16)>>,
}

impl Actuator {
    pub fn new(device: Arc<str>, unit: u8, rated_w: f64, link: Link) -> Actuator {
        Actuator {
            device,
            unit,
            rated_w,
            link,
            written: HashMap::new(),
            original: None,
        }
    }

    /// Forget what the unit holds: everything is sent again next time (after a failed
    /// write, or when the unit reports a mode we did not set).
    pub fn invalidate(&mut self) {
        self.written.clear();
    }

    pub fn controls(&self) -> bool {
        self.original.is_some()
    }

    /// Send `cmd`. Returns how many registers were written.
    pub async fn apply(&mut self, cmd: &Command) -> Result<usize, LinkError> {
        if self.original.is_none() {
            let words = self
                .link
                .read(&self.device, self.unit, saj::CONTROL_BLOCK)
                .await?;
            let at = |addr: u16| {
                words
                    .get((addr - saj::CONTROL_BLOCK.start) as usize)
                    .copied()
            };
            self.original = Some(
                saj::CONTROLLED
                    .iter()
                    .filter_map(|&a| at(a).map(|v| (a, v)))
                    .collect(),
            );
        }
        let mut writes = saj::encode_command(self.rated_w, cmd);
        // A lower cap goes out first, a higher one last: the unit is never briefly allowed
        // more than either the old or the new setpoint.
        let cap_at = writes
            .iter()
            .position(|(a, _)| *a == saj::reg::ANTI_REFLUX_POWER);
        if let Some(i) = cap_at {
            let (addr, value) = writes[i];
            if self.written.get(&addr).is_some_and(|&old| value < old) {
                let cap = writes.remove(i);
                writes.insert(0, cap);
            }
        }
        let mut sent = 0;
        for (addr, value) in writes {
            if self.written.get(&addr) == Some(&value) {
                continue;
            }
            if let Err(e) = self.link.write(&self.device, self.unit, addr, value).await {
                self.invalidate();
                return Err(e);
            }
            self.written.insert(addr, value);
            sent += 1;
        }
        Ok(sent)
    }

    /// Give the unit back the settings it had before we took over.
    pub async fn restore(&mut self) -> Result<(), LinkError> {
        let Some(original) = self.original.take() else {
            return Ok(());
        };
        // Cap and magnitudes first, the mode last, so the unit returns to its own mode with
        // its own limits already in place.
        let mut order = original.clone();
        order.sort_by_key(|(a, _)| (*a == saj::reg::APP_MODE) as u8);
        for (addr, value) in order {
            let value =
                saj::setting(addr).map_or(value, |s| saj::clamp_setting(s, f64::from(value)));
            self.link
                .write(&self.device, self.unit, addr, value)
                .await?;
        }
        self.written.clear();
        Ok(())
    }
}
