//! The qcow2 header and its extensions: parse, validate, serialize.

use blockdev::{Error, ErrorKind, Result, Storage};

use crate::format::*;

/// The bitmaps extension (validated, never followed for data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// A parsed and validated qcow2 header, with its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0 (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Active L1 entries.
    pub l1_size: u32,
    /// Active L1 offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// Backing file name, as recorded.
    pub backing_file: Option<String>,
    /// Backing format extension.
    pub backing_format: Option<String>,
    /// External data file name extension.
    pub data_file: Option<String>,
    /// Feature name table entries (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Full-disk-encryption extension (offset, length).
    pub crypto: Option<(u64, u64)>,
    /// Unknown extensions (type, data), preserved on rewrite.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Whether L2 entries are 128 bits wide.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1u64 << self.refcount_order
    }

    /// Refcount entries per refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }

    /// L1 entries needed for `size` with this geometry.
    pub fn l1_needed(&self) -> u64 {
        let cover = self.cluster_size() * self.l2_entries();
        self.size.div_ceil(cover)
    }

    /// Names of the set bits of `bits` in feature group `kind`, using the image's own table
    /// for unknown bits.
    pub fn feature_names_of(&self, kind: u8, bits: u64) -> Vec<String> {
        (0..64u8)
            .filter(|b| bits & (1u64 << b) != 0)
            .map(|b| {
                if let Some(n) = feature_name(kind, b) {
                    return n.to_string();
                }
                self.feature_names
                    .iter()
                    .find(|(k, bit, _)| *k == kind && *bit == b)
                    .map(|(_, _, n)| format!("{n} (bit {b})"))
                    .unwrap_or_else(|| format!("unknown bit {b}"))
            })
            .collect()
    }

    /// Reads and validates the header of `storage`.
    pub fn read(storage: &dyn Storage) -> Result<Header> {
        let file_len = storage.len()?;
        let mut first = [0u8; V3_HEADER_LEN as usize];
        let got = storage.read_at_most(&mut first, 0)?;
        if got < 4 || be32(&first, 0) != MAGIC {
            if got < 4 {
                return Err(Error::invalid_format(
                    "magic",
                    0,
                    format!(
                        "file of {file_len} bytes is too short for a qcow2 header (truncated?)"
                    ),
                ));
            }
            return Err(Error::invalid_format(
                "magic",
                0,
                format!("not a qcow2 image: magic {:#010x}", be32(&first, 0)),
            ));
        }
        let version = be32(&first, 4);
        if version != 2 && version != 3 {
            return Err(Error::invalid_format(
                "version",
                4,
                format!("unsupported qcow2 version {version} (2 and 3 are supported)"),
            ));
        }
        if got < V2_HEADER_LEN as usize {
            return Err(Error::corrupt(
                "header",
                0,
                format!(
                    "file of {file_len} bytes is shorter than the 72-byte qcow2 header (truncated)"
                ),
            ));
        }
        let cluster_bits = be32(&first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(
                "cluster_bits",
                20,
                format!("cluster_bits {cluster_bits} outside 9..=21"),
            ));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(&first, 8),
            backing_file_size: be32(&first, 16),
            cluster_bits,
            size: be64(&first, 24),
            crypt_method: be32(&first, 32),
            l1_size: be32(&first, 36),
            l1_table_offset: be64(&first, 40),
            refcount_table_offset: be64(&first, 48),
            refcount_table_clusters: be32(&first, 56),
            nb_snapshots: be32(&first, 60),
            snapshots_offset: be64(&first, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto: None,
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            if got < V3_MIN_HEADER_LEN as usize {
                return Err(Error::corrupt(
                    "header_length",
                    100,
                    format!("file of {file_len} bytes is shorter than the 104-byte v3 header (truncated)"),
                ));
            }
            h.incompatible = be64(&first, 72);
            h.compatible = be64(&first, 80);
            h.autoclear = be64(&first, 88);
            h.refcount_order = be32(&first, 96);
            h.header_length = be32(&first, 100);
            if h.header_length < V3_MIN_HEADER_LEN
                || !h.header_length.is_multiple_of(8)
                || u64::from(h.header_length) > cs
            {
                return Err(Error::corrupt(
                    "header_length",
                    100,
                    format!(
                        "header_length {} invalid (must be >= 104, a multiple of 8 and fit the {cs}-byte cluster)",
                        h.header_length
                    ),
                ));
            }
            if h.header_length > 104 {
                h.compression_type = first.get(104).copied().unwrap_or(0);
            }
        }
        // Cluster 0 holds the extensions and the backing name: read what the file has of it.
        let c0_len = cs.min(file_len);
        let mut c0 = vec![0u8; usize::try_from(c0_len).unwrap_or(0)];
        storage.read_at(&mut c0, 0)?;
        h.validate_fields(file_len)?;
        h.parse_extensions(&c0)?;
        if h.backing_file_offset != 0 {
            let start = usize::try_from(h.backing_file_offset).unwrap_or(usize::MAX);
            let name = start
                .checked_add(h.backing_file_size as usize)
                .and_then(|end| c0.get(start..end))
                .ok_or_else(|| {
                    Error::corrupt(
                        "backing_file_offset",
                        8,
                        "backing file name runs past the end of the file (truncated)",
                    )
                })?;
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        Ok(h)
    }

    fn validate_fields(&mut self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.backing_file_offset != 0 {
            if self.backing_file_offset > cs {
                return Err(Error::corrupt(
                    "backing_file_offset",
                    8,
                    format!(
                        "invalid backing file offset {:#x}",
                        self.backing_file_offset
                    ),
                ));
            }
            if self.backing_file_size > MAX_BACKING_NAME
                || u64::from(self.backing_file_size) > cs - self.backing_file_offset
            {
                return Err(Error::corrupt(
                    "backing_file_size",
                    16,
                    format!(
                        "backing file name too long ({} bytes)",
                        self.backing_file_size
                    ),
                ));
            }
        }
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            // Names are resolved after the extensions are read (see parse_extensions).
        }
        if self.crypt_method != 0 {
            return Err(Error::unsupported(format!(
                "encrypted qcow2 images (crypt_method {}) are not supported",
                self.crypt_method
            ))
            .with_field("crypt_method")
            .with_offset(32));
        }
        if self.refcount_order > 6 {
            return Err(Error::corrupt(
                "refcount_order",
                96,
                format!("refcount_order {} > 6", self.refcount_order),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(Error::corrupt(
                "cluster_bits",
                20,
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        match (self.compression_type, self.incompatible & INCOMPAT_COMPRESSION != 0) {
            (0, false) | (1, true) => {}
            (0, true) => {
                return Err(Error::corrupt(
                    "compression_type",
                    104,
                    "compression type incompatible feature bit must not be set with compression type zlib",
                ))
            }
            (1, false) => {
                return Err(Error::corrupt(
                    "compression_type",
                    104,
                    "compression type incompatible feature bit must be set for zstd",
                ))
            }
            (t, _) => {
                return Err(Error::unsupported(format!("unknown compression type {t}"))
                    .with_field("compression_type")
                    .with_offset(104))
            }
        }
        // Refcount table.
        if self.refcount_table_clusters == 0 {
            return Err(Error::corrupt(
                "refcount_table_clusters",
                56,
                "image does not contain a reference count table",
            ));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(
                "refcount_table_clusters",
                56,
                format!("reference count table too large ({rt_bytes} bytes, limit 8 MiB)"),
            ));
        }
        check_table(
            "refcount_table_offset",
            48,
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        // L1 table.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(
                "l1_size",
                36,
                format!("active L1 table too large ({} entries)", self.l1_size),
            ));
        }
        if u64::from(self.l1_size) < self.l1_needed() {
            return Err(Error::corrupt(
                "l1_size",
                36,
                format!(
                    "L1 table is too small: {} entries for a size needing {}",
                    self.l1_size,
                    self.l1_needed()
                ),
            ));
        }
        if self.l1_size > 0 || self.l1_table_offset != 0 {
            check_table(
                "l1_table_offset",
                40,
                self.l1_table_offset,
                l1_bytes,
                cs,
                file_len,
            )?;
        }
        // Snapshot table (entries are checked when the table is read).
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt(
                "nb_snapshots",
                60,
                format!("too many snapshots ({})", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 {
            check_table(
                "snapshots_offset",
                64,
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
                cs,
                file_len,
            )?;
        }
        Ok(())
    }

    fn parse_extensions(&mut self, c0: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            cs
        }
        .min(c0.len() as u64);
        let mut off = u64::from(self.header_length);
        let mut seen: Vec<u32> = Vec::new();
        while off < end {
            if end - off < 8 {
                return Err(Error::corrupt(
                    "header_extension",
                    off,
                    "header extension header runs past the extension area",
                ));
            }
            let o = usize::try_from(off).unwrap_or(usize::MAX);
            let ty = be32(c0, o);
            let len = u64::from(be32(c0, o + 4));
            if ty == EXT_END {
                break;
            }
            if len > end - off - 8 {
                return Err(Error::corrupt(
                    "header_extension",
                    off,
                    format!("header extension {ty:#010x} too large ({len} bytes)"),
                ));
            }
            if seen.contains(&ty) {
                return Err(Error::corrupt(
                    "header_extension",
                    off,
                    format!("header extension {ty:#010x} appears twice"),
                ));
            }
            seen.push(ty);
            let data = c0.get(o + 8..o + 8 + len as usize).unwrap_or_default();
            self.apply_extension(ty, data, off)?;
            off = off + 8 + len.div_ceil(8) * 8;
        }
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names = self.feature_names_of(0, unknown);
            return Err(Error::unsupported(format!(
                "unsupported incompatible features: {}",
                names.join(", ")
            ))
            .with_field("incompatible_features")
            .with_offset(72));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            if self.data_file.is_none() {
                return Err(Error::corrupt(
                    "incompatible_features",
                    72,
                    "external data file bit set but no data file name extension",
                ));
            }
        } else if self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            // qemu: "data-file-raw requires a data file"; harmless for reading, clear it.
            self.autoclear &= !AUTOCLEAR_DATA_FILE_RAW;
        }
        Ok(())
    }

    fn apply_extension(&mut self, ty: u32, data: &[u8], off: u64) -> Result<()> {
        let text = |field: &str| -> Result<String> {
            if data.len() > MAX_BACKING_NAME as usize {
                return Err(Error::corrupt(field, off, "name longer than 1023 bytes"));
            }
            Ok(String::from_utf8_lossy(data).into_owned())
        };
        match ty {
            EXT_BACKING_FORMAT => {
                if data.len() >= 16 {
                    return Err(Error::corrupt(
                        "backing_format",
                        off,
                        "backing format name too long",
                    ));
                }
                self.backing_format = Some(text("backing_format")?);
            }
            EXT_DATA_FILE => self.data_file = Some(text("data_file")?),
            EXT_FEATURE_TABLE => {
                for e in data.chunks_exact(48) {
                    let kind = e.first().copied().unwrap_or(0);
                    let bit = e.get(1).copied().unwrap_or(0);
                    let raw = e.get(2..).unwrap_or_default();
                    let n = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                    let name = String::from_utf8_lossy(raw.get(..n).unwrap_or_default());
                    self.feature_names.push((kind, bit, name.into_owned()));
                }
            }
            EXT_BITMAPS => {
                if data.len() != 24 {
                    return Err(Error::corrupt(
                        "bitmaps_extension",
                        off,
                        format!("bitmaps extension has length {} (must be 24)", data.len()),
                    ));
                }
                let ext = BitmapsExt {
                    nb_bitmaps: be32(data, 0),
                    directory_size: be64(data, 8),
                    directory_offset: be64(data, 16),
                };
                let bad = if ext.nb_bitmaps == 0 || ext.nb_bitmaps > 65535 {
                    Some("nb_bitmaps outside 1..=65535")
                } else if be32(data, 4) != 0 {
                    Some("reserved field is not zero")
                } else if ext.directory_size > 1024 * 65535 {
                    Some("bitmap directory too large")
                } else if !ext.directory_offset.is_multiple_of(self.cluster_size()) {
                    Some("bitmap directory offset not cluster aligned")
                } else {
                    None
                };
                if let Some(why) = bad {
                    return Err(Error::corrupt("bitmaps_extension", off, why));
                }
                // Bitmaps are never followed for data; without autoclear bit 0 they are stale.
                self.bitmaps = Some(ext);
            }
            EXT_CRYPTO => {
                if data.len() != 16 {
                    return Err(Error::corrupt(
                        "crypto_extension",
                        off,
                        "full disk encryption extension must be 16 bytes",
                    ));
                }
                self.crypto = Some((be64(data, 0), be64(data, 8)));
            }
            _ => self.unknown_extensions.push((ty, data.to_vec())),
        }
        Ok(())
    }

    /// Serializes the header, extensions and backing name into cluster 0 bytes.
    ///
    /// Sets `backing_file_offset`/`backing_file_size` from `backing_file`. Fails when everything
    /// does not fit in one cluster.
    pub fn serialize(&mut self, with_feature_table: bool) -> Result<Vec<u8>> {
        let cs = self.cluster_size();
        let mut b = vec![0u8; self.header_length as usize];
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(f) = &self.backing_format {
            exts.push((EXT_BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        if let Some(f) = &self.data_file {
            exts.push((EXT_DATA_FILE, f.as_bytes().to_vec()));
        }
        if with_feature_table {
            let mut t = Vec::new();
            for (kind, bit) in [
                (0u8, 0u8),
                (0, 1),
                (0, 2),
                (0, 3),
                (0, 4),
                (1, 0),
                (2, 0),
                (2, 1),
            ] {
                let mut e = [0u8; 48];
                e[0] = kind;
                e[1] = bit;
                let n = feature_name(kind, bit).unwrap_or_default().as_bytes();
                if let Some(d) = e.get_mut(2..2 + n.len()) {
                    d.copy_from_slice(n);
                }
                t.extend_from_slice(&e);
            }
            exts.push((EXT_FEATURE_TABLE, t));
        }
        for (t, d) in &self.unknown_extensions {
            exts.push((*t, d.clone()));
        }
        for (t, d) in exts {
            let mut e = vec![0u8; 8 + d.len().div_ceil(8) * 8];
            put32(&mut e, 0, t);
            put32(&mut e, 4, d.len() as u32);
            if let Some(s) = e.get_mut(8..8 + d.len()) {
                s.copy_from_slice(&d);
            }
            b.extend_from_slice(&e);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(Error::invalid_argument(
                    "backing file name longer than 1023 bytes",
                ));
            }
            self.backing_file_offset = b.len() as u64;
            self.backing_file_size = name.len() as u32;
            b.extend_from_slice(name.as_bytes());
        } else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        }
        if b.len() as u64 > cs {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("header, extensions and backing name need {} bytes, more than one {cs}-byte cluster", b.len()),
            ));
        }
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                if let Some(x) = b.get_mut(104) {
                    *x = self.compression_type;
                }
            }
        }
        Ok(b)
    }

    /// Just the fixed fields (up to header_length), for in-place header updates.
    pub fn fixed_bytes(&self) -> Vec<u8> {
        let mut c = self.clone();
        c.backing_file = None;
        c.backing_format = None;
        c.data_file = None;
        c.unknown_extensions.clear();
        let keep_off = self.backing_file_offset;
        let keep_size = self.backing_file_size;
        let mut b = c.serialize(false).unwrap_or_default();
        b.truncate(self.header_length as usize);
        put64(&mut b, 8, keep_off);
        put32(&mut b, 16, keep_size);
        b
    }
}

fn check_table(field: &str, at: u64, offset: u64, len: u64, cs: u64, file_len: u64) -> Result<()> {
    if !offset.is_multiple_of(cs) || offset == 0 {
        return Err(Error::corrupt(
            field,
            at,
            format!("invalid {field} {offset:#x} (not cluster aligned or zero)"),
        ));
    }
    // qemu leaves the last cluster partly written: a table may end inside it.
    let limit = file_len.div_ceil(cs).saturating_mul(cs);
    match offset.checked_add(len) {
        Some(end) if end <= limit && offset < file_len => Ok(()),
        _ => Err(Error::corrupt(
            field,
            at,
            format!("table at {offset:#x} of {len} bytes runs past the end of the file ({file_len} bytes)"),
        )),
    }
}
