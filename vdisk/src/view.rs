//! Read-only windows onto a device (a prefix, a sub-range), for digests of part of a disk.

use std::any::Any;

use blockdev::{check_range, BlockDevice, Error, Extent, ImageInfo, Result};

/// `[start, start+len)` of a device, seen as a device of its own.
pub struct Window<'a> {
    dev: &'a dyn BlockDevice,
    start: u64,
    len: u64,
}

impl<'a> Window<'a> {
    /// A window; it must lie inside `dev`.
    pub fn new(dev: &'a dyn BlockDevice, start: u64, len: u64) -> Result<Self> {
        check_range(dev.size(), start, len)?;
        Ok(Window { dev, start, len })
    }
}

/// The first `len` bytes of a device.
pub struct Prefix;

impl Prefix {
    /// A window over `[0, len)`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(dev: &dyn BlockDevice, len: u64) -> Result<Window<'_>> {
        Window::new(dev, 0, len)
    }
}

impl BlockDevice for Window<'_> {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.dev.read_at(buf, self.start + offset)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        if offset >= self.len {
            return Err(Error::out_of_bounds(offset, 1, self.len));
        }
        // Resolve through the whole chain so the window has no backing of its own.
        let e = crate::chain::chain_status(self.dev, self.start + offset, max_len)?;
        let len = e.len.min(self.len - offset).max(1);
        let kind = if e.data {
            blockdev::ExtentKind::Data
        } else {
            blockdev::ExtentKind::Zero
        };
        Ok(Extent::new(offset, len, kind))
    }

    fn info(&self) -> ImageInfo {
        self.dev.info()
    }

    fn as_any(&self) -> &dyn Any {
        // Windows are transient views; downcasting them is never needed.
        &()
    }
}
