"""The validation gate judges each group of its validation set (issue 14): the real app (Flask's test client over
the real app, SQLite), the real TFLite model and real validation clips.

Every round here moves the head between two constant predictors (a bias of +-50 on the last layer: every clip goes
to one class, whatever the encoder says), so each group's UAR is known without depending on the trained model:
the "old" population's clips are all angry, the "new" population's all sad; a head that says angry to everything
scores old 1.0 / new 0.0, one that says sad the other way round, and the pooled UAR (two classes present) is 0.5
for both. A round from the first to the second helps the new people, ruins the old ones and leaves the pooled
figure where it was: the pooled gate alone publishes it.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import ConfigError, create_app
from edge_sdk.wire import UpdateEnvelope
from tests.aggregator.test_service import Server


def _bias(layout):
    return [s for s in layout if len(s.shape) == 1][-1]


def _delta(layout, labels, to_class: str, from_class: str | None = None) -> dict:
    """A head delta that makes the last layer's bias +50 for ``to_class`` and -50 for the others, starting from a
    head the same delta made for ``from_class`` (or from the base's own bias, which is small)."""
    deltas = {s.name: np.zeros(s.shape, np.float32) for s in layout}
    bias = _bias(layout)
    target = np.where(np.array(labels) == to_class, 50.0, -50.0).astype(np.float32)
    if from_class is not None:
        target -= np.where(np.array(labels) == from_class, 50.0, -50.0).astype(np.float32)
    deltas[bias.name] = target
    return deltas


def _manifest(path, rows, *, group_column: bool = False):
    head = "path,speaker,label" + (",group" if group_column else "")
    path.write_text(head + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _rows(clips, label, speaker, n, group=None):
    chosen = [c for c in clips if c.label == label][:n]
    assert len(chosen) == n, (label, len(chosen))
    return [(c.path, speaker(c), c.label) + ((group,) if group is not None else ()) for c in chosen]


def _two_rounds(tmp_path, trained_model, validation_csv, **config):
    """Round 1 without a gate: v2 says angry to everything. Then the server restarts with the gate on
    ``validation_csv``, and round 2's candidate says sad to everything. Returns (server, round 2's response)."""
    first = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=1, MAX_UPDATE_L2_NORM=1e9)
    assert first.publish().status_code == 201
    dev, key = first.enroll()
    labels = list(trained_model.metadata.labels)
    env = UpdateEnvelope.create(device_id=dev, base_version=1, layout=first.layout,
                                deltas=_delta(first.layout, labels, "angry"), num_examples=5, sequence=1, sign=key.sign)
    assert first.post(env).json.get("published_version") == 2
    srv = Server(tmp_path, trained_model, ROUND_MIN_UPDATES=1, MAX_UPDATE_L2_NORM=1e9,
                 VALIDATION_MANIFEST=str(validation_csv), **config)
    env = UpdateEnvelope.create(device_id=dev, base_version=2, layout=srv.layout,
                                deltas=_delta(srv.layout, labels, "sad", "angry"), num_examples=5, sequence=2,
                                sign=key.sign)
    r = srv.post(env)
    assert r.status_code == 202, r.json
    return srv, r.json


def test_a_round_that_helps_one_group_and_ruins_another_is_refused_naming_it(tmp_path, trained_model,
                                                                            synthetic_clips):
    # Groups from the speakers' corpus prefixes (a 3-column manifest, as the demo writes it): 20 clips each.
    csv = _manifest(tmp_path / "validation.csv",
                    _rows(synthetic_clips, "angry", lambda c: "ravdess-" + c.speaker.split("-")[1], 20)
                    + _rows(synthetic_clips, "sad", lambda c: "nemo-" + c.speaker.split("-")[1], 20))
    srv, body = _two_rounds(tmp_path, trained_model, csv, VALIDATION_MARGIN=0.02)
    reason = body.get("round_rejected") or ""
    assert reason.startswith("group ravdess: validation UAR would drop from 1.000 to 0.000"), body
    assert "nemo" not in reason  # the pooled UAR (0.5 -> 0.5) and the new population (0.0 -> 1.0) are fine
    status = srv.status()
    assert status["current_version"] == 2 and status["rounds"][1]["status"] == "rejected"
    # The console's refused round: pooled and per-group figures, from the round's gate report.
    console = srv.client.get("/api/v1/admin/console", headers=srv.auth).json
    refused = console["refused_rounds"][0]
    assert refused["candidate_uar"] == refused["current_uar"] == 0.5 and refused["min_group_clips"] == 20
    groups = {g["group"]: g for g in refused["groups"]}
    assert groups["ravdess"] == {"group": "ravdess", "examples": 20, "candidate_uar": 0.0, "current_uar": 1.0,
                                 "candidate_accuracy": 0.0, "current_accuracy": 1.0, "gates": True,
                                 "dropped": True, "note": ""}
    assert groups["nemo"]["candidate_uar"] == 1.0 and groups["nemo"]["current_uar"] == 0.0
    assert not groups["nemo"]["dropped"] and groups["nemo"]["gates"]


def test_a_group_column_names_the_groups(tmp_path, trained_model, synthetic_clips):
    csv = _manifest(tmp_path / "validation.csv",
                    _rows(synthetic_clips, "angry", lambda c: c.speaker, 20, "english speakers")
                    + _rows(synthetic_clips, "sad", lambda c: c.speaker, 20, "polish_speakers"), group_column=True)
    _, body = _two_rounds(tmp_path, trained_model, csv)
    assert body.get("round_rejected", "").startswith("group english speakers: validation UAR would drop"), body


def test_a_group_under_the_minimum_is_reported_but_does_not_gate(tmp_path, trained_model, synthetic_clips):
    csv = _manifest(tmp_path / "validation.csv",
                    _rows(synthetic_clips, "angry", lambda c: "ravdess-" + c.speaker.split("-")[1], 8)
                    + _rows(synthetic_clips, "sad", lambda c: "nemo-" + c.speaker.split("-")[1], 20))
    srv, body = _two_rounds(tmp_path, trained_model, csv)
    assert body.get("published_version") == 3 and "round_rejected" not in body, body
    gate = srv.status()["current_metrics"]["validation"]
    small = gate["groups"]["ravdess"]
    assert small["examples"] == 8 and not small["gates"] and not small["dropped"]
    assert small["current"]["uar"] == 1.0 and small["candidate"]["uar"] == 0.0  # reported all the same
    assert "fewer than VALIDATION_MIN_GROUP_CLIPS=20" in small["note"] and "does not gate" in small["note"]
    assert gate["groups"]["nemo"]["gates"] and gate["min_group_clips"] == 20
    # The same set with a lower minimum: the small group gates, and the round is refused naming it.
    _, body = _two_rounds(tmp_path / "again", trained_model, csv, VALIDATION_MIN_GROUP_CLIPS=8)
    assert body.get("round_rejected", "").startswith("group ravdess: "), body


def test_a_manifest_of_one_group_is_judged_on_the_pooled_uar_as_before(tmp_path, trained_model, synthetic_clips):
    # The same clips, 3 columns, speakers without a corpus prefix: one group, the pooled 0.5 -> 0.5 passes.
    csv = _manifest(tmp_path / "validation.csv",
                    _rows(synthetic_clips, "angry", lambda c: c.speaker.split("-")[1], 20)
                    + _rows(synthetic_clips, "sad", lambda c: c.speaker.split("-")[1], 20))
    srv, body = _two_rounds(tmp_path, trained_model, csv)
    assert body.get("published_version") == 3, body
    gate = srv.status()["current_metrics"]["validation"]
    assert set(gate) == {"candidate", "current", "margin", "set"}  # the report of before: no groups
    assert gate["candidate"]["uar"] == gate["current"]["uar"] == 0.5 and gate["candidate"]["num_examples"] == 40
    # ... and a round whose pooled UAR drops is refused with the reason of before. v3 says sad to everything; a
    # head that says happy (absent from the set) scores 0.
    dev, key = srv.enroll()
    labels = list(trained_model.metadata.labels)
    env = UpdateEnvelope.create(device_id=dev, base_version=3, layout=srv.layout,
                                deltas=_delta(srv.layout, labels, "happy", "sad"), num_examples=5, sequence=1,
                                sign=key.sign)
    body = srv.post(env).json
    assert body["round_rejected"] == "validation UAR would drop from 0.500 to 0.000, more than the margin 0.020"
    refused = srv.client.get("/api/v1/admin/console", headers=srv.auth).json["refused_rounds"][0]
    assert refused["groups"] == [] and refused["candidate_uar"] == 0.0


@pytest.mark.parametrize("cell, words", [("", "group '' is not a group name"),
                                         ("a/b", "group 'a/b' is not a group name"),
                                         ("<script>", "group .<script>. is not a group name")])
def test_a_malformed_group_is_refused_at_start_naming_the_line(tmp_path, trained_model, synthetic_clips, cell,
                                                               words):
    rows = _rows(synthetic_clips, "angry", lambda c: c.speaker, 3, "old")
    rows[1] = rows[1][:3] + (cell,)
    csv = _manifest(tmp_path / "validation.csv", rows, group_column=True)
    with pytest.raises(ConfigError, match=rf"VALIDATION_MANIFEST: .*validation.csv:3: {words}"):
        create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "VALIDATION_MANIFEST": str(csv)})


