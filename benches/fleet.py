#!/usr/bin/env python3
"""A fleet on one repository (issue 33): N node daemons, a population of VMs, days of
backups, retention and gc beside them, verify and drills — and at the end, whether
anything was lost.

    benches/fleet.py [--nodes 8] [--vms 200] [--days 90] [--seed 1] [--work DIR] [--keep]

What runs, all real: `mover serve` once per node (its own state, cache and unix socket;
separate processes), sharing one repository on a SeaweedFS S3 server on 127.0.0.1 (its
own, started here with scripts/s3-server.sh on ports 18400+). Backups are started the way
a scheduler starts them: over gRPC, `mover client start-backup` on the VM's node, parent
`latest`. A maintenance node runs `mover forget --keep-daily 7 --keep-weekly 4
--keep-monthly 6` every day and `mover gc` every 7th day *while that day's backups run*;
every 7th day a verify (`check --read-data-subset 5% --record`) and every day two drills
(`client start-drill`). At the end: `check --read-data` and restores of a sample of
snapshots from every age, each compared with the image it was taken of (rebuilt from the
writes the simulation logged: the images themselves are not kept).

Days are simulated: MOVER_CLOCK_OFFSET_FILE (read by Mover's clock only; the S3 requests
keep the real one) moves every process one day ahead between days, when nothing runs.

The population (seeded): every VM has an OS disk cloned from one template (16 MiB, 12 of
it written; each VM then writes its own 256 KiB), a quarter have a data disk (32–128 MiB,
three quarters written, all their own), one in twenty a database disk (32 MiB) whose days
are hundreds of scattered 4 KiB writes. A day's change: 30 % of VMs idle, the rest write a
few 64–512 KiB regions to the OS disk, 1–5 % of a data disk in 1 MiB runs.

Prints one line per day and a summary; writes every figure to WORK/fleet.json.
MOVER_BIN: the binary (default: the tree's release build, built now).
"""

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

MIB = 1 << 20
DAY = 86_400
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def timed(cmd, env, check=True):
    """Runs cmd under /usr/bin/time: (seconds, peak RSS MiB, stdout)."""
    t0 = time.monotonic()
    r = subprocess.run(["/usr/bin/time", "-f", "RSS_KIB=%M"] + cmd, capture_output=True, text=True, env=env)
    took = time.monotonic() - t0
    m = re.search(r"RSS_KIB=(\d+)", r.stderr)
    if r.returncode != 0 and check:
        raise RuntimeError(f"{' '.join(cmd[:3])}… exited {r.returncode}: {r.stderr[-2000:]}")
    return took, (int(m.group(1)) / 1024 if m else 0.0), r.stdout


def pct(xs, p):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# ---- the population and its images ----------------------------------------------------


class Disk:
    def __init__(self, path, size, kind, base):
        self.path, self.size, self.kind = path, size, kind
        self.base = base  # [(offset, length, seed)] written at creation
        self.writes = []  # [(day, offset, length, seed)]


def fill(f, off, length, seed):
    """Writes `length` bytes of seeded noise at `off` (what a replay writes again)."""
    rng = random.Random(seed)
    done = 0
    while done < length:
        n = min(4 * MIB, length - done)
        os.pwrite(f, rng.randbytes(n), off + done)
        done += n


