//! `check` finds leaks, corruptions, COPIED mismatches, overlaps and references past EOF;
//! `repair_leaks` fixes leaks so that qemu-img check is clean.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;

use blockdev::{BlockDevice, FileStorage, ImageWriter, Severity};
use qcow2::{CreateOptions, Header, Qcow2Writer};

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

struct Layout {
    bytes: Vec<u8>,
    l2: usize,
    data: usize,
    l1: usize,
    block: usize,
}

fn make(path: &Path) -> Layout {
    let _ = std::fs::remove_file(path);
    let st = FileStorage::create_new(path).unwrap();
    let mut w = Box::new(
        Qcow2Writer::new(
            Box::new(st),
            CreateOptions {
                size: 4 << 20,
                ..CreateOptions::default()
            },
        )
        .unwrap(),
    );
    w.write_data(0, &vec![0x5au8; 1 << 20]).unwrap();
    w.finish().unwrap();
    let bytes = std::fs::read(path).unwrap();
    let h = Header::read(&blockdev::MemStorage::from_vec(bytes.clone())).unwrap();
    let l1 = h.l1_table_offset as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (be64(&bytes, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    let block = be64(&bytes, h.refcount_table_offset as usize) as usize;
    Layout {
        bytes,
        l2,
        data,
        l1,
        block,
    }
}

fn check_of(path: &Path, bytes: &[u8]) -> blockdev::CheckReport {
    std::fs::write(path, bytes).unwrap();
    common::open(path).check().unwrap()
}

#[test]
fn finds_leak_and_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let mut l = make(&p);
    let c = l.data / 65536;
    l.bytes[l.block + c * 2..l.block + c * 2 + 2].copy_from_slice(&2u16.to_be_bytes());
    let rep = check_of(&p, &l.bytes);
    assert_eq!(rep.leaks(), 1, "{:?}", rep.findings);
    assert_eq!(
        rep.corruptions(),
        1,
        "COPIED set with refcount 2: {:?}",
        rep.findings
    );
    // A pure leak: a cluster past the used area with refcount 1.
    let mut l = make(&p);
    let free = l.bytes.len().div_ceil(65536) + 1;
    l.bytes.resize((free + 1) * 65536, 0);
    l.bytes[l.block + free * 2..l.block + free * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    let rep = check_of(&p, &l.bytes);
    assert_eq!(rep.corruptions(), 0, "{:?}", rep.findings);
    assert!(rep.leaks() >= 1);
    let (rc, out, _) =
        common::qemu_img(&["check", "--output=json", "-f", "qcow2", p.to_str().unwrap()]);
    assert_eq!(rc, 3, "qemu-img sees the leak too");
    let q: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        rep.stats["image_end_offset"], q["image-end-offset"],
        "the end counts the leaked cluster, as qemu-img's does"
    );
    let fixed = qcow2::repair_leaks(Box::new(FileStorage::open(&p, true).unwrap())).unwrap();
    assert!(fixed >= 1);
    common::qemu_check_clean(&p);
    assert!(common::open(&p).check().unwrap().findings.is_empty());
}

#[test]
fn refcounts_past_the_end_of_the_file_are_leaks_that_repair_clears() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.qcow2");
    let mut l = make(&p);
    // Two clusters past the end of the file, with refcount 1 (the block covers them).
    let past = l.bytes.len().div_ceil(65536) + 20;
    for c in [past, past + 1] {
        l.bytes[l.block + c * 2..l.block + c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let rep = check_of(&p, &l.bytes);
    assert_eq!(rep.corruptions(), 0, "{:?}", rep.findings);
    assert_eq!(rep.leaks(), 2, "{:?}", rep.findings);
    assert_eq!(rep.stats["leaked_clusters"], 2, "{:?}", rep.stats);
    let fixed = qcow2::repair_leaks(Box::new(FileStorage::open(&p, true).unwrap())).unwrap();
    assert_eq!(fixed, 2);
    let rep = common::open(&p).check().unwrap();
    assert!(rep.findings.is_empty(), "{:?}", rep.findings);
    common::qemu_check_clean(&p);
}

/// An L2 table shared by the active L1 table and a snapshot's has refcount 2: not an overlap.
/// A leak beside it is repaired.
#[test]
fn images_with_snapshots_check_clean_and_repair() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    let ps = p.to_str().unwrap();
    common::qemu_create(&[ps, "4M"]);
    common::qemu_io(&p, "qcow2", &["write -P 1 0 64k", "write -P 2 1M 128k"]);
    let (rc, _, err) = common::qemu_img(&["snapshot", "-c", "s1", ps]);
    assert_eq!(rc, 0, "{err}");
    common::qemu_io(&p, "qcow2", &["write -P 3 2M 64k"]);
    let (rc, _, err) = common::qemu_img(&["snapshot", "-c", "s2", ps]);
    assert_eq!(rc, 0, "{err}");
    common::qemu_check_clean(&p);
    let rep = common::open(&p).check().unwrap();
    assert!(rep.findings.is_empty(), "{:?}", rep.findings);
    // A leaked cluster past the used area.
    let mut bytes = std::fs::read(&p).unwrap();
    let h = Header::read(&blockdev::MemStorage::from_vec(bytes.clone())).unwrap();
    let block = be64(&bytes, h.refcount_table_offset as usize) as usize;
    let free = bytes.len().div_ceil(65536);
    bytes.resize((free + 1) * 65536, 0);
    bytes[block + free * 2..block + free * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    let rep = check_of(&p, &bytes);
    assert_eq!(rep.corruptions(), 0, "{:?}", rep.findings);
    assert_eq!(rep.leaks(), 1, "{:?}", rep.findings);
    let fixed = qcow2::repair_leaks(Box::new(FileStorage::open(&p, true).unwrap())).unwrap();
    assert_eq!(fixed, 1);
    common::qemu_check_clean(&p);
}

#[test]
fn finds_corruptions() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    // Refcount 0 for a used cluster.
    let mut l = make(&p);
    let c = l.data / 65536;
    l.bytes[l.block + c * 2..l.block + c * 2 + 2].copy_from_slice(&0u16.to_be_bytes());
    let rep = check_of(&p, &l.bytes);
    assert!(rep.findings.iter().any(
        |f| f.severity == Severity::Corruption && f.message.contains("refcount=0 reference=1")
    ));
    // Counted as qemu-img counts it: the refcount, and COPIED set on a refcount of 0.
    let (_, out, _) =
        common::qemu_img(&["check", "--output=json", "-f", "qcow2", p.to_str().unwrap()]);
    let q: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        rep.corruptions() as u64,
        q["corruptions"].as_u64().unwrap(),
        "{:?}",
        rep.findings
    );
    // COPIED flag cleared.
    let mut l = make(&p);
    l.bytes[l.l2] &= 0x7f;
    let rep = check_of(&p, &l.bytes);
    assert!(
        rep.findings
            .iter()
            .any(|f| f.message.contains("OFLAG_COPIED")),
        "{:?}",
        rep.findings
    );
    // Past EOF and overlap with the L1 table, reported together.
    let mut l = make(&p);
    l.bytes[l.l2 + 8..l.l2 + 16].copy_from_slice(&((1u64 << 63) | (1 << 40)).to_be_bytes());
    l.bytes[l.l2 + 16..l.l2 + 24].copy_from_slice(&((1u64 << 63) | l.l1 as u64).to_be_bytes());
    let rep = check_of(&p, &l.bytes);
    assert!(
        rep.findings
            .iter()
            .any(|f| f.message.contains("past the end")),
        "{:?}",
        rep.findings
    );
    assert!(
        rep.findings
            .iter()
            .any(|f| f.message.contains("overlapping")),
        "{:?}",
        rep.findings
    );
    // Writing into the hostile image is refused, never into the L1 table.
    let img = common::open_rw(&p);
    let e = img.write_at(&[1u8; 512], 2 * 65536).unwrap_err();
    assert_eq!(e.kind(), blockdev::ErrorKind::Corrupt);
}

