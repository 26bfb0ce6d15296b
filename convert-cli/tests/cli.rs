//! End-to-end tests of the `vdconv` binary, checked against cmp, sha256sum and qemu-img.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use testsupport::{require_tool, run, sha256_file, TestRng};

fn vdconv() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vdconv"))
}

/// A sparse raw file with random data at the given (offset, len) places.
fn sparse_raw(path: &Path, size: u64, pieces: &[(u64, usize)], seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = TestRng::new(seed);
    for &(off, len) in pieces {
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf);
        f.write_all_at(&buf, off).unwrap();
    }
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn raw_convert_keeps_holes_and_agrees_with_cmp_sha256sum_qemu_map() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    sparse_raw(
        &a,
        64 << 20,
        &[
            (1 << 20, 3 << 20),
            (40 << 20, 4096),
            ((64 << 20) - 512, 512),
        ],
        1,
    );
    let (code, _, err) = run(vdconv()
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&a)
        .arg(&b));
    assert_eq!(code, 0, "{err}");
    // Holes kept: the copy allocates about what the source does, far less than 64 MiB.
    assert!(
        allocated(&b) <= allocated(&a) + (1 << 20),
        "{} vs {}",
        allocated(&b),
        allocated(&a)
    );
    assert!(allocated(&b) < 8 << 20);
    let (code, _, _) = run(Command::new("cmp").arg(&a).arg(&b));
    assert_eq!(code, 0, "cmp says the copy differs");

    // compare agrees with cmp, both ways.
    let (code, out, _) = run(vdconv().arg("compare").arg(&a).arg(&b));
    assert_eq!(code, 0, "{out}");
    let c = d.path().join("c.raw");
    std::fs::copy(&a, &c).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&c).unwrap();
        f.write_all_at(b"X", 50 << 20).unwrap();
    }
    let (code, out, _) = run(vdconv().arg("compare").arg(&a).arg(&c));
    assert_eq!(code, 1);
    assert!(out.contains(&format!("{}", 50u64 << 20)), "{out}");
    let (cmp_code, _, _) = run(Command::new("cmp").arg(&a).arg(&c));
    assert_eq!(cmp_code, 1);

    // digest --algorithm sha256 equals sha256sum.
    let (code, out, _) = run(vdconv().args(["digest", "--algorithm", "sha256"]).arg(&b));
    assert_eq!(code, 0);
    let (hex, name) = out.trim().split_once("  ").unwrap();
    assert_eq!(hex, sha256_file(&a));
    assert_eq!(name, b.display().to_string());
    // The sparse digest is content-only: equal for equal content, different otherwise.
    let dig = |p: &Path| {
        run(vdconv().arg("digest").arg(p))
            .1
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(dig(&a), dig(&b));
    assert_ne!(dig(&a), dig(&c));

    // map --output json agrees with qemu-img map on start/length/data/zero.
    let (code, ours, _) = run(vdconv().args(["map", "--output", "json"]).arg(&b));
    assert_eq!(code, 0);
    let (code, theirs, _) = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(&b));
    assert_eq!(code, 0);
    let key = |s: &str| -> Vec<(u64, u64, bool, bool)> {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["data"].as_bool().unwrap(),
                    e["zero"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(key(&ours), key(&theirs));
}

#[test]
fn existing_destination_needs_force() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    sparse_raw(&a, 1 << 20, &[(0, 4096)], 2);
    std::fs::write(&b, b"keep me").unwrap();
    let (code, _, err) = run(vdconv()
        .args(["convert", "-O", "raw", "-f", "raw"])
        .arg(&a)
        .arg(&b));
    assert_ne!(code, 0);
    assert!(err.starts_with("vdconv: "), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&b).unwrap(), b"keep me");
    let (code, _, err) = run(vdconv()
        .args(["convert", "-O", "raw", "-f", "raw", "--force"])
        .arg(&a)
        .arg(&b));
    assert_eq!(code, 0, "{err}");
    assert_eq!(sha256_file(&a), sha256_file(&b));
    assert_eq!(entries(d.path()).len(), 2, "no temporary file left behind");
}

