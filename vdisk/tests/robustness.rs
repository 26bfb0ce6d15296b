//! Robustness of every parser against hostile bytes (hostile-inputs.md §5.3, issue 7):
//!
//! * truncation at every structure boundary and at regular steps, of images made by qemu-img,
//!   by our own writers and of the third-party fixtures: open/read/check give `Ok` or a typed
//!   error, never a panic, under a time guard;
//! * random byte flips (deterministic seeds, several hundred mutants per format) in the headers
//!   and tables of valid images, checksums re-signed for most mutants so the parsers behind them
//!   are reached: no panic, no hang, allocation bounded;
//! * polyglot files: two magics give `Ambiguous`;
//! * "tiny petabyte" images of each format open quickly and their `block_status` walk is fast;
//! * replays of the fuzz findings kept under `fuzz/regressions/<target>/`.
//!
//! A counting global allocator refuses (and records) any single allocation above 256 MiB: the
//! library cap is 128 MiB, so such a request is a bug even when the allocation would succeed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![allow(unsafe_code)] // the counting global allocator only

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use blockdev::{
    BlockDevice, DenyGate, Error, ErrorKind, ExtentKind, Limits, MemStorage, Result, Storage,
};
use testsupport::TestRng;
use vdisk::formats::{CreateSpec, OpenCtx};
use vdisk::Format;

// ---------------------------------------------------------------------------------------------
// Allocation guard
// ---------------------------------------------------------------------------------------------

/// Any single allocation above this is refused and recorded.
const ALLOC_LIMIT: usize = 256 << 20;

struct CountingAlloc;

static LARGEST_REFUSED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Largest refused request of this thread (const-initialised, no destructor: safe to touch
    /// from inside the allocator).
    static REFUSED_HERE: Cell<usize> = const { Cell::new(0) };
}

fn refuse(size: usize) -> *mut u8 {
    LARGEST_REFUSED.fetch_max(size, Ordering::SeqCst);
    let _ = REFUSED_HERE.try_with(|c| c.set(c.get().max(size)));
    std::ptr::null_mut()
}

// SAFETY: every call is forwarded unchanged to `System`, except requests above the limit, which
// return null as an allocator may always do.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            return refuse(layout.size());
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            return refuse(layout.size());
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through `alloc`/`alloc_zeroed`/`realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_LIMIT {
            return refuse(new_size);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f` on its own thread; fails the test on a panic, on a refused allocation, or when it
/// takes longer than `secs` (the thread is then left behind: a hang is reported, not waited).
fn guarded<T: Send + 'static>(name: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.chars().take(60).collect())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let refused = REFUSED_HERE.with(Cell::get);
            let _ = tx.send((r, refused));
        })
        .unwrap();
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok((Ok(v), 0)) => v,
        Ok((Ok(_), n)) => panic!("{name}: a single allocation of {n} bytes (limit {ALLOC_LIMIT})"),
        Ok((Err(p), _)) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{name}: panicked: {msg}")
        }
        Err(_) => panic!("{name}: no answer within {secs} s (hang or quadratic work)"),
    }
}

/// Per-case time guard (debug build, a shared 2-core machine).
const CASE_SECS: u64 = 20;

// ---------------------------------------------------------------------------------------------
// Storage over a shared buffer, truncated
// ---------------------------------------------------------------------------------------------

/// A read-only view of the first `len` bytes of a shared image (no copy per truncation).
struct Cut {
    data: Arc<Vec<u8>>,
    len: usize,
}

