//! The extent map of an image chain, in the shape `qemu-img map --output=json` prints.

use blockdev::{BlockDevice, Result};

use crate::chain::chain_status;

/// One run of guest bytes with the same allocation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer of the chain that answers (0 = top).
    pub depth: u32,
    /// Whether some layer allocates the range.
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether a layer holds data for it.
    pub data: bool,
    /// Whether the answering layer stores the data compressed (qcow2 compressed clusters,
    /// which have no `offset`).
    pub compressed: bool,
    /// Offset in the answering layer's file, when contiguous and uncompressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Builds the map of `dev`, merging adjacent runs with the same properties.
pub fn map(dev: &dyn BlockDevice) -> Result<Vec<MapEntry>> {
    let size = dev.size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let e = chain_status(dev, pos, size - pos)?;
        let entry = MapEntry {
            start: pos,
            length: e.len,
            depth: e.depth,
            present: e.present,
            zero: !e.data,
            data: e.data,
            compressed: e.compressed,
            offset: e.host_offset,
        };
        match out.last_mut() {
            Some(last)
                if last.depth == entry.depth
                    && last.present == entry.present
                    && last.zero == entry.zero
                    && last.data == entry.data
                    && last.compressed == entry.compressed
                    && match (last.offset, entry.offset) {
                        (Some(a), Some(b)) => a.checked_add(last.length) == Some(b),
                        (None, None) => true,
                        _ => false,
                    } =>
            {
                last.length += entry.length;
            }
            _ => out.push(entry),
        }
        pos += e.len;
    }
    Ok(out)
}
