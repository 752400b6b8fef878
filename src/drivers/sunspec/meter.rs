//! SunSpec meters 201–204 (int + SF): power per phase, voltages, currents, frequency and
//! energy. SunSpec meters count power delivered to the site as positive, which is our sign
//! for a grid meter; the role and `invert` apply on top, as for any meter.

use super::points::ModelView;
use crate::config::Phase;
use crate::drivers::{DecodeError, MeterEnergy, MeterReading, PhaseAc};

/// Meter models, most preferred first.
pub const METER_IDS: [u16; 4] = [203, 204, 202, 201];

/// Decode a meter model. `sign` turns the meter's forward power into our sign for its role;
/// `phases`: how many phases the meter measures (1 or 3).
pub fn decode(m: ModelView<'_>, sign: f64, phases: u8) -> Result<MeterReading, DecodeError> {
    let total = m.value("W")?.ok_or(DecodeError::Implausible {
        field: "W (not implemented)",
        value: f64::NAN,
    })?;
    let names = [
        (Phase::L1, "WphA", "PhVphA", "AphA"),
        (Phase::L2, "WphB", "PhVphB", "AphB"),
        (Phase::L3, "WphC", "PhVphC", "AphC"),
    ];
    let n = usize::from(phases.clamp(1, 3));
    let mut out = Vec::with_capacity(n);
    for &(phase, w, v, a) in names.iter().take(n) {
        let power_w = m.value(w)?.unwrap_or(total / n as f64) * sign;
        let voltage_v = m.value(v)?.or(m.value("PhV")?).unwrap_or(0.0);
        let current_a = m.value(a)?.map_or_else(
            || {
                if voltage_v > 1.0 {
                    power_w / voltage_v
                } else {
                    0.0
                }
            },
            |amps| amps.abs() * power_w.signum(),
        );
        out.push(PhaseAc {
            phase,
            voltage_v,
            current_a,
            power_w,
        });
    }
    Ok(MeterReading {
        power_w: total * sign,
        phases: out,
        frequency_hz: m.value("Hz")?,
    })
}

/// Energy counters (`TotWhImp`, `TotWhExp`) as the meter counts them.
pub fn decode_energy(m: ModelView<'_>) -> Option<MeterEnergy> {
    Some(MeterEnergy {
        import_wh: m.value("TotWhImp").ok()??,
        export_wh: m.value("TotWhExp").ok()?.unwrap_or(0.0),
    })
}