#[test]
fn info_lists_facts() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("i.qcow2");
    common::qemu_create(&[
        "-o",
        "lazy_refcounts=on,compression_type=zstd,refcount_bits=8",
        p.to_str().unwrap(),
        "1G",
    ]);
    let info = common::open(&p).info();
    let f = &info.format_specific;
    assert_eq!(f["version"], 3);
    assert_eq!(f["refcount_bits"], 8);
    assert_eq!(f["compression_type"], "zstd");
    assert_eq!(f["lazy_refcounts"], true);
    assert_eq!(f["dirty"], false);
    assert!(f["incompatible_features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == "compression type"));
    assert_eq!(info.cluster_size, Some(65536));
    assert_eq!(info.virtual_size, 1 << 30);
}

/// Errors about an entry that points past the end of the file name the entry's own offset.
#[test]
fn errors_name_the_offset_of_the_entry_not_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.qcow2");
    let mut l = make(&p);
    // The second L2 entry points 16 MiB into a file far shorter.
    l.bytes[l.l2 + 8..l.l2 + 16].copy_from_slice(&((1u64 << 63) | (16 << 20)).to_be_bytes());
    std::fs::write(&p, &l.bytes).unwrap();
    let img = common::open(&p);
    let mut b = vec![0u8; 65536];
    let e = img.read_at(&mut b, 65536).unwrap_err();
    assert_eq!(e.field(), Some("l2_entry"), "{e}");
    assert_eq!(e.offset(), Some(l.l2 as u64 + 8), "{e}");
    // An L1 entry pointing past the end.
    let mut l = make(&p);
    l.bytes[l.l1..l.l1 + 8].copy_from_slice(&((1u64 << 63) | (64 << 20)).to_be_bytes());
    std::fs::write(&p, &l.bytes).unwrap();
    let img = common::open(&p);
    let e = img.read_at(&mut b, 0).unwrap_err();
    assert_eq!(e.field(), Some("l1_entry"), "{e}");
    assert_eq!(e.offset(), Some(l.l1 as u64), "{e}");
}

