//! Positional byte storage under the formats: a file, memory, or (with the `testkit` feature)
//! a fault-injecting wrapper.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use crate::device::{Extent, ExtentKind};
use crate::error::{Error, ErrorKind, Result};

/// What [`Storage::region_at`] found at an offset of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageRegion {
    /// `len` bytes of (possibly) non-hole data start here.
    Data(u64),
    /// `len` bytes of hole (reads as zeros) start here.
    Hole(u64),
}

/// The extent of `len` allocated guest bytes at `offset` that the image stores at file offset
/// `host`: a hole of the file there reads as zeros and is reported `Zero` (no host offset), so
/// copies skip it without reading; writers (qemu's and ours) leave the zero runs of a block
/// unwritten. Shortened to the file region at `host`; all `len` as data when the file cannot
/// tell.
pub fn extent_at_host(storage: &dyn Storage, offset: u64, len: u64, host: u64) -> Result<Extent> {
    Ok(match storage.region_at(host)? {
        StorageRegion::Hole(n) if n > 0 => Extent::new(offset, n.min(len), ExtentKind::Zero),
        StorageRegion::Data(n) if n > 0 => {
            Extent::new(offset, n.min(len), ExtentKind::Data).at_host(host)
        }
        _ => Extent::new(offset, len, ExtentKind::Data).at_host(host),
    })
}

/// Positional reads and writes on `&self`, so several threads may use one storage at once.
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage when needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// The current length in bytes.
    fn len(&self) -> Result<u64>;

    /// Whether the storage is empty.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Whether writes are allowed.
    fn is_writable(&self) -> bool;

    /// The file behind this storage, when there is one.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// Reads up to `buf.len()` bytes at `offset`, stopping at the end; returns how many were
    /// read. Formats whose last structure may run past the end of the file use this.
    fn read_at_most(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let len = self.len()?;
        if offset >= len {
            return Ok(0);
        }
        let avail = usize::try_from(len - offset)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let part = buf.get_mut(..avail).unwrap_or_default();
        self.read_at(part, offset)?;
        Ok(avail)
    }

    /// Where data and holes lie, starting at `offset` (before the end). The default reports
    /// everything as data; a file answers from the filesystem.
    fn region_at(&self, offset: u64) -> Result<StorageRegion> {
        let len = self.len()?;
        Ok(StorageRegion::Data(len.saturating_sub(offset)))
    }

    /// Deallocates a range so it reads as zeros, if the storage can; returns whether it did.
    fn punch_hole(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }
}

/// Forwards every `Storage` method through a smart pointer, so `Box<dyn Storage>` and
/// `Arc<dyn Storage>` are storages too (one list of methods to keep in step with the trait).
macro_rules! forward_storage {
    ($ptr:ident) => {
        impl<T: Storage + ?Sized> Storage for $ptr<T> {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
                (**self).write_at(buf, offset)
            }
            fn len(&self) -> Result<u64> {
                (**self).len()
            }
            fn set_len(&self, len: u64) -> Result<()> {
                (**self).set_len(len)
            }
            fn flush(&self) -> Result<()> {
                (**self).flush()
            }
            fn is_writable(&self) -> bool {
                (**self).is_writable()
            }
            fn path(&self) -> Option<&Path> {
                (**self).path()
            }
            fn read_at_most(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
                (**self).read_at_most(buf, offset)
            }
            fn region_at(&self, offset: u64) -> Result<StorageRegion> {
                (**self).region_at(offset)
            }
            fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
                (**self).punch_hole(offset, len)
            }
        }
    };
}

forward_storage!(Box);
forward_storage!(Arc);

/// A regular file (or block device) opened read-only or read-write.
///
/// Write-behind: once `WRITE_BEHIND` (32 MiB) bytes have been written since the last time, the range
/// they span (when each write started past the end of the one before, as with the sequential
/// writers of `convert`) is handed to the kernel's writeback (`POSIX_FADV_DONTNEED`, which starts writing
/// dirty pages without waiting for them and drops pages already clean). The disk then works
/// while the conversion goes on and the final flush waits only for the last stretch. Each range
/// is advised again two kicks later, when its writeback has usually finished, which drops the
/// pages that are clean by then (dirty ones stay): the next writes reuse them (on a VM whose
/// free memory goes back to the host, fresh pages cost the copy about half its speed) and a
/// long copy does not fill the page cache with its output.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
    behind: Mutex<WriteBehind>,
}

