//! The engines across formats: every conversion pair, deltas with -B, chains kept across
//! formats, commit, and the Azure target; checked with qemu-img and libvhdi where they can read
//! the result, and with our own digest otherwise.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use blockdev::BlockDevice;
use testsupport::{require_tool, run, sha256_device, TestRng};
use vdisk::{ConvertOptions, Format, OpenOptions};

const MIB: u64 = 1 << 20;

fn qfmt(f: Format) -> &'static str {
    match f {
        Format::Raw => "raw",
        Format::Vhd => "vpc",
        Format::Vhdx => "vhdx",
        Format::Qcow2 => "qcow2",
    }
}

/// A raw disk with random data, zero-filled ranges and holes, at odd places.
fn random_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = TestRng::new(seed);
    let mut off = 0u64;
    while off < size {
        let len = (rng.next_u64() % (3 * MIB)).max(512) / 512 * 512;
        let len = len.min(size - off);
        match rng.next_u64() % 4 {
            0 | 1 => {
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                f.write_all_at(&b, off).unwrap();
            }
            2 => f.write_all_at(&vec![0u8; len as usize], off).unwrap(),
            _ => {}
        }
        off += len + (rng.next_u64() % (2 * MIB)) / 512 * 512;
    }
}

fn open(path: &Path) -> Box<dyn BlockDevice> {
    vdisk::open(path, &OpenOptions::default()).unwrap()
}

fn convert_to(src: &Path, dst: &Path, f: Format, options: &[(&str, &str)]) {
    let s = open(src);
    let mut o = ConvertOptions::new(f);
    o.options = options
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    o.verify = true;
    vdisk::convert(s.as_ref(), dst, &o, None, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("convert {} -> {f}: {e}", src.display()));
}

fn qemu_check(path: &Path, f: Format) {
    if f == Format::Raw || f == Format::Vhd {
        return;
    }
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["check", "-f", qfmt(f)])
        .arg(path));
    assert_eq!(code, 0, "qemu-img check {}: {out}{err}", path.display());
}

fn qemu_compare(a: &Path, fa: Format, b: &Path, fb: Format) {
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["compare", "-f", qfmt(fa), "-F", qfmt(fb)])
        .arg(a)
        .arg(b));
    assert_eq!(
        code,
        0,
        "qemu-img compare {} {}: {out}{err}",
        a.display(),
        b.display()
    );
}

#[test]
fn all_sixteen_pairs_round_trip() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("src.raw");
    random_raw(&raw, 48 * MIB, 7);
    let want = sha256_device(open(&raw).as_ref());
    // One source per format, made by our own writer from the raw disk.
    let mut sources: Vec<(Format, PathBuf)> = vec![(Format::Raw, raw.clone())];
    for f in [Format::Vhd, Format::Vhdx, Format::Qcow2] {
        let p = d.path().join(format!("src.{}", f.extension()));
        convert_to(&raw, &p, f, &[]);
        sources.push((f, p));
    }
    for (sf, sp) in &sources {
        for tf in Format::ALL {
            for sub in ["dynamic", "fixed"] {
                if sub == "fixed" && matches!(tf, Format::Raw | Format::Qcow2) {
                    continue;
                }
                let out = d.path().join(format!("out-{sf}-{sub}.{}", tf.extension()));
                let opts: Vec<(&str, &str)> = if tf == Format::Vhd || tf == Format::Vhdx {
                    vec![("subformat", sub)]
                } else {
                    vec![]
                };
                convert_to(sp, &out, tf, &opts);
                let got = sha256_device(open(&out).as_ref());
                assert_eq!(got, want, "{sf} -> {tf} ({sub}) changed the content");
                qemu_check(&out, tf);
                qemu_compare(&raw, Format::Raw, &out, tf);
                if tf == Format::Vhd || tf == Format::Vhdx {
                    assert_eq!(
                        testsupport::pyvhdi_sha256(&out, None),
                        want,
                        "libvhdi reads {sf} -> {tf} ({sub}) differently"
                    );
                }
                std::fs::remove_file(&out).unwrap();
            }
        }
    }
}

