//! vdisk (in progress).
