//! vhdx images (work in progress).
#![forbid(unsafe_code)]
