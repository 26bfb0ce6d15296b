//! In-place writes on dynamic and differencing disks against a byte model, with reopen.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use blockdev::{BlockDevice, DenyGate, ExtentKind, ImageWriter, Limits, MemStorage, OpenGate};
use common::{params, MemGate};
use proptest::prelude::*;
use testsupport::TestRng;
use vhd::format::{bitmap_size, Footer};
use vhd::{create, CreateOptions, Dialect, ParentLink, VhdImage, VhdWriter};

const SIZE: u64 = (5 << 20) + 3 * 512;
const BS: u32 = 1 << 20;

fn parent_image(dialect: Dialect) -> (Arc<MemStorage>, Vec<u8>) {
    let m = Arc::new(MemStorage::new());
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = BS;
    o.dialect = dialect;
    let mut w = Box::new(VhdWriter::new(Box::new(m.clone()), &o, &Limits::default()).unwrap());
    let mut data = vec![0u8; SIZE as usize];
    let mut rng = TestRng::new(99);
    // Data in blocks 0, 2 and the partial last block; block 1, 3 absent.
    for r in [
        0..(1 << 20),
        (2 << 20)..(3 << 20) - 4096,
        (5 << 20)..SIZE as usize,
    ] {
        rng.fill(&mut data[r.clone()]);
        w.write_data(r.start as u64, &data[r]).unwrap();
    }
    w.finish().unwrap();
    (m, data)
}

fn new_child(parent: &Arc<MemStorage>, dialect: Dialect) -> Arc<MemStorage> {
    let p = VhdImage::open(Box::new(parent.clone()), &params(&DenyGate, false, None)).unwrap();
    let mut link =
        ParentLink::new(&p, std::path::Path::new("/nonexistent/base.vhd"), None).unwrap();
    link.relative = "base.vhd".into();
    let m = Arc::new(MemStorage::new());
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = BS;
    o.dialect = dialect;
    o.parent = Some(link);
    create(m.as_ref(), &o).unwrap();
    m
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u64),
    Zero(u64, u64),
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SIZE, 1usize..300_000, any::<u64>()).prop_map(|(o, l, s)| Op::Write(o, l, s)),
        2 => (0..SIZE, 1u64..2_500_000).prop_map(|(o, l)| Op::Zero(o, l)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn open_rw(st: &Arc<MemStorage>, gate: &dyn OpenGate) -> VhdImage {
    VhdImage::open(Box::new(st.clone()), &params(gate, true, None)).unwrap()
}

fn verify(img: &VhdImage, model: &[u8]) {
    let mut got = vec![0u8; model.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == model, "content differs from the model");
    let rep = img.check().unwrap();
    assert_eq!(rep.corruptions() + rep.leaks(), 0, "{:?}", rep.findings);
    // block_status covers the disk exactly.
    let mut off = 0;
    while off < img.size() {
        let e = img.block_status(off, u64::MAX).unwrap();
        assert!(e.len > 0 && e.offset == off);
        off += e.len;
    }
}

fn run(ops: &[Op], differencing: bool, dialect: Dialect) {
    let (st, mut model, gate): (Arc<MemStorage>, Vec<u8>, Box<dyn OpenGate>) = if differencing {
        let (p, data) = parent_image(Dialect::Standard);
        (new_child(&p, dialect), data, Box::new(MemGate(p)))
    } else {
        let m = Arc::new(MemStorage::new());
        let mut o = CreateOptions::dynamic(SIZE);
        o.block_size = BS;
        o.dialect = dialect;
        create(m.as_ref(), &o).unwrap();
        (m, vec![0u8; SIZE as usize], Box::new(DenyGate))
    };
    let mut img = open_rw(&st, gate.as_ref());
    for op in ops {
        match *op {
            Op::Write(off, len, seed) => {
                let len = (len as u64).min(SIZE - off) as usize;
                let mut buf = vec![0u8; len];
                TestRng::new(seed).fill(&mut buf);
                img.write_at(&buf, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&buf);
            }
            Op::Zero(off, len) => {
                let len = len.min(SIZE - off);
                img.write_zeroes(off, len, false).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => img.flush().unwrap(),
            Op::Reopen => {
                img.flush().unwrap();
                drop(img);
                img = open_rw(&st, gate.as_ref());
                verify(&img, &model);
            }
        }
    }
    verify(&img, &model);
    drop(img);
    // The footer copy at 0 stays identical to the trailing footer.
    let bytes = st.to_vec();
    assert_eq!(bytes[..512], bytes[bytes.len() - 512..]);
    let img = VhdImage::open(Box::new(st.clone()), &params(gate.as_ref(), false, None)).unwrap();
    verify(&img, &model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn dynamic_matches_model(ops in proptest::collection::vec(op(), 1..10)) {
        run(&ops, false, Dialect::Standard);
    }

    #[test]
    fn differencing_matches_model(ops in proptest::collection::vec(op(), 1..10)) {
        run(&ops, true, Dialect::Standard);
    }

    #[test]
    fn xen_differencing_matches_model(ops in proptest::collection::vec(op(), 1..6)) {
        run(&ops, true, Dialect::Xen);
    }
}

#[test]
fn zero_write_over_parent_data_is_recorded() {
    let (p, data) = parent_image(Dialect::Standard);
    let child = new_child(&p, Dialect::Standard);
    let gate = MemGate(p);
    let img = open_rw(&child, &gate);
    img.write_zeroes(4096, 8192, true).unwrap();
    let e = img.block_status(0, u64::MAX).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Unallocated, 4096));
    let e = img.block_status(4096, u64::MAX).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Data, 8192));
    drop(img);
    let img = VhdImage::open(Box::new(child), &params(&gate, false, None)).unwrap();
    let mut buf = vec![1u8; 16384];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..4096], &data[..4096]);
    assert!(buf[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&buf[12288..], &data[12288..16384]);
}

