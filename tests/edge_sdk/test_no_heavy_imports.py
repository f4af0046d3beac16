"""edge_sdk must run on a Pi without TensorFlow, librosa or numba: prove it in a clean interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO

HEAVY = ("tensorflow", "librosa", "numba", "keras", "flask")


def test_classify_and_train_leave_heavy_modules_unimported(trained_model, synthetic_clips, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys, shutil
        import edge_sdk, edge_sdk.cli, edge_sdk.device, edge_sdk.model, edge_sdk.features, edge_sdk.audio
        import edge_sdk.wire, edge_sdk.manifest, edge_sdk.signing, edge_sdk.store, edge_sdk.client
        from edge_sdk.audio import load_audio
        from edge_sdk.features import extract
        from edge_sdk.model import ModelMetadata, TFLiteModel
        import numpy as np
        meta = ModelMetadata.load({str(trained_model.metadata_path)!r})
        model = TFLiteModel({str(trained_model.tflite_path)!r}, meta)
        y = load_audio({synthetic_clips[0].path!r}, sample_rate=meta.features.sample_rate)
        probs, emb = model.infer(extract(y, meta.features, meta.normalization))
        loss = model.train_step(emb[None], np.eye(meta.num_classes, dtype=np.float32)[:1], [1.0],
                                learning_rate=0.01)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print(json.dumps({{"heavy": heavy, "probs_sum": float(probs.sum()), "loss": loss}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert abs(result["probs_sum"] - 1.0) < 1e-4 and result["loss"] > 0


def test_edge_sdk_source_has_no_heavy_imports():
    offenders = []
    for path in (REPO / "edge_sdk").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and stripped.split()[1].split(".")[0] in HEAVY:
                offenders.append(f"{path.name}: {stripped}")
    assert offenders == []
