//! hostile-inputs.md Q1-Q25: one named test per row, asserting the error kind and field.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use blockdev::{BlockDevice, DenyGate, ErrorKind, ImageWriter, MemStorage};
use qcow2::{CreateOptions, Header, OpenOptions, Qcow2Image, Qcow2Writer};

const CS: usize = 65536;

/// A valid v3 image of 64 MiB with data in its first MiB.
fn base() -> Vec<u8> {
    base_with(CreateOptions {
        size: 64 << 20,
        ..CreateOptions::default()
    })
}

fn base_with(opts: CreateOptions) -> Vec<u8> {
    let m = Arc::new(MemStorage::new());
    let mut w = Box::new(Qcow2Writer::new(Box::new(m.clone()), opts).unwrap());
    let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    w.write_data(0, &data).unwrap();
    w.finish().unwrap();
    m.to_vec()
}

fn open(b: Vec<u8>) -> blockdev::Result<Qcow2Image> {
    Qcow2Image::open(
        Box::new(MemStorage::read_only(b)),
        &DenyGate,
        &OpenOptions::default(),
    )
}

fn open_rw(b: Vec<u8>) -> blockdev::Result<Qcow2Image> {
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    Qcow2Image::open(Box::new(MemStorage::from_vec(b)), &DenyGate, &opts)
}

fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

fn expect(b: Vec<u8>, kind: ErrorKind, field: &str) {
    let e = open(b).unwrap_err();
    assert_eq!(e.kind(), kind, "{e:?}");
    assert_eq!(e.field(), Some(field), "{e:?}");
}

fn read_err(img: &Qcow2Image, off: u64) -> blockdev::Error {
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, off).unwrap_err()
}

