//! On-disk definitions of VHD: constants, the footer, the dynamic disk header, parent
//! locator entries and the Xen batmap header. Parsing and serialisation only; all integers
//! are big-endian. Validation that needs the file (sizes, offsets) lives in `header.rs`.

use blockdev::{Error, Result};

/// Size of the footer (and of its copy at offset 0 in dynamic disks).
pub const FOOTER_SIZE: u64 = 512;
/// Size of the dynamic disk header.
pub const HEADER_SIZE: u64 = 1024;
/// The sector size every VHD offset is counted in.
pub const SECTOR: u64 = 512;
/// Footer cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Dynamic header cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Xen batmap header cookie.
pub const BATMAP_COOKIE: &[u8; 8] = b"tdbatmap";
/// The only file format version defined.
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
/// The only dynamic header version defined.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Xen batmap version written (1.2: unsigned checksum).
pub const BATMAP_VERSION: u32 = 0x0001_0002;
/// Unallocated BAT entry.
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH_OFFSET: u64 = 946_684_800;
/// Largest dynamic/differencing disk (qemu's VHD_MAX_SECTORS: 2040 GiB).
pub const MAX_DYNAMIC_SIZE: u64 = 0xFF00_0000 * SECTOR;
/// Largest accepted block size (2^28).
pub const MAX_BLOCK_SIZE: u32 = 1 << 28;
/// Default block size for new dynamic disks.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest parent locator payload decoded.
pub const MAX_LOCATOR_LEN: u32 = 32 << 10;
/// Our creator application.
pub const CREATOR_APP: [u8; 4] = *b"vdcv";
/// Our creator version (1.0).
pub const CREATOR_VERSION: u32 = 0x0001_0000;
/// Xen blktap creator application.
pub const XEN_CREATOR_APP: [u8; 4] = *b"tap\0";
/// Xen blktap creator version written (1.3: big-endian bitmaps, batmap 1.2).
pub const XEN_CREATOR_VERSION: u32 = 0x0001_0003;
/// Creator host OS `Wi2k`.
pub const HOST_WI2K: [u8; 4] = *b"Wi2k";
/// The maximum CHS geometry (65535/16/255).
pub const MAX_CHS: Chs = Chs {
    cylinders: 65535,
    heads: 16,
    sectors: 255,
};

/// Platform code of an unused locator slot.
pub const PLAT_NONE: u32 = 0;
/// Deprecated relative path, single-byte characters.
pub const PLAT_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
/// Deprecated absolute path, single-byte characters.
pub const PLAT_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
/// Relative Windows path, UTF-16LE.
pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
/// Absolute Windows path, UTF-16LE.
pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// Mac OS alias blob.
pub const PLAT_MAC: u32 = u32::from_be_bytes(*b"Mac ");
/// File URL, UTF-8.
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");

/// Footer disk types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Data, then the footer.
    Fixed,
    /// Footer copy, header, BAT, blocks, footer.
    Dynamic,
    /// Dynamic layout over a parent.
    Differencing,
}

impl DiskType {
    /// The footer value.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The name `info` shows.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// A CHS geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chs {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

impl Chs {
    /// Bytes addressed by this geometry.
    pub fn bytes(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors) * SECTOR
    }

    /// The geometry for `size` bytes by the spec's appendix algorithm (rounds down).
    pub fn for_size(size: u64) -> Chs {
        let max = 65535u64 * 16 * 255;
        let total = (size / SECTOR).min(max);
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255u64;
            heads = 16u64;
            cth = total / spt;
        } else {
            let mut s = 17u64;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        let cyl = (cth / heads).min(65535);
        Chs {
            cylinders: u16::try_from(cyl).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors: u8::try_from(spt).unwrap_or(255),
        }
    }
}

/// The one's-complement checksum of VHD structures, with the 4-byte field at `skip` as zero.
pub fn checksum(buf: &[u8], skip: usize) -> u32 {
    let mut sum = 0u32;
    for (i, b) in buf.iter().enumerate() {
        if i < skip || i >= skip + 4 {
            sum = sum.wrapping_add(u32::from(*b));
        }
    }
    !sum
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

pub(crate) fn arr<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = b.get(off..off + N) {
        a.copy_from_slice(s);
    }
    a
}

