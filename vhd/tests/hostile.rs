//! hostile-inputs.md V1-V20: one named test each, asserting the error kind and field.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use blockdev::{BlockDevice, DenyGate, Error, ErrorKind, Limits, MemStorage, Severity};
use common::{open_mem, params};
use vhd::format::{DynHeader, Footer, PLAT_W2KU, PLAT_W2RU};
use vhd::{create, CreateOptions, ParentLink, Subformat, VhdImage};

const MB: u64 = 1 << 20;

fn image(size: u64, sub: Subformat) -> Vec<u8> {
    let m = MemStorage::new();
    let mut o = CreateOptions::dynamic(size);
    o.subformat = sub;
    o.block_size = 1 << 20;
    create(&m, &o).unwrap();
    m.to_vec()
}

fn diff_image(size: u64) -> Vec<u8> {
    let m = MemStorage::new();
    let mut o = CreateOptions::dynamic(size);
    o.block_size = 1 << 20;
    o.parent = Some(ParentLink {
        uuid: [7; 16],
        timestamp: 0,
        size,
        absolute: "C:\\vms\\base.vhd".into(),
        relative: "base.vhd".into(),
    });
    create(&m, &o).unwrap();
    m.to_vec()
}

/// Applies `f` to the footer (both copies when the image is dynamic) and fixes checksums.
fn edit_footer(v: &mut [u8], f: impl Fn(&mut Footer)) {
    let tail = v.len() - 512;
    let mut ft = Footer::parse(v[tail..].try_into().unwrap());
    f(&mut ft);
    let b = ft.to_bytes();
    v[tail..].copy_from_slice(&b);
    if &v[..8] == b"conectix" {
        v[..512].copy_from_slice(&b);
    }
}

fn edit_header(v: &mut [u8], f: impl Fn(&mut DynHeader)) {
    let mut h = DynHeader::parse(v[512..1536].try_into().unwrap());
    f(&mut h);
    let b = h.to_bytes();
    v[512..1536].copy_from_slice(&b);
}

fn err(v: Vec<u8>) -> Error {
    open_mem(v, false).unwrap_err()
}

fn assert_err(e: &Error, kind: ErrorKind, field: &str) {
    assert_eq!(e.kind(), kind, "{e}");
    assert_eq!(e.field(), Some(field), "{e}");
}

#[test]
fn v01_file_too_small() {
    assert_err(&err(vec![0; 100]), ErrorKind::InvalidFormat, "footer");
    assert_err(
        &err(vec![0; 4096]),
        ErrorKind::InvalidFormat,
        "footer.cookie",
    );
}

#[test]
fn v02_footer_missing_copy_present() {
    let mut v = image(4 * MB, Subformat::Dynamic);
    let n = v.len();
    v[n - 512..].fill(0);
    let img = open_mem(v.clone(), false).unwrap();
    assert!(img.warnings().iter().any(|w| w.contains("footer missing")));
    assert_eq!(img.size(), 4 * MB);
    let rep = img.check().unwrap();
    assert!(rep
        .findings
        .iter()
        .any(|f| f.field == "footer" && f.severity == Severity::Corruption));
    assert_err(
        &open_mem(v, true).unwrap_err(),
        ErrorKind::Corrupt,
        "footer",
    );
}

#[test]
fn v03_legacy_511_byte_footer_refused() {
    let mut v = image(MB, Subformat::Fixed);
    v.pop();
    assert_err(&err(v), ErrorKind::Unsupported, "footer");
}

#[test]
fn v04_footer_checksum() {
    let mut v = image(MB, Subformat::Fixed);
    let n = v.len();
    v[n - 512 + 64] ^= 1;
    assert_err(&err(v.clone()), ErrorKind::Corrupt, "footer.checksum");
    v[n - 512 + 64..n - 512 + 68].fill(0);
    assert_err(&err(v), ErrorKind::Corrupt, "footer.checksum");
}

