#!/usr/bin/env python3
"""Benchmark vdconv convert against qemu-img convert on the same machine, in alternation.

Builds a 4 GiB test disk (about 35% data, half random and half compressible, 15% zero-filled,
the rest holes), makes the source images with qemu-img, then converts each pair with both tools,
alternating, and prints the median wall time, the peak memory (max RSS of the process) and the
ratio vdconv/qemu-img for each, and the median CPU time (user + system) of each: on a shared
machine wall times are noisy, CPU times much less.

    bench/bench.py [--size-gib 4] [--runs 4] [--dir DIR] [--vdconv PATH] [--pairs raw:qcow2,...]

The order alternates run by run (qemu-img first, then vdconv first, ...): on a virtual machine
whose free memory goes back to the host, the command that runs right after the outputs are
deleted gets their warm pages and the other one pays for fresh ones, so a fixed order favours one
tool. Use an even --runs so each tool goes first equally often.

Both tools flush their output before returning: qemu-img with `-t writeback` would be the same
durability; by default qemu-img runs with its own default cache mode (`unsafe`: no flush), which
favours it. Use --qemu-cache to change that.
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
PIECE = 256 * 1024

QEMU_FMT = {"raw": "raw", "qcow2": "qcow2", "vhdx": "vhdx", "vhd": "vpc"}
DEFAULT_PAIRS = "raw:qcow2,qcow2:vhdx,vhdx:qcow2,vhd:qcow2,qcow2:raw,qcow2:vhd,raw:qcow2c"


def log_text(rng):
    """A piece of compressible data: lines of a service log (deflate shrinks it about 4x)."""
    lines = []
    n = 0
    while n < PIECE:
        line = (f"2026-11-{rng.randrange(1, 29):02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:"
                f"{rng.randrange(60):02d} host{rng.randrange(8)} api[{rng.randrange(1000, 9999)}]: "
                f"GET /v1/disks/{rng.randrange(10**6)} {rng.choice((200, 200, 200, 404, 500))} "
                f"in {rng.randrange(1, 900)} ms\n").encode()
        lines.append(line)
        n += len(line)
    return b"".join(lines)[:PIECE]


def make_disk(path, size):
    """The test disk: pieces of random, compressible and zero-filled data, and holes."""
    rng = random.Random(20261126)
    texts = [log_text(rng) for _ in range(64)]
    zeros = bytes(PIECE)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, PIECE):
            r = rng.random()
            if r < 0.175:
                f.seek(off)
                f.write(os.urandom(PIECE))
            elif r < 0.35:
                f.seek(off)
                f.write(rng.choice(texts))
            elif r < 0.50:
                f.seek(off)
                f.write(zeros)


def measure(cmd):
    """Runs cmd; returns (seconds, peak RSS in MiB, CPU seconds: user + system)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if status != 0:
        raise SystemExit(f"command failed ({status}): {' '.join(cmd)}\n{err}")
    return dt, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--vdconv", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "vdconv"))
    ap.add_argument("--pairs", default=DEFAULT_PAIRS)
    ap.add_argument("--qemu-cache", default=None, help="qemu-img -t mode (default: qemu-img's own)")
    args = ap.parse_args()

    vdconv = os.path.abspath(args.vdconv)
    if not os.path.exists(vdconv):
        raise SystemExit(f"{vdconv} not found: run `cargo build --release -p vdconv` first")
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img not found: apt-get install qemu-utils")
    work = args.dir or tempfile.mkdtemp(prefix="vdconv-bench-")
    os.makedirs(work, exist_ok=True)
    size = int(args.size_gib * (1 << 30)) // MIB * MIB
    src = {"raw": os.path.join(work, "src.raw")}
    if not os.path.exists(src["raw"]) or os.path.getsize(src["raw"]) != size:
        print(f"making a {size >> 20} MiB test disk in {work} ...", flush=True)
        # In a child process: its memory would otherwise count in the peak RSS of every
        # command measured after it (a child's max RSS starts from its parent's at fork).
        subprocess.run([sys.executable, os.path.abspath(__file__), "--make-disk", src["raw"], str(size)], check=True)
    for fmt in ("qcow2", "vhdx", "vhd"):
        src[fmt] = os.path.join(work, f"src.{fmt}")
        if not os.path.exists(src[fmt]):
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", QEMU_FMT[fmt], src["raw"], src[fmt]], check=True)

    print(f"vdconv: {vdconv}\nqemu-img: {subprocess.run(['qemu-img', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
    print(f"cores: {os.cpu_count()}, runs per tool: {args.runs}, qemu-img cache: {args.qemu_cache or 'default (unsafe: no flush)'}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    header = (f"{'pair':<16}{'qemu-img s':>11}{'vdconv s':>10}{'ratio':>8}{'qemu MiB':>10}{'vdconv MiB':>11}"
              f"{'qemu cpu':>10}{'vdconv cpu':>11}")
    print(header)
    print("-" * len(header))
    results = []
    for pair in args.pairs.split(","):
        a, b = pair.split(":")
        compress = b == "qcow2c"
        b_fmt = "qcow2" if b == "qcow2c" else b
        out_q = os.path.join(work, f"out-q.{b_fmt}")
        out_v = os.path.join(work, f"out-v.{b_fmt}")
        qcmd = ["qemu-img", "convert", "-f", QEMU_FMT[a], "-O", QEMU_FMT[b_fmt]]
        if args.qemu_cache:
            qcmd += ["-t", args.qemu_cache]
        vcmd = [vdconv, "convert", "-f", a, "-O", b_fmt, "--progress", "none"]
        if compress:
            qcmd.append("-c")
            vcmd.append("-c")
        qt, vt, qm, vm, qc, vc = [], [], [], [], [], []
        for run in range(args.runs):
            for path in (out_q, out_v):
                if os.path.exists(path):
                    os.remove(path)
            order = [(qcmd + [src[a], out_q], qt, qm, qc), (vcmd + [src[a], out_v], vt, vm, vc)]
            if run % 2:
                order.reverse()
            for cmd, times, mems, cpus in order:
                # Each command starts with no dirty pages of the previous one still to write.
                os.sync()
                t, m, c = measure(cmd)
                times.append(t)
                mems.append(m)
                cpus.append(c)
        check = subprocess.run(["qemu-img", "compare", "-f", QEMU_FMT[b_fmt], "-F", QEMU_FMT[b_fmt], out_q, out_v], capture_output=True, text=True)
        same = "same" if check.returncode == 0 else "DIFFERENT"
        q, v = statistics.median(qt), statistics.median(vt)
        row = (pair, q, v, v / q if q else float("nan"), max(qm), max(vm), same)
        results.append(row)
        print(f"{pair:<16}{q:>11.2f}{v:>10.2f}{row[3]:>8.2f}{row[4]:>10.1f}{row[5]:>11.1f}"
              f"{statistics.median(qc):>10.2f}{statistics.median(vc):>11.2f}  {same}", flush=True)
        for path in (out_q, out_v):
            if os.path.exists(path):
                os.remove(path)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[6] == "same" for r in results) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--make-disk":
        make_disk(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
