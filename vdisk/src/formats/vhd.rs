//! vhd glue: options, parents and the convert writer for the `vhd` crate.

use blockdev::{BlockDevice, Error, ImageWriter, Result, Storage};
use vhd::{
    CreateOptions, Dialect, OpenParams, ParentLink, SizeRule, Subformat, VhdImage, VhdWriter,
};

use super::{check_known_options, option, CreateSpec, OpenCtx};
use crate::format::Format;

/// The `-o` options of a new VHD image, with what each takes (`vdconv create -o help`).
pub(crate) const OPTIONS: &[(&str, &str)] = &[
    ("subformat", "dynamic (default) or fixed"),
    (
        "block_size",
        "the dynamic image's block size, a power of two (default 2M)",
    ),
    (
        "dialect",
        "standard (default) or xen (Xen blktap: a batmap after the BAT)",
    ),
];

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenCtx<'_>) -> Result<Box<dyn BlockDevice>> {
    let size_rule = option(ctx.options, "size_rule")
        .map(SizeRule::parse)
        .transpose()?;
    let params = OpenParams {
        gate: ctx.gate,
        writable: ctx.writable,
        limits: ctx.limits.clone(),
        depth: ctx.depth,
        size_rule,
    };
    Ok(Box::new(VhdImage::open(storage, &params)?))
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let m = match s.get(i..).unwrap_or_default().to_ascii_lowercase().as_str() {
                "b" => 1,
                "k" | "kib" | "kb" => 1 << 10,
                "m" | "mib" | "mb" => 1 << 20,
                "g" | "gib" | "gb" => 1 << 30,
                other => {
                    return Err(Error::invalid_argument(format!(
                        "block_size: unknown unit '{other}'"
                    )))
                }
            };
            (s.get(..i).unwrap_or_default(), m)
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| Error::invalid_argument(format!("block_size: invalid value '{s}'")))
}

fn options(spec: &CreateSpec<'_>) -> Result<CreateOptions> {
    check_known_options(Format::Vhd, spec.options, OPTIONS)?;
    let subformat = match option(spec.options, "subformat") {
        None | Some("dynamic") => Subformat::Dynamic,
        Some("fixed") => Subformat::Fixed,
        Some(other) => {
            return Err(Error::invalid_argument(format!(
                "vhd subformat must be 'dynamic' or 'fixed', not '{other}'"
            )))
        }
    };
    let block_size = match option(spec.options, "block_size") {
        None => vhd::format::DEFAULT_BLOCK_SIZE,
        Some(v) => u32::try_from(parse_size(v)?)
            .map_err(|_| Error::invalid_argument("block_size too large"))?,
    };
    let dialect = match option(spec.options, "dialect") {
        None | Some("standard") | Some("vdcv") => Dialect::Standard,
        Some("xen") => Dialect::Xen,
        Some(other) => {
            return Err(Error::invalid_argument(format!(
                "vhd dialect must be 'standard' or 'xen', not '{other}'"
            )))
        }
    };
    let parent = match spec.parent {
        None => None,
        Some(p) => {
            let mut link = ParentLink::new(p.device.as_ref(), &p.path, spec.path)?;
            // A relative reference as the user gave it is relative to the new image's
            // directory: exactly what the W2ru locator records.
            let reference = std::path::Path::new(&p.reference);
            if !p.reference.is_empty() && reference.is_relative() {
                let rel = p.reference.replace('\\', "/");
                link.relative = rel.trim_start_matches("./").to_string();
            }
            Some(link)
        }
    };
    Ok(CreateOptions {
        size: spec.size,
        subformat,
        block_size,
        dialect,
        parent,
    })
}

pub(crate) fn create(storage: Box<dyn Storage>, spec: &CreateSpec<'_>) -> Result<()> {
    let opts = options(spec)?;
    vhd::create(storage.as_ref(), &opts)
}

pub(crate) fn writer(
    storage: Box<dyn Storage>,
    spec: &CreateSpec<'_>,
) -> Result<Box<dyn ImageWriter>> {
    let opts = options(spec)?;
    Ok(Box::new(VhdWriter::new(storage, &opts, spec.limits)?))
}
