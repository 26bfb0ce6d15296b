//! Every qcow2 of the shared fixtures MANIFEST gives its listed guest SHA-256.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use blockdev::{BlockDevice, FileStorage};
use qcow2::{OpenOptions, Qcow2Image};

const BASIC: &str = "3c86a52ad19ebbe34acffb812d276817ddca56522eb72de2b984d70ffb20582f";

fn one(rel: &str, sha: &str) {
    let Some(f) = testsupport::shared_fixture(rel) else {
        eprintln!("shared fixtures absent: {rel} skipped");
        return;
    };
    let img = common::open(&f.path);
    assert_eq!(testsupport::sha256_device(&img), sha, "{rel}");
    let rep = img.check().unwrap();
    assert_eq!(rep.corruptions(), 0, "{rel}: {:?}", rep.findings);
}

#[test]
fn dissect_basic_zlib() {
    one("dissect/basic.qcow2.gz", BASIC);
}

#[test]
fn dissect_basic_zstd() {
    one("dissect/basic-zstd.qcow2.gz", BASIC);
}

#[test]
fn dissect_snapshot_active_layer() {
    one(
        "dissect/snapshot.qcow2.gz",
        "9acca8e8c22201155389f65abbf6bc9723edc7384ead80503839f49dcc56d767",
    );
}

#[test]
fn dissect_snapshot_listing_and_reading() {
    let Some(f) = testsupport::shared_fixture("dissect/snapshot.qcow2.gz") else {
        return;
    };
    let img = common::open(&f.path);
    let snaps = img.snapshots().unwrap().to_vec();
    assert_eq!(snaps.len(), 2);
    let info = img.info();
    assert_eq!(
        info.format_specific["snapshots"].as_array().unwrap().len(),
        2
    );
    for s in &snaps {
        let st = FileStorage::open(&f.path, false).unwrap();
        let opts = OpenOptions {
            snapshot: Some(s.name.clone()),
            ..OpenOptions::default()
        };
        let snap = Qcow2Image::open(Box::new(st), &common::TestGate, &opts).unwrap();
        // Compare with qemu-img's reading of the same snapshot.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.raw");
        let (rc, _, err) = common::qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-l",
            &format!("snapshot.name={}", s.name),
            "-O",
            "raw",
            f.path.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_eq!(rc, 0, "{err}");
        assert_eq!(
            testsupport::sha256_device(&snap),
            testsupport::sha256_file(&out),
            "{}",
            s.name
        );
    }
}

#[test]
fn dissect_data_file() {
    let Some((_dir, paths)) = testsupport::shared_fixtures_together(&[
        "dissect/data-file.qcow2.gz",
        "dissect/data-file.bin.gz",
    ]) else {
        return;
    };
    let img = common::open(&paths[0]);
    assert_eq!(testsupport::sha256_device(&img), BASIC);
    assert!(img.info().format_specific.contains_key("data_file"));
}

#[test]
fn dissect_backing_chain() {
    let Some((_dir, paths)) = testsupport::shared_fixtures_together(&[
        "dissect/backing-chain-1.qcow2.gz",
        "dissect/backing-chain-2.qcow2.gz",
        "dissect/backing-chain-3.qcow2.gz",
    ]) else {
        return;
    };
    let want = [
        "186334af67c1acb54b08ded0b6a419571000755d4c810c8b768a30281e2ab074",
        "8e2e850f2a31828f6f053f70f1fbfa71a42ce0571c6d8cd2a7ca0e21e1db8341",
        "4a57a3a5c273c7c1144743ecafc7b23181f6e23c8abad104493a63a3599bd276",
    ];
    for (p, w) in paths.iter().zip(want) {
        let img = common::open(p);
        assert_eq!(testsupport::sha256_device(&img), w, "{}", p.display());
    }
}

#[test]
fn dfvfs_ext2() {
    one(
        "dfvfs/ext2.qcow2.xz",
        "a6c2f0e39afe6c6ab432ca5465349fcefe8dc944398e97b2d957d3f89dbb5d80",
    );
}

#[test]
fn dfvfs_windows_volume_104_byte_header() {
    one(
        "dfvfs/windows_volume.qcow2.xz",
        "44abe9deca9658f331a2bdba2deb53192d04f35d157a1fb3ba0597b03f0524f2",
    );
}

#[test]
fn mkimg_v2() {
    one(
        "mkimg/img-1x1-512-gpt.qcow2.xz",
        "1253b03b3052103f839fbea755a298b8a4ae7993a3e414c0420e7e30b363ed33",
    );
}
