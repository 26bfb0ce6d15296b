//! Shared helpers of the vhd integration tests.
#![allow(dead_code)]

use std::path::Path;

use blockdev::{
    BackingRequest, BlockDevice, DenyGate, Error, ErrorKind, FileStorage, Limits, MemStorage,
    OpenGate, Result, Storage,
};
use testsupport::ParentFormat;
use vhd::{OpenParams, SizeRule, VhdImage};

/// Parents beside the referrer, opened as VHDs.
pub struct Vhd;

impl ParentFormat for Vhd {
    fn open_parent(
        storage: Box<dyn Storage>,
        gate: &dyn OpenGate,
        depth: u32,
    ) -> Result<Box<dyn BlockDevice>> {
        let params = OpenParams {
            gate,
            writable: false,
            limits: Limits::default(),
            depth,
            size_rule: None,
        };
        Ok(Box::new(VhdImage::open(storage, &params)?))
    }
}

pub type DirGate = testsupport::DirGate<Vhd>;

pub fn open_path(path: &Path, writable: bool) -> Result<VhdImage> {
    let gate = DirGate::new();
    let st = FileStorage::open(path, writable)?;
    VhdImage::open(Box::new(st), &params(&gate, writable, None))
}

pub fn params(gate: &dyn OpenGate, writable: bool, rule: Option<SizeRule>) -> OpenParams<'_> {
    OpenParams {
        gate,
        writable,
        limits: Limits::default(),
        depth: 0,
        size_rule: rule,
    }
}

pub fn open_mem(bytes: Vec<u8>, writable: bool) -> Result<VhdImage> {
    VhdImage::open(
        Box::new(MemStorage::from_vec(bytes)),
        &params(&DenyGate, writable, None),
    )
}

/// Opens a parent held in memory (any candidate naming `base.vhd`).
pub struct MemGate(pub std::sync::Arc<MemStorage>);

impl OpenGate for MemGate {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>> {
        assert!(req.candidates.iter().any(|c| c.text().contains("base.vhd")));
        let mut p = params(&DenyGate, false, None);
        p.depth = req.depth;
        Ok(Box::new(VhdImage::open(Box::new(self.0.clone()), &p)?))
    }
    fn open_data_file(&self, _r: &BackingRequest<'_>, _w: bool) -> Result<Box<dyn Storage>> {
        Err(Error::new(ErrorKind::BackingDenied, "no"))
    }
}
