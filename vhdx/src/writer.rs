//! [`VhdxWriter`]: the sequential writer `convert` fills. Payload blocks are laid out in guest
//! order from the first 1 MiB boundary after the BAT; BAT, sector bitmaps, metadata and headers
//! are written once by `finish`.

use std::collections::BTreeMap;

use blockdev::{ImageWriter, Limits, Result, Storage};

use crate::bat;
use crate::create::{finish_image, fixed_entry, CreateOptions, Layout, Subformat};
use crate::format::*;

/// Sequential writer of a new VHDX image.
pub struct VhdxWriter {
    storage: Box<dyn Storage>,
    opts: CreateOptions,
    layout: Layout,
    /// Entries of allocated blocks (fixed images compute theirs).
    bat: BTreeMap<usize, u64>,
    next_free: u64,
    fixed: bool,
    /// Sector bitmaps of the chunks touched (differencing output only).
    bitmaps: BTreeMap<u64, Vec<u8>>,
    limits: Limits,
}

impl VhdxWriter {
    /// Starts a new image on the empty `storage`.
    pub fn new(storage: Box<dyn Storage>, opts: CreateOptions, limits: &Limits) -> Result<Self> {
        let layout = opts.layout()?;
        let bat = BTreeMap::new();
        let fixed = opts.parent.is_none() && opts.subformat == Subformat::Fixed;
        let next_free = layout.data_offset;
        Ok(VhdxWriter {
            storage,
            opts,
            layout,
            bat,
            next_free,
            fixed,
            bitmaps: BTreeMap::new(),
            limits: limits.clone(),
        })
    }

    fn host_of(&mut self, blk: u64) -> Result<u64> {
        let g = self.layout.geom;
        let i = g.payload(blk);
        if self.fixed {
            return Ok(self.layout.data_offset + blk * g.block_size);
        }
        let e = self.bat.get(&i).copied().unwrap_or(0);
        if matches!(
            bat::state(e),
            PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT
        ) {
            return Ok(bat::offset(e));
        }
        let host = {
            let h = self.next_free;
            self.next_free = h + g.block_size;
            h
        };
        let st = if g.has_parent {
            PAYLOAD_PARTIALLY_PRESENT
        } else {
            PAYLOAD_FULLY_PRESENT
        };
        self.bat.insert(i, bat::entry(st, host));
        Ok(host)
    }

