//! SAJ H2 / HS2 / HS3 hybrid and storage inverters (`docs/registers.md` §1).
//!
//! Everything is a holding register (FC03), big-endian, 32-bit values high word first.
//! Scales are powers of ten (`ratio -1` → ×0.1). Sign conventions that the vendor documents
//! (`0x40A6` battery + discharge, `0x40AD` grid + import) are taken as documented; the
//! per-phase grid-port powers (`0x4035`…) have no documented sign and are read as
//! + = delivered by the inverter (still to be checked on real hardware).

use chrono::NaiveDate;
use chrono::NaiveDateTime;

use super::{
    expect_len, plausible, DecodeError, FaultFlag, InverterReading, PhaseAc, ReadBlock, Severity,
    WorkingState,
};
use crate::config::Phase;

/// Identity block: type, sub-type, protocol version, serial, product code, versions.
pub const IDENTITY: ReadBlock = ReadBlock::holding(0x8F00, 29);
/// Real-time block: clock, state, fault words, per-phase grid port, battery, PV strings.
pub const REALTIME: ReadBlock = ReadBlock::holding(0x4000, 125);
/// Real-time totals: PV, battery, grid and inverter power — all the control loop needs
/// each cycle; on a slow RS485 bus the real-time block is read less often.
pub const TOTALS: ReadBlock = ReadBlock::holding(reg::TOTAL_PV, 5);

pub mod reg {
    //! Register addresses, shared by the driver and the simulator.
    pub const CLOCK: u16 = 0x4000;
    pub const MPV_MODE: u16 = 0x4004;
    pub const H_FAULT: u16 = 0x4005;
    pub const M_FAULT: u16 = 0x4007;
    pub const M_FAULT2: u16 = 0x4009;
    pub const ERROR_COUNT: u16 = 0x400F;
    pub const SET_APP_MODE: u16 = 0x4022;
    /// R-phase grid port: V (×0.1), I (×0.01, signed), f (×0.01), DCI, P (W), VA, PF.
    pub const R_GRID: u16 = 0x4031;
    pub const S_GRID: u16 = 0x4038;
    pub const T_GRID: u16 = 0x403F;
    pub const BAT_VOLT: u16 = 0x4069;
    pub const BAT_CURR: u16 = 0x406A;
    pub const BAT_POWER: u16 = 0x406D;
    pub const BAT_SOC: u16 = 0x406F;
    /// PVn voltage, current, power; stride 3.
    pub const PV1: u16 = 0x4071;
    pub const SYS_LOAD: u16 = 0x40A0;
    pub const TOTAL_PV: u16 = 0x40A5;
    pub const TOTAL_BATTERY: u16 = 0x40A6;
    pub const TOTAL_GRID: u16 = 0x40A7;
    pub const TOTAL_INV: u16 = 0x40A9;
    pub const SYS_GRID: u16 = 0x40AD;

    pub const DEVICE_TYPE: u16 = 0x8F00;
    pub const SERIAL: u16 = 0x8F03;

    // Settings and control (FC03 read, FC06 write), §1.6.
    pub const PASSIVE_ENABLE: u16 = 0x3636;
    pub const PASSIVE_GRID_CHARGE: u16 = 0x3637;
    pub const PASSIVE_GRID_DISCHARGE: u16 = 0x3638;
    pub const PASSIVE_BAT_CHARGE: u16 = 0x3639;
    pub const PASSIVE_BAT_DISCHARGE: u16 = 0x363A;
    pub const ON_GRID_DIS_DEPTH: u16 = 0x3644;
    pub const CHARGE_DEPTH: u16 = 0x3646;
    pub const APP_MODE: u16 = 0x3647;
    pub const BAT_CHARGE_LIMIT: u16 = 0x364D;
    pub const BAT_DISCHARGE_LIMIT: u16 = 0x364E;
    pub const GRID_IMPORT_LIMIT: u16 = 0x364F;
    pub const GRID_EXPORT_LIMIT: u16 = 0x3650;
    pub const BACKUP_RESERVE_SOC: u16 = 0x3651;
    pub const ANTI_REFLUX_POWER: u16 = 0x365A;
    /// Anti-reflux on (1 master: the unit reads its own meter; 2 slave) or off (0).
    pub const PREVENT_REVERSE_FLOW: u16 = 0x3635;
    pub const ANTI_REFLUX_CURRENT: u16 = 0x365B;
    pub const ANTI_REFLUX_MODE: u16 = 0x365C;
    pub const INVERTER_STOP: u16 = 0x3677;
}

/// A writable setting: its documented range and factory default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub addr: u16,
    pub name: &'static str,
    pub min: u16,
    pub max: u16,
    pub default: u16,
}

