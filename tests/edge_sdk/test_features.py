"""The device's numpy features against librosa, the training side's reference."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.errors import ParameterError
from edge_sdk.features import FeatureConfig, Normalization, extract, fit_frames, pitch_track, raw_features

# librosa computes in float32, this module in float64: on real speech the MFCCs (magnitudes up
# to about 650) differ by at most ~1e-4, so 2e-3 absolute is a tolerance with margin that still
# catches any change of window, filterbank, log floor or DCT (each moves values by >= 0.1).
ATOL = 2e-3


@pytest.mark.parametrize("kind, utterance_norm", [("mfcc", "none"), ("logmel", "none"), ("mfcc", "meanvar"),
                                                   ("logmel", "mean"), ("logmel", "level"), ("mfcc", "level")])
def test_parity_with_librosa_on_real_ravdess_clips(ravdess_root, kind, utterance_norm):
    from models.features import librosa_features, load_clip_audio

    cfg = FeatureConfig(kind=kind, utterance_norm=utterance_norm)
    paths = sorted(ravdess_root.glob("Actor_*/*.flac"))[::180]  # 8 clips across actors and emotions
    assert len(paths) >= 8
    for path in paths:
        y = load_clip_audio(str(path), cfg.sample_rate)
        ours, ref = raw_features(y, cfg), librosa_features(y, cfg)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL, err_msg=str(path))


def test_parity_with_librosa_on_synthetic_audio(rng):
    from models.features import librosa_features

    cfg = FeatureConfig(n_fft=512, win_length=400, fmin=50.0, fmax=7600.0, n_mfcc=20)
    y = (0.3 * np.sin(2 * np.pi * 220 * np.arange(24000) / 16000) + 0.01 * rng.standard_normal(24000))
    y = y.astype(np.float32)
    np.testing.assert_allclose(raw_features(y, cfg), librosa_features(y, cfg), rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_level_normalisation_removes_the_recordings_gain_and_keeps_the_spectral_shape(kind, rng):
    # a clip 20 dB quieter gives the same features with "level", and features 20 dB lower without it
    t = np.arange(24000) / 16000
    y = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(24000))
    y = y.astype(np.float32)
    plain, level = FeatureConfig(kind=kind, top_db=0), FeatureConfig(kind=kind, top_db=0, utterance_norm="level")
    np.testing.assert_allclose(raw_features(0.1 * y, level), raw_features(y, level), atol=1e-3)
    shift = raw_features(y, plain) - raw_features(0.1 * y, plain)
    assert np.allclose(shift[:, 0], 20.0 * (1 if kind == "logmel" else np.sqrt(40)), atol=1e-2)
    # the shape over bands and time is untouched: one number per utterance is subtracted
    diff = raw_features(y, plain) - raw_features(y, level)
    if kind == "logmel":
        np.testing.assert_allclose(diff, diff[0, 0], atol=1e-3)
    else:
        np.testing.assert_allclose(diff[:, 1:], 0.0, atol=1e-3)
        np.testing.assert_allclose(diff[:, 0], diff[0, 0], atol=1e-3)


def test_extract_has_the_model_input_shape(rng):
    cfg = FeatureConfig(max_frames=120)
    y = (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32)
    x = extract(y, cfg)
    assert x.shape == (120, 40) and x.dtype == np.float32
    short = extract(y[:8000], cfg)
    assert short.shape == (120, 40) and np.all(short[60:] == 0)


def test_normalization_fit_and_apply(rng):
    frames = rng.normal(3.0, 2.0, size=(5000, 4))
    norm = Normalization.fit(frames)
    out = norm.apply(frames.astype(np.float32))
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(out.std(axis=0), 1, atol=1e-3)
    assert Normalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(ParameterError, match="columns"):
        norm.apply(np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("bad, match", [
    ({"kind": "mel"}, "kind"), ({"win_length": 800}, "win_length"), ({"n_mfcc": 80}, "n_mfcc"),
    ({"hop_length": 0}, "hop_length"), ({"utterance_norm": "cmvn"}, "utterance_norm"), ({"pitch": 1}, "pitch"),
])
def test_bad_config_names_the_field(bad, match):
    with pytest.raises(ParameterError, match=match):
        FeatureConfig(**bad)


@pytest.mark.parametrize("audio, match", [
    (np.zeros((2, 100), np.float32), "mono"), (np.zeros(0, np.float32), "empty"),
    (np.zeros(100, np.int16), "floating"), (np.array([0.0, np.nan], np.float32), "NaN"),
])
def test_bad_audio_is_refused_with_the_reason(audio, match):
    with pytest.raises(ParameterError, match=match):
        raw_features(audio, FeatureConfig())


def test_fit_frames_cuts_long_input():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    np.testing.assert_array_equal(fit_frames(x, 4), x[:4])


def test_speaker_statistics_shrink_toward_the_training_ones_and_match_training_when_complete(rng):
    from edge_sdk.features import SpeakerStats, speaker_inputs

    prior = Normalization(tuple([0.0] * 3), tuple([1.0] * 3))
    frames = rng.normal(5.0, 2.0, size=(4000, 3))
    stats = SpeakerStats(3)
    assert stats.normalization(prior, prior_frames=500) == prior  # nothing heard yet: the training statistics
    stats.add(frames[:10])
    early = stats.normalization(prior, prior_frames=500)
    assert 0 < early.mean[0] < 1.0  # 10 frames against 500 pseudo-frames: still near the prior
    stats.add(frames[10:])
    late = stats.normalization(prior, prior_frames=0)
    np.testing.assert_allclose(late.mean, frames.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(late.std, frames.std(axis=0), rtol=1e-9)
    again = SpeakerStats.from_dict(stats.to_dict())
    assert again.normalization(prior) == stats.normalization(prior)
    cfg = FeatureConfig(speaker_norm=True, n_mfcc=3, n_mels=3, max_frames=50)
    raws = [rng.normal(5.0, 2.0, size=(40, 3)).astype(np.float32) for _ in range(3)]
    xs = speaker_inputs(raws, cfg, prior)
    whole = SpeakerStats(3)
    for r in raws:
        whole.add(r)
    norm = whole.normalization(prior)  # every utterance of the speaker, as a device that heard them all
    assert xs[0].shape == (50, 3) and np.all(xs[0][40:] == 0)
    np.testing.assert_allclose(xs[1][:40], norm.apply(raws[1]), rtol=1e-6)
    assert norm.mean[0] > 0.5  # 120 frames against 500 pseudo-frames: pulled from the training mean (0) toward 5


def _semitones_to_hz(st: np.ndarray) -> np.ndarray:
    return 100.0 * 2.0 ** (st / 12.0)


@pytest.mark.parametrize("f0", [62.0, 95.0, 140.0, 220.0, 330.0, 480.0])
def test_pitch_track_finds_the_fundamental_of_a_voice_like_tone(f0, rng):
    """Harmonics falling off like a voice's (the fundamental not the strongest in every frame), a little noise:
    the pitch within half a semitone's tenth, every frame voiced; one row per spectral frame."""
    cfg = FeatureConfig(kind="logmel", pitch=True)
    t = np.arange(24000) / 16000
    y = sum(0.3 / k * np.sin(2 * np.pi * f0 * k * t + k) for k in range(1, 8)) + 0.01 * rng.standard_normal(len(t))
    track = pitch_track(y.astype(np.float32), cfg)
    assert track.shape == (raw_features(y.astype(np.float32), FeatureConfig(kind="logmel")).shape[0], 2)
    assert track.dtype == np.float32
    inner = track[5:-5]  # the first and last frames see the zero padding
    np.testing.assert_allclose(_semitones_to_hz(inner[:, 0]), f0, rtol=0.003)
    assert inner[:, 1].min() > 0.9


