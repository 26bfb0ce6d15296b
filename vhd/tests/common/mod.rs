//! Shared helpers of the vhd integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use blockdev::{
    file_name_of, BackingRequest, BlockDevice, Candidate, DenyGate, Error, ErrorKind, FileStorage,
    Limits, MemStorage, OpenGate, Result, Storage,
};
use vhd::{OpenParams, SizeRule, VhdImage};

/// Opens parents found next to the referrer (by relative path or file name), read-only.
pub struct DirGate {
    pub skip: bool,
    pub ignore_id: bool,
}

impl DirGate {
    pub fn new() -> Self {
        DirGate {
            skip: false,
            ignore_id: false,
        }
    }
}

impl OpenGate for DirGate {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>> {
        let dir = req
            .referrer
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut tried = Vec::new();
        for c in &req.candidates {
            let p: PathBuf = match c {
                Candidate::Relative(s) => dir.join(s),
                Candidate::ForeignAbsolute(s) | Candidate::Path(s) => match file_name_of(s) {
                    Some(n) => dir.join(n),
                    None => continue,
                },
            };
            if p.is_file() {
                let st = FileStorage::open(&p, false)?;
                let params = OpenParams {
                    gate: self,
                    writable: false,
                    limits: Limits::default(),
                    depth: req.depth,
                    size_rule: None,
                };
                return Ok(Box::new(VhdImage::open(Box::new(st), &params)?));
            }
            tried.push(p.display().to_string());
        }
        Err(Error::new(
            ErrorKind::BackingNotFound,
            format!("parent not found; tried {tried:?}"),
        ))
    }

    fn open_data_file(&self, _req: &BackingRequest<'_>, _w: bool) -> Result<Box<dyn Storage>> {
        Err(Error::new(ErrorKind::BackingDenied, "no data files"))
    }

    fn ignore_parent_id(&self) -> bool {
        self.ignore_id
    }

    fn skip_backing(&self) -> bool {
        self.skip
    }
}

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
