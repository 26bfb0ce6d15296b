//! Hostile inputs X1-X22 of hostile-inputs.md §4.3: one named test each, asserting the error
//! kind and the field named.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::{Arc, Mutex};

use blockdev::{
    BackingRequest, BlockDevice, Candidate, DenyGate, Error, ErrorKind, MemStorage, OpenGate,
    Result, Severity, Storage,
};
use common::{create_mem, link_of, open_with, read_all, DirGate, MemGate};
use vhdx::format::{crc32c, crc32c_without, Guid, BAT_REGION};
use vhdx::CreateOptions;

const MIB: usize = 1 << 20;
const H1: usize = 64 << 10;
const H2: usize = 128 << 10;
const R1: usize = 192 << 10;
const R2: usize = 256 << 10;
const META: usize = 2 * MIB;
const BAT: usize = 3 * MIB;

fn base() -> Vec<u8> {
    let b = create_mem(&CreateOptions {
        size: 16 * MIB as u64,
        block_size: MIB as u64,
        ..CreateOptions::default()
    });
    let m = Arc::new(MemStorage::from_vec(b));
    let img = open_with(Box::new(m.clone()), true, &DirGate::new(), 0).unwrap();
    img.write_at(&[0xAB; 4096], 0).unwrap();
    img.write_at(&[0xCD; 4096], 5 * MIB as u64).unwrap();
    img.flush().unwrap();
    drop(img);
    m.to_vec()
}

fn put32(v: &mut [u8], off: usize, x: u32) {
    v[off..off + 4].copy_from_slice(&x.to_le_bytes());
}
fn put64(v: &mut [u8], off: usize, x: u64) {
    v[off..off + 8].copy_from_slice(&x.to_le_bytes());
}
fn put16(v: &mut [u8], off: usize, x: u16) {
    v[off..off + 2].copy_from_slice(&x.to_le_bytes());
}
fn fix_headers(v: &mut [u8]) {
    for h in [H1, H2] {
        let c = crc32c_without(&v[h..h + 4096], 4);
        put32(v, h + 4, c);
    }
}
fn fix_regions(v: &mut [u8]) {
    for r in [R1, R2] {
        let c = crc32c_without(&v[r..r + 65536], 4);
        put32(v, r + 4, c);
    }
}
/// Applies `f` to both headers and fixes their checksums.
fn headers(v: &mut [u8], f: impl Fn(&mut [u8], usize)) {
    f(v, H1);
    f(v, H2);
    fix_headers(v);
}
/// Applies `f` to both region tables and fixes their checksums.
fn regions(v: &mut [u8], f: impl Fn(&mut [u8], usize)) {
    f(v, R1);
    f(v, R2);
    fix_regions(v);
}

fn open(v: Vec<u8>) -> Result<vhdx::VhdxImage> {
    open_with(
        Box::new(MemStorage::read_only(v)),
        false,
        &DirGate::new(),
        0,
    )
}

fn err(v: Vec<u8>) -> Error {
    match open(v) {
        Err(e) => e,
        Ok(_) => panic!("hostile image opened"),
    }
}

fn assert_err(v: Vec<u8>, kind: ErrorKind, field: &str) {
    let e = err(v);
    assert_eq!(e.kind(), kind, "{e}");
    let f = e.field().unwrap_or_default();
    assert!(
        f.contains(field),
        "field {f:?} does not name {field:?}: {e}"
    );
}

#[test]
fn x00_base_is_valid() {
    let img = open(base()).unwrap();
    assert_eq!(img.check().unwrap().findings.len(), 0);
}

#[test]
fn x01_bad_file_identifier() {
    let mut v = base();
    v[7] = b'x';
    assert_err(v, ErrorKind::InvalidFormat, "file_identifier.signature");
    assert_err(
        vec![0; 100],
        ErrorKind::InvalidFormat,
        "file_identifier.signature",
    );
}

