//! VHDX log replay. The input describes log entries (sequence numbers, tail pointers, zero and
//! data descriptors, flushed/last file offsets, and deliberate corruptions); the harness encodes
//! them with valid CRC-32C into the log region of a VHDX made by our writer, sets the LogGuid of
//! both headers, and opens the image read-only through the facade. Oracles: no panic or hang, the
//! source bytes are never modified (replay is in memory), and replaying twice (two opens) gives
//! the same guest view as once.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use blockdev::{BlockDevice, MemStorage, Result, Storage};
use libfuzzer_sys::fuzz_target;
use vdconv_fuzz::{crc32c, exercise, open_storage, SparseImage};
use vdisk::Format;

const GUID: [u8; 16] = *b"\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff\x01";

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FileOff {
    Sector(u16),
    Mib(u8),
    Wild(u64),
}

impl FileOff {
    fn get(self) -> u64 {
        match self {
            FileOff::Sector(s) => u64::from(s) * 4096,
            FileOff::Mib(m) => u64::from(m) << 20,
            FileOff::Wild(w) => w,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Desc {
    Zero {
        at: FileOff,
        sectors: u16,
        huge: bool,
    },
    Data {
        at: FileOff,
        fill: u8,
        leading: u64,
        trailing: u32,
    },
}

#[derive(Arbitrary, Debug, Clone)]
struct EntrySpec {
    seq_jump: u8,
    tail_back: u8,
    descs: Vec<Desc>,
    flushed: Option<FileOff>,
    last: Option<FileOff>,
    corrupt: u8,
}

#[derive(Arbitrary, Debug)]
struct LogInput {
    start_slot: u16,
    first_seq: u64,
    other_guid_in_header: bool,
    entries: Vec<EntrySpec>,
}

/// The source as the image sees it: read-only, and every write attempt is counted.
struct NoWrite {
    img: Arc<SparseImage>,
    writes: Arc<AtomicU64>,
}

impl Storage for NoWrite {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.img.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.img.write_at(buf, offset)
    }
    fn len(&self) -> Result<u64> {
        self.img.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.img.set_len(len)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        false
    }
}

fn template() -> &'static (SparseImage, u64, u64) {
    static T: OnceLock<(SparseImage, u64, u64)> = OnceLock::new();
    T.get_or_init(|| {
        let opts = vec![("block_size".to_string(), "1".to_string())];
        let mem = Arc::new(MemStorage::new());
        let limits = vdconv_fuzz::limits();
        let spec = vdisk::formats::CreateSpec {
            size: 8 << 20,
            options: &opts,
            parent: None,
            path: None,
            limits: &limits,
        };
        let mut w = vdisk::formats::writer(Format::Vhdx, Box::new(Arc::clone(&mem)), &spec)
            .expect("vhdx writer");
        let data: Vec<u8> = (0..(128u32 << 10)).map(|i| (i % 251) as u8 | 1).collect();
        w.write_data(1 << 20, &data).expect("write");
        w.write_data(5 << 20, &data[..65536]).expect("write");
        w.finish().expect("finish");
        let img = mem.to_vec();
        let h = if le64(&img, 128 * 1024 + 8) > le64(&img, 64 * 1024 + 8) {
            128 * 1024
        } else {
            64 * 1024
        };
        let log_len = u64::from(u32::from_le_bytes(img[h + 68..h + 72].try_into().unwrap()));
        let log_off = le64(&img, h + 72);
        (SparseImage::from_bytes(&img), log_off, log_len)
    })
}

fn le64(d: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(d[o..o + 8].try_into().unwrap())
}

fn encode(spec: &EntrySpec, seq: u64, tail: u32, file_len: u64) -> Vec<u8> {
    let descs: Vec<Desc> = spec.descs.iter().take(40).copied().collect();
    let data_count = descs
        .iter()
        .filter(|d| matches!(d, Desc::Data { .. }))
        .count();
    let desc_sectors = (descs.len() + 2).div_ceil(128);
    let len = (desc_sectors + data_count) * 4096;
    let mut e = vec![0u8; len];
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(descs.len() as u32).to_le_bytes());
    e[32..48].copy_from_slice(&GUID);
    let flushed = spec.flushed.map_or(file_len, FileOff::get);
    let last = spec.last.map_or(file_len, FileOff::get);
    e[48..56].copy_from_slice(&flushed.to_le_bytes());
    e[56..64].copy_from_slice(&last.to_le_bytes());
    let mut data_sector = desc_sectors * 4096;
    for (i, d) in descs.iter().enumerate() {
        let p = 64 + i * 32;
        match *d {
            Desc::Zero { at, sectors, huge } => {
                e[p..p + 4].copy_from_slice(b"zero");
                let zl = if huge {
                    1u64 << 62
                } else {
                    (u64::from(sectors) + 1) * 4096
                };
                e[p + 8..p + 16].copy_from_slice(&zl.to_le_bytes());
                e[p + 16..p + 24].copy_from_slice(&at.get().to_le_bytes());
            }
            Desc::Data {
                at,
                fill,
                leading,
                trailing,
            } => {
                e[p..p + 4].copy_from_slice(b"desc");
                e[p + 4..p + 8].copy_from_slice(&trailing.to_le_bytes());
                e[p + 8..p + 16].copy_from_slice(&leading.to_le_bytes());
                e[p + 16..p + 24].copy_from_slice(&at.get().to_le_bytes());
                let s = &mut e[data_sector..data_sector + 4096];
                s[0..4].copy_from_slice(b"data");
                s[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                s[8..4092].fill(fill);
                s[4092..4096].copy_from_slice(&(seq as u32).to_le_bytes());
                data_sector += 4096;
            }
        }
        e[p + 24..p + 32].copy_from_slice(&seq.to_le_bytes());
    }
    let sign = |e: &mut Vec<u8>| {
        e[4..8].fill(0);
        let c = crc32c(e);
        e[4..8].copy_from_slice(&c.to_le_bytes());
    };
    match spec.corrupt % 24 {
        0 => {
            sign(&mut e);
            e[4] ^= 1; // bad checksum
        }
        1 => {
            e[32] ^= 0xff; // another log's entry
            sign(&mut e);
        }
        2 => {
            e[16..24].fill(0); // seq 0
            sign(&mut e);
        }
        3 => {
            e[8..12].copy_from_slice(&u32::MAX.to_le_bytes()[..]);
            sign(&mut e); // CRC over a prefix: the length is invalid anyway
        }
        4 if !descs.is_empty() => {
            e[64 + 24] ^= 1; // descriptor seq mismatch
            sign(&mut e);
        }
        5 if data_count > 0 => {
            let p = desc_sectors * 4096;
            e[p] = b'x'; // data sector signature
            sign(&mut e);
        }
        6 if !descs.is_empty() => {
            e[64 + 16] |= 1; // misaligned file offset
            sign(&mut e);
        }
        7 => {
            e[24..28].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // descriptor count
            sign(&mut e);
        }
        _ => sign(&mut e),
    }
    e
}

fn view(dev: &dyn BlockDevice) -> (u64, Vec<u8>, Vec<(u64, u64)>) {
    let size = dev.size();
    let n = size.min(2 << 20) as usize;
    let mut buf = vec![0u8; n];
    let ok = dev.read_at(&mut buf, 0).is_ok();
    if !ok {
        buf.clear();
    }
    let mut ext = Vec::new();
    let mut off = 0;
    while off < size && ext.len() < 1024 {
        match dev.block_status(off, size - off) {
            Ok(e) => {
                ext.push((e.offset, e.len));
                off += e.len.max(1);
            }
            Err(_) => break,
        }
    }
    (size, buf, ext)
}

fuzz_target!(|input: LogInput| {
    let (img, log_off, log_len) = template();
    let (log_off, log_len) = (*log_off, *log_len);
    if !(4096..=(16 << 20)).contains(&log_len) {
        return;
    }
    let mut img = img.clone();
    for h in [64 * 1024u64, 128 * 1024] {
        let mut g = GUID;
        if input.other_guid_in_header {
            g[0] ^= 0x80;
        }
        let mut hdr = vec![0u8; 4096];
        img.get(h, &mut hdr);
        hdr[48..64].copy_from_slice(&g);
        hdr[4..8].fill(0);
        let c = crc32c(&hdr);
        hdr[4..8].copy_from_slice(&c.to_le_bytes());
        img.put(h, &hdr);
    }
    let file_len = img.file_len();
    let sectors = log_len / 4096;
    let mut slot = u64::from(input.start_slot) % sectors;
    let mut seq = input.first_seq;
    let mut starts: Vec<u32> = Vec::new();
    for spec in input.entries.iter().take(8) {
        seq = seq.wrapping_add(u64::from(spec.seq_jump % 4).max(if starts.is_empty() {
            0
        } else {
            1
        }));
        let here = (slot * 4096) as u32;
        starts.push(here);
        let back = usize::from(spec.tail_back) % starts.len();
        let tail = starts[starts.len() - 1 - back];
        let e = encode(spec, seq, tail, file_len);
        for chunk in e.chunks(4096) {
            img.put(log_off + slot * 4096, chunk);
            slot = (slot + 1) % sectors;
        }
    }
    let img = Arc::new(img);
    let writes = Arc::new(AtomicU64::new(0));
    let storage = || {
        Box::new(NoWrite {
            img: Arc::clone(&img),
            writes: Arc::clone(&writes),
        })
    };
    let first = match open_storage(Format::Vhdx, storage(), false) {
        Ok(d) => d,
        Err(_) => {
            assert_eq!(
                writes.load(Ordering::SeqCst),
                0,
                "a read-only open wrote to the source"
            );
            return;
        }
    };
    let v1 = view(first.as_ref());
    exercise(first.as_ref());
    drop(first);
    let second = open_storage(Format::Vhdx, storage(), false)
        .expect("the second open of the same bytes failed");
    let v2 = view(second.as_ref());
    assert!(v1 == v2, "replaying twice differs from replaying once");
    assert_eq!(
        writes.load(Ordering::SeqCst),
        0,
        "a read-only open wrote to the source"
    );
});
