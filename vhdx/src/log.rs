//! The metadata log: finding the active sequence, replaying it (to disk or into an in-memory
//! overlay) and writing new entries.

use std::collections::BTreeMap;
use std::path::Path;

use blockdev::{Error, ErrorKind, Limits, Result, Storage};

use crate::format::*;

/// Largest amount by which replay may grow a file beyond its current length (a hostile
/// LastFileOffset or zero descriptor must not make us write exabytes).
const MAX_REPLAY_GROWTH: u64 = 1 << 40;

/// Checksummed bytes a log scan may spend, as a multiple of the log length (plus 64 MiB).
const SCAN_BUDGET_FACTOR: u64 = 16;

/// One descriptor of a log entry.
#[derive(Debug, Clone)]
pub enum Descriptor {
    /// Zero `len` bytes at `offset`.
    Zero {
        /// File offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write one 4 KiB sector at `offset`.
    Data {
        /// File offset.
        offset: u64,
        /// The reassembled 4096 bytes.
        data: Vec<u8>,
    },
}

/// A validated log entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Position in the log.
    pub pos: u64,
    /// EntryLength.
    pub length: u64,
    /// Tail.
    pub tail: u64,
    /// SequenceNumber.
    pub seq: u64,
    /// FlushedFileOffset.
    pub flushed_file_offset: u64,
    /// LastFileOffset.
    pub last_file_offset: u64,
    /// Descriptors in order.
    pub descriptors: Vec<Descriptor>,
}

/// What the scan of a log found.
#[derive(Debug, Clone, Default)]
pub struct LogScan {
    /// The entries to replay, oldest first (empty: nothing to replay).
    pub replay: Vec<Entry>,
    /// Number of valid entry headers with the right LogGuid seen anywhere in the ring.
    pub valid_entries: usize,
}

/// Reads `len` bytes at ring position `pos` of the log image `log`, wrapping.
fn ring(log: &[u8], pos: u64, len: u64) -> Vec<u8> {
    let l = log.len() as u64;
    let mut out = Vec::new();
    if l == 0 {
        return out;
    }
    let mut p = pos % l;
    let mut left = len;
    while left > 0 {
        let n = left.min(l - p);
        out.extend_from_slice(log.get(p as usize..(p + n) as usize).unwrap_or_default());
        left -= n;
        p = (p + n) % l;
    }
    out
}

/// Parses and fully validates the entry at ring position `pos`; `None` if invalid.
fn parse_entry(log: &[u8], pos: u64, guid: &Guid, budget: &mut u64) -> Option<Entry> {
    let l = log.len() as u64;
    let h = ring(log, pos, LOG_SECTOR);
    if !has_sig(&h, 0, LOG_ENTRY_SIGNATURE) {
        return None;
    }
    let length = u64::from(le32(&h, 8));
    let tail = u64::from(le32(&h, 12));
    let seq = le64(&h, 16);
    let count = u64::from(le32(&h, 24));
    if length == 0 || length % LOG_SECTOR != 0 || length > l || tail % LOG_SECTOR != 0 || tail >= l
    {
        return None;
    }
    if seq == 0 || Guid::read(&h, 32) != *guid {
        return None;
    }
    let desc_sectors = (count + 2).div_ceil(128);
    if desc_sectors > length / LOG_SECTOR {
        return None;
    }
    // Every entry that passes the cheap checks costs a checksum over its length; a hostile
    // log could make that quadratic, so the scan has a total budget.
    if length > *budget {
        *budget = 0;
        return None;
    }
    *budget -= length;
    let e = ring(log, pos, length);
    let stored = le32(&e, 4);
    if crc32c_without(&e, 4) != stored {
        return None;
    }
    let mut data_sector = desc_sectors;
    let mut descriptors = Vec::new();
    for i in 0..count {
        let o = (64 + i * 32) as usize;
        let d = e.get(o..o + 32)?;
        let off = le64(d, 16);
        if le64(d, 24) != seq || !off.is_multiple_of(LOG_SECTOR) {
            return None;
        }
        if has_sig(d, 0, ZERO_DESC_SIGNATURE) {
            let len = le64(d, 8);
            if !len.is_multiple_of(LOG_SECTOR) {
                return None;
            }
            descriptors.push(Descriptor::Zero { offset: off, len });
        } else if has_sig(d, 0, DATA_DESC_SIGNATURE) {
            if (data_sector + 1) * LOG_SECTOR > length {
                return None;
            }
            let so = (data_sector * LOG_SECTOR) as usize;
            let s = e.get(so..so + LOG_SECTOR as usize)?;
            if !has_sig(s, 0, DATA_SECTOR_SIGNATURE)
                || u64::from(le32(s, 4)) != seq >> 32
                || u64::from(le32(s, 4092)) != seq & 0xFFFF_FFFF
            {
                return None;
            }
            let mut data = vec![0u8; LOG_SECTOR as usize];
            put(&mut data, 0, d.get(8..16)?);
            put(&mut data, 8, s.get(8..4092)?);
            put(&mut data, 4092, d.get(4..8)?);
            descriptors.push(Descriptor::Data { offset: off, data });
            data_sector += 1;
        } else {
            return None;
        }
    }
    Some(Entry {
        pos,
        length,
        tail,
        seq,
        flushed_file_offset: le64(&h, 48),
        last_file_offset: le64(&h, 56),
        descriptors,
    })
}

