//! `check`: every finding about one VHD layer, not only the first.

use blockdev::{CheckReport, Result, Severity};

use crate::format::{
    bit_msb, checksum, BatmapHeader, DiskType, DynHeader, Footer, BAT_UNUSED, FOOTER_SIZE, SECTOR,
};
use crate::header::FooterSource;
use crate::image::VhdImage;

/// Checks footer, footer copy, dynamic header, BAT, bitmaps, batmap and leaks.
pub(crate) fn check(img: &VhdImage) -> Result<CheckReport> {
    let mut r = CheckReport::new("vhd");
    let st = img.storage.as_ref();
    let len = st.len()?;
    let fi = &img.fi;
    // Trailing footer.
    if len >= FOOTER_SIZE {
        let mut b = [0u8; 512];
        st.read_at(&mut b, len - FOOTER_SIZE)?;
        if !Footer::has_cookie(&b) {
            r.add(
                Severity::Corruption,
                "footer",
                Some(len - FOOTER_SIZE),
                "footer missing at the end of the file",
            );
        } else if checksum(&b, 64) != Footer::parse(&b).checksum {
            r.add(
                Severity::Corruption,
                "footer.checksum",
                Some(len - FOOTER_SIZE + 64),
                "footer checksum is wrong",
            );
        }
    }
    // The two sizes differ in most images; it matters when the CHS size is used (data past
    // it is hidden) or when the rule was forced.
    let differ = fi.footer.geometry.bytes() != fi.footer.current_size;
    if differ && (img.rule == crate::header::SizeRule::Chs || img.rule_forced) {
        r.add(
            Severity::Warning,
            "footer.current_size",
            Some(48),
            format!(
                "CHS size {} differs from current_size {} ({} is used)",
                fi.footer.geometry.bytes(),
                fi.footer.current_size,
                img.rule.name()
            ),
        );
    }
    if fi.footer.saved_state != 0 {
        r.add(
            Severity::Warning,
            "footer.saved_state",
            None,
            "saved-state flag is set",
        );
    }
    let Some(d) = &img.dynamic else {
        r.stats.insert("file_length".into(), len.into());
        return Ok(r);
    };
    // Footer copy.
    let mut head = [0u8; 512];
    st.read_at(&mut head, 0)?;
    if fi.source == FooterSource::Trailing && head != fi.footer.raw {
        let why = if !Footer::has_cookie(&head) {
            "footer copy at offset 0 is missing"
        } else if checksum(&head, 64) != Footer::parse(&head).checksum {
            "footer copy at offset 0 has a wrong checksum"
        } else {
            "footer copy at offset 0 differs from the trailing footer"
        };
        r.add(Severity::Corruption, "footer_copy", Some(0), why);
    }
    // Dynamic header checksum (the open validated it; the file may have changed since).
    let mut hb = [0u8; 1024];
    st.read_at(&mut hb, d.header_offset)?;
    let h = DynHeader::parse(&hb);
    if h.computed_checksum() != h.checksum {
        r.add(
            Severity::Corruption,
            "dynamic_header.checksum",
            Some(d.header_offset + 36),
            "dynamic header checksum is wrong",
        );
    }
    for l in &img.locators {
        if let Some(e) = &l.error {
            r.add(
                Severity::Warning,
                &format!("parent_locator[{}]", l.slot),
                Some(l.entry_offset(d.header_offset)),
                e.clone(),
            );
        }
    }
    let s = d
        .state
        .read()
        .map_err(|_| blockdev::Error::new(blockdev::ErrorKind::Io, "lock poisoned"))?;
    // Re-validate the BAT as it is now (in-place writes may have changed it).
    let data_limit = if fi.source == FooterSource::Trailing {
        len.saturating_sub(FOOTER_SIZE)
    } else {
        len
    };
    let v = crate::bat::table::validate(&s.bat, d.bitmap_size + d.block_size, &d.meta, data_limit);
    for (blk, why) in &v.bad {
        r.add(
            Severity::Corruption,
            &format!("bat_entry[{blk}]"),
            Some(d.header.table_offset + blk * 4),
            why.clone(),
        );
    }
    // Gaps smaller than a block are alignment padding (Windows aligns blocks to 4 KiB and
    // pads the BAT); only room for a whole block or more counts as leaked space.
    let span = d.bitmap_size + d.block_size;
    let padding: u64 = v.gaps.iter().filter(|g| g.1 < span).map(|g| g.1).sum();
    r.stats.insert("padding_bytes".into(), padding.into());
    for &(start, glen) in v.gaps.iter().filter(|g| g.1 >= span) {
        r.add(
            Severity::Leak,
            "unreferenced",
            Some(start),
            format!("{glen} bytes not referenced by the BAT or the metadata"),
        );
    }
    // Bitmaps and the Xen batmap.
    let spb = d.block_size / SECTOR;
    let mut allocated = 0u64;
    for (i, &e) in s.bat.iter().enumerate() {
        if e == BAT_UNUSED || v.bad.contains_key(&(i as u64)) {
            continue;
        }
        allocated += 1;
        let at = u64::from(e) * SECTOR;
        let mut map = vec![0u8; d.bitmap_size as usize];
        if let Err(err) = st.read_at(&mut map, at) {
            r.add(
                Severity::Corruption,
                &format!("bitmap[{i}]"),
                Some(at),
                err.to_string(),
            );
            continue;
        }
        if let Some(bm) = &s.batmap {
            let full = (0..spb).all(|k| {
                if d.lsb_bitmaps {
                    crate::format::bit_lsb(&map, k)
                } else {
                    bit_msb(&map, k)
                }
            });
            if bit_msb(bm, i as u64) && !full {
                r.add(
                    Severity::Corruption,
                    &format!("batmap[{i}]"),
                    d.batmap_header.map(|(_, h)| h.offset),
                    "batmap marks the block fully allocated but its sector bitmap is not full",
                );
            }
        }
    }
    if let Some((hoff, _)) = d.batmap_header {
        let mut sec = [0u8; 512];
        st.read_at(&mut sec, hoff)?;
        let on_disk = BatmapHeader::parse(&sec);
        let ok = match (on_disk, &s.batmap) {
            (Some(bh), Some(bm)) => {
                d.batmap_valid && BatmapHeader::map_checksum(bm, bh.version) == bh.checksum
            }
            _ => false,
        };
        if !ok {
            r.add(
                Severity::Corruption,
                "batmap.checksum",
                Some(hoff + 24),
                "Xen batmap is invalid (header, checksum or bounds)",
            );
        }
    }
    if fi.kind == DiskType::Differencing && img.parent.is_none() {
        r.add(
            Severity::Warning,
            "parent",
            None,
            "parent not opened: its identity was not verified",
        );
    }
    r.stats.insert("allocated_blocks".into(), allocated.into());
    r.stats
        .insert("total_blocks".into(), (s.bat.len() as u64).into());
    r.stats.insert("image_end_offset".into(), len.into());
    r.stats.insert("block_size".into(), d.block_size.into());
    Ok(r)
}
