"""A device with one damaged file still starts, classifies, says what it found; `sync` repairs it (issue 11, item 5).

An enrolled device on version 2 (version 1 installed before it) against a real aggregator on loopback; one
byte of one file flipped at a time: the base ``.tflite``, the head weights, ``manifest.json``, the personal
head, the store. Then ``Device(...)``, ``classify``, ``status`` and ``sync`` (in process and through the
``fedser-edge`` command line), and a restart that finds nothing wrong.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from edge_sdk.device import Device, TrainPolicy
from edge_sdk.model import bundled_model_paths
from tests.conftest import REPO, start_live_aggregator
from tests.edge_sdk.conftest import ModelFiles, clip

pytestmark = pytest.mark.skipif(bundled_model_paths() is None, reason="no bundled model in this checkout")

POLICY = TrainPolicy(min_examples=4, holdout_every=0, epochs=3)


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory):
    """(aggregator, state folder of a personalised device on version 2 with version 1 installed before)."""
    tmp = tmp_path_factory.mktemp("repair")
    agg = start_live_aggregator(tmp / "srv", min_updates=50, workers=0)
    try:
        files = ModelFiles(*bundled_model_paths())
        assert agg.publish(files) == 1
        dev = agg.enroll(tmp / "golden", train_policy=POLICY)
        assert dev.model_version == 1
        for i in range(6):
            dev.feedback(dev.classify(clip(i)).id, dev.metadata.labels[i % 4])
        assert agg.publish(files) == 2
        assert dev.pull_model() and dev.model_version == 2 and dev.personalized
        assert (tmp / "golden" / "personal.head").exists()
        dev.store.close()
        yield agg, tmp / "golden"
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _target(state: Path, which: str) -> tuple[Path, int | None]:
    manifest = json.loads((state / "manifest.json").read_text())["manifest"]
    return {
        "base": (state / "models" / f"{manifest['base']['sha256']}.tflite", None),
        "head": (state / "models" / f"{manifest['head']['sha256']}.head", None),
        "manifest": (state / "manifest.json", None),
        "personal": (state / "personal.head", None),
        "store-header": (state / "fedser.db", 0),  # "SQLite format 3": not a database any more
        "store-page": (state / "fedser.db", 8192),  # the first byte of page 3 (a b-tree page's type)
    }[which]


# (damaged, the file status names, the version classifying before sync: the previous one or the bundled one)
CASES = [("base", "manifest.json", 0), ("head", "manifest.json", 0), ("manifest", "manifest.json", 1),
         ("personal", "personal.head", 2), ("store-header", "fedser.db", 2), ("store-page", "fedser.db", 2)]


@pytest.mark.parametrize(("which", "named", "fallback_version"), CASES)
def test_a_device_with_one_damaged_file_starts_classifies_and_sync_repairs_it(enrolled, tmp_path, which, named,
                                                                              fallback_version):
    _, golden = enrolled
    state = tmp_path / "dev"
    shutil.copytree(golden, state)
    path, offset = _target(state, which)
    _flip(path, offset)

    dev = Device(state, train_policy=POLICY)  # must not raise
    status = dev.status()
    assert [p["file"] for p in status["problems"]] and named in [p["file"] for p in status["problems"]], status
    assert dev.model_version == fallback_version
    if which == "store-page":  # one damaged page: the tables that still read in full were copied over
        assert "could still be read" in status["problems"][0]["action"] and status["predictions"] >= 6, status
    pred = dev.classify(clip(1))
    assert pred.model_version == fallback_version and abs(sum(pred.probs.values()) - 1) < 1e-4
    if fallback_version != 2:  # the personal head belongs to version 2: not applied to another model
        assert not dev.personalized

    report = dev.sync()
    assert report.error == "" and report.problems == [] and named in [p["file"] for p in report.repaired], report
    assert dev.model_version == 2 and dev.model_source == "server" and dev.status()["problems"] == []
    if which == "personal":
        assert dev.personalized  # sync personalised again from the stored answers
    dev.store.close()

    again = Device(state, train_policy=POLICY)  # a restart finds every file good
    assert again.problems == [] and again.model_version == 2
    assert again.personalized == (which != "store-header")  # a store moved aside took its answers with it
    assert again.classify(clip(2)).model_version == 2


def test_the_command_line_runs_status_classify_and_sync_on_a_damaged_device(enrolled, tmp_path):
    _, golden = enrolled
    state = tmp_path / "dev"
    shutil.copytree(golden, state)
    _flip(_target(state, "base")[0])
    wav = tmp_path / "clip.wav"
    sf.write(wav, clip(3), 16000)

    warnings = []

    def cli(*args) -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(state), *args], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        warnings.append([line for line in out.stderr.splitlines() if line.startswith("fedser-edge: warning:")])
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    status = cli("status")[0]
    # one line per damaged model: the current one and the one installed before it share the base
    assert [w.split(":")[2].strip() for w in warnings[-1]] == ["manifest.json", "manifest.previous.json"]
    assert all("sha256" in w and "fedser-edge sync" in w for w in warnings[-1])
    assert status["model_version"] == 0 and status["model_source"] == "bundled"
    assert "sha256" in status["problems"][0]["problem"] and "sync" in status["problems"][0]["action"]
    assert cli("classify", str(wav))[0]["model_version"] == 0
    synced = cli("sync")[0]
    assert synced["model_version"] == 2 and synced["problems"] == [] and synced["repaired"]
    assert cli("status")[0]["problems"] == [] and cli("classify", str(wav))[0]["model_version"] == 2
    assert warnings[-1] == []


def test_a_model_that_does_not_load_is_never_committed(enrolled, tmp_path):
    """The new model is loaded and checked before manifest.json (the commit point) is written: a base whose
    sha256 matches the manifest but that no runtime can load leaves the device on what it had."""
    from edge_sdk.errors import ModelError
    from edge_sdk.manifest import SignedManifest

    agg, golden = enrolled
    state = tmp_path / "dev"
    shutil.copytree(golden, state)
    dev = Device(state, train_policy=POLICY)
    before = (state / "manifest.json").read_bytes()
    raw, _ = dev.client.get_manifest()
    signed = SignedManifest.from_bytes(raw, dev.server_key.verify)
    base = state / "models" / f"{signed.manifest.base.sha256}.tflite"

    def broken_open(manifest):  # what a runtime says about a file it cannot load
        raise ModelError(f"{base.name}: the TFLite runtime cannot load it")

    dev._open_model = broken_open
    with pytest.raises(ModelError):
        dev._install_manifest(raw, repair=True)
    assert (state / "manifest.json").read_bytes() == before and dev.model_version == 2


@pytest.mark.parametrize("stored", ['{"count": 10, "sum": [NaN], "sumsq": [1.0]}', "not json", "[1, 2]",
                                    '{"count": 10, "sum": [0.0, 0.0], "sumsq": [1.0, 1.0]}'])
def test_damaged_speaker_statistics_in_the_store_start_anew_instead_of_failing_every_classify(device, caplog,
                                                                                              stored):
    """The running statistics live in the device's store (a file on its disk). NaN sums, or statistics of another
    width, made every classify fail (a NaN normalisation is refused since the metadata checks)."""
    import hashlib

    from tests.edge_sdk.conftest import clip

    cfg = device.metadata.features
    key = "speaker_stats:" + hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    device.classify(clip(1))
    assert json.loads(device.store.get(key))["count"] > 0  # the key the device writes
    device.store.set(key, stored)
    again = device.classify(clip(2))
    assert again.label in device.metadata.labels
    assert "speaker statistics are unusable" in caplog.text
    fresh = json.loads(device.store.get(key))  # written anew from this utterance alone, finite
    assert 0 < fresh["count"] < 1000 and len(fresh["sum"]) == cfg.n_features
