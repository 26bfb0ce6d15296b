//! Growing an image in place (`qcow2::grow`, used by commit into a smaller parent), checked
//! with qemu-img and qemu-io, and at every write with a power cut.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use blockdev::testkit::CrashStorage;
use blockdev::{BlockDevice, ErrorKind, FileStorage, Limits, MemStorage};
use qcow2::{CreateOptions, OpenOptions, Qcow2Image};

fn grow_file(path: &std::path::Path, size: u64) -> blockdev::Result<()> {
    let st = FileStorage::open(path, true).unwrap();
    qcow2::grow(Box::new(st), &common::TestGate, size, &Limits::default())
}

fn virtual_size(path: &std::path::Path) -> u64 {
    let (rc, out, err) = common::qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[test]
fn grows_a_qemu_image_with_and_without_a_new_l1() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    // 4 KiB clusters: one L1 entry maps 2 MiB, so 16 MiB fill 8 entries.
    common::qemu_create(&["-o", "cluster_size=4096", img.to_str().unwrap(), "16M"]);
    common::qemu_io(
        &img,
        "qcow2",
        &["write -P 0x41 0 3M", "write -P 0x42 15M 1M"],
    );

    // Within the L1's last entry: only the size changes.
    grow_file(&img, (16 << 20) + 4096).unwrap();
    assert_eq!(virtual_size(&img), (16 << 20) + 4096);
    common::qemu_check_clean(&img);

    // Past it: a new, larger L1; the old one is released (no leak).
    grow_file(&img, 100 << 20).unwrap();
    assert_eq!(virtual_size(&img), 100 << 20);
    common::qemu_check_clean(&img);
    common::qemu_io(
        &img,
        "qcow2",
        &[
            "read -P 0x41 0 3M",
            "read -P 0x42 15M 1M",
            "read -P 0 16M 84M",
        ],
    );

    // Our in-place writes and qemu's reads agree on the grown range.
    {
        let rw = common::open_rw(&img);
        rw.write_at(&[0x43; 70_000], 90 << 20).unwrap();
        rw.flush().unwrap();
    }
    common::qemu_io(
        &img,
        "qcow2",
        &["read -P 0x43 90M 70000", "read -P 0x41 0 3M"],
    );
    common::qemu_check_clean(&img);
    common::assert_same_as_qemu(&common::open(&img), &img);

    // Shrinking, odd sizes and sizes past the format's L1 limit are refused, changing nothing.
    let before = testsupport::sha256_file(&img);
    for (size, kind) in [
        (50 << 20, ErrorKind::InvalidArgument),
        ((200 << 20) + 1, ErrorKind::InvalidArgument),
        (1 << 60, ErrorKind::LimitExceeded),
    ] {
        let e = grow_file(&img, size).unwrap_err();
        assert_eq!(e.kind(), kind, "{size}: {e}");
    }
    assert_eq!(testsupport::sha256_file(&img), before);
}

/// Creates `top` (qcow2, `size` bytes) over `base.qcow2` beside it, with `extra` options.
fn overlay(top: &std::path::Path, size: &str, extra: &[&str]) {
    let mut args = vec!["-b", "base.qcow2", "-F", "qcow2"];
    args.extend(extra);
    args.push(top.to_str().unwrap());
    args.push(size);
    common::qemu_create(&args);
}

#[test]
fn an_overlay_grown_past_a_longer_backing_file_reads_zeros_there() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    common::qemu_create(&[base.to_str().unwrap(), "8M"]);
    common::qemu_io(&base, "qcow2", &["write -P 0x51 0 8M"]);

    // The backing file is longer than the overlay: what it holds past the overlay's end
    // must not show after growing, whether the old end is cluster-aligned or not.
    for (old, name) in [("4M", "top.qcow2"), ("3146240", "odd.qcow2")] {
        let top = d.path().join(name);
        overlay(&top, old, &[]);
        common::qemu_io(&top, "qcow2", &["write -P 0x52 1M 64k"]);
        grow_file(&top, 16 << 20).unwrap();
        assert_eq!(virtual_size(&top), 16 << 20);
        common::qemu_check_clean(&top);
        let old: u64 = if old == "4M" { 4 << 20 } else { 3146240 };
        common::qemu_io(
            &top,
            "qcow2",
            &[
                "read -P 0x51 0 1M",
                "read -P 0x52 1M 64k",
                &format!(
                    "read -P 0x51 {} {}",
                    (1 << 20) + 65536,
                    old - (1 << 20) - 65536
                ),
                &format!("read -P 0 {old} {}", (16 << 20) - old),
            ],
        );
        common::assert_same_as_qemu(&common::open(&top), &top);
    }

    // Past the backing file's end nothing needs hiding; a shorter backing grows as it is.
    let short = d.path().join("short.qcow2");
    overlay(&short, "8M", &[]);
    grow_file(&short, 2 << 30).unwrap();
    assert_eq!(virtual_size(&short), 2 << 30);
    common::qemu_check_clean(&short);
    common::qemu_io(&short, "qcow2", &["read -P 0x51 0 8M", "read -P 0 8M 8M"]);

    // A version 2 overlay cannot mark zeros: refused, unchanged (qemu-img resize refuses too).
    let v2 = d.path().join("v2.qcow2");
    overlay(&v2, "4M", &["-o", "compat=0.10"]);
    let before = testsupport::sha256_file(&v2);
    let e = grow_file(&v2, 16 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert_eq!(testsupport::sha256_file(&v2), before);
    assert_eq!(virtual_size(&v2), 4 << 20);
}

