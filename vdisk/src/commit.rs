//! Merging a differencing/overlay image into its parent (Hyper-V's Merge-VHD, qemu-img commit).

use std::path::Path;
use std::sync::atomic::AtomicBool;

use blockdev::{BlockDevice, Error, ExtentKind, ImageWriter, Result};

use crate::format::Format;
use crate::keep_chain::copy_layer;
use crate::open::{open, open_with_paths, OpenOptions};
use crate::probe::probe;

/// Copies every range the top layer of `image` holds (data, and explicit zeros) into its
/// parent, opened for writing, then flushes the parent. Returns the parent's path.
///
/// Crash safety is the parent format's: every write goes through its in-place write path,
/// which follows the format's ordering rules, so an interrupted commit leaves a consistent
/// parent holding part of the child's data, and the child unmodified.
///
/// A VHDX child is then relinked: writing gave the parent a new DataWriteGuid, which the
/// child records as its parent_linkage (through its log), so the child still opens over its
/// parent and reads as before. VHD and qcow2 children need nothing: the parent's identity
/// they check (VHD's unique ID) does not change.
pub fn commit(
    image: &Path,
    opts: &OpenOptions,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<std::path::PathBuf> {
    let (top, paths) = open_with_paths(image, opts)?;
    let parent_path = paths.get(1).cloned().ok_or_else(|| {
        Error::invalid_argument("the image has no parent/backing file to commit into")
            .with_path(image)
    })?;
    // The format the chain opened the parent as (the child may name it: a raw base whose
    // first bytes look like another format must stay raw), not a fresh probe.
    let parent_format: Format = match top.backing() {
        Some(b) => crate::formats::format_of(b),
        None => {
            let s = blockdev::FileStorage::open(&parent_path, false)?;
            probe(&s)?
        }
    };
    // As qemu-img commit does, a parent smaller than its child is grown to the child's size
    // first (qcow2 and raw parents; VHD and VHDX parents have their child's size by rule).
    if let Some(parent_size) = top.backing().map(|b| b.size()) {
        if parent_size < top.size() {
            grow_parent(&parent_path, parent_format, top.size(), opts)?;
        }
    }
    let parent_opts = OpenOptions {
        format: Some(parent_format),
        writable: true,
        backing_dirs: opts.backing_dirs.clone(),
        ignore_parent_id: opts.ignore_parent_id,
        limits: opts.limits.clone(),
        ..OpenOptions::default()
    };
    let parent = open(&parent_path, &parent_opts)?;
    let size = top.size().min(parent.size());
    if let Some(at) = data_beyond(top.as_ref(), size)? {
        // The parent cannot hold it: refuse before writing anything rather than commit part.
        return Err(Error::invalid_argument(format!(
            "the child ({} bytes) holds data at offset {at}, past the end of its parent ({} bytes): \
             the parent cannot take it; nothing was committed",
            top.size(),
            parent.size()
        ))
        .with_path(image));
    }
    // Whole sectors of the parent: a range the child covers in part (a 512-byte qcow2
    // subcluster over a 4096-byte-sector VHDX) is read through the child, so the rest of the
    // sector keeps the parent's bytes.
    let child_is_vhdx = crate::formats::format_of(top.as_ref()) == Format::Vhdx;
    let copied = {
        let mut into = InPlace(parent.as_ref());
        let unit = into.granularity();
        copy_layer(top.as_ref(), &mut into, unit, size, cancel, progress)
    };
    // Flushed whatever happened: what was written stays consistent by the format's rules.
    let flushed = parent.flush();
    drop(top);
    // The child reads the same even after a partial commit (the parent got the child's own
    // bytes), so a VHDX child is relinked on failure too: its parent's DataWriteGuid changed
    // at the first write.
    let relinked = if child_is_vhdx {
        relink(image, &parent_path, parent.as_ref(), opts)
    } else {
        Ok(())
    };
    copied?;
    flushed?;
    relinked?;
    Ok(parent_path)
}

/// Grows the parent file to `size` bytes in place where its format allows it.
fn grow_parent(path: &Path, format: Format, size: u64, opts: &OpenOptions) -> Result<()> {
    match format {
        Format::Qcow2 => {
            let storage = blockdev::FileStorage::open(path, true)?;
            // Its own backing file, opened read-only: what it would show past the old end
            // is zeroed first.
            let gate = crate::open::ChainGate::new(OpenOptions {
                format: None,
                writable: false,
                ..opts.clone()
            });
            qcow2::grow(Box::new(storage), &gate, size, &opts.limits).map_err(|e| {
                e.context("growing the parent to its child's size")
                    .with_path(path)
            })
        }
        Format::Raw => {
            use blockdev::Storage;
            let storage = blockdev::FileStorage::open(path, true)?;
            storage.set_len(size)?;
            storage.flush()
        }
        // Left to the check below: data past the parent's end is refused.
        Format::Vhd | Format::Vhdx => Ok(()),
    }
}

/// The parent, written in place through the interface [`copy_layer`] writes to.
struct InPlace<'a>(&'a dyn BlockDevice);

impl ImageWriter for InPlace<'_> {
    fn granularity(&self) -> u64 {
        u64::from(self.0.sector_sizes().logical).max(512)
    }
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.0.write_at(data, offset)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.0.write_zeroes(offset, len, false)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.0.flush()
    }
}

/// The first offset at or after `from` where the top layer of `top` holds data, if any.
fn data_beyond(top: &dyn blockdev::BlockDevice, from: u64) -> Result<Option<u64>> {
    let size = top.size();
    let mut pos = from;
    while pos < size {
        let e = top.block_status(pos, size - pos)?;
        if e.kind == ExtentKind::Data {
            return Ok(Some(pos));
        }
        pos = pos.saturating_add(e.len.max(1));
    }
    Ok(None)
}

/// Relinks the VHDX `child` to its committed `parent` (see [`commit`]).
fn relink(
    child: &Path,
    parent_path: &Path,
    parent: &dyn blockdev::BlockDevice,
    opts: &OpenOptions,
) -> Result<()> {
    let child_opts = OpenOptions {
        format: Some(Format::Vhdx),
        writable: true,
        no_backing: true,
        limits: opts.limits.clone(),
        ..OpenOptions::default()
    };
    let dev = open(child, &child_opts)?;
    crate::formats::vhdx::relink_child(dev.as_ref(), parent).map_err(|e| {
        e.context(format!(
            "{} holds the child's data, but the child could not be relinked to it \
             (open the child with --ignore-parent-id)",
            parent_path.display()
        ))
    })
}
