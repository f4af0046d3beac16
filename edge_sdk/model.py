"""A TFLite model with trainable-head signatures, run on a stock runtime.

The ``.tflite`` file carries four signatures (DESIGN.md): ``infer``, ``train``,
``get_weights``, ``set_weights``, plus ``head`` (embeddings to probabilities, a
static batch) used to score held-back feedback. Models exported since the adapter
(``models/export.py``) may also carry :data:`ADAPTER_SIGNATURES`: a per-user scale
and shift of the encoder's last-block channels, trained with the head on the
device; a file without them works as before (:attr:`TFLiteModel.has_adapter`). Models exported since the input
affine also carry :data:`INPUT_SIGNATURES` (``input_grad``: a batch's loss and its gradient with respect to the
model's inputs, for a per-user affine transform of the input features; :attr:`TFLiteModel.has_input_grad`). Its
:class:`ModelMetadata`
(labels, feature config, normalisation, head layout) travels beside it, in the
signed manifest or in a ``model.json`` sidecar.

The interpreter comes from ai-edge-litert, else tflite-runtime; TensorFlow is
never imported here.
"""

from __future__ import annotations

import base64
import json
import logging
import numbers
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_sdk.errors import FedserError, ModelError, ParameterError, RuntimeUnavailableError
from edge_sdk.features import FeatureConfig, Normalization
from edge_sdk.wire import HeadLayout

log = logging.getLogger("edge_sdk")

__all__ = ["ModelMetadata", "TFLiteModel", "check_threads", "MAX_THREADS",
           "load_interpreter_class", "REQUIRED_SIGNATURES", "ADAPTER_SIGNATURES",
           "INPUT_SIGNATURES"]

REQUIRED_SIGNATURES = ("infer", "train", "get_weights", "set_weights", "head")
# Optional: frames (features -> the encoder's last block [1, T', C]), adapted (frames [B, T', C] -> probs,
# embedding), adapter_train (a step of head and adapter), get_adapter / set_adapter (scale [C], shift [C]).
ADAPTER_SIGNATURES = ("frames", "adapted", "adapter_train", "get_adapter", "set_adapter")
# Optional: input_grad (features [B, T, F], targets, sample_weight, feedback_sign -> loss, grad [B, T, F], probs
# [B, C]) through the encoder, the adapter and the head in use; nothing trains.
INPUT_SIGNATURES = ("input_grad",)
METADATA_FORMAT_VERSION = 1


# The largest input_affine_from a model's metadata, a TrainPolicy or the config may give (answers).
MAX_INPUT_AFFINE_FROM = 100_000
MAX_THREADS = 64  # interpreter and trainer threads; -1 leaves the count to the runtime


