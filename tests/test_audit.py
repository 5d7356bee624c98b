"""The audit's detectors on planted data: copies, noised, shifted, cropped and partial copies, fresh items."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protomem.audit.core import (
    COPY_FLAGS,
    FEATURE_FLAGS,
    AuditConfig,
    audit_images,
    audit_sequences,
    audit_text,
)
from protomem.audit.inputs import batches
from protomem.audit.stats import spearman_test
from protomem.memorization import near, text


def smooth_images(count: int, size: int, seed: int) -> np.ndarray:
    """(count, size, size, 1) images in [0.2, 0.8]: random 8x8 fields upsampled, plus fine texture."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.2, 0.8, size=(count, 8, 8))
    images = np.kron(coarse, np.ones((size // 8, size // 8)))
    images += rng.uniform(-0.05, 0.05, size=images.shape)
    return np.clip(images, 0.2, 0.8).astype(np.float32)[..., None]


# ----------------------------------------------------------------------------------------------- distances


def test_tiled_l2_is_the_worst_tile_and_l2_the_average() -> None:
    a = np.zeros((1, 8, 8, 1), dtype=np.float32)
    b = a.copy()
    delta = 0.4
    b[0, :2, :2, 0] = delta  # one tile of the 4 x 4 grid differs by delta everywhere
    assert near.tiled_l2(a, b, grid=4)[0] == pytest.approx(delta)
    flat = near.rms(np.linalg.norm((a - b).ravel()), a.size)
    assert flat == pytest.approx(delta / 4)  # sqrt(delta^2 * 4 / 64)


def test_distance_ratio_edge_cases() -> None:
    ratio = near.distance_ratio(np.array([0.0, 1.0, 0.0, 2.0]), np.array([0.0, 4.0, 3.0, 0.0]))
    assert ratio.tolist() == [0.0, 0.25, 0.0, np.inf]


def test_nearest_l2_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(300, 20)).astype(np.float32)
    queries = rng.normal(size=(40, 20)).astype(np.float32)
    distances, indices = near.nearest_l2(reference, queries, k=3, batch_size=7)
    brute = np.linalg.norm(queries[:, None] - reference[None], axis=2)
    order = np.argsort(brute, axis=1)[:, :3]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_allclose(distances, np.take_along_axis(brute, order, axis=1), rtol=1e-4)
    own, own_index = near.nearest_l2(reference, reference, k=1, exclude_self=True)
    assert (own_index[:, 0] != np.arange(300)).all()
    brute_self = np.linalg.norm(reference[:, None] - reference[None], axis=2)
    np.fill_diagonal(brute_self, np.inf)
    np.testing.assert_allclose(own[:, 0], brute_self.min(axis=1), rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=0, max_size=25),
    st.lists(st.integers(0, 3), min_size=0, max_size=25),
)
def test_longest_common_run_matches_brute_force(a: list[int], b: list[int]) -> None:
    length, start_a, start_b = text.longest_common_run(np.array(a), np.array(b))
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]:
                n += 1
            best = max(best, n)
    assert length == best
    assert a[start_a : start_a + length] == b[start_b : start_b + length]


def test_spearman_test_detects_monotone_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    strong = spearman_test(x, np.exp(x) + 0.01 * rng.normal(size=200), n_perm=500)
    assert strong["rho"] > 0.95 and strong["p_permutation"] <= 2 / 501
    assert strong["ci_low"] <= strong["rho"] <= strong["ci_high"]
    noise = spearman_test(x, rng.normal(size=200), n_perm=500)
    assert noise["ci_low"] < 0 < noise["ci_high"] and noise["p_permutation"] > 0.01
    assert np.isnan(spearman_test(x, np.zeros(200))["rho"])


# -------------------------------------------------------------------------------------------------- images


