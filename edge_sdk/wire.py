"""Bytes that cross the wire or the disk between a device and the aggregator.

This module is the one place those bytes are defined; the aggregator imports
it, so the two sides cannot disagree.

Arrays
    A *head layout* is an ordered list of ``(name, shape, dtype)``. A set of
    arrays in that layout travels as the concatenation of each array's raw
    little-endian bytes in layout order (C order). Nothing else: no pickle,
    no object arrays, ever. The layout itself travels as canonical JSON and is
    pinned by its sha256.

Update envelope (format version 1)
    ::

        b"FSU1"                      4 bytes, magic
        header_len                   uint32 little-endian
        header                       canonical JSON, UTF-8 (see UpdateHeader)
        signature                    64 bytes, Ed25519 over UPDATE_DOMAIN + header
        body                         head deltas in the header's layout

    The header carries the body's length and sha256, so the signature over the
    header covers the body as well.

Ranges (both sides check them; out of range is a :class:`FieldRangeError`, on the
server a 400 ``out_of_range`` naming the field)
    ============== ==========================================================
    device_id      1-40 characters of ``A-Z a-z 0-9 . _ -`` (:data:`DEVICE_ID_RE`)
    base_version   1 .. 2**31-1 (:data:`MAX_VERSION`)
    num_examples   1 .. 1,000,000 (:data:`MAX_NUM_EXAMPLES`)
    sequence       0 .. 2**53-1 (:data:`MAX_SEQUENCE`, exact in every JSON parser)
    body_len       0 .. 2**30 (:data:`MAX_BODY_LEN`)
    layout         1-256 arrays; names 1-128 characters; 0-8 dimensions of 0 .. 2**31-1
    layout_sha256, body_sha256   64 lowercase hex digits
    created_at     ISO 8601, at most 40 characters
    privacy        at most 16 keys of at most 64 characters; values null, booleans,
                   finite numbers or strings of at most 64 characters
    header         at most 64 KiB of canonical JSON (no NaN, no Infinity)
    ============== ==========================================================

    Signed request headers: ``X-Fedser-Device`` as ``device_id``;
    ``X-Fedser-Timestamp`` Unix seconds as 1-12 digits with at most 9 decimals
    (:func:`parse_request_timestamp`; no ``nan``, ``inf`` or exponent);
    ``X-Fedser-Signature`` base64 of 64 bytes (at most 128 characters).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from edge_sdk.errors import SignatureError, WireFormatError

__all__ = [
    "ArraySpec",
    "HeadLayout",
    "canonical_json",
    "pack_arrays",
    "unpack_arrays",
    "UpdateHeader",
    "UpdateEnvelope",
    "UPDATE_FORMAT_VERSION",
    "REPORT_FIELDS",
    "check_answer_report",
    "UPDATE_MAGIC",
    "UPDATE_DOMAIN",
    "REQUEST_DOMAIN",
    "REQUEST_HEADERS",
    "request_signing_message",
    "parse_request_timestamp",
    "valid_device_id",
    "FieldRangeError",
    "utc_now",
    "MAX_VERSION",
    "MAX_SEQUENCE",
    "MAX_NUM_EXAMPLES",
]

UPDATE_FORMAT_VERSION = 1
UPDATE_MAGIC = b"FSU1"
UPDATE_DOMAIN = b"fedser/update/v1\x00"
REQUEST_DOMAIN = b"fedser/request/v1\x00"
REQUEST_HEADERS = ("X-Fedser-Device", "X-Fedser-Timestamp", "X-Fedser-Signature")

MAX_INT32 = 2**31 - 1
MAX_VERSION = MAX_INT32  # model versions (and the base_version of an update)
MAX_SEQUENCE = 2**53 - 1  # per-device update sequence: exact as a JSON number everywhere
MAX_NUM_EXAMPLES = 1_000_000  # examples one update may claim (the server caps their FedAvg weight further)
MAX_BODY_LEN = 2**30
MAX_DEVICE_ID_LEN = 40
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,40}")
MAX_SIGNATURE_HEADER_LEN = 128
MAX_LAYOUT_ARRAYS = 256
MAX_ARRAY_NAME_LEN = 128
MAX_ARRAY_NDIM = 8
MAX_CREATED_AT_LEN = 40
MAX_PRIVACY_KEYS = 16
MAX_PRIVACY_STR_LEN = 64
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


class FieldRangeError(WireFormatError):
    """A field has the right type but a value outside its documented range."""


def valid_device_id(value: object) -> bool:
    """Whether ``value`` is a device id in the documented alphabet and length (1-40 of ``A-Za-z0-9._-``)."""
    return isinstance(value, str) and DEVICE_ID_RE.fullmatch(value) is not None


def parse_request_timestamp(value: str) -> float:
    """The ``X-Fedser-Timestamp`` header as Unix seconds: 1-12 digits, optionally ``.`` and 1-9 more.

    Raises
    ------
    FieldRangeError
        For anything else (``nan``, ``inf``, ``1e9``, a sign, spaces, more digits).
    """
    if not isinstance(value, str) or _TIMESTAMP_RE.fullmatch(value) is None:
        shown = value[:40] if isinstance(value, str) else value
        raise FieldRangeError(f"request timestamp {shown!r} is not Unix seconds as 1-12 digits with at most 9 "
                              "decimals")
    return float(value)


def request_signing_message(method: str, path: str, timestamp: str) -> bytes:
    """What a device signs to authenticate a request without a body (GET of the manifest or a blob).

    ``REQUEST_DOMAIN + METHOD + "\\n" + path (with query) + "\\n" + timestamp``; the
    server refuses timestamps further than a few minutes from its clock.
    """
    return REQUEST_DOMAIN + f"{method.upper()}\n{path}\n{timestamp}".encode()
SIGNATURE_LEN = 64
# Optional header fields: the device's answer report (aggregates only; see UpdateHeader).
REPORT_FIELDS = ("answers_scored", "personal_correct", "global_correct")
MAX_ANSWERS_SCORED = 1_000_000
MAX_HEADER_LEN = 64 * 1024
_ALLOWED_DTYPES = ("float32", "float16", "float64")


def canonical_json(obj: object) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8, finite numbers only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def utc_now() -> str:
    """Current time as an ISO 8601 UTC string with a ``Z`` suffix, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class ArraySpec:
    """One array of a head layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 1 <= len(self.name) <= MAX_ARRAY_NAME_LEN:
            raise FieldRangeError(f"array name {str(self.name)[:40]!r}: must be 1-{MAX_ARRAY_NAME_LEN} characters")
        if self.dtype not in _ALLOWED_DTYPES:
            raise WireFormatError(f"array {self.name!r}: dtype {self.dtype!r} is not one of {_ALLOWED_DTYPES}")
        if len(self.shape) > MAX_ARRAY_NDIM:
            raise FieldRangeError(f"array {self.name!r}: {len(self.shape)} dimensions, the limit is {MAX_ARRAY_NDIM}")
        if any((not isinstance(d, int)) or not 0 <= d <= MAX_INT32 for d in self.shape):
            raise FieldRangeError(f"array {self.name!r}: bad shape {self.shape!r} (dimensions 0 .. {MAX_INT32})")

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class HeadLayout(tuple):
    """Ordered ``ArraySpec`` s of a model's trainable head."""

    def __new__(cls, specs: Iterable[ArraySpec]) -> HeadLayout:
        specs = tuple(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise WireFormatError(f"head layout repeats a name: {names}")
        if not specs:
            raise WireFormatError("head layout is empty")
        if len(specs) > MAX_LAYOUT_ARRAYS:
            raise FieldRangeError(f"head layout has {len(specs)} arrays, the limit is {MAX_LAYOUT_ARRAYS}")
        return super().__new__(cls, specs)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self)

    @property
    def num_parameters(self) -> int:
        return sum(s.size for s in self)

    def to_json(self) -> list[list]:
        return [[s.name, list(s.shape), s.dtype] for s in self]

    @classmethod
    def from_json(cls, data: Sequence) -> HeadLayout:
        if isinstance(data, (list, tuple)) and len(data) > MAX_LAYOUT_ARRAYS:
            raise FieldRangeError(f"head layout has {len(data)} arrays, the limit is {MAX_LAYOUT_ARRAYS}")
        try:
            return cls(ArraySpec(str(n), tuple(int(d) for d in shape), str(dt)) for n, shape, dt in data)
        except WireFormatError:
            raise
        except (TypeError, ValueError) as exc:
            raise WireFormatError(f"malformed head layout {str(data)[:200]}: {exc}") from exc

    @property
    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()


