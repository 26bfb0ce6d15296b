//! qcow2 images (work in progress).
#![forbid(unsafe_code)]
