//! Simulated SunSpec devices: a PV (or PV + storage) inverter and a meter, served from the
//! same model tables the driver decodes with, plus firmware behaviour for the controls —
//! 704 and 123 limits, 124 storage rates, and their revert timers.
//!
//! Points the simulated device does not measure are served as "not implemented", so any
//! SunSpec client reads the map as it would a real device's.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use tokio_modbus::ExceptionCode;

use super::physics::{SimInverter, SiteModel};
use super::registers::Image;
use crate::config::{MeterRole, Phase};
use crate::drivers::sunspec::points::{encode_str, ModelDef, Ty};
use crate::drivers::sunspec::{self, models, ModelLoc};

/// Where the simulated maps start.
pub const BASE: u16 = 40000;

/// Scale factors the simulated devices report (varied on purpose, so a client that ignores
/// them reads wrong values). Any other scale factor is not implemented, nor its points.
const SCALES: &[(&str, i16)] = &[
    ("A_SF", -2),
    ("V_SF", -1),
    ("W_SF", 0),
    ("Hz_SF", -2),
    ("VA_SF", 0),
    ("VAr_SF", 0),
    ("PF_SF", -2),
    ("WH_SF", 0),
    ("DCA_SF", -2),
    ("DCV_SF", -1),
    ("DCW_SF", 0),
    ("Tmp_SF", -1),
    ("WRtg_SF", 0),
    ("VARtg_SF", 0),
    ("VArRtg_SF", 0),
    ("ARtg_SF", -1),
    ("PFRtg_SF", -2),
    ("WMax_SF", 0),
    ("VRef_SF", 0),
    ("VRefOfs_SF", 0),
    ("WMaxLimPct_SF", -1),
    ("OutPFSet_SF", -3),
    ("WChaMax_SF", 0),
    ("WChaDisChaGra_SF", 0),
    ("ChaState_SF", -1),
    ("InOutWRte_SF", -2),
    ("TotWh_SF", 0),
];

fn scale(name: &str) -> Option<i16> {
    SCALES.iter().find(|(n, _)| *n == name).map(|&(_, s)| s)
}

/// The models a simulated inverter serves, in order.
fn inverter_models(inv: &SimInverter) -> Vec<&'static ModelDef> {
    let mut m = vec![
        &models::COMMON,
        if inv.phases.len() == 3 {
            &models::INVERTER_3PH
        } else {
            &models::INVERTER_1PH
        },
        &models::NAMEPLATE,
        &models::SETTINGS,
        &models::CONTROLS,
        &models::DER_AC_CONTROLS,
    ];
    if inv.battery.capacity_wh > 0.0 {
        m.push(&models::STORAGE);
    }
    m
}

