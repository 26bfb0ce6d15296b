//! Every VHDX of the shared fixtures: size, guest SHA-256, files unchanged by reading.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use blockdev::{BlockDevice, ErrorKind, ExtentKind};
use common::{cached_fixture, file_digest, open_path, open_with, DirGate};
use testsupport::{sha256_device, shared_fixture};

fn fixture(rel: &str, size: u64, sha: &str) -> Option<vhdx::VhdxImage> {
    let path = cached_fixture(rel)?;
    let before = file_digest(&path);
    let img = open_path(&path, false).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(img.size(), size, "{rel}");
    assert_eq!(sha256_device(&img), sha, "{rel}");
    // block_status covers the disk and agrees with reads of data extents.
    let mut off = 0;
    let mut n = 0;
    while off < img.size() {
        let e = img.block_status(off, img.size() - off).unwrap();
        assert_eq!(e.offset, off);
        assert!(e.len > 0);
        off += e.len;
        n += 1;
    }
    assert!(n < 100_000);
    let _ = img.info();
    let rep = img.check().unwrap();
    assert_eq!(rep.corruptions(), 0, "{rel}: {:?}", rep.findings);
    assert_eq!(file_digest(&path), before, "{rel} changed by reading");
    drop(img);
    assert_eq!(file_digest(&path), before, "{rel} changed by closing");
    Some(open_path(&path, false).unwrap())
}

#[test]
fn qemu_dynamic_1g() {
    let Some(img) = fixture(
        "qemu/iotest-dynamic-1G.vhdx.bz2",
        1 << 30,
        "d3d112d8dab7fd360609f7d5a7b769904b7a2a7d7b6b8c535f65a23293c05478",
    ) else {
        return;
    };
    let info = img.info();
    let st = &info.format_specific["bat_states"];
    assert_eq!(st["fully_present"], 3);
    assert_eq!(st["zero"], 29);
    // Data then zero extents. The three present blocks hold 66 MiB of pattern; the rest of the
    // third block is zeros, which a sparse copy of the file keeps as a hole (reported Zero).
    let e = img.block_status(0, 1 << 30).unwrap();
    assert_eq!(e.kind, ExtentKind::Data);
    assert!(e.len >= 66 << 20 && e.len <= 96 << 20, "{}", e.len);
}

#[test]
fn qemu_dirty_log_replayed_in_memory() {
    let Some(img) = fixture(
        "qemu/iotest-dirtylog-10G-4M.vhdx.bz2",
        10 << 30,
        "179cefe8b0587f123393eedf2aa7aa8d25798591178e6bc3950a09762f38f96f",
    ) else {
        return;
    };
    assert!(img.log_state().in_memory);
    assert_eq!(img.log_state().replayed, 1);
}

#[test]
fn windows_dirty_log_replayed_to_disk() {
    // A private copy: this test writes.
    let Some(f) = shared_fixture("discutils/vhdx-log-replay.vhdx.gz") else {
        return;
    };
    let path = f.path.clone();
    let img = open_path(&path, true).unwrap();
    assert!(!img.log_state().in_memory);
    assert!(img.log_state().replayed > 0);
    drop(img);
    let img = open_path(&path, false).unwrap();
    assert_eq!(img.log_state().replayed, 0);
    assert!(img.log_state().log_guid.is_zero());
    assert_eq!(
        sha256_device(&img),
        "3ba3b309425b7ff5e8e0199edceed95226250f880c53b24e8eae93865f3fad5e"
    );
    assert_eq!(img.check().unwrap().findings.len(), 0);
}

#[test]
fn disk2vhd_equal_headers() {
    fixture(
        "qemu/test-disk2vhd.vhdx.bz2",
        268435456,
        "96d964042be9b58dda1725567abfb0cf9fd8380e2118754afa979c2ad445938a",
    );
}

#[test]
fn windows_dirty_log() {
    let Some(img) = fixture(
        "discutils/vhdx-log-replay.vhdx.gz",
        1 << 30,
        "3ba3b309425b7ff5e8e0199edceed95226250f880c53b24e8eae93865f3fad5e",
    ) else {
        return;
    };
    assert!(img.log_state().in_memory);
}

#[test]
fn discutils_btrfs() {
    fixture(
        "discutils/btrfs.vhdx.gz",
        1 << 30,
        "0b959f9cb4e18348ad8b646f152178282542c8304f02fddf765e3fd1a1de6864",
    );
}

