//! Chint DTSU666 (three-phase) and DDSU666 (single-phase) meters (`docs/registers.md` §2).
//!
//! Both answer IEEE-754 float32, two registers, high word first. The DTSU666 sends scaled
//! floats (0.1 V, 0.001 A, 0.1 W, 0.01 Hz); the DDSU666 sends engineering units with power
//! in kW. Meters are read with FC03; the poller falls back to FC04 on "illegal function".
//! A meter measures forward power as + (import, as wired); a PV-side meter sees the solar
//! inverter's output as reverse power, so its sign is turned into + = generation here.

pub use super::role_sign;
use super::{expect_len, plausible, DecodeError, MeterEnergy, MeterReading, PhaseAc, ReadBlock};
use crate::config::{MeterModel, Phase};

/// The Chint models this driver reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChintModel {
    Dtsu666,
    Ddsu666,
}

impl ChintModel {
    /// The Chint model a site file's meter names, if it is one.
    pub fn of(model: MeterModel) -> Option<ChintModel> {
        match model {
            MeterModel::Dtsu666 => Some(ChintModel::Dtsu666),
            MeterModel::Ddsu666 => Some(ChintModel::Ddsu666),
            MeterModel::Sunspec => None,
        }
    }
}

pub mod dtsu666 {
    use super::ReadBlock;
    /// 0x2006–0x2019: phase voltages, currents, total and phase powers — what the control
    /// loop needs each cycle (20 registers: quick even at 9600 baud).
    pub const INSTANT: ReadBlock = ReadBlock::holding(0x2006, 20);
    /// Frequency, read with the slow values.
    pub const FREQUENCY: ReadBlock = ReadBlock::holding(0x2044, 2);
    /// Energy blocks in use by different firmware; the first that answers is kept.
    pub const ENERGY: [ReadBlock; 2] = [
        ReadBlock::holding(0x101E, 12),
        ReadBlock::holding(0x401E, 12),
    ];
    pub const UA: u16 = 0x2006;
    pub const IA: u16 = 0x200C;
    pub const PT: u16 = 0x2012;
    pub const PA: u16 = 0x2014;
    pub const QT: u16 = 0x201A;
    pub const PFT: u16 = 0x202A;
    pub const FREQ: u16 = 0x2044;
    /// Import total is the first float of an energy block, export total the sixth.
    pub const EXPORT_OFFSET: usize = 10;
    pub const ADDRESS: u16 = 0x002E;
}

pub mod ddsu666 {
    use super::ReadBlock;
    /// 0x2000–0x200F: U, I, P (kW), Q, S, PF, -, f.
    pub const INSTANT: ReadBlock = ReadBlock::holding(0x2000, 0x10);
    pub const ENERGY: [ReadBlock; 1] = [ReadBlock::holding(0x4000, 12)];
    pub const U: u16 = 0x2000;
    pub const I: u16 = 0x2002;
    pub const P: u16 = 0x2004;
    pub const Q: u16 = 0x2006;
    pub const PF: u16 = 0x200A;
    pub const FREQ: u16 = 0x200E;
    pub const EXPORT_OFFSET: usize = 10;
    pub const ADDRESS: u16 = 0x0006;
}

/// float32, high word first (ABCD).
pub fn f32_at(words: &[u16], i: usize) -> f64 {
    f64::from(f32::from_bits(
        (u32::from(words[i]) << 16) | u32::from(words[i + 1]),
    ))
}

/// The two registers of a float32, high word first (for the simulator).
pub fn f32_words(v: f64) -> [u16; 2] {
    let b = (v as f32).to_bits();
    [(b >> 16) as u16, (b & 0xFFFF) as u16]
}

pub fn instant_block(model: ChintModel) -> ReadBlock {
    match model {
        ChintModel::Dtsu666 => dtsu666::INSTANT,
        ChintModel::Ddsu666 => ddsu666::INSTANT,
    }
}

pub fn energy_blocks(model: ChintModel) -> &'static [ReadBlock] {
    match model {
        ChintModel::Dtsu666 => &dtsu666::ENERGY,
        ChintModel::Ddsu666 => &ddsu666::ENERGY,
    }
}

