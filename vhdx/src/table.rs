//! The in-memory side of the BAT: the whole table when it fits the cache limit, otherwise
//! 32 KiB pages read on demand and kept in a bounded cache (a 64 TiB image with 1 MiB blocks
//! has 512 MiB of BAT).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use blockdev::{Error, ErrorKind, Limits, Result, Storage};

use crate::bat::{read_entries, PAGE_ENTRIES};

/// Calls `f(index, entry)` for the `entries` entries of a table at `region_off` in `storage`,
/// in order, reading 32 pages at a time (the cache is left alone).
pub fn for_each_on_disk(
    storage: &dyn Storage,
    region_off: u64,
    entries: u64,
    limits: &Limits,
    mut f: impl FnMut(usize, u64),
) -> Result<()> {
    let mut first = 0u64;
    while first < entries {
        let n = (entries - first).min(PAGE_ENTRIES * 32);
        let chunk = read_entries(storage, region_off, first, n, limits)?;
        for (k, e) in chunk.iter().enumerate() {
            f(first as usize + k, *e);
        }
        first += n;
    }
    Ok(())
}

fn lock_err() -> Error {
    Error::new(ErrorKind::Io, "vhdx BAT lock poisoned")
}

#[derive(Default)]
struct Cache {
    pages: HashMap<u64, (Arc<Vec<u64>>, u64)>,
    clock: u64,
    /// Bumped by every invalidation, so a page read before it is not cached after it.
    generation: u64,
}

/// BAT pages read on demand.
pub struct Paged {
    region_off: u64,
    entries: u64,
    max_pages: usize,
    cache: Mutex<Cache>,
}

/// The BAT of an open image.
pub enum Table {
    /// Every entry in memory.
    Full(RwLock<Vec<u64>>),
    /// Pages on demand.
    Paged(Paged),
}

/// A consistent way to look entries up during one operation.
pub enum View<'a> {
    /// Read-locked full table.
    Full(RwLockReadGuard<'a, Vec<u64>>),
    /// Paged table with the storage to read pages from.
    Paged(&'a Paged, &'a dyn Storage, &'a Limits),
}

impl View<'_> {
    /// Entry `i` (0 past the end of the table).
    pub fn get(&self, i: usize) -> Result<u64> {
        match self {
            View::Full(v) => Ok(v.get(i).copied().unwrap_or(0)),
            View::Paged(p, s, l) => p.get(*s, i as u64, l),
        }
    }
}

impl Paged {
    fn get(&self, storage: &dyn Storage, i: u64, limits: &Limits) -> Result<u64> {
        if i >= self.entries {
            return Ok(0);
        }
        let page = i / PAGE_ENTRIES;
        let idx = (i % PAGE_ENTRIES) as usize;
        let generation = {
            let mut c = self.cache.lock().map_err(|_| lock_err())?;
            c.clock += 1;
            let now = c.clock;
            if let Some((p, used)) = c.pages.get_mut(&page) {
                *used = now;
                return Ok(p.get(idx).copied().unwrap_or(0));
            }
            c.generation
        };
        let first = page * PAGE_ENTRIES;
        let n = (self.entries - first).min(PAGE_ENTRIES);
        let data = Arc::new(read_entries(storage, self.region_off, first, n, limits)?);
        let e = data.get(idx).copied().unwrap_or(0);
        let mut c = self.cache.lock().map_err(|_| lock_err())?;
        if c.generation == generation {
            // Another reader may have loaded this page meanwhile: replacing it evicts nothing.
            if c.pages.len() >= self.max_pages && !c.pages.contains_key(&page) {
                if let Some(old) = c.pages.iter().min_by_key(|(_, (_, u))| *u).map(|(k, _)| *k) {
                    c.pages.remove(&old);
                }
            }
            let now = c.clock;
            c.pages.insert(page, (data, now));
        }
        Ok(e)
    }
}

impl Table {
    /// The whole table in memory.
    pub fn full(entries: Vec<u64>) -> Table {
        Table::Full(RwLock::new(entries))
    }

    /// A paged table of `entries` entries at `region_off`, caching at most `cache_bytes`.
    pub fn paged(region_off: u64, entries: u64, cache_bytes: u64) -> Table {
        Table::Paged(Paged {
            region_off,
            entries,
            max_pages: usize::try_from(cache_bytes / (PAGE_ENTRIES * 8))
                .unwrap_or(1)
                .max(1),
            cache: Mutex::new(Cache::default()),
        })
    }

    /// A view for one operation.
    pub fn view<'a>(&'a self, storage: &'a dyn Storage, limits: &'a Limits) -> Result<View<'a>> {
        Ok(match self {
            Table::Full(v) => View::Full(v.read().map_err(|_| lock_err())?),
            Table::Paged(p) => View::Paged(p, storage, limits),
        })
    }

    /// Entry `i`.
    pub fn get(&self, storage: &dyn Storage, limits: &Limits, i: usize) -> Result<u64> {
        self.view(storage, limits)?.get(i)
    }

    /// Records entries already applied to the file.
    pub fn update(&self, changes: &BTreeMap<usize, u64>) -> Result<()> {
        match self {
            Table::Full(v) => {
                let mut b = v.write().map_err(|_| lock_err())?;
                for (i, e) in changes {
                    if let Some(x) = b.get_mut(*i) {
                        *x = *e;
                    }
                }
            }
            Table::Paged(p) => {
                let mut c = p.cache.lock().map_err(|_| lock_err())?;
                c.generation += 1;
                for i in changes.keys() {
                    c.pages.remove(&(*i as u64 / PAGE_ENTRIES));
                }
            }
        }
        Ok(())
    }

    /// Calls `f(index, entry)` for every entry, in order.
    pub fn for_each(
        &self,
        storage: &dyn Storage,
        limits: &Limits,
        mut f: impl FnMut(usize, u64),
    ) -> Result<()> {
        match self {
            Table::Full(v) => {
                let b = v.read().map_err(|_| lock_err())?;
                for (i, e) in b.iter().enumerate() {
                    f(i, *e);
                }
            }
            Table::Paged(p) => for_each_on_disk(storage, p.region_off, p.entries, limits, f)?,
        }
        Ok(())
    }

    /// Whether the table is paged.
    pub fn is_paged(&self) -> bool {
        matches!(self, Table::Paged(_))
    }
}
