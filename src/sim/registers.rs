//! Register images of simulated devices, encoded with the same addresses, scales and float
//! layouts the drivers decode, so any Modbus master reads the simulator as it would read
//! the real device.

use std::collections::BTreeMap;

use tokio_modbus::ExceptionCode;

use super::physics::{SimInverter, SiteModel};
use crate::config::{InverterModel, MeterModel, MeterRole, Phase};
use crate::drivers::chint::{ddsu666, dtsu666, f32_words};
use crate::drivers::saj::{self, app_mode, reg};

/// A device's registers at one instant; holding and input registers share it.
#[derive(Debug, Default, Clone)]
pub struct Image {
    regs: BTreeMap<u16, u16>,
}

impl Image {
    fn set(&mut self, addr: u16, v: u16) {
        self.regs.insert(addr, v);
    }
    fn set_i16(&mut self, addr: u16, v: f64) {
        self.set(addr, v.round().clamp(-32768.0, 32767.0) as i16 as u16);
    }
    fn set_u16(&mut self, addr: u16, v: f64) {
        self.set(addr, v.round().clamp(0.0, 65535.0) as u16);
    }
    fn set_u32(&mut self, addr: u16, v: f64) {
        let v = v.round().clamp(0.0, f64::from(u32::MAX)) as u32;
        self.set(addr, (v >> 16) as u16);
        self.set(addr + 1, v as u16);
    }
    fn set_f32(&mut self, addr: u16, v: f64) {
        let [hi, lo] = f32_words(v);
        self.set(addr, hi);
        self.set(addr + 1, lo);
    }
    /// Set consecutive registers from `addr`.
    pub(crate) fn set_words(&mut self, addr: u16, words: &[u16]) {
        for (k, &w) in words.iter().enumerate() {
            self.set(addr.wrapping_add(k as u16), w);
        }
    }
    fn zero(&mut self, start: u16, count: u16) {
        for a in start..start + count {
            self.regs.entry(a).or_insert(0);
        }
    }

