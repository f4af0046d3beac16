"""Training options added for the recipe search (issue 14): feature-space augmentation and a cosine schedule."""

import numpy as np
import pytest

from models.features import augment_inputs
from models.train import TrainConfig


def _inputs(n=4, frames=40, feats=16, length=24, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, frames, feats), np.float32)
    x[:, :length] = rng.normal(size=(n, length, feats))
    return x


def _lengths(x):
    return np.any(x != 0, axis=2).sum(axis=1)


def test_no_amount_returns_the_inputs_unchanged():
    x = _inputs()
    assert augment_inputs(x, np.random.default_rng(0)) is x


def test_time_stretch_changes_the_utterance_length_and_keeps_padding_zero():
    x = _inputs(n=200)
    y = augment_inputs(x, np.random.default_rng(1), time_stretch=0.4)
    lengths = _lengths(y)
    assert y.shape == x.shape
    assert lengths.min() < 24 < lengths.max()  # faster and slower copies
    # every frame after an utterance's end is an exact zero row (padding, as the device pads)
    for row, n in zip(y, lengths, strict=True):
        assert not row[n:].any()


def test_frequency_warp_moves_energy_across_bands_and_leaves_padding_alone():
    x = _inputs()
    x[:, :24, :] = 0.0
    x[:, :24, 8] = 1.0  # one band lit
    y = augment_inputs(x, np.random.default_rng(2), freq_warp=0.3)
    assert y.shape == x.shape and not y[:, 24:].any()
    peaks = y[:, 0].argmax(axis=1)
    assert len(set(peaks.tolist())) > 1 or not np.allclose(y, x)
    # a warp factor of exactly 1 is the identity: range 0 draws only a = 1
    assert np.allclose(augment_inputs(x, np.random.default_rng(2), freq_warp=1e-9), x, atol=1e-6)


def test_spectral_tilt_adds_a_ramp_to_speech_frames_only():
    x = _inputs()
    y = augment_inputs(x, np.random.default_rng(3), spectral_tilt=2.0)
    d = y - x
    assert not d[:, 24:].any()  # padding stays zero
    ramp = d[:, 0]  # the same ramp on every speech frame of a clip, antisymmetric around the middle band
    np.testing.assert_allclose(d[:, 5], ramp, atol=1e-6)
    np.testing.assert_allclose(ramp[:, 0], -ramp[:, -1], atol=1e-6)
    assert np.abs(ramp).max() <= 2.0 + 1e-6 and np.abs(ramp).max() > 0.1


def test_warp_and_tilt_leave_the_pitch_columns_alone():
    """With FeatureConfig.pitch the last two columns are pitch and periodicity, not bands: a band warp or a
    spectral tilt must not move them (time stretch does: it is time)."""
    x = _inputs(n=50, feats=18)
    y = augment_inputs(x, np.random.default_rng(4), freq_warp=0.3, spectral_tilt=2.0, spectral=16)
    np.testing.assert_array_equal(y[..., 16:], x[..., 16:])
    assert not np.allclose(y[..., :16], x[..., :16]) and not y[:, 24:].any()
    z = augment_inputs(x, np.random.default_rng(4), time_stretch=0.3, spectral=16)
    assert not np.allclose(z[..., 16:], x[..., 16:])


def test_offset_shrink_pulls_each_clips_mean_frame_toward_the_reference_and_keeps_its_movement():
    x = _inputs(n=300) + 0.0
    x[:, :24] += np.random.default_rng(5).normal(size=(300, 1, 16)) * 2.0  # a mean frame per clip
    y = augment_inputs(x, np.random.default_rng(6), offset_shrink=0.5)
    assert not y[:, 24:].any()  # padding stays zero
    m_x, m_y = x[:, :24].mean(axis=1), y[:, :24].mean(axis=1)
    a = (m_y * m_x).sum(axis=1) / (m_x * m_x).sum(axis=1)  # one factor per clip, the same on every band
    np.testing.assert_allclose(m_y, a[:, None] * m_x, atol=1e-4)
    assert 0.5 - 1e-4 <= a.min() < 0.6 and 0.9 < a.max() <= 1.0 + 1e-4
    # the movement around the mean is untouched
    np.testing.assert_allclose(y[:, :24] - m_y[:, None], x[:, :24] - m_x[:, None], atol=1e-4)
    assert np.allclose(augment_inputs(x, np.random.default_rng(6), offset_shrink=1e-9), x, atol=1e-5)


