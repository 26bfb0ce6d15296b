//! `check`: rebuilds every refcount from the metadata and compares with the stored ones.
//!
//! Findings: refcount lower than the references (corruption), higher (leak), COPIED flags
//! that disagree with the refcount, metadata clusters referenced more than once
//! (overlaps), references past the end of the file, and unreadable or invalid entries.

use std::collections::HashMap;

use blockdev::{
    BackingRequest, BlockDevice, CheckReport, Error, ErrorKind, OpenGate, Result, Severity, Storage,
};

use crate::format::*;
use crate::image::{read_table, OpenOptions, Qcow2Image};
use crate::table::Mapping;

struct Ctx<'a> {
    img: &'a Qcow2Image,
    cs: u64,
    nclusters: u64,
    refs: Vec<u32>,
    /// Per metadata cluster: its kind, how many references were to that kind, and whether
    /// it was also referenced as another kind.
    meta: HashMap<u64, (&'static str, u32, bool)>,
    report: CheckReport,
    past_eof: u64,
    end: u64,
    /// (field, entry offset, host cluster, copied) of active entries, for the COPIED check.
    copied: Vec<(String, u64, u64, bool)>,
    compressed: u64,
    allocated: u64,
}

impl Ctx<'_> {
    fn inc(&mut self, off: u64, len: u64, field: &str) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = off.saturating_add(len - 1) / self.cs;
        self.end = self.end.max(last.saturating_add(1).saturating_mul(self.cs));
        for c in first..=last {
            match usize::try_from(c).ok().and_then(|i| self.refs.get_mut(i)) {
                Some(r) if c < self.nclusters => *r = r.saturating_add(1),
                _ => {
                    self.past_eof += 1;
                    if self.past_eof <= 100 {
                        self.report.add(
                            Severity::Corruption,
                            field,
                            Some(off),
                            format!("reference to cluster {c} lies past the end of the file"),
                        );
                    }
                    return;
                }
            }
        }
    }

    fn meta(&mut self, off: u64, len: u64, kind: &'static str) {
        self.inc(off, len, kind);
        if len == 0 {
            return;
        }
        // Clusters past the end of the file were reported by `inc`.
        let last = (off.saturating_add(len - 1) / self.cs).min(self.nclusters);
        for c in off / self.cs..=last {
            let m = self.meta.entry(c).or_insert((kind, 0, false));
            m.1 = m.1.saturating_add(1);
            m.2 |= m.0 != kind;
        }
    }

    fn corrupt(&mut self, field: &str, off: u64, msg: impl Into<String>) {
        self.report.add(Severity::Corruption, field, Some(off), msg);
    }

    fn walk_l1(&mut self, l1_off: u64, l1_size: u32, active: bool, name: &str) {
        let img = self.img;
        let geo = img.geo;
        self.meta(l1_off, u64::from(l1_size) * 8, "l1_table");
        let raw = match read_table(
            img.storage.as_ref(),
            l1_off,
            u64::from(l1_size) * 8,
            &img.limits,
            "l1_table",
        ) {
            Ok(r) => r,
            Err(e) => return self.corrupt(&format!("{name}l1_table"), l1_off, e.to_string()),
        };
        let l1 = decode_u64s(&raw);
        let words = if geo.extended { 2 } else { 1 };
        for (i, &e) in l1.iter().enumerate() {
            let at = l1_off + i as u64 * 8;
            let field = format!("{name}l1_entry[{i}]");
            let l2 = match geo.decode_l1(e, &field, at) {
                Ok(0) => continue,
                Ok(o) => o,
                Err(err) => {
                    self.corrupt(&field, at, err.message().to_string());
                    continue;
                }
            };
            self.meta(l2, self.cs, "l2_table");
            if active {
                self.copied
                    .push((field.clone(), at, l2 / self.cs, e & OFLAG_COPIED != 0));
            }
            let t = match read_table(img.storage.as_ref(), l2, self.cs, &img.limits, "l2_table") {
                Ok(r) => decode_u64s(&r),
                Err(err) => {
                    self.corrupt(
                        &field,
                        at,
                        format!("L2 table unreadable: {}", err.message()),
                    );
                    continue;
                }
            };
            let n = t.len() / words;
            for j in 0..n {
                let e2 = t.get(j * words).copied().unwrap_or(0);
                let bm = if geo.extended {
                    t.get(j * words + 1).copied().unwrap_or(0)
                } else {
                    0
                };
                let eat = l2 + (j * words * 8) as u64;
                let f2 = format!("{name}l2_entry[{i}][{j}]");
                match geo.decode_l2(e2, bm, &f2, eat) {
                    Err(err) => self.corrupt(&f2, eat, err.message().to_string()),
                    Ok(Mapping::Unallocated) | Ok(Mapping::Zero { host: None }) => {}
                    Ok(Mapping::Normal { host, copied }) => {
                        self.allocated += u64::from(active);
                        if !geo.data_file {
                            self.inc(host, self.cs, &f2);
                            if active {
                                self.copied.push((f2, eat, host / self.cs, copied));
                            }
                        }
                    }
                    Ok(Mapping::Sub { host, .. }) => {
                        if host != 0 && !geo.data_file {
                            self.allocated += u64::from(active);
                            self.inc(host, self.cs, &f2);
                            if active {
                                self.copied
                                    .push((f2, eat, host / self.cs, e2 & OFLAG_COPIED != 0));
                            }
                        }
                    }
                    Ok(Mapping::Zero { host: Some(host) }) => {
                        if !geo.data_file {
                            self.inc(host, self.cs, &f2);
                            if active {
                                self.copied
                                    .push((f2, eat, host / self.cs, e2 & OFLAG_COPIED != 0));
                            }
                        }
                    }
                    Ok(Mapping::Compressed { offset, len }) => {
                        self.allocated += u64::from(active);
                        self.compressed += u64::from(active);
                        if e2 & OFLAG_COPIED != 0 {
                            self.corrupt(&f2, eat, "compressed cluster has the COPIED flag");
                        }
                        self.inc(offset & !511, len + (offset & 511), &f2);
                    }
                }
            }
        }
    }
}

