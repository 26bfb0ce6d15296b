//! Finding and validating the footer and the dynamic header, the size rule, and decoding
//! parent locators.

use blockdev::{Candidate, Error, ErrorKind, Result, Storage};

use crate::format::{
    fourcc_text, utf16le, DiskType, DynHeader, Footer, LocatorEntry, FILE_FORMAT_VERSION,
    FOOTER_SIZE, HEADER_COOKIE, HEADER_SIZE, HEADER_VERSION, MAX_BLOCK_SIZE, MAX_CHS,
    MAX_LOCATOR_LEN, PLAT_MAC, PLAT_MACX, PLAT_NONE, PLAT_W2KU, PLAT_W2RU, PLAT_WI2K, PLAT_WI2R,
    SECTOR,
};

/// Which size of the footer is the disk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeRule {
    /// cylinders x heads x sectors x 512.
    Chs,
    /// The footer's current_size.
    Current,
}

impl SizeRule {
    /// Parses `chs` or `current` (also `current_size`).
    pub fn parse(s: &str) -> Result<SizeRule> {
        match s {
            "chs" => Ok(SizeRule::Chs),
            "current" | "current_size" => Ok(SizeRule::Current),
            other => Err(Error::invalid_argument(format!(
                "size_rule must be 'chs' or 'current', not '{other}'"
            ))),
        }
    }

    /// The name `info` shows.
    pub fn name(self) -> &'static str {
        match self {
            SizeRule::Chs => "chs",
            SizeRule::Current => "current",
        }
    }

    /// The rule of qemu 10 (and MANIFEST.md): CHS only for creators `vpc ` and `qemu` with a
    /// geometry below the maximum; current_size for everyone else.
    pub fn default_for(footer: &Footer) -> SizeRule {
        let chs_creator = &footer.creator_app == b"vpc " || &footer.creator_app == b"qemu";
        if chs_creator && footer.geometry != MAX_CHS {
            SizeRule::Chs
        } else {
            SizeRule::Current
        }
    }
}

/// Where the footer in use was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterSource {
    /// The last 512 bytes of the file.
    Trailing,
    /// The copy at offset 0 (the trailing footer is missing).
    CopyAtZero,
}

/// The validated footer and where it came from.
#[derive(Debug, Clone)]
pub struct FooterInfo {
    /// The footer in use.
    pub footer: Footer,
    /// Its disk type.
    pub kind: DiskType,
    /// Where it was found.
    pub source: FooterSource,
    /// File length.
    pub file_len: u64,
    /// Offset of the trailing footer (file length - 512) when present.
    pub trailing_offset: Option<u64>,
    /// Warnings to report.
    pub warnings: Vec<String>,
}

fn read_512(storage: &dyn Storage, off: u64) -> Result<[u8; 512]> {
    let mut b = [0u8; 512];
    storage.read_at(&mut b, off)?;
    Ok(b)
}

/// Finds and validates the footer (V1-V7).
pub fn read_footer(storage: &dyn Storage, writable: bool) -> Result<FooterInfo> {
    let len = storage.len()?;
    if len < FOOTER_SIZE {
        return Err(Error::invalid_format(
            "footer",
            0,
            format!("file too small for a VHD footer ({len} bytes, at least 512 needed)"),
        ));
    }
    let tail_off = len - FOOTER_SIZE;
    let tail = read_512(storage, tail_off)?;
    let mut warnings = Vec::new();
    let (raw, off, source) = if Footer::has_cookie(&tail) {
        (tail, tail_off, FooterSource::Trailing)
    } else {
        let mut legacy = [0u8; 8];
        storage.read_at(&mut legacy, len - 511)?;
        if &legacy == b"conectix" {
            return Err(Error::unsupported(
                "511-byte footer of a pre-2004 Virtual PC image is not supported",
            )
            .with_field("footer")
            .with_offset(len - 511));
        }
        let head = read_512(storage, 0)?;
        if !Footer::has_cookie(&head) {
            return Err(Error::invalid_format(
                "footer.cookie",
                tail_off,
                "no VHD footer: the cookie 'conectix' is neither in the last 512 bytes nor at offset 0",
            ));
        }
        if writable {
            return Err(Error::corrupt(
                "footer",
                tail_off,
                "footer missing (copy at 0 present): refusing to write; the image needs repair",
            ));
        }
        warnings.push("footer missing at the end of the file (copy at 0 present and used)".into());
        (head, 0, FooterSource::CopyAtZero)
    };
    let footer = Footer::parse(&raw);
    let computed = footer.computed_checksum();
    if computed != footer.checksum {
        return Err(Error::corrupt(
            "footer.checksum",
            off + 64,
            format!(
                "footer checksum is {:#010x}, computed {:#010x}",
                footer.checksum, computed
            ),
        ));
    }
    if footer.version >> 16 != FILE_FORMAT_VERSION >> 16 {
        return Err(Error::unsupported(format!(
            "file format version {:#010x} is not supported (expected 0x00010000)",
            footer.version
        ))
        .with_field("footer.file_format_version")
        .with_offset(off + 12));
    }
    if footer.version != FILE_FORMAT_VERSION {
        warnings.push(format!(
            "unusual file format minor version {:#010x}",
            footer.version
        ));
    }
    let kind = footer.kind().ok_or_else(|| {
        Error::corrupt(
            "footer.disk_type",
            off + 60,
            format!(
                "disk type {} is not fixed (2), dynamic (3) or differencing (4)",
                footer.disk_type
            ),
        )
    })?;
    if footer.saved_state != 0 {
        if writable {
            return Err(Error::read_only(
                "the VHD is marked as belonging to a saved virtual machine state; refusing to write",
            )
            .with_field("footer.saved_state"));
        }
        warnings.push("saved-state flag is set".into());
    }
    Ok(FooterInfo {
        footer,
        kind,
        source,
        file_len: len,
        trailing_offset: (source == FooterSource::Trailing).then_some(tail_off),
        warnings,
    })
}

