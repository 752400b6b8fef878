//! SunSpec devices over Modbus: inverters of any brand that implement the SunSpec information
//! models (Fronius, SMA, SolarEdge, Huawei, KACO, …) and SunSpec meters.
//!
//! - **Discovery.** A device's map starts with the marker `SunS` at 40000, 50000 or 0 (tried
//!   in that order); models follow as `ID`, `L`, `L` registers of body, until `ID` 0xFFFF.
//!   Nothing about a device is assumed: which models it has, and where, is read from it.
//! - **Reading.** Models are declared as data ([`models`]); a [`points::ModelView`] decodes
//!   any point with its scale factor, and a point the device does not implement reads as
//!   absent, never as a number.
//! - **Control** ([`inverter`]): curtailment through 704 `WMaxLimPct` where the device has
//!   it, else 123; storage through 124. Each write carries a revert timer, so a unit the EMS
//!   stops talking to falls back by itself (see [`inverter`] for what it falls back to).

pub mod inverter;
pub mod meter;
pub mod models;
pub mod points;

use crate::drivers::{ReadBlock, MAX_READ_REGISTERS};
use points::ModelDef;

/// Where a map may start, in the order devices are probed.
pub const BASE_ADDRESSES: [u16; 3] = [40000, 50000, 0];
/// `SunS` in ASCII.
pub const MARKER: [u16; 2] = [0x5375, 0x6E53];
/// `ID` that ends the model chain.
pub const END_ID: u16 = 0xFFFF;
/// A chain longer than this is not a SunSpec map (a device answering garbage).
pub const MAX_MODELS: usize = 64;

/// One model found on a device: its ID, the address of its `ID` register, and its `L`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ModelLoc {
    pub id: u16,
    pub start: u16,
    pub len: u16,
}

impl ModelLoc {
    /// Absolute address of the register at `offset` from `ID`.
    pub fn addr(&self, offset: u16) -> u16 {
        self.start.wrapping_add(offset)
    }

    /// Reads that fetch the whole model, ID and L included, in blocks the protocol allows.
    pub fn blocks(&self) -> Vec<ReadBlock> {
        let total = u32::from(self.len) + 2;
        (0..total)
            .step_by(usize::from(MAX_READ_REGISTERS))
            .map(|off| {
                let count = (total - off).min(u32::from(MAX_READ_REGISTERS)) as u16;
                ReadBlock::holding(self.start.wrapping_add(off as u16), count)
            })
            .collect()
    }

    /// The definition that decodes this model, when we know its layout.
    pub(crate) fn def(&self) -> Option<&'static ModelDef> {
        def_for(self.id)
    }
}

/// The definition for model `id`. Models that share a layout share a table: 101–103 (single,
/// split, three phase, int + SF), 111–113 (float) and meters 201–204.
pub(crate) fn def_for(id: u16) -> Option<&'static ModelDef> {
    let layout = match id {
        102 => 103,
        112 => 113,
        202 | 204 => 203,
        other => other,
    };
    models::ALL.iter().copied().find(|d| d.id == layout)
}

/// The models a device serves, in map order.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Map {
    pub base: u16,
    pub models: Vec<ModelLoc>,
}

impl Map {
    /// The first model among `ids`, in the order of preference given.
    pub fn find(&self, ids: &[u16]) -> Option<ModelLoc> {
        ids.iter()
            .find_map(|id| self.models.iter().find(|m| m.id == *id).copied())
    }

    /// The model IDs, in map order.
    pub fn ids(&self) -> Vec<u16> {
        self.models.iter().map(|m| m.id).collect()
    }
}

/// What discovery makes of the two registers at a model boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    Model(ModelLoc),
    End,
}

/// Decode a model header read at `addr`; `None` when it cannot be one (the model would run
/// past the address space).
pub fn header(addr: u16, words: &[u16]) -> Option<Header> {
    match *words {
        [END_ID, ..] => Some(Header::End),
        [id, len] => {
            let end = u32::from(addr) + 2 + u32::from(len);
            (end <= u32::from(u16::MAX)).then_some(Header::Model(ModelLoc {
                id,
                start: addr,
                len,
            }))
        }
        _ => None,
    }
}

/// Where the header after `m` is.
pub fn next_header(m: &ModelLoc) -> u16 {
    m.start.wrapping_add(m.len).wrapping_add(2)
}
