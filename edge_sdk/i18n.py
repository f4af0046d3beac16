"""The languages of the feedback page and the terminal prompt: message catalogues, checked before they are used.

The people who answer a device's predictions are often the people the model was not trained on: another language.
The page and the prompt speak theirs. Catalogues are JSON files (never code): the bundled ones in
``edge_sdk/static/i18n/`` and a deployer's own in the folder ``[feedback] translations`` names (one ``<code>.json``
per language: a new language, or a bundled one reworded). Each looks like ``en.json``::

    {"format": 1, "language": "pl", "name": "Polski", "dir": "ltr",
     "messages": {"right": "Dobrze", "accuracy": "trafnie: {right} z {answered} ({percent} %)", ...},
     "labels": {"angry": "złość", ...}}

What a catalogue must be (a deployer's file is input from the device's disk): at most :data:`MAX_CATALOGUE_BYTES`
of UTF-8 JSON; ``language`` the file's name, a language tag such as ``pl`` or ``pt-BR``; ``messages`` only keys
English has, each with exactly English's ``{placeholders}`` (``{name}`` only: no format specs, no other brace);
``labels`` display names for the model's class labels (a label without one is shown as it is); every string at
most :data:`MAX_TEXT` characters, without control, unassigned or bidi-override characters (spaces such as NBSP,
joiners and direction marks are fine). A deployer's file for a bundled language rewords it: what the file leaves
out stays as bundled; a key no catalogue of that language has is shown in English. The page escapes every string
it shows, and the catalogues are embedded in it as JSON with ``<``, ``>`` and ``&`` escaped, so no catalogue can
inject markup or script.

Which language a page shows: the one named in its link (``?lang=pl``), else the one its user picked on it (kept in
the browser; picking one also drops ``lang`` from the link), else ``[feedback] language`` when it is not ``auto``, else
the first of the browser's languages that has a catalogue (``pl-PL`` finds ``pl``), else English. The class labels
the page posts back are the model's own, whatever the language.

The terminal prompt: ``[feedback] language``, else (``auto``) the locale (``$LC_ALL``, ``$LC_MESSAGES``, ``$LANG``:
``pl_PL.UTF-8`` finds ``pl``), else English; English too when the terminal's encoding cannot show the language's
letters (a locale such as ``pl_PL.ISO-8859-2`` shows Polish; ``en_US.ISO-8859-1`` would not). The keys stay ``u``,
``d``, ``1``-``9`` (a catalogue must keep English's ``[u]``, ``[d]`` hints).
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edge_sdk.errors import FedserError, ParameterError

log = logging.getLogger("edge_sdk")

__all__ = ["Catalogue", "LANGUAGE_TAG", "MAX_CATALOGUE_BYTES", "MAX_LANGUAGES", "MAX_TEXT", "best_match",
           "bundled_catalogues", "check_available", "check_language_setting", "load_catalogue", "load_languages",
           "locale_tags", "page_json", "terminal_catalogue"]

FORMAT = 1
MAX_CATALOGUE_BYTES = 64 * 1024
MAX_TEXT = 400  # characters of a message or a label's name
MAX_LABELS = 64
MAX_LANGUAGES = 32  # catalogues on one page (bundled and a deployer's): the page stays small
MAX_FILES = 2 * MAX_LANGUAGES  # *.json files of a translations folder examined at most (bad ones count too)
MAX_PROBLEMS = 10  # problems reported one by one; the rest are counted
# A BCP 47 subset: a 2-3 letter language, optionally a region (pt-BR, es-419) or a script (zh-Hant)
LANGUAGE_TAG = re.compile(r"[a-z]{2,3}(-([A-Z]{2}|[0-9]{3}|[A-Z][a-z]{3}))?")
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,63}")  # a class label as models name them
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # what the page fills (feedback.html's t())
# bidi embeddings, overrides and isolates: they reorder the text around them (the "Trojan Source" characters)
_BIDI_CONTROLS = set(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))
# soft hyphen, ZWSP (Thai, Khmer, Lao and Burmese break words with it), ZWNJ, ZWJ, LRM, RLM, WJ, the Arabic letter mark
_FORMAT_OK = {"\u00ad", "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u2060", "\u061c"}
_KEY_HINT = re.compile(r"\[([a-z0-9])\]")  # "[u]": a key the terminal reads, the same in every language
_REFERENCE = "en"


@dataclass(frozen=True)
class Catalogue:
    """One language's strings for the page (``messages`` complete: English fills what a file leaves out)."""

    language: str
    name: str
    direction: str
    messages: dict[str, str]
    labels: dict[str, str]
    source: str
    missing: tuple[str, ...] = ()  # message keys the file left out (shown in English)

    def to_page(self) -> dict:
        return {"name": self.name, "dir": self.direction, "messages": self.messages, "labels": self.labels}

    def text(self, key: str, **values) -> str:
        """The message ``key`` with its ``{placeholders}`` filled (as the page fills them)."""
        return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), self.messages[key])

    def label(self, label: str) -> str:
        """The name this language shows for the model's class ``label`` (the label itself when it has none)."""
        return self.labels.get(label, label)