/// The settings the EMS reads or writes, with the ranges of §1.6. The driver clamps every
/// write into these ranges; the simulator rejects anything outside them with exception 03,
/// as the firmware does.
pub const SETTINGS: &[Setting] = &[
    Setting {
        addr: 0x3604,
        name: "charge_time_enable",
        min: 0,
        max: 127,
        default: 0,
    },
    Setting {
        addr: 0x3605,
        name: "discharge_time_enable",
        min: 0,
        max: 127,
        default: 0,
    },
    Setting {
        addr: reg::PREVENT_REVERSE_FLOW,
        name: "prevent_reverse_flow",
        min: 0,
        max: 2,
        default: 1,
    },
    Setting {
        addr: reg::PASSIVE_ENABLE,
        name: "passive_enable",
        min: 0,
        max: 2,
        default: 0,
    },
    Setting {
        addr: reg::PASSIVE_GRID_CHARGE,
        name: "passive_grid_charge_permille",
        min: 0,
        max: 1100,
        default: 1100,
    },
    Setting {
        addr: reg::PASSIVE_GRID_DISCHARGE,
        name: "passive_grid_discharge_permille",
        min: 0,
        max: 1100,
        default: 1100,
    },
    Setting {
        addr: reg::PASSIVE_BAT_CHARGE,
        name: "passive_bat_charge_permille",
        min: 0,
        max: 1100,
        default: 1100,
    },
    Setting {
        addr: reg::PASSIVE_BAT_DISCHARGE,
        name: "passive_bat_discharge_permille",
        min: 0,
        max: 1100,
        default: 1100,
    },
    Setting {
        addr: reg::ON_GRID_DIS_DEPTH,
        name: "on_grid_discharge_depth_pct",
        min: 5,
        max: 100,
        default: 20,
    },
    Setting {
        addr: 0x3645,
        name: "off_grid_discharge_depth_pct",
        min: 5,
        max: 100,
        default: 10,
    },
    Setting {
        addr: reg::CHARGE_DEPTH,
        name: "charge_depth_pct",
        min: 20,
        max: 100,
        default: 100,
    },
    Setting {
        addr: reg::APP_MODE,
        name: "app_mode",
        min: 0,
        max: 14,
        default: 14,
    },
    Setting {
        addr: reg::BAT_CHARGE_LIMIT,
        name: "bat_charge_limit_permille",
        min: 0,
        max: 1100,
        default: 1100,
    },
    Setting {
        addr: reg::BAT_DISCHARGE_LIMIT,
        name: "bat_discharge_limit_permille",
        min: 0,
        max: 1100,
        default: 1100,
    },
    Setting {
        addr: reg::GRID_IMPORT_LIMIT,
        name: "grid_import_limit_permille",
        min: 0,
        max: 1100,
        default: 1100,
    },
    Setting {
        addr: reg::GRID_EXPORT_LIMIT,
        name: "grid_export_limit_permille",
        min: 0,
        max: 1100,
        default: 1100,
    },
    Setting {
        addr: reg::BACKUP_RESERVE_SOC,
        name: "backup_reserve_soc_pct",
        min: 20,
        max: 100,
        default: 100,
    },
    Setting {
        addr: reg::ANTI_REFLUX_POWER,
        name: "anti_reflux_power_permille",
        min: 0,
        max: 1100,
        default: 0,
    },
    Setting {
        addr: reg::ANTI_REFLUX_CURRENT,
        name: "anti_reflux_current_centiamp",
        min: 0,
        max: 3000,
        default: 0,
    },
    Setting {
        addr: reg::ANTI_REFLUX_MODE,
        name: "anti_reflux_mode",
        min: 0,
        max: 3,
        default: 0,
    },
    Setting {
        addr: 0x365F,
        name: "time_except",
        min: 0,
        max: 1,
        default: 0,
    },
    Setting {
        addr: 0x3660,
        name: "time_bat_discharge",
        min: 0,
        max: 1,
        default: 0,
    },
];

pub fn setting(addr: u16) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.addr == addr)
}

/// `AppMode` values (`0x3647`, read back at `0x4022`).
pub mod app_mode {
    pub const SELF_USE: u16 = 0;
    pub const TIME_OF_USE: u16 = 1;
    pub const BACKUP: u16 = 2;
    pub const PASSIVE: u16 = 3;
    /// Factory default ("old mode"); behaves as self-use.
    pub const OLD: u16 = 14;
}

/// `Passive_charge_enable` (`0x3636`) on H2: 0 standby, 1 discharge, 2 charge.
/// (The 2020 H1 protocol has 1 and 2 the other way round.)
pub mod passive {
    pub const STANDBY: u16 = 0;
    pub const DISCHARGE: u16 = 1;
    pub const CHARGE: u16 = 2;
}

