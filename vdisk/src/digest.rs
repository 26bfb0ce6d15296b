//! Content digests of the guest-visible disk.
//!
//! * `sha256`: SHA-256 of every guest byte in order, equal to `sha256sum` of the raw image.
//! * `sparse-sha256` (the default): a digest whose cost is proportional to the allocated data,
//!   computed on every core. Its exact construction, so others can reimplement it:
//!
//!   1. Cut the disk into blocks of 1 MiB (1,048,576 bytes); the last block may be shorter.
//!   2. A block whose bytes are all zero is a *zero block*. Any other block `i` gets
//!      `h_i = SHA-256(block bytes)`.
//!   3. The digest is SHA-256 over: the 24 ASCII bytes `vdconv-sparse-sha256-v1\n`, the disk
//!      size in bytes as a little-endian u64, then for the blocks in order: for each maximal run
//!      of `n` consecutive zero blocks the byte `Z` and `n` as a little-endian u64; for each
//!      other block the byte `D` and its 32-byte `h_i`.
//!
//!   The digest depends only on content: a block that is allocated but all zero hashes exactly
//!   as an unallocated one, so two images with equal content have equal digests whatever their
//!   formats and allocation.

use std::sync::atomic::AtomicBool;

use blockdev::{is_zero, BlockDevice, Error, Result};
use sha2::{Digest, Sha256};

use crate::chain::PlanItem;
use crate::pipeline::{self, PipelineConfig};

/// Block size of the sparse digest.
pub const SPARSE_BLOCK: u64 = 1 << 20;

/// The digest algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAlgorithm {
    /// Plain SHA-256 of the whole content.
    Sha256,
    /// The sparse, parallel block digest described in the module docs.
    SparseSha256,
}

impl DigestAlgorithm {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::SparseSha256 => "sparse-sha256",
        }
    }
}

impl std::str::FromStr for DigestAlgorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sha256" => Ok(DigestAlgorithm::Sha256),
            "sparse-sha256" => Ok(DigestAlgorithm::SparseSha256),
            _ => Err(Error::invalid_argument(format!(
                "unknown digest algorithm '{s}' (expected sparse-sha256 or sha256)"
            ))),
        }
    }
}

/// Incremental sparse digest: feed blocks in order.
#[derive(Clone)]
pub struct SparseDigest {
    hasher: Sha256,
    zero_run: u64,
    fed: u64,
    size: u64,
}

/// What one block contributed: `None` for a zero block.
pub type BlockHash = Option<[u8; 32]>;

impl SparseDigest {
    /// Starts a digest of a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"vdconv-sparse-sha256-v1\n");
        hasher.update(size.to_le_bytes());
        SparseDigest {
            hasher,
            zero_run: 0,
            fed: 0,
            size,
        }
    }

    /// Hashes one block's bytes (on any thread).
    pub fn hash_block(bytes: &[u8]) -> BlockHash {
        if is_zero(bytes) {
            None
        } else {
            Some(Sha256::digest(bytes).into())
        }
    }

    /// Feeds the next block's result.
    pub fn push(&mut self, h: BlockHash) {
        match h {
            None => self.zero_run += 1,
            Some(h) => {
                self.flush_zeros();
                self.hasher.update([b'D']);
                self.hasher.update(h);
            }
        }
        self.fed += 1;
    }

    /// Feeds `n` zero blocks.
    pub fn push_zeros(&mut self, n: u64) {
        self.zero_run += n;
        self.fed += n;
    }

    fn flush_zeros(&mut self) {
        if self.zero_run > 0 {
            self.hasher.update([b'Z']);
            self.hasher.update(self.zero_run.to_le_bytes());
            self.zero_run = 0;
        }
    }

    /// The hex digest; an error if not every block was fed.
    pub fn finish(mut self) -> Result<String> {
        let blocks = self.size.div_ceil(SPARSE_BLOCK);
        if self.fed != blocks {
            return Err(Error::new(
                blockdev::ErrorKind::Io,
                format!("digest fed {} of {} blocks", self.fed, blocks),
            ));
        }
        self.flush_zeros();
        Ok(hex(&self.hasher.finalize()))
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Computes the digest of `dev`'s guest content; `progress(done, total)` is called as it goes.
pub fn digest(
    dev: &dyn BlockDevice,
    alg: DigestAlgorithm,
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<String> {
    let size = dev.size();
    match alg {
        DigestAlgorithm::SparseSha256 => {
            let mut cfg = PipelineConfig::for_unit(SPARSE_BLOCK);
            cfg.chunk = SPARSE_BLOCK;
            let mut d = SparseDigest::new(size);
            pipeline::run(
                dev,
                &cfg,
                cancel,
                |_item, bytes| {
                    Ok(if bytes.is_empty() {
                        None
                    } else {
                        Some(SparseDigest::hash_block(bytes))
                    })
                },
                |p| {
                    match (p.item, p.extra) {
                        (PlanItem::Zero { offset, len }, _) => {
                            d.push_zeros(
                                (offset + len).div_ceil(SPARSE_BLOCK) - offset / SPARSE_BLOCK,
                            );
                            progress(offset + len, size);
                        }
                        (PlanItem::Data { offset, len }, h) => {
                            d.push(h.flatten());
                            progress(offset + len, size);
                        }
                    }
                    Ok(())
                },
            )?;
            d.finish()
        }
        DigestAlgorithm::Sha256 => {
            let mut cfg = PipelineConfig::for_unit(SPARSE_BLOCK);
            cfg.chunk = 4 << 20;
            let mut h = Sha256::new();
            let zeros = vec![0u8; 1 << 20];
            pipeline::run(
                dev,
                &cfg,
                cancel,
                |_, _| Ok(()),
                |p| {
                    match p.item {
                        PlanItem::Zero { offset, len } => {
                            let mut left = len;
                            while left > 0 {
                                let n = left.min(zeros.len() as u64);
                                h.update(
                                    zeros
                                        .get(..usize::try_from(n).unwrap_or(0))
                                        .unwrap_or_default(),
                                );
                                left -= n;
                            }
                            progress(offset + len, size);
                        }
                        PlanItem::Data { offset, len } => {
                            let n = usize::try_from(len).unwrap_or(0);
                            h.update(p.buf.get(..n).unwrap_or_default());
                            progress(offset + len, size);
                        }
                    }
                    Ok(())
                },
            )?;
            Ok(hex(&h.finalize()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::{MemStorage, RawImage};

    #[test]
    fn sparse_digest_is_content_only() {
        let mut data = vec![0u8; (3 << 20) + 100];
        data[(1 << 20) + 5] = 7;
        let a = RawImage::open(MemStorage::from_vec(data.clone())).unwrap();
        let d1 = digest(&a, DigestAlgorithm::SparseSha256, None, &mut |_, _| {}).unwrap();
        // By hand: Z1, D h(block1), Z2 (block 2 and the partial block 3).
        let mut m = SparseDigest::new(data.len() as u64);
        m.push(None);
        m.push(SparseDigest::hash_block(&data[1 << 20..2 << 20]));
        m.push_zeros(2);
        assert_eq!(d1, m.finish().unwrap());
        let s = digest(&a, DigestAlgorithm::Sha256, None, &mut |_, _| {}).unwrap();
        assert_eq!(s, hex(&Sha256::digest(&data)));
    }
}
