//! Loading and validating the BAT: entries inside the file, not overlapping metadata or
//! each other (V14-V16).

use std::collections::BTreeMap;

use blockdev::{try_alloc, Limits, Result, Storage};

use crate::format::{BAT_UNUSED, SECTOR};

/// A metadata region of the file (footer copy, header, BAT, batmap, locator data).
#[derive(Debug, Clone)]
pub(crate) struct Region {
    /// First byte.
    pub start: u64,
    /// Length.
    pub len: u64,
    /// What it is.
    pub what: String,
}

/// Reads `count` big-endian entries at `offset`.
pub(crate) fn load(
    storage: &dyn Storage,
    offset: u64,
    count: u64,
    limits: &Limits,
) -> Result<Vec<u32>> {
    let bytes = count.saturating_mul(4);
    let raw = try_alloc(bytes, limits, "dynamic_header.max_table_entries")?;
    let mut raw = raw;
    storage.read_at(&mut raw, offset)?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| {
            let mut a = [0u8; 4];
            a.copy_from_slice(c);
            u32::from_be_bytes(a)
        })
        .collect())
}

/// The result of validating the BAT.
#[derive(Debug, Default)]
pub(crate) struct Validation {
    /// Blocks whose entry is unusable, with the reason.
    pub bad: BTreeMap<u64, String>,
    /// End of the last valid block (or of the metadata), i.e. the first free byte.
    pub next_free: u64,
    /// Gaps between blocks and metadata, (start, len): leaked space.
    pub gaps: Vec<(u64, u64)>,
}

/// Checks every allocated entry: block (bitmap + data) inside `[0, data_limit)`, no overlap
/// with `meta` regions, no overlap with other blocks.
pub(crate) fn validate(
    entries: &[u32],
    block_span: u64,
    meta: &[Region],
    data_limit: u64,
) -> Validation {
    let mut v = Validation::default();
    let meta_end = meta
        .iter()
        .map(|r| r.start.saturating_add(r.len))
        .max()
        .unwrap_or(0);
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for (i, &e) in entries.iter().enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        let start = u64::from(e) * SECTOR;
        let end = start.saturating_add(block_span);
        if end > data_limit {
            v.bad.insert(
                i as u64,
                format!("block at {start:#x} (+{block_span}) runs past the end of the data area at {data_limit:#x} (truncated image?)"),
            );
            continue;
        }
        if let Some(r) = meta
            .iter()
            .find(|r| start < r.start.saturating_add(r.len) && r.start < end)
        {
            v.bad.insert(
                i as u64,
                format!("block at {start:#x} overlaps the {}", r.what),
            );
            continue;
        }
        spans.push((start, i as u64));
    }
    spans.sort_unstable();
    let mut prev: Option<(u64, u64)> = None;
    let mut aliased = Vec::new();
    for &(start, blk) in &spans {
        if let Some((pstart, pblk)) = prev {
            if start < pstart + block_span {
                aliased.push((pblk, start));
                aliased.push((blk, pstart));
            }
        }
        prev = Some((start, blk));
    }
    for (blk, other) in aliased {
        v.bad
            .insert(blk, format!("block overlaps another block at {other:#x}"));
    }
    let mut pos = meta_end;
    let mut max_end = meta_end;
    for &(start, blk) in &spans {
        if v.bad.contains_key(&blk) {
            continue;
        }
        if start > pos {
            v.gaps.push((pos, start - pos));
        }
        pos = pos.max(start + block_span);
        max_end = max_end.max(start + block_span);
    }
    v.next_free = max_end;
    if data_limit > max_end {
        v.gaps.push((max_end, data_limit - max_end));
    }
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_overlaps_and_gaps() {
        let meta = vec![Region {
            start: 0,
            len: 2048,
            what: "header".into(),
        }];
        let span = 1024;
        let entries = [4, BAT_UNUSED, 4, 1, 100, 12];
        let v = validate(&entries, span, &meta, 100 * 512);
        assert!(v.bad.contains_key(&0) && v.bad.contains_key(&2));
        assert!(v.bad.get(&3).unwrap().contains("header"));
        assert!(v.bad.get(&4).unwrap().contains("past the end"));
        assert!(!v.bad.contains_key(&5));
        assert_eq!(v.next_free, 12 * 512 + 1024);
    }
}