#[test]
fn write_error_leaves_nothing_at_destination() {
    // A file-size limit makes the output's writes fail with EFBIG part-way through.
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    sparse_raw(&a, 16 << 20, &[(0, 8 << 20)], 3);
    let script = format!(
        "ulimit -f 2048; exec {} convert -f raw -O raw {} {}",
        env!("CARGO_BIN_EXE_vdconv"),
        a.display(),
        b.display()
    );
    let (code, _, err) = run(Command::new("sh").arg("-c").arg(&script));
    assert_ne!(
        code, 0,
        "conversion should fail under a 1 MiB file-size limit"
    );
    assert!(err.contains("vdconv: "), "{err}");
    assert_eq!(
        entries(d.path()),
        vec![a.clone()],
        "only the source may remain: {err}"
    );
}

#[test]
fn ctrl_c_leaves_nothing_at_destination() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    // 768 MiB of non-zero data: long enough to interrupt.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&a).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..768 {
            f.write_all(&chunk).unwrap();
        }
    }
    let mut child = vdconv()
        .args(["convert", "-f", "raw", "-O", "raw", "--progress", "json"])
        .arg(&a)
        .arg(&b)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(
        first.contains("\"done\""),
        "expected a JSON progress line, got {first:?}"
    );
    let pid = child.id().to_string();
    run(Command::new("kill").args(["-INT", &pid]));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    if status.success() {
        // The conversion beat the signal: nothing to check on this machine.
        eprintln!("conversion finished before the interrupt arrived");
        return;
    }
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
    assert_eq!(
        entries(d.path()),
        vec![a.clone()],
        "only the source may remain"
    );
}

#[test]
fn info_json_has_the_documented_fields() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.img");
    sparse_raw(&a, 3 << 20, &[(0, 512)], 4);
    let (code, out, err) = run(vdconv().args(["info", "--output", "json"]).arg(&a));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual_size"], 3 << 20);
    assert!(v["subformat"].is_null());
    assert_eq!(v["logical_sector_size"], 512);
    assert_eq!(v["physical_sector_size"], 512);
    assert!(v["backing"].is_null());
    assert!(v["format_specific"].is_object());
}

#[test]
fn create_raw_and_errors_are_prefixed() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("new.img");
    let (code, _, err) = run(vdconv().args(["create", "-f", "raw"]).arg(&a).arg("10M"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 10 << 20);
    assert_eq!(allocated(&a), 0);
    let (code, _, err) = run(vdconv().args(["info"]).arg(d.path().join("missing.img")));
    assert_ne!(code, 0);
    assert!(err.starts_with("vdconv: "), "{err}");
    let (code, _, err) = run(vdconv().args(["create", "-f", "nosuch"]).arg(&a).arg("1M"));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn probed_raw_is_not_opened_for_writing_and_ambiguous_input_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("poly.img");
    let mut bytes = vec![0u8; 4096];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    bytes[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
    std::fs::write(&a, &bytes).unwrap();
    let (code, _, err) = run(vdconv().arg("info").arg(&a));
    assert_ne!(code, 0);
    assert!(err.contains("several formats"), "{err}");
}

#[test]
fn target_azure_rounds_to_whole_mib_with_a_notice() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("disk.raw");
    // 100.3 MiB, not even a whole number of sectors.
    let size = (100.3 * 1048576.0) as u64;
    sparse_raw(&a, size, &[(0, 65536), (size - 1000, 1000)], 9);
    let out = d.path().join("azure.vhd");
    let (code, _, err) = run(vdconv()
        .args(["convert", "--target", "azure", "--verify"])
        .arg(&a)
        .arg(&out));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("rounded up"), "{err}");
    let (code, info, _) = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vpc"])
        .arg(&out));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 101 * 1048576);
    let (code, info, _) = run(vdconv().args(["info", "--output", "json"]).arg(&out));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["subformat"], "fixed");
    assert_eq!(v["virtual_size"], 101 * 1048576);
}

