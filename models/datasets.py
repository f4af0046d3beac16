"""Corpora as lists of clips, and speaker-independent splits.

Only splits that hold out whole speakers are offered: a speaker in the test set
never appears in training.
"""

from __future__ import annotations

import logging
import os
import wave
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
    "ravdess_clips",
    "synthetic_corpus",
    "split_by_speaker",
    "default_ravdess_root",
]

FOUR_CLASSES = ("angry", "happy", "neutral", "sad")

RAVDESS_EMOTIONS = {
    "01": "neutral", "02": "calm", "03": "happy", "04": "sad",
    "05": "angry", "06": "fearful", "07": "disgust", "08": "surprised",
}


@dataclass(frozen=True)
class Clip:
    path: str
    speaker: str
    label: str


def default_ravdess_root() -> Path | None:
    """``$FEDSER_RAVDESS``, else ``../shared/data/ravdess`` beside the checkout, if it exists."""
    env = os.environ.get("FEDSER_RAVDESS")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess")
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None


def ravdess_clips(
    root: str | os.PathLike,
    *,
    labels: Sequence[str] = FOUR_CLASSES,
    calm_as_neutral: bool = False,
) -> list[Clip]:
    """Clips of RAVDESS (``Actor_NN/MM-VV-EE-II-SS-RR-AA.{wav,flac}``) whose emotion is in ``labels``.

    Parameters
    ----------
    calm_as_neutral : bool
        Fold "calm" (02) into "neutral". Off by default: the literature's
        four-class subset uses neutral alone (96 clips).
    """
    root = Path(root)
    if not root.is_dir():
        raise ParameterError(f"RAVDESS folder not found: {root}")
    clips = []
    for path in sorted(root.glob("Actor_*/*")):
        if path.suffix.lower() not in (".wav", ".flac"):
            continue
        fields = path.stem.split("-")
        if len(fields) != 7:
            log.warning("skipping %s: not a RAVDESS file name (7 fields)", path)
            continue
        modality, channel, emotion, _, _, _, actor = fields
        if modality not in ("01", "03") or channel != "01":
            continue  # speech audio only
        label = RAVDESS_EMOTIONS.get(emotion)
        if label == "calm" and calm_as_neutral:
            label = "neutral"
        if label in labels:
            clips.append(Clip(str(path), f"ravdess-{actor}", label))
    if not clips:
        raise ParameterError(f"no RAVDESS speech clips with labels {list(labels)} under {root}")
    return clips


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
