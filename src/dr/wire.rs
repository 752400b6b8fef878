//! Demand-response requests as aggregators send them, over HTTP and MQTT alike: one typed
//! form, checked once, turned into a [`DrEvent`].

use crate::dr::{DrCommand, DrEvent};

/// What an aggregator posts: an id, a window, a priority and exactly one command.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    pub id: String,
    pub start: chrono::DateTime<chrono::Utc>,
    pub end: chrono::DateTime<chrono::Utc>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub export_limit_w: Option<f64>,
    #[serde(default)]
    pub import_limit_w: Option<f64>,
    #[serde(default)]
    pub grid_target_w: Option<f64>,
    #[serde(default)]
    pub fleet_battery_w: Option<f64>,
    #[serde(default)]
    pub drm: Option<u8>,
    #[serde(default)]
    pub openadr_level: Option<u8>,
    #[serde(default)]
    pub ripple_pct: Option<f64>,
}

impl EventRequest {
    /// Into an event from `source`; the message says what is wrong otherwise.
    pub fn into_event(self, source: &str) -> Result<DrEvent, String> {
        let commands: Vec<DrCommand> = [
            self.export_limit_w.map(DrCommand::ExportLimitW),
            self.import_limit_w.map(DrCommand::ImportLimitW),
            self.grid_target_w.map(DrCommand::GridTargetW),
            self.fleet_battery_w.map(DrCommand::FleetBatteryW),
            self.drm.map(DrCommand::Drm),
            self.openadr_level.map(DrCommand::OpenadrLevel),
            self.ripple_pct.map(DrCommand::RipplePct),
        ]
        .into_iter()
        .flatten()
        .collect();
        let [command] = commands[..] else {
            return Err("give exactly one of export_limit_w, import_limit_w, grid_target_w, fleet_battery_w, drm, openadr_level, ripple_pct".into());
        };
        command.validate()?;
        Ok(DrEvent {
            id: self.id,
            start: self.start,
            end: self.end,
            priority: self.priority,
            command,
            source: source.into(),
        })
    }
}
