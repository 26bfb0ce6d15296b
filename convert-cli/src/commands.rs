//! The commands: argument validation, calls into `vdisk`, printing.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use blockdev::{BlockDevice, Error, ErrorKind, ImageInfo, Result, Severity};
use vdisk::formats::option;
use vdisk::{Format, OpenOptions};

use crate::args::{Cli, Command, OpenArgs, OutputFormat, ProgressArg, Target};
use crate::exit::Code;
use crate::progress::{human, Progress, ProgressMode};

/// Prints a line on stdout; a closed pipe (`vdconv map x | head`) ends the program quietly
/// with exit code 0, as for other Unix tools.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// Version of the JSON documents printed with `--output json`.
const SCHEMA: u32 = 1;

/// Runs a parsed command line and returns the exit code.
pub fn run(cli: Cli, cancel: &AtomicBool) -> Code {
    let is_compare = matches!(cli.command, Command::Compare { .. });
    match dispatch(cli.command, cancel) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            if is_compare {
                Code::Usage
            } else {
                Code::for_error(e.kind())
            }
        }
    }
}

/// Prints `vdconv: <error>` and each cause.
fn report_error(e: &Error) {
    let mut msg = format!("vdconv: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
}

fn dispatch(cmd: Command, cancel: &AtomicBool) -> Result<Code> {
    match cmd {
        Command::Info {
            format,
            backing_chain,
            output,
            open,
            image,
        } => info(&image, format.as_deref(), backing_chain, output, &open),
        Command::Convert {
            format,
            output_format,
            options,
            backing,
            backing_format,
            compress,
            progress_flag,
            progress,
            force,
            verify,
            target,
            keep_chain,
            snapshot,
            qemu,
            open,
            src,
            dst,
        } => {
            if wants_option_help(&options) {
                let f = target
                    .map(|t| target_format(t).to_string())
                    .or(output_format)
                    .or_else(|| {
                        dst.as_deref()
                            .and_then(|d| format_from_name(d, "-O").ok().map(|f| f.to_string()))
                    });
                return option_help(f.as_deref(), false);
            }
            let (Some(src), Some(dst)) = (src, dst) else {
                return Err(Error::invalid_argument(
                    "convert needs a source and a destination image",
                ));
            };
            if let Some(why) = qemu.refuse_unsupported() {
                return Err(Error::new(ErrorKind::Unsupported, why));
            }
            if qemu.cache.is_some() || qemu.src_cache.is_some() {
                eprintln!("vdconv: notice: -t/-T are ignored: the output is always flushed before vdconv returns");
            }
            let c = ConvertArgs {
                format,
                output_format,
                options,
                backing,
                backing_format,
                compress,
                progress: ProgressMode::choose(progress.map(map_progress), progress_flag),
                force,
                verify,
                target,
                keep_chain,
                snapshot,
                open,
                src,
                dst,
            };
            convert(c, cancel)
        }
        Command::Create {
            format,
            options,
            backing,
            backing_format,
            force,
            image,
            size,
        } => {
            if wants_option_help(&options) {
                let f = format.or_else(|| {
                    image
                        .as_deref()
                        .and_then(|i| format_from_name(i, "-f").ok().map(|f| f.to_string()))
                });
                return option_help(f.as_deref(), true);
            }
            let Some(image) = image else {
                return Err(Error::invalid_argument("create needs the new image's name"));
            };
            let format: Format = match format {
                Some(f) => f.parse()?,
                None => format_from_name(&image, "-f")?,
            };
            // qemu-img's `-o size=` and `-o backing_file=` are the size argument and `-b`.
            let mut options = parse_kv_list(&options)?;
            let size = flag_or_option(
                size,
                take_option(&mut options, "size"),
                ("SIZE", "size"),
                |a, b| Ok(parse_size(a)? == parse_size(b)?),
            )?;
            let backing = flag_or_option(
                backing,
                take_option(&mut options, "backing_file"),
                ("-b", "backing_file"),
                |a, b| Ok(a == b),
            )?;
            if backing.as_deref() == Some("") {
                return Err(Error::invalid_argument("the backing file name is empty"));
            }
            let size = size
                .as_deref()
                .map(parse_size)
                .transpose()?
                .map(|s| whole_sectors(s, format, &options))
                .transpose()?;
            let backing_format = backing_fmt_of(backing_format, &options)?;
            if backing.is_none() && backing_format.is_some() {
                return Err(Error::invalid_argument(
                    "a backing format (-F) needs a backing file (-b)",
                ));
            }
            if let Some(s) = size {
                check_target_capacity(format, s)?;
            }
            let opts = vdisk::CreateOptions {
                format,
                size,
                options,
                backing,
                backing_format: backing_format.as_deref().map(str::parse).transpose()?,
                force,
                limits: blockdev::Limits::default(),
            };
            vdisk::create(&image, &opts)?;
            if let Some(b) = &opts.backing {
                note_confined_backing(&image, b);
            }
            Ok(Code::Ok)
        }
        Command::Check {
            format,
            output,
            repair,
            open,
            image,
        } => check(&image, format.as_deref(), output, repair.as_deref(), &open),
        Command::Compare {
            format_a,
            format_b,
            strict,
            output,
            open,
            a,
            b,
        } => {
            // One set of open options for two images: each gets the ones its format uses.
            let all = parse_kv_list(&open.open_options)?;
            let (oa, ob) = (
                options_for(&a, format_a.as_deref(), &all)?,
                options_for(&b, format_b.as_deref(), &all)?,
            );
            if let Some((k, _)) = all.iter().find(|o| !oa.contains(o) && !ob.contains(o)) {
                return Err(Error::invalid_argument(format!(
                    "neither image has the open option '{k}'"
                )));
            }
            let with = |path: &Path, format: Option<&str>, opts: Vec<(String, String)>| {
                let mut o = open_options(&open, format, false)?;
                o.format_options = opts;
                vdisk::open(path, &o)
            };
            let da = with(&a, format_a.as_deref(), oa)?;
            let db = with(&b, format_b.as_deref(), ob)?;
            let r = vdisk::compare(da.as_ref(), db.as_ref(), strict)?;
            match output {
                OutputFormat::Json => outln!(
                    "{}",
                    serde_json::json!({"schema": SCHEMA, "identical": r.identical,
                        "first_difference": r.first_difference, "mismatch": r.mismatch,
                        "sizes": [r.sizes.0, r.sizes.1]})
                ),
                OutputFormat::Human => {
                    // qemu-img's wording, which scripts may match; it warns of a size
                    // difference once the common part has compared equal.
                    let common = r.sizes.0.min(r.sizes.1);
                    if r.sizes.0 != r.sizes.1
                        && !strict
                        && r.first_difference.is_none_or(|d| d >= common)
                    {
                        outln!("Warning: Image size mismatch!");
                    }
                    let at = r.first_difference.unwrap_or(0);
                    match r.mismatch {
                        None => outln!("Images are identical."),
                        Some(vdisk::Mismatch::Size) => outln!(
                            "Strict mode: image size mismatch ({} vs {} bytes)!",
                            r.sizes.0,
                            r.sizes.1
                        ),
                        Some(vdisk::Mismatch::Allocation) => {
                            outln!("Strict mode: Offset {at} block status mismatch!")
                        }
                        Some(vdisk::Mismatch::Content) => {
                            outln!("Content mismatch at offset {at}!")
                        }
                    }
                }
            }
            Ok(if r.identical { Code::Ok } else { Code::Error })
        }
        Command::Map {
            format,
            output,
            open,
            image,
        } => {
            let (dev, files) =
                vdisk::open_with_paths(&image, &open_options(&open, format.as_deref(), false)?)?;
            let entries = vdisk::map(dev.as_ref())?;
            match output {
                OutputFormat::Json => {
                    let s = serde_json::to_string_pretty(&entries).map_err(|e| {
                        Error::new(ErrorKind::Io, "cannot encode JSON").with_source(e)
                    })?;
                    outln!("{s}");
                }
                OutputFormat::Human => {
                    // qemu-img's columns, and the kind: "Mapped to" is an offset in File.
                    outln!(
                        "{:<20}{:<20}{:<20}{:<18}File",
                        "Offset",
                        "Length",
                        "Mapped to",
                        "Kind"
                    );
                    for e in entries.iter().filter(|e| e.data || e.present) {
                        let kind = if e.data { "data" } else { "zero" };
                        let mapped = e
                            .offset
                            .map(|o| format!("{o:#x}"))
                            .unwrap_or_else(|| "-".into());
                        let file = usize::try_from(e.depth)
                            .ok()
                            .and_then(|d| files.get(d))
                            .map(|f| f.display().to_string())
                            .unwrap_or_default();
                        outln!(
                            "{:<20}{:<20}{:<20}{:<18}{file}",
                            format!("{:#x}", e.start),
                            format!("{:#x}", e.length),
                            mapped,
                            format!("{kind} (depth {})", e.depth),
                        );
                    }
                }
            }
            Ok(Code::Ok)
        }
        Command::Digest {
            format,
            algorithm,
            output,
            progress_flag,
            open,
            image,
        } => {
            let alg: vdisk::DigestAlgorithm = algorithm.parse()?;
            let dev = open_image(&image, format.as_deref(), &open, false)?;
            let mut p = Progress::new(ProgressMode::choose(None, progress_flag), "digest");
            let hex = vdisk::digest(dev.as_ref(), alg, Some(cancel), &mut |d, t| p.update(d, t))?;
            p.finish(dev.size());
            match output {
                OutputFormat::Json => outln!(
                    "{}",
                    serde_json::json!({"schema": SCHEMA, "algorithm": alg.name(), "digest": hex,
                        "image": image.display().to_string(), "virtual_size": dev.size()})
                ),
                OutputFormat::Human => outln!("{hex}  {}", image.display()),
            }
            Ok(Code::Ok)
        }
        Command::Commit {
            format,
            progress_flag,
            keep: _,
            open,
            image,
        } => {
            let mut opts = open_options(&open, format.as_deref(), false)?;
            opts.no_backing = false;
            let mut p = Progress::new(ProgressMode::choose(None, progress_flag), "commit");
            let mut total = 0u64;
            let parent = vdisk::commit(&image, &opts, Some(cancel), &mut |d, t| {
                total = t;
                p.update(d, t)
            })?;
            p.finish(total);
            eprintln!("Image committed into {}.", parent.display());
            Ok(Code::Ok)
        }
    }
}

fn map_progress(p: ProgressArg) -> ProgressMode {
    match p {
        ProgressArg::Bar => ProgressMode::Bar,
        ProgressArg::Json => ProgressMode::Json,
        ProgressArg::None => ProgressMode::None,
    }
}

fn open_options(open: &OpenArgs, format: Option<&str>, writable: bool) -> Result<OpenOptions> {
    Ok(OpenOptions {
        format: format.map(str::parse).transpose()?,
        writable,
        no_backing: open.no_backing,
        backing_dirs: open.backing_dirs.clone(),
        ignore_parent_id: open.ignore_parent_id,
        limits: blockdev::Limits::default(),
        format_options: parse_kv_list(&open.open_options)?,
    })
}

/// The format a file name's extension names (`.qcow2`, `.vhd`, `.vhdx`/`.avhdx`, `.raw`/`.img`),
/// with a notice; otherwise the user must name it with `flag`. (qemu-img writes raw whatever
/// the name says, so `disk.qcow2` could silently hold a raw image.)
fn format_from_name(path: &Path, flag: &str) -> Result<Format> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.parse::<Format>() {
        Ok(f) if !ext.is_empty() && ext != "vpc" => {
            eprintln!("vdconv: notice: writing {f}, from the file name ({flag} names the format)");
            Ok(f)
        }
        _ => Err(Error::invalid_argument(format!(
            "name the output format with {flag} (raw, vhd, vhdx, qcow2): the file name does not say"
        ))),
    }
}

