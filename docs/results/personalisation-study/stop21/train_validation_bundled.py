"""A stand-in for the bundled model whose held-out speakers are numerous enough to choose a personalisation policy on.

The shipped bundled model (recipe B-speed) trains on RAVDESS 1-18 and nEMO EB0, KD0, KS0, MP0, SM0, so the only
users a policy can be chosen on are RAVDESS 19-20 (8 scored clips a run) and nEMO WR0; IC0, MK0, TP0 and RAVDESS
21-24 are test users. This model is the same recipe (log-mel, level normalisation, two speed-perturbed copies per
training clip) trained on RAVDESS 1-16 and nEMO EB0, KD0, KS0, SM0 for a fixed 20 epochs (the shipped seed's best
epoch was 18), keeping the last epoch's weights, so RAVDESS 17-20 and nEMO MP0, WR0 are unseen users like the
test ones and no test speaker is touched.

    python docs/results/personalisation-study/stop21/train_validation_bundled.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from models.cross_corpus import _clips
from models.datasets import split_by_speaker
from models.recipe_search import NEMO_TEST, RAVDESS_TEST, RECIPES, _configs
from models.train import train_baseline

USERS = [f"ravdess-{a}" for a in (17, 18, 19, 20)] + ["nemo-MP0", "nemo-WR0"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path(".cache/features"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ravdess, nemo = _clips()
    rest, _test = split_by_speaker(ravdess + nemo, list(RAVDESS_TEST + NEMO_TEST))
    train, users = split_by_speaker(rest, USERS)
    features, config, arch = _configs(RECIPES["B-speed"], args.seed)
    config = replace(config, epochs=20, swa_epochs=1)  # fixed length, last weights: the users choose nothing
    result = train_baseline(train, users, (), features=features, architecture=arch, config=config,
                            cache_dir=args.cache, out_dir=args.out, progress=False,
                            dataset_name="validation stand-in for the bundled model (B-speed, 20 epochs; users "
                                         "RAVDESS 17-20, nEMO MP0, WR0 held out)")
    logging.info("users' UAR (reported, not used): %.3f", result.report["best_val_uar"])


if __name__ == "__main__":
    main()