/// Finds the active sequence of a log image (MS-VHDX §2.3.2, with the corrections of the
/// format digest §9: replay from head.Tail, LogGuid filter, wrapping entries).
pub fn scan(log: &[u8], guid: &Guid) -> Result<LogScan> {
    let l = log.len() as u64;
    let mut out = LogScan::default();
    if l == 0 || guid.is_zero() {
        return Ok(out);
    }
    let mut budget = l
        .saturating_mul(SCAN_BUDGET_FACTOR)
        .saturating_add(64 * MIB);
    let max_entries = l / LOG_SECTOR;
    let mut best: Option<Vec<Entry>> = None;
    let mut pos = 0u64;
    // Each iteration advances `pos` by at least one sector, so the loop ends after at most
    // `max_entries` iterations; a run holds at most `max_entries` entries.
    while pos < l {
        let mut run: Vec<Entry> = Vec::new();
        let mut p = pos;
        let mut advanced = 0u64;
        while (run.len() as u64) < max_entries {
            let Some(e) = parse_entry(log, p, guid, &mut budget) else {
                break;
            };
            if let Some(last) = run.last() {
                if e.seq != last.seq.wrapping_add(1) {
                    break;
                }
            }
            advanced += e.length;
            p = (p + e.length) % l;
            run.push(e);
            if p == pos || advanced >= l {
                break;
            }
        }
        out.valid_entries += run.len();
        if let Some(head) = run.last() {
            if let Some(i) = run.iter().position(|e| e.pos == head.tail) {
                let better = best
                    .as_ref()
                    .and_then(|b| b.last())
                    .is_none_or(|b| head.seq > b.seq);
                if better {
                    best = Some(run.get(i..).map(<[Entry]>::to_vec).unwrap_or_default());
                }
            }
            pos += advanced.max(LOG_SECTOR);
        } else {
            pos += LOG_SECTOR;
        }
    }
    if budget == 0 {
        return Err(Error::corrupt(
            "log",
            0,
            "the log holds too many overlapping entry candidates to scan (hostile log?)",
        ));
    }
    out.replay = best.unwrap_or_default();
    Ok(out)
}

/// Reads the log region of the file.
pub fn read_log(
    storage: &dyn Storage,
    offset: u64,
    length: u64,
    limits: &Limits,
) -> Result<Vec<u8>> {
    let mut b = blockdev::try_alloc(length, limits, "header.log_length")?;
    storage.read_at(&mut b, offset)?;
    Ok(b)
}

/// Checks the replay targets of `entries` and returns the file length after replay.
pub fn check_replay(
    entries: &[Entry],
    file_len: u64,
    log_offset: u64,
    log_length: u64,
) -> Result<u64> {
    let Some(head) = entries.last() else {
        return Ok(file_len);
    };
    let fld = |f: &str| format!("log_entry[{:#x}].{f}", head.pos);
    if head.flushed_file_offset > file_len {
        return Err(Error::corrupt(
            &fld("flushed_file_offset"),
            log_offset + head.pos + 48,
            format!(
                "the log was written when the file was {} bytes long but it is {file_len}: truncated image",
                head.flushed_file_offset
            ),
        ));
    }
    let cap = file_len.saturating_add(MAX_REPLAY_GROWTH);
    let mut end = file_len;
    if head.last_file_offset > cap {
        return Err(Error::corrupt(
            &fld("last_file_offset"),
            log_offset + head.pos + 56,
            format!(
                "last file offset {:#x} is implausibly large",
                head.last_file_offset
            ),
        ));
    }
    end = end.max(head.last_file_offset);
    let log_end = log_offset + log_length;
    for e in entries {
        for (i, d) in e.descriptors.iter().enumerate() {
            let (off, len) = match d {
                Descriptor::Zero { offset, len } => (*offset, *len),
                Descriptor::Data { offset, .. } => (*offset, LOG_SECTOR),
            };
            let t_end = off.checked_add(len).filter(|x| *x <= cap);
            let bad = match t_end {
                None => Some("runs past any plausible file size".to_string()),
                Some(te) if off < REGION_OFFSETS[0] => {
                    let _ = te;
                    Some("writes into the file identifier or headers".to_string())
                }
                Some(te) if off < log_end && log_offset < te => {
                    Some("writes into the log itself".to_string())
                }
                Some(_) => None,
            };
            if let Some(why) = bad {
                return Err(Error::corrupt(
                    &format!("log_entry[{:#x}].descriptor[{i}]", e.pos),
                    log_offset + e.pos,
                    format!("replay target [{off:#x}, +{len:#x}) {why}"),
                ));
            }
            // Data sectors written past the end grow the file; zeros there need no growth
            // (past the end reads as zeros), so only the head's LastFileOffset and data
            // sectors set the new length.
            if let Descriptor::Data { .. } = d {
                end = end.max(t_end.unwrap_or(0));
            }
        }
    }
    Ok(end)
}

