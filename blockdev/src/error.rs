//! The one error type every crate of the workspace returns.
//!
//! An [`Error`] carries a stable [`ErrorKind`] that callers match on, a message, and optional
//! context: the on-disk field that was wrong, the byte offset where it sits, the file it belongs
//! to and the operation that failed. The underlying cause (an `io::Error`, a format crate's own
//! error enum) is kept as the `source()`, never folded into the message.

use std::fmt;
use std::path::{Path, PathBuf};

/// Stable classification of an [`Error`]. Scripts and tests match on this, not on messages.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The operating system reported an I/O error.
    Io,
    /// The bytes are not an image of the expected format (wrong magic, wrong version).
    InvalidFormat,
    /// The image claims to be of the format but its metadata is inconsistent or out of range.
    Corrupt,
    /// A valid feature this implementation does not handle.
    Unsupported,
    /// A request outside the device (offset or length past the end, misaligned I/O).
    OutOfBounds,
    /// A write was attempted on an image opened read-only, or one that must not be written.
    ReadOnly,
    /// A size or count from the file exceeds a configured [`crate::Limits`] value.
    LimitExceeded,
    /// The open gate refused to open a referenced file (backing file, parent, data file).
    BackingDenied,
    /// A referenced file (parent, backing file, data file) could not be found.
    BackingNotFound,
    /// A referenced file was found but is not the one the image was made against.
    BackingMismatch,
    /// The caller passed an invalid argument (bad option, bad size).
    InvalidArgument,
    /// The destination exists and overwriting was not allowed.
    AlreadyExists,
    /// The operation was interrupted (signal, cancellation).
    Interrupted,
    /// The input matches more than one format.
    Ambiguous,
    /// Data read back does not match what was expected (verification failure).
    Mismatch,
}

impl ErrorKind {
    /// A short stable name for the kind, as printed in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::InvalidFormat => "invalid_format",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::OutOfBounds => "out_of_bounds",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::LimitExceeded => "limit_exceeded",
            ErrorKind::BackingDenied => "backing_denied",
            ErrorKind::BackingNotFound => "backing_not_found",
            ErrorKind::BackingMismatch => "backing_mismatch",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::Ambiguous => "ambiguous",
            ErrorKind::Mismatch => "mismatch",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error type of the workspace. Build one with the constructors ([`Error::corrupt`],
/// [`Error::io`], ...) and add context with the `with_*` methods.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    field: Option<String>,
    offset: Option<u64>,
    path: Option<PathBuf>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias used across the workspace.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            field: None,
            offset: None,
            path: None,
            source: None,
        }
    }

    /// Metadata field `field` at byte `offset` violates a rule of the format.
    pub fn corrupt(field: &str, offset: u64, message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
            .with_field(field)
            .with_offset(offset)
    }

    /// Not an image of the expected format; `field` names the magic or version field.
    pub fn invalid_format(field: &str, offset: u64, message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidFormat, message)
            .with_field(field)
            .with_offset(offset)
    }

    /// A feature that is valid but not handled.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// A value read from field `field` at `offset` exceeds a limit.
    pub fn limit(field: &str, offset: u64, message: impl Into<String>) -> Self {
        Error::new(ErrorKind::LimitExceeded, message)
            .with_field(field)
            .with_offset(offset)
    }

    /// The caller passed an invalid argument.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// The device is read-only.
    pub fn read_only(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::ReadOnly, message)
    }

    /// A request outside the device.
    pub fn out_of_bounds(offset: u64, len: u64, size: u64) -> Self {
        Error::new(
            ErrorKind::OutOfBounds,
            format!("request of {len} bytes at {offset:#x} is outside the device of {size} bytes"),
        )
        .with_offset(offset)
    }

    /// An I/O error from the operating system, while doing `what`.
    pub fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        let kind = if err.kind() == std::io::ErrorKind::Interrupted {
            ErrorKind::Interrupted
        } else {
            ErrorKind::Io
        };
        Error::new(kind, what).with_source(err)
    }

    /// Names the on-disk field the error is about.
    pub fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_string());
        self
    }

    /// The byte offset (in the file) the error is about.
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// The file the error is about. Keeps an already set path (the innermost is most precise).
    pub fn with_path(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefixes the message with what was being done, keeping kind and context.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The on-disk field the error names, if any.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// The file offset the error names, if any.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The file the error is about, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Names `to` instead of `from` (a temporary file, in errors about its destination).
    pub fn replace_path(mut self, from: &Path, to: &Path) -> Self {
        if self.path.as_deref() == Some(from) {
            self.path = Some(to.to_path_buf());
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        f.write_str(&self.message)?;
        match (&self.field, self.offset) {
            (Some(field), Some(off)) => write!(f, " (field {field} at offset {off:#x})"),
            (Some(field), None) => write!(f, " (field {field})"),
            (None, Some(off)) => write!(f, " (at offset {off:#x})"),
            (None, None) => Ok(()),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::io("I/O error", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_field_and_offset() {
        let e = Error::corrupt("bat_entry", 0x600, "entry points past the end of the file")
            .with_path(Path::new("/x/a.vhd"));
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(
            e.to_string(),
            "/x/a.vhd: entry points past the end of the file (field bat_entry at offset 0x600)"
        );
    }
}
