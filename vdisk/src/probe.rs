//! Format detection by magic.
//!
//! Probing is a security decision: a guest that can write a raw image can forge a header that
//! names host files. vdconv therefore probes only to open sources read-only, refuses inputs that
//! match two formats, and falls back to raw only when no magic matches.

use blockdev::{Error, ErrorKind, Result, Storage};

use crate::format::Format;

/// Detects the format of `storage` from the first 4 KiB and the last 512 bytes.
///
/// * qcow2: `QFI\xfb` at 0.
/// * VHDX: `vhdxfile` at 0.
/// * VHD: `conectix` in the last 512 bytes (every VHD), or at 0 (the footer copy of a dynamic
///   disk whose trailing footer is damaged).
///
/// A file matching two formats is refused as ambiguous.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let len = storage.len()?;
    let mut head = [0u8; 8];
    let head_len = storage.read_at_most(&mut head, 0)?;
    let head = head.get(..head_len).unwrap_or_default();
    let mut matches = Vec::new();
    if head.starts_with(b"QFI\xfb") {
        matches.push(Format::Qcow2);
    }
    if head.starts_with(b"vhdxfile") {
        matches.push(Format::Vhdx);
    }
    let mut vhd = head.starts_with(b"conectix");
    if len >= 512 {
        let mut tail = [0u8; 8];
        storage.read_at(&mut tail, len - 512)?;
        vhd |= &tail == b"conectix";
    }
    if vhd {
        matches.push(Format::Vhd);
    }
    match matches.as_slice() {
        [] => Ok(Format::Raw),
        [one] => Ok(*one),
        many => Err(Error::new(
            ErrorKind::Ambiguous,
            format!(
                "the file matches several formats ({}); name one with -f",
                many.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemStorage;

    #[test]
    fn magic_table() {
        assert_eq!(
            probe(&MemStorage::from_vec(b"QFI\xfb\0\0\0\x03".to_vec())).unwrap(),
            Format::Qcow2
        );
        assert_eq!(
            probe(&MemStorage::from_vec(b"vhdxfile".to_vec())).unwrap(),
            Format::Vhdx
        );
        assert_eq!(
            probe(&MemStorage::from_vec(vec![0; 100])).unwrap(),
            Format::Raw
        );
        let mut fixed = vec![0u8; 4096];
        fixed[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert_eq!(
            probe(&MemStorage::from_vec(fixed.clone())).unwrap(),
            Format::Vhd
        );
        fixed[..4].copy_from_slice(b"QFI\xfb");
        assert_eq!(
            probe(&MemStorage::from_vec(fixed)).unwrap_err().kind(),
            ErrorKind::Ambiguous
        );
    }
}
