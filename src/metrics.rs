//! Prometheus metrics, prefix `ems_`, base units in names, bounded labels (site, device,
//! phase, link, error kind).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::status::{Health, Status};

pub struct Metrics {
    registry: Registry,
    grid_power: GaugeVec,
    grid_phase_power: GaugeVec,
    grid_phase_current: GaugeVec,
    grid_phase_voltage: GaugeVec,
    inverter_ac_power: GaugeVec,
    inverter_pv_power: GaugeVec,
    inverter_battery_power: GaugeVec,
    inverter_soc: GaugeVec,
    device_health: GaugeVec,
    device_age: GaugeVec,
    fail_safe: GaugeVec,
    binding: GaugeVec,
    last_binding: std::sync::Mutex<Option<String>>,
    setpoint_battery: GaugeVec,
    setpoint_cap: GaugeVec,
    export_limit: GaugeVec,
    pub modbus_requests: IntCounterVec,
    pub modbus_errors: IntCounterVec,
    pub modbus_latency: HistogramVec,
    pub cycle_duration: HistogramVec,
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    pub fn new(site: &str) -> Metrics {
        let labels = std::collections::HashMap::from([("site".to_string(), site.to_string())]);
        let r = Registry::new_custom(None, Some(labels)).expect("valid registry labels");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definition");
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("static metric definition");
            r.register(Box::new(h.clone()))
                .expect("metric registered once");
            h
        };
        Metrics {
            grid_power: gauge(
                &r,
                "ems_grid_power_watts",
                "Site grid power, + import / - export.",
                &[],
            ),
            grid_phase_power: gauge(
                &r,
                "ems_grid_phase_power_watts",
                "Grid power per phase, + import.",
                &["phase"],
            ),
            grid_phase_current: gauge(
                &r,
                "ems_grid_phase_current_amperes",
                "Grid current per phase, signed like power.",
                &["phase"],
            ),
            grid_phase_voltage: gauge(
                &r,
                "ems_grid_phase_voltage_volts",
                "Grid voltage per phase.",
                &["phase"],
            ),
            inverter_ac_power: gauge(
                &r,
                "ems_inverter_ac_power_watts",
                "Inverter AC output, + delivered to the site.",
                &["device"],
            ),
            inverter_pv_power: gauge(
                &r,
                "ems_inverter_pv_power_watts",
                "Inverter PV (DC) power.",
                &["device"],
            ),
            inverter_battery_power: gauge(
                &r,
                "ems_inverter_battery_power_watts",
                "Battery power, + discharge / - charge.",
                &["device"],
            ),
            inverter_soc: gauge(
                &r,
                "ems_inverter_soc_percent",
                "Battery state of charge.",
                &["device"],
            ),
            device_health: gauge(
                &r,
                "ems_device_healthy",
                "1 when the device's last read is fresh and fault-free.",
                &["device", "kind"],
            ),
            device_age: gauge(
                &r,
                "ems_device_last_update_age_seconds",
                "Seconds since the device's last good read.",
                &["device", "kind"],
            ),
            fail_safe: gauge(&r, "ems_fail_safe_active", "1 while the grid meter is lost and every inverter is held at zero export.", &[]),
            binding: gauge(&r, "ems_control_binding", "1 for the constraint holding the fleet back this cycle (export_limit, export_limit:L1, import_limit, soc, fail_safe, none).", &["constraint"]),
            last_binding: std::sync::Mutex::new(None),
            setpoint_battery: gauge(&r, "ems_setpoint_battery_watts", "Battery power sent to the inverter, + discharge.", &["device"]),
            setpoint_cap: gauge(&r, "ems_setpoint_output_cap_watts", "Output cap sent to the inverter.", &["device"]),
            export_limit: gauge(&r, "ems_export_limit_watts", "Configured export limit in W (per phase for the phase modes; A × nominal V for phase_current).", &["mode"]),
            modbus_requests: counter(
                "ems_modbus_requests_total",
                "Modbus requests sent.",
                &["link", "device"],
            ),
            modbus_errors: counter(
                "ems_modbus_errors_total",
                "Failed Modbus requests by kind.",
                &["link", "device", "kind"],
            ),
            modbus_latency: histogram(
                "ems_modbus_request_duration_seconds",
                "Modbus request round-trip time.",
                &["link"],
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            cycle_duration: histogram(
                "ems_cycle_duration_seconds",
                "Duration of one poll-and-control cycle.",
                &[],
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            registry: r,
        }
    }

    /// Mirror a status into the gauges. Values of stale devices are removed, not frozen.
    pub fn observe(&self, s: &Status) {
        set_or_clear(&self.grid_power, &[], s.grid.power_w);
        for p in &s.grid.phases {
            let l = [p.phase.as_str()];
            set_or_clear(&self.grid_phase_power, &l, p.power_w);
            set_or_clear(&self.grid_phase_current, &l, p.current_a);
            set_or_clear(&self.grid_phase_voltage, &l, p.voltage_v);
        }
        for inv in &s.inverters {
            let l = [inv.id.as_str()];
            set_or_clear(&self.inverter_ac_power, &l, inv.ac_power_w);
            set_or_clear(&self.inverter_pv_power, &l, inv.pv_power_w);
            set_or_clear(&self.inverter_battery_power, &l, inv.battery_power_w);
            set_or_clear(&self.inverter_soc, &l, inv.soc_pct);
            let l = [inv.id.as_str(), "inverter"];
            self.device_health
                .with_label_values(&l)
                .set(f64::from(u8::from(inv.health == Health::Ok)));
            set_or_clear(&self.device_age, &l, inv.age_s);
        }
        if let Some(c) = &s.control {
            self.fail_safe
                .with_label_values(&[] as &[&str])
                .set(f64::from(u8::from(c.fail_safe)));
            // One series: the constraint binding now.
            let now = c.binding.clone().unwrap_or_else(|| "none".into());
            let mut last = self.last_binding.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = last.as_deref().filter(|old| *old != now) {
                let _ = self.binding.remove_label_values(&[old]);
            }
            self.binding.with_label_values(&[now.as_str()]).set(1.0);
            *last = Some(now);
        }
        for inv in &s.inverters {
            let l = [inv.id.as_str()];
            set_or_clear(
                &self.setpoint_battery,
                &l,
                inv.setpoint.map(|sp| sp.battery_w),
            );
            set_or_clear(
                &self.setpoint_cap,
                &l,
                inv.setpoint.map(|sp| sp.output_cap_w),
            );
        }
        let e = &s.export_limit;
        let limit_w = e.limit_w.or(e.limit_a.map(|a| a * s.nominal_voltage_v));
        set_or_clear(&self.export_limit, &[e.mode], limit_w);
        for m in &s.meters {
            let l = [m.id.as_str(), "meter"];
            self.device_health
                .with_label_values(&l)
                .set(f64::from(u8::from(m.health == Health::Ok)));
            set_or_clear(&self.device_age, &l, m.age_s);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!("metrics encoding failed: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn set_or_clear(g: &GaugeVec, labels: &[&str], v: Option<f64>) {
    match v {
        Some(v) => g.with_label_values(labels).set(v),
        None => {
            let _ = g.remove_label_values(labels);
        }
    }
}
