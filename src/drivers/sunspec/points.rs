//! SunSpec point types and how a model's registers turn into values: big-endian words, high
//! word first; `value = raw × 10^SF` with the scale factor read from its own point; and the
//! "not implemented" sentinels (int16 `0x8000`, uint16 `0xFFFF`, accumulators 0, float NaN, …)
//! read as no value rather than as a number.

use crate::drivers::DecodeError;

/// A point's encoding: the standard's types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    U16,
    I16,
    U32,
    I32,
    U64,
    Acc16,
    Acc32,
    Acc64,
    Enum16,
    Enum32,
    Bitfield16,
    Bitfield32,
    /// A scale factor: a signed power of ten.
    Sunssf,
    F32,
    Pad,
    /// ASCII, this many registers.
    Str(u16),
}

impl Ty {
    /// Registers the point takes.
    pub const fn size(self) -> u16 {
        match self {
            Ty::U16 | Ty::I16 | Ty::Acc16 | Ty::Enum16 | Ty::Bitfield16 | Ty::Sunssf | Ty::Pad => 1,
            Ty::U32 | Ty::I32 | Ty::Acc32 | Ty::Enum32 | Ty::Bitfield32 | Ty::F32 => 2,
            Ty::U64 | Ty::Acc64 => 4,
            Ty::Str(n) => n,
        }
    }

    /// The type's name in the SunSpec model definitions.
    pub const fn standard_name(self) -> &'static str {
        match self {
            Ty::U16 => "uint16",
            Ty::I16 => "int16",
            Ty::U32 => "uint32",
            Ty::I32 => "int32",
            Ty::U64 => "uint64",
            Ty::Acc16 => "acc16",
            Ty::Acc32 => "acc32",
            Ty::Acc64 => "acc64",
            Ty::Enum16 => "enum16",
            Ty::Enum32 => "enum32",
            Ty::Bitfield16 => "bitfield16",
            Ty::Bitfield32 => "bitfield32",
            Ty::Sunssf => "sunssf",
            Ty::F32 => "float32",
            Ty::Pad => "pad",
            Ty::Str(_) => "string",
        }
    }

    /// The words a device serves for a point it does not implement.
    pub fn unimplemented(self) -> Vec<u16> {
        let n = usize::from(self.size());
        match self {
            Ty::I16 | Ty::Sunssf => vec![0x8000],
            Ty::I32 => vec![0x8000, 0],
            Ty::U16 | Ty::Enum16 | Ty::Bitfield16 => vec![0xFFFF],
            Ty::U32 | Ty::Enum32 | Ty::Bitfield32 | Ty::U64 => vec![0xFFFF; n],
            Ty::F32 => vec![0x7FC0, 0],
            Ty::Acc16 | Ty::Acc32 | Ty::Acc64 | Ty::Pad | Ty::Str(_) => vec![0; n],
        }
    }

    /// The raw integer (or float) the words hold, `None` when they are the sentinel.
    fn raw(self, w: &[u16]) -> Option<f64> {
        let u32_of = |w: &[u16]| (u32::from(w[0]) << 16) | u32::from(w[1]);
        let v = match self {
            Ty::U16 | Ty::Enum16 | Ty::Bitfield16 => (w[0] != 0xFFFF).then_some(f64::from(w[0]))?,
            Ty::I16 | Ty::Sunssf => (w[0] != 0x8000).then_some(f64::from(w[0] as i16))?,
            Ty::Acc16 => (w[0] != 0).then_some(f64::from(w[0]))?,
            Ty::U32 | Ty::Enum32 | Ty::Bitfield32 => {
                let v = u32_of(w);
                (v != u32::MAX).then_some(f64::from(v))?
            }
            Ty::I32 => {
                let v = u32_of(w) as i32;
                (v != i32::MIN).then_some(f64::from(v))?
            }
            Ty::Acc32 => {
                let v = u32_of(w);
                (v != 0).then_some(f64::from(v))?
            }
            Ty::U64 | Ty::Acc64 => {
                let v = w.iter().fold(0u64, |a, &x| (a << 16) | u64::from(x));
                let none = if self == Ty::U64 { u64::MAX } else { 0 };
                (v != none).then_some(v as f64)?
            }
            Ty::F32 => {
                let v = f32::from_bits(u32_of(w));
                (!v.is_nan()).then_some(f64::from(v))?
            }
            Ty::Pad | Ty::Str(_) => None?,
        };
        Some(v)
    }

    /// Words for the raw value `v` (already divided by the scale); out-of-range values are
    /// clamped to the type's range (never to a sentinel).
    pub fn encode(self, v: f64) -> Vec<u16> {
        let r = v.round();
        match self {
            Ty::U16 | Ty::Enum16 | Ty::Bitfield16 | Ty::Acc16 => {
                vec![r.clamp(0.0, 65534.0) as u16]
            }
            Ty::I16 | Ty::Sunssf => vec![r.clamp(-32767.0, 32767.0) as i16 as u16],
            Ty::U32 | Ty::Enum32 | Ty::Bitfield32 | Ty::Acc32 => {
                let x = r.clamp(0.0, f64::from(u32::MAX - 1)) as u32;
                vec![(x >> 16) as u16, x as u16]
            }
            Ty::I32 => {
                let x = r.clamp(f64::from(i32::MIN + 1), f64::from(i32::MAX)) as i32 as u32;
                vec![(x >> 16) as u16, x as u16]
            }
            Ty::U64 | Ty::Acc64 => {
                let x = r.clamp(0.0, 9.0e18) as u64;
                (0..4).rev().map(|k| (x >> (16 * k)) as u16).collect()
            }
            Ty::F32 => {
                let b = (v as f32).to_bits();
                vec![(b >> 16) as u16, b as u16]
            }
            Ty::Pad | Ty::Str(_) => vec![0; usize::from(self.size())],
        }
    }
}

