"""How far each class's pitch sits from the speaker's own, in RAVDESS and nEMO (the four classes).

    python docs/results/recipe-search/stop28/pitch_by_class.py

Every third clip of each corpus (the four classes), trimmed as training trims. Per clip: the median pitch of its
voiced frames in semitones (``edge_sdk.features.pitch_track``) and the share of voiced frames. Per speaker, the
clips' medians minus the mean of that speaker's clip medians (class-balanced). Printed: the mean over speakers
of each class's relative pitch and its spread (the standard deviation of the clip medians within the class and
speaker, averaged), as a markdown table.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))


def main() -> int:
    from edge_sdk.features import FeatureConfig, pitch_track, trim_silence
    from models.datasets import default_nemo_root, default_ravdess_root, load_corpus
    from models.features import load_clip_audio

    cfg = FeatureConfig(kind="logmel", pitch=True, utterance_norm="level", speaker_norm=True)
    print("| corpus | class | clips | pitch rel. speaker, semitones (mean over speakers) | within-class spread | "
          "voiced share |")
    print("| --- | --- | --- | --- | --- | --- |")
    for corpus, root in (("ravdess", default_ravdess_root()), ("nemo", default_nemo_root())):
        if root is None:
            print(f"| {corpus} | (corpus not found) | | | | |")
            continue
        clips = load_corpus(corpus, root)[::3]
        per = defaultdict(lambda: defaultdict(list))  # speaker -> class -> [(median, voiced share)]
        for clip in clips:
            track = pitch_track(trim_silence(load_clip_audio(clip.path, cfg.sample_rate), cfg), cfg)
            voiced = track[:, 1] >= 0.5
            if voiced.sum() >= 5:
                per[clip.speaker][clip.label].append((float(np.median(track[voiced, 0])), float(voiced.mean())))
        for label in ("angry", "happy", "neutral", "sad"):
            rel, spread, share, n = [], [], [], 0
            for classes in per.values():
                centre = np.mean([np.mean([m for m, _ in v]) for v in classes.values()])
                if classes.get(label):
                    meds = np.array([m for m, _ in classes[label]])
                    rel.append(meds.mean() - centre)
                    spread.append(meds.std())
                    share += [s for _, s in classes[label]]
                    n += len(meds)
            print(f"| {corpus} | {label} | {n} | {np.mean(rel):+.1f} | {np.mean(spread):.1f} | {np.mean(share):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
