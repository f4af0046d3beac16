"""A malformed ``test-hooks.json`` in the instance folder is logged and ignored: the post that completes a round
still closes it (202 with the new version), never a 500."""

from __future__ import annotations

import logging

import pytest

from aggregator import create_app
from aggregator.service import TEST_HOOKS_FILE
from edge_sdk.model import ModelMetadata
from tests.aggregator.test_shared_state import DATA, _enroll, _publish
from tests.conftest import signed_update


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"pause_before_close_commit": "soon"}',
                                     b'{"pause_before_close_commit": 0.01, "marker": 7}', b"\xff\xfe"])
def test_a_malformed_hooks_file_is_ignored_and_the_round_closes(tmp_path, content):
    inst = tmp_path / "inst"
    app = create_app({"INSTANCE_PATH": str(inst), "ROUND_MIN_UPDATES": 2})
    (inst / TEST_HOOKS_FILE).write_bytes(content)
    client, token = app.test_client(), app.config["ADMIN_TOKEN"]
    assert _publish(client, token) == 1
    layout = ModelMetadata.load(DATA / "default_model.json").head_layout
    codes, seen = [], _Records()
    logging.getLogger("aggregator").addHandler(seen)
    try:
        for _ in range(2):
            enrolled, key = _enroll(client, token)
            r = client.post("/api/v1/updates", data=signed_update(enrolled["device_id"], key, layout,
                                                                 sequence=1).to_bytes())
            codes.append(r.status_code)
    finally:
        logging.getLogger("aggregator").removeHandler(seen)
    assert codes == [202, 202], r.json
    assert r.json.get("round_closed") is True and r.json["published_version"] == 2
    if content.startswith(b"{not") or content.startswith(b"[") or content.startswith(b"\xff"):
        assert any("ignoring the test hooks file" in m for m in seen.messages), seen.messages
    app.extensions["fedser_engine"].dispose()
