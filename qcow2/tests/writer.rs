//! Everything the writer produces passes `qemu-img check` and compares identical.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;

use blockdev::{BlockDevice, FileStorage, ImageWriter};
use qcow2::{CreateOptions, Preallocation, Qcow2Writer};

/// Guest content: pattern clusters, zero runs, compressible and random data.
fn content(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut rng = testsupport::TestRng::new(seed);
    let mut off = 0;
    while off < size {
        let len = ((rng.next_u64() % 200_000) as usize + 1).min(size - off);
        match rng.next_u64() % 4 {
            0 => {}
            1 => rng.fill(&mut v[off..off + len]),
            _ => {
                let b = rng.next_u64() as u8;
                for (i, x) in v[off..off + len].iter_mut().enumerate() {
                    *x = b.wrapping_add((i / 300) as u8);
                }
            }
        }
        off += len;
    }
    v
}

fn write_image(path: &Path, data: &[u8], opts: CreateOptions, chunk: usize) {
    let st = FileStorage::create_new(path).unwrap();
    let mut w: Box<dyn ImageWriter> = Box::new(Qcow2Writer::new(Box::new(st), opts).unwrap());
    let g = w.granularity() as usize;
    let mut off = 0;
    while off < data.len() {
        let n = chunk.min(data.len() - off);
        // Skip zero granules like the convert engine does.
        let mut p = off;
        while p < off + n {
            let e = (p + g).min(off + n);
            if data[p..e].iter().any(|&b| b != 0) {
                w.write_data(p as u64, &data[p..e]).unwrap();
            }
            p = e;
        }
        off += n;
    }
    w.finish().unwrap();
}

fn roundtrip(name: &str, opts: CreateOptions, size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let img = dir.path().join(format!("{name}.qcow2"));
    let data = content(size, size as u64 ^ 77);
    std::fs::write(&raw, &data).unwrap();
    write_image(
        &img,
        &data,
        CreateOptions {
            size: size as u64,
            ..opts
        },
        1 << 20,
    );
    common::qemu_check_clean(&img);
    let (rc, out, err) = common::qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{name}: {out} {err}");
    let ours = common::open(&img);
    let mut back = vec![0u8; size];
    ours.read_at(&mut back, 0).unwrap();
    assert!(back == data, "{name}: our reader differs");
    let rep = ours.check().unwrap();
    assert!(rep.findings.is_empty(), "{name}: {:?}", rep.findings);
}

#[test]
fn plain_v3() {
    roundtrip("plain", CreateOptions::default(), 5 << 20);
}

#[test]
fn compat_010() {
    roundtrip(
        "v2",
        CreateOptions {
            version: 2,
            ..CreateOptions::default()
        },
        3 << 20,
    );
}

#[test]
fn compressed_zlib() {
    roundtrip(
        "zlib",
        CreateOptions {
            compress: true,
            ..CreateOptions::default()
        },
        4 << 20,
    );
}

#[test]
fn compressed_zstd() {
    roundtrip(
        "zstd",
        CreateOptions {
            compress: true,
            compression_type: 1,
            ..CreateOptions::default()
        },
        4 << 20,
    );
}

#[test]
fn cluster_2m() {
    roundtrip(
        "c2m",
        CreateOptions {
            cluster_bits: 21,
            ..CreateOptions::default()
        },
        7 << 20,
    );
}

#[test]
fn cluster_2m_compressed() {
    roundtrip(
        "c2mz",
        CreateOptions {
            cluster_bits: 21,
            compress: true,
            ..CreateOptions::default()
        },
        5 << 20,
    );
}

#[test]
fn cluster_512_and_refcount_widths() {
    for order in [0u32, 3, 6] {
        roundtrip(
            &format!("c512-r{order}"),
            CreateOptions {
                cluster_bits: 9,
                refcount_order: order,
                ..CreateOptions::default()
            },
            1 << 20,
        );
    }
    roundtrip(
        "c512-r1-z",
        CreateOptions {
            cluster_bits: 9,
            refcount_order: 1,
            compress: true,
            ..CreateOptions::default()
        },
        1 << 20,
    );
}

#[test]
fn create_empty_and_preallocated() {
    let dir = tempfile::tempdir().unwrap();
    for (i, pre) in [Preallocation::Off, Preallocation::Metadata]
        .into_iter()
        .enumerate()
    {
        for version in [2u32, 3] {
            let p = dir.path().join(format!("e{i}-{version}.qcow2"));
            let st = FileStorage::create_new(&p).unwrap();
            qcow2::create(
                Box::new(st),
                CreateOptions {
                    size: 100 << 20,
                    version,
                    preallocation: pre,
                    ..CreateOptions::default()
                },
            )
            .unwrap();
            common::qemu_check_clean(&p);
            let img = common::open(&p);
            assert_eq!(img.size(), 100 << 20);
            common::assert_same_as_qemu(&img, &p);
        }
    }
}

#[test]
fn overlay_with_zero_clusters_over_backing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let size = 4usize << 20;
    let base_data = content(size, 5);
    write_image(
        &base,
        &base_data,
        CreateOptions {
            size: size as u64,
            ..CreateOptions::default()
        },
        1 << 20,
    );
    for version in [2u32, 3] {
        let top = dir.path().join(format!("top{version}.qcow2"));
        let st = FileStorage::create_new(&top).unwrap();
        let mut w = Qcow2Writer::new(
            Box::new(st),
            CreateOptions {
                size: size as u64,
                version,
                backing_file: Some("base.qcow2".into()),
                backing_format: Some("qcow2".into()),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let mut expect = base_data.clone();
        w.write_data(65536, &[7u8; 131072]).unwrap();
        expect[65536..65536 + 131072].fill(7);
        w.write_zeroes(1 << 20, 3 * 65536).unwrap();
        expect[1 << 20..(1 << 20) + 3 * 65536].fill(0);
        Box::new(w).finish().unwrap();
        common::qemu_check_clean(&top);
        let img = common::open(&top);
        let mut back = vec![0u8; size];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == expect);
        common::assert_same_as_qemu(&img, &top);
        let info = img.info();
        assert_eq!(info.backing.unwrap().format.as_deref(), Some("qcow2"));
    }
}

#[test]
fn many_l2_tables_streamed() {
    // 4 GiB with 4 KiB clusters, metadata preallocated: 8 MiB of L2 tables.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.qcow2");
    let st = FileStorage::create_new(&p).unwrap();
    qcow2::create(
        Box::new(st),
        CreateOptions {
            size: 4 << 30,
            cluster_bits: 12,
            preallocation: Preallocation::Metadata,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    common::qemu_check_clean(&p);
    let img = common::open(&p);
    let e = img.block_status(0, 4 << 30).unwrap();
    assert_eq!(e.kind, blockdev::ExtentKind::Data);
    assert_eq!(e.len, 4 << 30);
}

#[test]
fn odd_size_rounds_up_to_a_sector() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.qcow2");
    let data = content(1_000_001, 4);
    write_image(
        &p,
        &data,
        CreateOptions {
            size: 1_000_001,
            ..CreateOptions::default()
        },
        1 << 20,
    );
    common::qemu_check_clean(&p);
    let img = common::open(&p);
    assert_eq!(img.size(), 1_000_448);
    let mut back = vec![0u8; 1_000_448];
    img.read_at(&mut back, 0).unwrap();
    assert!(back[..1_000_001] == data[..] && back[1_000_001..].iter().all(|&b| b == 0));
}
