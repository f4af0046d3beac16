"""The server's signing key and admin token: from configuration that several hosts share, or made once.

Settings (``config.json`` keys; environment ``FEDSER_<KEY>``):

``SERVER_KEY_FILE``
    Path to the server's Ed25519 private key (PEM, PKCS#8, as ``fedser-aggregator gen-server-key`` writes
    it), mode 0600 or 0400. The way to give every host the same key: mount one secret on each.
``SERVER_KEY``
    The key itself: its PEM text, or base64 of that PEM on one line (for an environment variable).
``ADMIN_TOKEN`` / ``ADMIN_TOKEN_FILE``
    The admin bearer token, or a file holding it (one line).

Setting both forms of one of them is an error. With neither, the host uses ``<instance>/server_ed25519.pem``
and ``<instance>/admin_token``, creating them on first start, as a single host always did: but only while
the database has no other host's key on record. The database records the server's public key (and the
sha256 of the admin token, configured or made here; neither is secret) in ``shared_settings``; a host whose
key differs from the record, or from the key that signed the published versions, refuses to start, so two
hosts never sign with different keys (devices pin the first key they see and would refuse the other's
manifests); a host whose admin token differs from the record refuses to start alike.
Every problem is a :class:`aggregator.ConfigError` naming the setting; the secret itself is never shown.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from edge_sdk.signing import SigningKey

log = logging.getLogger("aggregator")

__all__ = ["server_key", "admin_token", "parse_key", "KEY_FILE_NAME", "TOKEN_FILE_NAME"]

KEY_FILE_NAME = "server_ed25519.pem"  # in the instance folder, when no key is configured
TOKEN_FILE_NAME = "admin_token"
VERIFY_KEY_SETTING = "server_verify_key"
TOKEN_SETTING = "admin_token_sha256"
_HOW = ("give every host the same key: FEDSER_SERVER_KEY_FILE=<path of a PEM every host mounts> (make one with "
        "`fedser-aggregator gen-server-key PATH`, or copy the first host's <instance>/server_ed25519.pem)")


def _error(message: str):
    from aggregator import ConfigError

    return ConfigError(message)


def parse_key(data: bytes, setting: str) -> SigningKey:
    """An Ed25519 key from PEM bytes, or from base64 of them; ConfigError naming ``setting`` otherwise."""
    data = data.strip()
    if not data.startswith(b"-----BEGIN"):
        try:
            data = base64.b64decode(b"".join(data.split()), validate=True).strip()
        except (binascii.Error, ValueError):
            raise _error(f"{setting}: not a PEM private key, nor base64 of one") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):  # never echo the bytes: they may be most of a secret
        raise _error(f"{setting}: not an unencrypted PEM private key (make one with `fedser-aggregator "
                     "gen-server-key PATH`)") from None
    except Exception as exc:  # cryptography's UnsupportedAlgorithm and the like
        raise _error(f"{setting}: the key cannot be read ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise _error(f"{setting}: holds a {type(key).__name__}, not an Ed25519 key")
    return SigningKey(key)


def _read_secret_file(path: str, setting: str, *, what: str) -> bytes:
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode & 0o777
        if not p.is_file():
            raise _error(f"{setting}={path}: not a file")
        if mode & 0o077:
            raise _error(f"{setting}={path}: the {what} is readable by others (mode {mode:o}); make it 0600 or "
                         f"0400 (chmod 600 {path}; Kubernetes: defaultMode 0400)")
        return p.read_bytes()
    except OSError as exc:
        raise _error(f"{setting}={path}: cannot read the {what}: {exc.strerror or exc}") from None


def _get_setting(engine, name: str) -> str | None:
    from aggregator.db import SharedSetting

    with engine.connect() as conn:
        value = conn.scalar(select(SharedSetting.value).where(SharedSetting.name == name))
        conn.rollback()
    return value


def _record_setting(engine, name: str, value: str) -> str:
    """Record ``value`` unless a value is on record already; returns the value on record."""
    from aggregator.db import SharedSetting, insert_ignore

    with engine.begin() as conn:
        conn.execute(insert_ignore(engine.dialect.name, SharedSetting, name=name, value=value,
                                   created_at=time.time()))
        return conn.scalar(select(SharedSetting.value).where(SharedSetting.name == name))


def _signs_the_published_versions(engine, key: SigningKey) -> bool:
    """Whether ``key`` verifies the newest version's signed manifest (True when none is published)."""
    from aggregator.db import ModelVersion
    from edge_sdk.manifest import SignedManifest

    with engine.connect() as conn:
        signed = conn.scalar(select(ModelVersion.signed_manifest).order_by(ModelVersion.version.desc()).limit(1))
        conn.rollback()
    if signed is None:
        return True
    try:
        SignedManifest.from_bytes(bytes(signed), key.verify_key.verify)
        return True
    except Exception:
        return False


