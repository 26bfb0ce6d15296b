//! The header section: file identifier, the two headers and the two region tables.

use blockdev::{Error, ErrorKind, Result, Storage};

use crate::format::*;

/// One parsed VHDX header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Sequence number.
    pub seq: u64,
    /// Changes before the first write of every open.
    pub file_write_guid: Guid,
    /// Changes before the first user-visible change.
    pub data_write_guid: Guid,
    /// Zero when the log is empty.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Log length in bytes.
    pub log_length: u32,
    /// Log offset in the file.
    pub log_offset: u64,
}

impl Header {
    /// Serialises to a 4 KiB slot with its CRC-32C.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        put(&mut b, 0, HEADER_SIGNATURE);
        put64(&mut b, 8, self.seq);
        put(&mut b, 16, &self.file_write_guid.0);
        put(&mut b, 32, &self.data_write_guid.0);
        put(&mut b, 48, &self.log_guid.0);
        put16(&mut b, 64, self.log_version);
        put16(&mut b, 66, self.version);
        put32(&mut b, 68, self.log_length);
        put64(&mut b, 72, self.log_offset);
        let crc = crc32c(&b);
        put32(&mut b, 4, crc);
        b
    }

    /// Parses a 4 KiB slot; `Err(reason)` when it is not a valid header.
    pub fn parse(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < HEADER_SIZE {
            return Err("short header".into());
        }
        if !has_sig(b, 0, HEADER_SIGNATURE) {
            return Err("signature is not \"head\"".into());
        }
        let stored = le32(b, 4);
        let crc = crc32c_without(b.get(..HEADER_SIZE).unwrap_or_default(), 4);
        if stored != crc {
            return Err(format!(
                "CRC-32C mismatch (stored {stored:#010x}, computed {crc:#010x})"
            ));
        }
        let h = Header {
            seq: le64(b, 8),
            file_write_guid: Guid::read(b, 16),
            data_write_guid: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        if h.version != 1 {
            return Err(format!("version {} is not 1", h.version));
        }
        Ok(h)
    }
}

/// The outcome of reading both header slots.
#[derive(Debug, Clone)]
pub struct Headers {
    /// The current header.
    pub current: Header,
    /// Slot (0 or 1) holding the current header.
    pub slot: usize,
    /// Both slots as parsed (for info and check).
    pub slots: [std::result::Result<Header, String>; 2],
}

/// Reads the creator string of the file identifier, checking its signature.
pub fn read_file_identifier(storage: &dyn Storage) -> Result<String> {
    let mut b = vec![0u8; CREATOR_OFFSET + CREATOR_LEN];
    let n = storage.read_at_most(&mut b, 0)?;
    if n < 8 || !has_sig(&b, 0, FILE_SIGNATURE) {
        return Err(Error::invalid_format(
            "file_identifier.signature",
            0,
            "not a VHDX image (no \"vhdxfile\" signature)",
        ));
    }
    Ok(utf16le(
        b.get(CREATOR_OFFSET..n.max(CREATOR_OFFSET))
            .unwrap_or_default(),
    ))
}

