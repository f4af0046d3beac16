"""The validation gate: a candidate model is evaluated on a server-side validation set before it is published.

Configured with ``VALIDATION_MANIFEST`` (a CSV ``path,speaker,label``, the
same format as ``fedser-train``'s manifest) and ``VALIDATION_MARGIN``. The
encoder of a base is frozen, so the embeddings of the validation clips are
computed once per base (device features, TFLite ``infer``) and cached in
``<instance>/validation/`` as ``.npz`` (no pickle): a cache each host builds
for itself from the model files in the database and the validation clips
(which every host that may close a round mounts at the same path); judging a
round's candidate head then takes milliseconds. A candidate whose UAR is more than the
margin below the current version's is refused, with both figures in the reason.

Groups: each validation clip belongs to a group (the people a deployment serves, judged one by one): the optional
``group`` column of the manifest, else the corpus prefix of the speaker id when it names a corpus fedser reads
(``nemo-EB0`` -> ``nemo``, ``ravdess-19`` -> ``ravdess``, ``crema-1001`` -> ``crema``: :data:`CORPUS_PREFIXES`); any
other speaker id (no prefix, a UUID, ``user-42``) is in the group ``(no prefix)``. With two groups or more the
candidate is also refused when any group's UAR drops below the current version's on that group by more than the margin
*and* more than ``VALIDATION_GROUP_Z`` standard errors of that group's figure (``sqrt(u (1 - u) / n)``, u the current
UAR, n its clips: one clip of a 56-clip group moves its UAR by about 0.02, so the margin alone would refuse on noise),
and the gate's figures carry each group's (``groups``: candidate and current UAR and accuracy, examples); the reason
names the group. A group with fewer than ``VALIDATION_MIN_GROUP_CLIPS`` scored clips is reported but does not gate
(its entry says so). A manifest whose clips are all in one group (a 3-column manifest whose speakers share a prefix or
have none) is judged exactly as before: on the pooled UAR, with no ``groups`` in the figures. A malformed ``group``
cell (empty, or characters other than letters, digits, space and ``_ . + -``, at most 64) or one clip given two groups
is a :class:`~edge_sdk.errors.ParameterError` naming the manifest's line, raised when the app starts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import tempfile
import threading
from pathlib import Path

import numpy as np

from aggregator.registry import BlobStore, current_version, head_arrays, load_manifest
from edge_sdk.errors import ParameterError
from edge_sdk.manifest import Manifest
from edge_sdk.model import ModelMetadata, TFLiteModel
from edge_sdk.signing import SigningKey
from edge_sdk.storage import atomic_write
from models.datasets import LabelMap, corpus_of, manifest_clips, manifest_path
from models.evaluate import device_inputs
from models.metrics import classification_report

log = logging.getLogger("aggregator")

__all__ = ["Validator", "manifest_groups", "NO_PREFIX"]

MAX_GROUPS = 32  # a gate report of this many groups stays well under the 20,000 characters a round row keeps
NO_PREFIX = "(no prefix)"  # the group of a speaker id without a corpus prefix (when the manifest has no group column)
_GROUP = re.compile(r"^\w[\w .+-]{0,63}$")


# The speaker-id prefixes of the corpora fedser reads (models.datasets' loaders: ravdess-21, crema-1001,
# iemocap-Ses01F, emodb-03, tess-OAF, nemo-IC0, synthetic-01).
CORPUS_PREFIXES = frozenset({"ravdess", "crema", "iemocap", "emodb", "tess", "nemo", "synthetic"})


def _group_of(speaker: str) -> str:
    corpus = corpus_of(speaker)
    return corpus if corpus in CORPUS_PREFIXES else NO_PREFIX


def manifest_groups(csv_path: Path, data: bytes) -> tuple[dict[tuple[str, str], str], bool]:
    """({(clip path as manifest_clips gives it, speaker): group}, whether the manifest has a ``group`` column).

    ``data`` is the manifest's content. Rows with an empty path or speaker are left to
    :func:`models.datasets.manifest_clips`, which refuses them, naming the line, when the set is first read.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ParameterError(f"VALIDATION_MANIFEST {csv_path} is not UTF-8 text (byte {exc.start}: "
                             f"{data[exc.start:exc.start + 1]!r})") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    reader.fieldnames = header
    explicit = "group" in header
    groups: dict[tuple[str, str], tuple[str, int]] = {}
    for row in reader:
        line = reader.line_num
        path, speaker = (row.get("path") or "").strip(), (row.get("speaker") or "").strip()
        if not path or not speaker:
            continue
        if explicit:
            group = (row.get("group") or "").strip()
            if not _GROUP.match(group):
                raise ParameterError(
                    f"VALIDATION_MANIFEST {csv_path}:{line}: group {group!r} is not a group name (1 to 64 letters, "
                    "digits, spaces or _ . + -, starting with a letter or digit)")
        else:
            group = _group_of(speaker)
        key = (str(manifest_path(csv_path, path)), speaker)
        if key in groups and groups[key][0] != group:
            raise ParameterError(f"VALIDATION_MANIFEST {csv_path}:{line}: {path} ({speaker}) is in group {group!r} "
                                 f"here and in group {groups[key][0]!r} on line {groups[key][1]}")
        groups.setdefault(key, (group, line))
    return {k: g for k, (g, _) in groups.items()}, explicit


