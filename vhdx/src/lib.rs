//! # vhdx: Hyper-V VHDX images (MS-VHDX v1) for vdconv
//!
//! Spec: [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format"
//! (<https://learn.microsoft.com/en-us/openspecs/windows_protocols/ms-vhdx>). Facts used here are
//! summarised in the project's `formats.md` §3 and §9.
//!
//! ```text
//!  0        64K      128K     192K       256K       1M
//!  +--------+--------+--------+----------+----------+------ ... ----------------------+
//!  |file id |header 1|header 2|region t.1|region t.2| log | metadata | BAT | blocks  |
//!  |vhdxfile|  head  |  head  |   regi   |   regi   |  (all 1 MiB aligned, any order) |
//!  +--------+--------+--------+----------+----------+---------------------------------+
//!
//!  BAT: [PB0 PB1 ... PB(cr-1) SB0][PBcr ... SB1] ...   (cr = 2^23 * sector / block size)
//!        payload entries of a chunk, then its sector-bitmap entry (LSB-first bitmap)
//! ```
//!
//! ## Lifecycle
//!
//! * **Open** ([`VhdxImage::open`]): file identifier, both headers (CRC-32C, higher sequence
//!   wins; byte-identical equal headers accepted), log (a non-empty log is replayed: to disk
//!   on a read-write open, into an in-memory [`log::Overlay`] on a read-only one, which never
//!   writes the file), region tables, metadata items, the BAT (validated: states, offsets inside
//!   the file, no overlaps), and for differencing images the parent through the caller's
//!   [`blockdev::OpenGate`], verified by DataWriteGuid = parent_linkage.
//! * **Read**: per block, FULLY_PRESENT from the file, ZERO/UNMAPPED as zeros, NOT_PRESENT and
//!   UNDEFINED from the parent (zeros without one), PARTIALLY_PRESENT per sector bitmap.
//! * **Write** (in place): the first write renews FileWriteGuid/DataWriteGuid and sets a fresh
//!   LogGuid (both header slots, flushed); new payload blocks are appended 1 MiB aligned; BAT and
//!   bitmap sectors go through the log: data flush, log entry, flush, apply, flush. `flush`
//!   empties the log (LogGuid = 0). `write_zeroes` over whole blocks sets the ZERO state (and
//!   punches the freed block when asked to deallocate), except in fixed images, whose blocks stay
//!   allocated; partial ranges get explicit zeros (sector-bitmap bits over a parent).
//! * **Check** ([`blockdev::BlockDevice::check`]): both headers and region tables, metadata
//!   bounds, every BAT entry (state, inside the file, no overlap with each other, the log or the
//!   regions), the log state, and unreferenced space at the end of the file (a leak).
//!
//! ## Hostile input
//!
//! Every count and offset is checked before use (hostile-inputs.md X1-X22, one test each in
//! `tests/hostile.rs`); the BAT is allocated from the computed entry count through
//! [`blockdev::Limits`], never from the region length; the log scan is bounded (each start
//! position is visited once and checksum work has a budget); replay targets may not touch the
//! file identifier, the headers or the log, and may grow the file by at most 1 TiB. Parent
//! locator paths are only handed to the caller's gate as candidates.
//! * **Create** ([`create()`]) and **convert** ([`VhdxWriter`]): a fresh file laid out as
//!   header section, log (1 MiB), metadata (1 MiB), BAT, then payload blocks in guest order;
//!   metadata and headers are written once at the end.
//!
//! ## I/O model
//!
//! Reads take the BAT read lock and may run in parallel; writes serialise on a write mutex
//! (allocation and the log are inherently sequential) and update the BAT under a short write
//! lock once the log entry is applied. A BAT larger than [`blockdev::Limits::max_cache`] (a
//! 64 TiB image with 1 MiB blocks has 512 MiB of it) is not loaded: it is validated page by
//! page at open and read in 32 KiB pages kept in a bounded LRU cache. The sequential writer
//! and `create` never hold the BAT either (allocated entries only; fixed entries computed).
#![forbid(unsafe_code)]

pub mod bat;
mod check;
pub mod create;
pub mod format;
pub mod header;
mod image;
pub mod log;
pub mod metadata;
mod table;
mod writer;

pub use create::{create, CreateOptions, Subformat};
pub use format::Guid;
pub use image::{LogState, OpenOptions, VhdxImage};
pub use writer::VhdxWriter;
