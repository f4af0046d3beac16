"""The request log line carries the path percent-encoded: a %0a in the URL cannot forge a second log line."""

from __future__ import annotations

import io
import logging

from aggregator import create_app


def test_a_newline_in_the_path_does_not_forge_a_log_line(tmp_path):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "LOG_JSON": False})
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("aggregator.http").addHandler(handler)
    try:
        r = app.test_client().get("/nothing%0aGET%20/api/v1/admin/status%20200%0d")
    finally:
        logging.getLogger("aggregator.http").removeHandler(handler)
    assert r.status_code == 404
    lines = stream.getvalue().splitlines()
    assert lines == ["GET /nothing%0AGET%20/api/v1/admin/status%20200%0D 404"], lines
    app.extensions["fedser_engine"].dispose()
