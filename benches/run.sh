#!/usr/bin/env bash
# The bench command: Mover against this machine's limits and against restic, borg and
# rustic (where installed) on the same volume, in the same run.
#   benches/run.sh [--size-gib N] [--no-peers] [--recompress-level N] [--os-volume]
# --os-volume: the volume's binaries are real files from /usr (benches/make-volume.sh --os).
# --recompress-level 0 skips `gc --recompress` (the slowest step at high levels).
# MOVER_BIN=path runs that binary instead of building this tree's (a before/after pair).
# Prints a table (seconds, MiB/s of the volume, repository size, peak RSS) and ratios.
# Figures go to docs/benchmarks.md by hand, with the command line.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=4; PEERS=1; RECOMPRESS=19; OSVOL=
while [ $# -gt 0 ]; do
  case "$1" in
    --size-gib) SIZE_GIB=$2; shift 2 ;;
    --no-peers) PEERS=0; shift ;;
    --recompress-level) RECOMPRESS=$2; shift 2 ;;
    --os-volume) OSVOL=--os; shift ;;
    *) echo "usage: $0 [--size-gib N] [--no-peers] [--recompress-level N] [--os-volume]" >&2; exit 2 ;;
  esac
done
scripts/deps.sh bench
. benches/lib.sh
M=$(mover_bin)
W=${MOVER_BENCH_DIR:-/var/tmp/mover-bench}
rm -rf "$W"; mkdir -p "$W"
export MOVER_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench RUSTIC_PASSWORD=bench
export MOVER_CACHE_DIR="$W/cache" BORG_BASE_DIR="$W/borgbase" RESTIC_CACHE_DIR="$W/restic-cache" XDG_CACHE_HOME="$W/xdg-cache"
RESULTS="$W/results.tsv"; : > "$RESULTS"
# run TOOL OP CMD...: times CMD, records seconds and peak RSS (KiB).
run() {
  local tool=$1 op=$2; shift 2
  drop
  /usr/bin/time -f "%e %M" -o "$W/time.out" "$@" > "$W/last.out" 2> "$W/last.err" || { echo "$tool $op failed:" >&2; tail -5 "$W/last.err" >&2; return 1; }
  read -r secs rss < <(tail -n 1 "$W/time.out")
  printf '%s\t%s\t%s\t%s\n' "$tool" "$op" "$secs" "$rss" >> "$RESULTS"
  printf '  %-7s %-18s %8.2f s  %7d MiB RSS\n' "$tool" "$op" "$secs" $((rss / 1024)) >&2
}

echo "== building the volume: ext4, ${SIZE_GIB} GiB, about half allocated" >&2
img="$W/vm.img"
benches/make-volume.sh "$img" "$SIZE_GIB" $OSVOL
alloc=$(du -B1 "$img" | cut -f1)
vol=$(stat -c %s "$img")
echo "volume $vol bytes, $alloc allocated" >&2

echo "== machine limits" >&2
drop
raw=$( { /usr/bin/time -f "%e" dd if="$img" of=/dev/null bs=4M iflag=direct status=none; } 2>&1 | tail -1)
head -c 1G "$img" > "$W/sample" 2>/dev/null || true
b3=$( { /usr/bin/time -f "%e" b3sum --num-threads 1 "$W/sample" >/dev/null; } 2>&1 | tail -1)
zs=$( { /usr/bin/time -f "%e" zstd -1 -T1 -q -c "$W/sample" >/dev/null; } 2>&1 | tail -1)
samp=$(stat -c %s "$W/sample"); rm -f "$W/sample"
printf 'limits\tread_direct\t%s\t%s\nlimits\tb3sum_1t\t%s\t%s\nlimits\tzstd1_1t\t%s\t%s\n' "$raw" "$vol" "$b3" "$samp" "$zs" "$samp" >> "$W/limits.tsv"