/// Bytes written between two write-behind kicks.
pub const WRITE_BEHIND: u64 = 32 << 20;

/// What was written since the last write-behind kick.
#[derive(Debug, Default)]
struct WriteBehind {
    bytes: u64,
    lo: u64,
    hi: u64,
    /// Every write so far started at or after the end of the one before.
    forward: bool,
    /// The thread that hands ranges to writeback (started at the first kick), so the writer
    /// does not spend its own time submitting writeback and dropping pages.
    worker: Option<mpsc::Sender<(u64, u64)>>,
    /// Keep written pages cached (the output is read back soon): advise each range once.
    keep: bool,
}

impl WriteBehind {
    /// Records a write; returns the range to hand to writeback when it is time: only for
    /// writes going forward through the file (sparse or not), as sequential writers do.
    fn record(&mut self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len);
        if self.bytes == 0 {
            (self.lo, self.hi, self.forward) = (offset, end, true);
        } else {
            self.forward &= offset >= self.hi;
            self.lo = self.lo.min(offset);
            self.hi = self.hi.max(end);
        }
        self.bytes = self.bytes.saturating_add(len);
        if self.bytes < WRITE_BEHIND {
            return None;
        }
        let range = (self.lo, self.hi - self.lo);
        let forward = self.forward;
        self.bytes = 0;
        forward.then_some(range)
    }

    /// Hands `range` of `file` to writeback on the worker thread (or here when there is none).
    /// Only a hint: a failure changes nothing about what was written.
    fn kick(&mut self, file: &File, range: (u64, u64)) {
        if self.worker.is_none() {
            if let Ok(f) = file.try_clone() {
                let keep = self.keep;
                let (tx, rx) = mpsc::channel::<(u64, u64)>();
                let spawned = std::thread::Builder::new()
                    .name("write-behind".into())
                    .spawn(move || {
                        // Ranges advised before, advised again two kicks later: by then their
                        // writeback has usually finished and the advice drops the clean pages,
                        // which the next writes reuse instead of taking fresh memory (pages
                        // still dirty are skipped; the last two ranges are not advised again).
                        let mut earlier = std::collections::VecDeque::with_capacity(3);
                        for range in rx {
                            advise_written(&f, range);
                            if keep {
                                continue;
                            }
                            earlier.push_back(range);
                            if earlier.len() > 2 {
                                if let Some(old) = earlier.pop_front() {
                                    advise_written(&f, old);
                                }
                            }
                        }
                    });
                if spawned.is_ok() {
                    self.worker = Some(tx);
                }
            }
        }
        let sent = self
            .worker
            .as_ref()
            .is_some_and(|tx| tx.send(range).is_ok());
        if !sent {
            advise_written(file, range);
        }
    }
}

/// `POSIX_FADV_DONTNEED` on `(start, len)` of `file`: starts writeback of its dirty pages
/// without waiting and drops the pages already clean. A hint: its failure is ignored.
fn advise_written(file: &File, (start, len): (u64, u64)) {
    let _ = rustix::fs::fadvise(
        file,
        start,
        std::num::NonZeroU64::new(len),
        rustix::fs::Advice::DontNeed,
    );
}

