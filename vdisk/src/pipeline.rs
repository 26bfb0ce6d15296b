//! The parallel read pipeline shared by convert and digest.
//!
//! A planner hands out [`PlanItem`]s in guest order, gathered into batches that hold at most
//! `chunk` bytes of data (and at most [`BATCH_ITEMS`] items). Reader threads take a batch
//! together with a buffer from a fixed pool, read and process its items, and send it to the
//! consumer, which restores guest order, consumes the items one by one and returns the buffer.
//! Memory is bounded by the pool: `in_flight` buffers of `chunk` bytes, whatever the image size.
//!
//! Why batches: a disk whose data lies in small pieces between holes makes many small items,
//! and each hand-off between threads costs futex calls and context switches (on a 2-core VM a
//! conversion made about 14,000 switches for 4,000 items). A batch pays for one.
//!
//! Deadlock freedom: a reader takes a buffer *before* it takes a batch, so every batch handed
//! out is owned by a reader that can finish it; the consumer therefore always receives the
//! batch it waits for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;

use blockdev::{BlockDevice, Error, ErrorKind, Result};

use crate::chain::{PlanItem, Planner};

/// Most items in one batch, so a run of tiny items still reaches the readers promptly.
pub const BATCH_ITEMS: usize = 64;

/// A processed item, handed to the consumer in guest order.
pub struct Processed<'a, T> {
    /// The item.
    pub item: PlanItem,
    /// The bytes read (empty for zero items): exactly `item.len` bytes for data items.
    pub buf: &'a [u8],
    /// What the reader computed.
    pub extra: T,
}

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Reader threads.
    pub threads: usize,
    /// Buffers in flight (raised to one per reader when lower).
    pub in_flight: usize,
    /// Zero-skip unit.
    pub unit: u64,
    /// Largest item, and the most data bytes one batch holds (the size of a pool buffer).
    pub chunk: u64,
}

impl PipelineConfig {
    /// Defaults for this machine: readers = cores (at least 2), 2 MiB chunks.
    pub fn for_unit(unit: u64) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let chunk: u64 = 2 << 20;
        let unit = unit.clamp(512, chunk);
        PipelineConfig {
            threads: cores.clamp(2, 8),
            in_flight: (cores * 3).clamp(6, 24),
            unit,
            chunk,
        }
    }
}

/// A batch after its reads: each item with its byte range in the buffer and its result.
struct Done<T> {
    items: Vec<(PlanItem, usize, T)>,
    buf: Vec<u8>,
}

