//! Images we create and convert, read back by qemu-img and libvhdi; images qemu-img makes,
//! read back by us.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Command;

use blockdev::{BlockDevice, FileStorage, ImageWriter, Limits, Storage};
use common::{open_path, DirGate};
use testsupport::{require_tool, run, sha256_device, sha256_file, TestRng};
use vhd::{create, CreateOptions, Dialect, ParentLink, Subformat, VhdWriter};

fn qemu_virtual_size(p: &Path) -> u64 {
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vpc"])
        .arg(p));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn qemu_compare(raw: &Path, vhd: &Path) {
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vpc"])
        .arg(raw)
        .arg(vhd));
    assert_eq!(code, 0, "qemu-img compare: {out} {err}");
}

fn vhdiinfo_size(p: &Path) -> Option<u64> {
    require_tool("vhdiinfo");
    let (code, out, err) = run(Command::new("vhdiinfo").arg(p));
    assert_eq!(code, 0, "vhdiinfo: {out} {err}");
    out.lines()
        .find(|l| l.contains("Media size"))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
}

/// A raw image with random data in some blocks and zeros elsewhere.
fn make_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    let mut rng = TestRng::new(seed);
    let mut off = 0usize;
    while off < data.len() {
        let r = rng.next_u64();
        let len = (r % (3 << 20)) as usize + 512;
        let end = (off + len).min(data.len());
        if r & 1 == 0 {
            rng.fill(&mut data[off..end]);
        }
        off = end;
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn convert(raw: &[u8], out: &Path, opts: &CreateOptions) {
    let st = FileStorage::create_new(out).unwrap();
    let mut w: Box<dyn ImageWriter> =
        Box::new(VhdWriter::new(Box::new(st), opts, &Limits::default()).unwrap());
    let chunk = 1 << 20;
    let mut off = 0usize;
    while off < raw.len() {
        let end = (off + chunk).min(raw.len());
        w.write_data(off as u64, &raw[off..end]).unwrap();
        off = end;
    }
    w.finish().unwrap();
}

#[test]
fn create_exact_sizes_read_by_qemu_and_libvhdi() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [
        1u64 << 20,
        (10 << 20) + 512,
        5 << 30,
        3_000_000_000u64 / 512 * 512,
    ]
    .into_iter()
    .enumerate()
    {
        for sub in [Subformat::Dynamic, Subformat::Fixed] {
            let p = dir.path().join(format!("c{i}-{sub:?}.vhd"));
            let st = FileStorage::create_new(&p).unwrap();
            let mut o = CreateOptions::dynamic(size);
            o.subformat = sub;
            create(&st, &o).unwrap();
            assert_eq!(qemu_virtual_size(&p), size, "{p:?}");
            assert_eq!(vhdiinfo_size(&p), Some(size), "{p:?}");
            let img = open_path(&p, false).unwrap();
            assert_eq!(img.size(), size);
            let rep = img.check().unwrap();
            assert_eq!(rep.corruptions() + rep.leaks(), 0, "{:?}", rep.findings);
        }
    }
    let st = FileStorage::create_new(&dir.path().join("odd.vhd")).unwrap();
    let e = create(&st, &CreateOptions::dynamic(1000)).unwrap_err();
    assert_eq!(e.kind(), blockdev::ErrorKind::InvalidArgument);
}

#[test]
fn convert_dynamic_fixed_xen_compare_with_qemu() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let size = (9 << 20) + 3 * 512;
    let raw_path = dir.path().join("src.raw");
    let raw = make_raw(&raw_path, size, 7);
    for (name, sub, dialect, bs) in [
        ("dyn.vhd", Subformat::Dynamic, Dialect::Standard, 2 << 20),
        (
            "dyn512k.vhd",
            Subformat::Dynamic,
            Dialect::Standard,
            512 << 10,
        ),
        ("fixed.vhd", Subformat::Fixed, Dialect::Standard, 2 << 20),
        ("xen.vhd", Subformat::Dynamic, Dialect::Xen, 2 << 20),
    ] {
        let out = dir.path().join(name);
        let opts = CreateOptions {
            size,
            subformat: sub,
            block_size: bs,
            dialect,
            parent: None,
        };
        convert(&raw, &out, &opts);
        qemu_compare(&raw_path, &out);
        assert_eq!(qemu_virtual_size(&out), size);
        assert_eq!(vhdiinfo_size(&out), Some(size));
        let img = open_path(&out, false).unwrap();
        assert_eq!(sha256_device(&img), sha256_file(&raw_path), "{name}");
        if let Some(sha) = pyvhdi_sha(&out, None) {
            assert_eq!(sha, sha256_file(&raw_path), "pyvhdi {name}");
        }
        let rep = img.check().unwrap();
        assert_eq!(
            rep.corruptions() + rep.leaks(),
            0,
            "{name}: {:?}",
            rep.findings
        );
        if dialect == Dialect::Xen {
            let info = img.info();
            assert_eq!(info.format_specific["dialect"], "xen");
            assert_eq!(info.format_specific["batmap_valid"], true);
            assert_eq!(info.format_specific["creator_app"], "tap\\0");
        }
    }
}