impl FileStorage {
    /// Opens an existing file; `writable` asks for read-write access.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| {
                let kind = if e.kind() == std::io::ErrorKind::NotFound {
                    ErrorKind::BackingNotFound
                } else {
                    ErrorKind::Io
                };
                Error::new(kind, "cannot open")
                    .with_source(e)
                    .with_path(path)
            })?;
        if !writable {
            // The formats read what the image's own maps say is there, in pieces of 256 KiB
            // and more: the kernel's readahead would also read the holes between data runs.
            // Measured on cold sources (medians): vhdx -> qcow2 2.33 -> 2.09 s, raw -> qcow2
            // 4.33 -> 2.91 s; no change on cached ones. A hint: its failure is ignored.
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Random);
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable,
            behind: Mutex::default(),
        })
    }

    /// Creates a new file, failing when it exists.
    pub fn create_new(path: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map_err(|e| {
                let kind = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    ErrorKind::AlreadyExists
                } else {
                    ErrorKind::Io
                };
                Error::new(kind, "cannot create")
                    .with_source(e)
                    .with_path(path)
            })?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable: true,
            behind: Mutex::default(),
        })
    }

    /// Does not advise written ranges a second time, so what is written mostly stays in the
    /// page cache (the first advice may still drop pages already clean), for an output that is
    /// read back right after (`convert --verify`). Call it before the first write.
    pub fn keep_written_pages(self) -> Self {
        if let Ok(mut wb) = self.behind.lock() {
            wb.keep = true;
        }
        self
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, path: PathBuf, writable: bool) -> Self {
        FileStorage {
            file,
            path,
            writable,
            behind: Mutex::default(),
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn err(&self, what: &str, e: std::io::Error, offset: u64) -> Error {
        Error::io(what, e).with_offset(offset).with_path(&self.path)
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "read of {} bytes runs past the end of the file (truncated?)",
                        buf.len()
                    ),
                )
                .with_offset(offset)
                .with_path(&self.path)
            } else {
                self.err("read failed", e, offset)
            }
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("file opened read-only").with_path(&self.path));
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.err("write failed", e, offset))?;
        if let Ok(mut wb) = self.behind.lock() {
            if let Some(range) = wb.record(offset, buf.len() as u64) {
                wb.kick(&self.file, range);
            }
        }
        Ok(())
    }

    fn read_at_most(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        // Reads until the buffer is full or the file ends, without asking for its length (a
        // stat per read otherwise: the qcow2 reader reads every data run this way).
        let mut done = 0usize;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            let at = offset.saturating_add(done as u64);
            match self.file.read_at(rest, at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("read failed", e, at)),
            }
        }
        Ok(done)
    }

    fn len(&self) -> Result<u64> {
        let md = self
            .file
            .metadata()
            .map_err(|e| self.err("stat failed", e, 0))?;
        if md.file_type().is_file() {
            return Ok(md.len());
        }
        // Block devices report 0 in st_size; seeking to the end gives their size.
        rustix::fs::seek(&self.file, rustix::fs::SeekFrom::End(0))
            .map_err(|e| self.err("seek failed", e.into(), 0))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("file opened read-only").with_path(&self.path));
        }
        self.file
            .set_len(len)
            .map_err(|e| self.err("truncate failed", e, len))
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.file
            .sync_all()
            .map_err(|e| self.err("fsync failed", e, 0))
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn region_at(&self, offset: u64) -> Result<StorageRegion> {
        use rustix::fs::{seek, SeekFrom};
        // SEEK_DATA from `offset`: ENXIO means only a hole remains up to the end (or `offset`
        // is at or past the end). The file length is asked for only then: this runs once per
        // extent of a conversion.
        let data = match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => {
                let len = self.len()?;
                return Ok(if offset >= len {
                    StorageRegion::Data(0)
                } else {
                    StorageRegion::Hole(len - offset)
                });
            }
            Err(_) => {
                let len = self.len()?;
                return Ok(StorageRegion::Data(len.saturating_sub(offset)));
            }
        };
        if data > offset {
            return Ok(StorageRegion::Hole(data - offset));
        }
        // SEEK_HOLE never passes the end of the file (there is a virtual hole there).
        let hole = match seek(&self.file, SeekFrom::Hole(offset)) {
            Ok(h) => h,
            Err(_) => self.len()?,
        };
        Ok(StorageRegion::Data(hole.max(offset + 1) - offset))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        use rustix::fs::{fallocate, FallocateFlags};
        if !self.writable {
            return Err(Error::read_only("file opened read-only").with_path(&self.path));
        }
        if len == 0 {
            return Ok(true);
        }
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => Ok(false),
            Err(e) => Err(self.err("punching a hole failed", e.into(), offset)),
        }
    }
}

