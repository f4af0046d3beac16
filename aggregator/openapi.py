"""The OpenAPI 3.1 document of the aggregator's HTTP API, served at ``/api/v1/openapi.json``.

The device API is the contract with every deployed ``edge_sdk``; a test
checks that each route the app serves is documented here with its methods,
and that the document is valid OpenAPI.
"""

from __future__ import annotations

from flask import Flask, jsonify

from edge_sdk.wire import DEVICE_ID_RE, MAX_INT32

__all__ = ["document", "install"]

_ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(description: str, schema: dict | None = None, content_type: str = "application/json") -> dict:
    out = {"description": description}
    if schema is not None:
        out["content"] = {content_type: {"schema": schema}}
    return out


def _errors(*codes: int) -> dict:
    text = {400: "Malformed, of the wrong type or out of its documented range (`error`: the reason, `detail`: the "
                 "field and its range)",
            401: "Not authenticated (reason in `error`: missing_device_auth, unknown_device, bad_signature, "
                 "bad_timestamp, clock_skew, bad_admin_token)",
            403: "Forbidden (revoked device; unknown, used or expired enrollment token)", 404: "Not found",
            409: "Conflict (stale base, replay, already contributed, no open round, round not closed, key enrolled)",
            413: "Body larger than MAX_CONTENT_LENGTH (8 MiB by default; also when sent chunked)",
            416: "Range not satisfiable",
            422: "Well-formed but refused (layout, values, norm, model, validation gate)",
            429: "Rate limited (RATE_LIMIT_PER_HOUR posts a device an hour)",
            503: "The round's lock was not had in INTAKE_LOCK_TIMEOUT_SECONDS (`lock_timeout`, with Retry-After): post "
                 "again",
            507: "The database's disk is full (`storage_full`, with Retry-After): nothing stored; post again later"}
    return {str(c): _resp(text[c], _ERROR) for c in codes}


DEVICE_AUTH = [{"deviceSignature": [], "deviceId": [], "deviceTimestamp": []}]
ADMIN_AUTH = [{"adminToken": []}]
_VERSION = {"type": "integer", "minimum": 1, "maximum": MAX_INT32}
_ID_PATTERN = f"^{DEVICE_ID_RE.pattern}$"  # the check the server applies
_ENVELOPE_RANGES = (
    "Header fields and their ranges (edge_sdk.wire; out of range: 400 `out_of_range` naming the field): device_id "
    "1-40 characters of A-Z a-z 0-9 . _ -; base_version 1 .. 2147483647; num_examples 1 .. 1000000 (its FedAvg "
    "weight is capped further by the server); sequence 0 .. 2**53-1, strictly increasing per device; body_len "
    "0 .. 2**30 and equal to the body; layout 1-256 arrays, names 1-128 characters, 0-8 dimensions of 0 .. "
    "2147483647; layout_sha256 and body_sha256 64 lowercase hex digits; created_at ISO 8601, at most 40 "
    "characters; privacy at most 16 keys (at most 64 characters) of null, booleans, finite numbers or strings of "
    "at most 64 characters; header at most 64 KiB of canonical JSON without NaN or Infinity; whole body at most "
    "MAX_CONTENT_LENGTH (413).")