#[test]
fn delta_with_backing_writes_only_differences() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let base_raw = d.path().join("base.raw");
    random_raw(&base_raw, 32 * MIB, 11);
    // The new disk: the base with two changed ranges and one range zeroed.
    let new_raw = d.path().join("new.raw");
    std::fs::copy(&base_raw, &new_raw).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&new_raw)
            .unwrap();
        f.write_all_at(&[0xabu8; 70000], 5 * MIB + 123).unwrap();
        f.write_all_at(&[0x11u8; 4096], 20 * MIB).unwrap();
        f.write_all_at(&vec![0u8; 2 * MIB as usize], 8 * MIB)
            .unwrap();
    }
    for f in [Format::Qcow2, Format::Vhdx, Format::Vhd] {
        let base = d.path().join(format!("base.{}", f.extension()));
        convert_to(&base_raw, &base, f, &[]);
        let delta = d.path().join(format!("delta.{}", f.extension()));
        let src = open(&new_raw);
        let mut o = ConvertOptions::new(f);
        if f == Format::Vhdx {
            // VHDX allocates whole blocks even for a few sectors: small blocks keep the delta small.
            o.options = vec![("block_size".into(), "1M".into())];
        }
        o.backing = Some(
            vdisk::open_parent(
                &delta,
                base.file_name().unwrap().to_str().unwrap(),
                Some(f),
                &Default::default(),
            )
            .unwrap(),
        );
        vdisk::convert(src.as_ref(), &delta, &o, None, &mut |_, _| {}).unwrap();
        let got = sha256_device(open(&delta).as_ref());
        assert_eq!(
            got,
            sha256_device(src.as_ref()),
            "{f} delta reads differently"
        );
        // Far smaller than the full disk: only the changed ranges are stored.
        let delta_size = std::fs::metadata(&delta).unwrap().len();
        assert!(delta_size < 16 * MIB, "{f} delta is {delta_size} bytes");
        if f == Format::Qcow2 {
            qemu_check(&delta, f);
            qemu_compare(&new_raw, Format::Raw, &delta, f);
        }
    }
}

/// Runs qemu-img; it must succeed.
fn sh(args: &[&str]) {
    let (code, out, err) = run(Command::new("qemu-img").args(args));
    assert_eq!(code, 0, "{args:?}: {out}{err}");
}

/// Runs qemu-io commands on `img`; they must succeed.
fn io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let (code, out, err) = run(c.arg(img));
    assert_eq!(code, 0, "qemu-io: {out}{err}");
}

/// Converts the chain of `top` to `dst` with `--keep-chain` and options `o`.
fn keep_chain(top: &Path, dst: &Path, o: &ConvertOptions) {
    vdisk::convert_chain(top, dst, &OpenOptions::default(), o, None, &mut |_, _| {}).unwrap();
}

/// Creates a qcow2 `img` of `size` over the backing file `backing` (a name beside it).
fn overlay(img: &Path, backing: &str, size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2"];
    args.push(img.to_str().unwrap());
    args.extend(size);
    sh(&args);
}

/// A three-layer qcow2 chain made by qemu-img, with data and zeros in every layer.
fn qemu_chain(dir: &Path) -> Vec<PathBuf> {
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    sh(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "32M"]);
    io(&base, &["write -P 0x11 0 8M", "write -P 0x12 16M 4M"]);
    overlay(&mid, "base.qcow2", None);
    io(
        &mid,
        &[
            "write -P 0x21 4M 2M",
            "write -z 16M 1M",
            "write -P 0x22 30M 64k",
        ],
    );
    overlay(&top, "mid.qcow2", None);
    io(
        &top,
        &[
            "write -P 0x31 5M 64k",
            "write -z 0 1M",
            "write -P 0x32 17M 512k",
        ],
    );
    vec![base, mid, top]
}

