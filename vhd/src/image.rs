//! An open VHD: reads, in-place writes, block status, info.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};

use blockdev::{
    check_range, extent_at_host, is_zero, try_alloc, BackingInfo, BackingRequest, BlockDevice,
    CheckReport, Error, ErrorKind, Extent, ExtentKind, ImageInfo, Limits, OpenGate, Result,
    Storage,
};
use serde_json::{json, Value};

use crate::bat::table::{self, Region, Validation};
use crate::format::{
    bit_lsb, bit_msb, bitmap_size, fourcc_text, set_bit_lsb, set_bit_msb, BatmapHeader, DiskType,
    DynHeader, Footer, BAT_UNUSED, FOOTER_SIZE, HEADER_SIZE, MAX_DYNAMIC_SIZE, SECTOR,
    VHD_EPOCH_OFFSET,
};
use crate::header::{
    compare_copy, parent_candidates, parent_missing, read_footer, read_header, read_locators,
    FooterInfo, FooterSource, Locator, SizeRule,
};

/// How to open a VHD.
pub struct OpenParams<'a> {
    /// Opens the parent of a differencing disk.
    pub gate: &'a dyn OpenGate,
    /// Open for writing.
    pub writable: bool,
    /// Resource limits.
    pub limits: Limits,
    /// Depth of this image in its chain.
    pub depth: u32,
    /// Overrides the size rule.
    pub size_rule: Option<SizeRule>,
}

/// State of a dynamic/differencing disk that writes change.
#[derive(Debug)]
pub(crate) struct DynState {
    /// BAT entries (sector numbers), one per block of the disk.
    pub bat: Vec<u32>,
    /// Blocks whose entry is unusable.
    pub bad: BTreeMap<u64, String>,
    /// Where the next block goes (the trailing footer's offset).
    pub alloc_at: u64,
    /// Xen batmap, when present and valid.
    pub batmap: Option<Vec<u8>>,
}

/// Dynamic/differencing specifics.
#[derive(Debug)]
pub(crate) struct Dyn {
    pub header: DynHeader,
    pub header_offset: u64,
    pub block_size: u64,
    pub bitmap_size: u64,
    pub lsb_bitmaps: bool,
    pub meta: Vec<Region>,
    pub batmap_header: Option<(u64, BatmapHeader)>,
    pub batmap_valid: bool,
    pub state: RwLock<DynState>,
}

/// An open VHD image (fixed, dynamic or differencing).
pub struct VhdImage {
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) fi: FooterInfo,
    pub(crate) size: u64,
    pub(crate) rule: SizeRule,
    pub(crate) rule_forced: bool,
    pub(crate) dynamic: Option<Dyn>,
    pub(crate) locators: Vec<Locator>,
    pub(crate) parent: Option<Box<dyn BlockDevice>>,
    pub(crate) parent_resolved: Option<String>,
    pub(crate) warnings: Vec<String>,
    pub(crate) writable: bool,
    pub(crate) write_lock: Mutex<()>,
}

impl std::fmt::Debug for VhdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdImage")
            .field("kind", &self.fi.kind)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn lock_err() -> Error {
    Error::new(ErrorKind::Io, "vhd state lock poisoned")
}