#[test]
fn compare_strict_fails_on_allocation_as_qemu_img_does() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let img = |name: &str, io: &[&str]| {
        let p = d.path().join(name);
        let (code, _, err) = run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("4M"));
        assert_eq!(code, 0, "{err}");
        for c in io {
            let (code, _, err) = run(Command::new("qemu-io").args(["-c", c]).arg(&p));
            assert_eq!(code, 0, "{err}");
        }
        p
    };
    // Same content (all zeros), allocated three ways: nothing, a zero cluster, zero data.
    let empty = img("e.qcow2", &[]);
    let zero = img("z.qcow2", &["write -z 0 64k"]);
    let data = img("d.qcow2", &["write -P 0 0 64k"]);
    for (a, b) in [(&empty, &zero), (&empty, &data), (&zero, &data)] {
        let (code, out, _) = run(vdconv().arg("compare").arg(a).arg(b));
        assert_eq!(code, 0, "{out}");
        let (code, out, _) = run(vdconv().args(["compare", "-s"]).arg(a).arg(b));
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("Strict mode: Offset 0 block status mismatch!"),
            "{out}"
        );
        let (qcode, qout, _) = run(Command::new("qemu-img")
            .args(["compare", "-s"])
            .arg(a)
            .arg(b));
        assert_eq!(qcode, 1, "{qout}");
    }
    let (code, out, _) = run(vdconv()
        .args(["compare", "-s", "--output", "json"])
        .arg(&zero)
        .arg(&data));
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mismatch"], "allocation", "{out}");
    let (code, out, _) = run(vdconv().args(["compare", "-s"]).arg(&data).arg(&data));
    assert_eq!(code, 0, "{out}");
    // Without -s, a size difference with a zero tail is a warning, as qemu-img prints it.
    let small = d.path().join("s.qcow2");
    let (code, _, err) = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&small)
        .arg("2M"));
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(vdconv().arg("compare").arg(&small).arg(&empty));
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("Warning: Image size mismatch!"), "{out}");
}

#[test]
fn create_takes_size_and_backing_file_as_options_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "qcow2", "-o", "size=3M,cluster_size=4096"])
        .arg(p("a.qcow2")));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(vdconv()
        .args([
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=a.qcow2,backing_fmt=qcow2",
        ])
        .arg(p("b.qcow2")));
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(vdconv()
        .args(["info", "--output", "json"])
        .arg(p("b.qcow2")));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["virtual_size"], 3 << 20, "{out}");
    assert_eq!(v["backing"]["reference"], "a.qcow2", "{out}");
    // Given both ways, they must agree.
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "qcow2", "-o", "size=3M"])
        .arg(p("c.qcow2"))
        .arg("4M"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("SIZE 4M and -o size=3M disagree"), "{err}");
}

#[test]
fn a_parent_outside_the_image_directory_is_named_as_refused_not_missing() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("a")).unwrap();
    std::fs::create_dir_all(d.path().join("b")).unwrap();
    let base = d.path().join("b/base.qcow2");
    let top = d.path().join("a/top.qcow2");
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "qcow2"])
        .arg(&base)
        .arg("1M"));
    assert_eq!(code, 0, "{err}");
    // create says at once that opening the new image will need --backing-dir.
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "qcow2", "-b", "../b/base.qcow2"])
        .arg(&top));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("need --backing-dir"), "{err}");
    let (code, _, err) = run(vdconv().arg("digest").arg(&top));
    assert_eq!(code, 6, "{err}");
    assert!(
        err.contains("parent/backing file '../b/base.qcow2' not opened")
            && err.contains("outside the image's directory"),
        "{err}"
    );
    let (code, _, err) = run(vdconv()
        .arg("digest")
        .arg("--backing-dir")
        .arg(d.path().join("b"))
        .arg(&top));
    assert_eq!(code, 0, "{err}");
    // A backing format needs a backing file, as qemu-img says.
    let (code, _, err) = run(vdconv()
        .args(["convert", "-O", "qcow2", "-F", "qcow2"])
        .arg(&base)
        .arg(d.path().join("x.qcow2")));
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "qcow2", "-F", "qcow2"])
        .arg(d.path().join("y.qcow2"))
        .arg("1M"));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn messages_name_the_file_and_the_problem() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("r.raw");
    sparse_raw(&raw, 1 << 20, &[(0, 4096)], 5);
    let (code, _, err) = run(vdconv().arg("check").arg(&raw));
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("r.raw: raw images have no metadata to check"),
        "{err}"
    );
    // A directory as the destination is refused before any work, even with --force.
    let dir = d.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let (code, _, err) = run(vdconv()
        .args(["convert", "--force", "-O", "qcow2"])
        .arg(&raw)
        .arg(&dir));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("destination is a directory"), "{err}");
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "qcow2", "-o", "cluster_size"])
        .arg(d.path().join("x.qcow2"))
        .arg("1M"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cluster_size: invalid size"), "{err}");
    // The size notice names the size the image gets: whole 4096-byte sectors here.
    let v = d.path().join("s4.vhdx");
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "vhdx", "-o", "logical_sector_size=4096"])
        .arg(&v)
        .arg("1000000"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("from 1000000 to 1003520 bytes"), "{err}");
    let (code, out, _) = run(vdconv().args(["info", "--output", "json"]).arg(&v));
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["virtual_size"], 1003520, "{out}");
}

