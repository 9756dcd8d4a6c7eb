#!/usr/bin/env bash
# Runs every check and test of the crate: formatting, lints, unit/integration/property tests
# (Postgres, NATS and Redis tests start throwaway servers themselves unless DATABASE_URL,
# NATS_URL or REDIS_URL is set), the loom
# model checks, the demo, a quick run of the benchmark harness, and short fuzz runs. This is the
# command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { printf '\n==> %s (%ss)\n' "$*" "$((SECONDS - started))"; }

# The NATS, Redis and PgBouncer tests start throwaway servers from the system binaries (unless
# NATS_URL / REDIS_URL / PGBOUNCER_URL point at servers): install the binaries when missing.
missing=()
if [ -z "${NATS_URL:-}" ] && ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  missing+=(nats-server)
fi
if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
  missing+=(redis-server)
fi
if [ -z "${PGBOUNCER_URL:-}" ] && ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
  missing+=(pgbouncer)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]} for the transport tests"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" \
    || echo "could not install ${missing[*]}: their tests skip (or fail under CI=true)"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

# The layers import downwards only: stores and transports share Postgres glue through
# `src/pg/`, never each other; the pure core imports no layer above it.
step "layering (no store <-> transport imports; fsm imports nothing above it)"
layering_ok=true
check_no_import() { # <dir> <forbidden path>
  if grep -rnE "^[^/]*\b(use )?$2\b" "$1" --include=*.rs | grep -v '^\S*:\s*//' ; then
    echo "layering: $1 must not use $2"; layering_ok=false
  fi
}
check_no_import src/transport 'crate::store'
check_no_import src/store 'crate::transport'
check_no_import src/fsm 'crate::(store|transport|hub)'
$layering_ok

step "rust-version (every dependency built declares it or older)"
scripts/msrv.sh

step "cargo clippy (all targets, all features)"
cargo clippy --all-targets --all-features -- -D warnings

# The tests build the crate with its dev-dependency's features (Postgres, conformance,
# store-impl); these check the library as a user with the default features, or none, builds it.
step "cargo clippy (library, default features and none)"
cargo clippy --lib -- -D warnings
cargo clippy --no-default-features --lib -- -D warnings

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --all-features --no-deps --quiet

step "cargo test (all features)"
cargo test --all-features

if [ -x scripts/loom.sh ]; then
  step "loom model checks"
  scripts/loom.sh
fi

step "demo (release)"
cargo run --release --example cluster -- --commands 10000 | tail -n 1

step "metrics exported to Prometheus (example self-test)"
cargo run --release --example prometheus -- --self-test | tail -n 1

step "deterministic cluster simulation (2,000 seeds)"
cargo run --release --example simulate -- --seeds "${SIM_SEEDS:-2000}" | tail -n 1

step "benchmark harness, quick (checks that it runs; asserts nothing about speed)"
cargo run --release --example bench -- --quick | tail -n 40

if [ -x scripts/fuzz.sh ]; then
  step "fuzz targets (short runs)"
  scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
fi

step "all checks passed in $((SECONDS - started))s"
