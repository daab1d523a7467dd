import json, statistics, sys
METRIC = {"concise": ("words", -1), "verbose": ("words", 1), "uplifting": ("sentiment", 1), "formal": ("grade", 1)}
print("| placement | request shape | preference | metric | base | pref | amulet | amulet - base (toward the preference) | amulet - pref | degenerate base / pref / amulet |")
print("|---|---|---|---|---|---|---|---|---|---|")
for run in sys.argv[1:]:
    placement, shape = run.split("-")
    d = json.load(open(f"/tmp/peval/{run}/results.json"))
    for pref, (metric, sign) in METRIC.items():
        vals, deg = {}, {}
        for m in ("base", "pref", "amulet"):
            rows = [r for r in d["rows"] if r["preference"] == pref and r["method"] == m]
            vals[m] = statistics.mean(r[metric] for r in rows)
            deg[m] = sum(1 for r in rows if r["degeneration"]) 
        n = len([r for r in d["rows"] if r["preference"] == pref and r["method"] == "base"])
        print(f"| {placement} | {shape} | {pref} | {metric} | {vals['base']:.2f} | {vals['pref']:.2f} | {vals['amulet']:.2f} | {sign*(vals['amulet']-vals['base']):+.2f} | {sign*(vals['amulet']-vals['pref']):+.2f} | {deg['base']}/{deg['pref']}/{deg['amulet']} of {n} |")