/// A python3 that has Debian's pyvhdi module (the system one, not a pyenv shim).
fn python_with_pyvhdi() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import pyvhdi"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

fn pyvhdi_sha(child: &Path, parent: Option<&Path>) -> Option<String> {
    let Some(py) = python_with_pyvhdi() else {
        eprintln!("skipped pyvhdi check: python3-libvhdi is not installed");
        return None;
    };
    let script = r#"
import hashlib, sys, pyvhdi
f = pyvhdi.file()
f.open(sys.argv[1])
if len(sys.argv) > 2:
    p = pyvhdi.file()
    p.open(sys.argv[2])
    f.set_parent(p)
h = hashlib.sha256()
size = f.get_media_size()
off = 0
while off < size:
    n = min(1 << 20, size - off)
    h.update(f.read_buffer_at_offset(n, off))
    off += n
print(h.hexdigest())
"#;
    let mut cmd = Command::new(py);
    cmd.args(["-c", script]).arg(child);
    if let Some(p) = parent {
        cmd.arg(p);
    }
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 0, "pyvhdi: {err}");
    Some(out.trim().to_string())
}

#[test]
fn differencing_create_convert_and_read_through_parent() {
    let dir = tempfile::tempdir().unwrap();
    let size = 6 << 20;
    let base_raw = dir.path().join("base.raw");
    let raw = make_raw(&base_raw, size, 11);
    let base = dir.path().join("base.vhd");
    convert(&raw, &base, &CreateOptions::dynamic(size));
    let parent = open_path(&base, false).unwrap();
    let child = dir.path().join("sub/child.vhd");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let link = ParentLink::new(&parent, &base, Some(&child)).unwrap();
    assert_eq!(link.relative, "../base.vhd");
    // The child: new data at sector 8, explicit zeros over block 1, the rest from the parent.
    let mut o = CreateOptions::dynamic(size);
    o.parent = Some(link);
    let st = FileStorage::create_new(&child).unwrap();
    let mut w: Box<dyn ImageWriter> =
        Box::new(VhdWriter::new(Box::new(st), &o, &Limits::default()).unwrap());
    let mut expect = raw.clone();
    w.write_data(4096, &[0xAB; 1024]).unwrap();
    expect[4096..5120].fill(0xAB);
    w.write_zeroes(2 << 20, 1 << 20).unwrap();
    expect[2 << 20..3 << 20].fill(0);
    w.finish().unwrap();
    // Relative locator ../base.vhd resolves from sub/.
    let img = open_path(&child, false).unwrap();
    assert!(img.backing().is_some());
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == expect, "differencing content");
    let info = img.info();
    let locs = info.format_specific["parent_locators"].as_array().unwrap();
    assert_eq!(locs.len(), 2);
    assert_eq!(locs[1]["path"], "..\\base.vhd");
    let rep = img.check().unwrap();
    assert_eq!(rep.corruptions() + rep.leaks(), 0, "{:?}", rep.findings);
    std::fs::write(dir.path().join("expect.raw"), &expect).unwrap();
    if let Some(sha) = pyvhdi_sha(&child, Some(&base)) {
        assert_eq!(sha, sha256_file(&dir.path().join("expect.raw")));
    }
    // vhdiinfo shows the parent identity.
    require_tool("vhdiinfo");
    let (code, out, _) = run(Command::new("vhdiinfo").arg(&child));
    assert_eq!(code, 0);
    assert!(
        out.contains("Differential") || out.contains("differential"),
        "{out}"
    );
    let parent_uuid = info.format_specific["parent_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        out.lines()
            .any(|l| l.contains("Parent identifier") && l.contains(&parent_uuid)),
        "{out}"
    );

    // create -b: an empty differencing disk reads exactly as its parent.
    let empty = dir.path().join("empty.vhd");
    let mut o = CreateOptions::dynamic(size);
    o.parent = Some(ParentLink::new(&parent, &base, Some(&empty)).unwrap());
    o.dialect = Dialect::Xen;
    create(&FileStorage::create_new(&empty).unwrap(), &o).unwrap();
    let img = open_path(&empty, false).unwrap();
    assert_eq!(sha256_device(&img), sha256_file(&base_raw));
    assert_eq!(
        img.info().format_specific["parent_locators"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // A parent with another UUID is refused.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(&empty, other.join("empty.vhd")).unwrap();
    convert(&raw, &other.join("base.vhd"), &CreateOptions::dynamic(size));
    let e = open_path(&other.join("empty.vhd"), false).unwrap_err();
    assert_eq!(e.kind(), blockdev::ErrorKind::BackingMismatch, "{e}");
    let gate = DirGate {
        skip: false,
        ignore_id: true,
        ..DirGate::new()
    };
    let st = FileStorage::open(&other.join("empty.vhd"), false).unwrap();
    assert!(vhd::VhdImage::open(Box::new(st), &common::params(&gate, false, None)).is_ok());
}

#[test]
fn qemu_made_images_read_back_identical() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("src.raw");
    make_raw(&raw_path, 7 << 20, 3);
    for (name, opts) in [
        ("q-dyn.vhd", "subformat=dynamic"),
        ("q-fixed.vhd", "subformat=fixed"),
        ("q-force.vhd", "subformat=dynamic,force_size=on"),
        ("q-fixed-force.vhd", "subformat=fixed,force_size=on"),
    ] {
        let out = dir.path().join(name);
        let (code, _, err) = run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vpc", "-o", opts])
            .arg(&raw_path)
            .arg(&out));
        assert_eq!(code, 0, "{err}");
        let img = open_path(&out, false).unwrap();
        assert_eq!(img.size(), qemu_virtual_size(&out), "{name}");
        assert_eq!(
            sha256_device(&img),
            testsupport::qemu_sha256(&out, "vpc"),
            "{name}"
        );
        assert_eq!(img.check().unwrap().corruptions(), 0, "{name}");
    }
}