impl VhdImage {
    /// Opens a VHD; a differencing disk's parent is opened through `params.gate`.
    pub fn open(storage: Box<dyn Storage>, params: &OpenParams<'_>) -> Result<VhdImage> {
        let writable = params.writable;
        if writable && !storage.is_writable() {
            return Err(Error::read_only("storage opened read-only"));
        }
        let fi = read_footer(storage.as_ref(), writable)?;
        let mut warnings = fi.warnings.clone();
        if let Some(w) = compare_copy(storage.as_ref(), &fi)? {
            warnings.push(w);
        }
        let f = &fi.footer;
        let default_rule = SizeRule::default_for(f);
        let rule = params.size_rule.unwrap_or(default_rule);
        let size = match rule {
            SizeRule::Chs => f.geometry.bytes(),
            SizeRule::Current => f.current_size,
        };
        if f.geometry.bytes() != f.current_size
            && (rule == SizeRule::Chs || params.size_rule.is_some())
        {
            warnings.push(format!(
                "CHS size {} differs from current_size {}; {} is used",
                f.geometry.bytes(),
                f.current_size,
                rule.name()
            ));
        }
        let end_limit = fi.trailing_offset.unwrap_or(fi.file_len);
        let mut image = VhdImage {
            storage,
            fi: fi.clone(),
            size,
            rule,
            rule_forced: params.size_rule.is_some(),
            dynamic: None,
            locators: Vec::new(),
            parent: None,
            parent_resolved: None,
            warnings,
            writable,
            write_lock: Mutex::new(()),
        };
        if fi.kind == DiskType::Fixed {
            if f.data_offset != u64::MAX && f.data_offset != 0xFFFF_FFFF {
                return Err(Error::corrupt(
                    "footer.data_offset",
                    end_limit + 16,
                    format!(
                        "a fixed disk's data offset must be all ones, not {:#x}",
                        f.data_offset
                    ),
                ));
            }
            if size > end_limit {
                return Err(Error::corrupt(
                    "footer.current_size",
                    end_limit + 48,
                    format!(
                        "fixed disk of {size} bytes does not fit in a file of {} bytes",
                        fi.file_len
                    ),
                ));
            }
            if writable && !size.is_multiple_of(SECTOR) {
                return Err(Error::unsupported(
                    "refusing to write a disk whose size is not a whole number of sectors",
                )
                .with_field("footer.current_size"));
            }
            return Ok(image);
        }
        if size > MAX_DYNAMIC_SIZE {
            return Err(Error::unsupported(format!(
                "disk size {size} exceeds the VHD maximum of 2040 GiB"
            ))
            .with_field("footer.current_size")
            .with_offset(48));
        }
        if writable && !size.is_multiple_of(SECTOR) {
            return Err(Error::unsupported(
                "refusing to write a disk whose size is not a whole number of sectors",
            )
            .with_field("footer.current_size"));
        }
        let hi = read_header(image.storage.as_ref(), &fi)?;
        let h = &hi.header;
        let bs = u64::from(h.block_size);
        let needed = size.div_ceil(bs);
        if needed > u64::from(h.max_table_entries) {
            return Err(Error::corrupt(
                "dynamic_header.max_table_entries",
                hi.offset + 28,
                format!(
                    "page table too small: {} entries of {bs} bytes cannot hold {size} bytes",
                    h.max_table_entries
                ),
            ));
        }
        let bat_bytes = u64::from(h.max_table_entries) * 4;
        let bat_padded = bat_bytes.div_ceil(SECTOR) * SECTOR;
        let t = h.table_offset;
        let t_end = t.checked_add(bat_bytes);
        let overlaps_header =
            t < hi.offset + HEADER_SIZE && t_end.map(|e| e > hi.offset).unwrap_or(true);
        if !t.is_multiple_of(SECTOR) || t < FOOTER_SIZE || overlaps_header || t >= end_limit {
            return Err(Error::corrupt(
                "dynamic_header.table_offset",
                hi.offset + 16,
                format!("BAT offset {t:#x} is misaligned, overlaps the footer or header, or lies past the end"),
            ));
        }
        if t_end.map(|e| e > end_limit).unwrap_or(true) {
            return Err(Error::corrupt(
                "dynamic_header.max_table_entries",
                hi.offset + 28,
                format!(
                    "a BAT of {} entries at {t:#x} runs past the end of the file",
                    h.max_table_entries
                ),
            ));
        }
        let bat = table::load(image.storage.as_ref(), t, needed, &params.limits)?;
        let locators = read_locators(image.storage.as_ref(), &hi, end_limit);
        let mut meta = vec![
            Region {
                start: 0,
                len: FOOTER_SIZE,
                what: "footer copy".into(),
            },
            Region {
                start: hi.offset,
                len: HEADER_SIZE,
                what: "dynamic header".into(),
            },
            Region {
                start: t,
                len: bat_padded,
                what: "BAT".into(),
            },
        ];
        for l in &locators {
            if let Some((start, _space)) = l.data_range() {
                // The payload, not the declared space (which some writers overstate), is
                // what blocks must not overlap.
                meta.push(Region {
                    start,
                    len: u64::from(l.entry.data_length).div_ceil(SECTOR) * SECTOR,
                    what: format!("parent locator {} data", l.slot),
                });
            }
        }
        let is_tap = &f.creator_app == b"tap\0";
        let lsb_bitmaps = is_tap && f.creator_version == 1;
        let mut batmap_header = None;
        let mut batmap = None;
        let mut batmap_valid = false;
        if is_tap {
            let hoff = t + bat_padded;
            if hoff + SECTOR <= end_limit {
                let mut sec = [0u8; 512];
                image.storage.read_at(&mut sec, hoff)?;
                if let Some(bh) = BatmapHeader::parse(&sec) {
                    let map_len = u64::from(bh.size_sectors) * SECTOR;
                    let ok = bh.offset >= hoff + SECTOR
                        && bh.offset.is_multiple_of(SECTOR)
                        && bh
                            .offset
                            .checked_add(map_len)
                            .map(|e| e <= end_limit)
                            .unwrap_or(false)
                        && map_len >= needed.div_ceil(8)
                        && map_len <= params.limits.max_alloc;
                    meta.push(Region {
                        start: hoff,
                        len: SECTOR,
                        what: "batmap header".into(),
                    });
                    if ok {
                        meta.push(Region {
                            start: bh.offset,
                            len: map_len,
                            what: "batmap".into(),
                        });
                        let mut map = try_alloc(map_len, &params.limits, "batmap")?;
                        image.storage.read_at(&mut map, bh.offset)?;
                        if BatmapHeader::map_checksum(&map, bh.version) == bh.checksum {
                            batmap_valid = true;
                        } else {
                            image.warnings.push(
                                "Xen batmap checksum is wrong (the batmap is ignored)".into(),
                            );
                        }
                        batmap = Some(map);
                    } else {
                        image
                            .warnings
                            .push("Xen batmap header points outside the file (ignored)".into());
                    }
                    batmap_header = Some((hoff, bh));
                }
            }
        }
        let bm = bitmap_size(h.block_size);
        let Validation { bad, .. } = table::validate(&bat, bm + bs, &meta, end_limit);
        if writable {
            if let Some((blk, why)) = bad.iter().next() {
                return Err(Error::corrupt(
                    &format!("bat_entry[{blk}]"),
                    t + blk * 4,
                    format!("refusing to write an image with a bad BAT entry: {why}"),
                ));
            }
        }
        // New blocks start on a sector (BAT entries count sectors), even after a footer that
        // does not.
        let alloc_at = end_limit.div_ceil(SECTOR).saturating_mul(SECTOR);
        image.locators = locators;
        image.dynamic = Some(Dyn {
            header: h.clone(),
            header_offset: hi.offset,
            block_size: bs,
            bitmap_size: bm,
            lsb_bitmaps,
            meta,
            batmap_header,
            batmap_valid,
            state: RwLock::new(DynState {
                bat,
                bad,
                alloc_at,
                batmap: if batmap_valid { batmap } else { None },
            }),
        });
        if fi.kind == DiskType::Differencing {
            image.open_parent(params)?;
        }
        Ok(image)
    }

