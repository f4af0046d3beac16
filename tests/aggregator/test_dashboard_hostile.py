"""The admin console (``/admin`` and the JSON it reads) against what others put in it: an uploaded model's metadata
(its metrics are the uploader's JSON), a device's enrollment name, and whatever else the JSON could hold: text,
markup, huge or missing numbers. Nothing may run, mis-render or 500; and the page's error states and token link."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import threading
from urllib.parse import quote

import pytest
import requests

from aggregator import create_app
from edge_sdk.signing import SigningKey
from tests.integration.test_dashboard_console import open_page
from tools.demo import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MARKUP = '<img src=x id=injected onerror="document.title=\'PWNED\'">'
TOKEN = "s3cret+token/with=base64&chars%41"  # visible ASCII, as ADMIN_TOKEN allows: "+", "&" and "%" included


def _publish(client, auth, trained_model, test_metrics):
    meta = json.loads(trained_model.metadata_path.read_text())
    meta["extra"]["test"] = test_metrics
    with open(trained_model.tflite_path, "rb") as t:
        return client.post("/api/v1/admin/models", headers=auth, data={
            "tflite": (t, "model.tflite"), "metadata": (io.BytesIO(json.dumps(meta).encode()), "model.json")})


def test_model_metrics_of_any_shape_reach_the_console_as_numbers_or_nothing(tmp_path, trained_model):
    """An uploaded base's metrics are its metadata's ``extra.test``: a validation figure of the wrong shape was a
    500 of /console (the console's sections then never loaded), a string in ``round_updates`` markup on the page."""
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "LOG_JSON": True})
    client, auth = app.test_client(), {"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}
    for metrics in ({"validation": {"candidate": "s", "current": 5}, "base_test": {"uar": "x", "accuracy": True}},
                    {"validation": {"candidate": {"uar": MARKUP, "accuracy": 0.5}}, "round_updates": MARKUP,
                     "round_examples": -3, "rollback_of": MARKUP, "uar": 0.25},
                    {"validation": [1], "round_updates": 2.5, "rollback_of": True}):
        assert _publish(client, auth, trained_model, metrics).status_code == 201
        r = client.get("/api/v1/admin/console", headers=auth)
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
        assert client.get("/api/v1/admin/status", headers=auth).status_code == 200
    versions = {v["version"]: v for v in r.json["versions"]}
    assert [versions[v]["validation_uar"] for v in (1, 2, 3)] == [None, None, None]
    assert versions[2]["validation_accuracy"] == 0.5 and versions[2]["base_test_uar"] == 0.25
    for v in versions.values():  # counts and versions: integers or nothing (a published version's own: below)
        assert v["round_updates"] is None and v["round_examples"] is None and v["rollback_of"] is None
    assert versions[1]["base_test_accuracy"] is None  # (a boolean is not a figure)
    assert MARKUP not in r.get_data(as_text=True)
    # a real rollback still says what it rolled back to
    assert client.post("/api/v1/admin/models/1/rollback", headers=auth).status_code in (200, 201)
    versions = client.get("/api/v1/admin/console", headers=auth).json["versions"]
    assert versions[0]["rollback_of"] == 1


@pytest.mark.parametrize("test", ["ab", [["uar", 0.5]], [1, 2], 5, True])
def test_model_metrics_that_are_not_an_object_are_a_422_that_says_so(tmp_path, trained_model, test):
    """``extra.test`` of another kind was a 422 quoting Python ("dictionary update sequence element #0 ..."), and a
    list of pairs was taken as figures; now every kind but an object (or null: no figures) is refused by name."""
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "LOG_JSON": True})
    client, auth = app.test_client(), {"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}
    r = _publish(client, auth, trained_model, test)
    assert (r.status_code, r.json["error"]) == (422, "bad_model"), r.get_data(as_text=True)[:300]
    assert r.json["detail"].startswith("model metadata extra.test must be an object of test figures")
    assert type(test).__name__ in r.json["detail"]
    assert client.get("/api/v1/admin/console", headers=auth).json["versions"] == []  # nothing was published
    assert _publish(client, auth, trained_model, None).status_code == 201  # null: a base without figures


@pytest.mark.parametrize("name", ["\ud800", "a\u0000b", "\u202eevil\u202c", "two\nlines", "tab\there",
                                  "a\u2028b", "\u2067isolate", "\ue000", "x\ufdd0", "\ufeffbom"])
def test_an_enrollment_name_the_console_cannot_show_is_a_400(tmp_path, name):
    """The name is shown on the console: a lone surrogate was a 500 (SQLite cannot store it), a bidi override
    reordered what the admin read."""
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "LOG_JSON": True})
    client, auth = app.test_client(), {"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}

    def enroll(name):
        token = client.post("/api/v1/admin/enrollment-tokens", headers=auth, json={}).json["token"]
        body = json.dumps({"token": token, "public_key": SigningKey.generate().verify_key.to_b64(), "name": name})
        return client.post("/api/v1/devices/enroll", data=body, content_type="application/json")

    r = enroll(name)
    assert (r.status_code, r.json["error"]) == (400, "out_of_range"), r.get_data(as_text=True)[:300]
    assert "console cannot show" in r.json["detail"]
    # any script, spaces of every kind and emoji (joined ones, tag-sequence flags, one newer than Python's tables)
    for fine in ("Kuchnia Łódź (pi-4)", "Salle\u00a03", "👩\u200d💻 desk", "🏳️\u200d🌈", "میز\u200cکار",
                 "🫨 \U0001faea", "🏴\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f Cymru"):
        assert enroll(fine).status_code == 201, fine


@pytest.fixture
def console(tmp_path):
    """The aggregator on loopback (werkzeug's server), its admin token one with a "+" and a "&"."""
    from werkzeug.serving import make_server

    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "LOG_JSON": True, "ADMIN_TOKEN": TOKEN})
    httpd = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_only_the_pages_own_script_may_run(console):
    r = requests.get(f"{console}/admin", timeout=10)
    csp = r.headers["Content-Security-Policy"]
    script_src = re.search(r"script-src ([^;]*)", csp).group(1)
    assert "unsafe-inline" not in script_src and "unsafe-eval" not in script_src
    scripts = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert script_src.split() == [f"'sha256-{digest}'"]


