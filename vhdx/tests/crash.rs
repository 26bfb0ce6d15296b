//! Crash at every single write and flush of a scenario: the reopened image must hold the old
//! or the new state (a prefix of the scenario's writes), and check must find no corruption.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use blockdev::testkit::CrashStorage;
use blockdev::{BlockDevice, OpenGate, Result};
use common::{create_mem, link_of, open_with, read_all, DirGate, MemGate};
use vhdx::{CreateOptions, VhdxImage};

const MIB: u64 = 1 << 20;

#[derive(Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
}

fn apply_model(model: &mut [u8], op: &Op) {
    match op {
        Op::Write(off, d) => model[*off as usize..*off as usize + d.len()].copy_from_slice(d),
        Op::Zero(off, len) => model[*off as usize..(*off + *len) as usize].fill(0),
    }
}

fn run_ops(img: &VhdxImage, ops: &[Op]) -> Result<()> {
    for op in ops {
        match op {
            Op::Write(off, d) => img.write_at(d, *off)?,
            Op::Zero(off, len) => img.write_zeroes(*off, *len, true)?,
        }
    }
    img.flush()
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
        .collect()
}

/// Runs the scenario with a crash after every operation count and checks each outcome.
fn crash_everywhere(base: Vec<u8>, gate: &dyn OpenGate, ops: &[Op]) -> Vec<Vec<u8>> {
    crash_everywhere_l(base, gate, ops, &blockdev::Limits::default())
}

fn crash_everywhere_l(
    base: Vec<u8>,
    gate: &dyn OpenGate,
    ops: &[Op],
    limits: &blockdev::Limits,
) -> Vec<Vec<u8>> {
    let open_with = |s: Box<dyn blockdev::Storage>, w: bool, g: &dyn OpenGate, d: u32| {
        common::open_with_limits(s, w, g, d, limits)
    };
    let initial = read_all(
        &open_with(
            Box::new(blockdev::MemStorage::from_vec(base.clone())),
            false,
            gate,
            0,
        )
        .unwrap(),
    );
    let mut states = vec![initial.clone()];
    let mut m = initial;
    for op in ops {
        apply_model(&mut m, op);
        states.push(m.clone());
    }
    // Count the operations of a full run (open, scenario, close).
    let total = {
        let cs = Arc::new(CrashStorage::new(base.clone(), None));
        let img = open_with(Box::new(cs.clone()), true, gate, 0).unwrap();
        run_ops(&img, ops).unwrap();
        drop(img);
        assert_eq!(
            read_all(&open_with(Box::new(cs.crash_image()), false, gate, 0).unwrap()),
            *states.last().unwrap()
        );
        cs.ops()
    };
    assert!(total > 5, "scenario too small: {total}");
    let mut dirty_images = Vec::new();
    // In order, and with the unflushed writes kept in a subset (a disk's own order).
    let runs = (0..=total).flat_map(|k| [(k, None), (k, Some(k)), (k, Some(k + 1000))]);
    for (k, seed) in runs {
        let cs = Arc::new(match seed {
            None => CrashStorage::new(base.clone(), Some(k)),
            Some(s) => CrashStorage::reordering(base.clone(), Some(k), s),
        });
        if let Ok(img) = open_with(Box::new(cs.clone()), true, gate, 0) {
            let _ = run_ops(&img, ops);
            drop(img);
        }
        let after = cs.crash_image().to_vec();
        // Read-only open: replays in memory, never writes.
        let ro = open_with(
            Box::new(blockdev::MemStorage::read_only(after.clone())),
            false,
            gate,
            0,
        )
        .unwrap_or_else(|e| panic!("crash after {k} ops: read-only open failed: {e}"));
        let ro_content = read_all(&ro);
        if ro.log_state().in_memory {
            dirty_images.push(after.clone());
        }
        drop(ro);
        // Read-write open: replays to disk.
        let rw = open_with(
            Box::new(blockdev::MemStorage::from_vec(after)),
            true,
            gate,
            0,
        )
        .unwrap_or_else(|e| panic!("crash after {k} ops: open failed: {e}"));
        let content = read_all(&rw);
        assert_eq!(
            content, ro_content,
            "crash after {k}: overlay and replay differ"
        );
        assert!(
            states.contains(&content),
            "crash after {k} of {total} ops: content is neither old nor new"
        );
        let rep = rw.check().unwrap();
        assert_eq!(rep.corruptions(), 0, "crash after {k}: {:?}", rep.findings);
    }
    dirty_images
}