#[test]
fn keep_chain_across_formats_and_back() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let chain = qemu_chain(d.path());
    let top = &chain[2];
    let want = testsupport::qemu_sha256(top, "qcow2");
    for f in [Format::Vhdx, Format::Vhd, Format::Qcow2] {
        let out_dir = d.path().join(format!("to-{f}"));
        std::fs::create_dir(&out_dir).unwrap();
        let dst = out_dir.join(format!("top.{}", f.extension()));
        let layers = vdisk::convert_chain(
            top,
            &dst,
            &OpenOptions::default(),
            &ConvertOptions::new(f),
            None,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(layers.len(), 3);
        assert!(out_dir.join(format!("base.{}", f.extension())).exists());
        assert!(out_dir.join(format!("mid.{}", f.extension())).exists());
        let opened = open(&dst);
        assert!(
            opened.backing().and_then(|b| b.backing()).is_some(),
            "{f} chain is not three layers"
        );
        assert_eq!(
            sha256_device(opened.as_ref()),
            want,
            "{f} chain reads differently"
        );
        // And back to a qcow2 chain that qemu-img reads identically.
        let back_dir = d.path().join(format!("back-{f}"));
        std::fs::create_dir(&back_dir).unwrap();
        let back = back_dir.join("top.qcow2");
        vdisk::convert_chain(
            &dst,
            &back,
            &OpenOptions::default(),
            &ConvertOptions::new(Format::Qcow2),
            None,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(testsupport::qemu_sha256(&back, "qcow2"), want);
        for l in ["base", "mid", "top"] {
            qemu_check(&back_dir.join(format!("{l}.qcow2")), Format::Qcow2);
        }
        let (code, out, _) = run(Command::new("qemu-img")
            .args(["info", "--backing-chain"])
            .arg(&back));
        assert_eq!(code, 0);
        assert_eq!(out.matches("image:").count(), 3, "{out}");
    }
}

#[test]
fn commit_merges_child_into_parent() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let chain = qemu_chain(d.path());
    let want = testsupport::qemu_sha256(&chain[2], "qcow2");
    for f in [Format::Qcow2, Format::Vhd, Format::Vhdx] {
        let dir = d.path().join(format!("c-{f}"));
        std::fs::create_dir(&dir).unwrap();
        let dst = dir.join(format!("top.{}", f.extension()));
        vdisk::convert_chain(
            &chain[2],
            &dst,
            &OpenOptions::default(),
            &ConvertOptions::new(f),
            None,
            &mut |_, _| {},
        )
        .unwrap();
        let parent = vdisk::commit(&dst, &OpenOptions::default(), None, &mut |_, _| {}).unwrap();
        assert_eq!(
            parent.file_name().unwrap().to_str().unwrap(),
            format!("mid.{}", f.extension())
        );
        let merged = vdisk::open(&parent, &OpenOptions::default()).unwrap();
        assert_eq!(
            sha256_device(merged.as_ref()),
            want,
            "{f}: parent after commit"
        );
        if f == Format::Qcow2 {
            qemu_check(&parent, f);
        }
        // The child still opens over its parent, identity checked, and reads as before (a
        // VHDX child was relinked to the parent's new DataWriteGuid).
        let child = vdisk::open(&dst, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{f}: the child after commit: {e}"));
        assert_eq!(
            sha256_device(child.as_ref()),
            want,
            "{f}: child after commit"
        );
        if f == Format::Vhdx {
            let base = dir.join("base.vhdx");
            assert_eq!(
                testsupport::pyvhdi_sha256_chain(&[&dst, &parent, &base]),
                want,
                "libvhdi reads the relinked child differently"
            );
        }
    }
}

#[test]
fn commit_grows_a_smaller_parent_or_refuses_when_it_cannot() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    // qcow2 base, 4 KiB clusters: 16 MiB fill an 8-entry L1, 40 MiB need a larger one.
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    sh(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        base.to_str().unwrap(),
        "16M",
    ]);
    io(&base, &["write -P 0x31 0 4M", "write -P 0x34 15M 1M"]);
    // The overlay is larger than its backing file, with data below and past the base's end.
    overlay(&top, "base.qcow2", Some("40M"));
    io(&top, &["write -P 0x32 1M 1M", "write -P 0x33 30M 1M"]);
    let want = testsupport::qemu_sha256(&top, "qcow2");
    vdisk::commit(&top, &OpenOptions::default(), None, &mut |_, _| {}).unwrap();
    // As qemu-img commit does: the base grew to the child's size and reads as the child.
    assert_eq!(open(&base).size(), 40 << 20);
    assert_eq!(testsupport::qemu_sha256(&base, "qcow2"), want);
    assert_eq!(testsupport::qemu_sha256(&top, "qcow2"), want);
    qemu_check(&base, Format::Qcow2);

    // A raw base grows too.
    let rbase = d.path().join("rbase.raw");
    let rtop = d.path().join("rtop.qcow2");
    random_raw(&rbase, 8 << 20, 5);
    sh(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "rbase.raw",
        "-F",
        "raw",
        rtop.to_str().unwrap(),
        "12M",
    ]);
    io(&rtop, &["write -P 0x35 7M 2M"]);
    let want = testsupport::qemu_sha256(&rtop, "qcow2");
    vdisk::commit(&rtop, &OpenOptions::default(), None, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::metadata(&rbase).unwrap().len(), 12 << 20);
    assert_eq!(testsupport::sha256_file(&rbase), want);

    // A VHDX base is not resized: data past its end is refused before anything is written.
    let vbase = d.path().join("vbase.vhdx");
    let vtop = d.path().join("vtop.qcow2");
    sh(&["create", "-q", "-f", "vhdx", vbase.to_str().unwrap(), "16M"]);
    sh(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "vbase.vhdx",
        "-F",
        "vhdx",
        vtop.to_str().unwrap(),
        "32M",
    ]);
    io(&vtop, &["write -P 0x32 1M 1M", "write -P 0x33 20M 1M"]);
    let before = testsupport::sha256_file(&vbase);
    let err = vdisk::commit(&vtop, &OpenOptions::default(), None, &mut |_, _| {}).unwrap_err();
    assert_eq!(err.kind(), blockdev::ErrorKind::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains("past the end of its parent"),
        "{err}"
    );
    assert_eq!(
        testsupport::sha256_file(&vbase),
        before,
        "the base was modified"
    );
    // Without data past the end, the part the base can hold is committed.
    io(&vtop, &["discard 20M 1M"]);
    let want = testsupport::qemu_sha256(&vtop, "qcow2");
    vdisk::commit(&vtop, &OpenOptions::default(), None, &mut |_, _| {}).unwrap();
    let merged = open(&vbase);
    assert_eq!(merged.size(), 16 << 20);
    let mut first = vec![0u8; 16 << 20];
    merged.read_at(&mut first, 0).unwrap();
    let child = open(&vtop);
    let mut all = vec![0u8; 32 << 20];
    child.read_at(&mut all, 0).unwrap();
    assert_eq!(first[..], all[..16 << 20]);
    assert_eq!(testsupport::qemu_sha256(&vtop, "qcow2"), want);
}

