//! vhdx glue: options, parents and the sequential writer for the `vhdx` crate.

use std::path::{Component, Path};

use blockdev::{BlockDevice, Error, ImageWriter, Result, Storage};
use vhdx::create::ParentLink;
use vhdx::{CreateOptions, Subformat, VhdxImage, VhdxWriter};

use super::{check_known_options, option, CreateSpec, OpenCtx};
use crate::format::Format;

/// The `-o` options of a new VHDX image, with what each takes (`vdconv create -o help`).
pub(crate) const OPTIONS: &[(&str, &str)] = &[
    ("subformat", "dynamic (default) or fixed"),
    (
        "block_size",
        "1M to 256M, a power of two (default 32M); a bare number is MiB",
    ),
    (
        "logical_sector_size",
        "512 (default, or the parent's) or 4096",
    ),
    (
        "physical_sector_size",
        "512 or 4096 (default, or the parent's)",
    ),
];

pub(crate) fn open(storage: Box<dyn Storage>, ctx: &OpenCtx<'_>) -> Result<Box<dyn BlockDevice>> {
    let img = VhdxImage::open(
        storage,
        &vhdx::OpenOptions {
            gate: ctx.gate,
            writable: ctx.writable,
            limits: ctx.limits,
            depth: ctx.depth,
        },
    )?;
    Ok(Box::new(img))
}

/// Parses a size with an optional K/M/G suffix (binary units).
fn parse_size(key: &str, v: &str) -> Result<u64> {
    let t = v.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => 0,
            };
            (t.get(..i).unwrap_or_default(), m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::invalid_argument(format!("invalid value '{v}' for option {key}")))
}

/// The logical sector size `options` give a new VHDX (512 unless asked).
pub(crate) fn logical_sector(options: &[(String, String)]) -> Result<u32> {
    sector_opt(options, "logical_sector_size", 512)
}

fn sector_opt(options: &[(String, String)], key: &str, default: u32) -> Result<u32> {
    match option(options, key) {
        None => Ok(default),
        Some(v) => match parse_size(key, v)? {
            512 => Ok(512),
            4096 => Ok(4096),
            _ => Err(Error::invalid_argument(format!(
                "{key} must be 512 or 4096, not {v}"
            ))),
        },
    }
}

/// The Windows-style relative path from the directory of `child` to `parent`.
/// `parent` is canonical; so is the child's directory here (it exists: the child is created
/// in it), so `..` or links in the path the user gave do not skew the result.
fn relative_path(child: Option<&Path>, parent: &Path, reference: &str) -> String {
    let child = child.map(|c| {
        if c.is_absolute() {
            c.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(c)
        }
    });
    let dir = child
        .as_deref()
        .and_then(Path::parent)
        .map(|d| d.canonicalize().unwrap_or_else(|_| d.to_path_buf()));
    if let Some(dir) = dir.as_deref() {
        let a: Vec<Component<'_>> = dir.components().collect();
        let b: Vec<Component<'_>> = parent.components().collect();
        let common = a.iter().zip(b.iter()).take_while(|(x, y)| x == y).count();
        if common > 0 {
            let mut parts: Vec<String> = Vec::new();
            for _ in common..a.len() {
                parts.push("..".into());
            }
            for c in b.iter().skip(common) {
                parts.push(c.as_os_str().to_string_lossy().to_string());
            }
            if parts.first().is_some_and(|p| p != "..") {
                parts.insert(0, ".".into());
            }
            return parts.join("\\");
        }
    }
    let r = reference.replace('/', "\\");
    if Path::new(reference).is_absolute() || r.starts_with('.') {
        r
    } else {
        format!(".\\{r}")
    }
}

fn options(spec: &CreateSpec<'_>) -> Result<CreateOptions> {
    check_known_options(Format::Vhdx, spec.options, OPTIONS)?;
    let mut o = CreateOptions {
        size: spec.size,
        ..CreateOptions::default()
    };
    match option(spec.options, "subformat") {
        None | Some("dynamic") => {}
        Some("fixed") => o.subformat = Subformat::Fixed,
        Some(v) => {
            return Err(Error::invalid_argument(format!(
                "subformat must be fixed or dynamic, not '{v}'"
            )))
        }
    }
    if let Some(v) = option(spec.options, "block_size") {
        let mut bs = parse_size("block_size", v)?;
        // A bare small number means MiB (block_size=32).
        if bs <= 256 {
            bs <<= 20;
        }
        o.block_size = bs;
    }
    o.logical = logical_sector(spec.options)?;
    o.physical = sector_opt(spec.options, "physical_sector_size", 4096)?;
    if let Some(p) = spec.parent {
        if o.subformat == Subformat::Fixed && option(spec.options, "subformat").is_some() {
            return Err(Error::invalid_argument(
                "a differencing VHDX cannot be fixed",
            ));
        }
        let Some(pv) = p.device.as_any().downcast_ref::<VhdxImage>() else {
            return Err(Error::invalid_argument(format!(
                "the parent of a differencing VHDX must be a VHDX image, not {}",
                p.format
            )));
        };
        if option(spec.options, "logical_sector_size").is_none() {
            o.logical = pv.sector_sizes().logical;
        }
        if option(spec.options, "physical_sector_size").is_none() {
            o.physical = pv.sector_sizes().physical;
        }
        o.parent = Some(ParentLink {
            data_write_guid: pv.data_write_guid(),
            disk_id: pv.disk_id(),
            size: pv.size(),
            logical: pv.sector_sizes().logical,
            relative_path: relative_path(spec.path, &p.path, &p.reference),
            absolute_win32_path: p.path.display().to_string(),
        });
    }
    Ok(o)
}

pub(crate) fn create(storage: Box<dyn Storage>, spec: &CreateSpec<'_>) -> Result<()> {
    let o = options(spec)?;
    vhdx::create(&*storage, &o)
}

pub(crate) fn writer(
    storage: Box<dyn Storage>,
    spec: &CreateSpec<'_>,
) -> Result<Box<dyn ImageWriter>> {
    let o = options(spec)?;
    Ok(Box::new(VhdxWriter::new(storage, o, spec.limits)?))
}

/// After a commit into the parent of the differencing VHDX `child`: records the parent's new
/// DataWriteGuid as the child's parent_linkage, so the child still opens over it (its content,
/// its own data over the updated parent, is unchanged). Nothing is written when the linkage
/// already matches (a commit that wrote nothing).
pub(crate) fn relink_child(child: &dyn BlockDevice, parent: &dyn BlockDevice) -> Result<()> {
    let (Some(c), Some(p)) = (
        child.as_any().downcast_ref::<VhdxImage>(),
        parent.as_any().downcast_ref::<VhdxImage>(),
    ) else {
        return Err(Error::invalid_argument(
            "relinking needs a differencing VHDX and its VHDX parent",
        ));
    };
    let dwg = p.data_write_guid();
    if c.locator().is_some_and(|l| l.linkages().contains(&dwg)) {
        return Ok(());
    }
    c.relink_parent(dwg)
}
