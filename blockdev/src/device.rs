//! The [`BlockDevice`] trait every image implements, and the types it speaks in.

use std::any::Any;

use serde::Serialize;

use crate::error::{Error, Result};

/// What one layer of an image says about a range of guest bytes.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentKind {
    /// This layer holds the bytes.
    Data,
    /// This layer says the bytes are zeros (qcow2 zero flag, VHDX ZERO/UNMAPPED, a raw hole).
    Zero,
    /// This layer has nothing: the bytes come from the backing image, or are zeros without one.
    Unallocated,
}

/// A run of guest bytes with one [`ExtentKind`], as returned by [`BlockDevice::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes; at least 1 and never past the end of the device.
    pub len: u64,
    /// What the layer says about these bytes.
    pub kind: ExtentKind,
    /// Where the bytes sit in the image file, when they are stored uncompressed and contiguous.
    pub host_offset: Option<u64>,
    /// The layer stores these bytes compressed (qcow2 compressed clusters).
    pub compressed: bool,
}

impl Extent {
    /// An extent without a host offset.
    pub fn new(offset: u64, len: u64, kind: ExtentKind) -> Self {
        Extent {
            offset,
            len,
            kind,
            host_offset: None,
            compressed: false,
        }
    }

    /// The same extent, stored compressed.
    pub fn compressed(mut self) -> Self {
        self.compressed = true;
        self
    }

    /// The same extent with a host offset.
    pub fn at_host(mut self, host_offset: u64) -> Self {
        self.host_offset = Some(host_offset);
        self
    }
}

/// Logical and physical sector sizes (512 or 4096).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SectorSizes {
    /// The smallest unit of guest addressing.
    pub logical: u32,
    /// The unit the guest should align writes to.
    pub physical: u32,
}

impl Default for SectorSizes {
    fn default() -> Self {
        SectorSizes {
            logical: 512,
            physical: 512,
        }
    }
}

/// The reference an image makes to its parent or backing file, as `info` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackingInfo {
    /// The name as recorded in the image (backing file name, parent path).
    pub reference: String,
    /// The format recorded for it, when the image records one.
    pub format: Option<String>,
    /// The file that was opened for it, when it resolved.
    pub resolved_path: Option<String>,
    /// Whether it was found and opened.
    pub resolved: bool,
}

/// The facts `vdconv info` prints about one image layer.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// Format name: `raw`, `vhd`, `vhdx`, `qcow2`.
    pub format: String,
    /// `fixed`, `dynamic`, `differencing`, or `None` for raw.
    pub subformat: Option<String>,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// Bytes the image file occupies on disk, when known.
    pub actual_size: Option<u64>,
    /// The allocation unit (cluster or block size), when the format has one.
    pub cluster_size: Option<u64>,
    /// The parent/backing reference.
    pub backing: Option<BackingInfo>,
    /// Format-specific facts, in the order they should be shown.
    pub format_specific: serde_json::Map<String, serde_json::Value>,
}

impl ImageInfo {
    /// A new info record with no format-specific facts.
    pub fn new(format: &str, virtual_size: u64) -> Self {
        ImageInfo {
            format: format.to_string(),
            subformat: None,
            virtual_size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            actual_size: None,
            cluster_size: None,
            backing: None,
            format_specific: serde_json::Map::new(),
        }
    }

    /// Adds a format-specific fact.
    pub fn set(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.format_specific.insert(key.to_string(), value.into());
    }
}

/// How bad a finding of `check` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth knowing, harmless.
    Warning,
    /// Space allocated but not used (a leak): harmless to data.
    Leak,
    /// Metadata is inconsistent: data may be wrong.
    Corruption,
}

/// One problem `check` found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// The structure or field concerned.
    pub field: String,
    /// File offset concerned, when there is one.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