/// A file cut short under its references: those references are the corruption; the refcounts
/// of the clusters they name are neither leaks nor COPIED mismatches, and findings are capped.
#[test]
fn references_past_a_truncated_end_are_corruption_not_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let ps = p.to_str().unwrap();
    common::qemu_create(&["-o", "preallocation=metadata", ps, "64M"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let rep = common::open(&p).check().unwrap();
    assert!(
        rep.corruptions() > 0 && rep.corruptions() <= 101,
        "{}",
        rep.corruptions()
    );
    assert_eq!(rep.leaks(), 0, "{:?}", &rep.findings[..3]);
    assert_eq!(rep.stats["leaked_clusters"], 0);
    assert!(!rep
        .findings
        .iter()
        .any(|f| f.message.contains("OFLAG_COPIED")));
}

/// A refcount block whose entries name 32768 clusters past the end of the file: counted in
/// full, named 100 at a time.
#[test]
fn many_refcounts_past_the_end_are_counted_and_findings_capped() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.qcow2");
    let mut l = make(&p);
    let h = Header::read(&blockdev::MemStorage::from_vec(l.bytes.clone())).unwrap();
    // A second refcount block, all ones, covering clusters 32768..65535.
    let at = l.bytes.len().div_ceil(65536) * 65536;
    l.bytes.resize(at + 65536, 0xff);
    let rt = h.refcount_table_offset as usize;
    l.bytes[rt + 8..rt + 16].copy_from_slice(&(at as u64).to_be_bytes());
    // Its own refcount, so the image is otherwise sound.
    let c = at / 65536;
    l.bytes[l.block + c * 2..l.block + c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    let rep = check_of(&p, &l.bytes);
    assert_eq!(rep.corruptions(), 0, "{:?}", rep.findings);
    assert_eq!(rep.stats["leaked_clusters"], 32768);
    assert_eq!(rep.leaks(), 101, "100 named and one summary");
    let fixed = qcow2::repair_leaks(Box::new(FileStorage::open(&p, true).unwrap())).unwrap();
    assert_eq!(fixed, 32768);
    common::qemu_check_clean(&p);
}
