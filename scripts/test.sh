#!/usr/bin/env bash
# The whole test suite: unit, property, interop (qemu-img, libvhdi) and CLI tests.
# Tests that need the third-party images of ../shared/fixtures skip when the folder is absent,
# unless VDCONV_REQUIRE_SHARED_FIXTURES=1.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
# The fuzz harness's own unit tests (its workspace is separate; stable Rust builds its library).
(cd fuzz && cargo test --lib --locked)
