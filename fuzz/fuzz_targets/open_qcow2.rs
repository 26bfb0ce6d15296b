//! Open a qcow2 image (sparse input encoding, see `SparseImage`) through the facade (deny-all
//! gate), read everything in bounded steps, walk block_status to the end, check().
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdisk::Format;

fuzz_target!(|data: &[u8]| {
    vdconv_fuzz::open_and_exercise(Format::Qcow2, data);
});