#[test]
fn commit_into_a_grown_parent_does_not_show_the_grandparent() {
    // base (8M, data everywhere) <- mid (4M) <- top (8M): the top reads zeros from 4M on
    // except where it holds data. Growing mid to 8M must not let base show there.
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    sh(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
    io(&base, &["write -P 0x61 0 8M"]);
    for (compat, ok) in [("1.1", true), ("0.10", false)] {
        let mid = d.path().join(format!("mid-{compat}.qcow2"));
        let top = d.path().join(format!("top-{compat}.qcow2"));
        sh(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            mid.to_str().unwrap(),
            "4M",
        ]);
        io(&mid, &["write -P 0x62 1M 1M"]);
        let mid_name = mid.file_name().unwrap().to_str().unwrap().to_string();
        overlay(&top, &mid_name, Some("8M"));
        io(&top, &["write -P 0x63 3M 2M", "write -P 0x64 6M 64k"]);
        let want = testsupport::qemu_sha256(&top, "qcow2");
        let mid_before = testsupport::sha256_file(&mid);
        let res = vdisk::commit(&top, &OpenOptions::default(), None, &mut |_, _| {});
        if ok {
            res.unwrap();
            assert_eq!(open(&mid).size(), 8 << 20);
            assert_eq!(
                testsupport::qemu_sha256(&mid, "qcow2"),
                want,
                "mid after commit"
            );
            assert_eq!(
                testsupport::qemu_sha256(&top, "qcow2"),
                want,
                "top after commit"
            );
            qemu_check(&mid, Format::Qcow2);
        } else {
            // A version 2 image cannot mark the range zero: refused before anything is written.
            let err = res.unwrap_err();
            assert_eq!(err.kind(), blockdev::ErrorKind::Unsupported, "{err}");
            assert_eq!(
                testsupport::sha256_file(&mid),
                mid_before,
                "mid was modified"
            );
            assert_eq!(testsupport::qemu_sha256(&top, "qcow2"), want);
        }
    }
}

