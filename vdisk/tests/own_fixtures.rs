//! The project's own fixtures (tests/fixtures/make.sh, made with qemu-img and qemu-io) read back
//! exactly as qemu-img reads them, through probing and the whole chain.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

use testsupport::{qemu_sha256, require_tool, run, sha256_device, workspace_root};
use vdisk::{Format, OpenOptions};

#[test]
fn generated_fixtures_read_like_qemu() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let script = workspace_root().join("tests/fixtures/make.sh");
    let (code, out, err) = run(Command::new("bash").arg(&script).arg(dir.path()));
    assert_eq!(code, 0, "make.sh failed: {out}{err}");
    let cases = [
        ("base.raw", Format::Raw, "raw"),
        ("qemu-base.qcow2", Format::Qcow2, "qcow2"),
        ("qemu-base.vhdx", Format::Vhdx, "vhdx"),
        ("qemu-dynamic.vhd", Format::Vhd, "vpc"),
        ("qemu-fixed.vhd", Format::Vhd, "vpc"),
        ("qemu-forcesize.vhd", Format::Vhd, "vpc"),
        ("qemu-zlib.qcow2", Format::Qcow2, "qcow2"),
        ("qemu-zstd.qcow2", Format::Qcow2, "qcow2"),
        ("qemu-overlay.qcow2", Format::Qcow2, "qcow2"),
    ];
    for (name, format, qf) in cases {
        let path = dir.path().join(name);
        let probed = vdisk::probe(&blockdev::FileStorage::open(&path, false).unwrap()).unwrap();
        assert_eq!(probed, format, "{name} probed as {probed}");
        let dev =
            vdisk::open(&path, &OpenOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (code, info, _) = run(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", qf])
            .arg(&path));
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(
            dev.size(),
            v["virtual-size"].as_u64().unwrap(),
            "{name}: virtual size"
        );
        assert_eq!(
            sha256_device(dev.as_ref()),
            qemu_sha256(&path, qf),
            "{name}: content"
        );
    }
}
