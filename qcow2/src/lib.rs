//! # qcow2: QEMU copy-on-write images, versions 2 and 3
//!
//! ```text
//!  cluster 0: header (72 / 104 / 112 bytes) | extensions | backing file name
//!  L1 table (contiguous, u64 BE) ──> L2 tables (one cluster each)
//!                                       │  standard entry ──> data cluster (or data file)
//!                                       │  zero flag (v3) ──> reads as zeros
//!                                       │  compressed ──> byte offset + sector count
//!                                       └  extended L2: entry + 32-subcluster bitmap
//!  refcount table ──> refcount blocks (1..64-bit entries) ──> one count per host cluster
//!  snapshot table ──> snapshot L1 tables (read-only access with `snapshot=NAME`)
//! ```
//!
//! * [`Qcow2Image`]: open (backing file and data file through the caller's
//!   [`blockdev::OpenGate`]), read, write in place, block status, info, check.
//! * [`create`] and [`Qcow2Writer`]: new images; the writer lays clusters out sequentially,
//!   optionally compressing them on every core, and writes metadata once at the end.
//! * [`repair_leaks`]: `check -r leaks`.
//!
//! ## Policies
//!
//! * Strict reading: a data pointer past the end of the file is an error naming the field
//!   and offset, except inside the last, partly written cluster (qemu leaves it short), which
//!   reads as zeros. Compressed streams must decode to exactly one cluster.
//! * Referenced files (backing file, external data file) are opened only through the caller's
//!   gate; protocol and `json:` names are refused before the gate is asked.
//! * Writes in place follow `hostile-inputs.md` §3.1 (data, refcount, barrier, mapping,
//!   barrier, free). Images with the dirty or corrupt bit, internal snapshots, extended L2
//!   entries or an external data file refuse to be opened for writing; the L1 table never
//!   needs to grow because images are not resized.
#![forbid(unsafe_code)]

mod check;
mod compress;
mod create;
pub mod format;
pub mod header;
mod image;
pub mod snapshot;
mod table;
mod write;
mod writer;

pub use check::repair_leaks;
pub use create::{create, CreateOptions, Preallocation};
pub use header::Header;
pub use image::{OpenOptions, Qcow2Image};
pub use snapshot::Snapshot;
pub use write::grow;
pub use writer::Qcow2Writer;
