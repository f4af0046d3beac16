"""The federated recovery scenario end to end on tiny generated corpora: the RAVDESS-only base, nEMO users as real
devices against a real aggregator over HTTP, the centralised reference trained on RAVDESS + the device speakers;
the named nEMO test speakers (IC0, MK0, TP0) never act as devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import soundfile

from tests.conftest import REPO
from tests.models.test_datasets import nemo_tree

PITCH = {"01": 150, "03": 260, "04": 120, "05": 220, "anger": 220, "happiness": 260, "neutral": 150, "sadness": 120}
DEVICE_SPEAKERS = ("EB0", "KD0")
TEST_SPEAKERS = ("IC0", "MK0", "TP0")


def _tone(path, seconds=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.stem.split("-")[2] if "-" in path.stem else path.stem.split("_")[1]
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(path, 0.3 * np.sin(2 * np.pi * PITCH[key] * t * (1 + 0.05 * np.sin(5 * t))), 16000)


def _corpora(tmp_path):
    rav = tmp_path / "ravdess"
    for actor in (1, 2, 19, 20, 21):
        for emo in ("01", "03", "04", "05"):
            _tone(rav / f"Actor_{actor:02d}" / f"03-01-{emo}-01-01-01-{actor:02d}.wav")
    nemo = nemo_tree(tmp_path / "nemo", speakers=DEVICE_SPEAKERS + TEST_SPEAKERS,
                     emotions=("anger", "happiness", "neutral", "sadness"), tone=_tone)
    return rav, nemo


def test_recovery_suite_runs_end_to_end_and_test_speakers_never_act_as_devices(tmp_path):
    rav, nemo = _corpora(tmp_path)
    env = dict(os.environ, FEDSER_RAVDESS=str(rav), FEDSER_NEMO=str(nemo), TF_CPP_MIN_LOG_LEVEL="2")
    out, report_dir = tmp_path / "runs", tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "tools.sim_suite", "--scenario", "recovery", "--out", str(out),
                        "--report", str(report_dir), "--seeds", "0,1", "--setups", "0", "--rounds", "1",
                        "--epochs", "1", "--set", "answers_per_round=4", "--set", "workers=1",
                        "--ceiling-epochs", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((report_dir / "report.json").read_text())
    assert summary["test_speakers"] == [f"nemo-{s}" for s in TEST_SPEAKERS]
    assert summary["device_speakers"] == [f"nemo-{s}" for s in DEVICE_SPEAKERS]
    assert summary["test_clips"] == 3 * 8 and "nEMO" in summary["centralised"]["dataset"]
    setup = summary["setups"]["head only, FedAvg"]
    assert setup["seeds"] == [0, 1] and setup["rounds"] == [0, 1] and len(setup["uar_se"]) == 2
    assert setup["uar_mean"][0] == summary["base_uar"]  # round 0 is the fixed base for every seed
    assert summary["targets"]["uar_at_least"] == summary["base_uar"] + 0.25
    assert summary["ceilings"]["epochs"] == 2 and 0 < summary["ceilings"]["head"]["final"] <= 1
    # the test speakers never choose an epoch or a round: no best-of-curve figure is kept or reported
    assert "best" not in summary["ceilings"]["head"] and "curve" not in summary["ceilings"]["head"]
    assert "best_round_uar" not in setup
    md = (report_dir / "report.md").read_text()
    assert "python -m tools.sim_suite --scenario recovery" in md and "| head only, FedAvg |" in md
    assert "best round" not in md and "UAR, best" not in md and "UAR, last epoch" in md
    assert (report_dir / "uar-per-round.png").stat().st_size > 5000

    for seed in (0, 1):
        run = json.loads((out / "head-only-FedAvg" / f"seed-{seed}" / "report.json").read_text())
        assert run["config"]["scenario"] == "recovery" and run["config"]["seed"] == seed
        # every device is a non-test nEMO speaker, and every one of them sent an update in round 1
        assert run["sending_devices"] == [f"nemo-{s}" for s in DEVICE_SPEAKERS] and run["devices"]["test"] == 0
        assert run["history"][1]["updates"] == len(DEVICE_SPEAKERS) and run["history"][1]["version"] == 2
        devices = {d["device"] for d in run["personalisation"]["per_device"]}
        assert devices == set(run["sending_devices"])
        assert not set(run["test_speakers"]) & set(run["device_speakers"])
        # the devices' own state folders: one per device speaker, none for a test speaker
        assert sorted(p.name for p in (out / "head-only-FedAvg" / f"seed-{seed}" / "devices").iterdir()) == \
            [f"nemo-{s}" for s in DEVICE_SPEAKERS]
    # the report again from the saved runs, without running anything
    r = subprocess.run([sys.executable, "-m", "tools.sim_suite", "--scenario", "recovery", "--out", str(out),
                        "--report", str(tmp_path / "again"), "--seeds", "0,1", "--setups", "0", "--report-only"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["setups"]["head only, FedAvg"]["uar_mean"] == setup["uar_mean"]
    # the centralised reference trained on RAVDESS + the device speakers; the test speakers held out of it
    split = json.loads((out / "models" / "centralised-model" / "report.json").read_text())["split"]
    trained = set(split["train_speakers"]) | set(split["val_speakers"])
    assert {f"nemo-{s}" for s in DEVICE_SPEAKERS} <= trained and any(s.startswith("ravdess-") for s in trained)
    assert not {f"nemo-{s}" for s in TEST_SPEAKERS} & trained
