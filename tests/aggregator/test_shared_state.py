"""Several aggregator hosts sharing one database: model files, the signing key and the admin token are shared
state, nothing a request needs stays in one host's instance folder. Two ``create_app`` instances with their
own instance folders and one database URL stand for two hosts (the real multi-process, multi-address test is
tests/integration/test_multihost.py). SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import delete, func, select

from aggregator import ConfigError, create_app
from aggregator.db import Blob, Job, ModelVersion, SharedSetting
from aggregator.registry import MissingBlob
from edge_sdk.manifest import SignedManifest
from edge_sdk.signing import SigningKey
from edge_sdk.wire import REQUEST_HEADERS, request_signing_message

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "edge_sdk" / "data"


@pytest.fixture
def db_url(tmp_path, database_url) -> str:
    """One database for every host of a test: the PostgreSQL one, or a SQLite file outside the instances."""
    return database_url or f"sqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture
def shared(tmp_path) -> dict:
    """The secrets every host mounts: a key file (as `fedser-aggregator gen-server-key` makes) and a token file."""
    folder = tmp_path / "secrets"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-m", "aggregator.cli", "gen-server-key", str(folder / "server.pem")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    token = folder / "admin_token"
    token.write_text("shared-admin-token-0123456789\n")
    token.chmod(0o600)
    key = SigningKey.load(folder / "server.pem")
    assert f'"public_key": "{key.verify_key.to_b64()}"' in proc.stdout
    return {"SERVER_KEY_FILE": str(folder / "server.pem"), "ADMIN_TOKEN_FILE": str(token), "key": key,
            "token": "shared-admin-token-0123456789"}


def _host(tmp_path, name: str, url: str, **config):
    return create_app({"INSTANCE_PATH": str(tmp_path / name), "DATABASE_URL": url, "ROUND_MIN_UPDATES": 2,
                       **config})


def _close(*apps) -> None:
    for app in apps:
        app.extensions["fedser_engine"].dispose()


def _signed_get(client, path: str, device: str, key: SigningKey, headers: dict | None = None):
    ts = f"{time.time():.3f}"
    sig = base64.b64encode(key.sign(request_signing_message("GET", path, ts))).decode()
    return client.get(path, headers={**dict(zip(REQUEST_HEADERS, (device, ts, sig), strict=True)),
                                     **(headers or {})})


def _publish(client, token: str) -> int:
    with open(DATA / "default_model.tflite", "rb") as t, open(DATA / "default_model.json", "rb") as m:
        r = client.post("/api/v1/admin/models", headers={"Authorization": f"Bearer {token}"},
                        data={"tflite": (t, "m.tflite"), "metadata": (m, "m.json")})
    assert r.status_code == 201, r.json
    return r.json["version"]


def _enroll(client, token: str, admin_client=None):
    """Enroll a new device through ``client``, with a one-time token made through ``admin_client``."""
    auth = {"Authorization": f"Bearer {token}"}
    one_time = (admin_client or client).post("/api/v1/admin/enrollment-tokens", headers=auth, json={}).json["token"]
    key = SigningKey.generate()
    r = client.post("/api/v1/devices/enroll", json={"token": one_time, "public_key": key.verify_key.to_b64()})
    assert r.status_code == 201, r.json
    return r.json, key


def test_a_model_published_through_one_host_is_served_by_the_other(tmp_path, db_url, shared):
    cfg = {k: shared[k] for k in ("SERVER_KEY_FILE", "ADMIN_TOKEN_FILE")}
    a, b = _host(tmp_path, "host-a", db_url, **cfg), _host(tmp_path, "host-b", db_url, **cfg)
    ca, cb = a.test_client(), b.test_client()
    assert _publish(ca, shared["token"]) == 1
    enrolled, dev_key = _enroll(cb, shared["token"], admin_client=ca)  # token made on A, used on B
    assert enrolled["server_public_key"] == shared["key"].verify_key.to_b64()
    dev = enrolled["device_id"]

    r = _signed_get(cb, "/api/v1/manifest", dev, dev_key)
    assert r.status_code == 200
    manifest = SignedManifest.from_bytes(r.data, shared["key"].verify_key.verify).manifest  # B serves A's version
    tflite = (DATA / "default_model.tflite").read_bytes()
    assert manifest.base.sha256 == hashlib.sha256(tflite).hexdigest()
    for client in (cb, ca):
        base = _signed_get(client, manifest.base.url, dev, dev_key)
        assert base.status_code == 200 and base.data == tflite  # byte-identical through either host
        assert base.headers["ETag"] == f'"{manifest.base.sha256}"'
        assert base.headers["Cache-Control"].startswith("private")
        head = _signed_get(client, manifest.head.url, dev, dev_key)
        assert head.status_code == 200 and len(head.data) == manifest.head.size
        assert hashlib.sha256(head.data).hexdigest() == manifest.head.sha256
    # Conditional and partial requests, as send_file gave them from a file.
    part = _signed_get(cb, manifest.base.url, dev, dev_key, {"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.data == tflite[10:100]
    assert part.headers["Content-Range"] == f"bytes 10-99/{len(tflite)}"
    same = _signed_get(cb, manifest.base.url, dev, dev_key, {"If-None-Match": f'"{manifest.base.sha256}"'})
    assert same.status_code == 304 and same.data == b""
    missing = _signed_get(cb, "/api/v1/blobs/" + "0" * 64, dev, dev_key)
    assert missing.status_code == 404 and missing.json["error"] == "unknown_blob"
    assert _signed_get(cb, "/api/v1/blobs/nothex", dev, dev_key).status_code == 400

    # A second version, made by B (a rollback), is signed with the same key and served by A.
    r = cb.post("/api/v1/admin/models/1/rollback", headers={"Authorization": f"Bearer {shared['token']}"})
    assert r.status_code == 201 and r.json["version"] == 2
    r = _signed_get(ca, "/api/v1/manifest", dev, dev_key)
    assert SignedManifest.from_bytes(r.data, shared["key"].verify_key.verify).manifest.version == 2

    # Nothing a request needs in either instance folder: no key, no token, no model files.
    for app in (a, b):
        names = {p.name for p in Path(app.instance_path).iterdir()}
        assert not names & {"server_ed25519.pem", "admin_token", "blobs"}, names
    with a.extensions["fedser_sessionmaker"]() as s:
        assert s.scalar(select(func.count()).select_from(Blob)) == 2  # base and head, once each
    _close(a, b)


def test_the_key_from_the_environment_and_a_file_sign_alike(tmp_path, db_url, shared, monkeypatch):
    """FEDSER_SERVER_KEY (base64 of the PEM, one line) on one host, SERVER_KEY_FILE on the other."""
    pem = Path(shared["SERVER_KEY_FILE"]).read_bytes()
    a = _host(tmp_path, "host-a", db_url, SERVER_KEY_FILE=shared["SERVER_KEY_FILE"], ADMIN_TOKEN=shared["token"])
    monkeypatch.setenv("FEDSER_SERVER_KEY", base64.b64encode(pem).decode())
    monkeypatch.setenv("FEDSER_ADMIN_TOKEN_FILE", shared["ADMIN_TOKEN_FILE"])
    b = _host(tmp_path, "host-b", db_url)
    monkeypatch.setenv("FEDSER_SERVER_KEY", pem.decode())  # the PEM text itself works too
    c = _host(tmp_path, "host-c", db_url)
    for app in (a, b, c):
        assert app.extensions["fedser_server_key"].verify_key == shared["key"].verify_key
        assert app.config["ADMIN_TOKEN"] == shared["token"]
    _publish(b.test_client(), shared["token"])
    with a.extensions["fedser_sessionmaker"]() as s:
        signed = bytes(s.scalar(select(ModelVersion.signed_manifest)))
        recorded = s.scalar(select(SharedSetting.value).where(SharedSetting.name == "server_verify_key"))
    SignedManifest.from_bytes(signed, shared["key"].verify_key.verify)
    assert recorded == shared["key"].verify_key.to_b64()
    _close(a, b, c)


def test_a_second_host_never_makes_its_own_key(tmp_path, db_url):
    """With nothing configured the first host makes a key (as a single host always did); a second host sharing
    the database refuses to start unless given that same key, so devices never see two keys."""
    a = _host(tmp_path, "host-a", db_url)
    a_pem = tmp_path / "host-a" / "server_ed25519.pem"
    assert a_pem.exists() and (tmp_path / "host-a" / "admin_token").exists()
    with pytest.raises(ConfigError, match="SERVER_KEY_FILE"):
        _host(tmp_path, "host-b", db_url)
    assert not (tmp_path / "host-b" / "server_ed25519.pem").exists()  # nothing made on the refused host
    other = tmp_path / "other.pem"
    SigningKey.generate().save(other)
    with pytest.raises(ConfigError, match="signed by"):
        _host(tmp_path, "host-b", db_url, SERVER_KEY_FILE=str(other))
    with pytest.raises(ConfigError, match="ADMIN_TOKEN_FILE"):  # the right key, but the token is A's alone
        _host(tmp_path, "host-b", db_url, SERVER_KEY_FILE=str(a_pem))
    token = (tmp_path / "host-a" / "admin_token").read_text().strip()
    b = _host(tmp_path, "host-b", db_url, SERVER_KEY_FILE=str(a_pem), ADMIN_TOKEN=token)
    assert b.extensions["fedser_server_key"].verify_key == a.extensions["fedser_server_key"].verify_key
    a2 = _host(tmp_path, "host-a", db_url)  # the first host restarts as before
    assert a2.config["ADMIN_TOKEN"] == token
    _close(a, b, a2)


def test_a_key_that_did_not_sign_the_published_versions_is_refused(tmp_path, db_url):
    """A database from before the key was recorded: the first key offered must verify what is published."""
    a = _host(tmp_path, "host-a", db_url)
    _publish(a.test_client(), a.config["ADMIN_TOKEN"])
    with a.extensions["fedser_sessionmaker"]() as s:  # as an older release left it: no record
        s.execute(delete(SharedSetting))
        s.commit()
    other = tmp_path / "other.pem"
    SigningKey.generate().save(other)
    with pytest.raises(ConfigError, match="did not sign"):
        _host(tmp_path, "host-b", db_url, SERVER_KEY_FILE=str(other), ADMIN_TOKEN="t0ken")
    b = _host(tmp_path, "host-b", db_url, SERVER_KEY_FILE=str(tmp_path / "host-a" / "server_ed25519.pem"),
              ADMIN_TOKEN="t0ken")
    _close(a, b)


def _rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "readable_by_others", "not_pem", "rsa", "both", "env_garbage",
                                  "token_empty", "token_spaces", "token_missing", "tokens_both"])
def test_bad_secret_settings_are_config_errors_naming_the_setting(tmp_path, monkeypatch, case):
    good = tmp_path / "good.pem"
    SigningKey.generate().save(good)
    secret = b"-----BEGIN PRIVATE KEY-----\nTOPSECRETMATERIAL\n-----END PRIVATE KEY-----\n"
    cfg, match = {}, "SERVER_KEY_FILE"
    if case == "missing":
        cfg["SERVER_KEY_FILE"] = str(tmp_path / "nope.pem")
    elif case == "readable_by_others":
        cfg["SERVER_KEY_FILE"] = _write(tmp_path / "k.pem", good.read_bytes(), 0o644)
        match = "SERVER_KEY_FILE.*readable by others"
    elif case == "not_pem":
        cfg["SERVER_KEY_FILE"] = _write(tmp_path / "k.pem", secret)
    elif case == "rsa":
        cfg["SERVER_KEY_FILE"] = _write(tmp_path / "k.pem", _rsa_pem())
        match = "SERVER_KEY_FILE.*not an Ed25519 key"
    elif case == "both":
        cfg.update(SERVER_KEY_FILE=str(good), SERVER_KEY=good.read_text())
        match = "SERVER_KEY and SERVER_KEY_FILE"
    elif case == "env_garbage":
        monkeypatch.setenv("FEDSER_SERVER_KEY", "TOPSECRETMATERIAL%%")
        match = "^SERVER_KEY: not a PEM"
    else:
        cfg["SERVER_KEY_FILE"] = str(good)
        match = "ADMIN_TOKEN_FILE"
        if case == "token_empty":
            cfg["ADMIN_TOKEN_FILE"] = _write(tmp_path / "t", b"\n")
        elif case == "token_spaces":
            cfg["ADMIN_TOKEN_FILE"] = _write(tmp_path / "t", b"two words\n")
        elif case == "token_missing":
            cfg["ADMIN_TOKEN_FILE"] = str(tmp_path / "nope")
        else:
            cfg.update(ADMIN_TOKEN_FILE=_write(tmp_path / "t", b"x"), ADMIN_TOKEN="y")
            match = "ADMIN_TOKEN and ADMIN_TOKEN_FILE"
    with pytest.raises(ConfigError, match=match) as err:
        create_app({"INSTANCE_PATH": str(tmp_path / "inst"), **cfg})
    assert "TOPSECRET" not in str(err.value)  # never the secret's bytes in a message


def test_the_cli_reports_a_bad_key_file_without_a_traceback(tmp_path):
    bad = _write(tmp_path / "k.pem", b"not a key at all")
    env = {**os.environ, "FEDSER_SERVER_KEY_FILE": bad}
    proc = subprocess.run([sys.executable, "-m", "aggregator.cli", "--instance", str(tmp_path / "inst"), "status"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: SERVER_KEY_FILE=") and "Traceback" not in proc.stderr, proc.stderr
    again = subprocess.run([sys.executable, "-m", "aggregator.cli", "gen-server-key", str(tmp_path / "k.pem")],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 2 and "never overwritten" in again.stderr  # an existing key is not replaced
    assert Path(bad).read_bytes() == b"not a key at all"


def test_model_files_of_an_older_instance_move_into_the_database(tmp_path, db_url):
    """An instance from before the blobs table kept its files in <instance>/blobs/ab/abcdef...: at start-up they
    go into the database, once (a second start changes nothing), nothing lost, and the versions serve again. The
    folder stays where it is (processes of the older release still serving during a rolling upgrade read it)."""
    inst = tmp_path / "host-a"
    a = _host(tmp_path, "host-a", db_url)
    _publish(a.test_client(), a.config["ADMIN_TOKEN"])
    legacy = inst / "blobs"
    old = time.time() - 3 * 86400
    with a.extensions["fedser_sessionmaker"]() as s:  # lay the files out as the older release did
        held = {sha: bytes(data) for sha, data in s.execute(select(Blob.sha256, Blob.data))}
        s.execute(delete(Blob))
        s.commit()
    for sha, data in held.items():
        (legacy / sha[:2]).mkdir(parents=True, exist_ok=True)
        (legacy / sha[:2] / sha).write_bytes(data)
        os.utime(legacy / sha[:2] / sha, (old, old))
    (legacy / "ab").mkdir(exist_ok=True)
    (legacy / "ab" / "ab12.tmp").write_bytes(b"a write that never finished")
    _close(a)

    a = _host(tmp_path, "host-a", db_url)
    assert (legacy / "ab" / "ab12.tmp").exists() and not (inst / "blobs.imported").exists()  # left in place
    assert all((legacy / sha[:2] / sha).read_bytes() == data for sha, data in held.items())
    store = a.extensions["fedser_blobs"]
    with a.extensions["fedser_sessionmaker"]() as s:
        rows = {sha: (size, created) for sha, size, created in s.execute(select(Blob.sha256, Blob.size,
                                                                                Blob.created_at))}
    assert set(rows) == set(held) and all(rows[sha][0] == len(held[sha]) for sha in held)
    assert all(abs(created - old) < 2 for _, created in rows.values())  # the files' own times
    for sha, data in held.items():
        assert store.get(sha) == data
    enrolled, key = _enroll(a.test_client(), a.config["ADMIN_TOKEN"])
    r = _signed_get(a.test_client(), f"/api/v1/blobs/{sorted(held)[0]}", enrolled["device_id"], key)
    assert r.status_code == 200 and r.data == held[sorted(held)[0]]
    # Idempotent: run on the folder again, every file is found present; nothing doubles.
    assert store.import_folder(legacy) == {"imported": 0, "present": len(held), "corrupt": 0}
    # A file an older-release process writes meanwhile (a rolling upgrade) goes in at the next start.
    late = b"a model file written by an old-release worker during the upgrade"
    late_sha = hashlib.sha256(late).hexdigest()
    (legacy / late_sha[:2]).mkdir(exist_ok=True)
    (legacy / late_sha[:2] / late_sha).write_bytes(late)
    _close(a)
    a = _host(tmp_path, "host-a", db_url)
    assert a.extensions["fedser_blobs"].get(late_sha) == late and legacy.is_dir()
    with a.extensions["fedser_sessionmaker"]() as s:
        assert s.scalar(select(func.count()).select_from(Blob)) == len(held) + 1
    _close(a)


def test_a_corrupt_legacy_file_is_left_on_disk(tmp_path, db_url):
    inst = tmp_path / "host-a"
    good, bad = b"a good old file", b"bytes that do not hash to the name"
    good_sha, wrong_sha = hashlib.sha256(good).hexdigest(), hashlib.sha256(b"other").hexdigest()
    for sha, data in ((good_sha, good), (wrong_sha, bad)):
        (inst / "blobs" / sha[:2]).mkdir(parents=True, exist_ok=True)
        (inst / "blobs" / sha[:2] / sha).write_bytes(data)
    a = _host(tmp_path, "host-a", db_url)
    store = a.extensions["fedser_blobs"]
    assert store.get(good_sha) == good
    with pytest.raises(MissingBlob):
        store.get(wrong_sha)
    assert (inst / "blobs" / wrong_sha[:2] / wrong_sha).read_bytes() == bad  # not imported, not deleted
    _close(a)
    b = _host(tmp_path, "host-a", db_url)  # every start tries again; the good file is not doubled
    with b.extensions["fedser_sessionmaker"]() as s:
        assert s.scalar(select(func.count()).select_from(Blob)) == 1
    _close(b)


def test_puts_of_the_same_file_from_two_hosts_at_once_make_one_row(tmp_path, db_url, shared):
    cfg = {k: shared[k] for k in ("SERVER_KEY_FILE", "ADMIN_TOKEN_FILE")}
    a, b = _host(tmp_path, "host-a", db_url, **cfg), _host(tmp_path, "host-b", db_url, **cfg)
    data = os.urandom(300_000)
    refs, errors = [], []

    def put(store):
        try:
            refs.append(store.put(data))
        except Exception as exc:  # noqa: BLE001 - any failure fails the test below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(app.extensions["fedser_blobs"],)) for app in (a, b) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(refs) == 8 and len(set(refs)) == 1
    with a.extensions["fedser_sessionmaker"]() as s:
        assert s.scalar(select(func.count()).select_from(Blob)) == 1
        assert s.scalar(select(Blob.size)) == len(data)
    assert b.extensions["fedser_blobs"].get(refs[0].sha256) == data
    _close(a, b)


def test_another_hosts_job_shows_its_log_from_the_database_and_is_reaped_by_heartbeat(tmp_path, db_url, shared):
    """A job runs on the host that started it; any other host shows its log tail (copied to the job's row) and
    judges it by its heartbeat, never by a pid that means nothing there."""
    from aggregator.jobs import HEARTBEAT_LOST, reap

    cfg = {k: shared[k] for k in ("SERVER_KEY_FILE", "ADMIN_TOKEN_FILE")}
    b = _host(tmp_path, "host-b", db_url, **cfg)
    now = time.time()
    with b.extensions["fedser_sessionmaker"]() as s:
        s.add_all([Job(status="running", params="{}", created_at=now - 600, started_at=now - 600, pid=1,
                       host="some-other-host", log_tail="epoch 3/40 ...", heartbeat_at=now - 5),
                   Job(status="running", params="{}", created_at=now - 600, started_at=now - 600, pid=1,
                       host="some-other-host", log_tail="epoch 1/40", heartbeat_at=now - HEARTBEAT_LOST - 1)])
        s.commit()
    auth = {"Authorization": f"Bearer {shared['token']}"}
    r = b.test_client().get("/api/v1/admin/jobs/1", headers=auth)
    assert r.status_code == 200 and r.json["log_tail"] == "epoch 3/40 ..." and r.json["status"] == "running"
    r = b.test_client().get("/api/v1/admin/jobs/2", headers=auth)
    assert r.json["status"] == "failed" and "some-other-host" in r.json["detail"]
    with b.extensions["fedser_sessionmaker"]() as s:  # pid 1 exists here, yet it is not the job's process
        job = s.get(Job, 1)
        reap(s, job)
        assert job.status == "running"
    _close(b)


def test_a_configured_admin_token_is_recorded_and_a_different_one_refused(tmp_path, db_url, shared):
    """Host A has ADMIN_TOKEN set; host B with none must not quietly make its own, and host C with another
    configured token must not start: each is a ConfigError naming the setting, never showing a token."""
    keyed = {"SERVER_KEY_FILE": shared["SERVER_KEY_FILE"]}
    a = _host(tmp_path, "host-a", db_url, ADMIN_TOKEN="token-of-host-a-0123456789", **keyed)
    with a.extensions["fedser_sessionmaker"]() as s:
        recorded = s.scalar(select(SharedSetting.value).where(SharedSetting.name == "admin_token_sha256"))
    assert recorded == hashlib.sha256(b"token-of-host-a-0123456789").hexdigest()
    with pytest.raises(ConfigError, match="ADMIN_TOKEN") as none:
        _host(tmp_path, "host-b", db_url, **keyed)
    assert not (tmp_path / "host-b" / "admin_token").exists()
    with pytest.raises(ConfigError, match="the admin token from ADMIN_TOKEN is not") as other:
        _host(tmp_path, "host-c", db_url, ADMIN_TOKEN="another-token-9876543210", **keyed)
    token_file = tmp_path / "other_token"
    token_file.write_text("a-third-token-000000\n")
    token_file.chmod(0o600)
    with pytest.raises(ConfigError, match="ADMIN_TOKEN_FILE=") as from_file:
        _host(tmp_path, "host-d", db_url, ADMIN_TOKEN_FILE=str(token_file), **keyed)
    for exc in (none, other, from_file):
        assert "another-token" not in str(exc.value) and "token-of-host-a" not in str(exc.value)
    # The same token, from a file this time, starts.
    same = tmp_path / "same_token"
    same.write_text("token-of-host-a-0123456789\n")
    same.chmod(0o600)
    e = _host(tmp_path, "host-e", db_url, ADMIN_TOKEN_FILE=str(same), **keyed)
    assert e.config["ADMIN_TOKEN"] == "token-of-host-a-0123456789"
    _close(a, e)
