"""Export an encoder + head as a trainable ``.tflite`` that runs on stock runtimes.

The traps of ``../shared/notes/tflite-on-device-training.md`` and what this does
about each:

* The encoder is frozen first (``convert_variables_to_constants_v2``) and its
  graph imported into the exported functions; only the head stays as
  ``tf.Variable`` s (Keras layers kept as variables give wrong TFLite outputs).
* ``infer`` has a static batch of 1; ``train`` and ``head`` a static batch
  ``B`` padded with weight-0 rows (a dynamic batch's gradient needs Flex ops).
* The head's ReLU has a custom gradient ``dy * mask`` (``ReluGrad`` is Flex).
* Checkpoints go through ``get_weights`` / ``set_weights``, not ``Save/Restore``.
* SavedModel with named signatures, then ``from_saved_model`` with resource
  variables enabled.
* :func:`check_builtin_ops` fails the export if any custom or Flex op remains.
* A ``cnn`` encoder also gets the *adapter* signatures (:data:`ADAPTER_SIGNATURES`): a per-user scale and
  shift of each channel of its last block (after the batch norm, before the ReLU), trained together with
  the head through the frozen pooling and embedding layer. Their gradients are builtins: the ReLU's is
  ``dy * mask``, the max over time's ``dy`` at the frames holding the maximum, the mean's ``dy / T`` (TF's
  own are ``ReluGrad`` and a ``Max`` gradient). ``infer`` goes through the adapter, identity until a device
  trains it. Older files lack these signatures; the SDK then fine-tunes the head only.
* ``trainable_embedding=True`` (``cnn`` and ``dnn``, whose embedding layer is a ReLU dense layer) moves the cut
  point down to the pooled vector (mean and max over time, ``2 x channels``): ``infer``'s ``embedding`` is that
  vector and the head has three layers, ``w0, b0`` the encoder's embedding layer, ``w1, b1`` the head's hidden
  layer, ``w2, b2`` its logits (ReLU with the builtin gradient on all but the last). The metadata's
  ``embedding_dim``, ``head_layout`` and replay set follow the cut. The SDK, the wire format and the aggregator
  are generic over the head's layout, so devices then fine-tune and federate the embedding layer too.
* A ``cnn`` encoder with the adapter also gets ``input_grad`` (:data:`INPUT_SIGNATURES`): the loss of a batch of
  utterances and its gradient with respect to the model's *inputs*, through the frozen encoder, the adapter and
  the head in use, for the per-user input-feature affine of ``edge_sdk.device`` (``TrainPolicy.input_affine_from``).
  The encoder is written out again for it from its weights (batch norm folded) with builtin gradients: the
  convolutions' input gradients are ``TRANSPOSE_CONV``; the ReLU's ``dy * mask``; max pooling by two is a reshape
  and a ``reduce_max`` (an odd length's last frame dropped with ``tf.slice``, whose gradient is a ``PAD``). The
  export checks it against the frozen encoder. :func:`reexport_tflite` rebuilds such a model from an older
  ``.tflite`` of the same architecture (its convolutions, embedding layer and head read from the file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_sdk.errors import ModelError
from edge_sdk.model import INPUT_SIGNATURES, ModelMetadata
from edge_sdk.wire import ArraySpec, HeadLayout

log = logging.getLogger("models")

__all__ = ["head_layout", "layout_of", "head_names", "deep_cut", "deep_head_weights", "cut_metadata",
           "export_tflite", "check_builtin_ops", "ExportResult", "HEAD_NAMES",
           "build_trainable_module", "convert_module", "freeze_encoder", "adapter_split", "AdapterSplit",
           "BASE_SIGNATURES", "ADAPTER_SIGNATURES", "INPUT_SIGNATURES", "input_cut_layers", "reexport_tflite"]

HEAD_NAMES = ("w0", "b0", "w1", "b1")  # the default head: hidden and logits layers
BASE_SIGNATURES = ("infer", "head", "train", "get_weights", "set_weights")
ADAPTER_SIGNATURES = ("frames", "adapted", "adapter_train", "get_adapter", "set_adapter")


def head_layout(embedding_dim: int, head_units: int, num_classes: int) -> HeadLayout:
    return HeadLayout([
        ArraySpec("w0", (embedding_dim, head_units)),
        ArraySpec("b0", (head_units,)),
        ArraySpec("w1", (head_units, num_classes)),
        ArraySpec("b1", (num_classes,)),
    ])


def head_names(layers: int) -> tuple[str, ...]:
    """``w0, b0, ..., w{n-1}, b{n-1}``: the arrays of a head of ``layers`` dense layers, in layout order."""
    return tuple(f"{k}{i}" for i in range(layers) for k in ("w", "b"))


def _layers(weights) -> int:
    """How many dense layers ``weights`` (``w0, b0, w1, b1, ...``; other keys ignored) hold."""
    n = 0
    while f"w{n}" in weights and f"b{n}" in weights:
        n += 1
    if n < 1:
        raise ModelError(f"head arrays must be w0, b0, ..., wN, bN; got {sorted(weights)}")
    return n


def layout_of(weights: dict) -> HeadLayout:
    """The head layout of ``weights`` (``w0, b0, w1, b1, ...`` in layer order, float32)."""
    return HeadLayout([ArraySpec(name, tuple(np.shape(weights[name]))) for name in head_names(_layers(weights))])


@dataclass(frozen=True)
class ExportResult:
    tflite_path: Path
    metadata_path: Path
    sha256: str
    size: int
    metadata: ModelMetadata | None = field(default=None, compare=False)  # what was written beside the file


def check_builtin_ops(tflite_bytes: bytes) -> list[str]:
    """Names of the operators in a flatbuffer; raises :class:`ModelError` on any custom/Flex op."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_bytes, 0))
    builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    names, custom = [], []
    for code in model.operatorCodes:
        op = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        if op == schema.BuiltinOperator.CUSTOM:
            name = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
            custom.append(name)
            names.append(name)
        else:
            names.append(builtin_names.get(op, str(op)))
    if custom:
        raise ModelError(
            f"the model uses non-builtin ops {sorted(set(custom))}: stock ai-edge-litert / tflite-runtime "
            "have no Flex delegate, so it would not run on a device"
        )
    return sorted(set(names))


