//! An open qcow2 image: reads, block status, info (writes are in `write.rs`).

use std::any::Any;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use blockdev::{
    check_range, BackingInfo, BackingRequest, BlockDevice, Candidate, CheckReport, Error,
    ErrorKind, Extent, ExtentKind, ImageInfo, Limits, OpenGate, Result, Storage,
};

use crate::format::*;
use crate::header::Header;
use crate::snapshot::{check_snapshot_l1, read_snapshots, Snapshot};
use crate::table::{Geometry, L2Cache, Mapping};
use crate::write::AllocState;

/// Options for [`Qcow2Image::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// Read this internal snapshot (name or id) instead of the active layer (read-only).
    pub snapshot: Option<String>,
    /// Resource limits.
    pub limits: Limits,
    /// Depth of this image in its chain (top image 0).
    pub depth: u32,
}

/// An open qcow2 image (v2 or v3).
pub struct Qcow2Image {
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) data_file: Option<Box<dyn Storage>>,
    pub(crate) header: RwLock<Header>,
    pub(crate) geo: Geometry,
    pub(crate) l1: RwLock<Vec<u64>>,
    pub(crate) l1_offset: u64,
    pub(crate) l2_cache: L2Cache,
    pub(crate) backing: Option<Box<dyn BlockDevice>>,
    backing_info: Option<BackingInfo>,
    backing_missing: bool,
    pub(crate) snapshots: std::result::Result<Vec<Snapshot>, String>,
    active_snapshot: Option<String>,
    pub(crate) writable: bool,
    pub(crate) alloc: Mutex<AllocState>,
    pub(crate) limits: Limits,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// `e` pointed at the table entry at `at` when it is about `field` (its offset was the value
/// the entry holds).
fn at_entry(e: Error, field: &str, at: u64) -> Error {
    if e.field() == Some(field) {
        e.with_offset(at)
    } else {
        e
    }
}

/// Reads a table of `len` bytes at `off`, zero-filling what lies past the end of the file.
pub(crate) fn read_table(
    storage: &dyn Storage,
    off: u64,
    len: u64,
    limits: &Limits,
    field: &str,
) -> Result<Vec<u8>> {
    let mut b = blockdev::try_alloc(len, limits, field)?;
    let got = storage.read_at_most(&mut b, off)?;
    if got == 0 && len > 0 {
        return Err(Error::corrupt(
            field,
            off,
            format!("{field} at {off:#x} lies past the end of the file"),
        ));
    }
    Ok(b)
}