#[test]
fn option_help_lists_each_format_options() {
    let (code, out, err) = run(vdconv().args(["create", "-f", "qcow2", "-o", "help"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Supported options for qcow2"), "{out}");
    for key in [
        "size",
        "backing_file",
        "cluster_size",
        "compression_type",
        "lazy_refcounts",
    ] {
        assert!(out.contains(&format!("  {key} ")), "{key}: {out}");
    }
    // convert takes no size or backing file through -o.
    let (code, out, err) = run(vdconv().args(["convert", "-O", "vhdx", "-o", "?"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("  block_size ") && !out.contains("  size "),
        "{out}"
    );
    // Without -o help, the names are still required.
    let (code, _, err) = run(vdconv().args(["create", "-f", "qcow2"]));
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(vdconv().args(["convert", "-O", "qcow2", "a.raw"]));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn target_settings_the_platform_needs_cannot_be_overridden() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("disk.raw");
    sparse_raw(&a, 4 << 20, &[(0, 65536)], 3);
    // Azure takes only fixed VHDs: a dynamic one would fail at upload.
    let out = d.path().join("azure.vhd");
    let (code, _, err) = run(vdconv()
        .args(["convert", "--target", "azure", "-o", "subformat=dynamic"])
        .arg(&a)
        .arg(&out));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--target azure needs subformat=fixed"),
        "{err}"
    );
    assert!(!out.exists());
    let (code, _, err) = run(vdconv()
        .args(["convert", "--target", "kvm", "-o", "compat=0.10"])
        .arg(&a)
        .arg(d.path().join("k.qcow2")));
    assert_eq!(code, 2, "{err}");
    // The target's name as the command line spells it.
    let (code, _, err) = run(vdconv()
        .args(["convert", "--target", "hyperv", "-O", "qcow2"])
        .arg(&a)
        .arg(d.path().join("h.qcow2")));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--target hyperv writes vhdx, not qcow2"),
        "{err}"
    );
    // Hyper-V's block size is a default: another one is taken, with a notice.
    let out = d.path().join("h.vhdx");
    let (code, _, err) = run(vdconv()
        .args(["convert", "--target", "hyperv", "-o", "block_size=1M"])
        .arg(&a)
        .arg(&out));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("replaces --target hyperv's block_size=32M"),
        "{err}"
    );
    // The same size in another spelling is no change.
    let (code, _, err) = run(vdconv()
        .args(["convert", "--target", "hyperv", "-o", "block_size=32"])
        .arg(&a)
        .arg(d.path().join("h32.vhdx")));
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("replaces"), "{err}");
    let (code, info, _) = run(vdconv().args(["info", "--output", "json"]).arg(&out));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["format_specific"]["block_size"], 1 << 20, "{info}");
}

