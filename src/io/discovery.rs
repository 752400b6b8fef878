//! SunSpec discovery over a link: find the `SunS` marker, then walk the model chain. The
//! decoding of what is read is the driver's ([`crate::drivers::sunspec`]); this only reads.

use std::sync::Arc;

use crate::drivers::sunspec::{self, Header, Map, ModelLoc};
use crate::drivers::ReadBlock;
use crate::io::link::{Link, LinkError};

/// Why a device has no usable SunSpec map.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("no SunSpec marker at 40000, 50000 or 0")]
    NoMarker,
    #[error("the model chain is broken at {0}")]
    Broken(u16),
}

impl DiscoveryError {
    pub fn kind(&self) -> &'static str {
        match self {
            DiscoveryError::Link(e) => e.kind(),
            DiscoveryError::NoMarker | DiscoveryError::Broken(_) => "discovery",
        }
    }
}

/// Find the device's map. A base that answers with an exception is not the map's; a link
/// failure (timeout, connection) ends discovery, to be tried again later.
pub async fn discover(link: &Link, device: &Arc<str>, unit: u8) -> Result<Map, DiscoveryError> {
    let mut base = None;
    for b in sunspec::BASE_ADDRESSES {
        match link.read(device, unit, ReadBlock::holding(b, 2)).await {
            Ok(words) if words == sunspec::MARKER => {
                base = Some(b);
                break;
            }
            Ok(_) | Err(LinkError::Exception(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let base = base.ok_or(DiscoveryError::NoMarker)?;
    let mut map = Map {
        base,
        models: Vec::new(),
    };
    let mut at = base + 2;
    while map.models.len() < sunspec::MAX_MODELS {
        let words = match link.read(device, unit, ReadBlock::holding(at, 2)).await {
            Ok(w) => w,
            // Some devices end the chain at the last model without an end marker.
            Err(LinkError::Exception(_)) if !map.models.is_empty() => return Ok(map),
            Err(e) => return Err(e.into()),
        };
        match sunspec::header(at, &words) {
            Some(Header::End) => return Ok(map),
            Some(Header::Model(m)) => {
                at = sunspec::next_header(&m);
                map.models.push(m);
            }
            None => return Err(DiscoveryError::Broken(at)),
        }
    }
    Err(DiscoveryError::Broken(at))
}

/// All of a model's registers, `ID` first, in as many reads as the protocol needs.
pub async fn read_model(
    link: &Link,
    device: &Arc<str>,
    unit: u8,
    model: &ModelLoc,
) -> Result<Vec<u16>, LinkError> {
    let mut words = Vec::with_capacity(usize::from(model.len) + 2);
    for block in model.blocks() {
        words.extend(link.read(device, unit, block).await?);
    }
    Ok(words)
}