#[test]
fn azure_target_gives_whole_mib_fixed_vhd() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("disk.raw");
    let size = (100.3 * MIB as f64) as u64 / 512 * 512;
    random_raw(&raw, size, 5);
    let out = d.path().join("azure.vhd");
    let src = open(&raw);
    let mut o = ConvertOptions::new(Format::Vhd);
    o.options = vec![("subformat".into(), "fixed".into())];
    o.size = Some(size.div_ceil(MIB) * MIB);
    o.verify = true;
    vdisk::convert(src.as_ref(), &out, &o, None, &mut |_, _| {}).unwrap();
    let (code, out_json, err) = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vpc"])
        .arg(&out));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out_json).unwrap();
    assert_eq!(v["virtual-size"].as_u64().unwrap(), 101 * MIB);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 101 * MIB + 512);
}

/// A two-layer qcow2 chain in `dir`: base (`base_size`) with data, top (`top_size`) over it
/// with data, an explicit zero cluster over the base's data, and `extra` qemu-io commands.
fn two_layers(dir: &Path, base_size: &str, top_size: &str, extra: &[&str]) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    sh(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().unwrap(),
        base_size,
    ]);
    io(&base, &["write -P 0x41 0 4M"]);
    overlay(&top, "base.qcow2", Some(top_size));
    let mut cmds = vec!["write -P 0x42 2M 64k", "write -z 1M 64k"];
    cmds.extend_from_slice(extra);
    io(&top, &cmds);
    top
}

#[test]
fn keep_chain_partial_zero_units_keep_the_parents_bytes() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let top = two_layers(d.path(), "16M", "16M", &[]);
    let want = testsupport::qemu_sha256(&top, "qcow2");
    // A 64 KiB zero cluster inside a 2 MiB target cluster: the rest of that cluster is the
    // base's data, which the new top must not hide with zeros.
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let dst = out_dir.join("top.qcow2");
    let mut o = ConvertOptions::new(Format::Qcow2);
    o.options = vec![("cluster_size".into(), "2M".into())];
    o.verify = true;
    keep_chain(&top, &dst, &o);
    assert_eq!(testsupport::qemu_sha256(&dst, "qcow2"), want);
    qemu_check(&dst, Format::Qcow2);
    // Same for a VHDX with 4096-byte sectors over 512-byte zero runs is covered by units of
    // 4 KiB; a VHDX chain must read the same too.
    let vdir = d.path().join("vhdx");
    std::fs::create_dir(&vdir).unwrap();
    let vdst = vdir.join("top.vhdx");
    let mut o = ConvertOptions::new(Format::Vhdx);
    o.verify = true;
    vdisk::convert_chain(
        &top,
        &vdst,
        &OpenOptions::default(),
        &o,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    let got = vdisk::open(&vdst, &OpenOptions::default()).unwrap();
    assert_eq!(sha256_device(got.as_ref()), want);
}