#[test]
fn x02_no_valid_header() {
    let mut v = base();
    v[H1 + 200] ^= 1;
    v[H2 + 200] ^= 1;
    assert_err(v, ErrorKind::Corrupt, "header");
    let mut v = base();
    headers(&mut v, |v, h| v[h] = b'x');
    assert_err(v, ErrorKind::Corrupt, "header");
    let mut v = base();
    headers(&mut v, |v, h| put16(v, h + 66, 2));
    let e = err(v);
    assert_eq!(e.field(), Some("header"));
    assert!(e.to_string().contains("version 2"), "{e}");
    // One bad header is fine.
    let mut v = base();
    v[H1 + 200] ^= 1;
    let img = open(v).unwrap();
    assert!(img
        .check()
        .unwrap()
        .findings
        .iter()
        .any(|f| f.field == "header[1]"));
}

#[test]
fn x03_equal_sequence_numbers() {
    let mut v = base();
    let seq = u64::from_le_bytes(v[H1 + 8..H1 + 16].try_into().unwrap());
    put64(&mut v, H2 + 8, seq);
    v[H2 + 16] ^= 0xFF;
    fix_headers(&mut v);
    assert_err(v, ErrorKind::Corrupt, "header.sequence_number");
    // Byte-identical headers (Disk2vhd) are accepted.
    let mut v = base();
    let (a, b) = v.split_at_mut(H2);
    b[..4096].copy_from_slice(&a[H1..H1 + 4096]);
    open(v).unwrap();
}

#[test]
fn x04_sequence_number_max() {
    let mut v = base();
    put64(&mut v, H1 + 8, u64::MAX);
    fix_headers(&mut v);
    let img = open(v.clone()).unwrap();
    assert_eq!(read_all(&img)[0], 0xAB);
    let img = open_with(Box::new(MemStorage::from_vec(v)), true, &DirGate::new(), 0).unwrap();
    let e = img.write_at(&[1; 512], 0).unwrap_err();
    assert_eq!(e.field(), Some("header.sequence_number"), "{e}");
}

#[test]
fn x05_log_version_or_version() {
    let mut v = base();
    headers(&mut v, |v, h| put16(v, h + 64, 1));
    assert_err(v, ErrorKind::Corrupt, "header.log_version");
    let mut v = base();
    headers(&mut v, |v, h| put16(v, h + 66, 0));
    assert_err(v, ErrorKind::Corrupt, "header");
}

#[test]
fn x06_log_location() {
    let cases: [(usize, u64, &str); 4] = [
        (72, 512 << 10, "header.log_offset"),
        (72, (1 << 20) + 4096, "header.log_offset"),
        (72, 1 << 40, "header.log_offset"),
        (68, 4096, "header.log_length"),
    ];
    for (field_off, val, field) in cases {
        let mut v = base();
        headers(&mut v, |v, h| {
            if field_off == 72 {
                put64(v, h + 72, val)
            } else {
                put32(v, h + 68, val as u32)
            }
        });
        assert_err(v, ErrorKind::Corrupt, field);
    }
    // A log overlapping the metadata region.
    let mut v = base();
    headers(&mut v, |v, h| put64(v, h + 72, 2 << 20));
    assert_err(v, ErrorKind::Corrupt, "region_table.entry");
}

/// Writes a log entry that rewrites the BAT sector (block 2 takes block 5's host block, block 5
/// becomes ZERO) and sets the LogGuid of both headers.
fn dirty(v: &mut [u8], mutate: impl Fn(&mut Vec<u8>)) {
    let guid = Guid([0x42; 16]);
    let mut sector = v[BAT..BAT + 4096].to_vec();
    // Block 2 -> the host block of block 5 (same data visible twice).
    let e5 = u64::from_le_bytes(sector[40..48].try_into().unwrap());
    sector[16..24].copy_from_slice(&e5.to_le_bytes());
    sector[40..48].copy_from_slice(&2u64.to_le_bytes());
    let len = v.len() as u64;
    let mut e = vhdx::log::build_entry(&guid, 7, 0, 0, len, len, &[(BAT as u64, sector)]);
    mutate(&mut e);
    v[MIB..MIB + e.len()].copy_from_slice(&e);
    headers(v, |v, h| v[h + 48..h + 64].copy_from_slice(&guid.0));
}

fn recrc(e: &mut [u8]) {
    let len = u32::from_le_bytes(e[8..12].try_into().unwrap()) as usize;
    let len = len.min(e.len());
    let c = crc32c_without(&e[..len], 4);
    e[4..8].copy_from_slice(&c.to_le_bytes());
}

