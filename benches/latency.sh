#!/usr/bin/env bash
# Transfers against a distant object store: the test S3 server (SeaweedFS on 127.0.0.1)
# behind the latency-proxy bench binary (benches/src/bin/latency-proxy.rs) adding DELAY ms
# each way (no netem on this kernel), for Mover and restic on the same volume
# (benches/run.sh's ext4 image), page cache dropped before each step. Both restores are
# timed until the data is on disk: Mover's fsyncs the target, restic's is followed by an
# fsync of the restored file.
#   benches/latency.sh [--delays "0 10 50"] [--size-gib N] [--runs N] [--no-peers]
# MOVER_BIN=path runs that binary instead of building this tree's.
# Prints seconds per tool, operation and delay (median of --runs), and Mover's ratio to its
# 0 ms time and to restic.
set -euo pipefail
cd "$(dirname "$0")/.."
DELAYS="0 10 50"; SIZE_GIB=4; RUNS=1; PEERS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --delays) DELAYS=$2; shift 2 ;;
    --size-gib) SIZE_GIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --no-peers) PEERS=0; shift ;;
    *) echo "usage: $0 [--delays \"0 10 50\"] [--size-gib N] [--runs N] [--no-peers]" >&2; exit 2 ;;
  esac
done
scripts/deps.sh bench
. benches/lib.sh
M=$(mover_bin)
cargo build --release -p mover-benches --bin latency-proxy >&2
PROXY=$CARGO_TARGET_DIR/release/latency-proxy
W=${MOVER_BENCH_DIR:-/var/tmp/mover-latency}
rm -rf "$W"; mkdir -p "$W"
eval "$(scripts/s3-server.sh start | tail -n 1)"
export MOVER_PASSWORD=bench RESTIC_PASSWORD=bench MOVER_CACHE_DIR="$W/cache" RESTIC_CACHE_DIR="$W/restic-cache"
proxy_pid=
trap '[ -n "$proxy_pid" ] && kill $proxy_pid 2>/dev/null; true' EXIT
RESULTS="$W/results.tsv"; : > "$RESULTS"
run() {   # run TOOL OP DELAY CMD...
  local tool=$1 op=$2 d=$3; shift 3
  drop
  /usr/bin/time -f "%e %M" -o "$W/time.out" "$@" > "$W/last.out" 2> "$W/last.err" || { echo "$tool $op at $d ms failed:" >&2; tail -5 "$W/last.err" >&2; return 1; }
  read -r secs rss < <(tail -n 1 "$W/time.out")
  printf '%s\t%s\t%s\t%s\t%s\n' "$tool" "$op" "$d" "$secs" "$rss" >> "$RESULTS"
  printf '  %-7s %-8s %3s ms  %8.2f s  %5d MiB RSS\n' "$tool" "$op" "$d" "$secs" $((rss / 1024)) >&2
}

echo "== volume: the benchmark's ext4 image (benches/make-volume.sh), ${SIZE_GIB} GiB" >&2
benches/make-volume.sh "$W/vol.img" "$SIZE_GIB"
want=$(b3sum --no-names "$W/vol.img")

port=18390
for d in $DELAYS; do
  port=$((port + 1))
  "$PROXY" "$port" "127.0.0.1:18333" "$d" > "$W/proxy.log" 2>&1 &
  proxy_pid=$!
  sleep 0.5
  ep="http://127.0.0.1:$port"
  echo "== +$d ms each way ($((2 * d)) ms RTT)" >&2
  for i in $(seq 1 "$RUNS"); do
    repo="s3://$MOVER_TEST_S3_BUCKET/latency-$$-$d-$i"
    "$M" --repo "$repo" --s3-endpoint "$ep" init > /dev/null
    rm -rf "$MOVER_CACHE_DIR"
    run mover backup "$d" "$M" --repo "$repo" --s3-endpoint "$ep" backup --volume "disk=$W/vol.img"
    rm -rf "$MOVER_CACHE_DIR"; rm -f "$W/out.img"
    run mover restore "$d" "$M" --repo "$repo" --s3-endpoint "$ep" restore latest "$W/out.img"
    [ "$(b3sum --no-names "$W/out.img")" = "$want" ] || { echo "mover restore at $d ms differs" >&2; exit 1; }
    if [ "$PEERS" = 1 ] && command -v restic >/dev/null; then
      r="s3:$ep/$MOVER_TEST_S3_BUCKET/restic-$$-$d-$i"
      restic -r "$r" init -q > /dev/null
      rm -rf "$RESTIC_CACHE_DIR"
      run restic backup "$d" restic -r "$r" backup -q "$W/vol.img"
      rm -rf "$RESTIC_CACHE_DIR" "$W/restic-out"
      run restic restore "$d" sh -c 'restic -r "$1" restore latest --target "$2" && find "$2" -type f -exec sync {} +' - "$r" "$W/restic-out"
      [ "$(b3sum --no-names "$W/restic-out$W/vol.img")" = "$want" ] || { echo "restic restore at $d ms differs" >&2; exit 1; }
    fi
  done
  kill $proxy_pid; wait $proxy_pid 2>/dev/null || true; proxy_pid=
done

python3 - "$RESULTS" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for l in open(sys.argv[1]):
    tool, op, d, secs, rss = l.split("\t")
    rows[(tool, op, int(d))].append((float(secs), int(rss)))
med = {k: statistics.median(s for s, _ in v) for k, v in rows.items()}
rss = {k: max(r for _, r in v) // 1024 for k, v in rows.items()}
delays = sorted({k[2] for k in rows})
print("| tool | operation | " + " | ".join(f"+{d} ms ({2*d} ms RTT)" for d in delays) + " | peak RSS |")
print("|---|---|" + "---:|" * (len(delays) + 1))
for tool in ("mover", "restic"):
    for op in ("backup", "restore"):
        if (tool, op, delays[0]) not in med:
            continue
        cells = []
        for d in delays:
            s = med.get((tool, op, d))
            base = med.get((tool, op, delays[0]))
            extra = f" ({(s / base - 1) * 100:+.0f} %)" if s and base and d != delays[0] else ""
            cells.append(f"{s:.2f} s{extra}" if s else "")
        print(f"| {tool} | {op} | " + " | ".join(cells) + f" | {max(rss[(tool, op, d)] for d in delays if (tool, op, d) in rss)} MiB |")
for op in ("backup", "restore"):
    r = [f"+{d} ms: {med[('restic', op, d)] / med[('mover', op, d)]:.1f}x" for d in delays if ("restic", op, d) in med and ("mover", op, d) in med]
    if r:
        print(f"restic / mover, {op}: " + ", ".join(r))
PY
