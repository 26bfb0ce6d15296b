//! In-place writes: cluster allocation in crash-safe order (`hostile-inputs.md` §3.1).
//!
//! Every metadata change is written through to the file immediately, in this order:
//!
//! 1. data (with copy-on-write of the rest of the cluster from the old content/backing);
//! 2. refcount of the new cluster (allocating a refcount block, or growing the refcount table,
//!    first when needed: new blocks and table are written whole, then published);
//! 3. the L2 entry (a new L2 table is written whole, refcounted, then linked from the L1);
//! 4. only then the old cluster's refcount is dropped.
//!
//! An I/O error at any step therefore leaves at most leaked clusters, never a reference to
//! a cluster whose refcount is zero. Writes are serialized by the image's allocation mutex;
//! reads never take it.

use std::collections::HashMap;

use blockdev::{check_range, BlockDevice, Error, Limits, Result, Storage};

use crate::format::*;
use crate::header::Header;
use crate::image::{poisoned, read_table, Qcow2Image};
use crate::table::Mapping;

/// Allocation state of a writable image, behind the image's allocation mutex.
#[derive(Debug, Default)]
pub struct AllocState {
    reftable: Vec<u64>,
    next_free: u64,
    blocks: HashMap<u64, Vec<u8>>,
    prepared: bool,
}

impl AllocState {
    pub(crate) fn new(
        storage: &dyn Storage,
        h: &Header,
        limits: &Limits,
        writable: bool,
    ) -> Result<Self> {
        if !writable {
            return Ok(AllocState::default());
        }
        let cs = h.cluster_size();
        let bytes = u64::from(h.refcount_table_clusters) * cs;
        let raw = read_table(
            storage,
            h.refcount_table_offset,
            bytes,
            limits,
            "refcount_table",
        )?;
        let reftable = decode_u64s(&raw);
        Ok(AllocState {
            reftable,
            next_free: storage.len()?.div_ceil(cs),
            blocks: HashMap::new(),
            prepared: false,
        })
    }
}

type St<'a> = std::sync::MutexGuard<'a, AllocState>;

impl Qcow2Image {
    fn epb(&self) -> u64 {
        let order = self.header.read().map(|h| h.refcount_order).unwrap_or(4);
        self.cs() * 8 / (1u64 << order)
    }

    fn order(&self) -> u32 {
        self.header.read().map(|h| h.refcount_order).unwrap_or(4)
    }

    fn block_bytes<'a>(&self, st: &'a mut St<'_>, off: u64) -> Result<&'a mut Vec<u8>> {
        if !st.blocks.contains_key(&off) {
            if st.blocks.len() > 256 {
                st.blocks.clear();
            }
            let b = read_table(
                self.storage.as_ref(),
                off,
                self.cs(),
                &self.limits,
                "refcount_block",
            )?;
            st.blocks.insert(off, b);
        }
        st.blocks.get_mut(&off).ok_or_else(|| {
            Error::corrupt("refcount_block", off, "refcount block vanished from cache")
        })
    }

    /// Stored refcount of host cluster `c`.
    pub(crate) fn refcount(&self, st: &mut St<'_>, c: u64) -> Result<u64> {
        let epb = self.epb();
        let idx = usize::try_from(c / epb).unwrap_or(usize::MAX);
        let Some(&e) = st.reftable.get(idx) else {
            return Ok(0);
        };
        let off = e & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let order = self.order();
        let b = self.block_bytes(st, off)?;
        Ok(refcount_get(
            b,
            order,
            usize::try_from(c % epb).unwrap_or(0),
        ))
    }

