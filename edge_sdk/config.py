"""The device's configuration: a TOML file with environment-variable overrides.

Order (later wins): defaults, the TOML file (``--config``, ``$FEDSER_EDGE_CONFIG``
or ``<state>/config.toml``), then ``FEDSER_EDGE_<SECTION>_<KEY>`` variables, e.g.
``FEDSER_EDGE_AUDIO_DEVICE="USB Audio"`` or ``FEDSER_EDGE_WEB_PORT=8090``.
An unknown section or key, or a value of the wrong type, is an error that names it.

Example ``config.toml``::

    [audio]
    device = "USB"          # name substring or index; "" = the system default input
    block_seconds = 0.05
    stall_seconds = 10      # no audio this long, or the stream ended (unplugged): listen reopens the input

    [segmenter]
    threshold_db = 12.0     # speech = this far above the running noise floor
    min_seconds = 0.6
    max_seconds = 6.0
    hangover_seconds = 0.35

    [feedback]
    mode = "web"            # "terminal", "web" or "none"
    language = "auto"       # "auto" (the page: the browser's; the terminal: the locale), or "pl", "en", ...
    translations = ""       # a folder of <language>.json catalogues of yours, e.g. /etc/fedser/i18n (format: en.json)

    [web]
    host = "127.0.0.1"
    port = 8090
    allow_wipe = true       # the page's "Your data" panel may delete what the device learned from its user
    allow_export = true     # ... and download a copy of everything the device keeps about them (JSON)

    [privacy]
    store_audio = false     # keep raw audio of predictions (opt-in)
    max_predictions = 5000  # retention: oldest removed beyond this (0: no limit)
    max_age_days = 90
    clip_norm = 0.0         # differential privacy of posted deltas
    noise_multiplier = 0.0

    [training]
    min_new_feedback = 8
    epochs = 10
    # learning_rate = 0.05  # SGD rate; unset: the model's device_learning_rate, else 0.05
    # input_affine_from = 20  # personal input affine from this many answers (0: never); unset: the model's
    idle_seconds = 30       # train only after this long without speech
    # threads = 2           # interpreter threads of a personalisation (unset: threads); a Pi 4 has 4 cores

    [sync]
    interval_seconds = 3600
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edge_sdk.errors import FedserError, ParameterError

__all__ = ["EdgeConfig", "load_config"]


@dataclass
class AudioConfig:
    device: str = ""
    sample_rate: int = 16000
    block_seconds: float = 0.05
    queue_blocks: int = 400  # about 20 s of audio may wait for the worker before blocks are dropped
    stall_seconds: float = 10.0  # no block from the input this long (or its stream ended): reopen it


@dataclass
class SegmenterConfig:
    threshold_db: float = 12.0
    min_seconds: float = 0.6
    max_seconds: float = 6.0
    hangover_seconds: float = 0.35
    pre_roll_seconds: float = 0.2
    floor_db: float = -70.0  # energies below this are silence whatever the noise floor


@dataclass
class FeedbackConfig:
    mode: str = "terminal"
    # The language of the terminal prompt and the page: "auto" (the page: the first of the browser's languages with
    # a catalogue; the terminal: the locale, $LC_ALL, $LC_MESSAGES or $LANG; else English) or a language tag with a
    # catalogue (bundled: en, pl); the page's user can switch on it (edge_sdk/i18n.py).
    language: str = "auto"
    # A folder of <language>.json catalogues (the format of edge_sdk/static/i18n/en.json): languages of your own,
    # or bundled ones reworded. An absolute path the service can read (not under /home: the unit has ProtectHome).
    # A file that fails its checks is left out (logged; doctor names it).
    translations: str = ""


@dataclass
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8090
    # Extra host names (comma-separated) the page answers to besides its defaults (loopback; beyond loopback
    # the device's hostname, hostname.local and the address a client reached): e.g. a name your router gives it.
    allowed_hosts: str = ""
    # The page's "Your data" panel offers its user to delete everything the device learned from them (what
    # fedser-edge wipe-data does, done by the running listen). false: the panel only shows what is kept and shared
    # (a shared kiosk whose keeper alone decides).
    allow_wipe: bool = True
    # The panel offers its user a copy of everything the device keeps about them (what fedser-edge export-data
    # writes; their recordings too when [privacy] store_audio is on). false: a kiosk whose keeper hands copies out.
    allow_export: bool = True


@dataclass
class PrivacyConfig:
    store_audio: bool = False
    max_predictions: int = 5000
    max_age_days: float = 90.0
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0


@dataclass
class TrainingConfig:
    min_new_feedback: int = 8
    epochs: int = 10
    learning_rate: float | None = None  # None: the model's metadata device_learning_rate, else 0.05
    input_affine_from: int | None = None  # None: the model's metadata input_affine_from, else off
    idle_seconds: float = 30.0
    threads: int | None = None  # interpreter threads of personalisations (None: the top-level threads)


@dataclass
class SyncConfig:
    interval_seconds: float = 3600.0


@dataclass
class EdgeConfig:
    runtime: str = "auto"
    threads: int = 1
    audio: AudioConfig = field(default_factory=AudioConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    web: WebConfig = field(default_factory=WebConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> EdgeConfig:
        if self.feedback.mode not in ("terminal", "web", "none"):
            raise ParameterError(f"feedback.mode must be terminal, web or none, got {self.feedback.mode!r}")
        if self.runtime not in ("auto", "ai_edge_litert", "tflite_runtime"):
            raise ParameterError(f"runtime must be auto, ai_edge_litert or tflite_runtime, got {self.runtime!r}")
        s = self.segmenter
        if not 0 < s.min_seconds < s.max_seconds:
            raise ParameterError(f"segmenter needs 0 < min_seconds < max_seconds, got {s.min_seconds}, {s.max_seconds}")
        from edge_sdk.model import MAX_INPUT_AFFINE_FROM, check_threads  # here: doctor reads a broken install

        for name, value in (("threads", self.threads), ("training.threads", self.training.threads)):
            check_threads(name, value)

        value = self.training.input_affine_from
        if value is not None and not 0 <= value <= MAX_INPUT_AFFINE_FROM:
            raise ParameterError(f"training.input_affine_from must be unset or an integer in "
                                 f"0..{MAX_INPUT_AFFINE_FROM}, got {value}")
        from edge_sdk.i18n import check_language_setting

        check_language_setting(self.feedback.language)
        folder = self.feedback.translations
        # a NUL or a newline is a mistake, not a folder; a relative path would depend on where listen starts (/ under
        # systemd)
        if folder and not (folder.isprintable() and os.path.isabs(folder)):
            raise ParameterError(f"feedback.translations must be a folder's absolute path (e.g. /etc/fedser/i18n), "
                                 f"got {folder!r:.200}")
        for name, (low, high) in _RANGES.items():
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if not low <= value <= high:  # NaN fails too
                raise ParameterError(f"{name} must be {low:g} to {high:g}, got {value}")
        if self.training.learning_rate is not None:
            from edge_sdk.model import check_device_learning_rate

            try:
                check_device_learning_rate(self.training.learning_rate)
            except FedserError:
                raise ParameterError(f"training.learning_rate must be unset or a number in (0, 1], got "
                                     f"{self.training.learning_rate}") from None
        return self


# Every other number a deployer sets, with the range it must lie in (0 where 0 means "no limit").
_RANGES = {
    "audio.sample_rate": (8000, 192000), "audio.block_seconds": (0.001, 1.0), "audio.queue_blocks": (1, 100000),
    "audio.stall_seconds": (1.0, 3600.0),
    "segmenter.threshold_db": (0.0, 100.0), "segmenter.min_seconds": (0.01, 30.0),
    "segmenter.max_seconds": (0.02, 30.0), "segmenter.hangover_seconds": (0.0, 10.0),
    "segmenter.pre_roll_seconds": (0.0, 10.0), "segmenter.floor_db": (-300.0, 0.0),
    "web.port": (0, 65535),
    "privacy.max_predictions": (0, 100_000_000), "privacy.max_age_days": (0.0, 36500.0),
    "privacy.clip_norm": (0.0, 1e6), "privacy.noise_multiplier": (0.0, 100.0),
    "training.min_new_feedback": (1, 100000), "training.epochs": (1, 1000), "training.idle_seconds": (0.0, 86400.0),
    "sync.interval_seconds": (1.0, 10 * 365 * 86400.0),  # ten years: in effect, never
}


def _coerce(value, target_type, where: str):
    if target_type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
    elif target_type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif target_type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif target_type is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    raise ParameterError(f"{where} must be {target_type.__name__}, got {value!r}")


def _apply(cfg: EdgeConfig, data: dict, origin: str) -> None:
    sections = {f.name: f for f in fields(cfg)}
    for key, value in data.items():
        if key not in sections:
            raise ParameterError(f"{origin}: unknown setting {key!r} (known: {sorted(sections)})")
        current = getattr(cfg, key)
        if hasattr(current, "__dataclass_fields__"):
            if not isinstance(value, dict):
                raise ParameterError(f"{origin}: [{key}] must be a table")
            known = {f.name: f for f in fields(current)}
            for sub, v in value.items():
                if sub not in known:
                    raise ParameterError(f"{origin}: unknown setting {key}.{sub} (known: {sorted(known)})")
                default = getattr(current, sub)
                if default is None:  # None defaults: the annotation's type (learning_rate float, input_affine_from int)
                    target = int if str(known[sub].type).startswith("int") else float
                else:
                    target = type(default)
                setattr(current, sub, _coerce(v, target, f"{origin}: {key}.{sub}"))
        else:
            setattr(cfg, key, _coerce(value, type(current), f"{origin}: {key}"))


def load_config(path: str | os.PathLike | None = None, *, state_dir: str | os.PathLike | None = None,
                environ: dict | None = None) -> EdgeConfig:
    """Defaults, then the TOML file (if any), then ``FEDSER_EDGE_*`` environment variables."""
    environ = os.environ if environ is None else environ
    cfg = EdgeConfig()
    candidate = path or environ.get("FEDSER_EDGE_CONFIG") or (Path(state_dir) / "config.toml" if state_dir else None)
    if candidate is not None:
        candidate = Path(candidate)
        if candidate.exists():
            try:
                data = tomllib.loads(candidate.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise ParameterError(f"{candidate}: not valid TOML: {exc}") from exc
            except UnicodeDecodeError as exc:
                raise ParameterError(f"{candidate}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
            except OSError as exc:
                raise ParameterError(f"{candidate}: cannot be read ({exc.strerror or exc})") from exc
            _apply(cfg, data, str(candidate))
        elif path is not None or environ.get("FEDSER_EDGE_CONFIG"):
            raise ParameterError(f"config file not found: {candidate}")
    prefix = "FEDSER_EDGE_"
    for name, value in environ.items():
        if not name.startswith(prefix) or name == "FEDSER_EDGE_CONFIG":
            continue
        parts = name[len(prefix):].lower().split("_", 1)
        section = parts[0]
        if hasattr(getattr(cfg, section, None), "__dataclass_fields__") and len(parts) == 2:
            _apply(cfg, {section: {parts[1]: value}}, f"${name}")
        else:
            _apply(cfg, {name[len(prefix):].lower(): value}, f"${name}")
    return cfg.validate()
