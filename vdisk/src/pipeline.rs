//! The parallel read pipeline shared by convert and digest.
//!
//! A planner hands out [`PlanItem`]s in guest order; reader threads take an item together with
//! a buffer from a fixed pool, read and process it, and send the result to the consumer, which
//! restores guest order and returns the buffer. Memory is bounded by the pool: `in_flight`
//! buffers of `chunk` bytes, whatever the image size.
//!
//! Zero items need neither a read nor a buffer: unless the caller's `process` is costly for
//! them ([`PipelineConfig::zeros_on_planner`]), the planner processes them itself and sends them
//! straight to the consumer (sparse disks are half zero items; each skipped hand-off is a few
//! futex calls and context switches).
//!
//! Deadlock freedom: a reader takes a buffer *before* it takes an item, so every item handed out
//! is owned by a reader that can finish it; the consumer therefore always receives the item it
//! waits for. Zero items hold no buffer and are sent on an unbounded channel, so the planner
//! never waits for the consumer with them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;

use blockdev::{BlockDevice, Error, ErrorKind, Result};

use crate::chain::{PlanItem, Planner};

/// A processed item, handed to the consumer in guest order.
pub struct Processed<T> {
    /// The item.
    pub item: PlanItem,
    /// The bytes read (empty for zero items); the first `item.len` bytes are valid.
    pub buf: Vec<u8>,
    /// What the reader computed.
    pub extra: T,
}

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Reader threads.
    pub threads: usize,
    /// Buffers in flight.
    pub in_flight: usize,
    /// Zero-skip unit.
    pub unit: u64,
    /// Largest item.
    pub chunk: u64,
    /// Zero items are processed on the planner thread, skipping the readers. Clear it when
    /// `process` does real work for them (convert `-B` reads the backing image there), so that
    /// work stays parallel and does not hold up planning.
    pub zeros_on_planner: bool,
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
            zeros_on_planner: true,
        }
    }
}

/// Runs the pipeline over `dev`. `process` runs on reader threads (after the read, for data
/// items; zero items on the planner thread when `cfg.zeros_on_planner`); `consume` runs on the
/// calling thread, in guest order.
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
    C: FnMut(&Processed<T>) -> Result<()>,
{
    let chunk =
        usize::try_from(cfg.chunk).map_err(|_| Error::invalid_argument("chunk too large"))?;
    let (pool_tx, pool_rx) = mpsc::sync_channel::<Vec<u8>>(cfg.in_flight);
    for _ in 0..cfg.in_flight {
        pool_tx
            .send(Vec::new())
            .map_err(|_| Error::new(ErrorKind::Io, "pipeline pool closed"))?;
    }
    let pool_rx = Mutex::new(pool_rx);
    // The flag says whether the item holds a buffer of the pool (to give back).
    let (out_tx, out_rx) = mpsc::channel::<(u64, Result<Processed<T>>, bool)>();
    let stop = AtomicBool::new(false);
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));

    std::thread::scope(|s| -> Result<()> {
        // The planner runs ahead on its own thread so metadata lookups overlap with reads.
        let (item_tx, item_rx) = mpsc::sync_channel::<(u64, Result<PlanItem>)>(cfg.in_flight * 2);
        let (unit, plan_chunk) = (cfg.unit, cfg.chunk);
        let stop_ref = &stop;
        let zero_tx = out_tx.clone();
        let process_ref = &process;
        let zeros_on_planner = cfg.zeros_on_planner;
        s.spawn(move || {
            let mut planner = Planner::new(dev, unit, plan_chunk);
            let mut seq = 0u64;
            while !stop_ref.load(Ordering::Relaxed) {
                let next = planner.next_item();
                let done = !matches!(next, Ok(Some(_)));
                let msg = match next {
                    Ok(Some(item)) => Ok(item),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
                if let (true, Ok(item @ PlanItem::Zero { .. })) = (zeros_on_planner, &msg) {
                    let item = *item;
                    // Nothing to read and no buffer needed: straight to the consumer, which
                    // restores the order. Half the items of a sparse disk skip two hand-offs.
                    let res = process_ref(&item, &[]).map(|extra| Processed {
                        item,
                        buf: Vec::new(),
                        extra,
                    });
                    if zero_tx.send((seq, res, false)).is_err() {
                        break;
                    }
                    seq += 1;
                    continue;
                }
                if item_tx.send((seq, msg)).is_err() || done {
                    break;
                }
                seq += 1;
            }
        });
        // Readers share the receiver; when the last one leaves, the planner's sends fail.
        let item_rx = std::sync::Arc::new(Mutex::new(item_rx));
        for _ in 0..cfg.threads {
            let out_tx = out_tx.clone();
            let item_rx = std::sync::Arc::clone(&item_rx);
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
                let next = item_rx.lock().ok().and_then(|rx| rx.recv().ok());
                let Some((seq, item)) = next else { return };
                let res = item.and_then(|item| read_and_process(dev, item, buf, chunk, process));
                if out_tx.send((seq, res, true)).is_err() {
                    return;
                }
            });
        }
        drop(item_rx);
        drop(out_tx);

        let mut next_seq = 0u64;
        let mut pending: BTreeMap<u64, (Result<Processed<T>>, bool)> = BTreeMap::new();
        let result = (|| -> Result<()> {
            for (seq, res, pooled) in out_rx.iter() {
                pending.insert(seq, (res, pooled));
                while let Some((res, pooled)) = pending.remove(&next_seq) {
                    next_seq += 1;
                    if cancelled() {
                        return Err(Error::new(ErrorKind::Interrupted, "interrupted"));
                    }
                    let p = res?;
                    consume(&p)?;
                    // Recycle the buffer: the pool never holds more than `in_flight`.
                    if pooled {
                        let _ = pool_tx.send(p.buf);
                    }
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

fn read_and_process<T, P>(
    dev: &dyn BlockDevice,
    item: PlanItem,
    mut buf: Vec<u8>,
    chunk: usize,
    process: &P,
) -> Result<Processed<T>>
where
    P: Fn(&PlanItem, &[u8]) -> Result<T>,
{
    match item {
        PlanItem::Data { offset, len } => {
            let n = usize::try_from(len).map_err(|_| Error::invalid_argument("item too large"))?;
            if buf.len() < n {
                buf.resize(n.max(chunk), 0);
            }
            let slice = buf
                .get_mut(..n)
                .ok_or_else(|| Error::new(ErrorKind::Io, "pipeline buffer too small"))?;
            dev.read_at(slice, offset)
                .map_err(|e| e.context(format!("reading the source at guest offset {offset}")))?;
            let extra = process(&item, slice)?;
            Ok(Processed { item, buf, extra })
        }
        PlanItem::Zero { .. } => {
            // Hand the pool's buffer back untouched: dropping it here would make the next data
            // item allocate and zero-fill a fresh chunk.
            let extra = process(&item, &[])?;
            Ok(Processed { item, buf, extra })
        }
    }
}
