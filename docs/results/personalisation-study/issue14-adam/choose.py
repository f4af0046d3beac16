"""Guard rules replayed on the validation run (validation-v3: every fit kept, with its cross-validated scores and
the confirmed answers it flips out of fold and after the fit on all). A rule keeps a trial's fit or gets 0 points.

    python docs/results/personalisation-study/issue14-adam/choose.py [validation-v3/results.json]

Rows: corpus, mode | answers: mean gain over the global head ± SE, d = paired difference with the plain
fine-tune, <-5 = runs below -5 points. Fits: bal/nobal = class balance on/off, rep/norep = replay set on/off
(all Adam, 100 full-batch steps, lr 0.01). R5 is the new default.
"""

import json
import sys
from pathlib import Path

import numpy as np


def info(t: dict, p: str) -> dict:
    g, k = t["guard:" + p], t["answer_kinds"]
    return dict(n=t["answers"], sb=g["score_before"], sa=g["score_after"], f=g["confirmed_flipped"],
                ff=g["confirmed_flipped_fit"], up=k["up"], down=k["down"], label=k["label"],
                gain=100 * (t[p] - t["global"]))


def se(a: np.ndarray) -> float:
    return float(a.std(ddof=1) / np.sqrt(len(a)))


def report(trials: list, rule, name: str) -> None:
    print(f"## {name}")
    for corpus in ("nemo", "ravdess"):
        for mode in ("corrections", "thumbs"):
            row = []
            for n in (5, 10, 20, 40):
                ts = [t for t in trials if t["corpus"] == corpus and t["mode"] == mode and t["answers"] == n]
                if not ts:
                    continue
                g = np.array([rule(t) for t in ts])
                d = g - 100 * np.array([t["plain"] - t["global"] for t in ts])
                row.append(f"{n}: {g.mean():+5.1f}±{se(g):.1f} d{d.mean():+5.1f}±{se(d):.1f} <-5:{int((g < -5).sum())}")
            print(f"  {corpus[:3]} {mode[:4]} | " + " | ".join(row))


def keep(i: dict, margin=0.5, adapt_below=0.6, relax_thumbs=True, flips=-1, trust=False) -> bool:
    n, thumbs_only = i["n"], i["down"] > 0 and i["label"] == 0
    unlike = n >= 10 and i["sb"] < adapt_below and not (thumbs_only and not relax_thumbs)
    if trust and unlike and i["label"] >= max(i["down"], 1):
        return True
    needed = margin / np.sqrt(n)
    if unlike:
        needed = -abs(needed)
    if i["sa"] < i["sb"] + 1e-4 + needed:
        return False
    return not (flips >= 0 and thumbs_only and (i["f"] > flips or i["ff"] > 0))


def make(fit_like="bal rep", fit_unlike=None, alt=None, alt_margin=0.1, **kw):
    def rule(t: dict) -> float:
        p = fit_like
        i = info(t, p)
        unlike = i["n"] >= 10 and i["sb"] < kw.get("adapt_below", 0.6)
        if fit_unlike and unlike and i["label"] >= i["down"]:
            p = fit_unlike
            i = info(t, p)
        elif alt:
            j = info(t, alt)
            if j["sa"] >= i["sa"] + alt_margin:
                p, i = alt, j
        return i["gain"] if keep(i, **kw) else 0.0
    return rule


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("validation-v3") / "results.json"
    trials = json.loads(path.read_text())["trials"]
    for p in ("bal rep", "nobal norep", "bal norep", "nobal rep"):
        report(trials, lambda t, p=p: info(t, p)["gain"], f"noguard {p}")
    strict = dict(relax_thumbs=False, flips=0)
    rules = {
        "R0 Adam in the previous guard (bal rep / bal norep adaptive)": make(alt="bal norep"),
        "R1 bal rep, guard": make(),
        "R2 unlike -> nobal norep": make(fit_unlike="nobal norep", alt="bal norep"),
        "R3 R2 + thumbs flips 0, no relaxation": make(fit_unlike="nobal norep", alt="bal norep", **strict),
        "R3b R2 + thumbs flips 0, relaxation kept": make(fit_unlike="nobal norep", alt="bal norep", flips=0),
        "R3c flips 1": make(fit_unlike="nobal norep", alt="bal norep", relax_thumbs=False, flips=1),
        "R4 R3 + trust": make(fit_unlike="nobal norep", alt="bal norep", trust=True, **strict),
        "R5 unlike -> bal norep, trusted (the new default)": make(fit_unlike="bal norep", alt="bal norep", trust=True,
                                                                  **strict),
        "R6 unlike -> bal norep, not trusted": make(fit_unlike="bal norep", alt="bal norep", **strict),
        "R4 adapt_below 0.5": make(fit_unlike="nobal norep", alt="bal norep", trust=True, adapt_below=0.5, **strict),
        "R5 margin 0.25": make(fit_unlike="bal norep", alt="bal norep", trust=True, margin=0.25, **strict),
        "R5 margin 0.75": make(fit_unlike="bal norep", alt="bal norep", trust=True, margin=0.75, **strict),
        "R5 without the replay alternative": make(fit_unlike="bal norep", trust=True, **strict),
    }
    for name, rule in rules.items():
        report(trials, rule, name)


if __name__ == "__main__":
    main()