#[test]
fn x07_dirty_log_read_only_overlay() {
    let mut v = base();
    dirty(&mut v, |_| {});
    let store = Arc::new(MemStorage::read_only(v.clone()));
    let img = open_with(Box::new(store.clone()), false, &DirGate::new(), 0).unwrap();
    assert!(img.log_state().in_memory);
    let c = read_all(&img);
    assert_eq!(c[2 * MIB], 0xCD, "the replayed BAT entry is visible");
    assert_eq!(c[5 * MIB], 0, "the replayed ZERO entry is visible");
    assert_eq!(store.to_vec(), v, "the file is never written");
    assert!(img
        .check()
        .unwrap()
        .findings
        .iter()
        .any(|f| f.field == "log" && f.severity == Severity::Warning));
    // A read-write open replays to disk and empties the log.
    let m = Arc::new(MemStorage::from_vec(v));
    let img = open_with(Box::new(m.clone()), true, &DirGate::new(), 0).unwrap();
    assert_eq!(read_all(&img), c);
    drop(img);
    let img = open(m.to_vec()).unwrap();
    assert!(img.log_state().log_guid.is_zero());
    assert_eq!(read_all(&img), c);
}

#[test]
fn x08_invalid_log_entries_are_skipped() {
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let muts: Vec<(&str, Mutation)> = vec![
        ("bad crc", Box::new(|e: &mut Vec<u8>| e[100] ^= 1)),
        (
            "length not 4k",
            Box::new(|e: &mut Vec<u8>| {
                put32(e, 8, 8192 + 512);
                recrc(e)
            }),
        ),
        (
            "length 0",
            Box::new(|e: &mut Vec<u8>| {
                put32(e, 8, 0);
                recrc(e)
            }),
        ),
        (
            "length > log",
            Box::new(|e: &mut Vec<u8>| {
                put32(e, 8, 64 << 20);
            }),
        ),
        (
            "seq 0",
            Box::new(|e: &mut Vec<u8>| {
                put64(e, 16, 0);
                recrc(e)
            }),
        ),
        (
            "log guid",
            Box::new(|e: &mut Vec<u8>| {
                e[40] ^= 1;
                recrc(e)
            }),
        ),
        (
            "desc count",
            Box::new(|e: &mut Vec<u8>| {
                put32(e, 24, 100_000);
                recrc(e)
            }),
        ),
        (
            "desc seq",
            Box::new(|e: &mut Vec<u8>| {
                put64(e, 64 + 24, 99);
                recrc(e)
            }),
        ),
        (
            "desc offset",
            Box::new(|e: &mut Vec<u8>| {
                put64(e, 64 + 16, (3 << 20) + 512);
                recrc(e)
            }),
        ),
        (
            "data seq",
            Box::new(|e: &mut Vec<u8>| {
                put32(e, 4096 + 4092, 1);
                recrc(e)
            }),
        ),
    ];
    for (name, m) in muts {
        let mut v = base();
        dirty(&mut v, m);
        let img = open(v).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.log_state().replayed, 0, "{name}");
        assert!(img.log_state().guid_without_entries, "{name}");
        assert_eq!(read_all(&img)[2 * MIB], 0, "{name}: nothing replayed");
    }
}

#[test]
fn x09_flushed_file_offset_past_eof() {
    let mut v = base();
    dirty(&mut v, |e| {
        put64(e, 48, 1 << 40);
        recrc(e)
    });
    assert_err(v, ErrorKind::Corrupt, "flushed_file_offset");
}

#[test]
fn x10_huge_zero_descriptor_and_last_file_offset() {
    let mut v = base();
    dirty(&mut v, |e| {
        put64(e, 56, 1 << 62);
        recrc(e)
    });
    assert_err(v, ErrorKind::Corrupt, "last_file_offset");
    // The data descriptor turned into a zero descriptor of 2^62 bytes.
    let mut v = base();
    dirty(&mut v, |e| {
        e[64..68].copy_from_slice(b"zero");
        put32(e, 68, 0);
        put64(e, 72, 1 << 62);
        recrc(e)
    });
    assert_err(v, ErrorKind::Corrupt, "descriptor");
    // A zero descriptor into the headers.
    let mut v = base();
    dirty(&mut v, |e| {
        e[64..68].copy_from_slice(b"zero");
        put32(e, 68, 0);
        put64(e, 72, 4096);
        put64(e, 80, 64 << 10);
        recrc(e)
    });
    assert_err(v, ErrorKind::Corrupt, "descriptor");
}

