"""Clip durations and levels per corpus and class (the table in README.md).

    .venv/bin/python docs/results/cross-corpus/clip_levels.py

Every RAVDESS four-class clip and every third nEMO clip: raw duration, duration after the features' silence
trimming (30 dB), RMS level of the trimmed clip and peak level, in dBFS.
"""

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from edge_sdk.features import FeatureConfig, trim_silence  # noqa: E402
from models.datasets import default_nemo_root, default_ravdess_root, load_corpus  # noqa: E402
from models.features import load_clip_audio  # noqa: E402

cfg = FeatureConfig()
for name, clips in (("RAVDESS", load_corpus("ravdess", default_ravdess_root())),
                    ("nEMO", load_corpus("nemo", default_nemo_root())[::3])):
    rows = defaultdict(list)
    for c in clips:
        y = load_clip_audio(c.path, 16000)
        t = trim_silence(y, cfg)
        rows[c.label].append((len(y) / 16000, len(t) / 16000, 20 * np.log10(np.sqrt(np.mean(t**2)) + 1e-9),
                              20 * np.log10(np.abs(y).max() + 1e-9)))
    for label, v in sorted(rows.items()):
        a = np.array(v)
        print(f"| {name} | {label} | {len(a)} | {a[:, 0].mean():.2f} | {a[:, 1].mean():.2f} | {a[:, 2].mean():.1f} "
              f"| {a[:, 3].mean():.1f} ± {a[:, 3].std():.1f} |")