class Validator:
    def __init__(self, manifest_csv: str | os.PathLike, cache_dir: str | os.PathLike, blobs: BlobStore,
                 key: SigningKey, *, margin: float = 0.02, min_group_clips: int = 20, group_z: float = 1.0) -> None:
        # Absolute now, so that the clips' relative paths (relative to the manifest's folder, the one rule of
        # models.datasets.manifest_clips) do not depend on the directory a worker runs in later.
        self.csv = Path(manifest_csv).resolve()
        if not self.csv.is_file():
            raise ParameterError(f"VALIDATION_MANIFEST not found: {self.csv}")
        data = self.csv.read_bytes()
        self.csv_sha = hashlib.sha256(data).hexdigest()[:16]
        # Checked now, at start: a malformed group cell is an error naming its line, not a failure at a round close.
        self.groups, self.explicit_groups = manifest_groups(self.csv, data)
        names = sorted(set(self.groups.values()))
        if len(names) > MAX_GROUPS:
            raise ParameterError(f"VALIDATION_MANIFEST {self.csv}: {len(names)} groups ({', '.join(names[:5])}, ...); "
                                 f"the gate judges at most {MAX_GROUPS}")
        if isinstance(min_group_clips, bool) or not isinstance(min_group_clips, int) or min_group_clips < 1:
            raise ParameterError(f"VALIDATION_MIN_GROUP_CLIPS={min_group_clips!r}: expected an integer >= 1")
        self.min_group_clips = min_group_clips
        if isinstance(group_z, bool) or not isinstance(group_z, (int, float)) or not 0 <= group_z <= 10:
            raise ParameterError(f"VALIDATION_GROUP_Z={group_z!r}: expected a number of standard errors in [0, 10]")
        self.group_z = float(group_z)
        self.cache_dir = Path(cache_dir)
        self.blobs, self.key, self.margin = blobs, key, float(margin)
        self._lock = threading.Lock()

    def _embeddings(self, tflite: bytes, metadata: ModelMetadata
                    ) -> tuple[TFLiteModel, np.ndarray, np.ndarray, np.ndarray]:
        """(model loaded from ``tflite``, embeddings [N, E], label indices [N], groups [N]) of the validation clips."""
        sha = hashlib.sha256(tflite).hexdigest()
        tmp_dir = self.cache_dir / "models"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        model_path = tmp_dir / f"{sha}.tflite"
        if not model_path.exists():
            atomic_write(model_path, tflite)
        model = TFLiteModel(model_path, metadata)
        cache = self.cache_dir / f"emb-{sha[:24]}-{self.csv_sha}.npz"
        if cache.exists():
            with np.load(cache, allow_pickle=False) as data:
                if "groups" in data.files:  # a cache written before groups lacks them: made again below
                    return model, data["emb"], data["labels"], data["groups"]
        labels = list(metadata.labels)
        clips = manifest_clips(self.csv, label_map=LabelMap(tuple(labels)))
        kept, inputs, skipped_by = device_inputs(clips, metadata)
        skipped = sum(skipped_by.values())
        emb = [model.infer(x)[1] for x in inputs]
        ys = [labels.index(c.label) for c in kept]
        groups = [self.groups.get((c.path, c.speaker)) or _group_of(c.speaker) for c in kept]
        if not emb:
            raise ParameterError(f"no clip of the validation set {self.csv} could be read ({skipped} skipped)")
        emb_arr, ys_arr = np.stack(emb).astype(np.float32), np.asarray(ys, np.int64)
        groups_arr = np.asarray(groups, dtype=str)  # a fixed-width unicode array: no pickle
        with tempfile.NamedTemporaryFile(dir=self.cache_dir, suffix=".npz", delete=False) as f:
            np.savez(f, emb=emb_arr, labels=ys_arr, groups=groups_arr)
        os.replace(f.name, cache)
        log.info("validation embeddings of base %s: %d clips (%d skipped) in %d group(s)", sha[:12], len(ys),
                 skipped, len(set(groups)))
        return model, emb_arr, ys_arr, groups_arr

    def evaluate(self, tflite: bytes, metadata: ModelMetadata, head: dict) -> dict:
        """Accuracy, UAR, macro-F1 and examples on the whole set; with two groups or more also ``groups``: the
        same figures of each group, by name."""
        with self._lock:
            model, emb, ys, groups = self._embeddings(tflite, metadata)
            model.set_weights(head)
            pred = np.argmax(model.head_probs(emb), axis=1)
        labels = list(metadata.labels)
        keys = ("accuracy", "uar", "macro_f1", "num_examples")
        report = classification_report(ys, pred, labels)
        out = {k: report[k] for k in keys}
        names = sorted(set(groups.tolist()))
        if len(names) > 1:
            out["groups"] = {}
            for name in names:
                r = classification_report(ys[groups == name], pred[groups == name], labels)
                out["groups"][name] = {k: r[k] for k in keys}
        return out

    def _verdict(self, candidate: dict, current: dict | None) -> tuple[bool, dict]:
        cand_groups = candidate.pop("groups", None)
        cur_groups = current.pop("groups", None) if current is not None else None
        detail = {"candidate": candidate, "current": current, "margin": self.margin, "set": str(self.csv)}
        reasons = []
        if current is not None and candidate["uar"] < current["uar"] - self.margin:
            reasons.append(f"validation UAR would drop from {current['uar']:.3f} to {candidate['uar']:.3f}, "
                           f"more than the margin {self.margin:.3f}")
        if cand_groups:
            detail["min_group_clips"] = self.min_group_clips
            detail["group_z"] = self.group_z
            detail["groups"] = {}
            for name, cand in cand_groups.items():
                cur = (cur_groups or {}).get(name)
                examples = min(cand["num_examples"], cur["num_examples"] if cur else cand["num_examples"])
                entry = {"examples": cand["num_examples"],
                         "candidate": {"uar": cand["uar"], "accuracy": cand["accuracy"]},
                         "current": {"uar": cur["uar"], "accuracy": cur["accuracy"]} if cur else None,
                         "gates": examples >= self.min_group_clips, "dropped": False}
                if not entry["gates"]:
                    entry["note"] = (f"{examples} clips, fewer than VALIDATION_MIN_GROUP_CLIPS={self.min_group_clips}: "
                                     "reported, does not gate")
                elif cur is not None:
                    u = min(max(float(cur["uar"]), 0.0), 1.0)
                    noise = self.group_z * (u * (1.0 - u) / max(examples, 1)) ** 0.5
                    allowed = max(self.margin, noise) if self.group_z > 0 else self.margin
                    entry["allowed_drop"] = round(allowed, 4)
                    if cand["uar"] < cur["uar"] - allowed:
                        entry["dropped"] = True
                        reasons.append(f"group {name}: validation UAR would drop from {cur['uar']:.3f} to "
                                       f"{cand['uar']:.3f} ({cand['num_examples']} clips), more than the "
                                       f"{allowed:.3f} allowed (the margin {self.margin:.3f} or "
                                       f"{self.group_z:g} standard errors of the group's figure)")
                detail["groups"][name] = entry
        if reasons:
            detail["reason"] = "; ".join(reasons)
            return False, detail
        return True, detail

    def gate(self, manifest: Manifest, new_head: dict) -> tuple[bool, dict]:
        """Round close: the candidate head on the round's base against the base version's own head."""
        tflite = self.blobs.get(manifest.base.sha256)
        current = self.evaluate(tflite, manifest.metadata, head_arrays(self.blobs, manifest))
        candidate = self.evaluate(tflite, manifest.metadata, new_head)
        return self._verdict(candidate, current)

    def check_base(self, session, tflite: bytes, metadata: ModelMetadata) -> tuple[bool, dict]:
        """New base: its own head against the current version (on the current version's base)."""
        from aggregator.registry import initial_head

        candidate = self.evaluate(tflite, metadata, initial_head(tflite, metadata))
        row = current_version(session)
        current = None
        if row is not None:
            m = load_manifest(row, self.key)
            current = self.evaluate(self.blobs.get(m.base.sha256), m.metadata, head_arrays(self.blobs, m))
        return self._verdict(candidate, current)