/// Value = raw × 10^exp, the vendor's "ratio" column.
pub fn scaled(raw: f64, exp: i32) -> f64 {
    raw * 10f64.powi(exp)
}

fn u32_at(words: &[u16], i: usize) -> u32 {
    (u32::from(words[i]) << 16) | u32::from(words[i + 1])
}

fn i16_at(words: &[u16], i: usize) -> f64 {
    f64::from(words[i] as i16)
}

fn u16_at(words: &[u16], i: usize) -> f64 {
    f64::from(words[i])
}

/// The inverter's clock (`0x4000`, 4 registers): `yyyy MM dd HH mm ss zz`.
pub fn decode_clock(words: &[u16]) -> Option<NaiveDateTime> {
    if words.len() < 4 {
        return None;
    }
    let year = i32::from(words[0]);
    let [month, day] = hi_lo(words[1]);
    let [hour, minute] = hi_lo(words[2]);
    let [second, _] = hi_lo(words[3]);
    NaiveDate::from_ymd_opt(year, month, day)?.and_hms_opt(hour, minute, second)
}

fn hi_lo(w: u16) -> [u32; 2] {
    [u32::from(w >> 8), u32::from(w & 0xFF)]
}

/// Encode a clock value the way `decode_clock` reads it (for the simulator and `0x8020`).
pub fn encode_clock(t: NaiveDateTime) -> [u16; 4] {
    use chrono::{Datelike, Timelike};
    [
        t.year().clamp(0, 0xFFFF) as u16,
        ((t.month() as u16) << 8) | t.day() as u16,
        ((t.hour() as u16) << 8) | t.minute() as u16,
        (t.second() as u16) << 8,
    ]
}

pub fn decode_state(raw: u16) -> Option<WorkingState> {
    Some(match raw {
        0 => WorkingState::Init,
        1 => WorkingState::Waiting,
        2 => WorkingState::Running,
        3 => WorkingState::OffGrid,
        4 => WorkingState::OnGrid,
        5 => WorkingState::Fault,
        6 => WorkingState::Update,
        7 => WorkingState::Test,
        8 => WorkingState::SelfCheck,
        9 => WorkingState::Reset,
        _ => return None,
    })
}

use Severity::{Fault as F, Warning as W};

/// `HFaultMSG` (`0x4005`), display board / slave controller, bit → name.
/// Every fault and warning the three fault words can report.
pub fn fault_flags() -> impl Iterator<Item = (&'static str, Severity)> {
    H_FAULT_BITS
        .iter()
        .chain(M_FAULT_BITS.iter())
        .chain(M_FAULT2_BITS.iter())
        .flatten()
        .copied()
}

pub const H_FAULT_BITS: [Option<(&str, Severity)>; 32] = [
    Some(("lost_com_h_m", F)),
    Some(("meter_lost", W)),
    Some(("hmi_eeprom", F)),
    Some(("hmi_rtc", F)),
    Some(("bms_device_error", F)),
    Some(("bms_lost_communication", W)),
    None,
    None,
    None,
    None,
    None,
    Some(("r_phase_voltage_high", W)),
    Some(("r_phase_voltage_low", W)),
    Some(("s_phase_voltage_high", W)),
    Some(("s_phase_voltage_low", W)),
    Some(("t_phase_voltage_high", W)),
    Some(("t_phase_voltage_low", W)),
    Some(("grid_frequency_high", W)),
    Some(("grid_frequency_low", W)),
    None,
    None,
    None,
    None,
    Some(("no_grid", W)),
    Some(("pv_input_mode_fault", F)),
    Some(("hw_pv_current_high", F)),
    Some(("pv_voltage_high", F)),
    Some(("hw_bus_voltage_high", F)),
    None,
    None,
    None,
    None,
];

/// `MFaultMSG` (`0x4007`), master controller.
pub const M_FAULT_BITS: [Option<(&str, Severity)>; 32] = [
    Some(("bus_voltage_high", F)),
    Some(("bus_voltage_low", F)),
    Some(("grid_phase_error", F)),
    Some(("pv_voltage_high", F)),
    Some(("islanding", F)),
    None,
    Some(("pv_input_error", F)),
    Some(("dsp_pc_comm_lost", F)),
    Some(("hw_bus_voltage_high", F)),
    Some(("hw_pv_current_high", F)),
    None,
    Some(("hw_inverter_current_high", F)),
    None,
    None,
    Some(("grid_n_e_voltage", F)),
    Some(("drm0", W)),
    Some(("fan1", F)),
    Some(("fan2", F)),
    Some(("fan3", F)),
    Some(("fan4", F)),
    Some(("arc", F)),
    Some(("sw_pv_current_high", F)),
    Some(("battery_voltage_high", F)),
    Some(("battery_current_high", F)),
    Some(("battery_charge_voltage_high", F)),
    Some(("battery_overload", F)),
    Some(("battery_soft_connect_timeout", F)),
    Some(("output_overload", F)),
    Some(("battery_open_circuit", F)),
    Some(("battery_discharge_voltage_low", F)),
    Some(("authority_expired", F)),
    Some(("lost_comm_d_c", F)),
];

