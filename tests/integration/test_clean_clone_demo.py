"""The demo as a stranger runs it: the committed tree in a fresh folder, no corpus anywhere, nothing set.

CI's own checkout has ``../shared`` (RAVDESS) beside it, so every other test finds a corpus; a newcomer's
machine does not. Here the committed state (``git archive HEAD``) is unpacked into ``<tmp>/fedser`` with no
``<tmp>/shared``, every ``FEDSER_*`` variable is removed, and the demo runs from that folder with its default
``--out`` (a relative path, the case that broke: the validation manifest was written with paths relative to
the current directory and read relative to its own folder). The existing interpreter is reused (no venv is
built), with ``PYTHONPATH`` set to the copy; the test first checks that the copy's code is what gets imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_cli_and_demo import check_demo_round

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stranger_copy(tmp_path_factory) -> tuple[Path, dict]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout (the test unpacks the committed tree with git archive)")
    top = tmp_path_factory.mktemp("stranger")
    copy = top / "fedser"
    copy.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    assert not (top / "shared").exists() and (copy / "scripts" / "demo.sh").is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSER")}
    env.update(PYTHONPATH=str(copy), TF_CPP_MIN_LOG_LEVEL="2", PYTHONDONTWRITEBYTECODE="1")
    # The copy's code runs, not the checkout's editable install, and it finds no corpus.
    where = subprocess.run(
        [sys.executable, "-c", "import aggregator, edge_sdk, models.datasets as d, tools.demo as t; "
         "print(d.__file__); print(t.__file__); print(aggregator.__file__); print(edge_sdk.__file__); "
         "print(d.default_ravdess_root())"],
        cwd=copy, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).resolve().is_relative_to(copy.resolve()) for p in where[:4]), where
    assert where[4] == "None", f"the copy found a corpus at {where[4]}"
    return copy, env


def test_the_demo_exits_0_on_a_clean_copy_with_no_corpus(stranger_copy):
    copy, env = stranger_copy
    # scripts/demo.sh minus the set-up (it would build a venv): the same module, its default --out.
    out = subprocess.run([sys.executable, "-m", "tools.demo", "--devices", "2", "--epochs", "3"], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "[3/6]" in out.stdout and "[6/6]" in out.stdout and "SYNTHETIC" in out.stdout
    # It says plainly which corpora are missing and what its figures mean.
    assert "[corpora] nEMO: not found" in out.stdout and "RAVDESS: not found" in out.stdout
    assert "say nothing about recognising emotions" in out.stdout
    # The newcomer is told where a real corpus comes from and how to point the demo at it.
    assert "https://zenodo.org/records/1188976" in text and "FEDSER_RAVDESS" in text
    assert "short federated suite is off by default" in out.stdout and "it needs RAVDESS" in out.stdout
    manifest = (copy / "demo-output" / "validation.csv").read_text().splitlines()
    assert manifest[0] == "path,speaker,label" and len(manifest) > 1
    assert all(line.startswith("synthetic-audio/") for line in manifest[1:]), manifest[:3]
    # the federated round ran end to end (test_cli_and_demo runs --synthetic only where a corpus is found)
    assert "round 1 closed" in out.stdout
    check_demo_round(out.stdout, copy / "demo-output" / "summary.json")


def test_fedser_train_says_where_each_corpus_comes_from(stranger_copy):
    copy, env = stranger_copy
    # No corpus found: the run falls back to the synthetic corpus and says where each real one comes from.
    fallback = subprocess.run(
        [sys.executable, "-c", "from pathlib import Path; from models.cli import resolve_corpus; "
         "from models.datasets import CORPORA, CORPUS_SOURCES; "
         "clips, name = resolve_corpus(None, False, Path('work')); print(name); "
         "print(' '.join(sorted(CORPORA))); print(sorted(set(CORPORA) - set(CORPUS_SOURCES)))"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    assert fallback.returncode == 0, fallback.stderr[-2000:]
    name, corpora, without_guidance = fallback.stdout.splitlines()[-3:]
    assert name.startswith("SYNTHETIC") and without_guidance == "[]", fallback.stdout
    sources = {"ravdess": ["https://zenodo.org/records/1188976", "Actor_01", "FEDSER_RAVDESS=DIR"],
               "crema-d": ["https://github.com/CheyneyComputerScience/CREMA-D", "AudioWAV/",
                           "--corpus crema-d --data DIR"],
               "iemocap": ["USC SAIL", "https://sail.usc.edu/iemocap/", "--corpus iemocap --data DIR"],
               "emodb": ["emodb.bilderbar.info", "--corpus emodb --data DIR"],
               "tess": ["tspace.library.utoronto.ca", "--corpus tess --data DIR"],
               "nemo": ["https://huggingface.co/datasets/amu-cai/nEMO", "--corpus nemo --data DIR"],
               "manifest": ["--corpus manifest --data FILE.csv", "relative to the CSV's own folder"]}
    assert set(corpora.split()) <= set(sources), f"a corpus this test does not know: {corpora}"
    for corpus in corpora.split():
        for needle in sources[corpus]:
            assert needle in fallback.stderr, (corpus, needle)
    # A corpus named without --data: refused, with that corpus's source and layout.
    refused = subprocess.run([sys.executable, "-m", "models.cli", "train", "--corpus", "emodb", "--out", "runs/x"],
                             cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "emodb" in refused.stderr.splitlines()[0]  # says which corpus lacks its folder
    assert "emodb.bilderbar.info" in refused.stderr and "wav/03a01Fa.wav" in refused.stderr
    assert "zenodo" not in refused.stderr
