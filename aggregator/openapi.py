"""The OpenAPI 3.1 document of the aggregator's HTTP API, served at ``/api/v1/openapi.json``.

The device API is the contract with every deployed ``edge_sdk``; a test
checks that each route the app serves is documented here with its methods,
and that the document is valid OpenAPI.
"""

from __future__ import annotations

from flask import Flask, jsonify

__all__ = ["document", "install"]

_ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(description: str, schema: dict | None = None, content_type: str = "application/json") -> dict:
    out = {"description": description}
    if schema is not None:
        out["content"] = {content_type: {"schema": schema}}
    return out


def _errors(*codes: int) -> dict:
    text = {400: "Malformed request", 401: "Not authenticated (reason in `error`)", 403: "Forbidden (revoked, bad "
            "or used token)", 404: "Not found", 409: "Conflict (stale base, replay, already contributed, ...)",
            413: "Body too large", 422: "Well-formed but refused (layout, values, norm, model)",
            429: "Rate limited"}
    return {str(c): _resp(text[c], _ERROR) for c in codes}


DEVICE_AUTH = [{"deviceSignature": [], "deviceId": [], "deviceTimestamp": []}]
ADMIN_AUTH = [{"adminToken": []}]


def document() -> dict:
    manifest_get = {
        "security": DEVICE_AUTH,
        "parameters": [{"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}}],
        "responses": {"200": _resp("Signed manifest (edge_sdk.manifest v1)", {"$ref": "#/components/schemas/"
                                                                                   "SignedManifest"}),
                      "304": _resp("Unchanged since the ETag given"), **_errors(401, 403, 404)},
    }
    admin_json = {"security": ADMIN_AUTH, "responses": {"200": _resp("OK", {"type": "object"}), **_errors(401)}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "fedser aggregator", "version": "1",
                 "description": "Enrollment, signed-update intake, FedAvg rounds and the signed model registry. "
                                "Device requests without a signed body carry X-Fedser-Device, X-Fedser-Timestamp "
                                "and X-Fedser-Signature (Ed25519 over edge_sdk.wire.request_signing_message)."},
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
                    "properties": {"token": {"type": "string"}, "public_key": {
                        "type": "string", "description": "base64 raw Ed25519 public key"},
                        "name": {"type": "string", "maxLength": 200}}}}}},
                "responses": {"201": _resp("Enrolled", {"type": "object", "required": ["device_id",
                                                                                         "server_public_key"],
                                                        "properties": {"device_id": {"type": "string"},
                                                                       "server_public_key": {"type": "string"},
                                                                       "manifest": {"type": ["object", "null"]}}}),
                              **_errors(400, 403, 409)}}},
            "/api/v1/updates": {"post": {
                "summary": "Post a signed head delta (edge_sdk.wire update envelope v1, FSU1)",
                "security": [], "description": "The envelope carries its own Ed25519 signature.",
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "responses": {"202": _resp("Accepted and committed", {"$ref": "#/components/schemas/Accepted"}),
                              "200": _resp("Already accepted earlier (idempotent retry)",
                                           {"$ref": "#/components/schemas/Accepted"}),
                              **_errors(400, 401, 403, 409, 413, 422, 429)}}},
            "/api/v1/manifest": {"get": {"summary": "Current signed manifest", **manifest_get}},
            "/api/v1/manifest/{version}": {"get": {
                "summary": "Signed manifest of any version",
                **{**manifest_get, "parameters": manifest_get["parameters"] + [
                    {"name": "version", "in": "path", "required": True, "schema": {"type": "integer"}}]}}},
            "/api/v1/blobs/{sha256}": {"get": {
                "summary": "A model file by its sha256", "security": DEVICE_AUTH,
                "parameters": [{"name": "sha256", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}],
                "responses": {"200": _resp("The file", {"type": "string", "format": "binary"},
                                           "application/octet-stream"), **_errors(400, 401, 403, 404)}}},
            "/api/v1/admin/enrollment-tokens": {"post": {"summary": "New one-time enrollment token",
                                                          **admin_json}},
            "/api/v1/admin/models": {"get": {"summary": "Versions", **admin_json},
                                     "post": {"summary": "Publish a base (multipart tflite + metadata) through "
                                                         "the validation gate", **admin_json}},
            "/api/v1/admin/models/{version}/rollback": {"post": {
                "summary": "Republish an earlier version as the current one", **admin_json,
                "parameters": [{"name": "version", "in": "path", "required": True, "schema": {"type": "integer"}}]}},
            "/api/v1/admin/rounds/close": {"post": {"summary": "Close the open round now", **admin_json}},
            "/api/v1/admin/devices": {"get": {"summary": "Devices", **admin_json}},
            "/api/v1/admin/devices/{device_id}/revoke": {"post": {
                "summary": "Revoke a device", **admin_json,
                "parameters": [{"name": "device_id", "in": "path", "required": True, "schema": {"type": "string"}}]}},
            "/api/v1/admin/jobs": {"get": {"summary": "Baseline jobs", **admin_json},
                                   "post": {"summary": "Start a baseline training job", **admin_json}},
            "/api/v1/admin/jobs/{job_id}": {"get": {
                "summary": "Job status, log tail and report", **admin_json,
                "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer"}}]}},
            "/api/v1/admin/status": {"get": {"summary": "Everything the dashboard shows", **admin_json}},
            "/admin": {"get": {"summary": "Dashboard page (the token is entered in the page)", "security": [],
                               "responses": {"200": _resp("HTML", {"type": "string"}, "text/html")}}},
        },
        "components": {
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer"},
                "deviceId": {"type": "apiKey", "in": "header", "name": "X-Fedser-Device"},
                "deviceTimestamp": {"type": "apiKey", "in": "header", "name": "X-Fedser-Timestamp"},
                "deviceSignature": {"type": "apiKey", "in": "header", "name": "X-Fedser-Signature"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error", "detail"],
                          "properties": {"error": {"type": "string", "description": "machine-readable reason"},
                                         "detail": {"type": "string"}}},
                "Accepted": {"type": "object", "required": ["status", "update_id", "round_id", "duplicate"],
                             "properties": {"status": {"const": "accepted"}, "update_id": {"type": "string"},
                                            "round_id": {"type": "integer"}, "duplicate": {"type": "boolean"},
                                            "round_closed": {"type": "boolean"},
                                            "published_version": {"type": "integer"}}},
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
