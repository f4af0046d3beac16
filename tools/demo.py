"""End-to-end demo on loopback: a model meets people it was not trained on, and federation and personalisation
recover it for them, with the real SDK and a real aggregator.

    python -m tools.demo [--nemo DIR | --no-nemo] [--data RAVDESS_DIR | --synthetic] [--rounds 5] [--out demo-output]

Which story runs depends on the corpora found (``--nemo``/``$FEDSER_NEMO``/``../shared/data/nemo``, and
``--data``/``$FEDSER_RAVDESS``/``../shared/data/ravdess``; a variable set to a folder that does not exist counts as
"not there", with no fallback to ``../shared``):

**nEMO found** (the product's story): the base is the RAVDESS-only model (English actors;
``docs/results/cross-corpus/ravdess-only``, trained with the same recipe when that file is missing and RAVDESS is
there); the devices are nEMO speakers (Polish) other than the test speakers IC0, MK0 and TP0, who never act as
devices, never gate a round and never train.

1. loads nEMO, splits each device speaker's clips into a gate slice, an evaluation slice and the clips its user
   will answer;
2. scores the base on the held-out new users IC0/MK0/TP0 (global UAR) and, with RAVDESS, on RAVDESS actors 21-24;
3. starts the aggregator (gunicorn, 2 workers) on 127.0.0.1 with the validation gate on the device speakers' gate
   slices (with RAVDESS also on RAVDESS validation actors 19-20, judged as their own group, so that a round that
   helps the new population and costs the base's own people more than the margin and one standard error of
   their figure is refused), publishes the base
   and enrolls one device per speaker;
4. runs several federated rounds: each device classifies new clips of its speaker, a simulated user answers
   (thumbs-up when right; when wrong the right label or a bare thumbs-down; a few answers mistaken), the head is
   fine-tuned on the device, a signed delta is posted; the round closes (FedAvg), the gate judges it, every device
   pulls the new version; prints the held-out users' UAR and the gate's figures of each group after every round;
5. prints the held-out new users' global UAR before and after the rounds;
6. prints each device's accuracy on clips it never answered: the base before any answer, the final global model,
   and its personalised head after its answers, beside the answer mix it received.

**RAVDESS only**: the in-corpus story (``_loop``): a small CNN trained on RAVDESS training speakers, one device per
held-out actor, one round. ``--experiments`` then runs the short federated suite (RAVDESS needed; off by default:
3 to 10 minutes on 2 cores). **No corpus**: the same loop on a labelled synthetic tone corpus, which says so; its
figures only show that the pipeline runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

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


def dashboard_link(base_url: str, instance: Path) -> str:
    """The admin console's link with the token in its fragment, percent-encoded (the page decodes it)."""
    return f"{base_url}/admin#token={quote(admin_token(instance), safe='')}"


