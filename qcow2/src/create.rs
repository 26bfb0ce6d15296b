//! Parameters of new images, and `create` (an empty image or an overlay).

use blockdev::{Error, Result, Storage};

use crate::format::*;
use crate::writer::Qcow2Writer;

/// Preallocation mode of a new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing allocated.
    #[default]
    Off,
    /// Every cluster mapped (L2 tables and data clusters allocated, data left as holes).
    Metadata,
}

/// Parameters of a new qcow2 image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// log2 of the refcount width (0..=6).
    pub refcount_order: u32,
    /// 0 zlib, 1 zstd (v3 only).
    pub compression_type: u8,
    /// Compress data clusters.
    pub compress: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name to record.
    pub backing_file: Option<String>,
    /// Backing file format to record.
    pub backing_format: Option<String>,
    /// Set the lazy refcounts compatible bit (v3).
    pub lazy_refcounts: bool,
    /// Compression worker threads (0 = one per core).
    pub threads: usize,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_bits: 16,
            refcount_order: 4,
            compression_type: COMPRESSION_ZLIB,
            compress: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            lazy_refcounts: false,
            threads: 0,
        }
    }
}

impl CreateOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.version != 2 && self.version != 3 {
            return Err(Error::invalid_argument("compat must be 0.10 or 1.1"));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Error::invalid_argument(
                "cluster_size must be a power of two from 512 to 2M",
            ));
        }
        if self.refcount_order > 6 || (self.version == 2 && self.refcount_order != 4) {
            return Err(Error::invalid_argument(
                "refcount_bits must be a power of two up to 64 (16 for compat=0.10)",
            ));
        }
        if self.compression_type > 1 || (self.version == 2 && self.compression_type != 0) {
            return Err(Error::invalid_argument(
                "compression_type zstd needs compat=1.1",
            ));
        }
        if self.version == 2 && self.lazy_refcounts {
            return Err(Error::invalid_argument("lazy_refcounts needs compat=1.1"));
        }
        if self.size > (1u64 << 63) {
            return Err(Error::invalid_argument("size too large"));
        }
        let cs = 1u64 << self.cluster_bits;
        let l1 = self.size.div_ceil(cs * (cs / 8));
        if l1 * 8 > MAX_L1_BYTES {
            return Err(Error::invalid_argument(
                "size too large for this cluster size (L1 over 32 MiB)",
            ));
        }
        Ok(())
    }
}

/// Creates a new empty image (or an overlay) with `opts` on the empty `storage`.
pub fn create(storage: Box<dyn Storage>, opts: CreateOptions) -> Result<()> {
    let w = Qcow2Writer::new(storage, opts)?;
    w.finish_impl()
}