#[test]
fn v05_footer_copy_mismatch() {
    let mut v = image(4 * MB, Subformat::Dynamic);
    let mut copy = Footer::parse(v[..512].try_into().unwrap());
    copy.timestamp ^= 0x55;
    v[..512].copy_from_slice(&copy.to_bytes());
    let img = open_mem(v, false).unwrap();
    assert!(img.warnings().iter().any(|w| w.contains("differs")));
    let rep = img.check().unwrap();
    assert!(
        rep.findings.iter().any(|f| f.field == "footer_copy"),
        "{:?}",
        rep.findings
    );
}

#[test]
fn v06_file_format_version() {
    let mut v = image(MB, Subformat::Fixed);
    edit_footer(&mut v, |f| f.version = 0x0002_0000);
    assert_err(
        &err(v.clone()),
        ErrorKind::Unsupported,
        "footer.file_format_version",
    );
    edit_footer(&mut v, |f| f.version = 0x0001_0001);
    let img = open_mem(v, false).unwrap();
    assert!(img.warnings().iter().any(|w| w.contains("minor version")));
}

#[test]
fn v07_disk_type() {
    for t in [0u32, 1, 5, 6, 0xffff_ffff] {
        let mut v = image(MB, Subformat::Fixed);
        edit_footer(&mut v, |f| f.disk_type = t);
        assert_err(&err(v), ErrorKind::Corrupt, "footer.disk_type");
    }
    // Differencing needs a parent: the default gate opens nothing.
    let e = err(diff_image(2 * MB));
    assert_eq!(e.kind(), ErrorKind::BackingDenied, "{e}");
}

#[test]
fn v08_data_offset() {
    let mut v = image(MB, Subformat::Fixed);
    edit_footer(&mut v, |f| f.data_offset = 512);
    assert_err(&err(v), ErrorKind::Corrupt, "footer.data_offset");
    for off in [0u64, 513, 1 << 40, 4 * MB] {
        let mut v = image(4 * MB, Subformat::Dynamic);
        edit_footer(&mut v, |f| f.data_offset = off);
        assert_err(&err(v), ErrorKind::Corrupt, "footer.data_offset");
    }
    let mut v = image(4 * MB, Subformat::Dynamic);
    v[512..520].copy_from_slice(b"cxsparsX");
    assert_err(&err(v), ErrorKind::InvalidFormat, "dynamic_header.cookie");
}

#[test]
fn v09_size_rule_by_creator() {
    // 10 MiB: CHS 301/4/17 = 10479616 bytes.
    let cases: [(&[u8; 4], bool, u64); 8] = [
        (b"vpc ", false, 10479616),
        (b"qemu", false, 10479616),
        (b"qemu", true, 10 * MB),
        (b"win ", false, 10 * MB),
        (b"d2v\0", false, 10 * MB),
        (b"tap\0", false, 10 * MB),
        (b"wa\0\0", false, 10 * MB),
        (b"vdcv", false, 10 * MB),
    ];
    for (app, max, size) in cases {
        let mut v = image(10 * MB, Subformat::Dynamic);
        edit_footer(&mut v, |f| {
            f.creator_app = *app;
            if max {
                f.geometry = vhd::format::MAX_CHS;
            }
        });
        let img = open_mem(v.clone(), false).unwrap();
        assert_eq!(img.size(), size, "{app:?}");
        let info = img.info();
        assert_eq!(info.format_specific["current_size"], 10 * MB);
        let rule = if size == 10 * MB { "current" } else { "chs" };
        assert_eq!(info.format_specific["size_rule"], rule);
    }
}

#[test]
fn v10_size_over_2040_gib() {
    let mut v = image(4 * MB, Subformat::Dynamic);
    edit_footer(&mut v, |f| f.current_size = 3 << 40);
    assert_err(&err(v), ErrorKind::Unsupported, "footer.current_size");
}

#[test]
fn v11_fixed_size_larger_than_file() {
    let mut v = image(MB, Subformat::Fixed);
    edit_footer(&mut v, |f| f.current_size = 2 * MB);
    assert_err(&err(v), ErrorKind::Corrupt, "footer.current_size");
}

