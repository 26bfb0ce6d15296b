//! The block allocation table: loading, validation and entry helpers.

use blockdev::{Error, Limits, Result, Storage};

use crate::format::*;

/// State bits of an entry.
pub fn state(e: u64) -> u8 {
    (e & 7) as u8
}

/// File offset of an entry.
pub fn offset(e: u64) -> u64 {
    e & BAT_OFFSET_MASK
}

/// Builds an entry.
pub fn entry(state: u8, offset: u64) -> u64 {
    (offset & BAT_OFFSET_MASK) | u64::from(state & 7)
}

/// The geometry that BAT arithmetic needs.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Virtual disk size.
    pub size: u64,
    /// Block size.
    pub block_size: u64,
    /// Logical sector size.
    pub logical: u32,
    /// Chunk ratio.
    pub chunk_ratio: u64,
    /// Payload blocks.
    pub blocks: u64,
    /// BAT entries read.
    pub entries: u64,
    /// Differencing image.
    pub has_parent: bool,
}

impl Geometry {
    /// Computes the geometry.
    pub fn new(size: u64, block_size: u64, logical: u32, has_parent: bool) -> Geometry {
        Geometry {
            size,
            block_size,
            logical,
            chunk_ratio: chunk_ratio(block_size, logical).max(1),
            blocks: size.div_ceil(block_size),
            entries: bat_entries(size, block_size, logical, has_parent),
            has_parent,
        }
    }

    /// BAT index of payload block `n`.
    pub fn payload(&self, n: u64) -> usize {
        payload_index(n, self.chunk_ratio) as usize
    }

    /// BAT index of the sector-bitmap entry of the chunk of payload block `n`.
    pub fn bitmap_of_block(&self, n: u64) -> usize {
        bitmap_index(n / self.chunk_ratio, self.chunk_ratio) as usize
    }

    /// Whether BAT index `i` is a sector-bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }
}

/// Reads the BAT entries.
pub fn load(
    storage: &dyn Storage,
    region_off: u64,
    region_len: u64,
    g: &Geometry,
    limits: &Limits,
) -> Result<Vec<u64>> {
    let bytes = g.entries.saturating_mul(8);
    if bytes > region_len {
        return Err(Error::corrupt(
            "region_table.bat.length",
            region_off,
            format!(
                "the BAT region holds {region_len} bytes but {} entries need {bytes}",
                g.entries
            ),
        ));
    }
    let raw = blockdev::try_alloc(bytes, limits, "bat")?;
    let mut raw = raw;
    storage.read_at(&mut raw, region_off)?;
    Ok(raw.chunks_exact(8).map(|c| le64(c, 0)).collect())
}

/// A file range used by some structure, for overlap checks.
#[derive(Debug, Clone)]
pub struct Span {
    /// Start.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// What it is.
    pub what: String,
}

