//! [`VhdxImage`]: an open VHDX file implementing [`BlockDevice`].

use std::any::Any;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use blockdev::{
    check_range, BackingInfo, BackingRequest, BlockDevice, Candidate, CheckReport, Error,
    ErrorKind, Extent, ExtentKind, ImageInfo, Limits, OpenGate, Result, SectorSizes, Storage,
};

use crate::bat::{self, Geometry};
use crate::format::*;
use crate::header::{self, Header, Regions};
use crate::log::{self, Overlay};
use crate::metadata::{self, Metadata};
use crate::table::{Table, View};

/// How to open an image.
pub struct OpenOptions<'a> {
    /// Opens the parent of a differencing image.
    pub gate: &'a dyn OpenGate,
    /// Open for writing (a dirty log is then replayed to disk).
    pub writable: bool,
    /// Resource limits.
    pub limits: &'a Limits,
    /// Depth of this image in its chain (top image 0).
    pub depth: u32,
}

/// What happened to the log at open.
#[derive(Debug, Clone, Default)]
pub struct LogState {
    /// LogGuid of the header at open.
    pub log_guid: Guid,
    /// Entries replayed.
    pub replayed: usize,
    /// Whether the replay lives only in memory (read-only open).
    pub in_memory: bool,
    /// A non-zero LogGuid without any valid entry.
    pub guid_without_entries: bool,
}

struct HeaderState {
    current: Header,
    slot: usize,
    /// Whether FileWriteGuid was renewed in this open.
    file_renewed: bool,
    /// Whether DataWriteGuid was renewed in this open (before the first guest data change).
    data_renewed: bool,
    /// Log sequence number of the next entry.
    log_seq: u64,
}

/// How one range of a block reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Data(u64),
    Zero,
    Parent,
}

/// The sector bitmap bytes of one block: (block, bytes, first sector index in the chunk).
type BitmapCache = Option<(u64, Vec<u8>, u64)>;

/// An open VHDX image.
pub struct VhdxImage {
    storage: Box<dyn Storage>,
    path: Option<PathBuf>,
    writable: bool,
    creator: String,
    geom: Geometry,
    meta: Metadata,
    regions: Regions,
    slots: [std::result::Result<Header, String>; 2],
    hdr: Mutex<HeaderState>,
    log_state: LogState,
    bat: Table,
    limits: Limits,
    parent: Option<Box<dyn BlockDevice>>,
    parent_path: Option<String>,
    write_lock: Mutex<()>,
}

/// Most blocks one logged update covers. Each update is one log entry, so it is atomic. Its
/// metadata is at most 64 BAT entries (2 log sectors, 3 with a chunk's bitmap entry) and the
/// bitmaps of the two partial ends (16 log sectors each at most: 256 MiB blocks of 512-byte
/// sectors), under the 254 sectors of the smallest log; a longer write is several updates.
const UPDATE_BLOCKS: u64 = 64;

fn lock_err() -> Error {
    Error::new(ErrorKind::Io, "vhdx lock poisoned")
}

impl VhdxImage {
    /// Opens an image.
    pub fn open(storage: Box<dyn Storage>, opts: &OpenOptions<'_>) -> Result<VhdxImage> {
        let path = storage.path().map(PathBuf::from);
        let r = Self::open_inner(storage, opts);
        match (r, &path) {
            (Err(e), Some(p)) => Err(e.with_path(p)),
            (r, _) => r,
        }
    }

