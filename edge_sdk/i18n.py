"""The feedback page's languages: message catalogues, checked before they reach a page.

The people who answer a device's predictions are often the people the model was not trained on: another language.
The page speaks theirs. Catalogues are JSON files (never code): the bundled ones in ``edge_sdk/static/i18n/`` and
a deployer's own in the folder ``[web] translations`` names (one ``<code>.json`` per language: a new language, or
a bundled one overridden). Each looks like ``en.json``::

    {"format": 1, "language": "pl", "name": "Polski", "dir": "ltr",
     "messages": {"right": "Dobrze", "accuracy": "dobrze {right} z {answered} ({percent} %)", ...},
     "labels": {"angry": "złość", ...}}

What a catalogue must be (a deployer's file is input from the device's disk): at most :data:`MAX_CATALOGUE_BYTES`
of UTF-8 JSON; ``language`` the file's name, a language tag such as ``pl`` or ``pt-BR``; ``messages`` only keys
English has, each with exactly English's ``{placeholders}`` (a missing key is shown in English); ``labels``
display names for the model's class labels (a label without one is shown as it is); every string printable, at
most :data:`MAX_TEXT` characters. The page escapes every string it shows, and the catalogues are embedded in it as
JSON with ``<``, ``>`` and ``&`` escaped, so no catalogue can inject markup or script.

Which language a page shows: the one its user picked on it (kept in the browser), else ``[web] language`` when it
is not ``auto``, else the first of the browser's languages that has a catalogue (``pl-PL`` finds ``pl``), else
English. The class labels the page posts back are the model's own, whatever the language.
"""

from __future__ import annotations

import json
import logging
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edge_sdk.errors import ParameterError

log = logging.getLogger("edge_sdk")

__all__ = ["Catalogue", "LANGUAGE_TAG", "MAX_CATALOGUE_BYTES", "MAX_LANGUAGES", "MAX_TEXT", "bundled_catalogues",
           "check_language_setting", "load_catalogue", "load_languages", "page_json"]

FORMAT = 1
MAX_CATALOGUE_BYTES = 64 * 1024
MAX_TEXT = 400  # characters of a message or a label's name
MAX_LABELS = 64
MAX_LANGUAGES = 32  # catalogues on one page (bundled and a deployer's): the page stays small
# A BCP 47 subset: a 2-3 letter language, optionally a region (pt-BR, es-419) or a script (zh-Hant)
LANGUAGE_TAG = re.compile(r"[a-z]{2,3}(-([A-Z]{2}|[0-9]{3}|[A-Z][a-z]{3}))?")
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,63}")  # a class label as models name them
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