def test_one_clip_in_two_groups_is_refused_at_start(tmp_path, trained_model, synthetic_clips):
    rows = _rows(synthetic_clips, "angry", lambda c: c.speaker, 2, "old")
    rows.append(rows[0][:3] + ("new",))
    csv = _manifest(tmp_path / "validation.csv", rows, group_column=True)
    with pytest.raises(ConfigError, match=r"validation.csv:4: .* is in group 'new' here and in group 'old' on "
                                          r"line 2"):
        create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "VALIDATION_MANIFEST": str(csv)})


def test_more_groups_than_the_gate_judges_are_refused_at_start(tmp_path, trained_model, synthetic_clips):
    from aggregator.validation import MAX_GROUPS

    clips = [c for c in synthetic_clips][: MAX_GROUPS + 1]
    assert len(clips) == MAX_GROUPS + 1
    rows = [(c.path, c.speaker, c.label, f"g{i}") for i, c in enumerate(clips)]
    csv = _manifest(tmp_path / "validation.csv", rows, group_column=True)
    with pytest.raises(ConfigError, match=rf"{MAX_GROUPS + 1} groups .* at most {MAX_GROUPS}"):
        create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "VALIDATION_MANIFEST": str(csv)})


@pytest.mark.parametrize("value", [0, -3, "20", 2.5, True])
def test_the_minimum_group_size_setting_is_checked_at_start(tmp_path, value):
    with pytest.raises(ConfigError, match="VALIDATION_MIN_GROUP_CLIPS="):
        create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "VALIDATION_MIN_GROUP_CLIPS": value})