#[test]
fn keep_chain_then_commit_from_the_command_line() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    let q = |args: &[&str]| assert_eq!(run(Command::new("qemu-img").args(args)).0, 0, "{args:?}");
    q(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]);
    assert_eq!(
        run(Command::new("qemu-io")
            .args(["-c", "write -P 0x61 0 4M"])
            .arg(&base))
        .0,
        0
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    assert_eq!(
        run(Command::new("qemu-io")
            .args(["-c", "write -P 0x62 1M 1M", "-c", "write -z 3M 512k"])
            .arg(&top))
        .0,
        0
    );
    let out_dir = d.path().join("hv");
    std::fs::create_dir(&out_dir).unwrap();
    let dst = out_dir.join("top.vhdx");
    let (code, _, err) = run(vdconv()
        .args(["convert", "--keep-chain", "-O", "vhdx"])
        .arg(&top)
        .arg(&dst));
    assert_eq!(code, 0, "{err}");
    assert!(out_dir.join("base.vhdx").exists());
    let (code, info, err) = run(vdconv()
        .args(["info", "--backing-chain", "--output", "json"])
        .arg(&dst));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["subformat"], "differencing");
    assert_eq!(v[0]["backing"]["resolved"], true);
    let (code, out, _) = run(vdconv().arg("compare").arg(&top).arg(&dst));
    assert_eq!(code, 0, "{out}");
    // Commit the VHDX child into its parent: the parent then holds the child's content.
    let (code, _, err) = run(vdconv().arg("commit").arg(&dst));
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(vdconv()
        .arg("compare")
        .arg(&top)
        .arg(out_dir.join("base.vhdx")));
    assert_eq!(code, 0, "{out}");
    // The child was relinked to its parent's new DataWriteGuid: it opens and reads the same.
    let (code, out, err) = run(vdconv().arg("compare").arg(&top).arg(&dst));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(vdconv().arg("check").arg(&dst));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn outputs_never_replace_what_they_are_made_from() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    // A missing image is an I/O error (exit 1), not a missing parent (exit 6).
    let (code, _, err) = run(vdconv().arg("info").arg(p("missing.qcow2")));
    assert_eq!(code, 1, "{err}");
    let ok = |c: &mut Command| {
        let (code, out, err) = run(c);
        assert_eq!(code, 0, "{out}{err}");
    };
    ok(vdconv()
        .args(["create", "-f", "qcow2"])
        .arg(p("base.qcow2"))
        .arg("4M"));
    ok(vdconv()
        .args(["create", "-f", "qcow2", "-b", "base.qcow2"])
        .arg(p("top.qcow2")));
    let base = sha256_file(&p("base.qcow2"));
    let refused = |c: &mut Command, what: &str| {
        let (code, out, err) = run(c);
        assert_eq!(code, 2, "{what}: {out}{err}");
        assert!(err.contains("would destroy"), "{what}: {err}");
        assert_eq!(sha256_file(&p("base.qcow2")), base, "{what}: base replaced");
    };
    // An image over itself (it would loop onto itself).
    refused(
        vdconv()
            .args(["create", "-f", "qcow2", "--force", "-b", "base.qcow2"])
            .arg(p("base.qcow2")),
        "create -b itself",
    );
    // A delta over the base it replaces.
    refused(
        vdconv()
            .args(["convert", "-O", "qcow2", "--force", "-B", "base.qcow2"])
            .arg(p("top.qcow2"))
            .arg(p("base.qcow2")),
        "convert -B onto the base",
    );
    // A flattened copy over the source's own parent.
    refused(
        vdconv()
            .args(["convert", "-O", "qcow2", "--force"])
            .arg(p("top.qcow2"))
            .arg(p("base.qcow2")),
        "convert onto the source's parent",
    );
    // Nor the source itself: top.qcow2 names base.qcow2 as a qcow2 backing file.
    refused(
        vdconv()
            .args(["convert", "-O", "raw", "--force"])
            .arg(p("base.qcow2"))
            .arg(p("base.qcow2")),
        "convert onto the source itself",
    );
    let (code, out, err) = run(vdconv().arg("info").arg(p("top.qcow2")));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn open_options_a_format_does_not_use_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("b.raw");
    let vhd = d.path().join("b.vhd");
    let (code, _, err) = run(vdconv().args(["create", "-f", "raw"]).arg(&raw).arg("1M"));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(vdconv().args(["create", "-f", "vhd"]).arg(&vhd).arg("1M"));
    assert_eq!(code, 0, "{err}");
    // A snapshot of a format without snapshots is an error, not the current data.
    let (code, _, err) = run(vdconv()
        .args(["convert", "-O", "raw", "-l", "snap1"])
        .arg(&raw)
        .arg(d.path().join("o.raw")));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no open option 'snapshot'"), "{err}");
    assert!(!d.path().join("o.raw").exists());
    // compare gives each image the options its format uses; one neither uses is refused.
    let (code, out, err) = run(vdconv()
        .args(["compare", "--open-option", "size_rule=chs"])
        .arg(&vhd)
        .arg(&raw));
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = run(vdconv()
        .args(["compare", "--open-option", "bogus=1"])
        .arg(&vhd)
        .arg(&raw));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn check_repair_modes() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("c.qcow2");
    assert_eq!(
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("4M"))
        .0,
        0
    );
    assert_eq!(
        run(Command::new("qemu-io")
            .args(["-c", "write -P 0x61 0 64k"])
            .arg(&img))
        .0,
        0
    );
    // qemu-img's `-r all` also rewrites corruptions: refused, nothing is touched.
    let before = sha256_file(&img);
    let (code, _, err) = run(vdconv().args(["check", "-r", "all"]).arg(&img));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("only leaks are repaired"), "{err}");
    assert_eq!(sha256_file(&img), before);
    // Corrupt the L2 pointer: `-r leaks` leaves the image alone and reports it (exit 3).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut h = [0u8; 48];
        f.read_exact_at(&mut h, 0).unwrap();
        let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
        f.write_all_at(&((1u64 << 63) | (1u64 << 40)).to_be_bytes(), l1)
            .unwrap();
    }
    let before = sha256_file(&img);
    let (code, out, err) = run(vdconv().args(["check", "-r", "leaks"]).arg(&img));
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("leak repair refused"), "{err}");
    assert!(out.contains("ERROR"), "{out}");
    assert_eq!(sha256_file(&img), before, "a corrupt image was modified");
}

