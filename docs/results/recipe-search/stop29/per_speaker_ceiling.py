"""The ceiling of a per-user choice of the inference gains: per nEMO dev speaker and RAVDESS 19-20 actor, the best
of a 5 x 5 grid picked on all of that speaker's own clips (in-sample: an upper bound), against gains (1, 1).

    python docs/results/recipe-search/stop29/per_speaker_ceiling.py /tmp/rs29/exp/models/A-swa-long-seed{0,1,2}

(the models from test_time_gain.py's export command). Printed: model, speaker, accuracy at (1, 1), the best
(offset gain, spread gain) and its accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
GRID = [(o, s) for o in (0.75, 1.0, 1.5, 2.0, 2.5) for s in (0.75, 1.0, 1.5, 2.0, 2.5)]


def main(argv: list[str]) -> int:
    from test_time_gain import corpora, intensify, load_model

    from models.features import compute_features
    from models.recipe_search import NEMO_DEV

    if not argv:
        print(__doc__)
        return 2
    features, cache, parts = corpora("A-swa-long")
    norm = compute_features(parts["ravdess 1-18"], features, cache_dir=cache).normalization()
    fs = compute_features([c for c in parts["nemo"] if c.speaker in NEMO_DEV] + parts["ravdess 19-20"], features,
                          cache_dir=cache)
    x = fs.model_inputs(features, norm)
    speakers = np.array([c.speaker for c in fs.clips])
    for folder in map(Path, argv):
        model = load_model(folder)
        y = fs.labels(list(model.metadata.labels))
        acc = {}
        for g in GRID:
            pred = np.array([int(np.argmax(model.infer(row)[0])) for row in intensify(x, *g)])
            for spk in sorted(set(speakers.tolist())):
                acc[spk, g] = float(np.mean(pred[speakers == spk] == y[speakers == spk]))
        for spk in sorted(set(speakers.tolist())):
            best = max(GRID, key=lambda g, spk=spk: acc[spk, g])
            print(f"{folder.name} {spk} (1, 1) {acc[spk, (1.0, 1.0)]:.3f} best {best} {acc[spk, best]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
