//! L1/L2 entry decoding and the sharded L2 table cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blockdev::{Error, Result};

use crate::format::*;

/// What one guest cluster (or subcluster run) maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Nothing in this layer: backing file or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster (still refcounted), if any.
    Zero {
        /// Preallocated host cluster.
        host: Option<u64>,
    },
    /// Stored uncompressed at `host` (image file, or the external data file).
    Normal {
        /// Host offset of the cluster.
        host: u64,
        /// Whether the COPIED flag is set.
        copied: bool,
    },
    /// Stored compressed: `len` bytes starting at byte `offset`.
    Compressed {
        /// Byte offset of the compressed stream.
        offset: u64,
        /// Bytes to read (whole sectors, may run past the end of the file).
        len: u64,
    },
    /// Extended L2 cluster with a subcluster bitmap.
    Sub {
        /// Host cluster (0 when no subcluster is allocated).
        host: u64,
        /// Bits 0-31: allocated subclusters.
        alloc: u32,
        /// Bits 0-31: zero subclusters.
        zero: u32,
    },
}

/// Geometry needed to decode entries.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Version 3 (zero flag allowed).
    pub v3: bool,
    /// Extended L2 entries.
    pub extended: bool,
    /// External data file present.
    pub data_file: bool,
}

impl Geometry {
    /// Cluster size.
    pub fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Decodes an L2 entry (`bitmap` is the second word of an extended entry).
    pub fn decode_l2(&self, e: u64, bitmap: u64, field: &str, at: u64) -> Result<Mapping> {
        if e & OFLAG_COMPRESSED != 0 {
            if self.data_file {
                return Err(Error::corrupt(
                    field,
                    at,
                    "compressed cluster in an image with an external data file",
                ));
            }
            let x = 62 - (self.cluster_bits - 8);
            let offset = e & ((1u64 << x) - 1);
            let nsect = ((e >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            if offset >> 56 != 0 {
                return Err(Error::corrupt(
                    field,
                    at,
                    format!("compressed cluster offset {offset:#x} beyond 2^56"),
                ));
            }
            let len = nsect * 512 - (offset & 511);
            return Ok(Mapping::Compressed { offset, len });
        }
        let host = e & OFFSET_MASK;
        let copied = e & OFLAG_COPIED != 0;
        if e & L2_RESERVED != 0 {
            return Err(Error::corrupt(
                field,
                at,
                format!("L2 entry {e:#018x} has reserved bits set"),
            ));
        }
        if !host.is_multiple_of(self.cs()) {
            return Err(Error::corrupt(
                field,
                at,
                format!("cluster offset {host:#x} is not properly aligned; L2 entry corrupted"),
            ));
        }
        let allocated = host != 0 || (self.data_file && copied);
        if self.extended {
            let alloc = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if alloc & zero != 0 {
                return Err(Error::corrupt(
                    field,
                    at,
                    "subcluster both allocated and zero",
                ));
            }
            if alloc != 0 && !allocated {
                return Err(Error::corrupt(
                    field,
                    at,
                    "allocated subclusters without a host cluster",
                ));
            }
            return Ok(Mapping::Sub { host, alloc, zero });
        }
        if e & OFLAG_ZERO != 0 {
            if !self.v3 {
                return Err(Error::corrupt(field, at, "zero flag in a version 2 image"));
            }
            return Ok(Mapping::Zero {
                host: if allocated { Some(host) } else { None },
            });
        }
        if allocated {
            Ok(Mapping::Normal { host, copied })
        } else if copied {
            Err(Error::corrupt(
                field,
                at,
                "COPIED flag on an unallocated cluster",
            ))
        } else {
            Ok(Mapping::Unallocated)
        }
    }

    /// Decodes an L1 entry to its L2 table offset (0 = none).
    pub fn decode_l1(&self, e: u64, field: &str, at: u64) -> Result<u64> {
        if e & L1_RESERVED != 0 {
            return Err(Error::corrupt(
                field,
                at,
                format!("L1 entry {e:#018x} has reserved bits set"),
            ));
        }
        let off = e & OFFSET_MASK;
        if off == 0 && e & OFLAG_COPIED != 0 {
            return Err(Error::corrupt(
                field,
                at,
                "COPIED flag on an unallocated L1 entry",
            ));
        }
        if !off.is_multiple_of(self.cs()) {
            return Err(Error::corrupt(
                field,
                at,
                format!("L2 table offset {off:#x} is not cluster aligned"),
            ));
        }
        Ok(off)
    }
}

type Shard = Mutex<HashMap<u64, Arc<Vec<u64>>>>;

/// A bounded cache of L2 tables, split into shards so parallel readers rarely contend.
pub struct L2Cache {
    shards: Vec<Shard>,
    per_shard: usize,
}

const SHARDS: usize = 16;

impl L2Cache {
    /// A cache holding at most about `max_bytes` of tables of `table_bytes` each.
    pub fn new(max_bytes: u64, table_bytes: u64) -> Self {
        let tables = (max_bytes / table_bytes.max(1)).max(SHARDS as u64 * 2);
        L2Cache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: usize::try_from(tables / SHARDS as u64).unwrap_or(64).max(2),
        }
    }

    fn shard(&self, off: u64) -> Option<&Shard> {
        let i = ((off >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % SHARDS;
        self.shards.get(i)
    }

    /// The cached table at `off`.
    pub fn get(&self, off: u64) -> Option<Arc<Vec<u64>>> {
        self.shard(off)?.lock().ok()?.get(&off).cloned()
    }

    /// Caches the table at `off`, evicting another when the shard is full.
    pub fn insert(&self, off: u64, t: Arc<Vec<u64>>) {
        if let Some(Ok(mut m)) = self.shard(off).map(Mutex::lock) {
            if m.len() >= self.per_shard && !m.contains_key(&off) {
                if let Some(k) = m.keys().next().copied() {
                    m.remove(&k);
                }
            }
            m.insert(off, t);
        }
    }
}
