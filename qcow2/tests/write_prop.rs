//! Random writes, zero writes and flushes into a qcow2 (with and without a backing file) match
//! a byte model, and the result passes `qemu-img check`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;

use blockdev::{BlockDevice, FileStorage, ImageWriter};
use proptest::prelude::*;
use qcow2::{CreateOptions, Qcow2Writer};

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64, dealloc: bool },
    Flush,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..size, 1..200_000u64, any::<u8>()).prop_map(move |(o, l, s)| Op::Write { off: o, len: l.min(size - o), seed: s }),
        2 => (0..size, 1..300_000u64, any::<bool>()).prop_map(move |(o, l, d)| Op::Zero { off: o, len: l.min(size - o), dealloc: d }),
        1 => Just(Op::Flush),
    ]
}

fn make_base(path: &Path, size: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    testsupport::TestRng::new(3).fill(&mut data);
    let st = FileStorage::create_new(path).unwrap();
    let mut w = Box::new(
        Qcow2Writer::new(
            Box::new(st),
            CreateOptions {
                size,
                ..CreateOptions::default()
            },
        )
        .unwrap(),
    );
    w.write_data(0, &data).unwrap();
    w.finish().unwrap();
    data
}

fn run(ops: &[Op], cluster_bits: u32, version: u32, order: u32, with_backing: bool) {
    let size: u64 = 2 << 20;
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top.qcow2");
    let mut model = if with_backing {
        make_base(&dir.path().join("base.qcow2"), size)
    } else {
        vec![0u8; size as usize]
    };
    let st = FileStorage::create_new(&top).unwrap();
    qcow2::create(
        Box::new(st),
        CreateOptions {
            size,
            version,
            cluster_bits,
            refcount_order: order,
            backing_file: with_backing.then(|| "base.qcow2".to_string()),
            backing_format: with_backing.then(|| "qcow2".to_string()),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    {
        let img = common::open_rw(&top);
        for o in ops {
            match *o {
                Op::Write { off, len, seed } => {
                    let buf: Vec<u8> = (0..len)
                        .map(|i| seed.wrapping_add((i / 512) as u8) | 1)
                        .collect();
                    img.write_at(&buf, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&buf);
                }
                Op::Zero { off, len, dealloc } => {
                    img.write_zeroes(off, len, dealloc).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Flush => img.flush().unwrap(),
            }
        }
        img.flush().unwrap();
        let mut back = vec![0u8; size as usize];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == model, "read back differs from the model");
        let rep = img.check().unwrap();
        assert!(rep.findings.is_empty(), "{:?}", rep.findings);
    }
    common::qemu_check_clean(&top);
    if cluster_bits == 9 && order == 6 && ops.len() == 2 {
        assert!(
            common::open(&top).header().refcount_table_clusters > 1,
            "refcount table did not grow"
        );
    }
    let theirs = testsupport::qemu_sha256(&top, "qcow2");
    let ours = {
        use sha2_free::hash;
        hash(&model)
    };
    assert_eq!(ours, theirs);
}

mod sha2_free {
    /// SHA-256 of bytes through testsupport (a raw image in memory).
    pub fn hash(b: &[u8]) -> String {
        let dev = blockdev::RawImage::open(blockdev::MemStorage::from_vec(b.to_vec())).unwrap();
        testsupport::sha256_device(&dev)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_v3_64k(ops in proptest::collection::vec(op(2 << 20), 1..25), backing in any::<bool>()) {
        run(&ops, 16, 3, 4, backing);
    }

    #[test]
    fn random_ops_v2_4k(ops in proptest::collection::vec(op(2 << 20), 1..25), backing in any::<bool>()) {
        run(&ops, 12, 2, 4, backing);
    }

    #[test]
    fn random_ops_512_reftable_growth(ops in proptest::collection::vec(op(2 << 20), 5..25), backing in any::<bool>()) {
        run(&ops, 9, 3, 6, backing);
    }
}

#[test]
fn fills_whole_disk_with_512_byte_clusters() {
    // 64-bit refcounts and 512-byte clusters: the refcount table must grow several times.
    let ops = vec![
        Op::Write {
            off: 0,
            len: 2 << 20,
            seed: 5,
        },
        Op::Zero {
            off: 4096,
            len: 100_000,
            dealloc: true,
        },
    ];
    run(&ops, 9, 3, 6, false);
    run(&ops, 9, 3, 0, true);
}
