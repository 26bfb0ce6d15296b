//! The sequential writer `convert` drives: blocks are appended in guest order and the metadata
//! (BAT, batmap, locators, header, both footers) is written once by `finish`.
//!
//! Without a parent, a block is placed when its first non-zero byte arrives: its bitmap (all
//! sectors present) is written, then the data goes straight to its place in the file. Zero runs
//! inside a block are never written, so they stay holes of the file and read as zeros (like
//! qemu's vpc driver, the file is as sparse as the guest data). A differencing image builds each
//! block in memory (its bitmap says which sectors it holds) and writes it with one pwrite.

use blockdev::{is_zero, try_alloc, Error, ImageWriter, Limits, Result, Storage};

use crate::create::{plan, CreateOptions, Layout};
use crate::format::{set_bit_msb, BAT_UNUSED, SECTOR};

/// A sequential writer of a new VHD.
pub struct VhdWriter {
    storage: Box<dyn Storage>,
    layout: Layout,
    size: u64,
    has_parent: bool,
    bat: Vec<u32>,
    batmap: Option<Vec<u8>>,
    /// The block being filled: (index, bitmap + data).
    cur: Option<(u64, Vec<u8>)>,
    /// A block buffer to reuse.
    spare: Option<Vec<u8>>,
    /// The bitmap of a block holding all its sectors (built on first use).
    full_map: Vec<u8>,
    next: u64,
    limits: Limits,
}