/// `MFaultMSG2` (`0x4009`), master controller 2.
pub const M_FAULT2_BITS: [Option<(&str, Severity)>; 32] = [
    Some(("relay", F)),
    Some(("eeprom", F)),
    Some(("temperature_high", F)),
    Some(("temperature_low", F)),
    Some(("comm_master_slave", F)),
    Some(("gfci_device", F)),
    Some(("dci_device", F)),
    Some(("current_sensor", F)),
    Some(("phase1_voltage_high", W)),
    Some(("phase1_voltage_low", W)),
    Some(("phase2_voltage_high", W)),
    Some(("phase2_voltage_low", W)),
    Some(("phase3_voltage_high", W)),
    Some(("phase3_voltage_low", W)),
    Some(("avg_overvoltage_10min", W)),
    Some(("off_grid_voltage_low", F)),
    None,
    Some(("grid_frequency_high", W)),
    Some(("grid_frequency_low", W)),
    None,
    Some(("phase1_dc_voltage", F)),
    Some(("phase2_dc_voltage", F)),
    Some(("phase3_dc_voltage", F)),
    Some(("no_grid", W)),
    None,
    None,
    Some(("gfci", F)),
    Some(("phase1_dci", F)),
    Some(("phase2_dci", F)),
    Some(("phase3_dci", F)),
    Some(("iso", F)),
    Some(("bus_voltage_balance", F)),
];

/// Named faults for the three fault words; undocumented bits are reported by number.
pub fn decode_faults(h: u32, m: u32, m2: u32) -> Vec<FaultFlag> {
    const UNKNOWN: [[&str; 32]; 3] = unknown_names();
    let mut out = Vec::new();
    for (word_idx, (word, table)) in [(h, &H_FAULT_BITS), (m, &M_FAULT_BITS), (m2, &M_FAULT2_BITS)]
        .into_iter()
        .enumerate()
    {
        for (bit, entry) in table.iter().enumerate() {
            if word & (1 << bit) == 0 {
                continue;
            }
            out.push(match entry {
                Some((name, severity)) => FaultFlag {
                    name,
                    severity: *severity,
                },
                None => FaultFlag {
                    name: UNKNOWN[word_idx][bit],
                    severity: Severity::Warning,
                },
            });
        }
    }
    out
}

const fn unknown_names() -> [[&'static str; 32]; 3] {
    macro_rules! bits {
        ($p:literal) => {
            [
                concat!($p, "_bit0"),
                concat!($p, "_bit1"),
                concat!($p, "_bit2"),
                concat!($p, "_bit3"),
                concat!($p, "_bit4"),
                concat!($p, "_bit5"),
                concat!($p, "_bit6"),
                concat!($p, "_bit7"),
                concat!($p, "_bit8"),
                concat!($p, "_bit9"),
                concat!($p, "_bit10"),
                concat!($p, "_bit11"),
                concat!($p, "_bit12"),
                concat!($p, "_bit13"),
                concat!($p, "_bit14"),
                concat!($p, "_bit15"),
                concat!($p, "_bit16"),
                concat!($p, "_bit17"),
                concat!($p, "_bit18"),
                concat!($p, "_bit19"),
                concat!($p, "_bit20"),
                concat!($p, "_bit21"),
                concat!($p, "_bit22"),
                concat!($p, "_bit23"),
                concat!($p, "_bit24"),
                concat!($p, "_bit25"),
                concat!($p, "_bit26"),
                concat!($p, "_bit27"),
                concat!($p, "_bit28"),
                concat!($p, "_bit29"),
                concat!($p, "_bit30"),
                concat!($p, "_bit31"),
            ]
        };
    }
    [bits!("h_fault"), bits!("m_fault"), bits!("m_fault2")]
}

/// What the driver needs to know about the unit to decode it.
#[derive(Debug, Clone)]
pub struct Nameplate {
    pub rated_power_w: f64,
    /// Phases the unit feeds; a single-phase unit reports on its R fields.
    pub phases: Vec<Phase>,
}

/// Power totals from the [`TOTALS`] block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Totals {
    pub pv_power_w: f64,
    /// + discharge (documented for `0x40A6`).
    pub battery_power_w: f64,
    /// + delivered.
    pub ac_power_w: f64,
}

