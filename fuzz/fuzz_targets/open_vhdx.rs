//! Open a VHDX image (sparse input encoding, see `SparseImage`) through the facade (deny-all
//! gate), read everything in bounded steps, walk block_status to the end, check(). A custom
//! mutator re-signs the CRC-32C of both headers, both region tables and the log entries after
//! each mutation (6/8 fully, 1/8 headers only, 1/8 untouched), so mutations reach the parsers
//! behind the checksums.
#![no_main]

use libfuzzer_sys::{fuzz_mutator, fuzz_target};
use vdisk::Format;

fuzz_target!(|data: &[u8]| {
    vdconv_fuzz::open_and_exercise(Format::Vhdx, data);
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let n = libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    vdconv_fuzz::vhdx_resign_input(data, n, max_size, seed)
});