/// Rebuilt and stored refcounts of an image.
pub(crate) struct Rebuilt {
    pub report: CheckReport,
    pub refs: Vec<u32>,
    pub stored: Vec<u64>,
}

pub(crate) fn rebuild(img: &Qcow2Image) -> Result<Rebuilt> {
    let h = img.header();
    let cs = h.cluster_size();
    let file_len = img.storage.len()?;
    let nclusters = file_len.div_ceil(cs);
    if nclusters.saturating_mul(12) > img.limits.max_alloc.saturating_mul(2) {
        return Err(Error::limit(
            "file",
            0,
            "image too large to check within the memory limit",
        ));
    }
    let mut cx = Ctx {
        img,
        cs,
        nclusters,
        refs: vec![0u32; usize::try_from(nclusters).unwrap_or(0)],
        meta: HashMap::new(),
        report: CheckReport::new("qcow2"),
        past_eof: 0,
        end: 0,
        copied: Vec::new(),
        compressed: 0,
        allocated: 0,
    };
    if h.incompatible & INCOMPAT_DIRTY != 0 {
        cx.report.add(
            Severity::Warning,
            "incompatible_features",
            Some(72),
            "dirty bit set: stored refcounts may be stale",
        );
    }
    if h.incompatible & INCOMPAT_CORRUPT != 0 {
        cx.report.add(
            Severity::Warning,
            "incompatible_features",
            Some(72),
            "corrupt bit set",
        );
    }
    cx.meta(0, cs, "header");
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    cx.meta(h.refcount_table_offset, rt_bytes, "refcount_table");
    let rt = decode_u64s(&read_table(
        img.storage.as_ref(),
        h.refcount_table_offset,
        rt_bytes,
        &img.limits,
        "refcount_table",
    )?);
    let epb = h.refcount_block_entries();
    let mut stored = vec![0u64; usize::try_from(nclusters).unwrap_or(0)];
    // Refcounts kept for clusters past the end of the file: how many, and the first few
    // (field, block offset, cluster, refcount) to name.
    let mut past_end = (0u64, Vec::new());
    let mut seen_blocks = std::collections::HashSet::new();
    for (i, &e) in rt.iter().enumerate() {
        let at = h.refcount_table_offset + i as u64 * 8;
        let field = format!("refcount_table[{i}]");
        let off = e & REFTABLE_OFFSET_MASK;
        if e & !REFTABLE_OFFSET_MASK != 0 {
            cx.corrupt(&field, at, "reserved bits set");
        }
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            cx.corrupt(
                &field,
                at,
                format!("refcount block offset {off:#x} not cluster aligned"),
            );
            continue;
        }
        cx.meta(off, cs, "refcount_block");
        // A block named twice is overlapping metadata (reported below) and past the end of
        // the file a reference to nothing (reported by `meta`): neither is read again.
        if off >= file_len || !seen_blocks.insert(off) {
            continue;
        }
        let block = match read_table(img.storage.as_ref(), off, cs, &img.limits, "refcount_block") {
            Ok(b) => b,
            Err(err) => {
                cx.corrupt(&field, at, err.message().to_string());
                continue;
            }
        };
        for k in 0..epb {
            let c = i as u64 * epb + k;
            let v = refcount_get(&block, h.refcount_order, usize::try_from(k).unwrap_or(0));
            if let Some(s) = usize::try_from(c).ok().and_then(|ci| stored.get_mut(ci)) {
                *s = v;
            } else if v != 0 {
                past_end.0 += 1;
                if past_end.1.len() < 100 {
                    past_end.1.push((field.clone(), off, c, v));
                }
            }
        }
    }
    cx.walk_l1(h.l1_table_offset, h.l1_size, true, "");
    match img.snapshots() {
        Ok(list) => {
            let list = list.to_vec();
            if let (Some(first), Some(last)) = (list.first(), list.last()) {
                let len = last.entry_offset + last.entry_len - first.entry_offset;
                cx.meta(h.snapshots_offset, len, "snapshot_table");
            }
            for s in &list {
                if let Err(e) = crate::snapshot::check_snapshot_l1(s, cs, file_len) {
                    cx.corrupt("snapshot", s.entry_offset, e.message().to_string());
                    continue;
                }
                cx.walk_l1(
                    s.l1_table_offset,
                    s.l1_size,
                    false,
                    &format!("snapshot[{}].", s.name),
                );
            }
        }
        Err(m) => {
            let m = m.to_string();
            cx.corrupt("snapshots_offset", 64, m);
        }
    }
    if let Some(b) = &h.bitmaps {
        walk_bitmaps(&mut cx, b.directory_offset, b.directory_size, b.nb_bitmaps);
    }
    if let Some((off, len)) = h.crypto {
        cx.meta(off, len, "crypto_header");
    }
    // Refcounts past the end of the file are leaks when nothing references a cluster there
    // (references past the end are corruptions, reported by `inc`).
    let mut leaks = 0u64;
    if cx.past_eof == 0 && past_end.0 > 0 {
        leaks = past_end.0;
        for (field, off, c, v) in &past_end.1 {
            cx.report.add(
                Severity::Leak,
                field,
                Some(*off),
                format!("cluster {c} past the end of the file has refcount {v}"),
            );
        }
        if past_end.0 > past_end.1.len() as u64 {
            cx.report.add(
                Severity::Leak,
                "refcount_table",
                Some(h.refcount_table_offset),
                format!(
                    "{} more clusters past the end of the file have refcounts",
                    past_end.0 - past_end.1.len() as u64
                ),
            );
        }
    }
    // Compare.
    let mut errors = 0u64;
    for (c, (&r, &s)) in cx.refs.iter().zip(stored.iter()).enumerate() {
        let r = u64::from(r);
        if r == s {
            continue;
        }
        let off = c as u64 * cs;
        if s < r {
            errors += 1;
            cx.report.add(
                Severity::Corruption,
                "refcount",
                Some(off),
                format!("cluster {c} refcount={s} reference={r}"),
            );
        } else {
            leaks += 1;
            cx.report.add(
                Severity::Leak,
                "refcount",
                Some(off),
                format!("leaked cluster {c} refcount={s} reference={r}"),
            );
        }
    }
    // Overlapping metadata.
    let meta: Vec<(u64, (&'static str, u32, bool))> =
        cx.meta.iter().map(|(&c, &m)| (c, m)).collect();
    for (c, (kind, as_kind, mixed)) in meta {
        let r = usize::try_from(c)
            .ok()
            .and_then(|i| cx.refs.get(i))
            .copied()
            .unwrap_or(0);
        // An L2 table shared by the active L1 table and snapshots' is referenced once per
        // table (its refcount says so); anything else referencing it is an overlap.
        let shared_l2 = kind == "l2_table" && !mixed && r == as_kind;
        if r > 1 && !shared_l2 {
            cx.corrupt(kind, c * cs, format!("cluster {c} holds the {kind} and is referenced {r} times (overlapping metadata)"));
        }
    }
    // COPIED flags of the active tables.
    for (field, at, c, copied) in std::mem::take(&mut cx.copied) {
        // Past the end of the file: that reference is reported already.
        let Some(&s) = usize::try_from(c).ok().and_then(|i| stored.get(i)) else {
            continue;
        };
        // Refcount 0 too (qemu-img counts that mismatch beside the refcount error).
        if (s == 1) != copied {
            cx.corrupt(
                &field,
                at,
                format!(
                    "OFLAG_COPIED mismatch: refcount={s} but COPIED is {}",
                    if copied { "set" } else { "clear" }
                ),
            );
        }
    }
    // As qemu-img counts it: past the last cluster in use or with a refcount (leaks included).
    let end = stored
        .iter()
        .rposition(|&r| r != 0)
        .map_or(0, |c| (c as u64 + 1).saturating_mul(cs))
        .max(cx.end);
    cx.report
        .stats
        .insert("image_end_offset".into(), end.into());
    cx.report
        .stats
        .insert("allocated_clusters".into(), cx.allocated.into());
    cx.report
        .stats
        .insert("compressed_clusters".into(), cx.compressed.into());
    cx.report
        .stats
        .insert("total_clusters".into(), h.size.div_ceil(cs).into());
    cx.report
        .stats
        .insert("leaked_clusters".into(), leaks.into());
    cx.report
        .stats
        .insert("refcount_errors".into(), errors.into());
    Ok(Rebuilt {
        report: cx.report,
        refs: cx.refs,
        stored,
    })
}

fn walk_bitmaps(cx: &mut Ctx<'_>, dir_off: u64, dir_size: u64, nb: u32) {
    let img = cx.img;
    cx.meta(dir_off, dir_size, "bitmap_directory");
    let Ok(dir) = read_table(
        img.storage.as_ref(),
        dir_off,
        dir_size,
        &img.limits,
        "bitmap_directory",
    ) else {
        return cx.corrupt("bitmap_directory", dir_off, "bitmap directory unreadable");
    };
    let mut off = 0usize;
    for i in 0..nb {
        let Some(e) = dir.get(off..off + 24) else {
            return cx.corrupt(
                "bitmap_directory",
                dir_off + off as u64,
                "bitmap directory entry runs past the directory",
            );
        };
        let table_off = be64(e, 0);
        let table_size = u64::from(be32(e, 8));
        let name_size = usize::from(be16(e, 18));
        let extra = usize::try_from(be32(e, 20))
            .unwrap_or(usize::MAX)
            .min(1 << 20);
        let field = format!("bitmap[{i}]");
        if !table_off.is_multiple_of(cx.cs) || table_size * 8 > (64 << 20) {
            cx.corrupt(
                &field,
                dir_off + off as u64,
                "bitmap table offset/size invalid",
            );
        } else {
            cx.meta(table_off, table_size * 8, "bitmap_table");
            if let Ok(t) = read_table(
                img.storage.as_ref(),
                table_off,
                table_size * 8,
                &img.limits,
                "bitmap_table",
            ) {
                for (k, &be) in decode_u64s(&t).iter().enumerate() {
                    let o = be & OFFSET_MASK;
                    if o != 0 {
                        cx.inc(o, cx.cs, &format!("{field}.table[{k}]"));
                    }
                }
            }
        }
        off = (off + 24 + extra + name_size).div_ceil(8) * 8;
    }
}

pub(crate) fn check_image(img: &Qcow2Image) -> Result<CheckReport> {
    Ok(rebuild(img)?.report)
}

struct RepairGate;

impl OpenGate for RepairGate {
    fn open_backing(&self, _req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>> {
        Err(Error::new(
            ErrorKind::BackingDenied,
            "repair does not open backing files",
        ))
    }
    fn open_data_file(&self, _req: &BackingRequest<'_>, _w: bool) -> Result<Box<dyn Storage>> {
        Err(Error::unsupported(
            "leak repair of images with an external data file is not supported",
        ))
    }
    fn skip_backing(&self) -> bool {
        true
    }
}

/// `check -r leaks`: lowers every refcount that is higher than the references to the
/// rebuilt value, in place, and returns how many clusters were fixed. Corruptions are left
/// alone (and make this fail before anything is written).
pub fn repair_leaks(storage: Box<dyn Storage>) -> Result<u64> {
    if !storage.is_writable() {
        return Err(Error::read_only(
            "leak repair needs the image opened for writing",
        ));
    }
    let img = Qcow2Image::open(storage, &RepairGate, &OpenOptions::default())?;
    let rb = rebuild(&img)?;
    if rb.report.corruptions() > 0 {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "image has {} corruption(s): leak repair refused",
                rb.report.corruptions()
            ),
        ));
    }
    let h = img.header();
    let cs = h.cluster_size();
    let epb = h.refcount_block_entries();
    let rt = decode_u64s(&read_table(
        img.storage.as_ref(),
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        &img.limits,
        "refcount_table",
    )?);
    let mut fixed = 0u64;
    let mut blocks: HashMap<u64, Vec<u8>> = HashMap::new();
    for (c, (&r, &s)) in rb.refs.iter().zip(rb.stored.iter()).enumerate() {
        if s <= u64::from(r) {
            continue;
        }
        let c = c as u64;
        let b = rt
            .get(usize::try_from(c / epb).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0)
            & REFTABLE_OFFSET_MASK;
        if b == 0 {
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = blocks.entry(b) {
            e.insert(read_table(
                img.storage.as_ref(),
                b,
                cs,
                &img.limits,
                "refcount_block",
            )?);
        }
        if let Some(block) = blocks.get_mut(&b) {
            refcount_set(
                block,
                h.refcount_order,
                usize::try_from(c % epb).unwrap_or(0),
                u64::from(r),
            );
            fixed += 1;
        }
    }
    // Refcounts of clusters past the end of the file (no cluster there references anything).
    let nclusters = img.storage.len()?.div_ceil(cs);
    for (i, &e) in rt.iter().enumerate() {
        let b = e & REFTABLE_OFFSET_MASK;
        let first = i as u64 * epb;
        if b == 0 || first.saturating_add(epb) <= nclusters {
            continue;
        }
        let block = match blocks.entry(b) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(read_table(
                img.storage.as_ref(),
                b,
                cs,
                &img.limits,
                "refcount_block",
            )?),
        };
        for k in nclusters.saturating_sub(first)..epb {
            let k = usize::try_from(k).unwrap_or(usize::MAX);
            if refcount_get(block, h.refcount_order, k) != 0 {
                refcount_set(block, h.refcount_order, k, 0);
                fixed += 1;
            }
        }
    }
    for (b, block) in &blocks {
        img.storage.write_at(block, *b)?;
    }
    img.storage.flush()?;
    Ok(fixed)
}
