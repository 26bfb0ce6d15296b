//! Creating new images: layout, metadata and the final header writes.

use blockdev::{Error, Result, Storage};

use crate::bat;
use crate::format::*;
use crate::header::{region_table_bytes, Header, RegionEntry};
use crate::metadata::{metadata_region_bytes, Locator, Metadata};

/// Fixed or dynamic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// Every block allocated (LeaveBlockAllocated).
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
}

/// The parent of a new differencing image.
#[derive(Debug, Clone)]
pub struct ParentLink {
    /// The parent's DataWriteGuid (recorded as parent_linkage).
    pub data_write_guid: Guid,
    /// The parent's virtual disk ID (copied, as Hyper-V does on fork).
    pub disk_id: Guid,
    /// The parent's virtual size.
    pub size: u64,
    /// The parent's logical sector size.
    pub logical: u32,
    /// `relative_path` (Windows separators, e.g. `.\base.vhdx`).
    pub relative_path: String,
    /// `absolute_win32_path`.
    pub absolute_win32_path: String,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to the logical sector size).
    pub size: u64,
    /// Fixed or dynamic (ignored with a parent).
    pub subformat: Subformat,
    /// Block size (1-256 MiB, power of two).
    pub block_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical: u32,
    /// Physical sector size (512 or 4096).
    pub physical: u32,
    /// Parent for a differencing image.
    pub parent: Option<ParentLink>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            subformat: Subformat::Dynamic,
            block_size: 32 * MIB,
            logical: 512,
            physical: 4096,
            parent: None,
        }
    }
}

/// Where a new image's structures go.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Virtual size after rounding.
    pub size: u64,
    /// Log offset.
    pub log_offset: u64,
    /// Log length.
    pub log_length: u64,
    /// Metadata region offset.
    pub meta_offset: u64,
    /// Metadata region length.
    pub meta_length: u64,
    /// BAT region offset.
    pub bat_offset: u64,
    /// BAT region length.
    pub bat_length: u64,
    /// First payload byte.
    pub data_offset: u64,
    /// BAT geometry.
    pub geom: bat::Geometry,
}

impl CreateOptions {
    /// Checks the options and computes the layout.
    pub fn layout(&self) -> Result<Layout> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(Error::invalid_argument(format!(
                "block_size {bs} must be a power of two between 1 MiB and 256 MiB"
            )));
        }
        for (n, v) in [("logical", self.logical), ("physical", self.physical)] {
            if v != 512 && v != 4096 {
                return Err(Error::invalid_argument(format!(
                    "{n}_sector_size {v} must be 512 or 4096"
                )));
            }
        }
        let size = match &self.parent {
            Some(p) => {
                if p.logical != self.logical {
                    return Err(Error::invalid_argument(format!(
                        "the parent has {}-byte logical sectors; a child must use the same",
                        p.logical
                    )));
                }
                // A child presents its parent's size: another one would be silently ignored.
                if self.size != 0 && self.size != p.size {
                    return Err(Error::invalid_argument(format!(
                        "a differencing VHDX must have its parent's size ({} bytes), not {}",
                        p.size, self.size
                    )));
                }
                p.size
            }
            None => blockdev::align_up(self.size, u64::from(self.logical), "size")?,
        };
        if size == 0 || size > MAX_DISK_SIZE {
            return Err(Error::invalid_argument(format!(
                "VHDX size {size} must be between 1 byte and 64 TiB"
            )));
        }
        let geom = bat::Geometry::new(size, bs, self.logical, self.parent.is_some());
        let alloc = bat_entries_alloc(size, bs, self.logical).max(geom.entries);
        let bat_length = blockdev::align_up(alloc * 8, MIB, "bat")?;
        let log_offset = MIB;
        let log_length = MIB;
        let meta_offset = log_offset + log_length;
        let meta_length = MIB;
        let bat_offset = meta_offset + meta_length;
        Ok(Layout {
            size,
            log_offset,
            log_length,
            meta_offset,
            meta_length,
            bat_offset,
            bat_length,
            data_offset: bat_offset + bat_length,
            geom,
        })
    }

    fn metadata(&self, size: u64) -> Result<Metadata> {
        let (disk_id, locator) = match &self.parent {
            Some(p) => {
                let mut entries = vec![("parent_linkage".to_string(), p.data_write_guid.braced())];
                if !p.relative_path.is_empty() {
                    entries.push(("relative_path".into(), p.relative_path.clone()));
                }
                if !p.absolute_win32_path.is_empty() {
                    entries.push(("absolute_win32_path".into(), p.absolute_win32_path.clone()));
                }
                (
                    p.disk_id,
                    Some(Locator {
                        locator_type: LOCATOR_TYPE_VHDX,
                        entries,
                    }),
                )
            }
            None => (Guid::random()?, None),
        };
        Ok(Metadata {
            entries: Vec::new(),
            block_size: self.block_size as u32,
            leave_allocated: self.parent.is_none() && self.subformat == Subformat::Fixed,
            has_parent: self.parent.is_some(),
            disk_size: size,
            disk_id,
            logical: self.logical,
            physical: self.physical,
            locator,
        })
    }
}

