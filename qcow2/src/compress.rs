//! Compressed clusters: raw deflate (4 KiB window) and zstd frames.
//!
//! Decompression output is always exactly one cluster: the caller's buffer is the cap, and a
//! stream that stops short of filling it is an error.

use blockdev::{Error, ErrorKind, Result};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::format::COMPRESSION_ZSTD;

fn bad(offset: u64, msg: impl Into<String>) -> Error {
    Error::corrupt("compressed_cluster", offset, msg)
}

/// Inflates `input` into exactly `out.len()` bytes (`offset` is for error messages).
pub fn decompress(kind: u8, input: &[u8], out: &mut [u8], offset: u64) -> Result<()> {
    if kind == COMPRESSION_ZSTD {
        decompress_zstd(input, out, offset)
    } else {
        decompress_deflate(input, out, offset)
    }
}

fn decompress_deflate(input: &[u8], out: &mut [u8], offset: u64) -> Result<()> {
    // Window 15 is a superset of qemu's 12: it inflates every stream qemu can.
    let mut d = Decompress::new_with_window_bits(false, 15);
    loop {
        let before_in = d.total_in();
        let before_out = d.total_out();
        let i = usize::try_from(d.total_in()).unwrap_or(usize::MAX);
        let o = usize::try_from(d.total_out()).unwrap_or(usize::MAX);
        let (Some(src), Some(dst)) = (input.get(i..), out.get_mut(o..)) else {
            break;
        };
        if dst.is_empty() {
            break;
        }
        match d.decompress(src, dst, FlushDecompress::None) {
            Ok(Status::StreamEnd) => break,
            Ok(_) => {}
            Err(e) => return Err(bad(offset, format!("deflate stream is invalid: {e}"))),
        }
        if d.total_in() == before_in && d.total_out() == before_out {
            break;
        }
    }
    if d.total_out() != out.len() as u64 {
        return Err(bad(
            offset,
            format!(
                "deflate stream decodes to {} bytes, not the cluster size {}",
                d.total_out(),
                out.len()
            ),
        ));
    }
    Ok(())
}

fn decompress_zstd(input: &[u8], out: &mut [u8], offset: u64) -> Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec =
        Decoder::new().map_err(|e| Error::new(ErrorKind::Io, "zstd decoder").with_source(e))?;
    // Never let a frame header make us allocate a huge window.
    dec.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(23))
        .map_err(|e| Error::new(ErrorKind::Io, "zstd decoder").with_source(e))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    while outb.pos() < outb.capacity() {
        let in_before = inb.pos();
        let out_before = outb.pos();
        dec.run(&mut inb, &mut outb)
            .map_err(|e| bad(offset, format!("zstd stream is invalid: {e}")))?;
        if inb.pos() == in_before && outb.pos() == out_before {
            break;
        }
    }
    let n = outb.pos();
    if n != out.len() {
        return Err(bad(
            offset,
            format!(
                "zstd stream decodes to {n} bytes, not the cluster size {}",
                out.len()
            ),
        ));
    }
    Ok(())
}

/// A reusable compressor for one worker thread.
pub struct Compressor {
    kind: u8,
    deflate: Option<Compress>,
    /// A fast deflate (level 1, same 4 KiB window) for the incompressibility probe.
    probe: Option<Compress>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    buf: Vec<u8>,
}

impl Compressor {
    /// A compressor for compression type `kind` (0 deflate, 1 zstd).
    pub fn new(kind: u8) -> Result<Self> {
        let (deflate, zstd) = if kind == COMPRESSION_ZSTD {
            let z = zstd::bulk::Compressor::new(3)
                .map_err(|e| Error::new(ErrorKind::Io, "zstd compressor").with_source(e))?;
            (None, Some(z))
        } else {
            // Raw deflate with a 4 KiB window: qemu inflates with window bits -12.
            (
                Some(Compress::new_with_window_bits(
                    Compression::default(),
                    false,
                    12,
                )),
                None,
            )
        };
        let probe = deflate
            .as_ref()
            .map(|_| Compress::new_with_window_bits(Compression::fast(), false, 12));
        Ok(Compressor {
            kind,
            deflate,
            probe,
            zstd,
            buf: Vec::new(),
        })
    }