/// Validates every entry; returns all problems as (field, file offset of entry, message).
pub fn validate(
    bat: &[u64],
    g: &Geometry,
    bat_off: u64,
    file_len: u64,
    fixed_spans: &[Span],
) -> Vec<(String, u64, String)> {
    let mut problems = Vec::new();
    // Overlaps are found with one bit per MiB of the file (every structure is 1 MiB aligned):
    // a 64 TiB file needs 8 MiB of bits, whatever the number of blocks.
    let units = file_len.div_ceil(MIB);
    let mut used = match blockdev::try_alloc(units.div_ceil(8), &Limits::default(), "bat") {
        Ok(v) => v,
        Err(e) => {
            problems.push(("bat".to_string(), bat_off, e.to_string()));
            return problems;
        }
    };
    let mut mark = |start: u64, end: u64| -> bool {
        let mut clash = false;
        let mut u = start / MIB;
        while u < end.div_ceil(MIB).min(units) {
            if let Some(b) = used.get_mut((u / 8) as usize) {
                clash |= *b & (1 << (u % 8)) != 0;
                *b |= 1 << (u % 8);
            }
            u += 1;
        }
        clash
    };
    for f in fixed_spans {
        mark(f.start, f.end);
    }
    let mut clashes: Vec<(usize, u64, u64)> = Vec::new();
    let mut more = 0u64;
    for (i, &e) in bat.iter().enumerate() {
        let idx = i as u64;
        let eoff = bat_off + idx * 8;
        let field = || format!("bat_entry[{i}]");
        let st = state(e);
        let off = offset(e);
        if e & BAT_RESERVED_MASK != 0 {
            problems.push((field(), eoff, format!("reserved bits set in {e:#x}")));
        }
        let is_sb = g.is_bitmap_index(idx);
        let len = if is_sb {
            match st {
                SB_NOT_PRESENT => continue,
                SB_PRESENT => SECTOR_BITMAP_BLOCK,
                _ => {
                    problems.push((
                        field(),
                        eoff,
                        format!("sector-bitmap entry has invalid state {st}"),
                    ));
                    continue;
                }
            }
        } else {
            match st {
                PAYLOAD_NOT_PRESENT
                | PAYLOAD_UNDEFINED
                | PAYLOAD_ZERO
                | PAYLOAD_UNMAPPED
                | PAYLOAD_UNMAPPED_V095 => continue,
                PAYLOAD_FULLY_PRESENT => g.block_size,
                PAYLOAD_PARTIALLY_PRESENT if g.has_parent => {
                    let blk = idx - idx / (g.chunk_ratio + 1);
                    let sbi = g.bitmap_of_block(blk);
                    if bat.get(sbi).is_none_or(|e| state(*e) != SB_PRESENT) {
                        problems.push((
                            field(),
                            eoff,
                            format!(
                                "PARTIALLY_PRESENT block whose sector-bitmap entry {sbi} is not present"
                            ),
                        ));
                    }
                    g.block_size
                }
                PAYLOAD_PARTIALLY_PRESENT => {
                    problems.push((
                        field(),
                        eoff,
                        "PARTIALLY_PRESENT block in an image without a parent".into(),
                    ));
                    continue;
                }
                _ => {
                    problems.push((field(), eoff, format!("invalid payload block state {st}")));
                    continue;
                }
            }
        };
        if off < HEADER_SECTION {
            problems.push((
                field(),
                eoff,
                format!("block at file offset {off:#x} lies in the header section"),
            ));
            continue;
        }
        let Some(end) = off.checked_add(len) else {
            problems.push((field(), eoff, "block offset overflows".into()));
            continue;
        };
        if end > file_len {
            problems.push((
                field(),
                eoff,
                format!("block [{off:#x}, {end:#x}) lies past the end of the file ({file_len:#x})"),
            ));
            continue;
        }
        if mark(off, end) {
            if clashes.len() < MAX_NAMED_CLASHES {
                clashes.push((i, off, end));
            } else {
                more += 1;
            }
        }
    }
    // Name what each clashing entry overlaps (a linear search per clash, so their number is
    // capped: a hostile BAT can make every entry clash).
    for (i, off, end) in clashes {
        let other = fixed_spans
            .iter()
            .find(|f| f.start < end && off < f.end)
            .map(|f| format!("the {} [{:#x}, {:#x})", f.what, f.start, f.end))
            .or_else(|| {
                bat.iter().enumerate().find_map(|(j, &x)| {
                    let len = if g.is_bitmap_index(j as u64) {
                        SECTOR_BITMAP_BLOCK
                    } else {
                        g.block_size
                    };
                    let o = offset(x);
                    let present = matches!(
                        (g.is_bitmap_index(j as u64), state(x)),
                        (true, SB_PRESENT)
                            | (false, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT)
                    );
                    (j != i && present && o < end && off < o.saturating_add(len))
                        .then(|| format!("bat_entry[{j}] [{o:#x}, {:#x})", o.saturating_add(len)))
                })
            })
            .unwrap_or_else(|| "another structure".to_string());
        problems.push((
            format!("bat_entry[{i}]"),
            bat_off + i as u64 * 8,
            format!("bat_entry[{i}] [{off:#x}, {end:#x}) overlaps {other}"),
        ));
    }
    if more > 0 {
        problems.push((
            "bat".to_string(),
            bat_off,
            format!("{more} more BAT entries overlap other structures"),
        ));
    }
    problems
}

/// Overlapping entries named one by one before the rest are only counted.
const MAX_NAMED_CLASHES: usize = 64;
