//! On-disk definitions of VHDX (MS-VHDX): constants, GUIDs, CRC-32C and little-endian field
//! helpers. Nothing here does I/O.

use std::fmt;

/// 1 MiB: the alignment of every object after the header section.
pub const MIB: u64 = 1 << 20;
/// 64 KiB: the size of one slot of the header section.
pub const KIB64: u64 = 64 << 10;
/// Size of the header section (file identifier, two headers, two region tables).
pub const HEADER_SECTION: u64 = MIB;
/// File identifier signature `vhdxfile`.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Offset of the creator string in the file identifier (UTF-16LE, 512 bytes).
pub const CREATOR_OFFSET: usize = 8;
/// Length of the creator field.
pub const CREATOR_LEN: usize = 512;
/// Offsets of the two header slots.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes covered by a header's checksum.
pub const HEADER_SIZE: usize = 4096;
/// Header signature `head`.
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Offsets of the two region tables.
pub const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Size of a region table.
pub const REGION_TABLE_SIZE: usize = 64 << 10;
/// Region table signature `regi`.
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// Most entries a region or metadata table may hold.
pub const MAX_TABLE_ENTRIES: u32 = 2047;
/// Metadata table signature `metadata`.
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// Size of the metadata table at the start of the metadata region.
pub const METADATA_TABLE_SIZE: u64 = 64 << 10;
/// Largest metadata item.
pub const MAX_METADATA_ITEM: u64 = MIB;
/// Log entry signature `loge`.
pub const LOG_ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// Zero descriptor signature `zero`.
pub const ZERO_DESC_SIGNATURE: &[u8; 4] = b"zero";
/// Data descriptor signature `desc`.
pub const DATA_DESC_SIGNATURE: &[u8; 4] = b"desc";
/// Data sector signature `data`.
pub const DATA_SECTOR_SIGNATURE: &[u8; 4] = b"data";
/// Log sector size.
pub const LOG_SECTOR: u64 = 4096;
/// Logical sectors described by one sector-bitmap block (2^23).
pub const SECTORS_PER_CHUNK: u64 = 1 << 23;
/// Size of a sector-bitmap block.
pub const SECTOR_BITMAP_BLOCK: u64 = MIB;
/// Largest virtual disk (64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Smallest block size.
pub const MIN_BLOCK_SIZE: u64 = MIB;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u64 = 256 * MIB;

/// BAT entry state: payload block not present.
pub const PAYLOAD_NOT_PRESENT: u8 = 0;
/// BAT entry state: undefined contents.
pub const PAYLOAD_UNDEFINED: u8 = 1;
/// BAT entry state: reads as zeros.
pub const PAYLOAD_ZERO: u8 = 2;
/// BAT entry state: unmapped (trimmed).
pub const PAYLOAD_UNMAPPED: u8 = 3;
/// BAT entry state: UNMAPPED in the v0.95 draft.
pub const PAYLOAD_UNMAPPED_V095: u8 = 5;
/// BAT entry state: the whole block is in this file.
pub const PAYLOAD_FULLY_PRESENT: u8 = 6;
/// BAT entry state: the sector bitmap decides (differencing only).
pub const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// Sector-bitmap entry state: not present.
pub const SB_NOT_PRESENT: u8 = 0;
/// Sector-bitmap entry state: present.
pub const SB_PRESENT: u8 = 6;
/// Mask of the FileOffsetMB field of a BAT entry.
pub const BAT_OFFSET_MASK: u64 = 0xFFFF_FFFF_FFF0_0000;
/// Mask of the reserved bits 3-19 of a BAT entry.
pub const BAT_RESERVED_MASK: u64 = 0x000F_FFF8;

/// Metadata entry flag: user item.
pub const META_IS_USER: u32 = 1;
/// Metadata entry flag: virtual-disk item (copied to children).
pub const META_IS_VIRTUAL_DISK: u32 = 2;
/// Metadata entry flag: required item.
pub const META_IS_REQUIRED: u32 = 4;

