//! Probing never panics; a polyglot (two magics) is refused as ambiguous, never guessed; a
//! single magic gives that format, which then opens or fails with a typed error. The input is a
//! sparse image (see `SparseImage`), so file lengths up to 2^64 are reachable.
#![no_main]

use blockdev::{ErrorKind, Storage};
use libfuzzer_sys::fuzz_target;
use vdconv_fuzz::SparseImage;
use vdisk::Format;

fuzz_target!(|data: &[u8]| {
    let img = SparseImage::decode(data);
    let len = img.file_len();
    let mut head = [0u8; 8];
    let n = len.min(8) as usize;
    img.read_at(&mut head[..n], 0).unwrap();
    let head = &head[..n];
    let qcow2 = head.starts_with(b"QFI\xfb");
    let vhdx = head.starts_with(b"vhdxfile");
    let mut tail = [0u8; 8];
    let vhd = head.starts_with(b"conectix")
        || (len >= 512 && {
            img.read_at(&mut tail, len - 512).unwrap();
            &tail == b"conectix"
        });
    let n = [qcow2, vhdx, vhd].iter().filter(|b| **b).count();
    match vdisk::probe(&img) {
        Ok(f) => {
            assert!(n <= 1, "{n} magics matched, probe chose {f}");
            let expect = if qcow2 {
                Format::Qcow2
            } else if vhdx {
                Format::Vhdx
            } else if vhd {
                Format::Vhd
            } else {
                Format::Raw
            };
            assert_eq!(f, expect);
            if f != Format::Raw {
                vdconv_fuzz::open_image_and_exercise(f, img);
            }
        }
        Err(e) => assert!(
            e.kind() == ErrorKind::Ambiguous && n >= 2,
            "probe failed: {e} ({:?})",
            e.kind()
        ),
    }
});
