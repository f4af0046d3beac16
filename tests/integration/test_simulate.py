"""The federated simulator: real devices and a real aggregator over HTTP, resumable."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def _sim(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tools.simulate", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_simulation_by_speaker_with_attackers_and_resume(ravdess_root, tmp_path):
    out = tmp_path / "sim"
    common = ["--partition", "speaker", "--epochs", "2", "--answers-per-round", "5", "--attack-fraction", "0.125",
              "--attack", "signflip", "--aggregation", "median", "--out", str(out)]
    r = _sim("--rounds", "1", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [h["round"] for h in report["history"]] == [0, 1]
    assert 0 < report["centralised"]["uar"] <= 1 and "centralised" in report["timing"]["extra"]
    assert report["devices"] == {"senders": 20, "test": 4, "attackers": report["devices"]["attackers"]}
    assert len(report["devices"]["attackers"]) == 2
    assert report["history"][1]["version"] == 2 and report["history"][1]["updates"] >= 1
    assert (out / "uar-per-round.png").stat().st_size > 5000 and "UAR" in (out / "report.md").read_text()
    # resume: the same run, one round further, continues from the saved state instead of starting over
    r = _sim("--rounds", "2", "--resume", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((out / "report.json").read_text())
    assert [h["round"] for h in again["history"]] == [0, 1, 2] and again["history"][2]["version"] == 3
    assert again["history"][:2] == report["history"]
    answered = {d["device"]: d["answers"] for d in again["personalisation"]["per_device"]}
    assert set(answered.values()) <= {10}  # 5 answers in each of the two rounds, none repeated
    r = _sim("--rounds", "3", "--resume", *common[:-2], "--seed", "5", "--out", str(out))
    assert r.returncode != 0 and "different parameters" in r.stderr and "seed was 0, now 5 (--seed)" in r.stderr


def test_short_suite_writes_the_studies_tables(ravdess_root, tmp_path):
    out = tmp_path / "suite"
    r = subprocess.run([sys.executable, "-m", "tools.sim_suite", "--out", str(out), "--architectures", "cnn",
                        "--rounds", "1", "--epochs", "2", "--short"], cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "report.md").read_text()
    for row in ("| centralised |", "| federated by speaker |", "| federated, random split (5) |",
                "| federated, one emotion per device |", "| attack (scale x20), FedAvg |",
                "| attack (scale x20), median |", "Full by-speaker run (cnn, 24 devices"):
        assert row in md, row
    report = json.loads((out / "report.json").read_text())
    spk = report["cnn: federated by speaker"]
    assert spk["devices"]["senders"] == 20 and spk["devices"]["test"] == 4 and spk["config"]["speaker_norm"]
    emo = report["cnn: federated, one emotion per device"]
    assert emo["devices"]["senders"] == 4 and emo["config"]["replay_weight"] == 0.25
    assert len(report["cnn: attack (scale x20), median"]["devices"]["attackers"]) == 2
    inflated = report["cnn: attack (sign flip, 10^6 examples claimed), FedAvg defaults"]
    assert len(inflated["devices"]["attackers"]) == 2 and inflated["config"]["attack_examples"] == 1_000_000
    assert inflated["config"]["max_update_norm"] == 100.0 and inflated["config"]["max_examples_weight"] == -1.0
    for png in ("uar-per-round.png", "confusion-federated-by-speaker.png"):
        assert (out / png).stat().st_size > 5000


def test_folds_rotate_the_test_actors_and_report_error_bars(ravdess_root, tmp_path):
    out = tmp_path / "folds"
    r = subprocess.run([sys.executable, "-m", "tools.sim_suite", "--out", str(out), "--architectures", "cnn",
                        "--rounds", "1", "--epochs", "2", "--folds", "2"], cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "folds.json").read_text())
    assert [row["test_actors"] for row in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    for row in rows:
        assert not set(row["test_actors"]) & set(row["server_actors"]) and len(row["server_actors"]) == 10
        assert 0 < row["centralised"] <= 1 and 0 < row["by_speaker"] <= 1 and 0 < row["one_emotion"] <= 1
        run = json.loads((out / "cnn" / f"fold-{row['fold']}" / "by_speaker" / "report.json").read_text())
        assert run["config"]["test_actors"] == row["test_actors"] and run["devices"]["senders"] == 20
    assert "(standard error)" in (out / "folds.md").read_text()
    r = subprocess.run([sys.executable, "-m", "tools.sim_suite", "--out", str(out), "--folds", "7"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--folds must be 2..6" in r.stderr