def pack_arrays(layout: HeadLayout, arrays: Mapping[str, np.ndarray]) -> bytes:
    """Raw little-endian bytes of ``arrays`` in ``layout`` order.

    Raises
    ------
    WireFormatError
        When a name is missing or extra, a shape differs, or a value is not finite.
    """
    extra = set(arrays) - set(layout.names)
    if extra:
        raise WireFormatError(f"arrays not in the head layout: {sorted(extra)}")
    parts = []
    for spec in layout:
        if spec.name not in arrays:
            raise WireFormatError(f"array {spec.name!r} of the head layout is missing")
        arr = np.asarray(arrays[spec.name])
        if tuple(arr.shape) != spec.shape:
            raise WireFormatError(f"array {spec.name!r} has shape {arr.shape}, layout says {spec.shape}")
        if not np.all(np.isfinite(arr)):
            raise WireFormatError(f"array {spec.name!r} contains NaN or Inf")
        parts.append(np.ascontiguousarray(arr, dtype=np.dtype(spec.dtype).newbyteorder("<")).tobytes())
    return b"".join(parts)


def unpack_arrays(layout: HeadLayout, data: bytes, *, check_finite: bool = True) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays`; returns native-endian, writable arrays."""
    if len(data) != layout.nbytes:
        raise WireFormatError(f"array bytes are {len(data)} long, the head layout needs {layout.nbytes}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for spec in layout:
        chunk = data[offset : offset + spec.nbytes]
        offset += spec.nbytes
        arr = np.frombuffer(chunk, dtype=np.dtype(spec.dtype).newbyteorder("<")).reshape(spec.shape)
        arr = arr.astype(np.dtype(spec.dtype).newbyteorder("="), copy=True)
        if check_finite and not np.all(np.isfinite(arr)):
            raise WireFormatError(f"array {spec.name!r} contains NaN or Inf")
        out[spec.name] = arr
    return out


def check_answer_report(report: Mapping) -> None:
    """Range-check an answer report: none of :data:`REPORT_FIELDS` or all three, ints, ``0 <= correct <= scored``."""
    if not report:
        return
    missing = [k for k in REPORT_FIELDS if k not in report]
    if missing:
        raise WireFormatError(f"answer report fields come all together: missing {missing}")
    for name in REPORT_FIELDS:
        value = report[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise WireFormatError(f"update header field {name!r} must be int, got {value!r}")
    scored = report["answers_scored"]
    if not 0 <= scored <= MAX_ANSWERS_SCORED:
        raise WireFormatError(f"answers_scored must be in [0, {MAX_ANSWERS_SCORED}], got {scored}")
    for name in ("personal_correct", "global_correct"):
        if not 0 <= report[name] <= scored:
            raise WireFormatError(f"{name} must be in [0, answers_scored={scored}], got {report[name]}")


@dataclass(frozen=True)
class UpdateHeader:
    """What a device says about one update; signed together with the body's digest.

    Attributes
    ----------
    device_id : str
        The id the aggregator gave the device at enrollment.
    base_version : int
        Model version whose head the delta was computed against.
    layout : list
        Head layout (``HeadLayout.to_json()``) of the body.
    layout_sha256 : str
        sha256 of the layout's canonical JSON.
    num_examples : int
        Feedback examples the local training used (the FedAvg weight).
    sequence : int
        Strictly increasing per device; the server refuses replays.
    created_at : str
        ISO 8601 UTC.
    body_len, body_sha256 : int, str
        Length and digest of the body.
    privacy : dict
        Clipping norm and noise multiplier applied before signing (empty when none).
    format_version : int
        :data:`UPDATE_FORMAT_VERSION`.
    answers_scored, personal_correct, global_correct : int, optional
        The device's answer report (:mod:`edge_sdk.report`): of ``answers_scored`` answers with a known label
        that personalisation did not train on, how many the personal head and the global head got right.
        Aggregates only. All three or none: a header without them (older SDKs) is unchanged, byte for byte.
    """

    device_id: str
    base_version: int
    layout: list
    layout_sha256: str
    num_examples: int
    sequence: int
    created_at: str
    body_len: int
    body_sha256: str
    privacy: dict
    format_version: int = UPDATE_FORMAT_VERSION
    answers_scored: int | None = None
    personal_correct: int | None = None
    global_correct: int | None = None

    def to_bytes(self) -> bytes:
        return canonical_json({f: getattr(self, f) for f in self.__dataclass_fields__
                               if not (f in REPORT_FIELDS and getattr(self, f) is None)})

    @classmethod
    def from_bytes(cls, data: bytes) -> UpdateHeader:
        try:
            obj = json.loads(data.decode("utf-8"), parse_constant=refuse_json_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, NaN, 4300+ digits
            raise WireFormatError(f"update header is not UTF-8 JSON: {str(exc)[:200]}") from exc
        if not isinstance(obj, dict):
            raise WireFormatError("update header is not a JSON object")
        version = obj.get("format_version")
        if version != UPDATE_FORMAT_VERSION:
            raise WireFormatError(
                f"update format_version {version!r} is not supported (this side speaks {UPDATE_FORMAT_VERSION})"
            )
        expected = set(cls.__dataclass_fields__)
        missing, extra = expected - set(obj) - set(REPORT_FIELDS), set(obj) - expected
        if missing or extra:
            raise WireFormatError(f"update header fields: missing {sorted(missing)}, unexpected {sorted(extra)}")
        types = {
            "device_id": str, "base_version": int, "layout": list, "layout_sha256": str,
            "num_examples": int, "sequence": int, "created_at": str, "body_len": int,
            "body_sha256": str, "privacy": dict,
        }
        for name, typ in types.items():
            if not isinstance(obj[name], typ) or isinstance(obj[name], bool):
                raise WireFormatError(f"update header field {name!r} must be {typ.__name__}, "
                                      f"got {str(obj[name])[:80]!r}")
        _check_header_ranges(obj)
        check_answer_report({k: obj[k] for k in REPORT_FIELDS if k in obj})
        return cls(**obj)

    def check(self) -> None:
        """Raise :class:`FieldRangeError` when a field is outside its documented range (see the module)."""
        _check_header_ranges({f: getattr(self, f) for f in self.__dataclass_fields__})

    def head_layout(self) -> HeadLayout:
        layout = HeadLayout.from_json(self.layout)
        if layout.sha256 != self.layout_sha256:
            raise WireFormatError("layout_sha256 does not match the layout in the header")
        return layout


def refuse_json_constant(name: str):
    """``parse_constant`` for :func:`json.loads`: NaN, Infinity and -Infinity are refused (ValueError)."""
    raise ValueError(f"{name} is not a JSON number")


def _check_int(obj: Mapping, name: str, low: int, high: int) -> None:
    if not low <= obj[name] <= high:
        raise FieldRangeError(f"update header field {name!r} is {str(obj[name])[:40]}, outside its range "
                              f"{low} .. {high}" + (" (it must be positive)" if low == 1 else ""))


def _check_header_ranges(obj: Mapping) -> None:
    if not valid_device_id(obj["device_id"]):
        raise FieldRangeError(f"update header field 'device_id' {str(obj['device_id'])[:40]!r} is not 1-"
                              f"{MAX_DEVICE_ID_LEN} characters of A-Z a-z 0-9 . _ -")
    _check_int(obj, "base_version", 1, MAX_VERSION)
    _check_int(obj, "num_examples", 1, MAX_NUM_EXAMPLES)
    _check_int(obj, "sequence", 0, MAX_SEQUENCE)
    _check_int(obj, "body_len", 0, MAX_BODY_LEN)
    for name in ("layout_sha256", "body_sha256"):
        if not isinstance(obj[name], str) or _SHA256_RE.fullmatch(obj[name]) is None:
            raise FieldRangeError(f"update header field {name!r} is not 64 lowercase hex digits")
    if len(obj["layout"]) > MAX_LAYOUT_ARRAYS:
        raise FieldRangeError(f"update header field 'layout' has {len(obj['layout'])} arrays, the limit is "
                              f"{MAX_LAYOUT_ARRAYS}")
    created = obj["created_at"]
    try:
        if len(created) > MAX_CREATED_AT_LEN:
            raise ValueError("too long")
        datetime.fromisoformat(created)
    except (TypeError, ValueError) as exc:
        raise FieldRangeError(f"update header field 'created_at' {str(created)[:40]!r} is not an ISO 8601 time "
                              f"of at most {MAX_CREATED_AT_LEN} characters") from exc
    privacy = obj["privacy"]
    if len(privacy) > MAX_PRIVACY_KEYS:
        raise FieldRangeError(f"update header field 'privacy' has {len(privacy)} keys, the limit is "
                              f"{MAX_PRIVACY_KEYS}")
    for key, value in privacy.items():
        ok = (len(key) <= MAX_PRIVACY_STR_LEN and (
            value is None or isinstance(value, bool)
            or (isinstance(value, (int, float)) and math.isfinite(value))
            or (isinstance(value, str) and len(value) <= MAX_PRIVACY_STR_LEN)))
        if not ok:
            raise FieldRangeError(f"update header field 'privacy' entry {key[:40]!r}: keys and strings at most "
                                  f"{MAX_PRIVACY_STR_LEN} characters, values null, booleans or finite numbers")


@dataclass(frozen=True)
class UpdateEnvelope:
    """A signed update: header, Ed25519 signature, body of head deltas."""

    header: UpdateHeader
    signature: bytes
    body: bytes

    @classmethod
    def create(
        cls,
        *,
        device_id: str,
        base_version: int,
        layout: HeadLayout,
        deltas: Mapping[str, np.ndarray],
        num_examples: int,
        sequence: int,
        sign: callable,
        privacy: dict | None = None,
        created_at: str | None = None,
        report: Mapping[str, int] | None = None,
    ) -> UpdateEnvelope:
        """Pack ``deltas`` and sign the header with ``sign(message) -> 64 bytes``.

        ``report``: the optional answer report (:data:`REPORT_FIELDS`), range-checked here as on the server.
        """
        report = dict(report or {})
        check_answer_report(report)
        body = pack_arrays(layout, deltas)
        header = UpdateHeader(
            device_id=device_id,
            base_version=int(base_version),
            layout=layout.to_json(),
            layout_sha256=layout.sha256,
            num_examples=int(num_examples),
            sequence=int(sequence),
            created_at=created_at or utc_now(),
            body_len=len(body),
            body_sha256=hashlib.sha256(body).hexdigest(),
            privacy=dict(privacy or {}),
            **{k: int(report[k]) for k in REPORT_FIELDS if k in report},
        )
        header.check()
        header_bytes = header.to_bytes()
        signature = sign(UPDATE_DOMAIN + header_bytes)
        if len(signature) != SIGNATURE_LEN:
            raise WireFormatError(f"signature must be {SIGNATURE_LEN} bytes, got {len(signature)}")
        return cls(header, signature, body)

    def to_bytes(self) -> bytes:
        header_bytes = self.header.to_bytes()
        return UPDATE_MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + self.signature + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[UpdateEnvelope, bytes]:
        """Parse envelope bytes; returns the envelope and the exact header bytes that were signed.

        Checks framing, the header's fields and the body's length and sha256.
        Does not check the signature (the caller knows which key to use):
        see :meth:`verify`.
        """
        if len(data) < 8 or data[:4] != UPDATE_MAGIC:
            raise WireFormatError("not an update envelope: bad magic (expected b'FSU1')")
        (header_len,) = struct.unpack("<I", data[4:8])
        if header_len > MAX_HEADER_LEN:
            raise WireFormatError(f"update header is {header_len} bytes, the limit is {MAX_HEADER_LEN}")
        end_header = 8 + header_len
        if len(data) < end_header + SIGNATURE_LEN:
            raise WireFormatError("update envelope is truncated before the signature")
        header_bytes = bytes(data[8:end_header])
        header = UpdateHeader.from_bytes(header_bytes)
        if header.to_bytes() != header_bytes:
            # One byte sequence per header, so the update id and the signed bytes agree.
            raise WireFormatError("update header is not canonical JSON (sorted keys, no whitespace)")
        signature = bytes(data[end_header : end_header + SIGNATURE_LEN])
        body = bytes(data[end_header + SIGNATURE_LEN :])
        if len(body) != header.body_len:
            raise WireFormatError(f"update body is {len(body)} bytes, header says {header.body_len}")
        if hashlib.sha256(body).hexdigest() != header.body_sha256:
            raise WireFormatError("update body sha256 does not match the header (body altered in transit?)")
        return cls(header, signature, body), header_bytes

    def verify(self, verify_fn: callable, header_bytes: bytes | None = None) -> None:
        """Check the signature with ``verify_fn(signature, message)`` (raises on mismatch)."""
        message = UPDATE_DOMAIN + (header_bytes if header_bytes is not None else self.header.to_bytes())
        try:
            verify_fn(self.signature, message)
        except SignatureError:
            raise
        except Exception as exc:  # cryptography raises InvalidSignature without a message
            raise SignatureError("update signature does not verify with the device's registered key") from exc

    def deltas(self) -> dict[str, np.ndarray]:
        return unpack_arrays(self.header.head_layout(), self.body)

    @property
    def update_id(self) -> str:
        """Stable id of this update: sha256 of the signed header bytes."""
        return hashlib.sha256(self.header.to_bytes()).hexdigest()