/// A GUID in the on-disk (Microsoft mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid([0; 16]);

    /// Builds a GUID from its textual fields (Data1, Data2, Data3, Data4).
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// Reads 16 bytes at `off` of `buf` (zero when out of range).
    pub fn read(buf: &[u8], off: usize) -> Guid {
        let mut g = [0u8; 16];
        if let Some(s) = off.checked_add(16).and_then(|end| buf.get(off..end)) {
            g.copy_from_slice(s);
        }
        Guid(g)
    }

    /// Whether all bytes are zero.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A fresh random GUID (version 4).
    pub fn random() -> blockdev::Result<Guid> {
        let be = blockdev::random_uuid()?;
        Ok(Guid::from_be_bytes(be))
    }

    /// Converts RFC 4122 big-endian field order to the on-disk order.
    pub fn from_be_bytes(b: [u8; 16]) -> Guid {
        let mut g = b;
        g.swap(0, 3);
        g.swap(1, 2);
        g.swap(4, 5);
        g.swap(6, 7);
        Guid(g)
    }

    /// The RFC 4122 big-endian field order.
    pub fn to_be_bytes(self) -> [u8; 16] {
        let mut g = self.0;
        g.swap(0, 3);
        g.swap(1, 2);
        g.swap(4, 5);
        g.swap(6, 7);
        g
    }

    /// Parses `xxxxxxxx-xxxx-...` with optional braces, any case.
    pub fn parse(s: &str) -> Option<Guid> {
        blockdev::parse_uuid(s).map(Guid::from_be_bytes)
    }

    /// Text in braces, lower case, as Hyper-V writes parent_linkage.
    pub fn braced(&self) -> String {
        format!("{{{self}}}")
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&blockdev::format_uuid(&self.to_be_bytes()))
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// BAT region GUID 2DC27766-F623-4200-9D64-115E9BFD4A08.
pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Metadata region GUID 8B7CA206-4790-4B9A-B8FE-575F050F886E.
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// File Parameters item.
pub const ITEM_FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Virtual Disk Size item.
pub const ITEM_VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Virtual Disk ID (page 83 data) item.
pub const ITEM_VIRTUAL_DISK_ID: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Logical Sector Size item.
pub const ITEM_LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Physical Sector Size item.
pub const ITEM_PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Parent Locator item.
pub const ITEM_PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// The VHDX parent locator type.
pub const LOCATOR_TYPE_VHDX: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// Name of a known metadata item.
pub fn item_name(g: &Guid) -> Option<&'static str> {
    Some(match *g {
        ITEM_FILE_PARAMETERS => "file_parameters",
        ITEM_VIRTUAL_DISK_SIZE => "virtual_disk_size",
        ITEM_VIRTUAL_DISK_ID => "virtual_disk_id",
        ITEM_LOGICAL_SECTOR_SIZE => "logical_sector_size",
        ITEM_PHYSICAL_SECTOR_SIZE => "physical_sector_size",
        ITEM_PARENT_LOCATOR => "parent_locator",
        _ => return None,
    })
}

// Evaluated at compile time: `i < 256` bounds every index, and a bad index would fail the build.
#[allow(clippy::indexing_slicing)]
const fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

/// Continues a CRC-32C over `data` from the raw (not finalised) state `crc`.
pub fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        let idx = usize::from((crc as u8) ^ b);
        crc = (crc >> 8) ^ CRC32C_TABLE.get(idx).copied().unwrap_or(0);
    }
    crc
}

/// CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(!0, data)
}

/// CRC-32C of `data` with the 4 bytes at `field` treated as zero.
pub fn crc32c_without(data: &[u8], field: usize) -> u32 {
    let end = field.saturating_add(4).min(data.len());
    let start = field.min(end);
    let mut c = crc32c_update(!0, data.get(..start).unwrap_or_default());
    c = crc32c_update(c, [0u8; 4].get(..end - start).unwrap_or_default());
    c = crc32c_update(c, data.get(end..).unwrap_or_default());
    !c
}

/// Little-endian u16 at `off` (0 when out of range).
pub fn le16(b: &[u8], off: usize) -> u16 {
    off.checked_add(2)
        .and_then(|e| b.get(off..e))
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .unwrap_or(0)
}