def server_key(config, instance: Path, engine) -> SigningKey:
    """The key this host signs manifests with (see the module); checked against the database's record."""
    text, path = config.get("SERVER_KEY"), config.get("SERVER_KEY_FILE")
    if text and path:
        raise _error("SERVER_KEY and SERVER_KEY_FILE are both set: set one of them")
    local = instance / KEY_FILE_NAME
    created = False
    if path:
        source = f"SERVER_KEY_FILE={path}"
        key = parse_key(_read_secret_file(str(path), "SERVER_KEY_FILE", what="server key"), source)
    elif text:
        source = "SERVER_KEY"
        key = parse_key(str(text).encode(), "SERVER_KEY")
    elif local.exists():
        source = str(local)
        key = parse_key(_read_secret_file(str(local), f"the instance key {local}", what="server key"),
                        f"the instance key {local}")
    else:
        recorded = _get_setting(engine, VERIFY_KEY_SETTING)
        if recorded is not None:
            raise _error(f"no server key configured, and this database's versions are signed by another host's "
                         f"key (public key {recorded}): {_HOW}")
        source, key, created = f"{local} (new)", SigningKey.generate(), True
    public = key.verify_key.to_b64()
    recorded = _get_setting(engine, VERIFY_KEY_SETTING)
    if recorded is None:
        if not _signs_the_published_versions(engine, key):
            raise _error(f"the server key from {source} (public key {public}) did not sign the versions this "
                         f"database holds; {_HOW}")
        recorded = _record_setting(engine, VERIFY_KEY_SETTING, public)
    if recorded != public:
        raise _error(f"the server key from {source} has public key {public}, but this database's versions are "
                     f"signed by {recorded}; {_HOW}")
    if created:  # only once the database took it: a second host racing the first writes nothing
        key.save(local)
        log.warning("made a new server signing key %s (public key %s); for several hosts, configure "
                    "SERVER_KEY_FILE instead (docs/deploy-multihost.md)", local, public)
    return key


def admin_token(config, instance: Path, engine) -> str:
    """The admin bearer token (see the module)."""
    token, path = config.get("ADMIN_TOKEN"), config.get("ADMIN_TOKEN_FILE")
    if token and path:
        raise _error("ADMIN_TOKEN and ADMIN_TOKEN_FILE are both set: set one of them")
    if path:
        raw = _read_secret_file(str(path), "ADMIN_TOKEN_FILE", what="admin token")
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise _error(f"ADMIN_TOKEN_FILE={path}: the token must be ASCII") from None
        _check_token(token, f"ADMIN_TOKEN_FILE={path}")
        return _checked_against_record(engine, token, f"ADMIN_TOKEN_FILE={path}")
    if token:
        token = str(token)
        _check_token(token, "ADMIN_TOKEN")
        return _checked_against_record(engine, token, "ADMIN_TOKEN")
    local = instance / TOKEN_FILE_NAME
    if local.exists():
        token = local.read_text(errors="replace").strip()
        _check_token(token, f"the instance token {local}")
        return _checked_against_record(engine, token, f"the instance token {local}")
    if _get_setting(engine, TOKEN_SETTING) is not None:
        raise _error("no admin token configured, and another host made this database's: give every host the same "
                     "token with FEDSER_ADMIN_TOKEN_FILE=<path of a file every host mounts> (or FEDSER_ADMIN_TOKEN)")
    from edge_sdk.storage import atomic_write

    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    if _record_setting(engine, TOKEN_SETTING, digest) != digest:
        raise _error("no admin token configured, and another host made this database's at the same moment: "
                     "configure FEDSER_ADMIN_TOKEN_FILE on every host")
    atomic_write(local, token.encode(), mode=0o600)
    return token


def _checked_against_record(engine, token: str, source: str) -> str:
    """``token``, recorded (its sha256) when the database has none; a ConfigError when another host's differs.

    So that a host with no token configured never makes its own while another host has ADMIN_TOKEN set, and two
    hosts configured with different tokens do not both start (an admin call would then depend on the host a
    load balancer picks).
    """
    digest = hashlib.sha256(token.encode()).hexdigest()
    if _record_setting(engine, TOKEN_SETTING, digest) != digest:
        raise _error(f"the admin token from {source} is not the one the other hosts of this database use (its "
                     "sha256 is on record): give every host the same token with FEDSER_ADMIN_TOKEN_FILE=<path of a "
                     "file every host mounts> (or FEDSER_ADMIN_TOKEN). To change the token, stop every host, delete "
                     f"the row {TOKEN_SETTING} of the table shared_settings, and start them with the new one")
    return token


def _check_token(token: str, source: str) -> None:
    """A header value: printable ASCII without spaces (the token travels as ``Authorization: Bearer ...``)."""
    if not token:
        raise _error(f"{source}: the admin token is empty")
    if any(not ("!" <= c <= "~") for c in token):
        raise _error(f"{source}: the admin token must be printable ASCII without spaces")