#[test]
fn discutils_swap() {
    fixture(
        "discutils/swap.vhdx.gz",
        10 << 30,
        "60dd30b4c74361427d1089510cabb36e2eeda0cc4747f467ea43173acd358c49",
    );
}

#[test]
fn discutils_lvm2_unmapped() {
    let Some(img) = fixture(
        "discutils/lvm2.vhdx.gz",
        10 << 30,
        "f7dc6812a3b12a35f3ec895ce981bd59ff4558270fc80cd812c9cd522bff1295",
    ) else {
        return;
    };
    let info = img.info();
    let st = &info.format_specific["bat_states"];
    assert_eq!(st["fully_present"], 18);
    assert_eq!(st["zero"], 39);
    assert_eq!(st["not_present"], 238);
    assert_eq!(st["unmapped"], 25);
}

#[test]
fn discutils_xfs_interleave() {
    fixture(
        "discutils/xfs.vhdx.gz",
        10 << 30,
        "8ca2bd2d91f1c6ada47128fc2f8d38587e73954ede5a664fe2bb09c19606060e",
    );
}

#[test]
fn discutils_xfs5() {
    fixture(
        "discutils/xfs5.vhdx.gz",
        10 << 30,
        "edc5d630b2da0ddb08992afb58ded06ffb56b884e184b4974fda16e31b7e6817",
    );
}

#[test]
fn dissect_dynamic() {
    fixture(
        "dissect/dynamic.vhdx.gz",
        10485760,
        "8e2b5e9265d694b42b81819e3bff29770eff4ed0f4f9f311693ff3dbdc93efac",
    );
}

#[test]
fn dissect_fixed() {
    let Some(img) = fixture(
        "dissect/fixed.vhdx.gz",
        10485760,
        "bc0be4623b15aa84216fb31ba24e3b621ec7f1c72d198c990ac0eced222d9f62",
    ) else {
        return;
    };
    assert_eq!(img.info().subformat.as_deref(), Some("fixed"));
}

#[test]
fn mkimg_512() {
    fixture(
        "mkimg/img-1x1-512-gpt.vhdx.xz",
        16777216,
        "280c1b4b079e88dbbe30af04c143e55b0f566d002fa255b55dc93f6489a69696",
    );
}

#[test]
fn mkimg_4096() {
    fixture(
        "mkimg/img-63x255-4096-gpt.vhdx.xz",
        16777216,
        "2c2fda97a24ff1afb57af33222c18318562d43c41681ee4deac654e8b0afbe3a",
    );
}

#[test]
fn hyperv_checkpoint_without_parent() {
    let Some(path) = cached_fixture("dissect/differencing.avhdx.gz") else {
        return;
    };
    let before = file_digest(&path);
    let err = match open_path(&path, false) {
        Err(e) => e,
        Ok(_) => panic!("opened without its parent"),
    };
    assert_eq!(err.kind(), ErrorKind::BackingNotFound, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("tried"), "{msg}");
    assert!(msg.contains(".avhdx"), "{msg}");
    // Without the parent: info shows the locator, reads needing the parent fail.
    let gate = DirGate {
        skip: true,
        ignore_id: false,
        ..DirGate::new()
    };
    let img = open_with(
        Box::new(blockdev::FileStorage::open(&path, false).unwrap()),
        false,
        &gate,
        0,
    )
    .unwrap();
    let info = img.info();
    assert_eq!(info.subformat.as_deref(), Some("differencing"));
    assert_eq!(img.size(), 8589934592);
    let loc = &info.format_specific["parent_locator"];
    for k in [
        "parent_linkage",
        "relative_path",
        "absolute_win32_path",
        "volume_path",
    ] {
        assert!(loc.get(k).is_some(), "locator lacks {k}: {loc}");
    }
    assert_eq!(info.format_specific["bat_states"]["partially_present"], 32);
    let b = info.backing.clone().unwrap();
    assert!(!b.resolved);
    let json = serde_json::to_string(&info).unwrap();
    assert!(json.contains("parent_linkage"));
    // Somewhere a read needs the parent and fails clearly.
    let mut buf = vec![0u8; 1 << 20];
    let mut saw = false;
    let mut off = 0;
    while off < img.size() {
        let e = img.block_status(off, img.size() - off).unwrap();
        if e.kind == ExtentKind::Unallocated {
            let n = e.len.min(4096) as usize;
            let err = img.read_at(&mut buf[..n], off).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BackingNotFound);
            saw = true;
            break;
        }
        off += e.len;
    }
    assert!(saw);
    assert_eq!(img.check().unwrap().corruptions(), 0);
    assert_eq!(file_digest(&path), before);
}

