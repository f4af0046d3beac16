"""Edge benchmarks: the device path (numpy features + TFLite) against the naive one (librosa + Keras).

    taskset -c 0 python -m tools.bench_edge [--clip FILE] [--out bench-edge.json]
    taskset -c 0 python -m tools.bench_edge --only personalise [--model DIR]   # personalisation and classify times
    python -m tools.bench_edge --only personalise --train-threads 1,2          # the trainer on 1 and 2 threads
    python -m tools.bench_edge --only export [--predictions 1000]              # export-data's memory and time

Prints, for the bundled model on one core:
  * process start to the first prediction of a 3 s clip (a fresh interpreter, as `fedser-edge classify`);
  * peak RSS of `fedser-edge listen` on a stream (the clip played through the listener);
  * features + inference of a 3 s utterance (median of repeated runs);
  * fine-tuning the head on 500 feedback items for 10 epochs;
  * one personalisation (``Device.personalize``: cross-validated guard, then the kept fit) after 5, 20 and 40
    answers with stored features, with the default ``TrainPolicy`` (on the bundled model: the input affine from
    20 answers, its metadata's setting), the head only (``input_affine_from=0``), ``adapter=True`` (models with
    the adapter signatures) and ``input_affine_from=20`` (models with ``input_grad``: the affine's 5-fold
    cross-validation and fit come on top of the head's); and classify with and without a personal affine;
and the same steps on the naive path (librosa MFCC/log-mel + a Keras model of the same architecture,
``model.predict``), as ratios measured in the same run. A Raspberry Pi 4 core is roughly 6x slower than
this machine's, so multiply the absolute times by about 6 for a Pi.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

_FIRST_EDGE = """
import time, sys
t0 = time.perf_counter()
from edge_sdk.device import Device
d = Device(sys.argv[1])
p = d.classify_file(sys.argv[2])
print(time.perf_counter() - t0)
"""

_FIRST_NAIVE = """
import time, sys
t0 = time.perf_counter()
import librosa, numpy as np, keras
from edge_sdk.model import ModelMetadata, bundled_model_paths
from models.architectures import build_encoder, build_head, preset
meta = ModelMetadata.load(bundled_model_paths()[1])
arch = preset(meta.extra["architecture"]["name"], **{k: tuple(v) if isinstance(v, list) else v
              for k, v in meta.extra["architecture"].items() if k != "name"})
f = meta.features
enc, head = build_encoder(arch, f.max_frames, f.n_features), build_head(arch, len(meta.labels))
inp = keras.Input((f.max_frames, f.n_features)); model = keras.Model(inp, head(enc(inp)))
y, _ = librosa.load(sys.argv[1], sr=f.sample_rate)
from models.features import librosa_features
from edge_sdk.features import fit_frames, trim_silence
x = fit_frames(meta.normalization.apply(librosa_features(trim_silence(y, f), f)), f.max_frames)
model.predict(x[None], verbose=0)
print(time.perf_counter() - t0)
"""


_LISTEN_RSS = """
import runpy, sys
state, clip = sys.argv[1], sys.argv[2]
sys.argv = ["fedser-edge", "--state", state, "listen", "--file", clip, "--feedback", "none", "--realtime"]
try:
    runpy.run_module("edge_sdk.cli", run_name="__main__")
except SystemExit:
    pass
