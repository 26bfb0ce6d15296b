//! Random corruption of every metadata structure: open, read, block_status and check return
//! values or errors, never panic or hang.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use blockdev::{BlockDevice, DenyGate, MemStorage};
use common::params;
use testsupport::TestRng;
use vhd::format::{checksum, Footer};
use vhd::{create, CreateOptions, Dialect, ParentLink, VhdImage};

fn base_images() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (dialect, parent) in [
        (Dialect::Standard, false),
        (Dialect::Xen, false),
        (Dialect::Standard, true),
    ] {
        let m = Arc::new(MemStorage::new());
        let mut o = CreateOptions::dynamic(3 << 20);
        o.block_size = 1 << 20;
        o.dialect = dialect;
        if parent {
            o.parent = Some(ParentLink {
                uuid: [3; 16],
                timestamp: 1,
                size: 3 << 20,
                absolute: "/p/base.vhd".into(),
                relative: "base.vhd".into(),
            });
        }
        create(m.as_ref(), &o).unwrap();
        if !parent {
            let img = VhdImage::open(Box::new(m.clone()), &params(&DenyGate, true, None)).unwrap();
            img.write_at(&[7u8; 5000], 100).unwrap();
            img.write_at(&[8u8; 5000], 2 << 20).unwrap();
        }
        out.push(m.to_vec());
    }
    out
}

fn fix_checksums(v: &mut [u8]) {
    let n = v.len();
    if n >= 1536 && &v[..8] == b"conectix" {
        let c = checksum(&v[..512], 64);
        v[64..68].copy_from_slice(&c.to_be_bytes());
        if &v[512..520] == b"cxsparse" {
            let c = checksum(&v[512..1536], 36);
            v[548..552].copy_from_slice(&c.to_be_bytes());
        }
        let f: [u8; 512] = v[..512].try_into().unwrap();
        v[n - 512..].copy_from_slice(&Footer::parse(&f).raw);
    }
}

#[test]
fn random_metadata_corruption_never_panics() {
    let bases = base_images();
    let mut rng = TestRng::new(2024);
    for i in 0..1500 {
        let mut v = bases[i % bases.len()].clone();
        let metadata_end = 4096.min(v.len());
        for _ in 0..1 + rng.next_u64() % 6 {
            let pos = (rng.next_u64() as usize) % metadata_end;
            v[pos] = rng.next_u64() as u8;
        }
        if !rng.next_u64().is_multiple_of(4) {
            fix_checksums(&mut v);
        }
        if rng.next_u64().is_multiple_of(8) {
            let cut = (rng.next_u64() as usize) % v.len();
            v.truncate(cut);
        }
        let gate = common::DirGate {
            skip: true,
            ignore_id: false,
            ..common::DirGate::new()
        };
        let Ok(img) = VhdImage::open(
            Box::new(MemStorage::from_vec(v)),
            &params(&gate, false, None),
        ) else {
            continue;
        };
        let size = img.size();
        let _ = img.info();
        let _ = img.check();
        let mut buf = vec![0u8; 70_000];
        for off in [0, size / 2, size.saturating_sub(70_000)] {
            let n = (size - off.min(size)).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            if off < size {
                let _ = img.block_status(off, u64::MAX);
            }
        }
    }
}