pub(crate) fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

/// The 512-byte footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Feature flags (bit 1 always set).
    pub features: u32,
    /// File format version.
    pub version: u32,
    /// Offset of the dynamic header; all ones for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application.
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS.
    pub creator_host: [u8; 4],
    /// Size at creation.
    pub original_size: u64,
    /// Current size.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Chs,
    /// Raw disk type.
    pub disk_type: u32,
    /// Stored checksum.
    pub checksum: u32,
    /// Unique id of this disk.
    pub unique_id: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
    /// The raw bytes as read (reserved bytes are kept when rewriting).
    pub raw: [u8; 512],
}

impl Footer {
    /// Parses 512 bytes without validating anything but their length.
    pub fn parse(b: &[u8; 512]) -> Footer {
        Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: arr(b, 28),
            creator_version: be32(b, 32),
            creator_host: arr(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: Chs {
                cylinders: be16(b, 56),
                heads: b.get(58).copied().unwrap_or(0),
                sectors: b.get(59).copied().unwrap_or(0),
            },
            disk_type: be32(b, 60),
            checksum: be32(b, 64),
            unique_id: arr(b, 68),
            saved_state: b.get(84).copied().unwrap_or(0),
            raw: *b,
        }
    }

    /// Whether the cookie is `conectix`.
    pub fn has_cookie(b: &[u8]) -> bool {
        b.get(..8) == Some(&FOOTER_COOKIE[..])
    }

    /// The checksum computed over the raw bytes.
    pub fn computed_checksum(&self) -> u32 {
        checksum(&self.raw, 64)
    }

    /// The disk type, when it is one of 2, 3, 4.
    pub fn kind(&self) -> Option<DiskType> {
        match self.disk_type {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// Serialises the fields (over the raw bytes, keeping reserved ones) with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = self.raw;
        put(&mut b, 0, FOOTER_COOKIE);
        put(&mut b, 8, &self.features.to_be_bytes());
        put(&mut b, 12, &self.version.to_be_bytes());
        put(&mut b, 16, &self.data_offset.to_be_bytes());
        put(&mut b, 24, &self.timestamp.to_be_bytes());
        put(&mut b, 28, &self.creator_app);
        put(&mut b, 32, &self.creator_version.to_be_bytes());
        put(&mut b, 36, &self.creator_host);
        put(&mut b, 40, &self.original_size.to_be_bytes());
        put(&mut b, 48, &self.current_size.to_be_bytes());
        put(&mut b, 56, &self.geometry.cylinders.to_be_bytes());
        put(&mut b, 58, &[self.geometry.heads, self.geometry.sectors]);
        put(&mut b, 60, &self.disk_type.to_be_bytes());
        put(&mut b, 68, &self.unique_id);
        put(&mut b, 84, &[self.saved_state]);
        let c = checksum(&b, 64);
        put(&mut b, 64, &c.to_be_bytes());
        b
    }

    /// Creator application as printable text (NULs shown as `\0`).
    pub fn creator_text(&self) -> String {
        fourcc_text(&self.creator_app)
    }
}

/// Four bytes as text, NULs as `\0`.
pub fn fourcc_text(b: &[u8; 4]) -> String {
    b.iter()
        .map(|&c| {
            if c == 0 {
                "\\0".to_string()
            } else if c.is_ascii_graphic() || c == b' ' {
                (c as char).to_string()
            } else {
                format!("\\x{c:02x}")
            }
        })
        .collect()
}

/// One 24-byte parent locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocatorEntry {
    /// Platform code.
    pub code: u32,
    /// Space reserved (bytes, or sectors in some writers).
    pub data_space: u32,
    /// Bytes of payload.
    pub data_length: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Absolute file offset of the payload.
    pub data_offset: u64,
}

