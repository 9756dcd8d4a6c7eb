#!/usr/bin/env bash
# Checks the declared `rust-version` against what is actually built: every library dependency
# (all features, this platform) must declare a rust-version no newer than ours, or ours is a
# promise the build cannot keep. (Clippy's `incompatible_msrv` lint checks our own use of std
# against it.)
set -euo pipefail
cd "$(dirname "$0")/.."
ours=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml)
deps=$(cargo tree -e normal --all-features --prefix none --format '{p}' | awk '{print $1"@"$2}' | sed 's/@v/@/' | sort -u)
cargo metadata --format-version 1 --all-features | python3 -c '
import json, sys
ours = sys.argv[1]
built = set(sys.argv[2].split())
def key(v):
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))
bad = []
for p in json.load(sys.stdin)["packages"]:
    rv = p.get("rust_version")
    name, version = p["name"], p["version"]
    if name + "@" + version in built and rv and key(rv) > key(ours):
        bad.append(name + " " + version + " needs Rust " + rv)
if bad:
    print(f"rust-version = {ours} in Cargo.toml, but:\n  " + "\n  ".join(sorted(bad)))
    sys.exit(1)
print(f"rust-version {ours}: every dependency built here declares it or older")
' "$ours" "$deps"
