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

    /// The payload block whose entry is BAT index `i` (meaningless for a sector-bitmap index).
    pub fn block_of_index(&self, i: u64) -> u64 {
        i - i / (self.chunk_ratio + 1)
    }

    /// Bytes of the file a present payload block at BAT index `i` must hold: the whole block,
    /// except for the disk's last block, of which only the part the disk covers (qemu
    /// truncates a fixed image there when the disk is not a whole number of blocks).
    pub fn stored_len(&self, i: u64) -> u64 {
        let start = self.block_of_index(i).saturating_mul(self.block_size);
        self.block_size.min(self.size.saturating_sub(start)).max(1)
    }

    /// Whether BAT index `i` is a sector-bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }
}

/// Entries per BAT page of the paged store (32 KiB).
pub const PAGE_ENTRIES: u64 = 4096;

/// Checks that the BAT region holds the entries the geometry needs.
pub fn check_region(region_off: u64, region_len: u64, g: &Geometry) -> Result<()> {
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
    Ok(())
}

/// Reads entries `[first, first + n)` from the BAT region.
pub fn read_entries(
    storage: &dyn Storage,
    region_off: u64,
    first: u64,
    n: u64,
    limits: &Limits,
) -> Result<Vec<u64>> {
    let mut raw = blockdev::try_alloc(n.saturating_mul(8), limits, "bat")?;
    storage.read_at(&mut raw, region_off + first * 8)?;
    Ok(raw.chunks_exact(8).map(|c| le64(c, 0)).collect())
}

/// Reads all BAT entries.
pub fn load(
    storage: &dyn Storage,
    region_off: u64,
    region_len: u64,
    g: &Geometry,
    limits: &Limits,
) -> Result<Vec<u64>> {
    check_region(region_off, region_len, g)?;
    read_entries(storage, region_off, 0, g.entries, limits)
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

/// A problem found in the BAT: (field, file offset of the entry, message).
pub type Problem = (String, u64, String);

/// Overlapping entries named one by one before the rest are only counted.
const MAX_NAMED_CLASHES: usize = 64;

/// Validates BAT entries fed in index order (the whole table or page by page).
pub struct Validator<'a> {
    g: Geometry,
    bat_off: u64,
    file_len: u64,
    fixed: &'a [Span],
    units: u64,
    used: Vec<u8>,
    clashes: Vec<(usize, u64, u64)>,
    more: u64,
    problems: Vec<Problem>,
    /// PARTIALLY_PRESENT entries of the current chunk, resolved at its sector-bitmap entry.
    pending: Vec<usize>,
}

impl<'a> Validator<'a> {
    /// A validator for a file of `file_len` bytes whose fixed structures are `fixed`.
    pub fn new(
        g: &Geometry,
        bat_off: u64,
        file_len: u64,
        fixed: &'a [Span],
        limits: &Limits,
    ) -> Result<Self> {
        // Overlaps are found with one bit per MiB of the file (every structure is 1 MiB
        // aligned): a 64 TiB file needs 8 MiB of bits, whatever the number of blocks.
        let units = file_len.div_ceil(MIB);
        let used = blockdev::try_alloc(units.div_ceil(8), limits, "bat")?;
        let mut v = Validator {
            g: *g,
            bat_off,
            file_len,
            fixed,
            units,
            used,
            clashes: Vec::new(),
            more: 0,
            problems: Vec::new(),
            pending: Vec::new(),
        };
        for f in fixed {
            v.mark(f.start, f.end);
        }
        Ok(v)
    }

    fn mark(&mut self, start: u64, end: u64) -> bool {
        let mut clash = false;
        let mut u = start / MIB;
        while u < end.div_ceil(MIB).min(self.units) {
            if let Some(b) = self.used.get_mut((u / 8) as usize) {
                clash |= *b & (1 << (u % 8)) != 0;
                *b |= 1 << (u % 8);
            }
            u += 1;
        }
        clash
    }

    /// Feeds entries starting at BAT index `base`.
    pub fn feed(&mut self, base: usize, entries: &[u64]) {
        for (k, &e) in entries.iter().enumerate() {
            self.entry(base + k, e);
        }
    }