#[test]
fn x11_region_table_header() {
    let mut v = base();
    v[R1 + 1000] ^= 1;
    v[R2 + 1000] ^= 1;
    assert_err(v, ErrorKind::Corrupt, "region_table.checksum");
    let mut v = base();
    regions(&mut v, |v, r| v[r] = b'x');
    assert_err(v, ErrorKind::Corrupt, "region_table.signature");
    let mut v = base();
    regions(&mut v, |v, r| put32(v, r + 8, 2048));
    assert_err(v, ErrorKind::Corrupt, "region_table.entry_count");
    // Table 1 bad, table 2 good: opens from table 2.
    let mut v = base();
    v[R1 + 1000] ^= 1;
    let img = open(v).unwrap();
    assert!(img.check().unwrap().corruptions() > 0);
    // Tables differ: reported by check.
    let mut v = base();
    put32(&mut v, R2 + 16 + 32 + 28, 0);
    fix_regions(&mut v);
    let img = open(v).unwrap();
    assert!(img
        .check()
        .unwrap()
        .findings
        .iter()
        .any(|f| f.message.contains("differ")));
}

#[test]
fn x12_region_entries() {
    // Entry 0 is the BAT, entry 1 the metadata region.
    let e1 = 16 + 32;
    let mut v = base();
    regions(&mut v, |v, r| {
        v[r + e1..r + e1 + 16].copy_from_slice(&BAT_REGION.0)
    });
    assert_err(v, ErrorKind::Corrupt, "region_table.entry[1]");
    let mut v = base();
    regions(&mut v, |v, r| {
        put32(v, r + 8, 3);
        let e = r + 16 + 64;
        v[e..e + 16].copy_from_slice(&[0x11; 16]);
        put64(v, e + 16, 5 << 20);
        put32(v, e + 24, 1 << 20);
        put32(v, e + 28, 1);
    });
    assert_err(v, ErrorKind::Unsupported, "region_table.entry[2]");
    for (off, val, is64) in [
        (e1 + 16, 3u64 << 20, true),       // overlaps the BAT
        (e1 + 16, (2 << 20) + 4096, true), // misaligned
        (e1 + 16, 1 << 40, true),          // past EOF
        (e1 + 24, 0, false),               // length 0
        (e1 + 24, 4096, false),            // length not 1 MiB
    ] {
        let mut v = base();
        regions(&mut v, |v, r| {
            if is64 {
                put64(v, r + off, val)
            } else {
                put32(v, r + off, val as u32)
            }
        });
        assert_err(v, ErrorKind::Corrupt, "region_table.entry[1]");
    }
}

fn meta_entry(i: usize) -> usize {
    META + 32 + 32 * i
}

#[test]
fn x13_metadata_table() {
    let mut v = base();
    v[META] = b'x';
    assert_err(v, ErrorKind::Corrupt, "metadata_table.signature");
    let mut v = base();
    put16(&mut v, META + 10, 2048);
    assert_err(v, ErrorKind::Corrupt, "metadata_table.entry_count");
    let mut v = base();
    let (a, b) = v.split_at_mut(meta_entry(1));
    b[..16].copy_from_slice(&a[meta_entry(0)..meta_entry(0) + 16]);
    assert_err(v, ErrorKind::Corrupt, "metadata_table.entry[1]");
    let mut v = base();
    put16(&mut v, META + 10, 6);
    let e = meta_entry(5);
    v[e..e + 16].copy_from_slice(&[0x33; 16]);
    put32(&mut v, e + 16, 0x20000);
    put32(&mut v, e + 20, 8);
    put32(&mut v, e + 24, 4);
    let er = err(v);
    assert_eq!(er.kind(), ErrorKind::Unsupported);
    assert_eq!(er.field(), Some("metadata_table.entry[5]"));
    assert!(er.to_string().contains("33333333-3333"), "{er}");
}