def test_spread_shrink_pulls_each_bands_spread_toward_one_and_keeps_the_mean():
    x = _inputs(n=300) * 3.0  # spread 3 in every band
    y = augment_inputs(x, np.random.default_rng(7), spread_shrink=1.0, spectral=12)
    assert not y[:, 24:].any()
    np.testing.assert_allclose(y[:, :24].mean(axis=1), x[:, :24].mean(axis=1), atol=1e-4)
    s_x, s_y = x[:, :24, :12].std(axis=1), y[:, :24, :12].std(axis=1)
    b = (s_y - 1.0) / (s_x - 1.0)  # 1 + b (s - 1), b in [0, 1], one per clip
    assert b.min() >= -1e-3 and b.max() <= 1.0 + 1e-3 and b.std(axis=1).max() < 1e-3
    assert b.mean() == pytest.approx(0.5, abs=0.08)
    np.testing.assert_array_equal(y[..., 12:], x[..., 12:])  # columns past `spectral` (pitch) untouched
    # a band that does not move (spread 0) stays put rather than dividing by zero
    flat = _inputs(n=3)
    flat[:, :24, 0] = 0.7
    out = augment_inputs(flat, np.random.default_rng(8), spread_shrink=0.5)
    assert np.isfinite(out).all() and np.allclose(out[:, :24, 0], 0.7, atol=1e-4)


def test_cosine_schedule_and_validation():
    c = TrainConfig(epochs=10, learning_rate=1e-3, lr_schedule="cosine")
    assert c.learning_rate_at(0) == pytest.approx(1e-3)
    assert c.learning_rate_at(5) == pytest.approx(5e-4)
    assert c.learning_rate_at(9) < 1e-4
    assert TrainConfig(learning_rate=2e-3).learning_rate_at(7) == pytest.approx(2e-3)
    with pytest.raises(ValueError):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError):
        TrainConfig(freq_warp=1.5)
    with pytest.raises(ValueError):
        TrainConfig(reference_blend=1.5)
    for bad in ({"offset_shrink": -0.1}, {"spread_shrink": 1.5}, {"offset_shrink": float("nan")}):
        with pytest.raises(ValueError, match="shrink"):
            TrainConfig(**bad)
    assert TrainConfig(offset_shrink=0.5).feature_augmented and TrainConfig(spread_shrink=0.5).feature_augmented
    # the blend only augments when a reference other than "all" is used
    assert not TrainConfig(reference_blend=0.5).feature_augmented
    assert TrainConfig(reference_blend=0.5, speaker_reference="neutral").feature_augmented
    assert not TrainConfig().feature_augmented and TrainConfig(spectral_tilt=0.5).feature_augmented
    assert TrainConfig(time_stretch=0.2).to_dict()["time_stretch"] == 0.2


def test_training_with_feature_augmentation_and_cosine_schedule_runs(synthetic_clips, tmp_path):
    from models.architectures import ArchitectureConfig
    from models.datasets import split_by_speaker
    from models.train import train_baseline

    speakers = sorted({c.speaker for c in synthetic_clips})
    train, test = split_by_speaker(synthetic_clips, speakers[-1:])
    train, val = split_by_speaker(train, speakers[-2:-1])
    config = TrainConfig(epochs=2, batch_size=16, freq_warp=0.1, time_stretch=0.2, spectral_tilt=0.5,
                         offset_shrink=0.5, spread_shrink=0.5, lr_schedule="cosine", replay_per_class=0,
                         speaker_reference="neutral", reference_blend=1.0)
    result = train_baseline(train, val, test, config=config, cache_dir=tmp_path,
                            architecture=ArchitectureConfig(channels=(8, 16), embedding_dim=16, head_units=8))
    assert result.report["epochs_run"] == 2
    assert result.report["train_config"]["freq_warp"] == 0.1
    assert result.report["train_config"]["offset_shrink"] == 0.5
    assert result.report["train_config"]["lr_schedule"] == "cosine"
    assert result.report["train_config"]["reference_blend"] == 1.0