class Population:
    def __init__(self, vms, seed, imgdir):
        rng = random.Random(seed)
        self.template_seed = rng.getrandbits(64)
        self.vms = []
        for i in range(vms):
            disks = [Disk(f"{imgdir}/vm{i:04}-os.img", 16 * MIB, "os", [(0, 12 * MIB, self.template_seed), (rng.randrange(0, 12 * MIB // 4096) * 4096, 256 << 10, rng.getrandbits(64))])]
            if rng.random() < 0.25:
                size = rng.choice([32, 64, 64, 128]) * MIB
                disks.append(Disk(f"{imgdir}/vm{i:04}-data.img", size, "data", [(0, size * 3 // 4, rng.getrandbits(64))]))
            if rng.random() < 0.05:
                disks.append(Disk(f"{imgdir}/vm{i:04}-db.img", 32 * MIB, "db", [(0, 16 * MIB, rng.getrandbits(64))]))
            profile = rng.choices(["idle", "light", "heavy"], [0.3, 0.55, 0.15])[0]
            self.vms.append({"name": f"vm{i:04}", "disks": disks, "profile": profile})
        self.rng = rng

    def create(self):
        for vm in self.vms:
            for d in vm["disks"]:
                with open(d.path, "wb") as f:
                    f.truncate(d.size)
                fd = os.open(d.path, os.O_WRONLY)
                try:
                    for off, length, seed in d.base:
                        fill(fd, off, length, seed)
                finally:
                    os.close(fd)

    def change(self, day):
        """One day's writes; returns the bytes written."""
        rng, total = self.rng, 0
        for vm in self.vms:
            p = vm["profile"]
            if p == "idle" and rng.random() < 0.9:
                continue
            for d in vm["disks"]:
                ws = []
                if d.kind == "os":
                    for _ in range(rng.randint(1, 4 if p != "heavy" else 10)):
                        n = rng.choice([64, 128, 256, 512]) << 10
                        ws.append((rng.randrange(0, (d.size - n) // 4096) * 4096, n))
                elif d.kind == "data":
                    share = rng.uniform(0.01, 0.05 if p != "heavy" else 0.15)
                    for _ in range(max(1, int(d.size * share) // MIB)):
                        ws.append((rng.randrange(0, (d.size - MIB) // MIB) * MIB, MIB))
                else:
                    for _ in range(rng.randint(100, 400)):
                        ws.append((rng.randrange(0, d.size // 4096) * 4096, 4096))
                if not ws:
                    continue
                fd = os.open(d.path, os.O_WRONLY)
                try:
                    for off, n in ws:
                        seed = rng.getrandbits(64)
                        fill(fd, off, n, seed)
                        d.writes.append((day, off, n, seed))
                        total += n
                finally:
                    os.close(fd)
        return total

    def expected_hash(self, disk, day, scratch):
        """The hash of `disk` as it was after `day`'s writes, rebuilt from the log."""
        with open(scratch, "wb") as f:
            f.truncate(0)
            f.truncate(disk.size)
        fd = os.open(scratch, os.O_WRONLY)
        try:
            for off, length, seed in disk.base:
                fill(fd, off, length, seed)
            for d, off, length, seed in disk.writes:
                if d <= day:
                    fill(fd, off, length, seed)
        finally:
            os.close(fd)
        return file_hash(scratch)


def file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                return h.hexdigest()
            h.update(b)


# ---- the nodes ------------------------------------------------------------------------


class Node:
    def __init__(self, i, work, mover, env, repo_url, endpoint):
        self.i, self.mover, self.env = i, mover, env
        self.dir = f"{work}/node{i}"
        os.makedirs(self.dir, exist_ok=True)
        self.sock = f"{self.dir}/mover.sock"
        self.http = 18500 + i
        self.cfg = f"{self.dir}/mover.toml"
        with open(self.cfg, "w") as f:
            f.write(
                f'listen = "unix:{self.sock}"\nhttp_listen = "127.0.0.1:{self.http}"\nstate_dir = "{self.dir}/state"\n'
                f'cache_dir = "{self.dir}/cache"\nallowed_roots = ["{work}/imgs"]\nshutdown_grace_seconds = 5\n'
                f'drill_scratch_dir = "{self.dir}/drill"\n\n[repositories.main]\nurl = "{repo_url}"\npassword_env = "MOVER_FLEET_PW"\n'
                f's3_endpoint = "{endpoint}"\ninit_if_missing = {"true" if i == 0 else "false"}\n'
            )
        self.log = open(f"{self.dir}/daemon.log", "ab")
        self.proc = None
        self.last = {}

    def start(self):
        self.proc = subprocess.Popen([self.mover, "serve", "--config", self.cfg], stdout=subprocess.DEVNULL, stderr=self.log, env=self.env, start_new_session=True)
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=2).status == 200:
                    return
            except Exception:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.i} exited; see {self.dir}/daemon.log")
            time.sleep(0.1)
        raise RuntimeError(f"node {self.i} not ready")

    def client(self, *args):
        r = subprocess.run([self.mover, "client", "--server", f"unix:{self.sock}", *args], capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"node {self.i}: client {args[0]}: {r.stderr.strip()}")
        return r.stdout

    def transfers(self):
        out = []
        for l in self.client("list", "--json", "--kind", "backup").splitlines():
            v = json.loads(l) if l.strip() else []
            out += v if isinstance(v, list) else [v]
        return out

    def metrics(self):
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10).read().decode()
        out = {}
        for l in body.splitlines():
            if l.startswith("#"):
                continue
            k, _, v = l.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
        return out

    def memory_mib(self):
        st = open(f"/proc/{self.proc.pid}/status").read()
        get = lambda k: int(re.search(rf"{k}:\s+(\d+)", st).group(1)) / 1024
        return get("VmRSS"), get("VmHWM")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---- the run --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default="/var/tmp/mover-fleet")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (images, repository, logs)")
    ap.add_argument("--samples", type=int, default=24, help="snapshots restored and compared at the end")
    ap.add_argument("--report", metavar="FLEET_JSON", help="print the markdown tables (per day; medians early and late; every gc) of a finished run's fleet.json, run nothing")
    a = ap.parse_args()
    if a.report:
        run = json.load(open(a.report))
        print(report(run))
        print()
        print(windows(run))
        return 0

    mover = os.environ.get("MOVER_BIN")
    if not mover:
        target = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/mover-target")
        subprocess.run(["cargo", "build", "--release", "-p", "mover"], check=True, cwd=ROOT, env=dict(os.environ, CARGO_TARGET_DIR=target))
        mover = f"{target}/release/mover"

    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(f"{a.work}/imgs")
    s3_env = dict(os.environ, MOVER_S3_STATE=f"{a.work}/s3", MOVER_S3_PORT_BASE="18400", MOVER_S3_BUCKET="fleet")
    line = sh(f"{ROOT}/scripts/s3-server.sh", "start", env=s3_env).stdout.strip().splitlines()[-1]
    s3 = dict(kv.split("=", 1) for kv in line.removeprefix("export ").split())
    clock = f"{a.work}/clock"
    with open(clock, "w") as f:
        f.write("0")
    env = dict(os.environ, **s3, MOVER_FLEET_PW="fleet-benchmark", MOVER_PASSWORD="fleet-benchmark", MOVER_CLOCK_OFFSET_FILE=clock, MOVER_LOG="warn")
    repo_url = f"s3://fleet/repo"
    endpoint = s3["MOVER_TEST_S3_ENDPOINT"]
    maint_env = dict(env, MOVER_REPOSITORY=repo_url, AWS_ENDPOINT_URL=endpoint, MOVER_CACHE_DIR=f"{a.work}/maint-cache")

    pop = Population(a.vms, a.seed, f"{a.work}/imgs")
    t0 = time.monotonic()
    pop.create()
    logical = sum(d.size for vm in pop.vms for d in vm["disks"])
    disks = sum(len(vm["disks"]) for vm in pop.vms)
    print(f"fleet: {a.nodes} nodes, {a.vms} VMs, {disks} disks, {logical / MIB:.0f} MiB logical; images made in {time.monotonic() - t0:.1f} s", flush=True)

    nodes = [Node(i, a.work, mover, env, repo_url, endpoint) for i in range(a.nodes)]
    nodes[0].start()  # creates the repository
    for n in nodes[1:]:
        n.start()
    node_of = {vm["name"]: nodes[i % a.nodes] for i, vm in enumerate(pop.vms)}

    days, taken, failures = [], {}, []  # taken: snapshot id -> (vm, day)
    try:
        for day in range(a.days + 1):
            with open(clock, "w") as f:
                f.write(str(day * DAY))
            changed = pop.change(day) if day > 0 else sum(l for vm in pop.vms for d in vm["disks"] for _, l, _ in d.base)
            before = {n.i: n.metrics() for n in nodes}
            maint = {}
            mt = threading.Thread(target=maintenance, args=(day, mover, maint_env, nodes, pop, maint))
            t_day = time.monotonic()
            mt.start()
            started = start_backups(day, pop, node_of)
            done = wait_all(nodes, started)
            backups_s = time.monotonic() - t_day
            mt.join()
            rec = day_record(day, changed, done, nodes, before, maint, backups_s, time.monotonic() - t_day)
            for t in done.values():
                if t["state"] == "succeeded":
                    taken[t["snapshot_id"]] = (t["group"].removeprefix("vms/"), day)
                else:
                    failures.append({"day": day, "group": t["group"], "error": t["error"]})
            if day % 10 == 0 or day == a.days:
                took, rss, out = timed([mover, "stats", "--json"], maint_env)
                st = json.loads(out)
                rec["stats"] = {k: st[k] for k in ("snapshots", "logical_bytes", "unique_bytes", "stored_bytes", "packs", "chunks")}
                rec["stats"]["seconds"], rec["stats"]["rss_mib"] = took, rss
            days.append(rec)
            print(day_line(rec), flush=True)
        end = final_checks(a, mover, maint_env, pop, taken)
    finally:
        for n in nodes:
            n.stop()
        subprocess.run([f"{ROOT}/scripts/s3-server.sh", "stop"], env=s3_env, capture_output=True)
    summary = summarize(days, end, failures, a)
    with open(f"{a.work}/fleet.json", "w") as f:
        json.dump({"args": vars(a), "days": days, "end": end, "failures": failures, "summary": summary}, f, indent=1)
    print(json.dumps(summary, indent=1))
    if not a.keep:
        for p in ["imgs", "s3"]:
            shutil.rmtree(f"{a.work}/{p}", ignore_errors=True)
    return 0 if end["lost"] == 0 and not failures else 1


def start_backups(day, pop, node_of):
    """Starts every VM's backup on its node (a few requests at a time, as a scheduler's
    workers would): {(node, transfer id): vm}."""

    def one(vm):
        n = node_of[vm["name"]]
        vols = [x for d in vm["disks"] for x in ("--volume", f"{d.kind}={d.path}")]
        out = n.client("start-backup", "--json", "--repository", "main", "--group", f"vms/{vm['name']}", "--parent", "latest", "--request-id", f"d{day}-{vm['name']}", *vols)
        return (n.i, json.loads(out.splitlines()[-1])["id"]), vm["name"]

    with cf.ThreadPoolExecutor(16) as ex:
        return dict(ex.map(one, pop.vms))


def wait_all(nodes, started):
    """Waits until every started transfer has ended: {(node, id): transfer}."""
    done = {}
    while len(done) < len(started):
        for n in nodes:
            mine = {tid for (ni, tid) in started if ni == n.i and (ni, tid) not in done}
            if not mine:
                continue
            for t in n.transfers():
                if t["id"] in mine and t["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
                    done[(n.i, t["id"])] = t
        if len(done) < len(started):
            time.sleep(0.5)
    return done


def maintenance(day, mover, env, nodes, pop, out):
    """What the maintenance node runs beside the day's backups."""
    try:
        took, rss, res = timed([mover, "forget", "--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "6", "--json"], env)
        out["forget"] = {"seconds": took, "rss_mib": rss, "removed": json.loads(res.splitlines()[-1])["removed"]}
        if day > 0 and day % 7 == 0:
            took, rss, res = timed([mover, "gc", "--json"], env)
            out["gc"] = {"seconds": took, "rss_mib": rss, "result": json.loads(res) if res.strip().startswith("{") else res[-500:]}
            took, rss, res = timed([mover, "check", "--read-data-subset", "5%", "--record", "--json"], env)
            out["verify"] = {"seconds": took, "rss_mib": rss}
        if day > 0:
            rng = random.Random(day)
            drills = []
            for vm in rng.sample(pop.vms, 2):
                n = nodes[rng.randrange(len(nodes))]
                t0 = time.monotonic()
                n.client("start-drill", "--repository", "main", "--group", f"vms/{vm['name']}", "latest", "--watch", "--json")
                drills.append(time.monotonic() - t0)
            out["drills"] = drills
    except Exception as e:  # said in the day's record; the run goes on
        out["error"] = str(e)


def day_record(day, changed, done, nodes, before, maint, backups_s, day_s):
    ts = list(done.values())
    ok = [t for t in ts if t["state"] == "succeeded"]
    lat = [(t["finished_unix_ms"] - t["created_unix_ms"]) / 1000 for t in ok]
    run = [(t["finished_unix_ms"] - t["started_unix_ms"]) / 1000 for t in ok]
    read = sum(t["stats"]["bytes_read"] for t in ok)
    stored = sum(t["stats"]["bytes_stored"] for t in ok)
    new = sum(t["stats"]["bytes_new"] for t in ok)
    per_node = []
    for n in nodes:
        m, b = n.metrics(), before[n.i]
        n.last_metrics = m
        d = lambda k: m.get(k, 0.0) - b.get(k, 0.0)
        rss, hwm = n.memory_mib()
        mine = [(t["finished_unix_ms"] - t["started_unix_ms"]) / 1000 for (ni, _), t in done.items() if ni == n.i and t["state"] == "succeeded"]
        per_node.append({
            "node": n.i,
            "sync_s": d("mover_index_sync_seconds_total"),
            "syncs": d("mover_index_syncs_total"),
            "syncs_reused": d("mover_index_syncs_reused_total"),
            "sync_segments": d("mover_index_sync_segments_total"),
            "backup_s": sum(mine),
            "status_refresh_s": m.get('mover_status_refresh_seconds{repository="main"}', 0.0),
            "manifests_read": d('mover_status_manifests_read_total{repository="main"}'),
            "rss_mib": rss,
            "peak_rss_mib": hwm,
        })
    # Store requests of the day over all nodes: how many per backup, and how long each took
    # (which of the two grows tells Mover's work from the server's slowing down).
    store = {}
    for op in ("list", "get", "put"):
        cnt = ssum = 0.0
        for n in nodes:
            m, b = n.last_metrics, before[n.i]
            k = f'mover_store_request_seconds_count{{op="{op}",result="ok"}}'
            cnt += m.get(k, 0.0) - b.get(k, 0.0)
            k = f'mover_store_request_seconds_sum{{op="{op}",result="ok"}}'
            ssum += m.get(k, 0.0) - b.get(k, 0.0)
        store[op] = {"per_backup": cnt / max(1, len(ts)), "mean_ms": 1000 * ssum / max(1.0, cnt)}
    return {
        "day": day, "backups": len(ts), "failed": len(ts) - len(ok), "changed_bytes": changed, "store": store,
        "latency_s": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": max(lat, default=0)},
        "run_s": {"p50": pct(run, 50), "p90": pct(run, 90), "p99": pct(run, 99)},
        "read_bytes": read, "new_bytes": new, "stored_bytes": stored,
        "backups_wall_s": backups_s, "day_wall_s": day_s, "maintenance": maint, "nodes": per_node,
    }


def day_line(r):
    m = r["maintenance"]
    nodes = r["nodes"]
    sync = sum(n["sync_s"] for n in nodes) / max(1e-9, sum(n["backup_s"] for n in nodes))
    parts = [
        f"day {r['day']:3}: {r['backups']} backups ({r['failed']} failed) in {r['backups_wall_s']:.1f} s",
        f"p50/p90/p99 {r['latency_s']['p50']:.2f}/{r['latency_s']['p90']:.2f}/{r['latency_s']['p99']:.2f} s",
        f"changed {r['changed_bytes'] / MIB:.0f} MiB, stored {r['stored_bytes'] / MIB:.1f} MiB ({r['stored_bytes'] / max(1, r['changed_bytes']):.2f}/changed)",
        f"sync {100 * sync:.2f}% of backup time",
        "store " + ", ".join(f"{op} {v['per_backup']:.1f}/backup {v['mean_ms']:.0f} ms" for op, v in r["store"].items()),
        f"status {max(n['status_refresh_s'] for n in nodes) * 1000:.0f} ms",
        f"peak RSS {max(n['peak_rss_mib'] for n in nodes):.0f} MiB",
        f"forget {m.get('forget', {}).get('seconds', 0):.1f} s/{m.get('forget', {}).get('rss_mib', 0):.0f} MiB",
    ]
    if "gc" in m:
        parts.append(f"gc {m['gc']['seconds']:.1f} s/{m['gc']['rss_mib']:.0f} MiB")
    if "verify" in m:
        parts.append(f"verify {m['verify']['seconds']:.1f} s")
    if "stats" in r:
        s = r["stats"]
        parts.append(f"repo {s['stored_bytes'] / MIB:.0f} MiB for {s['logical_bytes'] / MIB:.0f} MiB logical, {s['snapshots']} snapshots")
    if "error" in m:
        parts.append(f"MAINTENANCE ERROR: {m['error'][:300]}")
    return "; ".join(parts)


def final_checks(a, mover, env, pop, taken):
    """check --read-data, then restores of a sample from every age compared with the
    images they were taken of."""
    took, rss, out = timed([mover, "check", "--read-data", "--json"], env, check=False)
    check = json.loads(out) if out.strip() else {"problems": ["check --read-data printed nothing (failed)"]}
    problems = check.get("problems", [])
    listed = {s["id"]: s for s in json.loads(sh(mover, "snapshots", "--json", env=env).stdout)}
    alive = [(sid, vm, day) for sid, (vm, day) in taken.items() if sid in listed]
    rng = random.Random(a.seed)
    by_age = {}
    for sid, vm, day in alive:
        by_age.setdefault(min(day // 10, 9), []).append((sid, vm, day))
    sample = []
    for bucket in sorted(by_age):
        sample += rng.sample(by_age[bucket], min(len(by_age[bucket]), max(1, a.samples // len(by_age))))
    vms = {vm["name"]: vm for vm in pop.vms}
    lost, restored = [], []
    scratch = f"{a.work}/scratch.img"
    for sid, vmname, day in sample:
        for d in vms[vmname]["disks"]:
            target = f"{a.work}/restore.img"
            if os.path.exists(target):
                os.remove(target)
            t0 = time.monotonic()
            sh(mover, "restore", f"{sid}:{d.kind}", target, env=env)
            took_r = time.monotonic() - t0
            got, want = file_hash(target), pop.expected_hash(d, day, scratch)
            restored.append({"snapshot": sid, "vm": vmname, "day": day, "disk": d.kind, "ok": got == want, "seconds": took_r})
            if got != want:
                lost.append(f"{sid} {vmname} day {day} {d.kind}: restored {got[:16]}, taken of {want[:16]}")
    for p in (scratch, f"{a.work}/restore.img"):
        if os.path.exists(p):
            os.remove(p)
    return {"check_read_data": {"seconds": took, "rss_mib": rss, "problems": problems[:20], "ok": not problems},
            "snapshots_listed": len(listed), "snapshots_taken_alive": len(alive), "restored": restored, "lost": len(lost) + len(problems), "lost_detail": lost[:20]}


def summarize(days, end, failures, a):
    def series(f):
        return [f(r) for r in days if r["day"] > 0]

    def per_unit(r):
        return r["backups_wall_s"] / max(1, r["backups"])

    def window(xs, lo, hi):
        v = [x for r, x in zip([r for r in days if r["day"] > 0], xs) if lo <= r["day"] <= hi]
        return statistics.median(v) if v else None

    out = {"nodes": a.nodes, "vms": a.vms, "days": a.days, "backups_failed": len(failures), "lost": end["lost"],
           "check_read_data_ok": end["check_read_data"]["ok"], "restores_compared": len(end["restored"])}
    early, late = (1, min(10, a.days)), (max(1, a.days - 9), a.days)
    for name, f in [
        ("backup_s_per_vm", per_unit),
        ("latency_p50_s", lambda r: r["latency_s"]["p50"]),
        ("latency_p99_s", lambda r: r["latency_s"]["p99"]),
        ("forget_s", lambda r: r["maintenance"].get("forget", {}).get("seconds")),
        ("status_refresh_s", lambda r: max(n["status_refresh_s"] for n in r["nodes"])),
        ("sync_share_of_backup_time", lambda r: sum(n["sync_s"] for n in r["nodes"]) / max(1e-9, sum(n["backup_s"] for n in r["nodes"]))),
        ("stored_per_changed_byte", lambda r: r["stored_bytes"] / max(1, r["changed_bytes"])),
        ("read_per_changed_byte", lambda r: r["read_bytes"] / max(1, r["changed_bytes"])),
    ]:
        xs = series(f)
        xs = [x if x is not None else float("nan") for x in xs]
        e, l = window(xs, *early), window(xs, *late)
        out[name] = {"median_first_10_days": e, "median_last_10_days": l, "growth": (l / e) if e and l else None}
    gcs = [(r["day"], r["maintenance"]["gc"]) for r in days if "gc" in r["maintenance"]]
    out["gc"] = [{"day": d, "seconds": g["seconds"], "rss_mib": g["rss_mib"]} for d, g in gcs]
    out["gc_max_rss_mib"] = max((g["rss_mib"] for _, g in gcs), default=None)
    out["gc_max_s_vs_day_backups_s"] = max((g["seconds"] / max(1e-9, r["backups_wall_s"]) for r in days for d, g in gcs if r["day"] == d), default=None)
    out["peak_node_rss_mib"] = max(n["peak_rss_mib"] for r in days for n in r["nodes"])
    last = [r for r in days if "stats" in r][-1]["stats"]
    out["repository"] = {"snapshots": last["snapshots"], "stored_mib": last["stored_bytes"] / MIB, "logical_mib": last["logical_bytes"] / MIB, "chunks": last["chunks"]}
    return out


def windows(run):
    """Medians of the first days after the first week (8-12) against the last five, per
    unit of work, as a markdown table; then every gc with its phases."""
    days = [r for r in run["days"] if r["day"] > 0]
    last = max(r["day"] for r in days)

    def med(f, lo, hi):
        v = [x for x in (f(r) for r in days if lo <= r["day"] <= hi) if x is not None]
        return statistics.median(v) if v else None

    def listing(r):
        c = sum(n["syncs"] - n.get("syncs_reused", 0) for n in r["nodes"])
        return sum(n["sync_s"] for n in r["nodes"]) / c if c else None

    def reused(r):
        c = sum(n["syncs"] for n in r["nodes"])
        return sum(n.get("syncs_reused", 0) for n in r["nodes"]) / c if c else None

    def forget_per(r):
        f = r["maintenance"].get("forget")
        return f["seconds"] / f["removed"] if f and f.get("removed") else None

    rows = [f"| | days 8–12 | days {last - 4}–{last} | growth |", "|---|---|---|---|"]
    for name, f in [
        ("backups' wall time per VM, s", lambda r: r["backups_wall_s"] / max(1, r["backups"])),
        ("a backup's own run time p50, s", lambda r: r.get("run_s", {}).get("p50")),
        ("latency p50, s", lambda r: r["latency_s"]["p50"]),
        ("forget per snapshot removed, s", forget_per),
        ("one index listing, s", listing),
        ("syncs that reused a listing", reused),
        ("status refresh (slowest node), s", lambda r: max(n["status_refresh_s"] for n in r["nodes"])),
        ("index sync share of backup time", lambda r: sum(n["sync_s"] for n in r["nodes"]) / max(1e-9, sum(n["backup_s"] for n in r["nodes"]))),
        ("stored per changed byte", lambda r: r["stored_bytes"] / max(1, r["changed_bytes"])),
    ]:
        e, l = med(f, 8, 12), med(f, last - 4, last)
        g = f"{l / e:.2f}×" if e and l else ""
        rows.append(f"| {name} | {e if e is None else round(e, 4)} | {l if l is None else round(l, 4)} | {g} |")
    rows.append("")
    for r in run["days"]:
        g = r["maintenance"].get("gc")
        if not g:
            continue
        res = g["result"] if isinstance(g["result"], dict) else {}
        phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(res.get("phase_seconds", {}).items()))
        rows.append(f"gc day {r['day']}: {g['seconds']:.1f} s ({g['seconds'] / max(1e-9, r['backups_wall_s']):.2f}× the day's backups), "
                    f"{g['rss_mib']:.0f} MiB; copied {res.get('bytes_copied', 0) / MIB:.0f} MiB, freed {res.get('bytes_freed', 0) / MIB:.0f} MiB; {phases}")
    return "\n".join(rows)


def report(run):
    """The per-day curve of a run as a markdown table: day 1, every 10th day, the last."""
    days = run["days"]
    last = days[-1]["day"]
    rows = ["| day | snapshots | backups wall s | latency p50 / p99 s | stored / changed | sync % of backup time | list, get per backup | status refresh ms | forget s | gc s / MiB | node peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    snaps = None
    for r in days:
        if "stats" in r:
            snaps = r["stats"]["snapshots"]
        if not (r["day"] in (1, last) or r["day"] % 10 == 0 or "gc" in r["maintenance"] and r["day"] in (7, last - last % 7)):
            continue
        n = r["nodes"]
        sync = 100 * sum(x["sync_s"] for x in n) / max(1e-9, sum(x["backup_s"] for x in n))
        st = r.get("store", {})
        lg = f"{st['list']['per_backup']:.1f}, {st['get']['per_backup']:.1f}" if st else "–"
        m = r["maintenance"]
        gc = f"{m['gc']['seconds']:.0f} / {m['gc']['rss_mib']:.0f}" if "gc" in m else ""
        rows.append(
            f"| {r['day']} | {snaps if 'stats' in r else ''} | {r['backups_wall_s']:.1f} | {r['latency_s']['p50']:.1f} / {r['latency_s']['p99']:.1f} | "
            f"{r['stored_bytes'] / max(1, r['changed_bytes']):.2f} | {sync:.1f} | {lg} | {1000 * max(x['status_refresh_s'] for x in n):.0f} | "
            f"{m.get('forget', {}).get('seconds', float('nan')):.1f} | {gc} | {max(x['peak_rss_mib'] for x in n):.0f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
