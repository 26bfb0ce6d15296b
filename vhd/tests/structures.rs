//! Single on-disk structures from libvhdi's test data (shared fixtures, libvhdi/).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use vhd::format::{DiskType, DynHeader, Footer, PLAT_W2KU, PLAT_W2RU, PLAT_WI2K, PLAT_WI2R};
use vhd::SizeRule;

#[test]
fn virtual_pc_differencing_footer() {
    let Some(root) = testsupport::shared_fixtures_dir() else {
        return;
    };
    let b: [u8; 512] = std::fs::read(root.join("libvhdi/file_footer.1"))
        .unwrap()
        .try_into()
        .unwrap();
    let f = Footer::parse(&b);
    assert_eq!(f.computed_checksum(), f.checksum);
    assert_eq!(f.kind(), Some(DiskType::Differencing));
    assert_eq!(&f.creator_app, b"vpc ");
    assert_eq!(f.current_size, 536870912);
    assert_eq!(
        (f.geometry.cylinders, f.geometry.heads, f.geometry.sectors),
        (1040, 16, 63)
    );
    assert_eq!(SizeRule::default_for(&f), SizeRule::Chs);
    assert_eq!(f.geometry.bytes(), 1040 * 16 * 63 * 512);
    assert_eq!(f.to_bytes(), b, "serialising keeps every byte");
}

#[test]
fn dynamic_header_with_four_locators() {
    let Some(root) = testsupport::shared_fixtures_dir() else {
        return;
    };
    let b: [u8; 1024] = std::fs::read(root.join("libvhdi/dynamic_disk_header.1"))
        .unwrap()
        .try_into()
        .unwrap();
    let h = DynHeader::parse(&b);
    assert_eq!(h.computed_checksum(), h.checksum);
    assert_eq!(h.block_size, 2 << 20);
    assert_eq!(h.max_table_entries, 256);
    assert_eq!(h.table_offset, 0x600);
    assert_eq!(h.parent_name, "dynamic.vhd");
    let codes: Vec<u32> = h
        .locators
        .iter()
        .map(|l| l.code)
        .filter(|&c| c != 0)
        .collect();
    for c in [PLAT_W2KU, PLAT_W2RU, PLAT_WI2K, PLAT_WI2R] {
        assert!(codes.contains(&c), "{codes:x?}");
    }
    assert_eq!(h.to_bytes(), b, "serialising keeps every byte");
}
