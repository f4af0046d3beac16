"""The feature definition shared by training and the device.

The device computes exactly what training computed. The parameters live once,
in :class:`FeatureConfig`, which travels in every model's metadata; training
(``models.features``) computes the spectral part with librosa as the
reference, the device computes it here with numpy only, and a parity test pins
the two together. Everything after the spectral part (silence trimming,
normalisation, the fixed frame count) is this module's on both sides.

Pipeline for one utterance ``y`` (float32 mono at ``sample_rate``)::

    y -> trim_silence (first MAX_CLIP_SECONDS, then quiet ends) -> mfcc (or log-mel)  [T, n_features]
      (with ``pitch``: two more columns, :func:`pitch_track`, numpy on both sides)
      -> normalise with the training split's mean/std
      -> fit_frames to [max_frames, n_features] (cut, or pad with zeros = the mean)
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import asdict, dataclass, field

import numpy as np

from edge_sdk.errors import ParameterError

__all__ = [
    "FeatureConfig",
    "Normalization",
    "mel_filterbank",
    "dct_matrix",
    "log_mel",
    "mfcc",
    "pitch_track",
    "with_pitch",
    "raw_features",
    "trim_silence",
    "utterance_normalize",
    "UTTERANCE_NORMS",
    "SpeakerStats",
    "speaker_inputs",
    "fit_frames",
    "extract",
    "MAX_CLIP_SECONDS",
]

#: The longest utterance anything here looks at, in seconds: :func:`trim_silence` (and so training, the
#: device's features and the user's running statistics) keeps only the first ``MAX_CLIP_SECONDS`` of a
#: clip, and :func:`edge_sdk.audio.load_audio` reads no more than that from a file. The model sees
#: ``max_frames`` (3 s by default); the live segmenter cuts utterances at 6 s.
MAX_CLIP_SECONDS = 30.0


UTTERANCE_NORMS = ("none", "mean", "meanvar", "level")


# FeatureConfig's bounds: wide enough for any speech front end (4-192 kHz, windows up to about 1 s at 16 kHz,
# 30 s of 1 ms frames), narrow enough that no value makes a device allocate without bound
FEATURE_INT_RANGES = {"sample_rate": (4000, 192000), "n_fft": (16, 16384), "win_length": (16, 16384),
                      "hop_length": (1, 16384), "n_mels": (1, 512), "n_mfcc": (1, 512), "max_frames": (1, 30000)}
FEATURE_FLOAT_RANGES = {"fmin": (0.0, 96000.0), "fmax": (0.0, 96000.0), "top_db": (0.0, 300.0),
                        "trim_db": (0.0, 300.0)}


@dataclass(frozen=True)
class FeatureConfig:
    """Parameters of the features a model expects.

    Attributes
    ----------
    kind : {"mfcc", "logmel"}
        MFCC (DCT-II of the log-mel spectrum) or the log-mel spectrum itself.
    sample_rate : int
        Hz; audio at any other rate is resampled to this first.
    n_fft, win_length, hop_length : int
        Samples; the defaults give a 25 ms Hann window and a 10 ms hop at 16 kHz.
    n_mels : int
        Mel bands (Slaney scale and area normalisation, librosa's default).
    n_mfcc : int
        Coefficients kept when ``kind == "mfcc"``.
    fmin, fmax : float
        Hz range of the mel filterbank; ``fmax`` of 0 means ``sample_rate / 2``.
    top_db : float
        Log-power floor below the utterance's peak (librosa's ``power_to_db``).
    trim_db : float
        Frames quieter than the peak by more than this are trimmed from both
        ends before features are computed; 0 disables trimming.
    max_frames : int
        Fixed number of frames the model takes (cut or zero-padded).
    speaker_norm : bool
        Normalise with the speaker's own feature statistics instead of the
        training set's: in training, each speaker's; on a device, running
        statistics of everything its user said (:class:`SpeakerStats`), shrunk
        toward the training statistics while they are few. It removes much of
        the speaker from the features (a large gain on unseen speakers).
    utterance_norm : {"none", "mean", "meanvar", "level"}
        Per-utterance normalisation before the training-set statistics:
        subtract each coefficient's mean over the utterance ("mean", cepstral
        mean normalisation) and also divide by its standard deviation
        ("meanvar"). It removes much of the speaker and channel from MFCCs.
        "level" removes only the utterance's loudness: one number, the mean
        log-mel level in dB over all its frames and bands, is subtracted
        (for MFCC that is the mean of c0 over the utterance), so the spectral
        shape and its changes over time stay. A recording's gain (microphone,
        distance, a corpus normalised per clip) then no longer moves the
        features.
    pitch : bool
        Two more columns after the spectral ones (:func:`pitch_track`): the
        fundamental frequency in semitones (interpolated through unvoiced
        frames) and the frame's periodicity. With ``speaker_norm`` the pitch is
        then relative to the speaker's own: how high and how varied this
        utterance is for this voice, a cue of arousal that a log-mel spectrum
        resolves poorly and that does not depend on the language.
    """

    kind: str = "mfcc"
    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 40
    n_mfcc: int = 40
    fmin: float = 0.0
    fmax: float = 0.0
    top_db: float = 80.0
    trim_db: float = 30.0
    max_frames: int = 300
    utterance_norm: str = "none"
    speaker_norm: bool = False
    pitch: bool = False

    def __post_init__(self) -> None:
        # a model's metadata comes from the aggregator: every field is range-checked, so that a typo in a published
        # model (n_fft 10**8, max_frames 10**9) is refused by name instead of exhausting a device's memory
        for name, (low, high) in FEATURE_INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():  # 400.0 in a hand-edited model.json is 400
                value = int(value)
                object.__setattr__(self, name, value)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
                raise ParameterError(f"FeatureConfig.{name} must be an integer in {low}..{high}, got {value!r}")
        for name, (low, high) in FEATURE_FLOAT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
                raise ParameterError(f"FeatureConfig.{name} must be a number in {low:g}..{high:g}, got {value!r}")
        if not isinstance(self.speaker_norm, bool):
            raise ParameterError(f"FeatureConfig.speaker_norm must be true or false, got {self.speaker_norm!r}")
        if self.fmax and not self.fmin < self.fmax <= self.sample_rate / 2:
            raise ParameterError(f"FeatureConfig fmax={self.fmax} must be above fmin={self.fmin} and at most "
                                 f"sample_rate / 2 = {self.sample_rate / 2:g} (or 0: sample_rate / 2)")
        if not self.fmax and self.fmin >= self.sample_rate / 2:
            raise ParameterError(f"FeatureConfig fmin={self.fmin} must be below sample_rate / 2 = "
                                 f"{self.sample_rate / 2:g}")
        if self.kind not in ("mfcc", "logmel"):
            raise ParameterError(f"FeatureConfig.kind must be 'mfcc' or 'logmel', got {self.kind!r}")
        if self.utterance_norm not in UTTERANCE_NORMS:
            raise ParameterError(
                f"FeatureConfig.utterance_norm must be one of {UTTERANCE_NORMS}, got {self.utterance_norm!r}")
        if self.win_length > self.n_fft:
            raise ParameterError(
                f"win_length={self.win_length} must not exceed n_fft={self.n_fft}"
            )
        if self.kind == "mfcc" and not 0 < self.n_mfcc <= self.n_mels:
            raise ParameterError(f"n_mfcc={self.n_mfcc} must be in 1..n_mels={self.n_mels}")
        if not isinstance(self.pitch, bool):
            raise ParameterError(f"FeatureConfig.pitch must be true or false, got {self.pitch!r}")
        if self.pitch and self.sample_rate < 8000:
            raise ParameterError(f"FeatureConfig.pitch needs a sample_rate of 8000 Hz or more, got {self.sample_rate}")

    @property
    def n_features(self) -> int:
        """Width of one feature frame."""
        return self.n_spectral + (2 if self.pitch else 0)

    @property
    def n_spectral(self) -> int:
        """Width of the spectral part (MFCC or log-mel bands), the first columns of a frame."""
        return self.n_mfcc if self.kind == "mfcc" else self.n_mels

    @property
    def effective_fmax(self) -> float:
        return self.fmax if self.fmax > 0 else self.sample_rate / 2.0

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.pitch:  # configs without it serialise as before (model metadata, feature-cache keys)
            del out["pitch"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FeatureConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ParameterError(f"unknown feature config keys: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Normalization:
    """Per-feature mean and standard deviation of the training split."""

    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std):
            raise ParameterError(
                f"normalisation mean has {len(self.mean)} values but std has {len(self.std)}"
            )
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(s) and s > 0 for s in self.std):
            raise ParameterError("normalisation mean values must be finite and std values finite and positive")

    @classmethod
    def fit(cls, frames: np.ndarray) -> Normalization:
        """Statistics over frames ``[N, n_features]`` (all frames of the training split)."""
        frames = np.asarray(frames, dtype=np.float64)
        if frames.ndim != 2 or frames.shape[0] < 2:
            raise ParameterError(f"need frames of shape [N>=2, F], got {frames.shape}")
        std = np.maximum(frames.std(axis=0), 1e-6)
        return cls(tuple(float(v) for v in frames.mean(axis=0)), tuple(float(v) for v in std))

    def apply(self, feats: np.ndarray) -> np.ndarray:
        if not self.mean:
            return feats.astype(np.float32, copy=False)
        if feats.shape[-1] != len(self.mean):
            raise ParameterError(
                f"features have {feats.shape[-1]} columns, normalisation has {len(self.mean)}"
            )
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((feats - mean) / std).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        if len(data["mean"]) > 4096 or len(data["std"]) > 4096:
            raise ParameterError(f"normalisation has {len(data['mean'])} / {len(data['std'])} values, at most 4096")
        return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    # Slaney's auditory toolbox scale: linear below 1 kHz, logarithmic above.
    freq = np.asanyarray(freq, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = freq / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = freq >= min_log_hz
    mels = np.where(log_t, min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep, mels)
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asanyarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    return np.where(log_t, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


class SpeakerStats:
    """Running per-feature count, sum and sum of squares of one speaker's raw feature frames.

    :meth:`normalization` shrinks the speaker's statistics toward the training
    set's with ``prior_frames`` pseudo-frames, so a device with little audio of its
    user starts from the global statistics and moves to the user's own.
    """

    PRIOR_FRAMES = 500

    def __init__(self, n_features: int) -> None:
        self.count = 0
        self.sum = np.zeros(n_features, np.float64)
        self.sumsq = np.zeros(n_features, np.float64)

    def add(self, frames: np.ndarray, weight: float = 1) -> None:
        """Count ``frames [T, F]``, each as ``weight`` frames (training's class-balanced references weigh clips; a
        device adds with weight 1, so its count stays a whole number)."""
        f = np.asarray(frames, np.float64)
        if f.ndim != 2 or f.shape[1] != self.sum.shape[0]:
            raise ParameterError(f"frames must be [T, {self.sum.shape[0]}], got {f.shape}")
        if not (np.isfinite(weight) and weight >= 0):
            raise ParameterError(f"weight must be a finite number >= 0, got {weight!r}")
        self.count += weight * f.shape[0]
        self.sum += weight * f.sum(axis=0)
        self.sumsq += weight * (f * f).sum(axis=0)

    def normalization(self, prior: Normalization, prior_frames: int | None = None) -> Normalization:
        n0 = self.PRIOR_FRAMES if prior_frames is None else prior_frames
        mu0 = np.asarray(prior.mean, np.float64) if prior.mean else np.zeros_like(self.sum)
        sd0 = np.asarray(prior.std, np.float64) if prior.std else np.ones_like(self.sum)
        total = self.count + n0
        if total <= 0:
            return prior
        mean = (self.sum + n0 * mu0) / total
        second = (self.sumsq + n0 * (sd0 * sd0 + mu0 * mu0)) / total
        std = np.sqrt(np.maximum(second - mean * mean, 1e-12))
        return Normalization(tuple(mean), tuple(np.maximum(std, 1e-6)))

    def to_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> SpeakerStats:
        out = cls(len(data["sum"]))
        out.count = int(data["count"])
        out.sum = np.asarray(data["sum"], np.float64)
        out.sumsq = np.asarray(data["sumsq"], np.float64)
        return out


def speaker_inputs(raws: list[np.ndarray], cfg: FeatureConfig, norm: Normalization) -> list[np.ndarray]:
    """Model inputs of one speaker's utterances (raw features): with ``cfg.speaker_norm``, normalised by the
    statistics of all of them (shrunk toward ``norm`` as on a device); otherwise by ``norm``."""
    if cfg.speaker_norm and raws:
        stats = SpeakerStats(raws[0].shape[1])
        for r in raws:
            stats.add(r)
        norm = stats.normalization(norm)
    return [fit_frames(norm.apply(r), cfg.max_frames) for r in raws]


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-normalised mel filterbank ``[n_mels, 1 + n_fft // 2]`` (librosa's default)."""
    fftfreqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, None]
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=8)
def dct_matrix(n_mfcc: int, n_mels: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``[n_mfcc, n_mels]`` (scipy's ``dct(type=2, norm='ortho')``)."""
    n = np.arange(n_mels)
    k = np.arange(n_mfcc)[:, None]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2.0 * n_mels)) * np.sqrt(2.0 / n_mels)
    basis[0] *= 1.0 / np.sqrt(2.0)
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=8)
def _window(n_fft: int, win_length: int) -> np.ndarray:
    # Periodic Hann (scipy's get_window('hann', N, fftbins=True)), centred in n_fft.
    win = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win_length) / win_length)
    left = (n_fft - win_length) // 2
    full = np.zeros(n_fft)
    full[left : left + win_length] = win
    full.setflags(write=False)
    return full


