//! The internal snapshot table.

use blockdev::{Error, Limits, Result, Storage};

use crate::format::*;
use crate::header::Header;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries of the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Guest disk size at snapshot time, when recorded.
    pub disk_size: Option<u64>,
    /// Offset of this entry in the file.
    pub entry_offset: u64,
    /// Bytes of this entry (padded).
    pub entry_len: u64,
}

/// Reads and validates the snapshot table.
pub fn read_snapshots(storage: &dyn Storage, h: &Header, limits: &Limits) -> Result<Vec<Snapshot>> {
    let n = h.nb_snapshots;
    if n == 0 {
        return Ok(Vec::new());
    }
    let cs = h.cluster_size();
    let file_len = storage.len()?;
    let start = h.snapshots_offset;
    if !start.is_multiple_of(cs) || start >= file_len {
        return Err(Error::corrupt(
            "snapshots_offset",
            64,
            format!("snapshot table offset {start:#x} invalid"),
        ));
    }
    let avail = (file_len - start).min(MAX_SNAPSHOT_TABLE);
    let mut table = blockdev::try_alloc(avail, limits, "snapshot_table")?;
    storage.read_at(&mut table, start)?;
    let mut out = Vec::new();
    let mut off = 0usize;
    for i in 0..n {
        let field = format!("snapshot[{i}]");
        let at = start + off as u64;
        let fixed = table
            .get(off..off + 40)
            .ok_or_else(|| Error::corrupt(&field, at, "snapshot entry runs past the table"))?;
        let l1_table_offset = be64(fixed, 0);
        let l1_size = be32(fixed, 8);
        let id_len = usize::from(be16(fixed, 12));
        let name_len = usize::from(be16(fixed, 14));
        let extra_len = be32(fixed, 36);
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(Error::corrupt(
                &field,
                at + 36,
                "snapshot extra data too large",
            ));
        }
        let extra_len = extra_len as usize;
        let extra = table
            .get(off + 40..off + 40 + extra_len)
            .ok_or_else(|| Error::corrupt(&field, at, "snapshot extra data runs past the table"))?;
        let vs_start = off + 40 + extra_len;
        let id = table
            .get(vs_start..vs_start + id_len)
            .ok_or_else(|| Error::corrupt(&field, at, "snapshot id runs past the table"))?;
        let name = table
            .get(vs_start + id_len..vs_start + id_len + name_len)
            .ok_or_else(|| Error::corrupt(&field, at, "snapshot name runs past the table"))?;
        let mut vm_state_size = u64::from(be32(fixed, 32));
        if extra_len >= 8 {
            vm_state_size = be64(extra, 0);
        }
        let disk_size = if extra_len >= 16 {
            Some(be64(extra, 8))
        } else {
            None
        };
        let len = (40 + extra_len + id_len + name_len).div_ceil(8) * 8;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec: be32(fixed, 16),
            date_nsec: be32(fixed, 20),
            vm_clock_nsec: be64(fixed, 24),
            vm_state_size,
            disk_size,
            entry_offset: at,
            entry_len: len as u64,
        });
        off += len;
    }
    Ok(out)
}

/// Checks a snapshot's L1 table location (Q16).
pub fn check_snapshot_l1(s: &Snapshot, cs: u64, file_len: u64) -> Result<()> {
    let field = format!("snapshot '{}' l1_table_offset", s.name);
    if !s.l1_table_offset.is_multiple_of(cs) || s.l1_table_offset == 0 {
        return Err(Error::corrupt(
            &field,
            s.entry_offset,
            format!("snapshot L1 table offset {:#x} invalid", s.l1_table_offset),
        ));
    }
    let bytes = u64::from(s.l1_size) * 8;
    if bytes > MAX_L1_BYTES {
        return Err(Error::corrupt(
            &field,
            s.entry_offset + 8,
            format!("snapshot L1 table too large ({} entries)", s.l1_size),
        ));
    }
    match s.l1_table_offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(
            &field,
            s.entry_offset,
            "snapshot L1 table runs past the end of the file",
        )),
    }
}