    fn open_inner(storage: Box<dyn Storage>, opts: &OpenOptions<'_>) -> Result<VhdxImage> {
        let writable = opts.writable;
        if writable && !storage.is_writable() {
            return Err(Error::read_only("storage is not writable"));
        }
        let creator = header::read_file_identifier(&*storage)?;
        let hs = header::read_headers(&*storage)?;
        let file_len = storage.len()?;
        let slot_off = HEADER_OFFSETS.get(hs.slot).copied().unwrap_or(0);
        let h = hs.current.clone();
        header::check_log_location(&h, slot_off, file_len)?;
        let log_off = h.log_offset;
        let log_len = u64::from(h.log_length);
        let mut log_state = LogState {
            log_guid: h.log_guid,
            ..LogState::default()
        };
        let mut storage = storage;
        let mut current = h.clone();
        let mut slot = hs.slot;
        if !h.log_guid.is_zero() && log_len > 0 {
            let img = log::read_log(&*storage, log_off, log_len, opts.limits)?;
            let sc = log::scan(&img, &h.log_guid).map_err(|e| e.with_offset(log_off))?;
            if sc.replay.is_empty() {
                // Nothing to replay (a writer can crash after setting LogGuid and before its
                // first entry is durable). A read-write open clears the LogGuid.
                log_state.guid_without_entries = true;
            }
            let new_len = log::check_replay(&sc.replay, file_len, log_off, log_len)?;
            log_state.replayed = sc.replay.len();
            {
                if writable {
                    let mut nh = current.clone();
                    if !sc.replay.is_empty() {
                        // A new FileWriteGuid before the first change, replay included
                        // (MS-VHDX 2.2.2); the LogGuid stays so the log is still found.
                        nh.file_write_guid = Guid::random()?;
                        write_header_slot(&*storage, &mut nh, &mut slot)?;
                    }
                    log::replay_to_disk(&*storage, &sc.replay, new_len)?;
                    nh.log_guid = Guid::ZERO;
                    for _ in 0..2 {
                        write_header_slot(&*storage, &mut nh, &mut slot)?;
                    }
                    current = nh;
                } else if !sc.replay.is_empty() {
                    log_state.in_memory = true;
                    storage = Box::new(Overlay::new(storage, &sc.replay, new_len));
                }
            }
        }
        let file_len = storage.len()?;
        let log_span = (log_off, log_len);
        let regions = header::read_regions(&*storage, file_len, log_span)?;
        let meta =
            metadata::read_metadata(&*storage, regions.metadata.offset, regions.metadata.length)?;
        let geom = Geometry::new(
            meta.disk_size,
            u64::from(meta.block_size),
            meta.logical,
            meta.has_parent,
        );
        bat::check_region(regions.bat.offset, regions.bat.length, &geom)?;
        let spans = fixed_spans(&regions, log_span);
        // In memory when the table fits both the cache budget and the allocation limit.
        let whole = opts.limits.max_cache.min(opts.limits.max_alloc);
        let mut validator =
            bat::Validator::new(&geom, regions.bat.offset, file_len, &spans, opts.limits)?;
        let (bat, problems) = if geom.entries.saturating_mul(8) <= whole {
            let all = bat::load(
                &*storage,
                regions.bat.offset,
                regions.bat.length,
                &geom,
                opts.limits,
            )?;
            validator.feed(0, &all);
            let problems = validator.finish(Some(&all));
            (Table::full(all), problems)
        } else {
            crate::table::for_each_on_disk(
                &*storage,
                regions.bat.offset,
                geom.entries,
                opts.limits,
                |i, e| validator.entry(i, e),
            )?;
            (
                Table::paged(regions.bat.offset, geom.entries, opts.limits.max_cache),
                validator.finish(None),
            )
        };
        if let Some((field, off, msg)) = problems.into_iter().next() {
            return Err(Error::corrupt(&field, off, msg));
        }
        let mut img = VhdxImage {
            path: storage.path().map(PathBuf::from),
            storage,
            writable,
            creator,
            geom,
            meta,
            regions,
            slots: hs.slots,
            hdr: Mutex::new(HeaderState {
                current,
                slot,
                file_renewed: false,
                data_renewed: false,
                log_seq: 1,
            }),
            log_state,
            bat,
            limits: opts.limits.clone(),
            parent: None,
            parent_path: None,
            write_lock: Mutex::new(()),
        };
        if img.meta.has_parent && !opts.gate.skip_backing() {
            img.open_parent(opts)?;
        }
        Ok(img)
    }

    /// The locator's candidate paths, best first.
    pub fn parent_candidates(&self) -> Vec<Candidate> {
        let mut c = Vec::new();
        if let Some(l) = &self.meta.locator {
            if let Some(r) = l.get("relative_path") {
                c.push(Candidate::Relative(r.replace('\\', "/")));
            }
            for k in ["absolute_win32_path", "volume_path"] {
                if let Some(v) = l.get(k) {
                    c.push(Candidate::ForeignAbsolute(v.to_string()));
                }
            }
        }
        c
    }

    fn open_parent(&mut self, opts: &OpenOptions<'_>) -> Result<()> {
        let req = BackingRequest {
            referrer: self.path.as_deref(),
            candidates: self.parent_candidates(),
            format: Some("vhdx".into()),
            depth: opts.depth + 1,
        };
        let parent = opts.gate.open_backing(&req)?;
        let p = parent.as_any().downcast_ref::<VhdxImage>();
        if !opts.gate.ignore_parent_id() {
            let links = self
                .meta
                .locator
                .as_ref()
                .map(|l| l.linkages())
                .unwrap_or_default();
            let Some(p) = p else {
                return Err(Error::new(
                    ErrorKind::BackingMismatch,
                    "the parent of a differencing VHDX must be a VHDX image",
                )
                .with_field("parent_locator"));
            };
            let dwg = p.data_write_guid();
            if links.is_empty() {
                return Err(Error::new(
                    ErrorKind::BackingMismatch,
                    "the parent locator records no parent_linkage to verify the parent with",
                )
                .with_field("parent_locator.parent_linkage"));
            }
            if !links.contains(&dwg) {
                return Err(Error::new(
                    ErrorKind::BackingMismatch,
                    format!(
                        "parent DataWriteGuid {} does not match parent_linkage {}",
                        dwg.braced(),
                        links
                            .iter()
                            .map(Guid::braced)
                            .collect::<Vec<_>>()
                            .join(" / ")
                    ),
                )
                .with_field("parent_locator.parent_linkage"));
            }
        }
        if let Some(p) = p {
            if p.meta.logical != self.meta.logical {
                return Err(Error::new(
                    ErrorKind::BackingMismatch,
                    format!(
                        "parent logical sector size {} differs from the child's {}",
                        p.meta.logical, self.meta.logical
                    ),
                )
                .with_field("logical_sector_size"));
            }
            self.parent_path = p.path.as_ref().map(|x| x.display().to_string());
        }
        self.parent = Some(parent);
        Ok(())
    }

