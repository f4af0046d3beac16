"""Corpus parsers on tiny trees laid out like the real corpora, label maps, speaker-only splits, skips."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from edge_sdk.errors import ParameterError
from models.datasets import (
    LabelMap,
    crema_d_clips,
    emodb_clips,
    iemocap_clips,
    load_corpus,
    manifest_clips,
    manifest_split,
    nemo_clips,
    ravdess_clips,
    speaker_folds,
    split_by_speaker,
    tess_clips,
)


def _tone(path, sr=16000, seconds=0.5, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    y = 0.3 * np.sin(2 * np.pi * 220 * t)
    soundfile.write(path, np.stack([y] * channels, axis=1) if channels > 1 else y, sr)


def test_ravdess_tree_with_calm_choice(tmp_path):
    for actor in (1, 2):
        for emo in ("01", "02", "03", "04", "05", "06"):
            _tone(tmp_path / f"Actor_{actor:02d}" / f"03-01-{emo}-01-01-01-{actor:02d}.wav")
        _tone(tmp_path / f"Actor_{actor:02d}" / f"03-02-05-01-01-01-{actor:02d}.wav")  # song: left out
    (tmp_path / "Actor_01" / "README.txt").write_text("not audio")
    clips = ravdess_clips(tmp_path)
    assert sorted(c.label for c in clips if c.speaker == "ravdess-01") == ["angry", "happy", "neutral", "sad"]
    calm = ravdess_clips(tmp_path, label_map=LabelMap(calm_as_neutral=True))
    assert sum(c.label == "neutral" for c in calm) == 4


def nemo_tree(root, speakers=("EB0", "IC0"), emotions=("anger", "happiness", "neutral", "sadness", "fear"),
              sentences=(1, 2), tone=None):
    """A tree laid out like ../shared/data/nemo: SPK/{speaker}_{emotion}_{sentence}.flac and data.tsv."""
    rows = ["file_id\temotion\traw_text\tnormalized_text\tspeaker_id\tgender\tage"]
    for spk in speakers:
        for emo in emotions:
            for n in sentences:
                (tone or _tone)(root / spk / f"{spk}_{emo}_{n}.flac")
                rows.append(f"{spk}_{emo}_{n}.wav\t{emo}\tZdanie {n}.\tzdanie {n}\t{spk}\tfemale\t25")
    (root / "data.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_nemo_tree_with_its_data_tsv(tmp_path, caplog):
    root = nemo_tree(tmp_path)
    _tone(tmp_path / "IC0" / "IC0_anger.flac")  # not {speaker}_{emotion}_{sentence}: skipped with a warning
    clips = nemo_clips(root)
    assert {c.speaker for c in clips} == {"nemo-EB0", "nemo-IC0"}
    assert sorted(c.label for c in clips if c.speaker == "nemo-EB0") == ["angry"] * 2 + ["happy"] * 2 + [
        "neutral"] * 2 + ["sad"] * 2  # fear is not one of the four classes
    assert load_corpus("nemo", root) == clips
    assert "IC0_anger.flac" in caplog.text
    # data.tsv disagreeing with a file name: the file is skipped, named
    tsv = (root / "data.tsv").read_text().replace("EB0_neutral_1.wav\tneutral", "EB0_neutral_1.wav\tsadness")
    (root / "data.tsv").write_text(tsv)
    assert len(nemo_clips(root)) == len(clips) - 1 and "EB0_neutral_1.flac" in caplog.text
    with pytest.raises(ParameterError, match="nEMO folder not found"):
        nemo_clips(tmp_path / "nope")


def test_default_nemo_root_from_the_environment(tmp_path, monkeypatch):
    from models.datasets import default_corpus_root, default_nemo_root

    monkeypatch.setenv("FEDSER_NEMO", str(tmp_path))
    assert default_nemo_root() == tmp_path and default_corpus_root("nemo") == tmp_path
    assert default_corpus_root("crema-d") is None


def test_a_corpus_variable_naming_no_folder_is_not_there_and_never_falls_back(tmp_path, monkeypatch, caplog):
    """Before, FEDSER_RAVDESS=/typo silently trained on ../shared/data/ravdess (where it exists, as here)."""
    from models.datasets import default_nemo_root, default_ravdess_root

    monkeypatch.setenv("FEDSER_RAVDESS", str(tmp_path / "typo"))
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("FEDSER_NEMO", str(tmp_path / "a-file"))
    assert default_ravdess_root() is None and default_nemo_root() is None
    assert "FEDSER_RAVDESS" in caplog.text and "FEDSER_NEMO" in caplog.text


def test_crema_d_tree(tmp_path):
    for name in ("1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_TIE_NEU_XX", "1002_DFA_SAD_LO", "1002_DFA_FEA_XX"):
        _tone(tmp_path / "AudioWAV" / f"{name}.wav")
    _tone(tmp_path / "AudioWAV" / "bogus.wav")
    clips = crema_d_clips(tmp_path)
    assert {(c.speaker, c.label) for c in clips} == {
        ("crema-1001", "angry"), ("crema-1001", "happy"), ("crema-1002", "neutral"), ("crema-1002", "sad")}


def test_iemocap_tree_from_emoevaluation_files(tmp_path):
    session = tmp_path / "Session1"
    evaluation = session / "dialog" / "EmoEvaluation"
    evaluation.mkdir(parents=True)
    (evaluation / "Ses01F_impro01.txt").write_text(
        "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n"
        "C-E2:\tNeutral;\t()\n"
        "[10.0100 - 11.3925]\tSes01F_impro01_M001\texc\t[3.5000, 3.5000, 3.0000]\n"
        "[14.8872 - 18.0175]\tSes01F_impro01_F002\tfru\t[2.0000, 3.5000, 3.5000]\n"
        "[19.0 - 20.0]\tSes01F_impro01_M003\txxx\t[2.0000, 3.5000, 3.5000]\n")
    (evaluation / "Ses01M_script01_1.txt").write_text(
        "[1.0 - 2.5]\tSes01M_script01_1_M010\tang\t[2.0, 4.0, 4.0]\n")
    for turn, dialog in (("Ses01F_impro01_F000", "Ses01F_impro01"), ("Ses01F_impro01_M001", "Ses01F_impro01"),
                         ("Ses01M_script01_1_M010", "Ses01M_script01_1")):
        _tone(session / "sentences" / "wav" / dialog / f"{turn}.wav")
    clips = iemocap_clips(tmp_path)
    got = {(c.speaker, c.label, c.path.rsplit("/", 1)[-1]) for c in clips}
    assert got == {("iemocap-Ses01F", "neutral", "Ses01F_impro01_F000.wav"),
                   ("iemocap-Ses01M", "happy", "Ses01F_impro01_M001.wav"),  # excitement joins happy
                   ("iemocap-Ses01M", "angry", "Ses01M_script01_1_M010.wav")}
    no_exc = iemocap_clips(tmp_path, label_map=LabelMap(excited_as_happy=False))
    assert "happy" not in {c.label for c in no_exc}


def test_emodb_and_tess_trees(tmp_path):
    for name in ("03a01Wa", "03a01Fa", "08b02Ta", "08b02Nb", "08a05Lc"):
        _tone(tmp_path / "emodb" / "wav" / f"{name}.wav")
    emodb = emodb_clips(tmp_path / "emodb")
    assert {(c.speaker, c.label) for c in emodb} == {
        ("emodb-03", "angry"), ("emodb-03", "happy"), ("emodb-08", "sad"), ("emodb-08", "neutral")}
    for folder, name in (("OAF_angry", "OAF_back_angry"), ("YAF_sad", "YAF_dog_sad"), ("OAF_Pleasant_surprise",
                                                                                       "OAF_bar_ps")):
        _tone(tmp_path / "tess" / folder / f"{name}.wav")
    tess = tess_clips(tmp_path / "tess")
    assert {(c.speaker, c.label) for c in tess} == {("tess-OAF", "angry"), ("tess-YAF", "sad")}


def test_manifest_csv_with_relative_paths_and_splits(tmp_path):
    for i in range(4):
        _tone(tmp_path / "audio" / f"c{i}.flac")
    csv = tmp_path / "m.csv"
    csv.write_text("path,speaker,label,split\naudio/c0.flac,s1,angry,train\naudio/c1.flac,s1,Happy,train\n"
                   "audio/c2.flac,s2,sad,val\naudio/c3.flac,s3,neutral,test\n/abs/x.wav,s3,fearful,test\n")
    clips = load_corpus("manifest", csv)
    assert [c.label for c in clips] == ["angry", "happy", "sad", "neutral"]
    assert clips[0].path == str(tmp_path / "audio" / "c0.flac")
    train, val, test = manifest_split(clips)
    assert (len(train), len(val), len(test)) == (2, 1, 1)
    leaky = tmp_path / "leak.csv"
    leaky.write_text("path,speaker,label,split\na.wav,s1,angry,train\nb.wav,s1,sad,test\n")
    with pytest.raises(ParameterError, match="both train and test"):
        manifest_split(manifest_clips(leaky))


@pytest.mark.parametrize("text, message", [
    ("file,who,emotion\nx.wav,a,angry\n", "header lacks"),
    ("path,speaker,label\nx.wav,,angry\n", ":2: empty"),
    ("path,speaker,label,split\nx.wav,a,angry,holdout\n", "split 'holdout'"),
])
def test_manifest_errors_name_the_problem(tmp_path, text, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(ParameterError, match=message):
        manifest_clips(csv)


@pytest.mark.parametrize("data, message", [
    (b"path,speaker,label\nz\xe9.wav,a,angry\n", "not UTF-8 text"),
    (b"path,speaker,label\n" + b"x" * 200_000 + b".wav,a,angry\n", "not a readable CSV"),
    (b"path,speaker,label\nx.wav,a\x01b,angry\n", ":2: a path, speaker or label with a control character"),
])
def test_a_manifest_that_is_not_utf8_or_has_a_huge_or_control_cell_is_an_error_naming_it(tmp_path, data, message):
    """Before: UnicodeDecodeError and _csv.Error tracebacks (found by an audit)."""
    csv = tmp_path / "bad.csv"
    csv.write_bytes(data)
    with pytest.raises(ParameterError, match=message):
        manifest_clips(csv)
    ok = tmp_path / "ok.csv"  # characters real file names hold (macOS puts U+202F in screenshot names) pass
    ok.write_text("path,speaker,label\nclip\u202fone\u00a0a.wav,a,angry\nb.wav,a,sad\n", encoding="utf-8")
    assert [c.path.rsplit("/", 1)[-1] for c in manifest_clips(ok)] == ["clip\u202fone\u00a0a.wav", "b.wav"]


def test_missing_corpus_folder_and_unknown_corpus_are_clear(tmp_path):
    with pytest.raises(ParameterError, match="CREMA-D folder not found"):
        crema_d_clips(tmp_path / "nope")
    with pytest.raises(ParameterError, match="unknown corpus 'savee'"):
        load_corpus("savee", tmp_path)


def test_speaker_folds_hold_out_whole_speakers(synthetic_clips):
    folds = speaker_folds(synthetic_clips, k=3, seed=1)
    held = [s for _, test in folds for s in {c.speaker for c in test}]
    assert sorted(held) == sorted({c.speaker for c in synthetic_clips})  # every speaker tested exactly once
    for train, test in folds:
        assert not {c.speaker for c in train} & {c.speaker for c in test}
        assert len(train) + len(test) == len(synthetic_clips)
    with pytest.raises(ParameterError, match="k must be"):
        speaker_folds(synthetic_clips, k=99)
    with pytest.raises(ParameterError, match="not in the corpus"):
        split_by_speaker(synthetic_clips, ["nobody"])


def test_any_rate_and_channels_and_skips_are_counted(tmp_path):
    from edge_sdk.features import FeatureConfig
    from models.datasets import Clip
    from models.features import compute_features, load_clip_audio

    _tone(tmp_path / "stereo44.flac", sr=44100, seconds=1.0, channels=2)
    _tone(tmp_path / "mono8.wav", sr=8000, seconds=1.0)
    y = load_clip_audio(str(tmp_path / "stereo44.flac"), 16000)
    assert y.ndim == 1 and abs(len(y) - 16000) <= 1
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 10)
    _tone(tmp_path / "short.wav", seconds=0.01)
    clips = [Clip(str(tmp_path / n), "s", "angry") for n in
             ("stereo44.flac", "mono8.wav", "missing.wav", "empty.wav", "corrupt.wav", "short.wav")]
    fs = compute_features(clips, FeatureConfig(), cache_dir=tmp_path / "cache")
    assert [c.path.rsplit("/", 1)[-1] for c in fs.clips] == ["stereo44.flac", "mono8.wav"]
    assert fs.skipped == {"missing": 1, "empty": 1, "corrupt": 1, "too_short": 1}
    again = compute_features(clips, FeatureConfig(), cache_dir=tmp_path / "cache")  # from the .npz cache
    assert again.skipped == fs.skipped
    np.testing.assert_array_equal(again.raw[0], fs.raw[0])
    # a cache file cut short (a full disk) or not a zip at all is recomputed and rewritten, not an error
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(entries) == 4  # the two kept clips, the corrupt and the short one (missing and empty: no entry)
    for entry in entries[:2]:
        entry.write_bytes(entry.read_bytes()[:50])
    entries[2].write_bytes(b"not a zip")
    third = compute_features(clips, FeatureConfig(), cache_dir=tmp_path / "cache")
    assert third.skipped == fs.skipped
    np.testing.assert_array_equal(third.raw[0], fs.raw[0])
    np.testing.assert_array_equal(third.raw[1], fs.raw[1])
    for entry in entries:  # rewritten whole
        with np.load(entry, allow_pickle=False) as data:
            assert int(data["count"]) in (0, 1)
    # the cache folder removed under a run (a trim) or unwritable: the clip is computed, the run goes on
    import shutil

    shutil.rmtree(tmp_path / "cache")
    fourth = compute_features(clips, FeatureConfig(), cache_dir=tmp_path / "cache")
    assert fourth.skipped == fs.skipped and len(list((tmp_path / "cache").rglob("*.npz"))) == 4
    folder = entries[0].parent
    shutil.rmtree(folder)
    folder.write_bytes(b"")  # a file where the folder should be: nothing can be written (as root too)
    fifth = compute_features(clips, FeatureConfig(), cache_dir=tmp_path / "cache")
    assert fifth.skipped == fs.skipped
    np.testing.assert_array_equal(fifth.raw[0], fs.raw[0])


def test_the_job_cache_trim_deletes_the_least_recently_used_entries(tmp_path):
    """A read marks a cache entry used: a trim to the size of one entry keeps the clip read last, although it was
    written first (before, the trim went by write time and deleted the entry that every job still read)."""
    import os

    from aggregator.jobs import trim_feature_cache
    from edge_sdk.features import FeatureConfig
    from models.datasets import Clip
    from models.features import compute_features

    cache = tmp_path / "cache"
    entries = []
    for name in ("first.wav", "second.wav"):
        _tone(tmp_path / name, seconds=1.0)
        compute_features([Clip(str(tmp_path / name), "s", "angry")], FeatureConfig(), cache_dir=cache)
        entries.append(next(e for e in cache.rglob("*.npz") if e not in entries))
    for age, entry in zip((2000, 1000), entries, strict=True):  # first written first
        os.utime(entry, (entry.stat().st_atime, entry.stat().st_mtime - age))
    again = compute_features([Clip(str(tmp_path / "first.wav"), "s", "angry")], FeatureConfig(), cache_dir=cache)
    assert len(again.raw) == 1
    deleted, _ = trim_feature_cache(cache, max(e.stat().st_size for e in entries))
    assert deleted == 1 and entries[0].exists() and not entries[1].exists()