def _placeholders(text: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:  # an unmatched brace
        raise ValueError(f"unbalanced braces ({exc})") from None


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ParameterError(f"{where} must be a string, got {type(value).__name__}")
    if not 0 < len(value) <= MAX_TEXT:
        raise ParameterError(f"{where} must be 1 to {MAX_TEXT} characters, got {len(value)}")
    if not value.isprintable():
        raise ParameterError(f"{where} holds a control character: {value[:60]!r}")
    return value


def load_catalogue(data: bytes, *, source: str, expect_language: str | None = None,
                   reference: Catalogue | None = None) -> Catalogue:
    """Check one catalogue's bytes (from ``source``, named in every error) and return it with English filling its
    missing messages. ``reference``: English (None: this is English, which must be complete)."""
    if len(data) > MAX_CATALOGUE_BYTES:
        raise ParameterError(f"{source}: {len(data)} bytes; a catalogue may have at most {MAX_CATALOGUE_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ParameterError(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise ParameterError(f"{source}: not JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise ParameterError(f"{source}: must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - {"format", "language", "name", "dir", "messages", "labels"}
    if unknown:
        raise ParameterError(f"{source}: unknown fields {sorted(unknown)[:10]}")
    if doc.get("format") != FORMAT or isinstance(doc.get("format"), bool):
        raise ParameterError(f"{source}: format must be {FORMAT}, got {doc.get('format')!r}")
    language = doc.get("language")
    if not isinstance(language, str) or not LANGUAGE_TAG.fullmatch(language):
        raise ParameterError(f"{source}: language must be a tag such as 'pl' or 'pt-BR', got {language!r:.80}")
    if expect_language is not None and language != expect_language:
        raise ParameterError(f"{source}: says language {language!r}, but its file name says {expect_language!r}")
    name = _check_text(doc.get("name"), f"{source}: name")
    if len(name) > 40:
        raise ParameterError(f"{source}: name must be at most 40 characters, got {len(name)}")
    direction = doc.get("dir", "ltr")
    if direction not in ("ltr", "rtl"):
        raise ParameterError(f"{source}: dir must be 'ltr' or 'rtl', got {direction!r:.40}")
    messages = doc.get("messages")
    if not isinstance(messages, dict):
        raise ParameterError(f"{source}: messages must be an object of strings")
    labels = doc.get("labels", {})
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise ParameterError(f"{source}: labels must be an object of at most {MAX_LABELS} names")
    for key, value in messages.items():
        where = f"{source}: messages.{key[:40]}"
        _check_text(value, where)
        try:
            have = _placeholders(value)
        except ValueError as exc:
            raise ParameterError(f"{where}: {exc}") from None
        if reference is None:
            continue
        if key not in reference.messages:
            raise ParameterError(f"{source}: unknown message {key[:40]!r} (known: {sorted(reference.messages)})")
        want = _placeholders(reference.messages[key])
        if have != want:
            raise ParameterError(f"{where} must use exactly the placeholders {sorted(want)} (as English does), "
                                 f"got {sorted(have)}")
    for key, value in labels.items():
        if not _LABEL.fullmatch(key):
            raise ParameterError(f"{source}: labels: {key[:40]!r} is not a class label")
        _check_text(value, f"{source}: labels.{key}")
    missing: tuple[str, ...] = ()
    if reference is not None:
        missing = tuple(sorted(set(reference.messages) - set(messages)))
        messages = {**reference.messages, **messages}
    return Catalogue(language, name, direction, dict(messages), dict(labels), source, missing)


def bundled_catalogues() -> dict[str, Catalogue]:
    """The catalogues shipped in ``edge_sdk/static/i18n`` (English first)."""
    folder = resources.files("edge_sdk").joinpath("static/i18n")
    english = load_catalogue(folder.joinpath(f"{_REFERENCE}.json").read_bytes(), source=f"edge_sdk/static/i18n/"
                             f"{_REFERENCE}.json", expect_language=_REFERENCE)
    found = {_REFERENCE: english}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        code = entry.name.removesuffix(".json")
        if entry.name.endswith(".json") and code != _REFERENCE:
            found[code] = load_catalogue(entry.read_bytes(), source=f"edge_sdk/static/i18n/{entry.name}",
                                         expect_language=code, reference=english)
    return found


def load_languages(translations: str | Path | None = None) -> tuple[dict[str, Catalogue], list[str]]:
    """The bundled catalogues, then each ``<code>.json`` in the folder ``translations`` (a deployer's; it may
    override a bundled language, English included). A file that fails its checks is left out and its problem
    returned (one line naming the file and what is wrong), never raised: the page works in the other languages.
    The folder itself missing or unreadable is a problem too."""
    catalogues = bundled_catalogues()
    problems: list[str] = []
    if not translations:
        return catalogues, problems
    folder = Path(translations)
    try:
        entries = sorted(p for p in folder.iterdir() if p.suffix == ".json")
    except OSError as exc:
        return catalogues, [f"{folder}: the translations folder cannot be read ({exc.strerror or exc})"]
    for path in entries:
        if len(catalogues) >= MAX_LANGUAGES and path.stem not in catalogues:
            problems.append(f"{path}: left out: a page holds at most {MAX_LANGUAGES} languages")
            continue
        try:
            if not path.is_file():
                raise ParameterError(f"{path}: not a regular file")
            with path.open("rb") as f:  # bounded: a huge or endless file costs at most this much
                data = f.read(MAX_CATALOGUE_BYTES + 1)
            reference = catalogues[_REFERENCE] if path.stem != _REFERENCE else None
            catalogue = load_catalogue(data, source=str(path), expect_language=path.stem, reference=reference)
            if reference is None:  # a deployer's English replaces the reference: it must keep every message
                english = catalogues[_REFERENCE]
                gaps = set(english.messages) - set(catalogue.messages)
                wrong = [k for k in catalogue.messages if k in english.messages
                         and _placeholders(catalogue.messages[k]) != _placeholders(english.messages[k])]
                extra = set(catalogue.messages) - set(english.messages)
                if gaps or wrong or extra:
                    raise ParameterError(f"{path}: an English override must have exactly the bundled messages "
                                         f"and placeholders (missing {sorted(gaps)[:5]}, unknown {sorted(extra)[:5]}, "
                                         f"other placeholders {wrong[:5]})")
        except ParameterError as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"{path}: cannot be read ({exc.strerror or exc})")
            continue
        catalogues[catalogue.language] = catalogue
    return catalogues, problems


def check_language_setting(value: str) -> str:
    """``[web] language``: ``auto`` or a language tag (whether a catalogue exists is checked where they load)."""
    if value != "auto" and not (isinstance(value, str) and LANGUAGE_TAG.fullmatch(value)):
        raise ParameterError(f"web.language must be 'auto' or a language tag such as 'pl' or 'pt-BR', "
                             f"got {value!r:.80}")
    return value


def page_json(catalogues: dict[str, Catalogue], default: str = "auto") -> str:
    """The page's ``I18N`` object: ``{"default": ..., "languages": {code: {...}}}``, as JSON that is safe inside a
    ``<script>`` element (``<``, ``>``, ``&`` and the line separators escaped)."""
    if default != "auto" and default not in catalogues:
        raise ParameterError(f"web.language {default!r} has no catalogue (there are: {', '.join(sorted(catalogues))}; "
                             "add <code>.json to the [web] translations folder, or use 'auto')")
    text = json.dumps({"default": default, "languages": {k: c.to_page() for k, c in catalogues.items()}},
                      ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