/// `size` rounded up to whole sectors of a new `format` image made with `options`, with a
/// notice when that changes it: every format but raw counts sectors, and qemu-img rounds the
/// same way.
fn whole_sectors(size: u64, format: Format, options: &[(String, String)]) -> Result<u64> {
    let sector = u64::from(vdisk::formats::new_logical_sector(format, options)?);
    let s = size.div_ceil(sector).saturating_mul(sector);
    if s != size {
        eprintln!(
            "vdconv: notice: virtual size rounded up from {size} to {s} bytes (whole {sector}-byte sectors for {format})"
        );
    }
    Ok(s)
}

/// Tells the user when the parent of a new image lies outside the image's directory: opening
/// the image will then need `--backing-dir` (parents are confined, see the README's Safety).
fn note_confined_backing(image: &Path, reference: &str) {
    let dir = image
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (Ok(dir), Ok(parent)) = (dir.canonicalize(), dir.join(reference).canonicalize()) else {
        return;
    };
    if let Some(pdir) = parent.parent().filter(|p| !p.starts_with(&dir)) {
        eprintln!(
            "vdconv: notice: the backing file is outside the image's directory: commands that open {} need --backing-dir {}",
            image.display(),
            pdir.display()
        );
    }
}

/// Removes every `key=` from `options`, returning the last value.
fn take_option(options: &mut Vec<(String, String)>, key: &str) -> Option<String> {
    let last = option(options, key).map(str::to_string);
    options.retain(|(k, _)| k != key);
    last
}

