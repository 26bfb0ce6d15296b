//! Single on-disk structures from libvhdi's test data (shared fixtures `libvhdi/`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use vhdx::format::{Guid, BAT_REGION, LOCATOR_TYPE_VHDX, METADATA_REGION};
use vhdx::header::{parse_region_table, Header};

fn frag(name: &str) -> Option<Vec<u8>> {
    let dir = testsupport::shared_fixtures_dir()?;
    Some(std::fs::read(dir.join("libvhdi").join(name)).unwrap())
}

#[test]
fn image_header_crc32c_and_fields() {
    let Some(b) = frag("image_header.1") else {
        return;
    };
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.seq, 6);
    assert_eq!(h.version, 1);
    assert_eq!(h.log_version, 0);
    assert_eq!(h.log_length, 1 << 20);
    assert_eq!(h.log_offset, 1 << 20);
    assert!(h.log_guid.is_zero());
    // Re-serialising reproduces the bytes (checksum included).
    assert_eq!(h.to_bytes(), b);
}

#[test]
fn region_table_entries() {
    let Some(b) = frag("region_table.1") else {
        return;
    };
    let mut t = b.clone();
    t.resize(64 << 10, 0);
    let e = parse_region_table(&t, 0).unwrap();
    assert_eq!(e.len(), 2);
    assert!(e.iter().any(|x| x.guid == BAT_REGION));
    assert!(e.iter().any(|x| x.guid == METADATA_REGION));
    for x in &e {
        assert_eq!(x.offset % (1 << 20), 0);
        assert!(x.required);
    }
}

#[test]
fn file_identifier_and_locator_header() {
    let Some(b) = frag("file_identifier.1") else {
        return;
    };
    assert_eq!(&b[..8], b"vhdxfile");
    let Some(l) = frag("parent_locator_header.1") else {
        return;
    };
    assert_eq!(Guid::read(&l, 0), LOCATOR_TYPE_VHDX);
    assert_eq!(u16::from_le_bytes([l[18], l[19]]), 5);
    let Some(m) = frag("metadata_table_header.1") else {
        return;
    };
    assert_eq!(&m[..8], b"metadata");
}
