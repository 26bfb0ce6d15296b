//! On-disk definitions of qcow2 (all integers big-endian): constants, masks and byte helpers.
//!
//! Nothing here does I/O; parsing of whole structures lives in `header.rs`, `table.rs` and
//! `snapshot.rs`.

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49FB;
/// Size of the version 2 header (and of the part every version shares).
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header (older qemu, without the compression type byte).
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The version 3 header qemu writes today (compression type byte plus padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Smallest supported cluster_bits (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster_bits (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest refcount table (qemu `QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest L1 table (qemu `QCOW_MAX_L1_SIZE`).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Most internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table.
pub const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// Largest extra data of one snapshot.
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;

/// Incompatible bit 0: refcounts may be stale.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: metadata may be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: the compression_type field is non-zero.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: 128-bit L2 entries with subclusters.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this crate understands.
pub const INCOMPAT_KNOWN: u64 = 0x1F;
/// Compatible bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: end of the area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_BE77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// L1/L2 entry bit 63: refcount is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit 62: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0: reads as zeros (v3).
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED: u64 = 0x7F00_0000_0000_01FF;
/// Reserved bits of a standard L2 entry.
pub const L2_RESERVED: u64 = 0x3F00_0000_0000_01FE;
/// Offset bits of a refcount table entry.
pub const REFTABLE_OFFSET_MASK: u64 = 0xFFFF_FFFF_FFFF_FE00;

/// compression_type 0: raw deflate.
pub const COMPRESSION_ZLIB: u8 = 0;
/// compression_type 1: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

/// Reads a big-endian u16 at `off` of `b`, or 0 when out of range (callers check lengths).
pub fn be16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_be_bytes)
        .unwrap_or(0)
}

/// Reads a big-endian u32 at `off` of `b`, or 0 when out of range (callers check lengths).
pub fn be32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

/// Reads a big-endian u64 at `off` of `b`, or 0 when out of range (callers check lengths).
pub fn be64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Writes a big-endian u16 at `off` of `b` (ignored when out of range).
pub fn put16(b: &mut [u8], off: usize, v: u16) {
    if let Some(s) = b.get_mut(off..off + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Writes a big-endian u32 at `off` of `b` (ignored when out of range).
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Writes a big-endian u64 at `off` of `b` (ignored when out of range).
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Decodes a table of big-endian u64 entries.
pub fn decode_u64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// Encodes a table of u64 entries big-endian.
pub fn encode_u64s(v: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for x in v {
        out.extend_from_slice(&x.to_be_bytes());
    }
    out
}

/// Reads refcount entry `idx` of a refcount block with entries of `1 << order` bits.
pub fn refcount_get(block: &[u8], order: u32, idx: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let byte = block.get(bit / 8).copied().unwrap_or(0);
            u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block.get(idx).copied().unwrap_or(0)),
        4 => u64::from(be16(block, idx * 2)),
        5 => u64::from(be32(block, idx * 4)),
        _ => be64(block, idx * 8),
    }
}

/// Writes refcount entry `idx` of a refcount block with entries of `1 << order` bits
/// (the value is truncated to the width; callers check [`refcount_max`]).
pub fn refcount_set(block: &mut [u8], order: u32, idx: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let mask = ((1u16 << bits) - 1) as u8;
            if let Some(byte) = block.get_mut(bit / 8) {
                let sh = bit % 8;
                *byte = (*byte & !(mask << sh)) | (((v as u8) & mask) << sh);
            }
        }
        3 => {
            if let Some(b) = block.get_mut(idx) {
                *b = v as u8;
            }
        }
        4 => put16(block, idx * 2, v as u16),
        5 => put32(block, idx * 4, v as u32),
        _ => put64(block, idx * 8, v),
    }
}

/// Largest refcount representable with `1 << order` bits.
pub fn refcount_max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Name of an incompatible/compatible/autoclear bit this crate knows.
pub fn feature_name(kind: u8, bit: u8) -> Option<&'static str> {
    match (kind, bit) {
        (0, 0) => Some("dirty"),
        (0, 1) => Some("corrupt"),
        (0, 2) => Some("external data file"),
        (0, 3) => Some("compression type"),
        (0, 4) => Some("extended L2 entries"),
        (1, 0) => Some("lazy refcounts"),
        (2, 0) => Some("bitmaps"),
        (2, 1) => Some("raw external data"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_roundtrip() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let max = refcount_max(order);
            let n = 64 * 8 / (1usize << order);
            for i in 0..n {
                refcount_set(&mut b, order, i, (i as u64) % (max.min(1000) + 1));
            }
            for i in 0..n {
                assert_eq!(refcount_get(&b, order, i), (i as u64) % (max.min(1000) + 1));
            }
        }
    }
}
