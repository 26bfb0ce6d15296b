//! The metadata region: table, known items and the parent locator.

use blockdev::{Error, ErrorKind, Result, Storage};

use crate::format::*;

/// One metadata table entry.
#[derive(Debug, Clone)]
pub struct MetaEntry {
    /// Item GUID.
    pub item: Guid,
    /// Offset from the start of the region.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
    /// Flags (IsUser, IsVirtualDisk, IsRequired).
    pub flags: u32,
}

/// The parent locator item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locator {
    /// Locator type GUID.
    pub locator_type: Guid,
    /// Every key/value pair, in file order.
    pub entries: Vec<(String, String)>,
}

impl Locator {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The non-zero linkage GUIDs (parent_linkage, parent_linkage2).
    pub fn linkages(&self) -> Vec<Guid> {
        ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| self.get(k))
            .filter_map(Guid::parse)
            .filter(|g| !g.is_zero())
            .collect()
    }

    /// Serialises the locator item.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut head = vec![0u8; 20 + 12 * n];
        put(&mut head, 0, &self.locator_type.0);
        put16(&mut head, 18, n as u16);
        let mut data = Vec::new();
        let mut pos = head.len();
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let kb = to_utf16le(k);
            let vb = to_utf16le(v);
            let o = 20 + 12 * i;
            put32(&mut head, o, pos as u32);
            put32(&mut head, o + 4, (pos + kb.len()) as u32);
            put16(&mut head, o + 8, kb.len() as u16);
            put16(&mut head, o + 10, vb.len() as u16);
            pos += kb.len() + vb.len();
            data.extend_from_slice(&kb);
            data.extend_from_slice(&vb);
        }
        head.extend_from_slice(&data);
        head
    }
}

/// The validated contents of the metadata region.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// Table entries in order.
    pub entries: Vec<MetaEntry>,
    /// Block size.
    pub block_size: u32,
    /// LeaveBlockAllocated flag.
    pub leave_allocated: bool,
    /// HasParent flag.
    pub has_parent: bool,
    /// Virtual disk size.
    pub disk_size: u64,
    /// Virtual disk ID (page 83).
    pub disk_id: Guid,
    /// Logical sector size.
    pub logical: u32,
    /// Physical sector size.
    pub physical: u32,
    /// Parent locator, when present.
    pub locator: Option<Locator>,
}

pub(crate) fn read_item(storage: &dyn Storage, region: u64, e: &MetaEntry) -> Result<Vec<u8>> {
    let mut b = vec![0u8; e.length as usize];
    storage.read_at(&mut b, region + u64::from(e.offset))?;
    Ok(b)
}

