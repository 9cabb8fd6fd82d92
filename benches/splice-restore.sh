#!/usr/bin/env bash
# Restore time before and after scattered incrementals that spliced their changes in
# (0.5 % of a 2 GiB volume as 4 KiB pages, then as 64 KiB blocks), for each binary given;
# three runs each, page cache dropped. The splices are made by the first binary.
#   benches/splice-restore.sh MOVER_BIN [MOVER_BIN...]   (RESTORE_ARGS="..." adds restore options)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
[ $# -ge 1 ] || { echo "usage: $0 MOVER_BIN [MOVER_BIN...]" >&2; exit 2; }
W=/var/tmp/mover-splice; rm -rf $W; mkdir -p $W; cd $W
export MOVER_PASSWORD=bench MOVER_CACHE_DIR=$W/cache
"$HERE/make-volume.sh" vm.img 2 >/dev/null
M=$1
$M --repo repo init >/dev/null
$M --repo repo backup $W/vm.img --json >/dev/null
python3 - $W/vm.img <<'PY'
import os, random, sys
img = sys.argv[1]; size = os.path.getsize(img)
for grain, name in ((4096, "s4"), (65536, "s64")):
    rnd = random.Random(grain)
    offs = sorted({rnd.randrange(size // grain) * grain for _ in range(int(size * 0.005) // grain)})
    open(f"{img}.{name}", "w").write("".join(f"{o} {grain}\n" for o in offs))
PY
t() { drop; rm -f out.img; /usr/bin/time -f "%e" $M --repo repo restore latest out.img ${RESTORE_ARGS:-} 2>&1 >/dev/null | tail -1; }
for b in "$@"; do M=$b; echo "$b restore full: $(t) $(t) $(t)"; done
for f in s4 s64; do
  python3 - $W/vm.img $W/vm.img.$f <<'PY'
import os, sys
img, ext = sys.argv[1:3]
with open(img, "r+b") as fh:
    for l in open(ext):
        o, n = map(int, l.split()); fh.seek(o); fh.write(os.urandom(n))
PY
  $1 --repo repo backup $W/vm.img --parent latest --changed-extents $W/vm.img.$f --json > /dev/null
done
for b in "$@"; do M=$b; echo "$b restore after splices: $(t) $(t) $(t)"; done
rm -f out.img; M=$1; $M --repo repo restore latest out.img >/dev/null; cmp out.img vm.img && echo byte-exact
rm -rf $W