@contextmanager
def _aggregator(args: argparse.Namespace, instance: Path, *, min_updates: int, validation: Path, tflite: Path,
                metadata: Path, timeout: float) -> Iterator[tuple[str, dict, int]]:
    """A gunicorn aggregator on a free loopback port, gated by the manifest ``validation``, with ``tflite`` and
    ``metadata`` published as its first version: yields its URL, the admin's headers and that version. It is stopped
    on leaving, unless ``--keep-server`` (then a demo that ran to the end prints where it still runs)."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = start_aggregator(instance, port, min_updates=min_updates,
                              env={"FEDSER_VALIDATION_MANIFEST": str(validation)})
    try:
        auth = {"Authorization": f"Bearer {admin_token(instance)}"}
        with open(tflite, "rb") as t, open(metadata, "rb") as m:
            r = requests.post(f"{base_url}/api/v1/admin/models", headers=auth, files={"tflite": t, "metadata": m},
                              timeout=timeout)
        r.raise_for_status()
        yield base_url, auth, r.json()["version"]
        if args.keep_server:
            print(f"aggregator still running at {base_url} (pid {server.pid})")
    finally:
        if not args.keep_server:
            server.terminate()
            server.wait(timeout=30)


def _write_summary(out: Path, summary: dict, started: float) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done in {time.perf_counter() - started:.0f} s; details in {out / 'summary.json'}")


def answer(true_label: str, predicted: str, rng: np.random.Generator, *, down_rate: float) -> str:
    """A simulated user: thumbs-up when right; when wrong, a bare thumbs-down or the right label."""
    if predicted == true_label:
        return "up"
    return "down" if rng.random() < down_rate else true_label


REPO = Path(__file__).resolve().parents[1]
RAVDESS_ONLY_MODEL = REPO / "docs" / "results" / "cross-corpus" / "ravdess-only"
NEMO_TEST_SPEAKERS = ("nemo-IC0", "nemo-MK0", "nemo-TP0")  # never devices, never gate, never train
RAVDESS_TEST_SPEAKERS = ("ravdess-21", "ravdess-22", "ravdess-23", "ravdess-24")
# The base's validation actors: people like its training speakers who never trained it (its recipe chose its epoch
# on them). With RAVDESS, the nEMO story's gate judges every round on them too, as their own group.
RAVDESS_GATE_SPEAKERS = ("ravdess-19", "ravdess-20")


def corpus_root(kind: str, given: str | None, *, off: bool = False) -> tuple[Path | None, str]:
    """(folder, how it was found or why there is none) for ``ravdess`` or ``nemo``.

    ``given`` (a flag) wins; else ``$FEDSER_RAVDESS`` / ``$FEDSER_NEMO``, and a variable set to a folder that does
    not exist means "not there" (``models.datasets``' default-root lookup would go on to ``../shared/data``);
    else that lookup (``../shared/data/<kind>`` beside the checkout).
    """
    from models.datasets import default_corpus_root

    variable = f"FEDSER_{kind.upper()}"
    if off:
        return None, "turned off for this run"
    if given:
        path = Path(given)
        if not path.is_dir():
            raise SystemExit(f"{kind} folder not found: {given}")
        return path, "given"
    env = os.environ.get(variable)
    if env and not Path(env).is_dir():
        return None, f"{variable}={env} is not a folder"
    root = default_corpus_root(kind)
    if root is None:
        return None, f"not found (no {variable}, no ../shared/data/{kind} beside the checkout)"
    return root, f"${variable}" if env else "../shared/data beside the checkout"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None,
                        help="RAVDESS folder (default: $FEDSER_RAVDESS, ../shared/data/ravdess)")
    parser.add_argument("--nemo", default=None, help="nEMO folder (default: $FEDSER_NEMO, ../shared/data/nemo)")
    parser.add_argument("--no-nemo", action="store_true", help="tell the RAVDESS story even when nEMO is there")
    parser.add_argument("--synthetic", action="store_true", help="use the labelled synthetic corpus (no real corpus)")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices (nEMO: up to the 6 non-test speakers, default all; else held-out speakers, "
                             "default 4)")
    parser.add_argument("--base-model", type=Path, default=RAVDESS_ONLY_MODEL,
                        help="nEMO story: folder with the RAVDESS-only model.tflite and model.json")
    parser.add_argument("--rounds", type=int, default=5, help="nEMO story: federated rounds")
    parser.add_argument("--answers-per-round", type=int, default=20, help="nEMO story: answers per device and round")
    parser.add_argument("--eval-clips", type=int, default=40,
                        help="nEMO story: clips per device speaker kept for its personal accuracy (never answered)")
    parser.add_argument("--gate-clips", type=int, default=10,
                        help="nEMO story: clips per device speaker in the server's validation set (never answered)")
    parser.add_argument("--wrong-rate", type=float, default=0.05,
                        help="nEMO story: share of answers the simulated user gets wrong")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--down-rate", type=float, default=0.3, help="share of wrong predictions answered 👎 only")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-server", action="store_true", help="leave the aggregator running at the end")
    parser.add_argument("--experiments", action=argparse.BooleanOptionalAction, default=False,
                        help="then run the short federated suite (needs RAVDESS; python -m tools.sim_suite --short; "
                             "3 to 10 minutes on 2 cores, so off by default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    ravdess, ravdess_how = corpus_root("ravdess", args.data, off=args.synthetic)
    nemo, nemo_how = corpus_root("nemo", args.nemo, off=args.synthetic or args.no_nemo)
    base_there = (args.base_model / "model.tflite").is_file() and (args.base_model / "model.json").is_file()
    print(f"[corpora] nEMO: {nemo or nemo_how}; RAVDESS: {ravdess or ravdess_how}", flush=True)
    if nemo is not None and (base_there or ravdess is not None):
        code = new_population(args, nemo, ravdess)
    else:
        if nemo is not None:
            print(f"[corpora] nEMO is there but the RAVDESS-only base is not ({args.base_model}) and there is no "
                  "RAVDESS to train it: the new-population story is skipped")
        elif ravdess is not None and not args.synthetic:
            print("[corpora] without nEMO the demo tells the in-corpus story: devices are held-out RAVDESS actors "
                  "(people like the training speakers), not a new population")
        if ravdess is None:
            if not args.synthetic and nemo is None:  # nothing found (rather than asked for): where corpora come from
                from models.datasets import corpus_guidance

                print(corpus_guidance(), file=sys.stderr, flush=True)
            print(f"[corpora] {'no corpus' if nemo is None else 'no RAVDESS'}: this run uses SYNTHETIC tones; its "
                  "figures show that every part runs end to end and say nothing about recognising emotions or about "
                  "people unlike the training set", flush=True)
            args.synthetic = True
        else:
            args.data = str(ravdess)
        if args.devices is None:
            args.devices = 4
        code = _loop(args)
    if code:
        return code
    if not args.experiments:
        print("[experiments] the short federated suite is off by default (3 to 10 minutes on 2 cores): "
              + ("--experiments runs it after the demo" if ravdess else "it needs RAVDESS"))
        return code
    if ravdess is None:
        print("the federated experiments need RAVDESS; skipped")
        return code
    os.environ["FEDSER_RAVDESS"] = str(ravdess)
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
    # The validation gate: the validation speaker's clips, scored on the server before any round is published.
    # Written with paths relative to the CSV's own folder, the rule every manifest is read by.
    val_csv = write_manifest(args.out / "validation.csv", val).resolve()
    with _aggregator(args, instance, min_updates=n_dev, validation=val_csv, tflite=result.export.tflite_path,
                     metadata=result.export.metadata_path, timeout=60) as (base_url, auth, version):
        print(f"[3/6] aggregator on {base_url} (gunicorn, 2 workers); published base as version {version}")
        print(f"      dashboard: {dashboard_link(base_url, instance)}  (open it while the demo runs; "
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
            _write_summary(args.out, summary, started)
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
        _write_summary(args.out, summary, started)
    return 0


def _answer_mixed(true_label: str, predicted: str, rng: np.random.Generator, *, down_rate: float,
                  wrong_rate: float) -> tuple[str, bool]:
    """(answer, mistaken): :func:`answer`, except that a share ``wrong_rate`` of answers are mistaken (a thumbs-down
    for a right prediction, a thumbs-up for a wrong one)."""
    if rng.random() < wrong_rate:
        return ("down" if predicted == true_label else "up"), True
    return answer(true_label, predicted, rng, down_rate=down_rate), False


def _embed(model, clips) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(embeddings, label indices, speakers) of ``clips`` as a device computes them (its reader, numpy features,
    each speaker normalised by its own statistics), through the model's frozen encoder."""
    from models.evaluate import device_inputs

    labels = list(model.metadata.labels)
    kept, inputs, _ = device_inputs(clips, model.metadata)
    if not kept:
        return np.zeros((0, 0), np.float32), np.zeros(0, int), []
    return (np.stack([model.infer(x)[1] for x in inputs]), np.array([labels.index(c.label) for c in kept]),
            [c.speaker for c in kept])


def _score(model, head, emb, y) -> dict:
    """UAR, accuracy and per-class recall of ``head`` on embeddings (the encoder is frozen across versions)."""
    from models.metrics import classification_report

    labels = list(model.metadata.labels)
    if len(y) == 0:
        return {"uar": float("nan"), "accuracy": float("nan"), "recall": {}, "n": 0}
    saved = model.get_weights()
    model.set_weights(head)
    pred = np.argmax(model.head_probs(emb), axis=1)
    model.set_weights(saved)
    r = classification_report(y, pred, labels)
    return {"uar": r["uar"], "accuracy": r["accuracy"], "n": int(len(y)),
            "recall": {lab: r["per_class"][lab]["recall"] for lab in labels if r["per_class"][lab]["support"]}}


def _per_speaker_uar(model, head, emb, y, speakers) -> dict[str, float]:
    spk = np.array(speakers)
    return {s: _score(model, head, emb[spk == s], y[spk == s])["uar"] for s in sorted(set(speakers))}


def _base_model(args, ravdess: Path | None) -> tuple[Path, Path, str]:
    """(tflite, json, what it is): the RAVDESS-only model at ``--base-model``, else trained with its recipe."""
    tflite, meta = args.base_model / "model.tflite", args.base_model / "model.json"
    if tflite.is_file() and meta.is_file():
        try:
            shown = args.base_model.resolve().relative_to(REPO)
        except ValueError:
            shown = args.base_model
        return tflite, meta, f"the RAVDESS-only model ({shown})"
    out = args.out / "ravdess-only"
    # docs/results/cross-corpus/ravdess-only/report.md: the RAVDESS-only model's recipe, exported with the deep head
    cmd = [sys.executable, "-m", "models.cli", "train", "--out", str(out), "--corpus", "ravdess", "--data",
           str(ravdess), "--features", "logmel", "--utterance-norm", "level", "--speaker-reference", "neutral",
           "--val-speakers", "19,20", "--trainable-embedding", "--seed", "0", "--no-progress"]
    print(f"      {args.base_model} is missing: training the RAVDESS-only recipe (about 1-2 minutes): "
          f"{' '.join(cmd[2:])}", flush=True)
    with open(args.out / "ravdess-only.log", "wb") as log_file:
        subprocess.run(cmd, check=True, stdout=log_file, stderr=subprocess.STDOUT)
    return out / "model.tflite", out / "model.json", f"the RAVDESS-only recipe, trained now ({out})"


def new_population(args: argparse.Namespace, nemo: Path, ravdess: Path | None) -> int:
    """The product's story: a RAVDESS-only base meets Polish speakers; rounds of federation and personalisation."""
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    from edge_sdk.device import Device
    from edge_sdk.model import ModelMetadata, TFLiteModel
    from models.datasets import nemo_clips, ravdess_clips, write_manifest

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    clips = nemo_clips(nemo)
    speakers = sorted({c.speaker for c in clips})
    test = [c for c in clips if c.speaker in NEMO_TEST_SPEAKERS]
    device_spk = [s for s in speakers if s not in NEMO_TEST_SPEAKERS][: args.devices or None]
    if not test or not device_spk:
        raise SystemExit(f"nEMO at {nemo} needs the test speakers IC0, MK0, TP0 and at least one other speaker "
                         f"(found {', '.join(speakers)})")
    short = lambda s: s.split("-", 1)[1]  # noqa: E731
    print(f"[1/6] nEMO ({nemo}): {len(clips)} clips of Polish acted speech, {len(speakers)} speakers")
    print(f"      devices: {', '.join(map(short, device_spk))}, one each (a new population: the base never heard "
          "Polish)")
    print(f"      held-out new users: {', '.join(map(short, sorted({c.speaker for c in test})))} ({len(test)} clips); "
          "they never act as devices, never gate a round, never train")

    # Each device speaker's clips, shuffled once: a gate slice (the server's validation set), an evaluation slice
    # (its personal accuracy), and the clips its user answers, round after round. None is in two parts.
    parts = {}
    for spk in device_spk:
        own = [c for c in clips if c.speaker == spk]
        own = [own[i] for i in rng.permutation(len(own))]
        n_gate = min(args.gate_clips, len(own) // 5)
        n_eval = min(args.eval_clips, len(own) // 3)
        parts[spk] = {"gate": own[:n_gate], "eval": own[n_gate:n_gate + n_eval], "pool": own[n_gate + n_eval:]}
    gate = [c for p in parts.values() for c in p["gate"]]

    tflite, meta_path, base_name = _base_model(args, ravdess)
    meta = ModelMetadata.load(meta_path)
    evaluator = TFLiteModel(tflite, meta)
    base_head = evaluator.get_weights()
    test_emb, test_y, test_spk = _embed(evaluator, test)
    before = _score(evaluator, base_head, test_emb, test_y)
    before_spk = _per_speaker_uar(evaluator, base_head, test_emb, test_y, test_spk)
    rav_all = ravdess_clips(ravdess) if ravdess else []
    in_domain = [c for c in rav_all if c.speaker in RAVDESS_TEST_SPEAKERS]
    rav_gate = [c for c in rav_all if c.speaker in RAVDESS_GATE_SPEAKERS]  # never 21-24, never a training actor
    rav_emb, rav_y, _ = _embed(evaluator, in_domain) if in_domain else (None, np.zeros(0, int), [])
    rav_before = _score(evaluator, base_head, rav_emb, rav_y) if in_domain else None
    print(f"[2/6] base: {base_name}: CNN on log-mel features, trained on RAVDESS actors 1-18 (English)")
    print(f"      held-out new users {'/'.join(short(s) for s in before_spk)}: UAR {before['uar']:.3f} (chance 0.25; "
          f"per speaker {', '.join(f'{v:.2f}' for v in before_spk.values())}); recall "
          + ", ".join(f"{k} {v:.2f}" for k, v in before["recall"].items()))
    if rav_before:
        print(f"      RAVDESS actors 21-24 (people like its training speakers): UAR {rav_before['uar']:.3f}")

    instance = args.out / "aggregator"
    # The validation gate judges every round on the device speakers' gate slices: the population being served,
    # clips no device answers or is scored on, and never IC0/MK0/TP0; with RAVDESS also on its validation actors
    # 19-20. Speaker ids carry their corpus (nemo-EB0, ravdess-19), which makes each corpus a group of the gate.
    val_csv = write_manifest(args.out / "validation.csv", gate + rav_gate).resolve()
    rows, history, answers_total = {}, [], 0
    with _aggregator(args, instance, min_updates=len(device_spk), validation=val_csv, tflite=tflite,
                     metadata=meta_path, timeout=120) as (base_url, auth, version):
        print(f"[3/6] aggregator on {base_url} (gunicorn, 2 workers); published the base as version {version}")
        margin = os.environ.get('FEDSER_VALIDATION_MARGIN', '0.02')
        print(f"      validation gate: {len(gate)} clips, {len(gate) // len(device_spk)} held back from each device "
              "speaker (never answered, never scored)"
              + (f", and {len(rav_gate)} clips of RAVDESS validation actors 19-20 (people like the base's training "
                 "speakers, who never trained it), each corpus a group; a round whose UAR drops more than "
                 f"{margin} on all of them, or on either group by more than {margin} and one standard error of "
                 "that group's figure, is refused" if rav_gate else
                 f"; a round whose UAR on them drops more than {margin} is refused"))
        print(f"      dashboard: {dashboard_link(base_url, instance)}  (--keep-server leaves it up)")
        devices = {}
        for spk in device_spk:
            token = requests.post(f"{base_url}/api/v1/admin/enrollment-tokens", headers=auth, json={},
                                  timeout=10).json()["token"]
            devices[spk] = Device(args.out / "devices" / short(spk), use_bundled_model=False)
            devices[spk].enroll(base_url, token, name=short(spk))
            rows[spk] = {"up": 0, "label": 0, "down": 0, "mistaken": 0, "answered": 0}
        print(f"      enrolled {len(devices)} devices; each pinned the server key and verified manifest "
              f"v{next(iter(devices.values())).model_version}")

        print(f"[4/6] {args.rounds} rounds; in each, every device classifies {args.answers_per_round} new clips of "
              "its speaker, its user answers, the head is fine-tuned on the device and a signed delta is posted")
        print("      round  updates  gate (validation UAR)           version  held-out new users' UAR"
              + ("  gate by group (UAR)" if rav_gate else ""))
        history.append({"round": 0, "version": 1, "uar": before["uar"]})
        for rnd in range(1, args.rounds + 1):
            closed, posted = None, 0
            for spk, dev in devices.items():
                batch = parts[spk]["pool"][(rnd - 1) * args.answers_per_round: rnd * args.answers_per_round]
                for clip in batch:
                    pred = dev.classify_file(clip.path)
                    a, mistaken = _answer_mixed(clip.label, pred.label, rng, down_rate=args.down_rate,
                                                wrong_rate=args.wrong_rate)
                    dev.feedback(pred.id, a)
                    rows[spk]["label" if a not in ("up", "down") else a] += 1
                    rows[spk]["mistaken"] += mistaken
                    rows[spk]["answered"] += 1
                    answers_total += 1
                dev.personalize()
                if dev.make_update() is None:
                    continue
                report = dev.flush_outbox()
                posted += len(report.accepted)
                closed = next((a for a in report.accepted if a.get("round_closed")), closed)
            status = requests.get(f"{base_url}/api/v1/admin/status", headers=auth, timeout=30).json()
            if closed is None and status["open_round"] and status["open_round"]["updates"]:
                # fewer updates than devices (one had nothing new to send): the admin closes, as a deadline would
                closed = requests.post(f"{base_url}/api/v1/admin/rounds/close", headers=auth,
                                       json={"min_updates": 1}, timeout=120).json()
                status = requests.get(f"{base_url}/api/v1/admin/status", headers=auth, timeout=30).json()
            for dev in devices.values():
                dev.pull_model()  # re-personalises on a new version
            version = next(iter(devices.values())).model_version
            head = next(iter(devices.values())).global_head
            glob = _score(evaluator, head, test_emb, test_y)
            last = next((r for r in status["rounds"] if closed and r["id"] == closed.get("round_id")), None)
            gate_text, groups = "no round closed", {}
            if last is not None and last["status"] == "rejected":
                refused = next((r for r in requests.get(f"{base_url}/api/v1/admin/console", headers=auth,
                                                        timeout=30).json()["refused_rounds"]
                                if r["id"] == last["id"]), {})
                was, now = refused.get("current_uar"), refused.get("candidate_uar")
                figures = re.findall(r"\d\.\d{3}", last.get("note") or "")
                gate_text = (f"refused ({was:.3f} -> {now:.3f})" if was is not None and now is not None else
                             f"refused ({' -> '.join(figures[:2]) or (last.get('note') or '')[:24]})")
                groups = {g["group"]: {"current": {"uar": g["current_uar"]}, "candidate": {"uar": g["candidate_uar"]},
                                       "examples": g["examples"], "gates": g["gates"], "dropped": g["dropped"]}
                          for g in refused.get("groups") or []}
            elif last is not None:
                verdict = (status.get("current_metrics") or {}).get("validation") or {}
                now, was = (verdict.get("candidate") or {}).get("uar"), (verdict.get("current") or {}).get("uar")
                gate_text = f"passed ({was:.3f} -> {now:.3f})" if now is not None and was is not None else "passed"
                groups = verdict.get("groups") or {}
            history.append({"round": rnd, "version": version, "updates": posted, "uar": glob["uar"],
                            "recall": glob["recall"], "gate": gate_text, "gate_groups": groups})
            print(f"      {rnd:>5}  {posted:>7}  {gate_text:<31} v{version:<7} {glob['uar']:.3f}"
                  + (f"                    {_group_figures(groups)}" if groups else ""), flush=True)

        final_head = next(iter(devices.values())).global_head
        after = _score(evaluator, final_head, test_emb, test_y)
        after_spk = _per_speaker_uar(evaluator, final_head, test_emb, test_y, test_spk)
        final_version = next(iter(devices.values())).model_version
        print(f"[5/6] held-out new users {'/'.join(short(s) for s in after_spk)} ({after['n']} clips), global "
              f"model: UAR {before['uar']:.3f} (base, v1) -> {after['uar']:.3f} (v{final_version}), "
              f"{100 * (after['uar'] - before['uar']):+.1f} points")
        print("      per speaker: " + ", ".join(f"{short(s)} {before_spk[s]:.2f} -> {after_spk[s]:.2f}"
                                                for s in after_spk)
              + "; recall " + ", ".join(f"{k} {before['recall'].get(k, 0):.2f} -> {v:.2f}"
                                         for k, v in after["recall"].items()))
        rav_after = _score(evaluator, final_head, rav_emb, rav_y) if in_domain else None
        if rav_after:
            print(f"      RAVDESS actors 21-24 (the base's own population): UAR {rav_before['uar']:.3f} -> "
                  f"{rav_after['uar']:.3f}")

        n_eval = min(len(p["eval"]) for p in parts.values())
        print(f"[6/6] each device on {n_eval} clips of its speaker it never answered: the base before any answer, "
              f"the final global model v{final_version}, and its personalised head")
        print("      device  answers  👍 / label / 👎 (mistaken)   base    global   personal")
        devices_out = []
        for spk, dev in devices.items():
            # The clips as this device hears them now (its user's running statistics), scored with each head.
            labels = list(dev.metadata.labels)
            emb = np.stack([dev.classify_file(c.path).embedding for c in parts[spk]["eval"]])
            y = np.array([labels.index(c.label) for c in parts[spk]["eval"]])
            personal_head = dev.model.get_weights()  # the personal head when one is kept, else the global one
            acc = {name: _score(evaluator, h, emb, y)["accuracy"] for name, h in
                   (("base", base_head), ("global", dev.global_head), ("personal", personal_head))}
            a = rows[spk]
            print(f"      {short(spk):<7} {a['answered']:>7}  {a['up']:>3} / {a['label']:>5} / {a['down']:>2} "
                  f"({a['mistaken']:>2})        {acc['base']:.3f}   {acc['global']:.3f}    {acc['personal']:.3f}"
                  f"{'' if dev.personalized else '  (guard kept the global head)'}")
            devices_out.append({"speaker": spk, "answers": a, "eval_clips": int(len(y)), **acc,
                                "personalized": dev.personalized})
        mean = {k: float(np.mean([d[k] for d in devices_out])) for k in ("base", "global", "personal")}
        print(f"      mean    {'':>7}  {'':>29}{mean['base']:.3f}   {mean['global']:.3f}    {mean['personal']:.3f}")
        print(_honest_note(args, before, after, before_spk, after_spk, (rav_before, rav_after) if rav_before else None,
                           devices_out, n_eval, answers_total, len(rav_gate)))
        summary = {"story": "new population (nEMO devices, RAVDESS-only base)", "base": str(tflite),
                   "devices": devices_out, "held_out": {"before": before, "after": after,
                                                        "per_speaker_before": before_spk,
                                                        "per_speaker_after": after_spk},
                   "ravdess_21_24": {"before": rav_before, "after": rav_after} if rav_before else None,
                   "rounds": history, "validation_set": str(val_csv), "seconds": time.perf_counter() - started,
                   "clips": {spk: {"gate": [Path(c.path).name for c in p["gate"]],
                                   "eval": [Path(c.path).name for c in p["eval"]],
                                   "answered": [Path(c.path).name for c in p["pool"][:rows[spk]["answered"]]]}
                             for spk, p in parts.items()},
                   "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        _write_summary(args.out, summary, started)
    return 0


def _group_figures(groups: dict) -> str:
    """The gate's figures of each validation group on one line: ``nemo 0.434 -> 0.454, ravdess 0.705 -> 0.690``."""
    def one(name: str, g: dict) -> str:
        was, now = (g.get("current") or {}).get("uar"), (g.get("candidate") or {}).get("uar")
        text = f"{name} {was:.3f} -> {now:.3f}" if was is not None and now is not None else f"{name} ?"
        return text + (" (dropped)" if g.get("dropped") else "" if g.get("gates", True) else
                       f" ({g.get('examples')} clips: does not gate)")

    return ", ".join(one(name, g) for name, g in sorted(groups.items()))


def _honest_note(args, before, after, before_spk, after_spk, rav, devices, n_eval, answers, rav_gate: int = 0) -> str:
    """What the figures above mean, and how far to trust them, in words."""
    import textwrap

    moved = [100 * (after_spk[s] - before_spk[s]) for s in after_spk]
    better = sum(d["personal"] > d["global"] for d in devices)
    worse = sum(d["personal"] < d["global"] for d in devices)
    kept = sum(d["personalized"] for d in devices)
    p = float(np.mean([d["personal"] for d in devices]))
    se = 100 * np.sqrt(p * (1 - p) / max(1, n_eval))
    paragraphs = [
        f"What these numbers are: one run (seed {args.seed}, one answer order) with simulated users: thumbs-up when "
        f"the model is right; when it is wrong the right label, or with probability {args.down_rate:.0%} a bare "
        f"thumbs-down; {args.wrong_rate:.0%} of answers mistaken. {answers} answers in all, over {args.rounds} rounds.",
        f"Held-out new users: {after['n']} clips of {len(after_spk)} speakers who never took part; per speaker the "
        f"global UAR moved {min(moved):+.1f} to {max(moved):+.1f} points. With three speakers that is an indication, "
        "not a measurement with a standard error: the federated recovery study (docs/results/federated-recovery, "
        "python -m tools.sim_suite --scenario recovery) runs 20 rounds over seeds, beside a centralised reference.",
    ]
    if rav is not None:
        paragraphs.append(
            f"RAVDESS actors 21-24 ({rav[1]['n']} clips): {rav[0]['uar']:.3f} -> {rav[1]['uar']:.3f}"
            + (" (the rounds cost the base's own population). " if rav[1]["uar"] < rav[0]["uar"] else ". ")
            + (f"The gate also judges every round on RAVDESS validation actors 19-20 ({rav_gate} clips) as a group of "
               "their own: a round that costs them more than the margin and one standard error of their figure "
               "is refused, whatever it does for the new "
               "population (actors 21-24 are never in the gate)." if rav_gate else
               "The gate judges rounds on the new population only, so nothing here protects the population the base "
               "was trained on."))
    paragraphs.append(
        f"Devices: {n_eval} clips each (one clip is {100 / max(1, n_eval):.1f} points; the standard error of one "
        f"device's accuracy is about {se:.0f} points). 'base' is the model before any answer; 'global' the final "
        "shared model, which learned from these same devices' answers (so it is not a held-out figure for them); "
        "'personal' what the device serves. "
        + (f"The on-device guard kept a personal head on {kept} of {len(devices)} devices; it beat the global model "
           f"on {better} and fell below it on {worse} of them: the guard judges by cross-validation on the user's own "
           "answers, bare thumbs-down and mistaken ones included, and that does not always carry over to new clips."
           if kept else "The on-device guard kept no personal head: every device serves the global model (its "
           "cross-validation on the user's answers did not show a fit better by about a standard error)."))
    return "\n".join(textwrap.fill(p, 116, initial_indent="      ", subsequent_indent="      ") for p in paragraphs)


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
