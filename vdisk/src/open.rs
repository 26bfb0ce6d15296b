//! Opening images with their whole parent/backing chain, through a path-checking open gate.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blockdev::{
    file_name_of, has_protocol_prefix, resolve_relative, BackingRequest, BlockDevice, Candidate,
    Error, ErrorKind, FileStorage, Limits, OpenGate, Result, Storage,
};

use crate::format::Format;
use crate::formats::{self, OpenCtx};
use crate::probe::probe;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format; `None` probes (read-only opens only).
    pub format: Option<Format>,
    /// Open for writing (the top image only; parents always open read-only).
    pub writable: bool,
    /// Follow no parent/backing references.
    pub no_backing: bool,
    /// Extra directories where referenced files may be found.
    pub backing_dirs: Vec<PathBuf>,
    /// Accept a parent whose identity does not match.
    pub ignore_parent_id: bool,
    /// Resource limits.
    pub limits: Limits,
    /// Format open options (`size_rule=chs|current`, `snapshot=NAME`).
    pub format_options: Vec<(String, String)>,
}

/// Opens the image at `path` with its chain.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let gate = ChainGate::new(opts.clone());
    gate.open_top(path)
}

/// Opens the image at `path` with its chain, and returns the files of the chain, top first.
pub fn open_with_paths(
    path: &Path,
    opts: &OpenOptions,
) -> Result<(Box<dyn BlockDevice>, Vec<PathBuf>)> {
    let gate = ChainGate::new(opts.clone());
    let dev = gate.open_top(path)?;
    let mut paths = vec![path.to_path_buf()];
    if let Ok(opened) = gate.opened.lock() {
        // Parents are opened depth-first: the deepest finishes first, so order by depth.
        let mut v: Vec<(u32, PathBuf)> = opened.clone();
        v.sort_by_key(|(d, _)| *d);
        paths.extend(v.into_iter().map(|(_, p)| p));
    }
    Ok((dev, paths))
}

/// The gate the CLI uses: references resolve inside the referring image's directory (and the
/// directories the user adds), to regular files only, without protocol prefixes, with depth
/// and cycle limits.
pub struct ChainGate {
    opts: OpenOptions,
    /// (device, inode) of every file opened so far in this chain.
    visited: Mutex<HashSet<(u64, u64)>>,
    /// Backing files opened, with their depth.
    opened: Mutex<Vec<(u32, PathBuf)>>,
}

impl ChainGate {
    /// A gate with `opts`' policy.
    pub fn new(opts: OpenOptions) -> Self {
        ChainGate {
            opts,
            visited: Mutex::new(HashSet::new()),
            opened: Mutex::new(Vec::new()),
        }
    }

    /// Opens the top image of a chain.
    pub fn open_top(&self, path: &Path) -> Result<Box<dyn BlockDevice>> {
        // A missing top image is a plain I/O error (exit 1): `BackingNotFound` is for the
        // files an image names.
        let md = std::fs::metadata(path).map_err(|e| {
            Error::new(ErrorKind::Io, "cannot open")
                .with_source(e)
                .with_path(path)
        })?;
        self.visit(&md, path)?;
        let storage = FileStorage::open(path, self.opts.writable)?;
        let format = match self.opts.format {
            Some(f) => f,
            None => {
                let f = probe(&storage).map_err(|e| e.with_path(path))?;
                if self.opts.writable && f == Format::Raw {
                    return Err(Error::invalid_argument(
                        "refusing to open a probed raw image for writing; name the format with -f raw",
                    )
                    .with_path(path));
                }
                f
            }
        };
        let ctx = OpenCtx {
            gate: self,
            writable: self.opts.writable,
            limits: &self.opts.limits,
            depth: 0,
            options: &self.opts.format_options,
        };
        formats::open(format, Box::new(storage), &ctx).map_err(|e| e.with_path(path))
    }

    fn visit(&self, md: &std::fs::Metadata, path: &Path) -> Result<()> {
        let mut v = self
            .visited
            .lock()
            .map_err(|_| Error::new(ErrorKind::Io, "gate lock poisoned"))?;
        if !v.insert((md.dev(), md.ino())) {
            return Err(Error::new(
                ErrorKind::BackingDenied,
                "backing chain has a cycle: this file is already part of it",
            )
            .with_path(path));
        }
        Ok(())
    }

