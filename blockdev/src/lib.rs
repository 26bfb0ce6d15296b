//! # blockdev: the shared vocabulary of vdconv
//!
//! Every crate of the workspace speaks in the types defined here:
//!
//! ```text
//!   vdisk (probe, open chains, engines)
//!     |
//!   vhd / vhdx / qcow2 / raw  --- implement --->  BlockDevice
//!     |
//!   Storage (FileStorage, MemStorage, testkit::{FaultyStorage, CrashStorage})
//! ```
//!
//! * [`BlockDevice`]: an image of any format, with `&self` reads and writes so one image can
//!   be read from many threads, and [`BlockDevice::block_status`] extents
//!   (Data / Zero / Unallocated) on which map, convert, compare and digest are built.
//! * [`Storage`]: positional I/O on the bytes of an image file.
//! * [`Error`] with a stable [`ErrorKind`] and field/offset/path context.
//! * [`Limits`] and [`try_alloc`]: every allocation sized by a file goes through them.
//! * [`OpenGate`]: the only way a format opens a file named inside an image.
//! * [`is_zero`]: fast zero detection.
//! * [`RawImage`]: raw files, with holes reported from `SEEK_DATA`/`SEEK_HOLE`.
//!
//! This crate contains no `unsafe` code: the OS calls it needs (`SEEK_DATA`, hole punching)
//! come from `rustix`'s safe wrappers.
#![forbid(unsafe_code)]

mod device;
mod error;
mod gate;
mod limits;
mod raw;
mod storage;
#[cfg(feature = "testkit")]
pub mod testkit;
mod uuid;
mod zero;

pub use device::{
    check_range, BackingInfo, BlockDevice, CheckReport, Extent, ExtentKind, Finding, ImageInfo,
    ImageWriter, SectorSizes, Severity,
};
pub use error::{Error, ErrorKind, Result};
pub use gate::{
    file_name_of, has_protocol_prefix, resolve_relative, BackingRequest, Candidate, DenyGate,
    OpenGate,
};
pub use limits::{add, align_up, div_ceil, mul, to_usize, try_alloc, Limits};
pub use raw::{RawImage, RawWriter};
pub use storage::{extent_at_host, FileStorage, MemStorage, Storage, StorageRegion};
pub use uuid::{format_uuid, parse_uuid, random_bytes, random_uuid};
pub use zero::{is_zero, zero_runs};