#[test]
fn x14_metadata_item_bounds() {
    let mut v = base();
    put32(&mut v, meta_entry(0) + 16, 4096);
    assert_err(v, ErrorKind::Corrupt, "metadata_table.entry[0].offset");
    let mut v = base();
    put32(&mut v, meta_entry(0) + 16, (1 << 20) - 4);
    assert_err(v, ErrorKind::Corrupt, "metadata_table.entry[0].offset");
    let mut v = base();
    put32(&mut v, meta_entry(0) + 20, 4);
    assert_err(v, ErrorKind::Corrupt, "file_parameters");
    let mut v = base();
    put32(&mut v, meta_entry(2) + 20, 8);
    assert_err(v, ErrorKind::Corrupt, "virtual_disk_id");
}

const FP: usize = META + (64 << 10);

#[test]
fn x15_file_parameters() {
    for bs in [0u32, 0x12345, 512 << 10, 512 << 20] {
        let mut v = base();
        put32(&mut v, FP, bs);
        assert_err(v, ErrorKind::Corrupt, "file_parameters.block_size");
    }
    let mut v = base();
    put32(&mut v, FP + 4, 8);
    assert_err(v, ErrorKind::Corrupt, "file_parameters.flags");
}

#[test]
fn x16_sector_sizes() {
    let mut v = base();
    put32(&mut v, FP + 32, 1024);
    assert_err(v, ErrorKind::Corrupt, "logical_sector_size");
    let mut v = base();
    put32(&mut v, FP + 36, 2048);
    assert_err(v, ErrorKind::Corrupt, "physical_sector_size");
}

#[test]
fn x17_virtual_disk_size() {
    for s in [0u64, 1000, 65 << 40] {
        let mut v = base();
        put64(&mut v, FP + 8, s);
        assert_err(v, ErrorKind::Corrupt, "virtual_disk_size");
    }
}

#[test]
fn x18_bat_region_too_short_or_bait() {
    // 64 TiB with 1 MiB blocks needs 512 MiB of BAT; the region holds 1 MiB.
    let mut v = base();
    put64(&mut v, FP + 8, 64 << 40);
    assert_err(v, ErrorKind::Corrupt, "region_table.bat.length");
    // A 4 GiB BAT region: refused (past EOF), nothing allocated.
    let mut v = base();
    regions(&mut v, |v, r| put32(v, r + 16 + 24, 0xFFF0_0000));
    assert_err(v, ErrorKind::Corrupt, "region_table.entry[0]");
}

fn set_bat(v: &mut [u8], i: usize, e: u64) {
    put64(v, BAT + 8 * i, e);
}

#[test]
fn x19_bat_payload_entries() {
    for (i, e, field) in [
        (1, 6u64, "bat_entry[1]"),                      // FULLY_PRESENT at offset 0
        (1, (1u64 << 40) | 6, "bat_entry[1]"),          // past EOF
        (1, 0xFFFF_FFFF_FFF0_0000 | 6, "bat_entry[1]"), // overflow
        (1, (3u64 << 20) | 6, "bat_entry[1]"),          // into the BAT
        (1, (1u64 << 20) | 6, "bat_entry[1]"),          // into the log
    ] {
        let mut v = base();
        set_bat(&mut v, i, e);
        assert_err(v, ErrorKind::Corrupt, field);
    }
    // Two entries naming the same block.
    let mut v = base();
    let e0 = u64::from_le_bytes(v[BAT..BAT + 8].try_into().unwrap());
    set_bat(&mut v, 3, e0);
    assert_err(v, ErrorKind::Corrupt, "bat_entry");
}

