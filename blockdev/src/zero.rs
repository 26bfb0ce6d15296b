//! Fast detection of all-zero buffers, used by every zero-skipping path.

/// Whether every byte of `buf` is zero.
///
/// The inner loop ORs 64-byte chunks without early exit, which the compiler vectorises; the
/// outer loop exits at the first non-zero chunk.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for chunk in &mut chunks {
        let mut acc = 0u8;
        for &b in chunk {
            acc |= b;
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Splits `buf` (which starts at a multiple of `granularity`) into runs of whole
/// `granularity`-sized pieces that are all zero or not; calls `f(start, len, zero)` for each
/// maximal run, with `start` relative to `buf`.
pub fn zero_runs(buf: &[u8], granularity: usize, mut f: impl FnMut(usize, usize, bool)) {
    let g = granularity.max(1);
    let mut run_start = 0usize;
    let mut run_zero: Option<bool> = None;
    let mut pos = 0usize;
    for piece in buf.chunks(g) {
        let z = is_zero(piece);
        match run_zero {
            Some(rz) if rz == z => {}
            Some(rz) => {
                f(run_start, pos - run_start, rz);
                run_start = pos;
                run_zero = Some(z);
            }
            None => run_zero = Some(z),
        }
        pos += piece.len();
    }
    if let Some(rz) = run_zero {
        f(run_start, pos - run_start, rz);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_zero() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[7] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    #[test]
    fn runs() {
        let mut v = vec![0u8; 4096 * 4];
        v[4096 * 2 + 5] = 1;
        let mut out = Vec::new();
        zero_runs(&v, 4096, |s, l, z| out.push((s, l, z)));
        assert_eq!(
            out,
            vec![(0, 8192, true), (8192, 4096, false), (12288, 4096, true)]
        );
    }
}