/// Allow headroom over the rating: firmware briefly overshoots, and some units are rated
/// in VA with a higher W ceiling. Beyond twice the rating the words are garbage.
fn power_ceiling(plate: &Nameplate) -> f64 {
    plate.rated_power_w * 2.0 + 1000.0
}

pub fn decode_totals(plate: &Nameplate, totals: &[u16]) -> Result<Totals, DecodeError> {
    expect_len(totals, TOTALS.count as usize)?;
    let tot = |addr: u16| (addr - TOTALS.start) as usize;
    let p_max = power_ceiling(plate);
    Ok(Totals {
        pv_power_w: plausible("pv_power_w", i16_at(totals, tot(reg::TOTAL_PV)), 0.0, p_max)?,
        battery_power_w: plausible(
            "battery_power_w",
            i16_at(totals, tot(reg::TOTAL_BATTERY)),
            -p_max,
            p_max,
        )?,
        ac_power_w: plausible(
            "ac_power_w",
            i16_at(totals, tot(reg::TOTAL_INV)),
            -p_max,
            p_max,
        )?,
    })
}

impl InverterReading {
    /// Bring a reading up to date with fresh totals between real-time block reads: the
    /// per-phase output follows the total, spread evenly over the unit's phases.
    pub fn refresh(&mut self, t: Totals) {
        self.ac_power_w = t.ac_power_w;
        self.pv_power_w = t.pv_power_w;
        self.battery_power_w = t.battery_power_w;
        let n = self.phases.len().max(1) as f64;
        for p in &mut self.phases {
            p.power_w = t.ac_power_w / n;
            p.current_a = if p.voltage_v > 1.0 {
                p.power_w / p.voltage_v
            } else {
                0.0
            };
        }
    }
}

/// Decode the real-time block ([`REALTIME`]) and the totals block ([`TOTALS`]).
pub fn decode_realtime(
    plate: &Nameplate,
    realtime: &[u16],
    totals: &[u16],
) -> Result<InverterReading, DecodeError> {
    expect_len(realtime, REALTIME.count as usize)?;
    let totals = decode_totals(plate, totals)?;
    let rt = |addr: u16| (addr - REALTIME.start) as usize;

    let state_raw = realtime[rt(reg::MPV_MODE)];
    let state = decode_state(state_raw).ok_or(DecodeError::Implausible {
        field: "working_state",
        value: f64::from(state_raw),
    })?;
    let faults = decode_faults(
        u32_at(realtime, rt(reg::H_FAULT)),
        u32_at(realtime, rt(reg::M_FAULT)),
        u32_at(realtime, rt(reg::M_FAULT2)),
    );
    let app_mode = realtime[rt(reg::SET_APP_MODE)];

    let p_max = power_ceiling(plate);
    let mut phases = Vec::with_capacity(plate.phases.len());
    let blocks = [reg::R_GRID, reg::S_GRID, reg::T_GRID];
    for (phase, base) in plate.phases.iter().zip(blocks) {
        let i = rt(base);
        let voltage_v = plausible(
            "grid_voltage_v",
            scaled(u16_at(realtime, i), -1),
            0.0,
            500.0,
        )?;
        let current_a = plausible(
            "grid_current_a",
            scaled(i16_at(realtime, i + 1), -2),
            -300.0,
            300.0,
        )?;
        let power_w = plausible("grid_port_power_w", i16_at(realtime, i + 4), -p_max, p_max)?;
        phases.push(PhaseAc {
            phase: *phase,
            voltage_v,
            current_a,
            power_w,
        });
    }
    let frequency_hz = scaled(u16_at(realtime, rt(reg::R_GRID) + 2), -2);
    if frequency_hz != 0.0 {
        plausible("grid_frequency_hz", frequency_hz, 40.0, 70.0)?;
    }
    let battery_voltage_v = plausible(
        "battery_voltage_v",
        scaled(u16_at(realtime, rt(reg::BAT_VOLT)), -1),
        0.0,
        1000.0,
    )?;
    let battery_current_a = plausible(
        "battery_current_a",
        scaled(i16_at(realtime, rt(reg::BAT_CURR)), -2),
        -300.0,
        300.0,
    )?;
    let soc_pct = plausible(
        "soc_pct",
        scaled(u16_at(realtime, rt(reg::BAT_SOC)), -2),
        0.0,
        100.0,
    )?;

    Ok(InverterReading {
        state,
        faults,
        phases,
        ac_power_w: totals.ac_power_w,
        pv_power_w: totals.pv_power_w,
        battery_power_w: totals.battery_power_w,
        battery_voltage_v,
        battery_current_a,
        soc_pct,
        frequency_hz,
        app_mode,
    })
}

