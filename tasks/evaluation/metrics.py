"""Evaluation statistics of the paper's Sec. IV, as plain functions over arrays.

- `decidability` is eq. 14, the separation d' of a genuine and an impostor score
  distribution (Figs. 6, 7, 10, 13).
- `roc_curve` / `roc_auc` summarise the same two distributions without assuming they are
  Gaussian, which d' quietly does.
- `ks_pvalue` and `pearson` back the "do the a elements keep the soft labels" checks
  (Table III uses Pearson correlations).
- `bootstrap` gives the mean +- sd over 90% random subsets the paper reports everywhere.
- `average_precision` and `detection_matches` give the face-detection AP of Table II,
  whose "mAP ratio a/x" compares the AP on de-identified frames with the AP on originals.
- `ssim` compares images (reconstruction quality).

Scores are similarities throughout: higher means "more likely the same person", so
genuine pairs are the positives. Callers holding distances should negate them first.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from skimage.metrics import structural_similarity

# skimage's default SSIM window (7x7); smaller images get the largest odd window that fits.
_SSIM_DEFAULT_WIN = 7


def _scores(values: ArrayLike, name: str) -> np.ndarray:
    """1-D float array of finite scores; an empty or non-finite set is a caller bug, not a 0."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def decidability(genuine: ArrayLike, impostor: ArrayLike) -> float:
    """Eq. 14: d' = |mu_G - mu_I| / sqrt((sigma_G^2 + sigma_I^2) / 2).

    The paper does not say which variance it uses; we take the population variance
    (ddof=0), as Daugman's original d' and numpy's default do. With the few hundred scores
    per environment the two differ by well under 1%, so the choice does not change a
    comparison, but it makes a single score per side legal.

    Two constant distributions have a zero denominator: d' is infinite when their means
    differ (perfectly separated) and NaN when they coincide (nothing to separate).
    """
    g = _scores(genuine, "genuine")
    i = _scores(impostor, "impostor")
    gap = abs(float(g.mean()) - float(i.mean()))
    spread = np.sqrt((float(g.var()) + float(i.var())) / 2.0)
    if spread == 0.0:
        return float("inf") if gap > 0.0 else float("nan")
    return gap / spread


