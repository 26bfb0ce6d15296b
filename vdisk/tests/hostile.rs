//! Cross-format crash safety and fault injection through the `vdisk` facade (issue 7,
//! hostile-inputs.md §5.5): for every format,
//!
//! * in-place writes on a `CrashStorage` that "loses power" after each storage operation N, for
//!   every N of the scenario (opening included): the durable image reopens with the strict
//!   reader, `check` finds no corruption (leaks allowed), and every sector holds a value it had
//!   at or after the last successful flush (old or new, never garbage);
//! * the same scenario on a `FaultyStorage` that fails operation N with EIO (once, and from N on):
//!   errors are returned, never a panic; the image reopens consistent with the same rule;
//! * `create` and the convert writer under both: a crash or an I/O error gives an error, never a
//!   panic; when `finish` returned `Ok` the image is durable (it reopens from the flushed state
//!   and reads back equal).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use blockdev::testkit::{CrashStorage, FaultyStorage};
use blockdev::{BlockDevice, DenyGate, Limits, MemStorage, Result, Storage};
use vdisk::formats::{CreateSpec, OpenCtx};
use vdisk::Format;

const SIZE: u64 = 4 << 20;
const SECTOR: usize = 512;

fn opts(format: Format) -> Vec<(String, String)> {
    let o = |k: &str, v: &str| (k.to_string(), v.to_string());
    match format {
        Format::Vhd => vec![o("block_size", "512K")],
        Format::Vhdx => vec![o("block_size", "1")],
        Format::Qcow2 => vec![o("cluster_size", "4k")],
        Format::Raw => vec![],
    }
}

fn open(format: Format, storage: Box<dyn Storage>, writable: bool) -> Result<Box<dyn BlockDevice>> {
    let limits = Limits::default();
    let ctx = OpenCtx {
        gate: &DenyGate,
        writable,
        limits: &limits,
        depth: 0,
        options: &[],
    };
    vdisk::formats::open(format, storage, &ctx)
}

fn template(format: Format) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let limits = Limits::default();
    let o = opts(format);
    let spec = CreateSpec {
        size: SIZE,
        options: &o,
        parent: None,
        path: None,
        limits: &limits,
    };
    vdisk::formats::create(format, Box::new(Arc::clone(&mem)), &spec)
        .unwrap_or_else(|e| panic!("{format} create: {e}"));
    mem.to_vec()
}

/// One step of the in-place scenario.
#[derive(Clone, Copy, Debug)]
enum Step {
    Write(u64, usize, u8),
    Zero(u64, u64),
    Flush,
}

/// Allocates across block/cluster/L2 boundaries, rewrites, zeroes, flushes between.
const SCENARIO: &[Step] = &[
    Step::Write(0, 64 << 10, 1),
    Step::Flush,
    Step::Write((3 << 19) - 4096, 8192, 2), // across a 512 KiB VHD block boundary
    Step::Zero(0, 4096),
    Step::Flush,
    Step::Write(3 << 20, 4096, 3),
    Step::Write(64 << 10, 1 << 20, 4), // many clusters, across a 1 MiB VHDX block
    Step::Write(512, 512, 5),
    Step::Flush,
    Step::Write(SIZE - 8192, 8192, 6),
    Step::Zero(1 << 20, 64 << 10),
    Step::Flush,
];

fn pattern(len: usize, seed: u8, off: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = off + i as u64;
            ((x / 512) as u8).wrapping_mul(7) ^ seed.wrapping_mul(0x3b) ^ (x as u8) | 1
        })
        .collect()
}

/// Per-sector sets of values that are acceptable after a failure.
struct Oracle {
    model: Vec<u8>,
    /// For each sector: the values it may hold (hashes), reset to the current one on a flush.
    allowed: Vec<Vec<u64>>,
}

