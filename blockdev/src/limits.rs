//! Resource limits and the checked arithmetic every parser uses on values read from a file.

use crate::error::{Error, ErrorKind, Result};

/// Caps applied to everything an image file can make us allocate or follow.
///
/// Virtual size is deliberately not capped: work is proportional to allocated data, so a tiny
/// file that declares a petabyte costs nothing.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest single metadata allocation sized by the file (tables, bitmaps, logs).
    pub max_alloc: u64,
    /// Total bytes of metadata caches an open image may keep.
    pub max_cache: u64,
    /// Deepest backing/parent chain followed (the top image is depth 0).
    pub max_chain_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_alloc: 128 << 20,
            max_cache: 64 << 20,
            max_chain_depth: 16,
        }
    }
}

impl Limits {
    /// Checks that an allocation of `len` bytes for `field` fits the limit.
    pub fn check_alloc(&self, len: u64, field: &str) -> Result<usize> {
        if len > self.max_alloc {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!(
                    "{field} needs {len} bytes, more than the limit of {} bytes",
                    self.max_alloc
                ),
            )
            .with_field(field));
        }
        usize::try_from(len).map_err(|_| Error::limit(field, 0, "allocation too large"))
    }
}

/// Allocates a zeroed buffer of `len` bytes for `field`, within `limits`, without aborting when
/// memory is short.
pub fn try_alloc(len: u64, limits: &Limits, field: &str) -> Result<Vec<u8>> {
    let n = limits.check_alloc(len, field)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::new(
            ErrorKind::LimitExceeded,
            format!("cannot allocate {n} bytes for {field}"),
        )
        .with_field(field)
    })?;
    v.resize(n, 0);
    Ok(v)
}

/// `a + b`, or a `Corrupt` error naming `field` when it overflows.
pub fn add(a: u64, b: u64, field: &str) -> Result<u64> {
    a.checked_add(b).ok_or_else(|| {
        Error::new(ErrorKind::Corrupt, format!("{field}: arithmetic overflow")).with_field(field)
    })
}

/// `a * b`, or a `Corrupt` error naming `field` when it overflows.
pub fn mul(a: u64, b: u64, field: &str) -> Result<u64> {
    a.checked_mul(b).ok_or_else(|| {
        Error::new(ErrorKind::Corrupt, format!("{field}: arithmetic overflow")).with_field(field)
    })
}

/// `ceil(a / b)` for `b > 0`; an error when `b` is zero.
pub fn div_ceil(a: u64, b: u64, field: &str) -> Result<u64> {
    if b == 0 {
        return Err(
            Error::new(ErrorKind::Corrupt, format!("{field}: division by zero")).with_field(field),
        );
    }
    Ok(a.div_ceil(b))
}

/// Rounds `a` up to a multiple of `align` (a power of two).
pub fn align_up(a: u64, align: u64, field: &str) -> Result<u64> {
    debug_assert!(align.is_power_of_two());
    let mask = align.wrapping_sub(1);
    add(a, mask, field).map(|v| v & !mask)
}

/// Converts a `u64` to `usize` (lengths of buffers), with an error naming `field`.
pub fn to_usize(v: u64, field: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| {
        Error::new(ErrorKind::LimitExceeded, format!("{field}: {v} too large")).with_field(field)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_respects_limit() {
        let l = Limits {
            max_alloc: 1024,
            ..Limits::default()
        };
        assert_eq!(try_alloc(1024, &l, "t").unwrap().len(), 1024);
        assert_eq!(
            try_alloc(1025, &l, "t").unwrap_err().kind(),
            ErrorKind::LimitExceeded
        );
    }

    #[test]
    fn checked_math() {
        assert!(add(u64::MAX, 1, "x").is_err());
        assert!(mul(u64::MAX, 2, "x").is_err());
        assert_eq!(align_up(513, 512, "x").unwrap(), 1024);
        assert!(align_up(u64::MAX, 512, "x").is_err());
        assert_eq!(div_ceil(10, 3, "x").unwrap(), 4);
        assert!(div_ceil(1, 0, "x").is_err());
    }
}
