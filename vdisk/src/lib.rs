//! # vdisk: the library a disk-image tool depends on
//!
//! ```text
//!   probe ──> open (format crate + parent/backing chain through the ChainGate)
//!   create ─> new empty image (fixed, dynamic, differencing/overlay)
//!   engines: convert, compare, digest, map, commit — all driven by block_status
//! ```
//!
//! Everything an image is, of every format, is a [`blockdev::BlockDevice`]; this crate picks the
//! format, resolves references through a path-checking gate, and runs the engines.
#![forbid(unsafe_code)]

mod format;
pub mod formats;
mod open;
mod probe;

pub use format::Format;
pub use open::{open, ChainGate, OpenOptions};
pub use probe::probe;
