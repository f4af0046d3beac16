"""Training's speaker reference: whose frames make a training speaker's normalisation statistics."""

import numpy as np
import pytest

from edge_sdk.features import FeatureConfig, Normalization, SpeakerStats, speaker_inputs
from models.datasets import Clip
from models.features import FeatureSet
from models.train import TrainConfig

CFG = FeatureConfig(kind="logmel", n_mels=4, speaker_norm=True, max_frames=60)


def _set():
    rng = np.random.default_rng(0)
    clips, raw = [], []
    for spk, offset in (("a", 0.0), ("b", 5.0)):
        for label, shift in (("neutral", 0.0), ("angry", 10.0), ("angry", 10.0)):
            clips.append(Clip(f"/x/{spk}{len(clips)}.wav", spk, label))
            raw.append((rng.normal(size=(3000, 4)) + offset + shift).astype(np.float32))
    return FeatureSet(clips, raw)


def test_neutral_reference_takes_the_statistics_from_neutral_clips_only():
    fs = _set()
    norm = fs.normalization()
    plain = fs.model_inputs(CFG, norm)
    ref = fs.model_inputs(CFG, norm, fs.reference_stats("neutral"))
    # default: identical to the device's speaker_inputs over all of a speaker's clips
    np.testing.assert_allclose(plain[:3], np.stack(speaker_inputs(fs.raw[:3], CFG, norm)), rtol=1e-6)
    # neutral reference: a speaker's neutral clip sits near 0, their angry clips far above it
    assert abs(ref[0].mean()) < 0.5 and ref[1].mean() > 2.0
    assert ref[1].mean() > plain[1].mean() + 1.0
    assert ref.shape == plain.shape


def test_a_speaker_without_neutral_clips_falls_back_to_all_clips():
    fs = _set()
    keep = [i for i, c in enumerate(fs.clips) if not (c.speaker == "b" and c.label == "neutral")]
    fs = FeatureSet([fs.clips[i] for i in keep], [fs.raw[i] for i in keep])
    norm = Normalization.fit(np.concatenate(fs.raw))
    reference = fs.reference_stats("neutral")
    assert sorted(reference) == ["a"]
    np.testing.assert_allclose(fs.model_inputs(CFG, norm, reference)[3:], fs.model_inputs(CFG, norm)[3:])
    assert not np.allclose(fs.model_inputs(CFG, norm, reference)[:3], fs.model_inputs(CFG, norm)[:3])


def test_extra_reference_clips_join_only_known_speakers():
    fs = _set()
    calm = FeatureSet([Clip("/x/calm.wav", "a", "calm"), Clip("/x/other.wav", "z", "calm")],
                      [np.zeros((10, 4), np.float32), np.zeros((10, 4), np.float32)])
    reference = fs.reference_stats("neutral", calm)
    assert sorted(reference) == ["a", "b"] and reference["a"].count == 3010 and reference["b"].count == 3000


def test_neutral_mean_reference_takes_the_mean_of_neutral_clips_and_the_spread_of_all_clips():
    """The device normalises by all of a user's clips; "neutral-mean" keeps the neutral clips' centre (what
    "neutral" is for) with that spread, so training inputs move as much as a device's do."""
    fs = _set()  # per speaker: one neutral clip at its offset, two angry clips 10 above, noise sd 1
    calm = FeatureSet([Clip("/x/calm.wav", "a", "calm")], [np.full((3000, 4), -1.0, np.float32)])
    neutral, mixed = fs.reference_stats("neutral", calm), fs.reference_stats("neutral-mean", calm)
    every = SpeakerStats(4)
    for r in fs.raw[:3]:
        every.add(r)
    for spk in ("a", "b"):
        np.testing.assert_allclose(mixed[spk].sum / mixed[spk].count, neutral[spk].sum / neutral[spk].count)
    mean_a = every.sum / every.count
    var_a = every.sumsq / every.count - mean_a**2
    m = mixed["a"].sum / mixed["a"].count
    np.testing.assert_allclose(mixed["a"].sumsq / mixed["a"].count - m**2, var_a, rtol=1e-6)
    assert mixed["a"].count == every.count  # the shrink toward the training set's weighs as many frames as "all"
    # in the inputs: the neutral clip still sits near 0, the angry ones above it, less far than with "neutral"
    # (whose spread is the neutral clip's and calm's) and no further than a device would put them
    norm = fs.normalization()
    x_neutral, x_mixed = fs.model_inputs(CFG, norm, neutral), fs.model_inputs(CFG, norm, mixed)
    assert abs(x_mixed[3].mean()) < 0.5 < x_mixed[4].mean() < x_neutral[4].mean()
    with pytest.raises(ValueError, match="unknown speaker reference"):
        fs.reference_stats("median")
    assert TrainConfig(speaker_reference="neutral-mean").speaker_reference == "neutral-mean"


def test_balanced_reference_weighs_every_class_the_same():
    fs = _set()  # per speaker: one neutral clip, two angry clips
    stats = fs.reference_stats("balanced")["a"]
    plain = SpeakerStats(4)
    for r in fs.raw[:3]:
        plain.add(r)
    assert stats.count == pytest.approx(plain.count)
    # neutral (level 0) and angry (level 10) weigh the same: the mean is 5, not 6.7 as over all frames
    np.testing.assert_allclose(stats.sum / stats.count, 5.0, atol=0.1)
    np.testing.assert_allclose(plain.sum / plain.count, 20 / 3, atol=0.1)


def test_unknown_reference_is_refused():
    with pytest.raises(ValueError, match="speaker_reference"):
        TrainConfig(speaker_reference="calm")
    with pytest.raises(ValueError, match="speaker reference"):
        _set().reference_stats("calm")
    assert TrainConfig(speaker_reference="balanced").to_dict()["speaker_reference"] == "balanced"