impl LocatorEntry {
    /// Data space in bytes: values below 512 count sectors (Xen's heuristic).
    pub fn space_bytes(&self) -> u64 {
        if self.data_space < 512 {
            u64::from(self.data_space) * SECTOR
        } else {
            u64::from(self.data_space)
        }
    }
}

/// The 1024-byte dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    /// Cookie bytes.
    pub cookie: [u8; 8],
    /// Unused, all ones.
    pub data_offset: u64,
    /// BAT offset.
    pub table_offset: u64,
    /// Header version.
    pub version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// Stored checksum.
    pub checksum: u32,
    /// Parent's unique id.
    pub parent_uuid: [u8; 16],
    /// Parent's modification time.
    pub parent_timestamp: u32,
    /// Parent name (UTF-16BE), as decoded.
    pub parent_name: String,
    /// The eight locator entries.
    pub locators: [LocatorEntry; 8],
    /// Raw bytes.
    pub raw: [u8; 1024],
}

impl DynHeader {
    /// Parses 1024 bytes.
    pub fn parse(b: &[u8; 1024]) -> DynHeader {
        let mut locators = [LocatorEntry::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let o = 576 + i * 24;
            *l = LocatorEntry {
                code: be32(b, o),
                data_space: be32(b, o + 4),
                data_length: be32(b, o + 8),
                reserved: be32(b, o + 12),
                data_offset: be64(b, o + 16),
            };
        }
        let name_units: Vec<u16> = b
            .get(64..576)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| {
                u16::from_be_bytes([
                    c.first().copied().unwrap_or(0),
                    c.get(1).copied().unwrap_or(0),
                ])
            })
            .take_while(|&u| u != 0)
            .collect();
        DynHeader {
            cookie: arr(b, 0),
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            checksum: be32(b, 36),
            parent_uuid: arr(b, 40),
            parent_timestamp: be32(b, 56),
            parent_name: String::from_utf16_lossy(&name_units),
            locators,
            raw: *b,
        }
    }

    /// The checksum computed over the raw bytes.
    pub fn computed_checksum(&self) -> u32 {
        checksum(&self.raw, 36)
    }

    /// Serialises the fields with a fresh checksum.
    pub fn to_bytes(&self) -> [u8; 1024] {
        let mut b = self.raw;
        put(&mut b, 0, HEADER_COOKIE);
        put(&mut b, 8, &self.data_offset.to_be_bytes());
        put(&mut b, 16, &self.table_offset.to_be_bytes());
        put(&mut b, 24, &self.version.to_be_bytes());
        put(&mut b, 28, &self.max_table_entries.to_be_bytes());
        put(&mut b, 32, &self.block_size.to_be_bytes());
        put(&mut b, 40, &self.parent_uuid);
        put(&mut b, 56, &self.parent_timestamp.to_be_bytes());
        let mut name = [0u8; 512];
        for (i, u) in self.parent_name.encode_utf16().take(256).enumerate() {
            put(&mut name, i * 2, &u.to_be_bytes());
        }
        put(&mut b, 64, &name);
        for (i, l) in self.locators.iter().enumerate() {
            let o = 576 + i * 24;
            put(&mut b, o, &l.code.to_be_bytes());
            put(&mut b, o + 4, &l.data_space.to_be_bytes());
            put(&mut b, o + 8, &l.data_length.to_be_bytes());
            put(&mut b, o + 12, &l.reserved.to_be_bytes());
            put(&mut b, o + 16, &l.data_offset.to_be_bytes());
        }
        let c = checksum(&b, 36);
        put(&mut b, 36, &c.to_be_bytes());
        b
    }
}

/// The Xen batmap header (sits in its own sector right after the BAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatmapHeader {
    /// Offset of the map.
    pub offset: u64,
    /// Size of the map in sectors.
    pub size_sectors: u32,
    /// Version.
    pub version: u32,
    /// One's complement of the byte sum of the map.
    pub checksum: u32,
}