#[test]
fn vhdiinfo_reads_our_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.vhd");
    let st = FileStorage::create_new(&p).unwrap();
    create(&st, &CreateOptions::dynamic(64 << 20)).unwrap();
    drop(st);
    assert_eq!(vhdiinfo_size(&p), Some(64 << 20));
    let st = FileStorage::open(&p, false).unwrap();
    assert_eq!(st.len().unwrap(), 512 + 1024 + 512 + 512);
}

/// Zero runs inside a block are left as holes of the file by the writer (as qemu does); every
/// reader still sees zeros there, and our block status reports them as zeros.
#[test]
fn zero_runs_inside_blocks_stay_holes() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let mut data = vec![0u8; size as usize];
    let mut rng = TestRng::new(41);
    rng.fill(&mut data[..100_000]);
    rng.fill(&mut data[300_000..(1 << 20) + 777]);
    rng.fill(&mut data[(2 << 20) + 4096..(2 << 20) + 8192]);
    rng.fill(&mut data[(6 << 20) - 512..(6 << 20) + 4096]);
    let raw_path = dir.path().join("z.raw");
    std::fs::write(&raw_path, &data).unwrap();
    let out = dir.path().join("z.vhd");
    let st = FileStorage::create_new(&out).unwrap();
    let mut w: Box<dyn ImageWriter> = Box::new(
        VhdWriter::new(
            Box::new(st),
            &CreateOptions::dynamic(size),
            &Limits::default(),
        )
        .unwrap(),
    );
    assert_eq!(w.granularity(), 4096);
    // Like the convert engine: 1 MiB items, only their non-zero pages handed over.
    for start in (0..data.len()).step_by(1 << 20) {
        let chunk = &data[start..start + (1 << 20)];
        let mut runs = Vec::new();
        blockdev::zero_runs(chunk, 4096, |s, l, zero| {
            if !zero {
                runs.push((s, l));
            }
        });
        for (s, l) in runs {
            w.write_data((start + s) as u64, &chunk[s..s + l]).unwrap();
        }
    }
    w.finish().unwrap();
    qemu_compare(&raw_path, &out);
    let img = open_path(&out, false).unwrap();
    assert_eq!(sha256_device(&img), sha256_file(&raw_path));
    if let Some(sha) = pyvhdi_sha(&out, None) {
        assert_eq!(sha, sha256_file(&raw_path), "pyvhdi");
    }
    let rep = img.check().unwrap();
    assert_eq!(rep.corruptions() + rep.leaks(), 0, "{:?}", rep.findings);
    // All four 2 MiB blocks are allocated (8 MiB of blocks) but hold under 1 MiB of data: the
    // rest are holes of the file.
    let on_disk = std::fs::metadata(&out).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        on_disk.blocks() * 512 < 3 << 20,
        "the file should be sparse: {} bytes allocated",
        on_disk.blocks() * 512
    );
    // The zero run inside block 0 reads as zeros without a read (where the filesystem reports
    // holes).
    let e = img.block_status(200_000, 1 << 20).unwrap();
    assert!(
        e.kind == blockdev::ExtentKind::Zero || e.kind == blockdev::ExtentKind::Data,
        "{e:?}"
    );
    if e.kind == blockdev::ExtentKind::Zero {
        assert!(e.offset + e.len <= 300_000, "{e:?}");
    }
}
