//! Creating new VHDs: layout planning shared by [`create`] and the sequential writer.

use std::path::{Component, Path, PathBuf};

use blockdev::{random_uuid, BlockDevice, Error, Result, Storage};

use crate::format::{
    bitmap_size, to_utf16le, BatmapHeader, Chs, DiskType, DynHeader, Footer, LocatorEntry,
    BATMAP_VERSION, CREATOR_APP, CREATOR_VERSION, DEFAULT_BLOCK_SIZE, FILE_FORMAT_VERSION,
    FOOTER_SIZE, HEADER_SIZE, HEADER_VERSION, HOST_WI2K, MAX_BLOCK_SIZE, MAX_DYNAMIC_SIZE,
    PLAT_MACX, PLAT_W2KU, PLAT_W2RU, SECTOR, VHD_EPOCH_OFFSET, XEN_CREATOR_APP,
    XEN_CREATOR_VERSION,
};
use crate::image::VhdImage;

/// Fixed or dynamic layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// Data then footer.
    Fixed,
    /// Sparse, with a BAT.
    Dynamic,
}

/// Which producer's conventions to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Creator `vdcv`, no batmap.
    Standard,
    /// XenServer blktap: creator `tap\0` 1.3, a batmap after the BAT, MacX locator too.
    Xen,
}

/// What a differencing disk records about its parent.
#[derive(Debug, Clone)]
pub struct ParentLink {
    /// The parent's footer unique id.
    pub uuid: [u8; 16],
    /// The parent's modification time (VHD epoch seconds).
    pub timestamp: u32,
    /// The parent's size.
    pub size: u64,
    /// Absolute path of the parent (W2ku locator and parent name).
    pub absolute: String,
    /// Path of the parent relative to the child's directory, `/`-separated.
    pub relative: String,
}

impl ParentLink {
    /// The link to `parent` (opened from `parent_path`) from a child at `child_path`.
    pub fn new(
        parent: &dyn BlockDevice,
        parent_path: &Path,
        child_path: Option<&Path>,
    ) -> Result<ParentLink> {
        let img = parent.as_any().downcast_ref::<VhdImage>().ok_or_else(|| {
            Error::invalid_argument("the parent of a differencing VHD must be a VHD image")
        })?;
        let abs = absolute(parent_path);
        let child_dir = child_path.map(absolute).and_then(|c| {
            c.parent()
                .map(|d| d.canonicalize().unwrap_or_else(|_| d.to_path_buf()))
        });
        let abs = abs.canonicalize().unwrap_or(abs);
        let relative = match child_dir {
            Some(dir) => relative_path(&dir, &abs),
            None => abs
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        };
        let timestamp = std::fs::metadata(parent_path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| vhd_seconds(d.as_secs()))
            .unwrap_or(0);
        Ok(ParentLink {
            uuid: img.footer().unique_id,
            timestamp,
            size: img.size(),
            absolute: abs.display().to_string(),
            relative,
        })
    }
}

fn absolute(p: &Path) -> PathBuf {
    let base = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::new();
    for c in base.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `target` relative to directory `from` (both absolute, normalised).
fn relative_path(from: &Path, target: &Path) -> String {
    let a: Vec<_> = from.components().collect();
    let b: Vec<_> = target.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in b.iter().skip(common) {
        parts.push(c.as_os_str().to_string_lossy().to_string());
    }
    parts.join("/")
}

fn vhd_seconds(unix: u64) -> u32 {
    u32::try_from(unix.saturating_sub(VHD_EPOCH_OFFSET)).unwrap_or(u32::MAX)
}

/// Everything needed to create a VHD.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Guest size in bytes (a multiple of 512).
    pub size: u64,
    /// Fixed or dynamic (a parent implies differencing).
    pub subformat: Subformat,
    /// Block size of dynamic disks.
    pub block_size: u32,
    /// Producer conventions.
    pub dialect: Dialect,
    /// Parent of a differencing disk.
    pub parent: Option<ParentLink>,
}

impl CreateOptions {
    /// A dynamic disk of `size` bytes with default settings.
    pub fn dynamic(size: u64) -> Self {
        CreateOptions {
            size,
            subformat: Subformat::Dynamic,
            block_size: DEFAULT_BLOCK_SIZE,
            dialect: Dialect::Standard,
            parent: None,
        }
    }
}

