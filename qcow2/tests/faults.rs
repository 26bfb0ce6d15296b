//! Fault injection at every mutating operation of allocating writes: the image left behind
//! has at most leaks, never corruption (ours and qemu-img's check agree).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use blockdev::testkit::FaultyStorage;
use blockdev::{BlockDevice, MemStorage, Storage};
use qcow2::{CreateOptions, OpenOptions, Qcow2Image};

fn fresh(opts: CreateOptions) -> Vec<u8> {
    let m = Arc::new(MemStorage::new());
    qcow2::create(Box::new(m.clone()), opts).unwrap();
    m.to_vec()
}

type Scenario = fn(&Qcow2Image) -> blockdev::Result<()>;

fn scenario_a(img: &Qcow2Image) -> blockdev::Result<()> {
    img.write_at(&[1u8; 100_000], 1000)?; // new L2, COW head and tail
    img.write_at(&[2u8; 70_000], 1_500_000_000)?; // second L2 table
    img.write_at(&[3u8; 512], 2000)?; // in place
    img.write_zeroes(0, 65536, true)?; // zero cluster, frees the old one
    img.write_zeroes(131072, 65536, false)?;
    img.write_at(&[4u8; 4096], 65536 * 3)?;
    img.flush()
}

fn scenario_b(img: &Qcow2Image) -> blockdev::Result<()> {
    // 512-byte clusters and 64-bit refcounts: new refcount blocks and a growing table.
    for i in 0..12u64 {
        img.write_at(&vec![i as u8 + 1; 200_000], i * 200_000)?;
    }
    img.write_zeroes(10_000, 50_000, true)?;
    img.flush()
}

fn run(initial: &[u8], sc: Scenario, sample: u64) {
    // Count the operations of a clean run.
    let clean = Arc::new(FaultyStorage::new(
        MemStorage::from_vec(initial.to_vec()),
        u64::MAX,
        false,
    ));
    sc(&open_rw(Box::new(clean.clone()))).unwrap();
    let total = clean.ops();
    assert!(total > 10);
    let dir = tempfile::tempdir().unwrap();
    let mut n = 1;
    let mut checked = 0;
    while n <= total {
        let st = Arc::new(FaultyStorage::new(
            MemStorage::from_vec(initial.to_vec()),
            n,
            true,
        ));
        assert!(
            sc(&open_rw(Box::new(st.clone()))).is_err(),
            "fault {n} not reported"
        );
        let bytes = Arc::try_unwrap(st).ok().unwrap().into_inner().to_vec();
        let img = open_ro(bytes.clone());
        let rep = img.check().unwrap();
        assert_eq!(rep.corruptions(), 0, "fault at op {n}: {:?}", rep.findings);
        // Reads still work.
        let mut b = vec![0u8; 65536];
        img.read_at(&mut b, 0).unwrap();
        if checked % 4 == 0 {
            let p = dir.path().join(format!("f{n}.qcow2"));
            std::fs::write(&p, &bytes).unwrap();
            let (rc, out, err) = common::qemu_img(&["check", "-f", "qcow2", p.to_str().unwrap()]);
            assert!(
                rc == 0 || rc == 3,
                "fault at op {n}: qemu-img check rc {rc}: {out} {err}"
            );
        }
        checked += 1;
        n += sample;
    }
}

#[test]
fn every_metadata_write_of_allocations_64k() {
    let img = fresh(CreateOptions {
        size: 2 << 30,
        ..CreateOptions::default()
    });
    run(&img, scenario_a, 1);
}

#[test]
fn sampled_faults_with_refcount_table_growth() {
    let img = fresh(CreateOptions {
        size: 3 << 20,
        cluster_bits: 9,
        refcount_order: 6,
        ..CreateOptions::default()
    });
    run(&img, scenario_b, 53);
}

/// Opens `storage` for writing (the scenarios' images).
fn open_rw(storage: Box<dyn Storage>) -> Qcow2Image {
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    Qcow2Image::open(storage, &blockdev::DenyGate, &opts).unwrap()
}

/// Opens `bytes` read-only (what survived).
fn open_ro(bytes: Vec<u8>) -> Qcow2Image {
    Qcow2Image::open(
        Box::new(MemStorage::read_only(bytes)),
        &blockdev::DenyGate,
        &OpenOptions::default(),
    )
    .unwrap()
}

/// Power cut after every mutating operation: what was durable is consistent (leaks at most).
fn run_crash(initial: &[u8], sc: Scenario, sample: u64) {
    use blockdev::testkit::CrashStorage;
    let clean = Arc::new(CrashStorage::new(initial.to_vec(), None));
    sc(&open_rw(Box::new(clean.clone()))).unwrap();
    let total = clean.ops();
    let mut n = 1;
    while n <= total {
        // In order, and with the unflushed writes kept in a subset (a disk's own order).
        for seed in [None, Some(n), Some(n + 7)] {
            let st = Arc::new(match seed {
                None => CrashStorage::new(initial.to_vec(), Some(n)),
                Some(k) => CrashStorage::reordering(initial.to_vec(), Some(n), k),
            });
            let _ = sc(&open_rw(Box::new(st.clone())));
            let durable = st.crash_image().to_vec();
            let img = open_ro(durable);
            let rep = img.check().unwrap();
            assert_eq!(
                rep.corruptions(),
                0,
                "crash after op {n} (reordering {seed:?}): {:?}",
                rep.findings
            );
        }
        n += sample;
    }
}

#[test]
fn power_cut_after_every_operation_64k() {
    let img = fresh(CreateOptions {
        size: 2 << 30,
        ..CreateOptions::default()
    });
    run_crash(&img, scenario_a, 1);
}

#[test]
fn power_cut_sampled_with_refcount_table_growth() {
    let img = fresh(CreateOptions {
        size: 3 << 20,
        cluster_bits: 9,
        refcount_order: 6,
        ..CreateOptions::default()
    });
    run_crash(&img, scenario_b, 37);
}