    /// The current header's DataWriteGuid.
    pub fn data_write_guid(&self) -> Guid {
        self.hdr
            .lock()
            .map(|h| h.current.data_write_guid)
            .unwrap_or_default()
    }

    /// The virtual disk ID (page 83 data).
    pub fn disk_id(&self) -> Guid {
        self.meta.disk_id
    }

    /// The parent locator, if any.
    pub fn locator(&self) -> Option<&metadata::Locator> {
        self.meta.locator.as_ref()
    }

    /// Records `linkage` as the parent_linkage of this differencing image, through the log.
    ///
    /// For after a commit into the parent: writing to the parent gave it a new DataWriteGuid,
    /// and the child's content, its data over the updated parent, is unchanged. The value is
    /// rewritten in place (it keeps its length: a braced GUID), so the locator's layout and
    /// every other key stay as its creator wrote them. Only the FileWriteGuid is renewed: the
    /// guest data does not change, so the images linked to this one stay linked. The in-memory
    /// locator is not updated; reopen the image to see the new value.
    pub fn relink_parent(&self, linkage: Guid) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("image opened read-only"));
        }
        let entry = self
            .meta
            .entries
            .iter()
            .find(|e| e.item == ITEM_PARENT_LOCATOR)
            .ok_or_else(|| {
                Error::invalid_argument("the image has no parent locator to relink")
                    .with_field("parent_locator")
            })?;
        let region = self.regions.metadata.offset;
        let item_off = region + u64::from(entry.offset);
        let item = metadata::read_item(&*self.storage, region, entry)?;
        let (vo, vl) = metadata::locator_value_span(&item, "parent_linkage").ok_or_else(|| {
            Error::invalid_argument("the parent locator has no parent_linkage")
                .with_field("parent_locator.parent_linkage")
                .with_offset(item_off)
        })?;
        let value = to_utf16le(&linkage.braced());
        if value.len() != vl {
            return Err(Error::unsupported(format!(
                "parent_linkage holds {vl} bytes, not the {} of a braced GUID: not rewritten",
                value.len()
            ))
            .with_field("parent_locator.parent_linkage")
            .with_offset(item_off + vo as u64));
        }
        let _w = self.write_lock.lock().map_err(|_| lock_err())?;
        let mut hs = self.hdr.lock().map_err(|_| lock_err())?;
        let mut pending: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (i, byte) in value.iter().enumerate() {
            let off = item_off + (vo + i) as u64;
            let so = off & !(LOG_SECTOR - 1);
            if let Some(b) = self.sector(&mut pending, so)?.get_mut((off - so) as usize) {
                *b = *byte;
            }
        }
        self.begin_write(&mut hs, false)?;
        self.commit(&mut hs, &pending)?;
        self.close_log(&mut hs)
    }

    /// Bytes from `pos` to the end of its piece of [`UPDATE_BLOCKS`] blocks: writes are
    /// applied piece by piece, each one logged update.
    fn update_step(&self, pos: u64) -> u64 {
        let step = self.geom.block_size * UPDATE_BLOCKS;
        step - pos % step
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.geom.block_size
    }

    /// What happened to the log at open.
    pub fn log_state(&self) -> &LogState {
        &self.log_state
    }

    /// A copy of the BAT (for tests and check).
    pub fn bat_entries(&self) -> Vec<u64> {
        let mut v = Vec::new();
        let _ = self
            .bat
            .for_each(&*self.storage, &self.limits, |_, e| v.push(e));
        v
    }

    /// Calls `f(index, entry)` for every BAT entry.
    pub(crate) fn for_each_entry(&self, f: impl FnMut(usize, u64)) -> Result<()> {
        self.bat.for_each(&*self.storage, &self.limits, f)
    }

    /// The limits the image was opened with.
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether the BAT is paged (too large for the cache limit).
    pub fn bat_is_paged(&self) -> bool {
        self.bat.is_paged()
    }

    pub(crate) fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    pub(crate) fn parts(&self) -> (&Geometry, &Metadata, &Regions) {
        (&self.geom, &self.meta, &self.regions)
    }

    pub(crate) fn header_slots(&self) -> &[std::result::Result<Header, String>; 2] {
        &self.slots
    }

    pub(crate) fn current_header(&self) -> Option<(Header, usize)> {
        self.hdr.lock().ok().map(|h| (h.current.clone(), h.slot))
    }

    fn class_of(&self, e: u64) -> Class {
        match bat::state(e) {
            PAYLOAD_FULLY_PRESENT => Class::Data(bat::offset(e)),
            PAYLOAD_ZERO | PAYLOAD_UNMAPPED | PAYLOAD_UNMAPPED_V095 => Class::Zero,
            _ => Class::Parent,
        }
    }

    /// Reads bitmap bytes `[first_sector, +sectors)` of the chunk of block `blk`.
    fn bitmap_bits(&self, bat: &View<'_>, blk: u64, pos: u64, n: u64) -> Result<(Vec<u8>, u64)> {
        let sbi = self.geom.bitmap_of_block(blk);
        let sbe = bat.get(sbi)?;
        if bat::state(sbe) != SB_PRESENT {
            return Err(Error::corrupt(
                &format!("bat_entry[{sbi}]"),
                self.regions.bat.offset + sbi as u64 * 8,
                "PARTIALLY_PRESENT block without a present sector bitmap",
            ));
        }
        let ls = u64::from(self.geom.logical);
        let first = (pos / ls) % SECTORS_PER_CHUNK;
        let last = ((pos + n - 1) / ls) % SECTORS_PER_CHUNK;
        let b0 = first / 8;
        let b1 = last / 8;
        let mut bits = vec![0u8; (b1 - b0 + 1) as usize];
        self.storage.read_at(&mut bits, bat::offset(sbe) + b0)?;
        Ok((bits, b0 * 8))
    }

    fn read_parent(&self, out: &mut [u8], pos: u64) -> Result<()> {
        match &self.parent {
            Some(p) => {
                let psize = p.size();
                let n = out.len() as u64;
                if pos >= psize {
                    out.fill(0);
                    return Ok(());
                }
                let inside = (psize - pos).min(n) as usize;
                let (a, b) = out.split_at_mut(inside);
                b.fill(0);
                p.read_at(a, pos)
            }
            None if self.meta.has_parent => Err(Error::new(
                ErrorKind::BackingNotFound,
                format!(
                    "reading {} bytes at {pos:#x} needs the parent image, which was not opened (parent locator: {})",
                    out.len(),
                    self.parent_candidates()
                        .iter()
                        .map(Candidate::text)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    /// The run starting at guest `pos` inside its block: (class, length).
    fn piece(
        &self,
        bat: &View<'_>,
        pos: u64,
        limit: u64,
        cache: &mut BitmapCache,
    ) -> Result<(Class, u64)> {
        let bs = self.geom.block_size;
        let blk = pos / bs;
        let inb = pos % bs;
        let n = (bs - inb).min(limit);
        let e = bat.get(self.geom.payload(blk))?;
        if bat::state(e) != PAYLOAD_PARTIALLY_PRESENT {
            let c = match self.class_of(e) {
                Class::Data(h) => Class::Data(h + inb),
                c => c,
            };
            return Ok((c, n));
        }
        let host = bat::offset(e);
        if cache.as_ref().is_none_or(|c| c.0 != blk) {
            let (bits, base) = self.bitmap_bits(bat, blk, blk * bs, bs)?;
            *cache = Some((blk, bits, base));
        }
        let (bits, base) = match cache.as_ref() {
            Some((_, b, base)) => (b.as_slice(), *base),
            None => (&[][..], 0),
        };
        let ls = u64::from(self.geom.logical);
        let bit = |p: u64| {
            let s = ((p / ls) % SECTORS_PER_CHUNK).wrapping_sub(base);
            bits.get((s / 8) as usize)
                .is_some_and(|b| b & (1 << (s % 8)) != 0)
        };
        let first = bit(pos);
        let mut p = (pos / ls + 1) * ls;
        while p < pos + n && bit(p) == first {
            p += ls;
        }
        let len = p.min(pos + n) - pos;
        Ok((
            if first {
                Class::Data(host + inb)
            } else {
                Class::Parent
            },
            len,
        ))
    }

    fn grow_file(&self, len: u64) -> Result<u64> {
        let cur = self.storage.len()?;
        let start = blockdev::align_up(cur, MIB, "file length")?;
        let end = blockdev::add(start, len, "file length")?;
        self.storage.set_len(end)?;
        Ok(start)
    }

    /// Starts a write session: a new FileWriteGuid, a new DataWriteGuid when the guest data
    /// is to change (`data`; a metadata-only update keeps it, so children stay linked), and a
    /// fresh LogGuid.
    fn begin_write(&self, hs: &mut HeaderState, data: bool) -> Result<()> {
        let renew_data = data && !hs.data_renewed;
        if hs.file_renewed && !renew_data && !hs.current.log_guid.is_zero() {
            return Ok(());
        }
        if self.regions.bat.length == 0 || hs.current.log_length == 0 {
            return Err(Error::unsupported(
                "this image has no log: cannot update metadata safely",
            ));
        }
        let mut nh = hs.current.clone();
        if !hs.file_renewed {
            nh.file_write_guid = Guid::random()?;
        }
        if renew_data {
            nh.data_write_guid = Guid::random()?;
        }
        nh.log_guid = Guid::random()?;
        self.write_headers(hs, nh, 2)?;
        hs.file_renewed = true;
        hs.data_renewed |= renew_data;
        hs.log_seq = 1;
        Ok(())
    }

    fn write_headers(&self, hs: &mut HeaderState, mut nh: Header, times: usize) -> Result<()> {
        for _ in 0..times {
            nh.seq = hs.current.seq;
            write_header_slot(&*self.storage, &mut nh, &mut hs.slot)?;
            hs.current = nh.clone();
        }
        Ok(())
    }

    /// Commits metadata sector images through the log as one entry: entry, flush, apply,
    /// flush. One entry is what makes the update atomic; the writers keep each update small
    /// (see [`UPDATE_BLOCKS`]), and the smallest log (1 MiB) carries 254 sectors.
    fn commit(&self, hs: &mut HeaderState, sectors: &BTreeMap<u64, Vec<u8>>) -> Result<()> {
        if sectors.is_empty() {
            return Ok(());
        }
        let log_len = u64::from(hs.current.log_length);
        let list: Vec<(u64, Vec<u8>)> = sectors.iter().map(|(k, v)| (*k, v.clone())).collect();
        if list.len() as u64 > log::entry_capacity(log_len / LOG_SECTOR) {
            return Err(Error::unsupported(format!(
                "a metadata update of {} sectors does not fit the {log_len}-byte log",
                list.len()
            ))
            .with_field("header.log_length"));
        }
        // The exact length, durable since the last flush: replay refuses a file shorter than
        // FlushedFileOffset as truncated.
        let flen = self.storage.len()?;
        let seq = hs.log_seq;
        let e = log::build_entry(&hs.current.log_guid, seq, 0, 0, flen, flen, &list);
        self.storage.write_at(&e, hs.current.log_offset)?;
        self.storage.flush()?;
        for (off, data) in &list {
            self.storage.write_at(data, *off)?;
        }
        self.storage.flush()?;
        hs.log_seq = seq + 1;
        Ok(())
    }

    /// Sector image of the 4 KiB file sector at `off`, from `pending` or the file.
    fn sector<'a>(
        &self,
        pending: &'a mut BTreeMap<u64, Vec<u8>>,
        off: u64,
    ) -> Result<&'a mut Vec<u8>> {
        if let std::collections::btree_map::Entry::Vacant(e) = pending.entry(off) {
            let mut b = vec![0u8; LOG_SECTOR as usize];
            self.storage.read_at(&mut b, off)?;
            e.insert(b);
        }
        pending
            .get_mut(&off)
            .ok_or_else(|| Error::new(ErrorKind::Io, "sector cache"))
    }

    fn set_entry(
        &self,
        pending: &mut BTreeMap<u64, Vec<u8>>,
        newbat: &mut BTreeMap<usize, u64>,
        idx: usize,
        e: u64,
    ) -> Result<()> {
        let off = self.regions.bat.offset + idx as u64 * 8;
        let so = off & !(LOG_SECTOR - 1);
        let s = self.sector(pending, so)?;
        put64(s, (off - so) as usize, e);
        newbat.insert(idx, e);
        Ok(())
    }

    /// Sets (`on`) or clears the sector bitmap bits of guest range `[pos, pos+len)`.
    fn put_bits(
        &self,
        pending: &mut BTreeMap<u64, Vec<u8>>,
        sb_off: u64,
        pos: u64,
        len: u64,
        on: bool,
    ) -> Result<()> {
        let ls = u64::from(self.geom.logical);
        let mut s = pos / ls;
        let end = (pos + len).div_ceil(ls);
        while s < end {
            let idx = s % SECTORS_PER_CHUNK;
            let byte = sb_off + idx / 8;
            let so = byte & !(LOG_SECTOR - 1);
            let sec = self.sector(pending, so)?;
            if let Some(b) = sec.get_mut((byte - so) as usize) {
                if on {
                    *b |= 1 << (idx % 8);
                } else {
                    *b &= !(1 << (idx % 8));
                }
            }
            s += 1;
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("image opened read-only"));
        }
        check_range(self.meta.disk_size, offset, len)?;
        let ls = u64::from(self.geom.logical);
        if !offset.is_multiple_of(ls) || !len.is_multiple_of(ls) {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!(
                    "write of {len} bytes at {offset:#x} is not aligned to the {ls}-byte logical sector"
                ),
            )
            .with_offset(offset));
        }
        Ok(())
    }

    /// The write path; `data` is `None` for explicit zeros.
    fn write_inner(
        &self,
        hs: &mut HeaderState,
        buf: Option<&[u8]>,
        offset: u64,
        len: u64,
        dealloc: bool,
    ) -> Result<()> {
        self.begin_write(hs, true)?;
        let bs = self.geom.block_size;
        let mut freed: Vec<u64> = Vec::new();
        let mut pending: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut newbat: BTreeMap<usize, u64> = BTreeMap::new();
        let zeros;
        // Only writers change the BAT and they hold `write_lock`.
        let entry = |newbat: &BTreeMap<usize, u64>, i: usize| -> Result<u64> {
            match newbat.get(&i) {
                Some(e) => Ok(*e),
                None => self.bat.get(&*self.storage, &self.limits, i),
            }
        };
        let zbuf: &[u8] = match buf {
            Some(b) => b,
            None => {
                zeros = vec![0u8; bs.min(len) as usize];
                &zeros
            }
        };
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let blk = pos / bs;
            let inb = pos % bs;
            let n = (bs - inb).min(len - done);
            let data = if buf.is_some() {
                zbuf.get(done as usize..(done + n) as usize)
                    .unwrap_or_default()
            } else {
                zbuf.get(..n as usize).unwrap_or_default()
            };
            let bi = self.geom.payload(blk);
            let e = entry(&newbat, bi)?;
            let st = bat::state(e);
            let whole = n == bs || (inb == 0 && pos + n == self.meta.disk_size);
            // A fixed image (LeaveBlockAllocated) keeps its blocks: zeros are written in place.
            let keep = self.meta.leave_allocated && st == PAYLOAD_FULLY_PRESENT;
            if buf.is_none() && whole && !keep {
                if st != PAYLOAD_ZERO || bat::offset(e) != 0 {
                    self.set_entry(&mut pending, &mut newbat, bi, bat::entry(PAYLOAD_ZERO, 0))?;
                    if dealloc && matches!(st, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) {
                        freed.push(bat::offset(e));
                    }
                }
                done += n;
                continue;
            }
            match st {
                PAYLOAD_FULLY_PRESENT => {
                    self.storage.write_at(data, bat::offset(e) + inb)?;
                }
                PAYLOAD_PARTIALLY_PRESENT if whole => {
                    // All of it is this image's now: one BAT entry instead of setting every
                    // bit (up to 16 log sectors of bitmap per block), so an update stays small.
                    self.storage.write_at(data, bat::offset(e) + inb)?;
                    self.set_entry(
                        &mut pending,
                        &mut newbat,
                        bi,
                        bat::entry(PAYLOAD_FULLY_PRESENT, bat::offset(e)),
                    )?;
                }
                PAYLOAD_PARTIALLY_PRESENT => {
                    self.storage.write_at(data, bat::offset(e) + inb)?;
                    let sbe = entry(&newbat, self.geom.bitmap_of_block(blk))?;
                    self.put_bits(&mut pending, bat::offset(sbe), pos, n, true)?;
                }
                _ => {
                    let from_parent = self.meta.has_parent
                        && matches!(st, PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED);
                    if buf.is_none() && !from_parent && !whole {
                        // The block already reads as zeros.
                        done += n;
                        continue;
                    }
                    let host = self.grow_file(bs)?;
                    self.storage.write_at(data, host + inb)?;
                    if from_parent && !whole {
                        let sbi = self.geom.bitmap_of_block(blk);
                        let mut sbe = entry(&newbat, sbi)?;
                        if bat::state(sbe) != SB_PRESENT {
                            let sb = self.grow_file(SECTOR_BITMAP_BLOCK)?;
                            sbe = bat::entry(SB_PRESENT, sb);
                            self.set_entry(&mut pending, &mut newbat, sbi, sbe)?;
                        }
                        // Bits of a block that was not present mean nothing (another writer
                        // may have left some set): only the range written is the child's.
                        let start = blk * bs;
                        let blen = bs.min(self.meta.disk_size.saturating_sub(start));
                        self.put_bits(&mut pending, bat::offset(sbe), start, blen, false)?;
                        self.put_bits(&mut pending, bat::offset(sbe), pos, n, true)?;
                        self.set_entry(
                            &mut pending,
                            &mut newbat,
                            bi,
                            bat::entry(PAYLOAD_PARTIALLY_PRESENT, host),
                        )?;
                    } else {
                        self.set_entry(
                            &mut pending,
                            &mut newbat,
                            bi,
                            bat::entry(PAYLOAD_FULLY_PRESENT, host),
                        )?;
                    }
                }
            }
            done += n;
        }
        if pending.is_empty() {
            return Ok(());
        }
        // Payload data is durable before the log entry that makes it visible.
        self.storage.flush()?;
        self.commit(hs, &pending)?;
        self.bat.update(&newbat)?;
        // The blocks are unreferenced now (the BAT change is durable): give the space back.
        for host in freed {
            self.storage.punch_hole(host, bs)?;
        }
        Ok(())
    }

    /// Empties the log (LogGuid = 0) after everything is durable.
    fn close_log(&self, hs: &mut HeaderState) -> Result<()> {
        self.storage.flush()?;
        if self.writable && !hs.current.log_guid.is_zero() {
            let mut nh = hs.current.clone();
            nh.log_guid = Guid::ZERO;
            self.write_headers(hs, nh, 1)?;
        }
        Ok(())
    }

    fn state_counts(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut c = [0u64; 8];
        let mut sb = 0u64;
        let g = self.geom;
        let _ = self.for_each_entry(|i, e| {
            if g.is_bitmap_index(i as u64) {
                if bat::state(e) == SB_PRESENT {
                    sb += 1;
                }
            } else if g.block_of_index(i as u64) < g.blocks {
                if let Some(x) = c.get_mut(bat::state(e) as usize) {
                    *x += 1;
                }
            }
        });
        let mut m = serde_json::Map::new();
        let names = [
            "not_present",
            "undefined",
            "zero",
            "unmapped",
            "reserved_4",
            "unmapped_v095",
            "fully_present",
            "partially_present",
        ];
        for (n, v) in names.iter().zip(c.iter()) {
            if *v > 0 || !n.starts_with("reserved") && !n.ends_with("v095") {
                m.insert((*n).to_string(), (*v).into());
            }
        }
        m.insert("sector_bitmaps_present".into(), sb.into());
        m
    }
}

