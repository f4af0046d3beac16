"""Feedback the ways a user gives it (the local page in Chromium, a keypress in a terminal), and the user's data:
export, wipe, retention, and the personalised head surviving a kill at any moment."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edge_sdk.device import Device
from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def keep_screenshot(path) -> None:
    """A screenshot that was drawn (not blank), copied to $FEDSER_TEST_ARTIFACTS when set (to be looked at)."""
    assert os.path.getsize(path) > 10_000, path
    artifacts = os.environ.get("FEDSER_TEST_ARTIFACTS")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(path, artifacts)


@pytest.fixture(scope="module")
def clips(synthetic_clips):
    """Audio files to classify (the labelled synthetic corpus: these tests are about the UI and the data)."""
    return [c.path for c in synthetic_clips[::5]][:6]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_local_page_in_headless_chromium_click_thumbs_and_pick_a_label(device, clips, tmp_path):
    from playwright.sync_api import sync_playwright

    from edge_sdk.web import FeedbackServer
    from tools.demo import free_port

    preds = [device.classify_file(p) for p in clips[:3]]
    server = FeedbackServer(device, port=free_port()).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(server.url)
            page.wait_for_selector(f'.pred[data-id="{preds[0].id}"]')
            assert page.locator(".pred").count() == 3
            page.click(f'button.up[data-id="{preds[0].id}"]')
            page.click(f'button.down[data-id="{preds[1].id}"]')
            other = next(lab for lab in device.metadata.labels if lab != preds[2].label)
            page.click(f'.fix button[data-id="{preds[2].id}"][data-label="{other}"]')
            page.locator(".answered").nth(2).wait_for()
            assert page.inner_text("#accuracy").startswith("right 1 of 3")
            # a bare "wrong" asks for the emotion (what personalises); the other answers do not
            assert page.locator(".hint").count() == 1
            assert page.inner_text(f'.pred[data-id="{preds[1].id}"] .hint').startswith("Which was it?")
            page.screenshot(path=str(tmp_path / "feedback-page.png"), full_page=True)
            browser.close()
    finally:
        server.stop()
    answers = {e.prediction_id: (e.kind, e.target) for e in device.store.examples()}
    assert answers == {preds[0].id: ("up", preds[0].label), preds[1].id: ("down", preds[1].label),
                       preds[2].id: ("label", other)}
    keep_screenshot(tmp_path / "feedback-page.png")


def test_the_page_refuses_cross_site_posts(device, clips):
    import requests

    from edge_sdk.web import FeedbackServer
    from tools.demo import free_port

    pred = device.classify_file(clips[0])
    server = FeedbackServer(device, port=free_port()).start()
    try:
        url = server.url + "api/feedback"
        r = requests.post(url, json={"id": pred.id, "answer": "up"}, headers={"Origin": "http://evil.example"})
        assert (r.status_code, r.json()["error"]) == (403, "cross_origin")
        r = requests.post(url, data=f"id={pred.id}&answer=up", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = requests.post(url, json={"id": pred.id, "answer": "furious"})
        assert r.status_code == 400 and "furious" in r.json()["detail"]
        assert device.store.counts()["feedback"] == 0
    finally:
        server.stop()


def test_after_a_bare_down_the_terminal_asks_for_the_emotion_and_its_key_replaces_the_down(device, clips):
    import io

    from edge_sdk.terminal import TerminalFeedback

    out = io.StringIO()
    term = TerminalFeedback(device, stdout=out)
    pred = device.classify_file(clips[0])
    term.prompt(pred)
    assert term.handle_key("d") == "down" and "which was it? press its number" in out.getvalue()
    assert [(e.kind, e.target) for e in device.store.examples()] == [("down", pred.label)]
    other = next(i for i, lab in enumerate(device.metadata.labels) if lab != pred.label)
    assert term.handle_key(str(other + 1)) == device.metadata.labels[other]  # replaces the bare down
    assert [(e.kind, e.target) for e in device.store.examples()] == [("label", device.metadata.labels[other])]
    assert term.handle_key("u") is None  # answered: the next key waits for the next prediction
    assert out.getvalue().count("which was it?") == 1
    term.prompt(device.classify_file(clips[1]))
    assert term.handle_key("u") == "up" and term.handle_key("1") is None  # a thumbs-up closes it at once
    assert device.store.counts()["feedback"] == 2


@pytest.mark.parametrize("lang, flags, prompt, key, stored", [
    ("C.UTF-8", (), b"[u] right  [d] wrong", b"u", b"stored up: right 1 of 1"),
    ("pl_PL.UTF-8", (), "[u] dobrze  [d] źle".encode(), b"4", b"zapisano (smutek): trafnie"),
    ("C.UTF-8", ("--language", "pl"), "[u] dobrze  [d] źle".encode(), b"u", b"zapisano (dobrze): trafnie 1 z 1"),
], ids=["english", "polish-locale", "polish-flag"])
def test_single_keypress_in_a_terminal(tmp_path, clips, lang, flags, prompt, key, stored):
    """``fedser-edge listen --file ... --feedback terminal`` in a pseudo-terminal; one key answers, no Enter. The
    prompt speaks the locale's language (edge_sdk/i18n.py); the key stores the model's label (4: sad)."""
    state = tmp_path / "dev"
    if Device(state).model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FEDSER_EDGE_", "LC_", "LANG"))}, "LANG": lang}
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "edge_sdk.cli", "--state", str(state), "listen",
                                   "--file", str(clips[0]), "--feedback", "terminal", "--seconds", "60", *flags],
                  env)
    out = b""
    try:
        deadline = time.time() + 60
        while prompt not in out and time.time() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                out += os.read(fd, 4096)
        assert prompt in out, out.decode(errors="replace")
        os.write(fd, key)  # one key, no Enter
        while stored not in out and time.time() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                out += os.read(fd, 4096)
        assert stored in out, out.decode(errors="replace")
        os.write(fd, b"q")
        while time.time() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    assert b"listen_stats" in out
    dev = Device(state)
    (answer,) = dev.store.examples()
    if key == b"u":
        assert answer.kind == "up"
    else:  # the model's label, whatever the prompt called it (a thumbs-up when the model had said sad)
        assert answer.target == "sad" and answer.kind in ("label", "up")


def test_export_wipe_and_retention(device, clips, tmp_path):
    preds = [device.classify(np.zeros(16000, np.float32) + 0.01 * np.sin(np.arange(16000) / 5.0), keep_audio=i == 0)
             for i in range(4)]
    device.feedback(preds[0].id, "up")
    data = device.store.export()
    assert data["format"] == "fedser-edge-export/1" and len(data["predictions"]) == 4
    first = next(p for p in data["predictions"] if p["id"] == preds[0].id)
    assert first["feedback"]["kind"] == "up" and first["audio"] is not None and first["sample_rate"] == 16000
    assert all(p["audio"] is None for p in data["predictions"] if p["id"] != preds[0].id)  # audio only opted in
    assert device.store.enforce_retention(max_predictions=2) == 2 and device.store.counts()["predictions"] == 2
    old = time.time() + 10 * 86400
    assert device.store.enforce_retention(max_age_days=5, now=old) == 2
    device.classify_file(clips[0])
    emb = device.store.export()["predictions"][0]["embedding"]
    removed = device.store.wipe()
    assert removed["predictions"] == 1 and device.store.counts()["predictions"] == 0
    raw = b"".join(p.read_bytes() for p in device.state_dir.glob("fedser.db*"))
    import base64

    assert base64.b64decode(emb)[:64] not in raw  # the bytes are gone from the file, not just unlinked


def test_cli_export_and_wipe(tmp_path, clips):
    state = tmp_path / "dev"
    if Device(state).model is None:
        pytest.skip("no bundled model in edge_sdk/data")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(state), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    pred = json.loads(cli("classify", str(clips[0])).stdout)
    assert cli("feedback", pred["id"], "down").returncode == 0
    out = cli("export-data", "--out", str(tmp_path / "mine.json"))
    assert out.returncode == 0
    assert json.loads((tmp_path / "mine.json").read_text())["predictions"][0]["id"] == pred["id"]
    refused = cli("wipe-data")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert json.loads(cli("wipe-data", "--yes").stdout)["wiped"]["predictions"] == 1
    assert json.loads(cli("status").stdout)["predictions"] == 0


_WRITER = """
import sys, numpy as np
from edge_sdk.storage import atomic_write
from edge_sdk.wire import ArraySpec, HeadLayout, pack_arrays
layout = HeadLayout([ArraySpec("w0", (256, 256)), ArraySpec("b0", (256,))])
i = 0
while True:
    i += 1
    atomic_write(sys.argv[1], pack_arrays(layout, {"w0": np.full((256, 256), i, np.float32),
                                                   "b0": np.full(256, i, np.float32)}))
    print(i, flush=True)