def test_training_without_validation_runs_every_epoch_and_keeps_the_last_weights(synthetic_clips, tmp_path):
    """A refit (the recipe and its epoch count chosen, every non-test speaker trains): no validation clips, so
    patience cannot stop it and no epoch is "best"; the model kept is the one after the last epoch."""
    from models.architectures import ArchitectureConfig
    from models.datasets import split_by_speaker
    from models.report import report_markdown
    from models.train import train_baseline

    speakers = sorted({c.speaker for c in synthetic_clips})
    train, test = split_by_speaker(synthetic_clips, speakers[-1:])
    config = TrainConfig(epochs=3, patience=1, batch_size=16, replay_per_class=0)
    arch = ArchitectureConfig(channels=(8, 16), embedding_dim=16, head_units=8)
    result = train_baseline(train, [], test, config=config, cache_dir=tmp_path, architecture=arch)
    rep = result.report
    assert rep["epochs_run"] == 3 and rep["best_val_uar"] is None
    assert [h["val_uar"] for h in rep["history"]] == [None] * 3
    assert rep["split"]["val_speakers"] == [] and rep["split"]["val_clips"] == 0
    assert "test" in rep  # still scored on the held-out speaker
    text = report_markdown(rep)
    assert "no validation (fixed epochs)" in text and "epochs run: 3;" in text
    # the last epoch's weights: one more epoch from the same seed changes them (nothing restored a "best" one)
    again = train_baseline(train, [], test, config=TrainConfig(epochs=2, patience=1, batch_size=16,
                                                                replay_per_class=0),
                           cache_dir=tmp_path, architecture=arch)
    w3, w2 = result.head.get_weights()[0], again.head.get_weights()[0]
    assert w3.shape == w2.shape and not np.allclose(w3, w2)


def test_val_speakers_none_trains_on_every_non_test_speaker():
    from models.cli import _split, build_parser
    from models.datasets import Clip

    clips = [Clip(path=f"/x/{s}-{i}.wav", label=lab, speaker=f"ravdess-{s}")
             for s in range(1, 25) for i, lab in enumerate(("angry", "happy", "neutral", "sad"))]
    args = build_parser().parse_args(["train", "--out", "x", "--corpus", "ravdess", "--val-speakers", "none"])
    train, val, test = _split(args, clips)
    assert val == [] and {c.speaker for c in test} == {f"ravdess-{a}" for a in (21, 22, 23, 24)}
    assert {c.speaker for c in train} == {f"ravdess-{a}" for a in range(1, 21)}
    default = _split(build_parser().parse_args(["train", "--out", "x", "--corpus", "ravdess"]), clips)
    assert {c.speaker for c in default[1]} == {"ravdess-19", "ravdess-20"}
    # the bundled recipe's split: both corpora, each one's named test speakers held out, everyone else trains
    nemo = [Clip(path=f"/n/{s}-{lab}.wav", label=lab, speaker=f"nemo-{s}")
            for s in ("EB0", "IC0", "KD0", "KS0", "MK0", "MP0", "SM0", "TP0", "WR0") for lab in ("angry", "sad")]
    args = build_parser().parse_args(["train", "--out", "x", "--corpus", "ravdess,nemo", "--val-speakers", "none"])
    train, val, test = _split(args, clips + nemo)
    assert val == [] and {c.speaker for c in test} == {f"ravdess-{a}" for a in (21, 22, 23, 24)} | {
        "nemo-IC0", "nemo-MK0", "nemo-TP0"}
    assert len(train) == 20 * 4 + 6 * 2
    # --folds: a fold's test speakers, no validation
    args = build_parser().parse_args(["train", "--out", "x", "--corpus", "ravdess", "--folds", "4", "--fold", "1",
                                      "--val-speakers", "none"])
    train, val, test = _split(args, clips)
    assert val == [] and test and not {c.speaker for c in train} & {c.speaker for c in test}
    assert len(train) + len(test) == 20 * 4  # the named test actors 21-24 are in no fold


def test_fedser_train_flags_reach_the_train_config():
    from models.cli import _configs, build_parser

    args = build_parser().parse_args(["train", "--out", "x", "--lr-schedule", "cosine", "--freq-warp", "0.15",
                                      "--time-stretch", "0.2", "--spectral-tilt", "1", "--speaker-reference",
                                      "neutral", "--reference-blend", "0.5", "--swa-epochs", "10",
                                      "--offset-shrink", "0.5", "--spread-shrink", "0.25"])
    _, config = _configs(args)
    assert (config.lr_schedule, config.freq_warp, config.time_stretch, config.spectral_tilt,
            config.reference_blend, config.swa_epochs) == ("cosine", 0.15, 0.2, 1.0, 0.5, 10)
    assert (config.offset_shrink, config.spread_shrink) == (0.5, 0.25)
    _, default = _configs(build_parser().parse_args(["train", "--out", "x"]))
    assert default.lr_schedule == "constant" and not default.feature_augmented


