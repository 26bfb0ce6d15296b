//! The convert engine: read the source chain in parallel, skip what is not there, write the
//! output sequentially into a temporary file, flush, rename.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use blockdev::{zero_runs, BlockDevice, Error, ErrorKind, ImageWriter, Limits, Result};

use crate::chain::{chain_status, PlanItem};
use crate::digest::{BlockHash, SparseDigest, SPARSE_BLOCK};
use crate::format::Format;
use crate::formats::{self, CreateSpec, ParentSpec};
use crate::open::{ChainGate, OpenOptions};
use crate::output::PendingOutput;
use crate::pipeline::{self, PipelineConfig};

/// How to convert.
pub struct ConvertOptions {
    /// Output format.
    pub format: Format,
    /// `-o K=V` options of the output format.
    pub options: Vec<(String, String)>,
    /// `-B`: the output is an overlay over this image and holds only what differs from it.
    pub backing: Option<ParentSpec>,
    /// Replace an existing destination.
    pub force: bool,
    /// Re-read the output and compare its digest with the source's.
    pub verify: bool,
    /// Output size; `None` keeps the source's size. Larger sizes pad with zeros.
    pub size: Option<u64>,
    /// Resource limits.
    pub limits: Limits,
}

impl ConvertOptions {
    /// Plain conversion to `format` with default settings.
    pub fn new(format: Format) -> Self {
        ConvertOptions {
            format,
            options: Vec::new(),
            backing: None,
            force: false,
            verify: false,
            size: None,
            limits: Limits::default(),
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConvertReport {
    /// Guest size of the output.
    pub virtual_size: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Data bytes handed to the output writer.
    pub bytes_written: u64,
    /// The source's sparse-sha256 digest, when verification ran.
    pub digest: Option<String>,
}

enum Op {
    Data { start: usize, len: usize },
    Zeroes { offset: u64, len: u64 },
}

struct ItemResult {
    ops: Vec<Op>,
    hashes: Vec<BlockHash>,
}

/// Converts `src` (with its chain, flattened) into a new image at `dst`.
pub fn convert(
    src: &dyn BlockDevice,
    dst: &Path,
    opts: &ConvertOptions,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertReport> {
    let size = opts.size.unwrap_or(src.size());
    if size < src.size() {
        return Err(Error::invalid_argument(
            "the output cannot be smaller than the source",
        ));
    }
    let (pending, mut storage) = PendingOutput::create(dst, opts.force)?;
    if opts.verify {
        // Read back right away: keep it cached.
        storage = storage.keep_written_pages();
    }
    let mut options = opts.options.clone();
    let logical = src.sector_sizes().logical;
    if opts.format == Format::Vhdx
        && opts.backing.is_none()
        && !options.iter().any(|(k, _)| k == "logical_sector_size")
    {
        // The guest addresses the disk in these sectors (a GPT sits at LBA 1): keep them.
        options.push(("logical_sector_size".into(), logical.to_string()));
    }
    let spec = CreateSpec {
        size,
        options: &options,
        parent: opts.backing.as_ref(),
        path: Some(dst),
        limits: &opts.limits,
    };
    let tmp = pending.tmp_path().to_path_buf();
    let named = |e: Error| e.replace_path(&tmp, dst);
    let mut writer = formats::writer(opts.format, Box::new(storage), &spec).map_err(named)?;
    let report = fill(src, writer.as_mut(), opts, cancel, progress).map_err(named)?;
    writer
        .finish()
        .map_err(|e| named(e.context("finishing the output")))?;
    if opts.verify {
        verify_output(pending.tmp_path(), opts, src.size(), &report)?;
    }
    pending.publish()?;
    Ok(report)
}

fn fill(
    src: &dyn BlockDevice,
    writer: &mut dyn ImageWriter,
    opts: &ConvertOptions,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertReport> {
    let size = src.size();
    let gran = writer.granularity().max(512);
    let mut cfg = PipelineConfig::for_unit(gran);
    let zero_unit = usize::try_from(cfg.unit).unwrap_or(4096);
    if opts.verify {
        // Items must hold whole digest blocks.
        cfg.unit = cfg.unit.max(SPARSE_BLOCK);
        cfg.chunk = cfg.chunk.max(cfg.unit);
    }
    let backing: Option<&dyn BlockDevice> = opts.backing.as_ref().map(|p| p.device.as_ref());
    let verify = opts.verify;
    let mut digest = SparseDigest::new(size);
    let mut report = ConvertReport {
        virtual_size: opts.size.unwrap_or(size),
        ..ConvertReport::default()
    };

    let process = |item: &PlanItem, bytes: &[u8]| -> Result<ItemResult> {
        let mut ops = Vec::new();
        let mut hashes = Vec::new();
        match *item {
            PlanItem::Data { offset, len } => {
                if verify {
                    for block in bytes.chunks(usize::try_from(SPARSE_BLOCK).unwrap_or(1 << 20)) {
                        hashes.push(SparseDigest::hash_block(block));
                    }
                }
                match backing {
                    None => zero_runs(bytes, zero_unit, |s, l, zero| {
                        if !zero {
                            ops.push(Op::Data { start: s, len: l });
                        }
                    }),
                    Some(b) => diff_against(b, offset, len, bytes, zero_unit, &mut ops)?,
                }
            }
            PlanItem::Zero { offset, len } => {
                if let Some(b) = backing {
                    zeros_over_backing(b, offset, len, zero_unit, &mut ops)?;
                }
            }
        }
        Ok(ItemResult { ops, hashes })
    };

    // Padding past the source over a backing image (below) needs to know whether the
    // source's last cluster was written: the end of the furthest range handed to the writer.
    let pads = backing.is_some() && opts.size.is_some_and(|s| s > size);
    let mut written_end = 0u64;
    pipeline::run(src, &cfg, cancel, process, |p| {
        if pads {
            if let Some(end) = p
                .extra
                .ops
                .iter()
                .map(|op| op_end(op, p.item.offset()))
                .max()
            {
                written_end = written_end.max(end);
            }
        }
        match p.item {
            PlanItem::Data { offset, len } => {
                report.bytes_read += len;
                for op in &p.extra.ops {
                    apply(writer, op, offset, p.buf, &mut report)?;
                }
                if verify {
                    for h in &p.extra.hashes {
                        digest.push(*h);
                    }
                }
                progress(offset + len, size);
            }
            PlanItem::Zero { offset, len } => {
                for op in &p.extra.ops {
                    apply(writer, op, offset, p.buf, &mut report)?;
                }
                if verify {
                    digest
                        .push_zeros((offset + len).div_ceil(SPARSE_BLOCK) - offset / SPARSE_BLOCK);
                }
                progress(offset + len, size);
            }
        }
        Ok(())
    })?;
    // Past the source's end the output reads zeros: where a backing image has data there,
    // say so explicitly.
    if let (Some(b), Some(out_size)) = (backing, opts.size.filter(|&s| s > size)) {
        // A writer completes a partial cluster with zeros: when the source's last cluster
        // was left to the base (equal to it), write it whole first, its source bytes then
        // zeros, so the padding cannot blank it.
        let g = writer.granularity().max(512);
        let head = size / g * g;
        let mut from = size;
        if !size.is_multiple_of(g) && written_end <= head {
            let end = head.saturating_add(g).min(out_size);
            let mut buf = vec![0u8; usize::try_from(end - head).unwrap_or(0)];
            if let Some(part) = buf.get_mut(..usize::try_from(size - head).unwrap_or(0)) {
                src.read_at(part, head)?;
            }
            writer.write_data(head, &buf)?;
            from = end;
        }
        let mut ops = Vec::new();
        zeros_over_backing(b, from, out_size - from, zero_unit, &mut ops)?;
        for op in &ops {
            apply(writer, op, 0, &[], &mut report)?;
        }
    }
    if verify {
        report.digest = Some(digest.finish()?);
    }
    Ok(report)
}

/// The guest offset where `op` of an item at `base` ends.
fn op_end(op: &Op, base: u64) -> u64 {
    match *op {
        Op::Data { start, len } => base + (start + len) as u64,
        Op::Zeroes { offset, len } => offset + len,
    }
}

fn apply(
    writer: &mut dyn ImageWriter,
    op: &Op,
    base: u64,
    buf: &[u8],
    report: &mut ConvertReport,
) -> Result<()> {
    match *op {
        Op::Data { start, len } => {
            let data = start
                .checked_add(len)
                .and_then(|end| buf.get(start..end))
                .ok_or_else(|| Error::new(ErrorKind::Io, "internal: data op outside its buffer"))?;
            let at = base + start as u64;
            writer
                .write_data(at, data)
                .map_err(|e| e.context(format!("writing the output at guest offset {at}")))?;
            report.bytes_written += len as u64;
        }
        Op::Zeroes { offset, len } => writer
            .write_zeroes(offset, len)
            .map_err(|e| e.context(format!("writing the output at guest offset {offset}")))?,
    }
    Ok(())
}

/// `-B`: keeps only the units that differ from the backing image.
fn diff_against(
    backing: &dyn BlockDevice,
    offset: u64,
    len: u64,
    bytes: &[u8],
    unit: usize,
    ops: &mut Vec<Op>,
) -> Result<()> {
    let n = usize::try_from(len).map_err(|_| Error::invalid_argument("item too large"))?;
    let mut theirs = vec![0u8; n];
    let bsize = backing.size();
    if offset < bsize {
        let m = usize::try_from((bsize - offset).min(len)).unwrap_or(n);
        if let Some(part) = theirs.get_mut(..m) {
            backing.read_at(part, offset)?;
        }
    }
    let mut pos = 0usize;
    while pos < n {
        let end = (pos + unit).min(n);
        let (Some(mine), Some(other)) = (bytes.get(pos..end), theirs.get(pos..end)) else {
            break;
        };
        if mine != other {
            if blockdev::is_zero(mine) {
                ops.push(Op::Zeroes {
                    offset: offset + pos as u64,
                    len: (end - pos) as u64,
                });
            } else {
                match ops.last_mut() {
                    Some(Op::Data { start, len }) if *start + *len == pos => *len += end - pos,
                    _ => ops.push(Op::Data {
                        start: pos,
                        len: end - pos,
                    }),
                }
            }
        }
        pos = end;
    }
    Ok(())
}

/// `-B`: where the source reads zeros but the backing image has data, the output must say zero.
fn zeros_over_backing(
    backing: &dyn BlockDevice,
    offset: u64,
    len: u64,
    unit: usize,
    ops: &mut Vec<Op>,
) -> Result<()> {
    let end = offset.saturating_add(len).min(backing.size());
    let mut pos = offset;
    let mut buf = Vec::new();
    while pos < end {
        let e = chain_status(backing, pos, end - pos)?;
        let e_end = (pos + e.len).min(end);
        if e.data {
            let mut q = pos;
            while q < e_end {
                let n = (e_end - q).min(2 << 20);
                buf.resize(usize::try_from(n).unwrap_or(0), 0);
                backing.read_at(&mut buf, q)?;
                zero_runs(&buf, unit, |s, l, zero| {
                    if !zero {
                        ops.push(Op::Zeroes {
                            offset: q + s as u64,
                            len: l as u64,
                        });
                    }
                });
                q += n;
            }
        }
        pos = e_end;
    }
    Ok(())
}

fn verify_output(
    tmp: &Path,
    opts: &ConvertOptions,
    source_size: u64,
    report: &ConvertReport,
) -> Result<()> {
    let open_opts = OpenOptions {
        format: Some(opts.format),
        limits: opts.limits.clone(),
        ..OpenOptions::default()
    };
    let out = ChainGate::new(open_opts).open_top(tmp)?;
    let expected = report.digest.clone().unwrap_or_default();
    verify_against(out.as_ref(), source_size, &expected, "the output", None)
}

/// Checks that `out` reads, over its first `source_size` bytes, as the source whose
/// `sparse-sha256` is `expected`, and as zeros past them (an output rounded up to its sector
/// size). `what` names the output in the errors.
pub(crate) fn verify_against(
    out: &dyn BlockDevice,
    source_size: u64,
    expected: &str,
    what: &str,
    cancel: Option<&AtomicBool>,
) -> Result<()> {
    let view = crate::view::Prefix::new(out, source_size)?;
    let got = crate::digest::digest(
        &view,
        crate::digest::DigestAlgorithm::SparseSha256,
        cancel,
        &mut |_, _| {},
    )?;
    if got != expected {
        return Err(Error::new(
            ErrorKind::Mismatch,
            format!("verification failed: {what}'s content digest {got} differs from the source's {expected}"),
        ));
    }
    if let Some(at) = crate::first_nonzero(out, source_size)? {
        return Err(Error::new(
            ErrorKind::Mismatch,
            format!("verification failed: {what} holds data at {at}, past the source's end"),
        ));
    }
    Ok(())
}