    /// Checks entry `i` (entries come in order).
    pub fn entry(&mut self, i: usize, e: u64) {
        let g = self.g;
        let idx = i as u64;
        let eoff = self.bat_off + idx * 8;
        let field = || format!("bat_entry[{i}]");
        let st = state(e);
        let off = offset(e);
        if e & BAT_RESERVED_MASK != 0 {
            self.problems
                .push((field(), eoff, format!("reserved bits set in {e:#x}")));
        }
        let is_sb = g.is_bitmap_index(idx);
        if is_sb {
            let pending = std::mem::take(&mut self.pending);
            if st != SB_PRESENT {
                for p in pending {
                    self.problems.push((
                        format!("bat_entry[{p}]"),
                        self.bat_off + p as u64 * 8,
                        format!(
                            "PARTIALLY_PRESENT block whose sector-bitmap entry {i} is not present"
                        ),
                    ));
                }
            }
        }
        let len = if is_sb {
            match st {
                SB_NOT_PRESENT => return,
                SB_PRESENT => SECTOR_BITMAP_BLOCK,
                _ => {
                    self.problems.push((
                        field(),
                        eoff,
                        format!("sector-bitmap entry has invalid state {st}"),
                    ));
                    return;
                }
            }
        } else {
            match st {
                PAYLOAD_NOT_PRESENT
                | PAYLOAD_UNDEFINED
                | PAYLOAD_ZERO
                | PAYLOAD_UNMAPPED
                | PAYLOAD_UNMAPPED_V095 => return,
                PAYLOAD_FULLY_PRESENT => g.stored_len(idx),
                PAYLOAD_PARTIALLY_PRESENT if g.has_parent => {
                    if self.pending.len() < 1 << 16 {
                        self.pending.push(i);
                    }
                    g.stored_len(idx)
                }
                PAYLOAD_PARTIALLY_PRESENT => {
                    self.problems.push((
                        field(),
                        eoff,
                        "PARTIALLY_PRESENT block in an image without a parent".into(),
                    ));
                    return;
                }
                _ => {
                    self.problems.push((
                        field(),
                        eoff,
                        format!("invalid payload block state {st}"),
                    ));
                    return;
                }
            }
        };
        if off < HEADER_SECTION {
            self.problems.push((
                field(),
                eoff,
                format!("block at file offset {off:#x} lies in the header section"),
            ));
            return;
        }
        let Some(end) = off.checked_add(len) else {
            self.problems
                .push((field(), eoff, "block offset overflows".into()));
            return;
        };
        if end > self.file_len {
            self.problems.push((
                field(),
                eoff,
                format!(
                    "block [{off:#x}, {end:#x}) lies past the end of the file ({:#x})",
                    self.file_len
                ),
            ));
            return;
        }
        if self.mark(off, end) {
            if self.clashes.len() < MAX_NAMED_CLASHES {
                self.clashes.push((i, off, end));
            } else {
                self.more += 1;
            }
        }
    }

    /// Whether some entry overlaps another structure or entry ([`Self::finish`] then names,
    /// from the whole table, what it overlaps).
    pub fn has_clashes(&self) -> bool {
        !self.clashes.is_empty()
    }

    /// Ends the validation; `all` (the whole table, when in memory) names clashing entries.
    pub fn finish(mut self, all: Option<&[u64]>) -> Vec<Problem> {
        let g = self.g;
        for p in std::mem::take(&mut self.pending) {
            self.problems.push((
                format!("bat_entry[{p}]"),
                self.bat_off + p as u64 * 8,
                "PARTIALLY_PRESENT block without a sector-bitmap entry".into(),
            ));
        }
        // Name what each clashing entry overlaps: a structure, else the first other entry of
        // the table (one pass over it for all clashes, which are capped: a hostile BAT can make
        // every entry clash).
        let clashes = std::mem::take(&mut self.clashes);
        let mut names: Vec<Option<String>> = clashes
            .iter()
            .map(|&(_, off, end)| {
                self.fixed
                    .iter()
                    .find(|f| f.start < end && off < f.end)
                    .map(|f| format!("the {} [{:#x}, {:#x})", f.what, f.start, f.end))
            })
            .collect();
        if let Some(all) = all {
            name_clashing_entries(&g, all, &clashes, &mut names);
        }
        for (&(i, off, end), other) in clashes.iter().zip(names) {
            let other = other.unwrap_or_else(|| "another BAT entry".to_string());
            self.problems.push((
                format!("bat_entry[{i}]"),
                self.bat_off + i as u64 * 8,
                format!("bat_entry[{i}] [{off:#x}, {end:#x}) overlaps {other}"),
            ));
        }
        if self.more > 0 {
            self.problems.push((
                "bat".to_string(),
                self.bat_off,
                format!("{} more BAT entries overlap other structures", self.more),
            ));
        }
        self.problems
    }
}