    /// Compresses one cluster; `None` when the result would not be smaller than the input, or
    /// when [`Self::looks_incompressible`] judges so without compressing (a cluster that would
    /// shrink by under about 3% may be stored uncompressed).
    pub fn compress(&mut self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let limit = data.len().saturating_sub(1);
        if self.kind == COMPRESSION_ZSTD {
            let Some(z) = self.zstd.as_mut() else {
                return Ok(None);
            };
            self.buf.clear();
            self.buf
                .resize(zstd::zstd_safe::compress_bound(data.len()), 0);
            let n = z
                .compress_to_buffer(data, &mut self.buf)
                .map_err(|e| Error::new(ErrorKind::Io, "zstd compression failed").with_source(e))?;
            if n > limit {
                return Ok(None);
            }
            return Ok(self.buf.get(..n).map(<[u8]>::to_vec));
        }
        if self.looks_incompressible(data) {
            return Ok(None);
        }
        let Some(d) = self.deflate.as_mut() else {
            return Ok(None);
        };
        d.reset();
        self.buf.clear();
        // Room for the worst case: zlib-rs insists on space for its pending output.
        self.buf.resize(data.len() + data.len() / 8 + 256, 0);
        match d.compress(data, &mut self.buf, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => {
                let n = usize::try_from(d.total_out()).unwrap_or(usize::MAX);
                if n > limit {
                    return Ok(None);
                }
                Ok(self.buf.get(..n).map(<[u8]>::to_vec))
            }
            // Output buffer full: the data does not shrink.
            Ok(_) => Ok(None),
            Err(e) => Err(Error::new(ErrorKind::Io, format!("deflate failed: {e}"))),
        }
    }
}

/// Size of each slice the incompressibility probe deflates.
const PROBE: usize = 4096;
/// Order-0 entropy (bits per byte) above which a cluster is probed: random or already
/// compressed data is at 7.99+, text and binaries well below.
const ENTROPY_GATE: f64 = 7.9;

impl Compressor {
    /// Whether deflating `data` (raw deflate, 4 KiB window) cannot make it smaller, judged
    /// cheaply, as btrfs does: its byte histogram must be near-uniform (Huffman coding cannot
    /// gain on it), and four slices spread over it must not shrink at the fast level (with a 4
    /// KiB window, the only other gain, repeats, shows within a slice). Such a cluster is
    /// stored uncompressed, as it would be after a failed full compression, at a fraction of
    /// the cost. Half of a typical disk's allocated data (media, archives, encrypted files)
    /// is like this.
    fn looks_incompressible(&mut self, data: &[u8]) -> bool {
        if data.len() < 4 * PROBE {
            return false;
        }
        let mut hist = [0u32; 256];
        for &b in data {
            if let Some(h) = hist.get_mut(usize::from(b)) {
                *h += 1;
            }
        }
        let n = data.len() as f64;
        let entropy: f64 = hist
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = f64::from(c) / n;
                -p * p.log2()
            })
            .sum();
        if entropy < ENTROPY_GATE {
            return false;
        }
        let Some(probe) = self.probe.as_mut() else {
            return false;
        };
        let mut out = [0u8; PROBE + PROBE / 8 + 256];
        let step = (data.len() - PROBE) / 3;
        for k in 0..4 {
            let Some(slice) = data.get(k * step..k * step + PROBE) else {
                return false;
            };
            probe.reset();
            match probe.compress(slice, &mut out, FlushCompress::Finish) {
                // 3% smaller would be a real gain: compress the whole cluster.
                Ok(Status::StreamEnd) if probe.total_out() < (PROBE - PROBE / 32) as u64 => {
                    return false
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100 % 7) as u8;
        }
        for kind in [0u8, 1] {
            let mut c = Compressor::new(kind).unwrap();
            let z = c.compress(&data).unwrap().unwrap();
            assert!(z.len() < data.len());
            let mut out = vec![0u8; 65536];
            // Trailing garbage (sector padding) must be ignored.
            let mut padded = z.clone();
            padded.extend_from_slice(&[0u8; 300]);
            decompress(kind, &padded, &mut out, 0).unwrap();
            assert_eq!(out, data);
            let mut short = vec![0u8; 65537];
            assert!(decompress(kind, &z, &mut short, 0).is_err());
        }
    }

    #[test]
    fn incompressible_probe() {
        let mut rng = testsupport::TestRng::new(7);
        let mut random = vec![0u8; 65536];
        rng.fill(&mut random);
        let mut c = Compressor::new(0).unwrap();
        assert!(c.looks_incompressible(&random));
        assert!(c.compress(&random).unwrap().is_none());
        // Random bytes with a repeat inside the window: near-uniform histogram, yet deflate
        // shrinks it; the probe must see the repeat and let it be compressed.
        let mut rep = random.clone();
        for i in 2048..rep.len() {
            rep[i] = rep[i - 2048];
        }
        assert!(!c.looks_incompressible(&rep));
        assert!(c.compress(&rep).unwrap().is_some());
        // Half random, half zeros: skewed histogram, compressed.
        let mut half = random.clone();
        half[32768..].fill(0);
        assert!(!c.looks_incompressible(&half));
        assert!(c.compress(&half).unwrap().is_some());
    }
}