snap_img() { cp --sparse=always "$img" "$W/base.img"; }
change() {
  # ~1 % of the volume, like a running VM: new files, appended logs, a rewritten db region.
  mkdir -p "$W/mnt"; mount -o loop "$img" "$W/mnt"
  local mib=$(( SIZE_GIB * 1024 / 100 ))
  head -c $(( mib * 6 / 10 ))M /dev/urandom > "$W/mnt/home/new-download.bin"
  for f in $(ls "$W/mnt/log" | head -5); do head -c 1M /dev/urandom | base64 >> "$W/mnt/log/$f"; done
  dd if=/dev/urandom of="$W/mnt/db/data.db" bs=64K count=$(( mib * 16 / 100 + 1 )) seek=37 conv=notrunc status=none
  sync; umount "$W/mnt"
  # Changed extents (as a CBT source would report them): 64 KiB blocks that differ.
  python3 - "$W/base.img" "$img" > "$W/changed.txt" <<'PY'
import sys
a, b = open(sys.argv[1], "rb"), open(sys.argv[2], "rb")
B = 64 << 10; off = 0; start = None
while True:
    x, y = a.read(B), b.read(B)
    if not y: break
    if x != y:
        if start is None: start = off
    elif start is not None:
        print(start, off - start); start = None
    off += len(y)
if start is not None: print(start, off - start)
PY
}

echo "== mover" >&2
"$M" --repo "$W/mover-repo" init >/dev/null
snap_img
run mover full "$M" --repo "$W/mover-repo" backup "$img" --checkpoint cbt --json
cp "$W/last.out" "$W/mover-full.json"
# The same first state as a qcow2 image with a QEMU dirty bitmap, as KubeVirt exports it.
qemu-img convert -f raw -O qcow2 "$W/base.img" "$W/cbt.qcow2"
qemu-img bitmap --add "$W/cbt.qcow2" cbt
change
[ "$PEERS" = 1 ] && cp --sparse=always "$img" "$W/state2.img"   # the peers' second state
changed=$(awk '{s+=$2} END {print s+0}' "$W/changed.txt")
echo "changed: $changed bytes in $(wc -l < "$W/changed.txt") extents" >&2
mover_size_full=$(du -sb "$W/mover-repo" | cut -f1)
cp -r "$W/mover-repo" "$W/mover-repo2"; cp -r "$W/cache" "$W/cache2"
cp -r "$W/mover-repo" "$W/mover-repo3"; cp -r "$W/cache" "$W/cache3"
[ "$RECOMPRESS" != 0 ] && { cp -r "$W/mover-repo" "$W/mover-repo4"; cp -r "$W/cache" "$W/cache4"; }
# incr_row OP CHANGED REPO_BEFORE: bytes read (from the last --json) and stored per changed byte.
incr_row() {
  local read; read=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes_read"])' "$W/last.out")
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$read" $(( $(du -sb "$W/mover-repo" | cut -f1) - $3 )) >> "$W/incr.tsv"
}
run mover incr_extents "$M" --repo "$W/mover-repo" backup "$img" --parent latest --changed-extents "$W/changed.txt" --json
cp "$W/last.out" "$W/mover-incr.json"
incr_row incr_extents "$changed" "$mover_size_full"
mover_size_incr=$(du -sb "$W/mover-repo" | cut -f1)
run mover incr_no_extents env MOVER_CACHE_DIR="$W/cache2" "$M" --repo "$W/mover-repo2" backup "$img" --parent latest --json
# NBD with the dirty bitmap: the guest's writes go through QEMU (here qemu-io replays the
# changed 64 KiB blocks), the bitmap records them, Mover reads only those over NBD.
python3 - "$img" "$W/changed.txt" "$W/cbt.qcow2" "$W/ext" <<'PY'
import os, subprocess, sys
img, ext, qcow, d = sys.argv[1:5]
os.makedirs(d, exist_ok=True)
cmds = []
with open(img, "rb") as f:
    for i, l in enumerate(open(ext)):
        o, n = map(int, l.split())
        f.seek(o); p = f"{d}/{i}.bin"; open(p, "wb").write(f.read(n))
        cmds += ["-c", f"write -q -s {p} {o} {n}"]
