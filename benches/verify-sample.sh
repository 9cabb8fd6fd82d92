#!/usr/bin/env bash
# What the change-source check costs: an incremental of the benchmark volume whose changed
# extents (0.5 % of it, 64 KiB blocks) are given, with the sample off, at the default (64
# segments) and at 256; three runs each, page cache dropped before each. Each run backs up
# the same change onto the same parent, so only the check differs. Prints wall seconds and
# what the check read (change_check.bytes), and that the last snapshot restores byte-exact.
#   benches/verify-sample.sh [SIZE_GIB]   (default 4)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
M=$(mover_bin)
SIZE=${1:-4}
W=/var/tmp/mover-verify; rm -rf $W; mkdir -p $W; cd $W
export MOVER_PASSWORD=bench MOVER_CACHE_DIR=$W/cache
"$HERE/make-volume.sh" vm.img "$SIZE" >/dev/null
$M --repo repo init >/dev/null
full=$($M --repo repo backup vm.img --group bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot_id"])')
python3 - vm.img <<'PY'
import os, random, sys
img = sys.argv[1]; size = os.path.getsize(img); rnd = random.Random(5)
offs = sorted({rnd.randrange(size // 65536) * 65536 for _ in range(int(size * 0.005) // 65536)})
with open(img, "r+b") as fh:
    for o in offs:
        fh.seek(o); fh.write(os.urandom(65536))
open(img + ".ext", "w").write("".join(f"{o} 65536\n" for o in offs))
PY
for n in 0 64 256; do
  line="verify_sample=$n:"
  for _ in 1 2 3; do
    drop
    s=$(date +%s.%N)
    out=$($M --repo repo backup vm.img --group bench --parent "$full" --changed-extents vm.img.ext --verify-sample $n --json)
    e=$(date +%s.%N)
    b=$(echo "$out" | python3 -c '
import json, sys
v = json.load(sys.stdin)["volumes"][0]; c = v.get("change_check") or {}
print("%dMiB/%dseg/%ddiff %s read %dMiB" % (c.get("bytes", 0) >> 20, c.get("compared", 0), c.get("differed", 0), v["change_source"], v["bytes_read"] >> 20))')
    line="$line $(python3 -c "print(f'{$e-$s:.2f}s')") ($b)"
  done
  echo "$line"
done
$M --repo repo restore latest out.img >/dev/null && cmp out.img vm.img && echo "byte-exact"
rm -rf $W