/// A value given as an argument (`flag`) or as `-o key=` (`names`: how each is spelled);
/// given both ways, they must be the `same`.
fn flag_or_option(
    flag: Option<String>,
    opt: Option<String>,
    (flag_name, key): (&str, &str),
    same: impl Fn(&str, &str) -> Result<bool>,
) -> Result<Option<String>> {
    match (flag, opt) {
        (Some(f), Some(o)) if !same(&f, &o)? => Err(Error::invalid_argument(format!(
            "{flag_name} {f} and -o {key}={o} disagree"
        ))),
        (f, o) => Ok(f.or(o)),
    }
}

/// `-F`, or qemu-img's `-o backing_fmt=` when `-F` is absent; both must agree.
fn backing_fmt_of(flag: Option<String>, options: &[(String, String)]) -> Result<Option<String>> {
    flag_or_option(
        flag,
        option(options, "backing_fmt").map(str::to_string),
        ("-F", "backing_fmt"),
        |a, b| Ok(a.parse::<Format>()? == b.parse::<Format>()?),
    )
}

/// The options of `all` that the format of the image at `path` (named, or probed) uses.
fn options_for(
    path: &Path,
    format: Option<&str>,
    all: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    if all.is_empty() {
        return Ok(Vec::new());
    }
    let f: Format = match format {
        Some(f) => f.parse()?,
        None => vdisk::probe(&blockdev::FileStorage::open(path, false)?)?,
    };
    let keys = vdisk::formats::open_option_keys(f);
    Ok(all
        .iter()
        .filter(|(k, _)| keys.contains(&k.as_str()))
        .cloned()
        .collect())
}