impl Qcow2Image {
    /// Opens a qcow2 image; its backing file and data file are opened through `gate`.
    pub fn open(
        storage: Box<dyn Storage>,
        gate: &dyn OpenGate,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let path = storage.path().map(PathBuf::from);
        let header = Header::read(storage.as_ref())?;
        let file_len = storage.len()?;
        let cs = header.cluster_size();
        let snapshots =
            read_snapshots(storage.as_ref(), &header, &opts.limits).map_err(|e| e.to_string());
        let mut writable = opts.writable;
        if writable {
            if !storage.is_writable() {
                return Err(Error::read_only("qcow2 storage is not writable"));
            }
            if header.incompatible & INCOMPAT_CORRUPT != 0 {
                return Err(
                    Error::read_only("image has the corrupt bit set: it may only be read")
                        .with_field("incompatible_features"),
                );
            }
            if header.incompatible & INCOMPAT_DIRTY != 0 {
                return Err(Error::read_only(
                    "image has the dirty bit set (stale refcounts): repair it before writing",
                )
                .with_field("incompatible_features"));
            }
            if opts.snapshot.is_some() {
                return Err(Error::invalid_argument(
                    "an internal snapshot can only be opened read-only",
                ));
            }
        }
        // Active L1, or the requested snapshot's.
        let (l1_offset, l1_size, active_snapshot) = match &opts.snapshot {
            None => (header.l1_table_offset, header.l1_size, None),
            Some(name) => {
                let list = snapshots.as_ref().map_err(|m| {
                    Error::new(
                        ErrorKind::Corrupt,
                        format!("snapshot table unreadable: {m}"),
                    )
                    .with_field("snapshots_offset")
                })?;
                // qemu spellings: `snapshot.name=N`, `snapshot.id=I`, or a bare name or id.
                let s = if let Some(n) = name.strip_prefix("snapshot.name=") {
                    list.iter().find(|s| s.name == n)
                } else if let Some(i) = name.strip_prefix("snapshot.id=") {
                    list.iter().find(|s| s.id == i)
                } else {
                    list.iter()
                        .find(|s| s.name == *name)
                        .or_else(|| list.iter().find(|s| s.id == *name))
                }
                .ok_or_else(|| {
                    Error::invalid_argument(format!("no internal snapshot named '{name}'"))
                })?;
                check_snapshot_l1(s, cs, file_len)?;
                (s.l1_table_offset, s.l1_size, Some(s.name.clone()))
            }
        };
        let l1_bytes = u64::from(l1_size) * 8;
        let l1 = if l1_size == 0 {
            Vec::new()
        } else {
            decode_u64s(&read_table(
                storage.as_ref(),
                l1_offset,
                l1_bytes,
                &opts.limits,
                "l1_table",
            )?)
        };
        let data_file_flag = header.incompatible & INCOMPAT_DATA_FILE != 0;
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            v3: header.version >= 3,
            extended: header.extended_l2(),
            data_file: data_file_flag,
        };
        // External data file, only through the gate.
        let data_file = if data_file_flag {
            let name = header.data_file.clone().unwrap_or_default();
            refuse_protocol(&name, "data_file")?;
            let req = BackingRequest {
                referrer: path.as_deref(),
                candidates: vec![candidate_for(&name)],
                format: Some("raw".to_string()),
                depth: opts.depth + 1,
            };
            Some(
                gate.open_data_file(&req, writable)
                    .map_err(|e| e.context(format!("opening external data file '{name}'")))?,
            )
        } else {
            None
        };
        // Backing file, only through the gate.
        let mut backing = None;
        let mut backing_info = None;
        let mut backing_missing = false;
        if let Some(name) = header.backing_file.clone() {
            let mut info = BackingInfo {
                reference: name.clone(),
                format: header.backing_format.clone(),
                resolved_path: None,
                resolved: false,
            };
            if gate.skip_backing() {
                backing_missing = true;
            } else if let Err(e) = refuse_protocol(&name, "backing_file") {
                return Err(e);
            } else {
                let req = BackingRequest {
                    referrer: path.as_deref(),
                    candidates: vec![candidate_for(&name)],
                    format: header.backing_format.clone(),
                    depth: opts.depth + 1,
                };
                let dev = gate
                    .open_backing(&req)
                    .map_err(|e| e.context(format!("opening backing file '{name}'")))?;
                info.resolved = true;
                info.resolved_path = blockdev::resolve_relative(path.as_deref(), &name)
                    .map(|p| p.display().to_string());
                backing = Some(dev);
            }
            backing_info = Some(info);
        }
        if active_snapshot.is_some() || header.nb_snapshots > 0 || geo.extended || data_file_flag {
            // Writes into images with internal snapshots or subclusters are not implemented.
            writable = false;
            if opts.writable {
                return Err(Error::unsupported(
                    "writing qcow2 images with internal snapshots, extended L2 entries or an external data file is not supported",
                ));
            }
        }
        let l2_bytes = cs;
        let max_cache = opts.limits.max_cache;
        let alloc = AllocState::new(storage.as_ref(), &header, &opts.limits, writable)?;
        Ok(Qcow2Image {
            storage,
            data_file,
            header: RwLock::new(header),
            geo,
            l1: RwLock::new(l1),
            l1_offset,
            l2_cache: L2Cache::new(max_cache, l2_bytes),
            backing,
            backing_info,
            backing_missing,
            snapshots,
            active_snapshot,
            writable,
            alloc: Mutex::new(alloc),
            limits: opts.limits.clone(),
            path,
        })
    }

    /// A copy of the header.
    pub fn header(&self) -> Header {
        self.header
            .read()
            .map(|h| h.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The internal snapshots (an error message when the table is unreadable).
    pub fn snapshots(&self) -> std::result::Result<&[Snapshot], &str> {
        match &self.snapshots {
            Ok(v) => Ok(v),
            Err(m) => Err(m),
        }
    }

    /// The underlying storage.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    pub(crate) fn cs(&self) -> u64 {
        self.geo.cs()
    }

    pub(crate) fn virtual_size(&self) -> u64 {
        self.header.read().map(|h| h.size).unwrap_or(0)
    }

    pub(crate) fn l2_entries(&self) -> u64 {
        self.cs() / if self.geo.extended { 16 } else { 8 }
    }

    pub(crate) fn l1_entry(&self, idx: u64) -> Result<u64> {
        let l1 = self.l1.read().map_err(|_| poisoned())?;
        Ok(usize::try_from(idx)
            .ok()
            .and_then(|i| l1.get(i).copied())
            .unwrap_or(0))
    }

    /// Loads (or finds cached) the L2 table at `off`.
    pub(crate) fn l2_table(&self, off: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.get(off) {
            return Ok(t);
        }
        let file_len = self.storage.len()?;
        if off >= file_len {
            return Err(Error::corrupt(
                "l1_entry",
                off,
                format!(
                    "L2 table offset {off:#x} lies past the end of the file ({file_len} bytes)"
                ),
            ));
        }
        let raw = read_table(
            self.storage.as_ref(),
            off,
            self.cs(),
            &self.limits,
            "l2_table",
        )?;
        let t = Arc::new(decode_u64s(&raw));
        self.l2_cache.insert(off, t.clone());
        Ok(t)
    }

    /// What guest cluster `gc` maps to.
    pub(crate) fn lookup(&self, gc: u64) -> Result<Mapping> {
        let n = self.l2_entries();
        let l1_idx = gc / n;
        let l2_idx = gc % n;
        let e = self.l1_entry(l1_idx)?;
        let l2_off = self
            .geo
            .decode_l1(e, "l1_entry", self.l1_offset + l1_idx * 8)?;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let t = self
            .l2_table(l2_off)
            .map_err(|e| at_entry(e, "l1_entry", self.l1_offset + l1_idx * 8))?;
        let words = if self.geo.extended { 2 } else { 1 };
        let i = usize::try_from(l2_idx * words).unwrap_or(usize::MAX);
        let entry = t.get(i).copied().unwrap_or(0);
        let bitmap = if self.geo.extended {
            t.get(i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        let at = l2_off + l2_idx * 8 * words;
        self.geo.decode_l2(entry, bitmap, "l2_entry", at)
    }

    fn data_storage(&self) -> &dyn Storage {
        self.data_file.as_deref().unwrap_or(self.storage.as_ref())
    }

    /// Reads `buf` from host offset `host` of the data storage, zero-filling past the end of
    /// the file only inside the last (partial) cluster.
    fn read_host(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let st = self.data_storage();
        let got = st.read_at_most(buf, host)?;
        if got < buf.len() {
            let len = st.len()?;
            let limit = if self.data_file.is_some() {
                u64::MAX
            } else {
                len.div_ceil(self.cs()).saturating_mul(self.cs())
            };
            if host.saturating_add(buf.len() as u64) > limit {
                return Err(Error::corrupt(
                    "l2_entry",
                    host,
                    format!(
                        "data cluster at {host:#x} lies past the end of the file ({len} bytes)"
                    ),
                ));
            }
            if let Some(rest) = buf.get_mut(got..) {
                rest.fill(0);
            }
        }
        Ok(())
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.backing_missing {
            return Err(Error::new(
                ErrorKind::BackingNotFound,
                "this range is stored in the backing file, which was not opened",
            )
            .with_offset(offset));
        }
        match &self.backing {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(b) => {
                let bsize = b.size();
                let end = offset.saturating_add(buf.len() as u64);
                if end <= bsize {
                    b.read_at(buf, offset)
                } else {
                    let n = usize::try_from(bsize.saturating_sub(offset))
                        .unwrap_or(0)
                        .min(buf.len());
                    let (head, tail) = buf.split_at_mut(n);
                    if !head.is_empty() {
                        b.read_at(head, offset)?;
                    }
                    tail.fill(0);
                    Ok(())
                }
            }
        }
    }

    pub(crate) fn read_compressed(&self, offset: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let file_len = self.storage.len()?;
        if offset >= file_len {
            return Err(Error::corrupt(
                "l2_entry",
                offset,
                format!("compressed cluster at {offset:#x} lies past the end of the file"),
            ));
        }
        let mut input =
            blockdev::try_alloc(len.min(2 * self.cs()), &self.limits, "compressed_cluster")?;
        let got = self.storage.read_at_most(&mut input, offset)?;
        input.truncate(got);
        let kind = self.header.read().map(|h| h.compression_type).unwrap_or(0);
        crate::compress::decompress(kind, &input, out, offset)
    }

    /// Points an error about the L2 entry of guest cluster `gc` (a data cluster past the end
    /// of the file, say) at that entry rather than at the offset the entry holds.
    fn at_l2_entry(&self, e: Error, gc: u64) -> Error {
        let n = self.l2_entries();
        let words = if self.geo.extended { 2 } else { 1 };
        let l2 = self
            .l1_entry(gc / n)
            .ok()
            .and_then(|l1e| self.geo.decode_l1(l1e, "l1_entry", 0).ok());
        match l2 {
            Some(l2) if l2 != 0 => at_entry(e, "l2_entry", l2 + (gc % n) * 8 * words),
            _ => e,
        }
    }

    /// Reads part of one guest cluster `gc` (`within` bytes into it) into `dst`.
    /// Errors of this layer's own reads name the L2 entry; the backing image's are its own.
    fn read_in_cluster(&self, gc: u64, m: Mapping, within: u64, dst: &mut [u8]) -> Result<()> {
        let cs = self.cs();
        let guest = gc * cs + within;
        let host_read = |buf: &mut [u8], host: u64| {
            self.read_host(buf, host)
                .map_err(|e| self.at_l2_entry(e, gc))
        };
        let compressed_read = |offset: u64, len: u64, out: &mut [u8]| {
            self.read_compressed(offset, len, out)
                .map_err(|e| self.at_l2_entry(e, gc))
        };
        match m {
            Mapping::Unallocated => self.read_backing(dst, guest),
            Mapping::Zero { .. } => {
                dst.fill(0);
                Ok(())
            }
            Mapping::Normal { host, .. } => host_read(dst, host + within),
            Mapping::Compressed { offset, len } => {
                if within == 0 && dst.len() as u64 == cs {
                    return compressed_read(offset, len, dst);
                }
                let mut tmp = vec![0u8; usize::try_from(cs).unwrap_or(0)];
                compressed_read(offset, len, &mut tmp)?;
                let s = usize::try_from(within).unwrap_or(0);
                if let Some(src) = tmp.get(s..s + dst.len()) {
                    dst.copy_from_slice(src);
                }
                Ok(())
            }
            Mapping::Sub { host, alloc, zero } => {
                let sc = cs / 32;
                let mut pos = 0usize;
                while pos < dst.len() {
                    let o = within + pos as u64;
                    let i = (o / sc) as u32;
                    let run_end = ((u64::from(i) + 1) * sc).min(within + dst.len() as u64);
                    let n = usize::try_from(run_end - o).unwrap_or(0);
                    let Some(part) = dst.get_mut(pos..pos + n) else {
                        break;
                    };
                    if alloc & (1 << i) != 0 {
                        host_read(part, host + o)?;
                    } else if zero & (1 << i) != 0 {
                        part.fill(0);
                    } else {
                        self.read_backing(part, gc * cs + o)?;
                    }
                    pos += n;
                }
                Ok(())
            }
        }
    }

    /// The extent at `offset` as this layer sees it: kind, host offset, length, and whether
    /// it is a compressed cluster.
    fn status_of(&self, m: Mapping, gc: u64, within: u64) -> (ExtentKind, Option<u64>, u64, bool) {
        let compressed = matches!(m, Mapping::Compressed { .. });
        let (kind, host, len) = self.status_parts(m, gc, within);
        (kind, host, len, compressed)
    }

    fn status_parts(&self, m: Mapping, gc: u64, within: u64) -> (ExtentKind, Option<u64>, u64) {
        let cs = self.cs();
        let rest = cs - within;
        let host_ok = self.data_file.is_none();
        match m {
            Mapping::Unallocated => (ExtentKind::Unallocated, None, rest),
            Mapping::Zero { .. } => (ExtentKind::Zero, None, rest),
            Mapping::Normal { host, .. } => (
                ExtentKind::Data,
                if host_ok { Some(host + within) } else { None },
                rest,
            ),
            Mapping::Compressed { .. } => (ExtentKind::Data, None, rest),
            Mapping::Sub { host, alloc, zero } => {
                let sc = cs / 32;
                let i = (within / sc) as u32;
                let kind_of = |j: u32| {
                    if alloc & (1 << j) != 0 {
                        0
                    } else if zero & (1 << j) != 0 {
                        1
                    } else {
                        2
                    }
                };
                let k = kind_of(i);
                let mut j = i + 1;
                while j < 32 && kind_of(j) == k {
                    j += 1;
                }
                let len = u64::from(j) * sc - within;
                let _ = gc;
                match k {
                    0 => (
                        ExtentKind::Data,
                        if host_ok { Some(host + within) } else { None },
                        len,
                    ),
                    1 => (ExtentKind::Zero, None, len),
                    _ => (ExtentKind::Unallocated, None, len),
                }
            }
        }
    }

    fn info_impl(&self) -> ImageInfo {
        let h = self.header();
        let mut info = ImageInfo::new("qcow2", h.size);
        info.cluster_size = Some(h.cluster_size());
        info.actual_size = self.storage.len().ok();
        // The stable schema's names: an overlay is qcow2's differencing image.
        info.subformat = Some(
            if h.backing_file.is_some() {
                "differencing"
            } else {
                "dynamic"
            }
            .to_string(),
        );
        info.backing = self.backing_info.clone();
        info.set("version", h.version);
        info.set("compat", if h.version >= 3 { "1.1" } else { "0.10" });
        info.set("refcount_bits", h.refcount_bits());
        info.set(
            "compression_type",
            if h.compression_type == COMPRESSION_ZSTD {
                "zstd"
            } else {
                "zlib"
            },
        );
        info.set(
            "incompatible_features",
            h.feature_names_of(0, h.incompatible),
        );
        info.set("compatible_features", h.feature_names_of(1, h.compatible));
        info.set("autoclear_features", h.feature_names_of(2, h.autoclear));
        info.set("lazy_refcounts", h.compatible & COMPAT_LAZY_REFCOUNTS != 0);
        info.set("extended_l2", h.extended_l2());
        info.set("dirty", h.incompatible & INCOMPAT_DIRTY != 0);
        info.set("corrupt", h.incompatible & INCOMPAT_CORRUPT != 0);
        if let Some(d) = &h.data_file {
            info.set("data_file", d.clone());
            info.set("data_file_raw", h.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0);
        }
        if let Some(b) = &h.bitmaps {
            info.set("bitmaps", b.nb_bitmaps);
        }
        if let Some(s) = &self.active_snapshot {
            info.set("reading_snapshot", s.clone());
        }
        match &self.snapshots {
            Ok(list) => {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "id": s.id,
                            "name": s.name,
                            "date_sec": s.date_sec,
                            "date_nsec": s.date_nsec,
                            "vm_clock_nsec": s.vm_clock_nsec,
                            "vm_state_size": s.vm_state_size,
                            "disk_size": s.disk_size,
                        })
                    })
                    .collect();
                info.set("snapshots", v);
            }
            Err(m) => info.set("snapshots_error", m.clone()),
        }
        info
    }
}

