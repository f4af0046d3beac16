"""The federated experiments of the studies, with the real SDK and aggregator: one command, one report.

    python -m tools.sim_suite --out runs/suite [--rounds 10] [--architecture cnn]

Trains the shared encoder once (server-side actors), then runs ``tools.simulate`` for: federated by speaker,
random equal splits, one emotion per device (FedAvg, and FedAdam), an attack run (a tenth of the devices send
scaled deltas) with plain FedAvg and with the robust options, a sweep of the number of devices (random splits),
and users who only ever answer thumbs-down. Writes ``report.md``, ``report.json`` and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _setups(base: dict) -> list[tuple[str, dict]]:
    return [
        ("by speaker", {"partition": "speaker"}),
        ("random split (5)", {"partition": "random", "devices": 5}),
        ("one emotion per device", {"partition": "emotion"}),
        ("one emotion per device, FedAdam", {"partition": "emotion", "server_optimizer": "fedadam",
                                             "server_lr": 0.05}),
        ("by speaker, attack, FedAvg", {"partition": "speaker", "attack_fraction": 0.125, "attack": "scale"}),
        ("by speaker, attack, median", {"partition": "speaker", "attack_fraction": 0.125, "attack": "scale",
                                        "aggregation": "median"}),
        ("by speaker, attack, clip 1.0", {"partition": "speaker", "attack_fraction": 0.125, "attack": "scale",
                                          "clip_norm": 1.0}),
        ("by speaker, thumbs-down only", {"partition": "speaker", "down_rate": 1.0}),
    ] + [(f"random split ({n})", {"partition": "random", "devices": n}) for n in (2, 10, 16)]


def main(argv: list[str] | None = None) -> int:
    from tools.simulate import SimConfig, Simulation

    parser = argparse.ArgumentParser(prog="python -m tools.sim_suite", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/suite"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--architecture", default="cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-actors", default="1,2,3,4", help="actors that train the shared encoder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base_cfg = SimConfig(rounds=args.rounds, architecture=args.architecture, seed=args.seed,
                         server_actors=tuple(int(a) for a in args.server_actors.split(",") if a))
    started = time.perf_counter()
    # the shared encoder, trained once on the server-side actors
    from models.datasets import default_ravdess_root, ravdess_clips

    root = default_ravdess_root()
    if root is None:
        raise SystemExit("the suite needs RAVDESS ($FEDSER_RAVDESS or ../shared/data/ravdess)")
    base_dir = Simulation(replace(base_cfg, rounds=0), args.out / "base").baseline(ravdess_clips(root))
    results = {}
    for name, over in _setups({}):
        cfg = replace(base_cfg, base_model=str(base_dir), **over)
        out = args.out / name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        t0 = time.perf_counter()
        report = Simulation(cfg, out).run()
        report["seconds"] = time.perf_counter() - t0
        results[name] = report
        best = max(h["global"]["uar"] for h in report["history"])
        print(f"{name:36s} final UAR {report['final']['uar']:.3f}  best {best:.3f}"
              f"  centralised head {report['centralised_head'].get('uar', float('nan')):.3f}  "
              f"({report['seconds']:.0f} s)", flush=True)
    write_suite(results, args.out, time.perf_counter() - started, base_cfg.server_actors)
    print((args.out / "report.md").read_text())
    return 0


def write_suite(results: dict, out: Path, seconds: float, server_actors=(1, 2, 3, 4)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.report import confusion_png

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, r in results.items():
        if name.startswith("random split (") and name != "random split (5)":
            continue
        ax.plot([h["round"] for h in r["history"]], [h["global"]["uar"] for h in r["history"]], marker=".",
                label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("global UAR, held-out actors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "uar-per-round.png")
    plt.close(fig)
    sweep = sorted((r["devices"]["senders"], r["final"]["uar"]) for n, r in results.items()
                   if n.startswith("random split"))
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    ax.plot([n for n, _ in sweep], [u for _, u in sweep], marker="o")
    ax.set_xlabel("devices (random equal splits)")
    ax.set_ylabel("final global UAR")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "uar-vs-devices.png")
    plt.close(fig)
    labels = ["angry", "happy", "neutral", "sad"]
    for name in ("by speaker", "one emotion per device"):
        if name in results:
            f = results[name]["final"]
            confusion_png({"confusion_matrix": f["confusion_matrix"], "labels": labels, "uar": f["uar"],
                           "accuracy": f["accuracy"]}, out / f"confusion-{name.replace(' ', '-')}.png",
                          title=f"{name}: UAR {f['uar']:.3f}")
    lines = ["# Federated experiments on RAVDESS, 4 classes (real devices and aggregator over HTTP)", "",
             f"Encoder trained centrally on server-side actors {','.join(map(str, server_actors))} and shared; heads "
             "federated. Test actors 21-24 "
             "never train. 'centralised head' = the same encoder, a head trained centrally on the same clips.", "",
             "| setup | devices | final UAR | best UAR | centralised head UAR | final / centralised | accuracy | "
             "macro-F1 | F1 angry | F1 happy | F1 neutral | F1 sad | time (s) |",
             "| --- " * 13 + "|"]
    for name, r in results.items():
        f, c = r["final"], r["centralised_head"]
        best = max(h["global"]["uar"] for h in r["history"])
        lines.append(f"| {name} | {r['devices']['senders']} | {f['uar']:.3f} | {best:.3f} | {c.get('uar', 0):.3f} | "
                     f"{f['uar'] / c['uar'] if c.get('uar') else float('nan'):.2f} | {f['accuracy']:.3f} | "
                     f"{f['macro_f1']:.3f} | " + " | ".join(f"{f['f1'][lab]:.2f}" for lab in labels)
                     + f" | {r['seconds']:.0f} |")
    lines += ["", "Personalisation (test actors' devices, their own later clips; global head vs personalised):", "",
              "| setup | answers per device | global acc | personal acc | gain (points) |", "| --- " * 5 + "|"]
    for name in ("by speaker", "by speaker, thumbs-down only"):
        if name in results:
            p = results[name]["personalisation"]
            answers = [d["answers"] for d in p["per_device"] if d["group"] == "test"]
            lines.append(f"| {name} | {int(np.mean(answers)) if answers else 0} | {p['test_speakers_global']:.3f} | "
                         f"{p['test_speakers_personal']:.3f} | {100 * p['test_speakers_mean_gain']:+.1f} |")
    r = results.get("by speaker")
    if r:
        t = r["timing"]
        lines += ["", f"By-speaker run: {r['seconds']:.0f} s in all; features+inference {t['features_infer']:.1f} s, "
                      f"device training {t['device_training']:.1f} s, HTTP {t['http']:.1f} s, aggregation "
                      f"{t['aggregation']:.1f} s, evaluation {t['evaluation']:.1f} s."]
    lines += ["", f"Suite time: {seconds:.0f} s. Plots: uar-per-round.png, uar-vs-devices.png, confusion-*.png."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
