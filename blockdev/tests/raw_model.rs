//! Model-based property test: random read / write / write_zeroes / flush sequences against raw
//! images over a real file and over memory, every byte checked against a `Vec<u8>` reference,
//! and `block_status` checked to describe the content (Zero extents read as zeros).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use blockdev::{BlockDevice, ExtentKind, FileStorage, MemStorage, RawImage, Storage};
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Zero { off: u64, len: u64, dealloc: bool },
    Read { off: u64, len: usize },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets near 4 KiB boundaries and the end stress alignment and hole punching.
    let off = prop_oneof![
        0..SIZE,
        (0..256u64).prop_map(|k| k * 4096),
        (SIZE - 8192)..SIZE
    ];
    prop_oneof![
        4 => (off.clone(), 1..20000usize, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        2 => (off.clone(), 1..70000u64, any::<bool>()).prop_map(|(off, len, dealloc)| Op::Zero { off, len, dealloc }),
        3 => (off, 1..30000usize).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn clamp(off: u64, len: u64) -> (u64, u64) {
    let len = len.min(SIZE - off);
    (off, len)
}

fn check_all<S: Storage + 'static>(img: &RawImage<S>, model: &[u8]) {
    let mut buf = vec![0u8; model.len()];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == model, "content differs from the model");
    // block_status tiles the device; Zero extents really are zero.
    let mut pos = 0;
    while pos < SIZE {
        let e = img.block_status(pos, SIZE - pos).unwrap();
        assert_eq!(e.offset, pos);
        assert!(e.len > 0 && pos + e.len <= SIZE);
        if e.kind == ExtentKind::Zero {
            assert!(model[pos as usize..(pos + e.len) as usize]
                .iter()
                .all(|&b| b == 0));
        }
        pos += e.len;
    }
}

fn run<S: Storage + 'static>(
    mut img: RawImage<S>,
    reopen: impl Fn(RawImage<S>) -> RawImage<S>,
    ops: &[Op],
) {
    let mut model = vec![0u8; SIZE as usize];
    for op in ops {
        match *op {
            Op::Write { off, len, seed } => {
                let (off, len) = clamp(off, len as u64);
                let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect();
                img.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { off, len, dealloc } => {
                let (off, len) = clamp(off, len);
                img.write_zeroes(off, len, dealloc).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { off, len } => {
                let (off, len) = clamp(off, len as u64);
                let mut buf = vec![0xeeu8; len as usize];
                img.read_at(&mut buf, off).unwrap();
                assert!(buf == model[off as usize..(off + len) as usize]);
            }
            Op::Flush => img.flush().unwrap(),
            Op::Reopen => img = reopen(img),
        }
    }
    // Out-of-range requests fail with OutOfBounds, never panic or wrap.
    let mut b = [0u8; 2];
    assert_eq!(
        img.read_at(&mut b, SIZE - 1).unwrap_err().kind(),
        blockdev::ErrorKind::OutOfBounds
    );
    assert_eq!(
        img.read_at(&mut b, u64::MAX).unwrap_err().kind(),
        blockdev::ErrorKind::OutOfBounds
    );
    check_all(&img, &model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn raw_file_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let img = RawImage::create(FileStorage::create_new(&path).unwrap(), SIZE).unwrap();
        let p = path.clone();
        run(img, move |old| { drop(old); RawImage::open(FileStorage::open(&p, true).unwrap()).unwrap() }, &ops);
    }

    #[test]
    fn raw_memory_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let img = RawImage::create(MemStorage::new(), SIZE).unwrap();
        run(img, |old| {
            let bytes = old.storage().to_vec();
            RawImage::open(MemStorage::from_vec(bytes)).unwrap()
        }, &ops);
    }
}
