//! # vdisk: the library a disk-image tool depends on
//!
//! ```text
//!   probe ──> open (format crate + parent/backing chain through the ChainGate)
//!   create ─> new empty image (fixed, dynamic, differencing/overlay), atomically
//!   engines: convert, compare, digest, map — all driven by block_status of the chain
//! ```
//!
//! Everything an image is, of every format, is a [`blockdev::BlockDevice`]; this crate picks the
//! format, resolves references through a path-checking gate, and runs the engines. New files
//! are written under a temporary name beside the destination and renamed into place only after
//! a successful flush ([`PendingOutput`]).
#![forbid(unsafe_code)]

pub mod chain;
mod commit;
mod compare;
mod convert;
mod create;
pub mod digest;
mod format;
pub mod formats;
mod keep_chain;
mod map;
mod open;
mod output;
pub mod pipeline;
mod probe;
pub mod view;

pub use commit::commit;
pub use compare::{compare, first_nonzero, CompareResult, Mismatch};
pub use convert::{convert, ConvertOptions, ConvertReport};
pub use create::{create, open_parent, refuse_overwriting, CreateOptions};
pub use digest::{digest, DigestAlgorithm};
pub use format::Format;
pub use keep_chain::{convert_chain, LayerOutput};
pub use map::{map, MapEntry};
pub use open::{open, open_with_paths, ChainGate, OpenOptions};
pub use output::PendingOutput;
pub use probe::probe;
