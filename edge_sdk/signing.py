"""Ed25519 keys: the device's identity and the server's publishing key.

Private keys live in PEM files (PKCS#8, unencrypted) created with mode 0600
and written atomically; public keys travel as base64 of the 32 raw bytes.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_sdk.errors import ParameterError, SignatureError
from edge_sdk.storage import atomic_write

__all__ = ["SigningKey", "VerifyKey"]


class VerifyKey:
    """An Ed25519 public key."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key

    @classmethod
    def from_b64(cls, text: str) -> VerifyKey:
        try:
            raw = base64.b64decode(text, validate=True)
            return cls(Ed25519PublicKey.from_public_bytes(raw))
        except (ValueError, TypeError) as exc:
            raise ParameterError(f"not a base64 Ed25519 public key (32 bytes): {text!r:.60}") from exc

    def to_b64(self) -> str:
        raw = self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise :class:`SignatureError` unless ``signature`` signs ``message``."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature as exc:
            raise SignatureError("signature does not verify with the expected Ed25519 key") from exc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.to_b64() == self.to_b64()

    def __hash__(self) -> int:
        return hash(self.to_b64())


class SigningKey:
    """An Ed25519 private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> SigningKey:
        """Load the key at ``path``, or create it there (mode 0600) on first use."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    @classmethod
    def load(cls, path: str | os.PathLike) -> SigningKey:
        path = Path(path)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ParameterError(
                f"private key {path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise ParameterError(f"{path} is not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ParameterError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def save(self, path: str | os.PathLike) -> None:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(Path(path), pem, mode=0o600)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key())