def check_threads(name: str, value: object) -> None:
    """``value`` is a thread count the runtime takes: -1 (its own choice) or an integer in 1..MAX_THREADS;
    ParameterError naming ``name`` otherwise. ``None`` (unset) passes."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                              or not (value == -1 or 1 <= value <= MAX_THREADS)):
        raise ParameterError(f"{name} must be -1 (the runtime's choice) or an integer in 1..{MAX_THREADS}, "
                             f"got {value!r}")


MAX_LABELS = 64
MAX_EMBEDDING_DIM = 65536
MAX_TRAIN_BATCH = 4096
_REQUIRED = object()


@dataclass(frozen=True)
class ModelMetadata:
    """What a device must know about a model besides its bytes."""

    labels: tuple[str, ...]
    features: FeatureConfig
    normalization: Normalization
    head_layout: HeadLayout
    embedding_dim: int
    train_batch_size: int
    architecture: str = ""
    extra: dict = field(default_factory=dict)
    # The SGD learning rate the device's federated updates (and SGD personal fits) should use when the operator
    # set none (TrainPolicy.learning_rate None); None: the device's default. Deep-head exports carry 0.01.
    device_learning_rate: float | None = None
    # From how many answers devices fit a per-user input affine when their TrainPolicy sets nothing (None: off),
    # for a model whose publisher validated it (edge_sdk.device.TrainPolicy.input_affine_from).
    input_affine_from: int | None = None

    def __post_init__(self) -> None:
        n = len(self.normalization.mean)
        if n not in (0, self.features.n_features):
            raise ModelError(f"model metadata normalization has {n} values; the features have "
                             f"{self.features.n_features} columns")
        self.replay_set()  # a malformed replay set is refused with the metadata, not at the user's first fit
        if self.device_learning_rate is not None:
            object.__setattr__(self, "device_learning_rate", check_device_learning_rate(self.device_learning_rate))
        value = self.input_affine_from
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= MAX_INPUT_AFFINE_FROM):
            raise ModelError(f"model metadata input_affine_from must be an integer in 0..{MAX_INPUT_AFFINE_FROM}, "
                             f"got {value!r}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {
            "format_version": METADATA_FORMAT_VERSION,
            "labels": list(self.labels),
            "features": self.features.to_dict(),
            "normalization": self.normalization.to_dict(),
            "head_layout": self.head_layout.to_json(),
            "embedding_dim": self.embedding_dim,
            "train_batch_size": self.train_batch_size,
            "architecture": self.architecture,
            "extra": self.extra,
            **({"device_learning_rate": self.device_learning_rate} if self.device_learning_rate is not None else {}),
            **({"input_affine_from": self.input_affine_from} if self.input_affine_from is not None else {}),
        }

    def replay_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(embeddings [N, E] float32, class indices [N])`` of the replay set, or None when the model has none.

        A replay set is a few embeddings per class from the *server's own* training data (never a device's),
        shipped in ``extra["replay"]``; the device mixes them into its fine-tuning so that a user whose answers
        cover one or two classes does not drag the head away from the others.
        """
        raw = self.extra.get("replay")
        if not raw:
            return None
        try:
            emb = np.frombuffer(base64.b64decode(raw["embeddings"], validate=True), "<f4")
            values = raw["labels"]
            if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError("labels must be a list of integers (class indices)")
            labels = np.asarray(values, dtype=np.int64)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelError(f"model metadata extra.replay is malformed: {exc}") from exc
        if labels.ndim != 1 or emb.size != labels.size * self.embedding_dim:
            raise ModelError(f"model metadata extra.replay holds {emb.size} floats for {labels.size} labels; "
                             f"expected {labels.size} x embedding_dim {self.embedding_dim}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ModelError(f"model metadata extra.replay has a class index outside 0..{self.num_classes - 1}")
        return emb.reshape(labels.size, self.embedding_dim).astype(np.float32), labels

    @staticmethod
    def replay_extra(embeddings: np.ndarray, labels: np.ndarray) -> dict:
        """The ``extra["replay"]`` entry for ``embeddings [N, E]`` and class indices ``labels [N]``."""
        emb = np.ascontiguousarray(embeddings, dtype="<f4")
        return {"embeddings": base64.b64encode(emb.tobytes()).decode("ascii"),
                "labels": [int(x) for x in labels]}

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelMetadata:
        """Metadata from its JSON form, which comes from the aggregator with the model (or from a file beside it):
        a field that is missing, of the wrong type or out of range is a ModelError naming it, never another
        exception."""
        if not isinstance(data, Mapping):
            raise ModelError(f"model metadata must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != METADATA_FORMAT_VERSION:
            raise ModelError(f"model metadata format_version {version!r} is not supported")

        def parse(name: str, convert, default=_REQUIRED):
            if name not in data:
                if default is _REQUIRED:
                    raise ModelError(f"model metadata lacks the field {name!r}")
                return default
            try:
                return convert(data[name])
            except ModelError as exc:
                raise ModelError(f"model metadata field {name!r}: {exc}") from exc
            except (FedserError, TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
                raise ModelError(f"model metadata field {name!r} is malformed: {str(exc)[:300]}") from exc

        def mapping(value) -> dict:
            if not isinstance(value, Mapping):
                raise TypeError(f"must be a JSON object, got {type(value).__name__}")
            return dict(value)

        def count(high: int):
            def convert(value) -> int:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= high:
                    raise ValueError(f"must be an integer in 1..{high}, got {value!r}")
                return int(value)
            return convert

        def labels(value) -> tuple[str, ...]:
            if (not isinstance(value, (list, tuple)) or not 2 <= len(value) <= MAX_LABELS
                    or not all(isinstance(v, str) and 0 < len(v) <= 100 for v in value)
                    or len(set(value)) != len(value)):
                raise ValueError(f"must be a list of 2..{MAX_LABELS} distinct names of 1..100 characters, "
                                 f"got {str(value)[:200]}")
            return tuple(value)

        def text(value) -> str:
            if not isinstance(value, str):
                raise TypeError(f"must be a string, got {type(value).__name__}")
            return value

        try:
            return cls(
                labels=parse("labels", labels),
                features=parse("features", lambda v: FeatureConfig.from_dict(mapping(v))),
                normalization=parse("normalization", lambda v: Normalization.from_dict(mapping(v))),
                head_layout=parse("head_layout", HeadLayout.from_json),
                embedding_dim=parse("embedding_dim", count(MAX_EMBEDDING_DIM)),
                train_batch_size=parse("train_batch_size", count(MAX_TRAIN_BATCH)),
                architecture=parse("architecture", text, ""),
                extra=parse("extra", mapping, {}),
                device_learning_rate=data.get("device_learning_rate"),
                input_affine_from=data.get("input_affine_from"),
            )
        except ModelError:
            raise
        except FedserError as exc:  # a field's own check (device_learning_rate)
            raise ModelError(f"model metadata: {exc}") from exc

    def save(self, path: str | os.PathLike) -> None:
        from edge_sdk.storage import atomic_write

        atomic_write(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelMetadata:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read model metadata {path}: {exc}") from exc


def check_device_learning_rate(value) -> float:
    """``value`` as a float if it is a finite number in (0, 1], else a :class:`ModelError` naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"model metadata device_learning_rate must be a number, got {value!r}")
    rate = float(value)
    if not (np.isfinite(rate) and 0.0 < rate <= 1.0):
        raise ModelError(f"model metadata device_learning_rate must be finite and within (0, 1], got {value!r}")
    return rate


def load_interpreter_class(preferred: str = "auto"):
    """The ``Interpreter`` class of ai-edge-litert, else tflite-runtime.

    Parameters
    ----------
    preferred : {"auto", "ai_edge_litert", "tflite_runtime"}
    """
    candidates = {
        "ai_edge_litert": "ai_edge_litert.interpreter",
        "tflite_runtime": "tflite_runtime.interpreter",
    }
    if preferred != "auto" and preferred not in candidates:
        raise ParameterError(f"unknown TFLite runtime {preferred!r}; use auto, ai_edge_litert or tflite_runtime")
    order = list(candidates) if preferred == "auto" else [preferred]
    errors = []
    for name in order:
        try:
            module = __import__(candidates[name], fromlist=["Interpreter"])
            return module.Interpreter
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise RuntimeUnavailableError(
        "no TFLite runtime could be imported ("
        + "; ".join(errors)
        + "). Install one: pip install 'fedser[edge]' (ai-edge-litert) or pip install tflite-runtime"
    )


class _Signature:
    """One signature of the interpreter, called without resizing any input whose shape already fits.

    The runtimes' ``SignatureRunner.__call__`` resizes every input before each call, 0-d ones included, and the
    aarch64 builds of ai-edge-litert crash in ``ResizeInputTensor`` on a 0-d shape (it writes element 0 of the
    shape and clears ``4 * n - 4`` bytes, which wraps for n = 0). Every signature fedser exports has static
    shapes, so this calls the same wrapper functions in the same order (allocate, set, invoke, get) and only
    resizes an input whose shape really differs, never to a 0-d shape. Values whose size fits an input are
    reshaped to it: a scalar learning rate fits both a model exported with a 0-d ``learning_rate`` (older
    models, the bundled one among them) and one exported with shape ``[1]``.
    """

    def __init__(self, interpreter, name: str) -> None:
        self.name = name
        self.runner = interpreter.get_signature_runner(name)
        details = self.runner.get_input_details()
        self.inputs = {k: (int(d["index"]), tuple(int(s) for s in d["shape"]), np.dtype(d["dtype"]))
                       for k, d in details.items()}
        # The wrapper functions the runner itself calls; a runtime without them falls back to the runner.
        self._direct = all(hasattr(self.runner, a) for a in ("_interpreter_wrapper", "_subgraph_index",
                                                              "_outputs"))

    def input_shape(self, name: str) -> tuple[int, ...]:
        return self.inputs[name][1]

    def __call__(self, **kwargs) -> dict[str, np.ndarray]:
        if set(kwargs) != set(self.inputs):
            raise ParameterError(f"signature {self.name!r} takes {sorted(self.inputs)}, got {sorted(kwargs)}")
        values = {}
        for key, value in kwargs.items():
            _, shape, dtype = self.inputs[key]
            arr = np.asarray(value, dtype=dtype)
            if arr.shape != shape and arr.size == int(np.prod(shape, dtype=np.int64)):
                arr = arr.reshape(shape)
            values[key] = arr if arr.flags.c_contiguous else arr.copy(order="C")  # keeps 0-d arrays 0-d
        if not self._direct:
            return self.runner(**values)
        runner = self.runner
        wrapper, subgraph = runner._interpreter_wrapper, runner._subgraph_index
        for key, arr in values.items():
            index, shape, _ = self.inputs[key]
            if arr.shape != shape:
                if arr.ndim == 0:
                    raise ParameterError(f"input {key!r} of signature {self.name!r} has shape {list(shape)}; "
                                         "a scalar does not fit it")
                wrapper.ResizeInputTensor(index, np.array(arr.shape, dtype=np.int32), False, subgraph)
                self.inputs[key] = (index, arr.shape, self.inputs[key][2])
        wrapper.AllocateTensors(subgraph)
        for key, arr in values.items():
            wrapper.SetTensor(self.inputs[key][0], arr, subgraph)
        wrapper.Invoke(subgraph)
        return {name: wrapper.GetTensor(index, subgraph) for name, index in runner._outputs}


class TFLiteModel:
    """One interpreter over a trainable ``.tflite`` model.

    Signature calls are serialised by a lock: a TFLite interpreter is not
    thread-safe, and the head variables are shared by all signatures.

    Parameters
    ----------
    model_path : path
        The ``.tflite`` file.
    metadata : ModelMetadata
    num_threads : int
        Interpreter threads (1 keeps a Pi's other cores free for audio).
    runtime : str
        See :func:`load_interpreter_class`.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        metadata: ModelMetadata,
        *,
        num_threads: int = 1,
        runtime: str = "auto",
    ) -> None:
        self.path = Path(model_path)
        self.metadata = metadata
        interpreter_class = load_interpreter_class(runtime)
        self.runtime = interpreter_class.__module__.split(".")[0]
        try:
            self._interpreter = interpreter_class(model_path=str(self.path), num_threads=num_threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{self.path}: the TFLite runtime cannot load it: {exc}") from exc
        available = self._interpreter.get_signature_list()
        missing = [s for s in REQUIRED_SIGNATURES if s not in available]
        if missing:
            raise ModelError(f"{self.path} lacks the signatures {missing} (has {sorted(available)})")
        self.has_adapter = all(s in available for s in ADAPTER_SIGNATURES)
        self.has_input_grad = all(s in available for s in INPUT_SIGNATURES)
        names = (REQUIRED_SIGNATURES + (ADAPTER_SIGNATURES if self.has_adapter else ())
                 + (INPUT_SIGNATURES if self.has_input_grad else ()))
        self._runners = {name: _Signature(self._interpreter, name) for name in names}
        self._lock = threading.Lock()
        self._check_shapes()
        weights = self.get_weights()
        for spec in metadata.head_layout:
            if spec.name not in weights or tuple(weights[spec.name].shape) != spec.shape:
                raise ModelError(
                    f"{self.path}: head variable {spec.name!r} does not match the metadata layout {spec.shape}"
                )
        self.input_shape = (1, metadata.features.max_frames, metadata.features.n_features)

    def _check_shapes(self) -> None:
        """The metadata must describe this file: the input frames and features, the classes, the embedding and the
        training batch, as the ``infer`` and ``head`` signatures declare them. Metadata comes from the aggregator
        with the model; one that disagrees (a typo in ``max_frames``, a class added to ``labels``) is refused by
        name here, on the server at publication and on the device before the model is installed."""
        md = self.metadata
        expected = {
            ("infer", "input", "features"): (1, md.features.max_frames, md.features.n_features),
            ("infer", "output", "probs"): (1, md.num_classes),
            ("infer", "output", "embedding"): (1, md.embedding_dim),
            ("head", "input", "embeddings"): (md.train_batch_size, md.embedding_dim),
        }
        for (signature, kind, name), shape in expected.items():
            runner = self._runners[signature].runner
            details = runner.get_input_details() if kind == "input" else runner.get_output_details()
            if name not in details:
                raise ModelError(f"{self.path}: signature {signature!r} has no {kind} {name!r}")
            actual = tuple(int(v) for v in details[name]["shape"])
            if actual != shape:
                raise ModelError(
                    f"{self.path}: the metadata does not describe this model: signature {signature!r} {kind} "
                    f"{name!r} has shape {list(actual)}, the metadata (features.max_frames, features.n_features, "
                    f"labels, embedding_dim, train_batch_size) gives {list(shape)}")

    # -- signatures -----------------------------------------------------------------------
    def infer(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Classify one utterance.

        Parameters
        ----------
        features : np.ndarray [shape=(max_frames, n_features)]
            Normalised features (``edge_sdk.features.extract``).

        Returns
        -------
        probs : np.ndarray [shape=(C,)]
        embedding : np.ndarray [shape=(E,)]
        """
        x = np.asarray(features, dtype=np.float32)
        if x.shape == self.input_shape[1:]:
            x = x[None]
        if x.shape != self.input_shape:
            raise ParameterError(f"features must have shape {self.input_shape[1:]}, got {features.shape}")
        with self._lock:
            out = self._runners["infer"](features=x)
        return out["probs"][0].copy(), out["embedding"][0].copy()

    def head_probs(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, C]`` of the current head for embeddings ``[N, E]``."""
        emb = self._check_embeddings(embeddings)
        batch = self.metadata.train_batch_size
        out = []
        with self._lock:
            for start in range(0, len(emb), batch):
                chunk = emb[start : start + batch]
                padded = np.zeros((batch, emb.shape[1]), np.float32)
                padded[: len(chunk)] = chunk
                out.append(self._runners["head"](embeddings=padded)["probs"][: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.metadata.num_classes), np.float32)

    def train_step(
        self,
        embeddings: np.ndarray,
        targets: np.ndarray,
        feedback_sign: np.ndarray,
        sample_weight: np.ndarray | None = None,
        *,
        learning_rate: float,
    ) -> float:
        """One SGD step of the head on at most ``train_batch_size`` examples.

        Parameters
        ----------
        embeddings : np.ndarray [shape=(n, E)]
        targets : np.ndarray [shape=(n, C)]
            One-hot: the right label for positive feedback, the wrong one for a
            bare thumbs-down.
        feedback_sign : np.ndarray [shape=(n,)]
            +1 trains with cross-entropy toward the target, -1 with the
            complementary loss ``-log(1 - p[target])``.
        sample_weight : np.ndarray [shape=(n,)], optional
        learning_rate : float

        Returns
        -------
        float
            The weighted mean loss before the step.
        """
        emb = self._check_embeddings(embeddings)
        pe, pt, pw, ps = self._padded_step("train_step", emb, targets, feedback_sign, sample_weight)
        return self._run_step("train", embeddings=pe, targets=pt, sample_weight=pw, feedback_sign=ps,
                              learning_rate=np.float32(learning_rate))

    def get_weights(self) -> dict[str, np.ndarray]:
        with self._lock:
            out = self._runners["get_weights"]()
        return {k: np.array(v, copy=True) for k, v in out.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        layout = self.metadata.head_layout
        missing = set(layout.names) - set(weights)
        if missing:
            raise ParameterError(f"set_weights lacks head arrays {sorted(missing)}")
        args = {}
        for spec in layout:
            arr = np.asarray(weights[spec.name], np.float32)
            if arr.shape != spec.shape:
                raise ParameterError(f"head array {spec.name!r} has shape {arr.shape}, expected {spec.shape}")
            args[spec.name] = arr
        with self._lock:
            self._runners["set_weights"](**args)

    # -- the adapter (models that have it: has_adapter) -----------------------------------
    def _require_adapter(self) -> None:
        if not self.has_adapter:
            raise ModelError(f"{self.path} has no adapter signatures {list(ADAPTER_SIGNATURES)} (an older export, "
                             "or an encoder other than cnn): only the head can be fine-tuned")

    @property
    def frames_shape(self) -> tuple[int, int]:
        """``(T', C)`` of :meth:`frames`."""
        self._require_adapter()
        return tuple(self._runners["adapted"].input_shape("frames")[1:])

    def frames(self, features: np.ndarray) -> np.ndarray:
        """The encoder's last block before the adapter, ``[T', C]``, for one utterance's features."""
        self._require_adapter()
        x = np.asarray(features, np.float32).reshape(self.input_shape)
        with self._lock:
            return self._runners["frames"](features=x)["frames"][0].copy()

    def adapted(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(probs [N, C], embeddings [N, E])`` of the current adapter and head for frames ``[N, T', C]``."""
        fr = self._check_frames(frames)
        batch = self.metadata.train_batch_size
        probs, emb = [], []
        with self._lock:
            for start in range(0, len(fr), batch):
                chunk = fr[start : start + batch]
                padded = np.zeros((batch, *fr.shape[1:]), np.float32)
                padded[: len(chunk)] = chunk
                out = self._runners["adapted"](frames=padded)
                probs.append(out["probs"][: len(chunk)])
                emb.append(out["embedding"][: len(chunk)])
        if not probs:
            return (np.zeros((0, self.metadata.num_classes), np.float32),
                    np.zeros((0, self.metadata.embedding_dim), np.float32))
        return np.concatenate(probs), np.concatenate(emb)

    def _padded_step(self, name: str, x: np.ndarray, targets, feedback_sign, sample_weight):
        """A training step's inputs ``x`` (1 .. train_batch_size examples), ``targets`` [n, classes],
        ``feedback_sign`` (n values of +-1) and ``sample_weight`` (default ones), checked, as float32 and padded to
        the static batch with weight-0 rows (the stock runtimes cannot broadcast a dynamic batch's gradient)."""
        n, batch, classes = len(x), self.metadata.train_batch_size, self.metadata.num_classes
        if n == 0 or n > batch:
            raise ParameterError(f"{name} takes 1..{batch} examples, got {n}")
        targets = np.asarray(targets, np.float32)
        if targets.shape != (n, classes):
            raise ParameterError(f"targets must have shape {(n, classes)}, got {targets.shape}")
        sign = np.asarray(feedback_sign, np.float32).reshape(-1)
        if sign.shape != (n,) or not np.all(np.isin(sign, (-1.0, 1.0))):
            raise ParameterError(f"feedback_sign must be {n} values of +1 or -1")
        weight = np.ones(n, np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        px = np.zeros((batch, *x.shape[1:]), np.float32)
        pt = np.zeros((batch, classes), np.float32)
        pw = np.zeros(batch, np.float32)
        ps = np.ones(batch, np.float32)
        px[:n], pt[:n], pw[:n], ps[:n] = x, targets, weight, sign
        return px, pt, pw, ps

    def _run_step(self, signature: str, **inputs) -> float:
        """Run one training signature; its weighted mean loss before the step, which must be finite."""
        with self._lock:
            out = self._runners[signature](**inputs)
        loss = float(out["loss"])
        if not np.isfinite(loss):
            raise ModelError(f"training produced a non-finite loss ({loss}); lower the learning rate")
        return loss

    def adapter_train_step(self, frames: np.ndarray, targets: np.ndarray, feedback_sign: np.ndarray,
                           sample_weight: np.ndarray | None = None, *, learning_rate: float,
                           adapter_learning_rate: float) -> float:
        """One SGD step of the head (``learning_rate``) and the adapter (``adapter_learning_rate``) on at most
        ``train_batch_size`` utterances' frames ``[n, T', C]``; otherwise as :meth:`train_step`."""
        fr = self._check_frames(frames)
        pf, pt, pw, ps = self._padded_step("adapter_train_step", fr, targets, feedback_sign, sample_weight)
        return self._run_step("adapter_train", frames=pf, targets=pt, sample_weight=pw, feedback_sign=ps,
                              learning_rate=np.float32(learning_rate),
                              adapter_learning_rate=np.float32(adapter_learning_rate))

    def get_adapter(self) -> dict[str, np.ndarray]:
        """``{"scale": [C], "shift": [C]}``."""
        self._require_adapter()
        with self._lock:
            out = self._runners["get_adapter"]()
        return {k: np.array(v, copy=True) for k, v in out.items()}

    def set_adapter(self, adapter: Mapping[str, np.ndarray] | None) -> None:
        """Set scale and shift; None sets the identity (scale 1, shift 0), what the export ships."""
        self._require_adapter()
        channels = self.frames_shape[1]
        if adapter is None:
            adapter = {"scale": np.ones(channels, np.float32), "shift": np.zeros(channels, np.float32)}
        args = {}
        for name in ("scale", "shift"):
            arr = np.asarray(adapter.get(name), np.float32) if name in adapter else None
            if arr is None or arr.shape != (channels,):
                raise ParameterError(f"adapter {name!r} must have shape ({channels},)")
            args[name] = arr
        with self._lock:
            self._runners["set_adapter"](**args)

    # -- gradients with respect to the inputs (models that have them: has_input_grad) -----
    def input_gradient(self, features: np.ndarray, targets: np.ndarray, feedback_sign: np.ndarray,
                       sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray]:
        """``(gradient [n, T, F], loss, probs [n, C])``: the weighted mean loss of the ``train`` signature over all
        ``n`` utterances' ``features`` (any number; batches of ``train_batch_size`` combined by their weight sums)
        through the encoder, the adapter and the head in use, its gradient with respect to ``features``, and the
        probabilities the model gives each utterance. Nothing is trained."""
        if not self.has_input_grad:
            raise ModelError(f"{self.path} has no {list(INPUT_SIGNATURES)} signature (an older export, or an encoder "
                             "other than cnn): the input features cannot be adapted")
        x = np.asarray(features, np.float32)
        if x.ndim != 3 or x.shape[1:] != self.input_shape[1:]:
            raise ParameterError(f"features must have shape [n, {', '.join(map(str, self.input_shape[1:]))}], "
                                 f"got {np.shape(features)}")
        n, batch, classes = len(x), self.metadata.train_batch_size, self.metadata.num_classes
        if n == 0:
            raise ParameterError("input_gradient takes at least one utterance")
        targets = np.asarray(targets, np.float32)
        if targets.shape != (n, classes):
            raise ParameterError(f"targets must have shape {(n, classes)}, got {targets.shape}")
        feedback_sign = np.asarray(feedback_sign, np.float32)
        if feedback_sign.shape != (n,):
            raise ParameterError(f"feedback_sign must be {n} values of +1 or -1, got shape {feedback_sign.shape}")
        weight = np.ones(n, np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        if weight.shape != (n,) or not np.all(np.isfinite(weight)) or np.any(weight < 0):
            raise ParameterError(f"sample_weight must be {n} finite values >= 0")
        grad = np.zeros(x.shape, np.float32)
        probs = np.zeros((n, classes), np.float32)
        total, loss = float(weight.sum()), 0.0
        for start in range(0, n, batch):
            sl = slice(start, min(n, start + batch))
            pf, pt, pw, ps = self._padded_step("input_gradient", x[sl], targets[sl], feedback_sign[sl], weight[sl])
            with self._lock:
                out = self._runners["input_grad"](features=pf, targets=pt, sample_weight=pw, feedback_sign=ps)
            share = float(weight[sl].sum()) / total if total > 0 else 0.0
            k = sl.stop - sl.start
            probs[sl] = out["probs"][:k]
            if share > 0:
                grad[sl] = share * out["grad"][:k]
                loss += share * float(out["loss"])
        if not (np.isfinite(loss) and np.all(np.isfinite(grad))):
            raise ModelError("input_grad produced a non-finite loss or gradient")
        return grad, loss, probs

    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        fr = np.asarray(frames, np.float32)
        if fr.ndim != 3 or fr.shape[1:] != self.frames_shape:
            raise ParameterError(f"frames must have shape [n, {', '.join(map(str, self.frames_shape))}], "
                                 f"got {np.shape(frames)}")
        return fr

    def _check_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.metadata.embedding_dim:
            raise ParameterError(
                f"embeddings must have shape [n, {self.metadata.embedding_dim}], got {np.shape(embeddings)}"
            )
        return emb


def bundled_model_paths() -> tuple[Path, Path] | None:
    """``(default_model.tflite, default_model.json)`` shipped inside the package, or None if absent.

    The bundled model (RAVDESS, four classes, trained by ``fedser-train``; its
    report is ``edge_sdk/data/default_model.md``) lets the SDK classify out of
    the box, before any enrollment.
    """
    from importlib import resources

    data = resources.files("edge_sdk").joinpath("data")
    tflite, meta = data.joinpath("default_model.tflite"), data.joinpath("default_model.json")
    if not (tflite.is_file() and meta.is_file()):
        return None
    return Path(str(tflite)), Path(str(meta))

