"""A shipped model through the device path, before and after a per-speaker prior correction.

    .venv/bin/python docs/results/cross-corpus/prior_correction.py MODEL.tflite [SPEAKERS]

SPEAKERS: comma-separated speaker ids (default: the named test speakers, RAVDESS 21-24 and nEMO IC0, MK0, TP0);
"nemo" for all of nEMO. The correction (`models.cross_corpus.prior_correction`) uses no label: on each speaker's
own clips it shifts the class biases until the mean predicted probabilities are equal, which a device can do
from its user's unlabelled audio. Prints UAR and per-class recall per corpus, before and after.
"""

import sys

import numpy as np

from edge_sdk.model import ModelMetadata, TFLiteModel
from models.cross_corpus import prior_correction
from models.datasets import default_nemo_root, default_ravdess_root, load_corpus
from models.evaluate import device_inputs, metadata_path_for
from models.metrics import by_corpus


def main(model_path: str, speakers: str = "") -> None:
    if default_ravdess_root() is None or default_nemo_root() is None:
        raise SystemExit("needs ../shared/data/ravdess and ../shared/data/nemo (or $FEDSER_RAVDESS, $FEDSER_NEMO)")
    clips = load_corpus("ravdess", default_ravdess_root()) + load_corpus("nemo", default_nemo_root())
    if speakers == "nemo":
        keep = {c.speaker for c in clips if c.speaker.startswith("nemo-")}
    else:
        names = speakers.split(",") if speakers else ["21", "22", "23", "24", "IC0", "MK0", "TP0"]
        keep = {c.speaker for c in clips if c.speaker.split("-", 1)[1] in names}
    meta = ModelMetadata.load(metadata_path_for(model_path))
    model = TFLiteModel(model_path, meta)
    kept, inputs, _ = device_inputs([c for c in clips if c.speaker in keep], meta)
    logp = np.log(np.maximum(np.stack([model.infer(x)[0] for x in inputs]), 1e-12))
    labels = list(meta.labels)
    y = np.array([labels.index(c.label) for c in kept])
    spk = np.array([c.speaker for c in kept])
    after = np.zeros(len(y), int)
    for s in set(spk.tolist()):
        after[spk == s] = np.argmax(logp[spk == s] + prior_correction(logp[spk == s]), axis=1)
    for name, pred in (("device path", np.argmax(logp, axis=1)), ("after per-speaker prior correction", after)):
        for corpus, t in sorted(by_corpus(kept, y, pred, labels).items()):
            recall = ", ".join(f"{c} {t['per_class'][c]['recall']:.3f}" for c in labels)
            print(f"{model_path} | {name} | {corpus} ({t['num_examples']} clips): UAR {t['uar']:.3f}; recall {recall}")


if __name__ == "__main__":
    main(*sys.argv[1:])