fn hash(b: &[u8]) -> u64 {
    // FNV-1a: enough to tell sector contents apart in a test.
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Oracle {
    fn new(size: u64) -> Self {
        let model = vec![0u8; size as usize];
        let z = hash(&[0u8; SECTOR]);
        Oracle {
            allowed: vec![vec![z]; model.len() / SECTOR],
            model,
        }
    }
    fn apply(&mut self, off: u64, data: Option<&[u8]>, len: u64) {
        let (s, e) = (off as usize, (off + len) as usize);
        match data {
            Some(d) => self.model[s..e].copy_from_slice(d),
            None => self.model[s..e].fill(0),
        }
        for sec in s / SECTOR..e.div_ceil(SECTOR) {
            let h = hash(&self.model[sec * SECTOR..(sec + 1) * SECTOR]);
            if !self.allowed[sec].contains(&h) {
                self.allowed[sec].push(h);
            }
        }
    }
    fn flushed(&mut self) {
        for (sec, a) in self.allowed.iter_mut().enumerate() {
            *a = vec![hash(&self.model[sec * SECTOR..(sec + 1) * SECTOR])];
        }
    }
    fn verify(&self, what: &str, dev: &dyn BlockDevice) {
        assert_eq!(dev.size(), self.model.len() as u64, "{what}: size");
        let mut buf = vec![0u8; self.model.len()];
        dev.read_at(&mut buf, 0)
            .unwrap_or_else(|e| panic!("{what}: reading the recovered image: {e}"));
        for (sec, a) in self.allowed.iter().enumerate() {
            let h = hash(&buf[sec * SECTOR..(sec + 1) * SECTOR]);
            assert!(
                a.contains(&h),
                "{what}: sector {sec} holds a value it never had since the last flush"
            );
        }
    }
}

/// Runs the scenario on `storage`; stops at the first error. Returns the oracle.
fn run_scenario(format: Format, storage: Box<dyn Storage>) -> Oracle {
    let mut oracle = Oracle::new(SIZE);
    let Ok(dev) = open(format, storage, true) else {
        return oracle;
    };
    assert_eq!(dev.size(), SIZE);
    for step in SCENARIO {
        let r = match *step {
            Step::Write(off, len, seed) => {
                let d = pattern(len, seed, off);
                oracle.apply(off, Some(&d), len as u64);
                dev.write_at(&d, off)
            }
            Step::Zero(off, len) => {
                oracle.apply(off, None, len);
                dev.write_zeroes(off, len, false)
            }
            Step::Flush => {
                let r = dev.flush();
                if r.is_ok() {
                    oracle.flushed();
                }
                r
            }
        };
        if r.is_err() {
            break;
        }
    }
    drop(dev);
    oracle
}

/// The recovered image must open strictly, check clean (leaks allowed) and satisfy the oracle.
fn verify_recovered(format: Format, what: &str, bytes: Vec<u8>, oracle: &Oracle) {
    let dev = open(format, Box::new(MemStorage::read_only(bytes)), false)
        .unwrap_or_else(|e| panic!("{what}: the recovered image does not open: {e}"));
    if let Ok(r) = dev.check() {
        assert_eq!(
            r.corruptions(),
            0,
            "{what}: check finds corruption: {:?}",
            r.findings
        );
    }
    oracle.verify(what, dev.as_ref());
}

/// Every operation index up to 100, then a prime stride (keeps debug runs under a minute; the
/// stride moves the sampled points across block, cluster and table boundaries).
fn sample(total: u64) -> impl Iterator<Item = u64> {
    (0..=total).filter(move |&n| n <= 100 || n % 11 == 0 || n == total)
}

fn crash_every_op(format: Format) {
    let base = template(format);
    // Dry run: how many storage operations the scenario takes.
    let dry = Arc::new(CrashStorage::new(base.clone(), None));
    let o = run_scenario(format, Box::new(Arc::clone(&dry)));
    verify_recovered(format, "no crash", dry.crash_image().to_vec(), &o);
    let total = dry.ops();
    assert!(total > 5, "{format}: only {total} storage operations");
    eprintln!("{format}: the in-place scenario takes {total} storage operations");
    for n in sample(total) {
        let st = Arc::new(CrashStorage::new(base.clone(), Some(n)));
        let oracle = run_scenario(format, Box::new(Arc::clone(&st)));
        let what = format!("{format}: crash after op {n} of {total}");
        verify_recovered(format, &what, st.crash_image().to_vec(), &oracle);
    }
}

fn fail_every_op(format: Format) {
    let base = template(format);
    let probe = Arc::new(MemStorage::from_vec(base.clone()));
    let counting = FaultyStorage::new(Arc::clone(&probe), u64::MAX, false);
    let counting = Arc::new(counting);
    run_scenario(format, Box::new(Arc::clone(&counting)));
    let total = counting.ops();
    eprintln!("{format}: {total} storage writes/flushes to fail");
    for sticky in [false, true] {
        for n in sample(total).filter(|&n| n > 0) {
            let mem = Arc::new(MemStorage::from_vec(base.clone()));
            let st = FaultyStorage::new(Arc::clone(&mem), n, sticky);
            let oracle = run_scenario(format, Box::new(st));
            let what = format!("{format}: EIO at op {n} of {total} (sticky {sticky})");
            // With a one-shot failure the scenario stopped at the error: same rule.
            verify_recovered(format, &what, mem.to_vec(), &oracle);
        }
    }
}

#[test]
fn crash_at_every_storage_op_vhd() {
    crash_every_op(Format::Vhd);
}

#[test]
fn crash_at_every_storage_op_vhdx() {
    crash_every_op(Format::Vhdx);
}

#[test]
fn crash_at_every_storage_op_qcow2() {
    crash_every_op(Format::Qcow2);
}

#[test]
fn eio_at_every_storage_op_vhd() {
    fail_every_op(Format::Vhd);
}

#[test]
fn eio_at_every_storage_op_vhdx() {
    fail_every_op(Format::Vhdx);
}

#[test]
fn eio_at_every_storage_op_qcow2() {
    fail_every_op(Format::Qcow2);
}

// ---------------------------------------------------------------------------------------------
// create and the convert writer
// ---------------------------------------------------------------------------------------------

/// Writes a few extents through the writer of `format` on `storage`; `Ok` only if `finish` did.
fn write_image(format: Format, storage: Box<dyn Storage>) -> Result<Vec<u8>> {
    let limits = Limits::default();
    let o = opts(format);
    let spec = CreateSpec {
        size: SIZE,
        options: &o,
        parent: None,
        path: None,
        limits: &limits,
    };
    let mut model = vec![0u8; SIZE as usize];
    let mut w = vdisk::formats::writer(format, storage, &spec)?;
    for (off, len, seed) in [
        (0u64, 65536usize, 1u8),
        (1 << 20, 4096, 2),
        (3 << 20, 600 << 10, 3),
    ] {
        let d = pattern(len, seed, off);
        w.write_data(off, &d)?;
        model[off as usize..off as usize + len].copy_from_slice(&d);
    }
    w.write_zeroes((3 << 20) + (600 << 10), 4096)?;
    w.finish()?;
    Ok(model)
}

fn writer_under_faults(format: Format) {
    let dry = Arc::new(CrashStorage::new(Vec::new(), None));
    let model = write_image(format, Box::new(Arc::clone(&dry))).unwrap();
    let total = dry.ops();
    for n in 0..=total {
        let st = Arc::new(CrashStorage::new(Vec::new(), Some(n)));
        let r = write_image(format, Box::new(Arc::clone(&st)));
        let durable = st.crash_image().to_vec();
        match r {
            Ok(m) => {
                // finish() returned Ok: everything is on the durable copy.
                let dev = open(format, Box::new(MemStorage::read_only(durable)), false)
                    .unwrap_or_else(|e| {
                        panic!("{format} writer, crash at {n}: finished image lost: {e}")
                    });
                let mut buf = vec![0u8; SIZE as usize];
                dev.read_at(&mut buf, 0).unwrap();
                assert!(
                    buf == m,
                    "{format} writer, crash at {n}: finished image differs"
                );
            }
            Err(_) => {
                // An unfinished output is discarded by the engine; it must only not panic.
                if let Ok(dev) = open(format, Box::new(MemStorage::read_only(durable)), false) {
                    let mut buf = vec![0u8; 4096];
                    let _ = dev.read_at(&mut buf, 0);
                    let _ = dev.check();
                }
            }
        }
        let f = FaultyStorage::new(MemStorage::new(), n.max(1), true);
        let _ = write_image(format, Box::new(f));
    }
    assert_eq!(model.len() as u64, SIZE);
}

fn create_under_faults(format: Format) {
    let limits = Limits::default();
    let o = opts(format);
    let spec = CreateSpec {
        size: SIZE,
        options: &o,
        parent: None,
        path: None,
        limits: &limits,
    };
    let dry = Arc::new(CrashStorage::new(Vec::new(), None));
    vdisk::formats::create(format, Box::new(Arc::clone(&dry)), &spec).unwrap();
    let total = dry.ops();
    for n in 0..=total {
        let st = Arc::new(CrashStorage::new(Vec::new(), Some(n)));
        let r = vdisk::formats::create(format, Box::new(Arc::clone(&st)), &spec);
        let durable = st.crash_image().to_vec();
        let opened = open(format, Box::new(MemStorage::read_only(durable)), false);
        if r.is_ok() {
            let dev = opened.unwrap_or_else(|e| {
                panic!("{format} create, crash at {n}: created image lost: {e}")
            });
            let mut buf = vec![0xffu8; 65536];
            dev.read_at(&mut buf, 0).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        }
        let f = FaultyStorage::new(MemStorage::new(), n.max(1), false);
        let _ = vdisk::formats::create(format, Box::new(f), &spec);
    }
}

#[test]
fn writer_and_create_under_faults_vhd() {
    writer_under_faults(Format::Vhd);
    create_under_faults(Format::Vhd);
}

#[test]
fn writer_and_create_under_faults_vhdx() {
    writer_under_faults(Format::Vhdx);
    create_under_faults(Format::Vhdx);
}

#[test]
fn writer_and_create_under_faults_qcow2() {
    writer_under_faults(Format::Qcow2);
    create_under_faults(Format::Qcow2);
}