def test_fedser_train_augmentation_ranges():
    from models.cli import _configs, build_parser
    from models.features import Augmentation

    args = build_parser().parse_args(["train", "--out", "x", "--augment", "2", "--augment-speed", "0.8,1.25",
                                      "--augment-gain-db", "0,0", "--augment-snr-db", "90,90", "--seed", "3"])
    _, config = _configs(args)
    assert config.augmentation == Augmentation(copies=2, speed=(0.8, 1.25), gain_db=(0.0, 0.0), snr_db=(90.0, 90.0),
                                               seed=3)
    _, default = _configs(build_parser().parse_args(["train", "--out", "x"]))
    assert default.augmentation == Augmentation()


def test_a_search_recipe_may_name_another_architecture():
    """recipe_search: ``"arch": {"name": "afcn"}`` builds that preset (its own sizes), other keys override sizes; no
    name is the CNN as before."""
    from models.architectures import preset
    from models.recipe_search import RECIPES, _configs, add_recipe

    add_recipe("T-afcn", '{"base": "B-speed", "arch": {"name": "afcn", "dropout": 0.1}}')
    try:
        _, _, arch = _configs(RECIPES["T-afcn"], 0)
        assert arch == preset("afcn", dropout=0.1)
        _, _, cnn = _configs(RECIPES["B-wide"], 0)
        assert cnn == preset("cnn", channels=(96, 160, 160))
        add_recipe("T-wide-afcn", '{"base": "B-wide", "arch": {"name": "afcn"}}')  # not the CNN's channels
        assert _configs(RECIPES["T-wide-afcn"], 0)[2] == preset("afcn")
    finally:
        RECIPES.pop("T-afcn")
        RECIPES.pop("T-wide-afcn", None)


def test_a_search_recipe_may_change_the_feature_kind():
    """recipe_search builds log-mel features unless a recipe's ``features`` names another ``kind`` (it used to be a
    TypeError); ``n_mfcc`` only matters with ``kind`` "mfcc"."""
    from models.recipe_search import RECIPES, _configs, add_recipe

    add_recipe("T-mfcc", '{"base": "A-swa-long", "features": {"kind": "mfcc", "n_mfcc": 20}}')
    try:
        features, _, _ = _configs(RECIPES["T-mfcc"], 0)
        assert (features.kind, features.n_mfcc, features.n_features) == ("mfcc", 20, 20)
        assert features.speaker_norm and features.utterance_norm == "level"  # the base's and the search's own
        base, _, _ = _configs(RECIPES["A-swa-long"], 0)
        assert (base.kind, base.n_features) == ("logmel", 40)
    finally:
        RECIPES.pop("T-mfcc")


def test_a_learning_curve_draws_its_nemo_speakers_from_the_non_test_six(capsys):
    """``run --task B --refit --nemo-speakers K``: K of the six non-test nEMO speakers, the same K for a seed every
    time, growing subsets differ by seed; never a test speaker; refused outside task B refit or out of 0..6."""
    from models.recipe_search import NEMO_DEV, NEMO_TEST, _row_name, main, nemo_subset

    assert nemo_subset(0, 0) == () and nemo_subset(6, 3) == NEMO_DEV
    for k in range(7):
        for seed in range(4):
            pick = nemo_subset(k, seed)
            assert len(pick) == len(set(pick)) == k and set(pick) <= set(NEMO_DEV) and not set(pick) & set(NEMO_TEST)
            assert pick == nemo_subset(k, seed)
    assert len({nemo_subset(2, seed) for seed in range(6)}) > 1
    with pytest.raises(ValueError, match="0..6"):
        nemo_subset(7, 0)
    assert _row_name("B-speed-e20", True, None, 2) == "B-speed-e20-refit-nemo2"
    from models.recipe_search import _split

    for task, refit, fold, pick in (("A", True, None, ("nemo-EB0",)), ("B", False, None, ("nemo-EB0",)),
                                    ("B", False, 0, ("nemo-EB0",)), ("B", True, None, ("nemo-IC0",))):
        with pytest.raises(ValueError, match="nemo_train is for task B"):  # before any corpus is read
            _split(task, refit, fold, pick)
    for argv in (["run", "--task", "B", "--nemo-speakers", "2"],
                 ["run", "--task", "A", "--refit", "--nemo-speakers", "2"],
                 ["run", "--task", "B", "--refit", "--nemo-speakers", "9"]):
        with pytest.raises(SystemExit):
            main(argv + ["--recipes", "B0"])
        assert "--nemo-speakers is for run --task B --refit" in capsys.readouterr().err


