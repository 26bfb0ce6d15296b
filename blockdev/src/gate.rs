//! The open gate: the only way a format opens a file named inside an image.
//!
//! A parent locator, a qcow2 backing file name or a qcow2 external data file name is untrusted:
//! a crafted image can name `/etc/shadow` or a host device. Format crates therefore never open
//! such a file themselves; they describe what they need in a [`BackingRequest`] and the caller's
//! [`OpenGate`] decides which file, if any, is opened. The library default, [`DenyGate`], opens
//! nothing.

use std::path::{Path, PathBuf};

use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// One way to find a referenced file, as recorded in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// A path relative to the referring image's directory (qcow2 backing name, VHD W2ru,
    /// VHDX relative_path). Backslashes are already turned into `/`.
    Relative(String),
    /// An absolute path recorded by another host (VHD W2ku, VHDX absolute_win32_path): only
    /// its file name is looked for, in the referring image's directory and the allowed ones.
    ForeignAbsolute(String),
    /// A plain path as recorded (a qcow2 absolute backing name); the gate applies its policy.
    Path(String),
}

impl Candidate {
    /// The text as recorded.
    pub fn text(&self) -> &str {
        match self {
            Candidate::Relative(s) | Candidate::ForeignAbsolute(s) | Candidate::Path(s) => s,
        }
    }
}

/// What a format asks the gate to open.
#[derive(Debug, Clone)]
pub struct BackingRequest<'a> {
    /// The image that makes the reference, when it is a file.
    pub referrer: Option<&'a Path>,
    /// Ways to find the file, best first.
    pub candidates: Vec<Candidate>,
    /// The format the image records for the file (`raw`, `qcow2`, ...), if any.
    pub format: Option<String>,
    /// Depth of the requested file in the chain (the top image is 0, its parent 1).
    pub depth: u32,
}

/// Decides whether and how referenced files are opened.
pub trait OpenGate: Send + Sync {
    /// Opens a parent/backing image (read-only), of any format.
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>>;

    /// Opens an external data file (qcow2), read-only unless `writable`.
    fn open_data_file(&self, req: &BackingRequest<'_>, writable: bool) -> Result<Box<dyn Storage>>;

    /// Whether a parent whose identity (UUID, DataWriteGuid) does not match may still be used.
    fn ignore_parent_id(&self) -> bool {
        false
    }

    /// Whether the caller wants the reference left unresolved (`info` of a lone child,
    /// `--no-backing`): the format then opens the image without its parent and reads of
    /// unallocated ranges fail.
    fn skip_backing(&self) -> bool {
        false
    }
}

/// Opens nothing: every request is refused with `BackingDenied`, naming the reference.
#[derive(Debug, Default, Clone, Copy)]
pub struct DenyGate;

impl OpenGate for DenyGate {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>> {
        Err(denied(req))
    }

    fn open_data_file(
        &self,
        req: &BackingRequest<'_>,
        _writable: bool,
    ) -> Result<Box<dyn Storage>> {
        Err(denied(req))
    }
}

fn denied(req: &BackingRequest<'_>) -> Error {
    let names: Vec<&str> = req.candidates.iter().map(Candidate::text).collect();
    Error::new(
        ErrorKind::BackingDenied,
        format!("opening referenced file {:?} is not allowed", names),
    )
}

/// Splits a recorded path on `/` and `\` and returns its last component.
pub fn file_name_of(recorded: &str) -> Option<&str> {
    recorded
        .rsplit(['/', '\\'])
        .next()
        .filter(|s| !s.is_empty() && *s != "." && *s != "..")
}

/// Joins a recorded relative reference to the referrer's directory; `None` for references a
/// gate must refuse outright (protocol and `json:` prefixes, NUL bytes).
pub fn resolve_relative(referrer: Option<&Path>, recorded: &str) -> Option<PathBuf> {
    if recorded.is_empty() || recorded.contains('\0') || has_protocol_prefix(recorded) {
        return None;
    }
    let rel = recorded.replace('\\', "/");
    let rel = rel.strip_prefix("./").unwrap_or(&rel).to_string();
    let p = Path::new(&rel);
    if p.is_absolute() {
        return Some(p.to_path_buf());
    }
    let dir = referrer
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    Some(dir.join(p))
}

/// Whether a reference names a protocol (`nbd:`, `json:`, `http://`): never opened as a file.
pub fn has_protocol_prefix(recorded: &str) -> bool {
    if let Some((scheme, _)) = recorded.split_once(':') {
        // A one-letter "scheme" is a Windows drive letter, not a protocol.
        scheme.len() > 1
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_prefixes() {
        assert_eq!(file_name_of(r"C:\vms\base.vhd"), Some("base.vhd"));
        assert_eq!(file_name_of("/a/b/c.qcow2"), Some("c.qcow2"));
        assert_eq!(file_name_of("dir/"), None);
        assert!(has_protocol_prefix("json:{}"));
        assert!(has_protocol_prefix("nbd://host/x"));
        assert!(!has_protocol_prefix(r"C:\x.vhd"));
        assert!(!has_protocol_prefix("base.qcow2"));
        assert_eq!(
            resolve_relative(Some(Path::new("/d/top.vhdx")), r".\base.vhdx"),
            Some(PathBuf::from("/d/base.vhdx"))
        );
        assert_eq!(resolve_relative(None, "json:{}"), None);
    }
}