#[test]
fn sizes_round_to_sectors_and_backing_fmt_is_honoured() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let ok = |c: &mut Command| {
        let (code, out, err) = run(c);
        assert_eq!(code, 0, "{out}{err}");
        err
    };
    let err = ok(vdconv()
        .args(["create", "-f", "vhd"])
        .arg(p("a.vhd"))
        .arg("1000"));
    assert!(err.contains("rounded up from 1000 to 1024"), "{err}");
    // An 11-byte raw converts to a one-sector VHD that compares equal (zeros after).
    std::fs::write(p("odd.raw"), b"hello world").unwrap();
    let err = ok(vdconv()
        .args(["convert", "-O", "vhd"])
        .arg(p("odd.raw"))
        .arg(p("odd.vhd")));
    assert!(err.contains("rounded up from 11 to 512"), "{err}");
    ok(vdconv().arg("compare").arg(p("odd.raw")).arg(p("odd.vhd")));
    // -o backing_fmt is -F: it decides how the backing file is opened and recorded.
    ok(vdconv()
        .args(["create", "-f", "qcow2"])
        .arg(p("base.qcow2"))
        .arg("1M"));
    ok(vdconv()
        .args([
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-o",
            "backing_fmt=raw",
        ])
        .arg(p("c.qcow2")));
    let (_, out, _) = run(vdconv()
        .args(["info", "--output", "json"])
        .arg(p("c.qcow2")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backing"]["format"], "raw", "{v}");
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "qcow2", "-o", "backing_fmt=raw"])
        .arg(p("d.qcow2"))
        .arg("1M"));
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"])
        .args(["-o", "backing_fmt=raw"])
        .arg(p("e.qcow2")));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn formats_from_file_names_and_map_names_files() {
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let (code, _, err) = run(vdconv().arg("create").arg(p("b.qcow2")).arg("4M"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("writing qcow2, from the file name"), "{err}");
    assert_eq!(
        run(Command::new("qemu-io")
            .args(["-c", "write -P 1 0 64k"])
            .arg(p("b.qcow2")))
        .0,
        0
    );
    let (code, _, err) = run(vdconv().args(["create", "-b", "b.qcow2"]).arg(p("t.qcow2")));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        run(Command::new("qemu-io")
            .args(["-c", "write -P 2 1M 64k"])
            .arg(p("t.qcow2")))
        .0,
        0
    );
    // map says which file each mapped range is in, like qemu-img map.
    let (code, out, err) = run(vdconv().arg("map").arg(p("t.qcow2")));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].ends_with("File"), "{out}");
    assert!(
        lines[1].starts_with("0x0 ") && lines[1].ends_with("b.qcow2"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("0x100000 ") && lines[2].ends_with("t.qcow2"),
        "{out}"
    );
    // convert takes the format from the destination's name; a name that says none is refused.
    let (code, _, err) = run(vdconv().arg("convert").arg(p("t.qcow2")).arg(p("o.vhdx")));
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(vdconv().args(["info", "--output", "json"]).arg(p("o.vhdx")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "vhdx");
    let (code, _, err) = run(vdconv().arg("convert").arg(p("t.qcow2")).arg(p("o.bin")));
    assert_eq!(code, 2, "{err}");
    assert!(!p("o.bin").exists());
}

#[test]
fn qemu_img_convert_options_are_accepted_or_explained() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("s.raw");
    std::fs::write(&src, vec![7u8; 65536]).unwrap();
    // Tuning and cache options are accepted (the output is flushed whatever -t says).
    let (code, _, err) = run(vdconv()
        .args([
            "convert", "-f", "raw", "-O", "qcow2", "-t", "none", "-T", "none", "-W",
        ])
        .args(["-m", "16"])
        .arg(&src)
        .arg(d.path().join("a.qcow2")));
    assert_eq!(code, 0, "{err}");
    // What vdconv cannot do is said, with exit 5, and nothing is written.
    for (args, what) in [
        (&["-n"][..], "-n"),
        (&["-S", "0"][..], "-S"),
        (&["--target-image-opts"][..], "--target-image-opts"),
    ] {
        let out = d.path().join("b.qcow2");
        let (code, _, err) = run(vdconv()
            .args(["convert", "-O", "qcow2"])
            .args(args)
            .arg(&src)
            .arg(&out));
        assert_eq!(code, 5, "{what}: {err}");
        assert!(err.contains(what) && err.contains("not supported"), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn a_missing_backing_file_is_exit_6() {
    let d = tempfile::tempdir().unwrap();
    let (code, _, err) = run(vdconv()
        .args(["create", "-f", "qcow2", "-b", "missing.qcow2"])
        .arg(d.path().join("c.qcow2")));
    assert_eq!(code, 6, "{err}");
    assert!(!d.path().join("c.qcow2").exists());
}

#[test]
fn info_names_the_backing_file_actually_opened() {
    // The overlay names "base.qcow2" beside it, but the base sits in another directory that
    // --backing-dir allows: "actual path" must be that file, as the next layer's image line.
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let (top_dir, base_dir) = (d.path().join("vms"), d.path().join("store"));
    std::fs::create_dir_all(&top_dir).unwrap();
    std::fs::create_dir_all(&base_dir).unwrap();
    let base = base_dir.join("base.qcow2");
    let top = top_dir.join("top.qcow2");
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]).arg(&base).arg("4M");
    assert_eq!(run(&mut c).0, 0);
    let mut c = Command::new("qemu-img");
    c.args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
    ])
    .arg(&top)
    .arg("4M");
    assert_eq!(run(&mut c).0, 0);
    let (code, out, err) = run(vdconv()
        .args([
            "info",
            "--backing-chain",
            "--output",
            "json",
            "--backing-dir",
        ])
        .arg(&base_dir)
        .arg(&top));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let opened = v[1]["filename"].as_str().unwrap().to_string();
    assert_eq!(
        Path::new(&opened).canonicalize().unwrap(),
        base.canonicalize().unwrap()
    );
    assert_eq!(
        v[0]["backing"]["resolved_path"].as_str(),
        Some(opened.as_str())
    );
    let (code, out, err) = run(vdconv()
        .args(["info", "--backing-dir"])
        .arg(&base_dir)
        .arg(&top));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("(actual path: {opened})")), "{out}");
}

#[test]
fn vhdx_relative_path_is_from_the_childs_directory_whatever_path_was_typed() {
    // Run from a sibling directory, the child named through "..": its locator's
    // relative_path must lead from the child's own directory to the parent.
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    for args in [
        &["create", "-f", "vhdx", "../b/base.vhdx", "4M"][..],
        &[
            "create",
            "-f",
            "vhdx",
            "-b",
            "base.vhdx",
            "-F",
            "vhdx",
            "../b/child.vhdx",
        ],
    ] {
        let (code, _, err) = run(vdconv().current_dir(&a).args(args));
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    let (code, out, err) =
        run(vdconv()
            .current_dir(&a)
            .args(["info", "--output", "json", "../b/child.vhdx"]));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["format_specific"]["parent_locator"]["relative_path"],
        ".\\base.vhdx"
    );
}
