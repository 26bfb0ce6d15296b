//! Random extents (data and zeros, increasing offsets) through our writer of each format; the
//! output must open, read back equal to the model, and pass check().
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|rt: vdconv_fuzz::RoundTrip| {
    vdconv_fuzz::run_roundtrip(&rt);
});
