#!/usr/bin/env bash
# The benchmark volume: an ext4 image of SIZE_GIB GiB, about half allocated — incompressible
# binaries, compressible text logs, a database file with a copy (dedup), home directories.
# The same volume for every benchmark that compares with peers.
#   benches/make-volume.sh OUT.img SIZE_GIB [--os]
# --os: the binaries are this machine's real executables and libraries (from /usr, sorted,
# up to the same budget) instead of random bytes — what an OS disk holds, and what
# compression settings are judged on.
set -euo pipefail
img=${1:?usage: make-volume.sh OUT.img SIZE_GIB [--os]}; SIZE_GIB=${2:?usage: make-volume.sh OUT.img SIZE_GIB [--os]}
OS=0; [ "${3:-}" = --os ] && OS=1
files=$(mktemp -d "$(dirname "$img")/files.XXXXXX"); mkdir -p "$files"/{bin,log,db,home}
trap 'rm -rf "$files"' EXIT
unit=$(( SIZE_GIB * 1024 / 4 ))   # MiB per quarter of the volume
python3 - "$files" "$unit" "$OS" <<'PY'
import os, sys, random
root, unit, real = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
rnd = random.Random(7)
def w(path, data): open(path, "wb").write(data)
left = int(unit * 0.9) << 20; i = 0
if real:
    # real executables, libraries and shared data, in a fixed order
    for top in ["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/libexec", "/usr/share", "/usr/lib"]:
        for d, dirs, fs in os.walk(top):
            dirs.sort()
            for f in sorted(fs):
                p = os.path.join(d, f)
                if left <= 0 or os.path.islink(p) or not os.path.isfile(p):
                    continue
                try:
                    data = open(p, "rb").read(left)
                except OSError:
                    continue
                w(f"{root}/bin/f{i}", data); left -= len(data); i += 1
# ~40 % of a quarter: incompressible binaries, in files of 1..16 MiB (the rest, with --os)
while left > 0:
    n = min(left, rnd.randint(1, 16) << 20); w(f"{root}/bin/f{i}", os.urandom(n)); left -= n; i += 1
# ~text logs (compressible)
line = b"2026-11-22T05:00:00Z INFO api request id=%d path=/v1/volumes/%d status=200 took=%dms\n"
left = int(unit * 0.6) << 20; i = 0
while left > 0:
    n = min(left, 8 << 20)
    buf = b"".join(line % (k, k % 977, k % 91) for k in range(i * 100000, i * 100000 + n // 70 + 1))[:n]
    w(f"{root}/log/app{i}.log", buf); left -= n; i += 1
# a database file with structure, plus a copy (dedup)
db = bytearray(os.urandom(int(unit * 0.25) << 20))
for k in range(0, len(db), 4096): db[k:k+2048] = bytes(2048)
w(f"{root}/db/data.db", db); w(f"{root}/home/backup-of-data.db", db)
PY
truncate -s "${SIZE_GIB}G" "$img"
mkfs.ext4 -q -F -d "$files" "$img"
