"""Federated simulation with the real SDK and aggregator: N devices, each a real ``edge_sdk.Device`` (its own
key, feedback store, TFLite interpreter and outbox), talking HTTP on loopback to a real gunicorn aggregator.

    python -m tools.simulate --partition speaker --out runs/sim-speaker   # 24 devices, 20 rounds
    python -m tools.simulate --partition emotion --server-optimizer fedadam --server-lr 0.05 --out runs/sim-emo
    python -m tools.simulate --partition speaker --attack-fraction 0.1 --attack scale --aggregation median ...

What is federated: the encoder is trained centrally on *server-side* speakers (``--server-actors``: a consented
seed set; by default those actors also use the app and have a device, ``--no-server-actors-have-devices`` keeps
them off the devices) and frozen into the model; the devices personalise and federate the head from their users'
answers. Test actors (``--test-actors``) never train: their devices only personalise for themselves (their
updates are not sent), and the global model's UAR is measured on their clips after every round. The reference
is the same architecture trained centrally, encoder and head, on every training actor's clips.

Partitions of the training actors' clips: ``speaker`` (one device per actor), ``random`` (equal random shares),
``emotion`` (one emotion per device), ``dirichlet`` (class proportions ~ Dir(alpha) per device).

Simulated users answer each prediction from the true label: thumbs-up when right; when wrong, the corrected
label, or a bare thumbs-down with probability ``--down-rate``; a ``--wrong-rate`` share of answers is wrong.

Scenario ``recovery`` (``--scenario recovery``): federated recovery of a new population. The base is a model
trained on RAVDESS only (``--base-model``, default ``docs/results/cross-corpus/ravdess-only``); the devices are the
six nEMO speakers other than the named test speakers IC0, MK0, TP0 (one device each, all sending), and the global
model's UAR is measured on IC0, MK0 and TP0 after every round (they never act as devices). The reference is the
same architecture and recipe (the base model's features) trained centrally on RAVDESS and those six speakers
(``fedser-train train --corpus ravdess,nemo``), scored on IC0, MK0, TP0 through the device path.

    python -m tools.simulate --scenario recovery --answers-per-round 8 --wrong-rate 0.05 --down-rate 0.3 \
        --out runs/recovery

Writes ``<out>/report.json``, ``report.md`` and ``uar-per-round.png``; ``--resume`` continues a run from its
last completed round (devices, aggregator instance and history are kept in ``<out>``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests

log = logging.getLogger("tools")

LABELS = ("angry", "happy", "neutral", "sad")
REPO = Path(__file__).resolve().parents[1]
# The recovery scenario's base when --base-model is not given: the RAVDESS-only model of the cross-corpus study.
RECOVERY_BASE = REPO / "docs" / "results" / "cross-corpus" / "ravdess-only"
SCENARIOS = ("ravdess", "recovery")


@dataclass
class SimConfig:
    scenario: str = "ravdess"  # ravdess: the studies' set-up; recovery: a RAVDESS-only base, nEMO users as devices
    partition: str = "speaker"
    devices: int = 5  # for random and dirichlet partitions
    alpha: float = 0.5
    rounds: int = 20
    answers_per_round: int = 4
    later_fraction: float = 0.3  # of each device's clips, kept to measure personalisation
    wrong_rate: float = 0.0
    down_rate: float = 0.3
    test_actors: tuple[int, ...] = (21, 22, 23, 24)
    server_actors: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    architecture: str = "cnn"
    features: str = "logmel"
    speaker_norm: bool = True  # per-speaker feature statistics (training) and the user's running ones (device)
    utterance_norm: str = "none"  # none | mean | meanvar: each utterance's own statistics first
    epochs: int = 40
    aggregation: str = "fedavg"
    server_optimizer: str = "sgd"
    server_lr: float = 0.0  # 0: the aggregator's default for the optimizer (1.0 FedAvg/FedAvgM, 0.01 FedAdam/FedYogi)
    clip_norm: float = 0.0
    local_epochs: int = 40
    local_lr: float | None = None  # devices' SGD rate; None: the model's device_learning_rate, else 0.05
    replay_weight: float = 0.25  # the model's replay set's share of each local batch's loss (0: no replay)
    holdout_every: int = 5
    attack_fraction: float = 0.0
    attack: str = "scale"  # scale | signflip
    attack_scale: float = 20.0
    attack_examples: int = 0  # > 0: the attackers also claim this many examples (the FedAvg weight) per update
    max_update_norm: float = 1e6  # the aggregator's MAX_UPDATE_L2_NORM (its default is 100)
    max_examples_weight: float = -1.0  # the aggregator's MAX_EXAMPLES_WEIGHT (-1: its default; 0: no cap)
    max_examples_weight_over_median: float = -1.0  # ... and MAX_EXAMPLES_WEIGHT_OVER_MEDIAN (-1: its default)
    seed: int = 0
    workers: int = 2
    database_url: str | None = None
    base_model: str | None = None  # a folder with model.tflite/json/report.json to reuse instead of training
    centralised_model: str | None = None  # the same, for the centralised reference (a suite trains it once)
    server_actors_have_devices: bool = True  # the server-side actors are users too (a device each, sending)
    validation_gate: bool = False  # the aggregator refuses a round that lowers UAR on the server's validation actor

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class SimDevice:
    name: str
    speaker_group: str  # "train" (sends updates) or "test" (personalises only)
    queue: list  # clips still to be heard and answered
    later: list  # clips kept to measure personalisation
    attacker: bool = False
    device: object = None
    answered: int = 0
    queue_all: list = field(default_factory=list)


@dataclass
class Timing:
    features_infer: float = 0.0
    device_training: float = 0.0
    http: float = 0.0
    aggregation: float = 0.0
    evaluation: float = 0.0
    baseline: float = 0.0
    extra: dict = field(default_factory=dict)


def _actor(clip) -> int:
    return int(clip.speaker.rsplit("-", 1)[1])


def partition(clips, cfg: SimConfig, rng: np.random.Generator) -> dict[str, list]:
    """Device name -> its clips (training actors only)."""
    if cfg.partition == "speaker":
        out: dict[str, list] = {}
        for c in clips:  # RAVDESS: actor-07; other corpora: the speaker id (nemo-EB0)
            name = f"actor-{_actor(c):02d}" if c.speaker.startswith("ravdess-") else c.speaker
            out.setdefault(name, []).append(c)
        return out
    if cfg.partition == "emotion":
        return {f"only-{lab}": [c for c in clips if c.label == lab] for lab in LABELS}
    order = rng.permutation(len(clips))
    if cfg.partition == "random":
        return {f"random-{i}": [clips[j] for j in order[i::cfg.devices]] for i in range(cfg.devices)}
    if cfg.partition == "dirichlet":
        out = {f"dirichlet-{i}": [] for i in range(cfg.devices)}
        names = list(out)
        for lab in LABELS:
            idx = [j for j in order if clips[j].label == lab]
            share = rng.dirichlet([cfg.alpha] * cfg.devices)
            cuts = (np.cumsum(share) * len(idx)).astype(int)[:-1]
            for name, part in zip(names, np.split(np.array(idx, int), cuts), strict=True):
                out[name].extend(clips[j] for j in part)
        return {k: v for k, v in out.items() if v}
    raise SystemExit(f"unknown partition {cfg.partition!r}")


def _answer(true: str, predicted: str, cfg: SimConfig, rng: np.random.Generator) -> str:
    if rng.random() < cfg.wrong_rate:  # a careless or mistaken user
        return "down" if predicted == true else "up"
    if predicted == true:
        return "up"
    return "down" if rng.random() < cfg.down_rate else true


def _embeddings(model, meta, clips) -> tuple[np.ndarray, np.ndarray]:
    from models.evaluate import device_inputs

    kept, inputs, _ = device_inputs(clips, meta)
    return np.stack([model.infer(x)[1] for x in inputs]), np.array([LABELS.index(c.label) for c in kept])


def _uar(model, head, emb, y) -> dict:
    from models.metrics import classification_report

    saved = model.get_weights()
    model.set_weights(head)
    pred = np.argmax(model.head_probs(emb), axis=1)
    model.set_weights(saved)
    r = classification_report(y, pred, LABELS)
    return {"uar": r["uar"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
            "f1": {lab: r["per_class"][lab]["f1"] for lab in LABELS}, "confusion_matrix": r["confusion_matrix"]}


class Simulation:
    def __init__(self, cfg: SimConfig, out: Path, *, resume: bool = False) -> None:
        self.cfg, self.out = cfg, out
        self.timing = Timing()
        self.history: list[dict] = []
        self.state_path = out / "state.json"
        if resume and self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            self.history = state["history"]
            self.timing = Timing(**state["timing"])
            saved = SimConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
            was, now = saved.to_dict(), cfg.to_dict()
            differ = [k for k in was if k != "rounds" and was[k] != now.get(k)]
            if differ:
                raise SystemExit("--resume with different parameters than the run in " + str(out) + ": "
                                 + "; ".join(f"{k} was {was[k]!r}, now {now.get(k)!r} (--{k.replace('_', '-')})"
                                             for k in differ) + " (only --rounds may change)")
        elif out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng([cfg.seed, len(self.history)])

    # -- set-up -----------------------------------------------------------------------------------
    def baseline(self, clips):
        """The encoder (and a starting head) from the server-side actors; exported once, reused on resume. In the
        recovery scenario: the given RAVDESS-only model (``--base-model``, default ``RECOVERY_BASE``)."""
        if self.cfg.scenario == "recovery":
            given = Path(self.cfg.base_model or RECOVERY_BASE)
            if not (given / "model.tflite").is_file() or not (given / "model.json").is_file():
                raise SystemExit(f"the recovery scenario's base model is missing: {given}/model.tflite and "
                                 "model.json (give --base-model DIR)")
            return self._train("base-model", str(given), [], [], "baseline")
        server = [c for c in clips if _actor(c) in self.cfg.server_actors]
        return self._train("base-model", self.cfg.base_model, server, [], "baseline")

    def centralised_model(self, clips):
        """The reference: the same architecture trained centrally, encoder and head, on every training actor's
        clips (server-side actors and all device actors, their later clips too), with the same validation actor;
        scored on the test actors. Returns its folder (``report.json`` holds the test metrics)."""
        if self.cfg.scenario == "recovery":
            return self._recovery_reference()
        train = [c for c in clips if _actor(c) not in self.cfg.test_actors]
        test = [c for c in clips if _actor(c) in self.cfg.test_actors]
        return self._train("centralised-model", self.cfg.centralised_model, train, test, "centralised")

    def _recovery_reference(self) -> Path:
        """The recovery scenario's reference: the base model's architecture and feature recipe trained centrally
        (``fedser-train train``, the bundled model's recipe) on RAVDESS (1-18 train, 19-20 validate) and the six
        non-test nEMO speakers (one, drawn with the seed, validates); the named test speakers never train."""
        from edge_sdk.model import ModelMetadata
        from models.cli import main as train_cli
        from models.datasets import default_nemo_root, default_ravdess_root

        model_dir = self.out / "centralised-model"
        if (model_dir / "model.tflite").exists():
            return model_dir
        if self.cfg.centralised_model:
            shutil.copytree(self.cfg.centralised_model, model_dir)
            return model_dir
        meta = ModelMetadata.load(self.out / "base-model" / "model.json")
        f = meta.features
        roots = {"ravdess": default_ravdess_root(), "nemo": default_nemo_root()}
        if None in roots.values():
            raise SystemExit("the recovery reference needs RAVDESS and nEMO ($FEDSER_RAVDESS, $FEDSER_NEMO)")
        arch = (meta.extra.get("architecture") or {})
        args = ["train", "--out", str(model_dir), "--corpus", "ravdess,nemo",
                "--data", ",".join(f"{k}={v}" for k, v in roots.items()), "--features", f.kind,
                "--utterance-norm", f.utterance_norm, "--max-frames", str(f.max_frames),
                "--speaker-norm" if f.speaker_norm else "--no-speaker-norm", "--architecture", meta.architecture,
                "--epochs", str(self.cfg.epochs), "--patience", "15", "--seed", str(self.cfg.seed), "--no-progress"]
        if arch.get("masked_pooling"):
            args.append("--masked-pooling")
        started = time.perf_counter()
        if train_cli(args) != 0:
            raise SystemExit("training the centralised reference failed")
        self.timing.extra["centralised"] = time.perf_counter() - started
        return model_dir

    def _train(self, name: str, reuse: str | None, clips, test, timing_key: str) -> Path:
        from edge_sdk.features import FeatureConfig
        from models.architectures import preset
        from models.datasets import split_by_speaker
        from models.train import TrainConfig, train_baseline

        model_dir = self.out / name
        if (model_dir / "model.tflite").exists():
            return model_dir
        if reuse:
            shutil.copytree(reuse, model_dir)
            return model_dir
        spk = sorted({c.speaker for c in clips})
        val_speaker = f"ravdess-{max(self.cfg.server_actors):02d}"  # the server's validation actor, in both
        fit, val = split_by_speaker(clips, [val_speaker])
        started = time.perf_counter()
        train_baseline(fit, val, test,
                       features=FeatureConfig(kind=self.cfg.features, speaker_norm=self.cfg.speaker_norm,
                                              utterance_norm=self.cfg.utterance_norm),
                       architecture=preset(self.cfg.architecture),
                       config=TrainConfig(epochs=self.cfg.epochs, seed=self.cfg.seed),
                       cache_dir=Path(".cache/features"), out_dir=model_dir,
                       dataset_name=f"RAVDESS {timing_key} actors " + ",".join(s.rsplit("-", 1)[1] for s in spk),
                       progress=False)
        self.timing.extra[timing_key] = time.perf_counter() - started
        if timing_key == "baseline":
            self.timing.baseline = self.timing.extra.pop(timing_key)
        return model_dir

    def run(self) -> dict:
        from tqdm.auto import tqdm

        from edge_sdk.device import Device, TrainPolicy
        from edge_sdk.model import ModelMetadata, TFLiteModel
        from models.datasets import corpus_guidance, default_ravdess_root, ravdess_clips, write_manifest
        from tools.demo import admin_token, dashboard_link, free_port, start_aggregator

        cfg = self.cfg
        if cfg.scenario not in SCENARIOS:
            raise SystemExit(f"unknown scenario {cfg.scenario!r}; choose from {', '.join(SCENARIOS)}")
        if cfg.scenario == "recovery":
            if cfg.validation_gate:
                raise SystemExit("--validation-gate validates on a RAVDESS actor: not available with --scenario "
                                 "recovery")
            clips, test_clips, train_clips = recovery_clips()
        else:
            root = default_ravdess_root()
            if root is None:
                raise SystemExit("the simulation needs RAVDESS (--data, $FEDSER_RAVDESS or ../shared/data/ravdess)"
                                 "\n" + corpus_guidance(["ravdess"]))
            clips = ravdess_clips(root)
            test_clips = [c for c in clips if _actor(c) in cfg.test_actors]
            excluded = cfg.test_actors + (() if cfg.server_actors_have_devices else cfg.server_actors)
            train_clips = [c for c in clips if _actor(c) not in excluded]
        model_dir = self.baseline(clips)
        meta = ModelMetadata.load(model_dir / "model.json")
        evaluator = TFLiteModel(model_dir / "model.tflite", meta)
        base_head = evaluator.get_weights()
        started = time.perf_counter()
        test_emb, test_y = _embeddings(evaluator, meta, test_clips)
        self.timing.evaluation += time.perf_counter() - started

        part_rng = np.random.default_rng(cfg.seed)
        parts = partition(train_clips, cfg, part_rng)
        if cfg.scenario == "ravdess":
            for c in test_clips:  # the test actors' devices: personalise, never send
                parts.setdefault(f"test-actor-{_actor(c):02d}", []).append(c)
        test_speakers = sorted({c.speaker for c in test_clips})
        on_devices = {c.speaker for name, p in parts.items() if not name.startswith("test-") for c in p}
        if set(test_speakers) & on_devices:  # never: a test speaker's clips on a sending device
            raise RuntimeError(f"test speakers on sending devices: {sorted(set(test_speakers) & on_devices)}")
        sims = []
        n_attack = int(round(cfg.attack_fraction * sum(1 for n in parts if not n.startswith("test-"))))
        train_names = [n for n in sorted(parts) if not n.startswith("test-")]
        attackers = set(part_rng.choice(train_names, size=n_attack, replace=False)) if n_attack else set()
        for name in sorted(parts):
            order = part_rng.permutation(len(parts[name]))
            shuffled = [parts[name][i] for i in order]
            n_later = int(round(cfg.later_fraction * len(shuffled)))
            sims.append(SimDevice(name, "test" if name.startswith("test-") else "train", shuffled[n_later:],
                                  shuffled[:n_later], attacker=name in attackers))
            sims[-1].queue_all = list(shuffled[n_later:])
        senders = [s for s in sims if s.speaker_group == "train"]

        instance = self.out / "aggregator" / "instance"
        instance.mkdir(parents=True, exist_ok=True)
        env = {"FEDSER_AGGREGATION": cfg.aggregation, "FEDSER_SERVER_OPTIMIZER": cfg.server_optimizer,
               "FEDSER_CLIP_NORM": str(cfg.clip_norm),
               "FEDSER_MAX_UPDATE_L2_NORM": str(cfg.max_update_norm), "FEDSER_RATE_LIMIT_PER_HOUR": "0",
               "FEDSER_LOG_JSON": "0"}
        if cfg.server_lr > 0:
            env["FEDSER_SERVER_LR"] = str(cfg.server_lr)
        for key, value in (("MAX_EXAMPLES_WEIGHT", cfg.max_examples_weight),
                           ("MAX_EXAMPLES_WEIGHT_OVER_MEDIAN", cfg.max_examples_weight_over_median)):
            if value >= 0:
                env[f"FEDSER_{key}"] = str(value)
        if cfg.validation_gate:  # the server's own validation actor's clips (never a test actor)
            val_actor = max(cfg.server_actors)
            val_csv = write_manifest(self.out / "validation.csv", [c for c in clips if _actor(c) == val_actor])
            env["FEDSER_VALIDATION_MANIFEST"] = str(val_csv.resolve())
        port = free_port()
        server = start_aggregator(instance, port, min_updates=max(1, len(senders)), workers=cfg.workers,
                                  database_url=cfg.database_url, env=env)
        base_url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {admin_token(instance)}"}
        print(f"aggregator {dashboard_link(base_url, instance)}", flush=True)
        try:
            if not self.history:
                with open(model_dir / "model.tflite", "rb") as t, open(model_dir / "model.json", "rb") as m:
                    requests.post(f"{base_url}/api/v1/admin/models", headers=auth,
                                  files={"tflite": t, "metadata": m}, timeout=120).raise_for_status()
                self.history.append({"round": 0, "version": 1, "global": _uar(evaluator, base_head, test_emb, test_y),
                                     "updates": 0})
            policy = TrainPolicy(min_examples=4, epochs=cfg.local_epochs, learning_rate=cfg.local_lr,
                                 holdout_every=cfg.holdout_every, seed=cfg.seed, replay_weight=cfg.replay_weight)
            for s in sims:
                state = self.out / "devices" / s.name
                s.device = Device(state, train_policy=policy, use_bundled_model=False)
                if not s.device.enrolled:
                    token = requests.post(f"{base_url}/api/v1/admin/enrollment-tokens", headers=auth, json={},
                                          timeout=30).json()["token"]
                    s.device.enroll(base_url, token, name=s.name)
                else:  # resumed: the aggregator came back on another port
                    s.device.set_server_url(base_url)
                    s.device.pull_model()
                s.answered = s.device.store.counts()["feedback"]
                s.queue = s.queue[s.answered:]
            start_round = len(self.history)
            bar = tqdm(range(start_round, cfg.rounds + 1), desc=f"{cfg.partition} rounds", unit="round",
                       file=sys.stderr, disable=not sys.stderr.isatty())
            for rnd in bar:
                self._round(rnd, sims, senders, base_url, auth, evaluator, test_emb, test_y)
                bar.set_postfix(uar=f"{self.history[-1]['global']['uar']:.3f}")
                self.state_path.write_text(json.dumps({"config": cfg.to_dict(), "history": self.history,
                                                       "timing": asdict(self.timing)}, default=str))
            personal = self._personalisation(sims)
        finally:
            server.terminate()
            server.wait(timeout=30)
        central = self._centralised_head(evaluator, [c for s in senders for c in s.queue_all],
                                         base_head, test_emb, test_y)
        central_dir = self.centralised_model(clips)
        if cfg.scenario == "recovery":  # scored on the test speakers only, through the device path
            centralised = self._scored(central_dir, test_clips)
        else:
            central_report = json.loads((central_dir / "report.json").read_text())["test"]
            centralised = {"uar": central_report["uar"], "accuracy": central_report["accuracy"],
                           "macro_f1": central_report["macro_f1"],
                           "f1": {lab: central_report["per_class"][lab]["f1"] for lab in LABELS},
                           "dataset": json.loads((central_dir / "report.json").read_text())["dataset"]}
        report = {"config": cfg.to_dict(), "history": self.history, "final": self.history[-1]["global"],
                  "centralised_head": central, "centralised": centralised,
                  "best_round": max(self.history, key=lambda h: h["global"]["uar"])["round"],
                  "personalisation": personal, "timing": asdict(self.timing),
                  "devices": {"senders": len(senders), "test": len(sims) - len(senders),
                              "attackers": sorted(attackers)},
                  "sending_devices": sorted(s.name for s in senders), "device_speakers": sorted(on_devices),
                  "test_speakers": test_speakers,
                  "test_clips": len(test_y), "base_model": _dataset(model_dir),
                  # what the devices train and send: the head's arrays (with the encoder's embedding layer when the
                  # base was exported with trainable_embedding), and the bytes of one update's deltas
                  "head_layout": meta.head_layout.to_json(), "update_bytes": meta.head_layout.nbytes,
                  "trainable_embedding": bool(meta.extra.get("trainable_embedding"))}
        write_report(report, self.out)
        return report

    def _round(self, rnd, sims, senders, base_url, auth, evaluator, test_emb, test_y) -> None:
        from edge_sdk.wire import UpdateEnvelope

        cfg = self.cfg
        posted = 0
        for s in sims:
            dev = s.device
            t0 = time.perf_counter()
            batch, s.queue = s.queue[: cfg.answers_per_round], s.queue[cfg.answers_per_round:]
            for clip in batch:
                pred = dev.classify_file(clip.path)
                dev.feedback(pred.id, _answer(clip.label, pred.label, cfg, self.rng))
                s.answered += 1
            t1 = time.perf_counter()
            self.timing.features_infer += t1 - t0
            dev.personalize()
            t2 = time.perf_counter()
            self.timing.device_training += t2 - t1
            if s.speaker_group != "train":
                continue
            seq = dev.make_update()
            if seq is not None and s.attacker:  # replace the honest update by a scaled or sign-flipped one
                item = next(i for i in dev.store.outbox_items() if i.seq == seq)
                honest, _ = UpdateEnvelope.from_bytes(item.envelope)
                factor = -1.0 if cfg.attack == "signflip" else cfg.attack_scale
                env = UpdateEnvelope.create(device_id=dev.device_id, base_version=honest.header.base_version,
                                            layout=dev.metadata.head_layout,
                                            deltas={n: (factor * d).astype(np.float32)
                                                    for n, d in honest.deltas().items()},
                                            num_examples=cfg.attack_examples or honest.header.num_examples,
                                            sequence=seq, sign=dev.key.sign)
                try:
                    reply = dev.client.post_update(env.to_bytes())
                    dev.store.mark_done(seq, "accepted", reply)
                    posted += 1
                except Exception as exc:  # a refused attack is the defence working
                    dev.store.mark_done(seq, "rejected", {"detail": str(exc)})
                    log.info("attack from %s refused: %s", s.name, exc)
            elif seq is not None:
                posted += len(dev.flush_outbox().accepted)
            self.timing.http += time.perf_counter() - t2
        t3 = time.perf_counter()
        status = requests.get(f"{base_url}/api/v1/admin/status", headers=auth, timeout=30).json()
        if status["open_round"] and status["open_round"]["updates"] > 0:
            requests.post(f"{base_url}/api/v1/admin/rounds/close", headers=auth, json={"min_updates": 1},
                          timeout=300)
        self.timing.aggregation += time.perf_counter() - t3
        t4 = time.perf_counter()
        for s in sims:
            s.device.pull_model()
        self.timing.http += time.perf_counter() - t4
        t5 = time.perf_counter()
        head = sims[0].device.global_head
        glob = _uar(evaluator, head, test_emb, test_y)
        self.timing.evaluation += time.perf_counter() - t5
        version = sims[0].device.model_version
        refused = bool(posted) and version == self.history[-1]["version"]  # the validation gate said no
        self.history.append({"round": rnd, "version": version, "global": glob, "updates": posted,
                             "refused": refused})
        log.info("round %d: %d updates, global UAR %.3f", rnd, posted, glob["uar"])

    def _scored(self, model_dir: Path, clips) -> dict:
        """A whole model (its own encoder and head) scored on ``clips`` through the device path."""
        from edge_sdk.model import ModelMetadata, TFLiteModel

        started = time.perf_counter()
        meta = ModelMetadata.load(model_dir / "model.json")
        model = TFLiteModel(model_dir / "model.tflite", meta)
        emb, y = _embeddings(model, meta, clips)
        out = {**_uar(model, model.get_weights(), emb, y), "dataset": _dataset(model_dir)}
        if (model_dir / "report.json").is_file():
            split = json.loads((model_dir / "report.json").read_text()).get("split") or {}
            out["split"] = {k: split[k] for k in ("train_speakers", "val_speakers") if k in split}
        self.timing.evaluation += time.perf_counter() - started
        return out

    def _centralised_head(self, evaluator, clips, base_head, test_emb, test_y) -> dict:
        """The reference: the same frozen encoder, its head trained centrally on every sending device's clips
        (true labels, class-balanced, the model's own ``train`` signature, 30 epochs at the devices' rate)."""
        from edge_sdk.device import TrainPolicy, class_balance_weights

        if not clips:
            return {}
        started = time.perf_counter()
        emb, y = _embeddings(evaluator, evaluator.metadata, clips)
        lr = TrainPolicy(learning_rate=self.cfg.local_lr).sgd_learning_rate(evaluator.metadata)
        targets = np.eye(len(LABELS), dtype=np.float32)[y]
        weight = class_balance_weights(targets)
        evaluator.set_weights(base_head)
        rng = np.random.default_rng(self.cfg.seed)
        batch = evaluator.metadata.train_batch_size
        for _ in range(30):
            order = rng.permutation(len(y))
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                evaluator.train_step(emb[idx], targets[idx], np.ones(len(idx), np.float32), weight[idx],
                                     learning_rate=lr)
        head = evaluator.get_weights()
        evaluator.set_weights(base_head)
        out = _uar(evaluator, head, test_emb, test_y)
        self.timing.evaluation += time.perf_counter() - started
        return out

    def _personalisation(self, sims) -> dict:
        """Each device's accuracy on its later clips, heard the way a user goes on talking: the device classifies
        them (its running speaker statistics go on updating), and the embedding the head saw is scored with the
        personalised head and with the global head it started from."""
        gains = []
        per_device = []
        for s in sims:
            if not s.later:
                continue
            dev = s.device
            labels = list(dev.metadata.labels)
            emb = np.stack([dev.classify_file(c.path).embedding for c in s.later])
            y = np.array([labels.index(c.label) for c in s.later])
            personal = float(np.mean(np.argmax(dev.model.head_probs(emb), axis=1) == y))
            saved = dev.model.get_weights()
            dev.model.set_weights(dev.global_head)
            glob = float(np.mean(np.argmax(dev.model.head_probs(emb), axis=1) == y))
            dev.model.set_weights(saved)
            per_device.append({"device": s.name, "group": s.speaker_group, "answers": s.answered,
                               "global_acc": glob, "personal_acc": personal, "personalized": dev.personalized})
            gains.append(personal - glob)
        test = [d for d in per_device if d["group"] == "test"]
        return {"per_device": per_device,
                "mean_gain": float(np.mean(gains)) if gains else None,
                "test_speakers_mean_gain": float(np.mean([d["personal_acc"] - d["global_acc"] for d in test]))
                if test else None,
                "test_speakers_global": float(np.mean([d["global_acc"] for d in test])) if test else None,
                "test_speakers_personal": float(np.mean([d["personal_acc"] for d in test])) if test else None}


def recovery_clips() -> tuple[list, list, list]:
    """(all nEMO clips, the named test speakers' clips, the other speakers' clips: the devices')."""
    from models.cli import CORPUS_TEST_SPEAKERS
    from models.datasets import corpus_guidance, default_nemo_root, nemo_clips

    root = default_nemo_root()
    if root is None:
        raise SystemExit("the recovery scenario needs nEMO ($FEDSER_NEMO or ../shared/data/nemo)\n"
                         + corpus_guidance(["nemo"]))
    clips = nemo_clips(root)
    test = {f"nemo-{s}" for s in CORPUS_TEST_SPEAKERS["nemo"]}
    test_clips = [c for c in clips if c.speaker in test]
    train_clips = [c for c in clips if c.speaker not in test]
    if not test_clips or not train_clips:
        raise SystemExit(f"nEMO at {root} needs the test speakers {sorted(test)} and at least one other speaker")
    return clips, test_clips, train_clips


def ceilings(model_dir: Path, train_clips, test_clips, *, epochs: int = 30, lr: float | None = None,
             adapter_lr: float = 0.05, seed: int = 0) -> dict:
    """What federating a part of the model could reach at best: that part trained centrally (true labels,
    class-balanced, the model's own ``train`` / ``adapter_train`` signatures, plain SGD) on ``train_clips``, the
    rest frozen, scored on ``test_clips`` after every 5 epochs. ``head``: the head on the frozen encoder's
    embeddings. ``head+adapter`` (models with the adapter signatures): the head and one shared per-channel
    scale and shift of the encoder's last block, trained together."""
    from edge_sdk.device import TrainPolicy, class_balance_weights
    from edge_sdk.model import ModelMetadata, TFLiteModel
    from models.evaluate import device_inputs

    meta = ModelMetadata.load(model_dir / "model.json")
    model = TFLiteModel(model_dir / "model.tflite", meta)
    lr = TrainPolicy(learning_rate=lr).sgd_learning_rate(meta)  # None: the devices' rate (the model's, else 0.05)
    base = model.get_weights()
    kept, inputs, _ = device_inputs(train_clips, meta)
    y = np.array([LABELS.index(c.label) for c in kept])
    tkept, tinputs, _ = device_inputs(test_clips, meta)
    ty = np.array([LABELS.index(c.label) for c in tkept])
    targets = np.eye(len(LABELS), dtype=np.float32)[y]
    weight = class_balance_weights(targets)
    batch = meta.train_batch_size

    def scored(pred) -> float:
        from models.metrics import classification_report

        return float(classification_report(ty, pred, LABELS)["uar"])

    out: dict = {"train_clips": len(y), "test_clips": len(ty), "epochs": epochs, "lr": lr}
    parts = ["head"] + (["head+adapter"] if model.has_adapter else [])
    for part in parts:
        rng = np.random.default_rng(seed)
        model.set_weights(base)
        if part == "head":
            x = np.stack([model.infer(v)[1] for v in inputs])
            tx = np.stack([model.infer(v)[1] for v in tinputs])
        else:
            model.set_adapter(None)
            x = np.stack([model.frames(v) for v in inputs])
            tx = np.stack([model.frames(v) for v in tinputs])
        curve = []
        for epoch in range(1, epochs + 1):
            order = rng.permutation(len(y))
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                if part == "head":
                    model.train_step(x[idx], targets[idx], np.ones(len(idx), np.float32), weight[idx],
                                     learning_rate=lr)
                else:
                    model.adapter_train_step(x[idx], targets[idx], np.ones(len(idx), np.float32), weight[idx],
                                             learning_rate=lr, adapter_learning_rate=adapter_lr)
            if epoch % 5 == 0 or epoch == epochs:
                probs = model.head_probs(tx) if part == "head" else model.adapted(tx)[0]
                curve.append((epoch, scored(np.argmax(probs, axis=1))))
        out[part] = {"final": curve[-1][1], "best": max(u for _, u in curve), "curve": curve}
    model.set_weights(base)
    return out


def _dataset(model_dir: Path) -> str:
    """What a model was trained on: its report.json, else its metadata."""
    report = model_dir / "report.json"
    if report.is_file():
        return json.loads(report.read_text())["dataset"]
    return json.loads((model_dir / "model.json").read_text()).get("extra", {}).get("dataset", str(model_dir))


def write_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = report["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([x["round"] for x in h], [x["global"]["uar"] for x in h], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("global UAR on held-out actors")
    ax.set_title(("recovery (nEMO users), " if report["config"].get("scenario") == "recovery" else "")
                 + f"{report['config']['partition']} partition, {report['config']['aggregation']} / "
                 f"{report['config']['server_optimizer']}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "uar-per-round.png")
    plt.close(fig)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    cfg, fin, p, t = report["config"], report["final"], report["personalisation"], report["timing"]
    recovery = cfg.get("scenario") == "recovery"
    title = ("Federated recovery of a new population: RAVDESS-only base, nEMO users as devices" if recovery
             else f"Federated simulation: {cfg['partition']} partition")
    lines = [f"# {title}", "",
             f"- devices: {report['devices']['senders']} sending, {report['devices']['test']} test-actor devices "
             f"(personalise only); attackers: {report['devices']['attackers'] or 'none'}",
             f"- encoder: trained centrally on {report['base_model']}; heads federated",
             (f"- test speakers (never train, never a device): {', '.join(report['test_speakers'])}; devices: "
              f"{', '.join(report['device_speakers'])}" if recovery else f"- test actors (never train): "
                                                                       f"{cfg['test_actors']}"),
             f"- aggregation {cfg['aggregation']}, server optimizer {cfg['server_optimizer']} "
             f"(lr {cfg['server_lr'] or 'default'}), "
             f"{cfg['rounds']} rounds, {cfg['answers_per_round']} answers per device per round, "
             f"down-rate {cfg['down_rate']}, wrong-rate {cfg['wrong_rate']}", "",
             f"**Final global model on held-out actors: UAR {fin['uar']:.3f}, accuracy {fin['accuracy']:.3f}, "
             f"macro-F1 {fin['macro_f1']:.3f}** (round 0, the base: UAR {report['history'][0]['global']['uar']:.3f}; "
             f"centralised head on the same encoder and clips: UAR "
             f"{report['centralised_head'].get('uar', float('nan')):.3f}; centralised training of the whole model "
             f"on every training actor: UAR {report['centralised']['uar']:.3f})",
             "", "| round | version | updates | UAR | accuracy | macro-F1 |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['round']} | {x['version']} | {x['updates']} | {x['global']['uar']:.3f} | "
              f"{x['global']['accuracy']:.3f} | {x['global']['macro_f1']:.3f} |" for x in h]
    if p["test_speakers_global"] is not None:
        lines += ["", "Personalisation on the test actors' own later clips: global "
                      f"{p['test_speakers_global']:.3f} -> personal {p['test_speakers_personal']:.3f} "
                      f"(mean gain {100 * p['test_speakers_mean_gain']:+.1f} points)"]
    lines += ["", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if isinstance(v, float))]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def option_type(name: str, of: type | None = None) -> type:
    """The type a command-line value of the field ``name`` of the dataclass ``of`` (default SimConfig) converts to:
    its annotation, with ``X | None`` taken as ``X`` (``local_lr``: a number, or unset for the model's device rate;
    the personalisation study's TrainPolicy fields too)."""
    hint = typing.get_type_hints(of or SimConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if isinstance(hint, types.UnionType) and len(args) == 1 else hint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.simulate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SimConfig()
    for name, value in defaults.to_dict().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            parser.add_argument(flag, default=",".join(map(str, value)))
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=option_type(name), default=value)
    parser.add_argument("--out", type=Path, default=Path("runs/simulation"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    values = {}
    for name, value in defaults.to_dict().items():
        got = getattr(args, name)
        values[name] = tuple(int(x) for x in got.split(",") if x) if isinstance(value, list) else got
    cfg = SimConfig(**values)
    started = time.perf_counter()
    report = Simulation(cfg, args.out, resume=args.resume).run()
    print((args.out / "report.md").read_text())
    print(f"done in {time.perf_counter() - started:.0f} s; report in {args.out}")
    return 0 if report else 1


if __name__ == "__main__":
    sys.exit(main())
