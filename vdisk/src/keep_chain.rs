//! `convert --keep-chain`: every layer of the source chain becomes a layer of the target format,
//! linked to the layer converted before it, holding only that layer's data.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blockdev::{BlockDevice, Error, ErrorKind, ExtentKind, ImageWriter, Result};

use crate::convert::{convert, ConvertOptions};
use crate::create::open_parent;
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
    let mut outputs: Vec<PathBuf> = Vec::new();
    for i in (0..n).rev() {
        let (Some(layer), Some(source)) = (layers.get(i), paths.get(i)) else {
            break;
        };
        let out = if i == 0 {
            dst.to_path_buf()
        } else {
            layer_name(dst, source, opts.format)
        };
        if outputs.contains(&out) {
            return Err(Error::invalid_argument(format!(
                "two layers of the chain would both be written to {}",
                out.display()
            )));
        }
        if i == n - 1 {
            // The bottom layer: a plain conversion of that layer alone.
            let mut o = ConvertOptions::new(opts.format);
            o.options = opts.options.clone();
            o.force = opts.force;
            o.verify = opts.verify;
            o.limits = opts.limits.clone();
            convert(*layer, &out, &o, cancel, progress)?;
        } else {
            let prev = outputs
                .last()
                .cloned()
                .ok_or_else(|| Error::new(ErrorKind::Io, "internal: no parent output"))?;
            let reference = prev
                .file_name()
                .map(|s| s.to_string_lossy().to_string())
                .ok_or_else(|| Error::new(ErrorKind::Io, "internal: parent output has no name"))?;
            let parent = open_parent(&out, &reference, Some(opts.format), &opts.limits)?;
            write_layer(*layer, &out, opts, parent, cancel, progress)?;
        }
        outputs.push(out);
    }
    Ok(paths
        .into_iter()
        .rev()
        .zip(outputs)
        .map(|(source, output)| LayerOutput { source, output })
        .collect())
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
    let size = layer.size();
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
    copy_layer(layer, writer.as_mut(), unit, cancel, progress)?;
    writer.finish()?;
    pending.publish()
}

fn copy_layer(
    layer: &dyn BlockDevice,
    writer: &mut dyn ImageWriter,
    unit: u64,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let size = layer.size();
    let mut pos = 0u64;
    // End of what was already handed to the writer (writes must increase).
    let mut written = 0u64;
    let mut buf: Vec<u8> = Vec::new();
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
                let b = end.div_ceil(unit).saturating_mul(unit).min(size);
                let mut q = a;
                while q < b {
                    let n = (b - q).min(4 << 20);
                    buf.resize(usize::try_from(n).unwrap_or(0), 0);
                    layer.read_at(&mut buf, q)?;
                    writer.write_data(q, &buf)?;
                    q += n;
                }
                written = written.max(b);
            }
            ExtentKind::Zero => {
                let a = pos.max(written);
                if end > a {
                    writer.write_zeroes(a, end - a)?;
                    written = end;
                }
            }
            _ => {}
        }
        pos = end;
        progress(pos, size);
    }
    Ok(())
}
