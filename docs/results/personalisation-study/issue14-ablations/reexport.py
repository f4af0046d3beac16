"""Re-export runs/adapt/<dir> from its kept Keras weights with the current models/export.py."""
import sys
from pathlib import Path

import numpy as np

from edge_sdk.model import ModelMetadata
from models.architectures import ArchitectureConfig, build_encoder
from models.export import export_tflite

src = Path(sys.argv[1])
out = Path(sys.argv[2])
meta = ModelMetadata.load(src / "meta-src.json")
arch = meta.extra["architecture"]
cfg = ArchitectureConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
enc = build_encoder(cfg, meta.features.max_frames, meta.features.n_features)
enc.load_weights(str(src / "encoder.weights.h5"))
head = dict(np.load(src / "head.npz"))
r = export_tflite(enc, head, meta, out, adapter=len(sys.argv) < 4)
print(r)
