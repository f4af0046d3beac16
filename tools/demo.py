"""End-to-end demo on loopback: train, serve, enroll, classify, feedback, personalise, federate, pull.

    python -m tools.demo [--data RAVDESS_DIR | --synthetic] [--devices 4] [--out demo-output]

1. trains a small CNN baseline on the training speakers and exports the trainable ``.tflite``;
2. starts the aggregator (gunicorn, 2 workers) on 127.0.0.1 and publishes the base model;
3. enrolls one device per held-out speaker (speakers the baseline never heard);
4. each device classifies the first half of its speaker's clips, a simulated user answers
   (thumbs-up when right; when wrong, a corrected label or a bare thumbs-down), the head is
   fine-tuned on the device, and a signed delta is posted;
5. the round closes on the last update (FedAvg weighted by examples) and a new version is
   published under a signed manifest; every device pulls it, verifies it and re-personalises;
6. prints per-device accuracy on the second half of its clips: global model vs personalised;
7. (RAVDESS) runs the short version of the federated suite (``tools.sim_suite --short``) and prints its tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests

log = logging.getLogger("tools")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_aggregator(instance: Path, port: int, *, min_updates: int, workers: int = 2,
                     database_url: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """The aggregator as a real HTTP server in its own process group; returns once /healthz answers.

    ``env`` adds ``FEDSER_*`` settings (see ``aggregator.DEFAULTS``).
    """
    env = dict(os.environ, FEDSER_ROUND_MIN_UPDATES=str(min_updates), **(env or {}))
    cmd = [sys.executable, "-m", "aggregator.cli", "--instance", str(instance)]
    if database_url:
        cmd += ["--database-url", database_url]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    log_file = open(instance.parent / "aggregator.log", "ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"aggregator exited with {proc.returncode}; see {log_file.name}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("aggregator did not answer /healthz within 60 s")


def admin_token(instance: Path) -> str:
    return (instance / "admin_token").read_text().strip()


def answer(true_label: str, predicted: str, rng: np.random.Generator, *, down_rate: float) -> str:
    """A simulated user: thumbs-up when right; when wrong, a bare thumbs-down or the right label."""
    if predicted == true_label:
        return "up"
    return "down" if rng.random() < down_rate else true_label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="RAVDESS folder (default: ../shared/data/ravdess)")
    parser.add_argument("--synthetic", action="store_true", help="use the labelled synthetic corpus")
    parser.add_argument("--devices", type=int, default=4, help="held-out speakers, one device each")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--down-rate", type=float, default=0.3, help="share of wrong predictions answered 👎 only")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-server", action="store_true", help="leave the aggregator running at the end")
    parser.add_argument("--experiments", action=argparse.BooleanOptionalAction, default=True,
                        help="then run the short federated suite (RAVDESS only; python -m tools.sim_suite --short)")
    args = parser.parse_args(argv)
    code = _loop(args)
    if code or not args.experiments:
        return code
    from models.datasets import default_ravdess_root

    if args.data:
        os.environ["FEDSER_RAVDESS"] = str(args.data)
    if args.synthetic or default_ravdess_root() is None:
        print("the federated experiments need RAVDESS; skipped")
        return code
    print("\n[experiments] the federated suite, short version (CNN; by speaker with 24 devices, random split, one "
          "emotion per device, an attack with FedAvg and with the median; 5 rounds each; the full one is "
          "python -m tools.sim_suite). Each run prints its aggregator's dashboard URL: open it while it runs.",
          flush=True)
    from tools import sim_suite

    return sim_suite.main(["--out", str(args.out / "experiments"), "--architectures", "cnn", "--rounds", "5",
                           "--epochs", "15", "--short"])


def _loop(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    from edge_sdk.device import Device, TrainPolicy
    from edge_sdk.features import FeatureConfig
    from models.architectures import ArchitectureConfig
    from models.cli import resolve_corpus
    from models.datasets import split_by_speaker, write_manifest
    from models.train import TrainConfig, train_baseline

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    clips, corpus = resolve_corpus(args.data, args.synthetic, args.out)
    speakers = sorted({c.speaker for c in clips})
    n_dev = min(args.devices, max(1, len(speakers) - 3))
    device_spk, val_spk = speakers[-n_dev:], speakers[-n_dev - 1 : -n_dev]
    print(f"[1/6] corpus: {corpus}: {len(clips)} clips, {len(speakers)} speakers")
    print(f"      devices are held-out speakers {', '.join(device_spk)}; validation {', '.join(val_spk)}")

    train, held = split_by_speaker(clips, device_spk)
    train, val = split_by_speaker(train, val_spk)
    result = train_baseline(train, val, held, architecture=ArchitectureConfig(),
                            features=FeatureConfig(kind="logmel", speaker_norm=True),
                            config=TrainConfig(epochs=args.epochs, seed=args.seed), cache_dir=Path(".cache/features"),
                            out_dir=args.out / "model", dataset_name=corpus)
    test = result.report["test"]
    print(f"[2/6] baseline CNN trained in {result.report['train_seconds']:.1f} s "
          f"({result.report['epochs_run']} epochs); held-out speakers: accuracy {test['accuracy']:.3f}, "
          f"UAR {test['uar']:.3f}; exported {result.export.tflite_path} ({result.export.size / 1e6:.2f} MB, "
          "builtin ops only)")

    instance = args.out / "aggregator"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    # The validation gate: the validation speaker's clips, scored on the server before any round is published.
    # Written with paths relative to the CSV's own folder, the rule every manifest is read by.
    val_csv = write_manifest(args.out / "validation.csv", val).resolve()
    server = start_aggregator(instance, port, min_updates=n_dev, env={"FEDSER_VALIDATION_MANIFEST": str(val_csv)})
    try:
        auth = {"Authorization": f"Bearer {admin_token(instance)}"}
        with open(result.export.tflite_path, "rb") as t, open(result.export.metadata_path, "rb") as m:
            r = requests.post(f"{base_url}/api/v1/admin/models", headers=auth,
                              files={"tflite": t, "metadata": m}, timeout=60)
        r.raise_for_status()
        print(f"[3/6] aggregator on {base_url} (gunicorn, 2 workers); published base as version "
              f"{r.json()['version']}")
        print(f"      dashboard: {base_url}/admin#token={admin_token(instance)}  (open it while the demo runs; "
              "--keep-server leaves it up)")

        devices = {}
        for spk in device_spk:
            token = requests.post(f"{base_url}/api/v1/admin/enrollment-tokens", headers=auth, json={},
                                  timeout=10).json()["token"]
            dev = Device(args.out / "devices" / spk)
            dev.enroll(base_url, token, name=spk)
            devices[spk] = dev
        print(f"      enrolled {len(devices)} devices; each pinned the server key and verified "
              f"manifest v{next(iter(devices.values())).model_version}")

        rows = []
        for spk, dev in devices.items():
            own = [c for c in held if c.speaker == spk]
            order = rng.permutation(len(own))
            fb_clips = [own[i] for i in order[: len(own) // 2]]
            eval_clips = [own[i] for i in order[len(own) // 2 :]]
            answers = {"up": 0, "down": 0, "label": 0}
            for clip in fb_clips:
                pred = dev.classify_file(clip.path)
                a = answer(clip.label, pred.label, rng, down_rate=args.down_rate)
                dev.feedback(pred.id, a)
                answers["label" if a not in ("up", "down") else a] += 1
            global_acc = _accuracy(dev, eval_clips, personal=False)
            report = dev.personalize(TrainPolicy())
            personal_acc = _accuracy(dev, eval_clips, personal=True)
            seq = dev.make_update()
            rows.append((spk, dev, len(fb_clips), answers, global_acc, personal_acc, report, seq))
        print(f"[4/6] feedback and on-device fine-tuning (accuracy on each speaker's other "
              f"{len(eval_clips)} clips):")
        print("      device             answers (👍/👎/label)  global  personal  fine-tune")
        for spk, _dev, _n, ans, g, p, rep, _ in rows:
            print(f"      {spk:<18} {ans['up']:>3}/{ans['down']:>2}/{ans['label']:>2}               {g:6.3f}"
                  f"  {p:8.3f}  {rep.status} ({rep.examples} ex, {rep.seconds * 1000:.0f} ms)")

        closed = None
        for spk, dev, *_ in rows:
            report = dev.flush_outbox()
            for acc in report.accepted:
                if acc.get("round_closed"):
                    closed = acc
            if report.rejected or report.still_pending:
                print(f"      {spk}: rejected {report.rejected}, pending {report.still_pending}")
        posted = sum(1 for row in rows if row[-1] is not None)
        if closed is None:
            # Fewer updates than the round's K (a device whose guard discarded its fine-tuning sends
            # none): the admin closes the round, as its deadline would.
            r = requests.post(f"{base_url}/api/v1/admin/rounds/close", headers=auth, json={"min_updates": 1},
                              timeout=30)
            if r.status_code != 200:
                print(f"[5/6] no round closed: {r.json()}")
                return 1
            closed = r.json()
            how = f"closed by the admin ({posted} of {n_dev} devices sent one)"
        else:
            how = f"closed when update number {posted} arrived"
        reason = closed.get("round_rejected") or (closed.get("reason") if closed.get("rejected") else None)
        if reason:
            print(f"[5/6] {posted} signed deltas posted; round {closed['round_id']} {how}; FedAvg weighted by "
                  f"examples, but the validation gate refused the result ({reason}); the fleet stays on version 1")
            for spk, dev, *_ in rows:
                assert not dev.pull_model() and dev.model_version == 1, spk
            print("[6/6] every device asked for the manifest (conditional GET): unchanged, still version 1")
            summary = {"corpus": corpus, "base": test, "round": closed, "rejected": reason,
                       "seconds": time.perf_counter() - started}
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            print(f"done in {time.perf_counter() - started:.0f} s; details in {args.out / 'summary.json'}")
            return 0
        print(f"[5/6] {posted} signed deltas posted; round {closed['round_id']} {how}; FedAvg weighted by "
              f"examples; the validation gate passed it -> version {closed['published_version']}")

        for spk, dev, *_ in rows:
            updated = dev.pull_model()
            assert updated and dev.model_version == closed["published_version"], spk
        status = requests.get(f"{base_url}/api/v1/admin/status", headers=auth, timeout=10).json()
        after = [_accuracy(dev, [c for c in held if c.speaker == spk], personal=False)
                 for spk, dev, *_ in rows]
        print(f"[6/6] every device pulled version {closed['published_version']}, verified the server's "
              f"Ed25519 signature and both sha256s, swapped atomically and re-personalised")
        print(f"      global model v{closed['published_version']} on all held-out clips: mean accuracy "
              f"{np.mean(after):.3f} (base: {test['accuracy']:.3f})")
        print(f"      aggregator: {status['rounds_closed']} round closed, {len(status['devices'])} devices, "
              f"refusals {status['refusals'] or 'none'}")
        summary = {"corpus": corpus, "base": test, "round": closed, "devices": [
            {"speaker": spk, "feedback": n, "answers": ans, "global_acc": g, "personal_acc": p,
             "fine_tune": rep.to_dict()} for spk, _, n, ans, g, p, rep, _ in rows],
            "seconds": time.perf_counter() - started}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"done in {time.perf_counter() - started:.0f} s; details in {args.out / 'summary.json'}")
        if args.keep_server:
            print(f"aggregator still running at {base_url} (pid {server.pid})")
    finally:
        if not args.keep_server:
            server.terminate()
            server.wait(timeout=30)
    return 0


def _accuracy(dev, clips, *, personal: bool) -> float:
    """Accuracy of the device's model on clips, with the personalised or the global head (no storing).

    Inputs are computed as the device computes them (per-speaker statistics when the model uses them).
    """
    from models.evaluate import device_inputs

    model = dev.model
    saved = model.get_weights()
    if not personal:
        model.set_weights(dev.global_head)
    meta = model.metadata
    kept, inputs, _ = device_inputs(clips, meta)
    correct = sum(meta.labels[int(np.argmax(model.infer(x)[0]))] == c.label for c, x in zip(kept, inputs, strict=True))
    model.set_weights(saved)
    return correct / max(1, len(clips))


if __name__ == "__main__":
    sys.exit(main())
