//! Raw images: the guest disk byte for byte, holes included.

use std::any::Any;

use crate::device::{check_range, BlockDevice, Extent, ExtentKind, ImageInfo, ImageWriter};
use crate::error::{Error, Result};
use crate::storage::{Storage, StorageRegion};

/// A raw image over any [`Storage`]. Its size is the storage's length at open time.
#[derive(Debug)]
pub struct RawImage<S: Storage> {
    storage: S,
    size: u64,
}

impl<S: Storage> RawImage<S> {
    /// Opens `storage` as a raw image.
    pub fn open(storage: S) -> Result<Self> {
        let size = storage.len()?;
        Ok(RawImage { storage, size })
    }

    /// Creates a raw image of `size` bytes (sparse where the filesystem allows).
    pub fn create(storage: S, size: u64) -> Result<Self> {
        storage.set_len(size)?;
        storage.flush()?;
        Ok(RawImage { storage, size })
    }

    /// The storage underneath.
    pub fn storage(&self) -> &S {
        &self.storage
    }
}

impl<S: Storage + 'static> BlockDevice for RawImage<S> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.storage.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if !self.storage.is_writable() {
            return Err(Error::read_only("image opened read-only"));
        }
        self.storage.write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool) -> Result<()> {
        check_range(self.size, offset, len)?;
        if !self.storage.is_writable() {
            return Err(Error::read_only("image opened read-only"));
        }
        // A punched hole reads as zeros; fall back to writing zeros when punching is refused.
        if deallocate && self.storage.punch_hole(offset, len)? {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 20);
            let part = zeros
                .get(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default();
            self.storage.write_at(part, offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    fn block_status(&self, offset: u64, _max_len: u64) -> Result<Extent> {
        if offset >= self.size {
            return Err(Error::out_of_bounds(offset, 1, self.size));
        }
        let remaining = self.size - offset;
        let ext = match self.storage.region_at(offset)? {
            StorageRegion::Data(n) => {
                Extent::new(offset, n.clamp(1, remaining), ExtentKind::Data).at_host(offset)
            }
            StorageRegion::Hole(n) => {
                Extent::new(offset, n.clamp(1, remaining), ExtentKind::Zero).at_host(offset)
            }
        };
        Ok(ext)
    }

    fn info(&self) -> ImageInfo {
        let mut info = ImageInfo::new("raw", self.size);
        info.actual_size = self.storage.len().ok();
        info
    }

    fn allocation_granularity(&self) -> u64 {
        4096
    }

    fn is_writable(&self) -> bool {
        self.storage.is_writable()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Sequential writer of a raw image: data is written where it belongs, skipped ranges stay holes.
#[derive(Debug)]
pub struct RawWriter<S: Storage> {
    storage: S,
}

impl<S: Storage> RawWriter<S> {
    /// Starts a raw image of `size` bytes on empty `storage`.
    pub fn new(storage: S, size: u64) -> Result<Self> {
        storage.set_len(size)?;
        Ok(RawWriter { storage })
    }
}

impl<S: Storage> ImageWriter for RawWriter<S> {
    fn granularity(&self) -> u64 {
        4096
    }

    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.storage.write_at(data, offset)
    }

    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> Result<()> {
        // The file was extended sparsely and is written once: unwritten ranges are zeros.
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.storage.flush()
    }
}