/// Type code and serial number from the identity block.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub device_type: u16,
    pub serial: String,
}

pub fn decode_identity(words: &[u16]) -> Result<Identity, DecodeError> {
    expect_len(words, IDENTITY.count as usize)?;
    let sn_at = (reg::SERIAL - IDENTITY.start) as usize;
    let bytes: Vec<u8> = words[sn_at..sn_at + 10]
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .take_while(|&b| b != 0)
        .collect();
    let serial = String::from_utf8_lossy(&bytes).trim().to_string();
    Ok(Identity {
        device_type: words[0],
        serial,
    })
}

/// Power as per-mille of the unit's rating, the encoding of `0x3637…0x365A`; clamped to
/// `0..=max_permille` so no negative or over-range value can reach a U16 register.
pub fn watts_to_permille(power_w: f64, rated_power_w: f64, max_permille: u16) -> u16 {
    if !(power_w.is_finite() && rated_power_w > 0.0) {
        return 0;
    }
    let permille = (power_w / rated_power_w * 1000.0).round();
    permille.clamp(0.0, f64::from(max_permille)) as u16
}

pub use super::Command;

/// Registers the EMS takes over while it controls a unit, and gives back on shutdown.
pub const CONTROLLED: [u16; 6] = [
    reg::PASSIVE_ENABLE,
    reg::PASSIVE_BAT_CHARGE,
    reg::PASSIVE_BAT_DISCHARGE,
    reg::APP_MODE,
    reg::ANTI_REFLUX_MODE,
    reg::ANTI_REFLUX_POWER,
];

/// The block read once before taking a unit over, to learn what to restore.
/// It starts at `0x3635`: without anti-reflux on there, `0x365A` does not act at all.
pub const CONTROL_BLOCK: ReadBlock = ReadBlock::holding(
    reg::PREVENT_REVERSE_FLOW,
    reg::ANTI_REFLUX_MODE - reg::PREVENT_REVERSE_FLOW + 1,
);

/// Per-mille of rating the power registers are allowed: the unit's rating, although the
/// registers accept up to 1100.
const RATED_PERMILLE: f64 = 1000.0;

/// Bring a requested register value into the register's documented range (all settings
/// are U16). Out-of-range and non-finite requests are clamped and logged, never wrapped.
pub fn clamp_setting(s: &Setting, requested: f64) -> u16 {
    let value = if requested.is_finite() {
        requested.round()
    } else {
        f64::from(s.min)
    };
    let clamped = value.clamp(f64::from(s.min), f64::from(s.max));
    if clamped != value || !requested.is_finite() {
        tracing::warn!(
            register = format!("{:#06x}", s.addr),
            name = s.name,
            requested,
            written = clamped,
            "setpoint out of range; clamped"
        );
    }
    clamped as u16
}

fn clamped(addr: u16, requested: f64) -> (u16, u16) {
    match setting(addr) {
        Some(s) => (addr, clamp_setting(s, requested)),
        // Every address encoded below is in SETTINGS; refuse to guess a range otherwise.
        None => (addr, 0),
    }
}

/// The register values that put a unit under passive control at `cmd`, clamped to its
/// rating and to each register's range. Passive mode (AppMode 3) takes the battery power as
/// a direction (`0x3636`) and a per-mille magnitude (`0x3639` charge / `0x363A` discharge);
/// the anti-reflux registers (`0x365C` mode 1, `0x365A` per-mille) cap the unit's output.
///
/// Where `0x365A` is measured — the unit's output or the site meter the unit reads — the map
/// does not say. Every value the EMS leaves behind is chosen to be safe under both readings:
/// a stop's cap is the unit's share of the export limit (see `control::stop_caps`), which
/// holds the sum of outputs within the limit under the first and the site's export under
/// the second. `0x365A` acts only with `0x3635` ≠ 0, which the EMS reads but never writes.
pub fn encode_command(rated_power_w: f64, cmd: &Command) -> Vec<(u16, u16)> {
    let permille = |w: f64| {
        if rated_power_w > 0.0 && w.is_finite() {
            (w / rated_power_w * 1000.0).clamp(-RATED_PERMILLE, RATED_PERMILLE)
        } else {
            f64::NAN
        }
    };
    let battery = permille(cmd.battery_w);
    let mut out = Vec::with_capacity(6);
    if battery >= 0.5 {
        out.push(clamped(reg::PASSIVE_BAT_DISCHARGE, battery));
        out.push(clamped(reg::PASSIVE_ENABLE, f64::from(passive::DISCHARGE)));
    } else if battery <= -0.5 {
        out.push(clamped(reg::PASSIVE_BAT_CHARGE, -battery));
        out.push(clamped(reg::PASSIVE_ENABLE, f64::from(passive::CHARGE)));
    } else {
        out.push(clamped(reg::PASSIVE_ENABLE, f64::from(passive::STANDBY)));
    }
    out.push(clamped(reg::APP_MODE, f64::from(app_mode::PASSIVE)));
    out.push(clamped(reg::ANTI_REFLUX_MODE, 1.0));
    // Round the cap down: a cap is a safety limit.
    out.push(clamped(
        reg::ANTI_REFLUX_POWER,
        permille(cmd.output_cap_w).floor(),
    ));
    out
}

