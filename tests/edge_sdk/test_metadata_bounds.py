"""Model metadata is input from the aggregator (or a file beside the model): every field is range-checked and must
describe the model it comes with. Before, a typo in a published model's metadata (n_fft 10**8, max_frames 10**9)
was signed, installed and then exhausted a device's memory; a field of the wrong type was a traceback."""

import base64
import json
import math

import pytest

from edge_sdk.errors import ModelError, ParameterError
from edge_sdk.features import FeatureConfig
from edge_sdk.model import ModelMetadata, TFLiteModel, bundled_model_paths

ONE_EMBEDDING = base64.b64encode(bytes(128 * 4)).decode()  # one 128-float embedding, the bundled model's size


def _bundled() -> tuple:
    paths = bundled_model_paths()
    assert paths is not None
    return paths[0], json.loads(paths[1].read_text())


@pytest.mark.parametrize("field, value", [
    ("n_fft", 10**8), ("win_length", 10**8), ("max_frames", 10**9), ("max_frames", 0), ("sample_rate", 10**12),
    ("sample_rate", 100), ("hop_length", 0), ("n_mels", 100000), ("n_fft", True), ("max_frames", 30.5),
    ("top_db", math.nan), ("top_db", -1.0), ("trim_db", math.inf), ("fmin", "0"), ("fmax", 9000.0),
])
def test_feature_config_fields_out_of_range_are_refused_by_name(field, value):
    with pytest.raises(ParameterError, match=field):
        FeatureConfig(**{"kind": "logmel", field: value})


def test_the_defaults_and_the_shipped_models_configs_still_pass():
    FeatureConfig()
    whole = FeatureConfig(n_fft=512.0, win_length=400.0)  # whole numbers written as floats in a hand-edited file
    assert whole.n_fft == 512 and isinstance(whole.n_fft, int) and isinstance(whole.win_length, int)
    FeatureConfig(kind="logmel", sample_rate=8000, n_fft=256, win_length=200, hop_length=80, fmax=4000.0)
    FeatureConfig(kind="logmel", sample_rate=48000, n_fft=2048, win_length=1200, hop_length=480, n_mels=128)
    _, meta = _bundled()
    ModelMetadata.from_dict(meta)


@pytest.mark.parametrize("change, field", [
    ({"embedding_dim": "abc"}, "embedding_dim"),
    ({"embedding_dim": 0}, "embedding_dim"),
    ({"train_batch_size": 10**9}, "train_batch_size"),
    ({"labels": 5}, "labels"),
    ({"labels": ["angry", "angry"]}, "labels"),
    ({"labels": ["angry", 3]}, "labels"),
    ({"features": "x"}, "features"),
    ({"features": {"n_fft": 10**8}}, "features"),
    ({"features": {"colour": "blue"}}, "features"),
    ({"normalization": None}, "normalization"),
    ({"normalization": {"mean": [0.0], "std": [1.0]}}, "normalization"),
    ({"normalization": {"mean": "abc", "std": "abd"}}, "normalization"),
    ({"head_layout": 7}, "head_layout"),
    ({"extra": [1, 2]}, "extra"),
    ({"extra": {"replay": {"embeddings": "not base64!", "labels": [0]}}}, "replay"),
    ({"extra": {"replay": {"embeddings": ONE_EMBEDDING, "labels": [10**30]}}}, "replay"),  # was an OverflowError
    ({"extra": {"replay": {"embeddings": ONE_EMBEDDING, "labels": [0.7]}}}, "replay"),  # was read as class 0
    ({"extra": {"replay": {"embeddings": ONE_EMBEDDING, "labels": [4]}}}, "replay"),
    ({"architecture": 5}, "architecture"),
    ({"device_learning_rate": "fast"}, "learning"),
])
def test_malformed_metadata_is_a_model_error_naming_the_field(change, field):
    _, meta = _bundled()
    if "features" in change and isinstance(change["features"], dict):
        change = {"features": {**meta["features"], **change["features"]}}
    with pytest.raises(ModelError, match=field):
        ModelMetadata.from_dict({**meta, **change})


def test_metadata_that_is_not_an_object_or_lacks_a_field_is_a_model_error():
    _, meta = _bundled()
    for data in ([1, 2], None, "x", 5):
        with pytest.raises(ModelError, match="JSON object"):
            ModelMetadata.from_dict(data)
    del meta["embedding_dim"]
    with pytest.raises(ModelError, match="lacks the field 'embedding_dim'"):
        ModelMetadata.from_dict(meta)


@pytest.mark.parametrize("change, what", [
    ({"features": {"max_frames": 299}}, r"'infer' input 'features' has shape \[1, 300, 40\], .* gives \[1, 299, 40\]"),
    ({"features": {"n_mels": 41}}, r"'infer' input 'features' has shape \[1, 300, 40\], .* gives \[1, 300, 41\]"),
    ({"labels": ["angry", "happy", "neutral", "sad", "calm"]}, r"'infer' output 'probs' has shape \[1, 4\]"),
    ({"embedding_dim": 64}, r"'infer' output 'embedding' has shape \[1, 128\]"),
    ({"train_batch_size": 8}, r"'head' input 'embeddings' has shape \[16, 128\]"),
])
def test_metadata_that_does_not_describe_the_model_is_refused_when_it_is_loaded(change, what):
    tflite, meta = _bundled()
    if "n_mels" in change.get("features", {}):  # the normalisation follows the columns, as a publisher's would
        meta["normalization"] = {"mean": [0.0] * 41, "std": [1.0] * 41}
    if "features" in change:
        change = {"features": {**meta["features"], **change["features"]}}
    if "embedding_dim" in change:
        meta["extra"] = {k: v for k, v in meta["extra"].items() if k != "replay"}
    metadata = ModelMetadata.from_dict({**meta, **change})
    with pytest.raises(ModelError, match=f"does not describe this model: signature {what}"):
        TFLiteModel(tflite, metadata)
    TFLiteModel(tflite, ModelMetadata.from_dict(_bundled()[1]))  # the real one loads
