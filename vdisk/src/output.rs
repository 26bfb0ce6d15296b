//! Publishing new images atomically: write under a temporary name beside the destination,
//! flush, then rename into place; on any failure nothing is left under either name.

use std::path::{Path, PathBuf};

use blockdev::{random_bytes, Error, ErrorKind, FileStorage, Result};

/// A new file being written under a temporary name; removed on drop unless published.
#[derive(Debug)]
pub struct PendingOutput {
    tmp: PathBuf,
    dst: PathBuf,
    force: bool,
    published: bool,
}

impl PendingOutput {
    /// Creates `.NAME.tmp.XXXXXXXX` in `dst`'s directory. Fails early with `AlreadyExists`
    /// when `dst` exists and `force` is false.
    pub fn create(dst: &Path, force: bool) -> Result<(Self, FileStorage)> {
        // Not even with --force: the rename could not replace it, after all the work.
        if std::fs::symlink_metadata(dst).is_ok_and(|m| m.is_dir()) {
            return Err(Error::invalid_argument(
                "destination is a directory; give the new image's file name",
            )
            .with_path(dst));
        }
        if !force && std::fs::symlink_metadata(dst).is_ok() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "destination exists; use --force to overwrite it",
            )
            .with_path(dst));
        }
        let dir = parent_dir(dst);
        let name = dst
            .file_name()
            .ok_or_else(|| Error::invalid_argument("destination has no file name").with_path(dst))?
            .to_string_lossy()
            .to_string();
        let mut last_err = None;
        for _ in 0..8 {
            let mut r = [0u8; 4];
            random_bytes(&mut r)?;
            let suffix: String = r.iter().map(|b| format!("{b:02x}")).collect();
            let tmp = dir.join(format!(".{name}.tmp.{suffix}"));
            match FileStorage::create_new(&tmp) {
                Ok(storage) => {
                    return Ok((
                        PendingOutput {
                            tmp,
                            dst: dst.to_path_buf(),
                            force,
                            published: false,
                        },
                        storage,
                    ))
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => return Err(e.replace_path(&tmp, dst)),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::new(ErrorKind::Io, "cannot create a temporary file")))
    }

    /// The temporary path being written.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// The final path.
    pub fn dst_path(&self) -> &Path {
        &self.dst
    }

    /// Renames the (already flushed) temporary file into place and syncs the directory.
    /// Without `force`, an existing destination is never replaced, even one created meanwhile.
    pub fn publish(mut self) -> Result<()> {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        let flags = if self.force {
            RenameFlags::empty()
        } else {
            RenameFlags::NOREPLACE
        };
        match renameat_with(CWD, &self.tmp, CWD, &self.dst, flags) {
            Ok(()) => {}
            Err(rustix::io::Errno::EXIST) => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    "destination exists; use --force to overwrite it",
                )
                .with_path(&self.dst))
            }
            // Filesystems without RENAME_NOREPLACE: check, then plain rename.
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => {
                if !self.force && std::fs::symlink_metadata(&self.dst).is_ok() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        "destination exists; use --force to overwrite it",
                    )
                    .with_path(&self.dst));
                }
                std::fs::rename(&self.tmp, &self.dst)
                    .map_err(|e| Error::io("rename failed", e).with_path(&self.dst))?;
            }
            Err(e) => return Err(Error::io("rename failed", e.into()).with_path(&self.dst)),
        }
        self.published = true;
        if let Ok(d) = std::fs::File::open(parent_dir(&self.dst)) {
            // A failed directory sync leaves a complete file that may not survive a power cut;
            // report it, the data itself is already flushed.
            d.sync_all()
                .map_err(|e| Error::io("syncing the destination directory failed", e))?;
        }
        Ok(())
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::Storage;

    #[test]
    fn publish_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out.img");
        {
            let (p, s) = PendingOutput::create(&dst, false).unwrap();
            s.write_at(b"x", 0).unwrap();
            // dropped without publishing
            let _ = p;
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let (p, s) = PendingOutput::create(&dst, false).unwrap();
        s.write_at(b"x", 0).unwrap();
        p.publish().unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"x");
        assert_eq!(
            PendingOutput::create(&dst, false).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        let (p, _s) = PendingOutput::create(&dst, true).unwrap();
        p.publish().unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"");
    }
}