#[test]
fn crash_block_allocation_dynamic() {
    let base = create_mem(&CreateOptions {
        size: 16 * MIB,
        block_size: MIB,
        ..CreateOptions::default()
    });
    let ops = vec![
        Op::Write(MIB + 4096, fill(8192, 1)),
        Op::Write(MIB + 65536, fill(4096, 2)),
        Op::Write(5 * MIB, fill(MIB as usize, 3)),
        Op::Zero(5 * MIB, MIB),
        Op::Zero(MIB + 4096, 512),
        Op::Write(15 * MIB + 512, fill(1024, 4)),
    ];
    let dirty = crash_everywhere(base, &DirGate::new(), &ops);
    assert!(!dirty.is_empty(), "no crash point left a dirty log");
}

#[test]
fn crash_logged_updates_on_a_file_not_a_whole_mib_long() {
    // Disk2vhd leaves files 512 bytes past a MiB boundary. A logged update that grows nothing
    // (a present block zeroed) must record the file's real length, or replay refuses the
    // file as truncated.
    let base = create_mem(&CreateOptions {
        size: 16 * MIB,
        block_size: MIB,
        ..CreateOptions::default()
    });
    let m = Arc::new(blockdev::MemStorage::from_vec(base));
    let img = open_with(Box::new(m.clone()), true, &DirGate::new(), 0).unwrap();
    img.write_at(&fill(MIB as usize, 5), 3 * MIB).unwrap();
    img.write_at(&fill(4096, 6), 7 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut base = m.to_vec();
    base.extend_from_slice(&[0u8; 512]);
    let ops = vec![Op::Zero(3 * MIB, MIB), Op::Zero(7 * MIB, MIB)];
    let dirty = crash_everywhere(base, &DirGate::new(), &ops);
    assert!(!dirty.is_empty(), "no crash point left a dirty log");
}

#[test]
fn crash_block_allocation_paged_bat() {
    // The same scenario with a BAT too large for the cache: pages are read on demand.
    let base = create_mem(&CreateOptions {
        size: 16 * MIB,
        block_size: MIB,
        ..CreateOptions::default()
    });
    let ops = vec![
        Op::Write(MIB + 4096, fill(8192, 1)),
        Op::Write(5 * MIB, fill(MIB as usize, 3)),
        Op::Zero(5 * MIB, MIB),
    ];
    let limits = common::paged_limits();
    crash_everywhere_l(base, &DirGate::new(), &ops, &limits);
}

/// A parent of `size` bytes holding `fill(size, 9)` with 1 MiB blocks, and an empty child of
/// it; the gate opens that parent.
fn parent_and_child(size: u64) -> (Vec<u8>, MemGate) {
    let pbytes = {
        let m = Arc::new(blockdev::MemStorage::from_vec(create_mem(&CreateOptions {
            size,
            block_size: MIB,
            ..CreateOptions::default()
        })));
        let p = open_with(Box::new(m.clone()), true, &DirGate::new(), 0).unwrap();
        p.write_at(&fill(size as usize, 9), 0).unwrap();
        p.flush().unwrap();
        drop(p);
        m.to_vec()
    };
    let parent = open_with(
        Box::new(blockdev::MemStorage::read_only(pbytes.clone())),
        false,
        &DirGate::new(),
        0,
    )
    .unwrap();
    let child = create_mem(&CreateOptions {
        block_size: MIB,
        parent: Some(link_of(&parent)),
        ..CreateOptions::default()
    });
    (child, MemGate { parent: pbytes })
}

#[test]
fn crash_differencing_writes() {
    let (child, gate) = parent_and_child(8 * MIB);
    let ops = vec![
        Op::Write(2 * MIB + 512, fill(1024, 5)),
        Op::Write(2 * MIB + 8192, fill(4096, 6)),
        Op::Write(3 * MIB, fill(MIB as usize, 7)),
        Op::Zero(4 * MIB + 4096, 4096),
        Op::Zero(6 * MIB, MIB),
    ];
    crash_everywhere(child, &gate, &ops);
}

#[test]
fn crash_during_log_replay() {
    let base = create_mem(&CreateOptions {
        size: 16 * MIB,
        block_size: MIB,
        ..CreateOptions::default()
    });
    let ops = vec![
        Op::Write(3 * MIB, fill(4096, 8)),
        Op::Write(9 * MIB, fill(4096, 9)),
    ];
    let dirty = crash_everywhere(base, &DirGate::new(), &ops);
    let gate = DirGate::new();
    for img in dirty {
        let expect = read_all(
            &open_with(
                Box::new(blockdev::MemStorage::read_only(img.clone())),
                false,
                &gate,
                0,
            )
            .unwrap(),
        );
        let total = {
            let cs = Arc::new(CrashStorage::new(img.clone(), None));
            drop(open_with(Box::new(cs.clone()), true, &gate, 0).unwrap());
            cs.ops()
        };
        assert!(total >= 3);
        for k in 0..=total {
            let cs = Arc::new(CrashStorage::new(img.clone(), Some(k)));
            let _ = open_with(Box::new(cs.clone()), true, &gate, 0).map(drop);
            let after = cs.crash_image().to_vec();
            let rw = open_with(
                Box::new(blockdev::MemStorage::from_vec(after)),
                true,
                &gate,
                0,
            )
            .unwrap();
            assert_eq!(
                read_all(&rw),
                expect,
                "replay crashed after {k} of {total} ops"
            );
            assert_eq!(rw.check().unwrap().corruptions(), 0);
        }
    }
}

/// Relinking a child (after a commit into its parent) crashed at every write and flush: the
/// reopened child holds the old or the new parent_linkage, its DataWriteGuid and content
/// unchanged, and check finds no corruption.
#[test]
fn crash_while_relinking() {
    let size = 4 * MIB;
    let pbytes = create_mem(&CreateOptions {
        size,
        block_size: MIB,
        ..CreateOptions::default()
    });
    let parent = open_with(
        Box::new(blockdev::MemStorage::read_only(pbytes.clone())),
        false,
        &DirGate::new(),
        0,
    )
    .unwrap();
    let old = parent.data_write_guid();
    let child = {
        let m = Arc::new(blockdev::MemStorage::from_vec(create_mem(&CreateOptions {
            block_size: MIB,
            parent: Some(link_of(&parent)),
            ..CreateOptions::default()
        })));
        let c = open_with(Box::new(m.clone()), true, &MemGate { parent: pbytes }, 0).unwrap();
        c.write_at(&fill(8192, 4), MIB + 4096).unwrap();
        c.flush().unwrap();
        drop(c);
        m.to_vec()
    };
    let skip = DirGate {
        skip: true,
        ..DirGate::new()
    };
    let open_ro = |bytes: Vec<u8>| {
        open_with(
            Box::new(blockdev::MemStorage::read_only(bytes)),
            false,
            &skip,
            0,
        )
    };
    let before = open_ro(child.clone()).unwrap();
    let dwg = before.data_write_guid();
    let mut content = vec![0u8; 8192];
    before.read_at(&mut content, MIB + 4096).unwrap();
    drop(before);
    let new = vhdx::Guid::random().unwrap();
    let total = {
        let cs = Arc::new(CrashStorage::new(child.clone(), None));
        open_with(Box::new(cs.clone()), true, &skip, 0)
            .unwrap()
            .relink_parent(new)
            .unwrap();
        let img = open_ro(cs.crash_image().to_vec()).unwrap();
        assert_eq!(img.locator().unwrap().linkages(), vec![new]);
        cs.ops()
    };
    assert!(total > 5, "scenario too small: {total}");
    let runs = (0..=total).flat_map(|k| [(k, None), (k, Some(k)), (k, Some(k + 1000))]);
    for (k, seed) in runs {
        let cs = Arc::new(match seed {
            None => CrashStorage::new(child.clone(), Some(k)),
            Some(s) => CrashStorage::reordering(child.clone(), Some(k), s),
        });
        if let Ok(img) = open_with(Box::new(cs.clone()), true, &skip, 0) {
            let _ = img.relink_parent(new);
        }
        let after = cs.crash_image().to_vec();
        for writable in [false, true] {
            let img = open_with(
                Box::new(blockdev::MemStorage::from_vec(after.clone())),
                writable,
                &skip,
                0,
            )
            .unwrap_or_else(|e| panic!("crash after {k} ops: open failed: {e}"));
            let links = img.locator().unwrap().linkages();
            assert!(
                links == vec![old] || links == vec![new],
                "crash after {k}: parent_linkage {links:?}"
            );
            assert_eq!(img.data_write_guid(), dwg, "crash after {k}");
            let mut b = vec![0u8; 8192];
            img.read_at(&mut b, MIB + 4096).unwrap();
            assert_eq!(b, content, "crash after {k}");
            let rep = img.check().unwrap();
            assert_eq!(rep.corruptions(), 0, "crash after {k}: {:?}", rep.findings);
        }
    }
}

/// A block that is not present but whose chunk's sector bitmap still has bits set for it (left
/// by another writer): a partial write makes only the written sectors the child's, the rest
/// still reads from the parent.
#[test]
fn stale_bitmap_bits_of_a_block_not_present_are_cleared() {
    let size = 4 * MIB;
    let pdata = fill(size as usize, 9);
    let (child, gate) = parent_and_child(size);
    let m = Arc::new(blockdev::MemStorage::from_vec(child));
    // A partial write in block 1 sets bits there; then the block is marked NOT_PRESENT by
    // hand, as another writer could leave it, with its bits still set.
    let img = open_with(Box::new(m.clone()), true, &gate, 0).unwrap();
    img.write_at(&fill(MIB as usize / 2, 1), MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut bytes = m.to_vec();
    let hs = vhdx::header::read_headers(&blockdev::MemStorage::read_only(bytes.clone())).unwrap();
    let h = hs.current.clone();
    let regions = vhdx::header::read_regions(
        &blockdev::MemStorage::read_only(bytes.clone()),
        bytes.len() as u64,
        (h.log_offset, u64::from(h.log_length)),
    )
    .unwrap();
    let geom = vhdx::bat::Geometry::new(size, MIB, 512, true);
    let at = (regions.bat.offset + 8 * geom.payload(1) as u64) as usize;
    bytes[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    let m = Arc::new(blockdev::MemStorage::from_vec(bytes));
    let img = open_with(Box::new(m.clone()), true, &gate, 0).unwrap();
    let mut b = vec![0u8; MIB as usize];
    img.read_at(&mut b, MIB).unwrap();
    assert!(
        b == pdata[MIB as usize..2 * MIB as usize],
        "block 1 reads the parent"
    );
    // Write 4 KiB at the end of block 1: only those sectors are the child's.
    let mine = fill(4096, 2);
    img.write_at(&mine, 2 * MIB - 4096).unwrap();
    img.flush().unwrap();
    let mut want = pdata[MIB as usize..2 * MIB as usize].to_vec();
    want[MIB as usize - 4096..].copy_from_slice(&mine);
    img.read_at(&mut b, MIB).unwrap();
    assert!(b == want, "the stale bits hid the parent's data");
    assert_eq!(img.check().unwrap().corruptions(), 0);
}