#[test]
fn x20_bat_states() {
    let mut v = base();
    set_bat(&mut v, 1, 4);
    assert_err(v, ErrorKind::Corrupt, "bat_entry[1]");
    let mut v = base();
    let e0 = u64::from_le_bytes(v[BAT..BAT + 8].try_into().unwrap());
    set_bat(&mut v, 0, (e0 & !7) | 7);
    assert_err(v, ErrorKind::Corrupt, "bat_entry[0]");
    // Reserved bits.
    let mut v = base();
    set_bat(&mut v, 1, 1 << 8);
    assert_err(v, ErrorKind::Corrupt, "bat_entry[1]");
    // UNDEFINED, ZERO, UNMAPPED (3 and 5) read as zeros.
    let mut v = base();
    for (i, s) in [(1, 1u64), (2, 2), (3, 3), (4, 5)] {
        set_bat(&mut v, i, s);
    }
    let img = open(v).unwrap();
    assert!(read_all(&img)[MIB..5 * MIB].iter().all(|&b| b == 0));
    // A sector-bitmap entry with a payload state (differencing image, SB entry at 4096).
    let (pbytes, child) = diff_pair(vec![]);
    // PARTIALLY_PRESENT whose chunk has no sector bitmap.
    let mut c = child.clone();
    let len = c.len() as u64;
    c.resize(c.len() + MIB, 0);
    set_bat(&mut c, 0, len | 7);
    let e = open_with(
        Box::new(MemStorage::read_only(c)),
        false,
        &MemGate {
            parent: pbytes.clone(),
        },
        0,
    )
    .err()
    .unwrap();
    assert_eq!(e.field(), Some("bat_entry[0]"), "{e}");
    let mut c = child;
    set_bat(&mut c, 4096, 2);
    let e = open_with(
        Box::new(MemStorage::read_only(c)),
        false,
        &MemGate { parent: pbytes },
        0,
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(e.field(), Some("bat_entry[4096]"));
}

fn diff_pair(extra: Vec<(String, String)>) -> (Vec<u8>, Vec<u8>) {
    let pbytes = base();
    let parent = open(pbytes.clone()).unwrap();
    let mut link = link_of(&parent);
    if let Some((_, v)) = extra.iter().find(|(k, _)| k == "relative_path") {
        link.relative_path = v.clone();
    }
    if let Some((_, v)) = extra.iter().find(|(k, _)| k == "absolute_win32_path") {
        link.absolute_win32_path = v.clone();
    }
    let child = create_mem(&CreateOptions {
        block_size: MIB as u64,
        parent: Some(link),
        ..CreateOptions::default()
    });
    (pbytes, child)
}

struct Recorder(Mutex<Vec<Candidate>>);

impl OpenGate for Recorder {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>> {
        self.0
            .lock()
            .unwrap()
            .extend(req.candidates.iter().cloned());
        DenyGate.open_backing(req)
    }
    fn open_data_file(&self, req: &BackingRequest<'_>, w: bool) -> Result<Box<dyn Storage>> {
        DenyGate.open_data_file(req, w)
    }
}

#[test]
fn x21_parent_locator() {
    // Hostile paths are only handed to the gate, as candidates; nothing is opened by itself.
    let (_, child) = diff_pair(vec![
        ("relative_path".into(), "..\\..\\etc\\shadow".into()),
        (
            "absolute_win32_path".into(),
            "\\\\?\\C:\\..\\etc\\shadow".into(),
        ),
    ]);
    let rec = Recorder(Mutex::new(Vec::new()));
    let e = open_with(
        Box::new(MemStorage::read_only(child.clone())),
        false,
        &rec,
        0,
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::BackingDenied);
    assert_eq!(
        *rec.0.lock().unwrap(),
        vec![
            Candidate::Relative("../../etc/shadow".into()),
            Candidate::ForeignAbsolute("\\\\?\\C:\\..\\etc\\shadow".into()),
        ]
    );
    // Key/value offsets outside the item. The locator is item 5; its header is at FP + 40.
    let loc = FP + 40;
    let mut c = child.clone();
    put32(&mut c, loc + 20, 1 << 20);
    let e = open_with(
        Box::new(MemStorage::read_only(c)),
        false,
        &DirGate::new(),
        0,
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(e.field(), Some("parent_locator.entry[0]"));
    // parent_linkage mismatch: the parent is another image.
    let other = base();
    let e = open_with(
        Box::new(MemStorage::read_only(child)),
        false,
        &MemGate { parent: other },
        0,
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::BackingMismatch, "{e}");
    assert_eq!(e.field(), Some("parent_locator.parent_linkage"));
}

#[test]
fn x22_unaligned_io() {
    let img = open_with(
        Box::new(MemStorage::from_vec(base())),
        true,
        &DirGate::new(),
        0,
    )
    .unwrap();
    let e = img.write_at(&[1; 512], 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfBounds);
    let e = img.write_at(&[1; 100], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfBounds);
    let e = img.write_zeroes(512, 10, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfBounds);
    // Reads at any byte offset are served (no read-modify-write hazard).
    let mut b = [0u8; 3];
    img.read_at(&mut b, 4095).unwrap();
    assert_eq!(b, [0xAB, 0, 0]);
    let e = img.read_at(&mut b, 16 * MIB as u64 - 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfBounds);
    let _ = crc32c(b"x");
}

#[test]
fn x08_log_scan_is_bounded() {
    // Every sector of an 8 MiB log claims to start an entry spanning the whole log, with the
    // right LogGuid and a bad checksum: a naive scan checksums 2048 x 8 MiB.
    let guid = Guid([0x42; 16]);
    let len = 8 << 20;
    let mut log = vec![0u8; len];
    for p in (0..len).step_by(4096) {
        log[p..p + 4].copy_from_slice(b"loge");
        put32(&mut log, p + 8, len as u32);
        put64(&mut log, p + 16, 1 + p as u64);
        log[p + 32..p + 48].copy_from_slice(&guid.0);
    }
    let t = std::time::Instant::now();
    let r = vhdx::log::scan(&log, &guid);
    assert!(t.elapsed().as_secs() < 20);
    let e = r.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(e.field(), Some("log"));
}

/// Opens, reads everything, walks block_status and checks: errors are fine, panics are not.
fn exercise(v: Vec<u8>) {
    let Ok(img) = open(v) else { return };
    let size = img.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size.min(64 << 20) {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = img.read_at(&mut buf[..n], off);
        match img.block_status(off, size - off) {
            Ok(e) => {
                assert_eq!(e.offset, off);
                assert!(e.len > 0 && e.offset + e.len <= size);
                off += e.len.min(n as u64).max(1);
            }
            Err(_) => off += n as u64,
        }
    }
    let _ = img.check();
    let _ = img.info();
}

#[test]
fn truncation_sweep() {
    let v = base();
    let mut cut = 0;
    while cut < v.len() {
        exercise(v[..cut].to_vec());
        cut += if cut < 320 << 10 { 4096 + 17 } else { 64 << 10 };
    }
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn random_corruption_never_panics(
            edits in proptest::collection::vec((0usize..5 * MIB, any::<u8>()), 1..12),
            fix in any::<bool>(),
            region in 0usize..8,
        ) {
            let mut v = base();
            if region >= 6 {
                dirty(&mut v, |_| {});
            }
            // Aim most edits at one structure (6, 7: a dirty log's entry).
            let (start, span) = [(0, 4096), (H1, 4096), (R1, 512), (META, 512), (META + (64 << 10), 256), (BAT, 256), (MIB, 256), (MIB, 8192)][region];
            for (i, (o, b)) in edits.iter().enumerate() {
                let at = if i % 2 == 0 { start + o % span } else { *o };
                if at < v.len() {
                    v[at] = *b;
                }
            }
            if fix {
                fix_headers(&mut v);
                fix_regions(&mut v);
                if region >= 6 {
                    recrc(&mut v[MIB..MIB + 8192]);
                }
            }
            exercise(v);
        }
    }
}

/// Storage that keeps the first `keep` bytes and only counts writes past them.
struct Counting {
    inner: MemStorage,
    keep: u64,
    len: Mutex<u64>,
    beyond: Mutex<u64>,
}

impl Storage for Counting {
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        if off + buf.len() as u64 <= self.keep {
            self.inner.read_at(buf, off)
        } else {
            buf.fill(0);
            Ok(())
        }
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        let end = off + buf.len() as u64;
        let mut len = self.len.lock().unwrap();
        *len = (*len).max(end);
        if end <= self.keep {
            self.inner.write_at(buf, off)
        } else {
            *self.beyond.lock().unwrap() += buf.len() as u64;
            Ok(())
        }
    }
    fn len(&self) -> Result<u64> {
        Ok(*self.len.lock().unwrap())
    }
    fn set_len(&self, n: u64) -> Result<()> {
        *self.len.lock().unwrap() = n;
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        true
    }
}