def test_the_personalisation_study_parses_optional_policy_fields():
    """``--policy NAME=k:v``: an ``X | None`` field takes an X; a bool takes true/false; an unknown field exits."""
    from tools.personalisation_study import parse_policy

    name, over = parse_policy("gentle=thumbs_adam_learning_rate:0.001,thumbs_adam_steps:300,balance_classes:false")
    assert name == "gentle" and over == {"thumbs_adam_learning_rate": 0.001, "thumbs_adam_steps": 300,
                                         "balance_classes": False}
    assert type(over["thumbs_adam_steps"]) is int
    with pytest.raises(SystemExit, match="no field"):
        parse_policy("x=nonsense:1")


def test_ensemble_rows_average_the_seeds_probabilities(tmp_path):
    """recipe_search ensemble: each disjoint group of seeds is scored on its averaged probabilities; seeds whose
    logits are of other clips are refused."""
    from models.recipe_search import ensemble_rows

    spk = np.array(["nemo-IC0"] * 4 + ["ravdess-21"] * 4 + ["nemo-EB0"] * 4)
    y = np.array([0, 1, 2, 3] * 3)
    good, bad = np.eye(4)[y] * 4, np.eye(4)[(y + 1) % 4] * 4
    vspk = np.array(["ravdess-19", "ravdess-19"])

    def save(seed, logits, paths=None, val_paths=("v0.wav", "v1.wav")):
        np.savez(tmp_path / f"A-swa-long-seed{seed}.npz", speakers=spk, labels=y, logits=logits,
                 paths=np.array(paths or [f"c{i}.wav" for i in range(12)]), val_speakers=vspk,
                 val_paths=np.array(val_paths), val_labels=np.array([0, 1]), val_logits=np.eye(4)[[0, 1]])

    save(0, good)
    save(1, good + 0.1 * bad)  # agrees with seed 0
    save(2, bad)
    save(3, 0.5 * bad)  # a weaker wrong vote: with seed 2, the pair is all wrong
    rows = ensemble_rows("A", "A-swa-long", [0, 1, 2, 3], 2, tmp_path)
    assert [r["members"] for r in rows] == [[0, 1], [2, 3]]
    assert rows[0]["nemo_test"]["uar"] == 1.0 and rows[1]["nemo_test"]["uar"] == 0.0
    assert rows[0]["recipe"] == "A-swa-long-ens2" and rows[0]["final_val_uar"] == 1.0
    assert rows[0]["nemo_all"]["n"] == 8 and rows[0]["ravdess_test"]["n"] == 4
    # probabilities are averaged, not logits: one very confident wrong model against two mildly right ones
    save(4, bad * 10)
    save(5, good * 0.5)
    save(6, good * 0.5)
    (row,) = ensemble_rows("A", "A-swa-long", [4, 5, 6], 3, tmp_path)
    assert row["nemo_test"]["uar"] == 1.0  # averaged logits would follow the confident one: 0.0
    save(3, good, paths=[f"d{i}.wav" for i in range(12)])
    with pytest.raises(ValueError, match="different clips"):
        ensemble_rows("A", "A-swa-long", [2, 3], 2, tmp_path)
    save(3, good, val_paths=("v1.wav", "v0.wav"))  # the same speakers, validation clips in another order
    with pytest.raises(ValueError, match="different clips"):
        ensemble_rows("A", "A-swa-long", [2, 3], 2, tmp_path)
    with pytest.raises(ValueError, match="needs at least"):
        ensemble_rows("A", "A-swa-long", [0], 2, tmp_path)


