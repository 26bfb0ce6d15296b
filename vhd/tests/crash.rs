//! Crash and I/O-error safety of in-place writes (hostile-inputs.md §3.3): after a power cut
//! or a failed write at any point, the image opens, `check` finds no corruption (leaks are
//! allowed) and every byte is either the old or the new content.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use blockdev::testkit::{CrashStorage, FaultyStorage};
use blockdev::{BlockDevice, DenyGate, MemStorage, OpenGate};
use common::{params, MemGate};
use testsupport::TestRng;
use vhd::{create, CreateOptions, Dialect, ParentLink, VhdImage};

const SIZE: u64 = 4 << 20;

struct Setup {
    image: Vec<u8>,
    model: Vec<u8>,
    gate: Box<dyn OpenGate>,
}

fn setup(differencing: bool, dialect: Dialect) -> Setup {
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = 1 << 20;
    o.dialect = dialect;
    if !differencing {
        let m = MemStorage::new();
        create(&m, &o).unwrap();
        return Setup {
            image: m.to_vec(),
            model: vec![0; SIZE as usize],
            gate: Box::new(DenyGate),
        };
    }
    let p = Arc::new(MemStorage::new());
    create(p.as_ref(), &CreateOptions::dynamic(SIZE)).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    TestRng::new(5).fill(&mut model);
    let img = VhdImage::open(Box::new(p.clone()), &params(&DenyGate, true, None)).unwrap();
    img.write_at(&model, 0).unwrap();
    drop(img);
    let pimg = VhdImage::open(Box::new(p.clone()), &params(&DenyGate, false, None)).unwrap();
    let mut link = ParentLink::new(&pimg, std::path::Path::new("/x/base.vhd"), None).unwrap();
    link.relative = "base.vhd".into();
    o.parent = Some(link);
    let m = MemStorage::new();
    create(&m, &o).unwrap();
    Setup {
        image: m.to_vec(),
        model,
        gate: Box::new(MemGate(p)),
    }
}

/// (offset, len, seed): single-block writes, each followed by a flush.
const OPS: [(u64, usize, u64); 5] = [
    (1000, 3000, 1),
    ((1 << 20) + 512, 4096, 2),
    (1500, 100, 3),
    ((3 << 20) - 700, 600, 4),
    ((2 << 20) + 4096, 8192, 5),
];

fn apply(model: &mut [u8], (off, len, seed): (u64, usize, u64)) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    TestRng::new(seed).fill(&mut buf);
    model[off as usize..off as usize + len].copy_from_slice(&buf);
    buf
}

fn content(st: MemStorage, gate: &dyn OpenGate) -> Vec<u8> {
    let img = VhdImage::open(Box::new(st), &params(gate, false, None)).unwrap();
    let rep = img.check().unwrap();
    assert_eq!(rep.corruptions(), 0, "{:?}", rep.findings);
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0).unwrap();
    got
}

fn crash_everywhere(differencing: bool, dialect: Dialect) {
    // In order (what was flushed survives), then with unflushed writes kept in any subset.
    for seed in [None, Some(1), Some(2), Some(3), Some(4), Some(5), Some(6)] {
        crash_everywhere_with(differencing, dialect, seed);
    }
}

fn crash_everywhere_with(differencing: bool, dialect: Dialect, seed: Option<u64>) {
    let s = setup(differencing, dialect);
    for crash_after in 0..200u64 {
        let cs = Arc::new(match seed {
            None => CrashStorage::new(s.image.clone(), Some(crash_after)),
            Some(k) => CrashStorage::reordering(s.image.clone(), Some(crash_after), k),
        });
        let img =
            VhdImage::open(Box::new(cs.clone()), &params(s.gate.as_ref(), true, None)).unwrap();
        let mut before = s.model.clone();
        let mut after = s.model.clone();
        let mut finished = true;
        for op in OPS {
            let buf = apply(&mut after, op);
            if img.write_at(&buf, op.0).and_then(|_| img.flush()).is_err() {
                finished = false;
                break;
            }
            before = after.clone();
        }
        drop(img);
        let got = content(cs.crash_image(), s.gate.as_ref());
        assert!(
            got == before || got == after,
            "crash after {crash_after} ops (reordering {seed:?}): content is neither the old nor the new state"
        );
        if finished {
            return;
        }
    }
    panic!("the sequence never finished");
}

#[test]
fn crash_dynamic() {
    crash_everywhere(false, Dialect::Standard);
}

#[test]
fn crash_differencing() {
    crash_everywhere(true, Dialect::Standard);
}

#[test]
fn crash_xen_differencing() {
    crash_everywhere(true, Dialect::Xen);
}

#[test]
fn io_error_at_every_step_leaves_a_consistent_image() {
    for differencing in [false, true] {
        let s = setup(differencing, Dialect::Standard);
        for fail_at in 1..60u64 {
            let mem = Arc::new(MemStorage::from_vec(s.image.clone()));
            let fs = FaultyStorage::new(mem.clone(), fail_at, true);
            let img = VhdImage::open(Box::new(fs), &params(s.gate.as_ref(), true, None)).unwrap();
            let mut before = s.model.clone();
            let mut after = s.model.clone();
            for op in OPS {
                let buf = apply(&mut after, op);
                if img.write_at(&buf, op.0).and_then(|_| img.flush()).is_err() {
                    break;
                }
                before = after.clone();
            }
            drop(img);
            let got = content(MemStorage::from_vec(mem.to_vec()), s.gate.as_ref());
            assert!(got == before || got == after, "fail_at {fail_at}");
        }
    }
}
