//! Images we create and write, checked by qemu-img (check, compare) and libvhdi (pyvhdi,
//! vhdiinfo), including 4096-byte logical sectors and differencing chains.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Command;

use blockdev::{BlockDevice, ExtentKind, FileStorage, ImageWriter, Limits};
use common::open_path;
use testsupport::{require_tool, run, sha256_device, TestRng};
use vhdx::create::ParentLink;
use vhdx::{CreateOptions, Subformat, VhdxWriter};

const MIB: u64 = 1 << 20;

fn qemu_check(path: &Path) {
    require_tool("qemu-img");
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(path));
    assert_eq!(code, 0, "qemu-img check failed: {out} {err}");
}

fn qemu_compare(raw: &Path, img: &Path) {
    require_tool("qemu-img");
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vhdx"])
        .arg(raw)
        .arg(img));
    assert_eq!(code, 0, "qemu-img compare: {out} {err}");
}

/// SHA-256 and geometry as libvhdi (pyvhdi) reads them; `parent` is set when given.
fn libvhdi_read(path: &Path, parent: Option<&Path>) -> (String, u64, u64) {
    let py = "/usr/bin/python3";
    let script = r#"
import hashlib, sys, pyvhdi
f = pyvhdi.file(); f.open(sys.argv[1])
if len(sys.argv) > 2:
    p = pyvhdi.file(); p.open(sys.argv[2]); f.set_parent(p)
h = hashlib.sha256(); n = f.get_media_size(); off = 0
while off < n:
    b = f.read_buffer_at_offset(min(1 << 20, n - off), off); h.update(b); off += len(b)
print(h.hexdigest(), n, f.get_bytes_per_sector())
"#;
    let mut cmd = Command::new(py);
    cmd.arg("-c").arg(script).arg(path);
    if let Some(p) = parent {
        cmd.arg(p);
    }
    let (code, out, err) = run(&mut cmd);
    assert_eq!(
        code, 0,
        "pyvhdi failed (install python3-libvhdi): {out} {err}"
    );
    let v: Vec<&str> = out.split_whitespace().collect();
    (
        v[0].to_string(),
        v[1].parse().unwrap(),
        v[2].parse().unwrap(),
    )
}

fn vhdiinfo(path: &Path) -> String {
    require_tool("vhdiinfo");
    let (code, out, err) = run(Command::new("vhdiinfo").arg(path));
    assert_eq!(code, 0, "vhdiinfo failed: {out} {err}");
    out
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    testsupport::hex(&sha2::Sha256::digest(b))
}

/// A guest image with scattered data: some blocks full, some partial, most empty.
fn pattern(size: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    let mut rng = TestRng::new(seed);
    let mut i = 0u64;
    while i < size {
        let r = rng.next_u64();
        let len = (r % 64 + 1) * 4096;
        if r.is_multiple_of(5) {
            let end = (i + len).min(size) as usize;
            rng.fill(&mut v[i as usize..end]);
        }
        i += len + (r >> 32) % (3 * MIB);
    }
    v
}

fn write_with_writer(path: &Path, opts: CreateOptions, data: &[u8]) {
    let st = FileStorage::create_new(path).unwrap();
    let mut w: Box<dyn ImageWriter> =
        Box::new(VhdxWriter::new(Box::new(st), opts, &Limits::default()).unwrap());
    let g = w.granularity() as usize;
    let mut off = 0usize;
    while off < data.len() {
        let n = g.min(data.len() - off);
        let piece = &data[off..off + n];
        if !blockdev::is_zero(piece) {
            w.write_data(off as u64, piece).unwrap();
        }
        off += n;
    }
    w.finish().unwrap();
}