const P_MAX_W: f64 = 10.0e6;

fn frequency(f: f64) -> Result<f64, DecodeError> {
    if f == 0.0 {
        Ok(f)
    } else {
        plausible("frequency_hz", f, 40.0, 70.0)
    }
}

/// Decode the instantaneous block of either model; `sign` comes from [`role_sign`].
pub fn decode_instant(
    model: ChintModel,
    words: &[u16],
    sign: f64,
) -> Result<MeterReading, DecodeError> {
    match model {
        ChintModel::Dtsu666 => decode_dtsu666(words, sign),
        ChintModel::Ddsu666 => decode_ddsu666(words, sign),
    }
}

fn decode_dtsu666(words: &[u16], sign: f64) -> Result<MeterReading, DecodeError> {
    use dtsu666::*;
    expect_len(words, INSTANT.count as usize)?;
    let at = |addr: u16| f32_at(words, (addr - INSTANT.start) as usize);
    let mut phases = Vec::with_capacity(3);
    for (k, phase) in Phase::ALL.into_iter().enumerate() {
        let off = 2 * k as u16;
        let voltage_v = plausible("voltage_v", at(UA + off) / 10.0, 0.0, 1000.0)?;
        let current_a = plausible("current_a", (at(IA + off) / 1000.0).abs(), 0.0, 10_000.0)?;
        let power_w = plausible("power_w", sign * at(PA + off) / 10.0, -P_MAX_W, P_MAX_W)?;
        phases.push(PhaseAc {
            phase,
            voltage_v,
            current_a: current_a.copysign(power_w),
            power_w,
        });
    }
    Ok(MeterReading {
        power_w: plausible("power_w", sign * at(PT) / 10.0, -P_MAX_W, P_MAX_W)?,
        phases,
        frequency_hz: None,
    })
}

fn decode_ddsu666(words: &[u16], sign: f64) -> Result<MeterReading, DecodeError> {
    use ddsu666::*;
    expect_len(words, INSTANT.count as usize)?;
    let at = |addr: u16| f32_at(words, (addr - INSTANT.start) as usize);
    let voltage_v = plausible("voltage_v", at(U), 0.0, 1000.0)?;
    let power_w = plausible("power_w", sign * at(P) * 1000.0, -P_MAX_W, P_MAX_W)?;
    let current_a = plausible("current_a", at(I).abs(), 0.0, 10_000.0)?.copysign(power_w);
    Ok(MeterReading {
        power_w,
        phases: vec![PhaseAc {
            phase: Phase::L1,
            voltage_v,
            current_a,
            power_w,
        }],
        frequency_hz: Some(frequency(at(FREQ))?),
    })
}

/// Frequency from the DTSU666's [`dtsu666::FREQUENCY`] block.
pub fn decode_dtsu666_frequency(words: &[u16]) -> Result<f64, DecodeError> {
    expect_len(words, dtsu666::FREQUENCY.count as usize)?;
    frequency(f32_at(words, 0) / 100.0)
}