/// Writes `nh` with the next sequence number into the header slot after `slot`, flushes,
/// and makes that slot current.
fn write_header_slot(storage: &dyn Storage, nh: &mut Header, slot: &mut usize) -> Result<()> {
    nh.seq = nh.seq.checked_add(1).ok_or_else(|| {
        Error::corrupt(
            "header.sequence_number",
            HEADER_OFFSETS.get(*slot).copied().unwrap_or(0) + 8,
            "header sequence number would overflow: refusing to write",
        )
    })?;
    let other = 1 - *slot;
    let off = HEADER_OFFSETS.get(other).copied().unwrap_or(0);
    storage.write_at(&nh.to_bytes(), off)?;
    storage.flush()?;
    *slot = other;
    Ok(())
}

/// Ranges used by the header section, log and regions.
pub(crate) fn fixed_spans(regions: &Regions, log: (u64, u64)) -> Vec<bat::Span> {
    let mut v = vec![bat::Span {
        start: 0,
        end: HEADER_SECTION,
        what: "header section".into(),
    }];
    if log.1 > 0 {
        v.push(bat::Span {
            start: log.0,
            end: log.0.saturating_add(log.1),
            what: "log".into(),
        });
    }
    for e in &regions.entries {
        let name = if e.guid == BAT_REGION {
            "BAT region".to_string()
        } else if e.guid == METADATA_REGION {
            "metadata region".to_string()
        } else {
            format!("region {}", e.guid)
        };
        v.push(bat::Span {
            start: e.offset,
            end: e.offset.saturating_add(e.length),
            what: name,
        });
    }
    v
}

