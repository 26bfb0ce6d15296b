//! Creating new empty images.

use std::path::{Path, PathBuf};

use blockdev::{Error, Limits, Result};

use crate::format::Format;
use crate::formats::{self, CreateSpec, ParentSpec};
use crate::open::{open, OpenOptions};
use crate::output::PendingOutput;

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Format of the new image.
    pub format: Format,
    /// Guest size; `None` takes the parent's size.
    pub size: Option<u64>,
    /// `-o K=V` options.
    pub options: Vec<(String, String)>,
    /// `-b`: the parent/backing file as the user named it.
    pub backing: Option<String>,
    /// `-F`: the parent's format (probed when absent).
    pub backing_format: Option<Format>,
    /// Replace an existing file.
    pub force: bool,
    /// Resource limits.
    pub limits: Limits,
}

/// Opens the parent named `reference` (relative to the new image's directory, as it will be
/// recorded) for use by `create -b` and `convert -B`.
pub fn open_parent(
    new_image: &Path,
    reference: &str,
    format: Option<Format>,
    limits: &Limits,
) -> Result<ParentSpec> {
    let p = Path::new(reference);
    let path: PathBuf = if p.is_absolute() {
        p.to_path_buf()
    } else {
        new_image
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    };
    let opts = OpenOptions {
        format,
        limits: limits.clone(),
        ..OpenOptions::default()
    };
    let device = open(&path, &opts).map_err(|e| e.context("opening the backing image"))?;
    let format = match format {
        Some(f) => f,
        None => {
            let s = blockdev::FileStorage::open(&path, false)?;
            crate::probe::probe(&s)?
        }
    };
    let abs = path
        .canonicalize()
        .map_err(|e| Error::io("resolving the backing path", e).with_path(&path))?;
    Ok(ParentSpec {
        reference: reference.to_string(),
        path: abs,
        format,
        device,
    })
}

/// Creates a new image at `path`, atomically.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let parent = match &opts.backing {
        Some(r) => Some(open_parent(path, r, opts.backing_format, &opts.limits)?),
        None => None,
    };
    let size = match (opts.size, &parent) {
        (Some(s), _) => s,
        (None, Some(p)) => p.device.size(),
        (None, None) => {
            return Err(Error::invalid_argument(
                "a size is needed (or a backing file to take it from)",
            ))
        }
    };
    let (pending, storage) = PendingOutput::create(path, opts.force)?;
    let spec = CreateSpec {
        size,
        options: &opts.options,
        parent: parent.as_ref(),
        path: Some(path),
        limits: &opts.limits,
    };
    formats::create(opts.format, Box::new(storage), &spec)?;
    pending.publish()
}