def crop_and_enlarge(images: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """Cut a side x side window at (top, left) and enlarge it back to full size (scipy's linear zoom)."""
    from scipy import ndimage

    size = images.shape[1]
    window = images[:, top : top + side, left : left + side]
    return np.clip(ndimage.zoom(window, (1, size / side, size / side, 1), order=1), 0, 1).astype(np.float32)


def test_area_resize_inverts_block_enlargement_and_keeps_the_mean() -> None:
    rng = np.random.default_rng(0)
    small = rng.uniform(size=(3, 6, 5, 2)).astype(np.float32)
    big = np.repeat(np.repeat(small, 3, axis=1), 3, axis=2)  # every pixel a 3 x 3 block
    np.testing.assert_allclose(near.resize_images(big, 6, 5), small, rtol=1e-5, atol=1e-6)
    odd = near.resize_images(big, 7, 4)  # non-integer factors: weights still sum to one per pixel
    np.testing.assert_allclose(odd.mean(axis=(1, 2)), big.mean(axis=(1, 2)), rtol=1e-4)
    assert near.crop_sizes(32, 32, 0.25) == [(h, h) for h in range(24, 32)]


def test_images_planted_copies_are_flagged_by_the_right_criteria() -> None:
    train = smooth_images(400, 32, seed=0)
    # The enlargement blurs these images' fine texture away (crop RMS 0.04-0.05): far looser than the
    # calibrated crop threshold allows, but these fresh images are far (RMS > 0.16), so 0.06 is safe here.
    config = AuditConfig(max_shift=2, max_crop=0.25, crop_threshold=0.06)
    boxes = [(0, 0, 24), (8, 8, 24), (3, 5, 26), (4, 1, 28), (2, 2, 30)]  # (top, left, side) per crop
    rng = np.random.default_rng(1)
    sigma = config.l2_threshold / 4  # well inside the L2 threshold, far from an exact copy
    planted = {
        "copy": train[0:5].copy(),
        "noised": np.clip(train[5:10] + rng.normal(0, sigma, train[5:10].shape), 0, 1).astype(np.float32),
        "shifted": np.roll(train[10:15], 2, axis=2),  # two pixels to the right (wrapping)
        "partial": np.concatenate([train[15:20, :16], smooth_images(5, 32, seed=9)[:, 16:]], axis=1),
        "cropped": np.concatenate(
            [crop_and_enlarge(train[20 + i : 21 + i], *box) for i, box in enumerate(boxes)]
        ),
        "fresh": smooth_images(5, 32, seed=2),
    }
    sources = {"copy": 0, "noised": 5, "shifted": 10, "partial": 15, "cropped": 20}
    generated = np.concatenate(list(planted.values()))
    result = audit_images(train, generated, config)
    m = result.matches
    kinds = np.repeat(list(planted), 5)
    get = {kind: m[kinds == kind] for kind in planted}
    assert get["copy"]["exact"].all() and (get["copy"]["d1"] == 0).all()
    noised = get["noised"]
    assert not noised["exact"].any()
    assert noised[["l2", "ratio", "tiled"]].all().all()
    np.testing.assert_allclose(noised["d1"], sigma, rtol=0.1)  # RMS of the added noise
    shifted = get["shifted"]
    assert not shifted["l2"].any() and not shifted["tiled"].any()  # a 2-pixel shift defeats plain L2
    assert shifted["shifted"].all()
    assert (shifted["shift_dx"] == -2).all() and (shifted["shift_dy"] == 0).all()
    partial = get["partial"]
    assert partial["partial"].all() and not partial["tiled"].any() and not partial["copied"].any()
    assert (partial["tile_fraction"] >= 0.5).all()  # at least the top half of the 4 x 4 tiles
    cropped = get["cropped"]
    assert not cropped[["exact", "l2", "ratio", "tiled", "shifted"]].any().any()  # enlarged: no pixel aligns
    assert cropped["cropped"].all()
    found = cropped[["crop_top", "crop_left", "crop_height", "crop_width"]].to_numpy().tolist()
    assert found == [[top, left, side, side] for top, left, side in boxes]
    assert not get["partial"]["cropped"].any()
    assert not get["fresh"][["copied", "partial"]].any().any()
    for kind, first in sources.items():
        if kind != "partial":
            assert get[kind]["train_index"].tolist() == list(range(first, first + 5))
    assert result.summary["n_copied_outputs"] == 20
    assert result.summary["counts"]["exact"] == 5
    assert result.per_train["copies"].sum() == 20


def test_images_density_ranks_typical_items_lower() -> None:
    rng = np.random.default_rng(0)
    cluster = 0.5 + rng.normal(0, 0.01, size=(50, 8, 8, 1))
    outliers = rng.uniform(0, 1, size=(5, 8, 8, 1))
    train = np.clip(np.concatenate([cluster, outliers]), 0, 1).astype(np.float32)
    result = audit_images(train, train[:3], AuditConfig(density_k=3))
    density = result.per_train["density"].to_numpy()
    assert density[:50].max() < density[50:].min()


# ----------------------------------------------------------------------------------------------- sequences


def test_sequences_planted() -> None:
    rng = np.random.default_rng(0)
    length = 64
    train = list(rng.integers(0, 50, size=(300, length)))
    config = AuditConfig(span_tokens=20)
    mutated = train[10].copy()
    positions = rng.choice(length, size=3, replace=False)
    mutated[positions] = (mutated[positions] + 1) % 50
    rotated = np.roll(train[20], 5)
    fresh = rng.integers(0, 50, size=length)
    result = audit_sequences(train, [train[3], mutated, rotated, fresh], config)
    m = result.matches
    assert m["exact"].tolist() == [True, False, False, False]
    assert m["d1"].tolist()[:2] == [0, 3]
    assert m["hamming"].tolist() == [True, True, False, False]
    assert m["ratio"].tolist() == [True, True, False, False]
    assert m["longest_span"][2] == length - 5  # the rotation keeps 59 tokens in order
    assert m["span"].tolist() == [True, True, True, False]
    assert m["train_index"].tolist() == [3, 10, 20, -1]
    assert not m["copied"][3]


def planted_ragged_outputs(train: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Outputs of mixed lengths: an exact copy, a 2-token mutation, the copy with a token appended, the
    copy cut short by 4 tokens, then 20 fresh sequences of random lengths (some of the training length)."""
    mutated = train[1].copy()
    mutated[[1, 2]] = (mutated[[1, 2]] + 1) % 50
    planted = [train[0].copy(), mutated, np.append(train[2], 7), train[3][:-4].copy()]
    fresh = [rng.integers(0, 50, size=int(n)) for n in rng.choice([28, 32, 40], size=20)]
    return planted + fresh


def test_ragged_outputs_against_uniform_training_get_hamming_only_at_the_training_length() -> None:
    rng = np.random.default_rng(3)
    train = list(rng.integers(0, 50, size=(100, 32)))
    generated = planted_ragged_outputs(train, rng)
    result = audit_sequences(train, generated, AuditConfig(span_tokens=20))
    m = result.matches
    at_length = m["length"] == 32
    assert at_length[:4].tolist() == [True, True, False, False] and at_length.sum() > 2
    assert m.loc[at_length, "d1"].notna().all() and (m.loc[at_length, "nearest_train"] >= 0).all()
    assert m.loc[~at_length, ["d1", "d2", "d1_over_d2"]].isna().all().all()
    assert (m.loc[~at_length, ["nearest_train", "second_train"]] == -1).all().all()
    assert not m.loc[~at_length, ["hamming", "ratio"]].any().any()
    assert m["d1"][:2].tolist() == [0, 2] and m["hamming"][:2].all() and m["ratio"][:2].all()
    assert m["exact"][:4].tolist() == [True, False, False, False]  # a copy of another length is no exact copy
    assert m["span"][:4].all() and m["longest_span"][2:4].tolist() == [32, 28]  # ... but shares a span
    assert m["train_index"][:4].tolist() == [0, 1, 2, 3]
    assert not m["copied"][4:].any()
    assert result.summary["hamming_length"] == 32
    assert result.summary["n_outputs_other_length"] == int((~at_length).sum())


@pytest.mark.parametrize("training", ["uniform", "ragged"])
def test_streamed_sequences_equal_the_list_audit(training: str) -> None:
    rng = np.random.default_rng(4)
    train = list(rng.integers(0, 50, size=(100, 32)))
    if training == "ragged":
        train = [seq[: int(rng.integers(24, 33))] for seq in train]
    generated = planted_ragged_outputs(train, rng)
    config = AuditConfig(span_tokens=20, batch_size=5)
    listed = audit_sequences(train, generated, config)
    streamed = audit_sequences(train, batches(iter(generated), 3), config)  # one pass, other batch size
    pd.testing.assert_frame_equal(streamed.matches, listed.matches)
    pd.testing.assert_frame_equal(streamed.per_train, listed.per_train)
    assert listed.matches["exact"][0] and listed.matches["span"][:4].all()
    assert ("d1" in listed.matches.columns) == (training == "uniform")


def test_sequences_with_grammar_add_block_scores() -> None:
    from protomem.grammar import sample_distinct_strings, sample_grammar

    grammar = sample_grammar(vocab_size=8, n_classes=4, rules_per_symbol=2, branching=2, depth=3, seed=0)
    tokens = sample_distinct_strings(grammar, 60, seed=0).tokens
    train = list(tokens)
    result = audit_sequences(train, train[:5], AuditConfig(span_tokens=4), grammar=grammar)
    assert "block_count_same_pos_l2" in result.per_train.columns
    assert "block_count_same_pos_l2" in result.summary["prototypicality"]
    assert result.matches["exact"].all()


# ---------------------------------------------------------------------------------------------------- text


def test_text_planted_spans_and_coverage() -> None:
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(3000)])
    train_docs = [" ".join(rng.choice(words, size=200)) for _ in range(100)]
    k = 25
    config = AuditConfig(span_tokens=k)
    crop = " ".join(train_docs[4].split()[50:110])
    fresh_words = [f"new{i}" for i in range(100)]
    inserted = " ".join(fresh_words[:50] + train_docs[7].split()[10:40] + fresh_words[50:])
    short = " ".join(fresh_words[:50] + train_docs[8].split()[0 : k - 5] + fresh_words[50:])
    generated = [train_docs[2], crop, inserted, short, " ".join(fresh_words)]
    result = audit_text(train_docs, generated, config)
    m = result.matches
    assert m["exact"].tolist() == [True, False, False, False, False]
    assert m["longest_span"].tolist() == [200, 60, 30, 0, 0]
    np.testing.assert_allclose(m["covered_fraction"], [1.0, 1.0, 30 / 130, 0.0, 0.0])
    assert m["span"].tolist() == [True, True, True, False, False]
    assert m["train_index"].tolist() == [2, 4, 7, -1, -1]
    assert m["span_output_start"][2] == 50 and m["span_train_start"][2] == 10
    assert m["covered"].tolist() == [True, True, False, False, False]


def test_streamed_text_equals_the_list_audit() -> None:
    rng = np.random.default_rng(5)
    words = np.array([f"w{i}" for i in range(2000)])
    train_docs = [" ".join(rng.choice(words, size=int(rng.integers(30, 80)))) for _ in range(60)]
    generated = [" ".join(rng.choice(words, size=40)) for _ in range(30)]
    generated[4] = train_docs[11]
    generated[17] = "Unseen Words " + " ".join(train_docs[23].split()[5:35]) + " more unseen words"
    config = AuditConfig(span_tokens=20, batch_size=4)
    listed = audit_text(train_docs, generated, config)
    streamed = audit_text(train_docs, batches(iter(generated), 7), config)
    pd.testing.assert_frame_equal(streamed.matches, listed.matches)
    pd.testing.assert_frame_equal(streamed.per_train, listed.per_train)
    m = listed.matches
    assert m["exact"].tolist() == [i == 4 for i in range(30)]
    assert m["train_index"][[4, 17]].tolist() == [11, 23] and m["longest_span"][17] == 30
    assert m["span_output_start"][17] == 2 and m["span_train_start"][17] == 5
    assert len(listed.extras["output_tokens"]) == 30 and "output_tokens" not in streamed.extras


def test_encode_with_unknown_keeps_the_vocabulary() -> None:
    train, vocabulary = text.whitespace_tokens(["a b c", "c d"])
    size = len(vocabulary)
    encoded = text.encode_with(["a x y d", "z"], vocabulary, unknown=size)
    assert len(vocabulary) == size  # no output word was added
    assert encoded[0].tolist() == [vocabulary["a"], size, size, vocabulary["d"]] and encoded[1].tolist() == [
        size
    ]
    grown = text.encode_with(["a x"], vocabulary)  # without `unknown`: new words get new ids
    assert grown[0].tolist() == [vocabulary["a"], size] and len(vocabulary) == size + 1


# ----------------------------------------------------------------------------- flips, brightness, calibration


def test_flips_and_brightness_changes_are_caught_with_their_flags() -> None:
    train = smooth_images(300, 32, seed=0)
    rng = np.random.default_rng(3)
    mirrored = train[0:5, :, ::-1] + rng.normal(0, 0.01, train[0:5].shape).astype(np.float32)
    brighter = np.clip((train[5:10] - 0.5) * 0.6 + 0.65, 0, 1)  # contrast x0.6, brightness +0.15
    generated = np.concatenate([mirrored, brighter, smooth_images(5, 32, seed=4)]).astype(np.float32)
    plain = audit_images(train, generated, AuditConfig(prototypicality=False)).matches
    assert not plain["copied"].any()  # no pixel criterion sees a mirror or a contrast change
    m = audit_images(
        train, generated, AuditConfig(flips=True, normalized=True, prototypicality=False)
    ).matches
    assert m["flipped"].tolist() == [True] * 5 + [False] * 10
    assert m["normalized"].tolist() == [False] * 5 + [True] * 5 + [False] * 5
    assert m["train_index"].tolist() == list(range(10)) + [-1] * 5
    assert (m["normalized_rms"][5:10] < 0.01).all()  # nothing clipped: the standardized images agree


def calibration_rates(family: str, n_train: int, n_fresh: int, n_plant: int, seed: int = 2) -> pd.DataFrame:
    from protomem.audit import calibration

    table = calibration.run_family(family, n_train, n_fresh, n_plant, seed=seed)
    return calibration.rate_table(table, calibration.flag_rates(table)).loc[family]


# Bounds from the calibration (docs/results/audit.md): every copy criterion flags at most 0.7% of fresh
# images at its default threshold, on 500-1,000 fresh images per family; here, on fewer, at most 1%.
FRESH_BOUND = 0.01
RECALL_BOUNDS = {  # plant: (criterion, smallest recall) on 32x32 digits and textures
    "shift": ("shifted", 0.95),
    "crop": ("cropped", 0.8),
    "flip": ("flipped", 0.95),
    "brightness": ("normalized", 0.9),
    "partial": ("partial", 0.25),
}


def assert_calibrated(rates: pd.DataFrame, recall_bounds: dict[str, tuple[str, float]]) -> None:
    fresh = rates.loc["fresh"]
    for criterion in [f for f in COPY_FLAGS["images"] if f not in FEATURE_FLAGS] + ["partial"]:
        assert fresh[criterion] <= FRESH_BOUND, (criterion, fresh[criterion])
    assert rates.loc["noise", "copied (defaults)"] >= 0.9  # noise RMS 0.01-0.06: l2 up to 0.05, tiled beyond
    for plant, (criterion, bound) in recall_bounds.items():
        assert rates.loc[plant, criterion] >= bound, (plant, criterion, rates.loc[plant, criterion])


@pytest.mark.parametrize("family", ["digits32", "textures32"])
def test_each_criterion_against_its_calibrated_bounds(family: str) -> None:
    assert_calibrated(calibration_rates(family, 300, 200, 20), RECALL_BOUNDS)


# The validation run of docs/results/audit.md, family by family (its sizes, 100 plants of each kind, seed
# 1): the documented recalls where they fall below RECALL_BOUNDS (crop: 0% digits8, 53% textures32, 10%
# colour32; partial: 22% digits32), a few points under them.
CALIBRATED_EXCEPTIONS = {
    "digits8": {"crop": None},  # an 8x8 crop enlarged back cannot be told from a fresh digit
    "digits32": {"partial": ("partial", 0.2)},
    "textures32": {"crop": ("cropped", 0.45)},  # fine texture: the shrunk-back crop differs more
    "colour32": {"crop": ("cropped", 0.05)},  # sharp edges and 1% noise: likewise
}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["digits8", "digits32", "textures32", "colour32"])
def test_each_criterion_against_its_calibrated_bounds_at_calibration_size(family: str) -> None:
    from protomem.audit import calibration

    bounds = {**RECALL_BOUNDS, **CALIBRATED_EXCEPTIONS[family]}
    bounds = {plant: bound for plant, bound in bounds.items() if bound is not None}
    n_train, n_fresh = calibration.SIZES[family]
    rates = calibration_rates(family, n_train, n_fresh, 100, seed=calibration.VALIDATION_SEED)
    assert_calibrated(rates, bounds)


# ------------------------------------------------------------------------------------------- typical or rare


def digit_copier(seed: int, picked: str, config: AuditConfig, n_copied: int = 150) -> dict:
    """Digits copied with pixel noise (RMS 0.03-0.09) among fresh ones; ``picked``: "random" or "dense"."""
    from protomem.audit import calibration, typicality

    train, fresh, _ = calibration.family("digits8", 1000, 200, seed)
    rng = np.random.default_rng(seed)
    found = typicality.vector_neighbours(train.reshape(1000, -1), np.arange(1000), 16, seed)
    density = typicality.density(found, 5)
    if picked == "dense":
        chosen = rng.choice(np.argsort(density)[:300], size=n_copied, replace=False)
    else:
        chosen = rng.choice(1000, size=n_copied, replace=False)
    noise = rng.uniform(0.03, 0.09, size=(n_copied, 1, 1, 1))
    copies = np.clip(train[chosen] + rng.normal(size=train[chosen].shape) * noise, 0, 1).astype(np.float32)
    result = audit_images(train, np.concatenate([copies, fresh]), config)
    per = result.per_train
    copied = result.matches.loc[result.matches["copied"], "train_index"].to_numpy()
    reference = np.flatnonzero(per["detectable"].notna())
    score = per["density"].to_numpy()
    everyone = [np.ones(reference.size, dtype=bool)]
    uncorrected = typicality.conditional_test(
        score[copied], score[reference], everyone, np.zeros(copied.size, int)
    )
    return {"test": result.summary["prototypicality"]["density"], "uncorrected": uncorrected}


def test_a_uniform_copier_is_not_called_typical_or_rare() -> None:
    """Only d1/d2 < 1/3 on: it catches noisy copies of isolated digits far more easily, so the copied
    digits look rare unless the test compares them with what the detector catches at the same noise."""
    ratio_only = AuditConfig(l2_threshold=0.0, tiled_threshold=0.0)
    for seed in range(3):
        run = digit_copier(seed, "random", ratio_only)
        assert run["uncorrected"]["p_permutation"] < 0.01 and run["uncorrected"]["auc"] < 0.5  # "rarer"
        assert run["test"]["p_permutation"] > 0.05, run["test"]["sentence"]
        assert run["test"]["sentence"].startswith("The data do not show") and run["test"]["null"] == "planted"


def test_a_copier_of_dense_digits_is_called_typical() -> None:
    run = digit_copier(0, "dense", AuditConfig())
    assert run["test"]["p_permutation"] < 0.01 and run["test"]["auc"] > 0.6
    assert run["test"]["sentence"].startswith("The copied training items are more typical")


def test_conditional_test_compares_each_copy_with_its_own_group() -> None:
    from protomem.audit.typicality import conditional_test

    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.normal(0, 1, 500), rng.normal(10, 1, 500)])
    low, high = np.arange(1000) < 500, np.arange(1000) >= 500
    cases = np.concatenate([rng.normal(0, 1, 40), rng.normal(10, 1, 40)])  # each like its own group
    groups = np.repeat([0, 1], 40)
    fair = conditional_test(cases, reference, [low, high], groups)
    assert fair["p_permutation"] > 0.05 and abs(fair["auc"] - 0.5) < 0.1 and fair["n_copies"] == 80
    pooled = conditional_test(cases, reference, [low | high], np.zeros(80, int))
    assert pooled["p_permutation"] > 0.05  # against everyone: half low, half high, still balanced
    lower = conditional_test(cases - 1.5, reference, [low, high], groups)
    assert lower["p_permutation"] < 0.01 and lower["auc"] > 0.8 and lower["ci_low"] <= lower["auc"]


def test_no_prototypicality_skips_the_analysis() -> None:
    train = smooth_images(100, 8, seed=0)
    result = audit_images(train, train[:5], AuditConfig(prototypicality=False))
    assert "density" not in result.per_train.columns and result.summary["prototypicality"] == {}
    assert "not computed" in result.summary["verdict"] and result.matches["exact"].all()


def test_text_copies_are_compared_with_random_items() -> None:
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{x}" for x in rng.integers(0, 500, 60)) for _ in range(200)]
    result = audit_text(docs, docs[:40] + ["nothing here"], AuditConfig(span_tokens=20))
    test = result.summary["prototypicality"]["density"]
    assert test["null"] == "verbatim" and test["n_copies"] == 40 and test["n_reference"] == 200


def test_threads_limit_faiss_blas_and_torch() -> None:
    import faiss
    import torch
    from threadpoolctl import threadpool_info

    from protomem.audit.commands import set_threads

    before = (faiss.omp_get_max_threads(), torch.get_num_threads())
    try:
        set_threads(1, torch_too=True)
        assert faiss.omp_get_max_threads() == 1 and torch.get_num_threads() == 1
        pools = threadpool_info()
        assert pools and all(pool["num_threads"] == 1 for pool in pools)
        assert any(pool["internal_api"] == "openblas" for pool in pools)
    finally:
        set_threads(before[0])
        torch.set_num_threads(before[1])
