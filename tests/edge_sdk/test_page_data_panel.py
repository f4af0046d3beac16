"""The page's "Your data" panel: what the device keeps and what leaves it, and the way for its user to delete
everything it learned from them, from a phone, while ``listen`` runs (real HTTP on loopback, real Chromium)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from edge_sdk.device import Device, TrainPolicy
from edge_sdk.web import FeedbackServer
from tests.edge_sdk.test_feedback_ui_and_data import CHROMIUM, keep_screenshot
from tools.demo import free_port


def _speak(device: Device, n: int) -> list:
    t = np.arange(16000) / 16000
    return [device.classify((0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t)).astype(np.float32)) for i in range(n)]


def _answer_and_personalise(device: Device, preds) -> None:
    labels = list(device.metadata.labels)
    for i, p in enumerate(preds):
        device.feedback(p.id, labels[i % len(labels)])
    device.personalize(TrainPolicy(min_examples=4, guard_folds=0, holdout_every=0))


def test_the_panel_says_what_is_kept_and_shared_and_the_wipe_is_guarded(device, tmp_path):
    preds = _speak(device, 6)
    for p in preds[:4]:
        device.feedback(p.id, "up")
    with_token = FeedbackServer(device, port=free_port(), token="t" * 24).start()
    locked = FeedbackServer(device, port=free_port(), allow_wipe=False).start()
    try:
        state = requests.get(with_token.url + "api/state", headers={"X-Fedser-Token": "t" * 24}, timeout=10).json()
        assert state["data"] == {"predictions": 6, "answers": 4, "recordings": 0, "keeps_audio": False,
                                 "updates_sent": 0, "updates_waiting": 0, "enrolled": False, "allow_wipe": True,
                                 "allow_export": True}

        def wipe(server, body, **headers):
            return requests.post(server.url + "api/wipe", data=body, timeout=10,
                                 headers={"Content-Type": "application/json", **headers})

        token = {"X-Fedser-Token": "t" * 24}
        assert wipe(with_token, b'{"confirm": "wipe"}').status_code == 401  # the page's token, as for answers
        cross = wipe(with_token, b'{"confirm": "wipe"}', Origin="http://evil.example", **token)
        assert (cross.status_code, cross.json()["error"]) == (403, "cross_origin")
        for body in (b'{"confirm": "yes"}', b'{"confirm": "wipe", "x": 1}', b'{"id": "a", "answer": "up"}',
                     b'["wipe"]', b"wipe"):
            r = wipe(with_token, body, **token)
            assert (r.status_code, r.json()["error"]) == (400, "malformed"), body
        r = wipe(locked, b'{"confirm": "wipe"}')
        assert (r.status_code, r.json()["error"]) == (403, "wipe_disabled")
        assert "allow_wipe" in r.json()["detail"]
        assert device.store.counts()["predictions"] == 6  # nothing refused deleted anything
        assert with_token.refusals == {"token_required": 1, "cross_origin": 1, "malformed": 5}
        r = wipe(with_token, b'{"confirm": "wipe"}', **token)
        assert r.status_code == 200, r.text
        assert r.json()["wiped"]["predictions"] == 6 and with_token.wipes == 1
        assert device.store.counts()["predictions"] == 0 and device.store.examples() == []
    finally:
        with_token.stop()
        locked.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_a_polish_user_deletes_what_the_device_learned_from_them_from_a_phone(device, tmp_path):
    """Two taps (the first arms the button for 5 s) delete every prediction, answer, the user's running voice
    statistics and the personal head, in the running process; the page then starts again from the shared model.
    A device whose keeper turned it off shows no button. Screenshots looked at."""
    from playwright.sync_api import sync_playwright

    preds = _speak(device, 8)
    _answer_and_personalise(device, preds)
    assert device.personalized and list(device.state_dir.glob("personal.*"))
    preds += _speak(device, 1)  # unanswered: docked at the bottom of the phone's screen, over the page's end
    stats_keys = [k for k in device.store.export()["speaker_statistics"]]
    assert stats_keys  # the user's voice statistics, which the wipe deletes too
    server = FeedbackServer(device, port=free_port(), language="pl").start()
    locked = FeedbackServer(device, port=free_port(), allow_wipe=False, keeps_audio=True, allow_export=False).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_context(locale="pl-PL", viewport={"width": 390, "height": 844}, is_mobile=True,
                                       has_touch=True, device_scale_factor=2).new_page()
            page.goto(locked.url)
            page.wait_for_selector(f'.pred[data-id="{preds[-1].id}"]')
            page.tap("#data summary")
            page.wait_for_selector("#data-kept:has-text('9')")
            assert page.locator("#wipe").is_hidden() and page.locator("#export").is_hidden()
            assert "opiekun urządzenia włączył nagrywanie" in page.inner_text("#data-recordings")  # store_audio on
            page.goto(server.url)
            page.wait_for_selector(f'.pred[data-id="{preds[-1].id}"]')
            page.tap("#data summary")
            page.wait_for_selector("#data-kept:has-text('rozpoznania: 9, odpowiedzi: 8')")
            assert "nic go nie opuszcza" in page.inner_text("#data-shared")  # not enrolled: nothing leaves
            assert page.inner_text("#data-recordings") == ""  # store_audio off, nothing recorded
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            dock = page.locator(".pred.current").bounding_box()
            button = page.locator("#wipe").bounding_box()
            assert button["y"] + button["height"] <= dock["y"], (button, dock)  # above the docked card, reachable
            assert button["height"] >= 44 and page.locator("#data summary").bounding_box()["height"] >= 44
            keep_screenshot_of(page, tmp_path / "data-panel-pl.png")
            assert page.inner_text("#export").strip() == "Pobierz kopię wszystkiego (JSON)"
            with page.expect_download() as got:  # a copy first: what the device keeps, saved by the browser
                page.tap("#export")
            saved = got.value
            assert saved.suggested_filename.startswith("fedser-my-data-") and saved.failure() is None
            copy = json.loads(open(saved.path(), encoding="utf-8").read())
            assert {p["id"] for p in copy["predictions"]} == {p.id for p in preds}
            assert sum(p["feedback"] is not None for p in copy["predictions"]) == 8
            assert copy["speaker_statistics"] and set(copy["speaker_statistics"]) == {k for k in stats_keys}
            page.wait_for_selector("#data-done:has-text('Pobieranie się rozpoczęło')")
            assert server.exports == 1 and page.url == server.url  # the page stayed; the browser saved the file
            page.tap("#wipe")
            assert page.inner_text("#wipe").strip() == "Dotknij ponownie, aby usunąć wszystko"
            assert device.store.counts()["predictions"] == 9  # one tap deletes nothing
            page.tap("#wipe")
            page.wait_for_selector("#data-done:has-text('Usunięto rozpoznania z odpowiedziami (9)')")
            assert page.locator("#wipe").is_enabled()
            page.wait_for_selector(".empty")
            assert page.inner_text("#accuracy") == "nie ma jeszcze odpowiedzi"
            assert page.locator(".pred").count() == 0
            keep_screenshot_of(page, tmp_path / "data-panel-pl-wiped.png")
            browser.close()
    finally:
        server.stop()
        locked.stop()
    assert device.store.counts()["predictions"] == 0 and device.store.examples() == []
    assert device.store.export()["speaker_statistics"] == {}
    assert not device.personalized and not list(device.state_dir.glob("personal.*"))
    assert server.wipes == 1
    reopened = Device(device.state_dir)  # what a restart finds: nothing of the user's
    assert reopened.store.counts()["predictions"] == 0 and not reopened.personalized


def keep_screenshot_of(page, path) -> None:
    page.screenshot(path=str(path))
    keep_screenshot(path)


def test_the_page_of_a_running_listen_wipes_and_listen_goes_on(tmp_path, synthetic_clips):
    """``fedser-edge listen --feedback web`` as the service runs it: its page's wipe deletes what the running
    process stored, the process goes on, and its output (the journal, under systemd) holds prediction ids only."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    state, port = tmp_path / "dev", free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDSER_EDGE_")},
           "FEDSER_EDGE_WEB_PORT": str(port)}
    listen = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "--state", str(state), "listen", "--feedback",
                               "web", "--file", str(synthetic_clips[0].path), "--seconds", "60"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/api/"
    try:
        deadline, data = time.monotonic() + 60, {}
        while time.monotonic() < deadline and not data.get("predictions"):
            try:
                data = requests.get(url + "state", timeout=5).json()["data"]
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        assert data.get("predictions"), "listen classified nothing"
        r = requests.post(url + "wipe", json={"confirm": "wipe"}, timeout=60)
        assert r.status_code == 200 and r.json()["wiped"]["predictions"] == data["predictions"], r.text
        assert requests.get(url + "state", timeout=5).json()["data"]["predictions"] == 0
        listen.send_signal(signal.SIGTERM)  # systemd's stop (else it runs to --seconds)
    finally:
        try:
            out, err = listen.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            listen.kill()
            out, err = listen.communicate()
    assert listen.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    printed = [line for line in lines if "prediction" in line]
    assert printed and all(set(line) == {"prediction", "model_version"} for line in printed), out
    assert "the page's user deleted" in err
    reopened = Device(state)
    assert reopened.store.counts()["predictions"] == 0
