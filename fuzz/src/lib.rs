//! Shared pieces of the vdconv fuzz targets.
//!
//! * [`exercise`]: the oracle of the parser targets: open through the `vdisk` facade with a
//!   [`DenyGate`] (backing files are never opened), walk `block_status` to the end with a cap on
//!   iterations, read every data extent within a byte budget, check that zero/unallocated
//!   extents read as zeros, read at the edges and outside the device, run `check()`.
//! * [`crc32c`] and [`vhdx_resign_input`]: re-sign VHDX headers, region tables and log entries after a
//!   mutation so the fuzzer gets past the checksums (a local CRC-32C, no dependency).
//! * [`SparseImage`]: the input encoding of the parser targets (non-zero pages only).
//! * [`Program`] / [`run_ops`]: operation sequences against a `Vec<u8>` shadow model on an
//!   image our own `create` made in memory: every read must match the model exactly.
//! * [`RoundTrip`] / [`run_roundtrip`]: random extents through our writer of a format, read back
//!   equal to the model.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use arbitrary::Arbitrary;
use blockdev::{BlockDevice, DenyGate, ErrorKind, ExtentKind, Limits, MemStorage, Storage};
use vdisk::formats::{CreateSpec, OpenCtx};
use vdisk::Format;

/// Cap on `block_status` calls per walk.
pub const MAX_EXTENTS: usize = 4096;
/// Cap on bytes read per input (data extents, and the zero check of non-data extents).
pub const READ_BUDGET: u64 = 1 << 20;
/// Largest single read.
pub const READ_CHUNK: u64 = 256 << 10;

/// The limits every target opens with (the library defaults: 128 MiB per allocation).
pub fn limits() -> Limits {
    Limits::default()
}

/// Opens `storage` as `format` through the facade, with the deny-all gate.
pub fn open_storage(
    format: Format,
    storage: Box<dyn Storage>,
    writable: bool,
) -> blockdev::Result<Box<dyn BlockDevice>> {
    let limits = limits();
    let ctx = OpenCtx {
        gate: &DenyGate,
        writable,
        limits: &limits,
        depth: 0,
        options: &[],
    };
    vdisk::formats::open(format, storage, &ctx)
}

/// Opens the sparse image encoded in `data` (see [`SparseImage`]) read-only as `format` and
/// exercises the device; returns whether it opened.
pub fn open_and_exercise(format: Format, data: &[u8]) -> bool {
    open_image_and_exercise(format, SparseImage::decode(data))
}