def test_the_minimum_group_size_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSER_VALIDATION_MIN_GROUP_CLIPS", "two")
    with pytest.raises(ConfigError, match="FEDSER_VALIDATION_MIN_GROUP_CLIPS='two': expected an integer"):
        create_app({"INSTANCE_PATH": str(tmp_path / "inst")})
    monkeypatch.setenv("FEDSER_VALIDATION_MIN_GROUP_CLIPS", "5")
    assert create_app({"INSTANCE_PATH": str(tmp_path / "inst")}).config["VALIDATION_MIN_GROUP_CLIPS"] == 5


def test_a_new_base_is_judged_by_group_too(tmp_path, trained_model, synthetic_clips):
    csv = _manifest(tmp_path / "validation.csv",
                    _rows(synthetic_clips, "angry", lambda c: "ravdess-" + c.speaker.split("-")[1], 20)
                    + _rows(synthetic_clips, "sad", lambda c: "nemo-" + c.speaker.split("-")[1], 20))
    srv = Server(tmp_path, trained_model, VALIDATION_MANIFEST=str(csv))
    first = srv.publish().json["validation"]
    assert first["current"] is None and set(first["groups"]) == {"nemo", "ravdess"}
    assert first["groups"]["nemo"]["current"] is None and first["groups"]["nemo"]["examples"] == 20
    again = srv.publish()  # the same base again: every group's figures equal, published
    assert again.status_code == 201, again.json
    groups = again.json["validation"]["groups"]
    assert all(g["candidate"] == g["current"] and not g["dropped"] for g in groups.values()), groups


