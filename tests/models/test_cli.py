"""fedser-train as a user runs it: train, evaluate (the exported .tflite, as a device runs it), compare."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO


def _train_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "models.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _manifest(tmp_path, clips, split=None) -> str:
    csv = tmp_path / "clips.csv"
    rows = ["path,speaker,label" + (",split" if split else "")]
    rows += [f"{c.path},{c.speaker},{c.label}" + (f",{split(c)}" if split else "") for c in clips]
    csv.write_text("\n".join(rows) + "\n")
    return str(csv)


def test_train_writes_model_and_report_then_evaluate_scores_the_tflite(synthetic_clips, tmp_path):
    speakers = sorted({c.speaker for c in synthetic_clips})
    parts = {speakers[-1]: "test", speakers[-2]: "val"}
    csv = _manifest(tmp_path, synthetic_clips, split=lambda c: parts.get(c.speaker, "train"))
    out = tmp_path / "run"
    r = _train_cli("train", "--out", str(out), "--corpus", "manifest", "--data", csv, "--architecture", "afcn",
                   "--epochs", "2", "--max-frames", "120", "--augment", "1", "--cache", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("model.tflite", "model.json", "report.json", "report.md", "report-confusion.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "report-confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["split"]["test_speakers"] == [speakers[-1]] and report["split"]["val_speakers"] == [speakers[-2]]
    assert report["split"]["train_examples"] == 2 * report["split"]["train_clips"]  # one augmented copy each
    assert report["architecture"]["name"] == "afcn" and report["hardware"]["device"] in ("CPU", "GPU")
    assert "UAR" in (out / "report.md").read_text()
    meta = json.loads((out / "model.json").read_text())
    # the shipped front end is the default: log-mel with the recording's level removed
    assert (meta["features"]["kind"], meta["features"]["utterance_norm"]) == ("logmel", "level")
    assert meta["extra"]["test"]["uar"] == report["test"]["uar"]

    # evaluate: the manifest's test rows, through edge_sdk's numpy features and the TFLite runtime
    (tmp_path / "gone.wav").write_bytes(b"")
    with open(csv, "a") as f:
        f.write(f"{tmp_path / 'gone.wav'},{speakers[-1]},angry,test\n")
    ev = tmp_path / "eval"
    r = _train_cli("evaluate", "--model", str(out / "model.tflite"), "--corpus", "manifest", "--data", csv,
                   "--out", str(ev))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((ev / "evaluation.json").read_text())
    assert got["speakers"] == [speakers[-1]] and got["skipped"] == {"empty": 1}
    assert got["test"]["num_examples"] == report["test"]["num_examples"]
    # the device path agrees with the training-side evaluation (librosa features, Keras) on the same clips
    assert abs(got["test"]["accuracy"] - report["test"]["accuracy"]) <= 1.0 / got["test"]["num_examples"] + 1e-9


def test_bad_arguments_are_named(tmp_path):
    r = _train_cli("train", "--out", str(tmp_path), "--corpus", "crema-d", "--data", str(tmp_path / "nope"))
    assert r.returncode != 0 and "nope" in r.stderr
    r = _train_cli("evaluate", "--model", str(tmp_path / "m.tflite"), "--out", str(tmp_path), "--synthetic")
    assert r.returncode == 2 and "no metadata m.json" in r.stderr


def test_compare_puts_architectures_side_by_side(tmp_path):
    out = tmp_path / "cmp"
    r = _train_cli("compare", "--out", str(out), "--synthetic", "--architectures", "dnn,lstm", "--folds", "2",
                   "--epochs", "1", "--max-frames", "100", "--cache", str(tmp_path / "cache"), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert set(report["results"]) == {"dnn", "lstm"} and report["best"] in ("dnn", "lstm")
    for res in report["results"].values():
        assert len(res["folds"]) == 2 and res["seconds_per_epoch"] > 0
        assert res["pooled"]["num_examples"] == 6 * 4 * 6  # every clip of the synthetic corpus tested once
    md = (out / "compare.md").read_text()
    assert "| dnn" in md and "| lstm" in md and "Gans" in md and "target" in md
    assert (out / "confusion-lstm.png").stat().st_size > 1000


def test_replay_adds_the_models_own_embeddings_of_the_named_speakers(trained_model, synthetic_clips, tmp_path):
    import shutil

    import numpy as np

    from edge_sdk.model import ModelMetadata, TFLiteModel
    from models.evaluate import device_inputs

    model = tmp_path / "m.tflite"
    shutil.copy(trained_model.tflite_path, model)
    data = json.loads(trained_model.metadata_path.read_text())
    data["extra"].pop("replay")  # a model exported before replay sets existed
    (tmp_path / "m.json").write_text(json.dumps(data))
    speakers = sorted({c.speaker for c in synthetic_clips})[:3]
    csv = _manifest(tmp_path, synthetic_clips)
    r = _train_cli("replay", "--model", str(model), "--speakers", ",".join(speakers), "--per-class", "3",
                   "--corpus", "manifest", "--data", csv)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = ModelMetadata.load(tmp_path / "m.json")
    emb, labels = meta.replay_set()
    assert np.bincount(labels, minlength=meta.num_classes).tolist() == [3] * meta.num_classes
    mine = [c for c in synthetic_clips if c.speaker in speakers]
    kept, inputs, _ = device_inputs(mine, meta)
    tfl = TFLiteModel(model, meta)
    theirs = np.stack([tfl.infer(x)[1] for x in inputs])
    for e, y in zip(emb, labels, strict=True):  # each is one of those speakers' clips, with its label
        hit = np.flatnonzero(np.abs(theirs - e).max(axis=1) < 1e-5)
        assert hit.size and meta.labels.index(kept[hit[0]].label) == y
    r = _train_cli("replay", "--model", str(model), "--speakers", "nobody", "--corpus", "manifest", "--data", csv)
    assert r.returncode != 0 and "not in the corpus" in r.stderr


def _two_corpora(tmp_path, actors=(1, 2, 19, 20, 21), nemo_speakers=("EB0", "KD0", "KS0", "IC0")):
    """A RAVDESS tree (by default actors 1, 2, 19, 20, 21) and an nEMO tree (EB0, KD0, KS0, IC0), tones of the
    labels."""
    import numpy as np
    import soundfile

    from tests.models.test_datasets import nemo_tree

    pitch = {"01": 150, "03": 260, "04": 120, "05": 220, "anger": 220, "happiness": 260, "neutral": 150,
             "sadness": 120}

    def tone(path, seconds=1.2):
        path.parent.mkdir(parents=True, exist_ok=True)
        key = path.stem.split("-")[2] if "-" in path.stem else path.stem.split("_")[1]
        t = np.arange(int(16000 * seconds)) / 16000
        soundfile.write(path, 0.3 * np.sin(2 * np.pi * pitch.get(key, 200) * t * (1 + 0.05 * np.sin(5 * t))), 16000)

    rav = tmp_path / "ravdess"
    for actor in actors:
        for emo in ("01", "03", "04", "05"):
            for rep in ("01", "02"):
                tone(rav / f"Actor_{actor:02d}" / f"03-01-{emo}-01-01-{rep}-{actor:02d}.wav")
    nemo = nemo_tree(tmp_path / "nemo", speakers=nemo_speakers,
                     emotions=("anger", "happiness", "neutral", "sadness"), tone=tone)
    return rav, nemo


def test_two_corpora_at_once_with_figures_per_corpus(tmp_path):
    rav, nemo = _two_corpora(tmp_path)
    out = tmp_path / "run"
    r = _train_cli("train", "--out", str(out), "--corpus", "ravdess,nemo", "--data", f"nemo={nemo},ravdess={rav}",
                   "--epochs", "2", "--max-frames", "100", "--cache", str(tmp_path / "cache"), "--no-progress",
                   "--test-speakers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    split = report["split"]
    # the named test speakers (RAVDESS 21, nEMO IC0) are held out even though --test-speakers named another
    assert split["test_speakers"] == ["nemo-IC0", "ravdess-01", "ravdess-21"]
    assert "ravdess-19" in split["val_speakers"] and "ravdess-20" in split["val_speakers"]
    assert len([s for s in split["val_speakers"] if s.startswith("nemo-")]) == 1  # one nEMO speaker validates
    assert {s.split("-")[0] for s in split["train_speakers"]} == {"ravdess", "nemo"}
    assert not {"nemo-IC0", "ravdess-21"} & set(split["train_speakers"] + split["val_speakers"])
    by = report["test_by_corpus"]
    assert set(by) == {"nemo", "ravdess"} and by["nemo"]["num_examples"] == 8 and by["ravdess"]["num_examples"] == 16
    assert set(by["nemo"]["per_class"]) == {"angry", "happy", "neutral", "sad"}
    md = (out / "report.md").read_text()
    assert "Per corpus" in md and "| nemo | 8 |" in md and "| ravdess | 16 |" in md

    # --dry-run prints the split a run would use (the one this run used) and trains nothing
    r = _train_cli("train", "--out", str(tmp_path / "dry"), "--corpus", "ravdess,nemo", "--data",
                   f"nemo={nemo},ravdess={rav}", "--test-speakers", "1", "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    dry = json.loads(r.stdout)
    keys = ("train_speakers", "val_speakers", "test_speakers", "train_clips", "val_clips", "test_clips")
    assert {k: dry[k] for k in keys} == {k: split[k] for k in keys}
    assert dry["clips_by_corpus"]["nemo"]["test"] == 8 and dry["clips_by_corpus"]["ravdess"]["test"] == 16
    assert not (tmp_path / "dry" / "model.tflite").exists()

    # leave-one-corpus-out, trained: every nEMO speaker tests, RAVDESS alone trains and validates, and the report
    # scores the left-out corpus apart from the in-corpus test actors
    r = _train_cli("train", "--out", str(tmp_path / "loco"), "--corpus", "ravdess,nemo", "--data", f"{rav},{nemo}",
                   "--test-corpora", "nemo", "--epochs", "1", "--max-frames", "100", "--cache", str(tmp_path / "cache"),
                   "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    loco_report = json.loads((tmp_path / "loco" / "report.json").read_text())
    loco = loco_report["split"]
    assert {s for s in loco["test_speakers"] if s.startswith("nemo-")} == {f"nemo-{s}" for s in ("EB0", "KD0", "KS0",
                                                                                                  "IC0")}
    assert all(s.startswith("ravdess-") for s in loco["train_speakers"] + loco["val_speakers"])
    assert loco_report["test_by_corpus"]["nemo"]["num_examples"] == 32
    assert set(loco_report["test_by_corpus"]["nemo"]["per_class"]) == {"angry", "happy", "neutral", "sad"}
    assert (tmp_path / "loco" / "model.tflite").is_file()
    ev = tmp_path / "eval"
    r = _train_cli("evaluate", "--model", str(out / "model.tflite"), "--corpus", "nemo,ravdess", "--data",
                   f"{nemo},{rav}", "--speakers", "IC0,21", "--out", str(ev))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((ev / "evaluation.json").read_text())
    assert got["test_by_corpus"]["nemo"]["num_examples"] == 8 and got["test_by_corpus"]["ravdess"]["num_examples"] == 8


def test_corpus_list_and_data_roots_are_checked(tmp_path):
    r = _train_cli("train", "--out", str(tmp_path), "--corpus", "ravdess,savee")
    assert r.returncode != 0 and "unknown corpus 'savee'" in r.stderr
    r = _train_cli("train", "--out", str(tmp_path), "--corpus", "ravdess,nemo", "--data", str(tmp_path))
    assert r.returncode != 0 and "1 folders for 2 corpora" in r.stderr


def test_train_writes_input_affine_from_for_a_cnn_and_refuses_it_for_other_encoders(synthetic_clips, tmp_path):
    """Also ``--pitch`` (one training for both): the model takes two more columns (pitch, periodicity), the
    metadata says so, and edge_sdk's features and the TFLite runtime score the test speaker as training did."""
    from edge_sdk.model import ModelMetadata, TFLiteModel

    csv = _manifest(tmp_path, synthetic_clips)
    speakers = sorted({c.speaker for c in synthetic_clips})
    split = ["--test-speakers", speakers[-1], "--val-speakers", speakers[-2]]
    out = tmp_path / "run"
    r = _train_cli("train", "--out", str(out), "--corpus", "manifest", "--data", csv, *split, "--epochs", "1",
                   "--max-frames", "120", "--cache", str(tmp_path / "cache"), "--input-affine-from", "20",
                   "--features", "logmel", "--utterance-norm", "level", "--pitch", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = ModelMetadata.load(out / "model.json")
    model = TFLiteModel(out / "model.tflite", meta)
    assert meta.input_affine_from == 20 and model.has_input_grad
    assert meta.features.pitch and meta.features.n_features == meta.features.n_mels + 2
    assert json.loads((out / "model.json").read_text())["features"]["pitch"] is True
    assert model.infer(np.zeros((120, meta.features.n_features), np.float32))[0].shape == (meta.num_classes,)
    report = json.loads((out / "report.json").read_text())
    r = _train_cli("evaluate", "--model", str(out / "model.tflite"), "--corpus", "manifest", "--data", csv,
                   "--speakers", speakers[-1], "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert got["test"]["num_examples"] == report["test"]["num_examples"]
    assert abs(got["test"]["accuracy"] - report["test"]["accuracy"]) <= 1.0 / got["test"]["num_examples"] + 1e-9
    r = _train_cli("train", "--out", str(tmp_path / "dnn"), "--corpus", "manifest", "--data", csv, *split,
                   "--architecture", "dnn", "--epochs", "1", "--input-affine-from", "20", "--no-progress")
    assert r.returncode != 0 and "input_affine_from needs a cnn encoder" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "dnn" / "model.tflite").exists()
    # refused before the corpus is read (minutes of features on a real one): a missing corpus is not reached
    r = _train_cli("train", "--out", str(tmp_path / "early"), "--corpus", "manifest", "--data",
                   str(tmp_path / "no-such.csv"), "--architecture", "lstm", "--input-affine-from", "20")
    assert r.returncode != 0 and "input_affine_from needs a cnn encoder" in r.stderr, r.stderr[-2000:]


def test_a_baseline_job_can_train_the_bundled_recipe_and_its_values_are_range_checked(tmp_path):
    """The bundled model's recipe (both corpora, level removal, speed-perturbed copies, no validation) as an admin's
    baseline job: accepted, and it reaches fedser-train as the same configuration; out-of-range values are refused
    with their name before a process starts."""
    from aggregator.jobs import JobError, _check, _train_argv
    from models.cli import _configs, build_parser
    from models.features import Augmentation

    (tmp_path / "r").mkdir()
    (tmp_path / "n").mkdir()
    recipe = {"corpus": "ravdess,nemo", "data": f"ravdess={tmp_path / 'r'},nemo={tmp_path / 'n'}",
              "features": "logmel", "utterance_norm": "level", "augment": 2, "augment_speed": "0.8,1.25",
              "augment_gain_db": "0,0", "augment_snr_db": "90,90", "epochs": 20, "val_speakers": "none",
              "input_affine_from": 20}
    args = build_parser().parse_args(_train_argv(_check(recipe), tmp_path / "out"))
    features, config = _configs(args)
    assert args.corpus == "ravdess,nemo" and args.val_speakers == "none" and features.utterance_norm == "level"
    assert not features.pitch
    assert _configs(build_parser().parse_args(_train_argv(_check({**recipe, "pitch": True}), tmp_path / "out",
                                                          tmp_path / "cache")))[0].pitch
    assert config.epochs == 20 and config.augmentation == Augmentation(copies=2, speed=(0.8, 1.25),
                                                                       gain_db=(0.0, 0.0), snr_db=(90.0, 90.0))
    # a job that names no front end trains with fedser-train's defaults (log-mel, level), and its stored parameters
    # say so; one that names the old front end keeps it
    plain = _check({})
    assert (plain["features"], plain["utterance_norm"]) == ("logmel", "level")
    features, _ = _configs(build_parser().parse_args(_train_argv(plain, tmp_path / "out")))
    assert (features.kind, features.utterance_norm) == ("logmel", "level")
    old = _check({"features": "mfcc", "utterance_norm": "none"})
    features, _ = _configs(build_parser().parse_args(_train_argv(old, tmp_path / "out")))
    assert (features.kind, features.utterance_norm) == ("mfcc", "none")
    # a range starting with a minus sign is one argument, not another option
    args = build_parser().parse_args(_train_argv(_check({"augment_gain_db": "-6,-3", "test_speakers": "-x"}),
                                                 tmp_path / "out"))
    assert _configs(args)[1].augmentation.gain_db == (-6.0, -3.0) and args.test_speakers == "-x"
    for bad, why in (({"corpus": "ravdess,savee"}, "unknown corpus 'savee'"), ({"corpus": "nemo,nemo"}, "twice"),
                     ({"features": "bogus"}, "features must be one of"), ({"max_frames": 0}, "1..2000"),
                     ({"max_frames": 100_000}, "1..2000"),
                     ({"corpus": "ravdess,nemo", "data": str(tmp_path / "r")}, "1 folders for 2 corpora"),
                     ({"corpus": "ravdess,nemo", "data": "ravdess=,nemo="}, "not found"),
                     ({"corpus": "nemo", "data": f"ravdess={tmp_path / 'r'}"}, "not found"),
                     ({"augment": 9}, "0..8"), ({"utterance_norm": "loud"}, "utterance_norm must be one of"),
                     ({"augment_speed": "0.8"}, "two numbers"), ({"augment_speed": "1.25,0.8"}, "lo <= hi"),
                     ({"augment_snr_db": "0,120"}, "<= 90"), ({"augment_gain_db": "x,1"}, "two numbers"),
                     ({"corpus": "ravdess,nemo", "data": f"{tmp_path / 'r'},{tmp_path / 'missing'}"}, "missing")):
        try:
            _check(bad)
        except JobError as exc:
            assert why in str(exc), (bad, str(exc))
        else:
            raise AssertionError(f"{bad} was accepted")


def test_a_baseline_job_takes_input_affine_from_range_checked():
    from aggregator.jobs import JobError, _check, _train_argv

    assert _check({"input_affine_from": 20})["input_affine_from"] == 20
    assert "--input-affine-from=20" in _train_argv(_check({"input_affine_from": 20}), REPO / "out")
    for bad, why in (({"input_affine_from": 100_001}, "0..100000"), ({"input_affine_from": -1}, "non-negative"),
                     ({"input_affine_from": 20, "architecture": "lstm"}, "needs architecture cnn")):
        try:
            _check(bad)
        except JobError as exc:
            assert why in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")


@pytest.mark.slow  # 40-60 s: three runs of the research tool (scripts/test.sh --slow)
def test_recipe_search_runs_refits_and_ensembles_on_generated_corpora(tmp_path):
    """``python -m models.recipe_search`` (the bundled model's recipe search, task B) on generated trees of both
    corpora: a run validates on RAVDESS 19-20 and nEMO WR0; ``--refit`` trains those too, validates on nothing and
    writes NAME-refit rows, exports and logits beside the run's, overwriting none; an ensemble of refit logits has no
    validation figure (it was NaN); the table shows "-" for it. Named test speakers never train."""
    import os

    rav, nemo = _two_corpora(tmp_path, actors=(1, 2, 19, 20, 21, 22, 23, 24),
                             nemo_speakers=("EB0", "KD0", "KS0", "MP0", "SM0", "WR0", "IC0", "MK0", "TP0"))
    env = dict(os.environ, FEDSER_RAVDESS=str(rav), FEDSER_NEMO=str(nemo))
    define = 'T={"base": "B0", "features": {"max_frames": 60}, "train": {"epochs": 1, "patience": 0}}'
    common = ["--task", "B", "--recipes", "T", "--define", define, "--seeds", "0", "--out", str(tmp_path / "rs"),
              "--cache", str(tmp_path / "cache"), "--save-logits", str(tmp_path / "logits")]

    def search(*args):
        r = subprocess.run([sys.executable, "-m", "models.recipe_search", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    search("run", *common, "--export", str(tmp_path / "exp"))
    search("run", *common, "--export", str(tmp_path / "exp"), "--refit")
    search("ensemble", *common, "--refit", "--size", "1")
    rows = [json.loads(x) for x in (tmp_path / "rs" / "results.jsonl").read_text().splitlines()]
    run, refit, ens = rows
    assert (run["recipe"], refit["recipe"], ens["recipe"]) == ("T", "T-refit", "T-refit-ens1")
    assert run["val_speakers"] == ["nemo-WR0", "ravdess-19", "ravdess-20"] and run["final_val_uar"] is not None
    assert refit["val_speakers"] == [] and refit["best_val_uar"] is None and refit["final_val_uar"] is None
    assert ens["final_val_uar"] is None and ens["members"] == [0]
    for row in rows:
        assert row["nemo_test"]["n"] == 3 * 8 and row["ravdess_test"]["n"] == 4 * 8  # IC0/MK0/TP0, actors 21-24
    assert ens["nemo_test"] == refit["nemo_test"]  # an ensemble of one is its member
    for name in ("T-seed0", "T-refit-seed0"):
        assert (tmp_path / "exp" / name / "model.tflite").stat().st_size > 0
        assert (tmp_path / "logits" / f"{name}.npz").exists()
    trained = json.loads((tmp_path / "exp" / "T-refit-seed0" / "report.json").read_text())["split"]["train_speakers"]
    assert {"nemo-WR0", "ravdess-19", "ravdess-20"} <= set(trained)
    assert not {"nemo-IC0", "nemo-MK0", "nemo-TP0", "ravdess-21", "ravdess-24"} & set(trained)
    table = search("table", "--out", str(tmp_path / "rs")).stdout
    assert "| T-refit | " in table and "| T-refit-ens1 | " in table
    assert [line.split(" | ")[3] for line in table.splitlines() if line.startswith("| T-refit")] == ["-", "-"]

    # cross-validation on non-test speakers: fold 2 scores nEMO SM0 + WR0 and RAVDESS 19-20, trains on the rest of
    # the non-test speakers for the recipe's epochs, and scores no named test speaker
    cv = ["--task", "B", "--recipes", "T,U", "--define", define, "--define", define.replace("T=", "U=", 1),
          "--seeds", "0", "--out", str(tmp_path / "cv"), "--cache", str(tmp_path / "cache")]
    search("run", *cv, "--cv-folds", "0,2", "--export", str(tmp_path / "cvexp"))
    rows = [json.loads(x) for x in (tmp_path / "cv" / "results.jsonl").read_text().splitlines()]
    assert [(r["recipe"], r["cv_fold"]) for r in rows] == [("T-cv0", 0), ("T-cv2", 2), ("U-cv0", 0), ("U-cv2", 2)]
    for r in rows:
        assert r["nemo_cv"]["n"] == 2 * 8 and r["ravdess_cv"]["n"] == 2 * 8 and "nemo_test" not in r
    split = json.loads((tmp_path / "cvexp" / "T-cv2-seed0" / "report.json").read_text())["split"]
    assert split["test_speakers"] == ["nemo-SM0", "nemo-WR0", "ravdess-19", "ravdess-20"] and not split["val_speakers"]
    assert {"nemo-EB0", "nemo-MP0", "ravdess-01"} <= set(split["train_speakers"])
    assert not {"nemo-IC0", "nemo-SM0", "ravdess-19", "ravdess-21"} & set(split["train_speakers"])
    table = search("table", "--out", str(tmp_path / "cv")).stdout
    assert "cross-validated" in table and "| T | 2 | " in table and "| U | 2 | " in table
    r = subprocess.run([sys.executable, "-m", "models.recipe_search", "run", *cv, "--cv-folds", "0", "--refit"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "--cv-folds is for run --task B, without --refit" in r.stderr
    for bad in ("0,3", "0,,1"):  # refused before anything trains
        r = subprocess.run([sys.executable, "-m", "models.recipe_search", "run", *cv, "--cv-folds", bad],
                           cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and "fold numbers 0..2" in r.stderr, (bad, r.stderr[-500:])