/// Runs the pipeline over `dev`. `process` runs on reader threads (after the read, for data
/// items; with no bytes for zero items); `consume` runs on the calling thread, in guest order.
pub fn run<T, P, C>(
    dev: &dyn BlockDevice,
    cfg: &PipelineConfig,
    cancel: Option<&AtomicBool>,
    process: P,
    mut consume: C,
) -> Result<()>
where
    T: Send,
    P: Fn(&PlanItem, &[u8]) -> Result<T> + Sync,
    C: FnMut(&Processed<'_, T>) -> Result<()>,
{
    let chunk =
        usize::try_from(cfg.chunk).map_err(|_| Error::invalid_argument("chunk too large"))?;
    // At least a buffer per reader: a reader that finds no more work leaves with the buffer
    // it took, and with fewer buffers than readers one could wait for a buffer forever (the
    // end-of-run wake-up below also needs a free slot per reader).
    let in_flight = cfg.in_flight.max(cfg.threads);
    let (pool_tx, pool_rx) = mpsc::sync_channel::<Vec<u8>>(in_flight);
    for _ in 0..in_flight {
        pool_tx
            .send(Vec::new())
            .map_err(|_| Error::new(ErrorKind::Io, "pipeline pool closed"))?;
    }
    let pool_rx = Mutex::new(pool_rx);
    let (out_tx, out_rx) = mpsc::channel::<(u64, Result<Done<T>>)>();
    let stop = AtomicBool::new(false);
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));

    std::thread::scope(|s| -> Result<()> {
        // The planner runs ahead on its own thread so metadata lookups overlap with reads.
        let (batch_tx, batch_rx) =
            mpsc::sync_channel::<(u64, Result<Vec<PlanItem>>)>(in_flight.saturating_mul(2));
        let (unit, plan_chunk) = (cfg.unit, cfg.chunk);
        let stop_ref = &stop;
        s.spawn(move || {
            let mut planner = Planner::new(dev, unit, plan_chunk);
            let mut seq = 0u64;
            let mut batch: Vec<PlanItem> = Vec::new();
            let mut data = 0u64;
            let mut send = |msg: Result<Vec<PlanItem>>| {
                let ok = batch_tx.send((seq, msg)).is_ok();
                seq += 1;
                ok
            };
            while !stop_ref.load(Ordering::Relaxed) {
                let item = match planner.next_item() {
                    Ok(Some(item)) => item,
                    Ok(None) => break,
                    Err(e) => {
                        // The items before the error are consumed first.
                        if !batch.is_empty() {
                            send(Ok(std::mem::take(&mut batch)));
                        }
                        send(Err(e));
                        return;
                    }
                };
                let len = match item {
                    PlanItem::Data { len, .. } => len,
                    PlanItem::Zero { .. } => 0,
                };
                if !batch.is_empty()
                    && (data.saturating_add(len) > plan_chunk || batch.len() >= BATCH_ITEMS)
                {
                    if !send(Ok(std::mem::take(&mut batch))) {
                        return;
                    }
                    data = 0;
                }
                batch.push(item);
                data = data.saturating_add(len);
            }
            if !batch.is_empty() && !stop_ref.load(Ordering::Relaxed) {
                send(Ok(batch));
            }
        });
        // Readers share the receiver; when the last one leaves, the planner's sends fail.
        let batch_rx = std::sync::Arc::new(Mutex::new(batch_rx));
        for _ in 0..cfg.threads {
            let out_tx = out_tx.clone();
            let batch_rx = std::sync::Arc::clone(&batch_rx);
            let pool_rx = &pool_rx;
            let process = &process;
            let stop = &stop;
            s.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let buf = match pool_rx.lock().ok().and_then(|rx| rx.recv().ok()) {
                    Some(b) => b,
                    None => return,
                };
                let next = batch_rx.lock().ok().and_then(|rx| rx.recv().ok());
                let Some((seq, batch)) = next else { return };
                let res = batch.and_then(|b| read_batch(dev, b, buf, chunk, process));
                if out_tx.send((seq, res)).is_err() {
                    return;
                }
            });
        }
        drop(batch_rx);
        drop(out_tx);

        let mut next_seq = 0u64;
        let mut pending: BTreeMap<u64, Result<Done<T>>> = BTreeMap::new();
        let result = (|| -> Result<()> {
            for (seq, res) in out_rx.iter() {
                pending.insert(seq, res);
                while let Some(res) = pending.remove(&next_seq) {
                    next_seq += 1;
                    if cancelled() {
                        return Err(Error::new(ErrorKind::Interrupted, "interrupted"));
                    }
                    let done = res?;
                    for (item, start, extra) in done.items {
                        let n = match item {
                            PlanItem::Data { len, .. } => usize::try_from(len).unwrap_or(0),
                            PlanItem::Zero { .. } => 0,
                        };
                        let buf = start
                            .checked_add(n)
                            .and_then(|end| done.buf.get(start..end))
                            .ok_or_else(|| {
                                Error::new(ErrorKind::Io, "internal: item outside its buffer")
                            })?;
                        consume(&Processed { item, buf, extra })?;
                    }
                    // Recycle the buffer: the pool never holds more than `in_flight`.
                    let _ = pool_tx.send(done.buf);
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        // Unblock readers waiting for a buffer.
        for _ in 0..cfg.threads {
            let _ = pool_tx.try_send(Vec::new());
        }
        drop(pool_tx);
        result
    })
}

/// Reads a batch's data items one after another into `buf` and processes every item.
fn read_batch<T, P>(
    dev: &dyn BlockDevice,
    batch: Vec<PlanItem>,
    mut buf: Vec<u8>,
    chunk: usize,
    process: &P,
) -> Result<Done<T>>
where
    P: Fn(&PlanItem, &[u8]) -> Result<T>,
{
    let mut items = Vec::new();
    let mut pos = 0usize;
    for item in batch {
        match item {
            PlanItem::Data { offset, len } => {
                let n =
                    usize::try_from(len).map_err(|_| Error::invalid_argument("item too large"))?;
                let end = pos
                    .checked_add(n)
                    .ok_or_else(|| Error::invalid_argument("batch too large"))?;
                if buf.len() < end {
                    // Allocated once per pool buffer: a batch never holds more than `chunk`.
                    buf.resize(end.max(chunk), 0);
                }
                let slice = buf
                    .get_mut(pos..end)
                    .ok_or_else(|| Error::new(ErrorKind::Io, "pipeline buffer too small"))?;
                dev.read_at(slice, offset).map_err(|e| {
                    e.context(format!(
                        "reading guest bytes {offset:#x}..{:#x} of the source",
                        offset.saturating_add(len)
                    ))
                })?;
                let extra = process(&item, slice)?;
                items.push((item, pos, extra));
                pos = end;
            }
            PlanItem::Zero { .. } => {
                let extra = process(&item, &[])?;
                items.push((item, pos, extra));
            }
        }
    }
    Ok(Done { items, buf })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::tests::Holey;
    use blockdev::{MemStorage, RawImage};

    /// Many small data pieces between holes: 3,000-byte pieces every 16 KiB, each byte
    /// telling its offset apart.
    fn holey(size: u64, bad: Option<u64>) -> (Holey, Vec<u8>) {
        let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
        let data = (0..size / 16384)
            .map(|k| (k * 16384 + 1000, 3000))
            .collect();
        let dev = Holey {
            raw: RawImage::open(MemStorage::from_vec(bytes.clone())).unwrap(),
            data,
            bad,
        };
        (dev, bytes)
    }

    fn cfg(threads: usize, chunk: u64) -> PipelineConfig {
        PipelineConfig {
            threads,
            in_flight: 3,
            unit: 4096,
            chunk,
        }
    }

    /// What the consumer saw: item, bytes, and the reader's sum of them.
    type Seen = Vec<(PlanItem, Vec<u8>, u64)>;

    /// Runs the pipeline; returns what the consumer saw, in order, and the result.
    fn consume_all(dev: &Holey, cfg: &PipelineConfig) -> (Seen, Result<()>) {
        let mut seen = Vec::new();
        let res = run(
            dev,
            cfg,
            None,
            |_, b| Ok(b.iter().map(|&x| u64::from(x)).sum::<u64>()),
            |p| {
                seen.push((p.item, p.buf.to_vec(), p.extra));
                Ok(())
            },
        );
        (seen, res)
    }

    #[test]
    fn batches_deliver_every_item_in_order_with_its_bytes() {
        let size = 4 << 20;
        let (dev, bytes) = holey(size, None);
        // A chunk of 64 KiB holds several 4 KiB items; 2 MiB hits the item limit first.
        for chunk in [65536u64, 2 << 20] {
            for threads in [1, 2, 4] {
                let (seen, res) = consume_all(&dev, &cfg(threads, chunk));
                res.unwrap();
                let mut pos = 0u64;
                let mut data_items = 0;
                for (item, buf, sum) in &seen {
                    match *item {
                        PlanItem::Data { offset, len } => {
                            assert_eq!(offset, pos);
                            let want = &bytes[offset as usize..(offset + len) as usize];
                            assert_eq!(buf.as_slice(), want);
                            assert_eq!(*sum, want.iter().map(|&x| u64::from(x)).sum::<u64>());
                            data_items += 1;
                            pos += len;
                        }
                        PlanItem::Zero { offset, len } => {
                            assert_eq!(offset, pos);
                            assert!(buf.is_empty());
                            pos += len;
                        }
                    }
                }
                assert_eq!(pos, size);
                // One 4 KiB unit per piece (1000..4000 lies within the first unit).
                assert_eq!(data_items, size / 16384);
            }
        }
    }

    #[test]
    fn a_read_error_ends_the_run_after_the_items_before_it() {
        let size = 4 << 20;
        let bad = 100 * 16384 + 1500;
        let (dev, _) = holey(size, Some(bad));
        let (seen, res) = consume_all(&dev, &cfg(2, 65536));
        let err = res.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert!(
            err.to_string()
                .contains(&format!("guest bytes {:#x}..", 100 * 16384)),
            "{err}"
        );
        // Nothing at or after the bad item reached the consumer.
        for (item, _, _) in &seen {
            let (PlanItem::Data { offset, .. } | PlanItem::Zero { offset, .. }) = *item;
            assert!(offset < 100 * 16384);
        }
    }

    #[test]
    fn an_error_of_the_consumer_stops_the_readers() {
        let (dev, _) = holey(8 << 20, None);
        let mut n = 0;
        let res = run(
            &dev,
            &cfg(2, 65536),
            None,
            |_, _| Ok(()),
            |_| {
                n += 1;
                if n == 10 {
                    return Err(Error::new(ErrorKind::Mismatch, "stop here"));
                }
                Ok(())
            },
        );
        assert_eq!(res.unwrap_err().kind(), ErrorKind::Mismatch);
        assert_eq!(n, 10);
    }
}
