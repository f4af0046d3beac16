"""Shared fixtures: a small trained model, a live aggregator on loopback, enrolled devices."""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("FEDSER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def ravdess_root() -> Path:
    from models.datasets import default_ravdess_root

    root = default_ravdess_root()
    if root is None:
        pytest.skip("RAVDESS not found (set FEDSER_RAVDESS or put it at ../shared/data/ravdess)")
    return root


@pytest.fixture(scope="session")
def synthetic_clips(tmp_path_factory):
    from models.datasets import synthetic_corpus

    return synthetic_corpus(tmp_path_factory.mktemp("synthetic"), speakers=5, clips_per_label=4)


@dataclass
class TrainedModel:
    tflite_path: Path
    metadata_path: Path
    result: object  # models.train.TrainResult

    @property
    def metadata(self):
        return self.result.metadata


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, synthetic_clips) -> TrainedModel:
    """A small CNN trained for two epochs on the synthetic corpus and exported (about 15 s)."""
    from models.architectures import ArchitectureConfig
    from models.datasets import split_by_speaker
    from models.train import TrainConfig, train_baseline

    speakers = sorted({c.speaker for c in synthetic_clips})
    train, test = split_by_speaker(synthetic_clips, speakers[-1:])
    train, val = split_by_speaker(train, speakers[-2:-1])
    out = tmp_path_factory.mktemp("model")
    result = train_baseline(
        train, val, test, config=TrainConfig(epochs=2, batch_size=16, train_batch_size=8),
        architecture=ArchitectureConfig(channels=(16, 32), embedding_dim=32, head_units=16),
        out_dir=out, cache_dir=tmp_path_factory.mktemp("cache"), dataset_name="synthetic",
    )
    return TrainedModel(result.export.tflite_path, result.export.metadata_path, result)


def postgres_database() -> str:
    """URL of a new, empty PostgreSQL database; skips with the reason when none is reachable."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg (PostgreSQL driver) is not installed")
    name = f"fedser_test_{uuid.uuid4().hex[:10]}"
    try:
        conn = psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}".strip())
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


@dataclass
class LiveAggregator:
    base_url: str
    instance: Path
    admin_token: str
    process: subprocess.Popen

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def post_admin(self, path: str, **kwargs) -> requests.Response:
        return requests.post(f"{self.base_url}/api/v1/admin{path}", headers=self.auth, timeout=60, **kwargs)

    def post_update(self, data: bytes) -> requests.Response:
        return requests.post(f"{self.base_url}/api/v1/updates", data=data, timeout=30)

    def status(self) -> dict:
        r = requests.get(f"{self.base_url}/api/v1/admin/status", headers=self.auth, timeout=10)
        r.raise_for_status()
        return r.json()

    def publish(self, model: TrainedModel) -> int:
        with open(model.tflite_path, "rb") as t, open(model.metadata_path, "rb") as m:
            r = self.post_admin("/models", files={"tflite": t, "metadata": m})
        assert r.status_code == 201, r.text
        return r.json()["version"]

    def enroll(self, state_dir: Path, name: str = "", **device_kwargs):
        """A new Device in ``state_dir``, enrolled with a fresh one-time token."""
        from edge_sdk.device import Device

        token = self.post_admin("/enrollment-tokens", json={}).json()["token"]
        device = Device(state_dir, **device_kwargs)
        device.enroll(self.base_url, token, name=name)
        return device


def start_live_aggregator(tmp: Path, *, min_updates: int, database_url: str | None = None,
                          workers: int = 2, env: dict | None = None, port: int | None = None) -> LiveAggregator:
    from tools.demo import admin_token, free_port, start_aggregator

    instance = tmp / "instance"
    instance.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = start_aggregator(instance, port, min_updates=min_updates, workers=workers, database_url=database_url,
                            env=env)
    return LiveAggregator(f"http://127.0.0.1:{port}", instance, admin_token(instance), proc)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str | None:
    if request.param == "sqlite":
        return None  # the aggregator's default: SQLite in its instance folder
    return postgres_database()


@pytest.fixture
def live_aggregator(tmp_path, database_url):
    agg = start_live_aggregator(tmp_path, min_updates=2, database_url=database_url)
    yield agg
    agg.process.terminate()
    agg.process.wait(timeout=30)


def signed_update(device_id: str, key, layout, *, sequence: int, base_version: int = 1, scale: float = 0.01,
                  num_examples: int = 5, rng: np.random.Generator | None = None):
    """An UpdateEnvelope of random deltas (``scale`` standard deviation) signed with ``key``."""
    from edge_sdk.wire import UpdateEnvelope

    rng = rng or np.random.default_rng(sequence)
    deltas = {s.name: (scale * rng.standard_normal(s.shape)).astype(np.float32) for s in layout}
    return UpdateEnvelope.create(device_id=device_id, base_version=base_version, layout=layout, deltas=deltas,
                                 num_examples=num_examples, sequence=sequence, sign=key.sign)