impl BlockDevice for VhdxImage {
    fn size(&self) -> u64 {
        self.meta.disk_size
    }

    fn sector_sizes(&self) -> SectorSizes {
        SectorSizes {
            logical: self.meta.logical,
            physical: self.meta.physical,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_range(self.meta.disk_size, offset, len)?;
        let bat = self.bat.view(&*self.storage, &self.limits)?;
        let mut done = 0u64;
        let mut cache = None;
        while done < len {
            let pos = offset + done;
            let (class, n) = self.piece(&bat, pos, len - done, &mut cache)?;
            let out = buf
                .get_mut(done as usize..(done + n) as usize)
                .unwrap_or_default();
            match class {
                Class::Data(host) => self.storage.read_at(out, host)?,
                Class::Zero => out.fill(0),
                Class::Parent => self.read_parent(out, pos)?,
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        let _w = self.write_lock.lock().map_err(|_| lock_err())?;
        let mut hs = self.hdr.lock().map_err(|_| lock_err())?;
        let len = buf.len() as u64;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.update_step(offset + done));
            let piece = buf
                .get(done as usize..(done + n) as usize)
                .unwrap_or_default();
            self.write_inner(&mut hs, Some(piece), offset + done, n, false)?;
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> Result<()> {
        self.check_write(offset, len)?;
        let _w = self.write_lock.lock().map_err(|_| lock_err())?;
        let mut hs = self.hdr.lock().map_err(|_| lock_err())?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.update_step(offset + done));
            self.write_inner(&mut hs, None, offset + done, n, deallocate)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _w = self.write_lock.lock().map_err(|_| lock_err())?;
        let mut hs = self.hdr.lock().map_err(|_| lock_err())?;
        self.close_log(&mut hs)
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.meta.disk_size;
        if offset >= size {
            return Err(Error::out_of_bounds(offset, 1, size));
        }
        let limit = (size - offset).min(max_len.max(1));
        let bat = self.bat.view(&*self.storage, &self.limits)?;
        let mut cache = None;
        let (first, mut len) = self.piece(&bat, offset, limit, &mut cache)?;
        while len < limit {
            let (c, n) = self.piece(&bat, offset + len, limit - len, &mut cache)?;
            let same = match (first, c) {
                (Class::Data(a), Class::Data(b)) => a + len == b,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            len += n;
        }
        let ext = match first {
            // A hole of the file inside a present block reads as zeros: copies skip it.
            Class::Data(h) => blockdev::extent_at_host(self.storage.as_ref(), offset, len, h)?,
            Class::Zero => Extent::new(offset, len, ExtentKind::Zero),
            Class::Parent => Extent::new(offset, len, ExtentKind::Unallocated),
        };
        Ok(ext)
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.parent.as_deref()
    }

    fn info(&self) -> ImageInfo {
        let mut i = ImageInfo::new("vhdx", self.meta.disk_size);
        i.subformat = Some(
            if self.meta.has_parent {
                "differencing"
            } else if self.meta.leave_allocated {
                "fixed"
            } else {
                "dynamic"
            }
            .into(),
        );
        i.logical_sector_size = self.meta.logical;
        i.physical_sector_size = self.meta.physical;
        i.actual_size = self.storage.len().ok();
        i.cluster_size = Some(self.geom.block_size);
        if let Some(l) = &self.meta.locator {
            let reference = ["relative_path", "absolute_win32_path", "volume_path"]
                .iter()
                .find_map(|k| l.get(k))
                .unwrap_or_default()
                .to_string();
            i.backing = Some(BackingInfo {
                reference,
                format: Some("vhdx".into()),
                resolved_path: self.parent_path.clone(),
                resolved: self.parent.is_some(),
            });
        }
        i.set("creator", self.creator.clone());
        let (cur, slot) = self
            .current_header()
            .unwrap_or((self.slots[0].clone().unwrap_or_else(|_| dummy_header()), 0));
        let seqs: Vec<serde_json::Value> = self
            .slots
            .iter()
            .map(|s| match s {
                Ok(h) => h.seq.into(),
                Err(e) => format!("invalid: {e}").into(),
            })
            .collect();
        i.set("header_sequence_numbers", seqs);
        i.set("current_header", slot as u64 + 1);
        i.set("file_write_guid", cur.file_write_guid.to_string());
        i.set("data_write_guid", cur.data_write_guid.to_string());
        i.set("log_guid", self.log_state.log_guid.to_string());
        let ls = &self.log_state;
        let state = if ls.log_guid.is_zero() {
            "empty".to_string()
        } else if ls.guid_without_entries {
            "log guid set but no valid entry (treated as empty)".to_string()
        } else if ls.in_memory {
            format!(
                "dirty: {} entries to replay (replayed in memory)",
                ls.replayed
            )
        } else {
            format!("dirty: {} entries replayed to disk at open", ls.replayed)
        };
        i.set("log_state", state);
        i.set(
            "log_entries_to_replay",
            if ls.in_memory { ls.replayed as u64 } else { 0 },
        );
        i.set("log_offset", cur.log_offset);
        i.set("log_length", u64::from(cur.log_length));
        i.set("block_size", self.geom.block_size);
        i.set("logical_sector_size", u64::from(self.meta.logical));
        i.set("physical_sector_size", u64::from(self.meta.physical));
        i.set("leave_block_allocated", self.meta.leave_allocated);
        i.set("has_parent", self.meta.has_parent);
        i.set("page83_id", self.meta.disk_id.to_string());
        i.set("bat_states", serde_json::Value::Object(self.state_counts()));
        if let Some(l) = &self.meta.locator {
            let mut m = serde_json::Map::new();
            m.insert("locator_type".into(), l.locator_type.to_string().into());
            for (k, v) in &l.entries {
                m.insert(k.clone(), v.clone().into());
            }
            i.set("parent_locator", serde_json::Value::Object(m));
        }
        i
    }

    fn check(&self) -> Result<CheckReport> {
        Ok(crate::check::check(self))
    }

    fn allocation_granularity(&self) -> u64 {
        self.geom.block_size
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for VhdxImage {
    fn drop(&mut self) {
        if self.writable {
            if let (Ok(_w), Ok(mut hs)) = (self.write_lock.lock(), self.hdr.lock()) {
                let _ = self.close_log(&mut hs);
            }
        }
    }
}

fn dummy_header() -> Header {
    Header {
        seq: 0,
        file_write_guid: Guid::ZERO,
        data_write_guid: Guid::ZERO,
        log_guid: Guid::ZERO,
        log_version: 0,
        version: 1,
        log_length: 0,
        log_offset: 0,
    }
}