#[test]
fn writer_dynamic_qemu_and_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    let size = 70 * MIB + 512 * 3;
    let data = pattern(size, 1);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    for (name, bs, sub) in [
        ("d32.vhdx", 32 * MIB, Subformat::Dynamic),
        ("d1.vhdx", MIB, Subformat::Dynamic),
        ("f2.vhdx", 2 * MIB, Subformat::Fixed),
    ] {
        let p = dir.path().join(name);
        write_with_writer(
            &p,
            CreateOptions {
                size,
                subformat: sub,
                block_size: bs,
                ..CreateOptions::default()
            },
            &data,
        );
        qemu_check(&p);
        qemu_compare(&raw, &p);
        let img = open_path(&p, false).unwrap();
        assert_eq!(img.size(), size);
        assert_eq!(sha256_device(&img), sha(&data));
        assert_eq!(img.check().unwrap().findings.len(), 0);
        let (h, n, bps) = libvhdi_read(&p, None);
        assert_eq!(
            (h.as_str(), n, bps),
            (sha(&data).as_str(), size, 512),
            "{name}"
        );
        assert!(vhdiinfo(&p).contains("Media size"));
    }
}

#[test]
fn create_then_write_in_place_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let size = 100 * MIB;
    for (name, sub) in [
        ("dyn.vhdx", Subformat::Dynamic),
        ("fix.vhdx", Subformat::Fixed),
    ] {
        let p = dir.path().join(name);
        let st = FileStorage::create_new(&p).unwrap();
        vhdx::create(
            &st,
            &CreateOptions {
                size,
                subformat: sub,
                block_size: 8 * MIB,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        drop(st);
        qemu_check(&p);
        let mut model = vec![0u8; size as usize];
        {
            let img = open_path(&p, true).unwrap();
            let mut rng = TestRng::new(7);
            for _ in 0..40 {
                let off = (rng.next_u64() % (size / 512 - 64)) * 512;
                let len = ((rng.next_u64() % 64) + 1) * 512;
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                img.write_at(&b, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
            // Whole-block zeroing and a partial zero range.
            img.write_zeroes(16 * MIB, 8 * MIB, true).unwrap();
            model[16 << 20..24 << 20].fill(0);
            img.write_zeroes(3 * MIB + 512, 4096, false).unwrap();
            model[(3 * MIB + 512) as usize..(3 * MIB + 512 + 4096) as usize].fill(0);
            img.flush().unwrap();
            assert_eq!(sha256_device(&img), sha(&model));
        }
        let raw = dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw, &model).unwrap();
        qemu_check(&p);
        qemu_compare(&raw, &p);
        let img = open_path(&p, false).unwrap();
        if sub == Subformat::Fixed {
            // LeaveBlockAllocated: zeroing a whole block keeps it allocated.
            let info = img.info();
            assert_eq!(info.format_specific["bat_states"]["fully_present"], 13);
        }
        assert!(img.log_state().log_guid.is_zero());
        assert_eq!(img.check().unwrap().corruptions(), 0);
        let (h, _, _) = libvhdi_read(&p, None);
        assert_eq!(h, sha(&model));
    }
}

#[test]
fn sector_4096_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    let size = 40 * MIB;
    let data = pattern(size, 3);
    let p = dir.path().join("4k.vhdx");
    write_with_writer(
        &p,
        CreateOptions {
            size,
            block_size: 4 * MIB,
            logical: 4096,
            physical: 4096,
            ..CreateOptions::default()
        },
        &data,
    );
    let img = open_path(&p, false).unwrap();
    assert_eq!(img.sector_sizes().logical, 4096);
    assert_eq!(sha256_device(&img), sha(&data));
    let (h, n, bps) = libvhdi_read(&p, None);
    assert_eq!((h, n, bps), (sha(&data), size, 4096));
    // qemu-img cannot open 4K-sector VHDX ("Operation not supported"): libvhdi is the oracle.
}

fn parent_link(parent: &vhdx::VhdxImage, rel: &str) -> ParentLink {
    ParentLink {
        data_write_guid: parent.data_write_guid(),
        disk_id: parent.disk_id(),
        size: parent.size(),
        logical: parent.sector_sizes().logical,
        relative_path: rel.to_string(),
        absolute_win32_path: format!("C:\\vms\\{}", rel.trim_start_matches(".\\")),
    }
}

#[test]
fn differencing_chain_writer_and_in_place() {
    for logical in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let size = 48 * MIB;
        let base = pattern(size, 11);
        let bp = dir.path().join("base.vhdx");
        write_with_writer(
            &bp,
            CreateOptions {
                size,
                block_size: 2 * MIB,
                logical,
                ..CreateOptions::default()
            },
            &base,
        );
        let parent = open_path(&bp, false).unwrap();
        // Child 1 through the writer: some sectors changed, a whole block zeroed.
        let mut model = base.clone();
        let cp = dir.path().join("child.avhdx");
        {
            let st = FileStorage::create_new(&cp).unwrap();
            let mut w = VhdxWriter::new(
                Box::new(st),
                CreateOptions {
                    block_size: 2 * MIB,
                    logical,
                    parent: Some(parent_link(&parent, ".\\base.vhdx")),
                    ..CreateOptions::default()
                },
                &Limits::default(),
            )
            .unwrap();
            let mut rng = TestRng::new(5);
            let mut off = 0u64;
            while off < size - 2 * MIB {
                let len = u64::from(logical) * (1 + rng.next_u64() % 16);
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                w.write_data(off, &b).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&b);
                off += len + MIB + (rng.next_u64() % 8) * u64::from(logical);
            }
            // Whole last block: explicit zeros over the parent.
            w.write_zeroes(size - 2 * MIB, 2 * MIB).unwrap();
            model[(size - 2 * MIB) as usize..].fill(0);
            Box::new(w).finish().unwrap();
        }
        let child = open_path(&cp, false).unwrap();
        assert!(child.backing().is_some());
        assert_eq!(sha256_device(&child), sha(&model));
        assert_eq!(child.check().unwrap().corruptions(), 0);
        let (h, n, _) = libvhdi_read(&cp, Some(&bp));
        assert_eq!((h, n), (sha(&model), size), "libvhdi, logical {logical}");
        // Unallocated extents are reported where the parent shows through.
        let mut kinds = Vec::new();
        let mut off = 0;
        while off < size {
            let e = child.block_status(off, size - off).unwrap();
            if e.kind == ExtentKind::Data {
                // Data extents hold exactly the child's bytes.
                let mut b = vec![0u8; e.len as usize];
                child.read_at(&mut b, off).unwrap();
                assert_eq!(b, &model[off as usize..(off + e.len) as usize]);
            }
            kinds.push(e.kind);
            off += e.len;
        }
        assert!(kinds.contains(&ExtentKind::Unallocated));
        assert!(kinds.contains(&ExtentKind::Data));
        assert!(kinds.contains(&ExtentKind::Zero));
        drop(child);

        // In-place writes to a child made with create().
        let cp2 = dir.path().join("child2.vhdx");
        let st = FileStorage::create_new(&cp2).unwrap();
        vhdx::create(
            &st,
            &CreateOptions {
                block_size: MIB,
                logical,
                parent: Some(parent_link(&parent, ".\\base.vhdx")),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        drop(st);
        let mut model2 = base.clone();
        {
            let c = open_path(&cp2, true).unwrap();
            let mut rng = TestRng::new(9);
            for _ in 0..30 {
                let ls = u64::from(logical);
                let off = (rng.next_u64() % (size / ls - 600)) * ls;
                let len = (1 + rng.next_u64() % 512) * ls;
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                c.write_at(&b, off).unwrap();
                model2[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
            c.write_zeroes(5 * MIB, MIB, true).unwrap();
            model2[5 << 20..6 << 20].fill(0);
            c.write_zeroes(7 * MIB, 8192, false).unwrap();
            model2[7 << 20..(7 << 20) + 8192].fill(0);
            c.flush().unwrap();
            assert_eq!(sha256_device(&c), sha(&model2));
        }
        let c = open_path(&cp2, false).unwrap();
        assert_eq!(sha256_device(&c), sha(&model2));
        assert_eq!(c.check().unwrap().corruptions(), 0);
        let (h, _, _) = libvhdi_read(&cp2, Some(&bp));
        assert_eq!(h, sha(&model2), "libvhdi in-place child, logical {logical}");
        // The parent is unchanged and its DataWriteGuid still matches.
        drop(c);
        assert_eq!(sha256_device(&parent), sha(&base));
    }
}

#[test]
fn qemu_made_images_read_and_written_in_place() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let size = 72 * MIB;
    let data = pattern(size, 21);
    let raw = dir.path().join("q.raw");
    std::fs::write(&raw, &data).unwrap();
    for (name, opts) in [
        ("qd.vhdx", "subformat=dynamic"),
        ("qf.vhdx", "subformat=fixed"),
        (
            "qz.vhdx",
            "subformat=dynamic,block_state_zero=off,block_size=1M",
        ),
        // 72 MiB in 32 MiB blocks: qemu ends the file 8 MiB into the last block.
        (
            "qp.vhdx",
            "subformat=fixed,block_state_zero=off,block_size=32M",
        ),
    ] {
        let p = dir.path().join(name);
        let (code, out, err) = run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vhdx", "-o", opts])
            .arg(&raw)
            .arg(&p));
        assert_eq!(code, 0, "{out} {err}");
        let img = open_path(&p, false).unwrap();
        assert_eq!(sha256_device(&img), sha(&data), "{name}");
        drop(img);
        // Write over it in place, then let qemu check and compare.
        let mut model = data.clone();
        {
            let img = open_path(&p, true).unwrap();
            let mut rng = TestRng::new(33);
            for _ in 0..20 {
                let off = (rng.next_u64() % (size / 512 - 300)) * 512;
                let len = (1 + rng.next_u64() % 256) * 512;
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                img.write_at(&b, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
            img.write_zeroes(0, 16 * MIB, true).unwrap();
            model[..16 << 20].fill(0);
            img.flush().unwrap();
        }
        let raw2 = dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw2, &model).unwrap();
        qemu_check(&p);
        qemu_compare(&raw2, &p);
        let img = open_path(&p, false).unwrap();
        assert_eq!(img.check().unwrap().corruptions(), 0);
    }
}

/// Reads `len` bytes at each offset with pyvhdi.
fn libvhdi_at(path: &Path, parent: Option<&Path>, offs: &[u64], len: u64) -> Vec<String> {
    let script = r#"
import hashlib, sys, pyvhdi
f = pyvhdi.file(); f.open(sys.argv[1])
if sys.argv[2] != "-":
    p = pyvhdi.file(); p.open(sys.argv[2]); f.set_parent(p)
n = int(sys.argv[3])
for o in sys.argv[4:]:
    print(hashlib.sha256(f.read_buffer_at_offset(n, int(o))).hexdigest())
"#;
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c").arg(script).arg(path);
    cmd.arg(
        parent
            .map(|p| p.as_os_str().to_owned())
            .unwrap_or_else(|| "-".into()),
    );
    cmd.arg(len.to_string());
    for o in offs {
        cmd.arg(o.to_string());
    }
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 0, "pyvhdi failed: {out} {err}");
    out.lines().map(str::to_string).collect()
}

#[test]
fn beyond_first_chunk_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let size = 5u64 << 30;
    let g4 = 4u64 << 30;
    let offs = [
        0,
        g4 - 4096,
        g4 + 8192,
        g4 + MIB + 512,
        g4 + 515 * MIB,
        size - 8192,
    ];
    let bp = dir.path().join("big.vhdx");
    {
        let st = FileStorage::create_new(&bp).unwrap();
        let mut w = VhdxWriter::new(
            Box::new(st),
            CreateOptions {
                size,
                block_size: MIB,
                ..CreateOptions::default()
            },
            &Limits::default(),
        )
        .unwrap();
        for (i, o) in offs.iter().enumerate() {
            let b = vec![i as u8 + 1; 8192];
            w.write_data(*o, &b).unwrap();
        }
        Box::new(w).finish().unwrap();
    }
    qemu_check(&bp);
    // qemu-img compare reads the whole sparse raw file (slow); convert and compare the pieces.
    let back = dir.path().join("back.raw");
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&bp)
        .arg(&back));
    assert_eq!(code, 0, "{out} {err}");
    {
        use std::os::unix::fs::FileExt;
        let g = std::fs::File::open(&back).unwrap();
        assert_eq!(g.metadata().unwrap().len(), size);
        for (i, o) in offs.iter().enumerate() {
            let mut b = vec![0u8; 8192];
            g.read_exact_at(&mut b, *o).unwrap();
            assert!(b.iter().all(|&x| x == i as u8 + 1), "qemu reads piece {i}");
        }
    }
    let base = open_path(&bp, false).unwrap();
    // A differencing child written in place across the chunk boundary.
    let cp = dir.path().join("big-child.vhdx");
    let st = FileStorage::create_new(&cp).unwrap();
    vhdx::create(
        &st,
        &CreateOptions {
            block_size: MIB,
            parent: Some(parent_link(&base, ".\\big.vhdx")),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    drop(st);
    {
        let c = open_path(&cp, true).unwrap();
        for o in offs {
            c.write_at(&[0xEE; 1024], o + 2048).unwrap();
        }
        c.flush().unwrap();
    }
    let c = open_path(&cp, false).unwrap();
    let ours: Vec<String> = offs
        .iter()
        .map(|o| {
            let mut b = vec![0u8; 8192];
            c.read_at(&mut b, *o).unwrap();
            assert_eq!(&b[2048..3072], &[0xEE; 1024][..]);
            sha(&b)
        })
        .collect();
    assert_eq!(libvhdi_at(&cp, Some(&bp), &offs, 8192), ours);
    assert_eq!(c.check().unwrap().corruptions(), 0);
}

#[test]
fn vhdiinfo_agrees_on_identity() {
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("p.vhdx");
    let st = FileStorage::create_new(&bp).unwrap();
    vhdx::create(
        &st,
        &CreateOptions {
            size: 64 * MIB,
            logical: 4096,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    drop(st);
    let parent = open_path(&bp, false).unwrap();
    let cp = dir.path().join("c.avhdx");
    let st = FileStorage::create_new(&cp).unwrap();
    vhdx::create(
        &st,
        &CreateOptions {
            logical: 4096,
            parent: Some(parent_link(&parent, ".\\p.vhdx")),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    drop(st);
    let child = open_path(&cp, false).unwrap();
    let out = vhdiinfo(&cp);
    let field = |name: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("Disk type"), "Differential");
    assert_eq!(field("Identifier"), child.data_write_guid().to_string());
    assert_eq!(
        field("Parent identifier"),
        parent.data_write_guid().to_string()
    );
    assert!(field("Bytes per sector").starts_with("4096"));
    assert!(field("Media size").contains("67108864"));
}

#[test]
fn huge_64tib_1mib_blocks_paged_bat() {
    // 64 TiB with 1 MiB blocks: 512 MiB of BAT, more than the cache and allocation limits.
    let dir = tempfile::tempdir().unwrap();
    let size = 64u64 << 40;
    let p = dir.path().join("huge.vhdx");
    let st = FileStorage::create_new(&p).unwrap();
    vhdx::create(
        &st,
        &CreateOptions {
            size,
            block_size: MIB,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    drop(st);
    let offs = [0, 5u64 << 40, size - 4096];
    {
        let img = open_path(&p, true).unwrap();
        assert!(img.bat_is_paged());
        for (i, o) in offs.iter().enumerate() {
            img.write_at(&[i as u8 + 1; 4096], *o).unwrap();
        }
        img.flush().unwrap();
    }
    let img = open_path(&p, false).unwrap();
    for (i, o) in offs.iter().enumerate() {
        let mut b = [0u8; 4096];
        img.read_at(&mut b, *o).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1));
        let e = img.block_status(*o, 4096).unwrap();
        assert_eq!(e.kind, ExtentKind::Data);
    }
    let e = img.block_status(4096 * 256, size).unwrap();
    assert_ne!(e.kind, ExtentKind::Data);
    assert_eq!(img.check().unwrap().corruptions(), 0);
    // The sequential writer makes the same kind of image without holding the BAT in memory.
    let wp = dir.path().join("huge-w.vhdx");
    let mut w = VhdxWriter::new(
        Box::new(FileStorage::create_new(&wp).unwrap()),
        CreateOptions {
            size,
            block_size: MIB,
            ..CreateOptions::default()
        },
        &Limits::default(),
    )
    .unwrap();
    for (i, o) in offs.iter().enumerate() {
        w.write_data(*o, &[i as u8 + 1; 4096]).unwrap();
    }
    Box::new(w).finish().unwrap();
    let img = open_path(&wp, false).unwrap();
    for (i, o) in offs.iter().enumerate() {
        let mut b = [0u8; 4096];
        img.read_at(&mut b, *o).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1));
    }
}
