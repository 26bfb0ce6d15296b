//! Per-format glue between the facade and the format crates.
//!
//! Each submodule exposes the same three functions; `vdisk` dispatches on [`Format`]:
//!
//! * `open(storage, ctx)`: open an image (its parent/backing chain through `ctx.gate`).
//! * `create(storage, spec)`: write a new empty image (fixed, dynamic, or over a parent).
//! * `writer(storage, spec)`: a sequential [`ImageWriter`] the convert engine fills.
//!
//! Options (`-o K=V`) reach the format as strings; each format parses the keys it knows and
//! refuses the others by name.

use std::path::{Path, PathBuf};

use blockdev::{BlockDevice, Error, ImageWriter, Limits, OpenGate, Result, Storage};

use crate::format::Format;

pub(crate) mod qcow2;
pub(crate) mod raw;
pub(crate) mod vhd;
pub(crate) mod vhdx;

/// What a format needs to open an image.
pub struct OpenCtx<'a> {
    /// Opens parents, backing files and data files.
    pub gate: &'a dyn OpenGate,
    /// Whether the image is opened for writing.
    pub writable: bool,
    /// Resource limits.
    pub limits: &'a Limits,
    /// Depth of this image in its chain (top image 0).
    pub depth: u32,
    /// Open-time options (`size_rule=chs|current` for VHD, `snapshot=NAME` for qcow2, ...);
    /// a format ignores keys it does not know.
    pub options: &'a [(String, String)],
}

/// A parent/backing image given for a new image (`create -b`, `convert -B`).
pub struct ParentSpec {
    /// The reference to record in the new image (as the user typed it, or made relative).
    pub reference: String,
    /// The parent's absolute path.
    pub path: PathBuf,
    /// The parent's format.
    pub format: Format,
    /// The opened parent (read-only), for its identity and size.
    pub device: Box<dyn BlockDevice>,
    /// The files of the parent's chain, the parent first.
    pub chain: Vec<PathBuf>,
}

/// What to create.
pub struct CreateSpec<'a> {
    /// Guest size in bytes.
    pub size: u64,
    /// `-o K=V` options.
    pub options: &'a [(String, String)],
    /// The parent, for differencing/overlay images.
    pub parent: Option<&'a ParentSpec>,
    /// The final path of the new image (the file may be written under a temporary name).
    pub path: Option<&'a Path>,
    /// Resource limits.
    pub limits: &'a Limits,
}

/// The format of an image opened by [`open`] (from its type: no metadata is read, unlike
/// `info()`, which walks a VHDX's BAT).
pub fn format_of(dev: &dyn BlockDevice) -> Format {
    let any = dev.as_any();
    if any.is::<::vhdx::VhdxImage>() {
        Format::Vhdx
    } else if any.is::<::vhd::VhdImage>() {
        Format::Vhd
    } else if any.is::<::qcow2::Qcow2Image>() {
        Format::Qcow2
    } else {
        Format::Raw
    }
}

/// The open options `format` uses.
pub fn open_option_keys(format: Format) -> &'static [&'static str] {
    match format {
        Format::Vhd => &["size_rule"],
        Format::Qcow2 => &["snapshot"],
        Format::Raw | Format::Vhdx => &[],
    }
}

/// Opens `storage` as `format`. Open options (the top image's only) must be ones `format`
/// uses: one it ignores (`snapshot=` on a format without snapshots) is an error, not a no-op.
pub fn open(
    format: Format,
    storage: Box<dyn Storage>,
    ctx: &OpenCtx<'_>,
) -> Result<Box<dyn BlockDevice>> {
    let known = open_option_keys(format);
    for (k, _) in ctx.options {
        if !known.contains(&k.as_str()) {
            return Err(Error::invalid_argument(format!(
                "{format} has no open option '{k}' (it has: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    match format {
        Format::Raw => raw::open(storage, ctx),
        Format::Vhd => vhd::open(storage, ctx),
        Format::Vhdx => vhdx::open(storage, ctx),
        Format::Qcow2 => qcow2::open(storage, ctx),
    }
}

/// Writes a new empty image of `format` on `storage`.
pub fn create(format: Format, storage: Box<dyn Storage>, spec: &CreateSpec<'_>) -> Result<()> {
    match format {
        Format::Raw => raw::create(storage, spec),
        Format::Vhd => vhd::create(storage, spec),
        Format::Vhdx => vhdx::create(storage, spec),
        Format::Qcow2 => qcow2::create(storage, spec),
    }
}

/// A sequential writer producing a new image of `format` on `storage`.
pub fn writer(
    format: Format,
    storage: Box<dyn Storage>,
    spec: &CreateSpec<'_>,
) -> Result<Box<dyn ImageWriter>> {
    match format {
        Format::Raw => raw::writer(storage, spec),
        Format::Vhd => vhd::writer(storage, spec),
        Format::Vhdx => vhdx::writer(storage, spec),
        Format::Qcow2 => qcow2::writer(storage, spec),
    }
}

/// Looks up option `key`, marking it used.
pub fn option<'a>(options: &'a [(String, String)], key: &str) -> Option<&'a str> {
    options
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Refuses any option whose key is not in `known`.
pub fn check_known_options(
    format: Format,
    options: &[(String, String)],
    known: &[(&str, &str)],
) -> Result<()> {
    for (k, _) in options {
        if !known.iter().any(|(key, _)| key == k) {
            let keys: Vec<&str> = known.iter().map(|(key, _)| *key).collect();
            return Err(Error::invalid_argument(if keys.is_empty() {
                format!("{format} has no options; '{k}' is not one")
            } else {
                format!(
                    "{format} does not support option '{k}' (supported: {}; -o help describes them)",
                    keys.join(", ")
                )
            }));
        }
    }
    Ok(())
}

/// The logical sector size of a new image of `format` made with `options`: its size is a
/// whole number of them.
pub fn new_logical_sector(format: Format, options: &[(String, String)]) -> Result<u32> {
    match format {
        Format::Vhdx => vhdx::logical_sector(options),
        _ => Ok(512),
    }
}

/// The `-o` options a new image of `format` takes: (key, what it takes).
pub fn create_options(format: Format) -> &'static [(&'static str, &'static str)] {
    match format {
        Format::Raw => &[],
        Format::Vhd => vhd::OPTIONS,
        Format::Vhdx => vhdx::OPTIONS,
        Format::Qcow2 => qcow2::OPTIONS,
    }
}

/// Frees leaked clusters of the image at `path` in place (`check -r leaks`); returns how many.
pub fn repair_leaks(format: Format, path: &Path) -> Result<u64> {
    match format {
        Format::Qcow2 => {
            let storage = blockdev::FileStorage::open(path, true)?;
            ::qcow2::repair_leaks(Box::new(storage)).map_err(|e| e.with_path(path))
        }
        other => Err(Error::unsupported(format!(
            "{other} images have no leak repair (their check reports leaks only)"
        ))),
    }
}
