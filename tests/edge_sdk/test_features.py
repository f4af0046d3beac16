"""The device's numpy features against librosa, the training side's reference."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.errors import ParameterError
from edge_sdk.features import FeatureConfig, Normalization, extract, fit_frames, raw_features

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
    ({"hop_length": 0}, "hop_length"), ({"utterance_norm": "cmvn"}, "utterance_norm"),
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
