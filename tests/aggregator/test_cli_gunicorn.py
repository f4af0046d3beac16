"""``serve`` configures gunicorn's control socket only where this gunicorn has the setting."""

from __future__ import annotations

import re
from pathlib import Path

from gunicorn.config import Config

from aggregator.cli import _set_control_socket

REPO = Path(__file__).resolve().parents[2]


def test_control_socket_settings_are_guarded_for_a_gunicorn_without_them(tmp_path):
    cfg = Config()
    for name in ("control_socket", "control_socket_disable"):  # gunicorn < 25.1 has neither
        cfg.settings.pop(name, None)
    _set_control_socket(cfg, None)  # AttributeError before the guard
    _set_control_socket(cfg, str(tmp_path / "ctl.sock"))


def test_control_socket_settings_on_this_gunicorn(tmp_path):
    cfg = Config()
    _set_control_socket(cfg, None)
    assert cfg.settings["control_socket_disable"].get() is True
    cfg = Config()
    _set_control_socket(cfg, str(tmp_path / "ctl.sock"))
    assert cfg.settings["control_socket"].get() == str((tmp_path / "ctl.sock").resolve())


def test_gunicorn_floor_has_the_control_socket_settings():
    floor = re.search(r'"gunicorn>=([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert tuple(int(x) for x in floor.split(".")) >= (25, 1)
