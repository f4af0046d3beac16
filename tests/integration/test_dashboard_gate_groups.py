"""The console's refused rounds with the gate's per-group figures (issue 14), in headless Chromium against a real
aggregator (gunicorn) over an instance in which a round that helped one group and ruined another was refused."""

from __future__ import annotations

import os

import pytest

from tests.aggregator.test_validation_groups import _manifest, _rows, _two_rounds
from tests.integration.test_dashboard_console import CHROMIUM, artifacts_dir, open_page
from tools.demo import admin_token, free_port, start_aggregator


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_console_shows_each_groups_figures_of_a_refused_round(tmp_path, trained_model, synthetic_clips):
    from playwright.sync_api import sync_playwright

    csv = _manifest(tmp_path / "validation.csv",
                    _rows(synthetic_clips, "angry", lambda c: "ravdess-" + c.speaker.split("-")[1], 20)
                    + _rows(synthetic_clips, "sad", lambda c: "nemo-" + c.speaker.split("-")[1], 20)
                    + _rows(synthetic_clips, "happy", lambda c: "crema-" + c.speaker.split("-")[1], 6))
    _, body = _two_rounds(tmp_path, trained_model, csv)
    assert body["round_rejected"].startswith("group ravdess: "), body
    instance, port = tmp_path / "inst", free_port()
    server = start_aggregator(instance, port, min_updates=1, workers=1,
                              env={"FEDSER_VALIDATION_MANIFEST": str(csv)})
    try:
        shots = artifacts_dir(tmp_path)
        with sync_playwright() as pw:
            browser, page, errors = open_page(pw)
            page.goto(f"http://127.0.0.1:{port}/admin#token={admin_token(instance)}")
            page.wait_for_selector("#refused div[data-group='ravdess']", timeout=20000)
            dropped = page.inner_text("#refused div[data-group='ravdess']")
            assert "ravdess: 100.0 % → 0.0 % (20 clips; accuracy 100.0 % → 0.0 %) dropped" in dropped, dropped
            assert "down" in page.get_attribute("#refused div[data-group='ravdess']", "class")
            helped = page.inner_text("#refused div[data-group='nemo']")
            assert "nemo: 0.0 % → 100.0 %" in helped and "dropped" not in helped, helped
            small = page.inner_text("#refused div[data-group='crema']")
            assert "(6 clips; accuracy 0.0 % → 0.0 %) under 20 clips: does not gate" in small, small
            assert "group ravdess: validation UAR would drop" in page.inner_text("#refused")
            page.locator("#refused").screenshot(path=os.path.join(shots, "console-gate-groups.png"))
            page.screenshot(path=os.path.join(shots, "console-gate-groups-page.png"), full_page=True)
            assert not errors, errors
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
