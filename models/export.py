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
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.errors import ModelError
from edge_sdk.model import ModelMetadata
from edge_sdk.wire import ArraySpec, HeadLayout

log = logging.getLogger("models")

__all__ = ["head_layout", "export_tflite", "check_builtin_ops", "ExportResult", "HEAD_NAMES",
           "build_trainable_module", "convert_module", "freeze_encoder"]

HEAD_NAMES = ("w0", "b0", "w1", "b1")


def head_layout(embedding_dim: int, head_units: int, num_classes: int) -> HeadLayout:
    return HeadLayout([
        ArraySpec("w0", (embedding_dim, head_units)),
        ArraySpec("b0", (head_units,)),
        ArraySpec("w1", (head_units, num_classes)),
        ArraySpec("b1", (num_classes,)),
    ])


@dataclass(frozen=True)
class ExportResult:
    tflite_path: Path
    metadata_path: Path
    sha256: str
    size: int


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


def _make_module(graph_def, input_name: str, output_name: str, head: dict, frames: int, n_features: int,
                 num_classes: int, batch: int):
    import tensorflow as tf

    emb_dim = head["w0"].shape[0]
    hidden = head["w0"].shape[1]

    class TrainableHead(tf.Module):
        def __init__(self):
            super().__init__(name="fedser")
            self.w0 = tf.Variable(head["w0"], name="w0")
            self.b0 = tf.Variable(head["b0"], name="b0")
            self.w1 = tf.Variable(head["w1"], name="w1")
            self.b1 = tf.Variable(head["b1"], name="b1")

        def logits(self, emb):
            h = _relu_with_builtin_gradient(tf.matmul(emb, self.w0) + self.b0)
            return tf.matmul(h, self.w1) + self.b1

        @tf.function(input_signature=[tf.TensorSpec([1, frames, n_features], tf.float32, name="features")])
        def infer(self, features):
            emb = tf.graph_util.import_graph_def(
                graph_def, input_map={input_name: features}, return_elements=[output_name], name="encoder"
            )[0]
            return {"probs": tf.nn.softmax(self.logits(emb)), "embedding": emb}

        @tf.function(input_signature=[tf.TensorSpec([batch, emb_dim], tf.float32, name="embeddings")])
        def head(self, embeddings):
            return {"probs": tf.nn.softmax(self.logits(embeddings))}

        @tf.function(input_signature=[
            tf.TensorSpec([batch, emb_dim], tf.float32, name="embeddings"),
            tf.TensorSpec([batch, num_classes], tf.float32, name="targets"),
            tf.TensorSpec([batch], tf.float32, name="sample_weight"),
            tf.TensorSpec([batch], tf.float32, name="feedback_sign"),
            # [1], not a scalar: the aarch64 ai-edge-litert builds crash resizing a 0-d input (issue 13)
            tf.TensorSpec([1], tf.float32, name="learning_rate"),
        ])
        def train(self, embeddings, targets, sample_weight, feedback_sign, learning_rate):
            variables = [self.w0, self.b0, self.w1, self.b1]
            with tf.GradientTape() as tape:
                logp = tf.nn.log_softmax(self.logits(embeddings))
                cross_entropy = -tf.reduce_sum(targets * logp, axis=1)
                p_target = tf.reduce_sum(targets * tf.exp(logp), axis=1)
                complementary = -tf.math.log(1.0 - p_target + 1e-6)
                positive = 0.5 * (1.0 + feedback_sign)
                per_sample = positive * cross_entropy + (1.0 - positive) * complementary
                loss = tf.reduce_sum(per_sample * sample_weight) / (tf.reduce_sum(sample_weight) + 1e-8)
            grads = tape.gradient(loss, variables)
            step = tf.reshape(learning_rate, [])
            for var, grad in zip(variables, grads, strict=False):
                var.assign_sub(step * grad)
            return {"loss": loss}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {"w0": self.w0.read_value(), "b0": self.b0.read_value(),
                    "w1": self.w1.read_value(), "b1": self.b1.read_value()}

        @tf.function(input_signature=[
            tf.TensorSpec([emb_dim, hidden], tf.float32, name="w0"),
            tf.TensorSpec([hidden], tf.float32, name="b0"),
            tf.TensorSpec([hidden, num_classes], tf.float32, name="w1"),
            tf.TensorSpec([num_classes], tf.float32, name="b1"),
        ])
        def set_weights(self, w0, b0, w1, b1):
            self.w0.assign(w0)
            self.b0.assign(b0)
            self.w1.assign(w1)
            self.b1.assign(b1)
            return {"ok": tf.constant(1.0)}

    return TrainableHead()


def freeze_encoder(encoder, frames: int, n_features: int):
    """GraphDef of the encoder at batch 1 with its variables as constants, and its in/out tensor names."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda x: encoder(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, frames, n_features], tf.float32)
    )
    frozen = convert_variables_to_constants_v2(fn, lower_control_flow=False)  # keep functional While (LSTM)
    return frozen.graph.as_graph_def(), frozen.inputs[0].name, frozen.outputs[0].name


def build_trainable_module(encoder, head_weights: dict, metadata: ModelMetadata):
    f = metadata.features
    graph_def, inp, out = freeze_encoder(encoder, f.max_frames, f.n_features)
    head = {k: np.asarray(head_weights[k], np.float32) for k in HEAD_NAMES}
    return _make_module(graph_def, inp, out, head, f.max_frames, f.n_features, metadata.num_classes,
                        metadata.train_batch_size)


def convert_module(module) -> bytes:
    """SavedModel with the five signatures, converted with builtin ops only and checked."""
    import tensorflow as tf

    names = ("infer", "head", "train", "get_weights", "set_weights")
    signatures = {name: getattr(module, name).get_concrete_function() for name in names}
    with tempfile.TemporaryDirectory(prefix="fedser-export-") as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(names))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        tflite = converter.convert()
    check_builtin_ops(tflite)
    return tflite


def export_tflite(encoder, head_weights: dict, metadata: ModelMetadata, out_dir: str | Path,
                  *, name: str = "model") -> ExportResult:
    """Write ``<name>.tflite`` and ``<name>.json`` (metadata) into ``out_dir``."""
    from edge_sdk.storage import atomic_write

    module = build_trainable_module(encoder, head_weights, metadata)
    tflite = convert_module(module)
    out_dir = Path(out_dir)
    sha = hashlib.sha256(tflite).hexdigest()
    meta = metadata.to_dict()
    meta["extra"] = {**meta.get("extra", {}), "tflite_sha256": sha}
    tflite_path, meta_path = out_dir / f"{name}.tflite", out_dir / f"{name}.json"
    atomic_write(tflite_path, tflite)
    atomic_write(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
    log.info("exported %s (%d bytes, sha256 %s)", tflite_path, len(tflite), sha[:12])
    return ExportResult(tflite_path, meta_path, sha, len(tflite))