#[test]
fn v12_dynamic_header_checksum_and_version() {
    let mut v = image(4 * MB, Subformat::Dynamic);
    v[512 + 40] ^= 1;
    assert_err(&err(v), ErrorKind::Corrupt, "dynamic_header.checksum");
    let mut v = image(4 * MB, Subformat::Dynamic);
    edit_header(&mut v, |h| h.version = 0x0002_0000);
    assert_err(
        &err(v),
        ErrorKind::Unsupported,
        "dynamic_header.header_version",
    );
}

#[test]
fn v13_block_size() {
    for bs in [0u32, 128, 0x1234_5678, 1 << 29, 3 << 20] {
        let mut v = image(4 * MB, Subformat::Dynamic);
        edit_header(&mut v, |h| h.block_size = bs);
        assert_err(&err(v), ErrorKind::Corrupt, "dynamic_header.block_size");
    }
}

#[test]
fn v14_max_table_entries() {
    let mut v = image(4 * MB, Subformat::Dynamic);
    edit_header(&mut v, |h| h.max_table_entries = 0x4000_0001);
    assert_err(
        &err(v),
        ErrorKind::Corrupt,
        "dynamic_header.max_table_entries",
    );
    let mut v = image(4 * MB, Subformat::Dynamic);
    edit_header(&mut v, |h| h.max_table_entries = 3);
    assert_err(
        &err(v),
        ErrorKind::Corrupt,
        "dynamic_header.max_table_entries",
    );
    // The BAT allocation is bounded by the limits.
    let v = image(1 << 40, Subformat::Dynamic);
    let mut limits = Limits::default();
    limits.max_alloc = 1024;
    let mut p = params(&DenyGate, false, None);
    p.limits = limits;
    let e = VhdImage::open(Box::new(MemStorage::from_vec(v)), &p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
}

#[test]
fn v15_bat_offset() {
    for off in [1537u64, 512, 0, 1 << 40] {
        let mut v = image(4 * MB, Subformat::Dynamic);
        edit_header(&mut v, |h| h.table_offset = off);
        assert_err(&err(v), ErrorKind::Corrupt, "dynamic_header.table_offset");
    }
}

fn write_bat(v: &mut [u8], i: usize, e: u32) {
    let o = 1536 + 4 * i;
    v[o..o + 4].copy_from_slice(&e.to_be_bytes());
}

#[test]
fn v16_bat_entries() {
    let base = {
        let m = std::sync::Arc::new(MemStorage::new());
        let mut o = CreateOptions::dynamic(4 * MB);
        o.block_size = 1 << 20;
        create(m.as_ref(), &o).unwrap();
        let img = VhdImage::open(Box::new(m.clone()), &params(&DenyGate, true, None)).unwrap();
        img.write_at(&[1u8; 4096], 0).unwrap();
        img.write_at(&[2u8; 4096], MB).unwrap();
        drop(img);
        m.to_vec()
    };
    let first = u32::from_be_bytes(base[1536..1540].try_into().unwrap());
    for (entry, what) in [
        (0xFFFF_0000u32, "past the end"),
        (1, "overlaps"),
        (0, "overlaps"),
        (first, "another block"),
    ] {
        let mut v = base.clone();
        write_bat(&mut v, 1, entry);
        let img = open_mem(v.clone(), false).unwrap();
        let mut buf = vec![0u8; 512];
        let e = img.read_at(&mut buf, MB).unwrap_err();
        assert_err(&e, ErrorKind::Corrupt, "bat_entry[1]");
        assert!(e.message().contains(what), "{e}");
        let rep = img.check().unwrap();
        assert!(rep.findings.iter().any(|f| f.field == "bat_entry[1]"));
        let e = open_mem(v, true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.field().unwrap().starts_with("bat_entry["), "{e}");
    }
}

#[test]
fn v17_bitmap_bits() {
    // Dynamic: a clear bit does not hide data (qemu's reading).
    let m = std::sync::Arc::new(MemStorage::new());
    let mut o = CreateOptions::dynamic(2 * MB);
    o.block_size = 1 << 20;
    create(m.as_ref(), &o).unwrap();
    let img = VhdImage::open(Box::new(m.clone()), &params(&DenyGate, true, None)).unwrap();
    img.write_at(&[9u8; 1024], 0).unwrap();
    drop(img);
    let mut v = m.to_vec();
    let at = u32::from_be_bytes(v[1536..1540].try_into().unwrap()) as usize * 512;
    v[at..at + 512].fill(0);
    let img = open_mem(v, false).unwrap();
    let mut buf = [0u8; 1024];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [9u8; 1024]);
    // Differencing: a clear bit reads the parent (LSB-first and MSB-first orders are in the
    // unit tests of format.rs; proptest covers the in-place path).
}

