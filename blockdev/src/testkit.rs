//! Storage wrappers that fail or "crash" on purpose, for crash-safety tests of every format.
//!
//! * [`FaultyStorage`] counts mutating operations (write, set_len, flush) and fails the N-th
//!   one (once or from then on) with an I/O error.
//! * [`CrashStorage`] keeps a volatile and a durable copy: writes land in the volatile copy,
//!   `flush` makes them durable, and [`CrashStorage::crash_image`] returns only what was durable,
//!   as a power cut would. With a crash point set, every mutating operation after it is dropped.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{MemStorage, Storage};

/// Fails the `n`-th mutating operation (1-based) and, if `sticky`, every later one.
#[derive(Debug)]
pub struct FaultyStorage<S: Storage> {
    inner: S,
    fail_at: u64,
    sticky: bool,
    ops: AtomicU64,
}

impl<S: Storage> FaultyStorage<S> {
    /// Wraps `inner`; operation number `fail_at` (1-based) fails.
    pub fn new(inner: S, fail_at: u64, sticky: bool) -> Self {
        FaultyStorage {
            inner,
            fail_at,
            sticky,
            ops: AtomicU64::new(0),
        }
    }

    /// Mutating operations seen so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// The wrapped storage.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn tick(&self) -> Result<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at || (self.sticky && n > self.fail_at) {
            return Err(Error::io(
                "injected fault",
                std::io::Error::other(format!("injected failure of operation {n}")),
            ));
        }
        Ok(())
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.tick()?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.tick()?;
        self.inner.set_len(len)
    }
    fn flush(&self) -> Result<()> {
        self.tick()?;
        self.inner.flush()
    }
    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
}

#[derive(Debug, Default)]
struct CrashState {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    ops: u64,
    crashed: bool,
    /// Writes and truncations since the last flush, in order.
    unflushed: Vec<Unflushed>,
}

#[derive(Debug, Clone)]
enum Unflushed {
    Write(usize, Vec<u8>),
    SetLen(usize),
}

/// In-memory storage with volatile and durable copies, and an optional crash point.
///
/// By default a crash keeps exactly what was flushed. With [`CrashStorage::reordering`], a
/// crash also keeps a pseudo-random subset of the writes made since the last flush (a disk
/// may persist them in any order): a format that relies on the order of unflushed writes
/// shows up as a state that is neither old nor new.
#[derive(Debug)]
pub struct CrashStorage {
    state: Mutex<CrashState>,
    crash_after: Option<u64>,
    reorder: Option<u64>,
}

impl CrashStorage {
    /// Starts from `data`, durable; the machine "crashes" after `crash_after` mutating
    /// operations (`None`: never). After the crash every operation fails.
    pub fn new(data: Vec<u8>, crash_after: Option<u64>) -> Self {
        CrashStorage {
            state: Mutex::new(CrashState {
                volatile: data.clone(),
                durable: data,
                ..CrashState::default()
            }),
            crash_after,
            reorder: None,
        }
    }

    /// Like [`CrashStorage::new`], and a crash keeps, besides what was flushed, the subset of
    /// the unflushed writes that `seed` picks (each with even odds, applied in order).
    pub fn reordering(data: Vec<u8>, crash_after: Option<u64>, seed: u64) -> Self {
        let mut c = CrashStorage::new(data, crash_after);
        c.reorder = Some(seed);
        c
    }

    /// Mutating operations performed (or attempted) so far.
    pub fn ops(&self) -> u64 {
        self.state.lock().map(|s| s.ops).unwrap_or(0)
    }

    /// Whether the crash point was reached.
    pub fn crashed(&self) -> bool {
        self.state.lock().map(|s| s.crashed).unwrap_or(true)
    }