/// Reads both headers and selects the current one.
pub fn read_headers(storage: &dyn Storage) -> Result<Headers> {
    let mut raw = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
    let mut slots: [std::result::Result<Header, String>; 2] =
        [Err(String::new()), Err(String::new())];
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        let buf = raw.get_mut(i).map(|v| v.as_mut_slice()).unwrap_or_default();
        let n = storage.read_at_most(buf, *off)?;
        let r = if n < HEADER_SIZE {
            Err("truncated".to_string())
        } else {
            Header::parse(buf)
        };
        if let Some(s) = slots.get_mut(i) {
            *s = r;
        }
    }
    let (slot, current) = match (&slots[0], &slots[1]) {
        (Ok(a), Ok(b)) => {
            if a.seq > b.seq {
                (0, a.clone())
            } else if b.seq > a.seq {
                (1, b.clone())
            } else if raw[0] == raw[1] {
                (0, a.clone())
            } else {
                return Err(Error::corrupt(
                    "header.sequence_number",
                    HEADER_OFFSETS[1],
                    format!(
                        "both headers carry sequence number {} but differ; no current header",
                        a.seq
                    ),
                ));
            }
        }
        (Ok(a), Err(_)) => (0, a.clone()),
        (Err(_), Ok(b)) => (1, b.clone()),
        (Err(e1), Err(e2)) => {
            return Err(Error::corrupt(
                "header",
                HEADER_OFFSETS[0],
                format!("no valid VHDX header found (header 1: {e1}; header 2: {e2})"),
            ))
        }
    };
    let off = HEADER_OFFSETS.get(slot).copied().unwrap_or(0);
    if current.log_version != 0 {
        return Err(Error::corrupt(
            "header.log_version",
            off + 64,
            format!("log version {} is not 0", current.log_version),
        ));
    }
    Ok(Headers {
        current,
        slot,
        slots,
    })
}

/// Checks the log location of the current header against the file.
pub fn check_log_location(h: &Header, slot_off: u64, file_len: u64) -> Result<()> {
    let lo = h.log_offset;
    let ll = u64::from(h.log_length);
    if lo < HEADER_SECTION || !lo.is_multiple_of(MIB) {
        return Err(Error::corrupt(
            "header.log_offset",
            slot_off + 72,
            format!("log offset {lo:#x} is not a multiple of 1 MiB at or after 1 MiB"),
        ));
    }
    if ll % MIB != 0 {
        return Err(Error::corrupt(
            "header.log_length",
            slot_off + 68,
            format!("log length {ll:#x} is not a multiple of 1 MiB"),
        ));
    }
    match lo.checked_add(ll) {
        Some(end) if end <= file_len || ll == 0 => Ok(()),
        _ => Err(Error::corrupt(
            "header.log_offset",
            slot_off + 72,
            format!("log [{lo:#x}, +{ll:#x}) lies past the end of the file ({file_len:#x})"),
        )),
    }
}

/// One region table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionEntry {
    /// Region GUID.
    pub guid: Guid,
    /// File offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Required flag.
    pub required: bool,
}

/// A parsed region table with the BAT and metadata regions located.
#[derive(Debug, Clone)]
pub struct Regions {
    /// All entries in table order.
    pub entries: Vec<RegionEntry>,
    /// The BAT region.
    pub bat: RegionEntry,
    /// The metadata region.
    pub metadata: RegionEntry,
    /// Which table copy was used (0 or 1).
    pub table: usize,
}

/// Parses one 64 KiB region table (structure only).
pub fn parse_region_table(b: &[u8], base: u64) -> Result<Vec<RegionEntry>> {
    if !has_sig(b, 0, REGION_SIGNATURE) {
        return Err(Error::corrupt(
            "region_table.signature",
            base,
            "region table signature is not \"regi\"",
        ));
    }
    let stored = le32(b, 4);
    let crc = crc32c_without(b, 4);
    if stored != crc {
        return Err(Error::corrupt(
            "region_table.checksum",
            base + 4,
            format!("CRC-32C mismatch (stored {stored:#010x}, computed {crc:#010x})"),
        ));
    }
    let count = le32(b, 8);
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::corrupt(
            "region_table.entry_count",
            base + 8,
            format!("{count} entries, more than {MAX_TABLE_ENTRIES}"),
        ));
    }
    let mut out = Vec::new();
    for i in 0..count as usize {
        let o = 16 + i * 32;
        out.push(RegionEntry {
            guid: Guid::read(b, o),
            offset: le64(b, o + 16),
            length: u64::from(le32(b, o + 24)),
            required: le32(b, o + 28) & 1 != 0,
        });
    }
    Ok(out)
}

