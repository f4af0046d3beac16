"""The signed model manifest (format version 1).

A model version is a base (the ``.tflite`` file) plus head weights. The
manifest names both by sha256 and URL, carries the model metadata, and is
signed with the server's Ed25519 key, which the device pins at enrollment.

On the wire::

    {"manifest": {...}, "signature": "<base64 Ed25519 over MANIFEST_DOMAIN + canonical_json(manifest)>"}
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge_sdk.errors import SignatureError, WireFormatError
from edge_sdk.model import ModelMetadata
from edge_sdk.wire import canonical_json, utc_now

__all__ = ["BlobRef", "Manifest", "SignedManifest", "MANIFEST_FORMAT_VERSION", "MANIFEST_DOMAIN", "MAX_BLOB_BYTES"]

MANIFEST_FORMAT_VERSION = 1
MANIFEST_DOMAIN = b"fedser/manifest/v1\x00"
MAX_BLOB_BYTES = 1 << 30  # a model file larger than 1 GiB is refused before anything is downloaded


@dataclass(frozen=True)
class BlobRef:
    """A file named by content: sha256, size in bytes, and where to fetch it."""

    sha256: str
    size: int
    url: str

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "url": self.url}

    @classmethod
    def from_dict(cls, data: Mapping) -> BlobRef:
        sha = str(data["sha256"])
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise WireFormatError(f"blob sha256 {sha!r} is not 64 lowercase hex digits")
        size = data["size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_BLOB_BYTES:
            raise WireFormatError(f"blob size {size!r} is not an integer in 1..{MAX_BLOB_BYTES}")
        return cls(sha, size, str(data["url"]))


@dataclass(frozen=True)
class Manifest:
    """One published model version."""

    version: int
    base: BlobRef
    head: BlobRef
    metadata: ModelMetadata
    created_at: str = field(default_factory=utc_now)
    parent_version: int | None = None
    round_id: int | None = None
    metrics: dict = field(default_factory=dict)
    format_version: int = MANIFEST_FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "version": self.version,
            "parent_version": self.parent_version,
            "round_id": self.round_id,
            "base": self.base.to_dict(),
            "head": self.head.to_dict(),
            "model": self.metadata.to_dict(),
            "created_at": self.created_at,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Manifest:
        if data.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise WireFormatError(
                f"manifest format_version {data.get('format_version')!r} is not supported "
                f"(this side speaks {MANIFEST_FORMAT_VERSION})"
            )
        try:
            return cls(
                version=int(data["version"]),
                parent_version=None if data.get("parent_version") is None else int(data["parent_version"]),
                round_id=None if data.get("round_id") is None else int(data["round_id"]),
                base=BlobRef.from_dict(data["base"]),
                head=BlobRef.from_dict(data["head"]),
                metadata=ModelMetadata.from_dict(data["model"]),
                created_at=str(data["created_at"]),
                metrics=dict(data.get("metrics") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireFormatError(f"malformed manifest: {exc!r}") from exc

    def sign(self, sign_fn) -> SignedManifest:
        payload = canonical_json(self.to_dict())
        return SignedManifest(self, sign_fn(MANIFEST_DOMAIN + payload))


@dataclass(frozen=True)
class SignedManifest:
    manifest: Manifest
    signature: bytes

    def to_bytes(self) -> bytes:
        doc = {"manifest": self.manifest.to_dict(), "signature": base64.b64encode(self.signature).decode("ascii")}
        return canonical_json(doc)

    @classmethod
    def from_bytes(cls, data: bytes, verify_fn) -> SignedManifest:
        """Parse and verify with ``verify_fn(signature, message)``; nothing unverified comes back."""
        try:
            doc = json.loads(data.decode("utf-8"))
            payload = doc["manifest"]
            signature = base64.b64decode(doc["signature"], validate=True)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
            raise WireFormatError(f"not a signed manifest document: {exc!r}") from exc
        try:
            verify_fn(signature, MANIFEST_DOMAIN + canonical_json(payload))
        except SignatureError:
            raise
        except Exception as exc:
            raise SignatureError("manifest signature does not verify with the pinned server key") from exc
        return cls(Manifest.from_dict(payload), signature)