    /// Read `count` registers from `start`; any address the device does not have is
    /// "illegal data address", as on the real device.
    pub fn read(&self, start: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
        if count == 0 || count > crate::drivers::MAX_READ_REGISTERS {
            return Err(ExceptionCode::IllegalDataValue);
        }
        (0..count)
            .map(|i| {
                start
                    .checked_add(i)
                    .and_then(|a| self.regs.get(&a).copied())
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }
}

fn device_type(model: InverterModel) -> u16 {
    // Only single-phase type codes are documented (§1.2); three-phase units report the
    // same family code here.
    match model {
        InverterModel::SajH2 => 0x005A,
        InverterModel::SajHs2 | InverterModel::SajHs3 => 0x005C,
        InverterModel::Sunspec => 0,
    }
}

pub fn inverter_image(m: &SiteModel, inv: &SimInverter, index: usize) -> Image {
    if inv.sunspec.is_some() {
        return super::sunspec::inverter_image(m, inv, index);
    }
    let mut im = Image::default();

    // Identity.
    im.zero(0x8F00, 29);
    im.set(reg::DEVICE_TYPE, device_type(inv.model));
    im.set(0x8F01, (inv.rated_w / 1000.0).round() as u16);
    im.set(0x8F02, 1000);
    let serial = format!("SIM{:>02}{:<15}", index + 1, inv.id);
    for (k, pair) in serial.as_bytes().chunks(2).take(10).enumerate() {
        let hi = pair[0];
        let lo = pair.get(1).copied().unwrap_or(0);
        im.set(reg::SERIAL + k as u16, u16::from_be_bytes([hi, lo]));
    }

    // Real-time block.
    im.zero(0x4000, 0x176);
    for (k, w) in saj::encode_clock(m.local_now()).into_iter().enumerate() {
        im.set(reg::CLOCK + k as u16, w);
    }
    let faulted = inv.fault_words.iter().any(|&w| w != 0);
    im.set(reg::MPV_MODE, if faulted { 5 } else { 4 });
    for (k, w) in inv.fault_words.iter().enumerate() {
        im.set_u32(reg::H_FAULT + 2 * k as u16, f64::from(*w));
    }
    im.set(
        reg::ERROR_COUNT,
        inv.fault_words.iter().map(|w| w.count_ones()).sum::<u32>() as u16,
    );
    let app = inv.app_mode();
    // Some firmware does not mirror a passive mode at 0x4022: it keeps showing self-use.
    let shown = if inv.mirrors_app_mode {
        app
    } else {
        app_mode::SELF_USE
    };
    im.set(reg::SET_APP_MODE, if shown <= 3 { shown } else { 0 });
    im.set_i16(0x4029, inv.battery.soc_max_pct);
    im.set_i16(0x402A, inv.battery.soc_min_pct);
    im.set(0x4030, if m.phases == 3 { 2 } else { 1 });

    let n = inv.phases.len() as f64;
    let bases = [reg::R_GRID, reg::S_GRID, reg::T_GRID];
    let inv_bases = [0x4046u16, 0x404B, 0x4050];
    for (k, ph) in inv.phases.iter().enumerate() {
        let v = m.truth.voltage_v[ph.index()];
        let p = inv.ac_w / n;
        let i = if v > 1.0 { p / v } else { 0.0 };
        let b = bases[k];
        im.set_u16(b, v * 10.0);
        im.set_i16(b + 1, i * 100.0);
        im.set_u16(b + 2, m.frequency_hz * 100.0);
        im.set_i16(b + 4, p);
        im.set_u16(b + 5, p.abs());
        im.set_i16(b + 6, 1000.0);
        let ib = inv_bases[k];
        im.set_u16(ib, v * 10.0);
        im.set_i16(ib + 1, i * 100.0);
        im.set_u16(ib + 2, m.frequency_hz * 100.0);
        im.set_i16(ib + 3, p);
        im.set_u16(ib + 4, p.abs());
    }
    let bat_v = 400.0;
    im.set_u16(reg::BAT_VOLT, bat_v * 10.0);
    im.set_i16(reg::BAT_CURR, inv.battery_w / bat_v * 100.0);
    im.set_i16(reg::BAT_POWER, inv.battery_w);
    im.set_i16(0x406E, 250.0);
    im.set_u16(reg::BAT_SOC, inv.soc_pct * 100.0);
    // Two PV strings share the array.
    for k in 0..2u16 {
        let p = inv.pv_w / 2.0;
        let v = if p > 0.0 { 600.0 } else { 0.0 };
        im.set_u16(reg::PV1 + 3 * k, v * 10.0);
        im.set_u16(
            reg::PV1 + 3 * k + 1,
            if v > 0.0 { p / v * 100.0 } else { 0.0 },
        );
        im.set_u16(reg::PV1 + 3 * k + 2, p);
    }
    im.set(0x4095, u16::from(inv.pv_w > 0.0));
    im.set_i16(
        0x4096,
        inv.battery_w.signum() * f64::from(inv.battery_w.abs() > 1.0),
    );
    let site_grid: f64 = m.truth.grid_w.iter().sum();
    im.set_i16(
        0x4097,
        -site_grid.signum() * f64::from(site_grid.abs() > 1.0),
    );
    im.set_i16(reg::SYS_LOAD, m.truth.load_w.iter().sum::<f64>());
    im.set_i16(reg::TOTAL_PV, inv.pv_w);
    im.set_i16(reg::TOTAL_BATTERY, inv.battery_w);
    im.set_i16(reg::TOTAL_GRID, site_grid);
    im.set_i16(reg::TOTAL_INV, inv.ac_w);
    im.set_i16(0x40AA, inv.ac_w.abs());
    im.set_i16(reg::SYS_GRID, site_grid);
    // Energy totals, ×0.01 kWh.
    im.set_u32(0x40C5, inv.pv_wh / 10.0);
    im.set_u32(0x40CD, inv.charged_wh / 10.0);
    im.set_u32(0x40D5, inv.discharged_wh / 10.0);

    // Settings.
    im.zero(0x3604, 0x367C - 0x3604 + 1);
    for s in saj::SETTINGS {
        im.set(s.addr, inv.setting(s.addr));
    }
    im.set(0x366D, inv.rated_w.round().min(65535.0) as u16);
    im.set(0x3674, if m.phases == 3 { 3 } else { 0 });
    im
}

/// Forward power per phase as the meter sees it: + towards the site.
fn forward_w(m: &SiteModel, role: MeterRole) -> [f64; 3] {
    match role {
        MeterRole::Grid => m.truth.grid_w,
        // The solar inverter pushes power backwards through its meter.
        MeterRole::Pv => m.truth.ac_pv_w.map(|w| -w),
    }
}

pub fn meter_image(m: &SiteModel, model: MeterModel, role: MeterRole, unit: u8) -> Image {
    let p = m.wiring.as_wired(role, forward_w(m, role));
    if model == MeterModel::Sunspec {
        return super::sunspec::meter_image(m, role, p, unit);
    }
    let mut im = Image::default();
    let v = m.truth.voltage_v;
    let (import_kwh, export_kwh) = match role {
        MeterRole::Grid => (m.grid_import_wh / 1000.0, m.grid_export_wh / 1000.0),
        MeterRole::Pv => (0.0, m.ac_pv_wh / 1000.0),
    };
    match model {
        MeterModel::Dtsu666 => {
            im.zero(0x0000, 0x30);
            im.set(0x0000, 204);
            im.set(0x0001, 701);
            im.set(0x0006, 1);
            im.set(0x0007, 10);
            im.set(0x002C, 3);
            im.set(0x002D, 3);
            im.set(dtsu666::ADDRESS, u16::from(unit));
            im.zero(dtsu666::INSTANT.start, dtsu666::INSTANT.count);
            for ph in Phase::ALL {
                let k = ph.index();
                let off = 2 * k as u16;
                let line = v[k] * 3f64.sqrt();
                im.set_f32(0x2000 + off, line * 10.0);
                im.set_f32(dtsu666::UA + off, v[k] * 10.0);
                let i = if v[k] > 1.0 { p[k].abs() / v[k] } else { 0.0 };
                im.set_f32(dtsu666::IA + off, i * 1000.0);
                im.set_f32(dtsu666::PA + off, p[k] * 10.0);
                im.set_f32(0x202C + off, 1000.0);
            }
            im.set_f32(dtsu666::PT, p.iter().sum::<f64>() * 10.0);
            im.set_f32(dtsu666::PFT, 1000.0);
            im.set_f32(dtsu666::FREQ, m.frequency_hz * 100.0);
            for block in dtsu666::ENERGY {
                im.zero(block.start, block.count);
                im.set_f32(block.start, import_kwh);
                im.set_f32(block.start + dtsu666::EXPORT_OFFSET as u16, export_kwh);
            }
        }
        MeterModel::Ddsu666 => {
            im.zero(0x0000, 0x10);
            im.set(ddsu666::ADDRESS, u16::from(unit));
            im.zero(ddsu666::INSTANT.start, ddsu666::INSTANT.count);
            let i = if v[0] > 1.0 { p[0].abs() / v[0] } else { 0.0 };
            im.set_f32(ddsu666::U, v[0]);
            im.set_f32(ddsu666::I, i);
            im.set_f32(ddsu666::P, p[0] / 1000.0);
            im.set_f32(ddsu666::Q, 0.0);
            im.set_f32(0x2008, p[0].abs() / 1000.0);
            im.set_f32(ddsu666::PF, 1.0);
            im.set_f32(ddsu666::FREQ, m.frequency_hz);
            let e = ddsu666::ENERGY[0];
            im.zero(e.start, e.count);
            im.set_f32(e.start, import_kwh);
            im.set_f32(e.start + ddsu666::EXPORT_OFFSET as u16, export_kwh);
        }
        MeterModel::Sunspec => {}
    }
    im
}

/// Apply a write to an inverter's settings as the firmware would: only documented settings
/// are writable, and a value outside the setting's range is refused with exception 03.
pub fn write_inverter_setting(
    inv: &mut SimInverter,
    addr: u16,
    value: u16,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), ExceptionCode> {
    if let Some(ss) = inv.sunspec.as_mut() {
        ss.write(addr, value, now)?;
        *inv.writes.entry(addr).or_default() += 1;
        return Ok(());
    }
    let s = saj::setting(addr).ok_or(ExceptionCode::IllegalDataAddress)?;
    if value < s.min || value > s.max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    inv.settings.insert(addr, value);
    // Settings memory has a limited write endurance: count what each register takes.
    *inv.writes.entry(addr).or_default() += 1;
    Ok(())
}
