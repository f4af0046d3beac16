"""How far apart the four classes sit in the model's normalised inputs, RAVDESS against nEMO (no model involved).

    python docs/results/recipe-search/stop29/contrast_by_class.py

The inputs of task A's recipe (log-mel, level removed per utterance), every speaker normalised by all of their
own clips, as a device does. Per clip, over its frames that are not padding: the mean frame (where its average
spectrum sits, per band) and the per-band standard deviation over time (how it moves). Per speaker and class, the
centroids of those two. Printed, as markdown tables, averaged over speakers:
- for each pair of classes, the RMS over bands of the distance between their centroids (mean frames, and spread
  profiles), for each corpus and nEMO / RAVDESS;
- the within-class dispersion: the RMS distance of a clip's mean frame from its class centroid.
RAVDESS has 8-16 clips per class and actor against about 85 in nEMO, which inflates its centroid distances by
sampling noise of about sqrt(2 / n) times the dispersion (about 0.08 at n = 8): small next to the gaps printed.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
LABELS = ("angry", "happy", "neutral", "sad")


def _per_clip(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    live = np.any(x != 0, axis=2)[..., None]  # [N, T, 1]
    n = np.maximum(live.sum(axis=1), 1)
    mean = (x * live).sum(axis=1) / n
    sd = np.sqrt((((x - mean[:, None, :]) ** 2) * live).sum(axis=1) / n)
    return mean, sd


def _contrast(fs, features, norm) -> tuple[dict, float]:
    mean, sd = _per_clip(fs.model_inputs(features, norm, None))
    speakers = np.array([c.speaker for c in fs.clips])
    labels = np.array([c.label for c in fs.clips])
    pairs = {p: ([], []) for p in itertools.combinations(LABELS, 2)}
    within = []
    for spk in sorted(set(speakers.tolist())):
        mine = speakers == spk
        cm = {lab: mean[mine & (labels == lab)].mean(axis=0) for lab in LABELS}
        cs = {lab: sd[mine & (labels == lab)].mean(axis=0) for lab in LABELS}
        for lab in LABELS:
            within.append(np.sqrt(((mean[mine & (labels == lab)] - cm[lab]) ** 2).mean(axis=1)).mean())
        for a, b in pairs:
            pairs[a, b][0].append(np.sqrt(((cm[a] - cm[b]) ** 2).mean()))
            pairs[a, b][1].append(np.sqrt(((cs[a] - cs[b]) ** 2).mean()))
    return {p: (float(np.mean(m)), float(np.mean(s))) for p, (m, s) in pairs.items()}, float(np.mean(within))


def main() -> int:
    from models.cross_corpus import _clips
    from models.datasets import split_by_speaker
    from models.features import compute_features
    from models.recipe_search import RAVDESS_TEST, RECIPES, _configs

    features, _, _ = _configs(RECIPES["A-swa-long"], 0)
    cache = REPO / ".cache" / "features"
    ravdess, nemo = _clips()
    norm = compute_features(split_by_speaker(ravdess, list(RAVDESS_TEST))[0], features, cache_dir=cache).normalization()
    r, r_within = _contrast(compute_features(ravdess, features, cache_dir=cache), features, norm)
    n, n_within = _contrast(compute_features(nemo, features, cache_dir=cache), features, norm)
    print("| classes | RAVDESS: mean-frame centroids apart | nEMO | nEMO / RAVDESS | RAVDESS: spread profiles apart | "
          "nEMO | nEMO / RAVDESS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for p in r:
        print(f"| {p[0]}-{p[1]} | {r[p][0]:.3f} | {n[p][0]:.3f} | {n[p][0] / r[p][0]:.2f} | {r[p][1]:.3f} | "
              f"{n[p][1]:.3f} | {n[p][1] / r[p][1]:.2f} |")
    print(f"\nWithin-class dispersion of the clips' mean frames: RAVDESS {r_within:.3f}, nEMO {n_within:.3f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
