//! Images made by qemu-img / qemu-io read back identical to qemu-img's reading.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::{Path, PathBuf};

use blockdev::{BlockDevice, ExtentKind};

const SIZE: u64 = 8 << 20;

fn pattern_raw(dir: &Path) -> PathBuf {
    let raw = dir.join("src.raw");
    let mut v = vec![0u8; SIZE as usize];
    let mut rng = testsupport::TestRng::new(42);
    for (i, chunk) in v.chunks_mut(192 * 1024).enumerate() {
        match i % 3 {
            0 => rng.fill(chunk),
            1 => chunk.fill(i as u8),
            _ => {}
        }
    }
    // A few odd sectors.
    v[SIZE as usize - 700] = 9;
    std::fs::write(&raw, v).unwrap();
    raw
}

fn check_same(img: &Path) {
    let dev = common::open(img);
    common::assert_same_as_qemu(&dev, img);
    // block_status covers the disk exactly.
    let mut off = 0;
    while off < dev.size() {
        let e = dev.block_status(off, dev.size() - off).unwrap();
        assert_eq!(e.offset, off);
        assert!(e.len > 0 && off + e.len <= dev.size());
        off += e.len;
    }
    let rep = dev.check().unwrap();
    assert_eq!(
        rep.corruptions(),
        0,
        "{}: {:?}",
        img.display(),
        rep.findings
    );
    assert_eq!(rep.leaks(), 0, "{}: {:?}", img.display(), rep.findings);
}

fn convert(dir: &Path, raw: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(extra);
    args.push(raw.to_str().unwrap());
    args.push(out.to_str().unwrap());
    let (rc, _, err) = common::qemu_img(&args);
    assert_eq!(rc, 0, "{err}");
    out
}

#[test]
fn compat_and_cluster_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_raw(dir.path());
    for compat in ["0.10", "1.1"] {
        for cs in ["512", "4096", "65536", "2M"] {
            let name = format!("c{compat}-{cs}.qcow2");
            let img = convert(
                dir.path(),
                &raw,
                &name,
                &["-o", &format!("compat={compat},cluster_size={cs}")],
            );
            check_same(&img);
        }
    }
}

#[test]
fn refcount_widths() {
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_raw(dir.path());
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let img = convert(
            dir.path(),
            &raw,
            &format!("r{bits}.qcow2"),
            &["-o", &format!("refcount_bits={bits}")],
        );
        check_same(&img);
    }
}

#[test]
fn compressed_zlib_zstd_and_small_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_raw(dir.path());
    for (ct, cs) in [
        ("zlib", "65536"),
        ("zstd", "65536"),
        ("zlib", "512"),
        ("zstd", "2M"),
        ("zlib", "2M"),
    ] {
        let img = convert(
            dir.path(),
            &raw,
            &format!("z-{ct}-{cs}.qcow2"),
            &[
                "-c",
                "-o",
                &format!("compression_type={ct},cluster_size={cs}"),
            ],
        );
        check_same(&img);
    }
}

#[test]
fn extended_l2_subclusters() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ext.qcow2");
    let base = dir.path().join("base.qcow2");
    common::qemu_create(&[base.to_str().unwrap(), "8M"]);
    common::qemu_io(&base, "qcow2", &["write -P 0x11 0 8M"]);
    common::qemu_create(&[
        "-o",
        "extended_l2=on,cluster_size=64k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        img.to_str().unwrap(),
        "8M",
    ]);
    common::qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x22 2048 4096",
            "write -z 65536 8192",
            "write -P 0x33 200k 3k",
            "write -z 1M 64k",
            "write -P 0x44 2M 128k",
        ],
    );
    check_same(&img);
}

