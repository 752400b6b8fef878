//! Prometheus metrics: prefix `ems_`, base units in names, bounded labels (site, device,
//! phase, link, error kind, fault name from the fixed fault tables, constraint).
//!
//! Every metric here is queried by a dashboard panel, and every panel's query is checked
//! against a real Prometheus in the tests.

use crate::drivers::Severity;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry,
    TextEncoder,
};

use crate::control::UnitHealth;
use crate::io::link::LinkError;
use crate::web::status::{Health, Status};

/// Error kinds every device's counter starts at zero for, so a healthy site shows 0 errors
/// rather than no data.
pub const ERROR_KINDS: [&str; 5] = ["timeout", "exception", "decode", "connect", "transport"];

/// The exception codes Modbus defines (illegal function, address, value; slave failure,
/// acknowledge, busy; gateway path, gateway target).
const MODBUS_EXCEPTION_CODES: [u8; 8] = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0A, 0x0B];

fn severity_label(s: Severity) -> &'static str {
    match s {
        Severity::Fault => "fault",
        Severity::Warning => "warning",
    }
}

pub struct Metrics {
    registry: Registry,
    grid_power: GaugeVec,
    grid_phase_power: GaugeVec,
    grid_phase_current: GaugeVec,
    grid_phase_voltage: GaugeVec,
    grid_frequency: GaugeVec,
    inverter_ac_power: GaugeVec,
    inverter_pv_power: GaugeVec,
    inverter_battery_power: GaugeVec,
    inverter_soc: GaugeVec,
    inverter_faults_active: GaugeVec,
    inverter_fault: GaugeVec,
    device_health: GaugeVec,
    device_age: GaugeVec,
    fail_safe: GaugeVec,
    binding: GaugeVec,
    setpoint_battery: GaugeVec,
    inverter_held: GaugeVec,
    inverter_not_following: GaugeVec,
    inverter_alarm: GaugeVec,
    setpoint_cap: GaugeVec,
    export_limit: GaugeVec,
    import_limit: GaugeVec,
    modbus_requests: IntCounterVec,
    modbus_errors: IntCounterVec,
    modbus_exceptions: IntCounterVec,
    modbus_latency: HistogramVec,
    modbus_writes: IntCounterVec,
    cycle_duration: HistogramVec,
    cycle_overruns: IntCounterVec,
    excursions: IntCounterVec,
    excursion_seconds: CounterVec,
    plan_solve: GaugeVec,
    plan_objective: GaugeVec,
    plan_cost: GaugeVec,
    forecast_error: GaugeVec,
    plan_baseline_cost: GaugeVec,
    plan_age: GaugeVec,
    plan_price: GaugeVec,
    plan_battery: GaugeVec,
    plan_failures: IntCounterVec,
    dr_active: GaugeVec,
    dr_acks: IntCounterVec,
    dr_link_up: GaugeVec,
    dr_fallback: GaugeVec,
    /// Label values set last cycle, so series that no longer apply are removed.
    last: Mutex<Last>,
}

