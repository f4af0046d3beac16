"""Can a stock TFLite runtime compute the gradient of the loss with respect to the model's inputs, builtin ops only?

The input-affine personalisation (README §4) needs d loss / d inputs through the frozen CNN encoder and the head.
This probe writes the shipped CNN's forward by hand from a Keras encoder's weights with builtin-friendly gradients:
  - ReLU through tf.custom_gradient (dy * mask): tf.ReluGrad is a Flex op;
  - MaxPooling1D(2) as reshape [B, T/2, 2, C] + reduce_max (the frames past an even length dropped with tf.slice,
    as Keras's 'valid' pooling does; a strided slice's gradient is a Flex op), whose gradient is an equality mask;
  - Conv1D's input gradient: TensorFlow's Conv2DBackpropInput, which the converter turns into TRANSPOSE_CONV;
  - a static batch (a dynamic one brings tf.BroadcastGradientArgs, a Flex op).
It checks the forward against the Keras encoder, converts with TFLITE_BUILTINS only, runs the signature in
ai-edge-litert and compares its gradient with tf.GradientTape's on the Keras model; then times both signatures.

    python docs/results/personalisation-study/stop21/input_grad_probe.py [--batch 16] [--frames 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _builtin_ops(blob: bytes) -> list[str]:
    """The builtin operator names a .tflite's operator codes list (every subgraph, every signature)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return sorted({names.get(max(c.builtinCode, c.deprecatedBuiltinCode), str(c.builtinCode))
                   for c in model.operatorCodes})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=300, help="250: the second pooling meets an odd length (tf.slice)")
    args = p.parse_args()
    import keras
    import tensorflow as tf

    from models.architectures import ArchitectureConfig, build_encoder, build_head

    frames, bands, classes, batch = args.frames, 40, 4, args.batch
    cfg = ArchitectureConfig()  # the shipped CNN: channels 64, 128, 128, kernel 5, embedding 128, head 64
    keras.utils.set_random_seed(0)
    encoder, head = build_encoder(cfg, frames, bands), build_head(cfg, classes)
    rng = np.random.default_rng(0)
    for i in range(len(cfg.channels)):  # batch-norm statistics as a trained model has them, not 0 and 1
        bn = encoder.get_layer(f"bn{i}")
        g, b, m, v = bn.get_weights()
        bn.set_weights([1 + 0.1 * rng.normal(size=g.shape), 0.1 * rng.normal(size=b.shape),
                        0.1 * rng.normal(size=m.shape), 0.5 + rng.random(v.shape)])
    conv = [(tf.constant(encoder.get_layer(f"conv{i}").kernel.numpy()),
             tf.constant(encoder.get_layer(f"conv{i}").bias.numpy())) for i in range(len(cfg.channels))]
    bn = []
    for i in range(len(cfg.channels)):
        layer = encoder.get_layer(f"bn{i}")
        g, b, m, v = layer.get_weights()
        s = g / np.sqrt(v + layer.epsilon)
        bn.append((tf.constant(s.astype(np.float32)), tf.constant((b - m * s).astype(np.float32))))
    emb_w, emb_b = (tf.constant(w) for w in encoder.get_layer("embedding").get_weights())
    w0, b0, w1, b1 = (tf.constant(w) for w in head.get_weights())

    @tf.custom_gradient
    def relu(x):
        mask = tf.cast(x > 0, x.dtype)
        return x * mask, lambda dy: dy * mask

    def pool2(x):
        t = (x.shape[1] // 2) * 2
        if t != x.shape[1]:  # tf.slice, not x[:, :t]: the gradient of a strided slice is a Flex op, of a slice a PAD
            x = tf.slice(x, [0, 0, 0], [x.shape[0], t, x.shape[2]])
        return tf.reduce_max(tf.reshape(x, [x.shape[0], t // 2, 2, x.shape[2]]), axis=2)

    def logits_of(x):
        for i, ((k, kb), (s, t)) in enumerate(zip(conv, bn, strict=True)):
            x = relu((tf.nn.conv1d(x, k, 1, "SAME") + kb) * s + t)
            if i < len(conv) - 1:
                x = pool2(x)
        pooled = tf.concat([tf.reduce_mean(x, axis=1), tf.reduce_max(x, axis=1)], axis=1)
        emb = relu(tf.matmul(pooled, emb_w) + emb_b)
        return tf.matmul(relu(tf.matmul(emb, w0) + b0), w1) + b1, emb

    class Probe(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([batch, frames, bands], tf.float32),
                                      tf.TensorSpec([batch, classes], tf.float32),
                                      tf.TensorSpec([batch], tf.float32)])
        def input_grad(self, inputs, targets, weights):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                logits, _ = logits_of(inputs)
                loss = tf.reduce_sum(weights * tf.nn.softmax_cross_entropy_with_logits(targets, logits))
            return {"loss": loss, "grad": tape.gradient(loss, inputs)}

        @tf.function(input_signature=[tf.TensorSpec([batch, frames, bands], tf.float32)])
        def infer(self, inputs):
            logits, emb = logits_of(inputs)
            return {"logits": logits, "embedding": emb}

    x = np.zeros((batch, frames, bands), np.float32)
    for j in range(batch):  # utterances of different lengths, zero padding after them
        n = int(rng.integers(min(80, frames // 2), frames))
        x[j, :n] = rng.normal(size=(n, bands))
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch)]
    w = np.ones(batch, np.float32)
    probe = Probe()
    mine = probe.infer(tf.constant(x))["embedding"].numpy()
    ref = encoder(x, training=False).numpy()
    print(f"forward: the hand-written encoder against Keras, max |diff| {np.max(np.abs(mine - ref)):.2e} "
          f"(embeddings up to {np.max(np.abs(ref)):.2f})")

    def keras_grad(inputs):
        xt = tf.constant(inputs)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            logits = head(encoder(xt, training=False), training=False)
            loss = tf.reduce_sum(w * tf.nn.softmax_cross_entropy_with_logits(y, logits))
        return tape.gradient(loss, xt).numpy(), float(loss)

    def rel(a, b):
        return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)

    # Padding frames are equal to one another after the first convolution, so max pooling meets ties there: Keras's
    # MaxPooling1D gives the gradient to the first of a tie, reduce_max splits it (both are gradients of the same
    # function). On utterances that fill every frame there are no ties and the two must agree.
    full = rng.normal(size=(batch, frames, bands)).astype(np.float32)
    mine_full = probe.input_grad(tf.constant(full), tf.constant(y), tf.constant(w))["grad"].numpy()
    agree = rel(mine_full, keras_grad(full)[0])
    print(f"gradient, full-length utterances: hand-written (TensorFlow) against Keras, max |diff| / max |grad| "
          f"{agree:.2e}")
    mine = probe.input_grad(tf.constant(x), tf.constant(y), tf.constant(w))
    ref_grad, ref_loss = mine["grad"].numpy(), float(mine["loss"])
    keras_padded = keras_grad(x)[0]
    speech = np.any(x != 0, axis=2)
    print(f"gradient, padded utterances: hand-written against Keras on speech frames, max |diff| / max |grad| "
          f"{rel(ref_grad[speech], keras_padded[speech]):.2e} (ties in the padding)")

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [probe.input_grad.get_concrete_function(), probe.infer.get_concrete_function()], probe)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    blob = converter.convert()
    path = Path(tempfile.mkdtemp()) / "probe.tflite"
    path.write_bytes(blob)
    print(f"converted with TFLITE_BUILTINS only: {len(blob):,} bytes; builtin operators in the file: "
          f"{', '.join(_builtin_ops(blob))}")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    interp = Interpreter(model_path=str(path), num_threads=1)
    grad_sig, infer_sig = interp.get_signature_runner("input_grad"), interp.get_signature_runner("infer")
    got = grad_sig(inputs=x, targets=y, weights=w)
    print(f"gradient: the TFLite signature against the same function in TensorFlow, max |diff| / max |grad| "
          f"{rel(got['grad'], ref_grad):.2e}; loss {float(got['loss']):.5f} against {ref_loss:.5f}")
    for name, run in (("infer", lambda: infer_sig(inputs=x)), ("input_grad", lambda: grad_sig(inputs=x, targets=y,
                                                                                              weights=w))):
        run()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        print(f"{name}: {1000 * np.median(times):.1f} ms per batch of {batch} on one thread "
              f"({1000 * np.median(times) / batch:.2f} ms per utterance)")


if __name__ == "__main__":
    main()