def roc_curve(genuine: ArrayLike, impostor: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for accepting a pair when its similarity >= threshold.

    thresholds are +inf followed by the distinct scores in decreasing order, so the curve
    starts at (0, 0) (accept nothing) and, since every score is >= the lowest one, ends at
    (1, 1). Tied scores move fpr and tpr in one diagonal step, which is what makes the
    trapezoid area equal the tie-aware `roc_auc`.
    """
    g = _scores(genuine, "genuine")
    i = _scores(impostor, "impostor")
    thresholds = np.unique(np.concatenate([g, i]))[::-1]
    # Count of scores >= t for every t, from sorted arrays in O(n log n).
    g_sorted = np.sort(g)
    i_sorted = np.sort(i)
    tp = g.size - np.searchsorted(g_sorted, thresholds, side="left")
    fp = i.size - np.searchsorted(i_sorted, thresholds, side="left")
    fpr = np.concatenate([[0.0], fp / i.size])
    tpr = np.concatenate([[0.0], tp / g.size])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def roc_auc(genuine: ArrayLike, impostor: ArrayLike) -> float:
    """P(genuine > impostor) + P(genuine == impostor) / 2: the Mann-Whitney U over n_G * n_I.

    Computed from mid-ranks so ties count half; this equals the trapezoid area under
    `roc_curve`.
    """
    g = _scores(genuine, "genuine")
    i = _scores(impostor, "impostor")
    ranks = stats.rankdata(np.concatenate([g, i]))  # average ranks: ties share them
    u = float(ranks[: g.size].sum()) - g.size * (g.size + 1) / 2.0
    return u / (g.size * i.size)


def ks_pvalue(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sided two-sample Kolmogorov-Smirnov p-value (scipy's ks_2samp, its default method).

    A small value says the two samples come from different distributions.
    """
    return float(stats.ks_2samp(_scores(a, "a"), _scores(b, "b")).pvalue)


def pearson(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson's r; NaN when either side is constant (r is undefined, not 0).

    Written out rather than calling scipy.stats.pearsonr, which warns on constant input;
    in bootstrap loops a constant subset is an expected outcome, not a warning.
    """
    x = _scores(a, "a")
    y = _scores(b, "b")
    if x.size != y.size:
        raise ValueError(f"pearson needs paired samples, got {x.size} and {y.size} values")
    dx = x - x.mean()
    dy = y - y.mean()
    norm = float(np.sqrt((dx @ dx) * (dy @ dy)))
    if norm == 0.0:
        return float("nan")
    # Rounding can push |r| a hair above 1 for perfectly collinear data.
    return float(np.clip((dx @ dy) / norm, -1.0, 1.0))


def bootstrap(values: ArrayLike, statistic: Callable[[np.ndarray], float] = np.mean,
              fraction: float = 0.9, n_resamples: int = 200, seed: int = 0,
              *, replace: bool = False) -> tuple[float, float]:
    """(mean, sd) of `statistic` over `n_resamples` random subsets of `fraction` of the items.

    Items are the elements of a 1-D `values`, or the rows of a 2-D one, so a statistic over
    paired columns keeps its pairs: `bootstrap(np.column_stack([x, y]),
    lambda v: pearson(v[:, 0], v[:, 1]))`.

    Subsets are drawn without replacement by default: a 90% subset then never repeats an
    item, which is what "random subsets composed of 90% of the test data" reads as. The
    paper also says the subsets were "drew with repetition", which may mean with
    replacement; `replace=True` gives that reading. The sd is the sample sd over resamples
    (ddof=1). A statistic that returns NaN for some subset makes the result NaN, on purpose:
    silently dropping those subsets would bias the estimate.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be >= 2 for a standard deviation, got {n_resamples}")
    items = np.asarray(values)
    if items.ndim not in (1, 2):
        raise ValueError(f"values must be 1-D or 2-D (rows = items), got shape {items.shape}")
    n = items.shape[0]
    if n == 0:
        raise ValueError("values is empty")
    size = max(1, int(round(fraction * n)))
    rng = np.random.default_rng(seed)
    results = np.array([float(statistic(items[rng.choice(n, size=size, replace=replace)]))
                        for _ in range(n_resamples)])
    return float(results.mean()), float(results.std(ddof=1))


def bootstrap_two_samples(genuine: ArrayLike, impostor: ArrayLike,
                          statistic: Callable[[np.ndarray, np.ndarray], float], fraction: float = 0.9,
                          n_resamples: int = 200, seed: int = 0, *, replace: bool = False) -> tuple[float, float]:
    """`bootstrap` for a statistic of two samples (d′, AUC): each sample is resampled on its
    own, so every resample keeps both, in their original proportion. Resampling the pooled
    pairs instead can draw a resample without a single genuine pair when there are few."""
    g, i = np.asarray(genuine, dtype=np.float64).ravel(), np.asarray(impostor, dtype=np.float64).ravel()
    if g.size == 0 or i.size == 0:
        raise ValueError("both samples need at least one score")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be >= 2 for a standard deviation, got {n_resamples}")
    rng = np.random.default_rng(seed)

    def draw(v: np.ndarray) -> np.ndarray:
        return v[rng.choice(v.size, size=max(1, int(round(fraction * v.size))), replace=replace)]

    results = np.array([float(statistic(draw(g), draw(i))) for _ in range(n_resamples)])
    return float(results.mean()), float(results.std(ddof=1))


def average_precision(scores: ArrayLike, is_true_positive: ArrayLike, n_ground_truth: int) -> float:
    """Detection AP: area under the precision-recall curve, all-points interpolation.

    As in PASCAL VOC 2010+: detections are ranked by decreasing score, precision is made
    monotone (each point takes the best precision at any higher recall) and summed over the
    recall steps. Missed ground truth simply caps the recall below 1, which is why
    `n_ground_truth` is needed and not just the detections. Tied scores keep their input
    order (stable sort), so the caller decides how ties are broken.

    Example: ranking TP, FP, TP with 2 ground-truth faces gives 0.5 * 1 + 0.5 * 2/3 = 0.8333.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    tp = np.asarray(is_true_positive, dtype=bool).ravel()
    if s.size != tp.size:
        raise ValueError(f"{s.size} scores but {tp.size} true-positive flags")
    if n_ground_truth <= 0:
        raise ValueError(f"n_ground_truth must be positive, got {n_ground_truth}")
    if int(tp.sum()) > n_ground_truth:
        raise ValueError(f"{int(tp.sum())} true positives for only {n_ground_truth} ground-truth boxes")
    if s.size == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    hits = tp[order].astype(np.float64)
    cum_tp = np.cumsum(hits)
    recall = cum_tp / n_ground_truth
    precision = cum_tp / np.arange(1, s.size + 1)
    # Sentinels as in VOC's devkit: recall from 0 to 1, precision 0 past the last detection.
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _iou(boxes: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """IoU of each (x1, y1, x2, y2) row with one box, in continuous coordinates (no +1 pixel)."""
    x1 = np.maximum(boxes[:, 0], box[0])
    y1 = np.maximum(boxes[:, 1], box[1])
    x2 = np.minimum(boxes[:, 2], box[2])
    y2 = np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x2 - x1, 0.0, None) * np.clip(y2 - y1, 0.0, None)
    area_boxes = np.clip(boxes[:, 2] - boxes[:, 0], 0.0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0.0, None)
    area_box = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    union = area_boxes + area_box - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def detection_matches(detections: np.ndarray, truth_box: tuple[float, float, float, float],
                      iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Label one image's detections against its single ground-truth face.

    `detections` is (K, 5): x1, y1, x2, y2, score. Going through them by decreasing score,
    the first one with IoU >= `iou_threshold` takes the truth box and is the TP; every other
    detection, duplicates of the same face included, is a FP, so a detector is not rewarded
    for firing twice on one face. Returns (scores, is_tp) in the input row order; pool them
    across images and call `average_precision` with n_ground_truth = number of truth boxes
    (images whose face was missed still count there).
    """
    dets = np.asarray(detections, dtype=np.float64)
    if dets.size == 0:
        return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=bool)
    if dets.ndim != 2 or dets.shape[1] != 5:
        raise ValueError(f"detections must be (K, 5) x1, y1, x2, y2, score; got shape {dets.shape}")
    scores = dets[:, 4].copy()
    is_tp = np.zeros(len(dets), dtype=bool)
    overlaps = _iou(dets[:, :4], tuple(float(v) for v in truth_box))
    for k in np.argsort(-scores, kind="stable"):
        if overlaps[k] >= iou_threshold:
            is_tp[k] = True
            break  # one truth box, so at most one TP
    return scores, is_tp


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 images (H x W x C, or H x W), data range 255.

    skimage's 7x7 window does not fit images under 7 px a side (tiny faces far from the
    camera), so those get the largest odd window that does. Below 3 px there is no
    window with a variance to compare, so that is an error.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected H x W or H x W x C images, got shape {a.shape}")
    side = min(a.shape[0], a.shape[1])
    if side < 3:
        raise ValueError(f"SSIM needs images at least 3 px a side, got {a.shape[:2]}")
    win_size = min(_SSIM_DEFAULT_WIN, side if side % 2 == 1 else side - 1)
    return float(structural_similarity(a, b, win_size=win_size, data_range=255,
                                       channel_axis=-1 if a.ndim == 3 else None))


def box_change(previous: np.ndarray, current: np.ndarray, box: tuple[int, int, int, int]) -> tuple[float, int]:
    """(summed absolute difference, values) of one x, y, w, h box between two uint8 frames.

    A sum, not a mean, so a caller can pool frames and boxes of any size into one mean:
    the flicker of a face is this pooled over a sequence's consecutive frames.
    """
    if previous.dtype != np.uint8 or current.dtype != np.uint8 or previous.shape != current.shape:
        raise ValueError(f"box_change takes two uint8 frames of one shape, got {previous.dtype} {previous.shape} "
                         f"and {current.dtype} {current.shape}")
    x, y, w, h = box
    a = previous[y:y + h, x:x + w].astype(np.int16)
    b = current[y:y + h, x:x + w].astype(np.int16)
    return float(np.abs(b - a).sum()), int(a.size)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays of one shape; inf when equal."""
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"psnr takes uint8 arrays, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
