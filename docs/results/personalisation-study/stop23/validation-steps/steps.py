"""Paired analysis of the affine-steps validation run (runs/affine-steps-validation/results.json).

For each cell (corpus x mode x answers): mean gain +- SE over trials for each affine policy (gain = policy accuracy
minus global-head accuracy, points), paired differences against affine100, runs below -5 points, runs that kept the
affine (guard:<policy>.input_affine), median ms per personalisation; then the pre-registered decision rule.
"""
import json
import sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/affine-steps-validation")
res = json.loads((out / "results.json").read_text())
trials = res["trials"]
REF, SHORT = "affine100", ["affine50", "affine30"]
POL = [REF] + SHORT
extra = ["SDK default"] if "SDK default" in res["policies"] else []


def mse(v):
    v = 100 * np.asarray(v, float)
    return v.mean(), (v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0)


cells = sorted({(t["corpus"], t["mode"], t["answers"]) for t in trials})
rows, med, ok = [], {}, {p: True for p in SHORT}
fails = {p: [] for p in SHORT}
for c, m, n in cells:
    ts = [t for t in trials if (t["corpus"], t["mode"], t["answers"]) == (c, m, n)]
    gain = {p: [t[p] - t["global"] for t in ts] for p in POL + extra}
    below = {p: int(np.sum(100 * np.array(gain[p]) < -5)) for p in POL + extra}
    kept = {p: sum(bool(t[f"guard:{p}"].get("input_affine")) for t in ts) for p in POL}
    ms = {p: float(np.median([t[f"ms:{p}"] for t in ts])) for p in POL + extra}
    med[(c, m, n)] = ms
    diff = {p: mse([t[p] - t[REF] for t in ts]) for p in SHORT}
    worst = {p: 100 * min(gain[p]) for p in POL}
    for p in SHORT:
        if diff[p][0] < -1.0:
            ok[p] = False
            fails[p].append(f"{c} {m} {n}: paired {diff[p][0]:+.1f}")
        if below[p] > below[REF]:
            ok[p] = False
            fails[p].append(f"{c} {m} {n}: {below[p]} runs below -5 vs {below[REF]}")
    rows.append((c, m, n, len(ts), gain, below, kept, ms, diff, worst))

L = ["# Affine steps: 100 @ 0.01 vs 50 @ 0.02 vs 30 @ 0.033 (validation users)", "",
     f"Model `{res['model']}`, seed {res['seed']}. Gain = policy accuracy - global head accuracy on the user's later "
     "clips, points, mean ± SE over trials. Paired = policy - affine100 on the same trial. "
     "'<-5' = runs with gain below -5 points; 'kept' = runs where the guard kept the affine; ms = median wall-clock "
     "ms of one personalize() on this shared 2-core machine.", "",
     "| corpus | mode | answers | trials | " + ("SDK default gain (<-5) | " if extra else "")
     + "affine100 gain (<-5, worst) | affine50 gain (<-5, worst) | affine30 gain (<-5, worst) "
     "| affine50 - affine100 | affine30 - affine100 | kept 100/50/30 | median ms 100/50/30"
     + (" (default)" if extra else "") + " |",
     "| --- " * (12 + bool(extra)) + "|"]
for c, m, n, k, gain, below, kept, ms, diff, worst in rows:
    g = {p: mse(gain[p]) for p in POL + extra}
    r = [c, m, str(n), str(k)]
    if extra:
        r.append(f"{g['SDK default'][0]:+.1f} ± {g['SDK default'][1]:.1f} ({below['SDK default']})")
    r += [f"{g[p][0]:+.1f} ± {g[p][1]:.1f} ({below[p]}, {worst[p]:+.1f})" for p in POL]
    r += [f"{diff[p][0]:+.1f} ± {diff[p][1]:.1f}" for p in SHORT]
    r.append("/".join(f"{kept[p]}" for p in POL) + f" of {k}")
    r.append(" / ".join(f"{ms[p]:.0f}" for p in POL) + (f" ({ms['SDK default']:.0f})" if extra else ""))
    L.append("| " + " | ".join(r) + " |")

L += ["", "Median ms over all trials: " + "; ".join(
    f"{p} {np.median([t['ms:' + p] for t in trials]):.0f}" for p in POL + extra) + ".", "",
      "Status counts: " + "; ".join(f"{p} " + ", ".join(f"{s} {sum(t['status:' + p] == s for t in trials)}"
                                                      for s in sorted({t['status:' + p] for t in trials}))
                                    for p in POL) + ".", "",
      "## Decision rule (pre-registered)", "",
      "A shorter fit is acceptable if, in every cell, its paired difference against affine100 has mean >= -1.0 "
      "point and it has no more runs below -5 than affine100 in any cell. Among acceptable ones the cheapest wins.",
      ""]
for p in SHORT:
    L.append(f"- {p}: " + ("acceptable" if ok[p] else "not acceptable: " + "; ".join(fails[p])))
acc = [p for p in SHORT if ok[p]]
if acc:
    cost = {p: np.median([t["ms:" + p] for t in trials]) for p in acc}
    L.append(f"- Verdict: {min(cost, key=cost.get)} (cheapest acceptable).")
else:
    L.append("- Verdict: none acceptable; keep affine100.")
(out / "steps.md").write_text("\n".join(L) + "\n")
print("\n".join(L))
