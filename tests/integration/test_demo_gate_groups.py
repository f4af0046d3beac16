"""The demo's new-population story with RAVDESS there too (issue 14): the gate also holds RAVDESS validation actors
19-20 (never the test actors 21-24, never a training actor), judged as a group of their own, and each round's line
prints the gate's figures of each group. Generated nEMO and RAVDESS trees; the committed RAVDESS-only base."""

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
from tests.integration.test_demo_new_population import needs_model, tree  # noqa: F401 (a fixture)

RAVDESS_PITCH = {"01": 220.0, "03": 440.0, "04": 165.0, "05": 330.0}  # neutral, happy, sad, angry


def _ravdess_tree(root: Path, actors=(1, 19, 20, 21, 22, 23, 24)) -> Path:
    """Actor_NN/03-01-EE-01-SS-RR-NN.wav: 4 emotions x 2 statements x 2 repetitions per actor, a tone per emotion."""
    for actor in actors:
        for emo, pitch in RAVDESS_PITCH.items():
            for statement in (1, 2):
                for rep in (1, 2):
                    path = root / f"Actor_{actor:02d}" / f"03-01-{emo}-01-{statement:02d}-{rep:02d}-{actor:02d}.wav"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    rng = np.random.default_rng(zlib.crc32(path.stem.encode()))
                    t = np.arange(16000) / 16000
                    y = 0.3 * np.sin(2 * np.pi * pitch * (1 + 0.02 * rng.standard_normal()) * t)
                    soundfile.write(path, (y + 0.01 * rng.standard_normal(len(t))).astype(np.float32), 16000)
    return root


@pytest.fixture(scope="module")
def ravdess(tmp_path_factory) -> Path:
    return _ravdess_tree(tmp_path_factory.mktemp("corpus") / "ravdess")


def _demo(nemo: Path, ravdess: Path, out: Path, **extra_env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSER")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", FEDSER_VALIDATION_MIN_GROUP_CLIPS="8", **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "tools.demo", "--nemo", str(nemo), "--data", str(ravdess), "--rounds", "2",
         "--answers-per-round", "6", "--eval-clips", "6", "--gate-clips", "4", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@needs_model
def test_the_gate_holds_ravdess_validation_actors_as_their_own_group(tree, ravdess, tmp_path):  # noqa: F811
    out = _demo(tree, ravdess, tmp_path / "demo")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout
    assert "and 32 clips of RAVDESS validation actors 19-20" in text and "or on either group by more than" in text
    assert "gate by group (UAR)" in text and "The gate also judges every round on RAVDESS validation actors" in text
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    with open(summary["validation_set"], newline="") as f:
        gate_rows = list(csv.DictReader(f))
    speakers = {r["speaker"] for r in gate_rows}
    assert speakers == {"nemo-EB0", "nemo-KD0", "ravdess-19", "ravdess-20"}  # never 21-24, never actor 1
    assert sum(r["speaker"].startswith("ravdess-") for r in gate_rows) == 32
    for rnd in summary["rounds"][1:]:
        groups = rnd["gate_groups"]
        assert set(groups) == {"nemo", "ravdess"}, rnd
        assert groups["nemo"]["examples"] == 8 and groups["ravdess"]["examples"] == 32
        assert all(g["gates"] for g in groups.values())
        line = next(x for x in text.splitlines() if re.match(rf"\s+{rnd['round']}\s+\d+\s+(passed|refused)", x))
        assert re.search(r"nemo \d\.\d{3} -> \d\.\d{3}, ravdess \d\.\d{3} -> \d\.\d{3}", line), line


@needs_model
def test_a_refused_round_shows_the_group_that_dropped(tree, ravdess, tmp_path):  # noqa: F811
    out = _demo(tree, ravdess, tmp_path / "demo", FEDSER_VALIDATION_MARGIN="-1",
                FEDSER_VALIDATION_GROUP_Z="0")  # every group must gain a point (no noise allowance)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [r["version"] for r in summary["rounds"]] == [1, 1, 1]
    for rnd in summary["rounds"][1:]:
        assert rnd["gate"].startswith("refused ("), rnd
        assert rnd["gate_groups"]["ravdess"]["dropped"] and rnd["gate_groups"]["nemo"]["dropped"], rnd
    lines = [x for x in out.stdout.splitlines() if re.match(r"\s+[12]\s+\d+\s+refused", x)]
    assert len(lines) == 2 and all("ravdess" in x and "(dropped)" in x for x in lines), out.stdout[-3000:]
