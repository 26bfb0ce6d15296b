#!/usr/bin/env bash
# Generates the seed corpora of the fuzz targets into fuzz/seeds/<target>/ (git-ignored).
#
# Only qemu-img/qemu-io and our own vdconv make the seeds: no third-party image is copied.
# Images are small (virtual size 1-8 MiB) and are stored in the sparse encoding of the parser
# targets (only their non-zero 4 KiB pages), so libFuzzer mutates kilobytes, not megabytes.
#
#   fuzz/make-seeds.sh            # uses $VDCONV, else target/release/vdconv (built if missing)
#   VDCONV=/path/to/vdconv fuzz/make-seeds.sh
#
# The ops_*/convert_roundtrip/vhdx_log_replay targets take structured (arbitrary) input and
# need no seeds.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="$here/seeds"
command -v qemu-img >/dev/null || { echo "qemu-img is required (apt-get install qemu-utils)" >&2; exit 1; }
VDCONV="${VDCONV:-$root/target/release/vdconv}"
if [ ! -x "$VDCONV" ]; then
  (cd "$root" && cargo build --release -p vdconv)
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$out"
mkdir -p "$out"/{probe,open_vhd,open_vhdx,open_qcow2}

# A deterministic raw source with data, zeros and a hole: 4 MiB.
src="$tmp/src.raw"
qemu-img create -q -f raw "$src" 4M
qemu-io -f raw -c 'write -P 0x55 0 64k' -c 'write -P 0xaa 1M 4k' -c 'write -P 0x01 3M 64k' \
  -c 'write -z 2M 64k' "$src" >/dev/null

n=0
# seed TARGET NAME CMD...: runs CMD (which writes $tmp/img), copies the result if it worked.
seed() {
  local target="$1" name="$2"
  shift 2
  rm -f "$tmp/img"
  if "$@" >/dev/null 2>&1 && [ -s "$tmp/img" ]; then
    cp "$tmp/img" "$out/$target/$name"
    cp "$tmp/img" "$out/probe/$target-$name"
    n=$((n + 1))
  else
    echo "skipped $target/$name" >&2
  fi
}
qi() { qemu-img "$@"; }
# ---- qcow2 (qemu-img) ----
seed open_qcow2 empty-v3 qi create -q -f qcow2 "$tmp/img" 4M
seed open_qcow2 empty-v2 qi create -q -f qcow2 -o compat=0.10 "$tmp/img" 4M
seed open_qcow2 data-v3 sh -c "qemu-img convert -O qcow2 '$src' '$tmp/img'"
seed open_qcow2 data-v2 sh -c "qemu-img convert -O qcow2 -o compat=0.10 '$src' '$tmp/img'"
seed open_qcow2 zlib sh -c "qemu-img convert -c -O qcow2 '$src' '$tmp/img'"
seed open_qcow2 zstd sh -c "qemu-img convert -c -O qcow2 -o compression_type=zstd '$src' '$tmp/img'"
seed open_qcow2 cluster512 sh -c "qemu-img convert -O qcow2 -o cluster_size=512 '$src' '$tmp/img'"
seed open_qcow2 cluster2m sh -c "qemu-img convert -O qcow2 -o cluster_size=2M '$src' '$tmp/img'"
seed open_qcow2 prealloc-metadata sh -c "qemu-img create -q -f qcow2 -o preallocation=metadata '$tmp/img' 4M"
seed open_qcow2 extended-l2 sh -c "qemu-img convert -O qcow2 -o extended_l2=on,cluster_size=64k '$src' '$tmp/img'"
seed open_qcow2 refcount1 sh -c "qemu-img convert -O qcow2 -o refcount_bits=1 '$src' '$tmp/img'"
seed open_qcow2 refcount64 sh -c "qemu-img convert -O qcow2 -o refcount_bits=64 '$src' '$tmp/img'"
seed open_qcow2 lazy-dirty sh -c "qemu-img create -q -f qcow2 -o lazy_refcounts=on '$tmp/img' 4M &&
  qemu-io -f qcow2 -c 'write -P 0x11 0 64k' -c 'sigraise 9' '$tmp/img'; test -s '$tmp/img'"
seed open_qcow2 snapshot sh -c "qemu-img convert -O qcow2 '$src' '$tmp/img' &&
  qemu-img snapshot -c snap1 '$tmp/img' && qemu-io -f qcow2 -c 'write -P 0x77 0 4k' '$tmp/img'"
seed open_qcow2 bitmap sh -c "qemu-img convert -O qcow2 '$src' '$tmp/img' &&
  qemu-img bitmap --add '$tmp/img' b0"
seed open_qcow2 backing sh -c "qemu-img create -q -f qcow2 -b '$src' -F raw '$tmp/img' &&
  qemu-io -f qcow2 -c 'write -P 0x22 8k 4k' '$tmp/img'"
seed open_qcow2 zero-clusters sh -c "qemu-img convert -O qcow2 '$src' '$tmp/img' &&
  qemu-io -f qcow2 -c 'write -z 0 64k' '$tmp/img'"
# (Tiny-petabyte and 2040 GiB images are slow units under ASan: vdisk/tests/robustness.rs
# covers them.)
seed open_qcow2 tiny-64g qi create -q -f qcow2 -o cluster_size=64k "$tmp/img" 64G
# ---- qcow2 (vdconv) ----
seed open_qcow2 vdconv-v3 "$VDCONV" convert -f raw -O qcow2 "$src" "$tmp/img"
seed open_qcow2 vdconv-v2-512 "$VDCONV" convert -f raw -O qcow2 -o compat=0.10,cluster_size=512 "$src" "$tmp/img"
seed open_qcow2 vdconv-compressed "$VDCONV" convert -c -f raw -O qcow2 "$src" "$tmp/img"
seed open_qcow2 vdconv-zstd "$VDCONV" convert -c -f raw -O qcow2 -o compression_type=zstd "$src" "$tmp/img"
seed open_qcow2 vdconv-empty "$VDCONV" create -f qcow2 "$tmp/img" 8M

