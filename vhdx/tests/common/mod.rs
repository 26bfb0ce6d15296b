//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use blockdev::{
    file_name_of, resolve_relative, BackingRequest, BlockDevice, Candidate, Error, ErrorKind,
    FileStorage, Limits, OpenGate, Result, Storage,
};
use vhdx::{OpenOptions, VhdxImage};

/// A gate like the CLI's: relative paths and foreign absolute names in the referrer's directory.
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
            let p: Option<PathBuf> = match c {
                Candidate::Relative(r) => resolve_relative(req.referrer, r),
                Candidate::ForeignAbsolute(a) => file_name_of(a).map(|n| dir.join(n)),
                Candidate::Path(p) => Some(PathBuf::from(p)),
            };
            let Some(p) = p else { continue };
            tried.push(p.display().to_string());
            if p.is_file() {
                let s = FileStorage::open(&p, false)?;
                let img = open_with(Box::new(s), false, self, req.depth)?;
                return Ok(Box::new(img));
            }
        }
        Err(Error::new(
            ErrorKind::BackingNotFound,
            format!("parent not found; tried: {}", tried.join(", ")),
        ))
    }

    fn open_data_file(&self, _req: &BackingRequest<'_>, _w: bool) -> Result<Box<dyn Storage>> {
        Err(Error::unsupported("no data files"))
    }

    fn ignore_parent_id(&self) -> bool {
        self.ignore_id
    }

    fn skip_backing(&self) -> bool {
        self.skip
    }
}

pub fn open_with(
    storage: Box<dyn Storage>,
    writable: bool,
    gate: &dyn OpenGate,
    depth: u32,
) -> Result<VhdxImage> {
    let limits = Limits::default();
    VhdxImage::open(
        storage,
        &OpenOptions {
            gate,
            writable,
            limits: &limits,
            depth,
        },
    )
}

pub fn open_path(path: &Path, writable: bool) -> Result<VhdxImage> {
    open_with(
        Box::new(FileStorage::open(path, writable)?),
        writable,
        &DirGate::new(),
        0,
    )
}

pub fn open_mem(data: Vec<u8>, writable: bool) -> Result<VhdxImage> {
    open_with(
        Box::new(blockdev::MemStorage::from_vec(data)),
        writable,
        &DirGate::new(),
        0,
    )
}

/// A gate that opens one in-memory VHDX parent, whatever the candidates.
pub struct MemGate {
    pub parent: Vec<u8>,
}

impl OpenGate for MemGate {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>> {
        let img = open_with(
            Box::new(blockdev::MemStorage::read_only(self.parent.clone())),
            false,
            &DirGate::new(),
            req.depth,
        )?;
        Ok(Box::new(img))
    }

    fn open_data_file(&self, _req: &BackingRequest<'_>, _w: bool) -> Result<Box<dyn Storage>> {
        Err(Error::unsupported("no data files"))
    }
}

/// Creates an image in memory.
pub fn create_mem(opts: &vhdx::CreateOptions) -> Vec<u8> {
    let m = blockdev::MemStorage::new();
    vhdx::create(&m, opts).unwrap();
    m.to_vec()
}

/// Reads the whole guest content.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

/// The parent link of an in-memory parent image.
pub fn link_of(parent: &VhdxImage) -> vhdx::create::ParentLink {
    vhdx::create::ParentLink {
        data_write_guid: parent.data_write_guid(),
        disk_id: parent.disk_id(),
        size: parent.size(),
        logical: parent.sector_sizes().logical,
        relative_path: ".\\parent.vhdx".into(),
        absolute_win32_path: "C:\\vms\\parent.vhdx".into(),
    }
}
