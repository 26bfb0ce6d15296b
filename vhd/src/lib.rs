//! # vhd: Virtual PC / Hyper-V / Xen / Azure VHD images
//!
//! Reads, writes in place, creates and checks fixed, dynamic and differencing VHDs, including
//! the Xen blktap dialect (creator `tap`, batmap) and Azure's fixed images.
//!
//! ```text
//!  fixed:         [ guest data ........................ ][ footer 512 ]
//!
//!  dynamic and    [ footer copy 512 ][ dynamic header 1024 ][ BAT (u32 BE sectors) ]
//!  differencing:  [ Xen batmap hdr + map ]? [ parent locator data ]*
//!                 [ block: sector bitmap | block_size data ]* [ footer 512 ]
//! ```
//!
//! * Size rule ([`SizeRule`]): the CHS size for creators `vpc ` and `qemu` with a
//!   non-maximal geometry, `current_size` for every other creator (qemu 10's rule);
//!   the `size_rule=chs|current` open option overrides it.
//! * Reads: an unallocated block reads from the parent (differencing) or as zeros; in a
//!   differencing disk the sector bitmap (MSB-first; LSB-first for Xen `tap` version 0.1)
//!   picks this file or the parent per sector. Dynamic disks ignore the bitmap (as qemu).
//! * Parents are opened only through the caller's [`blockdev::OpenGate`], with the W2ru
//!   locator (relative), MacX URL, W2ku (file name only) and the header's parent name as
//!   candidates; the parent's footer UUID must equal the header's parent UUID.
//! * In-place writes append blocks: the new footer is written past the new block first, then
//!   the block, a flush, then the BAT entry (hostile-inputs §3.3); the footer copy at 0 never
//!   changes because the footer does not record the file length.
//! * New images carry creator `vdcv` (or `tap\0` 1.3 for `dialect=xen`), the exact
//!   `current_size` and a CHS computed by the spec's algorithm.
//!
//! ## Policies for hostile input (hostile-inputs.md V1-V20)
//!
//! * V2: a missing trailing footer with a valid copy at offset 0 opens read-only with a
//!   warning (and a `check` finding); writable opens are refused. Never repaired.
//! * V3: the pre-2004 511-byte footer is refused as `Unsupported`.
//! * V5: a footer copy that differs from the trailing footer is a warning; the trailing
//!   footer is used.
//! * V10: dynamic and differencing disks above 2040 GiB are refused; fixed disks are only
//!   bounded by the file.
//! * V16: a BAT entry past the end, into metadata or aliasing another block opens, but reads
//!   of that block fail with `Corrupt` naming `bat_entry[i]`; `check` lists them all and a
//!   writable open is refused.
//! * V17: dynamic disks read allocated blocks whole (bitmaps ignored, as qemu does);
//!   differencing disks follow the bitmap sector by sector.
//! * V18: locators are decoded within bounds (at most 32 KiB, valid UTF-16/UTF-8) and only
//!   handed to the open gate as candidates; bad ones are reported by `info` and `check`.
//! * V20: the saved-state flag opens read-only with a warning; data after the footer makes
//!   the trailing footer "missing" (V2).
#![forbid(unsafe_code)]

mod bat;
mod check;
mod create;
pub mod format;
mod header;
mod image;
mod writer;

pub use create::{create, CreateOptions, Dialect, ParentLink, Subformat};
pub use header::{macx_path, Locator, SizeRule};
pub use image::{vhd_time_text, OpenParams, VhdImage};
pub use writer::VhdWriter;