#[derive(Default)]
struct Last {
    binding: Option<String>,
    faults: BTreeSet<(String, &'static str)>,
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("static metric definition");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

const NO_LABELS: &[&str] = &[];

impl Metrics {
    pub fn new(site: &str) -> Metrics {
        let labels = std::collections::HashMap::from([("site".to_string(), site.to_string())]);
        let r = Registry::new_custom(None, Some(labels)).expect("valid registry labels");
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        Metrics {
            grid_power: gauge(&r, "ems_grid_power_watts", "Site grid power, + import / - export.", &[]),
            grid_phase_power: gauge(&r, "ems_grid_phase_power_watts", "Grid power per phase, + import.", &["phase"]),
            grid_phase_current: gauge(&r, "ems_grid_phase_current_amperes", "Grid current per phase, signed like power.", &["phase"]),
            grid_phase_voltage: gauge(&r, "ems_grid_phase_voltage_volts", "Grid voltage per phase.", &["phase"]),
            grid_frequency: gauge(&r, "ems_grid_frequency_hertz", "Grid frequency at the grid meter.", &[]),
            inverter_ac_power: gauge(&r, "ems_inverter_ac_power_watts", "Inverter AC output, + delivered to the site.", &["device"]),
            inverter_pv_power: gauge(&r, "ems_inverter_pv_power_watts", "Inverter PV (DC) power.", &["device"]),
            inverter_battery_power: gauge(&r, "ems_inverter_battery_power_watts", "Battery power, + discharge / - charge.", &["device"]),
            inverter_soc: gauge(&r, "ems_inverter_soc_percent", "Battery state of charge.", &["device"]),
            inverter_faults_active: gauge(&r, "ems_inverter_faults_active", "Fault bits (not warnings) the inverter reports now.", &["device"]),
            inverter_fault: gauge(&r, "ems_inverter_fault", "1 while the inverter reports this fault or warning (names from the SAJ fault tables).", &["device", "fault", "severity"]),
            device_health: gauge(&r, "ems_device_healthy", "1 when the device's last read is fresh and fault-free.", &["device", "kind"]),
            device_age: gauge(&r, "ems_device_last_update_age_seconds", "Seconds since the device's last good read.", &["device", "kind"]),
            fail_safe: gauge(&r, "ems_fail_safe_active", "1 while the grid meter is lost and every inverter is held at zero export.", &[]),
            binding: gauge(&r, "ems_control_binding", "1 for the constraint holding the fleet back this cycle (export_limit, export_limit:L1, import_limit, soc, fail_safe, none).", &["constraint"]),
            inverter_held: gauge(&r, "ems_inverter_held", "1 while the unit is held (battery idle, output no higher) because it is faulted or not following.", &["device"]),
            inverter_not_following: gauge(&r, "ems_inverter_not_following", "1 while the unit's measured battery power does not follow its setpoint.", &["device"]),
            inverter_alarm: gauge(&r, "ems_inverter_alarm", "1 while the unit has an alarm the EMS stopped fixing by writing (see status `alarm`).", &["device"]),
            setpoint_battery: gauge(&r, "ems_setpoint_battery_watts", "Battery power sent to the inverter, + discharge.", &["device"]),
            setpoint_cap: gauge(&r, "ems_setpoint_output_cap_watts", "Output cap sent to the inverter.", &["device"]),
            export_limit: gauge(&r, "ems_export_limit_watts", "Export limit in force: for the sum of phases (total_power) or per phase (phase modes; A × nominal V for phase_current).", &["mode"]),
            import_limit: gauge(&r, "ems_import_limit_watts", "Import limit in force, like ems_export_limit_watts.", &["mode"]),
            modbus_requests: counter(&r, "ems_modbus_requests_total", "Modbus requests sent.", &["link", "device"]),
            modbus_errors: counter(&r, "ems_modbus_errors_total", "Failed Modbus requests and undecodable answers, by kind.", &["link", "device", "kind"]),
            modbus_exceptions: counter(&r, "ems_modbus_exceptions_total", "Modbus exception answers by exception code.", &["link", "device", "code"]),
            modbus_writes: counter(&r, "ems_modbus_writes_total", "Register writes sent to a unit (each one wears its settings memory), by register and outcome.", &["device", "register", "result"]),
            modbus_latency: histogram(&r, "ems_modbus_request_duration_seconds", "Modbus request round-trip time.", &["link", "device"], latency_buckets),
            cycle_duration: histogram(
                &r,
                "ems_cycle_duration_seconds",
                "Duration of one read-decide-write cycle.",
                &[],
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            cycle_overruns: counter(&r, "ems_cycle_overruns_total", "Cycles that took longer than the control period.", &[]),
            excursions: counter(&r, "ems_export_excursions_total", "Export excursions over the limit in force that have ended.", &[]),
            excursion_seconds: {
                let c = CounterVec::new(Opts::new("ems_export_excursion_seconds_total", "Time the site's export spent over the limit in force, in ended excursions."), &[]).expect("static metric definition");
                r.register(Box::new(c.clone())).expect("metric registered once");
                c
            },
            plan_solve: gauge(&r, "ems_plan_solve_seconds", "Time the last successful plan took to solve.", &[]),
            plan_objective: gauge(&r, "ems_plan_objective", "The LP objective of the plan in force (cost, cycling and SOC penalties, less the value of energy left).", &[]),
            plan_cost: gauge(&r, "ems_plan_cost", "Energy cost of the plan in force over its horizon, in the tariff's currency.", &[]),
            forecast_error: gauge(&r, "ems_forecast_error_watts", "Today's forecast error against what was measured, per plan step: mean absolute error and bias (forecast - measured); NaN until a step is scored.", &["quantity", "stat"]),
            plan_baseline_cost: gauge(&r, "ems_plan_baseline_cost", "Energy cost over the same horizon without batteries.", &[]),
            plan_age: gauge(&r, "ems_plan_age_seconds", "Seconds since the plan in force was made.", &[]),
            plan_price: gauge(&r, "ems_plan_price_per_kwh", "Price of the plan's current step, by direction.", &["direction"]),
            plan_battery: gauge(&r, "ems_plan_battery_power_watts", "Fleet battery power the plan's current step asks for, + discharge.", &[]),
            plan_failures: counter(&r, "ems_plan_failures_total", "Plans that failed or timed out (self-consumption ran instead).", &[]),
            dr_active: gauge(&r, "ems_dr_events_active", "Demand-response events in force now.", &[]),
            dr_acks: counter(&r, "ems_dr_acks_total", "Demand-response acknowledgements by status (accepted, rejected, active, ended, cancelled).", &["status"]),
            dr_link_up: gauge(&r, "ems_dr_link_up", "1 while the aggregator's MQTT broker is connected (sites with MQTT only).", &[]),
            dr_fallback: gauge(&r, "ems_dr_fallback_active", "1 while the aggregator link has been down past its heartbeat and the fallback limits apply (sites with MQTT only).", &[]),
            last: Mutex::new(Last::default()),
            registry: r,
        }
    }

    /// Start a device's request and error counters at zero.
    /// Every series a device can have, at zero from the start: a panel then shows a real 0,
    /// and "No data" only when the EMS itself is not scraped.
    pub fn register_device(&self, link: &str, device: &str) {
        self.modbus_requests.with_label_values(&[link, device]);
        for kind in ERROR_KINDS {
            self.modbus_errors.with_label_values(&[link, device, kind]);
        }
        for code in MODBUS_EXCEPTION_CODES {
            self.modbus_exceptions
                .with_label_values(&[link, device, &format!("{code:#04x}")]);
        }
    }

    /// An inverter's fault and warning flags from the fault tables, each at 0 until raised.
    pub fn register_inverter(&self, device: &str, model: crate::config::InverterModel) {
        for (name, severity) in crate::drivers::fault_flags(model) {
            self.inverter_fault
                .with_label_values(&[device, name, severity_label(severity)])
                .set(0.0);
        }
    }

    pub fn record_request(
        &self,
        link: &str,
        device: &str,
        result: Result<(), &LinkError>,
        took: Duration,
    ) {
        self.modbus_requests
            .with_label_values(&[link, device])
            .inc();
        match result {
            Ok(_) => self
                .modbus_latency
                .with_label_values(&[link, device])
                .observe(took.as_secs_f64()),
            Err(e) => {
                self.modbus_errors
                    .with_label_values(&[link, device, e.kind()])
                    .inc();
                if let LinkError::Exception(code) = *e {
                    let code = format!("{code:#04x}");
                    self.modbus_exceptions
                        .with_label_values(&[link, device, &code])
                        .inc();
                }
            }
        }
    }

    /// An answer that arrived but could not be what the device meant.
    pub fn record_write(&self, device: &str, register: u16, ok: bool) {
        self.modbus_writes
            .with_label_values(&[
                device,
                &format!("{register:#06x}"),
                if ok { "ok" } else { "failed" },
            ])
            .inc();
    }

    pub fn record_decode_error(&self, link: &str, device: &str) {
        self.modbus_errors
            .with_label_values(&[link, device, "decode"])
            .inc();
    }

    pub fn observe_plan_solve(&self, plan: &crate::planner::Plan) {
        self.plan_solve
            .with_label_values(NO_LABELS)
            .set(plan.solve_ms / 1000.0);
    }

    pub fn count_plan_failure(&self) {
        self.plan_failures.with_label_values(NO_LABELS).inc();
    }

    pub fn count_dr_ack(&self, status: &str) {
        self.dr_acks.with_label_values(&[status]).inc();
    }

    /// An export excursion of `duration_s` has ended.
    pub fn excursion(&self, duration_s: f64) {
        self.excursions.with_label_values(NO_LABELS).inc();
        self.excursion_seconds
            .with_label_values(NO_LABELS)
            .inc_by(duration_s.max(0.0));
    }

    pub fn count_cycle_overrun(&self) {
        self.cycle_overruns.with_label_values(NO_LABELS).inc();
    }

    pub fn observe_cycle(&self, took: Duration) {
        // Shown at zero from the first cycle on.
        self.cycle_overruns.with_label_values(NO_LABELS);
        self.excursions.with_label_values(NO_LABELS);
        self.excursion_seconds.with_label_values(NO_LABELS);
        self.cycle_duration
            .with_label_values(NO_LABELS)
            .observe(took.as_secs_f64());
    }

    /// Mirror a status into the gauges. Values of stale devices are removed, not frozen.
    pub fn observe(&self, s: &Status) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        set_or_clear(&self.grid_power, NO_LABELS, s.grid.power_w);
        set_or_clear(&self.grid_frequency, NO_LABELS, s.grid.frequency_hz);
        for p in &s.grid.phases {
            let l = [p.phase.as_str()];
            set_or_clear(&self.grid_phase_power, &l, p.power_w);
            set_or_clear(&self.grid_phase_current, &l, p.current_a);
            set_or_clear(&self.grid_phase_voltage, &l, p.voltage_v);
        }
        let mut faults = BTreeSet::new();
        for inv in &s.inverters {
            let l = [inv.id.as_str()];
            set_or_clear(&self.inverter_ac_power, &l, inv.ac_power_w);
            set_or_clear(&self.inverter_pv_power, &l, inv.pv_power_w);
            set_or_clear(&self.inverter_battery_power, &l, inv.battery_power_w);
            set_or_clear(&self.inverter_soc, &l, inv.soc_pct);
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
            let flag = |b: bool| f64::from(u8::from(b));
            self.inverter_held
                .with_label_values(&l)
                .set(flag(inv.held.is_some()));
            self.inverter_not_following
                .with_label_values(&l)
                .set(flag(inv.held == Some(UnitHealth::NotFollowing)));
            self.inverter_alarm
                .with_label_values(&l)
                .set(flag(inv.alarm.is_some()));
            let fresh = inv.health != Health::Stale;
            set_or_clear(
                &self.inverter_faults_active,
                &l,
                fresh.then_some(inv.faults.len() as f64),
            );
            for (names, severity) in [
                (&inv.faults, severity_label(Severity::Fault)),
                (&inv.warnings, severity_label(Severity::Warning)),
            ] {
                for name in names.iter() {
                    self.inverter_fault
                        .with_label_values(&[inv.id.as_str(), name, severity])
                        .set(1.0);
                    faults.insert((format!("{}\u{0}{severity}", inv.id), *name));
                }
            }
            let l = [inv.id.as_str(), "inverter"];
            self.device_health
                .with_label_values(&l)
                .set(f64::from(u8::from(inv.health == Health::Ok)));
            set_or_clear(&self.device_age, &l, inv.age_s);
        }
        for gone in last.faults.difference(&faults) {
            let (device, severity) = gone.0.split_once('\u{0}').unwrap_or((&gone.0, ""));
            self.inverter_fault
                .with_label_values(&[device, gone.1, severity])
                .set(0.0);
        }
        last.faults = faults;
        for m in &s.meters {
            let l = [m.id.as_str(), "meter"];
            self.device_health
                .with_label_values(&l)
                .set(f64::from(u8::from(m.health == Health::Ok)));
            set_or_clear(&self.device_age, &l, m.age_s);
        }
        if let Some(c) = &s.control {
            self.fail_safe
                .with_label_values(NO_LABELS)
                .set(f64::from(u8::from(c.fail_safe)));
            let now = c.binding.clone().unwrap_or_else(|| "none".into());
            if let Some(old) = last.binding.as_deref().filter(|old| *old != now) {
                let _ = self.binding.remove_label_values(&[old]);
            }
            self.binding.with_label_values(&[now.as_str()]).set(1.0);
            last.binding = Some(now);
        }
        if let Some(dr) = &s.dr {
            for status in ["accepted", "rejected", "active", "ended", "cancelled"] {
                self.dr_acks.with_label_values(&[status]);
            }
            self.dr_active
                .with_label_values(NO_LABELS)
                .set(dr.constraints.active.len() as f64);
            if let Some(up) = dr.mqtt_connected {
                self.dr_link_up
                    .with_label_values(NO_LABELS)
                    .set(f64::from(u8::from(up)));
                self.dr_fallback
                    .with_label_values(NO_LABELS)
                    .set(f64::from(u8::from(dr.fallback)));
            }
        }
        if let Some(p) = &s.plan {
            // The failure counter is always shown, at zero on a healthy site.
            self.plan_failures.with_label_values(NO_LABELS);
            set_or_clear(&self.plan_objective, NO_LABELS, p.objective);
            set_or_clear(&self.plan_cost, NO_LABELS, p.cost);
            set_or_clear(&self.plan_baseline_cost, NO_LABELS, p.baseline_cost);
            set_or_clear(&self.plan_age, NO_LABELS, p.age_s);
            set_or_clear(&self.plan_price, &["import"], p.import_price);
            set_or_clear(&self.plan_price, &["export"], p.export_price);
            set_or_clear(&self.plan_battery, NO_LABELS, p.battery_w);
            let today = p.forecast_quality.today.as_ref();
            for (quantity, stat, v) in [
                ("pv", "mae", today.map(|d| d.pv_mae_w)),
                ("pv", "bias", today.map(|d| d.pv_bias_w)),
                ("load", "mae", today.map(|d| d.load_mae_w)),
                ("load", "bias", today.map(|d| d.load_bias_w)),
            ] {
                // Always shown, so the dashboard has the series from the start.
                self.forecast_error
                    .with_label_values(&[quantity, stat])
                    .set(v.unwrap_or(f64::NAN));
            }
        }
        for (gauge, limit) in [
            (&self.export_limit, Some(&s.export_limit)),
            (&self.import_limit, s.import_limit.as_ref()),
        ] {
            if let Some(l) = limit {
                let w = l.limit_w.or(l.limit_a.map(|a| a * s.nominal_voltage_v));
                set_or_clear(gauge, &[l.mode], w);
            }
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

impl crate::io::IoObserver for Metrics {
    fn request(&self, link: &str, device: &str, result: Result<(), &LinkError>, took: Duration) {
        self.record_request(link, device, result, took);
    }
    fn decode_error(&self, link: &str, device: &str) {
        self.record_decode_error(link, device);
    }
    fn write(&self, device: &str, register: u16, ok: bool) {
        self.record_write(device, register, ok);
    }
}
