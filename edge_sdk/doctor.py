"""``fedser-edge doctor``: what an embedded developer gets wrong, checked, each with how to fix it.

    fedser-edge [--state DIR] [--config FILE] doctor [--json] [--no-audio] [--timeout S] [--max-skew S]

Checks, in order: the configuration; the TFLite runtime and its version; the model the device would run
(loaded in that runtime); PortAudio; the input devices and whether the configured one opens at the sample
rate ``listen`` opens it at (and whether the model's rate would open); the state folder's owner and
permissions, and the free space on its disk; the languages of the feedback page and prompt (the bundled
catalogues and those in ``[feedback] translations``, and a catalogue for ``[feedback] language``); then, for an
enrolled device, the aggregator reachable, the clock against the server's ``Date`` header, and the current
manifest fetched with a signed request and verified with the pinned server key (and the local copy against
it). Nothing is written to the state folder.

Each check is ``ok``, ``warn``, ``fail`` or ``skip``, with a one-line detail and, unless ok, a ``fix``.
Exit status: 0 when nothing failed, 1 when a check failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import os
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Check", "run_checks", "add_parser", "main"]

# The oldest runtime versions the exported models are tested with (constraints.txt, scripts/setup.sh).
MIN_VERSIONS = {"ai_edge_litert": (2, 0), "tflite_runtime": (2, 14)}
DISTRIBUTIONS = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}


DISK_FAIL_BYTES = 5_000_000  # below this the state folder's file system fails the check (a model is ~2 MB)
DISK_WARN_BYTES = 50_000_000

@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


class _Doctor:
    def __init__(self, state: Path, config: str | None, *, audio: bool, timeout: float, max_skew: float,
                 runtime: str | None) -> None:
        self.state, self.config_path, self.audio, self.timeout = state, config, audio, timeout
        self.max_skew, self.runtime_choice = max_skew, runtime
        self.checks: list[Check] = []
        self.cfg = None
        self.metadata = None
        self.identity: dict = {}
        self.server_date: float | None = None

    def add(self, name: str, status: str, detail: str, fix: str = "") -> Check:
        check = Check(name, status, detail, fix if status != "ok" else "")
        self.checks.append(check)
        return check

    # -- configuration, runtime, model ------------------------------------------------------------------
    def config(self) -> None:
        from edge_sdk.config import EdgeConfig, load_config
        from edge_sdk.errors import FedserError

        where = self.config_path or os.environ.get("FEDSER_EDGE_CONFIG") or str(self.state / "config.toml")
        try:
            self.cfg = load_config(self.config_path, state_dir=self.state)
            self.add("config", "ok", f"{where}" + ("" if Path(where).exists() else " (absent: defaults)"))
        except FedserError as exc:
            self.cfg = EdgeConfig()
            self.add("config", "fail", str(exc), "fix the file it names (edge_sdk/config.py lists every key), or "
                     "point --config / FEDSER_EDGE_CONFIG at the right one; the checks below use the defaults")
        if self.runtime_choice:
            self.cfg.runtime = self.runtime_choice

    def runtime(self) -> None:
        from importlib.metadata import PackageNotFoundError, version

        from edge_sdk.errors import RuntimeUnavailableError
        from edge_sdk.model import load_interpreter_class

        try:
            cls = load_interpreter_class(self.cfg.runtime)
        except RuntimeUnavailableError as exc:
            self.add("runtime", "fail", str(exc), "pip install 'fedser[edge]' in the venv the service runs "
                     "(ai-edge-litert; or tflite-runtime==2.14 with numpy<2 on Python 3.11)")
            return
        module = cls.__module__.split(".")[0]
        try:
            ver = version(DISTRIBUTIONS[module])
        except PackageNotFoundError:
            ver = "unknown"
        minimum = MIN_VERSIONS[module]
        detail = f"{module} {ver} (Python {sys.version.split()[0]}, {os.uname().machine})"
        if ver != "unknown" and _version_tuple(ver) < minimum:
            self.add("runtime", "fail", f"{detail}: older than the {'.'.join(map(str, minimum))} the models "
                     "are tested with", f"pip install -U '{DISTRIBUTIONS[module]}>={'.'.join(map(str, minimum))}'")
        else:
            self.add("runtime", "ok", detail)

    def model(self) -> None:
        from edge_sdk.manifest import SignedManifest
        from edge_sdk.model import ModelMetadata, TFLiteModel, bundled_model_paths
        from edge_sdk.signing import VerifyKey

        identity_file = self.state / "identity.json"
        try:
            self.identity = json.loads(identity_file.read_text()) if identity_file.exists() else {}
            if not isinstance(self.identity, dict):
                self.identity = {}
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            self.add("model", "fail", f"{identity_file} is unreadable: {exc}",
                     f"restore it from a backup, or remove {self.state} and enroll again")
            return
        manifest_file = self.state / "manifest.json"
        try:
            if manifest_file.exists():
                key = VerifyKey.from_b64(self.identity["server_public_key"])
                manifest = SignedManifest.from_bytes(manifest_file.read_bytes(), key.verify).manifest
                tflite = self.state / "models" / f"{manifest.base.sha256}.tflite"
                for ref, suffix in ((manifest.base, ".tflite"), (manifest.head, ".head")):
                    path = self.state / "models" / f"{ref.sha256}{suffix}"
                    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != ref.sha256:
                        self.add("model", "fail", f"{path} is missing or does not match the manifest's sha256",
                                 "run `fedser-edge sync` to download the model again")
                        return
                metadata, source = manifest.metadata, f"version {manifest.version} from the aggregator"
            else:
                paths = bundled_model_paths()
                if paths is None:
                    self.add("model", "fail", "no model: not enrolled and no bundled model in the package",
                             "reinstall fedser (the wheel carries edge_sdk/data/default_model.*) or enroll")
                    return
                tflite, metadata, source = paths[0], ModelMetadata.load(paths[1]), "the bundled default model"
            model = TFLiteModel(tflite, metadata, runtime=self.cfg.runtime)
        except Exception as exc:  # any failure to load is the finding
            self.add("model", "fail", f"the model does not load: {type(exc).__name__}: {exc}",
                     "run `fedser-edge sync` (a model that does not verify or load is not used); if it persists, "
                     "reinstall fedser and its runtime")
            return
        self.metadata = metadata
        self.add("model", "ok", f"{source}: {len(metadata.labels)} classes {', '.join(metadata.labels)}, "
                 f"{metadata.features.sample_rate} Hz, loads in {model.runtime}")

    # -- audio ------------------------------------------------------------------------------------------
    def portaudio(self):
        from edge_sdk.errors import RuntimeUnavailableError
        from edge_sdk.listen import import_sounddevice

        try:
            sd = import_sounddevice()
        except RuntimeUnavailableError as exc:
            fix = ("sudo apt install libportaudio2" if "PortAudio" in str(exc)
                   else "pip install 'fedser[audio]' (sounddevice) in the venv the service runs")
            self.add("portaudio", "fail", str(exc), fix)
            return None
        self.add("portaudio", "ok", f"{sd.get_portaudio_version()[1]} (sounddevice {sd.__version__})")
        return sd

    def input_devices(self, sd) -> None:
        from edge_sdk.errors import AudioError
        from edge_sdk.listen import list_input_devices, resolve_input_device

        try:
            inputs = list_input_devices()
        except Exception as exc:
            self.add("input devices", "fail", f"PortAudio cannot list devices: {exc}",
                     "check that the user is in group audio (`id`; sudo usermod -aG audio USER) and `arecord -l`")
            return
        if not inputs:
            self.add("input devices", "fail", "no audio input device",
                     "plug in a USB microphone; `arecord -l` must list it; the service's user must be in group "
                     "audio (sudo usermod -aG audio fedser)")
            return
        self.add("input devices", "ok", "; ".join(f"{d['index']}: {d['name']} ({d['channels']} ch, "
                                                  f"{d['default_samplerate']:.0f} Hz)" for d in inputs))
        spec, rate = self.cfg.audio.device, int(self.cfg.audio.sample_rate)
        model_rate = int(self.metadata.features.sample_rate) if self.metadata else 16000
        name = f"input {spec!r}" if spec else "the default input"
        try:
            index = resolve_input_device(spec)
        except AudioError as exc:
            self.add("microphone", "fail", str(exc), "set [audio] device in the config (or FEDSER_EDGE_AUDIO_DEVICE) "
                     "to a name substring or index that `fedser-edge devices` lists")
            return

        def opens(r: int) -> str | None:
            try:
                with sd.InputStream(samplerate=r, channels=1, dtype="float32", device=index) as stream:
                    stream.read(int(r * 0.1))
                return None
            except Exception as exc:
                return str(exc).strip() or type(exc).__name__

        error = opens(rate)
        if error is None:
            extra = "" if rate == model_rate else f"; listen resamples to the model's {model_rate} Hz"
            self.add("microphone", "ok", f"{name} opens at {rate} Hz{extra}")
            return
        alternatives = [r for r in dict.fromkeys([model_rate, 48000, 44100, 16000]) if r != rate and opens(r) is None]
        fix = (f"set [audio] sample_rate = {alternatives[0]} (it opens at that rate; listen resamples to "
               f"{model_rate} Hz)" if alternatives else
               "check the device with `arecord -D plughw:CARD,0 -r 16000 -f S16_LE -d 2 /tmp/t.wav`; another "
               "program may hold it")
        self.add("microphone", "fail", f"{name} does not open at {rate} Hz: {error}", fix)

    # -- state folder -----------------------------------------------------------------------------------
    def state_folder(self) -> None:
        state = self.state
        if not state.exists():
            parent = next((p for p in state.parents if p.exists()), Path("/"))
            if os.access(parent, os.W_OK | os.X_OK):
                self.add("state folder", "warn", f"{state} does not exist yet (created on first use)",
                         f"install -d -m 700 {state} as the user the service runs as (the systemd unit's "
                         "StateDirectory= does this)")
            else:
                self.add("state folder", "fail", f"{state} does not exist and {parent} is not writable by "
                         f"uid {os.getuid()}", f"sudo install -d -m 700 -o $(id -un) {state} (or run as the "
                         "service's user; the systemd unit's StateDirectory= creates it)")
            return
        st = state.stat()
        problems, fixes = [], []
        if st.st_uid != os.getuid():
            problems.append(f"owned by uid {st.st_uid}, not this user (uid {os.getuid()})")
            fixes.append(f"run as its owner (sudo -u fedser ...) or sudo chown -R $(id -un) {state}")
        if not os.access(state, os.R_OK | os.W_OK | os.X_OK):
            problems.append("not readable and writable by this user")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            problems.append(f"mode {mode:04o} lets others write in it (it holds the device's private key)")
            fixes.append(f"chmod 700 {state}")
        for secret in ("device.key", "identity.json"):
            path = state / secret
            if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
                problems.append(f"{secret} has mode {stat.S_IMODE(path.stat().st_mode):04o}")
                fixes.append(f"chmod 600 {path}")
            if path.exists() and not os.access(path, os.R_OK):
                problems.append(f"{secret} is not readable by this user")
        from edge_sdk.storage import LOCK_FILE, StateLock

        lock = state / LOCK_FILE
        if lock.exists() and not os.access(lock, os.R_OK | os.W_OK):  # made by another user (sudo fedser-edge ...)
            problems.append(f"{LOCK_FILE} is not writable by this user: listen, train and sync cannot start")
            fixes.append(f"sudo chown $(id -un) {lock}")
        holder = StateLock(state).busy()
        in_use = ""
        if holder is not None:
            in_use = (f"; in use by {holder['command']} (pid {holder['pid']})" if holder
                      else "; in use by another process")
        if problems:
            self.add("state folder", "fail", f"{state}: " + "; ".join(problems) + in_use,
                     "; ".join(dict.fromkeys(fixes)) or f"sudo chown -R $(id -un) {state} && chmod 700 {state}")
        elif mode & 0o077:
            self.add("state folder", "warn", f"{state}: mode {mode:04o}: other users can list it and read what is not "
                     f"private by mode (the feedback store holds the user's answers){in_use}", f"chmod 700 {state}")
        else:
            self.add("state folder", "ok", f"{state} (mode {mode:04o}, owned by this user{in_use})")

    def disk_space(self) -> None:
        """Room on the state folder's file system: the store grows with every prediction (no audio unless opted
        in), personal files and models are rewritten whole. A full disk stops fedser storing answers."""
        where = self.state if self.state.exists() else next((p for p in self.state.parents if p.exists()), Path("/"))
        from edge_sdk.storage import free_bytes

        free = free_bytes(where)
        if free is None:
            self.add("disk space", "warn", f"cannot read the free space of {where}")
            return
        detail = f"{free / 1e6:.0f} MB free on the file system of {where}"
        fix = ("free space there (old logs: journalctl --vacuum-size=50M; apt-get clean), or lower [privacy] "
               "max_predictions")
        if free < DISK_FAIL_BYTES:
            self.add("disk space", "fail", detail + ": new predictions and answers cannot be stored", fix)
        elif free < DISK_WARN_BYTES:
            self.add("disk space", "warn", detail + ": nearly full", fix)
        else:
            self.add("disk space", "ok", detail)

    def feedback_languages(self) -> None:
        """The catalogues of the feedback page and prompt (edge_sdk/i18n.py): the bundled ones and the [feedback]
        translations folder's, each checked as ``listen`` checks it; ``[feedback] language`` must have one."""
        from edge_sdk.errors import FedserError
        from edge_sdk.i18n import load_languages

        try:
            catalogues, problems = load_languages(self.cfg.feedback.translations)
        except FedserError as exc:  # the bundled ones damaged: a broken install
            self.add("feedback languages", "fail", str(exc), "pip install --force-reinstall fedser in the venv the "
                     "service runs")
            return
        names = ", ".join(sorted(catalogues))
        wanted = self.cfg.feedback.language
        fix = ("fix the files named (the format of edge_sdk/static/i18n/en.json; `fedser-edge doctor` checks them "
               "again), or remove them")
        if wanted != "auto" and wanted not in catalogues:
            used = self.cfg.feedback.mode in ("web", "terminal")  # the page and the prompt read them
            self.add("feedback languages", "fail" if used else "warn",
                     f"feedback.language {wanted!r} has no catalogue (there are: {names})"
                     + ("; left out: " + "; ".join(problems) if problems else ""),
                     "add <language>.json to the [feedback] translations folder, or set feedback.language = \"auto\""
                     + ("; listen refuses to start until then" if used else
                        "; listen --feedback web or terminal would refuse to start"))
            return
        starts = ("the page starts in the browser's language, the prompt in the locale's" if wanted == "auto"
                  else f"the page and the prompt start in {wanted}")
        partial = [f"{c.language} shows {len(c.missing)} messages in English ({', '.join(c.missing[:3])}"
                   + (", ..." if len(c.missing) > 3 else "") + ")" for c in catalogues.values() if c.missing]
        detail = f"{names}; {starts}" + ("; " + "; ".join(partial) if partial else "")
        if problems:
            self.add("feedback languages", "warn", detail + "; left out: " + "; ".join(problems), fix)
        else:
            self.add("feedback languages", "ok", detail)

    # -- server -----------------------------------------------------------------------------------------
    def server(self) -> None:
        import requests

        url = self.identity.get("server_url")
        if not url:
            for name in ("server", "clock", "key and manifest"):
                self.add(name, "skip", "not enrolled", "fedser-edge enroll --server URL --token TOKEN "
                         "(a token from the aggregator's admin: fedser-aggregator create-token)")
            return
        try:
            started = time.time()
            resp = requests.get(f"{url}/healthz", timeout=self.timeout)
            elapsed = time.time() - started
        except requests.RequestException as exc:
            self.add("server", "fail", f"{url} is unreachable: {type(exc).__name__}: {exc}",
                     "is the aggregator up (systemctl status fedser-aggregator) and this address right? Check "
                     f"the network and firewall (curl {url}/healthz); a moved server: enroll again")
            self.add("clock", "skip", "no answer from the server to compare with")
            self.add("key and manifest", "skip", "no answer from the server")
            return
        if resp.status_code != 200:
            self.add("server", "fail", f"{url}/healthz answered HTTP {resp.status_code}: {resp.text[:200]}",
                     "see the aggregator's log (journalctl -u fedser-aggregator)")
        else:
            self.add("server", "ok", f"{url} answers ({elapsed * 1000:.0f} ms)")
        date = resp.headers.get("Date")
        if not date:
            self.add("clock", "skip", "the server sent no Date header")
        else:
            try:
                server_time = email.utils.parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                server_time = None
        if date and server_time is None:
            self.add("clock", "warn", f"the server's Date header is not a date: {date[:100]!r}",
                     "the clock could not be compared; see what answers at this address (curl -i "
                     f"{url}/healthz)")
        elif date:
            skew = (started + elapsed / 2) - server_time  # Date has 1 s resolution
            detail = f"this clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the server's"
            fix = ("turn on time sync: sudo timedatectl set-ntp true (systemd-timesyncd; a Raspberry Pi has no "
                   "battery clock, so it needs the network time after every boot)")
            if abs(skew) > self.max_skew:
                self.add("clock", "fail", f"{detail}; signed requests are refused beyond the server's limit "
                         f"(REQUEST_MAX_SKEW, 300 s by default)", fix)
            elif abs(skew) > 5:
                self.add("clock", "warn", detail, fix)
            else:
                self.add("clock", "ok", f"within {max(abs(skew), 1):.0f} s of the server's")
        self.manifest(url)

    def manifest(self, url: str) -> None:
        from edge_sdk.client import ServerClient
        from edge_sdk.errors import FedserError, ServerError, SignatureError
        from edge_sdk.manifest import SignedManifest
        from edge_sdk.signing import SigningKey, VerifyKey

        name = "key and manifest"
        try:
            pinned = VerifyKey.from_b64(self.identity["server_public_key"])
            key = SigningKey.load(self.state / "device.key")
        except (KeyError, OSError, FedserError, ValueError) as exc:
            self.add(name, "fail", f"the pinned key or the device key is unreadable: {exc}",
                     f"restore {self.state} from a backup, or remove it and enroll again")
            return
        client = ServerClient(url, timeout=self.timeout, device_id=self.identity.get("device_id"), sign=key.sign)
        try:
            body, _ = client.get_manifest()
        except ServerError as exc:
            if exc.status == 404 and exc.reason == "no_model":
                self.add(name, "warn", "the server has published no model yet", "the admin publishes one: "
                         "fedser-aggregator publish-base model.tflite model.json")
                return
            fixes = {"clock_skew": "set the clock (see the clock check)",
                     "unknown_device": "this device is not known to the server (revoked, or another server at "
                                       "this address): enroll again with a new token",
                     "revoked_device": "the admin revoked this device: enroll again with a new token",
                     "bad_signature": "the server does not accept this device's key (a state folder copied "
                                      "from another device?): enroll again with a new token"}
            self.add(name, "fail", str(exc), fixes.get(exc.reason, "see the aggregator's log; enroll again if the "
                                                                   "server does not know this device"))
            return
        if body is None:
            self.add(name, "warn", "the server has published no model yet", "the admin publishes one: "
                     "fedser-aggregator publish-base model.tflite model.json")
            return
        try:
            manifest = SignedManifest.from_bytes(body, pinned.verify).manifest
        except SignatureError:
            self.add(name, "fail", "the server's manifest does not verify with the key pinned at enrollment: "
                     "another server answers at this address, or its key was replaced",
                     "if the aggregator was reinstalled on purpose, remove the state folder and enroll again; "
                     "otherwise do not: something sits between this device and its server")
            return
        except FedserError as exc:
            self.add(name, "fail", f"the server sent no valid manifest: {exc}", "see the aggregator's log")
            return
        local = ""
        if (self.state / "manifest.json").exists():
            try:
                mine = SignedManifest.from_bytes((self.state / "manifest.json").read_bytes(), pinned.verify).manifest
                local = f"; this device runs version {mine.version}"
                if mine.version < manifest.version:
                    local += " (fedser-edge sync installs the new one)"
                elif mine.version > manifest.version:
                    local += (", newer than the server's: sync keeps it and refuses the older manifest (was the "
                              "aggregator restored from an older backup?)")
            except FedserError as exc:
                self.add(name, "fail", f"the local manifest does not verify: {exc}", "run `fedser-edge sync`")
                return
        self.add(name, "ok", f"manifest version {manifest.version} verified with the pinned key{local}")

    def run(self) -> list[Check]:
        self.config()
        self.runtime()
        self.model()
        if self.audio:
            sd = self.portaudio()
            if sd is not None:
                self.input_devices(sd)
        self.state_folder()
        self.disk_space()
        self.feedback_languages()
        self.server()
        return self.checks


