"""Encoders (frozen on the device) and the trainable head.

Every architecture is an encoder ``[B, T, F] -> [B, E]`` plus the same head:
one hidden dense layer with ReLU, then the logits. The head's arrays are named
``w0, b0, w1, b1`` (the head layout of the model metadata).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_sdk.errors import ParameterError

__all__ = ["ArchitectureConfig", "build_encoder", "build_head", "ARCHITECTURES"]

ARCHITECTURES = ("cnn", "dnn")


@dataclass(frozen=True)
class ArchitectureConfig:
    """Sizes of an encoder and the head.

    Attributes
    ----------
    name : {"cnn", "dnn"}
        ``cnn``: Conv1D stack (study 1's CNN, scaled to a device), global
        average and max pooling, dense embedding. ``dnn``: per-frame dense
        layers, pooled over time, dense embedding.
    channels : tuple of int
        Conv1D filters (cnn) or per-frame units (dnn) per block.
    kernel_size : int
    embedding_dim : int
        E, the width the head sees.
    head_units : int
        Hidden units of the head.
    dropout : float
    """

    name: str = "cnn"
    channels: tuple[int, ...] = (64, 128, 128)
    kernel_size: int = 5
    embedding_dim: int = 128
    head_units: int = 64
    dropout: float = 0.3

    def __post_init__(self) -> None:
        if self.name not in ARCHITECTURES:
            raise ParameterError(f"unknown architecture {self.name!r}; choose one of {ARCHITECTURES}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_encoder(cfg: ArchitectureConfig, frames: int, n_features: int):
    """Keras encoder ``[B, frames, n_features] -> [B, embedding_dim]``."""
    import keras
    from keras import layers

    inp = keras.Input((frames, n_features), name="features")
    x = inp
    if cfg.name == "cnn":
        for i, ch in enumerate(cfg.channels):
            x = layers.Conv1D(ch, cfg.kernel_size, padding="same", name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.Activation("relu")(x)
            if i < len(cfg.channels) - 1:
                x = layers.MaxPooling1D(2, name=f"pool{i}")(x)
    else:
        for i, units in enumerate(cfg.channels):
            x = layers.Dense(units, activation="relu", name=f"frame_dense{i}")(x)
    pooled = layers.Concatenate(name="pool")([layers.GlobalAveragePooling1D()(x), layers.GlobalMaxPooling1D()(x)])
    pooled = layers.Dropout(cfg.dropout)(pooled)
    emb = layers.Dense(cfg.embedding_dim, activation="relu", name="embedding")(pooled)
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