/// One point of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub name: &'static str,
    /// Registers from the model's ID register.
    pub offset: u16,
    pub ty: Ty,
    /// The point holding this one's scale factor.
    pub sf: Option<&'static str>,
    pub units: &'static str,
    /// Physical bounds of the scaled value; outside them the reading is implausible.
    pub range: Option<(f64, f64)>,
}

/// A model's definition: its ID, its length `L` (registers after `ID` and `L`) and points.
#[derive(Debug, Clone, Copy)]
pub struct ModelDef {
    pub id: u16,
    pub name: &'static str,
    pub len: u16,
    pub points: &'static [Point],
}

impl ModelDef {
    pub fn point(&self, name: &str) -> Option<&'static Point> {
        self.points.iter().find(|p| p.name == name)
    }

    /// Registers the model takes, ID and L included.
    pub fn size(&self) -> u16 {
        self.len + 2
    }
}

/// A model as read from a device: its registers from `ID` on, decoded through its definition.
/// A device may serve a shorter model than the definition (an older revision): points past
/// the end read as not implemented.
#[derive(Debug, Clone, Copy)]
pub struct ModelView<'a> {
    pub def: &'static ModelDef,
    pub words: &'a [u16],
}

impl<'a> ModelView<'a> {
    pub fn new(def: &'static ModelDef, words: &'a [u16]) -> ModelView<'a> {
        ModelView { def, words }
    }

    fn words_of(&self, p: &Point) -> Option<&'a [u16]> {
        let start = usize::from(p.offset);
        self.words.get(start..start + usize::from(p.ty.size()))
    }

    /// The scale factor of `p`, if it has one: `Err` when its point is not implemented (then
    /// the value cannot be known).
    fn scale(&self, p: &Point) -> Result<i32, ()> {
        let Some(sf_name) = p.sf else {
            return Ok(0);
        };
        let sf = self.def.point(sf_name).ok_or(())?;
        let raw = self.words_of(sf).and_then(|w| sf.ty.raw(w)).ok_or(())?;
        // The standard bounds scale factors to −10…10; anything else is not a scale.
        if (-10.0..=10.0).contains(&raw) {
            Ok(raw as i32)
        } else {
            Err(())
        }
    }

    /// The point's scaled value; `None` when the device does not implement it (the point or
    /// its scale factor holds the sentinel, or the model is too short); an error when the
    /// value is outside the point's plausible range.
    pub fn value(&self, name: &'static str) -> Result<Option<f64>, DecodeError> {
        let Some(p) = self.def.point(name) else {
            return Ok(None);
        };
        let Some(raw) = self.words_of(p).and_then(|w| p.ty.raw(w)) else {
            return Ok(None);
        };
        let Ok(sf) = self.scale(p) else {
            return Ok(None);
        };
        let v = raw * 10f64.powi(sf);
        match p.range {
            Some((lo, hi)) => crate::drivers::plausible(name, v, lo, hi).map(Some),
            None => Ok(Some(v)),
        }
    }

    /// The raw scale factor of `name`'s point, when implemented.
    pub fn scale_of(&self, name: &str) -> Option<i32> {
        self.def.point(name).and_then(|p| self.scale(p).ok())
    }

    /// A string point, trailing NULs and spaces removed; `None` when empty.
    pub fn string(&self, name: &str) -> Option<String> {
        let p = self.def.point(name)?;
        let bytes: Vec<u8> = self
            .words_of(p)?
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .take_while(|&b| b != 0)
            .collect();
        let s = String::from_utf8_lossy(&bytes).trim().to_string();
        (!s.is_empty()).then_some(s)
    }
}