impl BatmapHeader {
    /// Parses the header from a 512-byte sector; `None` without the cookie.
    pub fn parse(b: &[u8]) -> Option<BatmapHeader> {
        if b.get(..8) != Some(&BATMAP_COOKIE[..]) {
            return None;
        }
        Some(BatmapHeader {
            offset: be64(b, 8),
            size_sectors: be32(b, 16),
            version: be32(b, 20),
            checksum: be32(b, 24),
        })
    }

    /// Serialises into a 512-byte sector.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        put(&mut b, 0, BATMAP_COOKIE);
        put(&mut b, 8, &self.offset.to_be_bytes());
        put(&mut b, 16, &self.size_sectors.to_be_bytes());
        put(&mut b, 20, &self.version.to_be_bytes());
        put(&mut b, 24, &self.checksum.to_be_bytes());
        b
    }

    /// The checksum of a map (version 1.1 summed signed bytes).
    pub fn map_checksum(map: &[u8], version: u32) -> u32 {
        let mut sum = 0u32;
        for &b in map {
            let v = if version == 0x0001_0001 {
                (b as i8) as i32 as u32
            } else {
                u32::from(b)
            };
            sum = sum.wrapping_add(v);
        }
        !sum
    }
}

/// Tests bit `i` of an MSB-first bitmap (bit 7 of byte 0 is entry 0).
pub fn bit_msb(map: &[u8], i: u64) -> bool {
    let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
    map.get(byte)
        .map(|b| b & (0x80u8 >> (i % 8)) != 0)
        .unwrap_or(false)
}

/// Sets bit `i` of an MSB-first bitmap.
pub fn set_bit_msb(map: &mut [u8], i: u64) {
    let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
    if let Some(b) = map.get_mut(byte) {
        *b |= 0x80u8 >> (i % 8);
    }
}

/// Tests bit `i` of an old-Xen bitmap (little-endian 32-bit words, LSB first).
pub fn bit_lsb(map: &[u8], i: u64) -> bool {
    let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
    map.get(byte)
        .map(|b| b & (1u8 << (i % 8)) != 0)
        .unwrap_or(false)
}

/// Sets bit `i` of an old-Xen bitmap.
pub fn set_bit_lsb(map: &mut [u8], i: u64) {
    let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
    if let Some(b) = map.get_mut(byte) {
        *b |= 1u8 << (i % 8);
    }
}

/// Bytes of a block's sector bitmap, padded to whole sectors.
pub fn bitmap_size(block_size: u32) -> u64 {
    let sectors = u64::from(block_size) / SECTOR;
    sectors.div_ceil(8).div_ceil(SECTOR).max(1) * SECTOR
}

/// Decodes UTF-16LE bytes (an odd length is an error).
pub fn utf16le(b: &[u8], field: &str, offset: u64) -> Result<String> {
    if !b.len().is_multiple_of(2) {
        return Err(Error::corrupt(field, offset, "UTF-16 path of odd length"));
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .collect();
    let s = String::from_utf16(&units)
        .map_err(|_| Error::corrupt(field, offset, "invalid UTF-16 in path"))?;
    Ok(s.trim_end_matches('\0').to_string())
}

/// Encodes text as UTF-16LE.
pub fn to_utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn chs_examples() {
        let c = Chs::for_size(5 << 30);
        assert_eq!((c.cylinders, c.heads, c.sectors), (10402, 16, 63));
        assert_eq!(Chs::for_size(10 << 20).bytes(), 10_479_616);
        let c = Chs::for_size(1 << 40);
        assert_eq!(c, MAX_CHS);
    }

    #[test]
    fn bits() {
        let mut m = [0u8; 2];
        set_bit_msb(&mut m, 0);
        set_bit_msb(&mut m, 9);
        assert_eq!(m, [0x80, 0x40]);
        assert!(bit_msb(&m, 9) && !bit_msb(&m, 8));
        let mut l = [0u8; 1];
        set_bit_lsb(&mut l, 1);
        assert_eq!(l, [2]);
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512 << 10), 512);
        assert_eq!(bitmap_size(1 << 28), 65536);
    }
}
