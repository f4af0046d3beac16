"""The admin console: one page at ``/admin`` that reads ``/api/v1/admin/status`` with the admin token.

The page itself holds no data and needs no login on the server: the admin
pastes the token (kept in the tab's sessionStorage; ``/admin#token=...`` also
works, the fragment never reaches the server), and the page's script sends it
as a bearer token. No external scripts or fonts: it works on an offline LAN. Its Content-Security-Policy lets only
the page's own script run (by its sha256): markup that reached the page from a device, a model's metadata or a
job would not run even if a value were ever shown unescaped.
"""

from __future__ import annotations

import functools
from importlib import resources

from flask import Blueprint, Response, jsonify

from aggregator.api import API_PREFIX, admin_required, server_key
from edge_sdk.web import page_csp

bp = Blueprint("dashboard", __name__)


@bp.get(f"{API_PREFIX}/admin/console")
@admin_required
def console():
    """Personal against global accuracy per device and fleet-wide, versions with lineage, refused rounds."""
    from aggregator import console as data
    from aggregator.db import get_read_session

    # A read: no write lock (SQLite's write sessions BEGIN IMMEDIATE and would wait behind a closing round).
    return jsonify(data.console(get_read_session(), server_key()))


@functools.cache
def page_and_csp() -> tuple[str, str]:
    """(the page, its Content-Security-Policy)."""
    html = resources.files("aggregator").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    return html, page_csp(html.encode())  # the device page's policy: only its own script runs, by its sha256


@bp.get("/admin")
def page():
    html, csp = page_and_csp()
    resp = Response(html, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = csp
    resp.headers["X-Frame-Options"] = "DENY"  # no other site may frame the console (clickjacking)
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    return resp