    /// What survives a power cut now: the durable copy, as a fresh writable storage.
    pub fn crash_image(&self) -> MemStorage {
        let Ok(st) = self.state.lock() else {
            return MemStorage::new();
        };
        let mut img = st.durable.clone();
        if let Some(seed) = self.reorder {
            // xorshift64*: a fixed sequence of choices per seed.
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for op in &st.unflushed {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                if x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 63 == 0 {
                    continue;
                }
                match op {
                    Unflushed::Write(start, data) => {
                        let end = start + data.len();
                        if end > img.len() {
                            img.resize(end, 0);
                        }
                        if let Some(dst) = img.get_mut(*start..end) {
                            dst.copy_from_slice(data);
                        }
                    }
                    Unflushed::SetLen(n) => img.resize(*n, 0),
                }
            }
        }
        MemStorage::from_vec(img)
    }

    /// The volatile contents (what a reader sees before any crash).
    pub fn current(&self) -> Vec<u8> {
        self.state
            .lock()
            .map(|s| s.volatile.clone())
            .unwrap_or_default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, CrashState>> {
        self.state
            .lock()
            .map_err(|_| Error::new(ErrorKind::Io, "crash storage lock poisoned"))
    }

    fn tick(&self, st: &mut CrashState) -> Result<()> {
        if st.crashed {
            return Err(crash_error());
        }
        st.ops += 1;
        if let Some(limit) = self.crash_after {
            if st.ops > limit {
                st.crashed = true;
                return Err(crash_error());
            }
        }
        Ok(())
    }
}

fn crash_error() -> Error {
    Error::io(
        "simulated crash",
        std::io::Error::other("simulated power loss"),
    )
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let st = self.lock()?;
        let start = usize::try_from(offset).map_err(|_| Error::out_of_bounds(offset, 0, 0))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| st.volatile.get(start..end))
            .ok_or_else(|| {
                Error::new(ErrorKind::Corrupt, "read past the end of the file").with_offset(offset)
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut st = self.lock()?;
        self.tick(&mut st)?;
        let start = usize::try_from(offset).map_err(|_| Error::out_of_bounds(offset, 0, 0))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| Error::out_of_bounds(offset, 0, 0))?;
        if end > st.volatile.len() {
            st.volatile.resize(end, 0);
        }
        if let Some(dst) = st.volatile.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        if self.reorder.is_some() {
            st.unflushed.push(Unflushed::Write(start, buf.to_vec()));
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.lock()?.volatile.len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut st = self.lock()?;
        self.tick(&mut st)?;
        let n = usize::try_from(len).map_err(|_| Error::out_of_bounds(len, 0, 0))?;
        st.volatile.resize(n, 0);
        if self.reorder.is_some() {
            st.unflushed.push(Unflushed::SetLen(n));
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.lock()?;
        self.tick(&mut st)?;
        st.durable = st.volatile.clone();
        st.unflushed.clear();
        Ok(())
    }

    fn is_writable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_only_flushed() {
        let c = CrashStorage::new(vec![0; 8], Some(3));
        c.write_at(&[1], 0).unwrap();
        c.flush().unwrap();
        c.write_at(&[2], 1).unwrap();
        assert!(c.write_at(&[3], 2).is_err());
        assert!(c.crashed());
        assert_eq!(c.crash_image().to_vec(), vec![1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn reordering_crash_keeps_a_subset_of_unflushed_writes() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..32 {
            let c = CrashStorage::reordering(vec![0; 4], Some(3), seed);
            c.write_at(&[1], 0).unwrap();
            c.write_at(&[2], 1).unwrap();
            c.write_at(&[3], 2).unwrap();
            assert!(c.flush().is_err());
            let img = c.crash_image().to_vec();
            for (i, v) in [1u8, 2, 3].iter().enumerate() {
                assert!(matches!(img.get(i), Some(&x) if x == 0 || x == *v));
            }
            seen.insert(img);
        }
        // Every subset shows up for some seed, including none and all.
        assert_eq!(seen.len(), 8);
    }

    #[test]
    fn faulty_fails_nth() {
        let f = FaultyStorage::new(MemStorage::new(), 2, false);
        f.write_at(&[1], 0).unwrap();
        assert!(f.write_at(&[1], 1).is_err());
        f.write_at(&[1], 2).unwrap();
    }
}
