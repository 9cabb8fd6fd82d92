#!/usr/bin/env python3
"""Checks that every metric a Grafana dashboard (or a Prometheus rule file) queries is one
the daemon exports: METRICS is a scrape of /metrics, the rest are dashboards (.json) or
PrometheusRule/rule files (.yaml). Exits 1 naming each unknown metric and where it is used.
A metric whose series appear only after an event (the last success of a transfer kind) is
not in a fresh daemon's scrape: its name is taken from mover/src/daemon/metrics.rs, where
it is registered."""
import json, re, sys

def exported(path):
    names = set()
    for line in open(path):
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            name, kind = m.groups()
            names.add(name)
            if kind == "histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names

def registered_late(path="mover/src/daemon/metrics.rs"):
    """Metrics documented as absent until an event ("absent" in their help text)."""
    src = open(path).read()
    return set(re.findall(r'"(mover_[a-z_]+)",\s*"[^"]*absent', src))

def exprs(path):
    if path.endswith(".json"):
        d = json.load(open(path))
        for p in d.get("panels", []):
            for t in p.get("targets", []):
                yield f"panel '{p.get('title')}'", t.get("expr", "")
    else:
        # expr lines of a rule file / PrometheusRule (no YAML parser needed)
        lines = open(path).read().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"(\s*)expr:\s*(.*)", line)
            if not m:
                continue
            indent, e = len(m.group(1)), m.group(2)
            if e in ("|", ">", "|-", ">-"):      # a block scalar: the more indented lines below
                block = []
                for l in lines[i + 1:]:
                    if l.strip() and len(l) - len(l.lstrip()) <= indent:
                        break
                    block.append(l.strip())
                e = " ".join(block)
            yield f"line {i + 1}", e

FUNCS = {"sum", "by", "rate", "increase", "histogram_quantile", "time", "max", "min", "avg", "count",
         "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "absent",
         "max_over_time", "min_over_time", "clamp_min", "clamp_max", "label_replace", "le", "bool", "offset", "vector"}

exp = exported(sys.argv[1]) | registered_late()
bad = []
for f in sys.argv[2:]:
    for where, e in exprs(f):
        e = re.sub(r'"[^"]*"', '""', e)          # label values
        e = re.sub(r"\{[^}]*\}", "", e)           # matchers
        e = re.sub(r"\[[^\]]*\]", "", e)          # ranges
        for tok in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
            if tok.startswith("mover_") and tok not in exp:
                bad.append(f"{f}: {where}: {tok}")
            elif not tok.startswith("mover_") and tok not in FUNCS and not re.match(r"^(instance|kind|result|op|what|change_source|job|repository|group|Inf|e|m|s|h|d)$", tok):
                bad.append(f"{f}: {where}: '{tok}' is not a metric Mover exports")
# What an operator looks for first: recovery points and times, verify, drills, repositories,
# failures and exports each have a panel.
REQUIRED = {"mover_snapshot_age_seconds", "mover_projected_restore_seconds", "mover_verified_snapshot_age_seconds",
            "mover_drilled_snapshot_age_seconds", "mover_verify_damaged_objects", "mover_repository_up",
            "mover_transfers_total", "mover_exports_active", "mover_last_success_timestamp_seconds"}
for f in sys.argv[2:]:
    if f.endswith(".json"):
        queried = set(re.findall(r"mover_[a-z_]+", " ".join(e for _, e in exprs(f))))
        bad += [f"{f}: no panel shows {m}" for m in sorted(REQUIRED - queried)]
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
print(f"{len(sys.argv) - 2} file(s): every metric queried is exported")