/// The planned metadata of a new image.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub footer: Footer,
    pub header: Option<DynHeader>,
    pub bat_offset: u64,
    pub entries: u64,
    /// (header offset, map offset, map length).
    pub batmap: Option<(u64, u64, u64)>,
    pub locator_data: Vec<(u64, Vec<u8>)>,
    /// First byte after the metadata: where blocks (or the footer) go.
    pub data_start: u64,
    pub block_size: u64,
    pub bitmap_size: u64,
}

impl Layout {
    /// The dynamic metadata (BAT, batmap, locators, header, footer copy) for `bat`.
    pub fn write_metadata(
        &self,
        storage: &dyn Storage,
        bat: &[u32],
        batmap: Option<&[u8]>,
    ) -> Result<()> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        let padded = (self.entries * 4).div_ceil(SECTOR) * SECTOR;
        let mut raw = vec![0xFFu8; padded as usize];
        for (i, e) in bat.iter().enumerate() {
            if let Some(d) = raw.get_mut(i * 4..i * 4 + 4) {
                d.copy_from_slice(&e.to_be_bytes());
            }
        }
        storage.write_at(&raw, self.bat_offset)?;
        if let Some((hoff, moff, mlen)) = self.batmap {
            let mut map = vec![0u8; mlen as usize];
            if let Some(src) = batmap {
                let n = src.len().min(map.len());
                if let (Some(d), Some(s)) = (map.get_mut(..n), src.get(..n)) {
                    d.copy_from_slice(s);
                }
            }
            let bh = BatmapHeader {
                offset: moff,
                size_sectors: u32::try_from(mlen / SECTOR).unwrap_or(u32::MAX),
                version: BATMAP_VERSION,
                checksum: BatmapHeader::map_checksum(&map, BATMAP_VERSION),
            };
            storage.write_at(&bh.to_bytes(), hoff)?;
            storage.write_at(&map, moff)?;
        }
        for (off, data) in &self.locator_data {
            storage.write_at(data, *off)?;
        }
        storage.write_at(&h.to_bytes(), FOOTER_SIZE)?;
        storage.write_at(&self.footer.to_bytes(), 0)?;
        Ok(())
    }
}

fn round_sector(n: u64) -> u64 {
    n.div_ceil(SECTOR).max(1) * SECTOR
}