for k in range(0, len(cmds), 400):
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds[k:k + 400], qcow], check=True)
PY
rm -rf "$W/ext"
full_id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot_id"])' "$W/mover-full.json")
qemu-nbd -r -t -f qcow2 -B cbt -k "$W/nbd.sock" "$W/cbt.qcow2" & nbd_pid=$!
for _ in $(seq 100); do [ -S "$W/nbd.sock" ] && break; sleep 0.05; done
run mover incr_nbd_bitmap env MOVER_CACHE_DIR="$W/cache3" "$M" --repo "$W/mover-repo3" backup --nbd "nbd+unix:///?socket=$W/nbd.sock" --nbd-bitmap cbt --parent "$full_id" --json
cp "$W/last.out" "$W/mover-nbd.json"
kill $nbd_pid; wait $nbd_pid 2>/dev/null || true
rm -f "$W/cbt.qcow2"
[ "$PEERS" = 1 ] || rm -f "$W/base.img"   # only the peers need the first state again (peer() copies it)
rm -f "$W/restored.img"
run mover restore "$M" --repo "$W/mover-repo" restore latest "$W/restored.img"
if [ "$(b3sum --no-names "$img")" != "$(b3sum --no-names "$W/restored.img")" ]; then echo "mover restore MISMATCH" >&2; exit 1; fi
rm -f "$W/restored.img"
# Scattered writes with their exact extents: 0.5 % of the volume as 4 KiB database page
# rewrites, then as 64 KiB blocks (KubeVirt's dirty-bitmap granularity). Then a restore of
# the newest, checked byte-exact.
for grain in 4096 65536; do
  python3 benches/scatter-write.py "$img" "$grain" "$W/scatter.txt" "$grain"
  ch=$(awk '{s+=$2} END {print s+0}' "$W/scatter.txt")
  before=$(du -sb "$W/mover-repo" | cut -f1)
  run mover "incr_scatter_$((grain >> 10))k" "$M" --repo "$W/mover-repo" backup "$img" --parent latest --changed-extents "$W/scatter.txt" --json
  incr_row "incr_scatter_$((grain >> 10))k" "$ch" "$before"
done
run mover restore_scattered "$M" --repo "$W/mover-repo" restore latest "$W/restored.img"
if [ "$(b3sum --no-names "$img")" != "$(b3sum --no-names "$W/restored.img")" ]; then echo "mover restore after scattered incrementals MISMATCH" >&2; exit 1; fi
rm -f "$W/restored.img"
# Storage after maintenance: the full backup's repository compressed again at a high level.
if [ "$RECOMPRESS" != 0 ]; then
  run mover "gc_recompress_$RECOMPRESS" env MOVER_CACHE_DIR="$W/cache4" "$M" --repo "$W/mover-repo4" gc --recompress "$RECOMPRESS" --json
  printf 'mover\trepo_full_recompressed\t%s\n' "$(du -sb "$W/mover-repo4" | cut -f1)" >> "$W/sizes.tsv"
