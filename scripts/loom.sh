#!/usr/bin/env bash
# Model-checks the memory store and transport with loom. A crate-specific cfg keeps tokio out of
# its own loom mode; the separate target dir keeps the RUSTFLAGS change from rebuilding target/.
set -euo pipefail
cd "$(dirname "$0")/.."
# Under the caller's CARGO_TARGET_DIR when set, so a developer's shared target dir is honoured.
RUSTFLAGS="--cfg broker_dispatch_loom" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom" \
  cargo test --release --test loom "$@"