#[test]
fn paged_bat_matches_full() {
    for rel in [
        "discutils/xfs.vhdx.gz",
        "qemu/iotest-dirtylog-10G-4M.vhdx.bz2",
        "discutils/lvm2.vhdx.gz",
    ] {
        let Some(path) = cached_fixture(rel) else {
            return;
        };
        let open_l = |l: &blockdev::Limits| {
            common::open_with_limits(
                Box::new(blockdev::FileStorage::open(&path, false).unwrap()),
                false,
                &DirGate::new(),
                0,
                l,
            )
            .unwrap()
        };
        let full = open_l(&blockdev::Limits::default());
        let paged = open_l(&common::paged_limits());
        assert!(paged.bat_is_paged() && !full.bat_is_paged());
        assert_eq!(paged.info().format_specific, full.info().format_specific);
        let size = full.size();
        let mut off = 0;
        let mut a = vec![0u8; 1 << 20];
        let mut b = vec![0u8; 1 << 20];
        while off < size {
            let e = full.block_status(off, size - off).unwrap();
            assert_eq!(paged.block_status(off, size - off).unwrap(), e, "{rel}");
            if e.kind == ExtentKind::Data {
                let n = e.len.min(1 << 20) as usize;
                full.read_at(&mut a[..n], off).unwrap();
                paged.read_at(&mut b[..n], off).unwrap();
                assert_eq!(a[..n], b[..n]);
            }
            off += e.len;
        }
        assert_eq!(paged.check().unwrap().corruptions(), 0);
    }
}

/// A Hyper-V checkpoint relinked to a new parent DataWriteGuid (as after a commit into its
/// parent): only parent_linkage changes, in place, and libvhdi reads the new value.
#[test]
fn hyperv_checkpoint_relinked_in_place() {
    let Some(src) = cached_fixture("dissect/differencing.avhdx.gz") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("differencing.avhdx");
    std::fs::copy(&src, &path).unwrap();
    let gate = DirGate {
        skip: true,
        ignore_id: false,
        ..DirGate::new()
    };
    let open = |writable: bool| {
        open_with(
            Box::new(blockdev::FileStorage::open(&path, writable).unwrap()),
            writable,
            &gate,
            0,
        )
        .unwrap()
    };
    let before = open(false);
    let info0 = before.info().format_specific;
    let loc0 = before.locator().unwrap().clone();
    let dwg0 = before.data_write_guid();
    drop(before);
    let linkage = vhdx::Guid::random().unwrap();
    assert!(!loc0.linkages().contains(&linkage));
    open(true).relink_parent(linkage).unwrap();

    let after = open(false);
    let loc1 = after.locator().unwrap();
    assert_eq!(loc1.locator_type, loc0.locator_type);
    assert_eq!(loc1.entries.len(), loc0.entries.len());
    for ((k0, v0), (k1, v1)) in loc0.entries.iter().zip(&loc1.entries) {
        assert_eq!(k0, k1);
        if k0 == "parent_linkage" {
            assert_eq!(*v1, linkage.braced());
        } else {
            assert_eq!(v0, v1, "{k0}");
        }
    }
    // Same guest data: DataWriteGuid kept, FileWriteGuid renewed, the log left empty.
    assert_eq!(after.data_write_guid(), dwg0);
    let info1 = after.info().format_specific;
    assert_ne!(info1["file_write_guid"], info0["file_write_guid"]);
    assert_eq!(info1["log_state"], "empty");
    assert_eq!(info1["bat_states"], info0["bat_states"]);
    assert_eq!(after.check().unwrap().corruptions(), 0);

    // libvhdi reads the new parent identifier.
    let tool = testsupport::require_tool("vhdiinfo");
    let (code, out, err) = testsupport::run(std::process::Command::new(tool).arg(&path));
    assert_eq!(code, 0, "{out}{err}");
    let want = linkage.braced();
    let want = want.trim_matches(|c| c == '{' || c == '}');
    assert!(
        out.lines()
            .any(|l| l.contains("Parent identifier") && l.contains(want)),
        "{out}"
    );
}