def run_checks(state: str | os.PathLike, config: str | None = None, *, audio: bool = True, timeout: float = 5.0,
               max_skew: float = 60.0, runtime: str | None = None) -> list[Check]:
    """Every check, in order (see the module's docstring)."""
    return _Doctor(Path(state), config, audio=audio, timeout=timeout, max_skew=max_skew, runtime=runtime).run()


def add_parser(sub) -> None:
    """Register ``doctor`` on ``fedser-edge``'s subcommands."""
    p = sub.add_parser("doctor", help="check the runtime, audio, state folder, server, key and clock; says how to "
                                      "fix what is wrong")
    p.add_argument("--json", action="store_true", help="one JSON object per check")
    p.add_argument("--no-audio", action="store_true", help="skip PortAudio and the microphone")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per request to the server")
    p.add_argument("--max-skew", type=float, default=60.0, help="clock difference to the server that fails")


def main(args: argparse.Namespace) -> int:
    """``fedser-edge doctor``: print each check; 1 when one failed."""
    checks = run_checks(args.state, args.config, audio=not args.no_audio, timeout=args.timeout,
                        max_skew=args.max_skew, runtime=getattr(args, "runtime", None))
    for c in checks:
        if args.json:
            print(json.dumps(asdict(c)), flush=True)
        else:
            print(f"{c.status.upper():5} {c.name:17} {c.detail}")
            if c.fix:
                print(f"{'':5} {'':17} fix: {c.fix}")
    failed = [c.name for c in checks if c.status == "fail"]
    if not args.json:
        print(f"{len(failed)} problem(s): {', '.join(failed)}" if failed else "no problems found")
    return 1 if failed else 0