/// Serialises a region table.
pub fn region_table_bytes(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    put(&mut b, 0, REGION_SIGNATURE);
    put32(&mut b, 8, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        let o = 16 + i * 32;
        put(&mut b, o, &e.guid.0);
        put64(&mut b, o + 16, e.offset);
        put32(&mut b, o + 24, e.length as u32);
        put32(&mut b, o + 28, u32::from(e.required));
    }
    let crc = crc32c(&b);
    put32(&mut b, 4, crc);
    b
}

/// Validates the entries of a region table against the file and the log.
pub fn validate_regions(
    entries: &[RegionEntry],
    base: u64,
    file_len: u64,
    log: (u64, u64),
) -> Result<(RegionEntry, RegionEntry)> {
    let mut bat = None;
    let mut meta = None;
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    if log.1 > 0 {
        spans.push((log.0, log.0.saturating_add(log.1), "log".into()));
    }
    for (i, e) in entries.iter().enumerate() {
        let field = format!("region_table.entry[{i}]");
        let eoff = base + 16 + (i as u64) * 32;
        let name = if e.guid == BAT_REGION {
            "bat"
        } else if e.guid == METADATA_REGION {
            "metadata"
        } else {
            if e.required {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("unknown required region {}", e.guid),
                )
                .with_field(&field)
                .with_offset(eoff));
            }
            "unknown"
        };
        if e.offset < HEADER_SECTION || e.offset % MIB != 0 || e.length % MIB != 0 || e.length == 0
        {
            return Err(Error::corrupt(
                &field,
                eoff + 16,
                format!(
                    "{name} region [{:#x}, +{:#x}) is not 1 MiB aligned after the header section",
                    e.offset, e.length
                ),
            ));
        }
        let end = match e.offset.checked_add(e.length) {
            Some(end) if end <= file_len => end,
            _ => {
                return Err(Error::corrupt(
                    &field,
                    eoff + 16,
                    format!(
                    "{name} region [{:#x}, +{:#x}) lies past the end of the file ({file_len:#x})",
                    e.offset, e.length
                ),
                ))
            }
        };
        for (s, t, n) in &spans {
            if e.offset < *t && *s < end {
                return Err(Error::corrupt(
                    &field,
                    eoff + 16,
                    format!("{name} region [{:#x}, {end:#x}) overlaps the {n}", e.offset),
                ));
            }
        }
        spans.push((e.offset, end, name.to_string()));
        let slot = match name {
            "bat" => &mut bat,
            "metadata" => &mut meta,
            _ => continue,
        };
        if slot.is_some() {
            return Err(Error::corrupt(
                &field,
                eoff,
                format!("duplicate {name} region entry"),
            ));
        }
        *slot = Some(e.clone());
    }
    let bat = bat.ok_or_else(|| {
        Error::corrupt("region_table", base, "the region table has no BAT region")
    })?;
    let meta = meta.ok_or_else(|| {
        Error::corrupt(
            "region_table",
            base,
            "the region table has no metadata region",
        )
    })?;
    Ok((bat, meta))
}

/// Reads both region tables and uses the first valid one.
pub fn read_regions(storage: &dyn Storage, file_len: u64, log: (u64, u64)) -> Result<Regions> {
    let mut first_err = None;
    for (t, off) in REGION_OFFSETS.iter().enumerate() {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        let n = storage.read_at_most(&mut b, *off)?;
        let parsed = if n < REGION_TABLE_SIZE {
            Err(Error::corrupt(
                "region_table",
                *off,
                "region table runs past the end of the file",
            ))
        } else {
            parse_region_table(&b, *off)
        };
        match parsed {
            Ok(entries) => {
                // A table with a good checksum is authoritative: its errors are final.
                let (bat, metadata) = validate_regions(&entries, *off, file_len, log)?;
                return Ok(Regions {
                    entries,
                    bat,
                    metadata,
                    table: t,
                });
            }
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    Err(first_err.unwrap_or_else(|| Error::corrupt("region_table", REGION_OFFSETS[0], "invalid")))
}
