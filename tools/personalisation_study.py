"""How much does on-device fine-tuning of the head help a speaker the model never saw?

    python -m tools.personalisation_study [--answers 20] [--splits 8] [--speakers 19,20,21,22,23,24]

For each unseen RAVDESS speaker and each of ``--splits`` random orders of their clips, a fresh device (the
bundled model) answers ``--answers`` predictions like a user (thumbs-up when right; a correction, or a bare
thumbs-down at ``down_rate``), fine-tunes with a ``TrainPolicy``, and is scored on the speaker's remaining
clips with the personalised head and with the global head. Prints the mean gain in accuracy points and its
standard error per policy and down-rate. Embeddings are computed once (the encoder is frozen), so it is fast.
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
    parser.add_argument("--answers", type=int, default=20)
    parser.add_argument("--splits", type=int, default=8)
    parser.add_argument("--speakers", default="19,20,21,22,23,24", help="speakers the bundled model never trained on")
    parser.add_argument("--down-rates", default="0.3,1.0")
    args = parser.parse_args(argv)
    from edge_sdk.device import Device, TrainPolicy
    from models.datasets import default_ravdess_root, ravdess_clips
    from models.evaluate import device_inputs

    root = default_ravdess_root()
    if root is None:
        raise SystemExit("needs RAVDESS ($FEDSER_RAVDESS or ../shared/data/ravdess)")
    speakers = [f"ravdess-{int(s):02d}" for s in args.speakers.split(",")]
    clips = [c for c in ravdess_clips(root) if c.speaker in speakers]
    with tempfile.TemporaryDirectory() as tmp:
        base = Device(Path(tmp) / "base")
        if base.model is None:
            raise SystemExit("no bundled model in edge_sdk/data")
        meta, labels = base.metadata, list(base.metadata.labels)
        kept, inputs, _ = device_inputs(clips, meta)  # a device that has heard all of its user's clips
        emb = {c.path: base.model.infer(x)[1] for c, x in zip(kept, inputs, strict=True)}
        print("| policy | down-rate | mean gain (points) | standard error | trials |\n| --- | --- | --- | --- | --- |")
        for down_rate in (float(x) for x in args.down_rates.split(",")):
            for name, over in POLICIES.items():
                policy = TrainPolicy(min_examples=4, **over)
                gains = []
                for spk in speakers:
                    mine = [c for c in clips if c.speaker == spk]
                    for split in range(args.splits):
                        rng = np.random.default_rng([int(spk[-2:]), split])
                        order = [mine[i] for i in rng.permutation(len(mine))]
                        answered, later = order[: args.answers], order[args.answers:]
                        state = Path(tmp) / "dev"
                        shutil.rmtree(state, ignore_errors=True)
                        dev = Device(state, train_policy=policy)
                        for c in answered:
                            probs = dev.model.head_probs(emb[c.path][None])[0]
                            predicted = labels[int(np.argmax(probs))]
                            dev.store.add_prediction(prediction_id=c.path, model_version=0, label=predicted,
                                                     probs=probs, embedding=emb[c.path], features=None,
                                                     latency_ms=0.0)
                            answer = "up" if predicted == c.label else (
                                "down" if rng.random() < down_rate else c.label)
                            dev.feedback(c.path, answer)
                        x = np.stack([emb[c.path] for c in later])
                        y = np.array([labels.index(c.label) for c in later])
                        dev.model.set_weights(dev.global_head)
                        before = float(np.mean(np.argmax(dev.model.head_probs(x), axis=1) == y))
                        dev.personalize()
                        after = float(np.mean(np.argmax(dev.model.head_probs(x), axis=1) == y))
                        gains.append(after - before)
                        dev.store.close()
                g = 100 * np.array(gains)
                print(f"| {name} | {down_rate} | {g.mean():+.1f} | {g.std() / np.sqrt(len(g)):.1f} | {len(g)} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
