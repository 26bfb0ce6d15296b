//! Comparing two images by content.

use blockdev::{BlockDevice, Result};

use crate::chain::chain_status;

/// The outcome of a comparison.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CompareResult {
    /// Whether the guest contents are equal (a size difference counts only when the extra
    /// part of the larger image is not all zeros, as qemu-img compare does without `-s`).
    pub identical: bool,
    /// The first differing guest offset.
    pub first_difference: Option<u64>,
    /// What differs there (`None` when identical).
    pub mismatch: Option<Mismatch>,
    /// Sizes of the two images.
    pub sizes: (u64, u64),
}

/// What made two images different.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mismatch {
    /// The guest bytes differ.
    Content,
    /// The sizes differ (strict mode).
    Size,
    /// The chains allocate the range differently (strict mode): one holds data, a zero
    /// range or nothing where the other holds another of the three.
    Allocation,
}

/// Compares `a` and `b` byte for byte; ranges both chains report as zero are not read.
/// `strict` (qemu-img compare -s) also fails on different sizes and on different allocation.
pub fn compare(a: &dyn BlockDevice, b: &dyn BlockDevice, strict: bool) -> Result<CompareResult> {
    let differ = |at: u64, why: Mismatch| CompareResult {
        identical: false,
        first_difference: Some(at),
        mismatch: Some(why),
        sizes: (a.size(), b.size()),
    };
    let (sa, sb) = (a.size(), b.size());
    if strict && sa != sb {
        return Ok(differ(sa.min(sb), Mismatch::Size));
    }
    let common = sa.min(sb);
    const CHUNK: u64 = 4 << 20;
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < common {
        let ea = chain_status(a, pos, common - pos)?;
        let eb = chain_status(b, pos, common - pos)?;
        let run = ea.len.min(eb.len).min(common - pos);
        if strict && (ea.present, ea.data) != (eb.present, eb.data) {
            return Ok(differ(pos, Mismatch::Allocation));
        }
        if !ea.data && !eb.data {
            pos += run;
            continue;
        }
        let n = run.min(CHUNK);
        let k = usize::try_from(n).unwrap_or(0);
        let (Some(xa), Some(xb)) = (ba.get_mut(..k), bb.get_mut(..k)) else {
            break;
        };
        if ea.data {
            a.read_at(xa, pos)?;
        } else {
            xa.fill(0);
        }
        if eb.data {
            b.read_at(xb, pos)?;
        } else {
            xb.fill(0);
        }
        if xa != xb {
            let i = xa
                .iter()
                .zip(xb.iter())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(differ(pos + i as u64, Mismatch::Content));
        }
        pos += n;
    }
    if sa != sb {
        let larger: &dyn BlockDevice = if sa > sb { a } else { b };
        if let Some(off) = first_nonzero(larger, common)? {
            return Ok(differ(off, Mismatch::Content));
        }
    }
    Ok(CompareResult {
        identical: true,
        first_difference: None,
        mismatch: None,
        sizes: (sa, sb),
    })
}

/// The first non-zero byte of `dev` at or after `from`.
pub fn first_nonzero(dev: &dyn BlockDevice, from: u64) -> Result<Option<u64>> {
    let size = dev.size();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = from;
    while pos < size {
        let e = chain_status(dev, pos, size - pos)?;
        if !e.data {
            pos += e.len;
            continue;
        }
        let n = e.len.min(buf.len() as u64);
        let k = usize::try_from(n).unwrap_or(0);
        let Some(x) = buf.get_mut(..k) else { break };
        dev.read_at(x, pos)?;
        if let Some(i) = x.iter().position(|&b| b != 0) {
            return Ok(Some(pos + i as u64));
        }
        pos += n;
    }
    Ok(None)
}
