"""Listening: microphone (sounddevice/PortAudio) -> queue -> utterance segmentation -> classification.

The audio callback only copies each block into a bounded queue; segmentation
and inference run in a worker thread, so the model never holds up the audio
stream. A block that finds the queue full is dropped and counted; an input
overflow reported by PortAudio is counted; :meth:`Listener.stats` reports both,
never silently.

Segmentation is energy based: 20 ms frames whose level is ``threshold_db``
above a running noise floor (and above ``floor_db``) are speech; an utterance
ends after ``hangover_seconds`` of non-speech, is cut at ``max_seconds``, is
dropped (and counted) when shorter than ``min_seconds``, and starts with
``pre_roll_seconds`` of the audio before the onset.

The stream runs at ``audio.sample_rate`` (what the microphone offers, 8 to 192 kHz); each
utterance is resampled to the model's rate before it is classified, so a 48 kHz USB
microphone and a 16 kHz model agree.

An input that stops (a USB microphone pulled out, the sound server restarted: PortAudio ends the
stream, or no block arrives for ``audio.stall_seconds``) is reopened, found again by its configured
name, every 1, 2, 4 ... 30 s until it is back, by a keeper thread of its own (a hung sound server
blocks whoever touches its stream); :meth:`Listener.watch` hands the listen loop its reports of the
loss and the return, and ``stats`` counts them.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from edge_sdk.audio import check_sample_rate, resample
from edge_sdk.config import EdgeConfig, SegmenterConfig
from edge_sdk.errors import AudioError, FedserError, ParameterError, RuntimeUnavailableError

log = logging.getLogger("edge_sdk")

__all__ = ["Segmenter", "Listener", "list_input_devices", "resolve_input_device", "import_sounddevice"]

FRAME_SECONDS = 0.02


class Segmenter:
    """Cuts a stream of audio blocks into utterances (see the module docstring)."""

    def __init__(self, cfg: SegmenterConfig, sample_rate: int) -> None:
        self.cfg, self.sr = cfg, sample_rate
        self.frame = max(1, int(round(FRAME_SECONDS * sample_rate)))
        self._pending = np.zeros(0, np.float32)
        self._pre = collections.deque(maxlen=max(1, int(round(cfg.pre_roll_seconds / FRAME_SECONDS))))
        self._utt: list[np.ndarray] = []
        self._silent_frames = 0
        self._noise_db: float | None = None
        self.too_short = 0
        self.utterances = 0

    @property
    def in_speech(self) -> bool:
        return bool(self._utt)

    def _level_db(self, frame: np.ndarray) -> float:
        return float(10 * np.log10(np.mean(frame.astype(np.float64) ** 2) + 1e-12))

    def feed(self, block: np.ndarray) -> list[np.ndarray]:
        """Add samples; returns the utterances completed by them."""
        out = []
        data = np.concatenate([self._pending, np.asarray(block, np.float32).reshape(-1)])
        n = len(data) // self.frame
        self._pending = data[n * self.frame:]
        hang = max(1, int(round(self.cfg.hangover_seconds / FRAME_SECONDS)))
        max_frames = int(round(self.cfg.max_seconds / FRAME_SECONDS))
        for i in range(n):
            frame = data[i * self.frame:(i + 1) * self.frame]
            level = self._level_db(frame)
            if self._noise_db is None:
                self._noise_db = level
            speech = level > max(self._noise_db + self.cfg.threshold_db, self.cfg.floor_db)
            if not speech and not self._utt:  # the floor follows the background, quickly down, slowly up
                rate = 0.2 if level < self._noise_db else 0.02
                self._noise_db += rate * (level - self._noise_db)
            if self._utt:
                self._utt.append(frame)
                self._silent_frames = 0 if speech else self._silent_frames + 1
                if self._silent_frames >= hang or len(self._utt) >= max_frames:
                    out.extend(self._finish())
            elif speech:
                self._utt = [*self._pre, frame]
                self._pre.clear()
                self._silent_frames = 0
            else:
                self._pre.append(frame)
        return out

    def _finish(self) -> list[np.ndarray]:
        frames = self._utt[: len(self._utt) - self._silent_frames + min(self._silent_frames, 5)]
        self._utt, self._silent_frames = [], 0
        audio = np.concatenate(frames) if frames else np.zeros(0, np.float32)
        if len(audio) < self.cfg.min_seconds * self.sr:
            self.too_short += 1
            return []
        self.utterances += 1
        return [audio]

    def flush(self) -> list[np.ndarray]:
        """End of stream: the utterance in progress, if long enough."""
        return self._finish() if self._utt else []


def import_sounddevice():
    """``sounddevice``, or a RuntimeUnavailableError that says how to get it."""
    try:
        import sounddevice
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "the microphone needs sounddevice: pip install 'fedser[audio]'") from exc
    except OSError as exc:  # sounddevice imports, but cannot load libportaudio
        raise RuntimeUnavailableError(
            f"PortAudio is missing ({exc}): on Raspberry Pi OS / Debian run `sudo apt install libportaudio2`") from exc
    return sounddevice


def list_input_devices() -> list[dict]:
    sd = import_sounddevice()
    return [{"index": i, "name": d["name"], "channels": d["max_input_channels"],
             "default_samplerate": d["default_samplerate"]}
            for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]


def resolve_input_device(spec: str) -> int | None:
    """The input device index for ``spec``: an index, a name substring, or "" for the system default."""
    inputs = list_input_devices()
    if not inputs:
        raise AudioError("no audio input device found: plug in a USB microphone and check `arecord -l`")
    if spec == "":
        return None
    if spec.strip().isdigit():
        idx = int(spec)
        if any(d["index"] == idx for d in inputs):
            return idx
    else:
        matches = [d for d in inputs if spec.lower() in d["name"].lower()]
        if len(matches) == 1:
            return matches[0]["index"]
        if len(matches) > 1:
            raise AudioError(f"input device {spec!r} is ambiguous: {[d['name'] for d in matches]}")
    names = ", ".join(f"{d['index']}: {d['name']}" for d in inputs)
    raise AudioError(f"no input device {spec!r}; inputs here: {names}")


class Listener:
    """Microphone (or any block source) -> segmenter -> ``device.classify`` in a worker thread.

    ``on_prediction(prediction, audio)`` is called from the worker for each utterance.
    """

    def __init__(self, device, cfg: EdgeConfig, on_prediction: Callable | None = None, *,
                 rescan_devices: bool = True) -> None:
        """``rescan_devices``: before each reopen of a lost input, re-initialise PortAudio so that a microphone
        plugged back in is seen (PortAudio's device list is otherwise the one it read at start). That closes
        every PortAudio stream of the process: a program with streams of its own passes False (and then finds a
        replugged microphone only at its next start)."""
        self.device, self.cfg = device, cfg
        self.on_prediction = on_prediction
        self.rescan_devices = bool(rescan_devices)
        try:
            self.sample_rate = check_sample_rate(cfg.audio.sample_rate, "audio.sample_rate")
        except ParameterError as exc:
            raise AudioError(str(exc)) from exc
        self.blocksize = max(1, int(round(cfg.audio.block_seconds * self.sample_rate)))
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.audio.queue_blocks)
        self.segmenter = Segmenter(cfg.segmenter, self.sample_rate)
        self.blocks = self.dropped_blocks = self.overflows = self.predictions = self.errors = 0
        self.last_speech = time.monotonic()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._stream = None
        self._stream_lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._events: queue.Queue = queue.Queue()
        self._microphone = False
        self.last_block = time.monotonic()  # the newest block from the input (the callback sets it)
        self.input_losses = self.input_restarts = 0
        self._lost_since: float | None = None  # the input is lost (being reopened) since
        self._reopen_at = 0.0
        self._reopen_tries = 0

    # -- the audio side: copy and enqueue only ------------------------------------------------
    def _callback(self, indata, frames, time_info, status) -> None:
        self.last_block = time.monotonic()
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        self.push(indata[:, 0] if indata.ndim == 2 else indata)

    def push(self, block: np.ndarray, wait: bool = False) -> None:
        """Enqueue one block. The microphone callback never blocks (``wait=False``): a block that finds the
        queue full is dropped and counted. A file source passes ``wait=True``: it waits for room, so a file
        read faster than it is classified loses nothing."""
        self.blocks += 1
        block = np.array(block, dtype=np.float32, copy=True)
        if wait:
            while True:
                try:
                    self.queue.put(block, timeout=0.5)
                    return
                except queue.Full:
                    if self._worker is None or not self._worker.is_alive():  # nobody will ever make room
                        break
        try:
            self.queue.put_nowait(block)
        except queue.Full:
            self.dropped_blocks += 1

    # -- the worker: segment and classify ------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set() or not self.queue.empty():
            try:
                block = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            for utt in self.segmenter.feed(block):
                self._classify(utt)
            if self.segmenter.in_speech:
                self.last_speech = time.monotonic()
        for utt in self.segmenter.flush():
            self._classify(utt)

    def model_rate(self) -> int:
        """The sample rate the device's model takes (read each time: a new model may bring another)."""
        return int(self.device.metadata.features.sample_rate)

    def _classify(self, audio: np.ndarray) -> None:
        self.last_speech = time.monotonic()
        try:
            audio = resample(audio, self.sample_rate, self.model_rate())  # utterances are at most max_seconds
            pred = self.device.classify(audio, source="microphone",
                                        keep_audio=self.cfg.privacy.store_audio)
            self.predictions += 1
            if self.on_prediction is not None:  # (the CLI's enforces retention: a write too)
                self.on_prediction(pred, audio)
        except FedserError as exc:  # a full disk, say: one line that says what to do, not a traceback
            self.errors += 1
            log.error("classification failed: %s", exc)
        except Exception:  # one bad utterance must not stop listening
            self.errors += 1
            log.exception("classification failed")

    def start(self, *, microphone: bool = True) -> Listener:
        self._stop.clear()
        self._lost_since = None  # a stop while the input was lost does not carry over
        self._worker = threading.Thread(target=self._run, name="fedser-listen", daemon=True)
        self._worker.start()
        self._microphone = microphone
        if microphone:
            try:
                self._open_stream()
            except Exception:
                self.stop()
                raise
            log.info("listening on %s at %d Hz", self.cfg.audio.device or "the default input", self.sample_rate)
            self._keeper = threading.Thread(target=self._keep_input, name="fedser-input", daemon=True)
            self._keeper.start()
        return self

    def _open_stream(self, *, rescan: bool = False) -> None:
        """Open and start the input stream, the device found again by its configured name (a USB microphone
        plugged back in may have another index); AudioError naming the device and the rate when it does not.
        ``rescan``: re-initialise PortAudio first (unless ``rescan_devices`` is off), whose device list is
        otherwise the one it saw at start (the way sounddevice's author gives for hot-plugging)."""
        sd = import_sounddevice()
        if rescan and self.rescan_devices:
            _rescan_portaudio(sd)
        device = resolve_input_device(self.cfg.audio.device)
        stream = None
        try:
            stream = sd.InputStream(samplerate=self.sample_rate, channels=1, dtype="float32",
                                    blocksize=self.blocksize, device=device, callback=self._callback)
            self.last_block = time.monotonic()
            stream.start()
        except Exception as exc:
            if stream is not None:
                _close(stream)
            raise AudioError(f"cannot open the input device {self.cfg.audio.device or '(default)'} at "
                             f"{self.sample_rate} Hz: {exc} (set audio.sample_rate to a rate it offers; "
                             f"`fedser-edge devices` lists them)") from exc
        with self._stream_lock:
            if self._stop.is_set():  # stopped meanwhile: nobody would close it
                stream, keep = None, stream
            else:
                keep = None
                self._stream = stream
        if keep is not None:
            _close(keep)

    def _take_stream(self):
        with self._stream_lock:
            stream, self._stream = self._stream, None
        return stream

    def _keep_input(self) -> None:
        """The input keeper's thread: :meth:`check_input` every 0.2 s (its reports wait for :meth:`watch`). Its
        own thread, since closing or opening a stream on a sound server that hangs can block for as long as it
        hangs (measured: a stopped PulseAudio held ``abort`` until it went on), and listen must not."""
        while not self._stop.wait(0.2):
            try:
                self.check_input()
            except Exception:  # never the end of the keeper: the next round tries again
                log.exception("checking the input")

    def check_input(self, now: float | None = None) -> dict | None:
        """One round of keeping the microphone open (the keeper thread calls it; tests may too).

        The input is lost when its stream ended (PortAudio ends it when the device goes away) or no block came
        for ``audio.stall_seconds``: the stream is dropped (closed in the background) and reopened every 1, 2,
        4 ... 30 s until it opens. Reports ``{"input": "lost", "reason": ...}`` at the loss and ``{"input":
        "restored", "after_seconds": ...}`` at the return to :meth:`watch` (and returns the report, else None).
        Nothing to do for a file source."""
        if not self._microphone or self._stop.is_set():
            return None
        now = time.monotonic() if now is None else now
        if self._lost_since is None:
            stream = self._stream
            quiet = now - self.last_block
            if stream is not None and stream.active and quiet < self.cfg.audio.stall_seconds:
                return None
            reason = (f"no audio from the input for {quiet:.0f} s" if stream is not None and stream.active
                      else "the input stream ended (device unplugged or the sound server stopped?)")
            self._lost_since, self._reopen_at, self._reopen_tries = now, now + 1.0, 0
            self.input_losses += 1
            log.warning("%s: reopening %s", reason, self.cfg.audio.device or "the default input")
            event = {"input": "lost", "reason": reason}
            self._events.put(event)  # before the close, which may block
            lost = self._take_stream()
            if lost is not None:
                _close(lost)
            return event
        if now < self._reopen_at:
            return None
        try:
            self._open_stream(rescan=True)
        except Exception as exc:  # AudioError mostly; PortAudio's own errors while it re-initialises too
            self._reopen_tries += 1
            self._reopen_at = time.monotonic() + min(30.0, 2.0 ** self._reopen_tries)
            log.info("input still missing (%s); next try in %.0f s", exc, self._reopen_at - now)
            return None
        after, self._lost_since = time.monotonic() - self._lost_since, None
        self.input_restarts += 1
        log.warning("input %s is back after %.0f s", self.cfg.audio.device or "(default)", after)
        event = {"input": "restored", "after_seconds": round(after, 1)}
        self._events.put(event)
        return event

    def watch(self) -> list[dict]:
        """What the input keeper reported since the last call (the input lost, the input back), oldest first;
        the listen loop prints them. Never blocks."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def stop(self, timeout: float = 30.0) -> dict:
        self._stop.set()
        stream = self._take_stream()
        closed = stream is None or _close(stream, wait=5.0)
        if self._keeper is not None:
            self._keeper.join(5.0)  # a keeper blocked on a hung sound server is a daemon thread: not waited for
        if self._microphone:
            # This process's streams are closed (or left behind, stuck): PortAudio's exit handler has nothing left
            # to do but could hang on a stuck one (Pa_Terminate joins its thread), after the stats were printed.
            _skip_portaudio_exit_handler(stuck=not closed or (self._keeper is not None and self._keeper.is_alive()))
        if self._worker is not None:
            self._worker.join(timeout)
        return self.stats()

    def stats(self) -> dict:
        return {"blocks": self.blocks, "dropped_blocks": self.dropped_blocks, "input_overflows": self.overflows,
                "utterances": self.segmenter.utterances, "too_short": self.segmenter.too_short,
                "predictions": self.predictions, "errors": self.errors, "queued": self.queue.qsize(),
                "input_losses": self.input_losses, "input_restarts": self.input_restarts,
                "input_lost": self._lost_since is not None}


def _close(stream, wait: float | None = None) -> bool:
    """Abort and close a PortAudio stream; with ``wait``, in a daemon thread waited for at most that long (a
    stream on a hung sound server can block in abort until the server goes on). False when it was left behind."""
    def close():
        try:
            # abort, not stop: stop waits for PortAudio's callback thread to finish its pending buffers, and an
            # input stream has nothing pending worth waiting for. (A CI run's `listen` still running 60 s after
            # SIGINT was first blamed on that wait; the cause was SIGINT ignored from the start: edge_sdk/cli.py.)
            stream.abort()
        except Exception as exc:  # a device already gone may refuse; the stream is dropped either way
            log.debug("aborting the input stream: %s", exc)
        try:
            stream.close()
        except Exception as exc:
            log.debug("closing the input stream: %s", exc)

    if wait is None:
        close()
        return True
    closer = threading.Thread(target=close, name="fedser-input-close", daemon=True)
    closer.start()
    closer.join(wait)
    if closer.is_alive():
        log.warning("the input stream did not close within %.0f s (the sound server hangs?); left behind", wait)
        return False
    return True


def _skip_portaudio_exit_handler(*, stuck: bool = False) -> None:
    """sounddevice's exit handler (Pa_Terminate, which closes every stream and joins its thread) would hang the
    process at exit on a stream stuck on a hung sound server, after listen printed its stats, until systemd kills
    it. Once the listener's streams are closed (or given up on) the process ends without it; the OS frees what
    PortAudio held."""
    sd = sys.modules.get("sounddevice")
    handler = getattr(sd, "_exit_handler", None)
    if handler is not None:
        atexit.unregister(handler)
        if stuck:
            log.warning("PortAudio is not terminated at exit: a stream is stuck on the sound server")


def _rescan_portaudio(sd) -> None:
    """Terminate and initialise PortAudio again (every nested initialisation), so its device list is read anew.
    Each step on its own: an initialise that failed once is tried again at the next reopen, not skipped forever."""
    try:
        while getattr(sd, "_initialized", 0) > 0:
            sd._terminate()
    except Exception as exc:  # noqa: BLE001 - PortAudio's own errors; the initialise below is still tried
        log.debug("terminating PortAudio: %s", exc)
    if getattr(sd, "_initialized", 0) <= 0:
        try:
            sd._initialize()
        except Exception as exc:  # noqa: BLE001 - the open after it says what is wrong
            log.debug("initialising PortAudio: %s", exc)