def test_refit_rows_have_no_validation_figure_and_the_table_says_so(tmp_path):
    """A refit's logits hold no validation clips: its ensemble row's validation UAR is None (not NaN, which is not
    JSON), and the table prints "-" where a validation figure would be."""
    import json

    from models.recipe_search import ensemble_rows, table

    spk = np.array(["nemo-IC0"] * 4 + ["ravdess-21"] * 4)
    y = np.array([0, 1, 2, 3] * 2)
    for seed in (0, 1):
        np.savez(tmp_path / f"B-speed-refit-seed{seed}.npz", speakers=spk, labels=y, logits=np.eye(4)[y],
                 paths=np.array([f"c{i}.wav" for i in range(8)]), val_speakers=np.array([], str),
                 val_paths=np.array([], str), val_labels=np.array([], int), val_logits=np.zeros((0, 4)))
    (row,) = ensemble_rows("B", "B-speed", [0, 1], 2, tmp_path, refit=True)
    assert row["recipe"] == "B-speed-refit-ens2" and row["final_val_uar"] is None
    json.loads(json.dumps(row, allow_nan=False))
    single = {**row, "recipe": "B-speed-refit", "seed": 0, "params": 1}
    text = table([single, {**single, "seed": 1}], "B")
    line = next(x for x in text.splitlines() if x.startswith("| B-speed-refit |"))
    assert line.split(" | ")[3] == "-" and line.split(" | ")[4] == "1.000 ± 0.000"


def test_the_personalisation_study_refuses_an_unknown_answer_mode_or_corpus(capsys):
    """--modes and --corpora name only known ones: a mistyped mode ran nothing, a mistyped corpus the RAVDESS test
    actors."""
    from tools.personalisation_study import MODES, main

    assert set(MODES) == {"corrections", "thumbs", "mixed"} and 0 < MODES["mixed"] < 1
    with pytest.raises(SystemExit) as exc:
        main(["--model", "nowhere", "--modes", "mixed,thumb"])
    assert exc.value.code == 2 and "unknown ['thumb']" in capsys.readouterr().err
    # a misspelt corpus took the RAVDESS branch with the default (test) actors
    with pytest.raises(SystemExit) as exc:
        main(["--model", "nowhere", "--corpora", "nemo,ravdes", "--ravdess-users", "17,18"])
    assert exc.value.code == 2 and "--corpora: unknown ['ravdes']" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, named", [
    ("--epochs", "-1", "epochs"), ("--learning-rate", "nan", "learning_rate"), ("--offset-shrink", "2", "shrink"),
    ("--spread-shrink", "nan", "shrink"), ("--reference-blend", "-1", "reference_blend"),
    ("--augment", "-3", "copies"), ("--augment-speed", "1", "--augment-speed"), ("--spectral-tilt", "inf", "tilt"),
    ("--batch-size", "0", "batch_size"), ("--label-smoothing", "1.5", "label_smoothing"),
])
def test_fedser_train_refuses_an_option_out_of_range_by_name_before_reading_a_corpus(tmp_path, option, value, named):
    """Before, these were ValueError tracebacks after the corpus had been read (or, --epochs -1, an untrained model
    exported with exit code 0; --learning-rate nan, a misleading export error; --dry-run checked none of them)."""
    from models.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "out"), "--dry-run", option, value])
    assert named in str(info.value.code) and "fedser-train: error" in str(info.value.code)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, said", [
    (["run", "--define", "noequals"], "NAME=JSON"),
    (["run", "--define", "X={bad"], "JSONDecodeError"),
    (["run", "--define", "X=[1]"], "must be an object"),
    (["run", "--define", 'X={"base": "nope"}'], "unknown base recipe"),
    (["run", "--define", 'X={"train": {"zzz": 1}}'], "zzz"),
    (["run", "--define", 'X={"train": {"epochs": -1}}'], "epochs"),
    (["run", "--define", 'X={"colour": 1}'], "unknown keys"),
    (["run", "--define", 'A0={"train": {"epochs": -1}}'], "epochs"),  # a built-in name: A0 stays as it was
    (["run", "--recipes", "A0,ZZZ"], "unknown ['ZZZ']"),
    (["run", "--seeds", "0,x"], "--seeds"),
    (["ensemble", "--size", "0", "--save-logits", "."], "--size"),
])
def test_recipe_search_refuses_bad_arguments_before_any_run(tmp_path, capsys, argv, said):
    """Before, these were tracebacks, and a bad name or seed after a good one (A0,ZZZ; 0,x) was found only after
    the good runs had trained (found by an audit)."""
    from models.recipe_search import RECIPES, main

    before = dict(RECIPES)
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path / "rs")])
    assert info.value.code == 2 and said in capsys.readouterr().err
    assert RECIPES == before and not (tmp_path / "rs").exists()
