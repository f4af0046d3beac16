"""Serving the signed manifest (with ETag) and the content-addressed model files."""

from __future__ import annotations

import io
import re

from flask import Blueprint, Response, g, request, send_file

from aggregator.api import API_PREFIX, blobs, device_required, path_int, refuse
from aggregator.db import ModelVersion, get_read_session
from aggregator.registry import MissingBlob, current_version

bp = Blueprint("models", __name__, url_prefix=API_PREFIX)
MAX_IF_NONE_MATCH = 1024
_IF_NONE_MATCH = re.compile(r"[\x20-\x7e\t]*")  # visible ASCII, space, tab (RFC 9110 field values)


def _manifest_response(row: ModelVersion) -> Response:
    inm = request.headers.get("If-None-Match", "")
    if len(inm) > MAX_IF_NONE_MATCH or _IF_NONE_MATCH.fullmatch(inm) is None:
        return _refuse(400, "bad_if_none_match", f"If-None-Match must be at most {MAX_IF_NONE_MATCH} characters "
                                                 "of visible ASCII")
    etag = f"v{row.version}-{row.head_sha256[:16]}"
    if request.if_none_match.contains(etag):
        resp = Response(status=304)
    else:
        resp = Response(row.signed_manifest, mimetype="application/json")
    resp.set_etag(etag)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


def _refuse(status: int, reason: str, detail: str):
    """:func:`aggregator.api.refuse` for the signed device reads: audited with the device, counted."""
    return refuse(status, reason, detail, device_id=g.get("device_id"), authenticated=True)


@bp.get("/manifest")
@device_required
def manifest():
    row = current_version(get_read_session())
    if row is None:
        return _refuse(404, "no_model", "no model version is published yet")
    return _manifest_response(row)


@bp.get("/manifest/<int:version>")
@device_required
def manifest_version(version: int):
    bad = path_int("version", version, device_id=g.get("device_id"))
    if bad is not None:
        return bad
    row = get_read_session().get(ModelVersion, version)
    if row is None:
        return _refuse(404, "unknown_version", f"model version {version} doesn't exist")
    return _manifest_response(row)


@bp.get("/blobs/<sha256>")
@device_required
def blob(sha256: str):
    """A model file from the database (any host serves any file), with ETag, conditional GET and Range.

    The file is read whole (a base is under a megabyte, a head 80 KB; uploads are bounded by
    MAX_CONTENT_LENGTH) and streamed from memory; recently read files come from the process's LRU.
    """
    try:
        data = blobs().get(sha256, session=get_read_session())
    except ValueError as exc:
        return _refuse(400, "bad_digest", str(exc)[:200])
    except MissingBlob:
        return _refuse(404, "unknown_blob", f"no file with sha256 {sha256}")
    resp = send_file(io.BytesIO(data), mimetype="application/octet-stream", etag=sha256, max_age=31536000,
                     conditional=True)
    resp.headers["Cache-Control"] = "private, max-age=31536000, immutable"  # behind device authentication
    return resp