impl Storage for Cut {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|s| Some((s, s.checked_add(buf.len())?)))
            .filter(|(_, e)| *e <= self.len)
            .map(|(s, e)| &self.data[s..e])
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    "read past the end of the file (truncated?)",
                )
                .with_offset(offset)
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::read_only("test storage is read-only"))
    }
    fn len(&self) -> Result<u64> {
        Ok(self.len as u64)
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(Error::read_only("test storage is read-only"))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Opening and exercising
// ---------------------------------------------------------------------------------------------

fn open(format: Format, storage: Box<dyn Storage>) -> Result<Box<dyn BlockDevice>> {
    let limits = Limits::default();
    let ctx = OpenCtx {
        gate: &DenyGate,
        writable: false,
        limits: &limits,
        depth: 0,
        options: &[],
    };
    vdisk::formats::open(format, storage, &ctx)
}

/// Bounded walk: `block_status` (≤ 2048 extents, invariants asserted), reads of data extents
/// within a budget, non-data extents read as zeros, edge and out-of-range reads, `check()`.
fn exercise(dev: &dyn BlockDevice, budget: u64) {
    let size = dev.size();
    let _ = dev.info();
    assert!(
        dev.backing().is_none(),
        "a backing file was opened through DenyGate"
    );
    let mut off = 0u64;
    let mut budget = budget;
    for _ in 0..2048 {
        if off >= size {
            break;
        }
        let ext = match dev.block_status(off, size - off) {
            Ok(e) => e,
            Err(e) => {
                let _ = e.to_string();
                let g = dev.allocation_granularity().max(512);
                match off.checked_add(g - off % g) {
                    Some(o) => {
                        off = o;
                        continue;
                    }
                    None => break,
                }
            }
        };
        assert_eq!(ext.offset, off, "block_status answered another offset");
        assert!(ext.len > 0, "empty extent at {off:#x}");
        let end = off.checked_add(ext.len).expect("extent end overflows");
        assert!(end <= size, "extent {ext:?} past the size {size:#x}");
        if budget > 0 {
            let cap = if ext.kind == ExtentKind::Data {
                256 << 10
            } else {
                16 << 10
            };
            let n = ext.len.min(cap).min(budget);
            let mut buf = vec![0xa5u8; n as usize];
            if dev.read_at(&mut buf, off).is_ok() && ext.kind != ExtentKind::Data {
                assert!(
                    buf.iter().all(|&b| b == 0),
                    "{ext:?} is not data but reads non-zero"
                );
            }
            budget -= n;
        }
        off = end;
    }
    let mut small = vec![0u8; (size.min(65536)) as usize];
    let _ = dev.read_at(&mut small, 0);
    let tail = size - small.len() as u64;
    let _ = dev.read_at(&mut small, tail);
    let mut four = [0u8; 4096];
    assert!(
        dev.read_at(&mut four, size).is_err(),
        "a read past the end succeeded"
    );
    assert!(dev.read_at(&mut four, u64::MAX - 10).is_err());
    if let Ok(r) = dev.check() {
        let _ = r.corruptions();
    }
}

/// Opens `len` bytes of `data` as `format` and exercises the result; returns the error kind.
fn try_image(format: Format, data: &Arc<Vec<u8>>, len: usize, budget: u64) -> Option<ErrorKind> {
    let cut = Cut {
        data: Arc::clone(data),
        len,
    };
    match open(format, Box::new(cut)) {
        Ok(dev) => {
            exercise(dev.as_ref(), budget);
            None
        }
        Err(e) => {
            let _ = e.to_string();
            Some(e.kind())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Images: qemu-img, our writers, third-party fixtures
// ---------------------------------------------------------------------------------------------

/// A named base image.
struct Base {
    name: String,
    format: Format,
    data: Arc<Vec<u8>>,
}

/// A 4 MiB raw source with data, zeros and holes.
fn raw_source() -> Vec<u8> {
    let mut v = vec![0u8; 4 << 20];
    v[..65536].fill(0x55);
    v[(1 << 20)..(1 << 20) + 4096].fill(0xaa);
    for (i, b) in v[(3 << 20)..(3 << 20) + (512 << 10)].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    v
}

fn qemu_images() -> Vec<Base> {
    testsupport::require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, raw_source()).unwrap();
    let cases: &[(&str, Format, &[&str])] = &[
        ("qcow2-v3", Format::Qcow2, &["-O", "qcow2"]),
        (
            "qcow2-v2",
            Format::Qcow2,
            &["-O", "qcow2", "-o", "compat=0.10"],
        ),
        ("qcow2-zlib", Format::Qcow2, &["-O", "qcow2", "-c"]),
        (
            "qcow2-zstd",
            Format::Qcow2,
            &["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
        ),
        (
            "qcow2-512",
            Format::Qcow2,
            &["-O", "qcow2", "-o", "cluster_size=512"],
        ),
        (
            "qcow2-l2ext",
            Format::Qcow2,
            &["-O", "qcow2", "-o", "extended_l2=on"],
        ),
        (
            "qcow2-rc1",
            Format::Qcow2,
            &["-O", "qcow2", "-o", "refcount_bits=1"],
        ),
        ("vpc-dynamic", Format::Vhd, &["-O", "vpc"]),
        (
            "vpc-fixed",
            Format::Vhd,
            &["-O", "vpc", "-o", "subformat=fixed"],
        ),
        (
            "vhdx-1m",
            Format::Vhdx,
            &["-O", "vhdx", "-o", "block_size=1M"],
        ),
        (
            "vhdx-fixed",
            Format::Vhdx,
            &["-O", "vhdx", "-o", "subformat=fixed,block_size=1M"],
        ),
    ];
    let mut out = Vec::new();
    for (name, format, args) in cases {
        let dst = dir.path().join(name);
        let (code, _, err) = testsupport::run(
            Command::new("qemu-img")
                .arg("convert")
                .args(["-f", "raw"])
                .args(*args)
                .arg(&src)
                .arg(&dst),
        );
        assert_eq!(code, 0, "qemu-img convert {name}: {err}");
        out.push(Base {
            name: format!("qemu:{name}"),
            format: *format,
            data: Arc::new(std::fs::read(&dst).unwrap()),
        });
    }
    // A snapshot on top (qcow2 snapshot table) and a bitmap extension.
    let snap = dir.path().join("qcow2-v3");
    let (c1, _, e1) = testsupport::run(
        Command::new("qemu-img")
            .args(["snapshot", "-c", "s1"])
            .arg(&snap),
    );
    let (c2, _, e2) = testsupport::run(
        Command::new("qemu-img")
            .args(["bitmap", "--add"])
            .arg(&snap)
            .arg("b0"),
    );
    assert!(c1 == 0 && c2 == 0, "qemu-img snapshot/bitmap: {e1} {e2}");
    out.push(Base {
        name: "qemu:qcow2-snapshot-bitmap".into(),
        format: Format::Qcow2,
        data: Arc::new(std::fs::read(&snap).unwrap()),
    });
    out
}

/// `-o` option sets of our own writers.
/// `(name, format, options)` of a writer configuration.
type WriterConfig = (&'static str, Format, Vec<(String, String)>);

fn writer_configs() -> Vec<WriterConfig> {
    let o = |k: &str, v: &str| (k.to_string(), v.to_string());
    vec![
        ("vhd-dynamic", Format::Vhd, vec![]),
        ("vhd-fixed", Format::Vhd, vec![o("subformat", "fixed")]),
        ("vhdx-dynamic", Format::Vhdx, vec![o("block_size", "1")]),
        (
            "vhdx-fixed",
            Format::Vhdx,
            vec![o("subformat", "fixed"), o("block_size", "1")],
        ),
        ("qcow2-v3", Format::Qcow2, vec![]),
        (
            "qcow2-v2-4k",
            Format::Qcow2,
            vec![o("compat", "0.10"), o("cluster_size", "4k")],
        ),
        ("qcow2-compressed", Format::Qcow2, vec![o("compress", "on")]),
    ]
}

/// Writes `raw_source()` through our writer of `format` into memory.
fn our_image(format: Format, options: &[(String, String)]) -> Result<Vec<u8>> {
    let src = raw_source();
    let mem = Arc::new(MemStorage::new());
    let limits = Limits::default();
    let spec = CreateSpec {
        size: src.len() as u64,
        options,
        parent: None,
        path: None,
        limits: &limits,
    };
    let mut w = vdisk::formats::writer(format, Box::new(Arc::clone(&mem)), &spec)?;
    for (i, chunk) in src.chunks(64 << 10).enumerate() {
        let off = (i as u64) * (64 << 10);
        if chunk.iter().all(|&b| b == 0) {
            w.write_zeroes(off, chunk.len() as u64)?;
        } else {
            w.write_data(off, chunk)?;
        }
    }
    w.finish()?;
    Ok(mem.to_vec())
}

fn our_images() -> Vec<Base> {
    writer_configs()
        .into_iter()
        .map(|(name, format, opts)| {
            let data = our_image(format, &opts)
                .unwrap_or_else(|e| panic!("our {name} writer failed: {e}"));
            Base {
                name: format!("ours:{name}"),
                format,
                data: Arc::new(data),
            }
        })
        .collect()
}

/// Third-party fixtures small enough to sweep (skipped when the shared folder is absent).
const FIXTURES: &[(&str, Format)] = &[
    ("dissect/dynamic.vhd.gz", Format::Vhd),
    ("dissect/fixed.vhd.gz", Format::Vhd),
    ("dissect/fixed.vhdx.gz", Format::Vhdx),
    ("dissect/dynamic.vhdx.gz", Format::Vhdx),
    ("dissect/basic.qcow2.gz", Format::Qcow2),
    ("dissect/basic-zstd.qcow2.gz", Format::Qcow2),
    ("dissect/snapshot.qcow2.gz", Format::Qcow2),
    ("dissect/backing-chain-1.qcow2.gz", Format::Qcow2),
    ("dissect/data-file.qcow2.gz", Format::Qcow2),
    ("dfvfs/ext2.vhd.xz", Format::Vhd),
    ("dfvfs/ext2.qcow2.xz", Format::Qcow2),
    ("dfvfs/image.vhd.xz", Format::Vhd),
    ("dfvfs/fat-differential.vhd.xz", Format::Vhd),
    ("dfvfs/windows_volume.qcow2.xz", Format::Qcow2),
    ("mkimg/img-1x1-512-gpt.vhd.xz", Format::Vhd),
    ("mkimg/img-1x1-512-gpt.vhdf.xz", Format::Vhd),
    ("mkimg/img-1x1-512-gpt.vhdx.xz", Format::Vhdx),
    ("mkimg/img-1x1-512-gpt.qcow2.xz", Format::Qcow2),
    ("qemu/hyperv2012r2-dynamic.vhd.bz2", Format::Vhd),
    ("qemu/virtualpc-dynamic.vhd.bz2", Format::Vhd),
    ("qemu/iotest-dirtylog-10G-4M.vhdx.bz2", Format::Vhdx),
    ("discutils/vhdx-log-replay.vhdx.gz", Format::Vhdx),
    ("discutils/swap.vhdx.gz", Format::Vhdx),
];

fn fixture_images() -> Vec<Base> {
    let mut out = Vec::new();
    for (rel, format) in FIXTURES {
        let Some(fx) = testsupport::shared_fixture(rel) else {
            eprintln!("shared fixtures absent: skipping {rel}");
            continue;
        };
        let data = std::fs::read(&fx.path).unwrap();
        if data.len() > 40 << 20 {
            continue;
        }
        out.push(Base {
            name: format!("fixture:{rel}"),
            format: *format,
            data: Arc::new(data),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Structure boundaries
// ---------------------------------------------------------------------------------------------

fn be32(d: &[u8], o: usize) -> u64 {
    d.get(o..o + 4)
        .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()) as u64)
}
fn be64(d: &[u8], o: usize) -> u64 {
    d.get(o..o + 8)
        .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()))
}
fn le32(d: &[u8], o: usize) -> u64 {
    d.get(o..o + 4)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as u64)
}
fn le64(d: &[u8], o: usize) -> u64 {
    d.get(o..o + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
}

/// Regions (offset, length) holding metadata: where truncation boundaries are and where byte
/// flips go.
fn structures(format: Format, d: &[u8]) -> Vec<(u64, u64)> {
    let len = d.len() as u64;
    let mut s = Vec::new();
    match format {
        Format::Qcow2 => {
            let cluster = 1u64 << be32(d, 20).clamp(9, 21);
            let hlen = if be32(d, 4) >= 3 {
                be32(d, 100).max(104)
            } else {
                72
            };
            s.push((0, hlen));
            s.push((hlen, cluster.min(4096).saturating_sub(hlen))); // extensions
            let bf = be64(d, 8);
            if bf != 0 {
                s.push((bf, be32(d, 16)));
            }
            let l1 = be64(d, 40);
            let l1_len = be32(d, 36) * 8;
            s.push((l1, l1_len));
            let rt = be64(d, 48);
            s.push((rt, (be32(d, 56) * cluster).min(1 << 20)));
            let snap = be64(d, 64);
            if snap != 0 {
                s.push((snap, 4096));
            }
            // First refcount block and the first L2 tables.
            let rb = be64(d, rt as usize) & 0x00ff_ffff_ffff_fe00;
            if rb != 0 {
                s.push((rb, cluster));
            }
            for i in 0..(l1_len / 8).min(4) {
                let l2 = be64(d, (l1 + i * 8) as usize) & 0x00ff_ffff_ffff_fe00;
                if l2 != 0 {
                    s.push((l2, cluster));
                    let first = be64(d, l2 as usize) & 0x00ff_ffff_ffff_fe00;
                    if first != 0 {
                        s.push((first, cluster));
                    }
                }
            }
        }
        Format::Vhd => {
            s.push((len.saturating_sub(512), 512));
            s.push((0, 512));
            let f = len.saturating_sub(512) as usize;
            let dyn_off = be64(d, f + 16);
            if dyn_off != u64::MAX && dyn_off < len {
                s.push((dyn_off, 1024));
                let bat = be64(d, dyn_off as usize + 16);
                let entries = be32(d, dyn_off as usize + 28);
                let bs = be32(d, dyn_off as usize + 32);
                s.push((bat, (entries * 4).min(1 << 20)));
                // Parent locators (8 × 24 bytes at +576).
                for i in 0..8 {
                    let p = dyn_off as usize + 576 + i * 24;
                    let loff = be64(d, p + 16);
                    if loff != 0 {
                        s.push((loff, be32(d, p + 4).min(4096)));
                    }
                }
                for i in 0..entries.min(4) {
                    let e = be32(d, (bat + i * 4) as usize);
                    if e != 0xffff_ffff {
                        s.push((e * 512, 512 + bs.min(1 << 20)));
                    }
                }
            }
        }
        Format::Vhdx => {
            for (o, l) in [
                (0, 4096),
                (64 << 10, 4096),
                (128 << 10, 4096),
                (192 << 10, 4096),
                (256 << 10, 4096),
            ] {
                s.push((o, l));
            }
            let h = if le64(d, (128 << 10) + 8) > le64(d, (64 << 10) + 8) {
                128 << 10
            } else {
                64 << 10
            };
            s.push((le64(d, h + 72), le32(d, h + 68).min(1 << 20)));
            let rt = 192 << 10;
            let count = le32(d, rt + 8).min(16);
            for i in 0..count as usize {
                let e = rt + 16 + i * 32;
                let off = le64(d, e + 16);
                let l = le32(d, e + 24);
                s.push((off, l.min(1 << 20)));
                // The metadata table and its items.
                if d.get(off as usize..off as usize + 8) == Some(b"metadata") {
                    let n = le32(d, off as usize + 8) >> 16;
                    for j in 0..(n.min(16)) as usize {
                        let me = off as usize + 32 + j * 32;
                        s.push((off + le32(d, me + 16), le32(d, me + 20).min(4096)));
                    }
                }
            }
        }
        Format::Raw => {}
    }
    s.retain(|&(o, l)| o < len && l > 0);
    s
}

/// Truncation points: every structure's start, end and ±1, fixed small sizes, and a step sweep.
fn cut_points(format: Format, d: &[u8]) -> Vec<usize> {
    let len = d.len() as u64;
    let mut p: Vec<u64> = vec![
        0, 1, 7, 8, 71, 72, 103, 104, 511, 512, 513, 1023, 1024, 1536, 4095, 4096,
    ];
    for (o, l) in structures(format, d) {
        for x in [o, o + 1, o + l / 2, o + l - 1, o + l, o + l + 1] {
            p.push(x.saturating_sub(0));
        }
        if o > 0 {
            p.push(o - 1);
        }
    }
    for i in 1..24 {
        p.push(len * i / 24 / 512 * 512);
        p.push(len * i / 24);
    }
    p.extend([
        len - 1,
        len.saturating_sub(511),
        len.saturating_sub(512),
        len.saturating_sub(513),
    ]);
    let mut v: Vec<usize> = p
        .into_iter()
        .filter(|&x| x < len)
        .map(|x| x as usize)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn sweep(bases: Vec<Base>) -> usize {
    let mut n = 0;
    for b in bases {
        // The whole image first: must open (except fixtures whose parents are absent).
        let cuts = cut_points(b.format, &b.data);
        let name = b.name.clone();
        let fmt = b.format;
        let data = Arc::clone(&b.data);
        n += cuts.len();
        guarded(&format!("truncate {name}"), CASE_SECS * 6, move || {
            for cut in cuts {
                let t = Instant::now();
                let _ = try_image(fmt, &data, cut, 1 << 20);
                assert!(
                    t.elapsed() < Duration::from_secs(CASE_SECS),
                    "{name} cut at {cut}: {:?}",
                    t.elapsed()
                );
            }
        });
    }
    n
}

#[test]
fn truncation_sweep_qemu_images() {
    let n = sweep(qemu_images());
    assert!(n > 300, "only {n} truncations");
}

#[test]
fn truncation_sweep_our_writers() {
    let n = sweep(our_images());
    assert!(n > 200, "only {n} truncations");
}

#[test]
fn truncation_sweep_fixtures() {
    let bases = fixture_images();
    if bases.is_empty() {
        eprintln!("shared fixtures absent: truncation sweep of fixtures skipped");
        return;
    }
    sweep(bases);
}

#[test]
fn whole_images_open_and_read() {
    // The untruncated bases must open (the sweep's baseline is meaningful).
    for b in qemu_images().into_iter().chain(our_images()) {
        let name = b.name.clone();
        let kind = guarded(&name.clone(), CASE_SECS, move || {
            try_image(b.format, &b.data, b.data.len(), 8 << 20)
        });
        assert_eq!(kind, None, "{name} does not open");
    }
}

// ---------------------------------------------------------------------------------------------
// Byte flips in headers and tables
// ---------------------------------------------------------------------------------------------

const CRC32C_POLY: u32 = 0x82F6_3B78;

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn resign_crc(d: &mut [u8], off: usize, len: usize) {
    if off + len <= d.len() {
        d[off + 4..off + 8].fill(0);
        let c = crc32c(&d[off..off + len]);
        d[off + 4..off + 8].copy_from_slice(&c.to_le_bytes());
    }
}

fn resign_vhd(d: &mut [u8], off: usize, len: usize, csum_at: usize) {
    if off + len <= d.len() {
        d[off + csum_at..off + csum_at + 4].fill(0);
        let sum: u32 = d[off..off + len]
            .iter()
            .fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        d[off + csum_at..off + csum_at + 4].copy_from_slice(&(!sum).to_be_bytes());
    }
}

/// Re-signs the checksummed structures of `format` (what a crafted file would do).
fn resign(format: Format, d: &mut [u8]) {
    match format {
        Format::Vhdx => {
            resign_crc(d, 64 << 10, 4096);
            resign_crc(d, 128 << 10, 4096);
            resign_crc(d, 192 << 10, 64 << 10);
            resign_crc(d, 256 << 10, 64 << 10);
        }
        Format::Vhd => {
            let f = d.len().saturating_sub(512);
            let was_copy = d.len() >= 1024 && d[..512] == d[f..];
            resign_vhd(d, f, 512, 64);
            if was_copy || &d[..8] == b"conectix" {
                resign_vhd(d, 0, 512, 64);
            }
            let dyn_off = be64(d, f + 16);
            if dyn_off != u64::MAX && (dyn_off as usize).saturating_add(1024) <= d.len() {
                resign_vhd(d, dyn_off as usize, 1024, 36);
            }
        }
        _ => {}
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x200,
    0x1000,
    0x10_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0xffff_ffff_ffff_fe00,
    u64::MAX,
];

fn mutate(rng: &mut TestRng, format: Format, base: &[u8], regions: &[(u64, u64)]) -> Vec<u8> {
    let mut d = base.to_vec();
    let flips = 1 + rng.next_u64() % 4;
    for _ in 0..flips {
        let (o, l) = regions[(rng.next_u64() % regions.len() as u64) as usize];
        let at = (o + rng.next_u64() % l) as usize;
        if at >= d.len() {
            continue;
        }
        match rng.next_u64() % 4 {
            0 => d[at] ^= 1 << (rng.next_u64() % 8),
            1 => d[at] = rng.next_u64() as u8,
            _ => {
                let v = INTERESTING[(rng.next_u64() % INTERESTING.len() as u64) as usize];
                let width = [1usize, 2, 4, 8][(rng.next_u64() % 4) as usize];
                let bytes = if format == Format::Vhdx {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let src = if format == Format::Vhdx {
                    &bytes[..width]
                } else {
                    &bytes[8 - width..]
                };
                let end = (at + width).min(d.len());
                d[at..end].copy_from_slice(&src[..end - at]);
            }
        }
    }
    if !rng.next_u64().is_multiple_of(4) {
        resign(format, &mut d);
    }
    d
}

fn flip_suite(format: Format, per_base: usize, seed: u64) {
    let bases: Vec<Base> = qemu_images()
        .into_iter()
        .chain(our_images())
        .filter(|b| b.format == format)
        .collect();
    assert!(!bases.is_empty());
    let mut total = 0;
    let mut opened = 0;
    let mut kinds = std::collections::BTreeMap::new();
    for (bi, b) in bases.iter().enumerate() {
        let regions = structures(format, &b.data);
        assert!(!regions.is_empty(), "{}: no structures found", b.name);
        let base = Arc::clone(&b.data);
        let name = b.name.clone();
        let (o, k) = guarded(&format!("flips {name}"), CASE_SECS * 10, move || {
            let mut rng = TestRng::new(seed ^ (bi as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut opened = 0;
            let mut kinds: Vec<ErrorKind> = Vec::new();
            for i in 0..per_base {
                let m = Arc::new(mutate(&mut rng, format, &base, &regions));
                let t = Instant::now();
                match try_image(format, &m, m.len(), 512 << 10) {
                    None => opened += 1,
                    Some(k) => kinds.push(k),
                }
                assert!(
                    t.elapsed() < Duration::from_secs(CASE_SECS),
                    "{name} mutant {i} took {:?}",
                    t.elapsed()
                );
            }
            (opened, kinds)
        });
        total += per_base;
        opened += o;
        for k in k {
            *kinds.entry(format!("{k:?}")).or_insert(0usize) += 1;
        }
    }
    eprintln!("{format}: {total} mutants, {opened} opened, errors {kinds:?}");
    assert!(total >= 300);
}

#[test]
fn byte_flips_qcow2() {
    flip_suite(Format::Qcow2, 80, 0x51c0);
}

#[test]
fn byte_flips_vhd() {
    flip_suite(Format::Vhd, 150, 0x5d1);
}

#[test]
fn byte_flips_vhdx() {
    flip_suite(Format::Vhdx, 150, 0x5d2);
}

// ---------------------------------------------------------------------------------------------
// Polyglots
// ---------------------------------------------------------------------------------------------

fn probe(d: Vec<u8>) -> Result<Format> {
    vdisk::probe(&MemStorage::read_only(d))
}

fn vhd_footer() -> Vec<u8> {
    let d = our_image(Format::Vhd, &[("subformat".into(), "fixed".into())]).unwrap();
    d[d.len() - 512..].to_vec()
}

#[test]
fn polyglot_qcow2_with_vhd_footer_is_ambiguous() {
    let mut q = our_image(Format::Qcow2, &[]).unwrap();
    q.extend_from_slice(&vhd_footer());
    assert_eq!(probe(q.clone()).unwrap_err().kind(), ErrorKind::Ambiguous);
    // Forcing either format must not panic.
    let q = Arc::new(q);
    for f in [Format::Qcow2, Format::Vhd] {
        let q = Arc::clone(&q);
        guarded("polyglot open", CASE_SECS, move || {
            try_image(f, &q, q.len(), 1 << 20)
        });
    }
}

#[test]
fn polyglot_vhdx_with_vhd_footer_is_ambiguous() {
    let mut x = our_image(Format::Vhdx, &[("block_size".into(), "1".into())]).unwrap();
    x.extend_from_slice(&vhd_footer());
    assert_eq!(probe(x).unwrap_err().kind(), ErrorKind::Ambiguous);
}

#[test]
fn polyglot_vhd_with_qcow2_magic_at_start_is_ambiguous() {
    let mut v = our_image(Format::Vhd, &[]).unwrap();
    // A dynamic VHD starts with its footer copy: overwrite it with a qcow2 header.
    let q = our_image(Format::Qcow2, &[]).unwrap();
    v[..104].copy_from_slice(&q[..104]);
    assert_eq!(probe(v.clone()).unwrap_err().kind(), ErrorKind::Ambiguous);
    let v = Arc::new(v);
    for f in [Format::Qcow2, Format::Vhd] {
        let v = Arc::clone(&v);
        guarded("polyglot open", CASE_SECS, move || {
            try_image(f, &v, v.len(), 1 << 20)
        });
    }
}

#[test]
fn polyglot_raw_with_vhd_footer_and_qcow2_header_is_ambiguous() {
    // A "raw" guest disk whose owner planted both magics (CVE-2008-2004 style).
    let mut d = vec![0u8; 1 << 20];
    d[..4].copy_from_slice(b"QFI\xfb");
    let n = d.len();
    d[n - 512..n - 504].copy_from_slice(b"conectix");
    assert_eq!(probe(d).unwrap_err().kind(), ErrorKind::Ambiguous);
}

#[test]
fn qcow2_with_gpt_and_elf_signatures_is_still_qcow2() {
    // GPT/ELF are not image formats: the qcow2 magic alone decides.
    let mut q = our_image(Format::Qcow2, &[]).unwrap();
    q[510] = 0x55;
    q[511] = 0xaa;
    q[512..520].copy_from_slice(b"EFI PART");
    assert_eq!(probe(q.clone()).unwrap(), Format::Qcow2);
    let mut e = vec![0u8; 4096];
    e[..4].copy_from_slice(b"\x7fELF");
    assert_eq!(probe(e).unwrap(), Format::Raw);
}

// ---------------------------------------------------------------------------------------------
// Tiny petabytes
// ---------------------------------------------------------------------------------------------

fn create_in_memory(format: Format, size: u64, options: &[(String, String)]) -> Result<Vec<u8>> {
    let mem = Arc::new(MemStorage::new());
    let limits = Limits::default();
    let spec = CreateSpec {
        size,
        options,
        parent: None,
        path: None,
        limits: &limits,
    };
    vdisk::formats::create(format, Box::new(Arc::clone(&mem)), &spec)?;
    Ok(mem.to_vec())
}

/// Opens a huge-but-empty image and walks it: both must be fast and bounded.
fn tiny_huge(name: &str, format: Format, data: Vec<u8>, expect_size: u64) {
    let name = name.to_string();
    let file_len = data.len();
    guarded(&name.clone(), CASE_SECS, move || {
        let data = Arc::new(data);
        let t = Instant::now();
        let dev = open(
            format,
            Box::new(Cut {
                len: data.len(),
                data: Arc::clone(&data),
            }),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let opened = t.elapsed();
        assert_eq!(dev.size(), expect_size, "{name}");
        let t = Instant::now();
        let mut off = 0;
        let mut extents = 0u64;
        while off < dev.size() {
            let e = dev.block_status(off, dev.size() - off).unwrap();
            assert_ne!(e.kind, ExtentKind::Data, "{name}: data in an empty image");
            off += e.len;
            extents += 1;
            assert!(
                extents <= 1 << 16,
                "{name}: more than 65536 extents for an empty image"
            );
        }
        let walked = t.elapsed();
        let mut buf = vec![0xffu8; 65536];
        dev.read_at(&mut buf, dev.size() - 65536).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        eprintln!(
            "{name}: file {file_len} B, open {opened:?}, walk {walked:?} ({extents} extents)"
        );
        assert!(
            opened < Duration::from_secs(2),
            "{name}: open took {opened:?}"
        );
        assert!(
            walked < Duration::from_secs(2),
            "{name}: block_status walk took {walked:?}"
        );
        let t = Instant::now();
        let _ = dev.check();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{name}: check took {:?}",
            t.elapsed()
        );
    });
}

const PIB: u64 = 1 << 50;

#[test]
fn tiny_petabyte_qcow2() {
    let o = |k: &str, v: &str| (k.to_string(), v.to_string());
    let ours = create_in_memory(Format::Qcow2, PIB, &[o("cluster_size", "2M")]).unwrap();
    tiny_huge("ours qcow2 1 PiB", Format::Qcow2, ours, PIB);
    testsupport::require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pb.qcow2");
    for (name, opts) in [
        ("qemu qcow2 1 PiB 2M", "cluster_size=2M"),
        ("qemu qcow2 1 PiB 64k", "cluster_size=64k"),
    ] {
        let _ = std::fs::remove_file(&p);
        let (c, _, e) = testsupport::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o", opts])
                .arg(&p)
                .arg("1P"),
        );
        assert_eq!(c, 0, "{e}");
        tiny_huge(name, Format::Qcow2, std::fs::read(&p).unwrap(), PIB);
    }
}

#[test]
fn tiny_huge_vhd() {
    // VHD's ceiling is 2040 GiB; a dynamic one of that size is a few MiB of BAT.
    let size = 2040u64 << 30;
    let ours = create_in_memory(Format::Vhd, size, &[]).unwrap();
    let n = ours.len();
    tiny_huge(
        "ours vhd 2040 GiB",
        Format::Vhd,
        ours,
        open_size(Format::Vhd, n, size),
    );
    testsupport::require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.vhd");
    let (c, _, e) = testsupport::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o", "force_size=on"])
            .arg(&p)
            .arg("2040G"),
    );
    assert_eq!(c, 0, "{e}");
    let d = std::fs::read(&p).unwrap();
    tiny_huge("qemu vhd 2040 GiB", Format::Vhd, d, size);
}

/// The size the image reports (VHD may round to its geometry): read from the footer.
fn open_size(format: Format, _len: usize, asked: u64) -> u64 {
    if format == Format::Vhd {
        // Our writer stores current_size = asked (rounded up to a sector at most).
        asked.div_ceil(512) * 512
    } else {
        asked
    }
}

#[test]
fn tiny_huge_vhdx() {
    let o = |k: &str, v: &str| (k.to_string(), v.to_string());
    let size = 64u64 << 40; // the VHDX maximum
    let ours = create_in_memory(Format::Vhdx, size, &[o("block_size", "256")]).unwrap();
    tiny_huge("ours vhdx 64 TiB", Format::Vhdx, ours, size);
    testsupport::require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.vhdx");
    let (c, _, e) = testsupport::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "vhdx", "-o", "block_size=256M"])
            .arg(&p)
            .arg("64T"),
    );
    assert_eq!(c, 0, "{e}");
    tiny_huge(
        "qemu vhdx 64 TiB",
        Format::Vhdx,
        std::fs::read(&p).unwrap(),
        size,
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz regressions (fuzz/regressions/<target>/): every file replays without a panic
// ---------------------------------------------------------------------------------------------

fn regressions_dir(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target)
}

/// Decodes the parser targets' sparse input encoding (fuzz/src/lib.rs `SparseImage`): u64 LE
/// file length, then records (u32 LE offset, u16 LE length, bytes); later records win, a short
/// last record is cut. Inputs shorter than 8 bytes are the file itself. Files above 64 MiB are
/// refused here (no kept input needs one).
fn decode_sparse(input: &[u8]) -> Vec<u8> {
    let Some(head) = input.get(..8) else {
        return input.to_vec();
    };
    let len = u64::from_le_bytes(head.try_into().unwrap());
    assert!(len <= 64 << 20, "kept input declares a {len}-byte file");
    let mut img = vec![0u8; len as usize];
    let mut p = 8;
    while p + 6 <= input.len() {
        let off = u32::from_le_bytes(input[p..p + 4].try_into().unwrap()) as usize;
        let n = u16::from_le_bytes(input[p + 4..p + 6].try_into().unwrap()) as usize;
        let end = (p + 6 + n).min(input.len());
        let bytes = &input[p + 6..end];
        if off < img.len() {
            let m = bytes.len().min(img.len() - off);
            img[off..off + m].copy_from_slice(&bytes[..m]);
        }
        p = end;
    }
    img
}

/// Replays one kept input of a parser target (open + bounded exercise).
fn replay_parser(target: &str, file: &str, format: Format) -> Option<ErrorKind> {
    let path = regressions_dir(target).join(file);
    let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let data = Arc::new(decode_sparse(&input));
    guarded(&format!("{target}/{file}"), CASE_SECS, move || {
        try_image(format, &data, data.len(), 8 << 20)
    })
}

#[test]
fn fuzz_regression_folders_replay() {
    for (target, format) in [
        ("open_vhd", Format::Vhd),
        ("open_vhdx", Format::Vhdx),
        ("open_qcow2", Format::Qcow2),
    ] {
        let Ok(rd) = std::fs::read_dir(regressions_dir(target)) else {
            continue;
        };
        for e in rd {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            if !name.starts_with('.') && !name.ends_with(".md") {
                replay_parser(target, &name, format);
            }
        }
    }
}

#[test]
fn sparse_decoding_matches_the_fuzz_crate() {
    // u64 length 16, record at 4 of 3 bytes, record at 14 of 4 bytes (cut at the file end).
    let mut enc = 16u64.to_le_bytes().to_vec();
    enc.extend_from_slice(&4u32.to_le_bytes());
    enc.extend_from_slice(&3u16.to_le_bytes());
    enc.extend_from_slice(b"abc");
    enc.extend_from_slice(&14u32.to_le_bytes());
    enc.extend_from_slice(&4u16.to_le_bytes());
    enc.extend_from_slice(b"wxyz");
    let d = decode_sparse(&enc);
    assert_eq!(d.len(), 16);
    assert_eq!(&d[4..7], b"abc");
    assert_eq!(&d[14..16], b"wx");
}
