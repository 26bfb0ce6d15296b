//! `convert --keep-chain`: every layer of the source chain becomes a layer of the target format,
//! linked to the layer converted before it, holding only that layer's data.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blockdev::{BlockDevice, Error, ErrorKind, ExtentKind, ImageWriter, Result};

use crate::convert::{convert, ConvertOptions};
use crate::create::{open_parent, refuse_overwriting};
use crate::format::Format;
use crate::formats::{self, CreateSpec};
use crate::open::{open_with_paths, OpenOptions};
use crate::output::PendingOutput;

/// One layer written by [`convert_chain`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerOutput {
    /// The source layer.
    pub source: PathBuf,
    /// The file written for it.
    pub output: PathBuf,
}

/// Output name of a lower layer: the source layer's file name with the target's extension,
/// in the destination's directory.
fn layer_name(dst: &Path, source: &Path, format: Format) -> PathBuf {
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "layer".to_string());
    let dir = dst
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.join(format!("{stem}.{}", format.extension()))
}

/// Converts the chain of `src` layer by layer; the top layer is written to `dst`, the others
/// beside it. Returns the layers written, bottom first.
///
/// What cannot work is refused before anything is written: a target without parents (raw)
/// for a chain, layers of different sizes for VHD and VHDX (a child has its parent's size),
/// a resize (`opts.size`), and an output that would replace a file of the source chain (even
/// with `force`: the lower layers are named automatically). If a layer fails, the layers this
/// call already wrote are removed. `verify` compares the new top layer, read through its new
/// chain, with the source's top layer.
pub fn convert_chain(
    src: &Path,
    dst: &Path,
    open_opts: &OpenOptions,
    opts: &ConvertOptions,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<LayerOutput>> {
    let (top, paths) = open_with_paths(src, open_opts)?;
    let mut layers: Vec<&dyn BlockDevice> = Vec::new();
    let mut cur: Option<&dyn BlockDevice> = Some(top.as_ref());
    while let Some(d) = cur {
        layers.push(d);
        cur = d.backing();
    }
    if layers.len() != paths.len() {
        return Err(Error::new(
            ErrorKind::Io,
            "internal: chain paths and layers disagree",
        ));
    }
    let n = layers.len();
    // Outputs, top first like `layers` and `paths`.
    let outs: Vec<PathBuf> = paths
        .iter()
        .enumerate()
        .map(|(i, source)| {
            if i == 0 {
                dst.to_path_buf()
            } else {
                layer_name(dst, source, opts.format)
            }
        })
        .collect();
    check_plan(&layers, &paths, &outs, opts)?;
    let mut written: Vec<PathBuf> = Vec::new();
    let result = (|| -> Result<()> {
        for i in (0..n).rev() {
            let (Some(layer), Some(out)) = (layers.get(i), outs.get(i)) else {
                break;
            };
            if i == n - 1 {
                // The bottom layer: a plain conversion of that layer alone.
                let mut o = ConvertOptions::new(opts.format);
                o.options = opts.options.clone();
                o.force = opts.force;
                o.limits = opts.limits.clone();
                convert(*layer, out, &o, cancel, progress)?;
            } else {
                let prev = written
                    .last()
                    .cloned()
                    .ok_or_else(|| Error::new(ErrorKind::Io, "internal: no parent output"))?;
                let reference = prev
                    .file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .ok_or_else(|| {
                        Error::new(ErrorKind::Io, "internal: parent output has no name")
                    })?;
                let parent = open_parent(out, &reference, Some(opts.format), &opts.limits)?;
                write_layer(*layer, out, opts, parent, cancel, progress)?;
            }
            written.push(out.clone());
        }
        if opts.verify {
            verify_chain(top.as_ref(), dst, opts, cancel)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for w in &written {
            let _ = std::fs::remove_file(w);
        }
        return Err(e);
    }
    Ok(paths
        .into_iter()
        .rev()
        .zip(written)
        .map(|(source, output)| LayerOutput { source, output })
        .collect())
}

/// The up-front refusals of [`convert_chain`].
fn check_plan(
    layers: &[&dyn BlockDevice],
    paths: &[PathBuf],
    outs: &[PathBuf],
    opts: &ConvertOptions,
) -> Result<()> {
    if opts.size.is_some() {
        return Err(Error::invalid_argument(
            "--keep-chain keeps every layer's size: it cannot resize the output",
        ));
    }
    if layers.len() > 1 && opts.format == Format::Raw {
        return Err(Error::invalid_argument(
            "raw images cannot have a parent: --keep-chain needs vhd, vhdx or qcow2",
        ));
    }
    if matches!(opts.format, Format::Vhd | Format::Vhdx) {
        let sizes: Vec<u64> = layers.iter().map(|l| l.size()).collect();
        if sizes.windows(2).any(|w| w.first() != w.last()) {
            return Err(Error::invalid_argument(format!(
                "the layers have different sizes ({}, top first): a differencing {} has its parent's size",
                sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
                opts.format
            )));
        }
    }
    for (i, out) in outs.iter().enumerate() {
        if outs.iter().take(i).any(|o| o == out) {
            return Err(Error::invalid_argument(format!(
                "two layers of the chain would both be written to {}",
                out.display()
            )));
        }
        refuse_overwriting(out, paths, "a file of the source chain (--keep-chain)")?;
    }
    Ok(())
}

/// Compares the source's top layer with the new top layer read through its new chain.
fn verify_chain(
    src: &dyn BlockDevice,
    dst: &Path,
    opts: &ConvertOptions,
    cancel: Option<&AtomicBool>,
) -> Result<()> {
    let out = crate::open::open(
        dst,
        &OpenOptions {
            format: Some(opts.format),
            limits: opts.limits.clone(),
            ..OpenOptions::default()
        },
    )?;
    let want = crate::digest::digest(
        src,
        crate::digest::DigestAlgorithm::SparseSha256,
        cancel,
        &mut |_, _| {},
    )?;
    crate::convert::verify_against(out.as_ref(), src.size(), &want, "the new chain", cancel)
        .map_err(|e| e.with_path(dst))
}

/// Writes one upper layer: its Data ranges (aligned to the output's unit, read through the
/// layer so partial units carry the parent's bytes), its explicit zeros, nothing else.
fn write_layer(
    layer: &dyn BlockDevice,
    out: &Path,
    opts: &ConvertOptions,
    parent: formats::ParentSpec,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let size = match opts.format {
        // A differencing VHD/VHDX has its parent's size, and the new parent's may have been
        // rounded up to the output's sector size (4096-byte logical sectors, for one).
        Format::Vhd | Format::Vhdx => layer.size().max(parent.device.size()),
        _ => layer.size(),
    };
    let (pending, storage) = PendingOutput::create(out, opts.force)?;
    let spec = CreateSpec {
        size,
        options: &opts.options,
        parent: Some(&parent),
        path: Some(out),
        limits: &opts.limits,
    };
    let mut writer = formats::writer(opts.format, Box::new(storage), &spec)?;
    let unit = match opts.format {
        Format::Qcow2 => writer.granularity().max(512),
        _ => 4096u64.min(writer.granularity().max(512)),
    };
    copy_layer(layer, writer.as_mut(), unit, size, cancel, progress)?;
    writer.finish()?;
    pending.publish()
}

/// Copies one layer's own ranges, up to `size`, to `writer` in whole units: a unit the layer
/// covers only in part is read through the layer, so its other bytes carry the parent's data
/// (a writer fills the rest of a partial unit with zeros, which would hide the parent's bytes).
pub(crate) fn copy_layer(
    layer: &dyn BlockDevice,
    writer: &mut dyn ImageWriter,
    unit: u64,
    size: u64,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let size = size.min(layer.size());
    let mut pos = 0u64;
    // End of what was already handed to the writer (writes must increase): always a unit
    // boundary or the end of the disk.
    let mut written = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    let mut through = |a: u64, b: u64, writer: &mut dyn ImageWriter| -> Result<()> {
        let mut q = a;
        while q < b {
            let n = (b - q).min(4 << 20);
            buf.resize(usize::try_from(n).unwrap_or(0), 0);
            layer.read_at(&mut buf, q)?;
            writer.write_data(q, &buf)?;
            q += n;
        }
        Ok(())
    };
    let up = |x: u64| x.div_ceil(unit).saturating_mul(unit).min(size);
    while pos < size {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::new(ErrorKind::Interrupted, "interrupted"));
        }
        let e = layer.block_status(pos, size - pos)?;
        let len = e.len.min(size - pos).max(1);
        let end = pos + len;
        match e.kind {
            ExtentKind::Data => {
                let a = (pos / unit * unit).max(written);
                let b = up(end);
                through(a, b, writer)?;
                written = written.max(b);
            }
            ExtentKind::Zero => {
                let a = pos.max(written);
                if end > a {
                    // Partial units at either end go through the layer; whole ones as zeros.
                    let head = up(a);
                    let tail = (end / unit * unit).max(head);
                    if head > a {
                        through(a / unit * unit, head, writer)?;
                    }
                    if tail > head {
                        writer.write_zeroes(head, tail - head)?;
                    }
                    let b = up(end).max(head);
                    if b > tail {
                        through(tail, b, writer)?;
                    }
                    written = written.max(b);
                }
            }
            _ => {}
        }
        pos = end;
        progress(pos, size);
    }
    Ok(())
}
