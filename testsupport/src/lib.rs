//! Test helpers shared by the crates of the workspace (dev-dependency only).
//!
//! * [`shared_fixture`] unpacks one of the third-party images of `../shared/fixtures` (see its
//!   `MANIFEST.md`) into a temporary directory, sparsely. When the folder is missing the test
//!   is skipped with one line on stderr, unless `VDCONV_REQUIRE_SHARED_FIXTURES=1`, when it fails.
//!   `VDCONV_SHARED_FIXTURES` overrides the folder.
//! * [`require_tool`] fails the test with an install hint when an oracle (qemu-img, vhdiinfo)
//!   is missing.
//! * [`sha256_device`] hashes the whole guest content of a device.
//! * [`DirGate`] opens parents beside the referrer, for the format crates' tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blockdev::BlockDevice;
use sha2::{Digest, Sha256};

mod gate;
pub use gate::{DirGate, ParentFormat};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The shared fixtures folder, or `None` (test skipped) when it is absent and not required.
pub fn shared_fixtures_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("VDCONV_SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/fixtures"));
    if dir.join("MANIFEST.md").is_file() {
        return Some(dir);
    }
    if std::env::var("VDCONV_REQUIRE_SHARED_FIXTURES").as_deref() == Ok("1") {
        panic!(
            "shared fixtures not found at {} and VDCONV_REQUIRE_SHARED_FIXTURES=1",
            dir.display()
        );
    }
    eprintln!("skipped: shared fixtures not found at {}", dir.display());
    None
}

/// An unpacked fixture; the directory is removed on drop.
pub struct Fixture {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The unpacked image.
    pub path: PathBuf,
}

/// Unpacks `rel` (e.g. `dissect/fixed.vhd.gz`) into a fresh temporary directory, writing
/// zero 4 KiB blocks as holes. Returns `None` when the fixtures are absent (test skipped).
pub fn shared_fixture(rel: &str) -> Option<Fixture> {
    let root = shared_fixtures_dir()?;
    let dir = tempfile::tempdir().unwrap();
    let path = unpack_into(&root.join(rel), dir.path());
    Some(Fixture { dir, path })
}

/// Unpacks several fixtures into one directory (chains whose layers refer to each other).
pub fn shared_fixtures_together(rels: &[&str]) -> Option<(tempfile::TempDir, Vec<PathBuf>)> {
    let root = shared_fixtures_dir()?;
    let dir = tempfile::tempdir().unwrap();
    let paths = rels
        .iter()
        .map(|r| unpack_into(&root.join(r), dir.path()))
        .collect();
    Some((dir, paths))
}

/// Decompresses `src` (`.gz`, `.bz2`, `.xz`, or plain) into `dir`, sparsely.
pub fn unpack_into(src: &Path, dir: &Path) -> PathBuf {
    let name = src.file_name().unwrap().to_string_lossy().to_string();
    let (tool, out_name) = if let Some(n) = name.strip_suffix(".gz") {
        (Some("gzip"), n.to_string())
    } else if let Some(n) = name.strip_suffix(".bz2") {
        (Some("bzip2"), n.to_string())
    } else if let Some(n) = name.strip_suffix(".xz") {
        (Some("xz"), n.to_string())
    } else {
        (None, name.clone())
    };
    let out = dir.join(out_name);
    match tool {
        Some(t) => {
            let mut child = Command::new(t)
                .arg("-dc")
                .arg(src)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {t} to unpack {}: {e}", src.display()));
            let mut stdout = child.stdout.take().unwrap();
            write_sparse(&mut stdout, &out);
            let status = child.wait().unwrap();
            assert!(status.success(), "{t} failed to unpack {}", src.display());
        }
        None => write_sparse(&mut std::fs::File::open(src).unwrap(), &out),
    }
    out
}

fn write_sparse(reader: &mut dyn Read, out: &Path) {
    use std::io::Seek;
    let mut f = std::fs::File::create(out).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = reader.read(&mut buf[filled..]).unwrap();
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        for chunk in buf[..filled].chunks(4096) {
            if chunk.iter().all(|&b| b == 0) {
                f.seek(std::io::SeekFrom::Current(chunk.len() as i64))
                    .unwrap();
            } else {
                f.write_all(chunk).unwrap();
            }
        }
        total += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    f.set_len(total).unwrap();
}

/// Fails the test with an install hint when `tool` is not on PATH.
pub fn require_tool(tool: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        let pkg = match tool {
            "qemu-img" => "qemu-utils",
            "vhdiinfo" | "vhdimount" | "vhdiexport" => "libvhdi-utils",
            _ => tool,
        };
        panic!("{tool} is required by this test: install it with `apt-get install {pkg}` (the README's setup command does)")
    })
}

/// Runs a command, returning (status code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// SHA-256 (hex) of the whole guest content of `dev`, skipping reads of ranges the chain
/// reports as zero.
pub fn sha256_device(dev: &dyn BlockDevice) -> String {
    let size = dev.size();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], off).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex(&h.finalize())
}

/// SHA-256 (hex) of a file's bytes.
pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Lower-case hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 (hex) of `qemu-img convert -O raw` of `path` (format `fmt`), for comparisons.
pub fn qemu_sha256(path: &Path, fmt: &str) -> String {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let (code, _, err) = run(Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(path)
        .arg(&out));
    assert_eq!(code, 0, "qemu-img convert failed: {err}");
    sha256_file(&out)
}

/// A deterministic pseudo-random byte generator for test data (xorshift).
pub struct TestRng(u64);

impl TestRng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        TestRng(seed | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Fills `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// SHA-256 (hex) of a VHD/VHDX's guest content as libvhdi (`pyvhdi`, Debian's python3-libvhdi)
/// reads it; `parent` is opened and set as the parent of a differencing image.
pub fn pyvhdi_sha256(path: &Path, parent: Option<&Path>) -> String {
    let mut chain = vec![path];
    chain.extend(parent);
    pyvhdi_sha256_chain(&chain)
}

/// SHA-256 (hex) of the guest content of a VHD/VHDX chain, top first, as libvhdi reads it:
/// each file is set as the parent of the one before.
pub fn pyvhdi_sha256_chain(chain: &[&Path]) -> String {
    let python = "/usr/bin/python3";
    let probe = run(Command::new(python).args(["-c", "import pyvhdi"]));
    assert_eq!(
        probe.0, 0,
        "pyvhdi is required by this test: install it with `apt-get install python3-libvhdi` (the README's setup command does)"
    );
    let script = r#"
import hashlib, sys, pyvhdi
files = []
for path in sys.argv[1:]:
    f = pyvhdi.file()
    f.open(path)
    files.append(f)
for child, parent in reversed(list(zip(files, files[1:]))):
    child.set_parent(parent)
f = files[0]
h = hashlib.sha256()
size = f.get_media_size()
off = 0
while off < size:
    n = min(4 << 20, size - off)
    data = f.read_buffer_at_offset(n, off)
    assert len(data) == n, (len(data), n, off)
    h.update(data)
    off += n
print(h.hexdigest(), size)
"#;
    let mut cmd = Command::new(python);
    cmd.arg("-c").arg(script).args(chain);
    let (code, out, err) = run(&mut cmd);
    let top = chain
        .first()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    assert_eq!(code, 0, "pyvhdi could not read {top}: {err}");
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
