//! Exit codes: automation relies on these, they are stable.

use blockdev::ErrorKind;

/// The exit codes of `vdconv`.
///
/// | code | meaning |
/// |---|---|
/// | 0 | success (`compare`: identical; `check`: clean) |
/// | 1 | runtime error (`compare`: the images differ) |
/// | 2 | usage error (bad arguments); `compare`: an error occurred |
/// | 3 | `check` found corruption |
/// | 4 | `check` found only leaks |
/// | 5 | unsupported format or feature |
/// | 6 | a referenced parent/backing file is missing, denied or mismatched |
/// | 130 | interrupted (Ctrl-C, SIGTERM); nothing was left at the destination |
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Success.
    Ok = 0,
    /// Runtime error, or `compare` found a difference.
    Error = 1,
    /// Bad arguments, or an error during `compare`.
    Usage = 2,
    /// `check` found corruption.
    Corrupt = 3,
    /// `check` found only leaks.
    Leaks = 4,
    /// Unsupported format or feature.
    Unsupported = 5,
    /// A parent/backing file problem.
    Backing = 6,
    /// Interrupted.
    Interrupted = 130,
}

impl Code {
    /// The code for an error of `kind`.
    pub fn for_error(kind: ErrorKind) -> Code {
        match kind {
            ErrorKind::Unsupported => Code::Unsupported,
            ErrorKind::InvalidArgument => Code::Usage,
            ErrorKind::BackingNotFound | ErrorKind::BackingDenied | ErrorKind::BackingMismatch => {
                Code::Backing
            }
            ErrorKind::Interrupted => Code::Interrupted,
            _ => Code::Error,
        }
    }
}
