"""``fedser-edge``: the device's command line.

    fedser-edge [--state DIR] [--config FILE] enroll --server URL --token TOKEN [--name NAME]
    fedser-edge [--state DIR] listen [--feedback terminal|web|none] [--input-device NAME|INDEX] [--file F]
    fedser-edge [--state DIR] classify FILE [FILE ...]
    fedser-edge [--state DIR] feedback PREDICTION_ID up|down|LABEL
    fedser-edge [--state DIR] train | sync | status | devices
    fedser-edge [--state DIR] doctor [--json] [--no-audio]   checks the install, says how to fix each problem
    fedser-edge [--state DIR] export-data [--out FILE] | wipe-data --yes

One process at a time changes a state folder: ``enroll``, ``listen``, ``classify``, ``train``, ``sync`` and
``wipe-data`` hold its lock while they run (``edge_sdk.storage.StateLock``); another of them started meanwhile
exits with status 75 naming the holder, or waits ``--wait SECONDS`` for it. ``status``, ``export-data`` and
``feedback`` work beside a running ``listen``.

The state folder defaults to ``$FEDSER_STATE_DIR`` or ``~/.local/share/fedser``;
the configuration is ``--config``, ``$FEDSER_EDGE_CONFIG`` or ``<state>/config.toml``
with ``FEDSER_EDGE_*`` overrides (``edge_sdk.config``). Output is JSON, one
object per line, so scripts can read it (``listen`` with terminal feedback
talks to the person instead; with the page, it prints each prediction's id only: a label printed under systemd
would stay in the journal, beyond retention and ``wipe-data``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from edge_sdk.errors import FedserError, StateBusyError, StorageFullError

__all__ = ["main", "EXIT_BUSY", "LOCKED_COMMANDS"]

EXIT_BUSY = 75  # EX_TEMPFAIL: the state folder is in use by another process; try again when it is free
LOCKED_COMMANDS = ("enroll", "listen", "classify", "train", "sync", "wipe-data")  # hold the state folder's lock


def _default_state() -> str:
    return os.environ.get("FEDSER_STATE_DIR") or str(Path.home() / ".local" / "share" / "fedser")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedser-edge", description="fedser device: classify, learn, federate")
    parser.add_argument("--state", default=_default_state(), help="state folder (default: %(default)s)")
    parser.add_argument("--config", default=None, help="TOML config (default: <state>/config.toml if present)")
    parser.add_argument("--runtime", default=None, choices=("auto", "ai_edge_litert", "tflite_runtime"))
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads")
    parser.add_argument("--wait", type=_wait_seconds, default=0.0, metavar="SECONDS",
                        help="wait this long for another process using the state folder to finish (default: 0, "
                             "exit 75 at once)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("enroll", help="register with an aggregator using a one-time token")
    p.add_argument("--server", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--name", default="")
    p = sub.add_parser("listen", help="classify speech from the microphone and take feedback")
    p.add_argument("--feedback", choices=("terminal", "web", "none"), default=None)
    p.add_argument("--language", default=None, metavar="TAG",
                   help="language of the page and prompt: auto, en, pl, ... (default: [feedback] language)")
    p.add_argument("--input-device", default=None, help="input device name (substring) or index")
    p.add_argument("--port", type=int, default=None, help="port of the feedback page (web)")
    p.add_argument("--file", type=Path, default=None, help="stream this audio file instead of the microphone")
    p.add_argument("--realtime", action="store_true", help="with --file: at the pace of real audio")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: until Ctrl-C or q)")
    p = sub.add_parser("classify", help="classify audio files (WAV/FLAC, any rate)")
    p.add_argument("files", nargs="+", type=Path)
    p = sub.add_parser("feedback", help="answer a prediction: up, down, or the right label")
    p.add_argument("prediction_id")
    p.add_argument("answer")
    p = sub.add_parser("train", help="fine-tune the head on the stored feedback now")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--min-examples", type=int, default=None)
    p = sub.add_parser("sync", help="post pending updates and pull the current model")
    p.add_argument("--clip-norm", type=float, default=None, help="clip the delta's L2 norm (0: off)")
    p.add_argument("--noise-multiplier", type=float, default=None, help="Gaussian noise std / clip norm")
    sub.add_parser("status", help="what this device holds")
    sub.add_parser("devices", help="list audio input devices")
    from edge_sdk.doctor import add_parser as add_doctor_parser

    add_doctor_parser(sub)
    p = sub.add_parser("export-data", help="write everything stored about you as JSON")
    p.add_argument("--out", type=Path, default=None,
                   help="file, written whole or not at all, readable by you only (default: standard output, streamed)")
    p = sub.add_parser("wipe-data", help="delete your predictions, answers and pending updates")
    p.add_argument("--yes", action="store_true", help="really delete")
    return parser


def _wait_seconds(text: str) -> float:
    from edge_sdk.storage import MAX_LOCK_WAIT

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= MAX_LOCK_WAIT:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_LOCK_WAIT:.0f} seconds, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "doctor":  # before the config is loaded: a broken config is one of its findings
        from edge_sdk import doctor

        return doctor.main(args)
    from edge_sdk.storage import StateLock

    if args.command == "wipe-data" and not args.yes:
        print("fedser-edge: wipe-data deletes every prediction, answer and pending update of this device; "
              "run it again with --yes", file=sys.stderr)
        return 2
    lock = StateLock(args.state, command=f"fedser-edge {args.command}")
    try:
        if args.command in LOCKED_COMMANDS:
            try:
                lock.acquire(wait=args.wait)
            except KeyboardInterrupt:  # Ctrl-C while waiting for the folder (--wait)
                return 130
        return _run(args, lock)
    except StateBusyError as exc:
        print(f"fedser-edge: error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except FedserError as exc:
        print(f"fedser-edge: error: {exc}", file=sys.stderr)
        return 2
    finally:
        lock.release()


def _run(args, lock) -> int:
    from edge_sdk.config import load_config
    from edge_sdk.device import Device, PrivacyPolicy, TrainPolicy

    cfg = load_config(args.config, state_dir=args.state)
    if args.runtime:
        cfg.runtime = args.runtime
    if args.threads is not None:
        from edge_sdk.model import check_threads

        check_threads("--threads", args.threads)
        cfg.threads = args.threads
    if args.command == "devices":
        from edge_sdk.listen import list_input_devices

        for d in list_input_devices():
            _out(d)
        return 0
    train_policy = TrainPolicy(min_examples=cfg.training.min_new_feedback, epochs=cfg.training.epochs,
                               learning_rate=cfg.training.learning_rate,
                               input_affine_from=cfg.training.input_affine_from)
    device = Device(args.state, runtime=cfg.runtime, num_threads=cfg.threads, train_threads=cfg.training.threads,
                    train_policy=train_policy)
    for problem in device.problems:  # damaged local files: the device runs on what still verifies
        print(f"fedser-edge: warning: {problem['file']}: {problem['problem']} ({problem['action']})",
              file=sys.stderr)
    privacy = PrivacyPolicy(cfg.privacy.clip_norm, cfg.privacy.noise_multiplier)
    if args.command == "enroll":
        device_id = device.enroll(args.server, args.token, name=args.name)
        _out({"device_id": device_id, "model_version": device.model_version})
    elif args.command == "listen":
        return _listen(device, cfg, args, train_policy, privacy)
    elif args.command == "classify":
        for path in args.files:
            _out({"file": str(path), **device.classify_file(path).to_dict()})
        _retention(device, cfg)
    elif args.command == "feedback":
        device.feedback(args.prediction_id, args.answer)
        _out({"prediction_id": args.prediction_id, "answer": args.answer, "stored": True})
    elif args.command == "train":
        policy = TrainPolicy(epochs=args.epochs or train_policy.epochs,
                             min_examples=args.min_examples or train_policy.min_examples,
                             learning_rate=train_policy.learning_rate,
                             input_affine_from=train_policy.input_affine_from)
        stop = _Stop(device)
        previous = _stop_on_signals(stop)
        try:
            report = device.personalize(policy, cancel=stop.event)
        except KeyboardInterrupt:  # a signal before or after the personalisation ran (nothing it fitted is kept)
            return 130
        finally:
            _restore_signals(previous)
        _out(report.to_dict())
        if report.status == "cancelled":
            return 130
    elif args.command == "sync":
        if args.clip_norm is not None or args.noise_multiplier is not None:
            privacy = PrivacyPolicy(args.clip_norm if args.clip_norm is not None else privacy.clip_norm,
                                    args.noise_multiplier if args.noise_multiplier is not None
                                    else privacy.noise_multiplier)
        _out(device.sync(privacy=privacy).to_dict())
    elif args.command == "status":
        _out({**device.status(), "personal_accuracy": device.store.personal_accuracy(),
              "in_use_by": lock.busy()})
    elif args.command == "export-data":
        pieces = device.store.iter_export()  # written as it is read: memory bounded whatever the store holds
        if args.out:
            from edge_sdk.storage import atomic_write

            # whole or not at all (a full disk: StorageFullError), readable by this user only: it is their data
            try:
                written = atomic_write(args.out, (p.encode() for p in pieces), mode=0o600)
            except StorageFullError:
                raise
            except OSError as exc:
                raise FedserError(f"cannot write {args.out}: {exc.strerror or exc} (choose another --out)") from exc
            _out({"exported": str(args.out), "bytes": written})
        else:
            for piece in pieces:
                sys.stdout.write(piece)
            sys.stdout.flush()
    elif args.command == "wipe-data":
        _out({"wiped": device.wipe_data()})
    return 0


def _retention(device, cfg) -> None:
    device.store.enforce_retention(max_predictions=cfg.privacy.max_predictions,
                                   max_age_days=cfg.privacy.max_age_days)


def _listen(device, cfg, args, train_policy, privacy) -> int:
    from edge_sdk.listen import Listener

    if args.input_device is not None:
        cfg.audio.device = args.input_device
    mode = args.feedback or cfg.feedback.mode
    if args.language is not None:
        from edge_sdk.i18n import check_language_setting

        cfg.feedback.language = check_language_setting(args.language)
    if device.model is None:
        raise FedserError("no model: enroll this device (or install fedser with its bundled model)")
    stop = _Stop(device)  # SIGINT, SIGTERM or the terminal's q: the loop ends, a personalisation under way is cancelled
    terminal = languages = None
    if mode in ("terminal", "web"):  # their language (edge_sdk/i18n.py): a deployer's catalogues checked first
        from edge_sdk.i18n import check_available, load_languages

        languages, problems = load_languages(cfg.feedback.translations)
        for problem in problems:  # the page and prompt go on in the other languages; doctor names these too
            logging.getLogger("edge_sdk").warning("feedback translation left out: %s", problem)
        check_available(languages, cfg.feedback.language)
    if mode == "terminal":
        from edge_sdk.i18n import terminal_catalogue
        from edge_sdk.terminal import TerminalFeedback

        catalogue = terminal_catalogue(languages, cfg.feedback.language,
                                       encoding=getattr(sys.stdout, "encoding", None))
        terminal = TerminalFeedback(device, stop=stop.event, catalogue=catalogue)

    def on_prediction(pred, audio):
        _retention(device, cfg)
        if terminal is not None:
            terminal.prompt(pred)
        elif mode == "web":  # shown on the page; printed, it would stay in the system journal beyond wipe-data
            _out({"prediction": pred.id, "model_version": pred.model_version})
        else:
            _out(pred.to_dict())

    file_blocks = None
    if args.file is not None:
        # The whole recording, block by block at its own rate (the listener resamples each utterance to the
        # model's): a long file is segmented like a long microphone session, never held whole.
        from edge_sdk.audio import stream_audio

        cfg.audio.sample_rate, file_blocks = stream_audio(args.file, block_seconds=cfg.audio.block_seconds)
    listener = Listener(device, cfg, on_prediction)
    previous = _stop_on_signals(stop)  # first: a signal during start-up still closes what started
    try:
        _listen_loop(device, cfg, args, train_policy, privacy, listener, terminal, mode, file_blocks, stop, languages)
    finally:
        _restore_signals(previous)
    return 0


def _listen_loop(device, cfg, args, train_policy, privacy, listener, terminal, mode, file_blocks, stop,
                 languages) -> None:
    web = None
    try:
        if mode == "web":
            from edge_sdk.web import FeedbackServer, configured_allowed_hosts

            web = FeedbackServer(device, host=cfg.web.host, port=args.port or cfg.web.port, stats=listener.stats,
                                 allowed_hosts=configured_allowed_hosts(cfg.web), language=cfg.feedback.language,
                                 languages=languages, allow_wipe=cfg.web.allow_wipe,
                                 allow_export=cfg.web.allow_export, keeps_audio=cfg.privacy.store_audio).start()
            print(json.dumps({"feedback_page": web.page_url}), flush=True)
        listener.start(microphone=args.file is None)
        if terminal is not None:
            terminal.start()
        started = time.monotonic()
        last_sync = 0.0
        trained_at = int(device.store.get("trained_feedback", "0"))
        # answers not yet personalised on this model (a new version, a personalisation cancelled or cut short, a
        # personal file found damaged): fitted at the first idle moment, without waiting for min_new_feedback new ones
        due = device.personalisation_due()
        if file_blocks is not None:
            for block in file_blocks:
                listener.push(block, wait=True)  # a file waits for the classifier: no block is dropped
                if args.realtime:
                    time.sleep(cfg.audio.block_seconds)
            tail = int(cfg.segmenter.hangover_seconds * cfg.audio.sample_rate) + listener.blocksize
            listener.push(__import__("numpy").zeros(tail, "float32"), wait=True)  # let the last utterance end
        while True:
            if args.seconds and time.monotonic() - started >= args.seconds:
                break
            if stop.event.is_set():  # a signal, or the terminal's q
                break
            if args.file is not None and not args.seconds and listener.queue.empty() and terminal is None:
                break
            time.sleep(0.2)
            for event in listener.watch():  # a microphone that stopped (unplugged): reopened until it is back
                print(json.dumps(event), flush=True)
            answered = device.store.counts()["feedback"]
            trained_at = min(trained_at, answered)  # answers removed (retention, wipe-data): count from what is left
            idle = time.monotonic() - listener.last_speech >= cfg.training.idle_seconds
            if (due or answered - trained_at >= cfg.training.min_new_feedback) and idle:
                wipes = device.wipes
                try:
                    report = device.personalize(train_policy, cancel=stop.event)
                except FedserError as exc:  # a full disk: listening goes on; tried again after new answers
                    logging.getLogger("edge_sdk").error("personalisation failed: %s", exc)
                    print(json.dumps({"trained": {"status": "failed", "reason": str(exc)}}), flush=True)
                    trained_at, due = answered, False
                    continue
                print(json.dumps({"trained": report.to_dict()}), flush=True)
                if report.status == "cancelled":  # the answers count as untrained: the next start fits them
                    break
                if device.wipes != wipes:  # the page's user deleted the answers meanwhile (the fit stopped): the
                    trained_at, due = 0, False  # wipe's count (none fitted) stands
                    continue
                trained_at, due = answered, False
                device.store.set("trained_feedback", str(answered))
            if stop.event.is_set():  # a signal during a personalisation that had already ended its fits
                break
            if device.enrolled and time.monotonic() - last_sync >= cfg.sync.interval_seconds:
                last_sync = time.monotonic()
                try:
                    synced = device.sync(privacy=privacy, cancel=stop.event)
                    print(json.dumps({"sync": synced.to_dict()}, default=str), flush=True)
                    if stop.event.is_set():
                        break
                except FedserError as exc:  # offline: the outbox keeps everything
                    logging.getLogger("edge_sdk").warning("sync failed, will retry: %s", exc)
    except KeyboardInterrupt:
        pass
    finally:
        _ignore_signals()  # a second Ctrl-C or SIGTERM while closing must not cut the closing short
        stats = listener.stop()
        if web is not None:
            web.stop()
        print(json.dumps({"listen_stats": stats}), flush=True)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Stop:
    """A request to stop: ``event`` is set by SIGINT, SIGTERM (:func:`_stop_on_signals`) or the terminal's q. While
    ``device`` personalises (:attr:`Device.personalising`: by itself, or after a sync brought a new model) or fits
    an update in a sync (:attr:`Device.making_update`) a signal only sets it, and the fit, which looks at it before
    every step, returns cancelled with nothing changed; at any other moment a signal also raises KeyboardInterrupt
    where the main thread is."""

    def __init__(self, device) -> None:
        self.device = device
        self.event = threading.Event()

    @property
    def busy(self) -> bool:
        return bool(self.device.personalising or self.device.making_update)


def _stop_on_signals(stop: _Stop) -> dict:
    """SIGINT (Ctrl-C) and SIGTERM (systemd's stop) both end a listening session the same way: the input stream
    closed, the stats printed. Installed explicitly: a process started as a shell's background job begins with
    SIGINT ignored, and Python leaves it ignored (such a listener ran on 60 s after SIGINT in a CI run); and
    SIGTERM's default would end the process without closing anything. A signal during a personalisation cancels it
    at its next step instead of interrupting it wherever it is (``stop``). Returns the handlers it replaced (none
    when not on the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum, frame):
        stop.event.set()
        if not stop.busy:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    return {s: signal.signal(s, interrupt) for s in _SIGNALS}


def _ignore_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def _restore_signals(previous: dict) -> None:
    """Put back what :func:`_stop_on_signals` replaced (a handler installed outside Python reads as None: the
    default then)."""
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _out(obj: dict) -> None:
    print(json.dumps(obj, default=str), flush=True)


if __name__ == "__main__":
    sys.exit(main())