/// Opens `image` read-only as `format` and exercises the device; returns whether it opened.
pub fn open_image_and_exercise(format: Format, image: SparseImage) -> bool {
    match open_storage(format, Box::new(image), false) {
        Ok(dev) => {
            exercise(dev.as_ref());
            true
        }
        Err(e) => {
            // Typed errors only: formatting must not panic either.
            let _ = e.to_string();
            let _ = e.kind();
            false
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The oracle of the parser targets (see the crate docs). Panics on a broken invariant.
pub fn exercise(dev: &dyn BlockDevice) {
    let size = dev.size();
    let _ = dev.sector_sizes();
    let info = dev.info();
    let _ = serde_json_len(&info);
    let _ = dev.allocation_granularity();
    let has_backing = dev.backing().is_some();
    assert!(!has_backing, "a fuzz target opened a backing file");

    // block_status walk with a cap.
    let mut off = 0u64;
    let mut budget = READ_BUDGET;
    let mut buf = Vec::new();
    for _ in 0..MAX_EXTENTS {
        if off >= size {
            break;
        }
        let want = (size - off).min(1 << 30);
        let ext = match dev.block_status(off, want) {
            Ok(e) => e,
            Err(_) => {
                // Skip the unreadable region: one granule (bounded walk either way).
                let g = dev.allocation_granularity().max(512);
                off = match off.checked_add(g - off % g) {
                    Some(o) => o,
                    None => break,
                };
                continue;
            }
        };
        assert_eq!(ext.offset, off, "block_status answered another offset");
        assert!(
            ext.len > 0,
            "block_status returned an empty extent at {off:#x}"
        );
        let end = off.checked_add(ext.len).expect("extent end overflows");
        assert!(
            end <= size,
            "extent {ext:?} runs past the device size {size:#x}"
        );
        if budget > 0 {
            let cap = if ext.kind == ExtentKind::Data {
                READ_CHUNK
            } else {
                64 << 10
            };
            let n = ext.len.min(cap).min(budget);
            buf.clear();
            buf.resize(n as usize, 0xa5);
            if dev.read_at(&mut buf, off).is_ok() && ext.kind != ExtentKind::Data {
                assert!(
                    is_zero(&buf),
                    "extent {ext:?} is not data, but reads non-zero bytes"
                );
            }
            budget -= n;
        }
        off = end;
    }

    // Edges and out of range.
    let mut small = vec![0u8; 65535.min(size as usize)];
    let _ = dev.read_at(&mut small, 0);
    if size > 0 {
        let mid = (size / 2) & !511;
        let n = (size - mid).min(65535) as usize;
        let _ = dev.read_at(&mut small[..n], mid);
        let tail = size.saturating_sub(small.len() as u64);
        let _ = dev.read_at(&mut small, tail);
        let mut one = [0u8; 1];
        let _ = dev.read_at(&mut one, size - 1);
    }
    let mut four = [0u8; 4096];
    assert!(dev.read_at(&mut four, size).is_err() || size == u64::MAX);
    assert!(dev.read_at(&mut four, u64::MAX - 100).is_err());

    // check() reports, never panics.
    if let Ok(report) = dev.check() {
        let _ = report.corruptions();
        let _ = report.leaks();
    }
}

fn serde_json_len(info: &blockdev::ImageInfo) -> usize {
    info.format_specific.len() + info.format.len()
}

// ---------------------------------------------------------------------------------------------
// Sparse image encoding of the parser targets' inputs
// ---------------------------------------------------------------------------------------------

/// Page size of [`SparseImage`].
pub const PAGE: u64 = 4096;

/// An image file held as its non-zero 4 KiB pages: the input encoding of the parser targets.
///
/// Disk images are mostly zeros (an empty dynamic VHDX is 4 MiB of which ~40 KiB are not
/// zero); mutating and copying megabytes per execution wastes the fuzzer's time. Encoding:
///
/// ```text
///   u64 LE  file length
///   then records, until the input ends:
///   u32 LE  byte offset | u16 LE length | length bytes (a short last record is cut)
/// ```
///
/// Records may overlap (the later one wins); bytes not covered read as zeros; bytes at or past
/// the file length are not part of the file. `make-seeds.sh` encodes images this way.
#[derive(Debug, Clone, Default)]
pub struct SparseImage {
    len: u64,
    pages: std::collections::BTreeMap<u64, Box<[u8; PAGE as usize]>>,
}

impl SparseImage {
    /// Decodes an input (never fails: any bytes are some image).
    pub fn decode(data: &[u8]) -> SparseImage {
        let mut img = SparseImage::default();
        let Some(head) = data.get(..8) else {
            img.len = data.len() as u64;
            img.put(0, data);
            return img;
        };
        img.len = u64::from_le_bytes(head.try_into().unwrap());
        let mut p = 8;
        while p + 6 <= data.len() && img.pages.len() < 8192 {
            let off = u64::from(u32::from_le_bytes(data[p..p + 4].try_into().unwrap()));
            let n = usize::from(u16::from_le_bytes(data[p + 4..p + 6].try_into().unwrap()));
            let end = (p + 6 + n).min(data.len());
            img.put(off, &data[p + 6..end]);
            p = end;
        }
        img
    }

    /// A dense image.
    pub fn from_bytes(data: &[u8]) -> SparseImage {
        let mut img = SparseImage {
            len: data.len() as u64,
            ..SparseImage::default()
        };
        img.put(0, data);
        img
    }

    /// Encodes: every non-zero page becomes a record (consecutive pages merged up to 60 KiB).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.len.to_le_bytes().to_vec();
        let mut run: Option<(u64, Vec<u8>)> = None;
        for (&idx, page) in &self.pages {
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            let off = idx * PAGE;
            // Records address 32 bits; pages past that cannot be encoded (nor come from input).
            if off
                .checked_add(PAGE)
                .is_none_or(|end| end > u64::from(u32::MAX))
            {
                break;
            }
            match &mut run {
                Some((start, bytes))
                    if *start + bytes.len() as u64 == off && bytes.len() < 61440 =>
                {
                    bytes.extend_from_slice(&page[..]);
                }
                _ => {
                    if let Some((start, bytes)) = run.take() {
                        push_record(&mut out, start, &bytes);
                    }
                    run = Some((off, page.to_vec()));
                }
            }
        }
        if let Some((start, bytes)) = run {
            push_record(&mut out, start, &bytes);
        }
        out
    }

    /// The file length.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// Writes `data` at `off` (pages are created as needed; the length is not changed).
    pub fn put(&mut self, off: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let Some(at) = off.checked_add(done as u64) else {
                return;
            };
            let idx = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let page = self
                .pages
                .entry(idx)
                .or_insert_with(|| Box::new([0u8; PAGE as usize]));
            page[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    /// Reads `buf.len()` bytes at `off` (zeros where no page is held; ignores the length).
    pub fn get(&self, off: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let at = off.saturating_add(done as u64);
            let idx = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            match self.pages.get(&idx) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }
}

fn push_record(out: &mut Vec<u8>, start: u64, bytes: &[u8]) {
    out.extend_from_slice(&(start as u32).to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl Storage for SparseImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => {
                self.get(offset, buf);
                Ok(())
            }
            _ => Err(blockdev::Error::new(
                ErrorKind::Corrupt,
                "read past the end of the file (truncated?)",
            )
            .with_offset(offset)),
        }
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> blockdev::Result<()> {
        Err(blockdev::Error::read_only("fuzz input is read-only"))
    }
    fn len(&self) -> blockdev::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> blockdev::Result<()> {
        Err(blockdev::Error::read_only("fuzz input is read-only"))
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// CRC-32C and VHDX re-signing
// ---------------------------------------------------------------------------------------------

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32C (Castagnoli), as VHDX uses it.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Recomputes the CRC-32C at `off+4` of the `len`-byte structure at `off`, if it fits.
pub fn resign_at(data: &mut [u8], off: usize, len: usize) {
    let Some(end) = off.checked_add(len) else {
        return;
    };
    if end > data.len() {
        return;
    }
    data[off + 4..off + 8].fill(0);
    let c = crc32c(&data[off..end]);
    data[off + 4..off + 8].copy_from_slice(&c.to_le_bytes());
}

const KIB64: usize = 64 << 10;

fn le32(d: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(d[o..o + 4].try_into().unwrap())
}
fn le64(d: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(d[o..o + 8].try_into().unwrap())
}

/// Re-signs the CRC-32C at `off+4` of the `len`-byte structure at `off` of a sparse image.
pub fn resign_sparse(img: &mut SparseImage, off: u64, len: usize) {
    let mut buf = vec![0u8; len];
    img.get(off, &mut buf);
    resign_at(&mut buf, 0, len);
    img.put(off, &buf);
}

/// Re-signs a mutated VHDX input (sparse encoding) in place, if the result still fits in
/// `max_size`; returns the new length. `mode` (a seed) picks the policy of hostile-inputs.md
/// §5.1: 6 of 8 fully repaired, 1 of 8 keeps the mutated checksums, 1 of 8 repairs only the
/// headers.
pub fn vhdx_resign_input(data: &mut [u8], size: usize, max_size: usize, mode: u32) -> usize {
    if mode.is_multiple_of(8) {
        return size;
    }
    let mut img = SparseImage::decode(&data[..size]);
    resign_sparse(&mut img, KIB64 as u64, 4096);
    resign_sparse(&mut img, 2 * KIB64 as u64, 4096);
    if mode % 8 != 1 {
        resign_sparse(&mut img, 3 * KIB64 as u64, KIB64);
        resign_sparse(&mut img, 4 * KIB64 as u64, KIB64);
        resign_log_sparse(&mut img);
    }
    let enc = img.encode();
    if enc.len() > max_size || enc.len() > data.len() {
        return size;
    }
    data[..enc.len()].copy_from_slice(&enc);
    enc.len()
}

/// Re-signs every log entry that looks like one ("loge" at a 4 KiB step of the log region of
/// the header with the higher sequence number); at most 256 entries, no wrapping.
pub fn resign_log_sparse(img: &mut SparseImage) {
    let mut h1 = [0u8; 80];
    let mut h2 = [0u8; 80];
    img.get(KIB64 as u64, &mut h1);
    img.get(2 * KIB64 as u64, &mut h2);
    let h = if le64(&h2, 8) > le64(&h1, 8) { h2 } else { h1 };
    let log_len = u64::from(le32(&h, 68)).min(64 << 20);
    let log_off = le64(&h, 72);
    let Some(log_end) = log_off.checked_add(log_len) else {
        return;
    };
    let mut p = log_off;
    let mut n = 0;
    // Checked: a mutated header can put the log anywhere, up to the end of the u64 range.
    let fits = |p: u64, len: u64| p.checked_add(len).is_some_and(|end| end <= log_end);
    while fits(p, 64) && n < 256 {
        let mut eh = [0u8; 12];
        img.get(p, &mut eh);
        if &eh[..4] == b"loge" {
            let len = u64::from(le32(&eh, 8));
            if len >= 4096 && len % 4096 == 0 && fits(p, len) && len <= (4 << 20) {
                resign_sparse(img, p, len as usize);
                p += len;
                n += 1;
                continue;
            }
        }
        p = p.saturating_add(4096);
        n += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Templates made by our own create/writer, in memory
// ---------------------------------------------------------------------------------------------

/// `-o` options of a template, picked by a fuzzer byte.
pub fn template_options(format: Format, sel: u8) -> Vec<(String, String)> {
    let o = |k: &str, v: &str| (k.to_string(), v.to_string());
    match format {
        Format::Vhd => match sel % 4 {
            0 => vec![],
            1 => vec![o("subformat", "fixed")],
            2 => vec![o("block_size", "512K")],
            _ => vec![o("block_size", "1M")],
        },
        Format::Vhdx => match sel % 5 {
            0 => vec![o("block_size", "1")],
            1 => vec![o("subformat", "fixed"), o("block_size", "1")],
            2 => vec![o("block_size", "1"), o("logical_sector_size", "4096")],
            3 => vec![o("block_size", "2")],
            _ => vec![],
        },
        Format::Qcow2 => match sel % 8 {
            0 => vec![],
            1 => vec![o("cluster_size", "512")],
            2 => vec![o("cluster_size", "4k"), o("refcount_bits", "1")],
            3 => vec![o("compat", "0.10"), o("cluster_size", "4k")],
            4 => vec![o("cluster_size", "4k"), o("refcount_bits", "64")],
            5 => vec![o("cluster_size", "64k"), o("lazy_refcounts", "on")],
            6 => vec![o("cluster_size", "2k"), o("preallocation", "metadata")],
            _ => vec![o("cluster_size", "1k"), o("refcount_bits", "8")],
        },
        Format::Raw => vec![],
    }
}

/// Creates an empty image with our own `create` into a fresh memory storage.
pub fn create_template(
    format: Format,
    size: u64,
    options: &[(String, String)],
) -> blockdev::Result<Arc<MemStorage>> {
    let mem = Arc::new(MemStorage::new());
    let limits = limits();
    let spec = CreateSpec {
        size,
        options,
        parent: None,
        path: None,
        limits: &limits,
    };
    vdisk::formats::create(format, Box::new(Arc::clone(&mem)), &spec)?;
    Ok(mem)
}

/// Templates already made, by (format, options selector, size): creating one per execution
/// would cost more than the operations.
#[allow(clippy::type_complexity)]
fn cached_template(
    format: Format,
    sel: u8,
    size: u64,
    opts: &[(String, String)],
) -> Option<Vec<u8>> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<(String, u64), Option<Vec<u8>>>>> = OnceLock::new();
    // Keyed by the options themselves: selectors that pick the same options share an entry.
    let _ = sel;
    let key = (format!("{}{opts:?}", format.name()), size);
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(v) = cache.lock().unwrap().get(&key) {
        return v.clone();
    }
    let v = create_template(format, size, opts).ok().map(|m| m.to_vec());
    cache.lock().unwrap().insert(key, v.clone());
    v
}

// ---------------------------------------------------------------------------------------------
// Operation sequences against a shadow model
// ---------------------------------------------------------------------------------------------

/// Where an operation lands.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Off {
    /// A logical-sector index (wraps around the device).
    Sector(u16),
    /// A byte offset (wraps around the device): sub-sector I/O.
    Byte(u32),
    /// A fraction (n/256) of the device.
    Fraction(u8),
    /// Anything, usually out of range.
    Wild(u64),
}

/// One operation.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Op {
    /// Writes `sectors` logical sectors (or `bytes` for byte offsets) filled from `seed`.
    Write { off: Off, len: u16, seed: u8 },
    /// Zeroes a range.
    WriteZeroes {
        off: Off,
        len: u16,
        deallocate: bool,
    },
    /// Flushes.
    Flush,
    /// Reads and compares.
    Read { off: Off, len: u16 },
    /// Flushes, drops and reopens the image (and runs `check`).
    Reopen,
    /// Grows the image in place by `by + 1` times 4 KiB (qcow2 only), then reopens it.
    Grow { by: u8 },
}

/// A fuzz program: a template and up to 64 operations.
#[derive(Arbitrary, Debug)]
pub struct Program {
    /// Template options selector.
    pub template: u8,
    /// Virtual size selector.
    pub size: u8,
    /// The operations.
    pub ops: Vec<Op>,
}

fn fill(buf: &mut [u8], seed: u8, pos: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = pos.wrapping_add(i as u64);
        *b = (x as u8) ^ ((x >> 8) as u8).wrapping_mul(31) ^ seed.wrapping_mul(0x9d) | 1;
    }
}

fn place(off: Off, len: u64, size: u64, sector: u64) -> (u64, u64) {
    match off {
        Off::Sector(s) => {
            let sectors = (size / sector).max(1);
            ((s as u64 % sectors) * sector, len * sector)
        }
        Off::Byte(b) => ((b as u64) % size.max(1), len),
        Off::Fraction(f) => (((size / 256) * f as u64) / sector * sector, len * sector),
        Off::Wild(w) => (w, len * sector),
    }
}

fn tolerated(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidArgument | ErrorKind::OutOfBounds | ErrorKind::Unsupported
    )
}

fn in_range(off: u64, len: u64, size: u64) -> bool {
    off.checked_add(len).is_some_and(|e| e <= size)
}

/// Runs `prog` against an image of `format`; panics when the image and the model disagree.
pub fn run_ops(format: Format, prog: &Program) {
    let opts = template_options(format, prog.template);
    let size = (1 + u64::from(prog.size % 8)) << 18; // 256 KiB .. 2 MiB
    let size = size + if prog.size & 0x80 != 0 { 4096 * 3 } else { 0 };
    let Some(bytes) = cached_template(format, prog.template, size, &opts) else {
        return;
    };
    let mem = Arc::new(MemStorage::from_vec(bytes));
    let mut dev = match open_storage(format, Box::new(Arc::clone(&mem)), true) {
        Ok(d) => d,
        Err(e) => panic!("cannot open a template we created ({opts:?}): {e}"),
    };
    let mut size = dev.size();
    let sector = u64::from(dev.sector_sizes().logical.max(512));
    let mut model = vec![0u8; size as usize];
    let mut buf = Vec::new();
    for op in prog.ops.iter().take(64) {
        match *op {
            Op::Write { off, len, seed } => {
                let (o, l) = place(off, u64::from(len % 64) + 1, size, sector);
                buf.resize(l as usize, 0);
                fill(&mut buf, seed, o);
                match dev.write_at(&buf, o) {
                    Ok(()) => {
                        assert!(
                            in_range(o, l, size),
                            "write past the end accepted: {o:#x}+{l}"
                        );
                        model[o as usize..(o + l) as usize].copy_from_slice(&buf);
                    }
                    Err(e) => assert!(
                        tolerated(e.kind())
                            && !(in_range(o, l, size) && o % sector == 0 && l % sector == 0),
                        "write {o:#x}+{l} failed: {e} ({:?})",
                        e.kind()
                    ),
                }
            }
            Op::WriteZeroes {
                off,
                len,
                deallocate,
            } => {
                let (o, l) = place(off, u64::from(len % 2048) + 1, size, sector);
                match dev.write_zeroes(o, l, deallocate) {
                    Ok(()) => {
                        assert!(
                            in_range(o, l, size),
                            "zeroes past the end accepted: {o:#x}+{l}"
                        );
                        model[o as usize..(o + l) as usize].fill(0);
                    }
                    Err(e) => assert!(
                        tolerated(e.kind())
                            && !(in_range(o, l, size) && o % sector == 0 && l % sector == 0),
                        "write_zeroes {o:#x}+{l} failed: {e} ({:?})",
                        e.kind()
                    ),
                }
            }
            Op::Flush => dev.flush().expect("flush"),
            Op::Read { off, len } => {
                let (o, l) = place(off, u64::from(len % 256) + 1, size, sector);
                buf.resize(l as usize, 0);
                match dev.read_at(&mut buf, o) {
                    Ok(()) => {
                        assert!(in_range(o, l, size), "read past the end accepted");
                        assert!(
                            buf == model[o as usize..(o + l) as usize],
                            "read {o:#x}+{l} differs from the model"
                        );
                    }
                    Err(e) => assert!(
                        tolerated(e.kind())
                            && !(in_range(o, l, size) && o % sector == 0 && l % sector == 0),
                        "read {o:#x}+{l} failed: {e}"
                    ),
                }
            }
            Op::Reopen => {
                dev.flush().expect("flush before reopen");
                drop(dev);
                dev = open_storage(format, Box::new(Arc::clone(&mem)), true)
                    .unwrap_or_else(|e| panic!("reopen failed: {e}"));
                assert_eq!(dev.size(), size);
                check_clean(dev.as_ref());
            }
            Op::Grow { by } => {
                // Only qcow2 grows in place (commit into a smaller parent); kept small.
                if format != Format::Qcow2 || size >= 8 << 20 {
                    continue;
                }
                dev.flush().expect("flush before grow");
                drop(dev);
                let new = size + (u64::from(by) + 1) * 4096;
                qcow2::grow(
                    Box::new(Arc::clone(&mem)),
                    &blockdev::DenyGate,
                    new,
                    &blockdev::Limits::default(),
                )
                .unwrap_or_else(|e| panic!("grow {size} -> {new} failed: {e}"));
                dev = open_storage(format, Box::new(Arc::clone(&mem)), true)
                    .unwrap_or_else(|e| panic!("reopen after grow failed: {e}"));
                assert_eq!(dev.size(), new);
                size = new;
                model.resize(new as usize, 0);
                check_clean(dev.as_ref());
            }
        }
    }
    dev.flush().expect("final flush");
    verify_against(dev.as_ref(), &model);
    drop(dev);
    let ro = open_storage(format, Box::new(MemStorage::read_only(mem.to_vec())), false)
        .unwrap_or_else(|e| panic!("read-only reopen failed: {e}"));
    verify_against(ro.as_ref(), &model);
    check_clean(ro.as_ref());
}

/// `check` of an image we wrote must find no corruption.
pub fn check_clean(dev: &dyn BlockDevice) {
    match dev.check() {
        Ok(r) => assert_eq!(
            r.corruptions(),
            0,
            "check found corruption: {:?}",
            r.findings
        ),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported, "check failed: {e}"),
    }
}

/// Whole-device comparison plus `block_status` consistency with the model.
pub fn verify_against(dev: &dyn BlockDevice, model: &[u8]) {
    let size = model.len() as u64;
    assert_eq!(dev.size(), size);
    let mut got = vec![0u8; model.len()];
    for (i, chunk) in got.chunks_mut(1 << 20).enumerate() {
        let off = (i as u64) << 20;
        dev.read_at(chunk, off)
            .unwrap_or_else(|e| panic!("read at {off:#x} failed: {e}"));
    }
    if got != model {
        let first = got.iter().zip(model).position(|(a, b)| a != b).unwrap();
        panic!("image differs from the model at byte {first:#x}");
    }
    let mut off = 0;
    let mut n = 0;
    while off < size {
        let ext = dev
            .block_status(off, size - off)
            .unwrap_or_else(|e| panic!("block_status at {off:#x}: {e}"));
        assert_eq!(ext.offset, off);
        assert!(ext.len > 0 && off + ext.len <= size, "bad extent {ext:?}");
        if ext.kind != ExtentKind::Data {
            assert!(
                is_zero(&model[off as usize..(off + ext.len) as usize]),
                "extent {ext:?} claims zeros over written data"
            );
        }
        off += ext.len;
        n += 1;
        assert!(n < 1 << 20, "block_status does not progress");
    }
}

// ---------------------------------------------------------------------------------------------
// Writer round trip
// ---------------------------------------------------------------------------------------------

/// One extent handed to a writer.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct WExtent {
    /// Sectors skipped before it.
    pub gap: u16,
    /// Length in sectors.
    pub len: u16,
    /// Zero extent instead of data.
    pub zero: bool,
    /// Fill seed (0 = an all-zero data buffer).
    pub seed: u8,
}

/// A round trip: format, options, size and extents in increasing order.
#[derive(Arbitrary, Debug)]
pub struct RoundTrip {
    /// Output format selector.
    pub format: u8,
    /// Template options selector.
    pub template: u8,
    /// Virtual size selector.
    pub size: u8,
    /// The extents.
    pub extents: Vec<WExtent>,
}

/// Writes the extents with our writer and reads the result back against the model.
pub fn run_roundtrip(rt: &RoundTrip) {
    let format = match rt.format % 3 {
        0 => Format::Vhd,
        1 => Format::Vhdx,
        _ => Format::Qcow2,
    };
    let opts = template_options(format, rt.template);
    let size = ((1 + u64::from(rt.size % 16)) << 17) + if rt.size & 0x80 != 0 { 4096 } else { 0 };
    let mem = Arc::new(MemStorage::new());
    let limits = limits();
    let spec = CreateSpec {
        size,
        options: &opts,
        parent: None,
        path: None,
        limits: &limits,
    };
    let Ok(mut w) = vdisk::formats::writer(format, Box::new(Arc::clone(&mem)), &spec) else {
        return;
    };
    let mut model = vec![0u8; size as usize];
    let sector = if opts
        .iter()
        .any(|(k, v)| k == "logical_sector_size" && v == "4096")
    {
        4096
    } else {
        512
    };
    let mut pos = 0u64;
    let mut buf = Vec::new();
    for e in rt.extents.iter().take(64) {
        let start = pos + u64::from(e.gap % 512) * sector;
        let len = (u64::from(e.len % 512) + 1) * sector;
        if start >= size {
            break;
        }
        let len = len.min(size - start);
        if e.zero {
            w.write_zeroes(start, len)
                .unwrap_or_else(|err| panic!("{format} write_zeroes {start:#x}+{len}: {err}"));
        } else {
            buf.resize(len as usize, 0);
            if e.seed == 0 {
                buf.fill(0);
            } else {
                fill(&mut buf, e.seed, start);
            }
            w.write_data(start, &buf)
                .unwrap_or_else(|err| panic!("{format} write_data {start:#x}+{len}: {err}"));
            model[start as usize..(start + len) as usize].copy_from_slice(&buf);
        }
        pos = start + len;
    }
    w.finish()
        .unwrap_or_else(|err| panic!("{format} finish: {err}"));
    let dev = open_storage(format, Box::new(MemStorage::read_only(mem.to_vec())), false)
        .unwrap_or_else(|e| panic!("{format} ({opts:?}) output does not open: {e}"));
    // A writer may round the size up (VHD geometry): the extra tail must read as zeros.
    assert!(dev.size() >= size, "{format} output is smaller than asked");
    model.resize(dev.size() as usize, 0);
    verify_against(dev.as_ref(), &model);
    check_clean(dev.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Grow operation runs on every qcow2 template: writes before and after it, reopens,
    /// and the model's check (reads match, check() clean) hold.
    #[test]
    fn grow_between_writes_on_every_qcow2_template() {
        for template in 0..8u8 {
            let ops = vec![
                Op::Write {
                    off: Off::Fraction(200),
                    len: 40,
                    seed: 1,
                },
                Op::Grow { by: 255 },
                Op::Write {
                    off: Off::Fraction(250),
                    len: 63,
                    seed: 2,
                },
                Op::Read {
                    off: Off::Fraction(100),
                    len: 255,
                },
                Op::Reopen,
                Op::Grow { by: 3 },
                Op::WriteZeroes {
                    off: Off::Fraction(10),
                    len: 900,
                    deallocate: true,
                },
            ];
            run_ops(
                Format::Qcow2,
                &Program {
                    template,
                    size: 1,
                    ops,
                },
            );
        }
    }

    /// Found by open_vhdx (2026-11-26): a mutated header put the log 10 bytes below 2^64 and
    /// the custom mutator's own walk overflowed. Run with `cargo test --lib` in fuzz/.
    #[test]
    fn resign_log_near_the_end_of_the_offset_range() {
        let mut img = SparseImage {
            len: 4 << 20,
            ..SparseImage::default()
        };
        let mut h = [0u8; 80];
        h[..4].copy_from_slice(b"head");
        h[8..16].copy_from_slice(&1u64.to_le_bytes());
        let cases = [
            (u64::MAX - 10, 5u32),
            (u64::MAX - 70, 70),
            (u64::MAX - 4096 - 63, 4159),
        ];
        for (log_off, log_len) in cases {
            h[68..72].copy_from_slice(&log_len.to_le_bytes());
            h[72..80].copy_from_slice(&log_off.to_le_bytes());
            img.put(KIB64 as u64, &h);
            resign_log_sparse(&mut img);
        }
        // A page at the very end of the range (put there by a re-signing) is not encodable.
        img.put(u64::MAX - 100, b"loge");
        let enc = img.encode();
        assert_eq!(SparseImage::decode(&enc).len, 4 << 20);
    }
}