# ---- VHD (qemu-img) ----
seed open_vhd dynamic-empty qi create -q -f vpc "$tmp/img" 4M
seed open_vhd dynamic-data sh -c "qemu-img convert -O vpc '$src' '$tmp/img'"
seed open_vhd fixed-data sh -c "qemu-img convert -O vpc -o subformat=fixed '$src' '$tmp/img'"
seed open_vhd force-size sh -c "qemu-img convert -O vpc -o force_size=on '$src' '$tmp/img'"
seed open_vhd fixed-force-size sh -c "qemu-img convert -O vpc -o subformat=fixed,force_size=on '$src' '$tmp/img'"
# Sizes just under and over the CHS limits (65535*16*255 sectors), dynamic: small files.
seed open_vhd chs-under qi create -q -f vpc "$tmp/img" $((65535 * 16 * 255 * 512 - 512))
seed open_vhd chs-over qi create -q -f vpc -o force_size=on "$tmp/img" $((65535 * 16 * 255 * 512 + 1048576))
seed open_vhd big-16g qi create -q -f vpc -o force_size=on "$tmp/img" 16G
# ---- VHD (vdconv) ----
seed open_vhd vdconv-dynamic "$VDCONV" convert -f raw -O vhd "$src" "$tmp/img"
seed open_vhd vdconv-fixed "$VDCONV" convert -f raw -O vhd -o subformat=fixed "$src" "$tmp/img"
seed open_vhd vdconv-512k "$VDCONV" convert -f raw -O vhd -o block_size=512K "$src" "$tmp/img"
seed open_vhd vdconv-xen "$VDCONV" convert -f raw -O vhd -o dialect=xen "$src" "$tmp/img"
seed open_vhd vdconv-empty "$VDCONV" create -f vhd "$tmp/img" 8M

# ---- VHDX (qemu-img) ----
seed open_vhdx dynamic-empty qi create -q -f vhdx -o block_size=1M "$tmp/img" 4M
seed open_vhdx dynamic-data sh -c "qemu-img convert -O vhdx -o block_size=1M '$src' '$tmp/img'"
seed open_vhdx fixed sh -c "qemu-img convert -O vhdx -o subformat=fixed,block_size=1M '$src' '$tmp/img'"
seed open_vhdx block32m qi create -q -f vhdx -o block_size=32M "$tmp/img" 8M
seed open_vhdx block256m qi create -q -f vhdx -o block_size=256M "$tmp/img" 8M
seed open_vhdx log1m sh -c "qemu-img convert -O vhdx -o log_size=1M,block_size=1M '$src' '$tmp/img'"
seed open_vhdx block-state-zero-off sh -c "qemu-img convert -O vhdx -o block_size=1M,block_state_zero=off '$src' '$tmp/img'"
seed open_vhdx written-by-qemu sh -c "qemu-img create -q -f vhdx -o block_size=1M '$tmp/img' 4M &&
  qemu-io -f vhdx -c 'write -P 0x55 0 64k' -c 'write -P 0xaa 1M 4k' '$tmp/img'"
# ---- VHDX (vdconv) ----
seed open_vhdx vdconv-dynamic "$VDCONV" convert -f raw -O vhdx -o block_size=1 "$src" "$tmp/img"
seed open_vhdx vdconv-fixed "$VDCONV" convert -f raw -O vhdx -o subformat=fixed,block_size=1 "$src" "$tmp/img"
seed open_vhdx vdconv-4k "$VDCONV" convert -f raw -O vhdx -o block_size=1,logical_sector_size=4096 "$src" "$tmp/img"
seed open_vhdx vdconv-empty "$VDCONV" create -f vhdx -o block_size=1 "$tmp/img" 8M

# ---- probe: polyglots and odd sizes ----
printf 'QFI\xfb' > "$out/probe/qcow2-magic-only"
head -c 511 /dev/zero > "$out/probe/zeros-511"
{ printf 'QFI\xfb'; head -c 1020 /dev/zero; printf 'conectix'; head -c 504 /dev/zero; } > "$out/probe/polyglot-qcow2-vhd"
{ printf 'vhdxfile'; head -c 1016 /dev/zero; printf 'conectix'; head -c 504 /dev/zero; } > "$out/probe/polyglot-vhdx-vhd"

# Encode every seed as a sparse image (fuzz/src/lib.rs `SparseImage`): u64 LE file length, then
# records (u32 LE offset, u16 LE length, bytes) of the non-zero 4 KiB pages, runs of up to 60 KiB.
python3 - "$out" <<'PY'
import os, struct, sys
root = sys.argv[1]
for d in os.listdir(root):
    for f in os.listdir(os.path.join(root, d)):
        p = os.path.join(root, d, f)
        data = open(p, 'rb').read()
        out = bytearray(struct.pack('<Q', len(data)))
        run_start, run = None, bytearray()
        for off in range(0, min(len(data), 1 << 32), 4096):
            page = data[off:off + 4096]
            if not any(page):
                continue
            if run_start is not None and run_start + len(run) == off and len(run) < 61440:
                run += page
            else:
                if run_start is not None:
                    out += struct.pack('<IH', run_start, len(run)) + run
                run_start, run = off, bytearray(page)
        if run_start is not None:
            out += struct.pack('<IH', run_start, len(run)) + run
        open(p, 'wb').write(out)
PY

echo "wrote $n image seeds under $out (sparse encoding)"
