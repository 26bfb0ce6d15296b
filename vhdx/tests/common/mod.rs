//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use blockdev::{
    BackingRequest, BlockDevice, Error, FileStorage, Limits, OpenGate, Result, Storage,
};
use testsupport::ParentFormat;
use vhdx::{OpenOptions, VhdxImage};

/// Parents beside the referrer, opened as VHDXs.
pub struct Vhdx;

impl ParentFormat for Vhdx {
    fn open_parent(
        storage: Box<dyn Storage>,
        gate: &dyn OpenGate,
        depth: u32,
    ) -> Result<Box<dyn BlockDevice>> {
        Ok(Box::new(open_with(storage, false, gate, depth)?))
    }
}

pub type DirGate = testsupport::DirGate<Vhdx>;

pub fn open_with(
    storage: Box<dyn Storage>,
    writable: bool,
    gate: &dyn OpenGate,
    depth: u32,
) -> Result<VhdxImage> {
    open_with_limits(storage, writable, gate, depth, &Limits::default())
}

/// Limits whose cache is too small for any BAT: the paged table is used.
pub fn paged_limits() -> Limits {
    let mut l = Limits::default();
    l.max_cache = 8;
    l
}

pub fn open_with_limits(
    storage: Box<dyn Storage>,
    writable: bool,
    gate: &dyn OpenGate,
    depth: u32,
    limits: &Limits,
) -> Result<VhdxImage> {
    VhdxImage::open(
        storage,
        &OpenOptions {
            gate,
            writable,
            limits,
            depth,
        },
    )
}

pub fn open_path(path: &Path, writable: bool) -> Result<VhdxImage> {
    open_with(
        Box::new(FileStorage::open(path, writable)?),
        writable,
        &DirGate::new(),
        0,
    )
}

pub fn open_mem(data: Vec<u8>, writable: bool) -> Result<VhdxImage> {
    open_with(
        Box::new(blockdev::MemStorage::from_vec(data)),
        writable,
        &DirGate::new(),
        0,
    )
}

/// A gate that opens one in-memory VHDX parent, whatever the candidates.
pub struct MemGate {
    pub parent: Vec<u8>,
}

impl OpenGate for MemGate {
    fn open_backing(&self, req: &BackingRequest<'_>) -> Result<Box<dyn BlockDevice>> {
        let img = open_with(
            Box::new(blockdev::MemStorage::read_only(self.parent.clone())),
            false,
            &DirGate::new(),
            req.depth,
        )?;
        Ok(Box::new(img))
    }

    fn open_data_file(&self, _req: &BackingRequest<'_>, _w: bool) -> Result<Box<dyn Storage>> {
        Err(Error::unsupported("no data files"))
    }
}

/// Creates an image in memory.
pub fn create_mem(opts: &vhdx::CreateOptions) -> Vec<u8> {
    let m = blockdev::MemStorage::new();
    vhdx::create(&m, opts).unwrap();
    m.to_vec()
}

/// Reads the whole guest content.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

/// The parent link of an in-memory parent image.
pub fn link_of(parent: &VhdxImage) -> vhdx::create::ParentLink {
    vhdx::create::ParentLink {
        data_write_guid: parent.data_write_guid(),
        disk_id: parent.disk_id(),
        size: parent.size(),
        logical: parent.sector_sizes().logical,
        relative_path: ".\\parent.vhdx".into(),
        absolute_win32_path: "C:\\vms\\parent.vhdx".into(),
    }
}

/// Unpacks a shared fixture once into a per-user cache (the 10 GiB images take long to
/// decompress) and returns its path; `None` when the fixtures are absent (test skipped).
/// Callers must open it read-only.
pub fn cached_fixture(rel: &str) -> Option<PathBuf> {
    // Tests of one binary run on threads of one process: one unpacks at a time (they would
    // share the temporary directory).
    static UNPACK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = UNPACK.lock().unwrap_or_else(|e| e.into_inner());
    let root = testsupport::shared_fixtures_dir()?;
    let src = root.join(rel);
    let md = std::fs::metadata(&src).unwrap();
    let stamp = format!(
        "{} {:?}",
        md.len(),
        md.modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    );
    let cache = std::env::temp_dir().join("vdconv-vhdx-fixture-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let key = rel.replace('/', "_");
    let marker = cache.join(format!("{key}.ok"));
    let dir = cache.join(&key);
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(stamp.as_str()) {
        if let Some(Ok(e)) = std::fs::read_dir(&dir).ok().and_then(|mut d| d.next()) {
            return Some(e.path());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let tmp = cache.join(format!("{key}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let out = testsupport::unpack_into(&src, &tmp);
    std::fs::rename(&tmp, &dir).unwrap();
    std::fs::write(&marker, stamp).unwrap();
    Some(dir.join(out.file_name().unwrap()))
}

/// SHA-256 of a file's length and data regions (holes skipped, so a 10 GiB sparse file is
/// cheap); any write, even into a hole, changes it.
pub fn file_digest(path: &Path) -> String {
    use sha2::Digest;
    let s = FileStorage::open(path, false).unwrap();
    let len = s.len().unwrap();
    let mut h = sha2::Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        match s.region_at(off).unwrap() {
            blockdev::StorageRegion::Hole(n) => off += n.max(1),
            blockdev::StorageRegion::Data(n) => {
                let end = off + n.max(1);
                while off < end {
                    let k = (end - off).min(buf.len() as u64) as usize;
                    s.read_at(&mut buf[..k], off).unwrap();
                    if !blockdev::is_zero(&buf[..k]) {
                        h.update(off.to_le_bytes());
                        h.update(&buf[..k]);
                    }
                    off += k as u64;
                }
            }
        }
    }
    testsupport::hex(&h.finalize())
}