#[test]
fn keep_chain_refusals_write_nothing() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let top = two_layers(d.path(), "16M", "16M", &[]);
    let base = d.path().join("base.qcow2");
    let before = testsupport::sha256_file(&base);
    let refused = |dst: &Path, o: &ConvertOptions, what: &str| {
        let err = vdisk::convert_chain(&top, dst, &OpenOptions::default(), o, None, &mut |_, _| {})
            .unwrap_err();
        assert_eq!(
            err.kind(),
            blockdev::ErrorKind::InvalidArgument,
            "{what}: {err}"
        );
        assert!(!dst.exists(), "{what}: an output was written");
    };
    // Its lower layer would be named base.qcow2 beside the output: the source's own base.
    let mut o = ConvertOptions::new(Format::Qcow2);
    o.force = true;
    refused(
        &d.path().join("new.qcow2"),
        &o,
        "output over the source chain",
    );
    assert_eq!(
        testsupport::sha256_file(&base),
        before,
        "the source base was replaced"
    );
    // raw has no parents.
    refused(
        &d.path().join("x.raw"),
        &ConvertOptions::new(Format::Raw),
        "raw",
    );
    assert!(!d.path().join("base.raw").exists());
    // Layers of different sizes cannot become a VHD or VHDX chain.
    let d2 = tempfile::tempdir().unwrap();
    let top2 = two_layers(d2.path(), "16M", "32M", &[]);
    for f in [Format::Vhd, Format::Vhdx] {
        let dst = d2.path().join(format!("out.{}", f.extension()));
        let err = vdisk::convert_chain(
            &top2,
            &dst,
            &OpenOptions::default(),
            &ConvertOptions::new(f),
            None,
            &mut |_, _| {},
        )
        .unwrap_err();
        assert_eq!(
            err.kind(),
            blockdev::ErrorKind::InvalidArgument,
            "{f}: {err}"
        );
        assert!(err.to_string().contains("different sizes"), "{err}");
        assert!(!d2.path().join(format!("base.{}", f.extension())).exists());
    }
    // A differencing VHDX of another size than its base is refused, not silently resized.
    let vbase = d2.path().join("vbase.vhdx");
    let (code, out, err) = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx"])
        .arg(&vbase)
        .arg("16M"));
    assert_eq!(code, 0, "{out}{err}");
    let src = open(&d2.path().join("top.qcow2"));
    let mut o = ConvertOptions::new(Format::Vhdx);
    o.backing = Some(
        vdisk::open_parent(
            &d2.path().join("delta.vhdx"),
            "vbase.vhdx",
            None,
            &Default::default(),
        )
        .unwrap(),
    );
    let err = vdisk::convert(
        src.as_ref(),
        &d2.path().join("delta.vhdx"),
        &o,
        None,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("parent's size"), "{err}");
    assert!(!d2.path().join("delta.vhdx").exists());
}

#[test]
fn vhdx_with_4096_byte_sectors_keeps_them() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("disk.raw");
    random_raw(&raw, 24 * MIB, 17);
    let four_k = d.path().join("4k.vhdx");
    let mut o = ConvertOptions::new(Format::Vhdx);
    o.options = vec![("logical_sector_size".into(), "4096".into())];
    vdisk::convert(open(&raw).as_ref(), &four_k, &o, None, &mut |_, _| {}).unwrap();
    let src = open(&four_k);
    assert_eq!(src.sector_sizes().logical, 4096);
    // Re-laid out without naming a sector size: the guest still sees 4096-byte sectors.
    let dst = d.path().join("out.vhdx");
    vdisk::convert(
        src.as_ref(),
        &dst,
        &ConvertOptions::new(Format::Vhdx),
        None,
        &mut |_, _| {},
    )
    .unwrap();
    let out = open(&dst);
    assert_eq!(out.sector_sizes().logical, 4096);
    let want = sha256_device(src.as_ref());
    assert_eq!(sha256_device(out.as_ref()), want);
    assert_eq!(
        testsupport::pyvhdi_sha256(&dst, None),
        want,
        "libvhdi reads the 4096-byte-sector output differently"
    );
}

/// A qcow2 overlay with 2 KiB subclusters over a VHDX with 4096-byte sectors: commit writes
/// whole parent sectors (the part the child does not cover keeps the parent's bytes), and a
/// child that is not a VHDX is left as it is (no relink).
#[test]
fn commit_of_subclusters_into_a_4096_byte_sector_vhdx() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("disk.raw");
    random_raw(&raw, 8 * MIB, 23);
    let parent = d.path().join("parent.vhdx");
    let mut o = ConvertOptions::new(Format::Vhdx);
    o.options = vec![("logical_sector_size".into(), "4096".into())];
    vdisk::convert(open(&raw).as_ref(), &parent, &o, None, &mut |_, _| {}).unwrap();
    // qemu cannot open a 4096-byte-sector VHDX: write the overlay alone, then attach it.
    let top = d.path().join("top.qcow2");
    sh(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        top.to_str().unwrap(),
        "8M",
    ]);
    io(&top, &["write -P 0x5a 1024 512", "write -P 0x5b 3M 6k"]);
    sh(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "parent.vhdx",
        "-F",
        "vhdx",
        top.to_str().unwrap(),
    ]);
    let child = open(&top);
    let e = child.block_status(0, MIB).unwrap();
    assert_eq!((e.kind, e.len), (blockdev::ExtentKind::Data, 2048), "{e:?}");
    let want = sha256_device(child.as_ref());
    drop(child);
    vdisk::commit(&top, &OpenOptions::default(), None, &mut |_, _| {}).unwrap();
    let merged = open(&parent);
    assert_eq!(merged.sector_sizes().logical, 4096);
    assert_eq!(sha256_device(merged.as_ref()), want);
    assert_eq!(sha256_device(open(&top).as_ref()), want);
    assert_eq!(testsupport::pyvhdi_sha256(&parent, None), want);
}

