"""Encoders (frozen on the device) and the trainable head.

Every architecture is an encoder ``[B, T, F] -> [B, E]`` plus the same head:
one hidden dense layer with ReLU, then the logits. The head's arrays are named
``w0, b0, w1, b1`` (the head layout of the model metadata). The four encoders
are those of the studies in ``shared/notes/prior-work.md``, sized for a device:

``dnn``
    Dense network (study 1): per-frame dense layers, pooled over time, a dense
    embedding.
``cnn``
    Conv1D stack (studies 1 and 2): Conv1D + batch norm + ReLU blocks with
    max-pooling, global average and max pooling, a dense embedding.
``lstm``
    LSTM (studies 1 and 2): a strided Conv1D front end (to shorten the
    sequence), one or more LSTM layers, mean and last-step pooling, a dense
    embedding.
``afcn``
    Attention-pooled fully convolutional network (study 3, after Zhang et al.
    2019): Conv1D blocks with strides, max-pool 3 / stride 2, then attention
    ``e_i = u^T tanh(W a_i + b)``, ``alpha = softmax(lambda * e)``,
    ``c = sum_i alpha_i a_i``, and a dense tanh embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_sdk.errors import ParameterError

__all__ = ["ArchitectureConfig", "build_encoder", "build_head", "ARCHITECTURES", "preset", "AttentionPooling",
           "MaskedPooling"]

ARCHITECTURES = ("dnn", "cnn", "lstm", "afcn")


@dataclass(frozen=True)
class ArchitectureConfig:
    """Sizes of an encoder and the head.

    Attributes
    ----------
    name : {"dnn", "cnn", "lstm", "afcn"}
    channels : tuple of int
        Per-block width: Conv1D filters (cnn, afcn, lstm front end) or
        per-frame dense units (dnn).
    kernel_size : int
        Conv1D kernel (cnn, lstm front end).
    kernels, strides : tuple of int
        Per-block kernels and strides of the afcn (study 3: 11, 5, 3, 3 and
        4, 1, 1, 1).
    lstm_units : tuple of int
        Units of each LSTM layer (lstm).
    attention_dim : int
        Width of ``W`` in the attention (afcn).
    attention_lambda : float
        The ``lambda`` scaling the attention logits (study 3: 0.8).
    embedding_dim : int
        E, the width the head sees.
    head_units : int
        Hidden units of the head.
    dropout : float
    masked_pooling : bool
        cnn and dnn: pool over the utterance's own frames only. Inputs shorter
        than the model's frame count are padded with zero rows (the mean);
        plain global pooling averages those rows in, so the embedding also
        says how long the utterance was. With this on, a frame whose features
        are all exactly zero is padding, and average and max pooling skip it.
    """

    name: str = "cnn"
    channels: tuple[int, ...] = (64, 128, 128)
    kernel_size: int = 5
    kernels: tuple[int, ...] = (11, 5, 3, 3)
    strides: tuple[int, ...] = (4, 1, 1, 1)
    lstm_units: tuple[int, ...] = (128,)
    attention_dim: int = 64
    attention_lambda: float = 0.8
    embedding_dim: int = 128
    head_units: int = 64
    dropout: float = 0.3
    masked_pooling: bool = False

    def __post_init__(self) -> None:
        if self.name not in ARCHITECTURES:
            raise ParameterError(f"unknown architecture {self.name!r}; choose one of {ARCHITECTURES}")
        for attr in ("channels", "kernels", "strides", "lstm_units"):
            value = tuple(int(v) for v in getattr(self, attr))
            if not value or min(value) < 1:
                raise ParameterError(f"{attr} must be a non-empty list of positive integers, got {value}")
            object.__setattr__(self, attr, value)
        if self.name == "afcn" and not (len(self.channels) == len(self.kernels) == len(self.strides)):
            raise ParameterError(
                f"afcn needs one kernel and one stride per block: channels {self.channels}, "
                f"kernels {self.kernels}, strides {self.strides}")
        if not 0.0 <= self.dropout < 1.0:
            raise ParameterError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.embedding_dim < 1 or self.head_units < 1:
            raise ParameterError("embedding_dim and head_units must be positive")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> ArchitectureConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ParameterError(f"unknown architecture fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


_PRESETS: dict[str, dict] = {
    "dnn": {"channels": (256, 256)},
    "cnn": {"channels": (64, 128, 128), "kernel_size": 5},
    "lstm": {"channels": (64,), "kernel_size": 5, "lstm_units": (128,)},
    "afcn": {"channels": (32, 64, 96, 128), "kernels": (11, 5, 3, 3), "strides": (2, 1, 1, 1)},
}


def preset(name: str, **overrides) -> ArchitectureConfig:
    """The default sizes of architecture ``name`` (what ``fedser-train --architecture`` uses)."""
    if name not in _PRESETS:
        raise ParameterError(f"unknown architecture {name!r}; choose one of {ARCHITECTURES}")
    return ArchitectureConfig(name=name, **{**_PRESETS[name], **overrides})


def _attention_pooling_class():
    import keras
    from keras import layers, ops

    class AttentionPooling(layers.Layer):
        """``c = sum_i softmax(lambda * u^T tanh(W a_i + b))_i a_i`` over the time axis."""

        def __init__(self, units: int, scale: float, **kwargs):
            super().__init__(**kwargs)
            self.units, self.scale = units, scale

        def build(self, input_shape):
            dim = int(input_shape[-1])
            self.w = self.add_weight(shape=(dim, self.units), initializer="glorot_uniform", name="W")
            self.b = self.add_weight(shape=(self.units,), initializer="zeros", name="b")
            self.u = self.add_weight(shape=(self.units,), initializer="glorot_uniform", name="u")

        def call(self, a):
            e = ops.tensordot(ops.tanh(ops.tensordot(a, self.w, axes=1) + self.b), self.u, axes=1)  # [B, T]
            alpha = ops.softmax(self.scale * e, axis=-1)
            return ops.sum(a * ops.expand_dims(alpha, -1), axis=1)

        def get_config(self):
            return {**super().get_config(), "units": self.units, "scale": self.scale}

    keras.saving.register_keras_serializable("fedser")(AttentionPooling)
    return AttentionPooling


def _masked_pooling_class():
    import keras
    from keras import layers, ops

    class MaskedPooling(layers.Layer):
        """Mean and max over time of ``x`` ``[B, T', C]`` (non-negative, after ReLU) at the frames that are not
        padding; the padding mask comes from the model input ``[B, T, F]`` (a row of exact zeros), downsampled
        by ``pool`` (the product of the encoder's max-pooling sizes)."""

        def __init__(self, pool: int, **kwargs):
            super().__init__(**kwargs)
            self.pool = pool

        def call(self, x, features):
            mask = ops.cast(ops.sum(ops.abs(features), axis=-1) > 0.0, x.dtype)  # [B, T]
            if self.pool > 1:
                steps = ops.shape(x)[1]
                mask = ops.max(ops.reshape(mask[:, : steps * self.pool], (-1, steps, self.pool)), axis=-1)
            mask = ops.expand_dims(mask, -1)
            mean = ops.sum(x * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)
            return ops.concatenate([mean, ops.max(x * mask, axis=1)], axis=-1)

        def get_config(self):
            return {**super().get_config(), "pool": self.pool}

    keras.saving.register_keras_serializable("fedser")(MaskedPooling)
    return MaskedPooling


_ATTENTION = None
_MASKED = None


def MaskedPooling(pool: int, **kwargs):  # noqa: N802 - a layer factory
    """Mean and max pooling over the frames that are not padding (keras is imported on first use)."""
    global _MASKED
    if _MASKED is None:
        _MASKED = _masked_pooling_class()
    return _MASKED(pool, **kwargs)


def AttentionPooling(units: int, scale: float, **kwargs):  # noqa: N802 - a layer factory
    """The attention pooling layer of study 3 (keras is imported on first use)."""
    global _ATTENTION
    if _ATTENTION is None:
        _ATTENTION = _attention_pooling_class()
    return _ATTENTION(units, scale, **kwargs)


def build_encoder(cfg: ArchitectureConfig, frames: int, n_features: int):
    """Keras encoder ``[B, frames, n_features] -> [B, embedding_dim]``."""
    import keras
    from keras import layers

    inp = keras.Input((frames, n_features), name="features")
    x = inp
    emb_activation = "relu"
    if cfg.name == "cnn":
        for i, ch in enumerate(cfg.channels):
            x = layers.Conv1D(ch, cfg.kernel_size, padding="same", name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.Activation("relu")(x)
            if i < len(cfg.channels) - 1:
                x = layers.MaxPooling1D(2, name=f"pool{i}")(x)
        if cfg.masked_pooling:
            pooled = MaskedPooling(2 ** (len(cfg.channels) - 1), name="pool")(x, inp)
        else:
            pooled = layers.Concatenate(name="pool")([layers.GlobalAveragePooling1D()(x),
                                                      layers.GlobalMaxPooling1D()(x)])
    elif cfg.name == "dnn":
        for i, units in enumerate(cfg.channels):
            x = layers.Dense(units, activation="relu", name=f"frame_dense{i}")(x)
        if cfg.masked_pooling:
            pooled = MaskedPooling(1, name="pool")(x, inp)
        else:
            pooled = layers.Concatenate(name="pool")([layers.GlobalAveragePooling1D()(x),
                                                      layers.GlobalMaxPooling1D()(x)])
    elif cfg.name == "lstm":
        for i, ch in enumerate(cfg.channels):
            x = layers.Conv1D(ch, cfg.kernel_size, padding="same", name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.Activation("relu")(x)
            x = layers.MaxPooling1D(3, strides=3, name=f"pool{i}")(x)
        for i, units in enumerate(cfg.lstm_units):
            x = layers.LSTM(units, return_sequences=True, name=f"lstm{i}")(x)
        last = layers.Lambda(lambda t: t[:, -1, :], name="last_step")(x)
        pooled = layers.Concatenate(name="pool")([layers.GlobalAveragePooling1D()(x), last])
    else:  # afcn
        for i, (ch, k, s) in enumerate(zip(cfg.channels, cfg.kernels, cfg.strides, strict=True)):
            x = layers.Conv1D(ch, k, strides=s, padding="same", name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.Activation("relu")(x)
            x = layers.MaxPooling1D(3, strides=2, padding="same", name=f"pool{i}")(x)
        pooled = AttentionPooling(cfg.attention_dim, cfg.attention_lambda, name="attention")(x)
        emb_activation = "tanh"
    pooled = layers.Dropout(cfg.dropout)(pooled)
    emb = layers.Dense(cfg.embedding_dim, activation=emb_activation, name="embedding")(pooled)
    return keras.Model(inp, emb, name=f"{cfg.name}_encoder")


def build_head(cfg: ArchitectureConfig, num_classes: int):
    """Keras head ``[B, E] -> logits [B, C]``; its weights map to ``w0, b0, w1, b1``."""
    import keras
    from keras import layers

    inp = keras.Input((cfg.embedding_dim,), name="embedding")
    x = layers.Dropout(cfg.dropout)(inp)
    x = layers.Dense(cfg.head_units, activation="relu", name="head_hidden")(x)
    logits = layers.Dense(num_classes, name="head_logits")(x)
    return keras.Model(inp, logits, name="head")
