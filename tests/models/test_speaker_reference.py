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
