//! Model-based property test: random writes, zero ranges, flushes and reopens against a
//! `Vec<u8>` reference disk, for dynamic and differencing images, 512 and 4096-byte sectors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use blockdev::{BlockDevice, ExtentKind, MemStorage, OpenGate};
use common::{
    create_mem, link_of, open_with, open_with_limits, paged_limits, read_all, DirGate, MemGate,
};
use proptest::prelude::*;
use vhdx::CreateOptions;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 6 * MIB;

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, count: u64, seed: u8 },
    Zero { sector: u64, count: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..1536, 1u64..700, any::<u8>()).prop_map(|(sector, count, seed)| Op::Write { sector, count, seed }),
        2 => (0u64..1536, 1u64..2100).prop_map(|(sector, count)| Op::Zero { sector, count }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn run(ops: &[Op], logical: u64, diff: bool) {
    run_with(ops, logical, diff, &blockdev::Limits::default());
}

fn run_with(ops: &[Op], logical: u64, diff: bool, limits: &blockdev::Limits) {
    let block = MIB;
    let (bytes, gate, mut model): (Vec<u8>, Box<dyn OpenGate>, Vec<u8>) = if diff {
        let m = Arc::new(MemStorage::new());
        vhdx::create(
            &*m,
            &CreateOptions {
                size: SIZE,
                block_size: block,
                logical: logical as u32,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let p = open_with(Box::new(m.clone()), true, &DirGate::new(), 0).unwrap();
        let pdata: Vec<u8> = (0..SIZE).map(|i| (i / 512) as u8 | 0x80).collect();
        p.write_at(&pdata[..(4 * MIB) as usize], MIB).unwrap();
        p.flush().unwrap();
        let model = read_all(&p);
        drop(p);
        let pbytes = m.to_vec();
        let parent = open_with(
            Box::new(MemStorage::read_only(pbytes.clone())),
            false,
            &DirGate::new(),
            0,
        )
        .unwrap();
        let child = create_mem(&CreateOptions {
            block_size: block,
            logical: logical as u32,
            parent: Some(link_of(&parent)),
            ..CreateOptions::default()
        });
        (child, Box::new(MemGate { parent: pbytes }), model)
    } else {
        let b = create_mem(&CreateOptions {
            size: SIZE,
            block_size: block,
            logical: logical as u32,
            ..CreateOptions::default()
        });
        (b, Box::new(DirGate::new()), vec![0u8; SIZE as usize])
    };
    let store = Arc::new(MemStorage::from_vec(bytes));
    let mut img = open_with_limits(Box::new(store.clone()), true, &*gate, 0, limits).unwrap();
    assert_eq!(img.bat_is_paged(), limits.max_cache < 1024);
    let sectors = SIZE / logical;
    for op in ops {
        match op {
            Op::Write {
                sector,
                count,
                seed,
            } => {
                let s = sector % sectors;
                let c = (*count).min(sectors - s);
                let data: Vec<u8> = (0..c * logical)
                    .map(|i| (i as u8).wrapping_add(*seed) | 1)
                    .collect();
                img.write_at(&data, s * logical).unwrap();
                model[(s * logical) as usize..((s + c) * logical) as usize].copy_from_slice(&data);
            }
            Op::Zero { sector, count } => {
                let s = sector % sectors;
                let c = (*count).min(sectors - s);
                img.write_zeroes(s * logical, c * logical, true).unwrap();
                model[(s * logical) as usize..((s + c) * logical) as usize].fill(0);
            }
            Op::Flush => img.flush().unwrap(),
            Op::Reopen => {
                drop(img);
                img = open_with_limits(Box::new(store.clone()), true, &*gate, 0, limits).unwrap();
            }
        }
        assert_eq!(read_all(&img), model);
    }
    // block_status: extents tile the disk and Data extents read the model.
    let mut off = 0;
    while off < SIZE {
        let e = img.block_status(off, SIZE - off).unwrap();
        assert_eq!(e.offset, off);
        if e.kind == ExtentKind::Zero {
            assert!(model[off as usize..(off + e.len) as usize]
                .iter()
                .all(|&b| b == 0));
        }
        off += e.len;
    }
    img.flush().unwrap();
    assert_eq!(img.check().unwrap().corruptions(), 0);
    drop(img);
    let ro = open_with(
        Box::new(MemStorage::read_only(store.to_vec())),
        false,
        &*gate,
        0,
    )
    .unwrap();
    assert!(
        ro.log_state().log_guid.is_zero(),
        "flush leaves an empty log"
    );
    assert_eq!(read_all(&ro), model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn dynamic_512(ops in proptest::collection::vec(op(), 1..12)) {
        run(&ops, 512, false);
    }

    #[test]
    fn differencing_512(ops in proptest::collection::vec(op(), 1..12)) {
        run(&ops, 512, true);
    }

    #[test]
    fn paged_bat_differencing_512(ops in proptest::collection::vec(op(), 1..12)) {
        run_with(&ops, 512, true, &paged_limits());
    }

    #[test]
    fn paged_bat_dynamic_512(ops in proptest::collection::vec(op(), 1..12)) {
        run_with(&ops, 512, false, &paged_limits());
    }

    #[test]
    fn differencing_4096(ops in proptest::collection::vec(op(), 1..10)) {
        run(&ops, 4096, true);
    }
}

#[test]
fn concurrent_readers_and_a_writer() {
    let b = create_mem(&CreateOptions {
        size: 32 * MIB,
        block_size: MIB,
        ..CreateOptions::default()
    });
    let img =
        Arc::new(open_with(Box::new(MemStorage::from_vec(b)), true, &DirGate::new(), 0).unwrap());
    let writer = {
        let img = img.clone();
        std::thread::spawn(move || {
            for i in 0..32u64 {
                img.write_at(&vec![i as u8 + 1; 64 << 10], i * MIB + 4096)
                    .unwrap();
            }
            img.flush().unwrap();
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                for _ in 0..4 {
                    for i in 0..32u64 {
                        img.read_at(&mut buf, i * MIB + 4096).unwrap();
                        // Either the old (zeros) or the new content, never a mix.
                        assert!(
                            buf.iter().all(|&x| x == 0) || buf.iter().all(|&x| x == i as u8 + 1)
                        );
                    }
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    let all = read_all(&*img);
    for i in 0..32usize {
        assert_eq!(all[i * MIB as usize + 4096], i as u8 + 1);
    }
}

/// An empty 4 MiB parent with 1 MiB blocks, and a child of it: (child, parent) bytes.
fn empty_parent_and_child() -> (Vec<u8>, Vec<u8>) {
    let pbytes = create_mem(&CreateOptions {
        size: 4 * MIB,
        block_size: MIB,
        ..CreateOptions::default()
    });
    let parent = open_with(
        Box::new(MemStorage::read_only(pbytes.clone())),
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
    (child, pbytes)
}

#[test]
fn sector_bitmap_is_lsb_first() {
    let (child, pbytes) = empty_parent_and_child();
    let store = Arc::new(MemStorage::from_vec(child));
    let gate = MemGate { parent: pbytes };
    let img = open_with(Box::new(store.clone()), true, &gate, 0).unwrap();
    // Sector 1 and sector 10 of the first block.
    img.write_at(&[7u8; 512], 512).unwrap();
    img.write_at(&[8u8; 512], 10 * 512).unwrap();
    img.flush().unwrap();
    let bat = img.bat_entries();
    let cr = vhdx::format::chunk_ratio(MIB, 512) as usize;
    let sb = bat[cr] & vhdx::format::BAT_OFFSET_MASK;
    assert_eq!(bat[cr] & 7, 6);
    assert_eq!(bat[0] & 7, 7, "PARTIALLY_PRESENT");
    let raw = store.to_vec();
    assert_eq!(raw[sb as usize], 0b0000_0010);
    assert_eq!(raw[sb as usize + 1], 0b0000_0100);
    // And reading follows the bits: sector 0 from the parent (zeros), sector 1 from the child.
    let mut b = vec![0u8; 1024];
    img.read_at(&mut b, 0).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0) && b[512..].iter().all(|&x| x == 7));
}

/// A write spanning more blocks than one logged update covers (64) is applied piece by
/// piece, the pieces meeting inside partial blocks of a differencing image.
#[test]
fn a_write_longer_than_one_update_is_applied_in_pieces() {
    for logical in [512u32, 4096] {
        let size = 140 * MIB;
        let pbytes = create_mem(&CreateOptions {
            size,
            block_size: MIB,
            logical,
            ..CreateOptions::default()
        });
        let pm = Arc::new(MemStorage::from_vec(pbytes));
        let p = open_with(Box::new(pm.clone()), true, &DirGate::new(), 0).unwrap();
        let pdata: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 | 0x80).collect();
        p.write_at(&pdata, 0).unwrap();
        p.flush().unwrap();
        let child = create_mem(&CreateOptions {
            block_size: MIB,
            logical,
            parent: Some(link_of(&p)),
            ..CreateOptions::default()
        });
        drop(p);
        let gate = MemGate {
            parent: pm.to_vec(),
        };
        let img = open_with(Box::new(MemStorage::from_vec(child)), true, &gate, 0).unwrap();
        let (off, len) = (u64::from(logical), 133 * MIB);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        img.write_at(&data, off).unwrap();
        img.write_zeroes(70 * MIB + 8192, 66 * MIB, false).unwrap();
        img.flush().unwrap();
        let mut model = pdata.clone();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        model[(70 * MIB + 8192) as usize..(136 * MIB + 8192) as usize].fill(0);
        assert!(read_all(&img) == model, "logical {logical}");
        assert_eq!(img.check().unwrap().corruptions(), 0);
    }
}

/// A whole-block write over a PARTIALLY_PRESENT block makes it FULLY_PRESENT (one BAT entry,
/// not a whole bitmap of bits), and it reads back whole.
#[test]
fn a_whole_block_write_makes_a_partial_block_fully_present() {
    let (child, pbytes) = empty_parent_and_child();
    let gate = MemGate { parent: pbytes };
    let img = open_with(Box::new(MemStorage::from_vec(child)), true, &gate, 0).unwrap();
    img.write_at(&[7u8; 512], MIB + 512).unwrap();
    assert_eq!(img.bat_entries()[1] & 7, 7, "PARTIALLY_PRESENT");
    let data: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8).collect();
    img.write_at(&data, MIB).unwrap();
    img.flush().unwrap();
    assert_eq!(img.bat_entries()[1] & 7, 6, "FULLY_PRESENT");
    let mut b = vec![0u8; MIB as usize];
    img.read_at(&mut b, MIB).unwrap();
    assert!(b == data);
    assert_eq!(img.check().unwrap().corruptions(), 0);
}
