"""Corpora as lists of clips, and speaker-independent splits.

Only splits that hold out whole speakers are offered: a speaker in the test set
never appears in training.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import unicodedata
import wave
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.errors import ParameterError

log = logging.getLogger("models")

__all__ = [
    "Clip",
    "FOUR_CLASSES",
    "RAVDESS_EMOTIONS",
    "LabelMap",
    "CORPORA",
    "load_corpus",
    "ravdess_clips",
    "crema_d_clips",
    "iemocap_clips",
    "emodb_clips",
    "tess_clips",
    "nemo_clips",
    "manifest_clips",
    "write_manifest",
    "manifest_path",
    "CORPUS_SOURCES",
    "corpus_guidance",
    "synthetic_corpus",
    "split_by_speaker",
    "per_class_sample",
    "speaker_folds",
    "manifest_split",
    "default_ravdess_root",
    "default_nemo_root",
    "default_corpus_root",
    "corpus_of",
]

FOUR_CLASSES = ("angry", "happy", "neutral", "sad")

RAVDESS_EMOTIONS = {
    "01": "neutral", "02": "calm", "03": "happy", "04": "sad",
    "05": "angry", "06": "fearful", "07": "disgust", "08": "surprised",
}
CREMA_D_EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral",
                    "SAD": "sad"}
IEMOCAP_EMOTIONS = {"ang": "angry", "hap": "happy", "exc": "excited", "neu": "neutral", "sad": "sad",
                    "fru": "frustrated", "fea": "fearful", "sur": "surprised", "dis": "disgust", "oth": "other",
                    "xxx": "no_agreement"}
EMODB_EMOTIONS = {"W": "angry", "L": "boredom", "E": "disgust", "A": "fearful", "F": "happy", "T": "sad",
                  "N": "neutral"}
TESS_EMOTIONS = {"angry": "angry", "disgust": "disgust", "fear": "fearful", "happy": "happy",
                 "neutral": "neutral", "ps": "surprised", "pleasant_surprise": "surprised",
                 "pleasant_surprised": "surprised", "sad": "sad"}
NEMO_EMOTIONS = {"anger": "angry", "happiness": "happy", "neutral": "neutral", "sadness": "sad",
                 "fear": "fearful", "surprised": "surprised", "surprise": "surprised"}
AUDIO_SUFFIXES = (".wav", ".flac")


@dataclass(frozen=True)
class Clip:
    path: str
    speaker: str
    label: str
    split: str = ""  # only from a manifest's optional split column


@dataclass(frozen=True)
class LabelMap:
    """Corpus emotion names -> the classes a model learns.

    Every loader first names a clip's emotion in plain English (angry, happy,
    neutral, sad, calm, excited, fearful, disgust, surprised, boredom,
    frustrated, other); this map then keeps, renames or drops it.

    Attributes
    ----------
    classes : tuple of str
        The model's classes (default: the four of the literature).
    calm_as_neutral : bool
        RAVDESS "calm" joins "neutral". Off by default: the four-class
        RAVDESS subset of the studies uses neutral alone.
    excited_as_happy : bool
        IEMOCAP "excited" joins "happy". On by default, as in most IEMOCAP
        four-class work (study 1 kept excitement as its own class instead).
    extra : tuple of (str, str)
        More renames, ``(corpus name, class)``.
    """

    classes: tuple[str, ...] = FOUR_CLASSES
    calm_as_neutral: bool = False
    excited_as_happy: bool = True
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "extra", tuple(tuple(p) for p in self.extra))
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ParameterError(f"classes must be at least two distinct names, got {self.classes}")
        for raw, target in self.extra:
            if target not in self.classes:
                raise ParameterError(f"label map sends {raw!r} to {target!r}, which is not a class {self.classes}")

    def __call__(self, emotion: str) -> str | None:
        """The class of a corpus emotion name, or None when the clip is left out."""
        emotion = emotion.strip().lower()
        renames = dict(self.extra)
        if self.calm_as_neutral:
            renames.setdefault("calm", "neutral")
        if self.excited_as_happy:
            renames.setdefault("excited", "happy")
        emotion = renames.get(emotion, emotion)
        return emotion if emotion in self.classes else None

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "calm_as_neutral": self.calm_as_neutral,
                "excited_as_happy": self.excited_as_happy, "extra": [list(p) for p in self.extra]}


def _default_root(variable: str, folder: str) -> Path | None:
    """``$variable`` when it is set, else ``../shared/data/<folder>`` beside the checkout; None when that is not a
    folder. A variable set to a folder that does not exist counts as "not there" (with a warning naming it), as
    in the demo: never a silent fall back to ``../shared/data``, which would train on another corpus than the one
    the user named."""
    env = os.environ.get(variable)
    if env:
        if Path(env).is_dir():
            return Path(env)
        log.warning("$%s=%s is not a folder: that corpus counts as not there", variable, env)
        return None
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / folder
    return shared if shared.is_dir() else None


def default_ravdess_root() -> Path | None:
    """``$FEDSER_RAVDESS``, else ``../shared/data/ravdess`` beside the checkout, if it exists."""
    return _default_root("FEDSER_RAVDESS", "ravdess")


def default_nemo_root() -> Path | None:
    """``$FEDSER_NEMO``, else ``../shared/data/nemo`` beside the checkout, if it exists."""
    return _default_root("FEDSER_NEMO", "nemo")


def default_corpus_root(kind: str) -> Path | None:
    """The folder a corpus is found in without ``--data`` (RAVDESS and nEMO only), or None."""
    return {"ravdess": default_ravdess_root, "nemo": default_nemo_root}.get(kind, lambda: None)()


def corpus_of(speaker: str) -> str:
    """The corpus part of a speaker id (``ravdess-21`` -> ``ravdess``, ``nemo-IC0`` -> ``nemo``)."""
    return speaker.split("-", 1)[0] if "-" in speaker else ""


# Where each supported corpus comes from, how to lay it out, and how to point fedser at it. Printed when no corpus
# is found (corpus_guidance); a test checks that every loader in CORPORA has an entry.
CORPUS_SOURCES = {
    "ravdess": (
        "RAVDESS (English, 24 actors; CC BY-NC-SA 4.0): https://zenodo.org/records/1188976 , file "
        "Audio_Speech_Actors_01-24.zip. Unzip it so that DIR holds Actor_01 ... Actor_24 "
        "(DIR/Actor_01/03-01-05-01-01-01-01.wav). Point at it with --data DIR, or FEDSER_RAVDESS=DIR, "
        "or put it at ../shared/data/ravdess beside the checkout (found without any flag)."),
    "crema-d": (
        "CREMA-D (English, 91 actors; ODbL): https://github.com/CheyneyComputerScience/CREMA-D "
        "(git lfs clone, or the AudioWAV folder alone). DIR holds AudioWAV/1001_DFA_ANG_XX.wav. "
        "Point at it with --corpus crema-d --data DIR."),
    "iemocap": (
        "IEMOCAP (English, 10 actors, dyadic sessions): by request from USC SAIL, "
        "https://sail.usc.edu/iemocap/iemocap_release.htm (a licence form; the link comes by e-mail). "
        "DIR is IEMOCAP_full_release, holding Session1 ... Session5, each with dialog/EmoEvaluation/*.txt and "
        "sentences/wav/<dialog>/<utterance>.wav. Point at it with --corpus iemocap --data DIR."),
    "emodb": (
        "EmoDB (German, 10 actors): http://emodb.bilderbar.info/download/ (download.zip). DIR holds "
        "wav/03a01Fa.wav. Point at it with --corpus emodb --data DIR."),
    "tess": (
        "TESS (English, 2 speakers; CC BY-NC-ND 4.0): https://tspace.library.utoronto.ca/handle/1807/24487 . "
        "DIR holds one folder per speaker and emotion, OAF_angry/OAF_back_angry.wav, YAF_sad/YAF_bath_sad.wav. "
        "Point at it with --corpus tess --data DIR."),
    "nemo": (
        "nEMO (Polish, 9 actors; CC BY-NC-SA 4.0): https://huggingface.co/datasets/amu-cai/nEMO "
        "(git clone with git lfs, or huggingface-cli download amu-cai/nEMO --repo-type dataset --local-dir DIR). "
        "DIR holds data.tsv and the clips {speaker}_{emotion}_{sentence}.wav or .flac anywhere below it "
        "(e.g. DIR/samples/IC0_anger_1.wav, or one folder per speaker). Point at it with --corpus nemo --data DIR, "
        "or FEDSER_NEMO=DIR, or put it at ../shared/data/nemo beside the checkout."),
    "manifest": (
        "any other corpus: a CSV with the header path,speaker,label[,split] (split: train, val or test); a "
        "relative path is relative to the CSV's own folder. Point at it with --corpus manifest --data FILE.csv."),
}


def corpus_guidance(corpora: Iterable[str] | None = None) -> str:
    """What to download and how to point fedser at it, one paragraph per supported corpus (those in CORPORA)."""
    names = [n for n in (corpora or CORPORA) if n in CORPUS_SOURCES]
    lines = ["No speech-emotion corpus was found. fedser reads these (each from its own published layout):"]
    lines += [f"  - {name}: {CORPUS_SOURCES[name]}" for name in names]
    lines.append("  Labels outside angry, happy, neutral and sad are left out unless --classes names them.")
    return "\n".join(lines)


def _root(root: str | os.PathLike, corpus: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ParameterError(f"{corpus} folder not found: {root}")
    return root


def _audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def _finish(clips: list[Clip], corpus: str, root: Path, label_map: LabelMap, dropped: Counter) -> list[Clip]:
    if dropped:
        log.info("%s: left out %s (not in classes %s)", corpus, dict(dropped), list(label_map.classes))
    if not clips:
        raise ParameterError(f"no {corpus} clips with classes {list(label_map.classes)} under {root}")
    return clips


def ravdess_clips(
    root: str | os.PathLike,
    *,
    labels: Sequence[str] = FOUR_CLASSES,
    calm_as_neutral: bool = False,
    label_map: LabelMap | None = None,
) -> list[Clip]:
    """RAVDESS speech clips: ``Actor_NN/MM-VV-EE-II-SS-RR-AA.{wav,flac}``.

    Fields: modality (01 full AV, 02 video, 03 audio), vocal channel (01
    speech, 02 song), emotion (01..08), intensity, statement, repetition,
    actor (odd male, even female). Song and video-only files are left out.
    """
    root = _root(root, "RAVDESS")
    label_map = label_map or LabelMap(tuple(labels), calm_as_neutral=calm_as_neutral)
    clips, dropped = [], Counter()
    for path in sorted(root.glob("Actor_*/*")):
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            continue
        fields = path.stem.split("-")
        if len(fields) != 7:
            log.warning("skipping %s: not a RAVDESS file name (7 fields)", path)
            continue
        modality, channel, emotion, _, _, _, actor = fields
        if modality not in ("01", "03") or channel != "01":
            continue  # speech audio only
        raw = RAVDESS_EMOTIONS.get(emotion, "unknown")
        label = label_map(raw)
        if label is None:
            dropped[raw] += 1
            continue
        clips.append(Clip(str(path), f"ravdess-{actor}", label))
    return _finish(clips, "RAVDESS", root, label_map, dropped)


def _collect(root: Path, corpus: str, label_map: LabelMap, parse) -> list[Clip]:
    """Clips of every audio file under ``root`` that ``parse(path)`` names as ``(speaker, emotion)``."""
    clips, dropped = [], Counter()
    for path in _audio_files(root):
        parsed = parse(path)
        if parsed is None:
            log.warning("skipping %s: not a %s file name", path, corpus)
            continue
        speaker, raw = parsed
        label = label_map(raw)
        if label is None:
            dropped[raw] += 1
            continue
        clips.append(Clip(str(path), speaker, label))
    return _finish(clips, corpus, root, label_map, dropped)


def crema_d_clips(root: str | os.PathLike, *, label_map: LabelMap = LabelMap()) -> list[Clip]:
    """CREMA-D: ``AudioWAV/AAAA_SSS_EEE_LL.wav`` (actor 1001-1091, sentence, emotion, level)."""

    def parse(path: Path):
        fields = path.stem.split("_")
        if len(fields) != 4 or not fields[0].isdigit() or fields[2] not in CREMA_D_EMOTIONS:
            return None
        return f"crema-{fields[0]}", CREMA_D_EMOTIONS[fields[2]]

    return _collect(_root(root, "CREMA-D"), "CREMA-D", label_map, parse)


_IEMOCAP_LINE = re.compile(r"^\[(\d+(?:\.\d+)?) - (\d+(?:\.\d+)?)\]\t(\S+)\t(\S+)\t\[")


def iemocap_clips(root: str | os.PathLike, *, label_map: LabelMap = LabelMap()) -> list[Clip]:
    """IEMOCAP: ``SessionN/dialog/EmoEvaluation/*.txt`` label lines, ``SessionN/sentences/wav/DIALOG/TURN.wav``.

    A label line reads ``[start - end]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[v, a, d]``.
    The speaker is the session and the gender of the turn (``Ses01F``, ``Ses01M``:
    ten speakers). Turns without agreement (``xxx``) are left out.
    """
    root = _root(root, "IEMOCAP")
    clips, dropped, seen = [], Counter(), set()
    for session in sorted(root.glob("Session*")):
        for label_file in sorted((session / "dialog" / "EmoEvaluation").glob("*.txt")):
            for line in label_file.read_text(errors="replace").splitlines():
                m = _IEMOCAP_LINE.match(line)
                if not m:
                    continue
                turn, code = m.group(3), m.group(4)
                parts = turn.split("_")
                if len(parts) < 3 or not parts[0].startswith("Ses") or parts[-1][:1] not in ("F", "M"):
                    log.warning("skipping %s in %s: not an IEMOCAP turn name", turn, label_file)
                    continue
                if turn in seen:
                    continue
                seen.add(turn)
                raw = IEMOCAP_EMOTIONS.get(code, code)
                label = label_map(raw)
                if label is None:
                    dropped[raw] += 1
                    continue
                dialog = "_".join(parts[:-1])
                wav = session / "sentences" / "wav" / dialog / f"{turn}.wav"
                clips.append(Clip(str(wav), f"iemocap-{parts[0][:5]}{parts[-1][0]}", label))
    return _finish(clips, "IEMOCAP", root, label_map, dropped)


def emodb_clips(root: str | os.PathLike, *, label_map: LabelMap = LabelMap()) -> list[Clip]:
    """EmoDB (Berlin): ``wav/SSTTTEV.wav``: speaker (2 digits), text code, emotion letter, version.

    Emotion letters are German: W Wut/anger, L Langeweile/boredom, E Ekel/disgust,
    A Angst/fear, F Freude/happiness, T Trauer/sadness, N neutral.
    """

    def parse(path: Path):
        stem = path.stem
        if len(stem) != 7 or not stem[:2].isdigit() or stem[5] not in EMODB_EMOTIONS:
            return None
        return f"emodb-{stem[:2]}", EMODB_EMOTIONS[stem[5]]

    return _collect(_root(root, "EmoDB"), "EmoDB", label_map, parse)


def tess_clips(root: str | os.PathLike, *, label_map: LabelMap = LabelMap()) -> list[Clip]:
    """TESS (Toronto): ``OAF_angry/OAF_back_angry.wav``: speaker (OAF, YAF), word, emotion.

    Two speakers only: a speaker-independent split trains on one and tests on the other.
    """

    def parse(path: Path):
        parts = path.stem.split("_")
        emotion = "_".join(parts[2:]).lower() if len(parts) >= 3 else ""
        if len(parts) < 3 or parts[0].upper() not in ("OAF", "YAF") or emotion not in TESS_EMOTIONS:
            return None
        return f"tess-{parts[0].upper()}", TESS_EMOTIONS[emotion]

    return _collect(_root(root, "TESS"), "TESS", label_map, parse)


def nemo_clips(root: str | os.PathLike, *, label_map: LabelMap = LabelMap()) -> list[Clip]:
    """nEMO (Polish): ``SPK/{speaker}_{emotion}_{sentence}.flac`` and ``data.tsv`` beside the speaker folders.

    Speakers EB0, IC0, KD0, MK0 (female), KS0, MP0, SM0, TP0, WR0 (male); emotions anger, happiness,
    neutral, sadness (and, in the full corpus, fear and surprised). When ``data.tsv`` is there
    (``file_id`` with the original ``.wav`` name, ``emotion``, ``speaker_id``, ...), a file it lists with
    another emotion or speaker than its name says is skipped with a warning; files it does not list are kept
    by their name.
    """
    root = _root(root, "nEMO")
    listed: dict[str, tuple[str, str]] = {}
    tsv = root / "data.tsv"
    if tsv.is_file():
        with open(tsv, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                fid = (row.get("file_id") or "").strip()
                if fid:
                    listed[Path(fid).stem] = ((row.get("speaker_id") or "").strip(),
                                              (row.get("emotion") or "").strip().lower())

    def parse(path: Path):
        parts = path.stem.split("_")
        if len(parts) != 3 or parts[1].lower() not in NEMO_EMOTIONS or not parts[0]:
            return None
        speaker, emotion = parts[0], parts[1].lower()
        if path.stem in listed and listed[path.stem] != (speaker, emotion):
            log.warning("skipping %s: data.tsv says speaker %s, emotion %s", path, *listed[path.stem])
            return None
        return f"nemo-{speaker}", NEMO_EMOTIONS[emotion]

    return _collect(root, "nEMO", label_map, parse)


MANIFEST_SPLITS = ("train", "val", "test")


def manifest_clips(csv_path: str | os.PathLike, *, label_map: LabelMap = LabelMap()) -> list[Clip]:
    """A CSV with a header ``path,speaker,label`` and optionally ``split`` (train, val or test).

    The one rule for paths in every manifest fedser reads or writes: an absolute
    path is used as it is; a relative one is relative to **the manifest's own
    folder** (never to the current directory), so a manifest and its clips can be
    moved together (:func:`write_manifest` writes them that way). Labels go through the
    label map like any corpus's emotion names; a row whose label is not a
    class is left out and counted. A malformed row raises, naming its line.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ParameterError(f"manifest CSV not found: {csv_path}")
    try:
        return _read_manifest(csv_path, label_map)
    except UnicodeDecodeError as exc:
        raise ParameterError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                             "UTF-8") from None
    except csv.Error as exc:  # a cell over the csv module's field limit (128 KiB), a NUL, ...
        raise ParameterError(f"{csv_path}: not a readable CSV: {exc}") from None


def _read_manifest(csv_path: Path, label_map: LabelMap) -> list[Clip]:
    clips, dropped = [], Counter()
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        missing = {"path", "speaker", "label"} - set(header)
        if missing:
            raise ParameterError(f"{csv_path}: header lacks {sorted(missing)} (need path,speaker,label[,split])")
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            path, speaker = (row.get("path") or "").strip(), (row.get("speaker") or "").strip()
            raw, split = (row.get("label") or "").strip(), (row.get("split") or "").strip().lower()
            if not path or not speaker or not raw:
                raise ParameterError(f"{csv_path}:{line}: empty path, speaker or label")
            if (any(unicodedata.category(ch) == "Cc" for v in (path, speaker, raw) for ch in v)
                    or max(map(len, (path, speaker, raw))) > 4096):  # a no-break space in a file name is fine
                raise ParameterError(f"{csv_path}:{line}: a path, speaker or label with a control character, or "
                                     "longer than 4096 characters")
            if split and split not in MANIFEST_SPLITS:
                raise ParameterError(f"{csv_path}:{line}: split {split!r} is not one of {MANIFEST_SPLITS}")
            label = label_map(raw)
            if label is None:
                dropped[raw.lower()] += 1
                continue
            clips.append(Clip(str(manifest_path(csv_path, path)), speaker, label, split))
    return _finish(clips, "manifest", csv_path, label_map, dropped)


def manifest_path(csv_path: str | os.PathLike, path: str) -> Path:
    """The file a manifest's ``path`` cell names: absolute as it is, relative against the manifest's folder."""
    p = Path(path)
    return p if p.is_absolute() else Path(csv_path).parent / p


def write_manifest(csv_path: str | os.PathLike, clips: Iterable[Clip]) -> Path:
    """Write ``clips`` as a manifest CSV (``path,speaker,label`` and ``split`` when any clip has one).

    Each path is written relative to the manifest's own folder (the rule :func:`manifest_clips` reads by),
    whatever the current directory is; a clip's relative path is taken against the current directory, as
    everywhere else. Cells are quoted as CSV needs (a comma in a file name survives).
    """
    csv_path = Path(csv_path)
    clips = list(clips)
    folder = os.path.abspath(csv_path.parent)
    with_split = any(c.split for c in clips)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "speaker", "label"] + (["split"] if with_split else []))
        for c in clips:
            full = os.path.abspath(c.path)
            try:
                rel = Path(os.path.relpath(full, folder)).as_posix()
            except ValueError:  # another drive (Windows): only an absolute path can name it
                rel = full
            writer.writerow([rel, c.speaker, c.label] + ([c.split] if with_split else []))
    return csv_path


CORPORA = {
    "ravdess": lambda root, label_map: ravdess_clips(root, label_map=label_map),
    "crema-d": crema_d_clips,
    "iemocap": iemocap_clips,
    "emodb": emodb_clips,
    "tess": tess_clips,
    "nemo": nemo_clips,
    "manifest": manifest_clips,
}


def load_corpus(kind: str, root: str | os.PathLike, label_map: LabelMap = LabelMap()) -> list[Clip]:
    """Clips of corpus ``kind`` (one of :data:`CORPORA`) at ``root`` (a folder, or the manifest CSV)."""
    if kind not in CORPORA:
        raise ParameterError(f"unknown corpus {kind!r}; choose one of {sorted(CORPORA)}")
    loader = CORPORA[kind]
    return loader(root, label_map=label_map) if kind != "ravdess" else loader(root, label_map)


def split_by_speaker(clips: Iterable[Clip], test_speakers: Iterable[str]) -> tuple[list[Clip], list[Clip]]:
    """(train, test): every clip of a test speaker goes to test, every other clip to train."""
    test_speakers = set(test_speakers)
    clips = list(clips)
    known = {c.speaker for c in clips}
    unknown = test_speakers - known
    if unknown:
        raise ParameterError(f"test speakers not in the corpus: {sorted(unknown)}")
    train = [c for c in clips if c.speaker not in test_speakers]
    test = [c for c in clips if c.speaker in test_speakers]
    return train, test


def speaker_folds(clips: Iterable[Clip], k: int = 5, *, seed: int = 0) -> list[tuple[list[Clip], list[Clip]]]:
    """k (train, test) folds that hold out whole speakers; each speaker is in exactly one test fold.

    Speakers are shuffled with ``seed`` and dealt round-robin, so folds differ
    in size by at most one speaker.
    """
    clips = list(clips)
    speakers = sorted({c.speaker for c in clips})
    if not 2 <= k <= len(speakers):
        raise ParameterError(f"k must be between 2 and the number of speakers ({len(speakers)}), got {k}")
    order = [speakers[i] for i in np.random.default_rng(seed).permutation(len(speakers))]
    groups = [sorted(order[i::k]) for i in range(k)]
    return [split_by_speaker(clips, g) for g in groups]


def manifest_split(clips: Iterable[Clip]) -> tuple[list[Clip], list[Clip], list[Clip]]:
    """(train, val, test) from a manifest's split column; refuses a speaker in two parts."""
    clips = list(clips)
    if any(not c.split for c in clips):
        raise ParameterError("the manifest has rows without a split; give --test-speakers or --folds instead")
    parts = {name: [c for c in clips if c.split == name] for name in MANIFEST_SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = {c.speaker for c in parts[a]} & {c.speaker for c in parts[b]}
        if shared:
            raise ParameterError(f"speakers {sorted(shared)[:5]} are in both {a} and {b}: splits must hold out "
                                 "whole speakers")
    return parts["train"], parts["val"], parts["test"]


def synthetic_corpus(
    out_dir: str | os.PathLike,
    *,
    speakers: int = 6,
    clips_per_label: int = 6,
    labels: Sequence[str] = FOUR_CLASSES,
    sample_rate: int = 16000,
    seed: int = 0,
) -> list[Clip]:
    """SYNTHETIC stand-in for emotional speech, for machines without a real corpus.

    Writes 16-bit WAV files of voiced, pitch-contoured tones whose pitch,
    loudness, tempo and brightness depend on the label (angry: loud, high,
    fast; sad: soft, low, slow; ...) and vary by speaker. It tests the pipeline,
    not emotion recognition: figures on it say nothing about real speech.
    """
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    style = {  # pitch Hz, loudness, syllables/s, harmonics
        "angry": (220.0, 0.7, 5.5, 12), "happy": (260.0, 0.5, 4.5, 8),
        "neutral": (160.0, 0.3, 3.5, 6), "sad": (130.0, 0.15, 2.5, 4),
    }
    clips = []
    for s in range(speakers):
        voice = rng.uniform(0.8, 1.25)
        for label in labels:
            f0, amp, rate, harmonics = style.get(label, (200.0, 0.4, 4.0, 6))
            for k in range(clips_per_label):
                dur = rng.uniform(1.6, 2.6)
                t = np.arange(int(dur * sample_rate)) / sample_rate
                contour = f0 * voice * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t))
                phase = 2 * np.pi * np.cumsum(contour) / sample_rate
                y = sum(np.sin(h * phase) / h for h in range(1, harmonics + 1))
                envelope = 0.5 * (1 + np.sin(2 * np.pi * rate * t + rng.uniform(0, np.pi))) ** 2
                y = amp * envelope * y / harmonics + 0.003 * rng.standard_normal(len(t))
                lead = np.zeros(int(0.3 * sample_rate))
                y = np.concatenate([lead, y, lead])
                pcm = (np.clip(y, -1, 1) * 32767).astype("<i2")
                path = out_dir / f"spk{s:02d}_{label}_{k:02d}.wav"
                with wave.open(str(path), "wb") as wf:
                    wf.setnchannels(1)
                    wf.setsampwidth(2)
                    wf.setframerate(sample_rate)
                    wf.writeframes(pcm.tobytes())
                clips.append(Clip(str(path), f"synthetic-{s:02d}", label))
    return clips


def per_class_sample(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``per_class`` items of each class present in ``labels`` (class indices), drawn without
    replacement with ``seed``; classes in ascending order."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    return np.concatenate([rng.choice(np.flatnonzero(labels == k), size=min(per_class, int(np.sum(labels == k))),
                                      replace=False) for k in np.unique(labels)]).astype(np.int64)
