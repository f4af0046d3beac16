"""The systemd units in deploy/: valid for systemd itself, and sandboxed the way Debian's own units are.

``systemd-analyze verify`` loads each unit as systemd would (unknown keys, bad values and a missing
ExecStart binary are reported); ``systemd-analyze security --offline`` scores its exposure. Neither needs
systemd as PID 1, so this runs in a container as root. ExecStart points at ``/opt/fedser/bin`` (the install
the docs describe); the copy verified here points at this interpreter's own console scripts instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = ("fedser-edge.service", "fedser-aggregator.service")
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing (Debian package systemd; scripts/setup.sh installs it)")


def _settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (REPO / "deploy" / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _local_copy(unit: str, tmp_path: Path) -> Path:
    text = (REPO / "deploy" / unit).read_text()
    assert "ExecStart=/opt/fedser/bin/" in text
    path = tmp_path / unit
    path.write_text(text.replace("/opt/fedser/bin/", f"{BIN}/"))
    return path


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_is_clean(unit, tmp_path):
    assert (BIN / unit.removesuffix(".service")).exists(), "console script missing from this environment"
    out = subprocess.run(["systemd-analyze", "verify", str(_local_copy(unit, tmp_path))], capture_output=True,
                         text=True, timeout=60)
    # verify exits 0 on an unknown key (it only warns), so any output at all is a failure.
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


def test_verify_catches_a_misspelt_key(tmp_path):
    """The check above can fail: a typo in a hardening key is reported."""
    path = _local_copy("fedser-edge.service", tmp_path)
    path.write_text(path.read_text().replace("ProtectSystem=", "ProtectSystm="))
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in out.stderr and "ProtectSystm" in out.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_hardened_like_debian_units(unit, tmp_path):
    s = _settings(unit)
    user = (s.get("User") or [""])[-1]
    assert user.startswith("fedser") or s.get("DynamicUser") == ["yes"], "a dedicated user, never root"
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "Restart": "on-failure", "StateDirectoryMode": "0700",
                       "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
                       "RestrictSUIDSGID": "yes", "SystemCallArchitectures": "native", "UMask": "0077",
                       "CapabilityBoundingSet": ""}.items():
        assert s.get(key, [None])[-1] == value, f"{unit}: {key}={value}"
    assert s.get("RestartSec") and s.get("StateDirectory") and s.get("SystemCallFilter")
    state = s["StateDirectory"][-1]
    assert f"/var/lib/{state}" in s["ExecStart"][-1], "the state folder passed to the program is the StateDirectory"
    if unit == "fedser-edge.service":
        # The microphone: ALSA devices through a closed device policy, the audio group.
        assert s.get("SupplementaryGroups") == ["audio"] and "char-alsa rw" in s.get("DeviceAllow", [])
        assert s.get("DevicePolicy") == ["closed"] and s.get("PrivateDevices", ["no"]) == ["no"]
    else:
        assert s.get("PrivateDevices") == ["yes"]
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(_local_copy(unit, tmp_path))],
                         capture_output=True, text=True, timeout=60)
    if "--offline" in out.stderr and out.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline security check: {out.stderr.strip()[:200]}")
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert score, out.stdout[-2000:] + out.stderr[-2000:]
    print(f"{unit}: exposure {score.group(1)} (systemd-analyze security; 10 = unsandboxed)")
    assert float(score.group(1)) <= 2.5, out.stdout


def test_sysusers_creates_the_service_users(tmp_path):
    """deploy/fedser.sysusers.conf creates the users the units name, fedser in group audio."""
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers missing (Debian package systemd)")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\naudio:x:29:\n")
    out = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(REPO / "deploy" / "fedser.sysusers.conf")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    users = {line.split(":")[0] for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":")[3] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    for unit in UNITS:
        assert _settings(unit)["User"][-1] in users
    assert "fedser" in groups["audio"].split(",")