/// One log entry with zero descriptors `(offset, len)`, made current in both headers.
fn zero_log(v: &mut [u8], zeros: &[(u64, u64)]) {
    let guid = Guid([0x42; 16]);
    let len = v.len() as u64;
    let mut e = vhdx::log::build_entry(&guid, 7, 0, 0, len, len, &[]);
    let sectors = (zeros.len() + 2).div_ceil(128);
    e.resize(sectors * 4096, 0);
    let total = e.len() as u32;
    put32(&mut e, 8, total);
    put32(&mut e, 24, zeros.len() as u32);
    for (i, &(off, n)) in zeros.iter().enumerate() {
        let d = 64 + 32 * i;
        e[d..d + 4].copy_from_slice(b"zero");
        put64(&mut e, d + 8, n);
        put64(&mut e, d + 16, off);
        put64(&mut e, d + 24, 7);
    }
    recrc(&mut e);
    v[MIB..MIB + e.len()].copy_from_slice(&e);
    headers(v, |v, h| v[h + 48..h + 64].copy_from_slice(&guid.0));
}

#[test]
fn x31_a_huge_zero_descriptor_writes_no_more_than_the_file_holds() {
    // One 4 KiB entry zeroing 64 GiB from the end of the file: replay must neither write
    // 64 GiB of zeros nor grow the file (past the end reads as zeros already).
    let mut v = base();
    let flen = v.len() as u64;
    zero_log(&mut v, &[(flen - 4096, 64 << 30)]);
    let s = Arc::new(Counting {
        inner: MemStorage::from_vec(v.clone()),
        keep: flen,
        len: Mutex::new(flen),
        beyond: Mutex::new(0),
    });
    let img = open_with(Box::new(s.clone()), true, &DirGate::new(), 0).unwrap();
    assert_eq!(*s.beyond.lock().unwrap(), 0, "zeros written past the end");
    assert_eq!(*s.len.lock().unwrap(), flen, "the file grew");
    // The zeroed last sector is a hole of the payload: the image still reads and checks.
    let _ = read_all(&img);
    // The read-only overlay agrees with the replay.
    let ro = open(v).unwrap();
    assert!(ro.log_state().in_memory);
}

