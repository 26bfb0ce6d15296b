//! A directory gate for the format crates' own tests, which cannot use vdisk's ChainGate
//! (vdisk depends on them).

use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use blockdev::{
    file_name_of, resolve_relative, BackingRequest, BlockDevice, Candidate, Error, ErrorKind,
    FileStorage, OpenGate, Result, Storage,
};

/// How a test opens a parent file of its format, read-only, through `gate` (for the parent's
/// own parent).
pub trait ParentFormat {
    /// Opens `storage` as a parent at chain depth `depth`.
    fn open_parent(
        storage: Box<dyn Storage>,
        gate: &dyn OpenGate,
        depth: u32,
    ) -> Result<Box<dyn BlockDevice>>;
}

/// Opens parents found next to the referrer: relative references resolved against its
/// directory, and the file names of absolute ones looked up there. No data files.
pub struct DirGate<F> {
    /// Follows no parent at all (`skip_backing`).
    pub skip: bool,
    /// Accepts a parent whose identity does not match (`ignore_parent_id`).
    pub ignore_id: bool,
    /// The format parents are opened as (a `fn` marker: the gate stays Send + Sync).
    pub format: PhantomData<fn() -> F>,
}

impl<F> DirGate<F> {
    /// A gate that follows parents and checks their identity.
    pub fn new() -> Self {
        DirGate {
            skip: false,
            ignore_id: false,
            format: PhantomData,
        }
    }
}

impl<F> Default for DirGate<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: ParentFormat> OpenGate for DirGate<F> {
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
                Candidate::ForeignAbsolute(a) | Candidate::Path(a) => {
                    file_name_of(a).map(|n| dir.join(n))
                }
            };
            let Some(p) = p else { continue };
            tried.push(p.display().to_string());
            if p.is_file() {
                let storage = FileStorage::open(&p, false)?;
                return F::open_parent(Box::new(storage), self, req.depth);
            }
        }
        Err(Error::new(
            ErrorKind::BackingNotFound,
            format!("parent not found; tried: {}", tried.join(", ")),
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