"""


def test_personal_head_survives_a_kill_at_any_moment(tmp_path):
    from edge_sdk.wire import ArraySpec, HeadLayout, unpack_arrays

    layout = HeadLayout([ArraySpec("w0", (256, 256)), ArraySpec("b0", (256,))])
    target = tmp_path / "personal.head"
    rng = np.random.default_rng(3)
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE)
        proc.stdout.readline()  # at least one complete write
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        arrays = unpack_arrays(layout, target.read_bytes())  # complete and parseable: old or new, never torn
        value = arrays["w0"].flat[0]
        assert np.all(arrays["w0"] == value) and np.all(arrays["b0"] == value), f"torn write in trial {trial}"


def test_listen_fine_tunes_when_enough_new_answers_and_the_room_is_quiet(tmp_path, clips):
    state = tmp_path / "dev"
    dev = Device(state)
    if dev.model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    for path in clips[:5]:
        pred = dev.classify_file(path)
        dev.feedback(pred.id, "up")
    dev.store.close()
    (state / "config.toml").write_text("[training]\nmin_new_feedback = 4\nidle_seconds = 0.5\n"
                                      "[feedback]\nmode = 'none'\n")
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(state), "listen", "--file",
                          str(clips[0]), "--seconds", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    trained = [x["trained"] for x in lines if "trained" in x]
    assert len(trained) == 1 and trained[0]["status"] in ("kept", "discarded")  # once: no new answers after
    assert any("label" in x for x in lines) and "listen_stats" in lines[-1]
    assert Device(state).store.get("trained_feedback") == "5"


def _tofu_free(text: str) -> bool:
    """Only characters every font has: printable ASCII (no emoji, no dingbats such as check marks)."""
    return all(" " <= ch <= "~" or ch in "\n\t" for ch in text)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
@pytest.mark.parametrize("viewport", [{"width": 390, "height": 844}, {"width": 1280, "height": 800}],
                         ids=["phone", "desktop"])
def test_the_page_on_a_phone_and_a_desktop_svg_and_text_only_big_targets(device, clips, tmp_path, viewport):
    """Screenshots go to FEDSER_TEST_ARTIFACTS (or the test's temporary folder); they were looked at."""
    from playwright.sync_api import sync_playwright

    from edge_sdk.web import FeedbackServer
    from tools.demo import free_port

    preds = [device.classify_file(p) for p in clips[:4]]
    server = FeedbackServer(device, port=free_port()).start()
    phone = viewport["width"] < 600
    shots = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            ctx = browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone,
                                      device_scale_factor=2 if phone else 1)
            page = ctx.new_page()
            page.goto(server.url)
            page.wait_for_selector(f'.pred[data-id="{preds[-1].id}"]')
            assert page.evaluate("document.querySelector('meta[name=viewport]').content").startswith(
                "width=device-width")
            assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]  # no sideways scroll
            buttons = page.locator("main button")  # (the "Your data" panel: test_page_data_panel.py)
            assert buttons.count() == 4 * (2 + len(device.metadata.labels))
            for i in range(buttons.count()):
                b = buttons.nth(i)
                box = b.bounding_box()
                assert box["width"] >= 44 and box["height"] >= 44, (b.inner_text(), box)  # WCAG / Apple HIG
                text = b.inner_text().strip()
                assert text and _tofu_free(text), repr(text)
            for verdict in ("up", "down"):  # an icon drawn as SVG, and a word
                assert page.locator(f"button.{verdict}").first.locator("svg").count() == 1
            assert _tofu_free(page.inner_text("body")), page.inner_text("body")
            newest = page.locator(f'.pred[data-id="{preds[-1].id}"]')
            if phone:  # under the thumb: docked at the bottom of the screen while unanswered
                box = newest.bounding_box()
                assert newest.evaluate("e => getComputedStyle(e).position") == "fixed"
                assert abs(box["y"] + box["height"] - viewport["height"]) <= 1, box
            shots["before"] = tmp_path / f"feedback-{'phone' if phone else 'desktop'}.png"
            page.screenshot(path=str(shots["before"]), full_page=not phone)
            # answering with the label the model predicted is a thumbs-up, on the page as in the store
            tap = page.tap if phone else page.click
            tap(f'.fix button[data-id="{preds[-1].id}"][data-label="{preds[-1].label}"]')
            page.wait_for_selector(f'.pred[data-id="{preds[-1].id}"] .answered[data-answer="up"]')
            assert page.inner_text("#accuracy").startswith("right 1 of 1")
            other = next(lab for lab in device.metadata.labels if lab != preds[0].label)
            tap(f'.fix button[data-id="{preds[0].id}"][data-label="{other}"]')
            page.wait_for_selector(f'.pred[data-id="{preds[0].id}"] .answered[data-answer="label"]')
            assert page.inner_text("#accuracy").startswith("right 1 of 2")
            shots["after"] = tmp_path / f"feedback-{'phone' if phone else 'desktop'}-answered.png"
            page.screenshot(path=str(shots["after"]), full_page=not phone)
            browser.close()
    finally:
        server.stop()
    counts = device.store.counts()
    assert (counts["feedback_up"], counts["feedback_label"]) == (1, 1)
    for shot in shots.values():
        keep_screenshot(shot)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_page_opened_with_the_token_link_works_beyond_loopback(device, clips, tmp_path):
    from playwright.sync_api import sync_playwright

    from edge_sdk.web import FeedbackServer
    from tools.demo import free_port

    pred = device.classify_file(clips[0])
    port = free_port()
    server = FeedbackServer(device, host="0.0.0.0", port=port).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.goto(f"http://127.0.0.1:{port}/")  # without the token: the page says what to open
            page.wait_for_function("document.getElementById('status').textContent.includes('#token=')")
            assert page.locator(".pred").count() == 0
            page.goto(f"http://127.0.0.1:{port}/#token={server.token}")
            page.reload()
            page.wait_for_selector(f'.pred[data-id="{pred.id}"]')
            page.click(f'button.up[data-id="{pred.id}"]')
            page.wait_for_selector('.answered[data-answer="up"]')
            page.goto(f"http://127.0.0.1:{port}/")  # the tab remembers the token: a bookmark without it works
            page.wait_for_selector(f'.pred[data-id="{pred.id}"]')
            browser.close()
    finally:
        server.stop()
    assert device.store.counts()["feedback_up"] == 1


