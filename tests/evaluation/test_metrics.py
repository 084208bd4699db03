"""Evaluation statistics against values worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tasks.evaluation.metrics import (average_precision, bootstrap, box_change, decidability, detection_matches,
                                      ks_pvalue, pearson, psnr, roc_auc, roc_curve, ssim)


def test_decidability_hand_example() -> None:
    # means 2 and 6, population variances 2/3 each: d' = 4 / sqrt(2/3) = 4 * sqrt(1.5)
    assert decidability([1, 2, 3], [5, 6, 7]) == pytest.approx(4 * math.sqrt(1.5))
    # symmetric in the sense of |mu_G - mu_I|
    assert decidability([5, 6, 7], [1, 2, 3]) == pytest.approx(4 * math.sqrt(1.5))


def test_decidability_constant_distributions() -> None:
    assert decidability([1, 1], [0, 0]) == math.inf
    assert math.isnan(decidability([1, 1], [1, 1]))


def test_auc_perfect_and_chance() -> None:
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 2], [1, 2]) == 0.5


def test_auc_tie_counts_half() -> None:
    # pairs (g, i): (.9,.5)=1 (.9,.1)=1 (.5,.5)=1/2 (.5,.1)=1 -> 3.5 / 4
    assert roc_auc([0.9, 0.5], [0.5, 0.1]) == pytest.approx(0.875)


def test_roc_curve_hand_example() -> None:
    fpr, tpr, thr = roc_curve([0.9, 0.5], [0.5, 0.1])
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])


def test_roc_curve_endpoints_monotone_and_area_equals_auc() -> None:
    rng = np.random.default_rng(1)
    # rounded so that many ties occur, the case where the two computations could disagree
    genuine = np.round(rng.normal(1.0, 1.0, 60), 1)
    impostor = np.round(rng.normal(0.0, 1.0, 80), 1)
    fpr, tpr, thr = roc_curve(genuine, impostor)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff(thr) < 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(genuine, impostor))


def test_ks_pvalue() -> None:
    # fully separated samples of 3: exact p = 2 / C(6, 3) = 0.1
    assert ks_pvalue([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=40), rng.normal(0.5, 1.0, size=50)
    assert ks_pvalue(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert ks_pvalue(a, a) == pytest.approx(1.0)


def test_pearson() -> None:
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = [1,2,3,4], y = [1,3,2,4]: cov sum = 4, sum dx^2 = sum dy^2 = 5 -> r = 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_bootstrap_reproducible_and_seeded() -> None:
    values = np.arange(20, dtype=float)
    first = bootstrap(values, seed=3)
    assert bootstrap(values, seed=3) == first
    assert bootstrap(values, seed=4) != first
    # the mean of 90% subsets stays close to the full mean, with some spread
    assert first[0] == pytest.approx(9.5, abs=0.2)
    assert first[1] > 0


def test_bootstrap_constant_and_full_subsets() -> None:
    assert bootstrap(np.full(10, 7.0)) == (7.0, 0.0)
    # without replacement, a 100% subset is a permutation: every mean is the full mean
    mean, sd = bootstrap(np.arange(10, dtype=float), fraction=1.0)
    assert mean == pytest.approx(4.5) and sd == pytest.approx(0.0, abs=1e-12)
    # with replacement it is not
    assert bootstrap(np.arange(10, dtype=float), fraction=1.0, replace=True)[1] > 0


def test_bootstrap_paired_rows() -> None:
    x = np.arange(10, dtype=float)
    mean, sd = bootstrap(np.column_stack([x, 2 * x + 1]), lambda v: pearson(v[:, 0], v[:, 1]),
                         n_resamples=20)
    assert mean == pytest.approx(1.0) and sd == pytest.approx(0.0, abs=1e-12)


def test_average_precision_hand_ranking() -> None:
    # TP, FP, TP with 2 ground truth: recall .5 at precision 1, recall 1 at precision 2/3
    assert average_precision([0.9, 0.5, 0.1], [True, False, True], 2) == pytest.approx(5 / 6)
    # the same ranking given out of order is sorted by score first
    assert average_precision([0.1, 0.9, 0.5], [True, True, False], 2) == pytest.approx(5 / 6)
    # a missed face caps recall at 1/2
    assert average_precision([0.9], [True], 2) == pytest.approx(0.5)
    assert average_precision([], [], 3) == 0.0
    with pytest.raises(ValueError):
        average_precision([0.9, 0.8], [True, True], 1)


def test_detection_matches_one_tp_per_face() -> None:
    truth = (0.0, 0.0, 10.0, 10.0)
    detections = np.array([
        [0, 0, 10, 10, 0.8],     # IoU 1
        [1, 1, 11, 11, 0.9],     # IoU 81 / 119 = 0.68, higher score: takes the face
        [50, 50, 60, 60, 0.95],  # no overlap
    ], dtype=float)
    scores, is_tp = detection_matches(detections, truth)
    np.testing.assert_array_equal(scores, [0.8, 0.9, 0.95])
    np.testing.assert_array_equal(is_tp, [False, True, False])
    # at IoU 0.7 the shifted box no longer counts, so the exact one is the TP
    _, is_tp = detection_matches(detections, truth, iou_threshold=0.7)
    np.testing.assert_array_equal(is_tp, [True, False, False])
    scores, is_tp = detection_matches(np.zeros((0, 5)), truth)
    assert scores.size == 0 and is_tp.size == 0


def test_ssim() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    assert ssim(image, image) == pytest.approx(1.0)
    noisy = np.clip(image.astype(int) + rng.integers(-40, 41, size=image.shape), 0, 255).astype(np.uint8)
    assert ssim(image, noisy) < 1.0
    tiny = image[:5, :5]
    assert ssim(tiny, tiny) == pytest.approx(1.0)
    assert ssim(tiny, noisy[:5, :5]) < 1.0
    with pytest.raises(ValueError):
        ssim(image[:2, :2], image[:2, :2])


def test_two_sample_bootstrap_keeps_both_samples_in_every_resample() -> None:
    from tasks.evaluation.metrics import bootstrap_two_samples

    genuine, impostor = np.array([0.9]), np.linspace(0.0, 0.2, 50)  # one genuine pair only
    seen = []

    def statistic(g: np.ndarray, i: np.ndarray) -> float:
        seen.append((g.size, i.size))
        return decidability(g, i)

    mean, sd = bootstrap_two_samples(genuine, impostor, statistic, n_resamples=30, replace=True, seed=1)
    assert set(seen) == {(1, 45)} and math.isfinite(mean) and sd > 0
    assert bootstrap_two_samples(genuine, impostor, statistic, seed=1, n_resamples=5) == \
        bootstrap_two_samples(genuine, impostor, statistic, seed=1, n_resamples=5)
    # Without replacement and with everything kept, every resample is the full data.
    assert bootstrap_two_samples([1.0, 2.0], [0.0, 0.5], lambda g, i: g.mean() - i.mean(),
                                 fraction=1.0, n_resamples=3) == (pytest.approx(1.25), pytest.approx(0.0))
    with pytest.raises(ValueError):
        bootstrap_two_samples([], impostor, statistic)


def test_psnr():
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    assert psnr(a, a.copy()) == float("inf")
    b = a.copy()
    b[...] = 1  # MSE 1 everywhere
    assert psnr(a, b) == pytest.approx(20 * np.log10(255.0))
    c = a.copy()
    c[0, 0, 0] = 255  # one full-scale pixel out of 192: MSE 255² / 192
    assert psnr(a, c) == pytest.approx(10 * np.log10(192.0))
    assert psnr(c, a) == psnr(a, c)
    with pytest.raises(ValueError):
        psnr(a, np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError):
        psnr(a.astype(np.float32), a.astype(np.float32))



def test_box_change_sums_absolute_differences_inside_the_box_only():
    before = np.zeros((6, 8, 3), np.uint8)
    after = before.copy()
    after[1:3, 2:5] = 10  # inside the box: 2 x 3 pixels x 3 channels, 18 values of +10
    after[2, 3, 0] = 250  # one of them 250 instead
    after[5, 7] = 200  # outside the box: must not count
    before[1, 2, 1] = 30  # and one fell from 30 to 10: |10 - 30| = 20, not -20
    total, values = box_change(before, after, (2, 1, 4, 3))  # x 2..5, y 1..3
    assert values == 4 * 3 * 3
    assert total == 16 * 10 + 250 + 20
    with pytest.raises(ValueError):
        box_change(before, after.astype(np.float32), (0, 0, 2, 2))