#[test]
fn preallocation_and_lazy_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    for opt in [
        "preallocation=metadata",
        "preallocation=full",
        "lazy_refcounts=on",
        "preallocation=falloc",
    ] {
        let img = dir.path().join(format!("{}.qcow2", opt.replace('=', "-")));
        common::qemu_create(&["-o", opt, img.to_str().unwrap(), "8M"]);
        common::qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0x5a 100k 300k",
                "write -z 1M 128k",
                "discard 2M 64k",
            ],
        );
        check_same(&img);
    }
}

#[test]
fn zero_clusters_over_backing_and_chains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = pattern_raw(d);
    // raw <- mid (qcow2 v2) <- top (qcow2 v3 with zero clusters)
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    common::qemu_create(&[
        "-o",
        "compat=0.10",
        "-b",
        "src.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
    ]);
    common::qemu_io(&mid, "qcow2", &["write -P 0x61 0 100k", "write -z 3M 64k"]);
    common::qemu_create(&[
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "10M",
    ]);
    common::qemu_io(
        &top,
        "qcow2",
        &[
            "write -z 0 256k",
            "write -P 0x77 5M 10k",
            "write -z -u 6M 1M",
        ],
    );
    check_same(&mid);
    check_same(&top);
    let dev = common::open(&top);
    assert_eq!(dev.block_status(0, 1 << 20).unwrap().kind, ExtentKind::Zero);
    assert_eq!(dev.size(), 10 << 20);
    let _ = raw;
}

