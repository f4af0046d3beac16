"""The aggregator's configuration (Flask's ``from_prefixed_env("FEDSER")``, typed by the defaults) and its
commands under Flask's own CLI (``flask --app aggregator ...``) as well as ``fedser-aggregator``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator import ConfigError, create_app

ROOT = Path(__file__).resolve().parents[2]
FLASK = str(Path(sys.executable).with_name("flask"))


@pytest.fixture(autouse=True)
def _no_fedser_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("FEDSER_"):
            monkeypatch.delenv(name)


def _app(tmp_path, **config):
    return create_app({"INSTANCE_PATH": str(tmp_path / "inst"), **config})


def test_fedser_variables_reach_flask_settings_too(tmp_path, monkeypatch):
    # Flask's from_prefixed_env: any FEDSER_<KEY>, Flask's own settings included (the hand-written copy read
    # only the keys of DEFAULTS).
    monkeypatch.setenv("FEDSER_PREFERRED_URL_SCHEME", "https")
    monkeypatch.setenv("FEDSER_SESSION_COOKIE_NAME", "fedser")
    app = _app(tmp_path)
    assert app.config["PREFERRED_URL_SCHEME"] == "https" and app.config["SESSION_COOKIE_NAME"] == "fedser"


def test_values_take_the_type_of_their_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSER_ROUND_MIN_UPDATES", "3")
    monkeypatch.setenv("FEDSER_CLIP_NORM", "2.5")
    monkeypatch.setenv("FEDSER_LOG_JSON", "off")
    monkeypatch.setenv("FEDSER_ADMIN_TOKEN", "0123")  # JSON would read a number and drop the leading zero
    monkeypatch.setenv("FEDSER_AGGREGATION", "median")
    app = _app(tmp_path)
    assert app.config["ROUND_MIN_UPDATES"] == 3 and isinstance(app.config["ROUND_MIN_UPDATES"], int)
    assert app.config["CLIP_NORM"] == 2.5 and app.config["LOG_JSON"] is False
    assert app.config["ADMIN_TOKEN"] == "0123" and app.config["AGGREGATION"] == "median"
    r = app.test_client().get("/metrics", headers={"Authorization": "Bearer 0123"})
    assert r.status_code == 200


@pytest.mark.parametrize("name, value, match", [
    ("FEDSER_ROUND_MIN_UPDATES", "two", r"FEDSER_ROUND_MIN_UPDATES='two': expected an integer"),
    ("FEDSER_MAX_UPDATE_L2_NORM", "nan", r"FEDSER_MAX_UPDATE_L2_NORM='nan': expected a number"),
    ("FEDSER_CLIP_NORM", "1,5", r"FEDSER_CLIP_NORM='1,5': expected a number"),
    ("FEDSER_LOG_JSON", "maybe", r"FEDSER_LOG_JSON='maybe': expected one of"),
])
def test_a_bad_value_is_an_error_naming_the_variable(tmp_path, monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=match):
        _app(tmp_path)


def test_order_defaults_then_config_json_then_environment_then_test_config(tmp_path, monkeypatch):
    inst = tmp_path / "inst"
    inst.mkdir()
    (inst / "config.json").write_text(json.dumps({"ROUND_MIN_UPDATES": 5, "CLIP_NORM": 1.0, "TRIM_FRACTION": 0.2}))
    monkeypatch.setenv("FEDSER_CLIP_NORM", "3")
    monkeypatch.setenv("FEDSER_TRIM_FRACTION", "0.3")
    app = create_app({"INSTANCE_PATH": str(inst), "TRIM_FRACTION": 0.4})
    assert app.config["ROUND_MIN_UPDATES"] == 5  # config.json over the default
    assert app.config["CLIP_NORM"] == 3.0  # the environment over config.json
    assert app.config["TRIM_FRACTION"] == 0.4  # test_config last
    assert app.config["RATE_LIMIT_PER_HOUR"] == 120  # the default


@pytest.mark.parametrize("content, match", [
    (b"{bad", "is not valid JSON"), (b"[1, 2]", "must hold a JSON object of settings, not a list"),
    (b"\xff\xfe{}", "cannot be read as UTF-8"), (b'{"ROUND_MIN_UPDATES": "x"}', "ROUND_MIN_UPDATES must be a number"),
])
def test_a_config_json_that_is_not_an_object_of_settings_is_an_error_naming_it(tmp_path, content, match):
    """Before: JSONDecodeError, TypeError and UnicodeDecodeError tracebacks from Flask's loader (found by an
    audit), and an int() message that did not name the setting."""
    inst = tmp_path / "inst"
    inst.mkdir()
    (inst / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        create_app({"INSTANCE_PATH": str(inst)})


def test_an_unusable_database_or_instance_folder_is_an_error_naming_it_without_the_password(tmp_path):
    with pytest.raises(ConfigError, match="foo://x cannot be used"):
        _app(tmp_path, DATABASE_URL="foo://x")
    with pytest.raises(ConfigError, match=r"cannot be used") as info:
        _app(tmp_path, DATABASE_URL="postgresql://fedser:s3cret@127.0.0.1:1/none")  # nothing listens on port 1
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="instance folder .* cannot be created"):
        create_app({"INSTANCE_PATH": str(tmp_path / "a-file" / "inst")})
    with pytest.raises(ConfigError, match="VALIDATION_MANIFEST"):
        _app(tmp_path, VALIDATION_MANIFEST=str(tmp_path / "missing.csv"))


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FEDSER_")}
    full.update(env, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    return subprocess.run(args, env=full, cwd=cwd, capture_output=True, text=True, timeout=180)


def test_admin_commands_under_flask_cli(tmp_path, trained_model):
    env = {"FEDSER_INSTANCE_PATH": str(tmp_path / "inst")}
    listed = _run([FLASK, "--app", "aggregator", "--help"], env, tmp_path)
    assert listed.returncode == 0, listed.stderr
    for command in ("create-token", "publish-base", "close-round", "rollback", "revoke", "status", "admin-token",
                    "jobs", "serve"):
        assert f"  {command} " in listed.stdout, f"{command} missing from:\n{listed.stdout}"
    token = _run([FLASK, "--app", "aggregator", "create-token", "--ttl", "60"], env, tmp_path)
    assert token.returncode == 0 and token.stdout.startswith("fset_"), token.stderr
    pub = _run([FLASK, "--app", "aggregator", "publish-base", str(trained_model.tflite_path),
                str(trained_model.metadata_path)], env, tmp_path)
    assert pub.returncode == 0 and json.loads(pub.stdout)["version"] == 1, pub.stderr
    back = _run([FLASK, "--app", "aggregator", "rollback", "1"], env, tmp_path)
    assert back.returncode == 0 and json.loads(back.stdout) == {"version": 2, "rollback_of": 1}, back.stderr
    missing = _run([FLASK, "--app", "aggregator", "rollback", "99"], env, tmp_path)
    assert missing.returncode == 1 and "no version 99" in missing.stderr
    bad = _run([FLASK, "--app", "aggregator", "rollback", "one"], env, tmp_path)
    assert bad.returncode == 2 and "not an integer: 'one'" in bad.stderr
    for args, said in ((["rollback", "99999999999999999999"], "must be 1..2147483647"),
                       (["close-round", "--min-updates", "-1"], "must be 1..1000000"),
                       (["create-token", "--ttl", "nan"], "must be in (0,")):
        refused = _run([FLASK, "--app", "aggregator", *args], env, tmp_path)  # before: tracebacks
        assert refused.returncode == 2 and said in refused.stderr and "Traceback" not in refused.stderr, args
    # The same instance through fedser-aggregator: both CLIs see one state.
    status = _run([sys.executable, "-m", "aggregator.cli", "--instance", str(tmp_path / "inst"), "status"], {},
                  tmp_path)
    assert status.returncode == 0 and json.loads(status.stdout)["current_version"] == 2, status.stderr
    token2 = _run([FLASK, "--app", "aggregator", "admin-token"], env, tmp_path)
    assert token2.stdout.strip() == (tmp_path / "inst" / "admin_token").read_text().strip()
