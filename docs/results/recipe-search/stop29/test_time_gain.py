"""Amplify each clip's distance from the speaker's centre at inference: does the RAVDESS-only model read nEMO better?

    python -m models.recipe_search run --task A --recipes A-swa-long --seeds 0,1,2 --out /tmp/rs29/exp \
        --export /tmp/rs29/exp/models
    python docs/results/recipe-search/stop29/test_time_gain.py /tmp/rs29/exp/models/A-swa-long-seed{0,1,2}

Each exported model is run through the TFLite runtime (``edge_sdk.model.TFLiteModel.infer``) on inputs normalised
as a device does (every speaker by all of their own clips), after :func:`intensify` with each (offset gain, spread
gain) of the grid. Printed: a markdown table of UARs per group (nEMO dev = the six non-test speakers, RAVDESS 19-20,
nEMO IC0/MK0/TP0, all of nEMO, RAVDESS 21-24), mean ± standard error over the models, and the paired gain over
(1, 1) in points. The rule is in RULE.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
GRID = [(o, s) for o in (1.0, 1.5, 2.0) for s in (1.0, 1.5, 2.0)]


def intensify(x: np.ndarray, offset_gain: float, spread_gain: float) -> np.ndarray:
    """``[N, T, F]`` normalised inputs: each clip's mean frame m (over frames that are not padding) times
    ``offset_gain``; each band's standard deviation over time s -> 1 + spread_gain (s - 1). Padding stays zero."""
    live = np.any(x != 0, axis=2)[..., None].astype(np.float32)
    count = np.maximum(live.sum(axis=1, keepdims=True), 1.0)
    mean = (x * live).sum(axis=1, keepdims=True) / count
    dev = (x - mean) * live
    sd = np.sqrt((dev * dev).sum(axis=1, keepdims=True) / count)
    scale = np.maximum(1.0 + spread_gain * (sd - 1.0), 0.05) / np.maximum(sd, 1e-3)
    return ((offset_gain * mean + dev * scale) * live).astype(np.float32)


def paired_cell(v: np.ndarray, base: np.ndarray, setting: tuple) -> str:
    """The paired gain of ``v`` over ``base`` in points, mean ± standard error; "-" for the (1, 1) row."""
    d = (np.asarray(v) - np.asarray(base)) * 100
    se = f" ± {d.std(ddof=1) / np.sqrt(len(d)):.1f}" if len(d) > 1 else ""
    return "-" if setting == (1.0, 1.0) else f"{d.mean():+.1f}{se}"


def _uar(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def corpora(recipe: str):
    """(the recipe's FeatureConfig, the feature cache folder, {"ravdess 1-18", "ravdess 19-20", "ravdess 21-24",
    "nemo": clips}); shared by this folder's scripts."""
    from models.cross_corpus import _clips
    from models.datasets import split_by_speaker
    from models.recipe_search import RAVDESS_CV, RAVDESS_TEST, RECIPES, _configs

    features, _, _ = _configs(RECIPES[recipe], 0)
    ravdess, nemo = _clips()
    r_rest, r_test = split_by_speaker(ravdess, list(RAVDESS_TEST))
    r_train, r_val = split_by_speaker(r_rest, list(RAVDESS_CV))
    return features, REPO / ".cache" / "features", {"ravdess 1-18": r_train, "ravdess 19-20": r_val,
                                                    "ravdess 21-24": r_test, "nemo": nemo}


def load_model(folder: Path):
    from edge_sdk.model import ModelMetadata, TFLiteModel

    return TFLiteModel(folder / "model.tflite", ModelMetadata.load(folder / "model.json"))


def main(argv: list[str]) -> int:
    from models.features import compute_features
    from models.recipe_search import NEMO_DEV, NEMO_TEST

    if not argv:
        print(__doc__)
        return 2
    features, cache, parts = corpora("A-swa-long")
    r_val, r_test, nemo = parts["ravdess 19-20"], parts["ravdess 21-24"], parts["nemo"]
    norm = compute_features(parts["ravdess 1-18"], features, cache_dir=cache).normalization()
    groups = {}
    for name, clips in (("RAVDESS 19-20", r_val), ("RAVDESS 21-24", r_test), ("nEMO", nemo)):
        fs = compute_features(clips, features, cache_dir=cache)
        groups[name] = (fs.model_inputs(features, norm), fs, np.array([c.speaker for c in fs.clips]))
    results = {}  # (setting, group) -> [uar per model]
    for folder in map(Path, argv):
        model = load_model(folder)
        labels = list(model.metadata.labels)
        for setting in GRID:
            for name, (x, fs, speakers) in groups.items():
                xi = intensify(x, *setting)
                pred = np.array([int(np.argmax(model.infer(row)[0])) for row in xi])
                y = fs.labels(labels)
                parts = {name: np.ones(len(y), bool)}
                if name == "nEMO":
                    parts = {"nEMO dev": np.isin(speakers, NEMO_DEV), "nEMO IC0/MK0/TP0": np.isin(speakers, NEMO_TEST),
                             "all nEMO": np.ones(len(y), bool)}
                for part, m in parts.items():
                    results.setdefault((setting, part), []).append(_uar(y[m], pred[m]))
        print(f"done {folder}", file=sys.stderr)
    order = ["nEMO dev", "RAVDESS 19-20", "nEMO IC0/MK0/TP0", "all nEMO", "RAVDESS 21-24"]
    print("| offset gain, spread gain | " + " | ".join(f"{p} UAR | paired, points" for p in order) + " |")
    print("| --- |" + " --- | --- |" * len(order))
    for setting in GRID:
        cells = []
        for part in order:
            v = np.array(results[setting, part])
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) / np.sqrt(len(v)):.3f}" if len(v) > 1 else f"{v.mean():.3f}")
            cells.append(paired_cell(v, results[(1.0, 1.0), part], setting))
        print(f"| {setting[0]:g}, {setting[1]:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