#[test]
fn v18_hostile_parent_locators() {
    let mut v = diff_image(2 * MB);
    let len = v.len() as u64;
    // Slot 0: W2ku "/etc/shadow"; slot 1: W2ru "..\..\x.vhd"; slot 2: data_length > space;
    // slot 3: offset past EOF; slot 4: odd UTF-16 length; slot 5: unknown code.
    let mut h = DynHeader::parse(v[512..1536].try_into().unwrap());
    let l0 = h.locators[0];
    let l1 = h.locators[1];
    let path0: Vec<u8> = "/etc/shadow"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let path1: Vec<u8> = "..\\..\\x.vhd"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    v[l0.data_offset as usize..l0.data_offset as usize + 512].fill(0);
    v[l0.data_offset as usize..][..path0.len()].copy_from_slice(&path0);
    v[l1.data_offset as usize..l1.data_offset as usize + 512].fill(0);
    v[l1.data_offset as usize..][..path1.len()].copy_from_slice(&path1);
    h.locators[0].data_length = path0.len() as u32;
    h.locators[1].data_length = path1.len() as u32;
    h.locators[2] = l0;
    h.locators[2].data_length = 100_000;
    h.locators[3] = l0;
    h.locators[3].data_offset = len + 4096;
    h.locators[4] = l1;
    h.locators[4].data_length = 7;
    h.locators[5] = l1;
    h.locators[5].code = 0x1234_5678;
    assert_eq!(h.locators[0].code, PLAT_W2KU);
    assert_eq!(h.locators[1].code, PLAT_W2RU);
    v[512..1536].copy_from_slice(&h.to_bytes());
    // Never followed without a gate.
    let e = open_mem(v.clone(), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BackingDenied, "{e}");
    assert!(e.to_string().contains("/etc/shadow") && e.to_string().contains("../../x.vhd"));
    // With the reference left unresolved, info reports every locator.
    let gate = common::DirGate {
        skip: true,
        ignore_id: false,
        ..common::DirGate::new()
    };
    let img = VhdImage::open(
        Box::new(MemStorage::from_vec(v)),
        &params(&gate, false, None),
    )
    .unwrap();
    let info = img.info();
    let locs = info.format_specific["parent_locators"].as_array().unwrap();
    assert_eq!(locs.len(), 6);
    assert_eq!(locs[0]["path"], "/etc/shadow");
    for l in &locs[2..] {
        assert!(l["error"].is_string(), "{l}");
    }
    let rep = img.check().unwrap();
    assert_eq!(
        rep.findings
            .iter()
            .filter(|f| f.field.starts_with("parent_locator"))
            .count(),
        4
    );
    let mut buf = [0u8; 512];
    assert_eq!(
        img.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::BackingNotFound
    );
}

#[test]
fn v19_zero_parent_uuid() {
    let mut v = diff_image(2 * MB);
    edit_header(&mut v, |h| h.parent_uuid = [0; 16]);
    assert_err(&err(v), ErrorKind::Corrupt, "dynamic_header.parent_uuid");
}

#[test]
fn v20_saved_state_and_trailing_garbage() {
    let mut v = image(4 * MB, Subformat::Dynamic);
    edit_footer(&mut v, |f| f.saved_state = 1);
    let img = open_mem(v.clone(), false).unwrap();
    assert!(img.warnings().iter().any(|w| w.contains("saved-state")));
    assert_err(
        &open_mem(v, true).unwrap_err(),
        ErrorKind::ReadOnly,
        "footer.saved_state",
    );
    let mut v = image(4 * MB, Subformat::Dynamic);
    v.extend_from_slice(&[0x5a; 700]);
    let img = open_mem(v, false).unwrap();
    assert!(img.warnings().iter().any(|w| w.contains("footer missing")));
}
