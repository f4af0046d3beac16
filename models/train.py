"""Baseline training: encoder + head on a speaker-independent split, then export.

Uses a GPU when TensorFlow sees one (with mixed precision there), the CPU
otherwise; seeded; keeps the epoch with the best validation UAR (validation
speakers are held out of training as well; with several corpora, the mean of
their UARs, and every (corpus, class) pair weighs the same in the loss); shows
a progress bar on a terminal.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_sdk.errors import ParameterError
from edge_sdk.features import FeatureConfig
from edge_sdk.model import MAX_INPUT_AFFINE_FROM, ModelMetadata
from models.architectures import ArchitectureConfig, build_encoder, build_head
from models.datasets import FOUR_CLASSES, Clip, corpus_of, per_class_sample
from models.export import ExportResult, export_tflite, head_layout, save_trained
from models.features import (
    NEUTRAL_REFERENCES,
    SPEAKER_REFERENCES,
    Augmentation,
    FeatureSet,
    augment_inputs,
    compute_features,
)
from models.metrics import by_corpus, classification_report

log = logging.getLogger("models")

__all__ = ["TrainConfig", "TrainResult", "check_device_options", "train_baseline"]


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    patience: int = 8
    train_batch_size: int = 16  # the static batch of the exported `train` signature
    mixed_precision: str = "auto"  # "auto": on a GPU only; "on"; "off"
    augmentation: Augmentation = Augmentation()
    spec_augment: int = 0  # time masks and frequency masks per training example (SpecAugment); 0: off
    mixup: float = 0.0  # Beta(alpha, alpha) mixup of training pairs; 0: off
    label_smoothing: float = 0.0
    swa_epochs: int = 0  # > 0: train all epochs and keep the average weights of the last N (no early stopping)
    replay_per_class: int = 32  # training embeddings per class shipped in the model for the device's replay; 0: none
    # "all": a training or validation speaker's normalisation statistics come from all of that speaker's clips;
    # "neutral": from that speaker's neutral clips (and the reference clips given to train_baseline, e.g.
    # RAVDESS calm) only; "balanced": from all their clips, every class weighing the same (RAVDESS has half as
    # many neutral clips as of each other class); "neutral-mean": the mean of "neutral", the spread of "all" (the
    # scale a device sees). Test clips and the device always use all of a speaker's clips.
    speaker_reference: str = "all"
    # feature-space augmentation of the normalised training inputs, redrawn every epoch
    # (models.features.augment_inputs); 0: off
    freq_warp: float = 0.0  # mel axis read at f * a, a in [1 - w, 1 + w] (vocal-tract-length-like)
    time_stretch: float = 0.0  # frame axis read at t * r, r in [1 - s, 1 + s] (tempo)
    spectral_tilt: float = 0.0  # + g * (a ramp from -1 at the lowest band to +1 at the highest), g in [-t, t]
    offset_shrink: float = 0.0  # the example's mean frame times a, a in [1 - o, 1] (a weaker expression)
    spread_shrink: float = 0.0  # each band's std over time s -> 1 + b * (s - 1), b in [1 - p, 1]
    # with speaker_reference other than "all": every epoch each training example's input is
    # lam * (normalised by the reference) + (1 - lam) * (normalised by all the speaker's clips, as at test time),
    # lam uniform in [1 - reference_blend, 1]; 0: the reference only
    reference_blend: float = 0.0
    # "constant"; "cosine": the learning rate follows a half cosine from learning_rate to 0 over `epochs`
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        def whole(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low
                    or (high is not None and value > high)):
                raise ValueError(f"{name} must be an integer >= {low}" + (f" and <= {high}" if high is not None
                                                                           else "") + f", got {value!r}")

        whole("epochs", 1, 100000)
        whole("batch_size", 1, 65536)
        whole("train_batch_size", 1, 4096)
        whole("patience", 0)
        whole("spec_augment", 0, 64)
        whole("replay_per_class", 0, 100000)
        whole("swa_epochs", 0, self.epochs)
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not (np.isfinite(self.mixup) and self.mixup >= 0):
            raise ValueError(f"mixup must be a finite number >= 0, got {self.mixup}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixed_precision not in ("auto", "on", "off"):
            raise ValueError(f"mixed_precision must be auto, on or off, got {self.mixed_precision!r}")
        if self.speaker_reference not in SPEAKER_REFERENCES:
            raise ValueError(f"speaker_reference must be one of {SPEAKER_REFERENCES}, got {self.speaker_reference!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.reference_blend <= 1.0:
            raise ValueError(f"reference_blend must be in [0, 1], got {self.reference_blend}")
        if not (0.0 <= self.freq_warp < 1.0 and 0.0 <= self.time_stretch < 1.0
                and 0.0 <= self.spectral_tilt < float("inf")):
            raise ValueError("freq_warp and time_stretch must be in [0, 1), spectral_tilt a finite number >= 0; got "
                             f"{self.freq_warp}, {self.time_stretch}, {self.spectral_tilt}")
        if not (0.0 <= self.offset_shrink <= 1.0 and 0.0 <= self.spread_shrink <= 1.0):
            raise ValueError(f"offset_shrink and spread_shrink must be in [0, 1], got {self.offset_shrink} and "
                             f"{self.spread_shrink}")

    @property
    def feature_augmented(self) -> bool:
        return bool(self.freq_warp or self.time_stretch or self.spectral_tilt or self.offset_shrink
                    or self.spread_shrink or (self.reference_blend and self.speaker_reference != "all"))

    def learning_rate_at(self, epoch: int) -> float:
        """The learning rate of (0-based) ``epoch``."""
        if self.lr_schedule == "cosine":
            return float(self.learning_rate * 0.5 * (1.0 + np.cos(np.pi * epoch / max(1, self.epochs))))
        return float(self.learning_rate)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "augmentation"},
                "augmentation": self.augmentation.to_dict()}


@dataclass
class TrainResult:
    encoder: object
    head: object
    metadata: ModelMetadata
    report: dict
    head_weights: dict = field(default_factory=dict)
    export: ExportResult | None = None
    history: list = field(default_factory=list)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _has_tensorflow() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("tensorflow") is not None  # None also when sys.modules blocks it (None)
    except ValueError:  # a module object without __spec__
        return False


def _exports_here() -> bool:
    """Whether this process can export TFLite: the models are TensorFlow's (Keras backend tensorflow). A model
    built on another backend cannot be traced by tf.function, even with TensorFlow installed."""
    import keras

    return keras.backend.backend() == "tensorflow" and _has_tensorflow()


def _accelerators() -> list[str]:
    """The GPUs Keras's backend trains on (empty: the CPU). TensorFlow is the default backend; JAX and PyTorch
    (``KERAS_BACKEND=jax``, tested; ``torch``, untested) train the same models where TensorFlow has no GPU build,
    e.g. a CUDA 13 host."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        names = []
        for g in tf.config.list_physical_devices("GPU"):
            try:
                names.append(tf.config.experimental.get_device_details(g).get("device_name", g.name))
            except Exception:  # details are best effort
                names.append(g.name)
        return names
    if backend == "jax":
        import jax

        return [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def _hardware() -> dict:
    import importlib.metadata

    import keras

    backend = keras.backend.backend()
    gpus = _accelerators()
    package = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend, backend)
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # e.g. tensorflow-cpu
        version = getattr(__import__(package), "__version__", "?")
    framework = (f"TensorFlow {version}" if backend == "tensorflow"
                 else f"Keras {keras.__version__} on {backend} {version}")
    out = {"device": "GPU" if gpus else "CPU", "gpus": gpus, "cpu": _cpu_name(),
           "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "backend": backend, "framework": framework}
    if backend == "tensorflow":
        out["tensorflow"] = version
    return out


def _batches(x: np.ndarray, y: np.ndarray, sample_w: np.ndarray, num_classes: int, config: TrainConfig,
             spectral: int | None = None):
    """A shuffled tf.data pipeline of (features, one-hot targets, class-balancing weights), with optional
    SpecAugment masks (masked values become 0, the training mean) and mixup. ``spectral``: frequency masks fall in
    the first ``spectral`` columns only (the bands, not the pitch columns after them); None: any."""
    import tensorflow as tf

    onehot = np.eye(num_classes, dtype=np.float32)[y]
    ds = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), onehot, sample_w.astype(np.float32)))
    ds = ds.shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True)
    frames, feats = x.shape[1], (x.shape[2] if spectral is None else spectral)
    width = x.shape[2]

    def spec_augment(xb, yb, wb):
        for _ in range(config.spec_augment):
            t = tf.random.uniform([], 0, max(1, frames // 10), tf.int32)
            t0 = tf.random.uniform([], 0, frames - t + 1, tf.int32)
            f = tf.random.uniform([], 0, max(1, feats // 8), tf.int32)
            f0 = tf.random.uniform([], 0, feats - f + 1, tf.int32)
            tmask = tf.logical_or(tf.range(frames) < t0, tf.range(frames) >= t0 + t)
            fmask = tf.logical_or(tf.range(width) < f0, tf.range(width) >= f0 + f)
            xb = xb * tf.cast(tmask, xb.dtype)[:, None] * tf.cast(fmask, xb.dtype)[None, :]
        return xb, yb, wb

    if config.spec_augment:
        ds = ds.map(spec_augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(config.batch_size)
    if config.mixup > 0:
        alpha = float(config.mixup)

        def mixup(xb, yb, wb):
            n = tf.shape(xb)[0]
            g1 = tf.random.gamma([n], alpha)
            g2 = tf.random.gamma([n], alpha)
            lam = g1 / (g1 + g2)
            perm = tf.random.shuffle(tf.range(n))
            xl, yl = lam[:, None, None], lam[:, None]
            return (xl * xb + (1 - xl) * tf.gather(xb, perm), yl * yb + (1 - yl) * tf.gather(yb, perm),
                    lam * wb + (1 - lam) * tf.gather(wb, perm))

        ds = ds.map(mixup, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(2)


def check_device_options(name: str, masked_pooling: bool = False, *, input_affine_from=None,
                         trainable_embedding: bool = False) -> None:
    """The export options devices rely on, against the encoder ``name`` (with ``masked_pooling`` or not): a
    ValueError naming what does not fit. :func:`train_baseline` checks them; ``fedser-train train`` too, before it
    reads the corpus."""
    if input_affine_from is not None and (isinstance(input_affine_from, bool) or not isinstance(input_affine_from, int)
                                          or not 0 <= input_affine_from <= MAX_INPUT_AFFINE_FROM):
        raise ValueError(f"input_affine_from must be an integer in 0..{MAX_INPUT_AFFINE_FROM}, "
                         f"got {input_affine_from!r}")
    if input_affine_from and (name != "cnn" or masked_pooling):
        raise ValueError(f"input_affine_from needs a cnn encoder without masked pooling (the input_grad signature), "
                         f"not {name!r}{' with masked pooling' if masked_pooling else ''}")
    if trainable_embedding and name not in ("cnn", "dnn"):
        raise ValueError(f"trainable_embedding needs a cnn or dnn encoder (a ReLU embedding layer), not {name}")


def train_baseline(
    train_clips: Sequence[Clip],
    val_clips: Sequence[Clip],
    test_clips: Sequence[Clip] = (),
    *,
    features: FeatureConfig = FeatureConfig(),
    architecture: ArchitectureConfig = ArchitectureConfig(),
    config: TrainConfig = TrainConfig(),
    labels: Sequence[str] = FOUR_CLASSES,
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    dataset_name: str = "",
    label_map: dict | None = None,
    verbose: int = 0,
    progress: bool | None = None,
    reference_clips: Sequence[Clip] = (),
    trainable_embedding: bool = False,
    device_learning_rate: float | None = None,
    precomputed: tuple[dict, FeatureConfig] | None = None,
    input_affine_from: int | None = None,
) -> TrainResult:
    """Train, evaluate on ``test_clips`` (speakers never seen in training), export to ``out_dir``.

    ``val_clips`` pick the best epoch; their speakers must not be in ``train_clips``. With no validation clips
    (a refit on every non-test speaker once the recipe and its epoch count are chosen) the model trains exactly
    ``config.epochs`` epochs and keeps the last weights (with ``config.swa_epochs``: their average, as always);
    the report's validation figures are then None.
    ``progress`` shows a bar on stderr (default: when stderr is a terminal).
    ``reference_clips`` (with ``config.speaker_reference`` "neutral" or "neutral-mean") add to their speaker's
    normalisation statistics only (never trained on or scored); those of speakers outside training and validation
    are ignored.
    ``trainable_embedding`` (cnn, dnn): the exported file's trainable head includes the encoder's embedding layer
    (``models.export.export_tflite``).
    ``device_learning_rate``: the SGD rate the metadata tells devices to use for federated updates (default: 0.01
    with ``trainable_embedding``, none otherwise: the device's own default, 0.05).
    ``input_affine_from`` (cnn without masked pooling: the encoders with the ``input_grad`` signature) goes into
    the metadata: devices then fit a per-user input affine from that many answers (``edge_sdk.device.TrainPolicy``).
    ``precomputed``: ``(parts, feature config)`` as :func:`models.features.load_feature_pack` returns them (parts:
    "train", "val", optional "test" and "reference" :class:`~models.features.FeatureSet` s), e.g. on a GPU host
    without the audio or librosa; used instead of computing features of the clip arguments, which are then ignored.
    The pack's feature config must be ``features``.

    On a Keras backend other than TensorFlow (``KERAS_BACKEND=jax``, e.g. a GPU host with no TensorFlow GPU build)
    the TFLite export cannot run: ``out_dir`` then gets ``trained.npz`` and ``trained.json``
    (:func:`models.export.save_trained`) and the report, and ``fedser-train export --trained OUT_DIR`` with the
    TensorFlow backend writes the model.
    """
    import sys

    import keras
    from tqdm.auto import tqdm

    if precomputed is not None:
        precomputed, pack_features = precomputed
        if pack_features != features:
            raise ParameterError(f"the precomputed features were computed with {pack_features.to_dict()}, not the "
                                 f"{features.to_dict()} asked for")
        missing = {"train", "val"} - set(precomputed)
        if missing:
            raise ParameterError(f"precomputed features lack the part(s) {sorted(missing)}")
        train_fs, val_fs, test_fs = precomputed["train"], precomputed["val"], precomputed.get("test")
        train_clips, val_clips = list(dict.fromkeys(train_fs.clips)), val_fs.clips
        test_clips = test_fs.clips if test_fs is not None else ()
    for name, part in (("validation", val_clips), ("test", test_clips)):
        shared = {c.speaker for c in train_clips} & {c.speaker for c in part}
        if shared:
            raise ValueError(f"{name} speakers also appear in training: {sorted(shared)}")
    check_device_options(architecture.name, architecture.masked_pooling, input_affine_from=input_affine_from,
                         trainable_embedding=trainable_embedding)
    if (config.spec_augment or config.mixup) and not _has_tensorflow():  # tf.data works under any backend
        raise ValueError("spec_augment and mixup run in a tf.data pipeline, which needs TensorFlow installed "
                         f"(Keras backend {keras.backend.backend()!r} without it cannot)")
    keras.utils.set_random_seed(config.seed)
    started = time.perf_counter()
    if precomputed is None:
        train_fs = compute_features(train_clips, features, cache_dir=cache_dir, augmentation=config.augmentation)
        val_fs = compute_features(val_clips, features, cache_dir=cache_dir)
        test_fs = compute_features(test_clips, features, cache_dir=cache_dir) if test_clips else None
        n_train_clips = len(train_clips) - sum(train_fs.skipped.values())
    else:
        n_train_clips = len(train_clips)
    feature_seconds = time.perf_counter() - started
    norm = train_fs.normalization()
    ref_train = ref_val = None
    extra = None
    if config.speaker_reference in NEUTRAL_REFERENCES:
        own = {c.speaker for c in train_clips} | {c.speaker for c in val_clips}
        if precomputed is None:
            extra = compute_features([c for c in reference_clips if c.speaker in own], features, cache_dir=cache_dir)
        else:
            ref_fs = precomputed.get("reference") or FeatureSet([], [])
            kept = [i for i, c in enumerate(ref_fs.clips) if c.speaker in own]
            extra = FeatureSet([ref_fs.clips[i] for i in kept], [ref_fs.raw[i] for i in kept])
    if config.speaker_reference != "all":
        ref_train = train_fs.reference_stats(config.speaker_reference, extra)
        ref_val = val_fs.reference_stats(config.speaker_reference, extra)
    x_train, y_train = train_fs.model_inputs(features, norm, ref_train), train_fs.labels(labels)
    x_val, y_val = val_fs.model_inputs(features, norm, ref_val), val_fs.labels(labels)
    x_train_all = train_fs.model_inputs(features, norm) if config.reference_blend and ref_train is not None else None

    gpus = _accelerators()
    mixed = config.mixed_precision == "on" or (config.mixed_precision == "auto" and bool(gpus))
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        encoder = build_encoder(architecture, features.max_frames, features.n_features)
        head = build_head(architecture, len(labels))
        inp = keras.Input((features.max_frames, features.n_features))
        logits = head(encoder(inp))
        if mixed:
            logits = keras.layers.Activation("linear", dtype="float32")(logits)
        model = keras.Model(inp, logits)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing))
    counts = np.bincount(y_train, minlength=len(labels)).astype(float)
    class_w = np.array([counts.sum() / (len(labels) * c) if c > 0 else 0.0 for c in counts], np.float32)
    # several corpora: every (corpus, class) pair weighs the same in the loss, so the larger corpus does not
    # drown the smaller one; one corpus: the class-balanced weights as before
    train_corpora = np.array([corpus_of(c.speaker) for c in train_fs.clips])
    sample_w = class_w[y_train]
    if len(set(train_corpora.tolist())) > 1:
        groups = [f"{a}|{b}" for a, b in zip(train_corpora, y_train, strict=True)]
        sizes = {g: groups.count(g) for g in set(groups)}
        sample_w = np.array([len(groups) / (len(sizes) * sizes[g]) for g in groups], np.float32)
    val_corpora = {corpus_of(c.speaker) for c in val_fs.clips}
    validating = bool(val_fs.clips)
    if not validating and val_clips:
        raise ValueError(f"none of the {len(val_clips)} validation clips could be read (skipped: {val_fs.skipped}); "
                         "name other validation speakers, or none to train every epoch without validation")
    if not validating:
        log.info("no validation clips: %d epochs, the %s weights kept", config.epochs,
                 f"last {config.swa_epochs} epochs' averaged" if config.swa_epochs else "last epoch's")
    plain = not (config.spec_augment or config.mixup)
    batches = None if plain or config.feature_augmented else _batches(x_train, y_train, sample_w, len(labels),
                                                                      config, features.n_spectral)
    aug_rng = np.random.default_rng([config.seed, 7919])
    onehot_train = np.eye(len(labels), dtype=np.float32)[y_train]

    best_uar, best_weights, history, waited = -1.0, None, [], 0
    swa_sum, swa_count = None, 0
    train_started = time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=config.epochs, desc=f"{architecture.name} epochs", unit="epoch", disable=not show,
               file=sys.stderr, leave=False)
    for epoch in range(config.epochs):
        epoch_started = time.perf_counter()
        if config.lr_schedule != "constant":
            model.optimizer.learning_rate.assign(config.learning_rate_at(epoch))
        x_epoch = x_train
        if x_train_all is not None:
            lam = aug_rng.uniform(1.0 - config.reference_blend, 1.0, size=(len(x_train), 1, 1)).astype(np.float32)
            x_epoch = lam * x_train + (1.0 - lam) * x_train_all
        if config.feature_augmented:
            x_epoch = augment_inputs(x_epoch, aug_rng, freq_warp=config.freq_warp, time_stretch=config.time_stretch,
                                     spectral_tilt=config.spectral_tilt, offset_shrink=config.offset_shrink,
                                     spread_shrink=config.spread_shrink, spectral=features.n_spectral)
            if not plain:
                batches = _batches(x_epoch, y_train, sample_w, len(labels), config, features.n_spectral)
        if plain:
            if len(set(train_corpora.tolist())) > 1:
                fit = model.fit(x_epoch, onehot_train, batch_size=config.batch_size, epochs=1, verbose=verbose,
                                sample_weight=sample_w, shuffle=True)
            else:
                fit = model.fit(x_epoch, onehot_train, batch_size=config.batch_size, epochs=1, verbose=verbose,
                                class_weight={i: float(w) for i, w in enumerate(class_w) if w > 0}, shuffle=True)
        else:
            fit = model.fit(batches, epochs=1, verbose=verbose, shuffle=False)  # the pipeline shuffles
        uar = None
        if validating:
            pred = np.argmax(model.predict(x_val, batch_size=256, verbose=0), axis=1)
            if len(val_corpora) > 1:  # each corpus's validation speakers count the same
                uar = float(np.mean([t["uar"] for t in by_corpus(val_fs.clips, y_val, pred, labels).values()]))
            else:
                uar = classification_report(y_val, pred, labels)["uar"]
        history.append({"epoch": epoch + 1, "loss": float(fit.history["loss"][-1]), "val_uar": uar,
                        "seconds": time.perf_counter() - epoch_started})
        log.info("epoch %d/%d loss %.4f val UAR %s", epoch + 1, config.epochs, history[-1]["loss"],
                 "-" if uar is None else f"{uar:.3f}")
        bar.update(1)
        if uar is None:
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        else:
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", val_uar=f"{uar:.3f}",
                            best=f"{max(uar, best_uar):.3f}")
        if config.swa_epochs:  # stochastic weight averaging over the last epochs; validation only reports
            if epoch >= config.epochs - config.swa_epochs:
                w = model.get_weights()
                swa_sum = w if swa_sum is None else [a + b for a, b in zip(swa_sum, w, strict=True)]
                swa_count += 1
            if uar is not None:
                best_uar = max(best_uar, uar)
            continue
        if not validating:  # every epoch runs; best_weights stays None, so the last weights are kept
            continue
        if uar > best_uar:
            best_uar, best_weights, waited = uar, model.get_weights(), 0
        else:
            waited += 1
            if waited >= config.patience:
                break
    bar.close()
    if swa_count:
        model.set_weights([w / swa_count for w in swa_sum])
    elif best_weights is not None:
        model.set_weights(best_weights)
    train_seconds = time.perf_counter() - train_started
    if mixed:  # export and evaluate in float32: rebuild and copy the trained weights
        f32_encoder = build_encoder(architecture, features.max_frames, features.n_features)
        f32_head = build_head(architecture, len(labels))
        f32_encoder.set_weights(encoder.get_weights())
        f32_head.set_weights(head.get_weights())
        encoder, head = f32_encoder, f32_head
        inp = keras.Input((features.max_frames, features.n_features))
        model = keras.Model(inp, head(encoder(inp)))

    hidden, logits = head.get_layer("head_hidden"), head.get_layer("head_logits")
    head_weights = {k: keras.ops.convert_to_numpy(v) for k, v in
                    (("w0", hidden.kernel), ("b0", hidden.bias), ("w1", logits.kernel), ("b1", logits.bias))}
    replay, replay_inputs = {}, None
    if config.replay_per_class > 0:  # a few training embeddings per class, the device's replay set
        picked = per_class_sample(y_train, config.replay_per_class, config.seed)
        replay_inputs = (x_train[picked], y_train[picked])  # the export recomputes them for a deeper cut
        replay_emb = encoder.predict(x_train[picked], batch_size=256, verbose=0)
        replay = {"replay": ModelMetadata.replay_extra(replay_emb, y_train[picked])}
    report = {
        "dataset": dataset_name,
        "labels": list(labels),
        "architecture": architecture.to_dict(),
        "features": features.to_dict(),
        "train_config": config.to_dict(),
        "label_map": label_map or {"classes": list(labels)},
        "augmentation": config.augmentation.to_dict() if config.augmentation.copies else None,
        "mixed_precision": mixed,
        "encoder_params": int(encoder.count_params()),
        "head_params": int(head.count_params()),
        "split": {
            "train_speakers": sorted({c.speaker for c in train_fs.clips}),
            "val_speakers": sorted({c.speaker for c in val_fs.clips}),
            "test_speakers": sorted({c.speaker for c in test_fs.clips}) if test_fs else [],
            "train_clips": n_train_clips, "val_clips": len(val_fs.clips),
            "train_examples": len(train_fs.clips),
            "test_clips": len(test_fs.clips) if test_fs else 0,
            "reference_only_clips": len(extra.clips) if extra is not None else 0,
        },
        "skipped": {"train": train_fs.skipped, "val": val_fs.skipped, "test": test_fs.skipped if test_fs else {}},
        "hardware": _hardware(),
        "feature_seconds": feature_seconds,
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(1, len(history)),
        "epochs_run": len(history),
        "best_val_uar": best_uar if validating else None,
        "history": history,
    }
    if test_fs is not None and test_fs.clips:
        pred = np.argmax(model.predict(test_fs.model_inputs(features, norm), batch_size=256, verbose=0), axis=1)
        y_test = test_fs.labels(labels)
        report["test"] = classification_report(y_test, pred, labels)
        report["test_by_corpus"] = by_corpus(test_fs.clips, y_test, pred, labels)
    metadata = ModelMetadata(
        labels=tuple(labels),
        features=features,
        normalization=norm,
        head_layout=head_layout(architecture.embedding_dim, architecture.head_units, len(labels)),
        embedding_dim=architecture.embedding_dim,
        train_batch_size=config.train_batch_size,
        architecture=architecture.name,
        extra={"architecture": architecture.to_dict(), "dataset": dataset_name,
               "test": {k: report["test"][k] for k in ("accuracy", "uar", "macro_f1")} if "test" in report else {},
               "test_by_corpus": {corpus: {k: t[k] for k in ("accuracy", "uar", "macro_f1")}
                                  for corpus, t in report.get("test_by_corpus", {}).items()},
               **replay},
        device_learning_rate=device_learning_rate,
        input_affine_from=input_affine_from,
    )
    result = TrainResult(encoder, head, metadata, report, head_weights=head_weights, history=history)
    if out_dir is not None:
        from models.report import write_report

        if _exports_here():
            result.export = export_tflite(encoder, head_weights, metadata, Path(out_dir),
                                          trainable_embedding=trainable_embedding, replay_inputs=replay_inputs)
            if trainable_embedding:  # head layout, embedding_dim, replay set and device rate follow the deeper cut
                result.metadata = result.export.metadata
            report["tflite_bytes"] = result.export.size
            report["tflite_sha256"] = result.export.sha256
        else:
            save_trained(encoder, head_weights, metadata, Path(out_dir), trainable_embedding=trainable_embedding,
                         replay_inputs=replay_inputs)
            report["export"] = (f"pending: trained on Keras backend {keras.backend.backend()!r}; run `fedser-train "
                                f"export --trained {out_dir}` with the TensorFlow backend")
            log.warning("Keras backend %s: wrote %s/trained.npz; `fedser-train export --trained %s` with the "
                        "TensorFlow backend writes model.tflite", keras.backend.backend(), out_dir, out_dir)
        write_report(report, out_dir)
    return result
