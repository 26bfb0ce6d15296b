//! qcow2 glue: options of `create`/`convert -O qcow2` and open options (`snapshot=NAME`).

use blockdev::{BlockDevice, Error, ImageWriter, Result, Storage};
use qcow2::{CreateOptions, OpenOptions, Preallocation, Qcow2Image, Qcow2Writer};

use super::{check_known_options, option, CreateSpec, OpenCtx};
use crate::format::Format;

/// The `-o` options of a new qcow2 image, with what each takes (`vdconv create -o help`).
pub(crate) const OPTIONS: &[(&str, &str)] = &[
    ("compat", "1.1 (version 3, the default) or 0.10 (version 2)"),
    (
        "cluster_size",
        "a power of two from 512 to 2M (default 64K)",
    ),
    ("refcount_bits", "1, 2, 4, 8, 16 (default), 32 or 64"),
    ("preallocation", "off (default) or metadata"),
    (
        "compression_type",
        "zlib (default) or zstd, for compressed clusters (-c)",
    ),
    (
        "compress",
        "on or off: compress every cluster written (what -c sets)",
    ),
    ("lazy_refcounts", "on or off (default): version 3 only"),
    ("backing_fmt", "the backing file's format (-F)"),
];

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenCtx<'_>) -> Result<Box<dyn BlockDevice>> {
    let opts = OpenOptions {
        writable: ctx.writable,
        snapshot: option(ctx.options, "snapshot").map(str::to_string),
        limits: ctx.limits.clone(),
        depth: ctx.depth,
    };
    Ok(Box::new(Qcow2Image::open(storage, ctx.gate, &opts)?))
}

fn parse_size(key: &str, v: &str) -> Result<u64> {
    let v = v.trim();
    let (num, mul) = match v.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&v[..v.len() - 1], 1u64 << 10),
        Some('m') => (&v[..v.len() - 1], 1 << 20),
        Some('g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| {
            Error::invalid_argument(format!("{key}: invalid size '{v}' (expected e.g. 64K, 2M)"))
        })
}

fn on_off(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(Error::invalid_argument(format!(
            "{key} must be on or off, not '{v}'"
        ))),
    }
}

fn create_options(spec: &CreateSpec<'_>) -> Result<CreateOptions> {
    check_known_options(Format::Qcow2, spec.options, OPTIONS)?;
    let mut o = CreateOptions {
        size: spec.size,
        ..CreateOptions::default()
    };
    let o_ = spec.options;
    if let Some(v) = option(o_, "compat") {
        o.version = match v {
            "0.10" | "v2" | "2" => 2,
            "1.1" | "v3" | "3" => 3,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "compat must be 0.10 or 1.1, not '{v}'"
                )))
            }
        };
    }
    if let Some(v) = option(o_, "cluster_size") {
        let cs = parse_size("cluster_size", v)?;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::invalid_argument(
                "cluster_size must be a power of two from 512 to 2M",
            ));
        }
        o.cluster_bits = cs.trailing_zeros();
    }
    if let Some(v) = option(o_, "refcount_bits") {
        let b: u64 = v
            .parse()
            .map_err(|_| Error::invalid_argument(format!("invalid refcount_bits '{v}'")))?;
        if !b.is_power_of_two() || b > 64 {
            return Err(Error::invalid_argument(
                "refcount_bits must be a power of two up to 64",
            ));
        }
        o.refcount_order = b.trailing_zeros();
    }
    if let Some(v) = option(o_, "preallocation") {
        o.preallocation = match v {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "preallocation must be off or metadata, not '{v}'"
                )))
            }
        };
    }
    if let Some(v) = option(o_, "compression_type") {
        o.compression_type = match v {
            "zlib" | "deflate" => 0,
            "zstd" => 1,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "unknown compression_type '{v}'"
                )))
            }
        };
    }
    if let Some(v) = option(o_, "compress") {
        o.compress = on_off("compress", v)?;
    }
    if let Some(v) = option(o_, "lazy_refcounts") {
        o.lazy_refcounts = on_off("lazy_refcounts", v)?;
    }
    match (option(o_, "backing_fmt"), spec.parent) {
        (Some(_), None) => {
            return Err(Error::invalid_argument(
                "backing_fmt needs a backing file (-b/-B)",
            ))
        }
        (Some(f), Some(p)) if f.parse::<Format>()? != p.format => {
            return Err(Error::invalid_argument(format!(
                "backing_fmt={f}, but the backing file was opened as {} (name it with -F)",
                p.format
            )))
        }
        _ => {}
    }
    if let Some(p) = spec.parent {
        o.backing_file = Some(p.reference.clone());
        o.backing_format = Some(
            match p.format {
                Format::Vhd => "vpc",
                other => other.name(),
            }
            .to_string(),
        );
    }
    Ok(o)
}

pub(crate) fn create(storage: Box<dyn Storage>, spec: &CreateSpec<'_>) -> Result<()> {
    let mut o = create_options(spec)?;
    o.compress = false;
    qcow2::create(storage, o)
}

pub(crate) fn writer(
    storage: Box<dyn Storage>,
    spec: &CreateSpec<'_>,
) -> Result<Box<dyn ImageWriter>> {
    let o = create_options(spec)?;
    Ok(Box::new(Qcow2Writer::new(storage, o)?))
}
