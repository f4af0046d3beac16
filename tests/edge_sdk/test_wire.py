"""The update envelope and the array format: round trips and every way bytes can be wrong."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge_sdk.errors import SignatureError, WireFormatError
from edge_sdk.signing import SigningKey
from edge_sdk.wire import ArraySpec, HeadLayout, UpdateEnvelope, UpdateHeader, pack_arrays, unpack_arrays

LAYOUT = HeadLayout([ArraySpec("w0", (3, 2)), ArraySpec("b0", (2,))])


def _deltas(rng):
    return {"w0": rng.normal(size=(3, 2)).astype(np.float32), "b0": rng.normal(size=2).astype(np.float32)}


def _envelope(rng, key, **kw):
    args = dict(device_id="dev-1", base_version=4, layout=LAYOUT, deltas=_deltas(rng), num_examples=7,
                sequence=3, sign=key.sign)
    args.update(kw)
    return UpdateEnvelope.create(**args)


def test_arrays_are_little_endian_in_layout_order(rng):
    arrays = _deltas(rng)
    data = pack_arrays(LAYOUT, arrays)
    assert len(data) == 8 * 4
    assert data[:4] == struct.pack("<f", arrays["w0"][0, 0])
    assert data[-4:] == struct.pack("<f", arrays["b0"][1])
    back = unpack_arrays(LAYOUT, data)
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


@pytest.mark.parametrize("arrays, match", [
    ({"w0": np.zeros((3, 2))}, "missing"),
    ({"w0": np.zeros((2, 3)), "b0": np.zeros(2)}, "shape"),
    ({"w0": np.zeros((3, 2)), "b0": np.array([0.0, np.inf])}, "NaN or Inf"),
    ({"w0": np.zeros((3, 2)), "b0": np.zeros(2), "x": np.zeros(1)}, "not in the head layout"),
])
def test_pack_refuses_bad_arrays(arrays, match):
    with pytest.raises(WireFormatError, match=match):
        pack_arrays(LAYOUT, arrays)


def test_envelope_round_trip_and_signature(rng):
    key = SigningKey.generate()
    env = _envelope(rng, key)
    parsed, header_bytes = UpdateEnvelope.from_bytes(env.to_bytes())
    parsed.verify(key.verify_key.verify, header_bytes)
    assert parsed.header == env.header and parsed.update_id == env.update_id
    for k, v in env.deltas().items():
        np.testing.assert_array_equal(parsed.deltas()[k], v)
    with pytest.raises(SignatureError):
        parsed.verify(SigningKey.generate().verify_key.verify, header_bytes)


def test_every_flipped_byte_is_caught(rng):
    key = SigningKey.generate()
    data = _envelope(rng, key).to_bytes()
    for i in range(0, len(data), 7):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(WireFormatError):  # SignatureError is a WireFormatError
            env, hb = UpdateEnvelope.from_bytes(bytes(bad))
            env.verify(key.verify_key.verify, hb)


def test_truncated_wrong_magic_and_future_version(rng):
    key = SigningKey.generate()
    data = _envelope(rng, key).to_bytes()
    with pytest.raises(WireFormatError, match="magic"):
        UpdateEnvelope.from_bytes(b"XXXX" + data[4:])
    with pytest.raises(WireFormatError, match="truncated|body"):
        UpdateEnvelope.from_bytes(data[:40])
    header = json.loads(_envelope(rng, key).header.to_bytes())
    header["format_version"] = 2
    with pytest.raises(WireFormatError, match="format_version 2"):
        UpdateHeader.from_bytes(json.dumps(header).encode())


def test_non_canonical_header_is_refused(rng):
    key = SigningKey.generate()
    env = _envelope(rng, key)
    pretty = json.dumps(json.loads(env.header.to_bytes()), indent=1).encode()
    data = b"FSU1" + struct.pack("<I", len(pretty)) + pretty + env.signature + env.body
    with pytest.raises(WireFormatError, match="canonical"):
        UpdateEnvelope.from_bytes(data)


def test_header_field_types_are_checked(rng):
    key = SigningKey.generate()
    header = json.loads(_envelope(rng, key).header.to_bytes())
    for field, value, match in (("num_examples", 0, "positive"), ("sequence", "3", "sequence"),
                                ("base_version", True, "base_version")):
        bad = dict(header, **{field: value})
        with pytest.raises(WireFormatError, match=match):
            UpdateHeader.from_bytes(json.dumps(bad).encode())


def test_private_key_file_is_0600_and_refused_when_open(tmp_path):
    path = tmp_path / "k.pem"
    key = SigningKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert SigningKey.load_or_create(path).verify_key == key.verify_key
    path.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        SigningKey.load(path)
