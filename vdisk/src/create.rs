//! Creating new empty images.

use std::path::{Path, PathBuf};

use blockdev::{Error, Limits, Result};

use crate::format::Format;
use crate::formats::{self, CreateSpec, ParentSpec};
use crate::open::{open_with_paths, OpenOptions};
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
    if let Err(e) = std::fs::metadata(&path) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Err(Error::new(
                blockdev::ErrorKind::BackingNotFound,
                "backing file not found",
            )
            .with_source(e)
            .with_path(&path));
        }
    }
    let opts = OpenOptions {
        format,
        limits: limits.clone(),
        ..OpenOptions::default()
    };
    let (device, chain) =
        open_with_paths(&path, &opts).map_err(|e| e.context("opening the backing image"))?;
    refuse_overwriting(new_image, &chain, "the backing file or one of its parents")?;
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
        chain,
    })
}

/// Refuses to write `dst` when it is one of `files` (`what` says which), even with `--force`:
/// the new image would destroy what it is made from or linked to (a backing file replaced by
/// its own child loops onto itself).
pub fn refuse_overwriting(dst: &Path, files: &[PathBuf], what: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    if let Some(d) = id(dst) {
        if files.iter().any(|f| id(f) == Some(d)) {
            return Err(Error::invalid_argument(format!(
                "the output is {what}: writing it would destroy the data it depends on; choose another name"
            ))
            .with_path(dst));
        }
    }
    Ok(())
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
    let tmp = pending.tmp_path().to_path_buf();
    formats::create(opts.format, Box::new(storage), &spec)
        .map_err(|e| e.replace_path(&tmp, path))?;
    pending.publish()
}
