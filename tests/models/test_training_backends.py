"""Training where the audio or TensorFlow is missing: feature packs, and Keras on JAX (a GPU host whose only CUDA
stack is JAX's), exported afterwards on a host with TensorFlow (tools/bench_training.py, fedser-train export)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edge_sdk.errors import ModelError, ParameterError
from edge_sdk.features import FeatureConfig
from tests.conftest import REPO


@pytest.fixture(scope="module")
def a0_pack(synthetic_clips, tmp_path_factory):
    """The synthetic corpus's features as recipe A0 computes them: train, val, test, reference parts."""
    from models.datasets import split_by_speaker
    from models.features import compute_features, save_feature_pack
    from models.recipe_search import RECIPES, _configs

    features, _, _ = _configs(RECIPES["A0"], 0)
    speakers = sorted({c.speaker for c in synthetic_clips})
    rest, test = split_by_speaker(synthetic_clips, speakers[-1:])
    train, val = split_by_speaker(rest, speakers[-2:-1])
    cache = tmp_path_factory.mktemp("cache")
    parts = {name: compute_features(clips, features, cache_dir=cache)
             for name, clips in (("train", train), ("val", val), ("test", test))}
    parts["reference"] = compute_features([c for c in train if c.label == "neutral"][:3], features, cache_dir=cache)
    path = save_feature_pack(tmp_path_factory.mktemp("pack") / "pack.npz", parts, features)
    return path, parts, features


def test_a_feature_pack_round_trips_clips_frames_and_config(a0_pack):
    from models.features import load_feature_pack

    path, parts, features = a0_pack
    loaded, cfg = load_feature_pack(path)
    assert cfg == features and sorted(loaded) == sorted(parts)
    for name, fs in parts.items():
        assert loaded[name].clips == fs.clips and loaded[name].skipped == fs.skipped
        assert len(loaded[name].raw) == len(fs.raw)
        for a, b in zip(loaded[name].raw, fs.raw, strict=True):
            np.testing.assert_array_equal(a, b.astype(np.float32))


def test_training_from_a_pack_uses_its_split_and_reference(a0_pack):
    from models.features import load_feature_pack
    from models.recipe_search import RECIPES, _configs
    from models.train import train_baseline

    path, parts, features = a0_pack
    _, config, arch = _configs(RECIPES["A0"], 0)
    from dataclasses import replace

    loaded, cfg = load_feature_pack(path)
    result = train_baseline((), (), precomputed=(loaded, cfg), features=features, architecture=arch,
                            config=replace(config, epochs=1, replay_per_class=2))
    split = result.report["split"]
    assert split["train_clips"] == len(parts["train"].clips) and split["val_clips"] == len(parts["val"].clips)
    assert split["test_speakers"] == sorted({c.speaker for c in parts["test"].clips})
    assert split["reference_only_clips"] == len(parts["reference"].clips) > 0
    assert result.report["feature_seconds"] < 1.0  # nothing computed
    assert result.report["hardware"]["backend"] == "tensorflow"
    assert result.report["hardware"]["framework"].startswith("TensorFlow ")
    with pytest.raises(ParameterError, match="precomputed features were computed with"):
        train_baseline((), (), precomputed=(loaded, replace(cfg, n_mels=32)), features=features,
                       architecture=arch, config=config)
    with pytest.raises(ParameterError, match=r"lack the part\(s\) \['val'\]"):
        train_baseline((), (), precomputed=({"train": loaded["train"]}, cfg), features=features,
                       architecture=arch, config=config)


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_bad_feature_packs_are_refused_with_what_is_wrong(a0_pack, tmp_path):
    from models.features import load_feature_pack

    path, _, _ = a0_pack
    good = dict(np.load(path, allow_pickle=False))
    bad = tmp_path / "bad.npz"
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a feature pack"):
        load_feature_pack(tmp_path / "text.npz")
    _write_npz(bad, **{**good, "format": np.array("something/else")})
    with pytest.raises(ValueError, match="not a fedser-feature-pack/1 file"):
        load_feature_pack(bad)
    _write_npz(bad, **{**good, "train__lengths": good["train__lengths"] + 1})
    with pytest.raises(ValueError, match="part 'train': lengths, frames"):
        load_feature_pack(bad)
    frames = good["val__frames"].copy()
    frames[0, 0] = np.nan
    _write_npz(bad, **{**good, "val__frames": frames})
    with pytest.raises(ValueError, match="part 'val' holds non-finite"):
        load_feature_pack(bad)
    _write_npz(bad, **{k: v for k, v in good.items() if k != "test__label"})
    with pytest.raises(ValueError, match="lacks 'test__label'"):
        load_feature_pack(bad)
    _write_npz(bad, **{**good, "test__label": np.array([{"a": 1}] * len(good["test__label"]), dtype=object)})
    with pytest.raises(ValueError, match="malformed feature pack .*pickle"):  # an object array is never loaded
        load_feature_pack(bad)
    lengths = good["train__lengths"].copy()
    lengths[0], lengths[1] = 0, lengths[0] + lengths[1]
    _write_npz(bad, **{**good, "train__lengths": lengths})
    with pytest.raises(ValueError, match="part 'train': lengths, frames"):
        load_feature_pack(bad)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="a single array, not an .npz archive"):
        load_feature_pack(tmp_path / "one.npy")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a feature pack"):
        load_feature_pack(tmp_path / "cut.npz")