/// Our block_status of the top layer agrees with `qemu-img map` at depth 0.
fn map_agrees(img: &Path) {
    let (rc, out, err) =
        common::qemu_img(&["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dev = common::open(img);
    for e in v.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let depth = e["depth"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        let want = if depth > 0 || !e["present"].as_bool().unwrap_or(true) {
            ExtentKind::Unallocated
        } else if data {
            ExtentKind::Data
        } else if zero {
            ExtentKind::Zero
        } else {
            ExtentKind::Unallocated
        };
        let mut off = start;
        while off < start + len {
            let ours = dev.block_status(off, start + len - off).unwrap();
            // Without a backing file qemu reports unallocated ranges as zero at depth 0.
            let ok = ours.kind == want
                || (dev.backing().is_none()
                    && want == ExtentKind::Zero
                    && ours.kind == ExtentKind::Unallocated);
            assert!(
                ok,
                "{}: at {off}: ours {:?}, qemu {e}",
                img.display(),
                ours.kind
            );
            if let (Some(h), Some(o)) = (ours.host_offset, e["offset"].as_u64()) {
                assert_eq!(h, o + (off - start), "host offset at {off}");
            }
            if depth == 0 {
                assert_eq!(
                    ours.compressed,
                    e["compressed"].as_bool().unwrap_or(false),
                    "{}: compressed at {off}: qemu {e}",
                    img.display()
                );
            }
            off += ours.len.min(start + len - off);
        }
    }
}

#[test]
fn block_status_matches_qemu_map() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    common::qemu_create(&[base.to_str().unwrap(), "8M"]);
    common::qemu_io(&base, "qcow2", &["write -P 0x11 0 8M"]);
    let top = d.join("top.qcow2");
    common::qemu_create(&["-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    common::qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x22 64k 192k",
            "write -z 1M 128k",
            "write -P 0x33 2M 64k",
            "write -z 2M 64k",
            "write -P 5 4M 1M",
        ],
    );
    map_agrees(&top);
    let raw = pattern_raw(d);
    let z = convert(d, &raw, "z.qcow2", &["-c"]);
    map_agrees(&z);
    // Compressed and plain clusters side by side, zstd.
    let mixed = d.join("mixed.qcow2");
    common::qemu_create(&["-o", "compression_type=zstd", mixed.to_str().unwrap(), "4M"]);
    common::qemu_io(
        &mixed,
        "qcow2",
        &[
            "write -c -P 7 0 128k",
            "write -P 8 128k 64k",
            "write -c -P 9 192k 64k",
        ],
    );
    map_agrees(&mixed);
    let plain = convert(d, &raw, "p.qcow2", &[]);
    map_agrees(&plain);
}

#[test]
fn parallel_reads_agree() {
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_raw(dir.path());
    let img = convert(
        dir.path(),
        &raw,
        "z.qcow2",
        &["-c", "-o", "cluster_size=4096"],
    );
    let want = std::fs::read(&raw).unwrap();
    let dev = std::sync::Arc::new(common::open(&img));
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            let want = want.clone();
            std::thread::spawn(move || {
                let mut rng = testsupport::TestRng::new(t + 1);
                for _ in 0..300 {
                    let off = rng.next_u64() % (SIZE - 1);
                    let len = (rng.next_u64() % 200_000).min(SIZE - off) as usize;
                    let mut b = vec![0u8; len];
                    dev.read_at(&mut b, off).unwrap();
                    assert!(b[..] == want[off as usize..off as usize + len]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

struct SkipGate;

impl blockdev::OpenGate for SkipGate {
    fn open_backing(
        &self,
        _r: &blockdev::BackingRequest<'_>,
    ) -> blockdev::Result<Box<dyn BlockDevice>> {
        panic!("must not be asked")
    }
    fn open_data_file(
        &self,
        _r: &blockdev::BackingRequest<'_>,
        _w: bool,
    ) -> blockdev::Result<Box<dyn blockdev::Storage>> {
        panic!("must not be asked")
    }
    fn skip_backing(&self) -> bool {
        true
    }
}

#[test]
fn skipped_backing_fails_reads_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pattern_raw(d);
    let top = d.join("top.qcow2");
    common::qemu_create(&["-b", "src.raw", "-F", "raw", top.to_str().unwrap()]);
    common::qemu_io(&top, "qcow2", &["write -P 0x42 0 64k"]);
    let st = blockdev::FileStorage::open(&top, false).unwrap();
    let img =
        qcow2::Qcow2Image::open(Box::new(st), &SkipGate, &qcow2::OpenOptions::default()).unwrap();
    let info = img.info();
    let b = info.backing.unwrap();
    assert_eq!(
        (b.reference.as_str(), b.format.as_deref(), b.resolved),
        ("src.raw", Some("raw"), false)
    );
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0x42));
    let e = img.read_at(&mut buf, 1 << 20).unwrap_err();
    assert_eq!(e.kind(), blockdev::ErrorKind::BackingNotFound);
}

#[test]
fn our_writes_into_qemu_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = pattern_raw(d);
    for (name, extra) in [
        ("c.qcow2", vec!["-c"]),
        (
            "z.qcow2",
            vec!["-c", "-o", "compression_type=zstd,cluster_size=4k"],
        ),
        ("p.qcow2", vec!["-o", "compat=0.10,cluster_size=512"]),
        ("r1.qcow2", vec!["-o", "refcount_bits=1"]),
        ("m.qcow2", vec!["-o", "preallocation=metadata"]),
    ] {
        let img = convert(d, &raw, name, &extra);
        let mut model = std::fs::read(&raw).unwrap();
        {
            let dev = common::open_rw(&img);
            let mut rng = testsupport::TestRng::new(9);
            for i in 0..40u64 {
                let off = rng.next_u64() % (SIZE - 1);
                let len = (rng.next_u64() % 150_000 + 1).min(SIZE - off);
                if i % 3 == 0 {
                    dev.write_zeroes(off, len, i % 2 == 0).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                } else {
                    let b = vec![i as u8 + 1; len as usize];
                    dev.write_at(&b, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&b);
                }
            }
            dev.flush().unwrap();
            let rep = dev.check().unwrap();
            assert!(rep.findings.is_empty(), "{name}: {:?}", rep.findings);
        }
        common::qemu_check_clean(&img);
        let m = d.join("model.raw");
        std::fs::write(&m, &model).unwrap();
        let (rc, out, err) = common::qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            m.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        assert_eq!(rc, 0, "{name}: {out} {err}");
    }
}
