#!/usr/bin/env python3
"""Checks that every metric a Grafana dashboard (or a Prometheus rule file) queries is one
the daemon exports: METRICS is a scrape of /metrics, the rest are dashboards (.json) or
PrometheusRule/rule files (.yaml). Exits 1 naming each unknown metric and where it is used."""
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

def exprs(path):
    if path.endswith(".json"):
        d = json.load(open(path))
        for p in d.get("panels", []):
            for t in p.get("targets", []):
                yield f"panel '{p.get('title')}'", t.get("expr", "")
    else:
        # expr lines of a rule file / PrometheusRule (no YAML parser needed)
        for i, line in enumerate(open(path), 1):
            m = re.match(r"\s*expr:\s*(.*)", line)
            if m:
                yield f"line {i}", m.group(1)

FUNCS = {"sum", "by", "rate", "increase", "histogram_quantile", "time", "max", "min", "avg", "count",
         "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "absent",
         "max_over_time", "min_over_time", "clamp_min", "clamp_max", "label_replace", "le", "bool", "offset", "vector"}

exp = exported(sys.argv[1])
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
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
print(f"{len(sys.argv) - 2} file(s): every metric queried is exported")