def _admin(summary: str, ok: int = 200, *codes: int, body: dict | None = None, params: list | None = None,
           ok_schema: dict | None = None) -> dict:
    out = {"summary": summary, "security": ADMIN_AUTH,
           "responses": {str(ok): _resp("OK", ok_schema or {"type": "object"}), **_errors(401, *codes)}}
    if body is not None:
        out["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    if params:
        out["parameters"] = params
    return out


def document() -> dict:
    inm = {"name": "If-None-Match", "in": "header", "required": False,
           "description": "An ETag from an earlier answer: at most 1024 characters of visible ASCII (else 400)",
           "schema": {"type": "string", "maxLength": 1024, "pattern": "^[\\x20-\\x7e\\t]*$"}}
    manifest_get = {
        "security": DEVICE_AUTH,
        "parameters": [inm],
        "responses": {"200": _resp("Signed manifest (edge_sdk.manifest v1)", {"$ref": "#/components/schemas/"
                                                                                   "SignedManifest"}),
                      "304": _resp("Unchanged since the ETag given"), **_errors(400, 401, 403, 404)},
    }
    admin_json = {"security": ADMIN_AUTH, "responses": {"200": _resp("OK", {"type": "object"}), **_errors(401)}}
    version_param = [{"name": "version", "in": "path", "required": True, "schema": _VERSION}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "fedser aggregator", "version": "1",
                 "description": "Enrollment, signed-update intake, FedAvg rounds and the signed model registry. "
                                "Device requests without a signed body carry X-Fedser-Device, X-Fedser-Timestamp "
                                "and X-Fedser-Signature (Ed25519 over edge_sdk.wire.request_signing_message). "
                                "Every refusal is JSON `{error, detail}` and is counted in "
                                "fedser_refusals_total{reason}; every integer and string a client sends has the "
                                "range given here (path integers 1 .. 2147483647)."},
        "paths": {
            "/healthz": {"get": {"summary": "Liveness and database check", "security": [],
                                 "responses": {"200": _resp("Healthy", {"type": "object"}),
                                               "503": _resp("Database unreachable", {"type": "object"})}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": ADMIN_AUTH,
                                 "responses": {"200": _resp("Text format 0.0.4", {"type": "string"}, "text/plain"),
                                               **_errors(401)}}},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [],
                                             "responses": {"200": _resp("OpenAPI", {"type": "object"})}}},
            "/api/v1/devices/enroll": {"post": {
                "summary": "Enroll a device with a one-time token", "security": [],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["token", "public_key"],
                    "properties": {"token": {"type": "string", "minLength": 1, "maxLength": 256},
                                   "public_key": {"type": "string", "minLength": 1, "maxLength": 100,
                                                  "description": "base64 raw Ed25519 public key (32 bytes)"},
                                   "name": {"type": "string", "maxLength": 200,
                                            "description": "text that shows as itself: no control, line separator, "
                                                           "lone surrogate or bidi override"}}}}}},
                "responses": {"201": _resp("Enrolled", {"type": "object", "required": ["device_id",
                                                                                         "server_public_key"],
                                                        "properties": {"device_id": {"type": "string",
                                                                                     "pattern": _ID_PATTERN},
                                                                       "server_public_key": {"type": "string"},
                                                                       "manifest": {"type": ["object", "null"]}}}),
                              **_errors(400, 403, 409, 413)}}},
            "/api/v1/updates": {"post": {
                "summary": "Post a signed head delta (edge_sdk.wire update envelope v1, FSU1)",
                "security": [], "description": "The envelope carries its own Ed25519 signature. " + _ENVELOPE_RANGES,
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "responses": {"202": _resp("Accepted and committed", {"$ref": "#/components/schemas/Accepted"}),
                              "200": _resp("Already accepted earlier (idempotent retry)",
                                           {"$ref": "#/components/schemas/Accepted"}),
                              **_errors(400, 401, 403, 409, 413, 422, 429, 503, 507)}}},
            "/api/v1/manifest": {"get": {"summary": "Current signed manifest", **manifest_get}},
            "/api/v1/manifest/{version}": {"get": {
                "summary": "Signed manifest of any version",
                **{**manifest_get, "parameters": manifest_get["parameters"] + version_param}}},
            "/api/v1/blobs/{sha256}": {"get": {
                "summary": "A model file by its sha256 (conditional and Range requests as HTTP has them)",
                "security": DEVICE_AUTH,
                "parameters": [{"name": "sha256", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}],
                "responses": {"200": _resp("The file", {"type": "string", "format": "binary"},
                                           "application/octet-stream"),
                              "206": _resp("Part of the file (a Range request)", {"type": "string",
                                                                                  "format": "binary"},
                                           "application/octet-stream"),
                              "304": _resp("Unchanged since the ETag given"),
                              **_errors(400, 401, 403, 404, 416)}}},
            "/api/v1/admin/enrollment-tokens": {"post": _admin(
                "New one-time enrollment token", 201, 400, 413,
                body={"type": "object", "properties": {"ttl_seconds": {
                    "type": "number", "exclusiveMinimum": 0, "maximum": 2592000,
                    "description": "default ENROLLMENT_TOKEN_TTL (86400)"}}},
                ok_schema={"type": "object", "required": ["token", "expires_at"],
                           "properties": {"token": {"type": "string"}, "expires_at": {"type": "number"}}})},
            "/api/v1/admin/models": {
                "get": {"summary": "Versions", **admin_json},
                "post": {**_admin("Publish a base (multipart tflite + metadata) through the validation gate", 201,
                                  400, 413, 422),
                         "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                             "type": "object", "required": ["tflite", "metadata"],
                             "properties": {"tflite": {"type": "string", "format": "binary"},
                                            "metadata": {"type": "string", "format": "binary",
                                                         "description": "model.json: a JSON object (else 400)"}}}}}}}},
            "/api/v1/admin/models/{version}/rollback": {"post": _admin(
                "Republish an earlier version as the current one (as a new, higher version)", 201, 400, 404, 413,
                params=version_param)},
            "/api/v1/admin/rounds/close": {"post": _admin(
                "Close the open round now", 200, 400, 409, 413,
                body={"type": "object", "properties": {"min_updates": {"type": "integer", "minimum": 1,
                                                                       "maximum": 1000000, "default": 1}}})},
            "/api/v1/admin/devices": {"get": {"summary": "Devices", **admin_json}},
            "/api/v1/admin/devices/{device_id}/revoke": {"post": _admin(
                "Revoke a device", 200, 400, 404, 413,
                params=[{"name": "device_id", "in": "path", "required": True,
                         "schema": {"type": "string", "pattern": _ID_PATTERN}}])},
            "/api/v1/admin/jobs": {"get": {"summary": "Baseline jobs", **admin_json},
                                   "post": _admin(
                                       "Start a baseline training job (parameters as fedser-train train's)", 202,
                                       400, 413,
                                       body={"type": "object", "description": "strings at most 1024 characters "
                                                                              "without NUL; integers 0 .. "
                                                                              "2147483647; epochs 1 .. 1000"})},
            "/api/v1/admin/jobs/{job_id}": {"get": _admin(
                "Job status, log tail and report", 200, 400, 404,
                params=[{"name": "job_id", "in": "path", "required": True, "schema": {
                    "type": "integer", "minimum": 1, "maximum": MAX_INT32}}])},
            "/api/v1/admin/status": {"get": {"summary": "Everything the dashboard shows", **admin_json}},
            "/api/v1/admin/console": {"get": {"summary": "Personal against global accuracy per device and across "
                                                         "the fleet, versions with lineage, refused rounds",
                                              **admin_json}},
            "/admin": {"get": {"summary": "Dashboard page (the token is entered in the page)", "security": [],
                               "responses": {"200": _resp("HTML", {"type": "string"}, "text/html")}}},
        },
        "components": {
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer"},
                "deviceId": {"type": "apiKey", "in": "header", "name": "X-Fedser-Device",
                             "description": "The device id: 1-40 characters of A-Z a-z 0-9 . _ -"},
                "deviceTimestamp": {"type": "apiKey", "in": "header", "name": "X-Fedser-Timestamp",
                                    "description": "Unix seconds: 1-12 digits, optionally '.' and 1-9 more (no "
                                                   "sign, exponent, nan or inf); within REQUEST_MAX_SKEW (300 s)"},
                "deviceSignature": {"type": "apiKey", "in": "header", "name": "X-Fedser-Signature",
                                    "description": "base64 of the 64-byte Ed25519 signature (at most 128 "
                                                   "characters)"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error", "detail"],
                          "properties": {"error": {"type": "string", "description": "machine-readable reason"},
                                         "detail": {"type": "string"}}},
                "Accepted": {"type": "object", "required": ["status", "update_id", "round_id", "duplicate"],
                             "properties": {"status": {"const": "accepted"}, "update_id": {"type": "string"},
                                            "round_id": {"type": "integer"}, "duplicate": {"type": "boolean"},
                                            "round_closed": {"type": "boolean"},
                                            "published_version": {"type": ["integer", "null"]},
                                            "round_rejected": {"type": "string"}}},
                "SignedManifest": {"type": "object", "required": ["manifest", "signature"],
                                   "properties": {"manifest": {"type": "object"}, "signature": {"type": "string"}}},
            },
        },
    }


def install(app: Flask) -> None:
    doc = document()

    @app.get("/api/v1/openapi.json")
    def openapi_json():
        return jsonify(doc)