def test_pitch_track_follows_a_glide_and_fills_unvoiced_frames(rng):
    sr = 16000
    f = np.linspace(110.0, 260.0, 32000)
    phase = 2 * np.pi * np.cumsum(f) / sr
    voiced = 0.3 * np.sin(phase) + 0.12 * np.sin(2 * phase) + 0.05 * np.sin(3 * phase)
    gap = np.zeros(32000, bool)
    gap[12000:20000] = True  # half a second of noise in the middle: unvoiced
    y = np.where(gap, 0.05 * rng.standard_normal(32000), voiced).astype(np.float32)
    track = pitch_track(y, FeatureConfig(kind="logmel", pitch=True))
    frames = np.arange(len(track)) * 160
    ok = (frames > 400) & (frames < 31600) & ~gap[np.minimum(frames, 31999)]
    ok &= (np.abs(frames - 12000) > 400) & (np.abs(frames - 20000) > 400)
    np.testing.assert_allclose(_semitones_to_hz(track[ok, 0]), f[frames[ok]], rtol=0.01)
    inside = (frames > 12400) & (frames < 19600)
    assert track[inside, 1].max() < 0.5  # noise is not voiced ...
    lo, hi = 12.0 * np.log2(f[11600] / 100), 12.0 * np.log2(f[20400] / 100)
    assert np.all((track[inside, 0] > lo - 0.2) & (track[inside, 0] < hi + 0.2))  # ... and its pitch interpolated