# VmHWM, not getrusage: ru_maxrss survives exec, so it would report the parent's (TensorFlow's) peak
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak_rss_kb", int(hwm.split()[1]))
"""


def _run_time(code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def personalisation_times(model_dir: Path | None, *, answers=(5, 20, 40), repeat: int = 3,
                          train_threads: int = 1, policies: tuple[str, ...] | None = None) -> list[dict]:
    """Seconds of one ``Device.personalize`` after ``n`` answers (thumbs-up when the model is right, else the
    correction; features of noise shifted per class, stored with each prediction), for the default policy, the head
    only, ``adapter=True`` and ``input_affine_from=20`` (or those named in ``policies``), on a trainer of
    ``train_threads`` interpreter threads; median of ``repeat``."""
    from edge_sdk.device import Device, TrainPolicy

    files = None if model_dir is None else (model_dir / "model.tflite", model_dir / "model.json")
    rows = []
    every = (("default", TrainPolicy()), ("head only", TrainPolicy(input_affine_from=0)),
             ("adapter", TrainPolicy(adapter=True, input_affine_from=0)),
             ("input affine", TrainPolicy(input_affine_from=20)))
    with tempfile.TemporaryDirectory() as tmp:
        for name, policy in every:
            if policies is not None and name not in policies:
                continue
            for n in answers:
                secs, status = [], ""
                for r in range(repeat):
                    dev = Device(Path(tmp) / f"{name}-{n}-{r}", model_files=files, train_threads=train_threads)
                    if name == "adapter" and not dev.model.has_adapter:
                        status = "no adapter signatures: head only"
                    if name == "input affine" and not dev.model.has_input_grad:
                        status = "no input_grad signature: head only"
                    elif name == "input affine" and n < policy.input_affine_from:
                        status = "fewer answers than input_affine_from: head only"
                    rng = np.random.default_rng(r)
                    labels = list(dev.metadata.labels)
                    offsets = rng.normal(size=(len(labels), dev.model.input_shape[2])).astype(np.float32)
                    for i in range(n):  # learnable answers (a class-specific shift per feature bin), so fits are kept
                        truth = i % len(labels)
                        x = (rng.normal(size=dev.model.input_shape[1:]) + offsets[truth]).astype(np.float32)
                        probs, emb = dev.model.infer(x)
                        pid = f"p{i}"
                        shown = int(probs.argmax())
                        dev.store.add_prediction(prediction_id=pid, model_version=0, label=labels[shown],
                                                 probs=probs, embedding=emb, features=x, latency_ms=1.0)
                        dev.feedback(pid, "up" if shown == truth else labels[truth])
                    t0 = time.perf_counter()
                    rep = dev.personalize(policy)
                    secs.append(time.perf_counter() - t0)
                    status = status or (rep.status + (", input affine kept" if rep.input_affine else ""))
                    dev.store.close()
                rows.append({"policy": name, "answers": n, "train_threads": train_threads,
                             "seconds": statistics.median(secs), "status": status})
    return rows


def classify_times(model_dir: Path | None, *, repeat: int = 30) -> dict:
    """Milliseconds of ``Device.classify`` on 3 s of noise (median of ``repeat``) without and with a personal input
    affine in use (the affine's prediction costs one more inference: the store keeps the unmoved embedding)."""
    from edge_sdk.device import Device

    files = None if model_dir is None else (model_dir / "model.tflite", model_dir / "model.json")
    with tempfile.TemporaryDirectory() as tmp:
        dev = Device(Path(tmp) / "dev", model_files=files)
        rate, bands = dev.metadata.features.sample_rate, dev.model.input_shape[2]
        audio = (0.1 * np.random.default_rng(0).normal(size=3 * rate)).astype(np.float32)
        plain = _median_ms(lambda: dev.classify(audio), repeat)
        dev.input_affine = {"gain": np.full(bands, 0.1, np.float32), "offset": np.full(bands, 0.1, np.float32)}
        moved = _median_ms(lambda: dev.classify(audio), repeat)
        dev.store.close()
    return {"classify_ms": plain, "classify_with_affine_ms": moved, "ratio": moved / plain}


_EXPORT = """
import json, resource, sys, time
from edge_sdk.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
t0 = time.perf_counter()
with open(sys.argv[3], "w") as f:
    if sys.argv[2] == "streamed":  # what export-data and the page do now
        for piece in store.iter_export():
            f.write(piece)
    else:  # what export-data did before: the document built in memory, then written
        f.write(json.dumps(store.export(), indent=1))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak}))
"""
_BARE = """
import json, resource, sys
from edge_sdk.store import FeedbackStore
FeedbackStore(sys.argv[1]).counts()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def export_memory(predictions: int, *, seconds_of_audio: float = 3.0) -> list[dict]:
    """Peak RSS and time of writing a store's export (a fresh process each), streamed against built in memory,
    for a store of ``predictions`` with a kept recording each ([privacy] store_audio) and one without."""
    from edge_sdk.store import FeedbackStore

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for audio in (True, False):
            db = tmp / f"store-{audio}.db"
            store = FeedbackStore(db)
            rng = np.random.default_rng(0)
            for i in range(predictions):
                store.add_prediction(prediction_id=f"{i:032x}", model_version=1, label="sad", probs=np.full(4, 0.25),
                                     embedding=rng.normal(size=128).astype(np.float32),
                                     features=rng.normal(size=(300, 40)).astype(np.float32), latency_ms=3.0,
                                     audio=rng.uniform(-0.5, 0.5, int(16000 * seconds_of_audio)) if audio else None,
                                     sample_rate=16000 if audio else None)
                if i % 2:
                    store.add_feedback(f"{i:032x}", "up")
            store.close()
            bare = json.loads(subprocess.run([sys.executable, "-c", _BARE, str(db)], cwd=REPO, check=True,
                                             capture_output=True, text=True).stdout)["peak_rss_mb"]
            for how in ("in memory", "streamed"):
                out = tmp / "export.json"
                got = json.loads(subprocess.run([sys.executable, "-c", _EXPORT, str(db), how.split()[0], str(out)],
                                                cwd=REPO, check=True, capture_output=True, text=True).stdout)
                rows.append({"predictions": predictions, "audio": audio, "how": how,
                             "store_mb": db.stat().st_size / 2**20, "export_mb": out.stat().st_size / 2**20,
                             "bare_rss_mb": bare, **got})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_edge", description=__doc__.split("\n")[0])
    parser.add_argument("--clip", type=Path, default=None, help="a ~3 s speech clip (default: a RAVDESS clip)")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench-edge.json"))
    parser.add_argument("--only", choices=("all", "personalise", "export"), default="all")
    parser.add_argument("--predictions", type=int, default=1000, help="for --only export: the store's predictions")
    parser.add_argument("--model", type=Path, default=None,
                        help="for --only personalise: a folder with model.tflite + model.json (default: bundled)")
    parser.add_argument("--train-threads", default="1",
                        help="for --only personalise: comma-separated trainer thread counts (Device train_threads), "
                             "e.g. 1,2: the default policy is timed with each, as ratios to the first")
    args = parser.parse_args(argv)
    if args.only == "export":
        rows = export_memory(args.predictions)
        print("| predictions | recordings kept | store MB | export MB | how | peak RSS MB | over opening the store | "
              "seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['predictions']} | {'yes' if r['audio'] else 'no'} | {r['store_mb']:.0f} | "
                  f"{r['export_mb']:.0f} | {r['how']} | {r['peak_rss_mb']:.0f} | "
                  f"+{r['peak_rss_mb'] - r['bare_rss_mb']:.0f} | {r['seconds']:.2f} |")
        args.out.write_text(json.dumps({"export": rows}, indent=2))
        return 0
    if args.only == "personalise":
        counts = [int(t) for t in args.train_threads.split(",")]
        times = personalisation_times(args.model, train_threads=counts[0])
        for threads in counts[1:]:  # the default policy (the affine on the bundled model) on more threads
            times += personalisation_times(args.model, train_threads=threads, policies=("default",))
        first = {row["answers"]: row["seconds"] for row in times if row["policy"] == "default"
                 and row["train_threads"] == counts[0]}
        print("| policy | answers | trainer threads | personalise s (median of 3) | against the first count | status |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in times:
            ratio = (f"{row['seconds'] / first[row['answers']]:.2f}x" if row["policy"] == "default" else "")
            print(f"| {row['policy']} | {row['answers']} | {row['train_threads']} | {row['seconds']:.3f} | {ratio} | "
                  f"{row['status']} |")
        classify = classify_times(args.model)
        print(f"classify 3 s: {classify['classify_ms']:.1f} ms; with a personal input affine "
              f"{classify['classify_with_affine_ms']:.1f} ms ({classify['ratio']:.2f}x)")
        args.out.write_text(json.dumps({"personalise": times, "classify": classify}, indent=2))
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from edge_sdk.audio import load_audio
    from edge_sdk.device import Device, TrainPolicy
    from edge_sdk.features import extract
    from edge_sdk.model import bundled_model_paths

    if bundled_model_paths() is None:
        raise SystemExit("no bundled model in edge_sdk/data")
    clip = args.clip
    if clip is None:
        from models.datasets import default_ravdess_root

        root = default_ravdess_root()
        if root is None:
            raise SystemExit("give --clip (no RAVDESS found)")
        clip = root / "Actor_01" / "03-01-05-01-01-01-01.flac"
    cores = len(os.sched_getaffinity(0))
    report = {"cores": cores, "clip": str(clip)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        y = load_audio(clip, sample_rate=16000)[: 3 * 16000]
        y = np.pad(y, (0, max(0, 3 * 16000 - len(y))))
        clip3 = tmp / "clip3.wav"
        import soundfile

        soundfile.write(clip3, y, 16000)

        # 1. process start -> first prediction (best of 3 fresh processes each)
        report["first_prediction_s"] = min(_run_time(_FIRST_EDGE, str(tmp / f"s{i}"), str(clip3)) for i in range(3))
        report["naive_first_prediction_s"] = min(_run_time(_FIRST_NAIVE, str(clip3)) for _ in range(2))

        # 2. features + inference of a 3 s utterance
        dev = Device(tmp / "dev")
        model, meta = dev.model, dev.metadata
        report["features_infer_ms"] = _median_ms(
            lambda: model.infer(extract(y, meta.features, meta.normalization)), args.repeat)
        report["features_ms"] = _median_ms(lambda: extract(y, meta.features, meta.normalization), args.repeat)
        import keras

        from edge_sdk.features import fit_frames, trim_silence
        from models.architectures import build_encoder, build_head, preset
        from models.features import librosa_features

        arch_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.extra["architecture"].items()
                    if k != "name"}
        arch = preset(meta.extra["architecture"]["name"], **arch_cfg)
        f = meta.features
        enc, head = build_encoder(arch, f.max_frames, f.n_features), build_head(arch, len(meta.labels))
        inp = keras.Input((f.max_frames, f.n_features))
        kmodel = keras.Model(inp, head(enc(inp)))

        def naive():
            x = fit_frames(meta.normalization.apply(librosa_features(trim_silence(y, f), f)), f.max_frames)
            kmodel.predict(x[None], verbose=0)

        report["naive_features_infer_ms"] = _median_ms(naive, max(10, args.repeat // 5))

        # 3. fine-tuning: 500 feedback items, 10 epochs
        rng = np.random.default_rng(0)
        labels = list(meta.labels)
        for i in range(500):
            emb = rng.normal(size=meta.embedding_dim).astype(np.float32)
            pid = f"p{i}"
            dev.store.add_prediction(prediction_id=pid, model_version=0, label=labels[i % 4], probs=np.full(4, 0.25),
                                     embedding=emb, features=None, latency_ms=1.0)
            dev.store.add_feedback(pid, ("up", "down", "label")[i % 3], labels[(i + 1) % 4])
        policy = TrainPolicy(min_examples=8, epochs=10, holdout_every=0)
        t0 = time.perf_counter()
        rep = dev.personalize(policy)
        report["finetune_500x10_s"] = time.perf_counter() - t0
        report["finetune_status"] = rep.status
        import tensorflow as tf

        emb = rng.normal(size=(500, meta.embedding_dim)).astype(np.float32)
        tgt = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 500)]
        kh = build_head(arch, 4)
        kh.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        t0 = time.perf_counter()
        kh.fit(emb, tgt, batch_size=meta.train_batch_size, epochs=10, verbose=0)
        report["naive_finetune_500x10_s"] = time.perf_counter() - t0
        del tf

        # 4. peak RSS of `fedser-edge listen` (a separate process: the device's real footprint)
        out = subprocess.run([sys.executable, "-c", _LISTEN_RSS, str(tmp / "listen"), str(clip)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        report["listen_peak_rss_mb"] = float(out.stdout.strip().splitlines()[-1].split()[-1]) / 1024
        report["listen_output"] = out.stdout.strip().splitlines()[:-1]
    r = report
    rows = [
        ("process start -> first prediction (3 s clip)", f"{r['first_prediction_s']:.2f} s", "<= 1.0 s",
         f"{r['naive_first_prediction_s']:.2f} s", r["naive_first_prediction_s"] / r["first_prediction_s"]),
        ("features + inference, 3 s utterance", f"{r['features_infer_ms']:.1f} ms", "<= 10 ms",
         f"{r['naive_features_infer_ms']:.1f} ms", r["naive_features_infer_ms"] / r["features_infer_ms"]),
        ("fine-tune 500 items x 10 epochs", f"{r['finetune_500x10_s']:.2f} s", "<= 1 s",
         f"{r['naive_finetune_500x10_s']:.2f} s", r["naive_finetune_500x10_s"] / r["finetune_500x10_s"]),
        ("peak RSS of listen", f"{r['listen_peak_rss_mb']:.0f} MB", "<= 120 MB", "", None),
    ]
    print(f"edge benchmark on {cores} core(s); Pi 4: multiply times by about 6")
    print("| measure | fedser (TFLite + numpy) | target | naive (librosa + Keras) | naive / fedser |")
    print("| --- | --- | --- | --- | --- |")
    for name, ours, target, naive, ratio in rows:
        print(f"| {name} | {ours} | {target} | {naive} | {'' if ratio is None else f'{ratio:.1f}x'} |")
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
