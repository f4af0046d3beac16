"""The federated experiments of the studies, with the real SDK and aggregator: one command, one report.

    python -m tools.sim_suite --out runs/suite [--architectures cnn,dnn,lstm,afcn] [--rounds 20]
    python -m tools.sim_suite --out runs/short --architectures cnn --rounds 3 --short   # what the demo runs

For each architecture: the encoder is trained once on the server-side actors and the reference once centrally
(encoder and head, every training actor), then ``tools.simulate`` runs federated by speaker, random equal splits
and one emotion per device. For the first architecture also: one emotion per device with plain FedAvg and with
server optimizers; an attack run (a tenth of the devices send scaled or sign-flipped deltas) with plain FedAvg and
the robust options, and one where the attackers also claim 10^6 examples (the aggregator's default weight caps, and
with the caps off); users who only answer thumbs-up/down; and a sweep of the number of devices. Writes
``report.md``, ``report.json`` and plots; the set-up of every run is in ``<out>/<run>/report.json``.

    python -m tools.sim_suite --scenario recovery --seeds 0,1,2 --out runs/recovery \
        --report docs/results/federated-recovery

``--scenario recovery``: federated recovery of a new population (``tools.simulate --scenario recovery``): the
RAVDESS-only base, the six non-test nEMO speakers as devices, global UAR on nEMO IC0, MK0, TP0 after every round,
over several seeds (the device answer orders and sampling; the base model and the centralised reference are
fixed), for each set-up of ``RECOVERY_SETUPS``; mean ± standard error per round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

LABELS = ["angry", "happy", "neutral", "sad"]

# One emotion per device: a "device" is then every actor's clips of one emotion. Without the model's replay set
# each device's head learns "always my emotion" and FedAvg collapses; the extra runs show it with the replay
# set off, and with features that need no per-user statistics (each utterance normalised by its own mean and
# variance, then by the training set's statistics).
ONE_EMOTION = {"partition": "emotion"}
UTTERANCE_NORM = {"speaker_norm": False, "utterance_norm": "meanvar"}


def per_architecture_setups() -> list[tuple[str, dict]]:
    return [("federated by speaker", {"partition": "speaker"}),
            ("federated, random split (5)", {"partition": "random", "devices": 5}),
            ("federated, one emotion per device", {**ONE_EMOTION})]


# The attackers send sign-flipped deltas and claim the most examples an update may (edge_sdk.wire's
# MAX_NUM_EXAMPLES): with the example count as the FedAvg weight, uncapped, they would be the whole round. The
# aggregator runs on its default settings (its update norm limit too); "caps off" turns the weight caps off.
INFLATED = {"partition": "speaker", "attack_fraction": 0.1, "attack": "signflip", "attack_examples": 1_000_000,
            "max_update_norm": 100.0}


def extra_setups(short: bool) -> list[tuple[str, dict]]:
    inflated = ("attack (sign flip, 10^6 examples claimed), FedAvg defaults", INFLATED)
    if short:
        return [("attack (scale x20), FedAvg", {"partition": "speaker", "attack_fraction": 0.1}),
                ("attack (scale x20), median", {"partition": "speaker", "attack_fraction": 0.1,
                                                "aggregation": "median"}),
                inflated]
    attacks = [(f"attack ({kind}), {label}", {"partition": "speaker", "attack_fraction": 0.1, "attack": attack, **over})
               for kind, attack in (("scale x20", "scale"), ("sign flip", "signflip"))
               for label, over in (("FedAvg", {}), ("median", {"aggregation": "median"}),
                                   ("trimmed mean", {"aggregation": "trimmed_mean"}),
                                   ("clip 1.0", {"clip_norm": 1.0}))]
    return [("one emotion per device, no replay set", {**ONE_EMOTION, "replay_weight": 0.0}),
            ("one emotion per device, no replay set, FedAdam 0.01", {**ONE_EMOTION, "replay_weight": 0.0,
                                                                     "server_optimizer": "fedadam",
                                                                     "server_lr": 0.01}),
            ("one emotion per device, no replay set, utterance-normalised",
             {**ONE_EMOTION, **UTTERANCE_NORM, "replay_weight": 0.0}),
            ("one emotion per device, utterance-normalised", {**ONE_EMOTION, **UTTERANCE_NORM}),
            ("by speaker, no replay set", {"partition": "speaker", "replay_weight": 0.0}),
            *attacks,
            inflated,
            ("attack (sign flip, 10^6 examples claimed), FedAvg, caps off",
             {**INFLATED, "max_examples_weight": 0.0, "max_examples_weight_over_median": 0.0}),
            ("by speaker, thumbs-up/down only", {"partition": "speaker", "down_rate": 1.0}),
            *[(f"random split ({n})", {"partition": "random", "devices": n}) for n in (2, 10, 20)]]


# The recovery scenario's users: they answer every prediction they hear (answers_per_round per round); a
# wrong_rate share of answers is wrong (a careless tap); a wrong prediction gets a correction, or a bare
# thumbs-down with probability down_rate.
RECOVERY_USERS = {"scenario": "recovery", "partition": "speaker", "answers_per_round": 10, "wrong_rate": 0.05,
                  "down_rate": 0.3, "later_fraction": 0.3}


def recovery_setups() -> list[tuple[str, dict]]:
    return [("head only, FedAvg", {}),
            ("head only, FedAvg, 20 answers per round, no replay set", {"answers_per_round": 20,
                                                                       "replay_weight": 0.0}),
            ("head only, FedAvgM (server lr 1, momentum 0.9)", {"server_optimizer": "fedavgm"}),
            ("head only, FedAdam (server lr 0.05)", {"server_optimizer": "fedadam", "server_lr": 0.05}),
            ("head only, FedAvg, 20 answers per round, no replay set, 10 local epochs",
             {"answers_per_round": 20, "replay_weight": 0.0, "local_epochs": 10}),
            ("head only, FedAvg, 10 local epochs", {"local_epochs": 10}),
            ("head only, FedAvg, 20 answers per round, no replay set, 5 local epochs",
             {"answers_per_round": 20, "replay_weight": 0.0, "local_epochs": 5})]


def main(argv: list[str] | None = None) -> int:
    from models.datasets import default_ravdess_root, ravdess_clips
    from tools.simulate import SimConfig, Simulation

    parser = argparse.ArgumentParser(prog="python -m tools.sim_suite", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/suite"))
    parser.add_argument("--architectures", default="cnn,dnn,lstm,afcn")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the centrally trained models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-actors", default="1,2,3,4,5,6,7,8,9,10", help="actors that train the encoder")
    parser.add_argument("--short", action="store_true", help="the demo's version: three attack runs, no sweeps")
    parser.add_argument("--folds", type=int, default=0,
                        help="instead: rotate the 24 actors through N folds (4 test actors each, the next 10 train "
                             "the encoder) and run by speaker and one emotion per device in each (error bars)")
    parser.add_argument("--scenario", choices=("ravdess", "recovery"), default="ravdess",
                        help="recovery: RAVDESS-only base, nEMO users as devices (see the module docstring)")
    parser.add_argument("--seeds", default="0,1,2", help="recovery: seeds of the device answer orders")
    parser.add_argument("--setups", default="",
                        help="recovery: comma-separated indexes into RECOVERY_SETUPS (default: all)")
    parser.add_argument("--base-model", default=None, help="recovery: the base model's folder (default: the "
                        "RAVDESS-only model, docs/results/cross-corpus/ravdess-only)")
    parser.add_argument("--centralised-model", default=None,
                        help="recovery: a trained reference's folder instead of training it")
    parser.add_argument("--report", type=Path, default=None,
                        help="recovery: where report.md, report.json and uar-per-round.png go (default --out)")
    parser.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=True,
                        help="recovery: also measure what head-only (and head + shared adapter) could reach")
    parser.add_argument("--ceiling-epochs", type=int, default=30)
    parser.add_argument("--adapter-lr", type=float, default=0.05, help="recovery ceilings: the adapter's SGD rate")
    parser.add_argument("--ceilings-only", action="store_true",
                        help="recovery: only measure the ceilings of --base-model (ceilings.md, ceilings.json)")
    parser.add_argument("--report-only", action="store_true",
                        help="recovery: rewrite the report from the runs already in --out (no run)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="recovery: override a SimConfig field for every run (e.g. answers_per_round=20)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.scenario == "recovery":
        return run_recovery(args, argv if argv is not None else sys.argv[1:])
    root = default_ravdess_root()
    if root is None:
        raise SystemExit("the suite needs RAVDESS ($FEDSER_RAVDESS or ../shared/data/ravdess)")
    clips = ravdess_clips(root)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    architectures = [a for a in args.architectures.split(",") if a]
    if args.folds:
        return run_folds(args, clips, architectures)
    for i, arch in enumerate(architectures):
        base_cfg = SimConfig(rounds=args.rounds, architecture=arch, seed=args.seed, epochs=args.epochs,
                             server_actors=tuple(int(a) for a in args.server_actors.split(",") if a))
        models: dict[tuple, tuple[str, str]] = {}  # feature set-up -> (encoder dir, centralised dir)
        setups = per_architecture_setups() + (extra_setups(args.short) if i == 0 else [])
        for name, over in setups:
            cfg = replace(base_cfg, **over)
            key = (cfg.speaker_norm, cfg.utterance_norm)
            if key not in models:  # the encoder and the centralised reference, trained once per feature set-up
                folder = "models" + ("" if cfg.speaker_norm else "-global-norm") + (
                    "" if cfg.utterance_norm == "none" else f"-utterance-{cfg.utterance_norm}")
                sim = Simulation(replace(cfg, rounds=0), args.out / arch / folder)
                models[key] = (str(sim.baseline(clips)), str(sim.centralised_model(clips)))
            base, central = models[key]
            cfg = replace(cfg, base_model=base, centralised_model=central)
            out = args.out / arch / name.replace(" ", "-").translate(str.maketrans("", "", ",()/."))
            t0 = time.perf_counter()
            report = Simulation(cfg, out).run()
            report["seconds"] = time.perf_counter() - t0
            report["architecture"] = arch
            report["centralised_seconds"] = json.loads((Path(central) / "report.json").read_text()).get(
                "train_seconds")
            results[f"{arch}: {name}"] = report
            print(f"{arch:5s} {name:58s} final UAR {report['final']['uar']:.3f}  centralised "
                  f"{report['centralised']['uar']:.3f}  ({report['seconds']:.0f} s)", flush=True)
    write_suite(results, args.out, time.perf_counter() - started, architectures)
    print((args.out / "report.md").read_text())
    return 0


MODEL_RATE = "the model's device rate (0.05 without one)"


def _override(text: str) -> tuple[str, object]:
    from tools.simulate import SimConfig, option_type

    name, _, value = text.partition("=")
    defaults = SimConfig().to_dict()
    if name not in defaults or not value:
        raise SystemExit(f"--set {text!r}: NAME=VALUE with NAME one of {', '.join(defaults)}")
    default = defaults[name]
    if isinstance(default, bool):
        return name, value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, list):
        return name, tuple(int(x) for x in value.split(",") if x)
    typ = option_type(name)  # X | None fields take an X (local_lr: a number)
    try:
        return name, typ(value)
    except ValueError:
        raise SystemExit(f"--set {text!r}: {name} takes a {typ.__name__}") from None


def run_recovery(args, argv: list[str]) -> int:
    """The recovery scenario over seeds and set-ups; the base and the centralised reference are trained (or
    copied) once in ``<out>/models`` and shared by every run."""
    from tools.simulate import SimConfig, Simulation

    if args.ceilings_only:
        return ceilings_only(args, argv)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    setups = recovery_setups()
    if args.setups:
        setups = [setups[int(i)] for i in args.setups.split(",")]
    over = dict(_override(t) for t in args.set)
    base_cfg = SimConfig(**{**RECOVERY_USERS, "rounds": args.rounds, "epochs": args.epochs, "seed": 0,
                            "base_model": args.base_model, "centralised_model": args.centralised_model, **over})
    started = time.perf_counter()
    command = "python -m tools.sim_suite " + " ".join(argv)
    out = args.report or args.out
    out.mkdir(parents=True, exist_ok=True)
    limits = None
    if args.report_only:
        if (out / "report.json").is_file():  # the command that made the runs, and its time
            prior = json.loads((out / "report.json").read_text())
            command = prior.get("command", command)
            started -= prior.get("seconds", 0)
            limits = last_epoch_only(prior.get("ceilings"))
        base = central = ""
    else:
        models = Simulation(replace(base_cfg, rounds=0), args.out / "models")
        base, central = str(models.baseline([])), str(models.centralised_model([]))
        if args.ceilings:  # what head-only (and, where the base has it, head + shared adapter) could reach
            from tools.simulate import ceilings, recovery_clips

            _, test_clips, device_clips = recovery_clips()
            limits = last_epoch_only(ceilings(Path(base), device_clips, test_clips, epochs=args.ceiling_epochs,
                                              adapter_lr=args.adapter_lr))
            print(f"ceilings: {json.dumps({k: v['final'] for k, v in limits.items() if isinstance(v, dict)})}",
                  flush=True)
    runs: dict[str, list[dict]] = {}
    summary = {}
    for name, setup in setups:
        slug = name.replace(" ", "-").translate(str.maketrans("", "", ",()/."))
        for seed in seeds:
            run_dir = args.out / slug / f"seed-{seed}"
            if args.report_only:  # the runs' own reports, as they were written
                if (run_dir / "report.json").is_file():
                    report = json.loads((run_dir / "report.json").read_text())
                    report.setdefault("seconds", sum(v for v in report["timing"].values() if isinstance(v, float)))
                    runs.setdefault(name, []).append(report)
                continue
            cfg = replace(base_cfg, **setup, seed=seed, base_model=base, centralised_model=central)
            t0 = time.perf_counter()
            report = Simulation(cfg, run_dir).run()
            report["seconds"] = time.perf_counter() - t0
            (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
            runs.setdefault(name, []).append(report)
            print(f"{name:50s} seed {seed}: base {report['history'][0]['global']['uar']:.3f} -> round "
                  f"{report['history'][-1]['round']} {report['final']['uar']:.3f} (centralised "
                  f"{report['centralised']['uar']:.3f}; {report['seconds']:.0f} s)", flush=True)
        saved_split = args.out / "models" / "centralised-model" / "report.json"
        for report in runs.get(name, []):  # runs written before the reference's split was kept in them
            if "split" not in report["centralised"] and saved_split.is_file():
                split = json.loads(saved_split.read_text()).get("split") or {}
                report["centralised"]["split"] = {k: split[k] for k in ("train_speakers", "val_speakers")}
        if runs:
            summary = write_recovery(runs, out, command, time.perf_counter() - started,  # after every set-up
                                     limits)
    print((out / "report.md").read_text())
    return 0 if summary else 1


def last_epoch_only(limits: dict | None) -> dict | None:
    """The ceilings as reported: the UAR after the last of the fixed ``--ceiling-epochs`` only. The test
    speakers never select anything, so the best of the every-5-epochs test curve (``best``, ``curve``) is
    dropped rather than reported."""
    if not limits:
        return limits
    return {k: ({kk: vv for kk, vv in v.items() if kk not in ("best", "curve")} if isinstance(v, dict) else v)
            for k, v in limits.items()}


def ceilings_only(args, argv: list[str]) -> int:
    """What federating the head (and, where the base has the adapter signatures, the head and one shared
    adapter) could reach on the test speakers after the fixed number of epochs (no epoch is chosen on them):
    ``<report>/ceilings.md`` and ``ceilings.json``."""
    from edge_sdk.model import ModelMetadata, TFLiteModel
    from tools.simulate import RECOVERY_BASE, _embeddings, _uar, ceilings, recovery_clips

    base = Path(args.base_model or RECOVERY_BASE)
    _, test_clips, device_clips = recovery_clips()
    meta = ModelMetadata.load(base / "model.json")
    model = TFLiteModel(base / "model.tflite", meta)
    emb, y = _embeddings(model, meta, test_clips)
    base_uar = _uar(model, model.get_weights(), emb, y)["uar"]
    limits = last_epoch_only(ceilings(base, device_clips, test_clips, epochs=args.ceiling_epochs,
                                      adapter_lr=args.adapter_lr))
    limits.update({"base_model": str(base), "base_dataset": meta.extra.get("dataset"), "base_uar": base_uar,
                   "adapter_lr": args.adapter_lr, "command": "python -m tools.sim_suite " + " ".join(argv)})
    out = args.report or args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceilings.json").write_text(json.dumps(limits, indent=2))
    lines = ["# What federating a part of the model could reach (nEMO IC0, MK0, TP0)", "",
             f"Command: `{limits['command']}`.", "",
             f"Base: `{base}` ({limits['base_dataset']}), UAR on the test speakers {base_uar:.3f} (target base + "
             f"0.25 = {base_uar + 0.25:.3f}). Trained centrally on all {limits['train_clips']} clips of the six "
             f"device speakers with true labels (class-balanced, the model's own `train` / `adapter_train` "
             f"signatures, SGD: head lr {limits['lr']}, adapter lr {args.adapter_lr}, {limits['epochs']} epochs); "
             "the rest of the model frozen; UAR on the test speakers after the last epoch only (the epoch count "
             "is fixed in the command; the test speakers never choose an epoch).", "",
             f"| trained | UAR after epoch {limits['epochs']} |", "| --- | --- |"]
    for part in ("head", "head+adapter"):
        if part in limits:
            lines.append(f"| {part} | {limits[part]['final']:.3f} |")
    if "head+adapter" not in limits:
        lines.append("| head+adapter | the base has no adapter signatures |")
    (out / "ceilings.md").write_text("\n".join(lines) + "\n")
    print((out / "ceilings.md").read_text())
    return 0


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def write_recovery(runs: dict[str, list[dict]], out: Path, command: str, seconds: float,
                   limits: dict | None = None) -> dict:
    """report.json (per set-up: UAR per round, mean ± SE over seeds; targets), report.md and uar-per-round.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(runs.values()))[0]
    cfg = first["config"]
    deep = bool(first.get("trainable_embedding"))  # the base's embedding layer is in the trainable head
    part = "embedding layer + head" if deep else "head"
    base = first["history"][0]["global"]["uar"]
    central = first["centralised"]
    summary: dict = {"command": command, "seconds": round(seconds), "base_uar": base,
                     "base_model": first["base_model"], "centralised": central,
                     "test_speakers": first["test_speakers"], "device_speakers": first["device_speakers"],
                     "test_clips": first["test_clips"],
                     "targets": {"uar_at_least": base + 0.25, "of_centralised_at_least": 0.9},
                     "ceilings": limits, "head_layout": first.get("head_layout"),
                     "update_bytes": first.get("update_bytes"), "trainable_embedding": deep, "setups": {}}
    for name, reports in runs.items():
        rounds = [h["round"] for h in reports[0]["history"]]
        per_round = [_mean_se([r["history"][i]["global"]["uar"] for r in reports]) for i in range(len(rounds))]
        final, final_se = per_round[-1]
        head_ref = _mean_se([r["centralised_head"]["uar"] for r in reports])
        pers = [r["personalisation"] for r in reports]
        summary["setups"][name] = {
            "seeds": [r["config"]["seed"] for r in reports], "config": reports[0]["config"],
            "rounds": rounds, "uar_mean": [m for m, _ in per_round], "uar_se": [e for _, e in per_round],
            "final_uar": final, "final_se": final_se,
            "final_by_seed": [r["final"]["uar"] for r in reports],
            "final_recall": {lab: _mean_se([r["final"]["confusion_matrix"][i][i] / max(1, sum(
                r["final"]["confusion_matrix"][i])) for r in reports])[0] for i, lab in enumerate(LABELS)},
            "answers_per_device": float(np.mean([d["answers"] for p in pers for d in p["per_device"]])),
            "gain_over_base": final - base, "share_of_centralised": final / central["uar"],
            "centralised_head_uar": head_ref[0], "centralised_head_se": head_ref[1],
            "device_personalisation_gain": _mean_se([p["mean_gain"] for p in pers
                                                     if p["mean_gain"] is not None] or [0]),
            "met": {"gain": final - base >= 0.25, "centralised": final >= 0.9 * central["uar"]},
            "seconds_per_run": float(np.mean([r["seconds"] for r in reports]))}
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))

    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    for name, s in summary["setups"].items():
        m, e = np.array(s["uar_mean"]), np.array(s["uar_se"])
        ax.plot(s["rounds"], m, marker=".", lw=1.2, label=f"federated: {name}")
        ax.fill_between(s["rounds"], m - e, m + e, alpha=0.2)
    ax.axhline(base, color="grey", ls=":", lw=1, label=f"base (RAVDESS only) {base:.3f}")
    ax.axhline(central["uar"], color="black", ls="--", lw=1, label=f"centralised reference {central['uar']:.3f}")
    ax.axhline(base + 0.25, color="tab:red", ls="-.", lw=0.8, label="target: base + 0.25")
    ax.axhline(0.9 * central["uar"], color="tab:purple", ls="-.", lw=0.8, label="target: 90 % of the reference")
    if limits and "head" in limits:
        ax.axhline(limits["head"]["final"], color="tab:green", ls=":", lw=1,
                   label=f"head-only ceiling (true labels, last epoch) {limits['head']['final']:.3f}")
    ax.set_xlabel("round")
    ax.set_ylabel("global UAR, nEMO IC0, MK0, TP0")
    ax.set_ylim(min(0.3, base - 0.05), max(0.75, central["uar"] + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"Federated recovery on nEMO: mean ± SE over {len(next(iter(runs.values())))} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "uar-per-round.png")
    plt.close(fig)

    n_seeds = len(next(iter(runs.values())))
    lines = ["# Federated recovery of a new population (nEMO users, RAVDESS-only base)", "",
             f"Command: `{command}` ({seconds / 60:.0f} min on this machine).", "",
             f"- base: {first['base_model']} ("
             + ("encoder frozen up to its pooled vector, its embedding layer in the trainable head" if deep
                else "frozen encoder") + f"); UAR on the test speakers **{base:.3f}**;",
             f"- devices: one real `edge_sdk.Device` per nEMO speaker {', '.join(first['device_speakers'])}, all "
             "sending, against a real gunicorn aggregator over HTTP on loopback;",
             f"- test speakers (never train, never validate, never a device): {', '.join(first['test_speakers'])} "
             f"({first['test_clips']} clips); UAR of the global model after every round;",
             f"- users: {cfg['answers_per_round']} answers per device per round, {cfg['rounds']} rounds; thumbs-up "
             f"when right; when wrong a correction, or a bare thumbs-down (rate {cfg['down_rate']}); a "
             f"{cfg['wrong_rate']} share of answers is wrong (careless taps); {int(100 * cfg['later_fraction'])} % of "
             "each device's clips are never answered (they measure personalisation);",
             f"- devices fine-tune the {part} ({cfg['local_epochs']} epochs, lr {cfg['local_lr'] or MODEL_RATE}, "
             "replay weight "
             f"{cfg['replay_weight']}) and send its deltas"
             + (f" ({len(first['head_layout'])} arrays, {first['update_bytes']:,} bytes an update)"
                if first.get("head_layout") else "") + f"; seeds {', '.join(map(str, first_seeds(runs)))} change "
             "the answer orders and sampling; the base and the reference are fixed;",
             f"- **centralised reference**: {central['dataset']}: {_split_text(central.get('split'))}; the same "
             "architecture and feature recipe as the base (`fedser-train train --corpus ravdess,nemo`, the bundled "
             f"model's recipe), trained once, scored on the test speakers through the device path: "
             f"**{central['uar']:.3f}**;",
             f"- centralised {part}: the base's frozen part with its {part} trained centrally (30 epochs) on the "
             f"clips each device's user may answer (true labels): what federating the {part} on those answers "
             "could reach at best.", "",
             f"Targets after {cfg['rounds']} rounds: UAR >= base + 0.25 = **{base + 0.25:.3f}** and >= 90 % of the "
             f"centralised reference = **{0.9 * central['uar']:.3f}**.", "",
             f"| set-up | round 0 | round 5 | round 10 | round {cfg['rounds']} (mean ± SE, {n_seeds} seeds) | gain | "
             "of centralised | centralised head | answers per device | targets |",
             "| --- " * 10 + "|"]

    def at(s, r):
        if r not in s["rounds"]:
            return "-"
        i = s["rounds"].index(r)
        return f"{s['uar_mean'][i]:.3f} ± {s['uar_se'][i]:.3f}"

    for name, s in summary["setups"].items():
        met = s["met"]
        lines.append(f"| {name} | {at(s, 0)} | {at(s, 5)} | {at(s, 10)} | **{s['final_uar']:.3f} ± "
                     f"{s['final_se']:.3f}** | {s['gain_over_base']:+.3f} | {100 * s['share_of_centralised']:.0f} % "
                     f"| {s['centralised_head_uar']:.3f} | "
                     f"{s['answers_per_device']:.0f} | "
                     f"gain {'met' if met['gain'] else 'MISSED'}, 90 % {'met' if met['centralised'] else 'MISSED'} |")
    target = max(base + 0.25, 0.9 * central["uar"])
    ceiling = max([s["centralised_head_uar"] for s in summary["setups"].values()]
                  + ([limits["head"]["final"]] if limits else []))
    best = max(summary["setups"].items(), key=lambda kv: kv[1]["final_uar"])
    summary["head_only_ceiling"] = ceiling
    ceiling_text = (
        f"Ceiling of the {part}: the base's frozen part with its {part} trained centrally on every device's clips "
        f"(true labels) reaches {ceiling:.3f}; both targets need {target:.3f}. "
        + (f"So federating the {part} cannot meet them here." if ceiling < target else
           f"The ceiling is above the targets: federating the {part} could meet them.")) if deep else (
        f"Head-only ceiling: the base's frozen encoder with a head trained centrally on every device's clips "
        f"(true labels) reaches {ceiling:.3f}; both targets need {target:.3f}. "
        + ("So head-only federation cannot meet them, whatever the server optimizer, answer count or device "
           "policy: what is missing is the encoder's features for the new population (the reference, whose "
           f"encoder trained on these speakers, reaches {central['uar']:.3f})." if ceiling < target else
           "The ceiling is above the targets: head-only federation could meet them."))
    lines += ["", f"Best set-up: {best[0]}, {best[1]['final_uar']:.3f} ± {best[1]['final_se']:.3f} after "
              f"{cfg['rounds']} rounds ({best[1]['gain_over_base']:+.3f} over the base, "
              f"{100 * best[1]['share_of_centralised']:.0f} % of the reference).", ceiling_text]
    if limits:
        lines += ["", f"Ceilings measured once ({limits['train_clips']} clips of the six device speakers, true "
                      f"labels, {limits['epochs']} epochs of the model's own training signatures, SGD lr "
                      f"{limits['lr']}; UAR on the test speakers after the last epoch only: the test speakers "
                      "never choose an epoch):", "",
                  "| what is trained (the rest frozen) | UAR, last epoch |", "| --- | --- |"]
        for part in ("head", "head+adapter"):
            if part in limits:
                lines.append(f"| {part} | {limits[part]['final']:.3f} |")
        if "head+adapter" not in limits:
            lines.append("| head + shared adapter | not measured: the base has no adapter signatures |")
    lines += ["", "Final recall per class (mean over seeds):", "",
              "| set-up | " + " | ".join(LABELS) + " |", "| --- " * 5 + "|"]
    lines += [f"| {name} | " + " | ".join(f"{s['final_recall'][lab]:.2f}" for lab in LABELS) + " |"
              for name, s in summary["setups"].items()]
    lines += ["", "UAR per round (mean ± SE): report.json `setups.*.uar_mean` / `uar_se`; plot: "
              "[uar-per-round.png](uar-per-round.png)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def _split_text(split: dict | None) -> str:
    if not split:
        return "its split is in its report.json"
    return (f"trained on {', '.join(split['train_speakers'])}; validated on {', '.join(split['val_speakers'])}; "
            "the test speakers held out")


def first_seeds(runs: dict[str, list[dict]]) -> list[int]:
    return [r["config"]["seed"] for r in next(iter(runs.values()))]


def run_folds(args, clips, architectures: list[str]) -> int:
    """By speaker and one emotion per device on rotated test actors: each fold's 4 test actors never train, the
    next 10 actors (cyclically) train the encoder, and all 20 non-test actors have a sending device."""
    from tools.simulate import SimConfig, Simulation

    actors = sorted({int(c.speaker.rsplit("-", 1)[1]) for c in clips})
    if args.folds < 2 or 4 * args.folds > len(actors):
        raise SystemExit(f"--folds must be 2..{len(actors) // 4} (4 test actors per fold)")
    rows = []
    started = time.perf_counter()
    for arch in architectures:
        for k in range(args.folds):
            test = tuple(actors[4 * k: 4 * k + 4])
            rest = actors[4 * k + 4:] + actors[: 4 * k]
            server = tuple(sorted(rest[:10]))
            cfg = SimConfig(rounds=args.rounds, architecture=arch, seed=args.seed, epochs=args.epochs,
                            test_actors=test, server_actors=server)
            sim = Simulation(replace(cfg, rounds=0), args.out / arch / f"fold-{k}" / "models")
            base, central = str(sim.baseline(clips)), str(sim.centralised_model(clips))
            row = {"architecture": arch, "fold": k, "test_actors": list(test), "server_actors": list(server)}
            for name, partition in (("by_speaker", "speaker"), ("one_emotion", "emotion")):
                report = Simulation(replace(cfg, partition=partition, base_model=base, centralised_model=central),
                                    args.out / arch / f"fold-{k}" / name).run()
                row[name] = report["final"]["uar"]
                row["centralised"] = report["centralised"]["uar"]
            rows.append(row)
            print(f"{arch:5s} fold {k} test actors {test}: centralised {row['centralised']:.3f}, by speaker "
                  f"{row['by_speaker']:.3f}, one emotion {row['one_emotion']:.3f}", flush=True)
    lines = ["# By speaker and one emotion per device on rotated test actors (RAVDESS, 4 classes)", "",
             f"{args.folds} folds: each fold's 4 test actors never train; the next 10 actors (cyclically) train the "
             f"encoder (the highest of them validates); all 20 non-test actors have a sending device; {args.rounds} "
             "rounds; centralised = the same architecture trained centrally on the 20 non-test actors.", "",
             "| architecture | fold | test actors | centralised UAR | by speaker | gap (points) | one emotion | "
             "one emotion / centralised |", "| --- " * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['fold']} | {','.join(map(str, r['test_actors']))} | "
                     f"{r['centralised']:.3f} | {r['by_speaker']:.3f} | "
                     f"{100 * (r['by_speaker'] - r['centralised']):+.1f} | {r['one_emotion']:.3f} | "
                     f"{100 * r['one_emotion'] / r['centralised']:.0f} % |")
    lines += ["", "| architecture | centralised UAR | by speaker | gap (points) | one emotion / centralised |",
              "| --- " * 5 + "|"]
    for arch in architectures:
        mine = [r for r in rows if r["architecture"] == arch]
        c, b, e = (np.array([r[k] for r in mine]) for k in ("centralised", "by_speaker", "one_emotion"))
        gap, ratio = 100 * (b - c), 100 * e / c
        lines.append(f"| {arch} | {c.mean():.3f} ± {c.std():.3f} | {b.mean():.3f} ± {b.std():.3f} | "
                     f"{gap.mean():+.1f} ± {gap.std() / np.sqrt(len(gap)):.1f} (standard error) | "
                     f"{ratio.mean():.0f} % ± {ratio.std() / np.sqrt(len(ratio)):.0f} |")
    lines += ["", f"Time: {time.perf_counter() - started:.0f} s."]
    (args.out / "folds.md").write_text("\n".join(lines) + "\n")
    (args.out / "folds.json").write_text(json.dumps(rows, indent=2))
    print((args.out / "folds.md").read_text())
    return 0


def _row(name: str, m: dict, seconds) -> str:
    return (f"| {name} | {m['accuracy']:.3f} | {m['uar']:.3f} | {m['macro_f1']:.3f} | "
            + " | ".join(f"{m['f1'][lab]:.2f}" for lab in LABELS)
            + (f" | {seconds:.0f} |" if isinstance(seconds, int | float) else " | - |"))


def write_suite(results: dict, out: Path, seconds: float, architectures: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.report import confusion_png

    header = ["| setup | accuracy | UAR | macro-F1 | " + " | ".join(f"F1 {lab}" for lab in LABELS) + " | time (s) |",
              "| --- " * 9 + "|"]
    any_run = next(iter(results.values()))
    cfg = any_run["config"]
    lines = ["# Federated experiments on RAVDESS, 4 classes (real devices and aggregator over HTTP on loopback)", "",
             f"- test actors {', '.join(map(str, cfg['test_actors']))} never train; every figure is on their clips;",
             f"- the encoder is trained centrally on the server-side actors {','.join(map(str, cfg['server_actors']))} "
             f"(validation: actor {max(cfg['server_actors'])}) and frozen; the devices federate the head from their "
             "users' answers;",
             "- **centralised** = the same architecture trained centrally, encoder and head, on every training "
             "actor's clips (1-20, the same validation actor);",
             f"- {cfg['rounds']} rounds, {cfg['answers_per_round']} answers per device per round, "
             f"{cfg['local_epochs']} local epochs, users correct a wrong prediction or (rate {cfg['down_rate']}) "
             "answer a bare thumbs-down;",
             "- by speaker: one device per actor (actors 1-20 send updates; the test actors' 4 devices only "
             "personalise), 24 devices; features normalised by each speaker's statistics (the device's running "
             "statistics of its user);",
             "- one emotion per device: a device holds every actor's clips of one emotion (4 devices sending, and "
             "the test actors' 4);",
             "- devices fine-tune with the model's replay set (32 embeddings per class of the server-side actors' "
             "clips) in a quarter of each batch, weight 0.25, unless a run says 'no replay set'.", ""]
    for arch in architectures:
        rows = {n.split(": ", 1)[1]: r for n, r in results.items() if r["architecture"] == arch}
        if not rows:
            continue
        first = next(iter(rows.values()))
        lines += [f"## {arch}", "", *header, _row("centralised", first["centralised"], first["centralised_seconds"])]
        for name, r in rows.items():
            if name.startswith("federated"):
                if r["config"]["utterance_norm"] != first["config"]["utterance_norm"]:
                    lines.append(_row("centralised, utterance-normalised features", r["centralised"],
                                      r["centralised_seconds"]))
                lines.append(_row(name, r["final"], r["seconds"]))
        spk = rows.get("federated by speaker")
        emo = rows.get("federated, one emotion per device")
        if spk:
            gap = 100 * (spk["final"]["uar"] - spk["centralised"]["uar"])
            lines += ["", f"By speaker: {gap:+.1f} UAR points against centralised (target: at most 3 below)."]
        if emo:
            lines.append(f"One emotion per device: {100 * emo['final']['uar'] / emo['centralised']['uar']:.0f} % of "
                         "centralised UAR (target: at least 85 %).")
        lines.append("")
    first_arch = architectures[0]
    extras = {n.split(": ", 1)[1]: r for n, r in results.items()
              if r["architecture"] == first_arch and not n.split(": ", 1)[1].startswith("federated")}
    if extras:
        lines += [f"## More runs ({first_arch})", "", *header]
        lines += [_row(n, r["final"], r["seconds"]) for n, r in extras.items()]
        clean = results.get(f"{first_arch}: federated by speaker")
        if clean:
            lines += ["", f"Clean by-speaker run: UAR {clean['final']['uar']:.3f}. Under attack (target: a robust "
                          "option within 3 points of clean):", ""]
            for n, r in extras.items():
                if n.startswith("attack"):
                    lines.append(f"- {n}: {100 * (r['final']['uar'] - clean['final']['uar']):+.1f} points "
                                 f"(attackers: {', '.join(r['devices']['attackers'])})")
        lines.append("")
    # personalisation of the test actors' devices
    lines += ["## Personalisation of the test actors' devices", "",
              "Each test actor's device answers its first clips, fine-tunes its head (guarded), then is scored on "
              "its later clips with the personalised head and with the global head.", "",
              "| run | answers per device | global accuracy | personal accuracy | gain (points) |", "| --- " * 5 + "|"]
    for name, r in results.items():
        p = r["personalisation"]
        if p["test_speakers_global"] is None or r["config"]["attack_fraction"]:
            continue
        answers = [d["answers"] for d in p["per_device"] if d["group"] == "test"]
        lines.append(f"| {name} | {int(np.mean(answers))} | {p['test_speakers_global']:.3f} | "
                     f"{p['test_speakers_personal']:.3f} | {100 * p['test_speakers_mean_gain']:+.1f} |")
    spk = results.get(f"{first_arch}: federated by speaker")
    if spk:
        t = spk["timing"]
        lines += ["", f"**Full by-speaker run ({first_arch}, 24 devices, {spk['config']['rounds']} rounds): "
                      f"{spk['seconds']:.0f} s** on this machine: features + inference {t['features_infer']:.1f} s, "
                      f"training on devices {t['device_training']:.1f} s, HTTP {t['http']:.1f} s, aggregation "
                      f"{t['aggregation']:.1f} s, evaluation {t['evaluation']:.1f} s (the encoder and the centralised "
                      "reference are trained once per architecture, before the runs)."]
    lines += ["", f"Suite time: {seconds:.0f} s. Plots: uar-per-round.png, uar-vs-devices.png, confusion-*.png."]

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, r in results.items():
        if r["architecture"] == first_arch and not name.split(": ", 1)[1].startswith("random split"):
            ax.plot([h["round"] for h in r["history"]], [h["global"]["uar"] for h in r["history"]], marker=".",
                    label=name.split(": ", 1)[1], lw=1)
    if spk:
        ax.axhline(spk["centralised"]["uar"], color="black", ls="--", lw=1, label="centralised")
    ax.set_xlabel("round")
    ax.set_ylabel("global UAR, held-out actors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "uar-per-round.png")
    plt.close(fig)
    sweep = sorted((r["devices"]["senders"], r["final"]["uar"]) for n, r in results.items()
                   if r["architecture"] == first_arch and "random split" in n)
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
        ax.plot([n for n, _ in sweep], [u for _, u in sweep], marker="o", label="random equal splits")
        if spk:
            ax.plot([spk["devices"]["senders"]], [spk["final"]["uar"]], marker="s", ls="", label="by speaker")
        ax.set_xlabel("devices sending updates")
        ax.set_ylabel("final global UAR")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "uar-vs-devices.png")
        plt.close(fig)
    for name, r in results.items():
        if r["architecture"] == first_arch and name.split(": ", 1)[1].startswith("federated"):
            f = r["final"]
            slug = name.split(": ", 1)[1].replace(" ", "-").translate(str.maketrans("", "", ",()"))
            confusion_png({"confusion_matrix": f["confusion_matrix"], "labels": LABELS, "uar": f["uar"],
                           "accuracy": f["accuracy"]},
                          out / f"confusion-{slug}.png",
                          title=f"{name}: UAR {f['uar']:.3f}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
