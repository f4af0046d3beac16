"""``fedser-edge``: the device's command line.

    fedser-edge [--state DIR] enroll --server URL --token TOKEN [--name NAME]
    fedser-edge [--state DIR] classify FILE [FILE ...]
    fedser-edge [--state DIR] feedback PREDICTION_ID up|down|LABEL
    fedser-edge [--state DIR] train
    fedser-edge [--state DIR] sync
    fedser-edge [--state DIR] status

The state folder defaults to ``$FEDSER_STATE_DIR`` or ``~/.local/share/fedser``.
Output is JSON, one object per line, so scripts can read it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edge_sdk.errors import FedserError

__all__ = ["main"]


def _default_state() -> str:
    return os.environ.get("FEDSER_STATE_DIR") or str(Path.home() / ".local" / "share" / "fedser")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedser-edge", description="fedser device: classify, learn, federate")
    parser.add_argument("--state", default=_default_state(), help="state folder (default: %(default)s)")
    parser.add_argument("--runtime", default="auto", choices=("auto", "ai_edge_litert", "tflite_runtime"))
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("enroll", help="register with an aggregator using a one-time token")
    p.add_argument("--server", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--name", default="")
    p = sub.add_parser("classify", help="classify audio files (WAV/FLAC, any rate)")
    p.add_argument("files", nargs="+", type=Path)
    p = sub.add_parser("feedback", help="answer a prediction: up, down, or the right label")
    p.add_argument("prediction_id")
    p.add_argument("answer")
    p = sub.add_parser("train", help="fine-tune the head on the stored feedback now")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--min-examples", type=int, default=8)
    p = sub.add_parser("sync", help="post pending updates and pull the current model")
    p.add_argument("--clip-norm", type=float, default=0.0, help="clip the delta's L2 norm (0: off)")
    p.add_argument("--noise-multiplier", type=float, default=0.0, help="Gaussian noise std / clip norm")
    sub.add_parser("status", help="what this device holds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from edge_sdk.device import Device, PrivacyPolicy, TrainPolicy

    try:
        device = Device(args.state, runtime=args.runtime, num_threads=args.threads)
        if args.command == "enroll":
            device_id = device.enroll(args.server, args.token, name=args.name)
            _out({"device_id": device_id, "model_version": device.model_version})
        elif args.command == "classify":
            for path in args.files:
                _out({"file": str(path), **device.classify_file(path).to_dict()})
        elif args.command == "feedback":
            device.feedback(args.prediction_id, args.answer)
            _out({"prediction_id": args.prediction_id, "answer": args.answer, "stored": True})
        elif args.command == "train":
            _out(device.personalize(TrainPolicy(epochs=args.epochs, min_examples=args.min_examples)).to_dict())
        elif args.command == "sync":
            _out(device.sync(privacy=PrivacyPolicy(args.clip_norm, args.noise_multiplier)).to_dict())
        elif args.command == "status":
            _out(device.status())
    except FedserError as exc:
        print(f"fedser-edge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _out(obj: dict) -> None:
    print(json.dumps(obj, default=str))


if __name__ == "__main__":
    sys.exit(main())