/// Reads and validates the metadata region at `[region, +region_len)`.
pub fn read_metadata(storage: &dyn Storage, region: u64, region_len: u64) -> Result<Metadata> {
    let mut t = vec![0u8; METADATA_TABLE_SIZE as usize];
    storage.read_at(&mut t, region)?;
    if !has_sig(&t, 0, METADATA_SIGNATURE) {
        return Err(Error::corrupt(
            "metadata_table.signature",
            region,
            "metadata table signature is not \"metadata\"",
        ));
    }
    let count = u32::from(le16(&t, 10));
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::corrupt(
            "metadata_table.entry_count",
            region + 10,
            format!("{count} entries, more than {MAX_TABLE_ENTRIES}"),
        ));
    }
    let mut entries: Vec<MetaEntry> = Vec::new();
    let mut known: Vec<(Guid, MetaEntry)> = Vec::new();
    for i in 0..count as usize {
        let o = 32 + i * 32;
        let e = MetaEntry {
            item: Guid::read(&t, o),
            offset: le32(&t, o + 16),
            length: le32(&t, o + 20),
            flags: le32(&t, o + 24),
        };
        let field = format!("metadata_table.entry[{i}]");
        let eoff = region + o as u64;
        let is_user = e.flags & META_IS_USER != 0;
        if entries
            .iter()
            .any(|x| x.item == e.item && (x.flags & META_IS_USER != 0) == is_user)
        {
            return Err(Error::corrupt(
                &field,
                eoff,
                format!("duplicate metadata item {}", e.item),
            ));
        }
        let name = if is_user { None } else { item_name(&e.item) };
        if name.is_none() && e.flags & META_IS_REQUIRED != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown required metadata item {}", e.item),
            )
            .with_field(&field)
            .with_offset(eoff));
        }
        let len = u64::from(e.length);
        let off = u64::from(e.offset);
        let bad = if len == 0 {
            off != 0 && name.is_some()
        } else {
            off < METADATA_TABLE_SIZE
                || len > MAX_METADATA_ITEM
                || off.checked_add(len).is_none_or(|end| end > region_len)
        };
        if bad {
            return Err(Error::corrupt(
                &format!("{field}.offset"),
                eoff + 16,
                format!(
                    "metadata item {} [{off:#x}, +{len:#x}) lies outside the metadata region (length {region_len:#x}) or its table",
                    name.unwrap_or("unknown")
                ),
            ));
        }
        if let Some(n) = name {
            let want = match n {
                "file_parameters" | "virtual_disk_size" => Some(8),
                "virtual_disk_id" => Some(16),
                "logical_sector_size" | "physical_sector_size" => Some(4),
                _ => None,
            };
            if let Some(w) = want {
                if e.length != w {
                    return Err(Error::corrupt(
                        n,
                        eoff + 20,
                        format!("metadata item {n} has length {}, expected {w}", e.length),
                    ));
                }
            } else if e.length < 20 {
                return Err(Error::corrupt(
                    n,
                    eoff + 20,
                    format!("metadata item {n} has length {}, too short", e.length),
                ));
            }
            known.push((e.item, e.clone()));
        }
        entries.push(e);
    }
    // Known items must not overlap each other.
    let mut spans: Vec<(u64, u64)> = known
        .iter()
        .map(|(_, e)| {
            (
                u64::from(e.offset),
                u64::from(e.offset) + u64::from(e.length),
            )
        })
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if let [a, b] = w {
            if b.0 < a.1 {
                return Err(Error::corrupt(
                    "metadata_table",
                    region + b.0,
                    format!("metadata items overlap at region offset {:#x}", b.0),
                ));
            }
        }
    }
    let find = |g: Guid| known.iter().find(|(k, _)| *k == g).map(|(_, e)| e.clone());
    let need = |g: Guid| {
        find(g).ok_or_else(|| {
            Error::corrupt(
                item_name(&g).unwrap_or("metadata"),
                region,
                format!(
                    "required metadata item {} is missing",
                    item_name(&g).unwrap_or("?")
                ),
            )
        })
    };
    let fp_e = need(ITEM_FILE_PARAMETERS)?;
    let fp = read_item(storage, region, &fp_e)?;
    let fp_off = region + u64::from(fp_e.offset);
    let block_size = le32(&fp, 0);
    let flags = le32(&fp, 4);
    let bs = u64::from(block_size);
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::corrupt(
            "file_parameters.block_size",
            fp_off,
            format!("block size {bs:#x} is not a power of two between 1 MiB and 256 MiB"),
        ));
    }
    if flags & !3 != 0 {
        return Err(Error::corrupt(
            "file_parameters.flags",
            fp_off + 4,
            format!("unknown file parameter flags {flags:#x}"),
        ));
    }
    let rd = |g: Guid| -> Result<(Vec<u8>, u64)> {
        let e = need(g)?;
        Ok((
            read_item(storage, region, &e)?,
            region + u64::from(e.offset),
        ))
    };
    let (ls, ls_off) = rd(ITEM_LOGICAL_SECTOR_SIZE)?;
    let logical = le32(&ls, 0);
    if logical != 512 && logical != 4096 {
        return Err(Error::corrupt(
            "logical_sector_size",
            ls_off,
            format!("logical sector size {logical} is not 512 or 4096"),
        ));
    }
    let (ps, ps_off) = rd(ITEM_PHYSICAL_SECTOR_SIZE)?;
    let physical = le32(&ps, 0);
    if physical != 512 && physical != 4096 {
        return Err(Error::corrupt(
            "physical_sector_size",
            ps_off,
            format!("physical sector size {physical} is not 512 or 4096"),
        ));
    }
    let (vs, vs_off) = rd(ITEM_VIRTUAL_DISK_SIZE)?;
    let disk_size = le64(&vs, 0);
    if disk_size == 0 || !disk_size.is_multiple_of(u64::from(logical)) || disk_size > MAX_DISK_SIZE
    {
        return Err(Error::corrupt(
            "virtual_disk_size",
            vs_off,
            format!(
                "virtual disk size {disk_size} is 0, not a multiple of the logical sector size {logical} or above 64 TiB"
            ),
        ));
    }
    let (id, _) = rd(ITEM_VIRTUAL_DISK_ID)?;
    let disk_id = Guid::read(&id, 0);
    let has_parent = flags & 2 != 0;
    let locator = match find(ITEM_PARENT_LOCATOR) {
        Some(e) => {
            let b = read_item(storage, region, &e)?;
            Some(parse_locator(&b, region + u64::from(e.offset))?)
        }
        None => None,
    };
    if has_parent && locator.is_none() {
        return Err(Error::corrupt(
            "parent_locator",
            region,
            "the image has a parent (HasParent) but no parent locator",
        ));
    }
    Ok(Metadata {
        entries,
        block_size,
        leave_allocated: flags & 1 != 0,
        has_parent,
        disk_size,
        disk_id,
        logical,
        physical,
        locator,
    })
}