    /// Finds `n` free clusters at the end of the image (never reusing freed space).
    fn alloc_clusters(&self, st: &mut St<'_>, n: u64) -> Result<u64> {
        let cs = self.cs();
        let mut start = st.next_free.max(self.storage.len()?.div_ceil(cs)).max(1);
        'outer: loop {
            for k in 0..n {
                if self.refcount(st, start + k)? != 0 {
                    start += k + 1;
                    continue 'outer;
                }
            }
            break;
        }
        st.next_free = start + n;
        Ok(start * cs)
    }

    fn write_refcount_entry(&self, st: &mut St<'_>, block_off: u64, i: u64, v: u64) -> Result<()> {
        let order = self.order();
        let b = self.block_bytes(st, block_off)?;
        let iu = usize::try_from(i).unwrap_or(0);
        refcount_set(b, order, iu, v);
        let (start, len) = if order <= 3 {
            ((iu << order) / 8, 1usize)
        } else {
            let w = 1usize << (order - 3);
            (iu * w, w)
        };
        let bytes = b
            .get(start..start + len)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        self.storage.write_at(&bytes, block_off + start as u64)
    }

    /// The refcount block covering cluster `c`, allocating it (and growing the table) if needed.
    fn ensure_block(&self, st: &mut St<'_>, c: u64) -> Result<u64> {
        let cs = self.cs();
        let epb = self.epb();
        let idx = c / epb;
        if idx >= st.reftable.len() as u64 {
            self.grow_reftable(st, idx)?;
        }
        let iu = usize::try_from(idx).unwrap_or(usize::MAX);
        let e = st.reftable.get(iu).copied().unwrap_or(0) & REFTABLE_OFFSET_MASK;
        if e != 0 {
            if !e.is_multiple_of(cs) {
                return Err(Error::corrupt(
                    "refcount_table",
                    e,
                    "refcount block not cluster aligned",
                ));
            }
            let h = self.header.read().map_err(|_| poisoned())?.clone();
            let l1_end = h.l1_table_offset + u64::from(h.l1_size) * 8;
            let rt_end = h.refcount_table_offset + u64::from(h.refcount_table_clusters) * cs;
            if e < cs
                || (e.saturating_add(cs) > h.l1_table_offset && e < l1_end)
                || (e.saturating_add(cs) > h.refcount_table_offset && e < rt_end)
            {
                return Err(Error::corrupt(
                    "refcount_table",
                    e,
                    "refcount block overlaps other metadata: refusing to write",
                ));
            }
            return Ok(e);
        }
        let b = self.alloc_clusters(st, 1)?;
        let bc = b / cs;
        let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        let self_covering = bc / epb == idx;
        if self_covering {
            refcount_set(
                &mut block,
                self.order(),
                usize::try_from(bc % epb).unwrap_or(0),
                1,
            );
        }
        self.storage.write_at(&block, b)?;
        st.blocks.insert(b, block);
        if !self_covering {
            self.update_refcount(st, bc, 1)?;
        }
        // The block must be durable before the table points at it.
        self.storage.flush()?;
        let rt_off = self
            .header
            .read()
            .map_err(|_| poisoned())?
            .refcount_table_offset;
        self.storage
            .write_at(&(b).to_be_bytes(), rt_off + idx * 8)?;
        if let Some(x) = st.reftable.get_mut(iu) {
            *x = b;
        }
        Ok(b)
    }

    /// Adds `delta` to the refcount of host cluster `c`.
    pub(crate) fn update_refcount(&self, st: &mut St<'_>, c: u64, delta: i64) -> Result<()> {
        let epb = self.epb();
        let block = if delta > 0 {
            self.ensure_block(st, c)?
        } else {
            let idx = usize::try_from(c / epb).unwrap_or(usize::MAX);
            let e = st.reftable.get(idx).copied().unwrap_or(0) & REFTABLE_OFFSET_MASK;
            if e == 0 {
                return Err(Error::corrupt(
                    "refcount_table",
                    c * self.cs(),
                    "freeing a cluster without a refcount block",
                ));
            }
            e
        };
        let cur = self.refcount(st, c)?;
        let new = if delta >= 0 {
            cur.checked_add(delta.unsigned_abs())
        } else {
            cur.checked_sub(delta.unsigned_abs())
        }
        .filter(|&v| v <= refcount_max(self.order()))
        .ok_or_else(|| {
            Error::corrupt(
                "refcount_block",
                c * self.cs(),
                format!("refcount of cluster {c} would leave its range ({cur} {delta:+})"),
            )
        })?;
        self.write_refcount_entry(st, block, c % epb, new)
    }

    /// Writes a bigger refcount table (with the blocks describing it), then switches the header.
    fn grow_reftable(&self, st: &mut St<'_>, need_idx: u64) -> Result<()> {
        let cs = self.cs();
        let epb = self.epb();
        let old = st.reftable.clone();
        let old_off = self
            .header
            .read()
            .map_err(|_| poisoned())?
            .refcount_table_offset;
        let old_clusters = (old.len() as u64 * 8).div_ceil(cs);
        let mut entries = (need_idx + 1).max(old.len() as u64 * 2);
        let (start, t, new_blocks) = loop {
            let t = (entries * 8).div_ceil(cs);
            let cursor = st.next_free.max(self.storage.len()?.div_ceil(cs));
            let missing = |i: u64| {
                old.get(usize::try_from(i).unwrap_or(usize::MAX))
                    .is_none_or(|e| e & REFTABLE_OFFSET_MASK == 0)
            };
            let mut k = 0u64;
            let mut blocks: Vec<u64>;
            loop {
                let end = cursor + t + k;
                blocks = (cursor / epb..=(end - 1) / epb)
                    .filter(|&i| missing(i))
                    .collect();
                if blocks.len() as u64 == k {
                    break;
                }
                k = blocks.len() as u64;
            }
            if blocks.iter().any(|&i| i >= entries) {
                entries *= 2;
                continue;
            }
            if (t * cs) > MAX_REFTABLE_BYTES {
                return Err(Error::limit(
                    "refcount_table",
                    old_off,
                    "refcount table would exceed 8 MiB",
                ));
            }
            let start = self.alloc_clusters(st, t + k)? / cs;
            if start != cursor {
                // Clusters at the cursor are in use: plan again from the free run found, which
                // moves forward every time (retrying at the same cursor never ended).
                st.next_free = start;
                continue;
            }
            break (start, t, blocks);
        };
        let k = new_blocks.len() as u64;
        let end = start + t + k;
        let order = self.order();
        let mut table = old.clone();
        table.resize(usize::try_from(t * cs / 8).unwrap_or(0), 0);
        // New blocks, each holding the counts of the new clusters in its range.
        for (j, &idx) in new_blocks.iter().enumerate() {
            let boff = (start + t + j as u64) * cs;
            let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
            for c in start..end {
                if c / epb == idx {
                    refcount_set(&mut block, order, usize::try_from(c % epb).unwrap_or(0), 1);
                }
            }
            self.storage.write_at(&block, boff)?;
            st.blocks.insert(boff, block);
            if let Some(x) = table.get_mut(usize::try_from(idx).unwrap_or(usize::MAX)) {
                *x = boff;
            }
        }
        // Existing blocks covering some of the new clusters.
        for c in start..end {
            let idx = c / epb;
            if !new_blocks.contains(&idx) {
                let b = old
                    .get(usize::try_from(idx).unwrap_or(usize::MAX))
                    .copied()
                    .unwrap_or(0)
                    & REFTABLE_OFFSET_MASK;
                let cur = self.refcount(st, c)?;
                self.write_refcount_entry(st, b, c % epb, cur + 1)?;
            }
        }
        self.storage.write_at(&encode_u64s(&table), start * cs)?;
        self.storage.flush()?;
        // Publish: one 12-byte header write.
        let mut hb = [0u8; 12];
        put64(&mut hb, 0, start * cs);
        put32(&mut hb, 8, u32::try_from(t).unwrap_or(u32::MAX));
        self.storage.write_at(&hb, 48)?;
        self.storage.flush()?;
        {
            let mut h = self.header.write().map_err(|_| poisoned())?;
            h.refcount_table_offset = start * cs;
            h.refcount_table_clusters = u32::try_from(t).unwrap_or(u32::MAX);
        }
        st.reftable = table;
        // Free the old table.
        for c in 0..old_clusters {
            self.update_refcount(st, old_off / cs + c, -1)?;
        }
        Ok(())
    }

    /// First write: clear autoclear bits we do not maintain (bitmaps become stale).
    fn prepare_write(&self, st: &mut St<'_>) -> Result<()> {
        if st.prepared {
            return Ok(());
        }
        let (v3, autoclear) = {
            let h = self.header.read().map_err(|_| poisoned())?;
            (h.version >= 3, h.autoclear)
        };
        if v3 && autoclear != 0 {
            self.storage.write_at(&0u64.to_be_bytes(), 88)?;
            self.header.write().map_err(|_| poisoned())?.autoclear = 0;
        }
        st.prepared = true;
        Ok(())
    }

    /// Refuses in-place writes into metadata (a hostile L2 entry pointing at tables).
    fn check_overlap(&self, st: &mut St<'_>, host: u64) -> Result<()> {
        let cs = self.cs();
        let h = self.header.read().map_err(|_| poisoned())?.clone();
        let l1_end = self.l1_offset + u64::from(h.l1_size) * 8;
        let rt_end = h.refcount_table_offset + u64::from(h.refcount_table_clusters) * cs;
        let hit = host < cs
            || (host + cs > self.l1_offset && host < l1_end)
            || (host + cs > h.refcount_table_offset && host < rt_end)
            || st
                .reftable
                .iter()
                .any(|&e| e & REFTABLE_OFFSET_MASK == host);
        if hit {
            return Err(Error::corrupt(
                "l2_entry",
                host,
                "cluster overlaps image metadata: refusing to write",
            ));
        }
        if self.refcount(st, host / cs)? != 1 {
            return Err(Error::corrupt(
                "l2_entry",
                host,
                "cluster marked COPIED does not have refcount 1: refusing to write in place",
            ));
        }
        Ok(())
    }

    /// Points guest cluster `gc` at `entry`, allocating its L2 table when needed.
    fn set_l2_entry(&self, st: &mut St<'_>, gc: u64, entry: u64) -> Result<()> {
        let cs = self.cs();
        let n = self.l2_entries();
        let l1_idx = gc / n;
        let l2_idx = gc % n;
        let l1e = self.l1_entry(l1_idx)?;
        let l1_at = self.l1_offset + l1_idx * 8;
        let l2_off = self.geo.decode_l1(l1e, "l1_entry", l1_at)?;
        if l2_off == 0 {
            let l = self.alloc_clusters(st, 1)?;
            let mut t = vec![0u64; usize::try_from(n).unwrap_or(0)];
            if let Some(x) = t.get_mut(usize::try_from(l2_idx).unwrap_or(usize::MAX)) {
                *x = entry;
            }
            self.storage.write_at(&encode_u64s(&t), l)?;
            self.update_refcount(st, l / cs, 1)?;
            // Table and refcount durable before the L1 entry publishes them.
            self.storage.flush()?;
            let new_l1 = l | OFLAG_COPIED;
            self.storage.write_at(&new_l1.to_be_bytes(), l1_at)?;
            {
                let mut l1 = self.l1.write().map_err(|_| poisoned())?;
                if let Some(x) = l1.get_mut(usize::try_from(l1_idx).unwrap_or(usize::MAX)) {
                    *x = new_l1;
                }
            }
            self.l2_cache.insert(l, std::sync::Arc::new(t));
            return Ok(());
        }
        if l1e & OFLAG_COPIED == 0 {
            return Err(Error::corrupt(
                "l1_entry",
                l1_at,
                "L2 table is shared (no COPIED flag): refusing to write in place",
            ));
        }
        self.check_overlap(st, l2_off)?;
        let t = self.l2_table(l2_off)?;
        self.storage
            .write_at(&entry.to_be_bytes(), l2_off + l2_idx * 8)?;
        let mut t2 = (*t).clone();
        if let Some(x) = t2.get_mut(usize::try_from(l2_idx).unwrap_or(usize::MAX)) {
            *x = entry;
        }
        self.l2_cache.insert(l2_off, std::sync::Arc::new(t2));
        Ok(())
    }

    /// Drops the references an old mapping held (after the new entry is written).
    fn release(&self, st: &mut St<'_>, old: Mapping) -> Result<()> {
        let cs = self.cs();
        match old {
            Mapping::Normal { host, .. } | Mapping::Zero { host: Some(host) } => {
                self.update_refcount(st, host / cs, -1)
            }
            Mapping::Compressed { offset, len } => {
                // qemu counts every host cluster the sector range touches.
                let first = (offset & !511) / cs;
                let last = ((offset & !511) + len.max(1) - 1 + (offset & 511)) / cs;
                let last = last.max(first);
                for c in first..=last {
                    self.update_refcount(st, c, -1)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn writable_guard(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("qcow2 image opened read-only"));
        }
        Ok(())
    }

    pub(crate) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable_guard()?;
        check_range(self.size(), offset, buf.len() as u64)?;
        let mut st = self.alloc.lock().map_err(|_| poisoned())?;
        self.prepare_write(&mut st)?;
        let cs = self.cs();
        // Phase 1: in-place writes, and data of new clusters.
        let mut new: Vec<(u64, u64, Mapping)> = Vec::new();
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = offset + pos as u64;
            let gc = g / cs;
            let within = g % cs;
            let n = usize::try_from((cs - within).min((buf.len() - pos) as u64)).unwrap_or(0);
            let part = buf.get(pos..pos + n).unwrap_or_default();
            if let Some((host, old)) = self.write_cluster(&mut st, gc, within, part)? {
                new.push((gc, host, old));
            }
            pos += n;
        }
        self.link_new(&mut st, &new)
    }

    /// Phases 2-4 of an allocating write: refcounts, barrier, L2 entries, barrier, release.
    fn link_new(&self, st: &mut St<'_>, new: &[(u64, u64, Mapping)]) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        let cs = self.cs();
        for &(_, host, _) in new {
            self.update_refcount(st, host / cs, 1)?;
        }
        // Data and refcounts durable before any mapping points at them.
        self.storage.flush()?;
        for &(gc, host, _) in new {
            self.set_l2_entry(st, gc, host | OFLAG_COPIED)?;
        }
        self.release_all(st, new.iter().map(|&(_, _, old)| old))
    }

    /// Drops old references once the new mappings are durable (a crash then leaks, never
    /// frees a cluster still referenced).
    fn release_all(&self, st: &mut St<'_>, old: impl Iterator<Item = Mapping>) -> Result<()> {
        let old: Vec<Mapping> = old
            .filter(|m| {
                matches!(
                    m,
                    Mapping::Normal { .. }
                        | Mapping::Zero { host: Some(_) }
                        | Mapping::Compressed { .. }
                )
            })
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        self.storage.flush()?;
        for m in old {
            self.release(st, m)?;
        }
        Ok(())
    }

    /// Writes part of guest cluster `gc`: in place when it owns its cluster, otherwise into a
    /// new cluster whose (host, old mapping) is returned for linking.
    fn write_cluster(
        &self,
        st: &mut St<'_>,
        gc: u64,
        within: u64,
        part: &[u8],
    ) -> Result<Option<(u64, Mapping)>> {
        let cs = self.cs();
        let m = self.lookup(gc)?;
        if let Mapping::Normal { host, copied: true } = m {
            self.check_overlap(st, host)?;
            self.storage.write_at(part, host + within)?;
            return Ok(None);
        }
        // New cluster: old content (backing, zeros, compressed) under the new bytes.
        let mut data = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        let full = within == 0 && part.len() as u64 == cs;
        if !full {
            let guest = gc * cs;
            let len = cs.min(self.size() - guest);
            if let Some(d) = data.get_mut(..usize::try_from(len).unwrap_or(0)) {
                self.read_at(d, guest)?;
            }
        }
        let w = usize::try_from(within).unwrap_or(0);
        if let Some(d) = data.get_mut(w..w + part.len()) {
            d.copy_from_slice(part);
        }
        let host = self.alloc_clusters(st, 1)?;
        self.storage.write_at(&data, host)?;
        Ok(Some((host, m)))
    }

    pub(crate) fn write_zeroes_impl(&self, offset: u64, len: u64, deallocate: bool) -> Result<()> {
        self.writable_guard()?;
        check_range(self.size(), offset, len)?;
        let cs = self.cs();
        let v3 = self.geo.v3;
        let has_backing = self
            .header
            .read()
            .map_err(|_| poisoned())?
            .backing_file
            .is_some();
        let mut batch: Vec<u64> = Vec::new();
        let mut g = offset;
        let end = offset + len;
        while g < end {
            let gc = g / cs;
            let within = g % cs;
            let n = (cs - within).min(end - g);
            let whole = n == cs || (within == 0 && g + n == self.size());
            let m = self.lookup(gc)?;
            let already_zero = match m {
                Mapping::Zero { .. } => true,
                Mapping::Unallocated => !has_backing,
                _ => false,
            };
            if already_zero {
                g += n;
                continue;
            }
            if !whole || (!v3 && has_backing) {
                let z = vec![0u8; usize::try_from(n).unwrap_or(0)];
                self.write_impl(&z, g)?;
                g += n;
                continue;
            }
            batch.push(gc);
            if batch.len() >= 4096 {
                self.zero_batch(&mut batch, deallocate || !v3, has_backing)?;
            }
            g += n;
        }
        self.zero_batch(&mut batch, deallocate || !v3, has_backing)?;
        Ok(())
    }

    /// Points whole clusters at zero (or nothing), then frees what they held: one barrier.
    /// Mappings are looked up again under the allocation lock.
    fn zero_batch(&self, batch: &mut Vec<u64>, deallocate: bool, has_backing: bool) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut st = self.alloc.lock().map_err(|_| poisoned())?;
        self.prepare_write(&mut st)?;
        let mut old = Vec::new();
        for gc in batch.drain(..) {
            match self.lookup(gc)? {
                Mapping::Normal { host, copied: true } if !deallocate => {
                    self.set_l2_entry(&mut st, gc, host | OFLAG_ZERO | OFLAG_COPIED)?;
                }
                m => {
                    self.set_l2_entry(&mut st, gc, if has_backing { OFLAG_ZERO } else { 0 })?;
                    old.push(m);
                }
            }
        }
        self.release_all(&mut st, old.into_iter())
    }
}