/// Reads the footer copy at offset 0 and compares it with the footer in use (V5): returns a
/// warning text on mismatch.
pub fn compare_copy(storage: &dyn Storage, fi: &FooterInfo) -> Result<Option<String>> {
    if fi.source != FooterSource::Trailing || fi.kind == DiskType::Fixed {
        return Ok(None);
    }
    let head = read_512(storage, 0)?;
    if head == fi.footer.raw {
        return Ok(None);
    }
    if !Footer::has_cookie(&head) {
        return Ok(Some("footer copy at offset 0 is missing".into()));
    }
    let copy = Footer::parse(&head);
    if copy.computed_checksum() != copy.checksum {
        return Ok(Some("footer copy at offset 0 has a bad checksum".into()));
    }
    Ok(Some(
        "footer copy at offset 0 differs from the trailing footer (the trailing one is used)"
            .into(),
    ))
}

/// The dynamic header with its validated derived values.
#[derive(Debug, Clone)]
pub struct HeaderInfo {
    /// The header.
    pub header: DynHeader,
    /// Its offset.
    pub offset: u64,
}

/// Reads and validates the dynamic header (V8, V12, V13).
pub fn read_header(storage: &dyn Storage, fi: &FooterInfo) -> Result<HeaderInfo> {
    let f = &fi.footer;
    let off = f.data_offset;
    let end_limit = fi.trailing_offset.unwrap_or(fi.file_len);
    let fits = off
        .checked_add(HEADER_SIZE)
        .map(|e| e <= end_limit)
        .unwrap_or(false);
    if off < FOOTER_SIZE || !off.is_multiple_of(SECTOR) || !fits {
        return Err(Error::corrupt(
            "footer.data_offset",
            16,
            format!("dynamic header offset {off:#x} is misaligned, overlaps the footer copy or lies past the end of the file"),
        ));
    }
    let mut b = [0u8; 1024];
    storage.read_at(&mut b, off)?;
    let h = DynHeader::parse(&b);
    if &h.cookie != HEADER_COOKIE {
        return Err(Error::invalid_format(
            "dynamic_header.cookie",
            off,
            "invalid dynamic header magic (expected 'cxsparse')",
        ));
    }
    let computed = h.computed_checksum();
    if computed != h.checksum {
        return Err(Error::corrupt(
            "dynamic_header.checksum",
            off + 36,
            format!(
                "dynamic header checksum is {:#010x}, computed {:#010x}",
                h.checksum, computed
            ),
        ));
    }
    if h.version != HEADER_VERSION {
        return Err(Error::unsupported(format!(
            "dynamic header version {:#010x} is not supported",
            h.version
        ))
        .with_field("dynamic_header.header_version")
        .with_offset(off + 24));
    }
    let bs = h.block_size;
    if !bs.is_power_of_two() || u64::from(bs) < SECTOR || bs > MAX_BLOCK_SIZE {
        return Err(Error::corrupt(
            "dynamic_header.block_size",
            off + 32,
            format!("invalid block size {bs} (a power of two from 512 to 256 MiB)"),
        ));
    }
    if fi.kind == DiskType::Differencing && h.parent_uuid == [0u8; 16] {
        return Err(Error::corrupt(
            "dynamic_header.parent_uuid",
            off + 40,
            "differencing disk with a zero parent UUID",
        ));
    }
    Ok(HeaderInfo {
        header: h,
        offset: off,
    })
}

/// A parent locator as decoded.
#[derive(Debug, Clone)]
pub struct Locator {
    /// Slot 0-7.
    pub slot: usize,
    /// The entry.
    pub entry: LocatorEntry,
    /// Decoded path, when decodable.
    pub path: Option<String>,
    /// Why it could not be decoded.
    pub error: Option<String>,
}

impl Locator {
    /// Platform code as text.
    pub fn code_text(&self) -> String {
        fourcc_text(&self.entry.code.to_be_bytes())
    }

    /// Offset of this entry inside the header.
    pub fn entry_offset(&self, header_offset: u64) -> u64 {
        header_offset + 576 + 24 * self.slot as u64
    }