/// Words for a string of `regs` registers, NUL-padded.
pub fn encode_str(s: &str, regs: u16) -> Vec<u16> {
    let mut bytes: Vec<u8> = s.bytes().take(2 * usize::from(regs)).collect();
    bytes.resize(2 * usize::from(regs), 0);
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::sunspec::models;

    fn image(def: &'static ModelDef, values: &[(&str, Vec<u16>)]) -> Vec<u16> {
        let mut w = vec![0u16; usize::from(def.size())];
        for p in def.points {
            let words = values
                .iter()
                .find(|(n, _)| *n == p.name)
                .map_or_else(|| p.ty.unimplemented(), |(_, v)| v.clone());
            let at = usize::from(p.offset);
            w[at..at + words.len()].copy_from_slice(&words);
        }
        w
    }

    #[test]
    fn scale_factors_apply_and_sentinels_read_as_absent() {
        let def = &models::INVERTER_3PH;
        let w = image(
            def,
            &[
                ("W", vec![(-1234i16) as u16]),
                ("W_SF", vec![1]),
                ("Hz", vec![5002]),
                ("Hz_SF", vec![(-2i16) as u16]),
                ("PhVphA", vec![2301]),
            ],
        );
        let v = ModelView::new(def, &w);
        assert_eq!(v.value("W").unwrap(), Some(-12340.0));
        assert!((v.value("Hz").unwrap().unwrap() - 50.02).abs() < 1e-9);
        // Its scale factor is not implemented: the value cannot be known.
        assert_eq!(v.value("PhVphA").unwrap(), None);
        // Not implemented at all.
        assert_eq!(v.value("DCW").unwrap(), None);
        assert_eq!(v.value("WH").unwrap(), None, "acc32 0 is 'not implemented'");
    }

    #[test]
    fn a_value_outside_its_range_is_implausible() {
        let def = &models::INVERTER_3PH;
        let w = image(def, &[("Hz", vec![9000]), ("Hz_SF", vec![0])]);
        assert!(ModelView::new(def, &w).value("Hz").is_err());
    }

    #[test]
    fn every_type_round_trips_through_its_encoding() {
        for (ty, v) in [
            (Ty::U16, 512.0),
            (Ty::I16, -300.0),
            (Ty::U32, 70_000.0),
            (Ty::I32, -70_000.0),
            (Ty::U64, 1.0e12),
            (Ty::Acc32, 5.0),
            (Ty::F32, 49.5),
        ] {
            assert_eq!(ty.raw(&ty.encode(v)), Some(v), "{ty:?}");
            assert_eq!(ty.raw(&ty.unimplemented()), None, "{ty:?}");
        }
    }

    #[test]
    fn tables_are_consistent() {
        for def in models::ALL {
            let mut next = 0;
            for p in def.points {
                assert_eq!(p.offset, next, "model {} point {}", def.id, p.name);
                next += p.ty.size();
                if let Some(sf) = p.sf {
                    assert!(def.point(sf).is_some(), "model {}: {sf}", def.id);
                }
            }
            assert_eq!(next, def.size(), "model {}", def.id);
        }
    }
}