/// The result of a consistency check of one image layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Format name.
    pub format: String,
    /// Every problem found (check reports all, it does not stop at the first).
    pub findings: Vec<Finding>,
    /// Format-specific statistics (allocated clusters, image end offset, ...).
    pub stats: serde_json::Map<String, serde_json::Value>,
}

impl CheckReport {
    /// An empty report for `format`.
    pub fn new(format: &str) -> Self {
        CheckReport {
            format: format.to_string(),
            ..CheckReport::default()
        }
    }

    /// Records a finding.
    pub fn add(
        &mut self,
        severity: Severity,
        field: &str,
        offset: Option<u64>,
        message: impl Into<String>,
    ) {
        self.findings.push(Finding {
            severity,
            field: field.to_string(),
            offset,
            message: message.into(),
        });
    }

    /// Number of corruptions.
    pub fn corruptions(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Corruption)
            .count()
    }

    /// Number of leaks.
    pub fn leaks(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Leak)
            .count()
    }
}

/// A disk image of any format, raw files included.
///
/// Every method takes `&self` and the trait is `Send + Sync`, so one image can be read from
/// several threads at once. Offsets and lengths are in guest bytes.
pub trait BlockDevice: Send + Sync {
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;

    /// Logical and physical sector sizes.
    fn sector_sizes(&self) -> SectorSizes {
        SectorSizes::default()
    }

    /// Fills `buf` with guest bytes at `offset`. Unallocated ranges come from the backing image,
    /// or read as zeros where there is none. A request past the end is `OutOfBounds`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes guest bytes. A read-only image answers `ReadOnly`.
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::read_only("image opened read-only"))
    }

    /// Makes `len` bytes at `offset` read as zeros; `deallocate` allows freeing space where the
    /// format can still guarantee zeros. The default writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64, _deallocate: bool) -> Result<()> {
        check_range(self.size(), offset, len)?;
        let chunk = len.min(1 << 20);
        let zeros = vec![0u8; usize::try_from(chunk).unwrap_or(1 << 20)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            let part = zeros
                .get(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default();
            self.write_at(part, offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Makes every completed write durable (metadata included).
    fn flush(&self) -> Result<()>;

    /// What this layer holds at `offset`: one extent starting at `offset`, of length at least 1
    /// and at most to the end of the device. `max_len` is a hint of how far the caller looks.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent>;

    /// The backing/parent image, for chains.
    fn backing(&self) -> Option<&dyn BlockDevice> {
        None
    }

    /// The facts `vdconv info` shows.
    fn info(&self) -> ImageInfo;

    /// A consistency check of this layer (not its backing chain).
    fn check(&self) -> Result<CheckReport> {
        Err(Error::unsupported(format!(
            "{} images have no metadata to check",
            self.info().format
        )))
    }

    /// The unit in which this image allocates space (cluster/block size); 1 for byte-granular.
    fn allocation_granularity(&self) -> u64 {
        512
    }

    /// Whether writes are allowed.
    fn is_writable(&self) -> bool {
        false
    }

    /// For downcasting to the concrete image type (a format checks its parent's identity).
    fn as_any(&self) -> &dyn Any;
}

/// Checks that `[offset, offset+len)` lies inside a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::out_of_bounds(offset, len, size)),
    }
}

/// A sequential writer of a new image, as the convert engine drives it.
///
/// Calls come in increasing guest-offset order; ranges never written read as zeros (or from the
/// backing file when the output has one, unless written with [`ImageWriter::write_zeroes`]).
/// Metadata is written once, by [`ImageWriter::finish`], which also flushes.
pub trait ImageWriter: Send {
    /// The unit at which this output allocates (cluster/block size): the engine skips zero
    /// runs of this size.
    fn granularity(&self) -> u64;

    /// Writes guest data at `offset`.
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()>;

    /// Records that `[offset, offset+len)` must read as zeros even over a backing file.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;

    /// Writes metadata and flushes. The image is complete when this returns `Ok`.
    fn finish(self: Box<Self>) -> Result<()>;
}