/// Little-endian u32 at `off` (0 when out of range).
pub fn le32(b: &[u8], off: usize) -> u32 {
    off.checked_add(4)
        .and_then(|e| b.get(off..e))
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

/// Little-endian u64 at `off` (0 when out of range).
pub fn le64(b: &[u8], off: usize) -> u64 {
    off.checked_add(8)
        .and_then(|e| b.get(off..e))
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// Whether the 4 or 8 signature bytes at `off` equal `sig`.
pub fn has_sig(b: &[u8], off: usize, sig: &[u8]) -> bool {
    off.checked_add(sig.len())
        .and_then(|e| b.get(off..e))
        .is_some_and(|s| s == sig)
}

/// Writes `v` at `off` (ignored when out of range; callers size their buffers).
pub fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = off.checked_add(v.len()).and_then(|e| b.get_mut(off..e)) {
        d.copy_from_slice(v);
    }
}

/// Writes a little-endian u16.
pub fn put16(b: &mut [u8], off: usize, v: u16) {
    put(b, off, &v.to_le_bytes());
}

/// Writes a little-endian u32.
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    put(b, off, &v.to_le_bytes());
}

/// Writes a little-endian u64.
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    put(b, off, &v.to_le_bytes());
}

/// Decodes UTF-16LE bytes (lossy), stopping at the first NUL.
pub fn utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Encodes a string as UTF-16LE bytes.
pub fn to_utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Chunk ratio: payload blocks per sector-bitmap block.
pub fn chunk_ratio(block_size: u64, logical: u32) -> u64 {
    (SECTORS_PER_CHUNK * u64::from(logical)) / block_size.max(1)
}

/// BAT index of payload block `n`.
pub fn payload_index(n: u64, cr: u64) -> u64 {
    n + n / cr.max(1)
}

/// BAT index of the sector-bitmap entry of chunk `k`.
pub fn bitmap_index(k: u64, cr: u64) -> u64 {
    k * (cr + 1) + cr
}

/// Number of BAT entries a reader requires (qemu/MS-VHDX counts).
pub fn bat_entries(size: u64, block_size: u64, logical: u32, has_parent: bool) -> u64 {
    let cr = chunk_ratio(block_size, logical).max(1);
    let pb = size.div_ceil(block_size.max(1));
    let sb = pb.div_ceil(cr);
    if has_parent {
        sb * (cr + 1)
    } else if pb == 0 {
        0
    } else {
        pb + (pb - 1) / cr
    }
}

/// Number of BAT entries a writer sizes the region for (the larger count).
pub fn bat_entries_alloc(size: u64, block_size: u64, logical: u32) -> u64 {
    let cr = chunk_ratio(block_size, logical).max(1);
    let pb = size.div_ceil(block_size.max(1));
    let sb = pb.div_ceil(cr);
    (sb * (cr + 1)).max(pb + sb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let mut b = b"12345678xxxx9".to_vec();
        let c = crc32c_without(&b, 8);
        b[8..12].copy_from_slice(&[0; 4]);
        assert_eq!(c, crc32c(&b));
    }

    #[test]
    fn guid_bytes() {
        assert_eq!(
            BAT_REGION.0,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(
            BAT_REGION.to_string(),
            "2dc27766-f623-4200-9d64-115e9bfd4a08"
        );
        assert_eq!(
            Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}"),
            Some(BAT_REGION)
        );
        assert_eq!(ITEM_PARENT_LOCATOR.0[..4], [0x2d, 0x5f, 0xd3, 0xa8]);
    }

    #[test]
    fn bat_math() {
        assert_eq!(chunk_ratio(32 * MIB, 512), 128);
        assert_eq!(chunk_ratio(MIB, 4096), 32768);
        assert_eq!(bat_entries(127 << 30, 32 * MIB, 512, false), 4095);
        assert_eq!(bat_entries_alloc(127 << 30, 32 * MIB, 512), 4128);
        assert_eq!(bat_entries(127 << 30, 32 * MIB, 512, true), 4128);
        assert_eq!(payload_index(128, 128), 129);
        assert_eq!(bitmap_index(0, 128), 128);
        assert_eq!(bitmap_index(1, 128), 257);
    }
}
