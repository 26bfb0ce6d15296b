//! The sequential writer behind `convert -O qcow2` and `create`.
//!
//! Data clusters are laid out in guest order right after the header cluster; compressed
//! clusters are packed byte by byte (compressed on worker threads, written in order). L2
//! tables, the L1 table and the refcount structures are computed in memory and written once
//! by [`ImageWriter::finish`], the header last, then the file is flushed.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use blockdev::{Error, ErrorKind, ImageWriter, Result, Storage};

use crate::compress::Compressor;
pub use crate::create::{CreateOptions, Preallocation};
use crate::format::*;
use crate::header::Header;

struct Job {
    seq: u64,
    gc: u64,
    data: Vec<u8>,
}

struct Done {
    seq: u64,
    gc: u64,
    data: Vec<u8>,
    result: Result<Option<Vec<u8>>>,
}

struct Pool {
    tx: Option<mpsc::SyncSender<Job>>,
    rx: mpsc::Receiver<Done>,
    handles: Vec<JoinHandle<()>>,
    next_seq: u64,
    next_write: u64,
    ready: BTreeMap<u64, Done>,
    max_inflight: u64,
}

impl Pool {
    fn new(threads: usize, kind: u8) -> Result<Pool> {
        let (tx, jobs) = mpsc::sync_channel::<Job>(threads * 4);
        let jobs = Arc::new(Mutex::new(jobs));
        let (done_tx, rx) = mpsc::channel::<Done>();
        let mut handles = Vec::new();
        for _ in 0..threads {
            let jobs = jobs.clone();
            let done_tx = done_tx.clone();
            let mut comp = Compressor::new(kind)?;
            handles.push(std::thread::spawn(move || loop {
                let job = match jobs.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok(job) = job else { return };
                let result = comp.compress(&job.data);
                if done_tx
                    .send(Done {
                        seq: job.seq,
                        gc: job.gc,
                        data: job.data,
                        result,
                    })
                    .is_err()
                {
                    return;
                }
            }));
        }
        Ok(Pool {
            tx: Some(tx),
            rx,
            handles,
            next_seq: 0,
            next_write: 0,
            ready: BTreeMap::new(),
            max_inflight: threads as u64 * 8,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A new qcow2 image written front to back (see the module docs).
pub struct Qcow2Writer {
    storage: Box<dyn Storage>,
    opts: CreateOptions,
    cs: u64,
    /// Next free host cluster.
    next: u64,
    /// L2 entries by L1 index.
    l2: BTreeMap<u64, Vec<u64>>,
    /// Refcounts of host clusters of the data area (index = host cluster).
    refs: Vec<u32>,
    /// A partly written guest cluster.
    pending: Option<(u64, Vec<u8>)>,
    pool: Option<Pool>,
    /// Buffered uncompressed clusters: (first host cluster, bytes).
    ubuf: (u64, Vec<u8>),
    /// The host cluster being filled with compressed streams, and its bytes so far.
    cbuf: (Option<u64>, Vec<u8>),
}

impl std::fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

const WBUF: usize = 4 << 20;

impl Qcow2Writer {
    /// A writer of a new image with `opts` onto the empty `storage`.
    /// The virtual size is rounded up to a whole 512-byte sector, as qemu does.
    pub fn new(storage: Box<dyn Storage>, mut opts: CreateOptions) -> Result<Self> {
        opts.validate()?;
        opts.size = opts.size.div_ceil(512) * 512;
        let cs = 1u64 << opts.cluster_bits;
        let pool = if opts.compress {
            let threads = if opts.threads == 0 {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            } else {
                opts.threads
            };
            Some(Pool::new(threads, opts.compression_type)?)
        } else {
            None
        };
        Ok(Qcow2Writer {
            storage,
            cs,
            next: 1,
            l2: BTreeMap::new(),
            refs: Vec::new(),
            pending: None,
            pool,
            ubuf: (1, Vec::new()),
            cbuf: (None, Vec::new()),
            opts,
        })
    }

    fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    fn set_entry(&mut self, gc: u64, e: u64) {
        let n = self.l2_entries();
        let t = self
            .l2
            .entry(gc / n)
            .or_insert_with(|| vec![0u64; usize::try_from(n).unwrap_or(0)]);
        if let Some(x) = t.get_mut(usize::try_from(gc % n).unwrap_or(usize::MAX)) {
            *x = e;
        }
    }

    fn add_ref(&mut self, cluster: u64) -> Result<()> {
        let i = usize::try_from(cluster).map_err(|_| Error::invalid_argument("image too large"))?;
        if i >= self.refs.len() {
            let want = (i + 1).max(self.refs.len() * 2).max(1024);
            self.refs
                .try_reserve(want - self.refs.len())
                .map_err(|_| Error::new(ErrorKind::LimitExceeded, "refcount array"))?;
            self.refs.resize(want, 0);
        }
        if let Some(r) = self.refs.get_mut(i) {
            *r += 1;
        }
        Ok(())
    }

    fn ref_of(&self, cluster: u64) -> u64 {
        usize::try_from(cluster)
            .ok()
            .and_then(|i| self.refs.get(i))
            .map(|&r| u64::from(r))
            .unwrap_or(0)
    }

    /// Allocates one whole cluster at the (aligned) cursor.
    fn alloc_cluster(&mut self) -> Result<u64> {
        let host = self.next * self.cs;
        self.next += 1;
        self.add_ref(host / self.cs)?;
        Ok(host)
    }

    fn flush_bufs(&mut self) -> Result<()> {
        if !self.ubuf.1.is_empty() {
            self.storage.write_at(&self.ubuf.1, self.ubuf.0 * self.cs)?;
            self.ubuf.1.clear();
        }
        if let (Some(c), false) = (self.cbuf.0, self.cbuf.1.is_empty()) {
            self.storage.write_at(&self.cbuf.1, c * self.cs)?;
        }
        self.cbuf = (None, Vec::new());
        Ok(())
    }

    /// Appends one uncompressed cluster to the batch of contiguous clusters.
    fn put_uncompressed(&mut self, gc: u64, data: &[u8]) -> Result<()> {
        let host = self.alloc_cluster()?;
        let c = host / self.cs;
        let n = self.ubuf.1.len() as u64 / self.cs;
        if !self.ubuf.1.is_empty() && self.ubuf.0 + n != c {
            self.storage.write_at(&self.ubuf.1, self.ubuf.0 * self.cs)?;
            self.ubuf.1.clear();
        }
        if self.ubuf.1.is_empty() {
            self.ubuf.0 = c;
        }
        self.ubuf.1.extend_from_slice(data);
        self.set_entry(gc, host | OFLAG_COPIED);
        if self.ubuf.1.len() >= WBUF {
            self.storage.write_at(&self.ubuf.1, self.ubuf.0 * self.cs)?;
            self.ubuf.1.clear();
        }
        Ok(())
    }

    /// Stores one full guest cluster (uncompressed path or after compression).
    fn store_cluster(&mut self, gc: u64, data: &[u8]) -> Result<()> {
        if self.pool.is_some() {
            let seq = {
                let pool = self
                    .pool
                    .as_mut()
                    .ok_or_else(|| Error::unsupported("no pool"))?;
                let s = pool.next_seq;
                pool.next_seq += 1;
                s
            };
            let job = Job {
                seq,
                gc,
                data: data.to_vec(),
            };
            if let Some(tx) = self.pool.as_ref().and_then(|p| p.tx.as_ref()) {
                tx.send(job)
                    .map_err(|_| Error::new(ErrorKind::Io, "compression worker stopped"))?;
            }
            self.drain(false)?;
            return Ok(());
        }
        let host = self.alloc_cluster()?;
        self.storage.write_at(data, host)?;
        self.set_entry(gc, host | OFLAG_COPIED);
        Ok(())
    }

    /// Writes finished compression results in order; with `all`, waits for every job.
    fn drain(&mut self, all: bool) -> Result<()> {
        loop {
            let Some(pool) = self.pool.as_mut() else {
                return Ok(());
            };
            while let Ok(d) = pool.rx.try_recv() {
                pool.ready.insert(d.seq, d);
            }
            let mut batch = Vec::new();
            while let Some(d) = pool.ready.remove(&pool.next_write) {
                pool.next_write += 1;
                batch.push(d);
            }
            let inflight = pool.next_seq - pool.next_write;
            let must_wait = inflight > 0 && (all || inflight > pool.max_inflight);
            for d in batch {
                self.place_compressed(d)?;
            }
            if !must_wait {
                return Ok(());
            }
            let Some(pool) = self.pool.as_mut() else {
                return Ok(());
            };
            match pool.rx.recv() {
                Ok(d) => {
                    pool.ready.insert(d.seq, d);
                }
                Err(_) => return Err(Error::new(ErrorKind::Io, "compression workers stopped")),
            }
        }
    }

    fn place_compressed(&mut self, d: Done) -> Result<()> {
        let cs = self.cs;
        let z = match d.result? {
            Some(z) if !z.is_empty() => z,
            _ => return self.put_uncompressed(d.gc, &d.data),
        };
        let len = z.len() as u64;
        let max = refcount_max(self.opts.refcount_order);
        let x = 62 - (self.opts.cluster_bits - 8);
        // Append to the cluster being filled when the stream fits in it.
        if let Some(cl) = self.cbuf.0 {
            let fill = self.cbuf.1.len() as u64;
            if fill + len <= cs && self.ref_of(cl) < max {
                let p = cl * cs + fill;
                self.add_ref(cl)?;
                let extra = (p + len - 1) / 512 - p / 512;
                self.set_entry(d.gc, OFLAG_COMPRESSED | (extra << x) | p);
                self.cbuf.1.extend_from_slice(&z);
                return Ok(());
            }
        }
        // Otherwise start fresh clusters (a stream may span several).
        if let (Some(c), false) = (self.cbuf.0, self.cbuf.1.is_empty()) {
            self.storage.write_at(&self.cbuf.1, c * cs)?;
        }
        let k = len.div_ceil(cs);
        let start = self.next;
        self.next += k;
        for c in start..start + k {
            self.add_ref(c)?;
        }
        let p = start * cs;
        let extra = (p + len - 1) / 512 - p / 512;
        self.set_entry(d.gc, OFLAG_COMPRESSED | (extra << x) | p);
        let tail = usize::try_from((k - 1) * cs).unwrap_or(0);
        if k > 1 {
            self.storage
                .write_at(z.get(..tail).unwrap_or_default(), p)?;
        }
        self.cbuf = (
            Some(start + k - 1),
            z.get(tail..).unwrap_or_default().to_vec(),
        );
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<()> {
        if let Some((gc, buf)) = self.pending.take() {
            self.store_cluster(gc, &buf)?;
        }
        Ok(())
    }

    /// Merges a part of cluster `gc` into the pending buffer.
    fn merge_partial(&mut self, gc: u64, within: usize, data: &[u8]) -> Result<()> {
        if self.pending.as_ref().map(|p| p.0) != Some(gc) {
            self.flush_pending()?;
            let cs = usize::try_from(self.cs).unwrap_or(0);
            self.pending = Some((gc, vec![0u8; cs]));
        }
        if let Some((_, buf)) = self.pending.as_mut() {
            if let Some(dst) = buf.get_mut(within..within + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        Ok(())
    }

    fn check_order(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::out_of_bounds(offset, len, self.opts.size))?;
        if end > self.opts.size {
            return Err(Error::out_of_bounds(offset, len, self.opts.size));
        }
        Ok(())
    }

    pub(crate) fn finish_impl(mut self) -> Result<()> {
        self.flush_pending()?;
        self.drain(true)?;
        self.flush_bufs()?;
        self.pool = None;
        let cs = self.cs;
        let n = self.l2_entries();
        let l1_size = self.opts.size.div_ceil(cs * n).max(1);
        if self.opts.preallocation == Preallocation::Metadata {
            let clusters = self.opts.size.div_ceil(cs);
            for gc in 0..clusters {
                let has = self
                    .l2
                    .get(&(gc / n))
                    .and_then(|t| t.get(usize::try_from(gc % n).unwrap_or(usize::MAX)))
                    .is_some_and(|&e| e != 0);
                if !has {
                    let host = self.alloc_cluster()?;
                    self.set_entry(gc, host | OFLAG_COPIED);
                }
            }
        }
        let data_end = self.next * cs;
        let mut meta_cluster = data_end / cs;
        // L2 tables, then L1.
        let mut l1 = vec![0u64; usize::try_from(l1_size).unwrap_or(0)];
        // L2 tables are streamed out in batches; the rest of the metadata is written at once.
        let mut batch: Vec<u8> = Vec::new();
        let mut batch_at = data_end;
        let l2 = std::mem::take(&mut self.l2);
        for (idx, t) in l2 {
            let off = meta_cluster * cs;
            if let Some(e) = l1.get_mut(usize::try_from(idx).unwrap_or(usize::MAX)) {
                *e = off | OFLAG_COPIED;
            }
            self.add_ref(meta_cluster)?;
            batch.extend_from_slice(&encode_u64s(&t));
            meta_cluster += 1;
            if batch.len() >= WBUF {
                self.storage.write_at(&batch, batch_at)?;
                batch_at += batch.len() as u64;
                batch.clear();
            }
        }
        let mut meta = batch;
        let l1_off = meta_cluster * cs;
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let mut l1_bytes = encode_u64s(&l1);
        l1_bytes.resize(usize::try_from(l1_clusters * cs).unwrap_or(0), 0);
        meta.extend_from_slice(&l1_bytes);
        for c in 0..l1_clusters {
            self.add_ref(meta_cluster + c)?;
        }
        meta_cluster += l1_clusters;
        // Refcount table and blocks, sized to describe themselves too.
        self.add_ref(0)?;
        let base = meta_cluster;
        let epb = cs * 8 / (1u64 << self.opts.refcount_order);
        let mut blocks = 0u64;
        let mut rt_clusters;
        loop {
            let total = base + blocks;
            rt_clusters = (total.div_ceil(epb) * 8).div_ceil(cs).max(1);
            let nb = (total + rt_clusters).div_ceil(epb);
            if nb == blocks {
                break;
            }
            blocks = nb;
        }
        if rt_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::invalid_argument(
                "image too large for its refcount table (over 8 MiB)",
            ));
        }
        let rt_off = meta_cluster * cs;
        for c in 0..rt_clusters + blocks {
            self.add_ref(meta_cluster + c)?;
        }
        let rb_first = meta_cluster + rt_clusters;
        let mut rt = vec![0u64; usize::try_from(rt_clusters * cs / 8).unwrap_or(0)];
        let mut rb = vec![0u8; usize::try_from(blocks * cs).unwrap_or(0)];
        let order = self.opts.refcount_order;
        let max = refcount_max(order);
        for b in 0..blocks {
            if let Some(e) = rt.get_mut(usize::try_from(b).unwrap_or(usize::MAX)) {
                *e = (rb_first + b) * cs;
            }
        }
        for (c, &r) in self.refs.iter().enumerate() {
            if r == 0 {
                continue;
            }
            if u64::from(r) > max {
                return Err(Error::invalid_argument(format!(
                    "refcount {r} of cluster {c} does not fit refcount_bits {}",
                    1u64 << order
                )));
            }
            let b = c as u64 / epb;
            let i = usize::try_from(c as u64 % epb).unwrap_or(0);
            let start = usize::try_from(b * cs).unwrap_or(usize::MAX);
            if let Some(block) =
                rb.get_mut(start..start.saturating_add(usize::try_from(cs).unwrap_or(0)))
            {
                refcount_set(block, order, i, u64::from(r));
            }
        }
        meta.extend_from_slice(&encode_u64s(&rt));
        meta.extend_from_slice(&rb);
        self.storage.write_at(&meta, batch_at)?;
        // Header last.
        let mut h = Header {
            version: self.opts.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.opts.cluster_bits,
            size: self.opts.size,
            crypt_method: 0,
            l1_size: u32::try_from(l1_size).map_err(|_| Error::invalid_argument("L1 too large"))?,
            l1_table_offset: l1_off,
            refcount_table_offset: rt_off,
            refcount_table_clusters: u32::try_from(rt_clusters).unwrap_or(u32::MAX),
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: if self.opts.compression_type == COMPRESSION_ZSTD {
                INCOMPAT_COMPRESSION
            } else {
                0
            },
            compatible: if self.opts.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear: 0,
            refcount_order: order,
            header_length: if self.opts.version >= 3 {
                V3_HEADER_LEN
            } else {
                V2_HEADER_LEN
            },
            compression_type: self.opts.compression_type,
            backing_file: self.opts.backing_file.clone(),
            backing_format: self.opts.backing_format.clone(),
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto: None,
            unknown_extensions: Vec::new(),
        };
        let with_table = self.opts.version >= 3;
        let bytes = match h.serialize(with_table) {
            Ok(b) => b,
            Err(_) if with_table => h.serialize(false)?,
            Err(e) => return Err(e),
        };
        self.storage.write_at(&bytes, 0)?;
        self.storage.flush()?;
        Ok(())
    }
}

impl ImageWriter for Qcow2Writer {
    fn granularity(&self) -> u64 {
        self.cs
    }

    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_order(offset, data.len() as u64)?;
        let cs = self.cs;
        let mut pos = 0usize;
        while pos < data.len() {
            let g = offset + pos as u64;
            let gc = g / cs;
            let within = g % cs;
            let n = usize::try_from((cs - within).min((data.len() - pos) as u64)).unwrap_or(0);
            let part = data.get(pos..pos + n).unwrap_or_default();
            if within == 0 && n as u64 == cs && self.pending.as_ref().map(|p| p.0) != Some(gc) {
                self.flush_pending()?;
                if self.pool.is_none() {
                    // Whole run of full clusters: one write.
                    let full = ((data.len() - pos) as u64 / cs) * cs;
                    let run = data
                        .get(pos..pos + usize::try_from(full).unwrap_or(0))
                        .unwrap_or_default();
                    let host = self.next * cs;
                    self.storage.write_at(run, host)?;
                    for k in 0..full / cs {
                        self.add_ref(host / cs + k)?;
                        self.set_entry(gc + k, (host + k * cs) | OFLAG_COPIED);
                    }
                    self.next += full / cs;
                    pos += usize::try_from(full).unwrap_or(0);
                    continue;
                }
                self.store_cluster(gc, part)?;
            } else {
                self.merge_partial(gc, usize::try_from(within).unwrap_or(0), part)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_order(offset, len)?;
        if self.opts.backing_file.is_none() {
            // Unallocated clusters read as zeros already; only a pending buffer needs them.
            if let Some((gc, buf)) = self.pending.as_mut() {
                let start = *gc * self.cs;
                let s = offset.max(start);
                let e = (offset + len).min(start + self.cs);
                if s < e {
                    let a = usize::try_from(s - start).unwrap_or(0);
                    let b = usize::try_from(e - start).unwrap_or(0);
                    if let Some(d) = buf.get_mut(a..b) {
                        d.fill(0);
                    }
                }
            }
            return Ok(());
        }
        let cs = self.cs;
        let mut g = offset;
        let end = offset + len;
        while g < end {
            let gc = g / cs;
            let within = g % cs;
            let n = (cs - within).min(end - g);
            if n == cs {
                if self.pending.as_ref().map(|p| p.0) == Some(gc) {
                    self.pending = None;
                }
                if self.opts.version >= 3 {
                    self.set_entry(gc, OFLAG_ZERO);
                } else {
                    // v2 has no zero flag: map a cluster left as a hole (reads as zeros).
                    let host = self.alloc_cluster()?;
                    self.set_entry(gc, host | OFLAG_COPIED);
                }
            } else {
                let z = vec![0u8; usize::try_from(n).unwrap_or(0)];
                self.merge_partial(gc, usize::try_from(within).unwrap_or(0), &z)?;
            }
            g += n;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        (*self).finish_impl()
    }
}
