"""The Raspberry Pi install, proven under emulation: scripts/pi-check.sh (arm64 Debian bookworm and trixie under
qemu-user, the project's wheel with [edge,audio] from the package index, the device path on real clips).

Slow (the root file systems take minutes to build the first time and are cached in .cache/pi-rootfs; a run
after that takes about 10 minutes per release on 2 cores) and needs root, binfmt_misc and the network:
``scripts/test.sh --slow -k pi``. ``PI_CHECK_SUITES=bookworm`` narrows it to one release.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITES = os.environ.get("PI_CHECK_SUITES", "bookworm trixie").split()
PYTHONS = {"bookworm": "3.11", "trixie": "3.13"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(4 * 3600)]


def test_the_edge_install_runs_on_emulated_arm64():
    if os.getuid() != 0:
        pytest.skip("pi-check needs root (debootstrap, chroot, mounts)")
    cache = Path(os.environ.get("PI_CHECK_CACHE", REPO / ".cache" / "pi-rootfs"))
    out = subprocess.run([str(REPO / "scripts" / "pi-check.sh"), "--suites", " ".join(SUITES)], cwd=REPO,
                         capture_output=True, text=True, timeout=4 * 3600)
    print(out.stdout[-6000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    for suite in SUITES:
        litert = json.loads((cache / "results" / f"{suite}-ai-edge-litert.json").read_text())
        assert litert["status"] == "passed" and litert["machine"] == "aarch64", litert
        assert litert["python"].startswith(PYTHONS[suite])
        assert litert["personalize"]["status"] in ("kept", "discarded")
        assert litert.get("same_predictions_as_host", True)
        tflite = json.loads((cache / "results" / f"{suite}-tflite-runtime.json").read_text())
        if suite == "bookworm":  # tflite-runtime 2.14 has cp311 aarch64 wheels, none for cp313
            assert tflite["status"] == "passed" and tflite["runtime"]["version"] == "2.14.0", tflite
        else:
            assert tflite["status"] in ("passed", "no wheel"), tflite
