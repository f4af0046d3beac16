"""The feedback page in its user's language: the catalogues (bundled and a deployer's, checked as input from the
device's disk), the language a page picks, what it posts, and the page itself in Chromium (screenshots looked at)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from edge_sdk.errors import ParameterError
from edge_sdk.i18n import MAX_CATALOGUE_BYTES, bundled_catalogues, load_catalogue, load_languages, page_json
from tests.conftest import REPO
from tests.edge_sdk.test_doctor import doctor
from tests.edge_sdk.test_feedback_ui_and_data import CHROMIUM, _tofu_free, keep_screenshot

ENGLISH = bundled_catalogues()["en"]
# characters every font fedser's pages rely on has (DejaVu, Liberation, Noto, a phone's system font): Latin-1 and
# Latin Extended-A, which holds Polish (and Czech, Hungarian, Turkish ...)
LATIN = set(map(chr, range(0x20, 0x7F))) | set(map(chr, range(0xA0, 0x180)))


def _catalogue(**changes) -> bytes:
    doc = {"format": 1, "language": "de", "name": "Deutsch", "dir": "ltr",
           "messages": {"right": "Richtig", "wrong": "Falsch",
                        "accuracy": "{right} von {answered} richtig ({percent} %)"},
           "labels": {"angry": "Wut"}}
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def test_every_bundled_language_says_everything_english_says_with_the_same_placeholders():
    from models.datasets import FOUR_CLASSES, NEMO_EMOTIONS, RAVDESS_EMOTIONS

    catalogues = bundled_catalogues()
    assert set(catalogues) >= {"en", "pl"}
    for code, cat in catalogues.items():
        assert cat.missing == (), code  # a bundled catalogue is complete
        assert set(cat.messages) == set(ENGLISH.messages), code
        for text in [*cat.messages.values(), *cat.labels.values(), cat.name]:
            assert set(text) <= LATIN, (code, text)
    polish = catalogues["pl"]
    # every class label a bundled recipe trains (the 4 classes; RAVDESS's and nEMO's 8 and 6) has a Polish name
    for label in {*FOUR_CLASSES, *RAVDESS_EMOTIONS.values(), *NEMO_EMOTIONS.values()}:
        assert label in polish.labels, label
    assert polish.messages["right"] == "Dobrze" and polish.labels["sad"] == "smutek"


@pytest.mark.parametrize("data, words", [
    (b"{", ["not JSON"]),
    (b"\xff\xfe{}", ["not UTF-8"]),
    (b"[]", ["must be a JSON object"]),
    (b" " * (MAX_CATALOGUE_BYTES + 1), [f"at most {MAX_CATALOGUE_BYTES}"]),
    (_catalogue(format=2), ["format must be 1"]),
    (_catalogue(format=True), ["format must be 1"]),
    (_catalogue(language="pl"), ["says language 'pl'", "file name says 'de'"]),
    (_catalogue(language="Deutsch"), ["language must be a tag"]),
    (_catalogue(name=""), ["name must be 1 to"]),
    (_catalogue(name="x" * 41), ["name must be at most 40"]),
    (_catalogue(dir="up"), ["dir must be 'ltr' or 'rtl'"]),
    (_catalogue(extra=1), ["unknown fields ['extra']"]),
    (_catalogue(messages=["Richtig"]), ["messages must be an object"]),
    (_catalogue(messages={"rigth": "Richtig"}), ["unknown message 'rigth'"]),
    (_catalogue(messages={"accuracy": "{right} von {total}"}), ["messages.accuracy", "placeholders", "'answered'"]),
    (_catalogue(messages={"accuracy": "{right} von {answered"}), ["messages.accuracy", "a brace that is not"]),
    (_catalogue(messages={"accuracy": "{right!r} von {answered} ({percent:>3} %)"}), ["a brace that is not"]),
    (_catalogue(messages={"right": 1}), ["messages.right must be a string"]),
    (_catalogue(messages={"right": "x" * 401}), ["messages.right must be 1 to 400"]),
    (_catalogue(messages={"right": "Rich\x1b[31mtig"}), ["messages.right holds a non-printable character U+001B"]),
    (_catalogue(messages={"right": "Rich\u202etig"}), ["U+202E"]),  # a bidi override reorders what follows
    (_catalogue(messages={"right": "Rich\u2028tig"}), ["U+2028"]),
    (_catalogue(messages={"\x1b[31m\nforged line": "x"}), ["unknown message '\\x1b[31m\\nforged line'"]),
    (_catalogue(labels={"__proto__": "Wut"}), ["is not a class label"]),
    (_catalogue(messages={"terminal_prompt": "{label} ({percent} %)  [j] ja  [n] nein  {labels}  [leer] weiter"}),
     ["messages.terminal_prompt must name the same keys as English ([d], [u])"]),
    (_catalogue(name=None), ["name must be a string"]),  # a new language needs its name
    (_catalogue(messages=None), ["messages must be an object"]),
    (_catalogue(labels={"<b>": "Wut"}), ["is not a class label"]),
    (_catalogue(labels={"angry": ""}), ["labels.angry must be 1 to"]),
    (_catalogue(labels={f"l{i}": "x" for i in range(65)}), ["at most 64 names"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_catalogue_is_refused_with_what_is_wrong_and_where(data, words):
    with pytest.raises(ParameterError) as info:
        load_catalogue(data, source="/etc/fedser/i18n/de.json", expect_language="de", reference=ENGLISH)
    message = str(info.value)
    assert message.startswith("/etc/fedser/i18n/de.json"), message
    assert message.isprintable(), message  # nothing from the file reaches a log line or a terminal raw
    for word in words:
        assert word in message, (word, message)


def test_spaces_joiners_direction_marks_and_a_byte_order_mark_are_fine():
    # NBSP, narrow NBSP, ZWJ, ZWNJ, RLM, soft hyphen, ZWSP, the Arabic letter mark
    text = "Rich\u00a0tig\u202f!\u200d\u200c\u200f\u00ad\u200b\u061c"
    cat = load_catalogue(b"\xef\xbb\xbf" + _catalogue(messages={"right": text}, dir="rtl"), source="de.json",
                         expect_language="de", reference=ENGLISH)
    assert cat.messages["right"] == text and cat.direction == "rtl"


def test_a_deployers_folder_adds_and_rewords_languages_and_leaves_out_bad_files_naming_each(tmp_path):
    folder = tmp_path / "i18n"
    folder.mkdir()
    (folder / "de.json").write_bytes(_catalogue())  # partial: the rest in (the deployer's) English
    (folder / "en.json").write_bytes(_catalogue(language="en", name="English", messages={"waiting": "Listening..."}))
    # rewording a bundled language: only what changes (its name, direction and other messages stay)
    (folder / "pl.json").write_bytes(_catalogue(language="pl", name=None, dir=None, messages={"right": "Tak"},
                                                labels={"neutral": "bez emocji"}))
    (folder / "fr.json").write_bytes(b'{"format": 1')
    (folder / "it.json").write_bytes(_catalogue(language="it", messages={"right": "Giusto {x}"}))
    (folder / "es.json").symlink_to("/dev/zero")  # not a regular file: never read (it would never end)
    (folder / "notes.txt").write_text("not a catalogue: ignored")
    (folder / os.fsdecode(b"\xff\n.json")).write_bytes(b"{}")  # a name that is no UTF-8, with a newline
    big = folder / "cs.json"
    with big.open("wb") as f:  # a file far over the bound: read only up to it
        f.truncate(50 * 1024 * 1024)
    catalogues, problems = load_languages(folder)
    bundled_pl = bundled_catalogues()["pl"]
    assert set(catalogues) == {"en", "pl", "de"}
    en, pl, de = catalogues["en"], catalogues["pl"], catalogues["de"]
    assert en.messages["waiting"] == "Listening..." and en.messages["right"] == ENGLISH.messages["right"]
    assert en.missing == ()
    # a reworded bundled language keeps what the file does not say
    assert pl.messages["right"] == "Tak" and pl.messages["wrong"] == bundled_pl.messages["wrong"]
    assert pl.labels["neutral"] == "bez emocji" and pl.labels["sad"] == bundled_pl.labels["sad"] and pl.missing == ()
    assert pl.name == "Polski"
    assert de.messages["right"] == "Richtig" and de.messages["waiting"] == "Listening..."  # the deployer's English
    assert "waiting" in de.missing and "right" not in de.missing
    text = "\n".join(problems)
    assert len(problems) == 5 and all(p.isprintable() for p in problems), text
    for name, words in (("fr.json", "not JSON"), ("it.json", "placeholders"), ("es.json", "not a regular file"),
                        ("cs.json", "at most"), ("\\udcff\\n.json", "must be 1")):
        assert any(f"{folder}/{name}" in p and words in p for p in problems), (name, text)
    catalogues, problems = load_languages(tmp_path / "missing")
    assert set(catalogues) == {"en", "pl"} and "cannot be read" in problems[0]


def test_a_folder_of_many_catalogues_costs_bounded_work(tmp_path):
    from edge_sdk.i18n import MAX_FILES, MAX_LANGUAGES, MAX_PROBLEMS

    folder = tmp_path / "i18n"
    folder.mkdir()
    codes = [f"{a}{b}" for a in "abcdfghjkm" for b in "abcdefghjk"][:MAX_FILES + 20]
    for code in codes:
        (folder / f"{code}.json").write_bytes(_catalogue(language=code))
    catalogues, problems = load_languages(folder)
    assert len(catalogues) == MAX_LANGUAGES
    assert f"{len(codes)} catalogues; only the first {MAX_FILES} are examined" in problems[0]
    assert len(problems) == MAX_PROBLEMS + 1 and problems[-1].startswith("and ")
    assert f"at most {MAX_LANGUAGES} languages" in problems[1]


def test_the_embedded_catalogues_cannot_close_the_script_element():
    hostile = load_catalogue(_catalogue(messages={"right": "</script><script>alert(1)</script>&amp;"}),
                             source="de.json", expect_language="de", reference=ENGLISH)
    text = page_json({"en": ENGLISH, "de": hostile}, "de")
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text)["languages"]["de"]["messages"]["right"].startswith("</script>")
    with pytest.raises(ParameterError, match="feedback.language 'fr' has no catalogue"):
        page_json({"en": ENGLISH}, "fr")


def test_the_language_setting_is_checked_with_the_rest_of_the_config(tmp_path):
    from edge_sdk.config import load_config

    assert load_config(environ={}).feedback.language == "auto"
    assert load_config(environ={"FEDSER_EDGE_FEEDBACK_LANGUAGE": "pl"}).feedback.language == "pl"
    for bad in ("polish", "PL", "pl_PL", "pl-PL-x", "", "pl;rm -rf"):
        with pytest.raises(ParameterError, match="feedback.language must be 'auto' or a language tag"):
            load_config(environ={"FEDSER_EDGE_FEEDBACK_LANGUAGE": bad})
    config = tmp_path / "edge.toml"
    for bad in ("/etc/fedser/i18n\\u0000", "i18n", "~/i18n"):  # valid TOML; no path, or one that depends on the cwd
        config.write_text(f'[feedback]\ntranslations = "{bad}"\n')
        with pytest.raises(ParameterError, match="feedback.translations must be a folder's absolute path"):
            load_config(config, environ={})
    assert load_config(environ={"FEDSER_EDGE_FEEDBACK_TRANSLATIONS": "/etc/fedser/i18n"}).feedback.translations


def test_listen_refuses_a_page_language_without_a_catalogue_and_doctor_says_which(tmp_path):
    state = tmp_path / "state"
    folder = tmp_path / "i18n"
    folder.mkdir()
    (folder / "fr.json").write_bytes(b"nope")
    (folder / os.fsdecode(b"\xff.json")).write_bytes(b"nope")  # printed by doctor to a strict UTF-8 stdout
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDSER_EDGE_")},
           "FEDSER_EDGE_FEEDBACK_LANGUAGE": "de", "FEDSER_EDGE_FEEDBACK_TRANSLATIONS": str(folder),
           "FEDSER_EDGE_FEEDBACK_MODE": "web", "FEDSER_EDGE_WEB_PORT": "0"}
    wav = tmp_path / "silence.wav"
    import numpy as np
    import soundfile as sf

    sf.write(wav, np.zeros(8000, "float32"), 16000)
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(state), "listen", "--file", str(wav)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "feedback.language 'de' has no catalogue (there are: en, pl" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    for flag, words in (("de", "has no catalogue"), ("Polish", "feedback.language must be 'auto' or a language tag")):
        out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(state), "listen", "--file",
                              str(wav), "--language", flag], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**env, "FEDSER_EDGE_FEEDBACK_LANGUAGE": "pl"})  # the flag wins
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    code, checks = doctor(state, "--no-audio", env={**{k: v for k, v in env.items() if k.startswith("FEDSER_EDGE_")},
                                                    **strict})
    assert code == 1
    c = checks["feedback languages"]
    assert c["status"] == "fail" and "'de' has no catalogue" in c["detail"] and str(folder / "fr.json") in c["detail"]
    assert "\\udcff.json" in c["detail"]
    _, checks = doctor(state, "--no-audio", env={**{k: v for k, v in env.items() if k.startswith("FEDSER_EDGE_")},
                                                 "FEDSER_EDGE_FEEDBACK_MODE": "none"})
    assert checks["feedback languages"]["status"] == "warn"  # no page, no prompt: listen would start
    (folder / "de.json").write_bytes(_catalogue())
    code, checks = doctor(state, "--no-audio", env={**{k: v for k, v in env.items() if k.startswith("FEDSER_EDGE_")}})
    c = checks["feedback languages"]
    assert c["status"] == "warn", c  # fr.json still left out
    assert "de, en, pl" in c["detail"], c
    assert "the page and the prompt start in de" in c["detail"] and "de shows" in c["detail"]
    assert "fr.json" in c["detail"]


def test_doctor_and_listen_on_an_install_whose_own_catalogues_are_damaged(tmp_path):
    """A copy of the package with its Polish catalogue cut short: doctor fails the check and says to reinstall,
    listen exits 2 saying the same (no traceback)."""
    shutil.copytree(REPO / "edge_sdk", tmp_path / "edge_sdk", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "edge_sdk" / "static" / "i18n" / "pl.json").write_bytes(b'{"format": 1, "lang')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSER_EDGE_")}
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "s"), "doctor", "--json",
                          "--no-audio"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    checks = {c["name"]: c for c in map(json.loads, (line for line in out.stdout.splitlines() if line[:1] == "{"))}
    c = checks["feedback languages"]
    assert out.returncode == 1 and c["status"] == "fail", out.stdout + out.stderr
    assert "edge_sdk/static/i18n/pl.json" in c["detail"] and "reinstall" in c["detail"] + c["fix"]
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "--state", str(tmp_path / "s"), "listen", "--file",
                          str(tmp_path / "none.wav"), "--feedback", "terminal"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "reinstall fedser" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_terminal_speaks_the_locale_unless_it_cannot_show_its_letters():
    from edge_sdk.i18n import locale_tags, terminal_catalogue
    from edge_sdk.terminal import TerminalFeedback

    catalogues = bundled_catalogues()
    assert locale_tags({"LANG": "pl_PL.UTF-8@euro"}) == ["pl-PL"]
    assert locale_tags({"LC_ALL": "C", "LANG": "pl_PL.UTF-8"}) == []  # LC_ALL wins, and C names no language
    assert locale_tags({"LC_MESSAGES": "pl_PL", "LANG": "en_GB.UTF-8"}) == ["pl-PL"]
    assert terminal_catalogue(catalogues, environ={"LANG": "pl_PL.UTF-8"}).language == "pl"
    assert terminal_catalogue(catalogues, environ={"LANG": "de_DE.UTF-8"}).language == "en"
    assert terminal_catalogue(catalogues, "pl", environ={"LANG": "en_US.UTF-8"}).language == "pl"
    # a console that cannot show "ź" gets English, not a traceback
    assert terminal_catalogue(catalogues, "pl", environ={}, encoding="ascii").language == "en"
    with pytest.raises(ParameterError, match="feedback.language 'de' has no catalogue"):
        terminal_catalogue(catalogues, "de", environ={})

    class Ascii(io.TextIOWrapper):
        pass

    class Metadata:
        labels = ("angry", "happy", "neutral", "sad")

    class Prediction:
        id, label, probs = "p1", "angry", {"angry": 0.83, "happy": 0.1, "neutral": 0.05, "sad": 0.02}

    device = type("D", (), {"metadata": Metadata()})()
    out = Ascii(io.BytesIO(), encoding="ascii", newline="")
    TerminalFeedback(device, stdout=out, catalogue=catalogues["pl"]).prompt(Prediction())
    out.seek(0)
    assert out.buffer.getvalue().decode("ascii").strip() == (
        "z?o?? (83 %)   [u] dobrze  [d] ?le  [1] z?o??  [2] rado??  [3] neutralnie  [4] smutek  [spacja] pomi?")


def _answers(device) -> dict:
    return {e.prediction_id: (e.kind, e.target) for e in device.store.examples()}


def _save(tmp_path, page, name: str) -> None:
    page.screenshot(path=str(tmp_path / name))
    keep_screenshot(tmp_path / name)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_page_speaks_the_browsers_language_posts_the_models_labels_and_switches(device, synthetic_clips, tmp_path):
    """A Polish phone gets the page in Polish and its corrections store the model's labels; the user can switch
    to English (kept on reload); a device set to Polish shows Polish to an English browser; a deployer's
    catalogue with markup in it shows the markup as text. Screenshots go to FEDSER_TEST_ARTIFACTS (looked at)."""
    from playwright.sync_api import sync_playwright

    from edge_sdk.web import FeedbackServer
    from tools.demo import free_port

    clips = [c.path for c in synthetic_clips[::5]][:3]
    preds = [device.classify_file(p) for p in clips]
    hostile = load_catalogue(_catalogue(name="<i>Deutsch</i>",
                                        messages={"right": "<img src=x onerror=alert(1)>Richtig"},
                                        labels={"angry": "<img src=y onerror=alert(2)>Wut"}),
                             source="de.json", expect_language="de", reference=ENGLISH)
    # a deployer's right-to-left language: the page mirrors (dir="rtl") and still fits a phone
    arabic = load_catalogue(json.dumps({
        "format": 1, "language": "ar", "name": "العربية", "dir": "rtl",
        "messages": {"right": "صحيح", "wrong": "خطأ", "it_was": "كان:", "no_answers": "لا إجابات بعد"},
        "labels": {"angry": "غضب", "happy": "سعادة", "neutral": "محايد", "sad": "حزن"}}).encode(),
        source="ar.json", expect_language="ar", reference=ENGLISH)
    languages = {**bundled_catalogues(), "de": hostile, "ar": arabic}
    auto = FeedbackServer(device, port=free_port(), languages=languages).start()
    polish = FeedbackServer(device, port=free_port(), language="pl").start()
    polish_names = bundled_catalogues()["pl"].labels
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            ctx = browser.new_context(locale="pl-PL", viewport={"width": 390, "height": 844}, is_mobile=True,
                                      has_touch=True, device_scale_factor=2)
            # a phone browser of 2020 (iOS 13.4-15.3): none of these (the page used to need them)
            ctx.add_init_script("delete Object.hasOwn; delete Element.prototype.replaceChildren; "
                                "delete Array.prototype.at; delete String.prototype.replaceAll;")
            page = ctx.new_page()
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(auto.url)
            page.wait_for_selector(f'.pred[data-id="{preds[-1].id}"]')
            assert page.evaluate("document.documentElement.lang") == "pl"
            assert page.title() == "fedser: jak mu poszło?"
            assert page.inner_text("#accuracy") == "nie ma jeszcze odpowiedzi"
            card = page.locator(f'.pred[data-id="{preds[-1].id}"]')
            assert card.locator("button.up").inner_text().strip() == "Dobrze"
            assert card.locator("button.down").inner_text().strip() == "Źle"
            assert card.locator(".fixlabel").inner_text().strip() == "To było:"
            chips = {b.get_attribute("data-label"): b.text_content().strip()
                     for b in card.locator(".fix button").all()}
            assert chips == {lab: polish_names[lab] for lab in device.metadata.labels}
            assert card.locator(".label").text_content() == polish_names[preds[-1].label]
            assert page.evaluate("document.documentElement.scrollWidth") <= 390  # longer words: no sideways scroll
            for b in page.locator("main button").all():
                box = b.bounding_box()
                assert box["width"] >= 44 and box["height"] >= 44, (b.inner_text(), box)
            page.tap("#data summary")  # the "Your data" panel's text too
            page.wait_for_selector("#data-kept:not(:empty)")
            shown = (page.inner_text("main") + page.inner_text("header h1") + page.inner_text("#accuracy")
                     + page.inner_text("#data"))
            assert set(shown) <= LATIN | {"\n", "\t"}  # (the menu names each language in its own script)
            _save(tmp_path, page, "feedback-pl-phone.png")
            # a correction picked by its Polish name stores the model's own label
            other = next(lab for lab in device.metadata.labels if lab != preds[-1].label)
            page.tap(f'.fix button[data-id="{preds[-1].id}"][data-label="{other}"]')
            page.wait_for_selector(f'.pred[data-id="{preds[-1].id}"] .answered[data-answer="label"]')
            assert card.locator(".answered").inner_text().strip() == f"to było: {polish_names[other]}"
            assert page.inner_text("#accuracy").startswith("trafnie: 0 z 1")
            page.tap(f'button.up[data-id="{preds[0].id}"]')
            page.wait_for_selector(f'.pred[data-id="{preds[0].id}"] .answered[data-answer="up"]')
            _save(tmp_path, page, "feedback-pl-phone-answered.png")
            # switching to English: the page and, after a reload, the choice kept
            page.select_option("#lang", "en")
            page.wait_for_selector("#accuracy:has-text('right 1 of 2')")  # (the page's CSP forbids eval)
            assert card.locator("button.up").inner_text().strip() == "Right"
            page.reload()
            page.wait_for_selector(f'.pred[data-id="{preds[0].id}"] .answered')
            assert page.evaluate("document.documentElement.lang") == "en"
            assert _tofu_free(page.inner_text("main") + page.inner_text("header h1"))
            # the deployer's German, picked by the link: its markup is text, never run
            page.goto(auto.url + "?lang=de")
            page.wait_for_selector(f'.pred[data-id="{preds[1].id}"]')
            up = page.locator(f'button.up[data-id="{preds[1].id}"]')
            assert up.inner_text().strip() == "<img src=x onerror=alert(1)>Richtig"
            assert page.locator("img").count() == 0
            assert page.locator(".fix button[data-label=angry]").first.text_content().strip() == \
                "<img src=y onerror=alert(2)>Wut"
            assert page.locator("#lang option[value=de]").text_content() == "<i>Deutsch</i>"
            assert page.locator("i").count() == 0
            assert page.locator(".fix button[data-label=sad]").first.text_content().strip() == "sad"  # as it is
            # picking a language on the page wins over the link's, a reload included
            page.select_option("#lang", "pl")
            page.wait_for_selector(f'button.up[data-id="{preds[1].id}"]:has-text("Dobrze")')
            assert "lang=" not in page.url
            page.reload()
            page.wait_for_selector(f'button.up[data-id="{preds[1].id}"]:has-text("Dobrze")')
            # right to left: mirrored, no sideways scroll, the verdict buttons still side by side
            rtl = browser.new_context(locale="ar-EG", viewport={"width": 390, "height": 844}, is_mobile=True,
                                      has_touch=True, device_scale_factor=2).new_page()
            rtl.goto(auto.url)
            rtl.wait_for_selector(f'.pred[data-id="{preds[1].id}"]')
            assert rtl.evaluate("[document.documentElement.lang, document.documentElement.dir]") == ["ar", "rtl"]
            assert rtl.evaluate("document.documentElement.scrollWidth") <= 390
            up, down = (rtl.locator(f'button.{v}[data-id="{preds[1].id}"]').bounding_box() for v in ("up", "down"))
            assert up["x"] > down["x"] and abs(up["y"] - down["y"]) < 1  # "right" first in reading order: on the right
            assert rtl.locator(f'button.up[data-id="{preds[1].id}"]').inner_text().strip() == "صحيح"
            _save(tmp_path, rtl, "feedback-ar-phone.png")
            # a device set to Polish, an English browser
            en = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 800}).new_page()
            en.goto(polish.url)
            en.wait_for_selector(f'.pred[data-id="{preds[1].id}"]')
            assert en.evaluate("document.documentElement.lang") == "pl"
            assert en.locator(f'button.down[data-id="{preds[1].id}"]').inner_text().strip() == "Źle"
            _save(tmp_path, en, "feedback-pl-desktop.png")
            assert dialogs == []
            browser.close()
    finally:
        auto.stop()
        polish.stop()
    assert _answers(device) == {preds[-1].id: ("label", other), preds[0].id: ("up", preds[0].label)}


def test_the_page_and_its_catalogues_ship_in_the_package():
    """An install from the wheel (a Pi) has what the page reads: every file under edge_sdk/static and edge_sdk/data
    matches pyproject's package-data (a catalogue left out would leave a Polish user's page in English)."""
    import glob
    import tomllib

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["edge_sdk"]
    files = [str(p.relative_to(REPO)) for folder in ("static", "data") for p in (REPO / "edge_sdk" / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert any(f.endswith("i18n/pl.json") for f in files), files
    # setuptools' globs: "*" stops at a "/" (fnmatch's would not, and would pass a catalogue the wheel leaves out)
    shipped = {m for g in globs for m in glob.glob(g, root_dir=REPO / "edge_sdk")}
    for f in files:
        inside = f.removeprefix("edge_sdk/")
        assert inside in shipped, (f, globs)
