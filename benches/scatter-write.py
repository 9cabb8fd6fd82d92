#!/usr/bin/env python3
"""Scattered writes like a database or a VM's dirty pages: 0.5 % of IMG rewritten with
random bytes in GRAIN-sized blocks at random aligned offsets (SEED picks them); the
changed extents go to OUT as `offset length` lines, sorted (what a CBT source reports).

    scatter-write.py IMG GRAIN OUT SEED"""
import os, random, sys

img, grain, out, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
size = os.path.getsize(img)
rnd = random.Random(seed)
offs = sorted({rnd.randrange(size // grain) * grain for _ in range(int(size * 0.005) // grain)})
with open(img, "r+b") as f, open(out, "w") as o:
    for off in offs:
        f.seek(off)
        f.write(os.urandom(grain))
        o.write(f"{off} {grain}\n")
