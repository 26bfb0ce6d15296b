//! Operation sequences (write, write_zeroes, flush, read, reopen) on a vhdx image made by our own
//! create, in memory, against a Vec<u8> shadow model: every read must match the model exactly,
//! reopened images must pass check(), and block_status must never claim zeros over data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdisk::Format;

fuzz_target!(|prog: vdconv_fuzz::Program| {
    vdconv_fuzz::run_ops(Format::Vhdx, &prog);
});
