//! Shared helpers of the qcow2 integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use blockdev::{
    BackingRequest, BlockDevice, Error, ErrorKind, FileStorage, OpenGate, RawImage, Result, Storage,
};
use qcow2::{OpenOptions, Qcow2Image};

/// A test gate: opens relative names next to the referrer, qcow2 or raw by recorded format.
pub struct TestGate;

fn resolve(req: &BackingRequest<'_>) -> Result<PathBuf> {
    let c = req
        .candidates
        .first()
        .ok_or_else(|| Error::new(ErrorKind::BackingNotFound, "none"))?;
    blockdev::resolve_relative(req.referrer, c.text())
        .ok_or_else(|| Error::new(ErrorKind::BackingDenied, "refused"))
}

impl OpenGate for TestGate {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>> {
        if req.depth > 16 {
            return Err(Error::new(ErrorKind::LimitExceeded, "too deep"));
        }
        let p = resolve(req)?;
        let st = FileStorage::open(&p, false)?;
        match req.format.as_deref() {
            Some("raw") => Ok(Box::new(RawImage::open(Box::new(st) as Box<dyn Storage>)?)),
            _ => {
                let opts = OpenOptions {
                    depth: req.depth,
                    ..OpenOptions::default()
                };
                Ok(Box::new(Qcow2Image::open(Box::new(st), self, &opts)?))
            }
        }
    }

    fn open_data_file(&self, req: &BackingRequest<'_>, writable: bool) -> Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::open(&resolve(req)?, writable)?))
    }
}

pub fn open(path: &Path) -> Qcow2Image {
    let st = FileStorage::open(path, false).unwrap();
    Qcow2Image::open(Box::new(st), &TestGate, &OpenOptions::default()).unwrap()
}

pub fn open_rw(path: &Path) -> Qcow2Image {
    let st = FileStorage::open(path, true).unwrap();
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    Qcow2Image::open(Box::new(st), &TestGate, &opts).unwrap()
}

pub fn qemu_img(args: &[&str]) -> (i32, String, String) {
    testsupport::require_tool("qemu-img");
    testsupport::run(Command::new("qemu-img").args(args))
}

/// `qemu-img create -q -f qcow2 ARGS...`, which must succeed.
pub fn qemu_create(args: &[&str]) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend_from_slice(args);
    let (rc, _, err) = qemu_img(&all);
    assert_eq!(rc, 0, "qemu-img create failed: {err}");
}

pub fn qemu_io(file: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(file);
    let (rc, out, err) = testsupport::run(&mut c);
    assert_eq!(rc, 0, "qemu-io failed: {out} {err}");
}

/// Asserts `qemu-img check` finds no corruption and no leak.
pub fn qemu_check_clean(path: &Path) {
    let (rc, out, err) = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    assert_eq!(rc, 0, "qemu-img check {}: {out}\n{err}", path.display());
}

/// Compares a device with what qemu-img reads of `path`.
pub fn assert_same_as_qemu(dev: &dyn BlockDevice, path: &Path) {
    let ours = testsupport::sha256_device(dev);
    let theirs = testsupport::qemu_sha256(path, "qcow2");
    assert_eq!(ours, theirs, "{}", path.display());
}