    fn allowed_dirs(&self, referrer: Option<&Path>) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(dir) = referrer.and_then(Path::parent) {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            dirs.push(dir.to_path_buf());
        }
        dirs.extend(self.opts.backing_dirs.iter().cloned());
        dirs
    }

    /// The files to try for a request, best first, each checked against the policy.
    fn resolve(&self, req: &BackingRequest<'_>) -> Result<(Vec<PathBuf>, Vec<String>)> {
        let dirs = self.allowed_dirs(req.referrer);
        let canon_dirs: Vec<PathBuf> = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
        let mut tries = Vec::new();
        let mut refused = Vec::new();
        let push = |p: PathBuf, tries: &mut Vec<PathBuf>| {
            // Absolute, so the paths tried read clearly in errors and duplicates collapse.
            let p = std::path::absolute(&p).unwrap_or(p);
            if !tries.contains(&p) {
                tries.push(p);
            }
        };
        for cand in &req.candidates {
            let text = cand.text();
            if text.is_empty() {
                continue;
            }
            if text.contains('\0') || has_protocol_prefix(text) {
                refused.push(format!("{text:?} (protocol or invalid name)"));
                continue;
            }
            match cand {
                Candidate::Relative(s) | Candidate::Path(s) => {
                    if let Some(p) = resolve_relative(req.referrer, s) {
                        push(p, &mut tries);
                    }
                    if let Some(name) = file_name_of(s) {
                        for d in &dirs {
                            push(d.join(name), &mut tries);
                        }
                    }
                }
                Candidate::ForeignAbsolute(s) => {
                    if let Some(name) = file_name_of(s) {
                        for d in &dirs {
                            push(d.join(name), &mut tries);
                        }
                    }
                }
            }
        }
        // Confinement: a candidate must sit (after resolving links) inside an allowed directory.
        let mut ok = Vec::new();
        for p in tries {
            match p.canonicalize() {
                Ok(c) => {
                    let inside = c
                        .parent()
                        .map(|parent| canon_dirs.iter().any(|d| parent.starts_with(d)))
                        .unwrap_or(false);
                    if inside {
                        ok.push(p);
                    } else {
                        refused.push(format!(
                            "{} (outside the image's directory; allow it with --backing-dir)",
                            p.display()
                        ));
                    }
                }
                Err(_) => refused.push(format!("{} (not found)", p.display())),
            }
        }
        Ok((ok, refused))
    }

    fn not_found(req: &BackingRequest<'_>, refused: &[String]) -> Error {
        // Found but refused (outside the allowed directories) is not "not found".
        let what = if refused.iter().all(|r| r.ends_with("(not found)")) {
            "not found"
        } else {
            "not opened"
        };
        Error::new(
            ErrorKind::BackingNotFound,
            format!(
                "parent/backing file {} {what}; tried: {}",
                recorded_names(req),
                if refused.is_empty() {
                    "nothing".to_string()
                } else {
                    refused.join(", ")
                }
            ),
        )
    }

    fn check_depth(&self, req: &BackingRequest<'_>) -> Result<()> {
        if self.opts.no_backing {
            return Err(Error::new(
                ErrorKind::BackingDenied,
                format!(
                    "not following the reference to {} (--no-backing)",
                    recorded_names(req)
                ),
            ));
        }
        if req.depth > self.opts.limits.max_chain_depth {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!(
                    "backing chain deeper than {} images",
                    self.opts.limits.max_chain_depth
                ),
            ));
        }
        Ok(())
    }
}

impl OpenGate for ChainGate {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>> {
        self.check_depth(req)?;
        let (tries, mut refused) = self.resolve(req)?;
        for path in tries {
            let md = match std::fs::metadata(&path) {
                Ok(md) => md,
                Err(_) => {
                    refused.push(format!("{} (not found)", path.display()));
                    continue;
                }
            };
            if !md.file_type().is_file() {
                refused.push(format!("{} (not a regular file)", path.display()));
                continue;
            }
            self.visit(&md, &path)?;
            let storage = FileStorage::open(&path, false)?;
            let format = match &req.format {
                Some(f) => f.parse::<Format>()?,
                None => probe(&storage).map_err(|e| e.with_path(&path))?,
            };
            let ctx = OpenCtx {
                gate: self,
                writable: false,
                limits: &self.opts.limits,
                depth: req.depth,
                options: &[],
            };
            let dev =
                formats::open(format, Box::new(storage), &ctx).map_err(|e| e.with_path(&path))?;
            if let Ok(mut o) = self.opened.lock() {
                o.push((req.depth, path.clone()));
            }
            return Ok(dev);
        }
        Err(Self::not_found(req, &refused))
    }

    fn open_data_file(&self, req: &BackingRequest<'_>, writable: bool) -> Result<Box<dyn Storage>> {
        let (tries, mut refused) = self.resolve(req)?;
        for path in tries {
            match std::fs::metadata(&path) {
                Ok(md) if md.file_type().is_file() => {
                    return Ok(Box::new(FileStorage::open(&path, writable)?));
                }
                _ => refused.push(format!("{} (not a regular file)", path.display())),
            }
        }
        Err(Self::not_found(req, &refused))
    }

    fn ignore_parent_id(&self) -> bool {
        self.opts.ignore_parent_id
    }

    fn skip_backing(&self) -> bool {
        self.opts.no_backing
    }
}

/// The names a reference records (VHD/VHDX keep several), quoted, distinct, in order.
fn recorded_names(req: &BackingRequest<'_>) -> String {
    let mut names: Vec<&str> = Vec::new();
    for c in &req.candidates {
        let t = c.text();
        if !t.is_empty() && !names.contains(&t) {
            names.push(t);
        }
    }
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(" or ")
}