fi
rm -rf "$W/mover-repo4" "$W/cache4" "$W/mover-repo2" "$W/mover-repo3"
# The restore's I/O floor on this disk: the same reads (the packs) and writes (the
# allocated bytes, 4 MiB O_DIRECT) at once under fio, with no CPU work.
if command -v fio >/dev/null; then
  cat "$W"/mover-repo/packs/*/* > "$W/packs.bin"; drop
  io=$( { /usr/bin/time -f "%e" fio --name=w --filename="$W/fio-w.img" --size="$alloc" --bs=4M --rw=write --direct=1 --ioengine=io_uring --iodepth=8 \
      --name=r --filename="$W/packs.bin" --bs=2M --rw=read --direct=1 --ioengine=io_uring --iodepth=4 >/dev/null; } 2>&1 | tail -1)
  printf 'limits\trestore_io_fio\t%s\t%s\n' "$io" "$alloc" >> "$W/limits.tsv"
  rm -f "$W/packs.bin" "$W/fio-w.img"
fi
printf 'mover\trepo_full\t%s\nmover\trepo_incr_added\t%s\n' "$mover_size_full" $((mover_size_incr - mover_size_full)) >> "$W/sizes.tsv"

peer() { # name init full incr restore (name: tool or tool-setting; its repository is $W/<name>-repo)
  local name=$1
  echo "== $name" >&2
  cp --sparse=always "$W/base.img" "$W/peer.img"
  eval "$2" >/dev/null 2>&1
  run "$name" full bash -c "$3"
  local s1; s1=$(du -sb "$W/$name-repo" | cut -f1)
  cp --sparse=always "$W/state2.img" "$W/peer.img"
  run "$name" incr bash -c "$4"
  local s2; s2=$(du -sb "$W/$name-repo" | cut -f1)
  rm -rf "$W/$name-restore"; mkdir -p "$W/$name-restore"
  # Peers exit with the restored data still in the page cache; Mover fsyncs before it
  # exits. "restore" times both to the same end, the data on disk (the peer's command,
  # then sync); "restore_exit" is the peer's command alone.
  run "$name" restore bash -c "s=\$(date +%s.%N); $5; r=\$?; e=\$(date +%s.%N); sync; echo \"\$s \$e\" > $W/exit.times; exit \$r"
  read -r t0 t1 < "$W/exit.times"
  printf '%s\trestore_exit\t%s\t0\n' "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" >> "$RESULTS"
  rm -rf "$W/$name-restore"
  printf '%s\trepo_full\t%s\n%s\trepo_incr_added\t%s\n' "$name" "$s1" "$name" $((s2 - s1)) >> "$W/sizes.tsv"
  rm -rf "$W/$name-repo"
}
if [ "$PEERS" = 1 ]; then
  cd "$W"
  # Each peer at its default and at its best compression (restic/rustic `max`, borg
  # `zstd,3` against its default lz4).
  for c in auto max; do
    n=restic; [ $c = max ] && n=restic-max
    command -v restic >/dev/null && peer $n "restic -r $W/$n-repo init" \
      "restic -r $W/$n-repo backup --compression $c peer.img" "restic -r $W/$n-repo backup --compression $c peer.img" \
      "restic -r $W/$n-repo restore latest --target $W/$n-restore"
  done
  for c in lz4 zstd,3; do
    n=borg; [ $c = zstd,3 ] && n=borg-zstd3
    command -v borg >/dev/null && peer $n "borg init -e repokey $W/$n-repo" \
      "borg create -C $c $W/$n-repo::a peer.img" "borg create -C $c $W/$n-repo::b peer.img" \
      "cd $W/$n-restore && borg extract $W/$n-repo::b"
  done
  for c in auto max; do
    n=rustic; [ $c = max ] && n=rustic-max
    command -v rustic >/dev/null && peer $n "rustic -r $W/$n-repo init --set-compression $( [ $c = max ] && echo 19 || echo 3 )" \
      "rustic -r $W/$n-repo backup peer.img" "rustic -r $W/$n-repo backup peer.img" \
      "rustic -r $W/$n-repo restore latest $W/$n-restore"
  done
  cd - >/dev/null
fi

python3 - "$W" "$vol" "$alloc" "$changed" <<'PY'
import sys, json, collections
W, vol, alloc, changed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
res = collections.defaultdict(dict)
for l in open(f"{W}/results.tsv"):
    t, op, s, rss = l.split("\t"); res[t][op] = (float(s), int(rss))
sizes = collections.defaultdict(dict)
for l in open(f"{W}/sizes.tsv"):
    t, k, v = l.split("\t"); sizes[t][k] = int(v)
lim = {l.split("\t")[1]: (float(l.split("\t")[2]), int(l.split("\t")[3])) for l in open(f"{W}/limits.tsv")}
mib = 1 << 20
print(f"volume: {vol/mib:.0f} MiB ext4 image, {alloc/mib:.0f} MiB allocated; change: {changed/mib:.1f} MiB")
print("machine limits: " + ", ".join(f"{k} {v[1]/mib/v[0]:.0f} MiB/s" for k, v in lim.items()))
print(f"{'tool':8} {'operation':18} {'seconds':>8} {'MiB/s':>8} {'peak RSS':>9}")
for t, ops in res.items():
    for op, (s, rss) in ops.items():
        print(f"{t:8} {op:18} {s:8.2f} {vol/mib/max(s,1e-9):8.0f} {rss//1024:8d}M")
print(f"{'tool':11} {'repo after full':>16} {'added by incr':>14} {'incr / changed':>15}")
for t, z in sizes.items():
    print(f"{t:11} {z['repo_full']/mib:15.1f}M {z['repo_incr_added']/mib:13.1f}M {z['repo_incr_added']/max(changed,1):15.2f}")
peers_full = {t: z["repo_full"] for t, z in sizes.items() if t != "mover"}
if peers_full and "mover" in sizes:
    best = min(peers_full, key=peers_full.get)
    mz = sizes["mover"]
    line = f"mover repository after full / smallest peer ({best}): {mz['repo_full']/peers_full[best]:.3f}"
    if "repo_full_recompressed" in mz:
        line += f"; after gc --recompress: {mz['repo_full_recompressed']/peers_full[best]:.3f}"
    print(line)
try:
    print(f"{'incremental':18} {'changed':>9} {'read':>9} {'stored':>9} {'read/chg':>9} {'stored/chg':>10} {'time/full':>9}")
    for l in open(f"{W}/incr.tsv"):
        op, ch, rd, st = l.split("\t"); ch, rd, st = int(ch), int(rd), int(st)
        tf = res["mover"][op][0] / res["mover"]["full"][0]
        print(f"{op:18} {ch/mib:8.1f}M {rd/mib:8.1f}M {st/mib:8.1f}M {rd/max(ch,1):9.2f} {st/max(ch,1):10.2f} {tf:9.3f}")
except OSError:
    pass
m = res.get("mover", {})
pairs = [("full", "full", "full"), ("incr_extents", "incr", "incr_extents"), ("incr_nbd_bitmap", "incr", "incr_nbd_bitmap"),
         ("incr_no_extents", "incr", "incr_no_extents"), ("restore", "restore", "restore (both on disk)"),
         ("restore", "restore_exit", "restore (peer not synced)")]
for peer in [p for p in res if p != "mover"]:
    r = ", ".join(f"{label}: {res[peer][po][0]/m[mo][0]:.1f}x" for mo, po, label in pairs if mo in m and po in res[peer])
    print(f"mover vs {peer} (peer seconds / mover seconds): {r}")
try:
    nb = json.load(open(f"{W}/mover-nbd.json"))
    ex = json.load(open(f"{W}/mover-incr.json"))
    print(f"mover incremental over NBD with a dirty bitmap: read {nb['bytes_read']/mib:.1f} MiB (changed {changed/mib:.1f} MiB; extents run read {ex['bytes_read']/mib:.1f} MiB); "
          f"{m['incr_no_extents'][0]/m['incr_nbd_bitmap'][0]:.1f}x faster than the no-extents incremental")
except (OSError, KeyError):
    pass
if "full" in m and "read_direct" in lim:
    print(f"mover full backup runs at {lim['read_direct'][0]/m['full'][0]:.2f}x the speed of a raw direct read of the volume (dd)")
if "restore" in m and "restore_io_fio" in lim:
    print(f"mover restore takes {m['restore'][0]/lim['restore_io_fio'][0]:.2f}x the time fio needs for the same reads and writes ({lim['restore_io_fio'][0]:.2f} s)")
PY
