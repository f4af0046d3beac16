"""The device path of a fedser install, checked end to end; run by scripts/pi-check.sh inside an emulated
arm64 Debian (and on the host, as the x86 reference it is compared with).

    python pi_check_device.py --state DIR [--clips DIR] [--out result.json]

1. ``import edge_sdk`` (device, CLI, web page) without tensorflow, librosa, numba or keras loaded or installed;
2. a ``Device`` on the bundled model classifies the clips (RAVDESS files by their names' labels; without
   clips, synthetic tones, whose labels mean nothing);
3. every prediction is answered (thumbs-up when right, else the right label), then one call of the
   ``input_grad`` signature (the per-user input affine's gradient) on the first 16 answers, ``personalize()``
   with the head only (the affine's full fit, hundreds of those calls, takes hours under qemu-user: stop 22 ran
   one for 70 minutes without an end) and a second pass over the clips with the personal head;
4. ``fedser-edge --help`` and ``fedser-edge --state DIR status`` as subprocesses.

Prints one line per step (so a crash shows where) and writes a JSON summary. Exit status 0 when every step
ran; a segmentation fault kills the process (status 139), as it would on the device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("tensorflow", "librosa", "numba", "keras")
RAVDESS = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry"}


def step(name: str) -> None:
    print(f"[pi-check] {name}", flush=True)


def synthetic_clips(folder: Path) -> list[tuple[Path, str]]:
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i, (label, f0) in enumerate([("angry", 220), ("happy", 260), ("neutral", 140), ("sad", 110)] * 2):
        t = np.arange(int(16000 * 2.5)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.05 * np.sin(3 * t))) + 0.01 * rng.standard_normal(t.size)
        path = folder / f"synthetic-{i}-{label}.wav"
        sf.write(path, wave.astype(np.float32), 16000)
        out.append((path, label))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--clips", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reference", action="store_true",
                        help="the host's reference run (a dev environment: the heavy packages may be installed)")
    parser.add_argument("--affine", action="store_true",
                        help="personalize() with the model's own policy (the bundled model: the input affine from 20 "
                             "answers) instead of the head only: about 40 minutes under qemu-user on 2 cores")
    args = parser.parse_args()
    result: dict = {"machine": platform.machine(), "python": platform.python_version()}
    started = time.perf_counter()

    step("import edge_sdk")
    import edge_sdk  # noqa: F401
    import edge_sdk.cli  # noqa: F401
    import edge_sdk.device  # noqa: F401
    import edge_sdk.web  # noqa: F401
    from edge_sdk.device import Device
    from edge_sdk.model import load_interpreter_class

    loaded = [m for m in HEAVY if m in sys.modules]
    installed = [m for m in HEAVY if importlib.util.find_spec(m) is not None]
    assert not loaded, f"edge_sdk loaded {loaded}"
    assert args.reference or not installed, f"the edge install brought {installed}"
    interpreter = load_interpreter_class()
    runtime = interpreter.__module__.split(".")[0]
    from importlib.metadata import version

    result["runtime"] = {"module": runtime,
                         "version": version("ai-edge-litert" if runtime == "ai_edge_litert" else "tflite-runtime")}
    result["numpy"] = version("numpy")
    step(f"runtime {result['runtime']} numpy {result['numpy']} on {result['machine']} Python {result['python']}")

    if args.clips and args.clips.is_dir() and any(args.clips.iterdir()):
        clips = [(p, RAVDESS[p.name.split("-")[2]]) for p in sorted(args.clips.iterdir())
                 if p.suffix in (".wav", ".flac") and p.name.split("-")[2] in RAVDESS]
        result["clips"] = "ravdess"
    else:
        clips = synthetic_clips(args.state.parent / "synthetic-clips")
        result["clips"] = "synthetic"

    step(f"Device on the bundled model, classifying {len(clips)} {result['clips']} clips")
    device = Device(args.state)
    preds = [device.classify_file(path) for path, _ in clips]
    result["predicted"] = [p.label for p in preds]
    result["right"] = sum(p.label == label for p, (_, label) in zip(preds, clips, strict=True))
    result["total"] = len(clips)
    result["infer_ms_median"] = sorted(p.latency_ms for p in preds)[len(preds) // 2]
    step(f"right {result['right']} of {result['total']}")

    step("feedback on every prediction")
    for p, (_, label) in zip(preds, clips, strict=True):
        device.feedback(p.id, "up" if p.label == label else label)

    import numpy as np

    from edge_sdk.device import TrainPolicy

    if device.model.has_input_grad:
        step("input_grad on the first 16 answers")
        examples = device._examples()[:16]
        feats = device._input_features(device.model, examples)
        _, targets, sign = device._arrays(examples)
        t0 = time.perf_counter()
        grad, loss, _ = device.model.input_gradient(feats, targets, sign)
        result["input_grad"] = {"loss": loss, "grad_abs_sum": float(np.abs(grad).sum()),
                                "seconds": round(time.perf_counter() - t0, 2)}
        step(f"input_grad: {result['input_grad']}")

    step("personalize()" + (" (the model's policy: the input affine)" if args.affine else " (head only)"))
    t0 = time.perf_counter()
    report = device.personalize(None if args.affine else TrainPolicy(input_affine_from=0))
    result["personalize"] = {"status": report.status, "examples": report.examples, "held_back": report.held_back,
                             "loss_before": report.loss_before, "loss_after": report.loss_after,
                             "input_affine": report.input_affine, "input_affine_score": report.input_affine_score,
                             "score_after": report.score_after, "seconds": round(time.perf_counter() - t0, 2)}
    step(f"personalize: {result['personalize']}")
    again = [device.classify_file(path) for path, _ in clips[:4]]  # the personal head in use (4: emulation is slow)
    result["predicted_after"] = [p.label for p in again]
    result["personalized"] = all(p.personalized for p in again) if report.status == "kept" else None

    step("fedser-edge --help, fedser-edge status")
    cli = [sys.executable, "-m", "edge_sdk.cli"]
    helped = subprocess.run(cli + ["--help"], capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "status" in helped.stdout, helped.stderr[-2000:]
    status = subprocess.run(cli + ["--state", str(args.state), "status"], capture_output=True, text=True,
                            timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    result["status"] = json.loads(status.stdout) if status.stdout.strip().startswith("{") else status.stdout[:500]
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    step(f"all steps ran in {result['seconds']} s (max RSS {result['max_rss_mb']} MB)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
