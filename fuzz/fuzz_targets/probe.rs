//! Probing never panics; a polyglot (two magics) is refused as ambiguous, never guessed.
#![no_main]

use blockdev::{ErrorKind, MemStorage};
use libfuzzer_sys::fuzz_target;
use vdisk::Format;

fuzz_target!(|data: &[u8]| {
    let storage = MemStorage::read_only(data.to_vec());
    let qcow2 = data.starts_with(b"QFI\xfb");
    let vhdx = data.starts_with(b"vhdxfile");
    let vhd = data.starts_with(b"conectix")
        || (data.len() >= 512 && &data[data.len() - 512..data.len() - 504] == b"conectix");
    let n = [qcow2, vhdx, vhd].iter().filter(|b| **b).count();
    match vdisk::probe(&storage) {
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
            // Whatever was detected must open or fail with a typed error.
            if f != Format::Raw {
                vdconv_fuzz::open_and_exercise(f, data);
            }
        }
        Err(e) => assert!(
            e.kind() == ErrorKind::Ambiguous && n >= 2,
            "probe failed: {e} ({:?})",
            e.kind()
        ),
    }
});
