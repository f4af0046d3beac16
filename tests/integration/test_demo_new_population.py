"""The demo's new-population story on a generated nEMO-layout tree: RAVDESS-only base, nEMO devices, test speakers
IC0/MK0/TP0 held out of everything but the held-out figure (never a device, never in the validation gate)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.conftest import REPO
from tests.models.test_datasets import nemo_tree
from tools.demo import RAVDESS_ONLY_MODEL, corpus_root

TEST_SPEAKERS = {"IC0", "MK0", "TP0"}
PITCH = {"anger": 330.0, "happiness": 440.0, "neutral": 220.0, "sadness": 165.0}


def _voice(path: Path) -> None:
    """A second of a tone whose pitch depends on the emotion in the file name, with a little noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    emotion = path.stem.split("_")[1]
    rng = np.random.default_rng(zlib.crc32(path.stem.encode()))
    t = np.arange(16000) / 16000
    y = 0.3 * np.sin(2 * np.pi * PITCH[emotion] * (1 + 0.02 * rng.standard_normal()) * t)
    soundfile.write(path, (y + 0.01 * rng.standard_normal(len(t))).astype(np.float32), 16000)


def test_the_default_root_lookup_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSER_NEMO", str(tmp_path / "missing"))
    root, why = corpus_root("nemo", None)
    assert root is None and "FEDSER_NEMO" in why and "not a folder" in why  # no fallback to ../shared/data/nemo
    assert corpus_root("nemo", None, off=True) == (None, "turned off for this run")
    monkeypatch.setenv("FEDSER_NEMO", str(tmp_path))
    assert corpus_root("nemo", None)[0] == tmp_path
    with pytest.raises(SystemExit, match="nemo folder not found"):
        corpus_root("nemo", str(tmp_path / "missing"))


needs_model = pytest.mark.skipif(not (RAVDESS_ONLY_MODEL / "model.tflite").is_file(),
                                 reason="the RAVDESS-only model is not there")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return nemo_tree(tmp_path_factory.mktemp("corpus") / "nemo", speakers=("EB0", "IC0", "KD0", "MK0", "TP0"),
                     emotions=("anger", "happiness", "neutral", "sadness"), sentences=range(1, 6), tone=_voice)


def _demo(tree: Path, out: Path, **extra_env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSER")}
    env.update(FEDSER_RAVDESS=str(out.parent / "no-ravdess"), TF_CPP_MIN_LOG_LEVEL="2", **extra_env)  # no RAVDESS
    return subprocess.run(
        [sys.executable, "-m", "tools.demo", "--nemo", str(tree), "--rounds", "2", "--answers-per-round", "6",
         "--eval-clips", "6", "--gate-clips", "4", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@needs_model
def test_the_demo_tells_the_new_population_story_on_a_nemo_tree(tree, tmp_path):
    out = _demo(tree, tmp_path / "demo")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout
    assert "RAVDESS: FEDSER_RAVDESS=" in text and "the RAVDESS-only model" in text
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]", "What these numbers are"):
        assert step in text, step
    assert "short federated suite is off by default" in text and "--experiments runs it" not in text  # no RAVDESS

    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [d["speaker"] for d in summary["devices"]] == ["nemo-EB0", "nemo-KD0"]  # never IC0, MK0 or TP0
    assert summary["held_out"]["before"]["n"] == 60 and summary["held_out"]["after"]["n"] == 60
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["rounds"][-1]["version"] >= 1 and summary["ravdess_21_24"] is None
    for d in summary["devices"]:
        a = d["answers"]
        assert a["answered"] == a["up"] + a["label"] + a["down"] == 10 and d["eval_clips"] == 6
        assert 0 <= d["base"] <= 1 and 0 <= d["personal"] <= 1
    # The gate's clips, each device's evaluation clips and its answered clips: disjoint, no test speaker anywhere.
    with open(summary["validation_set"], newline="") as f:
        gate_rows = list(csv.DictReader(f))
    assert {r["speaker"] for r in gate_rows} == {"nemo-EB0", "nemo-KD0"} and len(gate_rows) == 8
    for spk, parts in summary["clips"].items():
        names = parts["gate"] + parts["eval"] + parts["answered"]
        assert len(names) == len(set(names)) == 4 + 6 + 10, spk
        assert all(n.split("_")[0] == spk.split("-")[1] not in TEST_SPEAKERS for n in names)
        assert sorted(Path(r["path"]).name for r in gate_rows if r["speaker"] == spk) == sorted(parts["gate"])


@needs_model
def test_rounds_the_gate_refuses_leave_the_fleet_on_the_base(tree, tmp_path):
    out = _demo(tree, tmp_path / "demo", FEDSER_VALIDATION_MARGIN="-1")  # a candidate must gain a whole UAR point
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [r["version"] for r in summary["rounds"]] == [1, 1, 1]
    assert all(r["gate"].startswith("refused (") for r in summary["rounds"][1:]), summary["rounds"]
    assert summary["held_out"]["after"]["uar"] == summary["held_out"]["before"]["uar"]
    assert re.search(r"UAR [\d.]+ \(base, v1\) -> [\d.]+ \(v1\), \+0\.0 points", out.stdout), out.stdout[-3000:]