    fn mark(&mut self, pos: u64, len: u64) -> Result<()> {
        if !self.layout.geom.has_parent || len == 0 {
            return Ok(());
        }
        let ls = u64::from(self.opts.logical);
        let first = pos / ls;
        let end = (pos + len).div_ceil(ls);
        let mut s = first;
        while s < end {
            let chunk = s / SECTORS_PER_CHUNK;
            if !self.bitmaps.contains_key(&chunk) {
                let b = blockdev::try_alloc(SECTOR_BITMAP_BLOCK, &self.limits, "sector_bitmap")?;
                self.bitmaps.insert(chunk, b);
            }
            let chunk_end = ((chunk + 1) * SECTORS_PER_CHUNK).min(end);
            if let Some(bm) = self.bitmaps.get_mut(&chunk) {
                while s < chunk_end {
                    let idx = s % SECTORS_PER_CHUNK;
                    if idx.is_multiple_of(8) && s + 8 <= chunk_end {
                        if let Some(b) = bm.get_mut((idx / 8) as usize) {
                            *b = 0xFF;
                        }
                        s += 8;
                    } else {
                        if let Some(b) = bm.get_mut((idx / 8) as usize) {
                            *b |= 1 << (idx % 8);
                        }
                        s += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn put(&mut self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        blockdev::check_range(self.layout.size, offset, len)?;
        let bs = self.layout.geom.block_size;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let blk = pos / bs;
            let inb = pos % bs;
            let n = (bs - inb).min(len - done);
            let whole = inb == 0 && (n == bs || pos + n == self.layout.size);
            match data {
                None if whole => {
                    let i = self.layout.geom.payload(blk);
                    let e = self.bat.get(&i).copied().unwrap_or(0);
                    if self.layout.geom.has_parent && bat::state(e) == PAYLOAD_NOT_PRESENT {
                        self.bat.insert(i, bat::entry(PAYLOAD_ZERO, 0));
                    }
                }
                None if !self.layout.geom.has_parent => {}
                None => {
                    // Explicit zeros over the parent: allocate, leave the hole, set bits.
                    self.host_of(blk)?;
                    self.mark(pos, n)?;
                }
                Some(d) => {
                    let host = self.host_of(blk)?;
                    let part = d
                        .get(done as usize..(done + n) as usize)
                        .unwrap_or_default();
                    self.storage.write_at(part, host + inb)?;
                    self.mark(pos, n)?;
                }
            }
            done += n;
        }
        Ok(())
    }
}

impl ImageWriter for VhdxWriter {
    fn granularity(&self) -> u64 {
        if self.layout.geom.has_parent {
            self.layout.geom.block_size.min(MIB)
        } else {
            // Data goes straight into its block: zero pages left unwritten stay holes of the
            // file and read as zeros, so skip zero runs of a page (as qemu does).
            4096
        }
    }

    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.put(offset, data.len() as u64, Some(data))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.put(offset, len, None)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let g = self.layout.geom;
        if self.fixed {
            let end = self.layout.data_offset + g.blocks * g.block_size;
            let data = self.layout.data_offset;
            return finish_image(
                &*self.storage,
                &self.opts,
                &self.layout,
                &|i| fixed_entry(&g, data, i),
                end,
            );
        }
        if g.has_parent {
            let ls = u64::from(self.opts.logical);
            let spb = g.block_size / ls;
            let partial: Vec<(usize, u64)> = self
                .bat
                .iter()
                .filter(|(_, e)| bat::state(**e) == PAYLOAD_PARTIALLY_PRESENT)
                .map(|(i, e)| (*i, *e))
                .collect();
            for (i, e) in partial {
                let blk = g.block_of_index(i as u64);
                let first = blk * spb;
                let chunk = first / SECTORS_PER_CHUNK;
                let lo = ((first % SECTORS_PER_CHUNK) / 8) as usize;
                let nbytes = (spb / 8) as usize;
                let last_sector = (g.size.div_ceil(ls)).min(first + spb);
                let full = self.bitmaps.get(&chunk).is_some_and(|bm| {
                    let want = last_sector - first;
                    let bytes = bm.get(lo..lo + nbytes).unwrap_or_default();
                    (0..want).all(|k| {
                        bytes
                            .get((k / 8) as usize)
                            .is_some_and(|b| b & (1 << (k % 8)) != 0)
                    })
                });
                if full {
                    self.bat
                        .insert(i, bat::entry(PAYLOAD_FULLY_PRESENT, bat::offset(e)));
                }
            }
            let chunks: Vec<u64> = self.bitmaps.keys().copied().collect();
            for chunk in chunks {
                let sbi = bitmap_index(chunk, g.chunk_ratio) as usize;
                let first = sbi.saturating_sub(g.chunk_ratio as usize);
                let needed = self
                    .bat
                    .range(first..sbi)
                    .any(|(_, e)| bat::state(*e) == PAYLOAD_PARTIALLY_PRESENT);
                if !needed {
                    continue;
                }
                let off = self.next_free;
                self.next_free += SECTOR_BITMAP_BLOCK;
                if let Some(bm) = self.bitmaps.get(&chunk) {
                    self.storage.write_at(bm, off)?;
                }
                self.bat.insert(sbi, bat::entry(SB_PRESENT, off));
            }
        }
        let bat = &self.bat;
        finish_image(
            &*self.storage,
            &self.opts,
            &self.layout,
            &|i| bat.get(&(i as usize)).copied().unwrap_or(0),
            self.next_free,
        )
    }
}