#[test]
fn differencing_clear_bits_read_parent_and_lsb_order() {
    let (p, data) = parent_image(Dialect::Standard);
    let child = new_child(&p, Dialect::Standard);
    let gate = MemGate(p);
    let img = open_rw(&child, &gate);
    img.write_at(&[0xEE; 512], 512).unwrap();
    drop(img);
    let mut v = child.to_vec();
    let bat0 = u32::from_be_bytes(v[1536..1540].try_into().unwrap()) as usize * 512;
    // MSB-first: sector 1 is bit 6 of byte 0.
    assert_eq!(v[bat0], 0x40);
    let check = |v: Vec<u8>, expect_child: bool| {
        let img = VhdImage::open(
            Box::new(MemStorage::from_vec(v)),
            &params(&gate, false, None),
        )
        .unwrap();
        let mut buf = vec![0u8; 1024];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..512], &data[..512]);
        if expect_child {
            assert_eq!(&buf[512..], &[0xEE; 512]);
        } else {
            assert_eq!(&buf[512..], &data[512..1024]);
        }
    };
    check(v.clone(), true);
    // An old Xen image (creator tap, version 0.1) reads bits LSB-first: bit 6 of byte 0 is
    // then sector 6, so sector 1 comes from the parent.
    let n = v.len();
    let mut f = Footer::parse(v[n - 512..].try_into().unwrap());
    f.creator_app = *b"tap\0";
    f.creator_version = 1;
    let fb = f.to_bytes();
    v[n - 512..].copy_from_slice(&fb);
    v[..512].copy_from_slice(&fb);
    check(v.clone(), false);
    v[bat0] = 0x02;
    check(v, true);
    assert_eq!(bitmap_size(BS), 512);
}

#[test]
fn concurrent_readers_and_writers() {
    let (p, data) = parent_image(Dialect::Standard);
    let child = new_child(&p, Dialect::Standard);
    let gate = MemGate(p);
    let img = open_rw(&child, &gate);
    let chunk = (SIZE / 4) / 512 * 512;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let img = &img;
            s.spawn(move || {
                // Each writer owns a quarter; readers check the parent's bytes stay visible
                // outside what was written.
                let base = t * chunk;
                for i in 0..20u64 {
                    let off = base + (i * 37_000) % (chunk - 5000);
                    img.write_at(&[t as u8 + 1; 3000], off).unwrap();
                }
            });
        }
        for _ in 0..2 {
            let img = &img;
            s.spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                for k in 0..10u64 {
                    let off = (k * 300_000) % (SIZE - (1 << 20));
                    img.read_at(&mut buf, off).unwrap();
                }
            });
        }
    });
    let mut model = data;
    for t in 0..4u64 {
        let base = t * chunk;
        for i in 0..20u64 {
            let off = (base + (i * 37_000) % (chunk - 5000)) as usize;
            model[off..off + 3000].fill(t as u8 + 1);
        }
    }
    verify(&img, &model);
}

