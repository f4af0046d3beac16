"""Does a device-side prior correction help users, balanced or not? Measured through the device path.

    nice -n 10 .venv/bin/python -m tools.prior_study --model edge_sdk/data/default_model.tflite \
        [--model docs/results/cross-corpus/ravdess-only/model.tflite] [--seeds 0-9] [--n0 20] \
        [--out docs/results/prior-correction]

Each named test speaker (RAVDESS 21-24, nEMO IC0, MK0, TP0; no model here ever trained on them) becomes a user
whose stream of clips follows a class mix: ``balanced``, ``neutral60`` (60 % neutral, the rest equal) or
``sad60``. nEMO streams are 150 clips drawn without replacement; RAVDESS actors have 28 clips (4 neutral), so their
80-clip streams reuse clips (each class's clips cycle in a new random order). The clips go through the device
path in stream order: edge_sdk's reader and features, the running per-speaker statistics the device keeps
(``SpeakerStats``, updated with each clip before it is classified), TFLiteModel.infer.

Corrections (edge_sdk/prior.py), each fitted on the posteriors of the first n clips the device has seen (n = 10,
20, 40) and scored on the rest of the stream, or fitted on and scored on the whole stream (n = all), or
``online`` (each clip corrected by what was fitted on the clips before it, from 10 clips on: what a device does):
``none``; ``uniform`` (mean corrected probabilities equal); ``em`` (Saerens-Latinne-Decaestecker EM estimate of
the user's prior; training prior uniform); ``*_shrunk`` (the bias times n / (n + n0)).

Scores per stream: accuracy (what this user sees) and UAR (mean recall of the classes in the scored part).
Summaries: mean over streams (speakers x seeds) with the standard error over streams, and the paired difference
from ``none`` with its standard error. Writes results.jsonl.gz (one JSON row per stream, method and n) and
summary.md into --out; ``--overview SEEN`` prints one table from them without recomputing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from edge_sdk.audio import load_audio
from edge_sdk.features import SpeakerStats, fit_frames, raw_features, trim_silence
from edge_sdk.model import ModelMetadata, TFLiteModel
from edge_sdk.prior import em_prior, estimate
from models.datasets import default_nemo_root, default_ravdess_root, load_corpus
from models.evaluate import metadata_path_for

SPEAKERS = ("21", "22", "23", "24", "IC0", "MK0", "TP0")
MIXES = {"balanced": None, "neutral60": "neutral", "sad60": "sad"}
SEEN = (10, 20, 40, "all", "online")


def _methods(n0: float) -> dict[str, tuple[str, float]]:
    return {"none": ("off", 0.0), "uniform": ("uniform", 0.0), "uniform_shrunk": ("uniform", n0),
            "em": ("em", 0.0), "em_shrunk": ("em", n0)}


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def mix_counts(mix: str, labels: list[str], length: int) -> dict[str, int]:
    heavy = MIXES[mix]
    if heavy is None:
        base = {lab: length // len(labels) for lab in labels}
    else:
        n_heavy = round(0.6 * length)
        rest = (length - n_heavy) // (len(labels) - 1)
        base = {lab: (n_heavy if lab == heavy else rest) for lab in labels}
    for lab in labels[: length - sum(base.values())]:
        base[lab] += 1
    return base


def draw_stream(by_class: dict[str, list[int]], counts: dict[str, int], rng: np.random.Generator,
                replace: bool) -> list[int]:
    """Clip indices of one user's stream: ``counts`` of each class, in random order. Without ``replace`` a class
    must have enough clips; with it, a class's clips cycle in a fresh random order each time round."""
    picks: list[int] = []
    for lab, k in counts.items():
        pool = by_class[lab]
        if not replace and k > len(pool):
            raise SystemExit(f"{k} {lab} clips wanted, {len(pool)} there")
        chosen: list[int] = []
        while len(chosen) < k:
            chosen += [pool[i] for i in rng.permutation(len(pool))]
        picks += chosen[:k]
    return [picks[i] for i in rng.permutation(len(picks))]


def device_posteriors(raws: list[np.ndarray], stream: list[int], model: TFLiteModel, meta: ModelMetadata) -> np.ndarray:
    """Posteriors of the stream's clips as a device computes them (running speaker statistics when the model
    uses them, updated with each clip before it is classified)."""
    cfg = meta.features
    stats = SpeakerStats(raws[stream[0]].shape[1])
    out = []
    for i in stream:
        if cfg.speaker_norm:
            stats.add(raws[i])
            norm = stats.normalization(meta.normalization)
        else:
            norm = meta.normalization
        out.append(model.infer(fit_frames(norm.apply(raws[i]), cfg.max_frames))[0])
    return np.array(out, np.float64)


def scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    acc = float(np.mean(pred == y))
    recalls = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return acc, float(np.mean(recalls))


def evaluate_stream(p: np.ndarray, y: np.ndarray, n0: float, min_online: int = 10) -> list[dict]:
    rows = []
    logp = np.log(np.maximum(p, 1e-12))
    for name, (method, shrink_n0) in _methods(n0).items():
        for seen in SEEN:
            if seen == "online":
                pred = np.argmax(logp, axis=1)
                for k in range(min_online, len(p)):
                    bias = estimate(p[:k], method, n0=shrink_n0)
                    pred[k] = int(np.argmax(logp[k] + bias))
                part = slice(0, len(p))
            elif seen == "all":
                bias = estimate(p, method, n0=shrink_n0)
                pred, part = np.argmax(logp + bias, axis=1), slice(0, len(p))
            else:
                if seen >= len(p):
                    continue
                bias = estimate(p[:seen], method, n0=shrink_n0)
                pred, part = np.argmax(logp + bias, axis=1), slice(seen, len(p))
            acc, uar = scores(y[part], pred[part])
            row = {"method": name, "seen": str(seen), "accuracy": acc, "uar": uar}
            if name == "none" and seen == "all":  # what the estimators start from, for the summary
                row["mean_probs"] = [round(float(v), 4) for v in p.mean(axis=0)]
                row["em_prior"] = [round(float(v), 4) for v in em_prior(p)]
                row["true_prior"] = [round(float(np.mean(y == c)), 4) for c in range(p.shape[1])]
            rows.append(row)
    return rows