/// Model locations for `defs` laid out from [`BASE`].
fn layout(defs: &[&'static ModelDef]) -> Vec<ModelLoc> {
    let mut at = BASE + 2;
    defs.iter()
        .map(|d| {
            let loc = ModelLoc {
                id: d.id,
                start: at,
                len: d.len,
            };
            at += d.size();
            loc
        })
        .collect()
}

/// A simulated SunSpec inverter's control state: the writable points as written, and when
/// each revert timer started.
#[derive(Debug, Clone, Default)]
pub struct SimSunSpec {
    pub layout: Vec<ModelLoc>,
    /// Writable registers by absolute address, as last written.
    pub regs: BTreeMap<u16, u16>,
    limit_written_at: Option<DateTime<Utc>>,
    storage_written_at: Option<DateTime<Utc>>,
}

impl SimSunSpec {
    pub fn for_inverter(inv: &SimInverter) -> SimSunSpec {
        SimSunSpec {
            layout: layout(&inverter_models(inv)),
            ..SimSunSpec::default()
        }
    }

    fn addr(&self, model: u16, point: &str) -> Option<(u16, Ty)> {
        let loc = self.layout.iter().find(|l| l.id == model)?;
        let p = sunspec::def_for(model)?.point(point)?;
        Some((loc.addr(p.offset), p.ty))
    }

    /// A written point's raw value.
    fn raw(&self, model: u16, point: &str) -> Option<f64> {
        let (a, ty) = self.addr(model, point)?;
        let words: Option<Vec<u16>> = (0..ty.size())
            .map(|k| self.regs.get(&(a + k)).copied())
            .collect();
        let words = words?;
        Some(match ty {
            Ty::I16 => f64::from(words[0] as i16),
            Ty::U32 => f64::from((u32::from(words[0]) << 16) | u32::from(words[1])),
            _ => f64::from(words[0]),
        })
    }

    fn set(&mut self, model: u16, point: &str, raw: f64) {
        if let Some((a, ty)) = self.addr(model, point) {
            for (k, w) in ty.encode(raw).into_iter().enumerate() {
                self.regs.insert(a + k as u16, w);
            }
        }
    }

    fn scaled(&self, model: u16, point: &str, sf: &str) -> Option<f64> {
        Some(self.raw(model, point)? * 10f64.powi(i32::from(scale(sf)?)))
    }

    /// The output cap the controls hold, W: the tighter of an enabled 704 and 123 limit.
    pub fn cap_w(&self, wmax_w: f64) -> f64 {
        let mut cap = wmax_w;
        if self.raw(704, "WMaxLimPctEna") == Some(1.0) {
            if let Some(p) = self.scaled(704, "WMaxLimPct", "WMaxLimPct_SF") {
                cap = cap.min(p / 100.0 * wmax_w);
            }
        }
        if self.raw(123, "WMaxLim_Ena") == Some(1.0) {
            if let Some(p) = self.scaled(123, "WMaxLimPct", "WMaxLimPct_SF") {
                cap = cap.min(p / 100.0 * wmax_w);
            }
        }
        cap.max(0.0)
    }

    /// The battery window 124 allows around the unit's own choice: (lowest, highest) battery
    /// power, + discharge. `None`: no limits in force.
    pub fn storage_window_w(&self, wcha_max_w: f64) -> Option<(f64, f64)> {
        let mode = self.raw(124, "StorCtl_Mod")? as u16;
        let pct = |p: &str| self.scaled(124, p, "InOutWRte_SF").unwrap_or(100.0);
        let lo = if mode & 1 != 0 {
            -pct("InWRte") / 100.0 * wcha_max_w
        } else {
            f64::NEG_INFINITY
        };
        let hi = if mode & 2 != 0 {
            pct("OutWRte") / 100.0 * wcha_max_w
        } else {
            f64::INFINITY
        };
        (mode & 3 != 0).then_some((lo, hi))
    }

    /// Accept a write to a writable point, as firmware would: a read-only or unknown
    /// register is "illegal data address"; a percentage above 100 is "illegal data value".
    pub fn write(
        &mut self,
        addr: u16,
        value: u16,
        now: DateTime<Utc>,
    ) -> Result<(), ExceptionCode> {
        let (loc, p) = self
            .layout
            .iter()
            .find_map(|l| {
                let def = sunspec::def_for(l.id)?;
                let off = addr.checked_sub(l.start)?;
                let p = def
                    .points
                    .iter()
                    .find(|p| off >= p.offset && off < p.offset + p.ty.size())?;
                Some((*l, p))
            })
            .ok_or(ExceptionCode::IllegalDataAddress)?;
        let writable = matches!(
            (loc.id, p.name),
            (121, "WMax")
                | (
                    123,
                    "WMaxLimPct"
                        | "WMaxLimPct_WinTms"
                        | "WMaxLimPct_RvrtTms"
                        | "WMaxLimPct_RmpTms"
                        | "WMaxLim_Ena"
                )
                | (
                    704,
                    "WMaxLimPctEna"
                        | "WMaxLimPct"
                        | "WMaxLimPctRvrt"
                        | "WMaxLimPctEnaRvrt"
                        | "WMaxLimPctRvrtTms"
                )
                | (
                    124,
                    "StorCtl_Mod"
                        | "OutWRte"
                        | "InWRte"
                        | "InOutWRte_WinTms"
                        | "InOutWRte_RvrtTms"
                        | "InOutWRte_RmpTms"
                        | "ChaGriSet"
                )
        );
        if !writable {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        if p.name.starts_with("WMaxLimPct") && p.ty == Ty::U16 && !p.name.ends_with("Tms") {
            let max = 100.0 / 10f64.powi(i32::from(scale("WMaxLimPct_SF").unwrap_or(0)));
            if f64::from(value) > max {
                return Err(ExceptionCode::IllegalDataValue);
            }
        }
        self.regs.insert(addr, value);
        match loc.id {
            123 | 704 => self.limit_written_at = Some(now),
            124 => self.storage_written_at = Some(now),
            _ => {}
        }
        Ok(())
    }

    /// Revert timers: a limit not renewed within its time falls back — 704 to its reversion
    /// values, 123 to its default (no limit, as the standard has it), 124 to no rate limits.
    pub fn tick(&mut self, now: DateTime<Utc>) {
        let elapsed =
            |t: Option<DateTime<Utc>>| t.map(|t| (now - t).num_milliseconds() as f64 / 1000.0);
        if let Some(s) = elapsed(self.limit_written_at) {
            let rvrt704 = self.raw(704, "WMaxLimPctRvrtTms").unwrap_or(0.0);
            if rvrt704 > 0.0 && s >= rvrt704 && self.raw(704, "WMaxLimPctEna") == Some(1.0) {
                let to = self.raw(704, "WMaxLimPctRvrt").unwrap_or(1000.0);
                let ena = self.raw(704, "WMaxLimPctEnaRvrt").unwrap_or(0.0);
                self.set(704, "WMaxLimPct", to);
                self.set(704, "WMaxLimPctEna", ena);
            }
            let rvrt123 = self.raw(123, "WMaxLimPct_RvrtTms").unwrap_or(0.0);
            if rvrt123 > 0.0 && s >= rvrt123 {
                self.set(123, "WMaxLim_Ena", 0.0);
            }
        }
        if let Some(s) = elapsed(self.storage_written_at) {
            let rvrt = self.raw(124, "InOutWRte_RvrtTms").unwrap_or(0.0);
            if rvrt > 0.0 && s >= rvrt {
                self.set(124, "StorCtl_Mod", 0.0);
            }
        }
    }

    /// Seconds left before the 704 limit reverts (0 when none runs).
    fn revert_left_s(&self, now: DateTime<Utc>) -> f64 {
        let Some(t) = self.limit_written_at else {
            return 0.0;
        };
        let rvrt = self.raw(704, "WMaxLimPctRvrtTms").unwrap_or(0.0);
        let gone = (now - t).num_milliseconds() as f64 / 1000.0;
        if self.raw(704, "WMaxLimPctEna") == Some(1.0) {
            (rvrt - gone).max(0.0)
        } else {
            0.0
        }
    }
}

/// Lay `defs` out from [`BASE`] with each point's value from `value` (scaled, in the point's
/// units; `None`: not implemented) or, for a written point, as written.
fn serve(
    defs: &[&'static ModelDef],
    written: &BTreeMap<u16, u16>,
    value: impl Fn(u16, &str) -> Option<f64>,
    text: impl Fn(&str) -> Option<String>,
) -> Image {
    let mut im = Image::default();
    im.set_words(BASE, &sunspec::MARKER);
    for (def, loc) in defs.iter().zip(layout(defs)) {
        for p in def.points {
            let at = loc.addr(p.offset);
            let words = match (p.name, p.ty) {
                ("ID", _) => vec![def.id],
                ("L", _) => vec![def.len],
                (_, Ty::Str(n)) => {
                    text(p.name).map_or_else(|| vec![0; usize::from(n)], |s| encode_str(&s, n))
                }
                (_, Ty::Sunssf) => {
                    scale(p.name).map_or_else(|| p.ty.unimplemented(), |s| vec![s as u16])
                }
                _ if written.contains_key(&at) => (0..p.ty.size())
                    .map(|k| written.get(&(at + k)).copied().unwrap_or(0))
                    .collect(),
                _ => {
                    let sf = match p.sf {
                        Some(name) => scale(name).map(i32::from),
                        None => Some(0),
                    };
                    match (sf, value(def.id, p.name)) {
                        (Some(sf), Some(v)) => p.ty.encode(v / 10f64.powi(sf)),
                        _ => p.ty.unimplemented(),
                    }
                }
            };
            im.set_words(at, &words);
        }
    }
    let end = BASE + 2 + defs.iter().map(|d| d.size()).sum::<u16>();
    im.set_words(end, &[sunspec::END_ID, 0]);
    im
}

/// The registers of a simulated SunSpec inverter now.
pub fn inverter_image(m: &SiteModel, inv: &SimInverter, index: usize) -> Image {
    let Some(ss) = inv.sunspec.as_ref() else {
        return Image::default();
    };
    let defs = inverter_models(inv);
    let v = |ph: Phase| m.truth.voltage_v[ph.index()];
    let n = inv.phases.len().max(1) as f64;
    let phase_v = |k: usize| inv.phases.get(k).map(|&p| v(p));
    let phase_a = |k: usize| {
        phase_v(k).map(|volts| {
            if volts > 1.0 {
                (inv.ac_w / n / volts).abs()
            } else {
                0.0
            }
        })
    };
    let now = m.now;
    let value = |model: u16, name: &str| -> Option<f64> {
        match (model, name) {
            (101 | 103, "A") => Some((0..inv.phases.len()).filter_map(phase_a).sum()),
            (101 | 103, "AphA") => phase_a(0),
            (101 | 103, "AphB") => phase_a(1),
            (101 | 103, "AphC") => phase_a(2),
            (101 | 103, "PhVphA") => phase_v(0),
            (101 | 103, "PhVphB") => phase_v(1),
            (101 | 103, "PhVphC") => phase_v(2),
            (101 | 103, "W") => Some(inv.ac_w),
            (101 | 103, "Hz") => Some(m.frequency_hz),
            (101 | 103, "WH") => Some(inv.pv_wh.max(1.0)),
            (101 | 103, "DCW") => Some(inv.pv_w),
            (101 | 103, "DCV") => Some(if inv.pv_w > 0.0 { 600.0 } else { 0.0 }),
            (101 | 103, "TmpCab") => Some(35.0),
            (101 | 103, "St") => Some(if inv.fault_words.iter().any(|&w| w != 0) {
                7.0
            } else if inv.ac_w < ss.cap_w(inv.rated_w) - 1.0 || inv.pv_w <= 0.0 {
                if inv.pv_w <= 0.0 {
                    2.0
                } else {
                    5.0
                }
            } else {
                4.0
            }),
            (101 | 103, "Evt1" | "Evt2") => Some(0.0),
            (120, "DERTyp") => Some(if inv.battery.capacity_wh > 0.0 {
                82.0
            } else {
                4.0
            }),
            (120, "WRtg" | "VARtg") => Some(inv.rated_w),
            (120, "VArRtgQ1" | "VArRtgQ2") => Some(inv.rated_w * 0.6),
            (120, "VArRtgQ3" | "VArRtgQ4") => Some(-inv.rated_w * 0.6),
            (120, "ARtg") => Some(inv.rated_w / 230.0 / n),
            (120, "PFRtgQ1" | "PFRtgQ4") => Some(0.8),
            (120, "PFRtgQ2" | "PFRtgQ3") => Some(-0.8),
            (121, "WMax") => Some(inv.rated_w),
            (121, "VRef") => Some(m.nominal_v),
            (121, "VRefOfs") => Some(0.0),
            (123, "Conn") => Some(1.0),
            (123, "WMaxLimPct") => Some(100.0),
            (123, "WMaxLim_Ena" | "OutPFSet_Ena" | "VArPct_Ena") => Some(0.0),
            (123, "OutPFSet") => Some(1.0),
            (704, "WMaxLimPctEna" | "WMaxLimPctEnaRvrt") => Some(0.0),
            (704, "WMaxLimPct" | "WMaxLimPctRvrt") => Some(100.0),
            (704, "WMaxLimPctRvrtTms") => Some(0.0),
            (704, "WMaxLimPctRvrtRem") => Some(ss.revert_left_s(now).ceil()),
            (124, "WChaMax") => Some(inv.battery.max_charge_w),
            (124, "WChaGra" | "WDisChaGra") => Some(100.0),
            (124, "StorCtl_Mod") => Some(0.0),
            (124, "ChaState") => Some(inv.soc_pct),
            (124, "ChaSt") => Some(if inv.battery_w > 1.0 {
                3.0
            } else if inv.battery_w < -1.0 {
                4.0
            } else {
                6.0
            }),
            (124, "OutWRte" | "InWRte") => Some(100.0),
            _ => None,
        }
    };
    let text = |name: &str| match name {
        "Mn" => Some("site-ems simulator".to_string()),
        "Md" => Some(format!("SunSpec PV {:.0} W", inv.rated_w)),
        "Vr" => Some("1.0".to_string()),
        "SN" => Some(format!("SIMSS{:02}{}", index + 1, inv.id)),
        _ => None,
    };
    serve(&defs, &ss.regs, value, text)
}

/// The registers of a simulated SunSpec meter now: model 203 (or 201 on a single-phase
/// site), forward power + towards the site, as SunSpec meters count it.
pub fn meter_image(m: &SiteModel, role: MeterRole, forward_w: [f64; 3], unit: u8) -> Image {
    let three = m.phases == 3;
    let defs: Vec<&'static ModelDef> = vec![
        &models::COMMON,
        if three {
            &models::METER_3PH_WYE
        } else {
            &models::METER_1PH
        },
    ];
    let v = m.truth.voltage_v;
    let amps = |k: usize| {
        if v[k] > 1.0 {
            forward_w[k].abs() / v[k]
        } else {
            0.0
        }
    };
    let (import_wh, export_wh) = match role {
        MeterRole::Grid => (m.grid_import_wh, m.grid_export_wh),
        MeterRole::Pv => (0.0, m.ac_pv_wh),
    };
    let n = if three { 3 } else { 1 };
    let value = |_model: u16, name: &str| -> Option<f64> {
        let phase = |k: usize, x: f64| (k < n).then_some(x);
        match name {
            "A" => Some((0..n).map(amps).sum()),
            "AphA" => phase(0, amps(0)),
            "AphB" => phase(1, amps(1)),
            "AphC" => phase(2, amps(2)),
            "PhV" => Some(v[..n].iter().sum::<f64>() / n as f64),
            "PhVphA" => phase(0, v[0]),
            "PhVphB" => phase(1, v[1]),
            "PhVphC" => phase(2, v[2]),
            "Hz" => Some(m.frequency_hz),
            "W" => Some(forward_w.iter().sum()),
            "WphA" => phase(0, forward_w[0]),
            "WphB" => phase(1, forward_w[1]),
            "WphC" => phase(2, forward_w[2]),
            "TotWhImp" => Some(import_wh.max(1.0)),
            "TotWhExp" => Some(export_wh.max(1.0)),
            "Evt" => Some(0.0),
            _ => None,
        }
    };
    let text = |name: &str| match name {
        "Mn" => Some("site-ems simulator".to_string()),
        "Md" => Some("SunSpec meter".to_string()),
        "SN" => Some(format!("SIMMTR{unit:03}")),
        _ => None,
    };
    serve(&defs, &BTreeMap::new(), value, text)
}