fn l2_of(b: &[u8]) -> usize {
    let l1 = get64(b, 40) as usize;
    (get64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize
}

#[test]
fn q01_bad_magic() {
    let mut b = base();
    b[0..4].copy_from_slice(b"QFI\0");
    expect(b, ErrorKind::InvalidFormat, "magic");
}

#[test]
fn q02_bad_version() {
    for v in [1u32, 4, 0xffff_ffff] {
        let mut b = base();
        put32(&mut b, 4, v);
        expect(b, ErrorKind::InvalidFormat, "version");
    }
}

#[test]
fn q03_bad_cluster_bits() {
    for v in [0u32, 8, 22, 40, 0xffff_ffff] {
        let mut b = base();
        put32(&mut b, 20, v);
        expect(b, ErrorKind::Corrupt, "cluster_bits");
    }
    // Extended L2 needs 16 KiB clusters.
    let mut b = base_with(CreateOptions {
        size: 1 << 20,
        cluster_bits: 12,
        ..CreateOptions::default()
    });
    put64(&mut b, 72, 1 << 4);
    expect(b, ErrorKind::Corrupt, "cluster_bits");
}

#[test]
fn q04_bad_header_length() {
    for v in [96u32, 108, 0x7fff_ffff, 0xffff_ffff] {
        let mut b = base();
        put32(&mut b, 100, v);
        expect(b, ErrorKind::Corrupt, "header_length");
    }
}

#[test]
fn q05_bad_backing_offset_and_size() {
    let cases: [(u64, u32, &str); 4] = [
        (CS as u64 + 8, 4, "backing_file_offset"),
        (CS as u64 - 8, 100, "backing_file_size"),
        (1024, 1024, "backing_file_size"),
        (u64::MAX, 4, "backing_file_offset"),
    ];
    for (off, size, field) in cases {
        let mut b = base();
        put64(&mut b, 8, off);
        put32(&mut b, 16, size);
        expect(b, ErrorKind::Corrupt, field);
    }
}

#[test]
fn q06_bad_header_extensions() {
    // Length 0x7fffffff.
    let mut b = base();
    put32(&mut b, 112, 0x1234_5678);
    put32(&mut b, 116, 0x7fff_ffff);
    expect(b, ErrorKind::Corrupt, "header_extension");
    // Crossing the end of the area (cluster 0).
    let mut b = base();
    put32(&mut b, 112, 0x1234_5678);
    put32(&mut b, 116, (CS - 112) as u32);
    expect(b, ErrorKind::Corrupt, "header_extension");
    // A type twice.
    let mut b = base();
    for o in [112usize, 128] {
        put32(&mut b, o, 0x1234_5678);
        put32(&mut b, o + 4, 8);
    }
    put32(&mut b, 144, 0);
    put32(&mut b, 148, 0);
    expect(b, ErrorKind::Corrupt, "header_extension");
    // No end marker: a chain of unknown extensions filling the cluster ends at the area end.
    let mut b = base();
    let mut o = 112;
    let mut t = 1u32;
    while o + 8 <= CS {
        let len = (CS - o - 8).min(4096) as u32;
        put32(&mut b, o, 0x1000_0000 + t);
        put32(&mut b, o + 4, len);
        b[o + 8..o + 8 + len as usize].fill(0xee);
        o += 8 + len as usize;
        t += 1;
    }
    assert!(open(b).is_ok());
}

#[test]
fn q07_unknown_incompatible_bits_named() {
    let mut b = base();
    put64(&mut b, 72, 1 << 5);
    expect(b.clone(), ErrorKind::Unsupported, "incompatible_features");
    // The image's own feature table names the bit.
    put32(&mut b, 112, 0x6803_F857);
    put32(&mut b, 116, 48);
    b[120..168].fill(0);
    b[120] = 0;
    b[121] = 5;
    b[122..122 + 9].copy_from_slice(b"frobnicat");
    put32(&mut b, 168, 0);
    put32(&mut b, 172, 0);
    let e = open(b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.message().contains("frobnicat"), "{}", e.message());
    let mut b = base();
    put64(&mut b, 72, 1 << 63);
    expect(b, ErrorKind::Unsupported, "incompatible_features");
}

#[test]
fn q08_corrupt_bit_read_only() {
    let mut b = base();
    put64(&mut b, 72, 1 << 1);
    let img = open(b.clone()).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert!(!img.is_writable());
    let e = open_rw(b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert_eq!(e.field(), Some("incompatible_features"));
}

#[test]
fn q09_dirty_bit_reads_but_never_writes() {
    let mut b = base();
    put64(&mut b, 72, 1);
    let img = open(b.clone()).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf[1], 1 | 1);
    assert_eq!(img.info().format_specific["dirty"], true);
    let e = open_rw(b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert_eq!(e.field(), Some("incompatible_features"));
}

#[test]
fn q10_bad_refcount_order() {
    for v in [7u32, 255] {
        let mut b = base();
        put32(&mut b, 96, v);
        expect(b, ErrorKind::Corrupt, "refcount_order");
    }
}

#[test]
fn q11_bad_refcount_table_clusters() {
    for v in [0u32, 0xffff_ffff, 0x0002_0001] {
        let mut b = base();
        put32(&mut b, 56, v);
        expect(b, ErrorKind::Corrupt, "refcount_table_clusters");
    }
}

#[test]
fn q12_bad_refcount_table_offset() {
    let past = 1u64 << 40;
    for v in [0x1234_5678_90ab_cdefu64, 0xffff_ffff_ffff_0000, past] {
        let mut b = base();
        put64(&mut b, 48, v);
        expect(b, ErrorKind::Corrupt, "refcount_table_offset");
    }
}

#[test]
fn q13_bad_l1() {
    for v in [0xffff_ffffu32, 0x7fff_ffff] {
        let mut b = base();
        put32(&mut b, 36, v);
        expect(b, ErrorKind::Corrupt, "l1_size");
    }
    for v in [0x42a00u64, 0x7fff_ffff_ffff_0000] {
        let mut b = base();
        put64(&mut b, 40, v);
        expect(b, ErrorKind::Corrupt, "l1_table_offset");
    }
    // Too small for the size.
    let mut b = base();
    put64(&mut b, 24, 1 << 40);
    expect(b, ErrorKind::Corrupt, "l1_size");
}

#[test]
fn q14_huge_virtual_size() {
    // A petabyte in a small file opens; work follows allocation, not size.
    let m = Arc::new(MemStorage::new());
    qcow2::create(
        Box::new(m.clone()),
        CreateOptions {
            size: 1 << 50,
            cluster_bits: 21,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let img = open(m.to_vec()).unwrap();
    assert_eq!(img.size(), 1 << 50);
    let e = img.block_status(0, 1 << 50).unwrap();
    assert_eq!(e.len, 1 << 50);
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, (1 << 50) - 4096).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    // 2^63 needs more L1 entries than any table can hold.
    let mut b = base();
    put64(&mut b, 24, 1 << 63);
    expect(b, ErrorKind::Corrupt, "l1_size");
}

#[test]
fn q15_bad_snapshot_table() {
    let mut b = base();
    put32(&mut b, 60, 0xffff_ffff);
    expect(b, ErrorKind::Corrupt, "nb_snapshots");
    let mut b = base();
    put32(&mut b, 60, 0x10001);
    expect(b, ErrorKind::Corrupt, "nb_snapshots");
    let mut b = base();
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 0x400200);
    expect(b, ErrorKind::Corrupt, "snapshots_offset");
    let mut b = base();
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 1 << 40);
    expect(b, ErrorKind::Corrupt, "snapshots_offset");
    // Name running past the table: the image opens, snapshot operations fail.
    let mut b = base();
    let at = b.len().div_ceil(CS) * CS;
    b.resize(at + CS, 0);
    put32(&mut b, 60, 1);
    put64(&mut b, 64, at as u64);
    b[at + 14..at + 16].copy_from_slice(&0xffffu16.to_be_bytes());
    let img = open(b.clone()).unwrap();
    assert!(img.snapshots().is_err());
    let opts = OpenOptions {
        snapshot: Some("x".into()),
        ..OpenOptions::default()
    };
    let e =
        Qcow2Image::open(Box::new(MemStorage::read_only(b.clone())), &DenyGate, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(e.field(), Some("snapshots_offset"));
    // Extra data over 1024 bytes.
    put32(&mut b, at + 36, 2000);
    assert!(open(b).unwrap().snapshots().is_err());
}

#[test]
fn q16_bad_snapshot_l1() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    std::fs::write(&p, base()).unwrap();
    let (rc, _, err) = common::qemu_img(&["snapshot", "-c", "snap1", p.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    let good = std::fs::read(&p).unwrap();
    let h = Header::read(&MemStorage::from_vec(good.clone())).unwrap();
    let entry = h.snapshots_offset as usize;
    for (field_off, value) in [(0usize, 0x400200u64), (8, 0x1000_0000u64 << 32)] {
        let mut b = good.clone();
        if field_off == 0 {
            put64(&mut b, entry, value);
        } else {
            put32(&mut b, entry + 8, 0x1000_0000);
        }
        // The active layer still opens and reads.
        let img = open(b.clone()).unwrap();
        let mut buf = vec![0u8; 4096];
        img.read_at(&mut buf, 0).unwrap();
        let opts = OpenOptions {
            snapshot: Some("snap1".into()),
            ..OpenOptions::default()
        };
        let e = Qcow2Image::open(Box::new(MemStorage::read_only(b)), &DenyGate, &opts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.field(), Some("snapshot 'snap1' l1_table_offset"));
    }
}

#[test]
fn q17_bad_l1_entries() {
    let l1 = |b: &[u8]| get64(b, 40) as usize;
    for v in [
        (1u64 << 63) | 0x10000 | 0x3,
        0x42a00 | (1 << 63),
        (1u64 << 63) | (1 << 40),
    ] {
        let mut b = base();
        let o = l1(&b);
        put64(&mut b, o, v);
        let img = open(b).unwrap();
        let e = read_err(&img, 0);
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{v:#x}: {e:?}");
        assert!(
            e.field() == Some("l1_entry") || e.field() == Some("l2_table"),
            "{e:?}"
        );
    }
    // COPIED without an offset.
    let mut b = base();
    let o = l1(&b);
    put64(&mut b, o, 1 << 63);
    assert_eq!(read_err(&open(b).unwrap(), 0).field(), Some("l1_entry"));
    // Pointing at the header, the L1 or the refcount table: reads never loop or panic;
    // writes are refused.
    // (Offset 0 means "no L2 table", so the header cannot be named by an L1 entry.)
    for target in [get64(&base(), 40), get64(&base(), 48)] {
        let mut b = base();
        let o = l1(&b);
        put64(&mut b, o, (1 << 63) | target);
        let img = open(b.clone()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let _ = img.read_at(&mut buf, 0);
        let img = open_rw(b).unwrap();
        let e = img.write_at(&[1u8; 512], 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{target:#x}");
    }
}

#[test]
fn q18_bad_l2_entries() {
    let cases = [
        (1u64 << 63) | 0x52a00,
        (1u64 << 63) | (1 << 57) | 0x10000,
        (1u64 << 63) | (1 << 40),
        1u64 << 63,
    ];
    for v in cases {
        let mut b = base();
        let o = l2_of(&b);
        put64(&mut b, o, v);
        let img = open(b).unwrap();
        let e = read_err(&img, 0);
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{v:#x}");
        assert_eq!(e.field(), Some("l2_entry"), "{v:#x}: {e:?}");
    }
}

#[test]
fn q19_l2_aliasing() {
    let mut b = base();
    let o = l2_of(&b);
    let first = get64(&b, o);
    put64(&mut b, o + 8, first);
    let img = open(b.clone()).unwrap();
    let mut x = vec![0u8; CS];
    let mut y = vec![0u8; CS];
    img.read_at(&mut x, 0).unwrap();
    img.read_at(&mut y, CS as u64).unwrap();
    assert_eq!(x, y);
    let rep = img.check().unwrap();
    assert!(rep.corruptions() > 0);
    // An L2 table mapped into the refcount table: writes refused.
    let rt = get64(&b, 48);
    put64(&mut b, o + 16, (1 << 63) | rt);
    let img = open_rw(b).unwrap();
    let e = img.write_at(&[9u8; 100], 2 * CS as u64).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(e.field(), Some("l2_entry"));
}

#[test]
fn q20_bad_compressed_entries() {
    let b0 = base_with(CreateOptions {
        size: 8 << 20,
        compress: true,
        ..CreateOptions::default()
    });
    let o = l2_of(&b0);
    let e0 = get64(&b0, o);
    assert!(e0 & (1 << 62) != 0);
    let x = 62 - (16 - 8);
    // Offset past EOF.
    let mut b = b0.clone();
    put64(&mut b, o, (1 << 62) | (1 << 40));
    let e = read_err(&open(b).unwrap(), 0);
    assert_eq!(
        (e.kind(), e.field()),
        (ErrorKind::Corrupt, Some("l2_entry"))
    );
    // Too few sectors: the stream stops short of a cluster.
    let mut b = b0.clone();
    put64(&mut b, o, (1 << 62) | (e0 & ((1 << x) - 1)));
    let e = read_err(&open(b).unwrap(), 0);
    assert_eq!(
        (e.kind(), e.field()),
        (ErrorKind::Corrupt, Some("compressed_cluster"))
    );
    // Garbage instead of a stream, and a zstd frame claiming a huge size.
    let mut b = b0.clone();
    let off = (e0 & ((1 << x) - 1)) as usize;
    b[off..off + 64].fill(0xff);
    let e = read_err(&open(b).unwrap(), 0);
    assert_eq!(
        (e.kind(), e.field()),
        (ErrorKind::Corrupt, Some("compressed_cluster"))
    );
    let bz = base_with(CreateOptions {
        size: 8 << 20,
        compress: true,
        compression_type: 1,
        ..CreateOptions::default()
    });
    let mut b = bz.clone();
    let e0 = get64(&b, l2_of(&bz));
    let off = (e0 & ((1 << x) - 1)) as usize;
    // Frame header: magic, descriptor with an 8-byte content size of 2^60.
    b[off..off + 4].copy_from_slice(&0xFD2F_B528u32.to_le_bytes());
    b[off + 4] = 0xC0;
    b[off + 5..off + 13].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let e = read_err(&open(b).unwrap(), 0);
    assert_eq!(
        (e.kind(), e.field()),
        (ErrorKind::Corrupt, Some("compressed_cluster"))
    );
}

#[test]
fn q21_bad_compression_type() {
    let mut b = base();
    b[104] = 1;
    expect(b, ErrorKind::Corrupt, "compression_type");
    let mut b = base();
    put64(&mut b, 72, 1 << 3);
    expect(b, ErrorKind::Corrupt, "compression_type");
    for t in [2u8, 255] {
        let mut b = base();
        b[104] = t;
        put64(&mut b, 72, 1 << 3);
        expect(b, ErrorKind::Unsupported, "compression_type");
    }
}

fn with_ext(kind: u32, name: &str, incompat: u64) -> Vec<u8> {
    let mut b = base();
    put32(&mut b, 112, kind);
    put32(&mut b, 116, name.len() as u32);
    b[120..120 + name.len()].copy_from_slice(name.as_bytes());
    let end = 120 + name.len().div_ceil(8) * 8;
    put64(&mut b, end, 0);
    put64(&mut b, 72, incompat);
    b
}

#[test]
fn q22_external_data_file_never_opened_implicitly() {
    for name in ["/etc/passwd", "/dev/sda"] {
        let e = open(with_ext(0x4441_5441, name, 1 << 2)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BackingDenied);
        assert!(
            e.to_string().contains(name) || e.message().contains(name),
            "{e}"
        );
    }
    for name in ["json:{\"file\":{}}", "nbd://host/x"] {
        let e = open(with_ext(0x4441_5441, name, 1 << 2)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BackingDenied);
        assert_eq!(e.field(), Some("data_file"));
    }
}

fn with_backing(name: &[u8]) -> Vec<u8> {
    let mut b = base();
    let off = 4096usize;
    b[off..off + name.len()].copy_from_slice(name);
    put64(&mut b, 8, off as u64);
    put32(&mut b, 16, name.len() as u32);
    b
}

#[test]
fn q23_backing_file_references() {
    for name in ["/etc/shadow", "/dev/sda", "../../x"] {
        let e = open(with_backing(name.as_bytes())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BackingDenied, "{name}");
    }
    for name in [&b"json:{}"[..], b"a\0b"] {
        let e = open(with_backing(name)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BackingDenied);
        assert_eq!(e.field(), Some("backing_file"));
    }
    // A self-reference is stopped by the gate's depth limit, never a hang.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("self.qcow2");
    std::fs::write(&p, with_backing(b"self.qcow2")).unwrap();
    let st = blockdev::FileStorage::open(&p, false).unwrap();
    assert!(Qcow2Image::open(Box::new(st), &common::TestGate, &OpenOptions::default()).is_err());
}

#[test]
fn q24_bad_bitmaps_extension() {
    let ext = |nb: u32, reserved: u32, dsize: u64, doff: u64| {
        let mut b = base();
        put32(&mut b, 112, 0x2385_2875);
        put32(&mut b, 116, 24);
        put32(&mut b, 120, nb);
        put32(&mut b, 124, reserved);
        put64(&mut b, 128, dsize);
        put64(&mut b, 136, doff);
        put64(&mut b, 144, 0);
        b
    };
    for b in [
        ext(0, 0, 64, 0x10000),
        ext(65536, 0, 64, 0x10000),
        ext(1, 0, 65 << 20, 0x10000),
        ext(1, 1, 64, 0x10000),
        ext(1, 0, 64, 0x10200),
    ] {
        expect(b, ErrorKind::Corrupt, "bitmaps_extension");
    }
    // Wrong length.
    let mut b = ext(1, 0, 64, 0x10000);
    put32(&mut b, 116, 16);
    expect(b, ErrorKind::Corrupt, "bitmaps_extension");
}

#[test]
fn q25_truncation_and_polyglots() {
    let b = base();
    let e = open(b[..3].to_vec()).unwrap_err();
    assert_eq!(
        (e.kind(), e.field()),
        (ErrorKind::InvalidFormat, Some("magic"))
    );
    let e = open(b[..60].to_vec()).unwrap_err();
    assert_eq!((e.kind(), e.field()), (ErrorKind::Corrupt, Some("header")));
    assert!(e.message().contains("truncated"));
    let e = open(b[..100].to_vec()).unwrap_err();
    assert_eq!(
        (e.kind(), e.field()),
        (ErrorKind::Corrupt, Some("header_length"))
    );
    // Tables past the end of a truncated file.
    let e = open(b[..CS + 512].to_vec()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    // A qcow2 header whose data also looks like a GPT disk is still just qcow2.
    let mut b = base();
    b[512..520].copy_from_slice(b"EFI PART");
    assert!(open(b).is_ok());
}

#[test]
fn random_byte_flips_never_panic() {
    let originals = [
        base_with(CreateOptions {
            size: 2 << 20,
            cluster_bits: 12,
            ..CreateOptions::default()
        }),
        base_with(CreateOptions {
            size: 2 << 20,
            cluster_bits: 12,
            compress: true,
            ..CreateOptions::default()
        }),
        base_with(CreateOptions {
            size: 2 << 20,
            cluster_bits: 9,
            version: 2,
            ..CreateOptions::default()
        }),
    ];
    let mut rng = testsupport::TestRng::new(77);
    for orig in &originals {
        // Metadata lives at the start (header) and the end (tables): flip there.
        for _ in 0..150 {
            let mut b = orig.clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                let region = if rng.next_u64().is_multiple_of(3) {
                    0..200
                } else {
                    b.len() - 16384..b.len()
                };
                let i = region.start + (rng.next_u64() as usize) % (region.end - region.start);
                b[i] ^= 1 << (rng.next_u64() % 8);
            }
            let Ok(img) = open(b.clone()) else { continue };
            let size = img.size().min(4 << 20);
            let mut buf = vec![0u8; 65536];
            let mut off = 0;
            while off < size {
                let n = (size - off).min(buf.len() as u64) as usize;
                let _ = img.read_at(&mut buf[..n], off);
                if let Ok(e) = img.block_status(off, size - off) {
                    assert!(e.len > 0);
                }
                off += n as u64;
            }
            let _ = img.check();
            let _ = img.info();
            if let Ok(w) = open_rw(b) {
                let _ = w.write_at(&[1u8; 5000], 1000);
                let _ = w.write_zeroes(0, 8192, true);
            }
        }
    }
}