def summarise(rows: list[dict]) -> str:
    """Markdown tables: per model, corpus and mix, mean (SE) of accuracy and UAR, and the paired difference from
    none, for each method and number of clips seen."""
    out = []
    key = lambda r: (r["model"], r["corpus"], r["mix"])  # noqa: E731
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    for (model, corpus, mix), rs in sorted(groups.items()):
        streams = sorted({(r["speaker"], r["seed"]) for r in rs})
        out.append(f"\n### {model} | {corpus} | {mix} ({len(streams)} streams)\n")
        whole = [r for r in rs if "em_prior" in r]
        for name, field in (("true class mix", "true_prior"), ("mean posterior", "mean_probs"),
                            ("EM prior estimate", "em_prior")):
            v = np.mean([r[field] for r in whole], axis=0)
            out.append(f"{name} (all clips, classes in the model's order): " + " ".join(f"{x:.2f}" for x in v)
                       + "  ")
        out.append("")
        out.append("| seen | method | accuracy | Δacc vs none | UAR | ΔUAR vs none |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        idx = {(r["speaker"], r["seed"], r["method"], r["seen"]): r for r in rs}
        methods = list(dict.fromkeys(r["method"] for r in rs))
        for seen in [str(s) for s in SEEN]:
            base = [idx.get((s, sd, "none", seen)) for s, sd in streams]
            if any(b is None for b in base):
                continue
            for m in methods:
                got = [idx[(s, sd, m, seen)] for s, sd in streams]
                cells = []
                for metric in ("accuracy", "uar"):
                    v = np.array([g[metric] for g in got])
                    d = v - np.array([b[metric] for b in base])
                    se = lambda a: a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else float("nan")  # noqa: E731
                    cells.append(f"{v.mean():.3f} ± {se(v):.3f}")
                    cells.append("" if m == "none" else f"{d.mean():+.3f} ± {se(d):.3f}")
                out.append(f"| {seen} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def overview(rows: list[dict], seen: str, methods: tuple[str, ...] = ("uniform", "uniform_shrunk", "em",
                                                                     "em_shrunk")) -> str:
    """One line per model, corpus and mix: ``none``'s accuracy and UAR, and each method's paired difference
    (mean ± SE over streams) at ``seen``."""
    idx = {(r["model"], r["corpus"], r["mix"], r["speaker"], r["seed"], r["method"]): r
           for r in rows if r["seen"] == seen}
    groups = sorted({k[:3] for k in idx})
    head = "| model | corpus | mix | none acc / UAR | " + " | ".join(f"{m} Δacc / ΔUAR" for m in methods) + " |"
    out = [head, "|" + " --- |" * (4 + len(methods))]
    for g in groups:
        streams = sorted({k[3:5] for k in idx if k[:3] == g})
        base = [idx[(*g, *s, "none")] for s in streams]
        cells = [f"{np.mean([b['accuracy'] for b in base]):.3f} / {np.mean([b['uar'] for b in base]):.3f}"]
        for m in methods:
            d = {metric: np.array([idx[(*g, *s, m)][metric] - b[metric] for s, b in zip(streams, base, strict=True)])
                 for metric in ("accuracy", "uar")}
            cells.append(" / ".join(f"{v.mean():+.3f} ± {v.std(ddof=1) / np.sqrt(len(v)):.3f}" for v in d.values()))
        out.append(f"| {g[0]} | {g[1]} | {g[2]} | " + " | ".join(cells)
                   + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="a .tflite with its .json beside it")
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--n0", type=float, default=20.0)
    ap.add_argument("--nemo-length", type=int, default=150)
    ap.add_argument("--ravdess-length", type=int, default=80)
    ap.add_argument("--speakers", default=",".join(SPEAKERS))
    ap.add_argument("--out", default="docs/results/prior-correction")
    ap.add_argument("--overview", metavar="SEEN", help="print the overview table of --out's results.jsonl.gz at SEEN "
                    "(10, 20, 40, all, online) and exit")
    args = ap.parse_args(argv)
    if args.overview:
        with gzip.open(Path(args.out) / "results.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for line in f]
        print(overview(rows, args.overview))
        return
    if default_ravdess_root() is None or default_nemo_root() is None:
        raise SystemExit("needs ../shared/data/ravdess and ../shared/data/nemo (or $FEDSER_RAVDESS, $FEDSER_NEMO)")
    names = args.speakers.split(",")
    clips = [c for c in load_corpus("ravdess", default_ravdess_root()) + load_corpus("nemo", default_nemo_root())
             if c.speaker.split("-", 1)[1] in names]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    raw_cache: dict[str, list[np.ndarray]] = {}
    for model_path in args.model:
        meta = ModelMetadata.load(metadata_path_for(model_path))
        model = TFLiteModel(model_path, meta)
        sha = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()[:8]
        model_name = f"{model_path} ({sha})"
        labels = list(meta.labels)
        cfg = meta.features
        ckey = json.dumps(cfg.to_dict(), sort_keys=True)
        if ckey not in raw_cache:
            raw_cache[ckey] = [raw_features(trim_silence(load_audio(c.path, sample_rate=cfg.sample_rate), cfg), cfg)
                               for c in clips]
        raws = raw_cache[ckey]
        started = time.time()
        for speaker in sorted({c.speaker for c in clips}):
            corpus = speaker.split("-", 1)[0]
            idx = [i for i, c in enumerate(clips) if c.speaker == speaker and c.label in labels]
            by_class = {lab: [i for i in idx if clips[i].label == lab] for lab in labels}
            length = args.nemo_length if corpus == "nemo" else args.ravdess_length
            for mix in MIXES:
                for seed in _seeds(args.seeds):
                    spk_i = SPEAKERS.index(speaker.split("-", 1)[1])
                    rng = np.random.default_rng([seed, spk_i, list(MIXES).index(mix)])
                    stream = draw_stream(by_class, mix_counts(mix, labels, length), rng, replace=corpus != "nemo")
                    p = device_posteriors(raws, stream, model, meta)
                    y = np.array([labels.index(clips[i].label) for i in stream])
                    for r in evaluate_stream(p, y, args.n0):
                        rows.append({"model": model_name, "corpus": corpus, "speaker": speaker, "mix": mix,
                                     "seed": seed, "length": length, **r})
            print(f"{model_name} {speaker} done ({time.time() - started:.0f} s)", file=sys.stderr)
    with gzip.open(out_dir / "results.jsonl.gz", "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    text = ("# Prior correction through the device path\n\n`python -m tools.prior_study "
            + " ".join(f"--model {m}" for m in args.model)
            + f" --seeds {args.seeds} --n0 {args.n0:g}`\n\nmean ± standard error over streams (speakers × seeds); "
              "Δ: paired difference from none on the same streams and clips.\n" + summarise(rows))
    (out_dir / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
