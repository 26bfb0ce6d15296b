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
    // (start, end, owner): owner < bat.len() is a BAT index, otherwise fixed_spans[owner - len].
    let mut spans: Vec<(u64, u64, usize)> = Vec::new();
    let n = bat.len();
    if spans
        .try_reserve(n.saturating_add(fixed_spans.len()))
        .is_err()
    {
        problems.push((
            "bat".to_string(),
            bat_off,
            "not enough memory to check the BAT for overlaps".to_string(),
        ));
        return problems;
    }
    for (k, f) in fixed_spans.iter().enumerate() {
        spans.push((f.start, f.end, n + k));
    }
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
        spans.push((off, end, i));
    }
    spans.sort_unstable();
    let name = |o: usize| {
        if o < n {
            format!("bat_entry[{o}]")
        } else {
            fixed_spans
                .get(o - n)
                .map(|s| s.what.clone())
                .unwrap_or_default()
        }
    };
    for w in spans.windows(2) {
        if let [a, b] = w {
            if b.0 < a.1 {
                // Name the BAT entry (the later one when both are entries).
                let owner = if b.2 < n { b.2 } else { a.2 };
                problems.push((
                    name(owner),
                    bat_off + (owner.min(n) as u64) * 8,
                    format!(
                        "{} [{:#x}, {:#x}) overlaps {} [{:#x}, {:#x})",
                        name(b.2),
                        b.0,
                        b.1,
                        name(a.2),
                        a.0,
                        a.1
                    ),
                ));
            }
        }
    }
    problems
}