def shown(text: object, limit: int = 200) -> str:
    """``text`` (a file name, a key from a file) safe to put in a log line or a terminal: at most ``limit``
    characters, every non-printable one (an escape, a newline, an undecodable byte of a file name) escaped."""
    text = str(text)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _placeholders(text: str) -> set[str]:
    """The ``{name}`` placeholders of ``text``; a brace that is not part of one is a ValueError."""
    rest = _PLACEHOLDER.sub("", text)
    if "{" in rest or "}" in rest:
        raise ValueError("a brace that is not a {name} placeholder (no format specs, no stray braces)")
    return set(_PLACEHOLDER.findall(text))


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ParameterError(f"{where} must be a string, got {type(value).__name__}")
    if not 0 < len(value) <= MAX_TEXT:
        raise ParameterError(f"{where} must be 1 to {MAX_TEXT} characters, got {len(value)}")
    ch = unshowable_char(value)
    if ch is not None:
        raise ParameterError(f"{where} holds a non-printable character U+{ord(ch):04X}: {shown(value, 60)}")
    return value


def unshowable_char(text: str, *, unassigned_ok: bool = False) -> str | None:
    """The first character of ``text`` a page should not show: a control, a lone surrogate, a private-use or (unless
    ``unassigned_ok``: an emoji newer than this Python's tables; never a noncharacter) an unassigned code point, a
    line or paragraph separator, a bidi embedding, override or isolate (they reorder the text around them), or a
    format character other than those scripts and emoji need (ZWJ, ZWNJ, ZWSP, soft hyphen, the marks, the tags of
    subdivision flags); else None."""
    for ch in text:
        kind, cp = unicodedata.category(ch), ord(ch)
        if (kind in ("Cc", "Cs", "Co", "Zl", "Zp") or ch in _BIDI_CONTROLS
                or (kind == "Cn" and (not unassigned_ok or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE))
                or (kind == "Cf" and ch not in _FORMAT_OK and not 0xE0020 <= cp <= 0xE007F)):
            return ch  # (the tag characters spell the flags of England, Scotland and Wales after U+1F3F4)
    return None