def _relu_with_builtin_gradient(x):
    import tensorflow as tf

    @tf.custom_gradient
    def relu(x):
        mask = tf.cast(x > 0, x.dtype)

        def grad(dy):
            return dy * mask

        return x * mask, grad

    return relu(x)


def _max_over_time_with_builtin_gradient(x):
    """``reduce_max(x, axis=1)`` of ``[B, T, C]``; its gradient goes to the frames that hold the maximum."""
    import tensorflow as tf

    @tf.custom_gradient
    def max_over_time(x):
        top = tf.reduce_max(x, axis=1)

        def grad(dy):
            return dy[:, None, :] * tf.cast(tf.equal(x, top[:, None, :]), x.dtype)

        return top, grad

    return max_over_time(x)


def _mean_over_time_with_builtin_gradient(x):
    """``reduce_mean(x, axis=1)`` of a static ``[B, T, C]``; its gradient is ``dy / T`` on every frame."""
    import tensorflow as tf

    frames = int(x.shape[1])

    @tf.custom_gradient
    def mean_over_time(x):
        def grad(dy):
            return dy[:, None, :] * tf.fill([1, frames, 1], 1.0 / frames)

        return tf.reduce_mean(x, axis=1), grad

    return mean_over_time(x)


def input_cut_layers(encoder) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The convolutions of a plain ``cnn`` encoder with their batch norms folded in: ``[(kernel [k, in, out],
    bias [out]), ...]`` (``conv(x) * s + t`` = ``conv'(x)``), or None for any other encoder."""
    names = [layer.name for layer in encoder.layers]
    convs = [n for n in names if n.startswith("conv")]
    if encoder.name != "cnn_encoder" or not convs or any(f"bn{i}" not in names for i in range(len(convs))):
        return None
    out = []
    for i in range(len(convs)):
        conv, bn = encoder.get_layer(f"conv{i}"), encoder.get_layer(f"bn{i}")
        if conv.strides != (1,) or conv.padding != "same" or conv.dilation_rate != (1,) or not conv.use_bias:
            return None
        gamma, beta, mean, var = (np.asarray(w, np.float64) for w in bn.get_weights())
        s = gamma / np.sqrt(var + bn.epsilon)
        kernel, bias = (np.asarray(w, np.float64) for w in conv.get_weights())
        out.append(((kernel * s).astype(np.float32), ((bias - mean) * s + beta).astype(np.float32)))
    return out


def _builtin_cut(features, layers):
    """The ``cnn`` encoder up to its last block's batch norm (the adapter's cut, ``[B, T', C]``), written with ops
    whose gradients with respect to ``features`` are builtins (:func:`input_cut_layers`' folded convolutions; a
    ReLU and max pooling by two after every block but the last)."""
    import tensorflow as tf

    x = features
    for i, (kernel, bias) in enumerate(layers):
        x = tf.nn.conv1d(x, kernel, 1, "SAME") + bias
        if i == len(layers) - 1:
            return x
        x = _relu_with_builtin_gradient(x)
        frames, channels = int(x.shape[1]), int(x.shape[2])
        even = (frames // 2) * 2
        if even != frames:  # 'valid' pooling drops the last frame; tf.slice's gradient is a PAD (a strided slice's
            x = tf.slice(x, [0, 0, 0], [int(x.shape[0]), even, channels])  # is Flex)
        x = tf.reduce_max(tf.reshape(x, [int(x.shape[0]), even // 2, 2, channels]), axis=2)
    return x


@dataclass(frozen=True)
class AdapterSplit:
    """A CNN encoder cut after its last block's batch norm: the frozen graph up to there, and the frozen rest
    (ReLU, mean and max over time, dropout (identity), the embedding layer ``relu(pooled @ kernel + bias)``)."""

    graph_def: object
    input_name: str
    output_name: str
    frames: int  # T' of the cut tensor [1, T', C]
    channels: int
    kernel: np.ndarray
    bias: np.ndarray


def adapter_split(encoder, frames: int, n_features: int) -> AdapterSplit | None:
    """The cut of a ``cnn`` encoder of :func:`models.architectures.build_encoder` with plain mean + max pooling;
    None for any other encoder (its model gets no adapter signatures, and devices fine-tune the head only)."""
    import keras

    names = [layer.name for layer in encoder.layers]
    convs = [n for n in names if n.startswith("conv")]
    if encoder.name != "cnn_encoder" or not convs or "pool" not in names or "embedding" not in names:
        return None
    if type(encoder.get_layer("pool")).__name__ != "Concatenate":  # masked pooling: not supported
        return None
    emb_layer = encoder.get_layer("embedding")
    last_bn = f"bn{len(convs) - 1}"
    if getattr(emb_layer.activation, "__name__", "") != "relu" or last_bn not in names:
        return None
    cut = keras.Model(encoder.inputs, encoder.get_layer(last_bn).output)
    graph_def, inp, out = freeze_encoder(cut, frames, n_features)
    shape = cut.output.shape
    return AdapterSplit(graph_def, inp, out, int(shape[1]), int(shape[2]),
                        np.asarray(emb_layer.kernel.numpy(), np.float32),
                        np.asarray(emb_layer.bias.numpy(), np.float32))


def deep_cut(encoder):
    """The encoder up to its pooled vector (``[B, 2 x channels]``, before dropout and the embedding layer), for
    a ``cnn`` or ``dnn`` encoder of :func:`models.architectures.build_encoder` whose embedding layer is a ReLU
    dense layer; None for any other encoder (it cannot train its embedding layer on the device)."""
    import keras

    names = [layer.name for layer in encoder.layers]
    if encoder.name not in ("cnn_encoder", "dnn_encoder") or "pool" not in names or "embedding" not in names:
        return None
    emb_layer = encoder.get_layer("embedding")
    if getattr(emb_layer.activation, "__name__", "") != "relu" or not emb_layer.use_bias:
        return None
    return keras.Model(encoder.inputs, encoder.get_layer("pool").output, name=f"{encoder.name}_pooled")


def deep_head_weights(encoder, head_weights: dict) -> dict:
    """The three-layer head of a ``trainable_embedding`` export: ``w0, b0`` the encoder's embedding layer, then
    ``head_weights`` (``w0, b0, ...``) renumbered from 1."""
    emb_layer = encoder.get_layer("embedding")
    out = {"w0": np.asarray(emb_layer.kernel.numpy(), np.float32), "b0": np.asarray(emb_layer.bias.numpy(), np.float32)}
    for i in range(_layers(head_weights)):
        out[f"w{i + 1}"] = np.asarray(head_weights[f"w{i}"], np.float32)
        out[f"b{i + 1}"] = np.asarray(head_weights[f"b{i}"], np.float32)
    return out


def _make_module(graph_def, input_name: str, output_name: str, head: dict, frames: int, n_features: int,
                 num_classes: int, batch: int, split: AdapterSplit | None = None, *, deep: bool = False,
                 input_layers: list | None = None):
    """The ``tf.Module`` of the signatures. ``head`` holds ``w0, b0, ..., wN, bN`` (a ReLU after every layer but
    the last); ``graph_def`` is the frozen encoder up to the head's input. With ``deep`` the head's first layer is
    the encoder's embedding layer and the adapter's ``adapted_embedding`` stops at the pooled vector. With the adapter
    ``split`` and ``input_layers`` (:func:`input_cut_layers`), the module also has ``input_grad``."""
    import tensorflow as tf

    names = head_names(_layers(head))
    emb_dim = head["w0"].shape[0]
    train_specs = [
        tf.TensorSpec([batch, num_classes], tf.float32, name="targets"),
        tf.TensorSpec([batch], tf.float32, name="sample_weight"),
        tf.TensorSpec([batch], tf.float32, name="feedback_sign"),
        # [1], not a scalar: the aarch64 ai-edge-litert builds crash resizing a 0-d input (issue 13)
        tf.TensorSpec([1], tf.float32, name="learning_rate"),
    ]
    weight_specs = [tf.TensorSpec(head[n].shape, tf.float32, name=n) for n in names]

    def feedback_loss(logits, targets, sample_weight, feedback_sign):
        logp = tf.nn.log_softmax(logits)
        cross_entropy = -tf.reduce_sum(targets * logp, axis=1)
        p_target = tf.reduce_sum(targets * tf.exp(logp), axis=1)
        complementary = -tf.math.log(1.0 - p_target + 1e-6)
        positive = 0.5 * (1.0 + feedback_sign)
        per_sample = positive * cross_entropy + (1.0 - positive) * complementary
        return tf.reduce_sum(per_sample * sample_weight) / (tf.reduce_sum(sample_weight) + 1e-8)

    class TrainableHead(tf.Module):
        def __init__(self):
            super().__init__(name="fedser")
            for n in names:
                setattr(self, n, tf.Variable(head[n], name=n))

        @property
        def head_variables(self):
            return [getattr(self, n) for n in names]

        def logits(self, emb):
            h, variables = emb, self.head_variables
            for i in range(0, len(variables), 2):
                h = tf.matmul(h, variables[i]) + variables[i + 1]
                if i + 2 < len(variables):
                    h = _relu_with_builtin_gradient(h)
            return h

        def embed(self, features):
            return tf.graph_util.import_graph_def(
                graph_def, input_map={input_name: features}, return_elements=[output_name], name="encoder"
            )[0]

        @tf.function(input_signature=[tf.TensorSpec([1, frames, n_features], tf.float32, name="features")])
        def infer(self, features):
            emb = self.embed(features)
            return {"probs": tf.nn.softmax(self.logits(emb)), "embedding": emb}

        @tf.function(input_signature=[tf.TensorSpec([batch, emb_dim], tf.float32, name="embeddings")])
        def head(self, embeddings):
            return {"probs": tf.nn.softmax(self.logits(embeddings))}

        @tf.function(input_signature=[tf.TensorSpec([batch, emb_dim], tf.float32, name="embeddings"), *train_specs])
        def train(self, embeddings, targets, sample_weight, feedback_sign, learning_rate):
            variables = self.head_variables
            with tf.GradientTape() as tape:
                loss = feedback_loss(self.logits(embeddings), targets, sample_weight, feedback_sign)
            grads = tape.gradient(loss, variables)
            step = tf.reshape(learning_rate, [])
            for var, grad in zip(variables, grads, strict=True):
                var.assign_sub(step * grad)
            return {"loss": loss}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {n: getattr(self, n).read_value() for n in names}

        @tf.function(input_signature=weight_specs)
        def set_weights(self, *arrays):
            for n, value in zip(names, arrays, strict=True):
                getattr(self, n).assign(value)
            return {"ok": tf.constant(1.0)}

    if split is None:
        return TrainableHead()

    cut_frames, channels, max_frames = split.frames, split.channels, frames  # `frames` is a signature below
    kernel, bias = tf.constant(split.kernel), tf.constant(split.bias)
    cut_layers = [(tf.constant(k), tf.constant(b)) for k, b in input_layers or ()]

    class AdaptedHead(TrainableHead):
        """The head plus a per-user scale and shift of each channel of the encoder's last block (identity at
        export); ``infer`` goes through them."""

        def __init__(self):
            super().__init__()
            self.adapter_scale = tf.Variable(np.ones(channels, np.float32), name="adapter_scale")
            self.adapter_shift = tf.Variable(np.zeros(channels, np.float32), name="adapter_shift")

        def cut(self, features):
            return tf.graph_util.import_graph_def(
                split.graph_def, input_map={split.input_name: features}, return_elements=[split.output_name],
                name="encoder_frames")[0]

        def adapted_embedding(self, frames_):
            x = _relu_with_builtin_gradient(frames_ * self.adapter_scale + self.adapter_shift)
            pooled = tf.concat([_mean_over_time_with_builtin_gradient(x), _max_over_time_with_builtin_gradient(x)],
                               axis=-1)
            if deep:  # the embedding layer is the head's first layer
                return pooled
            return _relu_with_builtin_gradient(tf.matmul(pooled, kernel) + bias)

        def embed(self, features):
            return self.adapted_embedding(self.cut(features))

        @tf.function(input_signature=[tf.TensorSpec([1, max_frames, n_features], tf.float32, name="features")])
        def infer(self, features):
            emb = self.embed(features)
            return {"probs": tf.nn.softmax(self.logits(emb)), "embedding": emb}

        @tf.function(input_signature=[tf.TensorSpec([1, max_frames, n_features], tf.float32, name="features")])
        def frames(self, features):
            return {"frames": self.cut(features)}

        @tf.function(input_signature=[tf.TensorSpec([batch, cut_frames, channels], tf.float32, name="frames")])
        def adapted(self, frames):
            emb = self.adapted_embedding(frames)
            return {"probs": tf.nn.softmax(self.logits(emb)), "embedding": emb}

        @tf.function(input_signature=[tf.TensorSpec([batch, cut_frames, channels], tf.float32, name="frames"),
                                      *train_specs,
                                      tf.TensorSpec([1], tf.float32, name="adapter_learning_rate")])
        def adapter_train(self, frames, targets, sample_weight, feedback_sign, learning_rate, adapter_learning_rate):
            head_vars = self.head_variables
            adapter_vars = [self.adapter_scale, self.adapter_shift]
            with tf.GradientTape() as tape:
                loss = feedback_loss(self.logits(self.adapted_embedding(frames)), targets, sample_weight,
                                     feedback_sign)
            grads = tape.gradient(loss, head_vars + adapter_vars)
            step, adapter_step = tf.reshape(learning_rate, []), tf.reshape(adapter_learning_rate, [])
            for var, grad in zip(head_vars, grads[:len(head_vars)], strict=True):
                var.assign_sub(step * grad)
            for var, grad in zip(adapter_vars, grads[len(head_vars):], strict=True):
                var.assign_sub(adapter_step * grad)
            return {"loss": loss}

        if input_layers is not None:
            @tf.function(input_signature=[tf.TensorSpec([batch, max_frames, n_features], tf.float32, name="features"),
                                          *train_specs[:3]])
            def input_grad(self, features, targets, sample_weight, feedback_sign):
                """The weighted mean loss of ``features`` through the encoder, the adapter and the head in use, its
                gradient with respect to ``features`` and the probabilities; nothing is trained."""
                with tf.GradientTape() as tape:
                    tape.watch(features)
                    logits = self.logits(self.adapted_embedding(_builtin_cut(features, cut_layers)))
                    loss = feedback_loss(logits, targets, sample_weight, feedback_sign)
                return {"loss": loss, "grad": tape.gradient(loss, features), "probs": tf.nn.softmax(logits)}

        @tf.function(input_signature=[])
        def get_adapter(self):
            return {"scale": self.adapter_scale.read_value(), "shift": self.adapter_shift.read_value()}

        @tf.function(input_signature=[tf.TensorSpec([channels], tf.float32, name="scale"),
                                      tf.TensorSpec([channels], tf.float32, name="shift")])
        def set_adapter(self, scale, shift):
            self.adapter_scale.assign(scale)
            self.adapter_shift.assign(shift)
            return {"ok": tf.constant(1.0)}

    return AdaptedHead()


def freeze_encoder(encoder, frames: int, n_features: int):
    """GraphDef of the encoder at batch 1 with its variables as constants, and its in/out tensor names."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda x: encoder(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, frames, n_features], tf.float32)
    )
    frozen = convert_variables_to_constants_v2(fn, lower_control_flow=False)  # keep functional While (LSTM)
    return frozen.graph.as_graph_def(), frozen.inputs[0].name, frozen.outputs[0].name


def build_trainable_module(encoder, head_weights: dict, metadata: ModelMetadata, *, adapter: bool = True,
                           trainable_embedding: bool = False, input_grad: bool = True):
    """The ``tf.Module`` to convert; with the adapter signatures when ``adapter`` and the encoder allows them.
    ``head_weights`` are the Keras head's ``w0, b0, w1, b1``; with ``trainable_embedding`` the encoder's
    embedding layer joins the head (:func:`deep_head_weights`) and the frozen encoder stops at the pooled vector
    (:func:`deep_cut`; ModelError for an encoder without one). With the adapter and ``input_grad``, a cnn encoder's
    module also has the ``input_grad`` signature."""
    f = metadata.features
    head = {k: np.asarray(head_weights[k], np.float32) for k in head_names(_layers(head_weights))}
    frozen = encoder
    if trainable_embedding:
        frozen = deep_cut(encoder)
        if frozen is None:
            raise ModelError(f"trainable_embedding needs a cnn or dnn encoder with a ReLU embedding layer; "
                             f"{encoder.name} has none")
        head = deep_head_weights(encoder, head)
    graph_def, inp, out = freeze_encoder(frozen, f.max_frames, f.n_features)
    split = adapter_split(encoder, f.max_frames, f.n_features) if adapter else None
    layers = input_cut_layers(encoder) if split is not None and input_grad else None
    module = _make_module(graph_def, inp, out, head, f.max_frames, f.n_features, metadata.num_classes,
                          metadata.train_batch_size, split, deep=trainable_embedding, input_layers=layers)
    if layers is not None:
        _check_builtin_cut(module, layers, f.max_frames, f.n_features)
    return module


def _check_builtin_cut(module, layers, frames: int, n_features: int) -> None:
    """ModelError unless ``input_grad``'s encoder (:func:`_builtin_cut`) computes what the frozen one does, on an
    utterance of random features followed by zero padding (as the SDK's features are)."""
    rng = np.random.default_rng(0)
    x = np.zeros((1, frames, n_features), np.float32)
    x[0, : max(1, frames * 2 // 3)] = rng.normal(size=(max(1, frames * 2 // 3), n_features))
    ref = module.frames(x)["frames"].numpy()
    mine = _builtin_cut(x, layers).numpy()
    diff = float(np.max(np.abs(mine - ref)) / max(float(np.max(np.abs(ref))), 1e-12))
    if not diff < 1e-4:
        raise ModelError(f"input_grad's encoder differs from the frozen one (max relative difference {diff:.2e})")


def cut_metadata(encoder, head_weights: dict, metadata: ModelMetadata, *, trainable_embedding: bool,
                 replay_inputs: tuple | None = None) -> ModelMetadata:
    """``metadata`` for the file :func:`export_tflite` writes: with ``trainable_embedding`` its head layout,
    ``embedding_dim`` and replay set follow the cut at the pooled vector (the replay set recomputed from
    ``replay_inputs`` = (model inputs [N, T, F], class indices [N]), or dropped when they are not given)."""
    if not trainable_embedding:
        return metadata
    cut = deep_cut(encoder)
    if cut is None:
        raise ModelError(f"trainable_embedding needs a cnn or dnn encoder with a ReLU embedding layer; "
                         f"{encoder.name} has none")
    head = deep_head_weights(encoder, head_weights)
    extra = {k: v for k, v in metadata.extra.items() if k != "replay"}
    extra["trainable_embedding"] = True
    if replay_inputs is not None:
        x, y = replay_inputs
        extra["replay"] = ModelMetadata.replay_extra(cut.predict(np.asarray(x, np.float32), verbose=0), np.asarray(y))
    elif "replay" in metadata.extra:
        log.warning("trainable_embedding: the replay set's embeddings are of the old cut and no replay_inputs "
                    "were given, so the file has no replay set")
    return replace(metadata, head_layout=layout_of(head), embedding_dim=int(head["w0"].shape[0]), extra=extra)


def convert_module(module) -> bytes:
    """SavedModel with the five signatures (the adapter's five and ``input_grad`` when the module has them),
    converted with builtin ops only and checked."""
    import tensorflow as tf

    names = (BASE_SIGNATURES + (ADAPTER_SIGNATURES if hasattr(module, "adapter_train") else ())
             + (INPUT_SIGNATURES if hasattr(module, "input_grad") else ()))
    signatures = {name: getattr(module, name).get_concrete_function() for name in names}
    with tempfile.TemporaryDirectory(prefix="fedser-export-") as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(names))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        tflite = converter.convert()
    check_builtin_ops(tflite)
    return tflite


# The SGD rate a deep head's federated updates need (chosen on the device speakers' unanswered clips: 0.01 gave 0.609
# at round 5, the device default 0.05 gave 0.546; docs/results/federated-recovery/deep-head/report.md).
DEEP_HEAD_DEVICE_LEARNING_RATE = 0.01


def export_tflite(encoder, head_weights: dict, metadata: ModelMetadata, out_dir: str | Path,
                  *, name: str = "model", adapter: bool = True, trainable_embedding: bool = False,
                  replay_inputs: tuple | None = None, device_learning_rate: float | None = None,
                  input_grad: bool = True) -> ExportResult:
    """Write ``<name>.tflite`` and ``<name>.json`` (metadata) into ``out_dir``; ``adapter=False`` leaves the
    adapter signatures out (the file older SDKs knew), ``input_grad=False`` the input gradient (the files before it).
    ``trainable_embedding`` (cnn, dnn) puts the encoder's
    embedding layer into the trainable head and rewrites the metadata's cut (:func:`cut_metadata`; give
    ``replay_inputs`` to keep a replay set). ``device_learning_rate`` (else ``metadata``'s, else
    :data:`DEEP_HEAD_DEVICE_LEARNING_RATE` with ``trainable_embedding``) goes into the metadata: the SGD rate
    devices use for federated updates unless their policy sets one."""
    from edge_sdk.storage import atomic_write

    if device_learning_rate is None:
        device_learning_rate = metadata.device_learning_rate
    if device_learning_rate is None and trainable_embedding:
        device_learning_rate = DEEP_HEAD_DEVICE_LEARNING_RATE
    metadata = replace(metadata, device_learning_rate=device_learning_rate)
    metadata = cut_metadata(encoder, head_weights, metadata, trainable_embedding=trainable_embedding,
                            replay_inputs=replay_inputs)
    module = build_trainable_module(encoder, head_weights, metadata, adapter=adapter,
                                    trainable_embedding=trainable_embedding, input_grad=input_grad)
    if metadata.input_affine_from and not hasattr(module, "input_grad"):
        raise ModelError(f"the metadata turns the input affine on (input_affine_from {metadata.input_affine_from}), "
                         "but this export has no input_grad signature (a cnn encoder with the adapter only)")
    tflite = convert_module(module)
    out_dir = Path(out_dir)
    sha = hashlib.sha256(tflite).hexdigest()
    meta = metadata.to_dict()
    meta["extra"] = {**meta.get("extra", {}), "tflite_sha256": sha}
    tflite_path, meta_path = out_dir / f"{name}.tflite", out_dir / f"{name}.json"
    atomic_write(tflite_path, tflite)
    atomic_write(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
    log.info("exported %s (%d bytes, sha256 %s)", tflite_path, len(tflite), sha[:12])
    return ExportResult(tflite_path, meta_path, sha, len(tflite), ModelMetadata.from_dict(meta))


TRAINED_FORMAT = "fedser-trained/1"


def _npz_bytes(arrays: dict) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_trained(encoder, head_weights: dict, metadata: ModelMetadata, out_dir: str | Path, *,
                 trainable_embedding: bool = False, replay_inputs: tuple | None = None) -> Path:
    """What a training run on another Keras backend than TensorFlow leaves for :func:`export_trained`:
    ``trained.npz`` (the encoder's weights in ``encoder.get_weights()`` order, the head's ``w0, b0, w1, b1``, the
    replay inputs; no pickle) and ``trained.json`` (the metadata, the architecture, the export options)."""
    from edge_sdk.storage import atomic_write

    out_dir = Path(out_dir)
    enc = encoder.get_weights()
    arrays = {f"encoder_{i}": np.asarray(w, np.float32) for i, w in enumerate(enc)}
    arrays.update({f"head_{k}": np.asarray(v, np.float32) for k, v in head_weights.items()})
    if replay_inputs is not None:
        arrays["replay_x"] = np.asarray(replay_inputs[0], np.float32)
        arrays["replay_y"] = np.asarray(replay_inputs[1], np.int64)
    atomic_write(out_dir / "trained.npz", _npz_bytes(arrays))
    info = {"format": TRAINED_FORMAT, "metadata": metadata.to_dict(), "encoder_weights": len(enc),
            "trainable_embedding": bool(trainable_embedding),
            "architecture": metadata.extra.get("architecture")}
    atomic_write(out_dir / "trained.json", json.dumps(info, indent=2, sort_keys=True).encode())
    return out_dir / "trained.npz"


def _load_trained(trained_dir: Path) -> tuple[dict, ModelMetadata, dict]:
    """trained.json and trained.npz of a :func:`save_trained` folder, checked; ModelError names what is wrong."""
    import zipfile

    from models.architectures import ArchitectureConfig

    where = f"{trained_dir}/trained.json"
    try:
        info = json.loads((trained_dir / "trained.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where}: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != TRAINED_FORMAT:
        raise ModelError(f"{where} is not a {TRAINED_FORMAT} file")
    if not isinstance(info.get("metadata"), dict):
        raise ModelError(f"{where} holds no model metadata")
    metadata = ModelMetadata.from_dict(info["metadata"])
    if not isinstance(info.get("architecture"), dict):
        raise ModelError(f"{where} names no architecture")
    try:
        info["architecture"] = ArchitectureConfig.from_dict(info["architecture"])
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: bad architecture ({exc})") from exc
    count = info.get("encoder_weights")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= 1000:
        raise ModelError(f"{where}: encoder_weights must be a count in 1..1000, got {count!r}")
    try:
        with np.load(trained_dir / "trained.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{trained_dir}/trained.npz: not a readable .npz of arrays ({exc})") from exc
    for k, v in arrays.items():
        if v.dtype.kind not in "fiu" or not np.all(np.isfinite(v)):
            raise ModelError(f"{trained_dir}/trained.npz: {k} is not finite numbers")
    if ("replay_x" in arrays) != ("replay_y" in arrays):
        raise ModelError(f"{trained_dir}/trained.npz: replay_x and replay_y come together")
    return info, metadata, arrays


def export_trained(trained_dir: str | Path, out_dir: str | Path | None = None) -> ExportResult:
    """Rebuild the encoder of a :func:`save_trained` folder, load its weights and export it as
    :func:`export_tflite` would have at the end of training (into ``out_dir``, default the same folder). Needs the
    TensorFlow Keras backend; ModelError names what is missing or does not fit."""

    from models.architectures import build_encoder

    _require_tensorflow_backend()
    trained_dir = Path(trained_dir)
    info, metadata, arrays = _load_trained(trained_dir)
    arch = info["architecture"]
    encoder = build_encoder(arch, metadata.features.max_frames, metadata.features.n_features)
    shapes = [tuple(w.shape) for w in encoder.get_weights()]
    weights = [arrays.get(f"encoder_{i}") for i in range(info["encoder_weights"])]
    if (len(weights) != len(shapes) or any(w is None for w in weights)
            or [tuple(w.shape) for w in weights] != shapes):
        raise ModelError(f"{trained_dir}/trained.npz: the encoder weights do not fit a {arch.name} encoder of "
                         f"{len(shapes)} arrays")
    encoder.set_weights(weights)
    head = {k[len("head_"):]: v for k, v in arrays.items() if k.startswith("head_")}
    want = {spec.name: tuple(spec.shape) for spec in metadata.head_layout}
    if {k: tuple(v.shape) for k, v in head.items()} != want:
        raise ModelError(f"{trained_dir}/trained.npz: the head arrays do not match the metadata's head layout {want}")
    replay = (arrays["replay_x"], arrays["replay_y"]) if "replay_x" in arrays else None
    return export_tflite(encoder, head, metadata, out_dir if out_dir is not None else trained_dir,
                         trainable_embedding=bool(info.get("trainable_embedding")), replay_inputs=replay)


def _require_tensorflow_backend() -> None:
    """ModelError unless Keras runs on TensorFlow (the TFLite converter needs it)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ModelError(f"the TFLite export needs the TensorFlow Keras backend, not {keras.backend.backend()!r}: "
                         "unset KERAS_BACKEND (or set it to tensorflow)")


def _tflite_constants(tflite_bytes: bytes, signatures: tuple[str, ...]) -> dict[str, tuple[list, list]]:
    """Per signature, the constant weights of the ``CONV_2D`` and ``FULLY_CONNECTED`` operators of its subgraph, in
    the order they run: ``([(filter [out, 1, k, in], bias [out]), ...], [(weights [out, in], bias [out]), ...])``
    (a fully connected layer whose weights are variables, the head's, is left out). The flatbuffer is read once."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_bytes, 0))
    index = {s.signatureKey.decode(): s.subgraphIndex for s in model.signatureDefs}
    missing = [s for s in signatures if s not in index]
    if missing:
        raise ModelError(f"the model has no {missing} signature (has {sorted(index)})")
    return {s: _subgraph_constants(model, model.subgraphs[index[s]], schema) for s in signatures}


def _subgraph_constants(model, graph, schema) -> tuple[list, list]:
    """:func:`_tflite_constants` of one subgraph."""

    def constant(i: int) -> np.ndarray | None:
        if i < 0:
            return None
        tensor = graph.tensors[i]
        data = model.buffers[tensor.buffer].data
        if data is None or len(data) == 0 or tensor.type != schema.TensorType.FLOAT32:
            return None
        return np.frombuffer(bytes(np.asarray(data, np.uint8)), np.float32).reshape(list(tensor.shape)).copy()

    convs, dense = [], []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        if kind not in (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.FULLY_CONNECTED):
            continue
        weights = constant(int(op.inputs[1]))
        bias = constant(int(op.inputs[2])) if len(op.inputs) > 2 else None
        if weights is None:
            continue
        (convs if kind == schema.BuiltinOperator.CONV_2D else dense).append((weights, bias))
    return convs, dense


def reexport_tflite(tflite_path: str | Path, metadata_path: str | Path | None, out_dir: str | Path, *,
                    name: str = "model", check_inputs: int = 8, input_affine_from: int | None = None) -> ExportResult:
    """Rebuild an exported ``cnn`` model from its ``.tflite`` alone and export it again with every signature this
    version of :func:`export_tflite` writes (``input_grad`` among them), the metadata kept (its ``tflite_sha256``
    renewed, ``extra.reexported_from`` the old one).

    The file's frozen convolutions (batch norm folded in by the converter), its embedding layer and its head (read
    through ``get_weights``) go into a Keras encoder of the metadata's architecture whose batch norms are the
    identity. The new file must give the old one's probabilities and embeddings on ``check_inputs`` random
    utterances (1e-4), else ModelError; so must anything else that does not fit (another architecture, masked
    pooling, a file without the adapter's ``frames`` signature). ``input_affine_from`` (given) goes into the metadata:
    from how many answers devices fit the per-user input affine when their policy sets nothing."""

    from edge_sdk.model import ModelMetadata, TFLiteModel
    from edge_sdk.storage import atomic_write
    from models.architectures import ArchitectureConfig, build_encoder

    _require_tensorflow_backend()
    tflite_path = Path(tflite_path)
    metadata_path = Path(metadata_path) if metadata_path is not None else tflite_path.with_suffix(".json")
    for path in (tflite_path, metadata_path):
        if not path.is_file():
            raise ModelError(f"{path}: no such file")
    metadata = ModelMetadata.load(metadata_path)
    blob = tflite_path.read_bytes()
    previous = hashlib.sha256(blob).hexdigest()
    claimed = metadata.extra.get("tflite_sha256")
    if claimed is not None and claimed != previous:
        raise ModelError(f"{metadata_path} describes another file (its tflite_sha256 {str(claimed)[:12]}..., "
                         f"{tflite_path} is {previous[:12]}...)")
    arch_dict = metadata.extra.get("architecture")
    if not isinstance(arch_dict, dict):
        raise ModelError(f"{metadata_path} names no architecture (extra.architecture)")
    arch = ArchitectureConfig.from_dict(arch_dict)
    if arch.name != "cnn" or arch.masked_pooling:
        raise ModelError(f"only a cnn encoder with plain pooling can be rebuilt from its .tflite, not {arch.name}"
                         + (" with masked pooling" if arch.masked_pooling else ""))
    old = TFLiteModel(tflite_path, metadata)
    if not old.has_adapter:
        raise ModelError(f"{tflite_path} has no adapter signatures: its encoder cannot be cut where the adapter is")
    deep = bool(metadata.extra.get("trainable_embedding"))
    constants = _tflite_constants(blob, ("frames", "adapted"))
    convs, infer_dense = constants["frames"][0], constants["adapted"][1]
    f = metadata.features
    encoder = build_encoder(arch, f.max_frames, f.n_features)
    if len(convs) != len(arch.channels):
        raise ModelError(f"{tflite_path}: {len(convs)} convolutions in its frames signature, the architecture has "
                         f"{len(arch.channels)}")
    for i, (filt, bias) in enumerate(convs):
        conv, bn = encoder.get_layer(f"conv{i}"), encoder.get_layer(f"bn{i}")
        kernel = filt[:, 0, :, :].transpose(1, 2, 0)  # [out, 1, k, in] -> Keras's [k, in, out]
        want = tuple(conv.kernel.shape)
        if kernel.shape != want or bias is None or bias.shape != (want[2],):
            raise ModelError(f"{tflite_path}: convolution {i} is {kernel.shape}, the architecture's {want}")
        conv.set_weights([kernel, bias])
        bn.set_weights([np.ones(want[2], np.float32), np.zeros(want[2], np.float32), np.zeros(want[2], np.float32),
                        np.full(want[2], 1.0 - bn.epsilon, np.float32)])  # sqrt(var + epsilon) = 1: the identity
    head = old.get_weights()
    emb_layer = encoder.get_layer("embedding")
    if deep:
        emb_w, emb_b = head["w0"], head["b0"]
        layers = sum(1 for k in head if k.startswith("w"))
        head_weights = {f"{k}{i - 1}": head[f"{k}{i}"] for i in range(1, layers) for k in ("w", "b")}
    else:
        pooled = 2 * arch.channels[-1]
        found = [(w, b) for w, b in infer_dense if w.shape == (arch.embedding_dim, pooled) and b is not None]
        if len(found) != 1:
            raise ModelError(f"{tflite_path}: no single embedding layer [{arch.embedding_dim}, {pooled}] in its "
                             "adapted signature")
        emb_w, emb_b = found[0][0].T, found[0][1]
        head_weights = head
    if tuple(emb_w.shape) != tuple(emb_layer.kernel.shape):
        raise ModelError(f"{tflite_path}: embedding layer {emb_w.shape}, the architecture's {emb_layer.kernel.shape}")
    emb_layer.set_weights([emb_w, emb_b])
    module = build_trainable_module(encoder, head_weights, metadata, adapter=True, trainable_embedding=deep)
    tflite = convert_module(module)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(tflite).hexdigest()
    tflite_out, meta_out = out_dir / f"{name}.tflite", out_dir / f"{name}.json"
    with tempfile.TemporaryDirectory(prefix="fedser-reexport-") as tmp:
        candidate = Path(tmp) / "model.tflite"
        candidate.write_bytes(tflite)
        new = TFLiteModel(candidate, metadata)
        rng = np.random.default_rng(0)
        worst = 0.0
        for _ in range(check_inputs):
            x = np.zeros(new.input_shape[1:], np.float32)
            n = int(rng.integers(f.max_frames // 4, f.max_frames + 1))
            x[:n] = rng.normal(size=(n, f.n_features))
            (p0, e0), (p1, e1) = old.infer(x), new.infer(x)
            worst = max(worst, float(np.max(np.abs(p0 - p1))),
                        float(np.max(np.abs(e0 - e1)) / max(float(np.max(np.abs(e0))), 1.0)))
        if not worst < 1e-4:
            raise ModelError(f"the rebuilt model differs from {tflite_path} (largest difference {worst:.2e})")
    if input_affine_from is not None:
        metadata = replace(metadata, input_affine_from=input_affine_from)
    meta = metadata.to_dict()
    meta["extra"] = {**meta.get("extra", {}), "tflite_sha256": sha, "reexported_from": previous}
    atomic_write(tflite_out, tflite)
    atomic_write(meta_out, json.dumps(meta, indent=2, sort_keys=True).encode())
    log.info("re-exported %s as %s (%d bytes, sha256 %s; largest difference %.1e)", tflite_path, tflite_out,
             len(tflite), sha[:12], worst)
    return ExportResult(tflite_out, meta_out, sha, len(tflite), ModelMetadata.from_dict(meta))