/// Writes everything but payload: BAT, metadata, region tables, file identifier, then the
/// headers, sets the file length and flushes.
pub fn finish_image(
    storage: &dyn Storage,
    opts: &CreateOptions,
    layout: &Layout,
    entry: &dyn Fn(u64) -> u64,
    file_len: u64,
) -> Result<()> {
    let file_len = blockdev::align_up(file_len.max(layout.data_offset), MIB, "file length")?;
    storage.set_len(file_len)?;
    // The BAT goes out 1 MiB at a time; all-zero pieces are already zeros in the new file.
    const PER_WRITE: u64 = MIB / 8;
    let mut buf = vec![0u8; MIB as usize];
    let mut first = 0u64;
    while first < layout.geom.entries {
        let n = (layout.geom.entries - first).min(PER_WRITE);
        let mut any = false;
        for k in 0..n {
            let e = entry(first + k);
            any |= e != 0;
            put64(&mut buf, (k * 8) as usize, e);
        }
        if any {
            storage.write_at(
                buf.get(..(n * 8) as usize).unwrap_or_default(),
                layout.bat_offset + first * 8,
            )?;
        }
        first += n;
    }
    let meta = opts.metadata(layout.size)?;
    storage.write_at(&metadata_region_bytes(&meta), layout.meta_offset)?;
    let regions = [
        RegionEntry {
            guid: BAT_REGION,
            offset: layout.bat_offset,
            length: layout.bat_length,
            required: true,
        },
        RegionEntry {
            guid: METADATA_REGION,
            offset: layout.meta_offset,
            length: layout.meta_length,
            required: true,
        },
    ];
    let rt = region_table_bytes(&regions);
    for off in REGION_OFFSETS {
        storage.write_at(&rt, off)?;
    }
    let mut id = vec![0u8; KIB64 as usize];
    put(&mut id, 0, FILE_SIGNATURE);
    put(
        &mut id,
        CREATOR_OFFSET,
        &to_utf16le(concat!("vdconv ", env!("CARGO_PKG_VERSION"))),
    );
    storage.write_at(&id, 0)?;
    // Payload, metadata and tables are durable before any header makes them reachable.
    storage.flush()?;
    let fwg = Guid::random()?;
    let dwg = Guid::random()?;
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        let h = Header {
            seq: i as u64 + 1,
            file_write_guid: fwg,
            data_write_guid: dwg,
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: layout.log_length as u32,
            log_offset: layout.log_offset,
        };
        let mut slot = h.to_bytes();
        slot.resize(KIB64 as usize, 0);
        storage.write_at(&slot, *off)?;
    }
    storage.flush()
}

/// Creates a new empty image on `storage` (which must be empty).
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    let layout = opts.layout()?;
    let g = layout.geom;
    if opts.parent.is_none() && opts.subformat == Subformat::Fixed {
        let end = layout.data_offset + g.blocks * g.block_size;
        let data = layout.data_offset;
        finish_image(storage, opts, &layout, &|i| fixed_entry(&g, data, i), end)
    } else {
        finish_image(storage, opts, &layout, &|_| 0, layout.data_offset)
    }
}

/// BAT entry `i` of a fixed image whose blocks lie in guest order from `data`.
pub fn fixed_entry(g: &bat::Geometry, data: u64, i: u64) -> u64 {
    if g.is_bitmap_index(i) {
        return 0;
    }
    let blk = g.block_of_index(i);
    if blk < g.blocks {
        bat::entry(PAYLOAD_FULLY_PRESENT, data + blk * g.block_size)
    } else {
        0
    }
}