def load_catalogue(data: bytes, *, source: str, expect_language: str | None = None,
                   reference: Catalogue | None = None, base: Catalogue | None = None,
                   fallback: Catalogue | None = None) -> Catalogue:
    """Check one catalogue's bytes (from ``source``, named in every error) and return it complete.

    ``reference``: the bundled English, whose keys and placeholders every other catalogue must keep (None: this is
    the bundled English). ``base``: the catalogue of the same language the file rewords (its messages and labels
    stay where the file has none). ``fallback``: fills the messages still missing (default ``reference``)."""
    source = shown(source)
    if len(data) > MAX_CATALOGUE_BYTES:
        raise ParameterError(f"{source}: {len(data)} bytes; a catalogue may have at most {MAX_CATALOGUE_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8-sig"))  # a byte-order mark (some editors write one) is fine
    except UnicodeDecodeError as exc:
        raise ParameterError(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise ParameterError(f"{source}: not JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise ParameterError(f"{source}: must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - {"format", "language", "name", "dir", "messages", "labels"}
    if unknown:
        raise ParameterError(f"{source}: unknown fields {[shown(k, 40) for k in sorted(unknown)[:10]]}")
    if doc.get("format") != FORMAT or isinstance(doc.get("format"), bool):
        raise ParameterError(f"{source}: format must be {FORMAT}, got {doc.get('format')!r:.80}")
    language = doc.get("language")
    if not isinstance(language, str) or not LANGUAGE_TAG.fullmatch(language):
        raise ParameterError(f"{source}: language must be a tag such as 'pl' or 'pt-BR', got {language!r:.80}")
    if expect_language is not None and language != expect_language:
        raise ParameterError(f"{source}: says language {language!r}, but its file name says {expect_language!r}")
    # a file that rewords a bundled language may leave out its name, direction and messages (they stay as bundled)
    name = _check_text(doc.get("name", base.name if base else None), f"{source}: name")
    if len(name) > 40:
        raise ParameterError(f"{source}: name must be at most 40 characters, got {len(name)}")
    direction = doc.get("dir", base.direction if base else "ltr")
    if direction not in ("ltr", "rtl"):
        raise ParameterError(f"{source}: dir must be 'ltr' or 'rtl', got {direction!r:.40}")
    messages = doc.get("messages", {} if base else None)
    if not isinstance(messages, dict):
        raise ParameterError(f"{source}: messages must be an object of strings")
    labels = doc.get("labels", {})
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise ParameterError(f"{source}: labels must be an object of at most {MAX_LABELS} names")
    if reference is not None:  # the keys first: no key from the file reaches a message before it is known
        unknown = sorted(set(messages) - set(reference.messages))
        if unknown:
            raise ParameterError(f"{source}: unknown message '{shown(unknown[0], 40)}' "
                                 f"(known: {sorted(reference.messages)})")
    for key, value in messages.items():
        where = f"{source}: messages.{shown(key, 40)}"
        _check_text(value, where)
        try:
            have = _placeholders(value)
        except ValueError as exc:
            raise ParameterError(f"{where}: {exc}") from None
        if reference is not None and have != (want := _placeholders(reference.messages[key])):
            raise ParameterError(f"{where} must use exactly the placeholders {sorted(want)} (as English does), "
                                 f"got {sorted(have)}")
        if reference is not None and set(_KEY_HINT.findall(value)) != (
                keys := set(_KEY_HINT.findall(reference.messages[key]))):
            hints = ", ".join(f"[{k}]" for k in sorted(keys))
            raise ParameterError(f"{where} must name the same keys as English ({hints}): the terminal reads those "
                                 "keys in every language")
    for key, value in labels.items():
        if not _LABEL.fullmatch(key) or key == "__proto__":  # (a page's object literal would take it as its prototype)
            raise ParameterError(f"{source}: labels: '{shown(key, 40)}' is not a class label")
        _check_text(value, f"{source}: labels.{key}")
    missing: tuple[str, ...] = ()
    if base is not None:
        messages, labels = {**base.messages, **messages}, {**base.labels, **labels}
    if reference is not None:
        fill = fallback or reference
        missing = tuple(sorted(set(reference.messages) - set(messages)))
        messages = {**{k: fill.messages[k] for k in missing}, **messages}
    return Catalogue(language, name, direction, dict(messages), dict(labels), source, missing)


def bundled_catalogues() -> dict[str, Catalogue]:
    """The catalogues shipped in ``edge_sdk/static/i18n`` (English first); a damaged install is a FedserError
    that says to reinstall."""
    try:
        folder = resources.files("edge_sdk").joinpath("static/i18n")
        english = load_catalogue(folder.joinpath(f"{_REFERENCE}.json").read_bytes(), source=f"edge_sdk/static/i18n/"
                                 f"{_REFERENCE}.json", expect_language=_REFERENCE)
        found = {_REFERENCE: english}
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            code = entry.name.removesuffix(".json")
            if entry.name.endswith(".json") and code != _REFERENCE:
                found[code] = load_catalogue(entry.read_bytes(), source=f"edge_sdk/static/i18n/{entry.name}",
                                             expect_language=code, reference=english)
    except (OSError, ParameterError) as exc:
        raise FedserError(f"fedser's own catalogues are damaged or missing ({shown(exc, 300)}): reinstall fedser "
                          "(pip install --force-reinstall fedser)") from None
    return found


def load_languages(translations: str | Path | None = None) -> tuple[dict[str, Catalogue], list[str]]:
    """The bundled catalogues, then each ``<code>.json`` in the folder ``translations`` (a deployer's): a new
    language, or a bundled one reworded (English first, so that the other languages fall back to the deployer's
    English). A file that fails its checks is left out and its problem returned (one line naming the file and
    what is wrong), never raised: the page works in the other languages. At most :data:`MAX_FILES` files are
    examined and :data:`MAX_PROBLEMS` problems named. The folder missing or unreadable is a problem too."""
    catalogues = bundled_catalogues()
    english = catalogues[_REFERENCE]
    problems: list[str] = []
    if not translations:
        return catalogues, problems
    folder = Path(translations)
    try:
        entries = sorted((p for p in folder.iterdir() if p.name.endswith(".json")),
                         key=lambda p: (p.name != f"{_REFERENCE}.json", p.name))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        return catalogues, [f"{shown(folder)}: the translations folder cannot be read "
                            f"({shown(getattr(exc, 'strerror', None) or exc)})"]
    if len(entries) > MAX_FILES:
        problems.append(f"{shown(folder)}: {len(entries)} catalogues; only the first {MAX_FILES} are examined")
        entries = entries[:MAX_FILES]
    for path in entries:
        code = path.name.removesuffix(".json")
        try:
            if len(catalogues) >= MAX_LANGUAGES and code not in catalogues:
                raise ParameterError(f"{shown(path)}: left out: a page holds at most {MAX_LANGUAGES} languages")
            if not path.is_file():
                raise ParameterError(f"{shown(path)}: not a regular file")
            with path.open("rb") as f:  # bounded: a huge or endless file costs at most this much
                data = f.read(MAX_CATALOGUE_BYTES + 1)
            catalogue = load_catalogue(data, source=str(path), expect_language=code, reference=english,
                                       base=catalogues.get(code), fallback=catalogues[_REFERENCE])
        except ParameterError as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"{shown(path)}: cannot be read ({shown(exc.strerror or exc)})")
            continue
        catalogues[catalogue.language] = catalogue
    if len(problems) > MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], f"and {len(problems) - MAX_PROBLEMS} more"]
    return catalogues, problems