@pytest.fixture(scope="module")
def trained_folder(a0_pack, tmp_path_factory):
    """A one-epoch A0 model of the pack saved as a training run on another backend leaves it."""
    from dataclasses import replace

    from models.export import save_trained
    from models.features import load_feature_pack
    from models.recipe_search import RECIPES, _configs
    from models.train import train_baseline

    path, _, features = a0_pack
    _, config, arch = _configs(RECIPES["A0"], 0)
    res = train_baseline((), (), precomputed=load_feature_pack(path), features=features, architecture=arch,
                         config=replace(config, epochs=1, replay_per_class=0))
    out = tmp_path_factory.mktemp("trained")
    save_trained(res.encoder, res.head_weights, res.metadata, out)
    return out


def test_export_of_a_trained_folder_names_what_is_wrong(trained_folder, tmp_path):
    import shutil

    from models.export import export_trained

    with pytest.raises(ModelError, match="trained.json"):
        export_trained(tmp_path)
    (tmp_path / "trained.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ModelError, match="not a fedser-trained/1 file"):
        export_trained(tmp_path)
    good = json.loads((trained_folder / "trained.json").read_text())
    arrays = dict(np.load(trained_folder / "trained.npz", allow_pickle=False))

    def case(info=None, **npz):
        folder = tmp_path / f"case{len(list(tmp_path.glob('case*')))}"
        folder.mkdir()
        (folder / "trained.json").write_text(json.dumps(good if info is None else info))
        _write_npz(folder / "trained.npz", **{**arrays, **npz})
        return folder

    for info, match in (({**good, "metadata": 3}, "holds no model metadata"),
                        ({**good, "architecture": None}, "names no architecture"),
                        ({**good, "architecture": {"name": "cnn", "wings": 2}}, "bad architecture"),
                        ({**good, "encoder_weights": 10**9}, "encoder_weights must be a count in 1..1000"),
                        ({**good, "encoder_weights": "7"}, "encoder_weights must be a count"),
                        ({**good, "encoder_weights": 2}, "do not fit a cnn encoder")):
        with pytest.raises(ModelError, match=match):
            export_trained(case(info))
    with pytest.raises(ModelError, match="head_w1 is not finite"):
        export_trained(case(head_w1=np.full_like(arrays["head_w1"], np.nan)))
    with pytest.raises(ModelError, match="do not match the metadata's head layout"):
        export_trained(case(head_w1=arrays["head_w1"][:, :2]))
    with pytest.raises(ModelError, match="replay_x and replay_y come together"):
        export_trained(case(replay_x=np.zeros((2, 3), np.float32)))
    folder = case()
    (folder / "trained.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ModelError, match="not a readable .npz"):
        export_trained(folder)
    shutil.copy(trained_folder / "trained.npz", folder / "trained.npz")
    assert export_trained(folder).size > 0  # the same files, whole, export


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax (pip install 'fedser[dev]')")
def test_keras_on_jax_without_tensorflow_trains_and_the_export_here_matches(a0_pack, tmp_path):
    """The GPU path of tools/bench_training_gpu.sh on this CPU: a process where TensorFlow cannot be imported
    trains recipe A0 on a pack with KERAS_BACKEND=jax and leaves trained.npz; `fedser-train export --trained`
    here writes a .tflite whose predictions, through the device's TFLite runtime, score what Keras-on-JAX scored."""
    from models.features import load_feature_pack
    from models.recipe_search import RECIPES, _configs

    path, _, _ = a0_pack
    out = tmp_path / "run"
    code = ("import sys; sys.modules['tensorflow'] = None\n"  # as if TensorFlow were not installed
            "from tools.bench_training import main\n"
            f"sys.exit(main(['train', '--pack', {str(path)!r}, '--recipe', 'A0', '--epochs', '2', "
            f"'--trainable-embedding', '--out', {str(out)!r}]))\n")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["backend"] == "jax" and row["exported"] is False and row["epochs_run"] == 2
    assert (out / "trained.npz").exists() and not (out / "model.tflite").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["export"].startswith("pending: trained on Keras backend 'jax'")
    assert report["hardware"]["framework"].startswith("Keras ") and "jax" in report["hardware"]["framework"]

    r = subprocess.run([sys.executable, "-m", "models.cli", "export", "--trained", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout and (out / "model.tflite").stat().st_size > 0

    from edge_sdk.model import ModelMetadata, TFLiteModel

    meta = ModelMetadata.load(out / "model.json")
    assert meta.extra["trainable_embedding"] is True and meta.device_learning_rate == 0.01
    assert meta.replay_set() is not None
    model = TFLiteModel(out / "model.tflite", meta)
    parts, features = load_feature_pack(path)
    _, config, _ = _configs(RECIPES["A0"], 0)
    x = parts["test"].model_inputs(features, meta.normalization)
    y = parts["test"].labels(list(meta.labels))
    pred = np.array([int(np.argmax(model.infer(xi)[0])) for xi in x])
    from models.metrics import classification_report

    assert classification_report(y, pred, list(meta.labels))["uar"] == pytest.approx(report["test"]["uar"], abs=1e-9)


def test_a_model_trained_elsewhere_does_not_fit_another_architecture(trained_folder, tmp_path):
    import shutil

    from models.export import export_trained

    shutil.copytree(trained_folder, tmp_path / "t")
    info = json.loads((tmp_path / "t" / "trained.json").read_text())
    info["architecture"]["channels"] = [8, 8, 8]
    (tmp_path / "t" / "trained.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match="do not fit a cnn encoder"):
        export_trained(tmp_path / "t")
    assert FeatureConfig.from_dict(info["metadata"]["features"]).kind == "logmel"


@pytest.mark.slow  # 20 s (scripts/test.sh --slow): a refusal after a training on JAX
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax (pip install 'fedser[dev]')")
def test_keras_on_jax_with_tensorflow_installed_saves_the_weights_and_refuses_to_export(a0_pack, tmp_path):
    """TensorFlow importable but the models are JAX's: tf.function cannot trace them, so training saves
    trained.npz (not a crash after training), and `fedser-train export` on the JAX backend says what to change."""
    path, _, _ = a0_pack
    out = tmp_path / "run"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "tools.bench_training", "train", "--pack", str(path), "--recipe", "A0",
                        "--epochs", "1", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "trained.npz").exists() and not (out / "model.tflite").exists()
    assert "export: pending: trained on Keras backend 'jax'" in (out / "report.md").read_text()
    r = subprocess.run([sys.executable, "-m", "models.cli", "export", "--trained", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "needs the TensorFlow Keras backend, not 'jax'" in r.stderr