def _power_spectrogram(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """|STFT|^2 with centred frames and zero padding: ``[T, 1 + n_fft // 2]``."""
    pad = cfg.n_fft // 2
    padded = np.pad(y.astype(np.float64, copy=False), (pad, pad), mode="constant")
    n_frames = 1 + (len(padded) - cfg.n_fft) // cfg.hop_length
    frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft)[:: cfg.hop_length][:n_frames]
    spec = np.fft.rfft(frames * _window(cfg.n_fft, cfg.win_length), axis=-1)
    return spec.real**2 + spec.imag**2


def log_mel(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Log-mel power spectrogram in dB, ``[T, n_mels]`` (librosa ``power_to_db(melspectrogram)``)."""
    fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, float(cfg.fmin), float(cfg.effective_fmax))
    mel = _power_spectrogram(y, cfg) @ fb.T
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    if cfg.top_db > 0:
        db = np.maximum(db, db.max() - cfg.top_db)
    return db


def mfcc(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """MFCC ``[T, n_mfcc]`` (librosa ``feature.mfcc`` with the config's parameters)."""
    return log_mel(y, cfg) @ dct_matrix(cfg.n_mfcc, cfg.n_mels).T


PITCH_FMIN, PITCH_FMAX = 60, 500  # Hz: the lags searched (speech F0, low male voices to shouting and children)
PITCH_VOICED = 0.5  # a frame is voiced when its normalised autocorrelation peak reaches this
_PITCH_BLOCK = 256  # frames per block of pitch_track (about 6 MB of float64 work arrays at 16 kHz)


def pitch_window(sample_rate: int) -> int:
    """Samples of :func:`pitch_track`'s analysis window: 40 ms, two and a half periods of the lowest pitch."""
    return 2 * int(round(0.02 * sample_rate))


def pitch_track(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """``[T, 2]`` float32, one row per spectral frame (centred frames every ``hop_length`` samples, as
    :func:`log_mel`): the fundamental frequency in semitones above 100 Hz, and the periodicity (0..1).

    Per frame, the normalised cross-correlation of a 40 ms window with itself shifted by each lag between
    ``1 / PITCH_FMAX`` and ``1 / PITCH_FMIN``; the period is the peak at or after the shortest lag whose value is
    within 10 % of the best (which keeps an octave error from a period's multiples rare), refined between lags by a
    parabola; the periodicity is the best value (held just under ``PITCH_VOICED`` for a frame judged unvoiced below).
    A frame is voiced when that reaches ``PITCH_VOICED`` at a peak
    inside the searched lags: a correlation still falling at the shortest lag or rising at the longest (hum, rumble,
    low-frequency noise) is not a pitch in the speech range. Unvoiced frames take the pitch interpolated between the
    voiced frames around them (the first and last voiced values held at the ends); an utterance with no voiced frame
    has pitch 0. Frames are processed in blocks, so memory stays a few MB whatever the clip's length.
    """
    y = np.asarray(y, np.float64)
    sr, hop = cfg.sample_rate, cfg.hop_length
    win = pitch_window(sr)
    n_frames = 1 + len(y) // hop
    padded = np.pad(y, (win // 2, win // 2), mode="constant")
    padded = np.pad(padded, (0, max(0, (n_frames - 1) * hop + win - len(padded))), mode="constant")
    all_frames = np.lib.stride_tricks.sliding_window_view(padded, win)[::hop][:n_frames]
    lmin, lmax = max(1, sr // PITCH_FMAX), min(win - 1, sr // PITCH_FMIN)
    lags = np.arange(lmin, lmax + 1)
    n_fft = 1 << int(np.ceil(np.log2(win + lmax + 1)))  # no circular wrap at the lags searched
    f0 = np.empty(n_frames)
    best = np.empty(n_frames)
    peak_inside = np.empty(n_frames, bool)
    for b0 in range(0, n_frames, _PITCH_BLOCK):
        frames = all_frames[b0:b0 + _PITCH_BLOCK]
        frames = frames - frames.mean(axis=1, keepdims=True)
        spec = np.fft.rfft(frames, n=n_fft, axis=1)
        acf = np.fft.irfft(spec.real**2 + spec.imag**2, n=n_fft, axis=1)[:, :win]
        cs = np.cumsum(frames**2, axis=1)
        head = cs[:, win - 1 - lags]  # energy of x[0 : win - lag]
        tail = cs[:, -1:] - cs[:, lags - 1]  # energy of x[lag : win]
        nccf = acf[:, lags] / np.sqrt(np.maximum(head * tail, 1e-20))
        top = nccf.max(axis=1)
        j = np.argmax(nccf >= 0.9 * np.maximum(top, 1e-9)[:, None], axis=1)
        rows = np.arange(len(frames))
        for _ in range(len(lags)):  # up to that lag's own peak
            step = (j + 1 < len(lags)) & (nccf[rows, np.minimum(j + 1, len(lags) - 1)] > nccf[rows, j])
            if not step.any():
                break
            j = j + step
        inner = (j > 0) & (j < len(lags) - 1)
        a, b, c = (nccf[rows, np.clip(j + d, 0, len(lags) - 1)] for d in (-1, 0, 1))
        den = a - 2 * b + c  # parabolic interpolation between the lags around the peak
        shift = np.where(inner & (den < 0), 0.5 * (a - c) / np.where(den < 0, den, -1.0), 0.0)
        f0[b0:b0 + len(frames)] = sr / (lags[j] + np.clip(shift, -0.5, 0.5))
        best[b0:b0 + len(frames)] = top
        peak_inside[b0:b0 + len(frames)] = inner & (a <= b) & (c <= b)
    semitones = 12.0 * np.log2(f0 / 100.0)
    voiced = (best >= PITCH_VOICED) & peak_inside
    if voiced.any():
        idx = np.flatnonzero(voiced)
        semitones = np.interp(np.arange(n_frames), idx, semitones[idx])
    else:
        semitones = np.zeros(n_frames)
    return np.stack([semitones, np.where(voiced, np.clip(best, 0.0, 1.0), np.minimum(best, PITCH_VOICED * 0.999))],
                    axis=1).astype(np.float32)


def with_pitch(feats: np.ndarray, y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """``feats`` (the spectral part of the trimmed utterance ``y``) with :func:`pitch_track` 's columns appended
    when ``cfg.pitch``; training and the device share this."""
    if not cfg.pitch:
        return feats
    track = pitch_track(y, cfg)
    n = min(len(track), len(feats))  # the same count by construction; never more rows than the spectrum's
    return np.concatenate([feats[:n], track[:n]], axis=1).astype(np.float32)


def utterance_normalize(feats: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """``cfg.utterance_norm`` applied to ``[T, F]`` features (training and device share this)."""
    if cfg.utterance_norm == "none":
        return feats.astype(np.float32, copy=False)
    f64 = feats.astype(np.float64)
    if cfg.utterance_norm == "level":  # one gain for the utterance: the mean dB (MFCC: c0 carries it)
        if cfg.kind == "mfcc":
            f64[:, 0] -= f64[:, 0].mean()
            return f64.astype(np.float32)
        return (f64 - f64.mean()).astype(np.float32)
    out = f64 - f64.mean(axis=0, keepdims=True)
    if cfg.utterance_norm == "meanvar":
        out /= np.maximum(f64.std(axis=0, keepdims=True), 1e-5)
    return out.astype(np.float32)


def raw_features(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """The features of ``cfg``, before the training-set normalisation: ``[T, n_features]`` float32."""
    y = _check_audio(y)
    feats = mfcc(y, cfg) if cfg.kind == "mfcc" else log_mel(y, cfg)
    return with_pitch(utterance_normalize(feats, cfg), y, cfg)


def trim_silence(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """The first :data:`MAX_CLIP_SECONDS` of ``y``, less leading and trailing frames quieter than the peak
    frame by ``cfg.trim_db``.

    The cut comes first, so nothing after it (features, the user's running statistics) ever sees the
    rest of an over-long clip. Frame energy is the mean square over ``n_fft``-sample frames at
    ``hop_length`` (as ``librosa.effects.trim``); at least one frame is always kept.
    """
    y = np.asarray(y)
    y = _check_audio(y[: int(MAX_CLIP_SECONDS * cfg.sample_rate)] if y.ndim == 1 else y)
    if cfg.trim_db <= 0 or len(y) < cfg.n_fft:
        return y
    frames = np.lib.stride_tricks.sliding_window_view(y.astype(np.float64), cfg.n_fft)[:: cfg.hop_length]
    energy = np.mean(frames**2, axis=-1)
    peak = energy.max()
    if peak <= 0:
        return y
    db = 10.0 * np.log10(np.maximum(energy, 1e-20) / peak)
    loud = np.flatnonzero(db > -cfg.trim_db)
    start = int(loud[0]) * cfg.hop_length
    stop = min(len(y), int(loud[-1]) * cfg.hop_length + cfg.n_fft)
    return y[start:stop]


def fit_frames(feats: np.ndarray, max_frames: int) -> np.ndarray:
    """Cut ``[T, F]`` to ``max_frames`` or pad it with zero rows (the training mean)."""
    if feats.ndim != 2:
        raise ParameterError(f"features must be [T, F], got shape {feats.shape}")
    if feats.shape[0] >= max_frames:
        return np.ascontiguousarray(feats[:max_frames], dtype=np.float32)
    out = np.zeros((max_frames, feats.shape[1]), dtype=np.float32)
    out[: feats.shape[0]] = feats
    return out


def extract(y: np.ndarray, cfg: FeatureConfig, norm: Normalization | None = None) -> np.ndarray:
    """The model's input for one utterance: ``[max_frames, n_features]`` float32."""
    feats = raw_features(trim_silence(y, cfg), cfg)
    if norm is not None:
        feats = norm.apply(feats)
    return fit_frames(feats, cfg.max_frames)


def _check_audio(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ParameterError(f"audio must be mono, 1-D; got shape {y.shape}")
    if y.size == 0:
        raise ParameterError("audio is empty")
    if not np.issubdtype(y.dtype, np.floating):
        raise ParameterError(f"audio must be floating point in [-1, 1], got dtype {y.dtype}")
    if not np.all(np.isfinite(y)):
        raise ParameterError("audio contains NaN or Inf samples")
    return y
