#!/usr/bin/env python3
"""By-hand check of the release binary on hostile variants of third-party images.

    fuzz/mutate-fixtures.py VDCONV [MUTANTS_PER_IMAGE]

Flips 1-16 bits in the first 2 MiB (headers and tables; half of the flips in the first 64 KiB)
of every compressed image of ../shared/fixtures (or $VDCONV_SHARED_FIXTURES), then runs
`vdconv info`, `check` and `digest` on each mutant under a 20 s timeout and a 2 GiB
address-space cap. Prints the exit codes seen; a panic (101), a signal or a timeout fails.
The seed is fixed, so two runs of the same binary give the same counts.
"""
import os, random, subprocess, sys, collections, resource, shutil, bz2, gzip, lzma, tempfile
V = os.path.abspath(sys.argv[1])
N = int(sys.argv[2]) if len(sys.argv) > 2 else 20
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
fx = os.environ.get("VDCONV_SHARED_FIXTURES", os.path.join(root, "..", "shared", "fixtures"))
work = tempfile.mkdtemp(prefix="vdconv-mutants-")
files = []
for d in ["qemu", "dissect", "dfvfs", "mkimg", "discutils"]:
    for f in sorted(os.listdir(os.path.join(fx, d))):
        if f.endswith((".bz2", ".gz", ".xz")):
            files.append(os.path.join(d, f))
def unpack(rel):
    p = os.path.join(fx, rel)
    op = {"bz2": bz2.open, "gz": gzip.open, "xz": lzma.open}[rel.rsplit(".", 1)[1]]
    out = os.path.join(work, os.path.basename(rel).rsplit(".", 1)[0])
    with op(p, "rb") as src, open(out, "wb") as dst:
        while True:
            b = src.read(1 << 20)
            if not b: break
            if b.count(0) == len(b): dst.seek(len(b), 1)
            else: dst.write(b)
        dst.truncate()
    return out
def limit():
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
rng = random.Random(20261126)
codes = collections.Counter()
bad = []
runs = 0
for rel in files:
    base = unpack(rel)
    size = os.path.getsize(base)
    with open(base, "rb") as f:
        head = f.read(2 << 20)
    ext = base.rsplit(".", 1)[-1]
    for i in range(N):
        mut = bytearray(head)
        for _ in range(rng.choice([1, 2, 4, 8, 16])):
            # headers/tables: bias to the first 64 KiB and to 64 KiB-aligned structures
            if rng.random() < 0.5: off = rng.randrange(min(len(mut), 65536))
            else: off = rng.randrange(len(mut))
            mut[off] ^= 1 << rng.randrange(8)
        m = os.path.join(work, f"m.{ext}")
        shutil.copyfile(base, m)
        with open(m, "r+b") as f:
            f.write(mut)
        for cmd in (["info", m], ["check", m], ["digest", m]):
            runs += 1
            try:
                r = subprocess.run([V] + cmd, capture_output=True, timeout=20, preexec_fn=limit)
                codes[r.returncode] += 1
                if r.returncode not in (0, 1, 2, 3, 4, 5, 6):
                    bad.append((rel, i, cmd[0], r.returncode, r.stderr[-300:]))
            except subprocess.TimeoutExpired:
                codes["timeout"] += 1
                bad.append((rel, i, cmd[0], "timeout", b""))
    os.remove(base)
shutil.rmtree(work, ignore_errors=True)
print(f"{len(files)} fixtures x {N} mutants, {runs} commands; exit codes: {dict(codes)}")
for b in bad[:20]: print("BAD", b)
sys.exit(1 if bad else 0)
