# Sourced by the bench scripts (from the repository root).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/mover-target}

# Prints the binary under test: $MOVER_BIN when set (a before/after pair), else this tree's
# release build, built now.
mover_bin() {
  if [ -n "${MOVER_BIN:-}" ]; then echo "$MOVER_BIN"; return; fi
  cargo build --release -p mover >&2
  echo "$CARGO_TARGET_DIR/release/mover"
}

# Drops the page cache, so every timed step reads from the disk.
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