/// Longest key or value accepted, in bytes.
const MAX_LOCATOR_TEXT: usize = 32 << 10;

/// Parses a parent locator item.
pub fn parse_locator(b: &[u8], base: u64) -> Result<Locator> {
    let count = usize::from(le16(b, 18));
    if 20 + 12 * count > b.len() {
        return Err(Error::corrupt(
            "parent_locator.key_value_count",
            base + 18,
            format!("{count} entries do not fit the {}-byte item", b.len()),
        ));
    }
    let mut entries: Vec<(String, String)> = Vec::new();
    for i in 0..count {
        let o = 20 + 12 * i;
        let ko = le32(b, o) as usize;
        let vo = le32(b, o + 4) as usize;
        let kl = usize::from(le16(b, o + 8));
        let vl = usize::from(le16(b, o + 10));
        let field = format!("parent_locator.entry[{i}]");
        let get = |off: usize, len: usize| {
            if off == 0 || len == 0 || !len.is_multiple_of(2) || len > MAX_LOCATOR_TEXT {
                return None;
            }
            off.checked_add(len).and_then(|e| b.get(off..e))
        };
        let (Some(kb), Some(vb)) = (get(ko, kl), get(vo, vl)) else {
            return Err(Error::corrupt(
                &field,
                base + o as u64,
                "key or value lies outside the locator item or has an odd or zero length",
            ));
        };
        let k = utf16le(kb);
        let v = utf16le(vb);
        if entries.iter().any(|(x, _)| *x == k) {
            return Err(Error::corrupt(
                &field,
                base + o as u64,
                format!("duplicate locator key {k:?}"),
            ));
        }
        entries.push((k, v));
    }
    Ok(Locator {
        locator_type: Guid::read(b, 0),
        entries,
    })
}

/// Where the value of `key` lies in a parent locator item `b` that [`parse_locator`] accepted:
/// (offset in the item, length in bytes).
pub fn locator_value_span(b: &[u8], key: &str) -> Option<(usize, usize)> {
    let count = usize::from(le16(b, 18));
    (0..count).find_map(|i| {
        let o = 20 + 12 * i;
        let ko = le32(b, o) as usize;
        let vo = le32(b, o + 4) as usize;
        let kl = usize::from(le16(b, o + 8));
        let vl = usize::from(le16(b, o + 10));
        let kb = b.get(ko..ko.checked_add(kl)?)?;
        b.get(vo..vo.checked_add(vl)?)?;
        (utf16le(kb) == key).then_some((vo, vl))
    })
}

/// Builds the metadata region (table + items) for a new image.
pub fn metadata_region_bytes(m: &Metadata) -> Vec<u8> {
    let mut items: Vec<(Guid, u32, Vec<u8>)> = Vec::new();
    let mut fp = vec![0u8; 8];
    put32(&mut fp, 0, m.block_size);
    put32(
        &mut fp,
        4,
        u32::from(m.leave_allocated) | (u32::from(m.has_parent) << 1),
    );
    items.push((ITEM_FILE_PARAMETERS, META_IS_REQUIRED, fp));
    let vd = META_IS_REQUIRED | META_IS_VIRTUAL_DISK;
    items.push((
        ITEM_VIRTUAL_DISK_SIZE,
        vd,
        m.disk_size.to_le_bytes().to_vec(),
    ));
    items.push((ITEM_VIRTUAL_DISK_ID, vd, m.disk_id.0.to_vec()));
    items.push((
        ITEM_LOGICAL_SECTOR_SIZE,
        vd,
        m.logical.to_le_bytes().to_vec(),
    ));
    items.push((
        ITEM_PHYSICAL_SECTOR_SIZE,
        vd,
        m.physical.to_le_bytes().to_vec(),
    ));
    if let Some(l) = &m.locator {
        items.push((ITEM_PARENT_LOCATOR, META_IS_REQUIRED, l.to_bytes()));
    }
    let mut out = vec![0u8; METADATA_TABLE_SIZE as usize];
    put(&mut out, 0, METADATA_SIGNATURE);
    put16(&mut out, 10, items.len() as u16);
    for (i, (g, flags, data)) in items.iter().enumerate() {
        let o = 32 + 32 * i;
        let pos = out.len();
        put(&mut out, o, &g.0);
        put32(&mut out, o + 16, pos as u32);
        put32(&mut out, o + 20, data.len() as u32);
        put32(&mut out, o + 24, *flags);
        out.extend_from_slice(data);
    }
    out
}