/// Grows the qcow2 image in `storage` to `new_size` bytes in place, as `qemu-img resize`
/// does when growing. `gate` opens its backing file (read-only), if it names one: where the
/// backing file is longer than the image, the new range is first marked zero so that it reads
/// as zeros, not as the backing file's bytes that the old size hid (qemu does the same; a v2
/// image cannot mark zeros and is refused then, as qemu refuses it).
///
/// Crash-safe: a larger L1 table is written and refcounted, then switched in by one header
/// write; the new range is zeroed beyond the old size, where nothing reads it yet; only then
/// does one more header write change the size. A crash leaves the old image or the grown
/// one, at worst with leaked clusters. Shrinking is refused, and so are images that cannot be
/// written in place (internal snapshots, extended L2 entries, an external data file).
pub fn grow(
    storage: Box<dyn Storage>,
    gate: &dyn blockdev::OpenGate,
    new_size: u64,
    limits: &Limits,
) -> Result<()> {
    let opts = crate::OpenOptions {
        writable: true,
        limits: limits.clone(),
        ..crate::OpenOptions::default()
    };
    let mut img = Qcow2Image::open(storage, gate, &opts)?;
    img.grow_to(new_size)
}

impl Qcow2Image {
    fn grow_to(&mut self, new_size: u64) -> Result<()> {
        self.writable_guard()?;
        let old_size = self.size();
        if new_size < old_size {
            return Err(Error::invalid_argument(format!(
                "shrinking a qcow2 image ({old_size} -> {new_size} bytes) is not supported"
            )));
        }
        if new_size == old_size {
            return Ok(());
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid_argument(format!(
                "a qcow2 size must be a multiple of 512 bytes (got {new_size})"
            )));
        }
        let names_backing = self
            .header
            .read()
            .map_err(|_| poisoned())?
            .backing_file
            .is_some();
        let backing_len = match &self.backing {
            Some(b) => b.size(),
            None if names_backing => {
                return Err(Error::new(
                    blockdev::ErrorKind::BackingNotFound,
                    "growing an image needs its backing file (the new range must hide it)",
                ))
            }
            None => 0,
        };
        // What the backing file would show past the old end: it must read as zeros.
        let zero_end = backing_len.min(new_size);
        if zero_end > old_size && !self.geo.v3 {
            return Err(Error::unsupported(
                "a version 2 (compat=0.10) image cannot mark the new range zero over its longer backing file: upgrade it to version 3 first",
            ));
        }
        let cs = self.cs();
        let per_entry = cs
            .checked_mul(self.l2_entries())
            .ok_or_else(|| Error::invalid_argument("cluster geometry overflows"))?;
        let need = new_size.div_ceil(per_entry);
        if need.saturating_mul(8) > MAX_L1_BYTES {
            return Err(Error::limit(
                "l1_size",
                36,
                format!(
                    "{new_size} bytes need an L1 table of {need} entries, past the format's limit"
                ),
            ));
        }
        self.grow_l1(need)?;
        if zero_end > old_size {
            // Zeroed beyond the old end (nothing reads there yet): the size, in memory only,
            // lets the write path reach the range.
            self.header.write().map_err(|_| poisoned())?.size = new_size;
            let zeroed = self
                .write_zeroes_impl(old_size, zero_end - old_size, false)
                .and_then(|()| self.storage.flush());
            if let Err(e) = zeroed {
                self.header.write().map_err(|_| poisoned())?.size = old_size;
                return Err(e);
            }
        }
        self.storage.write_at(&new_size.to_be_bytes(), 24)?;
        self.storage.flush()?;
        self.header.write().map_err(|_| poisoned())?.size = new_size;
        Ok(())
    }

    /// Moves the active L1 to a new table of `need` entries when it has fewer.
    fn grow_l1(&mut self, need: u64) -> Result<()> {
        let cs = self.cs();
        let (old_entries, old_off) = {
            let h = self.header.read().map_err(|_| poisoned())?;
            (h.l1_size, h.l1_table_offset)
        };
        let mut st = self.alloc.lock().map_err(|_| poisoned())?;
        self.prepare_write(&mut st)?;
        if need <= u64::from(old_entries) {
            return Ok(());
        }
        let entries = u32::try_from(need).map_err(|_| Error::invalid_argument("L1 too large"))?;
        let clusters = (need * 8).div_ceil(cs);
        let start = self.alloc_clusters(&mut st, clusters)?;
        let mut table = self.l1.read().map_err(|_| poisoned())?.clone();
        table.resize(usize::try_from(clusters * cs / 8).unwrap_or(0), 0);
        self.storage.write_at(&encode_u64s(&table), start)?;
        for c in 0..clusters {
            self.update_refcount(&mut st, start / cs + c, 1)?;
        }
        // The new table and its refcounts durable before the header points at them.
        self.storage.flush()?;
        // One write: l1_size (36) and l1_table_offset (40) switch together.
        let mut hb = [0u8; 12];
        put32(&mut hb, 0, entries);
        put64(&mut hb, 4, start);
        self.storage.write_at(&hb, 36)?;
        self.storage.flush()?;
        {
            let mut h = self.header.write().map_err(|_| poisoned())?;
            h.l1_size = entries;
            h.l1_table_offset = start;
        }
        self.l1_offset = start;
        table.truncate(usize::try_from(need).unwrap_or(0));
        *self.l1.write().map_err(|_| poisoned())? = table;
        // Only now the old table's clusters (a crash before this leaks them).
        if old_entries > 0 {
            let first = old_off / cs;
            let last = (old_off + u64::from(old_entries) * 8 - 1) / cs;
            for c in first..=last {
                self.update_refcount(&mut st, c, -1)?;
            }
        }
        self.storage.flush()
    }
}
