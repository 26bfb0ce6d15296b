//! Every VHD of the shared fixtures (MANIFEST.md): size and guest SHA-256, or a clear error.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use blockdev::{BlockDevice, ErrorKind, ExtentKind, FileStorage};
use common::{open_path, params, DirGate};
use testsupport::{sha256_device, shared_fixture};
use vhd::{SizeRule, VhdImage};

fn all_unallocated(img: &VhdImage) -> bool {
    let mut off = 0;
    while off < img.size() {
        let e = img.block_status(off, u64::MAX).unwrap();
        if e.kind != ExtentKind::Unallocated {
            return false;
        }
        off += e.len;
    }
    img.backing().is_none()
}

/// Digests of all-zero disks listed in MANIFEST.md (computed by qemu-img there).
const ZERO_SHA: [&str; 2] = [
    "dcb4f171cbcedb416d5da34e48d5a17ecc2828a0f14c416de3669b8463cb1d8e",
    "2a4f06d5c9672ce7acfe68d55f16be1e1c96891af6a79eefe50eefae0cc5ae8d",
];

fn expect(rel: &str, size: u64, sha: &str) {
    let Some(f) = shared_fixture(rel) else { return };
    let img = open_path(&f.path, false).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(img.size(), size, "{rel}: size");
    if all_unallocated(&img) {
        // An empty dynamic disk without a parent is all zeros: the manifest's digest is that
        // of `size` zero bytes (hashing 127 GiB in a debug test would take minutes).
        assert!(
            ZERO_SHA.contains(&sha),
            "{rel}: all zeros but digest {sha} expected"
        );
    } else {
        assert_eq!(sha256_device(&img), sha, "{rel}: guest sha256");
    }
    let report = img.check().unwrap();
    assert_eq!(
        report.corruptions() + report.leaks(),
        0,
        "{rel}: {:?}",
        report.findings
    );
}

#[test]
fn hyperv2012r2_dynamic() {
    expect(
        "qemu/hyperv2012r2-dynamic.vhd.bz2",
        136365211648,
        "dcb4f171cbcedb416d5da34e48d5a17ecc2828a0f14c416de3669b8463cb1d8e",
    );
}

#[test]
fn virtualpc_dynamic() {
    expect(
        "qemu/virtualpc-dynamic.vhd.bz2",
        136363130880,
        "2a4f06d5c9672ce7acfe68d55f16be1e1c96891af6a79eefe50eefae0cc5ae8d",
    );
}

#[test]
fn d2v_zerofilled() {
    expect(
        "qemu/d2v-zerofilled.vhd.bz2",
        263454720,
        "1ba076be94a8a64541c25aae8d5a5f8b0da758c3797af597e03acb431ff8d143",
    );
}

#[test]
fn dissect_dynamic() {
    expect(
        "dissect/dynamic.vhd.gz",
        10485760,
        "ecff2ef6615a3cddc6a6885f1c6d9cf13a232697e1dc6575f2c2f01f57247784",
    );
}

#[test]
fn dissect_fixed() {
    expect(
        "dissect/fixed.vhd.gz",
        10485760,
        "459325ab1fcd1d5ec9854cba790ee26378317cda177ffc1072008a1df88e6463",
    );
}

#[test]
fn dfvfs_ext2() {
    expect(
        "dfvfs/ext2.vhd.xz",
        4212736,
        "870be7ae16c1fa8faab05c6eb9205dc9a7ae35c5f552c5cf8a267c0bc6a5cb99",
    );
}

#[test]
fn mkimg_dynamic() {
    expect(
        "mkimg/img-1x1-512-gpt.vhd.xz",
        4352000,
        "c9c4e305b2b60c4379e1850f2c412d8b0717874b3d6e206354ebb9263db68c9b",
    );
}

#[test]
fn mkimg_fixed() {
    expect(
        "mkimg/img-1x1-512-gpt.vhdf.xz",
        5242880,
        "7bec1f3798a95e2b33eba7e24531bbe40958c8498fa30947a8fb057031908c68",
    );
}

