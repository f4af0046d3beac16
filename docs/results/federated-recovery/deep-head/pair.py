"""The paired bases of the deep-head study: the RAVDESS-only recipe (docs/results/cross-corpus/ravdess-only:
`level+ref-neutral`, seed 0, RAVDESS 1-18 train, 19-20 validate) trained ONCE, and the same Keras weights exported
twice: head only (`runs/deep-head/head`) and with the encoder's embedding layer in the trainable head
(`runs/deep-head/deep`).

    python docs/results/federated-recovery/deep-head/pair.py train   # -> runs/deep-head/keras/
    python docs/results/federated-recovery/deep-head/pair.py export  # -> runs/deep-head/{head,deep}/
"""
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
OUT = REPO / "runs" / "deep-head"
CACHE = REPO / ".cache" / "features"  # content-keyed; the measured run used a copy at /tmp/dh/cache
NAME = "RAVDESS actors 1-18 (19-20 validate)"


def _recipe():
    from models.cross_corpus import VARIANTS, _configs, _ravdess_training

    _, fch, tch = VARIANTS["level+ref-neutral"]
    features, config, arch = _configs(fch, tch, 0)
    train, val = _ravdess_training(bool(tch.get("calm")))
    return features, config, arch, train, val


def train() -> None:
    from models.cross_corpus import _calm_clips, _clips
    from models.datasets import split_by_speaker
    from models.train import train_baseline

    features, config, arch, train_clips, val_clips = _recipe()
    ravdess, nemo = _clips()
    _, r_test = split_by_speaker(ravdess, [f"ravdess-{a}" for a in (21, 22, 23, 24)])
    res = train_baseline(train_clips, val_clips, r_test + nemo, features=features, architecture=arch, config=config,
                         cache_dir=CACHE, dataset_name=NAME, progress=False, reference_clips=_calm_clips())
    keras_dir = OUT / "keras"
    keras_dir.mkdir(parents=True, exist_ok=True)
    res.encoder.save(keras_dir / "encoder.keras")
    res.head.save(keras_dir / "head.keras")
    res.metadata.save(keras_dir / "model.json")
    (keras_dir / "report.json").write_text(json.dumps(res.report, indent=2, default=str))
    print("trained: test", {k: v["uar"] for k, v in res.report["test_by_corpus"].items()}, flush=True)


def replay_inputs(features, config):
    """The training inputs of the replay set exactly as train_baseline picks them (per_class_sample of y_train)."""
    from models.cross_corpus import _calm_clips
    from models.datasets import FOUR_CLASSES, per_class_sample
    from models.features import compute_features

    _, _, _, train_clips, val_clips = _recipe()
    train_fs = compute_features(train_clips, features, cache_dir=CACHE, augmentation=config.augmentation)
    norm = train_fs.normalization()
    own = {c.speaker for c in train_clips} | {c.speaker for c in val_clips}
    extra = compute_features([c for c in _calm_clips() if c.speaker in own], features, cache_dir=CACHE)
    ref = train_fs.reference_stats(config.speaker_reference, extra)
    x, y = train_fs.model_inputs(features, norm, ref), train_fs.labels(FOUR_CLASSES)
    picked = per_class_sample(y, config.replay_per_class, config.seed)
    return x[picked], y[picked]


def export() -> None:
    import keras

    from edge_sdk.model import ModelMetadata
    from models.export import export_tflite

    features, config, _, _, _ = _recipe()
    keras_dir = OUT / "keras"
    encoder = keras.models.load_model(keras_dir / "encoder.keras", compile=False)
    head = keras.models.load_model(keras_dir / "head.keras", compile=False)
    meta = ModelMetadata.load(keras_dir / "model.json")
    hidden, logits = head.get_layer("head_hidden"), head.get_layer("head_logits")
    weights = {"w0": hidden.kernel.numpy(), "b0": hidden.bias.numpy(), "w1": logits.kernel.numpy(),
               "b1": logits.bias.numpy()}
    x, y = replay_inputs(features, config)
    shipped, _ = meta.replay_set()
    again = encoder.predict(x, verbose=0)
    print("replay set reproduced: max |diff|", float(np.abs(again - shipped).max()), flush=True)
    report = json.loads((keras_dir / "report.json").read_text())
    for name, deep in (("head", False), ("deep", True)):
        res = export_tflite(encoder, weights, meta, OUT / name, trainable_embedding=deep, replay_inputs=(x, y))
        (OUT / name / "report.json").write_text(json.dumps({**report, "tflite_bytes": res.size,
                                                             "tflite_sha256": res.sha256}, indent=2, default=str))
        m = ModelMetadata.load(res.metadata_path)
        print(name, res.size, "bytes; head layout", m.head_layout.to_json(), "delta bytes", m.head_layout.nbytes,
              flush=True)


if __name__ == "__main__":
    {"train": train, "export": export}[sys.argv[1]]()
