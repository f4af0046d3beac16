"""The inference gains of test_time_gain.py for the bundled recipe, on the cross-validation folds of stop 28.

    python -m models.recipe_search run --task B --cv-folds 0,1,2 --recipes B-speed-e20 --seeds 0 \
        --out /tmp/rs29/expB --export /tmp/rs29/expB/models \
        --define 'B-speed-e20={"base": "B-speed", "train": {"epochs": 20, "patience": 0}}'
    python docs/results/recipe-search/stop29/test_time_gain_cv.py /tmp/rs29/expB/models/B-speed-e20-cv{0,1,2}-seed0

Fold K's model (named ``...-cvK-...``) is scored through the TFLite runtime on its two held-out nEMO speakers
(``models.recipe_search.NEMO_CV_FOLDS[K]``) and on RAVDESS 19-20, every speaker normalised by all of their own clips
with the model's own training normalisation as the prior. Printed: a markdown table per grid setting, the mean UAR
over folds and the gain over (1, 1) paired by fold, in points. The rule is in RULE.md (fourth section).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str]) -> int:
    from test_time_gain import GRID, _uar, corpora, intensify, load_model, paired_cell

    from models.features import compute_features
    from models.recipe_search import NEMO_CV_FOLDS

    if not argv:
        print(__doc__)
        return 2
    features, cache, parts = corpora("B-speed")
    r_val, nemo = parts["ravdess 19-20"], parts["nemo"]
    results: dict = {}  # (setting, group) -> [uar per fold]
    for folder in map(Path, argv):
        fold = int(re.search(r"-cv(\d)-", folder.name).group(1))
        model = load_model(folder)
        norm = model.metadata.normalization
        labels = list(model.metadata.labels)
        held = [c for c in nemo if c.speaker in NEMO_CV_FOLDS[fold]]
        for group, clips in (("held-out nEMO", held), ("RAVDESS 19-20", r_val)):
            fs = compute_features(clips, features, cache_dir=cache)
            x, y = fs.model_inputs(features, norm), fs.labels(labels)
            for setting in GRID:
                pred = np.array([int(np.argmax(model.infer(row)[0])) for row in intensify(x, *setting)])
                results.setdefault((setting, group), []).append(_uar(y, pred))
        print(f"done {folder}", file=sys.stderr)
    groups = ["held-out nEMO", "RAVDESS 19-20"]
    print("| offset gain, spread gain | " + " | ".join(f"{g} UAR (mean of folds) | paired by fold, points"
                                                      for g in groups) + " |")
    print("| --- |" + " --- | --- |" * len(groups))
    for setting in GRID:
        cells = []
        for group in groups:
            v = np.array(results[setting, group])
            cells.append(f"{v.mean():.3f} ({', '.join(f'{u:.3f}' for u in v)})")
            cells.append(paired_cell(v, results[(1.0, 1.0), group], setting))
        print(f"| {setting[0]:g}, {setting[1]:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