/// Storage in memory: for tests, fuzzing and in-memory overlays.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemStorage {
    /// An empty writable storage.
    pub fn new() -> Self {
        MemStorage::default()
    }

    /// A writable storage holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(data),
            read_only: false,
        }
    }

    /// A read-only storage holding `data`.
    pub fn read_only(data: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(data),
            read_only: true,
        }
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn poisoned() -> Error {
        Error::new(ErrorKind::Io, "memory storage lock poisoned")
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().map_err(|_| Self::poisoned())?;
        let start = usize::try_from(offset)
            .map_err(|_| Error::out_of_bounds(offset, buf.len() as u64, data.len() as u64))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| data.get(start..end))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "read of {} bytes runs past the end of the file (truncated?)",
                        buf.len()
                    ),
                )
                .with_offset(offset)
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("memory storage is read-only"));
        }
        let mut data = self.data.write().map_err(|_| Self::poisoned())?;
        let start = usize::try_from(offset)
            .map_err(|_| Error::out_of_bounds(offset, buf.len() as u64, data.len() as u64))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| Error::out_of_bounds(offset, buf.len() as u64, data.len() as u64))?;
        if end > data.len() {
            data.resize(end, 0);
        }
        if let Some(dst) = data.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.read().map_err(|_| Self::poisoned())?.len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("memory storage is read-only"));
        }
        let n = usize::try_from(len).map_err(|_| Error::out_of_bounds(len, 0, 0))?;
        self.data
            .write()
            .map_err(|_| Self::poisoned())?
            .resize(n, 0);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn is_writable(&self) -> bool {
        !self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_read_write() {
        let m = MemStorage::new();
        m.write_at(b"abc", 10).unwrap();
        assert_eq!(m.len().unwrap(), 13);
        let mut b = [0u8; 4];
        m.read_at(&mut b, 9).unwrap();
        assert_eq!(&b, b"\0abc");
        assert!(m.read_at(&mut b, 11).is_err());
        assert_eq!(m.read_at_most(&mut b, 11).unwrap(), 2);
    }

    #[test]
    fn write_behind_only_for_forward_writes() {
        let mut wb = WriteBehind::default();
        let step = WRITE_BEHIND / 4;
        // Forward and sparse: kicked once enough was written, over the span written.
        assert_eq!(wb.record(0, step), None);
        assert_eq!(wb.record(3 * step, step), None);
        assert_eq!(wb.record(10 * step, step), None);
        assert_eq!(wb.record(11 * step, step), Some((0, 12 * step)));
        // Going back (metadata rewritten, random writes): no kick, and the count restarts.
        assert_eq!(wb.record(20 * step, step), None);
        assert_eq!(wb.record(0, step), None);
        assert_eq!(wb.record(21 * step, step), None);
        assert_eq!(wb.record(22 * step, step), None);
        for k in 23..26 {
            assert_eq!(wb.record(k * step, step), None);
        }
        assert_eq!(wb.record(26 * step, step), Some((23 * step, 4 * step)));
    }

    #[test]
    fn file_regions_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = FileStorage::create_new(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_at(&[1u8; 4096], 4 << 20).unwrap();
        // Filesystems without SEEK_DATA support report data everywhere, which is still valid.
        match f.region_at(0).unwrap() {
            StorageRegion::Hole(n) => assert_eq!(n, 4 << 20),
            StorageRegion::Data(n) => assert!(n > 0),
        }
        let mut b = [9u8; 16];
        f.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [0u8; 16]);
        // Short reads at the end of the file, none past it.
        let mut b = [9u8; 16];
        assert_eq!(f.read_at_most(&mut b, (8 << 20) - 4).unwrap(), 4);
        assert_eq!(f.read_at_most(&mut b, 8 << 20).unwrap(), 0);
        assert_eq!(f.read_at_most(&mut b, 9 << 20).unwrap(), 0);
        if f.punch_hole(4 << 20, 4096).unwrap() {
            let mut b = [9u8; 4096];
            f.read_at(&mut b, 4 << 20).unwrap();
            assert!(b.iter().all(|&x| x == 0));
        }
    }
}