/// For each clash `(i, off, end)` not yet named, names the first entry `j != i` of `all` whose
/// block overlaps `[off, end)`. One pass over the table; each entry looks only at the clashes
/// that start before its end and less than the longest block before its start (found by
/// binary search over the sorted starts).
fn name_clashing_entries(
    g: &Geometry,
    all: &[u64],
    clashes: &[(usize, u64, u64)],
    names: &mut [Option<String>],
) {
    let mut order: Vec<usize> = (0..clashes.len())
        .filter(|&k| names.get(k).is_some_and(|n| n.is_none()))
        .collect();
    order.sort_by_key(|&k| clashes.get(k).map_or(0, |c| c.1));
    let starts: Vec<u64> = order
        .iter()
        .map(|&k| clashes.get(k).map_or(0, |c| c.1))
        .collect();
    let longest = g.block_size.max(SECTOR_BITMAP_BLOCK);
    let mut left = order.len();
    for (j, &x) in all.iter().enumerate() {
        if left == 0 {
            break;
        }
        let sb = g.is_bitmap_index(j as u64);
        let present = matches!(
            (sb, state(x)),
            (true, SB_PRESENT) | (false, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT)
        );
        if !present {
            continue;
        }
        let o = offset(x);
        let e = o.saturating_add(if sb {
            SECTOR_BITMAP_BLOCK
        } else {
            g.block_size
        });
        // Clashes overlapping [o, e) start before e and after o - longest.
        let lo = starts.partition_point(|&st| st.saturating_add(longest) <= o);
        let hi = starts.partition_point(|&st| st < e);
        for &k in order.get(lo..hi).unwrap_or_default() {
            let (Some(&(i, off, end)), Some(name)) = (clashes.get(k), names.get_mut(k)) else {
                continue;
            };
            if name.is_none() && j != i && o < end && off < e {
                *name = Some(format!("bat_entry[{j}] [{o:#x}, {e:#x})"));
                left -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: u8 = PAYLOAD_FULLY_PRESENT;

    fn problems(g: &Geometry, bat: &[u64], file_len: u64) -> Vec<Problem> {
        let fixed = [
            Span {
                start: 0,
                end: HEADER_SECTION,
                what: "header section".into(),
            },
            Span {
                start: 1 << 20,
                end: 2 << 20,
                what: "log".into(),
            },
        ];
        let mut v = Validator::new(g, 2 << 20, file_len, &fixed, &Limits::default()).unwrap();
        v.feed(0, bat);
        v.finish(Some(bat))
    }

    #[test]
    fn a_clash_names_the_first_other_entry() {
        let g = Geometry::new(64 << 20, 2 << 20, 512, false);
        let mut bat = vec![0u64; g.entries as usize];
        bat[0] = entry(FULL, 8 << 20);
        bat[3] = entry(FULL, 16 << 20);
        // Starts inside entry 0's block and reaches into entry 3's.
        bat[5] = entry(FULL, 9 << 20);
        // The same block as entry 3.
        bat[7] = entry(FULL, 16 << 20);
        let p = problems(&g, &bat, 64 << 20);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].0, "bat_entry[5]");
        assert!(
            p[0].2
                .ends_with("overlaps bat_entry[0] [0x800000, 0xa00000)"),
            "{p:?}"
        );
        assert_eq!(p[1].0, "bat_entry[7]");
        assert!(
            p[1].2
                .ends_with("overlaps bat_entry[3] [0x1000000, 0x1200000)"),
            "{p:?}"
        );
    }

    #[test]
    fn many_clashes_are_named_up_to_the_cap() {
        let g = Geometry::new(4 << 30, 1 << 20, 512, false);
        // Every block at the same offset: all but the first clash.
        let bat: Vec<u64> = (0..g.entries)
            .map(|i| {
                if g.is_bitmap_index(i) {
                    0
                } else {
                    entry(FULL, 8 << 20)
                }
            })
            .collect();
        let p = problems(&g, &bat, 64 << 20);
        assert_eq!(p.len(), MAX_NAMED_CLASHES + 1);
        assert!(p[..MAX_NAMED_CLASHES]
            .iter()
            .all(|x| x.2.ends_with("overlaps bat_entry[0] [0x800000, 0x900000)")));
        let more = g.blocks - 1 - MAX_NAMED_CLASHES as u64;
        assert_eq!(
            p[MAX_NAMED_CLASHES].2,
            format!("{more} more BAT entries overlap other structures")
        );
    }

    #[test]
    fn a_clash_with_a_structure_names_it() {
        let g = Geometry::new(8 << 20, 1 << 20, 512, false);
        let mut bat = vec![0u64; g.entries as usize];
        bat[1] = entry(FULL, 1 << 20);
        let p = problems(&g, &bat, 64 << 20);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "bat_entry[1]");
        assert!(
            p[0].2.ends_with("overlaps the log [0x100000, 0x200000)"),
            "{p:?}"
        );
    }
}