def test_speaker_ids_that_name_no_corpus_are_one_group(tmp_path, trained_model, synthetic_clips):
    # A 3-column manifest of a deployment whose speaker ids are UUIDs (hyphens, no corpus): one group, judged on
    # the pooled figure as before; 40 distinct "prefixes" must not become 40 groups (or fail the start).
    import uuid

    rows = [(c.path, str(uuid.UUID(int=i + 1)), c.label) for i, c in enumerate(synthetic_clips[:40])]
    csv = _manifest(tmp_path / "validation.csv", rows)
    from aggregator.validation import manifest_groups

    groups, explicit = manifest_groups(csv, csv.read_bytes())
    assert not explicit and set(groups.values()) == {"(no prefix)"}
    create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "VALIDATION_MANIFEST": str(csv)})


def test_a_manifest_that_is_not_utf8_is_refused_at_start_naming_it(tmp_path):
    csv = tmp_path / "validation.csv"
    csv.write_bytes("path,speaker,label\nclip\xe9.wav,nemo-EB0,sad\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"validation.csv is not UTF-8 text"):
        create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "VALIDATION_MANIFEST": str(csv)})


def _summary(uar, n, groups=None):
    out = {"uar": uar, "accuracy": uar, "num_examples": n}
    if groups is not None:
        out["groups"] = {g: {"uar": u, "accuracy": u, "num_examples": k} for g, (u, k) in groups.items()}
    return out


@pytest.mark.parametrize("group_z, drop, refused", [(1.0, 0.05, False), (1.0, 0.08, True), (0.0, 0.05, True)])
def test_a_group_gates_on_a_drop_beyond_the_margin_and_its_standard_error(tmp_path, group_z, drop, refused):
    # A 56-clip group at 0.6 UAR: one standard error is sqrt(0.24 / 56) = 0.065; the margin 0.02 is about one clip.
    from aggregator.validation import Validator

    csv = _manifest(tmp_path / "validation.csv", [("a.wav", "nemo-EB0", "sad"), ("b.wav", "ravdess-19", "sad")])
    v = Validator(csv, tmp_path / "cache", None, None, margin=0.02, group_z=group_z)
    current = _summary(0.6, 116, {"nemo": (0.6, 60), "ravdess": (0.6, 56)})
    candidate = _summary(0.6, 116, {"nemo": (0.6 + drop, 60), "ravdess": (0.6 - drop, 56)})
    ok, detail = v._verdict(candidate, current)
    assert ok is (not refused), detail
    entry = detail["groups"]["ravdess"]
    assert entry["dropped"] is refused
    assert entry["allowed_drop"] == pytest.approx(max(0.02, group_z * (0.24 / 56) ** 0.5), abs=1e-4)
    if refused:
        assert detail["reason"].startswith("group ravdess: validation UAR would drop from 0.600 to ")


@pytest.mark.parametrize("value", [-1, 11, "x", True, float("nan")])
def test_the_group_standard_error_setting_is_checked_at_start(tmp_path, value):
    with pytest.raises(ConfigError, match="VALIDATION_GROUP_Z"):
        create_app({"INSTANCE_PATH": str(tmp_path / "inst"), "VALIDATION_GROUP_Z": value})


def test_every_corpus_loader_s_speaker_prefix_is_a_group(tmp_path):
    # The prefixes models.datasets' loaders give speaker ids (a generated tree of each would be slow; the ids are
    # what the loaders write): each is its own group.
    from aggregator.validation import manifest_groups

    speakers = ["ravdess-21", "crema-1001", "iemocap-Ses01F", "emodb-03", "tess-OAF", "nemo-IC0", "synthetic-01"]
    csv = _manifest(tmp_path / "validation.csv", [(f"{s}.wav", s, "sad") for s in speakers])
    groups, _ = manifest_groups(csv, csv.read_bytes())
    assert sorted(groups.values()) == sorted(s.split("-")[0] for s in speakers)