/// Import/export totals from an energy block (kWh floats on both models).
pub fn decode_energy(words: &[u16]) -> Result<MeterEnergy, DecodeError> {
    expect_len(words, 12)?;
    let import_kwh = plausible("import_kwh", f32_at(words, 0), 0.0, 1.0e9)?;
    let export_kwh = plausible(
        "export_kwh",
        f32_at(words, dtsu666::EXPORT_OFFSET),
        0.0,
        1.0e9,
    )?;
    Ok(MeterEnergy {
        import_wh: import_kwh * 1000.0,
        export_wh: export_kwh * 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MeterRole;

    fn put(words: &mut [u16], block: ReadBlock, addr: u16, raw: u32) {
        let i = (addr - block.start) as usize;
        words[i] = (raw >> 16) as u16;
        words[i + 1] = raw as u16;
    }

    #[test]
    fn dtsu666_matches_openems_test_vectors() {
        // OpenEMS Dtsu666ImplTest: 0x2006 = 0x45105000 → 230.9 V, 0x2012 = 0x46DEA800 →
        // 2850 W, 0x2044 = 0x459C4C00 → 50.015 Hz.
        let mut w = vec![0u16; dtsu666::INSTANT.count as usize];
        put(&mut w, dtsu666::INSTANT, 0x2006, 0x4510_5000);
        put(&mut w, dtsu666::INSTANT, 0x2012, 0x46DE_A800);
        put(&mut w, dtsu666::INSTANT, 0x2014, 0x46DE_A800);
        let r = decode_instant(ChintModel::Dtsu666, &w, 1.0).unwrap();
        assert!((r.phases[0].voltage_v - 230.9).abs() < 1e-4);
        assert!((r.power_w - 2850.0).abs() < 1e-3);
        assert!((r.phases[0].power_w - 2850.0).abs() < 1e-3);
        let f = decode_dtsu666_frequency(&[0x459C, 0x4C00]).unwrap();
        assert!((f - 50.015).abs() < 1e-4);
    }

    #[test]
    fn ddsu666_matches_openems_and_tasmota_vectors() {
        // OpenEMS Ddsu666ImplTest: 0x2004 = 0x3FA00000 (1.25 kW) → 1250 W.
        // Tasmota frame `01 04 04 43 66 33 34`: 0x2000 = 0x43663334 → 230.2 V.
        let mut w = vec![0u16; ddsu666::INSTANT.count as usize];
        put(&mut w, ddsu666::INSTANT, 0x2000, 0x4366_3334);
        put(&mut w, ddsu666::INSTANT, 0x2004, 0x3FA0_0000);
        let r = decode_instant(ChintModel::Ddsu666, &w, 1.0).unwrap();
        assert!((r.phases[0].voltage_v - 230.2).abs() < 1e-4);
        assert!((r.power_w - 1250.0).abs() < 1e-3);
    }

    #[test]
    fn energy_float_matches_openems_vector() {
        // OpenEMS: 0x45B171DF = 5678.234 kWh.
        let mut w = vec![0u16; 12];
        w[0] = 0x45B1;
        w[1] = 0x71DF;
        let e = decode_energy(&w).unwrap();
        assert!((e.import_wh - 5_678_234.0).abs() < 1.0);
    }

    #[test]
    fn pv_meter_reports_generation_as_positive() {
        let mut w = vec![0u16; ddsu666::INSTANT.count as usize];
        let words = f32_words(-2.5); // 2.5 kW flowing backwards through the meter
        put(
            &mut w,
            ddsu666::INSTANT,
            0x2004,
            (u32::from(words[0]) << 16) | u32::from(words[1]),
        );
        let r = decode_instant(ChintModel::Ddsu666, &w, role_sign(MeterRole::Pv, false)).unwrap();
        assert!((r.power_w - 2500.0).abs() < 1e-3);
        let r = decode_instant(ChintModel::Ddsu666, &w, role_sign(MeterRole::Pv, true)).unwrap();
        assert!((r.power_w + 2500.0).abs() < 1e-3);
    }

    #[test]
    fn nan_and_wrong_length_are_errors_not_values() {
        let mut w = vec![0u16; dtsu666::INSTANT.count as usize];
        put(&mut w, dtsu666::INSTANT, 0x2012, 0x7FC0_0000);
        assert!(decode_instant(ChintModel::Dtsu666, &w, 1.0).is_err());
        assert!(decode_instant(ChintModel::Dtsu666, &w[..4], 1.0).is_err());
    }

    #[test]
    fn current_takes_the_sign_of_power() {
        let mut w = vec![0u16; dtsu666::INSTANT.count as usize];
        let p = f32_words(-23000.0); // -2300 W on phase A
        let i = f32_words(10000.0); // 10 A magnitude
        put(
            &mut w,
            dtsu666::INSTANT,
            0x2014,
            (u32::from(p[0]) << 16) | u32::from(p[1]),
        );
        put(
            &mut w,
            dtsu666::INSTANT,
            0x200C,
            (u32::from(i[0]) << 16) | u32::from(i[1]),
        );
        let r = decode_instant(ChintModel::Dtsu666, &w, 1.0).unwrap();
        assert!((r.phases[0].current_a + 10.0).abs() < 1e-6);
    }
}
