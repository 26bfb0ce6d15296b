//! Consistency check of an open image: headers, region tables, metadata, BAT and log.

use blockdev::{CheckReport, Severity};

use crate::bat;
use crate::format::*;
use crate::header;
use crate::image::{fixed_spans, VhdxImage};

/// Checks `img` and reports every finding.
pub fn check(img: &VhdxImage) -> CheckReport {
    let mut r = CheckReport::new("vhdx");
    let storage = img.storage();
    let (geom, meta, regions) = img.parts();
    let file_len = storage.len().unwrap_or(0);

    // Headers.
    for (i, s) in img.header_slots().iter().enumerate() {
        if let Err(e) = s {
            r.add(
                Severity::Warning,
                &format!("header[{}]", i + 1),
                HEADER_OFFSETS.get(i).copied(),
                format!("header {} is not valid: {e}", i + 1),
            );
        }
    }
    if let (Ok(a), Ok(b)) = (&img.header_slots()[0], &img.header_slots()[1]) {
        if a.seq == b.seq && a != b {
            r.add(
                Severity::Corruption,
                "header.sequence_number",
                Some(HEADER_OFFSETS[1] + 8),
                "both headers carry the same sequence number but differ",
            );
        }
    }
    let (cur, _) = match img.current_header() {
        Some(c) => c,
        None => return r,
    };

    // Region tables: both must be valid and identical.
    let mut tables = Vec::new();
    for (t, off) in REGION_OFFSETS.iter().enumerate() {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        let parsed = storage
            .read_at(&mut b, *off)
            .and_then(|_| header::parse_region_table(&b, *off))
            .and_then(|entries| {
                header::validate_regions(
                    &entries,
                    *off,
                    file_len,
                    (cur.log_offset, u64::from(cur.log_length)),
                )
                .map(|_| entries)
            });
        match parsed {
            Ok(e) => tables.push(e),
            Err(e) => r.add(
                Severity::Corruption,
                e.field().unwrap_or("region_table"),
                e.offset().or(Some(*off)),
                format!("region table {}: {}", t + 1, e.message()),
            ),
        }
    }
    if let [a, b] = tables.as_slice() {
        if a != b {
            r.add(
                Severity::Warning,
                "region_table",
                Some(REGION_OFFSETS[1]),
                "the two region tables differ",
            );
        }
    }
    for e in &regions.entries {
        if (e.guid == BAT_REGION || e.guid == METADATA_REGION) && !e.required {
            r.add(
                Severity::Warning,
                "region_table.required",
                REGION_OFFSETS.get(regions.table).copied(),
                format!(
                    "known region {} is not marked required (qemu writes 0)",
                    e.guid
                ),
            );
        }
    }

    // Metadata: re-read for bounds.
    if let Err(e) =
        crate::metadata::read_metadata(storage, regions.metadata.offset, regions.metadata.length)
    {
        r.add(
            Severity::Corruption,
            e.field().unwrap_or("metadata"),
            e.offset(),
            e.message().to_string(),
        );
    }

    // Log.
    let ls = img.log_state();
    if ls.guid_without_entries {
        r.add(
            Severity::Warning,
            "header.log_guid",
            Some(HEADER_OFFSETS[0] + 48),
            "the header names a log (non-zero LogGuid) but the log holds no valid entry",
        );
    }
    if ls.in_memory {
        r.add(
            Severity::Warning,
            "log",
            Some(cur.log_offset),
            format!(
                "the log holds {} entries that were replayed in memory only (open read-write to replay them)",
                ls.replayed
            ),
        );
    }

    // BAT: one pass validates it and gathers the statistics (a paged table is read once).
    let spans = fixed_spans(regions, (cur.log_offset, u64::from(cur.log_length)));
    let mut validator =
        bat::Validator::new(geom, regions.bat.offset, file_len, &spans, img.limits());
    let mut allocated = 0u64;
    let mut end = HEADER_SECTION;
    for s in &spans {
        end = end.max(s.end);
    }
    let mut zero_with_offset: Vec<usize> = Vec::new();
    let walked = img.for_each_entry(|i, e| {
        if let Ok(v) = validator.as_mut() {
            v.entry(i, e);
        }
        let st = bat::state(e);
        let is_sb = geom.is_bitmap_index(i as u64);
        let len = match (is_sb, st) {
            (true, SB_PRESENT) => SECTOR_BITMAP_BLOCK,
            (false, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) => geom.stored_len(i as u64),
            (false, PAYLOAD_ZERO | PAYLOAD_NOT_PRESENT) if bat::offset(e) != 0 => {
                if zero_with_offset.len() < 64 {
                    zero_with_offset.push(i);
                }
                0
            }
            _ => 0,
        };
        if len > 0 {
            allocated += 1;
            end = end.max(bat::offset(e).saturating_add(len));
        }
    });
    match (walked, validator) {
        (Err(e), v) => {
            // What the validator saw before the failed read still counts.
            if let Ok(v) = v {
                for (field, off, msg) in v.finish(None) {
                    r.add(Severity::Corruption, &field, Some(off), msg);
                }
            }
            r.add(
                Severity::Corruption,
                "bat",
                Some(regions.bat.offset),
                format!("the BAT cannot be read: {e}"),
            );
        }
        (Ok(()), Ok(v)) => {
            // An in-memory table names the entries that clashing ones overlap (copied only then).
            let all = (v.has_clashes() && !img.bat_is_paged()).then(|| img.bat_entries());
            for (field, off, msg) in v.finish(all.as_deref()) {
                r.add(Severity::Corruption, &field, Some(off), msg);
            }
        }
        (Ok(()), Err(e)) => r.add(
            Severity::Corruption,
            e.field().unwrap_or("bat"),
            e.offset(),
            e.message().to_string(),
        ),
    }
    for i in zero_with_offset {
        r.add(
            Severity::Warning,
            &format!("bat_entry[{i}]"),
            Some(regions.bat.offset + i as u64 * 8),
            "ZERO/NOT_PRESENT entry with a non-zero file offset (Hyper-V refuses these)",
        );
    }
    if meta.has_parent
        && meta
            .locator
            .as_ref()
            .is_some_and(|l| l.linkages().is_empty())
    {
        r.add(
            Severity::Warning,
            "parent_locator.parent_linkage",
            Some(regions.metadata.offset),
            "the parent locator records no non-zero parent_linkage",
        );
    }
    r.stats.insert("allocated_blocks".into(), allocated.into());
    r.stats.insert("image_end_offset".into(), end.into());
    r.stats.insert("file_length".into(), file_len.into());
    r
}