/// A delta larger than its source (`size`), over a base with data past the source's end: the
/// padding reads zeros, and the source's last cluster, equal to the base, keeps its bytes.
#[test]
fn padding_a_delta_keeps_the_sources_last_cluster() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    sh(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
    io(&base, &["write -P 0x61 0 64k"]);
    let src = d.path().join("src.raw");
    std::fs::write(&src, vec![0x61u8; 1000]).unwrap();
    let out = d.path().join("out.qcow2");
    let mut o = ConvertOptions::new(Format::Qcow2);
    o.size = Some(1024);
    o.backing = Some(vdisk::open_parent(&out, "base.qcow2", None, &Default::default()).unwrap());
    vdisk::convert(open(&src).as_ref(), &out, &o, None, &mut |_, _| {}).unwrap();
    let mut want = vec![0x61u8; 1000];
    want.resize(1024, 0);
    let got = open(&out);
    let mut b = vec![0u8; 1024];
    got.read_at(&mut b, 0).unwrap();
    assert!(b == want, "the padded delta reads wrong");
    assert_eq!(
        testsupport::qemu_sha256(&out, "qcow2"),
        testsupport::hex(&{
            use sha2::Digest;
            sha2::Sha256::digest(&want).to_vec()
        })
    );
}

/// A commit into a VHDX parent interrupted after its first write still leaves the child linked
/// to its parent (whose DataWriteGuid changed) and reading as before.
#[test]
fn interrupted_commit_keeps_a_vhdx_child_linked() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let chain = qemu_chain(d.path());
    let want = testsupport::qemu_sha256(&chain[2], "qcow2");
    let dir = d.path().join("v");
    std::fs::create_dir(&dir).unwrap();
    let dst = dir.join("top.vhdx");
    vdisk::convert_chain(
        &chain[2],
        &dst,
        &OpenOptions::default(),
        &ConvertOptions::new(Format::Vhdx),
        None,
        &mut |_, _| {},
    )
    .unwrap();
    let dwg = || {
        let p = vdisk::open(&dir.join("mid.vhdx"), &OpenOptions::default()).unwrap();
        p.info().format_specific["data_write_guid"].clone()
    };
    let before = dwg();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let mut calls = 0;
    let err = vdisk::commit(&dst, &OpenOptions::default(), Some(&cancel), &mut |_, _| {
        calls += 1;
        // After the first range is written.
        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap_err();
    assert_eq!(err.kind(), blockdev::ErrorKind::Interrupted, "{err}");
    assert!(calls >= 1);
    assert_ne!(dwg(), before, "nothing was written before the interruption");
    let child = vdisk::open(&dst, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("the child after an interrupted commit: {e}"));
    assert_eq!(sha256_device(child.as_ref()), want);
}

#[test]
fn keep_chain_to_4096_byte_sectors_rounds_every_layer_alike() {
    // 24565248 bytes is whole 512-byte sectors but not whole 4 KiB ones: the new base is
    // rounded up, and its child must take the same size (a differencing VHDX has its
    // parent's size), then verify against the source.
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let top = two_layers(
        d.path(),
        "24565248",
        "24565248",
        &["write -P 0x43 24563712 1024"],
    );
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dst = out.join("top.vhdx");
    let mut o = ConvertOptions::new(Format::Vhdx);
    o.options = vec![("logical_sector_size".into(), "4096".into())];
    o.verify = true;
    keep_chain(&top, &dst, &o);
    let new = open(&dst);
    assert_eq!(new.size(), 24567808);
    let src = open(&top);
    let mut a = vec![0u8; src.size() as usize];
    src.read_at(&mut a, 0).unwrap();
    let mut b = vec![0u8; new.size() as usize];
    new.read_at(&mut b, 0).unwrap();
    assert_eq!(a[..], b[..a.len()]);
    assert!(b[a.len()..].iter().all(|&x| x == 0));
}