#[test]
fn x32_many_zero_descriptors_read_back_quickly() {
    // An entry of 8190 zero descriptors (a 1 MiB log's worth): reads through the in-memory
    // replay look up only the ranges they touch, and agree with the replay to disk.
    let mut v = base();
    let flen = v.len() as u64;
    let zeros: Vec<(u64, u64)> = (0..8000u64)
        .map(|i| (4 * MIB as u64 + (i % 64) * 8192, 4096))
        .collect();
    zero_log(&mut v, &zeros[..zeros.len().min(250 * 32 - 2)]);
    let t = std::time::Instant::now();
    let ro = open(v.clone()).unwrap();
    assert!(ro.log_state().in_memory);
    let via_overlay = read_all(&ro);
    let m = Arc::new(MemStorage::from_vec(v));
    let rw = open_with(Box::new(m.clone()), true, &DirGate::new(), 0).unwrap();
    assert_eq!(read_all(&rw), via_overlay);
    assert_eq!(m.len().unwrap(), flen);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn x33_replay_on_a_read_write_open_renews_the_file_write_guid_first() {
    // MS-VHDX 2.2.2: FileWriteGuid changes before the first modification, log playback
    // included (another writer's cached view of the file is then known to be stale).
    let mut v = base();
    dirty(&mut v, |_| {});
    let fwg = |img: &vhdx::VhdxImage| img.info().format_specific["file_write_guid"].clone();
    let before = fwg(&open(v.clone()).unwrap());
    let m = Arc::new(MemStorage::from_vec(v));
    let rw = open_with(Box::new(m.clone()), true, &DirGate::new(), 0).unwrap();
    assert_eq!(rw.log_state().replayed, 1);
    drop(rw);
    let after = open(m.to_vec()).unwrap();
    assert!(!after.log_state().in_memory, "the log was not cleared");
    assert_ne!(fwg(&after), before);
}