def test_a_correction_naming_the_predicted_label_is_a_thumbs_up(tmp_path, clips):
    """Issue 13: 14 answers with the label, 9 of them the predicted one, said "right 0 of 14"."""
    a, b = Device(tmp_path / "a"), Device(tmp_path / "b")
    if a.model is None:
        pytest.skip("no bundled model in edge_sdk/data")
    rng = np.random.default_rng(4)
    labels = a.metadata.labels
    for i in range(14):
        audio = (0.2 * np.sin(np.arange(24000) * (0.05 + 0.01 * i)) + 0.01 * rng.standard_normal(24000))
        pa, pb = a.classify(audio.astype(np.float32)), b.classify(audio.astype(np.float32))
        assert pa.label == pb.label
        if i < 9:
            a.feedback(pa.id, pa.label)  # the label it predicted, picked from the list
            b.feedback(pb.id, "up")      # a thumbs-up
        else:
            wrong = next(lab for lab in labels if lab != pa.label)
            a.feedback(pa.id, wrong)
            b.feedback(pb.id, wrong)
    for dev in (a, b):
        counts = dev.store.counts()
        assert (counts["feedback_up"], counts["feedback_label"]) == (9, 5)
        assert dev.store.personal_accuracy() == {"answered": 14, "right": 9, "accuracy": 9 / 14}
    # the training sees the same examples either way
    ea, eb = a.store.examples(), b.store.examples()
    assert [(e.kind, e.target, e.sign) for e in ea] == [(e.kind, e.target, e.sign) for e in eb]
    assert sum(e.kind == "up" and e.sign == 1.0 for e in ea) == 9


