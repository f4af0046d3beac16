"""Device enrollment: a one-time token and the device's Ed25519 public key."""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
import uuid

from flask import Blueprint, jsonify
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from aggregator.api import API_PREFIX, json_object_body, refuse, server_key
from aggregator.db import Device, EnrollmentToken, get_session
from aggregator.registry import current_version
from edge_sdk.errors import ParameterError
from edge_sdk.i18n import unshowable_char
from edge_sdk.signing import VerifyKey

bp = Blueprint("devices", __name__, url_prefix=f"{API_PREFIX}/devices")
MAX_TOKEN_LEN = 256
MAX_PUBLIC_KEY_LEN = 100  # base64 of 32 bytes is 44
MAX_NAME_LEN = 200


@bp.post("/enroll")
def enroll():
    body, refused = json_object_body(authenticated=False)  # get_json lets a RecursionError (deep nesting) out
    if refused is not None:
        return refused
    if not body.get("token") or not body.get("public_key"):
        return refuse(400, "malformed", "send JSON with 'token' and 'public_key' (base64 Ed25519)")
    for name, limit in (("token", MAX_TOKEN_LEN), ("public_key", MAX_PUBLIC_KEY_LEN), ("name", MAX_NAME_LEN)):
        if name in body and (not isinstance(body[name], str) or len(body[name]) > limit):
            return refuse(400, "out_of_range", f"{name} must be a string of at most {limit} characters")
    # The name is shown on the admin console: text that shows as itself (a lone surrogate, which the database cannot
    # store, was a 500; a bidi override reordered what the admin read). Any script, spaces and emoji are fine.
    bad = unshowable_char(str(body.get("name", "")), unassigned_ok=True)
    if bad is not None:
        unnamed = {"Cc": "a control character", "Cs": "a lone surrogate", "Co": "a private-use character"}
        what = unicodedata.name(bad, "") or unnamed.get(unicodedata.category(bad), "a noncharacter")
        return refuse(400, "out_of_range", f"name holds U+{ord(bad):04X} ({what}), which the console cannot show "
                      "as text: control, separator, private-use, invisible format and bidi-override characters are "
                      "refused")
    try:
        public_key = VerifyKey.from_b64(str(body["public_key"])).to_b64()
    except ParameterError as exc:
        return refuse(400, "bad_public_key", str(exc)[:500])
    session = get_session()
    token_hash = hashlib.sha256(str(body["token"]).encode()).hexdigest()
    token = session.get(EnrollmentToken, token_hash)
    now = time.time()
    if token is None:
        return refuse(403, "bad_token", "enrollment token is unknown")
    if token.used_at is not None:
        return refuse(403, "token_used", "enrollment token was already used")
    if token.expires_at < now:
        return refuse(403, "token_expired", "enrollment token has expired; ask the admin for a new one")
    if session.scalars(select(Device).where(Device.public_key == public_key)).first():
        return refuse(409, "key_enrolled", "this public key is already enrolled")
    device_id = f"dev-{uuid.uuid4().hex[:16]}"
    try:
        # One conditional UPDATE claims the token: of two concurrent enrollments with it, the second finds
        # used_at set (PostgreSQL re-checks the WHERE after the first commits) and changes no row. It runs
        # before the device is added, so no autoflush of the device's INSERT happens here.
        claimed = session.execute(
            update(EnrollmentToken).where(EnrollmentToken.token_sha256 == token_hash,
                                          EnrollmentToken.used_at.is_(None), EnrollmentToken.expires_at >= now)
            .values(used_at=now, device_id=device_id).execution_options(synchronize_session=False)).rowcount
        if claimed != 1:
            return refuse(403, "token_used", "enrollment token was already used")
        device = Device(id=device_id, name=body.get("name", ""), public_key=public_key, enrolled_at=now,
                        last_seen=now)
        session.add(device)
        session.commit()
    except IntegrityError:  # the same public key enrolled concurrently with another token (flush or commit)
        return refuse(409, "key_enrolled", "this public key is already enrolled (concurrently, with another token)")
    current = current_version(session)
    return jsonify(
        device_id=device.id,
        server_public_key=server_key().verify_key.to_b64(),
        manifest=json.loads(current.signed_manifest) if current else None,
    ), 201
