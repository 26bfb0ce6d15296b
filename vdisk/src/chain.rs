//! Block status of a whole chain, and the plan every engine walks.

use blockdev::{BlockDevice, Error, ExtentKind, Result};

/// What the flattened chain holds at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainExtent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// `true` when some layer holds data here; `false` when the range reads as zeros.
    pub data: bool,
    /// Whether some layer of the chain says something here (false: unallocated everywhere).
    pub present: bool,
    /// Depth of the layer that answered (0 = top).
    pub depth: u32,
    /// Host offset in the answering layer's file, when known.
    pub host_offset: Option<u64>,
    /// The answering layer stores the data compressed.
    pub compressed: bool,
}

/// Resolves `block_status` through the backing chain: `Unallocated` ranges are asked of the
/// backing image, and read as zeros (not present) at the bottom or past a shorter backing image.
pub fn chain_status(dev: &dyn BlockDevice, offset: u64, max_len: u64) -> Result<ChainExtent> {
    let mut cur: &dyn BlockDevice = dev;
    let mut depth = 0u32;
    let size = dev.size();
    if offset >= size {
        return Err(Error::out_of_bounds(offset, 1, size));
    }
    let mut limit = size - offset;
    loop {
        let e = cur.block_status(offset, max_len.max(1))?;
        if e.offset != offset || e.len == 0 {
            return Err(Error::new(
                blockdev::ErrorKind::Corrupt,
                format!(
                    "block status at {offset:#x} returned an invalid extent ({:#x}+{:#x})",
                    e.offset, e.len
                ),
            ));
        }
        let len = e.len.min(limit);
        match e.kind {
            ExtentKind::Data => {
                return Ok(ChainExtent {
                    offset,
                    len,
                    data: true,
                    present: true,
                    depth,
                    host_offset: e.host_offset,
                    compressed: e.compressed,
                })
            }
            ExtentKind::Zero => {
                return Ok(ChainExtent {
                    offset,
                    len,
                    data: false,
                    present: true,
                    depth,
                    host_offset: e.host_offset,
                    compressed: false,
                })
            }
            _ => match cur.backing() {
                Some(b) if offset < b.size() => {
                    limit = len.min(b.size() - offset);
                    cur = b;
                    depth += 1;
                }
                _ => {
                    return Ok(ChainExtent {
                        offset,
                        len,
                        data: false,
                        present: false,
                        depth,
                        host_offset: None,
                        compressed: false,
                    })
                }
            },
        }
    }
}

