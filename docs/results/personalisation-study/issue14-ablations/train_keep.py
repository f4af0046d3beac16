"""Train the RAVDESS-only recipe and keep the Keras encoder weights, head and metadata for re-export."""
import sys
from pathlib import Path

import numpy as np

import models.train as T
from models.cli import main

out = Path(sys.argv[1])
real = T.export_tflite

def keep(encoder, head_weights, metadata, out_dir, **kw):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.save_weights(str(out_dir / "encoder.weights.h5"))
    np.savez(out_dir / "head.npz", **head_weights)
    metadata.save(out_dir / "meta-src.json")
    return real(encoder, head_weights, metadata, out_dir, **kw)

T.export_tflite = keep
sys.exit(main(["train", "--out", str(out), "--corpus", "ravdess", "--features", "logmel", "--utterance-norm", "level",
               "--seed", "0", "--no-progress"]))