    /// The file range its data occupies, when the locator is valid.
    pub fn data_range(&self) -> Option<(u64, u64)> {
        if self.error.is_some() {
            return None;
        }
        Some((self.entry.data_offset, self.entry.space_bytes()))
    }
}

/// Decodes the eight parent locators; a bad locator is reported, never fatal (V18).
pub fn read_locators(storage: &dyn Storage, hi: &HeaderInfo, end_limit: u64) -> Vec<Locator> {
    let mut out = Vec::new();
    for (slot, e) in hi.header.locators.iter().enumerate() {
        if e.code == PLAT_NONE {
            continue;
        }
        let mut loc = Locator {
            slot,
            entry: *e,
            path: None,
            error: None,
        };
        match decode_locator(storage, e, end_limit, hi.offset + 576 + 24 * slot as u64) {
            Ok(p) => loc.path = p,
            Err(msg) => loc.error = Some(msg),
        }
        out.push(loc);
    }
    out
}

fn decode_locator(
    storage: &dyn Storage,
    e: &LocatorEntry,
    end_limit: u64,
    entry_off: u64,
) -> std::result::Result<Option<String>, String> {
    let known = [
        PLAT_WI2R, PLAT_WI2K, PLAT_W2RU, PLAT_W2KU, PLAT_MAC, PLAT_MACX,
    ];
    if !known.contains(&e.code) {
        return Err(format!("unknown platform code {:#010x}", e.code));
    }
    let space = e.space_bytes();
    if u64::from(e.data_length) > space {
        return Err(format!(
            "data length {} exceeds data space {space}",
            e.data_length
        ));
    }
    if e.data_length > MAX_LOCATOR_LEN {
        return Err(format!(
            "data length {} exceeds the cap of {MAX_LOCATOR_LEN}",
            e.data_length
        ));
    }
    let inside = e
        .data_offset
        .checked_add(u64::from(e.data_length))
        .map(|end| end <= end_limit)
        .unwrap_or(false);
    if e.data_offset < FOOTER_SIZE || !inside {
        return Err(format!(
            "data at {:#x} (+{}) lies outside the file",
            e.data_offset, e.data_length
        ));
    }
    if e.code == PLAT_MAC {
        return Ok(None);
    }
    let mut buf = vec![0u8; e.data_length as usize];
    storage
        .read_at(&mut buf, e.data_offset)
        .map_err(|err| err.to_string())?;
    let text = match e.code {
        PLAT_W2KU | PLAT_W2RU => {
            utf16le(&buf, "parent_locator", entry_off).map_err(|err| err.message().to_string())?
        }
        _ => String::from_utf8(buf)
            .map_err(|_| "locator is not valid UTF-8".to_string())?
            .trim_end_matches('\0')
            .to_string(),
    };
    if text.contains('\0') {
        return Err("path contains a NUL character".into());
    }
    Ok(Some(text))
}

/// Percent-decodes a MacX `file://` URL into a path.
pub fn macx_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("file://")
        .or_else(|| url.strip_prefix("file:"))?;
    let mut out = Vec::new();
    let bytes = rest.as_bytes();
    let mut i = 0;
    while let Some(&c) = bytes.get(i) {
        if c == b'%' {
            let h = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match h.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None => return None,
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The gate candidates for a differencing disk's parent, best first: W2ru (relative), MacX,
/// W2ku (foreign absolute: file name only), then the header's parent name.
pub fn parent_candidates(locators: &[Locator], parent_name: &str) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut push = |c: Candidate| {
        if !c.text().is_empty() && !out.contains(&c) {
            out.push(c);
        }
    };
    for code in [PLAT_W2RU, PLAT_WI2R] {
        for l in locators.iter().filter(|l| l.entry.code == code) {
            if let Some(p) = &l.path {
                push(Candidate::Relative(p.replace('\\', "/")));
            }
        }
    }
    for l in locators.iter().filter(|l| l.entry.code == PLAT_MACX) {
        if let Some(p) = l.path.as_deref().and_then(macx_path) {
            if p.starts_with('/') {
                push(Candidate::Path(p));
            } else {
                push(Candidate::Relative(p));
            }
        }
    }
    for code in [PLAT_W2KU, PLAT_WI2K] {
        for l in locators.iter().filter(|l| l.entry.code == code) {
            if let Some(p) = &l.path {
                push(Candidate::ForeignAbsolute(p.clone()));
            }
        }
    }
    push(Candidate::ForeignAbsolute(parent_name.to_string()));
    out
}

/// An error for a read that needs the parent when it was not opened.
pub fn parent_missing() -> Error {
    Error::new(
        ErrorKind::BackingNotFound,
        "this range of the differencing disk is in its parent, which was not opened",
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn macx_urls() {
        assert_eq!(macx_path("file://./base%20x.vhd").unwrap(), "./base x.vhd");
        assert_eq!(macx_path("file:///srv/a.vhd").unwrap(), "/srv/a.vhd");
        assert_eq!(macx_path("http://x"), None);
        assert_eq!(macx_path("file://%zz"), None);
    }
}