pub(crate) fn poisoned() -> Error {
    Error::new(ErrorKind::Io, "qcow2 lock poisoned")
}

/// Protocol and `json:` references are never handed to a gate (CVE-2024-4467).
fn refuse_protocol(name: &str, field: &str) -> Result<()> {
    if name.is_empty() || name.contains('\0') || blockdev::has_protocol_prefix(name) {
        return Err(Error::new(
            ErrorKind::BackingDenied,
            format!(
                "{field} '{}' is a protocol, JSON or invalid reference: refused",
                name.escape_debug()
            ),
        )
        .with_field(field));
    }
    Ok(())
}

pub(crate) fn candidate_for(name: &str) -> Candidate {
    if name.starts_with('/') {
        Candidate::Path(name.to_string())
    } else {
        Candidate::Relative(name.to_string())
    }
}

impl BlockDevice for Qcow2Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let cs = self.cs();
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = offset + pos as u64;
            let gc = g / cs;
            let within = g % cs;
            let m = self.lookup(gc)?;
            let mut n = usize::try_from((cs - within).min((buf.len() - pos) as u64)).unwrap_or(0);
            // Coalesce runs of contiguous standard clusters into one read.
            if let Mapping::Normal { host, .. } = m {
                let mut next_gc = gc + 1;
                let mut next_host = host + cs;
                while pos + n < buf.len() {
                    match self.lookup(next_gc)? {
                        Mapping::Normal { host: h2, .. } if h2 == next_host => {
                            n += usize::try_from(cs.min((buf.len() - pos - n) as u64)).unwrap_or(0);
                            next_gc += 1;
                            next_host += cs;
                        }
                        _ => break,
                    }
                }
                let part = buf.get_mut(pos..pos + n).unwrap_or_default();
                self.read_host(part, host + within)
                    .map_err(|e| self.at_l2_entry(e, gc))?;
            } else {
                let part = buf.get_mut(pos..pos + n).unwrap_or_default();
                self.read_in_cluster(gc, m, within, part)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_impl(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> Result<()> {
        self.write_zeroes_impl(offset, len, deallocate)
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.storage.flush()?;
            if let Some(d) = &self.data_file {
                d.flush()?;
            }
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.size();
        if offset >= size {
            return Err(Error::out_of_bounds(offset, 1, size));
        }
        let cs = self.cs();
        let want = max_len.max(1).min(size - offset);
        let gc = offset / cs;
        let within = offset % cs;
        let (kind, host, first, compressed) = self.status_of(self.lookup(gc)?, gc, within);
        let mut len = first;
        let mut next_host = host.map(|h| h + first);
        let mut g = offset + first;
        let n = self.l2_entries();
        // Merge following clusters of the same kind (contiguous host for data).
        while len < want && g < size && first + within >= cs {
            let ngc = g / cs;
            // Skip whole unallocated L1 ranges quickly.
            if kind == ExtentKind::Unallocated
                && ngc.is_multiple_of(n)
                && self.l1_entry(ngc / n)? & OFFSET_MASK == 0
            {
                len += n * cs;
                g += n * cs;
                continue;
            }
            let (k2, h2, l2, c2) = self.status_of(self.lookup(ngc)?, ngc, 0);
            if k2 != kind || h2 != next_host || c2 != compressed {
                break;
            }
            len += l2;
            g += l2;
            next_host = h2.map(|h| h + l2);
            if l2 < cs {
                break;
            }
        }
        let len = len.min(size - offset).max(1);
        let mut e = Extent::new(offset, len, kind);
        if let Some(h) = host {
            e = e.at_host(h);
        }
        if compressed {
            e = e.compressed();
        }
        Ok(e)
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }

    fn info(&self) -> ImageInfo {
        self.info_impl()
    }

    fn check(&self) -> Result<CheckReport> {
        crate::check::check_image(self)
    }

    fn allocation_granularity(&self) -> u64 {
        self.cs()
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
