#!/usr/bin/env bash
# One-shot set-up on a fresh Debian machine: installs the test oracles, builds vdconv, and runs
# its main job on a sample image made on the spot, so a newcomer sees a conversion end to end.
#   scripts/setup.sh            install + build + demo
#   scripts/setup.sh --no-demo  install + build only
#   scripts/setup.sh --deps-only install the packages only (CI: the tests build what they need)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v vhdiinfo >/dev/null 2>&1 || need+=(libvhdi-utils)
/usr/bin/python3 -c 'import pyvhdi' >/dev/null 2>&1 || need+=(python3-libvhdi)
for tool in gzip bzip2 xz; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "${1:-}" = "--deps-only" ]; then
    exit 0
fi

echo "setup: building vdconv (release)"
cargo build --release -p vdconv --locked 2>&1 | tail -n 2
VDCONV="$PWD/target/release/vdconv"

if [ "${1:-}" = "--no-demo" ]; then
    exit 0
fi

demo=$(mktemp -d)
trap 'rm -rf "$demo"' EXIT
echo "setup: demo in $demo"
# A 64 MiB raw disk with some data and large holes.
truncate -s 64M "$demo/disk.raw"
head -c 3M /dev/urandom | dd of="$demo/disk.raw" bs=1M seek=1 conv=notrunc status=none
printf 'vdconv demo' | dd of="$demo/disk.raw" bs=1 seek=$((40 << 20)) conv=notrunc status=none
"$VDCONV" convert -f raw -O qcow2 "$demo/disk.raw" "$demo/disk.qcow2"
"$VDCONV" convert -O vhdx "$demo/disk.qcow2" "$demo/disk.vhdx"
"$VDCONV" info "$demo/disk.vhdx"
"$VDCONV" compare "$demo/disk.raw" "$demo/disk.vhdx"
qemu-img compare -f raw -F vhdx "$demo/disk.raw" "$demo/disk.vhdx"
echo "setup: done; the binary is $VDCONV"
