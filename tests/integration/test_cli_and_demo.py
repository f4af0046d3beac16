"""The console scripts and the demo, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, start_live_aggregator


def _run(*args, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_train_baseline_params_are_checked_before_a_job_starts(tmp_path):
    """`fedser-aggregator train-baseline --params JSON`: a value out of range, text that is not JSON or JSON that is
    not an object is refused with the reason, exit status 2, and no job is recorded."""
    inst = str(tmp_path / "srv")
    for params, why in (('{"augment": 99}', "augment must be in 0..8"), ("nope", "--params is not JSON"),
                        ("[1]", "--params must be a JSON object"),
                        ('{"augment_speed": "2,1"}', "augment_speed must be 'lo,hi'")):
        r = _run("aggregator.cli", "--instance", inst, "train-baseline", "--no-publish", "--params", params)
        assert r.returncode == 2 and why in r.stderr, (params, r.stderr[-1000:])
    r = _run("aggregator.cli", "--instance", inst, "jobs")
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stdout


def test_train_baseline_wait_sees_the_job_end_on_sqlite(tmp_path):
    """`train-baseline --wait` on the embedded SQLite default: its polling held the database's write lock between
    looks, so the job could record neither heartbeats nor its end, died trying, and --wait (seeing its own unreaped
    child as alive) waited for ever. Now each look is a short transaction and the job's end is recorded."""
    inst = str(tmp_path / "srv")
    r = _run("aggregator.cli", "--instance", inst, "train-baseline", "--synthetic", "--epochs", "2", "--no-publish",
             "--wait", "--params", '{"max_frames": 120}', timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    end = json.loads(r.stdout.strip().splitlines()[-1])
    assert end["status"] == "succeeded" and "not published" in end["detail"], end
    log = (tmp_path / "srv" / "jobs" / str(end["id"]) / "log.txt").read_text()
    assert "database is locked" not in log and "heartbeat failed" not in log, log[-3000:]


def test_edge_and_aggregator_clis(trained_model, synthetic_clips, tmp_path):
    agg = start_live_aggregator(tmp_path / "srv", min_updates=1, workers=0)
    try:
        inst = str(agg.instance)
        out = _run("aggregator.cli", "--instance", inst, "publish-base", str(trained_model.tflite_path),
                   str(trained_model.metadata_path))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["version"] == 1
        token = _run("aggregator.cli", "--instance", inst, "create-token").stdout.strip()
        state = str(tmp_path / "dev")
        edge = ("edge_sdk.cli", "--state", state)
        out = _run(*edge, "enroll", "--server", agg.base_url, "--token", token)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["model_version"] == 1
        out = _run(*edge, "classify", *[c.path for c in synthetic_clips[:8]])
        preds = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(preds) == 8 and all(p["label"] in ("angry", "happy", "neutral", "sad") for p in preds)
        for p, clip in zip(preds, synthetic_clips[:8], strict=True):
            assert _run(*edge, "feedback", p["id"], clip.label).returncode == 0
        bad = _run(*edge, "feedback", preds[0]["id"], "furious")
        assert bad.returncode == 2 and "furious" in bad.stderr
        report = json.loads(_run(*edge, "train", "--min-examples", "4").stdout)
        assert report["status"] in ("kept", "discarded") and report["examples"] + report["held_back"] == 8
        status = json.loads(_run(*edge, "status").stdout)
        assert status["feedback"] == 8 and status["predictions"] == 8
        if report["status"] == "kept":
            sync = json.loads(_run(*edge, "sync").stdout)
            assert sync["accepted"][0]["round_closed"] is True and sync["model_version"] == 2
        server_status = json.loads(_run("aggregator.cli", "--instance", inst, "status").stdout)
        assert len(server_status["devices"]) == 1
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)


def _clean_clone_runs_it() -> bool:
    """With no corpus, --synthetic is the demo's default run, which test_clean_clone_demo runs with these checks
    (where it can: git and a checkout; otherwise this test runs it)."""
    import shutil

    from models.datasets import default_nemo_root, default_ravdess_root

    return (default_ravdess_root() is None and default_nemo_root() is None and shutil.which("git") is not None
            and (REPO / ".git").exists())


@pytest.mark.skipif(_clean_clone_runs_it(), reason="with no corpus --synthetic is the demo's default run, which "
                    "test_clean_clone_demo runs (with these checks)")
def test_the_demo_runs_end_to_end_on_the_synthetic_fallback(tmp_path):
    """``--synthetic`` with a corpus beside the checkout: the synthetic run, not the corpus's."""
    out = _run("tools.demo", "--synthetic", "--devices", "2", "--epochs", "3", "--out", str(tmp_path / "demo"),
               timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SYNTHETIC" in out.stdout and "round 1 closed" in out.stdout
    check_demo_round(out.stdout, tmp_path / "demo" / "summary.json")


def check_demo_round(stdout: str, summary_path: Path) -> None:
    """The demo's federated round ended one of its two ways, as its output and summary.json say."""
    summary = json.loads(summary_path.read_text())
    if "validation gate refused" in stdout:  # the gate may refuse a round that lowers validation UAR
        assert summary["rejected"] and "still version 1" in stdout
    else:
        assert "pulled version 2" in stdout and "gate passed" in stdout
        assert summary["round"]["published_version"] == 2 and len(summary["devices"]) == 2


def test_manifests_are_written_and_read_relative_to_their_own_folder(tmp_path, monkeypatch):
    """One rule for every manifest: a relative path is relative to the manifest's folder, never to the cwd.

    The demo once wrote its validation manifest with cwd-relative paths (demo-output/synthetic-audio/...), which
    the aggregator read as demo-output/demo-output/... and refused the base model (422 bad_model).
    """
    import os

    from models.datasets import Clip, manifest_clips, write_manifest

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "audio").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    files = [Path("out/audio/a.wav"), tmp_path / "elsewhere" / "b, with comma.wav"]
    for f in files:
        f.write_bytes(b"RIFF")
    clips = [Clip(str(files[0]), "s1", "angry"), Clip(str(files[1]), "s2", "sad", "val")]
    csv_path = write_manifest(Path("out/validation.csv"), clips)
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "path,speaker,label,split"
    assert rows[1].startswith("audio/a.wav,") and rows[2].startswith('"../elsewhere/b, with comma.wav",')
    monkeypatch.chdir(tmp_path / "elsewhere")  # read from another directory: same files
    read = manifest_clips(tmp_path / "out" / "validation.csv")
    assert [os.path.realpath(c.path) for c in read] == [os.path.realpath(tmp_path / f) for f in files]
    assert [(c.speaker, c.label, c.split) for c in read] == [("s1", "angry", ""), ("s2", "sad", "val")]