/// A power cut after every write of a grow that moves the L1 (96 -> 768 entries): the image
/// left is the old one or the grown one, never corrupt, its data intact.
#[test]
fn power_cut_at_every_write_of_a_grow() {
    let m = mem_image(3 << 20, None);
    write_mem(&m, &[7u8; 300_000], 1_000_000);
    let initial = m.to_vec();
    let (old, new) = (3u64 << 20, 24u64 << 20);
    power_cut_each_write(&initial, &blockdev::DenyGate, old, new, |img, at| {
        let mut b = vec![0u8; 300_000];
        img.read_at(&mut b, 1_000_000).unwrap();
        assert!(b.iter().all(|&x| x == 7), "{at}: data lost");
    });
}

/// Grows `initial` to `new` bytes with a power cut after each write in turn (in order, and
/// keeping a seeded subset of the unflushed writes): every survivor opens through `gate`, has
/// no corruption and is `old` or `new` bytes long; `after` checks its content. Returns the
/// image grown without a cut.
fn power_cut_each_write(
    initial: &[u8],
    gate: &dyn blockdev::OpenGate,
    old: u64,
    new: u64,
    after: impl Fn(&Qcow2Image, &str),
) -> Qcow2Image {
    let open = |bytes: Vec<u8>| {
        Qcow2Image::open(
            Box::new(MemStorage::read_only(bytes)),
            gate,
            &OpenOptions::default(),
        )
    };
    let clean = Arc::new(CrashStorage::new(initial.to_vec(), None));
    qcow2::grow(Box::new(clean.clone()), gate, new, &Limits::default()).unwrap();
    let total = clean.ops();
    assert!(total > 5, "{total} operations");
    for n in 1..=total {
        for seed in [None, Some(n), Some(n + 11)] {
            let st = Arc::new(match seed {
                None => CrashStorage::new(initial.to_vec(), Some(n)),
                Some(k) => CrashStorage::reordering(initial.to_vec(), Some(n), k),
            });
            let _ = qcow2::grow(Box::new(st.clone()), gate, new, &Limits::default());
            let at = format!("crash after op {n} ({seed:?})");
            let img = open(st.crash_image().to_vec()).unwrap_or_else(|e| panic!("{at}: {e}"));
            let rep = img.check().unwrap();
            assert_eq!(rep.corruptions(), 0, "{at}: {:?}", rep.findings);
            let size = img.size();
            assert!(size == old || size == new, "size {size}");
            after(&img, &at);
        }
    }
    open(clean.crash_image().to_vec()).unwrap()
}

/// An in-memory qcow2 of `size` bytes in 512-byte clusters, over `backing` when given.
fn mem_image(size: u64, backing: Option<&str>) -> Arc<MemStorage> {
    let m = Arc::new(MemStorage::new());
    let opts = CreateOptions {
        size,
        cluster_bits: 9,
        backing_file: backing.map(str::to_string),
        backing_format: backing.map(|_| "qcow2".to_string()),
        ..CreateOptions::default()
    };
    qcow2::create(Box::new(m.clone()), opts).unwrap();
    m
}

/// Writes `data` at `off` into the in-memory image `m` (no backing file) and flushes.
fn write_mem(m: &Arc<MemStorage>, data: &[u8], off: u64) {
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let rw = Qcow2Image::open(Box::new(m.clone()), &blockdev::DenyGate, &opts).unwrap();
    rw.write_at(data, off).unwrap();
    rw.flush().unwrap();
}

/// Serves one in-memory qcow2 image as every backing file.
struct MemGate(Vec<u8>);

impl blockdev::OpenGate for MemGate {
    fn open_backing(
        &self,
        _req: &blockdev::BackingRequest<'_>,
    ) -> blockdev::Result<Box<dyn BlockDevice>> {
        let img = Qcow2Image::open(
            Box::new(MemStorage::read_only(self.0.clone())),
            &blockdev::DenyGate,
            &OpenOptions::default(),
        )?;
        Ok(Box::new(img))
    }
    fn open_data_file(
        &self,
        _req: &blockdev::BackingRequest<'_>,
        _writable: bool,
    ) -> blockdev::Result<Box<dyn blockdev::Storage>> {
        Err(blockdev::Error::unsupported("no data files here"))
    }
}

/// A power cut after every write of a grow that zeroes the range a longer backing file would
/// show: the overlay reads as before, or grown with zeros past its old end.
#[test]
fn power_cut_at_every_write_of_a_grow_over_a_longer_backing_file() {
    let base = mem_image(2 << 20, None);
    write_mem(&base, &vec![9u8; 2 << 20], 0);
    let gate = MemGate(base.to_vec());

    // The overlay ends mid-cluster, 100 KiB + 512 into the 2 MiB base.
    let old = 100 * 1024 + 512;
    let initial = mem_image(old, Some("base.qcow2")).to_vec();
    let new = 4 << 20;
    let mut all = vec![0u8; new as usize];
    let grown = power_cut_each_write(&initial, &gate, old, new, |img, at| {
        let mut b = vec![0u8; img.size() as usize];
        img.read_at(&mut b, 0).unwrap();
        assert!(b[..old as usize].iter().all(|&x| x == 9), "{at}");
        assert!(b[old as usize..].iter().all(|&x| x == 0), "{at}");
    });
    assert_eq!(grown.size(), new);
    grown.read_at(&mut all, 0).unwrap();
    assert!(all[..old as usize].iter().all(|&x| x == 9));
    assert!(
        all[old as usize..].iter().all(|&x| x == 0),
        "the base shows past the old end"
    );
}
