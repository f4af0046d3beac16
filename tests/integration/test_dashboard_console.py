"""The admin console as an admin uses it: a real aggregator (gunicorn, 2 workers), real enrolled devices that
classified clips, took their user's answers, personalised and posted updates with their answer reports, and
the page in headless Chromium: personal against global per device and fleet-wide, versions with the rollback
button (it really publishes a new, higher version that devices pull), refused rounds with the gate's figures,
and the Prometheus metrics summed over both workers."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from edge_sdk.wire import UpdateEnvelope
from tests.conftest import signed_update, start_live_aggregator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def artifacts_dir(tmp_path) -> str:
    """Where a browser test leaves its screenshots: $FEDSER_TEST_ARTIFACTS, else the test's own tmp folder."""
    shots = os.environ.get("FEDSER_TEST_ARTIFACTS") or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    return shots


def open_page(pw):
    """(browser, page, errors): headless Debian chromium, a 1280x1000 page, and the page's script errors as they
    happen."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                "--disable-dev-shm-usage"])
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return browser, page, errors


def _metrics(agg) -> dict:
    text = requests.get(f"{agg.base_url}/metrics", headers=agg.auth, timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _device_with_answers(agg, state_dir, clips, name, *, wrong_labels: bool = False):
    """An enrolled device whose user answered every clip (the true label, or always the first label)."""
    dev = agg.enroll(state_dir, name=name)
    dev.pull_model()
    labels = list(dev.metadata.labels)
    for clip in clips:
        pred = dev.classify_file(clip.path)
        dev.feedback(pred.id, labels[0] if wrong_labels else clip.label)
    return dev


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_console_personal_vs_global_versions_rollback_and_refusals(tmp_path, trained_model, synthetic_clips):
    from playwright.sync_api import sync_playwright

    speakers = sorted({c.speaker for c in synthetic_clips})
    validation = tmp_path / "validation.csv"
    validation.write_text("path,speaker,label\n" + "".join(
        f"{c.path},{c.speaker},{c.label}\n" for c in synthetic_clips if c.speaker == speakers[-1]))
    prom_dir = tmp_path / "prom"
    env = {"FEDSER_VALIDATION_MANIFEST": str(validation), "FEDSER_VALIDATION_MARGIN": "0.0",
           "FEDSER_MAX_UPDATE_L2_NORM": "1e9", "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
    agg = start_live_aggregator(tmp_path, min_updates=10, workers=2, env=env)
    try:
        assert agg.publish(trained_model) == 1
        # Three users, one speaker each: they answer every clip; a fourth answers nonsense (always label 0).
        devices = [_device_with_answers(agg, tmp_path / f"d{i}", [c for c in synthetic_clips
                                                                  if c.speaker == speakers[i]], f"pi-{i}")
                   for i in range(3)]
        devices.append(_device_with_answers(agg, tmp_path / "d3", [c for c in synthetic_clips
                                                                   if c.speaker == speakers[3]], "pi-odd",
                                            wrong_labels=True))
        for dev in devices:
            dev.personalize()
            report = dev.sync()
            assert report.accepted and not report.rejected, report.to_dict()
        console = requests.get(f"{agg.base_url}/api/v1/admin/console", headers=agg.auth, timeout=10).json()
        assert console["fleet"]["devices_reporting"] == 4
        by_name = {d["name"]: d for d in console["devices"]}
        assert all(by_name[f"pi-{i}"]["answers_scored"] > 0 for i in range(3))
        assert by_name["pi-odd"]["personal_correct"] >= by_name["pi-odd"]["global_correct"]  # its own labels
        # Round 1 (the devices' updates) closed by the admin: the gate publishes or refuses it.
        r = agg.post_admin("/rounds/close", json={"min_updates": 1})
        assert r.status_code in (200, 409), r.text
        # A harmful update (every embedding to one class): the gate refuses its round, with its figures.
        status = agg.status()
        harm_dev = devices[0]
        base = status["current_version"]
        harm = {s.name: np.zeros(s.shape, np.float32) for s in harm_dev.metadata.head_layout}
        bias = [s for s in harm_dev.metadata.head_layout if len(s.shape) == 1][-1]
        harm[bias.name] = np.where(np.arange(bias.shape[0]) == 0, 50.0, -50.0).astype(np.float32)
        env_bytes = UpdateEnvelope.create(device_id=harm_dev.device_id, base_version=base,
                                          layout=harm_dev.metadata.head_layout, deltas=harm, num_examples=5,
                                          sequence=1000, sign=harm_dev.key.sign).to_bytes()
        assert agg.post_update(env_bytes).status_code == 202
        r = agg.post_admin("/rounds/close", json={"min_updates": 1})
        assert r.status_code == 200 and r.json()["rejected"], r.text
        # A harmless round (tiny deltas): published, so there are versions to roll back between.
        tiny = signed_update(devices[1].device_id, devices[1].key, devices[1].metadata.head_layout, sequence=1000,
                             base_version=agg.status()["current_version"], scale=1e-6)
        assert agg.post_update(tiny.to_bytes()).status_code == 202
        r = agg.post_admin("/rounds/close", json={"min_updates": 1})
        assert r.status_code == 200 and r.json()["published_version"], r.text
        before = r.json()["published_version"]
        assert before >= 2 and before == agg.status()["current_version"]

        # Metrics: per-process request counts summed over both workers (multiprocess mode), DB figures alike.
        for _ in range(20):
            requests.get(f"{agg.base_url}/healthz", timeout=5)
        for _ in range(4):  # whichever worker answers
            m = _metrics(agg)
            assert m[("fedser_http_requests_total", frozenset({("method", "GET"), ("route", "/healthz"),
                                                               ("status", "200")}))] >= 20
            assert m[("fedser_fleet_devices_reporting", frozenset())] == 4
            assert m[("fedser_rounds", frozenset({("status", "rejected")}))] >= 1
            assert m[("fedser_device_answers_scored", frozenset({("device", devices[0].device_id)}))] > 0
        assert list(prom_dir.glob("*.db")), "multiprocess mode wrote no files"

        shots = artifacts_dir(tmp_path)
        with sync_playwright() as pw:
            browser, page, errors = open_page(pw)
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(f"{agg.base_url}/admin#token={agg.admin_token}")
            page.wait_for_selector("#accuracy tbody tr td:has-text('pi-odd')", timeout=20000)
            text = page.inner_text("#personal")
            for i in range(3):
                assert f"pi-{i}" in text
            assert "devices reporting" in text and "4" in page.inner_text("#fleet-kpis")
            bars = page.eval_on_selector_all("#gain-chart rect", "els => els.map(e => +e.dataset.count)")
            assert len(bars) == 7 and sum(bars) == 4
            refused = page.inner_text("#refused")
            assert "validation UAR would drop" in refused and "%" in refused
            versions = page.inner_text("#versions")
            assert "current" in versions and f"Roll back to {before - 1}" in versions
            page.screenshot(path=os.path.join(shots, "console.png"), full_page=True)
            # Roll back to version 1 with the button: a new, higher version that serves version 1's model.
            page.click("button[data-rollback='1']")
            page.wait_for_selector("#console-msg:has-text('Rolled back')", timeout=20000)
            assert f"version {before + 1} now serves version 1's model" in page.inner_text("#console-msg")
            page.wait_for_selector("#versions tbody tr:first-child td:has-text('rollback of 1')", timeout=20000)
            page.screenshot(path=os.path.join(shots, "console-after-rollback.png"), full_page=True)
            assert not errors, errors
            browser.close()
        status = agg.status()
        assert status["current_version"] == before + 1
        listed = requests.get(f"{agg.base_url}/api/v1/admin/models", headers=agg.auth, timeout=10).json()
        newest = listed["versions"][0]
        assert newest["version"] == before + 1 and newest["parent_version"] == 1 and newest["current"]
        v1 = next(v for v in listed["versions"] if v["version"] == 1)
        assert newest["head_sha256"] == v1["head_sha256"] and newest["base_sha256"] == v1["base_sha256"]
        # A device moves forward to it.
        assert devices[1].pull_model() and devices[1].model_version == before + 1
    finally:
        agg.process.terminate()
        agg.process.wait(timeout=30)
