"""Fixtures and helpers shared by the edge SDK's tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.device import Device


@dataclass
class ModelFiles:  # what LiveAggregator.publish reads
    tflite_path: Path
    metadata_path: Path


def clip(seed: int, sample_rate: int = 16000) -> np.ndarray:
    """1.5 s of a voiced-like tone (one of 17 pitches) with a little noise: a different clip for each seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(1.5 * sample_rate), dtype=np.float32) / sample_rate
    return (0.2 * np.sin(2 * np.pi * (110 + 23 * (seed % 17)) * t)
            + 0.02 * rng.normal(size=t.size)).astype(np.float32)


@pytest.fixture
def device(tmp_path):
    """A fresh device on the bundled model (skipped in a checkout without it)."""
    dev = Device(tmp_path / "dev")
    if dev.model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    return dev


@pytest.fixture(scope="session")
def deep_files(trained_model, tmp_path_factory) -> tuple[Path, Path]:
    """(tflite, json) of the session's trained model exported with the deep head (``trainable_embedding``: the
    encoder's embedding layer in the trainable head, w0..b2; infer's embedding the pooled vector)."""
    from models.export import export_tflite

    r = trained_model.result
    res = export_tflite(r.encoder, r.head_weights, r.metadata, tmp_path_factory.mktemp("deep"),
                        trainable_embedding=True)
    return res.tflite_path, res.metadata_path