pub fn permille_to_watts(permille: u16, rated_power_w: f64) -> f64 {
    f64::from(permille) / 1000.0 * rated_power_w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plate3() -> Nameplate {
        Nameplate {
            rated_power_w: 10_000.0,
            phases: Phase::ALL.to_vec(),
        }
    }

    fn blank() -> (Vec<u16>, Vec<u16>) {
        let mut rt = vec![0u16; REALTIME.count as usize];
        rt[(reg::MPV_MODE - REALTIME.start) as usize] = 2;
        (rt, vec![0u16; TOTALS.count as usize])
    }

    fn put(words: &mut [u16], block: ReadBlock, addr: u16, v: u16) {
        words[(addr - block.start) as usize] = v;
    }

    #[test]
    fn ratio_column_is_a_power_of_ten() {
        // SAJ's Modbus protocol document: PV1Volt raw 3005 with ratio -1 is 300.5 V.
        assert!((scaled(3005.0, -1) - 300.5).abs() < 1e-9);
    }

    #[test]
    fn clock_matches_the_reference_example() {
        // SAJ's Modbus protocol document: 07DF 01 02 0A 0B 0C 00 = 2015-01-02 10:11:12.
        let t = decode_clock(&[0x07DF, 0x0102, 0x0A0B, 0x0C00]).unwrap();
        assert_eq!(t.to_string(), "2015-01-02 10:11:12");
        assert_eq!(encode_clock(t), [0x07DF, 0x0102, 0x0A0B, 0x0C00]);
    }

    #[test]
    fn documented_signs_battery_plus_discharge() {
        // 0x40A6: "> 0 discharging, < 0 charging".
        let (mut rt, mut tot) = blank();
        put(&mut tot, TOTALS, reg::TOTAL_BATTERY, 4000);
        let r = decode_realtime(&plate3(), &rt, &tot).unwrap();
        assert_eq!(r.battery_power_w, 4000.0);
        put(&mut tot, TOTALS, reg::TOTAL_BATTERY, (-4000i16) as u16); // 0xF060
        assert_eq!(tot[1], 0xF060);
        let r = decode_realtime(&plate3(), &rt, &tot).unwrap();
        assert_eq!(r.battery_power_w, -4000.0);
        // SOC 0x406F is ×0.01 %: 5123 → 51.23 %.
        put(&mut rt, REALTIME, reg::BAT_SOC, 5123);
        let r = decode_realtime(&plate3(), &rt, &tot).unwrap();
        assert!((r.soc_pct - 51.23).abs() < 1e-9);
    }

    #[test]
    fn per_phase_grid_port_scales() {
        let (mut rt, tot) = blank();
        // 0x4038 S phase: 2301 ×0.1 V, current -1234 ×0.01 A, 5000 ×0.01 Hz, P -2840 W.
        put(&mut rt, REALTIME, 0x4038, 2301);
        put(&mut rt, REALTIME, 0x4039, (-1234i16) as u16);
        put(&mut rt, REALTIME, 0x403A, 5000);
        put(&mut rt, REALTIME, 0x403C, (-2840i16) as u16);
        put(&mut rt, REALTIME, 0x4033, 5001);
        let r = decode_realtime(&plate3(), &rt, &tot).unwrap();
        assert_eq!(r.phases[1].phase, Phase::L2);
        assert!((r.phases[1].voltage_v - 230.1).abs() < 1e-9);
        assert!((r.phases[1].current_a + 12.34).abs() < 1e-9);
        assert_eq!(r.phases[1].power_w, -2840.0);
        assert!((r.frequency_hz - 50.01).abs() < 1e-9);
    }

    #[test]
    fn single_phase_unit_reports_on_its_own_phase() {
        let plate = Nameplate {
            rated_power_w: 5000.0,
            phases: vec![Phase::L3],
        };
        let (mut rt, tot) = blank();
        put(&mut rt, REALTIME, 0x4035, 1500);
        let r = decode_realtime(&plate, &rt, &tot).unwrap();
        assert_eq!(r.phases.len(), 1);
        assert_eq!(r.phases[0].phase, Phase::L3);
        assert_eq!(r.phases[0].power_w, 1500.0);
    }

    #[test]
    fn fault_bits_decode_to_names() {
        // HFaultMSG bit 1 = meter lost; MFaultMSG bit 22 = battery voltage high.
        let (mut rt, tot) = blank();
        put(&mut rt, REALTIME, 0x4005, 0x0000);
        put(&mut rt, REALTIME, 0x4006, 0x0002);
        put(&mut rt, REALTIME, 0x4007, 0x0040);
        put(&mut rt, REALTIME, 0x4008, 0x0000);
        let r = decode_realtime(&plate3(), &rt, &tot).unwrap();
        let names: Vec<_> = r.faults.iter().map(|f| f.name).collect();
        assert_eq!(names, vec!["meter_lost", "battery_voltage_high"]);
        assert!(r.has_fault());
    }

    #[test]
    fn working_state_fault_is_a_fault_and_garbage_is_rejected() {
        let (mut rt, tot) = blank();
        put(&mut rt, REALTIME, reg::MPV_MODE, 5);
        assert!(decode_realtime(&plate3(), &rt, &tot).unwrap().has_fault());
        put(&mut rt, REALTIME, reg::MPV_MODE, 0xFFFF);
        assert!(decode_realtime(&plate3(), &rt, &tot).is_err());
        put(&mut rt, REALTIME, reg::MPV_MODE, 2);
        put(&mut rt, REALTIME, reg::BAT_SOC, 0xFFFF);
        assert!(matches!(
            decode_realtime(&plate3(), &rt, &tot),
            Err(DecodeError::Implausible {
                field: "soc_pct",
                ..
            })
        ));
        assert!(matches!(
            decode_realtime(&plate3(), &rt[..10], &tot),
            Err(DecodeError::Length { .. })
        ));
    }

    #[test]
    fn identity_serial_is_ascii_until_nul() {
        let mut w = vec![0u16; 29];
        w[0] = 0x005A;
        w[3] = u16::from_be_bytes(*b"H2");
        w[4] = u16::from_be_bytes(*b"01");
        let id = decode_identity(&w).unwrap();
        assert_eq!(id.device_type, 0x005A);
        assert_eq!(id.serial, "H201");
    }

    #[test]
    fn commands_encode_within_rating_and_register_range() {
        let value = |w: &[(u16, u16)], a: u16| w.iter().find(|(r, _)| *r == a).map(|(_, v)| *v);
        let w = encode_command(
            10_000.0,
            &Command {
                battery_w: 2500.0,
                output_cap_w: 6000.0,
            },
        );
        assert_eq!(value(&w, reg::PASSIVE_BAT_DISCHARGE), Some(250));
        assert_eq!(value(&w, reg::PASSIVE_ENABLE), Some(passive::DISCHARGE));
        assert_eq!(value(&w, reg::APP_MODE), Some(app_mode::PASSIVE));
        assert_eq!(value(&w, reg::ANTI_REFLUX_MODE), Some(1));
        assert_eq!(value(&w, reg::ANTI_REFLUX_POWER), Some(600));

        let w = encode_command(
            10_000.0,
            &Command {
                battery_w: -1.0e9,
                output_cap_w: -5000.0,
            },
        );
        assert_eq!(
            value(&w, reg::PASSIVE_BAT_CHARGE),
            Some(1000),
            "charge clamped to rating"
        );
        assert_eq!(value(&w, reg::PASSIVE_ENABLE), Some(passive::CHARGE));
        assert_eq!(
            value(&w, reg::ANTI_REFLUX_POWER),
            Some(0),
            "negative cap clamped, not wrapped"
        );

        let w = encode_command(
            10_000.0,
            &Command {
                battery_w: f64::NAN,
                output_cap_w: f64::INFINITY,
            },
        );
        assert_eq!(value(&w, reg::PASSIVE_ENABLE), Some(passive::STANDBY));
        assert!(value(&w, reg::ANTI_REFLUX_POWER).unwrap() <= 1000);
        for (addr, v) in w {
            let s = setting(addr).unwrap();
            assert!((s.min..=s.max).contains(&v));
        }
    }

    #[test]
    fn permille_never_wraps() {
        // "500 = 50 % of inverter max power (e.g. 4000 W for 8 kW inverter)".
        assert_eq!(watts_to_permille(4000.0, 8000.0, 1100), 500);
        assert_eq!(watts_to_permille(-100.0, 8000.0, 1100), 0);
        assert_eq!(watts_to_permille(1e9, 8000.0, 1100), 1100);
        assert_eq!(watts_to_permille(f64::NAN, 8000.0, 1100), 0);
    }
}