    fn open_parent(&mut self, params: &OpenParams<'_>) -> Result<()> {
        let Some(d) = &self.dynamic else {
            return Ok(());
        };
        if params.gate.skip_backing() {
            return Ok(());
        }
        let candidates = parent_candidates(&self.locators, &d.header.parent_name);
        let req = BackingRequest {
            referrer: self.storage.path(),
            candidates,
            format: Some("vhd".into()),
            depth: params.depth + 1,
        };
        let parent = params.gate.open_backing(&req)?;
        let want = d.header.parent_uuid;
        if !params.gate.ignore_parent_id() {
            match parent.as_any().downcast_ref::<VhdImage>() {
                Some(p) if p.fi.footer.unique_id == want => {}
                Some(p) => {
                    return Err(Error::new(
                        ErrorKind::BackingMismatch,
                        format!(
                            "parent UUID {} does not match the UUID {} recorded in the differencing disk",
                            blockdev::format_uuid(&p.fi.footer.unique_id),
                            blockdev::format_uuid(&want)
                        ),
                    )
                    .with_field("dynamic_header.parent_uuid"));
                }
                None => {
                    return Err(Error::new(
                        ErrorKind::BackingMismatch,
                        "the parent of a differencing VHD must be a VHD",
                    ));
                }
            }
        }
        if parent.size() < self.size {
            return Err(Error::new(
                ErrorKind::BackingMismatch,
                format!(
                    "parent is {} bytes, smaller than the differencing disk ({} bytes)",
                    parent.size(),
                    self.size
                ),
            ));
        }
        if let Some(p) = parent.as_any().downcast_ref::<VhdImage>() {
            self.parent_resolved = p.storage.path().map(|x| x.display().to_string());
            // Windows records 0; a recorded time that differs from the parent's is only
            // worth a warning (the UUID is the identity).
            let ts = d.header.parent_timestamp;
            let mtime = p
                .storage
                .path()
                .and_then(|x| std::fs::metadata(x).ok())
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|t| t.as_secs().saturating_sub(VHD_EPOCH_OFFSET));
            if let Some(m) = mtime {
                if ts != 0 && u64::from(ts) != m {
                    self.warnings.push(format!(
                        "parent modification time {} differs from the recorded {}",
                        vhd_time_text(u32::try_from(m).unwrap_or(u32::MAX)),
                        vhd_time_text(ts)
                    ));
                }
            }
        }
        self.parent = Some(parent);
        Ok(())
    }

    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        &self.fi.footer
    }

    /// The disk type.
    pub fn disk_type(&self) -> DiskType {
        self.fi.kind
    }

    /// The dynamic header, for dynamic and differencing disks.
    pub fn dynamic_header(&self) -> Option<&DynHeader> {
        self.dynamic.as_ref().map(|d| &d.header)
    }

    /// Warnings found while opening.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The decoded parent locators.
    pub fn locators(&self) -> &[Locator] {
        &self.locators
    }

    /// The storage underneath.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> u64 {
        self.dynamic
            .as_ref()
            .and_then(|d| {
                d.state
                    .read()
                    .ok()
                    .map(|s| s.bat.iter().filter(|&&e| e != BAT_UNUSED).count() as u64)
            })
            .unwrap_or(0)
    }

    fn bitmap_test(&self, d: &Dyn, map: &[u8], i: u64) -> bool {
        if d.lsb_bitmaps {
            bit_lsb(map, i)
        } else {
            bit_msb(map, i)
        }
    }

    fn bitmap_set(&self, d: &Dyn, map: &mut [u8], i: u64) {
        if d.lsb_bitmaps {
            set_bit_lsb(map, i)
        } else {
            set_bit_msb(map, i)
        }
    }

    /// Looks up a block: `Ok(None)` when unallocated, else the file offset of its bitmap.
    fn lookup(&self, d: &Dyn, blk: u64) -> Result<Option<u64>> {
        let s = d.state.read().map_err(|_| lock_err())?;
        if let Some(why) = s.bad.get(&blk) {
            return Err(Error::corrupt(
                &format!("bat_entry[{blk}]"),
                d.header.table_offset + blk * 4,
                why.clone(),
            ));
        }
        let i = usize::try_from(blk).map_err(|_| Error::out_of_bounds(blk, 0, 0))?;
        match s.bat.get(i) {
            Some(&e) if e != BAT_UNUSED => Ok(Some(u64::from(e) * SECTOR)),
            _ => Ok(None),
        }
    }

    fn read_bitmap(&self, d: &Dyn, at: u64) -> Result<Vec<u8>> {
        let mut map = vec![0u8; usize::try_from(d.bitmap_size).unwrap_or(0)];
        self.storage.read_at(&mut map, at)?;
        Ok(map)
    }

    fn read_parent(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match &self.parent {
            Some(p) => p.read_at(buf, off),
            None if self.fi.kind == DiskType::Differencing => Err(parent_missing()),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_dyn(&self, d: &Dyn, buf: &mut [u8], offset: u64) -> Result<()> {
        let bs = d.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let blk = off / bs;
            let within = off % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let part = buf
                .get_mut(done..done + n)
                .ok_or_else(|| Error::out_of_bounds(off, n as u64, self.size))?;
            match self.lookup(d, blk)? {
                None => self.read_parent(part, off)?,
                Some(at) => {
                    let data = at + d.bitmap_size + within;
                    if self.fi.kind == DiskType::Differencing {
                        let map = self.read_bitmap(d, at)?;
                        let mut p = 0usize;
                        while p < n {
                            let sec = (within + p as u64) / SECTOR;
                            let sec_end = (sec + 1) * SECTOR - within;
                            let bit = self.bitmap_test(d, &map, sec);
                            let mut q = (sec_end as usize).min(n);
                            while q < n
                                && self.bitmap_test(d, &map, (within + q as u64) / SECTOR) == bit
                            {
                                q = (q + SECTOR as usize).min(n);
                            }
                            let sub = part.get_mut(p..q).unwrap_or_default();
                            if bit {
                                self.storage.read_at(sub, data + p as u64)?;
                            } else {
                                self.read_parent(sub, off + p as u64)?;
                            }
                            p = q;
                        }
                    } else {
                        self.storage.read_at(part, data)?;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("image opened read-only"));
        }
        check_range(self.size, offset, len)
    }

    fn write_dyn(&self, d: &Dyn, buf: &[u8], offset: u64) -> Result<()> {
        let _g = self.write_lock.lock().map_err(|_| lock_err())?;
        let end = offset + buf.len() as u64;
        let head = offset / SECTOR * SECTOR;
        let tail = end.div_ceil(SECTOR) * SECTOR;
        if head == offset && tail == end {
            return self.write_aligned(d, buf, offset);
        }
        if tail - head <= 4 << 20 {
            // Small unaligned writes go through one aligned buffer, so that a block is
            // allocated (or its bitmap updated) once, with the whole write.
            let mut tmp = vec![0u8; (tail - head) as usize];
            self.read_dyn(d, tmp.get_mut(..SECTOR as usize).unwrap_or_default(), head)?;
            if tail - SECTOR > head {
                let from = (tail - SECTOR - head) as usize;
                self.read_dyn(d, tmp.get_mut(from..).unwrap_or_default(), tail - SECTOR)?;
            }
            let from = (offset - head) as usize;
            if let Some(dst) = tmp.get_mut(from..from + buf.len()) {
                dst.copy_from_slice(buf);
            }
            return self.write_aligned(d, &tmp, head);
        }
        let mut pos = offset;
        // A partial first sector: read, patch, write back whole.
        if head != offset || end - head < SECTOR {
            let upto = end.min(head + SECTOR);
            let mut sec = [0u8; SECTOR as usize];
            self.read_dyn(d, &mut sec, head)?;
            let from = (offset - head) as usize;
            let n = (upto - offset) as usize;
            if let (Some(dst), Some(src)) = (sec.get_mut(from..from + n), buf.get(..n)) {
                dst.copy_from_slice(src);
            }
            self.write_aligned(d, &sec, head)?;
            pos = upto;
        }
        // Whole sectors straight from the caller's buffer.
        let mid_end = end / SECTOR * SECTOR;
        if mid_end > pos {
            let src = buf
                .get((pos - offset) as usize..(mid_end - offset) as usize)
                .unwrap_or_default();
            self.write_aligned(d, src, pos)?;
            pos = mid_end;
        }
        // A partial last sector.
        if pos < end {
            let mut sec = [0u8; SECTOR as usize];
            self.read_dyn(d, &mut sec, pos)?;
            let n = (end - pos) as usize;
            if let (Some(dst), Some(src)) = (sec.get_mut(..n), buf.get((pos - offset) as usize..)) {
                dst.copy_from_slice(src);
            }
            self.write_aligned(d, &sec, pos)?;
        }
        Ok(())
    }

    /// Writes sector-aligned data; the write lock is held.
    fn write_aligned(&self, d: &Dyn, buf: &[u8], offset: u64) -> Result<()> {
        let bs = d.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let blk = off / bs;
            let within = off % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let part = buf.get(done..done + n).unwrap_or_default();
            match self.lookup(d, blk)? {
                None => self.allocate(d, blk, within, part)?,
                Some(at) => {
                    self.storage.write_at(part, at + d.bitmap_size + within)?;
                    self.mark(d, blk, at, within, n as u64)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Sets the bitmap bits of `[within, within+n)` of block `blk` whose bitmap is at `at`.
    fn mark(&self, d: &Dyn, blk: u64, at: u64, within: u64, n: u64) -> Result<()> {
        let mut map = self.read_bitmap(d, at)?;
        let before = map.clone();
        let first = within / SECTOR;
        let last = (within + n).div_ceil(SECTOR);
        for s in first..last {
            self.bitmap_set(d, &mut map, s);
        }
        if map != before {
            // The data must be durable before a bit says it is there (§3.3 order, as for a
            // new block): a crash between the two would otherwise hide the parent's sectors.
            self.storage.flush()?;
            self.storage.write_at(&map, at)?;
        }
        self.update_batmap(d, blk, &map)
    }

    fn update_batmap(&self, d: &Dyn, blk: u64, map: &[u8]) -> Result<()> {
        let Some((hoff, bh)) = d.batmap_header else {
            return Ok(());
        };
        let spb = d.block_size / SECTOR;
        let full = (0..spb).all(|s| self.bitmap_test(d, map, s));
        if !full {
            return Ok(());
        }
        let mut st = d.state.write().map_err(|_| lock_err())?;
        let Some(bm) = st.batmap.as_mut() else {
            return Ok(());
        };
        if bit_msb(bm, blk) {
            return Ok(());
        }
        set_bit_msb(bm, blk);
        let sector = (blk / 8) / SECTOR * SECTOR;
        let chunk = bm
            .get(sector as usize..(sector + SECTOR) as usize)
            .unwrap_or_default();
        self.storage.write_at(chunk, bh.offset + sector)?;
        // Only the checksum changes: the header's version, marker and keyhash (bytes 28..)
        // stay as blktap wrote them.
        let mut head = [0u8; SECTOR as usize];
        self.storage.read_at(&mut head, hoff)?;
        let sum = BatmapHeader::map_checksum(bm, bh.version).to_be_bytes();
        if let Some(field) = head.get_mut(24..28) {
            field.copy_from_slice(&sum);
        }
        self.storage.write_at(&head, hoff)?;
        Ok(())
    }

    /// Appends a new block for `blk` holding `data` at `within` (§3.3 order: new footer
    /// beyond the block, block content, flush, then the BAT entry).
    fn allocate(&self, d: &Dyn, blk: u64, within: u64, data: &[u8]) -> Result<()> {
        let at = d.state.read().map_err(|_| lock_err())?.alloc_at;
        let span = d.bitmap_size + d.block_size;
        let new_end = at
            .checked_add(span)
            .filter(|e| e / SECTOR <= u64::from(u32::MAX))
            .ok_or_else(|| Error::unsupported("the VHD file would exceed 2 TiB"))?;
        self.storage.write_at(&self.fi.footer.raw, new_end)?;
        // The new footer is durable before the block overwrites the old one: a disk may keep
        // unflushed writes in any order, and a file whose last sector is not a footer is lost.
        self.storage.flush()?;
        if !is_zero(data) {
            self.storage.write_at(data, at + d.bitmap_size + within)?;
        }
        let mut map = vec![0u8; usize::try_from(d.bitmap_size).unwrap_or(0)];
        if self.fi.kind == DiskType::Dynamic {
            // A new dynamic block is zero-filled: every sector holds (zero) data.
            let spb = d.block_size / SECTOR;
            for s in 0..spb {
                self.bitmap_set(d, &mut map, s);
            }
            self.storage.write_at(&map, at)?;
            self.storage.flush()?;
            self.set_bat(d, blk, at, new_end)?;
            self.update_batmap(d, blk, &map)
        } else {
            let first = within / SECTOR;
            let last = (within + data.len() as u64).div_ceil(SECTOR);
            for s in first..last {
                self.bitmap_set(d, &mut map, s);
            }
            self.storage.write_at(&map, at)?;
            self.storage.flush()?;
            self.set_bat(d, blk, at, new_end)?;
            self.update_batmap(d, blk, &map)
        }
    }

    fn set_bat(&self, d: &Dyn, blk: u64, at: u64, new_end: u64) -> Result<()> {
        let sector = u32::try_from(at / SECTOR)
            .map_err(|_| Error::unsupported("block offset beyond 2 TiB"))?;
        self.storage
            .write_at(&sector.to_be_bytes(), d.header.table_offset + blk * 4)?;
        let mut st = d.state.write().map_err(|_| lock_err())?;
        if let Some(e) = st.bat.get_mut(blk as usize) {
            *e = sector;
        }
        st.alloc_at = new_end;
        Ok(())
    }

    fn zero_dyn(&self, d: &Dyn, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; 1 << 20];
        let bs = d.block_size;
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let blk = off / bs;
            let within = off % bs;
            let n = (bs - within).min(len - done).min(zeros.len() as u64);
            let skip = self.fi.kind == DiskType::Dynamic && self.lookup(d, blk)?.is_none();
            if !skip {
                self.write_dyn(d, zeros.get(..n as usize).unwrap_or_default(), off)?;
            }
            done += n;
        }
        Ok(())
    }

    fn status_dyn(&self, d: &Dyn, offset: u64, max_len: u64) -> Result<Extent> {
        let bs = d.block_size;
        let blk = offset / bs;
        let within = offset % bs;
        let in_block = (bs - within).min(self.size - offset);
        match self.lookup(d, blk)? {
            None => {
                let want = max_len.max(1).min(self.size - offset);
                let mut len = in_block;
                let st = d.state.read().map_err(|_| lock_err())?;
                let mut b = blk + 1;
                while len < want {
                    let free = usize::try_from(b)
                        .ok()
                        .and_then(|i| st.bat.get(i))
                        .map(|&e| e == BAT_UNUSED && !st.bad.contains_key(&b))
                        .unwrap_or(false);
                    if !free {
                        break;
                    }
                    len = (len + bs).min(self.size - offset);
                    b += 1;
                }
                Ok(Extent::new(offset, len, ExtentKind::Unallocated))
            }
            Some(at) => {
                let host = at + d.bitmap_size + within;
                if self.fi.kind == DiskType::Dynamic {
                    return extent_at_host(self.storage.as_ref(), offset, in_block, host);
                }
                let map = self.read_bitmap(d, at)?;
                let sec = within / SECTOR;
                let bit = self.bitmap_test(d, &map, sec);
                let mut end = ((sec + 1) * SECTOR).min(within + in_block);
                while end < within + in_block && self.bitmap_test(d, &map, end / SECTOR) == bit {
                    end = (end + SECTOR).min(within + in_block);
                }
                let len = end - within;
                if bit {
                    extent_at_host(self.storage.as_ref(), offset, len, host)
                } else {
                    Ok(Extent::new(offset, len, ExtentKind::Unallocated))
                }
            }
        }
    }

    /// The dialect: `xen` for blktap images (creator `tap`), else `standard`.
    pub fn dialect(&self) -> &'static str {
        if &self.fi.footer.creator_app == b"tap\0" {
            "xen"
        } else {
            "standard"
        }
    }
}

/// Formats a VHD timestamp as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn vhd_time_text(ts: u32) -> String {
    let t = u64::from(ts) + VHD_EPOCH_OFFSET;
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let dd = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

impl BlockDevice for VhdImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        match &self.dynamic {
            None => self.storage.read_at(buf, offset),
            Some(d) => self.read_dyn(d, buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        match &self.dynamic {
            None => self.storage.write_at(buf, offset),
            Some(d) => self.write_dyn(d, buf, offset),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> Result<()> {
        self.check_write(offset, len)?;
        match &self.dynamic {
            None => {
                if deallocate && self.storage.punch_hole(offset, len)? {
                    return Ok(());
                }
                let zeros = vec![0u8; 1 << 20];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64);
                    self.storage
                        .write_at(zeros.get(..n as usize).unwrap_or_default(), offset + done)?;
                    done += n;
                }
                Ok(())
            }
            Some(d) => self.zero_dyn(d, offset, len),
        }
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        if offset >= self.size {
            return Err(Error::out_of_bounds(offset, 1, self.size));
        }
        match &self.dynamic {
            None => {
                // Holes of the file read as zeros: report them so copies skip them.
                let rest = self.size - offset;
                extent_at_host(self.storage.as_ref(), offset, rest, offset)
            }
            Some(d) => self.status_dyn(d, offset, max_len),
        }
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.parent.as_deref()
    }

    fn info(&self) -> ImageInfo {
        let f = &self.fi.footer;
        let mut info = ImageInfo::new("vhd", self.size);
        info.subformat = Some(self.fi.kind.name().to_string());
        info.actual_size = Some(self.fi.file_len);
        info.set("creator_app", f.creator_text());
        info.set(
            "creator_version",
            format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
        );
        info.set("creator_host", fourcc_text(&f.creator_host));
        info.set("disk_type", self.fi.kind.name());
        info.set("current_size", f.current_size);
        info.set("chs_size", f.geometry.bytes());
        info.set("original_size", f.original_size);
        info.set("size_rule", self.rule.name());
        info.set(
            "size_rule_source",
            if self.rule_forced {
                "option"
            } else {
                "creator"
            },
        );
        info.set(
            "geometry",
            format!(
                "{}/{}/{}",
                f.geometry.cylinders, f.geometry.heads, f.geometry.sectors
            ),
        );
        info.set("uuid", blockdev::format_uuid(&f.unique_id));
        info.set("timestamp", vhd_time_text(f.timestamp));
        info.set("saved_state", f.saved_state != 0);
        info.set(
            "footer_source",
            match self.fi.source {
                FooterSource::Trailing => "end",
                FooterSource::CopyAtZero => "copy at offset 0",
            },
        );
        info.set("dialect", self.dialect());
        if let Some(d) = &self.dynamic {
            let h = &d.header;
            info.cluster_size = Some(d.block_size);
            info.set("block_size", d.block_size);
            info.set("max_table_entries", h.max_table_entries);
            info.set("allocated_blocks", self.allocated_blocks());
            info.set(
                "bitmap_bit_order",
                if d.lsb_bitmaps {
                    "lsb-first"
                } else {
                    "msb-first"
                },
            );
            if d.batmap_header.is_some() {
                info.set("batmap_valid", d.batmap_valid);
            }
            if self.fi.kind == DiskType::Differencing {
                info.set("parent_name", h.parent_name.clone());
                info.set("parent_uuid", blockdev::format_uuid(&h.parent_uuid));
                info.set("parent_timestamp", vhd_time_text(h.parent_timestamp));
                let locs: Vec<Value> = self
                    .locators
                    .iter()
                    .map(|l| {
                        json!({
                            "slot": l.slot,
                            "platform": l.code_text(),
                            "data_space": l.entry.data_space,
                            "data_length": l.entry.data_length,
                            "data_offset": l.entry.data_offset,
                            "path": l.path,
                            "error": l.error,
                        })
                    })
                    .collect();
                info.set("parent_locators", Value::Array(locs));
                info.backing = Some(BackingInfo {
                    reference: parent_candidates(&self.locators, &h.parent_name)
                        .first()
                        .map(|c| c.text().to_string())
                        .unwrap_or_default(),
                    format: Some("vhd".into()),
                    resolved_path: self.parent_resolved.clone(),
                    resolved: self.parent.is_some(),
                });
            }
        }
        if !self.warnings.is_empty() {
            info.set("warnings", self.warnings.clone());
        }
        info
    }

    fn check(&self) -> Result<CheckReport> {
        crate::check::check(self)
    }

    fn allocation_granularity(&self) -> u64 {
        self.dynamic
            .as_ref()
            .map(|d| d.block_size)
            .unwrap_or(SECTOR)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
