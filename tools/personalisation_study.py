"""How much does on-device fine-tuning of the head help a speaker the model never saw?

    python -m tools.personalisation_study [--answers 5,10,15,20] [--splits 8] [--speakers 19,20,21,22,23,24]
                                          [--model DIR] [--out DIR]

For each unseen RAVDESS speaker and each of ``--splits`` random orders of their clips, a fresh device (the
bundled model) answers ``--answers`` predictions like a user (thumbs-up when right; a correction, or a bare
thumbs-down at ``down_rate``), fine-tunes with a ``TrainPolicy``, and is scored on the speaker's remaining
clips with the personalised head and with the global head. Prints the mean gain in accuracy points and its
standard error per policy and down-rate (at the largest ``--answers``), and the default policy's gain for each
number of answers; ``--out`` also writes ``personalisation.md`` and ``gain-vs-answers.png``. ``--model`` takes a
folder with ``model.tflite`` and ``model.json`` instead of the bundled model. Embeddings are computed once (the
encoder is frozen), so it is fast.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

POLICIES = {
    "default (lr 0.05, 10 epochs, guard)": {},
    "no guard": {"holdout_every": 0},
    "lr 0.01, no guard": {"holdout_every": 0, "learning_rate": 0.01},
    "lr 0.2, no guard": {"holdout_every": 0, "learning_rate": 0.2},
    "30 epochs, no guard": {"holdout_every": 0, "epochs": 30},
    "no class balancing, no guard": {"holdout_every": 0, "balance_classes": False},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.personalisation_study", description=__doc__.split("\n")[0])
    parser.add_argument("--answers", default="5,10,15,20", help="numbers of answers before scoring")
    parser.add_argument("--splits", type=int, default=8)
    parser.add_argument("--speakers", default="19,20,21,22,23,24", help="speakers the bundled model never trained on")
    parser.add_argument("--down-rates", default="0.3,1.0")
    parser.add_argument("--model", type=Path, help="folder with model.tflite and model.json (default: bundled)")
    parser.add_argument("--out", type=Path, help="folder for personalisation.md and gain-vs-answers.png")
    args = parser.parse_args(argv)
    answer_counts = sorted(int(a) for a in args.answers.split(","))
    model_files = (args.model / "model.tflite", args.model / "model.json") if args.model else None
    from edge_sdk.device import Device, TrainPolicy
    from models.datasets import default_ravdess_root, ravdess_clips
    from models.evaluate import device_inputs

    root = default_ravdess_root()
    if root is None:
        raise SystemExit("needs RAVDESS ($FEDSER_RAVDESS or ../shared/data/ravdess)")
    speakers = [f"ravdess-{int(s):02d}" for s in args.speakers.split(",")]
    clips = [c for c in ravdess_clips(root) if c.speaker in speakers]
    with tempfile.TemporaryDirectory() as tmp:
        base = Device(Path(tmp) / "base", model_files=model_files)
        if base.model is None:
            raise SystemExit("no bundled model in edge_sdk/data")
        meta, labels = base.metadata, list(base.metadata.labels)
        kept, inputs, _ = device_inputs(clips, meta)  # a device that has heard all of its user's clips
        emb = {c.path: base.model.infer(x)[1] for c, x in zip(kept, inputs, strict=True)}

        def trial_gains(policy: TrainPolicy, down_rate: float, answers: int) -> np.ndarray:
            gains = []
            for spk in speakers:
                mine = [c for c in clips if c.speaker == spk]
                for split in range(args.splits):
                    rng = np.random.default_rng([int(spk[-2:]), split])
                    order = [mine[i] for i in rng.permutation(len(mine))]
                    answered, later = order[:answers], order[max(answer_counts):]  # same scored clips for all
                    state = Path(tmp) / "dev"
                    shutil.rmtree(state, ignore_errors=True)
                    dev = Device(state, train_policy=policy, model_files=model_files)
                    for c in answered:
                        probs = dev.model.head_probs(emb[c.path][None])[0]
                        predicted = labels[int(np.argmax(probs))]
                        dev.store.add_prediction(prediction_id=c.path, model_version=0, label=predicted,
                                                 probs=probs, embedding=emb[c.path], features=None, latency_ms=0.0)
                        answer = "up" if predicted == c.label else ("down" if rng.random() < down_rate else c.label)
                        dev.feedback(c.path, answer)
                    x = np.stack([emb[c.path] for c in later])
                    y = np.array([labels.index(c.label) for c in later])
                    dev.model.set_weights(dev.global_head)
                    before = float(np.mean(np.argmax(dev.model.head_probs(x), axis=1) == y))
                    dev.personalize()
                    after = float(np.mean(np.argmax(dev.model.head_probs(x), axis=1) == y))
                    gains.append(after - before)
                    dev.store.close()
            return 100 * np.array(gains)

        down_rates = [float(x) for x in args.down_rates.split(",")]
        lines = [f"Model: {args.model or 'bundled'}; speakers {args.speakers}; {args.splits} random orders each; "
                 f"scored on each speaker's clips after the first {max(answer_counts)}.", "",
                 f"| policy | down-rate | mean gain after {max(answer_counts)} answers (points) | standard error | "
                 "trials |", "| --- | --- | --- | --- | --- |"]
        print("\n".join(lines), flush=True)
        for down_rate in down_rates:
            for name, over in POLICIES.items():
                g = trial_gains(TrainPolicy(min_examples=4, **over), down_rate, max(answer_counts))
                lines.append(f"| {name} | {down_rate} | {g.mean():+.1f} | {g.std() / np.sqrt(len(g)):.1f} | {len(g)} |")
                print(lines[-1], flush=True)
        curve = {}
        lines += ["", "Default policy, gain against the number of answers:", "",
                  "| answers | " + " | ".join(f"gain, down-rate {d} (points)" for d in down_rates) + " |",
                  "| --- " * (1 + len(down_rates)) + "|"]
        for n in answer_counts:
            row = []
            for d in down_rates:
                g = trial_gains(TrainPolicy(min_examples=4), d, n)
                curve.setdefault(d, []).append((n, g.mean(), g.std() / np.sqrt(len(g))))
                row.append(f"{g.mean():+.1f} ± {g.std() / np.sqrt(len(g)):.1f}")
            lines.append(f"| {n} | " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
        if args.out:
            _write(args.out, lines, curve)
    return 0


def _write(out: Path, lines: list[str], curve: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    for d, points in curve.items():
        n, m, se = zip(*points, strict=True)
        ax.errorbar(n, m, yerr=se, marker="o", capsize=3,
                    label="corrections + thumbs" if d < 1 else "thumbs-up/down only")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("feedback answers")
    ax.set_ylabel("personal - global accuracy (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gain-vs-answers.png")
    plt.close(fig)
    title = ["# Personalisation study: head fine-tuning for speakers the model never saw", "",
             "`python -m tools.personalisation_study` (gain = personalised minus global accuracy on the speaker's "
             "later clips, in points; the device has heard all of its user's clips).", ""]
    (out / "personalisation.md").write_text("\n".join(title + lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