/// One step of an engine's walk over a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanItem {
    /// Read and process `[offset, offset+len)`.
    Data {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `[offset, offset+len)` reads as zeros: no read needed.
    Zero {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

impl PlanItem {
    /// The guest offset of the item.
    pub fn offset(&self) -> u64 {
        match *self {
            PlanItem::Data { offset, .. } | PlanItem::Zero { offset, .. } => offset,
        }
    }
}

/// Walks a device's chain status and yields aligned [`PlanItem`]s: zero runs covering whole
/// `unit`s are `Zero`; everything else is `Data` in pieces aligned to `unit` that never cross a
/// `chunk` boundary. Only the last item may end unaligned (at the end of the device).
pub struct Planner<'a> {
    dev: &'a dyn BlockDevice,
    size: u64,
    unit: u64,
    chunk: u64,
    pos: u64,
    pending_zero: Option<(u64, u64)>,
    /// The last extent the chain reported: the walk asks about the same range several times
    /// (once to classify it, again to extend a data item, and per chunk of a long extent).
    last: Option<ChainExtent>,
}

impl<'a> Planner<'a> {
    /// A planner over `dev`; `unit` and `chunk` are powers of two with `unit <= chunk`.
    pub fn new(dev: &'a dyn BlockDevice, unit: u64, chunk: u64) -> Self {
        let unit = unit.max(512).next_power_of_two();
        let chunk = chunk.max(unit).next_power_of_two();
        Planner {
            dev,
            size: dev.size(),
            unit,
            chunk,
            pos: 0,
            pending_zero: None,
            last: None,
        }
    }

    fn align_down(&self, v: u64) -> u64 {
        v & !(self.unit - 1)
    }

    fn align_up_or_end(&self, v: u64) -> u64 {
        match v.checked_add(self.unit - 1) {
            Some(x) => (x & !(self.unit - 1)).min(self.size),
            None => self.size,
        }
    }

    /// `chain_status` at `pos`, answered from the last extent when it covers `pos`.
    fn status(&mut self, pos: u64) -> Result<ChainExtent> {
        if let Some(e) = self.last {
            if e.offset <= pos && pos < e.offset + e.len {
                let skip = pos - e.offset;
                return Ok(ChainExtent {
                    offset: pos,
                    len: e.len - skip,
                    host_offset: e.host_offset.and_then(|h| h.checked_add(skip)),
                    ..e
                });
            }
        }
        let e = chain_status(self.dev, pos, self.size - pos)?;
        self.last = Some(e);
        Ok(e)
    }

    /// The next item, or `None` at the end.
    pub fn next_item(&mut self) -> Result<Option<PlanItem>> {
        loop {
            if self.pos >= self.size {
                return Ok(self
                    .pending_zero
                    .take()
                    .map(|(offset, len)| PlanItem::Zero { offset, len }));
            }
            let pos = self.pos;
            let e = self.status(pos)?;
            if !e.data {
                let end = pos + e.len;
                let z_end = if end == self.size {
                    end
                } else {
                    self.align_down(end)
                };
                if z_end > pos {
                    self.pos = z_end;
                    self.pending_zero = match self.pending_zero {
                        Some((o, l)) if o + l == pos => Some((o, l + (z_end - pos))),
                        Some(prev) => {
                            self.pending_zero = Some((pos, z_end - pos));
                            return Ok(Some(PlanItem::Zero {
                                offset: prev.0,
                                len: prev.1,
                            }));
                        }
                        None => Some((pos, z_end - pos)),
                    };
                    continue;
                }
            }
            // Data (or a zero run shorter than a unit): extend to the end of data in this chunk.
            let window_end = ((pos & !(self.chunk - 1)).saturating_add(self.chunk)).min(self.size);
            let mut q = pos;
            let mut data_end = pos;
            while q < window_end {
                let e = self.status(q)?;
                let e_end = (q + e.len).min(window_end);
                if e.data {
                    data_end = e_end;
                } else {
                    let zs = self.align_up_or_end(q);
                    let raw_end = q + e.len;
                    let ze = if raw_end >= self.size {
                        self.size
                    } else {
                        self.align_down(raw_end)
                    };
                    if ze > zs && zs < window_end {
                        break;
                    }
                }
                q = e_end;
            }
            let end = self
                .align_up_or_end(data_end.max(pos + 1))
                .min(window_end.max(self.align_up_or_end(pos + 1)));
            self.pos = end;
            let item = PlanItem::Data {
                offset: pos,
                len: end - pos,
            };
            if let Some((o, l)) = self.pending_zero.take() {
                // Emit the zero run first; the data item is produced on the next call.
                self.pos = pos;
                return Ok(Some(PlanItem::Zero { offset: o, len: l }));
            }
            return Ok(Some(item));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use blockdev::{MemStorage, RawImage, Storage};

    /// A raw image whose holes are given explicitly (memory storage has none).
    pub(crate) struct Holey {
        pub(crate) raw: RawImage<MemStorage>,
        pub(crate) data: Vec<(u64, u64)>,
        /// Reads that touch this offset fail.
        pub(crate) bad: Option<u64>,
    }

    impl BlockDevice for Holey {
        fn size(&self) -> u64 {
            self.raw.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if let Some(b) = self.bad {
                if (offset..offset + buf.len() as u64).contains(&b) {
                    return Err(blockdev::Error::new(blockdev::ErrorKind::Io, "bad sector"));
                }
            }
            self.raw.read_at(buf, offset)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, _max: u64) -> Result<blockdev::Extent> {
            for &(s, l) in &self.data {
                if offset >= s && offset < s + l {
                    return Ok(blockdev::Extent::new(
                        offset,
                        s + l - offset,
                        ExtentKind::Data,
                    ));
                }
            }
            let next = self
                .data
                .iter()
                .map(|&(s, _)| s)
                .filter(|&s| s > offset)
                .min()
                .unwrap_or(self.size());
            Ok(blockdev::Extent::new(
                offset,
                next - offset,
                ExtentKind::Zero,
            ))
        }
        fn info(&self) -> blockdev::ImageInfo {
            self.raw.info()
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    fn plan(data: Vec<(u64, u64)>, size: u64, unit: u64, chunk: u64) -> Vec<PlanItem> {
        let m = MemStorage::new();
        m.set_len(size).unwrap();
        let dev = Holey {
            raw: RawImage::open(m).unwrap(),
            data,
            bad: None,
        };
        let mut p = Planner::new(&dev, unit, chunk);
        let mut out = Vec::new();
        while let Some(i) = p.next_item().unwrap() {
            out.push(i);
        }
        // Items tile the device exactly.
        let mut pos = 0;
        for i in &out {
            let (o, l) = match *i {
                PlanItem::Data { offset, len } | PlanItem::Zero { offset, len } => (offset, len),
            };
            assert_eq!(o, pos);
            assert!(l > 0);
            pos += l;
        }
        assert_eq!(pos, size);
        out
    }

    #[test]
    fn plans_aligned_items() {
        let out = plan(vec![(5000, 10), (70000, 100)], 1 << 20, 4096, 65536);
        assert_eq!(
            out,
            vec![
                PlanItem::Zero {
                    offset: 0,
                    len: 4096
                },
                PlanItem::Data {
                    offset: 4096,
                    len: 4096
                },
                PlanItem::Zero {
                    offset: 8192,
                    len: 69632 - 8192
                },
                PlanItem::Data {
                    offset: 69632,
                    len: 4096
                },
                PlanItem::Zero {
                    offset: 73728,
                    len: (1 << 20) - 73728
                },
            ]
        );
        let out = plan(vec![(0, 1 << 20)], (1 << 20) + 100, 4096, 1 << 19);
        assert_eq!(out.len(), 3);
        let out = plan(vec![], 12345, 4096, 65536);
        assert_eq!(
            out,
            vec![PlanItem::Zero {
                offset: 0,
                len: 12345
            }]
        );
        let out = plan(vec![(12000, 345)], 12345, 4096, 65536);
        assert_eq!(
            out,
            vec![
                PlanItem::Zero {
                    offset: 0,
                    len: 8192
                },
                PlanItem::Data {
                    offset: 8192,
                    len: 12345 - 8192
                }
            ]
        );
    }
}