/// Plans the layout of a new image.
pub(crate) fn plan(opts: &CreateOptions) -> Result<Layout> {
    let size = opts.size;
    if !size.is_multiple_of(SECTOR) {
        return Err(Error::invalid_argument(format!(
            "VHD size {size} is not a whole number of 512-byte sectors"
        )));
    }
    let kind = match (opts.subformat, &opts.parent) {
        (Subformat::Fixed, Some(_)) => {
            return Err(Error::invalid_argument(
                "a differencing VHD cannot be fixed (subformat=fixed with a parent)",
            ))
        }
        (Subformat::Fixed, None) => DiskType::Fixed,
        (Subformat::Dynamic, None) => DiskType::Dynamic,
        (Subformat::Dynamic, Some(_)) => DiskType::Differencing,
    };
    if let Some(p) = &opts.parent {
        if p.size != size {
            return Err(Error::invalid_argument(format!(
                "a differencing VHD must have its parent's size ({} bytes), not {size}",
                p.size
            )));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH_OFFSET);
    let (app, ver) = match opts.dialect {
        Dialect::Standard => (CREATOR_APP, CREATOR_VERSION),
        Dialect::Xen => (XEN_CREATOR_APP, XEN_CREATOR_VERSION),
    };
    let mut footer = Footer::parse(&[0u8; 512]);
    footer.features = 2;
    footer.version = FILE_FORMAT_VERSION;
    footer.data_offset = if kind == DiskType::Fixed {
        u64::MAX
    } else {
        FOOTER_SIZE
    };
    footer.timestamp = vhd_seconds(now);
    footer.creator_app = app;
    footer.creator_version = ver;
    footer.creator_host = HOST_WI2K;
    footer.original_size = size;
    footer.current_size = size;
    footer.geometry = Chs::for_size(size);
    footer.disk_type = kind.code();
    footer.unique_id = random_uuid()?;
    footer.raw = footer.to_bytes();
    footer.checksum = footer.computed_checksum();
    if kind == DiskType::Fixed {
        return Ok(Layout {
            footer,
            header: None,
            bat_offset: 0,
            entries: 0,
            batmap: None,
            locator_data: Vec::new(),
            data_start: size,
            block_size: 0,
            bitmap_size: 0,
        });
    }
    if size > MAX_DYNAMIC_SIZE {
        return Err(Error::invalid_argument(format!(
            "a dynamic VHD holds at most 2040 GiB ({MAX_DYNAMIC_SIZE} bytes), not {size}"
        )));
    }
    let bs = opts.block_size;
    if !bs.is_power_of_two() || u64::from(bs) < SECTOR || bs > MAX_BLOCK_SIZE {
        return Err(Error::invalid_argument(format!(
            "block_size {bs} must be a power of two from 512 bytes to 256 MiB"
        )));
    }
    let bsz = u64::from(bs);
    let entries = size.div_ceil(bsz);
    let bat_offset = FOOTER_SIZE + HEADER_SIZE;
    let mut pos = bat_offset + (entries * 4).div_ceil(SECTOR) * SECTOR;
    let mut batmap = None;
    if opts.dialect == Dialect::Xen {
        let hoff = pos;
        let mlen = round_sector(entries.div_ceil(8));
        batmap = Some((hoff, hoff + SECTOR, mlen));
        pos = hoff + SECTOR + mlen;
    }
    let mut header = DynHeader::parse(&[0u8; 1024]);
    header.data_offset = u64::MAX;
    header.table_offset = bat_offset;
    header.version = HEADER_VERSION;
    header.max_table_entries =
        u32::try_from(entries).map_err(|_| Error::invalid_argument("too many blocks for a VHD"))?;
    header.block_size = bs;
    let mut locator_data = Vec::new();
    if let Some(p) = &opts.parent {
        header.parent_uuid = p.uuid;
        header.parent_timestamp = p.timestamp;
        header.parent_name = if p.absolute.encode_utf16().count() <= 256 {
            p.absolute.clone()
        } else {
            Path::new(&p.absolute)
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        };
        let rel_win = if p.relative.starts_with("..") {
            p.relative.replace('/', "\\")
        } else {
            format!(".\\{}", p.relative.replace('/', "\\"))
        };
        let mut items: Vec<(u32, Vec<u8>)> = vec![
            (PLAT_W2KU, to_utf16le(&p.absolute)),
            (PLAT_W2RU, to_utf16le(&rel_win)),
        ];
        if opts.dialect == Dialect::Xen {
            let rel = if p.relative.starts_with("..") {
                p.relative.clone()
            } else {
                format!("./{}", p.relative)
            };
            items.push((
                PLAT_MACX,
                format!("file://{}", url_escape(&rel)).into_bytes(),
            ));
        }
        for (slot, (code, data)) in items.into_iter().enumerate() {
            let space = round_sector(data.len() as u64);
            if let Some(l) = header.locators.get_mut(slot) {
                *l = LocatorEntry {
                    code,
                    data_space: u32::try_from(space).unwrap_or(u32::MAX),
                    data_length: u32::try_from(data.len()).unwrap_or(u32::MAX),
                    reserved: 0,
                    data_offset: pos,
                };
            }
            locator_data.push((pos, data));
            pos += space;
        }
    }
    header.raw = header.to_bytes();
    header.checksum = header.computed_checksum();
    Ok(Layout {
        footer,
        header: Some(header),
        bat_offset,
        entries,
        batmap,
        locator_data,
        data_start: pos,
        block_size: bsz,
        bitmap_size: bitmap_size(bs),
    })
}

fn url_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/._-~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Writes a new empty image on `storage` (an empty writable file).
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    let l = plan(opts)?;
    if l.header.is_none() {
        storage.set_len(opts.size)?;
        storage.write_at(&l.footer.to_bytes(), opts.size)?;
        return storage.flush();
    }
    let bat = vec![crate::format::BAT_UNUSED; l.entries as usize];
    l.write_metadata(storage, &bat, None)?;
    storage.write_at(&l.footer.to_bytes(), l.data_start)?;
    storage.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/c.vhd")),
            "c.vhd"
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/x/c.vhd")),
            "../x/c.vhd"
        );
        assert_eq!(url_escape("./a b.vhd"), "./a%20b.vhd");
    }
}