/// Applies `entries` to writable storage, flushes, and grows the file as the head requires.
///
/// A zero descriptor zeroes only what the file holds: past its current end, the growth to
/// `new_len` reads as zeros already (a hostile descriptor of a terabyte must not make us
/// write one). Inside the file the range is punched out where the file system can, and
/// written with zeros where it cannot.
pub fn replay_to_disk(storage: &dyn Storage, entries: &[Entry], new_len: u64) -> Result<()> {
    let zeros = vec![0u8; MIB as usize];
    let mut cur_len = storage.len()?;
    for e in entries {
        for d in &e.descriptors {
            match d {
                Descriptor::Data { offset, data } => {
                    storage.write_at(data, *offset)?;
                    cur_len = cur_len.max(offset.saturating_add(data.len() as u64));
                }
                Descriptor::Zero { offset, len } => {
                    let end = offset.saturating_add(*len).min(cur_len);
                    if end <= *offset {
                        continue;
                    }
                    if storage.punch_hole(*offset, end - offset)? {
                        continue;
                    }
                    let mut at = *offset;
                    while at < end {
                        let n = (end - at).min(MIB);
                        storage.write_at(zeros.get(..n as usize).unwrap_or_default(), at)?;
                        at += n;
                    }
                }
            }
        }
    }
    if storage.len()? < new_len {
        storage.set_len(new_len)?;
    }
    storage.flush()
}

/// A read-only view of a file with a replayed log applied in memory.
pub struct Overlay {
    inner: Box<dyn Storage>,
    pages: BTreeMap<u64, Vec<u8>>,
    /// Zeroed ranges, start -> end, disjoint and merged: a read looks up only its own.
    zeros: BTreeMap<u64, u64>,
    len: u64,
}

impl Overlay {
    /// Builds the overlay of `entries` over `inner`; the file length becomes `new_len`.
    pub fn new(inner: Box<dyn Storage>, entries: &[Entry], new_len: u64) -> Self {
        let mut o = Overlay {
            inner,
            pages: BTreeMap::new(),
            zeros: BTreeMap::new(),
            len: new_len,
        };
        for e in entries {
            for d in &e.descriptors {
                match d {
                    Descriptor::Data { offset, data } => {
                        o.pages.insert(*offset, data.clone());
                    }
                    Descriptor::Zero { offset, len } => {
                        let end = offset.saturating_add(*len);
                        let keys: Vec<u64> = o.pages.range(*offset..end).map(|(k, _)| *k).collect();
                        for k in keys {
                            o.pages.remove(&k);
                        }
                        o.add_zeros(*offset, end);
                    }
                }
            }
        }
        o
    }

    /// Adds `[start, end)` to the zeroed ranges, merging it with those it touches.
    fn add_zeros(&mut self, mut start: u64, mut end: u64) {
        if end <= start {
            return;
        }
        let touching: Vec<(u64, u64)> = self
            .zeros
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.zeros.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.zeros.insert(start, end);
    }
}