# Every field the page reads, as text, markup, a huge or a negative number, or of the wrong type.
_STATUS = {
    "current_version": "<img id=s1>", "versions": "<img id=s2>", "round_min_updates": "<img id=s3>",
    "current_metrics": {"base_test": {"uar": "<img id=s4>", "accuracy": -1e308}, "validation": {"candidate": "x"}},
    "policy": {"method": "<img id=s5>", "optimizer": "x", "server_lr": 1, "clip_norm": None},
    "open_round": {"id": "<img id=s6>", "updates": -5, "base_version": 1e300, "deadline_at": "<img id=s7>"},
    "rounds": [{"id": '"><img id=s8>', "status": "closed", "num_updates": "<img id=s9>",
                "num_examples": "<img id=s10>", "validation_uar": '"/><img id=s11>'},
               {"id": 2, "status": "rejected", "num_updates": 1e308, "num_examples": None, "validation_uar": 0.5}],
    "devices": [{"id": "<img id=s12>", "name": "<script>document.title='PWNED'</script>", "enrolled_at": "x",
                 "last_seen": -1e20, "updates_accepted": MARKUP, "updates_refused": {"a": 1}, "revoked": False}],
    "refusals": {"<img id=s13>": "<img id=s14>"},
    "jobs": [{"id": "<img id=s15>", "status": "<b>bold</b>", "started_at": 1e300, "detail": MARKUP},
             # an object shaped like the page's own markup marker: still not markup
             {"id": 2, "status": {"html": "<img id=s16>"}, "started_at": 1, "detail": {"html": "<a id=s17>x</a>"}}],
}
_CONSOLE = {
    "fleet": {"devices_reporting": 3, "answers_scored": "<img id=c1>", "personal_accuracy": "x",
              "global_accuracy": None, "mean_gain": "<img id=c2>", "devices_better": "<img id=c3>",
              "devices_equal": None, "gains": ["<img id=c4>", 0.5, None, -0.3]},
    "devices": [{"id": "<img id=c5>", "name": MARKUP, "answers_scored": "<img id=c6>", "personal_accuracy": "<x>",
                 "personal_correct": "<img id=c7>", "global_accuracy": 1, "global_correct": "<img id=c8>",
                 "gain": "<img id=c9>", "round_id": "<img id=c10>", "reported_at": "<img id=c11>"}],
    "versions": [{"version": '1"><img id=c12>', "parent_version": "<img id=c13>", "round_id": "<img id=c14>",
                  "created_at": "x", "current": False, "note": "<img id=c15>", "rollback_of": "<img id=c16>",
                  "validation_uar": "x", "base_test_uar": "x", "round_updates": "<img id=c17>"}],
    "refused_rounds": [{"id": "<img id=c18>", "base_version": "<img id=c19>", "closed_at": "x",
                        "num_updates": "<img id=c20>", "candidate_uar": "x", "current_uar": "x", "margin": "x",
                        "reason": "<img id=c21>", "min_group_clips": "<img id=c22>",
                        "groups": [{"group": '"><img id=c23>', "examples": "<img id=c24>", "current_uar": "x",
                                    "candidate_uar": "x", "dropped": True}, None, 7]}],
}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_whatever_the_json_holds_the_page_shows_it_as_text(console, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser, page, errors = open_page(pw)
        page.route("**/api/v1/admin/status", lambda route: route.fulfill(json=_STATUS))
        page.route("**/api/v1/admin/console", lambda route: route.fulfill(json=_CONSOLE))
        page.goto(f"{console}/admin#token={quote(TOKEN, safe='')}")
        page.wait_for_selector("#versions tbody td:has-text('<img id=c17>')")
        page.screenshot(path=str(tmp_path / "console-hostile.png"), full_page=True)
        assert page.title() == "fedser aggregator"
        assert page.locator("main img, main script, main b:has-text('bold'), #s17").count() == 0
        text = page.inner_text("main")
        for shown in ("<img id=c5>", MARKUP, "<script>document.title='PWNED'</script>", "<img id=s13>",
                      "<b>bold</b>", "<img id=c21>", '"><img id=c23>'):
            assert shown in text, shown
        for garbage in ("NaN", "Infinity", "undefined", "null", "Invalid Date", "[object Object]"):
            assert garbage not in text, garbage
        assert "rollback of <img id=c16>" in text  # (shown as text; the server sends only integers there)
        bars = page.eval_on_selector_all("#gain-chart rect", "els => els.map(e => +e.dataset.count)")
        assert sum(bars) == 2  # the two numbers among the gains
        # and were markup ever shown, its inline handler would not run: the CSP names the page's script only
        page.evaluate(f"document.getElementById('policy').innerHTML = {json.dumps(MARKUP)}")
        page.wait_for_timeout(500)
        assert page.title() == "fedser aggregator"
        assert not errors, errors
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_token_link_the_error_states_and_a_token_that_cannot_be_sent(console):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser, page, errors = open_page(pw)
        # the link as the tools print it (tools.demo.dashboard_link: percent-encoded); it leaves the address bar at once
        page.goto(f"{console}/admin#token={quote(TOKEN, safe='')}")
        page.wait_for_selector("#main:not([hidden])")
        assert page.url == f"{console}/admin"
        assert page.evaluate("sessionStorage.getItem('fedser-admin-token')") == TOKEN
        # the aggregator down, then answering 503, then its console endpoint failing: each said as it is
        page.route("**/api/v1/admin/**", lambda route: route.abort())
        page.evaluate("load()")
        assert page.inner_text("#updated").startswith("cannot reach the aggregator")
        page.unroute("**/api/v1/admin/**")
        page.route("**/api/v1/admin/status", lambda route: route.fulfill(
            status=503, json={"error": "unavailable", "detail": "the database does not answer"}))
        page.evaluate("load()")
        assert page.inner_text("#updated") == ("the aggregator answered HTTP 503: the database does not answer; "
                                               "trying again")
        page.unroute("**/api/v1/admin/status")
        page.route("**/api/v1/admin/console", lambda route: route.fulfill(status=500, body="<h1>oops</h1>"))
        page.evaluate("load()")
        assert page.inner_text("#updated").endswith("personal against global, versions and refused rounds not "
                                                    "loaded (HTTP 500)")
        assert page.is_visible("#main")
        page.unroute("**/api/v1/admin/console")
        # a pasted token with a space inside cannot travel in a header: said so, and the form stays to paste again
        page.evaluate("sessionStorage.clear()")
        page.goto(f"{console}/admin")
        page.fill("#token", "two words")
        page.click("#login-form button")
        assert "not an admin token" in page.inner_text("#error") and page.is_visible("#login")
        page.fill("#token", "wrong-token")
        page.click("#login-form button")
        page.wait_for_selector("#error:has-text('That token was refused.')")
        page.fill("#token", TOKEN)
        page.click("#login-form button")
        page.wait_for_selector("#main:not([hidden])")
        assert page.inner_text("#error") == ""
        assert not errors, errors
        browser.close()


def test_admin_answers_are_never_cached_and_no_answer_is_sniffed(tmp_path):
    """The admin API's answers (bearer token) and /metrics carry ``Cache-Control: no-store``; every answer carries
    ``nosniff``; a route that sets its own cache policy (the manifest's ``no-cache`` with ETag) keeps it."""
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "LOG_JSON": True})
    client, auth = app.test_client(), {"Authorization": f"Bearer {app.config['ADMIN_TOKEN']}"}
    for path in ("/api/v1/admin/status", "/api/v1/admin/console", "/metrics"):
        r = client.get(path, headers=auth)
        assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store", path
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
    refused = client.get("/api/v1/admin/status")  # no token: the refusal is not cached either
    assert refused.status_code == 401 and refused.headers["Cache-Control"] == "no-store"
    for path in ("/healthz", "/api/v1/nothing-here", "/admin"):
        assert client.get(path).headers["X-Content-Type-Options"] == "nosniff", path
    assert "Cache-Control" not in client.get("/healthz").headers