#[test]
fn mkimg_63x255() {
    expect(
        "mkimg/img-63x255-4096-gpt.vhd.xz",
        8225280,
        "c2a3b28d9792cee03e54d915fbbfdd7b167dd4d3f879e32e86508d62fab359ee",
    );
}

#[test]
fn azure_footer_sparse_5gib() {
    let Some(root) = testsupport::shared_fixtures_dir() else {
        return;
    };
    let footer = std::fs::read(root.join("azure/azure-footer.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("azure.vhd");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(5368709120).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &footer, 5368709120).unwrap();
    drop(f);
    let img = open_path(&p, false).unwrap();
    assert_eq!(img.size(), 5368709120);
    let info = img.info();
    assert_eq!(info.format_specific["size_rule"], "current");
    assert_eq!(info.format_specific["chs_size"], 5368430592u64);
    // Reading it all is slow in debug: compare block status and sample reads.
    let e = img.block_status(0, u64::MAX).unwrap();
    assert_eq!(e.len, 5368709120);
    let mut buf = vec![1u8; 1 << 20];
    img.read_at(&mut buf, 5368709120 - (1 << 20)).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // The CHS override truncates it, as old qemu did.
    let gate = DirGate::new();
    let st = FileStorage::open(&p, false).unwrap();
    let chs = VhdImage::open(Box::new(st), &params(&gate, false, Some(SizeRule::Chs))).unwrap();
    assert_eq!(chs.size(), 5368430592);
}

#[test]
fn size_rule_override_on_virtualpc() {
    let Some(f) = shared_fixture("qemu/virtualpc-dynamic.vhd.bz2") else {
        return;
    };
    let gate = DirGate::new();
    let st = FileStorage::open(&f.path, false).unwrap();
    let img = VhdImage::open(Box::new(st), &params(&gate, false, Some(SizeRule::Current))).unwrap();
    let info = img.info();
    assert_eq!(info.format_specific["size_rule"], "current");
    assert_eq!(info.format_specific["size_rule_source"], "option");
    assert_eq!(
        img.size(),
        info.format_specific["current_size"].as_u64().unwrap()
    );
}

#[test]
fn dfvfs_image_bad_checksum() {
    let Some(f) = shared_fixture("dfvfs/image.vhd.xz") else {
        return;
    };
    let e = open_path(&f.path, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.field().unwrap().ends_with("checksum"), "{e}");
}

#[test]
fn dfvfs_image_differential_bad_checksums() {
    let Some(f) = shared_fixture("dfvfs/image-differential.vhd.xz") else {
        return;
    };
    let e = open_path(&f.path, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.field().unwrap().ends_with("checksum"), "{e}");
}

#[test]
fn fat_differential_without_parent() {
    let Some(f) = shared_fixture("dfvfs/fat-differential.vhd.xz") else {
        return;
    };
    let e = open_path(&f.path, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BackingNotFound, "{e}");
    assert!(e.to_string().contains("fat-parent.vhd"), "{e}");
    // Without the parent, info still shows the locators, and reads that need it fail.
    let gate = DirGate {
        skip: true,
        ignore_id: false,
        ..DirGate::new()
    };
    let st = FileStorage::open(&f.path, false).unwrap();
    let img = VhdImage::open(Box::new(st), &params(&gate, false, None)).unwrap();
    let info = img.info();
    assert_eq!(info.subformat.as_deref(), Some("differencing"));
    let locs = info.format_specific["parent_locators"].as_array().unwrap();
    assert!(locs.iter().any(|l| l["platform"] == "W2ku"), "{locs:?}");
    assert!(info.format_specific["parent_name"]
        .as_str()
        .unwrap()
        .contains("fat-parent.vhd"));
    let mut buf = vec![0u8; 4194304];
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BackingNotFound);
}