impl std::fmt::Debug for VhdWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdWriter")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl VhdWriter {
    /// A writer producing the image `opts` describes on `storage` (an empty file).
    pub fn new(
        storage: Box<dyn Storage>,
        opts: &CreateOptions,
        limits: &Limits,
    ) -> Result<VhdWriter> {
        let layout = plan(opts)?;
        let entries = layout.entries;
        let bat = if layout.header.is_some() {
            let n = limits.check_alloc(entries * 4, "BAT")? / 4;
            vec![BAT_UNUSED; n]
        } else {
            Vec::new()
        };
        let batmap = layout
            .batmap
            .map(|(_, _, mlen)| vec![0u8; usize::try_from(mlen).unwrap_or(0)]);
        let next = layout.data_start;
        Ok(VhdWriter {
            storage,
            layout,
            size: opts.size,
            has_parent: opts.parent.is_some(),
            bat,
            batmap,
            cur: None,
            spare: None,
            full_map: Vec::new(),
            next,
            limits: limits.clone(),
        })
    }

    fn fixed(&self) -> bool {
        self.layout.header.is_none()
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        blockdev::check_range(self.size, offset, len)?;
        if self.has_parent && (!offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR)) {
            return Err(Error::invalid_argument(
                "writes into a differencing VHD must be whole 512-byte sectors",
            ));
        }
        Ok(())
    }

    /// Makes `blk` the current block, emitting the previous one.
    fn select(&mut self, blk: u64) -> Result<&mut Vec<u8>> {
        if self.cur.as_ref().map(|(b, _)| *b) != Some(blk) {
            self.emit()?;
            let len = self.layout.bitmap_size + self.layout.block_size;
            let buf = match self.spare.take() {
                Some(mut b) => {
                    b.fill(0);
                    b
                }
                None => try_alloc(len, &self.limits, "block buffer")?,
            };
            self.cur = Some((blk, buf));
        }
        match self.cur.as_mut() {
            Some((_, buf)) => Ok(buf),
            None => Err(Error::new(blockdev::ErrorKind::Io, "no current block")),
        }
    }

    fn emit(&mut self) -> Result<()> {
        let Some((blk, buf)) = self.cur.take() else {
            return Ok(());
        };
        let at = self.next;
        let sector = u32::try_from(at / SECTOR)
            .map_err(|_| Error::unsupported("the VHD file would exceed 2 TiB"))?;
        self.storage.write_at(&buf, at)?;
        self.next = at + buf.len() as u64;
        if let Some(e) = self.bat.get_mut(blk as usize) {
            *e = sector;
        }
        if let Some(bm) = self.batmap.as_mut() {
            let map = buf
                .get(..self.layout.bitmap_size as usize)
                .unwrap_or_default();
            let spb = self.layout.block_size / SECTOR;
            if (0..spb).all(|s| crate::format::bit_msb(map, s)) {
                set_bit_msb(bm, blk);
            }
        }
        self.spare = Some(buf);
        Ok(())
    }

    /// Without a parent: writes `data` at guest `offset` straight into its block, placing the
    /// block first when this is its first data.
    fn put_direct(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let bs = self.layout.block_size;
        let bm = self.layout.bitmap_size;
        let mut done = 0usize;
        while done < data.len() {
            let off = offset + done as u64;
            let blk = off / bs;
            let within = off % bs;
            let n = usize::try_from((bs - within).min((data.len() - done) as u64))
                .map_err(|_| Error::invalid_argument("write too large"))?;
            let part = data.get(done..done + n).unwrap_or_default();
            done += n;
            if is_zero(part) {
                continue;
            }
            let idx = usize::try_from(blk).map_err(|_| Error::out_of_bounds(off, 1, self.size))?;
            let entry = self
                .bat
                .get(idx)
                .copied()
                .ok_or_else(|| Error::out_of_bounds(off, 1, self.size))?;
            let at = if entry == BAT_UNUSED {
                let at = self.next;
                let sector = u32::try_from(at / SECTOR)
                    .map_err(|_| Error::unsupported("the VHD file would exceed 2 TiB"))?;
                if self.full_map.is_empty() {
                    let mut map = try_alloc(bm, &self.limits, "block bitmap")?;
                    for s in 0..bs / SECTOR {
                        set_bit_msb(&mut map, s);
                    }
                    self.full_map = map;
                }
                self.storage.write_at(&self.full_map, at)?;
                self.next = at + bm + bs;
                if let Some(e) = self.bat.get_mut(idx) {
                    *e = sector;
                }
                if let Some(m) = self.batmap.as_mut() {
                    set_bit_msb(m, blk);
                }
                at
            } else {
                u64::from(entry) * SECTOR
            };
            self.storage.write_at(part, at + bm + within)?;
        }
        Ok(())
    }

    /// With a parent: writes `data` (or zeros) at guest `offset` into the block being
    /// assembled, marking its sectors present in the block's bitmap.
    fn put(&mut self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        let bs = self.layout.block_size;
        let bm = self.layout.bitmap_size;
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let blk = off / bs;
            let within = off % bs;
            let n = (bs - within).min(len - done);
            let buf = self.select(blk)?;
            if let Some(d) = data {
                let src = d
                    .get(done as usize..(done + n) as usize)
                    .unwrap_or_default();
                let start = (bm + within) as usize;
                if let Some(dst) = buf.get_mut(start..start + n as usize) {
                    dst.copy_from_slice(src);
                }
            }
            if let Some(map) = buf.get_mut(..bm as usize) {
                for s in within / SECTOR..(within + n).div_ceil(SECTOR) {
                    set_bit_msb(map, s);
                }
            }
            done += n;
        }
        Ok(())
    }
}

impl ImageWriter for VhdWriter {
    fn granularity(&self) -> u64 {
        if self.fixed() || !self.has_parent {
            // Unwritten parts of a fixed image, or of a block of a dynamic one, stay holes:
            // skip zero runs of a page.
            4096
        } else {
            self.layout.block_size
        }
    }

    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        if self.fixed() {
            return self.storage.write_at(data, offset);
        }
        if !self.has_parent {
            return self.put_direct(offset, data);
        }
        self.put(offset, Some(data), data.len() as u64)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        if self.fixed() || !self.has_parent {
            // Fixed files are zero where not written; unallocated dynamic blocks read as
            // zeros; zero parts of a current block are already zero.
            return Ok(());
        }
        self.put(offset, None, len)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if self.fixed() {
            self.storage.set_len(self.size)?;
            self.storage
                .write_at(&self.layout.footer.to_bytes(), self.size)?;
            return self.storage.flush();
        }
        self.emit()?;
        // Data before metadata: the trailing footer first, then BAT and headers.
        self.storage
            .write_at(&self.layout.footer.to_bytes(), self.next)?;
        self.layout
            .write_metadata(self.storage.as_ref(), &self.bat, self.batmap.as_deref())?;
        self.storage.flush()
    }
}