def test_answers_stored_by_older_sdks_are_read_as_thumbs_up(tmp_path):
    import sqlite3

    from edge_sdk.store import FeedbackStore

    store = FeedbackStore(tmp_path / "s.db")
    for pid, label in (("a", "happy"), ("b", "happy")):
        store.add_prediction(prediction_id=pid, model_version=1, label=label, probs=np.array([0.1, 0.9]),
                             embedding=np.arange(4, dtype=np.float32), features=None, latency_ms=1.0)
    store.close()
    with sqlite3.connect(tmp_path / "s.db") as conn:  # what an SDK before the fix wrote
        conn.executemany("INSERT INTO feedback(prediction_id, kind, label, created_at) VALUES (?, 'label', ?, 0)",
                         [("a", "happy"), ("b", "sad")])
    store = FeedbackStore(tmp_path / "s.db")
    assert store.personal_accuracy()["right"] == 1
    assert {e.prediction_id: (e.kind, e.target) for e in store.examples()} == {"a": ("up", "happy"),
                                                                               "b": ("label", "sad")}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_page_says_when_the_microphone_is_lost_and_when_it_is_back(device, clips, tmp_path):
    """The listener's stats (``input_lost``, set by the input keeper: tests/edge_sdk/test_microphone.py) reach the
    page: a banner while the microphone is being reopened, gone once it is back; the list is untouched."""
    from playwright.sync_api import sync_playwright

    from edge_sdk.web import FeedbackServer
    from tools.demo import free_port

    pred = device.classify_file(clips[0])
    state = {"input_lost": True, "input_losses": 1, "input_restarts": 0}
    server = FeedbackServer(device, port=free_port(), stats=lambda: dict(state)).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True).new_page()
            page.goto(server.url)
            page.wait_for_selector(f'.pred[data-id="{pred.id}"]')
            page.wait_for_selector("#mic:not(:empty)")
            assert "microphone stopped" in page.inner_text("#mic")
            assert _tofu_free(page.inner_text("#mic"))
            page.screenshot(path=str(tmp_path / "feedback-mic-lost.png"))
            state.update(input_lost=False, input_restarts=1)
            page.wait_for_selector("#mic:empty", state="attached", timeout=10_000)  # (the CSP forbids eval)
            assert page.locator(f'.pred[data-id="{pred.id}"]').count() == 1
            browser.close()
    finally:
        server.stop()
    keep_screenshot(tmp_path / "feedback-mic-lost.png")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_page_takes_the_token_out_of_the_link_and_says_when_the_device_does_not_answer(device, clips, tmp_path):
    """The token link's fragment left the token in the address bar and the history; a tap while the device was
    down (listen stopped) did nothing and said nothing. A token as a keeper may set it ("+", "&", a space) works
    from the link, and markup that reached the page could not run (the CSP names the page's own script only)."""
    from playwright.sync_api import sync_playwright

    from edge_sdk.web import FeedbackServer
    from tools.demo import free_port

    pred = device.classify_file(clips[0])
    port, token = free_port(), "kitchen+pi&token=one two %41"
    server = FeedbackServer(device, port=port, token=token).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 390, "height": 844})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # the link as the device prints it (page_url: the token percent-encoded), on this machine's address
            page.goto(f"http://127.0.0.1:{port}/?lang=en#" + server.page_url.split("#", 1)[1])
            page.wait_for_selector(f'.pred[data-id="{pred.id}"]')  # (the state needs the token)
            assert page.url == f"http://127.0.0.1:{port}/?lang=en"
            page.evaluate("document.body.insertAdjacentHTML('beforeend', "  # (hidden: the screenshot shows the page)
                          "'<img hidden src=x onerror=\"document.title = 1\">')")
            server.stop()
            page.wait_for_selector("#status:has-text('does not answer')", timeout=10_000)
            page.click(f'button.up[data-id="{pred.id}"]')
            page.wait_for_timeout(300)
            assert "does not answer" in page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "feedback-device-down.png"))
            server = FeedbackServer(device, port=port, token=token).start()  # listen started again
            page.wait_for_selector("#status:empty", state="attached", timeout=10_000)
            page.click(f'button.up[data-id="{pred.id}"]')
            page.wait_for_selector('.answered[data-answer="up"]')
            assert page.title() != "1" and not errors, errors
            browser.close()
    finally:
        server.stop()
    assert device.store.counts()["feedback_up"] == 1
    keep_screenshot(tmp_path / "feedback-device-down.png")