fn open_image(
    path: &Path,
    format: Option<&str>,
    open: &OpenArgs,
    writable: bool,
) -> Result<Box<dyn BlockDevice>> {
    vdisk::open(path, &open_options(open, format, writable)?)
}

/// Parses `K=V,K=V` lists (repeatable); a bare `K` means `K=on`.
pub fn parse_kv_list(items: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in items {
        for part in item.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, "on"));
            if k.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "invalid option '{part}' (expected K=V)"
                )));
            }
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(out)
}

/// Parses a size: bytes, or a number with a binary suffix K, M, G, T, P, E (optionally
/// followed by `iB` or `B`); fractions are allowed with a suffix (`1.5G`).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || {
        Error::invalid_argument(format!(
            "invalid size '{s}' (expected e.g. 10G, 512M, 1048576)"
        ))
    };
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        Some('p') => (&stripped[..stripped.len() - 1], 50),
        Some('e') => (&stripped[..stripped.len() - 1], 60),
        _ => (stripped, 0),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_shl(shift)
            .filter(|v| v >> shift == n)
            .ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if !f.is_finite() || f < 0.0 || shift == 0 {
        return Err(bad());
    }
    let v = f * (1u64 << shift) as f64;
    if v >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v.floor() as u64)
}

/// Bytes the file occupies on disk (allocated blocks), as `du` counts them.
fn disk_usage(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

fn info_json(path: &Path, info: &ImageInfo) -> serde_json::Value {
    let actual = disk_usage(path).or(info.actual_size);
    serde_json::json!({
        "schema": SCHEMA,
        "filename": path.display().to_string(),
        "format": info.format,
        "subformat": info.subformat,
        "virtual_size": info.virtual_size,
        "actual_size": actual,
        "cluster_size": info.cluster_size,
        "logical_sector_size": info.logical_sector_size,
        "physical_sector_size": info.physical_sector_size,
        "backing": info.backing,
        "format_specific": info.format_specific,
    })
}

fn print_info_human(path: &Path, info: &ImageInfo) {
    outln!("image: {}", path.display());
    outln!("file format: {}", info.format);
    if let Some(sf) = &info.subformat {
        outln!("subformat: {sf}");
    }
    outln!(
        "virtual size: {} ({} bytes)",
        human(info.virtual_size),
        info.virtual_size
    );
    if let Some(a) = disk_usage(path).or(info.actual_size) {
        outln!("disk size: {}", human(a));
    }
    if let Some(c) = info.cluster_size {
        outln!("cluster_size: {c}");
    }
    outln!(
        "sector size: {} logical, {} physical",
        info.logical_sector_size,
        info.physical_sector_size
    );
    if let Some(b) = &info.backing {
        outln!(
            "backing file: {}{}",
            b.reference,
            if b.resolved {
                b.resolved_path
                    .as_ref()
                    .map(|p| format!(" (actual path: {p})"))
                    .unwrap_or_default()
            } else {
                " (not opened)".to_string()
            }
        );
        if let Some(f) = &b.format {
            outln!("backing file format: {f}");
        }
    }
    if !info.format_specific.is_empty() {
        outln!("Format specific information:");
        for (k, v) in &info.format_specific {
            print_value(k, v, 1);
        }
    }
}

fn print_value(key: &str, v: &serde_json::Value, depth: usize) {
    let pad = "    ".repeat(depth);
    match v {
        serde_json::Value::Object(m) => {
            outln!("{pad}{key}:");
            for (k, x) in m {
                print_value(k, x, depth + 1);
            }
        }
        serde_json::Value::Array(a) if a.iter().any(|x| x.is_object() || x.is_array()) => {
            outln!("{pad}{key}:");
            for (i, x) in a.iter().enumerate() {
                print_value(&format!("[{i}]"), x, depth + 1);
            }
        }
        serde_json::Value::Array(a) => {
            let items: Vec<String> = a.iter().map(scalar).collect();
            outln!("{pad}{key}: {}", items.join(", "));
        }
        other => outln!("{pad}{key}: {}", scalar(other)),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn info(
    path: &Path,
    format: Option<&str>,
    chain: bool,
    output: OutputFormat,
    open: &OpenArgs,
) -> Result<Code> {
    let opts = open_options(open, format, false)?;
    // A child whose parent is missing still shows its own facts (and where it looked).
    let (dev, paths, warning) = match vdisk::open_with_paths(path, &opts) {
        Ok((d, p)) => (d, p, None),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::BackingNotFound | ErrorKind::BackingDenied | ErrorKind::BackingMismatch
            ) && !opts.no_backing =>
        {
            let mut o = opts.clone();
            o.no_backing = true;
            let (d, p) = vdisk::open_with_paths(path, &o)?;
            (d, p, Some(e))
        }
        Err(e) => return Err(e),
    };
    if let Some(w) = &warning {
        eprintln!("vdconv: warning: {w}");
    }
    let mut layers: Vec<(PathBuf, ImageInfo)> =
        vec![(path.to_path_buf(), with_opened(dev.info(), &paths, 0))];
    if chain {
        let mut cur = dev.backing();
        let mut i = 1;
        while let Some(b) = cur {
            let p = paths.get(i).cloned().unwrap_or_default();
            layers.push((p, with_opened(b.info(), &paths, i)));
            cur = b.backing();
            i += 1;
        }
    }
    match output {
        OutputFormat::Json => {
            let v: Vec<serde_json::Value> = layers.iter().map(|(p, i)| info_json(p, i)).collect();
            let doc = if chain {
                serde_json::Value::Array(v)
            } else {
                v.into_iter().next().unwrap_or_default()
            };
            let s = serde_json::to_string_pretty(&doc)
                .map_err(|e| Error::new(ErrorKind::Io, "cannot encode JSON").with_source(e))?;
            outln!("{s}");
        }
        OutputFormat::Human => {
            for (i, (p, inf)) in layers.iter().enumerate() {
                if i > 0 {
                    outln!();
                }
                print_info_human(p, inf);
            }
        }
    }
    Ok(Code::Ok)
}

/// Layer `i`'s info with its backing's actual path set to the file the chain opened (which
/// the gate may have found under another directory than the reference names), so it matches
/// the next layer's `image:` line.
fn with_opened(mut info: ImageInfo, paths: &[PathBuf], i: usize) -> ImageInfo {
    if let (Some(b), Some(p)) = (info.backing.as_mut(), paths.get(i + 1)) {
        if b.resolved {
            b.resolved_path = Some(p.display().to_string());
        }
    }
    info
}

fn check(
    path: &Path,
    format: Option<&str>,
    output: OutputFormat,
    repair: Option<&str>,
    open: &OpenArgs,
) -> Result<Code> {
    let mut opts = open_options(open, format, false)?;
    // Check reads one layer's metadata: parents are not needed.
    opts.no_backing = true;
    if let Some(r) = repair {
        if r != "leaks" {
            return Err(Error::invalid_argument(format!(
                "unsupported repair mode '{r}': only leaks are repaired (-r leaks); corruptions are reported, never rewritten"
            )));
        }
        let fmt = match opts.format {
            Some(f) => f,
            None => vdisk::probe(&blockdev::FileStorage::open(path, false)?)?,
        };
        match vdisk::formats::repair_leaks(fmt, path) {
            Ok(repaired) => eprintln!("Repaired {repaired} leaked cluster(s)."),
            // A corrupt image is left alone; the report below shows why (exit 3).
            Err(e) if e.kind() == ErrorKind::Corrupt => eprintln!("vdconv: notice: {e}"),
            Err(e) => return Err(e),
        }
    }
    let dev = vdisk::open(path, &opts)?;
    let report = dev.check().map_err(|e| e.with_path(path))?;
    let code = if report.corruptions() > 0 {
        Code::Corrupt
    } else if report.leaks() > 0 {
        Code::Leaks
    } else {
        Code::Ok
    };
    match output {
        OutputFormat::Json => {
            let doc = serde_json::json!({
                "schema": SCHEMA,
                "filename": path.display().to_string(),
                "format": report.format,
                "corruptions": report.corruptions(),
                "leaks": report.leaks(),
                "clean": code == Code::Ok,
                "findings": report.findings,
                "stats": report.stats,
            });
            let s = serde_json::to_string_pretty(&doc)
                .map_err(|e| Error::new(ErrorKind::Io, "cannot encode JSON").with_source(e))?;
            outln!("{s}");
        }
        OutputFormat::Human => {
            for f in &report.findings {
                let sev = match f.severity {
                    Severity::Corruption => "ERROR",
                    Severity::Leak => "Leaked",
                    Severity::Warning => "Warning",
                };
                let at = f.offset.map(|o| format!(" at {o:#x}")).unwrap_or_default();
                outln!("{sev}: {}{at}: {}", f.field, f.message);
            }
            if code == Code::Ok {
                outln!("No errors were found on the image.");
            } else {
                outln!(
                    "{} errors and {} leaks were found on the image.",
                    report.corruptions(),
                    report.leaks()
                );
            }
            for (k, v) in &report.stats {
                outln!("{k}: {}", scalar(v));
            }
        }
    }
    Ok(code)
}

struct ConvertArgs {
    format: Option<String>,
    output_format: Option<String>,
    options: Vec<String>,
    backing: Option<String>,
    backing_format: Option<String>,
    compress: bool,
    progress: ProgressMode,
    force: bool,
    verify: bool,
    target: Option<Target>,
    keep_chain: bool,
    snapshot: Option<String>,
    open: OpenArgs,
    src: PathBuf,
    dst: PathBuf,
}

/// The format a target writes.
fn target_format(t: Target) -> Format {
    match t {
        Target::Azure | Target::Xen => Format::Vhd,
        Target::Hyperv => Format::Vhdx,
        Target::Kvm => Format::Qcow2,
    }
}

/// qemu-img's `-o help` (or `-o ?`) among the options.
fn wants_option_help(options: &[String]) -> bool {
    options
        .iter()
        .flat_map(|o| o.split(','))
        .any(|k| k == "help" || k == "?")
}

/// Prints the `-o` options of `format` (of every format when none is known), as
/// `qemu-img create -o help` does.
fn option_help(format: Option<&str>, create: bool) -> Result<Code> {
    let formats: Vec<Format> = match format {
        Some(f) => vec![f.parse()?],
        None => vec![Format::Raw, Format::Vhd, Format::Vhdx, Format::Qcow2],
    };
    for f in formats {
        outln!("Supported options for {f} (-o K=V,...):");
        let general: &[(&str, &str)] = match (create, f) {
            (false, _) => &[],
            (true, Format::Raw) => &[("size", "the virtual size (the SIZE argument)")],
            (true, _) => &[
                ("size", "the virtual size (the SIZE argument)"),
                ("backing_file", "the parent/backing image (-b)"),
            ],
        };
        for (k, what) in general.iter().chain(vdisk::formats::create_options(f)) {
            outln!("  {k:<22}{what}");
        }
        outln!();
    }
    Ok(Code::Ok)
}

/// A target as it is spelled on the command line.
fn target_name(t: Target) -> String {
    clap::ValueEnum::to_possible_value(&t)
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

fn convert(a: ConvertArgs, cancel: &AtomicBool) -> Result<Code> {
    let mut open = a.open.clone();
    if let Some(s) = &a.snapshot {
        open.open_options.push(format!("snapshot={s}"));
    }
    let opts = open_options(&open, a.format.as_deref(), false)?;
    let (src, chain) = vdisk::open_with_paths(&a.src, &opts)?;
    // Not even the source itself, with --force (qemu-img refuses too): the new file would
    // drop what a conversion does not carry (qcow2 snapshots) and the identity that images
    // built on it are linked to (VHD/VHDX parent IDs, a qcow2 backing format). A lower layer
    // replaced by the flattened output would break the source chain.
    vdisk::refuse_overwriting(&a.dst, &chain, "the source or a parent/backing file of it")?;

    let mut out_opts = parse_kv_list(&a.options)?;
    let mut size = None;
    let out_format: Format = match (a.target, a.output_format.as_deref()) {
        (Some(t), named) => {
            let f = target_format(t);
            if let Some(n) = named {
                if n.parse::<Format>()? != f {
                    return Err(Error::invalid_argument(format!(
                        "--target {} writes {f}, not {n}",
                        target_name(t)
                    )));
                }
            }
            // (key, value, required): a required setting is what the platform accepts, so an
            // -o that contradicts it is refused; the others are defaults that -o may change.
            let preset: &[(&str, &str, bool)] = match t {
                Target::Azure => &[("subformat", "fixed", true)],
                Target::Hyperv => &[
                    ("subformat", "dynamic", false),
                    ("physical_sector_size", "4096", false),
                    ("block_size", "32M", false),
                ],
                Target::Xen => &[("dialect", "xen", true)],
                Target::Kvm => &[("compat", "1.1", true)],
            };
            for (key, value, required) in preset {
                let Some(given) = option(&out_opts, key) else {
                    continue;
                };
                // Sizes in any spelling; a bare block_size up to 256 is MiB, as the VHDX
                // option reads it.
                let size = |v: &str| {
                    parse_size(v).ok().map(|n| {
                        if *key == "block_size" && n <= 256 {
                            n << 20
                        } else {
                            n
                        }
                    })
                };
                let same = given.eq_ignore_ascii_case(value)
                    || (*key == "compat" && matches!(given, "v3" | "3"))
                    || (size(given).is_some() && size(given) == size(value));
                if same {
                    continue;
                }
                let name = target_name(t);
                if *required {
                    return Err(Error::invalid_argument(format!(
                        "--target {name} needs {key}={value}: -o {key}={given} would give an image it rejects"
                    )));
                }
                eprintln!(
                    "vdconv: notice: -o {key}={given} replaces --target {name}'s {key}={value}"
                );
            }
            // User options come after the preset, so they win.
            let mut v: Vec<(String, String)> = preset
                .iter()
                .map(|(k, v, _)| (k.to_string(), v.to_string()))
                .collect();
            v.append(&mut out_opts);
            out_opts = v;
            if t == Target::Azure && a.keep_chain {
                return Err(Error::invalid_argument(
                    "Azure takes one fixed VHD: convert without --keep-chain (the chain is flattened)",
                ));
            }
            if t == Target::Azure {
                const MIB: u64 = 1 << 20;
                const AZURE_MAX: u64 = 4095 * (1 << 30);
                let s = src.size().div_ceil(MIB) * MIB;
                if s != src.size() {
                    eprintln!(
                        "vdconv: notice: virtual size rounded up from {} to {} bytes ({} MiB): Azure accepts only whole MiB",
                        src.size(),
                        s,
                        s / MIB
                    );
                }
                if s > AZURE_MAX {
                    return Err(Error::invalid_argument(format!(
                        "{} bytes is larger than Azure's largest managed disk VHD (4095 GiB)",
                        s
                    )));
                }
                size = Some(s);
            }
            f
        }
        (None, Some(n)) => n.parse()?,
        (None, None) => format_from_name(&a.dst, "-O")?,
    };
    if a.compress {
        if out_format != Format::Qcow2 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("compression (-c) is supported for qcow2 output only, not {out_format}"),
            ));
        }
        out_opts.push(("compress".to_string(), "on".to_string()));
    }
    if size.is_none() && !a.keep_chain && out_format != Format::Raw {
        let s = whole_sectors(src.size(), out_format, &out_opts)?;
        if s != src.size() {
            size = Some(s);
        }
    }
    check_target_capacity(out_format, size.unwrap_or(src.size()))?;
    let logical = src.sector_sizes().logical;
    if logical != 512 && out_format != Format::Vhdx {
        // The bytes convert exactly; what the guest finds depends on the sector size it sees.
        let how = if out_format == Format::Vhd {
            "a VHD always presents 512-byte sectors, so the guest's partition table will not be found"
        } else {
            "the output does not record it: attach the disk with that sector size (QEMU: logical_block_size)"
        };
        eprintln!("vdconv: notice: the source has {logical}-byte logical sectors; {how}");
    }
    let backing_format = backing_fmt_of(a.backing_format.clone(), &out_opts)?;
    if a.backing.is_none() && backing_format.is_some() {
        return Err(Error::invalid_argument(
            "a backing format (-F) needs a backing file (-B)",
        ));
    }
    let backing = match &a.backing {
        Some(r) => Some(vdisk::open_parent(
            &a.dst,
            r,
            backing_format.as_deref().map(str::parse).transpose()?,
            &blockdev::Limits::default(),
        )?),
        None => None,
    };
    let mut copts = vdisk::ConvertOptions::new(out_format);
    copts.options = out_opts;
    copts.backing = backing;
    copts.force = a.force;
    copts.verify = a.verify;
    copts.size = size;
    let mut p = Progress::new(a.progress, "convert");
    if a.keep_chain {
        if copts.backing.is_some() {
            return Err(Error::invalid_argument(
                "--keep-chain and -B cannot be combined",
            ));
        }
        let layers =
            vdisk::convert_chain(&a.src, &a.dst, &opts, &copts, Some(cancel), &mut |d, t| {
                p.update(d, t)
            })?;
        p.finish(src.size());
        for l in &layers {
            eprintln!("{} -> {}", l.source.display(), l.output.display());
        }
        return Ok(Code::Ok);
    }
    let report = vdisk::convert(src.as_ref(), &a.dst, &copts, Some(cancel), &mut |d, t| {
        p.update(d, t)
    })?;
    p.finish(report.virtual_size);
    if let Some(d) = &report.digest {
        eprintln!("Verified: output content matches the source (sparse-sha256 {d}).");
    }
    if let Some(b) = &a.backing {
        note_confined_backing(&a.dst, b);
    }
    Ok(Code::Ok)
}

/// Refuses sizes a target format cannot hold, before anything is written.
fn check_target_capacity(format: Format, size: u64) -> Result<()> {
    let (max, what) = match format {
        Format::Vhd => (2040u64 << 30, "2040 GiB"),
        Format::Vhdx => (64u64 << 40, "64 TiB"),
        // A file offset is signed 64-bit.
        _ => (i64::MAX as u64, "8 EiB"),
    };
    if size > max {
        return Err(Error::invalid_argument(format!(
            "{size} bytes is more than {format} can hold (at most {what})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("10M").unwrap(), 10 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size("100.3M").unwrap(), (100.3f64 * 1048576.0) as u64);
        assert!(parse_size("x").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn kv() {
        let v = parse_kv_list(&["a=1,b=2".into(), "c".into()]).unwrap();
        assert_eq!(
            v,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "2".into()),
                ("c".into(), "on".into())
            ]
        );
        assert!(parse_kv_list(&["=x".into()]).is_err());
    }
}