def check_language_setting(value: str) -> str:
    """``[feedback] language``: ``auto`` or a language tag (whether a catalogue exists is checked where they load)."""
    if value != "auto" and not (isinstance(value, str) and LANGUAGE_TAG.fullmatch(value)):
        raise ParameterError(f"feedback.language must be 'auto' or a language tag such as 'pl' or 'pt-BR', "
                             f"got {value!r:.80}")
    return value


def check_available(catalogues: dict[str, Catalogue], language: str) -> None:
    """A ``[feedback] language`` other than ``auto`` needs a catalogue: else an error naming what there is."""
    if language != "auto" and language not in catalogues:
        raise ParameterError(f"feedback.language {language!r} has no catalogue (there are: "
                             f"{', '.join(sorted(catalogues))}; add {language}.json to the [feedback] translations "
                             "folder, or use 'auto')")


def best_match(catalogues: dict[str, Catalogue], tags) -> str | None:
    """The first of ``tags`` (preferences, best first) with a catalogue: the tag itself (any case), else its
    language (``pl-PL`` finds ``pl``); None when none has one. The page's rule (feedback.html's ``known``)."""
    lower = {code.lower(): code for code in catalogues}
    for tag in tags:
        if not tag:
            continue
        tag = str(tag)
        found = lower.get(tag.lower()) or lower.get(tag.split("-")[0].lower())
        if found:
            return found
    return None


def locale_tags(environ=None) -> list[str]:
    """The process locale's language as tags, best first: the first set of ``$LC_ALL``, ``$LC_MESSAGES``,
    ``$LANG`` (POSIX's order), ``pl_PL.UTF-8@euro`` -> ``["pl-PL"]``; ``C`` and ``POSIX`` name none."""
    environ = os.environ if environ is None else environ
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = (environ.get(name) or "").strip()
        if value:
            code = value.split(".")[0].split("@")[0].replace("_", "-")
            return [] if code in ("C", "POSIX") else [code]
    return []


def terminal_catalogue(catalogues: dict[str, Catalogue], language: str = "auto", *, environ=None,
                       encoding: str | None = None) -> Catalogue:
    """The catalogue of the terminal prompt: ``language``, else (``auto``) the locale's, else English; English also
    when ``encoding`` (the terminal's) cannot encode the language's strings."""
    check_available(catalogues, language)
    code = language if language != "auto" else best_match(catalogues, locale_tags(environ)) or _REFERENCE
    chosen = catalogues[code]
    if encoding:
        try:  # what the prompt prints: its messages and the labels (the page's messages do not matter here)
            shown_there = [v for k, v in chosen.messages.items() if k.startswith("terminal_")]
            for text in (*shown_there, *chosen.labels.values()):
                text.encode(encoding)
        except (UnicodeError, LookupError):
            log.info("the terminal's encoding %s cannot show %s: the prompt is in English", encoding, chosen.name)
            return catalogues[_REFERENCE]
    return chosen


def page_json(catalogues: dict[str, Catalogue], default: str = "auto") -> str:
    """The page's ``I18N`` object: ``{"default": ..., "languages": {code: {...}}}``, as JSON that is safe inside a
    ``<script>`` element (``<``, ``>``, ``&`` and the line separators escaped)."""
    check_available(catalogues, default)
    text = json.dumps({"default": default, "languages": {k: c.to_page() for k, c in catalogues.items()}},
                      ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