impl Storage for Overlay {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.len)
            .ok_or_else(|| {
                Error::new(ErrorKind::Corrupt, "read past the end of the file").with_offset(offset)
            })?;
        let inner_len = self.inner.len()?;
        buf.fill(0);
        if offset < inner_len {
            let n = (inner_len - offset).min(len) as usize;
            self.inner
                .read_at(buf.get_mut(..n).unwrap_or_default(), offset)?;
        }
        // Disjoint ranges in order: those before `end` that end after `offset`.
        for (&zs, &ze) in self.zeros.range(..end).rev() {
            if ze <= offset {
                break;
            }
            let s = zs.max(offset);
            let e = ze.min(end);
            if s < e {
                if let Some(d) = buf.get_mut((s - offset) as usize..(e - offset) as usize) {
                    d.fill(0);
                }
            }
        }
        let first = offset.saturating_sub(LOG_SECTOR - 1);
        for (&po, page) in self.pages.range(first..end) {
            let s = po.max(offset);
            let e = (po + LOG_SECTOR).min(end);
            if s < e {
                let src = page
                    .get((s - po) as usize..(e - po) as usize)
                    .unwrap_or_default();
                if let Some(d) = buf.get_mut((s - offset) as usize..(e - offset) as usize) {
                    d.copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::read_only(
            "image opened read-only (log replayed in memory)",
        ))
    }

    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> Result<()> {
        Err(Error::read_only(
            "image opened read-only (log replayed in memory)",
        ))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn region_at(&self, offset: u64) -> Result<blockdev::StorageRegion> {
        Ok(blockdev::StorageRegion::Data(
            self.len.saturating_sub(offset),
        ))
    }
}

/// Most data sectors one entry can carry in a log of `log_sectors` 4 KiB sectors: each
/// takes a sector of its own, and descriptor sectors hold 128 descriptors (the first one
/// two fewer, for the entry header).
pub fn entry_capacity(log_sectors: u64) -> u64 {
    let mut n = log_sectors.saturating_sub(1);
    while n > 0 && n + (n + 2).div_ceil(128) > log_sectors {
        n -= 1;
    }
    n
}

/// Builds one log entry at ring position `pos` writing the 4 KiB `sectors` (file offset, bytes).
pub fn build_entry(
    guid: &Guid,
    seq: u64,
    pos: u64,
    tail: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    sectors: &[(u64, Vec<u8>)],
) -> Vec<u8> {
    let count = sectors.len() as u64;
    let desc_sectors = (count + 2).div_ceil(128);
    let length = (desc_sectors + count) * LOG_SECTOR;
    let mut e = vec![0u8; length as usize];
    put(&mut e, 0, LOG_ENTRY_SIGNATURE);
    put32(&mut e, 8, length as u32);
    put32(&mut e, 12, tail as u32);
    put64(&mut e, 16, seq);
    put32(&mut e, 24, count as u32);
    put(&mut e, 32, &guid.0);
    put64(&mut e, 48, flushed_file_offset);
    put64(&mut e, 56, last_file_offset);
    let _ = pos;
    for (i, (off, data)) in sectors.iter().enumerate() {
        let d = 64 + 32 * i;
        put(&mut e, d, DATA_DESC_SIGNATURE);
        put(&mut e, d + 4, data.get(4092..4096).unwrap_or(&[0; 4]));
        put(&mut e, d + 8, data.get(0..8).unwrap_or(&[0; 8]));
        put64(&mut e, d + 16, *off);
        put64(&mut e, d + 24, seq);
        let s = ((desc_sectors + i as u64) * LOG_SECTOR) as usize;
        put(&mut e, s, DATA_SECTOR_SIGNATURE);
        put32(&mut e, s + 4, (seq >> 32) as u32);
        put(&mut e, s + 8, data.get(8..4092).unwrap_or_default());
        put32(&mut e, s + 4092, seq as u32);
    }
    let crc = crc32c(&e);
    put32(&mut e, 4, crc);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_capacity_fills_the_log_and_no_more() {
        let one = [0u8; 4096];
        for sectors in [3u64, 128, 130, 256, 512, 1024, 3840, 4096, 8192] {
            let n = entry_capacity(sectors);
            let fits = |n: u64| {
                let list: Vec<(u64, Vec<u8>)> = (0..n).map(|i| (i * 4096, one.to_vec())).collect();
                build_entry(&Guid::ZERO, 1, 0, 0, 0, 0, &list).len() as u64 <= sectors * 4096
            };
            assert!(fits(n), "{sectors} sectors: {n} do not fit");
            assert!(!fits(n + 1), "{sectors} sectors: {} would fit too", n + 1);
        }
    }

    #[test]
    fn entry_roundtrip_and_wrap() {
        let g = Guid([7; 16]);
        let l = 64 * 1024usize;
        let mut log = vec![0u8; l];
        let mut sec = vec![0u8; 4096];
        for (i, b) in sec.iter_mut().enumerate() {
            *b = i as u8;
        }
        // An entry of 2 sectors at the last sector of the ring wraps to position 0.
        let e = build_entry(
            &g,
            9,
            60 * 1024,
            60 * 1024,
            MIB,
            MIB,
            &[(3 * MIB, sec.clone())],
        );
        assert_eq!(e.len(), 8192);
        log[60 * 1024..].copy_from_slice(&e[..4096]);
        log[..4096].copy_from_slice(&e[4096..]);
        let s = scan(&log, &g).unwrap();
        assert_eq!(s.replay.len(), 1);
        match &s.replay[0].descriptors[0] {
            Descriptor::Data { offset, data } => {
                assert_eq!(*offset, 3 * MIB);
                assert_eq!(data, &sec);
            }
            Descriptor::Zero { .. } => panic!(),
        }
        // A different LogGuid hides it.
        assert!(scan(&log, &Guid([8; 16])).unwrap().replay.is_empty());
    }
}