#[test]
fn large_unaligned_write_in_differencing_disk() {
    let (p, data) = parent_image(Dialect::Standard);
    let child = new_child(&p, Dialect::Standard);
    let gate = MemGate(p);
    let img = open_rw(&child, &gate);
    let (off, len) = (700u64, SIZE as usize - 1400);
    let mut buf = vec![0u8; len];
    TestRng::new(77).fill(&mut buf);
    img.write_at(&buf, off).unwrap();
    let mut model = data;
    model[off as usize..off as usize + len].copy_from_slice(&buf);
    verify(&img, &model);
}

#[test]
fn unreferenced_block_is_a_leak() {
    let m = Arc::new(MemStorage::new());
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = BS;
    create(m.as_ref(), &o).unwrap();
    let img = open_rw(&m, &DenyGate);
    img.write_at(&[1u8; 512], 0).unwrap();
    img.write_at(&[2u8; 512], 2 << 20).unwrap();
    drop(img);
    let mut v = m.to_vec();
    v[1536..1540].copy_from_slice(&[0xff; 4]);
    let img = VhdImage::open(
        Box::new(MemStorage::from_vec(v)),
        &params(&DenyGate, false, None),
    )
    .unwrap();
    let rep = img.check().unwrap();
    assert_eq!(
        (rep.corruptions(), rep.leaks()),
        (0, 1),
        "{:?}",
        rep.findings
    );
}

/// Filling a block of a Xen (`tap`) VHD updates the batmap and its checksum, and leaves the
/// header's other fields (version, marker, keyhash) as they were.
#[test]
fn xen_batmap_update_keeps_the_header_fields() {
    let m = Arc::new(MemStorage::new());
    let mut o = CreateOptions::dynamic(SIZE);
    o.block_size = BS;
    o.dialect = Dialect::Xen;
    create(m.as_ref(), &o).unwrap();
    let mut bytes = m.to_vec();
    let hoff = bytes
        .windows(8)
        .position(|w| w == vhd::format::BATMAP_COOKIE)
        .expect("batmap header");
    // What blktap keeps after the checksum: a marker and a key hash.
    for (i, b) in bytes[hoff + 28..hoff + 28 + 37].iter_mut().enumerate() {
        *b = 0x40 + i as u8;
    }
    let tail = bytes[hoff + 20..hoff + 24].to_vec();
    let sum = bytes[hoff + 24..hoff + 28].to_vec();
    let kept = bytes[hoff + 28..hoff + 512].to_vec();
    let st = Arc::new(MemStorage::from_vec(bytes));
    let img = open_rw(&st, &DenyGate);
    assert_eq!(img.info().format_specific["batmap_valid"], true);
    let mut block = vec![0u8; BS as usize];
    TestRng::new(5).fill(&mut block);
    img.write_at(&block, u64::from(BS)).unwrap();
    img.flush().unwrap();
    drop(img);
    let after = st.to_vec();
    assert_eq!(after[hoff + 20..hoff + 24], tail[..], "version changed");
    assert_ne!(
        after[hoff + 24..hoff + 28],
        sum[..],
        "the batmap was not updated"
    );
    assert_eq!(
        after[hoff + 28..hoff + 512],
        kept[..],
        "marker or keyhash lost"
    );
    let img = open_rw(&st, &DenyGate);
    assert_eq!(img.info().format_specific["batmap_valid"], true);
    let mut got = vec![0u8; BS as usize];
    img.read_at(&mut got, u64::from(BS)).unwrap();
    assert!(got == block);
}

/// A dynamic VHD whose trailing footer does not start on a sector (padding before it): a new
/// block still starts on a sector, where its BAT entry points.
#[test]
fn new_block_after_an_unaligned_footer() {
    let m = MemStorage::new();
    let o = CreateOptions::dynamic(SIZE);
    create(&m, &o).unwrap();
    let mut bytes = m.to_vec();
    let footer = bytes.split_off(bytes.len() - 512);
    bytes.extend_from_slice(&[0u8; 100]);
    bytes.extend_from_slice(&footer);
    let st = Arc::new(MemStorage::from_vec(bytes));
    let img = open_rw(&st, &DenyGate);
    let mut data = vec![0u8; 300_000];
    TestRng::new(8).fill(&mut data);
    img.write_at(&data, 4096).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = open_rw(&st, &DenyGate);
    let mut got = vec![0u8; data.len()];
    img.read_at(&mut got, 4096).unwrap();
    assert!(
        got == data,
        "the block was written where its BAT entry does not point"
    );
    let rep = img.check().unwrap();
    assert_eq!(rep.corruptions(), 0, "{:?}", rep.findings);
}