def test_pitch_of_noise_hum_or_silence_is_unvoiced_and_finite(rng):
    """White noise, silence, and what a device hears between words: 50 Hz mains hum with a harmonic and brown
    (rumble) noise, whose correlation is highest at the shortest lag searched (they were read as voiced at 500 Hz)."""
    cfg = FeatureConfig(kind="logmel", pitch=True)
    t = np.arange(32000) / 16000
    brown = np.cumsum(rng.standard_normal(32000))
    for name, y in (("white", 0.1 * rng.standard_normal(32000)), ("silence", np.zeros(32000)),
                    ("hum", 0.3 * np.sin(2 * np.pi * 50 * t) + 0.1 * np.sin(2 * np.pi * 150 * t)),
                    ("brown", 0.3 * brown / np.abs(brown).max())):
        track = pitch_track(y.astype(np.float32), cfg)
        assert np.all(np.isfinite(track)), name
        assert np.mean(track[:, 1] >= 0.5) < 0.02, (name, np.mean(track[:, 1] >= 0.5))
        if name in ("white", "silence", "hum"):
            assert np.all(track[:, 0] == 0.0), name  # no voiced frame: pitch 0


def test_pitch_track_memory_is_bounded_by_blocks(rng):
    import tracemalloc

    cfg = FeatureConfig(kind="logmel", pitch=True)
    y = (0.1 * rng.standard_normal(30 * 16000)).astype(np.float32)  # MAX_CLIP_SECONDS
    tracemalloc.start()
    try:
        track = pitch_track(y, cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert track.shape == (3001, 2) and peak < 40e6, peak  # all frames at once took about 112 MB
    with pytest.raises(ParameterError, match="8000"):
        FeatureConfig(kind="logmel", pitch=True, sample_rate=4000, n_fft=256, win_length=256)


def test_pitch_columns_follow_the_spectral_ones_untouched_by_the_level_norm(rng):
    """n_features grows by 2; the spectral columns are what they were without pitch; the utterance's level is not
    subtracted from the pitch; a config without pitch serialises as before (old metadata and caches stay valid)."""
    t = np.arange(24000) / 16000
    y = (0.3 * np.sin(2 * np.pi * 180 * t) + 0.1 * np.sin(2 * np.pi * 360 * t)
         + 0.01 * rng.standard_normal(24000)).astype(np.float32)
    for kind in ("logmel", "mfcc"):
        plain = FeatureConfig(kind=kind, utterance_norm="level")
        cfg = FeatureConfig(kind=kind, utterance_norm="level", pitch=True)
        assert cfg.n_features == plain.n_features + 2 and cfg.n_spectral == plain.n_features
        with_p, without = raw_features(y, cfg), raw_features(y, plain)
        assert with_p.shape == (without.shape[0], plain.n_features + 2)
        np.testing.assert_array_equal(with_p[:, :-2], without)
        np.testing.assert_allclose(_semitones_to_hz(with_p[10:-10, -2]), 180.0, rtol=0.003)
        np.testing.assert_allclose(raw_features(0.1 * y, cfg)[:, -2:], with_p[:, -2:], atol=1e-4)  # gain-free
        assert "pitch" not in plain.to_dict() and cfg.to_dict()["pitch"] is True
        assert FeatureConfig.from_dict(cfg.to_dict()) == cfg and FeatureConfig.from_dict(plain.to_dict()) == plain
        assert extract(y, cfg).shape == (cfg.max_frames, cfg.n_features)


def test_training_features_carry_the_same_pitch_columns(rng):
    from models.features import librosa_features

    t = np.arange(24000) / 16000
    y = (0.3 * np.sin(2 * np.pi * 150 * t * (1 + 0.1 * t)) + 0.01 * rng.standard_normal(24000)).astype(np.float32)
    cfg = FeatureConfig(kind="logmel", utterance_norm="level", pitch=True)
    ours, ref = raw_features(y, cfg), librosa_features(y, cfg)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours[:, -2:], ref[:, -2:])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)
